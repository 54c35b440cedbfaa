"""The fast captioning paths (shared prefix cache, oneDNN packed linears, static cache, torch.compile, bf16) must give
the captions of the plain path: GenerationMixin's own loop over the plain layers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CompileConfig, Dinov2Config, GenerationMixin, GPT2Config, SiglipVisionConfig
from transformers import ViTConfig
from transformers.models.clip.modeling_clip import CLIPMLP
from transformers.models.dinov2.modeling_dinov2 import Dinov2MLP
from transformers.models.siglip.modeling_siglip import SiglipMLP
from transformers.models.vit.modeling_vit import ViTMLP

from vision_gpt.modeling import packed_linear_vision_gpt
from vision_gpt.modeling.compat_vision_gpt import CACHE_NAME
from vision_gpt.modeling.gpt2_vision_gpt import VisionGPTConv1D, VisionGPTTextMLP
from vision_gpt.modeling.modeling_vision_gpt import VisionGPTMLP
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
    image_embeds = model.get_image_features(inputs["pixel_values"]).pooler_output
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


def test_a_static_cache_that_generate_builds_itself_gives_the_plain_captions(inputs):
    # Hidden states of every prompt position: the prefix is not prefilled apart, so GenerationMixin builds the static
    # cache over image tokens and text, and hands the model its 4D mask.
    model = tiny_model()
    out = model.generate(**inputs, cache_implementation="static", output_hidden_states=True,
                         return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, plain_generate(model, inputs, **GREEDY))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("decoding", ["greedy", "beams"])
def test_bf16_captions_equal_batched_and_single(fusion, decoding, processor):
    model = tiny_model(fusion=fusion, visual_tokens="patches").to(torch.bfloat16)
    images = random_images(4, seed=5)
    settings = GREEDY if decoding == "greedy" else dict(GREEDY, num_beams=3)
    batched = model.generate(**processor(images=images), **settings)
    single = torch.cat([model.generate(**processor(images=[image]), **settings) for image in images])
    assert batched.dtype == torch.long
    assert torch.equal(batched, single)
    plain = model.generate(**processor(images=images), use_packed_linears=False, **settings)
    assert torch.equal(plain, torch.cat([model.generate(**processor(images=[image]), use_packed_linears=False,
                                                        **settings) for image in images]))


@needs_packed_kernels
@pytest.mark.parametrize("float32_logits", [True, False])
def test_bf16_generate_chooses_tokens_from_float32_logits(float32_logits, inputs):
    model = tiny_model().to(torch.bfloat16)
    out = model.generate(**inputs, **GREEDY, float32_logits=float32_logits, output_logits=True,
                         return_dict_in_generate=True)
    logits = torch.stack(out.logits)  # GenerationMixin hands them over as float32 either way
    finite = logits[logits.isfinite()]
    rounded_to_bf16 = torch.equal(finite, finite.bfloat16().float())
    assert rounded_to_bf16 != float32_logits
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    if float32_logits:
        # The logits are exactly those of the bf16 weight upcast to float32 (the argmax of the first step decides).
        first = out.sequences[:, inputs["input_ids"].shape[1]]
        assert torch.equal(out.logits[0].argmax(-1), first)


# ----- the packed linear layers themselves --------------------------------------------------------------------------


@needs_packed_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
def test_packed_layers_compute_the_plain_layers(dtype, shape):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(24, 40), torch.nn.Linear(24, 40, bias=False),
                                   VisionGPTConv1D(24, 40)])
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
def test_generation_after_a_fused_optimizer_step_uses_the_new_weights(inputs):
    # torch's fused AdamW (transformers' default optimizer) updates in place without bumping version counters: the
    # captions a training run scores after a step must come from the stepped weights, not from stale packed copies.
    model = tiny_model().eval()
    pixel_values = inputs["pixel_values"]
    greedy = dict(max_new_tokens=6, num_beams=1, do_sample=False)
    model.generate(pixel_values=pixel_values, **greedy)  # packs every layer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    layer = model.projector.linear_1 if hasattr(model.projector, "linear_1") else next(
        m for m in model.projector.modules() if isinstance(m, torch.nn.Linear))
    version = layer.weight._version
    ids = torch.randint(0, 100, (pixel_values.shape[0], 5))
    model.train()
    model(pixel_values=pixel_values, input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    assert layer.weight._version == version  # what makes the version counter alone miss the step
    stepped = model.generate(pixel_values=pixel_values, **greedy)
    assert torch.equal(stepped, model.generate(pixel_values=pixel_values, use_packed_linears=False, **greedy))


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
    assert has_packed_weight(model.lm_head)
    vision_linears = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.Linear)]
    assert vision_linears and all(has_packed_weight(m) for m in vision_linears)
    assert not any("forward" in module.__dict__ for module in model.modules())
    release_packed_weights(model)
    model.generate(**inputs, use_packed_linears=False, **GREEDY)
    assert not any(has_packed_weight(module) for module in model.modules())
    model.generate(**inputs, **GREEDY)
    copy.deepcopy(model).generate(**inputs, **GREEDY)  # a model with packed weights still copies (Trainer, export)


@needs_packed_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_layers_compute_bf16_weights_in_float32(dtype):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40).to(dtype)
    x = torch.randn(3, 24, dtype=dtype)
    with torch.no_grad(), packed_linears(layer, float32_layers=(layer,)):
        out = layer(x)
    assert out.dtype == torch.float32  # a float32 layer is untouched, a bfloat16 one now returns float32
    torch.testing.assert_close(out, F.linear(x.float(), layer.weight.float(), layer.bias.float()),
                               atol=1e-5, rtol=1e-5)


def _mlps():
    """One small instance of every MLP block whose GELU the packed path fuses, with its activation's name."""
    sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    dinov2 = Dinov2MLP(Dinov2Config(hidden_size=32, num_attention_heads=4, mlp_ratio=2))
    return [
        (VisionGPTTextMLP(GPT2Config(n_embd=32, n_head=4, n_inner=64)), "act"),  # GPT-2's gelu_new: the tanh formula
        (ViTMLP(ViTConfig(**sizes)), "activation_fn"),  # exact (erf) GELU
        (CLIPMLP(CLIPVisionConfig(**sizes, hidden_act="gelu")), "activation_fn"),
        (SiglipMLP(SiglipVisionConfig(**sizes)), "activation_fn"),  # gelu_pytorch_tanh
        (dinov2, "activation_fn" if hasattr(dinov2, "activation_fn") else "activation"),  # `activation` before 5.18
        (VisionGPTMLP(32, 64, 32, "gelu"), "act"),
    ]


@needs_packed_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(6))
def test_fused_gelu_mlps_compute_the_plain_mlps(index, dtype):
    torch.manual_seed(index)
    mlp, activation_name = _mlps()[index]
    mlp = mlp.to(dtype).eval()
    x = torch.randn(2, 5, 32, dtype=dtype) * 2
    calls = []
    getattr(mlp, activation_name).register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        expected = mlp(x)
        assert calls == [1]
        with packed_linears(mlp):
            fused = mlp(x)
    assert calls == [1], "the activation ran outside the matrix product"
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused, expected, atol=tolerance, rtol=tolerance)


@needs_packed_kernels
def test_mlps_fall_back_to_the_plain_forward_where_fusion_does_not_apply():
    x = torch.randn(2, 5, 32)
    mlp = CLIPMLP(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   hidden_act="quick_gelu"))  # no oneDNN post-op computes quick GELU
    calls = []
    mlp.activation_fn.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        expected = mlp(x)
        with packed_linears(mlp):
            out = mlp(x)
            assert has_packed_weight(mlp.fc1)  # its linear layers still run packed
    assert len(calls) == 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_cpu_without_bf16_kernels_gets_the_plain_layers_and_the_same_captions(fusion, inputs, monkeypatch):
    # An AVX2-only CPU: oneDNN packs no bfloat16 weight there (and would raise). Forced here on any CPU.
    probe = packed_linear_vision_gpt.packed_linear_available
    monkeypatch.setattr(packed_linear_vision_gpt, "packed_linear_available",
                        lambda dtype=torch.float32, activation=("none", ""): dtype != torch.bfloat16 and probe(dtype,
                                                                                                            activation))
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", _refuse_bf16(torch.ops.mkldnn._reorder_linear_weight))
    model = tiny_model(fusion=fusion).to(torch.bfloat16)
    fast = model.generate(**inputs, **GREEDY)
    assert not any(has_packed_weight(module) for module in model.modules())
    assert torch.equal(fast, model.generate(**inputs, use_packed_linears=False, **GREEDY))
    assert torch.equal(fast, plain_generate(model, inputs, **GREEDY))
    float32_model = tiny_model(fusion=fusion)
    float32_model.generate(**inputs, **GREEDY)
    assert has_packed_weight(float32_model.lm_head) == packed_linear_available()  # fp32 still packed


def _refuse_bf16(reorder):
    def refuse(weight, *args, **kwargs):
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                               "avx512bw, avx512vl and avx512dq")
        return reorder(weight, *args, **kwargs)
    return refuse


def test_the_probe_refuses_a_dtype_the_kernels_refuse(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", _refuse_bf16(torch.ops.mkldnn._reorder_linear_weight))
    probe = packed_linear_available.__wrapped__  # the uncached check
    assert not probe(torch.bfloat16)
    assert not probe(torch.bfloat16, ("gelu", "tanh"))
    assert probe(torch.float32) == packed_linear_available(torch.float32)


@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(num_beams=4, num_return_sequences=2),
                                      dict(do_sample=False, num_beams=1, num_return_sequences=1)])
def test_cross_attention_shared_image_cache_gives_the_plain_captions(settings, inputs):
    model = tiny_model(fusion="cross_attention", visual_tokens="patches")
    settings = dict(max_new_tokens=6, min_new_tokens=6, **settings)
    assert torch.equal(model.generate(**inputs, **settings), plain_generate(model, inputs, **settings))
    assert torch.equal(model.generate(**inputs, use_cache=False, **settings), plain_generate(model, inputs, **settings))


def test_generate_in_training_mode_keeps_cross_attention_dropout(inputs):
    model = tiny_model(fusion="cross_attention", visual_tokens="patches")
    for module in model.modules():  # no dropout but the cross-attention's, at a rate that changes captions
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for block in model.language_model.h:
        block.crossattention.attn_dropout = 0.5
    model.train()
    settings = dict(max_new_tokens=6, min_new_tokens=6, num_beams=2)
    captions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ours = model.generate(**inputs, **settings)
        torch.manual_seed(seed)
        assert torch.equal(ours, plain_generate(model, inputs, **settings))  # per-sequence cross-attention ran
        captions.append(ours)
    assert not torch.equal(*captions)  # and its dropout was on


def _decode_step(model, embeds, copies, **kwargs):
    """A first decoding step of `copies` sequences per image, image-major as GenerationMixin lays them out."""
    ids = torch.arange(embeds.shape[0] * copies)[:, None] % 7
    with torch.no_grad():
        return model(input_ids=ids, image_embeds=embeds.repeat_interleave(copies, dim=0), **kwargs).logits


def test_images_share_one_cross_attention_cache_that_attends_like_per_sequence_copies():
    model = tiny_model(fusion="cross_attention", visual_tokens="patches").eval()
    embeds = model.get_image_features(torch.randn(2, 3, 32, 32)).pooler_output
    shared = model.get_cross_attention_cache(embeds)
    assert len(shared.cross_keys_values) == model.config.text_config.n_layer
    assert shared.cross_keys_values[0][0].shape[0] == 2  # one copy per image
    expected = _decode_step(model, embeds, 3)  # keys and values computed for every sequence
    # Equal up to float rounding: the attention runs over 3 queries per image instead of 1 per sequence.
    torch.testing.assert_close(_decode_step(model, embeds, 3, cache=shared), expected, atol=1e-4, rtol=1e-4)
    other = model.get_cross_attention_cache(torch.randn_like(embeds))
    assert not torch.allclose(_decode_step(model, embeds, 3, cache=other), expected, atol=1e-3)
    with pytest.raises(ValueError, match="cannot share"):
        _decode_step(model, embeds[:1].expand(3, -1, -1), 1, cache=model.get_cross_attention_cache(embeds))


def test_the_returned_cache_keeps_the_cross_attention_keys_and_values():
    model = tiny_model(fusion="cross_attention", visual_tokens="patches").eval()
    embeds = model.get_image_features(torch.randn(2, 3, 32, 32)).pooler_output
    ids = torch.tensor([[3, 4], [5, 6]])
    with torch.no_grad():
        whole = model(input_ids=ids, image_embeds=embeds).logits[:, -1]
        first = model(input_ids=ids[:, :1], image_embeds=embeds, use_cache=True)
        keys = first[CACHE_NAME].cross_keys_values[0][0]
        step = model(input_ids=ids[:, 1:], use_cache=True, **{CACHE_NAME: first[CACHE_NAME]})  # no image
    assert step[CACHE_NAME].cross_keys_values[0][0] is keys  # computed once
    torch.testing.assert_close(step.logits[:, -1], whole, atol=1e-5, rtol=1e-5)


def test_a_bfloat16_model_keeps_its_shared_cross_keys_in_float32_on_cpu():
    model = tiny_model(fusion="cross_attention", visual_tokens="patches").to(torch.bfloat16).eval()
    embeds = model.get_image_features(torch.randn(2, 3, 32, 32)).pooler_output
    cache = model.get_cross_attention_cache(embeds)
    assert cache.cross_keys_values[0][0].dtype == torch.float32
    assert _decode_step(model, embeds, 1, cache=cache).dtype == torch.bfloat16
