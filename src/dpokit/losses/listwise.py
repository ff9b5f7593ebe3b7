"""The listwise loss: K ranked responses per prompt under the Plackett-Luce model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpokit.losses.registry import register


@register("plackett_luce", kind="listwise")
def plackett_luce_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Listwise DPO under the Plackett-Luce model, Appendix A.3 of https://arxiv.org/abs/2305.18290.

    For K responses per prompt ranked best first, with s_k = beta * (log pi(y_k|x) - log pi_ref(y_k|x)):

        L = -sum_{k=0}^{K-2} [s_k - logsumexp(s_k, ..., s_{K-1})]
          = -sum_{k=0}^{K-2} log sigmoid(s_k - logsumexp(s_{k+1}, ..., s_{K-1})),

    the negative log-likelihood of the ranking (the k = K-1 factor is 1). The second form is the one computed:
    it is stable, and for K = 2 it is exactly -log sigmoid(s_0 - s_1), i.e. ``sigmoid``.

    Shapes: ``policy_logps``, ``ref_logps`` (batch, K), log-probs summed over response tokens, sorted best
    first; ``mask`` optional bool (batch, K), False marks padding for prompts with fewer than K responses (the
    ranking is the order of the True entries; a row with fewer than two gives loss 0). ``lengths`` is accepted
    for a uniform call but unused: the loss is on summed log-probs. Returns (losses (batch,),
    rewards (batch, K)), rewards detached and 0 where masked.
    """
    if policy_logps.dim() != 2 or policy_logps.shape != ref_logps.shape:
        raise ValueError(f"plackett_luce: policy_logps and ref_logps must both be (batch, K), "
                         f"got {tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}")
    if mask is None:
        mask = torch.ones_like(policy_logps, dtype=torch.bool)
    elif mask.shape != policy_logps.shape or mask.dtype != torch.bool:
        raise ValueError(f"plackett_luce: mask must be a bool tensor of shape {tuple(policy_logps.shape)}")
    s = beta * (policy_logps - ref_logps)
    k = s.shape[-1]
    # later[k, j]: j ranks below k. Entry (b, k, j) of `below` is s_j if y_j is a real response ranked below y_k.
    later = torch.ones(k, k, dtype=torch.bool, device=s.device).triu(diagonal=1)
    below_mask = later & mask.unsqueeze(-2)
    below = torch.where(below_mask, s.unsqueeze(-2), torch.full_like(s, float("-inf")).unsqueeze(-2))
    # A term exists for every real response with a real one below it (not the last of its row). The where
    # before the subtraction keeps -inf (and its NaN gradient) out of rows without a term.
    has_term = mask & below_mask.any(-1)
    rest = torch.where(has_term, torch.logsumexp(below, dim=-1), torch.zeros_like(s))
    terms = torch.where(has_term, -F.logsigmoid(s - rest), torch.zeros_like(s))
    rewards = torch.where(mask, s.detach(), torch.zeros_like(s))
    return terms.sum(-1), rewards
