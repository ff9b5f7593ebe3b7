"""Sampling, scoring and evaluation with image prompts, on both tiny vision-language families (LLaVA, Idefics3):
batched image prompts decode as one at a time, the implicit reward of a training pair is what training logged,
and ``dpokit score`` / ``dpokit eval`` read image rows as training reads them."""

import shutil
from pathlib import Path

import pytest
import torch

import dpokit
from dpokit.data.vision import load_vision
from dpokit.errors import DpokitError
from dpokit.evaluate import load_scorer
from dpokit.models.generate import SamplingParams, generate
from dpokit.models.vision import tiny_vision
from dpokit.training.metrics import read_metrics
from test_vision import COLOURS, DATA, png, trl_row, write_rows
from tolerances import LOGP_TOL

FAMILIES = ("tiny-random-llava", "tiny-random-idefics3")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BETA = 0.1


def sharpen(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Re-draw the language model's matrices and the head with a large std: a freshly built tiny model is near
    uniform, greedy decoding then repeats one token and near-ties make 'batched equals one at a time' weak."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and ("language_model" in name or "text_model" in name or "lm_head" in name):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def image_prompts(folder: Path, processor) -> list:
    """Four prompts as training tokenizes them: one image, two images, one image, and a longer question (so the
    batch is left-padded to different lengths and holds different image counts)."""
    for c, colour in enumerate(COLOURS):
        (folder / f"img{c}.png").write_bytes(png(colour))
    rows = [trl_row("img0.png", "What colour?", "red", "blue"),
            trl_row(["img1.png", "img2.png"], "Two colours, right?", "yes", "no"),
            trl_row("img3.png", "Hm", "a", "b"),
            trl_row("img2.png", "Describe the image in detail please", "x", "y")]
    groups, report = load_vision(str(write_rows(folder, rows)), processor, DATA)
    assert report.rows_kept == 4
    return groups


@torch.no_grad()
def naive_greedy(model, ids: list[int], pixels: dict, n: int) -> list[int]:
    """Greedy decoding the slow way: one unpadded sequence, the full forward with the images at every step, no
    cache."""
    seq = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq]), **pixels).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids):]


# ------------------------------------------------------------------------------------------------- sampling

@pytest.mark.equivalence
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_image_prompts_decode_as_one_at_a_time(tmp_path, family):
    model, processor = tiny_vision(family)
    model = sharpen(model)
    groups = image_prompts(tmp_path, processor)
    ids, pixels = [g.prompt_ids for g in groups], [g.pixels for g in groups]
    params = SamplingParams(max_new_tokens=10, temperature=0, batch_size=4)
    eos = [-1]  # never stop early: every step of every row is compared
    batched = generate(model, processor.tokenizer, ids, params, eos, pixels=pixels)
    alone = [generate(model, processor.tokenizer, [i], params, eos, pixels=[p])[0] for i, p in zip(ids, pixels)]
    assert [s.response_ids for s in batched] == [s.response_ids for s in alone]
    # The cached decode (images in the prefill only) is the full forward with the images at every step.
    for group, sample in zip(groups, batched):
        assert sample.response_ids == naive_greedy(model, group.prompt_ids, group.pixels, 10)
    # The images are read: the first prompt with the third prompt's image decodes otherwise.
    other = generate(model, processor.tokenizer, ids[:1], params, eos, pixels=[groups[2].pixels])
    assert other[0].response_ids != batched[0].response_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_image_sampling_is_reproducible(tmp_path, family):
    model, processor = tiny_vision(family)
    groups = image_prompts(tmp_path, processor)
    ids, pixels = [g.prompt_ids for g in groups], [g.pixels for g in groups]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, batch_size=3)
    first = generate(model, processor.tokenizer, ids, params, pixels=pixels)
    again = generate(model, processor.tokenizer, ids, params, pixels=pixels)
    assert [s.response_ids for s in first] == [s.response_ids for s in again]
    with pytest.raises(DpokitError, match="pixel inputs for"):
        generate(model, processor.tokenizer, ids, params, pixels=pixels[:2])


# -------------------------------------------------------------------------------------------------- scoring

def vision_run(folder: Path, family: str, lora: bool = False) -> Path:
    """A configs/tiny-vision.yaml-like run: the shipped image pairs and their held-out pairs, 3 steps, the
    held-out metrics logged at the last step, a checkpoint at every step."""
    data = folder / "data"
    shutil.copytree(EXAMPLES / "vision", data / "vision")
    for name in ("prefs-vision.jsonl", "prefs-vision-eval.jsonl"):
        shutil.copy(EXAMPLES / name, data / name)
    model: dict = {"name_or_path": family}
    if lora:
        model["lora"] = {"r": 4, "alpha": 8}
    cfg = {"model": model,
           "data": {"train": str(data / "prefs-vision.jsonl"), "eval": str(data / "prefs-vision-eval.jsonl"),
                    "max_length": 96, "max_prompt_length": 64},
           "loss": {"name": "sigmoid", "beta": BETA},
           "train": {"lr": 1e-2 if lora else 1e-3, "max_steps": 3, "batch_size": 6, "seed": 0, "progress": False,
                     "layout": "padded", "save_every": 1},
           "eval": {"every": 3}}
    return Path(dpokit.train(cfg, run_dir=str(folder / "run")))


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tmp_path_factory):
    return vision_run(tmp_path_factory.mktemp(request.param), request.param)


def last_eval(run_dir: Path) -> dict:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "eval"][-1]


# Rewards of the held-out pairs are BETA times a difference of two fp32 log-prob sums (|logp| <= ~60 over <= 8
# response tokens), computed here in other batch shapes than training's eval: each within LOGP_TOL = 1e-5 + 1e-6 *
# 60 (tolerances.py). A wrong reference, a lost image or a shifted token moves a reward by 1e-3 or more.
REWARD_ABS = BETA * 2 * (LOGP_TOL["atol"] + LOGP_TOL["rtol"] * 60)


def heldout_rewards(scorer, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = scorer.config
    groups, _ = load_vision(cfg.data.eval, scorer.processor, cfg.data, "train")
    n = len(groups)
    scores = scorer.implicit_rewards([g.prompt_ids for g in groups] * 2,
                                     [g.chosen_ids for g in groups] + [g.rejected_ids for g in groups],
                                     [g.pixels for g in groups] * 2)
    return scores["rewards"][:n], scores["rewards"][n:]


@pytest.mark.equivalence
def test_scorer_reproduces_the_logged_heldout_rewards(run):
    scorer = load_scorer(run)
    assert scorer.processor is not None and scorer.tokenizer is scorer.processor.tokenizer
    chosen, rejected = heldout_rewards(scorer, run)
    logged = last_eval(run)
    assert len(chosen) == 6
    assert float(chosen.mean()) == pytest.approx(logged["rewards/chosen"], abs=REWARD_ABS)
    assert float(rejected.mean()) == pytest.approx(logged["rewards/rejected"], abs=REWARD_ABS)
    assert float((chosen - rejected).mean()) == pytest.approx(logged["rewards/margins"], abs=2 * REWARD_ABS)
    assert abs(float(chosen.mean())) > 100 * REWARD_ABS  # the policy moved: a reference-as-policy bug would show


@pytest.mark.equivalence
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_run_scores_against_its_adapter_free_base(tmp_path, family):
    run_dir = vision_run(tmp_path, family, lora=True)
    scorer = load_scorer(run_dir)
    chosen, rejected = heldout_rewards(scorer, run_dir)
    logged = last_eval(run_dir)
    assert float(chosen.mean()) == pytest.approx(logged["rewards/chosen"], abs=REWARD_ABS)
    assert float(rejected.mean()) == pytest.approx(logged["rewards/rejected"], abs=REWARD_ABS)
    assert abs(float(chosen.mean())) > 100 * REWARD_ABS


def test_text_reference_for_an_image_policy_is_refused(run):
    with pytest.raises(DpokitError, match="must be a vision-language model too"):
        load_scorer(run, ref="tiny-random-llama")
