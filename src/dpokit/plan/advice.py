"""The smallest change that makes a run fit, and the plan as text.

Changes are tried in order of how much they change: first on the same GPUs the settings that leave the result
as it is (``train.gradient_checkpointing``, ``reference.mode: store``, a smaller ``train.pass_tokens``), then
LoRA (it trains adapters instead of every weight); separately, the fewest GPUs that fit full fine-tuning with
FSDP. Every candidate is validated as a config first, so a suggestion is always one ``dpokit train`` accepts.
4-bit base weights and CPU offload are not in dpokit yet: they are shown apart, marked so, when nothing
available fits on the given GPUs.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any

from dpokit.config import Config, load_config
from dpokit.errors import ConfigError, DpokitError
from dpokit.plan import Plan, plan_for
from dpokit.plan.memory import DTYPE_BYTES, GiB, regime
from dpokit.plan.shapes import Shape

_UNITS = {"": GiB, "k": 2 ** 10, "m": 2 ** 20, "g": GiB, "t": 2 ** 40}
NF4_BYTES = (4 + 0.127) / 8
"""4-bit NF4 weights plus their block scales (one per 64 weights, themselves quantized to 8 bits: QLoRA's double
quantization, 0.127 bits a weight): about 0.516 bytes a parameter."""


def parse_size(text: str, what: str = "--gpu-memory") -> float:
    """``80GB``, ``80GiB``, ``24G``, ``80`` (GiB), ``40960MB`` -> bytes. GPU memory follows the vendors' labels:
    an "80 GB" card holds 80 GiB, so GB and GiB both mean powers of two."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{what}: '{text}' is not a memory size (e.g. 80GB, 24GiB, 40960MB)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _with(cfg: Config, overrides: list[str]) -> Config | None:
    """``cfg`` with ``overrides``, or None when the config refuses the combination."""
    try:
        return load_config(cfg, overrides)
    except DpokitError:
        return None


def _passes(cfg: Config) -> list[list[str]]:
    """Smaller ``train.pass_tokens``, largest first, down to one pair at full length a pass."""
    pair = 2 * cfg.data.max_length
    current = min(cfg.train.pass_tokens or cfg.train.batch_size * pair, cfg.train.batch_size * pair)
    return [[f"train.pass_tokens={pair * 2 ** k}"] for k in reversed(range(12)) if pair * 2 ** k < current]


def neutral_changes(cfg: Config) -> Iterator[list[str]]:
    """Result-neutral changes on the same GPUs: checkpointing, the reference store, smaller passes, and
    their combinations, fewest first."""
    neutral: list[list[str]] = []
    if not cfg.train.gradient_checkpointing:
        neutral.append(["train.gradient_checkpointing=true"])
    if cfg.reference.mode == "model":
        neutral.append(["reference.mode=store"])
    combos = [sum(c, []) for n in range(len(neutral) + 1) for c in itertools.combinations(neutral, n)]
    for base in combos:
        for extra in [[]] + _passes(cfg):
            if base or extra:
                yield base + extra


def lora_changes(cfg: Config) -> Iterator[list[str]]:
    """LoRA (r = 16, every linear) with the adapter-disabled policy as reference, then with a bf16 base (a
    frozen base needs no fp32 copy; the adapters stay fp32), checkpointing and smaller passes."""
    lora = [] if cfg.model.lora is not None else ["model.lora={r: 16}"]
    lora += [] if cfg.reference.mode == "adapter" else ["reference.mode=adapter"]
    if cfg.distributed.strategy == "fsdp":
        lora.append("distributed.strategy=ddp")  # dpokit trains LoRA with DDP (adapters are small)
    bases = [[]] if cfg.model.dtype == "bfloat16" else [[], ["model.dtype=bfloat16"]]
    for base in bases:
        for extra in [[]] + [["train.gradient_checkpointing=true"] + p for p in [[]] + _passes(cfg)]:
            if lora + base + extra:
                yield lora + base + extra


def fsdp_changes(cfg: Config, gpus: int, nodes: int) -> Iterator[tuple[list[str], int, int]]:
    """Full fine-tuning with FSDP: on the GPUs at hand, then up to 8 per node, then more nodes (to 64 GPUs),
    each with the result-neutral settings."""
    if cfg.model.lora is not None:
        return
    counts = [(gpus, nodes)] if gpus * nodes > 1 else []
    counts += [(g, nodes) for g in (2, 4, 8) if g > gpus]
    counts += [(max(gpus, 8), n) for n in (2, 4, 8) if n > nodes]
    settings = [[], ["train.gradient_checkpointing=true"], ["train.gradient_checkpointing=true",
                                                            "reference.mode=store"]]
    for (g, n), extra in itertools.product(counts, settings):
        yield ["distributed.strategy=fsdp", *extra], g, n


def suggest(cfg: Config, shape: Shape, source: str, current: Plan) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The smallest change that fits: a result-neutral one on the same GPUs (FSDP included), else LoRA on the
    same GPUs (with, as an alternative, the fewest GPUs that fit full fine-tuning), else more GPUs; and what
    not-yet-available options would give when nothing fits on the given GPUs."""
    def first(options: Iterator[tuple[list[str], int, int]]) -> dict[str, Any] | None:
        for overrides, g, n in options:
            changed = _with(cfg, overrides)
            if changed is None:
                continue
            result = plan_for(changed, shape, source, gpu_memory=current.gpu_memory, gpus=g, nodes=n)
            if result.verdict == "fits":
                return {"overrides": overrides, "gpus": g, "nodes": n, "peak": result.memory.peak}
        return None

    here = (current.gpus, current.nodes)
    neutral = first((o, *here) for o in neutral_changes(cfg))
    more = first(fsdp_changes(cfg, *here))
    if neutral is None and more is not None and (more["gpus"], more["nodes"]) == here:
        neutral = more  # FSDP on the same GPUs
    if neutral is not None:
        return neutral, []
    lora = first((o, *here) for o in lora_changes(cfg))
    if lora is not None:
        return ({**lora, "or": more} if more else lora), []
    return more, not_available(cfg, shape, current)


def not_available(cfg: Config, shape: Shape, current: Plan) -> list[dict[str, Any]]:
    """Peaks with options dpokit does not have yet, from the current plan: CPU offload of the optimizer
    states and gradients; a 4-bit base under LoRA adapters (QLoRA) with checkpointing."""
    mem = current.memory
    offload = mem.peak - mem.optimizer - mem.gradients
    rows = [{"option": "CPU offload of optimizer states and gradients", "peak": offload, "available": False}]
    lora_cfg = _with(cfg, ["model.lora={r: 16}", "reference.mode=adapter", "train.gradient_checkpointing=true",
                           "distributed.strategy=ddp"])
    if lora_cfg is not None:
        lora = plan_for(lora_cfg, shape, current.source, gpu_memory=current.gpu_memory, gpus=current.gpus,
                        nodes=current.nodes)
        base = shape.params() * DTYPE_BYTES[lora.setup.dtype]
        rows.append({"option": "QLoRA (4-bit NF4 base, LoRA r=16, checkpointing)",
                     "peak": lora.memory.peak - base + shape.params() * NF4_BYTES, "available": False})
    return rows


# ---------------------------------------------------------------------------------------------------- text

def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:8.2f}"


def describe_setup(p: Plan) -> str:
    s = p.setup
    what = f"LoRA r={s.lora_r} ({len(s.lora_targets)} linears a layer)" if s.lora_r else "full fine-tuning"
    strategy = {"single": "one process", "ddp": "DDP", "fsdp": "FSDP2"}[s.strategy]
    compute = {"fp32": "fp32", "bf16": "bf16 weights and compute",
               "autocast": "bf16 autocast over float32 weights"}[regime(s)]
    return (f"{what}; {p.gpus} GPU{'s' if p.gpus > 1 else ''} x {p.nodes} node{'s' if p.nodes > 1 else ''}, "
            f"{strategy}; {compute}; reference: {s.reference}")


def part_rows(p: Plan) -> list[tuple[str, float, str]]:
    s, m = p.setup, p.memory
    sharded = f", sharded over {s.world}" if s.strategy == "fsdp" else ""
    other = m.activations_full if s.checkpointing else m.activations_checkpointed
    return [
        ("weights", m.weights, f"{s.dtype}{' + fp32 adapters' if s.lora_r else ''}{sharded}"),
        ("gradients", m.gradients, f"{p.trainable_params:,} trainable{sharded}"),
        ("optimizer states", m.optimizer, f"{s.optimizer} ({'m, v' if s.optimizer == 'adamw' else 'one average'}) in"
                                          f" the parameters' dtype, no fp32 master copy{sharded}"),
        ("reference", m.reference, {"model": f"a second copy of the weights{sharded}", "adapter": "policy, adapters off",
                                    "store": "log-probs from disk"}[s.reference]),
        ("autocast weight copies", m.autocast_copies, "bf16 copies of fp32 linear weights kept for the backward"),
        ("activations", m.activations, f"{s.pass_tokens:,} positions a pass, checkpointing "
                                       f"{'on' if s.checkpointing else 'off'} ({'off' if s.checkpointing else 'on'}:"
                                       f" {other / GiB:.2f} GiB)"),
        ("log-prob head", m.head, f"chunk of {min(s.chunk, s.pass_tokens):,} positions"),
        ("communication", m.communication, {"single": "none (one process)", "ddp": "DDP gradient buckets",
                                            "fsdp": "FSDP2 root + 2 layers gathered, 1 layer's gradients"}[
                                                s.strategy]),
    ]


def render(p: Plan) -> str:
    """The plan as the lines ``dpokit plan`` prints."""
    lines = [f"{p.model}: {p.params / 1e9:.3f} B parameters ({p.source})", describe_setup(p),
             f"{p.setup.pass_tokens:,} positions a pass, {p.setup.passes_per_step} pass(es) a step "
             f"(pairs at data.max_length), attention {p.setup.attention}", "", "per-GPU memory           GiB"]
    lines += [f"  {name:22s}{gib(value)}   {note}" for name, value, note in part_rows(p)]
    lines.append(f"  {'peak':22s}{gib(p.memory.peak)}   at {p.memory.peak_at}")
    lines.append(f"GPU memory {p.gpu_memory / GiB:.0f} GiB ({p.usable / GiB:.0f} usable): {p.verdict.upper()}")
    lines += suggestion_lines(p)
    lines += ["", f"host RAM while loading: {p.host_ram_per_rank / GiB:.1f} GiB per rank, "
                  f"{p.host_ram_per_node / GiB:.1f} GiB per node (today every rank loads the whole policy"
                  f"{' and a whole reference copy' if p.setup.reference == 'model' else ''} before sharding)",
              f"FLOPs per step: {p.flops['total']:.3g} ({p.tokens_per_step:,} positions: training "
              f"{p.flops['train']:.3g}, reference forward {p.flops['reference']:.3g}"
              f"{', recompute ' + format(p.flops['recompute'], '.3g') if p.flops['recompute'] else ''})"]
    return "\n".join(lines)


def suggestion_lines(p: Plan) -> list[str]:
    if p.verdict == "fits":
        return []
    s = p.suggestion
    if s is None:
        lines = ["no change dpokit can make today fits these GPUs"]
    else:
        lines = [f"smallest change that fits: {_change(s, p)}"]
        if "or" in s:
            lines.append(f"  or, training every weight: {_change(s['or'], p)}")
    lines += [f"  not available in dpokit yet: {r['option']}: peak {r['peak'] / GiB:.2f} GiB"
              for r in p.not_available]
    return lines


def _change(s: dict[str, Any], p: Plan) -> str:
    same = (s["gpus"], s["nodes"]) == (p.gpus, p.nodes)
    hardware = "" if same else f" on {s['gpus']} GPUs a node x {s['nodes']} node{'s' if s['nodes'] > 1 else ''}"
    return f"{' '.join(s['overrides'])}{hardware} (peak {s['peak'] / GiB:.2f} GiB)"


__all__ = ["parse_size", "render", "suggest"]
