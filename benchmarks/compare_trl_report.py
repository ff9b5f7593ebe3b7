"""The report of ``compare_trl.py`` (``benchmarks/RESULTS.md``): the machine, the setup, the results table, the
same-math checks, bf16 tracking and the issue's targets, each section from the measurements alone."""

from __future__ import annotations

import math
import time
from typing import Any


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def check_same_math(results: dict[str, Any], summary: dict[str, Any], trl_ids: Any,
                    dpokit_ids: Any) -> list[str]:
    lines = []
    if trl_ids is not None:
        same = sum(1 for a, b in zip(trl_ids, dpokit_ids) if a == b)
        lines.append(f"token ids identical for {same} of {len(dpokit_ids)} pairs (TRL's tokenization vs dpokit's)"
                     + ("" if len(trl_ids) == len(dpokit_ids) else f"; TRL kept {len(trl_ids)} pairs"))
    return lines


def first_step_table(summary: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Step-1 loss, mean logps and grad norm of every system, and their relative difference to TRL."""
    keys = ["loss", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm"]
    base = summary.get("trl") or summary.get("trl-pre")
    header = "| system | " + " | ".join(f"step-1 {k}" for k in keys) + " | max rel. diff vs TRL |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    worst: dict[str, Any] = {}
    for name, s in summary.items():
        if "first" not in s:
            continue
        values = [s["first"].get(k) for k in keys]
        diff = None
        if base is not None and "first" in base:
            diffs = [rel(v, base["first"][k]) for v, k in zip(values, keys)
                     if v is not None and base["first"].get(k) is not None]
            diff = max(diffs) if diffs else None
        worst[name] = diff
        cells = " | ".join(fmt(v, ".6f") if v is not None else "n/a" for v in values)
        lines.append(f"| {name} | {cells} | {fmt(diff, '.1e')} |")
    return lines, worst


def render(args: Any, command: str, info: dict[str, Any], peaks: dict[str, float], dims: dict[str, int],
           summary: dict[str, Any], results: dict[str, Any], loads: dict[str, str], load_before: str,
           load_after: str, lengths: dict[str, list[int]], geometry: dict[str, Any], dpokit_ids: Any,
           trl_ids: Any, track: dict[str, Any]) -> str:
    """The whole report; ``command``: the command line that regenerates it."""
    ok = {k: v for k, v in summary.items() if "error" not in v}
    out = ["# dpokit vs TRL DPOTrainer", ""]
    out += [f"Written by `benchmarks/compare_trl.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            "Regenerate with:", "", "```", f".venv/bin/{command}", "```", ""]
    out += ["## `dpokit env`", "", "```", info.get("dpokit_env", "(not available)"), "```", ""]
    out += machine_section(info, peaks, loads, load_before, load_after)
    out += setup_section(args, dims, lengths, geometry, len(dpokit_ids))
    out += results_section(args, summary, ok, results, len(dpokit_ids))
    lines, worst = first_step_table(ok)
    out += ["## Same math", "", *check_same_math(results, ok, trl_ids, dpokit_ids), "",
            "Step 1 (policy == reference, so the loss is ln 2 = 0.693147; means over the step's 8 pairs):", "",
            *lines, ""]
    curves = [f"| {k} | " + " | ".join(fmt(x, ".5f") for x in s["losses"]) + " |" for k, s in ok.items()]
    out += ["Loss per step (step 1 first):", "",
            "| system | " + " | ".join(str(i + 1) for i in range(args.steps + 1)) + " |",
            "|---|" + "---|" * (args.steps + 1), *curves, ""]

    out += render_tracking(track, args)
    out += ["## Targets (issue 4)", ""]
    out += targets(ok, worst, track)
    return "\n".join(out) + "\n"


def machine_section(info: dict[str, Any], peaks: dict[str, float], loads: dict[str, str], load_before: str,
                    load_after: str) -> list[str]:
    return ["## Machine and software", "",
            f"- CPU: {info.get('cpu')}, {info['cores']} cores (torch uses {info['torch_threads']} threads), "
            f"AVX512-BF16: {'yes' if info['avx512_bf16'] else 'no'}, AMX: {'yes' if info['amx'] else 'no'}; "
            f"RAM {info.get('ram_gb')} GB; no GPU",
            f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
            f"trl {info['trl']}",
            f"- Matrix-product peak measured in this run (best `torch.matmul` 2048x2048): "
            f"fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s",
            f"- Load average (1, 5, 15 min) at start: {load_before}; before each system: "
            + ", ".join(f"{k} {v}" for k, v in loads.items()) + f"; at the end: {load_after}. The machine is "
            "shared: a 1-minute load above the core count means another process took CPU time from these runs.",
            ""]


def setup_section(args: Any, dims: dict[str, int], lengths: dict[str, list[int]], geometry: dict[str, Any],
                  n_pairs: int) -> list[str]:
    pad = geometry["padded"][1:]
    pack = geometry["packed"][1:]
    pad_frac = 1 - sum(g["real"] for g in pad) / sum(g["computed"] for g in pad)
    pack_frac = 1 - sum(g["real"] for g in pack) / sum(g["computed"] for g in pack)
    return ["## Setup", "",
            f"- Model: SmolLM2-135M-Instruct (embedded, fp32 weights; {dims['params'] / 1e6:.1f} M parameters, "
            f"{dims['non_embedding_params'] / 1e6:.1f} M non-embedding, vocabulary {dims['vocab']})",
            f"- Data: {n_pairs} synthetic standard-format pairs (seed {args.seed}), token lengths "
            + ", ".join(f"{k} {min(v)}-{max(v)} (mean {sum(v) / len(v):.1f})" for k, v in lengths.items())
            + "; visited in file order by every system (TRL `train_sampling_strategy='sequential'`, dpokit "
            "`train.shuffle: false`), so step k trains on the same pairs everywhere",
            f"- Batch {args.batch_size} pairs, gradient accumulation 1, max_length {args.max_length} (nothing is "
            f"truncated), DPO sigmoid loss, beta {args.beta}, AdamW lr {args.lr} constant, grad clip 10, "
            "dropout off, no gradient checkpointing",
            f"- 1 warmup step (not timed) + {args.steps} timed steps per system; s/step is the time between the "
            "ends of consecutive optimizer steps (data, forward, backward, optimizer, logging); tokens/s = "
            "trained tokens of the timed steps / their time",
            "- Trained tokens: non-padding tokens of prompt+chosen and prompt+rejected of each step (dpokit's "
            "`tokens` metric; for TRL the `attention_mask` sum of its collated batches). Both counts agree "
            "pair for pair, and are the same for every system.",
            f"- Padding in computed positions: padded layout {pad_frac:.1%}, packed layout {pack_frac:.1%} "
            "(packed rows also compute each prompt once for chosen and rejected)",
            "- Peak RSS: `VmHWM` of the system's own process read at the end of its last training step "
            "(model loading, reference precompute and training included; dpokit's final checkpoint and export "
            "come after and are excluded); the whole-process `ru_maxrss` is shown beside it",
            "- TRL runs with its defaults otherwise (e.g. its fused AdamW); TRL 1.x has no max_prompt_length",
            ""]


def results_section(args: Any, summary: dict[str, Any], ok: dict[str, Any], results: dict[str, Any],
                    n_pairs: int) -> list[str]:
    trl, trl_pre = ok.get("trl"), ok.get("trl-pre")
    out = ["## Results", "",
            "| system | tokens/s | s/step | peak RSS MB (process) | precompute s | x TRL tokens/s | "
            "x TRL-pre tokens/s | RSS / TRL | GFLOP/step | MFU | CPU share |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        if "error" in s:
            out.append(f"| {name} | failed: {s['error']} | | | | | | | | | |")
            continue
        x_trl = s["tokens_per_s"] / trl["tokens_per_s"] if trl else None
        x_pre = s["tokens_per_s"] / trl_pre["tokens_per_s"] if trl_pre else None
        rss = s["peak_rss_mb"] / trl["peak_rss_mb"] if trl and s["peak_rss_mb"] else None
        pre = s.get("precompute_s")
        if pre is not None and s.get("reference_setup_s") is not None:
            pre_cell = f"{pre:.1f} (+{s['reference_setup_s'] - pre:.1f} hash)"
        else:
            pre_cell = fmt(pre, ".1f") if pre is not None else "-"
        out.append(
            f"| {name}: {s['label']} | {s['tokens_per_s']:.1f} | {s['s_per_step']:.2f} | "
            f"{fmt(s['peak_rss_mb'], '.0f')} ({fmt(s['process_peak_rss_mb'], '.0f')}) | {pre_cell} | "
            f"{fmt(x_trl)} | {fmt(x_pre)} | {fmt(rss)} | {s['gflop_per_step']:.0f} | "
            f"{s['mfu']:.1%} of {s['precision']} | {s['cpu_share']:.0%} |")
    out += ["",
            "- precompute s: the one-off reference pass over all "
            f"{n_pairs} pairs before training (TRL: `_precompute_ref_logps`; dpokit: `precompute` into the "
            "store, plus hashing the reference weights for the store key). A later dpokit run on the same data "
            "and reference (another beta, loss or lr) reuses the store and pays only the hash.",
            "- MFU: model FLOPs per step / s per step / the matmul peak of the run's precision. Model FLOPs "
            "(multiply-add = 2, backward = 2x forward): trained policy 6 x non-embedding params x computed "
            "positions (padding included) + 6 x hidden x vocab x positions projected to the vocabulary (TRL "
            "on CPU: every shifted position of every row; dpokit: response tokens only) + 12 x layers x "
            "attention width x row width^2 per row (the full masked score matrix); an online reference adds "
            "the same forward-only (2, 2, 4). Recomputation (dpokit's checkpointed LM-head chunks) is not "
            "counted. A system that skips work (prompt once, no padding, no vocabulary projection at prompt "
            "positions) needs fewer FLOPs per trained token, so its MFU understates its advantage.",
            "- CPU share: CPU time the system's process got during its timed steps / (their wall time x torch "
            "threads). Near 100% means the run had the cores to itself; lower means other processes on this "
            "shared machine took some (its s/step is then inflated). A system whose share was below "
            f"{args.min_cpu_share:.0%} was measured again (up to {args.retries} more times) and the attempt with "
            "the highest share is reported; attempts (share): "
            + "; ".join(f"{k} " + ", ".join(f"{a[0]:.0%}" if a[0] is not None else "failed"
                                           for a in results[k].get("attempts", [])) for k in ok) + ".",
            "- Per-step times: " + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in s["step_times"])
                                             for k, s in ok.items()),
            ""]
    return out


def render_tracking(track: dict[str, Any], args: Any) -> list[str]:
    if not track:
        return []
    out = ["## bf16 tracks fp32", ""]
    if "error" in track:
        return out + [f"failed: {track['error']}", ""]
    n = len(track["fp32"])
    out += [f"dpokit-fast in fp32 and in bf16 autocast, {n} steps at lr {args.track_lr} over the first "
            f"{track['pairs']} pairs (batch {args.batch_size}: two steps an epoch, the same order in both), so "
            "the loss really falls (at the timing runs' lr of "
            f"{args.lr} it barely moves and any difference is bf16 rounding noise alone):", "",
            "| precision | " + " | ".join(str(i + 1) for i in range(n)) + " |", "|---|" + "---|" * n]
    for precision in ("fp32", "bf16"):
        out.append(f"| {precision} loss | " + " | ".join(f"{x:.4f}" for x in track[precision]) + " |")
    out += ["", f"Largest difference {track['max_abs_diff']:.4f} against an fp32 fall of "
            f"{track['fp32_drop']:.4f} ({track['max_abs_diff'] / max(track['fp32_drop'], 1e-12):.1%} of it).", ""]
    return out


def targets(ok: dict[str, Any], worst: dict[str, Any], track: dict[str, Any]) -> list[str]:
    trl, trl_pre = ok.get("trl"), ok.get("trl-pre")
    fast, bf16, same = ok.get("dpokit-fast"), ok.get("dpokit-bf16"), ok.get("dpokit-same")
    lines = ["| target | measured | met |", "|---|---|---|"]

    def row(text: str, value: float | None, bar: float, unit: str = "x", above: bool = True) -> None:
        if value is None:
            lines.append(f"| {text} | not measured | - |")
            return
        met = value >= bar if above else value <= bar
        lines.append(f"| {text} | {value:.2f}{unit} | {'yes' if met else '**no**'} |")

    row("dpokit fastest fp32 tokens/s >= 3x TRL (ref model online)",
        fast["tokens_per_s"] / trl["tokens_per_s"] if fast and trl else None, 3.0)
    row("dpokit fastest fp32 tokens/s >= 2x TRL with its precomputed reference",
        fast["tokens_per_s"] / trl_pre["tokens_per_s"] if fast and trl_pre else None, 2.0)
    row("dpokit (fastest fp32) peak RSS <= 0.6x TRL's",
        fast["peak_rss_mb"] / trl["peak_rss_mb"] if fast and trl else None, 0.6, above=False)
    row("dpokit bf16 tokens/s >= 1.5x dpokit fp32 (same path)",
        bf16["tokens_per_s"] / fast["tokens_per_s"] if bf16 and fast else None, 1.5)
    if track and "error" not in track:
        share = track["max_abs_diff"] / max(track["fp32_drop"], 1e-12)
        lines.append(f"| bf16 loss curve tracks fp32 (largest difference / fp32 loss fall, tracking run) | "
                     f"{track['max_abs_diff']:.4f} / {track['fp32_drop']:.4f} = {share:.1%} | "
                     f"{'yes' if share <= 0.1 else '**no**'} (bar used: <= 10%) |")
    else:
        lines.append("| bf16 loss curve tracks fp32 | not measured (`--track-steps 0` or a system missing) | - |")
    for name in ("dpokit-same", "dpokit-fast"):
        if name in worst and worst[name] is not None:
            lines.append(f"| step-1 loss, logps and grad norm of {name} within 1e-4 relative of TRL (fp32) | "
                         f"{worst[name]:.1e} | {'yes' if worst[name] <= 1e-4 else '**no**'} |")
    if same and trl:
        lines.append(f"| (context) dpokit with TRL's exact settings vs TRL | "
                     f"{same['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s, "
                     f"{same['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x RSS | - |")
    lines.append("| the same comparison on GPU in bf16, with MFU | not run: no GPU was available to this session | - |")
    return lines
