"""``precision: auto`` and ``attn_implementation: auto``: chosen from the device's capability, confirmed by a
measured probe, cached per machine, recorded in the run; ``dpokit env`` shows it all."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dpokit.models import hardware
from dpokit.models.hardware import Probe, choose_attention, choose_precision

CPU = torch.device("cpu")


def _probe(fp32: float, bf16: float) -> Probe:
    return Probe(device="cpu", fp32_gflops=fp32, bf16_gflops=bf16, size=512, threads=1)


def _never(device):
    raise AssertionError("the probe must not run here")


@pytest.fixture(autouse=True)
def real_auto(monkeypatch):
    """The suite pins auto to fp32 (conftest); these tests are about auto itself."""
    monkeypatch.delenv("DPOKIT_PRECISION", raising=False)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU whose flags claim AVX512_BF16 (what the capability check reads)."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f"})


def test_auto_is_fp32_without_native_bf16_and_does_not_probe(plain_cpu):
    choice = choose_precision("auto", CPU, probe=_never)
    assert choice.value == "fp32" and "lacks AVX512_BF16 and AMX" in choice.why


def test_auto_is_bf16_on_a_native_cpu_only_when_the_probe_confirms_it(bf16_cpu):
    fast = choose_precision("auto", CPU, probe=lambda d: _probe(100.0, 300.0))
    assert fast.value == "bf16" and "avx512_bf16" in fast.why and "3.00x fp32" in fast.why
    # The flags say native, the kernels say otherwise (e.g. ONEDNN_MAX_CPU_ISA=AVX2): the measurement wins.
    slow = choose_precision("auto", CPU, probe=lambda d: _probe(100.0, 1.0))
    assert slow.value == "fp32" and "100x slower than fp32" in slow.why
    # The threshold itself: just under it is fp32, at it is bf16.
    edge = hardware.BF16_MIN_SPEEDUP
    assert choose_precision("auto", CPU, probe=lambda d: _probe(100.0, 100.0 * edge * 0.99)).value == "fp32"
    assert choose_precision("auto", CPU, probe=lambda d: _probe(100.0, 100.0 * edge)).value == "bf16"


def test_explicit_settings_are_kept_and_slow_bf16_warns_with_the_measured_ratio(bf16_cpu):
    warnings = []
    assert choose_precision("fp32", CPU, probe=_never, warn=warnings.append).value == "fp32"
    assert choose_precision("bf16", CPU, probe=lambda d: _probe(80.0, 0.3), warn=warnings.append).value == "bf16"
    assert len(warnings) == 1
    assert "0.3 against 80.0 GFLOP/s" in warnings[0] and "267x slower" in warnings[0]
    choose_precision("bf16", CPU, probe=lambda d: _probe(80.0, 240.0), warn=warnings.append)
    assert len(warnings) == 1  # fast bf16: nothing to warn about


def test_probe_is_cached_per_machine_and_kernel_limits(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    calls = []

    def fake_measure(device, size=None, seconds=0.2):
        calls.append(dict(os.environ).get("ONEDNN_MAX_CPU_ISA"))
        return _probe(100.0, 50.0)

    monkeypatch.setattr(hardware, "measure", fake_measure)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    first = hardware.cached_probe(CPU)
    assert hardware.cached_probe(CPU) == first and len(calls) == 1
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # other kernels: another machine as far as speed goes
    hardware.cached_probe(CPU)
    assert calls == [None, "AVX2"]
    path = hardware.probe_path(CPU)
    path.write_text("{not json")  # damaged: measured again and replaced
    assert hardware.cached_probe(CPU) == first and len(calls) == 3
    assert json.loads(path.read_text())["fp32_gflops"] == 100.0


def test_real_probe_measures_both_dtypes():
    probe = hardware.measure(CPU, size=64, seconds=0.01)
    assert probe.fp32_gflops > 0 and probe.bf16_gflops > 0 and probe.size == 64


def test_a_bf16_cpu_limited_to_avx2_kernels_gets_fp32_from_the_measured_probe(tmp_path):
    """What an AVX2-only CPU sees, made real on any x86 CPU: flags that claim AVX512_BF16, kernels capped at
    AVX2, where bf16 matrix products are emulated (measured 100x-250x slower than fp32). The real probe, not
    the flags, must send the run to fp32."""
    code = ("import torch\nfrom dpokit.models import hardware\n"
            "hardware.cpu_flags = lambda: {'avx2', 'avx512_bf16'}\n"
            "c = hardware.choose_precision('auto', torch.device('cpu'))\n"
            "p = hardware.cached_probe(torch.device('cpu'))\n"
            "print(c.value, round(p.bf16_speedup, 3), c.why)\n")
    env = {**os.environ, "DPOKIT_PRECISION": "", "DPOKIT_CACHE": str(tmp_path), "ATEN_CPU_CAPABILITY": "avx2",
           "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    value, speedup, why = out.stdout.split(" ", 2)
    assert value == "fp32" and float(speedup) < hardware.BF16_MIN_SPEEDUP and "measured" in why


def test_attention_auto_picks_the_faster_measured_kernel_and_flex_for_packed_on_cuda(monkeypatch):
    assert choose_attention("auto", "bf16", CPU, times=lambda p, d: {"sdpa": 2.0, "eager": 0.5}).value == "eager"
    assert choose_attention("auto", "fp32", CPU, times=lambda p, d: {"sdpa": 0.5, "eager": 0.7}).value == "sdpa"
    assert choose_attention("eager", "fp32", CPU, times=_never).value == "eager"
    import dpokit.models.attention

    cuda = torch.device("cuda")
    monkeypatch.setattr(dpokit.models.attention, "flex_attention_supported", lambda device: True)
    assert choose_attention("auto", "bf16", cuda, "packed", times=_never).value == "flex_attention"
    assert choose_attention("auto", "bf16", cuda, "padded", times=_never).value == "sdpa"
    monkeypatch.setattr(dpokit.models.attention, "flex_attention_supported", lambda device: False)
    assert choose_attention("auto", "bf16", cuda, "packed", times=_never).value == "sdpa"


def test_attention_times_are_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    times = hardware.cached_attention_times("fp32", CPU)
    assert set(times) == {"sdpa", "eager"} and all(t > 0 for t in times.values())
    monkeypatch.setattr(hardware, "_attention_time", _never)
    assert hardware.cached_attention_times("fp32", CPU) == times


def test_a_run_records_what_auto_resolved_to_and_says_so(tmp_path, monkeypatch, capsys, plain_cpu, root):
    import yaml

    import dpokit

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cached_attention_times", lambda p, d: {"sdpa": 1.0, "eager": 2.0})
    run = dpokit.train(str(root / "configs/tiny.yaml"), run_dir=str(tmp_path / "run"), train__max_steps=1,
                       train__progress=False, eval__every=None, data__eval=None)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["precision"] == "fp32" and saved["model"]["attn_implementation"] == "sdpa"
    err = capsys.readouterr().err
    assert "precision auto -> fp32 (CPU lacks AVX512_BF16 and AMX" in err
    assert "attn_implementation auto -> sdpa (measured 2.00x faster" in err


def test_explicit_bf16_on_a_slow_cpu_trains_with_one_warning(tmp_path, monkeypatch, capsys, bf16_cpu, root):
    import dpokit

    monkeypatch.setattr(hardware, "cached_probe", lambda device, refresh=False: _probe(80.0, 0.3))
    run = dpokit.train(str(root / "configs/tiny.yaml"), run_dir=str(tmp_path / "run"), train__max_steps=1,
                       train__progress=False, train__precision="bf16", eval__every=None, data__eval=None,
                       model__attn_implementation="sdpa")
    err = capsys.readouterr().err
    assert err.count("precision bf16 asked for, but bf16 is slow on this CPU") == 1
    assert (run / "final" / "config.json").is_file()


def test_recipe_resolves_its_precisions_before_any_cache_key(plain_cpu):
    from dpokit.recipes.sentiment import load_recipe_config, resolve_precisions

    cfg = load_recipe_config("demo", ["dpo.train={precision: auto}"])
    assert cfg.sampling.precision == "auto" and cfg.train.precision == "auto"
    resolve_precisions(cfg)
    assert (cfg.sampling.precision, cfg.train.precision, cfg.dpo.train["precision"]) == ("fp32",) * 3


def test_dpokit_env_prints_versions_speeds_and_choices(tmp_path):
    env = {**os.environ, "DPOKIT_CACHE": str(tmp_path), "DPOKIT_PRECISION": ""}
    text = subprocess.run([sys.executable, "-m", "dpokit", "env"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("dpokit ") and f"torch {torch.__version__}" in lines[0]
    assert any(line.startswith("matmul on cpu") and "fp32" in line and "bf16" in line for line in lines)
    assert any(line.startswith("auto precision: ") for line in lines)
    assert any(line.startswith("auto attn_implementation: ") for line in lines)
    as_json = subprocess.run([sys.executable, "-m", "dpokit", "env", "--json"], env=env, capture_output=True,
                             text=True, timeout=300)
    info = json.loads(as_json.stdout)
    assert info["auto"]["precision"]["value"] in ("fp32", "bf16")
    assert info["matmul_gflops"]["fp32"] > 0 and info["versions"]["torch"] == torch.__version__


def test_precision_env_pins_auto_and_a_bad_value_is_one_clear_error(monkeypatch, bf16_cpu):
    from dpokit.errors import ConfigError

    monkeypatch.setenv("DPOKIT_PRECISION", "fp32")
    assert choose_precision("auto", CPU, probe=_never).value == "fp32"
    assert choose_precision("bf16", CPU, probe=lambda d: _probe(1.0, 3.0)).value == "bf16"  # explicit wins
    monkeypatch.setenv("DPOKIT_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="DPOKIT_PRECISION: expected fp32 or bf16"):
        choose_precision("auto", CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_a_run_resolved_to_flex_attention_on_a_gpu_loads_with_sdpa_without_one(tiny_tok):
    from dpokit.models.loading import load_model, resolve

    model = load_model(resolve("tiny-random-llama"), attn_implementation="flex_attention", vocab_size=len(tiny_tok))
    assert model.config._attn_implementation == "sdpa"


VNNI = "pack_vnni2 is only supported when avx512 is supported"
"""What PyTorch's fused CPU attention raised in bf16 on an AMX CPU under ATEN_CPU_CAPABILITY=default."""


def _failing(kinds):
    """``_attention_time`` where the kernels in ``kinds`` raise as the fused kernel did, the others measure."""
    real = hardware._attention_time

    def timed(kind, precision, device, *args, **kwargs):
        if kind in kinds:
            raise RuntimeError(VNNI)
        return real(kind, precision, device, *args, **kwargs)

    return timed


def test_an_attention_kernel_that_raises_is_not_a_candidate(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_attention_time", _failing({"sdpa"}))
    choice = choose_attention("auto", "bf16", CPU)
    assert choice.value == "eager" and f"sdpa: RuntimeError: {VNNI}" in choice.why
    monkeypatch.setattr(hardware, "_attention_time", _never)  # the failure is cached with the times
    assert choose_attention("auto", "bf16", CPU).value == "eager"


def test_no_attention_kernel_in_bf16_is_one_line_naming_fp32_and_auto_avoids_bf16(tmp_path, monkeypatch, capsys,
                                                                                  bf16_cpu, root):
    import dpokit
    from dpokit.errors import ConfigError

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cached_probe", lambda device, refresh=False: _probe(80.0, 240.0))
    monkeypatch.setattr(hardware, "_attention_time",
                        lambda kind, precision, device: _failing({"sdpa", "eager"})(kind, precision, device)
                        if precision == "bf16" else 0.01)
    with pytest.raises(ConfigError) as error:
        choose_attention("auto", "bf16", CPU)
    line = str(error.value)
    assert "\n" not in line and "no attention implementation runs in bf16" in line
    assert "set train.precision: fp32" in line and VNNI in line
    # auto does not pick a precision the kernels cannot run: fp32, saying why
    choice = choose_precision("auto", CPU)
    assert choice.value == "fp32" and "no attention implementation runs in bf16" in choice.why
    run = dpokit.train(str(root / "configs/tiny.yaml"), run_dir=str(tmp_path / "run"), train__max_steps=1,
                       train__progress=False, eval__every=None, data__eval=None)
    assert (run / "final" / "config.json").is_file()
    assert "precision auto -> fp32 (CPU has avx512_bf16, but no attention implementation runs in bf16" in (
        capsys.readouterr().err)


FREED = """
import sys, torch
from dpokit.models.hardware import return_freed_memory
def rss():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))
applied = return_freed_memory() if sys.argv[1] == "set" else None
big = torch.ones(24 * 2**20 // 4)  # freeing a 24 MiB block (mmapped) raises the threshold to 24 MiB
del big
keep = torch.ones(1024)  # something after it on the heap, so a freed block below is not simply trimmed
block = torch.ones(16 * 2**20 // 4)
tail = torch.ones(1024)
before = rss()
del block
print(applied, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ,
                    reason="glibc's allocator on Linux")
def test_freed_tensors_go_back_to_the_system_once_glibc_is_told(tmp_path):
    """A fresh process each time (glibc's thresholds move with what the process did before). With glibc's
    default a freed 16 MiB tensor stays resident once a larger block was freed; with ``return_freed_memory``
    it is returned at once (16 MiB; a page of slack)."""
    def freed(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FREED, mode], capture_output=True, text=True, check=True)
        applied, returned = out.stdout.split()
        return applied, int(returned)

    applied, returned = freed("set")
    assert applied == "True" and returned >= 16 * 2**20 - 4096
    _, kept = freed("default")
    assert kept < 2**20
