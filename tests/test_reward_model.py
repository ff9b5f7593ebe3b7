"""The Bradley-Terry reward model (``dpokit rm``): the loss against hand-derived numbers, the reward read where
AutoModelForSequenceClassification reads it, the tiny config end to end (the loss falls, held-out accuracy above
chance, final/ loads and scores the same in plain transformers), exact resume, LoRA, bf16, 2 ranks = 1 rank, and
the trained model as a reward for dpokit eval, dpokit serve and the recipe."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dpokit
from conftest import write_pairs  # the same small preference file DPO's tests train on
from dpokit.errors import ConfigError, DpokitError
from dpokit.methods.reward_model import (
    RewardModule,
    bradley_terry_loss,
    load_reward_model,
    reward_model_from_causal,
)
from dpokit.models.loading import tiny_model, tiny_tokenizer
from dpokit.rewards import get_reward, reward_name, score_texts
from dpokit.training.metrics import read_metrics
from tolerances import METRIC_REL, assert_same_weights_after_adamw

ROOT = Path(__file__).resolve().parents[1]
DPOKIT = [sys.executable, "-m", "dpokit"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
LR = 1e-3

# Rewards of the same rows computed on other shapes (a padded batch of neighbours, a row alone, another attention
# kernel) differ by fp32 round-off only. A reward is w . h of the last hidden state: 64 products after two decoder
# layers whose sums have <= 128 terms, each rounded to EPS32 / 2 ~ 6e-8 relative, so two orders differ by
# ~sqrt(128) * 6e-8 ~ 1e-6 of the terms' size (a few units here; measured 3e-7). METRIC_REL (1e-5, absolute below
# 1) leaves 10x; reading another position or another row changes a reward by 1e-2 or more.
REWARD_TOL = METRIC_REL


def close(a: float, b: float) -> bool:
    return abs(a - b) <= REWARD_TOL * max(1.0, abs(a))


def base_config(tmp_path: Path, n: int = 16, **sections) -> dict:
    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(write_pairs(tmp_path / f"pairs-{n}.jsonl", n)), "max_length": 64,
                    "max_prompt_length": 32},
           "train": {"lr": LR, "max_steps": 3, "batch_size": 8, "seed": 3, "progress": False}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def rows_of(run_dir: Path, split: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == split]


# ------------------------------------------------------------------------------------------------- the math

def test_bradley_terry_loss_matches_hand_derived_values_and_gradient_signs():
    margins = [0.0, 1.0, -1.0, 3.5, -20.0, 80.0]
    chosen = torch.tensor([m + 0.25 for m in margins], dtype=torch.float64, requires_grad=True)
    rejected = torch.full((len(margins),), 0.25, dtype=torch.float64, requires_grad=True)
    losses = bradley_terry_loss(chosen, rejected)
    # -log sigma(m) = log(1 + e^-m): ln 2 at m = 0; |m| for a large wrong margin; 0 in the limit of a large right one.
    for m, value in zip(margins, losses.tolist()):
        assert value == pytest.approx(math.log1p(math.exp(-m)), rel=1e-12, abs=1e-300)
    assert losses[0].item() == pytest.approx(math.log(2), rel=1e-15)
    assert losses[4].item() == pytest.approx(20.0, rel=1e-8)
    losses.sum().backward()
    # d loss / d r_c = -sigma(-m) = -(1 - sigma(m)); d loss / d r_r is its negative: descent raises r_c, lowers r_r.
    for m, g_c, g_r in zip(margins, chosen.grad.tolist(), rejected.grad.tolist()):
        assert g_c == pytest.approx(-1.0 / (1.0 + math.exp(m)), rel=1e-12, abs=1e-300)
        assert g_r == -g_c
        assert g_c < 0 or m > 30  # sigma(-80) underflows to ~1e-35, still not positive
    # fp32 (training's dtype): finite at margins far beyond fp32's exp range.
    far = bradley_terry_loss(torch.tensor([-200.0, 200.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(far).all() and far[0].item() == pytest.approx(200.0) and far[1].item() == 0.0


def test_reward_is_read_at_the_rightmost_non_pad_token_as_transformers_reads_it():
    tok = tiny_tokenizer()
    lm = tiny_model(len(tok), seed=1)
    eos = tok.eos_token_id
    rows = [[1, 40, 41, 42, eos], [1, 50, eos], [1, 60, 61, 62, 63, 64, eos]]
    for pad in (tok.pad_token_id, eos):  # a tokenizer that pads with its EOS: the reward sits before the EOS
        model = reward_model_from_causal(lm, pad, seed=0).eval()
        assert model.config.pad_token_id == pad and model.config.num_labels == 1
        # The backbone is the causal LM's, the head drawn from the seed (the same seed draws the same head).
        assert torch.equal(model.model.embed_tokens.weight, lm.model.embed_tokens.weight)
        assert torch.equal(model.score.weight, reward_model_from_causal(lm, pad, seed=0).score.weight)
        assert not torch.equal(model.score.weight, reward_model_from_causal(lm, pad, seed=1).score.weight)
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            batched = RewardModule(model)({"input_ids": ids, "attention_mask": mask})
            for i, row in enumerate(rows):
                hidden = model.model(input_ids=torch.tensor([row])).last_hidden_state[0]  # (T, H)
                read = len(row) - 1 if pad != eos else len(row) - 2  # the rightmost token that is not pad
                by_hand = model.score(hidden[read]).item()
                assert close(batched[i].item(), by_hand), (pad, i, batched[i].item(), by_hand)


# ---------------------------------------------------------------------------------------- the tiny config

@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """configs/tiny-rm.yaml trained by the CLI (40 steps, checkpoints at 20 and 40, held-out every 10)."""
    run_dir = tmp_path_factory.mktemp("rm") / "tiny-rm"
    proc = subprocess.run([*DPOKIT, "rm", "configs/tiny-rm.yaml", f"run_dir={run_dir}", "train.progress=false"],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_tiny_config_learns_logs_the_metrics_and_writes_the_run_folder(tiny_rm):
    train, held_out = rows_of(tiny_rm, "train"), rows_of(tiny_rm, "eval")
    assert [r["step"] for r in train] == list(range(1, 41))
    for key in ("step", "elapsed_s", "tokens", "loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected",
                "grad_norm", "lr", "tokens_per_second", "skipped_steps"):
        assert key in train[0], key
    assert "rewards/accuracies" not in train[0] and "logps/chosen" not in train[0]
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 0.3, (first, last)  # starts near ln 2 (random head: rewards ~0)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=0.1)
    for r in train:
        assert r["margin"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
    assert [r["step"] for r in held_out] == [0, 10, 20, 30, 40]
    # 16 held-out pairs: chance is 8 right; at least 13 right has probability < 1.1% under chance.
    assert held_out[-1]["accuracy"] >= 13 / 16 and held_out[-1]["loss"] < held_out[0]["loss"] - 0.2
    assert {"loss", "accuracy", "margin"} <= set(held_out[-1])
    config = yaml.safe_load((tiny_rm / "config.yaml").read_text())
    assert config["train"]["layout"] == "padded" and config["train"]["precision"] == "fp32"
    state = json.loads((tiny_rm / "checkpoints" / "step-40" / "trainer_state.json").read_text())
    assert state["task"] == "rm"
    assert not [p for p in tiny_rm.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]
    architecture = json.loads((tiny_rm / "final" / "config.json").read_text())
    assert architecture["architectures"] == ["LlamaForSequenceClassification"]
    assert len(architecture["id2label"]) == 1 and architecture["pad_token_id"] == 0


def test_final_loads_in_plain_transformers_and_scores_as_dpokit_does(tiny_rm):
    from dpokit.integrations.hub import front_matter

    meta = front_matter((tiny_rm / "final" / "README.md").read_text())
    assert meta["pipeline_tag"] == "text-classification" and {"dpokit", "reward-model"} <= set(meta["tags"])
    prompts = ["What is two plus two?", "How do I make tea?", "Hi"]
    responses = [" Two plus two is four. Glad to help!", " Figure it out yourself.", ""]
    scorer = get_reward(str(tiny_rm))
    ours = scorer.batch(prompts, responses)
    rows = [p + r for p, r in scorer.encode(prompts, responses)]
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "folder, rows = sys.argv[1], json.loads(sys.argv[2])\n"
        "model = AutoModelForSequenceClassification.from_pretrained(folder).eval()\n"
        "tok = AutoTokenizer.from_pretrained(folder)\n"
        "assert model.config.num_labels == 1\n"
        "with torch.no_grad():\n"
        "    alone = [model(torch.tensor([r])).logits[0, 0].item() for r in rows]\n"
        "    padded = tok.pad({'input_ids': rows}, return_tensors='pt')\n"
        "    together = model(**padded).logits[:, 0].tolist()\n"
        "assert 'dpokit' not in sys.modules\n"
        "print(json.dumps({'alone': alone, 'together': together}))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_rm / "final"), json.dumps(rows)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    for i, value in enumerate(ours):  # round-off only (REWARD_TOL): the same rows on other shapes
        assert close(value, plain["alone"][i]) and close(value, plain["together"][i]), (i, value, plain)
    assert ours[0] > ours[1]  # a polite answer over a rude one, as trained


def test_resume_from_a_checkpoint_is_bit_identical(tiny_rm, tmp_path):
    copy = tmp_path / "resumed"
    shutil.copytree(tiny_rm, copy)
    shutil.rmtree(copy / "checkpoints" / "step-40")
    shutil.rmtree(copy / "final")
    proc = subprocess.run([*DPOKIT, "rm", "configs/tiny-rm.yaml", f"run_dir={copy}", "train.progress=false",
                           "--resume"], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step 20" in proc.stderr
    whole, resumed = weights(tiny_rm), weights(copy)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert [r["loss"] for r in rows_of(copy, "train")] == [r["loss"] for r in rows_of(tiny_rm, "train")]


def test_bad_config_key_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nmodel:\n  name_or_path: tiny-random-llama\ntrain:\n  lr: 1e-3\n  warmup: 5\n")
    proc = subprocess.run([*DPOKIT, "rm", str(bad)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.warmup: unknown key" in proc.stderr


# ---------------------------------------------------------------------------------------------- variants

def test_lora_trains_adapters_and_the_head_and_final_is_merged(tmp_path):
    cfg = base_config(tmp_path, model={"lora": {"r": 4, "alpha": 8}}, train={"max_steps": 2})
    run_dir = dpokit.rm(cfg, run_dir=str(tmp_path / "lora"))
    saved = load_file(str(run_dir / "checkpoints" / "step-2" / "model.safetensors"))
    assert any("lora_A" in name for name in saved) and any("modules_to_save" in name and "score" in name
                                                            for name in saved)
    final = weights(run_dir)
    assert not any("lora" in name or "modules_to_save" in name for name in final)
    tok = tiny_tokenizer()
    start = reward_model_from_causal(tiny_model(len(tok)), tok.pad_token_id, seed=3)
    assert not torch.equal(final["score.weight"], start.score.weight)  # the head trained
    assert not torch.equal(final["model.layers.0.self_attn.q_proj.weight"],
                           start.model.layers[0].self_attn.q_proj.weight)  # adapters merged into the base
    trained = rows_of(run_dir, "train")
    assert len(trained) == 2 and all(math.isfinite(r["loss"]) for r in trained)
    assert get_reward(str(run_dir))("Question 1: can you help?", " happy to help") == pytest.approx(
        get_reward(str(run_dir / "final"))("Question 1: can you help?", " happy to help"))


def test_bf16_autocast_trains_and_a_policy_run_is_not_resumed_as_a_reward_model(tmp_path):
    run_dir = dpokit.rm(base_config(tmp_path, train={"precision": "bf16", "max_steps": 2, "layout": "packed"}),
                        run_dir=str(tmp_path / "bf16"))
    rows = rows_of(run_dir, "train")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["layout"] == "padded"
    policy = dpokit.train(base_config(tmp_path, loss={"name": "sigmoid"}, train={"max_steps": 1}),
                          run_dir=str(tmp_path / "dpo"))
    with pytest.raises(ConfigError, match="holds a dpokit dpo run; it cannot be resumed by dpokit rm"):
        dpokit.rm(base_config(tmp_path, train={"max_steps": 1}), run_dir=str(policy), resume=True)


# ------------------------------------------------------------------------------------------- as a reward

class Batched:
    """A reward with a batched method: score_texts must call it once."""

    def __init__(self, values):
        self.values, self.calls = values, 0

    def __call__(self, prompt, response):
        raise AssertionError("score_texts should have used batch()")

    def batch(self, prompts, responses):
        self.calls += 1
        return list(self.values)


def test_score_texts_uses_batch_with_the_same_errors():
    fn = Batched([1.0, 2.5])
    assert score_texts(fn, ["a", "b"], ["x", "y"], "b") == [1.0, 2.5] and fn.calls == 1
    with pytest.raises(DpokitError, match=r"reward 'b' returned nan on sample 1; rewards must be finite"):
        score_texts(Batched([1.0, float("nan")]), ["a", "b"], ["x", "y"], "b")
    with pytest.raises(DpokitError, match=r"returned 1 values for 2 samples"):
        score_texts(Batched([1.0]), ["a", "b"], ["x", "y"], "b")


def test_reward_model_as_a_reward_function(tiny_rm, tmp_path):
    fn = get_reward(str(tiny_rm))
    assert get_reward(str(tiny_rm)) is fn  # loaded once
    assert reward_name(str(tiny_rm)) == str(tiny_rm) and reward_name(fn) == str(tiny_rm)
    assert fn.max_length == 128 and fn.max_prompt_length == 64  # the run's, from its config.yaml
    prompts = ["What is two plus two?", "Hi", "Can you recommend a good book?"]
    responses = [" Two plus two is four.", " No. Stop asking.", " Sure! The Hobbit."]
    one_by_one = [fn(p, r) for p, r in zip(prompts, responses)]
    together = score_texts(fn, prompts, responses, "rm")
    assert all(close(a, b) for a, b in zip(one_by_one, together))
    assert fn("Hi", " x" * 500) == pytest.approx(fn("Hi", " x" * 300), abs=REWARD_TOL)  # truncated at 128 tokens
    chat = fn([{"role": "user", "content": "Hi"}], "Hello!")  # a chat prompt: the template, as training does
    assert math.isfinite(chat)
    # A folder of a policy (a causal LM) is refused in one line, as the run directory of a DPO policy is.
    policy = tmp_path / "dpo-run"
    (policy / "final").mkdir(parents=True)
    (policy / "config.yaml").write_text("run_dir: x\n")
    (policy / "final" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    for spec in (policy, policy / "final"):
        with pytest.raises(DpokitError, match=r"holds LlamaForCausalLM \(a policy.*not a reward model"):
            get_reward(str(spec))
    proc = subprocess.run([*DPOKIT, "eval", str(policy), "--reward", str(policy)], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "not a reward model" in proc.stderr
    (policy / "final" / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                              "id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(DpokitError, match="classifier with 2 labels; a reward model has 1"):
        get_reward(str(policy))
    with pytest.raises(DpokitError, match=r"unknown \(no such folder\)"):
        get_reward(str(tmp_path / "missing" / "run"))
    assert load_reward_model(tiny_rm / "final", device="cpu").max_length == 128  # RUN_DIR/final: the run's
    # ... and the other way round: a reward model is not a policy to sample from or score log-probs with.
    proc = subprocess.run([*DPOKIT, "eval", str(tiny_rm)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "a reward model (LlamaForSequenceClassification), not a causal LM" in proc.stderr


def test_eval_serve_and_recipe_accept_a_reward_model(tiny_rm, tmp_path):
    from dpokit.evaluate.run import evaluate_run
    from dpokit.recipes.sentiment.config import load_recipe_config
    from dpokit.serve.engine import load_playground

    policy = dpokit.train(base_config(tmp_path, data={"eval": str(write_pairs(tmp_path / "heldout.jsonl", 4))},
                                      loss={"name": "sigmoid"}, train={"max_steps": 1}),
                          run_dir=str(tmp_path / "policy"))
    result = evaluate_run(policy, reward=str(tiny_rm), n_samples=1, frontier=False, log=lambda *a: None)
    assert result["reward_fn"] == str(tiny_rm) and math.isfinite(result["reward"])
    playground = load_playground(policy, reward=str(tiny_rm))
    assert playground.reward_fn is get_reward(str(tiny_rm)) and playground.reward_label == str(tiny_rm)
    assert load_recipe_config(None, [f"reward={tiny_rm}"]).reward == str(tiny_rm)


# --------------------------------------------------------------------------------------------- torchrun

@pytest.mark.equivalence
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_fsdp_two_ranks_train_the_reward_model_like_one(tmp_path):
    import socket

    # 17 pairs, epochs 1: global steps of 8, 8 and 1 pair (rank 1 has nothing in the last step).
    cfg = base_config(tmp_path, n=17, train={"max_steps": None, "epochs": 1, "batch_size": 8},
                      data={"eval": str(write_pairs(tmp_path / "heldout.jsonl", 5))}, eval={"every": 2},
                      distributed={"timeout_s": 60})
    single = dpokit.rm(cfg, run_dir=str(tmp_path / "single"))
    cfg["train"]["batch_size"] = 4
    cfg["distributed"]["strategy"] = "fsdp"
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "dpokit", "rm", str(path), f"run_dir={tmp_path / 'fsdp'}"],
                          cwd=ROOT, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in one] == [(r["split"], r["step"]) for r in two]
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]  # every pair once over the ranks
        for key in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "grad_norm"):
            if key in a:  # the ranks' sums added by gloo in another order: round-off (tolerances.py)
                assert abs(a[key] - b[key]) <= METRIC_REL * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert_same_weights_after_adamw(weights(single), weights(tmp_path / "fsdp"), LR, 3)
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "fsdp" / "final").config.num_labels == 1
