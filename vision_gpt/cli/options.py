"""Flags that several commands share, defined once so that they read the same everywhere."""

from ..inference.loading import DTYPE_CHOICES, DTYPE_HELP, REMOTE_CODE_HELP, RUNTIMES


def add_loading_options(group, *, model_help: str, runtime: bool = True, device_help: str | None = None) -> None:
    """`--model`, `--dtype`, `--runtime`, `--device` and `--trust-remote-code`: what `load_model` takes."""
    group.add_argument("--model", required=True, metavar="FOLDER_OR_ID", help=model_help)
    group.add_argument("--dtype", type=str.lower, choices=DTYPE_CHOICES, default="float32", metavar="DTYPE",
                       help="weights' and compute precision: " + DTYPE_HELP)
    if runtime:
        group.add_argument("--runtime", choices=RUNTIMES, default="torch",
                           help="torch: a PyTorch model folder or Hub id; onnx: a folder written by `vision-gpt "
                                "export-onnx`, run by ONNX Runtime on the CPU (pip install 'vision-gpt[onnx]')")
    group.add_argument("--device", default="auto",
                       help=device_help or "cpu, cuda, cuda:N or auto (the accelerator when there is one)")
    add_trust_remote_code(group)


def add_trust_remote_code(group) -> None:
    group.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                       help=REMOTE_CODE_HELP)
