"""Online and semi-online DPO (``dpokit train`` with ``online.reward``) on a tiny random model: it learns its
reward, samples from the weights ``online.sync_every`` says, resumes bit-identically after SIGKILL, counts ties
and updates nothing on a step without pairs, gives the same update for any split into micro-batches, and
refuses settings it cannot run with in one line; under torchrun each rank samples its share of the step's
prompts and the metrics count both; an LLM judge and a reward model's run directory serve as the reward."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli
from dpokit.config import ConfigError, load_config
from dpokit.training.distributed import Dist
from dpokit.training.metrics import PAIR_METRICS, read_metrics
from test_resume import assert_bit_identical, kill_when
from tolerances import METRIC_REL, assert_same_metrics, assert_same_weights_after_adamw

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-online.yaml"
LETTER_E = str(ROOT / "examples" / "rewards.py") + ":letter_e"
TRAIN_PREFS, EVAL_PREFS = ROOT / "examples" / "prefs-tiny.jsonl", ROOT / "examples" / "prefs-tiny-eval.jsonl"
ONLINE_KEYS = ["online/reward_mean", "online/reward_std", "online/pairs", "online/ties", "online/sample_s",
               "online/score_s", "online/generator_step", "online/response_length", "online/eos_fraction"]
DPO_KEYS = [*PAIR_METRICS, "step", "elapsed_s", "tokens", "grad_norm", "lr", "tokens_per_second",
            "skipped_steps"]


def small_config(tmp_path: Path, **sections) -> dict:
    """configs/tiny-online.yaml, shorter (3 steps, held-out evaluation only at the start and end; fp32), with the given sections' keys replaced."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["train"].update(max_steps=3, progress=False, save_every=None, precision="fp32")
    cfg["online"]["reward"] = LETTER_E
    for key in ("train", "eval"):
        cfg["data"][key] = str(ROOT / cfg["data"][key])
    cfg["eval"] = {}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_tiny_online_config_learns_its_reward(tmp_path):
    run_dir = tmp_path / "run"
    # The shipped config as users run it: 60 steps of sampling and training (~1 min on 2 idle cores). The
    # timeout only guards against a hang; it is generous because kernels without SIMD
    # (ATEN_CPU_CAPABILITY=default) and a loaded machine stretch the run several-fold.
    done = run_cli("train", str(TINY), f"run_dir={run_dir}", "train.progress=false", timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 61))
    assert [r["step"] for r in evals] == [0, 15, 30, 45, 60]
    for key in DPO_KEYS + ONLINE_KEYS:
        assert all(key in r for r in train if r["online/pairs"] or key not in PAIR_METRICS), key
    # Fully online: the generator is the policy at the start of every step.
    assert [r["online/generator_step"] for r in train] == list(range(1, 61))
    # 8 prompts a step, best against worst: every prompt gives a pair or a tie.
    assert all(r["online/pairs"] + r["online/ties"] == 8 for r in train)
    # Step 1: pi = pi_ref (a frozen copy of the same weights, the same computation), so every implicit reward
    # is exactly 0 and the loss is log 2.
    assert train[0]["rewards/chosen"] == 0.0 and abs(train[0]["loss"] - math.log(2)) < 1e-6
    # The held-out reward must rise by more than three standard errors of the difference of two means over the
    # 16 held-out prompts (each estimate's standard error is reward_std / sqrt(16)): chance cannot do that.
    first, last = evals[0], evals[-1]
    stderr = math.sqrt((first["reward_std"] ** 2 + last["reward_std"] ** 2) / 16)
    assert last["reward"] - first["reward"] > 3 * stderr, (first, last)
    assert first["kl"] == 0.0 and last["kl"] > 0.1  # it paid for the reward in KL(pi || pi_ref)
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step-20" / "COMPLETE").is_file()


def record_weights(monkeypatch) -> tuple[dict[int, dict], dict[int, dict], dict[int, int]]:
    """For every step that samples (a generator refresh), the trainable weights the policy holds while it
    samples, and the number of responses drawn; for every step, the weights right after (when its responses
    are scored): the policy's own."""
    import dpokit.methods.online as online_module

    monkeypatch.undo()  # a previous call's recorders, which would record into their own dicts too
    sampled: dict[int, dict[str, torch.Tensor]] = {}
    after: dict[int, dict[str, torch.Tensor]] = {}
    drawn: dict[int, int] = {}
    current = {}
    sample, score = online_module.sample, online_module.score

    def weights(online):
        return {n: p.detach().clone() for n, p in online.run.policy.named_parameters() if p.requires_grad}

    def recording_sample(online, items, *args):
        current["online"] = online
        step = online.run.step + 1
        assert step not in sampled, f"step {step} sampled twice"  # one generation call per refresh
        sampled[step], drawn[step] = weights(online), len(items)
        return sample(online, items, *args)

    def recording_score(*args):
        online = current["online"]
        after.setdefault(online.run.step + 1, weights(online))
        return score(*args)

    monkeypatch.setattr(online_module, "sample", recording_sample)
    monkeypatch.setattr(online_module, "score", recording_score)
    return sampled, after, drawn


def weights_after(run_dir: Path, step: int, start: dict) -> dict | None:
    """The trainable weights after ``step`` (``start`` before step 1), where a checkpoint holds them."""
    path = run_dir / "checkpoints" / f"step-{step}" / "model.safetensors"
    return start if step == 0 else load_file(str(path)) if path.exists() else None


def test_sync_every_decides_which_weights_are_sampled(tmp_path, monkeypatch):
    """Step n samples the policy as it was at the start of step g(n) = 1 + s * floor((n - 1) / s), i.e. the
    weights checkpointed after step g(n) - 1: s = 1, the current weights at every step; s = 2, steps 2 and 4
    sample what steps 1 and 3 did; s larger than the run, the starting weights throughout while the policy
    moves. Semi-online DPO draws the responses of all the steps of a refresh in one generation call at the
    refresh (8 prompts x 8 samples a step), and the policy keeps training from its own weights."""
    from dpokit.api import train

    for s, save_every in ((1, 1), (2, 2), (100, None)):
        sampled, after, drawn = record_weights(monkeypatch)
        cfg = small_config(tmp_path / f"s{s}", train={"max_steps": 5, "save_every": save_every},
                           online={"sync_every": s}, data={"eval": None})  # only the training draws sample
        run_dir = train(cfg)
        synced = [1 + s * ((n - 1) // s) for n in range(1, 6)]
        assert [r["online/generator_step"] for r in train_rows(run_dir)] == synced, s
        start = sampled[1]
        refreshes = sorted(set(synced))
        assert drawn == {g: 64 * sum(1 for n in synced if n == g) for g in refreshes}, (s, drawn)
        for n in range(2, 6):
            assert_bit_identical(sampled[synced[n - 1]], weights_after(run_dir, synced[n - 1] - 1, start))
            own = weights_after(run_dir, n - 1, start)
            if own is not None:
                assert_bit_identical(after[n], own)
            assert not all(torch.equal(after[n][k], start[k]) for k in start), (s, n)  # the policy moved


@pytest.mark.equivalence
def test_sigkill_then_resume_is_bit_identical_semi_online(tmp_path):
    """Semi-online (s = 2): killed after a checkpoint, resumed, the run ends with the uninterrupted run's weights
    bit for bit and logs the same rows: the generator is refreshed from the checkpointed policy at the step
    after it, and every draw is seeded by (seed, step, rank)."""
    cfg = small_config(tmp_path, train={"max_steps": 6, "save_every": 2}, online={"sync_every": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    straight = tmp_path / "straight"
    done = run_cli("train", str(path), f"run_dir={straight}")
    assert done.returncode == 0, done.stderr[-2000:]
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "dpokit", "train", str(path), f"run_dir={killed}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: (ckpts / "step-2" / "COMPLETE").exists() and not (ckpts / "step-6").exists())
    done = run_cli("train", str(path), f"run_dir={killed}", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    weights = [load_file(str(d / "final" / "model.safetensors")) for d in (straight, killed)]
    assert_bit_identical(*weights)
    rows = [train_rows(d) for d in (straight, killed)]
    assert [r["step"] for r in rows[1]] == list(range(1, 7))
    for a, b in zip(*rows):
        for key in ("loss", "online/reward_mean", "online/pairs", "online/ties", "online/generator_step"):
            assert a[key] == b[key], (a["step"], key)


def test_a_checkpoint_off_the_sync_grid_is_refused_unless_forced(tmp_path):
    """A run of 3 steps with s = 2 ends with a checkpoint at step 3, between refreshes: training it longer
    needs --force (the generator is then refreshed at step 4)."""
    from dpokit.api import train

    cfg = small_config(tmp_path, online={"sync_every": 2})
    run_dir = train(cfg)
    with pytest.raises(ConfigError, match="online.sync_every: the checkpoint at step 3"):
        train(cfg, train__max_steps=4, resume=True)
    train(cfg, train__max_steps=4, resume=True, force=True)
    assert [r["online/generator_step"] for r in train_rows(run_dir)] == [1, 1, 3, 4]


def test_a_constant_reward_ties_every_pair_and_changes_nothing(tmp_path):
    from dpokit.api import train

    rewards = tmp_path / "flat.py"
    rewards.write_text("def flat(prompt, response):\n    return 1.0\n")
    for mode, ties in (("best_worst", 8), ("all", 8 * 6)):  # 8 prompts; k = 4 gives 6 pairs a prompt
        cfg = small_config(tmp_path / mode, train={"max_steps": 2, "save_every": 1},
                           online={"reward": f"{rewards}:flat", "pairs": mode, "samples_per_prompt": 4})
        run_dir = train(cfg)
        rows = train_rows(run_dir)
        assert [(r["online/pairs"], r["online/ties"], r["tokens"]) for r in rows] == [(0, ties, 0)] * 2, mode
        assert all("loss" not in r and r["online/reward_mean"] == 1.0 for r in rows)
        first = load_file(str(run_dir / "checkpoints" / "step-1" / "model.safetensors"))
        assert_bit_identical(first, load_file(str(run_dir / "final" / "model.safetensors")))


def test_pairs_best_worst_and_all_by_hand():
    from dpokit.methods.online import make_pairs

    scores = [1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 2.0, 2.0]  # two prompts, k = 4
    # Prompt 1: the first highest (index 1) against the lowest (3); prompt 2: all equal, a tie.
    assert make_pairs(scores, 4, "best_worst", 0.0) == ([(1, 3)], 1)
    # Prompt 1: its 6 pairs but 1 ~ 2 (equal scores), the higher-scored first; prompt 2: all 6 tie.
    assert make_pairs(scores, 4, "all", 0.0) == ([(1, 0), (2, 0), (0, 3), (1, 3), (2, 3)], 7)
    # A margin of 1: differences of 1 or less tie too (0 ~ 3 now; 1 ~ 2 and prompt 2 as before).
    assert make_pairs(scores, 4, "all", 1.0) == ([(1, 0), (2, 0), (1, 3), (2, 3)], 8)
    assert make_pairs(scores, 4, "best_worst", 3.0) == ([], 2)


@pytest.mark.equivalence
def test_micro_batches_give_the_same_update(tmp_path):
    """8 prompts a step as batch 8 x accumulation 1 and 4 x 2: the same samples (one sampling batch), the same
    pairs, the loss divided by the step's pairs, so the same gradients up to fp32 summation order."""
    from dpokit.api import train

    runs = [train(small_config(tmp_path / f"b{b}", train={"batch_size": b, "grad_accum": 8 // b}))
            for b in (8, 4)]
    rows = [train_rows(d) for d in runs]
    for a, b in zip(*rows):
        assert a["online/reward_mean"] == b["online/reward_mean"] and a["online/pairs"] == b["online/pairs"]
    assert_same_metrics(rows[0], rows[1], ["loss", "rewards/margins", "logps/chosen", "grad_norm"], rel=METRIC_REL)
    weights = [load_file(str(d / "final" / "model.safetensors")) for d in runs]
    assert_same_weights_after_adamw(weights[0], weights[1], lr=1e-3, steps=3)


@pytest.mark.parametrize("override, message", [
    ({"reference": {"mode": "store"}}, "reference.mode: 'store'"),
    ({"online": {"sync_every": 3}, "train": {"save_every": 4}}, "train.save_every: 4 is not a multiple"),
    ({"loss": {"name": "plackett_luce"}}, "loss.name: online DPO trains pairs"),
])
def test_settings_online_dpo_cannot_run_with_are_one_line(tmp_path, override, message):
    from dpokit.methods.online import check_config

    cfg = small_config(tmp_path)
    for section, values in override.items():
        cfg.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_config(load_config(cfg), Dist())


@pytest.mark.parametrize("extra, expected", [
    (["reference.mode=store"], "reference.mode: 'store'"),
    (["online.samples_per_prompt=1"], "online.samples_per_prompt"),
    (["online.judge_url=http://127.0.0.1:9/v1", "online.judge_model=m"], "online.judge_url: give either"),
    (["online.pairs=some"], "online.pairs"),
])
def test_bad_online_settings_exit_2_with_one_line(tmp_path, extra, expected):
    done = run_cli("train", str(TINY), f"run_dir={tmp_path / 'r'}", *extra)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------- processes, an LLM judge, a reward model

LOGGED_LETTER_E = '''\
import json
import os
from pathlib import Path


def letter_e(prompt, response):
    """examples/rewards.py:letter_e, every call appended to scored-<RANK>.jsonl beside this file."""
    with Path(__file__).with_name(f"scored-{os.environ.get('RANK', 'single')}.jsonl").open("a") as log:
        log.write(json.dumps([prompt, response]) + "\\n")
    return float(response.count("e"))
'''


def prefs_column(path: Path, key: str) -> list[str]:
    return [json.loads(line)[key] for line in path.read_text().splitlines()]


def logged_calls(path: Path, held_out: set[str]) -> tuple[list[list[str]], list[list[str]]]:
    """The (prompt, response) pairs a ``LOGGED_LETTER_E`` process scored, in order: training draws, held-out ones."""
    calls = [json.loads(line) for line in path.read_text().splitlines()]
    return [c for c in calls if c[0] not in held_out], [c for c in calls if c[0] in held_out]


def record_pairs(monkeypatch) -> list[tuple[str, str]]:
    """The (chosen, rejected) response texts of every pair the run trains, in order."""
    import dpokit.methods.online as online_module

    pairs: list[tuple[str, str]] = []
    to_group = online_module.to_group

    def recording_to_group(chosen, rejected, max_length, location):
        pairs.append((chosen.text, rejected.text))
        return to_group(chosen, rejected, max_length, location)

    monkeypatch.setattr(online_module, "to_group", recording_to_group)
    return pairs


@pytest.mark.equivalence
def test_two_processes_sample_their_shares_of_the_step_prompts_and_count_both(tmp_path):
    """torchrun (DDP, gloo on CPU), 2 processes x batch 8 against 1 process x batch 16: the same 16 prompts a step
    (one seeded stream, whatever the world size); each rank samples 8 of them, the other rank the other 8, and
    every metric counts both shares. A rank's draws are seeded by (seed, step, rank), so the samples, and all
    computed from them (rewards, pairs, losses after step 1), differ from the one-process run's and are not
    compared with it; each run's metrics are checked against the responses its reward was called with."""
    from dpokit.api import train
    from dpokit.methods.online import make_pairs

    reward = tmp_path / "logged.py"
    reward.write_text(LOGGED_LETTER_E)
    k = 4  # samples a prompt, k(k - 1)/2 = 6 pairs of them (pairs: all); equal counts of "e" are common: ties
    online = {"reward": f"{reward}:letter_e", "samples_per_prompt": k, "pairs": "all"}
    cfg = small_config(tmp_path / "ddp", online=online, distributed={"timeout_s": 60})  # a lost rank fails fast
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = run_cli("train", str(path), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = Path(cfg["run_dir"])
    single = train(small_config(tmp_path / "single", train={"batch_size": 16}, online=online, data={"eval": None}))
    held_out = set(prefs_column(EVAL_PREFS, "prompt"))
    (train0, eval0), (train1, eval1), (train_single, _) = [
        logged_calls(tmp_path / f"scored-{rank}.jsonl", held_out) for rank in ("0", "1", "single")]
    assert (len(train0), len(train1), len(train_single)) == (3 * 8 * k, 3 * 8 * k, 3 * 16 * k)
    rows, single_rows = train_rows(run_dir), train_rows(single)
    assert [r["step"] for r in rows] == [r["step"] for r in single_rows] == [1, 2, 3]
    for n, row in enumerate(rows):
        shares = [calls[8 * k * n:8 * k * (n + 1)] for calls in (train0, train1)]
        prompts = [{p for p, _ in share} for share in shares]
        assert [len(p) for p in prompts] == [8, 8] and not prompts[0] & prompts[1], n
        assert prompts[0] | prompts[1] == {p for p, _ in train_single[16 * k * n:16 * k * (n + 1)]}, n
        scores = [[r.count("e") for _, r in share] for share in shares]
        made = [make_pairs(s, k, "all", 0.0) for s in scores]
        assert row["online/pairs"] == sum(len(pairs) for pairs, _ in made), n
        assert row["online/ties"] == sum(ties for _, ties in made), n
        for r in (row, single_rows[n]):  # each of the step's 16 prompts: 6 pairs or ties
            assert r["online/pairs"] + r["online/ties"] == 16 * 6, n
        assert row["online/reward_mean"] == sum(scores[0] + scores[1]) / (16 * k), n  # integer sums: exact
    assert all(sum(r[key] for r in rows) > 0 for key in ("online/pairs", "online/ties"))  # both cases occurred
    # Step 1, pi = pi_ref on both ranks: every pair's loss is fp32(log 2) (2e-8 from log 2), and so is the mean
    # when the ranks' sums are added and divided by the pairs of both (one rank's sum alone would be a fraction).
    for first in (rows[0], single_rows[0]):
        assert first["rewards/chosen"] == 0.0 and abs(first["loss"] - math.log(2)) < 1e-6
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3] and len(eval0) == len(eval1) == 2 * 8
    for i, row in enumerate(evals):  # the 16 held-out prompts, 8 on each rank
        shares = [calls[8 * i:8 * (i + 1)] for calls in (eval0, eval1)]
        assert {p for p, _ in shares[0]} | {p for p, _ in shares[1]} == held_out
        assert row["reward"] == sum(r.count("e") for share in shares for _, r in share) / 16
    # KL(pi || pi_ref) is exactly 0 on both ranks before training; 3 updates moved pi (its sign, an estimate from
    # 16 samples, is not asserted).
    assert evals[0]["kl"] == 0.0 and evals[1]["kl"] != 0.0
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_an_llm_judge_as_the_reward_scores_every_sample_and_its_verdicts_make_the_pairs(tmp_path, monkeypatch):
    """online.judge_url (online.reward null): every sampled response, and every held-out one, is judged against
    its prompt's chosen response by a local scripted judge, shown in either order; a win is 1, a loss 0, a
    malformed verdict 0.5 and counted in judge/malformed; each prompt's better verdict is paired with its worse,
    and a prompt whose 2 verdicts are equal is a tie."""
    from dpokit.api import train
    from test_judge import Judge, reply

    train_chosen = set(prefs_column(TRAIN_PREFS, "chosen"))
    chosen = train_chosen | set(prefs_column(EVAL_PREFS, "chosen"))

    def verdict(response):  # 2 or more letters "e" win; a length divisible by 5 gets a reply that names neither
        return 0.5 if len(response) % 5 == 0 else 1.0 if response.count("e") >= 2 else 0.0

    def scripted(a, b, n):
        response = b if a in chosen else a
        if verdict(response) == 0.5:
            return reply("Comparison: both fine.")
        return reply("More helpful: " + ("A" if (verdict(response) == 1.0) == (response == a) else "B"))

    trained = record_pairs(monkeypatch)
    with Judge(scripted) as judge:
        online = {"reward": None, "judge_url": judge.url, "judge_model": "scripted", "samples_per_prompt": 2}
        run_dir = train(small_config(tmp_path, train={"max_steps": 2}, online=online))
    requests = [(r["b"], r["a"]) if r["a"] in chosen else (r["a"], r["b"]) for r in judge.requests]
    assert len(requests) == 2 * 16 + 2 * 16  # 2 samples of 8 prompts a step, 16 held-out prompts twice, once each
    assert all(r["model"] == "scripted" for r in judge.requests)
    assert sum(r["a"] in chosen for r in judge.requests) not in (0, len(requests))  # both orders shown
    drawn = [(response, baseline) for response, baseline in requests if baseline in train_chosen]
    rows = train_rows(run_dir)
    for n, row in enumerate(rows):  # a step's requests come after the previous step's (arrival order within)
        step = drawn[16 * n:16 * (n + 1)]
        by_prompt: dict[str, list[float]] = {}
        for response, baseline in step:
            by_prompt.setdefault(baseline, []).append(verdict(response))
        assert sorted(len(v) for v in by_prompt.values()) == [2] * 8, n
        pairs = sum(max(v) > min(v) for v in by_prompt.values())
        assert (row["online/pairs"], row["online/ties"]) == (pairs, 8 - pairs), n
        assert row["judge/malformed"] == sum(verdict(r) == 0.5 for r, _ in step), n
        assert (row["judge/failures"], row["judge/retries"]) == (0, 0), n  # a judge that always answers
        assert row["online/reward_mean"] == sum(verdict(r) for r, _ in step) / 16, n
    for key in ("judge/malformed", "online/pairs", "online/ties"):  # the script did exercise each case
        assert sum(r[key] for r in rows) > 0, key
    assert len(trained) == sum(r["online/pairs"] for r in rows)
    assert all(verdict(c) > verdict(r) for c, r in trained)  # the better verdict chosen
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    held_out = [verdict(response) for response, baseline in requests if baseline not in train_chosen]
    assert [r["reward"] for r in evals] == [sum(held_out[:16]) / 16, sum(held_out[16:]) / 16]


def test_a_reward_model_run_dir_is_a_reward(tmp_path, monkeypatch):
    """online.reward = the RUN_DIR of a dpokit rm run (configs/tiny-rm.yaml cut to 3 steps): every sampled and
    held-out response is scored by the reward model in RUN_DIR/final as it scores on its own (rows tokenized
    with the run's lengths), and each prompt's highest-scored sample is trained against its lowest."""
    import dpokit.methods.online as online_module
    from dpokit.api import rm, train
    from dpokit.methods.online import make_pairs
    from dpokit.methods.reward_model import load_reward_model
    from dpokit.methods.rollout import step_seed

    rm_cfg = yaml.safe_load((ROOT / "configs" / "tiny-rm.yaml").read_text())
    rm_cfg["data"].update(train=str(TRAIN_PREFS), eval=None)
    rm_cfg["train"].update(max_steps=3, warmup_steps=1, save_every=None, progress=False, precision="fp32")
    rm_dir = rm(rm_cfg, run_dir=str(tmp_path / "rm"))
    calls: list[tuple[int, list, list[str], list[float]]] = []
    score = online_module.score

    def recording_score(reward, label, items, texts, seed):
        values = score(reward, label, items, texts, seed)
        calls.append((seed, [it.prompt.prompt for it in items], list(texts), values))
        return values

    monkeypatch.setattr(online_module, "score", recording_score)
    trained = record_pairs(monkeypatch)
    run_dir = train(small_config(tmp_path, train={"max_steps": 2}, online={"reward": str(rm_dir)}))
    # Another copy of the model, loaded from final/ (the run's lengths from its config.yaml): the same rows in the
    # same batches on the same kernels give the same floats.
    scorer = load_reward_model(rm_dir / "final", device="cpu")
    for _, prompts, texts, values in calls:
        assert values == scorer.batch(prompts, texts)
    seeds = [step_seed(0, 0, 0, 10_000), step_seed(0, 1, 0, 0), step_seed(0, 2, 0, 0), step_seed(0, 0, 0, 10_000)]
    assert [seed for seed, *_ in calls] == seeds  # held-out, step 1, step 2, held-out
    rows = train_rows(run_dir)
    expected = []
    for row, (_, _, texts, values) in zip(rows, calls[1:3]):
        pairs, ties = make_pairs(values, 8, "best_worst", 0.0)
        assert (row["online/pairs"], row["online/ties"]) == (len(pairs), ties)
        assert row["online/reward_mean"] == sum(values) / len(values)
        expected += [(texts[c], texts[r]) for c, r in pairs]
    assert trained == expected and len(trained) > 0
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"]
    assert [r["reward"] for r in evals] == [sum(c[3]) / len(c[3]) for c in (calls[0], calls[3])]
