"""Captioning datasets in the layouts people have (Flickr8k, Karpathy JSON, COCO captions, `datasets`), checked up front.

Every layout is read into `CaptionedImage` records, one per image with all its reference captions. Problems in the data
(missing or unreadable images, captions naming unknown images, empty captions) are skipped, counted and reported
before training starts: never a crash mid-epoch, never a silent drop.
"""

import io
import json
import logging
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .modeling.processing_vision_gpt import ImageLoadError, load_image

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
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

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(example)

    def summary(self, splits: dict[str, list[CaptionedImage]]) -> str:
        kept = ", ".join(f"{name}: {len(images)} images / {sum(len(i.captions) for i in images)} captions"
                         for name, images in splits.items())
        lines = [f"Data from {self.source}: {kept}."]
        if not self.counts:
            lines.append("No problems found.")
        for reason, count in sorted(self.counts.items()):
            lines.append(f"Skipped {count} ({reason}), e.g. {'; '.join(self.examples[reason])}")
        return "\n".join(lines)


def normalize_caption(caption: str) -> str:
    """Lowercase, single spaces, no trailing period: Flickr8k's tokenized captions end in ' .'."""
    caption = re.sub(r"\s+", " ", caption).strip().lower()
    return re.sub(r"\s*\.$", "", caption).strip()


# ----- layouts --------------------------------------------------------------------------------------------------------


def detect_layout(data_dir: str) -> str:
    """Which layout `data_dir` holds: "flickr8k", "karpathy", "coco" or "datasets" (a `save_to_disk` folder)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"--data_dir '{data_dir}' is not a folder.")
    if (root / "Flickr8k.token.txt").is_file():
        return "flickr8k"
    if list(root.glob("dataset_*.json")):
        return "karpathy"
    if list(root.glob("annotations/captions_*.json")):
        return "coco"
    if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
        return "datasets"
    raise ValueError(
        f"--data_dir '{data_dir}' holds no layout vision-gpt knows: expected Flickr8k.token.txt (Flickr8k as "
        "distributed), a Karpathy dataset_*.json, annotations/captions_*.json (COCO) or a datasets.save_to_disk folder."
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
    captions = defaultdict(list)
    for number, line in enumerate((root / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines(), 1):
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
        path = root / filename
        if not path.is_file():
            raise ValueError(f"Flickr8k split file '{path}' is missing.")
        names = [n.strip() for n in path.read_text(encoding="utf-8").splitlines() if n.strip()]
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
    json_files = sorted(root.glob("dataset_*.json"))
    data = json.loads(json_files[0].read_text(encoding="utf-8"))
    if "images" not in data:
        raise ValueError(f"'{json_files[0]}' has no 'images' list; is it a Karpathy split file?")
    candidates = ("Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "Images", "images", ".")
    image_dir = _find_image_dir(root, candidates)
    splits = {split: [] for split in SPLITS}
    for entry in data["images"]:
        split = _SPLIT_ALIASES.get(entry.get("split"))
        if split is None:
            report.add("images with an unknown split", f"{entry.get('filename')} ({entry.get('split')!r})")
            continue
        # COCO entries keep their images in subfolders (train2014/, val2014/).
        path = image_dir / entry.get("filepath", "") / entry["filename"]
        texts = [s.get("raw") or " ".join(s.get("tokens", [])) for s in entry.get("sentences", [])]
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
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {image["id"]: image["file_name"] for image in data["images"]}
        captions = defaultdict(list)
        for annotation in data["annotations"]:
            if annotation["image_id"] not in files:
                report.add("captions naming unknown images", f"image_id {annotation['image_id']} in {path.name}")
                continue
            captions[annotation["image_id"]].append(annotation["caption"])
        image_dir = root / f"{match.group(1)}{match.group(2)}"
        splits[split] = [CaptionedImage(files[i], image_dir / files[i], captions[i]) for i in sorted(captions)]
        for image_id in set(files) - set(captions):
            report.add("images with no captions", files[image_id])
    if "train" not in splits:
        raise ValueError(f"No annotations/captions_train*.json in '{data_dir}'.")
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


# ----- checks --------------------------------------------------------------------------------------------------------


def open_stored_image(value, name: str | None = None) -> Image.Image:
    """
    An image as a data set stores it (a file path, a PIL image, or a `datasets` cell `{"bytes", "path"}`) as an
    RGB PIL image. Errors are `ImageLoadError`s naming the file or, for encoded bytes, `name` (a row id).
    """
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


def clean_splits(splits: dict[str, list[CaptionedImage]], report: DataReport,
                 num_threads: int = 8) -> dict[str, list[CaptionedImage]]:
    """Normalise captions and drop, with a count, empty captions and images that are missing or do not decode."""
    cleaned = {}
    for split, images in splits.items():
        candidates = []
        for record in images:
            texts = []
            for caption in record.captions:
                text = normalize_caption(caption) if isinstance(caption, str) else ""
                if text:
                    texts.append(text)
                else:
                    report.add("empty captions", record.image_id)
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


def load_captioning_dataset(dataset: str, data_dir: str | None = None, image_column: str | None = None,
                            caption_column: str | None = None) -> tuple[dict[str, list[CaptionedImage]], DataReport]:
    """
    Read a captioning dataset, check it, and report what was skipped.

    `dataset` is "flickr8k", "flickr30k" or "coco" (the layout is detected in `data_dir`: Flickr8k as distributed,
    Karpathy's JSON, or COCO captions JSON), "auto", or a `datasets` Hub id / `save_to_disk` folder (then `data_dir`
    may be omitted).

    Example:

    ```python
    >>> splits, report = load_captioning_dataset("flickr8k", "/data/flickr8k")
    >>> print(report.summary(splits))
    ```"""
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
