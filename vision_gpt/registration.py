"""Make the Auto classes know VisionGPT, so installed users need no `trust_remote_code`."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .modeling import VisionGPTConfig, VisionGPTForConditionalGeneration, VisionGPTProcessor


def register() -> None:
    """Register VisionGPT with `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText` and `AutoProcessor`."""
    AutoConfig.register(VisionGPTConfig.model_type, VisionGPTConfig, exist_ok=True)
    AutoModel.register(VisionGPTConfig, VisionGPTForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(VisionGPTConfig, VisionGPTForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(VisionGPTConfig, VisionGPTProcessor, exist_ok=True)
