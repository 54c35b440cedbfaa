"""`vision-gpt caption` at scale: webdataset and parquet inputs, parquet output, and the Ray engine (a local Ray
instance with two actors, killed and resumed)."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vision_gpt.caption.outputs import row_store

from .conftest import random_images
from .test_captioning import ENTRY_MODULE, SHORT, caption, model_dir, read_output  # noqa: F401 (model_dir: fixture)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


class Collection:
    """Two webdataset shards and a parquet file holding the same kind of images as a folder of PNGs, with bad
    samples: undecodable bytes, a sample with captions but no image, and a parquet row with no image."""

    def __init__(self, root):
        self.root = root
        root.mkdir()
        images = random_images(7)
        (root / "png").mkdir()
        for index, image in enumerate(images):
            image.save(root / "png" / f"{index}.png")
        write_tar(root / "shard-000.tar", {
            "0.png": png_bytes(images[0]), "0.txt": b"a red square\n",
            "1.png": png_bytes(images[1]), "1.json": json.dumps({"captions": ["one", "two"]}).encode(),
            "broken.jpg": b"not an image", "broken.txt": b"x",
        })
        write_tar(root / "shard-001.tar", {
            "2.png": png_bytes(images[2]), "lonely.txt": b"a caption without its image",
            "3.png": png_bytes(images[3]),
        })
        pq.write_table(pa.table({
            "key": ["4", "5", "6", "empty"],
            "image": [{"bytes": png_bytes(images[i]), "path": None} for i in (4, 5, 6)] + [None],
            "caption": ["a", "b", "c", "d"],
        }), root / "rows.parquet", row_group_size=2)  # several row groups, read one at a time
        # Where each sample's image is as a file: its captions must be the same from a shard.
        self.files = {f"{root / 'shard-000.tar'}/{i}": root / "png" / f"{i}.png" for i in (0, 1)}
        self.files.update({f"{root / 'shard-001.tar'}/{i}": root / "png" / f"{i}.png" for i in (2, 3)})
        self.files.update({f"{root / 'rows.parquet'}/{i}": root / "png" / f"{i}.png" for i in (4, 5, 6)})
        self.bad = {f"{root / 'shard-000.tar'}/broken": "not an image",
                    f"{root / 'shard-001.tar'}/lonely": "has no image member",
                    f"{root / 'rows.parquet'}/empty": "has no image"}
        self.inputs = [str(root / "shard-{000..001}.tar"), str(root / "rows.parquet")]


@pytest.fixture
def collection(tmp_path):
    return Collection(tmp_path / "collection")


def captions_of_files(model_dir, files, tmp_path, *extra) -> dict[str, str]:  # noqa: F811
    output = tmp_path / "files.jsonl"
    assert caption(*files, "--model", model_dir, "--output", output, *SHORT, *extra) == 0
    return {row["image"]: row["caption"] for row in read_output(output)}


def check_rows(rows, collection, by_file):
    """Every sample exactly once; captions as for the same images given as files; bad samples as error rows."""
    keys = [row["image"] for row in rows]
    assert sorted(keys) == sorted([*collection.files, *collection.bad])
    by_key = {row["image"]: row for row in rows}
    for key, path in collection.files.items():
        assert by_key[key]["caption"] == by_file[str(path)] and not by_key[key]["error"]
    for key, reason in collection.bad.items():
        assert reason in by_key[key]["error"] and key in by_key[key]["error"] and not by_key[key]["caption"]


def test_webdataset_shards_and_parquet_files_caption_like_the_same_images_as_files(model_dir, collection,  # noqa: F811
                                                                                     tmp_path, capsys):
    by_file = captions_of_files(model_dir, collection.files.values(), tmp_path)
    output = tmp_path / "captions.jsonl"
    assert caption(*collection.inputs, "--model", model_dir, "--output", output, "--batch-size", 3, *SHORT) == 1
    check_rows(read_output(output), collection, by_file)
    assert "done: 7 captioned" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["ROOT/shard-{001..000}.tar"], "runs backwards"),
    (["ROOT/shard-{000..002}.tar"], "shard-002.tar' is not a file"),
    (["ROOT/rows.parquet", "--image-column", "pixels"], "has no column 'pixels'"),
    (["ROOT/rows.parquet", "--engine", "ray", "--num-workers", "0"],
     "--num-workers is the number of Ray actors"),
    (["ROOT/rows.parquet", "--address", "auto"], "--address is for --engine ray"),
])
def test_shard_and_engine_usage_errors_name_the_input(model_dir, collection, extra, message, capsys):  # noqa: F811
    assert caption(*[arg.replace("ROOT", str(collection.root)) for arg in extra], "--model", model_dir) == 2
    assert message in capsys.readouterr().err


def test_parquet_output_has_typed_columns_and_resumes_from_an_interrupted_run(model_dir, collection,  # noqa: F811
                                                                              tmp_path, capsys):
    by_file = captions_of_files(model_dir, collection.files.values(), tmp_path, "--num-captions", "2")
    output = tmp_path / "captions.parquet"
    args = [*collection.inputs, "--model", model_dir, "--output", output, "--num-captions", 2, *SHORT]
    assert caption(*args) == 1
    table = pq.read_table(output)
    assert table.schema.field("captions").type == pa.list_(pa.string())
    assert table.schema.field("num_beams").type == pa.int64() and table.schema.field("do_sample").type == pa.bool_()
    rows = table.to_pylist()
    check_rows(rows, collection, by_file)
    store, _ = row_store(output, "parquet")
    assert not store.exists()

    # An interrupted rerun: the parquet file lost two rows, the row store holds one of them and half of another.
    kept = [row for row in rows if row["image"] not in list(collection.files)[:3]]
    pq.write_table(pa.Table.from_pylist(kept, schema=table.schema), output)
    lost = next(row for row in rows if row["image"] == list(collection.files)[0])
    store.write_text(json.dumps(lost) + "\n" + json.dumps(lost)[:20])
    capsys.readouterr()
    assert caption(*args) == 1
    err = capsys.readouterr().err
    assert "dropped a half-written last row" in err and "done: 2 captioned" in err
    check_rows(pq.read_table(output).to_pylist(), collection, by_file)
    assert not store.exists()


# ----- the Ray engine ------------------------------------------------------------------------------------------------


ray = pytest.importorskip("ray", reason="Ray Data is in the test extras; `pip install 'ray[data]'`")


def test_ray_engine_with_two_actors_captions_a_folder_and_shards_once_each(model_dir, collection,  # noqa: F811
                                                                             tmp_path, capsys):
    by_file = captions_of_files(model_dir, collection.files.values(), tmp_path)
    folder_rows = read_output(tmp_path / "files.jsonl")
    output = tmp_path / "captions.csv"
    code = caption(*collection.inputs, collection.root / "png", "--model", model_dir, "--output", output,
                   "--engine", "ray", "--num-workers", 2, "--batch-size", 2, *SHORT)
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert "on Ray: 2 actors of 1 CPUs" in err
    rows = read_output(output)
    folder = {row["image"]: row for row in rows if row["image"].endswith(".png")}
    shards = [row for row in rows if not row["image"].endswith(".png")]
    check_rows(shards, collection, by_file)
    # The folder's rows are those of the local engine, settings and all (CSV holds them as text); the scores within
    # float rounding, which depends on which images share a batch.
    local = {row["image"]: {key: "" if value is None else str(value) for key, value in row.items()}
             for row in folder_rows}
    scores = ("confidence", "grounding")
    assert {key: {k: v for k, v in row.items() if k not in scores} for key, row in folder.items()} == \
        {key: {k: v for k, v in row.items() if k not in scores} for key, row in local.items()}
    for key, row in folder.items():
        for name in scores:
            if row[name] or local[key][name]:
                assert float(row[name]) == pytest.approx(float(local[key][name]), abs=1e-4), (key, name)
    assert not ray.is_initialized()  # the local instance it started is gone


def test_a_killed_ray_run_resumes_without_losing_or_repeating_a_row(model_dir, tmp_path):  # noqa: F811
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(random_images(40)):
        image.save(folder / f"{index:02d}.png")
    output = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", ENTRY_MODULE, "caption", str(folder), "--model", model_dir, "--output",
               str(output), "--engine", "ray", "--num-workers", "2", "--batch-size", "1", *SHORT]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Its own session, so that the kill takes the local Ray instance with it, as a kill of a job does.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    deadline = time.time() + 240
    try:
        while not (output.exists() and output.read_text().count("\n") >= 5):
            assert process.poll() is None and time.time() < deadline, "the Ray run wrote no rows"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    written = output.read_text().count("\n")
    assert 5 <= written < 40, "the kill came too late to test resuming"

    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped {written} already captioned" in result.stderr
    rows = read_output(output)
    assert sorted(row["image"] for row in rows) == sorted(str(folder / f"{index:02d}.png") for index in range(40))
    assert all(row["caption"] and not row["error"] for row in rows)
