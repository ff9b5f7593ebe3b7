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
    eval       held-out prompts, samples at temperature 1: mean reward and KL(pi || pi_ref) per run and per
               checkpoint (``dpokit.evaluate.evaluate_run``), implicit-reward accuracy on held-out pairs
    report     RUN_DIR/report.html, RUN_DIR/frontier.svg, RUN_DIR/summary.json and a before/after table

Every stage is skipped when its result exists for the same inputs: samples are cached under
``$DPOKIT_CACHE/recipes/sentiment`` by a hash of the model's weights, the prompts, the sampling parameters and
the seed; a training run or an evaluation is redone only when its resolved config or its data changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dpokit.checkpoint import sha256_file
from dpokit.config import TrainConfig, _format_error, _set_dotted, load_config, parse_override
from dpokit.errors import ConfigError, DataError
from dpokit.evaluate.scoring import write_jsonl
from dpokit.recipes.openings import PROMPTS_FILE

RECIPE = "sentiment"
PRESET_DIR = Path("configs") / "recipes"
CACHE_VERSION = 1
REPORT_BETA = 0.1
"""beta of the implicit rewards reported for runs whose loss has none (Unlikelihood)."""


# ----------------------------------------------------------------------------------------------------- config

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
    best_of_n: list[int] = Field(default_factory=lambda: [4])
    """Best-of-N baselines: the best of N pi_ref samples by the true reward (the paper: N = 4, 16 ...)."""
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _consistent(self) -> SentimentConfig:
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
                           "eval"})
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
    checkout = Path(__file__).resolve().parents[3]
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
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    for key, value in kwargs.items():
        _set_dotted(tree, key.replace("__", "."), value)
    try:
        # Keys a preset or an override leaves out keep the recipe's defaults (not those of the section's class:
        # ``train.epochs=2`` alone must not reset the recipe's learning rate).
        return SentimentConfig.model_validate(_merge(SentimentConfig().model_dump(mode="json"), tree))
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


# ------------------------------------------------------------------------------------------------------ runs

@dataclass
class RunSpec:
    """One training run of the recipe: its dpokit config and how to train it."""

    name: str
    label: str
    """As tables and plots show it."""
    section: str
    """The recipe config section it comes from."""
    task: Literal["dpo", "sft"]
    config: dict[str, Any]


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
    }


def _beta_name(beta: float) -> str:
    return f"dpo-beta{beta:g}"


def run_specs(cfg: SentimentConfig, data_dir: str | Path, run_root: str | Path, ref_model: str) -> dict[str, RunSpec]:
    """Every training run of the experiment (the SFT stage apart), by name, in order: DPO per beta, then the
    enabled baselines. ``ref_model`` is pi_ref (the base model, or the SFT stage's final/)."""
    data, root = Path(data_dir), Path(run_root)
    pairs, heldout, preferred = (str(data / "pairs-train.jsonl"), str(data / "pairs-heldout.jsonl"),
                                 str(data / "preferred-ft.jsonl"))
    specs: dict[str, RunSpec] = {}
    for beta in cfg.dpo.betas:
        name = _beta_name(beta)
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
    return specs


# ---------------------------------------------------------------------------------------------------- helpers

def _say(message: str) -> None:
    print(f"recipe: {message}", file=sys.stderr, flush=True)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write_json(value: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    from dpokit.evaluate.stats import mean_stderr

    estimate = mean_stderr(list(values))
    return estimate.mean, estimate.stderr


class StageTimer:
    """Wall-clock and CPU seconds per stage, for the summary, and one line per stage on stderr. (CPU seconds
    compare machines better than wall-clock ones when the CPU is shared.)"""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        _say(f"{name}: {what}")
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 1)
            self.cpu_seconds[name] = round(self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu, 1)


class ProgressBar:
    """A rich bar on a terminal; on a pipe or in CI, a line every ~10%."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self._next_line = 0.1
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn())
            self._task = self._bar.add_task(label, total=total)
            self._bar.start()

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif self.total and self.done / self.total >= self._next_line:
            _say(f"{self.label} {self.done}/{self.total}")
            while self._next_line <= self.done / self.total:
                self._next_line += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ----------------------------------------------------------------------------------------------------- prompts

def load_openings(path: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(train, held-out) openings of a prompts file, in file order; the same text in both is an error."""
    path = Path(path) if path else PROMPTS_FILE
    if not path.is_file():
        raise DataError(f"prompts.file: {path} not found")
    train: list[str] = []
    heldout: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number}: invalid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f"{path}:{number}: expected {{\"prompt\": text, \"split\": \"train\"|\"heldout\"}}")
        split = row.get("split", "train")
        if split not in ("train", "heldout"):
            raise DataError(f"{path}:{number}: split must be 'train' or 'heldout', got {split!r}")
        (train if split == "train" else heldout).append(row["prompt"])
    overlap = set(train) & set(heldout)
    if overlap:
        raise DataError(f"{path}: {len(overlap)} openings are both train and held-out, e.g. {sorted(overlap)[0]!r}")
    if not train or not heldout:
        raise DataError(f"{path}: needs train and held-out openings (found {len(train)} and {len(heldout)})")
    return list(dict.fromkeys(train)), list(dict.fromkeys(heldout))


# ---------------------------------------------------------------------------------------------------- sampling

@dataclass
class Policy:
    """pi_ref in memory for sampling, with the fingerprint of its weights (the sample cache's key)."""

    name: str
    model: Any
    tokenizer: Any
    fingerprint: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def recipe_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precisions(cfg: SentimentConfig) -> None:
    """``auto`` precisions resolved once for the whole experiment, before any cache key is computed: the
    sample cache and the runs' keys hold what ran, so an ``auto`` that picks bf16 on one machine and fp32 on
    another never shares a cached result."""
    from dpokit.hardware import resolve_precision

    device = recipe_device()
    cfg.sampling.precision = resolve_precision(cfg.sampling.precision, device, _say)
    cfg.train.precision = resolve_precision(cfg.train.precision, device)
    for section in (cfg.dpo.train, cfg.preferred_ft.train, cfg.unlikelihood.train, cfg.sft.train):
        if "precision" in section:
            section["precision"] = resolve_precision(section["precision"], device)


def load_policy(name: str) -> Policy:
    from dpokit.models import freeze, load_model, load_tokenizer, resolve
    from dpokit.reference import weights_fingerprint

    source = resolve(name)
    tokenizer = load_tokenizer(source)
    model = freeze(load_model(source, vocab_size=len(tokenizer)))
    device = recipe_device()
    return Policy(name, model.to(device), tokenizer, weights_fingerprint(model), device)


def sample_cache_dir() -> Path:
    from dpokit.models import cache_dir

    return cache_dir() / "recipes" / RECIPE / "samples"


def sample_continuations(policy: Policy, prompts: Sequence[str], k: int, cfg: SentimentConfig, label: str,
                         seed: int) -> list[dict[str, Any]]:
    """K continuations of every prompt from ``policy``: rows ``{"prompt", "responses", "finished",
    "tokens"}``. Cached under a hash of the weights, the prompts, K and every sampling parameter, so a re-run
    (or another run folder) with the same inputs reads the file instead of sampling."""
    from dpokit.generate import SamplingParams, encode_prompts, generate

    s = cfg.sampling
    params = SamplingParams(s.max_new_tokens, s.temperature, s.top_p, seed, s.batch_size)
    key = _digest(CACHE_VERSION, policy.fingerprint, list(prompts), k, asdict(params), s.precision,
                  cfg.prompts.max_prompt_length, cfg.max_length)
    path = sample_cache_dir() / f"{label}-{key[:32]}.jsonl"
    if path.is_file():
        _say(f"{label}: {len(prompts)} x {k} samples cached ({path})")
        return _read_jsonl(path)
    ids = encode_prompts(policy.tokenizer, list(prompts), cfg.prompts.max_prompt_length, cfg.max_length)
    flat = [p for p in ids for _ in range(k)]  # the K copies of a prompt side by side
    autocast = (torch.autocast(policy.device.type, dtype=torch.bfloat16) if s.precision == "bf16"
                else nullcontext())
    bar = ProgressBar(f"sampling {label}", len(flat))
    samples = []
    started = time.perf_counter()
    try:
        with autocast:
            for number, start in enumerate(range(0, len(flat), s.batch_size)):
                chunk = flat[start:start + s.batch_size]
                # Each batch its own seed: one seed for all would replay the same draws in every batch.
                samples += generate(policy.model, policy.tokenizer, chunk, replace(params, seed=seed * 100_003 + number))
                bar.advance(len(chunk))
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    tokens = sum(len(x.response_ids) for x in samples)
    _say(f"{label}: {len(samples)} samples, {tokens} tokens in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s)")
    rows = []
    for i, prompt in enumerate(prompts):
        group = samples[i * k:(i + 1) * k]
        rows.append({"prompt": prompt, "responses": [x.text for x in group],
                     "finished": [x.finished for x in group], "tokens": [len(x.response_ids) for x in group]})
    write_jsonl(rows, path)
    return _read_jsonl(path)


def add_rewards(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ground-truth reward (VADER compound of the continuation) of every sample."""
    from dpokit.rewards import get_reward, score_texts

    fn = get_reward("sentiment")
    for row in rows:
        row["rewards"] = score_texts(fn, [row["prompt"]] * len(row["responses"]), row["responses"], "sentiment")
    return rows


# -------------------------------------------------------------------------------------------------------- pairs

def usable(text: str) -> bool:
    """A continuation the data loader accepts as text: not blank, no NUL, no lone surrogate (a model decoding
    raw bytes can produce either)."""
    if not text.strip() or "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def make_pairs(rows: Sequence[dict[str, Any]], mode: str = "all", min_margin: float = 0.0) -> list[dict[str, Any]]:
    """Preference pairs in the standard format, with their rewards, from samples with rewards.

    ``all``: every two samples of a prompt, the higher reward chosen (K (K - 1) / 2 pairs: the paper's 6 for
    K = 4); ``best_worst``: the best and the worst sample. Pairs whose rewards differ by ``min_margin`` or less
    (ties), identical texts and unusable continuations (blank, NUL, lone surrogates) are dropped."""
    pairs = []
    for row in rows:
        # Highest reward first; equal rewards in a fixed order (by text), so the pairs depend on the samples only.
        ranked = sorted((r, t) for r, t in zip(row["rewards"], row["responses"]) if usable(t))[::-1]
        candidates = ([(ranked[0], ranked[-1])] if mode == "best_worst" and ranked else
                      [(ranked[i], ranked[j]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))])
        for (r_w, chosen), (r_l, rejected) in candidates:
            if r_w - r_l > min_margin and chosen != rejected:
                pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                              "chosen_reward": r_w, "rejected_reward": r_l})
    return pairs


def sft_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every sample as an SFT target. SFT reads preference rows and trains on ``chosen`` only; ``rejected`` is
    another sample of the same prompt, never used."""
    out = []
    for row in rows:
        texts = [t for t in row["responses"] if usable(t)]
        for i, text in enumerate(texts):
            other = next((t for t in texts[i + 1:] + texts[:i] if t != text), None)
            if other is not None:
                out.append({"prompt": row["prompt"], "chosen": text, "rejected": other})
    return out


# ---------------------------------------------------------------------------------------------- best of N

KL_BEST_OF_N = "log N - (N - 1) / N"


def best_of_n_kl(n: int) -> float:
    """KL(pi_BoN || pi_ref) of best-of-N sampling: log N - (N - 1) / N (Stiennon et al. 2020; exact when the N
    rewards have no ties, an upper bound otherwise, Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def best_of_n_eval(rows: Sequence[dict[str, Any]], n: int, out_dir: Path) -> dict[str, Any]:
    """Best-of-N on the held-out samples of pi_ref: per prompt, the best of the first N samples by the true
    reward. Written as a run folder with ``eval/eval.json`` and ``eval/samples.jsonl`` for the report."""
    best = [max(zip(r["rewards"][:n], r["responses"][:n]))[::-1] for r in rows]
    reward, stderr = _mean_stderr([b[1] for b in best])
    ref, ref_stderr = _mean_stderr([r["rewards"][0] for r in rows])
    kl = best_of_n_kl(n)
    result = {
        "run_dir": str(out_dir), "model": f"best-of-{n}", "method": "best_of_n", "n": n, "reward_fn": "sentiment",
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
    _write_json(result, out_dir / "eval" / "eval.json")
    return result


# --------------------------------------------------------------------------------------- training, evaluation

def _marker(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "recipe-stage.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _set_marker(run_dir: Path, **values: Any) -> None:
    _write_json({**_marker(run_dir), **values}, run_dir / "recipe-stage.json")


_RESULT_NEUTRAL = frozenset({"progress", "pass_tokens"})
"""``train`` keys that change how a run is computed or shown, not its result."""


def train_key(spec: RunSpec) -> str:
    """What the run's result depends on: its config (not where it lives) and the content of its data."""
    config = {k: v for k, v in spec.config.items() if k not in ("run_dir", "overwrite")}
    config["train"] = {k: v for k, v in config["train"].items() if k not in _RESULT_NEUTRAL}
    data = [sha256_file(Path(p)) if p and Path(p).is_file() else p for p in (spec.config["data"]["train"],
                                                                        spec.config["data"]["eval"])]
    model = spec.config["model"]["name_or_path"]
    model_key = sha256_file(Path(model) / "model.safetensors") if (Path(model) / "model.safetensors").is_file() else model
    return _digest(CACHE_VERSION, spec.task, config, data, model_key)


def train_run(spec: RunSpec) -> tuple[Path, bool]:
    """Train unless the run folder holds a finished run of the same key. Returns (run_dir, trained)."""
    from dpokit.train import train

    run_dir = Path(spec.config["run_dir"])
    key = train_key(spec)
    if _marker(run_dir).get("train") == key and (run_dir / "final" / "config.json").is_file():
        _say(f"{spec.name}: trained already (cached)")
        return run_dir, False
    if (run_dir / "recipe-stage.json").exists():
        (run_dir / "recipe-stage.json").unlink()
    shutil.rmtree(run_dir / "eval", ignore_errors=True)
    train(spec.config, task=spec.task)
    _set_marker(run_dir, train=key)
    return run_dir, True


def _last_checkpoint(run_dir: Path) -> int | None:
    steps = [int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")
             if p.name.removeprefix("step-").isdigit()] if (run_dir / "checkpoints").is_dir() else []
    return max(steps) if steps else None


def evaluate(spec: RunSpec, cfg: SentimentConfig, prompts_file: Path) -> dict[str, Any]:
    """``evaluate_run`` on the held-out prompts, unless done for the same run and settings. The final
    checkpoint duplicates ``final/``, so unless checkpoints are kept it is removed first and the final model's
    own (KL, reward) closes the frontier."""
    from dpokit.evaluate.run import evaluate_run

    run_dir = Path(spec.config["run_dir"])
    e = cfg.eval
    settings = {"prompts": sha256_file(prompts_file), "n_samples": e.n_samples, "seed": e.seed,
                "max_new_tokens": cfg.sampling.max_new_tokens}
    key = _digest(_marker(run_dir).get("train"), settings)
    eval_path = run_dir / "eval" / "eval.json"
    if _marker(run_dir).get("eval") == key and eval_path.is_file():
        _say(f"{spec.name}: evaluated already (cached)")
        return json.loads(eval_path.read_text(encoding="utf-8"))
    last = _last_checkpoint(run_dir)
    if last is not None and not e.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints" / f"step-{last}")
    result = evaluate_run(run_dir, prompts=str(prompts_file), reward="sentiment", n_samples=e.n_samples,
                          max_new_tokens=cfg.sampling.max_new_tokens, seed=e.seed, batch_size=e.batch_size,
                          log=lambda m: _say(f"{spec.name}: {m}"))
    # The frontier: pi_ref, every intermediate checkpoint (train.save_every), the final model.
    final_step = _final_step(run_dir)
    if final_step not in [p["step"] for p in result["frontier"]]:
        result["frontier"].append({"checkpoint": "final", "step": final_step, "kl": result.get("kl"),
                                   "kl_stderr": result.get("kl_stderr"), "reward": result.get("reward"),
                                   "reward_stderr": result.get("reward_stderr")})
    result.update(method=spec.section, label=spec.label)
    _write_json(result, eval_path)
    if not e.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    _set_marker(run_dir, eval=key)
    return result


def _final_step(run_dir: Path) -> int:
    from dpokit.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "train"]
    return int(rows[-1]["step"]) if rows else 0


# ------------------------------------------------------------------------------------------------------ report

def summarize(cfg: SentimentConfig, results: dict[str, dict[str, Any]], labels: dict[str, str],
              extra: dict[str, Any]) -> dict[str, Any]:
    """summary.json: the headline (pi_ref vs the first DPO run) and one entry per run."""
    headline = _beta_name(cfg.dpo.betas[0])
    main = results[headline]
    runs = {}
    for name, ev in results.items():
        runs[name] = {"label": labels[name], "reward": ev.get("reward"), "reward_stderr": ev.get("reward_stderr"),
                      "reward_reference": ev.get("reward_reference"), "kl": ev.get("kl"),
                      "kl_stderr": ev.get("kl_stderr"), "implicit_accuracy": ev.get("rewards/accuracies"),
                      "frontier": [{k: p.get(k) for k in ("checkpoint", "step", "kl", "reward")}
                                   for p in ev.get("frontier") or []]}
    reward_ref, reward_policy = main.get("reward_reference"), main.get("reward")
    return {
        "recipe": RECIPE, "headline_run": headline, "model": cfg.model,
        "n_heldout": main.get("n_prompts"), "reward_ref": reward_ref, "reward_policy": reward_policy,
        "reward_policy_stderr": main.get("reward_stderr"),
        "reward_gain": (reward_policy - reward_ref) if reward_ref is not None and reward_policy is not None else None,
        "kl": main.get("kl"), "kl_stderr": main.get("kl_stderr"),
        "implicit_accuracy": main.get("rewards/accuracies"), "heldout_pairs": main.get("heldout_pairs"),
        **extra, "runs": runs,
    }


def print_table(summary: dict[str, Any]) -> None:
    """The before/after table: pi_ref and every run on the held-out prompts."""
    from rich.console import Console
    from rich.table import Table

    def num(value: Any, stderr: Any = None, digits: int = 3) -> str:
        if value is None:
            return "—"
        return f"{value:.{digits}f}" + (f" ± {stderr:.{digits}f}" if stderr else "")

    table = Table(title=f"controlled sentiment: {summary['n_heldout']} held-out prompts, temperature 1.0")
    for column, justify in (("model", "left"), ("reward (VADER)", "right"), ("KL(π‖π_ref)", "right"),
                            ("implicit-reward acc.", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_row("π_ref (before)", num(summary["reward_ref"]), "0", "—")
    for name, run in summary["runs"].items():
        kl = num(run["kl"], run["kl_stderr"], 2) + (" (bound)" if name.startswith("best-of-") else "")
        acc = f"{100 * run['implicit_accuracy']:.1f}%" if run["implicit_accuracy"] is not None else "—"
        table.add_row(run["label"] + (" (after)" if name == summary["headline_run"] else ""),
                      num(run["reward"], run["reward_stderr"]), kl, acc)
    console = Console()
    console.print(table)
    gain = summary.get("reward_gain")
    if gain is not None:
        console.print(f"held-out mean reward {summary['reward_ref']:.3f} -> {summary['reward_policy']:.3f} "
                      f"({gain:+.3f}) at KL {summary['kl']:.2f} nats; implicit-reward accuracy "
                      f"{100 * (summary['implicit_accuracy'] or 0):.1f}% on {summary['heldout_pairs']} held-out pairs")


def results_markdown(summary: dict[str, Any]) -> str:
    """The results as a Markdown table (``RUN_DIR/results.md``), for docs: every run's held-out reward and KL."""

    def num(value: Any, stderr: Any = None, digits: int = 3) -> str:
        if value is None:
            return "—"
        return f"{value:.{digits}f}" + (f" ± {stderr:.{digits}f}" if stderr else "")

    lines = [f"{summary['n_heldout']} held-out prompts, one sample each at temperature 1.0 (mean ± standard error).",
             "", "| method | reward (VADER) | KL(π‖π_ref) nats | implicit-reward accuracy | reward gain over π_ref |",
             "|---|---|---|---|---|",
             f"| π_ref | {num(summary['reward_ref'])} | 0 | — | — |"]
    for name, run in summary["runs"].items():
        kl = num(run["kl"], run["kl_stderr"], 2) + (" (bound)" if name.startswith("best-of-") else "")
        acc = f"{100 * run['implicit_accuracy']:.1f}%" if run["implicit_accuracy"] is not None else "—"
        ref = run.get("reward_reference")
        gain = f"{run['reward'] - ref:+.3f}" if run.get("reward") is not None and ref is not None else "—"
        lines.append(f"| {run['label']} | {num(run['reward'], run['reward_stderr'])} | {kl} | {acc} | {gain} |")
    return "\n".join(lines) + "\n"


def write_frontier(results: dict[str, dict[str, Any]], labels: dict[str, str], path: Path) -> Path | None:
    from dpokit.evaluate import plots

    svg = plots.frontier([(labels[name], ev) for name, ev in results.items()], beta_in_label=False)
    if svg is None:
        return None
    path.write_text(svg, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------- run

def run(preset: str | Path | dict[str, Any] | None = None, overrides: Sequence[str] | None = None,
        **kwargs: Any) -> dict[str, Any]:
    """Run the experiment; returns the summary (also in ``RUN_DIR/summary.json``)."""
    cfg = load_recipe_config(preset, overrides, **kwargs)
    started = time.perf_counter()
    stage = StageTimer()
    resolve_precisions(cfg)
    root = Path(cfg.run_dir)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                                      encoding="utf-8")

    train_prompts, heldout_prompts = load_openings(cfg.prompts.file)
    train_prompts = train_prompts[:cfg.prompts.n_train]
    heldout_prompts = heldout_prompts[:cfg.prompts.n_heldout]
    prompts_file = data / "heldout-prompts.jsonl"
    write_jsonl([{"prompt": p} for p in heldout_prompts], prompts_file)
    _say(f"{len(train_prompts)} train prompts, {len(heldout_prompts)} held-out prompts -> {root}")
    k, k_heldout = cfg.sampling.samples_per_prompt, cfg.sampling.heldout_samples_per_prompt

    with stage("load", f"pi_ref = {cfg.model}"):
        policy = load_policy(cfg.model)
    ref_model = cfg.model
    if cfg.sft.enabled:
        ref_model, policy = sft_stage(cfg, policy, train_prompts, data, root, stage)

    with stage("sample", f"{k} samples per train prompt, {k_heldout} per held-out prompt from pi_ref"):
        train_rows = add_rewards(sample_continuations(policy, train_prompts, k, cfg, "train", cfg.sampling.seed))
        heldout_rows = add_rewards(sample_continuations(policy, heldout_prompts, k_heldout, cfg, "heldout",
                                                        cfg.sampling.seed + 1))
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
    ref_mean, ref_stderr = _mean_stderr(ref_rewards)
    _say(f"pairs: {len(pairs)} train ({cfg.pairs.mode}), {len(heldout_pairs)} held-out; pi_ref held-out reward "
         f"{ref_mean:.3f} ± {ref_stderr:.3f} over {len(ref_rewards)} samples")

    specs = run_specs(cfg, data, root, ref_model)
    results: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        with stage(f"train {name}", f"{spec.label} ({spec.task}) -> {spec.config['run_dir']}"):
            train_run(spec)
        with stage(f"eval {name}", f"{spec.label} on {len(heldout_prompts)} held-out prompts"):
            results[name] = evaluate(spec, cfg, prompts_file)
    labels = {name: spec.label for name, spec in specs.items()}
    for n in cfg.best_of_n:
        results[f"best-of-{n}"] = best_of_n_eval(heldout_rows, n, root / f"best-of-{n}")
        labels[f"best-of-{n}"] = f"Best-of-{n}"

    with stage("report", f"{root / 'report.html'}"):
        from dpokit.evaluate.report import write_report

        write_report([Path(specs[name].config["run_dir"]) if name in specs else root / name for name in results],
                     out=root / "report.html")
        write_frontier(results, labels, root / "frontier.svg")
    extra = {"n_train_prompts": len(train_prompts), "train_pairs": len(pairs), "pairs_mode": cfg.pairs.mode,
             "samples_per_prompt": k, "max_new_tokens": cfg.sampling.max_new_tokens,
             "reward_ref_samples": ref_mean, "reward_ref_samples_stderr": ref_stderr,
             "reward_ref_samples_n": len(ref_rewards), "stage_seconds": stage.seconds,
             "stage_cpu_seconds": stage.cpu_seconds, "threads": torch.get_num_threads(),
             "elapsed_s": round(time.perf_counter() - started, 1)}
    summary = summarize(cfg, results, labels, extra)
    _write_json(summary, root / "summary.json")
    (root / "results.md").write_text(results_markdown(summary), encoding="utf-8")
    print_table(summary)
    print(f"report: {root / 'report.html'}\nsummary: {root / 'summary.json'}")
    return summary


def sft_spec(cfg: SentimentConfig, sft_file: str, root: str | Path) -> RunSpec:
    return RunSpec("sft", "SFT", "sft", "sft",
                   _base_config(cfg, Path(root) / "sft", cfg.model, sft_file, None, cfg.sft.train))


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
