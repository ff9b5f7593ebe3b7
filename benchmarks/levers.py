"""dpokit's performance levers, one at a time, on SmolLM2-135M (the numbers behind docs/performance.md).

    .venv/bin/python benchmarks/levers.py --steps 3               # every lever, about 15-25 minutes
    .venv/bin/python benchmarks/levers.py --levers head,packed+store

Same synthetic pairs, batch and settings as ``compare_trl.py`` (batch 8 pairs, fp32 unless stated, DPO sigmoid,
AdamW, files order), each configuration in its own child process so its peak RSS is its own:

``head``                       one forward + backward of the policy's log-probs on the first batch, padded layout:
                               the full-vocabulary head at every position (``layout_logps(plain=True)``, what a
                               plain implementation does) against response positions only, chunked (the default)
``padded+model``               the plain layout, reference model in memory (TRL's setup)
``packed+model``               + prefix sharing and padding-free packing (``train.layout: packed``)
``padded+store``               + the reference store instead of the online reference (``reference.mode: store``)
``packed+store``               both: the fastest fp32 path
``packed+store+bf16``          + bf16 autocast (``train.precision: bf16``)
``packed+store+gc``            + gradient checkpointing (memory against time)
``lora+adapter``               LoRA r=16 on all linear layers, reference = adapters disabled (no copy)
``packed+store+compile``       + ``train.compile`` (only with ``--compile``: the first steps compile)

Prints a table (tokens/s, s/step, peak RSS, padding fraction, one-off store time) and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    dpokit_child,
    dpokit_config,
    loadavg,
    machine_info,
    make_pairs,
    proc_status_mb,
    run_child,
    timed_summary,
    write_jsonl,
)

LEVERS: dict[str, dict[str, Any]] = {
    "head-full": {"head": True, "plain": True},
    "head-response": {"head": True, "plain": False},
    "padded+model": {"reference_mode": "model", "layout": "padded"},
    "packed+model": {"reference_mode": "model", "layout": "packed"},
    "padded+store": {"reference_mode": "store", "layout": "padded"},
    "packed+store": {"reference_mode": "store", "layout": "packed"},
    "packed+store+bf16": {"reference_mode": "store", "layout": "packed", "precision": "bf16"},
    "packed+store+gc": {"reference_mode": "store", "layout": "packed", "gradient_checkpointing": True},
    "lora+adapter": {"reference_mode": "adapter", "layout": "packed",
                     "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}},
    "packed+store+compile": {"reference_mode": "store", "layout": "packed", "compile": True},
}
GROUPS = {"head": ["head-full", "head-response"]}


def head_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Forward + backward of the summed response log-probs of one padded batch, full-vocabulary head at every
    position (``plain``) or at response positions only; best of ``reps`` after a warmup."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.config import DataConfig
    from dpokit.data import load_preferences
    from dpokit.data.batch import collate_pairs
    from dpokit.models.logprobs import layout_logps

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.train()
    pairs, _ = load_preferences(spec["data"], tokenizer, DataConfig(max_length=512, max_prompt_length=256))
    batch = collate_pairs(pairs[:spec["batch_size"]], tokenizer.pad_token_id, layout="padded")
    base = proc_status_mb("VmRSS")
    times = []
    for _ in range(spec["reps"] + 1):
        start = time.perf_counter()
        logps, _ = layout_logps(model, batch, plain=spec["plain"])
        logps.sum().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    rows, width = batch["input_ids"].shape
    return {"system": spec["name"], "times": times[1:], "best_s": min(times[1:]), "rows": rows, "width": width,
            "projected": int(batch["targets"].numel()) if not spec["plain"] else rows * width,
            "tokens": batch["tokens"], "rss_before_mb": base, "hwm_mb": proc_status_mb("VmHWM")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (+1 warmup)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--levers", default=None, help="comma-separated subset (default: all but compile)")
    parser.add_argument("--compile", action="store_true", help="also measure train.compile")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the head micro-benchmark")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        try:
            result = head_child(spec) if spec.get("head") else dpokit_child(spec)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            result = {"system": spec["name"], "error": f"{type(exc).__name__}: {exc}"}
        Path(spec["result"]).write_text(json.dumps(result))
        return 0

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from dpokit.models.loading import resolve

    if args.levers:
        names = []
        for n in args.levers.split(","):
            names += GROUPS.get(n.strip(), [n.strip()])
    else:
        names = [n for n in LEVERS if n != "packed+store+compile" or args.compile]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {unknown}; choose from {list(LEVERS)} or 'head'")
    folder = resolve("smollm2").location
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpokit-levers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    total_steps = args.steps + 1
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = workdir / "pairs.jsonl"
    write_jsonl(make_pairs(tokenizer, total_steps * args.batch_size, seed=0), data)
    info = machine_info()
    print(f"{info.get('cpu')}, {info['cores']} cores, torch {info['torch']}; load {loadavg()}", flush=True)

    store_dir = workdir / "refstore"
    shutil.rmtree(store_dir, ignore_errors=True)
    results: dict[str, Any] = {}
    for name in names:
        lever = dict(LEVERS[name])
        spec: dict[str, Any] = {"name": name, "run_dir": str(workdir / "runs" / name),
                                "result": str(workdir / f"{name}.json")}
        if lever.pop("head", False):
            spec.update(head=True, plain=lever["plain"], model=folder, data=str(data),
                        batch_size=args.batch_size, reps=args.reps)
        else:
            # A fresh store per configuration: each one pays (and reports) its own one-off precompute.
            spec["config"] = dpokit_config(str(data), folder, total_steps, args.batch_size, 1e-6, 0.1, 512, 256, 0,
                                           str(store_dir / name), **lever)
        spec_path = workdir / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        load = loadavg()
        proc = run_child(Path(__file__), ["--child", str(spec_path)], workdir / f"{name}.log")
        path = Path(spec["result"])
        result = json.loads(path.read_text()) if path.exists() else {"error": f"exit {proc['rc']}"}
        result.update(ru_maxrss_mb=proc["ru_maxrss_mb"], wall_s=proc["wall_s"], load=load)
        results[name] = result
        print(line(name, result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "steps": args.steps, "results": results}, indent=1))
    if args.workdir:
        print(f"(runs and logs in {workdir})")
    else:  # full checkpoints, gigabytes: kept only with --workdir
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def line(name: str, r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"{name:22s} FAILED {r['error']}"
    if "best_s" in r:
        return (f"{name:22s} fwd+bwd {r['best_s']:.2f} s (best of {len(r['times'])}), {r['rows']}x{r['width']} "
                f"positions, {r['projected']} projected to the vocabulary, process peak RSS "
                f"{r['ru_maxrss_mb']:.0f} MB, load {r['load']}")
    s = timed_summary(r["steps"])
    pad = sum(x.get("padding_fraction", 0) for x in r["steps"][1:]) / max(len(r["steps"]) - 1, 1)
    store = f", store setup {r['reference_setup_s']:.1f} s" if r.get("reference_setup_s") and r.get(
        "precompute_s") is not None else ""
    return (f"{name:22s} {s['tokens_per_s']:7.1f} tokens/s {s['s_per_step']:6.2f} s/step  peak RSS "
            f"{r.get('train_end_hwm_mb', float('nan')):6.0f} MB (process {r['ru_maxrss_mb']:.0f})  padding "
            f"{pad:.1%}{store}  loss {r['steps'][-1].get('loss', float('nan')):.5f}  load {r['load']}")


if __name__ == "__main__":
    sys.exit(main())
