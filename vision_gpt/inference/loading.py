"""The one loader: a model and its processor for every command and for `VisionGPTCaptioner`.

`load_model` reads a PyTorch folder or Hub id (`runtime="torch"`) or an ONNX export (`runtime="onnx"`), in one
vocabulary of dtypes, on one choice of device, and runs a repo's own Python only when asked to
(`trust_remote_code=True`, the `--trust-remote-code` flag), as transformers does. `import vision_gpt` registers
VisionGPT with the Auto classes, so a vision-gpt repo loads with this package's code and needs no remote code.
"""

import logging

import torch

from . import hardware

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx")
# The dtypes of PyTorch models, by their torch names; the short names are aliases.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# An ONNX export's graphs (`vision-gpt export-onnx --dtype fp16 --quantize int8`): float32, float16, and the dynamic
# int8 graphs under both of transformers.js's names.
ONNX_DTYPES = {"float32": "fp32", "float16": "fp16", "int8": "int8", "q8": "q8"}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# What `--dtype` accepts, for help texts and argparse's `choices`.
DTYPE_CHOICES = (*DTYPES, *DTYPE_ALIASES, "int8", "q8")
DTYPE_HELP = ("float32|fp32 (default), bfloat16|bf16 (GPUs, and CPUs with native bf16: AVX-512 BF16 or AMX on x86; "
              "slower than float32 on others), float16|fp16|half (GPUs); with --runtime onnx: float32, float16, or "
              "int8|q8 (the graphs of `export-onnx --quantize int8`)")
REMOTE_CODE_HELP = ("run the Python code stored in the model repo (its auto_map) instead of this package's; only for "
                    "repos you trust")


class RemoteCodeError(ValueError):
    """A repo that needs its own Python code to load, which was not trusted."""


def dtype_name(dtype: str, runtime: str = "torch") -> str:
    """The canonical name of `dtype` (an alias like `bf16` or a torch dtype's name) for `runtime`, or a ValueError
    that lists what the runtime takes."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}.")
    name = str(dtype).removeprefix("torch.").lower()
    name = DTYPE_ALIASES.get(name, name)
    if runtime == "onnx":
        if name not in ONNX_DTYPES:
            raise ValueError(f"dtype {dtype} is not one of an ONNX export's: float32|fp32, float16|fp16|half, int8, "
                             "q8.")
        return name
    if name in ("int8", "q8"):
        raise ValueError(f"dtype {dtype} is a quantized ONNX export's: use runtime onnx (--runtime onnx) with the "
                         "folder `vision-gpt export-onnx --quantize int8` wrote.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype} is not one of float32|fp32, bfloat16|bf16, float16|fp16|half.")
    return name


def check_runtime(runtime: str, dtype: str, device) -> str:
    """The canonical dtype for `runtime` (see `dtype_name`), with the device checked against the runtime: ONNX
    Runtime runs on the CPU. Callers that load later (a Ray actor) call it first, to fail before any work."""
    name = dtype_name(dtype, runtime)
    if runtime == "onnx" and str(device) not in ("auto", "cpu"):
        raise ValueError(f"The onnx runtime runs on ONNX Runtime's CPU provider, not device {device}; use cpu or "
                         "auto.")
    return name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: the accelerator when there is one (CUDA, MPS, XPU, ...), else the CPU; otherwise the device named,
    checked to exist."""
    if str(device) == "auto":
        return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine; use cpu or auto.")
    return resolved


def warn_if_emulated_bf16(dtype: str, device: torch.device) -> bool:
    """Warn (once per call) when bf16 is asked for on a CPU that only emulates it; True if it warned."""
    if dtype != "bfloat16" or torch.device(device).type != "cpu" or hardware.cpu_bf16_is_native():
        return False
    logger.warning("dtype bfloat16 on the CPU: %s; float32 (the default) is faster here.",
                   hardware.describe_cpu_bf16())
    return True


def load_model(model: str, *, runtime: str = "torch", dtype: str = "float32", device: str | torch.device = "auto",
               revision: str | None = None, trust_remote_code: bool = False):
    """
    `(model, processor)` from `model`: a folder written by `save_pretrained`, `vision-gpt assemble`, a training run,
    or a Hub id (at `revision`); with `runtime="onnx"`, a folder written by `vision-gpt export-onnx`, run by ONNX
    Runtime on the CPU (an `ONNXCaptioner`, which generates as a PyTorch model does). The PyTorch model is in eval
    mode, in `dtype` (see `dtype_name`), on `device` (`"auto"`: the accelerator when there is one).

    A repo whose model only its own code can build (an `auto_map` and a model type this package does not register)
    is refused unless `trust_remote_code=True`, with a `RemoteCodeError` that says so. Any other model that cannot be
    loaded is a ValueError naming it.

    Example:

    ```python
    >>> from vision_gpt.inference.loading import load_model
    >>> model, processor = load_model("user/vision-gpt-flickr8k", dtype="bf16")
    ```"""
    name = check_runtime(runtime, dtype, device)
    if runtime == "onnx":
        return _load_onnx(model, name, revision)
    device = resolve_device(device)
    warn_if_emulated_bf16(name, device)
    from transformers import AutoModel, AutoProcessor

    try:
        loaded = AutoModel.from_pretrained(model, revision=revision, dtype=DTYPES[name],
                                           trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if not trust_remote_code and "trust_remote_code" in str(error):
            raise RemoteCodeError(
                f"The model '{model}' needs the Python code stored in its repo to load (its config's auto_map names "
                "classes this package does not provide). Read that code first; if you trust it, pass "
                "--trust-remote-code (trust_remote_code=True in Python).") from None
        raise ValueError(f"Could not load the model '{model}': {_first_line(error)}") from None
    except OSError as error:
        raise ValueError(f"Could not load the model '{model}': {_first_line(error)} Pass a folder written by "
                         "save_pretrained (or `vision-gpt assemble`, or a training run), or a Hub id; offline "
                         "(HF_HUB_OFFLINE=1) a Hub model must already be in the cache; for an ONNX export, use the "
                         "onnx runtime (--runtime onnx).") from None
    return loaded.to(device).eval(), processor


def _load_onnx(folder: str, name: str, revision):
    from .onnx_runtime import ONNXCaptioner

    if revision is not None:
        raise ValueError("The onnx runtime reads a local export folder, which has no revisions; drop the revision.")
    try:
        model = ONNXCaptioner(folder, dtype=ONNX_DTYPES[name])
    except (ImportError, OSError) as error:
        raise ValueError(f"Could not load the ONNX export '{folder}': {error}") from None
    return model, model.processor


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


__all__ = ["DTYPES", "DTYPE_ALIASES", "ONNX_DTYPES", "RUNTIMES", "RemoteCodeError", "check_runtime", "dtype_name",
           "load_model", "resolve_device", "warn_if_emulated_bf16"]
