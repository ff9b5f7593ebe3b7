"""How close two runs that are equal in exact arithmetic must be in fp32, on any CPU or GPU.

Two mathematically equal computations (batch 8 vs 8 micro-batches of 1, 1 rank vs 2, packed vs padded, ...)
add the same terms in a different order, and which order a kernel uses depends on the hardware (AVX-512,
AVX2 or scalar kernels block their sums differently). fp32 rounds each operation to a relative
``EPS32 / 2 ~ 6e-8``, so a sum of n terms of size |x| differs by at most ~n * EPS32 / 2 * |x| (typically
sqrt(n) times that). The bounds below follow from that, and from what AdamW does with a difference that small.
"""

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: twice the unit round-off

# The logged per-step metrics (loss, grad_norm, rewards, logps) are means over <= 21 pairs of sums over <= 64
# tokens of log-softmaxes over the 512-token vocabulary: each a sum of a few hundred fp32 terms of size ~|value|,
# so two summation orders differ by ~sqrt(300) * EPS32 / 2 * |value| ~ 1e-6 * |value| (measured: <= 4e-7 with
# AVX-512, AVX2 and scalar kernels). From step 2 on the weights differ too, but only in the elements AdamW may
# flip (see below): their gradient is round-off sized, so they change the loss only at second order. 1e-5
# relative (absolute below 1) leaves 10x for that, and a real error (a dropped pair, a wrong normalization,
# a wrong reference) changes these metrics by 1e-2 or more.
METRIC_REL = 1e-5


def assert_same_metrics(rows_a: list[dict], rows_b: list[dict], keys, rel: float = METRIC_REL) -> None:
    """Row by row (the same steps), each key within ``rel * max(1, |value|)``."""
    assert [(r["split"], r["step"]) for r in rows_a] == [(r["split"], r["step"]) for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        for key in keys:
            if key in a or key in b:
                assert abs(a[key] - b[key]) <= rel * max(1.0, abs(a[key])), (a["split"], a["step"], key,
                                                                              a[key], b[key])


def adam_update_bound(step: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """max |m_hat / (sqrt(v_hat) + eps)| at optimizer step ``step`` (1-based), whatever the gradients were.

    Cauchy-Schwarz on m_t = (1-b1) sum_k b1^k g_{t-k} against v_t = (1-b2) sum_k b2^k g_{t-k}^2 gives
    |m_hat| / sqrt(v_hat) <= (1-b1)/(1-b1^t) * sqrt(sum_{k<t} (b1^2/b2)^k) * sqrt((1-b2^t)/(1-b2)):
    exactly 1 at step 1 (the update is lr * sign(g)), 1.0009 at step 2, 1.0037 at step 3, ~1.03 at step 10.
    """
    b1, b2 = betas
    geometric = sum((b1 * b1 / b2) ** k for k in range(step))
    return (1 - b1) / (1 - b1 ** step) * math.sqrt(geometric) * math.sqrt((1 - b2 ** step) / (1 - b2))


def assert_same_weights_after_adamw(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor], lr: float,
                                    steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> None:
    """Final weights of two runs whose gradients agree to fp32 round-off, after ``steps`` AdamW steps at a
    constant ``lr`` without weight decay.

    Every element: AdamW moves an element by lr * m_hat / (sqrt(v_hat) + eps), which is ~lr * sign(g) once
    |g| >> eps = 1e-8. For an element whose gradient is itself round-off sized (terms that nearly cancel), the
    two runs' round-off decides the sign, and their updates may differ by up to twice the largest update:
    |dw| <= 2 * lr * sum_t adam_update_bound(t) (plus the rounding of the weights themselves). That bound holds
    for any gradients, so it holds on any hardware; it is what is left of a 1e-5 atol once one element flips.

    Most elements: where |g| is far above its round-off, the two runs' gradients agree to ~1e-6 relative and
    m_hat / sqrt(v_hat) (scale-free in g) to about the same, so their updates agree to ~1e-6 * lr per step.
    ``tight = lr / 100`` leaves room for gradients only 1e4 times their round-off; elements closer to a tie are
    rare (measured: <= 2 of 106,816 above lr / 1000 on AVX-512, AVX2 and scalar kernels; 1 on the AVX2 machine
    of issue 13). At most 0.1% may exceed it. A real difference in the gradients (a dropped micro-batch, a
    wrong reference, a mis-averaged rank) moves thousands of elements by more than lr / 100 within a few steps.
    """
    assert wa.keys() == wb.keys()
    bound = 2 * lr * sum(adam_update_bound(t, betas) for t in range(1, steps + 1))
    tight = lr / 100
    loose, total = 0, 0
    for name in wa:
        diff = (wa[name].double() - wb[name].double()).abs()
        slack = steps * EPS32 * wa[name].abs().max().item()  # each step rounds the stored weight once
        assert diff.max().item() <= bound + slack, (name, diff.max().item(), bound)
        loose += int((diff > tight).sum())
        total += diff.numel()
    assert loose <= 1e-3 * total, f"{loose} of {total} weights differ by more than lr/100 = {tight:g}"


# Summed response log-probs (fp32, |logp| <= ~50 here): the same per-token log-softmaxes computed on other
# shapes (batch neighbours, padding side, packed rows, vocabulary chunks, the fused head) round differently.
# Each token's value carries a few ulps of its logits (|logit| ~ 5, ulp ~5e-7) and the sum of n <= 16 tokens adds
# n * EPS32 / 2 * |sum| (<= 5e-5 at |sum| = 50; the ulp of 50 alone is 3.8e-6, and 2-4e-6 is what AVX-512,
# AVX2 and scalar kernels give). A bug here (a prompt token counted, a shifted target, a padding leak)
# moves a value by ~1 or more.
LOGP_TOL = {"atol": 1e-5, "rtol": 1e-6}
# Gradients of those sums (|g| <= ~5): each element adds <= ~40 positions' products of size <= |g|; with
# sqrt(n) error growth that is ~sqrt(40) * EPS32 / 2 * 5 ~ 2e-6 (measured <= 2.2e-6 under all three kernel
# sets). atol 1e-5 covers elements that cancel to ~0, rtol 1e-4 the largest ones; a wrong backward (a missing
# term, a wrong sign) is wrong by the size of a term.
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-4}
