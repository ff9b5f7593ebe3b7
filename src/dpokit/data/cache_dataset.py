"""A cached source's folder and the dataset read from it: flat little-endian arrays (``numpy.memmap``) plus
``meta.json``, written by ``dpokit.data.cache_build``, found by ``dpokit.data.cache``, checked by ``cache_key``:

- ``tokens.bin`` int32: every token id, each prompt and response once;
- ``spans.bin`` int64 (S, 2): ``(offset, length)`` of a prompt or a response in ``tokens``;
- ``groups.bin`` int64 (G, 5): ``(prompt span, first ref, n refs, flags, row number)`` per group;
- ``refs.bin`` int64 (R,): the span of each group's responses, best first (a ranking with ties refers to its
  responses again for each strict pair);
- ``keys.bin`` uint8 (G, 32): each group's overlap digests (``dpokit.data.overlap``: pair, then prompt);
- ``meta.json``: the key's inputs, the array sizes and checksums, the first row's format, and the
  :class:`DataReport` (rows read = kept + dropped by reason, length histograms: :func:`stored_report`), so a hit
  reports exactly what the build did.

Why flat arrays and not Arrow (``datasets``): a group is a few index lookups and slices, no per-row Python
objects or column decoding, no dependency beyond numpy, and the files are identical whatever the number of
processes that built them. A training process touches only the pages of the groups it reads, so its memory does
not grow with the size of the data (about 80 bytes of index per pair on disk, none in Python).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from dpokit.data.load import row_location
from dpokit.data.pipeline import DataReport, LengthSummary
from dpokit.data.tokenize import TokenizedGroup

GROUP_FLAGS = {"boundary_fallback": 1, "truncated": 2, "labelled": 4, "label": 8, "row_index": 16}
"""Bits of a group's flags; ``row_index``: its location is ``row N`` (JSON, Parquet, hub) rather than a line."""
ARRAYS = {"tokens": ("<i4", 1), "spans": ("<i8", 2), "groups": ("<i8", 5), "refs": ("<i8", 1),
          "keys": ("u1", 32)}
"""Each array's dtype and its row width."""


class TokenizedDataset(Sequence[TokenizedGroup]):
    """The groups of one cached source, read-only, as :class:`TokenizedGroup` s built on access from
    memory-mapped arrays: ``len``, ``dataset[i]``, slices. ``pair_keys`` / ``prompt_keys`` are the overlap
    digests (16 bytes a group) without reading any token."""

    def __init__(self, folder: Path, meta: dict[str, Any], prefix: str):
        self.folder, self.meta, self.prefix = folder, meta, prefix
        arrays = {name: _open_array(folder, name, meta["shapes"][name]) for name in ARRAYS}
        self.tokens, self.spans, self.groups = arrays["tokens"], arrays["spans"], arrays["groups"]
        self.refs, self.keys = arrays["refs"], arrays["keys"]

    def __len__(self) -> int:
        return len(self.groups)

    @overload
    def __getitem__(self, index: int) -> TokenizedGroup: ...

    @overload
    def __getitem__(self, index: slice) -> list[TokenizedGroup]: ...

    def __getitem__(self, index: int | slice) -> TokenizedGroup | list[TokenizedGroup]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        prompt, first, n, flags, row = (int(v) for v in self.groups[index])
        responses = [self._ids(int(span)) for span in self.refs[first:first + n]]
        where = row_location(self.prefix, row) if flags & GROUP_FLAGS["row_index"] else f"{self.prefix}:{row}"
        label = bool(flags & GROUP_FLAGS["label"]) if flags & GROUP_FLAGS["labelled"] else None
        return TokenizedGroup(self._ids(prompt), responses, where,
                              bool(flags & GROUP_FLAGS["boundary_fallback"]), bool(flags & GROUP_FLAGS["truncated"]),
                              label=label)

    def _ids(self, span: int) -> list[int]:
        offset, length = (int(v) for v in self.spans[span])
        return self.tokens[offset:offset + length].tolist()

    @property
    def pair_keys(self) -> np.ndarray:
        return self.keys[:, :16]

    @property
    def prompt_keys(self) -> np.ndarray:
        return self.keys[:, 16:]


def _open_array(folder: Path, name: str, shape: list[int]) -> np.ndarray:
    dtype, _ = ARRAYS[name]
    if not shape[0]:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=tuple(shape))


def report_from_dict(summary: dict[str, Any], source: str) -> DataReport:
    """A :class:`DataReport` from ``stored_report``'s dict (length histograms included)."""
    report = DataReport(source=source)
    for name in ("rows_read", "rows_kept", "boundary_fallback", "truncated", "truncated_prompts", "groups", "ties",
                 "invisible_stripped", "desirable", "undesirable"):
        setattr(report, name, summary[name])
    report.dropped, report.formats, report.errors = dict(summary["dropped"]), dict(summary["formats"]), list(summary["errors"])
    report.prompt_lengths = _lengths(summary["prompt_histogram"])
    report.response_lengths = _lengths(summary["response_histogram"])
    return report


def stored_report(report: DataReport) -> dict[str, Any]:
    summary = report.to_dict()
    summary["prompt_histogram"] = _histogram(report.prompt_lengths)
    summary["response_histogram"] = _histogram(report.response_lengths)
    return summary


def _histogram(lengths: LengthSummary) -> dict[str, Any]:
    return {"counts": {str(k): v for k, v in sorted(lengths.counts.items())}, "count": lengths.count,
            "total": lengths.total, "min": lengths.min, "max": lengths.max}


def _lengths(stored: dict[str, Any]) -> LengthSummary:
    lengths = LengthSummary()
    lengths.counts.update({int(k): v for k, v in stored["counts"].items()})
    lengths.count, lengths.total, lengths.min, lengths.max = (stored[k] for k in ("count", "total", "min", "max"))
    return lengths
