"""Building a training run and keeping it: ``setup`` (config -> models -> data -> reference -> optimizer, in
one ``Run``), ``restore`` from a checkpoint, ``save`` one, ``export_final`` (RUN_DIR/final, a plain Hugging Face
folder). ``dpokit.training.loop`` runs the steps between them; ``dpokit.training.kinds`` says which kind of
training runs.

Under ``torchrun`` every process runs this same code (``dpokit.training.distributed``): all ranks draw the same global
pairs of a step and each trains its share, so 2 ranks x batch 4 is 1 rank x batch 8; metrics are reduced over
ranks and written by rank 0, which alone touches the run folder. Every kind of training reuses ``setup`` (with
its ``dpokit.training.step.KindSpec``), ``restore``, ``save`` and ``export_final``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from dpokit.config import Config, save_config
from dpokit.data import DataReport, overlap_report
from dpokit.data.batch import PairStream
from dpokit.data.cache import cache_root, load_cached
from dpokit.data.vision import load_vision
from dpokit.errors import ConfigError, DpokitError
from dpokit.io import write_json
from dpokit.losses import check_training_setup, trained_kind
from dpokit.models.hardware import choose_attention, resolve_precision
from dpokit.models.loading import cache_dir, load_models
from dpokit.models.quantize import dequantize, torchao
from dpokit.models.sharded import on_device
from dpokit.terminal import note
from dpokit.training.checkpoint import (
    export_hf,
    export_sharded,
    newest_complete,
    read_trainer_state,
    restore_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from dpokit.training.distributed import Dist
from dpokit.training.metrics import Progress
from dpokit.training.reference import (
    FrozenReference,
    build_reference,
    check_sync_compatible,
    load_reference_weights,
    reference_weights,
)
from dpokit.training.resume import (
    check_resume_settings,
    fingerprint,
    prepare_run_dir,
    rng_state,
    seed_everything,
    set_rng_state,
    truncate_metrics,
)
from dpokit.training.step import Autocast, KindSpec, Run, load_policy
from dpokit.training.vision import check_vision_setup, is_vision, with_processor

# ------------------------------------------------------------------------------------------------------ pieces

def lr_lambda(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``train.lr`` for the optimizer step that follows ``done`` completed steps: linear warmup,
    then constant, linear or cosine decay to zero at ``total_steps`` (warmup: ``TrainConfig.warmup_for``)."""
    warmup, shape = cfg.train.warmup_for(total_steps), cfg.train.scheduler

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
    if cfg.train.optimizer == "adamw_8bit":
        from dpokit.training.optim8bit import adamw_8bit

        return adamw_8bit(params, lr=cfg.train.lr, betas=cfg.train.adam_betas, weight_decay=cfg.train.weight_decay)
    # The fused kernel updates every parameter in one pass: on CPU ~14x faster than the per-tensor loop (0.05 s
    # against 0.7 s a step for SmolLM2-135M), with no full-size temporaries.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.adam_betas,
                             weight_decay=cfg.train.weight_decay, fused=fused or None)


def autocast_for(cfg: Config, device: torch.device) -> Autocast:
    enabled = cfg.train.precision == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def resolve_hardware(cfg: Config, device: torch.device, note: Callable[[str], None]) -> None:
    """Replace ``auto`` in ``train.precision`` and ``model.attn_implementation`` by what this device runs fast
    (``dpokit.models.hardware``), saying so in one line each."""
    cfg.train.precision = resolve_precision(cfg.train.precision, device, note)
    if cfg.model.attn_implementation == "auto":
        choice = choose_attention("auto", cfg.train.precision, device, cfg.train.layout)
        cfg.model.attn_implementation = choice.value
        note(f"attn_implementation auto -> {choice.value} ({choice.why})")


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


def quiet(message: str) -> None:
    """Notes of ranks other than 0 (rank 0 says the same)."""


def notes_for(dist: Dist) -> Callable[[str], None]:
    """How this process says a note: rank 0 on stderr (``dpokit.terminal.note``), the others not at all."""
    return note if dist.is_main else quiet


# ------------------------------------------------------------------------------------------------------- setup

def open_run_dir(cfg: Config, resume: bool) -> Path | None:
    """Rank 0's part of setup: the run folder prepared, the resolved config saved, and the checkpoint to resume
    from (None to start afresh)."""
    run_dir = prepare_run_dir(cfg, resume)
    checkpoint = newest_complete(run_dir, note) if resume else None
    if resume and checkpoint is None and (run_dir / "metrics.jsonl").exists():
        note(f"no complete checkpoint in {run_dir}; starting from step 0")
        (run_dir / "metrics.jsonl").unlink()
    save_config(cfg, run_dir / "config.yaml")
    return checkpoint


def load_items(cfg: Config, tokenizer: Any, task: KindSpec, note: Callable[[str], None],
               dist: Dist, processor: Any = None) -> tuple[Sequence[Any], Sequence[Any]]:
    """Training and held-out groups (pairs, or rankings for a listwise loss) from the data cache, memory-mapped
    (``dpokit.data.cache.load_cached``), and RUN_DIR/data_report.json (rows read = kept + dropped by reason, and
    the train/eval overlap). The data layer is told where dpokit's cache is and how to show progress. With a
    vision-language model's ``processor``, the groups carry pixel inputs and are held in memory
    (``dpokit.data.vision``)."""
    listwise = trained_kind(cfg.loss) == "listwise" and task.needs_reference
    want = "ranked" if listwise else "unpaired" if task.name == "kto" else "pairs"
    bar = Progress if dist.is_main and cfg.train.progress else None

    def load(source: str, split: str) -> tuple[Sequence[Any], DataReport]:
        if processor is not None:
            return load_vision(source, processor, cfg.data, split, want)
        # Every rank asks; one tokenizes a source the cache lacks while the others wait on its lock.
        return load_cached(source, tokenizer, cfg.data, split, want, note, bar, cache_home=cache_dir())

    train_items, train_report = load(cfg.data.train, cfg.data.train_split)
    reports = {"train": train_report.to_dict()}
    eval_items: Sequence[Any] = []
    if cfg.data.eval and task.evaluates:
        eval_items, eval_report = load(cfg.data.eval, cfg.data.eval_split)
        reports["eval"] = eval_report.to_dict()
        reports["overlap"] = overlap_report(train_items, eval_items)
        if reports["overlap"]["pairs"]:
            note(f"{reports['overlap']['pairs']} of {len(eval_items)} eval pairs also appear in the training data")
    if dist.is_main:
        write_json(Path(cfg.run_dir) / "data_report.json", reports)
    if not train_items:
        raise DpokitError(f"{cfg.data.train}: no usable pairs (see {Path(cfg.run_dir) / 'data_report.json'})")
    return train_items, eval_items


def steps_for(train_cfg: Any, n_items: int, world: int = 1) -> tuple[int, int]:
    """(optimizer steps, pairs drawn) of a run on ``n_items`` training groups over ``world`` processes:
    ``train.max_steps`` global batches, else ``train.epochs`` passes over the groups (a fraction allowed), the
    last step taking what is left."""
    pairs_per_step = train_cfg.batch_size * train_cfg.grad_accum * world
    if train_cfg.max_steps is not None:
        return train_cfg.max_steps, train_cfg.max_steps * pairs_per_step
    total_pairs = math.ceil(train_cfg.epochs * n_items)
    return math.ceil(total_pairs / pairs_per_step), total_pairs


def fit_layout(cfg: Config, spec: KindSpec, note: Callable[[str], None]) -> None:
    """``train.layout`` as the kind computes it, said once when it changes; before ``resolve_hardware``, whose
    attention choice depends on the layout. A NEUTRAL setting: the numbers are the same in any layout."""
    if cfg.train.layout not in spec.layouts:
        note(f"train.layout {cfg.train.layout} -> {spec.layouts[0]} (what dpokit {spec.name} computes)")
        cfg.train.layout = spec.layouts[0]


def setup(cfg: Config, dist: Dist, spec: KindSpec, resume: bool = False,
          items: Callable[[Any], tuple[list[Any], list[Any]]] | None = None) -> Run:
    """Everything a run needs, in one ``Run``: the run folder, models (the policy wrapped for DDP / FSDP), the
    data, the reference, optimizer, scheduler and data stream, and the checkpoint to resume from. ``items``
    (``tokenizer -> (train items, eval items)``) replaces the preference pairs of ``data.train`` / ``data.eval``
    (online DPO: prompts); a step then draws ``pairs_per_step`` of them."""
    if not cfg.data.train:
        raise ConfigError("data.train: required (a preference file or hub dataset id)")
    check_training_setup(cfg.loss, world=dist.world)  # the config checked the rest; the processes are known now
    if cfg.train.optimizer == "adamw_8bit":  # before the models load: a missing extra fails in a second
        torchao("train.optimizer: adamw_8bit")
    note = notes_for(dist)
    device = dist.device
    vision = is_vision(cfg, spec.load)
    if vision:
        check_vision_setup(cfg, spec, note)
    fit_layout(cfg, spec, note)
    resolve_hardware(cfg, device, note)  # before config.yaml is written: it records what ran
    checkpoint = dist.on_main(lambda: open_run_dir(cfg, resume))  # every rank gets the checkpoint
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial (e.g. LoRA) weights
    mode = cfg.reference.mode if spec.needs_reference else "none"
    reference_copy = {"model": "always", "adapter": "never", "store": "if_different", "none": "never"}[mode]
    dist.compute_dtype = torch.bfloat16 if dist.sharded and cfg.train.precision == "bf16" else None
    if dist.sharded and spec.load is load_policy and mode != "store":  # a store is filled by a whole model
        models = load_models(cfg.model, reference_copy, skeleton=True)  # filled shard by shard when wrapped
    else:
        models = spec.load(cfg, reference_copy)
    remark = spec.remark(models) if spec.remark is not None else None
    if remark:
        note(remark)
    policy = on_device(models.policy, device)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(policy)
    if cfg.train.compile:
        compile_layers(policy)
    train_items, eval_items = (items(models.tokenizer) if items else
                               load_items(cfg, models.tokenizer, spec, note, dist, models.processor))
    autocast = autocast_for(cfg, device)
    # Before any checkpoint is restored: the policy still holds its starting weights here.
    reference = (build_reference(cfg, models, itertools.chain(train_items, eval_items), device, autocast, note, dist)
                 if spec.needs_reference else None)
    if cfg.reference.sync is not None and isinstance(reference, FrozenReference):
        check_sync_compatible(reference.model, policy)
    model = dist.wrap_trainable(spec.module(policy))  # batch -> SlotLogps or rewards; DDP/FSDP-wrapped
    if dist.rank:  # independent dropout masks per rank; rank 0 keeps the single-process random stream
        seed_everything(cfg.train.seed + dist.rank)
    pairs_per_step = cfg.train.batch_size * cfg.train.grad_accum * dist.world  # the global batch
    total_steps, total_pairs = steps_for(cfg.train, len(train_items), dist.world)
    params = [p for p in policy.parameters() if p.requires_grad]  # FSDP's shards once wrapped
    optimizer = make_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    return Run(cfg=cfg, dist=dist, spec=spec, run_dir=Path(cfg.run_dir), device=device, note=note,
               tokenizer=models.tokenizer, policy=policy, model=model, reference=reference,
               train_items=train_items, eval_items=eval_items, params=params,
               optimizer=optimizer, scheduler=scheduler,
               stream=PairStream(len(train_items), cfg.train.seed, cfg.train.shuffle),
               pairs_per_step=pairs_per_step, total_steps=total_steps, total_pairs=total_pairs, autocast=autocast,
               data_fingerprint=fingerprint(cfg.data.train, cache_root(cfg.data), train_items), checkpoint=checkpoint,
               processor=models.processor)


# ---------------------------------------------------------------------------------------------- checkpoints

def restore(run: Run, force: bool = False) -> None:
    """Continue from ``run.checkpoint``: weights, optimizer, scheduler, data position, counters and RNG state,
    after refusing settings that would not continue the same run (unless ``force``)."""
    saved = read_trainer_state(run.checkpoint)
    if saved.get("task", "dpo") != run.spec.name:  # other weights altogether (a policy's, a reward model's)
        raise ConfigError(f"run_dir: {run.run_dir} holds a dpokit {saved.get('task', 'dpo')} run; it cannot be "
                          f"resumed by dpokit {run.spec.name}")
    if not force:
        split = check_resume_settings(saved["config"], run.cfg, run.data_fingerprint, saved.get("data_fingerprint"),
                                      saved.get("world_size", 1), run.dist.world, run.spec.name)
        if split:
            run.note(split)
    state = restore_checkpoint(run.checkpoint, run.policy, run.optimizer, run.scheduler, run.dist)
    run.step, run.consumed, run.skipped = state["step"], state["pairs_consumed"], state["skipped_steps"]
    run.tokens_seen = state.get("tokens_seen", 0)  # 0 in a checkpoint written before it was recorded
    run.task_state = state.get("task_state", {})
    reference = synced_reference(run)
    if reference is not None:  # TR-DPO: the reference has moved since the start; take it as saved
        if not (run.checkpoint / REFERENCE_FILE).is_file():
            raise ConfigError(f"reference.sync: {run.checkpoint} has no {REFERENCE_FILE} (the run did not update "
                              "its reference); resume it without reference.sync")
        load_reference_weights(reference, load_file(str(run.checkpoint / REFERENCE_FILE)))
    run.stream = PairStream(len(run.train_items), run.cfg.train.seed, run.cfg.train.shuffle, **state["data_position"])
    rngs = [state["rng"], *state.get("rng_other_ranks", [])]
    if run.dist.rank < len(rngs):  # a rank the checkpoint's run lacked keeps setup's stream (seed + rank)
        set_rng_state(rngs[run.dist.rank])
    if run.dist.is_main:
        truncate_metrics(run.run_dir / "metrics.jsonl", run.step)
    run.note(f"resuming from {run.checkpoint} (step {run.step} of {run.total_steps})")


def trainer_state(run: Run) -> dict[str, Any]:
    """What a checkpoint holds beside the tensors: JSON only. Every rank must call it (RNG states are
    gathered)."""
    rngs = run.dist.gather(rng_state())
    return {"step": run.step, "data_position": run.stream.position, "pairs_consumed": run.consumed,
            "skipped_steps": run.skipped, "tokens_seen": run.tokens_seen, "rng": rngs[0],
            "rng_other_ranks": rngs[1:], "world_size": run.dist.world,
            "config": run.cfg.model_dump(mode="json"), "data_fingerprint": run.data_fingerprint,
            "task": run.spec.name, "task_state": run.task_state}


REFERENCE_FILE = "reference.safetensors"
"""The reference's weights in a checkpoint of a run that updates them (``reference.sync``, TR-DPO)."""


def synced_reference(run: Run) -> nn.Module | None:
    """The reference model when the run updates it from the policy (``reference.sync``), else None."""
    if run.cfg.reference.sync is None or not isinstance(run.reference, FrozenReference):
        return None
    return run.reference.model


def save(run: Run) -> None:
    """A checkpoint of the run as it is now (``checkpoints/step-N``), then rotation. A run that updates its
    reference saves the reference's weights too: they are state like the optimizer's."""
    reference = synced_reference(run)
    extra = {REFERENCE_FILE: reference_weights(reference)} if reference is not None and run.dist.is_main else None
    save_checkpoint(run.run_dir, run.step, run.policy, run.optimizer, run.scheduler, trainer_state(run), run.dist,
                    extra=extra)
    if run.cfg.train.keep_checkpoints and run.dist.is_main:
        rotate_checkpoints(run.run_dir, run.cfg.train.keep_checkpoints)


def export_final(run: Run) -> None:
    """RUN_DIR/final: one plain Hugging Face folder written by rank 0 (a sharded FSDP policy is gathered and
    written one tensor at a time; LoRA adapters are folded into the base weights, and saved as trained in
    ``final/adapter/`` for ``PeftModel.from_pretrained``), Hub-ready: a model card and a generation config
    (``dpokit.integrations.hub``)."""
    from dpokit.integrations.hub import hub_files, name_adapter_base

    add = hub_files(run.run_dir, run.spec.name)
    if run.processor is not None:  # a vision-language model loads with its processor (AutoProcessor)
        add = with_processor(run.processor, add)
    if run.dist.sharded:  # every rank gathers, one tensor at a time; no LoRA or NF4 under FSDP (config)
        export_sharded(run.policy, run.tokenizer, run.run_dir / "final", run.dist, add=add)
    elif run.dist.is_main:
        policy = run.policy
        dequantize(policy)  # QLoRA: the NF4 base as the plain weights it computed with, for the adapters to merge
        name_adapter_base(policy, run.cfg.model.name_or_path)
        export_hf(policy, run.tokenizer, run.run_dir / "final", add=add)
