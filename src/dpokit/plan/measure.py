"""Measure what one real dpokit training step holds in memory, to check the planner against.

The measure is live tensor bytes, not RSS: RSS also counts the allocator's free lists, the Python heap, the
memory-mapped data and the libraries, none of which the planner models, and it never shrinks, so a step's
peak hides under the load's. Live tensor bytes are exact and the same on any machine:

- tensors held across steps (weights, reference, optimizer states) are summed over their storages, each once;
- what the step allocates beyond them is followed allocation by allocation with the PyTorch profiler's
  memory events (every CPU tensor allocation and free, with its size), and the step's peak is the highest
  running sum;
- gradients are summed as they are accumulated (a post-accumulate hook on every trainable parameter) and the
  saved activations are the storages autograd keeps for the backward (``saved_tensors_hooks``), weights
  excluded.

The step is dpokit's own (``dpokit.training.setup.setup``, then ``dpokit.training.step.train_step`` with the
DPO task), the second of the run, so the optimizer states exist, as in every step after the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dpokit.config import Config


def plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s data: itself, or for a tensor subclass (torchao's NF4 weights
    and 8-bit optimizer states) its inner tensors, whose storages are the real ones (the wrapper's is not)."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [leaf for name in names for leaf in plain(getattr(tensor, name))]


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages under ``tensors`` (a tied weight counts once)."""
    seen = set() if seen is None else seen
    total = 0
    for tensor in (leaf for t in tensors for leaf in plain(t)):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _module_tensors(module: torch.nn.Module | None) -> list[torch.Tensor]:
    return [] if module is None else [*module.parameters(), *module.buffers()]


def held_bytes(run: Any) -> dict[str, int]:
    """Bytes held between steps: the policy's weights (adapters included), the reference's (none when it is
    the policy with its adapters off, or a store), the optimizer states and the models' buffers (rotary
    frequencies: not planned, a few KB)."""
    seen: set[int] = set()
    reference_model = getattr(run.reference, "model", None)
    weights = storage_bytes(run.policy.parameters(), seen)
    reference = storage_bytes(reference_model.parameters(), seen) if reference_model is not None else 0
    states = [t for state in run.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    optimizer = storage_bytes(states, seen)
    buffers = storage_bytes([*run.policy.buffers(), *(reference_model.buffers() if reference_model else [])], seen)
    return {"weights": weights, "reference": reference, "optimizer": optimizer, "buffers": buffers}


def _peak_of(profiler: Any) -> int:
    """The highest running sum of the profiled allocations and frees, in time order."""
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def measure_step(cfg: Config) -> dict[str, Any]:
    """Peak live tensor bytes of the second training step of ``cfg`` (one process), by part: ``weights``,
    ``reference``, ``optimizer`` (held), ``gradients`` (accumulated in the step), ``activations`` (saved for
    the backward, weights excluded), ``step_peak`` (the most the step allocates beyond what is held) and
    ``peak`` (held + step_peak) and ``tokens`` (the step's non-padding positions). The activations are counted
    by storage over the whole step: a step of one pass without checkpointing counts each once (checkpointing
    saves through its own hooks, which hide those tensors from these; the peak counts them all the same)."""
    from torch.profiler import ProfilerActivity, profile

    from dpokit.methods.dpo import DPO
    from dpokit.training.distributed import Dist
    from dpokit.training.setup import setup
    from dpokit.training.step import train_step

    assert DPO.task is not None
    run = setup(cfg, Dist(), DPO.spec)
    train_step(run, DPO.task, 1)
    held = held_bytes(run)
    models = [*_module_tensors(run.policy), *_module_tensors(getattr(run.reference, "model", None))]
    weights = {leaf.untyped_storage().data_ptr() for t in models for leaf in plain(t)}
    saved: dict[int, int] = {}
    grads: dict[int, int] = {}  # by parameter: a gradient accumulated over passes counts once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for leaf in plain(tensor):
            storage = leaf.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = [p.register_post_accumulate_grad_hook(lambda p: grads.__setitem__(id(p), p.grad.nbytes))
             for p in run.params]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            row = train_step(run, DPO.task, 2)
    for hook in hooks:
        hook.remove()
    step_peak = _peak_of(profiler)
    return {**held, "gradients": sum(grads.values()), "activations": sum(saved.values()), "step_peak": step_peak,
            "peak": sum(held.values()) + step_peak, "tokens": row["tokens"]}


# ------------------------------------------------------------------------------------ the checks' common setup

_WORDS = ("the quick brown fox jumps over the lazy dog a good answer is short kind and correct paris is the "
          "capital").split()


def full_length_pairs(path: Any, n: int = 32) -> Any:
    """``n`` pairs whose responses are far longer than any ``data.max_length`` the checks use, behind a prompt
    of a few tokens: truncated, every pair fills its length, the case the planner plans for."""
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            chosen, rejected = (" ".join(_WORDS[(i * s + k * 7) % len(_WORDS)] for k in range(600)) for s in (3, 5))
            fh.write(json.dumps({"prompt": f"Q{i}:", "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")
    return path


def check_config(model: str, data: Any, run_dir: Any, **train: Any) -> dict[str, Any]:
    """The run the checks measure: fp32 (what every CPU computes alike), SDPA, the packed layout, batch 4 at
    max_length 128, one pass a step."""
    return {"model": {"name_or_path": str(model), "attn_implementation": "sdpa"},
            "data": {"train": str(data), "max_length": 128, "max_prompt_length": 32},
            "train": {"max_steps": 3, "batch_size": 4, "progress": False, "precision": "fp32", **train},
            "run_dir": str(run_dir), "overwrite": True}


PARTS = ("weights", "reference", "optimizer", "gradients", "activations", "peak")


def compared(predicted: Any, measured: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(part, predicted bytes, measured bytes) for the parts measured apart, and the peak."""
    return [(name, float(getattr(predicted, name)), float(measured[name])) for name in PARTS]
