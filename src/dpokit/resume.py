"""Everything a run needs to continue exactly where it stopped, and the rule for when it may.

A checkpoint holds, beside weights and optimizer state (``dpokit.checkpoint``), the trainer state written
here: step, data position, RNG states of Python, NumPy and torch (JSON, no pickle), the resolved config and a
hash of the training data. Resuming is refused when a setting that changes the result differs from the
checkpoint's: every config field not marked ``NEUTRAL`` in ``dpokit.config`` (one source of truth, shared with
the recipe's cache keys), the number of processes, and the training data's content.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpokit.config import Config, result_settings
from dpokit.errors import ConfigError
from dpokit.io import write_text

GROWABLE = ("train.max_steps", "train.epochs")
"""May change on resume while the learning rate is constant after warmup (to train longer); a decaying schedule
is stretched by them, so then they are guarded like every other result-altering key."""

RUN_FILES = ("metrics.jsonl", "config.yaml", "data_report.json", "checkpoints", "final")
"""What a run writes into its folder; ``overwrite`` removes exactly these."""


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


def fingerprint(source: str, root: Path | None = None) -> str:
    """Content hash of a data file (or the id itself for a hub dataset), to refuse resuming on other data;
    remembered in the data cache ``root`` (default ``$DPOKIT_CACHE/data``), so an unchanged file is not read
    again (``dpokit.data.cache.file_digest``)."""
    from dpokit.data.cache import cache_root, file_digest

    path = Path(source)
    if not path.is_file():
        return f"id:{source}"
    return file_digest(path, root or cache_root(None))


def prepare_run_dir(cfg: Config, resuming: bool) -> Path:
    """The run folder, created; an earlier run in it is refused unless resuming or ``overwrite`` (which
    removes that run's files and nothing else)."""
    if not cfg.run_dir:
        raise ConfigError("run_dir: required (where config.yaml, metrics.jsonl and final/ are written)")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} exists and is not a folder")
    if run_dir.exists() and any(run_dir.iterdir()) and not resuming:
        if not cfg.overwrite:
            raise ConfigError(f"run_dir: {run_dir} already holds a run; resume it with --resume, choose "
                              "another run_dir or set overwrite=true")
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_resume_settings(saved: dict[str, Any], current: Config, data_fingerprint: str,
                          saved_fingerprint: str | None, saved_world: int = 1, world: int = 1) -> None:
    """Refuse to resume when a setting that alters the remaining steps differs from the checkpoint's (the
    number of processes included: it multiplies the global batch)."""
    if saved_world != world:
        raise ConfigError(f"distributed: the number of processes changed since the checkpoint ({saved_world} -> "
                          f"{world}), which changes the global batch (use --force to resume anyway)")
    before, after = result_settings(saved), result_settings(current.model_dump(mode="json"))
    growable = GROWABLE if current.train.scheduler == "constant" else ()
    for key in sorted(set(before) | set(after)):
        if key not in growable and before.get(key) != after.get(key):
            raise ConfigError(f"{key}: changed since the checkpoint "
                              f"({_show(before, key)} -> {_show(after, key)}); resuming would not continue the same "
                              "run (use --force to resume anyway)")
    if saved_fingerprint is not None and saved_fingerprint != data_fingerprint:
        raise ConfigError("data.train: the file's content changed since the checkpoint (use --force to resume "
                          "anyway)")


def _show(settings: dict[str, Any], key: str) -> str:
    """A setting's value; for a section present on one side only (``model.lora``), its leaves."""
    if key in settings:
        return repr(settings[key])
    inside = {k: v for k, v in settings.items() if k.startswith(f"{key}.")}
    return repr(inside) if inside else "unset"


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
    write_text(path, "".join(line + "\n" for line in kept))
