"""The sentiment recipe's configuration: its sections, the presets (``configs/recipes/sentiment-NAME.yaml``) and
``load_recipe_config``, built on ``dpokit.config`` (YAML with file:line errors, dotted overrides, one-line
errors naming the key); the ``train`` section is dpokit's own ``TrainConfig``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dpokit.config import LogConfig, TrainConfig, apply_overrides, load_config, read_yaml_tree, validate_tree
from dpokit.errors import ConfigError
from dpokit.recipes.sentiment.common import RECIPE, recipe_device, say
from dpokit.recipes.sentiment.runs import run_specs, sft_spec

PRESET_DIR = Path("configs") / "recipes"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PromptsConfig(_Section):
    file: str | None = None
    """JSONL of ``{"prompt", "split"}`` rows (split ``train`` or ``heldout``); default: the shipped openings."""
    n_train: int | None = Field(192, ge=1)
    """Train prompts to use (the first ones of the file); unset: all."""
    n_heldout: int | None = Field(100, ge=1)
    """Held-out prompts to evaluate on (the first ones of the file); unset: all."""
    max_prompt_length: int = Field(32, ge=4)
    """Prompt tokens at most (openings are 2 to 8 words, well under this)."""


class SamplingConfig(_Section):
    samples_per_prompt: int = Field(4, ge=2)
    """K: continuations of each train prompt from pi_ref (the paper: 4)."""
    heldout_samples_per_prompt: int = Field(4, ge=2)
    """Continuations of each held-out prompt from pi_ref: their best-vs-worst pairs measure implicit-reward
    accuracy and the first N of them make Best-of-N, so this must be at least the largest ``best_of_n``."""
    max_new_tokens: int = Field(32, ge=4)
    """Tokens per continuation at most (also the evaluation's)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the preference data (the paper: 1.0)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling; 1.0 is off (the paper samples plainly)."""
    seed: int = 0
    """Seed of the preference-data samples."""
    batch_size: int = Field(64, ge=1)
    """Sequences decoded together."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Sample the preference data under bf16 autocast (``bf16``) or in fp32; ``auto`` is bf16 only where it is
    native (``dpokit env``). The evaluation always samples and scores in float32, for its KL estimate."""


class PairsConfig(_Section):
    mode: Literal["all", "best_worst"] = "best_worst"
    """``all``: every pair of a prompt's samples ordered by reward (6 for K = 4), as in the paper;
    ``best_worst``: one pair per prompt, its best and worst sample."""
    min_margin: float = Field(0.0, ge=0)
    """Pairs whose rewards differ by this much or less are ties and dropped."""


class SftConfig(_Section):
    enabled: bool = False
    """Fine-tune the base model first and use the result as pi_ref (the paper's pi_SFT stage)."""
    data: str | None = None
    """Preference file whose chosen responses are the SFT targets; unset: pi_ref's own samples of the train
    prompts (teaches the continuation format: a review sentence or two, then the end token)."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``train`` for this stage, e.g. ``{lr: 1.0e-5, epochs: 1}``."""


class DpoConfig(_Section):
    betas: list[float] = Field(default_factory=lambda: [0.1])
    """One DPO run per beta (the paper: 0.05, 0.1, 1, 5). The first is the headline run of the summary."""
    loss: str = "sigmoid"
    """Preference loss (``dpokit.losses``); ``sigmoid`` is DPO."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``train`` for the DPO runs."""

    @model_validator(mode="after")
    def _betas(self) -> DpoConfig:
        if not self.betas or any(not b > 0 for b in self.betas):
            raise ValueError("betas: give at least one beta, each > 0")
        return self


class BaselineConfig(_Section):
    enabled: bool = False
    """Train this baseline too."""
    alpha: float | None = None
    """Unlikelihood only: weight of the unlikelihood term (default 1.0)."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``train`` for this baseline."""


class RewardModelSection(_Section):
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``train`` for the reward model that ``ppo.reward_model`` optimizes: ``dpokit rm`` on the
    DPO runs' pairs (the RLHF pipeline's first stage)."""


class PpoSection(_Section):
    """PPO, the RLHF baseline of Figure 2: PPO-GT optimizes the true reward itself, PPO a reward model trained
    on the same pairs DPO trains on. Both start from pi_ref and sample the recipe's train prompts."""

    ground_truth: bool = False
    """PPO-GT: PPO with ``reward`` (VADER) as its reward: the paper's upper reference for RLHF."""
    reward_model: bool = False
    """PPO with a reward model trained on the recipe's pairs (``reward_model``): RLHF as practised."""
    kl_targets: list[float] = Field(default_factory=list)
    """One run per KL target (nats per response; beta adapts to reach it): points along the frontier. Empty:
    one run at the fixed ``settings.kl_coef``."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """dpokit's ``ppo`` section for these runs (``rollout_prompts``, ``epochs``, ``kl_coef``, ...);
    ``max_new_tokens`` is the recipe's ``sampling.max_new_tokens`` unless given here."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``train`` for the PPO runs (``max_steps`` counts PPO steps)."""

    @model_validator(mode="after")
    def _targets(self) -> PpoSection:
        if any(not t > 0 for t in self.kl_targets):
            raise ValueError("kl_targets: each target must be > 0")
        return self


class OnlineSection(_Section):
    """Online and semi-online DPO (``dpokit.methods.online``) beside offline DPO: DPO on the policy's own samples of
    the train prompts, scored by ``reward`` as they are drawn, from pi_ref, with the first DPO run's loss, beta,
    batch and number of gradient steps, evaluated on the same held-out prompts."""

    sync_every: list[int] = Field(default_factory=list)
    """One run per s: the generator is refreshed from the policy every s steps (1: fully online; more:
    semi-online, arXiv 2506.21495). Empty: no online runs."""
    settings: dict[str, Any] = Field(default_factory=dict)
    """dpokit's ``online`` section for these runs; ``samples_per_prompt``, ``max_new_tokens``, ``temperature``
    and ``top_p`` are the recipe's ``sampling`` ones and ``pairs`` / ``min_margin`` its ``pairs`` ones unless
    given here, so each step draws its pairs as the offline data was drawn, from the current policy."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``train`` for the online runs, over ``dpo.train`` (``max_steps`` is set to the first DPO
    run's step count)."""

    @model_validator(mode="after")
    def _sync(self) -> OnlineSection:
        if any(s < 1 for s in self.sync_every) or len(set(self.sync_every)) != len(self.sync_every):
            raise ValueError("sync_every: distinct values >= 1 (1 is fully online)")
        return self


class ClaimsSection(_Section):
    """Popular claims about DPO against PPO, measured (``dpokit.recipes.sentiment.claims``): the whole
    experiment once per seed, then compute, stability, efficiency and output variance side by side."""

    seeds: list[int] = Field(default_factory=list)
    """Run the experiment once per seed (its preference samples and every run's training) and write
    ``claims.json``; empty: one experiment, no claims. At least 3 for a spread."""
    target_reward: float | None = None
    """Held-out reward whose cost (FLOPs, seconds) to reach is compared; unset: pi_ref's reward plus half of the
    best method's mean gain (a method that never reaches it has no cost to compare, and is reported so)."""

    @model_validator(mode="after")
    def _seeds(self) -> ClaimsSection:
        if self.seeds and (len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError("seeds: give at least 2 distinct seeds (3 or more for a meaningful spread)")
        return self


class EvalSection(_Section):
    n_samples: int = Field(1, ge=1)
    """Samples per held-out prompt for reward and KL."""
    seed: int = 1234
    """Sampling seed of the evaluation (the same for every run and checkpoint)."""
    batch_size: int = Field(64, ge=1)
    """Sequences decoded or scored together."""
    keep_checkpoints: bool = False
    """Keep ``checkpoints/`` of each run after its evaluation (weights + optimizer state, ~1.6 GB each for
    SmolLM2); ``final/`` and the frontier in ``eval/eval.json`` stay either way."""


class SentimentConfig(_Section):
    """The experiment. The defaults are the ``demo`` preset (``configs/recipes/sentiment-demo.yaml``)."""

    run_dir: str = "runs/demo"
    """Folder of the whole experiment: data/, one folder per run, report.html, summary.json."""
    model: str = "smollm2"
    """pi_ref and the starting policy (any ``model.name_or_path`` of dpokit; ``smollm2`` is the embedded
    SmolLM2-135M-Instruct). Prompted with the plain opening, it continues the review."""
    reward: str = "sentiment"
    """The ground-truth reward: ``sentiment`` (VADER's compound score of the continuation, the experiment's) or
    any reward ``dpokit eval --reward`` takes (``module:function``, ``path/to/file.py:function``)."""
    prompts: PromptsConfig = PromptsConfig()
    sampling: SamplingConfig = SamplingConfig()
    pairs: PairsConfig = PairsConfig()
    sft: SftConfig = SftConfig()
    train: TrainConfig = TrainConfig(lr=5e-5, batch_size=8, epochs=1.0, warmup_steps=4)
    """Training settings shared by every run (``dpokit.config.TrainConfig``); each method overrides some."""
    dpo: DpoConfig = DpoConfig()
    preferred_ft: BaselineConfig = BaselineConfig()
    """Preferred-FT: SFT on the best of each train prompt's K samples."""
    unlikelihood: BaselineConfig = BaselineConfig()
    """Unlikelihood: raise y_w, push y_l down (loss ``unlikelihood`` above), on the DPO pairs."""
    reward_model: RewardModelSection = RewardModelSection()
    ppo: PpoSection = PpoSection()
    online: OnlineSection = OnlineSection()
    claims: ClaimsSection = ClaimsSection()
    best_of_n: list[int] = Field(default_factory=lambda: [4])
    """Best-of-N baselines: the best of N pi_ref samples by the true reward (the paper: N = 4, 16 ...)."""
    eval: EvalSection = EvalSection()
    log: LogConfig = LogConfig()
    """Experiment trackers for every training run of the recipe (``log.report_to``, as in a training config);
    each run is reported as ``RUN_NAME-FOLDER`` (e.g. ``demo-dpo-beta0.1``), ``RUN_NAME`` defaulting to the
    recipe folder's name. Does not change any result, nor the caches."""

    @model_validator(mode="after")
    def _consistent(self) -> SentimentConfig:
        from dpokit.errors import DpokitError
        from dpokit.rewards import get_reward

        try:
            get_reward(self.reward)  # a bad name fails now, not after the sampling
        except DpokitError as err:
            raise ValueError(f"reward: {str(err).removeprefix('--reward: ').removeprefix('reward ')}") from None
        if any(n < 1 for n in self.best_of_n):
            raise ValueError("best_of_n: each N must be >= 1")
        if self.best_of_n and max(self.best_of_n) > self.sampling.heldout_samples_per_prompt:
            raise ValueError(f"best_of_n: N = {max(self.best_of_n)} needs "
                             f"sampling.heldout_samples_per_prompt >= {max(self.best_of_n)}")
        if self.unlikelihood.alpha is not None and not self.unlikelihood.alpha > 0:
            raise ValueError("unlikelihood.alpha: must be > 0")
        # Every run's dpokit config must validate now, not after an hour of sampling.
        specs = list(run_specs(self, "<data>", "<data>", "<model>").items())
        specs.append(("sft", sft_spec(self, "<data>", "<data>")))
        for name, spec in specs:
            try:
                load_config(spec.config)
            except ConfigError as err:
                raise ValueError(f"{spec.section}.train (run {name}): {str(err).removeprefix('config: ')}") from None
        return self

    @property
    def max_length(self) -> int:
        """Prompt + response tokens at most: room for a re-tokenized continuation and its end token."""
        return self.prompts.max_prompt_length + self.sampling.max_new_tokens + 16


_SECTION_KEYS = frozenset({"prompts", "sampling", "pairs", "sft", "train", "dpo", "preferred_ft", "unlikelihood",
                           "reward_model", "ppo", "online", "claims", "eval"})
"""Sections of the recipe config; free-form dicts inside them (e.g. ``dpo.train`` overrides) are replaced whole."""


def find_preset(preset: str) -> Path:
    """A preset name (``demo``, ``paper``: ``configs/recipes/sentiment-NAME.yaml``, looked up in the current
    folder, then in the source checkout) or a YAML path."""
    path = Path(preset).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--preset: {path} not found")
        return path
    name = f"{RECIPE}-{preset}.yaml"
    checkout = Path(__file__).resolve().parents[4]
    for folder in (PRESET_DIR, checkout / PRESET_DIR):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"--preset: no preset '{preset}' ({PRESET_DIR / name} not found here or in "
                      f"{checkout}); give a YAML file instead")


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``: a top-level section merges key by key, anything else is replaced."""
    out = dict(base)
    for key, value in update.items():
        if key in _SECTION_KEYS and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_recipe_config(preset: str | Path | dict[str, Any] | None = None, overrides: Sequence[str] | None = None,
                       **kwargs: Any) -> SentimentConfig:
    """Validate a preset (name, YAML path or dict) with ``key=value`` overrides (and ``a__b=value`` kwargs).
    Unknown keys and bad values are one-line :class:`ConfigError` naming the key."""
    source = "recipe config"
    tree: dict[str, Any] = {}
    if isinstance(preset, dict):
        tree = json.loads(json.dumps(preset))
    elif preset is not None:
        path = preset if isinstance(preset, Path) else find_preset(preset)
        source = str(path)
        tree = read_yaml_tree(path)
    apply_overrides(tree, list(overrides or []), **kwargs)
    # Keys a preset or an override leaves out keep the recipe's defaults (not those of the section's class:
    # ``train.epochs=2`` alone must not reset the recipe's learning rate).
    return validate_tree(SentimentConfig, _merge(SentimentConfig().model_dump(mode="json"), tree), source)


def resolve_precisions(cfg: SentimentConfig) -> None:
    """``auto`` precisions resolved once for the whole experiment, before any cache key is computed: the
    sample cache and the runs' keys hold what ran, so an ``auto`` that picks bf16 on one machine and fp32 on
    another never shares a cached result."""
    from dpokit.models.hardware import resolve_precision

    device = recipe_device()
    cfg.sampling.precision = resolve_precision(cfg.sampling.precision, device, say)
    cfg.train.precision = resolve_precision(cfg.train.precision, device)
    for section in (cfg.dpo.train, cfg.preferred_ft.train, cfg.unlikelihood.train, cfg.sft.train,
                    cfg.reward_model.train, cfg.ppo.train, cfg.online.train):
        if "precision" in section:
            section["precision"] = resolve_precision(section["precision"], device)

