"""
Faster linear layers for CPU inference: oneDNN matrix multiplication with weights packed once into its blocked layout.

Why: on the x86 CPUs we measured (AMD EPYC, AVX-512 + BF16), `aten::addmm` and `F.linear` go through MKL, which is slow
at the small row counts of decoding. At 8 rows, GPT-2's 768x3072 layer takes 0.47 ms there and 0.19 ms with packed
oneDNN weights, the 768x50257 LM head 23 ms and 5.6 ms; at the ViT's 1576 rows the gain is about 15% (fp32 and bf16).
The arithmetic is the same matrix product, so outputs match the plain layers up to float rounding.

Only used under `torch.no_grad()` / `torch.inference_mode()` on CPU tensors in float32 or bfloat16: training,
autograd and GPU models never take this path. The packed copy of each weight is kept for its module and rebuilt when the
weight changes (new tensor, dtype, or an in-place update), so it costs one extra copy of the packed weights in memory.
"""

import platform
import weakref
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
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


def _packed_weight(module: nn.Module) -> torch.Tensor:
    weight, _ = _weight_and_bias(module)
    # The tensor's identity, dtype and version counter change whenever the weight is replaced, cast or updated.
    key = (module.weight.data_ptr(), module.weight.dtype, _version(module.weight))
    cached = _PACKED.get(module)
    if cached is None or cached[0] != key:
        cached = _PACKED[module] = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous()))
    return cached[1]


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # a tensor created under inference_mode has no version counter, and cannot be updated
        return 0


def _packed_forward(module: nn.Module):
    plain_forward = module.forward

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()  # a compiled graph chooses its own kernels
            or hidden_states.device.type != "cpu"
            or hidden_states.dtype != module.weight.dtype
        ):
            return plain_forward(hidden_states)
        _, bias = _weight_and_bias(module)
        return torch.ops.mkldnn._linear_pointwise(hidden_states, _packed_weight(module), bias, "none", [], "")

    forward.is_vision_gpt_packed = True
    return forward


def _eligible(module: nn.Module) -> bool:
    if not isinstance(module, (nn.Linear, Conv1D)) or type(module).forward not in (nn.Linear.forward, Conv1D.forward):
        return False  # a subclass (e.g. a quantized or LoRA layer) computes something else
    if "forward" in module.__dict__:
        return False  # already wrapped, e.g. by an Accelerate offloading hook
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype in _PACKED_DTYPES and not weight.is_meta


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True):
    """
    Inside the block, every plain `nn.Linear` and GPT-2 `Conv1D` of `model` on the CPU runs oneDNN with packed weights
    (calls with gradients enabled still take the plain path). Does nothing where the kernels are unavailable or when
    `enabled` is False. Re-entrant: nested or concurrent blocks on the same model restore the plain layers only when the
    last one ends.
    """
    if not enabled or not packed_linear_available():
        yield
        return
    depth = getattr(model, "_vision_gpt_packed_depth", 0)
    if depth == 0:
        for module in model.modules():
            if _eligible(module):
                module.forward = _packed_forward(module)  # an instance attribute: shadows the class's method
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
