"""The estimators behind ``dpokit eval``: sequence-level KL(pi || pi_ref), means with standard errors, and
win rates with Wilson confidence intervals. Pure functions of numbers (no models), unit-tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """A sample mean with its standard error (sample std / sqrt(n), ddof = 1; 0 for n = 1)."""

    mean: float
    stderr: float
    n: int


def mean_stderr(values: Sequence[float]) -> Estimate:
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), float("nan"), 0)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, 0.0, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def kl_estimate(logratios: Sequence[float]) -> Estimate:
    """Sequence-level KL(pi || pi_ref) from samples y ~ pi(.|x):

        KL = E_{x, y ~ pi}[ log pi(y|x) - log pi_ref(y|x) ],   log pi(y|x) = sum_t log pi(y_t | x, y_<t)

    so the Monte Carlo estimate is the mean over samples of the summed per-token log-ratio (``logratios``, one
    per sample), the quantity on the x-axis of the paper's reward-KL frontier (Fig. 2, left). Unbiased only for
    samples drawn at temperature 1 without top-p, i.e. from pi itself. Exactly 0 when pi = pi_ref.
    """
    return mean_stderr(list(logratios))


def wilson_interval(score: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion ``score / n`` (95% by default). Ties count half a win in
    ``score``; treating them as Bernoulli halves slightly overstates the variance, so the interval is
    conservative. Stays inside [0, 1] and is sensible at 0 and n wins, unlike the normal approximation."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = score / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class WinRate:
    """Outcomes of policy-vs-baseline comparisons. ``rate = (wins + ties / 2) / (wins + ties + losses)``;
    malformed judge replies, and comparisons that got no reply after their retries (``failed``), are counted but
    left out of the rate."""

    wins: int = 0
    ties: int = 0
    losses: int = 0
    malformed: int = 0
    failed: int = 0

    @classmethod
    def from_outcomes(cls, outcomes: Iterable[str]) -> WinRate:
        result = cls()
        for outcome in outcomes:
            name = {"win": "wins", "tie": "ties", "loss": "losses", "malformed": "malformed",
                    "failed": "failed"}[outcome]
            setattr(result, name, getattr(result, name) + 1)
        return result

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.judged if self.judged else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson_interval(self.wins + 0.5 * self.ties, self.judged)

    def to_dict(self) -> dict[str, Any]:
        return {"win_rate": _num(self.rate), "win_rate_ci": [_num(v) for v in self.ci], **asdict(self)}


def _num(value: float) -> float | None:
    """JSON has no NaN: an undefined value is null."""
    return value if math.isfinite(value) else None
