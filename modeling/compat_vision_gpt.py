"""
The one place where vision-gpt handles a name that differs between the transformers releases it supports.

Each difference is detected by the feature, never by the version number, so that a backport or a dev build behaves as
its code does. Today there is one:

- transformers 5.24 renamed the key/value cache from `past_key_values` to `cache`: in `generate`, in
  `prepare_inputs_for_generation`, in models' `forward` and in the output classes (whose `__init__` now turns a
  `past_key_values=` argument into `cache`). `CACHE_NAME` is the name the installed release uses. Our forward takes both
  names, so that either release's GenerationMixin finds its own; on releases that renamed it the old one warns
  (`FutureWarning`), as transformers' own models do. Our output's cache field is named `CACHE_NAME`.
"""

import inspect
import warnings

from transformers import GenerationMixin

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


__all__ = ["CACHE_NAME", "OLD_CACHE_NAME", "resolve_cache_argument"]
