"""`vision-gpt`: the command line. One parser; each subcommand's flags live in a module of their own here, and each
job in the package that does the work."""

import argparse
import sys

from .options import ArgumentParser, HelpFormatter

DESCRIPTION = """\
vision-gpt: a vision encoder + GPT-2 (or any causal LM) image captioner as a transformers model.

Train one on your captions, score it, caption many images, publish it, serve it:
  vision-gpt demo                                   everything, offline, on a generated dataset
  vision-gpt train configs/flickr8k.yaml            train (under accelerate launch for several GPUs)
  vision-gpt caption photos/ --model ./my-model     captions for files, folders, shards, datasets
  vision-gpt serve ./my-model                       an OpenAI-compatible API for programs

`vision-gpt COMMAND --help` describes a command's flags."""


def _build() -> tuple[ArgumentParser, argparse.Action]:  # (the parser, its subcommands)
    from .. import __version__
    from . import app, assemble, caption, convert, demo, evaluate, export_onnx, push, serve, train

    parser = ArgumentParser(prog="vision-gpt", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"vision-gpt {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    # The order a newcomer meets them: try it, train, score, caption, publish, serve.
    for module in (demo, train, evaluate, caption, assemble, convert, export_onnx, push, app, serve):
        module.register(commands)
    return parser, commands


def build_parser() -> ArgumentParser:
    return _build()[0]


def command_parsers() -> dict[str, ArgumentParser]:
    """Each subcommand's parser, in the order `vision-gpt --help` lists them (the docs' CLI reference is written from
    these; `parser.summary` is the command's line in that list)."""
    return dict(_build()[1].choices)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # Training's flags are HfArgumentParser's dataclasses (TrainingArguments has about 150); it parses them itself,
        # from flags or one YAML/JSON file.
        from .train import run

        return run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
