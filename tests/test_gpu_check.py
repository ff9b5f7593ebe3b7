"""benchmarks/gpu_check.py: its self-test (the equivalence checks, MFU arithmetic, table writer and skip logic on
CPU with a tiny model) passes, and without a GPU it refuses in one line."""

import subprocess
import sys

import pytest
import torch


def _run(root, *args, timeout=300):
    return subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_self_test_passes_and_writes_the_table(root, tmp_path):
    out = tmp_path / "figures.json"
    proc = _run(root, "--self-test", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    report = json.loads(out.read_text())
    statuses = {f["name"]: f["status"] for f in report["figures"]}
    assert report["failed"] == 0
    assert statuses["FSDP 2 processes == 1 process (step 1)"] == "skip"  # no GPU here
    assert any(name.startswith("packed == padded") and status == "pass" for name, status in statuses.items())
    assert any(name.startswith("dpokit (bf16") and name.endswith("MFU") for name in statuses)
    assert "| section | figure | value | bound | status | note |" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run the real check")
def test_without_a_gpu_it_says_so_in_one_line_and_fails(root):
    proc = _run(root, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--self-test" in lines[0]
