"""Ground-truth reward functions r*(x, y) and judges: what the trained policy is evaluated against.

A reward function has the signature ``f(prompt: str, response: str) -> float`` (higher is better). Built-in:

=============  ====================================================================================
``sentiment``  VADER compound score of the response, in [-1, 1] (the paper's controlled-sentiment
               experiment scores IMDb continuations with a sentiment classifier; VADER is its offline
               stand-in, lexicon shipped with ``vaderSentiment``)
``length``     number of whitespace-separated words of the response
=============  ====================================================================================

Anything else is named ``module:function`` (an importable module) or ``path/to/file.py:function``, or is a
trained reward model: the run directory of ``dpokit rm`` (its ``final/``) or a Hugging Face folder of a
``*ForSequenceClassification`` with one label (``dpokit.methods.reward_model.load_reward_model``). A reward may also
offer ``batch(prompts, responses) -> list[float]``, which ``score_texts`` then uses (a reward model scores
many rows per forward pass).
Judges (``dpokit.rewards.judge``) compare two responses instead of scoring one.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError

RewardFn = Callable[[str, str], float]


@lru_cache(maxsize=1)
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise DpokitError("reward 'sentiment' needs the package vaderSentiment (pip install vaderSentiment)") from None
    return SentimentIntensityAnalyzer()


def sentiment(prompt: str, response: str) -> float:
    """VADER compound sentiment of the response alone, in [-1, 1]: the prompt is the movie-review prefix the
    policy continues, and only the continuation is the policy's doing."""
    return float(_vader().polarity_scores(response)["compound"])


def length(prompt: str, response: str) -> float:
    """Number of words of the response (a reward people use to detect length exploitation)."""
    return float(len(response.split()))


REWARDS: dict[str, RewardFn] = {"sentiment": sentiment, "length": length}
"""Built-in reward functions by name."""


def _import_callable(spec: str) -> RewardFn:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise DpokitError(f"reward '{spec}': expected a built-in name ({', '.join(sorted(REWARDS))}) or "
                          "module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise DpokitError(f"reward '{spec}': file {path} not found")
            file_spec = importlib.util.spec_from_file_location(f"dpokit_reward_{path.stem}", path)
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            # The current directory is where users keep their reward scripts; `python -m` would search it too.
            if "" not in sys.path and "." not in sys.path:
                sys.path.insert(0, "")
            module = importlib.import_module(module_name)
    except DpokitError:
        raise
    except Exception as exc:  # a user module may fail to import in any way
        raise DpokitError(f"reward '{spec}': cannot import {module_name} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise DpokitError(f"reward '{spec}': {module_name} has no attribute '{attr}'")
    if not callable(fn):
        raise DpokitError(f"reward '{spec}': {module_name}.{attr} is not callable")
    return fn


def get_reward(spec: str | RewardFn) -> RewardFn:
    """A reward function from a built-in name, ``module:function``, ``file.py:function``, a reward model's
    folder (an ``rm`` run directory or a ``*ForSequenceClassification`` folder: the model is loaded, once) or a
    callable. Raises :class:`DpokitError` (one line) for an unknown name, a callable that does not import, or a
    folder that holds no reward model (e.g. a DPO policy's run)."""
    if callable(spec):
        return spec
    if spec in REWARDS:
        fn = REWARDS[spec]
        if fn is sentiment:
            _vader()  # fail now, not after minutes of generation
        return fn
    if Path(spec).expanduser().is_dir():
        from dpokit.methods.reward_model import load_reward_model

        return load_reward_model(spec)
    if ":" not in spec:
        where = " (no such folder)" if "/" in spec else ""
        raise DpokitError(f"reward '{spec}': unknown{where}; built-in rewards are {', '.join(sorted(REWARDS))}, "
                          "or give module:function or a reward model's run directory")
    return _import_callable(spec)


def reward_name(spec: str | RewardFn) -> str:
    """How a reward is named in outputs: the spec as given, a callable's own ``name`` (a reward model's), or
    ``module:qualname``."""
    if isinstance(spec, str):
        return spec
    name = getattr(spec, "name", None)
    if isinstance(name, str):
        return name
    return f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', repr(spec))}"


def score_texts(fn: RewardFn, prompts: list[str], responses: list[str], name: str = "reward") -> list[float]:
    """``fn`` on each (prompt, response), through ``fn.batch(prompts, responses)`` when ``fn`` has it (one call
    for all rows); a failure or a non-number is a one-line error naming the sample (or the batch)."""
    batch = getattr(fn, "batch", None)
    if callable(batch):
        try:
            values = [float(v) for v in batch(list(prompts), list(responses))]
        except Exception as exc:  # user code: any exception is a bad reward function, not a dpokit bug
            raise DpokitError(f"reward '{name}' failed on a batch of {len(prompts)} samples "
                              f"({type(exc).__name__}: {exc})") from None
        if len(values) != len(prompts):
            raise DpokitError(f"reward '{name}' returned {len(values)} values for {len(prompts)} samples")
    else:
        values = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                values.append(float(fn(prompt, response)))
            except Exception as exc:  # user code: any exception is a bad reward function, not a dpokit bug
                raise DpokitError(f"reward '{name}' failed on sample {i} ({type(exc).__name__}: {exc})") from None
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise DpokitError(f"reward '{name}' returned {value} on sample {i}; rewards must be finite numbers")
    return values
