"""Preference rows given in memory (``dpokit.train(config, train_data=..., eval_data=...)``): a
``datasets.Dataset``, a list of dicts or a pandas ``DataFrame``, read by the same pipeline and cache as a file.

Each row is serialized once to compact JSON (keys in the order given, UTF-8, no spaces), spooled to a temporary
file for the duration of the call: those lines are what the pipeline reads (parsed back exactly as the lines of
a JSONL file are, so the same rows give the same groups, counts and errors from memory as from a file), and
their sha256 (each line with its newline) is the rows' content hash. The hash names the
source in the run's config (``data.train: "<in-memory:train_data:sha256:HEX>"``), in the data cache's key and
in the resume fingerprint: a resumed run must be given the same rows again.

Rows are located by their index, as Python writes it: ``train_data[17]``, ``eval_data[3]``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dpokit.errors import DataError

LABELS = ("train_data", "eval_data")
"""The keyword arguments that carry rows, and so the names their rows' locations start with."""
_MARKER = re.compile(r"<in-memory:(train_data|eval_data):sha256:([0-9a-f]{64})>")

_GIVEN: dict[str, Path] = {}
"""Where the JSON lines of every source given in this process and not yet released are spooled, by marker: a
temporary file, so a large dataset is not held twice in memory while it is tokenized."""


def is_memory(source: str) -> bool:
    """``source`` names rows given in memory (whether or not they were given in this call)."""
    return _MARKER.fullmatch(source) is not None


def label(source: str) -> str:
    """``train_data`` or ``eval_data``: what locations of ``source``'s rows start with."""
    return _parse(source)[0]


def digest(source: str) -> str:
    """The rows' sha256 (of their JSON lines, each ending in a newline), read from the marker itself."""
    return _parse(source)[1]


def given_digest(source: str) -> str:
    """:func:`digest`, after checking that the rows were given (one line naming the problem otherwise)."""
    _spool(source)
    return digest(source)


def lines(source: str) -> Iterator[str]:
    """The JSON lines of the rows ``source`` names, in order; one line naming the problem when they were not
    given in this call."""
    return _read(_spool(source))


def _spool(source: str) -> Path:
    name = label(source)
    if source not in _GIVEN:
        key = "data.train" if name == "train_data" else "data.eval"
        raise DataError(f"{key}: {source} names rows given in memory, and none with that content were given "
                        f"now; pass the same rows again from Python: dpokit.train(config, {name}=rows, ...)")
    return _GIVEN[source]


def _read(path: Path) -> Iterator[str]:
    # newline="": only "\n" ends a line (JSON escapes it inside strings; U+2028 and a lone CR stay text).
    with path.open(encoding="utf-8", newline="") as f:
        for line in f:
            yield line.removesuffix("\n")


@contextlib.contextmanager
def given(data: Mapping[str, Any]) -> Iterator[dict[str, str]]:
    """Serialize each ``{label: rows}`` (``train_data``/``eval_data``; None entries skipped) into a temporary
    file, make its rows readable by the pipeline for the duration of the block, and give each label's marker
    (the source to put in ``data.train`` / ``data.eval``). The files are removed at the end of the block."""
    markers: dict[str, str] = {}
    added: list[str] = []
    spooled: list[Path] = []
    try:
        for name, rows in data.items():
            if rows is None:
                continue
            handle, path_name = tempfile.mkstemp(prefix=f"dpokit-{name}-", suffix=".jsonl")
            path = Path(path_name)
            spooled.append(path)
            digest, count = hashlib.sha256(), 0
            with os.fdopen(handle, "w", encoding="utf-8", newline="") as f:
                for line in serialize(rows, name):
                    text = line + "\n"
                    f.write(text)
                    digest.update(text.encode("utf-8"))
                    count += 1
            if not count:
                raise DataError(f"{name}: no rows found")
            source = f"<in-memory:{name}:sha256:{digest.hexdigest()}>"
            markers[name] = source
            if source not in _GIVEN:
                _GIVEN[source] = path
                added.append(source)
        yield markers
    finally:
        for source in added:
            _GIVEN.pop(source, None)
        for path in spooled:
            path.unlink(missing_ok=True)


def serialize(rows: Any, name: str) -> Iterator[str]:
    """One compact JSON line per row of ``rows`` (see :func:`as_rows`). NumPy and pandas scalars and arrays
    become their Python values (``tolist``), as ``Dataset``/``DataFrame`` cells often are; any other value JSON
    cannot hold is refused, naming its row."""
    for i, row in enumerate(as_rows(rows, name)):
        try:
            row = _image_cells(row)
            yield json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=_plain)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{name}[{i}]: not JSON data ({exc})") from None


def as_rows(rows: Any, name: str) -> Iterator[Any]:
    """The rows of a ``datasets.Dataset`` (each a dict), a pandas ``DataFrame`` (one dict per row, columns in
    order) or a list/tuple (as they are: a row that is not a dict is then a malformed row, like a JSONL line
    that is not an object)."""
    kind = type(rows).__name__
    if kind == "DatasetDict" or (isinstance(rows, Mapping) and rows and all(
            type(v).__name__ == "Dataset" for v in rows.values())):
        splits = ", ".join(repr(k) for k in rows)
        raise DataError(f"{name}: a DatasetDict (splits {splits}); pass one split, e.g. {name}=dataset['train']")
    if kind == "DataFrame" and hasattr(rows, "to_dict"):
        yield from rows.to_dict(orient="records")
    elif kind in ("Dataset", "IterableDataset") and hasattr(rows, "features"):
        yield from rows
    elif isinstance(rows, (list, tuple)):
        yield from rows
    else:
        raise DataError(f"{name}: expected a datasets.Dataset, a list of dicts or a pandas DataFrame, got "
                        f"{type(rows).__module__}.{kind}")


def _image_cells(row: Any) -> Any:
    """A row's ``images`` / ``image`` cells as JSON: a PIL image (a ``datasets.Dataset`` with an ``Image``
    column) as its lossless PNG bytes, raw bytes (an ``Image`` column read with ``decode=False``) as they are,
    both base64 in ``{"bytes": ...}`` (``dpokit.data.images`` reads them back). Only these columns: bytes
    anywhere else stay not JSON data."""
    if not isinstance(row, dict) or not ("images" in row or "image" in row):
        return row
    row = dict(row)
    for key in ("images", "image"):
        if key in row:
            value = row[key]
            row[key] = [_image_cell(v) for v in value] if isinstance(value, (list, tuple)) else _image_cell(value)
    return row


def _image_cell(value: Any) -> Any:
    if type(value).__module__.startswith("PIL."):
        if value.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):  # CMYK: PNG cannot hold it
            value = value.convert("RGB")  # what dpokit.data.images.decode makes of any image anyway
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        value = buffer.getvalue()
    elif isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}
    return value


def _plain(value: Any) -> Any:
    """The JSON value of a NumPy/pandas scalar or array; anything else is not JSON data."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a value of type {type(value).__name__}")


def _parse(source: str) -> tuple[str, str]:
    match = _MARKER.fullmatch(source)
    if match is None:
        raise ValueError(f"not an in-memory source: {source}")
    return match.group(1), match.group(2)
