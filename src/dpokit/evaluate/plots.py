"""Plots of the report as inline SVG strings (matplotlib's ``svg`` backend: no display, no network, no JS).

Every function takes plain data (lists of dicts read from ``metrics.jsonl`` and ``eval.json``) and returns an
``<svg>`` element ready to paste into HTML: no XML prolog, no fixed size (it scales with its container), text
kept as text (selectable, styled by the page's font), and element ids salted per figure so several plots on one
page never share an id.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

PALETTE = ["#3b5bdb", "#e8590c", "#0ca678", "#c2255c", "#7048e8", "#f08c00", "#1098ad", "#5c940d"]
"""One color per run (Open Color 8/9 shades: distinct, readable on white, fine when printed in grey)."""
CHOSEN, REJECTED = "#2b8a3e", "#c92a2a"
INK, MUTED, GRID = "#212529", "#868e96", "#e9ecef"

_counter = itertools.count()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("svg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "svg.fonttype": "none",  # text stays text, drawn in the page's font
        "font.family": "sans-serif",
        "font.sans-serif": ["Inter", "Helvetica Neue", "Helvetica", "Arial", "DejaVu Sans"],
        "font.size": 9.5,
        "axes.edgecolor": "#ced4da",
        "axes.labelcolor": INK,
        "axes.titlesize": 10.5,
        "axes.titleweight": "bold",
        "axes.titlelocation": "left",
        "axes.titlepad": 8,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": GRID,
        "grid.linewidth": 0.8,
        "xtick.color": MUTED,
        "ytick.color": MUTED,
        "xtick.labelcolor": INK,
        "ytick.labelcolor": INK,
        "legend.frameon": False,
        "legend.fontsize": 8.5,
        "lines.linewidth": 1.8,
        "figure.dpi": 100,
    })
    return plt


def _figure(width: float = 4.6, height: float = 2.9) -> tuple[Any, Any]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    return fig, ax


def _to_svg(fig: Any) -> str:
    plt = _pyplot()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", pad_inches=0.04)
    plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    # matplotlib numbers its elements per figure (figure_1, axes_1, clip paths by hash), so two plots inlined in
    # one page would share ids, and a clip-path reference could resolve to the other plot's: prefix them all.
    prefix = f"p{next(_counter)}-"
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", svg)
    svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', svg)
    # Drop the fixed width/height (keep the viewBox) so CSS sizes the plot.
    head_end = svg.index(">")
    head = re.sub(r'\s(width|height)="[^"]*"', "", svg[:head_end])
    return head + ' role="img"' + svg[head_end:]


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average (bias-corrected, so the first points are not pulled toward 0)."""
    out, acc, weight = [], 0.0, 0.0
    for value in values:
        acc = (1 - alpha) * acc + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append(acc / weight)
    return out


def _finite(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and row.get("step") is not None:
            xs.append(row["step"])
            ys.append(float(value))
    return xs, ys


def curve(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], keys: Sequence[tuple[str, str]], title: str,
          ylabel: str = "", hline: float | None = None, ylim: tuple[float, float] | None = None) -> str | None:
    """Training curve(s) over optimizer steps: for each run and each (metric, label), the train rows as a line
    (raw values faint and an EMA on top when there are many steps) and the eval rows as dashed markers.

    With one run and two keys (chosen / rejected) the keys get green / red; with several runs, each run its color
    and each key a line style. Returns None when no row has any of the keys.
    """
    fig, ax = _figure()
    styles = ["-", ":", "--", "-."]
    drawn = False
    for r, (name, rows) in enumerate(runs):
        train = [row for row in rows if row.get("split", "train") == "train"]
        evals = [row for row in rows if row.get("split") == "eval"]
        for k, (key, label) in enumerate(keys):
            if len(runs) == 1 and len(keys) == 2:
                color, style = (CHOSEN, REJECTED)[k], "-"
                base = label
            else:
                color, style = PALETTE[r % len(PALETTE)], styles[k % len(styles)]
                base = name if len(keys) == 1 else f"{name} · {label}"
            xs, ys = _finite(train, key)
            if xs:
                drawn = True
                if len(xs) >= 40:
                    ax.plot(xs, ys, color=color, alpha=0.22, linewidth=1.0, linestyle=style)
                    ax.plot(xs, ema(ys, 2 / (1 + max(4, len(xs) // 15))), color=color, linestyle=style,
                            label=f"{base} (train)" if evals else base)
                else:
                    ax.plot(xs, ys, color=color, linestyle=style, marker="o" if len(xs) < 12 else None,
                            markersize=3, label=f"{base} (train)" if evals else base)
            ex, ey = _finite(evals, key)
            if ex:
                drawn = True
                ax.plot(ex, ey, color=color, linestyle=(0, (4, 3)), linewidth=1.3, marker="D", markersize=4,
                        markerfacecolor="white", markeredgewidth=1.4, label=f"{base} (held-out)")
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    if hline is not None:
        ax.axhline(hline, color=MUTED, linewidth=0.9, linestyle=(0, (2, 2)), zorder=0)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel("step")
    _integer_steps(ax)
    if ylabel:
        ax.set_ylabel(ylabel)
    _legend(ax)
    return _to_svg(fig)


def _integer_steps(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax: Any) -> None:
    """Inside the axes when short; below them, in two columns, when it would cover the curves."""
    entries = len(ax.get_legend_handles_labels()[1])
    if entries <= 4:
        ax.legend(loc="best")
    else:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=7.5)


def frontier(runs: Sequence[tuple[str, dict[str, Any]]], beta_in_label: bool = True) -> str | None:
    """The reward-KL frontier (the DPO paper's Fig. 2, left): mean ground-truth reward of policy samples against
    the sequence-level KL(pi || pi_ref), one point per checkpoint, each run a connected path from its pi_ref
    point (kl = 0). Error bars are one standard error. pi_ref is labelled once per estimate of it: runs
    evaluated on the same samples share one; where runs estimated it on different samples (Best-of-N reads pi_ref's
    own held-out samples), each estimate is named and a note under the plot says why there are several.
    None when no run has a reward on its frontier."""
    fig, ax = _figure(5.2, 3.4)
    drawn = False
    references: dict[tuple[float, float], list[str]] = {}  # (kl, reward) of a pi_ref estimate -> its runs
    for r, (name, ev) in enumerate(runs):
        points = [p for p in ev.get("frontier") or [] if p.get("reward") is not None and p.get("kl") is not None]
        if not points:
            continue
        drawn = True
        color = PALETTE[r % len(PALETTE)]
        xs = [p["kl"] for p in points]
        ys = [p["reward"] for p in points]
        label = f"{name} (β={ev.get('beta'):g})" if beta_in_label and ev.get("beta") else name
        ax.errorbar(xs, ys, xerr=[p.get("kl_stderr") or 0 for p in points],
                    yerr=[p.get("reward_stderr") or 0 for p in points], color=color, marker="o", markersize=5,
                    capsize=2, elinewidth=0.8, linewidth=1.5, label=label)
        for p in points:
            if p.get("checkpoint") == "reference":
                references.setdefault((p["kl"], p["reward"]), []).append(name)
                continue
            ax.annotate(str(p["step"]), (p["kl"], p["reward"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7.5, color=MUTED)
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    _label_references(ax, references)
    ax.set_title("Reward vs KL(π ‖ π_ref)")
    ax.set_xlabel("sequence-level KL(π ‖ π_ref), nats")
    ax.set_ylabel("mean reward of samples")
    ax.legend(loc="best")
    return _to_svg(fig)


def _label_references(ax: Any, references: dict[tuple[float, float], list[str]]) -> None:
    """One "π_ref" tag per estimate of pi_ref's reward; several estimates are named by their runs, with a note
    saying they are one model measured on different samples (their gap is sampling noise, not a difference)."""
    if not references:
        return
    # The estimate most runs share goes unnamed: it is the reference the trained runs were evaluated against.
    ordered = sorted(references.items(), key=lambda item: -len(item[1]))
    for i, ((kl, reward), names) in enumerate(ordered):
        tag = "π_ref" if i == 0 else f"π_ref ({', '.join(names)})"
        ax.annotate(tag, (kl, reward), textcoords="offset points", xytext=(5, 4), fontsize=7.5, color=MUTED)
    if len(ordered) > 1:
        rewards = ", ".join(f"{reward:.3f}" for (_, reward), _ in ordered)
        ax.text(0.0, -0.2, f"π_ref is shown {len(ordered)} times ({rewards}): the same model, its reward "
                "estimated on different samples;\neach line starts at the estimate its own run measured.",
                transform=ax.transAxes, fontsize=7, color=MUTED, va="top")


def _runs_with(runs: Sequence[tuple[str, dict[str, Any]]], select: Any,
               at_least: int = 2) -> Iterator[tuple[int, str, list[Any]]]:
    """(index, name, points) of each run with at least ``at_least`` points picked by ``select(eval)``: a line
    needs two points; the index keeps a run's colour the same in every plot."""
    for r, (name, ev) in enumerate(runs):
        points = select(ev)
        if len(points) >= at_least:
            yield r, name, points


def kl_by_step(runs: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """KL(pi || pi_ref) at each checkpoint, for runs evaluated without a ground-truth reward."""
    fig, ax = _figure()
    drawn = False
    def measured(ev: dict[str, Any]) -> list[dict[str, Any]]:
        return [p for p in ev.get("frontier") or [] if p.get("kl") is not None]

    for r, name, points in _runs_with(runs, measured):
        drawn = True
        ax.errorbar([p["step"] for p in points], [p["kl"] for p in points],
                    yerr=[p.get("kl_stderr") or 0 for p in points], color=PALETTE[r % len(PALETTE)], marker="o",
                    markersize=4, capsize=2, elinewidth=0.8, label=name)
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    ax.set_title("KL(π ‖ π_ref) by checkpoint")
    ax.set_xlabel("step")
    _integer_steps(ax)
    ax.set_ylabel("nats")
    ax.legend(loc="best")
    return _to_svg(fig)


def win_rate_by_temperature(runs: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """Win rate against the baseline at each sampling temperature, with its confidence interval as a band
    (the paper's Fig. 2, right / Fig. 3). None unless some run was judged at two or more temperatures."""
    fig, ax = _figure(5.2, 3.4)
    drawn = False
    def judged(ev: dict[str, Any]) -> list[dict[str, Any]]:
        return [e for e in ev.get("temperatures") or [] if e.get("win_rate") is not None]

    for r, name, entries in _runs_with(runs, judged):
        drawn = True
        color = PALETTE[r % len(PALETTE)]
        ts = [e["temperature"] for e in entries]
        ax.plot(ts, [e["win_rate"] for e in entries], color=color, marker="o", markersize=5, label=name)
        lows = [(e.get("win_rate_ci") or [None, None])[0] for e in entries]
        highs = [(e.get("win_rate_ci") or [None, None])[1] for e in entries]
        if all(v is not None for v in lows + highs):
            ax.fill_between(ts, lows, highs, color=color, alpha=0.12, linewidth=0)
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    ax.axhline(0.5, color=MUTED, linewidth=0.9, linestyle=(0, (2, 2)), zorder=0)
    ax.set_ylim(0, 1)
    ax.set_title("Win rate vs sampling temperature")
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate (95% CI)")
    ax.legend(loc="best")
    return _to_svg(fig)
