"""What every stage of the sentiment recipe shares: its name, the version of its caches, the device it runs on,
how it talks (one ``recipe:`` line on stderr per event), how it hashes a cache key, and the time each stage
took."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

RECIPE = "sentiment"
CACHE_VERSION = 2
"""Part of every cache key of the recipe; bump it when a cached file would be read wrongly by new code, or when
the same seed would now give other samples (2: inverse-CDF sampling replaced torch.multinomial)."""


def recipe_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def say(message: str) -> None:
    print(f"recipe: {message}", file=sys.stderr, flush=True)


def digest(*parts: Any) -> str:
    """The sha256 of ``parts`` as canonical JSON (keys sorted): a cache key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    from dpokit.evaluate.stats import mean_stderr

    estimate = mean_stderr(list(values))
    return estimate.mean, estimate.stderr


class StageTimer:
    """Wall-clock and CPU seconds per stage, for the summary, and one line per stage on stderr. (CPU seconds
    compare machines better than wall-clock ones when the CPU is shared.)"""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        say(f"{name}: {what}")
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 1)
            self.cpu_seconds[name] = round(self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu, 1)
