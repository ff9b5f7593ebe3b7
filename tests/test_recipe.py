"""``dpokit recipe sentiment``: the shipped openings, the presets, the pieces (pairs, Best-of-N, the
Unlikelihood loss) against hand-derived values, and the whole pipeline on a tiny model, twice (the second run
finds every stage cached)."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from dpokit.cli import main
from dpokit.errors import ConfigError
from dpokit.losses import LOSSES
from dpokit.recipes import RECIPES, get_recipe
from dpokit.recipes import sentiment as recipe
from dpokit.recipes.openings import PROMPTS_FILE, build_openings

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "recipes").glob("sentiment-*.yaml"))


# --------------------------------------------------------------------------------------------------- prompts

def test_shipped_openings_are_enough_short_distinct_and_split():
    rows = [json.loads(line) for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines()]
    texts = [r["prompt"] for r in rows]
    assert len(set(texts)) == len(texts) >= 600
    assert all(2 <= len(t.split()) <= 8 for t in texts)
    train, heldout = recipe.load_openings()
    assert len(heldout) >= 100 and len(train) + len(heldout) == len(texts)
    assert not set(train) & set(heldout)
    assert rows == build_openings(), "the file is not what dpokit.recipes.openings makes; rerun it"


def test_openings_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "A film", "split": "train"}\n{"prompt": "A film", "split": "heldout"}\n')
    with pytest.raises(Exception, match="both train and held-out"):
        recipe.load_openings(bad)
    bad.write_text('{"prompt": "A film", "split": "test"}\n')
    with pytest.raises(Exception, match=r"p.jsonl:1: split"):
        recipe.load_openings(bad)


# --------------------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load_and_validate(path):
    cfg = recipe.load_recipe_config(path)
    assert cfg.dpo.betas
    specs = recipe.run_specs(cfg, "data", "runs", cfg.model)
    assert f"dpo-beta{cfg.dpo.betas[0]:g}" in specs
    # Offline methods share the reference store; PPO and online DPO sample afresh (a frozen copy); a reward
    # model has none.
    expected = {"dpo": "store", "sft": "store", "ppo": "model", "rm": None}
    assert all(spec.config.get("reference", {}).get("mode") ==
               ("model" if "online" in spec.config else expected[spec.task]) for spec in specs.values())


def test_presets_exist_and_resolve_by_name():
    assert {p.stem for p in PRESETS} >= {"sentiment-demo", "sentiment-paper"}
    assert recipe.find_preset("demo").name == "sentiment-demo.yaml"
    assert "sentiment" in RECIPES and get_recipe("sentiment").load() is recipe


@pytest.mark.parametrize("override, key", [
    (["dpo.betaz=[0.1]"], "dpo.betaz"),
    (["sampling.max_new_tokens=0"], "sampling.max_new_tokens"),
    (["best_of_n=[16]"], "best_of_n"),
    (["dpo.train={lr: -1}"], "dpo.train"),
])
def test_bad_recipe_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        recipe.load_recipe_config(None, override)


def test_overrides_after_the_preset_option_reach_the_config(capsys):
    assert main(["recipe", "sentiment", "--preset", "demo", "dpo.betaz=[1.0]"]) == 2
    assert "dpo.betaz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recipe", "sentiment", "--preset", "demo", "--no-such-flag"])


# ------------------------------------------------------------------------------------------------- the pieces

def test_pairs_all_six_ties_dropped_and_best_worst():
    rows = [{"prompt": "This film", "responses": [" a", " b", " c", " d"], "rewards": [0.1, 0.9, -0.5, 0.3]},
            {"prompt": "The plot", "responses": [" e", " f", " g", " h"], "rewards": [0.0, 0.0, 0.5, 0.0]}]
    pairs = recipe.make_pairs(rows, "all")
    first = [p for p in pairs if p["prompt"] == "This film"]
    assert len(first) == 6  # the paper: all 6 pairs of 4 samples
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert len([p for p in pairs if p["prompt"] == "The plot"]) == 3  # the 3 pairs among the zeros are ties
    best = recipe.make_pairs(rows, "best_worst")
    assert [(p["chosen"], p["rejected"]) for p in best] == [(" b", " c"), (" g", " e")]  # ties: by text
    assert recipe.make_pairs(rows, "all", min_margin=0.5) == [p for p in pairs if
                                                               p["chosen_reward"] - p["rejected_reward"] > 0.5]
    assert recipe.make_pairs([{"prompt": "x", "responses": [" ", "a\x00"], "rewards": [1.0, 0.0]}]) == []


def test_best_of_n_kl():
    assert recipe.best_of_n_kl(1) == 0.0
    assert recipe.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert recipe.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_unlikelihood_loss_by_hand():
    # a_w = -2/2 = -1, a_l = -4/2 = -2: L = 1 - log(1 - e^-2) = 1.1454...
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    lengths = torch.tensor([2])
    losses, chosen_r, rejected_r = LOSSES["unlikelihood"](pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]),
                                                         beta=0.5, chosen_lengths=lengths,
                                                         rejected_lengths=lengths, alpha=1.0)
    # fp32 inputs (exact small integers) through a few elementwise ops (exp, log1p): each within a few fp32
    # ulps (1.2e-7 at 1), so 1e-6 absolute and approx's default rel 1e-6 hold on any hardware; a wrong formula
    # (no length normalization, a missing term) is off by > 1e-2.
    assert losses.item() == pytest.approx(1 - math.log(1 - math.exp(-2)), abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.5) and rejected_r.item() == pytest.approx(-0.5)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.5)  # raising log pi(y_w) lowers the loss
    assert pr.grad.item() == pytest.approx(math.exp(-2) / (1 - math.exp(-2)) / 2, abs=1e-6) and pr.grad.item() > 0


# ---------------------------------------------------------------------------------------------- end to end

def letter_share(prompt: str, response: str) -> float:
    """A reward that separates any two different random continuations: VADER scores a tiny random model's byte
    soup 0 nearly always (1 sample in 70 here), which would make every pair a tie; the pipeline, not VADER, is
    under test."""
    return sum(c.isalpha() for c in response) / max(len(response), 1)


def tiny_overrides(run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", "model=tiny-random-llama", f"reward={Path(__file__).resolve()}:letter_share", "prompts.n_train=12", "prompts.n_heldout=6",
            "sampling.max_new_tokens=12", "sampling.precision=fp32", "sampling.batch_size=16",
            "pairs.mode=all", "train.lr=1e-3", "train.batch_size=4", "train.save_every=2", "train.progress=false",
            "train.precision=fp32", "best_of_n=[2, 4]", "eval.batch_size=16"]


def test_recipe_end_to_end_on_tiny_model_and_cached_rerun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "sentiment"
    summary = recipe.run(None, tiny_overrides(run_dir))

    for key in ("reward_ref", "reward_policy", "kl", "implicit_accuracy", "n_heldout"):
        assert key in summary, key
    assert summary["n_heldout"] == 6 and summary["headline_run"] == "dpo-beta0.1"
    assert json.loads((run_dir / "summary.json").read_text())["kl"] == summary["kl"]
    assert {"dpo-beta0.1", "best-of-2", "best-of-4"} <= set(summary["runs"])
    page = (run_dir / "report.html").read_text()
    assert "DPO in action" in page and "Reward vs KL" in page
    assert (run_dir / "frontier.svg").is_file()
    table = (run_dir / "results.md").read_text()
    assert "| π_ref |" in table and "| DPO β=0.1 |" in table and "| Best-of-4 |" in table

    pairs = [json.loads(line) for line in (run_dir / "data" / "pairs-train.jsonl").read_text().splitlines()]
    assert pairs and all({"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"} <= set(p)
                         for p in pairs)
    ev = json.loads((run_dir / "dpo-beta0.1" / "eval" / "eval.json").read_text())
    steps = [p["step"] for p in ev["frontier"]]
    assert steps[0] == 0 and steps[-1] == max(steps) and len(steps) >= 3  # pi_ref, a checkpoint, the final model
    assert not (run_dir / "dpo-beta0.1" / "checkpoints").exists()  # removed once evaluated
    assert "table" not in capsys.readouterr().err

    # Second run through the CLI: samples, training and evaluation all come from the caches.
    final = run_dir / "dpo-beta0.1" / "final" / "model.safetensors"
    before = final.stat().st_mtime_ns
    assert main(["recipe", "sentiment", *tiny_overrides(run_dir)]) == 0
    out = capsys.readouterr()
    assert "samples cached" in out.err and "trained already (cached)" in out.err
    assert "evaluated already (cached)" in out.err
    assert "held-out mean reward" in out.out
    assert final.stat().st_mtime_ns == before


def test_a_bad_reward_is_refused_before_any_sampling(capsys):
    assert main(["recipe", "sentiment", "reward=no_such_module:fn"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dpokit: error: recipe config: reward: 'no_such_module:fn'")


def test_figure_2_runs_ppo_gt_and_ppo_with_a_reward_model_on_the_same_frontier(tmp_path, monkeypatch):
    """The RLHF side of Figure 2 on a tiny model: a reward model trained on the recipe's pairs, PPO on it and
    PPO-GT on the true reward, each evaluated like DPO (same prompts, seed, reward) and on the same plot."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "sentiment"
    overrides = [*tiny_overrides(run_dir), "best_of_n=[2]", "ppo.ground_truth=true", "ppo.reward_model=true",
                 "ppo.kl_targets=[2.0]", "ppo.train={max_steps: 2, batch_size: 4}",
                 "ppo.settings={rollout_prompts: 4, epochs: 1}", "reward_model.train={epochs: 1}"]
    summary = recipe.run(None, overrides)
    assert {"dpo-beta0.1", "ppo-gt-kl2", "ppo-kl2"} <= set(summary["runs"])
    assert summary["reward-model"]["accuracy"] is not None  # held-out pair accuracy of the reward model
    ppo_config = yaml.safe_load((run_dir / "ppo-kl2" / "config.yaml").read_text())
    assert ppo_config["ppo"]["reward"] == str(run_dir / "reward-model") and ppo_config["ppo"]["kl_target"] == 2.0
    gt_config = yaml.safe_load((run_dir / "ppo-gt-kl2" / "config.yaml").read_text())
    assert gt_config["ppo"]["reward"].endswith(":letter_share")
    for name in ("ppo-gt-kl2", "ppo-kl2"):
        run = summary["runs"][name]
        assert run["kl"] is not None and run["reward"] is not None
        assert [p["step"] for p in run["frontier"]][0] == 0  # pi_ref opens every frontier
    table = (run_dir / "results.md").read_text()
    assert "| PPO-GT KL→2 |" in table and "| PPO KL→2 |" in table
    assert "PPO-GT KL→2" in (run_dir / "frontier.svg").read_text()


def test_online_runs_take_the_offline_runs_steps_on_their_own_samples(tmp_path, monkeypatch):
    """online.sync_every: one online DPO run per s beside offline DPO, from pi_ref with its loss and as many
    gradient steps, sampling its own pairs (the generator refreshed every s steps), checkpoints on the sync
    grid, evaluated on the same frontier; results.md gives each run's wall-clock."""
    from dpokit.recipes.sentiment.runs import train_rows

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "online"
    summary = recipe.run(None, [*tiny_overrides(run_dir), "best_of_n=[]", "online.sync_every=[1, 3]"])
    offline = train_rows(run_dir / "dpo-beta0.1")
    for s in (1, 3):
        name = f"online-s{s}"
        rows = train_rows(run_dir / name)
        assert [r["step"] for r in rows] == [r["step"] for r in offline]  # the same number of gradient steps
        assert [r["online/generator_step"] for r in rows] == [1 + s * ((n - 1) // s) for n in range(1, len(rows) + 1)]
        config = yaml.safe_load((run_dir / name / "config.yaml").read_text())
        assert config["online"]["sync_every"] == s and config["reference"]["mode"] == "model"
        assert config["loss"]["beta"] == 0.1 and config["online"]["samples_per_prompt"] == 4
        assert config["train"]["save_every"] == {1: 2, 3: 3}[s]  # train.save_every=2 rounded up to the sync grid
        run = summary["runs"][name]
        assert run["reward"] is not None and [p["step"] for p in run["frontier"]][0] == 0
        seconds = run["seconds"]
        assert seconds["data_s"] == 0 and 0 < seconds["sample_s"] < seconds["train_s"]  # it samples while training
    assert summary["runs"]["dpo-beta0.1"]["seconds"]["data_s"] > 0  # offline DPO's cost starts with pi_ref's samples
    table = (run_dir / "results.md").read_text()
    assert "| Online DPO |" in table and "| Semi-online DPO s=3 |" in table


def test_claims_preset_pipeline_on_a_tiny_model(tmp_path, monkeypatch):
    """claims.seeds runs the whole experiment per seed and measures each quoted claim from those runs."""
    from dpokit.recipes.sentiment.claims import QUOTED

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "claims"
    overrides = [*tiny_overrides(run_dir), "best_of_n=[]", "ppo.ground_truth=true", "ppo.reward_model=true",
                 "ppo.kl_targets=[2.0]", "ppo.train={max_steps: 4, batch_size: 4, save_every: 2}",
                 "ppo.settings={rollout_prompts: 4, epochs: 1}", "reward_model.train={epochs: 1}",
                 "claims.seeds=[0, 1]", "eval.n_samples=2"]
    result = recipe.run(None, overrides)
    assert json.loads((run_dir / "claims.json").read_text())["claims"] == result["claims"]
    assert set(result["claims"]) == set(QUOTED)
    for seed in (0, 1):
        assert (run_dir / f"seed-{seed}" / "summary.json").is_file()
        measured = result["per_seed"][str(seed)] if str(seed) in result["per_seed"] else result["per_seed"][seed]
        for method in ("DPO", "PPO", "PPO-GT"):
            m = measured["methods"][method]
            flops = [p["flops"] for p in m["frontier"]]
            assert flops == sorted(flops) and flops[-1] > 0  # cumulative compute grows along the frontier
            assert m["per_prompt_variance"] is not None  # 2 samples per held-out prompt
        # PPO (reward model) pays for the preference data and the reward model before its first step.
        assert measured["methods"]["PPO"]["frontier"][1]["flops"] > measured["methods"]["PPO-GT"]["frontier"][1]["flops"]
    text = (run_dir / "claims.md").read_text()
    assert "50% less compute" in text and "| PPO-GT |" in text


def test_evaluate_spec_removes_only_the_final_steps_checkpoint(tmp_path, monkeypatch):
    """The final step's checkpoint duplicates final/ and is removed before evaluating; after an evaluation that
    stopped part way it is gone already, and the last checkpoint left is a frontier point to evaluate."""
    import dpokit.evaluate.run as evaluate_module
    from dpokit.recipes.sentiment.config import SentimentConfig
    from dpokit.recipes.sentiment.runs import RunSpec, evaluate_spec

    run_dir = tmp_path / "dpo"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"split": "train", "step": s}) + "\n"
                                                   for s in range(1, 25)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    seen = []

    def evaluate_run(folder, **kwargs):
        seen.append(sorted(p.name for p in (Path(folder) / "checkpoints").iterdir()))
        return {"frontier": [], "kl": 1.0, "reward": 0.5}

    monkeypatch.setattr(evaluate_module, "evaluate_run", evaluate_run)
    spec = RunSpec("dpo", "DPO", "dpo", "dpo", {"run_dir": str(run_dir)})
    cfg = SentimentConfig()
    for steps in ((8, 16, 24), (8, 16)):  # a fresh run, then a re-run after step-24 was removed
        for step in steps:
            (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True, exist_ok=True)
        result = evaluate_spec(spec, cfg, prompts)
        (run_dir / "recipe-stage.json").unlink()  # evaluate again next time
    assert seen == [["step-16", "step-8"], ["step-16", "step-8"]]
    assert result["frontier"][-1]["step"] == 24
