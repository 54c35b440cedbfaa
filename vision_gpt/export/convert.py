"""Convert a ViT + GPT-2 `VisionEncoderDecoderModel` (e.g. nlpconnect/vit-gpt2-image-captioning) into VisionGPT.

Such a checkpoint is VisionGPT with `fusion="cross_attention"` and `visual_tokens="patches"`: the decoder
cross-attends to every ViT token, through `enc_to_dec_proj` when the two hidden sizes differ. The conversion is a
rename of the state dict, nanoGPT-style: every source key is consumed and every target key filled, shapes checked.
"""

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from ..modeling import VisionGPTConfig, VisionGPTForConditionalGeneration, VisionGPTProcessor
from ..modeling.compat_vision_gpt import load_image_processor
from .model_card import declared_license, hub_model_id
from .repo import write_model_card

logger = logging.getLogger(__name__)

# The encoder and decoder types this conversion maps key for key.
ENCODER_TYPES = ("vit",)
DECODER_TYPES = ("gpt2",)

# Source prefix -> target prefix. Both towers are built by transformers from the same configs on both sides, so
# below these prefixes the module trees (and key names) are identical.
KEY_PREFIXES = (
    ("encoder.", "model.vision_model."),  # ViTModel
    ("enc_to_dec_proj.", "model.projector.proj."),  # nn.Linear(encoder hidden, decoder hidden), only when they differ
    ("decoder.transformer.", "model.language_model."),  # GPT2LMHeadModel's body, cross-attention layers included
    ("decoder.lm_head.", "lm_head."),
)
# ViT's pooler (dense + tanh over CLS) is never read by a VisionEncoderDecoder, which feeds the decoder
# `last_hidden_state`; VisionGPT builds ViT without it for visual_tokens="patches".
DROPPED_PREFIXES = ("encoder.pooler.",)
WTE, LM_HEAD = "decoder.transformer.wte.weight", "decoder.lm_head.weight"

# Generation fields that are not copied as they are: the special tokens come from `_special_tokens`, the length limit
# is restated by `_generation_config`, and the encoder_* penalties act on encoder *token ids*, which an image encoder
# has none of.
_NOT_CARRIED = {
    "transformers_version",
    "_from_model_config",
    "bos_token_id",
    "decoder_start_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_length",
    "max_new_tokens",
    "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty",
}
# What transformers' generate does when a generation config sets neither max_length nor max_new_tokens.
DEFAULT_MAX_NEW_TOKENS = 20


def convert_vision_encoder_decoder(
    ved_model: VisionEncoderDecoderModel, tokenizer=None, image_processor=None
) -> tuple[VisionGPTForConditionalGeneration, VisionGPTProcessor | None]:
    r"""
    Convert an in-memory ViT + GPT-2 `VisionEncoderDecoderModel` into a [`VisionGPTForConditionalGeneration`] with
    `fusion="cross_attention"` and `visual_tokens="patches"` that gives the same logits and the same generated ids.

    The projector is `"identity"` when the VED has no `enc_to_dec_proj` (equal hidden sizes) and `"linear"` with the
    `enc_to_dec_proj` weights otherwise. The VED's `decoder_start_token_id` becomes VisionGPT's start token
    (`bos_token_id`), and its generation settings (length, beams, n-gram blocking, penalties, ...) become the
    converted model's defaults. The returned model is FP32 and in eval mode.

    A [`VisionGPTProcessor`] is built when both `tokenizer` and `image_processor` are given; `None` when neither is.

    Example:

    ```python
    >>> from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel
    >>> source = "nlpconnect/vit-gpt2-image-captioning"
    >>> model, processor = convert_vision_encoder_decoder(
    ...     VisionEncoderDecoderModel.from_pretrained(source),
    ...     AutoTokenizer.from_pretrained(source),
    ...     AutoImageProcessor.from_pretrained(source),
    ... )
    >>> captions = processor.batch_decode(model.generate(**processor(images="photo.jpg")))
    ```"""
    name = _describe(ved_model)
    if not isinstance(ved_model, VisionEncoderDecoderModel):
        raise ValueError(
            f"{name} is a {type(ved_model).__name__}, not a VisionEncoderDecoderModel; only ViT + GPT-2 "
            "VisionEncoderDecoder captioners can be converted."
        )
    check_architecture(ved_model.config, name)
    if (tokenizer is None) != (image_processor is None):
        raise ValueError(
            "convert_vision_encoder_decoder builds a processor from both `tokenizer` and `image_processor`; pass "
            "both, or neither to convert the model alone."
        )
    source = ved_model.state_dict()
    has_proj = "enc_to_dec_proj.weight" in source
    encoder_config, decoder_config = ved_model.config.encoder, ved_model.config.decoder
    if encoder_config.hidden_size != decoder_config.hidden_size and not has_proj:
        raise ValueError(
            f"{name}: the ViT hidden size ({encoder_config.hidden_size}) differs from GPT-2's "
            f"({decoder_config.hidden_size}) but the model has no `enc_to_dec_proj` to map between them."
        )
    # GPT-2 ties its LM head to the token embedding; a checkpoint whose head was trained apart keeps both.
    tied = torch.equal(source[LM_HEAD], source[WTE])
    start, eos, pad = _special_tokens(ved_model)

    text_config = decoder_config.to_dict()
    text_config["tie_word_embeddings"] = tied
    config = VisionGPTConfig(
        vision_config=encoder_config.to_dict(),
        text_config=text_config,
        fusion="cross_attention",
        visual_tokens="patches",
        projector_type="linear" if has_proj else "identity",
        tie_word_embeddings=tied,
        bos_token_id=start,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    model = VisionGPTForConditionalGeneration(config)
    _copy_weights(source, model, tied=tied, name=name)
    model.generation_config = _generation_config(ved_model, start=start, eos=eos, pad=pad)
    model.eval()

    processor = None
    if tokenizer is not None:
        tokenizer = copy.deepcopy(tokenizer)
        if tokenizer.bos_token_id != start:
            # The processor starts captions and prompts with the tokenizer's bos; make that the VED's start token,
            # so training inputs and prompts begin as the checkpoint was trained to.
            tokenizer.bos_token = tokenizer.convert_ids_to_tokens(start)
        processor = VisionGPTProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def check_architecture(config, name: str) -> None:
    """Raise a `ValueError` naming `name` unless `config` is a VisionEncoderDecoder with a ViT encoder and a GPT-2
    decoder that has cross-attention."""
    if not isinstance(config, VisionEncoderDecoderConfig):
        model_type = getattr(config, "model_type", type(config).__name__)
        raise ValueError(
            f"{name} is a {model_type!r} checkpoint, not a VisionEncoderDecoder; only ViT + GPT-2 "
            "VisionEncoderDecoder captioners (model_type 'vision-encoder-decoder', e.g. "
            "nlpconnect/vit-gpt2-image-captioning) can be converted."
        )
    encoder_type, decoder_type = config.encoder.model_type, config.decoder.model_type
    if encoder_type not in ENCODER_TYPES:
        raise ValueError(
            f"{name} has a {encoder_type!r} encoder; the conversion supports {list(ENCODER_TYPES)} encoders only "
            "(DeiT, BEiT, Swin and Donut encoders have other weights and outputs)."
        )
    if decoder_type not in DECODER_TYPES:
        raise ValueError(
            f"{name} has a {decoder_type!r} decoder; VisionGPT's decoder is GPT-2 ({list(DECODER_TYPES)}), so "
            "checkpoints with BERT, RoBERTa or other decoders (e.g. TrOCR) cannot be converted."
        )
    if not getattr(config.decoder, "add_cross_attention", False):
        raise ValueError(
            f"{name} has a GPT-2 decoder without cross-attention (add_cross_attention=False), so it never reads the "
            "image; there is nothing to convert."
        )


def convert_checkpoint(source: str, output_dir: str, fp16: bool = False, *, repo_id: str | None = None,
                       license: str | None = None) -> Path:
    r"""
    Convert a ViT + GPT-2 VisionEncoderDecoder checkpoint (Hub id or folder, with its tokenizer and image processor)
    into a Hub-ready VisionGPT repo in `output_dir`: weights, config, generation config, processor files and the
    remote code that loads them with `trust_remote_code=True`. Before saving, the converted model is checked against
    the original on a random image ([`check_parity`]); the check runs in FP32, and `fp16=True` then saves FP16
    weights. The repo's model card names `source` as its base model, takes its license from `source`'s own card
    unless `license` is given, and is addressed to `repo_id` (default: the folder's name). Returns `output_dir` as a
    `Path`.

    Example:

    ```python
    >>> convert_checkpoint("nlpconnect/vit-gpt2-image-captioning", "vit-gpt2-vision-gpt")
    PosixPath('vit-gpt2-vision-gpt')
    >>> model = AutoModel.from_pretrained("vit-gpt2-vision-gpt", trust_remote_code=True)
    ```"""
    name = f"'{source}'"
    # Check the architecture from config.json before loading (possibly large) weights.
    check_architecture(AutoConfig.from_pretrained(source), name)
    tokenizer = _load_part(AutoTokenizer.from_pretrained, source, "tokenizer")
    image_processor = _load_part(load_image_processor, source, "image_processor")
    # FP32 whatever the checkpoint's dtype: the parity check compares FP32 logits.
    ved = VisionEncoderDecoderModel.from_pretrained(source, dtype=torch.float32).eval()
    model, processor = convert_vision_encoder_decoder(ved, tokenizer, image_processor)

    image = _random_image(ved.config.encoder.image_size)
    pixel_values = processor(images=image)["pixel_values"]
    report = check_parity(ved, model, pixel_values)
    logger.info(
        "Converted %s: max |logit difference| %.2e, greedy ids equal: %s", source, report["max_logit_diff"],
        report["greedy_equal"],
    )
    if fp16:
        model = model.to(torch.float16)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    write_model_card(
        model, processor, output_dir, repo_id=repo_id or output_dir.name, license=license,
        vision_model=f"the ViT encoder of {source}", text_model=f"the GPT-2 decoder of {source}",
        base_models=[source] if hub_model_id(source) else [], tower_licenses={source: declared_license(source)},
        weights_description="FP16 `model.safetensors`" if fp16 else "FP32 `model.safetensors`",
        datasets=None, dataset_name=f"the training data of {source}",
        training_data=f"Not trained by vision-gpt: the weights are {source}'s, converted. See its model card.",
        training_description=(f"Converted from the VisionEncoderDecoderModel {source} by `vision-gpt convert`: every "
                              "weight mapped and checked, then the converted model's logits and greedy tokens "
                              f"compared with the original's on a random image (max |logit difference| "
                              f"{report['max_logit_diff']:.2e}, greedy ids equal: {report['greedy_equal']})."),
        compute_description="None beyond the conversion: the weights were trained elsewhere.",
        data_limitations=f"what {source} was trained on (see its model card)",
    )
    return output_dir


@torch.no_grad()
def check_parity(
    ved_model: VisionEncoderDecoderModel,
    model: VisionGPTForConditionalGeneration,
    pixel_values: torch.FloatTensor,
    num_tokens: int = 8,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> dict:
    """
    Compare a converted model with its source on `pixel_values`: the logits over the start token and `num_tokens`
    random tokens, and `num_tokens` greedily generated ids. Raises `RuntimeError` when either differs; returns
    `{"max_logit_diff": float, "greedy_equal": True}`.

    Example:

    ```python
    >>> check_parity(ved, model, torch.randn(1, 3, 224, 224))
    {'max_logit_diff': 0.0, 'greedy_equal': True}
    ```"""
    start = model.generation_config.bos_token_id
    generator = torch.Generator().manual_seed(0)
    vocab_size, batch_size = model.config.text_config.vocab_size, pixel_values.shape[0]
    tokens = torch.randint(0, vocab_size, (batch_size, num_tokens), generator=generator)
    input_ids = torch.cat([torch.full_like(tokens[:, :1], start), tokens], dim=1)  # (B, 1 + num_tokens)
    theirs = ved_model(pixel_values=pixel_values, decoder_input_ids=input_ids).logits
    ours = model(pixel_values=pixel_values, input_ids=input_ids).logits  # (B, T, V), aligned with input_ids
    max_diff = (ours.float() - theirs.float()).abs().max().item()
    if not torch.allclose(ours.float(), theirs.float(), atol=atol, rtol=rtol):
        raise RuntimeError(
            f"The converted model's logits differ from the original's by up to {max_diff:.3g} (atol={atol}); the "
            "conversion is not faithful. Please report this with the source checkpoint's name."
        )
    greedy = dict(max_new_tokens=num_tokens, num_beams=1, do_sample=False)
    theirs_ids = ved_model.generate(pixel_values, **greedy)
    ours_ids = model.generate(pixel_values=pixel_values, **greedy)
    if not torch.equal(theirs_ids, ours_ids):
        raise RuntimeError(
            f"Greedy decoding differs after conversion: original {theirs_ids.tolist()}, converted {ours_ids.tolist()}."
        )
    return {"max_logit_diff": max_diff, "greedy_equal": True}


# ----- internals ----------------------------------------------------------------------------------------------------


def _describe(ved_model) -> str:
    name = getattr(getattr(ved_model, "config", None), "name_or_path", "") or ""
    return f"'{name}'" if name else f"the given {type(ved_model).__name__}"


def _load_part(load, source: str, part: str):
    try:
        return load(source)
    except (OSError, ValueError) as error:
        # Without its files AutoTokenizer raises a ValueError about sentencepiece and tiktoken: say what is missing.
        raise ValueError(
            f"Could not load the {part.replace('_', ' ')} of '{source}'; the conversion needs the checkpoint's own "
            f"to build the processor. Save it next to the model (`{part}.save_pretrained(folder)`) and convert that "
            "folder."
        ) from error


def _special_tokens(ved_model) -> tuple[int, int, int]:
    """(start, eos, pad) as the VED's `generate` resolves them: generation config first, then the model configs."""
    generation, config, decoder = ved_model.generation_config, ved_model.config, ved_model.config.decoder

    def first(*values):
        return next((value for value in values if value is not None), None)

    start = first(generation.decoder_start_token_id, config.decoder_start_token_id, generation.bos_token_id,
                  decoder.bos_token_id)
    eos = first(generation.eos_token_id, config.eos_token_id, decoder.eos_token_id)
    pad = first(generation.pad_token_id, config.pad_token_id, decoder.pad_token_id, eos)
    if start is None:
        raise ValueError(
            f"{_describe(ved_model)} sets no decoder_start_token_id or bos_token_id, so its first decoder token is "
            "unknown; set `model.config.decoder_start_token_id` (GPT-2 uses 50256) and convert again."
        )
    return start, eos, pad


def _target_key(source_key: str) -> str | None:
    """The VisionGPT key for a VED key; `None` for keys dropped on purpose."""
    if source_key.startswith(DROPPED_PREFIXES):
        return None
    for source_prefix, target_prefix in KEY_PREFIXES:
        if source_key.startswith(source_prefix):
            return target_prefix + source_key[len(source_prefix) :]
    raise ValueError(f"Unexpected key {source_key!r} in the VisionEncoderDecoder state dict; no mapping covers it.")


@torch.no_grad()
def _copy_weights(source: dict, model: VisionGPTForConditionalGeneration, tied: bool, name: str) -> None:
    # state_dict() tensors share storage with the parameters, so copy_ writes into the model.
    target = model.state_dict()
    filled = set()
    for source_key, tensor in source.items():
        target_key = _target_key(source_key)
        if target_key is None:
            continue
        if tied and source_key == LM_HEAD:
            # Already equal to wte (checked by the caller), and ours is the same tensor as our wte.
            filled.add(target_key)
            continue
        if target_key not in target:
            raise ValueError(f"{name}: {source_key!r} maps to {target_key!r}, which VisionGPT does not have.")
        if target[target_key].shape != tensor.shape:
            raise ValueError(
                f"{name}: {source_key!r} has shape {tuple(tensor.shape)} but {target_key!r} has "
                f"{tuple(target[target_key].shape)}."
            )
        target[target_key].copy_(tensor)
        filled.add(target_key)
    missing = sorted(set(target) - filled)
    if missing:
        raise ValueError(f"{name}: these VisionGPT weights have no source in the checkpoint: {missing}.")


def _generation_config(ved_model, start: int, eos: int, pad: int) -> GenerationConfig:
    """
    The VED's generation settings as VisionGPT defaults. Both models start from one token (the VED's decoder start,
    our bos) and count it in `max_length`, so every per-token setting (`min_length`, n-gram blocking, beam length
    penalty, forced tokens) means the same; only the length limit is restated as `max_new_tokens = max_length - 1`,
    the form VisionGPT's saved defaults use.
    """
    settings = ved_model.generation_config.to_diff_dict()
    fields = {key: value for key, value in settings.items() if key not in _NOT_CARRIED}
    if settings.get("max_new_tokens") is not None:
        fields["max_new_tokens"] = settings["max_new_tokens"]
    elif settings.get("max_length") is not None:
        fields["max_new_tokens"] = settings["max_length"] - 1
    else:
        # With no limit set, generate writes 20 new tokens; VisionGPT's own default (32) would write more.
        fields["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    # VisionGPT defaults to 3 beams; a VED that sets none decodes greedily, and so must the conversion.
    fields.setdefault("num_beams", 1)
    return GenerationConfig(bos_token_id=start, eos_token_id=eos, pad_token_id=pad, **fields)


def _random_image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


__all__ = ["check_architecture", "check_parity", "convert_checkpoint", "convert_vision_encoder_decoder"]
