"""`vision-gpt caption --score-captions FILE`: the trust scores of captions that already exist (alt texts, dataset
captions, an earlier run's rows), without generating.

FILE is JSONL (one object a line) or CSV with `image` and `caption` fields, one caption per image; an optional
`truncated` field (true for a caption cut before its end, as `vision-gpt caption` writes it) scores it without an end
token. Rows come out keyed by `image`, as `caption`'s rows are, so that an output of `caption` scores as it was
written."""

import csv
import json
import os
from pathlib import Path

import torch

from .outputs import SCORE_FILE_SETTINGS


def read_caption_file(path: str) -> dict[str, tuple[str, bool]]:
    """`{image key: (caption, truncated)}` from FILE, the keys normalised as `caption`'s are; the caption is None for an
    error row of an earlier run (no caption, an `error`). A line without an image or a caption, a caption that is not
    text, or an image listed twice stops the run, naming the file and the line."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--score-captions {path}: no such file.")
    suffix = file.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"--score-captions {path}: the file must be .jsonl (one JSON object a line with 'image' and "
                         "'caption') or .csv (with 'image' and 'caption' columns).")
    with open(file, encoding="utf-8-sig", newline="") as handle:
        if suffix == ".csv":
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: the CSV header must name 'image' and 'caption' columns (it has "
                                 f"{reader.fieldnames}).")
            rows = [(number, row) for number, row in enumerate(reader, start=2)]
        else:
            rows = []
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as error:
                    raise ValueError(f"{path} line {number} is not JSON ({error}); each line must be one object like "
                                     '{"image": "a.jpg", "caption": "a dog runs"}.') from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path} line {number} is not a JSON object.")
                rows.append((number, row))
    captions, lines = {}, {}
    for number, row in rows:
        # An error row of an earlier `caption` run (no caption, an error) stays an error row.
        failed = row.get("caption") is None and bool(row.get("error"))
        for field in ("image", "caption"):
            if failed and field == "caption":
                continue
            if not isinstance(row.get(field), str) or (field == "image" and not row[field]):
                raise ValueError(f"{path} line {number}: '{field}' is missing or not text (got {row.get(field)!r}); "
                                 "every line needs an image path and its caption.")
        key = os.path.normpath(row["image"])
        if key in lines:
            raise ValueError(f"{path} lines {lines[key]} and {number} both name the image '{key}'; score one caption "
                             "per image in a run.")
        lines[key] = number
        truncated = row.get("truncated") in (True, "true", "True")
        captions[key] = (None, False) if failed else (row["caption"], truncated)
    if not captions:
        raise ValueError(f"{path} holds no captions to score.")
    return captions


@torch.no_grad()
def score_batches(loader, model, processor, captions: dict[str, tuple[str, bool]], settings: dict, options):
    """Yield the rows of each batch of `loader` (an `ImageDecoder`'s): each readable image's caption scored in one
    `score_captions` call, the others error rows."""
    from ..inference.trust import score_texts

    for items in loader:
        items = [(key, pixels, "no caption to score: the file's row for this image is an error row")
                 if error is None and captions[key][0] is None else (key, pixels, error) for key, pixels, error in items]
        good = [(key, pixels) for key, pixels, error in items if error is None]
        scored = {}
        if good:
            pixel_values = torch.stack([pixels for _, pixels in good]).to(device=model.device, dtype=model.dtype)
            texts = [captions[key][0] for key, _ in good]
            scores = score_texts(model, processor, pixel_values, texts, [captions[key][1] for key, _ in good])
            for index, (key, _) in enumerate(good):
                scored[key] = (round(float(scores.confidence[index]), 6), round(float(scores.grounding[index]), 6))
        rows = []
        for key, _, error in items:
            caption, truncated = captions[key]
            confidence, grounding = scored.get(key, (None, None))
            row = {"image": key, "caption": caption, "confidence": confidence, "grounding": grounding,
                   "truncated": truncated}
            if options.review_below is not None:
                row["needs_review"] = None if confidence is None else confidence < options.review_below
            row["error"] = error
            row.update({name: settings[name] for name in SCORE_FILE_SETTINGS})
            rows.append(row)
        yield rows


__all__ = ["read_caption_file", "score_batches"]
