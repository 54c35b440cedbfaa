"""`vision-gpt app`: its flags."""

import argparse

from ..app.server import DEFAULT_QUEUE_SIZE, run
from .options import add_command, add_loading_options


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `app` subcommand to `vision-gpt`'s subparsers."""
    parser = add_command(
        subparsers, "app", help="a web page to caption images with a model (needs the 'app' extra: gradio)",
        description="Serve a web page (Gradio) that captions uploaded images with a VisionGPT model, showing beam "
                    "alternatives and scores. It listens on 127.0.0.1 (this machine only) unless --host says "
                    "otherwise. Needs: pip install 'vision-gpt[app]'.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for everyone on "
                             "the network)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also publish a temporary public *.gradio.live link (needs internet; anyone with the "
                             "link can use the app)")
    parser.add_argument("--max-upload-mb", type=float, default=10,
                        metavar="MB", help="largest accepted file, in MB (default 10)")
    parser.add_argument("--max-images", type=int, default=8, metavar="N",
                        help="most images captioned in one request (default 8)")
    parser.add_argument("--no-urls", action="store_true",
                        help="hide the URL box: the server fetches nothing from the network")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_QUEUE_SIZE,
                        metavar="N",
                        help=f"most requests waiting for the model (default {DEFAULT_QUEUE_SIZE}); while the line is "
                             "full, new requests are told the app is busy and to try again")
    parser.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="requests captioned at the same time, each its own generation on the one loaded model "
                             "(default 1). One generation already runs its matrix products on every CPU core, but a "
                             "small model spends much of its time between them, so 2-4 can get through a burst "
                             "sooner, as on a GPU, though each generation then runs slower. With --server, requests "
                             "sent to the server at once (default 8), which it batches")
    remote = parser.add_argument_group("in front of a server (instead of --model)")
    remote.add_argument("--server", metavar="URL",
                        help="caption through a running `vision-gpt serve` at URL (its /v1 address, e.g. "
                             "http://127.0.0.1:8000/v1) instead of loading a model here: the server batches the "
                             "page's requests with its other clients' (needs the openai package)")
    remote.add_argument("--api-key", help="the server's key, with --server (default: $VISION_GPT_API_KEY if set)")
    add_loading_options(parser.add_argument_group("model"), required=False,
                        model_help="model folder or Hub id (e.g. a folder from `vision-gpt assemble` or a trained "
                                   "checkpoint); or --server")
    parser.set_defaults(func=run)
    return parser
