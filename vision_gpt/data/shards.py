"""Webdataset tar shards and parquet files: finding them, listing their samples, and reading one sample's bytes.

Large captioning collections are kept in shards, not in folders of JPEGs: webdataset tars (`{key}.jpg` next to
`{key}.txt` or `{key}.json`, the members of one sample side by side) and parquet files (an image-bytes column plus
caption columns). Both are listed without reading any image: a tar's headers give each member's offset and size, a
parquet file's footer its row groups. A `ShardMember` locates one image, is small and picklable, and `read_member`
reads just its bytes, so that `vision-gpt caption`'s decoding workers, Ray actors and the training loader each read
only the images they are handed.
"""

import json
import os
import re
import tarfile
from dataclasses import dataclass
from glob import glob, has_magic
from pathlib import Path
from typing import Iterator

WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
WEBDATASET_CAPTION_EXTENSIONS = ("txt", "json")
SHARD_SUFFIXES = {".tar": "webdataset", ".parquet": "parquet"}
# Column names taken as a parquet file's images and row ids when none is named.
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "bytes", "image_bytes")
PARQUET_ID_COLUMNS = ("key", "__key__", "image_id", "id")
JSON_CAPTION_KEYS = ("captions", "caption", "sentences", "text")


@dataclass(frozen=True)
class ShardMember:
    """One image in a shard. For a tar: the byte `offset` and `size` of its member (`name`). For parquet: its row
    `offset` in the file, in row group `group`, and the image column `name`."""

    shard: str
    kind: str  # "webdataset" or "parquet"
    name: str
    offset: int
    size: int = 0
    group: int = 0


@dataclass
class ShardSample:
    """A sample as listed: its `key` (unique in its shard), where its image is, and its reference captions."""

    key: str
    image: ShardMember | None
    captions: list[str]


# ----- finding shards --------------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """
    The names a webdataset brace pattern stands for, in order: `{000000..000099}` is a zero-padded numeric range (as
    wide as its bounds are written), `{a,b}` a list; several braces multiply out. A pattern without braces is itself.

    ```python
    >>> expand_braces("shards/{00..02}.tar")
    ['shards/00.tar', 'shards/01.tar', 'shards/02.tar']
    ```"""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        low, high = numeric.groups()
        if int(high) < int(low):
            raise ValueError(f"The range {{{body}}} in '{pattern}' runs backwards; write {{{high}..{low}}}.")
        width = len(low) if low.startswith("0") or len(low) == len(high) else 0
        choices = [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"'{{{body}}}' in '{pattern}' is neither a range like {{000000..000099}} nor a list like "
                         "{a,b}.")
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def shard_kind(path: str) -> str | None:
    """"webdataset" for a `.tar`, "parquet" for a `.parquet`, else None."""
    return SHARD_SUFFIXES.get(Path(path).suffix.lower())


def resolve_shards(patterns: list[str], what: str = "--data_files") -> list[str]:
    """The shard files that `patterns` (paths, brace patterns, globs) name, each once, in order. Every named file must
    exist, and every pattern must match at least one shard: a typo never silently trains on less data."""
    found, seen = [], set()
    for pattern in patterns:
        matched = []
        for name in expand_braces(pattern):
            if has_magic(name):
                matched += sorted(path for path in glob(name, recursive=True) if shard_kind(path))
            elif os.path.isfile(name):
                matched.append(name)
            else:
                raise ValueError(f"{what}: '{name}' (from '{pattern}') is not a file; check the path and the range.")
        if not matched:
            raise ValueError(f"{what}: '{pattern}' matches no .tar or .parquet files.")
        for path in matched:
            if shard_kind(path) is None:
                raise ValueError(f"{what}: '{path}' is neither a webdataset shard (.tar) nor a parquet file (.parquet).")
            key = os.path.normpath(path)
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found


# ----- listing samples -------------------------------------------------------------------------------------------------


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the member's path up to the first dot of its file name, the rest its extension
    (`dir/000123.seg.png` is key `dir/000123`, extension `seg.png`)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def parse_caption_file(data: bytes, extension: str, where: str) -> list[str]:
    """The captions of a webdataset `.txt` (one per non-empty line) or `.json` member (a list of strings, or an object
    with `captions`, `caption`, `sentences` or `text`)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where} is not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); save it as "
                         "UTF-8.") from None
    if extension == "txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not JSON ({error.msg} at line {error.lineno}, column {error.colno}).") from None
    if isinstance(value, dict):
        value = next((value[key] for key in JSON_CAPTION_KEYS if key in value), None)
        if value is None:
            raise ValueError(f"{where} has none of the keys {list(JSON_CAPTION_KEYS)}; put the captions under "
                             '"captions" (a list) or "caption" (a string).')
    captions = caption_cell(value if isinstance(value, list) else [value])
    for item in captions:
        if not isinstance(item, str):
            raise ValueError(f"{where} holds a caption that is not a string ({type(item).__name__}).")
    return captions


def list_webdataset(path: str, captions: bool = True) -> list[ShardSample]:
    """The samples of a webdataset tar, in the tar's order, from its headers (and, with `captions`, its caption
    members, which are small), without reading an image. A sample without an image member gets `image=None`; one
    with two images (a `.jpg` and a `.png`) or captions that do not parse stops the listing with an error naming it."""
    samples = []
    for sample in iter_webdataset(path, images=False, captions=captions):
        if sample.problem is not None:
            raise ValueError(f"{sample.problem}; keep one image per key, with captions in UTF-8 .txt or JSON .json "
                             "members.")
        samples.append(ShardSample(sample.key, sample.image, sample.captions))
    return samples


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise ValueError(f"'{path}' is not a readable parquet file: {error}.") from None


def parquet_image_column(schema, path: str, image_column: str | None = None) -> str:
    """The column of a parquet file holding encoded images: `image_column`, else the first of
    `PARQUET_IMAGE_COLUMNS` that exists, else the only binary (or datasets Image `{bytes, path}`) column."""
    import pyarrow as pa

    names = schema.names
    if image_column is not None:
        if image_column not in names:
            raise ValueError(f"'{path}' has no column {image_column!r} (columns: {names}).")
        return image_column

    def holds_images(field):
        kind = field.type
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or (
            pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)

    for name in PARQUET_IMAGE_COLUMNS:
        if name in names and holds_images(schema.field(name)):
            return name
    binary = [field.name for field in schema if holds_images(field)]
    if len(binary) == 1:
        return binary[0]
    raise ValueError(f"'{path}' has no image column vision-gpt recognises (columns: {names}); name it with "
                     "--image-column (a column of encoded image bytes, or of datasets' {bytes, path} images).")


def list_parquet(path: str, image_column: str | None = None, id_column: str | None = None,
                 caption_columns: list[str] | None = None) -> list[ShardSample]:
    """The rows of a parquet file as samples, without reading its images: keyed by `id_column` (default: a `key`,
    `__key__`, `image_id` or `id` column, else the row number), with the captions of `caption_columns` (each cell a
    string or a list of strings; None reads none). Repeated ids stop the listing: they could not name the rows."""
    samples = [ShardSample(sample.key, sample.image, sample.captions)
               for sample in iter_parquet(path, image_column, id_column, caption_columns, images=False)]
    keys = [sample.key for sample in samples]
    if len(set(keys)) != len(keys):
        column = id_column or next(name for name in PARQUET_ID_COLUMNS if name in parquet_columns(path))
        raise ValueError(f"Column {column!r} of '{path}' has repeated values, so it cannot name the rows; pass "
                         "another id column.")
    return samples


def parquet_columns(path: str) -> list[str]:
    return list(_parquet_file(path).schema_arrow.names)


# ----- streaming samples -----------------------------------------------------------------------------------------------


class ShardReadError(ValueError):
    """A shard that opened but broke off while being read (a truncated copy): the samples before the damage were
    good, and a stream counts the shard and goes on with the next."""


@dataclass
class StreamedSample:
    """A sample as streamed: like `ShardSample`, plus its image's bytes (`data`, when read) and, for a sample that
    cannot be used (captions that do not parse, two images), the reason (`problem`), so that a stream skips and counts
    it instead of stopping."""

    key: str
    image: ShardMember | None
    captions: list[str]
    data: bytes | None = None
    problem: str | None = None
    reason: str | None = None  # the kind of problem, as a report counts it


CAPTIONS_UNREADABLE = "samples whose captions could not be read"
TWO_IMAGES = "samples with two images"


def sample_id(shard: str, key: str) -> str:
    """A sample's id across shards: `SHARD/KEY`, the shard's path as given (normalised), so that two shards named
    alike in different folders (train/000000.tar, val/000000.tar) never share ids."""
    return f"{os.path.normpath(shard)}/{key}"


def iter_webdataset(path: str, images: bool = True, captions: bool = True) -> Iterator[StreamedSample]:
    """
    The samples of a webdataset tar, read front to back in one pass (with `images`, each image's bytes too): the way
    to read a shard whole, where `MemberReader` serves single members. A sample's members are side by side, as
    webdataset's writers put them. A tar that cannot be read to its end raises `ShardReadError` after the samples
    before the damage; the sample being read then is dropped. One that is not a tar at all raises `ValueError`.

    ```python
    >>> for sample in iter_webdataset("shards/000000.tar"):
    ...     sample.key, len(sample.data), sample.captions
    ```"""
    try:
        archive = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as error:
        raise ValueError(f"'{path}' is not a readable (uncompressed) tar file: {error}.") from None
    current = None
    with archive:
        try:
            for info in archive:
                base = info.name.rpartition("/")[2]
                if not info.isfile() or base.startswith("."):
                    continue
                key, extension = _split_member_name(info.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    # TarFile keeps every header it has read; a shard of 100,000 members would keep them all.
                    archive.members = []
                    current = StreamedSample(key, None, [])
                if extension in WEBDATASET_IMAGE_EXTENSIONS:
                    if current.image is not None:
                        current.problem = (f"'{path}': sample '{key}' has two images ({current.image.name} and "
                                           f"{info.name})")
                        current.reason = TWO_IMAGES
                    current.image = ShardMember(path, "webdataset", info.name, info.offset_data, info.size)
                    if images:
                        current.data = archive.extractfile(info).read()
                        if len(current.data) != info.size:
                            raise OSError(f"it ends inside member {info.name}")
                elif captions and extension in WEBDATASET_CAPTION_EXTENSIONS:
                    data = archive.extractfile(info).read()
                    try:
                        current.captions += parse_caption_file(data, extension, f"'{path}' member {info.name}")
                    except ValueError as error:
                        current.problem, current.reason = str(error), CAPTIONS_UNREADABLE
        except (OSError, tarfile.TarError, EOFError) as error:
            where = f"sample '{current.key}' on" if current else "its start on"
            raise ShardReadError(f"'{path}' could not be read to its end ({error}): from {where}, nothing was read. "
                                 "Is the shard truncated? Copy it again.") from None
        if current is not None:
            yield current


def caption_cell(value) -> list:
    """The captions of one parquet (or datasets) cell: a string, a list of strings, COCO-like `{"raw": ...}` entries,
    or None (no caption)."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [item.get("raw") or item.get("caption") or item.get("text") if isinstance(item, dict) else item
            for item in values]


def iter_parquet(path: str, image_column: str | None = None, id_column: str | None = None,
                 caption_columns: list[str] | None = None, images: bool = True,
                 batch_size: int = 256) -> Iterator[StreamedSample]:
    """The rows of a parquet file as samples, one row group at a time (batches of `batch_size` rows), keyed as
    `list_parquet` keys them; with `images`, each image's bytes too (a row with no image has `data` None)."""
    file = _parquet_file(path)
    schema = file.schema_arrow
    image_column = parquet_image_column(schema, path, image_column)
    if id_column is None:
        id_column = next((name for name in PARQUET_ID_COLUMNS if name in schema.names), None)
    missing = [name for name in [id_column, *(caption_columns or [])] if name and name not in schema.names]
    if missing:
        raise ValueError(f"'{path}' has no column {missing[0]!r} (columns: {schema.names}).")
    columns = list(dict.fromkeys(name for name in [id_column, *(caption_columns or []),
                                                   image_column if images else None] if name))
    row = 0
    for group in range(file.metadata.num_row_groups):
        if not columns:  # neither ids, captions nor images: the row numbers are all there is
            for _ in range(file.metadata.row_group(group).num_rows):
                yield StreamedSample(str(row), ShardMember(path, "parquet", image_column, row, 0, group), [])
                row += 1
            continue
        batches = file.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except Exception as error:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ... for a damaged file
                raise ShardReadError(f"'{path}' could not be read past row {row} ({error}). Is the file truncated? "
                                     "Copy it again.") from None
            if batch is None:
                break
            cells = {name: batch.column(name).to_pylist() for name in columns}
            for index in range(batch.num_rows):
                key = str(cells[id_column][index]) if id_column else str(row)
                captions = [text for name in caption_columns or [] for text in caption_cell(cells[name][index])]
                sample = StreamedSample(key, ShardMember(path, "parquet", image_column, row, 0, group), captions)
                if images:
                    value = cells[image_column][index]
                    sample.data = value.get("bytes") if isinstance(value, dict) else value
                yield sample
                row += 1


def check_shard(path: str, image_column: str | None = None) -> None:
    """Open a shard as cheaply as can be (a tar's first header, a parquet file's footer and image column), raising
    `ValueError` naming the file if it is not one: a stream then stops at start, not hours in."""
    if shard_kind(path) == "parquet":
        parquet_image_column(_parquet_file(path).schema_arrow, path, image_column)
        return
    try:
        with tarfile.open(path, mode="r:") as archive:
            archive.next()
    except (OSError, tarfile.TarError) as error:
        raise ValueError(f"'{path}' is not a readable (uncompressed) tar file: {error}. Webdataset shards are plain "
                         "tars; unpack a .tar.gz (gunzip) first.") from None


def iter_shard(path: str, images: bool = True, image_column: str | None = None, id_column: str | None = None,
               caption_columns: list[str] | None = None) -> Iterator[StreamedSample]:
    """`iter_webdataset` or `iter_parquet`, by the file's suffix. Captions come from `caption_columns` in parquet
    (None reads none) and from the caption members in a tar (unless `caption_columns` is `[]`)."""
    if shard_kind(path) == "webdataset":
        return iter_webdataset(path, images=images, captions=caption_columns != [])
    return iter_parquet(path, image_column, id_column, caption_columns, images=images)


# ----- reading one image -----------------------------------------------------------------------------------------------


class MemberReader:
    """Reads members' bytes, keeping the last parquet row group it decoded: members come mostly in order, and a row
    group is read whole. One per process or worker (it holds open state)."""

    def __init__(self):
        self._group_key = None
        self._group = None
        self._group_start = 0

    def read(self, member: ShardMember) -> bytes:
        if member.kind == "webdataset":
            with open(member.shard, "rb") as file:
                file.seek(member.offset)
                data = file.read(member.size)
            if len(data) != member.size:
                raise OSError(f"'{member.shard}' ends inside member {member.name} (truncated shard)")
            return data
        key = (member.shard, member.group, member.name)
        if key != self._group_key:
            file = _parquet_file(member.shard)
            self._group = file.read_row_group(member.group, columns=[member.name]).column(0).to_pylist()
            self._group_key = key
            self._group_start = sum(file.metadata.row_group(g).num_rows for g in range(member.group))
        value = self._group[member.offset - self._group_start]
        if isinstance(value, dict):  # datasets' Image feature: {"bytes", "path"}
            value = value.get("bytes")
        if value is None:
            raise OSError(f"row {member.offset} of '{member.shard}' has no image in column {member.name!r}")
        return value


def describe_member(member: ShardMember) -> str:
    return (f"member {member.name} of '{member.shard}'" if member.kind == "webdataset"
            else f"row {member.offset} of '{member.shard}'")
