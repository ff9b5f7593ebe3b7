"""Reference modes give the same training as the in-memory frozen reference; the store is content-addressed,
reused across runs, resumable, and recomputed when its key changes; LoRA trains and exports merged weights."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dpokit
from conftest import write_pairs
from dpokit.training.metrics import read_metrics
from dpokit.training.reference import LogpStore
from tolerances import assert_same_metrics, assert_same_weights_after_adamw

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, **sections) -> dict:
    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(write_pairs(tmp_path / "pairs.jsonl", 12, style="request")), "max_length": 48, "max_prompt_length": 24},
           "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 4, "seed": 2, "progress": False},
           "reference": {"store_dir": str(tmp_path / "store")}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def assert_same_training(a: Path, b: Path, lr: float = 1e-3, steps: int = 4) -> None:
    """The reference log-probs of the store are computed in other batches than the model reference's (fp32
    round-off); everything downstream is the same arithmetic. Bounds derived in tolerances.py. The weights
    compared are the trained parameters themselves (the last checkpoint: with LoRA only the adapters, which
    AdamW updates directly; final/ holds them merged, a product the per-element AdamW bound does not cover)."""
    assert_same_metrics(train_rows(a), train_rows(b), ("loss", "grad_norm", "rewards/chosen", "rewards/rejected"))
    last = f"checkpoints/step-{steps}/model.safetensors"
    assert_same_weights_after_adamw(load_file(str(a / last)), load_file(str(b / last)), lr, steps)


@pytest.mark.equivalence
def test_store_equals_model_reference_and_is_reused(tmp_path, capsys):
    model_run = dpokit.train(config(tmp_path, reference={"mode": "model"}), run_dir=str(tmp_path / "model"))
    store_run = dpokit.train(config(tmp_path, reference={"mode": "store"}), run_dir=str(tmp_path / "store-run"))
    assert_same_training(model_run, store_run)
    assert "24 responses computed, 0 reused" in capsys.readouterr().err
    # A beta sweep on the same data and reference reuses every stored log-prob.
    dpokit.train(config(tmp_path, reference={"mode": "store"}, loss={"beta": 0.5}), run_dir=str(tmp_path / "b2"))
    assert "0 responses computed, 24 reused" in capsys.readouterr().err
    # A changed key (truncation settings change the token ids) computes afresh.
    dpokit.train(config(tmp_path, reference={"mode": "store"}, data={"max_length": 30, "max_prompt_length": 6}),
                 run_dir=str(tmp_path / "trunc"))
    err = capsys.readouterr().err
    assert "0 responses computed" not in err and "responses computed" in err
    # bf16 reference log-probs are different numbers: a different key too.
    dpokit.train(config(tmp_path, reference={"mode": "store"}, train={"precision": "bf16"}),
                 run_dir=str(tmp_path / "bf16"))
    assert "24 responses computed, 0 reused" in capsys.readouterr().err
    # So are those of another layout or attention implementation (the same sums, rounded otherwise).
    ran = yaml.safe_load((store_run / "config.yaml").read_text())["model"]["attn_implementation"]  # auto's pick
    other = {"sdpa": "eager", "eager": "sdpa"}[ran]
    for what, settings in (("padded", {"train": {"layout": "padded"}}),
                           (other, {"model": {"attn_implementation": other}})):
        dpokit.train(config(tmp_path, reference={"mode": "store"}, **settings), run_dir=str(tmp_path / what))
        assert "24 responses computed, 0 reused" in capsys.readouterr().err


def test_interrupted_precompute_resumes(tmp_path, capsys):
    from dpokit.data import load_preferences
    from dpokit.models.loading import tiny_model, tiny_tokenizer
    from dpokit.training.reference import precompute

    cfg = dpokit.load_config(config(tmp_path))
    tok = tiny_tokenizer()
    pairs, _ = load_preferences(cfg.data.train, tok, cfg.data)
    store = LogpStore(tmp_path / "partial")
    model = tiny_model(len(tok))
    calls = {"n": 0}

    def stop_after_first_shard(done, total):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    key = b"k" * 32
    with pytest.raises(KeyboardInterrupt):
        precompute(store, model, key, pairs, tok.pad_token_id, lambda: torch.autocast("cpu", enabled=False),
                   torch.device("cpu"), batch_size=2, shard_rows=4, progress=stop_after_first_shard)  # 2 pairs: 4 responses
    again = LogpStore(tmp_path / "partial")
    assert len(again) == 8  # the two shards finished before the interruption survived
    assert not list((tmp_path / "partial").glob(".tmp-*"))
    done = precompute(again, model, key, pairs, tok.pad_token_id, lambda: torch.autocast("cpu", enabled=False),
                      torch.device("cpu"), batch_size=4)
    assert done == 16 and len(again) == 24  # only the missing ones were computed


@pytest.mark.equivalence
def test_lora_with_adapter_reference_and_merged_export(tmp_path):
    lora = {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    adapter = dpokit.train(config(tmp_path, model=lora, reference={"mode": "adapter"}, train={"lr": 1e-2}),
                           run_dir=str(tmp_path / "adapter"))
    model = dpokit.train(config(tmp_path, model=lora, reference={"mode": "model"}, train={"lr": 1e-2}),
                         run_dir=str(tmp_path / "lora-model"))
    store = dpokit.train(config(tmp_path, model=lora, reference={"mode": "store"}, train={"lr": 1e-2}),
                         run_dir=str(tmp_path / "lora-store"))
    assert_same_training(model, adapter, lr=1e-2)
    assert_same_training(model, store, lr=1e-2)
    rows = train_rows(adapter)
    # LoRA's B starts at 0, so at step 1 the adapter adds exactly 0: pi == pi_ref bit for bit, every margin is 0
    # and the loss is ln 2 in fp32 (0.69314718); 1e-5 also covers the 6-digit constant written here.
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and rows[-1]["loss"] < rows[0]["loss"]
    # Only adapter weights were trained and checkpointed.
    ckpt = load_file(str(adapter / "checkpoints" / "step-4" / "model.safetensors"))
    assert ckpt and all("lora_" in name for name in ckpt)
    # final/ is a plain model with merged weights: no adapter files, and it reproduces the policy.
    final = adapter / "final"
    assert not (final / "adapter_config.json").exists()
    weights = load_file(str(final / "model.safetensors"))
    assert not any("lora" in name for name in weights)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(final)
    from dpokit.models.loading import load_models

    base = load_models(dpokit.load_config(config(tmp_path)).model, reference="never").policy
    moved = [(merged.state_dict()[k] - v).abs().max().item() for k, v in base.state_dict().items()
             if "q_proj" in k or "v_proj" in k]
    assert max(moved) > 0  # the adapters' update is in the merged weights


def test_adapter_mode_without_lora_is_a_config_error():
    from dpokit.errors import ConfigError

    with pytest.raises(ConfigError, match="reference.mode: 'adapter' needs model.lora"):
        dpokit.load_config({"reference": {"mode": "adapter"}})


# ---------------------------------------------------------------------------------------------------------------
# TR-DPO: reference.sync updates pi_ref from the policy every `every` steps


def test_sync_reference_soft_hard_and_none_by_hand():
    from dpokit.training.reference import sync_reference

    def linear(value: float) -> torch.nn.Linear:
        layer = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            layer.weight.fill_(value)
        return layer

    policy = linear(3.0)
    for alpha, want in ((0.0, 1.0), (0.25, 1.5), (0.5, 2.0), (1.0, 3.0)):  # (1 - alpha) * 1 + alpha * 3
        reference = linear(1.0)
        sync_reference(reference, policy, alpha)
        assert reference.weight.tolist() == [[want, want]]
    # The hard update copies: pi_ref is then exactly pi, even where ref + (pi - ref) would round differently.
    reference, policy = linear(1e-8), linear(0.1 + 1e-7)
    sync_reference(reference, policy, 1.0)
    assert torch.equal(reference.weight, policy.weight)


def final_reference(run_dir: Path) -> dict[str, torch.Tensor]:
    steps = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return load_file(str(steps[-1] / "reference.safetensors"))


def test_reference_sync_hard_makes_pi_ref_the_policy_and_alpha_zero_changes_nothing(tmp_path):
    plain = dpokit.train(config(tmp_path), run_dir=str(tmp_path / "plain"))
    never = dpokit.train(config(tmp_path, reference={"sync": {"every": 1, "alpha": 0.0}}),
                         run_dir=str(tmp_path / "never"))
    hard = dpokit.train(config(tmp_path, reference={"sync": {"every": 2, "alpha": 1.0}}),
                        run_dir=str(tmp_path / "hard"))
    policy = lambda d: load_file(str(d / "final" / "model.safetensors"))  # noqa: E731
    # alpha = 0: pi_ref never moves, so the run is the plain one bit for bit, and its saved reference is pi_ref.
    a, b = policy(plain), policy(never)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Hard sync at step 4 (the last): the saved reference is the final policy, tensor for tensor.
    ref, final = final_reference(hard), policy(hard)
    assert all(torch.equal(ref[k], final[k]) for k in final)
    # pi_ref moved at step 2 (to the policy after step 2's update), so step 3's rewards differ from the plain run's.
    assert train_rows(hard)[2]["rewards/margins"] != train_rows(plain)[2]["rewards/margins"]


@pytest.mark.parametrize("tree, says", [
    ({"reference": {"mode": "store", "sync": {"every": 2}}}, "needs reference.mode: model"),
    ({"reference": {"mode": "adapter", "sync": {"every": 2}}, "model": {"lora": {"r": 4}}},
     "needs reference.mode: model"),
    ({"reference": {"sync": {"every": 2}}, "model": {"lora": {"r": 4}}}, "model.lora"),
    ({"reference": {"sync": {"every": 2}}, "distributed": {"strategy": "fsdp"}}, "fsdp"),
    ({"reference": {"sync": {"every": 0}}}, "every"),
    ({"reference": {"sync": {"alpha": 1.5}}}, "alpha"),
])
def test_reference_sync_refusals_are_one_line(tree, says):
    from dpokit.config import Config

    with pytest.raises(ValueError, match=says) as caught:
        Config(**tree)
    assert "reference.sync" in str(caught.value)


LN2_FP32 = float(torch.tensor(2.0).log())  # the loss is computed in fp32: -log sigmoid(0) = ln 2 rounded to fp32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["model", "adapter", "store"])
def test_first_step_starts_at_ln2_in_every_precision_and_reference_mode(tmp_path, mode, attention, precision):
    """At step 1 the policy is the reference, so every implicit reward is exactly 0 and the loss exactly ln 2:
    the reference's log-probs must be computed as the policy's are, number for number. bf16 is where a
    difference shows most (a response laid out at another offset rounds differently); the store is filled
    first by a separate run, as a beta sweep would reuse it."""
    model = {"attn_implementation": attention}
    if mode == "adapter":
        model["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    settings = dict(model=model, reference={"mode": mode}, train={"precision": precision, "max_steps": 1})
    if mode == "store":
        dpokit.train(config(tmp_path, **settings), run_dir=str(tmp_path / "fill"))
    first = train_rows(dpokit.train(config(tmp_path, **settings), run_dir=str(tmp_path / "run")))[0]
    assert (first["rewards/chosen"], first["rewards/rejected"]) == (0.0, 0.0)
    assert first["loss"] == LN2_FP32
