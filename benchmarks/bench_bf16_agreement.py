"""Do bf16 captions agree with fp32 captions? Greedy captions of a trained model on a dataset split, in both dtypes.

Prints the share of images whose bf16 caption is identical to the fp32 one (bf16 as `generate` runs it, with float32
logits, and with `float32_logits=False`), each one's caption metrics, and its images/s (including image decoding and
preprocessing).

    python benchmarks/bench_bf16_agreement.py --model vision-gpt-demo/model --data-dir vision-gpt-demo/shapes --split test
"""

import argparse
import time

import torch

from vision_gpt import VisionGPTForConditionalGeneration, VisionGPTProcessor
from vision_gpt.data import load_captioning_dataset
from vision_gpt.evaluation import compute_caption_metrics
from vision_gpt.training import generate_captions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved vision-gpt model folder or Hub id")
    parser.add_argument("--dataset", default="auto", help="flickr8k, flickr30k, coco, auto, or a `datasets` id/folder")
    parser.add_argument("--data-dir", help="the dataset folder (Flickr8k, Karpathy or COCO layout)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, help="only the first N images of the split")
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
    captions, rows = {}, []
    for name, dtype, extra in variants:
        model = VisionGPTForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval()
        with torch.inference_mode():
            generate_captions(model, processor, images[: args.batch_size], **settings, **extra)  # warm-up
            start = time.perf_counter()
            predictions, references = generate_captions(model, processor, images, **settings, **extra)
            seconds = time.perf_counter() - start
        captions[name] = predictions
        rows.append((name, len(images) / seconds, compute_caption_metrics(predictions, references)))

    print(f"{args.model}, {args.split} split, {len(images)} images, greedy, {args.max_new_tokens} new tokens at most\n")
    print("| dtype | captions identical to float32 | img/s | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |")
    print("|---|---|---|---|---|---|---|")
    for name, speed, metrics in rows:
        same = sum(captions[name][i] == captions["float32"][i] for i in captions["float32"])
        print(f"| {name} | {same}/{len(images)} ({100 * same / len(images):.1f}%) | {speed:.1f} | "
              f"{metrics['BLEU-4']:.1f} | {metrics['METEOR']:.1f} | {metrics['ROUGE-L']:.1f} | {metrics['CIDEr-D']:.1f} |")

if __name__ == "__main__":
    main()
