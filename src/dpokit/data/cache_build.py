"""The build of a cached source: read, validate and tokenize it, by every usable core, into its folder.

Parallel tokenization (``data.num_proc``, default: the usable cores): a plain JSONL file is cut into byte
ranges at line starts (``dpokit.data.load.jsonl_spans``); each worker process reads, normalizes and tokenizes
its range (``dpokit.data.pipeline.row_outcomes``) into a shard (``dpokit.data.cache_shards``), and the parent
settles the rows in file order (``dpokit.data.pipeline.account``: first format, duplicates, error mode), so the
result does not depend on the number of processes. Other sources (compressed, CSV, Parquet, JSON documents,
``data.max_rows``) are read by one. A build writes into a staging folder and renames it into place
(``dpokit.data.cache_dataset`` has the folder's layout); one that fails leaves nothing behind.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dpokit.data.cache_dataset import ARRAYS, GROUP_FLAGS, stored_report
from dpokit.data.cache_key import checksums
from dpokit.data.cache_shards import Columns, Light, Shard, interleave, row_number, shard_outcomes
from dpokit.data.config import DataConfig
from dpokit.data.load import jsonl_spans, location_prefix, scan_jsonl_span, scan_records
from dpokit.data.overlap import _digest
from dpokit.data.pipeline import DataReport, Outcome, account, row_outcomes
from dpokit.errors import DataError
from dpokit.io import publish_dir, staging_dir, write_json, writing

_PARALLEL_MIN_BYTES = 4 << 20
"""Below this size one process is faster than starting workers."""


class ProgressBar(Protocol):
    """What a build shows its rows on: ``done`` of ``total`` so far, ``advance`` by more, ``close`` at the end
    (``dpokit.training.metrics.Progress`` is one)."""

    total: int
    done: int

    def advance(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class NewProgressBar(Protocol):
    """Makes the bar of a build of about ``total`` rows: the caller's choice of display (the class
    ``dpokit.training.metrics.Progress`` itself is one); the data layer only counts."""

    def __call__(self, total: int, *, label: str) -> ProgressBar: ...


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build(source: str, tokenizer: Any, data_cfg: DataConfig, split: str, folder: Path, note: Callable[[str], None],
          key: dict[str, Any] | None = None, progress: NewProgressBar | None = None) -> dict[str, Any]:
    """Read, validate and tokenize ``source`` into ``folder`` (see the module docstring); returns its meta.
    ``progress``: makes the bar shown while a file of at least ``_PARALLEL_MIN_BYTES`` is tokenized; None shows
    none."""
    started = time.perf_counter()
    procs = data_cfg.num_proc or usable_cores()
    spans: list[tuple[int, int, int] | None] = [None]
    path = Path(source).expanduser()
    size = path.stat().st_size if path.is_file() else 0
    if procs > 1 and data_cfg.max_rows is None and size >= _PARALLEL_MIN_BYTES:
        spans = list(jsonl_spans(source, procs) or [None])
    plain = path.suffix.lower() not in (".gz", ".parquet", ".pq")  # its size says how many text lines it has
    bar = _progress(progress, path, size) if progress is not None and plain and size >= _PARALLEL_MIN_BYTES else None
    tmp = staging_dir(folder)
    with writing(folder, "tokenized data", cleanup=tmp):
        try:
            shards = _run_shards(source, tokenizer, data_cfg, split, spans, tmp, bar)
            meta = _merge(shards, tmp, data_cfg, split, source, key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(tmp, folder)
    seconds = time.perf_counter() - started
    rows = meta["report"]["rows_read"]
    note(f"{source}: tokenized {rows} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):.0f} rows/s, "
         f"{len(spans)} process{'es' if len(spans) > 1 else ''})")
    return meta


_WORK: dict[str, Any] = {}
"""What forked workers inherit (the tokenizer is not sent through a pipe)."""


def _progress(new_bar: NewProgressBar, path: Path, size: int) -> ProgressBar:
    """A progress bar over the estimated rows of ``path`` (its size over the mean length of its first lines)."""
    with path.open("rb") as f:
        head = f.read(1 << 20)
    rows = max(1, round(size * max(head.count(b"\n"), 1) / max(len(head), 1)))
    return new_bar(rows, label="tokenizing (rows, estimated)")


def _run_shards(source: str, tokenizer: Any, data_cfg: DataConfig, split: str, spans: list[Any], tmp: Path,
                bar: ProgressBar | None = None) -> list[Path]:
    dirs = [tmp / f"shard-{k}" for k in range(len(spans))]
    context = multiprocessing.get_context("fork")
    done = context.Value("q", 0)  # rows read by every worker so far, for the progress bar
    _WORK.update(source=source, tokenizer=tokenizer, data_cfg=data_cfg, split=split, spans=spans, dirs=dirs,
                 done=done, bar=bar)
    try:
        if len(spans) == 1:
            _shard(0)
            return dirs
        context = multiprocessing.get_context("fork")
        # Set before the fork, so the tokenizers library in the workers neither warns nor spawns threads (the
        # workers are the parallelism); restored for the parent at once.
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # Objects that exist now are never collected in the workers: a collection there would write to every
        # one of them and so copy the parent's pages one by one (gc.freeze's documented use before fork).
        gc.collect()
        gc.freeze()
        try:
            pool = context.Pool(len(spans), initializer=_worker_start, initargs=(os.getpid(),))
        finally:
            gc.unfreeze()
            if before is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
        with pool:
            pending = pool.map_async(_shard_safely, range(len(spans)))
            while not pending.ready():
                pending.wait(0.5)
                _show(bar, done.value)
            errors = pending.get()
        for error in errors:
            if error is not None:  # a problem with the whole source (its first line decides the others)
                raise DataError(error)
        return dirs
    finally:
        _WORK.clear()
        if bar is not None:
            _show(bar, bar.total)
            bar.close()


def _show(bar: ProgressBar | None, rows: int) -> None:
    if bar is not None and min(rows, bar.total) > bar.done:
        bar.advance(min(rows, bar.total) - bar.done)


def _worker_start(parent: int) -> None:
    """A worker ends when its parent does (killed, or stopped by a signal) instead of tokenizing its share for
    nobody: Linux sends it SIGTERM then (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _shard_safely(k: int) -> str | None:
    """A worker: its shard, or the one-line message of a source-wide error (no traceback crosses the pipe)."""
    try:
        _shard(k)
    except DataError as exc:
        return str(exc)
    return None


def _shard(k: int) -> None:
    work = _WORK
    data_cfg, span = work["data_cfg"], work["spans"][k]
    if span is None:
        records = scan_records(work["source"], work["split"], data_cfg.max_rows, data_cfg.max_line_bytes,
                               data_cfg.streaming)
    else:
        records = scan_jsonl_span(work["source"], *span, data_cfg.max_line_bytes)
    shard = Shard(work["dirs"][k])
    done = work["done"]
    for outcome in row_outcomes(records, work["tokenizer"], data_cfg):
        shard.add(outcome)
        if shard.rows.count % 1024 == 0:
            with done.get_lock():
                done.value += 1024
            if len(work["spans"]) == 1:  # in this process: the bar is here
                _show(work["bar"], done.value)
    shard.close()


def _merge(shards: list[Path], tmp: Path, data_cfg: DataConfig, split: str, source: str,
           key: dict[str, Any] | None) -> dict[str, Any]:
    """Settle every shard's rows in file order (``account``: the first format, duplicates across shards, the
    error mode) and write the final arrays into ``tmp``, streaming."""
    report = DataReport(source=source)
    prefix = location_prefix(source, split)
    with (tmp / "tokens.bin").open("wb") as tokens:
        for shard in shards:
            with (shard / "tokens.bin").open("rb") as f:
                shutil.copyfileobj(f, tokens, 1 << 22)
    spans = Columns(tmp, "spans", ("offset", "length"))
    groups = Columns(tmp, "groups", ("prompt", "first", "n", "flags", "row"))
    refs = Columns(tmp, "refs", ("span",))
    first: list[Any] = []
    # data.max_bad_fraction is checked when the folder is opened (a later run may allow more): not here.
    settle = data_cfg.model_copy(update={"max_bad_fraction": 1.0})
    with (tmp / "keys.bin").open("wb") as keys, (tmp / "tokens.bin").open("rb") as ids:
        for outcome, pieces in account(_first_noted(shard_outcomes(shards, prefix), first), report, settle):
            light, row = outcome.encoded, outcome.row
            assert isinstance(light, Light) and row is not None
            prompt = spans.add(offset=light.prompt_offset, length=light.prompt_len)
            response_spans = [spans.add(offset=offset, length=length)
                              for offset, length in zip(light.response_offsets, light.response_lens)]
            number, by_row = row_number(row.location)
            flags = (light.boundary_fallback * GROUP_FLAGS["boundary_fallback"]
                     + light.truncated * GROUP_FLAGS["truncated"] + by_row * GROUP_FLAGS["row_index"])
            if row.label is not None:
                flags += GROUP_FLAGS["labelled"] + row.label * GROUP_FLAGS["label"]
            for piece in pieces:
                groups.add(prompt=prompt, first=refs.count, n=len(piece), flags=flags, row=number)
                for r in piece:
                    refs.add(span=response_spans[r])
                if piece == list(range(len(response_spans))):
                    keys.write(light.keys)
                else:  # a strict pair of a ranking with ties: its own digest, from the ids written above
                    parts = [_pread_ids(ids, light.prompt_offset, light.prompt_len)]
                    parts += [_pread_ids(ids, light.response_offsets[r], light.response_lens[r]) for r in piece]
                    keys.write(_digest(parts) + _digest(parts[:1]))
    if not report.rows_read:  # byte ranges of blank lines only (one reader says this itself)
        raise DataError(f"{source}: no rows found")
    for columns in (spans, groups, refs):
        columns.close()
    for shard in shards:
        shutil.rmtree(shard)
    for name, columns in (("spans", ("offset", "length")), ("groups", ("prompt", "first", "n", "flags", "row")),
                          ("refs", ("span",))):
        interleave(tmp, name, columns)
    sizes = {name: (tmp / f"{name}.bin").stat().st_size for name in ARRAYS}
    shapes = {name: [sizes[name] // (np.dtype(dtype).itemsize * width)] + ([width] if width > 1 else [])
              for name, (dtype, width) in ARRAYS.items()}
    meta = {"key": key, "sizes": sizes, "shapes": shapes, "checksums": checksums(tmp, sizes),
            "first_format": first[0] if first else None, "first_location": first[1] if first else None,
            "prefix": prefix, "report": stored_report(report)}
    write_json(tmp / "meta.json", meta)
    return meta


def _first_noted(outcomes: Iterator[Outcome], first: list[Any]) -> Iterator[Outcome]:
    """Pass ``outcomes`` through, noting the first well-formed row's format and location into ``first``."""
    for outcome in outcomes:
        if not first and outcome.error is None and outcome.row is not None:
            first.extend([outcome.row.format, outcome.row.location])
        yield outcome


def _pread_ids(f: Any, offset: int, length: int) -> list[int]:
    f.seek(4 * offset)
    return np.frombuffer(f.read(4 * length), dtype="<i4").tolist()
