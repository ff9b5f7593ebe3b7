"""Config: strict keys, typed values, overrides, the resolved config saved into the run."""

from pathlib import Path

import pytest
import yaml

from dpokit.config import load_config, parse_override
from dpokit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.run_dir and cfg.data.train
    assert (ROOT / cfg.data.train).is_file(), f"{path.name}: data.train does not exist"
    if cfg.data.eval:
        assert (ROOT / cfg.data.eval).is_file()


def test_overrides_parse_as_yaml_values():
    assert parse_override("train.lr=1e-6") == ("train.lr", 1e-6)
    assert parse_override("train.shuffle=false") == ("train.shuffle", False)
    assert parse_override("data.train=a b.jsonl") == ("data.train", "a b.jsonl")
    cfg = load_config(None, ["train.lr=2e-6", "loss.beta=0.5", "train.batch_size=4"])
    assert (cfg.train.lr, cfg.loss.beta, cfg.train.batch_size) == (2e-6, 0.5, 4)
    cfg = load_config({"train": {"lr": 1.0}}, train__grad_accum=3)
    assert cfg.train.grad_accum == 3 and cfg.train.lr == 1.0


@pytest.mark.parametrize("tree, fragment", [
    ({"train": {"lrr": 1}}, "train.lrr: unknown key"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"train": {"batch_size": "eight"}}, "train.batch_size"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer"),
    ({"loss": {"beta": -1}}, "loss.beta"),
    ({"loss": {"name": "nope"}}, "loss.name: unknown loss 'nope'"),
    ({"data": {"max_length": 64, "max_prompt_length": 64}}, "data: max_prompt_length"),
])
def test_bad_config_is_one_line_naming_the_key(tree, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(tree)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_bad_override_and_yaml_errors_name_the_place(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    from dpokit.config import save_config

    cfg = load_config(None, ["train.lr=3e-6", "data.train=x.jsonl"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 3e-6


def test_a_config_passed_again_keeps_its_values_and_what_was_set():
    """``load_config(Config)`` (every ``dpokit.train`` call goes through it twice) keeps a value assigned inside
    a section left at its default, and does not mark defaults as set: ``model_fields_set`` is how a check tells
    "the user asked for packed" from "packed is the default" (the vision layout rule)."""
    cfg = load_config({"model": {"name_or_path": "tiny-random", "lora": {"r": 4}}})
    cfg.train.lr, cfg.loss.beta = 0.5, 0.3  # sections never given: assigned afterwards
    again = load_config(cfg, ["train.seed=7"])
    assert (again.train.lr, again.loss.beta, again.model.lora.r, again.train.seed) == (0.5, 0.3, 4, 7)
    assert "layout" not in again.train.model_fields_set and "lr" in again.train.model_fields_set
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert load_config(cfg) == cfg and load_config(tiny) == tiny
