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

Every tolerance is a round-off bound derived in ``logps_rtol``, ``grad_rtol`` and ``bf16_loss_bound``.
Each throughput run is a child process (``--child``), as in ``compare_trl.py``; the FSDP runs are ``torchrun``
children. Nothing here needs ``datasets``, ``gguf`` or ``trl`` except the TRL run, which is skipped without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
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

U_FP32 = 2.0 ** -24
"""Unit round-off of fp32 (24-bit significand): a correctly rounded operation has relative error <= u."""
U_BF16 = 2.0 ** -8
"""Unit round-off of bf16 (8-bit significand)."""
BETA = 0.1
NOT_ON_DEVICE = ("datasets", "gguf", "trl")
"""Packages the GPU machine lacks; the self-test runs its children with these imports blocked (trl excepted
where the TRL run itself is meant)."""

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                    rms_norm_eps=1e-5, rope_theta=100000.0)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=2048),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=2048),
    "smollm2-135m": SMOLLM2_135M,
}


# ---------------------------------------------------------------------------------------------------- tolerances

def logps_rtol(width: int) -> float:
    """Relative bound on the difference of a response's summed log-prob between two fp32 computations that
    differ only in the order of additions inside attention (another kernel, another layout).

    Each query's softmax normalizer and weighted sum add at most ``width`` terms; a sum of n fp32 terms in
    another order differs by at most ~n*u times the sum of the terms' magnitudes (Higham, Accuracy and
    Stability of Numerical Algorithms, eq. 4.4), and a softmax-weighted sum's terms add up in magnitude to at
    most the largest value, so an attention output moves by at most width*u relative. The rest of the model
    is the same fp32 code; RMSNorm and the small random weights pass a relative perturbation on without
    amplifying it, so each token's log-prob moves by at most width*u*|log p_t| and a response's sum by
    width*u*sum_t |log p_t| = width*u*|logps| (every log p_t <= 0). A wrong mask moves log-probs by ~0.1-1."""
    return width * U_FP32


def grad_rtol(positions: int) -> float:
    """Relative bound on the norm of the difference of two fp32 gradients of the same loss.

    A weight's gradient is a sum over all computed positions of per-position products (the backward matrix
    products reduce over positions), so two layouts or kernels that group those ``positions`` terms
    differently differ by at most ~positions*u times the sum of their magnitudes (the same bound as above).
    The loss here is the sum of every response's log-prob, and at a random initialization the per-position
    contributions to one weight do not cancel to far below their magnitudes, so the sum of magnitudes is taken
    as the gradient's own size: ||g1 - g2|| <= positions*u*||g1||, plus the width*u of the attention outputs
    the backward starts from (``logps_rtol``), which positions already exceeds."""
    return positions * U_FP32


def bf16_loss_bound(abs_logps_sum: float, beta: float = BETA) -> float:
    """Bound on |loss_bf16 - loss_fp32| at one step, to first order.

    The sigmoid DPO loss -log sigmoid(beta * m) has |d loss / d m| = beta * sigmoid(-beta*m) <= beta, and the
    margin m is a signed sum of four summed log-probs (policy and reference, chosen and rejected). Under bf16
    autocast every matrix-product operand is rounded to 8 significant bits (relative error <= U_BF16 each,
    two operands per product, products accumulated in fp32, log-softmax in fp32), so each log-prob moves by
    about 2*U_BF16 relative to its magnitude, and m by 2*U_BF16 * (|pi_c| + |pi_r| + |ref_c| + |ref_r|) =
    2*U_BF16 * ``abs_logps_sum`` (the batch mean). First order only: the two runs' weights also drift apart
    through the optimizer, which is why the check covers a few steps, not a long run."""
    return beta * 2 * U_BF16 * abs_logps_sum


# ------------------------------------------------------------------------------------------------------- report

@dataclass
class Figure:
    section: str
    name: str
    value: str
    bound: str = ""
    status: str = "info"  # pass | FAIL | skip | info
    note: str = ""


class Report:
    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.info: dict[str, Any] = {}

    def add(self, section: str, name: str, value: Any, bound: Any = "", status: str = "info",
            note: str = "") -> Figure:
        figure = Figure(section, name, _fmt(value), _fmt(bound), status, note)
        self.figures.append(figure)
        print(f"[{section}] {name}: {figure.value}" + (f" (bound {figure.bound})" if figure.bound else "")
              + f" {status}" + (f" - {note}" if note else ""), flush=True)
        return figure

    def check(self, section: str, name: str, value: float, bound: float, note: str = "") -> bool:
        """``value <= bound`` (both finite) passes."""
        ok = math.isfinite(value) and value <= bound
        self.add(section, name, value, bound, "pass" if ok else "FAIL", note)
        return ok

    def verify(self, section: str, name: str, ok: bool, note: str = "") -> bool:
        """A yes/no check."""
        self.add(section, name, "yes" if ok else "no", status="pass" if ok else "FAIL", note=note)
        return ok

    def skip(self, section: str, name: str, why: str) -> None:
        self.add(section, name, "-", status="skip", note=why)

    @property
    def failed(self) -> list[Figure]:
        return [f for f in self.figures if f.status == "FAIL"]

    def markdown(self) -> str:
        lines = ["# dpokit GPU check", ""]
        lines += [f"- {key}: {value}" for key, value in self.info.items()]
        lines += ["", "| section | figure | value | bound | status | note |", "|---|---|---|---|---|---|"]
        for f in self.figures:
            cells = [f.section, f.name, f.value, f.bound, f.status, f.note]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        failed = len(self.failed)
        lines += ["", f"{len(self.figures)} figures, {failed} failed." if failed else
                  f"{len(self.figures)} figures, none failed."]
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            text = json.dumps({"info": self.info, "figures": [asdict(f) for f in self.figures],
                               "failed": len(self.failed)}, indent=2) + "\n"
        else:
            text = self.markdown()
        path.write_text(text, encoding="utf-8")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"
    return str(x)


# ------------------------------------------------------------------------------------------- models and batches

def build_model(shape: str, seed: int = 0, attn: str = "sdpa") -> Any:
    """A random Llama of a named shape, fp32, eval mode (no dropout), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpokit.models.loading import seeded_model

    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = seeded_model(LlamaForCausalLM, config, seed)
    model.config._attn_implementation = attn
    return model.eval()


def random_groups(n: int, vocab: int, prompt: tuple[int, int], response: tuple[int, int],
                  seed: int = 0) -> list[tuple[list[int], list[list[int]]]]:
    """``n`` (prompt, [chosen, rejected]) token-id pairs of uneven lengths, seeded."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    return [(ids(rng.randint(*prompt)), [ids(rng.randint(*response)), ids(rng.randint(*response))])
            for _ in range(n)]


def _logps_and_grads(model: Any, batch: dict[str, Any], grads: bool) -> tuple[Any, Any]:
    import torch

    from dpokit.data.batch import regroup
    from dpokit.models.logprobs import layout_logps

    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        logps, _ = layout_logps(model, batch)
        if grads:
            logps.sum().backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]) if grads else None
    return regroup(logps.detach(), batch), flat


def _compare(report: Report, section: str, what: str, a: tuple[Any, Any], b: tuple[Any, Any], width: int,
             positions: int) -> None:
    """Per-response log-probs within ``logps_rtol`` of each other, gradients within ``grad_rtol``."""
    worst = float(((a[0] - b[0]).abs() / b[0].abs().clamp(min=1e-30)).max())
    report.check(section, f"{what}: log-probs, max relative difference", worst, logps_rtol(width),
                 f"width {width}")
    if a[1] is not None and b[1] is not None:
        rel = float((a[1] - b[1]).norm() / b[1].norm())
        report.check(section, f"{what}: gradient, relative norm of difference", rel, grad_rtol(positions),
                     f"{positions} positions")


# ------------------------------------------------------------------------------------------------ (a) equivalence

def check_layouts(report: Report, device: Any, shape: str, groups: list[Any], pack_length: int) -> None:
    from dpokit.data.batch import collate_groups, to_device

    results, widths, positions = {}, [], []
    for layout in ("padded", "packed"):
        batch = to_device(collate_groups(groups, pad_id=0, layout=layout, pack_length=pack_length), device)
        results[layout] = _logps_and_grads(build_model(shape).to(device), batch, grads=True)
        widths.append(batch["input_ids"].shape[1])
        positions.append(batch["computed_positions"])
    _compare(report, "a", f"packed == padded ({shape}, fp32)", results["packed"], results["padded"],
             max(widths), max(positions))


def check_flex(report: Report, device: Any, shape: str, groups: list[Any], pack_length: int) -> None:
    from dpokit.data.batch import collate_groups, to_device
    from dpokit.models.attention import flex_attention_available, flex_attention_supported

    name = f"FlexAttention BlockMask == SDPA dense mask ({shape}, fp32)"
    if not flex_attention_available():
        report.skip("a", name, "this PyTorch has no torch.nn.attention.flex_attention")
        return
    grads = flex_attention_supported(device)  # CPU FlexAttention runs forward only
    batch = to_device(collate_groups(groups, pad_id=0, layout="packed", pack_length=pack_length), device)
    try:
        flex = _logps_and_grads(build_model(shape, attn="flex_attention").to(device), batch, grads)
    except Exception as exc:  # no compiler for Inductor, an unsupported device: say so, do not crash the run
        report.add("a", name, "-", status="FAIL" if device.type == "cuda" else "skip",
                   note=f"FlexAttention did not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return
    dense = _logps_and_grads(build_model(shape, attn="sdpa").to(device), batch, grads)
    _compare(report, "a", name, flex, dense, batch["input_ids"].shape[1], batch["computed_positions"])
    if not grads:
        report.skip("a", f"{name}: gradient", f"FlexAttention has no backward on {device.type}")


def check_bf16_tracking(report: Report, device: Any, shape: str, groups: list[Any], pack_length: int,
                        steps: int, lr: float) -> None:
    """A few AdamW steps of the sigmoid DPO loss on one fixed batch, in fp32 and under bf16 autocast, each
    against a frozen reference copy of the starting weights scored in the same precision."""
    import torch

    from dpokit.data.batch import collate_groups, regroup, to_device
    from dpokit.losses import sigmoid_loss
    from dpokit.models.logprobs import layout_logps

    batch = to_device(collate_groups(groups, pad_id=0, layout="packed", pack_length=pack_length), device)
    curves: dict[str, list[float]] = {}
    magnitude: list[float] = []
    for precision in ("fp32", "bf16"):
        policy = build_model(shape).to(device)
        reference = build_model(shape).to(device).requires_grad_(False)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        curves[precision] = []
        for _ in range(steps):
            with autocast:
                pi = regroup(layout_logps(policy, batch)[0], batch)  # (G, 2)
                with torch.no_grad():
                    ref = regroup(layout_logps(reference, batch)[0], batch)
                loss = sigmoid_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], beta=BETA)[0].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            curves[precision].append(float(loss))
            if precision == "fp32":
                magnitude.append(float((pi.detach().abs().sum(1) + ref.abs().sum(1)).mean()))
    fp32, bf16 = curves["fp32"], curves["bf16"]
    ln2 = math.log(2)
    # Step 1: the reference is the policy, scored by the same code in the same precision, so the margin is 0
    # up to the order in which each response's token log-probs are added (``index_add`` uses atomics on CUDA):
    # at most width*u relative to the four summed log-probs (logps_rtol), times d loss / d margin = beta/2 at
    # margin 0; plus ln 2 rounded to fp32.
    width = batch["input_ids"].shape[1]
    for precision, curve in curves.items():
        report.check("a", f"bf16 tracking: step-1 loss - ln 2 ({precision})", abs(curve[0] - ln2),
                     ln2 * U_FP32 + BETA / 2 * logps_rtol(width) * magnitude[0], "policy == reference")
    worst = max(abs(a - b) / bf16_loss_bound(m) for a, b, m in zip(fp32, bf16, magnitude))
    report.check("a", f"bf16 tracking: max over {steps} steps of |loss gap| / bound", worst, 1.0,
                 f"bound = beta*2*u_bf16*sum|logps| (bf16_loss_bound), {bf16_loss_bound(magnitude[0]):.3g} at step 1")
    report.add("a", "bf16 tracking: loss fp32 / bf16", " ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(fp32, bf16)),
               note=f"{steps} steps, lr {lr}, fixed batch of {len(groups)} pairs")
    report.verify("a", "bf16 tracking: the fp32 loss fell", min(fp32[1:]) < fp32[0],
                  f"by {fp32[0] - min(fp32):.4f}: the steps did train")


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
    import torch
    from transformers import TrainerCallback

    trainer = trl_trainer(spec, beta=BETA, bf16=True, seed=0)
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
            torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer.add_callback(StepTimer())
    trainer.train()
    start = ends[0]
    return {"steps": [{"step": i + 1, "elapsed_s": end - start, "tokens": tokens[i]} for i, end in enumerate(ends)]}


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
