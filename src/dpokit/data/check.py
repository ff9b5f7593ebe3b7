"""What ``dpokit data check`` prints about a source: its :class:`DataReport` (:func:`print_report`) and the
first groups decoded from the token ids training uses (:func:`print_rows`).

The command itself (``dpokit.cli.run_check``) loads the tokenizer and reads the source through the data cache
(``dpokit.data.cache.load_cached``): rows are tokenized in chunks (by every core, for a JSONL file) and written
to the cache as they come, so a file of any size is checked in constant memory
(``benchmarks/data_check_memory.py`` measures it), and training on it later starts from the cache. Nothing is
printed before the whole source has been read, so a check that fails half way prints its one error line and
no partial report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from dpokit.data.config import DataConfig
from dpokit.data.formats import DROP_REASONS, MALFORMED_REASONS
from dpokit.data.pipeline import DataReport
from dpokit.data.tokenize import TokenizedGroup


def print_rows(groups: Sequence[TokenizedGroup], tokenizer: Any, n: int, console: Console) -> None:
    """The first ``n`` groups as training sees them: each part decoded from its token ids with special tokens
    kept, as a Python string literal (newlines, trailing spaces and end tokens visible), so a prompt cut from
    the answers, a missing system prompt or a doubled end token shows at a glance."""
    if not groups:
        return
    console.print(f"[bold]first {min(n, len(groups))} of {len(groups)} groups, decoded from the trained token ids"
                  "[/bold]")
    for group in groups[:n]:
        console.print(group.location, style="bold", markup=False, highlight=False, soft_wrap=True)
        if group.label is not None:
            names = ["desirable" if group.label else "undesirable"]
        elif len(group.responses_ids) == 2:
            names = ["chosen", "rejected"]
        else:
            names = [f"response {k}" for k in range(len(group.responses_ids))]
        for name, ids in [("prompt", group.prompt_ids), *zip(names, group.responses_ids)]:
            text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            console.print(f"  {name:<11} {len(ids):>5} tok  {text!r}", markup=False, highlight=False, soft_wrap=True)


def print_report(report: DataReport, model: str, data_cfg: DataConfig, console: Console) -> None:
    """Counts (rows read = kept + dropped by reason), formats, token-length stats, tokenization audit, and for
    rankings the tied comparisons left untrained."""
    summary = report.to_dict()
    console.print(f"[bold]{report.source}[/bold]")
    console.print(f"tokenizer {model}, max_length {data_cfg.max_length}, "
                  f"max_prompt_length {data_cfg.max_prompt_length}", style="dim")

    counts = Table(show_header=False, box=None, pad_edge=False)
    counts.add_column(style="bold")
    counts.add_column(justify="right")
    counts.add_column(style="dim")
    counts.add_row("rows read", str(report.rows_read), "")
    counts.add_row("rows kept", str(report.rows_kept), "")
    counts.add_row("rows dropped", str(report.rows_dropped), "")
    for reason, n in sorted(report.dropped.items(), key=lambda item: (item[0] in MALFORMED_REASONS, item[0])):
        kind = "malformed: " if reason in MALFORMED_REASONS else ""
        counts.add_row(f"  {reason}", str(n), kind + DROP_REASONS.get(reason, ""))
    formats = ", ".join(f"{name} ({n})" for name, n in report.formats.items())
    counts.add_row("formats", "", formats)
    console.print(counts)
    if report.errors:
        console.print(f"first malformed rows ({len(report.errors)} of {report.rows_malformed}):")
        for message in report.errors:
            console.print(f"  {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)

    lengths = Table(title="token lengths (kept rows, after truncation)", title_justify="left")
    lengths.add_column("")
    for column in ("count", "min", "mean", "p50", "p95", "max"):
        lengths.add_column(column, justify="right")
    for name, key in (("prompt", "prompt_tokens"), ("response", "response_tokens")):
        stats = summary[key]
        lengths.add_row(name, *(str(stats[c]) for c in ("count", "min", "mean", "p50", "p95", "max")))
    console.print(lengths)

    console.print("[bold]tokenization audit[/bold]")
    # Why the fallback matters: without it the prompt tokens would differ between training and generation.
    console.print(f"  boundary fallback: {report.boundary_fallback} rows (response tokenized alone)")
    console.print(f"  truncated: {report.truncated} rows (cut to max_prompt_length / max_length), "
                  f"{report.truncated_prompts} in the prompt")
    console.print(f"  invisible characters removed: {report.invisible_stripped} rows (U+200B, U+2060, U+FEFF)")
    if report.images is not None:
        per_row, width, height = (report.images[k] for k in ("per_row", "width", "height"))
        console.print(f"  images: {report.images['total']} in kept rows, {per_row['min']}-{per_row['max']} per row "
                      f"(mean {per_row['mean']}); width {width['min']}-{width['max']} px, height "
                      f"{height['min']}-{height['max']} px")
    if any(name.startswith("ranked") for name in report.formats):
        # Ties never become preferences: a tied ranking trains only the pairs between its levels.
        console.print(f"  ties: {report.ties} tied comparisons not trained; {report.groups} groups from "
                      f"{report.rows_kept} rows (a ranking with ties gives one pair per strict comparison)")
    if any(name.startswith("unpaired") for name in report.formats):
        conflicting = report.dropped.get("conflicting_labels", 0)
        console.print(f"  labels: {report.desirable} desirable, {report.undesirable} undesirable (KTO); "
                      f"{conflicting} rows dropped for a prompt and completion labelled both ways")
    if report.rows_kept:
        console.print(f"[green]OK[/green]: {report.rows_kept} usable rows")
    else:
        console.print("[red]no usable rows[/red]")
