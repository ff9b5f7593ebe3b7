"""The section "Data at scale (issue 19)" that ``data_scale.py`` writes into RESULTS.md: the runs' table, notes,
and the issue's targets, met or not, from the measured results alone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from data_scale_files import MAX_LENGTH, MAX_PROMPT_LENGTH, MB
from data_scale_measure import OTHERS_MAX

TODAY_ROWS_PER_S = 490.0
"""The issue's figure for today's ``dpokit data check`` (20,000 pairs, 2 cores), quoted beside the re-measured one."""

TRAIN_SETUP = ("Training runs: `dpokit train CONFIG data.num_proc=2 data.cache_dir=DIR`, the embedded "
               "SmolLM2-135M-Instruct (its load is about 5 s of the time to the first step), 1 step, batch 1, no "
               "shuffling (every run trains the file's first pair, so the step's own memory is the same in all), "
               "reference model in memory; time to the first step: from the process's start (/proc) to the first "
               "call of `train_step`; peak RSS: the whole process (`wait4`).")
"""The training runs as ``data_scale.train_config`` sets them up, in the report's words."""


def fmt(x: Any, spec: str = ".0f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


Target = tuple[str, str, str, bool | None]
"""(text, measured, bar, met); met is None for a line given for information."""


def _ok(r: dict[str, Any], name: str) -> dict[str, Any] | None:
    return r[name] if name in r and "error" not in r[name] else None


def _ratio(r: dict[str, Any], a: str, b: str) -> float | None:
    x, y = _ok(r, a), _ok(r, b)
    return x["rows_per_s"] / y["rows_per_s"] if x and y else None


def figures(r: dict[str, dict[str, Any]], files: dict[str, Any]) -> tuple[list[str], list[Target]]:
    """The figure lines and the targets of a finished run's results ``r`` (by run name)."""
    return run_table(r, files) + [""] + notes(r, files), targets(r, files)


def run_table(r: dict[str, dict[str, Any]], files: dict[str, Any]) -> list[str]:
    lines = ["| run | file | rows | seconds | rows/s | x today | x 490 | peak MB: process RSS / tree RSS / tree PSS "
             "| load; CPU share of the run / of other processes |", "|---|---|---|---|---|---|---|---|---|"]
    before = files.get("before", "?")
    for name, what in (("today", "today's path (sequential, no cache)"),
                       ("today-before", f"the same on the code before the change ({before})"),
                       ("new-1", "load_cached, num_proc 1"),
                       ("new-2", "load_cached, num_proc 2"), ("new-2-trl", "load_cached, num_proc 2"),
                       ("trl-1", "TRL _prepare_dataset, 1 process"), ("trl-2", "TRL _prepare_dataset, 2 processes"),
                       ("new-full", "load_cached, num_proc 2"), ("check", "dpokit data check --num-proc 2"),
                       ("check-10", "dpokit data check, 10 rows")):
        x = r.get(name)
        if x is None:
            continue
        file = x.get("file", "")
        if "error" in x:
            lines.append(f"| {name}: {what} | {file} | FAILED: {x['error']} | | | | | | {x.get('load', '')} |")
            continue
        if "rows_per_s" not in x:
            continue
        seconds = x.get("seconds", x.get("wall_s"))
        vs_today = _ratio(r, name, "today") if name != "today" else 1.0
        lines.append(f"| {name}: {what} | {file} | {x.get('rows')} | {fmt(seconds, '.1f')} | "
                     f"{fmt(x.get('rows_per_s'))} | {fmt(vs_today, '.2f')} | "
                     f"{fmt(x.get('rows_per_s', 0) / TODAY_ROWS_PER_S, '.2f')} | "
                     f"{fmt(x['peak_rss_mb'])} / {fmt(x['tree_rss_mb'])} / {fmt(x['tree_pss_mb'])} | "
                     f"{x['load']}; {x['cpu_share']:.0%} / {x['others']:.0%} |")
    return lines


def notes(r: dict[str, dict[str, Any]], files: dict[str, Any]) -> list[str]:
    notes: list[str] = []
    if _ok(r, "new-full"):
        f = r["new-full"]
        notes.append(f"- new-full: warm `load_cached` of the same file afterwards {f['warm_s']:.2f} s; cache "
                     f"{f['cache_bytes'] / MB:.0f} MB for {f['groups']} groups, {f['tokens']} tokens "
                     f"({f['cache_bytes'] / max(f['tokens'], 1):.2f} bytes a token); dataset type `{f['type']}`")
    for name in ("trl-1", "trl-2"):
        if _ok(r, name):
            notes.append(f"- {name}: `load_dataset('json')` before it {r[name]['load_dataset_s']:.1f} s "
                         f"(not in its rows/s); `DPOTrainer(...)` {r[name]['construct_s']:.1f} s in all")
    if _ok(r, "today") and _ok(r, "new-2"):
        same = r["today"]["digest"] == r["new-2"]["digest"] and r["today"]["digested"] == r["new-2"]["digested"]
        notes.append(f"- token ids of the first {r['today']['digested']} groups: today's path and the cache "
                     f"{'identical' if same else 'DIFFER'}")
    for name in ("train-small-1", "train-small-2", "train-full-1", "train-full-2"):
        x = r.get(name)
        if x is None:
            continue
        if "error" in x:
            notes.append(f"- {name}: FAILED: {x['error']}")
            continue
        notes.append(f"- {name} ({x['pairs']} pairs): first step starts {x['to_first_step_s']:.1f} s after the "
                     f"process started (data {fmt(x.get('load_items_s'), '.1f')} s, from "
                     f"{fmt(x.get('load_items_start_s'), '.1f')} s); the step {x['first_step_s']:.1f} s; peak RSS "
                     f"{x['peak_rss_mb']:.0f} MB (at the step's end {fmt(x.get('train_end_hwm_mb'))} MB); "
                     f"wall {x['wall_s']:.0f} s; load {x['load']}, other processes {x['others']:.0%}")
    if _ok(r, "check"):
        c, base = r["check"], _ok(r, "check-10")
        notes.append(f"- check: {files['check_bytes'] / MB:.0f} MB file; peak RSS {c['peak_rss_mb']:.0f} MB "
                     f"(process, wait4), {c['tree_rss_mb']:.0f} MB summed over its process tree, "
                     f"{c['tree_pss_mb']:.0f} MB PSS" + (f"; a 10-row file: {base['peak_rss_mb']:.0f} MB / "
                                                         f"{base['tree_rss_mb']:.0f} MB" if base else ""))

    return notes


def targets(r: dict[str, dict[str, Any]], files: dict[str, Any]) -> list[Target]:
    targets: list[Target] = []
    full = _ok(r, "new-full")
    if full:
        x = _ratio(r, "new-full", "today")
        targets.append((f"first tokenization of {full['rows']:,} pairs, num_proc 2, vs today re-measured",
                        f"{full['rows_per_s']:.0f} rows/s = {fmt(x, '.2f')}x", ">= 5x", x is not None and x >= 5))
        x = _ratio(r, "new-full", "today-before")
        if x is not None:
            targets.append((f"the same vs today's path on the code before the change ({files.get('before')})",
                            f"{x:.2f}x", ">= 5x", x >= 5))
        targets.append(("the same vs the issue's 490 rows/s", f"{full['rows_per_s'] / TODAY_ROWS_PER_S:.2f}x",
                        ">= 5x", full["rows_per_s"] >= 5 * TODAY_ROWS_PER_S))
    for new, trl in (("new-2-trl" if "new-2-trl" in r else "new-2", "trl-2"),
                     ("new-2-trl" if "new-2-trl" in r else "new-2", "trl-1")):
        x = _ratio(r, new, trl)
        if x is not None:
            same = trl == "trl-2"
            targets.append((f"vs TRL dataset preparation, {r[trl]['rows']:,} rows: new 2 procs / TRL "
                            f"{'2 processes' if same else '1 process'}", f"{x:.2f}x", ">= 3x" if same else "(info)",
                            x >= 3 if same else None))
    x = _ok(r, "train-full-2")
    if x:
        targets.append((f"second run ({x['pairs']:,} pairs, cache warm) starts training",
                        f"{x['to_first_step_s']:.1f} s", "< 15 s", x["to_first_step_s"] < 15))
    small, big = _ok(r, "train-small-2"), _ok(r, "train-full-2")
    if small and big:
        per_pair = (big["peak_rss_mb"] - small["peak_rss_mb"]) * MB / (big["pairs"] - small["pairs"])
        targets.append((f"training peak RSS growth, {small['pairs']:,} -> {big['pairs']:,} pairs",
                        f"{per_pair:.0f} bytes/pair ({small['peak_rss_mb']:.0f} -> {big['peak_rss_mb']:.0f} MB)",
                        "<= 1000 bytes", per_pair <= 1000))
    c = _ok(r, "check")
    if c:
        # The memory the command holds: its largest process exactly (wait4), or all of its processes together
        # (sampled PSS: forked workers' shared pages once; the RSS sum would count them in every worker).
        peak = max(c["peak_rss_mb"], c["tree_pss_mb"])
        targets.append((f"data check of a {files['check_bytes'] / MB:.0f} MB file (cold cache), peak memory",
                        f"{peak:.0f} MB (largest process {c['peak_rss_mb']:.0f}, tree PSS {c['tree_pss_mb']:.0f}, "
                        f"tree RSS sum {c['tree_rss_mb']:.0f})", "< 500 MB", peak < 500))
    return targets


def render(results: dict[str, dict[str, Any]], files: dict[str, Any], info: dict[str, Any], command: str,
           started: str, minutes: float) -> str:
    lines, measured = figures(results, files)
    out = ["## Data at scale (issue 19)", "",
           f"`{command}` ({started}, {minutes:.0f} min). Written by `benchmarks/data_scale.py`; rows/s are rows read "
           "over the seconds of the measured call alone (tokenizer and model loads not counted), except `check` "
           "(the whole command). Peak memory: RSS of the process (`wait4`: the largest of it and its worker "
           "processes) / RSS summed over its process tree / PSS summed over the tree (both sampled every 0.5 s; "
           "PSS counts pages shared by forked workers once). MB are 10^6 bytes. CPU share: the run's CPU seconds "
           "(workers included) / (wall x cores); of other processes: the rest of the machine's busy time meanwhile "
           f"(a run during which they took over {OTHERS_MAX:.0%} is measured again, `--retries`; the least "
           "disturbed attempt is shown).", "",
           f"Machine: {info.get('cpu')}, {info['cores']} cores, {info.get('ram_gb')} GB; Python {info['python']}, "
           f"torch {info['torch']}, transformers {info['transformers']}, TRL {info['trl']}. Data: "
           f"{files['pairs']:,} synthetic conversational pairs, {files['pairs_bytes'] / MB:.0f} MB "
           f"({files['pairs_bytes'] / max(files['pairs'], 1) / 1000:.2f} KB a row, "
           + ("reused from --workdir" if files["write_s"] is None else f"written in {files['write_s']:.0f} s")
           + f"); SmolLM2-135M-Instruct's tokenizer and chat template; max_length "
           f"{MAX_LENGTH}, max_prompt_length {MAX_PROMPT_LENGTH}.", "", TRAIN_SETUP, "", *lines, "",
           "| target | measured | bar | met |", "|---|---|---|---|"]
    for text, value, bar, met in measured:
        out.append(f"| {text} | {value} | {bar} | {'-' if met is None else 'yes' if met else '**no**'} |")
    return "\n".join(out) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the section (from its heading to the next ``## `` heading) or append it."""
    text = path.read_text() if path.exists() else ""
    heading = section.splitlines()[0]
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)
