"""The folder layouts of captioning datasets: Flickr8k, Karpathy JSON, COCO captions, Kaggle's captions.txt,
imagefolder metadata, and `datasets` Hub ids and folders, each read into `CaptionedImage` records."""

import csv
import hashlib
import json
import os
import re
from collections import defaultdict
from pathlib import Path

from .records import (
    _SPLIT_ALIASES,
    FLICKR8K_IMAGE_DIRS,
    SPLITS,
    CaptionedImage,
    DataReport,
    _json_field,
    is_utf8,
    read_json_file,
    read_text_lines,
)

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
