"""Captioning datasets in the layouts people have (Flickr8k, Karpathy JSON, COCO captions, `datasets`), checked up front.

Every layout is read into `CaptionedImage` records, one per image with all its reference captions. Problems in the data
(missing or unreadable images, captions naming unknown images, empty captions) are skipped, counted and reported
before training starts: never a crash mid-epoch, never a silent drop.
"""

import codecs
import csv
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .modeling.processing_vision_gpt import ImageLoadError, load_image
from .shards import (MemberReader, ShardMember, ShardReadError, check_shard, describe_member, iter_shard,
                     parquet_columns, resolve_shards, sample_id, shard_kind)

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# A caption is a sentence, and the tokenizer keeps only --max_caption_length tokens (64 by default) anyway: a caption
# of more than 1,000 characters is a broken line (say, a file glued to a caption), cut here and reported.
MAX_CAPTION_CHARS = 1000
_SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "validation", "validation": "validation",
                  "dev": "validation", "test": "test"}
FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")


@dataclass
class CaptionedImage:
    """One image and all its reference captions. `image` is a file path or an image a `datasets` row holds."""

    image_id: str
    image: Any
    captions: list[str]


@dataclass
class DataReport:
    """What was skipped while reading a dataset, by reason, with a few examples of each."""

    source: str
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))
    actions: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def add(self, reason: str, example: str, action: str = "Skipped") -> None:
        self.counts[reason] += 1
        self.actions[reason] = action
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(example)

    def summary(self, splits: dict[str, list[CaptionedImage]]) -> str:
        kept = ", ".join(f"{name}: {len(images)} images / {sum(len(i.captions) for i in images)} captions"
                         for name, images in splits.items())
        return "\n".join([f"Data from {self.source}: {kept}.", *self.notes, *self.problems()])

    def problems(self) -> list[str]:
        """One line per reason: what was done, how often, and up to three examples."""
        if not self.counts:
            return ["No problems found."]
        return [f"{self.actions.get(reason, 'Skipped')} {count} ({reason}), e.g. {'; '.join(self.examples[reason])}"
                for reason, count in sorted(self.counts.items())]


def normalize_caption(caption: str) -> str:
    """Lowercase, single spaces, no trailing period: Flickr8k's tokenized captions end in ' .'."""
    caption = re.sub(r"\s+", " ", caption).strip().lower()
    return re.sub(r"\s*\.$", "", caption).strip()


# ----- reading files -------------------------------------------------------------------------------------------------


def read_text_lines(path: Path, report: DataReport) -> list[tuple[int, str]]:
    """The lines of a UTF-8 text file with their numbers (from 1). A line that is not UTF-8 is skipped and counted,
    naming the file, the line and the byte, like any other malformed line."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"Could not read '{path}': {error.strerror}.") from None
    lines = []
    # bytes.splitlines breaks only at \n, \r\n and \r; str.splitlines would also break inside a caption at \x1c,
    # \x85 or \u2028.
    for number, line in enumerate(raw.removeprefix(codecs.BOM_UTF8).splitlines(), 1):
        try:
            lines.append((number, line.decode("utf-8")))
        except UnicodeDecodeError as error:
            report.add("lines that are not UTF-8",
                       f"{path.name} line {number} (byte 0x{line[error.start]:02x} at column {error.start + 1})")
    return lines


def read_json_file(path: Path):
    """A JSON file's content. Bytes that are not UTF-8 come through as lone surrogates (`surrogateescape`), so that
    one bad byte in a caption skips that caption (see `is_utf8`) instead of the whole file; a file that is not JSON
    stops the run with an error naming it and the position."""
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    except OSError as error:
        raise ValueError(f"Could not read '{path}': {error.strerror}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"'{path}' is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
                         ) from None


def is_utf8(text: str) -> bool:
    """False for text read with `surrogateescape` from bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_field(data, key: str, kind: type, path: Path):
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, kind):
        raise ValueError(f"'{path}' has no '{key}' {kind.__name__}; is it the right file for this layout?")
    return value


# ----- layouts --------------------------------------------------------------------------------------------------------


FLICKR8K_TOKENS = "Flickr8k.token.txt"
KAGGLE_CAPTIONS = "captions.txt"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGEFOLDER_SPLITS = ("train", "validation", "val", "test")


def _flickr8k_text_dir(root: Path) -> Path | None:
    """Where Flickr8k's text files are: `root` itself, or one folder below it (`Flickr8k_text/`, as the two official
    archives unzip side by side)."""
    if (root / FLICKR8K_TOKENS).is_file():
        return root
    found = sorted(path.parent for path in root.glob(f"*/{FLICKR8K_TOKENS}"))
    return found[0] if found else None


def _metadata_files(root: Path) -> list[Path]:
    """ImageFolder metadata files: in `root`, or in its split folders (`train/metadata.jsonl`, ...)."""
    folders = [root] + [root / split for split in IMAGEFOLDER_SPLITS if (root / split).is_dir()]
    return [folder / name for folder in folders for name in METADATA_FILES if (folder / name).is_file()]


def detect_layout(data_dir: str) -> str:
    """
    Which layout `data_dir` holds: "flickr8k" (as distributed, text files in the folder or one below it), "karpathy",
    "coco", "kaggle" (`Images/` and a `captions.txt` with an `image,caption` header), "imagefolder" (images with a
    `metadata.jsonl` or `metadata.csv`) or "datasets" (a `save_to_disk` folder).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"--data_dir '{data_dir}' is not a folder.")
    if _flickr8k_text_dir(root) is not None:
        return "flickr8k"
    if list(root.glob("dataset_*.json")):
        return "karpathy"
    if list(root.glob("annotations/captions_*.json")):
        return "coco"
    if (root / KAGGLE_CAPTIONS).is_file():
        return "kaggle"
    if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
        return "datasets"
    if _metadata_files(root):
        return "imagefolder"
    raise ValueError(
        f"--data_dir '{data_dir}' holds no layout vision-gpt knows: expected Flickr8k.token.txt (Flickr8k as "
        "distributed, in the folder or one below it, e.g. Flickr8k_text/), a Karpathy dataset_*.json, "
        "annotations/captions_*.json (COCO), captions.txt next to Images/ (Kaggle's Flickr8k), a metadata.jsonl or "
        "metadata.csv next to the images (datasets' ImageFolder, also in train/, validation/ and test/ folders), or a "
        "datasets.save_to_disk folder."
    )


def _find_image_dir(root: Path, candidates=FLICKR8K_IMAGE_DIRS) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise ValueError(f"No image folder in '{root}': expected one of {list(candidates)}.")


def read_flickr8k(data_dir: str, report: DataReport) -> dict[str, list[CaptionedImage]]:
    """Flickr8k as distributed: `Flicker8k_Dataset/*.jpg`, `Flickr8k.token.txt`, `Flickr_8k.{train,dev,test}Images.txt`."""
    root = Path(data_dir)
    image_dir = _find_image_dir(root)
    text_dir = _flickr8k_text_dir(root)
    captions = defaultdict(list)
    for number, line in read_text_lines(text_dir / FLICKR8K_TOKENS, report):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name = key.split("#")[0].strip()
        if not sep or not name:
            report.add("malformed caption lines", f"Flickr8k.token.txt line {number}")
            continue
        captions[name].append(caption)
    split_files = {"train": "Flickr_8k.trainImages.txt", "validation": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt"}
    splits, listed = {}, set()
    for split, filename in split_files.items():
        path = text_dir / filename
        if not path.is_file():
            raise ValueError(f"Flickr8k split file '{path}' is missing.")
        names = [name.strip() for _, name in read_text_lines(path, report) if name.strip()]
        listed.update(names)
        records = []
        for name in names:
            if name not in captions:
                report.add("images with no captions", name)
                continue
            records.append(CaptionedImage(name, image_dir / name, captions[name]))
        splits[split] = records
    for name in sorted(set(captions) - listed):
        # e.g. the real Flickr8k.token.txt names '2258277193_586949ec62.jpg.1', which is in no split and no folder.
        report.add("captions naming images in no split", name)
    return splits


def read_karpathy(data_dir: str, report: DataReport) -> dict[str, list[CaptionedImage]]:
    """Karpathy's `dataset_{flickr8k,flickr30k,coco}.json` plus the image folder (`restval` goes to train)."""
    root = Path(data_dir)
    json_file = sorted(root.glob("dataset_*.json"))[0]
    entries = _json_field(read_json_file(json_file), "images", list, json_file)
    candidates = ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "Images", "images", ".")
    image_dir = _find_image_dir(root, candidates)
    splits = {split: [] for split in SPLITS}
    for index, entry in enumerate(entries):
        where = f"{json_file.name} images[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not is_utf8(
                entry["filename"] + str(entry.get("filepath", ""))):
            report.add("malformed entries (no file name, or one that is not UTF-8)", where)
            continue
        split = _SPLIT_ALIASES.get(entry.get("split"))
        if split is None:
            report.add("images with an unknown split", f"{entry['filename']} ({entry.get('split')!r})")
            continue
        texts = []
        for number, sentence in enumerate(entry.get("sentences") or []):
            text = sentence.get("raw") or " ".join(sentence.get("tokens") or []) if isinstance(sentence, dict) else ""
            if not is_utf8(text):
                report.add("captions that are not UTF-8", f"{where} ({entry['filename']}) sentences[{number}]")
                continue
            texts.append(text)
        # COCO entries keep their images in subfolders (train2014/, val2014/).
        path = image_dir / str(entry.get("filepath", "")) / entry["filename"]
        splits[split].append(CaptionedImage(entry["filename"], path, texts))
    return splits


def read_coco(data_dir: str, report: DataReport) -> dict[str, list[CaptionedImage]]:
    """COCO captions: `annotations/captions_{train,val}YEAR.json` with `trainYEAR/` and `valYEAR/` image folders."""
    root = Path(data_dir)
    splits = {}
    for path in sorted(root.glob("annotations/captions_*.json")):
        match = re.fullmatch(r"captions_(train|val)(\d{4})\.json", path.name)
        if not match:
            continue
        split = "train" if match.group(1) == "train" else "validation"
        data = read_json_file(path)
        files = {}
        for index, image in enumerate(_json_field(data, "images", list, path)):
            name = image.get("file_name") if isinstance(image, dict) else None
            if not isinstance(name, str) or not is_utf8(name) or "id" not in image:
                report.add("malformed entries (no id or file name, or one that is not UTF-8)",
                           f"{path.name} images[{index}]")
                continue
            files[image["id"]] = name
        captions = defaultdict(list)
        for index, annotation in enumerate(_json_field(data, "annotations", list, path)):
            if not isinstance(annotation, dict) or "image_id" not in annotation:
                report.add("malformed entries (no id or file name, or one that is not UTF-8)",
                           f"{path.name} annotations[{index}]")
                continue
            if annotation["image_id"] not in files:
                report.add("captions naming unknown images", f"image_id {annotation['image_id']} in {path.name}")
                continue
            caption = annotation.get("caption")
            if isinstance(caption, str) and not is_utf8(caption):
                report.add("captions that are not UTF-8", f"{path.name} annotations[{index}]")
                continue
            captions[annotation["image_id"]].append(caption)
        image_dir = root / f"{match.group(1)}{match.group(2)}"
        splits[split] = [CaptionedImage(files[i], image_dir / files[i], captions[i]) for i in sorted(captions)]
        for image_id in set(files) - set(captions):
            report.add("images with no captions", files[image_id])
    if "train" not in splits:
        raise ValueError(f"No annotations/captions_train*.json in '{data_dir}'.")
    return splits


def _hash_split(name: str) -> str:
    """A split for an image of a layout without split files: 80/10/10 by a hash of its name, the same on every run and
    machine (Python's own `hash` of a string is salted per process)."""
    bucket = int.from_bytes(hashlib.sha1(name.encode("utf-8", "surrogateescape")).digest()[:4], "big") % 10
    return "test" if bucket == 9 else "validation" if bucket == 8 else "train"


def read_kaggle(data_dir: str, report: DataReport) -> dict[str, list[CaptionedImage]]:
    """Kaggle's Flickr8k: `Images/` and `captions.txt`, a CSV with an `image,caption` header and one caption a line.
    The official split files, where they sit next to it, give the splits; otherwise `_hash_split` does."""
    root = Path(data_dir)
    image_dir = _find_image_dir(root)
    path = root / KAGGLE_CAPTIONS
    lines = read_text_lines(path, report)
    header = next((line for _, line in lines if line.strip()), "")
    if [field.strip().lower() for field in header.split(",")] != ["image", "caption"]:
        raise ValueError(f"'{path}' line 1 is {header[:80]!r}, not the header 'image,caption' that Kaggle's "
                         "captions.txt starts with: add that line (or check that this is the right file).")
    captions = defaultdict(list)
    for number, line in lines[1:]:
        if not line.strip():
            continue
        # Captions hold unquoted commas ("a dog, wet, runs"); file names never do: split at the first one.
        name, sep, caption = line.partition(",")
        caption = caption.strip()
        if len(caption) > 1 and caption[0] == caption[-1] == '"':
            caption = next(csv.reader([caption]))[0]
        if not sep or not name.strip():
            report.add("malformed caption lines", f"{path.name} line {number}")
            continue
        captions[name.strip()].append(caption)
    split_files = {"train": "Flickr_8k.trainImages.txt", "validation": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt"}
    listed = {}
    if all((root / filename).is_file() for filename in split_files.values()):
        for split, filename in split_files.items():
            listed.update({name.strip(): split for _, name in read_text_lines(root / filename, report) if name.strip()})
    else:
        report.notes.append(f"No Flickr_8k.*Images.txt split files in {root}: images are split 80/10/10 (train, "
                            "validation, test) by a hash of their file name, the same on every run.")
    splits = {split: [] for split in SPLITS}
    for name in sorted(captions):
        split = listed.get(name) if listed else _hash_split(name)
        if split is None:
            report.add("captions naming images in no split", name)
            continue
        splits[split].append(CaptionedImage(name, image_dir / name, captions[name]))
    return splits


def _check_metadata(path: Path, caption_column: str | None) -> None:
    """Stop on a metadata file that datasets' ImageFolder builder would fail on, naming the file, the line and the
    fix: its own errors name neither."""
    check = DataReport(str(path))
    lines = read_text_lines(path, check)
    if check.counts:
        raise ValueError(f"'{path}' is not UTF-8 at {check.examples['lines that are not UTF-8'][0].split(' ', 1)[1]}: "
                         "save it as UTF-8.")
    rows = []
    if path.suffix == ".jsonl":
        for number, line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"'{path}' line {number} is not JSON ({error.msg}, column {error.colno}): each line "
                                 'must be one object like {"file_name": "a.jpg", "caption": "a dog runs"}.') from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise ValueError(f"'{path}' line {number} has no \"file_name\": each line must be one object like "
                                 '{"file_name": "a.jpg", "caption": "a dog runs"}.')
            rows.append(row)
        columns = {key for row in rows for key in row}
    else:
        reader = csv.reader(line for _, line in lines)
        header = next(reader, [])
        if "file_name" not in header:
            raise ValueError(f"'{path}' line 1 is {','.join(header)[:80]!r}, not a header with a file_name column: "
                             "start the file with a header such as 'file_name,caption'.")
        columns = set(header)
    try:
        _caption_columns(dict.fromkeys(sorted(columns - {"file_name"})), caption_column)
    except ValueError as error:
        raise ValueError(f"'{path}': {error}") from None


def read_imagefolder(data_dir: str, report: DataReport, caption_column: str | None = None
                     ) -> dict[str, list[CaptionedImage]]:
    """datasets' ImageFolder: images next to a `metadata.jsonl` / `metadata.csv` (`file_name` plus caption columns),
    in `data_dir` or in `train/`, `validation/` and `test/` folders, read through datasets' `imagefolder` builder."""
    import datasets

    for path in _metadata_files(Path(data_dir)):
        _check_metadata(path, caption_column)
    loaded = datasets.load_dataset("imagefolder", data_dir=data_dir)
    splits = _read_dataset_dict(loaded, report, "image", caption_column)
    for records in splits.values():
        for record in records:
            # Named by their path in the folder: unique across split folders, and what a user recognises.
            record.image_id = os.path.relpath(record.image["path"], data_dir)
    return splits


def _caption_columns(columns: dict, caption_column: str | None) -> list[str]:
    if caption_column:
        if caption_column not in columns:
            raise ValueError(f"--caption_column {caption_column!r} is not a column; columns are {list(columns)}.")
        return [caption_column]
    numbered = sorted((c for c in columns if re.fullmatch(r"caption_\d+", c)), key=lambda c: int(c.split("_")[1]))
    if numbered:
        return numbered
    for name in ("captions", "sentences", "caption", "text"):
        if name in columns:
            return [name]
    raise ValueError(f"No caption column found among {list(columns)}; pass --caption_column.")


def read_datasets(name_or_path: str, report: DataReport, image_column: str | None = None,
                  caption_column: str | None = None) -> dict[str, list[CaptionedImage]]:
    """A `datasets` dataset (Hub id or `save_to_disk` folder): an image column, and a list-of-captions column or
    `caption_0..caption_N` columns."""
    import datasets

    if Path(name_or_path).is_dir():
        loaded = datasets.load_from_disk(name_or_path)
    else:
        loaded = datasets.load_dataset(name_or_path)
    return _read_dataset_dict(loaded, report, image_column, caption_column)


def _read_dataset_dict(loaded, report: DataReport, image_column: str | None,
                       caption_column: str | None) -> dict[str, list[CaptionedImage]]:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    splits = {}
    for split_name, dataset in loaded.items():
        split = _SPLIT_ALIASES.get(split_name)
        if split is None:
            report.add("splits with an unknown name", split_name)
            continue
        columns = dataset.features
        image_col = image_column or next(
            (c for c, f in columns.items() if isinstance(f, datasets.Image)), "image" if "image" in columns else None)
        if image_col not in columns:
            raise ValueError(f"No image column in split {split_name!r}; pass --image_column (columns: {list(columns)}).")
        caption_cols = _caption_columns(columns, caption_column)
        # Keep images encoded: each is decoded once by the check below and then by the data loader.
        dataset = dataset.cast_column(image_col, datasets.Image(decode=False))
        records = []
        for index, row in enumerate(dataset):
            texts = []
            for column in caption_cols:
                value = row[column]
                texts.extend(value if isinstance(value, list) else [value])
            image_id = str(row.get("image_id", row.get("id", f"{split_name}-{index}")))
            records.append(CaptionedImage(image_id, row[image_col], texts))
        splits[split] = records
    return splits


# ----- shards --------------------------------------------------------------------------------------------------------
# Webdataset tars and parquet files. Read whole (for evaluation and validation) they become `CaptionedImage` records
# whose images stay in the shards as `ShardMember`s; for training they are streamed (`StreamingCaptionDataset`).

SHARD_DATASETS = ("webdataset", "parquet")
_SHARD_NAMES = {"webdataset": "a webdataset shard (.tar)", "parquet": "a parquet file"}


def resolve_data_files(dataset: str | None, patterns, what: str = "--data_files") -> list[str]:
    """The shard files that `patterns` name (see `vision_gpt.shards.resolve_shards`), each of `dataset`'s kind
    ("webdataset" or "parquet"; None takes each file by its suffix)."""
    paths = resolve_shards([patterns] if isinstance(patterns, str) else list(patterns), what)
    for path in paths:
        kind = shard_kind(path)
        if dataset is not None and kind != dataset:
            raise ValueError(f"{what}: '{path}' is {_SHARD_NAMES[kind]}, but --dataset is {dataset}: use --dataset "
                             f"{kind}, or name only {'.tar' if dataset == 'webdataset' else '.parquet'} files.")
    return paths


def describe_shards(paths: list[str]) -> str:
    kinds = sorted({shard_kind(path) for path in paths})
    names = paths[0] if len(paths) == 1 else f"{paths[0]} ... {paths[-1]}"
    return f"{len(paths)} {' and '.join(kinds)} file{'s' if len(paths) > 1 else ''} ({names})"


def shard_caption_columns(path: str, caption_column: str | None = None) -> list[str] | None:
    """A parquet file's caption columns, by `_caption_columns`' rules; None for a tar (its captions are members)."""
    if shard_kind(path) != "parquet":
        return None
    try:
        return _caption_columns(dict.fromkeys(parquet_columns(path)), caption_column)
    except ValueError as error:
        raise ValueError(f"'{path}': {error}") from None


def check_shards(paths: list[str], image_column: str | None = None, caption_column: str | None = None) -> None:
    """Open every shard (a tar's first header, a parquet file's footer), so that a file that is not a shard, or a
    parquet file without image or caption columns, stops the run at start, and not hours into a stream."""
    for path in paths:
        check_shard(path, image_column)
        shard_caption_columns(path, caption_column)


def shard_samples(path: str, report: DataReport, images: bool = True, image_column: str | None = None,
                  caption_column: str | None = None, captions: bool = True):
    """The usable samples of one shard, as `StreamedSample`s: with an image and (if `captions`) captions that parse.
    The others are counted in `report`, as is a shard that breaks off (its samples before the damage are kept)."""
    columns = shard_caption_columns(path, caption_column) if captions else []
    try:
        for sample in iter_shard(path, images=images, image_column=image_column, caption_columns=columns):
            if sample.problem:
                report.add(sample.reason, sample.problem)
            elif sample.image is None or (images and not sample.data):
                report.add("samples with no image", f"{sample.key} in '{path}'")
            elif captions and not sample.captions:
                report.add("samples with no caption", f"{sample.key} in '{path}'")
            else:
                yield sample
    except ShardReadError as error:
        report.add("shards that broke off while being read", str(error))


def read_shards(paths: list[str], report: DataReport, image_column: str | None = None,
                caption_column: str | None = None, max_images: int | None = None) -> list[CaptionedImage]:
    """Webdataset tars and parquet files as `CaptionedImage` records (the first `max_images` usable ones), ids
    `SHARD/KEY`, images left in their shards: `open_stored_image` reads each `ShardMember` when it is needed."""
    records = []
    for path in paths:
        for sample in shard_samples(path, report, images=False, image_column=image_column,
                                    caption_column=caption_column):
            records.append(CaptionedImage(sample_id(path, sample.key), sample.image, sample.captions))
            if max_images is not None and len(records) >= max_images:
                return records
    return records


def shard_image_ids(paths: list[str], report: DataReport, image_column: str | None = None) -> list[str]:
    """The ids of every image in `paths`, from the tars' headers and the parquet id columns, no image read: what a
    feature cache sizes its file by."""
    return [sample_id(path, sample.key) for path in paths
            for sample in shard_samples(path, report, images=False, image_column=image_column, captions=False)]


def shard_images(paths: list[str], report: DataReport, image_column: str | None = None):
    """`(image_id, stored image)` for every image in `paths`, streamed in file order, each read once: what a feature
    cache is built from."""
    for path in paths:
        for sample in shard_samples(path, report, images=True, image_column=image_column, captions=False):
            yield sample_id(path, sample.key), {"bytes": sample.data, "path": describe_member(sample.image)}


# ----- checks --------------------------------------------------------------------------------------------------------


_member_readers = threading.local()


def read_shard_member(member: ShardMember) -> bytes:
    """The bytes of one image in a webdataset or parquet shard, read by this thread's own reader (a parquet reader
    keeps the row group it decoded last, which threads must not share)."""
    reader = getattr(_member_readers, "reader", None)
    if reader is None:
        reader = _member_readers.reader = MemberReader()
    try:
        return reader.read(member)
    except (OSError, ValueError) as error:
        raise ImageLoadError(f"Could not read {describe_member(member)}: {error}.") from None


def open_stored_image(value, name: str | None = None) -> Image.Image:
    """
    An image as a data set stores it (a file path, a PIL image, a `datasets` cell `{"bytes", "path"}`, or a
    `ShardMember` of a webdataset or parquet shard) as an RGB PIL image. Errors are `ImageLoadError`s naming the file
    or, for encoded bytes, `name` (a row id).
    """
    if isinstance(value, ShardMember):
        value = {"bytes": read_shard_member(value), "path": describe_member(value)}
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")
    if value is None:
        raise ImageLoadError(f"Dataset row '{name}' has no image.")
    if isinstance(value, dict):
        name = name or value.get("path") or "a dataset row"
        try:
            image = Image.open(io.BytesIO(value["bytes"]))
            image.load()
        except UnidentifiedImageError:
            raise ImageLoadError(f"Dataset row '{name}' holds bytes that are not an image PIL can read.") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageLoadError(f"Dataset row '{name}' holds an image that could not be decoded: {error}.") from None
        return load_image(image)
    return load_image(value)


def _check_image(record: CaptionedImage) -> str | None:
    """None if the image decodes, else the reason."""
    try:
        open_stored_image(record.image, record.image_id)
    except ImageLoadError as error:
        return str(error)
    return None


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at the last space before the limit where there is one."""
    head = text[: limit + 1]
    space = head.rfind(" ")
    return (head[:space] if space > 0 else head[:limit]).rstrip()


def clean_captions(image_id: str, captions: list, report: DataReport,
                   max_caption_chars: int = MAX_CAPTION_CHARS) -> list[str]:
    """An image's captions normalised, those over `max_caption_chars` cut and empty ones dropped, with counts."""
    texts = []
    for caption in captions:
        text = normalize_caption(caption) if isinstance(caption, str) else ""
        if len(text) > max_caption_chars:
            report.add(f"captions longer than {max_caption_chars} characters, cut at a word before that",
                       f"{image_id} ({len(text)} characters)", action="Cut")
            text = _cut(text, max_caption_chars)
        if text:
            texts.append(text)
        else:
            report.add("empty captions", image_id)
    return texts


def clean_splits(splits: dict[str, list[CaptionedImage]], report: DataReport, num_threads: int = 8,
                 max_caption_chars: int = MAX_CAPTION_CHARS) -> dict[str, list[CaptionedImage]]:
    """Normalise captions, cut (with a count) those over `max_caption_chars`, and drop, with a count, empty captions
    and images that are missing or do not decode."""
    cleaned = {}
    for split, images in splits.items():
        candidates = []
        for record in images:
            texts = clean_captions(record.image_id, record.captions, report, max_caption_chars)
            if not texts:
                report.add("images with no usable caption", record.image_id)
                continue
            if isinstance(record.image, (str, os.PathLike)) and not os.path.exists(record.image):
                report.add("missing image files", str(record.image))
                continue
            candidates.append(CaptionedImage(record.image_id, record.image, texts))
        # Decoding releases the GIL, so threads check a large folder several times faster.
        with ThreadPoolExecutor(num_threads) as pool:
            problems = list(pool.map(_check_image, candidates))
        kept = []
        for record, problem in zip(candidates, problems):
            if problem:
                report.add("unreadable images", problem)
            else:
                kept.append(record)
        cleaned[split] = kept
    return cleaned


def load_captioning_dataset(dataset: str | None, data_dir: str | None = None, image_column: str | None = None,
                            caption_column: str | None = None, data_files=None, split: str = "train",
                            max_images: int | None = None, files_flag: str = "--data_files"
                            ) -> tuple[dict[str, list[CaptionedImage]], DataReport]:
    """
    Read a captioning dataset, check it, and report what was skipped.

    `dataset` is "flickr8k", "flickr30k", "coco" or "auto" (the layout is detected in `data_dir`, see `detect_layout`),
    or a `datasets` Hub id / `save_to_disk` folder (then `data_dir` may be omitted). With "webdataset" or "parquet"
    (or None, each file by its suffix), `data_files` names shard files, globs or brace ranges, read whole as the split
    `split` (its first `max_images` usable images); training streams such shards instead (`StreamingCaptionDataset`).
    Errors name `data_files` as `files_flag`, the flag of the command that reads them.

    Example:

    ```python
    >>> splits, report = load_captioning_dataset("flickr8k", "/data/flickr8k")
    >>> print(report.summary(splits))
    >>> splits, _ = load_captioning_dataset("parquet", data_files=["val/*.parquet"], split="validation")
    ```"""
    if data_files or dataset in SHARD_DATASETS:
        if dataset is not None and dataset not in SHARD_DATASETS:
            raise ValueError(f"{files_flag} names webdataset or parquet shards, not a {dataset} dataset: use --dataset "
                             "webdataset or --dataset parquet.")
        if not data_files:
            raise ValueError(f"--dataset {dataset} needs {files_flag}: shard files, globs or brace ranges, e.g. "
                             '"shards/{000000..000099}.tar".')
        paths = resolve_data_files(dataset, data_files, files_flag)
        check_shards(paths, image_column, caption_column)
        report = DataReport(source=describe_shards(paths))
        splits = clean_splits({split: read_shards(paths, report, image_column, caption_column, max_images)}, report)
        if not splits[split]:
            raise ValueError(f"No usable images in {report.source}.\n{report.summary(splits)}")
        return splits, report
    if dataset in ("flickr8k", "flickr30k", "coco", "auto"):
        if not data_dir:
            raise ValueError(f"--dataset {dataset} needs --data_dir (the folder holding the images and captions).")
        layout = detect_layout(data_dir)
        source = data_dir
    else:
        layout, source = "datasets", dataset
    report = DataReport(source=f"{source} ({layout} layout)")
    if layout == "flickr8k":
        splits = read_flickr8k(data_dir, report)
    elif layout == "karpathy":
        splits = read_karpathy(data_dir, report)
    elif layout == "coco":
        splits = read_coco(data_dir, report)
    elif layout == "kaggle":
        splits = read_kaggle(data_dir, report)
    elif layout == "imagefolder":
        splits = read_imagefolder(data_dir, report, caption_column)
    else:
        splits = read_datasets(source, report, image_column, caption_column)
    splits = clean_splits(splits, report)
    if not splits.get("train"):
        raise ValueError(f"No usable training images in {report.source}.\n{report.summary(splits)}")
    return splits, report


# ----- torch datasets ------------------------------------------------------------------------------------------------


class CaptionPairDataset(torch.utils.data.Dataset):
    """One item per (image, caption) pair, so every reference caption is a training example. Items carry either
    `pixel_values` or, from a frozen tower's feature cache, `vision_features`."""

    def __init__(self, images: list[CaptionedImage], image_processor, feature_cache=None):
        self.images = images
        self.pairs = [(index, caption) for index, record in enumerate(images) for caption in record.captions]
        self.image_processor = image_processor
        self.feature_cache = feature_cache

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_index, caption = self.pairs[index]
        record = self.images[image_index]
        if self.feature_cache is not None:
            return {"vision_features": self.feature_cache.get(record.image_id), "caption": caption}
        return {"pixel_values": pixel_values_for(record.image, self.image_processor)[0], "caption": caption}


class StreamingCaptionDataset(torch.utils.data.IterableDataset):
    """
    (image, caption) pairs streamed from webdataset tars and parquet files, for training on sets too large to hold:
    items are what `CaptionPairDataset` gives, read as they are needed.

    The order is a function of `seed` and the pass alone, so that a resumed run, which skips the batches it already
    trained by reading them again, sees the very batches the interrupted one did. Each pass shuffles the shard order
    (seeded by seed and pass), deals the shards out to the data loader's workers (worker w of W reads shards w, w + W,
    ...: no pair twice, whatever W), and mixes each worker's pairs through a shuffle buffer of `shuffle_buffer_size`
    pairs (seeded by seed, pass and worker); the same W gives the same order. With `repeat` (training), pass follows
    pass without end: Trainer counts only --max_steps, and its "epoch" of a stream is the whole run, so the passes are
    counted here, from the one `set_epoch` sets (Trainer calls it, through Accelerate, with 0).

    With a `feature_cache` built for these shards (`FeatureCache.build_from_stream`), images are not read at all: items
    carry the cached features. Samples without an image or captions, captions that do not parse, images that do not
    decode and shards that break off are skipped and counted in `report` (the first of each kind is logged at once,
    and a summary after each pass), never stopping the run.

    Example:

    ```python
    >>> pairs = StreamingCaptionDataset(resolve_data_files("webdataset", "shards/{000000..000099}.tar"),
    ...                                 processor.image_processor, seed=42)
    >>> loader = DataLoader(pairs, batch_size=32, num_workers=4, collate_fn=CaptionCollator(processor))
    ```"""

    def __init__(self, shards: list[str], image_processor=None, feature_cache=None, seed: int = 0,
                 shuffle_buffer_size: int = 1000, repeat: bool = True, image_column: str | None = None,
                 caption_column: str | None = None, max_caption_chars: int = MAX_CAPTION_CHARS):
        if not shards:
            raise ValueError("StreamingCaptionDataset needs at least one shard.")
        if image_processor is None and feature_cache is None:
            raise ValueError("StreamingCaptionDataset needs an image_processor, or a feature_cache to read features "
                             "from.")
        check_shards(shards, image_column, caption_column)
        self.shards = list(shards)
        self.image_processor = image_processor
        self.feature_cache = feature_cache
        self.seed = seed
        self.shuffle_buffer_size = max(1, shuffle_buffer_size)
        self.repeat = repeat
        self.image_column = image_column
        self.caption_column = caption_column
        self.max_caption_chars = max_caption_chars
        self.epoch = 0
        self._warned, self._unreadable = set(), set()
        self.report = self._new_report()

    def _new_report(self) -> "StreamReport":
        return StreamReport(source=f"the stream of {describe_shards(self.shards)}", warned=self._warned)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_order(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[index] for index in order]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        while True:
            shards = self.shard_order(epoch)[worker::workers]
            if not shards:
                logger.warning("Data loader worker %d of %d has no shard to read (there are %d): use at most %d "
                               "--dataloader_num_workers.", worker, workers, len(self.shards), len(self.shards))
                return
            count = 0
            self.report, self._unreadable = self._new_report(), set()
            for item in self._pass(shards, np.random.default_rng([self.seed, epoch, worker])):
                count += 1
                yield item
            logger.info("Pass %d over %s%s: %d pairs from %d shards.\n%s", epoch, self.report.source,
                        f" (worker {worker} of {workers})" if workers > 1 else "", count, len(shards),
                        "\n".join(self.report.problems()))
            # A pass with nothing usable would repeat forever.
            if not self.repeat or count == 0:
                return
            epoch += 1

    def _pass(self, shards: list[str], rng):
        """One pass over `shards` through the shuffle buffer: a pair enters the buffer in a random slot, and the pair
        it displaces leaves; what is left at the end leaves in random order."""
        buffer = []
        for pair in self._pairs(shards, self.report):
            if len(buffer) < self.shuffle_buffer_size:
                buffer.append(pair)
                continue
            slot = int(rng.integers(len(buffer)))
            pair, buffer[slot] = buffer[slot], pair
            item = self._item(*pair)
            if item is not None:
                yield item
        for slot in rng.permutation(len(buffer)):
            item = self._item(*buffer[slot])
            if item is not None:
                yield item

    def _pairs(self, shards: list[str], report: DataReport):
        """`(image_id, encoded image or None, caption)` in file order; the bytes of an image are shared by its
        captions' pairs, and are decoded only when a pair leaves the buffer."""
        images = self.feature_cache is None
        for path in shards:
            try:
                samples = shard_samples(path, report, images=images, image_column=self.image_column,
                                        caption_column=self.caption_column)
                for sample in samples:
                    image_id = sample_id(path, sample.key)
                    captions = clean_captions(image_id, sample.captions, report, self.max_caption_chars)
                    if not captions:
                        report.add("images with no usable caption", image_id)
                    for caption in captions:
                        yield image_id, sample.data, caption
            except ValueError as error:  # a shard replaced or removed since the run started
                report.add("shards that could not be opened", str(error))

    def first_pair_or_problems(self) -> tuple[tuple | None, DataReport]:
        """The stream's first (image_id, caption) pair (None if it has none), and what was skipped before it: read
        up to the first usable sample only, so a run over shards with nothing to train on stops at start."""
        report = DataReport(self.report.source)
        pair = next(self._pairs(self.shards, report), None)
        return (None if pair is None else (pair[0], pair[2])), report

    def _item(self, image_id: str, data: bytes | None, caption: str) -> dict | None:
        """The pair as a training item, or None (counted once per image) if its image cannot be had."""
        if image_id in self._unreadable:
            return None
        problem = None
        if self.feature_cache is not None:
            if self.feature_cache.contains(image_id):
                return {"vision_features": self.feature_cache.get(image_id), "caption": caption}
            problem = self.feature_cache.unreadable.get(image_id, f"{image_id} is not in the feature cache")
        else:
            try:
                image = open_stored_image({"bytes": data, "path": image_id}, image_id)
                pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
                return {"pixel_values": pixel_values[0], "caption": caption}
            except ImageLoadError as error:
                problem = str(error)
        self._unreadable.add(image_id)
        self.report.add("unreadable images", problem)
        return None


class StreamReport(DataReport):
    """A `DataReport` that also logs the first problem of each kind at once (once per kind in `warned`, shared across
    passes): a pass over the shards can take hours, and its summary comes only at its end."""

    def __init__(self, source: str, warned: set):
        super().__init__(source)
        self.warned = warned

    def add(self, reason: str, example: str, action: str = "Skipped") -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            logger.warning("%s %s in %s, e.g. %s (counted; a summary follows each pass).", action, reason,
                           self.source, example)
        super().add(reason, example, action)


def pixel_values_for(image, image_processor) -> torch.Tensor:
    """`(1, 3, H, W)` pixel values for one stored image."""
    return image_processor(images=[open_stored_image(image)], return_tensors="pt")["pixel_values"]


class CaptionCollator:
    """Pads each batch to its longest caption (labels are -100 on padding and on the start token)."""

    def __init__(self, processor, max_length: int = 64):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        tokens = self.processor.encode_captions([item["caption"] for item in items], max_length=self.max_length)
        batch = {key: torch.tensor(value) for key, value in tokens.items()}
        for key in ("pixel_values", "vision_features"):
            if key in items[0]:
                batch[key] = torch.stack([item[key] for item in items])
        return batch
