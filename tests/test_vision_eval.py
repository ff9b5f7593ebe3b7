"""Sampling, scoring and evaluation with image prompts, on both tiny vision-language families (LLaVA, Idefics3):
batched image prompts decode as one at a time, the implicit reward of a training pair is what training logged,
and ``dpokit score`` / ``dpokit eval`` read image rows as training reads them."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import dpokit
from dpokit.cli import main
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


@pytest.mark.parametrize("family", FAMILIES)
def test_the_image_token_is_never_sampled(tmp_path, family):
    """Fed back, a sampled image placeholder would ask for features the prompt lacks (no forward could score the
    response); the sampler never picks it, even where it is the model's most likely token."""
    from dpokit.models.generate import image_token_ids

    model, processor = tiny_vision(family)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_token_ids(model) == [image_id]
    groups = image_prompts(tmp_path, processor)
    ids, pixels = [g.prompt_ids for g in groups], [g.pixels for g in groups]
    with torch.no_grad():  # the placeholder's head row along the first prompt's last hidden state: it wins there
        hidden = model(input_ids=torch.tensor([ids[0]]), output_hidden_states=True, **pixels[0]).hidden_states[-1]
        model.lm_head.weight[image_id] = hidden[0, -1] / hidden[0, -1].norm() * 50
    for temperature in (0.0, 1.0):
        samples = generate(model, processor.tokenizer, ids, SamplingParams(max_new_tokens=8, temperature=temperature),
                           [-1], pixels=pixels)
        assert all(image_id not in s.response_ids for s in samples)
    # Without the ban the placeholder is what the model prefers (so the check above is not vacuous).
    logits = model(input_ids=torch.tensor([ids[0]]), **pixels[0]).logits[0, -1]
    assert int(logits.argmax()) == image_id


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
LOGP_ABS = LOGP_TOL["atol"] + LOGP_TOL["rtol"] * 60
REWARD_ABS = BETA * 2 * LOGP_ABS


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
    # Its checkpoints hold the adapters: each frontier point is the start model with them; the last is final/
    # (merged), so the same samples and the same kl to fp32 round-off of a mean log-ratio (ulp ~1e-6 at |kl| < 10).
    from dpokit.evaluate.run import evaluate_run

    result = evaluate_run(run_dir, max_new_tokens=4, batch_size=6, log=None)
    assert [p["checkpoint"] for p in result["frontier"]] == ["reference", "step-1", "step-2", "step-3"]
    assert result["frontier"][-1]["kl"] == pytest.approx(result["kl"], abs=1e-5)


def test_text_reference_for_an_image_policy_is_refused(run):
    with pytest.raises(DpokitError, match="must be a vision-language model too"):
        load_scorer(run, ref="tiny-random-llama")


# ------------------------------------------------------------------------------------------------ dpokit score

def plain_row(image: str, question: str, **responses) -> dict:
    """The plain form: one ``image`` beside a text prompt."""
    return {"image": image, "prompt": question, **responses}


def test_score_cli_on_image_rows(run, capsys):
    """Each shape of score row, with images as training reads them: the TRL form's pair rewards equal the
    held-out rewards; the plain form (``image`` + text) scores as the same row in the TRL form; a ranking ranks."""
    data = run.parent / "data"
    pair = trl_row("vision/red-circle.png", "What colour is the shape?", "It is red.", "It is blue.")
    rows = [pair,
            plain_row("vision/red-circle.png", "What colour is the shape?", chosen="It is red.", rejected="It is blue."),
            plain_row("vision/red-circle.png", "What colour is the shape?", response="It is red."),
            plain_row("vision/blue-square.png", "What colour is the shape?",
                      responses=["It is red.", "It is blue.", "It is green."])]
    source = write_rows(data, rows, "score.jsonl")
    assert main(["score", "--model", str(run), str(source)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 4
    trl, plain, single, ranked = out
    # The same tokens, pixels and models, scored in other batches: LOGP_TOL per log-prob (see REWARD_ABS).
    assert plain["reward_chosen"] == pytest.approx(trl["reward_chosen"], abs=REWARD_ABS)
    assert plain["margin"] == pytest.approx(trl["margin"], abs=2 * REWARD_ABS)
    assert single["reward"] == pytest.approx(trl["reward_chosen"], abs=REWARD_ABS)
    assert trl["correct"] == (trl["margin"] > 0) and trl["images"] == ["vision/red-circle.png"]
    assert sorted(ranked["ranking"]) == [0, 1, 2]
    assert ranked["rewards"][ranked["ranking"][0]] == max(ranked["rewards"])
    # The image is read: the same answer to the same question about another image has another log-prob.
    assert abs(ranked["policy_logps"][0] - single["policy_logp"]) > 100 * LOGP_ABS, (ranked, single)


@pytest.mark.equivalence
def test_score_of_the_heldout_file_is_the_logged_eval(run):
    from dpokit.evaluate import score

    scored = score(run, run.parent / "data" / "prefs-vision-eval.jsonl")
    logged = last_eval(run)
    chosen = [r["reward_chosen"] for r in scored]
    assert len(chosen) == 6
    assert sum(chosen) / 6 == pytest.approx(logged["rewards/chosen"], abs=REWARD_ABS)
    assert sum(r["margin"] for r in scored) / 6 == pytest.approx(logged["rewards/margins"], abs=2 * REWARD_ABS)
    assert sum(r["correct"] for r in scored) / 6 == logged["rewards/accuracies"]


def test_score_bad_image_rows_say_file_and_line(run, capsys):
    data = run.parent / "data"
    (data / "broken.png").write_bytes(b"not an image at all")
    good = trl_row("vision/red-circle.png", "Colour?", "It is red.", "It is blue.")
    source = write_rows(data, [good, trl_row("broken.png", "Colour?", "It is red.", "It is blue.")], "bad.jsonl")
    assert main(["score", "--model", str(run), str(source)]) == 0
    captured = capsys.readouterr()
    out = [json.loads(line) for line in captured.out.splitlines()]
    assert "margin" in out[0] and out[1]["dropped"] == "image_unreadable" and "margin" not in out[1]
    assert f"{source}:2: not scored (image_unreadable" in captured.err
    cases = {"image_mismatch": {**good, "images": ["vision/red-circle.png", "vision/red-circle.png"]},
             "image_source": {**good, "images": [str((data / "vision" / "red-circle.png").resolve())]}}
    for reason, row in cases.items():
        bad = write_rows(data, [good, row], f"{reason}.jsonl")
        assert main(["score", "--model", str(run), str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"dpokit: error: {bad}:2: "), err


def test_text_model_refuses_image_rows(tmp_path):
    from dpokit.evaluate import Scorer, score_rows
    from dpokit.models.loading import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    scorer = Scorer(tiny_model(len(tok)), tiny_model(len(tok)), tok, BETA)
    row = trl_row("a.png", "Colour?", "red", "blue")
    with pytest.raises(DpokitError, match="rows.jsonl:3: a row with images; scoring it needs a vision-language"):
        score_rows(scorer, [row], ["rows.jsonl:3"])


# ------------------------------------------------------------------------------------------------- dpokit eval

class TextJudge:
    """A judge that reads text only and keeps what it was shown: the longer answer wins."""

    name = "text-judge"

    def __init__(self):
        self.prompts: list[str] = []

    def compare(self, prompts, first, second):
        from dpokit.rewards.judge import Verdict

        self.prompts.extend(prompts)
        return [Verdict("win" if len(a) > len(b) else "loss" if len(a) < len(b) else "tie")
                for a, b in zip(first, second)]


@pytest.fixture(scope="module")
def evaluated(run):
    from dpokit.evaluate.run import evaluate_run

    judge = TextJudge()
    result = evaluate_run(run, reward="length", judge=judge, temperatures=(0.0, 1.0), n_samples=2,
                          max_new_tokens=6, batch_size=4, log=None)
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    return result, samples, judge


@pytest.mark.equivalence
def test_eval_heldout_metrics_on_image_pairs_are_the_logged_ones(run, evaluated):
    result, _, _ = evaluated
    logged = last_eval(run)
    assert result["heldout_pairs"] == 6
    # A fraction k/6 either way, in float32 here (its ulp at <= 1 is 6e-8) and float64 in the metrics.
    assert result["rewards/accuracies"] == pytest.approx(logged["rewards/accuracies"], abs=1e-7)
    assert result["rewards/chosen"] == pytest.approx(logged["rewards/chosen"], abs=REWARD_ABS)
    assert result["rewards/margins"] == pytest.approx(logged["rewards/margins"], abs=2 * REWARD_ABS)


def test_eval_samples_are_drawn_with_the_images(run, evaluated):
    """The policy's greedy samples in samples.jsonl are what the sampler gives with each prompt's images; the
    KL is the mean log-ratio of the temperature-1 policy samples; a text judge sees the prompts' text only."""
    from dpokit.evaluate.vision import load_image_prompts

    result, samples, judge = evaluated
    n_prompts = result["n_prompts"]
    assert n_prompts == 6 and len(samples) == 6 * 2 * 2  # prompts x samples x temperatures
    scorer = load_scorer(run)
    cfg = scorer.config
    items, ids, pixels = load_image_prompts(cfg.data.eval, "train", None, scorer.processor, cfg.data, print)
    greedy = generate(scorer.policy, scorer.tokenizer, ids, SamplingParams(max_new_tokens=6, temperature=0),
                      pixels=pixels)
    at_0 = [s for s in samples if s["temperature"] == 0.0]
    assert [s["policy"] for s in at_0] == [g.text for g in greedy for _ in range(2)]
    assert [s["prompt"] for s in at_0[::2]] == [item.text for item in items]
    assert all(s["prompt"].startswith("[image]") for s in samples)
    # One question asked about three images: the same text (prompt and answer) would score the same without the
    # images; with them the implicit rewards differ by far more than round-off (LOGP_TOL per log-prob).
    same_text = [s["policy_implicit_reward"] for s in at_0 if "colour" in s["prompt"]
                 and s["policy"] == at_0[0]["policy"]]
    assert len(same_text) >= 4 and max(same_text) - min(same_text) > 10 * REWARD_ABS, at_0
    at_1 = [s for s in samples if s["temperature"] == 1.0]
    # The same log-ratios times beta, averaged before or after: fp32/float64 rounding, ~EPS32 * |kl| ~ 1e-7.
    assert sum(s["policy_implicit_reward"] for s in at_1) / len(at_1) == pytest.approx(BETA * result["kl"], abs=1e-6)
    assert result["images_note"].startswith("the prompts' images go to pi and pi_ref")
    assert judge.prompts and all("[image]" in p for p in judge.prompts)
    assert result["reward_fn"] == "length" and result["win_rate"] is not None


@pytest.mark.equivalence
def test_eval_frontier_on_a_vision_run(evaluated):
    result, _, _ = evaluated
    points = result["frontier"]
    assert [p["checkpoint"] for p in points] == ["reference", "step-1", "step-2", "step-3"]
    # step-3 holds the final weights: the same prompts, images, seed and batches give the same samples, so the
    # same kl to fp32 round-off of a mean log-ratio (|kl| <~ 10, ulp 1e-6) and the same word counts.
    assert points[-1]["kl"] == pytest.approx(result["kl"], abs=1e-5)
    assert points[-1]["reward"] == result["reward"]


def test_eval_refuses_image_prompts_for_a_text_run(tmp_path):
    from dpokit.evaluate.prompts import load_prompts

    source = write_rows(tmp_path, [{"image": "a.png", "prompt": "Colour?"}], "prompts.jsonl")
    with pytest.raises(DpokitError, match=r"prompts.jsonl:1: a row with images; sampling from it needs"):
        load_prompts(str(source))


@pytest.mark.parametrize("family", FAMILIES)
def test_image_prompt_file(tmp_path, family):
    """A prompts file of the plain form: the same question about two images is two prompts, a repeated row one;
    a row whose image cannot be read is left out with one line naming file:line."""
    from dpokit.evaluate.vision import load_image_prompts

    processor = tiny_vision(family)[1]
    for c, colour in enumerate(COLOURS[:2]):
        (tmp_path / f"img{c}.png").write_bytes(png(colour))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"image": "img0.png", "prompt": "Colour?"}, {"image": "img1.png", "prompt": "Colour?"},
            {"image": "img0.png", "prompt": "Colour?"}, {"image": "broken.png", "prompt": "Colour?"},
            {"prompt": "No image here."}]
    source = write_rows(tmp_path, rows, "prompts.jsonl")
    lines: list[str] = []
    items, ids, pixels = load_image_prompts(str(source), "train", None, processor, DATA, lines.append)
    assert [item.text for item in items] == ["[image]Colour?", "[image]Colour?", "No image here."]
    assert ids[0] == ids[1] and not torch.equal(pixels[0]["pixel_values"], pixels[1]["pixel_values"])
    assert pixels[2] == {}
    assert lines[0].startswith(f"{source}:4: prompt left out (image_unreadable")
