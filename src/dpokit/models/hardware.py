"""What this machine computes fast, decided from its capability and confirmed by measurement.

``precision: auto`` and ``attn_implementation: auto`` resolve here, the same way for training, sampling and
serving. bf16 is chosen only where it is native: a CUDA device that supports it, or a CPU with AVX512_BF16 or
AMX. A CPU without them runs bf16 matrix products in emulation (measured: 0.3 GFLOP/s against 80 in fp32 on
an AVX2 CPU; 62 against 267 on an AVX-512 CPU without BF16), so a capable-looking CPU is also confirmed by a
short bf16-vs-fp32 matmul probe, cached per machine: kernel limits set by ``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA`` or ``MKL_ENABLE_INSTRUCTIONS`` make a bf16-capable CPU emulate too, and the probe sees
it. Kernel limits can also make a kernel raise (PyTorch's fused CPU attention in bf16 on an AMX CPU under
``ATEN_CPU_CAPABILITY=default``): an attention implementation that raises is no candidate, and ``auto`` does
not pick bf16 where none runs in it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dpokit.errors import ConfigError
from dpokit.io import read_json, write_json

PROBE_VERSION = 1
"""Bump when the probe's method changes, so cached figures from the old one are not reused."""

BF16_MIN_SPEEDUP = 1.5
"""bf16 must multiply fp32's matmul throughput by at least this to be chosen. A step is only partly matrix
products: on SmolLM2 a 2.5x faster bf16 matmul gave a 1.5x faster step (about 56% of the step's time in
matmuls); at 1.5x the same share predicts a step about 1.2x faster, below that the conversions autocast adds
can eat the gain."""

KERNEL_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that cap the CPU instruction set PyTorch's kernels use."""

PRECISION_ENV = "DPOKIT_PRECISION"
"""When set (fp32 or bf16), what ``auto`` resolves to on every device: one precision for runs that must match
across machines (the test suite sets fp32, so its verdicts do not depend on the CPU)."""

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass
class Probe:
    """Measured matmul throughput of one device (GFLOP/s) and how it was measured."""

    device: str
    fp32_gflops: float
    bf16_gflops: float
    size: int
    threads: int

    @property
    def bf16_speedup(self) -> float:
        return self.bf16_gflops / self.fp32_gflops if self.fp32_gflops > 0 else 0.0


@dataclass
class Choice:
    """A resolved ``auto`` setting and the reason, one line for a person."""

    value: str
    why: str


# ---------------------------------------------------------------------------------------------- what the CPU has

def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of Linux's ``/proc/cpuinfo`` (None elsewhere, or when absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return line.partition(":")[2].strip()
    return None


def cpu_flags() -> set[str]:
    """Instruction-set flags of the CPU (Linux; empty elsewhere)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def kernel_limits() -> dict[str, str]:
    """The kernel-limiting variables that are set, e.g. ``{"ATEN_CPU_CAPABILITY": "avx2"}``."""
    return {k: os.environ[k] for k in KERNEL_LIMITS if os.environ.get(k)}


def bf16_capability(device: torch.device) -> tuple[bool, str]:
    """Whether the device has native bf16 arithmetic, and what says so."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    if device.type != "cpu":
        return False, f"{device.type}: bf16 not known to be fast"
    native = sorted(NATIVE_BF16_FLAGS & cpu_flags())
    if native:
        return True, f"CPU has {'+'.join(native)}"
    return False, f"CPU lacks AVX512_BF16 and AMX (capability {torch.backends.cpu.get_cpu_capability()})"


# ------------------------------------------------------------------------------------------------------ probe

def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Throughput of (size x size) @ (size x size) in dtype: the best of repeated timings, at least 3 and
    for at least ``seconds`` (the best, not the mean: other work on the machine only ever slows a run)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: first calls pick and initialize kernels
    sync()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or spent < seconds:
        start = time.perf_counter()
        a @ b
        sync()
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
        if spent > 10 * seconds:  # an emulated dtype: a few timings are plenty
            break
    return 2 * size**3 / best / 1e9


def measure(device: torch.device, size: int | None = None, seconds: float = 0.2) -> Probe:
    """Measure fp32 and bf16 matmul throughput on ``device`` now (about a second on a CPU)."""
    size = size or (4096 if device.type == "cuda" else 512)
    return Probe(device=str(device), fp32_gflops=matmul_gflops(device, torch.float32, size, seconds),
                 bf16_gflops=matmul_gflops(device, torch.bfloat16, size, seconds), size=size,
                 threads=torch.get_num_threads())


def machine_key(device: torch.device) -> str:
    """What the probe's figures depend on: the device model, PyTorch, threads and kernel limits."""
    if device.type == "cuda":
        what = [torch.cuda.get_device_name(device), torch.version.cuda or ""]
    else:
        what = [cpu_name(), platform.machine(), str(sorted(NATIVE_BF16_FLAGS & cpu_flags())),
                json.dumps(kernel_limits(), sort_keys=True), str(torch.get_num_threads())]
    what += [torch.__version__, str(PROBE_VERSION)]
    return hashlib.sha256("|".join(what).encode()).hexdigest()[:16]


def probe_path(device: torch.device) -> Path:
    from dpokit.models.loading import cache_dir

    return cache_dir() / "hardware" / f"{device.type}-{machine_key(device)}.json"


def cached_probe(device: torch.device, refresh: bool = False) -> Probe:
    """The probe of this machine: read from the cache, or measured once and cached (written atomically, so
    two processes probing at once leave one whole file)."""
    path = probe_path(device)
    cached = None if refresh else read_json(path)
    if isinstance(cached, dict) and set(cached) == {f.name for f in fields(Probe)}:
        return Probe(**cached)
    probe = measure(device)  # none cached yet, or a damaged file: measured again and replaced
    write_json(path, asdict(probe))
    return probe


# ----------------------------------------------------------------------------------------------------- choices

def choose_precision(requested: str, device: torch.device, probe: Callable[[torch.device], Probe] | None = None,
                     warn: Callable[[str], None] | None = None,
                     attention: Callable[[str, torch.device], dict[str, float | str]] | None = None) -> Choice:
    """``auto`` resolved to ``bf16`` or ``fp32`` for ``device``, with the reason. An explicit ``bf16`` where it
    is slow stays ``bf16`` (asked for is asked for) and ``warn`` is told the measured ratio once. ``probe``
    measures the device (default: the cached probe); ``attention`` times the attention implementations on a
    CPU (default: the cached times), since bf16 is no choice where none of them runs in it."""
    probe, attention = probe or cached_probe, attention or cached_attention_times
    if requested == "auto" and os.environ.get(PRECISION_ENV):
        forced = os.environ[PRECISION_ENV]
        if forced not in ("fp32", "bf16"):
            raise ConfigError(f"{PRECISION_ENV}: expected fp32 or bf16, got {forced!r}")
        return Choice(forced, f"{PRECISION_ENV}={forced}")
    capable, why = bf16_capability(device)
    if requested == "fp32":
        return Choice("fp32", "asked for")
    if requested == "bf16":
        if device.type == "cuda" and not capable and warn is not None:
            warn(f"precision bf16 asked for, but {why}; 'auto' would pick fp32")
        if device.type == "cpu":
            measured = probe(device)
            if measured.bf16_speedup < BF16_MIN_SPEEDUP and warn is not None:
                warn(f"precision bf16 asked for, but bf16 is slow on this CPU: {measured.bf16_gflops:.1f} against "
                     f"{measured.fp32_gflops:.1f} GFLOP/s in fp32 ({_ratio(measured)}); 'auto' would pick fp32")
        return Choice("bf16", "asked for")
    if not capable:
        return Choice("fp32", why)
    measured = probe(device)
    if measured.bf16_speedup >= BF16_MIN_SPEEDUP:
        failure = attention_failure("bf16", attention("bf16", device)) if device.type == "cpu" else None
        if failure is not None:
            return Choice("fp32", f"{why}, but {failure}")
        return Choice("bf16", f"{why}; bf16 matmul {_ratio(measured)}")
    return Choice("fp32", f"{why}, but bf16 matmul measured {_ratio(measured)} (needs >= {BF16_MIN_SPEEDUP}x)")


def _ratio(p: Probe) -> str:
    r = p.bf16_speedup
    return f"{r:.2f}x fp32" if r >= 1 else f"{1 / r:.0f}x slower than fp32"


def resolve_precision(requested: str, device: torch.device, note: Callable[[str], None] | None = None) -> str:
    """``choose_precision`` for callers that only need the value; ``note`` gets one line with the choice."""
    choice = choose_precision(requested, device, warn=(lambda m: note(f"warning: {m}")) if note else None)
    if note is not None and requested == "auto":
        note(f"precision auto -> {choice.value} ({choice.why})")
    return choice.value


def _attention_time(kind: str, precision: str, device: torch.device, length: int = 256, repeats: int = 3) -> float:
    """Seconds of one forward+backward of attention over a packed-style 4D boolean mask, by ``kind``: the
    fused kernel (``sdpa``) or the plain matmul-softmax-matmul (``eager``). Shapes are SmolLM2's heads
    (9 x 64) over two rows of ``length`` positions; the best of ``repeats``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, 9, length, 64, generator=gen).to(device).requires_grad_() for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None].expand(2, 1, -1, -1)

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if kind == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                # As transformers' eager attention: scores in the compute dtype, softmax in fp32.
                scores = (q @ k.transpose(-1, -2)) / 8.0
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
                out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype) @ v
        out.float().sum().backward()

    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _attention_time_or_error(kind: str, precision: str, device: torch.device) -> float | str:
    """``_attention_time``, or the first line of what the kernel raised: an implementation that cannot run here
    is no candidate (PyTorch's fused CPU attention raised "pack_vnni2 is only supported when avx512 is
    supported" in bf16 on an AMX CPU under ``ATEN_CPU_CAPABILITY=default``)."""
    try:
        return _attention_time(kind, precision, device)
    except (RuntimeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def cached_attention_times(precision: str, device: torch.device) -> dict[str, float | str]:
    """``{"sdpa": s, "eager": s}`` for this machine and precision, measured once and cached beside the probe;
    an implementation that raised has its error line instead of seconds."""
    probe = probe_path(device)
    path = probe.with_name(f"{probe.stem}-attention-{precision}.json")
    cached = read_json(path)
    if isinstance(cached, dict) and set(cached) == {"sdpa", "eager"}:
        return cached
    times = {kind: _attention_time_or_error(kind, precision, device) for kind in ("sdpa", "eager")}
    write_json(path, times)
    return times


def attention_failure(precision: str, measured: dict[str, float | str]) -> str | None:
    """None when some attention implementation ran in ``precision``; otherwise what says none did, with each
    one's error."""
    if any(not isinstance(t, str) for t in measured.values()):
        return None
    errors = "; ".join(f"{kind}: {error}" for kind, error in measured.items())
    return f"no attention implementation runs in {precision} on this CPU ({errors})"


def choose_attention(requested: str, precision: str, device: torch.device, layout: str = "packed",
                     times: Callable[[str, torch.device], dict[str, float | str]] | None = None) -> Choice:
    """``auto`` resolved to an attention implementation. On CUDA: FlexAttention for the packed layout (no
    dense rows x L x L mask in GPU memory) when this PyTorch has it, SDPA otherwise. On a CPU: whichever of
    SDPA and eager attention measured faster for this precision (PyTorch's fused CPU kernel is the faster in
    fp32, but its bf16 backward was measured 4x slower than eager's on an AVX512-BF16 CPU)."""
    if requested != "auto":
        return Choice(requested, "asked for")
    if device.type == "cuda":
        from dpokit.models.attention import flex_attention_supported

        if layout == "packed" and flex_attention_supported(device):
            return Choice("flex_attention", "CUDA, packed layout: block-sparse mask instead of a dense one")
        return Choice("sdpa", "CUDA: fused attention")
    measured = (times or cached_attention_times)(precision, device)
    failure = attention_failure(precision, measured)
    if failure is not None:
        fix = "; set train.precision: fp32" if precision == "bf16" else ""
        raise ConfigError(f"model.attn_implementation: {failure}{fix}")
    runs = {kind: t for kind, t in measured.items() if not isinstance(t, str)}
    fastest = min(runs, key=runs.__getitem__)
    if len(runs) < len(measured):
        failed = "; ".join(f"{kind}: {error}" for kind, error in measured.items() if isinstance(error, str))
        return Choice(fastest, f"the only one that runs in {precision} on this CPU ({failed})")
    slower = max(runs.values()) / max(runs[fastest], 1e-12)
    return Choice(fastest, f"measured {slower:.2f}x faster than the other in {precision} on this CPU")


def describe(device: torch.device | None = None, refresh: bool = True) -> dict[str, Any]:
    """Everything ``dpokit env`` prints: versions, devices, CPU capability, measured matmul speed, and what
    ``auto`` picks and why."""
    import transformers

    from dpokit.version import __version__

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info: dict[str, Any] = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "dpokit": __version__},
        "platform": platform.platform(),
        "cpu": {"name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "capability": torch.backends.cpu.get_cpu_capability(),
                "native_bf16_flags": sorted(NATIVE_BF16_FLAGS & cpu_flags()), "kernel_limits": kernel_limits()},
        "cuda": ([{"index": i, "name": torch.cuda.get_device_name(i),
                   "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                  for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []),
        "device": str(device),
    }
    probe = cached_probe(device, refresh=refresh)
    info["matmul_gflops"] = {"fp32": round(probe.fp32_gflops, 1), "bf16": round(probe.bf16_gflops, 1),
                             "size": probe.size, "threads": probe.threads}
    precision = choose_precision("auto", device, probe=lambda d: probe)
    attention = choose_attention("auto", precision.value, device)
    info["auto"] = {"precision": asdict(precision), "attn_implementation": asdict(attention)}
    return info


def format_env(info: dict[str, Any]) -> str:
    """``describe()`` as the lines ``dpokit env`` prints."""
    v, cpu, mm, auto = info["versions"], info["cpu"], info["matmul_gflops"], info["auto"]
    lines = [f"dpokit {v['dpokit']}, torch {v['torch']}, transformers {v['transformers']}, python {v['python']}",
             f"platform: {info['platform']}",
             f"cpu: {cpu['name']} ({cpu['cores']} cores, torch threads {cpu['torch_threads']}), capability "
             f"{cpu['capability']}, native bf16: {'+'.join(cpu['native_bf16_flags']) or 'no'}"]
    if cpu["kernel_limits"]:
        lines.append("kernel limits: " + " ".join(f"{k}={x}" for k, x in cpu["kernel_limits"].items()))
    for gpu in info["cuda"]:
        lines.append(f"cuda:{gpu['index']}: {gpu['name']} ({gpu['memory_gib']} GiB)")
    if not info["cuda"]:
        lines.append("cuda: none")
    lines.append(f"matmul on {info['device']} ({mm['size']}x{mm['size']}, {mm['threads']} threads): "
                 f"fp32 {mm['fp32']:.1f} GFLOP/s, bf16 {mm['bf16']:.1f} GFLOP/s")
    for key in ("precision", "attn_implementation"):
        lines.append(f"auto {key}: {auto[key]['value']} ({auto[key]['why']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ host memory

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (malloc.h)."""
MMAP_THRESHOLD = 128 * 1024


def return_freed_memory() -> bool:
    """Have glibc give every freed block of 128 KiB or more (any tensor of 32 K fp32 values) back to the system
    at once. glibc starts there too, but raises that threshold (up to 32 MiB) to the size of each larger
    mapped block the process frees; the tensors below it (an FSDP rank's shards, a layer's gradients and
    activations) then come from its heap, where freed memory stays resident and fragments, so a process's peak
    RSS grows by what the heap kept. Measured on 2 FSDP ranks of a model of Qwen2.5-0.5B's shape: 7.4-7.8 GiB
    per rank with glibc's default, 6.3 GiB with this (one process: 10.8 and 10.1 GiB), at the same speed within
    the machine's noise (``benchmarks/RESULTS.md``). Linux with glibc only, and not when ``MALLOC_MMAP_THRESHOLD_`` is set (the
    user's choice stands). Returns whether it was applied."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
