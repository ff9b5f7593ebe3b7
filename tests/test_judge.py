"""Judges and win rates: an OpenAI-compatible judge served by a local HTTP server started here (127.0.0.1), answer
order randomized, malformed replies counted, ties half; reward judges; Wilson intervals; reward registry."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpokit.errors import DpokitError
from dpokit.evaluate.stats import WinRate, kl_estimate, mean_stderr, wilson_interval
from dpokit.rewards import get_reward, length, sentiment
from dpokit.rewards.judge import LLMJudge, RewardJudge, make_judge, parse_reply

ANSWERS = re.compile(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\nFIRST", re.S)


class Judge:
    """A scripted judge server. ``policy`` decides each reply from (a, b); every request is recorded."""

    def __init__(self, policy):
        self.policy = policy
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                a, b = ANSWERS.search(body["messages"][0]["content"]).groups()
                with judge.lock:
                    judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                           "model": body["model"], "a": a, "b": b})
                status, payload = judge.policy(a, b, len(judge.requests))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def reply(text):
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}


def prefers_good(a, b, n):
    """A fair judge: the answer containing GOOD wins wherever it is shown."""
    choice = "A" if "GOOD" in a else "B"
    return reply(f"Comparison: one of them is good.\nMore helpful: {choice}")


N = 40
PROMPTS = [f"question {i}" for i in range(N)]
POLICY = [f"GOOD answer {i}" for i in range(N)]
BASELINE = [f"meh answer {i}" for i in range(N)]


def test_order_is_randomized_and_mapped_back():
    with Judge(prefers_good) as server:
        verdicts = LLMJudge(server.url, "judge-model", seed=1).compare(PROMPTS, POLICY, BASELINE)
    assert [v.outcome for v in verdicts] == ["win"] * N  # mapped back through the shuffled order
    shown_first = ["GOOD" in r["a"] for r in server.requests]
    assert 10 <= sum(shown_first) <= 30  # both orders used, about half each
    assert all(r["path"] == "/v1/chat/completions" and r["model"] == "judge-model" for r in server.requests)
    # Each verdict records where the policy's answer was shown; the server saw the same.
    by_answer = {r["a"] if "GOOD" in r["a"] else r["b"]: "GOOD" in r["b"] for r in server.requests}
    assert [v.swapped for v in verdicts] == [by_answer[p] for p in POLICY]
    # Seeded: the same seed draws the same orders.
    with Judge(prefers_good) as again:
        LLMJudge(again.url, "judge-model", seed=1).compare(PROMPTS, POLICY, BASELINE)
    assert sorted(r["a"] for r in again.requests) == sorted(r["a"] for r in server.requests)


def test_position_bias_is_cancelled_by_randomization():
    with Judge(lambda a, b, n: reply("More helpful: A")) as server:
        verdicts = LLMJudge(server.url, "m", seed=0).compare(PROMPTS, POLICY, BASELINE)
    rate = WinRate.from_outcomes(v.outcome for v in verdicts)
    assert rate.wins == sum(not v.swapped for v in verdicts)  # it always picks whatever is shown first
    assert 0.25 <= rate.rate <= 0.75
    lo, hi = rate.ci
    assert lo < 0.5 < hi


def test_malformed_replies_are_counted_not_fatal():
    replies = [
        (200, b"this is not json"),
        (200, {"no_choices": True}),
        (200, {"choices": []}),
        reply("I cannot decide between them."),
        reply("More helpful: C"),
        (200, {"choices": [{"message": {"content": None}}]}),
        reply("Comparison: equally good.\nMore helpful: tie"),
        reply("B"),
    ]

    def script(a, b, n):
        if n <= len(replies):
            return replies[n - 1]
        return prefers_good(a, b, n)

    judge = LLMJudge("http://127.0.0.1:1/v1", "m", concurrency=1)  # one at a time: replies in order
    with Judge(script) as server:
        judge.endpoint = server.url + "/chat/completions"
        verdicts = judge.compare(PROMPTS[:12], POLICY[:12], BASELINE[:12])
    outcomes = [v.outcome for v in verdicts]
    assert outcomes[:6] == ["malformed"] * 6
    assert outcomes[6] == "tie"
    assert outcomes[7] == ("win" if verdicts[7].swapped else "loss")  # "B" is the policy only when swapped
    assert outcomes[8:] == ["win"] * 4
    rate = WinRate.from_outcomes(outcomes)
    assert (rate.malformed, rate.ties, rate.judged) == (6, 1, 6)
    assert rate.rate == pytest.approx((rate.wins + 0.5) / 6)
    assert rate.to_dict()["malformed"] == 6


def test_server_errors_are_retried_then_counted():
    failures = {"left": 2}

    def flaky(a, b, n):
        if failures["left"]:
            failures["left"] -= 1
            return 503, {"error": "busy"}
        return prefers_good(a, b, n)

    with Judge(flaky) as server:
        verdicts = LLMJudge(server.url, "m", concurrency=1, retries=2).compare(PROMPTS[:2], POLICY[:2],
                                                                                BASELINE[:2])
    assert [v.outcome for v in verdicts] == ["win", "win"]
    with Judge(lambda a, b, n: (500, {"error": "down"})) as server:
        verdicts = LLMJudge(server.url, "m", retries=0).compare(PROMPTS[:3], POLICY[:3], BASELINE[:3])
    assert [v.outcome for v in verdicts] == ["malformed"] * 3


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DPOKIT_TEST_JUDGE_KEY", "sk-test-123")
    with Judge(prefers_good) as server:
        LLMJudge(server.url, "m", api_key_env="DPOKIT_TEST_JUDGE_KEY").compare(PROMPTS[:2], POLICY[:2],
                                                                               BASELINE[:2])
    assert {r["auth"] for r in server.requests} == {"Bearer sk-test-123"}
    monkeypatch.delenv("DPOKIT_TEST_JUDGE_KEY")
    with pytest.raises(DpokitError, match="DPOKIT_TEST_JUDGE_KEY is not set"):
        LLMJudge("http://127.0.0.1:9/v1", "m", api_key_env="DPOKIT_TEST_JUDGE_KEY")


def test_setup_errors_are_one_line():
    with Judge(lambda a, b, n: (401, {"error": "bad key"})) as server:
        with pytest.raises(DpokitError, match="HTTP 401"):
            LLMJudge(server.url, "m").compare(PROMPTS[:1], POLICY[:1], BASELINE[:1])
    # A port with nothing listening: bind one, close it, connect.
    with Judge(prefers_good) as server:
        url = server.url
    with pytest.raises(DpokitError, match="cannot connect"):
        LLMJudge(url, "m").compare(PROMPTS[:1], POLICY[:1], BASELINE[:1])
    with pytest.raises(DpokitError, match="--judge-model"):
        make_judge("http://127.0.0.1:9/v1", None)
    with pytest.raises(DpokitError, match="http"):
        make_judge("127.0.0.1:9", "m")
    assert make_judge(None, None) is None


def test_parse_reply():
    assert parse_reply("Comparison: A is kinder.\nMore helpful: A") == "A"
    assert parse_reply('Comparison: x\nMore helpful: "B"') == "B"
    assert parse_reply("More helpful: **b**") == "B"
    assert parse_reply("More helpful: A\n... on reflection\nMore helpful: B") == "B"  # the last one counts
    assert parse_reply(" A. ") == "A"
    assert parse_reply("tie") == "tie"
    assert parse_reply("Both are fine.") is None
    assert parse_reply("More helpful: neither") is None
    assert parse_reply("") is None


def test_reward_judge_counts_ties_half():
    judge = RewardJudge(length, "length")
    verdicts = judge.compare(["p"] * 3, ["a b c", "a", "a b"], ["a", "a b c", "x y"])
    assert [v.outcome for v in verdicts] == ["win", "loss", "tie"]
    assert WinRate.from_outcomes(v.outcome for v in verdicts).rate == pytest.approx(0.5)


def test_wilson_interval_matches_hand_computed_values():
    lo, hi = wilson_interval(5, 10)
    # Closed-form float64 (Python floats); abs 1e-4 is the 4 digits the golden values are written with.
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1 and lo == pytest.approx(0.7225, abs=1e-4)
    assert all(v != v for v in wilson_interval(0, 0))  # undefined without comparisons: NaN, null in JSON
    assert WinRate().to_dict()["win_rate"] is None


def test_mean_stderr_and_kl_of_identical_models():
    est = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert est.mean == 2.5 and est.stderr == pytest.approx((5 / 3) ** 0.5 / 2)
    zero = kl_estimate([0.0] * 50)
    assert (zero.mean, zero.stderr, zero.n) == (0.0, 0.0, 50)


def test_reward_registry():
    assert sentiment("", "I love this wonderful film") > 0.5
    assert sentiment("", "I hate this awful film") < -0.5
    assert length("ignored prompt", "three words here") == 3
    assert get_reward("sentiment") is sentiment
    assert get_reward("dpokit.rewards:length") is length
    with pytest.raises(DpokitError, match="unknown; built-in rewards are length, sentiment"):
        get_reward("sentimnet")
    with pytest.raises(DpokitError, match="cannot import no_such_module_xyz"):
        get_reward("no_such_module_xyz:f")
    with pytest.raises(DpokitError, match="has no attribute 'nope'"):
        get_reward("dpokit.rewards:nope")
    with pytest.raises(DpokitError, match="not callable"):
        get_reward("dpokit.rewards:REWARDS")


def test_reward_from_a_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def exclaim(prompt, response):\n    return response.count('!')\n")
    fn = get_reward(f"{path}:exclaim")
    assert fn("p", "wow!!") == 2
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_xyz\n")
    with pytest.raises(DpokitError, match="ModuleNotFoundError"):
        get_reward(f"{broken}:f")
    with pytest.raises(DpokitError, match="not found"):
        get_reward(f"{tmp_path / 'missing.py'}:f")
