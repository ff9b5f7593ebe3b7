"""The loss keys of a TRL ``DPOConfig`` (``beta``, ``loss_type``, ``loss_weights``, ``label_smoothing``, the
losses' parameters) translated into dpokit's ``loss`` section, for ``dpokit.integrations.from_trl``."""

from __future__ import annotations

from typing import Any

from dpokit.errors import ConfigError

F_ALPHA_DEFAULT = 0.5
"""TRL 1.x's default ``f_alpha_divergence_coef``."""

LOSSES_WITH_SMOOTHING_IN_TRL = {"robust", "exo_pair", "aot", "aot_pair", "aot_unpaired"}
"""TRL 1.x losses whose formula reads ``label_smoothing``; the others ignore it silently (``sigmoid`` read it as
cDPO before TRL 1.0: ``translate(..., label_smoothing="cdpo")``)."""
TRL_RENAMES = {"aot_pair": "aot_unpaired"}
"""TRL's ``aot_pair`` is AOT for unpaired data (its docstring), dpokit's ``aot_unpaired``."""


def loss_section(values: dict[str, Any], given: dict[str, Any], out: Any, known: set[str],
                 sigmoid_smoothing: str) -> None:
    """``beta``, ``loss_type`` with ``loss_weights`` and the losses' parameters -> dpokit's ``loss`` section."""
    out.put("loss.beta", float(values["beta"]))
    loss_type = values["loss_type"]
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    names = [TRL_RENAMES.get(n, n) for n in names]
    weights = values.get("loss_weights")
    if weights is not None and len(weights) != len(names):  # TRL's DPOConfig refuses it too
        raise ConfigError(f"loss_weights: {len(weights)} weights for {len(names)} loss types")
    weights = [float(w) for w in (weights or [1.0] * len(names))]
    names, weights = _fold_sft(names, weights, out)
    unknown = [n for n in names if n not in known]
    if unknown:
        out.unmapped["loss_type"] = f"'{unknown[0]}' has no dpokit loss (known: {', '.join(sorted(known))})"
        weights = [w for n, w in zip(names, weights) if n in known] or [1.0]
        names = [n for n in names if n in known] or ["sigmoid"]
    if "bco_pair" in names:
        out.notes.append("bco_pair: dpokit's shifts the rewards by BCO's running mean delta, as TRL before 1.x; "
                         "TRL 1.x's bco_pair has no shift")
    names, smoothing = _label_smoothing(names, float(values.get("label_smoothing") or 0.0), sigmoid_smoothing, out)
    rpo_alpha = values.get("rpo_alpha")
    if rpo_alpha is not None:
        if "rpo" in names:
            out.unmapped["rpo_alpha"] = "the loss list's sft term is the NLL term already (loss.alpha)"
        elif names == ["sigmoid"]:
            names = ["rpo"]
            out.put("loss.alpha", float(rpo_alpha))
        else:
            out.unmapped["rpo_alpha"] = ("dpokit's rpo is the sigmoid loss plus the NLL term; TRL's rpo_alpha on "
                                         f"loss_type {loss_type} has no counterpart")
    divergence = values.get("f_divergence_type")
    divergence = getattr(divergence, "value", divergence)
    if divergence not in (None, "reverse_kl"):
        if names == ["sigmoid"] and "f_dpo" in known:
            names = ["f_dpo"]
            out.put("loss.f_divergence", str(divergence))
            if divergence == "alpha_divergence":  # TRL's default (0.5 in 1.x, 1.0 before) written out
                out.put("loss.f_alpha_divergence_coef", float(values["f_alpha_divergence_coef"]))
        else:
            out.unmapped["f_divergence_type"] = f"an f-divergence with loss_type {loss_type} has no counterpart"
    elif given.get("f_alpha_divergence_coef") not in (None, F_ALPHA_DEFAULT, 1.0):
        out.unmapped["f_alpha_divergence_coef"] = "used by TRL only with f_divergence_type alpha_divergence"
    if len(names) > 1 or weights != [1.0]:
        from dpokit.losses.registry import loss_spec

        # A loss with state (bco_pair's delta) goes first: its state follows the first loss's rewards. The order
        # of a sum changes nothing else.
        order = sorted(range(len(names)), key=lambda i: loss_spec(names[i]).state is None)
        out.put("loss.weights", {names[i]: weights[i] for i in order})
    else:
        out.put("loss.name", names[0])
    if smoothing:
        out.put("loss.label_smoothing", smoothing)
    elif "exo_pair" in names:
        out.notes.append("exo_pair with label_smoothing 0 is 1e-3 in TRL, dpokit's default: left unset")
    if values.get("reference_free"):
        if names == ["sigmoid"]:
            out.put("loss.reference_free", True)
        else:
            out.unmapped["reference_free"] = f"dpokit takes reference_free with the sigmoid loss only, not {names}"
    if "discopop" in names and values.get("discopop_tau") is not None:
        out.put("loss.discopop_tau", float(values["discopop_tau"]))
    elif given.get("discopop_tau") not in (None, 0.05):
        out.unmapped["discopop_tau"] = "used by TRL only with loss_type discopop"
    if values.get("use_weighting"):
        out.put("loss.use_weighting", True)
    if values.get("ld_alpha") is not None:
        out.put("loss.ld_alpha", float(values["ld_alpha"]))


def _label_smoothing(names: list[str], smoothing: float, sigmoid_smoothing: str,
                     out: Any) -> tuple[list[str], float]:
    """The loss names and the smoothing to write: TRL 1.x reads label_smoothing in
    ``LOSSES_WITH_SMOOTHING_IN_TRL`` only; ``sigmoid_smoothing`` ``cdpo`` reads it as TRL before 1.0 did."""
    if not smoothing:
        return names, smoothing
    if names == ["sigmoid"] and sigmoid_smoothing == "cdpo":
        out.notes.append("loss_type sigmoid with label_smoothing: cDPO, as TRL before 1.0 (loss.name cdpo)")
        return ["cdpo"], smoothing  # TRL's sigmoid with label_smoothing before 1.0: cDPO's formula
    if any(n in LOSSES_WITH_SMOOTHING_IN_TRL for n in names):
        return names, smoothing
    if "sigmoid" in names:
        out.unmapped["label_smoothing"] = (
            f"TRL 1.x's sigmoid loss ignores it, so the plain sigmoid loss is written, as TRL 1.x trains; for "
            f"cDPO (TRL before 1.0) train with loss.name=cdpo loss.label_smoothing={smoothing:g}")
    else:
        out.unmapped["label_smoothing"] = (f"TRL ignores it silently for loss_type {' + '.join(names)}; dpokit "
                                           "refuses a parameter its loss does not use, so it is left out")
    return names, 0.0


def _fold_sft(names: list[str], weights: list[float], out: Any) -> tuple[list[str], list[float]]:
    """TRL's ``sft`` loss term, w_sft x the NLL of the chosen tokens, folded into dpokit's ``rpo`` (sigmoid +
    alpha x the per-token NLL of y_w): w_s sigmoid + w_sft NLL = w_s (sigmoid + (w_sft / w_s) NLL), so the
    ``sigmoid`` term becomes ``rpo`` with weight w_s and alpha = w_sft / w_s (MPO's [sigmoid, bco_pair, sft], RPO's
    [sigmoid, sft]). TRL averages the NLL over the batch's chosen tokens, rpo per pair's tokens then over pairs:
    the same when the chosen responses are equally long, and each response weighs equally otherwise."""
    if "sft" not in names:
        return names, weights
    w_sft = sum(w for n, w in zip(names, weights) if n == "sft")
    kept = [(n, w) for n, w in zip(names, weights) if n != "sft"]
    if not any(n == "sigmoid" for n, _ in kept):
        out.unmapped["loss_type"] = ("its 'sft' term is dpokit's rpo NLL, which comes with the sigmoid loss only: "
                                     "left out (SFT alone is `dpokit sft`)")
        return [n for n, _ in kept] or ["sigmoid"], [w for _, w in kept] or [1.0]
    w_s = next(w for n, w in kept if n == "sigmoid")
    out.put("loss.alpha", w_sft / w_s)
    out.notes.append(f"loss_type sft (weight {w_sft:g}) with sigmoid (weight {w_s:g}): rpo, sigmoid + "
                     f"alpha x NLL of the chosen response, loss.alpha {w_sft / w_s:g}")
    return [("rpo" if n == "sigmoid" else n) for n, _ in kept], [w for _, w in kept]
