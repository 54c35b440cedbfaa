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
  each output tile while it is in cache, instead of as more passes over a `(tokens, 4 x hidden)` tensor (the README's
  Speed section has the measured gain);
- layers named in `float32_layers` (generate passes the LM head) compute from the exact float32 copy of their bfloat16
  weight and return float32, so that the next token is not chosen among logits rounded to bfloat16's 8 bits.
"""

import platform
import weakref
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation
from transformers.pytorch_utils import Conv1D

_PACKED_DTYPES = (torch.float32, torch.bfloat16)
# layer -> (weight key, packed weight). Kept outside the layers so that copying, pickling or saving a model never
# meets oneDNN's opaque tensors, and dropped with the layer.
_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


@lru_cache(maxsize=None)
def packed_linear_available() -> bool:
    """True where oneDNN's packed linear kernels exist and work (x86 CPUs with a oneDNN-enabled torch)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        weight, inputs = torch.ones(4, 8), torch.ones(2, 8)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        return bool(torch.allclose(torch.ops.mkldnn._linear_pointwise(inputs, packed, None, "none", [], ""),
                                   F.linear(inputs, weight)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer as `F.linear` sees it: weight `(out, in)`. GPT-2's Conv1D stores its weight as `(in, out)`."""
    if isinstance(module, Conv1D):
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
        cached = _PACKED[module] = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous()))
    return cached[1]


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # a tensor created under inference_mode has no version counter, and cannot be updated
        return 0


def _takes_packed_path(module: nn.Module, hidden_states: torch.Tensor) -> bool:
    return not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()  # a compiled graph chooses its own kernels
        or hidden_states.device.type != "cpu"
        or hidden_states.dtype != module.weight.dtype
    )


def _packed_linear(
    module: nn.Module, hidden_states: torch.Tensor, activation=("none", ""), dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The layer through oneDNN, computed in `dtype` (default: the weight's own) with `activation` as a post-op."""
    _, bias = _weight_and_bias(module)
    if dtype is not None:
        hidden_states, bias = hidden_states.to(dtype), None if bias is None else bias.to(dtype)
    name, algorithm = activation
    return torch.ops.mkldnn._linear_pointwise(hidden_states, _packed_weight(module, dtype), bias, name, [], algorithm)


def _packed_forward(module: nn.Module, float32_output: bool = False):
    plain_forward = module.forward
    dtype = torch.float32 if float32_output and module.weight.dtype == torch.bfloat16 else None

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if not _takes_packed_path(module, hidden_states):
            return plain_forward(hidden_states)
        return _packed_linear(module, hidden_states, dtype=dtype)

    forward.is_vision_gpt_packed = True
    return forward


# MLP blocks whose forward is `second(activation(first(x)))`, by class name: (first, activation, second). GPT-2's ends
# with a dropout, the identity outside training (in training the plain forward runs).
_MLPS = {
    "GPT2MLP": ("c_fc", "act", "c_proj"),
    "ViTMLP": ("fc1", "activation_fn", "fc2"),
    "CLIPMLP": ("fc1", "activation_fn", "fc2"),
    "SiglipMLP": ("fc1", "activation_fn", "fc2"),
    "Dinov2MLP": ("fc1", "activation_fn", "fc2"),
    "VisionGPTMLP": ("fc1", "act", "fc2"),
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


def _fused_mlp_forward(module: nn.Module):
    """`module`'s forward with its GELU applied inside the first layer's matrix product."""
    first_name, activation_name, second_name = _MLPS[type(module).__name__]
    first, second = getattr(module, first_name), getattr(module, second_name)
    activation = _onednn_gelu(getattr(module, activation_name))
    plain_forward = module.forward

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if module.training or not _takes_packed_path(first, hidden_states):
            return plain_forward(hidden_states)
        return second(_packed_linear(first, hidden_states, activation))

    forward.is_vision_gpt_packed = True
    return forward


def _fusable_mlp(module: nn.Module) -> bool:
    cls = type(module)
    ours_or_transformers = cls.__module__.startswith("transformers.") or cls.__module__.endswith("modeling_vision_gpt")
    names = _MLPS.get(cls.__name__) if ours_or_transformers else None
    if names is None or "forward" in module.__dict__:
        return False
    first, activation = getattr(module, names[0], None), getattr(module, names[1], None)
    return first is not None and _eligible(first) and activation is not None and _onednn_gelu(activation) is not None


def _eligible(module: nn.Module) -> bool:
    if not isinstance(module, (nn.Linear, Conv1D)) or type(module).forward not in (nn.Linear.forward, Conv1D.forward):
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
    Inside the block, every plain `nn.Linear` and GPT-2 `Conv1D` of `model` on the CPU runs oneDNN with packed weights,
    and (with `fuse_gelu`) the GELU of known MLP blocks runs inside their first layer (calls with gradients enabled, and
    MLPs in training mode, still take the plain path). Layers in `float32_layers` whose weights are bfloat16 compute and
    return float32. Does nothing where the kernels are unavailable or when `enabled` is False. Re-entrant: nested or
    concurrent blocks on the same model keep the outermost block's settings and restore the plain layers only when the
    last one ends.
    """
    if not enabled or not packed_linear_available():
        yield
        return
    depth = getattr(model, "_vision_gpt_packed_depth", 0)
    if depth == 0:
        float32_ids = {id(layer) for layer in float32_layers}
        mlps = [module for module in model.modules() if fuse_gelu and _fusable_mlp(module)]
        for module in model.modules():
            if _eligible(module):
                # An instance attribute: shadows the class's method.
                module.forward = _packed_forward(module, float32_output=id(module) in float32_ids)
        for module in mlps:
            module.forward = _fused_mlp_forward(module)
    model._vision_gpt_packed_depth = depth + 1
    try:
        yield
    finally:
        model._vision_gpt_packed_depth -= 1
        if model._vision_gpt_packed_depth == 0:
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
