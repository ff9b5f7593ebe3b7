"""``dpokit report RUN_DIR...``: one self-contained HTML page per set of runs.

The page needs nothing but itself: plots are inline SVG (``dpokit.evaluate.plots``), the style sheet is inline,
there is no script and no external font or image, so it opens offline, in a mail attachment or a CI artifact.

Contents: a table of runs; training curves from ``metrics.jsonl`` (loss, implicit-reward accuracy and margins,
chosen/rejected rewards and log-probs, gradient norm); when ``dpokit eval`` has run, the reward-KL frontier
across runs and checkpoints (the paper's Fig. 2, left), win rate against sampling temperature, and side-by-side
samples (prompt, reference response, policy response, their implicit and ground-truth rewards).

Only the standard library and matplotlib are used here (no torch), so a report of many runs is quick.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import DpokitError
from dpokit.evaluate import plots
from dpokit.io import write_text

KL_TEMPERATURE = 1.0  # the temperature whose samples the page shows (pi itself); see dpokit.evaluate.run


@dataclass
class RunData:
    """What the report reads from one run directory."""

    path: Path
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file. A last line cut short (the writer was killed mid-line) is skipped: a report
    of a crashed run is exactly when one wants the curves."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DpokitError(f"{path}:{i + 1}: invalid JSON") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run(path: str | Path) -> RunData:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise DpokitError(f"{run_dir}: no such run directory")
    has = {name: (run_dir / name).is_file() for name in ("config.yaml", "metrics.jsonl")}
    eval_path = run_dir / "eval" / "eval.json"
    if not has["metrics.jsonl"] and not eval_path.is_file():
        raise DpokitError(f"{run_dir}: not a run directory (no metrics.jsonl and no eval/eval.json)")
    data = RunData(run_dir, run_dir.resolve().name)
    if has["config.yaml"]:
        try:
            loaded = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raise DpokitError(f"{run_dir / 'config.yaml'}: invalid YAML") from None
        data.config = loaded if isinstance(loaded, dict) else {}
    if has["metrics.jsonl"]:
        data.metrics = read_jsonl(run_dir / "metrics.jsonl")
    if eval_path.is_file():
        try:
            data.eval = json.loads(eval_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise DpokitError(f"{eval_path}: invalid JSON (re-run dpokit eval)") from None
        if (run_dir / "eval" / "samples.jsonl").is_file():
            data.samples = read_jsonl(run_dir / "eval" / "samples.jsonl")
    return data


def _unique_names(runs: list[RunData]) -> None:
    """Runs named alike (``a/run``, ``b/run``) are told apart by their parent folder."""
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}"


# ---------------------------------------------------------------------------------------------- formatting

def _fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    if value != 0 and (abs(value) >= 10 ** 5 or abs(value) < 10 ** -digits):
        return f"{value:+.{digits - 1}e}" if signed else f"{value:.{digits - 1}e}"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pm(mean: Any, stderr: Any, digits: int = 3) -> str:
    if _fmt(mean) == "—":
        return "—"
    if _fmt(stderr) == "—":
        return _fmt(mean, digits)
    return f'{_fmt(mean, digits)} <span class="se">± {_fmt(stderr, digits)}</span>'


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def _ci(interval: Any) -> str:
    if not isinstance(interval, list) or len(interval) != 2 or any(v is None for v in interval):
        return ""
    return f'<span class="se">[{100 * interval[0]:.0f}–{100 * interval[1]:.0f}%]</span>'


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


# --------------------------------------------------------------------------------------------------- sections

def _last(rows: list[dict[str, Any]], split: str) -> dict[str, Any]:
    chosen = [r for r in rows if r.get("split", "train") == split]
    return chosen[-1] if chosen else {}


def _runs_table(runs: list[RunData]) -> str:
    head = ("<tr><th>Run</th><th>Model</th><th>Loss</th><th class=num>β</th><th class=num>Steps</th>"
            "<th class=num>LR</th><th class=num>Train loss</th><th class=num>Held-out acc.</th>"
            "<th class=num>Margin</th><th class=num>KL(π‖π<sub>ref</sub>)</th><th class=num>Reward π / π<sub>ref</sub></th>"
            "<th class=num>Win rate</th></tr>")
    body = []
    for run in runs:
        ev = run.eval or {}
        train, held = _last(run.metrics, "train"), _last(run.metrics, "eval")
        loss_name = _get(run.config, "loss.name") or "—"
        if _get(run.config, "loss.weights"):
            loss_name = " + ".join(f"{w:g}·{n}" for n, w in _get(run.config, "loss.weights").items())
        model = str(_get(run.config, "model.name_or_path") or "—")
        accuracy = ev.get("rewards/accuracies", held.get("rewards/accuracies"))
        margin = ev.get("rewards/margins", held.get("rewards/margins"))
        reward = (f"{_fmt(ev.get('reward'))} / {_fmt(ev.get('reward_reference'))}"
                  if ev.get("reward") is not None else "—")
        body.append(
            f"<tr><td class=run>{_e(run.name)}</td><td class=model title='{_e(model)}'>{_e(Path(model).name or model)}</td>"
            f"<td>{_e(loss_name)}</td><td class=num>{_fmt(ev.get('beta', _get(run.config, 'loss.beta')), 3)}</td>"
            f"<td class=num>{_e(train.get('step', '—'))}</td><td class=num>{_fmt(_get(run.config, 'train.lr'), 2)}</td>"
            f"<td class=num>{_fmt(train.get('loss'), 4)}</td><td class=num>{_pct(accuracy)}</td>"
            f"<td class=num>{_fmt(margin, 3, signed=True)}</td><td class=num>{_pm(ev.get('kl'), ev.get('kl_stderr'))}</td>"
            f"<td class=num>{reward}</td>"
            f"<td class=num>{_pct(ev.get('win_rate'))} {_ci(ev.get('win_rate_ci'))}</td></tr>")
    return f"<div class=scroll><table class=runs><thead>{head}</thead><tbody>{''.join(body)}</tbody></table></div>"


def _cards(run: RunData) -> str:
    """The headline numbers of a single run."""
    ev = run.eval or {}
    held = _last(run.metrics, "eval")
    items = [
        ("Held-out reward accuracy", _pct(ev.get("rewards/accuracies", held.get("rewards/accuracies"))),
         "pairs where β·log π/π<sub>ref</sub> ranks chosen above rejected"),
        ("Mean reward margin", _fmt(ev.get("rewards/margins", held.get("rewards/margins")), 3, signed=True),
         "r(x, y<sub>w</sub>) − r(x, y<sub>l</sub>) on held-out pairs"),
        ("KL(π ‖ π<sub>ref</sub>)", _pm(ev.get("kl"), ev.get("kl_stderr")),
         "nats per sequence, on policy samples"),
    ]
    if ev.get("reward") is not None:
        items.append((f"Reward ({_e(ev.get('reward_fn'))})", _fmt(ev.get("reward")),
                      f"policy samples; reference {_fmt(ev.get('reward_reference'))}"))
    if ev.get("win_rate") is not None:
        against = "the dataset's chosen" if ev.get("baseline") == "chosen" else "π<sub>ref</sub>"
        items.append(("Win rate", f"{_pct(ev.get('win_rate'))} {_ci(ev.get('win_rate_ci'))}",
                      f"vs {against}, judged by {_e(ev.get('judge'))}"))
    return "<div class=cards>" + "".join(
        f"<div class=card><div class=label>{label}</div><div class=value>{value}</div>"
        f"<div class=note>{note}</div></div>" for label, value, note in items
        if not value.startswith("—")) + "</div>"


def _curves(runs: list[RunData]) -> str:
    series = [(r.name, r.metrics) for r in runs if r.metrics]
    if not series:
        return ""
    figures = [
        plots.curve(series, [("loss", "loss")], "Loss", hline=math.log(2)),
        plots.curve(series, [("rewards/accuracies", "accuracy")], "Implicit-reward accuracy", ylim=(-0.03, 1.03),
                    hline=0.5),
        plots.curve(series, [("rewards/margins", "margin")], "Reward margin  r(y_w) − r(y_l)", hline=0.0),
        plots.curve(series, [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")],
                    "Implicit rewards  β·log π/π_ref", hline=0.0),
        plots.curve(series, [("logps/chosen", "chosen"), ("logps/rejected", "rejected")],
                    "Log-probs  log π(y|x)"),
        # A reward model (dpokit rm): its own reward's accuracy and margin on pairs.
        plots.curve(series, [("accuracy", "accuracy")], "Reward-model accuracy  r(y_w) > r(y_l)",
                    ylim=(-0.03, 1.03), hline=0.5),
        plots.curve(series, [("margin", "margin")], "Reward-model margin  r(y_w) − r(y_l)", hline=0.0),
        # PPO (dpokit ppo): the reward it climbs, what it pays in KL, and the health of its updates.
        plots.curve(series, [("reward", "reward")], "Reward of the sampled responses"),
        plots.curve(series, [("kl", "KL")], "KL(π‖π_ref) per response, nats", hline=0.0),
        plots.curve(series, [("kl_coef", "β")], "KL coefficient β"),
        plots.curve(series, [("entropy", "entropy")], "Entropy of π per token, nats"),
        plots.curve(series, [("policy/clipfrac", "policy"), ("value/clipfrac", "value")], "Clipped fraction"),
        plots.curve(series, [("value/explained_variance", "explained variance")], "Value head", hline=0.0),
        plots.curve(series, [("grad_norm", "grad norm")], "Gradient norm"),
    ]
    cells = "".join(f"<figure class=plot>{svg}</figure>" for svg in figures if svg)
    note = ("Solid: training steps; dashed diamonds: held-out data. The dotted line on the loss is ln 2, the "
            "loss of every pair while π = π<sub>ref</sub> (DPO) or while the reward model scores both responses "
            "alike.")
    return f"<section><h2>Training</h2><p class=lead>{note}</p><div class=grid>{cells}</div></section>"


def _evaluation(runs: list[RunData]) -> str:
    evals = [(r.name, r.eval) for r in runs if r.eval]
    if not evals:
        return ""
    figures = [plots.frontier(evals) or plots.kl_by_step(evals), plots.win_rate_by_temperature(evals)]
    cells = "".join(f"<figure class='plot wide'>{svg}</figure>" for svg in figures if svg)
    if not cells:
        return ""
    note = ("Each point is a checkpoint, sampled at temperature 1 on the same prompts and seed; KL is the mean "
            "over samples of log π(y|x) − log π<sub>ref</sub>(y|x) (error bars: one standard error). A better "
            "method reaches more reward for the same KL (the DPO paper, Figure 2).")
    return f"<section><h2>Evaluation</h2><p class=lead>{note}</p><div class='grid two'>{cells}</div></section>"


def _badge(value: Any, label: str, kind: str = "") -> str:
    if value is None:
        return ""
    return f"<span class='badge {kind}'>{label} <b>{_fmt(value, 3, signed=True)}</b></span>"


def _samples(runs: list[RunData], max_samples: int) -> str:
    blocks = []
    for index, run in enumerate(runs):
        rows = [s for s in run.samples if s.get("temperature") == KL_TEMPERATURE and s.get("sample", 0) == 0]
        if not rows:
            continue
        ev = run.eval or {}
        baseline_is_chosen = ev.get("baseline") == "chosen"
        cards = []
        for s in rows[:max_samples]:
            outcome = s.get("judge")
            verdict = {"win": ("policy preferred", "win"), "loss": ("reference preferred", "loss"),
                       "tie": ("tie", "tie"), "malformed": ("judge reply unreadable", "tie"),
                       "failed": ("judge request failed", "tie")}.get(outcome or "")
            if verdict and baseline_is_chosen:
                verdict = (verdict[0].replace("reference", "dataset's chosen"), verdict[1])
            judged = f"<span class='verdict {verdict[1]}'>{verdict[0]}</span>" if verdict else ""
            policy_won = outcome == "win" and not baseline_is_chosen
            ref_won = outcome == "loss" and not baseline_is_chosen
            cards.append(
                "<article class=sample>"
                f"<div class=prompt><span class=tag>Prompt</span>{judged}<div class=text>{_e(s.get('prompt', ''))}</div></div>"
                "<div class=pair>"
                f"<div class='side ref{' won' if ref_won else ''}'><div class=who>Reference π<sub>ref</sub></div>"
                f"<div class=text>{_e(s.get('reference', ''))}</div><div class=badges>"
                f"{_badge(s.get('reference_implicit_reward'), 'implicit r')}"
                f"{_badge(s.get('reference_reward'), _e(ev.get('reward_fn') or 'reward'), 'gt')}</div></div>"
                f"<div class='side pol{' won' if policy_won else ''}'><div class=who>Policy π</div>"
                f"<div class=text>{_e(s.get('policy', ''))}</div><div class=badges>"
                f"{_badge(s.get('policy_implicit_reward'), 'implicit r')}"
                f"{_badge(s.get('policy_reward'), _e(ev.get('reward_fn') or 'reward'), 'gt')}</div></div>"
                "</div></article>")
        title = _e(run.name) if len(runs) > 1 else "Samples"
        count = min(len(rows), max_samples)
        blocks.append(f"<details{' open' if index == 0 else ''}><summary>{title} <span class=se>{count} of "
                      f"{len(rows)} prompts, temperature {KL_TEMPERATURE:g}</span></summary>{''.join(cards)}</details>")
    if not blocks:
        return ""
    note = ("The same prompt answered by the reference and by the trained policy. <i>implicit r</i> is the "
            "policy's own reward for the response, β·log π(y|x)/π<sub>ref</sub>(y|x); the other badge is the "
            "ground-truth reward.")
    return f"<section><h2>DPO in action</h2><p class=lead>{note}</p>{''.join(blocks)}</section>"


PAGE_BASE = resources.files("dpokit").joinpath("page_base.css").read_text(encoding="utf-8")
"""The look the report shares with ``dpokit serve``'s page (colours, type, header)."""

CSS = PAGE_BASE + """
h1 small { font-weight: 500; color: var(--muted); font-size: 15px; margin-left: 8px; }
h2 { font-size: 19px; margin: 34px 0 6px; letter-spacing: -0.01em; }
.meta { color: var(--muted); font-size: 13px; }
.lead { color: var(--muted); margin: 0 0 14px; max-width: 860px; font-size: 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; margin: 4px 0 8px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
.card .label { font-size: 12.5px; font-weight: 600; color: var(--muted); }
.card .value { font-size: 26px; font-weight: 650; margin: 2px 0; font-variant-numeric: tabular-nums; }
.card .note { font-size: 12.5px; color: var(--muted); }
.se { color: var(--muted); font-weight: 400; font-size: 0.82em; }
.scroll { overflow-x: auto; background: var(--card); border: 1px solid var(--line); border-radius: 10px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th, td { padding: 9px 12px; text-align: left; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { font-size: 12.5px; color: var(--muted); font-weight: 600; background: #fcfcfd; }
tbody tr:last-child td { border-bottom: 0; }
tbody tr:hover { background: #f8f9ff; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.run { font-weight: 600; }
td.model { max-width: 220px; overflow: hidden; text-overflow: ellipsis; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 14px; }
.grid.two { grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); }
figure.plot { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 10px;
              padding: 12px 12px 6px; }
figure.plot svg { width: 100%; height: auto; display: block; }
details { background: var(--card); border: 1px solid var(--line); border-radius: 10px; margin: 0 0 12px;
          padding: 4px 16px 12px; }
summary { cursor: pointer; font-weight: 600; padding: 10px 0; }
.sample { border-top: 1px solid var(--line); padding: 14px 0 6px; }
.sample:first-of-type { border-top: 0; }
.prompt .tag, .who { font-size: 12px; letter-spacing: 0.02em; color: var(--muted); font-weight: 600; }
.prompt .text { margin: 4px 0 10px; color: #343a40; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
@media (max-width: 760px) { .pair { grid-template-columns: 1fr; } }
.side { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: #fcfcfd; }
.side.pol { border-left: 3px solid var(--accent); }
.side.ref { border-left: 3px solid #adb5bd; }
.side.won { box-shadow: 0 0 0 2px rgba(43, 138, 62, 0.35); }
.side .text { margin: 4px 0 8px; font-size: 14px; }
.badges { display: flex; gap: 6px; flex-wrap: wrap; }
.badge { font-size: 12px; border-radius: 999px; padding: 2px 9px; background: #edf2ff; color: #364fc7; }
.badge.gt { background: #ebfbee; color: #2b8a3e; }
.verdict { float: right; font-size: 12px; border-radius: 999px; padding: 1px 9px; font-weight: 600; }
.verdict.win { background: #ebfbee; color: var(--good); }
.verdict.loss { background: #fff5f5; color: var(--bad); }
.verdict.tie { background: #f1f3f5; color: var(--muted); }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; border-top: 1px solid var(--line);
         padding-top: 12px; }
"""


def render_report(runs: Sequence[RunData], max_samples: int = 6) -> str:
    """The report page as one HTML string."""
    runs = list(runs)
    _unique_names(runs)
    from dpokit.version import __version__

    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        f"<section><h2>{'Run' if len(runs) == 1 else 'Runs'}</h2>"
        + (_cards(runs[0]) if len(runs) == 1 else "") + _runs_table(runs) + "</section>",
        _curves(runs),
        _evaluation(runs),
        _samples(runs, max_samples),
    ]
    glossary = ("r(x, y) = β·(log π(y|x) − log π<sub>ref</sub>(y|x)) is the implicit reward of DPO (Rafailov et al., "
                "2023): the trained policy is a reward model. Held-out accuracy and margin compare it on the run's "
                "held-out pairs; KL(π‖π<sub>ref</sub>) is estimated on policy samples.")
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        "<link rel=icon href='data:,'>"
        f"<title>dpokit report · {_e(title)}</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>DPO report<small>{_e(title)}</small></h1>"
        f"<div class=meta>dpokit {_e(__version__)} · {when}</div></header>"
        + "".join(s for s in sections if s)
        + f"<footer>{glossary}</footer></main></body></html>\n")


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None, max_samples: int = 6) -> Path:
    """Write the report of one or more runs; returns its path. ``out`` defaults to ``RUN_DIR/report.html`` for
    one run and is required for several."""
    if not run_dirs:
        raise DpokitError("report: give at least one run directory")
    if out is None:
        if len(run_dirs) > 1:
            raise DpokitError("--out: required when reporting several runs (e.g. --out report.html)")
        out = Path(run_dirs[0]) / "report.html"
    runs = [load_run(path) for path in run_dirs]
    page = render_report(runs, max_samples)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, page)
    return out
