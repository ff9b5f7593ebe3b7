"""AdamW with 8-bit states (``train.optimizer: adamw_8bit``): Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", https://arxiv.org/abs/2110.02861, as torchao implements it on CPU and CUDA alike.

Each of Adam's moments m and v of a weight is cut into blocks of 256 values; a block keeps its absmax s_b in
fp32 and each value one byte, the index of the nearest entry of a fixed 256-entry map q (dynamic-tree
quantization, signed for m, unsigned for v):

    m_i ~ q[code_i] * s_b,

so the two moments take 2 x (1 + 4/256) bytes per weight instead of 8. Weights with fewer than 4096 values
(or not a multiple of 256) keep fp32 moments. The update reads the moments in fp32 and writes them back
quantized; parameters stay in their dtype.

Checkpoints are safetensors and JSON only, so the state a checkpoint sees is plain tensors: each quantized
moment ``exp_avg`` becomes ``exp_avg.codes`` (uint8), ``exp_avg.scale`` (fp32 block absmax), ``exp_avg.qmap``
(the map) and the flag ``exp_avg.signed``, and loading rebuilds the same quantized tensor, bit for bit. The
learning rate stays a float in the param groups (the scheduler and the JSON state read it) and is handed to
torchao's update as the fp32 tensor it expects only for the step.
"""

from __future__ import annotations

from typing import Any

import torch

from dpokit.models.quantize import torchao

PARTS = ("codes", "scale", "qmap")
"""The plain tensors of one quantized moment in a saved state."""


def adamw_8bit(params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float],
               weight_decay: float) -> torch.optim.Optimizer:
    """torchao's AdamW8bit whose state dict holds plain tensors (see the module docstring)."""
    optim = torchao("train.optimizer: adamw_8bit").optim
    state_class = optim.subclass_8bit.OptimState8bit

    class AdamW8bit(optim.AdamW8bit):  # type: ignore[misc, name-defined]
        def add_param_group(self, param_group: dict[str, Any]) -> None:
            torch.optim.Optimizer.add_param_group(self, param_group)  # the lr stays a float (see the docstring)

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            floats = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = torch.tensor(group["lr"], dtype=torch.float32)
            try:
                return _run_update(lambda: super(AdamW8bit, self).step(closure), self.param_groups)
            finally:
                for group, lr in zip(self.param_groups, floats):
                    group["lr"] = lr

        def state_dict(self) -> dict[str, Any]:
            saved = super().state_dict()
            saved["state"] = {index: _flatten(entries, state_class) for index, entries in saved["state"].items()}
            return saved

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            params = [p for group in self.param_groups for p in group["params"]]
            state = {int(index): _unflatten(entries, state_class, params[int(index)].dtype)
                     for index, entries in state_dict["state"].items()}
            super().load_state_dict({**state_dict, "state": state})

    return AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _run_update(update: Any, groups: list[dict[str, Any]]) -> Any:
    """torchao compiles its per-weight update with torch.compile, once per weight shape. On CUDA that is what
    makes it fast; on a CPU compiling takes about a minute per shape (measured: 68 s for the first step of a
    2-layer model on 2 cores) against milliseconds of update, so there the same function runs eagerly."""
    on_cuda = any(p.device.type == "cuda" for group in groups for p in group["params"])
    if on_cuda:
        return update()
    with torch.compiler.set_stance("force_eager"):
        return update()


def _flatten(entries: dict[str, Any], state_class: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entries.items():
        if isinstance(value, state_class):
            for part in PARTS:
                out[f"{key}.{part}"] = getattr(value, part)
            out[f"{key}.signed"] = bool(value.signed)
        else:
            out[key] = value
    return out


def _unflatten(entries: dict[str, Any], state_class: type, dtype: torch.dtype) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entries.items():
        moment, _, part = key.rpartition(".")
        if part == "signed":
            out[moment] = state_class(*(entries[f"{moment}.{p}"] for p in PARTS), bool(value), dtype=dtype)
        elif part not in PARTS:
            out[key] = value
    return out
