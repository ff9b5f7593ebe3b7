"""What every command that trains on its own samples shares (``dpokit ppo``; online DPO next): prompts, sampling
from the policy, scoring the samples with a reward, and the seeds that make all of it resumable.

- prompts come from a prompt file, or the prompts of a preference file (``PromptItem``: the prompt as the policy
  reads it, as a reward reads it, and its token ids, exactly as training tokenizes);
- responses are sampled with the batched KV-cache sampler (``dpokit.models.generate``) under no_grad in eval mode;
- a reward is a function, a reward model's folder, or an LLM judge comparing each response with the prompt's
  chosen response (``dpokit.rewards.judge.JudgeReward``);
- every random draw of step N on rank R is seeded from (train.seed, N, R) alone (``step_seed``), so a resumed
  run draws what the uninterrupted one did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpokit.data.batch import pad_sequences, padded_layout, to_device
from dpokit.errors import ConfigError
from dpokit.evaluate.run import EvalPrompt, load_prompts
from dpokit.models.generate import Sample, SamplingParams, generate
from dpokit.rewards import RewardFn, get_reward, reward_name, score_texts
from dpokit.rewards.judge import JudgeReward, make_judge
from dpokit.training.distributed import Dist


@dataclass
class PromptItem:
    prompt: EvalPrompt
    """The prompt as the policy reads it (text or messages), as a reward reads it, and its chosen response."""
    ids: list[int]
    """Its token ids, as training tokenizes a prompt (BOS rules, chat template, truncation)."""


def prompt_items(source: str, split: str, tokenizer: Any, data_cfg: Any,
                 max_prompts: int | None = None) -> list[PromptItem]:
    """The distinct prompts of a prompt or preference file, tokenized with ``data.max_prompt_length``."""
    from dpokit.models.generate import encode_prompts

    prompts = load_prompts(source, split, max_prompts, data_cfg.columns)
    ids = encode_prompts(tokenizer, [p.prompt for p in prompts], data_cfg.max_prompt_length, data_cfg.max_length)
    return [PromptItem(p, i) for p, i in zip(prompts, ids)]


def step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """The seed of one random stream of step ``step`` on ``rank`` (``stream`` numbers the step's uses: sampling,
    minibatch orders, ...): a function of these numbers alone, so a resumed run draws exactly what the first
    one did."""
    return (seed * 1_000_003 + step) * 1_009 + rank * 101 + stream


# ----------------------------------------------------------------------------------------------- the reward

def load_reward(spec: str | None, judge_url: str | None, judge_model: str | None, judge_key_env: str | None,
                seed: int, key: str) -> RewardFn | None:
    """The reward function ``spec`` names, or None when an LLM judge is configured instead (it needs the
    prompts' chosen responses: ``judge_reward``). Exactly one of them; ``key`` is the config section."""
    if not spec and not judge_url:
        raise ConfigError(f"{key}.reward: required (sentiment, length, module:function, or the RUN_DIR of a "
                          f"dpokit rm reward model), or {key}.judge_url for an LLM judge")
    if spec and judge_url:
        raise ConfigError(f"{key}.judge_url: give either {key}.reward or an LLM judge, not both")
    if spec:
        return get_reward(spec)
    make_judge(judge_url, judge_model, judge_key_env, seed=seed)  # its settings fail now, before the models
    return None


def judge_reward(judge_url: str, judge_model: str | None, judge_key_env: str | None, seed: int,
                 items: Sequence[PromptItem], source: str, key: str) -> JudgeReward:
    """The LLM judge as a reward: each response against its prompt's chosen response in ``source``."""
    missing = [it for it in items if it.prompt.chosen is None]
    if missing:
        raise ConfigError(f"{key}.judge_url: the judge compares each response with its prompt's chosen response, "
                          f"and {source} has none for prompt {missing[0].prompt.text[:40]!r} (give a preference "
                          "file)")
    judge = make_judge(judge_url, judge_model, judge_key_env, seed=seed)
    assert judge is not None
    return JudgeReward(judge, {it.prompt.text: it.prompt.chosen for it in items})  # type: ignore[misc]


def reward_label(spec: str | None, reward: RewardFn) -> str:
    return reward_name(spec) if spec else getattr(reward, "name", "reward")


def score(reward: RewardFn, label: str, items: Sequence[PromptItem], texts: Sequence[str], seed: int) -> list[float]:
    """The reward of each response to its prompt; a reward model reads chat prompts as messages, anything else
    as text. A judge draws its answer orders from ``seed`` and counts this call's malformed verdicts, failed
    comparisons and retried requests (``judge_counts``)."""
    prompts = [it.prompt.prompt if getattr(reward, "accepts_messages", False) else it.prompt.text for it in items]
    if isinstance(reward, JudgeReward):
        reward.reseed(seed)
        reward.reset_counts()
    return score_texts(reward, prompts, list(texts), label)


def judge_counts(reward: RewardFn | None, dist: Dist) -> dict[str, int]:
    """``judge/malformed``, ``judge/failures`` and ``judge/retries`` of the last ``score``, summed over every
    rank; nothing for a reward that is no judge."""
    if not isinstance(reward, JudgeReward):
        return {}
    counts = reward.counts()
    return {name: int(total) for name, total in zip(counts, dist.sum([float(v) for v in counts.values()]))}


# ---------------------------------------------------------------------------------------------- sampling

def held_out(items: Sequence[PromptItem], dist: Dist, seed: int, temperature: float, top_p: float,
             sample_fn: Callable[[list[PromptItem], int, float, float], list[Sample]],
             reward: Callable[[list[PromptItem], list[str], int], list[float]],
             kl_sum: Callable[[list[Sample]], float]) -> dict[str, float]:
    """Held-out evaluation of a policy that trains on its own samples (PPO, online DPO): this rank's share of
    ``items``, one response each (``sample_fn(items, seed, temperature, top_p)``, always the same ``seed``) at
    the run's sampling settings, its reward, and the Monte Carlo estimate of
    KL(pi || pi_ref) = E_y~pi[log pi(y|x) - log pi_ref(y|x)] (``kl_sum``: the sum over the samples, scored
    untempered), all summed over every rank. Returns ``reward``, ``reward_std``, ``kl``, ``response_length``.

    The KL estimate needs draws from pi itself: tempered or nucleus samples are draws from another
    distribution, and averaging log pi - log pi_ref over them estimates no divergence at all (at top_p < 1 it
    can even be negative). So unless the reward's samples are already at temperature 1 and top_p 1 (then they
    are reused, at no cost), the KL draws its own samples from pi with the same seed."""
    share = list(items[dist.rank::dist.world])
    if not share:
        raise ConfigError(f"data.eval: {len(items)} held-out prompts for {dist.world} processes; give at least "
                          "one per process")
    samples = sample_fn(share, seed, temperature, top_p)
    from_pi = samples if (temperature, top_p) == (1.0, 1.0) else sample_fn(share, seed, 1.0, 1.0)
    scores = reward(share, [s.text for s in samples], seed)
    n, total, total_sq, kl, tokens = dist.sum([float(len(share)), float(sum(scores)),
                                              float(sum(x * x for x in scores)), kl_sum(from_pi),
                                              float(sum(len(s.response_ids) for s in samples))])
    mean = total / n
    return {"reward": mean, "reward_std": math.sqrt(max(total_sq / n - mean * mean, 0.0)), "kl": kl / n,
            "response_length": tokens / n}


def sample(model: nn.Module, tokenizer: Any, items: Sequence[PromptItem], params: SamplingParams,
           eos_ids: list[int], autocast: Callable[[], Any]) -> list[Sample]:
    """One response per item from ``model`` (pi) under no_grad in eval mode (``dpokit.models.generate.generate``),
    in the run's precision; repeat an item for several samples of its prompt."""
    with autocast():
        return generate(model, tokenizer, [it.ids for it in items], params, eos_ids)


def rows_batch(rows: list[tuple[list[int], list[int]]], pad_id: int,
               device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    """A padded batch of prompt + response rows and the (B, T) mask of their response tokens: the batch's
    targets (``pred_index`` order) are exactly the mask's True entries in row-major order."""
    padded = pad_sequences([p + r for p, r in rows], [len(p) for p, _ in rows], pad_id, side="right")
    batch = padded_layout(padded["input_ids"], padded["attention_mask"], padded["response_mask"])
    lengths = torch.tensor([len(r) for _, r in rows])
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (B, T)
    return to_device(batch, device), mask.to(device)


def to_grid(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-target values (M,) into their (B, T) places; 0 on padding. Differentiable."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)
