"""Preference losses that carry state from one optimizer step to the next.

The state is a JSON dict (``dpokit.losses.registry.LossState``): the training step passes it in through
``compute_loss(..., state=)``, advances it after every applied optimizer step from the step's mean rewards over
every pair of every rank (``advance_loss_state``), and keeps it in ``Run.task_state["loss"]``, which every
checkpoint saves and a resumed run restores. Within a step it is constant, so the loss of each pair depends on
that pair alone: batch 8 x accumulation 1, batch 4 x accumulation 2 and 2 ranks x batch 4 train the same, and
every rank holds the same state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dpokit.losses.registry import LossState, register


def _running_mean(state: dict[str, Any], chosen_reward_mean: float, rejected_reward_mean: float,
                  pairs: int) -> dict[str, Any]:
    """The mean implicit reward over every response of every pair trained on so far: the step's mean,
    (chosen + rejected) / 2, folded into the running mean with weight pairs / (pairs so far + pairs)."""
    seen = state["pairs"] + pairs
    step_mean = (chosen_reward_mean + rejected_reward_mean) / 2
    mean = state["reward_mean"] + (step_mean - state["reward_mean"]) * pairs / seen
    return {"reward_mean": mean, "pairs": seen}


BCO_STATE = LossState(initial=lambda: {"reward_mean": 0.0, "pairs": 0},
                      inputs=lambda state: {"delta": state["reward_mean"]},
                      update=_running_mean)


@register("bco_pair", state=BCO_STATE)
def bco_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    delta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCO for pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    https://arxiv.org/abs/2404.04656): a binary classifier whose logit is the implicit reward
    r = beta * (log pi(y|x) - log pi_ref(y|x)) shifted by delta, with y_w labelled 1 and y_l labelled 0:

        L = -log sigmoid(r_w - delta) - log sigmoid(-(r_l - delta)).

    The reward shift delta is the running mean of the implicit rewards of every chosen and rejected response
    trained on so far, the paper's moving-average estimate of the mean reward (the paper shows the classifier's
    binary cross-entropy bounds the DPO loss from above and shifts the rewards by delta to tighten that
    bound). It is state: the
    training step supplies it (``SPECS["bco_pair"].state``, constant within an optimizer step, 0 at the first,
    where pi = pi_ref makes every reward 0 anyway); called directly, pass ``delta``. Unlike DPO, each response
    is classified on its own, so the chosen reward is pushed above delta and the rejected one below it.
    Shapes: every input and output is (batch,).
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
