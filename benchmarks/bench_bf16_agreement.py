"""Do bf16 captions agree with fp32 captions? Greedy captions of a trained model on a dataset split, in both dtypes,
and with `--onnx`, from its ONNX export in ONNX Runtime (fp32, fp16, int8).

Prints the share of images whose bf16 caption is identical to the fp32 one (bf16 as `generate` runs it, with float32
logits, and with `float32_logits=False`), each one's caption metrics, and its images/s (including image decoding and
preprocessing). With `--onnx FOLDER` (what `vision-gpt export-onnx MODEL FOLDER --dtype fp16 --quantize int8` wrote),
the same for every graph the export holds, and how many of its captions are identical to ONNX fp32's.

    python benchmarks/bench_bf16_agreement.py --model vision-gpt-demo/model --data-dir vision-gpt-demo/shapes --split test
    vision-gpt export-onnx vision-gpt-demo/model demo-onnx --dtype fp16 --quantize int8
    python benchmarks/bench_bf16_agreement.py --model vision-gpt-demo/model --data-dir vision-gpt-demo/shapes \
        --split test --onnx demo-onnx
"""

import argparse
import time

import torch

from vision_gpt import VisionGPTForConditionalGeneration, VisionGPTProcessor
from vision_gpt.data.factory import load_captioning_dataset
from vision_gpt.evaluation.metrics import compute_caption_metrics
from vision_gpt.inference.generation import generate_captions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved vision-gpt model folder or Hub id")
    parser.add_argument("--dataset", default="auto", help="flickr8k, flickr30k, coco, auto, or a `datasets` id/folder")
    parser.add_argument("--data-dir", help="the dataset folder (Flickr8k, Karpathy or COCO layout)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, help="only the first N images of the split")
    parser.add_argument("--onnx", help="an ONNX export of the model (`vision-gpt export-onnx`): its fp32, fp16 and "
                                       "int8 graphs too, those it holds")
    args = parser.parse_args(argv)

    splits, _ = load_captioning_dataset(args.dataset, args.data_dir)
    if args.split not in splits:
        parser.error(f"--split {args.split!r}: the dataset has {sorted(splits)}")
    images = splits[args.split][: args.limit]
    processor = VisionGPTProcessor.from_pretrained(args.model)
    settings = dict(num_beams=1, do_sample=False, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    # bf16 as generate runs it by default (the LM head in float32), and with bf16 logits.
    variants = [("float32", torch.float32, {}), ("bfloat16", torch.bfloat16, {}),
                ("bfloat16, bf16 logits", torch.bfloat16, {"float32_logits": False})]
    if args.onnx:
        variants += [(f"ONNX {dtype}", dtype, {}) for dtype in onnx_graphs(args.onnx)]
    captions, rows = {}, []
    for name, dtype, extra in variants:
        if name.startswith("ONNX"):
            from vision_gpt.inference.onnx_runtime import ONNXCaptioner

            model = ONNXCaptioner(args.onnx, dtype=dtype)
        else:
            model = VisionGPTForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval()
        with torch.inference_mode():
            generate_captions(model, processor, images[: args.batch_size], **settings, **extra)  # warm-up
            start = time.perf_counter()
            predictions, references = generate_captions(model, processor, images, **settings, **extra)
            seconds = time.perf_counter() - start
        captions[name] = predictions
        rows.append((name, len(images) / seconds, compute_caption_metrics(predictions, references)))

    print(f"{args.model}, {args.split} split, {len(images)} images, greedy, {args.max_new_tokens} new tokens at most\n")
    print("| dtype | captions identical to float32 | identical to ONNX fp32 | img/s | BLEU-4 | METEOR | ROUGE-L | "
          "CIDEr-D |")
    print("|---|---|---|---|---|---|---|---|")
    for name, speed, metrics in rows:
        onnx_fp32 = captions.get("ONNX fp32") if name.startswith("ONNX") else None
        same_onnx = agreement(captions[name], onnx_fp32) if onnx_fp32 else "-"
        scores = " | ".join(f"{metrics[key]:.1f}" for key in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"))
        print(f"| {name} | {agreement(captions[name], captions['float32'])} | {same_onnx} | {speed:.1f} | {scores} |")


def agreement(captions: dict, reference: dict) -> str:
    same = sum(captions[i] == reference[i] for i in reference)
    return f"{same}/{len(reference)} ({100 * same / len(reference):.1f}%)"


def onnx_graphs(folder) -> list[str]:
    """The dtypes (`fp32`, `fp16`, `int8`) whose graphs the export in `folder` holds."""
    from pathlib import Path

    from vision_gpt.export.onnx import SUFFIXES

    found = [dtype for dtype in ("fp32", "fp16", "int8")
             if (Path(folder) / "onnx" / f"decoder_model_merged{SUFFIXES[dtype]}.onnx").is_file()]
    if not found:
        raise SystemExit(f"--onnx {folder}: no onnx/decoder_model_merged*.onnx there; write it with "
                         "`vision-gpt export-onnx`.")
    return found

if __name__ == "__main__":
    main()
