"""`vision-gpt`, the command line: one parser with a subcommand per job; each job lives in its own package."""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
