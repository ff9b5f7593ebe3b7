"""Checkpoints and resume: atomic writes, hash checks, rotation, refused setting changes, SIGKILL at any moment
gives bit-identical weights, non-finite steps change nothing."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dpokit
from conftest import run_cli, write_pairs
from dpokit.errors import ConfigError, DpokitError
from dpokit.models.loading import tiny_model, tiny_tokenizer
from dpokit.training.checkpoint import save_checkpoint, verify_checkpoint
from dpokit.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> Path:
    """A tiny model folder with attention dropout on, so exact resume must also restore the RNG."""
    folder = tmp_path_factory.mktemp("dropout-model")
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=5, dropout=0.2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_config(tmp_path: Path, model: Path, **train) -> Path:
    cfg = {"model": {"name_or_path": str(model), "disable_dropout": False},
           "data": {"train": str(write_pairs(tmp_path / "pairs.jsonl", 14, style="thanks")), "max_length": 48,
                    "max_prompt_length": 24},
           "train": {"lr": 1e-3, "batch_size": 3, "grad_accum": 1, "max_steps": 10, "seed": 7, "save_every": 1,
                     "progress": False, "shuffle": True, **train}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def kill_when(proc: subprocess.Popen, ready, deadline: float = 120) -> None:
    end = time.time() + deadline
    while time.time() < end and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.0005)
    proc.kill()
    pytest.fail("the training process ended before it could be killed")


@pytest.mark.equivalence
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, dropout_model):
    cfg = make_config(tmp_path, dropout_model)
    straight = tmp_path / "straight"
    assert run_cli("train", str(cfg), f"run_dir={straight}").returncode == 0

    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    rng = random.Random(1234)
    # First kill: the moment a checkpoint's temporary folder appears (mid-write).
    # Second kill: a random delay after the first complete checkpoint of the resumed run.
    triggers = [lambda: ckpts.is_dir() and any(p.name.startswith(".tmp") for p in ckpts.iterdir())]
    delay = rng.uniform(0.0, 1.5)
    triggers.append(lambda: ckpts.is_dir() and len([p for p in ckpts.iterdir()
                                                    if (p / "COMPLETE").exists()]) >= 3
                    and (time.sleep(delay) or True))
    for trigger in triggers:
        proc = subprocess.Popen([sys.executable, "-m", "dpokit", "train", str(cfg), f"run_dir={killed}",
                                 "--resume"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, trigger)
    done = run_cli("train", str(cfg), f"run_dir={killed}", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    assert_bit_identical(weights(straight), weights(killed))
    # The metrics of the killed-and-resumed run read as one run: each step once.
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 11))


def test_resume_skips_corrupt_and_incomplete_checkpoints(tmp_path, dropout_model):
    cfg = make_config(tmp_path, dropout_model, max_steps=6)
    straight = tmp_path / "straight"
    assert run_cli("train", str(cfg), f"run_dir={straight}").returncode == 0
    partial = tmp_path / "partial"
    assert run_cli("train", str(cfg), f"run_dir={partial}", "train.max_steps=4",
                   "train.scheduler=constant").returncode == 0
    (partial / "final").rename(tmp_path / "old-final")
    step4 = partial / "checkpoints" / "step-4" / "model.safetensors"
    data = bytearray(step4.read_bytes())
    data[-1] ^= 0xFF
    step4.write_bytes(bytes(data))
    (partial / "checkpoints" / "step-3" / "COMPLETE").unlink()
    assert "does not match its hash" in verify_checkpoint(partial / "checkpoints" / "step-4")
    done = run_cli("train", str(cfg), f"run_dir={partial}", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipping checkpoint" in done.stderr and "step-4" in done.stderr and "step-3" in done.stderr
    assert "resuming from" in done.stderr and "step-2" in done.stderr
    # Skipped checkpoints are left in place for inspection, not deleted.
    assert (partial / "checkpoints" / "step-3").is_dir()
    assert_bit_identical(weights(straight), weights(partial))


def test_resume_refuses_changed_settings_unless_forced(tmp_path, dropout_model):
    cfg = make_config(tmp_path, dropout_model, max_steps=2)
    run = tmp_path / "run"
    dpokit.train(str(cfg), run_dir=str(run))
    for override, key in (("train.batch_size=2", "train.batch_size"), ("train.seed=8", "train.seed"),
                          ("loss.beta=0.3", "loss"), ("train.grad_accum=2", "train.grad_accum")):
        with pytest.raises(ConfigError) as err:
            dpokit.train(str(cfg), [f"run_dir={run}", "train.max_steps=3", override], resume=True)
        assert key in str(err.value) and "--force" in str(err.value)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(pairs.read_text().replace("Thanks 0", "Thanks zero"))
    # Through the CLI: one error line, last, exit 2; before it only the start-up notes (what auto resolved to).
    proc = run_cli("train", str(cfg), f"run_dir={run}", "train.max_steps=3", "--resume")
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("dpokit: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0] and "data.train" in errors[0]
    assert all(line.startswith("dpokit: ") for line in lines) and "Traceback" not in proc.stderr
    dpokit.train(str(cfg), [f"run_dir={run}", "train.max_steps=3", "train.batch_size=2"], resume=True, force=True)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3]


def test_resume_refuses_a_change_in_which_pairs_are_kept(tmp_path, dropout_model):
    """``data.dedupe`` changes which pairs train with the same file: refused by the rule (every field not marked
    result-neutral), not by luck of the file hash, which is the same here."""
    cfg = make_config(tmp_path, dropout_model, max_steps=2)
    run = tmp_path / "run"
    dpokit.train(str(cfg), run_dir=str(run))
    for override, key in (("data.dedupe=false", "data.dedupe"), ("data.max_line_bytes=4096", "data.max_line_bytes")):
        with pytest.raises(ConfigError, match=f"{key}: changed since the checkpoint"):
            dpokit.train(str(cfg), [f"run_dir={run}", "train.max_steps=3", override], resume=True)
    # Result-neutral settings may change: how often to log or save, passes, the progress display.
    dpokit.train(str(cfg), [f"run_dir={run}", "train.max_steps=3", "train.log_every=2", "train.pass_tokens=64",
                            "train.progress=true"], resume=True)


def test_rotation_keeps_newest_complete(tmp_path, dropout_model):
    cfg = make_config(tmp_path, dropout_model, max_steps=5, keep_checkpoints=2)
    run = tmp_path / "rot"
    assert run_cli("train", str(cfg), f"run_dir={run}").returncode == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-5"]
    assert all(verify_checkpoint(p) is None for p in (run / "checkpoints").iterdir())


def test_checkpoint_holds_no_pickle_and_refuses_non_finite_weights(tmp_path):
    model = tiny_model(512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 1})
    assert sorted(p.name for p in path.iterdir()) == sorted([
        "COMPLETE", "manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
        "scheduler.json", "trainer_state.json"])
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(DpokitError, match="not finite"):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"step": 2})
    assert not (tmp_path / "checkpoints" / "step-2").exists()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_non_finite_step_is_skipped_without_changing_anything(tmp_path, monkeypatch):
    import dpokit.methods.dpo as train_module  # where the loss is called
    real = train_module.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses, chosen, rejected = real(*args, **kwargs)
        if calls["n"] == 2:  # the second optimizer step (one micro-batch per step)
            losses = losses * float("nan")
        return losses, chosen, rejected

    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(write_pairs(tmp_path / "pairs.jsonl", 14, style="thanks")), "max_length": 48, "max_prompt_length": 24},
           "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 3, "save_every": 1, "progress": False}}
    run = dpokit.train(cfg, run_dir=str(tmp_path / "nan"))
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    one, two = run / "checkpoints" / "step-1", run / "checkpoints" / "step-2"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_bit_identical(load_file(str(one / name)), load_file(str(two / name)))
    assert json.loads((one / "scheduler.json").read_text())["last_epoch"] == \
        json.loads((two / "scheduler.json").read_text())["last_epoch"]

    calls["n"] = -10**9  # from now on every step is poisoned
    monkeypatch.setattr(train_module, "compute_loss",
                        lambda *a, **k: tuple(t * float("nan") if i == 0 else t
                                              for i, t in enumerate(real(*a, **k))))
    with pytest.raises(DpokitError, match="not finite for 3 consecutive steps"):
        dpokit.train(cfg, run_dir=str(tmp_path / "nan2"), train__max_skipped_steps=3, train__max_steps=5)


def test_no_pickle_and_no_unsafe_torch_load_in_package():
    for path in (ROOT / "src" / "dpokit").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert "import pickle" not in code and "pickle." not in code, f"{path}:{number}"
            if "torch.load(" in code:
                assert "weights_only=True" in code, f"{path}:{number}: {line.strip()}"


def test_config_error_for_missing_run_dir():
    with pytest.raises(ConfigError, match="run_dir: required"):
        dpokit.train({"data": {"train": "x.jsonl"}})
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_health_monitor_warns_once_per_interval():
    from dpokit.training.metrics import HealthMonitor

    monitor = HealthMonitor(interval=4)
    warnings = []
    for step in range(1, 13):
        row = {"step": step, "logps/chosen": -10.0 - step, "rewards/margins": 0.5 * step,
               "rewards/chosen": -0.1 * step, "rewards/rejected": -0.6 * step}
        warnings += [(step, code) for code, _ in monitor.check(row)]
    assert warnings == [(4, "likelihood_displacement"), (8, "likelihood_displacement"),
                        (12, "likelihood_displacement")]
    monitor = HealthMonitor(interval=4)
    zero = {"logps/chosen": -5.0, "rewards/margins": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0}
    codes = [c for s in range(1, 6) for c, _ in monitor.check({"step": s, **zero})]
    assert codes == ["zero_rewards"]  # step 2 only; step 1 (pi == pi_ref) is expected to be zero
    monitor = HealthMonitor(interval=4, max_reward=50)
    big = {"step": 3, "logps/chosen": -5.0, "rewards/margins": 80.0, "rewards/chosen": 60.0,
           "rewards/rejected": -20.0}
    assert [c for c, _ in monitor.check(big)] == ["exploding_rewards"]


def test_zero_rewards_warning_reaches_metrics_and_stderr(tmp_path, capsys):
    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(write_pairs(tmp_path / "pairs.jsonl", 14, style="thanks")), "max_length": 48, "max_prompt_length": 24},
           "train": {"lr": 1e-30, "batch_size": 4, "max_steps": 3, "progress": False}}
    run = dpokit.train(cfg, run_dir=str(tmp_path / "zero"))
    warnings = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "warning"]
    assert [w["warning"] for w in warnings] == ["zero_rewards"]
    assert "exactly 0" in capsys.readouterr().err


def test_a_run_writes_only_inside_run_dir_and_the_cache(tmp_path):
    home, cache, work, run = (tmp_path / name for name in ("home", "cache", "work", "run"))
    for folder in (home, work):
        folder.mkdir()
    data = write_pairs(tmp_path / "pairs.jsonl", 14, style="thanks")
    before = {p for p in tmp_path.rglob("*")}
    env = {**os.environ, "HOME": str(home), "DPOKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "XDG_CACHE_HOME": str(home / ".cache"), "MPLCONFIGDIR": str(home / ".mpl")}
    env.pop("HF_HOME", None)
    proc = subprocess.run([sys.executable, "-m", "dpokit", "train", str(ROOT / "configs" / "tiny.yaml"),
                           f"run_dir={run}", f"data.train={data}", "data.eval=null", "train.max_steps=2",
                           "reference.mode=store"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    created = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in created if not (p.is_relative_to(run) or p.is_relative_to(cache))]
    assert outside == [], outside
    assert any(p.is_relative_to(cache / "refstore") for p in created)


@pytest.mark.equivalence
def test_sigkill_then_resume_with_reference_sync_is_bit_identical(tmp_path, dropout_model):
    """TR-DPO (reference.sync): pi_ref is state. Killed after a sync had moved it, the resumed run reads it back
    from the checkpoint and ends with the straight run's policy and reference, bit for bit."""
    cfg = make_config(tmp_path, dropout_model, max_steps=8)
    sync = ["reference.sync.every=2", "reference.sync.alpha=0.5"]
    straight = tmp_path / "straight"
    done = run_cli("train", str(cfg), f"run_dir={straight}", *sync)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    delay = random.Random(99).uniform(0.0, 0.5)
    proc = subprocess.Popen([sys.executable, "-m", "dpokit", "train", str(cfg), f"run_dir={killed}", *sync],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: (ckpts / "step-3" / "COMPLETE").exists() and (time.sleep(delay) or True))
    saved = sorted(p for p in ckpts.iterdir() if (p / "COMPLETE").exists())
    first = load_file(str(ckpts / "step-1" / "reference.safetensors"))
    moved = load_file(str(ckpts / "step-3" / "reference.safetensors"))  # after the sync at step 2
    assert saved and any(not torch.equal(first[k], moved[k]) for k in first)
    done = run_cli("train", str(cfg), f"run_dir={killed}", "--resume", *sync)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    assert_bit_identical(weights(straight), weights(killed))
    reference = lambda d: load_file(str(d / "checkpoints" / "step-8" / "reference.safetensors"))  # noqa: E731
    assert_bit_identical(reference(straight), reference(killed))


def test_resume_rule_compares_the_global_batch_not_its_split():
    """What a step trains on is the global batch, batch_size x grad_accum x processes (every process draws the
    same global pairs and trains its share): another split of the same global batch resumes with a note,
    another global batch is refused, naming the key and the batch size that keeps it."""
    from dpokit.training.resume import check_resume_settings

    cfg = dpokit.load_config({"train": {"batch_size": 4}})
    saved = cfg.model_dump(mode="json")  # 2 processes x 4 = 8 pairs a step

    def check(world: int, task: str = "dpo", **overrides) -> str | None:
        return check_resume_settings(saved, dpokit.load_config(cfg, **overrides), "data", "data", 2, world, task)

    assert check(2) is None
    for world, overrides, split in ((1, {"train__batch_size": 8}, "4 x 1 x 2 -> 8 x 1 x 1"),
                                    (1, {"train__grad_accum": 2}, "4 x 1 x 2 -> 4 x 2 x 1"),
                                    (4, {"train__batch_size": 2}, "4 x 1 x 2 -> 2 x 1 x 4"),
                                    (2, {"train__batch_size": 2, "train__grad_accum": 2}, "4 x 1 x 2 -> 2 x 2 x 2")):
        note = check(world, **overrides)
        assert f"same global batch of 8 pairs a step, split differently (batch x accumulation x processes: {split})" \
            in note and "dropout" not in note
    dropout = dpokit.load_config(cfg, model__disable_dropout=False)
    note = check_resume_settings(dropout.model_dump(mode="json"), dpokit.load_config(dropout, train__batch_size=8),
                                 "data", "data", 2, 1)
    assert "dropout is on" in note
    with pytest.raises(ConfigError, match=r"^distributed: the number of processes changed since the checkpoint "
                                          r"\(2 -> 1\), which changes the global batch from 8 to 4 pairs a step "
                                          r"\(batch x accumulation x processes: 4 x 1 x 2 -> 4 x 1 x 1\); "
                                          r"train.batch_size=8 keeps it; .*\(use --force"):
        check(1)
    with pytest.raises(ConfigError, match=r"^train.grad_accum: changed since the checkpoint \(1 -> 3\), which "
                                          r"changes the global batch from 8 to 24 pairs a step \(.*\); resuming"):
        check(2, train__grad_accum=3)  # no batch size keeps 8 with 3 x 2: no hint
    # Online DPO and PPO sample responses in each process: their number of processes must stay.
    for task in ("online", "ppo"):
        with pytest.raises(ConfigError, match=f"dpokit {task} samples its responses in each process"):
            check(1, task, train__batch_size=8)
