"""The sentiment recipe's preference data: the openings, pi_ref loaded for sampling, K continuations of each
prompt (cached by content), their ground-truth rewards, and the pairs made of them."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dpokit.errors import DataError
from dpokit.io import read_jsonl, write_jsonl
from dpokit.recipes.openings import PROMPTS_FILE
from dpokit.recipes.sentiment.common import CACHE_VERSION, RECIPE, digest, recipe_device, say
from dpokit.training.metrics import Progress

if TYPE_CHECKING:
    from dpokit.recipes.sentiment.config import SentimentConfig


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


def load_policy(name: str) -> Policy:
    from dpokit.models.loading import freeze, load_model, load_tokenizer, resolve
    from dpokit.training.reference import weights_fingerprint

    source = resolve(name)
    tokenizer = load_tokenizer(source)
    model = freeze(load_model(source, vocab_size=len(tokenizer)))
    device = recipe_device()
    return Policy(name, model.to(device), tokenizer, weights_fingerprint(model), device)


def sample_cache_dir() -> Path:
    from dpokit.models.loading import cache_dir

    return cache_dir() / "recipes" / RECIPE / "samples"


def sample_continuations(policy: Policy, prompts: Sequence[str], k: int, cfg: SentimentConfig, label: str,
                         seed: int) -> list[dict[str, Any]]:
    """K continuations of every prompt from ``policy``: rows ``{"prompt", "responses", "finished",
    "tokens", "seconds"}``. Cached under a hash of the weights, the prompts, K and every sampling parameter, so a re-run
    (or another run folder) with the same inputs reads the file instead of sampling."""
    from dpokit.models.generate import SamplingParams, encode_prompts, generate

    s = cfg.sampling
    params = SamplingParams(s.max_new_tokens, s.temperature, s.top_p, seed, s.batch_size)
    key = digest(CACHE_VERSION, policy.fingerprint, list(prompts), k, asdict(params), s.precision,
                  cfg.prompts.max_prompt_length, cfg.max_length)
    path = sample_cache_dir() / f"{label}-{key[:32]}.jsonl"
    if path.is_file():
        say(f"{label}: {len(prompts)} x {k} samples cached ({path})")
        return read_jsonl(path)
    ids = encode_prompts(policy.tokenizer, list(prompts), cfg.prompts.max_prompt_length, cfg.max_length)
    flat = [p for p in ids for _ in range(k)]  # the K copies of a prompt side by side
    autocast = (torch.autocast(policy.device.type, dtype=torch.bfloat16) if s.precision == "bf16"
                else nullcontext())
    bar = Progress(len(flat), label=f"sampling {label}", say=say)
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
    say(f"{label}: {len(samples)} samples, {tokens} tokens in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s)")
    rows = []
    for i, prompt in enumerate(prompts):
        group = samples[i * k:(i + 1) * k]
        # "seconds": this prompt's share of the sampling wall-clock, kept with the cached samples so that the
        # cost of the data is known when a later run reads them from the cache (the claims' compute).
        rows.append({"prompt": prompt, "responses": [x.text for x in group],
                     "finished": [x.finished for x in group], "tokens": [len(x.response_ids) for x in group],
                     "seconds": seconds / len(prompts)})
    write_jsonl(rows, path)
    return read_jsonl(path)


def add_rewards(rows: list[dict[str, Any]], reward: str = "sentiment") -> list[dict[str, Any]]:
    """The ground-truth reward of every sample (by default VADER's compound score of the continuation)."""
    from dpokit.rewards import get_reward, score_texts

    fn = get_reward(reward)
    for row in rows:
        row["rewards"] = score_texts(fn, [row["prompt"]] * len(row["responses"]), row["responses"], reward)
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
