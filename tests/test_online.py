"""Online and semi-online DPO (``dpokit train`` with ``online.reward``) on a tiny random model: it learns its
reward, samples from the weights ``online.sync_every`` says, resumes bit-identically after SIGKILL, counts ties
and updates nothing on a step without pairs, gives the same update for any split into micro-batches, and
refuses settings it cannot run with in one line."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpokit.config import ConfigError, load_config
from dpokit.distributed import Dist
from dpokit.metrics import PAIR_METRICS, read_metrics
from test_resume import assert_bit_identical, kill_when
from tolerances import METRIC_REL, assert_same_metrics, assert_same_weights_after_adamw

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-online.yaml"
LETTER_E = str(ROOT / "examples" / "rewards.py") + ":letter_e"
ONLINE_KEYS = ["online/reward_mean", "online/reward_std", "online/pairs", "online/ties", "online/sample_s",
               "online/score_s", "online/generator_step", "online/response_length", "online/eos_fraction"]
DPO_KEYS = [*PAIR_METRICS, "step", "elapsed_s", "tokens", "grad_norm", "lr", "tokens_per_second",
            "skipped_steps"]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpokit", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


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
    done = run_cli("train", str(TINY), f"run_dir={run_dir}", "train.progress=false")
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


def record_weights(monkeypatch) -> tuple[dict[int, dict], dict[int, dict]]:
    """For every step, the trainable weights the policy holds while its responses are sampled, and right after
    (when they are scored): the generator's, and the policy's own."""
    import dpokit.online as online_module

    sampled: dict[int, dict[str, torch.Tensor]] = {}
    after: dict[int, dict[str, torch.Tensor]] = {}
    current = {}
    sample, score = online_module.sample, online_module.score

    def weights(online):
        return {n: p.detach().clone() for n, p in online.run.policy.named_parameters() if p.requires_grad}

    def recording_sample(online, items, seed):
        current["online"] = online
        sampled.setdefault(online.run.step + 1, weights(online))  # first call of a step: its training draw
        return sample(online, items, seed)

    def recording_score(*args):
        online = current["online"]
        after.setdefault(online.run.step + 1, weights(online))
        return score(*args)

    monkeypatch.setattr(online_module, "sample", recording_sample)
    monkeypatch.setattr(online_module, "score", recording_score)
    return sampled, after


def weights_after(run_dir: Path, step: int, start: dict) -> dict | None:
    """The trainable weights after ``step`` (``start`` before step 1), where a checkpoint holds them."""
    path = run_dir / "checkpoints" / f"step-{step}" / "model.safetensors"
    return start if step == 0 else load_file(str(path)) if path.exists() else None


def test_sync_every_decides_which_weights_are_sampled(tmp_path, monkeypatch):
    """Step n samples the policy as it was at the start of step g(n) = 1 + s * floor((n - 1) / s), i.e. the
    weights checkpointed after step g(n) - 1: s = 1, the current weights at every step; s = 2, steps 2 and 4
    sample what steps 1 and 3 did; s larger than the run, the starting weights throughout while the policy
    moves. After sampling the policy holds its own weights again (training continues from them)."""
    from dpokit.train import train

    for s, save_every in ((1, 1), (2, 2), (100, None)):
        sampled, after = record_weights(monkeypatch)
        cfg = small_config(tmp_path / f"s{s}", train={"max_steps": 5, "save_every": save_every},
                           online={"sync_every": s}, data={"eval": None})  # only the training draws sample
        run_dir = train(cfg)
        synced = [1 + s * ((n - 1) // s) for n in range(1, 6)]
        assert [r["online/generator_step"] for r in train_rows(run_dir)] == synced, s
        start = sampled[1]
        for n in range(2, 6):
            assert_bit_identical(sampled[n], weights_after(run_dir, synced[n - 1] - 1, start))
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
    from dpokit.train import train

    cfg = small_config(tmp_path, online={"sync_every": 2})
    run_dir = train(cfg)
    with pytest.raises(ConfigError, match="online.sync_every: the checkpoint at step 3"):
        train(cfg, train__max_steps=4, resume=True)
    train(cfg, train__max_steps=4, resume=True, force=True)
    assert [r["online/generator_step"] for r in train_rows(run_dir)] == [1, 1, 3, 4]


def test_a_constant_reward_ties_every_pair_and_changes_nothing(tmp_path):
    from dpokit.train import train

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
    from dpokit.online import make_pairs

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
    from dpokit.train import train

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
    from dpokit.online import check_config

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
