"""Training with transformers' `Trainer`: arguments (`HfArgumentParser` dataclasses, YAML/JSON configs), the trainer
and its callbacks, checkpoints, the feature cache, LoRA adapters, and `main(argv)`, the whole run."""

from .train import main

__all__ = ["main"]
