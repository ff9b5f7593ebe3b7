"""``dpokit sft`` on rows with images, on both tiny families (LLaVA, Idefics3): the loss is the mean negative
log-likelihood of the chosen answers' text tokens given the images, the images matter, accumulation equals the
large batch, and an SFT model's ``final/`` is where a DPO run starts."""

import json
import math
from pathlib import Path

import pytest
import torch

import dpokit
from dpokit.data.config import DataConfig
from dpokit.data.vision import load_vision
from dpokit.errors import DpokitError
from dpokit.models.vision import tiny_vision
from dpokit.training.metrics import read_metrics
from test_vision import COLOURS, colour_pairs, png, trl_row, write_rows
from tolerances import LOGP_TOL, assert_same_metrics, assert_same_weights_after_adamw

FAMILIES = ("tiny-random-llava", "tiny-random-idefics3")
NAMES = ["red", "green", "blue", "yellow"]
DATA = DataConfig(max_length=96, max_prompt_length=64)
LR, STEPS = 1e-3, 3


def sft_config(data: Path, model: str, **train) -> dict:
    return {"model": {"name_or_path": model},
            "data": {"train": str(data), "max_length": 96, "max_prompt_length": 64},
            "train": {"lr": LR, "max_steps": STEPS, "seed": 3, "progress": False, "precision": "fp32",
                      "layout": "padded", **train}}


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def saved_model(folder: Path, family: str) -> Path:
    """The tiny model written to a folder: the hand computation and the run start from the same weights."""
    model, processor = tiny_vision(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def hand_nll(model, processor, data: Path) -> float:
    """The mean over every chosen-answer token of -log p(token | image, prompt, answer so far), from the model's
    own forward (its full logits, one row at a time, no padding) in float64 after the logits."""
    groups, _ = load_vision(str(data), processor, DATA)
    total, count = 0.0, 0
    with torch.no_grad():
        for group in groups:
            seq = group.prompt_ids + group.chosen_ids
            logits = model(input_ids=torch.tensor([seq]), **group.pixels).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            total -= sum(logp[t - 1, seq[t]].item() for t in range(len(group.prompt_ids), len(seq)))
            count += len(group.chosen_ids)
    return total / count


def recoloured(folder: Path, n: int) -> Path:
    """The rows of ``colour_pairs(folder, n)`` with each image drawn in the next colour: same text, other pixels."""
    rows = []
    for i in range(n):
        c = i % 4
        (folder / f"other{c}.png").write_bytes(png(COLOURS[(c + 1) % 4]))
        rows.append(trl_row(f"other{c}.png", f"Colour {i}?", f"It is {NAMES[c]}.", f"It is {NAMES[(c + 1) % 4]}."))
    return write_rows(folder, rows, "recoloured.jsonl")


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_loss_is_the_mean_nll_of_the_answer_tokens_given_the_images(tmp_path, family):
    folder = saved_model(tmp_path / "model", family)
    model, processor = tiny_vision(family)
    model.eval()
    groups, _ = load_vision(str(colour_pairs(tmp_path, 4)), processor, DATA)
    # The scored tokens are the answer's text and its end-of-turn token: no prompt or image token among them.
    assert [processor.tokenizer.decode(g.chosen_ids) for g in groups] == [
        f"It is {name}.<|im_end|>" for name in NAMES]
    losses = {}
    for name, data in (("drawn", colour_pairs(tmp_path, 4)), ("recoloured", recoloured(tmp_path, 4))):
        run = dpokit.sft(sft_config(data, str(folder), batch_size=4, max_steps=1), run_dir=str(tmp_path / name))
        (row,) = train_rows(run)
        want = hand_nll(model, processor, data)
        # Step 1's loss is computed before the update, on the saved weights. dpokit runs the backbone on a padded
        # batch and the head on answer positions only; the hand sum runs the whole model on one row: the same
        # fp32 log-softmaxes on other shapes, a few ulps of the logits per token (tolerances.LOGP_TOL, a bound
        # for sums of <= 16 tokens; a mean's error is at most its largest term's). A prompt token counted or a
        # shifted target moves the mean by ~1 / 7 of a token's NLL (~0.9 here).
        assert row["loss"] == pytest.approx(want, abs=LOGP_TOL["atol"], rel=LOGP_TOL["rtol"])
        # The same sum per row instead of per token: the bound above times ~7 tokens, ~1e-4 on |value| ~ 40.
        assert row["logps/chosen"] == pytest.approx(-want * sum(len(g.chosen_ids) for g in groups) / 4, rel=1e-5)
        losses[name] = row["loss"]
    # The same text with other pixels: the images reach the loss (by far more than the bound above).
    assert abs(losses["drawn"] - losses["recoloured"]) > 1e-3


@pytest.mark.equivalence
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_batch_2_equals_batch_1_with_accumulation_2(tmp_path, family):
    path = colour_pairs(tmp_path, 6)
    big = dpokit.sft(sft_config(path, family, batch_size=2, grad_accum=1), run_dir=str(tmp_path / "big"))
    small = dpokit.sft(sft_config(path, family, batch_size=1, grad_accum=2), run_dir=str(tmp_path / "small"))
    rows_big, rows_small = train_rows(big), train_rows(small)
    assert [r["tokens"] for r in rows_big] == [r["tokens"] for r in rows_small]
    # fp32 round-off only (tolerances.py): the same answer tokens, summed in another order, normalized by the
    # step's answer tokens in both runs.
    assert_same_metrics(rows_big, rows_small, ("loss", "grad_norm", "logps/chosen"))
    w_big, w_small = weights(big), weights(small)
    assert_same_weights_after_adamw(w_big, w_small, LR, STEPS)
    from transformers import AutoModelForImageTextToText

    start = tiny_vision(family)[0].state_dict()
    trained = AutoModelForImageTextToText.from_pretrained(big / "final").state_dict()
    moved = max((trained[k] - start[k]).abs().max().item() for k in start)
    assert moved > LR  # training moved the weights (AdamW's first step moves each one by ~lr)


def test_sft_then_dpo_from_its_final_folder(tmp_path):
    """``dpokit sft`` on image rows from the CLI; its ``final/`` loads with transformers' own classes and is the
    policy (and reference) a DPO run starts from."""
    import yaml
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from conftest import run_cli

    data = colour_pairs(tmp_path, 8)
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(sft_config(data, "tiny-random-idefics3", batch_size=4, max_steps=6, lr=3e-3)))
    result = run_cli("sft", str(config), f"run_dir={tmp_path / 'sft'}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = train_rows(tmp_path / "sft")
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    final = tmp_path / "sft" / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(final)
    saved = weights(tmp_path / "sft")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)
    sft_nll = hand_nll(model.eval(), processor, data)
    assert sft_nll < rows[0]["loss"]  # what SFT trained: the answers given the images, now likelier
    dpo = {"model": {"name_or_path": str(final)},
           "data": {"train": str(data), "max_length": 96, "max_prompt_length": 64},
           "loss": {"name": "sigmoid", "beta": 0.1},
           "train": {"lr": LR, "max_steps": 2, "batch_size": 8, "seed": 0, "progress": False, "precision": "fp32",
                     "layout": "padded"}}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    result = run_cli("train", str(tmp_path / "dpo.yaml"), f"run_dir={tmp_path / 'dpo'}")
    assert result.returncode == 0, result.stderr[-2000:]
    first = train_rows(tmp_path / "dpo")[0]
    # The policy and the reference are both the SFT model at step 1: every margin is 0, the loss ln 2 (fp32).
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # ... and it is the SFT model, not a fresh random one: step 1 holds all 8 pairs, so its mean chosen log-prob
    # is the SFT model's mean NLL times the answer tokens per pair (the same bound as the first test).
    groups = load_vision(str(data), processor, DATA)[0]
    per_pair = sum(len(g.chosen_ids) for g in groups) / len(groups)
    assert first["logps/chosen"] == pytest.approx(-sft_nll * per_pair, abs=per_pair * LOGP_TOL["atol"],
                                                  rel=LOGP_TOL["rtol"])
    fresh = hand_nll(tiny_vision("tiny-random-idefics3")[0].eval(), processor, data)
    assert abs(fresh - sft_nll) > 0.1  # which a fresh model would fail by far
    assert (tmp_path / "dpo" / "final" / "processor_config.json").is_file()


def test_other_kinds_are_still_refused_for_a_vision_model(tmp_path):
    path = colour_pairs(tmp_path, 2)
    cfg = sft_config(path, "tiny-random-llava", max_steps=1)
    with pytest.raises(DpokitError, match="only offline DPO .dpokit train. and SFT .dpokit sft. train one so far, "
                                          "not dpokit rm") as err:
        dpokit.rm(cfg, run_dir=str(tmp_path / "rm"))
    assert "\n" not in str(err.value)
    packed = json.loads(json.dumps(cfg))
    packed["train"]["layout"] = "packed"
    with pytest.raises(DpokitError, match="train.layout: packed is not supported for image data"):
        dpokit.sft(packed, run_dir=str(tmp_path / "packed"))
    # reference.mode does not matter to SFT (it has no reference): a store setting is not refused there.
    stored = {**cfg, "reference": {"mode": "store"}}
    assert train_rows(dpokit.sft(stored, run_dir=str(tmp_path / "store")))[0]["step"] == 1


def test_the_plain_form_trains_as_trls_form(tmp_path):
    """``image`` beside a text prompt and answers is the same SFT row as TRL's ``images`` with content parts."""
    rows_trl, rows_plain = [], []
    for i in range(4):
        (tmp_path / f"img{i}.png").write_bytes(png(COLOURS[i]))
        rows_trl.append(trl_row(f"img{i}.png", f"Colour {i}?", f"It is {NAMES[i]}.", "It is black."))
        rows_plain.append({"image": f"img{i}.png", "prompt": f"Colour {i}?", "chosen": f"It is {NAMES[i]}.",
                           "rejected": "It is black."})
    runs = {}
    for name, rows in (("trl", rows_trl), ("plain", rows_plain)):
        data = write_rows(tmp_path, rows, f"{name}.jsonl")
        runs[name] = train_rows(dpokit.sft(sft_config(data, "tiny-random-idefics3", batch_size=2, max_steps=2),
                                           run_dir=str(tmp_path / name)))
    # The same token ids and pixels in the same order: the same computation, bit for bit.
    assert [(r["loss"], r["grad_norm"], r["tokens"]) for r in runs["trl"]] == [
        (r["loss"], r["grad_norm"], r["tokens"]) for r in runs["plain"]]


def test_lora_sft_trains_the_language_model_adapters(tmp_path):
    cfg = sft_config(colour_pairs(tmp_path, 4), "tiny-random-llava", batch_size=2, max_steps=2, lr=1e-2)
    cfg["model"]["lora"] = {"r": 4}
    run = dpokit.sft(cfg, run_dir=str(tmp_path / "run"))
    rows = train_rows(run)
    assert rows[1]["loss"] != rows[0]["loss"]
    assert (run / "final" / "adapter").is_dir() and (run / "final" / "processor_config.json").is_file()
