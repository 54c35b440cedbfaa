"""What makes the commands read as one program: one parser class (dashed flags, underscore spellings accepted), one
help layout (defaults shown, only the dashed spelling), and the flags several commands share."""

import argparse
import copy
import sys

from ..inference.loading import DTYPE_CHOICES, DTYPE_HELP, REMOTE_CODE_HELP, RUNTIMES


def dashed(token: str) -> str:
    """`--max_new_tokens=5` -> `--max-new-tokens=5`; anything that is not a long option comes back as it is."""
    if not token.startswith("--") or token == "--":
        return token
    name, equals, value = token.partition("=")
    return name.replace("_", "-") + equals + value


class ArgumentParser(argparse.ArgumentParser):
    """Every flag is spelled with dashes; its underscore spelling (`--max_new_tokens`, as HfArgumentParser configs
    and older scripts write it) is accepted too, and help never shows it."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args([dashed(str(arg)) for arg in args], namespace)


class HelpFormatter(argparse.HelpFormatter):
    """Defaults shown after each flag's help; descriptions and epilogs written with line breaks kept as written; one
    spelling per flag (the dashed one)."""

    def __init__(self, prog, **kwargs):
        # Wide enough that every subcommand's name ("export-onnx") and most flags sit on their help's line.
        kwargs.setdefault("max_help_position", 32)
        super().__init__(prog, **kwargs)

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS)
                or text == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"

    def _fill_text(self, text, width, indent):
        if "\n" in text:  # laid out by hand: examples, column lists
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _format_action_invocation(self, action):
        if len(action.option_strings) > 1:
            action = copy.copy(action)
            action.option_strings = [name for name in action.option_strings if "_" not in name] or \
                action.option_strings[:1]
        return super()._format_action_invocation(action)


def add_command(subparsers, name: str, **kwargs) -> ArgumentParser:
    """A subcommand with the shared help layout; its one-line `help` is kept as `summary` for the docs' reference."""
    command = subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    command.summary = kwargs.get("help", "")
    return command


def add_loading_options(group, *, model_help: str, runtime: bool = True, device_help: str | None = None,
                        required: bool = True) -> None:
    """`--model`, `--dtype`, `--runtime`, `--device` and `--trust-remote-code`: what `load_model` takes."""
    group.add_argument("--model", required=required, metavar="FOLDER_OR_ID", help=model_help)
    group.add_argument("--dtype", type=str.lower, choices=DTYPE_CHOICES, default="float32", metavar="DTYPE",
                       help="weights' and compute precision: " + DTYPE_HELP)
    if runtime:
        group.add_argument("--runtime", choices=RUNTIMES, default="torch",
                           help="torch: a PyTorch model folder or Hub id; onnx: a folder written by `vision-gpt "
                                "export-onnx`, run by ONNX Runtime on the CPU (pip install 'vision-gpt[onnx]')")
    group.add_argument("--device", default="auto",
                       help=device_help or "cpu, cuda, cuda:N or auto (the accelerator when there is one)")
    add_trust_remote_code(group)


def add_trust_remote_code(group) -> None:
    group.add_argument("--trust-remote-code", action="store_true", help=REMOTE_CODE_HELP)


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_card_options(parser, languages: bool = False) -> None:
    """The model card's repo id and license (and languages), for the commands that write a repo."""
    parser.add_argument("--repo-id", metavar="USER/NAME",
                        help="the Hub repo the model card's usage lines and widget point to (default: the output "
                             "folder's name; `vision-gpt push` re-addresses the card to where it uploads)")
    parser.add_argument("--license", metavar="ID",
                        help="the model card's license, a Hub license id such as apache-2.0 or mit (default: the "
                             "license the source models' own cards agree on, else 'other', with a warning)")
    if languages:
        parser.add_argument("--language", nargs="+", default=["en"], metavar="CODE",
                            help="the captions' languages for the model card, as ISO 639-1 codes")
