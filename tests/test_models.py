"""Model loading: the embedded GGUF default, local folders, clear errors, frozen reference, dropout off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpokit
from dpokit.errors import ModelError
from dpokit.models.loading import (
    embedded_gguf_path,
    freeze,
    load_model,
    load_models,
    load_tokenizer,
    resolve,
    tiny_model,
    tiny_tokenizer,
)
from dpokit.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def save_tiny_folder(path: Path, **config_changes) -> Path:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    for key, value in config_changes.items():
        setattr(model.config, key, value)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_local_folder_loads_and_reference_is_frozen(tmp_path):
    folder = save_tiny_folder(tmp_path / "m", attention_dropout=0.3)
    cfg = dpokit.load_config({"model": {"name_or_path": str(folder), "ref_name_or_path": str(folder)}})
    models = load_models(cfg.model)
    assert models.policy.training and not models.reference.training
    assert all(p.requires_grad for p in models.policy.parameters())
    assert not any(p.requires_grad for p in models.reference.parameters())
    for model in (models.policy, models.reference):
        assert model.config.attention_dropout == 0.0
        assert all(m.attention_dropout == 0.0 for m in model.modules() if hasattr(m, "attention_dropout")
                   and isinstance(m.attention_dropout, float))
    # Same starting weights on both sides.
    for (name, p), (_, r) in zip(models.policy.named_parameters(), models.reference.named_parameters()):
        assert torch.equal(p, r), name


def test_freeze_is_visible():
    model = freeze(tiny_model(512))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name, fragment", [
    ("./does/not/exist", "does not exist"),
    ("/nowhere/model", "does not exist"),
])
def test_missing_model_path_is_a_clear_error(name, fragment):
    with pytest.raises(ModelError, match=fragment):
        resolve(name)


def test_folder_without_config_and_offline_hub_id(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline"):
        resolve("someone/some-model")
    with pytest.raises(ModelError, match=r"model.gguf_file: .*not found"):
        resolve(str(tmp_path), gguf_file="missing.gguf")


def test_model_needing_remote_code_is_refused(tmp_path):
    folder = save_tiny_folder(tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    config["model_type"] = "custom-arch-needing-code"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('remote code must not run')\n")
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_model(resolve(str(folder)))


@pytest.fixture
def all_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the real model does gain from threads
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_embedded_gguf_default_trains_two_steps_and_exports(tmp_path, all_threads):
    gguf = embedded_gguf_path()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # model.name_or_path + model.gguf_file is the general GGUF route; `smollm2` is a shortcut to this file.
    tok = load_tokenizer(resolve(str(gguf.parent), gguf_file=gguf.name))
    assert tok.eos_token == "<|im_end|>"
    run_dir = dpokit.train(
        {"model": {"name_or_path": str(gguf.parent), "gguf_file": gguf.name},
         "data": {"train": str(ROOT / "examples" / "prefs-chat.jsonl"), "max_length": 128,
                  "max_prompt_length": 96, "max_rows": 4},
         "train": {"lr": 1e-5, "batch_size": 2, "max_steps": 2, "progress": False, "precision": "bf16"}},
        run_dir=str(tmp_path / "gguf-run"))
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]
    assert abs(rows[0]["loss"] - 0.6931) < 2e-2  # bf16 autocast: policy == reference up to rounding
    assert all(r["grad_norm"] > 0 for r in rows)
    script = (
        "import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(run_dir / 'final')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(run_dir / 'final')!r})\n"
        "assert getattr(m.config, 'quantization_config', None) is None\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = m.generate(ids, max_new_tokens=4, do_sample=False)\n"
        "assert 'dpokit' not in sys.modules\nprint('ok', out.shape[1] - ids.shape[1])\n")
    gen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("ok")
