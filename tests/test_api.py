"""The Python API with objects in memory (``dpokit.api``): each input kind trains exactly as the same rows in a
JSONL file and the same model from the config do, with the same counts, errors and run folder."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dpokit
from dpokit.config import load_config
from dpokit.errors import ConfigError, DataError, ModelError
from dpokit.models.loading import tiny_model, tiny_tokenizer
from dpokit.training.metrics import read_metrics


def preference_rows(n: int = 16) -> list[dict]:
    """n pairs, then a duplicate of the first and a pair whose responses are equal: two counted drops."""
    rows = [{"prompt": f"Question {i}: can you help with task {i * 7 % 11}?", "chosen": f" happy to help {i}",
             "rejected": f" not my problem {i}"} for i in range(n)]
    return rows + [dict(rows[0]), {"prompt": "Same?", "chosen": " yes", "rejected": " yes"}]


HELD_OUT = [{"prompt": f"Held out {i}?", "chosen": f" gladly {i}", "rejected": f" never {i}"} for i in range(6)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(tmp: Path, **sections) -> dict:
    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"max_length": 64, "max_prompt_length": 32, "cache_dir": str(tmp / "cache")},
           "loss": {"name": "sigmoid", "beta": 0.1},
           "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 3, "seed": 3, "progress": False}}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def metrics(run_dir: Path) -> list[dict]:
    """Every metrics row without the wall-clock fields (the only ones that may differ between two runs)."""
    return [{k: v for k, v in row.items() if not k.endswith(("_s", "_per_second"))}
            for row in read_metrics(run_dir / "metrics.jsonl")]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def same_run(a: Path, b: Path) -> None:
    """Bit-for-bit the same training: the same groups in the same order through the same float operations on
    one CPU thread, so equality is exact, not within a tolerance."""
    assert metrics(a) == metrics(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def report_counts(run_dir: Path) -> dict:
    report = json.loads((run_dir / "data_report.json").read_text())
    return {split: {k: v for k, v in report[split].items() if k != "source"} for split in ("train", "eval")}


@pytest.fixture(scope="module")
def from_files(tmp_path_factory):
    """The reference run: the same rows from JSONL files, the model from the config."""
    tmp = tmp_path_factory.mktemp("files")
    cfg = config(tmp, data={"train": str(write_jsonl(tmp / "train.jsonl", preference_rows())),
                            "eval": str(write_jsonl(tmp / "eval.jsonl", HELD_OUT))})
    return dpokit.train(cfg, run_dir=str(tmp / "run"))


def as_kind(rows: list[dict], kind: str):
    if kind == "dataset":
        import datasets

        return datasets.Dataset.from_list(rows)
    if kind == "dataframe":
        import pandas

        return pandas.DataFrame(rows)
    return rows


@pytest.mark.parametrize(("kind", "config_as"), [("list", "dict"), ("dataset", "path"), ("dataframe", "object")])
def test_in_memory_rows_train_exactly_as_the_same_rows_in_a_file(tmp_path, from_files, kind, config_as):
    cfg = config(tmp_path, run_dir={})
    cfg["run_dir"] = str(tmp_path / "run")
    if config_as == "path":
        source = tmp_path / "config.yaml"
        source.write_text(yaml.safe_dump(cfg))
    else:
        source = load_config(cfg) if config_as == "object" else cfg
    run_dir = dpokit.train(source, train_data=as_kind(preference_rows(), kind), eval_data=as_kind(HELD_OUT, kind))
    assert run_dir == tmp_path / "run"
    same_run(from_files, run_dir)
    assert report_counts(run_dir) == report_counts(from_files)
    counts = report_counts(run_dir)["train"]
    assert (counts["rows_read"], counts["rows_kept"], counts["dropped"]) == (18, 16, {"chosen_equals_rejected": 1,
                                                                                     "duplicate": 1})
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    lines = "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in preference_rows())
    assert saved["data"]["train"] == f"<in-memory:train_data:sha256:{hashlib.sha256(lines.encode()).hexdigest()}>"
    assert saved["data"]["eval"].startswith("<in-memory:eval_data:sha256:")
    assert (run_dir / "final" / "config.json").is_file()


def test_a_model_object_trains_exactly_as_the_same_model_from_the_config(tmp_path, from_files):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))  # what model.name_or_path: tiny-random-llama loads
    run_dir = dpokit.train(config(tmp_path), model=model, tokenizer=tok, train_data=preference_rows(),
                           eval_data=HELD_OUT, run_dir=str(tmp_path / "run"))
    same_run(from_files, run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name_or_path"] == "<in-memory>"
    with pytest.raises(ConfigError, match=r"^tokenizer: required with a model object that has no name_or_path"):
        dpokit.train(config(tmp_path), model=tiny_model(len(tok)), train_data=preference_rows(),
                     run_dir=str(tmp_path / "no-tokenizer"))


def test_a_peft_model_trains_its_adapters_as_model_lora_does(tmp_path):
    from peft import LoraConfig, get_peft_model

    rows = preference_rows()
    lora = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    from_config = dpokit.train(config(tmp_path, model={"lora": lora}), train_data=rows,
                               run_dir=str(tmp_path / "config-lora"))
    tok = tiny_tokenizer()
    torch.manual_seed(3)  # the adapters' initial weights, drawn as a run of train.seed 3 draws them
    peft_model = get_peft_model(tiny_model(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
    peft_model.base_model.model.name_or_path = "tiny-random-llama"  # its tokenizer then loads by name
    run_dir = dpokit.train(config(tmp_path), model=peft_model, train_data=rows, run_dir=str(tmp_path / "peft"))
    same_run(from_config, run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert saved["name_or_path"] == "<in-memory:tiny-random-llama>"
    assert saved["lora"] == {**lora, "dropout": 0.0}
    with pytest.raises(ModelError, match=r"^model\.name_or_path: <in-memory:tiny-random-llama> was a model object"):
        dpokit.train(run_dir / "config.yaml", run_dir=str(tmp_path / "by-name"), data__train=None,
                     train_data=rows)


def test_a_model_object_with_model_quantize_trains_as_qlora_from_the_config(tmp_path):
    """``model.quantize: nf4`` quantizes a model object's base as it does a loaded one (it was ignored: the
    object trained in full precision under a QLoRA config); a PeftModel object is refused in one line."""
    pytest.importorskip("torchao")
    from peft import LoraConfig, get_peft_model

    rows = preference_rows()
    qlora = {"model": {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}, "quantize": "nf4"},
             "reference": {"mode": "adapter"}}
    from_config = dpokit.train(config(tmp_path, **qlora), train_data=rows, run_dir=str(tmp_path / "config-qlora"))
    tok = tiny_tokenizer()
    run_dir = dpokit.train(config(tmp_path, **qlora), model=tiny_model(len(tok)), tokenizer=tok, train_data=rows,
                           run_dir=str(tmp_path / "object-qlora"))
    same_run(from_config, run_dir)
    peft_model = get_peft_model(tiny_model(len(tok)), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match=r"^model\.quantize: nf4 quantizes the base before the adapters"):
        dpokit.train(config(tmp_path, model={"quantize": "nf4"}, reference={"mode": "adapter"}), model=peft_model,
                     tokenizer=tok, train_data=rows, run_dir=str(tmp_path / "peft-qlora"))


def test_a_bad_row_gives_the_files_error_located_in_memory(tmp_path):
    rows = preference_rows()
    rows[2] = {"prompt": "Where is the answer?", "chosen": " here"}
    with pytest.raises(DataError) as from_file:
        dpokit.train(config(tmp_path, data={"train": str(write_jsonl(tmp_path / "bad.jsonl", rows))}),
                     run_dir=str(tmp_path / "file"))
    with pytest.raises(DataError) as in_memory:
        dpokit.train(config(tmp_path), train_data=rows, run_dir=str(tmp_path / "memory"))
    assert str(from_file.value).startswith(f"{tmp_path / 'bad.jsonl'}:3: ")
    assert str(in_memory.value) == str(from_file.value).replace(f"{tmp_path / 'bad.jsonl'}:3", "train_data[2]")
    assert "\n" not in str(in_memory.value)
    skipped = dpokit.train(config(tmp_path, data={"on_error": "skip", "max_bad_fraction": 0.1}), train_data=rows,
                           run_dir=str(tmp_path / "skipped"))
    report = json.loads((skipped / "data_report.json").read_text())["train"]
    assert report["rows_read"] == 18 == report["rows_kept"] + report["rows_dropped"]
    assert report["errors"] == [str(in_memory.value)]


def test_in_memory_input_that_is_not_rows_is_one_line():
    import datasets
    import numpy

    from dpokit.data import memory

    with pytest.raises(DataError, match=r"^train_data: a DatasetDict \(splits 'train'\); pass one split"):
        list(memory.serialize(datasets.DatasetDict({"train": datasets.Dataset.from_list(HELD_OUT)}), "train_data"))
    with pytest.raises(DataError, match=r"^eval_data: expected a datasets.Dataset, a list of dicts or a pandas "
                                        r"DataFrame, got builtins.str"):
        list(memory.serialize("rows.jsonl", "eval_data"))
    with pytest.raises(DataError, match=r"^train_data\[1\]: not JSON data"):
        list(memory.serialize([HELD_OUT[0], {"prompt": object()}], "train_data"))
    cells = [{"score": numpy.float32(0.5), "ids": numpy.arange(2)}]  # as Dataset/DataFrame cells often are
    assert list(memory.serialize(cells, "x")) == ['{"score":0.5,"ids":[0,1]}']


def test_resuming_an_in_memory_run_needs_the_same_rows(tmp_path):
    rows = preference_rows()
    cfg = config(tmp_path, train={"max_steps": 4, "save_every": 2})
    straight = dpokit.train(cfg, train_data=rows, run_dir=str(tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    dpokit.train(cfg, train_data=rows, run_dir=str(resumed), train__max_steps=2)
    assert cfg["train"]["max_steps"] == 4  # an override never changes the caller's dict
    with pytest.raises(ConfigError, match=r"^data\.train: the run in .* trained on rows given in memory "
                                          r"\(<in-memory:train_data:sha256:[0-9a-f]{64}>\); resume it with the same rows"):
        dpokit.train(cfg, run_dir=str(resumed), resume=True)
    with pytest.raises(DataError, match=r"^data\.train: <in-memory:train_data:sha256:[0-9a-f]{64}> names rows given "
                                        r"in memory, and none with that content were given now"):
        dpokit.train(resumed / "config.yaml", resume=True, train__max_steps=4, train__progress=False)
    with pytest.raises(ConfigError, match=r"^data\.train: changed since the checkpoint"):
        dpokit.train(cfg, train_data=rows[:-1], run_dir=str(resumed), resume=True)
    same_run(straight, dpokit.train(cfg, train_data=rows, run_dir=str(resumed), resume=True))


def test_overrides_never_change_the_callers_config_dict():
    cfg = {"train": {"max_steps": 4}}
    assert load_config(cfg, train__max_steps=2).train.max_steps == 2
    assert cfg == {"train": {"max_steps": 4}}
