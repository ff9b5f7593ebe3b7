"""``dpokit serve RUN_DIR --api``: the run's models behind OpenAI's HTTP API, beside the page on the same port.

Routes (all under ``/v1``, as OpenAI clients expect of a ``base_url`` ending in ``/v1``):

``GET  /v1/models``            the two models: ``policy`` (pi, ``RUN_DIR/final``) and ``reference`` (pi_ref)
``GET  /v1/models/{id}``       one of them
``POST /v1/chat/completions``  messages rendered with the tokenizer's chat template, then sampled
``POST /v1/completions``       a text prompt continued as it is

The run's name (the run directory's) is accepted as another name of ``policy``. Sampling is
``dpokit.models.generate.stream_batch``, the loop behind ``dpokit generate`` and the page: for a request with ``seed``,
choice i is what ``generate`` returns for the i-th copy of the prompt at that seed. ``stream: true`` answers
with server-sent events (``data: {chunk}`` ... ``data: [DONE]``); the text of the chunks joined is the text of
the same request without streaming. Requests share the page's one-job-at-a-time queue and its limits.

What a request may set, and what is refused rather than silently changed:

- ``temperature`` (0..2; 0 is greedy), ``top_p``, ``n`` (at most ``Limits.max_samples``), ``seed`` (without one,
  a fresh seed per request), ``stop`` (up to 4 strings, cut from the text as OpenAI does), ``max_tokens`` (or
  ``max_completion_tokens``), ``stream``, ``stream_options.include_usage``;
- ``max_tokens`` is an upper bound: above the server's (``Limits.max_new_tokens``, and the model's context after
  the prompt) it is lowered to it, and ``finish_reason: "length"`` says where a text was cut. A prompt that
  leaves no room in the model's context is a 400 (``context_length_exceeded``), never truncated;
- ignored, as they change no text: ``user``, ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``,
  ``prompt_cache_key``, ``safety_identifier``, a message's ``name``;
- accepted only at the value that changes nothing, else a 400 naming the field: ``logprobs``, ``top_logprobs``,
  ``echo``, ``suffix``, ``best_of``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``tools``,
  ``tool_choice``, ``functions``, ``function_call``, ``response_format`` (text), ``modalities`` (text). Log
  probabilities of a given text are what ``dpokit score`` computes;
- any other field is a 400, as OpenAI answers unknown arguments;
- a vision-language run's chat messages may hold ``image_url`` parts whose URL is a ``data:`` URL: read, checked
  and tokenized as the page's images (``dpokit.serve.images``); an ``http(s)`` URL is refused (nothing is
  fetched), and so is any image part sent to a text run: no image is dropped silently.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx (404 and
``model_not_found`` for an unknown model) or a 503 with ``Retry-After`` when the queue is full.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dpokit.data.images import IMAGE_MARK
from dpokit.errors import DpokitError
from dpokit.models.generate import SamplingParams, batch_pixels, encode_prompts, eos_token_ids, stream_batch
from dpokit.serve.engine import BadRequest, Emit, Playground, _check_text, _integer, _show
from dpokit.serve.images import ImageRefused, decoded, image_bytes

Kind = Literal["chat", "text"]
MODELS = ("policy", "reference")
MAX_STOPS = 4
"""OpenAI's limit on ``stop`` strings."""
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                     "safety_identifier"})
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"])}
"""Fields dpokit cannot honour, each with the values that ask for nothing it would have to do."""
SAMPLING = ("model", "stream", "stream_options", "n", "temperature", "top_p", "seed", "stop", "max_tokens")
FIELDS = {"chat": {"messages", "max_completion_tokens", *SAMPLING}, "text": {"prompt", *SAMPLING}}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""OpenAI's roles and how the chat template receives them (``developer`` is OpenAI's newer name of system)."""


class ApiError(BadRequest):
    """A refused API request: status, message, and OpenAI's ``param`` and ``code``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message, status)
        self.param, self.code = param, code


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ("authentication_error" if status == 401 else "invalid_request_error" if status < 500
            else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Completion:
    """A checked API request, ready to run."""

    kind: Kind
    model: str
    """The name the request used, echoed back."""
    side: str
    """``policy`` or ``reference``."""
    prompt_ids: list[int]
    n: int
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    pixels: dict[str, torch.Tensor] | None = None
    """The prompt's images' pixel inputs (a vision-language run), given to the model's first forward."""


@dataclass
class OpenAIApi:
    """The API over a :class:`Playground`: request checks (:meth:`prepare`) and the job (:meth:`run`)."""

    playground: Playground

    @property
    def aliases(self) -> dict[str, str]:
        return {self.playground.run_name: "policy", **{m: m for m in MODELS}}

    @property
    def context(self) -> int:
        """Tokens the models attend to at most (prompt and response): the smaller window of pi and pi_ref."""
        scorer = self.playground.scorer
        windows = [getattr(getattr(m, "config", None), "max_position_embeddings", None)
                   for m in (scorer.policy, scorer.reference)]
        known = [w for w in windows if isinstance(w, int) and w > 1]
        return min(known) if known else scorer.max_length

    def models(self) -> list[dict[str, Any]]:
        return [{"id": m, "object": "model", "created": 0, "owned_by": "dpokit"} for m in MODELS]

    # ----------------------------------------------------------------------------------------------- checks

    def prepare(self, payload: Any, kind: Kind) -> Completion:
        """Check a decoded JSON request and tokenize its prompt. Raises :class:`ApiError` naming the field."""
        if not isinstance(payload, dict):
            raise ApiError("the request must be a JSON object")
        for key, value in payload.items():
            if key in NEUTRAL:
                if not any(_same(value, ok) for ok in NEUTRAL[key]):
                    raise ApiError(f"{key}: not supported by dpokit serve (got {_show(value)}); leave it out",
                                   param=key, code="unsupported_parameter")
            elif key not in FIELDS[kind] and key not in IGNORED:
                raise ApiError(f"unknown field {_show(key)}", param=key, code="unknown_parameter")
        model = payload.get("model")
        if not isinstance(model, str):
            raise ApiError(f"model: missing; one of {', '.join(MODELS)}", param="model")
        if model not in self.aliases:
            raise ApiError(f"model {_show(model)} does not exist; this server has {', '.join(MODELS)}", 404,
                           param="model", code="model_not_found")
        prompt = self._messages(payload) if kind == "chat" else self._text(payload)
        prompt_ids, pixels = self._encode(prompt)
        room = self.context - len(prompt_ids)
        if room < 1:
            raise ApiError(f"{'messages' if kind == 'chat' else 'prompt'}: {len(prompt_ids)} tokens leave no room "
                           f"in the model's context of {self.context} tokens", param="messages" if kind == "chat"
                           else "prompt", code="context_length_exceeded")
        stream = _optional(payload, "stream", bool, False)
        options = _optional(payload, "stream_options", dict, {})
        if options and not stream:
            raise ApiError("stream_options: only with stream: true", param="stream_options")
        if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
            raise ApiError("stream_options: expected {\"include_usage\": true or false}", param="stream_options")
        limits = self.playground.limits
        cap = min(limits.max_new_tokens, room)
        key = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
        wanted = _checked(key, _integer_or_none, payload, 1, 2**31 - 1)
        params = SamplingParams(
            max_new_tokens=cap if wanted is None else min(wanted, cap),
            temperature=_checked("temperature", _number_or_none, payload, 0.0, limits.max_temperature, 1.0),
            top_p=_checked("top_p", _number_or_none, payload, 0.0, 1.0, 1.0, True),
            seed=_checked("seed", _integer_or_none, payload, 0, 2**63 - 1) if payload.get("seed") is not None
            else secrets.randbits(63),
            batch_size=1)
        n = _checked("n", _integer_or_none, payload, 1, limits.max_samples) or 1
        params = dataclasses.replace(params, batch_size=n)  # the n choices are one batch
        return Completion(kind, model, self.aliases[model], prompt_ids, n, params, self._stops(payload), stream,
                          bool(options.get("include_usage", False)), pixels)

    def _messages(self, payload: dict[str, Any]) -> tuple[list[dict[str, str]], list[tuple[str, bytes]]]:
        """The messages, their image parts (a vision-language run) as ``IMAGE_MARK`` in the text, and the
        images' (part, encoded bytes) in order."""
        value = payload.get("messages")
        limits = self.playground.limits
        if not isinstance(value, list) or not value:
            raise ApiError("messages: expected a non-empty list of {\"role\", \"content\"}", param="messages")
        if len(value) > limits.max_messages:
            raise ApiError(f"messages: {len(value)}; at most {limits.max_messages}", param="messages")
        messages: list[dict[str, str]] = []
        images: list[tuple[str, bytes]] = []
        for i, message in enumerate(value):
            where = f"messages[{i}]"
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ApiError(f"{where}: expected {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}",
                               param=where)
            extra = sorted(set(message) - {"role", "content", "name"})
            if extra:
                raise ApiError(f"{where}.{extra[0]}: not supported by dpokit serve", param=f"{where}.{extra[0]}")
            content = _content(message.get("content"), where, self._image_reader(images))
            _checked_text(content, f"{where}.content")
            messages.append({"role": ROLES[message["role"]], "content": content})
        total = sum(len(m["content"]) for m in messages)
        if total > limits.max_prompt_chars:
            raise ApiError(f"messages: {total} characters; at most {limits.max_prompt_chars}", param="messages")
        return messages, images

    def _image_reader(self, images: list[tuple[str, bytes]]) -> Any:
        """What reads an ``image_url`` part into ``images`` (and returns its mark); None for a text run."""
        vision = self.playground.vision
        if vision is None:
            return None

        def read(part: dict[str, Any], where: str) -> str:
            url = part.get("image_url")
            url = url if isinstance(url, str) else url.get("url") if isinstance(url, dict) else None
            if isinstance(part.get("image_url"), dict) and part["image_url"].get("detail", "auto") != "auto":
                raise ApiError(f"{where}.image_url.detail: only \"auto\" is supported", param=where)
            if len(images) == vision.max_images:
                raise ApiError(f"{where}: more than {vision.max_images} images in one request", 413, param=where)
            try:
                images.append((where, image_bytes(url, f"{where}.image_url.url", vision.max_image_bytes)))
            except ImageRefused as exc:
                raise ApiError(str(exc), 400 if exc.status == 422 else exc.status, param=where) from None
            return IMAGE_MARK

        return read

    def _text(self, payload: dict[str, Any]) -> str:
        value = payload.get("prompt")
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]  # a batch of one prompt
        if not isinstance(value, str):
            raise ApiError("prompt: expected text (one prompt per request; token lists are not supported)",
                           param="prompt")
        if len(value) > self.playground.limits.max_prompt_chars:
            raise ApiError(f"prompt: {len(value)} characters; at most {self.playground.limits.max_prompt_chars}",
                           param="prompt")
        _checked_text(value, "prompt")
        return value

    def _encode(self, prompt: str | tuple[list[dict[str, str]], list[tuple[str, bytes]]]) \
            -> tuple[list[int], dict[str, torch.Tensor] | None]:
        # As training encodes prompts (BOS rules, the chat template with its generation prompt), with the
        # model's context as the budget: a prompt longer than it comes back one token over, and is refused.
        # A vision-language run's chat prompt goes through its processor, images or not (dpokit.serve.images).
        scorer, vision = self.playground.scorer, self.playground.vision
        if not isinstance(prompt, str):
            prompt, images = prompt
            if vision is not None:
                return self._encode_images(prompt, images)
        try:
            with self.playground.tokenizer_lock:
                return encode_prompts(scorer.tokenizer, [prompt], self.context + 1, self.context + 2)[0], None
        except DpokitError as exc:
            key = "prompt" if isinstance(prompt, str) else "messages"
            raise ApiError(f"{key}: {exc}", param=key) from None

    def _encode_images(self, messages: list[dict[str, str]], images: list[tuple[str, bytes]]) \
            -> tuple[list[int], dict[str, torch.Tensor]]:
        vision = self.playground.vision
        assert vision is not None
        try:
            pictures = [decoded(data, where) for where, data in images]
            with self.playground.tokenizer_lock:
                encoded = vision.encode(messages, pictures, "messages", (self.context + 1, self.context + 2))
        except ImageRefused as exc:
            code = "context_length_exceeded" if "longer than" in str(exc) else None
            raise ApiError(str(exc), 400 if exc.status == 422 else exc.status, param="messages", code=code) from None
        return encoded.prompt_ids, encoded.pixels

    @staticmethod
    def _stops(payload: dict[str, Any]) -> tuple[str, ...]:
        value = payload.get("stop")
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if (not isinstance(stops, list) or len(stops) > MAX_STOPS
                or not all(isinstance(s, str) and s for s in stops)):
            raise ApiError(f"stop: expected a non-empty string or a list of at most {MAX_STOPS}", param="stop")
        return tuple(stops)

    # ---------------------------------------------------------------------------------------------- the job

    def run(self, request: Completion, emit: Emit, cancelled: threading.Event) -> None:
        """Sample n choices from the model the request names. Events: ``delta`` ({"deltas": [[i, text]]}) as
        text becomes final, then ``final`` ({"choices": [{"text", "finish_reason", "tokens"}]})."""
        scorer = self.playground.scorer
        model = scorer.policy if request.side == "policy" else scorer.reference
        eos = eos_token_ids(model, scorer.tokenizer)
        pixels = batch_pixels([request.pixels] * request.n) if request.pixels else None
        stream = stream_batch(model, [request.prompt_ids] * request.n, request.params, scorer.pad_id, eos,
                              torch.Generator().manual_seed(request.params.seed), pixels)
        choices = [StopText(scorer.tokenizer, request.stop, set(eos)) for _ in range(request.n)]
        try:
            while not all(c.finish for c in choices):
                if cancelled.is_set():
                    return
                with torch.autocast(scorer.device.type, dtype=torch.bfloat16,
                                    enabled=self.playground.precision == "bf16"):
                    step = next(stream, None)
                if step is None:
                    break
                with self.playground.tokenizer_lock:
                    deltas = [[i, c.push(token)] for i, (c, token) in enumerate(zip(choices, step))
                              if token is not None and not c.finish]
                deltas = [d for d in deltas if d[1]]
                if deltas:
                    emit({"type": "delta", "deltas": deltas})
        finally:
            stream.close()
        with self.playground.tokenizer_lock:
            last = [[i, c.end()] for i, c in enumerate(choices)]
        if any(d[1] for d in last):
            emit({"type": "delta", "deltas": [d for d in last if d[1]]})
        emit({"type": "final", "choices": [{"text": c.text, "finish_reason": c.finish, "tokens": len(c.ids)}
                                           for c in choices]})


class StopText:
    """One choice's text as it grows, handed out in pieces that are final: a piece that could be the start
    of a stop string, or half a multi-byte character (U+FFFD until its last byte), waits for the next token.
    The text ends before the first stop string (which is not part of it, as with OpenAI) or at EOS."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], eos: set[int]) -> None:
        self.tokenizer, self.stops, self.eos = tokenizer, stops, eos
        self.ids: list[int] = []
        self.text = ""
        """What was handed out so far: every piece joined."""
        self.finish: str | None = None

    def push(self, token: int) -> str:
        self.ids.append(token)
        if token in self.eos:
            return self.end("stop")
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (decoded.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return self._hand_out(decoded[:cut], "stop")
        held = max((k for s in self.stops for k in range(1, len(s)) if decoded.endswith(s[:k])), default=0)
        visible = decoded[:len(decoded) - held]
        if visible.endswith("\ufffd"):
            return ""
        return self._hand_out(visible)

    def end(self, reason: str = "length") -> str:
        """The rest of the text, once no token follows (``length``: max_tokens ran out)."""
        if self.finish:
            return ""
        return self._hand_out(self.tokenizer.decode(self.ids, skip_special_tokens=True), reason)

    def _hand_out(self, text: str, finish: str | None = None) -> str:
        # Decoding more tokens does not rewrite the text before them (byte-level BPE), so the new piece is
        # what follows what was handed out; should it ever, nothing is taken back.
        piece = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += piece
        self.finish = finish
        return piece


def _same(value: Any, neutral: Any) -> bool:
    """``value`` is the neutral value: equal, and a boolean only where one is meant (``0 == False`` in Python,
    but ``logprobs: 0`` asks a completion for log-probabilities); 0.0 and 0 are one JSON number."""
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def _content(value: Any, where: str, image: Any = None) -> str:
    """A message's content: text, or a list of text parts (joined, as OpenAI reads them) and, for a
    vision-language run (``image`` reads one), ``image_url`` parts, each an ``IMAGE_MARK`` where it stands."""
    if isinstance(value, str):
        return _unmarked(value, where, image)
    if not isinstance(value, list):
        raise ApiError(f"{where}.content: expected text or a list of {{\"type\": \"text\", \"text\": ...}} parts",
                       param=f"{where}.content")
    pieces = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(_unmarked(part["text"], where, image))
        elif kind == "image_url" and image is not None:
            pieces.append(image(part, f"{where}.content[{j}]"))
        elif kind in ("image_url", "image", "input_image"):
            raise ApiError(f"{where}.content[{j}]: an image, but this run's model reads text only; send text",
                           param=f"{where}.content")
        else:
            raise ApiError(f"{where}.content[{j}]: expected {{\"type\": \"text\", \"text\": ...}}"
                           + (" or {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:...\"}}" if image
                              else ""), param=f"{where}.content")
    return "".join(pieces)


def _unmarked(text: str, where: str, image: Any) -> str:
    # In a vision-language run IMAGE_MARK stands for an image part: typed text must not fake one.
    if image is not None and IMAGE_MARK in text:
        raise ApiError(f"{where}.content: holds U+E000, a private-use character that image prompts cannot carry",
                       param=f"{where}.content")
    return text


def _checked_text(text: str, key: str) -> None:
    try:
        _check_text(text, key)
    except BadRequest as exc:
        raise ApiError(str(exc), param=key.split(".")[0]) from None


def _optional(payload: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = payload.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ApiError(f"{key}: expected {kind.__name__}, got {_show(value)}", param=key)
    return value


def _checked(key: str, check: Any, payload: dict[str, Any], *args: Any) -> Any:
    try:
        return check(payload.get(key), key, *args)
    except BadRequest as exc:
        raise ApiError(str(exc), param=key) from None


def _number_or_none(value: Any, key: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{key}: expected a number, got {_show(value)}")
    if value > high or value < low or (low_open and value == low):
        raise BadRequest(f"{key}: must be {'more than' if low_open else 'at least'} {low:g} and at most "
                         f"{high:g}, got {_show(value)}")
    return float(value)


def _integer_or_none(value: Any, key: str, low: int, high: int) -> int | None:
    """The page's whole-number check (``engine._integer``), with null meaning "not given"."""
    return None if value is None else _integer({key: value}, key, low, high)
