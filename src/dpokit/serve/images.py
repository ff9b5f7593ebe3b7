"""Image prompts in ``dpokit serve`` (a vision-language run): the images a request sends, checked, placed in the
prompt, tokenized and scored exactly as training reads an image row.

A request sends each image itself, as a ``data:`` URL (``data:image/png;base64,...``) or bare base64 text: the
server fetches nothing, so a URL is refused. What is read from the image and the row reuses the data layer:

- the type: the bytes must be a PNG, JPEG, WebP or GIF (read from their first bytes; a ``data:`` URL's media
  type must say the same), else 415;
- the size: at most ``Limits.max_image_bytes`` encoded (413) and ``Limits.max_images`` per request (413); the
  pixel limit, a truncated or unreadable image are ``dpokit.data.images.decode``'s checks, the ones that drop a
  training row;
- the placement: ``dpokit.data.images.split_images``, as for a training row: ``{"type": "image"}`` parts in a
  message's content where the images go, else all of them at the start of the first user message; as many
  parts as images (``check_marks``, else 422 naming ``images``);
- the tokens and pixel inputs: ``dpokit.data.vision.encode_vision``, the processor call and the rules of
  training (BOS, end of turn, a prompt longer than ``data.max_prompt_length`` refused rather than cut, which
  could separate an image's tokens from its pixels).

Each response is scored as its own one-response row through the same ``encode_vision`` and
``Scorer.implicit_rewards`` with the prompt's pixel inputs: the implicit reward training would log for that
prompt, image and text.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dpokit.data.config import DataConfig
from dpokit.data.formats import Message, PreferenceRow, Text
from dpokit.data.images import (
    IMAGE_MARK,
    MAX_IMAGE_PIXELS,
    as_parts,
    check_marks,
    decode,
    has_images,
    split_images,
)
from dpokit.data.load import Record, RowError, iter_records
from dpokit.data.vision import encode_vision, vision_rules
from dpokit.errors import DpokitError
from dpokit.evaluate.scoring import Scorer

TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WebP", "image/gif": "GIF"}
"""The image types a request may send, by media type (what the page's file picker accepts)."""

REFUSED = {"image_unreadable": (422, "cannot be read as an image"),
           "image_truncated": (422, "the image data ends early (truncated)"),
           "image_too_large": (413, f"more than {MAX_IMAGE_PIXELS} pixels (its header says)")}
"""``dpokit.data.images.decode``'s drop reasons as answers: status and message."""


class ImageRefused(DpokitError):
    """A refused image or image prompt: the status and one line naming the field (the engine's BadRequest)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def sniff(data: bytes) -> str | None:
    """The type of encoded image data from its first bytes (one of :data:`TYPES`' values), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def image_bytes(value: Any, where: str, max_bytes: int) -> bytes:
    """The encoded bytes of one sent image (a ``data:`` URL or base64 text), type- and size-checked."""
    if not isinstance(value, str):
        raise ImageRefused(f"{where}: expected a data: URL (data:image/png;base64,...) or base64 text, got "
                           f"{type(value).__name__}")
    if value[:8].lower().startswith(("http://", "https://")) or "://" in value[:16]:
        raise ImageRefused(f"{where}: a URL; dpokit serve fetches nothing: send the image itself as a data: URL "
                           "(data:image/png;base64,...)")
    declared = None
    if value[:5].lower() == "data:":
        head, comma, value = value.partition(",")
        declared = head[5:].lower().removesuffix(";base64")
        if not comma or not head.lower().endswith(";base64"):
            raise ImageRefused(f"{where}: a data: URL must hold base64 data (data:image/png;base64,...)")
        if declared not in TYPES:
            raise ImageRefused(f"{where}: {declared or 'no media type'}; send a PNG, JPEG, WebP or GIF image", 415)
    if len(value) > 4 * -(-max_bytes // 3):  # refused before decoding
        raise ImageRefused(f"{where}: about {_mib(len(value) * 3 // 4)}; at most {_mib(max_bytes)}", 413)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefused(f"{where}: not base64 text") from None
    if len(data) > max_bytes:
        raise ImageRefused(f"{where}: {_mib(len(data))}; at most {_mib(max_bytes)}", 413)
    kind = sniff(data)
    if kind is None:
        raise ImageRefused(f"{where}: not a PNG, JPEG, WebP or GIF image", 415)
    if declared is not None and TYPES[declared] != kind:
        raise ImageRefused(f"{where}: says {declared} but holds a {kind} image", 415)
    return data


def decoded(data: bytes, where: str) -> Any:
    """The image's RGB pixels (``dpokit.data.images.decode``), or its refusal."""
    image = decode(data)
    if isinstance(image, str):
        status, message = REFUSED.get(image, (422, image))
        raise ImageRefused(f"{where}: {message}", status)
    return image


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.2g} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def data_url(data: bytes) -> str:
    kind = sniff(data)
    media = next((m for m, k in TYPES.items() if k == kind), "application/octet-stream")
    return f"data:{media};base64,{base64.b64encode(data).decode('ascii')}"


def refuse_images(payload: dict[str, Any], where: str = "images") -> None:
    """A text-only run: images in a request are refused, never ignored."""
    if "images" in payload:
        raise ImageRefused(f"{where}: this run's model reads text only; send the prompt without images")
    if has_image_parts(payload.get("prompt")):
        raise ImageRefused("prompt: has an image part ({\"type\": \"image\"}) but this run's model reads text only")


def has_image_parts(prompt: Any) -> bool:
    """Whether a prompt's messages hold image parts (read flat: a request may nest lists thousands deep)."""
    messages = prompt if isinstance(prompt, list) else [prompt]
    return any(isinstance(part, dict) and part.get("type") in ("image", "image_url")
               for message in messages if isinstance(message, dict) and isinstance(message.get("content"), list)
               for part in message["content"])


@dataclass(frozen=True)
class ImagePrompt:
    """A checked image prompt: its messages (image parts as ``IMAGE_MARK``), decoded images, tokens and pixels."""

    messages: list[Message]
    images: list[Any]
    prompt_ids: list[int]
    pixels: dict[str, torch.Tensor]

    @property
    def text(self) -> str:
        """The prompt's text as a reward function reads it (the images left out)."""
        parts = [m["content"].replace(IMAGE_MARK, "") for m in self.messages]
        return parts[0] if len(parts) == 1 else "\n\n".join(f"{m['role']}: {p}" for m, p in zip(self.messages, parts))


@dataclass
class VisionInputs:
    """What a vision-language run needs to read a request's images: the processor, its token rules, the run's
    token budget and the limits."""

    scorer: Scorer
    max_images: int
    max_image_bytes: int

    def __post_init__(self) -> None:
        self.processor = self.scorer.processor
        self.rules = vision_rules(self.processor)

    def info(self) -> dict[str, Any]:
        return {"max_images": self.max_images, "max_image_bytes": self.max_image_bytes, "types": list(TYPES)}

    def read(self, values: Any, where: str = "images") -> list[bytes]:
        if values is None:
            return []
        if not isinstance(values, list):
            raise ImageRefused(f"{where}: expected a list of images (data: URLs or base64 text)")
        if len(values) > self.max_images:
            raise ImageRefused(f"{where}: {len(values)} images; at most {self.max_images}", 413)
        return [image_bytes(value, f"{where}[{i}]", self.max_image_bytes) for i, value in enumerate(values)]

    def prepare(self, prompt: Any, images: Any, check_prompt: Callable[[Any], Text]) -> ImagePrompt:
        """The page's request: ``prompt`` (text or messages whose content may hold image parts) and ``images``.
        ``check_prompt`` is the text prompt's own check (structure, length, characters)."""
        raw = self.read(images)
        if isinstance(prompt, list) and not all(isinstance(m, dict) for m in prompt):
            check_prompt(prompt)  # refuses it (split_images would descend into nested lists)
        try:
            record, _ = split_images(Record("request", {"prompt": prompt, "images": raw}), None)
        except RowError as err:
            raise ImageRefused(str(err).removeprefix("request: ")) from None
        checked = check_prompt(record.row["prompt"])
        messages = [{"role": "user", "content": checked}] if isinstance(checked, str) else checked
        try:
            check_marks(SimpleNamespace(prompt=messages, responses=[], location="images"), len(raw))
        except RowError as err:
            raise ImageRefused(str(err)) from None
        return self.encode(messages, [decoded(data, f"images[{i}]") for i, data in enumerate(raw)])

    def encode(self, messages: list[Message], images: list[Any], key: str = "prompt",
               lengths: tuple[int, int] | None = None) -> ImagePrompt:
        """Tokenize the prompt as training does; ``lengths``: (max_prompt_length, max_length), the run's by
        default."""
        encoded = self._encode(messages, images, "", lengths)
        if isinstance(encoded, RowError):
            raise ImageRefused(f"{key}: {str(encoded).removeprefix('request: ')}")
        if isinstance(encoded, str):
            budget = lengths[0] if lengths else self.scorer.max_prompt_length
            raise ImageRefused(f"{key}: with its image tokens longer than {budget} tokens "
                               f"({'the model' if lengths else 'the run'}'s limit; an image prompt is never cut)")
        return ImagePrompt(messages, images, encoded.prompt_ids, encoded.pixels)

    def _encode(self, messages: list[Message], images: list[Any], response: str,
                lengths: tuple[int, int] | None = None) -> Any:
        """``encode_vision`` of a one-response row: its ``VisionEncoded``, a drop reason, or the ``RowError`` of
        a chat template that fails."""
        max_prompt, max_length = lengths or (self.scorer.max_prompt_length, self.scorer.max_length)
        row = PreferenceRow(messages, [[{"role": "assistant", "content": response}]], "request", "conversational")
        data_cfg = DataConfig(max_length=max_length, max_prompt_length=max_prompt)
        try:
            encoded = encode_vision(row, images, self.processor, self.rules, data_cfg)
        except DpokitError as exc:
            raise ImageRefused(f"prompt: {exc}") from None
        return encoded

    def score(self, prompt: ImagePrompt, responses: Sequence[str]) -> list[dict[str, Any]]:
        """Each response's implicit reward as training computes it for this prompt and its images, in the shape
        of ``dpokit.evaluate.scoring.score_rows``' ``{"prompt", "response"}`` rows (or ``dropped``)."""
        rows: list[dict[str, Any]] = []
        kept = []
        for text in responses:
            encoded = "invalid_text" if IMAGE_MARK in text else self._encode(prompt.messages, prompt.images, text)
            if isinstance(encoded, RowError):
                encoded = encoded.reason
            rows.append({"dropped": encoded} if isinstance(encoded, str) else {})
            if not isinstance(encoded, str):
                kept.append((len(rows) - 1, encoded))
        if kept:
            scores = self.scorer.implicit_rewards([e.prompt_ids for _, e in kept],
                                                  [e.responses_ids[0] for _, e in kept], [e.pixels for _, e in kept])
            for j, (i, _) in enumerate(kept):
                rows[i] = {"reward": float(scores["rewards"][j]), "policy_logp": float(scores["policy_logps"][j]),
                           "ref_logp": float(scores["ref_logps"][j]),
                           "response_tokens": int(scores["n_tokens"][j])}
        return rows


def vision_examples(source: str | None, split: str, max_examples: int, max_images: int,
                    max_image_bytes: int) -> list[tuple[str, list[dict[str, Any]], list[str]]]:
    """Distinct image prompts of the run's data file: (text, prompt with image parts, images as data: URLs).
    Rows whose images are missing, too many or over the request limit are passed over: an example must be
    a request the server accepts."""
    if not source or not Path(source).is_file():
        return []
    seen: set[str] = set()
    out = []
    try:
        for record in iter_records(source, split):
            if not has_images(record.row):
                continue
            try:
                marked, images = split_images(record, Path(source).parent)
            except RowError:
                continue
            prompt = marked.row.get("prompt")
            if (not isinstance(prompt, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                        for m in prompt) or len(images) > max_images
                    or any(isinstance(d, str) or len(d) > max_image_bytes or sniff(d) is None for d in images)):
                continue
            urls = [data_url(d) for d in images if isinstance(d, bytes)]
            key = repr((prompt, urls))
            if key in seen:
                continue
            seen.add(key)
            parts = as_parts([dict(m) for m in prompt])
            text = " ".join(m["content"].replace(IMAGE_MARK, " ") for m in prompt if m.get("role") == "user")
            out.append((" ".join(text.split()), parts, urls))
            if len(out) >= max_examples:
                break
    except (DpokitError, OSError, ValueError):
        return out
    return out

