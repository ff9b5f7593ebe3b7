"""The loss registry: one ``LossSpec`` per loss (its function, parameters and their checks, the state it
carries between optimizer steps, its kind), and the functions the rest of dpokit calls: ``validate_loss_config``
and ``check_training_setup`` for the config, ``loss_arguments`` (beta and a loss's own parameters),
``compute_loss`` for a batch of pairs, ``advance_loss_state`` after a step."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from dpokit.errors import ConfigError

LossFn = Callable[..., Any]
"""A loss function: pairwise ones return ``(losses, chosen_rewards, rejected_rewards)`` (see ``dpokit.losses``);
the listwise and the unpaired one take and return other tensors (their spec's ``kind`` says which)."""

Check = Callable[[Any], str | None]
"""check(value) -> error message or None."""

LossKind = Literal["pairwise", "batchwise", "listwise", "unpaired"]


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


@dataclass(frozen=True)
class LossSpec:
    """Everything dpokit knows about one loss, written once where the loss is defined (``register``)."""

    name: str
    fn: LossFn
    kind: LossKind = "pairwise"
    """How a batch reaches it. ``pairwise``: each pair on its own, through ``compute_loss``. ``batchwise``: also
    through ``compute_loss``, but one pair's term depends on the other pairs of the batch (they sort across
    it): gradient accumulation, ``train.pass_tokens`` and torchrun would each split a step's pairs into batches
    sorted apart, a different objective from the whole step's, so ``check_training_setup`` refuses them.
    ``listwise``: (batch, K) rankings, ``policy_logps, ref_logps`` in. ``unpaired``: single labelled responses
    (``{"prompt", "completion", "label"}`` rows), its own kind of training (KTO). Neither of the last two can be
    summed with other losses or go through ``compute_loss``."""
    params: Mapping[str, Check] = field(default_factory=dict)
    """parameter -> its check. A parameter not listed is not used by the loss."""
    required: frozenset[str] = frozenset()
    """Parameters that must be set in the config (the others in ``params`` have defaults)."""
    state: LossState | None = None
    """What the loss carries between optimizer steps, when it carries anything."""
    check: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None
    """check(the loss's given parameters) -> (parameter, error message) or None, for rules that tie parameters
    together (``f_dpo``: the alpha coefficient only with the alpha-divergence)."""
    plain_chosen: bool = False
    """A term on the chosen response's own log-prob (``rpo``'s NLL) rather than on the log-probs every loss
    compares, which ``loss.ld_alpha`` length-desensitizes: ``compute_loss`` passes it ``plain_chosen_logps``."""

    @property
    def on_pairs(self) -> bool:
        """Whether it goes through ``compute_loss`` (and may be summed with other such losses)."""
        return self.kind in ("pairwise", "batchwise")


SPECS: dict[str, LossSpec] = {}
"""name -> its ``LossSpec``, filled by ``register``."""


class _LossFunctions(Mapping[str, LossFn]):
    """name -> loss function, read from ``SPECS`` (so there is no second table to keep in step)."""

    def __getitem__(self, name: str) -> LossFn:
        return SPECS[name].fn

    def __iter__(self) -> Iterator[str]:
        return iter(SPECS)

    def __len__(self) -> int:
        return len(SPECS)


LOSSES: Mapping[str, LossFn] = _LossFunctions()
"""name -> loss function (the public view of ``SPECS``)."""


def register(
    name: str, params: dict[str, Check] | None = None, required: tuple[str, ...] = (),
    state: LossState | None = None, check: Callable[[dict[str, Any]], tuple[str, str] | None] | None = None,
    plain_chosen: bool = False, kind: LossKind = "pairwise",
) -> Callable[[LossFn], LossFn]:
    """Decorator: the function as loss ``name``, with the rest of its ``LossSpec``."""
    def wrap(fn: LossFn) -> LossFn:
        SPECS[name] = LossSpec(name, fn, kind, dict(params or {}), frozenset(required), state, check, plain_chosen)
        return fn

    return wrap


def loss_spec(name: str) -> LossSpec:
    """The spec of a registered loss (KeyError for an unknown name: the config refuses those first)."""
    return SPECS[name]


def configured_specs(loss: Any) -> list[LossSpec]:
    """The specs of the losses a ``LossConfig`` names, first (the one whose rewards are reported) first."""
    return [SPECS[name] for name in _names(loss)]


def trained_kind(loss: Any) -> LossKind:
    """The kind of what a ``LossConfig`` trains: ``loss.weights``' first loss when a sum is given (its terms are
    pairwise or batchwise: the others cannot be summed), else ``loss.name``'s, which ``loss.weights`` leaves
    unused."""
    return configured_specs(loss)[0].kind


def loss_arguments(loss: Any, spec: LossSpec, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments a ``LossConfig`` gives loss ``spec``: beta, the parameters it uses and, for a loss
    that carries state, its state's inputs (``state``: name -> state; a missing entry is the initial state).
    The one place a loss's beta is read from the config."""
    own = {k: v for k, v in loss.params().items() if k in spec.params}
    if spec.state is not None:
        own.update(spec.state.inputs((state or {}).get(spec.name) or spec.state.initial()))
    return {"beta": loss.beta, **own}


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
        if name not in SPECS:
            key = f"loss.weights.{name}" if loss.weights else "loss.name"
            raise ValueError(f"{key}: unknown loss '{name}' (known: {', '.join(sorted(SPECS))})")
        spec = SPECS[name]
        if loss.weights and spec.kind == "unpaired":
            raise ValueError(f"loss.weights.{name}: the unpaired loss '{name}' cannot be combined with others; "
                             f"use loss.name: {name} alone")
        if loss.weights and spec.kind == "listwise":
            # A listwise loss takes (batch, K) rankings, not the pairs the other terms of a sum take.
            raise ValueError(f"loss.weights.{name}: the listwise loss '{name}' cannot be combined with others; "
                             f"use loss.name: {name} alone")
        if loss.weights and spec.state is not None and name != names[0]:
            # Its state is updated from the step's reported rewards, which are the first loss's (simpo's differ).
            raise ValueError(f"loss.weights.{name}: put {name} first; its state follows the rewards reported, "
                             "which are the first loss's")
    specs = configured_specs(loss)
    given = loss.params()
    for spec in specs:
        missing = sorted(spec.required - set(given))
        if missing:
            raise ValueError(f"loss.{missing[0]}: required by loss {spec.name}")
    for param, value in given.items():
        users = [spec for spec in specs if param in spec.params]
        if not users:
            raise ValueError(f"loss.{param}: not used by loss {' + '.join(names)}; remove it")
        for spec in users:
            problem = spec.params[param](value)
            if problem:
                raise ValueError(f"loss.{param}: {problem}, got {value!r}")
    for spec in specs:
        combined = spec.check({k: v for k, v in given.items() if k in spec.params}) if spec.check else None
        if combined:
            raise ValueError(f"loss.{combined[0]}: {combined[1]}")


def _names(loss: Any) -> list[str]:
    return list(loss.weights) if loss.weights else [loss.name]


def check_training_setup(loss: Any, *, grad_accum: int = 1, pass_tokens: int = 0, world: int = 1,
                         online: bool = False) -> None:
    """Raise ConfigError (a ValueError) naming the setting that a configured loss cannot train under. The
    config checks all but ``world``, which the training setup checks once the processes are known.

    A ``batchwise`` loss must see an optimizer step's pairs at once: sorted per micro-batch, per pass or per
    rank, its quantiles would be those of each part, not of the step, and batch 8 x accumulation 1 would no
    longer equal batch 4 x accumulation 2; for the same reason WPO's per-pair weights (``loss.use_weighting``)
    have no pair to weigh there. Online DPO (``online``) does not carry a loss's state between its
    steps, and trains its sampled pairs in micro-batches; both kinds are refused there."""
    specs = configured_specs(loss)

    def key(name: str) -> str:
        return f"loss.weights.{name}" if loss.weights else "loss.name"

    stateful = [spec.name for spec in specs if spec.state is not None]
    if online and stateful:
        raise ConfigError(f"{key(stateful[0])}: loss {stateful[0]} carries state between steps, which online DPO "
                          "does not keep; use another loss")
    batchwise = [spec.name for spec in specs if spec.kind == "batchwise"]
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
    loss has a term on them (``LossSpec.plain_chosen``) and ``loss.ld_alpha`` makes the compared ones differ."""
    return loss.ld_alpha is not None and any(spec.plain_chosen for spec in configured_specs(loss))


def carries_state(loss: Any) -> bool:
    """Whether a configured loss carries state between optimizer steps (``LossSpec.state``)."""
    return any(spec.state is not None for spec in configured_specs(loss))


def advance_loss_state(loss: Any, state: dict[str, Any], chosen_reward_mean: float, rejected_reward_mean: float,
                       pairs: int) -> dict[str, Any]:
    """The states of the configured losses that carry one (``LossSpec.state``), after an applied optimizer step
    of ``pairs`` pairs with these mean rewards (over every pair of every rank). ``state``: name -> state, as
    kept in ``Run.task_state["loss"]``; empty when no configured loss carries state."""
    return {spec.name: spec.state.update(state.get(spec.name) or spec.state.initial(), chosen_reward_mean,
                                         rejected_reward_mean, pairs)
            for spec in configured_specs(loss) if spec.state is not None}


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
    the losses with ``plain_chosen``. Listwise and unpaired losses raise ValueError. Shapes: (batch,) in and
    out.
    """
    weights = loss.weights or {loss.name: 1.0}
    for name in weights:
        kind = SPECS[name].kind
        if kind == "unpaired":
            raise ValueError(f"loss '{name}' takes single labelled responses, not pairs: call "
                             f"dpokit.losses.kto_loss(policy_logps, ref_logps, labels, kl, beta=...) instead")
        if kind == "listwise":
            raise ValueError(f"loss '{name}' is listwise and takes (batch, K) rankings, not pairs: call "
                             f"dpokit.losses.plackett_luce_loss(policy_logps, ref_logps, beta=...) instead")
    total = None
    rewards: tuple[torch.Tensor, torch.Tensor] | None = None
    for name, weight in weights.items():
        spec = SPECS[name]
        own = loss_arguments(loss, spec, state)
        if spec.plain_chosen and plain_chosen_logps is not None:
            own["plain_chosen_logps"] = plain_chosen_logps
        losses, chosen_rewards, rejected_rewards = spec.fn(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **own)
        total = weight * losses if total is None else total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    assert total is not None and rewards is not None
    return total, rewards[0], rewards[1]
