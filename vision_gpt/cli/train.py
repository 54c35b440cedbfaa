"""`vision-gpt train`: training's flags are `vision_gpt.training`'s HfArgumentParser dataclasses, parsed there."""

from .options import HelpFormatter, add_command

HELP = "train a captioner with transformers' Trainer, from flags or a YAML/JSON config file"
DESCRIPTION = """\
Train a vision-gpt captioner with transformers' Trainer and export it as Hub-ready FP32/FP16 repos.

The flags are three HfArgumentParser dataclasses: the model (towers, fusion, freezing, LoRA), the
data (dataset layout, shards, feature cache, caption metrics) and transformers' TrainingArguments.
One YAML or JSON file may stand for all of them. `vision-gpt train --help` lists every flag.

examples:
  vision-gpt train configs/flickr8k.yaml
  vision-gpt train --vision-model google/vit-base-patch16-224-in21k --text-model gpt2 \\
      --dataset flickr8k --data-dir /data/flickr8k --output-dir vision-gpt-flickr8k
  accelerate launch --multi-gpu --num-processes 4 -m vision_gpt.cli train configs/flickr8k.yaml"""


def register(subparsers) -> None:
    # Listed here for `vision-gpt --help`; `main` hands `vision-gpt train ...` to `run` before this parser sees it.
    add_command(subparsers, "train", help=HELP, description=DESCRIPTION, add_help=False)


def run(argv) -> int:
    from ..training import main

    main(argv, prog="vision-gpt train", description=DESCRIPTION, formatter_class=HelpFormatter)
    return 0
