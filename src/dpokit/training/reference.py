"""Where the reference log-probs log pi_ref(y|x) come from.

- ``model``: a frozen copy of the reference in memory, run without gradients on the same batch layout and
  through the same log-prob function as the policy, so both sides of every log-ratio are computed alike.
- ``adapter``: with LoRA, the reference is the policy with its adapters disabled: no second copy of the
  weights.
- ``store``: reference log-probs computed once and kept on disk, content-addressed, so runs that differ only in
  beta, loss or learning rate (the paper sweeps beta) reuse them, and the reference model is not in memory
  while training.

The store computes a response exactly as the training step computes the policy's: the whole group (prompt and
every response, in order) in the training's batch layout, under the same autocast, attention implementation and
log-prob function. In bf16 a response's numbers depend on where it sits (in the packed layout the rejected
response follows the chosen one; a response scored alone at another offset rounds differently, by up to 0.3
nats on SmolLM2), so at step 1, where the policy is the reference, the implicit rewards are exactly 0 only if
both sides lay the group out alike.

The store key of a response is sha256(what changes the numbers: reference weights, precision, attention
implementation, layout and batch size, and for a vision-language model the processor's settings; the group's
prompt and response token ids, and the encoded bytes of the prompt's images; the response's place in the
group). The token ids are what the tokenizer, the chat template and the truncation settings made of the row, so
a change in any of them is a different key and is computed afresh; an interrupted precompute keeps every shard
it finished and computes only what is missing. Token ids alone do not tell images apart (every image of a
LLaVA prompt is the same run of ``<image>`` ids), hence the images' sha256; and the pixels the model sees
depend on the processor (resize, crop, normalisation, splitting), hence its settings in the model's part.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from dpokit.data.batch import Layout, collate_tokenized, regroup, to_device
from dpokit.data.tokenize import TokenizedGroup
from dpokit.errors import ConfigError
from dpokit.io import write_bytes, writing
from dpokit.models.loading import cache_dir, freeze
from dpokit.models.logprobs import batch_logps
from dpokit.models.sharded import on_device
from dpokit.training.distributed import Dist

Autocast = Callable[[], AbstractContextManager]


def group_keys(model_key: bytes, item: TokenizedGroup) -> list[bytes]:
    """The store key of every response of a group, best first (a pair: chosen, rejected): the group's token ids
    and the response's place in it, since both decide how the response is laid out and so its bf16 numbers;
    for a group with images (``dpokit.data.vision.VisionGroup``) also their sha256, since the same ids stand
    for any image. A text group's key is what it was before images existed, so text stores stay valid."""
    digest = hashlib.sha256(model_key)
    for ids in (item.prompt_ids, *item.responses_ids):
        digest.update(struct.pack(f"<I{len(ids)}i", len(ids), *ids))
    images = getattr(item, "images_sha256", "")
    if images:
        digest.update(b"images:" + bytes.fromhex(images))
    group = digest.digest()
    return [hashlib.sha256(group + struct.pack("<I", k)).digest()[:16] for k in range(len(item.responses_ids))]


class FrozenReference:
    """pi_ref as a model in memory. Under FSDP it is sharded like the policy (``Dist.wrap_frozen``), so every
    rank must make the same reference calls: the training loop runs the same micro-batches on every rank."""

    def __init__(self, model: nn.Module, dist: Dist | None = None):
        self.model = freeze(model)
        self.logps_module = (dist or Dist()).wrap_frozen(self.model)  # batch -> SlotLogps

    @torch.no_grad()
    def logps(self, batch: dict[str, Any], items: Sequence[TokenizedGroup], autocast: Autocast) -> torch.Tensor:
        """Reference log-probs of every response in ``batch``, grouped: (G, K)."""
        with autocast():
            logps = self.logps_module(batch).logps
        return regroup(logps, batch)


class AdapterReference:
    """pi_ref as the LoRA policy with its adapters switched off (peft's ``disable_adapter``)."""

    def __init__(self, policy: nn.Module):
        self.policy = policy

    @torch.no_grad()
    def logps(self, batch: dict[str, Any], items: Sequence[TokenizedGroup], autocast: Autocast) -> torch.Tensor:
        was_training = self.policy.training
        self.policy.eval()  # the reference side never sees dropout
        try:
            with self.policy.disable_adapter(), autocast():
                logps, _ = batch_logps(self.policy, batch)
        finally:
            self.policy.train(was_training)
        return regroup(logps, batch)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every tensor of the model's state (names, dtypes, shapes, bytes). LoRA adapter weights are
    left out and peft's name prefixes removed, so a LoRA run and a full run on the same base share a key."""
    digest = hashlib.sha256()
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        state[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = tensor
    for name, tensor in sorted(state.items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class LogpStore:
    """A folder of shards ``shard-*.safetensors`` with ``keys`` (N, 16) uint8 and ``logps`` (N,) float32.

    Shards are written to a temporary name and renamed, so a crash leaves only whole shards; readers load every
    shard into one dict. Several processes may add shards to the same folder (names are unique).
    """

    def __init__(self, folder: Path):
        self.folder = folder
        with writing(folder, "reference store"):
            self.folder.mkdir(parents=True, exist_ok=True)
        self.values: dict[bytes, float] = {}
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            tensors = load_file(str(shard))
            for key, value in zip(tensors["keys"].numpy(), tensors["logps"].tolist()):
                self.values[key.tobytes()] = value

    def __contains__(self, key: bytes) -> bool:
        return key in self.values

    def __len__(self) -> int:
        return len(self.values)

    def add(self, keys: Sequence[bytes], logps: Sequence[float]) -> None:
        if not keys:
            return
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        key_tensor = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), 16)
        write_bytes(self.folder / name, save({"keys": key_tensor, "logps": torch.tensor(list(logps), dtype=torch.float32)}))
        self.values.update(zip(keys, logps))


class StoreReference:
    """pi_ref read from a ``LogpStore`` (no model in memory)."""

    def __init__(self, store: LogpStore, model_key: bytes):
        self.store, self.model_key = store, model_key

    def logps(self, batch: dict[str, Any], items: Sequence[TokenizedGroup], autocast: Autocast) -> torch.Tensor:
        slots = batch["slots"]
        out = torch.zeros(slots.shape, dtype=torch.float32)
        for g, item in enumerate(items):
            for k, key in enumerate(group_keys(self.model_key, item)):
                out[g, k] = self.store.values[key]
        return out.to(slots.device)


@torch.no_grad()
def sync_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """TR-DPO's update of the reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
    Alignment", https://arxiv.org/abs/2404.09656), weight by weight:

        theta_ref <- alpha * theta + (1 - alpha) * theta_ref,

    the soft update for alpha < 1 and the hard update theta_ref <- theta for alpha = 1 (copied, so pi_ref is
    then exactly pi); alpha = 0 leaves pi_ref as it is. The training step calls it every ``reference.sync.every``
    optimizer steps, so pi_ref trails the policy and the KL penalty anchors to a recent policy instead of the
    starting one. ``reference`` and ``policy`` have the same parameter names and shapes
    (``check_sync_compatible``)."""
    if alpha == 0:
        return
    policy_params = dict(policy.named_parameters())
    for name, ref_param in reference.named_parameters():
        source = policy_params[name].detach().to(ref_param.dtype)
        if alpha == 1:
            ref_param.copy_(source)
        else:
            ref_param.lerp_(source, alpha)


def check_sync_compatible(reference: nn.Module, policy: nn.Module) -> None:
    """Raise ConfigError naming ``reference.sync`` unless the two models have the same weights by name and
    shape (a reference of another architecture cannot take the policy's weights)."""
    ref = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    pol = {n: tuple(p.shape) for n, p in policy.named_parameters()}
    if ref != pol:
        differ = sorted(set(ref) ^ set(pol)) or sorted(n for n in ref if ref[n] != pol[n])
        raise ConfigError(f"reference.sync: the reference and the policy have different weights (e.g. "
                          f"{differ[0]}); sync needs the same architecture")


def reference_weights(reference: nn.Module) -> dict[str, torch.Tensor]:
    """The reference's parameters, contiguous on CPU, for a checkpoint (tied weights once, as named_parameters
    lists them)."""
    return {name: p.detach().to("cpu").contiguous() for name, p in reference.named_parameters()}


@torch.no_grad()
def load_reference_weights(reference: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(reference.named_parameters())
    for name, tensor in weights.items():
        params[name].copy_(tensor)


Reference = FrozenReference | AdapterReference | StoreReference
"""Anything with ``logps(batch, items, autocast) -> (G, K)``."""


def precompute(store: LogpStore, model: nn.Module, model_key: bytes, items: Iterable[TokenizedGroup],
               pad_id: int, autocast: Autocast, device: torch.device, batch_size: int = 16, shard_rows: int = 2048,
               progress: Callable[[int, int], None] | None = None, part: tuple[int, int] = (0, 1),
               layout: Layout = "packed", pack_length: int = 0) -> int:
    """Compute the reference log-prob of every response of ``items`` missing from ``store``, whole groups at a
    time in the training's batch ``layout`` (``batch_size`` groups a batch), as the policy's are computed.
    Returns how many responses were computed. Finished shards survive an interruption; the next call computes
    only the rest.

    ``part`` (r, n): compute only every n-th missing group starting at the r-th (rank r of n ranks, each
    writing its own shards); the missing list is the same on every rank when their stores were read before
    any rank wrote."""
    missing: dict[bytes, tuple[TokenizedGroup, list[bytes]]] = {}
    for item in items:
        keys = group_keys(model_key, item)
        if any(key not in store for key in keys):
            missing.setdefault(b"".join(keys), (item, keys))
    todo = list(missing.values())[part[0]::part[1]]
    pending_keys: list[bytes] = []
    pending_values: list[float] = []
    was_training = model.training
    model.eval()  # the reference never sees dropout
    # A LoRA policy at its starting point is pi_ref with the adapters off.
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), adapters_off:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            batch = to_device(collate_tokenized([item for item, _ in chunk], pad_id, layout=layout,
                                                pack_length=pack_length), device)
            with autocast():
                logps, _ = batch_logps(model, batch)
            grouped = regroup(logps, batch).tolist()  # (G, K)
            for (_, keys), values in zip(chunk, grouped):
                pending_keys += keys
                pending_values += values[:len(keys)]
            if len(pending_keys) >= shard_rows:
                store.add(pending_keys, pending_values)
                pending_keys, pending_values = [], []
            if progress:
                progress(min(start + batch_size, len(todo)), len(todo))
    store.add(pending_keys, pending_values)
    model.train(was_training)
    return sum(len(keys) for _, keys in todo)


def store_key(model: nn.Module, cfg: Any, processor: Any = None) -> bytes:
    """What a stored log-prob's numbers depend on besides its tokens and images: the reference weights and how
    they are run (precision, attention implementation, batch layout, row length, groups per batch), and a
    vision-language model's ``processor`` settings (image size, crop, normalisation, splitting: what turns an
    image's bytes into the pixels the model sees). A text model's key is unchanged by the last."""
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    how = [cfg.train.precision, attention, cfg.train.layout, cfg.train.pack_length, cfg.reference.batch_size]
    if processor is not None:
        how.append(hashlib.sha256(processor.to_json_string().encode()).hexdigest())  # sorted keys: stable
    return hashlib.sha256("|".join(map(str, [weights_fingerprint(model), *how])).encode()).digest()


def build_reference(cfg: Any, models: Any, items: Iterable[TokenizedGroup], device: torch.device,
                    autocast: Autocast, note: Callable[[str], None] = print,
                    dist: Dist | None = None) -> FrozenReference | AdapterReference | StoreReference:
    """The reference of ``reference.mode``. For ``store``, fills the store first (with the reference model, or
    with the policy's untouched starting weights when the reference is the same model) and then lets the
    model go, so training holds no reference weights. Under torchrun the missing responses are split across
    ranks (each computes its share and writes its own shards), then every rank reads the whole store."""
    dist = dist or Dist()
    mode = cfg.reference.mode
    if mode == "model":
        return FrozenReference(on_device(models.reference, device), dist)
    if mode == "adapter":
        return AdapterReference(models.policy)
    model = models.reference if models.reference is not None else models.policy
    model_key = store_key(model, cfg, getattr(models, "processor", None))
    root = Path(cfg.reference.store_dir) if cfg.reference.store_dir else cache_dir() / "refstore"
    store = LogpStore(root / model_key.hex()[:32])
    dist.barrier()  # every rank has read the store before any rank adds to it: the same missing list
    # The distinct responses of this run's data (a pair in both train and eval counts once): what is reused is
    # those of them already stored, never the rest of the store (other data, other images).
    seen: set[bytes] = set()

    def counted(groups: Iterable[TokenizedGroup]) -> Iterable[TokenizedGroup]:
        for item in groups:
            seen.update(group_keys(model_key, item))
            yield item

    computed = precompute(store, model.to(device), model_key, counted(items), models.tokenizer.pad_token_id,
                          autocast, device, cfg.reference.batch_size, part=(dist.rank, dist.world),
                          layout=cfg.train.layout, pack_length=cfg.train.pack_length)
    if dist.active:
        dist.barrier()  # every rank's shards are written
        store = LogpStore(store.folder)
        computed = int(dist.sum([computed])[0])
    note(f"reference store {store.folder}: {computed} responses computed, {len(seen) - computed} reused")
    models.reference = None  # the only other reference to a separate reference model: free it
    return StoreReference(store, model_key)
