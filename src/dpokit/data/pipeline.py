"""Preference data end to end: load -> normalize formats -> validate -> tokenize, with a report that accounts
for every row read (``rows_read == rows_kept + sum(dropped.values())``).

The training loop calls :func:`load_preferences` (pairs); the Plackett-Luce loss calls :func:`load_ranked`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from dpokit.data.formats import PreferenceRow, RankedRow, drop_reason, normalize, to_ranked
from dpokit.data.load import DEFAULT_MAX_LINE_BYTES, iter_records
from dpokit.data.tokenize import TokenizedPair, TokenizedRanked, encode_rows, token_rules
from dpokit.errors import DataError

_CHUNK = 256
"""Rows tokenized per batched tokenizer call: large enough to amortize the call, small enough that the raw
text held at once stays small."""


@dataclass
class DataReport:
    """What happened to every row of one source. ``rows_read == rows_kept + sum(dropped.values())`` always."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows not trained on, by reason (see ``dpokit.data.formats.DROP_REASONS``)."""
    boundary_fallback: int = 0
    """Kept rows where a response was tokenized alone because a BPE merge crossed the prompt/response join."""
    truncated: int = 0
    """Kept rows cut to fit max_prompt_length / max_length."""
    formats: dict[str, int] = field(default_factory=dict)
    """Rows read per format (one key: a file may not mix formats)."""
    prompt_lengths: list[int] = field(default_factory=list)
    """Prompt tokens of each kept row (after truncation)."""
    response_lengths: list[int] = field(default_factory=list)
    """Tokens of each response of each kept row (after truncation)."""

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary; token lengths as ``{count, min, mean, p50, p95, max}``."""
        return {
            "source": self.source, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped, "dropped": dict(sorted(self.dropped.items())),
            "boundary_fallback": self.boundary_fallback, "truncated": self.truncated,
            "formats": dict(self.formats),
            "prompt_tokens": length_stats(self.prompt_lengths),
            "response_tokens": length_stats(self.response_lengths),
        }


def length_stats(lengths: list[int]) -> dict[str, float]:
    """count, min, mean, p50, p95, max; percentiles by the nearest-rank method (always an observed length)."""
    if not lengths:
        return {"count": 0, "min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    n = len(ordered)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(q * n) - 1)]

    return {"count": n, "min": ordered[0], "mean": round(sum(ordered) / n, 2), "p50": rank(0.50),
            "p95": rank(0.95), "max": ordered[-1]}


def load_preferences(source: str, tokenizer: Any, data_cfg: Any,
                     split: str = "train") -> tuple[list[TokenizedPair], DataReport]:
    """Read, validate and tokenize a pairwise preference source.

    ``data_cfg`` is a :class:`dpokit.config.DataConfig` (``max_length``, ``max_prompt_length``, ``max_rows``,
    ``max_line_bytes`` are read). Ranked rows are a :class:`DataError` here (they need the listwise loss).
    """
    items, report = _load(source, tokenizer, data_cfg, split, "pairs")
    return items, report  # type: ignore[return-value]


def load_ranked(source: str, tokenizer: Any, data_cfg: Any,
                split: str = "train") -> tuple[list[TokenizedRanked], DataReport]:
    """Like :func:`load_preferences` for listwise rows (``responses`` + ``ranking``/``scores``), responses best
    first. Pairwise files are accepted too, as rankings of two (chosen first)."""
    items, report = _load(source, tokenizer, data_cfg, split, "ranked")
    return items, report  # type: ignore[return-value]


def load_any(source: str, tokenizer: Any, data_cfg: Any,
             split: str = "train") -> tuple[list[TokenizedPair] | list[TokenizedRanked], DataReport]:
    """Pairs or rankings, whichever the source holds (``dpokit data check`` validates both)."""
    return _load(source, tokenizer, data_cfg, split, "any")


Row = PreferenceRow | RankedRow


def _load(source: str, tokenizer: Any, data_cfg: Any, split: str,
          want: Literal["pairs", "ranked", "any"]) -> tuple[Any, DataReport]:
    max_length = data_cfg.max_length
    max_prompt_length = data_cfg.max_prompt_length
    report = DataReport(source=source)
    formats: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    rules = token_rules(tokenizer)
    kept: list[Any] = []
    pending: list[Row] = []

    def flush() -> None:
        results = encode_rows([(r.prompt, _responses(r)) for r in pending], tokenizer, max_length,
                              max_prompt_length, [r.location for r in pending], rules)
        for row, result in zip(pending, results):
            if isinstance(result, str):
                dropped[result] += 1
                continue
            if isinstance(row, RankedRow):
                kept.append(TokenizedRanked(result.prompt_ids, result.responses_ids, row.location,
                                            result.boundary_fallback, result.truncated))
            else:
                chosen_ids, rejected_ids = result.responses_ids
                kept.append(TokenizedPair(result.prompt_ids, chosen_ids, rejected_ids, row.location,
                                          result.boundary_fallback, result.truncated))
            report.boundary_fallback += result.boundary_fallback
            report.truncated += result.truncated
            report.prompt_lengths.append(len(result.prompt_ids))
            report.response_lengths.extend(len(ids) for ids in result.responses_ids)
        pending.clear()

    for row in _rows(source, data_cfg, split, want):
        report.rows_read += 1
        formats[row.format] += 1
        reason = drop_reason(row.prompt, _responses(row), allow_empty_prompt=row.format.startswith("implicit"))
        if reason is not None:
            dropped[reason] += 1
            continue
        pending.append(row)
        if len(pending) >= _CHUNK:
            flush()
    flush()

    report.rows_kept = len(kept)
    report.formats = dict(formats)
    report.dropped = dict(dropped)
    if report.rows_read != report.rows_kept + report.rows_dropped:  # the report's promise; a bug if broken
        raise AssertionError(f"row accounting broken: {report.to_dict()}")
    return kept, report


def _rows(source: str, data_cfg: Any, split: str, want: str) -> Iterator[Row]:
    """Normalized rows, all of one format; pairs become rankings of two when rankings are wanted."""
    first: Row | None = None
    records = iter_records(source, split, getattr(data_cfg, "max_rows", None),
                           getattr(data_cfg, "max_line_bytes", DEFAULT_MAX_LINE_BYTES))
    for record in records:
        row = normalize(record)
        if first is None:
            first = row
            if want == "pairs" and isinstance(row, RankedRow):
                raise DataError(f"{row.location}: ranked rows (responses + ranking/scores) need "
                                "loss.name=plackett_luce; pairwise losses take prompt/chosen/rejected rows")
        elif row.format != first.format:
            raise DataError(f"{row.location}: format '{row.format}' differs from '{first.format}' of the first "
                            f"row ({first.location}); a file must use one format")
        if want == "ranked" or (want == "any" and isinstance(first, RankedRow)):
            if isinstance(row, PreferenceRow):
                row = to_ranked(row)
        yield row


def _responses(row: Row) -> list[Any]:
    return list(row.responses) if isinstance(row, RankedRow) else [row.chosen, row.rejected]
