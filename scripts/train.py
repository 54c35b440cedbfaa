"""Train a vision-gpt captioner: `accelerate launch scripts/train.py --help`, or with one JSON/YAML config file."""

from vision_gpt.training.train import main

if __name__ == "__main__":
    main()
