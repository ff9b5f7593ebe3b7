"""Shared pieces of the dpokit benchmarks: synthetic pairs, the machine, a matrix-product peak, per-process peak
memory, model FLOPs, and one dpokit training run in a child process.

Nothing here is imported by dpokit itself. Every measured run happens in its own child process (``python
benchmarks/<script>.py --child ...``) so that its peak RSS is its own, and the parent only orchestrates.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Ordinary English words, so that the tokenizer sees realistic text (mostly one token per word, a few split).
WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which but have an they
you were her she there been one all we their has would when if so no what up out more about into than them
can only other time new some could these two may first then do any like my now over such our man me even most
made after also did many before must through back years where much your way well down should because each just
those people how too little state good very make world still own see men work long get here between both life
being under never day same another know while last might us great old year off come since against go came right
used take three small house water family garden morning evening river mountain city village market kitchen
bread coffee music science history language teacher student doctor friend children question answer story
simple careful quiet bright warm cold summer winter spring autumn weather travel train road bridge window door
table chair paper letter picture colour green blue red yellow light dark early late quickly slowly often always
sometimes usually together alone happy tired ready strong gentle honest helpful clear short useful important
explain describe compare remember decide believe understand consider improve prepare protect support follow
learn teach build write read listen watch cook clean plant grow carry share change start finish open close
""".split()

OPENERS = ["Explain", "Describe", "Tell me", "Can you explain", "Please describe", "Write a short note about",
           "Give advice on", "Compare", "Summarize", "What do you think about"]


PROMPT_TOKENS = (20, 60)
RESPONSE_TOKENS = (10, 40)


def _grow(tokenizer: Any, rng: random.Random, head: str, target: int, tail: str, extra: int = 0) -> str:
    """Append random words to ``head`` until ``head + words + tail`` has ``target - extra`` tokens (or one more,
    a word may be two tokens)."""
    words: list[str] = []
    while True:
        text = head + " ".join(words) + tail
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) + extra >= target:
            return text
        words.append(rng.choice(WORDS))


def make_pairs(tokenizer: Any, n: int, seed: int = 0, prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
               response_tokens: tuple[int, int] = RESPONSE_TOKENS) -> list[dict[str, str]]:
    """``n`` standard-format pairs ``{"prompt", "chosen", "rejected"}``, seeded. Prompt lengths are drawn uniformly
    from ``prompt_tokens`` and each response length from ``response_tokens`` (tokens of the
    tokenizer, the response's end token included). Responses start with a space, so the prompt + response text
    tokenizes as prompt tokens + response tokens (no merge across the join)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p_len = rng.randint(*prompt_tokens)
        c_len, r_len = rng.randint(*response_tokens), rng.randint(*response_tokens)
        opener = rng.choice(OPENERS)
        prompt = _grow(tokenizer, rng, f"Question {i}: {opener} ", p_len, "?\nAnswer:")
        chosen = _grow(tokenizer, rng, " ", c_len, ".", extra=1)  # +1: the end token both systems append
        rejected = _grow(tokenizer, rng, " ", r_len, ".", extra=1)
        if rejected == chosen:
            rejected = rejected[:-1] + "!"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------------- machine

def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu"] = value.strip()
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    info["avx512_bf16"] = "avx512_bf16" in flags
    info["amx"] = "amx_bf16" in flags
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            info["ram_gb"] = round(int(line.split()[1]) / 1024**2, 1)
    import torch
    import transformers

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["transformers"] = transformers.__version__
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = "not installed"
    return info


def matmul_gflops(dtype_name: str, size: int = 2048, seconds: float = 3.0) -> float:
    """Best-of GFLOP/s of (size x size) @ (size x size) on the CPU, measured as ``dpokit env`` measures it."""
    import torch

    from dpokit.models.hardware import matmul_gflops as measure

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    return measure(torch.device("cpu"), dtype, size, seconds)


def trl_trainer(spec: dict[str, Any], **dpo_args: Any) -> Any:
    """TRL's DPOTrainer on ``spec``'s model and pairs (a JSON-lines file), a constant learning rate and the
    sigmoid loss, sequential batches, no saving or logging anywhere: what every TRL run of the benchmarks shares.
    ``dpo_args`` are the DPOConfig settings a benchmark sets on top (precision, beta, seed, ...)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["hf_cache"])
    args = DPOConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        loss_type=["sigmoid"], max_length=spec["max_length"], report_to="none", logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, train_sampling_strategy="sequential", disable_tqdm=True,
        **dpo_args)
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def process_cpu_s() -> float:
    """User + system CPU seconds of this process, all threads."""
    times = os.times()
    return times.user + times.system


def proc_status_mb(field: str = "VmHWM") -> float:
    """``VmHWM`` (peak resident set so far) or ``VmRSS`` of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(script: Path, args: list[str], log_path: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script args`` to completion; returns its wall time, exit code and peak RSS (``ru_maxrss``
    of exactly this child, via ``wait4``). Output goes to ``log_path``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=str(ROOT))
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    cpu = usage.ru_utime + usage.ru_stime
    return {"rc": proc.returncode, "wall_s": wall, "ru_maxrss_mb": usage.ru_maxrss / 1024, "cpu_s": cpu,
            "cpu_share": cpu / wall / (os.cpu_count() or 1)}


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]), idle


def machine_busy(seconds: float = 3.0) -> float:
    """Fraction of all cores busy over the next ``seconds`` (other processes: nothing of ours runs now)."""
    total0, idle0 = _cpu_times()
    time.sleep(seconds)
    total1, idle1 = _cpu_times()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_quiet(max_wait: float, threshold: float = 0.15, log: Any = print) -> float:
    """Wait (up to ``max_wait`` seconds) until other processes use less than ``threshold`` of the machine;
    returns the last busy fraction measured."""
    deadline = time.perf_counter() + max_wait
    busy = machine_busy()
    while busy > threshold and time.perf_counter() < deadline:
        log(f"  machine {busy:.0%} busy with other processes; waiting for a quieter moment ...")
        time.sleep(20)
        busy = machine_busy()
    return busy


# --------------------------------------------------------------------------------------------------------- FLOPs

def model_dims(folder: str) -> dict[str, int]:
    """Sizes the FLOP count needs, read from the model built on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    head = 0 if tied else model.get_output_embeddings().weight.numel()
    return {"params": total, "non_embedding_params": total - embed - head, "hidden": config.hidden_size,
            "vocab": config.vocab_size, "layers": config.num_hidden_layers,
            "attn_width": config.num_attention_heads * getattr(config, "head_dim",
                                                               config.hidden_size // config.num_attention_heads)}


def step_flops(dims: dict[str, int], rows: int, width: int, projected: int, ref_rows: int = 0,
               ref_width: int = 0, ref_projected: int = 0) -> float:
    """Model FLOPs of one training step (a multiply-add is 2 FLOPs; backward is twice the forward).

    Policy, trained (x6 = forward + backward):
      6 * N * computed positions                 N = non-embedding parameters; positions = rows * width, padding
                                                 included (the hardware computes it)
      6 * hidden * vocab * projected positions   positions whose hidden state goes through the LM head
      12 * layers * d_attn * width^2 * rows      scores and values over the full (width x width) matrix that a
                                                 masked SDPA computes on CPU
    Reference online (x2 = forward only): the same three terms with 2, 2 and 4 in place of 6, 6 and 12.
    Activation recomputation (dpokit's checkpointed LM-head chunks) is not counted: model FLOPs, not hardware
    FLOPs."""
    n, h, v, layers, d = (dims["non_embedding_params"], dims["hidden"], dims["vocab"], dims["layers"],
                          dims["attn_width"])

    def part(factor: int, r: int, w: int, p: int) -> float:
        return factor * n * r * w + factor * h * v * p + 2 * factor * layers * d * w * w * r

    return part(6, rows, width, projected) + (part(2, ref_rows, ref_width, ref_projected) if ref_rows else 0.0)


# ------------------------------------------------------------------------------------------------ a dpokit run

def dpokit_config(data: str, model: str, steps: int, batch_size: int, lr: float, beta: float, max_length: int,
                  max_prompt_length: int, seed: int, store_dir: str, **train: Any) -> dict[str, Any]:
    """The dpokit config a benchmark run uses: the DPO sigmoid loss, AdamW, constant lr, no shuffling (the
    pairs are visited in file order, as TRL's sequential sampler visits them), ``train`` overrides on top
    (``layout``, ``precision``, ``gradient_checkpointing``, ...); ``reference_mode`` / ``lora`` are popped."""
    reference_mode = train.pop("reference_mode", "model")
    lora = train.pop("lora", None)
    cfg = {
        "overwrite": True,
        "model": {"name_or_path": model},
        "data": {"train": data, "max_length": max_length, "max_prompt_length": max_prompt_length},
        "loss": {"name": "sigmoid", "beta": beta},
        "train": {"lr": lr, "batch_size": batch_size, "grad_accum": 1, "max_steps": steps, "seed": seed,
                  "optimizer": "adamw", "weight_decay": 0.0, "warmup_steps": 0, "scheduler": "constant",
                  "max_grad_norm": 10.0, "shuffle": False, "log_every": 1, "progress": False, **train},
        "reference": {"mode": reference_mode, "store_dir": store_dir},
    }
    if lora:
        cfg["model"]["lora"] = lora
    return cfg


def dpokit_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with dpokit in this process; return per-step metrics, the one-off reference setup time and the peak
    RSS at the end of the last step (before the final checkpoint and export, which are not part of training).

    The timers wrap dpokit's own functions from outside (no change to dpokit): ``build_reference`` (for
    ``store``: fingerprint the weights, fill the store, drop the model) and ``save_checkpoint`` (called first
    right after the last step)."""
    import importlib

    import dpokit

    # ``dpokit.train`` the attribute is the API function; the module of the same name is in sys.modules.
    train_module = importlib.import_module("dpokit.training.setup")
    loop_module = importlib.import_module("dpokit.training.loop")
    reference_module = importlib.import_module("dpokit.training.reference")

    marks: dict[str, Any] = {}
    build_reference = train_module.build_reference
    precompute = reference_module.precompute
    save_checkpoint = train_module.save_checkpoint

    def timed_build(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = build_reference(*args, **kwargs)
        marks["reference_setup_s"] = time.perf_counter() - start
        marks["rss_after_reference_setup_mb"] = proc_status_mb("VmRSS")
        return out

    def timed_precompute(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = precompute(*args, **kwargs)
        marks["precompute_s"] = time.perf_counter() - start
        marks["precomputed_responses"] = out
        return out

    def first_save(*args: Any, **kwargs: Any) -> Any:
        if "train_end_hwm_mb" not in marks:
            marks["train_end_hwm_mb"] = proc_status_mb("VmHWM")
            marks["train_end_rss_mb"] = proc_status_mb("VmRSS")
        return save_checkpoint(*args, **kwargs)

    class StampedWriter(loop_module.MetricsWriter):  # type: ignore[name-defined,misc]
        """Stamps this process's CPU time on every training row (how much of the cores the run really got)."""

        def write(self, row: dict[str, Any]) -> None:
            if row.get("split") == "train":
                cpu[row["step"]] = process_cpu_s()
            super().write(row)

    cpu: dict[int, float] = {}
    loop_module.MetricsWriter = StampedWriter
    train_module.build_reference = timed_build
    reference_module.precompute = timed_precompute
    train_module.save_checkpoint = first_save
    start = time.perf_counter()
    run_dir = dpokit.train(spec["config"], run_dir=spec["run_dir"])
    total = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    for row in rows:
        row["cpu_s"] = cpu.get(row["step"])
    return {"system": spec["name"], "steps": rows, "total_s": total, **marks}


def dpokit_layouts(data: Path, model: str, batch_size: int, steps: int, max_length: int,
                   max_prompt_length: int) -> tuple[list[list[list[int]]], dict[str, list[dict[str, int]]]]:
    """dpokit's token ids for every pair, and per step and layout the batch geometry the FLOP count needs
    (``collate_pairs`` is deterministic: the same call the training loop makes)."""
    from transformers import AutoTokenizer

    from dpokit.config import DataConfig
    from dpokit.data import load_preferences
    from dpokit.data.batch import collate_pairs

    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs, _ = load_preferences(str(data), tokenizer,
                                DataConfig(max_length=max_length, max_prompt_length=max_prompt_length))
    ids = [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs]
    geometry: dict[str, list[dict[str, int]]] = {}
    for layout in ("padded", "packed"):
        geometry[layout] = []
        for k in range(steps):
            batch = collate_pairs(pairs[k * batch_size:(k + 1) * batch_size], tokenizer.pad_token_id,
                                  layout=layout)
            rows, width = batch["input_ids"].shape
            geometry[layout].append({"rows": rows, "width": width, "projected": int(batch["targets"].numel()),
                                     "computed": batch["computed_positions"], "real": batch["real_positions"],
                                     "tokens": batch["tokens"]})
    return ids, geometry


def timed_summary(steps: list[dict[str, Any]], warmup: int = 1) -> dict[str, float]:
    """s/step and tokens/s over the steps after ``warmup``: each step's time is the difference of consecutive
    ``elapsed_s`` (everything between two steps' ends: data, forward, backward, optimizer, logging)."""
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps[warmup - 1:], steps[warmup:])]
    tokens = [s["tokens"] for s in steps[warmup:]]
    cpu = [b.get("cpu_s", 0) - a.get("cpu_s", 0) if b.get("cpu_s") is not None and a.get("cpu_s") is not None
           else float("nan") for a, b in zip(steps[warmup - 1:], steps[warmup:])]
    import torch

    return {"timed_steps": len(times), "s_per_step": sum(times) / len(times),
            "cpu_share": sum(cpu) / sum(times) / torch.get_num_threads(),
            "tokens_per_s": sum(tokens) / sum(times), "tokens_per_step": sum(tokens) / len(tokens),
            "step_times": times}
