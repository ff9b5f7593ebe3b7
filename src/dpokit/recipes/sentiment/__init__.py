"""``dpokit recipe sentiment``: the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, Section
6.1 and Figure 2), end to end and offline.

    openings (shipped, made by ``dpokit.recipes.openings``) -> train prompts / held-out prompts
    [sft]      optional: pi_SFT = SFT of the base model; it then serves as pi_ref
    samples    K continuations per train prompt from pi_ref at temperature 1   (cached by content)
    rewards    VADER compound score of each continuation (``dpokit.rewards``: the ground truth)
    pairs      all ordered pairs of a prompt's samples, ties dropped (the paper's 6 for K = 4), or best vs worst,
               written as a standard preference file with the rewards: RUN_DIR/data/pairs-train.jsonl
    dpo        one run per beta; reference log-probs computed once, in the content-addressed store
    baselines  Preferred-FT (SFT on each prompt's best sample), Unlikelihood, Best-of-N by the true reward
    rlhf       a reward model on the pairs, PPO on it and PPO-GT on the true reward (``ppo``)
    online     online / semi-online DPO on the policy's own samples, one run per sync interval (``online``)
    eval       held-out prompts, samples at temperature 1: mean reward and KL(pi || pi_ref) per run and per
               checkpoint (``dpokit.evaluate.evaluate_run``), implicit-reward accuracy on held-out pairs
    report     RUN_DIR/report.html, RUN_DIR/frontier.svg, RUN_DIR/summary.json and a before/after table

Every stage is skipped when its result exists for the same inputs: samples are cached under
``$DPOKIT_CACHE/recipes/sentiment`` by a hash of the model's weights, the prompts, the sampling parameters and
the seed; a training run or an evaluation is redone only when its result settings (``dpokit.config.
result_settings``) or its data changed.

Files, one per stage: ``config`` (the typed config, presets), ``sampling`` (pi_ref's samples, rewards, pairs),
``runs`` (each run's dpokit config, training, evaluation, their cache keys; Best-of-N), ``report`` (summary,
tables, frontier); ``run`` below chains them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dpokit.config import save_config
from dpokit.errors import DataError
from dpokit.io import write_json, write_jsonl, write_text
from dpokit.recipes.sentiment.common import CACHE_VERSION, RECIPE, StageTimer, mean_stderr, recipe_device, say
from dpokit.recipes.sentiment.config import (
    BaselineConfig,
    DpoConfig,
    EvalSection,
    PairsConfig,
    PromptsConfig,
    SamplingConfig,
    SentimentConfig,
    SftConfig,
    find_preset,
    load_recipe_config,
    resolve_precisions,
)
from dpokit.recipes.sentiment.report import print_table, results_markdown, summarize, write_frontier
from dpokit.recipes.sentiment.runs import (
    PPO_PROMPTS,
    REPORT_BETA,
    RunSpec,
    best_of_n_eval,
    best_of_n_kl,
    evaluate_spec,
    reward_model_metrics,
    run_specs,
    sft_spec,
    sft_stage,
    train_key,
    train_run,
    wall_clock,
)
from dpokit.recipes.sentiment.sampling import (
    Policy,
    add_rewards,
    load_openings,
    load_policy,
    make_pairs,
    sample_continuations,
    sft_rows,
    usable,
)


def run(preset: str | Path | dict[str, Any] | None = None, overrides: Sequence[str] | None = None,
        **kwargs: Any) -> dict[str, Any]:
    """Run the experiment; returns the summary (also in ``RUN_DIR/summary.json``). With ``claims.seeds``, the
    experiment once per seed and the claims measured across them (``RUN_DIR/claims.json``)."""
    cfg = load_recipe_config(preset, overrides, **kwargs)
    if cfg.claims.seeds:
        from dpokit.recipes.sentiment.claims import run_claims

        return run_claims(cfg, experiment)
    return experiment(cfg)


def experiment(cfg: SentimentConfig) -> dict[str, Any]:
    """One experiment: every stage of the module docstring; returns the summary."""
    started = time.perf_counter()
    stage = StageTimer()
    resolve_precisions(cfg)
    root = Path(cfg.run_dir)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "recipe.yaml")

    train_prompts, heldout_prompts = load_openings(cfg.prompts.file)
    train_prompts = train_prompts[:cfg.prompts.n_train]
    heldout_prompts = heldout_prompts[:cfg.prompts.n_heldout]
    prompts_file = data / "heldout-prompts.jsonl"
    write_jsonl([{"prompt": p} for p in heldout_prompts], prompts_file)
    write_jsonl([{"prompt": p} for p in train_prompts], data / PPO_PROMPTS)
    say(f"{len(train_prompts)} train prompts, {len(heldout_prompts)} held-out prompts -> {root}")
    ref_model, heldout_rows, extra = preference_data(cfg, train_prompts, heldout_prompts, data, root, stage)

    specs = run_specs(cfg, data, root, ref_model)
    results: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        with stage(f"train {name}", f"{spec.label} ({spec.task}) -> {spec.config['run_dir']}"):
            train_run(spec)
        if not spec.is_policy:
            extra[name] = reward_model_metrics(Path(spec.config["run_dir"]))
            continue
        with stage(f"eval {name}", f"{spec.label} on {len(heldout_prompts)} held-out prompts"):
            results[name] = {**evaluate_spec(spec, cfg, prompts_file), "seconds": wall_clock(spec, data)}
    labels = {name: spec.label for name, spec in specs.items()}
    for n in cfg.best_of_n:
        results[f"best-of-{n}"] = best_of_n_eval(heldout_rows, n, root / f"best-of-{n}", cfg.reward)
        labels[f"best-of-{n}"] = f"Best-of-{n}"

    with stage("report", f"{root / 'report.html'}"):
        from dpokit.evaluate.report import write_report

        write_report([Path(specs[name].config["run_dir"]) if name in specs else root / name for name in results],
                     out=root / "report.html")
        write_frontier(results, labels, root / "frontier.svg")
    extra.update(stage_seconds=stage.seconds, stage_cpu_seconds=stage.cpu_seconds, threads=torch.get_num_threads(),
                 elapsed_s=round(time.perf_counter() - started, 1))
    summary = summarize(cfg, results, labels, extra)
    write_json(root / "summary.json", summary)
    write_text(root / "results.md", results_markdown(summary))
    print_table(summary)
    print(f"report: {root / 'report.html'}\nsummary: {root / 'summary.json'}")
    return summary


def preference_data(cfg: SentimentConfig, train_prompts: list[str], heldout_prompts: list[str], data: Path,
                    root: Path, stage: Callable[[str, str], Any]) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """The stages before the runs: pi_ref (the base model, or pi_SFT when ``sft.enabled``), its samples of the
    train and held-out prompts with their rewards, and the pair files in ``data``. Returns (pi_ref, the
    held-out samples, the counts the summary reports)."""
    k, k_heldout = cfg.sampling.samples_per_prompt, cfg.sampling.heldout_samples_per_prompt
    with stage("load", f"pi_ref = {cfg.model}"):
        policy = load_policy(cfg.model)
    ref_model = cfg.model
    if cfg.sft.enabled:
        ref_model, policy = sft_stage(cfg, policy, train_prompts, data, root, stage)

    with stage("sample", f"{k} samples per train prompt, {k_heldout} per held-out prompt from pi_ref"):
        train_rows = add_rewards(sample_continuations(policy, train_prompts, k, cfg, "train", cfg.sampling.seed),
                                 cfg.reward)
        heldout_rows = add_rewards(sample_continuations(policy, heldout_prompts, k_heldout, cfg, "heldout",
                                                        cfg.sampling.seed + 1), cfg.reward)
    del policy  # training loads its own copies
    write_jsonl(train_rows, data / "samples-train.jsonl")
    write_jsonl(heldout_rows, data / "samples-heldout.jsonl")
    pairs = make_pairs(train_rows, cfg.pairs.mode, cfg.pairs.min_margin)
    heldout_pairs = make_pairs(heldout_rows, "best_worst", cfg.pairs.min_margin)
    preferred = make_pairs(train_rows, "best_worst", cfg.pairs.min_margin)
    if not pairs or not heldout_pairs:
        raise DataError("pairs: every sample pair tied (no preference data); sample more or longer continuations")
    write_jsonl(pairs, data / "pairs-train.jsonl")
    write_jsonl(heldout_pairs, data / "pairs-heldout.jsonl")
    write_jsonl(preferred, data / "preferred-ft.jsonl")
    ref_rewards = [r for row in heldout_rows for r in row["rewards"]]
    ref_mean, ref_stderr = mean_stderr(ref_rewards)
    say(f"pairs: {len(pairs)} train ({cfg.pairs.mode}), {len(heldout_pairs)} held-out; pi_ref held-out reward "
        f"{ref_mean:.3f} ± {ref_stderr:.3f} over {len(ref_rewards)} samples")
    counts = {"n_train_prompts": len(train_prompts), "train_pairs": len(pairs), "pairs_mode": cfg.pairs.mode,
              "samples_per_prompt": k, "max_new_tokens": cfg.sampling.max_new_tokens,
              "reward_ref_samples": ref_mean, "reward_ref_samples_stderr": ref_stderr,
              "reward_ref_samples_n": len(ref_rewards)}
    return ref_model, heldout_rows, counts


__all__ = [
    "CACHE_VERSION", "RECIPE", "REPORT_BETA", "BaselineConfig", "DpoConfig", "EvalSection", "PairsConfig", "Policy",
    "PromptsConfig", "RunSpec", "SamplingConfig", "SentimentConfig", "SftConfig", "add_rewards", "best_of_n_eval",
    "best_of_n_kl", "evaluate_spec", "find_preset", "load_openings", "load_policy", "load_recipe_config", "make_pairs",
    "preference_data", "print_table", "recipe_device", "resolve_precisions", "results_markdown", "run", "run_specs",
    "sample_continuations", "sft_rows", "sft_spec", "sft_stage", "summarize", "train_key", "train_run", "usable",
    "write_frontier",
]
