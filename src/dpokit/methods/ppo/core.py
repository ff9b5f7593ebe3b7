"""PPO's math as pure tensor functions: per-token KL and rewards, GAE, the clipped losses, the KL controller.

Nothing here touches a model or a process group. Shapes follow the RLHF papers' vocabulary: a rollout is a batch
of B sampled responses, right-padded to T tokens; ``mask`` (B, T) is 1 on each row's real response tokens (a
prefix of the row) and 0 on padding. Log-probs are those of the *sampled* token at each position, (B, T).
Per-token outputs are returned unmasked unless a docstring says otherwise; the trainer masks and reduces.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Sums = Callable[[list[float]], list[float]]
"""Elementwise sum of a list of floats over every process (``Dist.sum``); the identity in a single process."""


def _local(values: list[float]) -> list[float]:
    return list(values)


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1: sum(x * m) / sum(m). Scalar; differentiable."""
    m = _float_mask(mask, x)
    return (x * m).sum() / m.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked entries, sum(m * (x - mean)^2) / (n - 1) (``unbiased``) or / n, with
    n = sum(m). Two passes (mean first), which keeps the round-off of a large mean out of the variance. Scalar."""
    m = _float_mask(mask, x)
    n = m.sum()
    centered = (x - masked_mean(x, m)) * m
    denominator = n - 1 if unbiased else n
    return (centered * centered).sum() / denominator


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           sums: Sums | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; ``shift_mean=False`` adds the mean back,
    x -> mean + (x - mean) / sqrt(var + eps), which rescales rewards without moving their level.

    mean and the unbiased var are taken over every process's masked entries when ``sums`` sums a list over the
    processes (``Dist.sum``), so N ranks whiten exactly as one process holding all their rows would; ``None``
    is this process alone. The statistics are constants (computed in float64 through Python floats, no gradient
    flows through them): whitening is applied to advantages and rewards, which are never differentiated.
    Padding entries are returned as they come out of the formula; mask them downstream. Shape of ``x``.
    """
    sums = sums or _local
    m = _float_mask(mask, x)
    x64, m64 = x.detach().double(), m.detach().double()
    total, count = sums([float((x64 * m64).sum()), float(m64.sum())])
    if count < 2:
        raise ValueError(f"whiten needs at least 2 masked entries for a variance, got {count:g}")
    mean = total / count
    (squares,) = sums([float((((x64 - mean) * m64) ** 2).sum())])
    var = squares / (count - 1)
    out = (x - mean) / math.sqrt(var + eps)
    return out + mean if not shift_mean else out


# ---------------------------------------------------------------------------------------------------------------
# Per-token KL to the reference. Each estimator is a function of the sampled token's log-ratio only; samples come
# from pi, so a masked mean of any of them estimates KL(pi || pi_ref) of the response distribution, per token.


def _k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return logps - ref_logps


def _k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logps - ref_logps) ** 2


def _k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logps - logps
    # expm1 keeps exp(x) - 1 - x accurate near x = 0, where the three terms nearly cancel.
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token y_t ~ pi (Schulman, "Approximating KL
    divergence", http://joschu.net/blog/kl-approx.html), with log r = log pi_ref(y_t) - log pi(y_t):

        k1 = -log r = log pi(y_t) - log pi_ref(y_t)     unbiased, per-token values may be negative;
        k2 = 0.5 * (log r)^2                             biased (exact to second order), >= 0;
        k3 = (r - 1) - log r                             unbiased (E_pi[r] = 1) and >= 0 (log r <= r - 1).

    k1 summed over a response is log pi(y) - log pi_ref(y), the KL penalty of the RLHF objective of Ziegler et
    al. 2019 (https://arxiv.org/abs/1909.08593, Eq. 2). Shapes: (B, T) in, (B, T) out, unmasked.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logps, ref_logps)


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    """Response lengths (B,) from a right-padded mask, checking that each row is a non-empty prefix."""
    m = mask.bool()
    lengths = m.sum(dim=1)
    positions = torch.arange(m.shape[1], device=m.device)
    if bool((lengths == 0).any()) or not torch.equal(m, positions < lengths[:, None]):
        raise ValueError("mask must mark a non-empty prefix of each row (right-padded responses)")
    return lengths


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token reward of RLHF with a KL penalty (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593,
    Eq. 2; Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, Eq. 2), spread over the response's tokens:

        r_t = -kl_coef * kl_t + [t == last real token] * score,    kl_t = kl_per_token(logps, ref_logps)_t,

    so that sum_t r_t = score(x, y) - kl_coef * KL-estimate(y): the sequence-level objective, with the penalty
    credited to the token that incurred it. ``scores`` (B,), the reward model's score of each response;
    ``logps``/``ref_logps`` (B, T) of the sampled tokens under the rollout policy and the reference.
    Returns ``(rewards, kl)``, each (B, T), zero on padding.
    """
    m = _float_mask(mask, logps)
    kl = kl_per_token(logps, ref_logps, estimator) * m
    rewards = -kl_coef * kl
    last = _lengths(mask) - 1
    score_at_end = torch.zeros_like(rewards)
    score_at_end[torch.arange(rewards.shape[0], device=rewards.device), last] = scores.to(rewards.dtype)
    return rewards + score_at_end, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438, Sec. 3):

        delta_t = r_t + gamma * V_{t+1} - V_t,       V_{t+1} = 0 after a row's last real token (terminal),
        A_t     = sum_{l >= 0} (gamma * lam)^l * delta_{t+l} = delta_t + gamma * lam * A_{t+1},
        R_t     = A_t + V_t                           (the lambda-return, the value target).

    lam = 0 is the one-step TD error, lam = 1 the Monte Carlo return minus V_t. ``rewards``/``values`` (B, T),
    values of the rollout policy's critic (pass them detached). Returns ``(advantages, returns)``, each (B, T),
    zero on padding. Vectorized over the batch, one backward pass over T.
    """
    m = _float_mask(mask, rewards)
    batch, steps = rewards.shape
    next_value = rewards.new_zeros(batch)
    next_advantage = rewards.new_zeros(batch)
    advantages = [rewards.new_zeros(batch)] * steps
    for t in reversed(range(steps)):
        # next_value/next_advantage are already zero past the last real token: padding ends the episode.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        advantages[t] = advantage
        next_value, next_advantage = values[:, t] * m[:, t], advantage
    adv = torch.stack(advantages, dim=1)
    return adv, (adv + values) * m


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, Eq. 7),
    as a loss to minimize:

        ratio_t = exp(log pi(y_t) - log pi_old(y_t)),
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip, 1 + clip)).

    The max is the paper's pessimistic min of the objective: once the ratio has moved past 1 +- clip in the
    direction A_t favours, the clipped branch is the larger loss, it is constant, and that token's gradient is 0.

    Returns ``(loss, clipped, approx_kl)``, each (B, T), unmasked:
    ``clipped`` is 1.0 where the clipped branch is strictly larger (the clip changed the loss), else 0.0;
    ``approx_kl`` = 0.5 * (log pi - log pi_old)^2, the k2 estimator of KL(pi_old || pi) on tokens sampled from
    pi_old: >= 0 on every token (k1's minibatch mean can be negative) and equal to the KL to second order in the
    log-ratio, which is all a monitor of the size of a small policy step needs.
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    clipped = clipped_loss > unclipped_loss
    loss = torch.where(clipped, clipped_loss, unclipped_loss)
    return loss, clipped.to(logps.dtype), 0.5 * log_ratio.detach() ** 2


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, per token (from the PPO authors' baselines code; "value function clipping" among the
    code-level optimizations of PPO listed by Engstrom et al. 2020, https://arxiv.org/abs/2005.12729):

        V_clip = V_old + clip(V - V_old, -clip, clip),
        loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2).

    The critic cannot cut its error by moving further than ``clip`` from the rollout's values in one update.
    Returns ``(loss, clipped)``, each (B, T), unmasked; ``clipped`` is 1.0 where the clipped branch is strictly
    larger (its gradient is then 0 if V moved past the clip range).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    clipped = clipped_sq > unclipped_sq
    return 0.5 * torch.where(clipped, clipped_sq, unclipped_sq), clipped.to(values.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the masked entries: 1 for a perfect critic, 0 for one that predicts the
    mean return, negative for a worse one; nan when the returns are constant (Var[R] = 0)."""
    returns64, values64 = returns.detach().double(), values.detach().double()
    var_returns = float(masked_var(returns64, mask))
    if var_returns == 0:
        return math.nan
    return 1.0 - float(masked_var(returns64 - values64, mask)) / var_returns


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, H = -sum_v p_v log p_v with
    log p = logits - logsumexp(logits) (log_softmax: no overflow for large logits). A logit of -inf (a banned
    token) contributes 0, in value and gradient. Shape (..., V) -> (...)."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # 0 * log 0 = 0; masking logp (not the product) keeps the gradient finite there too.
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1)


class KLController:
    """The KL coefficient beta of the RLHF reward r - beta * KL.

    Fixed when ``target`` is None. Otherwise the adaptive controller of Ziegler et al. 2019
    (https://arxiv.org/abs/1909.08593, Sec. 2.2), a proportional controller on log(beta):

        e = clip(KL / target - 1, -0.2, 0.2),        beta <- beta * (1 + e * n / horizon),

    where KL is the rollout's measured KL (per response) and n the number of samples it was measured on.
    """

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000):
        if init_coef < 0:
            raise ValueError(f"init_coef must be >= 0, got {init_coef}")
        if target is not None and target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict[str, float | int | None]:
        # JSON writes a float as its shortest round-tripping repr, so a resumed controller is bit-identical.
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = None if state["target"] is None else float(state["target"])
        self.horizon = int(state["horizon"])
