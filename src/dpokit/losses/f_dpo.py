"""f-DPO: DPO with another f-divergence than reverse KL toward the reference, one logit per divergence.

The logit of the forward-KL and alpha divergences is a difference of exponentials of the log-ratios, which
overflows for a response the policy gives almost no mass (forward KL: e^{-a}, a = log pi/pi_ref); it is computed
so that loss and gradient stay finite for every beta and log-ratio, and exact wherever the exact ones fit the
dtype (``_exponential_logits``). Shapes: every tensor (batch,); log-probs summed over response tokens."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dpokit.losses.registry import check_non_negative, register

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""The f-divergences of ``f_dpo`` (TRL's ``f_divergence_type`` values)."""


def check_f_divergence(value: object) -> str | None:
    return None if value in F_DIVERGENCES else f"must be one of {', '.join(F_DIVERGENCES)}"


def check_f_dpo(params: dict[str, object]) -> tuple[str, str] | None:
    # The coefficient shapes alpha_divergence only; set beside another divergence it would be silently ignored.
    if "f_alpha_divergence_coef" in params and params.get("f_divergence") != "alpha_divergence":
        return "f_alpha_divergence_coef", (f"used only by f_divergence: alpha_divergence, not "
                                           f"{params.get('f_divergence')}; remove it")
    return None


def _exponential_logits(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                        scale: float) -> torch.Tensor:
    """z = beta * [f'(u_w) - f'(u_l)] for f'(u) = (u^s - 1) / s, u = e^a, s = c - 1 != 0 (forward KL: s = -1):

        z = (t_w - t_l) / s,   t = beta * e^{s a} = exp(s a + log beta),

    each t being z's derivative in its a (up to sign), and only t can overflow. With m = max(s a_w, s a_l), the
    exponents are capped by one shared shift: t = exp(s a + min(m + log beta, cap) - m), cap =
    log(finfo.max / 4) + min(0, log |s|). That keeps |z|, both t and every factor of the backward pass under
    finfo.max / 4, so loss and gradient are finite for any beta and log-ratio; below the cap (the shift is
    log beta) z and its gradient are exact. The shift is a constant for autograd: the gradient is t's own,
    beta * e^{s a}. The value of t_w - t_l is taken as exp(m + shift) * (expm1(s a_w - m) - expm1(s a_l - m)),
    in which one term is 0 and the difference never cancels (so c -> 1 tends to reverse KL,
    z -> beta * (a_w - a_l), smoothly); its gradient stays that of exp (expm1's own, result + 1, is 0 where
    the result rounds to -1).

    Past the cap the exact loss is either ~0 (z -> +inf: y_w ahead by an astronomic margin; the capped z is as
    good as infinite, unless a_w = a_l, where z = 0 exactly) or beyond the dtype's range (z -> -inf): the loss
    is then held finite, near finfo.max / 4 / max(1, |s|), and the gradient keeps its direction (y_w up, y_l
    down) at the largest size the dtype holds."""
    info = torch.finfo(chosen_logratios.dtype)
    x_w, x_l = scale * chosen_logratios, scale * rejected_logratios
    m = torch.maximum(x_w, x_l).detach()
    cap = math.log(info.max / 4) + min(0.0, math.log(abs(scale)))
    shift = torch.clamp(m + math.log(beta), max=cap) - m
    difference = torch.exp(x_w + shift) - torch.exp(x_l + shift)  # t_w - t_l
    exact = torch.exp(m + shift) * (torch.expm1(x_w - m) - torch.expm1(x_l - m))
    return (difference + (exact - difference).detach()) / scale


def _reverse_kl_logits(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
                       coef: float) -> torch.Tensor:
    # DPO's logit, computed as ``sigmoid`` computes it, so that the two are equal bit for bit.
    return beta * ((pc - pr) - (rc - rr))


def _js_logits(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
               coef: float) -> torch.Tensor:
    # f'(u) = log(2u / (1 + u)) = log 2 + log sigmoid(a): the log 2 cancels between y_w and y_l. logsigmoid
    # is exact for every a (a - softplus(a) is 0 past softplus's threshold of 20, where it should be -e^{-a}).
    return beta * (F.logsigmoid(pc - rc) - F.logsigmoid(pr - rr))


def _alpha_logits(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
                  coef: float) -> torch.Tensor:
    if coef == 1.0:  # the limit c -> 1 is reverse KL: DPO's margin, as TRL falls back to it
        return _reverse_kl_logits(pc, pr, rc, rr, beta, coef)
    return _exponential_logits(pc - rc, pr - rr, beta, coef - 1.0)


_F_DPO_LOGITS: dict[str, Callable[..., torch.Tensor]] = {
    # beta * [f'(u_w) - f'(u_l)] from the four summed log-probs.
    "reverse_kl": _reverse_kl_logits,
    "forward_kl": lambda pc, pr, rc, rr, beta, coef: _exponential_logits(pc - rc, pr - rr, beta, -1.0),
    "js_divergence": _js_logits,
    "alpha_divergence": _alpha_logits,
}


@register("f_dpo", {"f_divergence": check_f_divergence, "f_alpha_divergence_coef": check_non_negative},
          required=("f_divergence",), check=check_f_dpo)
def f_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence: str,
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f-DPO (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints", https://arxiv.org/abs/2309.16240): DPO with the reverse-KL penalty toward pi_ref
    replaced by an f-divergence D_f(pi || pi_ref). The optimal policy then satisfies
    r(x, y) = beta * f'(pi(y|x) / pi_ref(y|x)) + const, and the Bradley-Terry likelihood gives the paper's loss

        L = -log sigmoid(beta * [f'(u_w) - f'(u_l)]),   u = pi(y|x) / pi_ref(y|x) = exp(a),
        a = log pi(y|x) - log pi_ref(y|x) (summed),

    with f' for each ``f_divergence`` (constants dropped: they cancel between y_w and y_l):

        reverse_kl        f(u) = u log u                        f'(u) = log u              (DPO: ``sigmoid``)
        forward_kl        f(u) = -log u                         f'(u) = -1/u
        js_divergence     f(u) = u log u - (1+u) log((1+u)/2)   f'(u) = log(2u / (1+u))
        alpha_divergence                                        f'(u) = (u^(c-1) - 1) / (c - 1)

    so the logit is beta * h for reverse_kl (h as in ``cdpo``), beta * (exp(-a_l) - exp(-a_w)) for forward_kl,
    beta * (log sigmoid(a_w) - log sigmoid(a_l)) for js_divergence, and
    beta * (exp((c-1) a_w) - exp((c-1) a_l)) / (c - 1) for alpha_divergence with c = ``f_alpha_divergence_coef``
    (>= 0, default 0.5). c is TRL's coefficient (TRL 1.x: default 0.5, the same parametrization); the paper writes
    the family as f'(u) = (1 - u^-alpha) / alpha, which is this with alpha = 1 - c (older TRL took alpha itself,
    default 1.0). c = 0 is forward_kl exactly, c = 1 (the limit) reverse_kl, c = 0.5 the same divergence in both
    parametrizations. The paper's point: divergences other than reverse KL keep more of pi_ref's diversity at a
    similar reward. Each f is convex, so f' increases and every variant raises y_w and lowers y_l.

    Loss and gradient are finite for every beta and log-ratio, and equal to the formula's wherever the exact
    loss and gradient are at most finfo.max * min(1, |c - 1|) / 8 (forward_kl: c = 0): the exponential logits
    are computed and capped as ``_exponential_logits`` says. Past that, the exact loss is beyond the dtype.
    Shapes: every input and output is (batch,).
    """
    if f_divergence not in _F_DPO_LOGITS:
        raise ValueError(f"f_divergence: unknown '{f_divergence}' (known: {', '.join(F_DIVERGENCES)})")
    logits = _F_DPO_LOGITS[f_divergence](policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, beta, f_alpha_divergence_coef)
    losses = -F.logsigmoid(logits)
    return (losses, beta * (policy_chosen_logps - ref_chosen_logps).detach(),
            beta * (policy_rejected_logps - ref_rejected_logps).detach())
