"""Generation for VisionGPT, as a mixin on transformers' `GenerationMixin` that the model class inherits.

What the model owns here is what `GenerationMixin` cannot know: each image is encoded once per call, before beams are
expanded; with `fusion="prefix"` the visual prefix runs through the decoder once per image and its cache is shared by
the image's beams; with `fusion="cross_attention"` the cross-attention keys and values are computed once per image.
Everything else (greedy, beams, sampling, logits processors, stopping) is `GenerationMixin.generate`'s.
"""

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.utils import ModelOutput
from transformers.utils import logging as transformers_logging

from .compat_vision_gpt import CACHE_NAME, penalties_skip_ids_outside_vocabulary, resolve_cache_argument
from .gpt2_vision_gpt import VisionGPTCache
from .packed_linear_vision_gpt import packed_linears


@dataclass
class VisionGPTCaptionScores(ModelOutput):
    r"""
    How far to trust each caption: the output of [`VisionGPTGenerationMixin.score_captions`], and `generate`'s
    `caption_scores` with `output_caption_scores=True`. One value per caption, each of shape `(num_captions,)`.

    confidence (`torch.FloatTensor`):
        How sure the decoder was of the caption, given the image: the geometric mean of its token probabilities,
        `exp(log_prob / num_tokens)`, in (0, 1]. Normalised by length, so that long and short captions compare.
    grounding (`torch.FloatTensor`):
        How much the image raised the caption's probability, per token, in nats: the pointwise mutual information
        `(log_prob - log_prob_without_image) / num_tokens`. Near 0 for a caption the decoder would write for any
        picture; high for one that only this image explains; negative for one the image argues against.
    log_prob (`torch.FloatTensor`):
        `log p(caption | image)`: the sum of the scored tokens' log-probabilities.
    log_prob_without_image (`torch.FloatTensor`):
        `log p(caption | no image)`, "no image" being [`VisionGPTGenerationMixin.null_image_embeds`].
    num_tokens (`torch.LongTensor`):
        How many tokens were scored: the caption's and its end token, where it has one.
    """

    confidence: torch.FloatTensor | None = None
    grounding: torch.FloatTensor | None = None
    log_prob: torch.FloatTensor | None = None
    log_prob_without_image: torch.FloatTensor | None = None
    num_tokens: torch.LongTensor | None = None

    @classmethod
    def from_log_probs(cls, log_prob, log_prob_without_image, num_tokens) -> "VisionGPTCaptionScores":
        """The scores from the two passes' summed log-probabilities and the number of tokens scored, `(N,)` each."""
        count = num_tokens.to(log_prob.dtype)
        return cls(confidence=(log_prob / count).exp(), grounding=(log_prob - log_prob_without_image) / count,
                   log_prob=log_prob, log_prob_without_image=log_prob_without_image, num_tokens=num_tokens)


def generated_tokens(sequences: torch.LongTensor, prompt_length: int, eos_token_ids) -> torch.BoolTensor:
    """Which tokens of generate's `sequences` `(N, L)` are its caption's, as `(N, L - 1)` aligned with the predicted
    positions 1..L-1: those after the prompt, up to and including the first end token (what follows it is padding)."""
    eos = torch.tensor(list(eos_token_ids), dtype=sequences.dtype, device=sequences.device)
    positions = torch.arange(1, sequences.shape[1], device=sequences.device)
    new = positions >= prompt_length
    is_end = torch.isin(sequences[:, 1:], eos) & new
    after_end = (is_end.cumsum(-1) - is_end.long()) > 0
    return new & ~after_end


class VisionGPTGenerationMixin(GenerationMixin):
    """`generate` for [`VisionGPTForConditionalGeneration`]: images in, captions out, every decoding strategy of
    `GenerationMixin`. It reads the model's `_image_embeds`, `model.run_decoder` and `language_model`."""

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        use_packed_linears: bool = True,
        float32_logits: bool = True,
        output_caption_scores: bool = False,
        **kwargs,
    ):
        r"""
        Caption images. Takes `pixel_values` (or `vision_features` / `image_embeds`) and, optionally, a text prompt
        in `input_ids` (left-padded, starting with the start token); every other argument is `GenerationMixin.generate`'s
        (`num_beams`, `do_sample`, `top_p`, `num_return_sequences`, `repetition_penalty`, `generation_config`, ...).
        Each image is encoded once per call, before beams or return sequences are expanded. On x86 CPUs the linear
        layers run oneDNN with pre-packed weights and the MLPs' GELU fused in (see `packed_linear_vision_gpt.py`;
        `use_packed_linears=False` runs the plain layers). On that packed path a bfloat16 model computes its LM head
        in float32 from the exact upcast of its weight, so that tokens are not chosen among logits rounded to bfloat16
        (`float32_logits=False` keeps them in bfloat16: faster, and further from the float32 model's captions); on
        the plain layers (a GPU, `use_packed_linears=False`, or a CPU whose oneDNN refuses bfloat16) logits stay in
        the model's dtype.
        Returns the token ids, start token and prompt included (and, with `fusion="prefix"`, the image tokens where
        `input_ids` held them; those added here are left out); decode them with `processor.batch_decode`.
        With `output_caption_scores=True` it returns GenerationMixin's output dict (`return_dict_in_generate`) with
        `caption_scores` added: a [`VisionGPTCaptionScores`] for every returned sequence, what [`score_captions`]
        gives for its new tokens (up to and including the end token, where the model generated one), from two
        teacher-forced passes over the finished sequences rather than a second decoding.
        """
        float32_layers = (self.get_output_embeddings(),) if float32_logits else ()
        with packed_linears(self, enabled=use_packed_linears, float32_layers=float32_layers):
            if output_caption_scores:
                if image_embeds is None:
                    if pixel_values is None and vision_features is None:
                        raise ValueError("output_caption_scores=True needs the images (`pixel_values`): a caption's "
                                         "scores compare it with and without its image.")
                    image_embeds = self._image_embeds(pixel_values=pixel_values, vision_features=vision_features)
                    pixel_values = vision_features = None
                kwargs["return_dict_in_generate"] = True
            output = self._generate_captions(pixel_values, input_ids, attention_mask, vision_features, image_embeds,
                                             **kwargs)
        if output_caption_scores:
            output["caption_scores"] = self._generated_caption_scores(
                output.sequences, image_embeds, input_ids, attention_mask, kwargs, use_packed_linears)
        return output

    @torch.no_grad()
    def score_captions(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        use_packed_linears: bool = True,
        **kwargs,
    ) -> VisionGPTCaptionScores:
        r"""
        How far to trust captions of images: a [`VisionGPTCaptionScores`] with each caption's `confidence` and
        `grounding`, from two teacher-forced passes over the whole batch (with each caption's image, and with no
        image). Any caption can be scored: the model's own, or ones people wrote (alt texts, dataset captions).

        Takes the processor's training rows, `processor(images=..., suffix=captions)` (`text=` prompts too: only the
        tokens `labels` marks are scored, the caption and its end token). A caption's scores do not depend on the
        other rows of the batch or on padding. "No image" is [`null_image_embeds`]: a blank image at the image
        processor's mean colour.

        Example:

        ```python
        >>> batch = processor(images=["dog.jpg", "beach.jpg"], suffix=["a dog runs on grass", "a red car"])
        >>> scores = model.score_captions(**batch)
        >>> scores.confidence, scores.grounding  # (2,) each
        ```"""
        if input_ids is None or labels is None:
            raise ValueError(
                "score_captions needs the captions as `input_ids` and `labels` (which tokens to score): pass "
                "processor(images=..., suffix=captions)."
            )
        if image_embeds is None:
            if pixel_values is None and vision_features is None:
                raise ValueError("score_captions needs the images: `pixel_values` (or `vision_features` / "
                                 "`image_embeds`).")
            image_embeds = self._image_embeds(pixel_values=pixel_values, vision_features=vision_features)
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Got {image_embeds.shape[0]} images but {input_ids.shape[0]} captions; pass one image "
                             "per caption.")
        return self._caption_scores(image_embeds, input_ids, attention_mask, labels[:, 1:] != -100,
                                    use_packed_linears)

    def null_image_embeds(self, batch_size: int = 1) -> torch.FloatTensor:
        """
        The visual tokens of "no image", `(batch_size, num_image_tokens, D)`: those of a blank image whose
        `pixel_values` are all zero, which the image processor's normalisation makes its mean colour (ImageNet's grey
        for ViT). [`score_captions`] reads a caption's probability without the image from them: an input as the
        decoder was trained on, without anything in it to see.
        """
        vision_config = self.config.vision_config
        size = vision_config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        pixel_values = torch.zeros(1, getattr(vision_config, "num_channels", 3), *size, device=self.device,
                                   dtype=self.dtype)
        return self._image_embeds(pixel_values=pixel_values).expand(batch_size, -1, -1)

    def _caption_scores(self, image_embeds, input_ids, attention_mask, scored,
                        use_packed_linears=True) -> VisionGPTCaptionScores:
        """`scored[:, i]` says whether `input_ids[:, i + 1]` counts: `(B, T - 1)`. The LM head computes in float32
        whatever `generate` was asked for, so that a caption's scores are the same from every path."""
        scored = scored & (input_ids[:, 1:] != self.config.image_token_id)
        num_tokens = scored.sum(-1)
        if bool((num_tokens == 0).any()):
            rows = (num_tokens == 0).nonzero().flatten().tolist()
            raise ValueError(f"Captions {rows} have no token to score (all `labels` are -100 there).")
        with packed_linears(self, enabled=use_packed_linears, float32_layers=(self.get_output_embeddings(),)):
            log_prob = self._sequence_log_prob(image_embeds, input_ids, attention_mask, scored)
            null = self.null_image_embeds(input_ids.shape[0]).to(image_embeds.dtype)
            log_prob_without_image = self._sequence_log_prob(null, input_ids, attention_mask, scored)
        return VisionGPTCaptionScores.from_log_probs(log_prob, log_prob_without_image, num_tokens)

    def _sequence_log_prob(self, image_embeds, input_ids, attention_mask, scored) -> torch.FloatTensor:
        """The summed log-probability of the scored tokens, teacher-forced: `(B,)`, in float32."""
        logits = self(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                      use_cache=False).logits[:, :-1]  # (B, T - 1, V): logits[:, i] predicts input_ids[:, i + 1]
        targets = input_ids[:, 1:].masked_fill(~scored, 0)
        logits = logits.float()
        # log_softmax at the targets alone: (B, T - 1), without a second (B, T - 1, V) tensor.
        token_log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        return token_log_probs.masked_fill(~scored, 0.0).sum(-1)

    def _generated_caption_scores(self, sequences, image_embeds, input_ids, attention_mask, generate_kwargs,
                                  use_packed_linears) -> VisionGPTCaptionScores:
        """The scores of generate's returned sequences: their new tokens, up to and including the first end token
        (where the model generated one), teacher-forced as [`score_captions`] scores."""
        num_sequences, length = sequences.shape
        copies = num_sequences // image_embeds.shape[0]
        prompt_length = input_ids.shape[1] if input_ids is not None else 1
        config = generate_kwargs.get("generation_config") or self.generation_config
        eos = generate_kwargs.get("eos_token_id", config.eos_token_id)
        scored = generated_tokens(sequences, prompt_length, [eos] if isinstance(eos, int) else eos or [])
        if attention_mask is None:
            attention_mask = torch.ones(image_embeds.shape[0], prompt_length, dtype=torch.long, device=sequences.device)
        mask = torch.cat([attention_mask.repeat_interleave(copies, dim=0),
                          attention_mask.new_ones(num_sequences, length - prompt_length)], dim=1)
        return self._caption_scores(image_embeds.repeat_interleave(copies, dim=0), sequences, mask, scored,
                                    use_packed_linears)

    def _generate_captions(self, pixel_values, input_ids, attention_mask, vision_features, image_embeds, **kwargs):
        user_cache = resolve_cache_argument(kwargs.pop("cache", None), kwargs.pop("past_key_values", None), "generate")
        if kwargs.get("generation_config") is not None:
            # A config passed in leaves unset fields None, which GenerationMixin fills from the model's; the decisions
            # made here (beams to repeat the prefix for, cache, penalties) must see the same merged values.
            given = kwargs["generation_config"].to_dict()
            merged = copy.deepcopy(self.generation_config)
            merged.update(**{name: value for name, value in given.items()
                             if value is not None and name != "transformers_version"})
            kwargs["generation_config"] = merged
        is_prefix = self.config.fusion == "prefix"
        has_image = pixel_values is not None or vision_features is not None
        # A visual prefix in a returned cache needs no image again.
        if image_embeds is None and has_image and not (is_prefix and user_cache is not None):
            image_embeds = self._image_embeds(pixel_values=pixel_values, vision_features=vision_features)
        if image_embeds is not None:
            batch_size = image_embeds.shape[0]
        elif has_image:
            batch_size = (pixel_values if pixel_values is not None else vision_features).shape[0]
        else:
            batch_size = input_ids.shape[0] if input_ids is not None else 1
        if input_ids is None:
            start = self.generation_config.bos_token_id
            if start is None:
                start = self.config.bos_token_id
            if start is None:
                # Decoders without a start token (Qwen2) start from their end token, as the processor's rows do.
                start = self.generation_config.eos_token_id if self.generation_config.eos_token_id is not None else (
                    self.config.eos_token_id)
                start = start[0] if isinstance(start, (list, tuple)) else start
            input_ids = torch.full((batch_size, 1), start, dtype=torch.long, device=self.device)
        elif input_ids.shape[0] != batch_size:
            raise ValueError(f"Got {batch_size} images but {input_ids.shape[0]} prompts in `input_ids`.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", config.use_cache) is not False
        cache_implementation = kwargs.get("cache_implementation", config.cache_implementation)
        text_config = self.config.text_config
        if cache_implementation == "static" and getattr(text_config, "sliding_window", None) and getattr(
            text_config, "use_sliding_window", True
        ):
            # GenerationMixin hands a static cache's steps a mask of the window only, from which positions cannot be
            # told; the dynamic cache keeps the whole sequence's.
            raise ValueError(
                f"cache_implementation='static' is not supported with the {text_config.model_type} decoder's sliding "
                f"window ({text_config.sliding_window} tokens); use the default dynamic cache."
            )
        if is_prefix:
            return self._generate_with_prefix(input_ids, attention_mask, image_embeds, user_cache, kwargs)
        if image_embeds is None:
            # No image: continuing from a cache that holds it (a VisionGPTCache), or GPT-2 alone continuing the text.
            if user_cache is None and use_cache and cache_implementation in (None, "dynamic"):
                user_cache = VisionGPTCache(config=self.config.text_config)  # remembers that there is no image
            if user_cache is not None:
                kwargs[CACHE_NAME] = user_cache
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if user_cache is not None:
            kwargs[CACHE_NAME] = user_cache
        elif use_cache and not self.training and cache_implementation in (None, "dynamic"):
            # Cross-attention keys and values once per image, shared by its beams. In training mode every sequence
            # attends its own copy, as in training, with attention dropout drawn per sequence.
            kwargs[CACHE_NAME] = self.get_cross_attention_cache(image_embeds)
        # image_embeds too: the cross-attention of an assistant model, or of a cache without the image, reads them.
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds, **kwargs)

    def _generate_with_prefix(self, input_ids, attention_mask, image_embeds, user_cache, kwargs):
        """
        `fusion="prefix"`: the image's tokens are in `input_ids` (LLaVA's convention), so GenerationMixin's lengths,
        masks, caches and outputs all cover the visual prefix. A prompt without them (`generate(pixel_values)`, the
        processor's prompts) gets them in front, and they are dropped from the returned ids again. Where every
        sequence starts with its image tokens, the prefix runs through GPT-2 once per image and its cache is repeated
        for the image's beams and returned sequences (GenerationMixin would run it once for each of them); decoding
        that reads every prompt position (hidden states, attentions, an assistant model) takes GenerationMixin's own
        path.
        """
        config = kwargs.get("generation_config") or self.generation_config
        num_image_tokens, image_token_id = self.config.num_prefix_tokens, self.config.image_token_id
        holds_image_tokens = bool((input_ids == image_token_id).any())
        # A cache this model returned says whether it holds the visual prefix (ids returned without image tokens).
        cached_prefix = getattr(user_cache, "num_prefix_positions", 0) > 0
        added = 0
        if not holds_image_tokens and (image_embeds is not None or cached_prefix):
            image_tokens = input_ids.new_full((input_ids.shape[0], num_image_tokens), image_token_id)
            input_ids = torch.cat([image_tokens, input_ids], dim=1)  # (B, K + T)
            attention_mask = torch.cat([attention_mask.new_ones(image_tokens.shape), attention_mask], dim=1)
            added = num_image_tokens
        image_first = bool((input_ids[:, :num_image_tokens] == image_token_id).all()) and not bool(
            (input_ids[:, num_image_tokens:] == image_token_id).any()
        )
        reads_every_position = any(
            kwargs.get(name, getattr(config, name, None))
            for name in ("output_hidden_states", "output_attentions", "assistant_model", "prompt_lookup_num_tokens")
        )
        use_cache = kwargs.get("use_cache", config.use_cache) is not False
        cache_implementation = kwargs.get("cache_implementation", config.cache_implementation)
        prefix_cached = False
        if user_cache is not None:
            kwargs[CACHE_NAME] = user_cache  # GenerationMixin continues the whole sequence it holds
        elif (image_embeds is not None and image_first and use_cache and not reads_every_position
              and cache_implementation in (None, "dynamic", "static")):
            kwargs[CACHE_NAME] = self._prefill_visual_prefix(image_embeds, input_ids, kwargs)
            image_embeds, prefix_cached = None, True
        elif added and use_cache and cache_implementation in (None, "dynamic"):
            # GenerationMixin's own path fills this cache with the image tokens added here, which the returned ids
            # will not show: the cache says so, for a later call that continues from it.
            kwargs[CACHE_NAME] = VisionGPTCache(config=self.config.text_config)
            kwargs[CACHE_NAME].num_prefix_positions = num_image_tokens
        if added and not prefix_cached:
            # Lengths the caller gave count their text; GenerationMixin's count the image tokens added here too.
            for name in ("max_length", "min_length"):
                if kwargs.get(name) is not None:
                    kwargs[name] += added
        # Where the prefilled cache holds the image's positions, GenerationMixin gets the text alone (the mask covers
        # both): its logits processors index scores by token id, and image tokens, outside the vocabulary, have no
        # score (repetition_penalty fails on them in transformers releases that do not skip such ids).
        text_ids = input_ids[:, num_image_tokens:] if prefix_cached else input_ids
        repetition_penalty = kwargs.get("repetition_penalty", getattr(config, "repetition_penalty", None))
        if not prefix_cached and (holds_image_tokens or added) and repetition_penalty not in (None, 1.0) and (
            not penalties_skip_ids_outside_vocabulary()
        ):
            raise ValueError(
                "repetition_penalty with image tokens that generate must read (output_hidden_states, "
                "output_attentions, an assistant model, continuing from a returned cache, or image tokens after the "
                "start of a sequence) needs a "
                "transformers release whose repetition penalty skips ids outside the vocabulary, as 5.24's does; "
                "this one does not. Drop one of them, or put the image tokens first."
            )
        # GPT-2's start token is its pad token, so a prompt that is only the start token ends in "padding" for
        # generate's right-padding check: a false alarm, dropped here.
        with _without_log_message(transformers_logging.get_logger("transformers.generation.utils"),
                                  "right-padding was detected"):
            output = super().generate(input_ids=text_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                                      **kwargs)
        # The ids come back as the caller gave them: with image tokens if theirs held them, without if added here.
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        if prefix_cached and not added:
            image_tokens = sequences.new_full((sequences.shape[0], num_image_tokens), image_token_id)
            sequences = torch.cat([image_tokens, sequences], dim=1)
        elif added and not prefix_cached:
            sequences = sequences[:, added:]
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # GenerationMixin turns the 2D mask into a 4D one for static caches, or drops it where it judges causal
        # attention enough; GPT-2 here builds its own from the 2D mask, which also covers the visual prefix.
        if kwargs.get("attention_mask") is not None:
            inputs["attention_mask"] = kwargs["attention_mask"]
        # `stop_strings` needs generate's `tokenizer`, which some transformers releases leave among the model kwargs
        # they forward to the model (built-in models ignore unknown arguments; ours names them as an error).
        for name in ("tokenizer", "assistant_tokenizer"):
            inputs.pop(name, None)
        return inputs

    def _num_copies(self, generate_kwargs) -> int:
        """How many sequences generate runs per image: GenerationMixin expands every input this many times."""
        config = generate_kwargs.get("generation_config") or self.generation_config
        num_beams = generate_kwargs.get("num_beams") or config.num_beams or 1
        num_return_sequences = generate_kwargs.get("num_return_sequences") or config.num_return_sequences or 1
        return max(num_beams, num_return_sequences)

    @torch.no_grad()
    def get_cross_attention_cache(self, image_embeds: torch.FloatTensor) -> VisionGPTCache:
        """
        An empty [`VisionGPTCache`] holding GPT-2's cross-attention keys and values over each image's visual tokens
        `(B, L, D)`, computed once per image: all of an image's sequences (beams, returned sequences) then attend to
        that one copy. `generate` builds it itself; pass it as the cache of a hand-written decoding loop.
        """
        embeds = image_embeds.to(self.get_input_embeddings().weight.dtype)
        # On CPU half-precision keys and values are kept in float32 (exact upcast): see VisionGPTCache.
        dtype = torch.float32 if embeds.device.type == "cpu" else None
        cache = VisionGPTCache(config=self.config.text_config)
        cache.cross_keys_values = self.language_model.cross_keys_values(embeds, dtype)
        return cache

    def _prefill_visual_prefix(self, image_embeds, input_ids, generate_kwargs):
        """
        Run the visual prefix (the first `num_prefix_tokens` positions of every sequence) through GPT-2 once per image
        and repeat its key/value cache for every beam or returned sequence. With `cache_implementation="static"` the
        cache is a `StaticCache` sized for the prompt and the new tokens, which `generate` compiles for (on CUDA by
        default; see `CompileConfig`).
        """
        config = generate_kwargs.get("generation_config") or self.generation_config
        cache_implementation = generate_kwargs.pop("cache_implementation", config.cache_implementation)
        # generate must not build a second cache next to the one handed to it.
        generate_kwargs["cache_implementation"] = None
        batch_size, num_visual = image_embeds.shape[:2]
        cache = VisionGPTCache(config=self.config.text_config)
        cache.num_prefix_positions = num_visual  # returned with the output: a later call continues from it
        positions = torch.arange(num_visual, device=image_embeds.device).expand(batch_size, -1)
        embeds = image_embeds.to(self.get_input_embeddings().weight.dtype)
        self.model.run_decoder(embeds, positions, cache=cache)
        # The same expansion GenerationMixin applies to input_ids and the mask (repeat_interleave, same order).
        expand = self._num_copies(generate_kwargs)
        if expand > 1:
            cache.batch_repeat_interleave(expand)
        if cache_implementation == "static":
            cache = self._to_static_cache(cache, input_ids.shape[1], generate_kwargs, config)
        return cache

    def _to_static_cache(self, cache: DynamicCache, prompt_length: int, generate_kwargs, config) -> StaticCache:
        max_new_tokens = generate_kwargs.get("max_new_tokens") or config.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = (generate_kwargs.get("max_length") or config.max_length) - (prompt_length - cache.get_seq_length())
        static = StaticCache(config=self.config.text_config, max_cache_len=prompt_length + max_new_tokens)
        positions = torch.arange(cache.get_seq_length(), device=cache.layers[0].keys.device)
        for layer_idx, layer in enumerate(cache.layers):
            # `cache_kwargs` for releases whose static cache needs the positions (see VisionGPTAttention).
            static.update(layer.keys, layer.values, layer_idx, {"cache_position": positions})
        return static


class _without_log_message:
    """Drop log records containing `text` from `logger` inside the block."""

    def __init__(self, logger, text: str):
        self.logger, self.text = logger, text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()

    def __enter__(self):
        self.logger.addFilter(self)

    def __exit__(self, *exc):
        self.logger.removeFilter(self)


__all__ = ["VisionGPTCaptionScores", "VisionGPTGenerationMixin", "generated_tokens"]
