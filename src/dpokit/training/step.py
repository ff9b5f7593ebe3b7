"""One optimizer step, and the state it runs on.

A ``Run`` holds what a training run needs (models, reference, data, optimizer, scheduler, the data stream and
the counters); ``dpokit.training.setup.setup`` builds it, ``train_step`` advances it by one optimizer step:

    for each pass of the step (micro-batches, cut into passes of train.pass_tokens positions):
        forward (policy log-probs with grad, reference log-probs without) -> loss -> backward
    clip -> optimizer and scheduler step (skipped when not finite) -> the step's metrics row

What differs between training kinds is a ``Task``: how a pass's loss is computed and normalized, and which
statistics it keeps (DPO and its variants: per pair; SFT: per response token). A new kind of training adds a
``Task`` and reuses the rest.

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
from typing import Any

import torch
from torch import nn

from dpokit.config import Config
from dpokit.data.batch import (
    PairStream,
    collate_responses,
    collate_tokenized,
    regroup,
    split_by_tokens,
    to_device,
)
from dpokit.data.tokenize import TokenizedGroup
from dpokit.errors import DpokitError
from dpokit.losses import (
    advance_loss_state,
    carries_state,
    compute_loss,
    kto_kl_baseline,
    kto_loss,
    loss_spec,
    needs_plain_chosen,
    plackett_luce_loss,
)
from dpokit.losses.tokens import length_desensitized_weights, wpo_pair_weights
from dpokit.methods.reward_model import RewardModule, load_reward_models, reward_forward
from dpokit.models.loading import Models, load_models
from dpokit.training.distributed import Dist, LogpsModule
from dpokit.training.metrics import KtoStats, PairStats, RewardModelStats, SftStats
from dpokit.training.reference import FrozenReference, Reference, sync_reference

Autocast = Callable[[], contextlib.AbstractContextManager]
Record = Callable[[Any], None]
"""Adds a pass's numbers to the step's statistics."""


def load_policy(cfg: Config, reference: str, note: Callable[[str], None]) -> Models:
    """The policy as a causal LM (LoRA-wrapped when configured), the reference per ``reference`` (``always``,
    ``never``, ``if_different``: see ``load_models``) and the tokenizer."""
    return load_models(cfg.model, reference=reference)


@dataclass(frozen=True)
class Task:
    """What one kind of training computes in a pass. ``forward(run, items)`` returns the pass's summed loss,
    a ``Record`` of its statistics and the batch; ``normalizer(run, indices)`` is what the step's loss is
    divided by; ``new_stats()`` starts a step's statistics."""

    name: str
    forward: Callable[[Run, list[Any]], tuple[torch.Tensor, Record, dict[str, Any]]]
    normalizer: Callable[[Run, list[int]], int]
    new_stats: Callable[[], Any]
    needs_reference: bool
    chosen_only: bool
    """The pass computes prompt + chosen only (SFT), not every response."""
    evaluates: bool = False
    """Held-out metrics on ``data.eval``: the task's forward without gradients (``held_out_metrics``)."""
    load: Callable[[Config, str, Callable[[str], None]], Models] = load_policy
    """``(cfg, reference, note) -> Models``: how the trainable model is built."""
    module: Callable[[nn.Module], nn.Module] = LogpsModule
    """The policy as the batch -> outputs module the pass calls (what DDP / FSDP wrap)."""
    layouts: tuple[str, ...] = ("packed", "padded")
    """The batch layouts the task computes; another ``train.layout`` is replaced by the first (said once)."""
    prepare: Callable[[Run, list[Any]], None] | None = None
    """Called with every item of a step (of every rank), or with the held-out items, before their passes: what
    the passes share is computed there (KTO: its reference point z_0) and kept in ``Run.step_context``."""


@dataclass
class Run:
    """Everything one training run needs, built once by ``dpokit.training.setup.setup``. ``train_step`` reads it and
    advances the counters at the end; a checkpoint saves exactly the modules, optimizer, scheduler, stream
    position and counters held here."""

    cfg: Config
    dist: Dist
    task: Task
    run_dir: Path
    device: torch.device
    note: Callable[[str], None]
    tokenizer: Any
    policy: nn.Module
    """The trainable model (peft-wrapped with LoRA): its weights are what checkpoints and final/ hold."""
    model: nn.Module
    """The policy as a batch -> (logps, n_tokens) module, DDP- or FSDP-wrapped under torchrun."""
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


# ------------------------------------------------------------------------------------------------ the losses

def pair_forward(model: nn.Module, reference: Reference, batch: dict[str, Any], items: list[Any],
                 cfg: Config, autocast: Autocast,
                 loss_state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Policy and reference log-probs of a batch of pairs (or rankings) and the per-group loss.

    ``model`` maps a batch to per-slot ``(logps, n_tokens)``: a ``dpokit.training.distributed.LogpsModule`` (DDP- or
    FSDP-wrapped under torchrun). Pairs go through the configured pairwise loss (``loss_state``: the state of a
    loss that carries one, ``Run.task_state["loss"]``); rankings (``loss.name: plackett_luce``) through the
    listwise one, reporting the best response as "chosen" and the worst as "rejected". With ``loss.ld_alpha``
    every log-prob, the reported ones too, is LD-DPO's length-desensitized one (but ``rpo``'s NLL, on y_w's
    plain log-prob); with ``loss.use_weighting`` each pair's loss is multiplied by its WPO weight. Shapes: (G,)
    each.
    """
    if cfg.loss.ld_alpha is not None:  # LD-DPO: policy and reference sum the same weighted token log-probs
        batch["target_weight"] = length_desensitized_weights(batch["target_slot"], batch["slots"],
                                                             batch["n_slots"], cfg.loss.ld_alpha)
    ref_logps = reference.logps(batch, items, autocast)  # (G, K)
    plain = needs_plain_chosen(cfg.loss)  # rpo's NLL is on y_w's own log-prob, not LD-DPO's
    with autocast():
        row_logps, row_tokens, *extra = model(batch, wpo=cfg.loss.use_weighting, unweighted=plain)
    policy_logps, n_tokens = regroup(row_logps, batch), regroup(row_tokens, batch)  # (G, K)
    row_log_weights = extra[:1] if cfg.loss.use_weighting else []
    plain_chosen_logps = regroup(extra[-1], batch)[:, 0] if plain else None
    if loss_spec(cfg.loss.name).kind == "listwise":
        mask = batch["slot_mask"]
        losses, rewards = plackett_luce_loss(policy_logps, ref_logps, beta=cfg.loss.beta, mask=mask)
        worst = mask.sum(-1) - 1  # index of each group's last (worst) response
        pick = torch.arange(len(worst), device=worst.device)
        return {"losses": losses, "chosen_rewards": rewards[:, 0], "rejected_rewards": rewards[pick, worst],
                "chosen_logps": policy_logps[:, 0], "rejected_logps": policy_logps[pick, worst]}
    losses, chosen_rewards, rejected_rewards = compute_loss(
        cfg.loss, policy_logps[:, 0], policy_logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], n_tokens[:, 0],
        n_tokens[:, 1], state=loss_state, plain_chosen_logps=plain_chosen_logps)
    if row_log_weights:  # WPO: each pair's loss weighted by how likely the policy itself finds the pair
        log_weights = regroup(row_log_weights[0], batch)  # (G, K)
        losses = losses * wpo_pair_weights(log_weights[:, 0], log_weights[:, 1])
    return {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "chosen_logps": policy_logps[:, 0], "rejected_logps": policy_logps[:, 1]}


def record_pairs(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> Record:
    return lambda stats: stats.add(out["losses"], out["chosen_rewards"], out["rejected_rewards"],
                                   out["chosen_logps"], out["rejected_logps"], batch["tokens"])


def _collated(run: Run, items: list[Any]) -> dict[str, Any]:
    return to_device(collate_tokenized(items, run.tokenizer.pad_token_id, layout=run.cfg.train.layout,
                                       pack_length=run.cfg.train.pack_length), run.device)


def preference_forward(run: Run, items: list[Any]) -> tuple[torch.Tensor, Record, dict[str, Any]]:
    """DPO or a variant: the configured preference loss, summed over the pass's pairs (or rankings)."""
    batch = _collated(run, items)
    out = pair_forward(run.model, run.reference, batch, items, run.cfg, run.autocast, run.task_state.get("loss"))
    return out["losses"].sum(), record_pairs(out, batch), batch


def mismatched(items: list[Any], max_length: int) -> list[TokenizedGroup]:
    """KTO's KL examples: each prompt with the next example's completion (the last with the first), cut to fit
    max_length. A step of one example pairs it with itself (then z_0 is that example's own log-ratio)."""
    out = []
    for j, item in enumerate(items):
        completion = items[(j + 1) % len(items)].responses_ids[0]
        out.append(TokenizedGroup(item.prompt_ids, [completion[:max(1, max_length - len(item.prompt_ids))]],
                                  item.location))
    return out


@torch.no_grad()
def kto_prepare(run: Run, items: list[Any]) -> None:
    """KTO's reference point for a whole step (``kto_kl_baseline``): the mismatched prompt/completion pairs of
    the step's examples in their global order, each rank scoring its share with policy and reference in
    micro-batches of ``train.batch_size`` without gradient, the sums reduced over every rank. So z_0 is one
    number per step, the same on every rank and for any split into micro-batches, passes and processes (TRL
    estimates it per micro-batch). The held-out metrics get one z_0 over the whole held-out set."""
    kl_items = mismatched(items, run.cfg.data.max_length) if items else []
    everything = list(range(len(kl_items)))
    total = count = 0.0
    for chunk in run.dist.share(everything, run.cfg.train.batch_size):
        group = [kl_items[i] for i in chunk or everything[:1]]  # a placeholder keeps FSDP's calls in step
        batch = _collated(run, group)
        ref_logps = run.reference.logps(batch, group, run.autocast)[:, 0]
        with run.autocast():
            row_logps, _ = run.model(batch)
        if chunk:
            total += (regroup(row_logps, batch)[:, 0].double() - ref_logps.double()).sum().item()
            count += len(group)
    total, count = run.dist.sum([total, count])
    run.step_context["kto_z0"] = kto_kl_baseline(torch.tensor([total / max(count, 1.0)], dtype=torch.float64),
                                                   torch.zeros(1, dtype=torch.float64))


def kto_forward(run: Run, items: list[Any]) -> tuple[torch.Tensor, Record, dict[str, Any]]:
    """KTO on unpaired examples (``dpokit.losses.kto_loss``): policy and reference log-probs of each example's
    response, against the step's reference point z_0 (``kto_prepare``)."""
    batch = _collated(run, items)
    ref_logps = run.reference.logps(batch, items, run.autocast)[:, 0]
    with run.autocast():
        row_logps, _ = run.model(batch)
    logps = regroup(row_logps, batch)[:, 0]
    kl = run.step_context["kto_z0"].to(device=logps.device, dtype=logps.dtype)
    labels = torch.tensor([bool(item.label) for item in items], device=logps.device)
    loss = run.cfg.loss
    params = {k: v for k, v in loss.params().items() if k in ("desirable_weight", "undesirable_weight")}
    losses, rewards = kto_loss(logps, ref_logps, labels, kl, beta=loss.beta, **params)
    record: Record = lambda stats: stats.add(losses, rewards, labels, logps.detach(), kl, loss.beta,  # noqa: E731
                                             batch["tokens"])
    return losses.sum(), record, batch


def sft_forward(run: Run, items: list[Any]) -> tuple[torch.Tensor, Record, dict[str, Any]]:
    """SFT: negative log-likelihood of the chosen responses, summed over their tokens."""
    cfg = run.cfg.train
    rows = [(p.prompt_ids, p.chosen_ids) for p in items]
    batch = to_device(collate_responses(rows, run.tokenizer.pad_token_id, layout=cfg.layout,
                                        pack_length=cfg.pack_length), run.device)
    with run.autocast():
        logps, _ = run.model(batch)
    return -logps.sum(), lambda stats: stats.add(logps, batch["n_response_tokens"], batch["tokens"]), batch


def pairs_of_step(run: Run, indices: list[int]) -> int:
    return len(indices)


TASKS = {
    "dpo": Task("dpo", preference_forward, pairs_of_step, PairStats, needs_reference=True, chosen_only=False,
                evaluates=True),
    # SFT averages over every response token of the step, DPO and the reward model over every pair of the step.
    # KTO (loss.name: kto): unpaired examples, one response each, averaged over every example of the step.
    "kto": Task("kto", kto_forward, pairs_of_step, KtoStats, needs_reference=True, chosen_only=False,
                evaluates=True, prepare=kto_prepare),
    "sft": Task("sft", sft_forward, lambda run, indices: sum(len(run.train_items[i].chosen_ids) for i in indices),
                SftStats, needs_reference=False, chosen_only=True),
    # A Bradley-Terry reward model (dpokit.methods.reward_model): padded rows only, the reward is read at a row's end.
    "rm": Task("rm", reward_forward, pairs_of_step, RewardModelStats, needs_reference=False, chosen_only=False,
               evaluates=True, load=load_reward_models, module=RewardModule, layouts=("padded",)),
}


# ---------------------------------------------------------------------------------------------------- passes

def computed_length(item: Any, layout: str, chosen_only: bool = False) -> int:
    """Positions the model computes for one group (a pair or a ranking) in a batch ``layout`` (SFT: prompt +
    chosen)."""
    responses = item.responses_ids[:1] if chosen_only else item.responses_ids
    prompt = len(item.prompt_ids)
    if layout == "packed":
        return prompt + sum(len(r) for r in responses)
    return sum(prompt + len(r) for r in responses)


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


def step_passes(run: Run, indices: list[int]) -> Iterator[tuple[list[Any], int, bool]]:
    """This rank's passes of a step: ``(items, weight, last)``. A rank short of pairs (the uneven last step of
    an epoch) runs a placeholder of weight 0 (the step's first pair): DDP and FSDP communicate inside forward
    and backward, so every rank must make the same calls. ``last`` is when gradients are synchronized."""
    micros = run.dist.share(indices, run.cfg.train.batch_size)
    passes = forward_passes(micros, run.train_items, run.cfg, run.dist, run.task.chosen_only)
    for number, micro in enumerate(passes):
        items = [run.train_items[i] for i in micro or indices[:1]]
        yield items, (run.dist.grad_scale if micro else 0), number == len(passes) - 1


# ------------------------------------------------------------------------------------------------------ step

def train_step(run: Run, step: int) -> dict[str, Any]:
    """Optimizer step ``step``: forward -> loss -> backward over its passes, then the update. Returns its
    metrics row (sums over every rank)."""
    started = time.perf_counter()
    # The same global pairs on every rank (the stream is seeded); each rank trains its share.
    indices = run.stream.take(min(run.pairs_per_step, run.total_pairs - run.consumed))
    run.consumed += len(indices)
    if run.task.prepare is not None:
        run.task.prepare(run, [run.train_items[i] for i in indices])
    stats, computed, real = backward_passes(run, step_passes(run, indices), run.task.normalizer(run, indices))
    means = stats.means()
    grad_norm, lr = apply_update(run, step, means["loss"])
    if not run.consecutive_skips:  # an applied step: a loss's state (bco_pair's reward shift) takes it in
        advance_task_loss_state(run, means, len(indices))
    sync = run.cfg.reference.sync
    if sync is not None and run.task.needs_reference and step % sync.every == 0:  # TR-DPO, on the step grid
        assert isinstance(run.reference, FrozenReference)  # the config allows sync with reference.mode: model only
        sync_reference(run.reference.model, run.policy, sync.alpha)
    run.step = step
    run.tokens_seen += stats.tokens
    seconds = time.perf_counter() - started
    return {"step": step, "split": "train", "elapsed_s": time.perf_counter() - run.started, "tokens": stats.tokens,
            "num_tokens": run.tokens_seen, "epoch": run.consumed / len(run.train_items), **means,
            "grad_norm": grad_norm, "lr": lr, "tokens_per_second": stats.tokens / seconds,
            "skipped_steps": run.skipped, "padding_fraction": 1.0 - real / max(computed, 1)}


def advance_task_loss_state(run: Run, means: dict[str, float], pairs: int) -> None:
    """Fold an applied step's mean rewards (over every pair of every rank, so the same on every rank) into the
    state of a configured loss that carries one; ``run.task_state`` is untouched for the others."""
    loss = run.cfg.loss
    if run.task.name != "dpo" or not carries_state(loss):
        return  # SFT, the reward model and KTO log no pair rewards; most losses carry no state
    state = advance_loss_state(run.cfg.loss, run.task_state.get("loss", {}), means["rewards/chosen"],
                               means["rewards/rejected"], pairs)
    if state:
        run.task_state["loss"] = state


def backward_passes(run: Run, passes: Iterable[tuple[list[Any], int, bool]], normalizer: float) -> tuple[Any, int, int]:
    """Forward -> loss -> backward over a step's passes ``(items, weight, last)`` (``step_passes``): each pass's
    summed loss x weight / ``normalizer``, gradients synchronized on the last. Returns the step's statistics
    reduced over every rank, and its computed and real (non-padding) positions summed over every rank."""
    stats = run.task.new_stats()
    computed = real = 0
    for items, weight, last in passes:
        with run.dist.grad_sync(run.model, sync=last):
            loss_sum, record, batch = run.task.forward(run, items)
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


@torch.no_grad()
def held_out_metrics(run: Run) -> dict[str, float]:
    """The task's mean metrics over the held-out groups: its training forward without gradients, the model in
    eval mode (restored afterwards). Under torchrun each rank scores its share and the sums are reduced."""
    model, items = run.model, run.eval_items
    was_training = model.training
    model.eval()
    stats = run.task.new_stats()
    if run.task.prepare is not None:
        run.task.prepare(run, items)
    everything = list(range(len(items)))
    for chunk in run.dist.share(everything, run.cfg.eval.batch_size):
        group = [items[i] for i in chunk or everything[:1]]  # a placeholder keeps FSDP's calls in step
        _, record, _ = run.task.forward(run, group)
        if chunk:
            record(stats)
    stats.reduce(run.dist.sum)
    model.train(was_training)
    return {"tokens": stats.tokens, **stats.means()}
