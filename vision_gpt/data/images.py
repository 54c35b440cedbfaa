"""Opening a stored image (a path, bytes, a shard member, a `datasets` cell) as an RGB PIL image, or an error that
names it."""

import io
import threading

from PIL import Image, UnidentifiedImageError

from ..modeling.image_loading_vision_gpt import ImageLoadError, load_image
from .shards import MemberReader, ShardMember, describe_member

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
