"""dpokit on a GPU: equivalence checks, a 2-GPU FSDP run, and bf16 throughput with MFU, in one invocation.

    python benchmarks/gpu_check.py --out gpu_check.md     # on a CUDA machine: under 8 minutes on one H100
    python benchmarks/gpu_check.py --self-test            # anywhere: the same logic on CPU, tiny model, < 1 min

Without a CUDA device and without ``--self-test`` it prints one line and exits 2: there is nothing to measure.

What runs on a GPU (``--out`` gets the figures table, Markdown, or JSON when the name ends in ``.json``):

(a) equivalence, fp32 (TF32 off), random Llama models built from a config (no download):
    - packed layout == padded layout: per-response log-probs and the gradient of their sum;
    - FlexAttention with the packed layout's ``BlockMask`` == SDPA with its dense mask: values and gradients;
    - bf16 autocast tracks fp32: the DPO loss over a few AdamW steps on a fixed batch, reference == policy at
      step 1 (loss exactly ln 2 in both), then the two curves within a first-order bf16 round-off bound;
(b) with >= 2 GPUs: ``torchrun`` 2 processes of ``dpokit train`` with ``distributed.strategy: fsdp`` against 1
    process with the same global batch: step-1 loss and gradient norm (skipped, with a line, on 1 GPU);
(c) throughput in bf16 on a random model of SmolLM2-135M's shape (no download; dpokit's tiny tokenizer): dpokit
    (packed layout, FlexAttention when usable, else SDPA) and, if ``trl`` imports, TRL's DPOTrainer on the same
    model, pairs and batch. MFU = 6 * parameters * trained tokens/s / peak, the peak being a bf16 matrix
    product (8192 x 8192) measured in the same run; 6 * params * tokens is the assumption (attention's own
    FLOPs and the response-only head are not counted separately).

Every tolerance is a round-off bound derived in ``logps_rtol``, ``grad_rtol`` and ``bf16_loss_bound``
(``gpu_check_equivalence.py``, with the checks of (a); the figures table is ``gpu_check_report.py``).
Each throughput run is a child process (``--child``), as in ``compare_trl.py``; the FSDP runs are ``torchrun``
children. Nothing here needs ``datasets``, ``gguf`` or ``trl`` except the TRL run, which is skipped without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
    make_pairs,
    run_child,
    timed_summary,
    trl_trainer,
    write_jsonl,
)
from gpu_check_equivalence import (  # noqa: E402
    BETA,
    build_model,
    check_bf16_tracking,
    check_flex,
    check_layouts,
    grad_rtol,
    logps_rtol,
    random_groups,
)
from gpu_check_report import Report  # noqa: E402

NOT_ON_DEVICE = ("datasets", "gguf", "trl")
"""Packages the GPU machine lacks; the self-test runs its children with these imports blocked (trl excepted
where the TRL run itself is meant)."""


# ------------------------------------------------------------------------------------------- (b) FSDP, 2 GPUs

def fsdp_plan(device_count: int) -> str:
    """'' when the FSDP check runs, else the line saying why not."""
    if device_count < 2:
        return f"needs >= 2 CUDA devices, this machine has {device_count}"
    return ""


def torchrun_command(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "dpokit", "train", str(config), *overrides]


def check_fsdp(report: Report, workdir: Path, device_count: int, model_dir: Path, data: Path) -> None:
    why = fsdp_plan(device_count)
    if why:
        report.skip("b", "FSDP 2 processes == 1 process (step 1)", why)
        return
    import yaml

    rows = {}
    for nproc, batch in ((2, 4), (1, 8)):
        run = workdir / f"fsdp-{nproc}"
        cfg = dpokit_config(str(data), str(model_dir), 3, batch, 1e-5, BETA, 512, 256, 0,
                            str(workdir / "store-fsdp"), layout="packed", precision="fp32",
                            reference_mode="model")
        cfg["model"]["attn_implementation"] = "sdpa"
        cfg["distributed"] = {"strategy": "fsdp"}
        cfg["run_dir"] = str(run)
        path = workdir / f"fsdp-{nproc}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = workdir / f"fsdp-{nproc}.log"
        with open(log, "w") as fh:
            proc = subprocess.run(torchrun_command(nproc, path, []), stdout=fh, stderr=subprocess.STDOUT,
                                  cwd=str(ROOT), env=_child_env(), timeout=300, check=False)
        if proc.returncode != 0:
            report.add("b", f"FSDP run, {nproc} process(es)", f"exit {proc.returncode}", status="FAIL",
                       note=f"see {log}")
            return
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[nproc] = [m for m in metrics if m.get("split") == "train"]
    one, two = rows[1][0], rows[2][0]
    # |d loss / d margin| <= beta; at step 1 policy == reference, so the four log-probs of the margin are the
    # mean chosen and rejected ones twice; each moves by at most width*u relative (logps_rtol).
    four = 2 * (abs(one["logps/chosen"]) + abs(one["logps/rejected"]))
    report.check("b", "FSDP: step-1 loss, 2 x batch 4 vs 1 x batch 8", abs(two["loss"] - one["loss"]),
                 BETA * logps_rtol(512) * four, "bound: beta * width*u * sum of the four |logps|")
    # A packed row holds at most prompt + chosen + rejected <= 2 * max_length positions; 8 pairs in all.
    width = 2 * 512
    for key in ("logps/chosen", "logps/rejected"):
        report.check("b", f"FSDP: step-1 {key}, relative difference", abs(two[key] - one[key]) / abs(one[key]),
                     logps_rtol(width), "bound: width*u (logps_rtol)")
    report.check("b", "FSDP: step-1 grad norm, relative difference",
                 abs(two["grad_norm"] - one["grad_norm"]) / one["grad_norm"], grad_rtol(8 * width),
                 "bound: positions*u (grad_rtol), 8 pairs of at most 1024 positions")
    report.add("b", "FSDP: loss per step (2 procs / 1 proc)",
               " ".join(f"{a['loss']:.5f}/{b['loss']:.5f}" for a, b in zip(rows[2], rows[1])))


# ------------------------------------------------------------------------------------------- (c) throughput

def matmul_peak_tflops(device: Any, size: int, seconds: float) -> float:
    """Best-of bf16 TFLOP/s of (size x size) @ (size x size) on ``device`` (``dpokit.models.hardware.matmul_gflops``:
    2*size^3 FLOPs per product, each product synchronized, so at 8192 the launch is under 0.1% of it)."""
    import torch

    from dpokit.models.hardware import matmul_gflops

    return matmul_gflops(device, torch.bfloat16, size, seconds) / 1000


def mfu(params: int, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilization under the 6 * params * tokens assumption (forward 2, backward 4 FLOPs per
    parameter per trained token)."""
    return 6 * params * tokens_per_s / (peak_tflops * 1e12) if peak_tflops > 0 else float("nan")


def trl_available() -> str:
    """'' when TRL imports, else why not."""
    try:
        import trl  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"trl does not import ({type(exc).__name__}: {str(exc)[:80]})"
    return ""


def save_model_folder(shape: str, folder: Path) -> int:
    """A random model of ``shape`` and dpokit's tiny tokenizer as a Hugging Face folder; returns the parameter
    count (tied embeddings counted once)."""
    from dpokit.models.loading import tiny_tokenizer

    model = build_model(shape)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def trl_child(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer in bf16 on the GPU (reference model online), steps timed by a callback."""
    return {"steps": timed_trl_steps(trl_trainer(spec, beta=BETA, bf16=True, seed=0))}


def timed_trl_steps(trainer: Any) -> list[dict[str, Any]]:
    """Train ``trainer`` (a TRL trainer) and return each optimizer step's end time (from the first step's end,
    the device synchronized first) and its non-padding tokens, counted on the batches its collator builds."""
    import torch
    from transformers import TrainerCallback

    tokens: list[int] = []
    collate = trainer.data_collator

    def counting_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = collate(examples)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    trainer.data_collator = counting_collator
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer.add_callback(StepTimer())
    trainer.train()
    return [{"step": i + 1, "elapsed_s": end - ends[0], "tokens": tokens[i]} for i, end in enumerate(ends)]


def throughput(report: Report, device: Any, workdir: Path, shape: str, steps: int, batch_size: int,
               peak_size: int, block_imports: bool) -> None:
    from dpokit.models.attention import flex_attention_supported
    from dpokit.models.loading import tiny_tokenizer

    peak = matmul_peak_tflops(device, peak_size, 3.0 if device.type == "cuda" else 0.5)
    report.add("c", f"bf16 matmul peak ({peak_size}x{peak_size}), TFLOP/s", peak, note="measured now")
    folder = workdir / f"model-{shape}"
    params = save_model_folder(shape, folder)
    report.add("c", f"model parameters ({shape}, random weights)", params)
    data = workdir / "pairs.jsonl"
    write_jsonl(make_pairs(tiny_tokenizer(), (steps + 2) * batch_size, seed=0), data)
    attn = "flex_attention" if flex_attention_supported(device) else "sdpa"
    warmup = 2  # the first steps compile (FlexAttention: a static shape, then a dynamic one)
    cfg = dpokit_config(str(data), str(folder), steps + warmup, batch_size, 1e-6, BETA, 512, 256, 0,
                        str(workdir / "store"), layout="packed", precision="bf16", reference_mode="store",
                        pack_length=2048 if device.type == "cuda" else 0)
    cfg["model"]["attn_implementation"] = attn
    runs = {f"dpokit (bf16, packed, {attn}, reference store)": ("dpokit", {"config": cfg})}
    why_not_trl = trl_available()
    if why_not_trl:
        report.skip("c", "TRL DPOTrainer tokens/s (bf16)", why_not_trl)
    elif device.type != "cuda":
        report.skip("c", "TRL DPOTrainer tokens/s (bf16)", "TRL runs on the GPU only here")
    else:
        runs["TRL DPOTrainer (bf16, reference model online)"] = (
            "trl", {"model": str(folder), "data": str(data), "hf_cache": str(workdir / "hf-cache"),
                    "batch_size": batch_size, "steps": steps + warmup, "lr": 1e-6, "max_length": 512})
    speeds = {}
    for label, (kind, spec) in runs.items():
        tag = kind
        spec = {**spec, "kind": kind, "name": tag, "run_dir": str(workdir / f"run-{tag}"),
                "result": str(workdir / f"{tag}.json"), "block_imports": block_imports and kind == "dpokit"}
        spec_path = workdir / f"{tag}.spec.json"
        spec_path.write_text(json.dumps(spec))
        proc = run_child(Path(__file__), ["--child", str(spec_path)], workdir / f"{tag}.log", timeout=420)
        result = Path(spec["result"])
        if proc["rc"] != 0 or not result.exists():
            log = (workdir / f"{tag}.log").read_text(errors="replace").strip().splitlines()[-3:]
            report.add("c", f"{label} tokens/s", f"exit {proc['rc']}", status="FAIL", note=" / ".join(log)[:300])
            continue
        summary = timed_summary(json.loads(result.read_text())["steps"], warmup=warmup)
        speeds[kind] = summary["tokens_per_s"]
        report.add("c", f"{label} tokens/s", summary["tokens_per_s"],
                   note=f"{summary['timed_steps']} timed steps after {warmup}, batch {batch_size} pairs")
        report.add("c", f"{label} MFU", mfu(params, summary["tokens_per_s"], peak),
                   note="6*params*tokens/s over the measured bf16 matmul peak")
    if "trl" in speeds and "dpokit" in speeds:
        report.add("c", "dpokit / TRL tokens/s", speeds["dpokit"] / speeds["trl"])


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("block_imports"):
        block_imports(NOT_ON_DEVICE)
    result = dpokit_child(spec) if spec["kind"] == "dpokit" else trl_child(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def block_imports(names: tuple[str, ...]) -> None:
    """Make ``import NAME`` fail in this process, as on a machine without those packages."""
    import importlib.abc

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
            if fullname.split(".")[0] in names:
                raise ImportError(f"{fullname} is not installed here (blocked by gpu_check)")
            return None

    sys.meta_path.insert(0, Blocker())


def _child_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONUNBUFFERED="1")


# ---------------------------------------------------------------------------------------------------- running

def run(report: Report, device: Any, workdir: Path, self_test: bool, skip_throughput: bool = False) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the equivalence checks
    torch.backends.cudnn.allow_tf32 = False
    report.info.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       torch=torch.__version__, mode="self-test (CPU, tiny model)" if self_test else "GPU check")
    if self_test:
        shape, groups, pack = "tiny", random_groups(10, 512, (2, 40), (1, 30)), 150
        track = dict(steps=3, lr=1e-3)
        fsdp_devices = 0
        through = dict(shape="tiny", steps=2, batch_size=4, peak_size=256)
    else:
        shape, groups, pack = "small", random_groups(48, 512, (8, 300), (1, 200)), 1024
        track = dict(steps=6, lr=3e-4)
        fsdp_devices = torch.cuda.device_count()
        through = dict(shape="smollm2-135m", steps=10, batch_size=32, peak_size=8192)
    check_layouts(report, device, shape, groups, pack)
    check_flex(report, device, shape, groups, pack)
    check_bf16_tracking(report, device, shape, groups[:8], pack, **track)
    if fsdp_devices >= 2:
        folder, data = workdir / "model-fsdp", workdir / "pairs-fsdp.jsonl"
        save_model_folder("small", folder)
        from dpokit.models.loading import tiny_tokenizer

        write_jsonl(make_pairs(tiny_tokenizer(), 24, seed=1), data)
        check_fsdp(report, workdir, fsdp_devices, folder, data)
    else:
        report.skip("b", "FSDP 2 processes == 1 process (step 1)", fsdp_plan(fsdp_devices))
    if skip_throughput:
        report.skip("c", "throughput", "--skip-throughput")
    else:
        throughput(report, device, workdir, block_imports=self_test, **through)


def self_test_logic(report: Report) -> None:
    """Checks of this script's own pieces that no device run would reach on this machine."""
    report.check("self", "MFU arithmetic: 1e8 params at 1e3 tokens/s on a 1.2 TFLOP/s peak is 0.5",
                 abs(mfu(10**8, 1e3, 1.2) - 0.5), 1e-12)
    report.verify("self", "skip logic: 1 GPU skips FSDP", "needs >= 2" in fsdp_plan(1))
    report.verify("self", "skip logic: 2 GPUs run FSDP", fsdp_plan(2) == "")
    command = torchrun_command(2, Path("c.yaml"), [])
    report.verify("self", "torchrun command", command[1:3] == ["-m", "torch.distributed.run"]
                  and "--nproc_per_node" in command and command[-3:] == ["dpokit", "train", "c.yaml"])
    trl_line = trl_available()
    report.verify("self", "trl detection answers", trl_line == "" or "trl" in trl_line, trl_line or "trl imports")
    sample = Report()
    sample.add("x", "a|b", 1.5, 2.0, "pass")
    with tempfile.TemporaryDirectory() as tmp:
        md, js = Path(tmp) / "t.md", Path(tmp) / "t.json"
        sample.write(md)
        sample.write(js)
        ok = "| x | a\\|b | 1.5 | 2 | pass |" in md.read_text() and json.loads(js.read_text())["figures"][0]["value"] == "1.5"
    report.verify("self", "table writer (Markdown and JSON)", ok)
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_check; gpu_check.block_imports("
            "gpu_check.NOT_ON_DEVICE); import dpokit, dpokit.training.setup, dpokit.models.attention, dpokit.models.logprobs")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True,
                          env=_child_env(), timeout=120, check=False)
    report.verify("self", "dpokit imports without datasets, gguf, trl", proc.returncode == 0,
                  proc.stderr.strip().splitlines()[-1][:200] if proc.returncode else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the figures table here (.json: JSON, else Markdown)")
    parser.add_argument("--self-test", action="store_true", help="check this script's logic on CPU, tiny model")
    parser.add_argument("--skip-throughput", action="store_true", help="only the equivalence and FSDP checks")
    parser.add_argument("--workdir", default=None, help="keep models, data, runs and logs here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not args.self_test and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or --self-test to check its logic on CPU")
        return 2
    device = torch.device("cpu" if args.self_test else "cuda")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpokit-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report()
    start = time.perf_counter()
    try:
        if args.self_test:
            torch.set_num_threads(1)  # tiny models: threads only add spin-waits on a shared CPU
            self_test_logic(report)
        run(report, device, workdir, args.self_test, args.skip_throughput)
    finally:
        report.info["wall_s"] = round(time.perf_counter() - start, 1)
        print()
        print(report.markdown())
        if args.out:
            report.write(Path(args.out))
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if report.failed:
        print(f"gpu_check: {len(report.failed)} check(s) failed: " + "; ".join(f.name for f in report.failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
