"""Preference losses: golden values worked out by hand with `math`, gradient signs, limit cases, validation."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from dpokit.errors import ConfigError
from dpokit.losses import (
    LOSSES,
    SPECS,
    advance_loss_state,
    cdpo_loss,
    check_training_setup,
    compute_loss,
    plackett_luce_loss,
    sigmoid_loss,
    validate_loss_config,
)

ROOT = Path(__file__).resolve().parents[1]
# Exact-math claims, in float64: every tensor here is float64 (``t``) and every golden value comes from ``math``
# (float64). A few elementwise ops (log, exp, log1p, sigmoid) are each correctly rounded to a few float64 ulps
# (2.2e-16 relative) whatever the CPU's vector unit, so assert_close's float64 defaults (rtol = atol = 1e-7) sit
# ~1e8 ulps above round-off and ~1e5 below what a wrong formula gives (values are 1e-2..10).

# A fixed batch of 3 pairs: summed log-probs and response lengths.
PC = [-10.0, -25.5, -4.0]  # policy, chosen
PR = [-12.0, -24.0, -9.0]  # policy, rejected
RC = [-11.0, -25.0, -5.0]  # reference, chosen
RR = [-11.5, -23.0, -8.0]  # reference, rejected
LC = [5.0, 12.0, 2.0]  # chosen lengths
LR = [6.0, 10.0, 4.0]  # rejected lengths
BETA = 0.1
# h = (pc - pr) - (rc - rr) = [1.5, 0.5, 2.0]

PAIRWISE = sorted(name for name, spec in SPECS.items() if spec.on_pairs)
BATCHWISE = {name for name, spec in SPECS.items() if spec.kind == "batchwise"}
# The smallest set of parameters each loss needs to run.
PARAMS: dict[str, dict[str, Any]] = {"cdpo": {"label_smoothing": 0.1}, "robust": {"label_smoothing": 0.1},
                                     "f_dpo": {"f_divergence": "js_divergence"}}


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def batch() -> dict[str, torch.Tensor]:
    return dict(policy_chosen_logps=t(PC), policy_rejected_logps=t(PR), ref_chosen_logps=t(RC),
                ref_rejected_logps=t(RR))


def lengths() -> dict[str, torch.Tensor]:
    return dict(chosen_lengths=t(LC), rejected_lengths=t(LR))


def call(name: str, beta: float = BETA, **params: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return LOSSES[name](**batch(), beta=beta, **lengths(), **{**PARAMS.get(name, {}), **params})


def log_sigmoid(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def margins() -> list[float]:
    return [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def dpo_rewards() -> tuple[list[float], list[float]]:
    return [BETA * (pc - rc) for pc, rc in zip(PC, RC)], [BETA * (pr - rr) for pr, rr in zip(PR, RR)]


# ---------------------------------------------------------------------------------------------------------------
# Golden values, one expected list per variant, written out from each paper's equation.


def expected_sigmoid() -> list[float]:
    return [-log_sigmoid(BETA * h) for h in margins()]


def expected_cdpo(eps: float = 0.1) -> list[float]:
    return [(1 - eps) * -log_sigmoid(BETA * h) + eps * -log_sigmoid(-BETA * h) for h in margins()]


def expected_robust(eps: float = 0.1) -> list[float]:
    return [((1 - eps) * -log_sigmoid(BETA * h) - eps * -log_sigmoid(-BETA * h)) / (1 - 2 * eps) for h in margins()]


def expected_ipo() -> list[float]:
    out = []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR):
        h = (pc / lc - pr / lr) - (rc / lc - rr / lr)
        out.append((h - 1 / (2 * BETA)) ** 2)
    return out


def expected_hinge() -> list[float]:
    return [max(0.0, 1 - BETA * h) for h in margins()]


def expected_simpo(gamma: float = 0.5) -> list[float]:
    return [-log_sigmoid(BETA * pc / lc - BETA * pr / lr - gamma) for pc, pr, lc, lr in zip(PC, PR, LC, LR)]


def expected_rpo(alpha: float = 1.0) -> list[float]:
    return [-log_sigmoid(BETA * h) + alpha * (-pc / lc) for h, pc, lc in zip(margins(), PC, LC)]


def expected_nca_pair() -> list[float]:
    rw, rl = dpo_rewards()
    return [-log_sigmoid(w) - 0.5 * log_sigmoid(-w) - 0.5 * log_sigmoid(-lo) for w, lo in zip(rw, rl)]


def expected_apo_zero() -> list[float]:
    rw, rl = dpo_rewards()
    return [1 - sigmoid(w) + sigmoid(lo) for w, lo in zip(rw, rl)]


def expected_apo_down() -> list[float]:
    rw, rl = dpo_rewards()
    return [sigmoid(w) + 1 - sigmoid(w - lo) for w, lo in zip(rw, rl)]


def expected_unlikelihood(alpha: float = 1.0) -> list[float]:
    return [-pc / lc - alpha * math.log(1 - math.exp(pr / lr)) for pc, pr, lc, lr in zip(PC, PR, LC, LR)]


def expected_exo_pair(eps: float = 1e-3) -> list[float]:
    # KL(p || q), p = (sigmoid(z), sigmoid(-z)) over (y_w, y_l), q = (1 - eps, eps), z = beta * h.
    out = []
    for h in margins():
        p_w, p_l = sigmoid(BETA * h), sigmoid(-BETA * h)
        out.append(p_w * math.log(p_w / (1 - eps)) + p_l * math.log(p_l / eps))
    return out


def expected_bco_pair(delta: float = 0.0) -> list[float]:
    rw, rl = dpo_rewards()
    return [-log_sigmoid(w - delta) - log_sigmoid(-(lo - delta)) for w, lo in zip(rw, rl)]


def expected_sppo_hard() -> list[float]:
    # (a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2 on summed log-ratios; 1/(2 beta) = 5.
    return [(pc - rc - 5.0) ** 2 + (pr - rr + 5.0) ** 2 for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def expected_aot(eps: float = 0.0) -> list[float]:
    # Both sorts put the pairs in the same order here (aot is then sigmoid, permuted); the hand test below
    # takes a batch where they differ.
    pi = sorted(pc - pr for pc, pr in zip(PC, PR))  # [-1.5, 2, 5]
    ref = sorted(rc - rr for rc, rr in zip(RC, RR))  # [-2, 0.5, 3]
    return [(1 - eps) * -log_sigmoid(BETA * (u - v)) + eps * -log_sigmoid(-BETA * (u - v)) for u, v in zip(pi, ref)]


def expected_aot_unpaired(eps: float = 0.0) -> list[float]:
    chosen = sorted(pc - rc for pc, rc in zip(PC, RC))  # [-0.5, 1, 1]
    rejected = sorted(pr - rr for pr, rr in zip(PR, RR))  # [-1, -1, -0.5]
    return [(1 - eps) * -log_sigmoid(BETA * (c - d)) + eps * -log_sigmoid(-BETA * (c - d))
            for c, d in zip(chosen, rejected)]


def expected_discopop(tau: float = 0.05) -> list[float]:
    out = []
    for h in margins():
        z = BETA * h
        m = sigmoid(z / tau)
        out.append((1 - m) * -log_sigmoid(z) + m * math.exp(-z))
    return out


def expected_sigmoid_norm() -> list[float]:
    return [-log_sigmoid(BETA * ((pc - rc) / lc - (pr - rr) / lr))
            for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR)]


def expected_f_dpo(divergence: str = "js_divergence", coef: float = 0.5) -> list[float]:
    # -log sigmoid(beta * [f'(u_w) - f'(u_l)]), u = exp(a), a = log pi - log pi_ref; a_w = [1, -0.5, 1],
    # a_l = [-0.5, -1, -1] here.
    derivative = {
        "reverse_kl": lambda u: math.log(u) + 1,
        "forward_kl": lambda u: -1 / u,
        "js_divergence": lambda u: math.log(2 * u / (1 + u)),
        "alpha_divergence": lambda u: (u ** (coef - 1) - 1) / (coef - 1),  # TRL's c; the paper's alpha = 1 - c
    }[divergence]
    out = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        u_w, u_l = math.exp(pc - rc), math.exp(pr - rr)
        out.append(-log_sigmoid(BETA * (derivative(u_w) - derivative(u_l))))
    return out


GOLDEN = {
    "sigmoid": expected_sigmoid,
    "cdpo": expected_cdpo,
    "robust": expected_robust,
    "ipo": expected_ipo,
    "hinge": expected_hinge,
    "simpo": expected_simpo,
    "rpo": expected_rpo,
    "nca_pair": expected_nca_pair,
    "apo_zero": expected_apo_zero,
    "apo_down": expected_apo_down,
    "unlikelihood": expected_unlikelihood,
    "exo_pair": expected_exo_pair,
    "bco_pair": expected_bco_pair,
    "sppo_hard": expected_sppo_hard,
    "aot": expected_aot,
    "aot_unpaired": expected_aot_unpaired,
    "discopop": expected_discopop,
    "sigmoid_norm": expected_sigmoid_norm,
    "f_dpo": expected_f_dpo,
}


def test_every_pairwise_loss_has_a_golden_test() -> None:
    assert set(GOLDEN) == set(PAIRWISE)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_values(name: str) -> None:
    losses, chosen_rewards, rejected_rewards = call(name)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (3,)
    assert_close(losses, t(GOLDEN[name]()))


@pytest.mark.parametrize("name", [n for n in PAIRWISE if n != "simpo"])
def test_rewards_are_dpo_implicit_rewards_on_summed_logps(name: str) -> None:
    _, chosen_rewards, rejected_rewards = call(name)
    rw, rl = dpo_rewards()
    assert_close(chosen_rewards, t(rw))
    assert_close(rejected_rewards, t(rl))


def test_simpo_rewards_are_length_normalized_policy_logps() -> None:
    _, chosen_rewards, rejected_rewards = call("simpo")
    assert_close(chosen_rewards, t([BETA * pc / lc for pc, lc in zip(PC, LC)]))
    assert_close(rejected_rewards, t([BETA * pr / lr for pr, lr in zip(PR, LR)]))


def test_simpo_gamma_and_alpha_change_the_value() -> None:
    assert_close(call("simpo", gamma=2.0)[0], t(expected_simpo(gamma=2.0)))
    assert_close(call("rpo", alpha=0.3)[0], t(expected_rpo(alpha=0.3)))
    assert_close(call("cdpo", label_smoothing=0.3)[0], t(expected_cdpo(eps=0.3)))
    assert_close(call("robust", label_smoothing=0.3)[0], t(expected_robust(eps=0.3)))
    assert_close(call("exo_pair", label_smoothing=0.2)[0], t(expected_exo_pair(eps=0.2)))
    assert_close(call("aot", label_smoothing=0.2)[0], t(expected_aot(eps=0.2)))
    assert_close(call("aot_unpaired", label_smoothing=0.2)[0], t(expected_aot_unpaired(eps=0.2)))
    assert_close(call("discopop", discopop_tau=0.5)[0], t(expected_discopop(tau=0.5)))
    assert_close(call("bco_pair", delta=0.07)[0], t(expected_bco_pair(delta=0.07)))


@pytest.mark.parametrize("name", PAIRWISE)
def test_rewards_are_detached(name: str) -> None:
    inputs = {k: v.requires_grad_() for k, v in batch().items()}
    losses, chosen_rewards, rejected_rewards = LOSSES[name](**inputs, beta=BETA, **lengths(), **PARAMS.get(name, {}))
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# sigmoid (Eq. 7 of the DPO paper)


def test_sigmoid_policy_equal_to_reference_is_ln2_with_zero_rewards() -> None:
    logps = t([-3.0, -40.0, -7.5])
    losses, chosen_rewards, rejected_rewards = sigmoid_loss(logps, logps - 2, logps, logps - 2, beta=0.5)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))
    assert torch.equal(chosen_rewards, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(rejected_rewards, torch.zeros(3, dtype=torch.float64))


def test_sigmoid_single_pair_by_hand() -> None:
    # beta = 0.5: pi_logratios = -1 - (-3) = 2, ref_logratios = -2 - (-2.5) = 0.5, logits = 0.5 * 1.5 = 0.75.
    losses, chosen_rewards, rejected_rewards = sigmoid_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5]), beta=0.5)
    assert_close(losses, t([math.log(1 + math.exp(-0.75))]))
    assert_close(chosen_rewards, t([0.5]))  # 0.5 * (-1 - -2)
    assert_close(rejected_rewards, t([-0.25]))  # 0.5 * (-3 - -2.5)


def test_reference_free_equals_sigmoid_with_zero_reference() -> None:
    b = batch()
    free = sigmoid_loss(**b, beta=BETA, reference_free=True)
    zero_ref = sigmoid_loss(b["policy_chosen_logps"], b["policy_rejected_logps"], torch.zeros(3, dtype=torch.float64),
                            torch.zeros(3, dtype=torch.float64), beta=BETA)
    for got, want in zip(free, zero_ref):
        assert_close(got, want)
    assert_close(free[0], t([-log_sigmoid(BETA * (pc - pr)) for pc, pr in zip(PC, PR)]))


# ---------------------------------------------------------------------------------------------------------------
# Gradient signs: raising the chosen log-prob lowers the loss, raising the rejected one raises it. The fixed batch
# is where every loss is in its "still learning" region (hinge below the margin, ipo and sppo_hard below their
# targets, nca_pair below r_w = ln 2, exo_pair below its optimum), where these signs hold. discopop is the
# exception by design: its margin z = 0.05 lies on the bump where it rises (tested below).


def grads(name: str, **params: Any) -> dict[str, torch.Tensor]:
    inputs = {k: v.requires_grad_() for k, v in batch().items()}
    losses, _, _ = LOSSES[name](**inputs, beta=BETA, **lengths(), **{**PARAMS.get(name, {}), **params})
    losses.sum().backward()
    return {k: v.grad for k, v in inputs.items()}


@pytest.mark.parametrize("name", [n for n in PAIRWISE if n not in ("apo_down", "discopop")])
def test_raising_chosen_lowers_the_loss(name: str) -> None:
    assert (grads(name)["policy_chosen_logps"] < 0).all()


@pytest.mark.parametrize("name", [n for n in PAIRWISE if n != "discopop"])
def test_raising_rejected_raises_the_loss(name: str) -> None:
    assert (grads(name)["policy_rejected_logps"] > 0).all()


def test_apo_down_pushes_the_chosen_down_when_already_ahead() -> None:
    # APO-down is for chosen answers worse than the model's own: with r_w = 0 and r_w well above r_l, the gradient
    # on the chosen log-prob is positive (descent lowers it), while rejected still goes down.
    inputs = [t([-5.0]).requires_grad_(), t([-30.0]).requires_grad_(), t([-5.0]), t([-10.0])]
    losses, _, _ = LOSSES["apo_down"](*inputs, beta=BETA)
    losses.sum().backward()
    assert inputs[0].grad.item() > 0 and inputs[1].grad.item() > 0


def test_simpo_ignores_the_reference() -> None:
    g = grads("simpo")
    assert g["ref_chosen_logps"] is None or torch.equal(g["ref_chosen_logps"], torch.zeros(3, dtype=torch.float64))
    b = batch()
    shifted = LOSSES["simpo"](b["policy_chosen_logps"], b["policy_rejected_logps"], b["ref_chosen_logps"] + 7.0,
                              b["ref_rejected_logps"] - 3.0, beta=BETA, **lengths())
    assert torch.equal(shifted[0], call("simpo")[0])


def test_hinge_has_no_gradient_past_the_margin() -> None:
    # beta * h = 0.1 * 20 = 2 > 1: the pair is separated, loss and gradient are zero.
    pc = t([0.0]).requires_grad_()
    losses, _, _ = LOSSES["hinge"](pc, t([-20.0]), t([0.0]), t([0.0]), beta=BETA)
    losses.sum().backward()
    assert losses.item() == 0.0 and pc.grad.item() == 0.0


def test_ipo_pulls_back_past_its_target() -> None:
    # Per-token h = 10 > 1/(2 beta) = 5: IPO regresses h to its target, so raising the chosen log-prob now
    # raises the loss (the opposite of DPO).
    pc = t([0.0]).requires_grad_()
    losses, _, _ = LOSSES["ipo"](pc, t([-10.0]), t([0.0]), t([0.0]), beta=BETA, chosen_lengths=t([1.0]),
                                 rejected_lengths=t([1.0]))
    losses.sum().backward()
    assert_close(losses, t([25.0]))
    assert pc.grad.item() > 0


# ---------------------------------------------------------------------------------------------------------------
# Limit cases


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_zero_flip_rate_is_sigmoid(name: str) -> None:
    assert_close(call(name, label_smoothing=0.0)[0], sigmoid_loss(**batch(), beta=BETA)[0])


def test_rpo_with_tiny_alpha_approaches_sigmoid() -> None:
    sig = sigmoid_loss(**batch(), beta=BETA)[0]
    # rpo adds alpha * NLL per token (-pc/lc = 2.0, 2.125, 2.0): 2.1e-9 at alpha 1e-9, 2.1e-3 at alpha 1e-3;
    # atol 1e-8 separates the two, and float64 round-off of the sum (~1e-16 * 4) is far below both.
    assert_close(call("rpo", alpha=1e-9)[0], sig, atol=1e-8, rtol=0)
    assert not torch.allclose(call("rpo", alpha=1e-3)[0], sig, atol=1e-8, rtol=0)


def test_ipo_is_zero_at_its_target() -> None:
    # beta = 0.25: target h = 1/(2 * 0.25) = 2. Per-token: policy (-4/4) - (-8/2) = 3, reference (-8/4) - (-6/2) = 1.
    losses, _, _ = LOSSES["ipo"](t([-4.0]), t([-8.0]), t([-8.0]), t([-6.0]), beta=0.25, chosen_lengths=t([4.0]),
                                 rejected_lengths=t([2.0]))
    assert_close(losses, t([0.0]), atol=1e-12, rtol=0)  # (3 - 1 - 2)^2 in float64: exact; 1e-12 for safety


def test_ipo_accepts_integer_lengths() -> None:
    losses, _, _ = LOSSES["ipo"](**batch(), beta=BETA, chosen_lengths=torch.tensor([5, 12, 2]),
                                 rejected_lengths=torch.tensor([6, 10, 4]))
    assert_close(losses, t(expected_ipo()))


@pytest.mark.parametrize("name", ["ipo", "simpo", "rpo", "sigmoid_norm"])
def test_per_token_losses_require_lengths(name: str) -> None:
    with pytest.raises(ValueError, match="chosen_lengths"):
        LOSSES[name](**batch(), beta=BETA)


# ---------------------------------------------------------------------------------------------------------------
# The TRL-named variants: exo_pair, bco_pair, sppo_hard, discopop, sigmoid_norm, aot, aot_unpaired


def one_pair(pc: list[float], pr: list[float], rc: list[float] | None = None, rr: list[float] | None = None,
             grad: bool = False) -> list[torch.Tensor]:
    zeros = [0.0] * len(pc)
    pc_t = t(pc).requires_grad_(grad)
    return [pc_t, t(pr), t(rc if rc is not None else zeros), t(rr if rr is not None else zeros)]


@pytest.mark.parametrize("eps", [1e-3, 0.2])
def test_exo_pair_and_cdpo_share_their_optimum(eps: float) -> None:
    # EXO is KL(p || q) and cDPO is KL(q || p) + H(q) for p = sigmoid(z), q = 1 - eps: both are stationary at
    # sigmoid(z*) = 1 - eps, z* = log((1 - eps) / eps), where EXO is 0 and cDPO is the entropy H(q).
    # In float64 log sigmoid(z*) - log(1 - eps) cancels to a few ulps of |log eps| <= 7: atol 1e-12.
    beta = 0.5
    h_star = math.log((1 - eps) / eps) / beta
    for fn, value in ((LOSSES["exo_pair"], 0.0),
                      (cdpo_loss, -eps * math.log(eps) - (1 - eps) * math.log(1 - eps))):
        pc, *rest = one_pair([h_star], [0.0], grad=True)
        losses, _, _ = fn(pc, *rest, beta=beta, label_smoothing=eps)
        losses.sum().backward()
        assert_close(losses, t([value]), atol=1e-12, rtol=0)
        assert abs(pc.grad.item()) < 1e-12


def test_exo_pair_gradient_in_closed_form() -> None:
    # dL/dz = p (1 - p) (z - z*) for L = KL(p || q), since d/dz log(p / (1 - p)) = 1; dL/dh = beta * that.
    eps = 1e-3
    z_star = math.log((1 - eps) / eps)
    want = [BETA * sigmoid(BETA * h) * sigmoid(-BETA * h) * (BETA * h - z_star) for h in margins()]
    assert_close(grads("exo_pair")["policy_chosen_logps"], t(want))


def test_bco_pair_is_invariant_to_a_common_shift_of_rewards_and_delta() -> None:
    # r_w - delta and r_l - delta are all the loss sees: shifting every reward and delta by c = 0.3 (the
    # policy log-probs by c / beta = 3) changes nothing beyond float64 round-off.
    b = batch()
    shifted = LOSSES["bco_pair"](b["policy_chosen_logps"] + 3.0, b["policy_rejected_logps"] + 3.0,
                                 b["ref_chosen_logps"], b["ref_rejected_logps"], beta=BETA, delta=0.3 + 0.07)
    assert_close(shifted[0], call("bco_pair", delta=0.07)[0])


def test_bco_pair_reward_shift_is_the_running_mean_of_rewards() -> None:
    # Three steps by hand: mean (chosen + rejected) / 2 of 0.05 over 8 pairs, 0.1 over 8, 0.5 over 4;
    # the mean over all 20 pairs is (0.05 * 8 + 0.1 * 8 + 0.5 * 4) / 20 = 0.16. Python floats: 1e-12 is loose.
    cfg = loss_config(name="bco_pair", beta=BETA)
    state: dict[str, Any] = {}
    for chosen, rejected, pairs in ((0.2, -0.1, 8), (0.4, -0.2, 8), (1.0, 0.0, 4)):
        state = advance_loss_state(cfg, state, chosen, rejected, pairs)
    assert state["bco_pair"]["pairs"] == 20
    assert state["bco_pair"]["reward_mean"] == pytest.approx(0.16, abs=1e-12)
    # compute_loss feeds the state's mean as delta; without a state delta is 0 (the first step).
    losses, _, _ = compute_loss(cfg, *batch().values(), *lengths().values(), state=state)
    assert_close(losses, t(expected_bco_pair(delta=state["bco_pair"]["reward_mean"])))
    assert_close(compute_loss(cfg, *batch().values())[0], t(expected_bco_pair()))
    assert advance_loss_state(loss_config(name="sigmoid"), {}, 0.2, -0.1, 8) == {}


def test_sppo_hard_is_half_ipo_plus_a_symmetry_term() -> None:
    # (a_w - 1/(2b))^2 + (a_l + 1/(2b))^2 = 1/2 (a_w - a_l - 1/b)^2 + 1/2 (a_w + a_l)^2 (parallelogram law).
    want = [0.5 * (h - 1 / BETA) ** 2 + 0.5 * (pc - rc + pr - rr) ** 2
            for h, pc, pr, rc, rr in zip(margins(), PC, PR, RC, RR)]
    assert_close(call("sppo_hard")[0], t(want))
    # With a_l = -a_w the second term vanishes: sppo_hard at beta is half of ipo at beta / 2 on one-token
    # responses, (h - 1/beta)^2 with h = 2 a_w.
    a = [1.0, -2.0, 3.5]
    sppo = LOSSES["sppo_hard"](*one_pair(a, [-x for x in a]), beta=BETA)[0]
    ipo = LOSSES["ipo"](*one_pair(a, [-x for x in a]), beta=BETA / 2, chosen_lengths=t([1.0] * 3),
                        rejected_lengths=t([1.0] * 3))[0]
    assert_close(sppo, 0.5 * ipo)


def test_sppo_hard_is_zero_at_its_targets_and_pulls_back_past_them() -> None:
    # Targets a_w = 1/(2 beta) = 5, a_l = -5: loss exactly 0 (5.0 - 5.0 is exact). At a_w = 8 the chosen
    # log-prob is pushed back down: dL/da_w = 2 (8 - 5) = 6.
    losses, _, _ = LOSSES["sppo_hard"](*one_pair([5.0], [-5.0]), beta=BETA)
    assert losses.item() == 0.0
    pc, *rest = one_pair([8.0], [-5.0], grad=True)
    LOSSES["sppo_hard"](pc, *rest, beta=BETA)[0].sum().backward()
    assert_close(pc.grad, t([6.0]))


@pytest.mark.parametrize("tau, slope_sign", [(0.05, 1), (0.2, -1)])
def test_discopop_slope_at_zero_margin(tau: float, slope_sign: int) -> None:
    # At z = 0: L = (ln 2 + 1) / 2 for any tau, and dL/dz = (1 - ln 2) / (4 tau) - 3/4 (the switch's slope
    # 1 / (4 tau) times exp(0) - ln 2, minus the mean of the two components' slopes 1/2 and 1). It is positive
    # below tau = (1 - ln 2) / 3 ~ 0.102: at the first step (pi = pi_ref, z = 0) DiscoPOP with the default tau
    # pushes margins down. beta = 1, so dL/dh = dL/dz.
    pc, *rest = one_pair([0.0], [0.0], grad=True)
    losses, _, _ = LOSSES["discopop"](pc, *rest, beta=1.0, discopop_tau=tau)
    losses.sum().backward()
    assert_close(losses, t([(math.log(2) + 1) / 2]))
    slope = (1 - math.log(2)) / (4 * tau) - 0.75
    assert_close(pc.grad, t([slope]))
    assert math.copysign(1, slope) == slope_sign


def test_discopop_rises_only_on_its_bump() -> None:
    # tau = 0.05: the loss rises with the margin on -0.119 < z < 0.072 and falls outside it.
    pc, *rest = one_pair([-1.0, -0.5, -0.05, 0.05, 0.5, 3.0], [0.0] * 6, grad=True)
    LOSSES["discopop"](pc, *rest, beta=1.0)[0].sum().backward()
    assert pc.grad.sign().tolist() == [-1.0, -1.0, 1.0, 1.0, -1.0, -1.0]


def test_discopop_limits_of_tau() -> None:
    z = [BETA * h for h in margins()]
    # tau -> infinity: the switch sits at 1/2 (off by z / (4 tau) ~ 5e-12), the plain average of the two terms.
    average = [0.5 * -log_sigmoid(x) + 0.5 * math.exp(-x) for x in z]
    assert_close(call("discopop", discopop_tau=1e10)[0], t(average), atol=1e-9, rtol=0)
    # tau -> 0: a hard switch; every z here is > 0, so the exponential loss (sigmoid(z / 1e-4) = 1 - e^-1500).
    assert_close(call("discopop", discopop_tau=1e-4)[0], t([math.exp(-x) for x in z]))


def test_discopop_is_finite_far_from_zero_in_fp32() -> None:
    # exp(-z) alone overflows fp32 at z < -88; the switch's weight is 0 there and the loss is the logistic one.
    pc = torch.tensor([-2000.0, 2000.0], requires_grad=True)
    losses, _, _ = LOSSES["discopop"](pc, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    assert_close(losses, torch.tensor([200.0, 0.0]))


@pytest.mark.parametrize("divergence, coef", [("reverse_kl", None), ("forward_kl", None), ("js_divergence", None),
                                              ("alpha_divergence", 0.3), ("alpha_divergence", 2.5),
                                              ("alpha_divergence", 0.0)])
def test_f_dpo_golden_values_and_gradient_signs(divergence: str, coef: float | None) -> None:
    params = {"f_divergence": divergence, **({"f_alpha_divergence_coef": coef} if coef is not None else {})}
    assert_close(call("f_dpo", **params)[0], t(expected_f_dpo(divergence, 0.5 if coef is None else coef)))
    g = grads("f_dpo", **params)  # f is convex, so f' increases: y_w pulled up, y_l pushed down
    assert (g["policy_chosen_logps"] < 0).all() and (g["policy_rejected_logps"] > 0).all()


def test_f_dpo_reverse_kl_is_sigmoid_exactly() -> None:
    for got, want in zip(call("f_dpo", f_divergence="reverse_kl"), call("sigmoid")):
        assert torch.equal(got, want)


def test_f_dpo_alpha_divergence_limits() -> None:
    # c = 0 is forward KL, exactly; c = 1 is reverse KL (DPO) exactly, and c -> 1 tends to it:
    # (u^(c-1) - 1) / (c - 1) -> log u, off by O((c - 1) * a^2), a <= 1 here. The default is c = 0.5.
    forward = call("f_dpo", f_divergence="forward_kl")[0]
    assert torch.equal(call("f_dpo", f_divergence="alpha_divergence", f_alpha_divergence_coef=0.0)[0], forward)
    assert torch.equal(call("f_dpo", f_divergence="alpha_divergence", f_alpha_divergence_coef=1.0)[0],
                       call("sigmoid")[0])
    assert_close(call("f_dpo", f_divergence="alpha_divergence", f_alpha_divergence_coef=1 - 1e-7)[0],
                 call("sigmoid")[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(call("f_dpo", f_divergence="alpha_divergence")[0],
                       call("f_dpo", f_divergence="alpha_divergence", f_alpha_divergence_coef=0.5)[0])


def test_f_dpo_js_at_pi_equal_to_ref_is_ln2() -> None:
    logps = t([-3.0, -40.0])
    losses, _, _ = LOSSES["f_dpo"](logps, logps - 2, logps, logps - 2, beta=0.5, f_divergence="js_divergence")
    assert_close(losses, torch.full_like(losses, math.log(2)))


def test_f_dpo_alpha_divergence_stays_finite_in_fp32() -> None:
    # a_l = -500: u_l^-1 = e^500 overflows fp32. y_w is ahead by that much: the exact loss and gradient are 0
    # (to far below fp32's resolution), and so are these. tests/test_loss_edges.py covers beta and a in full.
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-600.0], requires_grad=True)
    losses, _, _ = LOSSES["f_dpo"](pc, pr, torch.tensor([-1.0]), torch.tensor([-100.0]), beta=0.1,
                                   f_divergence="forward_kl")
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pr.grad).all() and pr.grad.item() == 0.0


def test_sigmoid_norm_with_equal_lengths_is_sigmoid_with_beta_over_length() -> None:
    b = batch()
    four = t([4.0, 4.0, 4.0])
    norm = LOSSES["sigmoid_norm"](**b, beta=BETA, chosen_lengths=four, rejected_lengths=four)[0]
    assert_close(norm, sigmoid_loss(**b, beta=BETA / 4)[0])


def test_aot_sorts_policy_and_reference_log_ratios_apart() -> None:
    # Policy log-ratios [3, 1, 2] and reference [0, 2, 1]: sorted [1, 2, 3] against [0, 1, 2], so every quantile
    # has u - v = 1 although the pairs' own margins are [3, -1, 1]. Every chosen log-prob sits in one quantile:
    # dL/dpc = -beta * sigmoid(-beta) for each.
    beta = 0.5
    pc, *rest = one_pair([3.0, 1.0, 2.0], [0.0] * 3, [0.0, 2.0, 1.0], [0.0] * 3, grad=True)
    losses, _, _ = LOSSES["aot"](pc, *rest, beta=beta)
    losses.sum().backward()
    assert_close(losses, t([-log_sigmoid(beta)] * 3))
    assert_close(pc.grad, t([-beta * sigmoid(-beta)] * 3))
    per_pair = LOSSES["sigmoid"](*one_pair([3.0, 1.0, 2.0], [0.0] * 3, [0.0, 2.0, 1.0], [0.0] * 3), beta=beta)[0]
    assert abs(per_pair.sum().item() - losses.sum().item()) > 0.1


def test_aot_unpaired_sorts_chosen_and_rejected_rewards_apart() -> None:
    # Chosen log-ratios [0, 2, 1], rejected [1, -1, 0]: sorted [0, 1, 2] against [-1, 0, 1], c - d = 1 for every
    # quantile; the pairs' own differences are [-1, 3, 1].
    beta = 0.5
    losses, _, _ = LOSSES["aot_unpaired"](*one_pair([0.0, 2.0, 1.0], [1.0, -1.0, 0.0]), beta=beta)
    assert_close(losses, t([-log_sigmoid(beta)] * 3))


@pytest.mark.parametrize("name", sorted(BATCHWISE))
def test_batchwise_losses_of_one_pair_are_sigmoid_and_cdpo(name: str) -> None:
    b = {k: v[:1] for k, v in batch().items()}
    assert_close(LOSSES[name](**b, beta=BETA)[0], sigmoid_loss(**b, beta=BETA)[0])
    assert_close(LOSSES[name](**b, beta=BETA, label_smoothing=0.2)[0],
                 cdpo_loss(**b, beta=BETA, label_smoothing=0.2)[0])


def split(name: str, parts: list[slice]) -> torch.Tensor:
    both = {**batch(), **lengths()}
    return torch.cat([LOSSES[name](**{k: v[part] for k, v in both.items()}, beta=BETA, **PARAMS.get(name, {}))[0]
                      for part in parts])


@pytest.mark.parametrize("name", [n for n in PAIRWISE if n not in BATCHWISE])
def test_each_pairs_loss_depends_on_that_pair_alone(name: str) -> None:
    # The step's gradient is the sum of these terms over its pairs divided by the step's pair count (end to end
    # for sigmoid in test_train.py), so a loss whose term depends on its own pair alone trains batch 8 x
    # accumulation 1 and batch 1 x accumulation 8 (or 2 ranks) alike. Batch of 3 against 2 + 1 and 1 + 1 + 1.
    full = call(name)[0]
    assert_close(split(name, [slice(0, 2), slice(2, 3)]), full)
    assert_close(split(name, [slice(i, i + 1) for i in range(3)]), full)


@pytest.mark.parametrize("name", sorted(BATCHWISE))
def test_batchwise_losses_change_when_the_batch_is_split(name: str) -> None:
    # Why grad_accum > 1, pass_tokens and torchrun are refused for them. Policy log-ratios [2, 2, 1.5] against
    # reference [-0.5, 2, 2]: whole, the quantile gaps are [2, 0, 0]; split 2 + 1, [2.5, 0] and [-0.5]. (For
    # aot_unpaired, chosen [3, -1, 1] against rejected [0.5, -1, 1.5]: [0, 0.5, 1.5], then [0, 2.5] and [-0.5].)
    logps = one_pair([3.0, 1.0, 2.0], [1.0, -1.0, 0.5], [0.0, 2.0, 1.0], [0.5, 0.0, -1.0])
    whole = LOSSES[name](*logps, beta=0.5)[0].sum()
    parts = sum(LOSSES[name](*[x[part] for x in logps], beta=0.5)[0].sum() for part in (slice(0, 2), slice(2, 3)))
    gaps = {"aot": ([2.0, 0.0, 0.0], [2.5, 0.0, -0.5]), "aot_unpaired": ([0.0, 0.5, 1.5], [0.0, 2.5, -0.5])}[name]
    want_whole, want_parts = (sum(-log_sigmoid(0.5 * g) for g in gs) for gs in gaps)
    assert_close(whole, t([want_whole])[0])
    assert_close(parts, t([want_parts])[0])
    assert abs(want_whole - want_parts) > 0.05  # 0.072 and 0.115: far above float64 round-off


@pytest.mark.parametrize(
    "tree, key",
    [
        ({"loss": {"name": "aot"}, "train": {"grad_accum": 2}}, "train.grad_accum"),
        ({"loss": {"name": "aot_unpaired"}, "train": {"pass_tokens": 256}}, "train.pass_tokens"),
        ({"loss": {"weights": {"sigmoid": 1.0, "aot": 0.5}}, "train": {"grad_accum": 4}}, "train.grad_accum"),
        ({"loss": {"name": "aot"}, "online": {"reward": "length"}}, "loss.name"),
        ({"loss": {"name": "bco_pair"}, "online": {"reward": "length"}}, "loss.name"),
        # WPO weighs pair k's loss by pair k's weight; a batchwise loss's k-th term is a quantile, not pair k.
        ({"loss": {"name": "aot", "use_weighting": True}}, "loss.use_weighting"),
        ({"loss": {"name": "aot_unpaired", "use_weighting": True}}, "loss.use_weighting"),
        ({"loss": {"weights": {"sigmoid": 1.0, "aot": 0.5}, "use_weighting": True}}, "loss.use_weighting"),
    ],
)
def test_config_refuses_what_a_loss_cannot_train_under(tree: dict[str, Any], key: str) -> None:
    from dpokit.config import load_config

    with pytest.raises(ConfigError, match=re.escape(key) + ":"):
        load_config(tree)
    ok = load_config({"loss": {"name": "aot"}, "train": {"grad_accum": 1, "batch_size": 16}})
    assert ok.loss.name == "aot"


def test_setup_refuses_a_batchwise_loss_over_several_processes() -> None:
    from dpokit.config import load_config
    from dpokit.methods.dpo import DPO
    from dpokit.training.setup import setup

    with pytest.raises(ConfigError, match=r"loss.name: loss aot sorts .* torchrun splits them over 2 processes"):
        check_training_setup(loss_config(name="aot"), world=2)
    cfg = load_config({"loss": {"name": "aot"}, "data": {"train": "pairs.jsonl"}})
    # The check comes before anything is loaded, so a stand-in for the process group is enough.
    with pytest.raises(ConfigError, match="torchrun splits"):
        setup(cfg, SimpleNamespace(world=2, is_main=True), DPO.spec)
    check_training_setup(loss_config(name="bco_pair"), world=2)  # state is the same on every rank: allowed


# ---------------------------------------------------------------------------------------------------------------
# Plackett-Luce (Appendix A.3 of the DPO paper)


def test_plackett_luce_two_responses_is_sigmoid() -> None:
    b = batch()
    policy = torch.stack([b["policy_chosen_logps"], b["policy_rejected_logps"]], dim=-1)
    ref = torch.stack([b["ref_chosen_logps"], b["ref_rejected_logps"]], dim=-1)
    losses, rewards = plackett_luce_loss(policy, ref, beta=BETA)
    sig_losses, chosen_rewards, rejected_rewards = sigmoid_loss(**b, beta=BETA)
    assert rewards.shape == (3, 2)
    assert_close(losses, sig_losses)
    assert_close(rewards, torch.stack([chosen_rewards, rejected_rewards], dim=-1))


def test_plackett_luce_three_responses_by_hand() -> None:
    policy = [[-3.0, -5.0, -4.0], [-10.0, -9.0, -12.0]]
    ref = [[-4.0, -4.0, -4.0], [-11.0, -8.0, -10.0]]
    beta = 0.5
    expected = []
    for p_row, r_row in zip(policy, ref):
        s = [beta * (p - r) for p, r in zip(p_row, r_row)]
        # -[s0 - log(e^s0 + e^s1 + e^s2)] - [s1 - log(e^s1 + e^s2)]
        nll = -(s[0] - math.log(math.exp(s[0]) + math.exp(s[1]) + math.exp(s[2])))
        nll -= s[1] - math.log(math.exp(s[1]) + math.exp(s[2]))
        expected.append(nll)
    losses, rewards = plackett_luce_loss(torch.tensor(policy, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                                       beta=beta)
    assert_close(losses, t(expected))
    assert_close(rewards, torch.tensor([[0.5, -0.5, 0.0], [0.5, -0.5, -1.0]], dtype=torch.float64))


def test_plackett_luce_gradient_signs() -> None:
    policy = torch.tensor([[-3.0, -5.0, -4.0]], dtype=torch.float64, requires_grad=True)
    losses, _ = plackett_luce_loss(policy, torch.full((1, 3), -4.0, dtype=torch.float64), beta=0.5)
    losses.sum().backward()
    assert policy.grad[0, 0] < 0  # best response: raising it lowers the loss
    assert policy.grad[0, 2] > 0  # worst response: raising it raises the loss


def test_plackett_luce_mask_equals_the_shorter_ranking() -> None:
    policy = torch.tensor([[-3.0, -5.0, -4.0, 0.0], [-1.0, -2.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-4.0, -4.0, -4.0, 0.0], [-1.5, -1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    losses, rewards = plackett_luce_loss(policy, ref, beta=0.5, mask=mask)
    losses.sum().backward()
    assert_close(losses[0:1], plackett_luce_loss(policy[0:1, :3], ref[0:1, :3], beta=0.5)[0])
    assert_close(losses[1:2], plackett_luce_loss(policy[1:2, :2], ref[1:2, :2], beta=0.5)[0])
    assert torch.isfinite(policy.grad).all()
    assert torch.equal(policy.grad[mask.logical_not()], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(rewards[mask.logical_not()], torch.zeros(3, dtype=torch.float64))


def test_plackett_luce_rejects_pairwise_shapes() -> None:
    with pytest.raises(ValueError, match="batch, K"):
        plackett_luce_loss(t(PC), t(RC), beta=BETA)


# ---------------------------------------------------------------------------------------------------------------
# Config validation and compute_loss


def loss_config(**fields: Any) -> Any:
    try:
        from dpokit.config import LossConfig
    except Exception:  # config.py may be mid-edit; a stand-in with the same attributes will do
        keys = ("label_smoothing", "gamma", "alpha", "reference_free", "discopop_tau", "f_divergence",
                "f_alpha_divergence_coef", "desirable_weight", "undesirable_weight")
        ns = SimpleNamespace(**{"name": "sigmoid", "beta": 0.1, "weights": None, **dict.fromkeys(keys), **fields})
        ns.params = lambda: {k: getattr(ns, k) for k in keys if getattr(ns, k) is not None}
        return ns
    return LossConfig(**fields)


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"name": "dpo2"}, "loss.name"),
        ({"name": "ipo", "label_smoothing": 0.1}, "loss.label_smoothing"),
        ({"name": "sigmoid", "gamma": 1.0}, "loss.gamma"),
        ({"name": "cdpo", "label_smoothing": 0.5}, "loss.label_smoothing"),
        ({"name": "robust", "label_smoothing": -0.01}, "loss.label_smoothing"),
        ({"name": "cdpo"}, "loss.label_smoothing"),
        ({"name": "simpo", "gamma": -0.1}, "loss.gamma"),
        ({"name": "rpo", "alpha": 0.0}, "loss.alpha"),
        ({"weights": {"sigmoid": 1.0, "plackett_luce": 1.0}}, "loss.weights.plackett_luce"),
        ({"weights": {"sigmoid": 1.0, "nope": 1.0}}, "loss.weights.nope"),
        ({"name": "exo_pair", "label_smoothing": 0.0}, "loss.label_smoothing"),
        ({"name": "exo_pair", "label_smoothing": 0.5}, "loss.label_smoothing"),
        ({"name": "aot", "label_smoothing": 0.5}, "loss.label_smoothing"),
        ({"name": "bco_pair", "label_smoothing": 0.1}, "loss.label_smoothing"),
        ({"name": "discopop", "discopop_tau": 0.0}, "loss.discopop_tau"),
        ({"name": "sigmoid", "discopop_tau": 0.05}, "loss.discopop_tau"),
        ({"weights": {"sigmoid": 1.0, "bco_pair": 1.0}}, "loss.weights.bco_pair"),
        ({"name": "f_dpo"}, "loss.f_divergence"),
        ({"name": "f_dpo", "f_divergence": "kl"}, "loss.f_divergence"),
        ({"name": "sigmoid", "f_divergence": "js_divergence"}, "loss.f_divergence"),
        ({"name": "f_dpo", "f_divergence": "alpha_divergence", "f_alpha_divergence_coef": -0.5},
         "loss.f_alpha_divergence_coef"),
        ({"name": "f_dpo", "f_divergence": "js_divergence", "f_alpha_divergence_coef": 0.5},
         "loss.f_alpha_divergence_coef"),
    ],
)
def test_validate_loss_config_names_the_key(fields: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key) + ":"):
        validate_loss_config(loss_config(**fields))


def test_validate_loss_config_error_texts() -> None:
    with pytest.raises(ValueError, match=r"must be in \[0, 0.5\)"):
        validate_loss_config(loss_config(name="cdpo", label_smoothing=0.5))
    with pytest.raises(ValueError, match="not used by loss ipo"):
        validate_loss_config(loss_config(name="ipo", label_smoothing=0.1))
    with pytest.raises(ValueError, match=r"must be in \(0, 0.5\); eps = 0 makes log\(eps\) infinite"):
        validate_loss_config(loss_config(name="exo_pair", label_smoothing=0.0))


@pytest.mark.parametrize(
    "fields",
    [
        {"name": name, **PARAMS.get(name, {})} for name in sorted(LOSSES)
    ] + [
        {"name": "simpo", "gamma": 0.0},
        {"name": "cdpo", "label_smoothing": 0.0},
        {"name": "rpo", "alpha": 0.5},
        {"name": "sigmoid", "reference_free": True},
        {"weights": {"sigmoid": 1.0, "rpo": 0.5}, "alpha": 2.0},
        {"name": "exo_pair", "label_smoothing": 0.01},
        {"name": "aot", "label_smoothing": 0.0},
        {"name": "aot_unpaired", "label_smoothing": 0.1},
        {"name": "discopop", "discopop_tau": 1.0},
        {"weights": {"bco_pair": 1.0, "sigmoid": 0.5}},
        {"name": "f_dpo", "f_divergence": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        {"name": "f_dpo", "f_divergence": "reverse_kl"},
    ],
)
def test_validate_loss_config_accepts(fields: dict[str, Any]) -> None:
    validate_loss_config(loss_config(**fields))


def test_every_param_check_rejects_a_bool() -> None:
    for name, checks in ((name, spec.params) for name, spec in SPECS.items()):
        for param, check in checks.items():
            if param != "reference_free":
                assert check(True) is not None, (name, param)


def test_compute_loss_passes_lengths_and_params() -> None:
    cfg = loss_config(name="simpo", beta=BETA, gamma=2.0)
    losses, chosen_rewards, _ = compute_loss(cfg, *batch().values(), *lengths().values())
    assert_close(losses, t(expected_simpo(gamma=2.0)))
    assert_close(chosen_rewards, t([BETA * pc / lc for pc, lc in zip(PC, LC)]))
    with pytest.raises(ValueError, match="lengths"):
        compute_loss(loss_config(name="ipo", beta=BETA), *batch().values())


def test_compute_loss_weighted_sum() -> None:
    cfg = loss_config(weights={"sigmoid": 1.0, "rpo": 0.5}, beta=BETA, alpha=2.0)
    losses, chosen_rewards, _ = compute_loss(cfg, *batch().values(), *lengths().values())
    want = [s + 0.5 * r for s, r in zip(expected_sigmoid(), expected_rpo(alpha=2.0))]
    assert_close(losses, t(want))
    assert_close(chosen_rewards, t(dpo_rewards()[0]))


def test_compute_loss_refuses_listwise() -> None:
    with pytest.raises(ValueError, match="plackett_luce_loss"):
        compute_loss(loss_config(name="plackett_luce"), *batch().values(), *lengths().values())


# ---------------------------------------------------------------------------------------------------------------
# Documentation


def loss_table() -> str:
    start, end = "<!-- losses:start -->", "<!-- losses:end -->"
    lines = (ROOT / "docs" / "losses.md").read_text(encoding="utf-8").splitlines()
    assert start in lines and end in lines, f"docs/losses.md has no section between {start} and {end}"
    return "\n".join(lines[lines.index(start) + 1: lines.index(end)])


def test_every_loss_is_in_the_docs_table() -> None:
    names = set()
    for line in loss_table().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells and (m := re.fullmatch(r"`([a-z_]+)`", cells[0])):
            names.add(m.group(1))
    assert names == set(LOSSES)


# ---------------------------------------------------------------------------------------------------------------
# LD-DPO's token weights (loss.ld_alpha): 1 up to the shorter response's length, alpha past it


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_length_desensitized_weights_by_hand(layout: str) -> None:
    from dpokit.data.batch import collate_groups, regroup
    from dpokit.losses.tokens import length_desensitized_weights

    # Response lengths (4, 3), (3, 2), (7, 3) and a ranking (2, 5, 4): public lengths 3, 2, 3, 2.
    groups = [([1, 9], [[6, 5, 4, 2], [30, 31, 2]]), ([1, 40], [[45, 46, 2], [47, 2]]),
              ([1, 50], [[51, 52, 53, 54, 55, 56, 2], [57, 58, 2]]), ([1, 60], [[61, 2], [62, 63, 64, 65, 2],
                                                                                 [66, 67, 68, 2]])]
    batch = collate_groups(groups, pad_id=0, layout=layout)
    alpha = 0.25
    weights = length_desensitized_weights(batch["target_slot"], batch["slots"], batch["n_slots"], alpha)
    assert weights.dtype == torch.float32 and weights.shape == batch["target_slot"].shape
    per_slot = torch.zeros(batch["n_slots"]).index_add(0, batch["target_slot"], weights)
    want = [[3 + alpha, 3, 0], [2 + alpha, 2, 0], [3 + 4 * alpha, 3, 0], [2, 2 + 3 * alpha, 2 + 2 * alpha]]
    assert regroup(per_slot, batch).tolist() == want
    # Within a response the weights are 1 first, then alpha: the longest response of the batch, token by token.
    longest = batch["slots"][2, 0]
    assert weights[batch["target_slot"] == longest].tolist() == [1.0] * 3 + [alpha] * 4
    ones = length_desensitized_weights(batch["target_slot"], batch["slots"], batch["n_slots"], 1.0)
    assert torch.equal(ones, torch.ones_like(ones))


def test_ld_alpha_config() -> None:
    from dpokit.config import Config

    assert Config(loss={"ld_alpha": 0.5}).loss.ld_alpha == 0.5
    Config(loss={"name": "ipo", "ld_alpha": 0.0})  # a modifier of the log-probs: any loss takes it
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="ld_alpha"):
            Config(loss={"ld_alpha": bad})
    with pytest.raises(ValueError, match=r"loss\.ld_alpha: the reference store"):
        Config(loss={"ld_alpha": 0.5}, reference={"mode": "store"})


# ---------------------------------------------------------------------------------------------------------------
# WPO's pair weights (loss.use_weighting)


def test_wpo_pair_weights_by_hand() -> None:
    from dpokit.losses.tokens import wpo_pair_weights

    chosen = torch.tensor([-0.3, 0.2, 0.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-0.5, 0.1, 0.0, -1.0], requires_grad=True)
    weights = wpo_pair_weights(chosen, rejected)
    want = [math.exp(-0.8), 1.0, 1.0, math.exp(-3.0)]  # exp(0.3) > 1 is capped; log-weights 0 give 1
    assert_close(weights, torch.tensor(want, dtype=torch.float32))
    assert not weights.requires_grad  # a constant factor of each pair's loss: no gradient through it
    # Weighted DPO's gradient is the weight times DPO's: d(w * L)/d logp = w * dL/d logp, signs kept.
    logps = {k: v.clone().requires_grad_() for k, v in batch().items()}
    losses, _, _ = sigmoid_loss(**logps, beta=BETA)
    (losses * t([0.5, 1.0, 0.25])).sum().backward()
    g = grads("sigmoid")
    assert_close(logps["policy_chosen_logps"].grad, g["policy_chosen_logps"] * t([0.5, 1.0, 0.25]))


def test_use_weighting_config() -> None:
    from dpokit.config import Config

    assert Config(loss={"name": "ipo", "use_weighting": True}).loss.use_weighting
    with pytest.raises(ValueError, match=r"loss\.use_weighting: WPO weighs pairs"):
        Config(loss={"name": "plackett_luce", "use_weighting": True})


# ---------------------------------------------------------------------------------------------------------------
# KTO on unpaired examples


def test_kto_golden_values_by_hand() -> None:
    from dpokit.losses import kto_kl_baseline, kto_loss

    # r = beta * (pi - ref) = [0.1, -0.05, 0.2, -0.1]; z_0 = max(0, mean of the mismatched log-ratios) = 0.5
    policy, ref = t([-10.0, -20.5, -3.0, -7.0]), t([-11.0, -20.0, -5.0, -6.0])
    labels = torch.tensor([True, True, False, False])
    kl = kto_kl_baseline(t([-4.0, -6.0]), t([-4.5, -6.5]))
    assert kl.item() == 0.5
    losses, rewards = kto_loss(policy, ref, labels, kl, beta=BETA, desirable_weight=1.0, undesirable_weight=2.0)
    z = BETA * 0.5
    want = [1 - sigmoid(0.1 - z), 1 - sigmoid(-0.05 - z), 2 * (1 - sigmoid(z - 0.2)), 2 * (1 - sigmoid(z + 0.1))]
    assert_close(losses, t(want))
    assert_close(rewards, t([0.1, -0.05, 0.2, -0.1]))
    # The KL estimate is clamped at 0 and carries no gradient.
    assert kto_kl_baseline(t([-5.0]), t([-4.0])).item() == 0.0
    assert not kto_kl_baseline(t([-4.0]).requires_grad_(), t([-5.0])).requires_grad


def test_kto_gradient_signs_and_limits() -> None:
    from dpokit.losses import kto_loss

    policy = t([-10.0, -10.0]).requires_grad_()
    losses, rewards = kto_loss(policy, t([-10.0, -10.0]), torch.tensor([True, False]), 0.0, beta=BETA)
    assert_close(losses, t([0.5, 0.5]))  # pi = pi_ref, z = 0: 1 - sigmoid(0) for both kinds
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # raise the desirable response, lower the undesirable one
    assert not rewards.requires_grad
    # Saturation: far past the reference point an example stops pulling.
    far = t([90.0]).requires_grad_()
    kto_loss(far, t([0.0]), torch.tensor([True]), 0.0, beta=1.0)[0].sum().backward()
    assert abs(far.grad.item()) < 1e-30


def test_kto_is_refused_by_compute_loss_and_in_sums() -> None:
    with pytest.raises(ValueError, match="kto_loss"):
        compute_loss(loss_config(name="kto"), *batch().values(), *lengths().values())
    with pytest.raises(ValueError, match=r"loss\.weights\.kto:"):
        validate_loss_config(loss_config(weights={"sigmoid": 1.0, "kto": 1.0}))
    with pytest.raises(ValueError, match=r"loss\.desirable_weight: not used by loss sigmoid"):
        validate_loss_config(loss_config(name="sigmoid", desirable_weight=2.0))
    validate_loss_config(loss_config(name="kto", desirable_weight=1.33, undesirable_weight=1.0))
