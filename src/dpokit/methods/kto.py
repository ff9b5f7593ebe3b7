"""KTO as a kind of training: ``dpokit train`` with an unpaired loss (``loss.name: kto``) on a file of single
responses labelled desirable or undesirable.

    kto_prepare (once per step): the step's reference point z_0 from mismatched prompt/completion pairs
    kto_forward (each pass): policy and reference log-probs of each example's response -> kto_loss against z_0
"""

from __future__ import annotations

from typing import Any

import torch

from dpokit.data.batch import regroup
from dpokit.data.tokenize import TokenizedGroup
from dpokit.losses import kto_kl_baseline, kto_loss, loss_arguments, loss_spec, trained_kind
from dpokit.training.kinds import Kind, register_kind
from dpokit.training.metrics import KtoStats
from dpokit.training.step import KindSpec, PassOutput, Record, Run, Task, collate, pairs_of_step


def mismatched(items: list[Any], max_length: int) -> list[TokenizedGroup]:
    """KTO's KL examples: each prompt with the next example's completion (the last with the first), cut to fit
    max_length. A step of one example pairs it with itself (then z_0 is that example's own log-ratio)."""
    out = []
    for j, item in enumerate(items):
        completion = items[(j + 1) % len(items)].responses_ids[0]
        out.append(TokenizedGroup(item.prompt_ids, [completion[:max(1, max_length - len(item.prompt_ids))]],
                                  item.location))
    return out


@torch.no_grad()
def kto_prepare(run: Run, items: list[Any]) -> None:
    """KTO's reference point for a whole step (``kto_kl_baseline``): the mismatched prompt/completion pairs of
    the step's examples in their global order, each rank scoring its share with policy and reference in
    micro-batches of ``train.batch_size`` without gradient, the sums reduced over every rank. So z_0 is one
    number per step, the same on every rank and for any split into micro-batches, passes and processes (TRL
    estimates it per micro-batch). The held-out metrics get one z_0 over the whole held-out set."""
    kl_items = mismatched(items, run.cfg.data.max_length) if items else []
    everything = list(range(len(kl_items)))
    total = count = 0.0
    for chunk in run.dist.share(everything, run.cfg.train.batch_size):
        group = [kl_items[i] for i in chunk or everything[:1]]  # a placeholder keeps FSDP's calls in step
        batch = collate(run, group)
        ref_logps = run.reference.logps(batch, group, run.autocast)[:, 0]
        with run.autocast():
            row_logps = run.model(batch).logps
        if chunk:
            total += (regroup(row_logps, batch)[:, 0].double() - ref_logps.double()).sum().item()
            count += len(group)
    total, count = run.dist.sum([total, count])
    run.step_context["kto_z0"] = kto_kl_baseline(torch.tensor([total / max(count, 1.0)], dtype=torch.float64),
                                                   torch.zeros(1, dtype=torch.float64))


def kto_forward(run: Run, items: list[Any]) -> PassOutput:
    """KTO on unpaired examples (``dpokit.losses.kto_loss``): policy and reference log-probs of each example's
    response, against the step's reference point z_0 (``kto_prepare``)."""
    batch = collate(run, items)
    ref_logps = run.reference.logps(batch, items, run.autocast)[:, 0]
    with run.autocast():
        row_logps = run.model(batch).logps
    logps = regroup(row_logps, batch)[:, 0]
    kl = run.step_context["kto_z0"].to(device=logps.device, dtype=logps.dtype)
    labels = torch.tensor([bool(item.label) for item in items], device=logps.device)
    arguments = loss_arguments(run.cfg.loss, loss_spec("kto"))  # beta, desirable_weight, undesirable_weight
    losses, rewards = kto_loss(logps, ref_logps, labels, kl, **arguments)
    record: Record = lambda stats: stats.add(losses, rewards, labels, logps.detach(), kl,  # noqa: E731
                                             arguments["beta"], batch["tokens"])
    return PassOutput(losses.sum(), record, batch)


KTO_TASK = Task(kto_forward, pairs_of_step, KtoStats, prepare=kto_prepare)
"""Averaged over every example of the step."""

KTO = register_kind(Kind(
    name="kto", command="dpo", title="KTO", spec=KindSpec("kto", needs_reference=True, evaluates=True),
    task=KTO_TASK, selected_by=lambda cfg: trained_kind(cfg.loss) == "unpaired", takes_model_object=True))
"""``dpokit train`` when the configured loss is unpaired (``loss.name: kto``)."""
