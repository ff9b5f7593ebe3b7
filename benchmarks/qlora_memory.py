"""Memory of LoRA against QLoRA (``model.quantize: nf4``) on one model: the bytes of the loaded weights and the
peak resident memory of a short DPO run (each configuration in a fresh process, so one's peak does not hide the
other's).

    python benchmarks/qlora_memory.py [--model smollm2|tiny-random-llama] [--steps 2]

Prints one JSON line per configuration: ``weights_mb`` (parameters as held: NF4 codes and scales for the
quantized weights), ``peak_rss_mb`` (the process's peak resident memory while loading and training, Python and the libraries
included; final/ is not written), ``rss_anon_mb`` and ``rss_file_mb`` (resident memory after training:
anonymous, and file-backed pages of the mmap'd weights, which the kernel may drop),
``run_s`` (seconds of the whole run: setup, data, steps); then the bytes of AdamW's state for full
fine-tuning, torch's AdamW against ``adamw_8bit`` (the qmap, a 256-entry table per moment, not counted).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAIRS = 16


def tensor_bytes(tensor) -> int:
    from dpokit.models.quantize import is_nf4, nf4_bytes

    return nf4_bytes(tensor) if is_nf4(tensor) else tensor.numel() * tensor.element_size()


def measure(model: str, quantize: str, steps: int) -> dict:
    import dpokit
    from dpokit.models.loading import load_models

    folder = Path(tempfile.mkdtemp(prefix="qlora-memory-"))
    pairs = folder / "pairs.jsonl"
    with pairs.open("w") as fh:
        for i in range(PAIRS):
            fh.write(json.dumps({"prompt": f"Question {i}: is the sea blue?", "chosen": " Yes, mostly blue.",
                                 "rejected": " No idea."}) + "\n")
    cfg = {"model": {"name_or_path": model, "lora": {"r": 16, "alpha": 32}, "quantize": quantize},
           "reference": {"mode": "adapter"}, "data": {"train": str(pairs), "max_length": 64, "max_prompt_length": 32},
           "train": {"max_steps": steps, "batch_size": 2, "precision": "fp32", "progress": False}}
    policy = load_models(dpokit.load_config(cfg).model, reference="never").policy
    weights = sum(tensor_bytes(p) for p in policy.parameters())
    del policy
    gc.collect()  # peft's wrappers hold reference cycles
    # The training peak: final/ is not written (its export holds the dequantized base on the CPU, as big as the
    # unquantized model's weights, once, after training).
    sys.modules["dpokit.training.loop"].export_final = lambda run: None
    start = time.perf_counter()
    dpokit.train(cfg, run_dir=str(folder / "run"))
    run_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": model, "quantize": quantize, "weights_mb": round(weights / 2**20, 1),
            "peak_rss_mb": round(peak, 1), **resident(), "run_s": round(run_s, 1)}


def resident() -> dict:
    """The resident memory now, split: anonymous (tensors, Python) and file-backed (pages of mapped files:
    safetensors weights read through mmap stay mapped while any tensor of the file lives, and count in RSS
    although the kernel may drop them at any time)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key.lower().replace("rss", "rss_") + "_mb"] = round(int(value.split()[0]) / 1024, 1)
    return fields


def optimizer_state(model: str) -> dict:
    """Bytes of AdamW's state for full fine-tuning of ``model``, torch's AdamW against ``adamw_8bit``, after one
    step on random gradients (the state exists from the first step)."""
    import torch

    import dpokit
    from dpokit.models.loading import load_models
    from dpokit.training.optim8bit import adamw_8bit

    policy = load_models(dpokit.load_config({"model": {"name_or_path": model}}).model, reference="never").policy
    params = [p for p in policy.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {"model": model, "weights": sum(p.numel() for p in params)}
    for name, optimizer in (("adamw", torch.optim.AdamW(params, lr=1e-5)),
                            ("adamw_8bit", adamw_8bit(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0))):
        optimizer.step()
        state = optimizer.state_dict()["state"]
        held = sum(v.numel() * v.element_size() for entries in state.values() for k, v in entries.items()
                   if isinstance(v, torch.Tensor) and not k.endswith(".qmap") and k != "step")
        out[f"{name}_state_mb"] = round(held / 2**20, 1)
        del optimizer
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", choices=["none", "nf4", "optimizer"], help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.one == "optimizer":
        print(json.dumps(optimizer_state(args.model)))
        return
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.steps)))
        return
    for quantize in ("none", "nf4", "optimizer"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                              "--one", quantize], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
