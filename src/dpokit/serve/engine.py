"""What ``dpokit serve`` does with one request.

A request is checked and its prompt tokenized in :meth:`Playground.prepare` (a bad one raises
:class:`BadRequest`, which the web layer answers with a 4xx; a vision-language run's images are read and
checked by ``dpokit.serve.images``), then handed to the :class:`Worker` (``dpokit.serve.queue``): one thread,
one job at a time, first come first served, at most ``Limits.max_queue`` waiting. One job holds at most
2 x ``max_samples`` sequences of at most ``max_new_tokens`` tokens, so memory is bounded however many people
press the button.

A job (:meth:`Playground.run`) samples n responses from pi_ref and n from pi, one token of each model in turn,
so both columns of the page fill at once; each model's batch is scored when it is done with
``dpokit.evaluate.scoring.score_rows`` on the decoded text, the very function behind ``dpokit score``, so the
implicit reward shown is what ``dpokit score`` prints for the same prompt and text. An image prompt samples
with its pixel inputs and is scored as training scores the same prompt, images and text
(``dpokit.serve.images.VisionInputs.score``).

Events, as dicts, in order: ``queued`` (again whenever the queue moves), ``start``, ``note``, ``delta``
(text of some samples), ``final`` (one per column: texts, rewards, summary), then ``done`` or ``error``.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dpokit.data.formats import Text, not_text
from dpokit.errors import DpokitError
from dpokit.evaluate.run import load_prompts, text_of
from dpokit.evaluate.scoring import Scorer, load_scorer, score_rows
from dpokit.models.generate import SamplingParams, batch_pixels, encode_prompts, eos_token_ids, stream_batch
from dpokit.rewards import RewardFn, get_reward, reward_name, score_texts
from dpokit.serve import MAX_QUEUE
from dpokit.serve.images import ImagePrompt, ImageRefused, VisionInputs, refuse_images, vision_examples
from dpokit.serve.queue import Emit, Event, Job, QueueFull, Worker
from dpokit.serve.sampling import IncrementalText
from dpokit.training.resume import is_run_dir

__all__ = ["BadRequest", "Emit", "Event", "Job", "Limits", "Playground", "QueueFull", "Worker", "load_playground"]
SIDES = ("reference", "policy")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Every limit is checked before a request is queued."""

    max_body_bytes: int = 64 * 1024
    """Request body size; larger gets 413."""
    max_prompt_chars: int = 16_000
    """Characters of the prompt (all messages together). Longer prompts are cut to the run's
    ``data.max_prompt_length`` tokens anyway, as in training."""
    max_messages: int = 32
    max_new_tokens: int = 256
    """Also never more than the run's ``data.max_length`` minus the prompt: the scorer reads no further."""
    max_samples: int = 8
    max_temperature: float = 2.0
    max_queue: int = MAX_QUEUE
    """Requests waiting behind the running one; more get 503 with Retry-After (``--max-queue``)."""
    max_images: int = 2
    """Images in one request (a vision-language run; a text run takes none); more get 413."""
    max_image_bytes: int = 2 * 1024 * 1024
    """One image's encoded size (PNG, JPEG, WebP or GIF, base64 decoded); larger gets 413."""

    def body_bytes(self, vision: bool) -> int:
        """The request body limit: ``max_body_bytes``, and for a vision-language run room for ``max_images``
        images as base64 ``data:`` URLs besides (64 KiB + 2 x 2.7 MiB, about 5.4 MiB, by default)."""
        return self.max_body_bytes + (self.max_images * (4 * -(-self.max_image_bytes // 3) + 64) if vision else 0)


class BadRequest(Exception):
    """A request the server refuses, with the HTTP status and a message for the page."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    """A checked request, ready to run."""

    prompt: Text
    """As the models receive it: text, or chat messages."""
    prompt_text: str
    """As a reward function reads it."""
    prompt_ids: list[int]
    n_samples: int
    params: SamplingParams
    notes: tuple[str, ...] = ()
    image_prompt: ImagePrompt | None = None
    """A vision-language run's prompt: its images, tokens and pixel inputs (both models sample with them)."""


@dataclass(frozen=True)
class Example:
    label: str
    text: str
    prompt: Any
    images: tuple[str, ...] = ()
    """An image prompt's images, as ``data:`` URLs."""


@dataclass
class Playground:
    """pi, pi_ref and everything else one request needs; built once by :func:`load_playground`."""

    scorer: Scorer
    run_name: str = "run"
    reference_name: str = "reference"
    reward_fn: RewardFn | None = None
    reward_label: str | None = None
    examples: list[Example] = field(default_factory=list)
    chat: bool = True
    """Typed text is sent as one user message (the run trained on chat data) or as plain text."""
    limits: Limits = field(default_factory=Limits)
    precision: str = "fp32"
    """Sampling runs under bf16 autocast when ``bf16``; the implicit rewards are always scored in fp32, so they
    equal what ``dpokit score`` prints."""
    # The fast tokenizer refuses to encode in one thread while it decodes in another ("Already borrowed"):
    # request checks (web threads) and the worker take turns.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    vision: VisionInputs | None = None
    """A vision-language run's image handling (``dpokit.serve.images``); None for a text run."""

    @property
    def max_new_tokens(self) -> int:
        return max(1, min(self.limits.max_new_tokens, self.scorer.max_length - 1))

    def defaults(self) -> dict[str, Any]:
        return {"temperature": 1.0, "max_new_tokens": min(64, self.max_new_tokens),
                "n_samples": min(4, self.limits.max_samples), "seed": 0, "top_p": 1.0}

    def info(self) -> dict[str, Any]:
        """What the page shows before any request: the run, the examples, the limits and the defaults."""
        limits = self.limits
        return {"run": self.run_name, "beta": self.scorer.beta, "reference": self.reference_name,
                "reward": self.reward_label, "prompt_format": "chat" if self.chat else "text",
                "device": str(self.scorer.device),
                "examples": [{"label": e.label, "text": e.text, "prompt": e.prompt, "images": list(e.images)}
                             for e in self.examples],
                "defaults": self.defaults(), "images": self.vision.info() if self.vision else None,
                "limits": {"max_new_tokens": self.max_new_tokens, "max_samples": limits.max_samples,
                           "max_temperature": limits.max_temperature, "max_prompt_chars": limits.max_prompt_chars,
                           "max_body_bytes": self.body_bytes, "max_queue": limits.max_queue}}

    @property
    def body_bytes(self) -> int:
        return self.limits.body_bytes(self.vision is not None)

    # ----------------------------------------------------------------------------------------------- checks

    def prepare(self, payload: Any) -> Request:
        """Check a decoded JSON request and tokenize its prompt. Raises :class:`BadRequest` naming the field."""
        if not isinstance(payload, dict):
            raise BadRequest("the request must be a JSON object, e.g. {\"prompt\": \"Hello\"}")
        defaults = self.defaults()
        unknown = sorted(set(payload) - {"prompt", "images", *defaults})
        if unknown:
            raise BadRequest(f"unknown field {_show(unknown[0])}; expected prompt, "
                             f"{'images, ' if self.vision else ''}{', '.join(defaults)}")
        if "prompt" not in payload:
            raise BadRequest("prompt: missing")
        values = {**defaults, **payload}
        image_prompt = self._image_prompt(payload)
        prompt = image_prompt.messages if image_prompt else self._prompt(values["prompt"])
        limits = self.limits
        temperature = _number(values, "temperature", 0.0, limits.max_temperature)
        top_p = _number(values, "top_p", 0.0, 1.0, low_open=True)
        n_samples = _integer(values, "n_samples", 1, limits.max_samples)
        max_new_tokens = _integer(values, "max_new_tokens", 1, self.max_new_tokens)
        seed = _integer(values, "seed", 0, 2**63 - 1)
        try:
            with self.tokenizer_lock:
                prompt_ids = image_prompt.prompt_ids if image_prompt else encode_prompts(
                    self.scorer.tokenizer, [prompt], self.scorer.max_prompt_length, self.scorer.max_length)[0]
        except DpokitError as exc:
            raise BadRequest(f"prompt: {exc}") from None
        notes = []
        room = self.scorer.max_length - len(prompt_ids)
        if max_new_tokens > room:
            notes.append(f"max new tokens lowered to {room}: the run scores at most data.max_length = "
                         f"{self.scorer.max_length} tokens of prompt and response")
            max_new_tokens = room
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                batch_size=n_samples)
        return Request(prompt, image_prompt.text if image_prompt else text_of(prompt), prompt_ids, n_samples, params,
                       tuple(notes), image_prompt)

    def _image_prompt(self, payload: dict[str, Any]) -> ImagePrompt | None:
        """A vision-language run's prompt with its images (``dpokit.serve.images``); for a text run, None once
        the request is seen to carry no image."""
        try:
            if self.vision is None:
                refuse_images(payload)
                return None
            with self.tokenizer_lock:
                return self.vision.prepare(payload["prompt"], payload.get("images"), self._prompt)
        except ImageRefused as exc:
            raise BadRequest(str(exc), exc.status) from None

    def _prompt(self, value: Any) -> Text:
        limit = self.limits.max_prompt_chars
        if isinstance(value, str):
            if not value.strip():
                raise BadRequest("prompt: empty; type a prompt or pick an example")
            if len(value) > limit:
                raise BadRequest(f"prompt: {len(value)} characters; at most {limit}")
            _check_text(value, "prompt")
            return [{"role": "user", "content": value}] if self.chat else value
        if not isinstance(value, list) or not value:
            raise BadRequest("prompt: expected text or a non-empty list of {\"role\", \"content\"} messages")
        if len(value) > self.limits.max_messages:
            raise BadRequest(f"prompt: {len(value)} messages; at most {self.limits.max_messages}")
        for i, message in enumerate(value):
            if (not isinstance(message, dict) or set(message) != {"role", "content"}
                    or message["role"] not in ROLES or not isinstance(message["content"], str)):
                raise BadRequest(f"prompt[{i}]: expected {{\"role\": one of {', '.join(ROLES)}, "
                                 "\"content\": text}")
        total = sum(len(m["content"]) for m in value)
        if total > limit:
            raise BadRequest(f"prompt: {total} characters; at most {limit}")
        if not any(m["content"].strip() for m in value):
            raise BadRequest("prompt: every message is empty")
        for i, message in enumerate(value):
            _check_text(message["content"], f"prompt[{i}].content")
        return [dict(m) for m in value]

    # ---------------------------------------------------------------------------------------------- the job

    def run(self, request: Request, emit: Emit, cancelled: threading.Event) -> None:
        """Sample n responses from pi_ref and from pi, streaming their text, then score each column."""
        for note in request.notes:
            emit({"type": "note", "message": note})
        scorer, n = self.scorer, request.n_samples
        models = {"reference": scorer.reference, "policy": scorer.policy}
        eos = {side: eos_token_ids(models[side], scorer.tokenizer) for side in SIDES}
        # One generator per model, seeded alike: each column is what generate() returns for this seed.
        # An image prompt's pixel inputs go to both models' first forward (``stream_batch``).
        pixels = batch_pixels([request.image_prompt.pixels] * n) if request.image_prompt else None
        streams = {side: stream_batch(models[side], [request.prompt_ids] * n, request.params, scorer.pad_id,
                                      eos[side], torch.Generator().manual_seed(request.params.seed), pixels)
                   for side in SIDES}
        texts = {side: [IncrementalText(scorer.tokenizer) for _ in range(n)] for side in SIDES}
        finished = {side: [False] * n for side in SIDES}
        active = list(SIDES)
        try:
            while active:
                for side in list(active):
                    if cancelled.is_set():
                        return
                    with torch.autocast(scorer.device.type, dtype=torch.bfloat16,
                                        enabled=self.precision == "bf16"):
                        step = next(streams[side], None)
                    if step is None:
                        active.remove(side)
                        emit(self._final(side, request, texts[side], finished[side]))
                        continue
                    deltas = []
                    with self.tokenizer_lock:
                        for i, token in enumerate(step):
                            if token is None:
                                continue
                            finished[side][i] = token in eos[side]
                            shown = texts[side][i].push(token)
                            if shown is not None:
                                deltas.append({"i": i, "text": shown[0], "replace": shown[1]})
                    if deltas:
                        emit({"type": "delta", "side": side, "deltas": deltas})
        finally:
            for stream in streams.values():
                stream.close()

    def _final(self, side: str, request: Request, texts: Sequence[IncrementalText],
               finished: Sequence[bool]) -> Event:
        """A column's texts with their implicit rewards (``score_rows``, as ``dpokit score``) and, with a reward
        function, their ground-truth rewards; plus mean and spread over the samples."""
        with self.tokenizer_lock:
            responses = [t.text for t in texts]
            if request.image_prompt is not None and self.vision is not None:
                scored = self.vision.score(request.image_prompt, responses)
            else:
                scored = score_rows(self.scorer, [{"prompt": request.prompt, "response": r} for r in responses])
        notes = []
        rewards: list[float | None] = [None] * len(responses)
        if self.reward_fn is not None:
            try:
                rewards = list(score_texts(self.reward_fn, [request.prompt_text] * len(responses), responses,
                                           self.reward_label or "reward"))
            except DpokitError as exc:
                notes.append(str(exc))
        samples = []
        for i, (text, row) in enumerate(zip(responses, scored)):
            samples.append({"i": i, "text": text, "tokens": len(texts[i].ids), "finished": finished[i],
                            "implicit_reward": _finite(row.get("reward")),
                            "policy_logp": _finite(row.get("policy_logp")),
                            "ref_logp": _finite(row.get("ref_logp")), "reward": _finite(rewards[i]),
                            "dropped": row.get("dropped")})
        summary = {"implicit_reward": spread([s["implicit_reward"] for s in samples]),
                   "reward": spread([s["reward"] for s in samples])}
        return {"type": "final", "side": side, "samples": samples, "summary": summary, "notes": notes}


def spread(values: Sequence[float | None]) -> dict[str, Any] | None:
    """Mean, sample standard deviation, min and max of the values that exist; None when none does."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    sd = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"n": len(present), "mean": statistics.fmean(present), "sd": sd, "min": min(present),
            "max": max(present)}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _check_text(text: str, key: str) -> None:
    # The tokenizer cannot encode a lone surrogate (valid JSON: "\ud800"); the data pipeline refuses the same.
    problem = not_text(text)
    if problem is not None:
        raise BadRequest(f"{key}: contains {problem}, which is not text")


def _number(values: dict[str, Any], key: str, low: float, high: float, low_open: bool = False) -> float:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key}: expected a number, got {_show(value)}")
    if isinstance(value, int) and not low <= value <= high:  # a JSON integer may be too large for a float
        raise BadRequest(f"{key}: must be {'more than' if low_open else 'at least'} {low:g} and at most {high:g}, "
                         f"got {_show(value)}")
    if not math.isfinite(value):
        raise BadRequest(f"{key}: expected a number, got {_show(value)}")
    if value > high or value < low or (low_open and value == low):
        bound = f"more than {low:g}" if low_open else f"at least {low:g}"
        raise BadRequest(f"{key}: must be {bound} and at most {high:g}, got {value:g}")
    return float(value)


def _integer(values: dict[str, Any], key: str, low: int, high: int) -> int:
    value = values[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key}: expected a whole number, got {_show(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{key}: must be between {low} and {high}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = "nothing" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------------------------- loading

def load_examples(source: str | None, split: str, max_examples: int = 6) -> list[Example]:
    """Distinct prompts of the run's data file, as examples. Only a local file is read (a hub dataset would
    need the network)."""
    if not source or not Path(source).is_file():
        return []
    try:
        items = load_prompts(source, split, max_prompts=max_examples)
    except (DpokitError, OSError, ValueError):
        return []
    examples = []
    for item in items:
        examples.append(Example(_label(item.text), item.text, item.prompt))
    return examples


def _label(text: str) -> str:
    label = " ".join(text.split())
    return label if len(label) <= 60 else label[:57] + "..."


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DpokitError(f"{run_dir}: no such run directory")
    if not is_run_dir(run_dir):
        # An experiment folder of ``dpokit recipe`` (e.g. runs/demo) holds several runs: serve its headline one.
        headline = _headline_run(run_dir)
        if headline is None:
            raise DpokitError(f"{run_dir}: not a run directory (no config.yaml)")
        return headline
    return run_dir


def _headline_run(folder: Path) -> Path | None:
    """The headline run of a recipe's folder (``summary.json`` names it), if it is a run directory."""
    import json

    try:
        name = json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("headline_run")
    except (OSError, ValueError, AttributeError):
        return None
    return folder / name if isinstance(name, str) and is_run_dir(folder / name) else None


def load_playground(run_dir: str | Path, ref: str | None = None, reward: str | RewardFn | None = None,
                    limits: Limits | None = None, max_examples: int = 6, precision: str = "auto",
                    note: Callable[[str], None] | None = None) -> Playground:
    """pi (``RUN_DIR/final``), pi_ref (``ref``, else the run's reference), beta and the token budget from the
    run's config, a reward function when named, and example prompts from ``data.eval`` (else ``data.train``).
    ``precision`` of sampling: ``auto`` is bf16 only where it is native (``dpokit.models.hardware``)."""
    from dpokit.models.hardware import resolve_precision

    run_dir = check_run_dir(run_dir)
    reward_fn = get_reward(reward) if reward is not None else None  # a bad name fails before models load
    scorer = load_scorer(run_dir, ref)
    cfg = scorer.config
    assert cfg is not None
    limits = limits or Limits()
    source, split = (cfg.data.eval, cfg.data.eval_split) if cfg.data.eval else (cfg.data.train, cfg.data.train_split)
    vision = None
    if scorer.processor is not None:  # a vision-language run: image prompts, always through the chat template
        vision = VisionInputs(scorer, limits.max_images, limits.max_image_bytes)
        examples = [Example(_label(text), text, prompt, tuple(images)) for text, prompt, images
                    in vision_examples(source, split, max_examples, limits.max_images, limits.max_image_bytes)]
    else:
        examples = load_examples(source, split, max_examples)
    if vision is not None:
        chat = True
    elif examples:
        chat = any(isinstance(e.prompt, list) for e in examples)
    else:
        chat = bool(getattr(scorer.tokenizer, "chat_template", None))
    reference = ref or cfg.model.ref_name_or_path or cfg.model.name_or_path
    precision = resolve_precision(precision, scorer.device, note)
    return Playground(scorer, run_name=run_dir.resolve().name, reference_name=str(reference), reward_fn=reward_fn,
                      reward_label=reward_name(reward) if reward is not None else None, examples=examples, chat=chat,
                      limits=limits, precision=precision, vision=vision)
