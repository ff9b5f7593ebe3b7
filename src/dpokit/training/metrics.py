"""Metric names, the JSONL sink and the progress display.

Names are shared with the DPO reference repo, TRL and torchtune so dashboards carry over: ``loss``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``, ``logits/chosen``, ``logits/rejected``, ``grad_norm``, ``lr``, ``tokens_per_second``, ``skipped_steps``; each row also has ``step``,
``elapsed_s`` and ``tokens``, and a training step's ``num_tokens`` (the running total of ``tokens``) and ``epoch``
(passes over the training data), as TRL names them. Trackers get TRL's names for all of these
(``dpokit.integrations.trackers.tracker_names``: ``lr`` is ``learning_rate``, under ``train/`` or ``eval/``); this file keeps
dpokit's. A reward model (``dpokit rm``) logs ``loss``, ``accuracy``, ``margin``,
``rewards/chosen`` and ``rewards/rejected`` instead of the pair metrics.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpokit.io import read_jsonl, writing
from dpokit.terminal import console, is_interactive

PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
REWARD_MODEL_METRICS = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")
"""A reward model's (``dpokit rm``): Bradley-Terry loss, r_c > r_r, mean r_c - r_r, and the scalar rewards."""


class MeanStats:
    """Running sums of per-pair values, so a step's metrics are means over every pair of the step whatever the
    micro-batching (and, summed across ranks, over every pair of every rank). ``names`` are the metrics."""

    names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.names, 0.0)
        self.pairs = 0
        self.tokens = 0

    def add_values(self, values: dict[str, torch.Tensor], tokens: int) -> None:
        """One pass's per-pair values (each (G,)) and its non-padding tokens."""
        for name, value in values.items():
            self.sums[name] += float(value.detach().float().sum())
        self.pairs += int(values["loss"].shape[0])
        self.tokens += tokens

    def means(self) -> dict[str, float]:
        return {name: total / max(self.pairs, 1) for name, total in self.sums.items()}

    def reduce(self, sum_across: Callable[[list[float]], list[float]]) -> None:
        """Replace every sum and count by its total over all ranks (``Dist.sum``): then ``means`` are over
        every pair of every rank, each pair counted once."""
        totals = sum_across([*self.sums.values(), self.pairs, self.tokens])
        self.sums = dict(zip(self.sums, totals))
        self.pairs, self.tokens = int(totals[-2]), int(totals[-1])


_LOGIT_TOKENS = ("logit_tokens/chosen", "logit_tokens/rejected")


class PairStats(MeanStats):
    """DPO and its variants: the implicit rewards and the policy's log-probs of each pair, and (as TRL logs them)
    ``logits/chosen`` / ``logits/rejected``: the policy's logits averaged over the vocabulary and over every
    chosen (rejected) response token of the step, so a long response weighs more than a short one."""

    names = PAIR_METRICS + _LOGIT_TOKENS

    def add(self, losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
            chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, tokens: int,
            logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """``logits``: the chosen and rejected responses' summed mean logits and their token counts, (G,) each
        (``dpokit.models.logprobs.layout_logps(mean_logits=True)``)."""
        values = {
            "loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps, "logps/rejected": rejected_logps,
        }
        values.update(zip(("logits/chosen", "logits/rejected", *_LOGIT_TOKENS), logits))
        self.add_values(values, tokens)

    def means(self) -> dict[str, float]:
        out = {name: total / max(self.pairs, 1) for name, total in self.sums.items() if name not in _LOGIT_TOKENS}
        for side in ("chosen", "rejected"):
            out[f"logits/{side}"] = self.sums[f"logits/{side}"] / max(self.sums[f"logit_tokens/{side}"], 1.0)
        return out


KTO_METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "desirable", "undesirable")
"""KTO's (unpaired examples): chosen = desirable, rejected = undesirable, each averaged over its own kind."""


class KtoStats(MeanStats):
    """KTO: each example is one response, desirable or not. ``rewards/chosen`` and ``logps/chosen`` are means over
    the desirable examples, the ``rejected`` ones over the undesirable; ``rewards/margins`` is their difference;
    ``rewards/accuracies`` the fraction of examples on their side of the reference point z (a desirable
    reward above it, an undesirable one below); ``kl`` the mean KL estimate z_0 the examples saw."""

    names = KTO_METRICS

    def add(self, losses: torch.Tensor, rewards: torch.Tensor, labels: torch.Tensor, logps: torch.Tensor,
            kl: torch.Tensor, beta: float, tokens: int) -> None:
        desirable = labels.float()
        undesirable = 1.0 - desirable
        z = beta * kl
        right_side = torch.where(labels, rewards > z, rewards < z).float()
        self.add_values({
            "loss": losses, "kl": kl.expand_as(losses), "rewards/chosen": rewards * desirable,
            "rewards/rejected": rewards * undesirable, "rewards/accuracies": right_side,
            "logps/chosen": logps * desirable, "logps/rejected": logps * undesirable,
            "desirable": desirable, "undesirable": undesirable,
        }, tokens)

    def means(self) -> dict[str, float]:
        n = max(self.pairs, 1)
        n_d, n_u = max(self.sums["desirable"], 1.0), max(self.sums["undesirable"], 1.0)
        out = {name: self.sums[name] / n for name in ("loss", "kl", "rewards/accuracies")}
        out.update({"rewards/chosen": self.sums["rewards/chosen"] / n_d,
                    "rewards/rejected": self.sums["rewards/rejected"] / n_u,
                    "logps/chosen": self.sums["logps/chosen"] / n_d, "logps/rejected": self.sums["logps/rejected"] / n_u})
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


class RewardModelStats(MeanStats):
    """A Bradley-Terry reward model: the scalar rewards r_c, r_r of each pair."""

    names = REWARD_MODEL_METRICS

    def add(self, losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
            tokens: int) -> None:
        self.add_values({
            "loss": losses, "accuracy": (chosen_rewards > rejected_rewards).float(),
            "margin": chosen_rewards - rejected_rewards,
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
        }, tokens)


class SftStats:
    """Running sums for supervised fine-tuning: ``loss`` is the mean NLL per response token of the step."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.logps = 0.0
        self.rows = 0
        self.response_tokens = 0
        self.tokens = 0

    def add(self, logps: torch.Tensor, response_tokens: int, tokens: int) -> None:
        total = float(logps.detach().sum())
        self.nll -= total
        self.logps += total
        self.rows += int(logps.shape[0])
        self.response_tokens += response_tokens
        self.tokens += tokens

    def means(self) -> dict[str, float]:
        return {"loss": self.nll / max(self.response_tokens, 1), "logps/chosen": self.logps / max(self.rows, 1)}

    def reduce(self, sum_across: Callable[[list[float]], list[float]]) -> None:
        """Replace every sum and count by its total over all ranks (``Dist.sum``)."""
        self.nll, self.logps, rows, response_tokens, tokens = sum_across(
            [self.nll, self.logps, self.rows, self.response_tokens, self.tokens])
        self.rows, self.response_tokens, self.tokens = int(rows), int(response_tokens), int(tokens)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value is honest
    return value


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and flushes, so a crash loses at most a row.
    ``enabled=False`` (every rank but 0 under torchrun) writes nothing: rows are reduced over ranks first.
    ``trackers`` (``dpokit.integrations.trackers.Trackers``, ``log.report_to``) get every row written, after the file."""

    def __init__(self, path: Path, enabled: bool = True, trackers: Any = None):
        self.path = path
        self.trackers = trackers if enabled else None
        self._fh = None
        if enabled:
            with writing(path, "metrics"):
                self._fh = path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is None:
            return
        with writing(self.path, "metrics"):
            self._fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            self._fh.flush()
        if self.trackers is not None:
            self.trackers.write(row)

    def close(self) -> None:
        if self.trackers is not None:
            trackers, self.trackers = self.trackers, None
            trackers.close()
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with writing(self.path, "metrics"):  # what a failed write left buffered is flushed (and fails) again
                fh.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``."""
    return read_jsonl(path)


class Progress:
    """A rich progress bar on a terminal; on a pipe or in CI, a plain line each time another ~10% is done.

    Training counts optimizer steps and shows the loss (``update``); the recipe counts items under its own
    ``label``, e.g. continuations decoded (``advance``). ``say`` writes the plain lines (default: stderr)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "train",
                 say: Callable[[str], None] | None = None):
        self.total, self.done, self.label = total, start, label
        self.interactive = enabled and is_interactive(sys.stderr)
        self.enabled = enabled
        self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        # Tenths of the total already reported: whole numbers, so 3 x 10% is 30% (adding 0.1 thrice is not).
        self._tenths = 10 * start // total if total else 0
        self._bar = None
        if self.interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     transient=False, console=console(stderr=True))
            self._task = self._bar.add_task(label, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, row: dict[str, Any]) -> None:
        """Training reached optimizer step ``step``; ``row`` is its metrics row."""
        accuracy = row.get("rewards/accuracies", row.get("accuracy", 0))
        info = (f"loss {row.get('loss', float('nan')):.4f}  acc {accuracy:.2f}  "
                f"{row.get('tokens_per_second', 0):.0f} tok/s")
        self._show(step, info, f"step {step}/{self.total}  {info}")

    def advance(self, n: int = 1) -> None:
        """``n`` more items done."""
        self._show(self.done + n, "", f"{self.label} {self.done + n}/{self.total}")

    def _show(self, done: int, info: str, line: str) -> None:
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info)
        elif self.enabled and self.total and 10 * done >= (self._tenths + 1) * self.total:
            self._tenths = 10 * done // self.total
            self._say(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class HealthMonitor:
    """Watches the training rows for the known ways DPO goes wrong and says so once per ``interval`` steps.

    - likelihood displacement: the chosen log-prob falls while the margin grows (both responses are pushed
      down, the rejected one faster; Pang et al. 2024, Razin et al. 2024) - ``rpo`` counters it;
    - exploding margins or log-ratios: |reward| beyond ``max_reward`` nats x beta means the policy has left
      the reference far behind (lr too high, beta too small);
    - zero rewards: every reward exactly 0 after the first step means the policy never moved away from the
      reference (lr 0, frozen weights, or a reference that is the live policy).
    """

    def __init__(self, interval: int = 20, max_reward: float = 50.0):
        self.interval = max(2, interval)
        self.max_reward = max_reward
        self.history: list[dict[str, Any]] = []
        self.last_warned: dict[str, int] = {}

    def check(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        """Feed one training row; returns (code, message) warnings due now."""
        if "rewards/margins" not in row:
            return []
        self.history.append(row)
        self.history = self.history[-self.interval:]
        step = row["step"]
        found = []
        if len(self.history) >= self.interval:
            first, last = self.history[0], self.history[-1]
            if (last["logps/chosen"] < first["logps/chosen"] - 1.0
                    and last["rewards/margins"] > first["rewards/margins"]):
                found.append(("likelihood_displacement",
                              f"chosen log-prob fell {first['logps/chosen']:.2f} -> {last['logps/chosen']:.2f} "
                              f"while the margin grew {first['rewards/margins']:.2f} -> "
                              f"{last['rewards/margins']:.2f} (likelihood displacement); consider loss.name=rpo"))
        if max(abs(row["rewards/chosen"]), abs(row["rewards/rejected"])) > self.max_reward:
            found.append(("exploding_rewards",
                          f"implicit rewards reached {row['rewards/chosen']:.1f} / {row['rewards/rejected']:.1f}: "
                          "the policy is far from the reference; lower train.lr or raise loss.beta"))
        if (step > 1 and row["rewards/chosen"] == 0.0 and row["rewards/rejected"] == 0.0
                and row["rewards/margins"] == 0.0):
            found.append(("zero_rewards",
                          "every implicit reward is exactly 0: the policy has not moved from the reference "
                          "(check train.lr, loss.beta and that the reference is a separate frozen model)"))
        due = [(code, msg) for code, msg in found
               if step - self.last_warned.get(code, -self.interval) >= self.interval]
        for code, _ in due:
            self.last_warned[code] = step
        return due
