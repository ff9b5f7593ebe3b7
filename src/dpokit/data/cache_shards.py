"""The files a build's worker writes (its shard), and how the parent reads them back in order.

Each worker of ``dpokit.data.cache_build`` writes, per row, per tokenized row (candidate) and per response, int64
columns (:class:`Columns`) and the token ids, all in file order; the parent reads every shard front to back as
``Outcome`` s again (:func:`shard_outcomes`, the ids left on disk as offsets: :class:`Light`), settles them, and
interleaves its own columns into the final arrays (:func:`interleave`). Every file is read and written in
blocks, so memory stays flat however large the source.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpokit.data.formats import PreferenceRow
from dpokit.data.load import RowError, row_location
from dpokit.data.overlap import _digest
from dpokit.data.pipeline import Outcome
from dpokit.io import read_json, write_json

_MAX_MESSAGES = 5
"""Messages kept per shard of the first malformed rows: ``account`` keeps the first 5 of the whole source
(and raises the first), which are among the first 5 of some shard."""
CHUNK_ROWS = 1 << 16
"""Rows read from a column file at a time."""


class Columns:
    """Named int64 columns appended to ``folder/PREFIX.NAME.bin`` through small buffers (memory stays flat)."""

    def __init__(self, folder: Path, prefix: str, names: tuple[str, ...]):
        self.files = {name: (folder / f"{prefix}.{name}.bin").open("wb") for name in names}
        self.buffers = {name: array("q") for name in names}
        self.count = 0

    def add(self, **values: int) -> int:
        for name, value in values.items():
            self.buffers[name].append(value)
        self.count += 1
        if len(self.buffers[next(iter(self.buffers))]) >= 1 << 16:
            self.flush()
        return self.count - 1

    def flush(self) -> None:
        for name, buffer in self.buffers.items():
            self.files[name].write(buffer.tobytes())
            del buffer[:]

    def close(self) -> None:
        self.flush()
        for f in self.files.values():
            f.close()


class ForwardReader:
    """Reads a column file (int64, or ``width`` bytes a record) front to back in blocks, for indices that only
    grow: the merge reads gigabytes of shard columns with flat memory (a memory map would keep every page it
    touched resident)."""

    def __init__(self, path: Path, width: int = 0):
        self.file = path.open("rb")
        self.width = width
        self.start = 0
        self.block: Any = np.zeros(0, dtype="<i8") if not width else b""

    def _count(self) -> int:
        return len(self.block) // self.width if self.width else len(self.block)

    def get(self, index: int, n: int = 1) -> Any:
        """Values ``index .. index + n - 1`` (a list of ints, or the bytes of n records)."""
        while index + n > self.start + self._count():
            keep = self.block[(index - self.start) * (self.width or 1):]
            self.start = index
            more = self.file.read(CHUNK_ROWS * (self.width or 8))
            if not more:
                raise AssertionError(f"{self.file.name}: shorter than its rows say")
            self.block = keep + more if self.width else np.concatenate([keep, np.frombuffer(more, dtype="<i8")])
        a = index - self.start
        if self.width:
            return self.block[a * self.width:(a + n) * self.width]
        return self.block[a:a + n].tolist()

    def close(self) -> None:
        self.file.close()


ROW_COLUMNS = ("kind", "reason", "format", "invisible", "label", "digest", "number", "candidate")
"""Per row of a shard. ``kind``: bit 0 well-formed, bit 1 located by ``row N``, bit 2 tokenization dropped the
row, bit 3 tokenization found it malformed; ``reason``: 0 none, else 1 + its index in the shard's names."""
CANDIDATE_COLUMNS = ("prompt_offset", "prompt_len", "first_response", "n_responses", "flags")
"""Per tokenized row of a shard. ``flags``: boundary fallback 1, truncated 2, prompt truncated 4."""
RESPONSE_COLUMNS = ("offset", "length", "level")


class Shard:
    """One worker's output: per row, per tokenized row (candidate) and per response, and the token ids."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True)
        self.folder = folder
        self.tokens = (folder / "tokens.bin").open("wb")
        self.n_tokens = 0
        self.rows = Columns(folder, "rows", ROW_COLUMNS)
        self.candidates = Columns(folder, "candidates", CANDIDATE_COLUMNS)
        self.responses = Columns(folder, "responses", RESPONSE_COLUMNS)
        self.keys = (folder / "keys.bin").open("wb")
        self.names: list[str] = []
        self.messages: dict[int, str] = {}

    def code(self, value: str) -> int:
        if value not in self.names:
            self.names.append(value)
        return self.names.index(value)

    def message(self, index: int, error: RowError) -> None:
        if len(self.messages) < _MAX_MESSAGES:
            self.messages[index] = str(error)

    def add(self, outcome: Outcome) -> None:
        index = self.rows.count
        row, encoded = outcome.row, outcome.encoded
        values = dict.fromkeys(ROW_COLUMNS, 0)
        values["candidate"] = -1
        if outcome.error is not None or row is None:
            assert outcome.error is not None
            values["reason"] = 1 + self.code(outcome.error.reason)
            self.message(index, outcome.error)
        else:
            values["number"], by_row = row_number(row.location)
            values["kind"] = 1 | 2 * by_row
            values["format"] = self.code(row.format)
            values["invisible"] = int(outcome.invisible)
            values["label"] = -1 if row.label is None else int(row.label)
            values["digest"] = outcome.digest - (1 << 64) if outcome.digest >= 1 << 63 else outcome.digest
            if outcome.reason is not None:
                values["reason"] = 1 + self.code(outcome.reason)
            elif isinstance(encoded, RowError):
                values["reason"], values["kind"] = 1 + self.code(encoded.reason), values["kind"] | 8
                self.message(index, encoded)
            elif isinstance(encoded, str):
                values["reason"], values["kind"] = 1 + self.code(encoded), values["kind"] | 4
            else:
                values["candidate"] = self._candidate(encoded, row)
        self.rows.add(**values)

    def _candidate(self, encoded: Any, row: PreferenceRow) -> int:
        first = self.responses.count
        for k, ids in enumerate(encoded.responses_ids):
            self.responses.add(offset=self._write(ids), length=len(ids),
                               level=-1 if row.levels is None else row.levels[k])
        self.keys.write(_digest([encoded.prompt_ids, *encoded.responses_ids]) + _digest([encoded.prompt_ids]))
        flags = encoded.boundary_fallback + 2 * encoded.truncated + 4 * encoded.prompt_truncated
        return self.candidates.add(prompt_offset=self._write(encoded.prompt_ids), prompt_len=len(encoded.prompt_ids),
                                   first_response=first, n_responses=len(encoded.responses_ids), flags=flags)

    def _write(self, ids: list[int]) -> int:
        offset = self.n_tokens
        self.tokens.write(np.asarray(ids, dtype="<i4").tobytes())
        self.n_tokens += len(ids)
        return offset

    def close(self) -> None:
        for part in (self.tokens, self.keys, self.rows, self.candidates, self.responses):
            part.close()
        write_json(self.folder / "shard.json", {"names": self.names, "messages": self.messages,
                                                "tokens": self.n_tokens})


def row_number(location: str) -> tuple[int, int]:
    """``path:LINE`` -> (LINE, 0); ``path:row N`` and ``train_data[N]`` (``row_location``) -> (N, 1)."""
    if location.endswith("]"):
        return int(location[location.rindex("[") + 1:-1]), 1
    where = location.rsplit(":", 1)[1]
    return (int(where[4:]), 1) if where.startswith("row ") else (int(where), 0)


@dataclass
class Light:
    """A tokenized row as ``account`` needs it (lengths and flags), and where its ids are in the merged
    ``tokens.bin``; the ids themselves stay on disk."""

    prompt_len: int
    response_lens: list[int]
    boundary_fallback: bool
    truncated: bool
    prompt_truncated: bool
    prompt_offset: int
    response_offsets: list[int]
    keys: bytes
    """The overlap digests of the row with every response (pair, then prompt: 32 bytes)."""


def shard_outcomes(shards: list[Path], prefix: str) -> Iterator[Outcome]:
    """Every shard's rows, in order, as ``Outcome`` s again (tokenizations as ``Light``), read front to back."""
    base = 0
    for folder in shards:
        info = read_json(folder / "shard.json")
        names, messages = info["names"], {int(i): m for i, m in info["messages"].items()}
        rows = [ForwardReader(folder / f"rows.{name}.bin") for name in ROW_COLUMNS]
        cand = {name: ForwardReader(folder / f"candidates.{name}.bin") for name in CANDIDATE_COLUMNS}
        resp = {name: ForwardReader(folder / f"responses.{name}.bin") for name in RESPONSE_COLUMNS}
        keys = ForwardReader(folder / "keys.bin", width=32)
        n_rows = (folder / "rows.kind.bin").stat().st_size // 8
        for start in range(0, n_rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, n_rows - start)
            chunk = zip(*(column.get(start, n) for column in rows))
            for index, (kind, reason, fmt, invisible, label, digest, number, candidate) in enumerate(chunk, start):
                name = names[reason - 1] if reason else None
                if not kind & 1:
                    assert name is not None
                    yield Outcome(error=RowError(messages.get(index, f"{prefix}: malformed row"), name))
                    continue
                where = row_location(prefix, number) if kind & 2 else f"{prefix}:{number}"
                outcome = Outcome(invisible=bool(invisible), digest=digest % (1 << 64))
                levels = None
                if candidate >= 0:
                    (prompt_offset,), (prompt_len,), (first,), (count,), (flags,) = (
                        cand[c].get(candidate) for c in CANDIDATE_COLUMNS)
                    level = resp["level"].get(first, count)
                    levels = level if level and level[0] >= 0 else None
                    outcome.encoded = Light(prompt_len, resp["length"].get(first, count), bool(flags & 1),
                                             bool(flags & 2), bool(flags & 4), base + prompt_offset,
                                             [base + o for o in resp["offset"].get(first, count)],
                                             keys.get(candidate))
                elif name is not None and kind & 8:
                    outcome.encoded = RowError(messages.get(index, f"{where}: {name}"), name)
                elif name is not None and kind & 4:
                    outcome.encoded = name
                elif name is not None:
                    outcome.reason = name
                outcome.row = PreferenceRow("", [], where, names[fmt], levels=levels,
                                            label=None if label < 0 else bool(label))
                yield outcome
        for reader in [*rows, *cand.values(), *resp.values(), keys]:
            reader.close()
        base += info["tokens"]


def interleave(folder: Path, name: str, columns: tuple[str, ...]) -> None:
    """``NAME.COL.bin`` column files -> one row-major ``NAME.bin`` (in blocks), the column files removed."""
    readers = [ForwardReader(folder / f"{name}.{c}.bin") for c in columns]
    n = (folder / f"{name}.{columns[0]}.bin").stat().st_size // 8
    with (folder / f"{name}.bin").open("wb") as out:
        for start in range(0, n, CHUNK_ROWS):
            count = min(CHUNK_ROWS, n - start)
            block = np.array([reader.get(start, count) for reader in readers], dtype="<i8").T
            out.write(np.ascontiguousarray(block).tobytes())
    for reader, c in zip(readers, columns):
        reader.close()
        (folder / f"{name}.{c}.bin").unlink()
