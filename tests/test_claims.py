"""The claims arithmetic of ``dpokit recipe sentiment --preset claims`` on hand-made numbers: which checkpoint
first reaches the target, the spread over seeds, the ratios against the quoted figures and their verdicts."""

import statistics

import pytest

from dpokit.recipes.sentiment.claims import QUOTED, analyse, markdown, per_prompt_std, reach


def seed(ref, dpo, ppo, skipped=0):
    """One seed: pi_ref's reward and, per method, (final reward, KL, total FLOPs, frontier [(step, reward,
    flops)], per-prompt std)."""
    def method(values, skip=0):
        reward, kl, flops, frontier, spread = values
        return {"reward": reward, "reward_stderr": 0.01, "kl": kl, "flops": flops, "seconds": flops / 1e12,
                "skipped_steps": skip, "per_prompt_std": spread,
                "frontier": [{"step": 0, "kl": 0.0, "reward": ref, "flops": 0.0, "seconds": 0.0}]
                + [{"step": s, "kl": None, "reward": r, "flops": f, "seconds": f / 1e12} for s, r, f in frontier]}
    return {"reward_ref": ref, "reward_ref_stderr": 0.02,
            "methods": {"DPO": method(dpo), "PPO": method(ppo, skipped)}}


def test_reach_takes_the_first_checkpoint_at_or_above_the_target():
    frontier = [{"step": 0, "reward": 0.9}, {"step": 4, "reward": 0.3}, {"step": 8, "reward": 0.5},
                {"step": 12, "reward": 0.7}]
    assert reach(frontier, 0.5)["step"] == 8  # pi_ref (step 0) never counts, even above the target
    assert reach(frontier, 0.8) is None


def test_per_prompt_std_averages_the_sample_std_of_each_prompt():
    rows = [{"temperature": 1.0, "prompt": "a", "policy_reward": v} for v in (0.0, 1.0, 2.0)]
    rows += [{"temperature": 1.0, "prompt": "b", "policy_reward": v} for v in (1.0, 1.0)]
    rows += [{"temperature": 0.7, "prompt": "a", "policy_reward": 9.0}]  # another temperature: not counted
    assert per_prompt_std(rows) == pytest.approx((1.0 + 0.0) / 2)  # stdev(0, 1, 2) = 1, stdev(1, 1) = 0
    assert per_prompt_std([{"temperature": 1.0, "prompt": "a", "policy_reward": 1.0}]) is None


def test_analyse_ratios_and_verdicts():
    seeds = {
        0: seed(0.1, (0.5, 2.0, 4e14, [(5, 0.3, 2e14), (10, 0.5, 4e14)], 0.2),
                (0.6, 3.0, 1e15, [(5, 0.2, 5e14), (10, 0.6, 1e15)], 0.3)),
        1: seed(0.1, (0.5, 2.0, 4e14, [(5, 0.35, 2e14), (10, 0.5, 4e14)], 0.2),
                (0.2, 3.0, 1e15, [(5, 0.1, 5e14), (10, 0.2, 1e15)], 0.3)),
        2: seed(0.1, (0.5, 2.0, 4e14, [(5, 0.3, 2e14), (10, 0.5, 4e14)], 0.2),
                (0.4, 3.0, 1e15, [(5, 0.4, 5e14), (10, 0.4, 1e15)], 0.3), skipped=1),
    }
    result = analyse(seeds, target=0.3)
    dpo, ppo = result["methods"]["DPO"], result["methods"]["PPO"]
    # DPO reaches 0.3 at its first checkpoint in every seed (2e14 FLOPs); PPO at step 10 in seed 0 (1e15),
    # never in seed 1, at step 5 in seed 2 (5e14): the mean over the seeds that reached it.
    assert dpo["reached"] == 3 and dpo["flops_to_target"] == pytest.approx(2e14)
    assert ppo["reached"] == 2 and ppo["flops_to_target"] == pytest.approx(7.5e14)
    assert dpo["final_reward_std"] == 0.0 and ppo["final_reward_std"] == pytest.approx(statistics.stdev([0.6, 0.2, 0.4]))
    assert ppo["diverged"] == 1 and dpo["diverged"] == 0  # the skipped step
    assert dpo["gain_per_kl"] == pytest.approx(0.4 / 2.0) and ppo["gain_per_kl"] == pytest.approx(0.3 / 3.0)
    claims = result["claims"]
    assert claims["compute"]["vs PPO"]["ratio"] == pytest.approx(2e14 / 7.5e14)
    assert claims["compute"]["vs PPO"]["holds"] is True  # 0.27 <= 0.5
    assert claims["stability"]["vs PPO"]["holds"] is True  # 0 <= 0.7 x PPO's spread
    assert claims["efficiency"]["vs PPO"]["ratio"] == pytest.approx(2.0) and claims["efficiency"]["vs PPO"]["holds"]
    assert claims["variance"]["vs PPO"]["ratio"] == pytest.approx(0.2 / 0.3)
    assert claims["variance"]["vs PPO"]["holds"] is True  # 0.67 <= 0.85
    text = markdown({"seeds": [0, 1, 2], **result})
    for quoted, *_ in QUOTED.values():
        assert quoted in text
    assert "| DPO |" in text and "3/3" in text and "2/3" in text


def test_default_target_is_half_the_best_gain_and_a_claim_can_fail():
    seeds = {s: seed(0.0, (0.2, 4.0, 1e15, [(10, 0.2, 1e15)], 0.4), (0.6, 1.0, 1e15, [(5, 0.3, 4e14), (10, 0.6, 1e15)], 0.2))
             for s in (0, 1)}
    result = analyse(seeds, target=None)
    assert result["target_reward"] == pytest.approx(0.3)  # half of PPO's gain of 0.6
    claims = result["claims"]
    assert claims["efficiency"]["vs PPO"]["ratio"] == pytest.approx((0.2 / 4.0) / (0.6 / 1.0))
    assert claims["efficiency"]["vs PPO"]["holds"] is False
    assert claims["variance"]["vs PPO"]["holds"] is False  # 0.4 / 0.2 = 2 > 0.85
    # DPO never reaches 0.3: no cost to compare, so the compute claim is not measurable (never "holds").
    assert result["methods"]["DPO"]["reached"] == 0 and result["methods"]["PPO"]["reached"] == 2
    assert claims["compute"]["vs PPO"]["ratio"] is None and claims["compute"]["vs PPO"]["holds"] is None


def test_default_target_when_a_method_ends_below_the_reference():
    seeds = {s: seed(0.5, (0.3, 1.0, 1e15, [(10, 0.3, 1e15)], 0.1), (0.9, 1.0, 1e15, [(10, 0.9, 1e15)], 0.1))
             for s in (0, 1)}
    result = analyse(seeds, target=None)
    assert result["target_reward"] == pytest.approx(0.7)  # 0.5 + half of the best gain, 0.4
    assert result["methods"]["DPO"]["reached"] == 0 and result["methods"]["PPO"]["reached"] == 2
    assert result["methods"]["DPO"]["diverged"] == 2  # 0.3 is far below pi_ref's 0.5
