"""Elastic resume: a checkpoint continues on another number of processes and under another strategy (FSDP <->
DDP <-> one process) when the global batch (train.batch_size x train.grad_accum x processes) is the same, and
the result equals a run that was never interrupted; another global batch is still refused.

The chain, on 20 pairs in global steps of 8 (shuffled; epochs end inside steps 3, 5 and 8):

    2 FSDP ranks x batch 4, steps 1-4 ----> 1 process x batch 8, steps 5-8 ----> (its step 6) 2 FSDP ranks, 7-8
                                      \\---> 2 DDP ranks x batch 4, steps 5-8 ---> (its step 6) 1 process, 7-8
                                       \\--> 1 FSDP rank x batch 8 (torchrun), steps 5-8

each compared with one process x batch 8 run straight to step 8.

Why the uninterrupted run's tolerance holds: resharding copies tensors (DCP reads the saved bytes; a plain
checkpoint is sliced into shards), so every weight, Adam moment and step count after the resume is bitwise
the one saved; what differs is only, as in any 2-rank-vs-1 run, the order in which the same fp32 terms are
summed (each rank's share, then gloo's reduction). ``tolerances.METRIC_REL`` and
``assert_same_weights_after_adamw`` derive their bounds for exactly that difference, for any number of AdamW
steps at a constant learning rate.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpokit
from dpokit.errors import ConfigError
from test_distributed import ENV, ROOT, assert_same_training, free_port, make_config, train_rows, write_yaml

pytestmark = [pytest.mark.equivalence,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="needs torch.distributed with gloo")]
N_PAIRS, GLOBAL = 20, 8
SAME_BATCH = f"same global batch of {GLOBAL} pairs a step"


def config(folder: Path, processes: int, strategy: str, max_steps: int) -> dict:
    """The run's config for ``processes`` processes: the per-process batch that keeps the global batch. Every
    config names the same data file, as a resumed run must."""
    return make_config(folder, N_PAIRS, train={"batch_size": GLOBAL // processes, "max_steps": max_steps},
                       distributed={"strategy": strategy})


def launch(folder: Path, processes: int, strategy: str, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``dpokit train`` under torchrun with ``processes`` gloo ranks, to step 8."""
    cfg = write_yaml(folder / f"{strategy}-{processes}.yaml", config(folder, processes, strategy, 8))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(free_port()), "-m", "dpokit", "train", str(cfg), f"run_dir={run_dir}", *args]
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def resumable_copy(source: Path, target: Path, step: int) -> Path:
    """A copy of a run folder whose newest checkpoint is ``step-{step}`` (later ones and final/ removed)."""
    shutil.copytree(source, target)
    for path in (target / "checkpoints").iterdir():
        if int(path.name.removeprefix("step-")) > step:
            shutil.rmtree(path)
    shutil.rmtree(target / "final")
    return target


def resumed_once(stderr: str, step: int, split: bool = True) -> None:
    """Rank 0 said once that it resumed, and (``split``: the processes changed) why that is allowed."""
    assert stderr.count(f"step {step} of 8)") == 1 and stderr.count(SAME_BATCH) == split, stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process straight to step 8, and 2 FSDP ranks to step 4 (sharded checkpoints)."""
    tmp = tmp_path_factory.mktemp("elastic")
    straight = dpokit.train(config(tmp, 1, "ddp", 8), run_dir=str(tmp / "straight"))
    cfg = write_yaml(tmp / "fsdp-first.yaml", config(tmp, 2, "fsdp", 4))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "dpokit", "train", str(cfg), f"run_dir={tmp / 'fsdp'}"]
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp / "fsdp" / "checkpoints" / "step-4" / ".metadata").is_file()  # DCP shards
    return {"tmp": tmp, "straight": straight, "fsdp": tmp / "fsdp"}


@pytest.fixture(scope="module")
def fsdp_to_one(runs):
    """The FSDP checkpoint of step 4 resumed by one process without a process group, batch 8."""
    run_dir = resumable_copy(runs["fsdp"], runs["tmp"] / "fsdp-to-one", 4)
    dpokit.train(config(runs["tmp"], 1, "ddp", 8), run_dir=str(run_dir), resume=True)
    return run_dir


@pytest.fixture(scope="module")
def fsdp_to_ddp(runs):
    run_dir = resumable_copy(runs["fsdp"], runs["tmp"] / "fsdp-to-ddp", 4)
    proc = launch(runs["tmp"], 2, "ddp", run_dir, "--resume")
    resumed_once(proc.stderr, 4, split=False)  # FSDP -> DDP on as many ranks: the same split
    return run_dir


def test_fsdp_checkpoint_resumed_by_one_process_equals_uninterrupted_run(runs, fsdp_to_one):
    assert_same_training(runs["straight"], fsdp_to_one)
    assert [r["step"] for r in train_rows(fsdp_to_one)] == list(range(1, 9))
    assert (fsdp_to_one / "checkpoints" / "step-5" / "model.safetensors").is_file()  # now the plain format


def test_fsdp_checkpoint_resumed_by_ddp_ranks_equals_uninterrupted_run(runs, fsdp_to_ddp):
    assert_same_training(runs["straight"], fsdp_to_ddp)


def test_fsdp_checkpoint_resumed_by_another_number_of_fsdp_ranks(runs):
    run_dir = resumable_copy(runs["fsdp"], runs["tmp"] / "fsdp-to-fsdp-1", 4)
    resumed_once(launch(runs["tmp"], 1, "fsdp", run_dir, "--resume").stderr, 4)
    assert_same_training(runs["straight"], run_dir)


def test_ddp_checkpoint_resumed_by_one_process_without_force(runs, fsdp_to_ddp, capsys):
    """2 DDP ranks x batch 4 -> 1 process x batch 8: accepted with a note, no --force."""
    run_dir = resumable_copy(fsdp_to_ddp, runs["tmp"] / "ddp-to-one", 6)
    assert (run_dir / "checkpoints" / "step-6" / "model.safetensors").is_file()  # plain, written by 2 ranks
    dpokit.train(config(runs["tmp"], 1, "ddp", 8), run_dir=str(run_dir), resume=True)
    err = capsys.readouterr().err
    assert "batch x accumulation x processes: 4 x 1 x 2 -> 8 x 1 x 1" in err and SAME_BATCH in err, err
    assert_same_training(runs["straight"], run_dir)


def test_plain_checkpoint_resumed_by_fsdp_ranks(runs, fsdp_to_one):
    run_dir = resumable_copy(fsdp_to_one, runs["tmp"] / "one-to-fsdp", 6)
    resumed_once(launch(runs["tmp"], 2, "fsdp", run_dir, "--resume").stderr, 6)
    assert (run_dir / "checkpoints" / "step-7" / ".metadata").is_file()  # sharded again
    assert_same_training(runs["straight"], run_dir)


def test_another_global_batch_is_still_refused_unless_forced(runs):
    run_dir = resumable_copy(runs["fsdp"], runs["tmp"] / "other-batch", 4)
    cfg = config(runs["tmp"], 2, "ddp", 5)  # batch 4 in one process: 4 pairs a step instead of 8
    with pytest.raises(ConfigError, match=r"^distributed: the number of processes changed since the checkpoint "
                                          r"\(2 -> 1\), which changes the global batch from 8 to 4 pairs a step "
                                          r".*train.batch_size=8 keeps it.*--force"):
        dpokit.train(cfg, run_dir=str(run_dir), resume=True)
    dpokit.train(cfg, run_dir=str(run_dir), resume=True, force=True)  # the sharded checkpoint, forced
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["tokens"] < rows[-2]["tokens"]
