"""dpokit at real model shapes on one GPU: tokens/s, MFU, peak memory and the planner's prediction, beside TRL.

    python benchmarks/gpu_scale.py --out gpu_scale.md           # one H100/H200: under 8 minutes
    python benchmarks/gpu_scale.py --out gpu_scale.md --extra   # also 3B full (checkpointing), 8B full (offload)
    python benchmarks/gpu_scale.py --only "8B QLoRA"            # one row
    python benchmarks/gpu_scale.py --self-test                  # anywhere: the same logic on CPU, tiny shapes

Without a CUDA device and without ``--self-test`` it prints one line and exits 2.

Rows (random weights of the real shapes, written tensor by tensor as bf16 safetensors: no download; dpokit's
tiny tokenizer, so the token ids are real but the text is not; sequence 2048: pairs of a ~500-token prompt and
two ~700-token responses, dpokit's packed layout, bf16):
    1B full DPO       Llama-3.2-1B, fp32 weights under bf16 autocast, AdamW, the reference model in the step;
                      TRL's DPOTrainer on the same folder, pairs and batch
    8B LoRA           Llama-3.1-8B, bf16 base, LoRA r=16 on every linear layer, the reference = the base with
                      the adapters off, activation checkpointing; TRL the same (peft_config)
    8B QLoRA          the same with the base in NF4 (``model.quantize: nf4``); the issue's bar: under 24 GB
  --extra:
    3B full DPO       Llama-3.2-3B, activation checkpointing
    8B full DPO       Llama-3.1-8B, FSDP2 with ``distributed.offload: params`` in a one-process group

Each row reports tokens/s (TRL's count: non-padding tokens of prompt+chosen and prompt+rejected), MFU (the FLOPs
the step needs, ``gpu_scale_parts.pair_flops``, over the bf16 matmul peak measured in the same run), the peak
device memory (``torch.cuda.max_memory_allocated``) and what ``dpokit plan`` predicts for the same config
(the issue's bar: within 10%). Every run is a child process, so each peak is its own.

The self-test runs every row's logic on CPU with a tiny Llama (TRL included where it imports), and checks the
FLOP arithmetic and the folder writer; peak memory is then the process's RSS, not comparable to the planner's
device figure, and is not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import dpokit_child, make_pairs, run_child, timed_summary, write_jsonl  # noqa: E402
from gpu_check import matmul_peak_tflops, trl_available  # noqa: E402
from gpu_check_report import Report  # noqa: E402
from gpu_scale_parts import (  # noqa: E402
    TINY,
    Case,
    find_shape,
    mfu,
    pair_flops,
    pair_lengths,
    trl_run,
    write_random_model,
)

LORA = {"model.lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "reference.mode": "adapter", "model.dtype": "bfloat16", "train.gradient_checkpointing": True}
CASES = (
    Case("1B full DPO", "Llama-3.2-1B", {}, "full", trl=True),
    Case("8B LoRA", "Llama-3.1-8B", LORA, "adapters", trl=True),
    Case("8B QLoRA", "Llama-3.1-8B", {**LORA, "model.quantize": "nf4"}, "adapters"),
)
EXTRA = (
    Case("3B full DPO, checkpointing", "Llama-3.2-3B", {"train.gradient_checkpointing": True}, "full"),
    Case("8B full DPO, FSDP2 offload", "Llama-3.1-8B",
         {"distributed.strategy": "fsdp", "distributed.offload": "params", "train.gradient_checkpointing": True},
         "full", single_process_group=True),
)


class Sizes:
    """How big the run is: the real one on a GPU, a tiny one for the self-test."""

    def __init__(self, self_test: bool) -> None:
        if self_test:
            self.prompt, self.response, self.max_length = (20, 40), (20, 40), 128
            self.batch, self.warmup, self.timed, self.peak_size = 2, 1, 2, 256
        else:
            self.prompt, self.response, self.max_length = (400, 600), (600, 720), 2048
            self.batch, self.warmup, self.timed, self.peak_size = 4, 2, 6, 8192

    @property
    def steps(self) -> int:
        return self.warmup + self.timed


def base_config(case: Case, folder: Path, data: Path, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """The dpokit config of a row: DPO sigmoid, AdamW at a constant lr, file order, packed layout in bf16, the
    reference in the step (``model``; LoRA rows: ``adapter``), the case's overrides on top."""
    cfg: dict[str, Any] = {
        "overwrite": True,
        "model": {"name_or_path": str(folder), "attn_implementation": "sdpa"},
        "data": {"train": str(data), "max_length": sizes.max_length, "max_prompt_length": sizes.max_length // 2},
        "loss": {"name": "sigmoid", "beta": 0.1},
        "train": {"lr": 1e-6, "batch_size": sizes.batch, "grad_accum": 1, "max_steps": sizes.steps, "seed": 0,
                  "optimizer": "adamw", "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "constant",
                  "shuffle": False, "log_every": 1, "progress": False, "layout": "packed", "precision": "bf16",
                  "save_every": 10_000},
        "reference": {"mode": "model", "store_dir": str(workdir / "store")},
    }
    for key, value in case.overrides.items():
        section, name = key.split(".", 1)
        cfg[section] = {**cfg.get(section, {}), name: value}
    return cfg


def planned_peak(cfg: dict[str, Any], gpu_memory: float) -> float:
    """``dpokit plan``'s per-GPU peak for this config on one GPU of ``gpu_memory`` bytes."""
    from dpokit.plan import plan

    return float(plan(cfg, gpu_memory=gpu_memory, gpus=1).memory.peak)


# ------------------------------------------------------------------------------------------------ the children

def one_process_group() -> dict[str, str]:
    """The environment ``torchrun --nproc_per_node 1`` gives its process (dpokit reads RANK and WORLD_SIZE)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def child_main(spec_path: str) -> int:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("process_group"):
        os.environ.update(spec["process_group"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if spec["kind"] == "dpokit":
        result = dpokit_child(spec)
        result["peak_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    else:
        result = trl_run(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_one(kind: str, spec: dict[str, Any], workdir: Path, tag: str, timeout: float) -> dict[str, Any] | str:
    """A child run; its result, or the last lines of its log when it failed."""
    spec = {**spec, "kind": kind, "name": tag, "run_dir": str(workdir / f"run-{tag}"),
            "result": str(workdir / f"{tag}.json")}
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_child(Path(__file__), ["--child", str(spec_path)], workdir / f"{tag}.log", timeout=timeout)
    result = Path(spec["result"])
    if proc["rc"] != 0 or not result.exists():
        lines = (workdir / f"{tag}.log").read_text(errors="replace").strip().splitlines()[-3:]
        return f"exit {proc['rc']}: " + " / ".join(lines)[:300]
    return json.loads(result.read_text())


# ------------------------------------------------------------------------------------------------------ a row

def measure(report: Report, case: Case, run: dict[str, Any], system: str, flops_per_step: list[float],
            sizes: Sizes, peak_tflops: float, planned: float | None) -> float | None:
    """One system's figures for a row; returns its tokens/s (None when the run failed)."""
    label = f"{case.name}: {system}"
    if isinstance(run, str):
        report.add(case.name, f"{label} tokens/s", "failed", status="FAIL", note=run)
        return None
    steps = run["steps"]
    summary = timed_summary(steps, warmup=sizes.warmup)
    seconds = summary["s_per_step"] * summary["timed_steps"]
    flops = sum(flops_per_step[sizes.warmup:sizes.warmup + summary["timed_steps"]])
    report.add(case.name, f"{label} tokens/s", summary["tokens_per_s"],
               note=f"{summary['timed_steps']} steps after {sizes.warmup}, {sizes.batch} pairs a step")
    report.add(case.name, f"{label} MFU", mfu(flops, seconds, peak_tflops),
               note="FLOPs the step needs (gpu_scale_parts.pair_flops) / measured bf16 peak")
    peak = run.get("peak_bytes")
    if peak is not None:
        report.add(case.name, f"{label} peak GPU memory, GiB", peak / 2**30)
        if planned is not None:
            report.add(case.name, f"{label} dpokit plan / measured peak", planned / peak,
                       note="issue's bar: within 0.9-1.1")
    return summary["tokens_per_s"]


def run_case(report: Report, case: Case, device: Any, workdir: Path, sizes: Sizes, peak_tflops: float,
             self_test: bool) -> None:
    import torch

    from dpokit.models.loading import tiny_tokenizer

    shape = TINY if self_test else find_shape(case.shape)
    folder = workdir / f"model-{shape.name}"
    if not (folder / "config.json").exists():
        start = time.perf_counter()
        params = write_random_model(shape, folder, device)
        report.add(case.name, f"{shape.name} parameters (random, bf16 files)", params,
                   note=f"written in {time.perf_counter() - start:.0f} s")
    data = workdir / "pairs.jsonl"
    if not data.exists():
        n = sizes.steps * sizes.batch
        write_jsonl(make_pairs(tiny_tokenizer(), n, seed=0, prompt_tokens=sizes.prompt,
                               response_tokens=sizes.response), data)
    lengths = pair_lengths(data, folder, sizes.max_length, sizes.max_length // 2)
    reference = case.overrides.get("reference.mode", "model") in ("model", "adapter")
    per_pair = [pair_flops(shape, p, c, r, case.trained, reference) for p, c, r in lengths]
    per_step = [sum(per_pair[k * sizes.batch:(k + 1) * sizes.batch]) for k in range(sizes.steps)]
    cfg = base_config(case, folder, data, sizes, workdir)
    gpu_memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 80 * 2**30
    planned = planned_peak(cfg, gpu_memory)
    report.add(case.name, f"{case.name}: dpokit plan peak, GiB", planned / 2**30)
    timeout = 120 if self_test else 420
    tag = case.name.split(",")[0].replace(" ", "-").lower()
    spec: dict[str, Any] = {"config": cfg}
    if case.single_process_group:
        spec["process_group"] = one_process_group()
    ours = measure(report, case, run_one("dpokit", spec, workdir, tag, timeout), "dpokit", per_step, sizes,
                   peak_tflops, planned if device.type == "cuda" else None)
    if not case.trl:
        return
    why_not = trl_available()
    if why_not:
        report.skip(case.name, f"{case.name}: TRL DPOTrainer", why_not)
        return
    trl_spec = {"model": str(folder), "data": str(data), "hf_cache": str(workdir / "hf-cache"),
                "batch_size": sizes.batch, "steps": sizes.steps, "max_length": sizes.max_length,
                "trained": case.trained, "device": device.type}
    theirs = measure(report, case, run_one("trl", trl_spec, workdir, f"trl-{tag}", timeout), "TRL", per_step,
                     sizes, peak_tflops, None)
    if ours and theirs:
        report.add(case.name, f"{case.name}: dpokit / TRL tokens/s", ours / theirs,
                   note="the issue's bar for 1B full: >= 2")


# ---------------------------------------------------------------------------------------------------- running

def self_test_logic(report: Report) -> None:
    """The FLOP count by hand on a case small enough to add up, and the folder writer against transformers."""
    import torch

    # 1 layer, hidden 4, 2 heads of 2 (q width 4), kv 1 head of 2, MLP 8, vocab 10: layer params =
    # q 16 + k 8 + v 8 + o 16 + MLP 3*32 + 2 norms of 4 = 152. Pair (p, c, r) = (2, 1, 1): positions 4,
    # responses 2, entries 3 + 2 + 1 + 2 + 1 = 9.
    from dpokit.plan.shapes import Shape

    small = Shape("hand", hidden=4, layers=1, heads=2, kv_heads=1, intermediate=8, vocab=10, tied=True)
    want = 6 * 152 * 4 + 6 * 40 * 2 + 3 * 4 * 1 * 4 * 9  # full, no reference
    report.check("self", "pair FLOPs by hand (full)", abs(pair_flops(small, 2, 1, 1, "full", False) - want), 0.0)
    want_ref = 4 * 152 * 4 + 4 * 40 * 2 + 3 * 144 + 2 * 152 * 4 + 2 * 40 * 2 + 144  # adapters + reference
    report.check("self", "pair FLOPs by hand (adapters, reference)",
                  abs(pair_flops(small, 2, 1, 1, "adapters", True) - want_ref), 0.0)
    report.check("self", "MFU arithmetic: 1.2e12 FLOPs in 1 s on a 2.4 TFLOP/s peak is 0.5",
                 abs(mfu(1.2e12, 1.0, 2.4) - 0.5), 1e-12)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        params = write_random_model(TINY, Path(tmp), torch.device("cpu"), shard_bytes=20_000)
        model = AutoModelForCausalLM.from_pretrained(tmp)
        shards = len(list(Path(tmp).glob("model-*.safetensors")))
        same = params == sum(p.numel() for p in model.parameters()) == TINY.params()
        report.verify("self", "random folder: loads with transformers, planner's parameter count, sharded",
                      same and shards > 1, f"{params} parameters in {shards} files")


def run(report: Report, device: Any, workdir: Path, self_test: bool, cases: tuple[Case, ...]) -> None:
    import torch

    sizes = Sizes(self_test)
    report.info.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       torch=torch.__version__, mode="self-test (CPU, tiny shapes)" if self_test else "GPU scale",
                       run=f"{sizes.batch} pairs a step, max_length {sizes.max_length}, {sizes.timed} timed steps")
    peak = matmul_peak_tflops(device, sizes.peak_size, 0.5 if self_test else 3.0)
    report.add("peak", f"bf16 matmul peak ({sizes.peak_size}x{sizes.peak_size}), TFLOP/s", peak, note="measured now")
    for case in cases:
        run_case(report, case, device, workdir, sizes, peak, self_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the figures table here (.json: JSON, else Markdown)")
    parser.add_argument("--self-test", action="store_true", help="the same logic on CPU, tiny shapes")
    parser.add_argument("--extra", action="store_true", help="also 3B full and 8B full with offload")
    parser.add_argument("--only", default=None, help="one row, by name (e.g. '8B QLoRA')")
    parser.add_argument("--workdir", default=None, help="keep models, data, runs and logs here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not args.self_test and not torch.cuda.is_available():
        print("gpu_scale: no CUDA device here; run it on a GPU machine, or --self-test to check its logic on CPU")
        return 2
    cases = CASES + (EXTRA if args.extra or args.self_test else ())
    if args.only:
        cases = tuple(c for c in cases if c.name.lower().startswith(args.only.lower()))
        if not cases:
            print(f"gpu_scale: --only {args.only!r} names no row; rows: " + ", ".join(c.name for c in CASES + EXTRA))
            return 2
    device = torch.device("cpu" if args.self_test else "cuda")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpokit-gpu-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["DPOKIT_CACHE"] = str(workdir / "cache")  # the children's data caches stay in the workdir
    report = Report("dpokit at real model shapes")
    start = time.perf_counter()
    try:
        if args.self_test:
            torch.set_num_threads(1)
            self_test_logic(report)
        run(report, device, workdir, args.self_test, cases)
    finally:
        report.info["wall_s"] = round(time.perf_counter() - start, 1)
        print()
        print(report.markdown())
        if args.out:
            report.write(Path(args.out))
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if report.failed:
        print(f"gpu_scale: {len(report.failed)} check(s) failed: " + "; ".join(f.name for f in report.failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
