"""Judges and win rates: an OpenAI-compatible judge served by a local HTTP server started here (127.0.0.1), answer
order randomized, malformed replies counted, ties half; a judge that misbehaves (sleeps past the timeout, closes
the connection, answers 429 or 503 with Retry-After, sends garbage or its reply a byte at a time) is retried,
counted, and never hangs; reward judges; Wilson intervals; reward registry."""

import email.utils
import json
import re
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpokit.errors import DpokitError
from dpokit.evaluate.stats import WinRate, kl_estimate, mean_stderr, wilson_interval
from dpokit.rewards import get_reward, length, sentiment
from dpokit.rewards.judge import (
    JudgeReward,
    LLMJudge,
    RewardJudge,
    make_judge,
    parse_reply,
    retry_after_seconds,
)

ANSWERS = re.compile(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\nFIRST", re.S)


class Judge:
    """A scripted judge server. ``policy`` decides each reply from (a, b, n), n counting requests from 1: a
    ``(status, payload)`` or ``(status, payload, headers)``, or a misbehaviour: ``("close",)`` drops the connection
    without a reply, ``("sleep", seconds, reply)`` answers late, ``("trickle", seconds)`` sends a reply one byte
    every ``seconds``. Every request is recorded."""

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
                    n = len(judge.requests)
                action = judge.policy(a, b, n)
                try:
                    self.act(action)
                except OSError:  # the client gave up on us (a timeout): expected here
                    pass

            def act(self, action):
                if action[0] == "close":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = action[2]
                if action[0] == "trickle":
                    data = json.dumps(reply("More helpful: A")[1]).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    for byte in data:  # each byte well within the client's socket timeout
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(action[1])
                    return
                status, payload, *extra = action
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
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
    """A chat completion whose text names neither answer is malformed: counted, left out of the rate, and not
    retried (at temperature 0 the judge would say the same again)."""
    replies = [
        reply("I cannot decide between them."),
        reply("More helpful: C"),
        reply(""),
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
        verdicts = judge.compare(PROMPTS[:9], POLICY[:9], BASELINE[:9])
    assert len(server.requests) == 9  # none retried
    outcomes = [v.outcome for v in verdicts]
    assert outcomes[:3] == ["malformed"] * 3
    assert outcomes[3] == "tie"
    assert outcomes[4] == ("win" if verdicts[4].swapped else "loss")  # "B" is the policy only when swapped
    assert outcomes[5:] == ["win"] * 4
    rate = WinRate.from_outcomes(outcomes)
    assert (rate.malformed, rate.failed, rate.ties, rate.judged) == (3, 0, 1, 6)
    assert rate.rate == pytest.approx((rate.wins + 0.5) / 6)
    assert rate.to_dict()["malformed"] == 3


# ------------------------------------------------------------------------------------ a judge that misbehaves

def within(seconds, fn):
    """fn(), failing instead of hanging when it takes longer than ``seconds`` (a generous hang guard)."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (raised again below, in the test's thread)
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def flaky_judge(url, retries=2, **kwargs):
    """A judge with small timeouts whose retry waits are recorded, not slept."""
    judge = LLMJudge(url, "m", concurrency=1, timeout=0.5, retries=retries, backoff=0.01, max_wait=30,
                     **kwargs)
    judge.waits = []
    judge.sleep = judge.waits.append
    return judge


PAST = email.utils.format_datetime(datetime(2001, 1, 1, tzinfo=timezone.utc), usegmt=True)
MISBEHAVIOURS = {
    # name: (what the server does, why the client gave up on it, the waits before the two retries)
    "sleeps past the timeout": (("sleep", 3, reply("More helpful: A")), "no reply within 0.5 s", [0.01, 0.02]),
    "closes the connection": (("close",), "connection lost", [0.01, 0.02]),
    "429 with Retry-After": ((429, {"error": "slow down"}, {"Retry-After": "7"}), "HTTP 429", [7.0, 7.0]),
    "503 with Retry-After over the cap": ((503, {"error": "busy"}, {"Retry-After": "120"}), "HTTP 503", [30, 30]),
    "503 with a Retry-After date": ((503, {"error": "busy"}, {"Retry-After": PAST}), "HTTP 503", [0.0, 0.0]),
    "503 without Retry-After": ((503, {"error": "busy"}), "HTTP 503", [0.01, 0.02]),
    "garbage JSON": ((200, b"<html>502 Bad Gateway</html>"), "no chat completion", [0.01, 0.02]),
    "no choices": ((200, {"choices": []}), "no chat completion", [0.01, 0.02]),
    "trickles its reply": (("trickle", 0.1), "no reply within 0.5 s", [0.01, 0.02]),
}


@pytest.mark.parametrize("name", MISBEHAVIOURS)
def test_a_misbehaving_judge_is_retried_with_backoff_and_the_retries_counted(name):
    """Twice misbehaving, then a good answer: the verdict stands, with 2 retries after the waits Retry-After
    asked for (capped at max_wait) or else the doubling backoff."""
    action, _, waits = MISBEHAVIOURS[name]
    with Judge(lambda a, b, n: action if n <= 2 else prefers_good(a, b, n)) as server:
        judge = flaky_judge(server.url)
        verdicts = within(60, lambda: judge.compare(PROMPTS[:2], POLICY[:2], BASELINE[:2]))
    assert [v.outcome for v in verdicts] == ["win", "win"]
    assert [v.retries for v in verdicts] == [2, 0] and len(server.requests) == 4
    assert judge.waits == pytest.approx(waits)


@pytest.mark.parametrize("name", MISBEHAVIOURS)
def test_a_comparison_that_keeps_failing_is_a_counted_failure_scored_half(name):
    """A prompt the judge never answers: after its retries the comparison is ``failed`` (why, and how many
    retries, recorded), left out of the win rate, scored 0.5 as a reward and counted; the others are judged."""
    action, why, _ = MISBEHAVIOURS[name]
    with Judge(lambda a, b, n: action if "answer 1" in a + b else prefers_good(a, b, n)) as server:
        judge = flaky_judge(server.url, retries=1)
        verdicts = within(60, lambda: judge.compare(PROMPTS[:3], POLICY[:3], BASELINE[:3]))
        reward = JudgeReward(flaky_judge(server.url, retries=1), dict(zip(PROMPTS, BASELINE)))
        scores = within(60, lambda: reward.batch(PROMPTS[:3], POLICY[:3]))
    assert [v.outcome for v in verdicts] == ["win", "failed", "win"]
    assert [v.retries for v in verdicts] == [0, 1, 0] and why in verdicts[1].reply
    rate = WinRate.from_outcomes(v.outcome for v in verdicts)
    assert (rate.wins, rate.failed, rate.judged, rate.rate) == (2, 1, 2, 1.0)
    assert scores == [1.0, 0.5, 1.0]
    assert reward.counts() == {"judge/malformed": 0, "judge/failures": 1, "judge/retries": 1}
    reward.reset_counts()
    assert reward.counts() == {"judge/malformed": 0, "judge/failures": 0, "judge/retries": 0}


def test_a_judge_that_is_down_is_one_error_line_not_a_hang():
    # Every comparison of a batch failed: every verdict would be a failure.
    with Judge(lambda a, b, n: (503, {"error": "down"}, {"Retry-After": "1"})) as server:
        judge = flaky_judge(server.url, retries=1)
        with pytest.raises(DpokitError, match=r"all 3 requests failed, each after 1 retries \(last: HTTP 503"):
            within(60, lambda: judge.compare(PROMPTS[:3], POLICY[:3], BASELINE[:3]))
    # Failures in a row stop the batch early rather than waiting out every request.
    with Judge(lambda a, b, n: ("close",)) as server:
        judge = flaky_judge(server.url, retries=1, max_failures_in_a_row=3)
        with pytest.raises(DpokitError, match=r"3 requests in a row failed.*connection lost"):
            within(60, lambda: judge.compare(PROMPTS, POLICY, BASELINE))
    assert len(server.requests) == 3 * 2  # 3 comparisons of 2 attempts each, then nothing more was sent
    # One success in between resets the count.
    with Judge(lambda a, b, n: prefers_good(a, b, n) if n % 4 == 0 else (500, {"error": "x"})) as server:
        judge = flaky_judge(server.url, retries=1, max_failures_in_a_row=2)
        verdicts = within(60, lambda: judge.compare(PROMPTS[:6], POLICY[:6], BASELINE[:6]))
    assert [v.outcome for v in verdicts] == ["failed", "win"] * 3


def test_retry_after_seconds():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("1.5") == 1.5
    assert retry_after_seconds("-4") == 0.0 and retry_after_seconds(PAST) == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("nan") is None and retry_after_seconds("") is None
    later = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=600), usegmt=True)
    assert 500 < retry_after_seconds(later) <= 600


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
    assert len(server.requests) == 1  # no retry can fix a refused key
    # A port with nothing listening: bind one, close it, connect (retried, as a restarting judge would be).
    with Judge(prefers_good) as server:
        url = server.url
    with pytest.raises(DpokitError, match=r"the request failed, each after 2 retries \(last: cannot connect"):
        flaky_judge(url).compare(PROMPTS[:1], POLICY[:1], BASELINE[:1])
    with pytest.raises(DpokitError, match="cannot connect"):
        LLMJudge("http://no-such-host.invalid/v1", "m").compare(PROMPTS[:1], POLICY[:1], BASELINE[:1])
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
