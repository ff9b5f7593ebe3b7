"""Everything a run needs to continue exactly where it stopped, and the rule for when it may.

A checkpoint holds, beside weights and optimizer state (``dpokit.training.checkpoint``), the trainer state written
here: step, data position, RNG states of Python, NumPy and torch (JSON, no pickle), the resolved config and a
hash of the training data. Resuming is refused when a setting that changes the result differs from the
checkpoint's: every config field not marked ``NEUTRAL`` in ``dpokit.config`` (one source of truth, shared with
the recipe's cache keys), the global batch, and the training data's content.

The global batch, train.batch_size x train.grad_accum x processes, is what changes the result, not how it is
split: every process draws the same global list of pairs for a step (``PairStream``, seeded by
``train.seed`` and the epoch alone), takes its share (``Dist.share``), and divides its loss by the step's
global number of pairs, so 2 processes x batch 4, 1 x 8 and 1 x 4 x accumulation 2 train the same pairs in
the same order to the same gradient, up to the order of fp32 sums. A run may therefore resume on another
number of processes (a cluster gives back fewer GPUs) when the global batch stays; the kinds of training that
sample responses per process (``KindSpec.sampled_per_process``: online DPO, PPO) are the exception.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpokit.config import Config, result_settings
from dpokit.errors import ConfigError
from dpokit.io import write_text
from dpokit.training.kinds import KINDS

GROWABLE = ("train.max_steps", "train.epochs")
"""May change on resume while the learning rate is constant after warmup (to train longer); a decaying schedule
is stretched by them, and a ``train.warmup_ratio`` warmup lengthened, so then they are guarded like every other
result-altering key."""

SPLIT = ("train.batch_size", "train.grad_accum")
"""How the global batch is split: free to change on resume as long as the global batch stays."""

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


IMAGES_PART = "|images:"
"""Separates a data file's hash from its images' in a fingerprint (:func:`fingerprint`)."""


def fingerprint(source: str, root: Path | None = None, items: Sequence[Any] = ()) -> str:
    """Content hash of a data file (or the id itself for a hub dataset), to refuse resuming on other data;
    remembered in the data cache ``root`` (default ``$DPOKIT_CACHE/data``), so an unchanged file is not read
    again (``dpokit.data.cache_key.file_digest``). A file of image rows names its images by path, so an image
    replaced under the same name leaves the file as it was: for image groups (``items``, each with the sha256
    of its images' bytes, ``dpokit.data.vision.VisionGroup``) the images' hashes in order are added after
    :data:`IMAGES_PART`. A text run's fingerprint is what it was before images existed."""
    from dpokit.data.cache import cache_root
    from dpokit.data.cache_key import file_digest
    from dpokit.models.loading import cache_dir

    path = Path(source)
    digest = file_digest(path, root or cache_root(None, cache_dir())) if path.is_file() else f"id:{source}"
    if not items or not hasattr(items[0], "images_sha256"):  # text groups: nothing more to read
        return digest
    images = hashlib.sha256()
    for item in items:
        images.update(f"{item.images_sha256};".encode())  # "" for a row without images
    return f"{digest}{IMAGES_PART}{images.hexdigest()}"


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


def is_run_dir(path: str | Path) -> bool:
    """A folder ``prepare_run_dir`` made for a run: its ``config.yaml`` is written before anything else."""
    return (Path(path) / "config.yaml").is_file()


def check_resume_settings(saved: dict[str, Any], current: Config, data_fingerprint: str,
                          saved_fingerprint: str | None, saved_world: int = 1, world: int = 1,
                          task: str = "dpo") -> str | None:
    """Refuse to resume when a setting that alters the remaining steps differs from the checkpoint's. Returns
    a note when only the split of the global batch changed (processes, per-process batch, accumulation), which
    the run continues with; None when nothing did. A kind of training ``task`` that samples its responses in
    each process (``KindSpec.sampled_per_process``) must keep the number of processes itself."""
    before, after = result_settings(saved), result_settings(current.model_dump(mode="json"))
    note = None
    if task in KINDS and KINDS[task].spec.sampled_per_process:
        if saved_world != world:
            raise ConfigError(f"distributed: the number of processes changed since the checkpoint ({saved_world} "
                              f"-> {world}); dpokit {task} samples its responses in each process, so another "
                              "number samples others (use --force to resume anyway)")
    else:
        note = check_global_batch(before, after, saved_world, world)
        if note and not current.model.disable_dropout:
            note += ("; dropout is on (model.disable_dropout: false), so its random masks differ from those of "
                     "a run that was not split differently")
        before = {k: v for k, v in before.items() if k not in SPLIT}
        after = {k: v for k, v in after.items() if k not in SPLIT}
    # A warmup_ratio's warmup grows with the steps: then they are guarded too.
    growable = GROWABLE if current.train.scheduler == "constant" and current.train.warmup_ratio is None else ()
    for key in sorted(set(before) | set(after)):
        if key not in growable and before.get(key) != after.get(key):
            raise ConfigError(f"{key}: changed since the checkpoint "
                              f"({_show(before, key)} -> {_show(after, key)}); resuming would not continue the same "
                              "run (use --force to resume anyway)")
    if saved_fingerprint is not None and saved_fingerprint != data_fingerprint:
        saved_file, _, saved_images = saved_fingerprint.partition(IMAGES_PART)
        file, _, images = data_fingerprint.partition(IMAGES_PART)
        if saved_file == file and saved_images and images:
            raise ConfigError("data.train: an image the data names changed since the checkpoint (the file is the "
                              "same; an image file's bytes, or which rows are kept, differ) (use --force to resume "
                              "anyway)")
        raise ConfigError("data.train: the file's content changed since the checkpoint (use --force to resume "
                          "anyway)")
    return note


def check_global_batch(before: dict[str, Any], after: dict[str, Any], saved_world: int, world: int) -> str | None:
    """Refuse a change of the global batch (``before``/``after``: ``result_settings``); a change of how it is
    split is allowed and described (the returned note), no change at all gives None."""
    old = (before.get("train.batch_size"), before.get("train.grad_accum"), saved_world)
    new = (after.get("train.batch_size"), after.get("train.grad_accum"), world)
    if old == new:
        return None
    old_pairs, new_pairs = math.prod(old), math.prod(new)
    shown = f"batch x accumulation x processes: {_split(old)} -> {_split(new)}"
    if old_pairs == new_pairs:
        return (f"resuming with the same global batch of {new_pairs} pairs a step, split differently ({shown}): "
                "every step trains the same pairs in the same order; only the order of fp32 sums differs")
    keys = ("train.batch_size", "train.grad_accum", "distributed")
    changed = next(i for i in range(3) if old[i] != new[i])
    what = "the number of processes changed" if changed == 2 else "changed"
    per_process = new[1] * new[2]
    keep = (f"; train.batch_size={old_pairs // per_process} keeps it" if old_pairs % per_process == 0 else "")
    raise ConfigError(f"{keys[changed]}: {what} since the checkpoint ({old[changed]} -> {new[changed]}), which "
                      f"changes the global batch from {old_pairs} to {new_pairs} pairs a step ({shown}){keep}; "
                      "resuming would not continue the same run (use --force to resume anyway)")


def _split(split: tuple[Any, ...]) -> str:
    return " x ".join(str(n) for n in split)


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
