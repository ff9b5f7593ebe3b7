"""``dpokit ppo``: RLHF with PPO, the method the DPO paper compares against (Section 6.1, Figure 2).

    setup (config -> policy + value head -> pi_ref -> prompts -> reward) -> restore (when resuming)
    -> for each PPO step:
         rollout: prompts -> responses sampled from pi (the batched KV-cache sampler, no_grad, eval mode)
                  -> scores from the reward -> log pi, V and log pi_ref of every sampled token
                  -> per-token rewards -beta * KL_t (+ the score on the last token) -> GAE -> whitened advantages
         update:  ppo.epochs passes over the samples in shuffled minibatches: clipped policy loss +
                  ppo.vf_coef x clipped value loss -> backward -> dpokit.training.step.apply_update
         the adaptive KL controller moves beta toward ppo.kl_target; log, maybe evaluate, maybe checkpoint
    -> final checkpoint -> RUN_DIR/final (the policy alone, a plain Hugging Face folder)

**The value head shares the policy's trunk**: a linear head on the final hidden state, the features the
vocabulary head reads. One forward pass gives log pi and V, so a step costs one model's compute and memory
instead of two (a separate critic doubles both, which decides what fits on a CPU or one GPU); the price is that
the value loss also moves the policy's features, which ``ppo.vf_coef`` (0.1) keeps small next to the policy
loss, and which is why the value head starts at zero (V = 0: no value gradient is large at the start).

Exact resume: a checkpoint holds the weights (value head included), optimizer, scheduler, the prompt stream
position and the KL controller; the sampling generator and the minibatch order of step N are seeded from
(train.seed, N, rank), so a resumed run samples and updates exactly as an uninterrupted one.
Under torchrun (DDP) each rank samples its share of the step's prompts; whitening statistics, losses and
metrics are reduced over ranks, so N ranks train as one process with the same global batch does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpokit.config import Config, ConfigError
from dpokit.data.batch import PairStream
from dpokit.methods.ppo.core import KLController, gae, policy_loss, token_rewards, value_loss, whiten
from dpokit.methods.rollout import (
    PromptItem,
    held_out,
    judge_counts,
    judge_reward,
    load_reward,
    prompt_items,
    reward_label,
    rows_batch,
    score,
    step_seed,
    to_grid,
)
from dpokit.methods.rollout import sample as rollout_sample
from dpokit.models.generate import Sample, SamplingParams, eos_token_ids
from dpokit.models.loading import load_models
from dpokit.models.logprobs import target_logps
from dpokit.rewards import RewardFn
from dpokit.training.checkpoint import export_hf
from dpokit.training.distributed import Dist
from dpokit.training.kinds import Kind, register_kind
from dpokit.training.loop import loop, train_kind
from dpokit.training.resume import fingerprint, seed_everything
from dpokit.training.setup import (
    autocast_for,
    enable_checkpointing,
    fit_layout,
    lr_lambda,
    make_optimizer,
    notes_for,
    open_run_dir,
    resolve_hardware,
    restore,
)
from dpokit.training.step import KindSpec, Run, apply_update

PPO_SPEC = KindSpec("ppo", needs_reference=True, layouts=("padded",), sampled_per_process=True)
"""PPO's run: it reuses a ``Run`` (checkpoints, resume, the update) but steps with ``ppo_step`` (sample, then
update), not with the passes of a ``Task`` (so it has none)."""


# ------------------------------------------------------------------------------------------------- the model

class PolicyValue(nn.Module):
    """pi and its value head as one module call (DDP's hooks see one call): for every target token of a batch
    layout, log pi(y_t | x, y_<t) and V(x, y_<t), the value of the state the token is sampled from.

    The head reads the final hidden state at the position that predicts the token (``target_logps``), in fp32.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.model = policy
        hidden = policy.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: see the module docstring
        nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: dict[str, Any], entropy: bool = False,
                temperature: float = 1.0) -> dict[str, torch.Tensor]:
        out = target_logps(self.model, batch, hidden=True, entropy=entropy, temperature=temperature)
        hidden = out.pop("hidden")
        with torch.autocast(hidden.device.type, enabled=False):
            out["values"] = self.value_head(hidden.float()).squeeze(-1)  # (M,)
        return out


@dataclass
class Ppo:
    """What a PPO run holds beside the ``Run``: pi_ref, the prompts, the reward, the KL controller."""

    run: Run
    reference: nn.Module | None
    """The frozen pi_ref; None with ``reference.mode: adapter`` (the policy with its LoRA adapters off)."""
    eval_prompts: list[PromptItem]
    reward: RewardFn
    reward_label: str
    controller: KLController
    eos_ids: list[int]


# ----------------------------------------------------------------------------------------------- the rollout

@dataclass
class Rollout:
    """This rank's samples of one step. Per-token tensors are right-padded response tokens, (B, T)."""

    rows: list[tuple[list[int], list[int]]]
    """(prompt ids, response ids) of each sample."""
    mask: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    scores: torch.Tensor
    """(B,) the reward of each response."""
    finished: list[bool]


def sample(ppo: Ppo, items: list[PromptItem], seed: int, temperature: float) -> list[Sample]:
    """One response per prompt from pi (``dpokit.methods.rollout.sample``) at ``temperature`` (the rollouts':
    ``ppo.temperature``; the held-out KL's: 1)."""
    run, cfg = ppo.run, ppo.run.cfg.ppo
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature, seed=seed,
                            batch_size=max(1, min(len(items), 64)))
    return rollout_sample(run.policy.model, run.tokenizer, items, params, ppo.eos_ids, run.autocast)


@torch.no_grad()
def evaluate_rows(ppo: Ppo, rows: list[tuple[list[int], list[int]]], temperature: float,
                  with_values: bool = True) -> dict[str, torch.Tensor]:
    """log pi, V, entropy and log pi_ref of every response token of ``rows`` under softmax(logits / T) of each
    model at ``temperature`` T, in micro-batches of ``train.batch_size``; (B, T) each, plus ``mask``."""
    run = ppo.run
    pad = run.tokenizer.pad_token_id
    _, mask = rows_batch(rows, pad, torch.device("cpu"))
    width = mask.shape[1]
    parts: dict[str, list[torch.Tensor]] = {"logps": [], "values": [], "entropy": [], "ref_logps": []}
    size = run.cfg.train.batch_size
    policy_was_training = run.policy.training
    run.policy.eval()
    try:
        for start in range(0, len(rows), size):
            batch, m = rows_batch(rows[start:start + size], pad, run.device)
            with run.autocast():
                out = run.policy(batch, entropy=True, temperature=temperature) if with_values else target_logps(
                    run.policy.model, batch, entropy=True, temperature=temperature)
                ref = reference_logps(ppo, batch, temperature)
            grids = {"logps": out["logps"], "entropy": out["entropy"], "ref_logps": ref}
            if with_values:
                grids["values"] = out["values"]
            for key, flat in grids.items():
                grid = to_grid(flat.float(), m)
                parts[key].append(torch.nn.functional.pad(grid, (0, width - grid.shape[1])))
    finally:
        run.policy.train(policy_was_training)
    result = {key: torch.cat(value) for key, value in parts.items() if value}
    result["mask"] = mask.to(run.device)
    return result


def reference_logps(ppo: Ppo, batch: dict[str, Any], temperature: float) -> torch.Tensor:
    """log pi_ref of every target token at ``temperature``, (M,): the frozen copy, or the LoRA policy with its
    adapters off."""
    if ppo.reference is not None:
        return target_logps(ppo.reference, batch, temperature=temperature)["logps"]
    with ppo.run.policy.model.disable_adapter():
        return target_logps(ppo.run.policy.model, batch, temperature=temperature)["logps"]


def rollout(ppo: Ppo, items: list[PromptItem], seed: int) -> tuple[Rollout, dict[str, float]]:
    """Sample, score and evaluate this rank's prompts at ``ppo.temperature`` T; returns the rollout and its
    timings. The samples are scored under the distribution they were drawn from, softmax(logits / T), and the
    reference at the same T: the ratios pi / pi_old compare the sampling policy with itself, and the penalty is
    KL(pi_T || pi_ref_T), whose optimum is pi_T* proportional to pi_ref_T * exp(r / beta)."""
    temperature = ppo.run.cfg.ppo.temperature
    started = time.perf_counter()
    samples = sample(ppo, items, seed, temperature)
    sampled = time.perf_counter()
    scores = score(ppo.reward, ppo.reward_label, items, [s.text for s in samples], seed)
    scored = time.perf_counter()
    rows = [(s.prompt_ids, s.response_ids) for s in samples]
    out = evaluate_rows(ppo, rows, temperature)
    device = ppo.run.device
    result = Rollout(rows=rows, mask=out["mask"], logps=out["logps"], ref_logps=out["ref_logps"],
                     values=out["values"], entropy=out["entropy"],
                     scores=torch.tensor(scores, dtype=torch.float32, device=device),
                     finished=[s.finished for s in samples])
    timings = {"sample_s": sampled - started, "score_s": scored - sampled,
               "forward_s": time.perf_counter() - scored}
    return result, timings


# -------------------------------------------------------------------------------------------------- the step

def ppo_step(ppo: Ppo, step: int) -> dict[str, Any]:
    """PPO step ``step``: rollout, advantages, ``ppo.epochs`` passes of clipped updates. Returns its metrics
    row (means over every rank's samples)."""
    run, cfg, dist = ppo.run, ppo.run.cfg, ppo.run.dist
    started = time.perf_counter()
    indices = run.stream.take(cfg.ppo.rollout_prompts)
    run.consumed += len(indices)
    items = [run.train_items[i] for i in indices[dist.rank::dist.world]]
    ro, timings = rollout(ppo, items, step_seed(cfg.train.seed, step, dist.rank, 0))
    mask = ro.mask.float()
    beta = ppo.controller.value
    rewards, kl = token_rewards(ro.scores, ro.logps, ro.ref_logps, mask, beta, cfg.ppo.kl_estimator)
    if cfg.ppo.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False, sums=dist.sum) * mask
    advantages, returns = gae(rewards, ro.values, mask, cfg.ppo.gamma, cfg.ppo.lam)
    advantages = whiten(advantages, mask, sums=dist.sum) * mask
    train_started = time.perf_counter()
    update = ppo_update(ppo, step, ro, advantages, returns)
    train_s = time.perf_counter() - train_started

    # Step metrics: sums over every rank's samples, then means. ``kl`` is always the summed log-ratio (k1);
    # the penalty's own estimator (k3 when configured) is logged beside it as ``kl_penalty``.
    seq_kl = ((ro.logps - ro.ref_logps) * mask).sum(-1)
    seq_penalty = (kl * mask).sum(-1)
    residual = (returns - ro.values) * mask
    sums = dist.sum([
        float(len(ro.rows)), float(mask.sum()), float(ro.scores.sum()), float((ro.scores ** 2).sum()),
        float(seq_kl.sum()), float(seq_penalty.sum()), float((ro.entropy * mask).sum()), float(sum(ro.finished)),
        float((returns * mask).sum()), float((returns ** 2 * mask).sum()), float(residual.sum()),
        float((residual ** 2).sum()), float((ro.values * mask).sum()), float(sum(len(p) for p, _ in ro.rows)),
    ])
    (n, tokens, score_sum, score_sq, kl_sum, penalty_sum, entropy_sum, finished, ret_sum, ret_sq, res_sum, res_sq,
     value_sum, prompt_tokens) = sums
    ppo.controller.update(penalty_sum / n, int(n))
    run.task_state = {"kl_controller": ppo.controller.state_dict()}
    run.step = step
    return_var = ret_sq / tokens - (ret_sum / tokens) ** 2
    residual_var = res_sq / tokens - (res_sum / tokens) ** 2
    seconds = time.perf_counter() - started
    timings = dist.sum([timings["sample_s"], timings["score_s"], timings["forward_s"]])
    return {
        "step": step, "split": "train", "elapsed_s": time.perf_counter() - run.started, "tokens": int(tokens),
        "prompt_tokens": int(prompt_tokens),
        "reward": score_sum / n, "reward_std": math.sqrt(max(score_sq / n - (score_sum / n) ** 2, 0.0)),
        "kl": kl_sum / n, "kl_penalty": penalty_sum / n, "kl_coef": beta, "non_score_reward": -beta * penalty_sum / n,
        "entropy": entropy_sum / tokens, "response_length": tokens / n, "eos_fraction": finished / n,
        **update,
        "value/mean": value_sum / tokens,
        "value/explained_variance": 1.0 - residual_var / return_var if return_var > 0 else float("nan"),
        "tokens_per_second": tokens / seconds, "sample_s": timings[0] / dist.world,
        "score_s": timings[1] / dist.world, "train_s": train_s + timings[2] / dist.world,
        "skipped_steps": run.skipped,
        **judge_counts(ppo.reward, dist),
    }


def ppo_update(ppo: Ppo, step: int, ro: Rollout, advantages: torch.Tensor,
               returns: torch.Tensor) -> dict[str, float]:
    """``ppo.epochs`` passes over the rollout in shuffled minibatches of ``train.batch_size`` x
    ``train.grad_accum`` samples per rank, one optimizer step each. A minibatch's loss is the sum over its
    response tokens (every rank's) divided by their number, so the gradient does not depend on how the
    samples are split into micro-batches or ranks."""
    run, cfg, dist = ppo.run, ppo.run.cfg, ppo.run.dist
    pad = run.tokenizer.pad_token_id
    size, micro = cfg.train.batch_size * cfg.train.grad_accum, cfg.train.batch_size
    totals = torch.zeros(6, dtype=torch.float64)  # tokens, policy loss, value loss, clipfrac, vclipfrac, approx kl
    grad_norms: list[float] = []
    lr = run.optimizer.param_groups[0]["lr"]
    for epoch in range(cfg.ppo.epochs):
        generator = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, dist.rank, 1 + epoch))
        order = torch.randperm(len(ro.rows), generator=generator).tolist()
        for start in range(0, len(order), size):
            minibatch = order[start:start + size]
            normalizer = dist.sum([float(ro.mask[minibatch].sum())])[0]
            minibatch_loss = 0.0
            for first in range(0, len(minibatch), micro):
                chosen = minibatch[first:first + micro]
                last = first + micro >= len(minibatch)
                batch, m = rows_batch([ro.rows[i] for i in chosen], pad, run.device)
                width = m.shape[1]
                pick = torch.tensor(chosen, device=run.device)
                old_logps, old_values = ro.logps[pick, :width], ro.values[pick, :width]
                advantage, target = advantages[pick, :width], returns[pick, :width]
                with run.dist.grad_sync(run.model, sync=last):
                    with run.autocast():
                        out = run.model(batch, temperature=cfg.ppo.temperature)
                    logps, values = to_grid(out["logps"].float(), m), to_grid(out["values"].float(), m)
                    pg, clipped, approx_kl = policy_loss(logps, old_logps, advantage, cfg.ppo.clip)
                    vl, vclipped = value_loss(values, old_values, target, cfg.ppo.value_clip)
                    mf = m.float()
                    loss_sum = ((pg + cfg.ppo.vf_coef * vl) * mf).sum()
                    (loss_sum * dist.grad_scale / normalizer).backward()
                with torch.no_grad():
                    totals += torch.tensor([float(mf.sum()), float((pg * mf).sum()), float((vl * mf).sum()),
                                            float((clipped * mf).sum()), float((vclipped * mf).sum()),
                                            float((approx_kl * mf).sum())], dtype=torch.float64)
                minibatch_loss += float(loss_sum.detach())
            grad_norm, lr = apply_update(run, step, dist.sum([minibatch_loss])[0] / normalizer)
            grad_norms.append(grad_norm)
    t = dist.sum(totals.tolist())
    tokens = max(t[0], 1.0)
    return {"loss": (t[1] + cfg.ppo.vf_coef * t[2]) / tokens, "policy/loss": t[1] / tokens,
            "value/loss": t[2] / tokens, "policy/clipfrac": t[3] / tokens, "value/clipfrac": t[4] / tokens,
            "policy/approx_kl": t[5] / tokens, "grad_norm": sum(grad_norms) / len(grad_norms), "lr": lr}


@torch.no_grad()
def evaluate(ppo: Ppo) -> dict[str, float]:
    """Held-out prompts (``dpokit.methods.rollout.held_out``): one response each at the rollouts' temperature and its
    reward; the sequence KL(pi || pi_ref) of the policy as exported (temperature 1) from its own draws, scored
    untempered (``evaluate_rows`` at T = 1), so PPO's held-out ``kl`` is the quantity ``dpokit eval`` and DPO
    report."""
    run = ppo.run

    def kl_sum(samples: list[Sample]) -> float:
        out = evaluate_rows(ppo, [(s.prompt_ids, s.response_ids) for s in samples], 1.0, with_values=False)
        return float(((out["logps"] - out["ref_logps"]) * out["mask"]).sum())

    return held_out(ppo.eval_prompts, run.dist, step_seed(run.cfg.train.seed, 0, run.dist.rank, 10_000),
                    run.cfg.ppo.temperature, 1.0, lambda items, seed, t, _: sample(ppo, items, seed, t),
                    lambda items, texts, seed: score(ppo.reward, ppo.reward_label, items, texts, seed), kl_sum)


# ------------------------------------------------------------------------------------------------------ setup

def check_config(cfg: Config, dist: Dist) -> None:
    """Settings PPO cannot run with, each as one line naming the key."""
    if not cfg.data.train:
        raise ConfigError("data.train: required (a prompt file, or a preference file whose prompts are used)")
    if cfg.reference.mode == "store":
        raise ConfigError("reference.mode: 'store' holds log-probs of fixed responses; PPO samples new ones "
                          "at every step: use 'model' (or 'adapter' with LoRA)")
    if cfg.reference.sync is not None:
        raise ConfigError("reference.sync: TR-DPO updates a DPO reference; PPO's KL penalty is to a fixed pi_ref "
                          "(remove reference.sync)")
    if dist.sharded:
        raise ConfigError("distributed.strategy: ppo runs with 'ddp' (sampling from an FSDP-sharded policy "
                          "is not supported yet)")
    if cfg.ppo.top_p < 1:
        raise ConfigError(f"ppo.top_p: {cfg.ppo.top_p} < 1 is not supported; PPO samples its rollouts from the "
                          "full softmax at ppo.temperature (see docs/rlhf.md), set ppo.top_p: 1")
    if not cfg.model.disable_dropout:
        raise ConfigError("model.disable_dropout: ppo needs dropout off (the probability ratios compare the "
                          "policy with itself at sampling time)")
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * dist.world
    if cfg.ppo.rollout_prompts % global_batch:
        raise ConfigError(f"ppo.rollout_prompts: {cfg.ppo.rollout_prompts} is not a multiple of train.batch_size "
                          f"x train.grad_accum x processes = {global_batch} (the samples of an optimizer step)")


def setup(cfg: Config, dist: Dist, resume: bool = False) -> Ppo:
    check_config(cfg, dist)
    note = notes_for(dist)
    device = dist.device
    p = cfg.ppo
    reward = load_reward(p.reward, p.judge_url, p.judge_model, p.judge_key_env, cfg.train.seed, "ppo")
    fit_layout(cfg, PPO_SPEC, note)  # rollouts are padded rows
    resolve_hardware(cfg, device, note)
    checkpoint = dist.on_main(lambda: open_run_dir(cfg, resume))
    seed_everything(cfg.train.seed)
    models = load_models(cfg.model, reference="always" if cfg.reference.mode == "model" else "never")
    policy = PolicyValue(models.policy).to(device)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(models.policy)
    reference = models.reference.to(device) if models.reference is not None else None
    tokenizer = models.tokenizer
    prompts = prompt_items(cfg.data.train, cfg.data.train_split, tokenizer, cfg.data)
    eval_prompts = (prompt_items(cfg.data.eval, cfg.data.eval_split, tokenizer, cfg.data, p.eval_max_prompts)
                    if cfg.data.eval else [])
    if reward is None:
        reward = judge_reward(p.judge_url, p.judge_model, p.judge_key_env, cfg.train.seed, prompts + eval_prompts,
                              cfg.data.train, "ppo")
    label = reward_label(p.reward, reward)
    note(f"ppo: {len(prompts)} training prompts, {len(eval_prompts)} held-out; reward {label}")
    model = dist.wrap_trainable(policy)
    if dist.rank:
        seed_everything(cfg.train.seed + dist.rank)
    if cfg.train.max_steps is not None:
        total_steps = cfg.train.max_steps
    else:
        total_steps = math.ceil(cfg.train.epochs * len(prompts) / cfg.ppo.rollout_prompts)
    per_step = cfg.ppo.epochs * cfg.ppo.rollout_prompts // (cfg.train.batch_size * cfg.train.grad_accum * dist.world)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    # The schedule (and train.warmup_steps) counts optimizer steps: ppo.epochs x minibatches per PPO step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps * per_step))
    run = Run(cfg=cfg, dist=dist, spec=PPO_SPEC, run_dir=Path(cfg.run_dir), device=device, note=note,
              tokenizer=tokenizer, policy=policy, model=model, reference=None, train_items=prompts,
              eval_items=eval_prompts, params=params, optimizer=optimizer, scheduler=scheduler,
              stream=PairStream(len(prompts), cfg.train.seed, cfg.train.shuffle),
              pairs_per_step=cfg.ppo.rollout_prompts, total_steps=total_steps,
              total_pairs=total_steps * cfg.ppo.rollout_prompts, autocast=autocast_for(cfg, device),
              data_fingerprint=fingerprint(cfg.data.train), checkpoint=checkpoint)
    controller = KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
    return Ppo(run=run, reference=reference, eval_prompts=eval_prompts, reward=reward, reward_label=label,
               controller=controller,
               eos_ids=eos_token_ids(models.policy, tokenizer))


def export_policy(run: Run) -> None:
    """RUN_DIR/final: the policy alone (no value head), one plain Hugging Face folder written by rank 0; LoRA
    adapters are folded into the base weights and saved as trained in ``final/adapter/`` (``export_hf``). With a
    model card and generation config (``dpokit.integrations.hub``)."""
    from dpokit.integrations.hub import hub_files, name_adapter_base

    lm = run.policy.model
    if run.dist.is_main:
        name_adapter_base(lm, run.cfg.model.name_or_path)
        export_hf(lm, run.tokenizer, run.run_dir / "final", add=hub_files(run.run_dir, "ppo"))


# ------------------------------------------------------------------------------------------------------ train

def ppo(config: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | None = None, *,
        resume: bool = False, force: bool = False, **kwargs: Any) -> Path:
    """Train a policy with PPO and return the run directory (arguments as ``dpokit.train``; ``dpokit ppo``)."""
    return train_kind(config, overrides, command="ppo", resume=resume, force=force, **kwargs)


def train_ppo(cfg: Config, dist: Dist, *, resume: bool, force: bool) -> Path:
    """PPO from a config (``PPO``'s run: ``dpokit.training.loop.train_kind`` dispatches here); returns the run
    directory."""
    ppo_run = setup(cfg, dist, resume=resume)
    run = ppo_run.run
    if run.checkpoint is not None:
        restore(run, force)
        ppo_run.controller.load_state_dict(run.task_state["kl_controller"])
    held_out = (lambda: evaluate(ppo_run)) if ppo_run.eval_prompts else None
    return loop(run, lambda _, n: ppo_step(ppo_run, n), held_out, export_policy)


PPO = register_kind(Kind(name="ppo", command="ppo", title="dpokit ppo", spec=PPO_SPEC, run=train_ppo))
"""``dpokit ppo``."""
