"""`vision-gpt export-onnx`: a model as ONNX graphs for ONNX Runtime and transformers.js."""

import argparse
import sys

from ..inference.loading import DTYPE_CHOICES
from .options import add_command, add_trust_remote_code


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "export-onnx", help="export a model as ONNX graphs for ONNX Runtime and transformers.js",
        description="Write --model (a vision-gpt folder or Hub id) as an ONNX repo in --output-dir: "
                    "onnx/encoder_model.onnx (pixels to visual tokens), onnx/decoder_model_merged.onnx (one graph for "
                    "every decoding step, with a key/value cache), optional fp16 and int8 variants named as "
                    "transformers.js names them, and the config, generation config, tokenizer and preprocessor "
                    "files. Needs the onnx extra: pip install 'vision-gpt[onnx]'.")
    parser.add_argument("--model", metavar="FOLDER_OR_ID", help="vision-gpt model folder or Hub id (required)")
    parser.add_argument("--output-dir", metavar="DIR", help="new (or empty) folder for the ONNX repo (required)")
    # The earlier spelling: MODEL and OUT as positionals.
    parser.add_argument("legacy", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", type=str.lower, choices=DTYPE_CHOICES, default="fp32", metavar="DTYPE",
                        help="the graphs' precision: float32|fp32, or float16|fp16|half, which adds *_fp16.onnx graphs "
                             "next to the float32 ones (int8 graphs: --quantize int8)")
    parser.add_argument("--quantize", choices=("int8",),
                        help="add ONNX Runtime dynamic int8 graphs (*_int8.onnx and *_quantized.onnx)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 14 or newer")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    add_trust_remote_code(parser)
    parser.add_argument("--web-demo", action="store_true",
                        help="also write OUTPUT_DIR/index.html, a page that captions an image in the browser with "
                             "transformers.js (cross-attention models; copies its files from js/node_modules: run "
                             "(cd js && npm ci --ignore-scripts) in a vision-gpt checkout first)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..export.onnx import export_onnx, require_onnx, web_demo_sources, write_web_demo
    from ..inference.loading import dtype_name, load_model

    if len(args.legacy) > 2 or (args.legacy and (args.model or args.output_dir)):
        raise ValueError(f"Unexpected arguments {args.legacy}: name the model with --model and the folder with "
                         "--output-dir.")
    model_name = args.model or (args.legacy[0] if args.legacy else None)
    output_dir = args.output_dir or (args.legacy[1] if len(args.legacy) == 2 else None)
    if not (model_name and output_dir):
        raise ValueError("export-onnx needs --model FOLDER_OR_ID and --output-dir DIR.")
    try:
        require_onnx("onnx", "onnxruntime")
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    graphs = {"float32": "fp32", "float16": "fp16"}.get(dtype_name(args.dtype, "onnx"))
    if graphs is None:
        raise ValueError(f"export-onnx writes float32 graphs, and float16 ones with --dtype fp16; --dtype "
                         f"{args.dtype} is not one of them (int8 graphs come from --quantize int8).")
    # Exported in float32 on the CPU: the fp16 and int8 graphs are made from the float32 ones.
    model, processor = load_model(model_name, dtype="float32", device="cpu", trust_remote_code=args.trust_remote_code)
    # Checked before the export, so that a missing `npm ci` does not cost an export.
    web_sources = web_demo_sources(model.config) if args.web_demo else None
    files = export_onnx(model, processor, output_dir, dtype=graphs, quantize=args.quantize, opset=args.opset,
                        overwrite=args.overwrite, progress=True)
    for role, path in files.items():
        print(f"{role}: {path}  ({path.stat().st_size / 1e6:.1f} MB)")
    if web_sources:
        write_web_demo(output_dir, web_sources)
        print(f"Browser demo: python -m http.server --directory {output_dir} 8000, then open http://localhost:8000/")
    print(f"Caption with: vision-gpt caption IMAGE --model {output_dir} --runtime onnx, or in Python: "
          f"ONNXCaptioner({str(output_dir)!r})(['image.jpg']) (from vision_gpt.inference.onnx_runtime)")
    return 0
