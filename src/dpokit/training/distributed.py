"""torchrun / torch.distributed (DDP, FSDP2): one code path for 1 and N processes.

Launched by ``torchrun``, every process finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment
(nanoGPT's test); otherwise there is one process, no process group, and every helper below reduces to what a
single process does anyway (sums over one rank, one micro-batch list, no wrapper around the model).

How N processes train exactly like one with the same global batch:

- every rank draws the *same* global list of pair indices for an optimizer step (``PairStream`` is seeded)
  and takes its own share (``Dist.share``), so no pair is duplicated or dropped, even in an uneven last step;
- every rank runs the same number of micro-batches (a rank short of pairs runs a zero-weight placeholder),
  because DDP's and FSDP's collectives run inside the forward and backward calls and must match across ranks;
- each rank divides its loss sum by the *global* number of pairs of the step and multiplies by the world
  size, because DDP and FSDP average gradients over ranks and the sum is what one process would compute;
- metrics are sums over pairs all-reduced across ranks (``Dist.sum``), so means are over every pair.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from dpokit.errors import DpokitError, Preempted
from dpokit.models.logprobs import batch_logps
from dpokit.models.sharded import hold_in, is_skeleton, materialize

T = TypeVar("T")


class SlotLogps(NamedTuple):
    """What ``LogpsModule`` computes for each response ("slot") of a batch, (S,) each."""

    logps: torch.Tensor
    """Summed response log-probs (with LD-DPO's ``target_weight`` when the batch has one)."""
    n_tokens: torch.Tensor
    log_weights: torch.Tensor | None = None
    """WPO's log-weights, without gradient; only when asked (``wpo=True``)."""
    unweighted: torch.Tensor | None = None
    """The summed log-probs without ``target_weight``; only when asked (``unweighted=True``)."""
    logit_sums: torch.Tensor | None = None
    """Each response's sum over its tokens of the mean logit over the vocabulary, without gradient; only when
    asked (``mean_logits=True``)."""


class LogpsModule(nn.Module):
    """``batch -> SlotLogps`` of a causal LM as one module call (``wpo=True``: also WPO's log-weights;
    ``unweighted=True``: also the log-probs without LD-DPO's token weights; ``mean_logits=True``: also the
    responses' summed mean logits).

    DDP and FSDP act through hooks on module calls: wrapping the whole log-prob computation (decoder, then the
    vocabulary projection on response positions only) in one module puts the tied embedding/head weights
    inside the wrapped call, which calling ``model.get_decoder()`` directly would bypass.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], wpo: bool = False, unweighted: bool = False,
                mean_logits: bool = False) -> SlotLogps:
        logps, n_tokens, *extra = batch_logps(self.model, batch, wpo=wpo, unweighted=unweighted,
                                              mean_logits=mean_logits)
        asked = iter(extra)  # in layout_logps' order: wpo, unweighted, mean_logits
        return SlotLogps(logps, n_tokens, next(asked) if wpo else None, next(asked) if unweighted else None,
                         next(asked) if mean_logits else None)


@dataclass
class Dist:
    """Where this process stands: ``rank`` of ``world``, its device, and whether a process group is up."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"
    active: bool = False
    """True under torchrun (a process group exists, even of one process)."""
    offload: str = "none"
    """``distributed.offload``: ``params`` keeps FSDP's shards (and gradients, and so the optimizer step) on
    the CPU."""
    compute_dtype: torch.dtype | None = None
    """bf16 runs: FSDP gathers the weights in this dtype (``train.setup`` sets it once the precision is
    resolved); None gathers them as stored."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Weights and optimizer state are split across ranks (FSDP): checkpoints are written by every rank."""
        return self.active and self.strategy == "fsdp"

    # ------------------------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sums over every rank (float64: token counts stay exact)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order, on every rank (small JSON-like values only)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only (it touches the run folder) and give every rank its result; a
        ``DpokitError`` it raises is raised on every rank, so no rank waits for one that gave up."""
        if not self.active:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except DpokitError as exc:
                box[0] = ("error", exc)
        torch.distributed.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """End the process group once every rank is done. The barrier first: a rank that tore the group down
        while rank 0 was still writing final/ (after the FSDP gather) aborted now and then under load
        ("terminate called without an active exception", 1 run in 4 with the CPU busy), failing the run."""
        if self.active and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            self.active = False

    # ------------------------------------------------------------------------------------------------- data

    def share(self, indices: list[int], batch_size: int) -> list[list[int]]:
        """This rank's micro-batches of one optimizer step whose global pair indices are ``indices``.

        Ranks take every ``world``-th pair (``indices[rank::world]``), so shares differ by at most one pair,
        and every rank gets the same number of micro-batches: an empty list is a placeholder the rank must
        still run (with zero weight) so that its collectives match the other ranks'. One process: the step's
        pairs cut into consecutive micro-batches, as always.
        """
        mine = indices[self.rank::self.world]
        longest = len(indices[::self.world])  # rank 0 holds the largest share
        n_micro = -(-longest // batch_size)  # none at all when the step has no pairs (forced resume past the end)
        micros = [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
        return micros + [[] for _ in range(n_micro - len(micros))]

    # ------------------------------------------------------------------------------------------------ model

    def wrap_policy(self, policy: nn.Module) -> nn.Module:
        """The policy as a ``LogpsModule``: plain for one process, DDP- or FSDP-wrapped under torchrun."""
        return self.wrap_trainable(LogpsModule(policy))

    def wrap_trainable(self, module: nn.Module) -> nn.Module:
        """A trainable module whose one call computes a pass's outputs: plain for one process, DDP- or
        FSDP-wrapped under torchrun."""
        if not self.active:
            return module
        if self.strategy == "fsdp":
            return self._shard(module)
        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync in forward: the only buffers are constants (rotary frequencies), and a broadcast in
        # every forward would be one more collective for every rank to match.
        names = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=varies_by_batch(module),
                                       **no_sync)

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        """A frozen model (the reference) as a ``LogpsModule``: sharded like the policy under FSDP (never
        updated: no gradients, so FSDP only gathers its weights for each forward), a full copy otherwise."""
        module = LogpsModule(model)
        if not self.sharded:
            return module
        if self.compute_dtype is not None and is_skeleton(model):
            # Never updated, so no fp32 masters needed: read straight into the dtype FSDP would gather it in
            # (the same rounding of the same stored values, done once at load instead of at every gather).
            hold_in(model, self.compute_dtype)
        # Without a backward pass to reshard it, the root would keep its gathered weights (embeddings, head).
        return self._shard(module, reshard_root=True)

    def _shard(self, module: nn.Module, reshard_root: bool | None = None) -> nn.Module:
        """``_fully_shard`` with this run's precision and offload; a skeleton (``dpokit.models.sharded``) gets its
        shards' storage and weights only now."""
        model = getattr(module, "model", module)
        offload = self.offload == "params"
        sharded = _fully_shard(module, reshard_root, self.compute_dtype, offload)
        if is_skeleton(model):
            materialize(sharded, model, shard_device(self.device, offload), self.device)
        return sharded

    def reshard(self, module: nn.Module) -> None:
        """Free the whole weights FSDP still holds after a forward without backward (evaluation): FSDP2 keeps
        the root unit (embeddings, final norm, the tied head) gathered after its forward, for the backward it
        expects; without one they would stay gathered until the next training step's backward. The decoder
        layers reshard after every forward anyway; the frozen reference's root is told to (``wrap_frozen``)."""
        if self.sharded and hasattr(module, "reshard"):
            module.reshard()

    @contextlib.contextmanager
    def grad_sync(self, module: nn.Module, sync: bool) -> Iterator[None]:
        """Accumulate gradients locally unless ``sync`` (the step's last micro-batch): one gradient
        reduction per optimizer step, as DDP's ``no_sync`` intends."""
        if not self.active or sync:
            yield
        elif self.strategy == "fsdp":
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        else:
            with module.no_sync():
                yield

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip every gradient by the norm of the whole gradient and return that norm, the same on every rank
        (DDP's gradients are already whole and identical). FSDP's gradients are shards (DTensors): the norm is
        reduced across ranks first, so every shard is scaled by the full gradient's norm."""
        if not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0, False, None)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, None)
        return float(total)

    @property
    def grad_scale(self) -> int:
        """DDP and FSDP average gradients over ranks; each rank's loss is already divided by the global pair
        count, so multiplying by the world size makes the result the sum, i.e. the one-process gradient."""
        return self.world

    # ------------------------------------------------------------------------------------------------ errors

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Under torchrun, turn any failure into one line naming the rank. A rank whose peer died or hung sees
        a communication error (immediately when the peer's process is gone, else after
        ``distributed.timeout_s``) and says so; torchrun then stops the remaining ranks."""
        if not self.active:
            yield
            return
        try:
            yield
        except (Preempted, KeyboardInterrupt):
            raise  # every rank stopped together on purpose: no failure to name
        except DpokitError as exc:
            raise DpokitError(f"rank {self.rank}: {exc}") from exc
        except Exception as exc:  # a collective or a step failed: one line per rank, never a hang
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if _is_peer_failure(exc):
                detail = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # no gloo source location
                raise DpokitError(f"rank {self.rank}: another rank failed or stopped responding; stopping "
                                  f"(see that rank's error) [{detail}]") from exc
            raise DpokitError(f"rank {self.rank}: {type(exc).__name__}: {first}") from exc


def varies_by_batch(module: nn.Module) -> bool:
    """Whether some trainable parameters of ``module`` may get no gradient from a pass, so that DDP must look
    for them after each forward (``find_unused_parameters``); without it, a rank whose pass leaves a parameter
    unused never reduces that parameter's bucket, and the ranks' collectives stop matching (an error at the
    next forward, or a gloo abort on a size mismatch).

    A vision-language model: a pass whose rows have no image never runs the vision encoder or the projector,
    and some encoder weights serve no pass at all (CLIP's last layer norm under LLaVA, which takes the hidden
    states before it), so the set is not fixed by the model alone: freezing what one probe batch left unused
    would freeze the projector for good when that batch had no image. A text model uses every weight in every
    pass, and keeps DDP's cheaper path. A parameter no rank used keeps no gradient (``grad`` None, as in one
    process, so AdamW skips it); one used on some ranks gets their sum, as one process would."""
    model = getattr(module, "model", module)
    return getattr(getattr(model, "config", None), "vision_config", None) is not None


def without_gradient(model: nn.Module) -> list[str]:
    """The trainable parameters the passes since the last update left without a gradient (no forward used
    them), by name."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None]


def _is_peer_failure(exc: BaseException) -> bool:
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "timed out",
                                      "Timed out", "Broken pipe", "NCCL communicator was aborted"))


def _fully_shard(module: LogpsModule, reshard_root: bool | None = None, param_dtype: torch.dtype | None = None,
                 offload: bool = False) -> nn.Module:
    """FSDP2: each decoder layer is its own unit (its weights are gathered just for its forward and backward),
    the rest (embeddings, final norm, the tied head) belongs to the root, the ``LogpsModule``.

    ``param_dtype`` (bf16 runs): the shards stay fp32 masters, FSDP casts them to bf16 *before* the all-gather
    (half the traffic and memory of gathering fp32 for autocast to cast), and gradients are reduced in fp32.
    Autocast stays on around the forward: the weights it sees are already bf16, and it keeps what it always
    kept in fp32 (softmax, log-softmax, the norms' statistics). ``offload``: FSDP2's ``CPUOffloadPolicy``."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    except ImportError:
        raise DpokitError("distributed.strategy: fsdp needs torch >= 2.6 (FSDP2 fully_shard)") from None
    decoder = module.model.get_decoder() if hasattr(module.model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise DpokitError("distributed.strategy: fsdp needs a model with decoder layers (model.layers)")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    # The root's input is the batch: its float entries (masks, weights) keep their precision.
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=policy.reduce_dtype,
                                       cast_forward_inputs=False)
    placement = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy, offload_policy=placement)
    return fully_shard(module, reshard_after_forward=reshard_root, mp_policy=root_policy, offload_policy=placement)


def shard_device(device: torch.device, offload: bool) -> torch.device:
    """Where a rank's FSDP shards live: on the CPU with ``distributed.offload: params`` (FSDP2's
    ``CPUOffloadPolicy`` refuses shards anywhere else, and copies them to ``device`` only for each gather),
    else on the rank's device. Buffers are not sharded and stay on ``device`` either way."""
    return torch.device("cpu") if offload else device


def setup(cfg: Any) -> Dist:
    """Read the launcher's environment and start the process group (gloo on CPU, nccl on GPU), or describe the
    single process when there is no launcher."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        torch.distributed.init_process_group(backend, timeout=timeout, **kwargs)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, strategy=cfg.strategy,
                active=True, offload=cfg.offload)


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that ``dpokit train --nproc N`` execs: one node, a free rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "dpokit", *argv]
