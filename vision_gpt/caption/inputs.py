"""What `vision-gpt caption` captions: image files, folders, globs, list files, shard samples and `datasets`
rows, listed as `ImageRef`s before any image is read."""

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..data.shards import ShardMember, expand_braces, list_parquet, list_webdataset, shard_kind

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageRef:
    """One image to caption: `key` names it in the output (and is what resuming matches); `source` is a file path, a
    row index into `--dataset`, a `ShardMember` (an image in a webdataset tar or a parquet file), or None for a shard
    sample that has no image (its row says so)."""

    key: str
    source: str | int | ShardMember | None


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
    column when there is one), else by `SPLIT-ROW` as in `vision_gpt.data.layouts`.
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
