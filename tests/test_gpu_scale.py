"""benchmarks/gpu_scale.py: its self-test runs every row's logic (the random-weight folder writer, the FLOP count by
hand, the planner's prediction, dpokit's run and TRL's where it imports) on CPU with a tiny Llama; without a GPU
and without --self-test it refuses in one line."""

import json
import subprocess
import sys

import pytest
import torch


def _run(root, *args, timeout=600):
    return subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_scale.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_self_test_runs_every_row_and_writes_the_table(root, tmp_path):
    out = tmp_path / "figures.json"
    proc = _run(root, "--self-test", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == 0
    values = {f["name"]: f["value"] for f in report["figures"]}
    rows = ("1B full DPO", "8B LoRA", "8B QLoRA", "3B full DPO, checkpointing", "8B full DPO, FSDP2 offload")
    for row in rows:  # every row trained and was measured against its FLOPs and the planner
        assert float(values[f"{row}: dpokit tokens/s"]) > 0, row
        assert 0 < float(values[f"{row}: dpokit MFU"]) < 1, row
        assert float(values[f"{row}: dpokit plan peak, GiB"]) > 0, row
    try:
        import trl  # noqa: F401
    except ImportError:
        assert not any(name.startswith("1B full DPO: TRL tokens/s") for name in values)
    else:
        assert float(values["1B full DPO: dpokit / TRL tokens/s"]) > 0
        assert float(values["8B LoRA: dpokit / TRL tokens/s"]) > 0
    assert values["random folder: loads with transformers, planner's parameter count, sharded"] == "yes"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run the real benchmark")
def test_without_a_gpu_it_says_so_in_one_line_and_fails(root):
    proc = _run(root, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--self-test" in lines[0]


def test_only_names_a_row_or_says_which_exist(root):
    proc = _run(root, "--self-test", "--only", "70B", timeout=120)
    assert proc.returncode == 2 and "names no row" in proc.stdout and "8B QLoRA" in proc.stdout
