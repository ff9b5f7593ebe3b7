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
             A frontier point (a checkpoint) is where R* can be reached: the first checkpoint whose held-out
             reward is >= R* is charged all the steps up to it.
stability    the sample standard deviation of the final held-out reward over the seeds (each seed samples its
             own preference data and trains every run), and the runs that diverged: a final reward below
             pi_ref's by more than 2 standard errors, or a step skipped for a non-finite loss.
efficiency   held-out reward gained over pi_ref per nat of KL(pi || pi_ref), and per PFLOP of compute.
variance     the standard deviation of the reward over the samples of one prompt (``eval.n_samples`` >= 2),
             averaged over the held-out prompts.

Each claim is a ratio DPO / PPO (and DPO / PPO-GT) set beside the quoted figure, with a plain verdict.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.io import read_json, read_jsonl, write_json, write_text
from dpokit.recipes.sentiment.common import say
from dpokit.recipes.sentiment.runs import REWARD_MODEL, beta_name, train_rows

if TYPE_CHECKING:
    from dpokit.recipes.sentiment.config import SentimentConfig

QUOTED = {
    "compute": ("50% less compute", "FLOPs to reach R*, DPO / PPO", 0.5, "<="),
    "stability": ("30% more stable", "std of the final reward over seeds, DPO / PPO", 0.7, "<="),
    "efficiency": ("20% higher efficiency", "reward gain per nat of KL, DPO / PPO", 1.2, ">="),
    "variance": ("15% less variance in outputs", "per-prompt reward std, DPO / PPO", 0.85, "<="),
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


def per_prompt_std(samples: list[dict[str, Any]]) -> float | None:
    """Mean over prompts of the sample standard deviation of the policy's rewards (temperature 1)."""
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for row in samples:
        if row.get("temperature") == 1.0 and row.get("policy_reward") is not None:
            by_prompt[row["prompt"]].append(row["policy_reward"])
    spreads = [statistics.stdev(v) for v in by_prompt.values() if len(v) >= 2]
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


def measure_seed(cfg: SentimentConfig, root: Path, summary: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Every number of one seed's experiment: per method, its frontier with the cumulative FLOPs and seconds
    at each point, and its final reward, KL, skipped steps and per-prompt reward spread."""
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
    if cfg.ppo.reward_model:
        rm_rows = train_rows(root / REWARD_MODEL)
        rm_flops = 6 * n * sum(r["tokens"] for r in rm_rows)
        rm_seconds = rm_rows[-1]["elapsed_s"] if rm_rows else 0.0
    for method, name in method_runs(cfg).items():
        run_dir = root / name
        rows = train_rows(run_dir)
        ev = read_json(run_dir / "eval" / "eval.json")
        if method == "DPO":
            # The store computes each response's reference log-probs with its prompt, once, before step 1.
            pairs = list(read_jsonl(data / "pairs-train.jsonl"))
            reference = 2 * n * sum(r["tokens"] for r in rows) * len(pairs) / max(1, _pairs_seen(rows, cfg, len(pairs)))
            upfront, step_flops = data_flops + reference, [6 * n * r["tokens"] for r in rows]
            upfront_seconds = data_seconds
        else:
            epochs = cfg.ppo.settings.get("epochs", 4)
            per_position = (2 + 2 + 2 + 6 * epochs) * n + (2 * n if method == "PPO" else 0)
            step_flops = [per_position * (r["tokens"] + r["prompt_tokens"]) for r in rows]
            upfront = data_flops + rm_flops if method == "PPO" else 0.0
            upfront_seconds = 0.0 if method == "PPO-GT" else None if data_seconds is None else data_seconds + rm_seconds
        flops = [upfront + f for f in cumulative(step_flops)]
        seconds = [None if upfront_seconds is None else upfront_seconds + r["elapsed_s"] for r in rows]
        frontier = []
        for point in ev.get("frontier") or []:
            step = point["step"]
            frontier.append({"step": step, "kl": point.get("kl"), "reward": point.get("reward"),
                             "flops": flops[step - 1] if step else 0.0, "seconds": seconds[step - 1] if step else 0.0})
        samples = list(read_jsonl(run_dir / "eval" / "samples.jsonl"))
        out["methods"][method] = {
            "run": name, "reward": ev.get("reward"), "reward_stderr": ev.get("reward_stderr"), "kl": ev.get("kl"),
            "flops": flops[-1], "seconds": seconds[-1], "frontier": frontier,
            "skipped_steps": rows[-1]["skipped_steps"] if rows else 0, "per_prompt_std": per_prompt_std(samples),
        }
    return out


def _pairs_seen(rows: list[dict[str, Any]], cfg: SentimentConfig, n_pairs: int) -> int:
    """Pairs the DPO run trained on: ``train.epochs`` x the pairs, or ``max_steps`` full global batches."""
    train = {**cfg.train.model_dump(), **cfg.dpo.train}
    if train.get("max_steps"):
        return len(rows) * train["batch_size"] * train["grad_accum"]
    return math.ceil(train["epochs"] * n_pairs)


# ------------------------------------------------------------------------------------------------ the claims

def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(kept) if kept else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0.0) else None


def reach(frontier: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first frontier point (after pi_ref) whose reward reaches ``target``."""
    return next((p for p in frontier if p["step"] and p["reward"] is not None and p["reward"] >= target), None)


def analyse(seeds: dict[int, dict[str, Any]], target: float | None) -> dict[str, Any]:
    """The per-method aggregates over seeds and each claim's ratios and verdicts."""
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
        reached = [reach(r["frontier"], target) for r in runs]
        diverged = sum(1 for s in seeds.values() if _diverged(s, m))
        gains = [(r["reward"] - s["reward_ref"]) for r, s in zip(runs, seeds.values())]
        agg[m] = {
            "final_reward": _mean(finals[m]),
            "final_reward_std": statistics.stdev(finals[m]) if len(finals[m]) > 1 else None,
            "final_rewards": finals[m], "kl": _mean([r["kl"] for r in runs]),
            "reached": sum(p is not None for p in reached), "runs": len(runs), "diverged": diverged,
            "flops_to_target": _mean([p["flops"] for p in reached if p is not None]),
            "seconds_to_target": _mean([p["seconds"] for p in reached if p is not None]),
            "flops_total": _mean([r["flops"] for r in runs]), "seconds_total": _mean([r["seconds"] for r in runs]),
            "gain_per_kl": _mean([g / r["kl"] if r["kl"] else None for g, r in zip(gains, runs)]),
            "gain_per_pflop": _mean([g / (r["flops"] / 1e15) for g, r in zip(gains, runs)]),
            "per_prompt_std": _mean([r["per_prompt_std"] for r in runs]),
        }
    claims = {}
    for key, (quoted, what, holds_at, side) in QUOTED.items():
        field = {"compute": "flops_to_target", "stability": "final_reward_std", "efficiency": "gain_per_kl",
                 "variance": "per_prompt_std"}[key]
        entry: dict[str, Any] = {"quoted": quoted, "measured": what, "holds_at": holds_at}
        for other in (m for m in methods if m != "DPO"):
            ratio = _ratio(agg["DPO"][field], agg[other][field])
            holds = None if ratio is None else (ratio <= holds_at if side == "<=" else ratio >= holds_at)
            entry[f"vs {other}"] = {"ratio": ratio, "holds": holds}
        claims[key] = entry
    return {"target_reward": target, "reward_ref": ref, "methods": agg, "claims": claims}


def _diverged(seed: dict[str, Any], method: str) -> bool:
    run = seed["methods"][method]
    floor = seed["reward_ref"] - 2 * (seed.get("reward_ref_stderr") or 0.0)
    return run["skipped_steps"] > 0 or run["reward"] is None or not math.isfinite(run["reward"]) or run["reward"] < floor


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(result: dict[str, Any]) -> str:
    """claims.md: the per-method table and the claims table."""
    agg = result["methods"]
    lines = [f"Held-out reward of π_ref {_fmt(result['reward_ref'])}; target R* = {_fmt(result['target_reward'])}; "
             f"{len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))}).", "",
             "| method | final reward (mean ± std over seeds) | KL nats | reached R* | TFLOPs to R* | s to R* | "
             "TFLOPs total | s total | gain per nat KL | gain per PFLOP | per-prompt reward std | diverged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, a in agg.items():
        tflops = [None if v is None else v / 1e12 for v in (a["flops_to_target"], a["flops_total"])]
        lines.append(f"| {m} | {_fmt(a['final_reward'])} ± {_fmt(a['final_reward_std'])} | {_fmt(a['kl'], 2)} | "
                     f"{a['reached']}/{a['runs']} | {_fmt(tflops[0], 1)} | {_fmt(a['seconds_to_target'], 0)} | "
                     f"{_fmt(tflops[1], 1)} | {_fmt(a['seconds_total'], 0)} | {_fmt(a['gain_per_kl'])} | "
                     f"{_fmt(a['gain_per_pflop'])} | {_fmt(a['per_prompt_std'])} | {a['diverged']}/{a['runs']} |")
    lines += ["", "| claim (as quoted) | measured as | holds if the ratio is | " +
              " | ".join(f"ratio vs {m}, verdict" for m in agg if m != "DPO") + " |",
              "|---|---|---|" + "---|" * (len(agg) - 1)]
    for key, c in result["claims"].items():
        side = QUOTED[key][3]
        cells = []
        for m in (m for m in agg if m != "DPO"):
            v = c[f"vs {m}"]
            verdict = "not measurable" if v["holds"] is None else ("holds" if v["holds"] else "does not hold")
            cells.append(f"{_fmt(v['ratio'], 2)}: {verdict}")
        lines.append(f"| {c['quoted']} | {c['measured']} | {side} {c['holds_at']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_claims(cfg: SentimentConfig, experiment: Callable[[SentimentConfig], dict[str, Any]]) -> dict[str, Any]:
    """The experiment once per seed (``RUN_DIR/seed-S``), then ``RUN_DIR/claims.json`` and ``claims.md``."""
    from dpokit.models import load_tokenizer, resolve

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
