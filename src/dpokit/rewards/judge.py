"""Judges: which of two responses to a prompt is better.

- :class:`RewardJudge` compares ground-truth rewards r*(x, y_a) and r*(x, y_b) (equal rewards are a tie);
- :class:`LLMJudge` asks a language model over any OpenAI-compatible HTTP endpoint
  (``POST {url}/chat/completions``), with the paper's GPT-4 prompt (Rafailov et al. 2023, Appendix C.2).

An LLM judge prefers whichever answer it reads first (position bias), so every comparison shows the two
answers in an order drawn at random from a seeded generator, and the verdict is mapped back. A reply that
names neither answer is counted as *malformed* and left out of the win rate, never a crash; a judge that cannot
be reached at all, or refuses the key, is a one-line error (every verdict would be malformed).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from dpokit.errors import DpokitError
from dpokit.rewards import RewardFn, score_texts

Outcome = Literal["win", "loss", "tie", "malformed"]
"""From the point of view of the first response passed to ``compare`` (the policy's)."""

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
    """The judge's raw reply (LLM judge) or a short note (reward judge)."""


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
        concurrency: requests in flight at once.
    """

    def __init__(self, url: str, model: str, api_key_env: str | None = None, seed: int = 0,
                 timeout: float = 60.0, retries: int = 2, concurrency: int = 4, template: str = JUDGE_PROMPT):
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
        self.timeout, self.retries, self.concurrency = timeout, retries, max(1, concurrency)
        self.template = template
        self.name = f"llm:{model}"

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        # Orders are drawn up front, in order, so the draw does not depend on thread scheduling.
        swaps = [self.rng.random() < 0.5 for _ in prompts]
        jobs = [(p, b, a) if s else (p, a, b) for p, a, b, s in zip(prompts, first, second, swaps)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            replies = list(pool.map(lambda job: self._ask(*job), jobs))
        verdicts = []
        for reply, swapped in zip(replies, swaps):
            choice = parse_reply(reply) if reply is not None else None
            if choice is None:
                outcome: Outcome = "malformed"
            elif choice == "tie":
                outcome = "tie"
            else:
                policy_label = "B" if swapped else "A"
                outcome = "win" if choice == policy_label else "loss"
            verdicts.append(Verdict(outcome, swapped, reply or ""))
        return verdicts

    def _ask(self, prompt: str, a: str, b: str) -> str | None:
        """The judge's reply text; None for a reply without one (bad JSON, no choices, or rate limits, server
        errors and timeouts left after retries)."""
        body = json.dumps({
            "model": self.model, "temperature": 0, "max_tokens": 256,
            "messages": [{"role": "user", "content": self.template.format(prompt=prompt, a=a, b=b)}],
        }).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        raw = b""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as exc:
                # Rate limits and server errors are retried; any other status (bad key, wrong URL or model) is a
                # setup error every request would hit.
                if exc.code != 429 and exc.code < 500:
                    raise DpokitError(f"judge {self.endpoint}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, (ConnectionRefusedError, socket.gaierror, str)):
                    raise DpokitError(f"judge {self.endpoint}: cannot connect ({reason})") from None
                # A timeout or dropped connection loses one verdict after retries, not the evaluation.
        else:
            return None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None


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
    baseline response to the same prompt, 1 for a win, 0.5 for a tie, 0 for a loss. A malformed verdict scores
    0.5, the value that states no preference, and is counted (``malformed``), never dropped silently."""

    VALUES = {"win": 1.0, "tie": 0.5, "loss": 0.0, "malformed": 0.5}
    accepts_messages = False

    def __init__(self, judge: LLMJudge, baselines: dict[str, str]):
        self.judge, self.baselines = judge, baselines
        self.name = f"{judge.name} against the data's chosen responses"
        self.malformed = 0

    def reseed(self, seed: int) -> None:
        """Answer orders drawn from ``seed`` alone: a resumed run shows the judge what the first run did."""
        self.judge.rng = random.Random(seed)

    def batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        verdicts = self.judge.compare(prompts, responses, [self.baselines[p] for p in prompts])
        self.malformed += sum(v.outcome == "malformed" for v in verdicts)
        return [self.VALUES[v.outcome] for v in verdicts]

    def __call__(self, prompt: str, response: str) -> float:
        return self.batch([prompt], [response])[0]
