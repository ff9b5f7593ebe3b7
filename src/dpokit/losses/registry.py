"""The loss registry: name -> function, each loss's parameters and how they are checked, and the two
functions the rest of dpokit calls (``validate_loss_config`` for the config, ``compute_loss`` for a batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

LOSSES: dict[str, LossFn] = {}
"""name -> loss function."""

LOSS_PARAMS: dict[str, dict[str, Callable[[Any], str | None]]] = {}
"""name -> {parameter: check(value) -> error message or None}. A parameter not listed is not used by the loss."""

LOSS_REQUIRED: dict[str, frozenset[str]] = {}
"""name -> parameters that must be set in the config (the others in LOSS_PARAMS have defaults)."""

LISTWISE: frozenset[str] = frozenset({"plackett_luce"})
"""Losses over (batch, K) rankings: they take other arguments and cannot go through ``compute_loss``."""


def register(
    name: str, params: dict[str, Callable[[Any], str | None]] | None = None, required: tuple[str, ...] = ()
) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        LOSS_PARAMS[name] = params or {}
        LOSS_REQUIRED[name] = frozenset(required)
        return fn

    return wrap


def check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _is_number(value: Any) -> bool:
    # bool is an int subclass; `label_smoothing: true` in YAML is a mistake, not eps = 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_flip_rate(value: Any) -> str | None:
    # eps = 0.5 means the labels carry no information (and divides by zero in `robust`).
    return None if _is_number(value) and 0 <= value < 0.5 else "must be in [0, 0.5)"


def check_smoothed_flip_rate(value: Any) -> str | None:
    # exo_pair takes log(eps): eps = 0 makes the target distribution put no mass on y_l, and the reverse KL
    # to it infinite at every finite margin.
    ok = _is_number(value) and 0 < value < 0.5
    return None if ok else "must be in (0, 0.5); eps = 0 makes log(eps) infinite"


def check_non_negative(value: Any) -> str | None:
    return None if _is_number(value) and value >= 0 else "must be a number >= 0"


def check_positive(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "must be a number > 0"


def validate_loss_config(loss: Any) -> None:
    """Raise ValueError naming the key when the loss name is unknown or a parameter has no effect or is out of
    range. ``loss`` is a ``dpokit.config.LossConfig``."""
    names = list(loss.weights) if loss.weights else [loss.name]
    if loss.weights is not None:
        if not loss.weights:
            raise ValueError("loss.weights: give at least one loss")
        for name, weight in loss.weights.items():
            if not weight > 0:
                raise ValueError(f"loss.weights.{name}: weight must be positive, got {weight}")
    for name in names:
        if name not in LOSSES:
            key = f"loss.weights.{name}" if loss.weights else "loss.name"
            raise ValueError(f"{key}: unknown loss '{name}' (known: {', '.join(sorted(LOSSES))})")
        if loss.weights and name in LISTWISE:
            # A listwise loss takes (batch, K) rankings, not the pairs the other terms of a sum take.
            raise ValueError(f"loss.weights.{name}: the listwise loss '{name}' cannot be combined with others; "
                             f"use loss.name: {name} alone")
    given = loss.params()
    for name in names:
        missing = sorted(LOSS_REQUIRED[name] - set(given))
        if missing:
            raise ValueError(f"loss.{missing[0]}: required by loss {name}")
    for param, value in given.items():
        users = [n for n in names if param in LOSS_PARAMS[n]]
        if not users:
            raise ValueError(f"loss.{param}: not used by loss {' + '.join(names)}; remove it")
        for name in users:
            problem = LOSS_PARAMS[name][param](value)
            if problem:
                raise ValueError(f"loss.{param}: {problem}, got {value!r}")


def compute_loss(
    loss: Any,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the configured loss (or weighted sum of losses) of a ``LossConfig`` to a batch of pairs.

    Rewards reported are those of the first loss. Lengths are passed through; losses that average per token
    (``ipo``, ``simpo``, ``rpo``) raise ValueError without them. Listwise losses raise ValueError.
    Shapes: (batch,) in and out.
    """
    weights = loss.weights or {loss.name: 1.0}
    for name in weights:
        if name in LISTWISE:
            raise ValueError(f"loss '{name}' is listwise and takes (batch, K) rankings, not pairs: call "
                             f"dpokit.losses.plackett_luce_loss(policy_logps, ref_logps, beta=...) instead")
    params = loss.params()
    total = None
    rewards: tuple[torch.Tensor, torch.Tensor] | None = None
    for name, weight in weights.items():
        own = {k: v for k, v in params.items() if k in LOSS_PARAMS[name]}
        losses, chosen_rewards, rejected_rewards = LOSSES[name](
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            beta=loss.beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **own)
        total = weight * losses if total is None else total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    assert total is not None and rewards is not None
    return total, rewards[0], rewards[1]
