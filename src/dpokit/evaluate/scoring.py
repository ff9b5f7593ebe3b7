"""The trained policy is a reward model: r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (DPO paper, Eq. 5).

A :class:`Scorer` holds pi, pi_ref, the tokenizer and beta, and computes log-probs with THE log-prob function
(``dpokit.models.logprobs.layout_logps``) on sequences tokenized exactly as in training
(``dpokit.data.tokenize.encode_rows``: same BOS rule, same end token, same truncation), so a score here equals the
``rewards/chosen`` the training loop logged for the same pair.

``--model`` is a run directory (``RUN_DIR/final`` is the policy; ``config.yaml`` gives beta, the reference and the
token budget) or a plain Hugging Face folder (then ``--ref`` is required). A vision-language model loads with its
processor (``dpokit.evaluate.vision``), and its rows carry their pixel inputs to the same log-prob function.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpokit.config import Config, DataConfig, LossConfig, load_config
from dpokit.data.batch import pad_sequences, padded_layout
from dpokit.data.formats import Text
from dpokit.data.images import has_images
from dpokit.data.load import iter_records
from dpokit.data.tokenize import encode_rows, token_rules
from dpokit.errors import DataError, DpokitError
from dpokit.io import write_jsonl
from dpokit.models.generate import Pixels, batch_pixels
from dpokit.models.loading import ModelSource, freeze, load_model, load_tokenizer, resolve
from dpokit.models.logprobs import layout_logps
from dpokit.models.quantize import round_trip
from dpokit.training.resume import is_run_dir


def device_for() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Scorer:
    """pi, pi_ref and what is needed to score (prompt, response) pairs as training did."""

    policy: nn.Module
    reference: nn.Module
    tokenizer: Any
    beta: float
    max_length: int = DataConfig().max_length
    max_prompt_length: int = DataConfig().max_prompt_length
    batch_size: int = 8
    config: Config | None = None
    """The run's resolved config, when the policy came from a run directory."""
    policy_source: ModelSource | None = None
    """Where the policy's *starting* weights come from (checkpoints hold trained tensors on top of them)."""
    processor: Any = None
    """A vision-language model's processor (``tokenizer`` is then its tokenizer); None for a text model."""

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @torch.no_grad()
    def logps(self, model: nn.Module, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
              pixels: Sequence[Pixels] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of each response after its prompt, and its token count. Shapes: (N,), (N,).

        Rows are batched in order of length so a batch pads little; the results come back in input order.
        ``pixels``: each row's prompt's processor outputs (a vision-language model), laid out as training's
        right-padded rows carry them.
        """
        n = len(prompt_ids)
        logps = torch.zeros(n, dtype=torch.float32)
        counts = torch.zeros(n, dtype=torch.long)
        order = sorted(range(n), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
        was_training = model.training
        model.eval()
        try:
            for start in range(0, n, self.batch_size):
                rows = order[start:start + self.batch_size]
                seqs = [list(prompt_ids[i]) + list(response_ids[i]) for i in rows]
                padded = pad_sequences(seqs, [len(prompt_ids[i]) for i in rows], self.pad_id, side="right")
                padded = {k: v.to(self.device) for k, v in padded.items()}
                batch = padded_layout(padded["input_ids"], padded["attention_mask"], padded["response_mask"])
                if pixels is not None:
                    images = batch_pixels([pixels[i] for i in rows])
                    batch["pixels"] = {k: v.to(self.device) for k, v in images.items()}
                values, tokens = layout_logps(model, batch)
                logps[rows] = values.float().cpu()
                counts[rows] = tokens.cpu()
        finally:
            model.train(was_training)
        return logps, counts

    def implicit_rewards(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                         pixels: Sequence[Pixels] | None = None) -> dict[str, torch.Tensor]:
        """``policy_logps``, ``ref_logps``, ``logratios`` (= log pi - log pi_ref), ``rewards``
        (= beta * logratios) and ``n_tokens``. Shapes: (N,) each."""
        policy_logps, n_tokens = self.logps(self.policy, prompt_ids, response_ids, pixels)
        ref_logps, _ = self.logps(self.reference, prompt_ids, response_ids, pixels)
        logratios = policy_logps - ref_logps
        return {"policy_logps": policy_logps, "ref_logps": ref_logps, "logratios": logratios,
                "rewards": self.beta * logratios, "n_tokens": n_tokens}

    def encode(self, items: Sequence[tuple[Text, Sequence[Text]]], locations: Sequence[str] | None = None,
               images: Sequence[list[bytes | str]] | None = None) -> list[Any]:
        """Tokenize (prompt, responses) rows as training does; each result is an ``Encoded`` or a drop reason.
        A vision-language model's rows go through its processor with their ``images`` (encoded bytes, per row;
        the prompts hold their image marks, ``dpokit.evaluate.vision.split_row``)."""
        if self.processor is not None:
            from dpokit.evaluate.vision import encode_image_items

            data_cfg = DataConfig(max_length=self.max_length, max_prompt_length=self.max_prompt_length)
            locations = locations or [f"row {i}" for i in range(len(items))]
            return encode_image_items(self.processor, items, images or [[] for _ in items], locations, data_cfg)
        items = [(prompt, [_as_turns(r, prompt) for r in responses]) for prompt, responses in items]
        return encode_rows(items, self.tokenizer, self.max_length, self.max_prompt_length, locations,
                           token_rules(self.tokenizer))


def _as_turns(response: Text, prompt: Text) -> Text:
    """A text response to a chat prompt is one assistant turn (as in the conversational data format)."""
    if isinstance(prompt, list) and isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    return response


def load_scorer(model: str | Path, ref: str | None = None, beta: float | None = None,
                batch_size: int = 8, max_length: int | None = None,
                max_prompt_length: int | None = None) -> Scorer:
    """Load pi (a run directory's ``final/`` or a Hugging Face folder / hub id), pi_ref and the tokenizer.

    From a run directory, the reference defaults to the run's reference (``model.ref_name_or_path``, else its
    starting model), beta to ``loss.beta`` and the token budget to ``data.max_length`` /
    ``data.max_prompt_length``; ``ref``, ``beta`` and the lengths override them. A vision-language model loads
    with its processor (``dpokit.evaluate.vision.load_vision_pair``).
    """
    from dpokit.evaluate.vision import load_vision_pair

    device = device_for()
    cfg: Config | None = None
    processor = None
    if is_run_dir(model):
        run_dir = Path(model)
        cfg = load_config(run_dir / "config.yaml")
        final = run_dir / "final"
        if not (final / "config.json").is_file():
            raise DpokitError(f"{run_dir}: no final/ model folder (has the run finished?)")
        m = cfg.model
        base_source = resolve(m.name_or_path, m.gguf_file, m.revision)
        if ref is not None:
            ref_source = resolve(ref, key="--ref")
        elif m.ref_name_or_path is not None:
            ref_source = resolve(m.ref_name_or_path, m.ref_gguf_file, m.revision, key="model.ref_name_or_path")
        else:
            ref_source = base_source
        kwargs = dict(dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                      attn_implementation=m.attn_implementation)
        vision = load_vision_pair(resolve(str(final), key="--model"), ref_source, base_source, **kwargs)
        if vision is not None:  # the run's processor is its starting model's (final/ holds a copy of it)
            policy, reference, processor = vision
            tokenizer = processor.tokenizer
        else:  # the run's tokenizer is its starting model's (final/ holds a copy of it)
            tokenizer = load_tokenizer(base_source, m.trust_remote_code)
            policy = load_model(resolve(str(final), key="--model"), **kwargs, vocab_size=len(tokenizer))
            reference = load_model(ref_source, **kwargs, vocab_size=len(tokenizer))
        if ref is None and m.ref_name_or_path is None:  # QLoRA trained against the NF4 values of its base
            round_trip(reference, m.quantize)
        beta = cfg.loss.beta if beta is None else beta
        max_length = max_length or cfg.data.max_length
        max_prompt_length = max_prompt_length or cfg.data.max_prompt_length
    else:
        if ref is None:
            raise DpokitError(f"--ref: required when --model is not a run directory ({model} has no config.yaml)")
        base_source = resolve(str(model), key="--model")
        vision = load_vision_pair(base_source, resolve(ref, key="--ref"), base_source)
        if vision is not None:
            policy, reference, processor = vision
            tokenizer = processor.tokenizer
        else:
            tokenizer = load_tokenizer(base_source)
            policy = load_model(base_source, vocab_size=len(tokenizer))
            reference = load_model(resolve(ref, key="--ref"), vocab_size=len(tokenizer))
        beta = LossConfig().beta if beta is None else beta
    if beta <= 0:
        raise DpokitError(f"--beta: must be positive, got {beta}")
    defaults = DataConfig()
    max_length = max_length or defaults.max_length
    max_prompt_length = max_prompt_length or defaults.max_prompt_length
    if max_prompt_length >= max_length:
        raise DpokitError("max_prompt_length must be smaller than max_length")
    return Scorer(freeze(policy.to(device)), freeze(reference.to(device)), tokenizer, beta, max_length,
                  max_prompt_length, batch_size, cfg, base_source, processor)


# ------------------------------------------------------------------------------------------------------ rows

def _field(row: dict[str, Any], key: str, location: str) -> Text:
    value = row[key]
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "role" in value:
        return [value]
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return value
    raise DataError(f"{location}: '{key}' must be a string or a list of messages")


def _kind_and_responses(row: dict[str, Any], location: str) -> tuple[str, list[Text]]:
    """Which kind of row this is (``response``, ``responses`` or ``pair``) and its responses."""
    if "response" in row:
        return "response", [_field(row, "response", location)]
    if "responses" in row:
        values = row["responses"]
        if not isinstance(values, list) or not values:
            raise DataError(f"{location}: 'responses' must be a non-empty list")
        return "responses", [_field({"r": v}, "r", f"{location}: responses[{i}]") for i, v in enumerate(values)]
    if "chosen" in row and "rejected" in row:
        return "pair", [_field(row, "chosen", location), _field(row, "rejected", location)]
    raise DataError(f"{location}: expected 'prompt' with 'response', 'responses' or 'chosen'/'rejected'; "
                    f"found keys {', '.join(map(repr, list(row)[:8])) or 'none'}")


def score_rows(scorer: Scorer, rows: Sequence[dict[str, Any]], locations: Sequence[str] | None = None,
               base: Path | None = None) -> list[dict[str, Any]]:
    """Implicit rewards for rows of one of three shapes, each returned with the row's own fields plus:

    - ``{"prompt", "response"}``: ``reward``, ``policy_logp``, ``ref_logp``, ``response_tokens``;
    - ``{"prompt", "responses": [K]}``: ``rewards``, ``policy_logps``, ``ref_logps`` (K each) and ``ranking``
      (indices into ``responses``, highest reward first);
    - ``{"prompt", "chosen", "rejected"}``: ``reward_chosen``, ``reward_rejected``, ``margin``, ``correct``.

    A row that cannot be tokenized (its prompt fills ``max_length``) gets ``"dropped": reason`` instead. For a
    vision-language model, rows may carry images as training reads them (``images`` with image parts, or
    ``image`` beside a text prompt; paths relative to ``base``): a malformed one raises its one-line error, an
    image that cannot be read drops its row with the training drop reason (``image_unreadable``, ...).
    """
    from dpokit.evaluate.vision import split_row

    locations = locations or [f"row {i}" for i in range(len(rows))]
    kinds, items, images = [], [], []
    for row, location in zip(rows, locations):
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataError(f"{location}: missing key 'prompt'")
        if scorer.processor is None and has_images(row):
            raise DataError(f"{location}: a row with images; scoring it needs a vision-language model "
                            "(a run or folder whose config has a vision_config)")
        text_row, row_images = split_row(row, location, base) if scorer.processor is not None else (row, [])
        kind, responses = _kind_and_responses(text_row, location)
        kinds.append(kind)
        items.append((_field(text_row, "prompt", location), responses))
        images.append(row_images)
    encoded = scorer.encode(items, locations, images)
    flat_prompts: list[list[int]] = []
    flat_responses: list[list[int]] = []
    flat_pixels: list[Any] = []
    for result in encoded:
        if not isinstance(result, str):
            for ids in result.responses_ids:
                flat_prompts.append(result.prompt_ids)
                flat_responses.append(ids)
                flat_pixels.append(getattr(result, "pixels", {}))
    pixels = flat_pixels if scorer.processor is not None else None
    scores = scorer.implicit_rewards(flat_prompts, flat_responses, pixels) if flat_prompts else None
    out: list[dict[str, Any]] = []
    cursor = 0
    for row, kind, result in zip(rows, kinds, encoded):
        row = dict(row)
        if isinstance(result, str):
            row["dropped"] = result
            out.append(row)
            continue
        assert scores is not None
        k = len(result.responses_ids)
        part = {name: values[cursor:cursor + k].tolist() for name, values in scores.items()}
        cursor += k
        if kind == "response":
            row.update(reward=part["rewards"][0], policy_logp=part["policy_logps"][0],
                       ref_logp=part["ref_logps"][0], response_tokens=part["n_tokens"][0])
        elif kind == "responses":
            rewards = part["rewards"]
            row.update(rewards=rewards, policy_logps=part["policy_logps"], ref_logps=part["ref_logps"],
                       ranking=sorted(range(k), key=lambda i: -rewards[i]))
        else:
            chosen, rejected = part["rewards"]
            row.update(reward_chosen=chosen, reward_rejected=rejected, margin=chosen - rejected,
                       correct=chosen > rejected)
        out.append(row)
    return out


def score(model: str | Path, source: str | Path, ref: str | None = None, beta: float | None = None,
          out: str | Path | None = None, batch_size: int = 8, max_rows: int | None = None) -> list[dict[str, Any]]:
    """Score every row of a JSONL/JSON/CSV/Parquet file (see :func:`score_rows`) with the implicit reward of
    ``model`` against ``ref``; write JSONL to ``out`` (``-`` for stdout) when given. Returns the scored rows."""
    from dpokit.evaluate.vision import drop_line

    records = list(iter_records(str(source), max_rows=max_rows))
    scorer = load_scorer(model, ref, beta, batch_size=batch_size)
    path = Path(source).expanduser()
    base = path.parent if path.is_file() else None  # image paths are relative to the data file's folder
    scored = score_rows(scorer, [r.row for r in records], [r.location for r in records], base)
    for record, row in zip(records, scored):
        if "dropped" in row:  # said, not only written: a dropped row has no reward
            print(drop_line(record.location, row["dropped"]), file=sys.stderr)
    if out is not None:
        write_jsonl(scored, out)
    return scored

