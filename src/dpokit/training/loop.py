"""The training loop every kind of training shares, and the entry that runs a kind.

    train_kind: config -> processes -> the kind (dpokit.training.kinds.choose_kind) -> its run:
    train_task (a kind with a Task): setup (dpokit.training.setup) -> restore (when resuming)
    -> loop: for each optimizer step: the kind's step (train_step, dpokit.training.step), log, maybe evaluate,
       maybe checkpoint -> final checkpoint -> RUN_DIR/final

Online DPO and PPO call ``loop`` with a step of their own (sample, then update).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dpokit.config import Config, load_config
from dpokit.integrations.trackers import open_trackers
from dpokit.models.hardware import return_freed_memory
from dpokit.training.distributed import Dist
from dpokit.training.distributed import setup as setup_distributed
from dpokit.training.kinds import choose_kind
from dpokit.training.metrics import HealthMonitor, MetricsWriter, Progress
from dpokit.training.preempt import stop_on_signals
from dpokit.training.setup import export_final, restore, save, setup
from dpokit.training.step import KindSpec, ModelLoader, Run, Task, held_out_metrics, train_step


def train_kind(config: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | None = None, *,
               command: str = "dpo", resume: bool = False, force: bool = False, load: ModelLoader | None = None,
               **kwargs: Any) -> Path:
    """Train the kind ``command`` chooses with the config (``choose_kind``) and return the run directory.
    Arguments as ``dpokit.train``; ``load`` replaces the kind's model loading (``KindSpec.load``). Launched by
    torchrun, every process calls this (``dpokit.training.distributed``); a failure on any rank ends every rank
    with one line naming it."""
    cfg = load_config(config, overrides, **kwargs)
    return_freed_memory()  # before any model is loaded: a lower peak host RAM (see there)
    dist = setup_distributed(cfg.distributed)
    with dist.failures():
        kind = choose_kind(cfg, command)
        resume = resume or cfg.train.resume == "auto"
        if kind.run is not None:
            run_dir = kind.run(cfg, dist, resume=resume, force=force)
        else:
            assert kind.task is not None
            spec = kind.spec if load is None else replace(kind.spec, load=load)
            run_dir = train_task(cfg, dist, spec, kind.task, resume=resume, force=force)
    dist.close()
    return run_dir


def train_task(cfg: Config, dist: Dist, spec: KindSpec, task: Task, *, resume: bool, force: bool) -> Path:
    """A run of a kind that steps with ``train_step``: built from ``spec``, continued from its newest checkpoint
    when ``resume`` (``force``: with changed settings), trained to the end; returns the run directory."""
    run = setup(cfg, dist, spec, resume=resume)
    if run.checkpoint is not None:
        restore(run, force)
    held_out = (lambda: held_out_metrics(run, task)) if run.eval_items else None
    return loop(run, lambda _, n: train_step(run, task, n), held_out, export_final)


def loop(run: Run, step: Callable[[Run, int], dict[str, Any]], held_out: Callable[[], dict[str, Any]] | None,
         export: Callable[[Run], None], stop_every: int = 1) -> Path:
    """The loop every training command shares, from ``run.step`` on: ``step(run, n)`` gives step n's metrics
    row; ``held_out()`` (when given) the held-out metrics, logged at the start, every ``eval.every`` steps and
    at the end; a checkpoint every ``train.save_every`` steps and at the end; then ``export(run)`` (final/).
    SIGTERM or SIGINT stops it with a checkpoint after the step in flight, or after the next multiple of
    ``stop_every`` when checkpoints must fall on it (``dpokit.training.preempt``)."""
    cfg = run.cfg
    first, every, save_every = run.step, cfg.eval.every, cfg.train.save_every
    metrics = MetricsWriter(run.run_dir / "metrics.jsonl", enabled=run.dist.is_main,
                            trackers=open_trackers(run.run_dir, cfg, enabled=run.dist.is_main))
    progress = Progress(run.total_steps, first, enabled=cfg.train.progress and run.dist.is_main)
    health = HealthMonitor(interval=every or 20)
    run.started = time.perf_counter()

    def log_eval() -> None:
        assert held_out is not None
        metrics.write({"step": run.step, "split": "eval", "elapsed_s": time.perf_counter() - run.started,
                       **held_out()})

    with stop_on_signals(run.dist, stop_every) as preemption:
        try:
            if held_out and first == 0:
                log_eval()
            for n in range(first + 1, run.total_steps + 1):
                row = step(run, n)
                if n % cfg.train.log_every == 0 or n == run.total_steps:
                    metrics.write(row)
                for code, message in health.check(row):
                    run.note(f"warning at step {n}: {message}")
                    metrics.write({"step": n, "split": "warning", "warning": code, "message": message})
                progress.update(n, row)
                if held_out and every and n % every == 0 and n != run.total_steps:
                    log_eval()
                # SIGTERM / SIGINT: stop here, saved as save_every saves (after the last step the run just ends)
                stop = preemption.requested(n) if n != run.total_steps else None
                if stop or (save_every and n % save_every == 0 and n != run.total_steps):
                    save(run)
                if stop:
                    raise preemption.stopped(stop, run.run_dir, n, run.total_steps)
            if held_out and first < run.total_steps:
                log_eval()
        finally:
            progress.close()
            metrics.close()
        if first < run.total_steps:
            save(run)
        export(run)
    return run.run_dir
