"""The training loop: accumulation invariance, the CLI end to end, the run-directory contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit
from conftest import write_pairs
from dpokit.training.metrics import read_metrics
from tolerances import assert_same_metrics, assert_same_weights_after_adamw

ROOT = Path(__file__).resolve().parents[1]
DPOKIT = [sys.executable, "-m", "dpokit"]


LR, STEPS = 1e-3, 3


def base_config(tmp_path: Path, **train) -> dict:
    data = write_pairs(tmp_path / "pairs.jsonl")
    return {
        "model": {"name_or_path": "tiny-random-llama"},
        "data": {"train": str(data), "max_length": 64, "max_prompt_length": 32},
        "loss": {"name": "sigmoid", "beta": 0.1},
        "train": {"lr": LR, "max_steps": STEPS, "seed": 3, "progress": False, **train},
    }


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.equivalence
def test_grad_accumulation_equals_large_batch(tmp_path):
    big = dpokit.train(base_config(tmp_path, batch_size=8, grad_accum=1), run_dir=str(tmp_path / "big"))
    small = dpokit.train(base_config(tmp_path, batch_size=1, grad_accum=8), run_dir=str(tmp_path / "small"))
    rows_big, rows_small = train_rows(big), train_rows(small)
    assert [r["step"] for r in rows_big] == [1, 2, 3] == [r["step"] for r in rows_small]
    assert [r["tokens"] for r in rows_big] == [r["tokens"] for r in rows_small]
    # Per-step metrics to fp32 round-off (derivation in tolerances.py): grad_norm catches a wrong normalization.
    assert_same_metrics(rows_big, rows_small, ("loss", "grad_norm", "rewards/margins", "logps/chosen",
                                               "logits/chosen", "logits/rejected"))
    # pi == pi_ref bit for bit at step 1, so every margin is exactly 0 and the loss is -log sigmoid(0) = ln 2
    # rounded to fp32 (3e-8 away); 1e-6 is the fp32 mean of 8 equal terms with room to spare.
    assert rows_big[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    w_big, w_small = final_weights(big), final_weights(small)
    assert_same_weights_after_adamw(w_big, w_small, LR, STEPS)  # |dw| <= 2 lr per step, most within lr/100
    # Training moved the weights at all (otherwise equality above would prove nothing): ~lr per step.
    untrained = dpokit.train(base_config(tmp_path, lr=1e-12, max_steps=1), run_dir=str(tmp_path / "untrained"))
    diffs = [(w_big[k] - final_weights(untrained)[k]).abs().max().item() for k in w_big]
    assert max(diffs) > LR


@pytest.mark.equivalence
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_pass_tokens_splits_passes_without_changing_the_result(tmp_path, layout):
    from dpokit.config import load_config
    from dpokit.data.batch import split_by_tokens
    from dpokit.data.tokenize import TokenizedGroup
    from dpokit.training.distributed import Dist
    from dpokit.training.step import forward_passes

    assert split_by_tokens([5, 5, 5, 20, 1], 10) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert split_by_tokens([3], 1) == [(0, 1)] and split_by_tokens([], 8) == []
    pairs = [TokenizedGroup.pair([1] * 20, [2] * 10, [3] * 12, f"x:{i}") for i in range(8)]  # 42 packed, 62 padded
    cfg = load_config(base_config(tmp_path, layout=layout, pass_tokens=130))
    passes = forward_passes([list(range(8))], pairs, cfg, Dist())
    assert passes == ([[0, 1, 2], [3, 4, 5], [6, 7]] if layout == "packed" else [[0, 1], [2, 3], [4, 5], [6, 7]])
    whole = dpokit.train(base_config(tmp_path, batch_size=8, layout=layout), run_dir=str(tmp_path / "whole"))
    # A pair is ~52 positions packed, ~75 padded: passes of 3 (packed) or 2 (padded) pairs, the last one shorter.
    split = dpokit.train(base_config(tmp_path, batch_size=8, layout=layout, pass_tokens=160),
                         run_dir=str(tmp_path / "split"))
    rows_whole, rows_split = train_rows(whole), train_rows(split)
    assert len(rows_whole) == len(rows_split) == 3
    assert [r["tokens"] for r in rows_whole] == [r["tokens"] for r in rows_split]
    assert_same_metrics(rows_whole, rows_split, ("loss", "grad_norm", "rewards/margins", "logps/chosen",
                                                 "rewards/accuracies"))  # fp32 round-off: tolerances.py
    assert_same_weights_after_adamw(final_weights(whole), final_weights(split), LR, STEPS)


@pytest.mark.equivalence
def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = dpokit.train(base_config(tmp_path, batch_size=8), run_dir=str(tmp_path / "plain"))
    ckpt = dpokit.train(base_config(tmp_path, batch_size=8, gradient_checkpointing=True),
                        run_dir=str(tmp_path / "ckpt"))
    # Recomputing the activations repeats the same operations on the same shapes, so the results are usually
    # bit-identical; the bounds are the general ones (tolerances.py) in case a backend reorders the recompute.
    assert_same_metrics(train_rows(plain), train_rows(ckpt), ("loss", "grad_norm", "rewards/margins"))
    assert_same_weights_after_adamw(final_weights(plain), final_weights(ckpt), LR, STEPS)


def test_epochs_visit_every_pair_once_and_last_step_is_partial(tmp_path):
    cfg = base_config(tmp_path, batch_size=3, grad_accum=2, max_steps=None, epochs=1)
    run_dir = dpokit.train(cfg, run_dir=str(tmp_path / "epoch"))
    rows = train_rows(run_dir)
    assert len(rows) == 3  # 16 pairs, 6 per step -> 6, 6, 4
    state = json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["pairs_consumed"] == 16 and state["data_position"] == {"epoch": 0, "offset": 16}


def test_existing_run_dir_is_refused_unless_overwrite(tmp_path):
    cfg = base_config(tmp_path, max_steps=1)
    dpokit.train(cfg, run_dir=str(tmp_path / "run"))
    with pytest.raises(dpokit.load_config.__globals__["ConfigError"], match="already holds a run"):
        dpokit.train(cfg, run_dir=str(tmp_path / "run"))
    dpokit.train(cfg, run_dir=str(tmp_path / "run"), overwrite=True)


def test_cli_train_tiny_config_end_to_end(tmp_path):
    run_dir = tmp_path / "tiny"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*DPOKIT, "train", "configs/tiny.yaml", f"run_dir={run_dir}", "train.max_steps=12",
                           "train.save_every=6", "eval.every=6"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for name in ("config.yaml", "metrics.jsonl", "data_report.json", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "checkpoints/step-6/COMPLETE",
                 "checkpoints/step-12/COMPLETE", "checkpoints/step-12/manifest.json"):
        assert (run_dir / name).exists(), name
    assert not list((run_dir / "checkpoints").glob(".tmp*"))
    assert not [p for p in run_dir.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("step", "elapsed_s", "tokens", "loss", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
                "logits/rejected", "grad_norm", "lr", "tokens_per_second", "skipped_steps"):
        assert key in train[0], key
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 6, 12]
    assert "held-out: step 0 -> step" in proc.stdout
    report = json.loads((run_dir / "data_report.json").read_text())["train"]
    assert report["rows_read"] == report["rows_kept"] + sum(report["dropped"].values())

    # final/ is a plain Hugging Face folder: load and generate in a process that never imports dpokit.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'final')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(run_dir / 'final')!r})\n"
        "ids = t('Question: can you help', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "assert out.shape[1] > ids.shape[1]\n"
        "assert 'dpokit' not in sys.modules\n"
        "print('generated', out.shape[1] - ids.shape[1])\n")
    gen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**env, "HF_HUB_OFFLINE": "1"})
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "generated" in gen.stdout


def test_cli_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\ntrain:\n  lr: 1e-3\n  warmup: 5\n")
    proc = subprocess.run([*DPOKIT, "train", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "train.warmup: unknown key" in proc.stderr


def test_tiny_dpo_learns_the_training_preferences(tmp_path):
    cfg = base_config(tmp_path, max_steps=30, batch_size=8)
    run_dir = dpokit.train(cfg, run_dir=str(tmp_path / "learn"))
    rows = train_rows(run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert rows[-1]["rewards/accuracies"] >= 0.9


def test_steps_for_counts_steps_as_setup_and_the_recipe_do(tmp_path):
    from dpokit.config import TrainConfig
    from dpokit.recipes.sentiment.runs import offline_steps
    from dpokit.training.setup import steps_for

    assert steps_for(TrainConfig(batch_size=4, epochs=1.5), 10) == (4, 15)  # 15 pairs: 4 + 4 + 4 + 3
    assert steps_for(TrainConfig(batch_size=4, grad_accum=2, epochs=1.0), 17, world=2) == (2, 17)
    assert steps_for(TrainConfig(batch_size=4, max_steps=3), 10_000, world=2) == (3, 24)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n" * 10 + "\n")  # the blank line is not a pair
    config = {"data": {"train": str(pairs)}, "train": {"batch_size": 4, "epochs": 1.5}}
    assert offline_steps(config) == 4
    assert offline_steps({"data": {"train": str(tmp_path / "later.jsonl")}, "train": {}}) is None
