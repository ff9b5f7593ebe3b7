"""Preference data end to end: load -> normalize formats -> validate -> clean -> dedupe -> tokenize, with a
report that accounts for every row read (``rows_read == rows_kept + sum(dropped.values())``).

Every kept row becomes :class:`~dpokit.data.tokenize.TokenizedGroup` s (a prompt with its responses best first):
one group, except that a ranking with ties becomes one K = 2 group per strict comparison (ties never become
preferences; see :func:`~dpokit.data.formats.strict_pairs`), the tied comparisons counted in ``ties``.

Training and ``dpokit data check`` read a source through the tokenized-data cache (``dpokit.data.cache``'s
``load_cached``), which runs the two halves of this module, :func:`row_outcomes` (in worker processes) and
:func:`account` (in order, in one), and keeps the groups in memory-mapped files. Evaluation reads held-out pairs
with :func:`load_preferences` (and :func:`load_ranked` / :func:`load_unpaired` / :func:`load_any` for the other
formats), which collect :func:`iter_tokenized`: the same halves in one process, streaming, in constant memory
(rows are tokenized in chunks of ``_CHUNK`` and forgotten; lengths go into fixed-size histograms; duplicates
are found from 64-bit digests in a :class:`DigestSet`, about 12-24 bytes per distinct row).

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from dpokit.data.config import DataConfig
from dpokit.data.formats import (
    MALFORMED_REASONS,
    PreferenceRow,
    drop_reason,
    normalize,
    row_digest,
    strict_pairs,
    strip_invisible,
)
from dpokit.data.load import Record, RowError, scan_records
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
    images: dict[str, Any] | None = None
    """Rows with images (``dpokit.data.vision``): images in kept rows, per row, and their widths and heights."""

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
            **({"images": self.images} if self.images is not None else {}),
        }


def load_preferences(source: str, tokenizer: Any, data_cfg: DataConfig,
                     split: str = "train") -> tuple[list[TokenizedGroup], DataReport]:
    """Read, validate and tokenize a pairwise preference source into groups of two (chosen first).

    ``data_cfg`` is the run's ``data:`` section (``max_length``, ``max_prompt_length``, ``max_rows``,
    ``max_line_bytes``, ``on_error``, ``max_bad_fraction``, ``dedupe``, ``columns`` are read). Ranked rows are a
    :class:`DataError` here (they need the listwise loss).
    """
    items, report = _load(source, tokenizer, data_cfg, split, "pairs")
    return items, report


def load_ranked(source: str, tokenizer: Any, data_cfg: DataConfig,
                split: str = "train") -> tuple[list[TokenizedGroup], DataReport]:
    """Like :func:`load_preferences` for listwise rows (``responses`` + ``ranking``/``scores``), responses best
    first: a ranking without ties is one group of K, a ranking with ties one group of two per strict
    comparison, so one batch may mix K. Pairwise files are accepted too, as rankings of two (chosen first)."""
    items, report = _load(source, tokenizer, data_cfg, split, "ranked")
    return items, report


def load_unpaired(source: str, tokenizer: Any, data_cfg: DataConfig,
                  split: str = "train") -> tuple[list[TokenizedGroup], DataReport]:
    """Like :func:`load_preferences` for unpaired rows (``prompt``, ``completion``, ``label``): one group of one
    response per row, its ``label`` kept (KTO). Other formats are a :class:`DataError` here."""
    return _load(source, tokenizer, data_cfg, split, "unpaired")


def load_any(source: str, tokenizer: Any, data_cfg: DataConfig,
             split: str = "train") -> tuple[list[TokenizedGroup], DataReport]:
    """Pairs or rankings, whichever the source holds (``dpokit data check`` validates both)."""
    return _load(source, tokenizer, data_cfg, split, "any")


Want = Literal["pairs", "ranked", "unpaired", "any"]


def _load(source: str, tokenizer: Any, data_cfg: DataConfig, split: str, want: Want) -> tuple[Any, DataReport]:
    report = DataReport(source=source)
    return list(iter_tokenized(source, tokenizer, data_cfg, report, split, want)), report


def iter_tokenized(source: str, tokenizer: Any, data_cfg: DataConfig, report: DataReport, split: str = "train",
                   want: Want = "any") -> Iterator[TokenizedGroup]:
    """Stream the groups of the kept rows of ``source``, filling ``report`` as it goes. Holds at most ``_CHUNK``
    rows at a time. The report is complete, and the ``max_bad_fraction`` check done, once the iterator is
    exhausted. ``want="pairs"`` refuses a ranked source (the pairwise losses cannot take it); ``"ranked"`` and
    ``"any"`` accept every format. The tokenized-data cache's build (``dpokit.data.cache_build``) runs the same
    two halves: :func:`row_outcomes` in worker processes, :func:`account` in order in one."""
    records = scan_records(source, split, data_cfg.max_rows, data_cfg.max_line_bytes, data_cfg.streaming)
    for outcome, pieces in account(row_outcomes(records, tokenizer, data_cfg), report, data_cfg, want):
        encoded, row = outcome.encoded, outcome.row
        assert isinstance(encoded, Encoded) and row is not None
        for responses in pieces:
            yield TokenizedGroup(encoded.prompt_ids, [encoded.responses_ids[i] for i in responses], row.location,
                                 encoded.boundary_fallback, encoded.truncated, label=row.label)


@dataclass
class Outcome:
    """What happened to one row before anything that depends on the other rows (the first row's format,
    duplicates, the error mode): :func:`row_outcomes` computes it, :func:`account` settles it in file order."""

    error: RowError | None = None
    """The row is malformed (unreadable, wrong structure, or its chat template failed)."""
    row: PreferenceRow | None = None
    """The normalized row (None when malformed before normalizing)."""
    invisible: bool = False
    """Invisible characters were removed from it."""
    reason: str | None = None
    """A content drop reason found on the row alone (``drop_reason``, ``all_tied``)."""
    digest: int = 0
    """``row_digest``, for dropping duplicates."""
    encoded: Any = None
    """The tokenization: an :class:`Encoded` (or anything with its length fields), a drop reason, a
    :class:`RowError`; None when ``reason`` is set."""


def row_outcomes(records: Iterable[Record | RowError], tokenizer: Any, data_cfg: DataConfig) -> Iterator[Outcome]:
    """Everything about each row that needs no other row: read errors, normalizing, invisible characters,
    content drop reasons, the duplicate digest, and the tokenization (in chunks of ``_CHUNK`` rows, one batched
    tokenizer call each). A row that turns out to be a duplicate was tokenized in vain; that costs less than
    ordering the work. A chat template failure comes back as the row's ``RowError`` (in order) whatever
    ``data.on_error`` says: :func:`account` decides."""
    rules = token_rules(tokenizer)
    pending: list[Outcome] = []

    def flush() -> Iterator[Outcome]:
        todo = [o for o in pending if o.row is not None and o.reason is None]
        rows = [o.row for o in todo if o.row is not None]
        results = encode_rows([(r.prompt, r.responses) for r in rows], tokenizer, data_cfg.max_length,
                              data_cfg.max_prompt_length, [r.location for r in rows], rules, on_error="skip")
        for outcome, result in zip(todo, results):
            outcome.encoded = result
        yield from pending
        pending.clear()

    for record in records:
        outcome = Outcome()
        pending.append(outcome)
        if isinstance(record, RowError):
            outcome.error = record
        else:
            try:
                row = normalize(record, data_cfg.columns)
            except RowError as err:
                outcome.error = err
            else:
                outcome.row = row
                outcome.invisible = strip_invisible(row)
                reason = drop_reason(row.prompt, row.responses,
                                     allow_empty_prompt=row.format.startswith("implicit"))
                if reason is None and row.levels is not None and row.levels[-1] == 0:
                    reason = "all_tied"
                outcome.reason = reason
                outcome.digest = row_digest(row)
        if len(pending) >= _CHUNK:
            yield from flush()
    yield from flush()


def check_wanted(fmt: str, location: str, want: Want) -> None:
    """The first well-formed row decides the source's format; refuse a format the caller cannot train on."""
    if want == "pairs" and fmt.startswith("ranked"):
        raise DataError(f"{location}: ranked rows (responses + ranking/scores) need "
                        "loss.name=plackett_luce; pairwise losses take prompt/chosen/rejected rows")
    unpaired = fmt.startswith("unpaired")
    if want == "unpaired" and not unpaired:
        raise DataError(f"{location}: loss.name=kto takes unpaired rows (prompt, completion, "
                        f"label); this file holds {fmt} rows")
    if want in ("pairs", "ranked") and unpaired:
        raise DataError(f"{location}: unpaired rows (prompt, completion, label) need "
                        "loss.name=kto; the other losses take preference pairs or rankings")


def account(outcomes: Iterable[Outcome], report: DataReport, data_cfg: DataConfig,
            want: Want = "any") -> Iterator[tuple[Outcome, list[list[int]]]]:
    """Settle each row in file order, filling ``report``: a malformed row raises (``data.on_error: raise``) or is
    counted, the first well-formed row fixes the format (``check_wanted``), later rows of another format are
    malformed, then content drops, duplicates (``data.dedupe``), and what tokenization dropped. Yields each kept
    row with its groups as response indices: one group of every response, or a ranking with ties as its strict
    pairs. When the outcomes run out, checks the accounting and ``data.max_bad_fraction``."""
    skip = data_cfg.on_error == "skip"
    seen = DigestSet() if data_cfg.dedupe else None
    formats: Counter[str] = Counter()
    first: PreferenceRow | None = None
    # Unpaired rows wait until the end: a later row may label the same prompt and completion the other way,
    # and then neither is trained on (``conflicting_labels``). Cost: the held outcomes (in the cache's build
    # their lengths and offsets only) and a dict entry per distinct unpaired row.
    held: list[Outcome] = []
    labels: dict[int, int] = {}

    def malformed(err: RowError) -> None:
        if not skip:
            raise err
        report.drop(err.reason)
        if len(report.errors) < _MAX_ERRORS_KEPT:
            report.errors.append(str(err))

    for outcome in outcomes:
        report.rows_read += 1
        row = outcome.row
        if outcome.error is not None or row is None:
            assert outcome.error is not None
            malformed(outcome.error)
            continue
        if first is None:
            first = row
            check_wanted(row.format, row.location, want)
        formats[row.format] += 1
        if row.format != first.format:
            malformed(RowError(f"{row.location}: format '{row.format}' differs from '{first.format}' of the "
                               f"first row ({first.location}); a file must use one format", "mixed_formats"))
            continue
        report.invisible_stripped += outcome.invisible
        reason = outcome.reason
        if reason is None and seen is not None and not seen.add(_labelled(outcome.digest, row.label)):
            reason = "duplicate"
        if reason is not None:
            report.drop(reason)
        elif isinstance(outcome.encoded, RowError):
            malformed(outcome.encoded)
        elif isinstance(outcome.encoded, str):
            report.drop(outcome.encoded)
        elif row.label is not None:
            held.append(outcome)
            labels[outcome.digest] = labels.get(outcome.digest, 0) | (1 << row.label)
        else:
            yield outcome, _kept(row, outcome.encoded, report)
    for outcome in held:
        assert outcome.row is not None
        if labels[outcome.digest] == 3:  # labelled both ways: no signal, like chosen == rejected
            report.drop("conflicting_labels")
        else:
            yield outcome, _kept(outcome.row, outcome.encoded, report)

    report.formats = dict(formats)
    if report.rows_read != report.rows_kept + report.rows_dropped:  # the report's promise; a bug if broken
        raise AssertionError(f"row accounting broken: {report.to_dict()}")
    check_bad_fraction(report, data_cfg.max_bad_fraction)


def _labelled(digest: int, label: bool | None) -> int:
    """The duplicate key of a row: its digest (``row_digest``, which leaves an unpaired row's label out, so that
    the same text labelled both ways is found), with the label mixed in for unpaired rows (odd constants from
    the golden ratio: a row and its relabelled copy never share a key)."""
    if label is None:
        return digest
    return (digest ^ (0x9E3779B97F4A7C15 if label else 0x7F4A7C159E3779B9)) & 0xFFFFFFFFFFFFFFFF


def _kept(row: PreferenceRow, result: Any, report: DataReport) -> list[list[int]]:
    """Count one kept row; its groups as response indices: the row itself, or with ties its strict pairs
    (responses tokenized once). ``result`` has :class:`Encoded`'s fields, or its lengths only
    (``prompt_len``, ``response_lens``: the cache's light records)."""
    report.rows_kept += 1
    report.boundary_fallback += result.boundary_fallback
    report.truncated += result.truncated
    report.truncated_prompts += result.prompt_truncated
    report.prompt_lengths.add(result.prompt_len)
    for length in result.response_lens:
        report.response_lengths.add(length)
    if row.levels is None:
        pieces = [list(range(len(result.response_lens)))]
    else:
        pairs, tied = strict_pairs(row.levels)
        report.ties += tied
        pieces = [[i, j] for i, j in pairs]
    report.groups += len(pieces)
    if row.label is not None:
        report.desirable += row.label
        report.undesirable += not row.label
    return pieces


def check_bad_fraction(report: DataReport, max_bad_fraction: float) -> None:
    bad = report.rows_malformed
    if bad and bad > max_bad_fraction * report.rows_read:
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(report.dropped.items())
                           if reason in MALFORMED_REASONS)
        first = f"; first: {report.errors[0]}" if report.errors else ""
        raise DataError(f"{report.source}: {bad} of {report.rows_read} rows read are malformed "
                        f"({bad / report.rows_read:.1%}), more than data.max_bad_fraction={max_bad_fraction} "
                        f"({counts}){first}")
