"""Supervised fine-tuning as a kind of training (``dpokit sft``): the negative log-likelihood of the chosen
responses of a preference file (the DPO paper's pi_SFT stage), averaged over every response token of a step.
Rows with images (``dpokit.data.vision``) train the same way: each row carries its prompt's pixels through the one
log-prob function, and only the chosen response's text tokens are scored."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from dpokit.data.batch import Layout, collate_responses, to_device
from dpokit.data.vision import collate_pixels
from dpokit.errors import DataError
from dpokit.training.kinds import Kind, register_kind
from dpokit.training.metrics import SftStats
from dpokit.training.step import KindSpec, PassOutput, Run, Task


def chosen_batch(items: Sequence[Any], pad_id: int, layout: Layout = "padded", pack_length: int = 0) -> dict[str, Any]:
    """One row per group, prompt + chosen response (``collate_responses``); groups with images bring their pixel
    inputs, laid out for those rows (``collate_pixels`` of the groups cut to their chosen response)."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in items]
    batch = collate_responses(rows, pad_id, layout=layout, pack_length=pack_length)
    if items and hasattr(items[0], "pixels"):
        if layout != "padded":
            raise DataError("train.layout: packed is not supported for image data (the model places each image's "
                            "features itself, one row per sequence); use train.layout: padded")
        batch["pixels"] = collate_pixels([dataclasses.replace(p, responses_ids=p.responses_ids[:1]) for p in items])
    return batch


def sft_forward(run: Run, items: list[Any]) -> PassOutput:
    """SFT: negative log-likelihood of the chosen responses, summed over their tokens."""
    cfg = run.cfg.train
    batch = to_device(chosen_batch(items, run.tokenizer.pad_token_id, cfg.layout, cfg.pack_length), run.device)
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
