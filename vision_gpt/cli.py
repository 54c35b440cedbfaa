"""`vision-gpt`: the command line. Each subcommand parses its flags here and calls the module that does the work."""

import argparse
import json
import sys

from .modeling.configuration_vision_gpt import FUSIONS, PROJECTOR_TYPES, VISUAL_TOKENS


def _add_model_options(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--fusion", choices=FUSIONS, default="prefix")
    group.add_argument("--visual_tokens", choices=VISUAL_TOKENS, default="queries")
    group.add_argument("--num_visual_tokens", type=int, default=32)
    group.add_argument("--projector_type", choices=PROJECTOR_TYPES, default="mlp")
    group.add_argument("--freeze_vision", type=_bool, default=True)
    group.add_argument("--freeze_text", type=_bool, default=True)
    group.add_argument("--freeze_text_layers", type=int, default=0)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _model_overrides(args) -> dict:
    names = ("fusion", "visual_tokens", "num_visual_tokens", "projector_type", "freeze_vision", "freeze_text",
             "freeze_text_layers")
    return {name: getattr(args, name) for name in names}


def cmd_assemble(args) -> int:
    from PIL import Image
    from transformers import pipeline

    from .assembly import assemble, build_tiny
    from .export import export_repo

    overrides = _model_overrides(args)
    if args.tiny:
        model, processor = build_tiny(**overrides)
        vision_name, text_name = "tiny random ViT (4x192, 96 px)", "tiny random GPT-2 (4x256)"
    else:
        if not (args.vision_model and args.text_model):
            print("error: --vision_model and --text_model are required (or --tiny)", file=sys.stderr)
            return 2
        model, processor = assemble(args.vision_model, args.text_model, **overrides)
        vision_name, text_name = args.vision_model, args.text_model
    folders = export_repo(model, processor, args.output_dir, repo_id=args.repo_id or args.output_dir,
                          fp16=not args.no_fp16, vision_model=vision_name, text_model=text_name)
    summary = model.parameter_summary()["total"]
    print(f"parameters: {summary['total']:,} total, {summary['trainable']:,} trainable")
    check_folder = folders.get("fp16", folders["fp32"])
    captioner = pipeline("image-to-text", model=str(check_folder), trust_remote_code=True)
    caption = captioner(Image.new("RGB", (64, 64), (200, 30, 30)), max_new_tokens=8, num_beams=1)
    for precision, folder in folders.items():
        size = (folder / "model.safetensors").stat().st_size
        print(f"{precision}: {folder}  (model.safetensors {size / 1e6:.1f} MB)")
    print(f"reloaded {check_folder} with trust_remote_code through pipeline('image-to-text'): "
          f"{json.dumps(caption)}  (the mapper is untrained, so this caption is not meaningful yet)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision-gpt", description="ViT + GPT-2 image captioning.")
    commands = parser.add_subparsers(dest="command", required=True)

    assemble = commands.add_parser(
        "assemble", help="build a captioner from a vision tower and GPT-2 and export it as Hub-ready repos",
        description="Build a VisionGPT model from a pretrained vision tower and GPT-2 (or --tiny random ones, "
                    "offline), write it as an FP32 repo with an FP16 copy in fp16/, and reload it to check.")
    assemble.add_argument("--vision_model", help="vision tower: Hub id or folder (ViT, CLIP, SigLIP, DINOv2)")
    assemble.add_argument("--text_model", help="GPT-2 checkpoint: Hub id or folder")
    assemble.add_argument("--tiny", action="store_true", help="small random towers, GPT-2's real tokenizer, offline")
    assemble.add_argument("--output_dir", required=True)
    assemble.add_argument("--repo_id", help="Hub id shown in the model card (default: output_dir)")
    assemble.add_argument("--no_fp16", action="store_true", help="skip the FP16 copy")
    _add_model_options(assemble)
    assemble.set_defaults(func=cmd_assemble)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
