"""Experiment trackers (``log.report_to``): TensorBoard, Weights & Biases, MLflow, Trackio.

``metrics.jsonl`` is always written under dpokit's names; a tracker receives the same rows under the names a
TRL ``DPOTrainer`` run gives it (``tracker_names``), so the two runs overlay in one dashboard, plus the health
warnings as text and the resolved config. Only rank 0 reports (rows are reduced over ranks before they are
written).

Each tracker is an optional extra of the repository (``pip install -c constraints.txt -e '.[tensorboard]'`` in
a clone; trackio's without ``-c constraints.txt``: it needs pillow < 13); asking for one that is not installed
is one line naming the extra, before any training. A tracker that fails later (network down, disk full) warns
once and is dropped: training goes on and nothing waits on it again.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpokit.errors import ConfigError


def install_line(name: str) -> str:
    """How to install tracker ``name``'s extra from a clone of the repository (dpokit is not on PyPI); trackio's
    without the lock, whose pillow 13 every trackio release excludes."""
    return f"pip install -e '.[{name}]'" if name == "trackio" else f"pip install -c constraints.txt -e '.[{name}]'"


def check_installed(names: list[str]) -> None:
    """One line naming the extra to install for the first tracker whose package is missing."""
    for name in names:
        if importlib.util.find_spec(name) is None:  # a tracker's name is its package's module and its extra
            raise ConfigError(f"log.report_to: {name} is not installed; in a clone of dpokit: {install_line(name)}")


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (trackers whose parameters are flat)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row under dpokit's names (``step`` and ``split`` are the row's place, not
    values)."""
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


TRL_NAMES = {"lr": "learning_rate"}
"""dpokit's name -> transformers' for the metrics both log under different names; every other shared metric
(``loss``, ``rewards/*``, ``logps/*``, ``logits/*``, ``grad_norm``, ``epoch``, ``num_tokens``) has one name."""


def tracker_names(row: dict[str, Any], grouped: bool = True) -> dict[str, float]:
    """The numbers of a metrics row under the names a TRL run sends the same tracker: transformers' callbacks
    for TensorBoard, W&B and Trackio put a training value under ``train/`` and a held-out one under ``eval/``
    (``train/loss``, ``train/learning_rate``, ``eval/rewards/accuracies``); its MLflow callback sends the
    Trainer's own names (``grouped=False``: ``loss``, ``learning_rate``, ``eval_loss``). dpokit-only metrics
    (``tokens_per_second``, ``kl``, ...) follow the same rule, so they sit beside TRL's in the dashboard."""
    held_out = row.get("split") == "eval"
    prefix = ("eval/" if held_out else "train/") if grouped else ("eval_" if held_out else "")
    return {f"{prefix}{TRL_NAMES.get(k, k)}": v for k, v in scalars(row).items()}


# ------------------------------------------------------------------------------------------------- trackers

class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        import yaml

        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "```\n" + text + "\n```"
                             + (f"\n\ntags: {', '.join(cfg.tags)}" if cfg.tags else ""), 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def warn(self, step: int, code: str, message: str) -> None:
        self.writer.add_text(f"warnings/{code}", message, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, name=cfg.run_name or run_dir.name, tags=cfg.tags or None,
                              config=config, dir=str(run_dir), reinit="finish_previous")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def warn(self, step: int, code: str, message: str) -> None:
        self.run.log({f"warnings/{code}": message}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    name = "mlflow"
    grouped = False  # transformers' MLflow callback logs the Trainer's names without train/ and eval/

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store in the run, read by `mlflow ui`
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it; no server needed
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(cfg.project)
        self.run = mlflow.start_run(run_name=cfg.run_name or run_dir.name,
                                    tags={tag: "" for tag in cfg.tags} or None)
        params = {k: ("" if v is None else str(v))[:6000] for k, v in flat(config).items()}
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            mlflow.log_params(dict(list(params.items())[start:start + 100]))
        mlflow.log_dict(config, "config.yaml")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def warn(self, step: int, code: str, message: str) -> None:
        self.mlflow.log_text(message, f"warnings/step-{step}-{code}.txt")

    def close(self) -> None:
        self.mlflow.end_run()


class Trackio:
    name = "trackio"

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=cfg.project, name=cfg.run_name or run_dir.name,
                                config={**config, **({"tags": list(cfg.tags)} if cfg.tags else {})})

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def warn(self, step: int, code: str, message: str) -> None:
        pass  # Trackio records numbers; the warning is in metrics.jsonl and on stderr

    def close(self) -> None:
        self.trackio.finish()


KINDS: dict[str, Callable[..., Any]] = {cls.name: cls for cls in (TensorBoard, WandB, MLflow, Trackio)}
"""Tracker name -> its class; the names are ``dpokit.config.TRACKERS``, what ``log.report_to`` accepts."""


class Trackers:
    """Every tracker of ``log.report_to``; each call goes to each, and one that raises warns once (``say``) and
    is dropped."""

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any],
                 say: Callable[[str], None] | None = None, kinds: dict[str, Callable[..., Any]] | None = None):
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.active: list[Any] = []
        for name in cfg.report_to:
            tracker = self._guard(name, lambda name=name: (kinds or KINDS)[name](run_dir, cfg, config))
            if tracker is not None:
                tracker.name = name  # the name the warnings use, whatever the class
                self.active.append(tracker)

    def _guard(self, name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - any tracker failure is the tracker's, never the run's
            self.say(f"dpokit: warning: tracker {name} failed ({type(exc).__name__}: {exc}); "
                     "it gets nothing more, training goes on (metrics.jsonl has every row)")
            self.active = [t for t in self.active if t.name != name]
            return None

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.active):
            self._guard(tracker.name, lambda t=tracker: getattr(t, method)(*args))

    def write(self, row: dict[str, Any]) -> None:
        """One metrics row (``MetricsWriter.write``'s)."""
        step = int(row.get("step", 0))
        if row.get("split") == "warning":
            self._each("warn", step, str(row.get("warning", "warning")), str(row.get("message", "")))
        else:
            for tracker in list(self.active):
                values = tracker_names(row, getattr(tracker, "grouped", True))
                if values:
                    self._guard(tracker.name, lambda t=tracker, v=values: t.log(step, v))

    def close(self) -> None:
        self._each("close")
        self.active = []


def open_trackers(run_dir: Path, cfg: Any, enabled: bool = True) -> Trackers | None:
    """The run's trackers (rank 0 only: ``enabled``), or None when ``log.report_to`` is empty."""
    if not enabled or not cfg.log.report_to:
        return None
    check_installed(list(cfg.log.report_to))
    return Trackers(run_dir, cfg.log, cfg.model_dump(mode="json"))


def report_eval(run_dir: Path, cfg: Any, result: dict[str, Any]) -> None:
    """``dpokit eval``'s headline numbers (reward, KL, win rate, implicit-reward accuracy) to the run's trackers,
    under ``eval/`` at the run's last step, as a run named ``RUN_NAME-eval`` where trackers keep runs apart."""
    if not cfg.log.report_to:
        return
    try:
        check_installed(list(cfg.log.report_to))
    except ConfigError as exc:  # eval.json is written already: say what was not reported, do not fail
        print(f"dpokit: warning: {exc}; the evaluation was not reported to the trackers", file=sys.stderr)
        return
    from dpokit.io import read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    step = max((int(r.get("step", 0)) for r in rows), default=0)
    log_cfg = cfg.log.model_copy(update={"run_name": f"{cfg.log.run_name or run_dir.name}-eval"})
    trackers = Trackers(run_dir, log_cfg, cfg.model_dump(mode="json"))
    trackers.write({"step": step, "split": "eval", **{k: v for k, v in result.items() if k != "step"}})
    trackers.close()
