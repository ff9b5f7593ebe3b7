"""Online and semi-online DPO: ``dpokit train`` with ``online.reward`` (or ``online.judge_url``) set.

Offline DPO trains on pairs sampled once, from pi_ref, by someone else. Here each step makes its own pairs:

    setup (config -> policy, pi_ref, prompts of data.train, the reward) -> restore (when resuming)
    -> for each step n:
         sample:  at a generator refresh (every step when sync_every = 1, fully online; steps 1, 1 + s, 1 + 2s,
                  ... when s = sync_every > 1, semi-online, arXiv 2506.21495), k = samples_per_prompt responses
                  to each of this rank's prompts of step n and of every step up to the next refresh, from the
                  current policy in one batched generation call (the batched KV-cache sampler, no_grad, eval
                  mode; seeded by step_seed(train.seed, n, rank, 0)); the other steps take theirs from that draw
         score:   the reward (a function, a reward model, an LLM judge) of every response
         pair:    best against worst per prompt, or every pair whose scores differ (online.pairs); a pair whose
                  scores differ by online.min_margin or less is a tie: dropped and counted
         train:   the pairs through the configured pairwise loss against pi_ref (the DPO pass,
                  dpokit.methods.dpo.preference_forward), the loss summed and divided by the pairs kept over every
                  rank, then dpokit.training.step.apply_update; a step where every pair tied updates nothing and
                  says so
    -> final checkpoint -> RUN_DIR/final

A step draws train.batch_size x train.grad_accum x processes prompts: with ``best_worst`` and no ties that is
exactly the global batch (in pairs) of an offline run with the same settings. Pairs are cut into micro-batches
of train.batch_size per rank (so ``all``, with up to k(k-1)/2 pairs a prompt, runs more of them); since the loss
is normalized by the step's pairs, micro-batching and ranks do not change the gradient.

**Semi-online DPO samples s steps at once.** Its point is that generation need not wait for every update: the
responses of s steps come from one set of weights, so they are drawn together, in batches s times as full
(a decode step of 64 rows costs far less than two of 32 on a CPU or a GPU), and no copy of the weights is kept
between refreshes, only the window's samples.

**Nothing of the window is saved.** With s > 1, ``train.save_every`` must be a multiple of s: every checkpoint
(but the last of a run) is taken at the end of a step n = m x s, and step n + 1 refreshes the generator from
the policy, which the checkpoint holds, and draws the next window. So resuming needs no generator state, and
the sampling needs no RNG state (each window is seeded from (train.seed, its first step, rank)): a resumed run
samples, pairs and updates exactly as the uninterrupted one. A checkpoint off that grid (the end of a run,
resumed to train longer) is refused unless forced; forced, the generator is refreshed at the first resumed step
and its window runs to the next step of the grid.

Responses go into pairs exactly as sampled: a finished one ends with the end token the model emitted (the
sampler stops at any of ``dpokit.models.generate.eos_token_ids``: the EOS or the chat template's end-of-turn token,
which is what training appends to a pair file's responses); a response cut by ``online.max_new_tokens`` has no
end token, like a pair-file response truncated to ``data.max_length``. A response that would exceed
``data.max_length`` with its prompt is cut to fit, as a pair file's is. Either way the loss scores exactly the
tokens the generator drew.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpokit.config import Config, ConfigError
from dpokit.data.batch import PairStream, collate_tokenized, regroup, to_device
from dpokit.data.tokenize import TokenizedGroup
from dpokit.losses import configured_specs
from dpokit.methods.dpo import DPO_TASK
from dpokit.methods.rollout import (
    PromptItem,
    held_out,
    judge_counts,
    judge_reward,
    load_reward,
    prompt_items,
    reward_label,
    score,
    step_seed,
)
from dpokit.methods.rollout import sample as rollout_sample
from dpokit.models.generate import Sample, SamplingParams, eos_token_ids
from dpokit.models.logprobs import batch_logps
from dpokit.rewards import RewardFn
from dpokit.training.distributed import Dist
from dpokit.training.kinds import Kind, register_kind
from dpokit.training.loop import loop
from dpokit.training.setup import export_final, restore, setup
from dpokit.training.step import KindSpec, Run, apply_update, backward_passes, forward_passes

ONLINE_SPEC = KindSpec("online", needs_reference=True, sampled_per_process=True)
"""Online DPO's run: the DPO pass (``DPO_TASK``) on pairs made during the step; its own name, so a checkpoint
of an offline run is not resumed as an online one (or the reverse)."""


# --------------------------------------------------------------------------------------------- the generator

class Generator:
    """The samples of the steps the current generator serves, drawn at its refresh.

    A refresh happens at the start of steps 1, 1 + s, 1 + 2s, ... (s = ``sync_every``; every step when s = 1)
    and at the first step of a process (a forced off-grid resume included): the policy as it is then samples
    the responses of that step and of every following step before the next refresh (and within the run), in
    one batched call (``draw_window``). Steps in between take their samples from ``drawn``."""

    def __init__(self, sync_every: int):
        self.sync_every = sync_every
        self.synced_at = 0
        self.drawn: dict[int, list[Sample]] = {}

    def due(self, step: int) -> bool:
        return step not in self.drawn

    def window(self, step: int, last_step: int) -> list[int]:
        """The steps a refresh at ``step`` serves: ``step`` up to the next step of the refresh grid, exclusive,
        and at most ``last_step``."""
        steps = [step]
        while steps[-1] < last_step and steps[-1] % self.sync_every:  # step m + 1 is a refresh when s divides m
            steps.append(steps[-1] + 1)
        return steps


@dataclass
class Online:
    """What an online run holds beside the ``Run``: the generator, the reward and the held-out prompts."""

    run: Run
    generator: Generator
    reward: RewardFn
    reward_label: str
    eos_ids: list[int]


# ------------------------------------------------------------------------------------------------- the pairs

def make_pairs(scores: Sequence[float], k: int, mode: str, min_margin: float) -> tuple[list[tuple[int, int]], int]:
    """(chosen, rejected) index pairs among consecutive groups of ``k`` scored samples (one group per prompt),
    and the number of ties dropped. ``best_worst``: each group's first highest-scored sample against its first
    lowest-scored one, a tie when they differ by ``min_margin`` or less (all k equal, say); ``all``: every two
    samples of a group, the higher-scored one chosen, a tie when they differ by ``min_margin`` or less."""
    pairs: list[tuple[int, int]] = []
    ties = 0
    for start in range(0, len(scores), k):
        group = range(start, min(start + k, len(scores)))
        if mode == "best_worst":
            best = max(group, key=lambda i: scores[i])  # the first of equal maxima: deterministic
            worst = min(group, key=lambda i: scores[i])
            candidates = [(best, worst)]
        else:
            candidates = [(i, j) if scores[i] >= scores[j] else (j, i) for i in group for j in group if i < j]
        for chosen, rejected in candidates:
            if scores[chosen] - scores[rejected] > min_margin:
                pairs.append((chosen, rejected))
            else:
                ties += 1
    return pairs, ties


def to_group(sample_a: Sample, sample_b: Sample, max_length: int, location: str) -> TokenizedGroup:
    """A pair of samples of one prompt (chosen first) as a ``TokenizedGroup``, its responses as sampled, cut to
    ``max_length`` with the prompt as a pair file's are (see the module docstring)."""
    budget = max_length - len(sample_a.prompt_ids)
    responses = [sample_a.response_ids[:budget], sample_b.response_ids[:budget]]
    truncated = any(len(r) > budget for r in (sample_a.response_ids, sample_b.response_ids))
    return TokenizedGroup(list(sample_a.prompt_ids), responses, location, truncated=truncated)


# -------------------------------------------------------------------------------------------------- the step

def sample(online: Online, items: Sequence[PromptItem], seed: int, temperature: float,
           top_p: float) -> list[Sample]:
    """One response per item from the policy's current weights, at most 64 rows decoded together."""
    run, cfg = online.run, online.run.cfg.online
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, batch_size=max(1, min(len(items), 64)))
    return rollout_sample(run.policy, run.tokenizer, items, params, online.eos_ids, run.autocast)


def step_items(run: Run, indices: Sequence[int]) -> list[PromptItem]:
    """This rank's share of a step's prompts, ``online.samples_per_prompt`` copies of each, adjacent."""
    prompts = [run.train_items[i] for i in indices[run.dist.rank::run.dist.world]]
    return [it for it in prompts for _ in range(run.cfg.online.samples_per_prompt)]


def draw_window(online: Online, step: int) -> None:
    """The generator's refresh at ``step``: the current policy samples the responses of every step of its
    window (``Generator.window``) in one call, seeded by (train.seed, ``step``, rank), on the prompts those
    steps will take from the stream (read ahead from a copy of its position; the steps take them again)."""
    run, o, generator = online.run, online.run.cfg.online, online.generator
    steps = generator.window(step, run.total_steps)
    ahead = PairStream(run.stream.n, run.stream.seed, run.stream.shuffle, **run.stream.position)
    per_step = [step_items(run, ahead.take(run.pairs_per_step)) for _ in steps]
    samples = sample(online, [it for items in per_step for it in items],
                     step_seed(run.cfg.train.seed, step, run.dist.rank, 0), o.temperature, o.top_p)
    generator.drawn, start = {}, 0
    for n, items in zip(steps, per_step):
        generator.drawn[n], start = samples[start:start + len(items)], start + len(items)
    generator.synced_at = step


def pair_passes(run: Run, groups: list[TokenizedGroup],
                placeholder: TokenizedGroup) -> Iterator[tuple[list[TokenizedGroup], int, bool]]:
    """This rank's passes over its pairs: micro-batches of ``train.batch_size`` (cut further by
    ``train.pass_tokens``), as many on every rank as on the rank with the most; a rank short of pairs runs
    ``placeholder`` with weight 0, since DDP communicates inside forward and backward."""
    size, dist = run.cfg.train.batch_size, run.dist
    micros = [list(range(a, min(a + size, len(groups)))) for a in range(0, len(groups), size)]
    longest = max(dist.gather(len(micros))) if dist.active else len(micros)
    micros += [[] for _ in range(longest - len(micros))]
    passes = forward_passes(micros, groups, run.cfg, dist)
    for number, micro in enumerate(passes):
        yield ([groups[i] for i in micro] or [placeholder]), (dist.grad_scale if micro else 0), \
            number == len(passes) - 1


def online_step(online: Online, step: int) -> dict[str, Any]:
    """Step ``step``: sample from the generator, score, pair, and one update on the pairs. Returns its metrics
    row (sums over every rank, then means)."""
    run, cfg, dist = online.run, online.run.cfg, online.run.dist
    o = cfg.online
    started = time.perf_counter()
    if online.generator.due(step):
        draw_window(online, step)  # before this step's take: the window reads its prompts from here on
    indices = run.stream.take(run.pairs_per_step)  # the step's prompts, the same on every rank
    run.consumed += len(indices)
    items = step_items(run, indices)
    samples = online.generator.drawn.pop(step)
    assert [s.prompt_ids for s in samples] == [it.ids for it in items]  # the window read the stream right
    seed = step_seed(cfg.train.seed, step, dist.rank, 0)
    sampled = time.perf_counter()
    scores = score(online.reward, online.reward_label, items, [s.text for s in samples], seed)
    scored = time.perf_counter()
    pairs, ties = make_pairs(scores, o.samples_per_prompt, o.pairs, o.min_margin)
    groups = [to_group(samples[c], samples[r], cfg.data.max_length, f"step {step} rank {dist.rank} sample {c}")
              for c, r in pairs]
    n_pairs = int(dist.sum([float(len(groups))])[0])
    row: dict[str, Any] = {"step": step, "split": "train"}
    if n_pairs:
        placeholder = groups[0] if groups else to_group(samples[0], samples[1], cfg.data.max_length, "placeholder")
        stats, computed, real = backward_passes(run, DPO_TASK, pair_passes(run, groups, placeholder), n_pairs)
        means = stats.means()
        grad_norm, lr = apply_update(run, step, means["loss"])
        row.update(tokens=stats.tokens, **means, grad_norm=grad_norm, lr=lr,
                   padding_fraction=1.0 - real / max(computed, 1))
    else:  # nothing to learn from; the schedule waits with the optimizer (like a skipped step)
        run.note(f"step {step}: every sampled pair tied ({int(dist.sum([float(ties)])[0])} ties); no update")
        row.update(tokens=0, lr=run.optimizer.param_groups[0]["lr"])
    run.step = step
    run.task_state = {"generator_step": online.generator.synced_at}
    finished = sum(s.finished for s in samples)
    lengths = sum(len(s.response_ids) for s in samples)
    (n, score_sum, score_sq, tie_sum, finished, lengths, sample_s, score_s) = dist.sum([
        float(len(samples)), float(sum(scores)), float(sum(x * x for x in scores)), float(ties), float(finished),
        float(lengths), sampled - started, scored - sampled])
    seconds = time.perf_counter() - started
    mean = score_sum / n
    row.update({
        "elapsed_s": time.perf_counter() - run.started, "tokens_per_second": row["tokens"] / seconds,
        "skipped_steps": run.skipped,
        "online/reward_mean": mean, "online/reward_std": math.sqrt(max(score_sq / n - mean * mean, 0.0)),
        "online/pairs": n_pairs, "online/ties": int(tie_sum),
        "online/sample_s": sample_s / dist.world, "online/score_s": score_s / dist.world,
        "online/generator_step": online.generator.synced_at,
        "online/response_length": lengths / n, "online/eos_fraction": finished / n,
        **judge_counts(online.reward, dist),
    })
    return row


@torch.no_grad()
def evaluate(online: Online) -> dict[str, float]:
    """Held-out prompts (``dpokit.methods.rollout.held_out``): one response each from the policy at the online
    sampling settings and its reward; the sequence KL to pi_ref through the run's reference, on draws from the
    policy itself (temperature 1, top_p 1)."""
    run = online.run

    def kl_sum(samples: list[Sample]) -> float:
        groups = [TokenizedGroup(s.prompt_ids, [s.response_ids], "eval") for s in samples]
        kl = 0.0
        was_training = run.policy.training
        run.policy.eval()
        try:
            for start in range(0, len(groups), run.cfg.eval.batch_size):
                chunk = groups[start:start + run.cfg.eval.batch_size]
                batch = to_device(collate_tokenized(chunk, run.tokenizer.pad_token_id, layout=run.cfg.train.layout,
                                                    pack_length=run.cfg.train.pack_length), run.device)
                assert run.reference is not None
                ref = run.reference.logps(batch, chunk, run.autocast)[:, 0]
                with run.autocast():
                    logps, _ = batch_logps(run.policy, batch)
                kl += float((regroup(logps, batch)[:, 0].float() - ref.float()).sum())
        finally:
            run.policy.train(was_training)
        return kl

    o = run.cfg.online
    return held_out(run.eval_items, run.dist, step_seed(run.cfg.train.seed, 0, run.dist.rank, 10_000),
                    o.temperature, o.top_p, lambda items, seed, t, p: sample(online, items, seed, t, p),
                    lambda items, texts, seed: score(online.reward, online.reward_label, items, texts, seed), kl_sum)


# ------------------------------------------------------------------------------------------------------ setup

def check_config(cfg: Config, dist: Dist) -> None:
    """Settings online DPO cannot run with, each as one line naming the key."""
    if cfg.reference.mode == "store":
        raise ConfigError("reference.mode: 'store' holds log-probs of fixed responses; online DPO samples new "
                          "ones at every step: use 'model' (or 'adapter' with LoRA)")
    if dist.sharded:
        raise ConfigError("distributed.strategy: online DPO runs with 'ddp' (sampling from an FSDP-sharded "
                          "policy is not supported yet)")
    if any(spec.kind == "listwise" for spec in configured_specs(cfg.loss)):
        raise ConfigError(f"loss.name: online DPO trains pairs; {cfg.loss.name!r} is a listwise loss")
    s, every = cfg.online.sync_every, cfg.train.save_every
    if s > 1 and every and every % s:
        raise ConfigError(f"train.save_every: {every} is not a multiple of online.sync_every = {s} (a checkpoint "
                          "must end just before a generator refresh: the generator's weights are not saved)")


def load_online(cfg: Config, dist: Dist, resume: bool = False) -> Online:
    """The ``Run`` (``dpokit.training.setup.setup`` with the prompts of ``data.train`` / ``data.eval`` as its items),
    the generator, the reward."""
    check_config(cfg, dist)
    o = cfg.online
    reward = load_reward(o.reward, o.judge_url, o.judge_model, o.judge_key_env, cfg.train.seed, "online")

    def prompts(tokenizer: Any) -> tuple[list[PromptItem], list[PromptItem]]:
        train = prompt_items(cfg.data.train, cfg.data.train_split, tokenizer, cfg.data)
        held_out = (prompt_items(cfg.data.eval, cfg.data.eval_split, tokenizer, cfg.data, o.eval_max_prompts)
                    if cfg.data.eval else [])
        return train, held_out

    run = setup(cfg, dist, ONLINE_SPEC, resume=resume, items=prompts)
    if reward is None:
        reward = judge_reward(o.judge_url, o.judge_model, o.judge_key_env, cfg.train.seed,
                              run.train_items + run.eval_items, cfg.data.train, "online")
    label = reward_label(o.reward, reward)
    run.note(f"online: {len(run.train_items)} training prompts, {len(run.eval_items)} held-out; reward {label}; "
             f"{o.samples_per_prompt} samples per prompt, generator refreshed every {o.sync_every} step(s)")
    return Online(run=run, generator=Generator(o.sync_every), reward=reward, reward_label=label,
                  eos_ids=eos_token_ids(run.policy, run.tokenizer))


def train_online(cfg: Config, dist: Dist, *, resume: bool, force: bool) -> Path:
    """Online DPO from a config (``ONLINE``'s run: ``dpokit.training.loop.train_kind`` dispatches here); returns
    the run directory."""
    online = load_online(cfg, dist, resume=resume)
    run = online.run
    if run.checkpoint is not None:
        restore(run, force)
        s = cfg.online.sync_every
        if s > 1 and run.step % s and run.step < run.total_steps:
            if not force:
                raise ConfigError(f"online.sync_every: the checkpoint at step {run.step} is not at a generator "
                                  f"refresh (every {s} steps) and does not hold the generator's weights; resume "
                                  f"with --force to refresh the generator at step {run.step + 1}")
            run.note(f"the generator is refreshed at step {run.step + 1}, off its every-{s}-steps grid")
    held_out = (lambda: evaluate(online)) if run.eval_items else None
    # A signal stops semi-online DPO at a generator refresh too: only there is a checkpoint exactly resumable.
    return loop(run, lambda _, n: online_step(online, n), held_out, export_final, stop_every=cfg.online.sync_every)


ONLINE = register_kind(Kind(
    name="online", command="dpo", title="online DPO", spec=ONLINE_SPEC, run=train_online,
    selected_by=lambda cfg: bool(cfg.online.reward or cfg.online.judge_url)))
"""``dpokit train`` with ``online.reward`` or ``online.judge_url`` set: DPO on the policy's own samples."""
