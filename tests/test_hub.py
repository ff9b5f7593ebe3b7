"""Hub-ready model folders: every ``final/`` carries a model card the Hub reads and a generation config with the
run's EOS ids; ``dpokit export`` copies ``final/`` or a checkpoint (LoRA merged) as such a folder."""

import contextlib
import io
import json
import re
from importlib.metadata import distribution
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import dpokit
from dpokit.cli import main
from dpokit.integrations.hub import _use_lines, base_model, front_matter, refresh_card
from dpokit.models.generate import eos_token_ids
from test_train import base_config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    cfg = base_config(tmp, max_steps=2, save_every=1, batch_size=4)
    cfg["data"]["eval"] = cfg["data"]["train"]
    cfg["model"]["lora"] = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    cfg["reference"] = {"mode": "adapter"}
    return dpokit.train(cfg, run_dir=str(tmp / "run"))


def test_final_has_a_card_the_hub_reads_and_the_eos_ids(lora_run):
    final = lora_run / "final"
    card = (final / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"dpo", "dpokit"} <= set(meta["tags"])
    assert "base_model" not in meta and "license" not in meta  # a random model built in code has neither
    facts = meta["dpokit"]
    assert facts["task"] == "dpo" and facts["loss"] == "sigmoid" and facts["beta"] == 0.1 and facts["step"] == 2
    assert [f["split"] for f in facts["data_files"]] == ["train", "eval"]
    assert facts["data_files"][0]["file"] == "pairs.jsonl" and len(facts["data_files"][0]["sha256"]) == 64
    report = json.loads((lora_run / "data_report.json").read_text())["train"]
    assert f"{report['rows_read']} rows read, {report['rows_kept']} kept" in card
    assert "`sigmoid`, beta = 0.1" in card and "| hardware |" in card and "LoRA | r = 4" in card
    assert "## Held-out metrics (step 2)" in card and "| rewards/accuracies |" in card
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    generation = GenerationConfig.from_pretrained(final)
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert sorted(eos) == eos_token_ids(model, tokenizer)

    (lora_run / "eval").mkdir()
    (lora_run / "eval" / "eval.json").write_text(json.dumps(
        {"reward": 0.5, "reward_fn": "length", "kl": 1.25, "win_rate": 0.75, "baseline": "reference",
         "n_prompts": 3, "n_samples": 1, "max_new_tokens": 8}))
    refresh_card(lora_run)
    card = (final / "README.md").read_text()
    assert "| reward (length) | 0.5 |" in card and "| KL(π‖π_ref), nats | 1.25 |" in card
    assert "| win rate against reference | 0.75 |" in card
    assert front_matter(card)["dpokit"]["hardware"] == facts["hardware"]
    assert front_matter(card)["dpokit"]["versions"] == facts["versions"]  # the training's, kept


def test_the_card_has_a_quick_start_that_runs_the_versions_and_the_dpo_citation(lora_run):
    final = lora_run / "final"
    card = (final / "README.md").read_text()
    (snippet,) = re.findall(r"## Use\n\n```python\n(.*?)```", card, flags=re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # as a reader runs it, with the folder for the Hub id
        exec(snippet.replace("PATH_OR_HUB_ID", str(final)), {})
    assert printed.getvalue().strip()  # the pipeline generated a reply
    plain = "\n".join(_use_lines("dpo", chat=False))  # a tokenizer without a chat template: a text prompt
    (snippet,) = re.findall(r"```python\n(.*?)```", plain, flags=re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet.replace("PATH_OR_HUB_ID", str(final)), {})
    assert '"Once upon a time"' in snippet and printed.getvalue().strip()
    versions = {"dpokit": dpokit.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}  # a LoRA run: peft too
    assert front_matter(card)["dpokit"]["versions"] == versions
    assert all(f"- {name}: {version}" in card for name, version in versions.items())
    (bibtex,) = re.findall(r"```bibtex\n(.*?)```", card, flags=re.S)
    assert bibtex.startswith("@inproceedings{rafailov2023direct,") and "Rafailov, Rafael" in bibtex
    assert "Direct Preference Optimization: Your Language Model is Secretly a Reward Model" in bibtex
    assert "pypi.org/project/dpokit" not in card  # dpokit is not on PyPI


def test_the_docs_publish_with_the_locked_huggingface_hub_cli():
    # docs/publish.md has the upload line; the README and the other pages may not name the old CLI either.
    root = Path(__file__).parents[1]
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    commands = {ep.name for ep in distribution("huggingface_hub").entry_points if ep.group == "console_scripts"}
    used = {m for page in docs for m in re.findall(r"^(hf|huggingface-cli) upload ", page.read_text(), flags=re.M)}
    assert re.search(r"^hf upload ", (root / "docs" / "publish.md").read_text(), flags=re.M)
    assert used == {"hf"} and used <= commands, (used, commands)


def test_export_copies_final_and_merges_a_lora_checkpoint(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "--to", str(tmp_path / "final-copy")]) == 0
    assert (tmp_path / "final-copy" / "README.md").read_text() == (lora_run / "final" / "README.md").read_text()
    assert main(["export", str(lora_run), "--to", str(tmp_path / "step2"), "--checkpoint", "step-2"]) == 0
    exported, final = load_file(str(tmp_path / "step2" / "model.safetensors")), \
        load_file(str(lora_run / "final" / "model.safetensors"))
    assert exported.keys() == final.keys() and not any("lora" in k for k in exported)
    for name in final:  # the last checkpoint, merged, is final/
        torch.testing.assert_close(exported[name], final[name])
    meta = front_matter((tmp_path / "step2" / "README.md").read_text())
    assert meta["dpokit"]["step"] == 2 and (tmp_path / "step2" / "generation_config.json").is_file()
    assert main(["export", str(lora_run), "--to", str(tmp_path / "step1"), "--checkpoint", "step-1"]) == 0
    step1 = load_file(str(tmp_path / "step1" / "model.safetensors"))
    assert any(not torch.equal(step1[name], final[name]) for name in final)  # one step earlier: other weights
    capsys.readouterr()
    for argv, message in (([str(lora_run), "--to", str(tmp_path / "step2")], "is not an empty folder"),
                          ([str(lora_run), "--to", str(tmp_path / "x"), "--checkpoint", "7"], "expected step-N"),
                          ([str(lora_run), "--to", str(tmp_path / "x"), "--checkpoint", "step-9"], "not found"),
                          ([str(tmp_path), "--to", str(tmp_path / "x")], "not a run directory")):
        assert main(["export", *argv]) == 2
        assert message in capsys.readouterr().err


def test_base_model_is_what_the_run_started_from_and_license_from_its_card(tmp_path):
    # A local folder's card names *its* base model (the run's grandparent): the run started from the folder,
    # which has no Hub id, so the card names no base model. Its license still holds for what is trained from it.
    card = "---\nlicense: mit\nbase_model: org/base\n---\n# a model\n"
    local = tmp_path / "my-sft-model"
    local.mkdir()
    (local / "README.md").write_text(card)
    assert base_model(str(local)) == (None, "mit")
    # A folder of the Hub's local cache is a Hub model: its id is in the cache's folder name.
    snapshot = tmp_path / "hub" / "models--org--tuned" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text(card)
    assert base_model(str(snapshot)) == ("org/tuned", "mit")
    assert base_model("org/not-on-this-machine") == ("org/not-on-this-machine", None)
    assert base_model("smollm2") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert base_model("tiny-random-llama") == (None, None)


def test_the_card_shows_a_warmup_ratio_and_the_steps_it_came_to():
    """A run warmed up by train.warmup_ratio has warmup_steps 0: the card must not say '0 warmup steps'."""
    from dpokit.config import TrainConfig
    from dpokit.integrations.hub import _warmup

    assert _warmup(TrainConfig(warmup_ratio=0.1), 25) == "warmup ratio 0.1 = 3 steps"  # ceil(2.5)
    assert _warmup(TrainConfig(warmup_ratio=0.1), None) == "warmup ratio 0.1"
    assert _warmup(TrainConfig(warmup_steps=5), 25) == "5 warmup steps"
