"""Preference losses: pure tensor functions, one per variant, in one registry.

Every loss has the signature::

    LOSSES[name](policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                 beta, chosen_lengths=None, rejected_lengths=None, **params)
        -> (losses, chosen_rewards, rejected_rewards)

Log-probs are summed over response tokens, lengths are response token counts, and every tensor has shape
(batch,). The training loop reduces ``losses``; nothing here touches a model.

Most losses treat each pair on its own (``pairwise``). Two kinds do not: the ``BATCHWISE`` ones (``aot``,
``aot_unpaired``, in ``batchwise``) sort across the batch, so a step's pairs must be computed together
(``check_training_setup``); the ones in ``LOSS_STATE`` (``bco_pair``, in ``stateful``) carry state between
optimizer steps, which the training step passes in and advances (``advance_loss_state``) and checkpoints keep.

The one exception to the signature is the listwise ``plackett_luce`` loss (names in ``LISTWISE``), which ranks
K responses per prompt: ``plackett_luce_loss(policy_logps, ref_logps, *, beta)`` on (batch, K) tensors. It is
registered so that configs can name it, but ``compute_loss`` (pairwise) refuses it.
"""

from __future__ import annotations

# Importing the variants registers them.
from dpokit.losses.batchwise import aot_loss, aot_unpaired_loss
from dpokit.losses.f_dpo import f_dpo_loss
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
    BATCHWISE,
    LISTWISE,
    LOSS_CHECKS,
    LOSS_PARAMS,
    LOSS_REQUIRED,
    LOSS_STATE,
    LOSSES,
    PLAIN_CHOSEN,
    UNPAIRED,
    LossFn,
    LossState,
    advance_loss_state,
    check_training_setup,
    compute_loss,
    needs_plain_chosen,
    register,
    validate_loss_config,
)
from dpokit.losses.stateful import bco_pair_loss
from dpokit.losses.unpaired import kto_kl_baseline, kto_loss

__all__ = ["BATCHWISE", "LISTWISE", "LOSSES", "PLAIN_CHOSEN", "UNPAIRED", "LOSS_CHECKS", "LOSS_PARAMS",
           "LOSS_REQUIRED", "LOSS_STATE", "LossFn", "LossState", "advance_loss_state", "aot_loss",
           "aot_unpaired_loss", "apo_down_loss", "apo_zero_loss", "bco_pair_loss", "cdpo_loss",
           "check_training_setup", "compute_loss", "discopop_loss", "exo_pair_loss", "f_dpo_loss", "hinge_loss",
           "ipo_loss", "kto_kl_baseline", "kto_loss", "nca_pair_loss", "needs_plain_chosen", "plackett_luce_loss",
           "register", "robust_loss", "rpo_loss", "sigmoid_loss", "sigmoid_norm_loss", "simpo_loss",
           "sppo_hard_loss", "unlikelihood_loss", "validate_loss_config"]
