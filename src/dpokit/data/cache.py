"""The tokenized-data cache: each source is read, validated and tokenized once, then memory-mapped.

A source's kept groups live in a folder of flat little-endian arrays (``numpy.memmap``) plus ``meta.json``:

- ``tokens.bin`` int32: every token id, each prompt and response once;
- ``spans.bin`` int64 (S, 2): ``(offset, length)`` of a prompt or a response in ``tokens``;
- ``groups.bin`` int64 (G, 5): ``(prompt span, first ref, n refs, flags, row number)`` per group;
- ``refs.bin`` int64 (R,): the span of each group's responses, best first (a ranking with ties refers to its
  responses again for each strict pair);
- ``keys.bin`` uint8 (G, 32): each group's overlap digests (``dpokit.data.overlap``: pair, then prompt);
- ``meta.json``: the key's inputs, the array sizes, the first row's format, and the :class:`DataReport` (rows
  read = kept + dropped by reason, length histograms), so a hit reports exactly what the build did.

Why flat arrays and not Arrow (``datasets``): a group is a few index lookups and slices, no per-row Python
objects or column decoding, no dependency beyond numpy, and the files are identical whatever the number of
processes that built them. A training process touches only the pages of the groups it reads, so its memory does
not grow with the size of the data (about 80 bytes of index per pair on disk, none in Python).

The key is content-addressed (like the reference store): the data file's sha256 (remembered per file size,
mtime and inode, so an unchanged file is not read again; for rows given in memory, the sha256 of their JSON
lines, ``dpokit.data.memory``), the tokenizer (its full serialized state, chat
template and special-token rules), the settings that change what is kept (``max_length``,
``max_prompt_length``, ``max_rows``, ``max_line_bytes``, ``on_error``, ``dedupe``, ``columns``), the split of a JSON
document, and dpokit's
tokenization code (a digest of the ``dpokit.data`` sources, so a changed rule re-tokenizes without a
hand-kept version number). ``data.max_bad_fraction`` and the format a command needs are checked again on every
hit, from the stored report.

A build writes into a staging folder and renames it into place; ``meta.json`` holds every file's size and an
xxh3-128 digest of every byte of every array, checked on every hit: a partial or corrupt folder is said once and
rebuilt. xxh3 (``xxhash``, which ``datasets`` requires) reads a warm 2.25 GB token file (1M pairs) in 0.16 s on
one core, where sha256 would take seconds, so no block is left unchecked to save time.

Parallel tokenization (``data.num_proc``, default: the usable cores): a plain JSONL file is cut into byte
ranges at line starts (``dpokit.data.load.jsonl_spans``); each worker process reads, normalizes and tokenizes
its range (``dpokit.data.pipeline.row_outcomes``) into a shard, and the parent settles the rows in file order
(``dpokit.data.pipeline.account``: first format, duplicates, error mode), so the result does not depend on the
number of processes. Other sources (compressed, CSV, Parquet, JSON documents, ``data.max_rows``) are read by one.
Hub datasets have no cheap content digest offline: they are tokenized into a private folder on every run.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import mmap
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, overload

import numpy as np
import xxhash

from dpokit.data import memory
from dpokit.data.formats import PreferenceRow
from dpokit.data.load import (
    DEFAULT_MAX_LINE_BYTES,
    RowError,
    jsonl_spans,
    location_prefix,
    row_location,
    scan_jsonl_span,
    scan_records,
)
from dpokit.data.overlap import _digest
from dpokit.data.pipeline import (
    DataReport,
    LengthSummary,
    Outcome,
    Want,
    _check_bad_fraction,
    account,
    check_wanted,
    row_outcomes,
)
from dpokit.data.tokenize import TokenizedGroup, token_rules
from dpokit.errors import DataError, WriteError
from dpokit.io import publish_dir, read_json, sha256_file, staging_dir, write_json, writing

LAYOUT = 1
"""The folder layout above; part of the key."""
KEY_SETTINGS = ("max_length", "max_prompt_length", "max_rows", "max_line_bytes", "on_error", "dedupe", "columns")
"""The ``data.*`` settings that change which groups a source gives (the key holds them)."""
_PARALLEL_MIN_BYTES = 4 << 20
"""Below this size one process is faster than starting workers."""
_MAX_MESSAGES = 5
"""Messages kept per shard of the first malformed rows: ``account`` keeps the first 5 of the whole source
(and raises the first), which are among the first 5 of some shard."""
_HASH_CHUNK = 1 << 24
"""Bytes handed to the hash at a time (from a memory map: no copy)."""
GROUP_FLAGS = {"boundary_fallback": 1, "truncated": 2, "labelled": 4, "label": 8, "row_index": 16}
"""Bits of a group's flags; ``row_index``: its location is ``row N`` (JSON, Parquet, hub) rather than a line."""
_ARRAYS = {"tokens": ("<i4", 1), "spans": ("<i8", 2), "groups": ("<i8", 5), "refs": ("<i8", 1),
           "keys": ("u1", 32)}


def cache_root(data_cfg: Any) -> Path:
    from dpokit.models.loading import cache_dir

    return Path(getattr(data_cfg, "cache_dir", None) or cache_dir() / "data").expanduser()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------------- keys

def code_digest() -> str:
    """A digest of dpokit's data-pipeline sources: any change to how rows are read, normalized or tokenized
    gives new keys."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """A digest of everything about ``tokenizer`` that tokenization reads."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    rules = token_rules(tokenizer)
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), repr(rules),
             bool(getattr(tokenizer, "split_special_tokens", False))]
    return hashlib.sha256((state + json.dumps(extra, default=str)).encode("utf-8", "surrogatepass")).hexdigest()


def file_digest(path: Path, root: Path) -> str:
    """sha256 of a file's content, remembered under ``root/files`` per (path, size, mtime, inode): a file
    read before and not changed since is not read again. A file modified less than 2 s before it was hashed is
    always hashed again: a change within the same timestamp tick would keep its size and mtime (git's "racily
    clean" rule)."""
    stat = path.stat()
    signature = [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo = root / "files" / (hashlib.sha256(json.dumps(signature).encode()).hexdigest()[:32] + ".json")
    known = read_json(memo, default=None)
    if (isinstance(known, dict) and known.get("signature") == signature
            and stat.st_mtime_ns < known.get("hashed_at", 0) - 2_000_000_000):
        return str(known["sha256"])
    hashed_at = time.time_ns()
    digest = sha256_file(path)
    try:
        write_json(memo, {"signature": signature, "sha256": digest, "hashed_at": hashed_at})
    except (OSError, WriteError):
        pass  # a read-only cache still works, it only hashes again
    return digest


def cache_key(source: str, tokenizer: Any, data_cfg: Any, split: str, root: Path) -> dict[str, Any] | None:
    """The inputs that decide a source's groups, or None when the source has no content digest (a hub id)."""
    path = Path(source).expanduser()
    if memory.is_memory(source):  # rows given in memory: the hash of their JSON lines (refused when not given)
        data, document = memory.given_digest(source), False
    elif path.is_file():
        # A split selects part of a JSON document ({"train": [...], "test": [...]}); any other file is one table.
        suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
        data, document = file_digest(path, root), suffixes[-1:] == [".json"]
    else:
        return None
    return {"layout": LAYOUT, "data": data, "tokenizer": tokenizer_digest(tokenizer),
            "code": code_digest(), "split": split if document else None,
            "settings": {name: getattr(data_cfg, name, None) for name in KEY_SETTINGS}}


# ---------------------------------------------------------------------------------------------------- dataset

class TokenizedDataset(Sequence[TokenizedGroup]):
    """The groups of one cached source, read-only, as :class:`TokenizedGroup` s built on access from
    memory-mapped arrays: ``len``, ``dataset[i]``, slices. ``pair_keys`` / ``prompt_keys`` are the overlap
    digests (16 bytes a group) without reading any token."""

    def __init__(self, folder: Path, meta: dict[str, Any], prefix: str):
        self.folder, self.meta, self.prefix = folder, meta, prefix
        arrays = {name: _open_array(folder, name, meta["shapes"][name]) for name in _ARRAYS}
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
    dtype, _ = _ARRAYS[name]
    if not shape[0]:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=tuple(shape))


# ------------------------------------------------------------------------------------------------------- load

def load_cached(source: str, tokenizer: Any, data_cfg: Any, split: str = "train", want: Want = "pairs",
                note: Callable[[str], None] | None = None, progress: bool = False) -> tuple[TokenizedDataset, DataReport]:
    """The groups of ``source`` and its report, tokenized once (``prepare_cached``) and memory-mapped
    (``open_cached``). Raises like :func:`dpokit.data.load_preferences` (``want`` as there)."""
    folder = prepare_cached(source, tokenizer, data_cfg, split, note, progress)
    return open_cached(folder, source, data_cfg, split, want)


def prepare_cached(source: str, tokenizer: Any, data_cfg: Any, split: str = "train",
                   note: Callable[[str], None] | None = None, progress: bool = False) -> Path:
    """The folder holding ``source``'s groups: the cache's when the key matches and the folder is intact,
    else built now (``data.cache: false`` or a hub id: into a private folder removed at exit). Under torchrun
    rank 0 calls this and every rank opens the folder. A build that fails leaves nothing behind."""
    note = note or (lambda message: None)
    root = cache_root(data_cfg)
    key = cache_key(source, tokenizer, data_cfg, split, root) if getattr(data_cfg, "cache", True) else None
    if key is None:
        return _build_private(source, tokenizer, data_cfg, split, note, progress)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    folder = root / name[:2] / name
    try:
        with _building(root / "locks" / f"{name}.lock", source, note):
            meta = _verified(folder, key, note)
            if meta is not None:
                note(f"{source}: tokenized data from the cache ({meta['report']['rows_kept']} rows kept)")
                return folder
            refused = read_json(folder.with_name(name + ".refused.json"), default=None)
            if isinstance(refused, dict):  # the same inputs were refused a moment ago, e.g. by another rank
                raise DataError(_relocated(refused["error"], refused["prefix"], location_prefix(source, split)))
            for stale in folder.parent.glob(f".tmp-{folder.name}-*"):  # a build killed part way (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                build(source, tokenizer, data_cfg, split, folder, note, key, progress)
            except DataError as exc:
                write_json(folder.with_name(name + ".refused.json"),
                           {"error": str(exc), "prefix": location_prefix(source, split)})
                raise
    except (OSError, WriteError) as exc:
        note(f"data cache {root} not writable ({str(exc).splitlines()[0]}); tokenizing into a temporary folder")
        return _build_private(source, tokenizer, data_cfg, split, note, progress)
    return folder


@contextlib.contextmanager
def _building(lock: Path, source: str, note: Callable[[str], None]) -> Iterator[None]:
    """Hold ``lock`` (an exclusive ``flock``) while checking and building one key's folder: of the processes
    that want it at once (torchrun ranks, parallel runs), one tokenizes and the others wait here, then find it
    built. A lock dies with its process, so a crashed build never blocks the next; no collective is waiting, so
    a long build cannot time out the process group."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note(f"{source}: another process is tokenizing it; waiting")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_private(source: str, tokenizer: Any, data_cfg: Any, split: str, note: Callable[[str], None],
                   progress: bool) -> Path:
    """Tokenize into a folder of this process's own, removed at exit."""
    private = Path(tempfile.mkdtemp(prefix="dpokit-data-"))
    _remove_at_exit(private)
    build(source, tokenizer, data_cfg, split, private / "groups", note, progress=progress)
    return private / "groups"


def open_cached(folder: Path, source: str, data_cfg: Any, split: str = "train",
                want: Want = "pairs") -> tuple[TokenizedDataset, DataReport]:
    """The groups in ``folder`` (``prepare_cached``) and their report, after the checks that depend on the
    caller rather than the data: the format ``want`` takes, and ``data.max_bad_fraction``."""
    meta = read_json(folder / "meta.json")
    prefix = location_prefix(source, split)
    report = report_from_dict(meta["report"], source)
    # The same content may be cached from another path: locations name this one.
    report.errors = [_relocated(message, meta["prefix"], prefix) for message in report.errors]
    if meta["first_format"] is not None:
        check_wanted(meta["first_format"], _relocated(meta["first_location"], meta["prefix"], prefix), want)
    _check_bad_fraction(report, getattr(data_cfg, "max_bad_fraction", 0.05))
    return TokenizedDataset(folder, meta, prefix), report


def _relocated(message: str, old: str, new: str) -> str:
    """A stored message about ``old:LINE`` as one about ``new:LINE`` (the same content at another path)."""
    return new + message[len(old):] if message.startswith((old + ":", old + "[")) else message


def _remove_at_exit(folder: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, folder, True)


def _verified(folder: Path, key: dict[str, Any], note: Callable[[str], None]) -> dict[str, Any] | None:
    """The folder's meta when it is complete and intact for ``key``; None (said once) when it must be built."""
    meta = read_json(folder / "meta.json", default=None) if folder.is_dir() else None
    if meta is None:
        if folder.exists():
            note(f"data cache {folder}: incomplete; tokenizing again")
        return None
    problem = _problem(folder, meta, key)
    if problem:
        note(f"data cache {folder}: {problem}; tokenizing again")
        return None
    return meta


def _problem(folder: Path, meta: dict[str, Any], key: dict[str, Any]) -> str | None:
    if meta.get("key") != key:
        return "written for other inputs"
    for name in _ARRAYS:
        path = folder / f"{name}.bin"
        expected = meta["sizes"][name]
        if (path.stat().st_size if path.exists() else -1) != expected:
            return f"{name}.bin has the wrong size"
    if _checksums(folder, meta["sizes"]) != meta["checksums"]:
        return "content does not match its checksum"
    return None


def _checksums(folder: Path, sizes: dict[str, int]) -> dict[str, str]:
    """xxh3-128 of every byte of every array. Each is read through a memory map, so a hit costs one pass over
    the pages (already in memory right after a build or a previous run) and no copy."""
    out = {}
    for name in _ARRAYS:
        digest = xxhash.xxh3_128()
        if sizes[name]:
            with (folder / f"{name}.bin").open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    for start in range(0, len(view), _HASH_CHUNK):
                        digest.update(view[start:start + _HASH_CHUNK])
                finally:
                    view.release()
        out[name] = "xxh3_128:" + digest.hexdigest()
    return out


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


# ------------------------------------------------------------------------------------------------------ build

def build(source: str, tokenizer: Any, data_cfg: Any, split: str, folder: Path, note: Callable[[str], None],
          key: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Read, validate and tokenize ``source`` into ``folder`` (see the module docstring); returns its meta.
    ``progress``: a progress bar (or a line every ~10%) for a file of at least ``_PARALLEL_MIN_BYTES``."""
    started = time.perf_counter()
    procs = getattr(data_cfg, "num_proc", None) or usable_cores()
    spans: list[tuple[int, int, int] | None] = [None]
    path = Path(source).expanduser()
    size = path.stat().st_size if path.is_file() else 0
    if procs > 1 and getattr(data_cfg, "max_rows", None) is None and size >= _PARALLEL_MIN_BYTES:
        spans = list(jsonl_spans(source, procs) or [None])
    plain = path.suffix.lower() not in (".gz", ".parquet", ".pq")  # its size says how many text lines it has
    bar = _progress(path, size) if progress and plain and size >= _PARALLEL_MIN_BYTES else None
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


def _progress(path: Path, size: int) -> Any:
    """A progress bar over the estimated rows of ``path`` (its size over the mean length of its first lines)."""
    from dpokit.training.metrics import Progress

    with path.open("rb") as f:
        head = f.read(1 << 20)
    rows = max(1, round(size * max(head.count(b"\n"), 1) / max(len(head), 1)))
    return Progress(rows, label="tokenizing (rows, estimated)")


def _run_shards(source: str, tokenizer: Any, data_cfg: Any, split: str, spans: list[Any], tmp: Path,
                bar: Any = None) -> list[Path]:
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


def _show(bar: Any, rows: int) -> None:
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


class _Columns:
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


class _Forward:
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
            more = self.file.read(_CHUNK_ROWS * (self.width or 8))
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


class _Shard:
    """One worker's output: per row, per tokenized row (candidate) and per response, and the token ids."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True)
        self.folder = folder
        self.tokens = (folder / "tokens.bin").open("wb")
        self.n_tokens = 0
        self.rows = _Columns(folder, "rows", ROW_COLUMNS)
        self.candidates = _Columns(folder, "candidates", CANDIDATE_COLUMNS)
        self.responses = _Columns(folder, "responses", RESPONSE_COLUMNS)
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
            values["number"], by_row = _row_number(row.location)
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


def _row_number(location: str) -> tuple[int, int]:
    """``path:LINE`` -> (LINE, 0); ``path:row N`` and ``train_data[N]`` (``row_location``) -> (N, 1)."""
    if location.endswith("]"):
        return int(location[location.rindex("[") + 1:-1]), 1
    where = location.rsplit(":", 1)[1]
    return (int(where[4:]), 1) if where.startswith("row ") else (int(where), 0)


def _shard(k: int) -> None:
    work = _WORK
    data_cfg, span = work["data_cfg"], work["spans"][k]
    max_line = getattr(data_cfg, "max_line_bytes", DEFAULT_MAX_LINE_BYTES)
    if span is None:
        records = scan_records(work["source"], work["split"], getattr(data_cfg, "max_rows", None), max_line,
                               getattr(data_cfg, "streaming", False))
    else:
        records = scan_jsonl_span(work["source"], *span, max_line)
    shard = _Shard(work["dirs"][k])
    done = work["done"]
    for outcome in row_outcomes(records, work["tokenizer"], data_cfg):
        shard.add(outcome)
        if shard.rows.count % 1024 == 0:
            with done.get_lock():
                done.value += 1024
            if len(work["spans"]) == 1:  # in this process: the bar is here
                _show(work["bar"], done.value)
    shard.close()


@dataclass
class _Light:
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


_CHUNK_ROWS = 1 << 16


def _shard_outcomes(shards: list[Path], prefix: str) -> Iterator[Outcome]:
    """Every shard's rows, in order, as ``Outcome`` s again (tokenizations as ``_Light``), read front to back."""
    base = 0
    for folder in shards:
        info = read_json(folder / "shard.json")
        names, messages = info["names"], {int(i): m for i, m in info["messages"].items()}
        rows = [_Forward(folder / f"rows.{name}.bin") for name in ROW_COLUMNS]
        cand = {name: _Forward(folder / f"candidates.{name}.bin") for name in CANDIDATE_COLUMNS}
        resp = {name: _Forward(folder / f"responses.{name}.bin") for name in RESPONSE_COLUMNS}
        keys = _Forward(folder / "keys.bin", width=32)
        n_rows = (folder / "rows.kind.bin").stat().st_size // 8
        for start in range(0, n_rows, _CHUNK_ROWS):
            n = min(_CHUNK_ROWS, n_rows - start)
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
                    outcome.encoded = _Light(prompt_len, resp["length"].get(first, count), bool(flags & 1),
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


def _merge(shards: list[Path], tmp: Path, data_cfg: Any, split: str, source: str,
           key: dict[str, Any] | None) -> dict[str, Any]:
    """Settle every shard's rows in file order (``account``: the first format, duplicates across shards, the
    error mode) and write the final arrays into ``tmp``, streaming."""
    report = DataReport(source=source)
    prefix = location_prefix(source, split)
    with (tmp / "tokens.bin").open("wb") as tokens:
        for shard in shards:
            with (shard / "tokens.bin").open("rb") as f:
                shutil.copyfileobj(f, tokens, 1 << 22)
    spans = _Columns(tmp, "spans", ("offset", "length"))
    groups = _Columns(tmp, "groups", ("prompt", "first", "n", "flags", "row"))
    refs = _Columns(tmp, "refs", ("span",))
    first: list[Any] = []
    # data.max_bad_fraction is checked when the folder is opened (a later run may allow more): not here.
    settle = SimpleNamespace(on_error=getattr(data_cfg, "on_error", "raise"), dedupe=getattr(data_cfg, "dedupe", True),
                             max_bad_fraction=1.0)
    with (tmp / "keys.bin").open("wb") as keys, (tmp / "tokens.bin").open("rb") as ids:
        for outcome, pieces in account(_first_noted(_shard_outcomes(shards, prefix), first), report, settle):
            light, row = outcome.encoded, outcome.row
            assert isinstance(light, _Light) and row is not None
            prompt = spans.add(offset=light.prompt_offset, length=light.prompt_len)
            response_spans = [spans.add(offset=offset, length=length)
                              for offset, length in zip(light.response_offsets, light.response_lens)]
            number, by_row = _row_number(row.location)
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
        _interleave(tmp, name, columns)
    sizes = {name: (tmp / f"{name}.bin").stat().st_size for name in _ARRAYS}
    shapes = {name: [sizes[name] // (np.dtype(dtype).itemsize * width)] + ([width] if width > 1 else [])
              for name, (dtype, width) in _ARRAYS.items()}
    meta = {"key": key, "sizes": sizes, "shapes": shapes, "checksums": _checksums(tmp, sizes),
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


def _interleave(folder: Path, name: str, columns: tuple[str, ...]) -> None:
    """``NAME.COL.bin`` column files -> one row-major ``NAME.bin`` (in blocks), the column files removed."""
    readers = [_Forward(folder / f"{name}.{c}.bin") for c in columns]
    n = (folder / f"{name}.{columns[0]}.bin").stat().st_size // 8
    with (folder / f"{name}.bin").open("wb") as out:
        for start in range(0, n, _CHUNK_ROWS):
            count = min(_CHUNK_ROWS, n - start)
            block = np.array([reader.get(start, count) for reader in readers], dtype="<i8").T
            out.write(np.ascontiguousarray(block).tobytes())
    for reader, c in zip(readers, columns):
        reader.close()
        (folder / f"{name}.{c}.bin").unlink()
