"""``dpokit plan``: will a DPO run fit on these GPUs, before any download or crash?

``plan(config, gpu_memory=..., gpus=..., nodes=...)`` reads only the model's ``config.json`` (``shapes``),
resolves the run's settings as a GPU run would (``precision: auto`` is bf16 there), and returns a ``Plan``:
per-rank peak memory by part (``memory``), host RAM while loading (and while training, offloaded), FLOPs per
step, a verdict against the GPU's memory and the smallest change the config can express that makes the run
fit (``advice``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dpokit.config import Config, load_config
from dpokit.errors import ConfigError
from dpokit.models.hardware import PRECISION_ENV
from dpokit.models.logprobs import DEFAULT_CHUNK
from dpokit.plan.memory import (
    GiB,
    Memory,
    Setup,
    flops_per_step,
    host_ram_per_rank,
    host_ram_training,
    memory,
    trainable,
)
from dpokit.plan.shapes import Shape, find_shape

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""What ``target_modules: all-linear`` adapts in a decoder layer (peft leaves the output head out)."""


@dataclass(frozen=True)
class Plan:
    """A run's memory and compute per rank, in bytes and FLOPs, with the verdict for ``gpu_memory``."""

    model: str
    source: str
    """Where the shape came from: a config.json, the Hugging Face cache, the built-in table."""
    params: int
    trainable_params: int
    setup: Setup
    memory: Memory
    host_ram_per_rank: float
    host_ram_per_node: float
    host_ram_training: float
    """Per rank, what ``distributed.offload: params`` keeps in host memory while training (0 without offload)."""
    tokens_per_step: int
    flops: dict[str, float]
    gpus: int
    nodes: int
    gpu_memory: float
    usable: float
    verdict: str
    """``fits``, ``tight`` (within the last 10% of usable memory) or ``does not fit``."""
    suggestion: dict[str, Any] | None = None
    """The smallest change that fits: ``{"overrides": [...], "gpus": n, "nodes": m, "peak": bytes}``, with an
    alternative under ``"or"`` when there is one."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_setup(cfg: Config, world: int) -> Setup:
    """The memory-relevant settings of ``cfg`` on ``world`` GPU ranks: ``auto`` precision is bf16 on a GPU (or
    what ``DPOKIT_PRECISION`` pins) and
    ``auto`` attention is FlexAttention for the packed layout (SDPA for padded), as ``dpokit.models.hardware`` picks
    on CUDA; tokens per pass at full length (every pair prompt + response = ``data.max_length``, the worst
    case of a short prompt and two long responses)."""
    train, data = cfg.train, cfg.data
    precision = train.precision
    if precision == "auto":  # on every device what DPOKIT_PRECISION pins, else bf16: native on current GPUs
        precision = os.environ.get(PRECISION_ENV) or "bf16"
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"{PRECISION_ENV}: expected fp32 or bf16, got {precision!r}")
    attention = cfg.model.attn_implementation
    if attention == "auto":
        attention = "flex_attention" if train.layout == "packed" else "sdpa"
    pair = 2 * data.max_length
    micro = train.batch_size * pair
    tokens = min(micro, max(train.pass_tokens, pair)) if train.pass_tokens else micro
    row = max(train.pack_length, pair) if train.layout == "packed" else data.max_length
    lora = cfg.model.lora
    targets = LORA_TARGETS if lora is None or lora.target_modules == "all-linear" else tuple(
        [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules)
    offload = cfg.distributed.offload == "params"  # FSDP under torchrun, even of one process
    return Setup(dtype=cfg.model.dtype, precision=precision,
                 strategy=cfg.distributed.strategy if world > 1 or offload else "single", world=world,
                 optimizer=train.optimizer, reference=cfg.reference.mode, lora_r=lora.r if lora else None,
                 lora_targets=targets, quantize=cfg.model.quantize,
                 checkpointing=train.gradient_checkpointing, attention=attention,
                 layout=train.layout, pass_tokens=tokens, row_length=min(row, tokens),
                 passes_per_step=train.grad_accum * math.ceil(micro / tokens), chunk=DEFAULT_CHUNK,
                 offload=offload)


def usable_memory(gpu_memory: float) -> float:
    """What a training process can allocate of a GPU: 1 GiB less for the CUDA context and kernels (about
    0.5-1 GiB on current drivers)."""
    return gpu_memory - GiB


def verdict(peak: float, usable: float) -> str:
    """``tight`` leaves room for the caching allocator's fragmentation, typically a few to 10% of the peak."""
    if peak <= 0.9 * usable:
        return "fits"
    return "tight" if peak <= usable else "does not fit"


def plan_for(cfg: Config, shape: Shape, source: str, *, gpu_memory: float, gpus: int, nodes: int) -> Plan:
    """The plan of one config on ``gpus`` x ``nodes`` GPUs, without suggestions."""
    world = gpus * nodes
    setup = resolve_setup(cfg, world)
    mem = memory(shape, setup)
    pairs = cfg.train.batch_size * cfg.train.grad_accum * world
    tokens = pairs * 2 * cfg.data.max_length
    host = host_ram_per_rank(shape, setup)
    usable = usable_memory(gpu_memory)
    return Plan(model=shape.name, source=source, params=shape.params(), trainable_params=trainable(shape, setup)[0],
                setup=setup, memory=mem, host_ram_per_rank=host, host_ram_per_node=host * gpus,
                host_ram_training=host_ram_training(shape, setup),
                tokens_per_step=tokens, flops=flops_per_step(shape, setup, tokens, cfg.data.max_length),
                gpus=gpus, nodes=nodes, gpu_memory=gpu_memory, usable=usable, verdict=verdict(mem.peak, usable))


def plan(config: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | None = None, *,
         gpu_memory: float | str = 80 * GiB, gpus: int = 1, nodes: int = 1) -> Plan:
    """Plan ``config`` (a path, a dict or a Config, with ``key=value`` overrides) for ``gpus`` GPUs on each of
    ``nodes`` nodes with ``gpu_memory`` each (bytes, or a size such as ``"80GB"``). A run that does not fit gets
    the smallest change that does."""
    from dpokit.plan.advice import parse_size, suggest

    if isinstance(gpu_memory, str):
        gpu_memory = parse_size(gpu_memory)
    if gpus < 1 or nodes < 1:
        raise ConfigError(f"--gpus/--nodes: expected at least 1 (got {gpus} GPUs, {nodes} nodes)")
    cfg = load_config(config, overrides)
    shape, source = find_shape(cfg.model.name_or_path, cfg.model.revision, cfg.model.gguf_file)
    result = plan_for(cfg, shape, source, gpu_memory=gpu_memory, gpus=gpus, nodes=nodes)
    if result.verdict == "fits":
        return result
    return replace(result, suggestion=suggest(cfg, shape, source, result))


__all__ = ["GiB", "Plan", "Setup", "plan", "plan_for", "resolve_setup"]
