"""`load_captioning_dataset`: any supported layout or shard set as checked splits of `CaptionedImage` records.

Problems in the data (missing or unreadable images, captions naming unknown images, empty captions) are skipped,
counted and reported before training starts: never a crash mid-epoch, never a silent drop.
"""

import os
from concurrent.futures import ThreadPoolExecutor

from ..modeling.image_loading_vision_gpt import ImageLoadError
from .images import open_stored_image
from .layouts import (
    detect_layout,
    read_coco,
    read_datasets,
    read_flickr8k,
    read_imagefolder,
    read_kaggle,
    read_karpathy,
)
from .records import MAX_CAPTION_CHARS, CaptionedImage, DataReport, normalize_caption
from .shard_splits import SHARD_DATASETS, check_shards, describe_shards, read_shards, resolve_data_files


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
