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
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, loadavg, machine_info, proc_status_mb  # noqa: E402
from data_scale_files import MAX_LENGTH, MAX_PROMPT_LENGTH, MB, MODEL, SMALL_PAIRS, prepare_files  # noqa: E402
from data_scale_measure import OTHERS_MAX, Bench, run_measured  # noqa: E402
from data_scale_report import render, write_section  # noqa: E402

DIGEST_ROWS = 2000
"""Rows whose token ids today's path and the cache must agree on (a sanity check, not timed)."""

PARTS = ("today", "new", "trl", "full", "train", "check")


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


# ------------------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
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
    return parser


def measure_tokenization(bench: Bench, args: argparse.Namespace, files: dict[str, Any], paths: dict[str, Path],
                         cache: Path) -> None:
    """Today's path (and on the code before the cache), ``load_cached`` cold, TRL's preparation, and the whole
    file, each unless skipped."""
    workdir = bench.workdir

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


def command_line(args: argparse.Namespace) -> str:
    """The command that regenerates the section: the options that differ from their defaults."""
    defaults = {"pairs": 1_000_000, "subset": 20_000, "trl_rows": args.subset, "check_size": "2G", "skip": set(),
                "seed": 0, "before": "auto"}
    extra = " ".join(f"--{k.replace('_', '-')} {','.join(sorted(v)) if isinstance(v, set) else v}"
                     for k, v in vars(args).items() if k in defaults and v != defaults[k])
    return ".venv/bin/python benchmarks/data_scale.py" + (f" {extra}" if extra else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    bench = Bench(args, workdir, Path(__file__).resolve())
    cache = workdir / "cache"
    measure_tokenization(bench, args, files, paths, cache)
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

    section = render(bench.results, files, info, command_line(args), started, minutes)
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
