"""Loss edge cases: f_dpo finite for every beta and log-ratio and exact wherever the exact loss is representable,
js_divergence to the last bit, rpo's NLL on the plain chosen log-prob. References are worked out with ``math``."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.losses import LOSSES, rpo_loss

INF = math.inf
# Log-ratios a = log pi(y|x) - log pi_ref(y|x) up to +-800 nats; the reference log-probs are 0, so a is the
# policy's log-prob exactly in either dtype.
LOG_RATIOS = [-800.0, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 800.0]
BETAS = [0.01, 0.1, 1.0, 10.0]
# (f_divergence, c): f'(u) = (u^(c-1) - 1) / (c - 1) for the alpha-divergence; forward_kl is c = 0.
DIVERGENCES = [("reverse_kl", None), ("forward_kl", None), ("js_divergence", None), ("alpha_divergence", 0.5),
               ("alpha_divergence", 2.5), ("alpha_divergence", 0.999)]


def softplus(x: float) -> float:
    """log(1 + e^x) for any float x, inf included."""
    if x == INF:
        return INF
    return max(x, 0.0) + math.log1p(math.exp(-abs(x))) if x != -INF else 0.0


def log_sigmoid(x: float) -> float:
    return -softplus(-x)


def exp_or_inf(x: float) -> float:
    return math.exp(x) if x < 709.78 else INF


def exact_f_dpo(a_w: float, a_l: float, beta: float, divergence: str, c: float | None) -> dict[str, float]:
    """L = softplus(-z), z = beta * (f'(u_w) - f'(u_l)), and dL/da_w, dL/da_l, in float64 with ``math``,
    through logs so that a magnitude past float64's range comes out inf (or 0), never as a wrong finite number.
    Also log(|t_w| + |t_l|), the size of the two terms of f'(u_w) - f'(u_l), for the error bound."""
    if divergence in ("forward_kl", "alpha_divergence"):
        s = (c if c is not None else 0.0) - 1.0  # f'(u) = (e^{s a} - 1) / s; dz/da = beta * e^{s a}
        x_w, x_l = s * a_w, s * a_l
        m = max(x_w, x_l)
        q = math.expm1(x_w - m) - math.expm1(x_l - m)  # e^{x_w - m} - e^{x_l - m}, one term exact
        z = 0.0 if q == 0 else math.copysign(exp_or_inf(math.log(beta / abs(s)) + m + math.log(abs(q))), q / s)
        log_dz = (math.log(beta) + x_w, math.log(beta) + x_l)  # log |dz/da_w|, log |dz/da_l|
        log_terms = max(x_w, x_l) + math.log1p(math.exp(-abs(x_w - x_l))) - math.log(abs(s))
    else:
        if divergence == "reverse_kl":  # f'(u) = a
            t_w, t_l, d_w, d_l = a_w, a_l, 1.0, 1.0
        else:  # js: f'(u) = log 2 + log sigmoid(a), f''(u) u = sigmoid(-a)
            t_w, t_l = log_sigmoid(a_w), log_sigmoid(a_l)
            d_w, d_l = math.exp(log_sigmoid(-a_w)), math.exp(log_sigmoid(-a_l))
        z = beta * (t_w - t_l)
        log_dz = (math.log(beta * d_w) if d_w else -INF, math.log(beta * d_l) if d_l else -INF)
        log_terms = math.log(abs(t_w) + abs(t_l)) if (t_w or t_l) else -INF
    log_sig = log_sigmoid(-z)  # dL/dz = -sigmoid(-z)
    return {"loss": softplus(-z), "z": z, "log_terms": log_terms,
            "grad_w": -exp_or_inf(log_sig + log_dz[0]), "grad_l": exp_or_inf(log_sig + log_dz[1])}


def f_dpo_on_grid(beta: float, divergence: str, c: float | None, dtype: torch.dtype):
    pairs = [(w, lo) for w in LOG_RATIOS for lo in LOG_RATIOS]
    pc = torch.tensor([w for w, _ in pairs], dtype=dtype, requires_grad=True)
    pr = torch.tensor([lo for _, lo in pairs], dtype=dtype, requires_grad=True)
    zeros = torch.zeros(len(pairs), dtype=dtype)
    params = {"f_divergence": divergence, **({"f_alpha_divergence_coef": c} if c is not None else {})}
    losses, _, _ = LOSSES["f_dpo"](pc, pr, zeros, zeros, beta=beta, **params)
    losses.sum().backward()  # each pair's loss depends on that pair alone: the gradients are per pair
    return pairs, losses.detach(), pc.grad, pr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("divergence, c", DIVERGENCES, ids=[f"{d}-{c}" for d, c in DIVERGENCES])
@pytest.mark.parametrize("beta", BETAS)
def test_f_dpo_is_finite_for_every_beta_and_log_ratio_and_exact_where_representable(beta, divergence, c, dtype):
    """Value and gradient are finite for every pair of log-ratios in +-800 nats, and equal the exact loss
    wherever the exact loss and its gradient are at most finfo.max * min(1, |c - 1|) / 8: below that the cap
    on beta * u^(c-1) (``dpokit.losses.f_dpo``) is never reached. Past it the exact loss is inf (a response the
    policy gave almost no mass on the losing side) and the loss is held finite instead.

    Error bound, derived: the logit z is computed from exponents (s a, m + log beta) each rounded to within a
    couple of ulps of their size, and exp turns an absolute error eps * |x| in x into a relative one; with
    K = 1 + |s a_w| + |s a_l| + |log beta| (s = c - 1, or 1), |dz| <= 8 eps K beta (|t_w| + |t_l|), t_w, t_l the
    two terms of f'(u_w) - f'(u_l). Doubled for the reference's own float64 rounding: 16 eps K. Then
    |dL| <= sigmoid(-z) |dz| + 4 eps L, and the gradient, -sigmoid(-z) beta f''(u) u, is off by a factor
    exp(sigmoid(z) |dz| + 16 eps K). A value below finfo.tiny may be subnormal or flushed to 0: tiny absolute."""
    pairs, losses, grad_w, grad_l = f_dpo_on_grid(beta, divergence, c, dtype)
    assert torch.isfinite(losses).all() and torch.isfinite(grad_w).all() and torch.isfinite(grad_l).all()
    info = torch.finfo(dtype)
    s = 1.0 if c is None and divergence != "forward_kl" else (c or 0.0) - 1.0
    bound = info.max * min(1.0, abs(s)) / 8
    compared = 0
    for i, (a_w, a_l) in enumerate(pairs):
        want = exact_f_dpo(a_w, a_l, beta, divergence, c)
        if not (want["loss"] <= bound and abs(want["grad_w"]) <= bound and abs(want["grad_l"]) <= bound):
            continue
        compared += 1
        k = 1 + abs(s * a_w) + abs(s * a_l) + abs(math.log(beta))
        rel = 16 * info.eps * k
        log_dz = math.log(rel * beta) + want["log_terms"]  # log of the bound on |dz|
        dz = exp_or_inf(log_dz)
        loss_tol = exp_or_inf(log_sigmoid(-want["z"]) + log_dz) + 4 * info.eps * want["loss"] + info.tiny
        assert abs(losses[i].item() - want["loss"]) <= loss_tol, (a_w, a_l, losses[i].item(), want)
        y = math.exp(log_sigmoid(want["z"])) * dz + rel  # log of the factor the gradient may be off by
        for got, exact in ((grad_w[i].item(), want["grad_w"]), (grad_l[i].item(), want["grad_l"])):
            log_expm1_y = y + math.log1p(-math.exp(-y)) if y > 0 else -INF
            tol = (exp_or_inf(math.log(abs(exact)) + log_expm1_y) if exact else 0.0) + info.tiny
            assert abs(got - exact) <= tol, (a_w, a_l, got, exact, want)
    assert compared >= 45  # most of the 81 pairs: the test compares, not only checks finiteness


def test_f_dpo_beta_above_four_stays_finite() -> None:
    # forward KL in fp32 with the chosen response far behind: a_w = -87.5 nats, a_l = 0. e^{87.5} = 1.0e38 fits
    # fp32 (max 3.4e38); beta * e^{87.5} does not for beta = 10, and the exact loss, -z = beta (e^{87.5} - 1), is
    # past fp32's range. The loss is held finite, at the cap (finfo.max / 4 = 8.5e37, within a few ulps), and
    # its gradient too: still the largest push the dtype allows, not an inf that skips the step.
    pc = torch.tensor([-87.5], requires_grad=True)
    pr = torch.tensor([0.0], requires_grad=True)
    losses, _, _ = LOSSES["f_dpo"](pc, pr, torch.zeros(1), torch.zeros(1), beta=10.0, f_divergence="forward_kl")
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert losses.item() == pytest.approx(torch.finfo(torch.float32).max / 4, rel=1e-5)
    assert pc.grad.item() <= 0  # raising y_w lowers the loss (or, past the cap, leaves it)


def test_js_divergence_keeps_log_sigmoid_exact_past_softplus_threshold() -> None:
    # a_w = 21, a_l = 30 (past softplus's threshold of 20, where softplus(a) returns a and a - softplus(a) = 0):
    # f'(u_w) - f'(u_l) = log sigmoid(21) - log sigmoid(30) = -7.58e-10, not 0; dL/da_w = -sigmoid(-z) e^{-21}/(1
    # + e^{-21}) = -3.79e-10, not 0. In float64 the loss ln 2 + 3.8e-10 rounds to within 2 ulps (4.4e-16 of
    # ln 2 ~ 0.69: 1e-15 absolute); the gradient to a few ulps of itself (rtol 1e-12).
    a_w, a_l, beta = 21.0, 30.0, 1.0
    z = beta * (log_sigmoid(a_w) - log_sigmoid(a_l))
    pc = torch.tensor([a_w], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([a_l], dtype=torch.float64)
    zeros = torch.zeros(1, dtype=torch.float64)
    losses, _, _ = LOSSES["f_dpo"](pc, pr, zeros, zeros, beta=beta, f_divergence="js_divergence")
    losses.backward()
    assert abs(losses.item() - softplus(-z)) <= 1e-15
    want_grad = -math.exp(log_sigmoid(-z)) * beta * math.exp(log_sigmoid(-a_w))
    assert pc.grad.item() == pytest.approx(want_grad, rel=1e-12)


def test_rpo_nll_is_on_the_plain_chosen_log_prob() -> None:
    # With LD-DPO the log-probs every loss sees are length-desensitized: here y_w's is -12 (its plain
    # log-prob, -20, with the tokens past the rejected one's length counted at alpha). RPO's NLL term is the
    # plain per-token NLL of y_w (Pang et al. 2024): 20 / 4 = 5, with the DPO term on the desensitized
    # log-probs: h = (-12 + 15) - (-13 + 15) = 1. L = -log sigmoid(0.1) + 0.5 * 5 = 0.74440 + 2.5.
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    losses, chosen_rewards, _ = rpo_loss(t(-12.0), t(-15.0), t(-13.0), t(-15.0), beta=0.1, chosen_lengths=t(4.0),
                                         alpha=0.5, plain_chosen_logps=t(-20.0))
    assert losses.item() == pytest.approx(-log_sigmoid(0.1) + 0.5 * 5.0, rel=1e-12)
    assert chosen_rewards.item() == pytest.approx(0.1 * (-12.0 + 13.0), rel=1e-12)  # rewards: LD log-probs
    # Without LD-DPO the plain log-prob is the one given: the same loss as before.
    same, _, _ = rpo_loss(t(-20.0), t(-15.0), t(-13.0), t(-15.0), beta=0.1, chosen_lengths=t(4.0), alpha=0.5)
    assert same.item() == pytest.approx(-log_sigmoid(0.1 * (-5.0 - 2.0)) + 0.5 * 5.0, rel=1e-12)
