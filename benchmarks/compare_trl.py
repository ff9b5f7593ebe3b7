"""dpokit against Hugging Face TRL's DPOTrainer: same model, same pairs, same batch and length limits, one run.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'      # trl + psutil, benchmark-only
    .venv/bin/python benchmarks/compare_trl.py --steps 5        # writes benchmarks/RESULTS.md

One invocation:

1. writes seeded synthetic standard-format pairs (prompts 20-60 tokens, responses 10-40, ordinary words) as
   JSONL, (steps + 1) x batch pairs, which both systems read in file order (no shuffling) so that step k of
   every system trains on the same 8 pairs;
2. measures the fp32 and bf16 matrix-product peak (``torch.matmul`` 2048 x 2048) of this machine, now;
3. runs, each in its own child process one after the other (so each peak RSS is that system's alone):
   ``trl``         DPOTrainer, fp32, reference model online, no gradient checkpointing
   ``trl-pre``     DPOTrainer with ``precompute_ref_log_probs=True`` (its precompute time reported apart)
   ``dpokit-same`` dpokit with TRL's settings: fp32, ``reference.mode: model``, ``train.layout: padded``
   ``dpokit-fast`` dpokit's fastest fp32 path: ``reference.mode: store``, ``train.layout: packed``,
                   ``train.pass_tokens: 512`` (each step's 8 pairs run as two forward/backward passes)
   ``dpokit-bf16`` the same under ``train.precision: bf16`` autocast
   The first step of each is a warmup and is not timed; the next ``--steps`` are;
4. checks that the systems computed the same thing: identical token ids for every pair, and at step 1 (policy ==
   reference) the same loss (ln 2), mean ``logps/chosen`` / ``logps/rejected`` and ``grad_norm`` within 1e-4
   relative in fp32;
5. bf16 tracking: trains dpokit-fast in fp32 and in bf16 for ``--track-steps`` steps at ``--track-lr`` on the
   first 16 pairs (two steps an epoch), where the loss really falls, and compares the two loss curves;
6. prints and writes ``--results`` (default benchmarks/RESULTS.md): trained tokens/s, s/step, peak RSS, the
   ratios against TRL, the first-step numbers, model FLOPs utilization, and the issue's targets, met or not.

Trained tokens are counted the same way for every system: the non-padding tokens of prompt+chosen and
prompt+rejected of the step's pairs (dpokit's ``tokens`` metric; for TRL the ``attention_mask`` sum of the
batches its collator built). ``--systems trl,dpokit-fast`` runs a subset (for development).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    dpokit_child,
    dpokit_config,
    dpokit_layouts,
    loadavg,
    machine_info,
    make_pairs,
    matmul_gflops,
    model_dims,
    proc_status_mb,
    process_cpu_s,
    run_child,
    step_flops,
    timed_summary,
    trl_trainer,
    wait_until_quiet,
    write_jsonl,
)
from compare_trl_report import render  # noqa: E402

SYSTEMS = {
    "trl": {"kind": "trl", "precompute": False, "label": "TRL DPOTrainer, ref model online"},
    "trl-pre": {"kind": "trl", "precompute": True, "label": "TRL DPOTrainer, precompute_ref_log_probs"},
    "dpokit-same": {"kind": "dpokit", "label": "dpokit, TRL's settings (model, padded)",
                    "train": {"reference_mode": "model", "layout": "padded", "precision": "fp32"}},
    "dpokit-fast": {"kind": "dpokit", "label": "dpokit fastest fp32 (store, packed, passes of 512)",
                    "train": {"reference_mode": "store", "layout": "packed", "precision": "fp32",
                              "pass_tokens": 512}},
    "dpokit-bf16": {"kind": "dpokit", "label": "dpokit fastest, bf16 autocast",
                    "train": {"reference_mode": "store", "layout": "packed", "precision": "bf16",
                              "pass_tokens": 512}},
}


# --------------------------------------------------------------------------------------------- TRL child process

def trl_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's DPOTrainer in this process. Timing: a callback stamps the end of every optimizer step;
    the collator is wrapped to record each training batch's shape and non-padding tokens."""
    from transformers import TrainerCallback
    from trl import DPOTrainer

    marks: dict[str, Any] = {}
    original_precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = original_precompute(self, *args, **kwargs)
        marks["precompute_s"] = time.perf_counter() - start
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute  # a timer around TRL's own method, nothing else changes

    start = time.perf_counter()
    trainer = trl_trainer(spec, weight_decay=0.0, max_grad_norm=10.0, beta=spec["beta"],
                          precompute_ref_log_probs=spec["precompute"], bf16=False, fp16=False, use_cpu=True,
                          gradient_checkpointing=False, dataloader_pin_memory=False, seed=spec["seed"])
    marks["setup_s"] = time.perf_counter() - start
    marks["rss_after_setup_mb"] = proc_status_mb("VmRSS")

    batches: list[dict[str, int]] = []
    collate = trainer.data_collator

    def recording_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = collate(examples)
        rows, width = out["input_ids"].shape
        batches.append({"tokens": int(out["attention_mask"].sum()), "rows": rows, "width": width})
        return out

    trainer.data_collator = recording_collator

    ends: list[float] = []
    cpu: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks["train_begin"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())
            cpu.append(process_cpu_s())

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks["train_end_hwm_mb"] = proc_status_mb("VmHWM")
            marks["train_end_rss_mb"] = proc_status_mb("VmRSS")

    trainer.add_callback(StepTimer())
    trainer.train()

    logs = {row["step"]: row for row in trainer.state.log_history if "loss" in row and "step" in row}
    steps = []
    for i, end in enumerate(ends):
        row = dict(logs.get(i + 1, {}))
        row.update(step=i + 1, elapsed_s=end - marks["train_begin"], cpu_s=cpu[i], tokens=batches[i]["tokens"],
                   rows=batches[i]["rows"], width=batches[i]["width"])
        steps.append(row)
    ids = [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in trainer.train_dataset]
    return {"system": spec["name"], "steps": steps, "token_ids": ids, **marks}


# ------------------------------------------------------------------------------------------------------ parent

def analyse(results: dict[str, dict[str, Any]], geometry: dict[str, Any], dims: dict[str, int],
            peaks: dict[str, float], steps: int) -> dict[str, dict[str, Any]]:
    """Per system: timed summary, peak RSS, FLOPs per step and MFU."""
    out = {}
    for name, res in results.items():
        if res.get("error"):
            out[name] = {"error": res["error"]}
            continue
        summary = timed_summary(res["steps"])
        sysdef = SYSTEMS[name]
        timed = range(1, len(res["steps"]))  # indices of the timed steps
        flops = []
        for i in timed:
            if sysdef["kind"] == "trl":
                s = res["steps"][i]
                rows, width = s["rows"], s["width"]
                # On CPU TRL's fused head scores every shifted position of every row (prompt and padding too).
                projected = rows * (width - 1)
                ref = (rows, width, projected) if not sysdef["precompute"] else (0, 0, 0)
                flops.append(step_flops(dims, rows, width, projected, *ref))
            else:
                layout = sysdef["train"]["layout"]
                g = geometry[layout][i]
                online = sysdef["train"]["reference_mode"] == "model"
                ref = (g["rows"], g["width"], g["projected"]) if online else (0, 0, 0)
                flops.append(step_flops(dims, g["rows"], g["width"], g["projected"], *ref))
        flops_per_step = sum(flops) / len(flops)
        precision = sysdef.get("train", {}).get("precision", "fp32")
        achieved = flops_per_step / summary["s_per_step"] / 1e9
        out[name] = {
            **summary,
            "label": sysdef["label"],
            "peak_rss_mb": res.get("train_end_hwm_mb"),
            "process_peak_rss_mb": res.get("ru_maxrss_mb"),
            "precompute_s": res.get("precompute_s"),
            "reference_setup_s": res.get("reference_setup_s"),
            "gflop_per_step": flops_per_step / 1e9,
            "achieved_gflops": achieved,
            "mfu": achieved / peaks[precision],
            "precision": precision,
            "first": res["steps"][0],
            "losses": [s.get("loss") for s in res["steps"]],
        }
    return out


def run_system(args: Any, name: str, sysdef: dict[str, Any], workdir: Path, folder: str, data: Path,
               total_steps: int, store_dir: Path, attempt: int) -> dict[str, Any]:
    """One measured run of one system in a child process (waiting first for a quiet machine)."""
    tag = f"{name}-{attempt}"
    run_dir = workdir / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    spec: dict[str, Any] = {"name": name, "kind": sysdef["kind"], "run_dir": str(run_dir),
                            "result": str(workdir / f"{tag}.json")}
    if sysdef["kind"] == "trl":
        hf_cache = workdir / "hf-datasets" / tag  # fresh: TRL caches its precompute in the datasets cache
        shutil.rmtree(hf_cache, ignore_errors=True)
        spec.update(model=folder, data=str(data), steps=total_steps, batch_size=args.batch_size, lr=args.lr,
                    beta=args.beta, max_length=args.max_length, seed=args.seed, precompute=sysdef["precompute"],
                    hf_cache=str(hf_cache))
    else:
        # A fresh store per run: each measures its own one-off precompute.
        spec["config"] = dpokit_config(str(data), folder, total_steps, args.batch_size, args.lr, args.beta,
                                       args.max_length, args.max_prompt_length, args.seed, str(store_dir / tag),
                                       **sysdef["train"])
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    busy = wait_until_quiet(args.quiet_wait) if args.quiet_wait else float("nan")
    load = f"{loadavg()}, others {busy:.0%} busy"
    print(f"[{name}] {sysdef['label']}: running (load {load}) ...", flush=True)
    proc = run_child(Path(__file__), ["--child", str(spec_path)], workdir / f"{tag}.log")
    result_path = Path(spec["result"])
    if proc["rc"] != 0 or not result_path.exists():
        result = {"error": f"exit code {proc['rc']}, see {workdir / (tag + '.log')}"}
    else:
        result = json.loads(result_path.read_text())
    result.update(ru_maxrss_mb=proc["ru_maxrss_mb"], wall_s=proc["wall_s"], load=load)
    if result.get("error"):
        print(f"[{name}] FAILED: {result['error']}", flush=True)
        return result
    s = timed_summary(result["steps"])
    result["cpu_share"] = s["cpu_share"]
    print(f"[{name}] {s['tokens_per_s']:.1f} tokens/s, {s['s_per_step']:.2f} s/step, CPU share {s['cpu_share']:.0%}, "
          f"peak RSS {result.get('train_end_hwm_mb', float('nan')):.0f} MB, wall {proc['wall_s']:.0f} s", flush=True)
    return result


TRACK_PAIRS = 16


def track_bf16(args: Any, workdir: Path, folder: str, data: Path) -> dict[str, Any]:
    """dpokit-fast in fp32 and in bf16, ``--track-steps`` steps at ``--track-lr`` over the first 16 pairs (the
    same order in both): the two loss curves. Timing is not the point here, the curves are."""
    rows = data.read_text().splitlines()[:TRACK_PAIRS]
    track_data = workdir / "track-pairs.jsonl"
    track_data.write_text("\n".join(rows) + "\n")
    curves: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        tag = f"track-{precision}"
        train = {**SYSTEMS["dpokit-fast"]["train"], "precision": precision}
        spec = {"name": tag, "kind": "dpokit", "run_dir": str(workdir / "runs" / tag),
                "result": str(workdir / f"{tag}.json"),
                "config": dpokit_config(str(track_data), folder, args.track_steps, args.batch_size, args.track_lr,
                                        args.beta, args.max_length, args.max_prompt_length, args.seed,
                                        str(workdir / "refstore" / tag), **train)}
        shutil.rmtree(spec["run_dir"], ignore_errors=True)
        spec_path = workdir / f"{tag}.spec.json"
        spec_path.write_text(json.dumps(spec))
        print(f"[{tag}] {args.track_steps} steps at lr {args.track_lr} on {TRACK_PAIRS} pairs ...", flush=True)
        proc = run_child(Path(__file__), ["--child", str(spec_path)], workdir / f"{tag}.log")
        result_path = Path(spec["result"])
        if proc["rc"] != 0 or not result_path.exists():
            return {"error": f"{tag}: exit code {proc['rc']}, see {workdir / (tag + '.log')}"}
        steps = json.loads(result_path.read_text())["steps"]
        curves[precision] = [s["loss"] for s in steps]
        curves[f"{precision}_accuracy"] = [s.get("rewards/accuracies") for s in steps]
    curves["pairs"] = TRACK_PAIRS
    fp32, bf16 = curves["fp32"], curves["bf16"]
    curves["max_abs_diff"] = max(abs(a - b) for a, b in zip(fp32, bf16))
    curves["fp32_drop"] = fp32[0] - min(fp32)
    return curves


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per system (one warmup step more)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256, help="dpokit only (TRL has none now)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2", help="dpokit model name or HF folder (default: embedded)")
    parser.add_argument("--track-steps", type=int, default=12,
                        help="bf16-vs-fp32 loss tracking run length (0: skip)")
    parser.add_argument("--track-lr", type=float, default=2e-5, help="learning rate of the tracking runs")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--workdir", default=None, help="keep data, runs and logs here (default: a temp folder)")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="before each system, wait up to this many seconds for other processes to leave the "
                             "CPU (under 15%% busy); 0 disables")
    parser.add_argument("--retries", type=int, default=2,
                        help="measure a system again (up to this many times) when its timed steps got less than "
                             "--min-cpu-share of the cores; the best attempt is reported")
    parser.add_argument("--min-cpu-share", type=float, default=0.85)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def child(spec_path: Path) -> int:
    """Inside a child process: run one system, write its result (an error is reported by the parent, with
    the log)."""
    spec = json.loads(spec_path.read_text())
    try:
        result = trl_child(spec) if spec["kind"] == "trl" else dpokit_child(spec)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"system": spec["name"], "error": f"{type(exc).__name__}: {exc}"}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def write_pairs(args: Any, folder: str, data: Path, total_steps: int) -> tuple[Any, Any, dict[str, list[int]]]:
    """The synthetic pairs into ``data``; dpokit's token ids and step geometry of them, and their token
    lengths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    n_pairs = total_steps * args.batch_size
    write_jsonl(make_pairs(tokenizer, n_pairs, seed=args.seed), data)
    dpokit_ids, geometry = dpokit_layouts(data, folder, args.batch_size, total_steps, args.max_length,
                                          args.max_prompt_length)
    lengths = {k: [len(p[i]) for p in dpokit_ids] for i, k in enumerate(("prompt", "chosen", "rejected"))}
    print(f"{n_pairs} pairs -> {data}; token lengths "
          + ", ".join(f"{k} {min(v)}-{max(v)} (mean {sum(v) / len(v):.1f})" for k, v in lengths.items()), flush=True)
    return dpokit_ids, geometry, lengths


def measure_systems(args: Any, names: list[str], workdir: Path, folder: str, data: Path,
                    total_steps: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each system in turn, measured again while it got too small a share of the cores; per system the
    attempt that had the cores most to itself, and the load before it."""
    results: dict[str, dict[str, Any]] = {}
    loads: dict[str, str] = {}
    store_dir = workdir / "refstore"
    shutil.rmtree(store_dir, ignore_errors=True)  # every invocation measures a fresh precompute
    for name in names:
        sysdef = SYSTEMS[name]
        attempts = []
        for attempt in range(1, args.retries + 2):
            result = run_system(args, name, sysdef, workdir, folder, data, total_steps, store_dir, attempt)
            attempts.append(result)
            if result.get("error") or result["cpu_share"] >= args.min_cpu_share or attempt > args.retries:
                break
            print(f"[{name}] only {result['cpu_share']:.0%} of the cores during the timed steps (other processes); "
                  "measuring again", flush=True)
        # The attempt that had the cores most to itself; all attempts are listed in the report.
        valid = [r for r in attempts if not r.get("error")]
        results[name] = max(valid, key=lambda r: r["cpu_share"]) if valid else attempts[-1]
        results[name]["attempts"] = [(r.get("cpu_share"), r.get("load")) for r in attempts]
        loads[name] = results[name].get("load", "")
    return results, loads


def command_line(args: Any) -> str:
    """The command that regenerates the report: the options that differ from their defaults (``--steps``
    always)."""
    command = "python benchmarks/compare_trl.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("steps",) or (k not in ("child", "results", "workdir", "systems") and v != DEFAULTS.get(k)))
    if args.systems != ",".join(SYSTEMS):
        command += f" --systems {args.systems}"
    return command


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        return child(Path(args.child))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dpokit.models.loading import resolve

    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    folder = resolve(args.model).location
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpokit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    total_steps = args.steps + 1
    data = workdir / "pairs.jsonl"
    dpokit_ids, geometry, lengths = write_pairs(args, folder, data, total_steps)

    info = machine_info()
    if args.quiet_wait:
        wait_until_quiet(args.quiet_wait)
    load_before = loadavg()
    peaks = {"fp32": matmul_gflops("fp32"), "bf16": matmul_gflops("bf16")}
    print(f"machine: {info.get('cpu')}, {info['cores']} cores, {info.get('ram_gb')} GB; load {load_before}; "
          f"matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)
    dims = model_dims(folder)

    results, loads = measure_systems(args, names, workdir, folder, data, total_steps)
    track: dict[str, Any] = {}
    if args.track_steps and {"dpokit-fast", "dpokit-bf16"} <= set(names):
        track = track_bf16(args, workdir, folder, data)
    load_after = loadavg()

    summary = analyse(results, geometry, dims, peaks, args.steps)
    trl_ids = next((r["token_ids"] for r in results.values() if "token_ids" in r), None)
    from dpokit.models.hardware import describe, format_env

    info["dpokit_env"] = format_env(describe(refresh=False))  # what auto picks on this machine, for the record
    report = render(args, command_line(args), info, peaks, dims, summary, results, loads, load_before, load_after,
                    lengths, geometry, dpokit_ids, trl_ids, track)
    print()
    print(report)
    Path(args.results).write_text(report)
    if args.workdir:
        print(f"\nwritten: {args.results} (data, logs and runs in {workdir})")
    else:  # the run folders hold full checkpoints (gigabytes): keep them only when asked to (--workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\nwritten: {args.results} (pass --workdir DIR to keep the data, logs and runs)")
    return 0


DEFAULTS = {"steps": 5, "batch_size": 8, "lr": 1e-6, "track_steps": 12, "track_lr": 2e-5, "beta": 0.1, "max_length": 512, "max_prompt_length": 256,
            "seed": 0, "model": "smollm2", "quiet_wait": 300, "retries": 2, "min_cpu_share": 0.85}

if __name__ == "__main__":
    sys.exit(main())
