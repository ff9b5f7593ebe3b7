"""Preference losses: pure tensor functions, one per variant, in one registry.

Every pairwise (and batchwise) loss has the signature::

    LOSSES[name](policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                 beta, chosen_lengths=None, rejected_lengths=None, **params)
        -> (losses, chosen_rewards, rejected_rewards)

Log-probs are summed over response tokens, lengths are response token counts, and every tensor has shape
(batch,). The training loop reduces ``losses``; nothing here touches a model.

Each loss has one ``LossSpec`` (``SPECS``, filled by ``register`` where the loss is defined): its function,
parameters and their checks, the state it carries and its ``kind``. Most losses are ``pairwise``: each pair on
its own. The ``batchwise`` ones (``aot``, ``aot_unpaired``, in ``batchwise``) sort across the batch, so a step's
pairs must be computed together (``check_training_setup``); a loss with a ``state`` (``bco_pair``, in
``stateful``) carries it between optimizer steps, which the training step passes in and advances
(``advance_loss_state``) and checkpoints keep. Both go through ``compute_loss``.

Two kinds take other tensors. The ``listwise`` ``plackett_luce`` loss ranks K responses per prompt:
``plackett_luce_loss(policy_logps, ref_logps, *, beta)`` on (batch, K) tensors. The ``unpaired`` ``kto`` loss
scores single labelled responses: ``kto_loss(policy_logps, ref_logps, labels, kl, *, beta)``. They are
registered so that configs can name them, but ``compute_loss`` (pairwise) refuses them.
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
    LOSSES,
    SPECS,
    LossFn,
    LossKind,
    LossSpec,
    LossState,
    advance_loss_state,
    carries_state,
    check_training_setup,
    compute_loss,
    configured_specs,
    loss_arguments,
    loss_spec,
    needs_plain_chosen,
    register,
    trained_kind,
    validate_loss_config,
)
from dpokit.losses.stateful import bco_pair_loss
from dpokit.losses.unpaired import kto_kl_baseline, kto_loss

__all__ = ["LOSSES", "SPECS", "LossFn", "LossKind", "LossSpec", "LossState", "advance_loss_state", "aot_loss",
           "aot_unpaired_loss", "apo_down_loss", "apo_zero_loss", "bco_pair_loss", "carries_state", "cdpo_loss",
           "check_training_setup", "compute_loss", "configured_specs", "discopop_loss", "exo_pair_loss",
           "f_dpo_loss", "hinge_loss", "ipo_loss", "kto_kl_baseline", "kto_loss", "loss_arguments", "loss_spec",
           "nca_pair_loss", "needs_plain_chosen", "plackett_luce_loss", "register", "robust_loss", "rpo_loss",
           "sigmoid_loss", "sigmoid_norm_loss", "simpo_loss", "sppo_hard_loss", "trained_kind",
           "unlikelihood_loss", "validate_loss_config"]
