"""The memory planner (``dpokit plan``) against one real dpokit training step, on CPU, per part.

A model of Qwen2.5-0.5B's shape with random weights (no download: built from the built-in shape, saved with the
tiny tokenizer to a temporary folder, so the planner reads its config.json like any local model), one DPO step
of batch 4 at max_length 128 in fp32 measured by ``dpokit.plan.measure`` (live tensor bytes: the tensors held
plus the profiler's allocation events of the step). Prints predicted vs measured for every part and the peak,
and fails when the peak is off by more than the issue's +-20%.

    python benchmarks/plan_check.py [--model Qwen2.5-0.5B] [--keep DIR]
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
from dpokit.models import seeded_model, tiny_tokenizer
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen2.5-0.5B", help="a built-in Llama or Qwen2 shape")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
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
