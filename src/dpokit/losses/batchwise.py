"""Batchwise preference losses: the term of one pair depends on the other pairs of the batch.

AOT (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
https://arxiv.org/abs/2406.05882) asks for first-order stochastic dominance of one reward *distribution* over
another rather than a margin for every pair. For two empirical distributions on the real line the optimal
transport plan is the monotone one, matching the k-th smallest value of one to the k-th smallest of the other,
so the dominance violation is measured on the two sorted batches, quantile against quantile.

What that means for training: the batch is the sample of the distributions, so a loss over 8 pairs is not the
sum of the losses over two halves of 4 (each half is sorted on its own). dpokit therefore computes these losses
only on the whole optimizer step at once: ``train.grad_accum`` 1, no ``train.pass_tokens``, one process
(``dpokit.losses.check_training_setup`` refuses the rest with a one-line config error). The last step of an epoch
may hold fewer pairs; it is sorted as it is. Held-out losses are computed per ``eval.batch_size`` batch. Larger
batches estimate the quantiles better, which is why the authors train with large per-device batches.

Shapes: every tensor (batch,). The k-th returned loss belongs to the k-th quantile, not to the k-th pair; the
rewards are per pair, as for every other loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses.registry import check_flip_rate, register


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(1 - eps) * -log sigmoid(x) + eps * -log sigmoid(-x): the logistic relaxation of the dominance
    constraint x >= 0, with cDPO's label smoothing."""
    return (1 - label_smoothing) * -F.logsigmoid(logits) + label_smoothing * -F.logsigmoid(-logits)


@register("aot", {"label_smoothing": check_flip_rate}, kind="batchwise")
def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AOT for paired data (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882): the distribution of the
    policy's log-ratio pi(y_w|x) / pi(y_l|x) over the batch should dominate the reference's. With
    u = sort(log pi(y_w|x) - log pi(y_l|x)) and v = sort(log pi_ref(y_w|x) - log pi_ref(y_l|x)), both ascending
    over the batch, for each quantile k:

        L_k = (1 - eps) * -log sigmoid(beta * (u_k - v_k)) + eps * -log sigmoid(-beta * (u_k - v_k)).

    Sorting matches the k-th smallest policy log-ratio with the k-th smallest reference one (the 1-D optimal
    transport plan), instead of each pair with itself as ``sigmoid`` does; when both batches are in the same
    order, and always for a batch of one, it *is* ``sigmoid`` (``cdpo`` with eps > 0). eps
    (``label_smoothing``) defaults to 0. Shapes: every input and output is (batch,); L_k is per quantile.
    """
    pi_logratios, _ = torch.sort(policy_chosen_logps - policy_rejected_logps)
    ref_logratios, _ = torch.sort(ref_chosen_logps - ref_rejected_logps)
    losses = _smoothed_logistic(beta * (pi_logratios - ref_logratios), label_smoothing)
    return (losses, beta * (policy_chosen_logps - ref_chosen_logps).detach(),
            beta * (policy_rejected_logps - ref_rejected_logps).detach())


@register("aot_unpaired", {"label_smoothing": check_flip_rate}, kind="batchwise")
def aot_unpaired_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AOT for unpaired data (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882): the distribution of the
    chosen responses' log-ratios should dominate the rejected ones', with no pairing between them. With
    c = sort(log pi(y_w|x) - log pi_ref(y_w|x)) and d = sort(log pi(y_l|x) - log pi_ref(y_l|x)), ascending over
    the batch, for each quantile k:

        L_k = (1 - eps) * -log sigmoid(beta * (c_k - d_k)) + eps * -log sigmoid(-beta * (c_k - d_k)).

    The pairs of the batch serve only as a sample of good and a sample of bad responses: the k-th smallest
    chosen reward is held above the k-th smallest rejected one. For a batch of one it is ``sigmoid`` (``cdpo``
    with eps > 0). eps (``label_smoothing``) defaults to 0. Shapes: every input and output is (batch,); L_k is
    per quantile.
    """
    chosen_logratios, _ = torch.sort(policy_chosen_logps - ref_chosen_logps)
    rejected_logratios, _ = torch.sort(policy_rejected_logps - ref_rejected_logps)
    losses = _smoothed_logistic(beta * (chosen_logratios - rejected_logratios), label_smoothing)
    return (losses, beta * (policy_chosen_logps - ref_chosen_logps).detach(),
            beta * (policy_rejected_logps - ref_rejected_logps).detach())
