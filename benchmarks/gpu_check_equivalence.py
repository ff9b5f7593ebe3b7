"""Check (a) of ``gpu_check.py``: fp32 equivalence of the packed and padded layouts and of FlexAttention and
SDPA, and bf16 tracking fp32, each against a round-off bound derived here (``logps_rtol``, ``grad_rtol``,
``bf16_loss_bound``); random Llama models built from a config, no download."""

from __future__ import annotations

import math
import random
from typing import Any

from gpu_check_report import Report

U_FP32 = 2.0 ** -24
"""Unit round-off of fp32 (24-bit significand): a correctly rounded operation has relative error <= u."""
U_BF16 = 2.0 ** -8
"""Unit round-off of bf16 (8-bit significand)."""
BETA = 0.1
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


# ------------------------------------------------------------------------------------------- models and batches

def build_model(shape: str, seed: int = 0, attn: str = "sdpa") -> Any:
    """A random Llama of a named shape, fp32, eval mode (no dropout), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpokit.models.source import seeded_model

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
