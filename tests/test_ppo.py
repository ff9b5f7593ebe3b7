"""dpokit ppo end to end on a tiny random model: it learns its reward, resumes bit-identically after SIGKILL,
gives the same update for any split into micro-batches, scores the sampled tokens exactly, and refuses settings
it cannot run with in one line."""

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli
from dpokit.config import ConfigError, load_config
from dpokit.models.loading import tiny_model, tiny_tokenizer
from dpokit.training.distributed import Dist
from dpokit.training.metrics import read_metrics
from test_resume import assert_bit_identical, kill_when
from tolerances import METRIC_REL, assert_same_metrics, assert_same_weights_after_adamw

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-ppo.yaml"
TRAIN_KEYS = ["reward", "kl", "kl_coef", "entropy", "policy/clipfrac", "policy/approx_kl", "policy/loss",
              "value/loss", "value/clipfrac", "value/explained_variance", "tokens", "elapsed_s", "sample_s",
              "score_s", "train_s", "grad_norm", "lr", "response_length", "eos_fraction"]


def small_config(tmp_path: Path, **sections) -> dict:
    """configs/tiny-ppo.yaml, shorter, with the given sections' keys replaced."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["train"].update(max_steps=3, progress=False, save_every=None)
    cfg["ppo"]["reward"] = str(ROOT / "examples" / "rewards.py") + ":letter_e"
    for key in ("train", "eval"):
        cfg["data"][key] = str(ROOT / cfg["data"][key])
    cfg["eval"] = {}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def test_tiny_ppo_config_learns_its_reward_and_writes_a_plain_policy(tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli("ppo", str(TINY), f"run_dir={run_dir}", "train.progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["step"] for r in evals] == [0, 5, 10, 15, 20]
    card = (run_dir / "final" / "README.md").read_text()  # Hub-ready, as every final/
    assert "- ppo" in card and "## Held-out metrics (step 20)" in card
    assert (run_dir / "final" / "generation_config.json").is_file()
    for key in TRAIN_KEYS:
        assert all(key in r for r in train), key
    # Step 1 samples from pi = pi_ref (a frozen copy of the same weights, the same computation): KL is 0.
    assert train[0]["kl"] == 0.0
    # The held-out reward must rise by more than three standard errors of the difference of two means over
    # the 16 held-out prompts (each estimate's standard error is reward_std / sqrt(16)): chance cannot do that.
    first, last = evals[0], evals[-1]
    stderr = math.sqrt((first["reward_std"] ** 2 + last["reward_std"] ** 2) / 16)
    assert last["reward"] - first["reward"] > 3 * stderr, (first, last)
    assert last["kl"] > 0.1  # it paid for the reward in KL(pi || pi_ref)
    # final/ is the policy alone, a plain Hugging Face causal LM folder.
    code = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "assert 'dpokit' not in sys.modules; print(type(m).__name__)")
    plain = subprocess.run([sys.executable, "-c", code, str(run_dir / "final")], capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 0 and "ForCausalLM" in plain.stdout, plain.stderr[-1000:]
    assert not any("value_head" in k for k in load_file(str(run_dir / "final" / "model.safetensors")))
    # dpokit eval reads the run like any other: its checkpoints (policy + value head) are frontier points.
    from dpokit.evaluate.run import evaluate_run

    result = evaluate_run(run_dir, reward=str(ROOT / "examples" / "rewards.py") + ":letter_e", max_new_tokens=16,
                          max_prompts=8, batch_size=8, log=None)
    assert [p["step"] for p in result["frontier"]] == [0, 10, 20]
    assert result["frontier"][-1]["reward"] > result["frontier"][0]["reward"]


@pytest.mark.equivalence
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    cfg = small_config(tmp_path, train={"max_steps": 6, "save_every": 1},
                       ppo={"kl_target": 0.5, "kl_horizon": 50})  # the adaptive KL coefficient must resume too
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    straight = tmp_path / "straight"
    done = run_cli("ppo", str(path), f"run_dir={straight}")
    assert done.returncode == 0, done.stderr[-2000:]
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    delay = random.Random(7).uniform(0.0, 0.5)
    triggers = [lambda: ckpts.is_dir() and any(p.name.startswith(".tmp") for p in ckpts.iterdir()),
                lambda: ckpts.is_dir() and len([p for p in ckpts.iterdir() if (p / "COMPLETE").exists()]) >= 3
                and (time.sleep(delay) or True)]
    for trigger in triggers:
        proc = subprocess.Popen([sys.executable, "-m", "dpokit", "ppo", str(path), f"run_dir={killed}", "--resume"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_when(proc, trigger)
    done = run_cli("ppo", str(path), f"run_dir={killed}", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    weights = [load_file(str(d / "final" / "model.safetensors")) for d in (straight, killed)]
    assert_bit_identical(*weights)
    rows = [[r for r in read_metrics(d / "metrics.jsonl") if r["split"] == "train"] for d in (straight, killed)]
    assert [r["step"] for r in rows[1]] == list(range(1, 7))
    for a, b in zip(*rows):
        assert a["kl_coef"] == b["kl_coef"] and a["reward"] == b["reward"]
    assert len({r["kl_coef"] for r in rows[0]}) > 1  # the controller did move


@pytest.mark.equivalence
def test_micro_batches_give_the_same_update(tmp_path):
    """One minibatch of 8 samples as 1 x 8, 2 x 4 and 4 x 2: the same loss normalization (every response token
    of the minibatch), so the same gradients up to fp32 summation order."""
    from dpokit.methods.ppo import ppo

    runs = []
    for batch_size, accum in ((8, 1), (4, 2), (2, 4)):
        cfg = small_config(tmp_path / f"b{batch_size}", train={"batch_size": batch_size, "grad_accum": accum})
        runs.append(ppo(cfg))
    rows = [[r for r in read_metrics(d / "metrics.jsonl") if r["split"] == "train"] for d in runs]
    weights = [load_file(str(d / "checkpoints" / "step-3" / "model.safetensors")) for d in runs]
    for other_rows, other_weights in zip(rows[1:], weights[1:]):
        assert_same_metrics(rows[0], other_rows, ["reward", "kl", "policy/loss", "value/loss", "grad_norm"],
                            rel=METRIC_REL)
        # 3 PPO steps x 2 epochs x 2 minibatches = 12 AdamW steps at lr 1e-3.
        assert_same_weights_after_adamw(weights[0], other_weights, lr=1e-3, steps=12)


def test_rollout_scores_each_sampled_token_as_a_plain_forward_does(tiny_tok):
    """The right-padded rollout grid holds, at [row, t], log pi of response token t computed from full logits
    of that row alone, and the value head reads the same position; zeros on padding."""
    from dpokit.methods.ppo.trainer import PolicyValue, rows_batch, to_grid

    torch.manual_seed(0)
    lm = tiny_model(len(tiny_tok), seed=3)
    model = PolicyValue(lm)
    torch.nn.init.normal_(model.value_head.weight)  # a non-zero head, so the values say where they were read
    rows = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14]), ([15, 16], [17])]
    batch, mask = rows_batch(rows, tiny_tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        out = model(batch, entropy=True)
        logps, values = to_grid(out["logps"], mask), to_grid(out["values"], mask)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    for i, (prompt, response) in enumerate(rows):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            result = lm(ids, output_hidden_states=True)
        logits, hidden = result.logits[0].double(), result.hidden_states[-1][0]
        for t, token in enumerate(response):
            position = len(prompt) + t - 1  # the position that predicts response token t
            expected = torch.log_softmax(logits[position], -1)[token].item()
            # One log-softmax over 512 fp32 logits of size ~5: round-off ~512 * 2^-24 * 5 < 2e-4 absolute.
            assert abs(logps[i, t].item() - expected) < 2e-4
            value = model.value_head(hidden[position]).item()
            assert abs(values[i, t].item() - value) < 1e-4 * max(1.0, abs(value))
        assert torch.all(logps[i, len(response):] == 0) and torch.all(values[i, len(response):] == 0)


def test_value_head_starts_at_zero_and_the_reference_matches_the_policy_at_step_1(tmp_path):
    """With LoRA and reference.mode adapter (pi_ref = the policy with its adapters off) as with a frozen copy,
    pi = pi_ref at step 1: the KL of the first rollout is exactly 0."""
    from dpokit.methods.ppo import ppo

    lora = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    for name, model, reference in (("copy", {}, {"mode": "model"}), ("lora", {"lora": lora}, {"mode": "adapter"})):
        cfg = small_config(tmp_path / name, train={"max_steps": 2}, model=model, reference=reference)
        run_dir = ppo(cfg)
        train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
        assert train[0]["kl"] == 0.0 and train[0]["value/mean"] == 0.0, name
        assert train[1]["kl"] != 0.0, name  # the first update moved pi
        assert (run_dir / "final" / "model.safetensors").exists()
        # A LoRA policy's adapter is saved as trained beside the merged weights, as for every other command.
        assert (run_dir / "final" / "adapter" / "adapter_model.safetensors").exists() == (name == "lora"), name


@pytest.mark.parametrize("override, message", [
    ({"reference": {"mode": "store"}}, "reference.mode: 'store'"),
    ({"ppo": {"rollout_prompts": 12}}, "ppo.rollout_prompts: 12 is not a multiple"),
    ({"model": {"disable_dropout": False}}, "model.disable_dropout"),
    ({"data": {"train": None}}, "data.train: required"),
    ({"reference": {"sync": {"every": 2, "alpha": 0.5}}}, "reference.sync: TR-DPO"),
    ({"ppo": {"top_p": 0.9}}, "ppo.top_p: 0.9 < 1 is not supported"),
])
def test_settings_ppo_cannot_run_with_are_one_line(tmp_path, override, message):
    from dpokit.methods.ppo.trainer import check_config

    cfg = small_config(tmp_path)
    for section, values in override.items():
        cfg.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_config(load_config(cfg), Dist())


def test_bad_reward_and_unknown_key_exit_2_with_one_line(tmp_path):
    for extra, expected in ((["ppo.reward=nosuchreward"], "reward 'nosuchreward': unknown"),
                            (["ppo.kl_cof=0.1"], "ppo.kl_cof")):
        done = run_cli("ppo", str(TINY), f"run_dir={tmp_path / 'r'}", *extra)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], done.stderr
        assert "Traceback" not in done.stderr


def test_two_processes_sample_their_shares_and_reduce_over_both(tmp_path):
    """torchrun (DDP, gloo on CPU): each rank samples half of the step's prompts; the metrics count both
    halves, the first rollout's KL is exactly 0 on both, and rank 0 writes one final/."""
    run_dir = tmp_path / "ddp"
    done = run_cli("ppo", str(TINY), f"run_dir={run_dir}", "train.max_steps=2", "train.progress=false",
                   "ppo.max_new_tokens=8", "--nproc", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    # 16 rollouts of at most 8 tokens: more than one rank's 8 x 8 = 64 tokens means both ranks were counted.
    assert 64 < train[0]["tokens"] <= 128 and train[0]["kl"] == 0.0
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_an_llm_judge_as_the_reward_against_the_chosen_responses(tmp_path):
    """ppo.judge_url: each sampled response is judged against its prompt's chosen response (a local scripted
    judge here); a win is 1, a loss 0, and a malformed verdict 0.5 and counted, never dropped; a request the
    judge refuses with 503 is retried and counted in judge/retries."""
    from dpokit.methods.ppo import ppo
    from test_judge import Judge, reply

    def prefers_e(a, b, n):  # the answer with more letters "e" wins; every 5th reply names neither answer
        if n % 7 == 0:
            return 503, {"error": "busy"}, {"Retry-After": "0"}
        if n % 5 == 0:
            return reply("Comparison: both fine.")
        return reply("More helpful: " + ("A" if a.count("e") > b.count("e") else "B"))

    with Judge(prefers_e) as judge:
        cfg = small_config(tmp_path, train={"max_steps": 2},
                           ppo={"reward": None, "judge_url": judge.url, "judge_model": "scripted"})
        run_dir = ppo(cfg)
        requests = len(judge.requests)
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    refused = requests // 7  # the 503s (every 7th request), each followed by one more request
    assert requests - refused == 2 * 16 + 2 * 16  # every rollout and every held-out sample, answered once each
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows if "reward" in r) and len(evals) == 2
    assert sum(r["judge/malformed"] for r in train) > 0  # counted, scored 0.5
    # The training steps' share of the retries is counted (the held-out ones are not logged); none failed.
    assert 0 < sum(r["judge/retries"] for r in train) <= refused and all(r["judge/failures"] == 0 for r in train)


def test_a_reward_or_a_judge_exactly_and_the_judge_needs_chosen_responses(tmp_path):
    from dpokit.methods.rollout import judge_reward, load_reward, prompt_items

    with pytest.raises(ConfigError, match="ppo.reward: required"):
        load_reward(None, None, None, None, 0, "ppo")
    with pytest.raises(ConfigError, match="either ppo.reward or an LLM judge"):
        load_reward("length", "http://127.0.0.1:9/v1", "m", None, 0, "ppo")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    items = prompt_items(str(prompts), "train", tiny_tokenizer(), load_config(small_config(tmp_path)).data)
    with pytest.raises(ConfigError, match="has none for prompt 'hello'"):
        judge_reward("http://127.0.0.1:9/v1", "m", None, 0, items, str(prompts), "ppo")


def test_a_rollout_at_temperature_t_is_scored_under_the_distribution_it_was_drawn_from(tmp_path):
    """At ppo.temperature T = 0.7 the sampler draws from softmax(logits / T); the rollout's stored log pi,
    log pi_ref and entropy must be those of that distribution (and of the reference at the same T), or the
    importance ratios, the KL penalty and the logged kl describe another policy than the one sampled."""
    from dpokit.methods.ppo.trainer import rollout, setup
    from dpokit.training.distributed import Dist

    temperature = 0.7
    cfg = load_config(small_config(tmp_path, ppo={"temperature": temperature}))
    ppo_run = setup(cfg, Dist())
    torch.nn.init.normal_(ppo_run.run.policy.value_head.weight)
    items = ppo_run.run.train_items[:4]
    ro, _ = rollout(ppo_run, items, seed=5)
    lm = ppo_run.run.policy.model
    for i, (prompt, response) in enumerate(ro.rows):
        with torch.no_grad():
            logits = lm(torch.tensor([prompt + response])).logits[0].double() / temperature
        for t, token in enumerate(response):
            logp = torch.log_softmax(logits[len(prompt) + t - 1], -1)
            # One fp32 log-softmax over 512 logits of size ~5 / 0.7: round-off < 512 * 2^-24 * 8 < 3e-4.
            assert abs(ro.logps[i, t].item() - logp[token].item()) < 3e-4, (i, t)
            assert abs(ro.ref_logps[i, t].item() - logp[token].item()) < 3e-4, (i, t)  # pi_ref = pi at step 1
            entropy = -(logp.exp() * logp).sum().item()
            assert abs(ro.entropy[i, t].item() - entropy) < 3e-4 * max(1.0, entropy), (i, t)


def test_the_first_update_of_a_tempered_rollout_starts_at_ratio_one(tmp_path, monkeypatch):
    """Right after a rollout at T = 0.7, the first minibatch's log pi (training forward) equals the rollout's
    log pi_old exactly: the training pass scores at the rollout's temperature too, so pi / pi_old = 1."""
    import dpokit.methods.ppo.trainer as trainer
    from dpokit.methods.ppo import ppo

    seen = []
    original = trainer.policy_loss

    def spy(logps, old_logps, advantages, clip):
        seen.append((logps.detach().clone(), old_logps.clone()))
        return original(logps, old_logps, advantages, clip)

    monkeypatch.setattr(trainer, "policy_loss", spy)
    ppo(small_config(tmp_path, train={"max_steps": 1}, ppo={"temperature": 0.7}))
    logps, old_logps = seen[0]
    # Both are the same fp32 computation on the same weights, eval mode both times (dropout off): bit-equal.
    assert torch.equal(logps, old_logps)
    assert float(old_logps.abs().sum()) > 0


def test_held_out_kl_is_estimated_from_draws_of_pi_itself(tmp_path, monkeypatch):
    """The held-out reward uses the rollout settings (T = 0.7 here); the KL estimate draws its own samples at
    T = 1 and top_p = 1 (samples from pi) and scores them untempered."""
    import dpokit.methods.ppo.trainer as trainer
    from dpokit.methods.ppo import ppo

    drawn = []
    original = trainer.rollout_sample

    def spy(model, tokenizer, items, params, eos_ids, autocast):
        drawn.append((params.temperature, params.top_p, len(items)))
        return original(model, tokenizer, items, params, eos_ids, autocast)

    monkeypatch.setattr(trainer, "rollout_sample", spy)
    cfg = small_config(tmp_path, train={"max_steps": 1}, ppo={"temperature": 0.7, "eval_max_prompts": 4})
    cfg["eval"] = {"every": 1}
    ppo(cfg)
    held_out = [(t, p) for t, p, n in drawn if n == 4]
    # Evaluations at steps 0 and 1: each draws the reward's samples at T = 0.7 and the KL's from pi itself.
    assert held_out == [(0.7, 1.0), (1.0, 1.0)] * 2, drawn


def test_with_k3_the_logged_kl_is_still_the_summed_log_ratio_and_the_penalty_has_its_own_name(tmp_path,
                                                                                              monkeypatch):
    """ppo.kl_estimator: k3 changes the penalty, not what ``kl`` means: ``kl`` is the mean over responses of
    sum_t (log pi - log pi_ref) (docs/rlhf.md), ``kl_penalty`` the mean of sum_t k3, and non_score_reward is
    -kl_coef x kl_penalty."""
    import dpokit.methods.ppo.trainer as trainer
    from dpokit.methods.ppo import ppo
    from dpokit.methods.ppo.core import kl_per_token

    rollouts = []
    original = trainer.token_rewards

    def spy(scores, logps, ref_logps, mask, kl_coef, estimator="k1"):
        rollouts.append((logps.clone(), ref_logps.clone(), mask.clone()))
        return original(scores, logps, ref_logps, mask, kl_coef, estimator)

    monkeypatch.setattr(trainer, "token_rewards", spy)
    run_dir = ppo(small_config(tmp_path, train={"max_steps": 2}, ppo={"kl_estimator": "k3"}))
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    logps, ref_logps, mask = rollouts[1]  # step 2: pi has moved away from pi_ref
    n = mask.shape[0]
    k1 = float(((logps - ref_logps) * mask).sum()) / n
    k3 = float((kl_per_token(logps, ref_logps, "k3") * mask).sum()) / n
    assert abs(k3 - k1) > 1e-3  # the two estimates differ on this rollout, so the names can be told apart
    # Both are float32 sums of ~200 terms of size < 1, re-summed in float64: agreement to 1e-5 relative.
    assert rows[1]["kl"] == pytest.approx(k1, rel=1e-5, abs=1e-6)
    assert rows[1]["kl_penalty"] == pytest.approx(k3, rel=1e-5, abs=1e-6)
    assert rows[1]["non_score_reward"] == pytest.approx(-rows[1]["kl_coef"] * k3, rel=1e-5, abs=1e-7)


def test_rollout_prompts_are_read_through_data_columns(tmp_path):
    """PPO's and online DPO's prompts come from the same file as training's, so ``data.columns`` maps them
    too: an Orca-shaped row (question + system + chosen + rejected, no prompt) gives its question as the
    prompt and its chosen answer as the baseline, not a refusal or a guessed prompt."""
    from dpokit.methods.rollout import prompt_items

    rows = tmp_path / "orca.jsonl"
    rows.write_text(json.dumps({"question": "What is 6 x 7?", "chosen": "42.", "rejected": "32."}) + "\n"
                    + json.dumps({"question": "Name a colour.", "chosen": "Red.", "rejected": "Seven."}) + "\n")
    data = load_config(small_config(tmp_path)).data.model_copy(update={"columns": {"prompt": "question"}})
    items = prompt_items(str(rows), "train", tiny_tokenizer(), data)
    assert [(i.prompt.text, i.prompt.chosen) for i in items] == [("What is 6 x 7?", "42."), ("Name a colour.", "Red.")]
