"""dpokit export of a vision-language run's checkpoint: the folder loads with transformers' own classes
(``AutoModelForImageTextToText``, ``AutoProcessor``) and holds the checkpoint's weights; a LoRA run's adapter
exports with the logit gap measured on its vision-language base."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit
from conftest import ROOT
from dpokit.integrations.export import export_adapter, export_run
from dpokit.integrations.hub import front_matter

DATA = ROOT / "examples" / "prefs-vision.jsonl"


def run(tmp_path: Path, family: str, lora: bool) -> Path:
    model = {"name_or_path": family, **({"lora": {"r": 4}} if lora else {})}
    cfg = {"model": model, "data": {"train": str(DATA), "max_length": 96, "max_prompt_length": 64},
           "loss": {"name": "sigmoid", "beta": 0.1},
           "train": {"lr": 1e-2, "max_steps": 2, "batch_size": 2, "save_every": 1, "seed": 0, "progress": False}}
    return Path(dpokit.train(cfg, run_dir=str(tmp_path / "run")))


@pytest.mark.parametrize(("family", "lora"), [("tiny-random-llava", False), ("tiny-random-idefics3", True)])
def test_a_vision_checkpoint_exports_as_a_vision_language_model(tmp_path, family, lora):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run_dir = run(tmp_path, family, lora)
    out = export_run(run_dir, tmp_path / "out", checkpoint="step-2")
    # The last checkpoint is the final model: the same tensors, bit for bit (both are the trained weights,
    # for LoRA merged into the base by the same peft call on the same values).
    exported, final = load_file(str(out / "model.safetensors")), load_file(str(run_dir / "final" / "model.safetensors"))
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model) is type(AutoModelForImageTextToText.from_pretrained(run_dir / "final"))
    processor = AutoProcessor.from_pretrained(out)
    assert processor.to_json_string() == AutoProcessor.from_pretrained(run_dir / "final").to_json_string()
    card = (out / "README.md").read_text()
    assert front_matter(card)["pipeline_tag"] == "image-text-to-text" and "checkpoint step-2" in card
    assert (out / "adapter").is_dir() == lora


def test_a_vision_lora_adapter_exports_with_its_gap_measured(tmp_path):
    run_dir = run(tmp_path, "tiny-random-idefics3", lora=True)
    for checkpoint in (None, "step-2"):
        folder, gap = export_adapter(run_dir, tmp_path / f"adapter-{checkpoint}", checkpoint=checkpoint)
        assert (folder / "adapter_config.json").is_file()
        # The adapter on a fresh base against the merged weights: fp32 round-off of the merge only (the LoRA
        # product added to W once, against x @ W + (x @ A) @ B), far below the logits' own size (order 1).
        assert gap is not None and gap < 1e-4
        assert "AutoModelForImageTextToText" in (folder / "README.md").read_text()
