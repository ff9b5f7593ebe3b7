"""One optimizer step, and the state it runs on.

A ``Run`` holds what a training run needs (models, reference, data, optimizer, scheduler, the data stream and
the counters); ``dpokit.training.setup.setup`` builds it from a ``KindSpec``. ``train_step`` advances it by one
optimizer step of a ``Task``, and reads top to bottom in this file:

    next batch: the step's pairs from the stream -> Task.prepare (what the step's passes share)
    for each pass of the step (micro-batches, cut into passes of train.pass_tokens positions):
        Task.forward (policy log-probs with grad, reference log-probs without -> the pass's summed loss)
        -> loss x weight / the step's size -> backward (gradients synchronized on the last pass)
    clip -> optimizer and scheduler step (skipped when not finite) -> the step's metrics row

What differs between kinds of training is a ``Task`` (``Forward``, ``Normalizer``, ``Prepare``: typed
contracts, implemented in ``dpokit.methods``): DPO and its variants per pair, KTO per example, SFT per response
token, the reward model per pair. A kind whose step is not "forward, backward, update" (PPO, online DPO) builds
its ``Run`` from a ``KindSpec`` alone and steps itself, reusing ``backward_passes`` and ``apply_update``.

The loss of each pass is summed over its items and divided by the size of the whole optimizer step (its pairs,
or its response tokens for SFT, over every rank), so batch 8 x accumulation 1 and batch 1 x accumulation 8,
or 1 rank and 2, produce the same gradient.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from dpokit.config import Config
from dpokit.data.batch import PairStream, collate_tokenized, split_by_tokens, to_device
from dpokit.errors import DpokitError
from dpokit.losses import advance_loss_state, carries_state
from dpokit.models.loading import Models, load_models
from dpokit.training.distributed import Dist, LogpsModule, without_gradient
from dpokit.training.reference import FrozenReference, Reference, sync_reference

Autocast = Callable[[], contextlib.AbstractContextManager]
Record = Callable[[Any], None]
"""Adds a pass's numbers to the step's statistics."""


# ----------------------------------------------------------------------------------------- what a kind gives

class PassOutput(NamedTuple):
    """What a pass computed: its loss summed over its items, a ``Record`` of its statistics, and the collated
    batch (its ``tokens``, ``computed_positions`` and ``real_positions`` are counted)."""

    loss_sum: torch.Tensor
    record: Record
    batch: dict[str, Any]


class Forward(Protocol):
    """``Task.forward``: one pass over ``items`` (this rank's share of a micro-batch) with the run's model."""

    def __call__(self, run: Run, items: list[Any]) -> PassOutput: ...


class Normalizer(Protocol):
    """``Task.normalizer``: what a step's summed loss is divided by (its pairs, examples or response tokens over
    every rank), from the step's global ``indices`` into ``run.train_items``."""

    def __call__(self, run: Run, indices: list[int]) -> int: ...


class Prepare(Protocol):
    """``Task.prepare``: called with every item of a step (of every rank), or with the held-out items, before
    their passes; what the passes share is computed there (KTO: its reference point z_0) and kept in
    ``Run.step_context``."""

    def __call__(self, run: Run, items: list[Any]) -> None: ...


class ModelLoader(Protocol):
    """``KindSpec.load``: the models of a run, the reference per ``reference`` (``always``, ``never``,
    ``if_different``: see ``dpokit.models.loading.load_models``)."""

    def __call__(self, cfg: Config, reference: str) -> Models: ...


def load_policy(cfg: Config, reference: str) -> Models:
    """The policy as a causal LM (LoRA-wrapped when configured), the reference per ``reference`` (``always``,
    ``never``, ``if_different``: see ``load_models``) and the tokenizer."""
    return load_models(cfg.model, reference=reference)


@dataclass(frozen=True)
class KindSpec:
    """What ``dpokit.training.setup.setup`` needs to build a ``Run`` for one kind of training (every kind has
    one; ``Task`` says how ``train_step`` computes its passes, for the kinds that step with it)."""

    name: str
    """Recorded in checkpoints: a run is resumed only by the same kind."""
    needs_reference: bool
    evaluates: bool = False
    """Held-out metrics on ``data.eval`` from the run's items (``held_out_metrics``)."""
    load: ModelLoader = load_policy
    """How the trainable model is built."""
    module: Callable[[nn.Module], nn.Module] = LogpsModule
    """The policy as the batch -> outputs module the pass calls (what DDP / FSDP wrap)."""
    layouts: tuple[str, ...] = ("packed", "padded")
    """The batch layouts the kind computes; another ``train.layout`` is replaced by the first (said once)."""
    sampled_per_process: bool = False
    """Its steps sample responses in each process, seeded by (seed, step, rank) over that process's share of
    the prompts: another number of processes samples other responses, so resuming must keep the number
    (``dpokit.training.resume.check_resume_settings``)."""
    remark: Callable[[Models], str | None] | None = None
    """A line to say once the models are loaded (the reward model: where its reward is read)."""


@dataclass(frozen=True)
class Task:
    """How ``train_step`` computes the passes of one kind of training."""

    forward: Forward
    normalizer: Normalizer
    new_stats: Callable[[], Any]
    """A step's empty statistics (``dpokit.training.metrics``): ``add`` through a pass's ``Record``, then
    ``reduce`` over ranks and ``means``."""
    chosen_only: bool = False
    """The pass computes prompt + chosen only (SFT), not every response."""
    prepare: Prepare | None = None
    """What a step's passes share, computed before them (KTO's z_0)."""
    carries_loss_state: bool = False
    """An applied step folds its mean rewards into the state of a configured loss that carries one
    (``bco_pair``), kept in ``Run.task_state["loss"]``."""


@dataclass
class Run:
    """Everything one training run needs, built once by ``dpokit.training.setup.setup``. ``train_step`` reads it and
    advances the counters at the end; a checkpoint saves exactly the modules, optimizer, scheduler, stream
    position and counters held here."""

    cfg: Config
    dist: Dist
    spec: KindSpec
    """Which kind of training built it (its name is recorded in checkpoints)."""
    run_dir: Path
    device: torch.device
    note: Callable[[str], None]
    tokenizer: Any
    policy: nn.Module
    """The trainable model (peft-wrapped with LoRA): its weights are what checkpoints and final/ hold."""
    model: nn.Module
    """The policy as the batch -> outputs module a pass calls (``KindSpec.module``: a ``LogpsModule``, whose
    output is a ``SlotLogps``, or the reward model's), DDP- or FSDP-wrapped under torchrun."""
    reference: Reference | None
    train_items: Sequence[Any]
    eval_items: Sequence[Any]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: PairStream
    pairs_per_step: int
    """The global batch: train.batch_size x train.grad_accum x processes."""
    total_steps: int
    total_pairs: int
    autocast: Autocast
    data_fingerprint: str
    checkpoint: Path | None = None
    """The checkpoint to resume from, when there is one."""
    step: int = 0
    consumed: int = 0
    """Pairs drawn from the stream so far."""
    tokens_seen: int = 0
    """Non-padding tokens trained on so far, every rank's (the rows' ``num_tokens``, TRL's running total)."""
    skipped: int = 0
    consecutive_skips: int = 0
    started: float = 0.0
    task_state: dict[str, Any] = field(default_factory=dict)
    """JSON state of the training kind itself, saved in checkpoints and restored (PPO: the KL coefficient; DPO
    with a loss that carries state, e.g. ``bco_pair``: ``{"loss": {name: state}}``)."""
    step_context: dict[str, Any] = field(default_factory=dict)
    """What ``Task.prepare`` computed for the current step's passes; recomputed every step, never saved."""
    processor: Any = None
    """A vision-language model's processor (``dpokit.models.vision``), saved with ``final/``; None for text."""


def collate(run: Run, items: list[Any]) -> dict[str, Any]:
    """A pass's groups as the batch the model computes (``train.layout``), on the run's device."""
    return to_device(collate_tokenized(items, run.tokenizer.pad_token_id, layout=run.cfg.train.layout,
                                       pack_length=run.cfg.train.pack_length), run.device)


def pairs_of_step(run: Run, indices: list[int]) -> int:
    """The ``Normalizer`` of the kinds that average over a step's groups (pairs, rankings or examples)."""
    return len(indices)


# ------------------------------------------------------------------------------------------------------ step

def train_step(run: Run, task: Task, step: int) -> dict[str, Any]:
    """Optimizer step ``step``: the next batch, forward -> loss -> backward over its passes, then the update.
    Returns its metrics row (sums over every rank)."""
    started = time.perf_counter()
    # The same global pairs on every rank (the stream is seeded); each rank trains its share.
    indices = run.stream.take(min(run.pairs_per_step, run.total_pairs - run.consumed))
    run.consumed += len(indices)
    if task.prepare is not None:
        task.prepare(run, [run.train_items[i] for i in indices])
    passes = step_passes(run, indices, task.chosen_only)
    stats, computed, real = backward_passes(run, task, passes, task.normalizer(run, indices))
    means = stats.means()
    if step == 1 and run.processor is not None:
        note_without_gradient(run)
    grad_norm, lr = apply_update(run, step, means["loss"])
    if not run.consecutive_skips and task.carries_loss_state:  # an applied step: bco_pair's reward shift takes it in
        advance_task_loss_state(run, means, len(indices))
    sync = run.cfg.reference.sync
    if sync is not None and run.spec.needs_reference and step % sync.every == 0:  # TR-DPO, on the step grid
        assert isinstance(run.reference, FrozenReference)  # the config allows sync with reference.mode: model only
        sync_reference(run.reference.model, run.policy, sync.alpha)
    run.step = step
    run.tokens_seen += stats.tokens
    seconds = time.perf_counter() - started
    return {"step": step, "split": "train", "elapsed_s": time.perf_counter() - run.started, "tokens": stats.tokens,
            "num_tokens": run.tokens_seen, "epoch": run.consumed / len(run.train_items), **means,
            "grad_norm": grad_norm, "lr": lr, "tokens_per_second": stats.tokens / seconds,
            "skipped_steps": run.skipped, "padding_fraction": 1.0 - real / max(computed, 1)}


def note_without_gradient(run: Run) -> None:
    """Name the trainable weights step 1 left without a gradient (a vision-language model: encoder weights its
    forward never reads, such as CLIP's last layer norm under LLaVA). They keep their loaded values for as
    long as no batch uses them; the same on every rank (DDP reduces the gradients first) and in one process."""
    names = without_gradient(run.policy)
    if names:
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        run.note(f"model: {len(names)} trainable tensor(s) got no gradient in step 1 (no forward used them; they "
                 f"change only when a batch does): {shown}")


def step_passes(run: Run, indices: list[int], chosen_only: bool = False) -> Iterator[tuple[list[Any], int, bool]]:
    """This rank's passes of a step: ``(items, weight, last)``. A rank short of pairs (the uneven last step of
    an epoch) runs a placeholder of weight 0 (the step's first pair): DDP and FSDP communicate inside forward
    and backward, so every rank must make the same calls. ``last`` is when gradients are synchronized."""
    micros = run.dist.share(indices, run.cfg.train.batch_size)
    passes = forward_passes(micros, run.train_items, run.cfg, run.dist, chosen_only)
    for number, micro in enumerate(passes):
        items = [run.train_items[i] for i in micro or indices[:1]]
        yield items, (run.dist.grad_scale if micro else 0), number == len(passes) - 1


def forward_passes(micros: list[list[int]], items: list[Any], cfg: Config, dist: Dist,
                   chosen_only: bool = False) -> list[list[int]]:
    """The forward/backward passes of one optimizer step: each micro-batch, cut into consecutive runs of at
    most ``train.pass_tokens`` computed positions when that is set. Their gradients add up to the micro-batch's
    (every loss is a sum over pairs), so only the activation memory changes. Under torchrun every rank runs
    as many passes as the rank with the most; an empty pass is a zero-weight placeholder."""
    if not cfg.train.pass_tokens:
        return micros
    layout = cfg.train.layout
    passes: list[list[int]] = []
    for micro in micros:
        sizes = [computed_length(items[i], layout, chosen_only) for i in micro]
        passes.extend([micro[a:b] for a, b in split_by_tokens(sizes, cfg.train.pass_tokens)] if micro else [[]])
    longest = max(dist.gather(len(passes))) if dist.active else len(passes)
    return passes + [[] for _ in range(longest - len(passes))]


def computed_length(item: Any, layout: str, chosen_only: bool = False) -> int:
    """Positions the model computes for one group (a pair or a ranking) in a batch ``layout`` (SFT: prompt +
    chosen)."""
    responses = item.responses_ids[:1] if chosen_only else item.responses_ids
    prompt = len(item.prompt_ids)
    if layout == "packed":
        return prompt + sum(len(r) for r in responses)
    return sum(prompt + len(r) for r in responses)


def backward_passes(run: Run, task: Task, passes: Iterable[tuple[list[Any], int, bool]],
                    normalizer: float) -> tuple[Any, int, int]:
    """Forward -> loss -> backward over a step's passes ``(items, weight, last)`` (``step_passes``): each pass's
    summed loss (``task.forward``) x weight / ``normalizer``, gradients synchronized on the last. Returns the
    step's statistics reduced over every rank, and its computed and real (non-padding) positions summed over
    every rank."""
    stats = task.new_stats()
    computed = real = 0
    for items, weight, last in passes:
        with run.dist.grad_sync(run.model, sync=last):
            loss_sum, record, batch = task.forward(run, items)
            (loss_sum * weight / normalizer).backward()
        if weight:
            record(stats)
            computed, real = computed + batch["computed_positions"], real + batch["real_positions"]
    stats.reduce(run.dist.sum)  # sums over every pair of every rank
    computed, real = run.dist.sum([computed, real])
    return stats, int(computed), int(real)


def apply_update(run: Run, step: int, loss: float) -> tuple[float, float]:
    """Clip the whole gradient, then update parameters, optimizer and scheduler, unless the loss or the
    gradient norm is not finite: such a step changes nothing and is counted; ``train.max_skipped_steps`` in a
    row stop the run. Returns (gradient norm before clipping, learning rate of the step)."""
    grad_norm = run.dist.clip_grad_norm(run.params, run.cfg.train.max_grad_norm or float("inf"))
    lr = run.optimizer.param_groups[0]["lr"]
    if math.isfinite(grad_norm) and math.isfinite(loss):
        run.optimizer.step()
        run.scheduler.step()
        run.consecutive_skips = 0
    else:
        run.skipped += 1
        run.consecutive_skips += 1
        run.note(f"step {step}: loss or gradients not finite; step skipped")
        if run.consecutive_skips >= run.cfg.train.max_skipped_steps:
            raise DpokitError(f"step {step}: loss or gradients not finite for {run.consecutive_skips} "
                              "consecutive steps; lower train.lr or check the data")
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def advance_task_loss_state(run: Run, means: dict[str, float], pairs: int) -> None:
    """Fold an applied step's mean rewards (over every pair of every rank, so the same on every rank) into the
    state of a configured loss that carries one; ``run.task_state`` is untouched for the others."""
    if not carries_state(run.cfg.loss):
        return  # most losses carry no state
    state = advance_loss_state(run.cfg.loss, run.task_state.get("loss", {}), means["rewards/chosen"],
                               means["rewards/rejected"], pairs)
    if state:
        run.task_state["loss"] = state


@torch.no_grad()
def held_out_metrics(run: Run, task: Task) -> dict[str, float]:
    """The task's mean metrics over the held-out groups: its training forward without gradients, the model in
    eval mode (restored afterwards). Under torchrun each rank scores its share and the sums are reduced."""
    model, items = run.model, run.eval_items
    was_training = model.training
    model.eval()
    stats = task.new_stats()
    if task.prepare is not None:
        task.prepare(run, items)
    everything = list(range(len(items)))
    for chunk in run.dist.share(everything, run.cfg.eval.batch_size):
        group = [items[i] for i in chunk or everything[:1]]  # a placeholder keeps FSDP's calls in step
        _, record, _ = task.forward(run, group)
        if chunk:
            record(stats)
    stats.reduce(run.dist.sum)
    model.train(was_training)
    run.dist.reshard(model)  # FSDP: no backward follows, so the policy's root would stay gathered
    return {"tokens": stats.tokens, **stats.means()}
