"""The memory planner (``dpokit plan``) against one real dpokit training step, on CPU, per part.

A model of Qwen2.5-0.5B's shape with random weights (no download: built from the built-in shape, saved with the
tiny tokenizer to a temporary folder, so the planner reads its config.json like any local model), one DPO step
of batch 4 at max_length 128 in fp32 measured by ``dpokit.plan.measure`` (live tensor bytes: the tensors held
plus the profiler's allocation events of the step). Prints predicted vs measured for every part and the peak,
and fails when the peak is off by more than the issue's +-20%.

    python benchmarks/plan_check.py [--model Qwen2.5-0.5B] [--keep DIR]
    python benchmarks/plan_check.py --table     # the planner's table of common models (docs/scale.md)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from dpokit.config import load_config
from dpokit.models.source import seeded_model, tiny_tokenizer
from dpokit.plan import GiB, plan
from dpokit.plan.measure import check_config, compared, full_length_pairs, measure_step
from dpokit.plan.shapes import BUILTIN

BOUND = 0.20
"""The issue's acceptance bar for the peak on CPU."""


def random_model_folder(name: str, folder: Path) -> Path:
    """A Hugging Face folder holding a random model of a built-in shape (Llama or Qwen2) and the tiny
    tokenizer: config.json, model.safetensors, tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = BUILTIN[name.lower()]
    qwen = shape.qkv_bias
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                        num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied,
                        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    seeded_model(model_cls, config, 0).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


TABLE_MODELS = ("Llama-3.2-1B", "Qwen2.5-7B", "Llama-3.1-8B", "Llama-3.1-70B")
TABLE_RUN = {"data": {"max_length": 2048, "max_prompt_length": 1024}, "train": {"batch_size": 1}}
"""The table's run: one pair of 2 x 2048 positions a micro-batch, defaults otherwise (fp32 weights, bf16 on a
GPU: autocast with one process, FSDP2 mixed precision under FSDP; a reference model in memory, AdamW)."""
TABLE_SETUPS = (
    ("full DPO", 1, []),
    ("full DPO, checkpointing, reference store", 1, ["train.gradient_checkpointing=true", "reference.mode=store"]),
    ("full DPO, FSDP2, checkpointing", 8, ["distributed.strategy=fsdp", "train.gradient_checkpointing=true"]),
    ("LoRA r=16, adapter reference", 1, ["model.lora.r=16", "reference.mode=adapter"]),
    ("LoRA r=16, bf16 base, checkpointing", 1, ["model.lora.r=16", "reference.mode=adapter",
                                                "model.dtype=bfloat16", "train.gradient_checkpointing=true"]),
    ("QLoRA r=16 (NF4 base, bf16), checkpointing", 1, ["model.lora.r=16", "reference.mode=adapter",
                                                       "model.quantize=nf4", "model.dtype=bfloat16",
                                                       "train.gradient_checkpointing=true"]),
    ("full DPO, 8-bit AdamW, checkpointing, reference store", 1, ["train.optimizer=adamw_8bit",
                                                                  "train.gradient_checkpointing=true",
                                                                  "reference.mode=store"]),
)
SIZES = (24, 48, 80)


def table() -> str:
    """The planner's per-GPU peaks and verdicts for common models, and the smallest change at each size."""
    marks = {"fits": "fits", "tight": "tight", "does not fit": "no"}
    lines = ["| model | run | GPUs | peak per GPU (GiB) | " + " | ".join(f"{g} GB" for g in SIZES) + " |",
             "|---|---|---|---|" + "---|" * len(SIZES)]
    for model in TABLE_MODELS:
        for label, gpus, overrides in TABLE_SETUPS:
            tree = {**TABLE_RUN, "model": {"name_or_path": model}}
            results = [plan(tree, overrides, gpu_memory=g * GiB, gpus=gpus) for g in SIZES]
            lines.append(f"| {model} | {label} | {gpus} | {results[0].memory.peak / GiB:.1f} | "
                         + " | ".join(marks[r.verdict] for r in results) + " |")
    lines += ["", "| model | GPU | smallest change that fits (full DPO, defaults) |", "|---|---|---|"]
    for model in TABLE_MODELS:
        for size in SIZES:
            result = plan({**TABLE_RUN, "model": {"name_or_path": model}}, gpu_memory=size * GiB)
            lines.append(f"| {model} | 1 x {size} GB | {describe(result)} |")
    return "\n".join(lines)


def describe(result: object) -> str:
    s = result.suggestion
    if result.verdict == "fits":
        return "fits as it is"
    if s is None:
        return "nothing dpokit can do"
    text = f"`{' '.join(s['overrides'])}`" if s["overrides"] else ""
    where = hardware(s) if (s["gpus"], s["nodes"]) != (1, 1) else "the same GPU"
    text = f"{text} on {where} ({s['peak'] / GiB:.1f} GiB)"
    if "or" in s:
        lora = any(o.startswith("model.lora") for o in s["overrides"])
        text += f"; or{', every weight trained' if lora else ''}: {describe_change(s['or'])}"
    return text


def hardware(s: dict) -> str:
    return f"{s['gpus']} GPUs" + (f" x {s['nodes']} nodes" if s["nodes"] > 1 else "")


def describe_change(s: dict) -> str:
    return f"`{' '.join(s['overrides'])}` on {hardware(s)} ({s['peak'] / GiB:.1f} GiB)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen2.5-0.5B", help="a built-in Llama or Qwen2 shape")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--table", action="store_true", help="print the planner's table of common models and exit")
    args = parser.parse_args()
    if args.table:
        print(table())
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.keep or tempfile.mkdtemp(prefix="dpokit-plan-check-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "model"
    if not (folder / "config.json").is_file():
        random_model_folder(args.model, folder)
    tree = check_config(folder, full_length_pairs(work / "pairs.jsonl"), work / "run")
    predicted = plan(load_config(tree), gpu_memory=80 * GiB)
    started = time.perf_counter()
    measured = measure_step(load_config(tree))
    print(f"{args.model} shape, random weights ({predicted.params:,} parameters), one DPO step: batch 4, "
          f"max_length 128, fp32, SDPA, packed; {measured['tokens']} positions measured, "
          f"{predicted.setup.pass_tokens} planned ({time.perf_counter() - started:.0f} s)")
    print(f"{'part':12s} {'predicted MiB':>14s} {'measured MiB':>13s} {'ratio':>6s}")
    for name, want, got in compared(predicted.memory, measured):
        ratio = f"{want / got:6.3f}" if got else "     -"
        print(f"{name:12s} {want / 2 ** 20:14.1f} {got / 2 ** 20:13.1f} {ratio}")
    print(f"(measured: step peak beyond held tensors {measured['step_peak'] / 2 ** 20:.1f} MiB; planned peak at "
          f"{predicted.memory.peak_at})")
    error = predicted.memory.peak / measured["peak"] - 1
    print(f"peak: predicted / measured - 1 = {error:+.1%} (bar: +-{BOUND:.0%})")
    return 0 if abs(error) <= BOUND else 1


if __name__ == "__main__":
    sys.exit(main())
