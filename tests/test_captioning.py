"""`vision-gpt caption`: inputs, table / JSONL / CSV output, bad files, resuming, datasets, precision, two processes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from vision_gpt import VisionGPTForConditionalGeneration
from vision_gpt.cli.commands import main
from vision_gpt.evaluation.clipscore import CLIPScorer, CLIPScoreSettings
from vision_gpt.caption.output_lock import OutputLock, OutputLockedError, lock_path

from .conftest import random_images, tiny_model
from .data_fixtures import save_tiny_clip

# The module `accelerate launch -m` runs; `vision_gpt.cli` once cli.py registers the `caption` subcommand.
ENTRY_MODULE = "vision_gpt.cli"
# Short captions keep every run fast; beams and the rest come from the saved generation_config (num_beams=3).
SHORT = ["--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, processor):
    folder = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


class Tree:
    """A folder of images: five good ones in nested folders with mixed extensions, and three bad files."""

    def __init__(self, root: Path):
        self.root = root
        (root / "trip" / "day2").mkdir(parents=True)
        names = ["a.jpg", "B.PNG", "trip/c.webp", "trip/day2/d.tiff", "trip/day2/e.bmp"]
        for name, image in zip(names, random_images(len(names))):
            image.save(root / name)
        jpeg = (root / "a.jpg").read_bytes()
        (root / "trip" / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])
        (root / "empty.png").write_bytes(b"")
        (root / "notes.jpg").write_text("not an image")
        # Neither is captioned: not an image extension, and a hidden macOS resource fork.
        (root / "notes.txt").write_text("not an image")
        (root / "._a.jpg").write_bytes(b"\0")
        self.good = [str(root / name) for name in names]
        self.bad = [str(root / name) for name in ("trip/broken.jpg", "empty.png", "notes.jpg")]


@pytest.fixture
def tree(tmp_path):
    return Tree(tmp_path / "photos")


@pytest.fixture
def generated(monkeypatch):
    """(batch size, input dtype, model dtype) of every `generate` call: what was captioned, without timing."""
    calls = []
    original = VisionGPTForConditionalGeneration.generate

    def counting_generate(self, pixel_values=None, **kwargs):
        calls.append((pixel_values.shape[0], pixel_values.dtype, self.dtype))
        return original(self, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(VisionGPTForConditionalGeneration, "generate", counting_generate)
    return calls


def caption(*argv) -> int:
    return main(["caption", *map(str, argv)])


def read_output(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as file:
            return list(csv.DictReader(file))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_table_shows_each_image_once_and_an_error_row_per_bad_file(model_dir, tree, capsys):
    code = caption(tree.root, "--model", model_dir, *SHORT)
    out, err = capsys.readouterr()
    assert code == 1
    assert "num_beams=3" in out  # not given, so from the model's generation_config
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines() if line.startswith(str(tree.root))}
    assert sorted(rows) == sorted(tree.good + tree.bad)
    for path in tree.good:
        assert not rows[path].startswith("ERROR")
    for path in tree.bad:
        assert rows[path].startswith("ERROR") and path in rows[path]
    assert "done: 5 captioned" in err and "3 failed" in err
    assert "3 images could not be read" in err


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_files_folders_globs_and_lists_give_one_row_per_image(model_dir, tree, tmp_path, suffix, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    missing = str(tmp_path / "moved-away.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos to caption\n{tree.good[0]}\n\n{missing}\n")
    output = tmp_path / f"captions{suffix}"
    code = caption(str(tree.root / "trip" / "**" / "*.*"), tree.root, big, "--from-file", listing, "--model", model_dir,
                   "--output", output, "--max-image-pixels", 5000, *SHORT)
    err = capsys.readouterr().err
    rows = read_output(output)
    assert code == 1
    # The glob, the folder and the list overlap: every image still appears exactly once.
    assert sorted(row["image"] for row in rows) == sorted(tree.good + tree.bad + [str(big), missing])
    by_image = {row["image"]: row for row in rows}
    for path in tree.good:
        assert by_image[path]["caption"] and not by_image[path]["error"]
    for path in tree.bad + [missing, str(big)]:
        assert path in by_image[path]["error"] and not by_image[path]["caption"]
    assert "too large" in by_image[str(big)]["error"]
    assert "does not exist" in by_image[missing]["error"]
    settings = rows[0]
    assert str(settings["num_beams"]) == "3" and str(settings["max_new_tokens"]) == "3"
    assert settings["dtype"] == "float32" and settings["model"] == model_dir
    assert "done: 5 captioned" in err and "5 failed" in err


def test_a_list_file_names_files_whose_names_are_not_utf8(model_dir, tmp_path, capsys):
    folder = os.fsencode(tmp_path)
    name = folder + b"/caf\xe9.png"  # Latin-1 bytes, as old cameras and Windows shares write them
    random_images(1)[0].save(os.fsdecode(name))
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + name + b"\r\n" + folder + b"/gone.png\r\n")  # BOM, CRLF
    output = tmp_path / "captions.jsonl"
    assert caption("--from-file", listing, "--model", model_dir, "--output", output, *SHORT) == 1
    rows = [json.loads(line.decode("utf-8", "surrogateescape")) for line in output.read_bytes().splitlines()]
    by_image = {os.fsencode(row["image"]): row for row in rows}
    assert by_image.keys() == {name, folder + b"/gone.png"}
    assert by_image[name]["caption"] and not by_image[name]["error"]
    assert "done: 1 captioned" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_num_captions_gives_n_captions_per_row(model_dir, tree, tmp_path, suffix, generated):
    output = tmp_path / f"captions{suffix}"
    assert caption(*tree.good[:2], "--model", model_dir, "--output", output, "--num-captions", 2, *SHORT) == 0
    rows = read_output(output)
    assert len(rows) == 2 and sum(size for size, _, _ in generated) == 2
    for row in rows:
        captions = row["captions"] if suffix == ".jsonl" else [row["caption"], row["caption_2"]]
        assert len(captions) == 2 and all(captions) and captions[0] == row["caption"]
        assert str(row["num_captions"]) == "2"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_rerun_captions_only_missing_images_and_repairs_a_cut_last_row(model_dir, tree, tmp_path, suffix, generated,
                                                                      capsys):
    output = tmp_path / f"captions{suffix}"
    args = [tree.root, "--model", model_dir, "--output", output, "--batch-size", 2, *SHORT]
    assert caption(*args) == 1
    assert sum(size for size, _, _ in generated) == 5
    lines = output.read_text().splitlines(keepends=True)
    assert tree.good[-1] in lines[-1]
    # Delete two captioned rows, and cut the last one mid-way as a kill during a write would.
    kept = [line for line in lines[:-1] if not any(f'{path}"' in line or f"{path}," in line
                                                     for path in (tree.good[0], tree.good[2]))]
    output.write_text("".join(kept) + lines[-1][: len(lines[-1]) // 2])
    generated.clear()
    capsys.readouterr()

    assert caption(*args) == 1
    err = capsys.readouterr().err
    assert sum(size for size, _, _ in generated) == 3
    assert "dropped a half-written last row" in err
    assert "skipped 5 already captioned" in err and "3 of them error rows" in err
    rows = read_output(output)
    assert sorted(row["image"] for row in rows) == sorted(tree.good + tree.bad)
    assert all(row["caption"] for row in rows if row["image"] in tree.good)


def test_parts_left_by_an_interrupted_multi_process_run_are_merged_not_recaptioned(model_dir, tree, tmp_path,
                                                                                     generated, capsys):
    output = tmp_path / "captions.jsonl"
    args = [*tree.good, "--model", model_dir, "--output", output, *SHORT]
    assert caption(*args) == 0
    lines = output.read_text().splitlines(keepends=True)
    # As if process 1 of 2 was killed: its part holds two rows and half of a third, not yet merged.
    output.write_text("".join(lines[:2]))
    part = tmp_path / "captions.part-1.jsonl"
    part.write_text("".join(lines[2:4]) + lines[4][:30])
    generated.clear()

    assert caption(*args) == 0
    assert "merged 2 rows left in part files" in capsys.readouterr().err
    assert sum(size for size, _, _ in generated) == 1
    assert not part.exists()
    assert sorted(row["image"] for row in read_output(output)) == sorted(tree.good)


def test_retry_errors_captions_fixed_files_again(model_dir, tree, tmp_path, generated):
    output = tmp_path / "captions.jsonl"
    args = [tree.root, "--model", model_dir, "--output", output, *SHORT]
    assert caption(*args) == 1
    random_images(1, seed=5)[0].save(tree.bad[0], format="JPEG")  # the broken file is replaced by a good one
    generated.clear()

    assert caption(*args, "--retry-errors") == 1  # the other two are still unreadable
    assert sum(size for size, _, _ in generated) == 1
    rows = {row["image"]: row for row in read_output(output)}
    assert len(rows) == 8 and len(read_output(output)) == 8
    assert rows[tree.bad[0]]["caption"] and rows[tree.bad[0]]["error"] is None
    assert all(rows[path]["error"] for path in tree.bad[1:])


def test_bfloat16_loads_and_generates_in_bfloat16(model_dir, tree, tmp_path, generated):
    output = tmp_path / "captions.jsonl"
    assert caption(*tree.good[:2], "--model", model_dir, "--output", output, "--dtype", "bf16", *SHORT) == 0
    assert generated and all(calls[1:] == (torch.bfloat16, torch.bfloat16) for calls in generated)
    rows = read_output(output)
    assert [row["dtype"] for row in rows] == ["bfloat16", "bfloat16"] and all(row["caption"] for row in rows)


def test_datasets_folder_split_with_a_bad_row(model_dir, tmp_path, capsys):
    features = datasets.Features({"image": datasets.Image()})
    test = datasets.Dataset.from_dict({"image": random_images(3) + [{"bytes": b"junk", "path": None}]}, features)
    validation = datasets.Dataset.from_dict({"image": random_images(1)}, features)
    folder = tmp_path / "dataset"
    datasets.DatasetDict({"test": test, "validation": validation}).save_to_disk(folder)
    output = tmp_path / "captions.jsonl"

    assert caption("--dataset", folder, "--model", model_dir, "--output", output, *SHORT) == 2
    assert "has splits ['test', 'validation']; choose one with --split" in capsys.readouterr().err

    code = caption("--dataset", folder, "--split", "test", "--image-column", "image", "--model", model_dir,
                   "--output", output, *SHORT)
    assert code == 1
    rows = {row["image"]: row for row in read_output(output)}
    assert sorted(rows) == ["test-0", "test-1", "test-2", "test-3"]
    assert all(rows[f"test-{i}"]["caption"] for i in range(3))
    assert "test-3" in rows["test-3"]["error"] and "not an image" in rows["test-3"]["error"]


@pytest.mark.parametrize("extra, message", [
    (["{missing}"], "is not a file, a folder or a glob pattern"),
    (["{many}"], "too many for a table"),
    (["{one}", "--num-captions", "4", "--num-beams", "2"],
     "--num-captions (num_return_sequences) 4 needs at least as many beams"),
    (["{one}", "--temperature", "0.7"], "--temperature (temperature) only matters with --do-sample (do_sample)"),
    (["{one}", "--output", "{tmp}/captions.json"], "must end in .jsonl"),
])
def test_usage_errors_say_what_to_do(model_dir, tree, tmp_path, extra, message, capsys):
    many = tmp_path / "many"
    many.mkdir()
    for index in range(21):
        (many / f"{index}.png").write_bytes(b"")
    names = {"missing": tmp_path / "nowhere", "many": many, "one": tree.good[0], "tmp": tmp_path}
    assert caption(*[arg.format(**names) for arg in extra], "--model", model_dir) == 2
    assert message in capsys.readouterr().err


WRAPPER = """
import os, runpy
from vision_gpt import VisionGPTForConditionalGeneration

original = VisionGPTForConditionalGeneration.generate


def generate(self, pixel_values=None, **kwargs):
    with open(os.path.join(os.environ["CALLS_DIR"], "rank-" + os.environ["RANK"]), "a") as log:
        log.write(f"{pixel_values.shape[0]}\\n")
    return original(self, pixel_values=pixel_values, **kwargs)


VisionGPTForConditionalGeneration.generate = generate
runpy.run_module(os.environ["ENTRY_MODULE"], run_name="__main__")
"""


def test_two_process_accelerate_run_splits_the_images_and_merges_the_rows(model_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(random_images(6)):
        image.save(folder / f"{index}.png")
    (tmp_path / "count_generate.py").write_text(WRAPPER)
    calls = tmp_path / "calls"
    calls.mkdir()
    output = tmp_path / "captions.jsonl"
    # `--cpu` selects Accelerate's single-process launcher; `--multi_gpu` runs two real processes through torchrun,
    # which caption over gloo when there is no accelerator.
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "count_generate",
               "caption", str(folder), "--model", model_dir, "--output", str(output), "--batch-size", "2",
               "--num-workers", "0", *SHORT]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CALLS_DIR": str(calls), "ENTRY_MODULE": ENTRY_MODULE,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stderr
    per_rank = {path.name: sum(map(int, path.read_text().split())) for path in calls.iterdir()}
    assert per_rank == {"rank-0": 3, "rank-1": 3}
    rows = read_output(output)
    assert sorted(row["image"] for row in rows) == sorted(str(folder / f"{index}.png") for index in range(6))
    assert all(row["caption"] for row in rows)
    assert list(tmp_path.glob("captions.part-*")) == []
    assert not lock_path(output).exists()


# ----- one job per output --------------------------------------------------------------------------------------------


def caption_command(folder, model_dir, output):
    return [sys.executable, "-m", ENTRY_MODULE, "caption", str(folder), "--model", model_dir, "--output", str(output),
            "--batch-size", "1", "--num-workers", "0", *SHORT]


def start_holding_the_lock(command, output):
    """Start a caption job and return it once it holds the output's lock (its pid is in the lock file)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while True:
        try:
            if json.loads(lock_path(output).read_text()).get("pid") == process.pid:
                return process
        except (OSError, ValueError):
            pass
        assert process.poll() is None and time.time() < deadline, "the job never took the lock"
        time.sleep(0.01)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(random_images(12)):
        image.save(folder / f"{index:02d}.png")
    return folder


def test_a_second_job_on_the_same_output_stops_at_once_naming_the_first(model_dir, photos, tmp_path):
    output = tmp_path / "captions.csv"
    command = caption_command(photos, model_dir, output)
    first = start_holding_the_lock(command, output)
    first.send_signal(signal.SIGSTOP)  # frozen mid-run, lock held: however fast it captions, the second job meets it
    try:
        second = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"error: '{output}' is being written by process {first.pid} on " in second.stderr
    assert "Wait for that job to finish" in second.stderr and "captioning" not in second.stderr
    assert first.wait(timeout=120) == 0, first.stderr.read()[-2000:]
    rows = read_output(output)
    assert sorted(row["image"] for row in rows) == sorted(str(path) for path in photos.iterdir())
    assert output.read_text().count("image,caption") == 1
    assert not lock_path(output).exists()


def test_a_lock_left_by_a_killed_job_is_taken_over(model_dir, photos, tmp_path, capsys):
    output = tmp_path / "captions.jsonl"
    killed = start_holding_the_lock(caption_command(photos, model_dir, output), output)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert lock_path(output).exists()
    assert caption(photos, "--model", model_dir, "--output", output, *SHORT) == 0
    assert f"took over the lock of process {killed.pid} on " in capsys.readouterr().err
    rows = read_output(output)
    assert sorted(row["image"] for row in rows) == sorted(str(path) for path in photos.iterdir())
    assert not lock_path(output).exists()


def test_the_lock_excludes_a_second_holder_until_released(tmp_path):
    output = tmp_path / "out.jsonl"
    first, second = OutputLock(output), OutputLock(output)
    assert first.acquire() == []
    with pytest.raises(OutputLockedError, match=f"'{output}' is being written by process {os.getpid()} on "):
        second.acquire()
    first.release()
    assert not lock_path(output).exists()
    assert second.acquire() == []
    second.release()


# ----- reference-free scores -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_score_clip_adds_each_first_captions_clipscore(model_dir, photos, tmp_path, suffix):
    # The random captioner's captions are mostly [UNK] to this word-level vocabulary: CLIPScore scores them all the same.
    clip = str(save_tiny_clip(tmp_path / "clip", "a photo depicts dog red square".split()))
    output = tmp_path / f"captions{suffix}"
    paths = sorted(photos.iterdir())[:3]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert caption(*paths, bad, "--model", model_dir, "--output", output, "--score", "clip", "--clipscore-model", clip,
                   "--num-workers", "1", *SHORT) == 1
    rows = {row["image"]: row for row in read_output(output)}
    scorer = CLIPScorer(CLIPScoreSettings(model=clip))
    images = [Image.open(path).convert("RGB") for path in paths]
    expected = scorer.per_image(images, [rows[str(path)]["caption"] for path in paths])
    for path, want in zip(paths, expected):
        assert float(rows[str(path)]["clipscore"]) == pytest.approx(want["clipscore"], abs=0.01)
    assert rows[str(bad)]["clipscore"] in (None, "") and rows[str(bad)]["error"]


def test_clipscore_model_without_score_is_refused(model_dir, photos, capsys):
    assert caption(photos, "--model", model_dir, "--clipscore-model", "x") == 2
    assert "--clipscore-model is the model of --score clip: add --score clip." in capsys.readouterr().err
