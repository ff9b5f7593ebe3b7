"""Checkpoints (atomic, safetensors + JSON, no pickle) and export to a plain Hugging Face folder.

A checkpoint is written into a temporary folder next to its final place and renamed to
``checkpoints/step-N/`` only once every file is written, hashed into ``manifest.json`` and marked ``COMPLETE``;
a crash mid-write leaves only a ``.tmp-`` folder that readers ignore.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.errors import DpokitError
from dpokit.models import detach_quantizer

COMPLETE = "COMPLETE"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, contiguous and on CPU, with tied weights stored once (safetensors refuses
    shared storage)."""
    seen: set[int] = set()
    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        state[name] = param.detach().to("cpu").contiguous()
    return state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and everything else (for JSON)."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer_state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-N/`` atomically. Returns its path."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = trainable_state(model)
    if not all(torch.isfinite(t).all() for t in weights.values()):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DpokitError(f"refusing to save a checkpoint at step {step}: the weights are not finite")
    save_file(weights, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    manifest = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for path in tmp.iterdir():
        with path.open("rb+") as fh:
            os.fsync(fh.fileno())
    (tmp / COMPLETE).write_text("")
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step replaces the older copy
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is complete and every file matches its hash, else why not."""
    if not (path / COMPLETE).exists():
        return "incomplete (no COMPLETE marker)"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return "unreadable manifest.json"
    for name, digest in manifest.items():
        file = path / name
        if not file.is_file() or sha256_file(file) != digest:
            return f"{name} does not match its hash"
    return None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step-"))
    except ValueError:
        return -1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoints/step-N`` folders, newest first (temporary ``.tmp-`` folders are never listed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and _step_of(p) >= 0]
    return sorted(found, key=_step_of, reverse=True)


def newest_complete(run_dir: Path, note: Any = print) -> Path | None:
    """The newest checkpoint that is complete and matches its manifest. Older or broken ones are reported with
    ``note`` (one line each) and left where they are: nothing is deleted here."""
    for path in list_checkpoints(run_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        note(f"skipping checkpoint {path}: {problem}")
    return None


def rotate_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints. Called only after a newer checkpoint is complete, so the
    last complete one is never removed before its successor exists; incomplete ones are left for inspection."""
    complete = [p for p in list_checkpoints(run_dir) if (p / COMPLETE).exists()]
    for path in complete[keep:]:
        shutil.rmtree(path)


def restore_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any) -> dict[str, Any]:
    """Load weights, optimizer and scheduler state from a checkpoint; returns its trainer state."""
    weights = load_weights(path)
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise RuntimeError(f"{path}: checkpoint has weights the model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")),
                   json.loads((path / "optimizer.json").read_text()))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    return json.loads((path / "trainer_state.json").read_text())


def export_hf(model: nn.Module, tokenizer: Any, target: Path) -> Path:
    """Write ``target`` as a plain Hugging Face model folder (safetensors weights, config, tokenizer) that
    ``AutoModelForCausalLM.from_pretrained`` loads without dpokit. Written atomically like checkpoints."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    detach_quantizer(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
