"""Losses on unpaired data: single responses labelled desirable or undesirable, no pairs.

The data format is ``{"prompt": ..., "completion": ..., "label": true | false}`` (``dpokit.data.formats``); each
example's response is scored alone. These losses do not take the pairwise signature: ``kto_loss`` takes (batch,)
tensors of one response each, its labels and the batch's KL baseline. They are registered so that configs can
name them (``kind="unpaired"``): KTO is its own kind of training, and ``compute_loss`` (pairwise) refuses them.
"""

from __future__ import annotations

import torch

from dpokit.losses.registry import check_positive, register


def kto_kl_baseline(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_0 (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, Sec. 4.1): an
    estimate of KL(pi || pi_ref) at the batch's prompts,

        z_0 = max(0, mean_j [log pi(y'_j | x_j) - log pi_ref(y'_j | x_j)]),

    where y'_j is a *mismatched* completion (another example's, so the estimate is not the example's own
    reward), clamped at 0 because a KL is never negative. No gradient flows through it: the paper uses it only
    to place the value function's reference point. Shapes: (n,) in, a 0-d tensor out. Training estimates it once
    per optimizer step from all of the step's examples, summed over every rank (``dpokit.methods.kto.kto_prepare``), so
    it does not depend on how the step is split into micro-batches or processes."""
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


@register("kto", {"desirable_weight": check_positive, "undesirable_weight": check_positive},
          kind="unpaired")
def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO, Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization", https://arxiv.org/abs/2402.01306, Eq. 8): with the implicit reward
    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) and the reference point z = beta * z_0 (``kto_kl_baseline``),

        L(x, y) = lambda_D * (1 - sigmoid(r(x, y) - z))   if y is desirable (label true),
                  lambda_U * (1 - sigmoid(z - r(x, y)))   if y is undesirable (label false),

    lambda_D = ``desirable_weight``, lambda_U = ``undesirable_weight`` (default 1.0 each; the paper advises
    lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] when one kind outnumbers the other). Each example is scored on
    its own: no pairs, only a thumbs-up or -down per response; the value function sigmoid saturates, so examples
    far past the reference point stop pulling. Returns the per-example losses and rewards (detached).
    Shapes: ``policy_logps``, ``ref_logps`` (summed over response tokens), ``labels`` (bool) all (batch,);
    ``kl`` a 0-d tensor or a number.
    """
    rewards = beta * (policy_logps - ref_logps)
    z = beta * torch.as_tensor(kl, dtype=rewards.dtype, device=rewards.device)
    desirable = desirable_weight * (1 - torch.sigmoid(rewards - z))
    undesirable = undesirable_weight * (1 - torch.sigmoid(z - rewards))
    return torch.where(labels, desirable, undesirable), rewards.detach()
