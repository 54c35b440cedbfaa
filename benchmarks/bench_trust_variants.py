"""The trust scores' alternatives, measured on the same captions as `bench_trust.py`: which would separate wrong
captions from right ones better than the shipped `confidence` and `grounding`?

For each model, greedy captions of a shapes corpus's test images (up to 32 new tokens), and AUROC (a clean caption
scoring above a wrong one; 0.5 is chance) against the two kinds of wrong caption `bench_trust.py` counts, for:

- **other "no image" inputs for grounding** (the shipped one is a blank image at the processor's mean colour):
  - `zero features`: the projector fed zeros instead of the vision tower's features;
  - `other images`: the caption's probability averaged over 8 other test images, log p(c | image) -
    log mean_k p(c | image_k), the PMI against the images' marginal rather than against one blank input;
- **word-level scores** instead of the caption's average:
  - `least likely token`: the lowest log p(token | image) in the caption;
  - `least grounded token`: the lowest per-token PMI;
  - `shape/colour words`: the mean log p and mean PMI of the tokens that name a shape or a colour (the corpus's own
    vocabulary: a score no general captioner could compute, measured as the best case);
- **reranking sampled candidates** (5 samples a caption, top-p 0.9, seed 0) by each shipped score, against the first
  sample: CIDEr-D, CHAIR-i and CHAIR-s of the captions kept.

    python benchmarks/bench_trust_variants.py --data-dir vision-gpt-demo/shapes --model demo=vision-gpt-demo/model
"""

import argparse
import json
import time
from pathlib import Path

import torch

from vision_gpt.data.factory import load_captioning_dataset
from vision_gpt.data.torch_datasets import pixel_values_for
from vision_gpt.datasets.shapes import COLORS, KINDS
from vision_gpt.evaluation.chair import caption_hallucinations, compute_chair, find_instance_annotations
from vision_gpt.evaluation.metrics import compute_caption_metrics
from vision_gpt.inference.generation import one_line
from vision_gpt.inference.loading import load_model
from vision_gpt.inference.trust import caption_trust, rerank_value

try:
    from bench_trust import auroc, colour_truth, model_specs
except ImportError:  # run as a module from the repository root
    from benchmarks.bench_trust import auroc, colour_truth, model_specs

NUM_OTHER_IMAGES = 8
VARIANTS = ("confidence", "grounding", "grounding, zero features", "grounding, other images", "least likely token",
            "least grounded token", "shape/colour words, log p", "shape/colour words, PMI")
RERANK = ("first sample", "confidence", "grounding", "combined")


@torch.no_grad()
def token_log_probs(model, processor, image_embeds, texts):
    """log p(token | visual tokens) of each caption's tokens, `(B, T - 1)`, with the mask of the scored ones and ids."""
    batch = processor(suffix=texts)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logits = model(input_ids=ids, attention_mask=mask, image_embeds=image_embeds, use_cache=False).logits[:, :-1].float()
    log_probs = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return log_probs, labels[:, 1:] != -100, ids[:, 1:]


@torch.no_grad()
def evaluate_model(name, path, data_dir, batch_size) -> dict:
    model, processor = load_model(path, dtype="float32", device="cpu")
    test = load_captioning_dataset("flickr8k", str(data_dir))[0]["test"]
    annotations = find_instance_annotations(data_dir)
    colours = colour_truth(data_dir)
    objects = {r.image_id: annotations.objects_for(r.image_id, r.image) for r in test}
    references = {r.image_id: r.captions for r in test}
    words = set(KINDS) | {kind + "s" for kind in KINDS} | set(COLORS)
    started = time.perf_counter()
    pixel_values = torch.cat([pixel_values_for(r.image, processor.image_processor) for r in test])
    chunks = [slice(start, start + batch_size) for start in range(0, len(test), batch_size)]
    embeds = torch.cat([model.get_image_features(pixel_values=pixel_values[c], return_dict=True).pooler_output
                        for c in chunks])
    features = model.get_image_features(pixel_values=pixel_values[:1], return_dict=True).last_hidden_state
    zero = model.get_image_features(vision_features=torch.zeros_like(features), return_dict=True).pooler_output
    blank = model.null_image_embeds(1)
    captions = []
    for c in chunks:
        captions += [one_line(text) for text in processor.batch_decode(
            model.generate(pixel_values=pixel_values[c], num_beams=1, max_new_tokens=32))]
    generator = torch.Generator().manual_seed(0)
    others = [(torch.arange(len(test)) + 1 + torch.randint(0, len(test) - 1, (len(test),), generator=generator))
              % len(test) for _ in range(NUM_OTHER_IMAGES)]  # never the caption's own image
    rows = []
    for c in chunks:
        texts, count = captions[c], len(captions[c])
        own, scored, ids = token_log_probs(model, processor, embeds[c], texts)
        without = token_log_probs(model, processor, blank.expand(count, -1, -1), texts)[0]
        zeroed = token_log_probs(model, processor, zero.expand(count, -1, -1), texts)[0]
        other = torch.stack([(token_log_probs(model, processor, embeds[perm[c]], texts)[0] * scored).sum(-1)
                             for perm in others])
        marginal = other.logsumexp(0) - torch.log(torch.tensor(float(NUM_OTHER_IMAGES)))
        n = scored.sum(-1)
        total = (own * scored).sum(-1)
        for i, text in enumerate(texts):
            s = scored[i]
            pmi = own[i] - without[i]
            named = torch.tensor([processor.tokenizer.decode([t]).strip().lower() in words for t in ids[i].tolist()]) & s
            rows.append({
                "caption": text,
                "confidence": float(total[i] / n[i]),
                "grounding": float(pmi[s].mean()),
                "grounding, zero features": float((own[i] - zeroed[i])[s].mean()),
                "grounding, other images": float((total[i] - marginal[i]) / n[i]),
                "least likely token": float(own[i][s].min()),
                "least grounded token": float(pmi[s].min()),
                # A caption that names no shape or colour has nothing to be wrong about: it ranks as clean.
                "shape/colour words, log p": float(own[i][named].mean()) if named.any() else 0.0,
                "shape/colour words, PMI": float(pmi[named].mean()) if named.any() else 0.0,
            })
    for record, row in zip(test, rows):
        row["hallucinated"] = bool(caption_hallucinations(row["caption"], objects[record.image_id],
                                                          annotations.vocabulary)["hallucinated"])
        named = {word for word in row["caption"].lower().split() if word in COLORS}
        row["wrong_colour"] = bool(named - colours[Path(record.image_id).name])
    result = {"model": name, "path": str(path), "num_captions": len(rows),
              "hallucinated": sum(r["hallucinated"] for r in rows), "wrong_colour": sum(r["wrong_colour"] for r in rows),
              "auroc": {label: {variant: auroc([r[variant] for r in rows if not r[label]],
                                               [r[variant] for r in rows if r[label]]) for variant in VARIANTS}
                        for label in ("hallucinated", "wrong_colour")}}
    # Sampled candidates, scored as `vision-gpt caption --rerank` scores them.
    torch.manual_seed(0)
    candidates = []
    for c in chunks:
        output = model.generate(pixel_values=pixel_values[c], do_sample=True, num_beams=1, top_p=0.9, top_k=0,
                                num_return_sequences=5, max_new_tokens=32, output_caption_scores=True)
        texts = [one_line(text) for text in processor.batch_decode(output.sequences)]
        trust = caption_trust(model, processor, pixel_values[c], output, texts)
        for i in range(len(texts) // 5):
            candidates.append([{"caption": texts[j], **trust[j], "combined": rerank_value(trust[j], "combined")}
                               for j in range(5 * i, 5 * i + 5)])
    result["rerank_samples"] = {}
    for choice in RERANK:
        picked = {record.image_id: (group[0] if choice == "first sample" else max(group, key=lambda r: r[choice]))
                  ["caption"] for record, group in zip(test, candidates)}
        chair = compute_chair(picked, objects, annotations.vocabulary)
        result["rerank_samples"][choice] = {"CIDEr-D": compute_caption_metrics(picked, references)["CIDEr-D"],
                                            "CHAIR-i": chair["CHAIR-i"], "CHAIR-s": chair["CHAIR-s"]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def print_tables(results: list[dict]) -> None:
    def fmt(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    print("\n### AUROC, hallucinated shape\n")
    print("| score | " + " | ".join(r["model"] for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for label in ("hallucinated", "wrong_colour"):
        if label == "wrong_colour":
            print("\n### AUROC, wrong colour\n")
            print("| score | " + " | ".join(r["model"] for r in results) + " |")
            print("|---|" + "---:|" * len(results))
        for variant in VARIANTS:
            print(f"| {variant} | " + " | ".join(fmt(r["auroc"][label][variant], 3) for r in results) + " |")
    print("\n### 5 sampled candidates (top-p 0.9), caption kept\n")
    print("| model | kept | CIDEr-D | CHAIR-i | CHAIR-s |")
    print("|---|---|---:|---:|---:|")
    for result in results:
        for choice, row in result["rerank_samples"].items():
            label = choice if choice == "first sample" else f"best {choice}"
            print(f"| {result['model']} | {label} | {fmt(row['CIDEr-D'], 1)} | {fmt(row['CHAIR-i'], 1)} | "
                  f"{fmt(row['CHAIR-s'], 1)} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="a shapes corpus (vision-gpt-demo/shapes)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a model to measure, named for the tables; give it several times")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-dir", type=Path, default=Path("trust-bench"))
    args = parser.parse_args(argv)
    models = model_specs(parser, args.model)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results = [evaluate_model(name, path, args.data_dir, args.batch_size) for name, path in models]
    print_tables(results)
    (args.output_dir / "trust_variants.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.output_dir / 'trust_variants.json'}")


if __name__ == "__main__":
    main()
