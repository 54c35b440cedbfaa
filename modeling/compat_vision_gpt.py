"""
The one place where vision-gpt handles a name that differs between the transformers releases it supports.

Each difference is detected by the feature, never by the version number, so that a backport or a dev build behaves as
its code does:

- transformers 5.20 added `SubConfigSpec` (a composite config's sub-config classes and default model types); before it a
  config declares `sub_configs = {name: class}` and builds dict sub-configs itself (`build_sub_configs`).
- transformers 5.20 added `Pipeline._prepare_generate_kwargs`; before it a generation pipeline passes its own
  `generation_config` to `generate` (`pipeline_generate_kwargs`).
- before transformers 5.18, without torchvision, `AutoImageProcessor` is a placeholder that raises ImportError, or
  resolves a saved `ViTImageProcessorPil` to the torchvision-backed `ViTImageProcessor` (`load_image_processor` then
  takes the PIL class that the saved config names).
- before transformers 5.24, `RepetitionPenaltyLogitsProcessor` indexes the scores by every id in the sequence, so an
  image token outside the vocabulary (`VisionGPTConfig.image_token_id`) makes it fail; 5.24 skips such ids
  (`penalties_skip_ids_outside_vocabulary`). Generation hands GenerationMixin the text alone wherever the image's
  positions are in the cache, and refuses, with a message, the few cases left.
- transformers 5.24 renamed the key/value cache from `past_key_values` to `cache`: in `generate`, in
  `prepare_inputs_for_generation`, in models' `forward` and in the output classes (whose `__init__` now turns a
  `past_key_values=` argument into `cache`). `CACHE_NAME` is the name the installed release uses. Our forward takes both
  names, so that either release's GenerationMixin finds its own; on releases that renamed it the old one warns
  (`FutureWarning`), as transformers' own models do. Our output's cache field is named `CACHE_NAME`.
"""

import functools
import inspect
import warnings

from transformers import GenerationMixin, configuration_utils

SubConfigSpec = getattr(configuration_utils, "SubConfigSpec", None)


def build_sub_configs(config, default_types: dict[str, str]) -> None:
    """Where there is no `SubConfigSpec`: turn `config`'s dict (or missing) sub-configs into config objects."""
    from transformers import AutoConfig

    for name, default_type in default_types.items():
        value = getattr(config, name)
        if value is None or isinstance(value, dict):
            value = dict(value or {})
            setattr(config, name, AutoConfig.for_model(value.pop("model_type", default_type), **value))


def load_image_processor(source: str):
    """`AutoImageProcessor.from_pretrained(source)`, or its PIL-backed class where that one needs torchvision."""
    import transformers
    from transformers import AutoImageProcessor, ImageProcessingMixin

    try:
        return AutoImageProcessor.from_pretrained(source)
    except ImportError:
        saved_type = ImageProcessingMixin.get_image_processor_dict(source)[0].get("image_processor_type", "")
        pil_class = getattr(transformers, saved_type.removesuffix("Pil") + "Pil", None)
        if pil_class is None:
            raise
        return pil_class.from_pretrained(source)


def pipeline_generate_kwargs(pipeline, generate_kwargs: dict) -> dict:
    """The keyword arguments a generation pipeline hands to `generate`, its generation config included."""
    prepare = getattr(pipeline, "_prepare_generate_kwargs", None)
    if prepare is not None:
        return prepare(generate_kwargs)
    if "generation_config" in generate_kwargs:
        return generate_kwargs
    return {**generate_kwargs, "generation_config": pipeline.generation_config}


@functools.cache
def penalties_skip_ids_outside_vocabulary() -> bool:
    """Whether `RepetitionPenaltyLogitsProcessor` skips ids that have no score (an image token outside the vocabulary)
    rather than indexing past the scores, as it does before 5.24 (found by calling it, not by the version)."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    try:
        RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0, 2]]), torch.zeros(1, 2))
    except (IndexError, RuntimeError):
        return False
    return True


# GenerationMixin hands the cache to `forward` under the name its own `prepare_inputs_for_generation` takes.
CACHE_NAME = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)
OLD_CACHE_NAME = "past_key_values"


def resolve_cache_argument(cache, past_key_values, where: str):
    """The cache a caller passed to `where` as `cache` or as `past_key_values` (GenerationMixin's name before 5.24;
    deprecated, with a `FutureWarning`, on releases that renamed it)."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError(f"{where} got both `cache` and `{OLD_CACHE_NAME}`; pass `{CACHE_NAME}` only.")
    if CACHE_NAME != OLD_CACHE_NAME:
        warnings.warn(
            f"`{OLD_CACHE_NAME}` is deprecated in {where} with this transformers release, which calls it `cache`; "
            "pass `cache=` instead.",
            FutureWarning,
            stacklevel=3,
        )
    return past_key_values


__all__ = [
    "CACHE_NAME",
    "OLD_CACHE_NAME",
    "SubConfigSpec",
    "build_sub_configs",
    "load_image_processor",
    "pipeline_generate_kwargs",
    "resolve_cache_argument",
]
