"""The arithmetic under the claims verdicts (``claims.py``): reading a reward-KL frontier between its checkpoints,
and the uncertainty of a ratio over seeds.

A frontier is a run's checkpoints in step order, pi_ref first (step 0, KL 0), each with its held-out reward, KL and
the cumulative cost (FLOPs, seconds) of reaching it. Between two evaluated checkpoints nothing was measured, so
every reading between them is a linear interpolation, and the checkpoints on either side are reported as bounds.

Intervals over seeds are percentile bootstrap intervals: the seeds are resampled with replacement (every seed
keeps all its methods together, since they share that seed's preference data), the statistic is recomputed on
each resample, and the 2.5th and 97.5th percentiles of those values bound it. With n seeds there are n**n
equally likely ordered resamples; up to ``EXACT_RESAMPLES`` of them are enumerated (no randomness: n <= 5), more
are drawn at random with a fixed seed. With 3 seeds the interval is close to the range of the per-seed values:
it says how far three runs are from settling a question, not more.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

LEVEL = 0.95
"""Two-sided coverage of every interval."""
EXACT_RESAMPLES = 20_000
"""At most this many resamples: all n**n of them when that is fewer (n <= 5 seeds), else a random draw."""


# ------------------------------------------------------------------------------------------- along a frontier

def reach(frontier: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """Where a run first reaches the held-out reward ``target``, or None if no checkpoint after pi_ref does.

    With p the first checkpoint (step > 0) whose reward is >= target and q the one before it (pi_ref or a
    checkpoint still below the target), the crossing is placed linearly in reward between them:

        theta = (target - r_q) / (r_p - r_q),   step* = s_q + theta (s_p - s_q),

    and its FLOPs and seconds are the cumulative costs interpolated at the same theta (exact at both
    checkpoints; between them each step costs the same up to its sequences' lengths). The costs at q and at p
    bound it: the checkpoints say only that the target was crossed somewhere in (s_q, s_p].
    Returns {"step", "flops", "seconds", "bounds": {"step", "flops", "seconds"} each [at q, at p]}."""
    points = sorted((p for p in frontier if p.get("reward") is not None), key=lambda p: p["step"])
    for i, p in enumerate(points):
        if not p["step"] or p["reward"] < target:
            continue
        q = points[i - 1] if i else p
        # pi_ref already at the target (a target below it) leaves nothing to interpolate: charge the checkpoint.
        theta = 1.0 if q is p or q["reward"] >= target else (target - q["reward"]) / (p["reward"] - q["reward"])
        out: dict[str, Any] = {"bounds": {}}
        for key in ("step", "flops", "seconds"):
            low, high = q.get(key), p.get(key)
            out["bounds"][key] = [low, high]
            out[key] = None if low is None or high is None else low + theta * (high - low)
        return out
    return None


def reward_curve(frontier: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(KL, reward) of every measured checkpoint, pi_ref included, ordered by KL: the frontier read as reward
    as a function of KL, piecewise linear between checkpoints (a KL reached twice keeps both, in step order)."""
    points = [(p["kl"], p["reward"], p["step"]) for p in frontier
              if p.get("kl") is not None and p.get("reward") is not None]
    return [(kl, reward) for kl, reward, _ in sorted(points, key=lambda t: (t[0], t[2]))]


def mean_reward(curve: Sequence[tuple[float, float]], low: float, high: float) -> float:
    """(1 / (high - low)) * integral over [low, high] of the piecewise linear reward(KL): the trapezoid rule on
    the curve cut at ``low`` and ``high``, exact for a piecewise linear function. ``low == high``: the reward
    there."""
    if high <= low:
        return _interpolate(curve, low)
    xs = [low, *(k for k, _ in curve if low < k < high), high]
    area = sum((b - a) * (_interpolate(curve, a) + _interpolate(curve, b)) / 2 for a, b in itertools.pairwise(xs))
    return area / (high - low)


def _interpolate(curve: Sequence[tuple[float, float]], x: float) -> float:
    for (k0, r0), (k1, r1) in itertools.pairwise(curve):
        if k0 <= x <= k1:
            return r0 if k1 == k0 else r0 + (x - k0) / (k1 - k0) * (r1 - r0)
    if len(curve) == 1 and curve[0][0] == x:
        return curve[0][1]
    raise ValueError(f"KL {x} is outside the frontier's range [{curve[0][0]}, {curve[-1][0]}]")


def matched_kl_gains(frontier_a: Sequence[dict[str, Any]], frontier_b: Sequence[dict[str, Any]],
                     reward_ref: float) -> tuple[float, float, tuple[float, float]] | None:
    """Reward gain over pi_ref of two runs at matched KL: each frontier's mean reward over the KL range both
    reach, [max of their smallest KLs, min of their largest], minus ``reward_ref``. Returns (gain a, gain b,
    the range), or None when the ranges do not overlap beyond a point (nothing to compare)."""
    a, b = reward_curve(frontier_a), reward_curve(frontier_b)
    if len(a) < 2 or len(b) < 2:
        return None
    low, high = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    if not high > low:
        return None
    return mean_reward(a, low, high) - reward_ref, mean_reward(b, low, high) - reward_ref, (low, high)


# ------------------------------------------------------------------------------------------------ over seeds

def resamples(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Bootstrap resamples of n seeds (indices, with replacement): all n**n when at most EXACT_RESAMPLES,
    else EXACT_RESAMPLES drawn with a fixed seed (the same interval on every run)."""
    if n ** n <= EXACT_RESAMPLES:
        return list(itertools.product(range(n), repeat=n))
    rng = random.Random(seed)
    return [tuple(rng.randrange(n) for _ in range(n)) for _ in range(EXACT_RESAMPLES)]


def bootstrap_interval(n: int, statistic: Callable[[Sequence[int]], float | None]) -> list[float] | None:
    """The LEVEL percentile interval of ``statistic`` over bootstrap resamples of n seeds. A resample where the
    statistic is undefined (None or NaN, e.g. a spread of one repeated seed over another) is left out; None
    when fewer than half of them are defined, or for one seed (its only resample is itself: no spread at all)."""
    if n < 2:
        return None
    draws = resamples(n)
    values = sorted(v for v in (statistic(idx) for idx in draws) if v is not None and not math.isnan(v))
    if 2 * len(values) < len(draws):
        return None
    tail = (1 - LEVEL) / 2
    return [_quantile(values, tail), _quantile(values, 1 - tail)]


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), safe for infinite values."""
    pos = q * (len(values) - 1)
    i = math.floor(pos)
    j = min(i + 1, len(values) - 1)
    a, b = values[i], values[j]
    return a if a == b or pos == i else a + (pos - i) * (b - a)


def ratio(a: float, b: float) -> float | None:
    """a / b; a positive or negative over 0 is +-inf (counted as a resample far on that side), 0 / 0 None."""
    if b != 0:
        return a / b
    return None if a == 0 else math.copysign(math.inf, a)


def verdict(interval: Sequence[float], bar: float, side: str) -> str:
    """'holds' when the whole interval is on the claim's side of the bar, 'does not hold' when it is all on
    the other side, 'undetermined' when it straddles the bar."""
    low, high = interval
    if side == "<=":
        return "holds" if high <= bar else "does not hold" if low > bar else "undetermined"
    return "holds" if low >= bar else "does not hold" if high < bar else "undetermined"
