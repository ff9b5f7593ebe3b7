"""The smallest change that makes a run fit, and the plan as text.

Changes are tried in order of how much they change: first on the same GPUs the settings that leave the result
as it is (``train.gradient_checkpointing``, ``reference.mode: store``, a smaller ``train.pass_tokens``), then
LoRA (it trains adapters instead of every weight), then the 8-bit AdamW (``train.optimizer: adamw_8bit``: every
weight still trained, only the optimizer's moments approximated), then QLoRA (``model.quantize: nf4`` under the
adapters: the model trained is the 4-bit one, the largest change to the result, so the last before more
hardware); separately, the fewest GPUs that fit full fine-tuning with FSDP, or full fine-tuning with the 8-bit
AdamW on the same GPUs. When none of these fits on the given GPUs, CPU offload (``distributed.offload: params``
with FSDP): it leaves the result as it is but moves the weights, gradients and optimizer step to the host, so
every step waits on host-GPU copies and a CPU optimizer; the slowest way to fit, so the last tried on the same
GPUs (more GPUs, when some fit, are offered beside it). Every candidate is validated as a config first, so a
suggestion is always one ``dpokit train`` accepts.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any

from dpokit.config import Config, load_config
from dpokit.errors import ConfigError, DpokitError
from dpokit.plan import Plan, plan_for
from dpokit.plan.memory import GiB, mixed, regime, sharded_loading
from dpokit.plan.shapes import Shape

_UNITS = {"": GiB, "k": 2 ** 10, "m": 2 ** 20, "g": GiB, "t": 2 ** 40}


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


def _settings(cfg: Config) -> list[list[str]]:
    """The result-neutral settings a memory-saving change is tried with: none, then checkpointing, then also
    smaller passes."""
    return [[]] + [["train.gradient_checkpointing=true"] + p for p in [[]] + _passes(cfg)]


def adamw_8bit_changes(cfg: Config) -> Iterator[list[str]]:
    """The 8-bit AdamW on the run as it is (full fine-tuning or its adapters; one process or DDP: FSDP refuses
    it), with the result-neutral settings."""
    if cfg.train.optimizer == "adamw_8bit":
        return
    change = ["train.optimizer=adamw_8bit"] + (["distributed.strategy=ddp"] if cfg.distributed.strategy == "fsdp"
                                                else [])
    for extra in [[], *neutral_changes(cfg)]:
        yield change + extra


def qlora_changes(cfg: Config) -> Iterator[list[str]]:
    """QLoRA: LoRA (r = 16 unless set) with its adapter reference over an NF4 base, in bf16 (the parts left
    unquantized: embeddings, head, norms), with the result-neutral settings."""
    if cfg.model.quantize == "nf4":
        return
    change = [] if cfg.model.lora is not None else ["model.lora={r: 16}"]
    change += [] if cfg.reference.mode == "adapter" else ["reference.mode=adapter"]
    change += ["model.quantize=nf4"] + (["distributed.strategy=ddp"] if cfg.distributed.strategy == "fsdp" else [])
    bases = [[]] if cfg.model.dtype == "bfloat16" else [["model.dtype=bfloat16"]]
    for base, extra in itertools.product(bases, _settings(cfg)):
        yield change + base + extra


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


def offload_changes(cfg: Config) -> Iterator[list[str]]:
    """FSDP with its shards, gradients and optimizer step on the CPU (full fine-tuning: FSDP refuses LoRA), with
    the result-neutral settings."""
    if cfg.model.lora is not None or cfg.distributed.offload == "params":
        return
    change = ["distributed.strategy=fsdp", "distributed.offload=params"]
    for extra in [[], *neutral_changes(cfg)]:
        yield change + extra


def suggest(cfg: Config, shape: Shape, source: str, current: Plan) -> dict[str, Any] | None:
    """The smallest change that fits: a result-neutral one on the same GPUs (FSDP included), else LoRA, the
    8-bit AdamW, QLoRA on the same GPUs (with, as an alternative, full fine-tuning with the 8-bit AdamW or on the
    fewest GPUs that fit it), else CPU offload on the same GPUs (with more GPUs as the alternative), else more
    GPUs."""
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
        return neutral
    if cfg.model.lora is None:  # training every weight: its 8-bit AdamW on these GPUs before more GPUs
        more = first((o, *here) for o in adamw_8bit_changes(cfg)) or more
    candidates = itertools.chain(lora_changes(cfg), adamw_8bit_changes(cfg), qlora_changes(cfg))
    fits = first((o, *here) for o in candidates)
    fits = fits or first((o, *here) for o in offload_changes(cfg))
    if fits is not None:
        return {**fits, "or": more} if more and more != fits else fits
    return more


# ---------------------------------------------------------------------------------------------------- text

def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:8.2f}"


def describe_setup(p: Plan) -> str:
    s = p.setup
    what = f"LoRA r={s.lora_r} ({len(s.lora_targets)} linears a layer)" if s.lora_r else "full fine-tuning"
    strategy = {"single": "one process", "ddp": "DDP", "fsdp": "FSDP2"}[s.strategy]
    compute = {"fp32": "fp32", "bf16": "bf16 weights and compute",
               "autocast": "bf16 autocast over float32 weights"}[regime(s)]
    if mixed(s) and s.dtype != "bfloat16":
        compute = f"bf16 gathers of {s.dtype} shards, fp32 gradient reduction (FSDP2 mixed precision)"
    return (f"{what}; {p.gpus} GPU{'s' if p.gpus > 1 else ''} x {p.nodes} node{'s' if p.nodes > 1 else ''}, "
            f"{strategy}; {compute}; reference: {s.reference}")


def part_rows(p: Plan) -> list[tuple[str, float, str]]:
    s, m = p.setup, p.memory
    sharded = f", sharded over {s.world}" if s.strategy == "fsdp" and s.world > 1 else ""
    sharded += ", on the host (offload)" if s.offload else ""
    other = m.activations_full if s.checkpointing else m.activations_checkpointed
    ref_dtype = " in bf16" if mixed(s) and s.dtype != "bfloat16" else ""
    base = f"decoder linears in NF4, the rest {s.dtype}" if s.quantize == "nf4" else s.dtype
    states = {"adamw": "adamw (m, v) in the parameters' dtype", "rmsprop": "rmsprop (one average) in the "
              "parameters' dtype", "adamw_8bit": "adamw_8bit (m, v in 8 bits, blocks of 256)"}[s.optimizer]
    return [
        ("weights", m.weights, f"{base}{' + fp32 adapters' if s.lora_r else ''}{sharded}"),
        ("gradients", m.gradients, f"{p.trainable_params:,} trainable{sharded}"),
        ("optimizer states", m.optimizer, f"{states}, no fp32 master copy{sharded}"),
        ("reference", m.reference, {"model": f"a second copy of the weights{ref_dtype}{sharded}", "adapter": "policy, adapters off",
                                    "store": "log-probs from disk"}[s.reference]),
        ("autocast weight copies", m.autocast_copies, "bf16 copies of fp32 linear weights kept for the backward"),
        ("dequantized weight", m.dequantized, "the largest NF4 weight, dequantized while it multiplies"),
        ("activations", m.activations, f"{s.pass_tokens:,} positions a pass, checkpointing "
                                       f"{'on' if s.checkpointing else 'off'} ({'off' if s.checkpointing else 'on'}:"
                                       f" {other / GiB:.2f} GiB)"),
        ("log-prob head", m.head, f"chunk of {min(s.chunk, s.pass_tokens):,} positions"),
        ("communication", m.communication, {"single": "none (one process)", "ddp": "DDP gradient buckets",
                                            "fsdp": f"FSDP2 {'whole ' if s.offload else ''}root + 2 layers gathered"
                                                    f"{' in bf16' if mixed(s) else ''}, 1 layer's gradients"
                                                    f"{' in fp32' if mixed(s) else ''}"}[
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
    lines += ["", *host_lines(p),
              f"FLOPs per step: {p.flops['total']:.3g} ({p.tokens_per_step:,} positions: training "
              f"{p.flops['train']:.3g}, reference forward {p.flops['reference']:.3g}"
              f"{', recompute ' + format(p.flops['recompute'], '.3g') if p.flops['recompute'] else ''})"]
    return "\n".join(lines)


def host_lines(p: Plan) -> list[str]:
    """Host RAM while loading (sharded or whole, per ``sharded_loading``) and, offloaded, while training."""
    s = p.setup
    if sharded_loading(s):
        how = ("FSDP loads sharded: each rank reads only its rows of the weight files, one tensor at a time"
               + (", and keeps its shards of the policy" + (" and reference" if s.reference == "model" else "")
                  + " in host memory, offloaded" if s.offload else ", into its shards on the GPU"))
    else:
        strategy = {"single": "one process", "ddp": "DDP", "fsdp": "FSDP filling a reference store"}[s.strategy]
        copies = " and a whole reference copy" if s.reference == "model" else ""
        how = f"{strategy}: {'every rank loads' if s.world > 1 else 'it loads'} the whole policy{copies}"
    lines = [f"host RAM while loading: {p.host_ram_per_rank / GiB:.1f} GiB per rank, "
             f"{p.host_ram_per_node / GiB:.1f} GiB per node ({how})"]
    if s.offload:
        lines.append(f"host RAM while training (offload): {p.host_ram_training / GiB:.1f} GiB per rank, "
                     f"{p.host_ram_training * p.gpus / GiB:.1f} GiB per node (weight, reference, gradient and "
                     "optimizer shards)")
    return lines


def suggestion_lines(p: Plan) -> list[str]:
    if p.verdict == "fits":
        return []
    s = p.suggestion
    if s is None:
        return ["no change dpokit can make fits these GPUs"]
    lines = [f"smallest change that fits: {_change(s, p)}"]
    if "or" in s:
        lora = any(o.startswith("model.lora") for o in s["overrides"])
        lines.append(f"  or{', training every weight' if lora else ''}: {_change(s['or'], p)}")
    return lines


def _change(s: dict[str, Any], p: Plan) -> str:
    same = (s["gpus"], s["nodes"]) == (p.gpus, p.nodes)
    hardware = "" if same else f" on {s['gpus']} GPUs a node x {s['nodes']} node{'s' if s['nodes'] > 1 else ''}"
    launch = " (under torchrun, one process)" if "distributed.offload=params" in s["overrides"] and \
        s["gpus"] * s["nodes"] == 1 else ""
    return f"{' '.join(s['overrides'])}{hardware}{launch} (peak {s['peak'] / GiB:.2f} GiB)"


__all__ = ["parse_size", "render", "suggest"]
