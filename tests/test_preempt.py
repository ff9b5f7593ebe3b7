"""SIGTERM / SIGINT during training (``dpokit.training.preempt``): the step in flight finishes, a complete checkpoint
is saved, one line says where and the exact command that resumes, the exit code is 128 + the signal; resuming
is bit-identical to a run never stopped; a second signal stops at once, saving nothing; torchrun ranks stop
after the same step when only rank 0 is signalled. Every process trains a tiny model on CPU, a few steps."""

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli, write_pairs
from dpokit.training.checkpoint import list_checkpoints, read_trainer_state, verify_checkpoint
from dpokit.training.metrics import read_metrics
from test_distributed import ENV, rank_pids, torchrun
from test_resume import (
    ROOT,
    assert_bit_identical,
    dropout_model,  # noqa: F401 (a fixture: the tiny model with dropout on)
    make_config,
    weights,
)

STOPPED = re.compile(r"^dpokit: stopped by (SIGTERM|SIGINT) after step (\d+) of (\d+); "
                     r"checkpoint saved: (\S+); resume with: (.+)$")


def logged_step(run_dir: Path) -> int:
    """The last training step in metrics.jsonl, read while the run writes it (a half line is skipped)."""
    steps = [0]
    path = run_dir / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("split") == "train":
            steps.append(row["step"])
    return max(steps)


def start(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """``dpokit ...`` as printed by dpokit (or any command), its stderr into ``log``."""
    if command[0] == "dpokit":
        command = [sys.executable, "-m", "dpokit", *command[1:]]
    with log.open("w") as err:  # the child holds its own copy of the file
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, **kwargs)


def wait_for(proc: subprocess.Popen, ready, deadline: float = 120) -> None:
    end = time.time() + deadline
    while not ready():
        assert proc.poll() is None, "the run ended before the signal"
        assert time.time() < end, "timed out waiting for the run"
        time.sleep(0.005)


def stop_line(log: Path) -> re.Match:
    """The one line a stopped run ends with, and no traceback before it."""
    text = log.read_text()
    assert "Traceback" not in text, text[-2000:]
    found = STOPPED.match(text.strip().splitlines()[-1])
    assert found, text[-2000:]
    return found


def assert_saved(run_dir: Path, found: re.Match, signalled_after: int) -> int:
    """The checkpoint the stop line names is complete, of the step in flight (no step after it ran)."""
    step = int(found[2])
    assert step >= signalled_after and step == logged_step(run_dir)
    assert Path(found[4]) == run_dir / "checkpoints" / f"step-{step}"
    assert verify_checkpoint(Path(found[4])) is None
    assert read_trainer_state(Path(found[4]))["step"] == step
    return step


@pytest.mark.equivalence
def test_sigterm_and_sigint_at_random_moments_then_resume_is_bit_identical(
        tmp_path, dropout_model):  # noqa: F811
    # No save_every: the checkpoints the signals make are the only ones.
    cfg = make_config(tmp_path, dropout_model, max_steps=20, save_every=None)
    straight = tmp_path / "straight"
    assert run_cli("train", str(cfg), f"run_dir={straight}").returncode == 0
    run = tmp_path / "stopped"
    command = ["dpokit", "train", str(cfg), f"run_dir={run}"]
    rng = random.Random(2024)
    step = 0
    for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
        log = tmp_path / f"log-{signum}-{step}.txt"
        proc = start(command, log)
        after, delay = step + rng.randint(1, 3), rng.uniform(0.0, 0.05)  # at a random moment of a later step
        wait_for(proc, lambda: logged_step(run) >= after)  # noqa: B023 (used before the loop moves on)
        time.sleep(delay)
        signalled_after = logged_step(run)
        proc.send_signal(signum)
        assert proc.wait(timeout=120) == 128 + signum  # 143, 130
        found = stop_line(log)
        assert found[1] == signum.name and found[3] == "20"
        step = assert_saved(run, found, signalled_after)
        # The exact command that resumes: this one with --resume.
        command = shlex.split(found[5])
        assert command == ["dpokit", "train", str(cfg), f"run_dir={run}", "--resume"]
    assert step < 20
    done = subprocess.run([sys.executable, "-m", "dpokit", *command[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {run / 'checkpoints' / f'step-{step}'}" in done.stderr
    assert_bit_identical(weights(straight), weights(run))
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 21))


SLOW_REWARD = '''import time


def slow_e(prompt, response):
    time.sleep(0.05)  # a PPO step takes over a second: a second signal lands inside it
    return float(response.count("e"))
'''


def test_ppo_stops_on_sigterm_resumes_and_a_second_signal_stops_at_once(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_REWARD)
    run = tmp_path / "ppo"
    command = ["dpokit", "ppo", "configs/tiny-ppo.yaml", f"run_dir={run}",
               f"ppo.reward={tmp_path / 'slow.py'}:slow_e", "train.max_steps=4", "train.save_every=null",
               "data.eval=null", "train.progress=false"]
    log = tmp_path / "first.txt"
    proc = start(command, log)
    wait_for(proc, lambda: logged_step(run) >= 1)
    signalled_after = logged_step(run)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    found = stop_line(log)
    step = assert_saved(run, found, signalled_after)
    assert step < 4 and shlex.split(found[5]) == [*command, "--resume"]

    # Resumed, then signalled twice: the second signal ends the process inside the step, nothing saved.
    log = tmp_path / "second.txt"
    proc = start(shlex.split(found[5]), log)
    wait_for(proc, lambda: logged_step(run) > step)
    proc.send_signal(signal.SIGTERM)
    wait_for(proc, lambda: "SIGTERM received" in log.read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    text = log.read_text()
    assert "second signal (SIGINT): stopping now without saving" in text
    assert "stopped by" not in text and "Traceback" not in text
    assert list_checkpoints(run) == [run / "checkpoints" / f"step-{step}"]

    done = subprocess.run([sys.executable, "-m", "dpokit", *shlex.split(found[5])[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"step-{step} (step {step} of 4)" in done.stderr
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4]
    assert (run / "final" / "model.safetensors").exists()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available()
                    or not Path("/proc/self/environ").exists(),
                    reason="needs torch.distributed with gloo, and /proc to find the ranks")
def test_torchrun_ranks_stop_after_the_same_step_when_only_rank_0_gets_sigterm(tmp_path):
    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(write_pairs(tmp_path / "pairs.jsonl", 24)), "max_length": 64,
                    "max_prompt_length": 32},
           "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 60, "seed": 3, "progress": False},
           "distributed": {"timeout_s": 60}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    log = tmp_path / "torchrun.txt"
    proc = start(torchrun("dpokit", "train", str(path), f"run_dir={run}"), log, env=ENV)
    wait_for(proc, lambda: logged_step(run) >= 2, deadline=240)
    signalled_after = logged_step(run)
    os.kill(rank_pids(proc.pid)[0], signal.SIGTERM)  # rank 1 is never signalled
    assert proc.wait(timeout=120) != 0  # torchrun reports its workers' exit codes as a failure: both 143
    text = log.read_text()
    exits = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s+exitcode\s*:\s*(\d+)", text)
    assert sorted(exits) == [("0", "143"), ("1", "143")], text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("dpokit: stopped by")]
    assert len(lines) == 1  # rank 0 says it once
    found = STOPPED.match(lines[0])
    assert found and found[1] == "SIGTERM"
    step = assert_saved(run, found, signalled_after)
    resume = ["dpokit", "train", str(path), f"run_dir={run}", "--resume", "--nproc", "2"]
    assert shlex.split(found[5]) == resume
    state = read_trainer_state(Path(found[4]))
    # Rank 1 took part in the same save: its RNG state, gathered at that step, is in the checkpoint.
    assert state["world_size"] == 2 and len(state["rng_other_ranks"]) == 1
    assert list_checkpoints(run) == [Path(found[4])] and step < 60
    assert "dpokit: error" not in text  # no rank failed: both stopped on purpose


def test_semi_online_stops_on_its_refresh_grid_and_a_forwarded_repeat_is_the_same_signal(monkeypatch):
    from dpokit.training.distributed import Dist
    from dpokit.training.preempt import Preemption

    exits = []
    monkeypatch.setattr("dpokit.training.preempt.os._exit", exits.append)
    grid = Preemption(Dist(), every=3)  # online.sync_every = 3: checkpoints only after steps 3, 6, ...
    assert grid.requested(3) is None
    grid.handle(signal.SIGTERM, None)
    assert [grid.requested(n) for n in (4, 5, 6)] == [None, None, signal.SIGTERM]
    # Under torchrun the launcher forwards the signal its workers got too: that copy is no second signal.
    ranked = Preemption(Dist(rank=1, world=2, active=True))
    ranked.handle(signal.SIGINT, None)
    ranked.handle(signal.SIGINT, None)
    assert exits == [] and ranked.signum == signal.SIGINT
    single = Preemption(Dist())  # one process: a second signal exits at once, 128 + its number
    single.handle(signal.SIGTERM, None)
    single.handle(signal.SIGINT, None)
    assert exits == [130]
