"""VisionGPT processor: images to `pixel_values`, captions to GPT-2 tokens and labels, generated ids to clean text."""

import os

from PIL import Image, UnidentifiedImageError
from transformers import AutoTokenizer, BatchFeature, ViTImageProcessorPil
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack

from .compat_vision_gpt import load_image_processor
from .image_loading_vision_gpt import ImageLoadError, load_image, to_rgb

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# The text kwargs the processor honours. The tokenizer's others (pairs, overflow, special-token masks) have no meaning
# for the `<start> prompt caption <end>` rows the processor builds itself.
TEXT_KWARGS = ("max_length", "padding", "truncation", "pad_to_multiple_of", "padding_side", "verbose",
               "add_special_tokens", "return_offsets_mapping", "return_text_replacement_offsets")
# Where an image goes in `text`, as in LLaVA and PaliGemma: the processor writes `num_image_tokens` image tokens there.
IMAGE_TOKEN = "<image>"


def text_model_source(text_model) -> tuple[str, dict]:
    """`(name or folder, extra from_pretrained kwargs)` for a text model: a Hub id or folder as it is, a local `.gguf`
    file as its folder and `gguf_file=` (transformers loads GGUF that way, tokenizer included)."""
    text_model = str(text_model)
    if not text_model.lower().endswith(".gguf"):
        return text_model, {}
    if not os.path.isfile(text_model):
        raise FileNotFoundError(f"GGUF file '{text_model}' does not exist.")
    folder, name = os.path.split(os.path.abspath(text_model))
    return folder, {"gguf_file": name}


class VisionGPTProcessorKwargs(ProcessingKwargs, total=False):
    # `_defaults` rather than 5.24's class-variable spelling: every supported release (from 5.12.1) reads `_defaults`.
    _defaults = {
        # A caption row is cut to 64 tokens, start and end included, and padded to the longest row in the batch.
        "text_kwargs": {"max_length": 64, "padding": "longest", "truncation": True},
        "common_kwargs": {"return_tensors": "pt"},
    }


class VisionGPTProcessor(ProcessorMixin):
    r"""
    Prepares inputs for [`VisionGPTForConditionalGeneration`]: loads and converts images (paths, PIL, numpy, tensors)
    with `load_image`, resizes and normalises them with the vision tower's image processor, and tokenizes text with the
    decoder's tokenizer, as transformers' vision-language processors do (PaliGemma's conventions):

    - `processor(images=..., text="a photo of")`: prompts for `generate`, `<start> text`, left-padded, no labels. An
      image placeholder `"<image>"` in the text becomes `num_image_tokens` image tokens (`image_token_id`), and the
      start token follows the last of them; text without one gets the image in front from the model.
    - `processor(images=..., suffix="a dog runs")`: training rows `<start> caption <end>` with `labels` (the start
      token, a `text=` prompt before the caption, image tokens and padding are `-100`), right-padded. GPT-2 has no pad
      token, so padding reuses `<|endoftext|>` and is marked by the mask, never by its id.
    - `processor.apply_chat_template(messages)`: chat messages with an image, for instruct decoders, through the
      processor's chat template or else the tokenizer's own.

    Options follow transformers' processors: tokenizer options (`max_length`, default 64, the longest caption, start
    and end tokens included; `padding`, default `"longest"`; `truncation`; `pad_to_multiple_of`; `padding_side`;
    `add_special_tokens`) and image processor options (e.g. `do_resize`, `size`) are passed flat or as
    `text_kwargs={...}` / `images_kwargs={...}`; defaults come from `VisionGPTProcessorKwargs`, then from the
    tokenizer's init kwargs.

    Args:
        image_processor: the vision tower's image processor.
        tokenizer: the decoder's tokenizer.
        num_image_tokens (`int`, *optional*): how many image tokens an `"<image>"` placeholder stands for, the length
            of the model's visual prefix (`config.num_prefix_tokens`; `None` for cross-attention models, which read
            the image outside the text). `use_image_tokens_of(config)` sets it and `image_token_id`.
        image_token_id (`int`, *optional*): the model's `config.image_token_id`, given with `num_image_tokens`.
        chat_template (`str`, *optional*): a Jinja chat template for messages whose content lists images and text;
            without one, `apply_chat_template` uses the tokenizer's.
        own_chat_template (`bool`, *optional*): whether `chat_template` is such a template of the processor's own,
            kept in `processor_config.json` because a reloaded processor reads the tokenizer's template from the same
            `chat_template.jinja`; by default, a template that differs from the tokenizer's.

    Example:

    ```python
    >>> processor = VisionGPTProcessor.from_pretrained("user/vision-gpt-flickr8k")
    >>> batch = processor(images=["dog.jpg", "cat.png"], suffix=["a dog runs", "a cat sleeps"])
    >>> sorted(batch.keys())
    ['attention_mask', 'input_ids', 'labels', 'pixel_values']
    >>> batch = processor(images="dog.jpg", suffix="a dog runs",
    ...                   text_kwargs={"padding": "max_length", "max_length": 16})
    >>> batch["input_ids"].shape
    torch.Size([1, 16])
    >>> model.generate(**processor(images="dog.jpg", text="a photo of"))
    ```"""

    # Set here rather than by registration, so that every save writes the remote code next to the processor files.
    _auto_class = "AutoProcessor"
    valid_processor_kwargs = VisionGPTProcessorKwargs
    image_token = IMAGE_TOKEN

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, image_token_id=None,
                 chat_template=None, own_chat_template=None, **kwargs):
        if "max_length" in kwargs:
            raise TypeError(
                "VisionGPTProcessor takes `max_length` when called, not when built: `processor(..., max_length=32)` "
                "or `text_kwargs={'max_length': 32}`."
            )
        if (num_image_tokens is None) != (image_token_id is None):
            raise ValueError(
                f"Give `num_image_tokens` and `image_token_id` together (got {num_image_tokens} and "
                f"{image_token_id}): call `processor.use_image_tokens_of(model.config)`."
            )
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.own_chat_template = own_chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if self.tokenizer.pad_token is None:
            # GPT-2 has no pad token; padding reuses eos and labels/attention masks say what is padding.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self._auto_class is not None:
            # save_pretrained writes `auto_map` into the processor (pointing AutoProcessor at this file) and
            # from_pretrained drops it on load; holding it from the start makes built, saved and reloaded processors
            # equal. The value is the one transformers' `custom_object_save` writes.
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.auto_map = {self._auto_class: f"{module}.{type(self).__name__}"}

    @classmethod
    def from_vision_text_pretrained(cls, vision_model: str, text_model: str, **kwargs) -> "VisionGPTProcessor":
        """The processor for a model assembled by `from_vision_text_pretrained` from the same two checkpoints."""
        image_processor = load_image_processor(vision_model)
        text_source, text_kwargs = text_model_source(text_model)
        tokenizer = AutoTokenizer.from_pretrained(text_source, **text_kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    @staticmethod
    def default_image_processor(vision_config):
        """An image processor for a vision config with no processor of its own: resize to the tower's size, ImageNet
        mean/std (as torchvision's ViT-B/16 and the seed model card use)."""
        size = vision_config.image_size
        # The PIL backend: transformers' default ViT backend needs torchvision, which has no CPU wheel here.
        return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)

    def use_image_tokens_of(self, config) -> None:
        """Expand `"<image>"` placeholders as the model with this `VisionGPTConfig` reads them (none for
        cross-attention, whose image is not in the text)."""
        if config.num_prefix_tokens:
            self.num_image_tokens, self.image_token_id = config.num_prefix_tokens, config.image_token_id
        else:
            self.num_image_tokens = self.image_token_id = None

    @property
    def start_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """Longest caption in tokens, start and end included, when a call gives no `max_length` (default 64)."""
        return self._route_kwargs({})["text_kwargs"]["max_length"]

    def __call__(
        self,
        images: ImageInput | list[list] | None = None,
        text: str | list[str] | None = None,
        suffix: str | list[str] | None = None,
        prompt: str | list[str] | None = None,
        **kwargs: Unpack[VisionGPTProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Args:
            images: one image or a list (PIL, path, numpy array, tensor), one per text; or a list of lists, `[]` for a
                text without an image (its text then marks each image's place with `"<image>"`).
            text: prompts, the text that captions continue: `input_ids` and `attention_mask` for `generate`,
                left-padded, no labels, never truncated. `"<image>"` marks where the image goes.
            suffix: target caption(s) for training, after the prompt if `text` is given too: adds `labels` (on the
                caption and its end token only), right-padded.
            prompt: the former name of `text`, still accepted.
            kwargs: tokenizer options (`max_length`: longest caption in tokens, start and end included, longer ones
                are truncated, default 64; `padding`, default `"longest"`; `truncation`; `pad_to_multiple_of`;
                `padding_side`; `add_special_tokens`, default `True`: the start token (a caption always ends with
                the end token); `return_offsets_mapping`: each prompt token's character span in its text, `(0, 0)`
                for image, start and padding tokens), image processor options, and `return_tensors` (default
                `"pt"`), flat or in `text_kwargs`, `images_kwargs` or `common_kwargs`.
        """
        for name in ("videos", "audio"):  # transformers' apply_chat_template passes them, as None here
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"VisionGPT reads images and text, not {name}; got `{name}`.")
        if prompt is not None:
            if text is not None:
                raise ValueError("`prompt` is the former name of `text`, the text captions continue: pass one of them.")
            text = prompt
        if images is None and text is None and suffix is None:
            raise ValueError("The processor needs `images`, `text` or `suffix`.")
        routed = self._route_kwargs(kwargs)
        text_kwargs, images_kwargs = routed["text_kwargs"], routed["images_kwargs"]
        # Every check on the inputs' shapes comes before the images are read.
        images_per_text = self._images_per_text(images) if images is not None else None
        prompts, captions = _as_text_list(text, "text"), _as_text_list(suffix, "suffix")
        if images_per_text is not None and not all(images_per_text) and text is None:
            raise ValueError("`images` holds an empty list, which marks a text without an image: pass the `text`.")
        if text is not None or suffix is not None:
            num_texts = len(prompts if prompts is not None else captions)
            if prompts is not None and captions is not None and len(captions) != num_texts:
                raise ValueError(f"Got {num_texts} texts but {len(captions)} suffixes; pass one suffix per text.")
            if images_per_text is not None and len(images_per_text) != num_texts:
                kind = "texts" if prompts is not None else "captions"
                count = sum(len(row) for row in images_per_text)
                given = f"{len(images_per_text)} image lists ({count} images)" if count < len(images_per_text) else (
                    f"{count} images")
                raise ValueError(f"Got {given} but {num_texts} {kind}; pass one per image.")
            self._check_image_placeholders(prompts, images_per_text)
        data = {}
        return_tensors = images_kwargs.get("return_tensors")
        if images_per_text is not None:
            rgb = [load_image(image) for row in images_per_text for image in row]
            data.update(self.image_processor(images=rgb, **images_kwargs))
        if text is not None or suffix is not None:
            return_tensors = text_kwargs.get("return_tensors")
            options = {key: text_kwargs[key] for key in TEXT_KWARGS if key in text_kwargs}
            data.update(self._encode(prompts, captions, **options))
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _images_per_text(images) -> list[list]:
        """`images` as one list per text: a flat list gives one image each, a nested one says which text has which."""
        if not isinstance(images, (list, tuple)):
            return [[images]]
        if len(images) == 0:
            raise ValueError("`images` is an empty list.")
        if not any(isinstance(item, (list, tuple)) for item in images):
            return [[image] for image in images]
        rows = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        for index, row in enumerate(rows):
            if len(row) > 1:
                raise ValueError(f"`images[{index}]` holds {len(row)} images; VisionGPT reads one image per text.")
        if not any(rows):
            raise ValueError("`images` holds only empty lists; pass `images=None` for text alone.")
        return rows

    def _route_kwargs(self, kwargs: dict) -> dict[str, dict]:
        """
        `text_kwargs` and `images_kwargs` for one call, in the precedence transformers' processors document (lowest
        first): `VisionGPTProcessorKwargs._defaults`, the tokenizer's init kwargs, `common_kwargs`, the call's own
        (flat or in `text_kwargs`/`images_kwargs`; the same key both ways is an error).
        """
        kwargs = dict(kwargs)
        annotations = self.valid_processor_kwargs.__annotations__
        valid = self._valid_kwargs()
        defaults = self.valid_processor_kwargs._defaults
        routed = {modality: dict(defaults.get(modality, {})) for modality in valid}
        for modality, keys in valid.items():
            # Not `padding_side`: right for captions and left for prompts is what `suffix` and `text` mean, and many
            # tokenizers are saved with the side their generation needs.
            for key in keys & set(self.tokenizer.init_kwargs) - {"padding_side"}:
                routed[modality][key] = self.tokenizer.init_kwargs[key]
        common = {**defaults.get("common_kwargs", {}), **kwargs.pop("common_kwargs", {})}
        for modality in routed:
            routed[modality].update(common)

        # Video and audio options (which transformers' apply_chat_template may pass) have nothing to act on here.
        unread = set()
        for modality in ("videos_kwargs", "audio_kwargs"):
            kwargs.pop(modality, None)
            unread |= set(getattr(annotations.get(modality), "__annotations__", {}))
        unread -= valid["text_kwargs"] | valid["images_kwargs"]

        given_text = set()
        for modality in valid:
            for key, value in kwargs.pop(modality, {}).items():
                if key in kwargs and key in valid[modality]:
                    raise ValueError(
                        f"Keyword argument {key} was passed two times: in `{modality}` and as a keyword argument; "
                        "pass it once."
                    )
                routed[modality][key] = value
                if modality == "text_kwargs":
                    given_text.add(key)
        for key, value in kwargs.items():
            modalities = [modality for modality in valid if key in valid[modality]]
            if not modalities and key in unread:
                continue
            if not modalities:
                raise TypeError(
                    f"VisionGPTProcessor got an unexpected keyword argument `{key}`. It takes `images`, `text` and "
                    "`suffix`, tokenizer options and image processor options (flat or in `text_kwargs` / "
                    "`images_kwargs`), and `return_tensors`."
                )
            for modality in modalities:
                routed[modality][key] = value
            if modalities == ["text_kwargs"]:
                given_text.add(key)
        unsupported = sorted(given_text - set(TEXT_KWARGS) - {"return_tensors"})
        if unsupported:
            raise ValueError(
                f"VisionGPTProcessor builds caption tokens itself and does not take the tokenizer options {unsupported}"
                f"; it takes {', '.join(TEXT_KWARGS)} and return_tensors."
            )
        return routed

    def _valid_kwargs(self) -> dict[str, set[str]]:
        """The option names `text_kwargs` and `images_kwargs` take."""
        annotations = self.valid_processor_kwargs.__annotations__
        # Image processors may accept more than the generic ImagesKwargs; they list theirs in `valid_kwargs`.
        image_processor_kwargs = getattr(getattr(self.image_processor, "valid_kwargs", None), "__annotations__", {})
        return {
            "text_kwargs": set(annotations["text_kwargs"].__annotations__),
            "images_kwargs": set(annotations["images_kwargs"].__annotations__) | set(image_processor_kwargs),
        }

    def encode_captions(self, captions: list[str], is_prompt: bool = False, **kwargs: Unpack[TextKwargs]) -> dict:
        """
        Token lists (not tensors) for `captions`: training rows `<start> caption <end>` with labels, or, with
        `is_prompt`, left-padded `<start> prompt` rows. Takes the text options of `__call__`; a missing or `None` one
        takes the processor's default.
        """
        unsupported = sorted(set(kwargs) - set(TEXT_KWARGS))
        if unsupported:
            raise ValueError(f"`encode_captions` takes {', '.join(TEXT_KWARGS)}; got {unsupported}.")
        defaults = self._route_kwargs({})["text_kwargs"]
        options = {key: defaults[key] for key in TEXT_KWARGS if key in defaults}
        options.update({key: value for key, value in kwargs.items() if value is not None})
        if is_prompt:
            self._check_image_placeholders(captions, None)
            return self._encode(captions, None, **options)
        return self._encode(None, captions, **options)

    def _encode(self, prompts, captions, **options) -> dict:
        """Token lists for prompts (`text`), captions (`suffix`) or a prompt then a caption per row, with the text
        options of one call (the processor's defaults included), its inputs checked."""
        max_length = options.pop("max_length")
        truncation = options.pop("truncation", False) not in (False, "do_not_truncate")
        add_special_tokens = options.pop("add_special_tokens", True)
        return_offsets = options.pop("return_offsets_mapping", False)
        # The offsets index the text as given, "<image>" included, so no replacement offsets are needed to map them.
        options.pop("return_text_replacement_offsets", None)
        options.setdefault("padding_side", "left" if captions is None else "right")
        num_texts = len(prompts if prompts is not None else captions)
        if return_offsets and (captions is not None or prompts is None):
            raise ValueError("`return_offsets_mapping` maps prompt (`text`) tokens to characters; no `suffix`.")

        if captions is not None:  # one tokenizer call for the batch: the collator encodes every training batch here
            caption_ids = self.tokenizer([text.strip() for text in captions], add_special_tokens=False)["input_ids"]
        rows, targets, offsets = [], [], []
        for index in range(num_texts):
            row, row_offsets = self._prompt_ids(prompts[index], add_special_tokens) if prompts is not None else ([], [])
            if prompts is None and add_special_tokens:
                row = [self.start_token_id]
            if captions is None:
                rows.append(row)
                offsets.append(row_offsets)
                continue
            caption = caption_ids[index]
            if truncation:
                budget = max_length - 1 - int(add_special_tokens)  # room for the start and end tokens
                if budget < 0:
                    raise ValueError(f"`max_length` must leave room for the start and end tokens, got {max_length}.")
                caption = caption[:budget]
            caption = caption + [self.tokenizer.eos_token_id]
            rows.append(row + caption)
            targets.append([-100] * len(row) + caption)
        for index, row in enumerate(rows):
            if not row:
                raise ValueError(f"Text {index} is empty and has no start token (`add_special_tokens=False`).")
        padding = options.get("padding")
        # `max_length` is the length to pad to only with padding="max_length" (the tokenizer warns otherwise).
        if getattr(padding, "value", padding) == "max_length":
            options["max_length"] = max_length
            for index, row in enumerate(rows):
                if len(row) > max_length:
                    raise ValueError(
                        f"Text {index} is {len(row)} tokens long (image tokens and prompt included; only captions are "
                        f"truncated), more than the max_length={max_length} that padding='max_length' pads to: raise "
                        "`max_length`, or pad to the longest row."
                    )
        padded = self.tokenizer.pad({"input_ids": rows}, return_attention_mask=True, **options)
        data = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        if captions is None and options["padding_side"] == "left" and self.image_token_id is not None:
            self._put_leading_images_first(data)
        if captions is not None:
            # Padding is ignored by the mask, not by its id (whichever side it is on).
            labels = []
            for target, mask in zip(targets, data["attention_mask"]):
                target = iter(target)
                labels.append([next(target) if m else -100 for m in mask])
            data["labels"] = labels
        if return_offsets:
            # Padding, image tokens and the start token cover no characters: (0, 0), as a tokenizer's added tokens.
            data["offset_mapping"] = []
            for row_offsets, mask in zip(offsets, data["attention_mask"]):
                row_offsets = iter(row_offsets)
                data["offset_mapping"].append([next(row_offsets) if m else (0, 0) for m in mask])
        return data

    def _put_leading_images_first(self, data: dict) -> None:
        """
        A left-padded prompt that starts with its image keeps the image tokens first and the padding after them:
        `[img]*K [pad]... <start> text`, the layout the model gives prompts without placeholders, in which `generate`
        runs the visual prefix once per image and shares its cache among the image's beams.
        """
        size = self.num_image_tokens
        for index, (row, mask) in enumerate(zip(data["input_ids"], data["attention_mask"])):
            padding = mask.index(1) if 1 in mask else 0
            if padding and row[padding:padding + size] == [self.image_token_id] * size:
                order = [*range(padding, padding + size), *range(padding), *range(padding + size, len(row))]
                data["input_ids"][index] = [row[k] for k in order]
                data["attention_mask"][index] = [mask[k] for k in order]

    def _check_image_placeholders(self, prompts, images_per_text) -> None:
        counts = [prompt.count(IMAGE_TOKEN) for prompt in prompts] if prompts is not None else []
        if any(counts):
            if self.num_image_tokens is None:
                raise ValueError(
                    f"`text` holds the image placeholder '{IMAGE_TOKEN}', but this processor does not know how many "
                    "image tokens it stands for: it was saved without `num_image_tokens`, or its model reads the image "
                    "through cross-attention, outside the text. Leave the placeholder out (the model puts the image "
                    "first), or call `processor.use_image_tokens_of(model.config)`."
                )
            for index, count in enumerate(counts):
                expected = len(images_per_text[index]) if images_per_text is not None else 0
                if count != expected:
                    raise ValueError(
                        f"Text {index} holds {count} image placeholders ('{IMAGE_TOKEN}') but has {expected} images: "
                        "with placeholders, each text needs one per image (VisionGPT reads one image per text)."
                    )
        elif images_per_text is not None and not all(images_per_text):
            without = [index for index, row in enumerate(images_per_text) if not row]
            raise ValueError(
                f"Texts {without} have no image: mark each image's place with '{IMAGE_TOKEN}' in the texts that have "
                "one."
            )

    def _prompt_ids(self, prompt: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """
        A prompt's ids and each one's character span in `prompt`: each `"<image>"` as `num_image_tokens` image tokens,
        then (with `add_special_tokens`) the start token after the last image token, or first (PaliGemma's rule). A
        plain prompt's pieces are stripped, as captions are in training; with `add_special_tokens=False` (chat
        templates) the text is kept as it is.
        """
        ids, offsets, cursor = [], [], 0
        for index, piece in enumerate(prompt.split(IMAGE_TOKEN)):
            if index:
                ids += [self.image_token_id] * self.num_image_tokens
                offsets += [(0, 0)] * self.num_image_tokens
                cursor += len(IMAGE_TOKEN)
            start = cursor + (len(piece) - len(piece.lstrip()) if add_special_tokens else 0)
            cursor += len(piece)
            piece = piece.strip() if add_special_tokens else piece
            if piece:
                encoded = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                ids += encoded["input_ids"]
                offsets += [(start + begin, start + end) for begin, end in encoded["offset_mapping"]]
        if add_special_tokens:
            after_image = max((k + 1 for k, token in enumerate(ids) if token == self.image_token_id), default=0)
            ids.insert(after_image, self.start_token_id)
            offsets.insert(after_image, (0, 0))
        return ids, offsets

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """
        Chat messages to a prompt, as transformers' processors do: with `chat_template` or a processor template of
        its own, transformers' `ProcessorMixin.apply_chat_template`; otherwise the decoder tokenizer's template (e.g.
        SmolLM2-Instruct's ChatML), with each `{"type": "image"}` item written as `"<image>"`. Either way the text is
        kept as the template renders it, no start token added (`add_special_tokens=False`). Takes transformers'
        arguments (`tokenize`, `return_dict`, `return_tensors`, `add_generation_prompt`, `continue_final_message`,
        `processor_kwargs`; other keywords go to the template, or to the processor where they are its options).
        """
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        # Processor options given flat go with processor_kwargs (transformers 5.12 would replace those by them).
        for key in [key for key in kwargs if key in self._known_call_kwargs()]:
            processor_kwargs[key] = kwargs.pop(key)
        # A chat template writes the special tokens it wants, so no start token is added (as a tokenizer's
        # apply_chat_template adds none).
        processor_kwargs.setdefault("add_special_tokens", False)
        if chat_template is not None or self.has_own_chat_template():
            return super().apply_chat_template(conversation, chat_template=chat_template,
                                               processor_kwargs=processor_kwargs, **kwargs)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                "Neither this processor nor its tokenizer has a chat template (GPT-2 is not a chat model): pass "
                "prompts as `text=`, or a template as `chat_template=`."
            )
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError(
                "`return_assistant_tokens_mask` needs a chat template with `{% generation %}` blocks as the "
                "processor's `chat_template` (or `chat_template=`); the tokenizer's own template has none here."
            )
        tokenize = kwargs.pop("tokenize", False)
        return_dict = kwargs.pop("return_dict", False)
        return_tensors = kwargs.pop("return_tensors", None)
        batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        conversations = [getattr(chat, "messages", chat) for chat in (conversation if batched else [conversation])]
        prompts, images = [], []
        for chat in conversations:
            messages, chat_images = _messages_with_placeholders(chat)
            prompts.append(self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs))
            images.append(chat_images)
        if not tokenize:
            return prompts if batched else prompts[0]
        if any(images) and self.num_image_tokens is None:
            raise ValueError(
                "The messages hold images, but this processor does not know the model's image tokens (it was saved "
                "before it did, or its model reads images through cross-attention): call "
                "`processor.use_image_tokens_of(model.config)`."
            )
        if return_tensors is not None:
            processor_kwargs["return_tensors"] = return_tensors
        out = self(text=prompts, images=images if any(images) else None, **processor_kwargs)
        return out if return_dict else out["input_ids"]

    def _known_call_kwargs(self) -> set[str]:
        """The processor options `apply_chat_template` may be given flat (not `return_tensors`, which it takes)."""
        valid = self._valid_kwargs()
        keys = set(TEXT_KWARGS) | valid["images_kwargs"] | {"text_kwargs", "images_kwargs", "common_kwargs"}
        return keys - {"return_tensors"}

    def has_own_chat_template(self) -> bool:
        """Whether `chat_template` is the processor's own (for messages that list images), not the tokenizer's."""
        if self.chat_template is None:
            return False
        return bool(self.own_chat_template) or self.chat_template != getattr(self.tokenizer, "chat_template", None)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["own_chat_template"] = self.has_own_chat_template()
        return output

    def _without_image_tokens(self, sequences):
        """Ids as lists, image tokens dropped (they are placeholders, not text, and outside the tokenizer)."""
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        if isinstance(sequences, int) or not sequences:
            return sequences  # an int: one token id
        sequences = list(sequences)
        if not _is_sequence(sequences[0]):
            return [token for token in sequences if token != self.image_token_id]
        rows = [row.tolist() if hasattr(row, "tolist") else list(row) for row in sequences]
        return [[token for token in row if token != self.image_token_id] for row in rows]

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        """Generated ids to clean captions: image tokens and special tokens dropped, whitespace stripped."""
        kwargs.setdefault("skip_special_tokens", True)
        decoded = self.tokenizer.batch_decode(self._without_image_tokens(sequences), **kwargs)
        return [caption.strip() for caption in decoded]

    def decode(self, sequence, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(self._without_image_tokens(sequence), **kwargs).strip()

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """The `image-text-to-text` pipeline's decoding: the tokenizer's, with image tokens dropped; a list of texts
        for `(batch_size, sequence_length)` ids, one text for `(sequence_length,)`."""
        ids = self._without_image_tokens(generated_outputs)
        decode = self.tokenizer.batch_decode if ids and _is_sequence(ids[0]) else self.tokenizer.decode
        return decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        # What `processor(images=..., text=...)` returns; training batches (`suffix=`) add `labels`.
        return ["pixel_values", "input_ids", "attention_mask"]


def _is_sequence(item) -> bool:
    return isinstance(item, (list, tuple)) or getattr(item, "ndim", 0) > 0


def _as_text_list(text, name: str) -> list[str] | None:
    if text is None:
        return None
    texts = [text] if isinstance(text, str) else list(text)
    for item in texts:
        if not isinstance(item, str):
            raise ValueError(f"`{name}` must hold strings, got {type(item).__name__}: {item!r}.")
    return texts


def _image_source(item: dict):
    """What an image item of a chat message points at: `image`, `url`, `path`, `base64`, or OpenAI's `image_url`."""
    if item.get("type") == "image_url":
        url = item.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    if item.get("base64") is not None:
        import base64
        from io import BytesIO

        data = item["base64"].split(",", 1)[-1]  # a data URL or bare base64
        try:
            return Image.open(BytesIO(base64.b64decode(data)))
        except (ValueError, UnidentifiedImageError) as error:
            raise ImageLoadError(f"An image item's `base64` is not a readable image: {error}.") from None
    source = next((item[key] for key in ("image", "url", "path") if item.get(key) is not None), None)
    if source is None:
        raise ValueError(f"An image item needs `image`, `url`, `path` or `base64`; got {item!r}.")
    return source


def _messages_with_placeholders(messages) -> tuple[list[dict], list]:
    """Chat messages with text-only content for a tokenizer's template: each image item becomes `"<image>"` (text
    items are joined as transformers' templates join them, with nothing between) and its image is returned
    alongside."""
    flat, images = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            for item in content:
                kind = item.get("type")
                if kind == "text":
                    parts.append(item["text"])
                elif kind in ("image", "image_url"):
                    images.append(_image_source(item))
                    parts.append(IMAGE_TOKEN)
                else:
                    raise ValueError(f"VisionGPT's chat messages hold text and images, not {kind!r} items.")
            content = "".join(parts)
        flat.append({**message, "content": content})
    return flat, images


__all__ = [
    "IMAGE_TOKEN", "ImageLoadError", "VisionGPTProcessor", "VisionGPTProcessorKwargs", "load_image",
    "text_model_source", "to_rgb",
]
