"""PPO's math (dpokit.methods.ppo.core): golden values derived by hand with `math` and plain loops, limit cases,
gradient zeros where the clip is active, and the whitening statistics shared over (simulated) processes."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.testing import assert_close

from dpokit.methods.ppo.core import (
    KLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_per_token,
    masked_mean,
    masked_var,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)

# Exact-math claims in float64, as in test_losses.py: every tensor is float64 and every expected value comes from
# `math` or plain Python arithmetic (float64). The functions add a handful of terms and call exp/log/expm1, each
# correctly rounded to a few ulps (2.2e-16 relative), so assert_close's float64 defaults (rtol = atol = 1e-7)
# sit ~1e8 ulps above round-off, on any CPU, and far below what a wrong formula gives (values here are 1e-2..10).


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# A 2-row batch with different lengths: row 0 has 4 response tokens, row 1 has 2 then padding. The padding holds
# garbage (99) that every function must ignore.

MASK = t([[1, 1, 1, 1], [1, 1, 0, 0]])
REWARDS = [[0.5, -1.0, 2.0, 1.5], [1.0, 3.0, 99.0, 99.0]]
VALUES = [[0.2, 0.4, -0.3, 1.0], [0.5, -0.5, 99.0, 99.0]]
LENGTHS = [4, 2]


def gae_by_definition(gamma: float, lam: float) -> list[list[float]]:
    """A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V past the end = 0:
    the explicit sum (not the recursion the function uses), over real tokens only."""
    out = []
    for r, v, n in zip(REWARDS, VALUES, LENGTHS):
        delta = [r[k] + gamma * (v[k + 1] if k + 1 < n else 0.0) - v[k] for k in range(n)]
        row = [sum((gamma * lam) ** (k - s) * delta[k] for k in range(s, n)) for s in range(n)]
        out.append(row + [0.0] * (4 - n))
    return out


def test_gae_one_step_td_limit() -> None:
    # lam = 0: A_t = delta_t. With gamma = 1, by hand:
    # row 0: 0.5 + 0.4 - 0.2 = 0.7;  -1 + (-0.3) - 0.4 = -1.7;  2 + 1.0 - (-0.3) = 3.3;  1.5 + 0 - 1.0 = 0.5
    # row 1: 1 + (-0.5) - 0.5 = 0.0;  3 + 0 - (-0.5) = 3.5 (the token after the last is terminal: V = 0)
    advantages, returns = gae(t(REWARDS), t(VALUES), MASK, gamma=1.0, lam=0.0)
    assert_close(advantages, t([[0.7, -1.7, 3.3, 0.5], [0.0, 3.5, 0.0, 0.0]]))
    # returns = A + V = r_t + V_{t+1}, the TD target: row 0: 0.9, -1.3, 3.0, 1.5; row 1: 0.5, 3.0
    assert_close(returns, t([[0.9, -1.3, 3.0, 1.5], [0.5, 3.0, 0.0, 0.0]]))


def test_gae_monte_carlo_limit() -> None:
    # lam = 1, gamma = 1: the V_{t+1} terms telescope, A_t = (sum_{k >= t} r_k) - V_t.
    # row 0: rewards-to-go 3.0, 2.5, 3.5, 1.5 minus V 0.2, 0.4, -0.3, 1.0 = 2.8, 2.1, 3.8, 0.5
    # row 1: rewards-to-go 4.0, 3.0 minus V 0.5, -0.5 = 3.5, 3.5; returns are the rewards-to-go themselves.
    advantages, returns = gae(t(REWARDS), t(VALUES), MASK, gamma=1.0, lam=1.0)
    assert_close(advantages, t([[2.8, 2.1, 3.8, 0.5], [3.5, 3.5, 0.0, 0.0]]))
    assert_close(returns, t([[3.0, 2.5, 3.5, 1.5], [4.0, 3.0, 0.0, 0.0]]))
    # gamma = 0.95, lam = 1: the discounted return minus V. Row 1: 1 + 0.95 * 3 = 3.85 - 0.5 = 3.35; 3 + 0.5.
    advantages, _ = gae(t(REWARDS), t(VALUES), MASK, gamma=0.95, lam=1.0)
    assert_close(advantages[1, :2], t([3.35, 3.5]))


@pytest.mark.parametrize("gamma", [1.0, 0.95])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_the_explicit_sum(gamma: float, lam: float) -> None:
    advantages, returns = gae(t(REWARDS), t(VALUES), MASK, gamma=gamma, lam=lam)
    expected = gae_by_definition(gamma, lam)
    assert_close(advantages, t(expected))
    assert_close(returns, t([[a + v if m else 0.0 for a, v, m in zip(ra, rv, rm)]
                             for ra, rv, rm in zip(expected, VALUES, MASK.tolist())]))


def test_gae_rows_are_independent() -> None:
    # Row 1 alone, unpadded, gives the same advantages: padding ends an episode exactly like the end of the row.
    advantages, _ = gae(t(REWARDS), t(VALUES), MASK, gamma=0.95, lam=0.95)
    alone, _ = gae(t([REWARDS[1][:2]]), t([VALUES[1][:2]]), t([[1, 1]]), gamma=0.95, lam=0.95)
    assert_close(advantages[1, :2], alone[0])


# ---------------------------------------------------------------------------------------------------------------
# Masked statistics and whitening


def test_masked_mean_and_var_by_hand() -> None:
    x = t([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    # masked entries 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert_close(masked_mean(x, mask), t(2.5))
    assert_close(masked_var(x, mask), t(5 / 3))
    assert_close(masked_var(x, mask, unbiased=False), t(5 / 4))
    assert_close(masked_mean(x, mask.bool()), t(2.5))  # a bool mask works too


def test_whiten_by_hand_and_padding_ignored() -> None:
    x = t([[1.0, 2.0, 3.0, 99.0], [4.0, -7.0, 99.0, 99.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = whiten(x, mask)
    scale = math.sqrt(5 / 3 + 1e-8)
    assert_close(out[mask.bool()], t([(v - 2.5) / scale for v in (1.0, 2.0, 3.0, 4.0)]))
    # mean 0 and var 1 (exactly var / (var + eps)) over the masked entries
    assert_close(masked_mean(out, mask), t(0.0))
    assert_close(masked_var(out, mask), t((5 / 3) / (5 / 3 + 1e-8)))
    # other padding, same masked output
    garbage = torch.where(mask.bool(), x, t(-1e6))
    assert_close(whiten(garbage, mask)[mask.bool()], out[mask.bool()])
    # shift_mean=False keeps the mean: 2.5 + (x - 2.5) / scale
    kept = whiten(x, mask, shift_mean=False)
    assert_close(kept[mask.bool()], t([2.5 + (v - 2.5) / scale for v in (1.0, 2.0, 3.0, 4.0)]))
    assert_close(masked_mean(kept, mask), t(2.5))


def test_whiten_needs_two_entries() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        whiten(t([[1.0, 2.0]]), t([[1, 0]]))


class TwoRanks:
    """An all-reduce of two threads (the ``sums`` hook, as ``Dist.sum`` does over processes)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2)
        self.slots: list[list[float]] = [[], []]

    def hook(self, rank: int):
        def sums(values: list[float]) -> list[float]:
            self.slots[rank] = list(values)
            self.barrier.wait()
            total = [a + b for a, b in zip(*self.slots)]
            self.barrier.wait()  # both have read before either writes its next contribution
            return total

        return sums


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_over_two_processes_equals_the_whole_batch(shift_mean: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    mask = (torch.arange(5) < lengths[:, None]).double()
    whole = whiten(x, mask, shift_mean=shift_mean)
    ranks = TwoRanks()
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]  # the halves hold different token counts (11 and 9)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(whiten, xs, ms, shift_mean, 1e-8, ranks.hook(rank))
                   for rank, (xs, ms) in enumerate(halves)]
        parts = [f.result(timeout=30) for f in futures]
    assert_close(torch.cat(parts) * mask, whole * mask)
    # ... and whitening a half locally would not: its statistics differ
    assert not torch.allclose(whiten(x[:3], mask[:3]) * mask[:3], whole[:3] * mask[:3])


# ---------------------------------------------------------------------------------------------------------------
# KL estimators and per-token rewards


def test_kl_estimators_by_hand() -> None:
    logps, ref_logps = t([-1.0, -2.0, -0.7]), t([-1.5, -1.0, -0.7])
    # k1 = log pi - log pi_ref
    assert_close(kl_per_token(logps, ref_logps, "k1"), t([0.5, -1.0, 0.0]))
    # k3 = exp(x) - 1 - x with x = log pi_ref - log pi: x = -0.5, 1.0, 0
    assert_close(kl_per_token(logps, ref_logps, "k3"),
                 t([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 2.0, 0.0]))
    # k2 = (log pi - log pi_ref)^2 / 2
    assert_close(kl_per_token(logps, ref_logps, "k2"), t([0.125, 0.5, 0.0]))
    assert kl_per_token(logps, ref_logps).tolist() == kl_per_token(logps, ref_logps, "k1").tolist()  # default
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_per_token(logps, ref_logps, "k4")


def test_k3_is_non_negative_and_accurate_near_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    logps, ref_logps = -5 * torch.rand(1000, generator=gen, dtype=torch.float64), \
        -5 * torch.rand(1000, generator=gen, dtype=torch.float64)
    assert bool((kl_per_token(logps, ref_logps, "k3") >= 0).all())
    # x = 1e-6: exp(x) - 1 - x = x^2/2 + x^3/6 + ... = 5e-13 (1 + 3.3e-7); naive exp(x) - 1 - x is off by ~4e-4 here
    assert_close(kl_per_token(t([0.0]), t([1e-6]), "k3"), t([0.5e-12 + 1e-18 / 6]), rtol=1e-9, atol=0)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_unbiased_estimators_average_to_the_exact_kl(estimator: str) -> None:
    # Over every token a of a known pi (weighted by pi(a)), k1 and k3 average to KL(pi || pi_ref) exactly:
    # E_pi[log pi/pi_ref] = KL, and E_pi[pi_ref/pi] = 1 makes the extra terms of k3 cancel.
    pi, pi_ref = [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]
    kl = sum(p * math.log(p / q) for p, q in zip(pi, pi_ref))
    per_token = kl_per_token(t([math.log(p) for p in pi]), t([math.log(q) for q in pi_ref]), estimator)
    assert_close((t(pi) * per_token).sum(), t(kl))


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    scores = t([2.0, -1.0])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    logps = t([[-1.0, -0.5, -2.0, -9.0], [-0.3, -9.0, -9.0, -9.0]])
    ref_logps = t([[-1.5, -0.5, -1.0, -1.0], [-0.1, -1.0, -1.0, -1.0]])
    rewards, kl = token_rewards(scores, logps, ref_logps, mask, kl_coef=0.1)
    # k1 per token: row 0: 0.5, 0.0, -1.0 (then padding); row 1: -0.2
    assert_close(kl, t([[0.5, 0.0, -1.0, 0.0], [-0.2, 0.0, 0.0, 0.0]]))
    # r_t = -0.1 * k1_t, plus the score at the last real token (index 2 of row 0, index 0 of row 1)
    assert_close(rewards, t([[-0.05, 0.0, 0.1 + 2.0, 0.0], [0.02 - 1.0, 0.0, 0.0, 0.0]]))
    # the rewards sum to score - kl_coef * KL(y), the sequence-level objective
    assert_close(rewards.sum(1), t([2.0 - 0.1 * (0.5 + 0.0 - 1.0), -1.0 - 0.1 * -0.2]))
    rewards_k3, kl_k3 = token_rewards(scores, logps, ref_logps, mask.bool(), kl_coef=0.1, estimator="k3")
    assert_close(kl_k3[0, 0], t(math.exp(-0.5) - 0.5))
    assert float(kl_k3[0, 3]) == 0.0 and float(rewards_k3[1, 1]) == 0.0


@pytest.mark.parametrize("mask", [[[0, 1, 1], [1, 1, 0]], [[1, 1, 0], [0, 0, 0]], [[1, 0, 1], [1, 1, 1]]],
                         ids=["left-padded", "empty-row", "hole"])
def test_token_rewards_refuse_a_mask_that_is_not_a_prefix(mask) -> None:
    with pytest.raises(ValueError, match="prefix"):
        token_rewards(t([1.0, 1.0]), torch.zeros(2, 3, dtype=torch.float64),
                      torch.zeros(2, 3, dtype=torch.float64), t(mask), kl_coef=0.1)


# ---------------------------------------------------------------------------------------------------------------
# Clipped losses

CLIP = 0.2
# (advantage, ratio, expected loss, clipped, d loss / d logp) for each region, clip range [0.8, 1.2].
# loss = max(-A r, -A clamp(r, 0.8, 1.2)); d(-A r)/d logp = -A r (r = exp(logp - old)); the clipped branch is flat.
POLICY_CASES = [
    (2.0, 1.1, -2.2, 0.0, -2.2),   # A > 0, inside: -2 * 1.1 both branches
    (2.0, 1.5, -2.4, 1.0, 0.0),    # A > 0, above: max(-3.0, -2.4) = -2.4, clipped, no push further up
    (2.0, 0.5, -1.0, 0.0, -1.0),   # A > 0, below: max(-1.0, -1.6) = -1.0, unclipped: still pushed back up
    (-1.0, 0.9, 0.9, 0.0, 0.9),    # A < 0, inside
    (-1.0, 0.5, 0.8, 1.0, 0.0),    # A < 0, below: max(0.5, 0.8) = 0.8, clipped, no push further down
    (-1.0, 1.5, 1.5, 0.0, 1.5),    # A < 0, above: max(1.5, 1.2) = 1.5, unclipped: still pushed back down
]


def test_policy_loss_in_every_region() -> None:
    advantages = t([c[0] for c in POLICY_CASES])
    old_logps = t([-1.0, -2.0, -0.5, -3.0, -1.5, -0.2])
    logps = (old_logps + t([math.log(c[1]) for c in POLICY_CASES])).requires_grad_()
    loss, clipped, approx_kl = policy_loss(logps, old_logps, advantages, CLIP)
    assert_close(loss.detach(), t([c[2] for c in POLICY_CASES]))
    assert clipped.tolist() == [c[3] for c in POLICY_CASES]
    assert_close(approx_kl, t([0.5 * math.log(c[1]) ** 2 for c in POLICY_CASES]))
    loss.sum().backward()
    assert logps.grad is not None
    assert_close(logps.grad, t([c[4] for c in POLICY_CASES]))
    assert logps.grad[clipped.bool()].abs().max() == 0  # exactly zero where clipped
    assert not approx_kl.requires_grad


def test_policy_loss_at_the_rollout_policy_is_minus_the_advantage() -> None:
    # ratio = 1: loss = -A, nothing clipped, approx KL 0; the gradient is -A (the policy gradient).
    advantages = t([[1.5, -0.5]])
    logps = t([[-1.0, -2.0]]).requires_grad_()
    loss, clipped, approx_kl = policy_loss(logps, logps.detach(), advantages, CLIP)
    assert_close(loss.detach(), -advantages)
    assert clipped.sum() == 0 and approx_kl.abs().sum() == 0
    loss.sum().backward()
    assert_close(logps.grad, -advantages)


# (v, old_v, R, expected loss, clipped, d loss / d v); V_clip = old + clamp(v - old, -0.2, 0.2)
VALUE_CASES = [
    (1.0, 0.5, 2.0, 0.845, 1.0, 0.0),    # V_clip 0.7: max(1.0^2, 1.3^2) / 2 = 0.845, clipped: flat in v
    (1.0, 0.5, 0.0, 0.5, 0.0, 1.0),      # V_clip 0.7: max(1.0^2, 0.7^2) / 2 = 0.5, unclipped: v - R = 1
    (0.6, 0.5, 2.0, 0.98, 0.0, -1.4),    # inside the range: both 1.4^2 / 2 = 0.98; v - R = -1.4
    (0.0, 0.5, -1.0, 0.845, 1.0, 0.0),   # V_clip 0.3: max(1.0^2, 1.3^2) / 2, clipped below
    (0.0, 0.5, 1.0, 0.5, 0.0, -1.0),     # V_clip 0.3: max(1.0^2, 0.7^2) / 2, unclipped
]


def test_value_loss_both_branches() -> None:
    values = t([c[0] for c in VALUE_CASES]).requires_grad_()
    loss, clipped = value_loss(values, t([c[1] for c in VALUE_CASES]), t([c[2] for c in VALUE_CASES]), CLIP)
    assert_close(loss.detach(), t([c[3] for c in VALUE_CASES]))
    assert clipped.tolist() == [c[4] for c in VALUE_CASES]
    loss.sum().backward()
    assert_close(values.grad, t([c[5] for c in VALUE_CASES]))


# ---------------------------------------------------------------------------------------------------------------
# Diagnostics


def test_explained_variance() -> None:
    returns = t([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert explained_variance(returns, returns, mask) == 1.0  # a perfect critic
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0, abs=1e-12)
    # V = 1, 2, 3, 3: R - V = 0, 0, 0, 1, var (unbiased) 0.25; Var[R] = 5/3: 1 - 0.25 / (5/3) = 0.85
    values = t([[1.0, 2.0, 3.0, -5.0], [3.0, 0.0, 0.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.85, rel=1e-12)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask))


def test_entropy_from_logits() -> None:
    logits = t([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(2.0), -math.inf, -math.inf],
                [1000.0, 1000.0 + math.log(2.0), -math.inf, -math.inf]]).requires_grad_()
    # uniform over 4: log 4; p = (1/3, 2/3): -(1/3) log(1/3) - (2/3) log(2/3) = log 3 - (2/3) log 2, at any offset
    h = entropy_from_logits(logits)
    expected = math.log(3.0) - 2.0 / 3.0 * math.log(2.0)
    assert_close(h.detach(), t([math.log(4.0), expected, expected]))
    h.sum().backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    assert float(logits.grad[1, 2]) == 0.0
    assert entropy_from_logits(torch.zeros(2, 3, 5)).shape == (2, 3)


# ---------------------------------------------------------------------------------------------------------------
# KL controller


def test_fixed_kl_controller_stays_fixed() -> None:
    ctl = KLController(0.1)
    for kl in (0.0, 5.0, 100.0):
        ctl.update(kl, n=256)
    assert ctl.value == 0.1


def test_adaptive_kl_controller_by_hand() -> None:
    # e = clip(KL / 6 - 1, -0.2, 0.2); beta *= 1 + e * 256 / 10000
    up = KLController(0.1, target=6.0, horizon=10000)
    up.update(6.6, n=256)  # e = 0.1: 0.1 * 1.00256
    assert up.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000), rel=1e-15)
    far_up = KLController(0.1, target=6.0, horizon=10000)
    far_up.update(60.0, n=256)  # e = 9, clipped to 0.2: 0.1 * 1.00512
    assert far_up.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000), rel=1e-15)
    down = KLController(0.1, target=6.0, horizon=10000)
    down.update(0.0, n=256)  # e = -1, clipped to -0.2: 0.1 * 0.99488
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000), rel=1e-15)
    at_target = KLController(0.1, target=6.0)
    at_target.update(6.0, n=256)
    assert at_target.value == 0.1


def test_kl_controller_state_round_trips_through_json() -> None:
    ctl = KLController(0.05, target=4.0, horizon=5000)
    for kl in (9.0, 1.0, 4.5, 3.3):
        ctl.update(kl, n=64)
    resumed = KLController(1.0)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    for kl in (7.0, 2.0):
        ctl.update(kl, n=64)
        resumed.update(kl, n=64)
    assert resumed.value == ctl.value  # bit-identical
    assert resumed.state_dict() == ctl.state_dict()


@pytest.mark.parametrize("args", [(-0.1,), (0.1, 0.0), (0.1, 1.0, 0)])
def test_kl_controller_rejects_bad_settings(args) -> None:
    with pytest.raises(ValueError):
        KLController(*args)
