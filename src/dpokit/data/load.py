"""Read raw preference rows: JSONL, JSON, CSV, Parquet files (optionally ``.gz`` for the text ones), or a hub
dataset id.

Every row comes out as a :class:`Record`: the row's dict plus its *location*, a string naming where the row
lives, so every later error can point at it:

- JSONL and CSV: ``path:LINE`` (1-based physical line; for a CSV record spanning lines, its first line)
- JSON, Parquet: ``path:row N`` (0-based index, as in ``rows[N]`` / ``table.slice(N)``)
- hub dataset: ``id[split]:row N``

JSONL and Parquet are streamed row by row; a JSONL line is read with a size cap (``max_line_bytes``) so one
corrupt multi-gigabyte line cannot exhaust memory. JSON documents have no streaming parser in the standard
library and are read whole.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dpokit.errors import DataError

_BOM = b"\xef\xbb\xbf"
_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
          ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Record:
    """One raw row as read from the source, before any format checks."""

    location: str
    """Where the row lives: ``path:LINE``, ``path:row N`` or ``id[split]:row N``."""
    row: dict[str, Any]


def iter_records(source: str, split: str = "train", max_rows: int | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Record]:
    """Yield the rows of ``source`` (a file path, or a hub dataset id when no such path exists).

    Stops after ``max_rows`` rows. Raises :class:`DataError` (one line, naming the file and line where there is
    one) for a missing file, a directory, an empty file, a file with no rows, a malformed line, or a line longer
    than ``max_line_bytes``.
    """
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError:  # a name the OS refuses (too long, bad characters) cannot be a file here
        exists = False
    if exists:
        rows = _file_records(path, split, max_line_bytes)
    elif _looks_like_path(source):
        raise DataError(f"{source}: file not found")
    else:
        rows = _hub_records(source, split)
    count = 0
    for record in rows:
        if max_rows is not None and count >= max_rows:
            break
        yield record
        count += 1
    if count == 0:
        raise DataError(f"{source}: no rows found")


def _looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything with a file suffix or a path shape is a missing file."""
    if source.startswith((".", "/", "~", "\\")) or source.count("/") > 1 or "\\" in source:
        return True
    suffixes = [s.lower() for s in Path(source).suffixes]
    return bool(suffixes) and (suffixes[-1] in _KINDS or suffixes[-1] == ".gz")


# ------------------------------------------------------------------------------------------------------ files

def _file_records(path: Path, split: str, max_line_bytes: int) -> Iterator[Record]:
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a JSONL, JSON, CSV or Parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    kind, opener = _kind(path)
    if kind == "jsonl":
        return _jsonl_records(path, opener, max_line_bytes)
    if kind == "json":
        return _json_records(path, opener, split, max_line_bytes)
    if kind in ("csv", "tsv"):
        return _csv_records(path, opener, "\t" if kind == "tsv" else ",", max_line_bytes)
    return _parquet_records(path)


Opener = Callable[..., IO[Any]]


def _kind(path: Path) -> tuple[str, Opener]:
    """File kind from the suffix (``.jsonl.gz`` is gzipped JSONL); an unknown suffix is sniffed from the first
    byte, because JSON-lines data often ships as ``.txt`` or without a suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    opener: Opener = open
    if suffixes and suffixes[-1] == ".gz":
        opener, suffixes = gzip.open, suffixes[:-1]
    kind = _KINDS.get(suffixes[-1]) if suffixes else None
    if kind == "parquet" and opener is not open:
        raise DataError(f"{path}: Parquet files are compressed inside; remove the .gz")
    if kind is None:
        with opener(path, "rb") as f:
            head = f.read(4096).removeprefix(_BOM).lstrip()
        kind = {b"{": "jsonl", b"[": "json"}.get(head[:1])
        if kind is None:
            raise DataError(f"{path}: unknown file type; expected .jsonl, .json, .csv or .parquet")
    return kind, opener


def _jsonl_records(path: Path, opener: Opener, max_line_bytes: int) -> Iterator[Record]:
    with opener(path, "rb") as f:
        lineno = 0
        while True:
            # +2 leaves room for "\r\n", so a line of exactly max_line_bytes is read whole in one call and the
            # line count stays right.
            raw = f.readline(max_line_bytes + 2)
            if not raw:
                break
            lineno += 1
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            content = raw.rstrip(b"\r\n")
            if len(content) > max_line_bytes:
                raise DataError(f"{path}:{lineno}: line longer than data.max_line_bytes ({max_line_bytes} bytes)")
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start})") from None
            if not text.strip():
                continue  # blank lines are layout, not rows
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            yield Record(f"{path}:{lineno}", _as_row(obj, f"{path}:{lineno}"))


def _json_records(path: Path, opener: Opener, split: str, max_line_bytes: int) -> Iterator[Record]:
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level objects: JSON lines in a .json file
            del text
            yield from _jsonl_records(path, opener, max_line_bytes)
            return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    del text
    if isinstance(data, dict):
        for key in (split, "data", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            if not {"chosen", "rejected", "responses"} & data.keys():
                raise DataError(f"{path}: expected a list of rows, or an object holding one under "
                                f"'data' or '{split}'; found keys {_keys(data)}")
            data = [data]  # a single row
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, got {_type_name(data)}")
    for i, obj in enumerate(data):
        yield Record(f"{path}:row {i}", _as_row(obj, f"{path}:row {i}"))


def _csv_records(path: Path, opener: Opener, delimiter: str, max_line_bytes: int) -> Iterator[Record]:
    # Long responses exceed csv's default 128 KiB field limit; the line cap is the limit we promise instead.
    csv.field_size_limit(max(csv.field_size_limit(), max_line_bytes))
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [name.strip() for name in next(reader)]
            previous = reader.line_num
            for fields in reader:
                start, previous = previous + 1, reader.line_num
                if not any(field.strip() for field in fields):
                    continue
                if len(fields) > len(header):
                    raise DataError(f"{path}:{start}: {len(fields)} fields but the header names {len(header)}")
                # A short row lacks the trailing columns; the format check then names the missing key.
                yield Record(f"{path}:{start}", dict(zip(header, fields)))
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    index = 0
    with parquet:
        # Record batches keep memory bounded by the batch, not the file.
        for batch in parquet.iter_batches(batch_size=512):
            for obj in batch.to_pylist():
                yield Record(f"{path}:row {index}", obj)
                index += 1


# -------------------------------------------------------------------------------------------------------- hub

def _hub_records(source: str, split: str) -> Iterator[Record]:
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as exc:  # offline, unknown id, unknown split: datasets raises many types
        raise DataError(f"{source}: not a local file, and loading it as a hub dataset (split '{split}') "
                        f"failed ({_first_line(exc)})") from None
    for index, obj in enumerate(dataset):
        yield Record(f"{source}[{split}]:row {index}", _as_row(obj, f"{source}[{split}]:row {index}"))


# ---------------------------------------------------------------------------------------------------- helpers

def _as_row(obj: Any, location: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{location}: expected a JSON object (one row), got {_type_name(obj)}")
    return obj


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _keys(row: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in list(row)[:8]) or "none"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
