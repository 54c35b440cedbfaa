"""The model exactly as it is published: these files are copied verbatim into every exported repo."""

from .configuration_vision_gpt import VisionGPTConfig
from .generation_vision_gpt import VisionGPTCaptionScores
from .image_loading_vision_gpt import ImageLoadError, load_image
from .modeling_vision_gpt import (
    VisionGPTForConditionalGeneration,
    VisionGPTOutput,
    VisionGPTPreTrainedModel,
    VisionGPTProjector,
)
from .pipeline_vision_gpt import VisionGPTImageTextToTextPipeline, VisionGPTImageToTextPipeline
from .processing_vision_gpt import VisionGPTProcessor

__all__ = [
    "ImageLoadError",
    "VisionGPTCaptionScores",
    "VisionGPTConfig",
    "VisionGPTForConditionalGeneration",
    "VisionGPTImageTextToTextPipeline",
    "VisionGPTImageToTextPipeline",
    "VisionGPTOutput",
    "VisionGPTPreTrainedModel",
    "VisionGPTProcessor",
    "VisionGPTProjector",
    "load_image",
]
