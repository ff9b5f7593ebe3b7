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
from dpokit.integrations.from_trl import MAPPED, REASONS, translate
from dpokit.integrations.from_trl_loss import TRL_RENAMES
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
    # TRL 1.x's sigmoid loss ignores label_smoothing: the plain loss is written, and stderr says how to get cDPO.
    assert "loss.name=cdpo loss.label_smoothing=0.1" in err
    cfg = yaml.safe_load(out.read_text())
    assert cfg["loss"] == {"beta": 0.2, "name": "sigmoid"}
    assert cfg["train"]["lr"] == 5e-7 and cfg["train"]["batch_size"] == 4 and cfg["train"]["grad_accum"] == 4
    assert cfg["train"]["max_steps"] == 1000 and cfg["train"]["warmup_ratio"] == 0.1
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
    odd = translate({"loss_type": "nope", "fp16": True, "lr_scheduler_type": "polynomial",
                     "optim": "adafactor", "max_completion_length": 128, "some_new_field": 1,
                     "truncation_mode": "keep_start"})
    for key in ("loss_type", "fp16", "lr_scheduler_type", "optim", "max_completion_length",
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


# ---------------------------------------------------------------------------------- whole files TrlParser reads
# TRL's TrlParser reads ScriptArguments, DPOConfig and ModelConfig from one file; alignment-handbook recipes add
# dataset_mixer / dataset_splits. Each shape must convert to a dpokit config that loads and keeps the model, LoRA,
# lengths, warmup, loss and dataset of the source.

ZEPHYR_QLORA = """\
# Model arguments
model_name_or_path: alignment-handbook/zephyr-7b-sft-qlora
torch_dtype: float16

# LoRA arguments
use_peft: true
load_in_4bit: true
lora_r: 16
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
- q_proj
- k_proj
- v_proj
- o_proj
- gate_proj
- up_proj
- down_proj

# Data training arguments
dataset_mixer:
  HuggingFaceH4/ultrafeedback_binarized: 1.0
dataset_splits:
- train_prefs
- test_prefs
preprocessing_num_workers: 12

# DPOTrainer arguments
bf16: true
beta: 0.01
do_eval: true
evaluation_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: zephyr-7b-dpo-qlora
learning_rate: 5.0e-6
log_level: info
logging_steps: 10
lr_scheduler_type: cosine
max_length: 1024
max_prompt_length: 512
num_train_epochs: 1
optim: paged_adamw_32bit
output_dir: data/zephyr-7b-dpo-qlora
per_device_train_batch_size: 4
per_device_eval_batch_size: 8
push_to_hub: true
save_strategy: "steps"
save_steps: 100
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
"""


def _convert(tmp_path, text, capsys):
    """``dpokit config from-trl`` on ``text``: the written config (loaded by dpokit's own loader) and stderr."""
    source, out = tmp_path / "trl.yaml", tmp_path / "dpokit.yaml"
    source.write_text(text)
    assert main(["config", "from-trl", str(source), "--out", str(out)]) == 0
    cfg = dpokit.load_config(out)
    return cfg, yaml.safe_load(out.read_text()), capsys.readouterr().err


def test_the_zephyr_handbook_recipe_keeps_model_lora_data_lengths_and_warmup(tmp_path, capsys):
    cfg, raw, err = _convert(tmp_path, ZEPHYR_QLORA, capsys)
    assert cfg.model.name_or_path == "alignment-handbook/zephyr-7b-sft-qlora"
    assert cfg.model.lora is not None
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (16, 16.0, 0.05)
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]
    assert "torch_dtype: float16 weights are not supported" in err  # dpokit has no fp16: said, not guessed
    if "quantize" in type(cfg.model).model_fields:
        assert cfg.model.quantize == "nf4"
    else:
        assert "not carried over: load_in_4bit: 4-bit loading is not supported by this dpokit" in err
    assert (cfg.data.train, cfg.data.train_split) == ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    assert (cfg.data.eval, cfg.data.eval_split) == ("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.num_proc) == (1024, 512, 12)
    assert cfg.train.warmup_ratio == 0.1 and cfg.train.warmup_steps == 0 and cfg.train.scheduler == "cosine"
    assert (cfg.train.lr, cfg.train.batch_size, cfg.loss.beta, cfg.loss.name) == (5e-6, 4, 0.01, "sigmoid")
    assert (cfg.eval.every, cfg.train.save_every, cfg.run_dir) == (100, 100, "data/zephyr-7b-dpo-qlora")
    assert cfg.train.optimizer == "adamw"  # paged_adamw_32bit: AdamW, its fp32 states paged to CPU memory
    assert "gradient_checkpointing_kwargs: not a DPOConfig field" not in err
    assert "# Set model.name_or_path" not in (tmp_path / "dpokit.yaml").read_text()


TRL_DOCS = """\
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
model_revision: refs/pr/3
dtype: bfloat16
attn_implementation: flash_attention_2
trust_remote_code: true
dataset_name: trl-lib/ultrafeedback_binarized
dataset_config: default
dataset_train_split: train
dataset_test_split: test
learning_rate: 5.0e-7
num_train_epochs: 1
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
gradient_checkpointing: true
eval_strategy: steps
eval_steps: 50
dataset_num_proc: 4
save_steps: -1
output_dir: Qwen2-0.5B-DPO
"""


def test_trls_documented_script_config_keeps_the_model_and_the_dataset(tmp_path, capsys):
    cfg, raw, err = _convert(tmp_path, TRL_DOCS, capsys)
    assert (cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype) == ("Qwen/Qwen2-0.5B-Instruct",
                                                                             "refs/pr/3", "bfloat16")
    assert cfg.model.trust_remote_code is True and cfg.model.lora is None
    # flash_attention_2 is no dpokit kernel: auto (the same numbers within float tolerance), said in the file.
    assert cfg.model.attn_implementation == "auto"
    assert "flash_attention_2" in (tmp_path / "dpokit.yaml").read_text()
    kwargs = translate({"model_init_kwargs": '{"dtype": "bfloat16", "attn_implementation": "flash_attention_2"}'})
    assert kwargs.config["model"] == {"dtype": "bfloat16", "attn_implementation": "auto"}  # TRL's JSON string form
    assert (cfg.data.train, cfg.data.train_split) == ("trl-lib/ultrafeedback_binarized:default", "train")
    assert (cfg.data.eval, cfg.data.eval_split) == ("trl-lib/ultrafeedback_binarized:default", "test")
    # dataset_num_proc is the tokenizing processes (data.num_proc); save_steps -1 is "never" in transformers
    # (its callback saves only when save_steps > 0): dpokit saves at the end only, said of neither as unsupported.
    assert cfg.data.num_proc == 4 and cfg.train.save_every is None
    assert "dataset_num_proc" not in err and "save_steps" not in err
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.grad_accum, cfg.eval.every) == (5e-7, 1.0, 8, 50)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 1023)  # TRL 1.x: no prompt limit
    assert translate({"max_length": 4096}).config["data"]["max_prompt_length"] == 4095  # not 512
    # Without eval_strategy, TRL's script reads no test split: no data.eval.
    cfg, _, _ = _convert(tmp_path, TRL_DOCS.replace("eval_strategy: steps\n", ""), capsys)
    assert cfg.data.eval is None


@pytest.mark.parametrize(("loss_type", "weights", "expected", "alpha"), [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {"bco_pair": 0.2, "rpo": 0.8}, 1.25),  # MPO
    (["sigmoid", "sft"], [1.0, 1.0], None, 1.0),  # RPO
    (["sigmoid", "sft"], None, None, 1.0),  # TRL's equal weights
])
def test_loss_lists_with_sft_become_rpos_nll_term(tmp_path, capsys, loss_type, weights, expected, alpha):
    text = yaml.safe_dump({"model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "loss_type": loss_type,
                           "loss_weights": weights, "dataset_name": "trl-lib/ultrafeedback_binarized"})
    cfg, raw, err = _convert(tmp_path, text, capsys)
    assert cfg.loss.alpha == pytest.approx(alpha, rel=1e-12)  # a ratio of two given floats: rounding only
    if expected is None:
        assert cfg.loss.name == "rpo" and cfg.loss.weights is None
    else:
        assert cfg.loss.weights == expected


def test_mpos_weighted_sum_is_what_the_rpo_mapping_computes():
    # 0.8 sigmoid + 0.2 bco_pair + 1.0 NLL (TRL) = 0.8 rpo(alpha = 1.25) + 0.2 bco_pair (dpokit), pair by pair.
    import torch

    from dpokit.losses import LOSSES

    pc, pr, rc, rr = (torch.tensor([-12.0, -30.0]), torch.tensor([-15.0, -28.0]), torch.tensor([-13.0, -29.0]),
                      torch.tensor([-14.0, -29.5]))
    lengths = torch.tensor([4.0, 10.0])
    beta = 0.1
    rpo = LOSSES["rpo"](pc, pr, rc, rr, beta=beta, chosen_lengths=lengths, rejected_lengths=lengths, alpha=1.25)[0]
    bco = LOSSES["bco_pair"](pc, pr, rc, rr, beta=beta, chosen_lengths=lengths, rejected_lengths=lengths)[0]
    h = (pc - pr) - (rc - rr)
    trl = (0.8 * -torch.nn.functional.logsigmoid(beta * h)
           + 0.2 * (-torch.nn.functional.logsigmoid(beta * (pc - rc)) - torch.nn.functional.logsigmoid(-beta * (pr - rr)))
           + 1.0 * (-pc / lengths))
    # Both sides are float32 sums of at most 6 rounded terms, each below 8 in size: every rounding is at most
    # half an ulp of 8 (4.8e-7), so they differ by under 6 x 2 x 4.8e-7 = 5.7e-6 on any hardware.
    torch.testing.assert_close(0.8 * rpo + 0.2 * bco, trl, rtol=0, atol=1e-5)


QWEN_LORA_4BIT = """\
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
dtype: bfloat16
attn_implementation: sdpa
use_peft: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: all-linear
lora_modules_to_save: [lm_head, embed_tokens]
load_in_4bit: true
dataset_name: trl-lib/ultrafeedback_binarized
learning_rate: 5.0e-6
warmup_steps: 0.03
max_length: 2048
"""


def test_a_qwen_lora_config_with_4bit_keeps_its_adapter(tmp_path, capsys):
    cfg, raw, err = _convert(tmp_path, QWEN_LORA_4BIT, capsys)
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.dtype == "bfloat16"
    assert cfg.model.attn_implementation == "sdpa"
    assert cfg.model.lora is not None
    lora = cfg.model.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (32, 16.0, 0.05, "all-linear")
    assert "not carried over: lora_modules_to_save:" in err
    if "quantize" in type(cfg.model).model_fields:
        assert cfg.model.quantize == "nf4"
    else:
        assert "load_in_4bit: 4-bit loading is not supported by this dpokit" in err
    # transformers 5 reads a warmup_steps below 1 as the ratio.
    assert cfg.train.warmup_ratio == 0.03 and cfg.train.warmup_steps == 0
    assert (cfg.data.train, cfg.data.max_length, cfg.data.max_prompt_length) == (
        "trl-lib/ultrafeedback_binarized", 2048, 2047)
    # TRL leaves lora keys unread without use_peft: full fine-tuning, each named.
    full = translate({"lora_r": 8, "load_in_4bit": True})
    assert "lora" not in full.config.get("model", {}) and "use_peft" in full.unmapped["lora_r"]
    # peft's own choice when TRL passes no targets (llama / qwen2 / mistral: q_proj, v_proj), said in a note.
    default = translate({"use_peft": True})
    assert default.config["model"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert any("lora_target_modules unset" in n for n in default.notes)


def test_max_length_null_is_said_not_silently_1024(tmp_path, capsys):
    cfg, raw, err = _convert(tmp_path, "model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct\nmax_length: null\n"
                                       "dataset_name: trl-lib/ultrafeedback_binarized\n", capsys)
    assert "not carried over: max_length: null (TRL: no truncation)" in err
    assert cfg.data.max_length == 1024 and cfg.data.max_prompt_length == 1023


def test_sigmoid_with_label_smoothing_lets_the_user_choose_cdpo():
    ignored = translate({"label_smoothing": 0.1})
    assert ignored.config["loss"] == {"beta": 0.1, "name": "sigmoid"}
    assert "loss.name=cdpo" in ignored.unmapped["label_smoothing"]
    cdpo = translate({"label_smoothing": 0.1}, label_smoothing="cdpo").config["loss"]
    assert cdpo == {"beta": 0.1, "name": "cdpo", "label_smoothing": 0.1}
    robust = translate({"loss_type": ["sigmoid", "robust"], "label_smoothing": 0.1})
    assert robust.config["loss"]["label_smoothing"] == 0.1 and "label_smoothing" not in robust.unmapped


def test_step_intervals_follow_transformers():
    # save_steps <= 0 never saves (transformers' callback tests save_steps > 0); a fraction is of max_steps,
    # rounded up; a save_strategy other than steps saves at the end only.
    assert "save_every" not in translate({"save_steps": -1}).config["train"]
    assert "save_steps" not in translate({"save_steps": -1}).unmapped
    assert translate({"save_steps": 0.25, "max_steps": 10}).config["train"]["save_every"] == 3
    assert "save_every" not in translate({"save_steps": 100, "save_strategy": "epoch"}).config["train"]


def test_train_warmup_ratio_is_ceil_of_the_ratio_of_total_steps():
    from dpokit.errors import ConfigError
    from dpokit.training.setup import lr_lambda

    cfg = dpokit.load_config({"train": {"warmup_ratio": 0.1, "scheduler": "linear"}})
    factor = lr_lambda(cfg, 95)  # ceil(0.1 x 95) = 10 warmup steps, transformers' get_warmup_steps
    assert [factor(n) for n in (0, 9)] == [pytest.approx(1 / 10), 1.0]
    assert factor(11) < 1.0  # linear decay from step 10 on
    with pytest.raises(ConfigError, match="warmup_ratio"):
        dpokit.load_config({"train": {"warmup_ratio": 0.1, "warmup_steps": 5}})


def test_every_field_of_trls_model_and_script_arguments_is_known():
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    fields = set()
    for cls in (trl.ModelConfig, trl.ScriptArguments, trl.DatasetMixtureConfig):
        fields |= {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(fields - set(MAPPED) - set(REASONS))
    assert not unknown, f"ModelConfig / ScriptArguments fields from-trl does not know: {unknown}"


def test_dataset_mixtures_map_when_one_whole_dataset_and_are_named_otherwise():
    one = translate({"datasets": [{"path": "trl-lib/ultrafeedback_binarized", "name": "default",
                                   "split": "train"}]}).config["data"]
    assert one["train"] == "trl-lib/ultrafeedback_binarized:default"
    several = translate({"datasets": [{"path": "a/b"}, {"path": "c/d"}]})
    assert "train" not in several.config["data"] and "several datasets" in several.unmapped["datasets"]
    mixer = translate({"dataset_mixer": {"a/b": 0.5, "c/d": 1.0}, "dataset_splits": ["train_prefs"]})
    assert "train" not in mixer.config["data"] and "dataset_mixer" in mixer.unmapped
    handbook = translate({"dataset_mixer": {"a/b": 1.0}, "dataset_splits": ["train_sft", "test_sft"]})
    assert handbook.config["data"] | {} == {**handbook.config["data"], "train": "a/b", "train_split": "train_sft",
                                            "eval": "a/b", "eval_split": "test_sft"}
    dpokit.load_config(handbook.config)


def test_load_in_4bit_maps_to_model_quantize_where_dpokit_has_it(monkeypatch):
    # The key is checked at run time: a dpokit whose ModelConfig has ``quantize`` gets nf4, none a named line.
    import dpokit.config

    class WithQuantize(dpokit.config.ModelConfig):
        quantize: str | None = None

    monkeypatch.setattr(dpokit.config, "ModelConfig", WithQuantize)
    four = translate({"use_peft": True, "load_in_4bit": True})
    assert four.config["model"]["quantize"] == "nf4" and "load_in_4bit" not in four.unmapped
    fp4 = translate({"use_peft": True, "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"})
    assert "quantize" not in fp4.config["model"] and "fp4" in fp4.unmapped["bnb_4bit_quant_type"]
    assert "load_in_8bit" in translate({"use_peft": True, "load_in_8bit": True}).unmapped


def test_a_warmup_ratio_run_refuses_a_longer_resume():
    # Growing max_steps on resume is allowed under a constant schedule because the lr after warmup stays; with
    # warmup_ratio the warmup itself grows with the steps (ceil(ratio x total)), so the change is refused.
    from dpokit.errors import ConfigError
    from dpokit.training.resume import check_resume_settings

    saved = dpokit.load_config({"train": {"max_steps": 10, "warmup_ratio": 0.5}})
    longer = dpokit.load_config({"train": {"max_steps": 40, "warmup_ratio": 0.5}})
    with pytest.raises(ConfigError, match="train.max_steps: changed"):
        check_resume_settings(saved.model_dump(mode="json"), longer, "data", "data")
    steps = dpokit.load_config({"train": {"max_steps": 40, "warmup_steps": 5}})
    assert check_resume_settings(dpokit.load_config({"train": {"max_steps": 10, "warmup_steps": 5}}).model_dump(
        mode="json"), steps, "data", "data") is None
