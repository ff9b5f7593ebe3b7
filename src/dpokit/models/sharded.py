"""Loading a model under FSDP without a full copy per process.

Loaded the plain way, every rank of an FSDP run reads the whole policy and the whole reference into host RAM
before ``fully_shard`` splits them: 2 x model bytes per rank, world times over on a node. Here instead:

1. ``skeleton``: the model's modules are built with every *parameter* on the meta device (no memory, no random
   init); buffers are built for real (rotary ``inv_freq`` and other non-persistent buffers are computed at
   construction and are not in the weight files, so they cannot be "loaded" later);
2. ``fully_shard`` (``dpokit.training.distributed``) splits the meta parameters into meta DTensor shards;
3. ``materialize``: storage for this rank's shards only (``to_empty``), the constructed buffers put back, and
   each shard filled with just its rows of the weight files (``safe_open(...).get_slice``: the other rows are
   never read).

Per-rank peak host RAM while loading is then ~ model bytes / world + the largest tensor's row slice, instead of
2 x model bytes. The shards hold exactly the values a full load followed by ``fully_shard`` would hold (same
file, same dtype conversion, same row split), so results are unchanged. Tied weights are one parameter (the
skeleton ties them as the plain model does); a tied head absent from the file is read under its other name.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpokit.errors import ModelError
from dpokit.models.source import (
    DTYPES,
    ModelSource,
    check_remote_code,
    refuse_reward_model,
    runnable_attention,
    tiny_model,
    tiny_tokenizer,
)

Reader = Callable[[str], Any]
"""Name -> something that slices rows lazily (``tensor[a:b]``), or None when the name is not stored."""


@dataclass
class Weights:
    """Where a skeleton's weights come from, attached to it until ``materialize`` fills its shards."""

    open: Callable[[], contextlib.AbstractContextManager[Reader]]
    dtype: torch.dtype


ATTR = "_dpokit_weights"


def is_skeleton(model: nn.Module) -> bool:
    return getattr(model, ATTR, None) is not None


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)``; a skeleton gets its storage on ``device`` when it is sharded instead."""
    return model if is_skeleton(model) else model.to(device)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device as it is registered, so the ``empty``
    storage a layer allocates is never touched and its random init runs on meta (free); buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def skeleton(source: ModelSource, dtype: str = "float32", trust_remote_code: bool = False,
             attn_implementation: str = "sdpa", vocab_size: int | None = None) -> nn.Module | None:
    """The model of ``source`` with meta parameters and the way to read its weights, or None when its weights
    are not in safetensors files (the caller loads it whole)."""
    attn_implementation = runnable_attention(attn_implementation)
    if source.kind == "tiny":
        full = tiny_model(vocab_size or len(tiny_tokenizer())).to(DTYPES[dtype])
        full.config._attn_implementation = attn_implementation
        state = full.state_dict()

        @contextlib.contextmanager
        def from_memory() -> Iterator[Reader]:
            yield state.get

        with parameters_on_meta():
            model = tiny_model(full.config.vocab_size).to(DTYPES[dtype])
        model.config._attn_implementation = attn_implementation
        setattr(model, ATTR, Weights(from_memory, DTYPES[dtype]))
        return model
    files = safetensors_files(source)
    if not files:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    check_remote_code(source, trust_remote_code)
    refuse_reward_model(source)
    try:
        config = AutoConfig.from_pretrained(source.location, revision=source.revision,
                                            trust_remote_code=trust_remote_code)
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                     attn_implementation=attn_implementation)
    except Exception as exc:  # transformers raises many types for configs it cannot build
        raise ModelError(f"{source.location}: cannot build model ({str(exc).strip().splitlines()[0]})") from None
    setattr(model, ATTR, Weights(lambda: _open_files(files), DTYPES[dtype]))
    return model


def safetensors_files(source: ModelSource) -> list[Path]:
    """The safetensors files of a local folder or a Hub model (only those the index names are downloaded into
    the Hub cache: a repository may also hold a consolidated copy); empty when there are none (e.g. a
    pickle-only checkpoint)."""
    def listed(folder: Path) -> list[str]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return ["model.safetensors"] if source.kind == "hub" or (folder / "model.safetensors").is_file() else \
            sorted(path.name for path in folder.glob("*.safetensors"))

    if source.kind == "folder":
        folder = Path(source.location)
        return [folder / name for name in listed(folder) if (folder / name).is_file()]
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source.location, revision=source.revision, allow_patterns=["*.json"]))
        names = listed(folder)
        folder = Path(snapshot_download(source.location, revision=source.revision, allow_patterns=names))
    except Exception as exc:  # network, auth, unknown id: one line
        raise ModelError(f"{source.location}: cannot download model ({str(exc).strip().splitlines()[0]})") from None
    return [folder / name for name in names if (folder / name).is_file()]


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class _Rows:
    """Rows ``[a:b]`` of one stored tensor, read from its file with a plain read of just their bytes (a
    row-major tensor's rows are one contiguous range). Not memory-mapped: pages of a mapped file that a rank
    touches count in its resident memory while the file is open."""

    def __init__(self, fh: Any, begin: int, dtype: torch.dtype, shape: list[int]):
        self.fh, self.begin, self.dtype, self.shape = fh, begin, dtype, shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        first, stop, _ = rows.indices(self.shape[0] if self.shape else 1)
        tail = self.shape[1:]
        row_bytes = torch.Size(tail).numel() * self.dtype.itemsize
        out = torch.empty([max(0, stop - first), *tail], dtype=self.dtype)
        if out.numel():
            self.fh.seek(self.begin + first * row_bytes)
            self.fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out if self.shape else out.reshape(())


@contextlib.contextmanager
def _open_files(files: list[Path]) -> Iterator[Reader]:
    """Every tensor of the safetensors files by name (header: 8-byte little-endian length, then JSON with each
    tensor's dtype, shape and byte offsets after the header)."""
    with contextlib.ExitStack() as stack:
        where: dict[str, _Rows] = {}
        for file in files:
            fh = stack.enter_context(open(file, "rb"))
            length = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(length))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ModelError(f"{file}: {name} is stored as {info['dtype']}, which dpokit cannot shard")
                where[name] = _Rows(fh, 8 + length + info["data_offsets"][0], SAFETENSORS_DTYPES[info["dtype"]],
                                    info["shape"])
        yield where.get


@torch.no_grad()
def materialize(module: nn.Module, model: nn.Module, device: torch.device,
                buffer_device: torch.device | None = None) -> None:
    """Give the sharded skeleton ``module`` (``fully_shard`` done; ``model`` is the skeleton inside it) storage
    on ``device`` for this rank's shards and fill them from the weight files, reading only this rank's rows.
    Buffers (built with the skeleton) go to ``buffer_device`` (default ``device``): with CPU offload the shards
    live on the CPU while the buffers must be where the gathered weights compute."""
    from torch.distributed.tensor import DTensor

    weights: Weights = getattr(model, ATTR)
    # Real: built with the skeleton. Every name of a shared buffer (``to_empty`` gives each its own copy).
    buffers = {name: b.clone() for name, b in module.named_buffers(remove_duplicate=False)}
    module.to_empty(device=device)
    for name in buffers:
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._buffers[leaf] = buffers[name].to(buffer_device or device)
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    prefix = next(n for n, m in module.named_modules() if m is model)
    prefix = prefix + "." if prefix else ""
    with weights.open() as read:
        for param in {id(p): p for p in module.parameters()}.values():
            stored = [n.removeprefix(prefix) for n in names[id(param)]]
            rows = next((r for r in map(read, stored) if r is not None), None)
            if rows is None:
                raise ModelError(f"the weight files hold no {stored[0]} (an architecture whose stored names "
                                 "differ from its modules'); run it with distributed.strategy: ddp")
            local = param.to_local() if isinstance(param, DTensor) else param
            start, stop = shard_rows(param)
            if stop > start:
                local.copy_(rows[start:stop].to(weights.dtype))
    delattr(model, ATTR)


def hold_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold a skeleton's parameters in ``dtype`` once loaded (the weights are converted as they are read);
    buffers keep theirs (rotary frequencies in bf16 would move every position's angle)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    getattr(model, ATTR).dtype = dtype


def shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, stop) rows of dim 0 this rank holds of a FSDP2 parameter: ``torch.chunk`` over the mesh, so
    chunks of ceil(rows / world) rows, the last ones short or empty. A plain tensor: all of it."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 1
    rows, world, rank = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    start, stop = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
    if param.to_local().shape[0] != stop - start:
        raise ModelError(f"unexpected FSDP shard of {tuple(param.shape)}: {tuple(param.to_local().shape)} rows "
                         f"on rank {rank} of {world}")
    return start, stop


# --------------------------------------------------------------------------------------- writing it back whole

SHARD_BYTES = 50 * 10**9
"""Most bytes in one weight file of an export, as ``save_pretrained`` splits them (the Hub's per-file limit)."""


def weight_files(tensors: list[tuple[str, torch.Tensor]], limit: int = SHARD_BYTES) -> dict[str, list[str]]:
    """File name -> the tensors it holds, in order, split as ``save_pretrained`` names them: one
    ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` when the whole is over ``limit`` bytes."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": group for i, group in enumerate(groups, 1)}


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """A FSDP2 parameter gathered whole on every rank (a collective: every rank calls it, in the same order),
    on the CPU; a plain tensor (a buffer) as it is. Offloaded shards are moved to the mesh's device first,
    since NCCL gathers GPU tensors only."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        mesh, local = tensor.device_mesh, tensor.to_local()
        if local.device.type != mesh.device_type:
            tensor = DTensor.from_local(local.to(mesh.device_type), mesh, tensor.placements, run_check=False,
                                        shape=tensor.shape, stride=tensor.stride())
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous()


def stream_safetensors(path: Path | None, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Write ``tensors`` (a sharded model's, in this order) as one safetensors file, gathering and writing one
    tensor at a time, so no rank ever holds more than one whole tensor. Every rank calls it (the gathers are
    collectives); only the rank given a ``path`` writes. The header is known before any data (each tensor's
    dtype and shape), so the file is written front to back: 8-byte little-endian header length, the JSON
    header padded with spaces to 8 bytes, then each tensor's bytes at its offsets."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    failure: OSError | None = None  # a failed write on this rank: the gathers go on, so no other rank waits
    with contextlib.ExitStack() as stack:
        fh = None
        try:
            if path is not None:
                fh = stack.enter_context(open(path, "wb"))
                fh.write(len(encoded).to_bytes(8, "little") + encoded)
        except OSError as exc:
            failure, fh = exc, None
        for _, tensor in tensors:
            whole = gathered(tensor)
            try:
                if fh is not None and whole.numel():
                    fh.write(memoryview(whole.reshape(-1).view(torch.uint8).numpy()))
            except OSError as exc:
                failure, fh = exc, None
            del whole
    if failure is not None:
        raise failure
