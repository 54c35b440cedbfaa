"""
Faster linear layers for CPU inference: oneDNN matrix multiplication with weights packed once into its blocked layout.

Why: on the x86 CPUs we measured (AMD EPYC, AVX-512 + BF16), `aten::addmm` and `F.linear` go through MKL, which is slow
at the small row counts of decoding. At 8 rows, GPT-2's 768x3072 layer takes 0.47 ms there and 0.19 ms with packed
oneDNN weights, the 768x50257 LM head 23 ms and 5.6 ms; at the ViT's 1576 rows the gain is about 15% (fp32 and bf16).
The arithmetic is the same matrix product, so outputs match the plain layers up to float rounding.

Only used under `torch.no_grad()` / `torch.inference_mode()` on CPU tensors in float32 or bfloat16: training,
autograd and GPU models never take this path. The packed copy of each weight is kept for its module and rebuilt when the
weight changes (new tensor, dtype, or an in-place update), so it costs one extra copy of the packed weights in memory.

Two more things happen inside the matrix product, where they cost least:
- the GELU of a transformer MLP (GPT-2's, ViT's, CLIP's, SigLIP's, DINOv2's, our mapper's) runs as a oneDNN post-op on
  each output tile while it is in cache, instead of as more passes over a `(tokens, 4 x hidden)` tensor (vision-gpt's
  docs/benchmarks/generate.md has the measured gain);
- layers named in `float32_layers` (generate passes the LM head) compute from the exact float32 copy of their bfloat16
  weight and return float32, so that the next token is not chosen among logits rounded to bfloat16's 8 bits.
"""

import platform
import threading
import weakref
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation

from .gpt2_vision_gpt import VisionGPTConv1D

_PACKED_DTYPES = (torch.float32, torch.bfloat16)
# layer -> (weight key, packed weight, fingerprint). Kept outside the layers so that copying, pickling or saving a model never
# meets oneDNN's opaque tensors, and dropped with the layer.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# How many of a weight's values tell a packed copy made before an in-place update from one made after it.
FINGERPRINT_SAMPLES = 64
# Guards the depth count and the layer swap of `packed_linears`. Without it, two threads generating with one model (a
# server captioning two requests at once) can both see depth 0 and swap: the second finds the GELUs already replaced by
# `nn.Identity`, records nothing to restore, and the model is left without its activations, captioning wrongly from
# then on. Held only while swapping, never while the model runs.
_SWAP_LOCK = threading.Lock()


@lru_cache(maxsize=None)
def packed_linear_available(dtype: torch.dtype = torch.float32, activation: tuple[str, str] = ("none", "")) -> bool:
    """
    True where oneDNN's packed linear kernel exists and computes `activation(x @ W^T + b)` correctly in `dtype`, tried
    once on a small layer. Not every x86 CPU runs every dtype: without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, oneDNN
    refuses to pack a bfloat16 weight ("bf16 path needs the cpu support ..."), and such a CPU gets the plain layers.
    """
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(16, 32, generator=generator), torch.randn(16, generator=generator)
        inputs = torch.randn(3, 32, generator=generator)
        weight, bias, inputs = weight.to(dtype), bias.to(dtype), inputs.to(dtype)
        name, algorithm = activation
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, name, [], algorithm)
        expected = F.linear(inputs.float(), weight.float(), bias.float())
        if name == "gelu":
            expected = F.gelu(expected, approximate=algorithm if algorithm == "tanh" else "none")
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        return out.dtype == dtype and bool(torch.allclose(out.float(), expected, atol=tolerance, rtol=tolerance))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer as `F.linear` sees it: weight `(out, in)`. GPT-2's Conv1D stores its weight as `(in, out)`."""
    if isinstance(module, VisionGPTConv1D):
        return module.weight.t(), module.bias
    return module.weight, module.bias


def _packed_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The packed copy of `module`'s weight, in `dtype` (default: the weight's own)."""
    weight, _ = _weight_and_bias(module)
    dtype = dtype or weight.dtype
    # The tensor's identity, dtype and version counter change whenever the weight is replaced, cast or updated.
    key = (module.weight.data_ptr(), module.weight.dtype, _version(module.weight), dtype)
    cached = _PACKED.get(module)
    if cached is None or cached[0] != key:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous())
        cached = _PACKED[module] = (key, packed, _fingerprint(module.weight))
    return cached[1]


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A few of the weight's values, evenly spaced: (FINGERPRINT_SAMPLES,)."""
    flat = weight.detach().reshape(-1)
    steps = min(FINGERPRINT_SAMPLES, flat.numel())
    # Integer arithmetic: float positions round past the end of a tensor of more than 2**24 values.
    index = torch.arange(steps, device=flat.device) * (flat.numel() - 1) // max(steps - 1, 1)
    return flat[index].clone()


def _drop_stale_packed_weights(model: nn.Module) -> None:
    # torch's fused optimizers (transformers' default, adamw_torch_fused) update weights in place without bumping
    # their version counter, so the key above misses a training step; an update moves nearly every value, and a few
    # of them, compared when generation starts, catch it.
    for module in model.modules():
        cached = _PACKED.get(module)
        if cached is not None and not torch.equal(_fingerprint(module.weight), cached[2]):
            del _PACKED[module]


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # a tensor created under inference_mode has no version counter, and cannot be updated
        return 0


def _takes_packed_path(module: nn.Module, hidden_states: torch.Tensor, activation=("none", "")) -> bool:
    return not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()  # a compiled graph chooses its own kernels
        or hidden_states.device.type != "cpu"
        or hidden_states.dtype != module.weight.dtype
        or not packed_linear_available(hidden_states.dtype, activation)  # e.g. bfloat16 on an AVX2-only CPU
    )


def _packed_linear(
    module: nn.Module, hidden_states: torch.Tensor, activation=("none", ""), dtype: torch.dtype | None = None
) -> torch.Tensor:
    """
    The layer through oneDNN, computed in `dtype` (default: the weight's own) with `activation` as a post-op.
    `torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise` are torch's private oneDNN ops (the ones its own
    inductor CPU backend emits): no public op packs a weight. Callers reach this only after `packed_linear_available`
    ran them on this machine for this dtype and post-op; anywhere they are missing or refuse, the plain layer runs.
    """
    _, bias = _weight_and_bias(module)
    if dtype is not None:
        hidden_states, bias = hidden_states.to(dtype), None if bias is None else bias.to(dtype)
    name, algorithm = activation
    return torch.ops.mkldnn._linear_pointwise(hidden_states, _packed_weight(module, dtype), bias, name, [], algorithm)


def _packed_forward(module: nn.Module, float32_output: bool = False, activation: nn.Module | None = None):
    """`module`'s forward through oneDNN; with `activation`, followed by it (fused as a post-op where oneDNN can)."""
    plain_forward = module.forward
    dtype = torch.float32 if float32_output and module.weight.dtype == torch.bfloat16 else None
    post_op = _onednn_gelu(activation) if activation is not None else ("none", "")

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if _takes_packed_path(module, hidden_states, post_op) and (dtype is None or packed_linear_available(dtype)):
            return _packed_linear(module, hidden_states, post_op, dtype=dtype)
        out = plain_forward(hidden_states)
        return out if activation is None else activation(out)

    forward.is_vision_gpt_packed = True
    return forward


# MLP blocks whose forward is `second(activation(first(x)))`, by class name: (first, activation). The activation moves
# into the first layer inside `packed_linears`, and the block's own activation is the identity meanwhile.
_MLPS = {
    "VisionGPTTextMLP": ("c_fc", "act"),  # GPT-2's (gpt2_vision_gpt.py)
    "VisionGPTMLP": ("fc1", "act"),  # the mapper's
    "ViTMLP": ("fc1", "activation_fn"),
    "CLIPMLP": ("fc1", "activation_fn"),
    "SiglipMLP": ("fc1", "activation_fn"),
    "Dinov2MLP": ("fc1", ("activation_fn", "activation")),  # `activation` before transformers 5.18
}


def _onednn_gelu(activation: nn.Module) -> tuple[str, str] | None:
    """oneDNN's post-op computing `activation` ("gelu" and its algorithm), or None if it has none."""
    if isinstance(activation, nn.GELU):
        return "gelu", "tanh" if activation.approximate == "tanh" else "none"
    if isinstance(activation, GELUActivation):  # x Phi(x), with erf, whether in C or in Python
        return "gelu", "none"
    if isinstance(activation, (NewGELUActivation, GELUTanh)):
        return "gelu", "tanh"  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the formula of both
    return None


def _fusable_mlp(module: nn.Module) -> tuple[nn.Module, str, nn.Module] | None:
    """(first layer, activation attribute name, activation) of an MLP whose GELU can move into its first layer."""
    cls = type(module)
    ours_or_transformers = cls.__module__.startswith("transformers.") or cls.__module__.endswith("_vision_gpt")
    names = _MLPS.get(cls.__name__) if ours_or_transformers else None
    if names is None:
        return None
    first = getattr(module, names[0], None)
    activation_names = names[1] if isinstance(names[1], tuple) else (names[1],)
    activation_name = next((name for name in activation_names if hasattr(module, name)), None)
    activation = getattr(module, activation_name) if activation_name else None
    if first is None or not _eligible(first) or not isinstance(activation, nn.Module) or _onednn_gelu(activation) is None:
        return None
    return first, activation_name, activation


def _eligible(module: nn.Module) -> bool:
    if not isinstance(module, (nn.Linear, VisionGPTConv1D)) or type(module).forward not in (
        nn.Linear.forward, VisionGPTConv1D.forward
    ):
        return False  # a subclass (e.g. a quantized or LoRA layer) computes something else
    if "forward" in module.__dict__:
        return False  # already wrapped, e.g. by an Accelerate offloading hook
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype in _PACKED_DTYPES and not weight.is_meta


@contextmanager
def packed_linears(
    model: nn.Module, enabled: bool = True, float32_layers: tuple[nn.Module, ...] = (), fuse_gelu: bool = True
):
    """
    Inside the block, every plain `nn.Linear` and GPT-2 `VisionGPTConv1D` of `model` on the CPU runs oneDNN with packed
    weights, and (with `fuse_gelu`) the GELU of known MLP blocks runs inside their first layer: the layer computes it,
    and the block's activation is an `nn.Identity` meanwhile (a submodule swap, restored at the end). Each call checks
    that oneDNN runs its dtype and post-op on this CPU (`packed_linear_available`) and otherwise computes the plain
    layer (and activation): the same results, never an error. Calls with gradients enabled take the plain path too.
    Layers in `float32_layers` whose weights are bfloat16 compute and return float32. Does nothing where the kernels
    are unavailable or when `enabled` is False. Re-entrant and thread-safe: nested or concurrent blocks on the same
    model (several threads generating with one model) keep the first block's settings and restore the plain layers
    only when the last one ends.
    """
    if not enabled or not packed_linear_available():
        yield
        return
    with _SWAP_LOCK:
        depth = getattr(model, "_vision_gpt_packed_depth", 0)
        if depth == 0:
            _drop_stale_packed_weights(model)
            float32_ids = {id(layer) for layer in float32_layers}
            fused = {}  # first layer -> its MLP's activation
            swapped = []
            for module in model.modules():
                found = _fusable_mlp(module) if fuse_gelu else None
                if found is not None:
                    first, name, activation = found
                    fused[first] = activation
                    swapped.append((module, name, activation))
            for module in model.modules():
                if _eligible(module):
                    # An instance attribute of a torch or vision-gpt layer: shadows its class's method.
                    module.forward = _packed_forward(module, id(module) in float32_ids, fused.get(module))
            for module, name, _ in swapped:
                setattr(module, name, nn.Identity())
            model._vision_gpt_packed_swapped = swapped
        model._vision_gpt_packed_depth = depth + 1
    try:
        yield
    finally:
        with _SWAP_LOCK:
            model._vision_gpt_packed_depth -= 1
            if model._vision_gpt_packed_depth == 0:
                for module, name, activation in model.__dict__.pop("_vision_gpt_packed_swapped", ()):
                    setattr(module, name, activation)
                for module in model.modules():
                    if getattr(module.__dict__.get("forward"), "is_vision_gpt_packed", False):
                        del module.forward


def release_packed_weights(model: nn.Module) -> None:
    """Free the packed weight copies that `packed_linears` keeps on `model`'s layers."""
    for module in model.modules():
        _PACKED.pop(module, None)


def has_packed_weight(module: nn.Module) -> bool:
    """Whether `packed_linears` holds a packed copy of `module`'s weight."""
    return module in _PACKED
