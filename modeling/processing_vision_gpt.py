"""VisionGPT processor: images to `pixel_values`, captions to GPT-2 tokens and labels, generated ids to clean text."""

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from transformers import AutoTokenizer, BatchFeature, ViTImageProcessorPil
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack

from .compat_vision_gpt import load_image_processor

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# The text kwargs that caption encoding honours. The tokenizer's others (pairs, offsets, overflow, special tokens)
# have no meaning for the `<|endoftext|> caption <|endoftext|>` rows the processor builds itself.
CAPTION_TEXT_KWARGS = ("max_length", "padding", "truncation", "pad_to_multiple_of", "padding_side", "verbose")


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


class ImageLoadError(ValueError):
    """An input that is not a readable image. The message names the input and the reason."""


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"'{os.fspath(image)}'"
    return f"{type(image).__name__} input"


def _open_image_file(path) -> Image.Image:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(f"Image file '{path}' does not exist.")
    if os.path.isdir(path):
        raise ImageLoadError(f"'{path}' is a directory, not an image file.")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(f"Image file '{path}' is empty (0 bytes).")
    try:
        image = Image.open(path)
        # Decode now, inside the guard, so truncated files fail here rather than later in resizing.
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"Image file '{path}' is too large to decode safely ({error}). PIL's decompression-bomb guard "
            "(PIL.Image.MAX_IMAGE_PIXELS) refused it; downscale the image first."
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"'{path}' is not an image PIL can read (unknown or corrupt format).") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"Image file '{path}' could not be decoded: {error}.") from None
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With the global flag on, PIL pads truncated files with grey instead of failing: never caption half an image.
        raise ImageLoadError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, so truncated files cannot be detected; unset it to load "
            f"'{path}'."
        )
    return image


def _array_to_image(array: np.ndarray, description: str) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise ImageLoadError(
            f"{description} has shape {tuple(array.shape)}; expected (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 "
            "channels."
        )
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError(f"{description} contains NaN or infinite values.")
        if array.min() < 0 or array.max() > 1:
            raise ImageLoadError(
                f"{description} is a float array with values in [{array.min():.3g}, {array.max():.3g}]; float "
                "images must be in [0, 1] (use uint8 for 0-255)."
            )
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    else:
        raise ImageLoadError(f"{description} has dtype {array.dtype}; use uint8, uint16 or float in [0, 1].")
    return Image.fromarray(array)


def to_rgb(image: Image.Image) -> Image.Image:
    """
    Convert any PIL image to upright RGB: EXIF orientation applied, transparency composited on white, 16-bit and
    32-bit greyscale scaled (not clipped) to 8 bits, CMYK and palette images converted.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image).astype(np.float64)
        high = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / high * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / max(high - low, 1e-12) * 255.0
        return Image.fromarray(array.round().astype(np.uint8)).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image) -> Image.Image:
    """
    Load one image as an RGB PIL image from a PIL image, a file path, a numpy array or a torch tensor
    (`(H, W[, C])` or `(C, H, W)`, uint8, uint16 or float in [0, 1]). Raises `ImageLoadError` (a `ValueError`) naming
    the input when it is missing, empty, truncated, not an image, or too large for PIL's decompression-bomb guard.
    """
    description = _describe(image)
    if isinstance(image, (str, Path)) and str(image).startswith(("http://", "https://")):
        from transformers.image_utils import load_image as load_url

        try:
            image = load_url(str(image))
        except Exception as error:  # network errors come in many types; the URL and reason are what matter
            raise ImageLoadError(f"Could not fetch image {description}: {error}") from None
    elif isinstance(image, (str, os.PathLike)):
        image = _open_image_file(image)
    elif type(image).__module__.startswith("torch"):
        image = _array_to_image(image.detach().cpu().numpy(), description)
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image, description)
    elif not isinstance(image, Image.Image):
        raise ImageLoadError(
            f"Cannot read an image from {description}; pass a PIL image, a file path, a numpy array or a tensor."
        )
    try:
        return to_rgb(image)
    except (OSError, ValueError) as error:
        raise ImageLoadError(f"Image {description} could not be converted to RGB: {error}.") from None


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
    with `load_image`, resizes and normalises them with the vision tower's image processor, and tokenizes captions
    with GPT-2's tokenizer as `<|endoftext|> caption <|endoftext|>`.

    `processor(images=..., text=...)` returns `pixel_values`, `input_ids`, `attention_mask` and `labels` (padding and
    the start token are `-100`; GPT-2 has no pad token, so padding reuses `<|endoftext|>` and is marked by the mask,
    never by its id). `processor(images=..., prompt=...)` prepares a left-padded prompt for `generate`.

    Options follow transformers' processors: tokenizer options (`max_length`, default 64, start and end tokens
    included; `padding`, default `"longest"`; `truncation`; `pad_to_multiple_of`; `padding_side`) and image processor
    options (e.g. `do_resize`, `size`) are passed flat or as `text_kwargs={...}` / `images_kwargs={...}`; defaults come
    from `VisionGPTProcessorKwargs`, then from the tokenizer's init kwargs.

    Example:

    ```python
    >>> processor = VisionGPTProcessor.from_pretrained("user/vision-gpt-flickr8k")
    >>> batch = processor(images=["dog.jpg", "cat.png"], text=["a dog runs", "a cat sleeps"])
    >>> sorted(batch.keys())
    ['attention_mask', 'input_ids', 'labels', 'pixel_values']
    >>> batch = processor(images="dog.jpg", text="a dog runs", text_kwargs={"padding": "max_length", "max_length": 16})
    >>> batch["input_ids"].shape
    torch.Size([1, 16])
    ```"""

    # Set here rather than by registration, so that every save writes the remote code next to the processor files.
    _auto_class = "AutoProcessor"
    valid_processor_kwargs = VisionGPTProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        if "max_length" in kwargs:
            raise TypeError(
                "VisionGPTProcessor takes `max_length` when called, not when built: `processor(..., max_length=32)` "
                "or `text_kwargs={'max_length': 32}`."
            )
        super().__init__(image_processor, tokenizer, **kwargs)
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

    @property
    def start_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """Longest caption in tokens, start and end included, when a call gives no `max_length` (default 64)."""
        return self._route_kwargs({})["text_kwargs"]["max_length"]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        prompt: str | list[str] | None = None,
        **kwargs: Unpack[VisionGPTProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Args:
            images: one image or a list (PIL, path, numpy array, tensor).
            text: target caption(s) for training: gives `input_ids`, `attention_mask` and `labels`, right-padded.
            prompt: text the caption should start with, for `generate`: left-padded, no end token, no labels, never
                truncated.
            kwargs: tokenizer options (`max_length`: longest caption in tokens, start and end included, longer ones
                are truncated, default 64; `padding`, default `"longest"`; `truncation`; `pad_to_multiple_of`;
                `padding_side`), image processor options, and `return_tensors` (default `"pt"`), flat or in
                `text_kwargs`, `images_kwargs` or `common_kwargs`.
        """
        if text is not None and prompt is not None:
            raise ValueError("Pass either `text` (training captions) or `prompt` (generation prompts), not both.")
        if images is None and text is None and prompt is None:
            raise ValueError("The processor needs `images`, `text` or `prompt`.")
        routed = self._route_kwargs(kwargs)
        text_kwargs, images_kwargs = routed["text_kwargs"], routed["images_kwargs"]
        data = {}
        num_images = None
        if images is not None:
            image_list = images if isinstance(images, (list, tuple)) else [images]
            if len(image_list) == 0:
                raise ValueError("`images` is an empty list.")
            rgb = [load_image(image) for image in image_list]
            data.update(self.image_processor(images=rgb, **images_kwargs))
            num_images = len(rgb)
        return_tensors = images_kwargs.get("return_tensors")
        if text is not None or prompt is not None:
            captions = text if text is not None else prompt
            captions = [captions] if isinstance(captions, str) else list(captions)
            for caption in captions:
                if not isinstance(caption, str):
                    raise ValueError(f"Captions must be strings, got {type(caption).__name__}: {caption!r}.")
            if num_images is not None and len(captions) != num_images:
                raise ValueError(f"Got {num_images} images but {len(captions)} captions; pass one caption per image.")
            return_tensors = text_kwargs.get("return_tensors")
            caption_kwargs = {key: text_kwargs[key] for key in CAPTION_TEXT_KWARGS if key in text_kwargs}
            data.update(self.encode_captions(captions, is_prompt=prompt is not None, **caption_kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _route_kwargs(self, kwargs: dict) -> dict[str, dict]:
        """
        `text_kwargs` and `images_kwargs` for one call, in the precedence transformers' processors document (lowest
        first): `VisionGPTProcessorKwargs._defaults`, the tokenizer's init kwargs, `common_kwargs`, the call's own
        (flat or in `text_kwargs`/`images_kwargs`; the same key both ways is an error).
        """
        kwargs = dict(kwargs)
        annotations = self.valid_processor_kwargs.__annotations__
        # Image processors may accept more than the generic ImagesKwargs; they list theirs in `valid_kwargs`.
        image_processor_kwargs = getattr(getattr(self.image_processor, "valid_kwargs", None), "__annotations__", {})
        valid = {
            "text_kwargs": set(annotations["text_kwargs"].__annotations__),
            "images_kwargs": set(annotations["images_kwargs"].__annotations__) | set(image_processor_kwargs),
        }
        defaults = self.valid_processor_kwargs._defaults
        routed = {modality: dict(defaults.get(modality, {})) for modality in valid}
        for modality, keys in valid.items():
            # Not `padding_side`: right for captions and left for prompts is what `text` and `prompt` mean, and many
            # tokenizers are saved with the side their generation needs.
            for key in keys & set(self.tokenizer.init_kwargs) - {"padding_side"}:
                routed[modality][key] = self.tokenizer.init_kwargs[key]
        common = {**defaults.get("common_kwargs", {}), **kwargs.pop("common_kwargs", {})}
        for modality in routed:
            routed[modality].update(common)

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
            if not modalities:
                raise TypeError(
                    f"VisionGPTProcessor got an unexpected keyword argument `{key}`. It takes `images`, `text` or "
                    "`prompt`, tokenizer options and image processor options (flat or in `text_kwargs` / "
                    "`images_kwargs`), and `return_tensors`."
                )
            for modality in modalities:
                routed[modality][key] = value
            if modalities == ["text_kwargs"]:
                given_text.add(key)
        unsupported = sorted(given_text - set(CAPTION_TEXT_KWARGS) - {"return_tensors"})
        if unsupported:
            raise ValueError(
                f"VisionGPTProcessor builds caption tokens itself and does not take the tokenizer options {unsupported}"
                f"; it takes {', '.join(CAPTION_TEXT_KWARGS)} and return_tensors."
            )
        return routed

    def encode_captions(self, captions: list[str], is_prompt: bool = False, **kwargs: Unpack[TextKwargs]) -> dict:
        """
        Token lists (not tensors) for `captions`: training targets `<|endoftext|> caption <|endoftext|>` with labels,
        or, with `is_prompt`, left-padded `<|endoftext|> prompt` rows. Takes the caption options of `__call__`
        (`max_length`, `padding`, `truncation`, `pad_to_multiple_of`, `padding_side`); a missing or `None` one takes
        the processor's default.
        """
        unsupported = sorted(set(kwargs) - set(CAPTION_TEXT_KWARGS))
        if unsupported:
            raise ValueError(f"`encode_captions` takes {', '.join(CAPTION_TEXT_KWARGS)}; got {unsupported}.")
        defaults = self._route_kwargs({})["text_kwargs"]
        options = {key: defaults[key] for key in CAPTION_TEXT_KWARGS if key in defaults}
        options.update({key: value for key, value in kwargs.items() if value is not None})
        max_length = options.pop("max_length")
        truncation = options.pop("truncation", False)
        options.setdefault("padding_side", "left" if is_prompt else "right")

        start, end = self.start_token_id, self.tokenizer.eos_token_id
        ids = self.tokenizer([c.strip() for c in captions], add_special_tokens=False)["input_ids"]
        if is_prompt:
            rows = [[start] + row for row in ids]
        elif truncation not in (False, "do_not_truncate"):
            if max_length < 2:
                raise ValueError(f"`max_length` must leave room for the start and end tokens (>= 2), got {max_length}.")
            rows = [[start] + row[: max_length - 2] + [end] for row in ids]
        else:
            rows = [[start] + row + [end] for row in ids]
        padded = self.tokenizer.pad({"input_ids": rows}, max_length=max_length, return_attention_mask=True, **options)
        data = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        if not is_prompt:
            # The start token is given, never predicted; padding is ignored by the mask, not by its id (whichever side
            # it is on).
            labels = []
            for row, mask in zip(data["input_ids"], data["attention_mask"]):
                start_at = mask.index(1)
                labels.append([t if m and k != start_at else -100 for k, (t, m) in enumerate(zip(row, mask))])
            data["labels"] = labels
        return data

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        """Generated ids to clean captions: special tokens dropped, whitespace stripped."""
        kwargs.setdefault("skip_special_tokens", True)
        return [caption.strip() for caption in self.tokenizer.batch_decode(sequences, **kwargs)]

    def decode(self, sequence, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(sequence, **kwargs).strip()

    @property
    def model_input_names(self):
        # `labels` too: `processor(images=..., text=...)` returns training batches.
        return ["pixel_values", "input_ids", "attention_mask", "labels"]


__all__ = [
    "ImageLoadError", "VisionGPTProcessor", "VisionGPTProcessorKwargs", "load_image", "text_model_source", "to_rgb"
]
