"""Where the reference log-probs log pi_ref(y|x) come from.

``model`` mode: a frozen copy of the reference in memory, run without gradients on the same batch layout and
through the same log-prob function as the policy, so the two sides of every log-ratio are computed alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpokit.logprobs import batch_logps
from dpokit.models import freeze


class FrozenReference:
    """pi_ref as a model in memory. Shape of ``logps``: (2B,) for a pair batch of B pairs."""

    def __init__(self, model: nn.Module):
        self.model = freeze(model)

    @torch.no_grad()
    def logps(self, batch: dict[str, Any], autocast: Any) -> torch.Tensor:
        with autocast():
            logps, _ = batch_logps(self.model, batch)
        return logps


def make_reference(mode: str, model: nn.Module | None) -> FrozenReference:
    if mode == "model":
        if model is None:
            raise ValueError("reference.mode=model needs a reference model")
        return FrozenReference(model)
    raise ValueError(f"reference.mode: unknown mode '{mode}'")
