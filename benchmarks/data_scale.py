"""Data at scale (issue 19): first tokenization, a warm second run, training memory per pair and ``data check``
memory on a large file, against today's sequential path and TRL's dataset preparation, in one invocation.

    .venv/bin/python benchmarks/data_scale.py                       # 1M pairs (2.7 GB): ~25 min on 2 cores
    .venv/bin/python benchmarks/data_scale.py --pairs 20000 --subset 2000 --check-size 20M --results /tmp/r.md

One invocation:

1. writes ``--pairs`` seeded synthetic conversational pairs (a user prompt, an assistant chosen and an assistant
   rejected message; ordinary English words; every row unique; about 2.75 KB a JSONL row, as the issue's) into
   ``pairs.jsonl``, and its first rows as ``subset.jsonl`` (``--subset``), ``trl.jsonl`` (``--trl-rows``),
   ``small.jsonl`` (1,000 pairs) and ``check.jsonl`` (``--check-size`` bytes);
2. measures, each configuration in its own child process one after the other (peak RSS of that process via
   ``wait4``; the sum over its process tree, worker processes included, sampled twice a second; the load
   average before it; what other processes took of the machine meanwhile, and a run they took more than 10% of
   is measured again, ``--retries``):

   ``today``        today's path: ``sum(1 for _ in iter_tokenized(...))`` on the subset (sequential, no cache)
   ``today-before`` the same on dpokit's ``src`` as of ``--before`` (default: the commit before the cache),
                    unpacked with ``git archive`` and put first on PYTHONPATH
   ``new-1/new-2``  ``load_cached`` on the subset with ``data.num_proc`` 1 and 2, cold cache
   ``trl-1/trl-2``  TRL's ``DPOTrainer._prepare_dataset`` (prompt extraction, tokenization, the max_length
                    filter), timed around TRL's own method during ``DPOTrainer(...)``, ``dataset_num_proc`` 1 and
                    2, a fresh datasets cache; the JSON -> Arrow ``load_dataset`` before it is reported apart
   ``new-full``     ``load_cached`` on the whole file, ``num_proc`` 2, cold cache (then once more, warm)
   ``train-*``      ``dpokit train`` (the CLI, ``max_steps=1``, the embedded SmolLM2-135M-Instruct, reference
                    ``model``, batch 1, no shuffling: see :func:`train_config`) twice on 1,000 pairs and twice on
                    the whole file, the cache warm for the second of each: seconds from process start until the
                    first training step starts (the first call of ``train_step``), and peak RSS
   ``check``        ``dpokit data check check.jsonl --num-proc 2 --cache-dir DIR``, DIR empty (a cold cache),
                    and the same on a 10-row file

3. prints every figure and the issue's targets, met or not, and writes the section "Data at scale (issue 19)" of
   ``--results`` (default benchmarks/RESULTS.md; the section is replaced, the rest of the file kept).

Rows/s are rows read over the seconds of the measured call alone (the tokenizer and model loads before it are not
counted) for today, new and TRL; for ``check`` over the whole command. MB are 10^6 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OPENERS, ROOT, WORDS, loadavg, machine_info, proc_status_mb  # noqa: E402
from data_check_memory import parse_size  # noqa: E402

TODAY_ROWS_PER_S = 490.0
"""The issue's figure for today's ``dpokit data check`` (20,000 pairs, 2 cores), quoted beside the re-measured one."""

SMALL_PAIRS = 1000
"""The small training run the memory growth per pair is measured against."""

DIGEST_ROWS = 2000
"""Rows whose token ids today's path and the cache must agree on (a sanity check, not timed)."""

MODEL = "smollm2"
MAX_LENGTH, MAX_PROMPT_LENGTH = 512, 256
MB = 1e6

PARTS = ("today", "new", "trl", "full", "train", "check")


# --------------------------------------------------------------------------------------------------- the data

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


# ------------------------------------------------------------------------------------------------ child processes

def _tokenizer() -> Any:
    from dpokit.models.loading import load_tokenizer, resolve

    return load_tokenizer(resolve(MODEL))


def group_digest(groups: Any, limit: int) -> tuple[str, int]:
    """A digest of the token ids of the first ``limit`` groups (prompt, then each response), and how many."""
    h = hashlib.blake2b(digest_size=16)
    n = 0
    for group in groups:
        if n >= limit:
            break
        for ids in (group.prompt_ids, *group.responses_ids):
            h.update(json.dumps([int(t) for t in ids]).encode())
            h.update(b"|")
        n += 1
    return h.hexdigest(), n


def child_today(spec: dict[str, Any]) -> dict[str, Any]:
    """Today's sequential path, counted as ``dpokit data check`` consumes it; then (untimed) the digest of the
    first ``DIGEST_ROWS`` rows' groups."""
    from dpokit.config import DataConfig
    from dpokit.data.pipeline import DataReport, iter_tokenized

    tokenizer = _tokenizer()
    cfg = DataConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    report = DataReport(source=spec["data"])
    start = time.perf_counter()
    groups = sum(1 for _ in iter_tokenized(spec["data"], tokenizer, cfg, report, "train", "pairs"))
    seconds = time.perf_counter() - start
    head = DataConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, max_rows=DIGEST_ROWS)
    digest, digested = group_digest(iter_tokenized(spec["data"], tokenizer, head, DataReport(source=spec["data"]),
                                                   "train", "pairs"), DIGEST_ROWS)
    import dpokit

    return {"seconds": seconds, "rows": report.rows_read, "kept": report.rows_kept, "groups": groups,
            "digest": digest, "digested": digested, "report": report.to_dict(), "dpokit": dpokit.__file__}


def child_new(spec: dict[str, Any]) -> dict[str, Any]:
    """``load_cached`` into a cold cache folder (timed), once more now that it is warm (timed), then the digest
    of the first groups (untimed). No walk over every group: it would map the whole token file into this
    process's RSS (file-backed pages, but they would hide the build's own peak)."""
    from dpokit.config import DataConfig
    from dpokit.data.cache import load_cached

    tokenizer = _tokenizer()
    cfg = DataConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, cache=True,
                     cache_dir=spec["cache_dir"], num_proc=spec["num_proc"])
    start = time.perf_counter()
    dataset, report = load_cached(spec["data"], tokenizer, cfg, split="train", want="pairs")
    seconds = time.perf_counter() - start
    hwm_cold = proc_status_mb("VmHWM")
    start = time.perf_counter()
    warm, warm_report = load_cached(spec["data"], tokenizer, cfg, split="train", want="pairs")
    warm_s = time.perf_counter() - start
    digest, digested = group_digest(iter(dataset), DIGEST_ROWS)
    tokens = report.prompt_lengths.total + report.response_lengths.total  # a pair's prompt counted once
    cache_bytes = sum(p.stat().st_size for p in Path(spec["cache_dir"]).rglob("*") if p.is_file())
    return {"seconds": seconds, "warm_s": warm_s, "rows": report.rows_read, "kept": report.rows_kept,
            "groups": len(dataset), "warm_groups": len(warm), "warm_rows": warm_report.rows_read,
            "tokens": tokens, "digest": digest, "digested": digested, "cache_bytes": cache_bytes,
            "hwm_after_cold_mb": hwm_cold * 2**20 / MB, "type": type(dataset).__name__,
            "report": report.to_dict()}


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL 1.x ``DPOTrainer`` construction on the file, with a timer around its own ``_prepare_dataset``
    (nothing else changes); ``load_dataset`` (JSON -> Arrow) timed apart."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpokit.models.loading import resolve

    folder = resolve(MODEL).location
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    start = time.perf_counter()
    dataset = load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["hf_cache"])
    load_s = time.perf_counter() - start
    marks: dict[str, float] = {}
    prepare = DPOTrainer._prepare_dataset

    def timed_prepare(self: Any, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = prepare(self, dataset, *args, **kwargs)
        marks["seconds"] = marks.get("seconds", 0.0) + time.perf_counter() - start
        return out

    DPOTrainer._prepare_dataset = timed_prepare
    args = DPOConfig(output_dir=spec["run_dir"], per_device_train_batch_size=8, max_steps=1, max_length=MAX_LENGTH,
                     report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                     dataset_num_proc=spec["num_proc"] if spec["num_proc"] > 1 else None)
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    construct_s = time.perf_counter() - start
    first = trainer.train_dataset[0]
    return {"seconds": marks["seconds"], "load_dataset_s": load_s, "construct_s": construct_s,
            "rows": len(dataset), "kept": len(trainer.train_dataset),
            "first_lengths": [len(first["prompt_ids"]), len(first["chosen_ids"]), len(first["rejected_ids"])]}


def process_start_time() -> float:
    """This process's start (wall clock, 10 ms resolution): /proc/self/stat's start time after boot."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    """``dpokit train CONFIG key=value ...`` through the CLI's own ``main``, with timers wrapped around dpokit's
    functions from outside (no change to dpokit): ``load_items`` (the data), ``train_step`` (its first call is
    when training starts) and ``save_checkpoint`` (first called right after the last step: the peak RSS of
    training, before the final checkpoint and export)."""
    import importlib

    started = process_start_time()
    train_module = importlib.import_module("dpokit.training.setup")
    loop_module = importlib.import_module("dpokit.training.loop")
    marks: dict[str, Any] = {}
    step, save = loop_module.train_step, train_module.save_checkpoint

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        if "first_step_start" not in marks:
            marks["first_step_start"] = time.time()
            marks["rss_before_step_mb"] = proc_status_mb("VmRSS") * 2**20 / MB
        out = step(*args, **kwargs)
        marks.setdefault("first_step_s", time.time() - marks["first_step_start"])
        return out

    def first_save(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault("train_end_hwm_mb", proc_status_mb("VmHWM") * 2**20 / MB)
        return save(*args, **kwargs)

    loop_module.train_step, train_module.save_checkpoint = timed_step, first_save
    if hasattr(train_module, "load_items"):
        load_items = train_module.load_items

        def timed_load(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            out = load_items(*args, **kwargs)
            marks["load_items_s"] = time.time() - start
            marks["load_items_start_s"] = start - started
            return out

        train_module.load_items = timed_load
    from dpokit.cli import main

    rc = main(["train", spec["config"], *spec["overrides"]])
    if rc or "first_step_start" not in marks:
        raise RuntimeError(f"dpokit train exited {rc} before a training step")
    marks["to_first_step_s"] = marks["first_step_start"] - started
    return marks


CHILDREN = {"today": child_today, "new": child_new, "trl": child_trl, "train": child_train}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = CHILDREN[spec["kind"]](spec)
    except Exception as exc:  # reported by the parent with the log's path
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------------ parent

def _tree_memory(pid: int) -> tuple[float, float]:
    """Summed RSS and PSS (MB) of ``pid`` and its descendants now; PSS shares each page among the processes
    mapping it, so forked workers' shared pages count once."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0, 0.0
    rss = pss = 0.0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
            for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (psutil.Error, OSError):
            pass
    return rss / MB, pss / MB


class TreeSampler(threading.Thread):
    """The largest summed RSS / PSS of a process tree, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.rss = self.pss = 0.0
        self.processes = 1
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            rss, pss = _tree_memory(self.pid)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _cpu_ticks() -> tuple[int, int]:
    """(all ticks, busy ticks) of the machine since boot; niced work counts as busy (with the kernel's
    autogroup scheduling, a niced process of another session still takes its fair share of the cores)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy + idle + iowait, busy


def wait_until_quiet(max_wait: float, log: Any = print, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait`` s) until other processes use under ``threshold`` of the machine; returns the last
    fraction measured."""
    deadline = time.perf_counter() + max_wait
    while True:
        total0, busy0 = _cpu_ticks()
        time.sleep(3)
        total1, busy1 = _cpu_ticks()
        busy = (busy1 - busy0) / max(total1 - total0, 1)
        if busy <= threshold or time.perf_counter() > deadline:
            return busy
        log(f"machine {busy:.0%} busy with other processes; waiting ...")
        time.sleep(10)


def run_measured(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv`` to completion; its wall time, exit code, CPU seconds, peak RSS of the process (``wait4``:
    the largest of it and its reaped descendants) and of its whole tree (sampled)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONUNBUFFERED="1", **(env or {}))
    load = loadavg()
    ticks0 = _cpu_ticks()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        sampler.stop()
    ticks1 = _cpu_ticks()
    cpu = usage.ru_utime + usage.ru_stime
    share = cpu / wall / (os.cpu_count() or 1)
    machine = (ticks1[1] - ticks0[1]) / max(ticks1[0] - ticks0[0], 1)
    # What the rest of the machine did meanwhile (this script's own sampling included, ~1%).
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "cpu_s": cpu, "cpu_share": share,
            "others": max(0.0, machine - share), "peak_rss_mb": usage.ru_maxrss * 1024 / MB,
            "tree_rss_mb": sampler.rss, "tree_pss_mb": sampler.pss, "load": load}


OTHERS_MAX = 0.10
"""A run during which other processes took more of the machine than this is measured again (``--retries``)."""


class Bench:
    """The parent: the measured runs one after the other, each retried when other processes took the machine,
    and the figures collected by name."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.results: dict[str, dict[str, Any]] = {}

    def measure(self, name: str, once: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``once()`` (which prepares its own cold start) up to ``1 + --retries`` times, until other processes
        took at most ``OTHERS_MAX`` of the machine during it; the attempt they disturbed least is kept."""
        attempts: list[dict[str, Any]] = []
        for attempt in range(1 + self.args.retries):
            if self.args.quiet_wait:
                wait_until_quiet(self.args.quiet_wait, log=lambda m: print(f"[{name}] {m}", flush=True))
            print(f"[{name}] running (load {loadavg()}) ...", flush=True)
            result = once()
            attempts.append(result)
            if "error" in result or result["others"] <= OTHERS_MAX or attempt == self.args.retries:
                break
            print(f"[{name}] other processes took {result['others']:.0%} of the machine meanwhile; measuring again",
                  flush=True)
        valid = [r for r in attempts if "error" not in r] or attempts
        best = min(valid, key=lambda r: r.get("others", 1.0))
        best["attempts"] = [round(r.get("others", float("nan")), 3) for r in attempts]
        self.results[name] = best
        return best

    def child(self, name: str, kind: str, env: dict[str, str] | None = None,
              setup: Callable[[], None] | None = None, **spec: Any) -> dict[str, Any]:
        """A measured child process of this script running ``CHILDREN[kind](spec)``."""
        spec.update(kind=kind, result=str(self.workdir / f"{name}.json"))
        spec_path = self.workdir / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))

        def once() -> dict[str, Any]:
            if setup:
                setup()
            result_path = Path(spec["result"])
            result_path.unlink(missing_ok=True)
            proc = run_measured([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                self.workdir / f"{name}.log", env)
            result = json.loads(result_path.read_text()) if result_path.exists() else {}
            if proc["rc"] != 0 and "error" not in result:
                result["error"] = f"exit code {proc['rc']}"
            result.update(proc)
            if "error" in result:
                print(f"[{name}] FAILED: {result['error']} (see {self.workdir / (name + '.log')})", flush=True)
            elif "rows" in result and "seconds" in result:
                result["rows_per_s"] = result["rows"] / result["seconds"]
                print(f"[{name}] {result['rows']} rows in {result['seconds']:.1f} s: {result['rows_per_s']:.0f} "
                      f"rows/s; peak RSS {proc['peak_rss_mb']:.0f} MB (tree {proc['tree_rss_mb']:.0f}, PSS "
                      f"{proc['tree_pss_mb']:.0f}); CPU {proc['cpu_share']:.0%} of the cores, others "
                      f"{proc['others']:.0%}", flush=True)
            return result

        return self.measure(name, once)


def train_config(path: Path, data: Path, run_dir: Path) -> None:
    """A 1-step DPO run on ``data`` (JSON is YAML), dpokit's defaults otherwise (reference model in memory,
    max_length 512) but for two settings that keep the step itself out of the comparison:

    - ``train.batch_size: 1``: one step of 8 of these ~530-token pairs holds ~11 GB and takes 1-2 min on 2 cores;
      the step's memory does not depend on how many pairs the file has, the data's does;
    - ``train.shuffle: false``: every run trains the file's first pair (``small.jsonl`` is a prefix of
      ``pairs.jsonl``), so the step's activations are the same and the peak RSS difference between a 1,000-pair
      and the whole-file run is the data's (a shuffled first pair of another length moves the peak by hundreds of
      MB; the shuffle order itself is 8 bytes a pair)."""
    cfg = {"run_dir": str(run_dir), "overwrite": True, "model": {"name_or_path": MODEL},
           "data": {"train": str(data), "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH},
           "train": {"max_steps": 1, "batch_size": 1, "shuffle": False, "log_every": 1, "progress": False}}
    path.write_text(json.dumps(cfg, indent=1))


TRAIN_SETUP = ("Training runs: `dpokit train CONFIG data.num_proc=2 data.cache_dir=DIR`, the embedded "
               "SmolLM2-135M-Instruct (its load is about 5 s of the time to the first step), 1 step, batch 1, no "
               "shuffling (every run trains the file's first pair, so the step's own memory is the same in all), "
               "reference model in memory; time to the first step: from the process's start (/proc) to the first "
               "call of `train_step`; peak RSS: the whole process (`wait4`).")


def run_train(bench: Bench, name: str, data: Path, cache_dir: Path) -> dict[str, Any]:
    run_dir = bench.workdir / "runs" / name
    config = bench.workdir / f"{name}.yaml"
    train_config(config, data, run_dir)
    result = bench.child(name, "train", setup=lambda: shutil.rmtree(run_dir, ignore_errors=True),
                         config=str(config), overrides=["data.num_proc=2", f"data.cache_dir={cache_dir}"])
    if "error" not in result:
        print(f"[{name}] first step starts {result['to_first_step_s']:.1f} s after the process started (data "
              f"{result.get('load_items_s', float('nan')):.1f} s); peak RSS {result['peak_rss_mb']:.0f} MB, at the "
              f"step's end {result.get('train_end_hwm_mb', float('nan')):.0f} MB", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoint and final/ of a 135M model: 1-2 GB each
    return result


def before_source(rev: str, workdir: Path) -> tuple[str, Path] | None:
    """dpokit's ``src`` as of ``rev`` (``auto``: the commit before the first whose subject starts with "data
    cache"), unpacked with ``git archive`` (the repository is not touched); None when there is no such commit."""
    if rev == "auto":
        log = subprocess.run(["git", "-C", str(ROOT), "log", "--reverse", "--format=%H %s"], capture_output=True,
                             text=True, check=True).stdout.splitlines()
        first = next((line.split()[0] for line in log if line.split(" ", 1)[1].lower().startswith("data cache")),
                     None)
        if first is None:
            return None
        rev = f"{first}^"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    out = workdir / f"before-{commit}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return commit, out / "src"


def run_check(bench: Bench, name: str, data: Path) -> dict[str, Any]:
    """``dpokit data check`` (the CLI itself, no wrapper) on ``data`` into an empty cache folder."""
    cache_dir = bench.workdir / "cache" / name
    log_path = bench.workdir / f"{name}.log"

    def once() -> dict[str, Any]:
        shutil.rmtree(cache_dir, ignore_errors=True)  # cold
        result = run_measured([sys.executable, "-m", "dpokit", "data", "check", str(data), "--model", MODEL,
                               "--num-proc", "2", "--cache-dir", str(cache_dir)], log_path)
        shutil.rmtree(cache_dir, ignore_errors=True)  # about 2.3 KB a row
        log = log_path.read_text(errors="replace")
        rows = re.search(r"rows read\s+(\d+)", log)
        result["rows"] = int(rows.group(1)) if rows else None
        if result["rc"] != 0 or rows is None:
            result["error"] = f"exit code {result['rc']}: {log.strip().splitlines()[-1:] if log.strip() else ''}"
            print(f"[{name}] FAILED: {result['error']}", flush=True)
        else:
            result["rows_per_s"] = result["rows"] / result["wall_s"]
            print(f"[{name}] {result['rows']} rows in {result['wall_s']:.1f} s ({result['rows_per_s']:.0f} rows/s); "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB, tree RSS {result['tree_rss_mb']:.0f} MB, tree PSS "
                  f"{result['tree_pss_mb']:.0f} MB; others {result['others']:.0%}", flush=True)
        return result

    return bench.measure(name, once)


# ------------------------------------------------------------------------------------------------- the report

def fmt(x: Any, spec: str = ".0f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def figures(bench: Bench, files: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, str, bool | None]]]:
    """The figure lines and the targets (text, measured, bar, met) of a finished run."""
    r = bench.results

    def ok(name: str) -> dict[str, Any] | None:
        return r[name] if name in r and "error" not in r[name] else None

    def ratio(a: str, b: str) -> float | None:
        x, y = ok(a), ok(b)
        return x["rows_per_s"] / y["rows_per_s"] if x and y else None

    lines = ["| run | file | rows | seconds | rows/s | x today | x 490 | peak MB: process RSS / tree RSS / tree PSS "
             "| load; CPU share of the run / of other processes |", "|---|---|---|---|---|---|---|---|---|"]
    before = files.get("before", "?")
    for name, what in (("today", "today's path (sequential, no cache)"),
                       ("today-before", f"the same on the code before the change ({before})"),
                       ("new-1", "load_cached, num_proc 1"),
                       ("new-2", "load_cached, num_proc 2"), ("new-2-trl", "load_cached, num_proc 2"),
                       ("trl-1", "TRL _prepare_dataset, 1 process"), ("trl-2", "TRL _prepare_dataset, 2 processes"),
                       ("new-full", "load_cached, num_proc 2"), ("check", "dpokit data check --num-proc 2"),
                       ("check-10", "dpokit data check, 10 rows")):
        x = r.get(name)
        if x is None:
            continue
        file = x.get("file", "")
        if "error" in x:
            lines.append(f"| {name}: {what} | {file} | FAILED: {x['error']} | | | | | | {x.get('load', '')} |")
            continue
        if "rows_per_s" not in x:
            continue
        seconds = x.get("seconds", x.get("wall_s"))
        vs_today = ratio(name, "today") if name != "today" else 1.0
        lines.append(f"| {name}: {what} | {file} | {x.get('rows')} | {fmt(seconds, '.1f')} | "
                     f"{fmt(x.get('rows_per_s'))} | {fmt(vs_today, '.2f')} | "
                     f"{fmt(x.get('rows_per_s', 0) / TODAY_ROWS_PER_S, '.2f')} | "
                     f"{fmt(x['peak_rss_mb'])} / {fmt(x['tree_rss_mb'])} / {fmt(x['tree_pss_mb'])} | "
                     f"{x['load']}; {x['cpu_share']:.0%} / {x['others']:.0%} |")
    notes = []
    if ok("new-full"):
        f = r["new-full"]
        notes.append(f"- new-full: warm `load_cached` of the same file afterwards {f['warm_s']:.2f} s; cache "
                     f"{f['cache_bytes'] / MB:.0f} MB for {f['groups']} groups, {f['tokens']} tokens "
                     f"({f['cache_bytes'] / max(f['tokens'], 1):.2f} bytes a token); dataset type `{f['type']}`")
    for name in ("trl-1", "trl-2"):
        if ok(name):
            notes.append(f"- {name}: `load_dataset('json')` before it {r[name]['load_dataset_s']:.1f} s "
                         f"(not in its rows/s); `DPOTrainer(...)` {r[name]['construct_s']:.1f} s in all")
    if ok("today") and ok("new-2"):
        same = r["today"]["digest"] == r["new-2"]["digest"] and r["today"]["digested"] == r["new-2"]["digested"]
        notes.append(f"- token ids of the first {r['today']['digested']} groups: today's path and the cache "
                     f"{'identical' if same else 'DIFFER'}")
    for name in ("train-small-1", "train-small-2", "train-full-1", "train-full-2"):
        x = r.get(name)
        if x is None:
            continue
        if "error" in x:
            notes.append(f"- {name}: FAILED: {x['error']}")
            continue
        notes.append(f"- {name} ({x['pairs']} pairs): first step starts {x['to_first_step_s']:.1f} s after the "
                     f"process started (data {fmt(x.get('load_items_s'), '.1f')} s, from "
                     f"{fmt(x.get('load_items_start_s'), '.1f')} s); the step {x['first_step_s']:.1f} s; peak RSS "
                     f"{x['peak_rss_mb']:.0f} MB (at the step's end {fmt(x.get('train_end_hwm_mb'))} MB); "
                     f"wall {x['wall_s']:.0f} s; load {x['load']}, other processes {x['others']:.0%}")
    if ok("check"):
        c, base = r["check"], ok("check-10")
        notes.append(f"- check: {files['check_bytes'] / MB:.0f} MB file; peak RSS {c['peak_rss_mb']:.0f} MB "
                     f"(process, wait4), {c['tree_rss_mb']:.0f} MB summed over its process tree, "
                     f"{c['tree_pss_mb']:.0f} MB PSS" + (f"; a 10-row file: {base['peak_rss_mb']:.0f} MB / "
                                                         f"{base['tree_rss_mb']:.0f} MB" if base else ""))

    targets: list[tuple[str, str, str, bool | None]] = []
    full = ok("new-full")
    if full:
        x = ratio("new-full", "today")
        targets.append((f"first tokenization of {full['rows']:,} pairs, num_proc 2, vs today re-measured",
                        f"{full['rows_per_s']:.0f} rows/s = {fmt(x, '.2f')}x", ">= 5x", x is not None and x >= 5))
        x = ratio("new-full", "today-before")
        if x is not None:
            targets.append((f"the same vs today's path on the code before the change ({files.get('before')})",
                            f"{x:.2f}x", ">= 5x", x >= 5))
        targets.append(("the same vs the issue's 490 rows/s", f"{full['rows_per_s'] / TODAY_ROWS_PER_S:.2f}x",
                        ">= 5x", full["rows_per_s"] >= 5 * TODAY_ROWS_PER_S))
    for new, trl in (("new-2-trl" if "new-2-trl" in r else "new-2", "trl-2"),
                     ("new-2-trl" if "new-2-trl" in r else "new-2", "trl-1")):
        x = ratio(new, trl)
        if x is not None:
            same = trl == "trl-2"
            targets.append((f"vs TRL dataset preparation, {r[trl]['rows']:,} rows: new 2 procs / TRL "
                            f"{'2 processes' if same else '1 process'}", f"{x:.2f}x", ">= 3x" if same else "(info)",
                            x >= 3 if same else None))
    x = ok("train-full-2")
    if x:
        targets.append((f"second run ({x['pairs']:,} pairs, cache warm) starts training",
                        f"{x['to_first_step_s']:.1f} s", "< 15 s", x["to_first_step_s"] < 15))
    small, big = ok("train-small-2"), ok("train-full-2")
    if small and big:
        per_pair = (big["peak_rss_mb"] - small["peak_rss_mb"]) * MB / (big["pairs"] - small["pairs"])
        targets.append((f"training peak RSS growth, {small['pairs']:,} -> {big['pairs']:,} pairs",
                        f"{per_pair:.0f} bytes/pair ({small['peak_rss_mb']:.0f} -> {big['peak_rss_mb']:.0f} MB)",
                        "<= 1000 bytes", per_pair <= 1000))
    c = ok("check")
    if c:
        # The memory the command holds: its largest process exactly (wait4), or all of its processes together
        # (sampled PSS: forked workers' shared pages once; the RSS sum would count them in every worker).
        peak = max(c["peak_rss_mb"], c["tree_pss_mb"])
        targets.append((f"data check of a {files['check_bytes'] / MB:.0f} MB file (cold cache), peak memory",
                        f"{peak:.0f} MB (largest process {c['peak_rss_mb']:.0f}, tree PSS {c['tree_pss_mb']:.0f}, "
                        f"tree RSS sum {c['tree_rss_mb']:.0f})", "< 500 MB", peak < 500))
    return lines + [""] + notes, targets


def render(bench: Bench, files: dict[str, Any], info: dict[str, Any], command: str, started: str,
           minutes: float) -> str:
    lines, targets = figures(bench, files)
    out = ["## Data at scale (issue 19)", "",
           f"`{command}` ({started}, {minutes:.0f} min). Written by `benchmarks/data_scale.py`; rows/s are rows read "
           "over the seconds of the measured call alone (tokenizer and model loads not counted), except `check` "
           "(the whole command). Peak memory: RSS of the process (`wait4`: the largest of it and its worker "
           "processes) / RSS summed over its process tree / PSS summed over the tree (both sampled every 0.5 s; "
           "PSS counts pages shared by forked workers once). MB are 10^6 bytes. CPU share: the run's CPU seconds "
           "(workers included) / (wall x cores); of other processes: the rest of the machine's busy time meanwhile "
           f"(a run during which they took over {OTHERS_MAX:.0%} is measured again, `--retries`; the least "
           "disturbed attempt is shown).", "",
           f"Machine: {info.get('cpu')}, {info['cores']} cores, {info.get('ram_gb')} GB; Python {info['python']}, "
           f"torch {info['torch']}, transformers {info['transformers']}, TRL {info['trl']}. Data: "
           f"{files['pairs']:,} synthetic conversational pairs, {files['pairs_bytes'] / MB:.0f} MB "
           f"({files['pairs_bytes'] / max(files['pairs'], 1) / 1000:.2f} KB a row, "
           + ("reused from --workdir" if files["write_s"] is None else f"written in {files['write_s']:.0f} s")
           + f"); SmolLM2-135M-Instruct's tokenizer and chat template; max_length "
           f"{MAX_LENGTH}, max_prompt_length {MAX_PROMPT_LENGTH}.", "", TRAIN_SETUP, "", *lines, "",
           "| target | measured | bar | met |", "|---|---|---|---|"]
    for text, value, bar, met in targets:
        out.append(f"| {text} | {value} | {bar} | {'-' if met is None else 'yes' if met else '**no**'} |")
    return "\n".join(out) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the section (from its heading to the next ``## `` heading) or append it."""
    text = path.read_text() if path.exists() else ""
    heading = section.splitlines()[0]
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


# ------------------------------------------------------------------------------------------------------ main

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000, help="pairs in the big file (default 1,000,000)")
    parser.add_argument("--subset", type=int, default=20_000,
                        help="rows of the like-for-like comparison with today's path (default 20,000)")
    parser.add_argument("--trl-rows", type=int, default=None,
                        help="rows TRL prepares (default: --subset; when different, load_cached is measured on "
                             "them too)")
    parser.add_argument("--check-size", default="2G", help="size of the data check file, e.g. 2G, 200M (default 2G)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: " + ", ".join(PARTS))
    parser.add_argument("--workdir", default=None, help="keep data, logs and results here (default: a temp folder, "
                                                        "deleted at the end)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                        help="the Markdown file whose 'Data at scale (issue 19)' section is written ('' for none)")
    parser.add_argument("--quiet-wait", type=float, default=120,
                        help="before each child, wait up to this many seconds for other processes to leave the CPU "
                             "(under 15%% busy); 0 disables")
    parser.add_argument("--retries", type=int, default=1,
                        help=f"measure a run again (up to this many times) when other processes took more than "
                             f"{OTHERS_MAX * 100:.0f}%% of the machine during it (default 1)")
    parser.add_argument("--before", default="auto",
                        help="also measure today's path on the code of this git revision (default auto: the commit "
                             "before the first 'data cache' commit; '' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)

    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - set(PARTS):
        parser.error(f"--skip: unknown part(s) {sorted(args.skip - set(PARTS))}; choose from {', '.join(PARTS)}")
    args.trl_rows = args.trl_rows or args.subset
    if args.subset > args.pairs or args.trl_rows > args.pairs:
        parser.error("--subset and --trl-rows must not exceed --pairs")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpokit-data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = prepare_files(args, workdir)
    paths = {k: Path(v) for k, v in files["paths"].items()}
    info = machine_info()
    print(f"machine: {info.get('cpu')}, {info['cores']} cores; load {loadavg()}", flush=True)
    bench = Bench(args, workdir)
    cache = workdir / "cache"

    def new(name: str, data: Path, num_proc: int) -> dict[str, Any]:
        folder = cache / name
        result = bench.child(name, "new", setup=lambda: shutil.rmtree(folder, ignore_errors=True),  # cold
                             data=str(data), cache_dir=str(folder), num_proc=num_proc)
        result["file"] = data.name
        if name != "new-full":
            shutil.rmtree(folder, ignore_errors=True)
        return result

    if "today" not in args.skip:
        bench.child("today", "today", data=str(paths["subset"]))["file"] = "subset.jsonl"
        before = before_source(args.before, workdir) if args.before else None
        if before:  # the same call on the code before the cache (its tokenizer shortcuts included)
            files["before"] = before[0]
            result = bench.child("today-before", "today", env={"PYTHONPATH": str(before[1])},
                                 data=str(paths["subset"]))
            result["file"] = "subset.jsonl"
            if "error" not in result and not result["dpokit"].startswith(str(before[1])):
                result["error"] = f"imported {result['dpokit']}, not the code of {before[0]}"
    if "new" not in args.skip:
        new("new-1", paths["subset"], 1)
        new("new-2", paths["subset"], 2)
        if args.trl_rows != args.subset and "trl" not in args.skip:
            new("new-2-trl", paths["trl"], 2)
    if "trl" not in args.skip:
        for n in (1, 2):
            hf_cache = workdir / "hf-datasets" / f"trl-{n}"
            # datasets caches map results: every attempt starts cold
            bench.child(f"trl-{n}", "trl", setup=lambda folder=hf_cache: shutil.rmtree(folder, ignore_errors=True),
                        data=str(paths["trl"]), num_proc=n, hf_cache=str(hf_cache),
                        run_dir=str(workdir / "runs" / f"trl-{n}"))["file"] = "trl.jsonl"
            shutil.rmtree(hf_cache, ignore_errors=True)
    fastest = bench.results.get("new-2", {}).get("rows_per_s")
    if fastest:
        rest = args.pairs / fastest * (1 + ("check" not in args.skip) * files.get("check_bytes", 0)
                                       / files["pairs_bytes"])
        print(f"projected: about {rest / 60:.0f} min more of tokenization at {fastest:.0f} rows/s, "
              f"plus ~4 training runs", flush=True)
    if "full" not in args.skip:
        new("new-full", paths["pairs"], 2)
    if "train" not in args.skip:
        main_cache = cache / "new-full"  # warm after new-full when the cache keys agree; else the first run fills it
        for name, data, pairs in (("train-small", paths["small"], min(SMALL_PAIRS, args.pairs)),
                                  ("train-full", paths["pairs"], args.pairs)):
            for attempt in (1, 2):
                run_train(bench, f"{name}-{attempt}", data, main_cache)["pairs"] = pairs
    if "check" not in args.skip:
        run_check(bench, "check", paths["check"])["file"] = "check.jsonl"
        run_check(bench, "check-10", paths["ten"])["file"] = "ten.jsonl"
    minutes = (time.perf_counter() - t0) / 60

    defaults = {"pairs": 1_000_000, "subset": 20_000, "trl_rows": args.subset, "check_size": "2G", "skip": set(),
                "seed": 0, "before": "auto"}
    extra = " ".join(f"--{k.replace('_', '-')} {','.join(sorted(v)) if isinstance(v, set) else v}"
                     for k, v in vars(args).items() if k in defaults and v != defaults[k])
    command = ".venv/bin/python benchmarks/data_scale.py" + (f" {extra}" if extra else "")
    section = render(bench, files, info, command, started, minutes)
    print()
    print(section)
    if args.results:
        write_section(Path(args.results), section)
        print(f"written: the section of {args.results}")
    if args.workdir:
        print(f"data, logs and caches in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
