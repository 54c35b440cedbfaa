"""Caption quality of each fusion design at demo scale: the demo's corpus, towers and recipe, one design at a time.

Needs a demo folder (`vision-gpt demo` makes one). Each design is trained with the demo's settings (same towers, data,
seed, epochs; everything trains, since the demo's towers start random), then captions the test split greedily, and
one table compares them. About 7 minutes of training per design on 2 CPU cores; a trained design is reused.

    python benchmarks/bench_fusions.py --workdir vision-gpt-demo
    python benchmarks/bench_fusions.py --workdir vision-gpt-demo --designs cross_attention/patches prefix/queries/8
"""

import argparse
import json
import time
from pathlib import Path

import torch

from vision_gpt import VisionGPTForConditionalGeneration, VisionGPTProcessor
from vision_gpt.data.factory import load_captioning_dataset
from vision_gpt.demo import training_argv
from vision_gpt.evaluation.metrics import compute_caption_metrics
from vision_gpt.modeling.configuration_vision_gpt import FUSIONS, VISUAL_TOKENS
from vision_gpt.inference.generation import generate_captions
from vision_gpt.training.train import main as train

DEMO_DESIGN = {"fusion": "prefix", "visual_tokens": "patches"}  # what `vision-gpt demo` trains
DESIGNS = ["prefix/patches", "cross_attention/patches", "prefix/queries/32", "prefix/queries/8", "prefix/merged"]


def parse_design(text: str) -> dict:
    """"fusion/visual_tokens[/K]" -> config fields."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or parts[0] not in FUSIONS or parts[1] not in VISUAL_TOKENS:
        raise argparse.ArgumentTypeError(
            f"design {text!r}: expected fusion/visual_tokens[/K] with fusion in {list(FUSIONS)} and visual_tokens in "
            f"{list(VISUAL_TOKENS)}, e.g. prefix/queries/32")
    design = {"fusion": parts[0], "visual_tokens": parts[1]}
    if len(parts) == 3:
        if not parts[2].isdigit() or int(parts[2]) < 1:
            raise argparse.ArgumentTypeError(f"design {text!r}: K must be a positive integer")
        design["num_visual_tokens"] = int(parts[2])
    return design


def design_argv(workdir: Path, design: dict, output_dir: Path, settings: dict) -> list[str]:
    argv = training_argv(str(workdir / "towers" / "vit"), str(workdir / "towers" / "gpt2"), str(workdir / "shapes"),
                         output_dir, settings)
    for name, value in design.items():
        flag = f"--{name}"
        if flag in argv:
            argv[argv.index(flag) + 1] = str(value)
        else:
            argv += [flag, str(value)]
    return argv


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="vision-gpt-demo", help="a folder `vision-gpt demo` has filled")
    parser.add_argument("--designs", nargs="+", type=parse_design, default=[parse_design(d) for d in DESIGNS],
                        metavar="FUSION/VISUAL_TOKENS[/K]", help=f"default: {' '.join(DESIGNS)}")
    parser.add_argument("--max-steps", type=int, help="train each design this many steps (default: the demo's)")
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps {args.max_steps}: must be at least 1")

    workdir = Path(args.workdir)
    settings_file = workdir / "model" / "demo_settings.json"
    if not settings_file.is_file():
        parser.error(f"--workdir {workdir}: no {settings_file}; run `vision-gpt demo --workdir {workdir}` first")
    settings = json.loads(settings_file.read_text())
    if args.max_steps is not None:
        settings["max_steps"] = args.max_steps
    test = load_captioning_dataset("flickr8k", str(workdir / "shapes"))[0]["test"]

    rows = []
    for design in args.designs:
        name = "-".join(str(value) for value in design.values())
        output_dir = workdir / "fusions" / name
        marker = output_dir / "design_settings.json"
        minutes = None
        if design == DEMO_DESIGN and args.max_steps is None:
            output_dir = workdir / "model"  # the demo trained this one already
        elif not (marker.is_file() and json.loads(marker.read_text()) == {**settings, **design}):
            start = time.perf_counter()
            train(design_argv(workdir, design, output_dir, settings))
            minutes = (time.perf_counter() - start) / 60
            marker.write_text(json.dumps({**settings, **design}))
        model = VisionGPTForConditionalGeneration.from_pretrained(output_dir, dtype=torch.float32).eval()
        processor = VisionGPTProcessor.from_pretrained(output_dir)
        with torch.inference_mode():
            predictions, references = generate_captions(model, processor, test, batch_size=64, num_beams=1,
                                                        do_sample=False, max_new_tokens=32)
        metrics = compute_caption_metrics(predictions, references)
        rows.append((design, model.config.num_image_tokens, metrics, minutes))

    print(f"\n{workdir}: {len(test)} test images, greedy; training: {settings}\n")
    print("| fusion | visual tokens | tokens per image | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | training minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for design, tokens, metrics, minutes in rows:
        kind = design["visual_tokens"] + (f" (K={design['num_visual_tokens']})" if "num_visual_tokens" in design else "")
        trained = f"{minutes:.1f}" if minutes is not None else "reused"
        print(f"| {design['fusion']} | {kind} | {tokens} | {metrics['BLEU-4']:.1f} | {metrics['METEOR']:.1f} | "
              f"{metrics['ROUGE-L']:.1f} | {metrics['CIDEr-D']:.1f} | {trained} |")


if __name__ == "__main__":
    main()
