"""``dpokit config from-trl``: a TRL DPOConfig becomes the equivalent dpokit config, every key it cannot map
named with the reason; docs/from-trl.md tables every key; checked against the installed TRL when present."""

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

import dpokit
from dpokit.cli import main
from dpokit.from_trl import MAPPED, REASONS, TRL_RENAMES, translate
from dpokit.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]


def test_a_typical_trl_config_maps_key_by_key_and_loads(tmp_path, capsys):
    trl = {"output_dir": "out/dpo", "beta": 0.2, "loss_type": "sigmoid", "label_smoothing": 0.1,
           "learning_rate": 5e-7, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
           "max_steps": 1000, "warmup_ratio": 0.1, "lr_scheduler_type": "cosine", "bf16": True,
           "gradient_checkpointing": True, "precompute_ref_log_probs": True, "max_length": 768,
           "max_prompt_length": 256, "seed": 7, "generate_during_eval": True, "logging_dir": "logs",
           "model_init_kwargs": {"torch_dtype": "bfloat16", "low_cpu_mem_usage": True}}
    source = tmp_path / "dpo.json"
    source.write_text(json.dumps(trl))
    out = tmp_path / "dpokit.yaml"
    assert main(["config", "from-trl", str(source), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "not carried over: generate_during_eval: use `dpokit eval" in err and "low_cpu_mem_usage=True" in err
    cfg = yaml.safe_load(out.read_text())
    assert cfg["loss"] == {"beta": 0.2, "name": "cdpo", "label_smoothing": 0.1}  # TRL's sigmoid + smoothing
    assert cfg["train"]["lr"] == 5e-7 and cfg["train"]["batch_size"] == 4 and cfg["train"]["grad_accum"] == 4
    assert cfg["train"]["max_steps"] == 1000 and cfg["train"]["warmup_steps"] == 100
    assert cfg["train"]["scheduler"] == "cosine" and cfg["train"]["precision"] == "bf16"
    assert cfg["train"]["max_grad_norm"] == 1.0 and cfg["train"]["seed"] == 7  # TRL's default clip is 1.0
    assert cfg["train"]["gradient_checkpointing"] is True and cfg["reference"]["mode"] == "store"
    assert cfg["data"]["max_length"] == 768 and cfg["model"]["dtype"] == "bfloat16" and cfg["run_dir"] == "out/dpo"
    cfg["data"]["train"] = "examples/prefs-tiny.jsonl"
    dpokit.load_config(cfg)


def test_defaults_the_file_leaves_out_are_trls():
    cfg = translate({"beta": 0.1}).config
    assert cfg["train"]["lr"] == 1e-6 and cfg["train"]["batch_size"] == 8 and cfg["train"]["epochs"] == 3.0
    assert cfg["train"]["scheduler"] == "linear" and cfg["train"]["seed"] == 42
    # TRL 1.x has no prompt limit: a prompt is cut only by max_length, so dpokit's limit is all but one token.
    assert cfg["data"] == {"max_length": 1024, "max_prompt_length": 1023}


@pytest.mark.parametrize("max_length", [512, 256, 128])
def test_max_length_alone_is_valid_and_cuts_prompts_no_more_than_trl(tmp_path, max_length):
    # TRL 1.x truncates prompt + completion to max_length and nothing else; dpokit's data.max_prompt_length must
    # be below data.max_length. max_length - 1 cuts a prompt only where TRL's max_length leaves it no completion
    # token, and says so in the written file.
    source = tmp_path / "dpo.yaml"
    source.write_text(f"max_length: {max_length}\n")
    out = tmp_path / "dpokit.yaml"
    assert main(["config", "from-trl", str(source), "--out", str(out)]) == 0
    text = out.read_text()
    cfg = yaml.safe_load(text)
    assert cfg["data"] == {"max_length": max_length, "max_prompt_length": max_length - 1, "train": None}
    assert re.search(rf"# note: .*data.max_prompt_length: {max_length - 1}\b", text)
    cfg["data"]["train"] = "examples/prefs-tiny.jsonl"
    dpokit.load_config(cfg)
    # A prompt limit the file does give is kept when it fits, and brought under max_length (said so) when not.
    assert translate({"max_length": max_length, "max_prompt_length": 64}).config["data"]["max_prompt_length"] == 64
    over = translate({"max_length": max_length, "max_prompt_length": 1000})
    assert over.config["data"]["max_prompt_length"] == max_length - 1
    assert any("max_prompt_length" in note and "1000" in note for note in over.notes)


def test_an_installed_older_trls_prompt_limit_is_its_default(monkeypatch):
    # Older TRL has max_prompt_length (default 512): a file that leaves it out gets that TRL's cut, brought under
    # max_length when it does not fit. A stand-in module plays the installed TRL.
    @dataclasses.dataclass
    class DPOConfig:
        max_length: int = 1024
        max_prompt_length: int = 512

    monkeypatch.setitem(sys.modules, "trl", types.SimpleNamespace(DPOConfig=DPOConfig))
    assert translate({}).config["data"] == {"max_length": 1024, "max_prompt_length": 512}
    short = translate({"max_length": 256})
    assert short.config["data"]["max_prompt_length"] == 255
    assert any("installed TRL's max_prompt_length 512" in note for note in short.notes)


def test_what_trl_ignores_or_dpokit_lacks_is_named_with_the_reason():
    hinge = translate({"loss_type": "hinge", "label_smoothing": 0.2})
    assert "loss_type hinge" in hinge.unmapped["label_smoothing"] and "silently" in hinge.unmapped["label_smoothing"]
    assert "label_smoothing" not in hinge.config["loss"]
    exo = translate({"loss_type": "exo_pair", "label_smoothing": 0})
    assert "label_smoothing" not in exo.config["loss"] and any("1e-3" in n for n in exo.notes)
    mixed = translate({"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2]})
    assert mixed.config["loss"]["weights"] == {"sigmoid": 0.8, "bco_pair": 0.2}
    assert translate({"loss_type": "aot_pair"}).config["loss"]["name"] == "aot_unpaired"
    rpo = translate({"rpo_alpha": 1.0}).config["loss"]
    assert rpo["name"] == "rpo" and rpo["alpha"] == 1.0
    odd = translate({"loss_type": "nope", "fp16": True, "warmup_ratio": 0.1, "lr_scheduler_type": "polynomial",
                     "optim": "adafactor", "max_completion_length": 128, "some_new_field": 1,
                     "truncation_mode": "keep_start"})
    for key in ("loss_type", "fp16", "warmup_ratio", "lr_scheduler_type", "optim", "max_completion_length",
                "some_new_field", "truncation_mode"):
        assert key in odd.unmapped, key
    tr_dpo = translate({"sync_ref_model": True, "ref_model_sync_steps": 64})
    assert tr_dpo.config["reference"] == {"sync": {"every": 64, "alpha": 0.6}}  # TRL's default alpha
    dpokit.load_config(tr_dpo.config)
    assert "sync_ref_model" in translate({"sync_ref_model": True, "precompute_ref_log_probs": True}).unmapped
    assert "reference" not in translate({"sync_ref_model": False, "ref_model_sync_steps": 64}).config
    trackers = translate({"report_to": ["wandb", "comet_ml"], "run_name": "x"})
    assert trackers.config["log"] == {"report_to": ["wandb"], "run_name": "x"} and "comet_ml" in trackers.unmapped["report_to"]
    constant = translate({"lr_scheduler_type": "constant", "warmup_steps": 10})
    assert constant.config["train"]["warmup_steps"] == 0 and "ignores warmup" in constant.unmapped["warmup_steps"]


def test_bad_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [1,\n")
    assert main(["config", "from-trl", str(bad)]) == 2
    assert re.search(r"bad.yaml:\d+: not valid YAML or JSON", capsys.readouterr().err)
    bad.write_text("- 1\n")
    assert main(["config", "from-trl", str(bad)]) == 2
    assert "expected a mapping" in capsys.readouterr().err
    bad.write_text("beta: -1\n")
    assert main(["config", "from-trl", str(bad)]) == 2
    assert "loss.beta" in capsys.readouterr().err


def test_the_docs_table_names_every_key():
    doc = (ROOT / "docs" / "from-trl.md").read_text()
    for key in [*MAPPED, *REASONS]:
        assert f"`{key}`" in doc, key


def test_every_field_and_loss_type_of_the_installed_trl_is_known():
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl) - the mapping is checked "
                                            "against its DPOConfig where it is")
    from transformers import TrainingArguments

    own = {f.name for f in dataclasses.fields(trl.DPOConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(own - set(MAPPED) - set(REASONS))
    assert not unknown, f"DPOConfig fields from-trl does not know: {unknown}"
    hint = trl.DPOConfig.__dataclass_fields__["loss_type"]
    names = set(re.findall(r"'(\w+)'", str(hint.type)))  # a Literal[...] where TRL declares one
    for name in names:
        assert TRL_RENAMES.get(name, name) in LOSSES or name == "sft", name


def test_a_full_dump_of_the_installed_trls_dpoconfig_reports_only_what_matters():
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    dump = trl.DPOConfig(output_dir="o", bf16=False, use_cpu=True, report_to="none").to_dict()
    translation = translate(json.loads(json.dumps(dump, default=str)))
    assert set(translation.unmapped) <= {"truncation_mode", "use_cpu"}, translation.unmapped
    cfg = translation.config
    assert cfg["train"]["lr"] == dump["learning_rate"] and cfg["loss"] == {"beta": 0.1, "name": "sigmoid"}
    dpokit.load_config(cfg)
