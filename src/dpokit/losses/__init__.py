"""Preference losses: pure tensor functions, one per variant, in one registry.

Every loss has the signature::

    LOSSES[name](policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                 beta, chosen_lengths=None, rejected_lengths=None, **params)
        -> (losses, chosen_rewards, rejected_rewards)

Log-probs are summed over response tokens, lengths are response token counts, and every tensor has shape
(batch,). The training loop reduces ``losses``; nothing here touches a model.

The one exception is the listwise ``plackett_luce`` loss (names in ``LISTWISE``), which ranks K responses per
prompt: ``plackett_luce_loss(policy_logps, ref_logps, *, beta)`` on (batch, K) tensors. It is registered so that
configs can name it, but ``compute_loss`` (pairwise) refuses it.
"""

from __future__ import annotations

# Importing the variants registers them.
from dpokit.losses.listwise import plackett_luce_loss
from dpokit.losses.pairwise import (
    apo_down_loss,
    apo_zero_loss,
    cdpo_loss,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    robust_loss,
    rpo_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
    unlikelihood_loss,
)
from dpokit.losses.registry import (
    LISTWISE,
    LOSS_PARAMS,
    LOSS_REQUIRED,
    LOSSES,
    LossFn,
    compute_loss,
    register,
    validate_loss_config,
)

__all__ = ["LISTWISE", "LOSSES", "LOSS_PARAMS", "LOSS_REQUIRED", "LossFn", "apo_down_loss", "apo_zero_loss",
           "cdpo_loss", "compute_loss", "discopop_loss", "exo_pair_loss", "hinge_loss", "ipo_loss", "nca_pair_loss",
           "plackett_luce_loss", "register", "robust_loss", "rpo_loss", "sigmoid_loss", "sigmoid_norm_loss",
           "simpo_loss", "sppo_hard_loss", "unlikelihood_loss", "validate_loss_config"]
