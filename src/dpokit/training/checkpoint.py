"""Checkpoints (atomic, safetensors + JSON, no pickle) and export to a plain Hugging Face folder.

A checkpoint is written into a temporary folder next to its final place and renamed to
``checkpoints/step-N/`` only once every file is written, hashed into ``manifest.json`` and marked ``COMPLETE``;
a crash mid-write leaves only a ``.tmp-`` folder that readers ignore, and a failed write (disk full, the
file-size limit, a permission) removes it and ends with one line naming the checkpoint and the cause.

Under torchrun, a DDP run's checkpoint is this same plain format written by rank 0 (every rank holds the same
weights). An FSDP run's weights and optimizer state are sharded: every rank writes its shards through
``torch.distributed.checkpoint`` (DCP) into the temporary folder, then rank 0 adds the JSON files, hashes
every file (DCP's included) into the manifest, marks it ``COMPLETE`` and renames it. DCP's ``.metadata`` file
is a pickle; it is read only from checkpoints that pass the manifest check, i.e. ones dpokit wrote and
finished. Do not resume from an FSDP checkpoint of unknown origin.

Either format resumes under any number of processes and any strategy (``restore_checkpoint``): both name
tensors by parameter, never by rank. DCP reshards a sharded checkpoint onto whatever the loading process
holds (its FSDP shards, or whole tensors for a DDP rank or a single process without a process group); a plain
checkpoint is cut into each FSDP rank's shards as it is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpokit.errors import DpokitError
from dpokit.io import publish_dir, sha256_file, staging_dir, staging_path, writing
from dpokit.models.loading import detach_quantizer
from dpokit.models.sharded import stream_safetensors, weight_files
from dpokit.training.distributed import Dist

COMPLETE = "COMPLETE"
ADAPTER = "adapter"
"""The folder of a LoRA run's model folder (``final/``, an export) that holds the trained adapter in peft's format."""


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


def _new_tmp(root: Path, step: int) -> Path:
    """The hidden folder ``checkpoints/.tmp-step-N-PID`` a checkpoint is written into (never listed)."""
    return staging_dir(root / f"step-{step}")


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer_state: dict[str, Any], dist: Dist | None = None,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``checkpoints/step-N/`` atomically. Returns its path. Under torchrun every rank calls it: rank 0
    writes a plain checkpoint alone, every rank writes its shards of a sharded (FSDP) one. ``extra``: further
    safetensors files of a plain checkpoint, file name -> tensors (TR-DPO: ``reference.safetensors``)."""
    dist = dist or Dist()
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    if dist.sharded:
        if extra:
            raise DpokitError("extra checkpoint files are written only in the plain format, not by FSDP")
        return _save_sharded(root, step, model, optimizer, scheduler, trainer_state, dist)
    if not dist.is_main:
        return final
    weights = trainable_state(model)
    if not all(torch.isfinite(t).all() for t in weights.values()):
        raise DpokitError(f"refusing to save a checkpoint at step {step}: the weights are not finite")
    with writing(final, "checkpoint", cleanup=staging_path(final)):
        tmp = _new_tmp(root, step)
        save_file(weights, str(tmp / "model.safetensors"))
        for name, tensors in (extra or {}).items():
            save_file(tensors, str(tmp / name))
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        return _seal(tmp, final, scheduler, trainer_state)


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The trainable weights and the optimizer state as this rank's DCP shards (keys: parameter names)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


def _save_sharded(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                  trainer_state: dict[str, Any], dist: Dist) -> Path:
    import torch.distributed.checkpoint as dcp

    final = root / f"step-{step}"
    tmp = Path(dist.on_main(lambda: str(_new_tmp(root, step))))
    from torch.distributed.tensor import DTensor

    state = _sharded_state(model, optimizer)
    local = [t.to_local() if isinstance(t, DTensor) else t for t in state["model"].values()]
    if dist.sum([float(not all(torch.isfinite(t).all() for t in local))])[0]:  # decided alike on every rank
        dist.barrier()
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DpokitError(f"refusing to save a checkpoint at step {step}: the weights are not finite")
    dcp.save(state, checkpoint_id=str(tmp))  # every rank writes its own shard files
    dist.barrier()

    def seal() -> Path:
        with writing(final, "checkpoint", cleanup=tmp):
            return _seal(tmp, final, scheduler, trainer_state)

    return dist.on_main(seal)  # a WriteError is raised on every rank


def _seal(tmp: Path, final: Path, scheduler: Any, trainer_state: dict[str, Any]) -> Path:
    """Add the JSON files, hash every file into the manifest, mark COMPLETE and rename into place."""
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    manifest = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for path in tmp.iterdir():
        with path.open("rb+") as fh:
            os.fsync(fh.fileno())
    (tmp / COMPLETE).write_text("")
    return publish_dir(tmp, final)  # a re-run of the same step replaces the older copy


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


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


def is_sharded(path: Path) -> bool:
    """A checkpoint written by an FSDP run (DCP shards) rather than the plain format."""
    return (path / ".metadata").exists()


VALUE_HEAD = "value_head."
"""Prefix of the value head's tensors in a PPO checkpoint, whose policy tensors sit under ``model.``
(``dpokit.methods.ppo.trainer.PolicyValue``)."""


def policy_weights(path: Path) -> dict[str, torch.Tensor]:
    """The causal LM's trained tensors of a checkpoint, under the LM's own names: a PPO checkpoint holds the
    policy and its value head together, and only the policy is a language model."""
    weights = load_weights(path)
    if read_trainer_state(path).get("task") != "ppo":
        return weights
    return {name.removeprefix("model."): tensor for name, tensor in weights.items()
            if not name.startswith(VALUE_HEAD)}


def load_weights_into(model: nn.Module, path: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Overwrite the trained tensors of ``model`` (holding the run's starting weights) with a plain
    checkpoint's (or with ``weights`` read from it). Checkpoints store only trainable tensors, so the rest stay
    the starting weights."""
    weights = load_weights(path) if weights is None else weights
    params = dict(model.named_parameters())
    check_weight_names(path, weights, params)
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def check_weight_names(path: Path, weights: dict[str, torch.Tensor], params: dict[str, Any]) -> None:
    """A plain checkpoint's tensors must all be the model's: a name it lacks means another model."""
    unknown = [name for name in weights if name not in params]
    if unknown:
        raise DpokitError(f"{path}: checkpoint has weights the model lacks, e.g. {unknown[0]}")


def restore_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any, dist: Dist | None = None) -> dict[str, Any]:
    """Load weights, optimizer and scheduler state from a checkpoint of either format, whatever number of
    processes and strategy wrote it; returns its trainer state. Every rank calls it."""
    dist = dist or Dist()
    if is_sharded(path):
        _load_sharded(path, model, optimizer)
    elif dist.sharded:
        _load_plain_into_shards(path, model, optimizer)
    else:
        load_weights_into(model, path)
        load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")),
                       json.loads((path / "optimizer.json").read_text()))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    return read_trainer_state(path)


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A DCP checkpoint into ``model`` as it is now: an FSDP rank reads the slices of its own shards (any number
    of ranks: the saved shard boundaries need not match), a DDP rank or a single process reads whole tensors.
    Without a process group DCP reads every shard in this process. The optimizer's moments and step counts are
    keyed by parameter name, so they follow their parameters the same way."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(model, optimizer)  # the targets: this process's tensors, shards or whole
    with warnings.catch_warnings():  # without a process group DCP says it reads alone, which is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=_partial())
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _load_plain_into_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A plain checkpoint (one process or DDP) into an FSDP-sharded ``model``: every rank reads the whole
    files once and keeps its own shards of them (``full_state_dict``). The optimizer state was saved under the
    optimizer's parameter indices; they are renamed to parameter names, which is how a sharded optimizer state
    is addressed."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights = load_weights(path)
    check_weight_names(path, weights, dict(model.named_parameters()))  # strict=False would skip them unsaid
    whole = StateDictOptions(full_state_dict=True, strict=False)  # only trainable weights are checkpointed
    set_model_state_dict(model, weights, options=whole)
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    set_optimizer_state_dict(model, optimizer, named_optimizer_state(model, optimizer, tensors, meta),
                             options=whole)


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                          meta: dict[str, Any]) -> dict[str, Any]:
    """A plain checkpoint's optimizer state (``optimizer_tensors``: parameter indices) keyed by parameter name.
    ``Optimizer.state_dict`` numbers the parameters of its groups consecutively, in order; ``optimizer`` holds
    the same parameters in the same order (``[p for p in policy.parameters() if p.requires_grad]``)."""
    names = {id(param): name for name, param in model.named_parameters()}
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    state: dict[str, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(order[int(index)], {})[key] = value
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _partial() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)  # only the trainable weights are checkpointed


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a sharded (FSDP) model gathered whole, on rank 0's CPU (empty on other ranks). Every
    rank must call it. Only for models ``export_tensors`` cannot stream: it holds a whole copy on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    aliases = _tied_aliases(model)
    return {name: tensor for name, tensor in full.items() if name not in aliases}


def _tied_aliases(model: nn.Module) -> set[str]:
    """The second names of tied weights (embeddings = head: one parameter under two names). Gathered copies no
    longer share storage, so only the first name is written, as an unsharded model's export does."""
    return ({name for name, _ in model.named_parameters(remove_duplicate=False)}
            - {name for name, _ in model.named_parameters()})


def export_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]] | None:
    """The tensors a sharded model's export writes, by name, as this rank holds them (FSDP shards, buffers);
    None when transformers would rename or fuse them on saving (``revert_weight_conversion``, for some
    mixture-of-experts models), which needs every tensor at once."""
    skip = _tied_aliases(model) | set(getattr(model, "_keys_to_ignore_on_save", None) or [])
    tensors = [(name, tensor) for name, tensor in model.state_dict().items() if name not in skip]
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversions saves the names as they are
        return tensors
    shapes = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in tensors}
    return tensors if revert_weight_conversion(model, shapes) is shapes else None


def export_sharded(model: nn.Module, tokenizer: Any, target: Path, dist: Dist,
                   add: Callable[[Path, nn.Module, Any], None] | None = None) -> Path:
    """``export_hf`` of a FSDP-sharded model; every rank calls it. The weights are gathered and written one
    tensor at a time (``dpokit.models.sharded.stream_safetensors``), so no rank holds a whole copy of the model
    on top of its shards, its optimizer state and the reference; the files are those ``save_pretrained``
    writes (one ``model.safetensors``, or numbered files and their index past 50 GB). A model whose weights
    transformers converts on saving is gathered whole onto rank 0 and saved by ``save_pretrained``."""
    tensors = export_tensors(model)
    if tensors is None:
        weights = full_state_dict(model)
        return dist.on_main(lambda: export_hf(model, tokenizer, target, weights, add))
    files = weight_files(tensors)
    tmp = staging_path(target)

    def begin() -> None:
        with writing(target, "model folder", cleanup=tmp):
            staging_dir(target)
            model.save_pretrained(tmp, safe_serialization=True, state_dict={})  # config, generation config
            (tmp / "model.safetensors").unlink(missing_ok=True)  # the weights are streamed below

    dist.on_main(begin)
    by_name = dict(tensors)
    failure: OSError | None = None
    for file, names in files.items():  # every rank gathers; rank 0 writes
        try:
            stream_safetensors(tmp / file if dist.is_main else None, [(name, by_name[name]) for name in names])
        except OSError as exc:
            failure = failure or exc

    def finish() -> Path:
        with writing(target, "model folder", cleanup=tmp):
            if failure is not None:
                raise failure
            if len(files) > 1:
                size = sum(t.numel() * t.element_size() for _, t in tensors)
                index = {"metadata": {"total_size": size},
                         "weight_map": {name: file for file, names in files.items() for name in names}}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            tokenizer.save_pretrained(tmp)
            if add is not None:
                add(tmp, model, tokenizer)
            return publish_dir(tmp, target)

    return dist.on_main(finish)


def export_hf(model: nn.Module, tokenizer: Any, target: Path,
              state_dict: dict[str, torch.Tensor] | None = None,
              add: Callable[[Path, nn.Module, Any], None] | None = None) -> Path:
    """Write ``target`` as a plain Hugging Face model folder (safetensors weights, config, tokenizer) that
    ``AutoModelForCausalLM.from_pretrained`` loads without dpokit. Written atomically like checkpoints.
    ``state_dict`` replaces the model's own weights (the gathered weights of a sharded model); ``add(folder,
    model, tokenizer)`` writes more files into the staged folder (the model card: ``dpokit.integrations.hub.hub_files``).

    A LoRA model (a peft ``PeftModel``) is written twice in the one folder: its adapter as trained, by peft's own
    ``save_pretrained``, in ``ADAPTER/`` (what ``PeftModel.from_pretrained(base, folder / ADAPTER)`` loads), then
    the adapters folded into the base weights. The adapter must be saved first: merging replaces the LoRA layers."""
    with writing(target, "model folder", cleanup=staging_path(target)):
        tmp = staging_dir(target)
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(tmp / ADAPTER, safe_serialization=True)
            model = model.merge_and_unload()
        detach_quantizer(model)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if add is not None:
            add(tmp, model, tokenizer)
        return publish_dir(tmp, target)
