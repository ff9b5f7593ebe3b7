"""The kinds of training, in one table, and the one function that chooses which runs.

A command (``dpokit train``/``sft``/``rm``/``ppo``; ``dpokit.train(task=...)``) names what the user asked for;
the config can refine it: ``dpokit train`` is online DPO when ``online.reward`` or ``online.judge_url`` is set,
KTO when the loss is unpaired, offline DPO otherwise. ``choose_kind`` makes that choice, from the ``Kind`` each
module of ``dpokit.methods`` registers here (``register_kind``); this module and the rest of
``dpokit.training`` import no kind. ``dpokit.training.loop.train_kind`` runs the chosen one: a kind with a
``Task`` through ``train_task`` (setup, restore, the loop of ``train_step``), a kind that steps itself (online
DPO, PPO) through its own ``run`` function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dpokit.config import Config
from dpokit.errors import ConfigError
from dpokit.training.distributed import Dist
from dpokit.training.step import KindSpec, Task


class RunKind(Protocol):
    """``Kind.run``: a whole run of a kind that steps itself; returns the run directory."""

    def __call__(self, cfg: Config, dist: Dist, *, resume: bool, force: bool) -> Path: ...


@dataclass(frozen=True)
class Kind:
    """One kind of training: what it answers, how its run is built, and how it steps."""

    name: str
    command: str
    """The command it answers: ``dpo`` (``dpokit train``), ``sft``, ``rm`` or ``ppo``."""
    title: str
    """How messages name it."""
    spec: KindSpec
    """What ``dpokit.training.setup.setup`` needs to build its ``Run``."""
    task: Task | None = None
    """Its passes, for a kind that steps with ``train_step`` ("forward, backward, update")."""
    run: RunKind | None = None
    """Its own run, for a kind that steps otherwise (it samples, then updates): exactly one of task and run."""
    selected_by: Callable[[Config], bool] | None = None
    """What it needs from the config to be chosen over its command's default kind (None: it is the default)."""
    takes_model_object: bool = False
    """``dpokit.train(model=...)`` may give the model as an object (``KindSpec.load`` is then replaced)."""


KINDS: dict[str, Kind] = {}
"""name -> ``Kind``, filled by the modules of ``dpokit.methods`` as they are imported."""


def register_kind(kind: Kind) -> Kind:
    if (kind.task is None) == (kind.run is None):
        raise ValueError(f"kind {kind.name}: give a Task or a run function, not both or neither")
    KINDS[kind.name] = kind
    return kind


def choose_kind(cfg: Config, command: str) -> Kind:
    """The kind ``command`` runs with ``cfg``: the one of its kinds whose ``selected_by`` the config meets, else
    its default. The config never meets two (it refuses, e.g., an unpaired loss with online DPO)."""
    answering = [kind for kind in KINDS.values() if kind.command == command]
    if not answering:
        raise ConfigError(f"task: unknown kind of training '{command}' (known: "
                          f"{', '.join(sorted({kind.command for kind in KINDS.values()}))})")
    selected = [kind for kind in answering if kind.selected_by is not None and kind.selected_by(cfg)]
    assert len(selected) <= 1, [kind.name for kind in selected]
    return selected[0] if selected else next(kind for kind in answering if kind.selected_by is None)
