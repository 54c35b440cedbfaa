"""The caption job's output files: JSONL, CSV and parquet rows, appended and flushed per batch, resumed, repaired after
a kill, and merged from the part files of a multi-process run."""

import csv
import glob
import json
import os
from pathlib import Path

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


# The decoding settings written into every row, in this order (CSV columns follow it).
SETTINGS = ("model", "num_beams", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_captions",
            "dtype", "seed")




def output_format(path: str) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"--output '{path}' must end in .jsonl (one JSON object per line), .csv or .parquet; the "
                         "format is taken from the extension.")
    return fmt


def row_store(output: Path, fmt: str) -> tuple[Path, str]:
    """Where rows are appended as they are captioned, and in which format. A parquet file cannot be appended to (its
    footer comes last, and a killed writer leaves none), so a parquet output collects its rows in a JSONL file next to
    it, `OUT.parquet.rows.jsonl`, which `finish_parquet` turns into the parquet file at the end of the run."""
    if fmt == "parquet":
        return output.with_name(output.name + ".rows.jsonl"), "jsonl"
    return output, fmt


def parquet_schema(num_captions: int, clipscore: bool = False, scores: bool = False, review: bool = False,
                   rerank: bool = False):
    """The typed columns of a parquet output: a column's type never depends on whether its first row was an error."""
    import pyarrow as pa

    types = {"image": pa.string(), "caption": pa.string(), "captions": pa.list_(pa.string()),
             "confidence": pa.float64(), "grounding": pa.float64(), "truncated": pa.bool_(),
             "confidences": pa.list_(pa.float64()), "groundings": pa.list_(pa.float64()), "needs_review": pa.bool_(),
             "rerank": pa.string(),
             "clipscore": pa.float64(), "error": pa.string(), "model": pa.string(), "num_beams": pa.int64(),
             "max_new_tokens": pa.int64(), "do_sample": pa.bool_(), "temperature": pa.float64(),
             "top_p": pa.float64(), "top_k": pa.int64(), "num_captions": pa.int64(), "dtype": pa.string(),
             "seed": pa.int64()}
    names = ["image", "caption", *(["captions"] if num_captions > 1 else []),
             *_score_columns(num_captions, scores, review, "parquet", rerank), *(["clipscore"] if clipscore else []),
             "error", *SETTINGS]
    if num_captions == 0:  # --score-captions: the captions given, scored
        names = score_file_columns(review)
    return pa.schema([(name, types[name]) for name in names])


# What a `--score-captions` row records besides its scores: decoding settings have no effect there.
SCORE_FILE_SETTINGS = ("model", "dtype")


def score_file_columns(review: bool = False) -> list[str]:
    """The columns of `--score-captions` rows, in every format."""
    return ["image", "caption", *_score_columns(1, True, review, None), "error", *SCORE_FILE_SETTINGS]


def _score_columns(num_captions: int, scores: bool, review: bool, fmt: str | None, rerank: bool = False) -> list[str]:
    """The trust columns: the first caption's scores, then the others' (a list each, or numbered CSV columns), the
    review mark, and the score the captions were reranked by."""
    if not scores:
        return []
    names = ["confidence", "grounding", "truncated"]
    if num_captions > 1:
        names += ([f"{score}_{n}" for n in range(2, num_captions + 1) for score in ("confidence", "grounding")]
                  if fmt == "csv" else ["confidences", "groundings"])
    return names + (["needs_review"] if review else []) + (["rerank"] if rerank else [])


def _parquet_text(value):
    # A file name that is not UTF-8 reaches us with surrogate escapes, which parquet's UTF-8 strings cannot hold.
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def absorb_parquet(output: Path, store: Path, schema) -> int:
    """Copy the rows of an existing parquet output that the row store lacks into the store, so that the store holds
    every row and the parquet file can be rewritten from it alone. Returns how many were copied."""
    import pyarrow.parquet as pq

    if not output.exists():
        return 0
    try:
        table = pq.read_table(output)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise ValueError(f"--output '{output}' exists but is not a parquet file vision-gpt can read ({error}); move "
                         "it away or choose a new --output.") from None
    if table.schema.names != schema.names:
        raise ValueError(f"'{output}' has the columns {table.schema.names}, but this run writes {schema.names} "
                         "(different --num-captions or --score?). Resume with the settings that wrote it, or choose a "
                         "new --output.")
    held = {row["image"] for row in read_rows(store, "jsonl")}
    missing = [row for row in table.to_pylist() if row["image"] not in held]
    writer = RowWriter(store, "jsonl", schema.names)
    writer.write(missing)
    writer.close()
    return len(missing)


def finish_parquet(output: Path, store: Path, schema) -> int:
    """Write every row of the store into the parquet `output` (through a temporary file and a rename, so that a kill
    here leaves the old file whole), then delete the store. Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{name: _parquet_text(row.get(name)) for name in schema.names} for row in read_rows(store, "jsonl")]
    temporary = output.with_name(output.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), temporary)
    os.replace(temporary, output)
    store.unlink(missing_ok=True)
    return len(rows)


def csv_columns(num_captions: int, clipscore: bool = False, scores: bool = False, review: bool = False,
                rerank: bool = False) -> list[str]:
    extra = [f"caption_{i}" for i in range(2, num_captions + 1)]
    return ["image", "caption", *extra, *_score_columns(num_captions, scores, review, "csv", rerank),
            *(["clipscore"] if clipscore else []), "error", *SETTINGS]


def part_path(output: str, rank: int) -> Path:
    """Where process `rank` writes its rows under `accelerate launch`: `out.part-1.jsonl` next to `out.jsonl`."""
    path = Path(output)
    return path.with_name(f"{path.stem}.part-{rank}{path.suffix}")


def leftover_parts(output: str) -> list[Path]:
    path = Path(output)
    pattern = f"{glob.escape(path.stem)}.part-*{glob.escape(path.suffix)}"
    return sorted(p for p in path.parent.glob(pattern) if p.stem.rsplit(".part-", 1)[-1].isdigit())


def repair_last_line(path: Path) -> bool:
    """Drop a half-written last row (from a killed run), so that appending continues on a line boundary. True if one
    was dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return False
        # Scan back for the last complete line in chunks: outputs can hold 100k rows.
        end, keep = size, 0
        while end > 0:
            start = max(0, end - 65536)
            file.seek(start)
            newline = file.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        file.truncate(keep)
    return True


def read_rows(path: Path, fmt: str, expected_columns: list[str] | None = None):
    """The rows of an output or part file as dicts (CSV values are strings)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as file:
        if fmt == "csv":
            reader = csv.DictReader(file)
            if reader.fieldnames is None:
                return
            if expected_columns is not None and reader.fieldnames != expected_columns:
                raise ValueError(
                    f"'{path}' has the columns {reader.fieldnames}, but this run writes {expected_columns} (different "
                    "--num-captions?). Resume with the settings that wrote it, or choose a new --output.")
            yield from reader
            return
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or "image" not in row:
                raise ValueError(f"Line {number} of '{path}' is not a row written by `vision-gpt caption`; remove or "
                                 "fix that line, or choose a new --output.")
            yield row


class RowWriter:
    """Appends rows to a JSONL or CSV file and flushes them, so that a killed run keeps every finished batch."""

    def __init__(self, path: Path, fmt: str, columns: list[str]):
        self.fmt = fmt
        new = not path.exists() or path.stat().st_size == 0
        # newline="" lets the csv module write exactly "\n" line ends, which repair_last_line relies on;
        # surrogateescape round-trips file names that are not valid UTF-8 instead of failing on them.
        self.file = open(path, "a", newline="", encoding="utf-8", errors="surrogateescape")
        if fmt == "csv":
            self.writer = csv.DictWriter(self.file, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
            if new:
                self.writer.writeheader()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if self.fmt == "csv":
                self.writer.writerow(row)
            else:
                self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def merge_parts(output: Path, fmt: str, columns: list[str]) -> int:
    """Append the rows of every part file to `output` and delete the parts. Rows already in `output` are skipped, so
    a merge interrupted half-way can simply run again. Returns how many rows were added."""
    parts = leftover_parts(str(output))
    if not parts:
        return 0
    repair_last_line(output)
    existing = {row["image"] for row in read_rows(output, fmt, columns)}
    writer = RowWriter(output, fmt, columns)
    added = 0
    try:
        for part in parts:
            repair_last_line(part)
            rows = [row for row in read_rows(part, fmt, columns) if row["image"] not in existing]
            writer.write(rows)
            existing.update(row["image"] for row in rows)
            added += len(rows)
    finally:
        writer.close()
    for part in parts:
        part.unlink()
    return added


def _repair(path: Path) -> list[str]:
    if repair_last_line(path):
        return [f"{path}: dropped a half-written last row (from an interrupted run); that image is captioned again."]
    return []


def prepare_output(output: Path, fmt: str, columns: list[str], retry_errors: bool) -> tuple[dict[str, bool], list[str]]:
    """Make `output` ready to append to: drop a half-written last row, merge parts left by an interrupted multi-process
    run, and (with `retry_errors`) remove error rows. Returns {image key: True if its row is an error} for the rows it
    holds, and messages for the user."""
    notes = _repair(output)
    merged = merge_parts(output, fmt, columns)
    if merged:
        notes.append(f"{output}: merged {merged} rows left in part files by an interrupted multi-process run.")
    rows = list(read_rows(output, fmt, columns))
    if retry_errors and any(row.get("error") for row in rows):
        kept = [row for row in rows if not row.get("error")]
        # Rewrite to a temporary file and rename, so that a kill here never leaves a half-written output.
        temporary = output.with_name(output.name + ".tmp")
        temporary.unlink(missing_ok=True)
        writer = RowWriter(temporary, fmt, columns)
        writer.write(kept)
        writer.close()
        os.replace(temporary, output)
        notes.append(f"{output}: removed {len(rows) - len(kept)} error rows; --retry-errors tries those images again.")
        rows = kept
    return {row["image"]: bool(row.get("error")) for row in rows}, notes


def make_row(key: str, captions: list[str] | None, error: str | None, settings: dict, fmt: str | None,
             trust: list[dict] | None = None, scores: bool = False, review_below: float | None = None,
             rerank: str | None = None) -> dict:
    """One output row; `captions` (N of them) is None when the image could not be read. With `scores`, `trust` holds
    each caption's `{"confidence", "grounding", "truncated"}` (None for an unreadable image), and with `review_below`
    the row says whether its caption's confidence is below it."""
    row = {"image": key, "caption": captions[0] if captions else None}
    num_captions = settings["num_captions"]
    if num_captions > 1:
        if fmt == "csv":
            row.update({f"caption_{n}": captions[n - 1] if captions else None for n in range(2, num_captions + 1)})
        else:
            row["captions"] = captions
    if scores:
        first = trust[0] if trust else {}
        row.update(confidence=first.get("confidence"), grounding=first.get("grounding"),
                   truncated=first.get("truncated"))
        if num_captions > 1:
            if fmt == "csv":
                for n in range(2, num_captions + 1):
                    for score in ("confidence", "grounding"):
                        row[f"{score}_{n}"] = trust[n - 1][score] if trust else None
            else:
                row["confidences"] = [item["confidence"] for item in trust] if trust else None
                row["groundings"] = [item["grounding"] for item in trust] if trust else None
        if review_below is not None:
            # Never drops a row: a caption to check is marked, and an unreadable image has no caption to check.
            row["needs_review"] = None if not trust else first["confidence"] < review_below
        if rerank is not None:
            row["rerank"] = rerank
    return {**row, "error": error, **settings}


def format_table(rows: list[dict], header: str) -> str:
    """The captions as a table; with trust scores, each caption's confidence and grounding before it; with several
    captions per image, one numbered line each."""
    width = max([len("image")] + [len(row["image"]) for row in rows])
    scored = any("confidence" in row for row in rows)
    heading = "confidence  grounding  caption" if scored else "caption"
    lines = [header, "", f"{'image':<{width}}  {heading}", f"{'-' * width}  {'-' * len(heading)}"]
    for row in rows:
        if row["error"]:
            texts, values = [f"ERROR: {row['error']}"], [None]
        else:
            captions = row.get("captions") or [row["caption"]]
            texts = captions if len(captions) == 1 else [f"{i}. {c}" for i, c in enumerate(captions, 1)]
            values = (list(zip(row.get("confidences") or [row.get("confidence")],
                               row.get("groundings") or [row.get("grounding")])) if scored else [None] * len(texts))
        for i, (text, value) in enumerate(zip(texts, values)):
            scores = ""
            if scored:
                scores = f"{value[0]:>10.3f}  {value[1]:>9.3f}  " if value is not None else " " * 23
            lines.append(f"{row['image'] if i == 0 else '':<{width}}  {scores}{text}")
    return "\n".join(lines)