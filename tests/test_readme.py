"""The README's commands and code, run as written, so the README cannot drift from the API.

The Hub cannot be reached here: a tiny random model exported to a local folder stands in for the README's repo id
`user/vision-gpt-flickr8k`, which the test swaps for the folder's path."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vision_gpt.cli import commands as cli
from vision_gpt.export.repo import export_repo

from .conftest import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = "user/vision-gpt-flickr8k"


def code_block_after(marker: str, language: str) -> str:
    """The first ```language block after the line that starts with `marker`."""
    text = README.read_text()
    start = text.index(marker)
    match = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(text, start)
    assert match, f"no {language} block after {marker!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def local_repo(tmp_path_factory, processor):
    folder = tmp_path_factory.mktemp("readme") / "repo"
    export_repo(tiny_model(), processor, folder, repo_id=PLACEHOLDER, fp16=False, license="mit",
                vision_model="tiny random ViT", text_model="tiny random GPT-2")
    Image.new("RGB", (40, 30), (200, 40, 40)).save(folder.parent / "photo.jpg")
    return folder


def test_python_quick_start_runs_as_written(local_repo):
    code = code_block_after("**In Python.**", "python")
    assert PLACEHOLDER in code and "trust_remote_code=True" in code
    # A fresh process where vision_gpt cannot be imported: the repo's own remote code must do everything.
    program = "import sys; sys.modules['vision_gpt'] = None\n" + code.replace(PLACEHOLDER, str(local_repo))
    result = subprocess.run([sys.executable, "-c", program], cwd=local_repo.parent, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "HF_MODULES_CACHE": str(local_repo.parent / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.strip().splitlines()
    assert len(printed) == 3  # the batch_decode list, the image-to-text and the image-text-to-text outputs
    assert printed[1].startswith("[{'generated_text': ")
    assert "a photo of" in printed[2]


def test_the_caption_row_shown_has_the_columns_caption_writes(local_repo, tmp_path):
    shown = json.loads(code_block_after("`captions.jsonl` gets one row per image", "json"))
    output = tmp_path / "captions.jsonl"
    assert cli.main(["caption", str(local_repo.parent / "photo.jpg"), "--model", str(local_repo), "--output",
                     str(output), "--max-new-tokens", "4"]) == 0
    written = json.loads(output.read_text().splitlines()[0])
    assert list(written) == list(shown)
    assert {key: written[key] for key in ("error", "num_beams", "do_sample", "num_captions", "dtype")} == \
        {key: shown[key] for key in ("error", "num_beams", "do_sample", "num_captions", "dtype")}


def test_the_set_up_commands_open_the_install_section():
    install = README.read_text().split("## Install\n", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", install, re.DOTALL)
    assert blocks[0].strip().startswith("python3 -m venv .venv") and "vision-gpt demo" in blocks[0]
    assert blocks[1].strip() == ". .venv/bin/activate && python -m pytest -q"
    assert len(README.read_text().splitlines()) <= 250
