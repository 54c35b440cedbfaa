"""`CaptionedImage` records, the `DataReport` that counts what was skipped, and the text readers every layout uses."""

import codecs
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
