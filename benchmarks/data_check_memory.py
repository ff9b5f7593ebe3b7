"""Peak memory and speed of ``dpokit data check`` on a large JSONL file: it must stay flat as the file grows.

    python benchmarks/data_check_memory.py                 # a 2 GB file (the issue's bar: < 500 MB RSS)
    python benchmarks/data_check_memory.py --size 200M     # quicker
    python benchmarks/data_check_memory.py --size 50M --chat

Writes the file into a temporary folder (deleted afterwards), runs ``python -m dpokit data check FILE --model
tiny-random-llama`` in a subprocess, and prints rows/s, MB/s and the subprocess's peak RSS, next to the peak RSS
of the same command on a 10-row file (the fixed cost of Python, torch, transformers and the tokenizer).
The difference is what the data itself costs. tests/test_streaming.py runs a small version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORDS = ("the a model answer question preference policy reference reward gradient token sequence prompt data "
         "train learn value good bad better worse because therefore however while with without from into over "
         "under about quick brown fox jumps lazy dog river mountain city music science history language").split()


def _sentences(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))).capitalize() + "."
            for _ in range(n)]


def write_jsonl(path: Path, size_bytes: int, chat: bool = False, seed: int = 0) -> int:
    """Write unique preference rows (about 0.5-1 KB each) until the file holds ``size_bytes``; return the count.
    A few rows per thousand repeat an earlier one, so the dedupe path is exercised too."""
    rng = random.Random(seed)
    pool = _sentences(rng, 2000)
    written = rows = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            lines = []
            for _ in range(1000):
                i = rows + len(lines)
                prompt = f"Question {i}: " + " ".join(rng.sample(pool, 3))
                chosen = " " + " ".join(rng.sample(pool, rng.randint(2, 6)))
                rejected = " " + " ".join(rng.sample(pool, rng.randint(1, 4)))
                if chat:
                    row = {"prompt": [{"role": "user", "content": prompt}],
                           "chosen": [{"role": "assistant", "content": chosen.strip()}],
                           "rejected": [{"role": "assistant", "content": rejected.strip()}]}
                else:
                    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
                lines.append(json.dumps(row))
                if rng.random() < 0.002:  # an exact repeat, dropped as a duplicate
                    lines.append(lines[-1])
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block.encode("utf-8"))
            rows += len(lines)
    return rows


def run_check(path: Path, model: str = "tiny-random-llama", extra: list[str] | None = None) -> dict:
    """Run ``dpokit data check`` on ``path``; return wall seconds, peak RSS (MiB) of that process, exit code,
    and its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "dpokit", "data", "check", str(path), "--model", model,
                                 *(extra or [])], stdout=out, stderr=err, env=env)
        # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would be the largest of every child so far).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "returncode": proc.returncode,
            "stdout": stdout.decode(errors="replace"), "stderr": stderr.decode(errors="replace")}


def measure(size_bytes: int, chat: bool = False, model: str = "tiny-random-llama") -> dict:
    """Baseline (10 rows) and big-file runs; returns the figures printed by :func:`main`."""
    with tempfile.TemporaryDirectory(prefix="dpokit-bench-") as tmp:
        small = Path(tmp) / "small.jsonl"
        write_jsonl(small, 1, chat=chat)
        big = Path(tmp) / "big.jsonl"
        t0 = time.perf_counter()
        rows = write_jsonl(big, size_bytes, chat=chat)
        write_s = time.perf_counter() - t0
        file_bytes = big.stat().st_size
        # Both at once: each wait4 reports its own process's peak, and the fixed start-up cost is paid in parallel.
        with ThreadPoolExecutor(2) as pool:
            base_job = pool.submit(run_check, small, model)
            run = run_check(big, model)
            base = base_job.result()
    for name, result in (("baseline", base), ("check", run)):
        if result["returncode"] != 0:
            raise SystemExit(f"{name} run failed ({result['returncode']}): {result['stderr'].strip()}")
    return {"rows": rows, "file_mib": file_bytes / 2**20, "write_s": write_s, "check_s": run["seconds"],
            "rows_per_s": rows / run["seconds"], "mib_per_s": file_bytes / 2**20 / run["seconds"],
            "peak_rss_mib": run["peak_rss_mib"], "baseline_rss_mib": base["peak_rss_mib"],
            "growth_mib": run["peak_rss_mib"] - base["peak_rss_mib"], "stdout": run["stdout"]}


def parse_size(text: str, base: int = 1024) -> int:
    """``200M``, ``2G``, ``512K`` or a plain number of bytes; ``base`` 1024 (MiB, GiB) or 1000 (MB, GB)."""
    units = {"K": base, "M": base**2, "G": base**3}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="file size, e.g. 200M, 2G (default 2G)")
    parser.add_argument("--chat", action="store_true", help="conversational rows (chat template applied)")
    parser.add_argument("--model", default="tiny-random-llama")
    args = parser.parse_args()
    r = measure(parse_size(args.size), chat=args.chat, model=args.model)
    print(r["stdout"].rstrip())
    print(f"\nfile        {r['file_mib']:.0f} MiB, {r['rows']} rows (written in {r['write_s']:.0f} s)")
    print(f"check       {r['check_s']:.1f} s: {r['rows_per_s']:.0f} rows/s, {r['mib_per_s']:.1f} MiB/s")
    print(f"peak RSS    {r['peak_rss_mib']:.0f} MiB (10-row file: {r['baseline_rss_mib']:.0f} MiB; "
          f"growth {r['growth_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
