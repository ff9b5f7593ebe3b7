"""QLoRA (``model.quantize: nf4``) and the 8-bit AdamW (``train.optimizer: adamw_8bit``) on the tiny model: the
base is NF4 at ~4.1 bits a weight, the reference is that base with the adapters off, training improves the
pairs, resume is bit-identical (8-bit optimizer state included), and ``final/`` is plain transformers' model
of what was trained."""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dpokit
from conftest import run_cli, write_pairs
from dpokit.errors import ConfigError
from dpokit.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="QLoRA needs torchao: pip install -c constraints.txt -e '.[qlora]'")
U32 = 2.0 ** -24  # unit roundoff of fp32 (round to nearest)

LORA = {"r": 64, "alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}
"""r = 64 makes q_proj's and v_proj's A (64 x 64) and q_proj's B big enough (4096 values) for 8-bit moments;
k_proj, o_proj, gate_proj and up_proj stay without adapters, so final/ must hold their NF4 values exactly."""


def qlora_config(tmp_path: Path, **train) -> dict:
    return {"model": {"name_or_path": "tiny-random-llama", "lora": LORA, "quantize": "nf4"},
            "reference": {"mode": "adapter"},
            "data": {"train": str(write_pairs(tmp_path / "pairs.jsonl", style="thanks")), "max_length": 48, "max_prompt_length": 24},
            "train": {"lr": 1e-2, "batch_size": 4, "max_steps": 6, "seed": 3, "save_every": 1, "progress": False,
                      **train}}


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


# ------------------------------------------------------------------------------------------------ config errors

@pytest.mark.parametrize("change, message", [
    ({"model": {"lora": None}}, "model.quantize: nf4 quantizes the frozen base of a LoRA policy; set model.lora"),
    ({"distributed": {"strategy": "fsdp"}}, "model.quantize: nf4 is not supported with distributed.strategy: fsdp"),
    ({"reference": {"mode": "store"}}, "model.quantize: nf4 takes reference.mode: adapter"),
    ({"model": {"quantize": "none"}, "train": {"optimizer": "adamw_8bit"}, "distributed": {"strategy": "fsdp"},
      "reference": {"mode": "model"}}, "train.optimizer: adamw_8bit is not supported with distributed.strategy"),
])
def test_quantize_refuses_what_it_cannot_do_in_one_line(tmp_path, change, message):
    cfg = qlora_config(tmp_path)
    for section, values in change.items():
        cfg.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        dpokit.load_config(cfg)


def test_without_torchao_the_error_names_the_extra(monkeypatch):
    from dpokit.models.quantize import torchao

    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    with pytest.raises(ConfigError, match=r"^model.quantize: nf4 needs torchao \(in a clone of dpokit: pip install -c constraints.txt -e '\.\[qlora\]'\)$"):
        torchao()
    with pytest.raises(ConfigError, match=r"^train.optimizer: adamw_8bit needs torchao"):
        torchao("train.optimizer: adamw_8bit")


@needs_torchao
def test_a_reference_copy_of_the_quantized_base_is_refused(tmp_path):
    cfg = qlora_config(tmp_path)
    cfg["reference"] = {"mode": "model"}
    with pytest.raises(ConfigError, match="set reference.mode: adapter"):
        dpokit.train(cfg, run_dir=str(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------- NF4 weights

@needs_torchao
def test_nf4_base_holds_about_4_bits_a_weight_and_leaves_embeddings_alone():
    from dpokit.models.loading import tiny_model, tiny_tokenizer
    from dpokit.models.quantize import (
        decoder_linears,
        nf4_bytes,
        quantize_base,
        quantized_weights,
        scale_group,
    )

    model = tiny_model(len(tiny_tokenizer()))
    originals = {name + ".weight": m.weight.detach().clone() for name, m in decoder_linears(model)}
    assert quantize_base(model, "nf4") == []
    nf4 = quantized_weights(model)
    assert set(nf4) == set(originals) and len(nf4) == 2 * 7  # q, k, v, o, gate, up, down in 2 layers
    assert not any("embed" in name or "lm_head" in name for name in nf4)
    total_bytes = total_values = 0
    for name, tensor in nf4.items():
        n = tensor.numel()
        groups = n // 64 // scale_group(n)
        # 4-bit codes, an int8 scale per 64-value block, an fp32 factor per group of scales, the 16-level fp32
        # table and the fp32 mean of the scales: nothing else is held.
        assert nf4_bytes(tensor) == n // 2 + n // 64 + 4 * groups + 16 * 4 + 4, name
        total_bytes += nf4_bytes(tensor)
        total_values += n
        # NF4 rounds each value to the nearest of 16 levels of its block's absmax s (the largest gap between
        # levels is 1 - 0.723 = 0.277, so the error is at most 0.139 s), and s itself is stored to int8 over
        # its group's range: a quantization, not a copy, but close.
        error = (tensor.get_original_weight() - originals[name]).abs().max().item()
        assert 0 < error < 0.2 * originals[name].abs().max().item(), name
    bits = 8 * total_bytes / total_values
    assert 4.0 < bits < 4.5, bits  # 4 + 8/64 = 4.125 plus the per-tensor constants of these small weights


# ---------------------------------------------------------------------------------------------------- training

@needs_torchao
@pytest.mark.equivalence
def test_qlora_trains_reference_is_quantized_base_and_final_is_plain(tmp_path):
    from transformers import AutoModelForCausalLM

    from dpokit.models.loading import load_models
    from dpokit.models.quantize import quantized_weights
    from dpokit.training.checkpoint import load_weights_into

    cfg = qlora_config(tmp_path)
    run = dpokit.train(cfg, run_dir=str(tmp_path / "qlora"))
    rows = train_rows(run)
    # LoRA's B starts at 0, so at step 1 the policy is the quantized base bit for bit: with the adapter-disabled
    # quantized base as pi_ref every margin is exactly 0 and the loss is ln 2 in fp32 (0.69314718...).
    assert rows[0]["rewards/margins"] == 0.0 and rows[0]["rewards/chosen"] == 0.0
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=U32)
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"] and rows[-1]["rewards/accuracies"] > rows[0]["rewards/accuracies"]
    # The reference is the *quantized* base: the same run on the plain base starts from other log-probs.
    plain_cfg = qlora_config(tmp_path, max_steps=1)
    plain_cfg["model"]["quantize"] = "none"
    plain = train_rows(dpokit.train(plain_cfg, run_dir=str(tmp_path / "plain")))
    assert plain[0]["logps/chosen"] != rows[0]["logps/chosen"]
    # Checkpoints hold only the adapters.
    ckpt = load_file(str(run / "checkpoints" / "step-6" / "model.safetensors"))
    assert ckpt and all("lora_" in name for name in ckpt)

    # The trained model as it ran: the base re-quantized (deterministic), the last checkpoint's adapters.
    trained = load_models(dpokit.load_config(run / "config.yaml").model, reference="never").policy
    load_weights_into(trained, run / "checkpoints" / "step-6")
    nf4 = {name.removeprefix("base_model.model.").replace(".base_layer", ""): t.get_original_weight()
           for name, t in quantized_weights(trained).items()}
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    final_weights = dict(final.named_parameters())
    for name, deq in nf4.items():
        if not any(target in name for target in LORA["target_modules"]):
            assert torch.equal(final_weights[name], deq), name  # no adapter: exactly the NF4 values
    # An adapted weight is fl(deq(W) + fl(s * fl(B @ A))): the exact sum rounded once (u |W'|) plus the rounding
    # of the rank-r product (r u |B||A|, Higham's gamma_r) and of its scaling (u s |B||A|), elementwise.
    s = LORA["alpha"] / LORA["r"]
    params = dict(trained.named_parameters())
    for name, deq in nf4.items():
        if any(target in name for target in LORA["target_modules"]):
            prefix = "base_model.model." + name.removesuffix(".weight")
            a = params[prefix + ".lora_A.default.weight"].detach().double()
            b = params[prefix + ".lora_B.default.weight"].detach().double()
            exact = deq.double() + s * (b @ a)
            bound = U32 * exact.abs() + (LORA["r"] + 2) * U32 * s * (b.abs() @ a.abs())
            assert ((final_weights[name].double() - exact).abs() <= bound).all(), name

    # Logits of final/ against the trained quantized model with its adapters on: every linear map of the merged
    # model sees a weight within the bound above, and x W'^T against x W^T + s (x A^T) B^T re-associates sums of
    # at most k = 128 products (gamma_k = k u relative to sum |x||w|, no sqrt(k) averaging assumed). The logits
    # pass through 2 layers x 4 maps in sequence (q/k/v, o, gate/up, down) plus the head: 9 k u relative to
    # max |logit| bounds them without relying on error cancellation.
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2, 50, 51, 52]])
    trained.eval()
    with torch.no_grad():
        ours, theirs = trained(ids).logits, final(ids).logits
    tolerance = 9 * 128 * U32 * ours.abs().max().item()
    assert (ours - theirs).abs().max().item() <= tolerance
    assert not torch.equal(ours, AutoModelForCausalLM.from_pretrained(tmp_path / "plain" / "final")(ids).logits)

    # dpokit score / eval on the run score against the reference training used: the NF4 values of the base.
    from dpokit.evaluate.scoring import load_scorer

    reference = dict(load_scorer(run).reference.named_parameters())
    assert all(torch.equal(reference[name], deq) for name, deq in nf4.items())

    # dpokit export of the last checkpoint rebuilds the same base (quantize, dequantize) and merges alike.
    from dpokit.integrations.export import export_run

    export_run(run, tmp_path / "exported", checkpoint="step-6")
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in load_file(str(run / "final" / "model.safetensors")).items())


def kill_after_checkpoint(args: list[str], ckpts: Path, complete: int, deadline: float = 300) -> None:
    """Start training and SIGKILL it once ``complete`` checkpoints are written."""
    proc = subprocess.Popen([sys.executable, "-m", "dpokit", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.time() + deadline
    while time.time() < end and proc.poll() is None:
        if ckpts.is_dir() and sum((p / "COMPLETE").exists() for p in ckpts.iterdir()) >= complete:
            proc.kill()
            proc.wait()
            return
        time.sleep(0.001)
    proc.kill()
    pytest.fail("the training process ended before it could be killed")


@needs_torchao
@pytest.mark.equivalence
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_qlora_resumes_bit_identically(tmp_path, optimizer):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(qlora_config(tmp_path, optimizer=optimizer)))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_cli("train", str(cfg), f"run_dir={straight}")
    assert done.returncode == 0, done.stderr[-2000:]
    kill_after_checkpoint(["train", str(cfg), f"run_dir={killed}"], killed / "checkpoints", complete=3)
    done = run_cli("train", str(cfg), f"run_dir={killed}", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (straight, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in train_rows(killed)] == list(range(1, 7))
    state = load_file(str(killed / "checkpoints" / "step-6" / "optimizer.safetensors"))
    quantized = [k for k in state if k.endswith(".codes")]
    assert bool(quantized) == (optimizer == "adamw_8bit")  # 8-bit moments travel as plain uint8 codes
    assert all(state[k].dtype == torch.uint8 for k in quantized)


# --------------------------------------------------------------------------------------------- 8-bit optimizer

@needs_torchao
def test_adamw_8bit_state_round_trips_through_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from dpokit.training.checkpoint import load_optimizer, optimizer_tensors
    from dpokit.training.optim8bit import adamw_8bit

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))  # 8192 and 1024 values
        return model, adamw_8bit(list(model.parameters()), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)

    def train(model, optimizer, steps, seed):
        torch.manual_seed(seed)
        for _ in range(steps):
            model(torch.randn(4, 64)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    straight, opt = model_and_optimizer()
    train(straight, opt, 2, seed=1)
    saved = {k: v.clone() for k, v in straight.state_dict().items()}
    tensors, meta = optimizer_tensors(opt)
    assert tensors["0.exp_avg.codes"].dtype == torch.uint8 and "2.exp_avg" in tensors  # 8-bit and fp32 moments
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "optimizer.json").write_text(json.dumps(meta))
    train(straight, opt, 2, seed=2)

    resumed, opt2 = model_and_optimizer()
    resumed.load_state_dict(saved)
    load_optimizer(opt2, load_file(str(tmp_path / "optimizer.safetensors")),
                   json.loads((tmp_path / "optimizer.json").read_text()))
    train(resumed, opt2, 2, seed=2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@needs_torchao
def test_adamw_8bit_trains_every_weight(tmp_path):
    cfg = qlora_config(tmp_path, optimizer="adamw_8bit", lr=1e-3)
    cfg["model"] = {"name_or_path": "tiny-random-llama"}
    cfg["reference"] = {"mode": "model"}
    rows = train_rows(dpokit.train(cfg, run_dir=str(tmp_path / "full")))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=U32)
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
