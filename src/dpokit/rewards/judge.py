"""Judges: which of two responses to a prompt is better.

- :class:`RewardJudge` compares ground-truth rewards r*(x, y_a) and r*(x, y_b) (equal rewards are a tie);
- :class:`LLMJudge` asks a language model over any OpenAI-compatible HTTP endpoint
  (``POST {url}/chat/completions``), with the paper's GPT-4 prompt (Rafailov et al. 2023, Appendix C.2).

An LLM judge prefers whichever answer it reads first (position bias), so every comparison shows the two
answers in an order drawn at random from a seeded generator, and the verdict is mapped back.

What can go wrong with a judge over the network, and what happens then:

- a reply that names neither answer: *malformed*, counted and left out of the win rate (a reward of 0.5). Not
  retried: at temperature 0 the judge would say the same again;
- a timeout, a dropped or refused connection, HTTP 408/425/429/5xx, or a body that is no chat completion
  (garbage JSON, no choices, over 1 MiB): retried up to ``retries`` times, after the server's ``Retry-After``
  (seconds or a date) or else an exponential backoff, either at most ``max_wait`` seconds. Each attempt ends
  within ``timeout`` seconds, however slowly the server sends (its socket is shut at the deadline), so one
  comparison takes at most ``(retries + 1) * timeout + retries * max_wait`` seconds. Retries are counted;
- a comparison still without a reply after its retries: *failed*, counted apart from malformed and, like it,
  left out of the win rate (a reward of 0.5). One lost comparison should not throw away an evaluation or a
  training run, and counting it keeps it visible (``failed`` in eval.json, ``judge/failures`` in metrics);
- a judge that is down rather than flaky: ``max_failures_in_a_row`` comparisons in a row failed, or every one
  of a batch, is a one-line error, since every verdict would be a failure (a PPO step of constant rewards, a
  win rate of nothing); so is what no retry can fix: an unknown host name, any other 4xx (a wrong URL, model
  or key).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from dpokit.errors import DpokitError
from dpokit.rewards import RewardFn, score_texts

Outcome = Literal["win", "loss", "tie", "malformed", "failed"]
"""From the point of view of the first response passed to ``compare`` (the policy's). ``malformed``: the judge's
reply names neither answer; ``failed``: no reply after the retries."""

RETRIED_STATUSES = frozenset({408, 425, 429})
"""Besides every 5xx: request timeout, too early, rate limited. Any other 4xx is a setup error (wrong URL, model
or key) that every request would hit."""
MAX_REPLY_BYTES = 1 << 20

JUDGE_PROMPT = """For the following query to a chatbot, which response is more helpful?

Query: {prompt}

Response A:
{a}

Response B:
{b}

FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. \
SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. \
Your response should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <"A" or "B">"""
"""The DPO paper's single-turn dialogue judge prompt (Appendix C.2); ``{prompt}``, ``{a}``, ``{b}`` are filled."""


@dataclass
class Verdict:
    outcome: Outcome
    swapped: bool = False
    """The policy's answer was shown second (as "B")."""
    reply: str = ""
    """The judge's raw reply (LLM judge), why it failed, or a short note (reward judge)."""
    retries: int = 0
    """Requests repeated for this comparison (timeouts, dropped connections, 429/5xx, replies that were no chat
    completion)."""


class RewardJudge:
    """A judge from a ground-truth reward: higher reward wins, equal rewards tie."""

    def __init__(self, fn: RewardFn, name: str = "reward"):
        self.fn, self.name = fn, name

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        ra = score_texts(self.fn, list(prompts), list(first), self.name)
        rb = score_texts(self.fn, list(prompts), list(second), self.name)
        return [Verdict("win" if a > b else "loss" if a < b else "tie", reply=f"{a:.4g} vs {b:.4g}")
                for a, b in zip(ra, rb)]


_VERDICT = re.compile(r"more helpful\s*:\s*[\"'*<(\[]*\s*(A|B|tie)\b", re.IGNORECASE)
_BARE = re.compile(r"^[\"'*\s(\[]*(A|B|tie)[\"'*\s.)\]]*$", re.IGNORECASE)


def parse_reply(reply: str) -> Literal["A", "B", "tie"] | None:
    """The answer a judge's reply names: the last ``More helpful: X`` line, or a reply that is only ``A``/``B``
    (or ``tie``). None when it names neither."""
    found = _VERDICT.findall(reply)
    if found:
        choice = found[-1]
    else:
        bare = _BARE.match(reply.strip())
        if not bare:
            return None
        choice = bare.group(1)
    return "tie" if choice.lower() == "tie" else choice.upper()  # type: ignore[return-value]


class LLMJudge:
    """A language model judge over an OpenAI-compatible chat-completions endpoint.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        model: the ``model`` field of the request.
        api_key_env: name of the environment variable holding the API key (sent as a Bearer token); None sends
            no key (local servers).
        seed: seed of the answer-order draws.
        timeout: seconds one attempt may take, from connecting to the last byte of the reply.
        retries: attempts after the first for a transient failure (see the module docstring).
        max_wait: the longest wait before a retry, also when ``Retry-After`` asks for more.
        backoff: the wait before the first retry without ``Retry-After``; it doubles for each further one.
        concurrency: requests in flight at once.
        max_failures_in_a_row: failed comparisons in a row (each after its retries) that stop ``compare`` with an
            error: the judge is down, and waiting on every remaining request would only take long.
    """

    def __init__(self, url: str, model: str, api_key_env: str | None = None, seed: int = 0,
                 timeout: float = 60.0, retries: int = 3, max_wait: float = 30.0, backoff: float = 0.5,
                 concurrency: int = 4, max_failures_in_a_row: int = 8, template: str = JUDGE_PROMPT):
        if not url.startswith(("http://", "https://")):
            raise DpokitError(f"--judge-url: expected an http(s) URL, got '{url}'")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise DpokitError(f"--judge-key-env: environment variable {api_key_env} is not set")
        self.rng = random.Random(seed)
        self.timeout, self.retries, self.max_wait, self.backoff = timeout, retries, max_wait, backoff
        self.concurrency, self.max_failures_in_a_row = max(1, concurrency), max(1, max_failures_in_a_row)
        self.template = template
        self.name = f"llm:{model}"
        self.sleep = time.sleep
        """How a retry waits (a test records the waits instead)."""

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        # Orders are drawn up front, in order, so the draw does not depend on thread scheduling.
        swaps = [self.rng.random() < 0.5 for _ in prompts]
        jobs = [(p, b, a) if s else (p, a, b) for p, a, b, s in zip(prompts, first, second, swaps)]
        streak = _FailureStreak(self.max_failures_in_a_row)
        with ThreadPoolExecutor(self.concurrency) as pool:
            answers = list(pool.map(lambda job: self._ask(*job, streak), jobs))
        failed = [a for a in answers if a.text is None]
        if streak.broken or (answers and len(failed) == len(answers)):
            many = (f"{self.max_failures_in_a_row} requests in a row" if streak.broken
                    else "the request" if len(answers) == 1 else f"all {len(answers)} requests")
            raise DpokitError(f"judge {self.endpoint}: {many} failed, each after {self.retries} retries "
                              f"(last: {streak.last or failed[-1].why})")
        verdicts = []
        for answer, swapped in zip(answers, swaps):
            if answer.text is None:
                verdicts.append(Verdict("failed", swapped, answer.why, answer.retries))
                continue
            choice = parse_reply(answer.text)
            if choice is None:
                outcome: Outcome = "malformed"
            elif choice == "tie":
                outcome = "tie"
            else:
                policy_label = "B" if swapped else "A"
                outcome = "win" if choice == policy_label else "loss"
            verdicts.append(Verdict(outcome, swapped, answer.text, answer.retries))
        return verdicts

    def _ask(self, prompt: str, a: str, b: str, streak: _FailureStreak) -> _Answer:
        """The judge's reply text, after as many retries as it took; or why there is none."""
        body = json.dumps({
            "model": self.model, "temperature": 0, "max_tokens": 256,
            "messages": [{"role": "user", "content": self.template.format(prompt=prompt, a=a, b=b)}],
        }).encode()
        why = ""
        for attempt in range(self.retries + 1):
            if streak.broken:  # the judge is down: compare() stops, this request is not worth sending
                return _Answer(None, attempt, "not sent: the judge failed too often")
            try:
                text = self._attempt(body)
            except _Transient as exc:
                why = exc.why
                if attempt < self.retries:
                    wait = exc.retry_after if exc.retry_after is not None else self.backoff * 2 ** attempt
                    self.sleep(min(wait, self.max_wait))
                continue
            streak.success()
            return _Answer(text, attempt)
        streak.failure(why)
        return _Answer(None, self.retries, why)

    def _attempt(self, body: bytes) -> str:
        """One request; its reply text. Raises :class:`_Transient` for what a retry may fix, :class:`DpokitError`
        for what it cannot."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        deadline = _Deadline(self.timeout)
        opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline))
        try:
            with deadline, opener.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in RETRIED_STATUSES or exc.code >= 500:
                wait = retry_after_seconds(exc.headers.get("Retry-After"))
                raise _Transient(f"HTTP {exc.code} {exc.reason}", wait) from None
            raise DpokitError(f"judge {self.endpoint}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if deadline.expired or isinstance(reason, TimeoutError):
                raise _Transient(f"no reply within {self.timeout:g} s") from None
            if isinstance(reason, (socket.gaierror, str)):  # an unknown host name, a URL urllib cannot open
                raise DpokitError(f"judge {self.endpoint}: cannot connect ({reason})") from None
            if isinstance(reason, ConnectionRefusedError):  # nothing listens there, or not yet (a restart)
                raise _Transient(f"cannot connect ({reason.strerror or reason})") from None
            raise _Transient(f"connection lost ({type(reason).__name__}: {reason})") from None
        if deadline.expired:  # the read returned what had come when the socket was shut: part of a reply
            raise _Transient(f"no reply within {self.timeout:g} s")
        if len(raw) > MAX_REPLY_BYTES:
            raise _Transient(f"a reply over {MAX_REPLY_BYTES} bytes")
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise _Transient(f"a reply that is no chat completion: {raw[:60]!r}")
        return content


@dataclass
class _Answer:
    text: str | None
    retries: int
    why: str = ""


class _Transient(Exception):
    """A failure worth another attempt; ``retry_after``: the server's ``Retry-After``, in seconds."""

    def __init__(self, why: str, retry_after: float | None = None):
        super().__init__(why)
        self.why, self.retry_after = why, retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110: seconds, or an HTTP date); None when absent or
    unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _FailureStreak:
    """Comparisons that failed in a row, over the threads of one ``compare``; broken at ``limit``."""

    def __init__(self, limit: int):
        self.limit, self.count, self.last = limit, 0, ""
        self._lock = threading.Lock()

    @property
    def broken(self) -> bool:
        return self.count >= self.limit

    def success(self) -> None:
        with self._lock:
            if not self.broken:
                self.count = 0

    def failure(self, why: str) -> None:
        with self._lock:
            self.count, self.last = self.count + 1, why


class _Deadline:
    """Ends an HTTP attempt ``seconds`` after it starts, whatever it is doing. A socket timeout bounds each read,
    not the reply: a server sending a byte now and then would hold a request forever. At the deadline the
    attempt's sockets are shut down, so a blocked read returns at once."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would tear down the TLS state that
            # the reading thread is using.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


class _Watched:
    """An HTTP(S) connection whose socket a :class:`_Deadline` watches."""

    sock: Any

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.deadline.watch(self.sock)


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req, deadline=self.deadline)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req, context=self._context, deadline=self.deadline)


def make_judge(url: str | None, model: str | None, api_key_env: str | None = None, seed: int = 0) -> LLMJudge | None:
    """The LLM judge the ``--judge-*`` flags describe, or None without ``--judge-url``."""
    if url is None:
        if model is not None or api_key_env is not None:
            raise DpokitError("--judge-model/--judge-key-env: need --judge-url")
        return None
    if not model:
        raise DpokitError("--judge-model: required with --judge-url (the model name the endpoint serves)")
    return LLMJudge(url, model, api_key_env, seed=seed)


class JudgeReward:
    """A pairwise judge as a scalar reward (``dpokit ppo`` with ``ppo.judge_url``): each response against a
    baseline response to the same prompt, 1 for a win, 0.5 for a tie, 0 for a loss. A malformed verdict, and a
    comparison that failed after its retries, score 0.5, the value that states no preference, and are counted
    (``malformed``, ``failures``; ``retries`` counts repeated requests), never dropped silently."""

    VALUES = {"win": 1.0, "tie": 0.5, "loss": 0.0, "malformed": 0.5, "failed": 0.5}
    accepts_messages = False

    def __init__(self, judge: LLMJudge, baselines: dict[str, str]):
        self.judge, self.baselines = judge, baselines
        self.name = f"{judge.name} against the data's chosen responses"
        self.malformed = self.failures = self.retries = 0

    def reseed(self, seed: int) -> None:
        """Answer orders drawn from ``seed`` alone: a resumed run shows the judge what the first run did."""
        self.judge.rng = random.Random(seed)

    def counts(self) -> dict[str, int]:
        """What the verdicts since the last :meth:`reset_counts` held, under their metric names."""
        return {"judge/malformed": self.malformed, "judge/failures": self.failures, "judge/retries": self.retries}

    def reset_counts(self) -> None:
        self.malformed = self.failures = self.retries = 0

    def batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        verdicts = self.judge.compare(prompts, responses, [self.baselines[p] for p in prompts])
        self.malformed += sum(v.outcome == "malformed" for v in verdicts)
        self.failures += sum(v.outcome == "failed" for v in verdicts)
        self.retries += sum(v.retries for v in verdicts)
        return [self.VALUES[v.outcome] for v in verdicts]

    def __call__(self, prompt: str, response: str) -> float:
        return self.batch([prompt], [response])[0]
