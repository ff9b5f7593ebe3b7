"""``dpokit eval RUN_DIR``: what DPO did to the policy, measured the way the paper measures it.

    held-out pairs  -> implicit-reward accuracy and mean margin (r = beta * log pi/pi_ref, chosen vs rejected)
    eval prompts    -> samples from pi and pi_ref at each temperature
                    -> kl: KL(pi || pi_ref) on draws from pi itself (temperature 1, top_p 1: the temperature-1
                       samples, or samples of its own when --top-p < 1), as the mean summed log-ratio and stderr
                    -> reward: mean ground-truth reward of policy and reference samples (with a reward function)
                    -> win_rate: policy vs reference (or the dataset's chosen response), by reward or LLM judge
    checkpoints     -> one (kl, reward) frontier point each (the paper's Fig. 2, left), plus pi_ref at kl = 0

Writes ``RUN_DIR/eval/eval.json`` and ``RUN_DIR/eval/samples.jsonl`` (each written whole, then renamed).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpokit.data.config import DataConfig
from dpokit.data.pipeline import load_preferences
from dpokit.data.vision import load_vision
from dpokit.errors import DpokitError
from dpokit.evaluate.prompts import EvalPrompt, load_prompts, text_of  # noqa: F401 (this module's names too)
from dpokit.evaluate.scoring import Scorer, load_scorer
from dpokit.evaluate.stats import WinRate, kl_estimate, mean_stderr
from dpokit.evaluate.vision import JUDGE_NOTE
from dpokit.io import write_json, write_jsonl
from dpokit.models.generate import Pixels, Sample, SamplingParams, encode_prompts, generate
from dpokit.models.loading import apply_lora, freeze, load_model
from dpokit.models.source import runnable_attention
from dpokit.models.vision import load_vision_model
from dpokit.rewards import RewardFn, get_reward, reward_name, score_texts
from dpokit.rewards.judge import RewardJudge, Verdict
from dpokit.training.checkpoint import load_weights_into, policy_weights, verify_checkpoint
from dpokit.training.resume import is_run_dir

KL_TEMPERATURE = 1.0
"""KL(pi || pi_ref) needs samples from pi itself, so temperature 1 is always evaluated; with ``top_p`` < 1 the
estimate draws its own samples from pi (temperature 1, top_p 1: ``kl_logratios``)."""


# ---------------------------------------------------------------------------------------------- measurements

def heldout_metrics(scorer: Scorer, source: str, data_cfg: DataConfig, split: str) -> dict[str, Any]:
    """Implicit-reward accuracy and mean margin on held-out preference pairs, named as the training metrics
    (``rewards/accuracies``: fraction with r(x, y_w) > r(x, y_l); ``rewards/margins``: mean r(x, y_w) - r(x, y_l))."""
    pixels = None
    if scorer.processor is not None:  # image pairs, read and tokenized as training reads them
        pairs, _ = load_vision(source, scorer.processor, data_cfg, split)
        pixels = [p.pixels for p in pairs] * 2
    else:
        pairs, _ = load_preferences(source, scorer.tokenizer, data_cfg, split)
    if not pairs:
        raise DpokitError(f"{source}: no usable held-out pairs")
    prompt_ids = [p.prompt_ids for p in pairs] * 2
    response_ids = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    rewards = scorer.implicit_rewards(prompt_ids, response_ids, pixels)["rewards"]
    n = len(pairs)
    chosen, rejected = rewards[:n], rewards[n:]
    margins = mean_stderr((chosen - rejected).tolist())
    return {"heldout_pairs": n, "rewards/accuracies": float((chosen > rejected).float().mean()),
            "rewards/margins": margins.mean, "rewards/margins_stderr": margins.stderr,
            "rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean())}


@dataclass
class SampleSet:
    """Samples of one model at one temperature, scored by pi and pi_ref. Tensors have shape (N,)."""

    samples: list[Sample]
    logratios: torch.Tensor
    """log pi(y|x) - log pi_ref(y|x) of each sample."""
    rewards: list[float] | None
    """Ground-truth reward of each sample, when a reward function is given."""


def sample_and_score(scorer: Scorer, model: nn.Module, prompt_ids: Sequence[list[int]], prompts: Sequence[str],
                     params: SamplingParams, reward_fn: RewardFn | None, reward_label: str,
                     policy: nn.Module | None = None, pixels: Sequence[Pixels] | None = None) -> SampleSet:
    """Sample from ``model`` and score the samples. ``policy`` is the pi of the log-ratio (default the scorer's;
    a checkpoint's model for frontier points); ``pixels``: each prompt's images (a vision-language model), given
    to sampling and to both log-probs."""
    samples = generate(model, scorer.tokenizer, prompt_ids, params, pixels=pixels)
    responses = [s.response_ids for s in samples]
    policy_logps, _ = scorer.logps(policy if policy is not None else scorer.policy, prompt_ids, responses, pixels)
    ref_logps, _ = scorer.logps(scorer.reference, prompt_ids, responses, pixels)
    rewards = None
    if reward_fn is not None:
        rewards = score_texts(reward_fn, list(prompts), [s.text for s in samples], reward_label)
    return SampleSet(samples, policy_logps - ref_logps, rewards)


def kl_logratios(scorer: Scorer, model: nn.Module, prompt_ids: Sequence[list[int]], params: SamplingParams,
                 sampled: SampleSet, log: Callable[[str], None],
                 pixels: Sequence[Pixels] | None = None) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x) of draws y ~ pi(.|x) of ``model`` (pi), whose mean estimates
    KL(pi || pi_ref): ``sampled``'s own when they were drawn at temperature 1 and top_p 1 (no extra cost), else
    new samples at those settings with the same seed. Nucleus samples are draws from a truncated pi, and the
    mean log-ratio over them estimates no divergence (it is biased either way, and can be negative)."""
    if params.temperature == KL_TEMPERATURE and params.top_p == 1.0:
        return sampled.logratios
    log(f"sampling {len(prompt_ids)} responses from pi at temperature 1, top_p 1 for the KL estimate")
    exact = replace(params, temperature=KL_TEMPERATURE, top_p=1.0)
    return sample_and_score(scorer, model, prompt_ids, [], exact, None, "", policy=model, pixels=pixels).logratios


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete, hash-verified ``checkpoints/step-N``, oldest first."""
    found = []
    root = run_dir / "checkpoints"
    for path in root.glob("step-*") if root.is_dir() else []:
        step = path.name.removeprefix("step-")
        if path.is_dir() and step.isdigit() and verify_checkpoint(path) is None:
            found.append((int(step), path))
    return sorted(found)


# ------------------------------------------------------------------------------------------------ pipeline

def _stderr_log(message: str) -> None:
    print(f"eval: {message}", file=sys.stderr, flush=True)


def _num(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def evaluate_run(
    run_dir: str | Path,
    *,
    prompts: str | None = None,
    reward: str | RewardFn | None = None,
    judge: Any = None,
    temperatures: Sequence[float] = (KL_TEMPERATURE,),
    n_samples: int = 1,
    max_new_tokens: int = 64,
    top_p: float = 1.0,
    seed: int = 0,
    max_prompts: int | None = None,
    batch_size: int = 16,
    frontier: bool = True,
    baseline: str = "reference",
    ref: str | None = None,
    beta: float | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = _stderr_log,
) -> dict[str, Any]:
    """Evaluate a run; write ``eval.json`` and ``samples.jsonl`` into ``out_dir`` (default ``RUN_DIR/eval``) and
    return the ``eval.json`` content.

    Args:
        prompts: prompt file; default the prompts of the run's ``data.eval``.
        reward: ground-truth reward: ``sentiment``, ``length``, ``module:function``, a reward model's run
            directory (``dpokit rm``) or a callable.
        judge: an object with ``compare(prompts, policy_texts, baseline_texts) -> list[Verdict]`` (e.g.
            :class:`dpokit.rewards.judge.LLMJudge`); default: the reward function, when given.
        temperatures: sampling temperatures for reward and win rate (1.0 is always added: KL needs it).
        n_samples: samples per prompt.
        baseline: ``reference`` (pi_ref samples) or ``chosen`` (the dataset's chosen responses) for the win rate.
    """
    log = log or (lambda message: None)
    started = time.perf_counter()
    run_dir = Path(run_dir)
    _check_arguments(run_dir, n_samples, baseline, temperatures)
    reward_fn, reward_label, judge = _reward_and_judge(reward, judge)
    scorer = load_scorer(run_dir, ref, beta, batch_size=batch_size)
    cfg = scorer.config
    assert cfg is not None

    result: dict[str, Any] = {"run_dir": str(run_dir), "model": "final", "beta": scorer.beta}
    if cfg.data.eval:
        log(f"implicit rewards on held-out pairs of {cfg.data.eval}")
        result.update(heldout_metrics(scorer, cfg.data.eval, cfg.data, cfg.data.eval_split))
    prompt_source = prompts or cfg.data.eval
    if not prompt_source:
        raise DpokitError(f"{run_dir}: no prompts to sample from; give --prompts FILE or set data.eval")
    prompts_in = Prompts.load(scorer, prompt_source, cfg.data.eval_split, max_prompts, n_samples, baseline, log)
    result.update({"prompts": prompt_source, "n_prompts": len(prompts_in.ids) // n_samples, "n_samples": n_samples,
                   "max_new_tokens": max_new_tokens, "top_p": top_p, "seed": seed, "reward_fn": reward_label,
                   "judge": getattr(judge, "name", None) if judge is not None else None, "baseline": baseline,
                   **({"images_note": JUDGE_NOTE} if prompts_in.pixels is not None else {})})

    sample_rows: list[dict[str, Any]] = []
    per_temperature = []
    for temperature in sorted(set(temperatures) | {KL_TEMPERATURE}):
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, batch_size)
        entry, pol, ref_set, verdicts = _at_temperature(scorer, prompts_in, params, reward_fn, reward_label, judge,
                                                        baseline, log)
        if temperature == KL_TEMPERATURE:
            result.update(_headline(entry, kl_logratios(scorer, scorer.policy, prompts_in.ids, params, pol, log,
                                                        prompts_in.pixels)))
            reference_at_1 = ref_set
        per_temperature.append(entry)
        sample_rows.extend(_sample_rows(temperature, n_samples, prompts_in.texts, prompts_in.chosen, pol, ref_set,
                                        verdicts, scorer.beta, baseline))
    result["temperatures"] = per_temperature

    if frontier:
        result["frontier"] = _frontier(scorer, run_dir, prompts_in, max_new_tokens, top_p, seed, batch_size,
                                       reward_fn, reward_label, reference_at_1, log)
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    result = _clean(result)
    _publish(run_dir, Path(out_dir) if out_dir is not None else run_dir / "eval", cfg, result, sample_rows, log)
    return result


def _publish(run_dir: Path, out: Path, cfg: Any, result: dict[str, Any], sample_rows: list[dict[str, Any]],
             log: Callable[[str], None]) -> None:
    """``eval.json`` and ``samples.jsonl`` into ``out``; then the run's model card and its trackers."""
    write_jsonl(sample_rows, out / "samples.jsonl")
    write_json(out / "eval.json", result)
    log(f"wrote {out / 'eval.json'} and {out / 'samples.jsonl'}")
    if out == run_dir / "eval":  # the model card of final/ now shows reward, KL and win rate
        from dpokit.integrations.hub import refresh_card

        refresh_card(run_dir)
    from dpokit.integrations.trackers import report_eval

    report_eval(run_dir, cfg, result)  # the run's log.report_to trackers, when it has any


@dataclass
class Prompts:
    """The evaluation's prompts, each repeated ``n_samples`` times side by side: token ids, text, the dataset's
    chosen response (empty when there is none) and, for a vision-language model, the pixel inputs."""

    ids: list[list[int]]
    texts: list[str]
    chosen: list[str]
    n_samples: int
    pixels: list[Pixels] | None = None

    @classmethod
    def load(cls, scorer: Scorer, source: str, split: str, max_prompts: int | None, n_samples: int,
             baseline: str, log: Callable[[str], None] = _stderr_log) -> Prompts:
        """The prompts of ``source`` (at most ``max_prompts``), encoded as the run encodes them (images
        included: ``dpokit.evaluate.vision.load_image_prompts``); sample k of prompt i is row i * n_samples + k."""
        pixels = None
        if scorer.processor is not None:
            from dpokit.evaluate.vision import load_image_prompts

            data_cfg = DataConfig(max_length=scorer.max_length, max_prompt_length=scorer.max_prompt_length)
            items, ids, pixels = load_image_prompts(source, split, max_prompts, scorer.processor, data_cfg, log)
        else:
            items = load_prompts(source, split, max_prompts)
            ids = encode_prompts(scorer.tokenizer, [item.prompt for item in items], scorer.max_prompt_length,
                                 scorer.max_length)
        if baseline == "chosen" and any(item.chosen is None for item in items):
            raise DpokitError(f"--baseline chosen: {source} has prompts without a chosen response")
        return cls([p for p in ids for _ in range(n_samples)], [item.text for item in items for _ in range(n_samples)],
                   [item.chosen or "" for item in items for _ in range(n_samples)], n_samples,
                   [p for p in pixels for _ in range(n_samples)] if pixels is not None else None)


def _headline(entry: dict[str, Any], logratios: torch.Tensor) -> dict[str, Any]:
    """The numbers eval.json leads with, those at temperature 1: KL(pi || pi_ref) (estimated from the
    ``logratios`` of draws from pi), reward, win rate and implicit reward."""
    kl = kl_estimate(logratios.tolist())
    keys = ("reward", "reward_stderr", "reward_reference", "win_rate", "win_rate_ci", "implicit_reward")
    return {"kl": kl.mean, "kl_stderr": kl.stderr, **{k: entry[k] for k in keys if k in entry}}


def _reward_and_judge(reward: str | RewardFn | None, judge: Any) -> tuple[RewardFn | None, str | None, Any]:
    """The reward function and its label; the judge of the win rate (the reward itself unless one is given)."""
    if reward is None:
        return None, None, judge
    reward_fn, label = get_reward(reward), reward_name(reward)
    return reward_fn, label, judge if judge is not None else RewardJudge(reward_fn, label or "reward")


def _check_arguments(run_dir: Path, n_samples: int, baseline: str, temperatures: Sequence[float]) -> None:
    if not is_run_dir(run_dir):
        raise DpokitError(f"{run_dir}: not a run directory (no config.yaml)")
    if n_samples < 1:
        raise DpokitError(f"--n-samples: must be at least 1, got {n_samples}")
    if baseline not in ("reference", "chosen"):
        raise DpokitError(f"--baseline: expected 'reference' or 'chosen', got '{baseline}'")
    if any(not (t >= 0 and math.isfinite(t)) for t in temperatures):
        raise DpokitError(f"--temperatures: must be finite and >= 0, got {list(temperatures)}")


def _at_temperature(scorer: Scorer, prompts: Prompts, params: SamplingParams, reward_fn: RewardFn | None,
                    reward_label: str | None, judge: Any, baseline: str, log: Callable[[str], None],
                    ) -> tuple[dict[str, Any], SampleSet, SampleSet, list[Verdict] | None]:
    """Samples of pi and pi_ref at one temperature, their rewards and implicit rewards, and the win rate."""
    log(f"sampling {len(prompts.ids)} responses from pi and pi_ref at temperature {params.temperature}")
    pol = sample_and_score(scorer, scorer.policy, prompts.ids, prompts.texts, params, reward_fn, reward_label or "",
                           pixels=prompts.pixels)
    ref_set = sample_and_score(scorer, scorer.reference, prompts.ids, prompts.texts, params, reward_fn,
                               reward_label or "", pixels=prompts.pixels)
    entry: dict[str, Any] = {"temperature": params.temperature,
                             "implicit_reward": scorer.beta * float(pol.logratios.mean()),
                             "implicit_reward_reference": scorer.beta * float(ref_set.logratios.mean()),
                             "response_tokens": mean_stderr([len(s.response_ids) for s in pol.samples]).mean,
                             "response_tokens_reference":
                                 mean_stderr([len(s.response_ids) for s in ref_set.samples]).mean}
    if pol.rewards is not None and ref_set.rewards is not None:
        estimate = mean_stderr(pol.rewards)
        entry.update(reward=estimate.mean, reward_stderr=estimate.stderr,
                     reward_reference=mean_stderr(ref_set.rewards).mean)
    verdicts: list[Verdict] | None = None
    if judge is not None:
        baseline_texts = prompts.chosen if baseline == "chosen" else [s.text for s in ref_set.samples]
        log(f"judging {len(prompts.ids)} pairs with {getattr(judge, 'name', 'judge')}")
        verdicts = judge.compare(prompts.texts, [s.text for s in pol.samples], baseline_texts)
        entry.update(WinRate.from_outcomes(v.outcome for v in verdicts).to_dict(),
                     judge_retries=sum(v.retries for v in verdicts))
    return entry, pol, ref_set, verdicts


def _sample_rows(temperature: float, n_samples: int, prompts: list[str], chosen: list[str], pol: SampleSet,
                 ref_set: SampleSet, verdicts: list[Verdict] | None, beta: float,
                 baseline: str) -> list[dict[str, Any]]:
    """One ``samples.jsonl`` row per (prompt, sample): both responses side by side with their rewards."""
    rows = []
    for i, (p, r) in enumerate(zip(pol.samples, ref_set.samples)):
        row: dict[str, Any] = {
            "temperature": temperature, "prompt": prompts[i], "sample": i % n_samples,
            "policy": p.text, "reference": r.text,
            "policy_implicit_reward": beta * float(pol.logratios[i]),
            "reference_implicit_reward": beta * float(ref_set.logratios[i]),
            "policy_tokens": len(p.response_ids), "reference_tokens": len(r.response_ids),
            "policy_finished": p.finished, "reference_finished": r.finished,
        }
        if pol.rewards is not None and ref_set.rewards is not None:
            row.update(policy_reward=pol.rewards[i], reference_reward=ref_set.rewards[i])
        if baseline == "chosen":
            row["chosen"] = chosen[i]
        if verdicts is not None:
            row.update(judge=verdicts[i].outcome, judge_swapped=verdicts[i].swapped)
        rows.append(row)
    return rows


def _frontier(scorer: Scorer, run_dir: Path, prompts: Prompts, max_new_tokens: int, top_p: float, seed: int,
              batch_size: int, reward_fn: RewardFn | None, reward_label: str | None, ref_set: SampleSet,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """(kl, reward) of pi_ref (kl = 0 by definition) and of every complete checkpoint, all on the same prompts,
    seed and temperature 1: the reward at ``top_p``, the KL on draws from pi itself (``kl_logratios``)."""
    points = [_point("reference", 0, torch.zeros(len(ref_set.samples)), ref_set.rewards)]
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        return points
    cfg = scorer.config
    assert cfg is not None and scorer.policy_source is not None
    # One model holding the starting weights; each checkpoint overwrites the same trained tensors.
    kwargs = dict(dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                  attn_implementation=runnable_attention(cfg.model.attn_implementation))
    if scorer.processor is not None:
        model = load_vision_model(scorer.policy_source, **kwargs)
    else:
        model = load_model(scorer.policy_source, **kwargs, vocab_size=len(scorer.tokenizer))
    if cfg.model.lora is not None:  # a LoRA run's checkpoints hold its adapters' tensors, under peft's names
        model = apply_lora(model, cfg.model.lora)
    model = freeze(model.to(scorer.device))
    params = SamplingParams(max_new_tokens, KL_TEMPERATURE, top_p, seed, batch_size)
    for step, path in checkpoints:
        log(f"frontier point for checkpoint step-{step}")
        load_weights_into(model, path, policy_weights(path))
        sampled = sample_and_score(scorer, model, prompts.ids, prompts.texts, params, reward_fn, reward_label or "",
                                   policy=model, pixels=prompts.pixels)
        logratios = kl_logratios(scorer, model, prompts.ids, params, sampled, log, prompts.pixels)
        points.append(_point(f"step-{step}", step, logratios, sampled.rewards))
    return points


def _point(name: str, step: int, logratios: torch.Tensor, rewards: list[float] | None) -> dict[str, Any]:
    kl = kl_estimate(logratios.tolist())
    point: dict[str, Any] = {"checkpoint": name, "step": step, "kl": kl.mean, "kl_stderr": kl.stderr}
    if rewards is not None:
        estimate = mean_stderr(rewards)
        point.update(reward=estimate.mean, reward_stderr=estimate.stderr)
    return point


def _clean(value: Any) -> Any:
    """NaN and infinities become null (JSON has neither)."""
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def parse_temperatures(text: str) -> list[float]:
    """``"0.25,0.5,1.0"`` -> [0.25, 0.5, 1.0]; a bad list is a one-line error naming the flag."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DpokitError(f"--temperatures: expected numbers separated by commas, got '{text}'") from None
    if not values or any(not (v >= 0 and math.isfinite(v)) for v in values):
        raise DpokitError(f"--temperatures: expected finite numbers >= 0, got '{text}'")
    return values


def print_summary(result: dict[str, Any]) -> None:
    """The headline numbers of an ``eval.json`` as a small table on stdout."""
    from rich.table import Table

    from dpokit.terminal import console

    def num(key: str, digits: int = 4) -> str:
        value = result.get(key)
        return "—" if value is None else f"{value:.{digits}f}"

    table = Table(title=f"eval: {result['run_dir']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("rewards/accuracies", num("rewards/accuracies")), ("rewards/margins", num("rewards/margins")),
            ("kl", f"{num('kl')} ± {num('kl_stderr')}")]
    if result.get("reward") is not None:
        rows.append((f"reward ({result['reward_fn']})", f"{num('reward')} (reference {num('reward_reference')})"))
    if result.get("win_rate") is not None:
        lo, hi = result.get("win_rate_ci") or (None, None)
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
        rows.append((f"win_rate vs {result['baseline']}", f"{num('win_rate', 3)}{ci}"))
    counts = [sum(entry.get(key, 0) for entry in result.get("temperatures") or [])
              for key in ("malformed", "failed", "judge_retries")]
    if any(counts):  # what the win rate leaves out, and what it took, shown rather than dropped
        rows.append(("judge: malformed / failed / retries", " / ".join(map(str, counts))))
    for name, value in rows:
        table.add_row(name, value)
    console().print(table)
