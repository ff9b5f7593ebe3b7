"""Per-rank peak host RAM of a 2-process FSDP run against one process, on a model of Qwen2.5-0.5B's shape.

    python benchmarks/fsdp_memory.py             # a few minutes on 2 cores; ~10 GiB at the peak
    python benchmarks/fsdp_memory.py --layers 4  # the same logic on a smaller model (quick)

Writes a random-weight model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 key-value heads,
intermediate 4864, vocabulary 151,936, tied embeddings; 494 M parameters, 1.98 GB in fp32) as safetensors into
a temporary folder, then trains it with DPO for 2 optimizer steps (fp32, global batch 4, 64 tokens, reference
model in memory, a final checkpoint and final/ export included): once as one process (``dpokit train``,
batch 4), once as two gloo ranks with ``distributed.strategy: fsdp`` (batch 2 each). Each process reports its
own peak RSS (``getrusage``) when it exits, and its high-water mark (``VmHWM``) when setup (loading) ends, when
the final checkpoint starts and ends (the training steps are before it) and when final/ export ends (with
``--trace``, also around every reference forward, backward and optimizer step). Prints the figures, each
rank's ratio to the single process (perfect sharding of policy, reference, gradients and AdamW state would
give ~0.56 with the fixed cost of Python, torch and the activations), and checks the two runs' final weights agree (fp32; the bound of
``tests/tolerances.py``: the ranks add their gradients in another order).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

REPORT = """\
import atexit, json, os, resource, sys
import importlib
train = importlib.import_module("dpokit.training.loop")  # where the run calls setup, save and export_final
phases = {}
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
def mark(name, fn):
    def marked(*args, **kwargs):
        phases.setdefault("before " + name, hwm())
        try:
            return fn(*args, **kwargs)
        finally:
            phases["after " + name] = hwm()
    return marked
train.setup = mark("setup", train.setup)  # loading both models, the optimizer
train.save = mark("checkpoint", train.save)  # after the training steps
train.export_final = mark("export", train.export_final)
trace = []  # (event, VmRSS, VmHWM) inside the steps: where a step's peak is reached
def rss():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS"))
def traced(name, fn):
    def run(*args, **kwargs):
        trace.append(("before " + name, rss(), hwm()))
        try:
            return fn(*args, **kwargs)
        finally:
            trace.append(("after " + name, rss(), hwm()))
    return run
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from dpokit.training import reference
reference.FrozenReference.logps = traced("reference forward", reference.FrozenReference.logps)
torch.Tensor.backward = traced("backward", torch.Tensor.backward)  # after the policy's forward
register_optimizer_step_post_hook(lambda *_: trace.append(("after optimizer step", rss(), hwm())))
def report():
    name = "rank-" + os.environ["RANK"] if "RANK" in os.environ else "single"
    phases["exit"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    with open(os.path.join(os.environ["RSS_OUT"], name + ".json"), "w") as fh:
        json.dump({"phases": phases, "trace": trace}, fh)
atexit.register(report)
from dpokit.cli import main
sys.exit(main())
"""


def write_model(folder: Path, layers: int) -> int:
    """The random model and a small tokenizer (its ids are a subset of the model's vocabulary), in a
    subprocess so this process never holds the weights."""
    code = f"""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from dpokit.models.loading import tiny_tokenizer
torch.manual_seed(0)
config = Qwen2Config(hidden_size=896, num_hidden_layers={layers}, num_attention_heads=14, num_key_value_heads=2,
                     intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                     max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
model = Qwen2ForCausalLM(config)
model.save_pretrained({str(folder)!r})
tiny_tokenizer().save_pretrained({str(folder)!r})
print(sum(p.numel() for p in model.parameters()))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def write_pairs(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"Question {i}: can you help me with task {i * 7 % 11} today, please?",
                                 "chosen": f" yes, gladly: here is how to do task {i} step by step",
                                 "rejected": f" no, that is not my problem at all {i}"}) + "\n")


def config(folder: Path, data: Path, batch: int, fsdp: bool) -> dict:
    return {"model": {"name_or_path": str(folder), "attn_implementation": "sdpa"},
            "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
            "loss": {"name": "sigmoid", "beta": 0.1},
            "train": {"lr": 1e-5, "batch_size": batch, "max_steps": 2, "precision": "fp32", "progress": False,
                      "seed": 0},
            "distributed": {"strategy": "fsdp" if fsdp else "ddp", "timeout_s": 1800}}


def launch(command: list[str], out: Path, src: Path) -> float:
    env = {**os.environ, "RSS_OUT": str(out), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(src)}
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def print_trace(reports: dict) -> None:
    """Each process's (VmRSS, VmHWM) in GiB at each traced event, one column per process."""
    gib = 2 ** 30
    print("inside the steps (GiB): VmRSS / VmHWM")
    traces = {name: report["trace"] for name, report in reports.items()}
    print(f"  {'event':<26}" + "".join(f"{name:>16}" for name in traces))
    for i, (event, *_) in enumerate(traces["single"]):
        row = [f"{t[i][1] / gib:6.2f} /{t[i][2] / gib:6.2f}" if i < len(t) else "" for t in traces.values()]
        print(f"  {event:<26}" + "".join(f"{cell:>16}" for cell in row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24: Qwen2.5-0.5B)")
    parser.add_argument("--trace", action="store_true",
                        help="also print each process's RSS and high-water mark around every reference forward, "
                             "backward and optimizer step")
    parser.add_argument("--src", type=Path, default=ROOT / "src",
                        help="dpokit sources to run (another checkout's src/: the code before a change)")
    args = parser.parse_args()
    import yaml
    from safetensors.torch import load_file

    from tolerances import assert_same_weights_after_adamw

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        n_params = write_model(tmp / "model", args.layers)
        write_pairs(tmp / "pairs.jsonl", 8)
        script = tmp / "report_rss.py"
        script.write_text(REPORT)
        gib = 2 ** 30
        print(f"model: {n_params / 1e6:.0f} M parameters, {4 * n_params / gib:.2f} GiB in fp32")
        single_cfg = tmp / "single.yaml"
        single_cfg.write_text(yaml.safe_dump(config(tmp / "model", tmp / "pairs.jsonl", 4, fsdp=False)))
        seconds = launch([sys.executable, str(script), "train", str(single_cfg), f"run_dir={tmp / 'single'}"], tmp, args.src)
        print(f"one process: {seconds:.0f} s")
        fsdp_cfg = tmp / "fsdp.yaml"
        fsdp_cfg.write_text(yaml.safe_dump(config(tmp / "model", tmp / "pairs.jsonl", 2, fsdp=True)))
        seconds = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), "train", str(fsdp_cfg), f"run_dir={tmp / 'fsdp'}"], tmp, args.src)
        print(f"two FSDP ranks: {seconds:.0f} s")
        reports = {name: json.loads((tmp / f"{name}.json").read_text()) for name in ("single", "rank-0", "rank-1")}
        peaks = {name: report["phases"] for name, report in reports.items()}
        for name, phases in peaks.items():
            peak = phases["exit"]
            print(f"peak RSS {name:>7}: {peak / gib:5.2f} GiB  ({peak / peaks['single']['exit']:.2f}x one process)")
        print("peak RSS so far (GiB), by phase: " + ", ".join(peaks["single"]))
        for name, phases in peaks.items():
            print(f"  {name:>7}: " + "  ".join(f"{phases[key] / gib:5.2f}" for key in peaks["single"]))
        if args.trace:
            print_trace(reports)
        one = load_file(str(tmp / "single" / "final" / "model.safetensors"))
        two = load_file(str(tmp / "fsdp" / "final" / "model.safetensors"))
        assert_same_weights_after_adamw(one, two, lr=1e-5, steps=2)
        worst = max((one[k].double() - two[k].double()).abs().max().item() for k in one)
        print(f"final weights: one process vs two FSDP ranks agree (max |dw| {worst:.2e}, bound of "
              f"tests/tolerances.py at lr 1e-5, 2 steps); {len(one)} tensors, dtype {one[next(iter(one))].dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
