"""Webdataset tar shards and parquet files as captioning splits (`--dataset webdataset|parquet --data_files ...`)."""



from .layouts import _caption_columns
from .records import CaptionedImage, DataReport
from .shards import (
    ShardReadError,
    check_shard,
    describe_member,
    iter_shard,
    parquet_columns,
    resolve_shards,
    sample_id,
    shard_kind,
)

# Webdataset tars and parquet files. Read whole (for evaluation and validation) they become `CaptionedImage` records
# whose images stay in the shards as `ShardMember`s; for training they are streamed (`StreamingCaptionDataset`).

SHARD_DATASETS = ("webdataset", "parquet")
_SHARD_NAMES = {"webdataset": "a webdataset shard (.tar)", "parquet": "a parquet file"}


def resolve_data_files(dataset: str | None, patterns, what: str = "--data_files") -> list[str]:
    """The shard files that `patterns` name (see `vision_gpt.data.shards.resolve_shards`), each of `dataset`'s kind
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
