"""The fast captioning paths (shared prefix cache, oneDNN packed linears, static cache, torch.compile, bf16) must give
the captions of the plain path: GenerationMixin's own loop over the plain layers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import CompileConfig, GenerationMixin
from transformers.pytorch_utils import Conv1D

from vision_gpt.modeling.packed_linear_vision_gpt import (
    has_packed_weight,
    packed_linear_available,
    packed_linears,
    release_packed_weights,
)

from .conftest import random_images, tiny_model

FUSIONS = ["prefix", "cross_attention"]
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, num_beams=1)
needs_packed_kernels = pytest.mark.skipif(not packed_linear_available(), reason="oneDNN packed linears need x86")


@pytest.fixture(scope="module")
def inputs(processor):
    # Left-padded prompts of different lengths exercise the position ids of every path.
    return processor(images=random_images(3, seed=3), prompt=["a", "two red", "the"])


def plain_generate(model, inputs, **settings):
    """GenerationMixin's loop with the visual prefix recomputed per sequence and no packed weights."""
    image_embeds = model.get_image_features(inputs["pixel_values"])
    return GenerationMixin.generate(model, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    image_embeds=image_embeds, **settings)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("path", [
    dict(),
    dict(use_packed_linears=False),
    dict(cache_implementation="static"),
])
def test_fast_paths_give_the_plain_greedy_captions(fusion, path, inputs):
    model = tiny_model(fusion=fusion)
    plain = plain_generate(model, inputs, **GREEDY)
    assert len({tuple(row) for row in plain[:, -GREEDY["max_new_tokens"]:].tolist()}) > 1  # images matter
    assert torch.equal(model.generate(**inputs, **path, **GREEDY), plain)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_static_cache_beam_search_matches_the_dynamic_cache(fusion, inputs):
    model = tiny_model(fusion=fusion)
    settings = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert torch.equal(model.generate(**inputs, cache_implementation="static", **settings),
                       model.generate(**inputs, **settings))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_compiled_static_cache_path_runs_and_matches(fusion, inputs):
    model = tiny_model(fusion=fusion)
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # generate compiles only on accelerators unless told otherwise
    torch._dynamo.reset()
    compiled = model.generate(**inputs, cache_implementation="static", compile_config=compile_config, **GREEDY)
    assert torch.equal(compiled, plain_generate(model, inputs, **GREEDY))


def test_an_unsupported_cache_implementation_is_refused(inputs):
    model = tiny_model()
    with pytest.raises(ValueError, match="cache_implementation='offloaded'"):
        model.generate(**inputs, cache_implementation="offloaded", **GREEDY)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_bf16_greedy_captions_equal_batched_and_single(fusion, processor):
    model = tiny_model(fusion=fusion).to(torch.bfloat16)
    images = random_images(4, seed=5)
    batched = model.generate(**processor(images=images), **GREEDY)
    single = torch.cat([model.generate(**processor(images=[image]), **GREEDY) for image in images])
    assert batched.dtype == torch.long
    assert torch.equal(batched, single)
    assert torch.equal(batched, model.generate(**processor(images=images), use_packed_linears=False, **GREEDY))


# ----- the packed linear layers themselves --------------------------------------------------------------------------


@needs_packed_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
def test_packed_layers_compute_the_plain_layers(dtype, shape):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(24, 40), torch.nn.Linear(24, 40, bias=False), Conv1D(40, 24)])
    layers = layers.to(dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        with packed_linears(layers):
            packed = [layer(x) for layer in layers]
            assert all(has_packed_weight(layer) for layer in layers)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for out, ref in zip(packed, expected):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, atol=tolerance, rtol=tolerance)


@needs_packed_kernels
def test_packed_weights_follow_in_place_updates():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad(), packed_linears(layer):
        before = layer(x)
        layer.weight.mul_(2.0)  # e.g. an optimizer step between two evaluations
        after = layer(x)
        torch.testing.assert_close(after, F.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(before, after)


@needs_packed_kernels
def test_gradients_and_the_plain_layers_come_back():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with packed_linears(layer):
        with packed_linears(layer):  # nested blocks keep the fast path until the outer one ends
            pass
        assert "forward" in layer.__dict__
        layer(x).sum().backward()  # autograd takes the plain path
    assert layer.weight.grad is not None
    assert "forward" not in layer.__dict__
    release_packed_weights(layer)
    assert not has_packed_weight(layer)


@needs_packed_kernels
def test_generate_uses_the_packed_layers_and_restores_them(inputs):
    model = tiny_model()
    model.generate(**inputs, **GREEDY)
    assert has_packed_weight(model.language_model.lm_head)
    vision_linears = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.Linear)]
    assert vision_linears and all(has_packed_weight(m) for m in vision_linears)
    assert not any("forward" in module.__dict__ for module in model.modules())
    release_packed_weights(model)
    model.generate(**inputs, use_packed_linears=False, **GREEDY)
    assert not any(has_packed_weight(module) for module in model.modules())
    model.generate(**inputs, **GREEDY)
    copy.deepcopy(model).generate(**inputs, **GREEDY)  # a model with packed weights still copies (Trainer, export)
