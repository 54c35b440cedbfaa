"""`vision-gpt caption` over many images: the plain command, Ray with 1 and 2 actors, and `accelerate launch` with 2
processes, on this machine.

Each run is the whole command in a process of its own, as a user starts it: the wall time includes loading the model
and, for Ray, starting a local Ray instance and its actors. The output file shows when the first row arrived (start-up
plus the first batch) and the steady rate after it, measured the same way for every engine. From the two, the table
gives where each engine would overtake the plain command: the number of images past which its higher steady rate pays
for its later start.

    python benchmarks/bench_scale.py                         # 512 images, random ViT-B/16 + GPT-2 small, greedy
    python benchmarks/bench_scale.py --model ./my-model --images 2048 --num-beams 3
    python benchmarks/bench_scale.py --quick --runs cli ray1 # tiny model, 16 images: a check that it runs
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_app_burst import save_random_model  # noqa: E402

RUNS = {
    "cli": ("vision-gpt caption", []),
    "ray1": ("--engine ray, 1 actor", ["--engine", "ray", "--num-workers", "1"]),
    "ray2": ("--engine ray, 2 actors", ["--engine", "ray", "--num-workers", "2"]),
    "accelerate2": ("accelerate launch, 2 processes", None),
}
DONE = re.compile(r"done: (\d+) captioned in ([\d.]+) s")


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """`count` JPEG photos-to-be: smooth random colour fields at 320x240, as cheap to decode as small photos."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir()
    for index in range(count):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 240), Image.BILINEAR).save(folder / f"{index:05d}.jpg", quality=90)


def command_for(run: str, images: Path, model: str, output: Path, args) -> list[str]:
    caption = ["caption", str(images), "--model", model, "--output", str(output), "--batch-size",
               str(args.batch_size), "--num-beams", str(args.num_beams), "--max-new-tokens", str(args.max_new_tokens)]
    if run == "accelerate2":
        accelerate = str(Path(sys.executable).parent / "accelerate")
        return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vision_gpt.cli", *caption,
                "--num-workers", "0"]
    return [sys.executable, "-m", "vision_gpt.cli", *caption, *RUNS[run][1]]


def rows_written(output: Path) -> int:
    """Rows in the output and in the part files that the processes of `accelerate launch` write next to it."""
    files = [output, *output.parent.glob(f"{output.stem}.part-*{output.suffix}")]
    total = 0
    for path in files:
        try:
            total += path.read_bytes().count(b"\n")
        except FileNotFoundError:  # a part file merged and deleted between the listing and the read
            pass
    return total


def measure(run: str, images: Path, model: str, workdir: Path, count: int, args) -> dict:
    """Wall time of the whole command, and when its first and last rows were written: rows are appended and flushed
    as batches finish (into part files under `accelerate launch`), so the files show when captioning really began
    (after start-up, model loading and the first batch) and its steady rate after that, the same way for every
    engine."""
    output = workdir / f"{run}.jsonl"
    command = command_for(run, images, model, output, args)
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first = first_rows = last = None
    while process.poll() is None and last is None:
        time.sleep(0.1)
        written = rows_written(output)
        if written and first is None:
            first, first_rows = time.time() - started, written
        if written >= count:
            last = time.time() - started
    stderr = process.communicate()[1]
    wall = time.time() - started
    done = DONE.search(stderr)
    if process.returncode != 0 or done is None or int(done.group(1)) != count:
        sys.exit(f"{run} failed (exit {process.returncode}):\n{stderr[-3000:]}")
    if first is None or last is None or last <= first:  # it finished between two looks
        first = last = first or wall
        first_rows = count
    steady = (count - first_rows) / (last - first) if count > first_rows else float("nan")
    return {"run": run, "wall": wall, "first": first, "first_rows": first_rows, "last": last, "steady": steady}


def crossover(run: dict, base: dict) -> str:
    """Images past which `run` would finish before `base`: each is modelled as its time to the first row plus the
    rest at its steady rate."""
    if run is base:
        return "-"
    if not run["steady"] > base["steady"]:
        return "never (not faster per image)"
    extra_start = run["first"] - base["first"]
    if extra_start <= 0:
        return "always"
    return f"{extra_start / (1 / base['steady'] - 1 / run['steady']):.0f} images"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or Hub id (default: a random ViT-B/16 + GPT-2 small model, built "
                                        "here)")
    parser.add_argument("--images", type=int, help="images to caption (default 512; 16 with --quick)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="what to run (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=1, help="default 1 (greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a random tiny model (and 16 images): a check that it runs")
    args = parser.parse_args(argv)
    count = args.images or (16 if args.quick else 512)
    if count < 1 or args.batch_size < 1:
        parser.error("--images and --batch-size must be at least 1")

    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        model = args.model or save_random_model(str(workdir / "model"), base=not args.quick)
        write_images(workdir / "images", count)
        results = []
        for run in args.runs:
            results.append(measure(run, workdir / "images", model, workdir, count, args))
            print(f"{run}: {results[-1]['wall']:.1f} s", file=sys.stderr, flush=True)

    name = args.model or ("random tiny model" if args.quick else "random ViT-B/16 + GPT-2 small model")
    print(f"\n{count} images (320x240 JPEG), {name}, float32, batch size {args.batch_size}, {args.num_beams} beam(s), "
          f"{args.max_new_tokens} new tokens at most; {os.cpu_count()} CPUs")
    base = results[0]
    print(f"| run | wall s | first row at s | last row at s | steady images/s | images/s (wall) | vs {base['run']} "
          f"(wall) | faster than {base['run']} past |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        print(f"| {RUNS[result['run']][0]} | {result['wall']:.1f} | {result['first']:.1f} | {result['last']:.1f} | "
              f"{result['steady']:.2f} | {count / result['wall']:.2f} | {base['wall'] / result['wall']:.2f}x | "
              f"{crossover(result, base)} |")
    return results


if __name__ == "__main__":
    main()
