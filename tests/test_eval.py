"""``dpokit eval`` and ``dpokit report`` end to end on a tiny run, and the KL estimator against exact values:
zero when pi = pi_ref, and equal within a few standard errors to KL(pi || pi_ref) computed by enumerating every
sequence of a tiny-vocabulary model."""

import json
import math
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import dpokit
from conftest import chromium, close_chromium, train_tiny_run, write_pairs
from dpokit.cli import main
from dpokit.errors import DpokitError
from dpokit.evaluate import Scorer, evaluate_run
from dpokit.evaluate.run import parse_temperatures, sample_and_score
from dpokit.evaluate.stats import kl_estimate
from dpokit.models.generate import SamplingParams, generate
from dpokit.models.loading import tiny_model, tiny_tokenizer
from dpokit.rewards.judge import make_judge
from dpokit.training.metrics import read_metrics
from tolerances import LOGP_TOL

EVAL_ARGS = ["--max-new-tokens", "10", "--batch-size", "8"]


# ------------------------------------------------------------------------------------------------ KL, exactly

V = 6  # vocabulary: every response of at most 2 tokens can be enumerated (1 + 5 * 6 = 31 sequences)
EOS = 2
PROMPT = [1, 3, 4]


def sharp_model(seed: int) -> torch.nn.Module:
    """A tiny-vocabulary model with large weights, so pi and pi_ref differ a lot (KL of a few nats)."""
    model = tiny_model(V, seed=seed)
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


@torch.no_grad()
def exact_logp(model, response):
    ids = torch.tensor([PROMPT + list(response)])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(PROMPT) + i - 1, t]) for i, t in enumerate(response))


def test_kl_estimate_matches_exact_kl_on_a_tiny_vocabulary():
    pi, ref = sharp_model(0), sharp_model(1)
    tok = tiny_tokenizer()
    # Responses stop at EOS or after 2 tokens: (EOS,) or (a, b) with a != EOS.
    support = [(EOS,)] + [(a, b) for a in range(V) if a != EOS for b in range(V)]
    p = {y: math.exp(exact_logp(pi, y)) for y in support}
    q = {y: math.exp(exact_logp(ref, y)) for y in support}
    # float64 log-softmax (exact to ~1e-16 per row) summed over ~V^2 sequences: ~1e-13 from 1. A missing branch
    # (EOS first, or no EOS at step 2) would lose a whole probability, >> 1e-9.
    assert sum(p.values()) == pytest.approx(1.0, abs=1e-9) and sum(q.values()) == pytest.approx(1.0, abs=1e-9)
    exact = sum(p[y] * math.log(p[y] / q[y]) for y in support)  # KL(pi || pi_ref) = sum_y p log p/q

    n = 4000
    scorer = Scorer(pi, ref, tok, beta=0.1, max_length=16, max_prompt_length=8, batch_size=1000)
    samples = generate(pi, tok, [PROMPT] * n, SamplingParams(max_new_tokens=2, temperature=1.0, seed=0,
                                                             batch_size=1000), eos_ids=[EOS])
    responses = [s.response_ids for s in samples]
    policy_logps, _ = scorer.logps(pi, [PROMPT] * n, responses)
    ref_logps, _ = scorer.logps(ref, [PROMPT] * n, responses)
    estimate = kl_estimate((policy_logps - ref_logps).tolist())
    assert estimate.n == n and estimate.stderr > 0
    assert abs(estimate.mean - exact) < 4 * estimate.stderr, (estimate, exact)
    # The samples follow pi: empirical frequencies match the exact sequence probabilities.
    counts = {y: 0 for y in support}
    for r in responses:
        counts[tuple(r)] += 1
    total_variation = 0.5 * sum(abs(counts[y] / n - p[y]) for y in support)
    assert total_variation < 0.05


def test_kl_is_exactly_zero_when_pi_is_pi_ref():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=0).eval()
    twin = tiny_model(len(tok), seed=0).eval()  # equal weights, a different object
    scorer = Scorer(model, twin, tok, beta=0.1, max_length=64, max_prompt_length=32)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in ("The quick brown fox", "Question: why?")] * 4
    sampled = sample_and_score(scorer, model, prompts, ["p"] * len(prompts),
                               SamplingParams(max_new_tokens=8, temperature=1.0, seed=0), None, "")
    estimate = kl_estimate(sampled.logratios.tolist())
    assert (estimate.mean, estimate.stderr) == (0.0, 0.0)


@torch.no_grad()
def exact_kl_two_tokens(policy, reference, prompt, eos_ids):
    """KL(pi || pi_ref) over every response of at most 2 tokens (the first an EOS, or any two), by enumeration:
    sum_a p(a) [log p(a)/q(a) + [a not EOS] sum_b p(b|a) log p(b|a)/q(b|a)], in float64."""
    def log_probs(model, rows):
        return torch.log_softmax(model(input_ids=torch.tensor(rows)).logits[:, -1].double(), -1)

    p1, q1 = log_probs(policy, [prompt])[0], log_probs(reference, [prompt])[0]
    vocab = p1.shape[0]
    rows = [prompt + [a] for a in range(vocab)]
    p2, q2 = log_probs(policy, rows), log_probs(reference, rows)  # (V, V): row a holds log p(. | x, a)
    second = (p2.exp() * (p2 - q2)).sum(-1)  # (V,)
    second[list(eos_ids)] = 0.0  # a response that starts with EOS has no second token
    return float((p1.exp() * (p1 - q1 + second)).sum())


def test_eval_kl_at_top_p_is_estimated_from_draws_of_pi_itself(tmp_path):
    """``dpokit eval --top-p 0.9``: the reward's samples are nucleus samples, but the KL(pi || pi_ref) estimate
    must come from draws of pi itself; it lands within 3 standard errors of the exact KL of a 512-token
    vocabulary model with 2-token responses (enumerated: 512 x 512 sequences)."""
    from dpokit.evaluate.scoring import load_scorer
    from dpokit.models.generate import encode_prompts, eos_token_ids
    from dpokit.models.source import seeded_model

    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(write_pairs(tmp_path / "train.jsonl", 4)), "max_length": 64,
                    "max_prompt_length": 32},
           "train": {"max_steps": 1, "batch_size": 4, "progress": False, "save_every": None}}
    run_dir = dpokit.train(cfg, run_dir=str(tmp_path / "run"))
    # A policy far from pi_ref (a few nats): the trained weights, scaled up, written back as final/.
    scorer = load_scorer(run_dir)
    sharp = seeded_model(type(scorer.policy), scorer.policy.config, 7)
    with torch.no_grad():
        for param in sharp.parameters():
            if param.dim() == 2:
                param.mul_(8.0)
    sharp.save_pretrained(run_dir / "final")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Question 3: can you help me?"}) + "\n")

    result = evaluate_run(run_dir, prompts=str(prompts), n_samples=3000, max_new_tokens=2, top_p=0.9,
                          batch_size=500, frontier=False, log=None)
    scorer = load_scorer(run_dir)
    prompt = encode_prompts(scorer.tokenizer, ["Question 3: can you help me?"], scorer.max_prompt_length,
                            scorer.max_length)[0]
    exact = exact_kl_two_tokens(scorer.policy, scorer.reference, prompt,
                                eos_token_ids(scorer.policy, scorer.tokenizer))
    assert exact > 0.5  # pi is far from pi_ref, so draws from another distribution give another mean
    # 3 standard errors: a 0.27% two-sided miss for an unbiased mean of 3000 draws (near-normal by the CLT:
    # each draw's log-ratio is bounded on this finite support); the seed is fixed, so the verdict is too.
    assert abs(result["kl"] - exact) < 3 * result["kl_stderr"], (result["kl"], result["kl_stderr"], exact)


# ------------------------------------------------------------------------------------------------- tiny run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``train_tiny_run`` on plain-text pairs, a checkpoint at every step."""
    root = tmp_path_factory.mktemp("tiny")
    return train_tiny_run(root, write_pairs(root / "train.jsonl", 16),
                          write_pairs(root / "eval.jsonl", 5, offset=100), save_every=1)


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    code = main(["eval", str(tiny_run), "--reward", "length", "--temperatures", "0.5,1.0", "--n-samples", "2",
                 *EVAL_ARGS])
    assert code == 0
    return tiny_run


def test_eval_writes_the_contract(evaluated):
    result = json.loads((evaluated / "eval" / "eval.json").read_text())
    for key in ("kl", "kl_stderr", "reward", "reward_reference", "win_rate", "win_rate_ci", "rewards/accuracies",
                "rewards/margins", "temperatures", "frontier", "beta"):
        assert key in result, key
    assert result["beta"] == 0.1 and result["n_prompts"] == 5 and result["n_samples"] == 2
    assert result["reward_fn"] == "length" and result["judge"] == "length"
    assert [t["temperature"] for t in result["temperatures"]] == [0.5, 1.0]
    assert result["kl_stderr"] > 0
    lo, hi = result["win_rate_ci"]
    assert 0 <= lo <= result["win_rate"] <= hi <= 1
    at_1 = result["temperatures"][1]
    assert at_1["wins"] + at_1["ties"] + at_1["losses"] == 10 and at_1["malformed"] == 0

    samples = [json.loads(line) for line in (evaluated / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 * 2 * 2  # prompts x samples x temperatures
    row = samples[-1]
    for key in ("prompt", "policy", "reference", "policy_implicit_reward", "reference_implicit_reward",
                "policy_reward", "reference_reward", "judge", "temperature", "sample"):
        assert key in row, key
    assert row["policy_reward"] == len(row["policy"].split())  # the length reward, on the decoded text
    policy_at_1 = [s for s in samples if s["temperature"] == 1.0]
    # kl is the mean log-ratio of the temperature-1 policy samples; their implicit rewards are beta times it.
    mean_implicit = sum(s["policy_implicit_reward"] for s in policy_at_1) / len(policy_at_1)
    # The same log-ratios (|.| <~ 10) times beta, averaged before or after: fp32/float64 rounding of a product,
    # ~EPS32 * 1 ~ 1e-7. Another beta or other samples would be off by >= 1e-2.
    assert mean_implicit == pytest.approx(0.1 * result["kl"], abs=1e-6)


@pytest.mark.equivalence
def test_heldout_accuracy_matches_training(evaluated):
    """Scoring uses the training tokenization and log-prob function: the final held-out metrics agree."""
    result = json.loads((evaluated / "eval" / "eval.json").read_text())
    last = [r for r in read_metrics(evaluated / "metrics.jsonl") if r["split"] == "eval"][-1]
    assert result["heldout_pairs"] == 5
    # The same log-probs in other batch shapes: each reward is beta (0.1) times a difference of two fp32 sums of
    # |logp| <= ~60, each within LOGP_TOL = 1e-5 + 1e-6 * 60 (tolerances.py), a margin a difference of two
    # rewards. Accuracy counts margins > 0: exact unless a margin is within 1e-5 of 0 (they are >= 1e-3 here).
    reward_abs = 0.1 * 2 * (LOGP_TOL["atol"] + LOGP_TOL["rtol"] * 60)
    for key, tol in (("rewards/accuracies", 0), ("rewards/margins", 2 * reward_abs), ("rewards/chosen", reward_abs),
                     ("rewards/rejected", reward_abs)):
        assert result[key] == pytest.approx(last[key], abs=tol), key


@pytest.mark.equivalence
def test_frontier_has_one_point_per_checkpoint(evaluated):
    result = json.loads((evaluated / "eval" / "eval.json").read_text())
    points = result["frontier"]
    assert [p["checkpoint"] for p in points] == ["reference", "step-1", "step-2", "step-3"]
    assert points[0]["kl"] == 0.0 and points[0]["reward"] == result["reward_reference"]
    # step-3 holds the final weights; same prompts and seed give the same samples, hence the same numbers.
    # Same weights, prompts, seed and batch shapes: the same operations, so the same tokens and, to fp32
    # round-off of a mean log-ratio (|kl| <~ 10, ulp 1e-6), the same kl; the length reward counts words: exact.
    assert points[-1]["kl"] == pytest.approx(result["kl"], abs=1e-5)
    assert points[-1]["reward"] == pytest.approx(result["reward"], abs=1e-9)
    assert all("reward" in p and p["kl_stderr"] is not None for p in points)


def test_eval_with_an_llm_judge_and_chosen_baseline(tiny_run, tmp_path, monkeypatch, capsys):
    """eval.json counts what the win rate leaves out: a malformed reply, a comparison that failed after its
    retries, and the retried requests; samples.jsonl marks the failed comparison."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.headers.get("Authorization"), body["model"]))
            # One request at a time, in order: comparison 1 is answered on its second attempt, comparison 2
            # never (503, then 500), comparison 3's reply names neither answer; the rest pick the first shown.
            n = len(seen)
            status, text = {1: (503, None), 3: (503, None), 4: (500, None), 5: (200, "no idea")}.get(
                n, (200, "Comparison: fine.\nMore helpful: A"))
            data = json.dumps({"choices": [{"message": {"content": text}}]} if text else {"error": "busy"}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            if status == 503:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "k-1")
    judge = make_judge(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge-m", "JUDGE_KEY_FOR_TEST")
    judge.concurrency, judge.retries, judge.backoff = 1, 1, 0.0
    try:
        out = tmp_path / "judged"
        result = evaluate_run(tiny_run, judge=judge, baseline="chosen", frontier=False, out_dir=out,
                              max_new_tokens=8, log=None)
    finally:
        server.shutdown()
        server.server_close()
    assert set(seen) == {("Bearer k-1", "judge-m")} and len(seen) == 7  # 5 comparisons, 2 retried
    at_1 = result["temperatures"][0]
    assert (at_1["malformed"], at_1["failed"], at_1["judge_retries"]) == (1, 1, 2)
    assert at_1["wins"] + at_1["ties"] + at_1["losses"] == 3
    assert json.loads((out / "eval.json").read_text())["temperatures"][0]["failed"] == 1
    assert result["judge"] == "llm:judge-m" and result["baseline"] == "chosen" and "frontier" not in result
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(r["chosen"].startswith(" ") for r in rows)  # the dataset's chosen responses were the baseline
    assert [r["judge"] for r in rows][1:3] == ["failed", "malformed"]
    from dpokit.evaluate.run import print_summary

    print_summary(result)
    assert "judge: malformed / failed / retries" in capsys.readouterr().out


def test_eval_custom_reward_and_chat_prompts(tiny_run, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def vowels(prompt, response):\n"
                                            "    return sum(c in 'aeiou' for c in response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "Write a haiku about the sea."}]}) + "\n"
                       + json.dumps({"prompt": "Plain text prompt"}) + "\n")
    result = evaluate_run(tiny_run, prompts=str(prompts), reward="my_rewards:vowels", frontier=False,
                          out_dir=tmp_path / "out", max_new_tokens=6, log=None)
    assert result["n_prompts"] == 2 and result["reward_fn"] == "my_rewards:vowels"
    assert result["reward"] is not None


def test_eval_errors_are_one_line(tiny_run, tmp_path, capsys):
    assert main(["eval", str(tiny_run), "--reward", "sentimnet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reward 'sentimnet': unknown" in err
    assert main(["eval", str(tiny_run), "--reward", "nowhere_module:fn"]) == 2
    assert "cannot import nowhere_module" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--temperatures", "hot,cold"]) == 2
    assert "--temperatures" in capsys.readouterr().err
    with pytest.raises(DpokitError):
        parse_temperatures("-1")
    assert parse_temperatures("0.25, 0.5,1") == [0.25, 0.5, 1.0]


# --------------------------------------------------------------------------------------- report in a browser

def test_report_opens_in_chromium_and_shows_the_plots(evaluated, tmp_path):
    assert main(["report", str(evaluated)]) == 0
    page = evaluated / "report.html"
    assert page.is_file()
    driver, profile = chromium("MAP * ~NOTFOUND", "1280,1000")
    try:
        # The console check has teeth: a page that logs an error is caught.
        driver.get("data:text/html,<script>console.error('planted')</script>")
        assert any("planted" in e["message"] for e in driver.get_log("browser"))

        driver.get(page.as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
        assert driver.execute_script("return document.querySelectorAll('figure.plot svg').length") >= 7
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(height, 3000))
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
    finally:
        close_chromium(driver, profile)
    if os.environ.get("DPOKIT_SAVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["DPOKIT_SAVE_SCREENSHOT"])

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    _, counts = np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2], return_counts=True)
    assert len(counts) > 1000  # text, plots and their anti-aliasing: far from a blank page
    assert counts.max() / len(pixels) < 0.9  # the background does not fill the page

    def near(rgb, tolerance=30):
        return int((np.abs(pixels - np.array(rgb)).max(axis=1) <= tolerance).sum())

    # The plots are drawn: the chosen (green) and rejected (red) curve colors are on screen.
    assert near((0x2B, 0x8A, 0x3E)) > 200 and near((0xC9, 0x2A, 0x2A)) > 200
