"""Experiment trackers (``log.report_to``): the rows of metrics.jsonl under TRL's names, from rank 0, the
config; a missing extra is one line; a failing tracker warns once and training goes on. Offline: each real
tracker's test reads back what it wrote with the tracker's own reader, and skips (saying why) when its extra is
not installed."""

import importlib.util
import json
import os
import shutil

import pytest

import dpokit
from conftest import ROOT
from dpokit.config import TRACKERS, load_config
from dpokit.errors import ConfigError
from dpokit.integrations.trackers import (
    KINDS,
    Trackers,
    check_installed,
    install_line,
    report_eval,
    scalars,
    tracker_names,
)
from dpokit.training.metrics import MetricsWriter, read_metrics
from test_train import base_config


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed ({install_line(module)})")


class Recorder:
    name = "recorder"

    def __init__(self, run_dir, cfg, config):
        self.rows, self.warnings, self.config, self.closed = [], [], config, False

    def log(self, step, values):
        self.rows.append((step, values))

    def warn(self, step, code, message):
        self.warnings.append((step, code))

    def close(self):
        self.closed = True


class Broken(Recorder):
    name = "broken"

    def log(self, step, values):
        raise OSError("disk full")


def test_rows_reach_every_tracker_and_a_failing_one_warns_once_and_is_dropped(tmp_path):
    cfg = load_config({"log": {"report_to": ["tensorboard", "wandb"]}}).log
    said = []
    trackers = Trackers(tmp_path, cfg, {"loss": {"beta": 0.1}}, say=said.append,
                        kinds={"tensorboard": Recorder, "wandb": Broken})
    writer = MetricsWriter(tmp_path / "metrics.jsonl", trackers=trackers)
    recorder = trackers.active[0]
    for step in (1, 2, 3):
        writer.write({"step": step, "split": "train", "loss": 0.5, "rewards/chosen": 0.1, "lr": 1e-6})
    writer.write({"step": 3, "split": "eval", "loss": 0.6, "rewards/accuracies": 1.0})
    writer.write({"step": 3, "split": "warning", "warning": "zero_rewards", "message": "m"})
    writer.close()
    assert len(said) == 1 and "tracker wandb failed (OSError: disk full)" in said[0]
    assert [t.name for t in trackers.active] == [] and recorder.closed
    assert recorder.rows[0] == (1, {"train/loss": 0.5, "train/rewards/chosen": 0.1, "train/learning_rate": 1e-6})
    assert recorder.rows[-1] == (3, {"eval/loss": 0.6, "eval/rewards/accuracies": 1.0})
    assert recorder.warnings == [(3, "zero_rewards")] and recorder.config == {"loss": {"beta": 0.1}}
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 5  # the file has every row whatever the trackers did


def test_a_tracker_that_cannot_start_is_dropped_and_other_ranks_report_nothing(tmp_path):
    class CannotStart(Recorder):
        def __init__(self, *args):
            raise ConnectionError("network down")

    said = []
    cfg = load_config({"log": {"report_to": ["wandb"]}}).log
    assert Trackers(tmp_path, cfg, {}, say=said.append, kinds={"wandb": CannotStart}).active == []
    assert "network down" in said[0]
    trackers = Trackers(tmp_path, cfg, {}, kinds={"wandb": Recorder})
    writer = MetricsWriter(tmp_path / "m.jsonl", enabled=False, trackers=trackers)  # rank 1
    writer.write({"step": 1, "split": "train", "loss": 1.0})
    assert trackers.active[0].rows == []


TRL_ROW = {"loss": 0.69, "rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/accuracies": 0.75,
           "rewards/margins": 0.2, "logps/chosen": -40.0, "logps/rejected": -45.0, "logits/chosen": -1.5,
           "logits/rejected": -1.25, "grad_norm": 3.0, "lr": 5e-7, "epoch": 0.5, "num_tokens": 4096}


def test_trackers_receive_trl_names_and_metrics_jsonl_keeps_dpokits(tmp_path):
    """What transformers' callbacks send for a DPOTrainer run: TensorBoard, W&B and Trackio ``train/NAME`` and
    ``eval/NAME`` (its ``rewrite_logs``), MLflow the Trainer's own ``NAME`` and ``eval_NAME``; ``lr`` is TRL's
    ``learning_rate``. No tracker package is needed: fakes stand in for TensorBoard and MLflow."""
    class FakeMLflow(Recorder):
        grouped = False

    cfg = load_config({"log": {"report_to": ["tensorboard", "mlflow"]}}).log
    trackers = Trackers(tmp_path, cfg, {}, kinds={"tensorboard": Recorder, "mlflow": FakeMLflow})
    writer = MetricsWriter(tmp_path / "metrics.jsonl", trackers=trackers)
    board, mlflow = trackers.active
    writer.write({"step": 4, "split": "train", "tokens": 512, "tokens_per_second": 100.0, **TRL_ROW})
    writer.write({"step": 4, "split": "eval", "loss": 0.7, "rewards/margins": 0.1})
    writer.close()
    trl = {"train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
           "train/rewards/margins", "train/logps/chosen", "train/logps/rejected", "train/logits/chosen",
           "train/logits/rejected", "train/grad_norm", "train/learning_rate", "train/epoch", "train/num_tokens"}
    (step, train), (_, held_out) = board.rows
    assert step == 4 and set(train) == trl | {"train/tokens", "train/tokens_per_second"}
    assert train["train/learning_rate"] == 5e-7 and train["train/loss"] == 0.69
    assert held_out == {"eval/loss": 0.7, "eval/rewards/margins": 0.1}
    (_, train), (_, held_out) = mlflow.rows
    assert {"loss", "learning_rate", "rewards/chosen", "grad_norm", "epoch", "num_tokens"} <= set(train)
    assert "lr" not in train and held_out == {"eval_loss": 0.7, "eval_rewards/margins": 0.1}
    written = read_metrics(tmp_path / "metrics.jsonl")  # the file keeps dpokit's names (DESIGN.md)
    assert written[0]["lr"] == 5e-7 and "learning_rate" not in written[0] and written[1]["loss"] == 0.7


def test_trl_names_of_a_row_without_any_tracker():
    row = {"step": 9, "split": "train", "loss": 1.0, "lr": 2e-6, "skipped_steps": 0, "note": "x", "ok": True}
    assert tracker_names(row) == {"train/loss": 1.0, "train/learning_rate": 2e-6, "train/skipped_steps": 0.0}
    assert tracker_names({**row, "split": "eval"}, grouped=False) == {
        "eval_loss": 1.0, "eval_learning_rate": 2e-6, "eval_skipped_steps": 0.0}


def test_rows_carry_trls_running_token_count_and_epoch_across_a_resume(tmp_path, monkeypatch, capsys):
    """``num_tokens`` is TRL's running total of non-padding tokens (the sum of the rows' per-step ``tokens``),
    ``epoch`` the passes over the training pairs (pairs drawn / pairs kept); a resumed run continues both from
    its checkpoint, and the tracker gets them as ``train/num_tokens`` and ``train/epoch``."""
    made = []
    monkeypatch.setitem(__import__("dpokit.integrations.trackers", fromlist=["KINDS"]).KINDS, "tensorboard",
                        lambda *args: made.append(Recorder(*args)) or made[-1])
    monkeypatch.setattr("dpokit.integrations.trackers.check_installed", lambda names: None)
    cfg = base_config(tmp_path, max_steps=4, batch_size=4, log_every=1, save_every=2)
    cfg["log"] = {"report_to": ["tensorboard"]}
    run_dir = dpokit.train(cfg, run_dir=str(tmp_path / "run"))
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    kept = json.loads((run_dir / "data_report.json").read_text())["train"]["rows_kept"]
    totals = [sum(r["tokens"] for r in rows[:i + 1]) for i in range(len(rows))]
    assert [r["num_tokens"] for r in rows] == totals and totals[-1] > 0
    assert [r["epoch"] for r in rows] == [4 * r["step"] / kept for r in rows]  # exact: both are pair counts
    (_, values) = made[0].rows[-1]
    assert values["train/num_tokens"] == totals[-1] and values["train/epoch"] == rows[-1]["epoch"]
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    assert (run_dir / "checkpoints" / "step-2" / "COMPLETE").is_file()
    capsys.readouterr()
    dpokit.train(cfg, run_dir=str(run_dir), resume=True)  # from step-2: steps 3 and 4 again
    assert "step-2 (step 2 of 4)" in capsys.readouterr().err
    resumed = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [(r["step"], r["num_tokens"], r["epoch"]) for r in resumed] == [
        (r["step"], r["num_tokens"], r["epoch"]) for r in rows]


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"log.report_to: mlflow is not installed; in a clone of dpokit: "
                                          r"pip install -c constraints.txt -e '.\[mlflow\]'$"):
        check_installed(["mlflow"])
    with pytest.raises(ConfigError, match=r"trackio is not installed; in a clone of dpokit: pip install -e '.\[trackio\]'$"):
        check_installed(["trackio"])  # every trackio release needs pillow < 13: without the lock
    with pytest.raises(ConfigError, match="log.report_to"):
        load_config({"log": {"report_to": ["comet"]}})
    assert scalars({"step": 2, "split": "train", "loss": 1, "flag": True, "note": "x"}) == {"loss": 1.0}


def test_one_list_of_trackers_names_the_classes_and_the_extras():
    """``dpokit.config.TRACKERS`` is what ``log.report_to`` accepts, what ``KINDS`` builds, and the extras of
    pyproject.toml: a tracker added to one and not the others fails here."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(KINDS) == sorted(TRACKERS) and all(KINDS[name].name == name for name in TRACKERS)
    assert all(name in extras for name in TRACKERS)
    assert load_config({"log": {"report_to": list(TRACKERS)}}).log.report_to == list(TRACKERS)


def tiny_run(tmp_path, tracker, **log):
    cfg = base_config(tmp_path, max_steps=3, batch_size=4, log_every=1)
    cfg["data"]["eval"] = cfg["data"]["train"]
    cfg["eval"] = {"every": 2}
    cfg["log"] = {"report_to": [tracker], "run_name": "tiny", "tags": ["t1"], **log}
    run_dir = dpokit.train(cfg, run_dir=str(tmp_path / "run"))
    rows = read_metrics(run_dir / "metrics.jsonl")
    return run_dir, [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]


@needs("tensorboard")
def test_tensorboard_event_files_hold_the_rows_under_the_same_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, train, evals = tiny_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/rewards/chosen", "train/rewards/accuracies", "train/grad_norm",
            "train/learning_rate", "eval/loss"} <= tags
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == [
        (r["step"], r["loss"]) for r in train]
    assert [e.step for e in events.Scalars("eval/loss")] == [r["step"] for r in evals]
    assert "config" in "".join(events.Tags()["tensors"])
    # dpokit eval's numbers join them, at the run's last step
    report_eval(run_dir, load_config(run_dir / "config.yaml"), {"kl": 1.5, "win_rate": 0.75, "reward_fn": "length"})
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/kl")] == [(3, 1.5)]


@needs("wandb")
def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, train, _ = tiny_run(tmp_path, "wandb", project="dpokit-test")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    (log,) = runs[0].glob("run-*.wandb")  # what `wandb sync` uploads; wandb >= 0.19 reads it in Go only
    records = log.read_bytes()
    assert len(runs) == 1 and records.startswith(b":W&B")
    for name in (b"train/rewards/chosen", b"eval/loss", b"train/learning_rate", b"tiny", b"t1", b"beta",
                 b"dpokit-test"):
        assert name in records, name


@needs("mlflow")
def test_mlflow_local_file_store_read_back_with_its_client(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    run_dir, train, evals = tiny_run(tmp_path, "mlflow", project="dpokit-test")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("dpokit-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny" and "t1" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, pytest.approx(m.value)) for m in history] == [(r["step"], r["loss"]) for r in train]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [r["step"] for r in evals]
    assert client.get_metric_history(run.info.run_id, "learning_rate")
    assert run.data.params["loss.beta"] == "0.1"


@needs("trackio")
def test_trackio_local_store_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    run_dir, train, _ = tiny_run(tmp_path, "trackio", project="dpokit-test")
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(project="dpokit-test", run="tiny")
    losses = [(row["step"], row["train/loss"]) for row in logs if "train/loss" in row]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in train]


def test_no_tracker_asked_for_means_nothing_opened(tmp_path):
    assert os.environ.get("RANK", "0") == "0"
    from dpokit.integrations.trackers import open_trackers

    assert open_trackers(tmp_path, load_config({})) is None


def test_dpokit_eval_reports_its_numbers_as_a_run_of_its_own(tmp_path, monkeypatch, capsys):
    made = []

    class Made(Recorder):
        def __init__(self, run_dir, cfg, config):
            super().__init__(run_dir, cfg, config)
            self.run_name = cfg.run_name
            made.append(self)

    monkeypatch.setitem(__import__("dpokit.integrations.trackers", fromlist=["KINDS"]).KINDS, "wandb", Made)
    monkeypatch.setattr("dpokit.integrations.trackers.check_installed", lambda names: None)
    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "split": "train", "loss": 1.0}\n')
    cfg = load_config({"log": {"report_to": ["wandb"], "run_name": "mine"}})
    report_eval(tmp_path, cfg, {"kl": 2.0, "reward": 0.5, "reward_fn": "length", "temperatures": []})
    (tracker,) = made
    assert tracker.run_name == "mine-eval" and tracker.rows == [(7, {"eval/kl": 2.0, "eval/reward": 0.5})]
    assert tracker.closed
    report_eval(tmp_path, load_config({}), {"kl": 2.0})  # no trackers asked for: nothing
    assert len(made) == 1

    def missing(names):
        raise ConfigError("log.report_to: wandb is not installed; pip install 'dpokit[wandb]'")

    monkeypatch.setattr("dpokit.integrations.trackers.check_installed", missing)
    report_eval(tmp_path, cfg, {"kl": 2.0})  # eval.json is written: a missing extra is a warning here
    assert len(made) == 1 and "not reported" in capsys.readouterr().err


def test_the_recipe_reports_every_run_under_its_own_name_without_touching_the_caches(tmp_path):
    from dpokit.recipes.sentiment.config import load_recipe_config
    from dpokit.recipes.sentiment.runs import run_specs, train_key

    plain = load_recipe_config("demo")
    logged = load_recipe_config("demo", ["log.report_to=[tensorboard]", "log.project=sentiment"])
    for cfg in (plain, logged):
        cfg.run_dir = str(tmp_path / "demo")
    (tmp_path / "pairs-train.jsonl").write_text("")
    a = run_specs(plain, tmp_path, tmp_path / "demo", "smollm2")
    b = run_specs(logged, tmp_path, tmp_path / "demo", "smollm2")
    for name, spec in b.items():
        assert spec.config["log"]["report_to"] == ["tensorboard"] and spec.config["log"]["project"] == "sentiment"
        assert spec.config["log"]["run_name"] == f"demo-{name}"
        load_config(spec.config)
        assert train_key(spec) == train_key(a[name])  # trackers change no result: the cached runs stay valid
