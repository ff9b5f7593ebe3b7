"""Every loss variant trains end to end; bco_pair's state across accumulation and resume; Plackett-Luce on
ranked data; SFT on chosen responses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit
from conftest import write_pairs
from dpokit.losses import LOSSES, SPECS
from dpokit.training.checkpoint import read_trainer_state
from dpokit.training.metrics import read_metrics
from tolerances import METRIC_REL, assert_same_metrics

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"cdpo": {"label_smoothing": 0.1}, "robust": {"label_smoothing": 0.1}, "simpo": {"beta": 2.0},
          "ipo": {"beta": 0.5}, "f_dpo": {"f_divergence": "js_divergence"}}
# Further settings of a loss that change what it optimizes, each trained end to end as well.
CASES = [(name, PARAMS.get(name, {})) for name in sorted(LOSSES) if SPECS[name].on_pairs] + [
    ("f_dpo", {"f_divergence": "forward_kl"}), ("f_dpo", {"f_divergence": "reverse_kl"}),
    ("f_dpo", {"f_divergence": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
    ("sigmoid", {"ld_alpha": 0.5}), ("sigmoid", {"use_weighting": True})]


def rows(run_dir: Path, split: str = "train") -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == split]


def config(data: Path, **loss) -> dict:
    return {"model": {"name_or_path": "tiny-random-llama"},
            "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
            "loss": {"name": "sigmoid", "beta": 0.1, **loss},
            "train": {"lr": 2e-3, "batch_size": 8, "max_steps": 25, "seed": 1, "progress": False}}


@pytest.mark.parametrize("name, params", CASES, ids=["-".join([n, *(f"{k}={v}" for k, v in p.items())]) for n, p in CASES])
def test_every_pairwise_variant_learns_the_training_pairs(tmp_path, name, params):
    data = write_pairs(tmp_path / "pairs.jsonl", style="help")
    run_dir = dpokit.train(config(data, name=name, **params), run_dir=str(tmp_path / name))
    history = rows(run_dir)
    assert len(history) == 25
    assert history[-1]["rewards/accuracies"] > 0.9, history[-1]
    assert history[-1]["loss"] < history[0]["loss"]
    if name == "discopop":  # its slope at zero margin is positive for tau < 0.102: step 1 lowers the margins
        assert history[1]["rewards/margins"] < 0 < history[-1]["rewards/margins"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_ld_alpha_one_is_the_plain_loss_and_alpha_below_one_starts_at_zero_reward(tmp_path):
    """LD-DPO with alpha = 1 weighs every token 1.0: bit for bit the plain run. With alpha < 1 policy and
    reference get the same split, so the first step (pi = pi_ref) has zero rewards, and training differs."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=8, style="help")

    def run(name: str, **loss) -> Path:
        cfg = config(data, **loss)
        cfg["train"].update(max_steps=3)
        return dpokit.train(cfg, run_dir=str(tmp_path / name))

    plain, one, half = run("plain"), run("one", ld_alpha=1.0), run("half", ld_alpha=0.5)
    a, b, c = final_weights(plain), final_weights(one), final_weights(half)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    first = rows(half)[0]
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    # The longer response's excess tokens count half: its (negative) log-prob rises; the shorter's is unchanged.
    gains = [first[k] - rows(plain)[0][k] for k in ("logps/chosen", "logps/rejected")]
    assert min(gains) >= 0 < max(gains)


def test_wpo_weights_each_pairs_loss_in_the_training_forward():
    """pair_forward with loss.use_weighting: each pair's loss is the plain one times min(1, w_w * w_l), the
    log-weights being the policy's per-response ones (tests/test_logprobs.py checks those by hand)."""
    import contextlib
    import copy

    from dpokit.config import Config
    from dpokit.data.batch import collate_groups, regroup
    from dpokit.methods.dpo import pair_forward
    from dpokit.models.loading import tiny_model
    from dpokit.models.logprobs import layout_logps
    from dpokit.training.distributed import LogpsModule
    from dpokit.training.reference import FrozenReference

    torch.manual_seed(0)
    policy = tiny_model(512, seed=0)
    reference = FrozenReference(copy.deepcopy(policy))
    with torch.no_grad():  # move the policy off the reference so that the plain losses differ from ln 2
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    groups = [([1, 9, 8], [[6, 5, 4, 2], [30, 31, 2]]), ([1, 40], [[45, 46, 2], [47, 48, 49, 2]])]
    out = {}
    for weighting in (False, True):
        batch = collate_groups(groups, pad_id=0, layout="packed")
        cfg = Config(loss={"name": "sigmoid", "use_weighting": weighting})
        out[weighting] = pair_forward(LogpsModule(policy), reference, batch, [], cfg, contextlib.nullcontext)
    with torch.no_grad():
        _, _, log_weights = layout_logps(policy, collate_groups(groups, pad_id=0, layout="packed"), wpo=True)
    log_weights = regroup(log_weights, collate_groups(groups, pad_id=0, layout="packed"))
    weights = torch.exp(log_weights[:, 0] + log_weights[:, 1]).clamp(max=1)
    assert (weights < 1).any()
    torch.testing.assert_close(out[True]["losses"], out[False]["losses"] * weights)
    assert torch.equal(out[True]["chosen_rewards"], out[False]["chosen_rewards"])  # rewards are not weighted


def bco_state(run_dir: Path, step: int) -> dict:
    return read_trainer_state(run_dir / "checkpoints" / f"step-{step}")["task_state"]["loss"]["bco_pair"]


@pytest.mark.equivalence
def test_bco_pair_reward_shift_is_step_state_kept_in_checkpoints(tmp_path):
    """delta is the running mean reward of the steps before: the same with batch 8 x 1 and 4 x 2, saved in
    every checkpoint, and restored by --resume (3 + 3 steps give the weights of 6 straight, bit for bit)."""
    data = write_pairs(tmp_path / "pairs.jsonl", style="help")

    def run(name: str, steps: int, resume: bool = False, **train) -> Path:
        cfg = config(data, name="bco_pair")
        cfg["train"].update(max_steps=steps, **train)
        return dpokit.train(cfg, run_dir=str(tmp_path / name), resume=resume)

    straight = run("straight", 6)
    state = bco_state(straight, 6)
    assert state["pairs"] == 48
    means = [(r["rewards/chosen"] + r["rewards/rejected"]) / 2 for r in rows(straight)]
    # The running mean after step 6 is the mean of the steps' means (8 pairs each); the rows hold them to
    # fp32 round-off of the reward sums (tolerances.METRIC_REL). Step 1 is exactly 0 (pi == pi_ref).
    assert means[0] == 0.0
    assert abs(state["reward_mean"] - sum(means) / 6) <= METRIC_REL * max(1.0, abs(state["reward_mean"]))
    assert abs(state["reward_mean"]) > 1e-3  # delta moved, so restoring it matters below
    accumulated = run("accumulated", 6, batch_size=4, grad_accum=2)
    assert_same_metrics(rows(straight), rows(accumulated), ("loss", "grad_norm", "rewards/margins"))
    assert abs(bco_state(accumulated, 6)["reward_mean"] - state["reward_mean"]) <= METRIC_REL
    run("resumed", 3)
    resumed = run("resumed", 6, resume=True)
    assert bco_state(resumed, 3)["pairs"] == 24
    assert bco_state(resumed, 6) == state
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weighted_combination_of_losses(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", style="help")
    run_dir = dpokit.train(config(data, weights={"sigmoid": 1.0, "rpo": 0.5}), run_dir=str(tmp_path / "mix"))
    history = rows(run_dir)
    # At step 1 policy == reference: sigmoid gives ln 2 and rpo adds 0.5 * (sigmoid + chosen NLL per token).
    first = history[0]
    assert first["loss"] > 1.5 * 0.6931
    assert history[-1]["rewards/accuracies"] > 0.9


def write_rankings(path: Path, n: int = 12) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"Rate reply {i}:", "responses": [
                f" Terrible {i}, go away.", f" Wonderful {i}, thank you!", f" Okay {i}, fine."],
                "scores": [0.1, 0.9, 0.5]}) + "\n")
    return path


def test_plackett_luce_trains_on_rankings(tmp_path):
    data = write_rankings(tmp_path / "ranked.jsonl")
    cfg = config(data, name="plackett_luce")
    cfg["train"]["batch_size"] = 4
    run_dir = dpokit.train(cfg, run_dir=str(tmp_path / "pl"))
    history = rows(run_dir)
    # 3 responses: at step 1 (pi == pi_ref) the ranking NLL is log 3! = log 6.
    # pi == pi_ref bit for bit (same weights, same batch), so every log-ratio is exactly 0 and the loss is log 6
    # rounded in fp32 (ulp 1.2e-7); 1e-5 also covers the 10-digit constant.
    assert history[0]["loss"] == pytest.approx(1.791759469, abs=1e-5)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["rewards/accuracies"] > 0.9  # best response above the worst


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_plackett_luce_trains_tied_pieces_and_whole_rankings_in_one_batch(tmp_path, layout):
    """Tied rankings become K = 2 groups next to strict K = 3 rankings in the same batch (ragged K, slot mask)."""
    path = tmp_path / "tied.jsonl"
    with path.open("w") as fh:
        for i in range(2):
            fh.write(json.dumps({"prompt": f"Rate reply {i}:", "responses": [
                f" Terrible {i}, go away.", f" Wonderful {i}, thank you!", f" Okay {i}, fine."],
                "scores": [0.1, 0.9, 0.5]}) + "\n")
            fh.write(json.dumps({"prompt": f"Rate answer {i}:", "responses": [
                f" Lovely {i}!", f" Awful {i}.", f" Great {i}!"], "ranking": [1, 2, 1]}) + "\n")  # 2 pairs, 1 tie
    cfg = config(path, name="plackett_luce")
    cfg["train"].update(batch_size=6, max_steps=3, layout=layout)  # 2 groups of 3 + 4 pairs: one batch
    run_dir = dpokit.train(cfg, run_dir=str(tmp_path / layout))
    report = json.loads((run_dir / "data_report.json").read_text())["train"]
    assert (report["rows_kept"], report["groups"], report["ties"]) == (4, 6, 2)
    # pi == pi_ref at step 1: each ranking of 3 costs log 3! and each pair log 2.
    assert rows(run_dir)[0]["loss"] == pytest.approx((2 * 1.791759469 + 4 * 0.693147181) / 6, abs=1e-5)


@pytest.mark.equivalence
def test_plackett_luce_on_pairs_equals_sigmoid(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", style="help")
    runs = {}
    for name in ("sigmoid", "plackett_luce"):
        cfg = config(data, name=name)
        cfg["train"]["max_steps"] = 4
        runs[name] = rows(dpokit.train(cfg, run_dir=str(tmp_path / name)))
    # Equal math (a 2-way log-softmax is a log-sigmoid) rounded differently in fp32; from step 2 on, AdamW may
    # also have moved a few round-off-sized-gradient weights differently. Bound derived in tolerances.py.
    assert_same_metrics(runs["sigmoid"], runs["plackett_luce"], ("loss", "grad_norm", "rewards/margins"))


def test_sft_command_raises_chosen_likelihood(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", style="help")
    cfg_path = tmp_path / "sft.yaml"
    cfg_path.write_text(json.dumps(config(data)))  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "dpokit", "sft", str(cfg_path), f"run_dir={tmp_path / 'sft'}",
                           "train.max_steps=15"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = rows(tmp_path / "sft")
    assert len(history) == 15
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["logps/chosen"] > history[0]["logps/chosen"]
    assert "rewards/margins" not in history[0]  # no preference metrics without a preference loss
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# KTO on unpaired examples


def write_unpaired(path: Path, n: int = 16) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            prompt = f"Question {i}: please help with item {i}."
            fh.write(json.dumps({"prompt": prompt, "completion": f" Gladly, here is help {i}.", "label": True}) + "\n")
            fh.write(json.dumps({"prompt": prompt, "completion": f" No {i}. Go away now.", "label": False}) + "\n")
    return path


def test_kto_learns_unpaired_examples(tmp_path):
    data = write_unpaired(tmp_path / "kto.jsonl")
    run_dir = dpokit.train(config(data, name="kto", desirable_weight=1.0, undesirable_weight=1.0),
                           run_dir=str(tmp_path / "kto"))
    history = rows(run_dir)
    assert len(history) == 25
    assert history[0]["loss"] == 0.5 and history[0]["rewards/chosen"] == 0.0  # pi = pi_ref: 1 - sigmoid(0)
    assert history[-1]["rewards/accuracies"] > 0.9, history[-1]
    assert history[-1]["rewards/chosen"] > 0 > history[-1]["rewards/rejected"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(r["kl"] >= 0 for r in history)
    report = json.loads((run_dir / "data_report.json").read_text())["train"]
    assert (report["desirable"], report["undesirable"]) == (16, 16)


@pytest.mark.equivalence
def test_kto_reference_point_is_one_per_step_whatever_the_split(tmp_path):
    """z_0 is estimated once per optimizer step from all of its examples (dpokit.methods.kto.kto_prepare), so batch 8 x
    accumulation 1, 4 x 2 and 8 x 1 cut into passes by train.pass_tokens train the same steps; the held-out
    metrics get one z_0 over the held-out set, whatever eval.batch_size. z_0 > 0 from step 2 on (every label
    true: every completion gains), so a per-pass estimate would differ between the runs."""
    data = tmp_path / "kto.jsonl"
    with data.open("w") as fh:
        for i in range(16):
            fh.write(json.dumps({"prompt": f"Question {i}: please help with item {i}.",
                                 "completion": f" Gladly, here is help {i}.", "label": True}) + "\n")

    def run(name: str, **train) -> list[dict]:
        cfg = config(data, name="kto")
        cfg["data"]["eval"] = str(data)
        cfg["train"].update(max_steps=4, **train)
        cfg["eval"] = {"every": 2, "batch_size": train.get("batch_size", 8)}
        return read_metrics(dpokit.train(cfg, run_dir=str(tmp_path / name)) / "metrics.jsonl")

    straight = run("straight")
    assert [r["split"] for r in straight].count("eval") >= 2
    train_rows = [r for r in straight if r["split"] == "train"]
    assert train_rows[0]["kl"] == 0.0 and min(r["kl"] for r in train_rows[1:]) > 1e-3
    keys = ("loss", "kl", "rewards/chosen", "rewards/accuracies")
    for other in (run("accumulated", batch_size=4, grad_accum=2), run("passes", pass_tokens=40)):
        assert [(r["split"], r["step"]) for r in other] == [(r["split"], r["step"]) for r in straight]
        assert_same_metrics(straight, other, keys + ("grad_norm",))  # eval rows too: eval.batch_size 4 vs 8


def test_kto_mismatched_pairs_and_stats_by_hand():
    from dpokit.data.tokenize import TokenizedGroup
    from dpokit.methods.kto import mismatched
    from dpokit.training.metrics import KtoStats

    items = [TokenizedGroup([1, 2], [[10, 11, 12]], "a", label=True), TokenizedGroup([3], [[20]], "b", label=False),
             TokenizedGroup([4, 5, 6], [[30, 31]], "c", label=True)]
    kl_items = mismatched(items, max_length=5)
    assert [(g.prompt_ids, g.responses_ids) for g in kl_items] == [([1, 2], [[20]]), ([3], [[30, 31]]),
                                                                   ([4, 5, 6], [[10, 11]])]  # cut to fit 5
    stats = KtoStats()
    stats.add(torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0.3, -0.1, 0.05]), torch.tensor([True, False, True]),
              torch.tensor([-5.0, -7.0, -3.0]), torch.tensor(0.5), 0.1, tokens=9)
    means = stats.means()
    assert means["rewards/chosen"] == pytest.approx(0.175) and means["rewards/rejected"] == pytest.approx(-0.1)
    assert means["rewards/margins"] == pytest.approx(0.275) and means["logps/chosen"] == pytest.approx(-4.0)
    assert means["rewards/accuracies"] == pytest.approx(2 / 3)  # z = 0.05: 0.3 > z, -0.1 < z, 0.05 is not > z
    assert means["loss"] == pytest.approx(0.4) and means["kl"] == pytest.approx(0.5)


@pytest.mark.parametrize("tree, key", [
    ({"loss": {"name": "kto"}, "reference": {"mode": "store"}}, "loss.name"),
    ({"loss": {"name": "kto", "ld_alpha": 0.5}}, "loss.ld_alpha"),
    ({"loss": {"name": "kto", "use_weighting": True}}, "loss.use_weighting"),
    ({"loss": {"name": "kto", "desirable_weight": 0.0}}, "loss.desirable_weight"),
    ({"loss": {"name": "sigmoid", "undesirable_weight": 1.0}}, "loss.undesirable_weight"),
])
def test_kto_config_refusals_name_the_key(tree, key):
    from dpokit.config import Config

    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ":"):
        Config(**tree)


def test_kto_refuses_a_pairwise_file_in_one_line(tmp_path):
    cfg = tmp_path / "kto.yaml"
    cfg.write_text(json.dumps(config(write_pairs(tmp_path / "pairs.jsonl", style="help"), name="kto")))  # JSON is YAML
    result = subprocess.run([sys.executable, "-m", "dpokit", "train", str(cfg), f"run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "loss.name=kto takes unpaired rows" in result.stderr


def test_wpo_with_a_batchwise_loss_is_refused_in_one_line(tmp_path):
    cfg = tmp_path / "aot-wpo.yaml"
    cfg.write_text(json.dumps(config(write_pairs(tmp_path / "pairs.jsonl", style="help"), name="aot", use_weighting=True)))
    result = subprocess.run([sys.executable, "-m", "dpokit", "train", str(cfg), f"run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "loss.use_weighting:" in lines[0] and "aot" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_rpo_nll_with_ld_alpha_is_on_the_plain_chosen_log_prob():
    """pair_forward with loss.ld_alpha: rpo minus sigmoid (same batch, same LD-DPO log-probs in the DPO term) is
    alpha times the chosen response's plain per-token NLL, -log pi(y_w|x) / |y_w| summed over all its tokens
    with weight 1, as in the RPO paper; not the length-desensitized log-prob."""
    import contextlib
    import copy

    from dpokit.config import Config
    from dpokit.data.batch import collate_groups, regroup
    from dpokit.methods.dpo import pair_forward
    from dpokit.models.loading import tiny_model
    from dpokit.models.logprobs import layout_logps
    from dpokit.training.distributed import LogpsModule
    from dpokit.training.reference import FrozenReference

    torch.manual_seed(0)
    policy = tiny_model(512, seed=0)
    reference = FrozenReference(copy.deepcopy(policy))
    # Chosen responses longer than the rejected ones: LD-DPO counts their last tokens 0.5 times.
    groups = [([1, 9, 8], [[6, 5, 4, 7, 2], [30, 31, 2]]), ([1, 40], [[45, 46, 47, 48, 2], [47, 2]])]
    out = {}
    for name in ("sigmoid", "rpo"):
        cfg = Config(loss={"name": name, "ld_alpha": 0.5, **({"alpha": 0.25} if name == "rpo" else {})})
        batch = collate_groups(groups, pad_id=0, layout="packed")
        out[name] = pair_forward(LogpsModule(policy), reference, batch, [], cfg, contextlib.nullcontext)
    batch = collate_groups(groups, pad_id=0, layout="packed")
    with torch.no_grad():
        plain, n_tokens = (regroup(x, batch) for x in layout_logps(policy, batch))
    assert torch.equal(n_tokens[:, 0], torch.tensor([5, 5]))
    assert (out["rpo"]["chosen_logps"] > plain[:, 0] + 0.1).all()  # the LD log-probs do differ from the plain
    nll = -plain[:, 0] / n_tokens[:, 0]
    # The same float32 forwards each time: rpo's loss is sigmoid's (~0.7) plus 0.25 * nll (~1.6), and taking
    # sigmoid's back off is exact but for the rounding of that sum, a few ulps of ~2.3 (2.4e-7 each); 1e-5 is far
    # above that and far below what the length-desensitized NLL gives instead (0.47 here).
    torch.testing.assert_close(out["rpo"]["losses"] - out["sigmoid"]["losses"], 0.25 * nll, rtol=0, atol=1e-5)


def test_logits_metrics_are_token_weighted_means_whatever_the_micro_batching():
    """``logits/chosen`` / ``logits/rejected`` are TRL's: the mean logit over every chosen (rejected) response token
    of the step, so one pass or two give the same value and a long response weighs by its length."""
    from dpokit.training.metrics import PairStats

    chosen_sums, rejected_sums = torch.tensor([3.0, -1.0, 4.0]), torch.tensor([2.0, 6.0, -3.0])
    chosen_tokens, rejected_tokens = torch.tensor([3, 1, 8]), torch.tensor([2, 5, 1])
    zeros = torch.zeros(3)

    def stats(parts):
        s = PairStats()
        for part in parts:
            s.add(zeros[part], zeros[part], zeros[part], zeros[part], zeros[part], 10,
                  logits=(chosen_sums[part], rejected_sums[part], chosen_tokens[part], rejected_tokens[part]))
        return s.means()

    whole, split = stats([slice(0, 3)]), stats([slice(0, 1), slice(1, 3)])
    assert whole["logits/chosen"] == split["logits/chosen"] == 6.0 / 12  # not the mean of per-pair means
    assert whole["logits/rejected"] == split["logits/rejected"] == 5.0 / 8
    assert not any(name.startswith("logit_tokens") for name in whole)
