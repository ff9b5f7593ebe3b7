"""Pairwise preference losses: one pure function per variant, each with the equation it implements.

Shapes: every tensor (batch,); log-probs summed over response tokens; lengths are response token counts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpokit.losses.registry import (
    check_bool,
    check_flip_rate,
    check_non_negative,
    check_positive,
    check_smoothed_flip_rate,
    register,
)


def _rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    # Rewards are reported, never differentiated: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)).
    return beta * (policy_logps - ref_logps).detach()


def _per_token(logps: torch.Tensor, lengths: torch.Tensor | None, loss: str, which: str) -> torch.Tensor:
    """Summed log-probs (batch,) -> mean log-prob per response token (batch,). Lengths must be >= 1."""
    if lengths is None:
        raise ValueError(f"loss '{loss}' averages log-probs per token: pass {which}_lengths (response token counts)")
    return logps / lengths.to(logps.dtype)


def _margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = pi_logratios - ref_logratios, the argument of DPO's sigmoid before beta. Shape (batch,)."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    return pi_logratios - ref_logratios


@register("sigmoid", {"reference_free": check_bool})
def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO, Eq. 7 of Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290):

        L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

    ``reference_free`` sets the reference log-probs to zero (an implicit uniform reference).
    Shapes: every input and output is (batch,).
    """
    if reference_free:
        ref_chosen_logps = torch.zeros_like(ref_chosen_logps)
        ref_rejected_logps = torch.zeros_like(ref_rejected_logps)
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    logits = pi_logratios - ref_logratios
    losses = -F.logsigmoid(beta * logits)
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))


@register("cdpo", {"label_smoothing": check_flip_rate}, required=("label_smoothing",))
def cdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conservative DPO (cDPO; Mitchell 2023, https://ericmitchell.ai/cdpo.pdf), the ``label_smoothing`` of the
    DPO authors' code: Eq. 7 of https://arxiv.org/abs/2305.18290 with labels flipped at rate eps,

        L = (1 - eps) * -log sigmoid(beta * h) + eps * -log sigmoid(-beta * h),
        h = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x)).

    The minimum is at a finite margin, sigmoid(beta * h) = 1 - eps, so confident pairs stop being pushed.
    eps = 0 is ``sigmoid``. Shapes: every input and output is (batch,).
    """
    logits = beta * _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (1 - label_smoothing) * -F.logsigmoid(logits) + label_smoothing * -F.logsigmoid(-logits)
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))


@register("robust", {"label_smoothing": check_flip_rate}, required=("label_smoothing",))
def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Robust DPO (rDPO; Chowdhury et al. 2024, "Provably Robust DPO", https://arxiv.org/abs/2403.00409),
    the unbiased estimate of the clean-label DPO loss when labels flip at a known rate eps:

        L = [(1 - eps) * -log sigmoid(beta * h) - eps * -log sigmoid(-beta * h)] / (1 - 2 * eps),

    h as in ``cdpo``. Unlike cDPO, the flipped term is subtracted, so in expectation over the label noise the
    loss (and its gradient) equals the noise-free DPO loss; it is unbounded below for a single pair and may be
    negative. eps = 0 is ``sigmoid``. Shapes: every input and output is (batch,).
    """
    logits = beta * _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = ((1 - label_smoothing) * -F.logsigmoid(logits) - label_smoothing * -F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing)
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))


@register("ipo")
def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO, Eq. 17 of Azar et al. 2023 (https://arxiv.org/abs/2310.12036), with ``beta`` playing tau:

        L = (h - 1 / (2 * beta))^2,

    h = pi_logratios - ref_logratios computed on log-probs averaged per response token (each summed log-prob
    divided by its length), as in the IPO authors' experiments: with summed log-probs the fixed target margin
    1/(2 beta) would mean different things for short and long responses. A squared loss regresses h onto the
    target instead of pushing it to infinity, which is IPO's guard against overfitting deterministic preferences;
    so past the target, raising the chosen log-prob *raises* the loss.

    Rewards are still reported as beta * (log pi - log pi_ref) on *summed* log-probs, the DPO implicit reward,
    so that reward metrics are comparable across losses. Requires both lengths.
    Shapes: every input and output is (batch,).
    """
    h = _margin(
        _per_token(policy_chosen_logps, chosen_lengths, "ipo", "chosen"),
        _per_token(policy_rejected_logps, rejected_lengths, "ipo", "rejected"),
        _per_token(ref_chosen_logps, chosen_lengths, "ipo", "chosen"),
        _per_token(ref_rejected_logps, rejected_lengths, "ipo", "rejected"),
    )
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))


@register("hinge")
def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinge (SLiC) loss: the rank-calibration loss max(0, delta - log pi(y_w|x) + log pi(y_l|x)) of SLiC-HF
    (Zhao et al. 2023, Eq. 1 of https://arxiv.org/abs/2305.10425), on the reference-normalized log-ratios
    as in RSO (Liu et al. 2023, https://arxiv.org/abs/2309.06657):

        L = relu(1 - beta * h),   h as in ``cdpo``,

    i.e. beta * relu(1/beta - h): the margin is delta = 1/beta. Pairs already separated by the margin give zero
    loss and zero gradient. Shapes: every input and output is (batch,).
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * h)
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))


@register("simpo", {"gamma": check_non_negative})
def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO, Eq. 6 of Meng et al. 2024 (https://arxiv.org/abs/2405.14734):

        L = -log sigmoid(beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma).

    Reference-free: the reward is the length-normalized policy log-prob, beta * log pi(y|x) / |y|, and the
    reference log-probs are ignored. gamma is a target reward margin (default 0.5). The paper uses much larger
    beta (2 to 10) than DPO. Rewards reported are that reward. Requires both lengths.
    Shapes: every input and output is (batch,).
    """
    chosen_rewards = beta * _per_token(policy_chosen_logps, chosen_lengths, "simpo", "chosen")
    rejected_rewards = beta * _per_token(policy_rejected_logps, rejected_lengths, "simpo", "rejected")
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@register("rpo", {"alpha": check_positive}, plain_chosen=True)
def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    alpha: float = 1.0,
    plain_chosen_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RPO, the L_DPO+NLL objective of Iterative Reasoning Preference Optimization (Pang et al. 2024,
    https://arxiv.org/abs/2404.19733):

        L = -log sigmoid(beta * h) + alpha * (-log pi(y_w|x) / |y_w|),   h as in ``cdpo``.

    The per-token NLL of the chosen response keeps its likelihood from falling, which plain DPO allows as long as
    the rejected one falls faster. alpha defaults to 1 (the paper's value). Requires ``chosen_lengths``.
    The NLL is that of y_w's every token, log pi(y_w|x) as the model gives it: with ``loss.ld_alpha`` the DPO
    term compares length-desensitized log-probs, and the training step passes the plain one as
    ``plain_chosen_logps`` (default: ``policy_chosen_logps``). Shapes: every input and output is (batch,).
    """
    chosen_logps = policy_chosen_logps if plain_chosen_logps is None else plain_chosen_logps
    nll = -_per_token(chosen_logps, chosen_lengths, "rpo", "chosen")
    losses, chosen_rewards, rejected_rewards = sigmoid_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta)
    return losses + alpha * nll, chosen_rewards, rejected_rewards


@register("nca_pair")
def nca_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NCA for preference pairs (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", https://arxiv.org/abs/2402.05369), with r = beta * (log pi(y|x) - log pi_ref(y|x)):

        L = -log sigmoid(r_w) - 1/2 * log sigmoid(-r_w) - 1/2 * log sigmoid(-r_l).

    Each response's reward is fitted on its own scale (not only the difference, as in DPO), so the chosen
    likelihood is pushed up rather than just above the rejected one; the chosen term is minimized at r_w = ln 2.
    Shapes: every input and output is (batch,).
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@register("apo_zero")
def apo_zero_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """APO-zero, Eq. 7 of D'Oosterlinck et al. 2024 (https://arxiv.org/abs/2408.06266), with
    r = beta * (log pi(y|x) - log pi_ref(y|x)):

        L = 1 - sigmoid(r_w) + sigmoid(r_l).

    Anchored at zero: raises the chosen and lowers the rejected likelihood each against the reference, for data
    whose chosen answers are better than the model's own. The constant 1 (absent in the paper) keeps L >= 0.
    Shapes: every input and output is (batch,).
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@register("apo_down")
def apo_down_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """APO-down, Eq. 8 of D'Oosterlinck et al. 2024 (https://arxiv.org/abs/2408.06266), r as in ``apo_zero``:

        L = sigmoid(r_w) + 1 - sigmoid(r_w - r_l).

    For data whose chosen answers are *worse* than the model's own: lowers the chosen likelihood, and the
    rejected one more, so the gradient on the chosen log-prob is deliberately not always negative.
    The constant 1 (absent in the paper) keeps L >= 0. Shapes: every input and output is (batch,).
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = torch.sigmoid(chosen_rewards) + 1 - torch.sigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@register("unlikelihood", {"alpha": check_positive})
def unlikelihood_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Unlikelihood baseline of the DPO paper (Section 6, after Welleck et al. 2019,
    https://arxiv.org/abs/1908.04319): raise the likelihood of y_w, lower that of y_l,

        L = -a_w - alpha * log(1 - exp(a_l)),   a = log pi(y|x) / |y|  (mean log-prob per response token).

    exp(a_l) is the geometric-mean probability of y_l's tokens, so the second term is Welleck's token-level
    unlikelihood -log(1 - p) taken at that mean (a pairwise loss sees summed log-probs, not per-token ones). It
    is bounded, unlike -log pi(y_l|x), and its gradient fades once y_l is unlikely. The reference is not used;
    rewards are reported as beta * (log pi - log pi_ref) for comparison with DPO. Requires both lengths.
    Shapes: every input and output is (batch,).
    """
    chosen = _per_token(policy_chosen_logps, chosen_lengths, "unlikelihood", "chosen")
    rejected = _per_token(policy_rejected_logps, rejected_lengths, "unlikelihood", "rejected")
    # log(1 - e^a) = log(-expm1(a)), exact for a near 0 where 1 - e^a underflows; a < 0 always (a log-prob).
    unlikely = torch.log(-torch.expm1(rejected.clamp(max=-1e-6)))
    losses = -chosen - alpha * unlikely
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))


@register("exo_pair", {"label_smoothing": check_smoothed_flip_rate})
def exo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    label_smoothing: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EXO for pairs (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    https://arxiv.org/abs/2402.00856), its objective with K = 2 responses per prompt: the *reverse* KL from
    the policy's preference distribution p = (sigmoid(beta * h), sigmoid(-beta * h)) over (y_w, y_l) to the
    label distribution q = (1 - eps, eps),

        L = KL(p || q) = sigmoid(beta * h) * [log sigmoid(beta * h) - log(1 - eps)]
                       + sigmoid(-beta * h) * [log sigmoid(-beta * h) - log eps],   h as in ``cdpo``.

    DPO with label smoothing (``cdpo``) minimizes the forward KL(q || p) (plus q's entropy); EXO's reverse KL
    is mode-seeking, which is the paper's argument for it. Both are minimized where sigmoid(beta * h) = 1 - eps,
    where EXO is 0. eps (``label_smoothing``, default 1e-3, the value the EXO authors' pairwise setting uses)
    must be > 0: with hard labels (eps = 0) q gives y_l no mass, log eps is -inf and the loss is infinite at
    every finite margin, so eps = 0 is refused rather than silently replaced. Shapes: every input and output is
    (batch,).
    """
    logits = beta * _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    log_p_w, log_p_l = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = (log_p_w.exp() * (log_p_w - math.log(1 - label_smoothing))
              + log_p_l.exp() * (log_p_l - math.log(label_smoothing)))
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))


@register("sppo_hard")
def sppo_hard_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language Model
    Alignment", https://arxiv.org/abs/2405.00675): the squared loss of the paper's Algorithm 1,
    (log pi(y|x)/pi_ref(y|x) - eta * (P(y beats pi_ref | x) - 1/2))^2, with eta = 1/beta and the win
    probability P set to 1 for y_w and 0 for y_l instead of estimated by a preference model:

        L = (a_w - 1/(2 * beta))^2 + (a_l + 1/(2 * beta))^2,   a = log pi(y|x) - log pi_ref(y|x) (summed).

    Each response's log-ratio is regressed onto its own target, +-1/(2 beta), rather than only their
    difference: L = 1/2 * (h - 1/beta)^2 + 1/2 * (a_w + a_l)^2, i.e. half an IPO loss on summed log-probs
    with target 1/beta plus a term holding the two log-ratios symmetric about 0. Past its target a log-ratio is
    pulled back. Shapes: every input and output is (batch,).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = (chosen_logratios - 1 / (2 * beta)) ** 2 + (rejected_logratios + 1 / (2 * beta)) ** 2
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))


@register("discopop", {"discopop_tau": check_positive})
def discopop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiscoPOP, the log-ratio modulated loss (LRML) found by LLM-driven search in Chris Lu et al. 2024,
    "Discovering Preference Optimization Algorithms with and for Large Language Models"
    (https://arxiv.org/abs/2406.08414): with z = beta * h (h as in ``cdpo``) and m = sigmoid(z / tau),

        L = (1 - m) * -log sigmoid(z) + m * exp(-z),

    a blend of DPO's logistic loss (pairs ranked wrongly, z << 0) and the exponential loss (pairs ranked
    right, z >> 0), switched by the sign of z at a sharpness set by tau (``discopop_tau``, default 0.05, the
    paper's). At z = 0 it is (ln 2 + 1) / 2 whatever tau; tau -> infinity gives the plain average of the two.

    The blend is not monotone (the paper calls it non-convex): near z = 0 the weight moves onto the exponential
    term, which is the larger one there, so raising the margin *raises* the loss. Its slope at z = 0 is
    dL/dz = (1 - ln 2) / (4 tau) - 3/4, positive for tau < (1 - ln 2) / 3 ~ 0.102: at tau = 0.05 the loss rises
    on -0.119 < z < 0.072 and has a local minimum at z ~ -0.119, a pair ranked the wrong way. Every pair starts
    at z = 0 (pi = pi_ref), so the first step lowers every margin; whether training then leaves the bump depends
    on the step size (the tiny test model with AdamW is past it by step 4, then learns as DPO does). A run whose
    margins hover just below zero is this, not a bug. m * exp(-z) is computed as exp(log sigmoid(z / tau) - z),
    finite where exp(-z) alone overflows. Shapes: every input and output is (batch,).
    """
    logits = beta * _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    modulation = torch.sigmoid(logits / discopop_tau)
    exponential = torch.exp(F.logsigmoid(logits / discopop_tau) - logits)
    losses = (1 - modulation) * -F.logsigmoid(logits) + exponential
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))


@register("sigmoid_norm")
def sigmoid_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Length-normalized DPO: Eq. 7 of Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290) on log-ratios
    averaged per response token,

        L = -log sigmoid(beta * [a_w / |y_w| - a_l / |y_l|]),   a = log pi(y|x) - log pi_ref(y|x) (summed),

    the per-token margin of ``ipo`` inside DPO's logistic loss (the normalization SimPO, Meng et al. 2024,
    https://arxiv.org/abs/2405.14734, argues for, here with the reference kept). Summed log-ratios let a long
    response move the margin by more than a short one; averaging removes that length bias. When both responses
    have n tokens it is ``sigmoid`` with beta / n. Rewards are reported on summed log-probs, as for ``ipo``.
    Requires both lengths. Shapes: every input and output is (batch,).
    """
    h = _margin(
        _per_token(policy_chosen_logps, chosen_lengths, "sigmoid_norm", "chosen"),
        _per_token(policy_rejected_logps, rejected_lengths, "sigmoid_norm", "rejected"),
        _per_token(ref_chosen_logps, chosen_lengths, "sigmoid_norm", "chosen"),
        _per_token(ref_rejected_logps, rejected_lengths, "sigmoid_norm", "rejected"),
    )
    losses = -F.logsigmoid(beta * h)
    return (losses, _rewards(policy_chosen_logps, ref_chosen_logps, beta),
            _rewards(policy_rejected_logps, ref_rejected_logps, beta))
