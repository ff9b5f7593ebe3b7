"""The sentiment recipe's report: ``summary.json`` (the headline and every run), the before/after table on the
terminal, ``results.md`` for the docs and the reward-KL frontier plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.io import write_text
from dpokit.recipes.sentiment.common import RECIPE
from dpokit.recipes.sentiment.runs import beta_name

if TYPE_CHECKING:
    from dpokit.recipes.sentiment.config import SentimentConfig


def _num(value: Any, stderr: Any = None, digits: int = 3) -> str:
    """``0.123 ± 0.045``, or ``—`` for a value that was not measured."""
    if value is None:
        return "—"
    return f"{value:.{digits}f}" + (f" ± {stderr:.{digits}f}" if stderr else "")


def _cells(name: str, run: dict[str, Any]) -> tuple[str, str, str]:
    """A run's reward, KL and implicit-reward accuracy as both tables show them (Best-of-N's KL is the
    analytic bound, ``runs.best_of_n_kl``)."""
    kl = _num(run["kl"], run["kl_stderr"], 2) + (" (bound)" if name.startswith("best-of-") else "")
    acc = f"{100 * run['implicit_accuracy']:.1f}%" if run["implicit_accuracy"] is not None else "—"
    return _num(run["reward"], run["reward_stderr"]), kl, acc


def summarize(cfg: SentimentConfig, results: dict[str, dict[str, Any]], labels: dict[str, str],
              extra: dict[str, Any]) -> dict[str, Any]:
    """summary.json: the headline (pi_ref vs the first DPO run) and one entry per run."""
    headline = beta_name(cfg.dpo.betas[0])
    main = results[headline]
    runs = {}
    for name, ev in results.items():
        runs[name] = {"label": labels[name], "reward": ev.get("reward"), "reward_stderr": ev.get("reward_stderr"),
                      "reward_reference": ev.get("reward_reference"), "kl": ev.get("kl"),
                      "kl_stderr": ev.get("kl_stderr"), "implicit_accuracy": ev.get("rewards/accuracies"),
                      **({"seconds": ev["seconds"]} if ev.get("seconds") else {}),
                      "frontier": [{k: p.get(k) for k in ("checkpoint", "step", "kl", "reward")}
                                   for p in ev.get("frontier") or []]}
    reward_ref, reward_policy = main.get("reward_reference"), main.get("reward")
    return {
        "recipe": RECIPE, "headline_run": headline, "model": cfg.model,
        "n_heldout": main.get("n_prompts"), "reward_ref": reward_ref, "reward_policy": reward_policy,
        "reward_policy_stderr": main.get("reward_stderr"),
        "reward_gain": (reward_policy - reward_ref) if reward_ref is not None and reward_policy is not None else None,
        "kl": main.get("kl"), "kl_stderr": main.get("kl_stderr"),
        "implicit_accuracy": main.get("rewards/accuracies"), "heldout_pairs": main.get("heldout_pairs"),
        **extra, "runs": runs,
    }


def print_table(summary: dict[str, Any]) -> None:
    """The before/after table: pi_ref and every run on the held-out prompts."""
    from rich.table import Table

    from dpokit.terminal import console as make_console

    table = Table(title=f"controlled sentiment: {summary['n_heldout']} held-out prompts, temperature 1.0")
    for column, justify in (("model", "left"), ("reward (VADER)", "right"), ("KL(π‖π_ref)", "right"),
                            ("implicit-reward acc.", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_row("π_ref (before)", _num(summary["reward_ref"]), "0", "—")
    for name, run in summary["runs"].items():
        table.add_row(run["label"] + (" (after)" if name == summary["headline_run"] else ""), *_cells(name, run))
    console = make_console()
    console.print(table)
    gain = summary.get("reward_gain")
    if gain is not None:
        console.print(f"held-out mean reward {summary['reward_ref']:.3f} -> {summary['reward_policy']:.3f} "
                      f"({gain:+.3f}) at KL {summary['kl']:.2f} nats; implicit-reward accuracy "
                      f"{100 * (summary['implicit_accuracy'] or 0):.1f}% on {summary['heldout_pairs']} held-out pairs")


def _seconds(run: dict[str, Any]) -> str:
    """Wall-clock of a run: the sampling of its data (pi_ref's preference samples, or its own samples during
    training) and its training loop (``runs.wall_clock``); ``—`` where not recorded."""
    s = run.get("seconds") or {}
    if s.get("train_s") is None or s.get("data_s") is None:
        return "—"
    sampling = s["data_s"] + s["sample_s"]
    return f"{s['data_s'] + s['train_s']:.0f} ({sampling:.0f})"


def results_markdown(summary: dict[str, Any]) -> str:
    """The results as a Markdown table (``RUN_DIR/results.md``), for docs: every run's held-out reward and KL,
    and its wall-clock."""
    lines = [f"{summary['n_heldout']} held-out prompts at temperature 1.0 (mean ± standard error). Seconds: "
             "sampling the data a run trains on plus its training loop (sampling alone in brackets).",
             "", "| method | reward (VADER) | KL(π‖π_ref) nats | implicit-reward accuracy | reward gain over π_ref "
             "| seconds (sampling) |", "|---|---|---|---|---|---|",
             f"| π_ref | {_num(summary['reward_ref'])} | 0 | — | — | — |"]
    for name, run in summary["runs"].items():
        reward, kl, acc = _cells(name, run)
        ref = run.get("reward_reference")
        gain = f"{run['reward'] - ref:+.3f}" if run.get("reward") is not None and ref is not None else "—"
        lines.append(f"| {run['label']} | {reward} | {kl} | {acc} | {gain} | {_seconds(run)} |")
    return "\n".join(lines) + "\n"


def write_frontier(results: dict[str, dict[str, Any]], labels: dict[str, str], path: Path) -> Path | None:
    """Every run's reward-KL frontier in one SVG plot at ``path``; None when no run has one."""
    from dpokit.evaluate import plots

    svg = plots.frontier([(labels[name], ev) for name, ev in results.items()], beta_in_label=False)
    if svg is None:
        return None
    return write_text(path, svg)
