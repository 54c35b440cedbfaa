"""`vision-gpt convert`: a transformers ViT-GPT2 `VisionEncoderDecoderModel` as a vision-gpt repo."""

import argparse

from .options import add_card_options, add_command


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "convert", help="convert a VisionEncoderDecoder ViT-GPT2 captioner into a vision-gpt repo",
        description="Convert a transformers VisionEncoderDecoderModel with a ViT encoder and a GPT-2 decoder (e.g. "
                    "nlpconnect/vit-gpt2-image-captioning) into a vision-gpt model with fusion=cross_attention: same "
                    "logits and captions, checked on a random image before saving.")
    parser.add_argument("source", metavar="SOURCE", help="Hub id or folder of the VisionEncoderDecoder checkpoint")
    parser.add_argument("--output-dir", metavar="DIR", help="where the vision-gpt repo goes (required)")
    # The output folder's earlier spelling, a second positional.
    parser.add_argument("legacy_output_dir", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--fp16", action="store_true", help="save FP16 weights (half the size)")
    add_card_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import logging

    from ..export.convert import convert_checkpoint

    if args.output_dir and args.legacy_output_dir:
        raise ValueError(f"Two output folders: --output-dir {args.output_dir} and {args.legacy_output_dir}; give one.")
    output_dir = args.output_dir or args.legacy_output_dir
    if output_dir is None:
        raise ValueError("convert needs the output folder: --output-dir DIR.")
    # The parity check's result is logged by convert_checkpoint: show it.
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vision_gpt.export.convert").setLevel(logging.INFO)
    folder = convert_checkpoint(args.source, output_dir, fp16=args.fp16, repo_id=args.repo_id, license=args.license)
    print(f"Converted {args.source} into {folder}: load it with AutoModel.from_pretrained({str(folder)!r}, "
          "trust_remote_code=True) or pipeline('image-to-text', ...).")
    return 0
