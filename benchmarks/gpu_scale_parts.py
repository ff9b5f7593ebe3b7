"""The pieces of ``gpu_scale.py``: random-weight model folders of real shapes, the FLOPs a DPO step needs, and
the TRL run. Each is small enough to check by hand in the self-test.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.plan.shapes import BUILTIN, Shape

TINY = Shape("tiny-llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, tied=True)
"""The self-test's stand-in for every real shape: a Llama small enough to train on one CPU core in seconds."""


@dataclass(frozen=True)
class Case:
    """One row of the benchmark: a model shape and how it is trained."""

    name: str
    shape: str
    """A built-in shape of ``dpokit plan`` (``dpokit.plan.shapes.BUILTIN``)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted dpokit config keys on top of the common run (``gpu_scale.base_config``)."""
    trained: str = "full"
    """``full`` (every weight: 6 FLOPs per parameter and position) or ``adapters`` (a frozen base: forward 2 and
    the activations' backward 2, no weight gradients: 4)."""
    trl: bool = False
    """Run TRL's DPOTrainer on the same shape, data and batch too."""
    single_process_group: bool = False
    """Start a one-process group (as ``torchrun --nproc_per_node 1`` does): FSDP2 with CPU offload needs one."""


# ---------------------------------------------------------------------------------------------------- models

def llama_config(shape: Shape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied,
                       max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       dtype="bfloat16")


def find_shape(name: str) -> Shape:
    return TINY if name == TINY.name else BUILTIN[name.lower()]


def write_random_model(shape: Shape, folder: Path, device: Any, seed: int = 0,
                       shard_bytes: int = 4 << 30) -> int:
    """A Hugging Face folder of a random Llama of ``shape`` in bf16 (config.json, safetensors shards with their
    index, dpokit's tiny tokenizer), written tensor by tensor so that no whole model is ever in host memory:
    each tensor is drawn on ``device`` (N(0, 0.02), norms 1) and moved to the host only to be written. An 8B
    model is 16 GB of files. Returns the parameter count (tied embeddings once)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from dpokit.models.loading import tiny_tokenizer

    config = llama_config(shape)
    config.architectures = ["LlamaForCausalLM"]  # what from_pretrained-based tools (TRL's reference) read
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    names = [n for n, _ in skeleton.named_parameters()]  # a tied head is not listed twice
    shapes = dict(skeleton.named_parameters())
    index: dict[str, str] = {}
    shard: dict[str, Any] = {}
    size, total, count = 0, 0, 0

    def flush() -> None:
        nonlocal shard, size, count
        if shard:
            count += 1
            file = f"model-{count:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, file))
            shard, size = {}, 0

    for name in names:
        param = shapes[name]
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, dtype=torch.bfloat16, device=device)
        else:
            value = torch.empty(param.shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02,
                                                                                        generator=generator)
        shard[name] = value.cpu()
        size += value.numel() * 2
        total += value.numel()
        if size >= shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": index}, indent=1))
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return total


# ----------------------------------------------------------------------------------------------------- FLOPs

def pair_flops(shape: Shape, prompt: int, chosen: int, rejected: int, trained: str, reference: bool) -> float:
    """Model FLOPs a DPO step needs for one pair (a multiply-add is 2 FLOPs), counting each prompt once:

      decoder matmuls   f * P_layers * (p + c + r)            P_layers = the decoder layers' parameters
      vocabulary head   f * hidden * vocab * (c + r)          only response positions need logits
      attention         3 * 4 * layers * d_q * E              E = causal score entries (below); forward 4 FLOPs
                                                              per entry (QK^T and AV), backward twice that
      reference         the same three terms with 2, 2 and 4   (when it runs in the step)

    f = 6 for full training, 4 for adapters on a frozen base (no weight gradients; the adapters' own FLOPs are
    under 1% at rank 16 and not counted). E = p(p+1)/2 + c*p + c(c+1)/2 + r*p + r(r+1)/2: the prompt attends to
    itself, each response to the prompt and to itself. Nothing is counted for padding, recomputation under
    activation checkpointing, or a prompt computed twice: this is the work the step needs, whatever a system
    spends on it, so the same pair costs the same for dpokit and for TRL and MFU ratios equal speed ratios."""
    f = 6 if trained == "full" else 4
    positions, responses = prompt + chosen + rejected, chosen + rejected
    entries = (prompt * (prompt + 1) / 2 + chosen * prompt + chosen * (chosen + 1) / 2
               + rejected * prompt + rejected * (rejected + 1) / 2)
    layers = shape.layers * shape.layer_params()
    head = shape.hidden * shape.vocab
    attention = 4 * shape.layers * shape.q_width * entries
    flops = f * layers * positions + f * head * responses + 3 * attention
    if reference:
        flops += 2 * layers * positions + 2 * head * responses + attention
    return float(flops)


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    return flops / seconds / (peak_tflops * 1e12) if seconds > 0 and peak_tflops > 0 else math.nan


def pair_lengths(data: Path, folder: Path, max_length: int, max_prompt_length: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of every kept pair, in file order, as dpokit tokenizes them."""
    from transformers import AutoTokenizer

    from dpokit.config import DataConfig
    from dpokit.data import load_preferences

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pairs, _ = load_preferences(str(data), tokenizer,
                                DataConfig(max_length=max_length, max_prompt_length=max_prompt_length))
    return [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]


# ------------------------------------------------------------------------------------------------------- TRL

def trl_run(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer on the same folder, pairs and batch: bf16, the sigmoid loss, sequential batches, a
    constant learning rate, nothing saved. Full training holds a reference model (TRL loads it from the same
    folder); ``adapters`` gives TRL a LoRA config of the same rank and targets (its reference is the base with
    the adapters disabled) and loads the base in bf16 with gradient checkpointing, as dpokit's row does.
    Returns each step's end time and tokens (non-padding, TRL's own count) and the device's peak memory."""
    import torch
    from datasets import load_dataset
    from gpu_check import timed_trl_steps  # beside this file (gpu_scale.py puts benchmarks/ on the path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    adapters = spec["trained"] == "adapters"
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dtype = torch.bfloat16 if adapters else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
    peft_config = None
    if adapters:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["hf_cache"])
    args = DPOConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        loss_type=["sigmoid"], beta=0.1, max_length=spec["max_length"], report_to="none", logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, train_sampling_strategy="sequential", disable_tqdm=True,
        bf16=spec["device"] == "cuda", use_cpu=spec["device"] != "cuda", gradient_checkpointing=adapters,
        seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    steps = timed_trl_steps(trainer)
    return {"steps": steps, "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
