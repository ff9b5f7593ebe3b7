"""DPO and its variants as a kind of training (``dpokit train``): the pass that computes the configured
preference loss on a batch of groups.

    preference_forward: collate -> the loss's kind decides the route (one dispatch):
        pairwise, batchwise -> pair_forward: group_logps -> compute_loss (the configured sum) -> WPO weights
        listwise            -> ranking_forward: group_logps -> Plackett-Luce over each ranking
    (unpaired losses are their own kind of training, ``dpokit.methods.kto``)

Log-probs come from one call of the policy module (``LogpsModule``, DDP- or FSDP-wrapped under torchrun) and
one of the reference; beta and each loss's parameters come from the config through
``dpokit.losses.loss_arguments``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dpokit.config import Config
from dpokit.data.batch import regroup
from dpokit.losses import compute_loss, loss_arguments, loss_spec, needs_plain_chosen, trained_kind
from dpokit.losses.tokens import length_desensitized_weights, wpo_pair_weights
from dpokit.training.kinds import Kind, register_kind
from dpokit.training.metrics import PairStats
from dpokit.training.reference import Reference
from dpokit.training.step import Autocast, KindSpec, PassOutput, Record, Run, Task, collate, pairs_of_step

if TYPE_CHECKING:
    from dpokit.config import LossConfig

GroupLosses = dict[str, torch.Tensor]
"""A batch of groups' ``losses``, ``chosen_rewards``, ``rejected_rewards``, ``chosen_logps`` and
``rejected_logps``: (G,) each."""


@dataclass(frozen=True)
class GroupLogps:
    """Log-probs of a batch of G groups of K responses (a pair: K = 2, chosen first)."""

    policy: torch.Tensor
    """(G, K) the policy's, with gradient."""
    reference: torch.Tensor
    """(G, K) the reference's."""
    n_tokens: torch.Tensor
    """(G, K) response token counts."""
    log_weights: torch.Tensor | None
    """(G, K) WPO's log-weights (``loss.use_weighting``), else None."""
    plain_chosen: torch.Tensor | None
    """(G,) the chosen responses' log-probs without LD-DPO's token weights, when a loss needs them
    (``needs_plain_chosen``), else None."""
    logit_sums: torch.Tensor
    """(G, K) each response's summed mean logit over the vocabulary (TRL's ``logits/*`` over the tokens)."""


def group_logps(model: nn.Module, reference: Reference, batch: dict[str, Any], items: list[Any], loss: LossConfig,
                autocast: Autocast) -> GroupLogps:
    """Policy and reference log-probs of every response of ``batch``. With ``loss.ld_alpha`` both sum LD-DPO's
    length-desensitized token log-probs (the caller's batch is left as it is)."""
    if loss.ld_alpha is not None:  # LD-DPO: policy and reference sum the same weighted token log-probs
        batch = {**batch, "target_weight": length_desensitized_weights(batch["target_slot"], batch["slots"],
                                                                       batch["n_slots"], loss.ld_alpha)}
    ref_logps = reference.logps(batch, items, autocast)  # (G, K)
    plain = needs_plain_chosen(loss)  # rpo's NLL is on y_w's own log-prob, not LD-DPO's
    with autocast():
        out = model(batch, wpo=loss.use_weighting, unweighted=plain, mean_logits=True)  # a SlotLogps, (S,) each
    return GroupLogps(policy=regroup(out.logps, batch), reference=ref_logps, n_tokens=regroup(out.n_tokens, batch),
                      log_weights=None if out.log_weights is None else regroup(out.log_weights, batch),
                      plain_chosen=None if out.unweighted is None else regroup(out.unweighted, batch)[:, 0],
                      logit_sums=regroup(out.logit_sums, batch))


def pair_forward(model: nn.Module, reference: Reference, batch: dict[str, Any], items: list[Any], cfg: Config,
                 autocast: Autocast, loss_state: dict[str, Any] | None = None) -> GroupLosses:
    """Policy and reference log-probs of a batch of pairs and each pair's loss: the configured pairwise loss
    (or weighted sum of losses, ``compute_loss``; ``loss_state``: the state of a loss that carries one,
    ``Run.task_state["loss"]``). With ``loss.ld_alpha`` every log-prob, the reported ones too, is LD-DPO's
    length-desensitized one (but ``rpo``'s NLL, on y_w's plain log-prob); with ``loss.use_weighting`` each
    pair's loss is multiplied by its WPO weight. Shapes: (G,) each."""
    logps = group_logps(model, reference, batch, items, cfg.loss, autocast)
    policy, ref, n_tokens = logps.policy, logps.reference, logps.n_tokens
    losses, chosen_rewards, rejected_rewards = compute_loss(
        cfg.loss, policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], n_tokens[:, 0], n_tokens[:, 1],
        state=loss_state, plain_chosen_logps=logps.plain_chosen)
    if logps.log_weights is not None:  # WPO: each pair's loss weighted by how likely the policy finds the pair
        losses = losses * wpo_pair_weights(logps.log_weights[:, 0], logps.log_weights[:, 1])
    return {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "chosen_logps": policy[:, 0], "rejected_logps": policy[:, 1],
            "chosen_logit_sums": logps.logit_sums[:, 0], "rejected_logit_sums": logps.logit_sums[:, 1],
            "chosen_tokens": n_tokens[:, 0], "rejected_tokens": n_tokens[:, 1]}


def ranking_forward(model: nn.Module, reference: Reference, batch: dict[str, Any], items: list[Any], cfg: Config,
                    autocast: Autocast) -> GroupLosses:
    """Policy and reference log-probs of a batch of rankings (best first, ``batch["slot_mask"]`` marking each
    group's responses) and each ranking's listwise loss (``loss.name: plackett_luce``), reporting the best
    response as "chosen" and the worst as "rejected". Shapes: (G,) each."""
    logps = group_logps(model, reference, batch, items, cfg.loss, autocast)
    mask = batch["slot_mask"]
    spec = loss_spec(cfg.loss.name)
    losses, rewards = spec.fn(logps.policy, logps.reference, mask=mask, **loss_arguments(cfg.loss, spec))
    worst = mask.sum(-1) - 1  # index of each group's last (worst) response
    pick = torch.arange(len(worst), device=worst.device)
    return {"losses": losses, "chosen_rewards": rewards[:, 0], "rejected_rewards": rewards[pick, worst],
            "chosen_logps": logps.policy[:, 0], "rejected_logps": logps.policy[pick, worst],
            "chosen_logit_sums": logps.logit_sums[:, 0], "rejected_logit_sums": logps.logit_sums[pick, worst],
            "chosen_tokens": logps.n_tokens[:, 0], "rejected_tokens": logps.n_tokens[pick, worst]}


def record_pairs(out: GroupLosses, batch: dict[str, Any]) -> Record:
    return lambda stats: stats.add(out["losses"], out["chosen_rewards"], out["rejected_rewards"],
                                   out["chosen_logps"], out["rejected_logps"], batch["tokens"],
                                   logits=(out["chosen_logit_sums"], out["rejected_logit_sums"],
                                           out["chosen_tokens"], out["rejected_tokens"]))


def preference_forward(run: Run, items: list[Any]) -> PassOutput:
    """DPO or a variant (``Task.forward``): the configured preference loss, summed over the pass's pairs (or
    rankings, for a listwise loss)."""
    batch = collate(run, items)
    if trained_kind(run.cfg.loss) == "listwise":
        out = ranking_forward(run.model, run.reference, batch, items, run.cfg, run.autocast)
    else:
        out = pair_forward(run.model, run.reference, batch, items, run.cfg, run.autocast, run.task_state.get("loss"))
    return PassOutput(out["losses"].sum(), record_pairs(out, batch), batch)


DPO_TASK = Task(preference_forward, pairs_of_step, PairStats, carries_loss_state=True)
"""The DPO pass, averaged over every pair of the step (online DPO steps with it too)."""

DPO = register_kind(Kind(
    name="dpo", command="dpo", title="DPO", spec=KindSpec("dpo", needs_reference=True, evaluates=True),
    task=DPO_TASK, takes_model_object=True))
"""``dpokit train``, offline: the configured preference loss on the pairs (or rankings) of ``data.train``."""
