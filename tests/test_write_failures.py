"""A write that fails (the file-size limit standing in for a full disk, a read-only folder) ends the run with
one line naming the path and the cause, exit 2, no traceback; nothing partial is left (no COMPLETE marker, no
staging folder); the newest complete checkpoint stays intact and is what --resume picks.

The file-size limit is set in the child (``resource.setrlimit`` in ``preexec_fn``). Exceeding it sends
SIGXFSZ, whose default action kills the process; CPython ignores SIGXFSZ at startup (as it does SIGPIPE), so
the write fails with EFBIG instead, in dpokit as in any Python program, and neither dpokit nor the test has to
ignore it: the tests check that the process ends with exit code 2, not killed by the signal."""

import ctypes
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from dpokit.training.checkpoint import list_checkpoints, verify_checkpoint
from test_resume import ROOT, assert_bit_identical, make_config, weights

MODEL = "tiny-random-llama"


def run_limited(*args: str, max_file_bytes: int | None = None,
                read_only: bool = False) -> subprocess.CompletedProcess:
    """``dpokit ARGS`` with files limited to ``max_file_bytes``, or unable to write into read-only folders
    (as root, whom permissions do not stop, after dropping the capabilities that override them)."""

    def limit() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        if read_only and os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            # CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH out of the bounding set: gone after exec.
            for cap in (1, 2):
                if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return subprocess.run([sys.executable, "-m", "dpokit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line a failed write ends with (exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert [line for line in lines if line.startswith("dpokit: error:")] == [lines[-1]]
    return lines[-1]


def staged(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_file_size_limit_on_checkpoint_and_final_keeps_the_newest_complete_checkpoint(tmp_path):
    cfg = make_config(tmp_path, MODEL, max_steps=4, save_every=2)
    straight = tmp_path / "straight"
    assert run_cli("train", str(cfg), f"run_dir={straight}").returncode == 0
    run = tmp_path / "run"
    shutil.copytree(straight, run)  # a run whose newest complete checkpoint is step-2
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "final")
    step2 = run / "checkpoints" / "step-2"
    before = {p.name: p.read_bytes() for p in step2.iterdir()}

    # model.safetensors (~430 kB) fits under the limit, optimizer.safetensors (~860 kB) does not: step-4 fails
    # half-written.
    failed = run_limited("train", str(cfg), f"run_dir={run}", "--resume", max_file_bytes=600_000)
    line = error_line(failed)
    assert line == f"dpokit: error: cannot write checkpoint {run / 'checkpoints' / 'step-4'}: File too large"
    assert list_checkpoints(run) == [step2] and staged(run / "checkpoints") == []
    assert {p.name: p.read_bytes() for p in step2.iterdir()} == before and verify_checkpoint(step2) is None

    done = run_cli("train", str(cfg), f"run_dir={run}", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {step2}" in done.stderr
    assert_bit_identical(weights(straight), weights(run))

    # final/ (its model.safetensors ~430 kB) over the limit: no final/ at all, checkpoints untouched.
    shutil.rmtree(run / "final")
    failed = run_limited("train", str(cfg), f"run_dir={run}", "--resume", max_file_bytes=300_000)
    assert error_line(failed) == f"dpokit: error: cannot write model folder {run / 'final'}: File too large"
    assert not (run / "final").exists() and staged(run) == []
    assert verify_checkpoint(run / "checkpoints" / "step-4") is None


def test_metrics_over_the_size_limit_and_a_read_only_reference_store_end_with_one_line(tmp_path):
    cfg = make_config(tmp_path, MODEL, max_steps=20, save_every=None)
    run = tmp_path / "metrics"
    # config.yaml (~2 kB) and data_report.json fit; metrics.jsonl (~0.5 kB a step) outgrows 4 kB.
    failed = run_limited("train", str(cfg), f"run_dir={run}", max_file_bytes=4096)
    metrics = run / "metrics.jsonl"
    assert error_line(failed) == f"dpokit: error: cannot write metrics {metrics}: File too large"
    assert not (run / "checkpoints").exists() and not (run / "final").exists()

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        failed = run_limited("train", str(cfg), f"run_dir={tmp_path / 'store'}", "reference.mode=store",
                             f"reference.store_dir={read_only / 'refstore'}", read_only=True)
    except subprocess.SubprocessError as exc:  # root without CAP_SETPCAP cannot give up its override
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here: {exc}")
    finally:
        read_only.chmod(0o755)
    line = error_line(failed)
    assert line.startswith(f"dpokit: error: cannot write reference store {read_only / 'refstore'}/")
    assert line.endswith(": Permission denied")
