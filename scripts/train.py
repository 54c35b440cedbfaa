"""Train a vision-gpt captioner: `accelerate launch scripts/train.py --help`, or with one JSON/YAML config file.
The same as `vision-gpt train` (and `accelerate launch -m vision_gpt.cli train`)."""

import sys

from vision_gpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
