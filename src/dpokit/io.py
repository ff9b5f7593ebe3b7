"""Files written whole or not at all, JSON lines, content hashes: the one home of dpokit's file I/O.

A reader (another process, a resumed run, a crash-interrupted one) must never see half a file: every file is
written under a temporary name beside its target and renamed over it, which POSIX makes atomic. Folders are
built the same way (``staging_dir`` then ``publish_dir``). A write that fails (disk full, the file-size limit,
a permission) removes what it had staged and ends with one line naming the path and the cause (``writing``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from dpokit.errors import WriteError


def _tmp_beside(path: Path) -> Path:
    # Hidden and per process: two writers never share a temporary name, and readers listing the folder skip it.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _cause(exc: Exception) -> str | None:
    """Why a write failed, in words ("No space left on device", "File too large", "Permission denied"); None
    when ``exc`` is no I/O failure. safetensors reports the OS error inside its own exception's text."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    found = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", str(exc))
    return found.group(1) if found else None


@contextlib.contextmanager
def writing(path: str | Path, what: str = "", cleanup: Path | None = None) -> Iterator[None]:
    """Turn a write failing inside the block into ``WriteError``: one line naming ``path`` (and ``what`` it
    is) and the cause, never a traceback. ``cleanup`` (the temporary file or staging folder) is removed first,
    so nothing partial stays behind; the target itself is only ever replaced by a rename, so an older
    complete version of it is untouched."""
    try:
        yield
    except (OSError, SafetensorError, WriteError) as exc:
        cause = exc if isinstance(exc, WriteError) else _cause(exc)
        if cause is None:
            raise
        if cleanup is not None and cleanup.is_dir():
            shutil.rmtree(cleanup, ignore_errors=True)
        elif cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup.unlink(missing_ok=True)
        if isinstance(exc, WriteError):
            raise  # an inner write already named its file
        raise WriteError(f"cannot write {what + ' ' if what else ''}{path}: {cause}") from exc


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` into ``path`` atomically (parents created)."""
    path = Path(path)
    tmp = _tmp_beside(path)
    with writing(path, cleanup=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 ``text`` into ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any, indent: int | None = 1) -> Path:
    """``value`` as JSON into ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(rows: Iterable[dict[str, Any]], out: str | Path) -> None:
    """JSON lines into a file atomically, or to stdout when ``out`` is ``-``."""
    if str(out) == "-":
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    path = Path(out)
    tmp = _tmp_beside(path)
    with writing(path, cleanup=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a JSON-lines file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file's value, or ``default`` when the file is missing or not valid JSON (a cache that can be
    rebuilt, never user input: that is reported where it is read)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries to disk (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(target: str | Path, tag: str = "") -> Path:
    """The hidden folder beside ``target`` that ``staging_dir`` builds it in (per process)."""
    target = Path(target)
    return target.with_name(f".tmp-{tag or target.name}-{os.getpid()}")


def staging_dir(target: str | Path, tag: str = "") -> Path:
    """An empty hidden folder beside ``target`` to build it in; a leftover from a crashed run is replaced."""
    tmp = staging_path(target, tag)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, target: str | Path) -> Path:
    """Rename a finished staging folder onto ``target`` (an older ``target`` is removed first)."""
    target = Path(target)
    fsync_dir(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    fsync_dir(target.parent)
    return target
