"""The sentiment recipe's runs: a dpokit config for each (DPO per beta, Preferred-FT, Unlikelihood, the SFT
stage), training and evaluating each unless its result is in its folder under the same key, and Best-of-N,
which needs no training."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dpokit.config import flatten, result_settings
from dpokit.io import read_json, sha256_file, write_json, write_jsonl
from dpokit.recipes.sentiment.common import CACHE_VERSION, digest, mean_stderr, say
from dpokit.recipes.sentiment.sampling import Policy, load_policy, sample_continuations, sft_rows
from dpokit.training.resume import fingerprint

if TYPE_CHECKING:
    from dpokit.recipes.sentiment.config import SentimentConfig

REPORT_BETA = 0.1
"""beta of the implicit rewards reported for runs whose loss has none (Unlikelihood)."""


@dataclass
class RunSpec:
    """One training run of the recipe: its dpokit config and how to train it."""

    name: str
    label: str
    """As tables and plots show it."""
    section: str
    """The recipe config section it comes from."""
    task: Literal["dpo", "sft", "rm", "ppo"]
    config: dict[str, Any]

    @property
    def is_policy(self) -> bool:
        """A run that trains a policy, evaluated on the held-out prompts (the reward model is not one)."""
        return self.task != "rm"


def _train_settings(cfg: SentimentConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    return {**cfg.train.model_dump(mode="json"), **overrides}


def _base_config(cfg: SentimentConfig, run_dir: Path, model: str, train: str, heldout: str | None,
                 overrides: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir), "overwrite": True,
        "model": {"name_or_path": model},
        "data": {"train": train, "eval": heldout, "max_length": cfg.max_length,
                 "max_prompt_length": cfg.prompts.max_prompt_length},
        "train": _train_settings(cfg, overrides),
        "eval": {"every": None, "batch_size": cfg.eval.batch_size},
        "reference": {"mode": "store", "batch_size": cfg.eval.batch_size},
        "log": {**cfg.log.model_dump(mode="json"),
                "run_name": f"{cfg.log.run_name or Path(cfg.run_dir).name}-{Path(run_dir).name}"},
    }


def beta_name(beta: float) -> str:
    """The folder and summary name of the DPO run at ``beta``."""
    return f"dpo-beta{beta:g}"


def run_specs(cfg: SentimentConfig, data_dir: str | Path, run_root: str | Path, ref_model: str) -> dict[str, RunSpec]:
    """Every training run of the experiment (the SFT stage apart), by name, in order: DPO per beta, then the
    enabled baselines. ``ref_model`` is pi_ref (the base model, or the SFT stage's final/)."""
    data, root = Path(data_dir), Path(run_root)
    pairs, heldout, preferred = (str(data / "pairs-train.jsonl"), str(data / "pairs-heldout.jsonl"),
                                 str(data / "preferred-ft.jsonl"))
    specs: dict[str, RunSpec] = {}
    for beta in cfg.dpo.betas:
        name = beta_name(beta)
        config = _base_config(cfg, root / name, ref_model, pairs, heldout, cfg.dpo.train)
        config["loss"] = {"name": cfg.dpo.loss, "beta": beta}
        specs[name] = RunSpec(name, f"DPO β={beta:g}", "dpo", "dpo", config)
    if cfg.preferred_ft.enabled:
        config = _base_config(cfg, root / "preferred-ft", ref_model, preferred, None, cfg.preferred_ft.train)
        specs["preferred-ft"] = RunSpec("preferred-ft", "Preferred-FT", "preferred_ft", "sft", config)
    if cfg.unlikelihood.enabled:
        config = _base_config(cfg, root / "unlikelihood", ref_model, pairs, heldout, cfg.unlikelihood.train)
        # beta only scales the implicit rewards reported; the loss does not use it.
        config["loss"] = {"name": "unlikelihood", "beta": REPORT_BETA,
                          "alpha": cfg.unlikelihood.alpha if cfg.unlikelihood.alpha is not None else 1.0}
        specs["unlikelihood"] = RunSpec("unlikelihood", "Unlikelihood", "unlikelihood", "dpo", config)
    specs.update(ppo_specs(cfg, data, root, ref_model))
    specs.update(online_specs(cfg, data, root, ref_model, specs))
    return specs


REWARD_MODEL = "reward-model"
"""Folder and name of the recipe's reward model run (``dpokit rm`` on the DPO pairs)."""


def ppo_specs(cfg: SentimentConfig, data: Path, root: Path, ref_model: str) -> dict[str, RunSpec]:
    """The reward model (when PPO needs one), then PPO-GT and PPO per KL target."""
    specs: dict[str, RunSpec] = {}
    if cfg.ppo.reward_model:
        config = _base_config(cfg, root / REWARD_MODEL, ref_model, str(data / "pairs-train.jsonl"),
                              str(data / "pairs-heldout.jsonl"), cfg.reward_model.train)
        del config["reference"]  # a reward model has none
        specs[REWARD_MODEL] = RunSpec(REWARD_MODEL, "Reward model", "reward_model", "rm", config)
    kinds = [("ppo-gt", "PPO-GT", cfg.reward)] if cfg.ppo.ground_truth else []
    if cfg.ppo.reward_model:
        kinds.append(("ppo", "PPO", str(root / REWARD_MODEL)))
    for prefix, label, reward in kinds:
        for target in cfg.ppo.kl_targets or [None]:
            name = prefix if target is None else f"{prefix}-kl{target:g}"
            config = _base_config(cfg, root / name, ref_model, str(data / PPO_PROMPTS), None, cfg.ppo.train)
            config["reference"] = {"mode": "model"}  # responses are sampled afresh: no store
            config["ppo"] = {"reward": reward, "max_new_tokens": cfg.sampling.max_new_tokens, **cfg.ppo.settings,
                             **({"kl_target": target} if target is not None else {})}
            shown = label if target is None else f"{label} KL→{target:g}"
            specs[name] = RunSpec(name, shown, "ppo", "ppo", config)
    return specs


PPO_PROMPTS = "train-prompts.jsonl"
"""The train prompts PPO and online DPO sample, one ``{"prompt"}`` row each, in ``data/``."""


def online_name(s: int) -> str:
    """The folder and summary name of the online DPO run refreshing its generator every ``s`` steps."""
    return f"online-s{s}"


def offline_steps(config: dict[str, Any]) -> int | None:
    """Gradient steps of an offline run's config (``dpokit.training.setup.steps_for``, one process); None before its pair
    file exists (a config validated ahead of the sampling)."""
    from dpokit.config import TrainConfig
    from dpokit.training.setup import steps_for

    train_cfg = TrainConfig(**config["train"])
    path = Path(config["data"]["train"])
    if train_cfg.max_steps is None and not path.is_file():
        return None
    pairs = 0
    if train_cfg.max_steps is None:
        with path.open() as f:
            pairs = sum(1 for line in f if line.strip())
    return steps_for(train_cfg, pairs)[0]


def online_specs(cfg: SentimentConfig, data: Path, root: Path, ref_model: str,
                 offline: dict[str, RunSpec]) -> dict[str, RunSpec]:
    """Online DPO per ``online.sync_every``: the first DPO run's loss, beta and training settings, as many
    gradient steps, on pairs it samples itself (``dpokit.methods.online``). A checkpoint must fall just before a
    generator refresh, so ``train.save_every`` (the frontier's spacing) is rounded up to a multiple of s."""
    specs: dict[str, RunSpec] = {}
    if not cfg.online.sync_every:
        return specs
    dpo = offline[beta_name(cfg.dpo.betas[0])].config
    steps = offline_steps(dpo)
    sampling = {"samples_per_prompt": cfg.sampling.samples_per_prompt, "max_new_tokens": cfg.sampling.max_new_tokens,
                "temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
                "pairs": cfg.pairs.mode, "min_margin": cfg.pairs.min_margin}
    for s in cfg.online.sync_every:
        name = online_name(s)
        train = {**cfg.dpo.train, **cfg.online.train, **({"max_steps": steps} if steps else {})}
        every = train.get("save_every", cfg.train.save_every)
        if every:
            train["save_every"] = s * math.ceil(every / s)
        config = _base_config(cfg, root / name, ref_model, str(data / PPO_PROMPTS), None, train)
        config["loss"] = dict(dpo["loss"])
        config["reference"] = {"mode": "model"}  # the responses are new at every step: no store
        config["online"] = {"reward": cfg.reward, **sampling, "sync_every": s, **cfg.online.settings}
        label = "Online DPO" if s == 1 else f"Semi-online DPO s={s}"
        specs[name] = RunSpec(name, label, "online", "dpo", config)
    return specs


def sft_spec(cfg: SentimentConfig, sft_file: str, root: str | Path) -> RunSpec:
    """The SFT stage (pi_SFT, then pi_ref) on ``sft_file``, in ``root/sft``."""
    return RunSpec("sft", "SFT", "sft", "sft",
                   _base_config(cfg, Path(root) / "sft", cfg.model, sft_file, None, cfg.sft.train))


# --------------------------------------------------------------------------------------- training, evaluation

def _marker(run_dir: Path) -> dict[str, Any]:
    marker = read_json(run_dir / "recipe-stage.json", {})
    return marker if isinstance(marker, dict) else {}


def _set_marker(run_dir: Path, **values: Any) -> None:
    write_json(run_dir / "recipe-stage.json", {**_marker(run_dir), **values})


_FRONTIER_SETTINGS = ("train.save_every", "train.keep_checkpoints")
"""Neutral for a run's numbers (``dpokit.config.NEUTRAL``), not for the recipe's: the checkpoints they leave
are the points of the run's reward-KL frontier, which is evaluated from them and then removed."""


def train_key(spec: RunSpec) -> str:
    """What the run's result depends on: its result settings (``dpokit.config.result_settings``: not where the
    run lives, nor how it is computed, shown or logged), the checkpoints its frontier is made of, and the
    content of its data and starting weights."""
    flat = flatten(spec.config)
    settings = {**result_settings(spec.config), **{k: flat[k] for k in _FRONTIER_SETTINGS if k in flat}}
    data = [fingerprint(p) if p else p for p in (spec.config["data"]["train"], spec.config["data"]["eval"])]
    reward = spec.config.get("ppo", spec.config.get("online", {})).get("reward")
    if reward and Path(reward).is_dir():  # a reward model of this recipe: its own training key
        data.append(_marker(Path(reward)).get("train"))
    model = spec.config["model"]["name_or_path"]
    model_key = sha256_file(Path(model) / "model.safetensors") if (Path(model) / "model.safetensors").is_file() else model
    return digest(CACHE_VERSION, spec.task, settings, data, model_key)


def train_run(spec: RunSpec) -> tuple[Path, bool]:
    """Train unless the run folder holds a finished run of the same key. Returns (run_dir, trained)."""
    from dpokit.api import train
    from dpokit.methods.ppo import ppo

    run_dir = Path(spec.config["run_dir"])
    key = train_key(spec)
    if _marker(run_dir).get("train") == key and (run_dir / "final" / "config.json").is_file():
        say(f"{spec.name}: trained already (cached)")
        return run_dir, False
    if (run_dir / "recipe-stage.json").exists():
        (run_dir / "recipe-stage.json").unlink()
    shutil.rmtree(run_dir / "eval", ignore_errors=True)
    if spec.task == "ppo":
        ppo(spec.config)
    else:
        train(spec.config, task=spec.task)
    _set_marker(run_dir, train=key)
    return run_dir, True


def reward_model_metrics(run_dir: Path) -> dict[str, Any]:
    """The reward model's held-out pair metrics at the end of its training (its last ``eval`` row)."""
    from dpokit.training.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "eval"]
    last = rows[-1] if rows else {}
    return {key: last.get(key) for key in ("step", "loss", "accuracy", "margin")}


def _last_checkpoint(run_dir: Path) -> int | None:
    steps = [int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")
             if p.name.removeprefix("step-").isdigit()] if (run_dir / "checkpoints").is_dir() else []
    return max(steps) if steps else None


def evaluate_spec(spec: RunSpec, cfg: SentimentConfig, prompts_file: Path) -> dict[str, Any]:
    """``evaluate_run`` on the held-out prompts, unless done for the same run and settings. The final
    checkpoint duplicates ``final/``, so unless checkpoints are kept it is removed first and the final model's
    own (KL, reward) closes the frontier."""
    from dpokit.evaluate.run import evaluate_run

    run_dir = Path(spec.config["run_dir"])
    e = cfg.eval
    settings = {"prompts": sha256_file(prompts_file), "n_samples": e.n_samples, "seed": e.seed,
                "max_new_tokens": cfg.sampling.max_new_tokens, "reward": cfg.reward}
    key = digest(_marker(run_dir).get("train"), settings)
    eval_path = run_dir / "eval" / "eval.json"
    cached = read_json(eval_path) if _marker(run_dir).get("eval") == key else None
    if cached is not None:
        say(f"{spec.name}: evaluated already (cached)")
        return cached
    last = _last_checkpoint(run_dir)
    # Only the final step's checkpoint duplicates final/: after an evaluation stopped part way it is gone
    # already, and the last one left is a real point of the frontier.
    if last is not None and last == _final_step(run_dir) and not e.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints" / f"step-{last}")
    result = evaluate_run(run_dir, prompts=str(prompts_file), reward=cfg.reward, n_samples=e.n_samples,
                          max_new_tokens=cfg.sampling.max_new_tokens, seed=e.seed, batch_size=e.batch_size,
                          log=lambda m: say(f"{spec.name}: {m}"))
    # The frontier: pi_ref, every intermediate checkpoint (train.save_every), the final model.
    final_step = _final_step(run_dir)
    if final_step not in [p["step"] for p in result["frontier"]]:
        result["frontier"].append({"checkpoint": "final", "step": final_step, "kl": result.get("kl"),
                                   "kl_stderr": result.get("kl_stderr"), "reward": result.get("reward"),
                                   "reward_stderr": result.get("reward_stderr")})
    result.update(method=spec.section, label=spec.label)
    write_json(eval_path, result)
    if not e.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    _set_marker(run_dir, eval=key)
    return result


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The training rows of a run's ``metrics.jsonl``."""
    from dpokit.training.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "train"]


def _final_step(run_dir: Path) -> int:
    rows = train_rows(run_dir)
    return int(rows[-1]["step"]) if rows else 0


def wall_clock(spec: RunSpec, data: Path) -> dict[str, float | None]:
    """What a run cost in seconds: ``train_s``, its training loop (``elapsed_s``: sampling included for PPO and
    online DPO, model loading and a reference precompute not); ``sample_s``, the part of it spent sampling; and
    ``data_s``, the sampling of pi_ref's preference data a run trains on (kept with the cached samples; None
    when a cache predates that record). A reward model's training is not counted in PPO's."""
    rows = train_rows(Path(spec.config["run_dir"]))
    sample_s = sum(r.get("online/sample_s", r.get("sample_s", 0.0)) for r in rows)
    data_s: float | None = 0.0
    if spec.task != "ppo" and "online" not in spec.config:
        from dpokit.io import read_jsonl

        kept = [r.get("seconds") for r in read_jsonl(data / "samples-train.jsonl")]
        data_s = sum(kept) if all(v is not None for v in kept) else None
    return {"train_s": rows[-1]["elapsed_s"] if rows else None, "sample_s": sample_s, "data_s": data_s}


def sft_stage(cfg: SentimentConfig, policy: Policy, train_prompts: list[str], data: Path, root: Path,
              stage: Callable[[str, str], Any]) -> tuple[str, Policy]:
    """pi_SFT: fine-tune the base model on ``sft.data`` (or on its own samples of the train prompts), then use
    it as pi_ref. Returns (its final/ folder, it loaded for sampling)."""
    if cfg.sft.data is None:
        with stage("sample", "SFT data: samples of the base model"):
            rows = sample_continuations(policy, train_prompts, cfg.sampling.samples_per_prompt, cfg, "sft",
                                        cfg.sampling.seed + 2)
        sft_file = str(data / "sft.jsonl")
        write_jsonl(sft_rows(rows), sft_file)
    else:
        sft_file = cfg.sft.data
    spec = sft_spec(cfg, sft_file, root)
    with stage("train sft", f"pi_SFT -> {root / 'sft'}"):
        run_dir, _ = train_run(spec)
    final = str(run_dir / "final")
    with stage("load", f"pi_ref = {final}"):
        return final, load_policy(final)


# ---------------------------------------------------------------------------------------------- best of N

KL_BEST_OF_N = "log N - (N - 1) / N"


def best_of_n_kl(n: int) -> float:
    """KL(pi_BoN || pi_ref) of best-of-N sampling: log N - (N - 1) / N (Stiennon et al. 2020; exact when the N
    rewards have no ties, an upper bound otherwise, Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def best_of_n_eval(rows: Sequence[dict[str, Any]], n: int, out_dir: Path, reward: str = "sentiment") -> dict[str, Any]:
    """Best-of-N on the held-out samples of pi_ref: per prompt, the best of the first N samples by the true
    reward. Written as a run folder with ``eval/eval.json`` and ``eval/samples.jsonl`` for the report."""
    best = [max(zip(r["rewards"][:n], r["responses"][:n]))[::-1] for r in rows]
    reward, stderr = mean_stderr([b[1] for b in best])
    ref, ref_stderr = mean_stderr([r["rewards"][0] for r in rows])
    kl = best_of_n_kl(n)
    result = {
        "run_dir": str(out_dir), "model": f"best-of-{n}", "method": "best_of_n", "n": n, "reward_fn": reward,
        "n_prompts": len(rows), "n_samples": 1, "reward": reward, "reward_stderr": stderr,
        "reward_reference": ref, "kl": kl, "kl_stderr": 0.0, "kl_estimator": KL_BEST_OF_N,
        "frontier": [{"checkpoint": "reference", "step": 0, "kl": 0.0, "kl_stderr": 0.0, "reward": ref,
                      "reward_stderr": ref_stderr},
                     {"checkpoint": f"best-of-{n}", "step": n, "kl": kl, "kl_stderr": 0.0, "reward": reward,
                      "reward_stderr": stderr}],
    }
    samples = [{"temperature": 1.0, "prompt": r["prompt"], "sample": 0, "policy": text, "reference": r["responses"][0],
                "policy_reward": value, "reference_reward": r["rewards"][0]} for r, (text, value) in zip(rows, best)]
    write_jsonl(samples, out_dir / "eval" / "samples.jsonl")
    write_json(out_dir / "eval" / "eval.json", result)
    return result
