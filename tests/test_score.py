"""The policy as a reward model: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), checked against log-probs
computed here with the models' own forward, on rows, rankings and pairs, from a run directory and from folders."""

import json

import pytest
import torch

from dpokit.config import load_config, save_config
from dpokit.errors import DataError, DpokitError
from dpokit.evaluate import Scorer, load_scorer, score, score_rows
from dpokit.models.loading import tiny_model, tiny_tokenizer
from tolerances import LOGP_TOL

BETA = 0.25
# Log-probs of these rows are fp32 sums of <= 20 tokens with |sum| <= 150, computed in other batch shapes than the
# float64 sums by hand below: LOGP_TOL (tolerances.py) gives 1e-5 + 1e-6 * 150 per log-prob (measured <= 8.7e-6
# under AVX-512, AVX2 and scalar kernels). A reward is BETA times the difference of two of them.
LOGP_ABS = LOGP_TOL["atol"] + LOGP_TOL["rtol"] * 150
REWARD_ABS = BETA * 2 * LOGP_ABS  # 8e-5; a wrong log-prob (a padding leak, a lost token) moves a reward by > 1e-3




@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def trained_like(vocab: int) -> torch.nn.Module:
    """The tiny model's starting weights (the reference) plus a fixed perturbation: a stand-in policy."""
    model = tiny_model(vocab, seed=0)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def scorer(tok):
    return Scorer(trained_like(len(tok)), tiny_model(len(tok), seed=0).eval(), tok, BETA, max_length=64,
                  max_prompt_length=32, batch_size=3)


@torch.no_grad()
def logp_by_hand(model, prompt_ids, response_ids):
    """sum_t log pi(y_t | x, y_<t) with one plain forward pass of an unpadded sequence."""
    ids = torch.tensor([prompt_ids + response_ids])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    n = len(prompt_ids)
    return sum(float(logprobs[n + i - 1, token]) for i, token in enumerate(response_ids))


def tokens(tok, prompt, response):
    """The training tokenization for this tokenizer: prompt alone; response = the joint text's remaining tokens
    plus EOS (no BOS: the tiny tokenizer adds none)."""
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    joint = tok(prompt + response, add_special_tokens=False).input_ids
    assert joint[:len(prompt_ids)] == prompt_ids
    return prompt_ids, joint[len(prompt_ids):] + [tok.eos_token_id]


ROWS = [
    {"prompt": "Question: what is the capital of France?", "response": " Paris is the capital of France."},
    {"prompt": "Please write a haiku about the sea.", "response": " Waves fold into foam", "id": 7},
    {"prompt": "I", "response": " loved this movie"},
    {"prompt": "How do I bake bread?", "response": " Mix flour, water, salt and yeast, knead, let it rise."},
]


@pytest.mark.equivalence
def test_score_is_beta_times_the_log_ratio(scorer, tok):
    scored = score_rows(scorer, ROWS)
    for row, out in zip(ROWS, scored):
        prompt_ids, response_ids = tokens(tok, row["prompt"], row["response"])
        policy = logp_by_hand(scorer.policy, prompt_ids, response_ids)
        reference = logp_by_hand(scorer.reference, prompt_ids, response_ids)
        assert out["policy_logp"] == pytest.approx(policy, abs=LOGP_ABS)
        assert out["ref_logp"] == pytest.approx(reference, abs=LOGP_ABS)
        assert out["reward"] == pytest.approx(BETA * (policy - reference), abs=REWARD_ABS)
        assert out["response_tokens"] == len(response_ids)
        assert {k: out[k] for k in row} == row  # the input fields come back untouched
    assert abs(scored[0]["reward"]) > 1e-3  # the policy differs from the reference: the check is not 0 == 0


@pytest.mark.equivalence
def test_scores_do_not_depend_on_batching(scorer, tok):
    alone = [score_rows(scorer, [row])[0]["reward"] for row in ROWS]
    batched = [row["reward"] for row in score_rows(scorer, ROWS)]
    assert batched == pytest.approx(alone, abs=REWARD_ABS)


def test_identical_models_score_zero(tok):
    model = tiny_model(len(tok), seed=0).eval()
    same = Scorer(model, model, tok, BETA, max_length=64, max_prompt_length=32)
    assert all(row["reward"] == 0.0 for row in score_rows(same, ROWS))


@pytest.mark.equivalence
def test_ranking_and_pairs(scorer):
    responses = [" Paris is the capital of France.", " a rude reply", " I loved this movie", " 1000"]
    ranked = score_rows(scorer, [{"prompt": "Question: what is the capital of France?", "responses": responses}])[0]
    singles = score_rows(scorer, [{"prompt": "Question: what is the capital of France?", "response": r}
                                  for r in responses])
    assert ranked["rewards"] == pytest.approx([s["reward"] for s in singles], abs=REWARD_ABS)
    assert sorted(ranked["ranking"]) == [0, 1, 2, 3]
    assert [ranked["rewards"][i] for i in ranked["ranking"]] == sorted(ranked["rewards"], reverse=True)
    pair = score_rows(scorer, [{"prompt": "Question: what is the capital of France?", "chosen": responses[0],
                                "rejected": responses[1]}])[0]
    assert pair["reward_chosen"] == pytest.approx(singles[0]["reward"], abs=REWARD_ABS)
    assert pair["margin"] == pytest.approx(singles[0]["reward"] - singles[1]["reward"], abs=2 * REWARD_ABS)
    assert pair["correct"] == (pair["margin"] > 0)


@pytest.mark.equivalence
def test_chat_rows_use_the_chat_template(scorer, tok):
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    chat = score_rows(scorer, [{"prompt": messages, "response": "Waves fold into foam"}])[0]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False).input_ids
    joint = tok(text + "Waves fold into foam<|im_end|>", add_special_tokens=False).input_ids
    response_ids = joint[len(prompt_ids):]
    assert response_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    expected = BETA * (logp_by_hand(scorer.policy, prompt_ids, response_ids)
                       - logp_by_hand(scorer.reference, prompt_ids, response_ids))
    assert chat["reward"] == pytest.approx(expected, abs=REWARD_ABS)


def test_bad_rows_name_the_row(scorer):
    with pytest.raises(DataError, match="row 1: missing key 'prompt'"):
        score_rows(scorer, [ROWS[0], {"response": "x"}])
    with pytest.raises(DataError, match="row 0: expected 'prompt' with 'response'"):
        score_rows(scorer, [{"prompt": "x", "answer": "y"}])
    with pytest.raises(DataError, match="'response' must be a string"):
        score_rows(scorer, [{"prompt": "x", "response": 3}])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    """A run directory as training leaves it (config.yaml + final/), without spending time on training."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_config({"model": {"name_or_path": "tiny-random-llama"}, "loss": {"beta": BETA},
                       "data": {"max_length": 64, "max_prompt_length": 32}, "run_dir": str(root)})
    save_config(cfg, root / "config.yaml")
    policy = trained_like(len(tok))
    policy.save_pretrained(root / "final")
    tok.save_pretrained(root / "final")
    return root


def test_score_from_a_run_directory_writes_jsonl(run_dir, scorer, tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "scored.jsonl"
    scored = score(run_dir, source, out=out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == scored and len(lines) == len(ROWS)
    expected = score_rows(scorer, ROWS)  # same weights, same beta (from config.yaml), same reference
    assert [r["reward"] for r in lines] == pytest.approx([r["reward"] for r in expected], abs=REWARD_ABS)
    # --beta overrides the run's beta; rewards scale with it.
    doubled = score(run_dir, source, beta=2 * BETA)
    assert [r["reward"] for r in doubled] == pytest.approx([2 * r["reward"] for r in expected], abs=2 * REWARD_ABS)


@pytest.mark.equivalence
def test_score_from_plain_folders_needs_ref(run_dir, scorer):
    with pytest.raises(DpokitError, match="--ref: required"):
        load_scorer(run_dir / "final")
    plain = load_scorer(run_dir / "final", ref="tiny-random-llama", beta=BETA, max_length=64,
                        max_prompt_length=32)
    got = score_rows(plain, ROWS[:2])
    assert [r["reward"] for r in got] == pytest.approx([r["reward"] for r in score_rows(scorer, ROWS[:2])],
                                                       abs=REWARD_ABS)
    with pytest.raises(DpokitError, match="does not exist"):
        load_scorer(run_dir / "nope", ref="tiny-random-llama")


def test_cli_score(run_dir, tmp_path, capsys):
    from dpokit.cli import main

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    assert main(["score", "--model", str(run_dir), str(source)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all("reward" in line for line in lines)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(run_dir), "--beta", "0.5", "--out", str(out), str(source)]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert main(["score", "--model", str(run_dir / "final"), str(source)]) == 2
    assert "--ref: required" in capsys.readouterr().err
