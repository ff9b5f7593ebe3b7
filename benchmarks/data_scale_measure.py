"""How ``data_scale.py`` measures a child process: wall time, CPU share, peak RSS of the process (``wait4``) and
of its whole tree (sampled), what other processes took of the machine meanwhile, and a retry when they took too
much (``Bench``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import ROOT, loadavg
from data_scale_files import MB


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

    def __init__(self, args: argparse.Namespace, workdir: Path, script: Path) -> None:
        self.args, self.workdir, self.script = args, workdir, script
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
        """A measured child process of ``script`` running ``CHILDREN[kind](spec)`` (``--child``)."""
        spec.update(kind=kind, result=str(self.workdir / f"{name}.json"))
        spec_path = self.workdir / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))

        def once() -> dict[str, Any]:
            if setup:
                setup()
            result_path = Path(spec["result"])
            result_path.unlink(missing_ok=True)
            proc = run_measured([sys.executable, str(self.script), "--child", str(spec_path)],
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
