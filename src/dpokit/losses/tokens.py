"""Per-token modifiers of the log-probs every loss sees: pure functions over a batch's targets.

A preference loss takes log-probs summed over response tokens. Some variants change what is summed rather
than the loss on top: LD-DPO (``loss.ld_alpha``) scales the tokens past the shorter response's length. WPO
(``loss.use_weighting``) weighs each pair's loss by the policy's own per-token probabilities
(``wpo_pair_weights``). LD-DPO is a weight per target token, ``batch["target_weight"]`` (M,), which ``dpokit.models.logprobs.layout_logps``
multiplies into the token log-probs before summing; the policy and a live reference (``reference.mode:
model`` or ``adapter``) score the same batch, so both sides of every log-ratio get the same weights.
Shapes follow ``dpokit.data.batch``: ``target_slot`` (M,) the response of each target token, in order
within a response; ``slots`` (G, K) each group's responses, -1 where a group has fewer.
"""

from __future__ import annotations

import torch


def length_desensitized_weights(target_slot: torch.Tensor, slots: torch.Tensor, n_slots: int,
                                alpha: float) -> torch.Tensor:
    """LD-DPO's token weights (Liu et al. 2024, "LD-DPO: Length Desensitization in Direct Preference
    Optimization", https://arxiv.org/abs/2409.06411). With l_p the length of the shorter response of the pair
    (the "public length"; a ranking: its shortest response), the likelihood of a response of l tokens is split
    at l_p and the part past it is raised to the power alpha:

        log pi_hat(y|x) = sum_{t <= l_p} log pi(y_t | x, y_<t) + alpha * sum_{l_p < t <= l} log pi(y_t | x, y_<t),

    for the policy and the reference alike, and the loss is the configured one on log pi_hat. Summed log-probs
    grow with length, so DPO's margin between a long and a short response is partly a length effect; alpha < 1
    shrinks the excess tokens' share (the paper tunes alpha in [0, 1]; alpha = 1 is the plain loss, alpha = 0
    compares the responses over their first l_p tokens only). The shorter response has no excess: its weights
    are all 1. The reference gets the same split (as in TRL 1.x's ``ld_alpha``; older TRL scaled the policy's
    log-probs only), so pi = pi_ref still means zero reward.

    Returns the weight of each target token: 1 for its response's first l_p tokens, alpha after. Shape (M,),
    float32.
    """
    index = torch.arange(target_slot.numel(), device=target_slot.device)
    # A response's tokens are contiguous and in order: a token's position is its index minus its response's first.
    first = torch.full((n_slots,), target_slot.numel(), dtype=torch.long, device=target_slot.device)
    first = first.scatter_reduce(0, target_slot, index, reduce="amin")
    position = index - first[target_slot]  # (M,) 0-based position within the response
    lengths = torch.bincount(target_slot, minlength=n_slots)  # (S,)
    present = slots >= 0
    group_lengths = torch.where(present, lengths[slots.clamp(min=0)], torch.iinfo(torch.long).max)  # (G, K)
    public = group_lengths.min(dim=1, keepdim=True).values.expand_as(slots)  # (G, K): l_p of the slot's group
    slot_public = torch.zeros(n_slots, dtype=torch.long, device=slots.device)
    slot_public[slots[present]] = public[present]
    beyond = position >= slot_public[target_slot]
    return torch.where(beyond, torch.tensor(alpha, dtype=torch.float32, device=beyond.device),
                       torch.tensor(1.0, dtype=torch.float32, device=beyond.device))


def wpo_pair_weights(chosen_log_weights: torch.Tensor, rejected_log_weights: torch.Tensor) -> torch.Tensor:
    """WPO's weight of each pair (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", https://arxiv.org/abs/2406.11827): off-policy pairs are reweighted toward what the current
    policy would itself generate. Per response, with its n tokens (the length-normalized, "aligned" form of the
    paper's Eq. 2, as TRL's ``use_weighting`` computes it),

        log w(x, y) = 1/n * sum_t [log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2],

    each token's probability measured against sum_v pi(v)^2, the probability the policy's own sampling gives its
    sampled token on average, so a response as likely as the policy's own samples has log w ~ 0 whatever the
    entropy of the distributions. The pair's weight is w(x, y_w) * w(x, y_l), capped at 1:

        weight = min(1, exp(log w(x, y_w) + log w(x, y_l))),

    and the pair's loss is multiplied by it. The weight is a constant: no gradient flows through it (the inputs
    are detached here as well). Per-response log-weights come from ``dpokit.models.logprobs.layout_logps(wpo=True)``.
    Shapes: (batch,) in and out.
    """
    return torch.exp(chosen_log_weights.detach() + rejected_log_weights.detach()).clamp(max=1.0)
