"""The data of ``data_scale.py``: seeded synthetic conversational pairs written fast, the prefixes of them each
measurement reads, and the model and length limits they are tokenized with."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from common import OPENERS, WORDS
from data_check_memory import parse_size

MODEL = "smollm2"
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256
MB = 1e6

SMALL_PAIRS = 1000
"""The small training run the memory growth per pair is measured against."""

PROMPT_SENTENCES = (4, 14)
RESPONSE_SENTENCES = (7, 21)
ROW_TEMPLATE = ('{{"prompt": [{{"role": "user", "content": "{}"}}], '
                '"chosen": [{{"role": "assistant", "content": "{}"}}], '
                '"rejected": [{{"role": "assistant", "content": "{}"}}]}}\n')
_BLOCK = 10_000


def write_chat_pairs(path: Path, rows: int | None = None, size_bytes: int | None = None,
                     seed: int = 0) -> tuple[int, int]:
    """Write seeded conversational pairs until ``rows`` rows or ``size_bytes`` bytes; return (rows, bytes).

    Each message is sentences drawn from a pool of 4,096 (6-18 ordinary English words each): prompts 4-14
    sentences after ``Question N: <opener>:`` (N makes every row unique), responses 7-21: about 2.75 KB a row.
    The same seed gives the same rows, so a shorter file is a prefix of a longer one. The text needs no JSON
    escaping, so rows are formatted directly (json.dumps would triple the time of a 2.7 GB file)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    pool = [" ".join(words[rng.integers(0, len(words), int(rng.integers(6, 19)))]).capitalize() + "."
            for _ in range(4096)]
    lows = np.array([PROMPT_SENTENCES[0], RESPONSE_SENTENCES[0], RESPONSE_SENTENCES[0]])
    highs = np.array([PROMPT_SENTENCES[1], RESPONSE_SENTENCES[1], RESPONSE_SENTENCES[1]]) + 1
    n = written = 0
    with open(path, "w", encoding="ascii", buffering=1 << 22) as f:
        while (rows is None or n < rows) and (size_bytes is None or written < size_bytes):
            block = _BLOCK if rows is None else min(_BLOCK, rows - n)
            counts = rng.integers(lows, highs, size=(block, 3)).tolist()
            picks = rng.integers(0, len(pool), size=sum(map(sum, counts))).tolist()
            openers = rng.integers(0, len(OPENERS), size=block).tolist()
            lines, at = [], 0
            for r, (p, c, j) in enumerate(counts):
                prompt = f"Question {n + r}: {OPENERS[openers[r]]}: " + " ".join(map(pool.__getitem__,
                                                                                   picks[at:at + p]))
                chosen = " ".join(map(pool.__getitem__, picks[at + p:at + p + c]))
                rejected = " ".join(map(pool.__getitem__, picks[at + p + c:at + p + c + j]))
                at += p + c + j
                if rejected == chosen:
                    rejected += " Indeed."
                line = ROW_TEMPLATE.format(prompt, chosen, rejected)
                lines.append(line)
                written += len(line)
                if size_bytes is not None and written >= size_bytes:
                    break
            f.write("".join(lines))
            n += len(lines)
    return n, written


def copy_prefix(src: Path, dst: Path, rows: int | None = None, size_bytes: int | None = None) -> tuple[int, int]:
    """The first ``rows`` lines (or the first lines up to ``size_bytes``) of ``src`` into ``dst``."""
    n = written = 0
    with open(src, "rb") as fin, open(dst, "wb", buffering=1 << 22) as fout:
        for line in fin:
            fout.write(line)
            n += 1
            written += len(line)
            if (rows is not None and n >= rows) or (size_bytes is not None and written >= size_bytes):
                break
    return n, written


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))


def prepare_files(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The data files (reused when ``--workdir`` already holds ``pairs.jsonl`` of ``--pairs`` rows)."""
    pairs = workdir / "pairs.jsonl"
    check_size = parse_size(args.check_size, base=1000)  # MB here are 10^6 bytes
    files: dict[str, Any] = {"write_s": None}
    if pairs.exists() and count_lines(pairs) == args.pairs:
        files.update(pairs=args.pairs, pairs_bytes=pairs.stat().st_size)
        print(f"reusing {pairs}", flush=True)
    else:
        need = args.pairs * 2900 * 3 + check_size * 2 + 5e9  # the file, its caches, a check file and its cache, runs
        free = shutil.disk_usage(workdir).free
        if free < need:
            raise SystemExit(f"{workdir}: {free / 1e9:.0f} GB free, about {need / 1e9:.0f} GB needed")
        start = time.perf_counter()
        files["pairs"], files["pairs_bytes"] = write_chat_pairs(pairs, rows=args.pairs, seed=args.seed)
        files["write_s"] = time.perf_counter() - start
        print(f"{files['pairs']} pairs, {files['pairs_bytes'] / MB:.0f} MB -> {pairs} in {files['write_s']:.0f} s",
              flush=True)
    files["paths"] = {"pairs": str(pairs)}
    for name, rows in (("subset", args.subset), ("trl", args.trl_rows), ("small", SMALL_PAIRS), ("ten", 10)):
        path = workdir / f"{name}.jsonl"
        copy_prefix(pairs, path, rows=min(rows, args.pairs))
        files["paths"][name] = str(path)
    check = workdir / "check.jsonl"
    if "check" not in args.skip:
        if files["pairs_bytes"] >= check_size:
            copy_prefix(pairs, check, size_bytes=check_size)
        else:
            write_chat_pairs(check, size_bytes=check_size, seed=args.seed)
        files["check_bytes"] = check.stat().st_size
    files["paths"]["check"] = str(check)
    return files
