"""Supervised fine-tuning as a kind of training (``dpokit sft``): the negative log-likelihood of the chosen
responses of a preference file (the DPO paper's pi_SFT stage), averaged over every response token of a step."""

from __future__ import annotations

from typing import Any

from dpokit.data.batch import collate_responses, to_device
from dpokit.training.kinds import Kind, register_kind
from dpokit.training.metrics import SftStats
from dpokit.training.step import KindSpec, PassOutput, Run, Task


def sft_forward(run: Run, items: list[Any]) -> PassOutput:
    """SFT: negative log-likelihood of the chosen responses, summed over their tokens."""
    cfg = run.cfg.train
    rows = [(p.prompt_ids, p.chosen_ids) for p in items]
    batch = to_device(collate_responses(rows, run.tokenizer.pad_token_id, layout=cfg.layout,
                                        pack_length=cfg.pack_length), run.device)
    with run.autocast():
        logps = run.model(batch).logps
    return PassOutput(-logps.sum(), lambda stats: stats.add(logps, batch["n_response_tokens"], batch["tokens"]),
                      batch)


def response_tokens_of_step(run: Run, indices: list[int]) -> int:
    """SFT's ``Normalizer``: the chosen responses' tokens of the step."""
    return sum(len(run.train_items[i].chosen_ids) for i in indices)


SFT_TASK = Task(sft_forward, response_tokens_of_step, SftStats, chosen_only=True)

SFT = register_kind(Kind(name="sft", command="sft", title="SFT", spec=KindSpec("sft", needs_reference=False),
                         task=SFT_TASK, takes_model_object=True))
"""``dpokit sft``."""
