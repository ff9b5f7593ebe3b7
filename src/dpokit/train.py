"""The training loop, explicit and in one place (DPO and its variants; SFT on the chosen responses).

    load config -> models -> data -> (resume) -> for each optimizer step:
        for each micro-batch: policy log-probs (with grad), reference log-probs (no grad), loss, backward
        clip, optimizer step (skipped when not finite), scheduler step, log, maybe evaluate, maybe checkpoint
    -> final checkpoint -> RUN_DIR/final (a plain Hugging Face folder)

The loss of each micro-batch is summed over its pairs and divided by the number of pairs in the whole
optimizer step, so batch 8 x accumulation 1 and batch 1 x accumulation 8 produce the same gradient.

Under ``torchrun`` every process runs this same loop (``dpokit.distributed``): all ranks draw the same global
pairs of a step and each trains its share, so 2 ranks x batch 4 is 1 rank x batch 8; metrics are reduced over
ranks and written by rank 0, which alone touches the run folder.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpokit.checkpoint import (
    export_hf,
    full_state_dict,
    newest_complete,
    read_trainer_state,
    restore_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    sha256_file,
)
from dpokit.config import Config, load_config, save_config
from dpokit.data import load_preferences, load_ranked, overlap_report
from dpokit.data.batch import (
    PairStream,
    collate_pairs,
    collate_ranked,
    collate_responses,
    regroup,
    split_by_tokens,
    to_device,
)
from dpokit.distributed import Dist
from dpokit.distributed import setup as setup_distributed
from dpokit.errors import ConfigError, DpokitError
from dpokit.hardware import choose_attention, resolve_precision
from dpokit.losses import LISTWISE, compute_loss, plackett_luce_loss
from dpokit.metrics import HealthMonitor, MetricsWriter, PairStats, Progress, SftStats
from dpokit.models import load_models
from dpokit.reference import Reference, build_reference

Autocast = Callable[[], contextlib.AbstractContextManager]

GUARDED_KEYS = ("model", "data.train", "data.max_length", "data.max_prompt_length", "data.max_rows", "loss",
                "reference", "train.batch_size", "train.grad_accum", "train.seed", "train.shuffle",
                "train.optimizer", "train.lr", "train.weight_decay", "train.adam_betas", "train.warmup_steps",
                "train.scheduler", "train.max_grad_norm", "train.precision")
"""Settings that change the result of the steps still to come; resuming with any of them changed is refused
unless forced. (``max_steps`` may grow, e.g. to train longer, unless the schedule decays toward it.)"""


# ------------------------------------------------------------------------------------------------ reproducibility

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as JSON-safe values (no pickle)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))


def fingerprint(source: str) -> str:
    """Content hash of a data file (or the id itself for a hub dataset), to refuse resuming on other data."""
    path = Path(source)
    if not path.is_file():
        return f"id:{source}"
    return sha256_file(path)


# ------------------------------------------------------------------------------------------------------ pieces

def lr_lambda(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``train.lr`` for the optimizer step that follows ``done`` completed steps: linear warmup,
    then constant, linear or cosine decay to zero at ``total_steps``."""
    warmup, shape = cfg.train.warmup_steps, cfg.train.scheduler

    def factor(done: int) -> float:
        if done < warmup:
            return (done + 1) / warmup
        if shape == "constant":
            return 1.0
        progress = (done - warmup) / max(1, total_steps - warmup)
        if shape == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    # The fused kernel updates every parameter in one pass: on CPU ~14x faster than the per-tensor loop (0.05 s
    # against 0.7 s a step for SmolLM2-135M), with no full-size temporaries.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.adam_betas,
                             weight_decay=cfg.train.weight_decay, fused=fused or None)


def resolve_hardware(cfg: Config, device: torch.device, note: Callable[[str], None]) -> None:
    """Replace ``auto`` in ``train.precision`` and ``model.attn_implementation`` by what this device runs fast
    (``dpokit.hardware``), saying so in one line each."""
    cfg.train.precision = resolve_precision(cfg.train.precision, device, note)
    if cfg.model.attn_implementation == "auto":
        choice = choose_attention("auto", cfg.train.precision, device, cfg.train.layout)
        cfg.model.attn_implementation = choice.value
        note(f"attn_implementation auto -> {choice.value} ({choice.why})")


def autocast_for(cfg: Config, device: torch.device) -> Autocast:
    enabled = cfg.train.precision == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def pair_forward(policy: torch.nn.Module, reference: Reference, batch: dict[str, Any], items: list[Any],
                 cfg: Config, autocast: Autocast) -> dict[str, torch.Tensor]:
    """Policy and reference log-probs of a batch of pairs (or rankings) and the per-group loss.

    ``policy`` maps a batch to per-slot ``(logps, n_tokens)``: a ``dpokit.distributed.LogpsModule`` (DDP- or
    FSDP-wrapped under torchrun). Pairs go through the configured pairwise loss; rankings
    (``loss.name: plackett_luce``) through the listwise one, reporting the best response as "chosen" and the
    worst as "rejected". Shapes: (G,) each.
    """
    ref_logps = reference.logps(batch, items, autocast)  # (G, K)
    with autocast():
        row_logps, row_tokens = policy(batch)
    policy_logps, n_tokens = regroup(row_logps, batch), regroup(row_tokens, batch)  # (G, K)
    if cfg.loss.name in LISTWISE:
        mask = batch["slot_mask"]
        losses, rewards = plackett_luce_loss(policy_logps, ref_logps, beta=cfg.loss.beta, mask=mask)
        worst = mask.sum(-1) - 1  # index of each group's last (worst) response
        pick = torch.arange(len(worst), device=worst.device)
        return {"losses": losses, "chosen_rewards": rewards[:, 0], "rejected_rewards": rewards[pick, worst],
                "chosen_logps": policy_logps[:, 0], "rejected_logps": policy_logps[pick, worst]}
    losses, chosen_rewards, rejected_rewards = compute_loss(
        cfg.loss, policy_logps[:, 0], policy_logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], n_tokens[:, 0],
        n_tokens[:, 1])
    return {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "chosen_logps": policy_logps[:, 0], "rejected_logps": policy_logps[:, 1]}


def computed_length(item: Any, layout: str, sft: bool = False) -> int:
    """Positions the model computes for one pair or ranking in a batch ``layout`` (SFT: prompt + chosen)."""
    if hasattr(item, "responses_ids"):  # a ranking
        responses = item.responses_ids
    else:
        responses = [item.chosen_ids] if sft else [item.chosen_ids, item.rejected_ids]
    prompt = len(item.prompt_ids)
    if layout == "packed":
        return prompt + sum(len(r) for r in responses)
    return sum(prompt + len(r) for r in responses)


def forward_passes(micros: list[list[int]], pairs: list[Any], cfg: Config, dist: Dist,
                   sft: bool = False) -> list[list[int]]:
    """The forward/backward passes of one optimizer step: each micro-batch, cut into consecutive runs of at
    most ``train.pass_tokens`` computed positions when that is set. Their gradients add up to the micro-batch's
    (every loss is a sum over pairs), so only the activation memory changes. Under torchrun every rank runs
    as many passes as the rank with the most; an empty pass is a zero-weight placeholder."""
    if not cfg.train.pass_tokens:
        return micros
    layout = cfg.train.layout
    passes: list[list[int]] = []
    for micro in micros:
        sizes = [computed_length(pairs[i], layout, sft) for i in micro]
        passes.extend([micro[a:b] for a, b in split_by_tokens(sizes, cfg.train.pass_tokens)] if micro else [[]])
    longest = max(dist.gather(len(passes))) if dist.active else len(passes)
    return passes + [[] for _ in range(longest - len(passes))]


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant: it works with frozen inputs and with
    the hand-written head backward). transformers 5.2x renamed the method; older releases have the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` every decoder layer in place (``Module.compile`` keeps parameter names, unlike
    wrapping the model)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError("train.compile: this model has no decoder layers to compile")
    for layer in layers:
        layer.compile(dynamic=True)


@torch.no_grad()
def evaluate(policy: torch.nn.Module, reference: Reference, pairs: list[Any], cfg: Config, pad_id: int,
             device: torch.device, collate: Callable[..., dict[str, Any]] = collate_pairs,
             dist: Dist | None = None) -> dict[str, float]:
    """Mean pair metrics over held-out pairs (policy in eval mode, restored afterwards); under torchrun each
    rank scores its share and the sums are reduced."""
    dist = dist or Dist()
    was_training = policy.training
    policy.eval()
    stats = PairStats()
    autocast = autocast_for(cfg, device)
    everything = list(range(len(pairs)))
    for chunk in dist.share(everything, cfg.eval.batch_size):
        items = [pairs[i] for i in chunk or everything[:1]]  # a placeholder keeps FSDP's calls in step
        batch = to_device(collate(items, pad_id, layout=cfg.train.layout, pack_length=cfg.train.pack_length),
                          device)
        out = pair_forward(policy, reference, batch, items, cfg, autocast)
        if chunk:
            stats.add(out["losses"], out["chosen_rewards"], out["rejected_rewards"], out["chosen_logps"],
                      out["rejected_logps"], batch["tokens"])
    stats.reduce(dist.sum)
    policy.train(was_training)
    return {"tokens": stats.tokens, **stats.means()}


# -------------------------------------------------------------------------------------------------- run folder

def _note(message: str) -> None:
    print(f"dpokit: {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    """Notes of ranks other than 0 (rank 0 says the same)."""


def prepare_run_dir(cfg: Config, resuming: bool) -> Path:
    if not cfg.run_dir:
        raise ConfigError("run_dir: required (where config.yaml, metrics.jsonl and final/ are written)")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} exists and is not a folder")
    if run_dir.exists() and any(run_dir.iterdir()) and not resuming:
        if not cfg.overwrite:
            raise ConfigError(f"run_dir: {run_dir} already holds a run; resume it with --resume, choose "
                              "another run_dir or set overwrite=true")
        for name in ("metrics.jsonl", "config.yaml", "data_report.json", "checkpoints", "final"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def check_resume_settings(saved: dict[str, Any], current: Config, data_fingerprint: str,
                          saved_fingerprint: str | None, saved_world: int = 1, world: int = 1) -> None:
    """Refuse to resume when a setting that alters the remaining steps differs from the checkpoint's (the
    number of processes included: it multiplies the global batch)."""
    if saved_world != world:
        raise ConfigError(f"distributed: the number of processes changed since the checkpoint ({saved_world} -> "
                          f"{world}), which changes the global batch (use --force to resume anyway)")
    now = current.model_dump(mode="json")
    keys = list(GUARDED_KEYS)
    if current.train.scheduler != "constant":
        keys += ["train.max_steps", "train.epochs"]
    for key in keys:
        before, after = _dotted(saved, key), _dotted(now, key)
        if before != after:
            raise ConfigError(f"{key}: changed since the checkpoint ({before!r} -> {after!r}); resuming would "
                              "not continue the same run (use --force to resume anyway)")
    if saved_fingerprint is not None and saved_fingerprint != data_fingerprint:
        raise ConfigError("data.train: the file's content changed since the checkpoint (use --force to resume "
                          "anyway)")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after the checkpoint (they will be logged again) and a half-written last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------- train

def train(config: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | None = None, *,
          resume: bool = False, force: bool = False, task: str = "dpo", **kwargs: Any) -> Path:
    """Train and return the run directory.

    ``config`` is a YAML path, a dict or a Config; ``overrides`` are CLI-style ``key=value`` strings and
    ``kwargs`` dotted keys written with ``__`` (``train__max_steps=3``). ``resume`` continues from the newest
    complete checkpoint in ``run_dir``; ``force`` allows resuming with changed settings. ``task`` is ``dpo``
    (the configured preference loss) or ``sft`` (negative log-likelihood of the chosen responses).
    Launched by torchrun, every process calls this (``dpokit.distributed``); a failure on any rank ends every
    rank with one line naming it.
    """
    cfg = load_config(config, overrides, **kwargs)
    dist = setup_distributed(cfg.distributed)
    with dist.failures():
        run_dir = _train(cfg, dist, resume=resume, force=force, task=task)
    dist.close()
    return run_dir


def _train(cfg: Config, dist: Dist, *, resume: bool, force: bool, task: str) -> Path:
    if not cfg.data.train:
        raise ConfigError("data.train: required (a preference file or hub dataset id)")
    resume = resume or cfg.train.resume == "auto"
    note = _note if dist.is_main else _quiet

    def prepare() -> Path | None:  # rank 0 alone touches the run folder; every rank gets the checkpoint
        run_dir = prepare_run_dir(cfg, resume)
        checkpoint = newest_complete(run_dir, _note) if resume else None
        if resume and checkpoint is None and (run_dir / "metrics.jsonl").exists():
            _note(f"no complete checkpoint in {run_dir}; starting from step 0")
            (run_dir / "metrics.jsonl").unlink()
        save_config(cfg, run_dir / "config.yaml")
        return checkpoint

    device = dist.device
    resolve_hardware(cfg, device, note)  # before config.yaml is written: it records what ran
    checkpoint = dist.on_main(prepare)
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial (e.g. LoRA) weights

    sft = task == "sft"
    need_reference = {"model": True, "adapter": False, "store": "if_different"}[cfg.reference.mode]
    models = load_models(cfg.model, need_reference=need_reference and not sft)
    tokenizer, policy = models.tokenizer, models.policy.to(device)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(policy)
    if cfg.train.compile:
        compile_layers(policy)

    listwise = cfg.loss.name in LISTWISE and not sft
    load = load_ranked if listwise else load_preferences
    collate = collate_ranked if listwise else collate_pairs
    train_pairs, train_report = load(cfg.data.train, tokenizer, cfg.data, cfg.data.train_split)
    reports = {"train": train_report.to_dict()}
    eval_pairs: list[Any] = []
    if cfg.data.eval and not sft:
        eval_pairs, eval_report = load(cfg.data.eval, tokenizer, cfg.data, cfg.data.eval_split)
        reports["eval"] = eval_report.to_dict()
        reports["overlap"] = overlap_report(train_pairs, eval_pairs)
        if reports["overlap"]["pairs"]:
            _note(f"{reports['overlap']['pairs']} of {len(eval_pairs)} eval pairs also appear in the training data")
    if dist.is_main:
        (run_dir / "data_report.json").write_text(json.dumps(reports, indent=1))
    if not train_pairs:
        raise DpokitError(f"{cfg.data.train}: no usable pairs (see {run_dir / 'data_report.json'})")
    autocast = autocast_for(cfg, device)
    # Before any checkpoint is restored: the policy still holds its starting weights here.
    reference = None if sft else build_reference(cfg, models, train_pairs + eval_pairs, device, autocast, note,
                                                 dist)
    scorer = dist.wrap_policy(policy)  # batch -> (logps, n_tokens); DDP- or FSDP-wrapped under torchrun
    if dist.rank:  # independent dropout masks per rank; rank 0 keeps the single-process random stream
        seed_everything(cfg.train.seed + dist.rank)

    pairs_per_step = cfg.train.batch_size * cfg.train.grad_accum * dist.world  # the global batch
    if cfg.train.max_steps is not None:
        total_steps, total_pairs = cfg.train.max_steps, cfg.train.max_steps * pairs_per_step
    else:
        total_pairs = math.ceil(cfg.train.epochs * len(train_pairs))
        total_steps = math.ceil(total_pairs / pairs_per_step)

    params = [p for p in policy.parameters() if p.requires_grad]  # FSDP's shards once wrapped
    optimizer = make_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    stream = PairStream(len(train_pairs), cfg.train.seed, cfg.train.shuffle)
    data_fingerprint = fingerprint(cfg.data.train)
    start_step = consumed = skipped = 0
    if checkpoint is not None:
        saved = read_trainer_state(checkpoint)
        if not force:
            check_resume_settings(saved["config"], cfg, data_fingerprint, saved.get("data_fingerprint"),
                                  saved.get("world_size", 1), dist.world)
        state = restore_checkpoint(checkpoint, policy, optimizer, scheduler, dist)
        start_step, consumed, skipped = state["step"], state["pairs_consumed"], state["skipped_steps"]
        stream = PairStream(len(train_pairs), cfg.train.seed, cfg.train.shuffle, **state["data_position"])
        rngs = [state["rng"], *state.get("rng_other_ranks", [])]
        set_rng_state(rngs[dist.rank % len(rngs)])
        if dist.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
        note(f"resuming from {checkpoint} (step {start_step} of {total_steps})")

    def trainer_state(step: int) -> dict[str, Any]:
        rngs = dist.gather(rng_state())
        return {"step": step, "data_position": stream.position, "pairs_consumed": consumed,
                "skipped_steps": skipped, "rng": rngs[0], "rng_other_ranks": rngs[1:], "world_size": dist.world,
                "config": cfg.model_dump(mode="json"), "data_fingerprint": data_fingerprint, "task": task}

    def checkpoint_now(step: int) -> None:
        save_checkpoint(run_dir, step, policy, optimizer, scheduler, trainer_state(step), dist)
        if cfg.train.keep_checkpoints and dist.is_main:
            rotate_checkpoints(run_dir, cfg.train.keep_checkpoints)

    pad_id = tokenizer.pad_token_id
    max_norm = cfg.train.max_grad_norm or float("inf")
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=dist.is_main)
    progress = Progress(total_steps, start_step, enabled=cfg.train.progress and dist.is_main)
    health = HealthMonitor(interval=cfg.eval.every or 20)
    started = time.perf_counter()
    consecutive_skips = 0

    def log_eval(step: int) -> None:
        row = evaluate(scorer, reference, eval_pairs, cfg, pad_id, device, collate, dist)
        metrics.write({"step": step, "split": "eval", "elapsed_s": time.perf_counter() - started, **row})

    try:
        if eval_pairs and start_step == 0:
            log_eval(0)
        for step in range(start_step + 1, total_steps + 1):
            step_start = time.perf_counter()
            # The same global pairs on every rank (the stream is seeded); each rank trains its share.
            indices = stream.take(min(pairs_per_step, total_pairs - consumed))
            consumed += len(indices)
            stats = SftStats() if sft else PairStats()
            computed = real = 0
            # SFT averages over every response token of the step, DPO over every pair of the step.
            step_tokens = sum(len(train_pairs[i].chosen_ids) for i in indices) if sft else 0
            passes = forward_passes(dist.share(indices, cfg.train.batch_size), train_pairs, cfg, dist, sft)
            for number, micro in enumerate(passes):
                # A rank short of pairs (uneven last step) runs a placeholder with zero weight: DDP and FSDP
                # communicate inside forward and backward, so every rank must make the same calls.
                chunk = [train_pairs[i] for i in micro or indices[:1]]
                weight = dist.grad_scale if micro else 0
                with dist.grad_sync(scorer, sync=number == len(passes) - 1):
                    if sft:
                        batch = to_device(collate_responses([(p.prompt_ids, p.chosen_ids) for p in chunk],
                                                            pad_id, layout=cfg.train.layout,
                                                            pack_length=cfg.train.pack_length), device)
                        with autocast():
                            logps, _ = scorer(batch)
                        (-logps.sum() * weight / step_tokens).backward()
                    else:
                        batch = to_device(collate(chunk, pad_id, layout=cfg.train.layout,
                                                  pack_length=cfg.train.pack_length), device)
                        out = pair_forward(scorer, reference, batch, chunk, cfg, autocast)
                        # Normalize by the pairs of the whole optimizer step (all ranks), not of the micro-batch.
                        (out["losses"].sum() * weight / len(indices)).backward()
                if not micro:
                    continue
                computed, real = computed + batch["computed_positions"], real + batch["real_positions"]
                if sft:
                    stats.add(logps, batch["n_response_tokens"], batch["tokens"])
                else:
                    stats.add(out["losses"], out["chosen_rewards"], out["rejected_rewards"],
                              out["chosen_logps"], out["rejected_logps"], batch["tokens"])
            stats.reduce(dist.sum)  # sums over every pair of every rank
            computed, real = dist.sum([computed, real])
            grad_norm = dist.clip_grad_norm(params, max_norm)  # of the whole gradient: the same on every rank
            lr = optimizer.param_groups[0]["lr"]
            means = stats.means()
            if math.isfinite(grad_norm) and math.isfinite(means["loss"]):
                optimizer.step()
                scheduler.step()
                consecutive_skips = 0
            else:
                # A non-finite step changes nothing: no parameter, optimizer or scheduler update.
                skipped += 1
                consecutive_skips += 1
                note(f"step {step}: loss or gradients not finite; step skipped")
                if consecutive_skips >= cfg.train.max_skipped_steps:
                    raise DpokitError(f"step {step}: loss or gradients not finite for {consecutive_skips} "
                                      "consecutive steps; lower train.lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            step_time = time.perf_counter() - step_start
            row = {"step": step, "split": "train", "elapsed_s": time.perf_counter() - started,
                   "tokens": stats.tokens, **means, "grad_norm": grad_norm, "lr": lr,
                   "tokens_per_second": stats.tokens / step_time, "skipped_steps": skipped,
                   "padding_fraction": 1.0 - real / max(computed, 1)}
            if step % cfg.train.log_every == 0 or step == total_steps:
                metrics.write(row)
            for code, message in health.check(row):
                note(f"warning at step {step}: {message}")
                metrics.write({"step": step, "split": "warning", "warning": code, "message": message})
            progress.update(step, row)
            if eval_pairs and cfg.eval.every and step % cfg.eval.every == 0 and step != total_steps:
                log_eval(step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total_steps:
                checkpoint_now(step)
        if eval_pairs and start_step < total_steps:
            log_eval(total_steps)
    finally:
        progress.close()
        metrics.close()
    if start_step < total_steps:
        checkpoint_now(total_steps)
    # final/ is one plain folder written by rank 0; a sharded (FSDP) policy is gathered whole first.
    weights = full_state_dict(policy) if dist.sharded else None
    if dist.is_main:
        # LoRA: fold the adapters into the base weights so final/ is a plain model.
        final_model = policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
        export_hf(final_model, tokenizer, run_dir / "final", weights)
    return run_dir


def sft(config: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | None = None,
        **kwargs: Any) -> Path:
    """Supervised fine-tuning on the chosen responses of a preference file (the paper's pi_SFT stage), with the
    same loop, data path and run directory as DPO."""
    return train(config, overrides, task="sft", **kwargs)
