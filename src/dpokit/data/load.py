"""Read raw preference rows: JSONL, JSON, CSV, Parquet files (optionally ``.gz`` for the text ones), or a hub
dataset id.

Every row comes out as a :class:`Record`: the row's dict plus its *location*, a string naming where the row
lives, so every later error can point at it:

- JSONL and CSV: ``path:LINE`` (1-based physical line; for a CSV record spanning lines, its first line)
- JSON, Parquet: ``path:row N`` (0-based index, as in ``rows[N]`` / ``table.slice(N)``)
- hub dataset: ``id[split]:row N``
- rows given in memory (``dpokit.data.memory``): ``train_data[N]`` / ``eval_data[N]`` (0-based, as Python indexes)

JSONL, CSV and Parquet are streamed row by row; a JSONL line is read with a size cap (``max_line_bytes``) so one
corrupt multi-gigabyte line cannot exhaust memory: the rest of such a line is skipped in 1 MiB reads, never held.
A ``.json`` file whose first line is a complete JSON object is JSON lines and streamed too; any other JSON
document has no streaming parser in the standard library and is read whole.

Two kinds of failure:

- the *source* is unusable (missing, a directory, empty, no rows, unknown type, UTF-16, unreadable compressed
  data, an invalid JSON document): :class:`DataError`, always;
- one *row* is unusable (invalid JSON on its line, not UTF-8, longer than ``max_line_bytes``, not an object):
  :class:`RowError`, which carries a drop reason. :func:`iter_records` raises it; :func:`scan_records` yields it
  in the row's place, so ``data.on_error: skip`` can count the row and go on.

Nothing read from a data file is ever used as a path: rows hold text, and the only file opened is the source.
A source that is not an existing path is taken as a hub dataset id only if it has a hub id's shape
(``name`` or ``owner/name``, no ``..``), optionally with ``:config`` for one of the dataset's configs (subsets):
``owner/name:config``; the split is ``data.train_split`` / ``data.eval_split``. The ``datasets`` library
(>= 4) runs no loading scripts.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dpokit.data import memory
from dpokit.errors import DataError

_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_MAGIC = {b"\x1f\x8b": "gzip-compressed (name it .gz)", b"PAR1": "a Parquet file (name it .parquet)",
          b"PK\x03\x04": "a zip archive"}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(:[A-Za-z0-9][A-Za-z0-9._-]*)?")
_SKIP_CHUNK = 1 << 20
"""Bytes read at a time while skipping the rest of an over-long line."""
_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
          ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Record:
    """One raw row as read from the source, before any format checks."""

    location: str
    """Where the row lives: ``path:LINE``, ``path:row N`` or ``id[split]:row N``."""
    row: dict[str, Any]


class RowError(DataError):
    """A problem confined to one row. The message starts with the row's location; ``reason`` is the drop reason
    it is counted under when ``data.on_error`` is ``skip`` (see ``dpokit.data.formats.MALFORMED_REASONS``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def iter_records(source: str, split: str = "train", max_rows: int | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Record]:
    """Yield the rows of ``source`` (a file path, or a hub dataset id when no such path exists).

    Stops after ``max_rows`` rows. Raises :class:`DataError` (one line, naming the file and line where there is
    one) for a missing file, a directory, an empty file, a file with no rows, a malformed line, or a line longer
    than ``max_line_bytes``.
    """
    for item in scan_records(source, split, max_rows, max_line_bytes):
        if isinstance(item, RowError):
            raise item
        yield item


def scan_records(source: str, split: str = "train", max_rows: int | None = None,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, streaming: bool = False) -> Iterator[Record | RowError]:
    """Like :func:`iter_records`, but a row that cannot be read comes out as a :class:`RowError` in its place
    (and counts toward ``max_rows``); problems with the source as a whole still raise. ``streaming``: a hub
    dataset is read as it arrives (``data.streaming``)."""
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError:  # a name the OS refuses (too long, bad characters) cannot be a file here
        exists = False
    if memory.is_memory(source):
        rows = _memory_records(source, max_line_bytes)
    elif exists:
        rows = _file_records(path, split, max_line_bytes)
    elif _looks_like_path(source):
        raise DataError(f"{source}: file not found")
    elif not _HUB_ID.fullmatch(source) or ".." in source:
        raise DataError(f"{source}: file not found, and not a hub dataset id ('name' or 'owner/name', "
                        "optionally ':config')")
    else:
        rows = _hub_records(source, split, streaming)
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

Scanned = Iterator[Record | RowError]


def _file_records(path: Path, split: str, max_line_bytes: int) -> Scanned:
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a JSONL, JSON, CSV or Parquet file")
    if path.stat().st_size == 0:  # also what a FIFO or a device such as /dev/zero reports: never read those
        raise DataError(f"{path}: file is empty")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: not readable (permission denied)")
    kind, opener = _kind(path)
    if kind != "parquet":
        _check_text_file(path, opener)
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


def _check_text_file(path: Path, opener: Opener) -> None:
    """Name the usual wrong-file mistakes up front, instead of as 'invalid JSON' on line 1."""
    with opener(path, "rb") as f:
        head = _read(f.read, 8, path, 1)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise DataError(f"{path}: {what}, not text")
    if head.startswith(_UTF16_BOMS) or b"\x00" in head[:4]:
        raise DataError(f"{path}: UTF-16 or UTF-32 text (or binary); dpokit reads UTF-8, e.g. convert with "
                        "iconv -f UTF-16 -t UTF-8")


def _read(read: Callable[[int], bytes], size: int, path: Path, lineno: int) -> bytes:
    """One read; a truncated .gz or a disk error becomes one line naming where reading stopped."""
    try:
        return read(size)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}:{lineno}: cannot read the file ({_first_line(exc)})") from None


def _jsonl_records(path: Path, opener: Opener, max_line_bytes: int, start: int = 0, end: int | None = None,
                   first_line: int = 1) -> Scanned:
    """The rows of a JSONL file; with ``start``/``end`` (byte offsets at line starts) only the lines that begin
    in ``[start, end)``, numbered from ``first_line`` (``jsonl_spans``)."""
    with opener(path, "rb") as f:
        if start:
            f.seek(start)
        lineno = first_line - 1
        while end is None or f.tell() < end:
            # +2 leaves room for "\r\n", so a line of exactly max_line_bytes is read whole in one call and the
            # line count stays right.
            raw = _read(f.readline, max_line_bytes + 2, path, lineno + 1)
            if not raw:
                break
            lineno += 1
            location = f"{path}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            content = raw.rstrip(b"\r\n")
            if len(content) > max_line_bytes:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line without holding it
                    raw = _read(f.readline, _SKIP_CHUNK, path, lineno)
                yield RowError(f"{location}: line longer than data.max_line_bytes ({max_line_bytes} bytes)",
                               "line_too_long")
                continue
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RowError(f"{location}: not valid UTF-8 (byte 0x{content[exc.start]:02x} at column "
                               f"{exc.start + 1}); dpokit reads UTF-8 text", "not_utf8")
                continue
            if not text.strip():
                continue  # blank lines are layout, not rows
            yield _parse_line(text, location)


def jsonl_spans(source: str, parts: int) -> list[tuple[int, int, int]] | None:
    """``(start, end, first_line)`` of up to ``parts`` consecutive byte ranges of a plain (uncompressed) JSONL
    file, each starting at a line start, so that workers can read them independently
    (``scan_jsonl_span``); None for any other source (read in one piece). Counting the lines before each cut
    reads the file once, at disk speed."""
    path = Path(source).expanduser()
    try:
        if not path.is_file() or _kind(path) != ("jsonl", open) or parts < 2:
            return None
        _file_records(path, "train", DEFAULT_MAX_LINE_BYTES)  # the checks of the file as a whole
        size = path.stat().st_size
    except (OSError, DataError):
        return None  # read in one piece, scan_records names the problem
    cuts, lines = [0], [1]
    with path.open("rb") as f:
        counted = newlines = 0
        for k in range(1, parts):
            f.seek(max(size * k // parts - 1, cuts[-1]))
            f.readline()  # to the start of the next line
            cut = f.tell()
            if cut >= size or cut <= cuts[-1]:
                break
            f.seek(counted)
            while counted < cut:
                block = f.read(min(1 << 24, cut - counted))
                newlines += block.count(b"\n")
                counted += len(block)
            cuts.append(cut)
            lines.append(newlines + 1)
    ends = cuts[1:] + [size]
    return [(a, b, line) for a, b, line in zip(cuts, ends, lines)]


def scan_jsonl_span(source: str, start: int, end: int, first_line: int,
                    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Scanned:
    """The rows of one ``jsonl_spans`` range, as :func:`scan_records` gives them."""
    path = Path(source).expanduser()
    return _jsonl_records(path, open, max_line_bytes, start, end, first_line)


def _parse_line(text: str, location: str) -> Record | RowError:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a complete object followed by more text
            return RowError(f"{location}: invalid JSON (unexpected text after the object at column "
                            f"{exc.colno})", "malformed_json")
        return RowError(f"{location}: invalid JSON ({_json_message(exc)})", "malformed_json")
    except RecursionError:
        return RowError(f"{location}: invalid JSON (nested too deeply)", "malformed_json")
    except ValueError:  # the only other: an integer literal longer than Python's int conversion limit
        return RowError(f"{location}: invalid JSON (a number with too many digits)", "malformed_json")
    return _as_row(obj, location)


def _json_message(exc: json.JSONDecodeError) -> str:
    # Some messages end in "at" ("Unterminated string starting at") and expect the position after them.
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def _json_records(path: Path, opener: Opener, split: str, max_line_bytes: int) -> Scanned:
    if _first_line_is_object(path, opener, max_line_bytes):
        # JSON lines saved as .json: stream them rather than read a possibly huge file whole.
        yield from _jsonl_records(path, opener, max_line_bytes)
        return
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read the file ({_first_line(exc)})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level objects: JSON lines in a .json file
            del text
            yield from _jsonl_records(path, opener, max_line_bytes)
            return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({_json_message(exc)})") from None
    except (RecursionError, ValueError) as exc:
        raise DataError(f"{path}: invalid JSON ({_first_line(exc)})") from None
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
        yield _as_row(obj, f"{path}:row {i}")


def _first_line_is_object(path: Path, opener: Opener, max_line_bytes: int) -> bool:
    """A complete JSON object on the first line with more text after it: JSON lines."""
    with opener(path, "rb") as f:
        first = _read(f.readline, max_line_bytes + 2, path, 1).removeprefix(_BOM).strip()
        more = bool(_read(f.read, 4096, path, 2).strip())
    if not (more and first.startswith(b"{")) or len(first) > max_line_bytes:
        return False
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:  # also UnicodeDecodeError: the whole-document reader names that
        return False


def _csv_records(path: Path, opener: Opener, delimiter: str, max_line_bytes: int) -> Scanned:
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
                    yield RowError(f"{path}:{start}: {len(fields)} fields but the header names {len(header)}",
                                   "malformed_csv")
                    continue
                # A short row lacks the trailing columns; the format check then names the missing key.
                yield Record(f"{path}:{start}", dict(zip(header, fields)))
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}:{reader.line_num + 1}: cannot read the file ({_first_line(exc)})") from None


def _parquet_records(path: Path) -> Scanned:
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


def _memory_records(source: str, max_line_bytes: int) -> Scanned:
    """Rows given in memory: their JSON lines read as a JSONL file's are, located ``train_data[N]``."""
    name = memory.label(source)
    for index, text in enumerate(memory.lines(source)):
        location = f"{name}[{index}]"
        if len(text.encode()) > max_line_bytes:
            yield RowError(f"{location}: row longer than data.max_line_bytes ({max_line_bytes} bytes as JSON)",
                           "line_too_long")
        else:
            yield _parse_line(text, location)


# -------------------------------------------------------------------------------------------------------- hub

def _hub_records(source: str, split: str, streaming: bool = False) -> Scanned:
    """A hub dataset's rows; ``source`` is ``owner/name`` or ``owner/name:config`` (a dataset's config, also
    called subset). ``streaming`` reads them as they arrive (``datasets`` IterableDataset), so the raw dataset
    is never stored whole on disk: only what dpokit keeps (the token ids) is."""
    name, _, config = source.partition(":")
    try:
        import datasets

        by_config = {"name": config} if config else {}
        dataset = datasets.load_dataset(name, **by_config, split=split, streaming=streaming)
    except Exception as exc:  # offline, unknown id, unknown config or split: datasets raises many types
        which = f"config '{config}', " if config else ""
        raise DataError(f"{source}: not a local file, and loading it as a hub dataset ({which}split '{split}') "
                        f"failed ({_first_line(exc)})") from None
    rows = iter(dataset)
    prefix = location_prefix(source, split)
    index = 0
    while True:
        try:
            obj = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # a stream can fail part way (network, a bad shard): one line, where
            raise DataError(f"{prefix}:row {index}: reading the hub dataset failed ({_first_line(exc)})") from None
        yield _as_row(obj, f"{prefix}:row {index}")
        index += 1


# ---------------------------------------------------------------------------------------------------- helpers

def location_prefix(source: str, split: str) -> str:
    """What the locations of ``source``'s rows start with (see the module docstring): the file's path,
    ``id[split]`` for a hub dataset, or ``train_data`` / ``eval_data`` for rows given in memory."""
    if memory.is_memory(source):
        return memory.label(source)
    path = Path(source).expanduser()
    return str(path) if path.exists() else f"{source}[{split}]"


def row_location(prefix: str, index: int) -> str:
    """The location of the row at ``index`` of a source whose rows are numbered rather than lines:
    ``prefix:row N``, or ``train_data[N]`` for rows given in memory."""
    return f"{prefix}[{index}]" if prefix in memory.LABELS else f"{prefix}:row {index}"


def _as_row(obj: Any, location: str) -> Record | RowError:
    if not isinstance(obj, dict):
        return RowError(f"{location}: expected a JSON object (one row), got {_type_name(obj)}", "not_an_object")
    return Record(location, obj)


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _keys(row: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in list(row)[:8]) or "none"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
