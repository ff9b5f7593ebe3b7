"""Popular claims about DPO against RLHF with PPO, measured: ``dpokit recipe sentiment --preset claims``.

Summaries of the DPO paper quote DPO as needing about 50% less compute than PPO, being 30% more stable, 20% more
efficient and giving 15% less variance in its outputs. The paper itself states none of these numbers; this
module measures each on the controlled-sentiment experiment, with the definition it uses written next to it:

compute      model FLOPs (and wall-clock seconds) to first reach a held-out reward R* (``claims.target_reward``;
             by default pi_ref's reward plus half of the best method's mean gain), counting everything the
             method needs. FLOPs are 2N per position of a forward pass and 6N of a
             forward + backward pass (N: the model's parameters, embeddings included), per position computed:
               DPO     sampling the preference data from pi_ref, the reference log-probs of every pair, training;
               PPO-GT  each step's rollouts (sampling, the policy/value and reference forwards) and ppo.epochs
                       training passes over them;
               PPO     PPO-GT's plus sampling the preference data, training the reward model on it, and one
                       reward-model forward per rollout.
             Each step is charged by its ``step`` in metrics.jsonl. R* is crossed between the first checkpoint
             at or above it and the one before: the cost is interpolated there (``intervals.reach``), and the
             costs at those two checkpoints are reported as its bounds.
stability    the standard deviation of the final held-out reward over the seeds (each seed samples its own
             preference data and trains every run), and the runs that diverged: a final reward below pi_ref's
             by more than 2 standard errors, or a step skipped for a non-finite loss.
efficiency   held-out reward gained over pi_ref at matched KL(pi || pi_ref): each frontier, piecewise linear
             between its checkpoints, averaged over the KL range both methods reach (``intervals.
             matched_kl_gains``). Not measurable when the other method's gain is not distinguishable from 0.
variance     the variance of the reward over the samples of one prompt (``eval.n_samples`` >= 2), averaged
             over the held-out prompts: the quote's own scale.

Each claim is a ratio DPO / PPO (and DPO / PPO-GT) with a 95% percentile bootstrap interval over seeds
(``intervals``), set beside the quoted figure: it holds when the whole interval is on the quote's side of the
bar, does not hold when it is all on the other side, and is undetermined when it straddles the bar.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.errors import DataError
from dpokit.io import read_json, read_jsonl, write_json, write_text
from dpokit.recipes.sentiment.common import say
from dpokit.recipes.sentiment.intervals import (
    LEVEL,
    bootstrap_interval,
    matched_kl_gains,
    ratio,
    reach,
    verdict,
)
from dpokit.recipes.sentiment.runs import REWARD_MODEL, beta_name, train_rows

if TYPE_CHECKING:
    from dpokit.recipes.sentiment.config import SentimentConfig

QUOTED = {
    "compute": ("50% less compute", "FLOPs to reach R*, DPO / PPO", 0.5, "<="),
    "stability": ("30% more stable", "std of the final reward over seeds, DPO / PPO", 0.7, "<="),
    "efficiency": ("20% higher efficiency", "reward gain over pi_ref at matched KL, DPO / PPO", 1.2, ">="),
    "variance": ("15% less variance in outputs", "per-prompt reward variance, DPO / PPO", 0.85, "<="),
}
"""claim -> (as quoted, the ratio measured, the ratio at which the quote holds, which side holds)."""


# ----------------------------------------------------------------------------------------------- the numbers

def parameter_count(model_dir: Path) -> int:
    """N: the parameters of a saved model, read from its safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no iterator)
                total += math.prod(f.get_slice(name).get_shape())
    return total


def sample_positions(rows: list[dict[str, Any]], tokenizer: Any) -> int:
    """Positions computed to sample the preference data: prompt + response of each sample (prefill, then one
    decode step per sampled token, as the cached rows count them)."""
    total = 0
    for row in rows:
        prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        total += sum(prompt + n for n in row["tokens"])
    return total


def cumulative(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def per_prompt_variance(samples: list[dict[str, Any]]) -> float | None:
    """Mean over prompts of the sample variance of the policy's rewards (temperature 1)."""
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for row in samples:
        if row.get("temperature") == 1.0 and row.get("policy_reward") is not None:
            by_prompt[row["prompt"]].append(row["policy_reward"])
    spreads = [statistics.variance(v) for v in by_prompt.values() if len(v) >= 2]
    return statistics.fmean(spreads) if spreads else None


def method_runs(cfg: SentimentConfig) -> dict[str, str]:
    """The run compared for each method: the first DPO beta, the first KL target of each PPO kind."""
    target = f"-kl{cfg.ppo.kl_targets[0]:g}" if cfg.ppo.kl_targets else ""
    runs = {"DPO": beta_name(cfg.dpo.betas[0])}
    if cfg.ppo.reward_model:
        runs["PPO"] = f"ppo{target}"
    if cfg.ppo.ground_truth:
        runs["PPO-GT"] = f"ppo-gt{target}"
    return runs


def step_costs(rows: list[dict[str, Any]], cost: Callable[[dict[str, Any]], float]) -> tuple[list[float], bool]:
    """The cost of each step 0..S of a run (step 0: nothing), from its metrics rows looked up by their ``step``
    (a run logs every ``train.log_every`` steps and at its last). A step with no row of its own is charged as the
    row that closes its interval (the same batch size; only its sequences' lengths differ), so the costs are
    then estimates: returns (costs, whether every step had its own row)."""
    by_step = {int(r["step"]): r for r in rows}  # a resumed run's repeated step: its last row
    last = max(by_step, default=0)
    costs, row = [0.0] * (last + 1), None
    for step in range(last, 0, -1):
        row = by_step.get(step, row)
        costs[step] = cost(row)  # type: ignore[arg-type]
    return costs, len(by_step) == last


def elapsed_at(rows: list[dict[str, Any]]) -> list[float]:
    """Seconds of the training loop at each step 0..S: its rows' ``elapsed_s``, linear between logged steps."""
    known = {0: 0.0, **{int(r["step"]): float(r["elapsed_s"]) for r in rows}}
    steps = sorted(known)
    out = [0.0] * (steps[-1] + 1)
    for a, b in zip(steps, steps[1:]):
        for s in range(a, b + 1):
            out[s] = known[a] + (s - a) / (b - a) * (known[b] - known[a])
    return out


def measure_seed(cfg: SentimentConfig, root: Path, summary: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Every number of one seed's experiment: per method, its frontier with the cumulative FLOPs and seconds
    at each point (looked up by step), and its final reward, KL, skipped steps and per-prompt reward spread."""
    n = parameter_count(root / beta_name(cfg.dpo.betas[0]) / "final")
    data = root / "data"
    train_samples = list(read_jsonl(data / "samples-train.jsonl"))
    sampled = sample_positions(train_samples, tokenizer)
    # Seconds: the sampling of the preference data (kept with the cached samples) and each training loop (its
    # metrics' elapsed_s), so a re-run that reads everything from the caches measures the same; model loading
    # and DPO's one-off reference precompute are left out of the seconds (the precompute is in the FLOPs).
    kept = [r.get("seconds") for r in train_samples]
    data_seconds = sum(kept) if kept and all(v is not None for v in kept) else None
    data_flops = 2 * n * sampled
    dpo_samples = list(read_jsonl(root / beta_name(cfg.dpo.betas[0]) / "eval" / "samples.jsonl"))
    ref_rewards = [r["reference_reward"] for r in dpo_samples if r.get("temperature") == 1.0]
    out: dict[str, Any] = {"parameters": n, "reward_ref": summary["reward_ref"],
                           "reward_ref_stderr": statistics.stdev(ref_rewards) / math.sqrt(len(ref_rewards)),
                           "methods": {}}
    rm_flops = rm_seconds = 0.0
    rm_exact = True
    if cfg.ppo.reward_model:
        rm_rows = train_rows(root / REWARD_MODEL)
        rm_tokens, rm_exact = step_costs(rm_rows, lambda r: r["tokens"])
        rm_flops = 6 * n * sum(rm_tokens)
        rm_seconds = rm_rows[-1]["elapsed_s"] if rm_rows else 0.0
    for method, name in method_runs(cfg).items():
        run_dir = root / name
        rows = train_rows(run_dir)
        ev = read_json(run_dir / "eval" / "eval.json")
        if method == "DPO":
            tokens, exact = step_costs(rows, lambda r: r["tokens"])
            # The store computes each response's reference log-probs with its prompt, once, before step 1.
            pairs = list(read_jsonl(data / "pairs-train.jsonl"))
            reference = 2 * n * sum(tokens) * len(pairs) / max(1, _pairs_seen(len(tokens) - 1, cfg, len(pairs)))
            upfront, step_flops = data_flops + reference, [6 * n * t for t in tokens]
            upfront_seconds = data_seconds
        else:
            epochs = cfg.ppo.settings.get("epochs", 4)
            per_position = (2 + 2 + 2 + 6 * epochs) * n + (2 * n if method == "PPO" else 0)
            step_flops, exact = step_costs(rows, lambda r, c=per_position: c * (r["tokens"] + r["prompt_tokens"]))
            exact = exact and (rm_exact or method == "PPO-GT")
            upfront = data_flops + rm_flops if method == "PPO" else 0.0
            upfront_seconds = 0.0 if method == "PPO-GT" else None if data_seconds is None else data_seconds + rm_seconds
        flops = [upfront + f for f in cumulative(step_flops)]  # index: step (0: before the first step)
        seconds = [None if upfront_seconds is None else upfront_seconds + e for e in elapsed_at(rows)]
        frontier = []
        for point in ev.get("frontier") or []:
            step = point["step"]
            if step >= len(flops):
                raise DataError(f"{run_dir / 'eval' / 'eval.json'}: a frontier point at step {step}, but "
                                f"{run_dir / 'metrics.jsonl'} ends at step {len(flops) - 1}")
            frontier.append({"step": step, "kl": point.get("kl"), "reward": point.get("reward"),
                             "flops": flops[step], "seconds": seconds[step]})
        samples = list(read_jsonl(run_dir / "eval" / "samples.jsonl"))
        out["methods"][method] = {
            "run": name, "reward": ev.get("reward"), "reward_stderr": ev.get("reward_stderr"), "kl": ev.get("kl"),
            "flops": flops[-1], "seconds": seconds[-1], "flops_exact": exact, "frontier": frontier,
            "skipped_steps": rows[-1]["skipped_steps"] if rows else 0,
            "per_prompt_variance": per_prompt_variance(samples),
        }
    return out


def _pairs_seen(steps: int, cfg: SentimentConfig, n_pairs: int) -> int:
    """Pairs the DPO run trained on: ``train.epochs`` x the pairs, or ``max_steps`` full global batches."""
    train = {**cfg.train.model_dump(), **cfg.dpo.train}
    if train.get("max_steps"):
        return steps * train["batch_size"] * train["grad_accum"]
    return math.ceil(train["epochs"] * n_pairs)


# ------------------------------------------------------------------------------------------------ the claims

def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(kept) if kept else None


def analyse(seeds: dict[int, dict[str, Any]], target: float | None) -> dict[str, Any]:
    """The per-method aggregates over seeds and each claim's ratio, interval over seeds and verdict."""
    methods = sorted({m for s in seeds.values() for m in s["methods"]}, key=["DPO", "PPO", "PPO-GT"].index)
    ref = _mean([s["reward_ref"] for s in seeds.values()])
    finals = {m: [s["methods"][m]["reward"] for s in seeds.values()] for m in methods}
    if target is None:
        # Half of the strongest method's mean gain: a real improvement for any method that reaches it, and one
        # the strongest reaches on average. A method that never does is reported as such (no cost to compare).
        best = max(m for m in (_mean(v) for v in finals.values()) if m is not None)
        target = ref + 0.5 * (best - ref)  # type: ignore[operator]
    agg: dict[str, dict[str, Any]] = {}
    for m in methods:
        runs = [s["methods"][m] for s in seeds.values()]
        reached = [p for p in (reach(r["frontier"], target) for r in runs) if p is not None]
        gains = [(r["reward"] - s["reward_ref"]) for r, s in zip(runs, seeds.values())]
        agg[m] = {
            "final_reward": _mean(finals[m]),
            "final_reward_std": statistics.stdev(finals[m]) if len(finals[m]) > 1 else None,
            "final_rewards": finals[m], "kl": _mean([r["kl"] for r in runs]),
            "reached": len(reached), "runs": len(runs),
            "diverged": sum(1 for s in seeds.values() if _diverged(s, m)),
            "flops_to_target": _mean([p["flops"] for p in reached]),
            "flops_to_target_bounds": [_mean([p["bounds"]["flops"][i] for p in reached]) for i in (0, 1)],
            "seconds_to_target": _mean([p["seconds"] for p in reached]),
            "flops_total": _mean([r["flops"] for r in runs]), "seconds_total": _mean([r["seconds"] for r in runs]),
            "flops_exact": all(r.get("flops_exact", True) for r in runs),
            "gain_per_pflop": _mean([g / (r["flops"] / 1e15) for g, r in zip(gains, runs)]),
            "per_prompt_variance": _mean([r["per_prompt_variance"] for r in runs]),
        }
    per_seed = list(seeds.values())
    claims = {}
    for key, (quoted, what, holds_at, side) in QUOTED.items():
        entry: dict[str, Any] = {"quoted": quoted, "measured": what, "holds_at": holds_at, "side": side}
        for other in (m for m in methods if m != "DPO"):
            entry[f"vs {other}"] = COMPARE[key](per_seed, other, target, holds_at, side)
        claims[key] = entry
    return {"target_reward": target, "reward_ref": ref, "methods": agg, "claims": claims}


def _judged(values: list[tuple[float, float]], statistic: Callable[[list[float], list[float]], float | None],
            holds_at: float, side: str, **extra: Any) -> dict[str, Any]:
    """A claim's ratio DPO / other on every seed, its bootstrap interval over seeds and the verdict."""
    def on(idx: Sequence[int]) -> float | None:
        return statistic([values[i][0] for i in idx], [values[i][1] for i in idx])

    value, interval = on(range(len(values))), bootstrap_interval(len(values), on)
    if value is None or interval is None:
        reason = ("one seed: no interval over seeds" if len(values) < 2 else
                  "the ratio is undefined on most resamples of the seeds (a zero in its denominator)")
        return {"ratio": value, "interval": interval, "verdict": NOT_MEASURABLE, "reason": reason, **extra}
    return {"ratio": value, "interval": interval, "verdict": verdict(interval, holds_at, side), "reason": None,
            **extra}


def _unmeasurable(reason: str, **extra: Any) -> dict[str, Any]:
    return {"ratio": None, "interval": None, "verdict": NOT_MEASURABLE, "reason": reason, **extra}


def _ratio_of_means(a: list[float], b: list[float]) -> float | None:
    return ratio(statistics.fmean(a), statistics.fmean(b))


def _compute(seeds: list[dict[str, Any]], other: str, target: float, holds_at: float, side: str) -> dict[str, Any]:
    """FLOPs to reach R*, interpolated between checkpoints: comparable only when both reach R* on every seed
    (a mean over the seeds that did would leave out the hardest ones)."""
    hits = {m: [reach(s["methods"][m]["frontier"], target) for s in seeds] for m in ("DPO", other)}
    missed = [f"{m} reached R* on {sum(p is not None for p in ps)}/{len(ps)} seeds"
              for m, ps in hits.items() if any(p is None for p in ps)]
    if missed:
        return _unmeasurable("; ".join(missed))
    values = [(a["flops"], b["flops"]) for a, b in zip(hits["DPO"], hits[other])]  # type: ignore[index]
    bounds = [(a["bounds"]["flops"], b["bounds"]["flops"]) for a, b in zip(hits["DPO"], hits[other])]  # type: ignore[index]
    # The checkpoints alone bound the ratio: DPO's cheapest reading over the other's dearest, and back.
    low = _ratio_of_means([a[0] for a, _ in bounds], [b[1] for _, b in bounds])
    high = _ratio_of_means([a[1] for a, _ in bounds], [b[0] for _, b in bounds])
    return _judged(values, _ratio_of_means, holds_at, side, checkpoint_bounds=[low, high])


def _stability(seeds: list[dict[str, Any]], other: str, target: float, holds_at: float, side: str) -> dict[str, Any]:
    """Standard deviation of the final reward over seeds, DPO / other (std scale, as the quote's "30%")."""
    values = [(s["methods"]["DPO"]["reward"], s["methods"][other]["reward"]) for s in seeds]
    if any(v is None or not math.isfinite(v) for pair in values for v in pair):
        return _unmeasurable("a final reward is missing or not finite")

    def std_ratio(a: list[float], b: list[float]) -> float | None:
        return ratio(statistics.pstdev(a), statistics.pstdev(b)) if len(set(a)) > 1 or len(set(b)) > 1 else None

    if len(values) < 3:  # both resamples of 2 seeds that have a spread give the same ratio: a point, no interval
        return _unmeasurable(f"{len(values)} seed(s): one spread at most, no interval over seeds (3 or more needed)",
                             ratio_of_two=std_ratio([a for a, _ in values], [b for _, b in values]))
    # The sample std's (n - 1) cancels in the ratio: pstdev keeps a resample of one repeated seed at 0, not an error.
    return _judged(values, std_ratio, holds_at, side)


def _efficiency(seeds: list[dict[str, Any]], other: str, target: float, holds_at: float, side: str) -> dict[str, Any]:
    """Reward gain over pi_ref at matched KL, DPO / other: each seed's two frontiers read over the KL range both
    reach. Measurable only when the other method's gain is distinguishable from zero: a ratio to a gain that
    may be 0 or negative says nothing (a comparator that lowered the reward would flip a DPO win into a loss)."""
    values, ranges = [], []
    for i, s in enumerate(seeds):
        matched = matched_kl_gains(s["methods"]["DPO"]["frontier"], s["methods"][other]["frontier"],
                                   s["reward_ref"])
        if matched is None:
            return _unmeasurable(f"seed {i + 1} of {len(seeds)}: the two frontiers share no KL range")
        values.append(matched[:2])
        ranges.append(list(matched[2]))
    gains = {m: [v[j] for v in values] for j, m in enumerate(("DPO", other))}
    intervals = {m: bootstrap_interval(len(values), lambda idx, g=g: statistics.fmean(g[i] for i in idx))
                 for m, g in gains.items()}
    extra = {"kl_ranges": ranges, "gains": gains, "gain_intervals": intervals}
    if intervals[other] is None or intervals["DPO"] is None:
        return _unmeasurable("one seed: no interval over seeds", **extra)
    low, high = intervals[other]
    if low > 0:
        return _judged(values, _ratio_of_means, holds_at, side, **extra)
    shown = f"{other}'s gain at matched KL {statistics.fmean(gains[other]):+.3f}, interval [{low:+.3f}, {high:+.3f}]"
    if high >= 0:
        return _unmeasurable(f"{shown}: not distinguishable from 0", **extra)
    dpo_low = intervals["DPO"][0]
    if dpo_low > 0:  # the other method lowered the reward where DPO raised it: DPO is ahead by any ratio
        return {"ratio": None, "interval": None, "verdict": "holds", "reason": f"{shown}: it lowered the reward, "
                "DPO raised it", **extra}
    return _unmeasurable(f"{shown}: it lowered the reward, and DPO's gain is not above 0 either", **extra)


def _variance(seeds: list[dict[str, Any]], other: str, target: float, holds_at: float, side: str) -> dict[str, Any]:
    """Per-prompt reward variance (the quote's own scale), mean over seeds, DPO / other."""
    values = [(s["methods"]["DPO"]["per_prompt_variance"], s["methods"][other]["per_prompt_variance"]) for s in seeds]
    if any(v is None for pair in values for v in pair):
        return _unmeasurable("fewer than 2 samples per held-out prompt (eval.n_samples)")
    return _judged(values, _ratio_of_means, holds_at, side)


COMPARE: dict[str, Callable[..., dict[str, Any]]] = {
    "compute": _compute, "stability": _stability, "efficiency": _efficiency, "variance": _variance}
"""claim -> how DPO and another method are compared on it, over the seeds."""
NOT_MEASURABLE = "not measurable"


def _diverged(seed: dict[str, Any], method: str) -> bool:
    run = seed["methods"][method]
    floor = seed["reward_ref"] - 2 * (seed.get("reward_ref_stderr") or 0.0)
    return run["skipped_steps"] > 0 or run["reward"] is None or not math.isfinite(run["reward"]) or run["reward"] < floor


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if isinstance(value, float) and abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _tflops(value: float | None) -> float | None:
    return None if value is None else value / 1e12


def markdown(result: dict[str, Any]) -> str:
    """claims.md: the per-method table and the claims table."""
    agg = result["methods"]
    lines = [f"Held-out reward of π_ref {_fmt(result['reward_ref'])}; target R* = {_fmt(result['target_reward'])}; "
             f"{len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))}).", "",
             "| method | final reward (mean ± std over seeds) | KL nats | reached R* | TFLOPs to R* (checkpoints "
             "before, after) | s to R* | TFLOPs total | s total | gain per PFLOP | per-prompt reward variance | "
             "diverged |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, a in agg.items():
        low, high = (_tflops(v) for v in a["flops_to_target_bounds"])
        to_target = _fmt(_tflops(a["flops_to_target"]), 1) + (f" ({_fmt(low, 1)}, {_fmt(high, 1)})" if a["reached"]
                                                               else "")
        estimated = "" if a.get("flops_exact", True) else " (estimated: train.log_every > 1)"
        lines.append(f"| {m} | {_fmt(a['final_reward'])} ± {_fmt(a['final_reward_std'])} | {_fmt(a['kl'], 2)} | "
                     f"{a['reached']}/{a['runs']} | {to_target} | {_fmt(a['seconds_to_target'], 0)} | "
                     f"{_fmt(_tflops(a['flops_total']), 1)}{estimated} | {_fmt(a['seconds_total'], 0)} | "
                     f"{_fmt(a['gain_per_pflop'])} | {_fmt(a['per_prompt_variance'], 4)} | "
                     f"{a['diverged']}/{a['runs']} |")
    others = [m for m in agg if m != "DPO"]
    lines += ["", f"Each ratio DPO / other with its {LEVEL:.0%} bootstrap interval over seeds; a verdict holds only "
              "when the whole interval is on the quote's side of the bar.", "",
              "| claim (as quoted) | measured as | holds if the ratio is | " +
              " | ".join(f"vs {m}: ratio [interval], verdict" for m in others) + " |",
              "|---|---|---|" + "---|" * len(others)]
    for c in result["claims"].values():
        cells = []
        for m in others:
            v = c[f"vs {m}"]
            interval = f" [{_fmt(v['interval'][0], 2)}, {_fmt(v['interval'][1], 2)}]" if v["interval"] else ""
            reason = f" ({v['reason']})" if v["reason"] else ""
            if v.get("checkpoint_bounds"):  # what the ratio could be anywhere between the checkpoints
                low, high = v["checkpoint_bounds"]
                reason += f" (checkpoints alone: {_fmt(low, 2)} to {_fmt(high, 2)})"
            cells.append(f"{_fmt(v['ratio'], 2)}{interval}: **{v['verdict']}**{reason}")
        lines.append(f"| {c['quoted']} | {c['measured']} | {c['side']} {c['holds_at']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_claims(cfg: SentimentConfig, experiment: Callable[[SentimentConfig], dict[str, Any]]) -> dict[str, Any]:
    """The experiment once per seed (``RUN_DIR/seed-S``), then ``RUN_DIR/claims.json`` and ``claims.md``."""
    from dpokit.models.loading import load_tokenizer, resolve

    root = Path(cfg.run_dir)
    if "DPO" not in method_runs(cfg) or len(method_runs(cfg)) < 2:
        from dpokit.errors import ConfigError

        raise ConfigError("claims: needs ppo.ground_truth or ppo.reward_model (something to compare DPO with)")
    tokenizer = load_tokenizer(resolve(cfg.model))
    seeds: dict[int, dict[str, Any]] = {}
    for seed in cfg.claims.seeds:
        one = cfg.model_copy(deep=True)
        one.run_dir = str(root / f"seed-{seed}")
        one.sampling.seed, one.train.seed = seed, seed
        one.claims.seeds = []
        say(f"claims: seed {seed} -> {one.run_dir}")
        summary = experiment(one)
        seeds[seed] = measure_seed(one, Path(one.run_dir), summary, tokenizer)
    result = {"seeds": list(seeds), **analyse(seeds, cfg.claims.target_reward), "per_seed": seeds}
    write_json(root / "claims.json", result)
    text = markdown(result)
    write_text(root / "claims.md", text)
    print(text)
    say(f"claims: {root / 'claims.json'}, {root / 'claims.md'}")
    return result
