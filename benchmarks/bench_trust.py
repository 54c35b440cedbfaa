"""How far the trust scores tell wrong captions from right ones, on a shapes corpus's test split.

For each model: greedy captions of the test images (up to 32 new tokens) with their `confidence` and `grounding`, as
`vision-gpt caption` writes them, and a combination of the two. Against the corpus's instance annotations each
caption either names a shape that is not in its image (a CHAIR hallucination) or not; against the shapes' colours,
either names a colour that no shape has or not. The benchmark prints, per model and score:

- AUROC: the chance that a clean caption scores higher than a wrong one (0.5 is chance);
- selective captioning: CHAIR-s and CIDEr-D of the captions kept when keeping the 100%, 90%, 80% and 50% with the
  highest score;
- reranking: 5 beams, all 5 returned, the best by each score kept, against beam search's own first (CIDEr-D,
  CHAIR-i, CHAIR-s);

and writes `trust.json` and `selective_captioning.png` into `--output-dir`.

    python benchmarks/bench_trust.py --data-dir vision-gpt-demo/shapes \
        --model demo=vision-gpt-demo/model --model from-scratch=vision-gpt-demo/model-from-scratch
"""

import argparse
import json
import time
from pathlib import Path

import torch

from vision_gpt.data.factory import load_captioning_dataset
from vision_gpt.data.torch_datasets import pixel_values_for
from vision_gpt.datasets.shapes import COLORS
from vision_gpt.evaluation.chair import caption_hallucinations, compute_chair, find_instance_annotations
from vision_gpt.evaluation.metrics import compute_caption_metrics
from vision_gpt.inference.generation import one_line
from vision_gpt.inference.loading import load_model
from vision_gpt.inference.trust import caption_trust, rerank_value

COVERAGES = (1.0, 0.9, 0.8, 0.5)
SCORES = ("confidence", "grounding", "combined")


def auroc(clean: list[float], wrong: list[float]) -> float | None:
    """P(a clean caption scores above a wrong one), ties counting half (Mann-Whitney U / (n m))."""
    if not clean or not wrong:
        return None
    above = sum((c > w) + 0.5 * (c == w) for c in clean for w in wrong)
    return above / (len(clean) * len(wrong))


@torch.no_grad()
def captions_with_scores(model, processor, records, batch_size: int, **generate_kwargs) -> list[list[dict]]:
    """For each record, the generated captions (`num_return_sequences` of them) with their trust scores."""
    out = []
    copies = generate_kwargs.get("num_return_sequences", 1)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        pixel_values = torch.cat([pixel_values_for(r.image, processor.image_processor) for r in chunk])
        output = model.generate(pixel_values=pixel_values, output_caption_scores=True, **generate_kwargs)
        texts = [one_line(text) for text in processor.batch_decode(output.sequences)]
        trust = caption_trust(model, processor, pixel_values, output, texts)
        for i in range(len(chunk)):
            rows = [{"caption": texts[j], **trust[j]} for j in range(i * copies, (i + 1) * copies)]
            for row in rows:
                row["combined"] = rerank_value(row, "combined")
            out.append(rows)
    return out


def colour_truth(data_dir: Path) -> dict[str, set[str]]:
    """The colours of each image's shapes, from the corpus's instance annotations."""
    data = json.loads(next(data_dir.glob("instances*.json")).read_text())
    names = {image["id"]: image["file_name"] for image in data["images"]}
    colours = {name: set() for name in names.values()}
    for annotation in data["annotations"]:
        colours[names[annotation["image_id"]]].add(annotation["attributes"]["color"])
    return colours


def evaluate_model(name, path, data_dir, batch_size) -> dict:
    model, processor = load_model(path, dtype="float32", device="cpu")
    test = load_captioning_dataset("flickr8k", str(data_dir))[0]["test"]
    annotations = find_instance_annotations(data_dir)
    colours = colour_truth(data_dir)
    objects = {r.image_id: annotations.objects_for(r.image_id, r.image) for r in test}
    references = {r.image_id: r.captions for r in test}
    started = time.perf_counter()
    greedy = [rows[0] for rows in captions_with_scores(model, processor, test, batch_size, num_beams=1,
                                                      max_new_tokens=32)]
    for record, row in zip(test, greedy):
        found = caption_hallucinations(row["caption"], objects[record.image_id], annotations.vocabulary)
        row["hallucinated"] = bool(found["hallucinated"])
        named = {word for word in row["caption"].lower().split() if word in COLORS}
        row["wrong_colour"] = bool(named - colours[Path(record.image_id).name])
    result = {"model": name, "path": str(path), "num_captions": len(greedy),
              "hallucinated": sum(row["hallucinated"] for row in greedy),
              "wrong_colour": sum(row["wrong_colour"] for row in greedy), "auroc": {}, "selective": {}}
    for label in ("hallucinated", "wrong_colour"):
        result["auroc"][label] = {
            score: auroc([r[score] for r in greedy if not r[label]], [r[score] for r in greedy if r[label]])
            for score in SCORES}
    for score in SCORES:
        ranked = sorted(zip(test, greedy), key=lambda pair: -pair[1][score])
        rows = []
        for coverage in COVERAGES:
            kept = ranked[:round(coverage * len(ranked))]
            captions = {record.image_id: row["caption"] for record, row in kept}
            chair = compute_chair(captions, {r.image_id: objects[r.image_id] for r, _ in kept},
                                  annotations.vocabulary)
            cider = compute_caption_metrics(captions, {r.image_id: references[r.image_id] for r, _ in kept})
            rows.append({"coverage": coverage, "CHAIR-s": chair["CHAIR-s"], "CHAIR-i": chair["CHAIR-i"],
                         "CIDEr-D": cider["CIDEr-D"],
                         "wrong_colour_pct": 100.0 * sum(row["wrong_colour"] for _, row in kept) / len(kept)})
        result["selective"][score] = rows
    candidates = captions_with_scores(model, processor, test, batch_size, num_beams=5, num_return_sequences=5,
                                      max_new_tokens=32)
    rerank = {}
    for choice in ("beam search", *SCORES):
        picked = {record.image_id: (rows[0] if choice == "beam search" else max(rows, key=lambda r: r[choice]))
                  ["caption"] for record, rows in zip(test, candidates)}
        chair = compute_chair(picked, objects, annotations.vocabulary)
        rerank[choice] = {"CIDEr-D": compute_caption_metrics(picked, references)["CIDEr-D"],
                          "CHAIR-i": chair["CHAIR-i"], "CHAIR-s": chair["CHAIR-s"]}
    result["rerank"] = rerank
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["examples"] = [{"image": r.image_id, **row} for r, row in zip(test[:6], greedy[:6])]
    return result


def fmt(value, digits=1):
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_tables(results: list[dict]) -> None:
    for result in results:
        print(f"\n## {result['model']} ({result['num_captions']} greedy captions: {result['hallucinated']} name a "
              f"shape that is not there, {result['wrong_colour']} a colour that is not there)\n")
        print("| score | AUROC, hallucinated shape | AUROC, wrong colour |")
        print("|---|---:|---:|")
        for score in SCORES:
            print(f"| {score} | {fmt(result['auroc']['hallucinated'][score], 3)} | "
                  f"{fmt(result['auroc']['wrong_colour'][score], 3)} |")
        print("\n| kept by | coverage | CHAIR-s | CHAIR-i | wrong colour % | CIDEr-D |")
        print("|---|---:|---:|---:|---:|---:|")
        for score in SCORES:
            for row in result["selective"][score]:
                print(f"| {score} | {row['coverage']:.0%} | {fmt(row['CHAIR-s'])} | {fmt(row['CHAIR-i'])} | "
                      f"{fmt(row['wrong_colour_pct'])} | {fmt(row['CIDEr-D'])} |")
        print("\n| 5 beams, caption kept | CIDEr-D | CHAIR-i | CHAIR-s |")
        print("|---|---:|---:|---:|")
        for choice, row in result["rerank"].items():
            label = "beam search's first" if choice == "beam search" else f"best {choice}"
            print(f"| {label} | {fmt(row['CIDEr-D'])} | {fmt(row['CHAIR-i'])} | {fmt(row['CHAIR-s'])} |")


def plot(results: list[dict], path: Path) -> None:
    """Selective captioning: CHAIR-s (top row) and the share of captions naming a wrong colour (bottom row) of the
    captions kept, against the share kept, per model and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 6.4), squeeze=False)
    for column, result in enumerate(results):
        for row, (key, label) in enumerate((("CHAIR-s", "CHAIR-s"), ("wrong_colour_pct", "wrong colour"))):
            axis = axes[row][column]
            for score in SCORES:
                rows = result["selective"][score]
                axis.plot([100 * r["coverage"] for r in rows], [r[key] or 0 for r in rows], marker="o", label=score)
            count = result["hallucinated"] if key == "CHAIR-s" else result["wrong_colour"]
            axis.set_title(f"{result['model']}: {count} of {result['num_captions']} wrong")
            axis.set_xlabel("captions kept, highest score first (%)")
            axis.set_ylabel(f"{label} of the kept captions (%)")
            axis.invert_xaxis()
            axis.grid(alpha=0.3)
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def model_specs(parser, specs: list[str]) -> list[tuple[str, str]]:
    """`--model NAME=PATH` flags as (name, path) pairs; a flag without `=PATH` is a usage error."""
    models = []
    for spec in specs:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--model {spec!r}: write NAME=PATH, e.g. demo=vision-gpt-demo/model")
        models.append((name, path))
    return models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="a shapes corpus (vision-gpt-demo/shapes)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a model to measure, named for the tables; give it several times")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output-dir", type=Path, default=Path("trust-bench"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --output-dir/trust.json")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads((args.output_dir / "trust.json").read_text()), args.output_dir / "selective_captioning.png")
        return
    models = model_specs(parser, args.model)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results = [evaluate_model(name, path, args.data_dir, args.batch_size) for name, path in models]
    print_tables(results)
    (args.output_dir / "trust.json").write_text(json.dumps(results, indent=2))
    plot(results, args.output_dir / "selective_captioning.png")
    print(f"\nwrote {args.output_dir / 'trust.json'} and {args.output_dir / 'selective_captioning.png'}")


if __name__ == "__main__":
    main()
