"""Preference data end to end: load -> normalize formats -> validate -> clean -> dedupe -> tokenize, with a
report that accounts for every row read (``rows_read == rows_kept + sum(dropped.values())``).

Every kept row becomes :class:`~dpokit.data.tokenize.TokenizedGroup` s (a prompt with its responses best first):
one group, except that a ranking with ties becomes one K = 2 group per strict comparison (ties never become
preferences; see :func:`~dpokit.data.formats.strict_pairs`), the tied comparisons counted in ``ties``.

The training loop calls :func:`load_preferences` (pairs); the Plackett-Luce loss calls :func:`load_ranked`.
Both collect :func:`iter_tokenized`, which streams: ``dpokit data check`` runs it over files of any size in
constant memory (rows are tokenized in chunks of ``_CHUNK`` and forgotten; lengths go into fixed-size
histograms; duplicates are found from 64-bit digests in a :class:`DigestSet`, about 12-24 bytes per distinct row).

Bad rows, per ``data.on_error``:

- ``raise`` (default): the first malformed row (see ``formats.MALFORMED_REASONS``) stops with its one-line
  :class:`DataError` naming ``path:line``;
- ``skip``: malformed rows are dropped and counted by reason, and at the end the source is refused if more than
  ``data.max_bad_fraction`` of the rows read were malformed (a file that is mostly broken is the wrong file).

Content problems (``formats.CONTENT_REASONS``: empty fields, chosen == rejected, bidi overrides, duplicates, a
ranking with every response tied, no room after truncation) are counted drops in both modes.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from dpokit.data.formats import (
    MALFORMED_REASONS,
    PreferenceRow,
    drop_reason,
    normalize,
    row_digest,
    strict_pairs,
    strip_invisible,
)
from dpokit.data.load import DEFAULT_MAX_LINE_BYTES, RowError, scan_records
from dpokit.data.tokenize import Encoded, TokenizedGroup, encode_rows, token_rules
from dpokit.errors import DataError

_CHUNK = 256
"""Rows tokenized per batched tokenizer call: large enough to amortize the call, small enough that the raw
text held at once stays small."""

_MAX_ERRORS_KEPT = 5
"""Messages of the first malformed rows kept in the report (skip mode), so a user can find them."""


class LengthSummary:
    """Token lengths in fixed memory: a count per exact length up to :attr:`CAP` (lengths are counted after
    truncation, so they stay below ``max_length`` and this is exact in practice), above it one bucket per power
    of two. ``min``, ``max`` and ``mean`` are always exact; percentiles use the nearest-rank method, exact below
    the cap (a bucket above it reports its lower bound)."""

    CAP = 1 << 16

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def add(self, length: int) -> None:
        self.min = length if self.count == 0 else min(self.min, length)
        self.max = max(self.max, length)
        self.count += 1
        self.total += length
        self.counts[length if length < self.CAP else 1 << (length.bit_length() - 1)] += 1

    def __len__(self) -> int:
        return self.count

    def percentile(self, q: float) -> int:
        """The smallest length with at least ``q`` of the lengths at or below it."""
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for length in sorted(self.counts):
            seen += self.counts[length]
            if seen >= rank:
                return min(max(length, self.min), self.max)
        return self.max

    def stats(self) -> dict[str, float]:
        """count, min, mean, p50, p95, max."""
        if not self.count:
            return {"count": 0, "min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
        return {"count": self.count, "min": self.min, "mean": round(self.total / self.count, 2),
                "p50": self.percentile(0.50), "p95": self.percentile(0.95), "max": self.max}


def length_stats(lengths: list[int]) -> dict[str, float]:
    """count, min, mean, p50, p95, max; percentiles by the nearest-rank method (always an observed length)."""
    summary = LengthSummary()
    for length in lengths:
        summary.add(length)
    return summary.stats()


class DigestSet:
    """A set of 64-bit row digests in one flat open-addressing table (8 bytes a slot, at most 2/3 full, doubled
    when fuller): 12-24 bytes per distinct row, e.g. 134 MB for 10M rows (a Python ``set`` of digests costs
    about 100 bytes a row). Two different rows share a digest with probability about n^2 / 2^65 (3e-6 at 10M
    rows); the later one would then be counted as a duplicate."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._slots = array("Q", [0]) * capacity
        self._mask = capacity - 1
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return len(self._slots) * self._slots.itemsize

    def add(self, digest: int) -> bool:
        """Insert ``digest``; False if it was already there."""
        digest = digest or 1  # 0 marks an empty slot
        slots, mask = self._slots, self._mask
        i = digest & mask  # the digest is uniformly random: its low bits are a good slot index
        while (value := slots[i]) != 0:
            if value == digest:
                return False
            i = (i + 1) & mask
        slots[i] = digest
        self._size += 1
        if 3 * self._size > 2 * len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._slots
        self._slots = array("Q", [0]) * (2 * len(old))
        self._mask = len(self._slots) - 1
        self._size = 0
        for value in old:
            if value:
                self.add(value)


@dataclass
class DataReport:
    """What happened to every row of one source. ``rows_read == rows_kept + sum(dropped.values())`` always."""

    source: str
    rows_read: int = 0
    """Rows in the source (blank lines are not rows), malformed ones included."""
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows not trained on, by reason (see ``dpokit.data.formats.DROP_REASONS``)."""
    boundary_fallback: int = 0
    """Kept rows where a response was tokenized alone because a BPE merge crossed the prompt/response join."""
    truncated: int = 0
    """Kept rows cut to fit max_prompt_length / max_length."""
    truncated_prompts: int = 0
    """Kept rows whose prompt was cut (a subset of ``truncated``)."""
    groups: int = 0
    """Groups training sees: one per kept row, except a ranking with ties, which gives one pair per strict
    comparison."""
    ties: int = 0
    """Comparisons between tied responses of kept rankings, not trained (a ranking whose responses are all tied
    is dropped as ``all_tied`` instead)."""
    invisible_stripped: int = 0
    """Rows from which zero-width spaces, word joiners or stray BOMs were removed."""
    desirable: int = 0
    """Kept unpaired rows labelled true (KTO)."""
    undesirable: int = 0
    """Kept unpaired rows labelled false (KTO)."""
    formats: dict[str, int] = field(default_factory=dict)
    """Well-formed rows read per format (more than one key only with ``data.on_error: skip``, where the rows
    whose format differs from the first row's are dropped as ``mixed_formats``)."""
    errors: list[str] = field(default_factory=list)
    """The messages of the first few malformed rows (``data.on_error: skip``)."""
    prompt_lengths: LengthSummary = field(default_factory=LengthSummary)
    """Prompt tokens of the kept rows (after truncation)."""
    response_lengths: LengthSummary = field(default_factory=LengthSummary)
    """Tokens of each response of each kept row (after truncation)."""

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def rows_malformed(self) -> int:
        return sum(n for reason, n in self.dropped.items() if reason in MALFORMED_REASONS)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary; token lengths as ``{count, min, mean, p50, p95, max}``."""
        return {
            "source": self.source, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped, "rows_malformed": self.rows_malformed,
            "dropped": dict(sorted(self.dropped.items())),
            "boundary_fallback": self.boundary_fallback, "truncated": self.truncated,
            "truncated_prompts": self.truncated_prompts, "groups": self.groups, "ties": self.ties,
            "invisible_stripped": self.invisible_stripped,
            "desirable": self.desirable, "undesirable": self.undesirable,
            "formats": dict(self.formats), "errors": list(self.errors),
            "prompt_tokens": self.prompt_lengths.stats(),
            "response_tokens": self.response_lengths.stats(),
        }


def load_preferences(source: str, tokenizer: Any, data_cfg: Any,
                     split: str = "train") -> tuple[list[TokenizedGroup], DataReport]:
    """Read, validate and tokenize a pairwise preference source into groups of two (chosen first).

    ``data_cfg`` is a :class:`dpokit.config.DataConfig` (``max_length``, ``max_prompt_length``, ``max_rows``,
    ``max_line_bytes``, ``on_error``, ``max_bad_fraction``, ``dedupe`` are read). Ranked rows are a
    :class:`DataError` here (they need the listwise loss).
    """
    items, report = _load(source, tokenizer, data_cfg, split, "pairs")
    return items, report


def load_ranked(source: str, tokenizer: Any, data_cfg: Any,
                split: str = "train") -> tuple[list[TokenizedGroup], DataReport]:
    """Like :func:`load_preferences` for listwise rows (``responses`` + ``ranking``/``scores``), responses best
    first: a ranking without ties is one group of K, a ranking with ties one group of two per strict
    comparison, so one batch may mix K. Pairwise files are accepted too, as rankings of two (chosen first)."""
    items, report = _load(source, tokenizer, data_cfg, split, "ranked")
    return items, report


def load_unpaired(source: str, tokenizer: Any, data_cfg: Any,
                  split: str = "train") -> tuple[list[TokenizedGroup], DataReport]:
    """Like :func:`load_preferences` for unpaired rows (``prompt``, ``completion``, ``label``): one group of one
    response per row, its ``label`` kept (KTO). Other formats are a :class:`DataError` here."""
    return _load(source, tokenizer, data_cfg, split, "unpaired")


def load_any(source: str, tokenizer: Any, data_cfg: Any,
             split: str = "train") -> tuple[list[TokenizedGroup], DataReport]:
    """Pairs or rankings, whichever the source holds (``dpokit data check`` validates both)."""
    return _load(source, tokenizer, data_cfg, split, "any")


Want = Literal["pairs", "ranked", "unpaired", "any"]


def _load(source: str, tokenizer: Any, data_cfg: Any, split: str, want: Want) -> tuple[Any, DataReport]:
    report = DataReport(source=source)
    return list(iter_tokenized(source, tokenizer, data_cfg, report, split, want)), report


def iter_tokenized(source: str, tokenizer: Any, data_cfg: Any, report: DataReport, split: str = "train",
                   want: Want = "any") -> Iterator[TokenizedGroup]:
    """Stream the groups of the kept rows of ``source``, filling ``report`` as it goes. Holds at most ``_CHUNK``
    rows at a time. The report is complete, and the ``max_bad_fraction`` check done, once the iterator is
    exhausted. ``want="pairs"`` refuses a ranked source (the pairwise losses cannot take it); ``"ranked"`` and
    ``"any"`` accept every format."""
    skip = getattr(data_cfg, "on_error", "raise") == "skip"
    seen = DigestSet() if getattr(data_cfg, "dedupe", True) else None
    rules = token_rules(tokenizer)
    formats: Counter[str] = Counter()
    first: PreferenceRow | None = None
    pending: list[PreferenceRow] = []

    def malformed(err: RowError) -> None:
        if not skip:
            raise err
        report.drop(err.reason)
        if len(report.errors) < _MAX_ERRORS_KEPT:
            report.errors.append(str(err))

    def flush() -> Iterator[TokenizedGroup]:
        results = encode_rows([(r.prompt, r.responses) for r in pending], tokenizer, data_cfg.max_length,
                              data_cfg.max_prompt_length, [r.location for r in pending], rules,
                              on_error="skip" if skip else "raise")
        rows = list(pending)
        pending.clear()
        for row, result in zip(rows, results):
            if isinstance(result, RowError):
                malformed(result)
            elif isinstance(result, str):
                report.drop(result)
            else:
                yield from _kept(row, result, report)

    records = scan_records(source, split, getattr(data_cfg, "max_rows", None),
                           getattr(data_cfg, "max_line_bytes", DEFAULT_MAX_LINE_BYTES))
    for record in records:
        report.rows_read += 1
        if isinstance(record, RowError):
            malformed(record)
            continue
        try:
            row = normalize(record)
            if first is None:
                first = row
                if want == "pairs" and row.format.startswith("ranked"):
                    raise DataError(f"{row.location}: ranked rows (responses + ranking/scores) need "
                                    "loss.name=plackett_luce; pairwise losses take prompt/chosen/rejected rows")
                unpaired = row.format.startswith("unpaired")
                if want == "unpaired" and not unpaired:
                    raise DataError(f"{row.location}: loss.name=kto takes unpaired rows (prompt, completion, "
                                    f"label); this file holds {row.format} rows")
                if want in ("pairs", "ranked") and unpaired:
                    raise DataError(f"{row.location}: unpaired rows (prompt, completion, label) need "
                                    "loss.name=kto; the other losses take preference pairs or rankings")
            formats[row.format] += 1
            if row.format != first.format:
                raise RowError(f"{row.location}: format '{row.format}' differs from '{first.format}' of the "
                               f"first row ({first.location}); a file must use one format", "mixed_formats")
        except RowError as err:
            malformed(err)
            continue
        report.invisible_stripped += strip_invisible(row)
        reason = drop_reason(row.prompt, row.responses, allow_empty_prompt=row.format.startswith("implicit"))
        if reason is None and row.levels is not None and row.levels[-1] == 0:
            reason = "all_tied"
        if reason is None and seen is not None and not seen.add(row_digest(row)):
            reason = "duplicate"
        if reason is not None:
            report.drop(reason)
            continue
        pending.append(row)
        if len(pending) >= _CHUNK:
            yield from flush()
    yield from flush()

    report.formats = dict(formats)
    if report.rows_read != report.rows_kept + report.rows_dropped:  # the report's promise; a bug if broken
        raise AssertionError(f"row accounting broken: {report.to_dict()}")
    _check_bad_fraction(report, getattr(data_cfg, "max_bad_fraction", 0.05))


def _kept(row: PreferenceRow, result: Encoded, report: DataReport) -> list[TokenizedGroup]:
    """The groups of one kept row: the row itself, or with ties its strict pairs (responses tokenized once)."""
    report.rows_kept += 1
    report.boundary_fallback += result.boundary_fallback
    report.truncated += result.truncated
    report.truncated_prompts += result.prompt_truncated
    report.prompt_lengths.add(len(result.prompt_ids))
    for ids in result.responses_ids:
        report.response_lengths.add(len(ids))
    if row.levels is None:
        pieces = [result.responses_ids]
    else:
        pairs, tied = strict_pairs(row.levels)
        report.ties += tied
        pieces = [[result.responses_ids[i], result.responses_ids[j]] for i, j in pairs]
    report.groups += len(pieces)
    if row.label is not None:
        report.desirable += row.label
        report.undesirable += not row.label
    return [TokenizedGroup(result.prompt_ids, responses, row.location, result.boundary_fallback, result.truncated,
                           label=row.label)
            for responses in pieces]


def _check_bad_fraction(report: DataReport, max_bad_fraction: float) -> None:
    bad = report.rows_malformed
    if bad and bad > max_bad_fraction * report.rows_read:
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(report.dropped.items())
                           if reason in MALFORMED_REASONS)
        first = f"; first: {report.errors[0]}" if report.errors else ""
        raise DataError(f"{report.source}: {bad} of {report.rows_read} rows read are malformed "
                        f"({bad / report.rows_read:.1%}), more than data.max_bad_fraction={max_bad_fraction} "
                        f"({counts}){first}")
