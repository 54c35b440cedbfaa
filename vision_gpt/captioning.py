"""`vision-gpt caption`: caption many images with a trained model, resumably, on one or many processes, or on Ray.

Inputs are image files, folders (searched recursively), glob patterns, list files (`--from-file`), webdataset tar
shards and parquet files (`vision_gpt.shards`), and `datasets` splits (`--dataset`). Images are decoded and
preprocessed by DataLoader workers while the model generates, so decoding overlaps generation. A few images (at most
`TABLE_LIMIT`, no `--output`) are printed as a table; otherwise rows go to a JSONL, CSV or parquet file, appended and
flushed after every batch, one line per image (a parquet output collects its rows in a JSONL file next to it until the
run ends). Rerunning with the same `--output` skips the images it already holds, so an interrupted job loses at most
one batch. Under `accelerate launch` every process captions its share into a part file next to `--output`, and the
main process merges the parts when all are done. With `--engine ray` (`vision_gpt.ray_engine`), Ray Data actors
caption the images and this process writes their rows.

An image that cannot be read becomes an error row naming the file and the reason; the run goes on and exits with 1.
"""

import argparse
import csv
import glob
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import hardware
from .data import open_stored_image
from .modeling.processing_vision_gpt import ImageLoadError, load_image
from .onnx_runtime import ONNX_DTYPES
from .output_lock import OutputLock
from .shards import ShardMember, expand_braces, list_parquet, list_webdataset, shard_kind

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Up to this many images (and no --output) the captions are printed as a table; more belong in a resumable file.
TABLE_LIMIT = 20
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# The decoding settings written into every row, in this order (CSV columns follow it).
SETTINGS = ("model", "num_beams", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_captions",
            "dtype", "seed")
SAMPLING_FLAGS = ("temperature", "top_p", "top_k")


@dataclass
class ImageRef:
    """One image to caption: `key` names it in the output (and is what resuming matches); `source` is a file path, a
    row index into `--dataset`, a `ShardMember` (an image in a webdataset tar or a parquet file), or None for a shard
    sample that has no image (its row says so)."""

    key: str
    source: str | int | ShardMember | None


# ----- inputs --------------------------------------------------------------------------------------------------------


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_folder(folder: str) -> list[str]:
    """Image files under `folder`, recursively, in sorted order so that every process sees the same list."""
    found = []
    for root, dirs, files in os.walk(folder):
        # Hidden entries are skipped: macOS writes `._name.jpg` resource forks that are not images.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and _is_image_file(f)]
    return found


def _expand_argument(argument: str) -> list[str]:
    """A command-line input as image and shard paths: a file as is, a folder walked, a glob expanded (for quoted
    globs), a webdataset brace range (`shards/{000000..000099}.tar`) spelled out."""
    if os.path.isdir(argument):
        return _walk_folder(argument)
    if os.path.exists(argument):
        # A file named explicitly is captioned whatever its extension; if it is not an image, its row says so.
        return [argument]
    names = expand_braces(argument) if "{" in argument else [argument]
    if len(names) > 1:
        return [path for name in names for path in _expand_argument(name)]
    if glob.has_magic(argument):
        paths = []
        for match in sorted(glob.glob(argument, recursive=True)):
            if os.path.isdir(match):
                paths += _walk_folder(match)
            elif _is_image_file(match) or shard_kind(match):
                paths.append(match)
        if not paths:
            raise ValueError(f"The pattern '{argument}' matches no image files ({', '.join(IMAGE_EXTENSIONS)}) and no "
                             "shards (.tar, .parquet); check the pattern, or name other files explicitly.")
        return paths
    raise ValueError(f"'{argument}' is not a file, a folder or a glob pattern that exists; check the path.")


def shard_refs(path: str, image_column: str | None = None, id_column: str | None = None) -> list[ImageRef]:
    """One ref per sample of a webdataset tar or a parquet file, keyed `SHARD/KEY` (the sample's key in a tar; the id
    column's value, or the row number, in parquet), listed without reading any image."""
    if shard_kind(path) == "webdataset":
        samples = list_webdataset(path, captions=False)
    else:
        samples = list_parquet(path, image_column, id_column)
    shard = os.path.normpath(path)
    return [ImageRef(f"{shard}/{sample.key}", sample.image) for sample in samples]


def _read_list_file(list_file: str) -> list[str]:
    """Paths from a list file ('-' is stdin): one file or folder per line, taken literally (file names may contain
    glob characters); blank lines and lines starting with '#' are ignored; relative paths are relative to the current
    directory, as on the command line."""
    # Read as bytes and split only at line ends: a file name that is not UTF-8 is still a file name on Linux, and
    # surrogateescape maps it back to the very bytes the file system has.
    if list_file == "-":
        raw = sys.stdin.buffer.read()
    else:
        try:
            raw = Path(list_file).read_bytes()
        except OSError as error:
            raise ValueError(f"Cannot read the list file --from-file '{list_file}': {error.strerror}.") from None
    lines = raw.decode("utf-8-sig", errors="surrogateescape").split("\n")
    paths = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # A missing listed file is not fatal: lists of 100k paths go stale, and its error row names it.
        paths += _walk_folder(line) if os.path.isdir(line) else [line]
    return paths


def collect_inputs(arguments: list[str], list_files: list[str], image_column: str | None = None,
                   id_column: str | None = None) -> list[ImageRef]:
    """Every image named by the command-line inputs and list files, once each, keyed by its normalised path; the
    samples of webdataset tars and parquet files (`image_column` and `id_column` name a parquet file's columns)."""
    refs, seen = [], set()
    paths = [path for argument in arguments for path in _expand_argument(argument)]
    paths += [path for list_file in list_files for path in _read_list_file(list_file)]
    for path in paths:
        # normpath makes `./a.jpg` and `a.jpg` one image, so a folder and a glob over it never caption it twice.
        key = os.path.normpath(path)
        if key in seen:
            continue
        seen.add(key)
        if shard_kind(path) and os.path.isfile(path):
            refs += shard_refs(path, image_column, id_column)
        else:
            refs.append(ImageRef(key, path))
    return refs


def load_dataset_split(name_or_path: str, split: str | None, image_column: str | None, id_column: str | None):
    """
    A `datasets` split as (dataset with only its image column, kept encoded; refs). A `save_to_disk` folder loads with
    `load_from_disk`, anything else with `load_dataset`. Rows are keyed by `id_column` (default: an `image_id` or `id`
    column when there is one), else by `SPLIT-ROW` as in `vision_gpt.data`.
    """
    import datasets

    if Path(name_or_path).is_dir() and any(
            (Path(name_or_path) / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        loaded = datasets.load_from_disk(name_or_path)
    else:
        # Naming the split here loads (and, from the Hub, downloads) only that one.
        loaded = datasets.load_dataset(name_or_path, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise ValueError(f"--dataset '{name_or_path}' has splits {list(loaded)}; choose one with --split.")
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"--dataset '{name_or_path}' has no split {split!r}; its splits are {list(loaded)}.")
        dataset = loaded[split]
    else:
        dataset, split = loaded, split or "train"
    features = dataset.features
    if image_column is None:
        image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)),
                            "image" if "image" in features else None)
    if image_column not in features:
        raise ValueError(f"--dataset '{name_or_path}' split {split!r} has no image column "
                         f"{'' if image_column is None else repr(image_column) + ' '}(columns: {list(features)}); "
                         "pass --image-column.")
    if id_column is None:
        id_column = next((c for c in ("image_id", "id") if c in features), None)
    elif id_column not in features:
        raise ValueError(f"--id-column {id_column!r} is not a column of --dataset '{name_or_path}' "
                         f"(columns: {list(features)}).")
    if id_column is not None:
        keys = [str(value) for value in dataset[id_column]]
        if len(set(keys)) != len(keys):
            raise ValueError(f"Column {id_column!r} of --dataset '{name_or_path}' has repeated values, so it cannot "
                             "key the output rows; pass another --id-column.")
    else:
        keys = [f"{split}-{index}" for index in range(len(dataset))]
    dataset = dataset.select_columns([image_column])
    if isinstance(features[image_column], datasets.Image):
        # Decode in the workers, through load_image: a bad image becomes an error row, not a crash in `datasets`.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset, [ImageRef(key, index) for index, key in enumerate(keys)]


# ----- decoding, in DataLoader workers -------------------------------------------------------------------------------


class ImageDecoder(torch.utils.data.Dataset):
    """Loads and preprocesses one image per item: `(key, pixel_values (C, H, W), None)`, or `(key, None, reason)` for
    an image that cannot be read, so that one bad file never stops the run. With a `score_processor` (CLIP's, for
    `--score clip`), the pixel values are a pair: the captioner's and CLIP's."""

    def __init__(self, refs: list[ImageRef], image_processor, dataset=None, max_image_pixels: int | None = None,
                 score_processor=None):
        self.refs = refs
        self.image_processor = image_processor
        self.dataset = dataset
        self.max_image_pixels = max_image_pixels
        # Only the image processor travels to the workers, not the CLIP model.
        self.score_processor = score_processor

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, index):
        ref = self.refs[index]
        try:
            if ref.source is None:
                raise ImageLoadError(f"Shard sample '{ref.key}' has no image member (only its other files).")
            if isinstance(ref.source, ShardMember):
                image = open_stored_image(ref.source, ref.key)
            elif isinstance(ref.source, int):
                image = open_stored_image(self.dataset[ref.source][self.dataset.column_names[0]], ref.key)
            else:
                self._check_size(ref)  # from the header, before decoding
                image = load_image(ref.source)
            self._check_size(ref, image.size)
            pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
            if self.score_processor is not None:
                clip_pixels = self.score_processor(images=image, return_tensors="pt")["pixel_values"][0]
                pixel_values = (pixel_values, clip_pixels)
        except _TooLarge as error:
            return ref.key, None, (f"Image '{ref.key}' is too large: {error} (the limit is --max-image-pixels "
                                   f"{self.max_image_pixels}; raise it or downscale the image).")
        except ImageLoadError as error:
            return ref.key, None, _one_line(error if ref.key in str(error) else f"Image '{ref.key}': {error}")
        except Image.DecompressionBombError as error:
            return ref.key, None, _one_line(f"Image '{ref.key}' is too large to decode safely: {error}")
        except Exception as error:  # noqa: BLE001
            # PIL's format plugins raise many types on malformed files (struct.error, IndexError, ...); one such file
            # must cost one error row, not a 100k-image run.
            return ref.key, None, _one_line(f"Image '{ref.key}' could not be read: {type(error).__name__}: {error}")
        return ref.key, pixel_values, None

    def _check_size(self, ref, size=None):
        """Refuse images over `--max-image-pixels` (a per-run limit; PIL's own guard, process-wide, stays as is)."""
        if self.max_image_pixels is None:
            return
        if size is None:
            try:
                with Image.open(ref.source) as header:
                    size = header.size
            except Exception:  # noqa: BLE001 - unreadable files get their real error from load_image next
                return
        if size[0] * size[1] > self.max_image_pixels:
            raise _TooLarge(f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels")


class _TooLarge(ValueError):
    pass


def _keep_items(items):
    """The DataLoader's collate: items stay a list, since error items have no tensor to stack."""
    return items


def _one_line(text) -> str:
    # Every output row is one line, which is what lets a resumed run find and drop a half-written last row.
    return " ".join(str(text).split())


# ----- output files --------------------------------------------------------------------------------------------------


def output_format(path: str) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"--output '{path}' must end in .jsonl (one JSON object per line), .csv or .parquet; the "
                         "format is taken from the extension.")
    return fmt


def row_store(output: Path, fmt: str) -> tuple[Path, str]:
    """Where rows are appended as they are captioned, and in which format. A parquet file cannot be appended to (its
    footer comes last, and a killed writer leaves none), so a parquet output collects its rows in a JSONL file next to
    it, `OUT.parquet.rows.jsonl`, which `finish_parquet` turns into the parquet file at the end of the run."""
    if fmt == "parquet":
        return output.with_name(output.name + ".rows.jsonl"), "jsonl"
    return output, fmt


def parquet_schema(num_captions: int, clipscore: bool = False):
    """The typed columns of a parquet output: a column's type never depends on whether its first row was an error."""
    import pyarrow as pa

    types = {"image": pa.string(), "caption": pa.string(), "captions": pa.list_(pa.string()),
             "clipscore": pa.float64(), "error": pa.string(), "model": pa.string(), "num_beams": pa.int64(),
             "max_new_tokens": pa.int64(), "do_sample": pa.bool_(), "temperature": pa.float64(),
             "top_p": pa.float64(), "top_k": pa.int64(), "num_captions": pa.int64(), "dtype": pa.string(),
             "seed": pa.int64()}
    names = ["image", "caption", *(["captions"] if num_captions > 1 else []), *(["clipscore"] if clipscore else []),
             "error", *SETTINGS]
    return pa.schema([(name, types[name]) for name in names])


def _parquet_text(value):
    # A file name that is not UTF-8 reaches us with surrogate escapes, which parquet's UTF-8 strings cannot hold.
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def absorb_parquet(output: Path, store: Path, schema) -> int:
    """Copy the rows of an existing parquet output that the row store lacks into the store, so that the store holds
    every row and the parquet file can be rewritten from it alone. Returns how many were copied."""
    import pyarrow.parquet as pq

    if not output.exists():
        return 0
    try:
        table = pq.read_table(output)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise ValueError(f"--output '{output}' exists but is not a parquet file vision-gpt can read ({error}); move "
                         "it away or choose a new --output.") from None
    if table.schema.names != schema.names:
        raise ValueError(f"'{output}' has the columns {table.schema.names}, but this run writes {schema.names} "
                         "(different --num-captions or --score?). Resume with the settings that wrote it, or choose a "
                         "new --output.")
    held = {row["image"] for row in read_rows(store, "jsonl")}
    missing = [row for row in table.to_pylist() if row["image"] not in held]
    writer = RowWriter(store, "jsonl", schema.names)
    writer.write(missing)
    writer.close()
    return len(missing)


def finish_parquet(output: Path, store: Path, schema) -> int:
    """Write every row of the store into the parquet `output` (through a temporary file and a rename, so that a kill
    here leaves the old file whole), then delete the store. Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{name: _parquet_text(row.get(name)) for name in schema.names} for row in read_rows(store, "jsonl")]
    temporary = output.with_name(output.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), temporary)
    os.replace(temporary, output)
    store.unlink(missing_ok=True)
    return len(rows)


def csv_columns(num_captions: int, clipscore: bool = False) -> list[str]:
    extra = [f"caption_{i}" for i in range(2, num_captions + 1)]
    return ["image", "caption", *extra, *(["clipscore"] if clipscore else []), "error", *SETTINGS]


def part_path(output: str, rank: int) -> Path:
    """Where process `rank` writes its rows under `accelerate launch`: `out.part-1.jsonl` next to `out.jsonl`."""
    path = Path(output)
    return path.with_name(f"{path.stem}.part-{rank}{path.suffix}")


def leftover_parts(output: str) -> list[Path]:
    path = Path(output)
    pattern = f"{glob.escape(path.stem)}.part-*{glob.escape(path.suffix)}"
    return sorted(p for p in path.parent.glob(pattern) if p.stem.rsplit(".part-", 1)[-1].isdigit())


def repair_last_line(path: Path) -> bool:
    """Drop a half-written last row (from a killed run), so that appending continues on a line boundary. True if one
    was dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return False
        # Scan back for the last complete line in chunks: outputs can hold 100k rows.
        end, keep = size, 0
        while end > 0:
            start = max(0, end - 65536)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        file.truncate(keep)
    return True


def read_rows(path: Path, fmt: str, expected_columns: list[str] | None = None):
    """The rows of an output or part file as dicts (CSV values are strings)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as file:
        if fmt == "csv":
            reader = csv.DictReader(file)
            if reader.fieldnames is None:
                return
            if expected_columns is not None and reader.fieldnames != expected_columns:
                raise ValueError(
                    f"'{path}' has the columns {reader.fieldnames}, but this run writes {expected_columns} (different "
                    "--num-captions?). Resume with the settings that wrote it, or choose a new --output.")
            yield from reader
            return
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or "image" not in row:
                raise ValueError(f"Line {number} of '{path}' is not a row written by `vision-gpt caption`; remove or "
                                 "fix that line, or choose a new --output.")
            yield row


class RowWriter:
    """Appends rows to a JSONL or CSV file and flushes them, so that a killed run keeps every finished batch."""

    def __init__(self, path: Path, fmt: str, columns: list[str]):
        self.fmt = fmt
        new = not path.exists() or path.stat().st_size == 0
        # newline="" lets the csv module write exactly "\n" line ends, which repair_last_line relies on;
        # surrogateescape round-trips file names that are not valid UTF-8 instead of failing on them.
        self.file = open(path, "a", newline="", encoding="utf-8", errors="surrogateescape")
        if fmt == "csv":
            self.writer = csv.DictWriter(self.file, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
            if new:
                self.writer.writeheader()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if self.fmt == "csv":
                self.writer.writerow(row)
            else:
                self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def merge_parts(output: Path, fmt: str, columns: list[str]) -> int:
    """Append the rows of every part file to `output` and delete the parts. Rows already in `output` are skipped, so
    a merge interrupted half-way can simply run again. Returns how many rows were added."""
    parts = leftover_parts(str(output))
    if not parts:
        return 0
    repair_last_line(output)
    existing = {row["image"] for row in read_rows(output, fmt, columns)}
    writer = RowWriter(output, fmt, columns)
    added = 0
    try:
        for part in parts:
            repair_last_line(part)
            rows = [row for row in read_rows(part, fmt, columns) if row["image"] not in existing]
            writer.write(rows)
            existing.update(row["image"] for row in rows)
            added += len(rows)
    finally:
        writer.close()
    for part in parts:
        part.unlink()
    return added


def _repair(path: Path) -> list[str]:
    if repair_last_line(path):
        return [f"{path}: dropped a half-written last row (from an interrupted run); that image is captioned again."]
    return []


def prepare_output(output: Path, fmt: str, columns: list[str], retry_errors: bool) -> tuple[dict[str, bool], list[str]]:
    """Make `output` ready to append to: drop a half-written last row, merge parts left by an interrupted multi-process
    run, and (with `retry_errors`) remove error rows. Returns {image key: True if its row is an error} for the rows it
    holds, and messages for the user."""
    notes = _repair(output)
    merged = merge_parts(output, fmt, columns)
    if merged:
        notes.append(f"{output}: merged {merged} rows left in part files by an interrupted multi-process run.")
    rows = list(read_rows(output, fmt, columns))
    if retry_errors and any(row.get("error") for row in rows):
        kept = [row for row in rows if not row.get("error")]
        # Rewrite to a temporary file and rename, so that a kill here never leaves a half-written output.
        temporary = output.with_name(output.name + ".tmp")
        temporary.unlink(missing_ok=True)
        writer = RowWriter(temporary, fmt, columns)
        writer.write(kept)
        writer.close()
        os.replace(temporary, output)
        notes.append(f"{output}: removed {len(rows) - len(kept)} error rows; --retry-errors tries those images again.")
        rows = kept
    return {row["image"]: bool(row.get("error")) for row in rows}, notes


def make_row(key: str, captions: list[str] | None, error: str | None, settings: dict, fmt: str | None) -> dict:
    """One output row; `captions` (N of them) is None when the image could not be read."""
    row = {"image": key, "caption": captions[0] if captions else None}
    num_captions = settings["num_captions"]
    if num_captions > 1:
        if fmt == "csv":
            row.update({f"caption_{n}": captions[n - 1] if captions else None for n in range(2, num_captions + 1)})
        else:
            row["captions"] = captions
    return {**row, "error": error, **settings}


def format_table(rows: list[dict], header: str) -> str:
    """The captions as a two-column table; with several captions per image, one numbered line each."""
    width = max([len("image")] + [len(row["image"]) for row in rows])
    lines = [header, "", f"{'image':<{width}}  caption", f"{'-' * width}  {'-' * 7}"]
    for row in rows:
        if row["error"]:
            texts = [f"ERROR: {row['error']}"]
        else:
            captions = row.get("captions") or [row["caption"]]
            texts = captions if len(captions) == 1 else [f"{i}. {c}" for i, c in enumerate(captions, 1)]
        for i, text in enumerate(texts):
            lines.append(f"{row['image'] if i == 0 else '':<{width}}  {text}")
    return "\n".join(lines)


# ----- decoding settings ---------------------------------------------------------------------------------------------


def settings_in_use(generation_config, given: dict, names) -> dict:
    """The value generate uses for each of `names`: the one given, else the model's generation config's, else
    generate's own default (transformers 5 leaves unset fields None in the config), so that rows record what was used."""
    from transformers import GenerationConfig

    library = GenerationConfig._get_default_generation_params()
    used = {}
    for name in names:
        candidates = (given.get(name), getattr(generation_config, name, None), library.get(name))
        used[name] = next((value for value in candidates if value is not None), None)
    return used


def decoding_settings(args, generation_config) -> tuple[dict, dict]:
    """(`generate` kwargs for the flags given; every setting as used, for the rows). Flags not given fall back to the
    model's generation_config."""
    given = {
        "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "num_return_sequences": args.num_captions,
    }
    for name, flag in (("num_beams", "--num-beams"), ("max_new_tokens", "--max-new-tokens"),
                       ("num_return_sequences", "--num-captions")):
        if given[name] is not None and given[name] < 1:
            raise ValueError(f"{flag} must be at least 1, got {given[name]}.")
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}; for deterministic captions drop "
                         "--do-sample instead.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or more, got {args.top_k}.")
    generate_kwargs = {name: value for name, value in given.items() if value is not None}
    used = settings_in_use(generation_config, given, given)
    if not used["do_sample"]:
        ignored = [f"--{name.replace('_', '-')}" for name in SAMPLING_FLAGS if getattr(args, name) is not None]
        if ignored:
            one = len(ignored) == 1
            raise ValueError(f"{', '.join(ignored)} only matter{'s' if one else ''} with --do-sample; add --do-sample, "
                             f"or drop {'it' if one else 'them'}.")
        if used["num_return_sequences"] > used["num_beams"]:
            raise ValueError(f"--num-captions {used['num_return_sequences']} needs at least as many beams (the model "
                             f"uses --num-beams {used['num_beams']}), or --do-sample for sampled captions.")
    settings = {
        "num_beams": used["num_beams"], "max_new_tokens": used["max_new_tokens"], "do_sample": used["do_sample"],
        # Sampling knobs are recorded only when sampling: greedy and beam search never read them.
        **{name: used[name] if used["do_sample"] else None for name in SAMPLING_FLAGS},
        "num_captions": used["num_return_sequences"],
    }
    return generate_kwargs, settings


def caption_batches(loader, model, processor, generate_kwargs: dict, settings: dict, fmt: str | None,
                    scorer=None):
    """Yield the rows of each batch of `loader` (an `ImageDecoder`'s): readable images are captioned in one `generate`
    call, the others become error rows. With a `scorer` (a `CLIPScorer`), each row also gets the CLIPScore of its
    first caption."""
    num_captions = settings["num_captions"]
    for items in loader:
        good = [(key, pixels) for key, pixels, error in items if error is None]
        captions, scores = {}, {}
        if good:
            own = [pixels[0] if scorer is not None else pixels for _, pixels in good]
            pixel_values = torch.stack(own).to(device=model.device, dtype=model.dtype)  # (B, C, H, W)
            sequences = model.generate(pixel_values=pixel_values, **generate_kwargs)  # (B * N, L), by image
            texts = [_one_line(text) for text in processor.batch_decode(sequences)]
            captions = {key: texts[i * num_captions:(i + 1) * num_captions] for i, (key, _) in enumerate(good)}
            if scorer is not None:
                values = scorer.score_pixels(torch.stack([pixels[1] for _, pixels in good]),
                                             [captions[key][0] for key, _ in good])
                scores = {key: round(value, 2) for (key, _), value in zip(good, values)}
        rows = [make_row(key, captions.get(key), error, settings, fmt) for key, _, error in items]
        if scorer is not None:
            for row in rows:
                row["clipscore"] = scores.get(row["image"])
        yield rows


def _dtype_name(text: str) -> str:
    return DTYPE_ALIASES.get(text.lower(), text.lower())


def _resolve_device(requested: str, state) -> torch.device:
    if state.num_processes > 1:
        if requested not in ("auto", "cpu"):
            raise ValueError(f"--device {requested} cannot be used under a multi-process launch: each process takes "
                             "its own accelerator. Leave --device auto (or use cpu).")
        return state.device
    if requested == "auto":
        return state.device
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available on this machine; use --device cpu or auto.")
    return device


# ----- the command ---------------------------------------------------------------------------------------------------


def _broadcast(state, value):
    """`value` as computed on the main process, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _gather(state, values: list) -> list:
    if state.num_processes == 1:
        return values
    from accelerate.utils import gather_object

    return gather_object(values)


def _on_main(state, function):
    """Run `function` on the main process only and hand its result (or its ValueError) to every process, so that a
    user error on the main process stops all of them instead of leaving the others waiting."""
    result = error = None
    if state.is_main_process:
        try:
            result = function()
        except ValueError as caught:
            error = str(caught)
    result, error = _broadcast(state, (result, error))
    if error is not None:
        raise ValueError(error)
    return result


def run(args) -> int:
    """Caption the inputs of `args` (parsed by the parser `register` builds). Returns the exit code: 0, or 1 when
    any image could not be captioned."""
    from accelerate import PartialState

    def say(message):
        if state.is_main_process:
            print(message, file=sys.stderr, flush=True)

    if not (args.images or args.from_file or args.dataset):
        raise ValueError("Nothing to caption: give image files, folders or glob patterns, --from-file LIST, or "
                         "--dataset NAME_OR_FOLDER.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.clipscore_model and not args.score:
        raise ValueError("--clipscore-model is the model of --score clip: add --score clip.")
    dtype_name = args.dtype or "float32"
    if args.runtime == "onnx":
        if dtype_name not in ONNX_DTYPES:
            raise ValueError(f"--runtime onnx runs the graphs of an export: --dtype {' '.join(ONNX_DTYPES)}, not "
                             f"{dtype_name}.")
        if args.device not in ("auto", "cpu"):
            raise ValueError(f"--runtime onnx runs on ONNX Runtime's CPU provider; drop --device {args.device}.")
    elif dtype_name not in DTYPES:
        raise ValueError(f"--dtype {dtype_name} is a quantized ONNX export's: add --runtime onnx (and pass the folder "
                         "`vision-gpt export-onnx --quantize int8` wrote).")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.engine == "ray":
        if world_size > 1:
            raise ValueError("--engine ray runs from one process, which hands the images to Ray's actors; start it "
                             "with plain `vision-gpt caption`, not under accelerate launch or torchrun.")
        if args.num_workers is not None and args.num_workers < 1:
            raise ValueError(f"--num-workers is the number of Ray actors with --engine ray: at least 1, got "
                             f"{args.num_workers}.")
    elif args.address or args.cpus_per_worker is not None:
        raise ValueError(f"{'--address' if args.address else '--cpus-per-worker'} is for --engine ray; add "
                         "--engine ray, or drop it.")
    # Under torchrun without accelerators, PartialState() would make every process a separate single-process run;
    # cpu=True makes them one gloo group that splits the images.
    use_cpu = args.device == "cpu" or args.runtime == "onnx" or (
        world_size > 1 and not torch.accelerator.is_available())
    state = PartialState(cpu=use_cpu)
    # With Ray, the actors take the devices of the nodes they run on, which the driver's machine may lack.
    device = torch.device("cpu") if args.engine == "ray" else _resolve_device(args.device, state)

    refs = collect_inputs(args.images, args.from_file, args.image_column, args.id_column)
    dataset = None
    if args.dataset:
        dataset, dataset_refs = load_dataset_split(args.dataset, args.split, args.image_column, args.id_column)
        refs += dataset_refs
    if not refs:
        raise ValueError("The inputs hold no images (folders are searched for " + ", ".join(IMAGE_EXTENSIONS) + ").")
    if args.output is None and len(refs) > TABLE_LIMIT:
        raise ValueError(f"{len(refs)} images are too many for a table on the terminal (at most {TABLE_LIMIT}); pass "
                         "--output captions.jsonl (or .csv): rows are written as they are captioned, and rerunning "
                         "the same command resumes where it stopped.")
    fmt = output_format(args.output) if args.output else None
    lock = None
    if args.output:
        # One job per output, for the whole run (the other processes of a multi-process run write part files
        # that the main process merges): taken before the model loads, so a second job stops at once.
        lock = OutputLock(Path(args.output)) if state.is_main_process else None
        if lock is not None:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        for note in _on_main(state, lambda: lock.acquire()):
            say(note)
    try:
        return _caption(args, state, device, refs, dataset, fmt, say)
    finally:
        if lock is not None:
            lock.release()


def load_captioner(args, device: torch.device, dtype_name: str, say=None):
    """(model on `device` in eval mode, processor, CLIPScorer or None) as the flags ask; a model that cannot be loaded
    is a ValueError naming it. With `--runtime onnx` the model is an `ONNXCaptioner` over an exported folder."""
    from transformers import AutoModel, AutoProcessor

    if args.runtime == "onnx":
        from .onnx_runtime import ONNXCaptioner

        try:
            model = ONNXCaptioner(args.model, dtype=ONNX_DTYPES[dtype_name])
        except (ImportError, OSError) as error:
            raise ValueError(f"--runtime onnx: {error}") from None
        processor = model.processor
    else:
        try:
            model = AutoModel.from_pretrained(args.model, dtype=DTYPES[dtype_name],
                                              trust_remote_code=args.trust_remote_code)
            processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        except OSError as error:
            raise ValueError(f"Could not load the model --model '{args.model}': {error}\nPass a folder written by "
                             "save_pretrained (or `vision-gpt assemble`), or a Hub id; offline (HF_HUB_OFFLINE=1) a "
                             "Hub model must already be in the cache; for an ONNX export, add --runtime onnx.") from None
        model.to(device).eval()
    scorer = None
    if args.score:
        from .clipscore import DEFAULT_MODEL as CLIP_MODEL, CLIPScorer, CLIPScoreSettings

        scorer = CLIPScorer(CLIPScoreSettings(model=args.clipscore_model or CLIP_MODEL), device=str(device))
        if say is not None:
            say(scorer.description)
    return model, processor, scorer


def run_settings(args, generation_config, dtype_name: str) -> tuple[dict, dict]:
    """(`generate` kwargs, the settings every row records, in `SETTINGS` order; the dtype of an ONNX run is recorded
    as `onnx-fp32`, `onnx-int8`, ...)."""
    generate_kwargs, settings = decoding_settings(args, generation_config)
    dtype = f"onnx-{ONNX_DTYPES[dtype_name]}" if args.runtime == "onnx" else dtype_name
    return generate_kwargs, {"model": args.model, **settings, "dtype": dtype, "seed": args.seed}


def _caption(args, state, device, refs, dataset, fmt, say) -> int:
    from transformers import set_seed

    dtype_name = args.dtype or "float32"
    local_cpu = args.engine == "local" and device.type == "cpu"
    if dtype_name == "bfloat16" and local_cpu and not hardware.cpu_bf16_is_native():
        say(f"warning: --dtype bfloat16 on the CPU: {hardware.describe_cpu_bf16()}; use --dtype float32 (the default) "
            "here")

    if args.engine == "ray":
        from .ray_engine import model_generation_config

        # The actors load the model; here only its decoding defaults are needed, to check the flags before Ray starts.
        model = processor = scorer = None
        generate_kwargs, settings = run_settings(args, model_generation_config(args), dtype_name)
    else:
        model, processor, scorer = load_captioner(args, device, dtype_name, say)
        generate_kwargs, settings = run_settings(args, model.generation_config, dtype_name)
    columns = csv_columns(settings["num_captions"], clipscore=bool(args.score))
    if args.seed is not None:
        set_seed(args.seed)

    done = {}
    if args.output:
        output = Path(args.output)
        store, store_fmt = row_store(output, fmt)
        schema = parquet_schema(settings["num_captions"], clipscore=bool(args.score)) if fmt == "parquet" else None

        def prepare():
            notes = []
            if schema is not None:
                notes += _repair(store)
                absorbed = absorb_parquet(output, store, schema)
                notes += [f"{output}: resuming from its {absorbed} rows."] if absorbed else []
            held, more = prepare_output(store, store_fmt, columns, args.retry_errors)
            return held, notes + more

        done, notes = _on_main(state, prepare)
        for note in notes:
            say(note)
    todo = [ref for ref in refs if ref.key not in done]
    skipped = len(refs) - len(todo)
    skipped_errors = sum(done[ref.key] for ref in refs if ref.key in done)
    if skipped:
        say(f"skipped {skipped} already captioned in {args.output}"
            + (f" ({skipped_errors} of them error rows; --retry-errors tries them again)" if skipped_errors else ""))

    if args.engine == "ray":
        from .ray_engine import caption_with_ray

        share = todo
        batches = caption_with_ray(args, todo, dataset, dtype_name, say)
    else:
        # Contiguous shares: process i captions todo[i * n / P : (i + 1) * n / P].
        with state.split_between_processes(todo) as share:
            share = list(share)
        num_workers = min(4, os.cpu_count() or 1) if args.num_workers is None else args.num_workers
        decoder = ImageDecoder(share, processor.image_processor, dataset, args.max_image_pixels,
                               scorer.image_processor if scorer is not None else None)
        loader = torch.utils.data.DataLoader(
            decoder, batch_size=args.batch_size, num_workers=num_workers, collate_fn=_keep_items,
            pin_memory=device.type == "cuda")
        processes = f", {state.num_processes} processes" if state.num_processes > 1 else ""
        say(f"captioning {len(todo)} images with {args.model} on {device} ({settings['dtype']}{processes}), batch "
            f"size {args.batch_size}, decoding workers: {num_workers}")
        batches = caption_batches(loader, model, processor, generate_kwargs, settings, fmt, scorer)
    sink = None
    if args.output:
        sink = RowWriter(part_path(str(store), state.process_index) if state.num_processes > 1 else store,
                         store_fmt, columns)

    table_rows, captioned, failed = [], 0, 0
    started = time.perf_counter()
    # Ray draws its own progress bars, one per stage of the pipeline.
    progress = tqdm(total=len(share), unit=" images", disable=not state.is_main_process or not share
                    or args.engine == "ray",
                    desc="captioning" + (f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""))
    try:
        for batch in batches:
            failed += sum(1 for row in batch if row["error"])
            captioned += sum(1 for row in batch if not row["error"])
            if sink is not None:
                sink.write(batch)
            else:
                table_rows += batch
            progress.update(len(batch))
    finally:
        progress.close()
        if sink is not None:
            sink.close()
    elapsed = time.perf_counter() - started

    counts = _gather(state, [(captioned, failed, elapsed)])
    captioned, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
    elapsed = max(c[2] for c in counts)  # the slowest process: the rate is the job's, not one process's
    if args.output:
        state.wait_for_everyone()
        if state.num_processes > 1:
            _on_main(state, lambda: merge_parts(store, store_fmt, columns))
        if schema is not None:
            _on_main(state, lambda: finish_parquet(output, store, schema))
    else:
        table_rows = _gather(state, table_rows)
        header = "  ".join(f"{name}={settings[name]}" for name in SETTINGS if settings[name] is not None)
        if state.is_main_process:
            print(format_table(table_rows, header), flush=True)

    rate = f" in {elapsed:.1f} s ({captioned / elapsed:.1f} images/s)" if captioned and elapsed > 0 else ""
    say(f"done: {captioned} captioned{rate}, {failed} failed, {skipped} skipped (already in the output)"
        + (f"; rows in {args.output}" if args.output else ""))
    if failed or skipped_errors:
        bad = failed + skipped_errors
        rows = "their rows have" if bad != 1 else "its row has"
        say(f"{bad} image{'s' if bad != 1 else ''} could not be read; {rows} an 'error' field naming the file and the "
            "reason.")
        return 1
    return 0


HELP = ("caption images, folders, globs, list files, shards or a datasets split, into a table, JSONL, CSV or parquet; "
        "locally or on Ray")

DESCRIPTION = """\
Caption images with a trained vision-gpt model.

Inputs can be mixed: image files, folders (searched recursively for .jpg .jpeg .png .bmp
.gif .webp .tif .tiff, any case), glob patterns (quote them: "photos/**/*.jpg"), list files
(--from-file, one path per line), webdataset tar shards and parquet files (an image-bytes
column; rows keyed SHARD/KEY), and a `datasets` split (--dataset).

Up to 20 images without --output are printed as a table. Otherwise pass --output
captions.jsonl, .csv or .parquet: one row per image with its caption and the decoding
settings, written as the run goes. Rerun the same command to resume: images already in
the output are skipped. An unreadable image becomes a row with an 'error' field naming the
file and the reason; the run goes on, and exits with 1 at the end. Decoding settings not
given come from the model's generation_config.json."""

EPILOG = """\
output columns:
  image         the path as given (normalised), SHARD/KEY for a sample of a .tar or .parquet
                input, or the dataset row id / SPLIT-ROW
  caption       the caption (with --num-captions N: the first, the best one for beam search)
  captions      JSONL and parquet with --num-captions N > 1: the list of all N captions
  caption_2..N  CSV with --num-captions N > 1: the other captions, one column each
  error         why the image could not be captioned (empty when it was)
  model, num_beams, max_new_tokens, do_sample, temperature, top_p, top_k, num_captions,
  dtype, seed   the settings that produced the caption (sampling ones only with --do-sample)

examples:
  vision-gpt caption photo.jpg holiday/ --model user/vision-gpt-flickr8k
  vision-gpt caption "scans/**/*.png" --model ./my-model --output captions.csv --num-beams 5
  vision-gpt caption --from-file paths.txt --model ./my-model --output captions.jsonl --dtype bf16
  vision-gpt caption --dataset ./my_dataset --split test --model ./my-model --output test.jsonl
  vision-gpt caption "shards/{000000..000099}.tar" --model ./my-model --output captions.parquet
  accelerate launch --multi_gpu --num_processes 4 -m vision_gpt.cli caption photos/ \\
      --model ./my-model --output captions.jsonl      (each GPU captions a quarter)
  vision-gpt caption data/*.parquet --model ./my-model --output captions.parquet \\
      --engine ray --num-workers 8 --address auto     (8 Ray actors on a running cluster)"""


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `caption` subcommand to `subparsers` (from `ArgumentParser.add_subparsers`)."""
    parser = subparsers.add_parser("caption", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    inputs = parser.add_argument_group("what to caption")
    inputs.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files, folders (searched recursively), quoted glob patterns, webdataset shards "
                             "(.tar; brace ranges like \"shards/{000000..000099}.tar\") and parquet files")
    inputs.add_argument("--from-file", action="append", default=[], metavar="LIST",
                        help="a text file with one image path (or folder) per line; '#' starts a comment; '-' reads "
                             "stdin; may be given several times")
    inputs.add_argument("--dataset", metavar="NAME_OR_FOLDER",
                        help="a datasets Hub id or a save_to_disk folder with an image column")
    inputs.add_argument("--split", help="split of --dataset (needed when it has several)")
    inputs.add_argument("--image-column", help="column of --dataset or of parquet inputs holding the images (default: "
                                               "the Image column; in parquet an image/jpg/png/bytes column)")
    inputs.add_argument("--id-column", help="column of --dataset or of parquet inputs that names each row in the output "
                                            "(default: key, __key__, image_id or id when present, else the row)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="FOLDER_OR_ID",
                       help="the captioner: a folder written by save_pretrained or `vision-gpt assemble`, or a Hub id")
    model.add_argument("--dtype", type=_dtype_name, choices=[*DTYPES, "int8", "q8"],
                       help="weights and compute precision: float32 (default), bfloat16 (bf16; faster on GPUs and "
                            "on CPUs with native bf16: AVX-512 BF16 or AMX on x86; slower than float32 on others) or "
                            "float16 (fp16; GPUs); with --runtime onnx: float32, float16, int8 or q8 (the graphs of "
                            "`export-onnx --dtype fp16` / `--quantize int8`)")
    model.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                       help="torch (default): a PyTorch model folder or Hub id; onnx: a folder written by "
                            "`vision-gpt export-onnx`, run by ONNX Runtime on the CPU (pip install "
                            "'vision-gpt[onnx]')")
    model.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N or auto (default: the accelerator if there is one; under accelerate "
                            "launch, each process's own GPU)")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="run the modeling code stored in the model repo instead of this package's")

    decoding = parser.add_argument_group("decoding (defaults: the model's generation_config.json)")
    decoding.add_argument("--num-beams", type=int, help="beam search width (1 is greedy)")
    decoding.add_argument("--max-new-tokens", type=int, help="longest caption, in tokens")
    decoding.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                          help="sample tokens instead of searching for the most likely caption")
    decoding.add_argument("--temperature", type=float, help="with --do-sample: below 1 is safer, above 1 more varied")
    decoding.add_argument("--top-p", type=float, help="with --do-sample: sample from the smallest set of tokens whose "
                                                      "probability reaches P")
    decoding.add_argument("--top-k", type=int, help="with --do-sample: sample from the K most likely tokens")
    decoding.add_argument("--num-captions", type=int, metavar="N",
                          help="captions per image (needs --num-beams >= N, or --do-sample)")
    decoding.add_argument("--seed", type=int, help="random seed, for repeatable --do-sample captions")
    scoring = parser.add_argument_group("scoring (no references needed)")
    scoring.add_argument("--score", choices=["clip"],
                         help="add a clipscore column: the CLIPScore (Hessel et al., 2021; 0-100) of each image's "
                              "first caption, how well it fits the image in CLIP's embedding space")
    scoring.add_argument("--clipscore-model", metavar="MODEL",
                         help="CLIP model for --score clip, folder or Hub id (default openai/clip-vit-base-patch32)")

    running = parser.add_argument_group("running")
    running.add_argument("--output", metavar="FILE.jsonl|FILE.csv|FILE.parquet",
                         help="where the rows go; an existing file is resumed (its images are skipped)")
    running.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="local (default): this process, or each process of accelerate launch; ray: Ray Data "
                              "actors, on a local Ray instance or the cluster at --address")
    running.add_argument("--address", metavar="ADDRESS",
                         help="with --engine ray: the Ray cluster to join (ray://host:10001, host:6379 or auto; "
                              "default: $RAY_ADDRESS, else a local instance started for this run)")
    running.add_argument("--cpus-per-worker", type=float, metavar="N",
                         help="with --engine ray: CPUs reserved per actor, also its torch threads (default: the "
                              "cluster's CPUs shared among the actors, at most one node's)")
    running.add_argument("--batch-size", type=int, default=16, help="images per generate call (default: 16)")
    running.add_argument("--num-workers", type=int,
                         help="local engine: background processes decoding images while the model runs (default: "
                              "min(4, CPUs); 0 decodes in the main process). --engine ray: the number of actors, each "
                              "with its own copy of the model, decoding its own images (default: 1)")
    running.add_argument("--max-image-pixels", type=int, metavar="PIXELS",
                         help="images with more pixels become error rows (default: PIL's guard, about 179M pixels)")
    running.add_argument("--retry-errors", action="store_true",
                         help="when resuming, caption again the images whose rows are errors (their old rows are "
                              "removed)")
    parser.set_defaults(func=run)
    return parser
