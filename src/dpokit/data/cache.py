"""The tokenized-data cache: each source is read, validated and tokenized once, then memory-mapped.

Training (``dpokit.training.setup.load_items``) and ``dpokit data check`` call :func:`load_cached`: the folder
of a source whose key matches and whose content is intact is opened at once, any other is built first. The
cache is four modules beside this one, in the order a source goes through them:

- ``cache_key``: the key (the data's content, the tokenizer, the settings that change the groups, the code)
  and the check that a folder is intact for it;
- ``cache_build``: the build, by every usable core, into a staging folder renamed into place;
- ``cache_shards``: the files each build worker writes, read back in order by the parent;
- ``cache_dataset``: the folder's layout and :class:`TokenizedDataset`, the groups read from its memory maps.

The caller says where the cache is (``cache_home``, dpokit's cache folder: the data cache is ``data.cache_dir``,
else ``cache_home/data``) and how progress is shown (``progress``); this layer imports nothing of the model or
training code. Hub datasets have no cheap content digest offline: they are tokenized into a private folder on
every run, as is any source with ``data.cache: false`` or without a cache folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, overload

from dpokit.data.cache_build import NewProgressBar, build
from dpokit.data.cache_dataset import TokenizedDataset, report_from_dict
from dpokit.data.cache_key import cache_key, verified
from dpokit.data.config import DataConfig
from dpokit.data.load import location_prefix
from dpokit.data.pipeline import DataReport, Want, check_bad_fraction, check_wanted
from dpokit.errors import DataError, WriteError
from dpokit.io import read_json, write_json


@overload
def cache_root(data_cfg: DataConfig | None, cache_home: Path) -> Path: ...


@overload
def cache_root(data_cfg: DataConfig | None, cache_home: None = None) -> Path | None: ...


def cache_root(data_cfg: DataConfig | None, cache_home: Path | None = None) -> Path | None:
    """The data cache's folder: ``data.cache_dir``, else ``cache_home/data`` (``cache_home``: dpokit's cache
    folder, ``$DPOKIT_CACHE``, which the caller knows); None when neither is given."""
    if data_cfg is not None and data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return cache_home / "data" if cache_home is not None else None


def load_cached(source: str, tokenizer: Any, data_cfg: DataConfig, split: str = "train", want: Want = "pairs",
                note: Callable[[str], None] | None = None, progress: NewProgressBar | None = None, *,
                cache_home: Path | None = None) -> tuple[TokenizedDataset, DataReport]:
    """The groups of ``source`` and its report, tokenized once (``prepare_cached``) and memory-mapped
    (``open_cached``). Raises like :func:`dpokit.data.load_preferences` (``want`` as there)."""
    folder = prepare_cached(source, tokenizer, data_cfg, split, note, progress, cache_home=cache_home)
    return open_cached(folder, source, data_cfg, split, want)


def prepare_cached(source: str, tokenizer: Any, data_cfg: DataConfig, split: str = "train",
                   note: Callable[[str], None] | None = None, progress: NewProgressBar | None = None, *,
                   cache_home: Path | None = None) -> Path:
    """The folder holding ``source``'s groups: the cache's (:func:`cache_root`) when the key matches and the
    folder is intact, else built now (``data.cache: false``, no cache folder or a hub id: into a private folder
    removed at exit). Under torchrun rank 0 calls this and every rank opens the folder. ``note`` says what
    happens (a hit, a rebuild, a wait); ``progress`` makes the bar of a long build. A build that fails leaves
    nothing behind."""
    note = note or (lambda message: None)
    root = cache_root(data_cfg, cache_home)
    key = cache_key(source, tokenizer, data_cfg, split, root) if data_cfg.cache and root is not None else None
    if key is None or root is None:
        return _build_private(source, tokenizer, data_cfg, split, note, progress)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    folder = root / name[:2] / name
    try:
        with _building(root / "locks" / f"{name}.lock", source, note):
            meta = verified(folder, key, note)
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


def _build_private(source: str, tokenizer: Any, data_cfg: DataConfig, split: str, note: Callable[[str], None],
                   progress: NewProgressBar | None) -> Path:
    """Tokenize into a folder of this process's own, removed at exit."""
    private = Path(tempfile.mkdtemp(prefix="dpokit-data-"))
    _remove_at_exit(private)
    build(source, tokenizer, data_cfg, split, private / "groups", note, progress=progress)
    return private / "groups"


def open_cached(folder: Path, source: str, data_cfg: DataConfig, split: str = "train",
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
    check_bad_fraction(report, data_cfg.max_bad_fraction)
    return TokenizedDataset(folder, meta, prefix), report


def _relocated(message: str, old: str, new: str) -> str:
    """A stored message about ``old:LINE`` as one about ``new:LINE`` (the same content at another path)."""
    return new + message[len(old):] if message.startswith((old + ":", old + "[")) else message


def _remove_at_exit(folder: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, folder, True)
