"""The claims arithmetic of ``dpokit recipe sentiment --preset claims`` on hand-made numbers: where a run crosses
the target between checkpoints, reward at matched KL, the intervals over seeds and the verdicts they allow, and
the FLOPs of each step looked up by its step number."""

import json
import math
import statistics

import pytest
import torch
from safetensors.torch import save_file

from dpokit.recipes.sentiment.claims import QUOTED, analyse, markdown, measure_seed, per_prompt_variance
from dpokit.recipes.sentiment.intervals import bootstrap_interval, matched_kl_gains, reach, resamples, verdict

# Every number below is a sum or a ratio of a few hand-picked floats: 1e-9 relative is float64 round-off with
# room to spare, on any machine.
REL = 1e-9


def method(ref, final, frontier, variance, skipped=0):
    """One method of one seed: final reward, per-prompt reward variance, frontier [(step, KL, reward, FLOPs)]
    after pi_ref (step 0 at KL 0, reward ``ref``, FLOPs 0)."""
    points = [{"step": 0, "kl": 0.0, "reward": ref, "flops": 0.0, "seconds": 0.0}]
    points += [{"step": s, "kl": k, "reward": r, "flops": f, "seconds": f / 1e12} for s, k, r, f in frontier]
    return {"reward": final, "reward_stderr": 0.01, "kl": points[-1]["kl"], "flops": points[-1]["flops"],
            "seconds": points[-1]["seconds"], "skipped_steps": skipped, "per_prompt_variance": variance,
            "frontier": points}


def seed(ref, **methods):
    return {"reward_ref": ref, "reward_ref_stderr": 0.02, "methods": methods}


def line(ref, gain_per_nat, kls, flops_per_nat=1e14, variance=0.1):
    """A method whose reward rises by ``gain_per_nat`` per nat of KL: a checkpoint at each KL of ``kls`` (steps
    8, 16, ...), its FLOPs proportional to its KL."""
    frontier = [(8 * (i + 1), k, ref + gain_per_nat * k, flops_per_nat * k) for i, k in enumerate(kls)]
    return method(ref, frontier[-1][2], frontier, variance)


# -------------------------------------------------------------------------------------------------- frontier

def test_reach_interpolates_between_the_checkpoints_around_the_target_and_reports_them_as_bounds():
    frontier = [{"step": 0, "reward": 0.1, "flops": 1e12, "seconds": 1.0},
                {"step": 8, "reward": 0.2, "flops": 5e12, "seconds": 5.0},
                {"step": 16, "reward": 0.6, "flops": 9e12, "seconds": 9.0}]
    hit = reach(frontier, 0.4)
    # 0.4 is half-way from 0.2 (step 8) to 0.6 (step 16): step 12, half-way between the two checkpoints' costs.
    assert hit["flops"] == pytest.approx(7e12, rel=REL)
    assert hit["step"] == pytest.approx(12.0, rel=REL) and hit["seconds"] == pytest.approx(7.0, rel=REL)
    assert hit["bounds"]["flops"] == [5e12, 9e12] and hit["bounds"]["step"] == [8, 16]
    # Crossed before the first checkpoint: interpolated from pi_ref (step 0), which never counts by itself.
    assert reach(frontier, 0.15)["step"] == pytest.approx(4.0, rel=REL)
    assert reach([{"step": 0, "reward": 0.9}, {"step": 8, "reward": 0.3}], 0.5) is None
    assert reach(frontier, 0.7) is None


def test_matched_kl_reads_both_frontiers_over_the_kl_range_both_reach():
    # DPO: 0.1 per nat up to 4 nats; PPO: 0.05 per nat up to 2 nats, then flat to 6 nats.
    dpo = [{"step": 0, "kl": 0.0, "reward": 0.0}, {"step": 8, "kl": 4.0, "reward": 0.4}]
    ppo = [{"step": 0, "kl": 0.0, "reward": 0.0}, {"step": 8, "kl": 2.0, "reward": 0.1},
           {"step": 16, "kl": 6.0, "reward": 0.1}]
    gain_dpo, gain_ppo, kl_range = matched_kl_gains(dpo, ppo, reward_ref=0.0)
    assert kl_range == (0.0, 4.0)
    # Mean over [0, 4] of 0.1 k is 0.2; of PPO's: (area 0.1 on [0, 2] + 0.2 on [2, 4]) / 4 = 0.075.
    assert gain_dpo == pytest.approx(0.2, rel=REL) and gain_ppo == pytest.approx(0.075, rel=REL)
    assert matched_kl_gains(dpo, [{"step": 0, "kl": 0.0, "reward": 0.0}], 0.0) is None  # nothing to compare


def test_bootstrap_enumerates_every_resample_of_few_seeds_and_the_verdict_needs_the_whole_interval():
    assert len(resamples(3)) == 27 and len(set(resamples(3))) == 27
    values = [1.0, 2.0, 3.0]
    low, high = bootstrap_interval(3, lambda idx: statistics.fmean(values[i] for i in idx))
    assert 1.0 <= low < 2.0 < high <= 3.0  # the mean of 3 seeds resampled: within their range, around 2
    assert bootstrap_interval(1, lambda idx: 0.3) is None  # one seed has no spread to show: no interval
    assert verdict([0.3, 0.45], 0.5, "<=") == "holds" and verdict([0.55, 0.7], 0.5, "<=") == "does not hold"
    assert verdict([0.3, 0.7], 0.5, "<=") == "undetermined" and verdict([1.1, 1.5], 1.2, ">=") == "undetermined"


def test_per_prompt_variance_averages_the_sample_variance_of_each_prompt():
    rows = [{"temperature": 1.0, "prompt": "a", "policy_reward": v} for v in (0.0, 1.0, 2.0)]
    rows += [{"temperature": 1.0, "prompt": "b", "policy_reward": v} for v in (1.0, 1.0)]
    rows += [{"temperature": 0.7, "prompt": "a", "policy_reward": 9.0}]  # another temperature: not counted
    assert per_prompt_variance(rows) == pytest.approx((1.0 + 0.0) / 2)  # variance(0, 1, 2) = 1, (1, 1) = 0
    assert per_prompt_variance([{"temperature": 1.0, "prompt": "a", "policy_reward": 1.0}]) is None


# ---------------------------------------------------------------------------------------------------- claims

def test_a_comparator_that_lowered_the_reward_leaves_dpo_ahead_not_behind():
    # PPO spends KL and loses reward on every seed; DPO gains. A ratio of gains would be negative ("does not
    # hold"); DPO is ahead at every matched KL.
    seeds = {s: seed(0.1, DPO=line(0.1, 0.05 + 0.01 * s, [2.0, 4.0]), PPO=line(0.1, -0.03 - 0.01 * s, [3.0, 6.0]))
             for s in range(3)}
    efficiency = analyse(seeds, target=0.2)["claims"]["efficiency"]["vs PPO"]
    assert efficiency["ratio"] is None
    assert efficiency["verdict"] == "holds" and "lowered the reward" in efficiency["reason"]


def test_a_comparator_with_no_distinguishable_gain_is_not_measurable():
    # PPO's matched-KL gains are +0.02, -0.01, +0.005 (per nat 0.01, -0.005, 0.0025 up to 4 nats, mean over
    # [0, 4] = 2 x that): their interval contains 0, so no ratio to it means anything.
    seeds = {s: seed(0.1, DPO=line(0.1, 0.05, [2.0, 4.0]), PPO=line(0.1, g, [2.0, 4.0]))
             for s, g in enumerate((0.01, -0.005, 0.0025))}
    efficiency = analyse(seeds, target=0.2)["claims"]["efficiency"]["vs PPO"]
    assert efficiency["ratio"] is None
    assert efficiency["verdict"] == "not measurable" and "not distinguishable from 0" in efficiency["reason"]
    # No KL range in common (a comparator that never moved from pi_ref): not measurable either, with the reason.
    flat = {s: seed(0.1, DPO=line(0.1, 0.05, [2.0, 4.0]), PPO=method(0.1, 0.1, [(8, 0.0, 0.1, 1e14)], 0.1))
            for s in range(2)}
    assert "share no KL range" in analyse(flat, target=0.2)["claims"]["efficiency"]["vs PPO"]["reason"]


def test_efficiency_is_reward_at_matched_kl():
    # DPO gains 0.1 per nat up to 4 nats; PPO gains 0.2 by 2 nats, then nothing more up to 8. Per nat at their
    # own final KLs that is 0.1 against 0.025 (4x); at matched KL, over [0, 4]: DPO's mean gain 0.2, PPO's
    # (0.2 on [0, 2] + 0.4 on [2, 4]) / 4 = 0.15, a ratio of 4/3.
    ppo = method(0.0, 0.2, [(8, 2.0, 0.2, 1e14), (16, 8.0, 0.2, 4e14)], 0.1)
    seeds = {s: seed(0.0, DPO=line(0.0, 0.1, [2.0, 4.0]), PPO=ppo) for s in range(3)}
    efficiency = analyse(seeds, target=0.1)["claims"]["efficiency"]["vs PPO"]
    assert efficiency["ratio"] == pytest.approx(4 / 3, rel=REL) and efficiency["verdict"] == "holds"
    assert efficiency["kl_ranges"] == [[0.0, 4.0]] * 3


def test_an_interval_straddling_the_bar_is_undetermined_not_holds():
    # FLOPs to R* (reached exactly at the first checkpoint), DPO / PPO per seed: 0.3, 0.4, 0.7. The ratio of
    # the means, 1.4 / 3 = 0.47, is under the bar of 0.5, but the seeds do not settle which side it is on.
    seeds = {s: seed(0.0, DPO=method(0.0, 0.5, [(8, 1.0, 0.5, f)], 0.1), PPO=method(0.0, 0.5, [(8, 1.0, 0.5, 1e15)], 0.1))
             for s, f in enumerate((3e14, 4e14, 7e14))}
    compute = analyse(seeds, target=0.5)["claims"]["compute"]["vs PPO"]
    assert compute["ratio"] == pytest.approx(1.4 / 3, rel=REL)
    low, high = compute["interval"]
    assert low < QUOTED["compute"][2] < high and compute["verdict"] == "undetermined"
    # Between pi_ref (0 FLOPs) and the first checkpoint, the checkpoints alone allow any ratio from 0 to infinity.
    assert compute["checkpoint_bounds"] == [0.0, math.inf]
    assert "checkpoints alone: 0.00 to ∞" in markdown({"seeds": [0, 1, 2], **analyse(seeds, target=0.5)})


def test_less_variance_is_judged_on_variance_and_stability_on_the_std_scale():
    # Per-prompt reward variance 0.081 against 0.1 on every seed: std ratio 0.9 (above 0.85), variance ratio
    # 0.81 (the quote's "15% less variance" holds).
    seeds = {s: seed(0.0, DPO=method(0.0, 0.5 + 0.01 * s, [(8, 1.0, 0.5, 1e14)], 0.081),
                     PPO=method(0.0, 0.5 + 0.1 * s, [(8, 1.0, 0.5, 1e15)], 0.1)) for s in range(3)}
    claims = analyse(seeds, target=0.5)["claims"]
    assert claims["variance"]["vs PPO"]["ratio"] == pytest.approx(0.81, rel=REL)
    assert claims["variance"]["vs PPO"]["interval"] == pytest.approx([0.81, 0.81], rel=REL)
    assert claims["variance"]["vs PPO"]["verdict"] == "holds"
    # Final rewards 0.50, 0.51, 0.52 against 0.5, 0.6, 0.7: the std ratio is 0.1 on every resample with a spread.
    assert claims["stability"]["vs PPO"]["ratio"] == pytest.approx(0.1, rel=REL)
    assert claims["stability"]["vs PPO"]["verdict"] == "holds"


def test_compute_needs_every_seed_to_reach_the_target_and_names_who_did_not():
    seeds = {
        0: seed(0.1, DPO=line(0.1, 0.1, [2.0, 4.0]), PPO=line(0.1, 0.1, [1.0, 3.0])),
        1: seed(0.1, DPO=line(0.1, 0.1, [2.0, 4.0]), PPO=line(0.1, 0.01, [1.0, 3.0])),  # PPO ends at 0.13
    }
    result = analyse(seeds, target=0.3)
    assert result["methods"]["DPO"]["reached"] == 2 and result["methods"]["PPO"]["reached"] == 1
    compute = result["claims"]["compute"]["vs PPO"]
    assert compute["verdict"] == "not measurable" and compute["reason"] == "PPO reached R* on 1/2 seeds"
    # DPO crosses 0.3 at KL 2 = its first checkpoint (2e14 FLOPs) on both seeds; bounds: pi_ref and that point.
    assert result["methods"]["DPO"]["flops_to_target"] == pytest.approx(2e14, rel=REL)
    assert result["methods"]["DPO"]["flops_to_target_bounds"] == pytest.approx([0.0, 2e14])


def test_default_target_is_half_the_best_gain_and_markdown_shows_every_claim():
    seeds = {s: seed(0.0, DPO=line(0.0, 0.05, [2.0, 4.0]), PPO=line(0.0, 0.15 + 0.01 * s, [2.0, 4.0]))
             for s in range(3)}
    result = analyse(seeds, target=None)
    assert result["target_reward"] == pytest.approx(0.5 * 0.64, rel=REL)  # half of PPO's mean final gain
    # At matched KL (over [0, 4]) DPO gains 0.1, PPO 0.30 to 0.34: a ratio near 0.31, far below 1.2.
    assert result["claims"]["efficiency"]["vs PPO"]["verdict"] == "does not hold"
    text = markdown({"seeds": [0, 1, 2], **result})
    for quoted, *_ in QUOTED.values():
        assert quoted in text
    assert "| DPO |" in text and "**does not hold**" in text and "bootstrap interval" in text


def test_stability_over_two_seeds_has_no_interval():
    # With 2 seeds every resample that has a spread is the pair itself (in either order): the interval would be
    # a point, [0.1, 0.1], and "holds" a certainty the two seeds do not give.
    two = {s: seed(0.0, DPO=method(0.0, 0.5 + 0.01 * s, [(8, 1.0, 0.5, 1e14)], 0.1),
                   PPO=method(0.0, 0.5 + 0.1 * s, [(8, 1.0, 0.5, 1e15)], 0.1)) for s in range(2)}
    stability = analyse(two, target=0.5)["claims"]["stability"]["vs PPO"]
    assert stability["verdict"] == "not measurable" and stability["ratio_of_two"] == pytest.approx(0.1, rel=REL)


def test_one_seed_gives_ratios_but_no_verdict():
    one = {0: seed(0.0, DPO=line(0.0, 0.1, [2.0, 4.0]), PPO=line(0.0, 0.05, [4.0, 8.0]))}
    claims = analyse(one, target=0.1)["claims"]
    assert {c["vs PPO"]["verdict"] for c in claims.values()} == {"not measurable"}
    assert claims["compute"]["vs PPO"]["reason"] == "one seed: no interval over seeds"


def test_default_target_when_a_method_ends_below_the_reference():
    seeds = {s: seed(0.5, DPO=method(0.5, 0.3, [(10, 1.0, 0.3, 1e15)], 0.1),
                     PPO=method(0.5, 0.9, [(10, 1.0, 0.9, 1e15)], 0.1)) for s in (0, 1)}
    result = analyse(seeds, target=None)
    assert result["target_reward"] == pytest.approx(0.7)  # 0.5 + half of the best gain, 0.4
    assert result["methods"]["DPO"]["reached"] == 0 and result["methods"]["PPO"]["reached"] == 2
    assert result["methods"]["DPO"]["diverged"] == 2  # 0.3 is far below pi_ref's 0.5


# --------------------------------------------------------------------------------------- FLOPs from the runs

def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run_folder(run_dir, rows, frontier_steps, n_params=None):
    _write_jsonl(run_dir / "metrics.jsonl", rows)
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    frontier = [{"checkpoint": "reference" if s == 0 else f"step-{s}", "step": s, "kl": 0.5 * s, "reward": 0.1 * s}
                for s in frontier_steps]
    (run_dir / "eval" / "eval.json").write_text(json.dumps({"reward": 0.5, "reward_stderr": 0.01, "kl": 1.0,
                                                            "frontier": frontier}))
    _write_jsonl(run_dir / "eval" / "samples.jsonl",
                 [{"temperature": 1.0, "prompt": "p", "policy_reward": v, "reference_reward": v} for v in (0.0, 1.0)])
    if n_params:
        (run_dir / "final").mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(n_params)}, str(run_dir / "final" / "model.safetensors"))


def test_flops_are_looked_up_by_step_when_train_log_every_is_2(tmp_path):
    """Rows logged every 2nd step (train.log_every: 2): the frontier's checkpoint at step 4 is charged the
    FLOPs of steps 1-4, not of the 4th row (which does not exist: step 8 has the 4th row here)."""
    from dpokit.recipes.sentiment.config import SentimentConfig

    cfg = SentimentConfig(ppo={"ground_truth": True, "reward_model": False, "kl_targets": [1.0],
                               "settings": {"epochs": 1}, "train": {"max_steps": 8}},
                          dpo={"betas": [0.1], "train": {"max_steps": 8}}, best_of_n=[])
    n = 10  # parameters
    _write_jsonl(tmp_path / "data" / "samples-train.jsonl", [{"prompt": "a b", "tokens": [3], "seconds": 2.0}])
    _write_jsonl(tmp_path / "data" / "pairs-train.jsonl", [{"prompt": "a b"}] * 64)
    # Step s (logged at 2, 4, 6, 8) processed 100 s tokens, and an unlogged step the same as the next logged one.
    dpo_rows = [{"step": s, "split": "train", "tokens": 100 * s, "elapsed_s": float(s), "skipped_steps": 0}
                for s in (2, 4, 6, 8)]
    ppo_rows = [{**r, "prompt_tokens": 10 * r["step"]} for r in dpo_rows]
    _run_folder(tmp_path / "dpo-beta0.1", dpo_rows, [0, 4, 8], n_params=n)
    _run_folder(tmp_path / "ppo-gt-kl1", ppo_rows, [0, 4, 8])

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    measured = measure_seed(cfg, tmp_path, {"reward_ref": 0.0}, Tokenizer())
    dpo, ppo = measured["methods"]["DPO"], measured["methods"]["PPO-GT"]
    # Tokens by step 1..8: 200, 200, 400, 400, 600, 600, 800, 800 (each unlogged step as the row after it).
    data = 2 * n * (2 + 3)  # one sample: 2 prompt tokens + 3 sampled
    tokens_to_4, tokens = 200 + 200 + 400 + 400, 2 * (200 + 400 + 600 + 800)
    pairs_seen = 8 * cfg.train.batch_size * cfg.train.grad_accum
    reference = 2 * n * tokens * 64 / pairs_seen
    assert [p["step"] for p in dpo["frontier"]] == [0, 4, 8]
    assert dpo["frontier"][1]["flops"] == pytest.approx(data + reference + 6 * n * tokens_to_4, rel=REL)
    assert dpo["flops"] == pytest.approx(data + reference + 6 * n * tokens, rel=REL)
    assert dpo["flops_exact"] is False and dpo["frontier"][1]["seconds"] == pytest.approx(2.0 + 4.0)
    per_position = (2 + 2 + 2 + 6) * n  # 1 PPO epoch
    assert ppo["frontier"][1]["flops"] == pytest.approx(per_position * 1.1 * tokens_to_4, rel=REL)
    assert ppo["frontier"][2]["flops"] == pytest.approx(per_position * 1.1 * tokens, rel=REL)
    assert math.isclose(ppo["frontier"][0]["flops"], 0.0)  # PPO-GT pays nothing before its first step
