"""QLoRA (``model.quantize: nf4``) on the two tiny vision-language families: only the language model's Linear
layers are held in NF4 (the vision encoder, the projector and the output head keep their dtype), a QLoRA run is
a LoRA run on the base's NF4 values, and ``final/`` is the model that was trained, loadable with its own class
and, through its adapter card, rebuilt from the base."""

import importlib.util
import io
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dpokit
from dpokit.config import load_config
from dpokit.models.vision import tiny_vision
from dpokit.training.metrics import read_metrics
from test_vision import COLOURS, FAMILIES, colour_pairs
from tolerances import assert_same_metrics, assert_same_weights_after_adamw

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
pytestmark = pytest.mark.skipif(not HAS_TORCHAO,
                                reason="QLoRA needs torchao: pip install -c constraints.txt -e '.[qlora]'")
U32 = 2.0 ** -24  # unit roundoff of fp32 (round to nearest)

LANGUAGE = {"tiny-random-llava": "model.language_model.", "tiny-random-idefics3": "model.text_model."}
"""Where each family keeps its language model; the vision encoder, the projector and lm_head sit beside it."""
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
"""Adapters on q_proj and v_proj only: k_proj, o_proj and the MLP stay without, so final/ must hold their NF4
values exactly."""
LR, STEPS = 1e-2, 3


def plain_name(name: str) -> str:
    """A parameter name of a peft-wrapped model as the bare model names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


# ------------------------------------------------------------------------------------------------- NF4 weights

@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_language_models_linears_are_nf4(family):
    from dpokit.models.loading import load_models
    from dpokit.models.quantize import quantized_weights

    original = dict(tiny_vision(family)[0].named_parameters())
    cfg = load_config({"model": {"name_or_path": family, "lora": LORA, "quantize": "nf4"},
                       "reference": {"mode": "adapter"}})
    policy = load_models(cfg.model, reference="never").policy
    nf4 = {plain_name(n) for n in quantized_weights(policy)}
    # q, k, v, o, gate, up, down in each of the 2 layers: every Linear of the language model, nothing else.
    assert len(nf4) == 2 * 7 and all(name.startswith(LANGUAGE[family]) for name in nf4), sorted(nf4)
    # Everything else (vision encoder, projector, embeddings, norms, lm_head) is the model's own tensor, unrounded.
    # The vision encoder's and the projector's Linear weights are multiples of 64 values, so NF4 could hold them:
    # they are plain because they were left out, not because they could not be quantized.
    params = {plain_name(n): p for n, p in policy.named_parameters()}
    rest = [name for name in original if name not in nf4]
    assert any(".vision" in n for n in rest) and any("projector" in n or "connector" in n for n in rest)
    assert "lm_head.weight" in rest
    for name in rest:
        assert torch.equal(params[name], original[name]), name
    assert all(original[name].numel() % 64 == 0 for name in rest
               if name.endswith(".weight") and original[name].dim() == 2 and "embed" not in name)


def test_fsdp_stays_refused_for_vision_models():
    from dpokit.errors import ModelError
    from dpokit.models.loading import load_models

    cfg = load_config({"model": {"name_or_path": "tiny-random-llava", "lora": LORA, "quantize": "nf4"},
                       "reference": {"mode": "adapter"}})
    with pytest.raises(ModelError, match="^distributed.strategy: fsdp is not supported for vision-language"):
        load_models(cfg.model, reference="never", skeleton=True)


# ---------------------------------------------------------------------------------------------------- training

def run_config(data: Path, base: Path, quantize: str, **train) -> dict:
    return {"model": {"name_or_path": str(base), "lora": LORA, "quantize": quantize},
            "reference": {"mode": "adapter"},
            "data": {"train": str(data), "max_length": 96, "max_prompt_length": 64},
            "loss": {"name": "sigmoid", "beta": 0.1},
            "train": {"lr": LR, "max_steps": STEPS, "batch_size": 2, "seed": 3, "save_every": STEPS,
                      "progress": False, "layout": "padded", **train}}


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


@pytest.fixture(scope="module", params=FAMILIES)
def runs(request, tmp_path_factory):
    """A QLoRA run from the tiny model saved to a folder, and a plain LoRA run from its NF4-round-tripped copy."""
    from dpokit.models.quantize import round_trip

    family = request.param
    root = tmp_path_factory.mktemp(family)
    for name, method in (("base", "none"), ("nf4-base", "nf4")):
        model, processor = tiny_vision(family)
        round_trip(model, method)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    data = colour_pairs(root, 4)
    qlora = dpokit.train(run_config(data, root / "base", "nf4"), run_dir=str(root / "qlora"))
    lora = dpokit.train(run_config(data, root / "nf4-base", "none"), run_dir=str(root / "lora"))
    return {"family": family, "root": root, "data": data, "qlora": Path(qlora), "lora": Path(lora)}


@pytest.mark.equivalence
def test_qlora_equals_lora_on_the_round_tripped_base(runs):
    qlora, lora = train_rows(runs["qlora"]), train_rows(runs["lora"])
    # The NF4 layer computes x @ deq(W)^T in fp32: the same products as the plain layer holding deq(W), so the
    # two runs differ by fp32 round-off at most (tolerances.py derives METRIC_REL for that; on a 2-core x86 CPU
    # they were bit-identical, but the NF4 backward may order its sums otherwise elsewhere).
    assert_same_metrics(qlora, lora, ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"))
    # LoRA's B starts at 0, so at step 1 the policy is the adapter-disabled base, pi_ref: every margin is exactly
    # 0 and the loss -log sigmoid(0) = ln 2 rounded to fp32 (3e-8 away); 1e-6 is the fp32 mean of 2 equal terms
    # with room.
    assert qlora[0]["rewards/margins"] == 0.0
    assert qlora[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert qlora[-1]["loss"] < qlora[0]["loss"]
    # The adapters trained alike: their gradients agree to round-off at every step (tolerances.py's AdamW bound).
    a, b = (load_file(str(run / "final" / "adapter" / "adapter_model.safetensors")) for run in (runs["qlora"], runs["lora"]))
    assert_same_weights_after_adamw(a, b, LR, STEPS)
    # The equality above is the NF4 base's: the same LoRA run on the unrounded base reads other log-probs at
    # step 1, and the comparison above tells them apart. The random tiny models' near-uniform log-probs move
    # little under NF4 (measured in fp32: 5e-5 relative for logps/chosen, 4e-4 to 1.6e-3 for logps/rejected),
    # yet 5x the 1e-5 round-off bound and more; the gap is set by the weights, the same on every machine, and
    # round-off moves it by ~1e-6 relative.
    plain = train_rows(dpokit.train(run_config(runs["data"], runs["root"] / "base", "none", max_steps=1),
                                    run_dir=str(runs["root"] / "plain")))
    for key in ("logps/chosen", "logps/rejected"):
        with pytest.raises(AssertionError):
            assert_same_metrics(plain, qlora[:1], (key,))


def image_input(processor) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), COLOURS[2]).save(buffer, format="PNG")
    return dict(processor(text="<image>What colour is it?", images=[Image.open(buffer)], return_tensors="pt"))


@pytest.mark.equivalence
def test_final_loads_with_its_own_class_and_its_adapter_card_rebuilds_it(runs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run, root = runs["qlora"], runs["root"]
    final = AutoModelForImageTextToText.from_pretrained(run / "final").eval()
    assert type(final).__name__ == type(tiny_vision(runs["family"])[0]).__name__
    weights = dict(final.named_parameters())
    base, nf4_base = (dict(AutoModelForImageTextToText.from_pretrained(root / n).named_parameters())
                      for n in ("base", "nf4-base"))
    # Without an adapter a weight is exactly what the run computed with: the language model's NF4 values, the
    # rest of the model (vision encoder, projector, head, embeddings) untouched.
    for name, tensor in weights.items():
        if not any(f".{t}." in name for t in LORA["target_modules"]):
            expected = nf4_base[name] if name.startswith(LANGUAGE[runs["family"]]) else base[name]
            assert torch.equal(tensor, expected), name
    assert any(not torch.equal(nf4_base[n], base[n]) for n in base)  # the round trip did round

    # Both cards load the base with its own class; the adapter's snippet (the base, its NF4 values, the adapter)
    # runs as written and gives final/'s logits.
    for card in (run / "final" / "README.md", run / "final" / "adapter" / "README.md"):
        text = card.read_text()
        assert "AutoModelForImageTextToText" in text and "AutoModelForCausalLM" not in text
    (snippet,) = re.findall(r"```python\n(.*?)```", (run / "final" / "adapter" / "README.md").read_text(), flags=re.S)
    assert 'round_trip(base, "nf4")' in snippet
    scope: dict = {}
    exec(snippet.replace("PATH_OR_HUB_ID", str(run / "final" / "adapter")), scope)
    rebuilt = scope["model"].eval()
    inputs = image_input(AutoProcessor.from_pretrained(run / "final"))
    with torch.no_grad():
        ours, theirs = rebuilt(**inputs).logits, final(**inputs).logits
    # As in test_qlora.py: the image features reach the language model through the same unrounded encoder and
    # projector in both, so only the language model differs: each adapted weight is merged once (u |W'| plus the
    # rank-r product's roundings), and the logits pass 2 layers x 4 maps and the head, each re-associating sums
    # of at most k = 128 products: 9 k u relative to max |logit|, without relying on error cancellation.
    assert (ours - theirs).abs().max().item() <= 9 * 128 * U32 * ours.abs().max().item()


@pytest.mark.equivalence
def test_score_and_export_use_the_nf4_base(runs, tmp_path):
    from transformers import AutoModelForImageTextToText

    from dpokit.evaluate.scoring import load_scorer
    from dpokit.integrations.export import export_run

    run = runs["qlora"]
    nf4_base = dict(AutoModelForImageTextToText.from_pretrained(runs["root"] / "nf4-base").named_parameters())
    reference = dict(load_scorer(run).reference.named_parameters())
    assert reference.keys() == nf4_base.keys()
    assert all(torch.equal(reference[name], nf4_base[name]) for name in nf4_base)
    # The last checkpoint (adapters only) exported on the re-quantized base is final/, tensor for tensor.
    export_run(run, tmp_path / "exported", checkpoint=f"step-{STEPS}")
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
