"""`vision-gpt assemble`: a captioner from pretrained towers (or tiny random ones), exported as Hub-ready repos."""

import json
from pathlib import Path

from ..modeling.configuration_vision_gpt import FUSIONS, PROJECTOR_TYPES, VISUAL_TOKENS
from .options import add_card_options, add_command, parse_bool


def add_model_options(parser) -> None:
    """The `VisionGPTConfig` fields of `vision_gpt.assembly.MODEL_OVERRIDES`, as flags."""
    group = parser.add_argument_group("model")
    group.add_argument("--fusion", choices=FUSIONS, default="cross_attention",
                       help="how the decoder reads the image: cross-attention layers (GPT-2) or image tokens before the "
                            "text")
    group.add_argument("--visual-tokens", choices=VISUAL_TOKENS, default="patches",
                       help="which visual tokens the decoder reads: every patch, merged blocks, learned queries, pooled")
    group.add_argument("--num-visual-tokens", type=int, default=32, metavar="K",
                       help="K visual tokens, for --visual-tokens queries and pooled")
    group.add_argument("--patch-merge-size", type=int, default=2, metavar="M",
                       help="--visual-tokens merged: blocks of M x M patches become one token")
    group.add_argument("--projector-type", choices=PROJECTOR_TYPES, default="mlp",
                       help="the mapper into the decoder's embedding space")
    group.add_argument("--projector-hidden-act", default="gelu", help="the projector MLP's activation")
    group.add_argument("--vision-feature-layer", type=int, nargs="+", default=[-1], metavar="LAYER",
                       help="the vision tower's layer whose output the projector reads (-1: the last); several, e.g. "
                            "4 -1, are concatenated (LLaVA's convention)")
    group.add_argument("--freeze-vision", type=parse_bool, default=True, metavar="BOOL",
                       help="keep the vision tower's weights fixed in training (false: train it too)")
    group.add_argument("--freeze-text", type=parse_bool, default=True, metavar="BOOL",
                       help="keep the decoder's weights fixed in training, its cross-attention layers apart (false: "
                            "train it too)")
    group.add_argument("--freeze-text-layers", type=int, default=0, metavar="N",
                       help="when the decoder trains, keep its first N blocks fixed")


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "assemble", help="build a captioner from a vision tower and a decoder, exported as Hub repos",
        description="Build a VisionGPT model from a pretrained vision tower and decoder (or --tiny random ones, "
                    "offline), write it as an FP32 repo with an FP16 copy in fp16/, and reload it to check. Its "
                    "projector is untrained: train it with `vision-gpt train --model-name-or-path OUTPUT_DIR`.")
    parser.add_argument("--vision-model", metavar="MODEL",
                        help="vision tower: Hub id or folder (ViT, CLIP, SigLIP, DINOv2)")
    parser.add_argument("--text-model", metavar="MODEL",
                        help="decoder (GPT-2, Llama/SmolLM2, Mistral, Qwen2/3, Gemma, OPT, GPT-NeoX, Phi; GPT-2 for "
                             "cross_attention): Hub id, folder or .gguf file")
    parser.add_argument("--tiny", action="store_true", help="small random towers, GPT-2's real tokenizer, offline")
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="where the repo goes")
    add_card_options(parser, languages=True)
    parser.add_argument("--no-fp16", action="store_true", help="skip the FP16 copy in fp16/")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from PIL import Image
    from transformers import pipeline

    from ..assembly.build import assemble, build_tiny, model_overrides
    from ..export.repo import export_repo

    overrides = model_overrides(args)
    if args.tiny:
        model, processor = build_tiny(**overrides)
        vision_name, text_name = "tiny random ViT (4x192, 96 px)", "tiny random GPT-2 (4x256)"
    else:
        if not (args.vision_model and args.text_model):
            raise ValueError("--vision-model and --text-model are required (or --tiny).")
        model, processor = assemble(args.vision_model, args.text_model, **overrides)
        vision_name, text_name = args.vision_model, args.text_model
    # Random towers (--tiny) have no license of their own to inherit.
    licenses = {vision_name: None, text_name: None} if args.tiny else None
    folders = export_repo(model, processor, args.output_dir, repo_id=args.repo_id or Path(args.output_dir).name,
                          fp16=not args.no_fp16, vision_model=vision_name, text_model=text_name,
                          license=args.license, language=args.language, tower_licenses=licenses)
    summary = model.parameter_summary()["total"]
    print(f"parameters: {summary['total']:,} total, {summary['trainable']:,} trainable")
    check_folder = folders.get("fp16", folders["fp32"])
    # The repo just written, with the code this package just copied into it: the check is that it runs without us.
    captioner = pipeline("image-to-text", model=str(check_folder), trust_remote_code=True)
    caption = captioner(Image.new("RGB", (64, 64), (200, 30, 30)), max_new_tokens=8, num_beams=1)
    for precision, folder in folders.items():
        size = (folder / "model.safetensors").stat().st_size
        print(f"{precision}: {folder}  (model.safetensors {size / 1e6:.1f} MB)")
    print(f"reloaded {check_folder} with trust_remote_code through pipeline('image-to-text'): "
          f"{json.dumps(caption)}  (the mapper is untrained, so this caption is not meaningful yet)")
    return 0
