"""The data cache's key, and the check that a cached folder is intact for it.

The key is content-addressed (like the reference store): the data file's sha256 (remembered per file size,
mtime and inode, so an unchanged file is not read again; for rows given in memory, the sha256 of their JSON
lines, ``dpokit.data.memory``), the tokenizer (its full serialized state, chat template and special-token
rules), the settings that change what is kept (``KEY_SETTINGS``), the split of a JSON document, and dpokit's
tokenization code (a digest of the ``dpokit.data`` sources, so a changed rule re-tokenizes without a hand-kept
version number). ``data.max_bad_fraction`` and the format a command needs are checked again on every hit, from
the stored report (``dpokit.data.cache.open_cached``).

``meta.json`` holds every file's size and an xxh3-128 digest of every byte of every array, checked on every hit
(:func:`verified`): a partial or corrupt folder is said once and rebuilt. xxh3 (``xxhash``, which ``datasets``
requires) reads a warm 2.25 GB token file (1M pairs) in 0.16 s on one core, where sha256 would take seconds, so
no block is left unchecked to save time.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from dpokit.data import memory
from dpokit.data.cache_dataset import ARRAYS
from dpokit.data.config import DataConfig
from dpokit.data.tokenize import token_rules
from dpokit.errors import WriteError
from dpokit.io import read_json, sha256_file, write_json

LAYOUT = 1
"""The folder layout (``dpokit.data.cache_dataset``); part of the key."""
KEY_SETTINGS = ("max_length", "max_prompt_length", "max_rows", "max_line_bytes", "on_error", "dedupe", "columns")
"""The ``data.*`` settings that change which groups a source gives (the key holds them)."""
_HASH_CHUNK = 1 << 24
"""Bytes handed to the hash at a time (from a memory map: no copy)."""


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


def cache_key(source: str, tokenizer: Any, data_cfg: DataConfig, split: str, root: Path) -> dict[str, Any] | None:
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
            "settings": {name: getattr(data_cfg, name) for name in KEY_SETTINGS}}


def verified(folder: Path, key: dict[str, Any], note: Callable[[str], None]) -> dict[str, Any] | None:
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
    for name in ARRAYS:
        path = folder / f"{name}.bin"
        expected = meta["sizes"][name]
        if (path.stat().st_size if path.exists() else -1) != expected:
            return f"{name}.bin has the wrong size"
    if checksums(folder, meta["sizes"]) != meta["checksums"]:
        return "content does not match its checksum"
    return None


def checksums(folder: Path, sizes: dict[str, int]) -> dict[str, str]:
    """xxh3-128 of every byte of every array. Each is read through a memory map, so a hit costs one pass over
    the pages (already in memory right after a build or a previous run) and no copy."""
    out = {}
    for name in ARRAYS:
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
