"""`vision-gpt serve`: its flags."""

import argparse
import os

from ..inference.loading import DTYPE_CHOICES, DTYPE_HELP, RUNTIMES
from ..serving.settings import API_KEY_ENV, ServeLimits, ServeOptions
from .options import add_command, add_trust_remote_code

EXAMPLES = """\
examples:
  vision-gpt serve user/vision-gpt-flickr8k
  vision-gpt serve ./my-model --port 9000 --api-key secret --max-batch-size 16
  vision-gpt serve ./my-model-onnx --runtime onnx --served-model-name captioner

Then, from Python:
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
  client.chat.completions.create(model="user/vision-gpt-flickr8k", messages=[{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}]}])"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to `vision-gpt`'s subparsers."""
    defaults = ServeLimits()
    parser = add_command(
        subparsers, "serve", help="an OpenAI-compatible HTTP API (POST /v1/chat/completions) for a model, with "
                                  "batching and streaming (needs the 'serve' extra: ray[serve])",
        description="Serve a VisionGPT model over OpenAI's chat-completions protocol: images as image_url parts "
                    "(data: URLs), streaming with server-sent events, concurrent requests batched into one generate "
                    "call. It runs on Ray Serve and listens on 127.0.0.1 unless --host says otherwise. Needs: pip "
                    "install 'vision-gpt[serve]'.",
        epilog=EXAMPLES)
    parser.add_argument("model_positional", nargs="?", metavar="MODEL",
                        help="model folder or Hub id (an export of `vision-gpt export-onnx` with --runtime onnx)")
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same as MODEL")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model id clients send and GET /v1/models lists (default: MODEL as given)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for everyone on "
                             "the network)")
    parser.add_argument("--port", type=int, default=8000, help="port")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set, "
                             "else no key)")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                          help="most requests captioned in one generate call")
    batching.add_argument("--batch-timeout", type=float, default=100.0, metavar="MS",
                          help="longest wait, in milliseconds, for more requests to join a batch: reading and "
                               "checking a request takes a few ms, so a burst of 16 needs about 100 ms to gather, "
                               "little next to a caption's second or more on a CPU")
    batching.add_argument("--num-replicas", type=int, default=1, metavar="N",
                          help="copies of the model, each batching its own share of the requests (on this machine, "
                               "or across the Ray cluster at $RAY_ADDRESS)")
    batching.add_argument("--max-queue", type=int, default=defaults.max_queue, metavar="N",
                          help="most requests waiting or running; beyond it, 429 (retry shortly)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20, metavar="MB",
                        help="largest request body (413 beyond it)")
    limits.add_argument("--max-image-mb", type=float, default=defaults.max_image_bytes / 2**20, metavar="MB",
                        help="largest image, encoded (413 beyond it)")
    limits.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                        help="most pixels in an image, read from its header before decoding (default: PIL's "
                             "decompression-bomb limit, about 89 million)")
    limits.add_argument("--max-tokens", type=int, default=defaults.max_tokens, metavar="N",
                        help="largest max_tokens a request may ask for")
    limits.add_argument("--max-n", type=int, default=defaults.max_n, metavar="N",
                        help="most choices (n) a request may ask for")
    limits.add_argument("--allow-url-images", action="store_true",
                        help="also fetch http(s) image URLs (public addresses only, within --max-image-mb and a "
                             "5 s timeout); off by default, so the server makes no requests of its own")
    model = parser.add_argument_group("model")
    model.add_argument("--dtype", type=str.lower, choices=DTYPE_CHOICES, default="float32", metavar="DTYPE",
                       help="weights' and compute precision: " + DTYPE_HELP)
    model.add_argument("--runtime", choices=RUNTIMES, default="torch",
                       help="torch: a PyTorch model folder or Hub id; onnx: a folder written by `vision-gpt "
                            "export-onnx`, run by ONNX Runtime (captions arrive whole, not token by token)")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the accelerator when there is one)")
    model.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch threads per replica (default: the machine's cores shared by the replicas)")
    add_trust_remote_code(model)
    parser.set_defaults(func=run)
    return parser


def options_from(args):
    """The server's options from the parsed flags; a ValueError names the flag that is wrong."""

    if args.model_positional and args.model_flag and args.model_positional != args.model_flag:
        raise ValueError(f"MODEL is {args.model_positional!r} but --model is {args.model_flag!r}: give one.")
    model = args.model_positional or args.model_flag
    if not model:
        raise ValueError("serve needs a MODEL: a model folder or Hub id (vision-gpt serve ./my-model).")
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 1),
                             ("--num-replicas", args.num_replicas, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--max-n", args.max_n, 1),
                             ("--port", args.port, 1)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}.")
    for flag, value in (("--batch-timeout", args.batch_timeout), ("--max-body-mb", args.max_body_mb),
                        ("--max-image-mb", args.max_image_mb)):
        if not value >= 0:
            raise ValueError(f"{flag} must be a number of at least 0, got {value}.")
    limits = ServeLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
                         max_image_pixels=args.max_image_pixels, max_n=args.max_n, max_tokens=args.max_tokens,
                         max_queue=args.max_queue, allow_url_images=args.allow_url_images)
    return ServeOptions(model=model, served_model_name=args.served_model_name, runtime=args.runtime, dtype=args.dtype,
                        device=args.device, trust_remote_code=args.trust_remote_code,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout, threads=args.threads,
                        num_replicas=args.num_replicas, limits=limits)


def run(args) -> int:
    options = options_from(args)
    try:
        from ..serving.server import run as serve
    except ImportError as error:
        raise ValueError(f"vision-gpt serve needs Ray Serve ({error}): pip install 'vision-gpt[serve]'.") from None
    serve(options, host=args.host, port=args.port)
    return 0
