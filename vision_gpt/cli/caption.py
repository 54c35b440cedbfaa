"""`vision-gpt caption`: its flags, help and examples."""

import argparse

from ..caption.job import run
from .options import add_command, add_loading_options

HELP = ("caption images, folders, globs, list files, shards or a datasets split, into a table, JSONL, CSV or parquet; "
        "locally or on Ray")

DESCRIPTION = """\
Caption images with a trained vision-gpt model.

Inputs can be mixed: image files, folders (searched recursively for .jpg .jpeg .png .bmp
.gif .webp .tif .tiff, any case), glob patterns (quote them: "photos/**/*.jpg"), list files
(--from-file, one path per line), webdataset tar shards and parquet files (an image-bytes
column; rows keyed SHARD/KEY), and a `datasets` split (--dataset).

Up to 20 images without --output are printed as a table. Otherwise pass --output
captions.jsonl, .csv or .parquet: one row per image with its caption and the decoding
settings, written as the run goes. Rerun the same command to resume: images already in
the output are skipped. An unreadable image becomes a row with an 'error' field naming the
file and the reason; the run goes on, and exits with 1 at the end. Decoding settings not
given come from the model's generation_config.json."""

EPILOG = """\
output columns:
  image         the path as given (normalised), SHARD/KEY for a sample of a .tar or .parquet
                input, or the dataset row id / SPLIT-ROW
  caption       the caption (with --num-captions N: the first, the best one for beam search)
  captions      JSONL and parquet with --num-captions N > 1: the list of all N captions
  caption_2..N  CSV with --num-captions N > 1: the other captions, one column each
  confidence    how sure the model was of the caption: the geometric mean of its token
                probabilities given the image, 0-1 (not with --no-caption-scores or --runtime onnx)
  grounding     how much the image raised the caption's probability: log p(caption | image) -
                log p(caption | no image), per token, in nats; near 0 for a caption that would
                fit any picture
  truncated     true when the caption was cut at --max-new-tokens (its score has no end token)
  confidences, groundings   JSONL and parquet with --num-captions N > 1: every caption's
  confidence_2..N, grounding_2..N   CSV with --num-captions N > 1
  needs_review  with --review-below T: true where confidence < T
  error         why the image could not be captioned (empty when it was)
  model, num_beams, max_new_tokens, do_sample, temperature, top_p, top_k, num_captions,
  dtype, seed   the settings that produced the caption (sampling ones only with --do-sample)

examples:
  vision-gpt caption photo.jpg holiday/ --model user/vision-gpt-flickr8k
  vision-gpt caption "scans/**/*.png" --model ./my-model --output captions.csv --num-beams 5
  vision-gpt caption --from-file paths.txt --model ./my-model --output captions.jsonl --dtype bf16
  vision-gpt caption --dataset ./my_dataset --split test --model ./my-model --output test.jsonl
  vision-gpt caption "shards/{000000..000099}.tar" --model ./my-model --output captions.parquet
  vision-gpt caption --score-captions alt_texts.csv --model ./my-model --output audit.jsonl \
      --review-below 0.3                              (score existing captions, flag the doubtful)
  accelerate launch --multi-gpu --num-processes 4 -m vision_gpt.cli caption photos/ \\
      --model ./my-model --output captions.jsonl      (each GPU captions a quarter)
  vision-gpt caption data/*.parquet --model ./my-model --output captions.parquet \\
      --engine ray --num-workers 8 --address auto     (8 Ray actors on a running cluster)"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `caption` subcommand to `subparsers` (from `ArgumentParser.add_subparsers`)."""
    parser = add_command(subparsers, "caption", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    inputs = parser.add_argument_group("what to caption")
    inputs.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files, folders (searched recursively), quoted glob patterns, webdataset shards "
                             "(.tar; brace ranges like \"shards/{000000..000099}.tar\") and parquet files")
    inputs.add_argument("--from-file", action="append", default=[], metavar="LIST",
                        help="a text file with one image path (or folder) per line; '#' starts a comment; '-' reads "
                             "stdin; may be given several times")
    inputs.add_argument("--dataset", metavar="NAME_OR_FOLDER",
                        help="a datasets Hub id or a save_to_disk folder with an image column")
    inputs.add_argument("--split", help="split of --dataset (needed when it has several)")
    inputs.add_argument("--image-column", help="column of --dataset or of parquet inputs holding the images (default: "
                                               "the Image column; in parquet an image/jpg/png/bytes column)")
    inputs.add_argument("--id-column", help="column of --dataset or of parquet inputs that names each row in the output "
                                            "(default: key, __key__, image_id or id when present, else the row)")

    model = parser.add_argument_group("model")
    add_loading_options(model, model_help="the captioner: a folder written by save_pretrained, `vision-gpt assemble` "
                                          "or training, or a Hub id",
                        device_help="cpu, cuda, cuda:N or auto (the accelerator if there is one; under accelerate "
                                    "launch, each process's own GPU)")

    decoding = parser.add_argument_group("decoding (defaults: the model's generation_config.json)")
    decoding.add_argument("--num-beams", type=int, help="beam search width (1 is greedy)")
    decoding.add_argument("--max-new-tokens", type=int, help="longest caption, in tokens")
    decoding.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                          help="sample tokens instead of searching for the most likely caption")
    decoding.add_argument("--temperature", type=float, help="with --do-sample: below 1 is safer, above 1 more varied")
    decoding.add_argument("--top-p", type=float, help="with --do-sample: sample from the smallest set of tokens whose "
                                                      "probability reaches P")
    decoding.add_argument("--top-k", type=int, help="with --do-sample: sample from the K most likely tokens")
    decoding.add_argument("--num-captions", type=int, metavar="N",
                          help="captions per image (needs --num-beams >= N, or --do-sample)")
    decoding.add_argument("--seed", type=int, help="random seed, for repeatable --do-sample captions")
    scoring = parser.add_argument_group("scoring (no references needed)")
    scoring.add_argument("--no-caption-scores", action="store_true",
                         help="leave out the confidence, grounding and truncated columns (two teacher-forced passes "
                              "per batch after generation)")
    scoring.add_argument("--score-captions", metavar="FILE",
                         help="score the captions in FILE instead of generating any: JSONL or CSV with 'image' and "
                              "'caption' fields, one caption per image (an output of this command works); positional "
                              "inputs, when given, limit the scoring to those images; decoding flags have no effect")
    scoring.add_argument("--rerank", choices=["confidence", "grounding", "combined"],
                         help="keep the candidates with the best score rather than beam search's (all --num-beams "
                              "beams, or the --num-candidates samples with --do-sample, are candidates); combined is "
                              "log(confidence) + grounding")
    scoring.add_argument("--num-candidates", type=int, metavar="K",
                         help="with --rerank and --do-sample: samples drawn per image, of which the best "
                              "--num-captions are kept (default: --num-captions, only reordered)")
    scoring.add_argument("--review-below", type=float, metavar="T",
                         help="add a needs_review column: true where the caption's confidence is below T (0-1); no "
                              "row is dropped")
    scoring.add_argument("--score", choices=["clip"],
                         help="add a clipscore column: the CLIPScore (Hessel et al., 2021; 0-100) of each image's "
                              "first caption, how well it fits the image in CLIP's embedding space")
    scoring.add_argument("--clipscore-model", metavar="MODEL",
                         help="CLIP model for --score clip, folder or Hub id (default openai/clip-vit-base-patch32)")

    running = parser.add_argument_group("running")
    running.add_argument("--output", metavar="FILE.jsonl|FILE.csv|FILE.parquet",
                         help="where the rows go; an existing file is resumed (its images are skipped)")
    running.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="local (default): this process, or each process of accelerate launch; ray: Ray Data "
                              "actors, on a local Ray instance or the cluster at --address")
    running.add_argument("--address", metavar="ADDRESS",
                         help="with --engine ray: the Ray cluster to join (ray://host:10001, host:6379 or auto; "
                              "default: $RAY_ADDRESS, else a local instance started for this run)")
    running.add_argument("--cpus-per-worker", type=float, metavar="N",
                         help="with --engine ray: CPUs reserved per actor, also its torch threads (default: the "
                              "cluster's CPUs shared among the actors, at most one node's)")
    running.add_argument("--batch-size", type=int, default=16, help="images per generate call (default: 16)")
    running.add_argument("--num-workers", type=int,
                         help="local engine: background processes decoding images while the model runs (default: "
                              "min(4, CPUs); 0 decodes in the main process). --engine ray: the number of actors, each "
                              "with its own copy of the model, decoding its own images (default: 1)")
    running.add_argument("--max-image-pixels", type=int, metavar="PIXELS",
                         help="images with more pixels become error rows (default: PIL's guard, about 179M pixels)")
    running.add_argument("--retry-errors", action="store_true",
                         help="when resuming, caption again the images whose rows are errors (their old rows are "
                              "removed)")
    parser.set_defaults(func=run)
    return parser
