"""The loss registry: name -> function, each loss's parameters and how they are checked, the state a loss
carries between optimizer steps, and the functions the rest of dpokit calls (``validate_loss_config`` and
``check_training_setup`` for the config, ``compute_loss`` for a batch, ``advance_loss_state`` after a step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpokit.errors import ConfigError

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

LOSSES: dict[str, LossFn] = {}
"""name -> loss function."""

LOSS_PARAMS: dict[str, dict[str, Callable[[Any], str | None]]] = {}
"""name -> {parameter: check(value) -> error message or None}. A parameter not listed is not used by the loss."""

LOSS_REQUIRED: dict[str, frozenset[str]] = {}
"""name -> parameters that must be set in the config (the others in LOSS_PARAMS have defaults)."""

LOSS_CHECKS: dict[str, Callable[[dict[str, Any]], tuple[str, str] | None]] = {}
"""name -> check(the loss's given parameters) -> (parameter, error message) or None, for rules that tie
parameters together (``f_dpo``: the alpha coefficient only with the alpha-divergence)."""

LISTWISE: frozenset[str] = frozenset({"plackett_luce"})
"""Losses over (batch, K) rankings: they take other arguments and cannot go through ``compute_loss``."""

UNPAIRED: frozenset[str] = frozenset({"kto"})
"""Losses on single labelled responses (``{"prompt", "completion", "label"}`` rows), not pairs: they take other
arguments and cannot go through ``compute_loss``."""

BATCHWISE: frozenset[str] = frozenset({"aot", "aot_unpaired"})
"""Losses whose value for one pair depends on the other pairs of the batch (they sort across it). Gradient
accumulation, ``train.pass_tokens`` and torchrun would each split a step's pairs into batches sorted apart, a
different objective from the whole step's, so ``check_training_setup`` refuses them for these losses."""


@dataclass(frozen=True)
class LossState:
    """What a loss carries from one optimizer step to the next (``bco_pair``: the running mean reward).

    The state is a JSON dict: it is saved in every checkpoint (``Run.task_state["loss"][name]``) and restored
    on resume. ``inputs(state)`` gives the loss's extra keyword arguments for every pair of a step; after an
    applied step, ``update(state, chosen_reward_mean, rejected_reward_mean, pairs)`` folds in the step's mean
    rewards, which are sums over every pair of every rank, so each rank computes the same state."""

    initial: Callable[[], dict[str, Any]]
    inputs: Callable[[dict[str, Any]], dict[str, Any]]
    update: Callable[[dict[str, Any], float, float, int], dict[str, Any]]


LOSS_STATE: dict[str, LossState] = {}
"""name -> its ``LossState``, for the losses that carry one."""

PLAIN_CHOSEN: set[str] = set()
"""Losses with a term on the chosen response's own log-prob (``rpo``'s NLL) rather than on the log-probs every
loss compares, which ``loss.ld_alpha`` length-desensitizes: ``compute_loss`` passes them ``plain_chosen_logps``."""


def register(
    name: str, params: dict[str, Callable[[Any], str | None]] | None = None, required: tuple[str, ...] = (),
    state: LossState | None = None, check: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None,
    plain_chosen: bool = False,
) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        if plain_chosen:
            PLAIN_CHOSEN.add(name)
        LOSS_PARAMS[name] = params or {}
        LOSS_REQUIRED[name] = frozenset(required)
        if check is not None:
            LOSS_CHECKS[name] = check
        if state is not None:
            LOSS_STATE[name] = state
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
    names = _names(loss)
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
        if loss.weights and name in UNPAIRED:
            raise ValueError(f"loss.weights.{name}: the unpaired loss '{name}' cannot be combined with others; "
                             f"use loss.name: {name} alone")
        if loss.weights and name in LISTWISE:
            # A listwise loss takes (batch, K) rankings, not the pairs the other terms of a sum take.
            raise ValueError(f"loss.weights.{name}: the listwise loss '{name}' cannot be combined with others; "
                             f"use loss.name: {name} alone")
        if loss.weights and name in LOSS_STATE and name != names[0]:
            # Its state is updated from the step's reported rewards, which are the first loss's (simpo's differ).
            raise ValueError(f"loss.weights.{name}: put {name} first; its state follows the rewards reported, "
                             "which are the first loss's")
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
    for name in names:
        combined = LOSS_CHECKS[name]({k: v for k, v in given.items() if k in LOSS_PARAMS[name]}) \
            if name in LOSS_CHECKS else None
        if combined:
            raise ValueError(f"loss.{combined[0]}: {combined[1]}")


def _names(loss: Any) -> list[str]:
    return list(loss.weights) if loss.weights else [loss.name]


def check_training_setup(loss: Any, *, grad_accum: int = 1, pass_tokens: int = 0, world: int = 1,
                         online: bool = False) -> None:
    """Raise ConfigError (a ValueError) naming the setting that a configured loss cannot train under. The
    config checks all but ``world``, which the training setup checks once the processes are known.

    A ``BATCHWISE`` loss must see an optimizer step's pairs at once: sorted per micro-batch, per pass or per
    rank, its quantiles would be those of each part, not of the step, and batch 8 x accumulation 1 would no
    longer equal batch 4 x accumulation 2; for the same reason WPO's per-pair weights (``loss.use_weighting``)
    have no pair to weigh there. Online DPO (``online``) does not carry a loss's state between its
    steps, and trains its sampled pairs in micro-batches; both kinds are refused there."""
    names = _names(loss)

    def key(name: str) -> str:
        return f"loss.weights.{name}" if loss.weights else "loss.name"

    stateful = [n for n in names if n in LOSS_STATE]
    if online and stateful:
        raise ConfigError(f"{key(stateful[0])}: loss {stateful[0]} carries state between steps, which online DPO "
                          "does not keep; use another loss")
    batchwise = [n for n in names if n in BATCHWISE]
    if not batchwise:
        return
    name = batchwise[0]
    if loss.use_weighting:
        # WPO multiplies the k-th loss by the k-th pair's weight; here the k-th loss is the k-th quantile.
        raise ConfigError(f"loss.use_weighting: WPO weighs each pair's loss, but loss {name}'s terms are quantiles "
                          "of the sorted batch, not pairs; remove loss.use_weighting or use a pairwise loss")
    why = f"loss {name} sorts the pairs of a batch against each other and needs a step's pairs in one pass"
    if grad_accum > 1:
        raise ConfigError(f"train.grad_accum: {why}; set it to 1 and raise train.batch_size instead")
    if pass_tokens:
        raise ConfigError(f"train.pass_tokens: {why}; set it to 0")
    if world > 1:
        raise ConfigError(f"{key(name)}: {why}, but torchrun splits them over {world} processes; run one process")
    if online:
        raise ConfigError(f"{key(name)}: {why}; online DPO trains its sampled pairs in micro-batches, use another "
                          "loss")


def needs_plain_chosen(loss: Any) -> bool:
    """Whether a training step must give ``compute_loss`` the chosen responses' plain log-probs: a configured
    loss has a term on them (``PLAIN_CHOSEN``) and ``loss.ld_alpha`` makes the compared ones differ."""
    return loss.ld_alpha is not None and any(name in PLAIN_CHOSEN for name in _names(loss))


def advance_loss_state(loss: Any, state: dict[str, Any], chosen_reward_mean: float, rejected_reward_mean: float,
                       pairs: int) -> dict[str, Any]:
    """The states of the configured losses that carry one (``LOSS_STATE``), after an applied optimizer step of
    ``pairs`` pairs with these mean rewards (over every pair of every rank). ``state``: name -> state, as kept in
    ``Run.task_state["loss"]``; empty when no configured loss carries state."""
    return {name: LOSS_STATE[name].update(state.get(name) or LOSS_STATE[name].initial(), chosen_reward_mean,
                                          rejected_reward_mean, pairs)
            for name in _names(loss) if name in LOSS_STATE}


def compute_loss(
    loss: Any,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    state: dict[str, Any] | None = None,
    plain_chosen_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the configured loss (or weighted sum of losses) of a ``LossConfig`` to a batch of pairs.

    Rewards reported are those of the first loss. Lengths are passed through; losses that average per token
    (``ipo``, ``simpo``, ``rpo``, ``sigmoid_norm``) raise ValueError without them. ``state`` (name -> state, see
    ``advance_loss_state``) feeds the losses that carry one; a missing entry is the initial state.
    ``plain_chosen_logps``, the chosen log-probs without LD-DPO's token weights (``needs_plain_chosen``), goes to
    the losses in ``PLAIN_CHOSEN``. Listwise losses raise ValueError. Shapes: (batch,) in and out.
    """
    weights = loss.weights or {loss.name: 1.0}
    for name in weights:
        if name in UNPAIRED:
            raise ValueError(f"loss '{name}' takes single labelled responses, not pairs: call "
                             f"dpokit.losses.kto_loss(policy_logps, ref_logps, labels, kl, beta=...) instead")
        if name in LISTWISE:
            raise ValueError(f"loss '{name}' is listwise and takes (batch, K) rankings, not pairs: call "
                             f"dpokit.losses.plackett_luce_loss(policy_logps, ref_logps, beta=...) instead")
    params = loss.params()
    total = None
    rewards: tuple[torch.Tensor, torch.Tensor] | None = None
    for name, weight in weights.items():
        own = {k: v for k, v in params.items() if k in LOSS_PARAMS[name]}
        if name in LOSS_STATE:
            own.update(LOSS_STATE[name].inputs((state or {}).get(name) or LOSS_STATE[name].initial()))
        if name in PLAIN_CHOSEN and plain_chosen_logps is not None:
            own["plain_chosen_logps"] = plain_chosen_logps
        losses, chosen_rewards, rejected_rewards = LOSSES[name](
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            beta=loss.beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **own)
        total = weight * losses if total is None else total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    assert total is not None and rewards is not None
    return total, rewards[0], rewards[1]
