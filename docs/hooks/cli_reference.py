"""mkdocs hook: the command-line reference, written from the `vision-gpt` parsers at build time so it cannot drift.

A page that holds a line `<!-- vision-gpt cli -->` gets, in its place, a section per subcommand in the order
`vision-gpt --help` lists them, each with its `--help` text as the parser prints it."""

import os

MARKER = "<!-- vision-gpt cli -->"
# Help is wrapped at the terminal's width; the page's code blocks are about 100 characters wide.
WIDTH = "100"


def _help_texts() -> list[tuple[str, str, str]]:
    """(name, one-line summary, full help) per subcommand, `vision-gpt` itself first."""
    os.environ["COLUMNS"] = WIDTH
    from vision_gpt.cli.commands import build_parser, command_parsers
    from vision_gpt.cli.options import HelpFormatter
    from vision_gpt.cli.train import DESCRIPTION as TRAIN_DESCRIPTION
    from vision_gpt.training.arguments import TrainingArgumentParser

    texts = [("vision-gpt", "", build_parser().format_help())]
    for name, parser in command_parsers().items():
        summary = parser.summary
        if name == "train":
            # `vision-gpt train` hands its flags to the training package's HfArgumentParser.
            parser = TrainingArgumentParser(prog="vision-gpt train", description=TRAIN_DESCRIPTION,
                                            formatter_class=HelpFormatter)
        texts.append((f"vision-gpt {name}", summary, parser.format_help()))
    return texts


def _render() -> str:
    import transformers

    parts = [f"Generated from the parsers by `docs/hooks/cli_reference.py` when these pages were built (transformers "
             f"{transformers.__version__}, whose `TrainingArguments` are part of `vision-gpt train`'s flags).\n"]
    for name, summary, text in _help_texts():
        parts.append(f"## `{name}`\n")
        if summary:
            parts.append(f"{summary[:1].upper()}{summary[1:]}.\n")
        parts.append(f"```text\n$ {name} --help\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, _render())
