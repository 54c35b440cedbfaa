"""Publishing a model: Hub-ready repos with a model card (`export_repo`), uploads (`push_folder`), ONNX graphs, and
the conversion of transformers' ViT-GPT2 `VisionEncoderDecoderModel` checkpoints."""

from .hub import push_folder
from .repo import export_repo

__all__ = ["export_repo", "push_folder"]
