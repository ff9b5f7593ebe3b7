"""A vision-language model given to ``dpokit.train`` as a Python object (``model=``, ``processor=``, or the
processor as ``tokenizer=`` as TRL's ``processing_class`` takes it) trains exactly as the same model named in
the config, on both tiny families; what cannot train is refused in one line."""

import pytest
import torch
import yaml

import dpokit
from dpokit.errors import ConfigError
from dpokit.models.source import tiny_model, tiny_tokenizer
from dpokit.models.vision import tiny_vision
from dpokit.training.metrics import read_metrics
from test_vision import FAMILIES, colour_pairs, vision_config, weights


def metrics(run_dir):
    """Every metrics row without the wall-clock fields (the only ones that may differ between two runs)."""
    return [{k: v for k, v in row.items() if not k.endswith(("_s", "_per_second"))}
            for row in read_metrics(run_dir / "metrics.jsonl")]


def same_run(a, b) -> None:
    """Bit for bit: the same weights built by the same code from the same seed, the same batches through the same
    float operations, so equality is exact, not within a tolerance."""
    assert metrics(a) == metrics(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.equivalence
@pytest.mark.parametrize("family", FAMILIES)
def test_a_vision_model_object_trains_exactly_as_the_same_model_by_name(tmp_path, family):
    path = colour_pairs(tmp_path, 6)
    cfg = vision_config(path, family, batch_size=2)
    by_name = dpokit.train(cfg, run_dir=str(tmp_path / "name"))
    model, processor = tiny_vision(family)  # what model.name_or_path: FAMILY loads
    as_object = dpokit.train(cfg, model=model, processor=processor, run_dir=str(tmp_path / "object"))
    same_run(by_name, as_object)
    assert yaml.safe_load((as_object / "config.yaml").read_text())["model"]["name_or_path"] == "<in-memory>"
    # final/ loads with transformers' own classes, the processor beside the weights.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    final = as_object / "final"
    assert type(AutoModelForImageTextToText.from_pretrained(final)).__name__ == type(model).__name__
    assert type(AutoProcessor.from_pretrained(final)).__name__ == type(processor).__name__
    # The object was trained in place, as TRL trains it: it holds final/'s weights.
    trained = weights(as_object)
    state = model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained if k in state)
    # TRL's processing_class: the processor given where the tokenizer goes trains the same.
    model, processor = tiny_vision(family)
    as_tokenizer = dpokit.train(cfg, model=model, tokenizer=processor, run_dir=str(tmp_path / "as-tokenizer"))
    same_run(by_name, as_tokenizer)


def test_lora_and_the_adapter_reference_on_a_vision_model_object(tmp_path):
    """``model.lora`` adapts the object's language model as it adapts the named model's, the adapter-disabled
    policy is the reference, and an object named by ``name_or_path`` finds its processor by that name."""
    cfg = vision_config(colour_pairs(tmp_path, 4), "tiny-random-idefics3", batch_size=2, lr=1e-2)
    cfg["model"]["lora"] = {"r": 4}
    cfg["reference"] = {"mode": "adapter"}
    by_name = dpokit.train(cfg, run_dir=str(tmp_path / "name"))
    model = tiny_vision("tiny-random-idefics3")[0]
    model.name_or_path = "tiny-random-idefics3"  # its processor then loads by name
    as_object = dpokit.train(cfg, model=model, run_dir=str(tmp_path / "object"))
    same_run(by_name, as_object)
    assert (as_object / "final" / "adapter").is_dir() and (as_object / "final" / "processor_config.json").is_file()


def one_line(match: str, **objects) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        dpokit.train(vision_config(objects.pop("path")), **objects)
    assert "\n" not in str(err.value)


def test_what_a_vision_model_object_cannot_train_with_is_said_in_one_line(tmp_path):
    from peft import LoraConfig, get_peft_model

    path = tmp_path / "unused.jsonl"  # every refusal comes before the data is read
    llava, llava_processor = tiny_vision("tiny-random-llava")
    one_line(r"^processor: required with a vision-language model object that has no name_or_path: "
             r"dpokit\.train\(config, model=model, processor=processor, \.\.\.\)$", path=path, model=llava)
    one_line(r"^tokenizer: a vision-language model needs its processor .*processor=processor", path=path,
             model=llava, tokenizer=llava_processor.tokenizer)
    # Idefics3's processor adds 3 tokens LLaVA's embedding has no rows for.
    one_line(r"^processor: its tokenizer has 516 tokens, but the model's embedding has 513 rows; give the model's "
             r"own processor$", path=path, model=llava, processor=tiny_vision("tiny-random-idefics3")[1])
    peft_model = get_peft_model(llava, LoraConfig(r=4, target_modules=["q_proj"]))
    one_line(r"^model: a PeftModel of a vision-language model is not supported; give the plain model with "
             r"model\.lora", path=path, model=peft_model, processor=llava_processor)
    tok = tiny_tokenizer()
    one_line(r"^processor: a processor, given with a text model", path=path, model=tiny_model(len(tok)),
             processor=llava_processor)
    one_line(r"^processor: given without model=", path=path, processor=llava_processor)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_on_a_vision_model_object_trains_as_the_named_model(tmp_path, family):
    """``model.quantize: nf4`` quantizes the object's language model in place, as loading does for the named
    model (``quantize_policy``: its Linear layers but the head; encoder and projector as they are)."""
    pytest.importorskip("torchao", reason="NF4 needs torchao")
    cfg = vision_config(colour_pairs(tmp_path, 4), family, batch_size=2, lr=1e-2)
    cfg["model"].update({"quantize": "nf4", "lora": {"r": 4}})
    cfg["reference"] = {"mode": "adapter"}
    by_name = dpokit.train(cfg, run_dir=str(tmp_path / "name"))
    model, processor = tiny_vision(family)
    as_object = dpokit.train(cfg, model=model, processor=processor, run_dir=str(tmp_path / "object"))
    same_run(by_name, as_object)
