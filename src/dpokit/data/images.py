"""Rows with images: the images read and checked, and the row's text brought to the text formats' rules.

Two shapes of row carry images (TRL writes the first):

- ``images``: a list of images, and messages whose ``content`` is a list of parts, ``{"type": "image"}`` or
  ``{"type": "text", "text": ...}``; the number of image parts must equal the number of images (else the row
  is malformed, ``image_mismatch``). A prompt with no image part gets its images where TRL places them: before
  the text of a string prompt, else at the start of the first user message.
- ``image``: one image beside a plain text ``prompt``: the same as ``images`` with one image.

An image is a path relative to the data file's folder (JSONL, JSON, CSV), ``{"bytes": ..., "path": ...}``
(Parquet as ``datasets`` writes an ``Image`` column; ``bytes`` may be base64 text in JSON), raw bytes, or a PIL
image (a ``datasets.Dataset`` given in memory: ``dpokit.data.memory`` writes it as lossless PNG bytes). URLs,
absolute paths and paths that leave the data file's folder are refused (``image_source``): nothing in a row
makes dpokit fetch a URL or open a file elsewhere.

Image parts become one private-use character (:data:`IMAGE_MARK`) in the message text, so every rule of the
text formats (``dpokit.data.formats``: structure, roles, system column, empty and equal responses) runs
unchanged; :func:`as_parts` turns the marks back into parts for the processor's chat template. Images are in
the prompt only: a response with an image part is malformed.

An image that cannot be decoded (``image_unreadable``), whose data ends early (``image_truncated``) or that is
larger than :data:`MAX_IMAGE_BYTES` or :data:`MAX_IMAGE_PIXELS` (``image_too_large``, checked from the header,
before the pixels are decoded) drops its row, counted by reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from pathlib import Path
from typing import Any

from dpokit.data.formats import Message, PreferenceRow, Text
from dpokit.data.load import Record, RowError, _type_name

IMAGE_MARK = "\ue000"
"""Where an image part sits in message text while the text rules run (a private-use character, refused in the
text of an image row)."""

MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""An encoded image larger than this is dropped (``image_too_large``) before it is decoded."""

MAX_IMAGE_PIXELS = 4096 * 4096
"""An image with more pixels than this (its header says) is dropped (``image_too_large``): a processor resizes
every image to a few hundred thousand pixels, so a larger one is a mistake or a decompression bomb."""

IMAGE_KEYS = ("images", "image")


def has_images(row: dict[str, Any]) -> bool:
    return any(key in row for key in IMAGE_KEYS)


def split_images(record: Record, base: Path | None) -> tuple[Record, list[bytes | str]]:
    """The row without its image column and with image parts as :data:`IMAGE_MARK`, and its images' encoded
    bytes in order (a drop reason in place of a file that cannot be read). Raises :class:`RowError` for a malformed row (``image_mismatch``, ``image_source``,
    ``wrong_type``)."""
    loc, row = record.location, dict(record.row)
    if all(key in row for key in IMAGE_KEYS):
        raise RowError(f"{loc}: both 'images' and 'image'; give the images in one column", "image_mismatch")
    if "images" in row:
        values = row.pop("images")
        if values is None:
            values = []
        if not isinstance(values, list):
            raise RowError(f"{loc}: 'images' must be a list of images, got {_type_name(values)}", "wrong_type")
    else:
        values = [row.pop("image")]
    images = [_image_bytes(value, f"{loc}: 'images[{i}]'", base) for i, value in enumerate(values)]
    for key in ("prompt", "chosen", "rejected", "completion", "responses"):
        if key in row:
            row[key] = _marked(row[key], key, loc)
    row["prompt"] = _place_images(row.get("prompt"), len(images))
    return Record(loc, row), images


def _place_images(prompt: Any, n: int) -> Any:
    """A prompt without image parts gets its images where TRL puts them: before the text of a string prompt,
    else at the start of the first user message."""
    if not n or _count_any(prompt):
        return prompt
    if isinstance(prompt, str):
        return IMAGE_MARK * n + prompt
    if isinstance(prompt, list):
        for i, message in enumerate(prompt):
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return [*prompt[:i], {**message, "content": IMAGE_MARK * n + message["content"]}, *prompt[i + 1:]]
    return prompt


def _count_any(value: Any) -> int:
    """Image marks in a marked prompt of any shape (a string, messages, one message)."""
    if isinstance(value, str):
        return value.count(IMAGE_MARK)
    if isinstance(value, dict):
        return _count_any(value.get("content"))
    if isinstance(value, list):
        return sum(_count_any(item) for item in value)
    return 0


def check_marks(row: PreferenceRow, n_images: int) -> None:
    """As many image parts in the prompt as images; none in a response."""
    placed = _count(row.prompt)
    if placed != n_images:
        raise RowError(f"{row.location}: {placed} image placeholder(s) ({{\"type\": \"image\"}}) in the prompt but "
                       f"{n_images} image(s) in 'images'; each image needs one placeholder", "image_mismatch")
    if any(_count(response) for response in row.responses):
        raise RowError(f"{row.location}: an image part in a response; images belong to the prompt",
                       "image_mismatch")


def as_parts(messages: list[Message]) -> list[Message]:
    """Every message's content as a list of parts, the marks as image parts: the shape a processor's chat
    template takes (some, like SmolVLM's, iterate over the parts of every message), as TRL renders it."""
    out = []
    for message in messages:
        content = message["content"]
        if IMAGE_MARK not in content:
            out.append({**message, "content": [{"type": "text", "text": content}]})
            continue
        parts: list[dict[str, str]] = []
        for i, piece in enumerate(content.split(IMAGE_MARK)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({**message, "content": parts})
    return out


def images_digest(images: list[bytes | str]) -> bytes:
    """sha256 over the images' encoded bytes, in order: what makes two rows with the same text differ."""
    digest = hashlib.sha256()
    for data in images:
        raw = data.encode() if isinstance(data, str) else data
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.digest()


def decode(data: bytes | str) -> Any:
    """The image as RGB PIL pixels, or the reason it is dropped (``data`` may already be one)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, str):
        return data
    if len(data) > MAX_IMAGE_BYTES:
        return "image_too_large"
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS or not width or not height:
            return "image_too_large" if width and height else "image_unreadable"
        image.load()
    except Image.DecompressionBombError:
        return "image_too_large"
    except OSError as exc:
        # PIL says "image file is truncated" (or "... bytes not processed") for data that ends early.
        text = str(exc).lower()
        if not isinstance(exc, UnidentifiedImageError) and ("truncated" in text or "not processed" in text):
            return "image_truncated"
        return "image_unreadable"
    except (ValueError, SyntaxError):  # PIL's plugins raise these for corrupt headers
        return "image_unreadable"
    return image.convert("RGB")


def _image_bytes(value: Any, where: str, base: Path | None) -> bytes | str:
    """The encoded bytes of one image value, or the reason its row is dropped: a missing or unreadable file
    (``image_unreadable``, like an image that does not decode), a file over :data:`MAX_IMAGE_BYTES`."""
    if type(value).__module__.startswith("PIL."):
        return png_bytes(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data = value.get("bytes")
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
        if isinstance(data, str):
            try:
                return base64.b64decode(data, validate=True)
            except binascii.Error:
                raise RowError(f"{where}.bytes is not base64 text", "wrong_type") from None
        value = value.get("path")
    if not isinstance(value, str):
        raise RowError(f"{where} must be a path, {{'bytes': ...}} or an image, got {_type_name(value)}",
                       "wrong_type")
    return _read_file(value, where, base)


def _read_file(name: str, where: str, base: Path | None) -> bytes | str:
    if "://" in name or name.startswith("data:"):
        raise RowError(f"{where} is a URL ({name[:60]}); dpokit fetches nothing: give a file next to the data",
                       "image_source")
    path = Path(name)
    if base is None or path.is_absolute() or path.drive:
        raise RowError(f"{where}: {name!r} must be a path relative to the data file's folder", "image_source")
    target = (base / path).resolve()
    if not target.is_relative_to(base.resolve()):
        raise RowError(f"{where}: {name!r} leaves the data file's folder", "image_source")
    try:
        if target.stat().st_size > MAX_IMAGE_BYTES:
            return "image_too_large"  # never read into memory
        return target.read_bytes()
    except OSError:
        return "image_unreadable"


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes: lossless, so the pixels the processor sees are the image's own."""
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):  # CMYK, YCbCr: PNG cannot hold them
        image = image.convert("RGB")  # what decode() makes of any image anyway
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _marked(value: Any, key: str, loc: str) -> Any:
    """``value`` with every content-part list turned into text, image parts as :data:`IMAGE_MARK`."""
    if isinstance(value, str):
        return _plain(value, key, loc)
    if isinstance(value, dict) and "content" in value:
        return {**value, "content": _content(value["content"], key, loc)}
    if isinstance(value, list):
        return [_marked(item, f"{key}[{i}]", loc) for i, item in enumerate(value)]
    return value


def _content(content: Any, key: str, loc: str) -> Any:
    if isinstance(content, str):
        return _plain(content, key, loc)
    if not isinstance(content, list):
        return content  # the text formats say what is wrong with it
    text = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text.append(IMAGE_MARK)
        elif kind == "text" and isinstance(part.get("text"), str):
            text.append(_plain(part["text"], key, loc))
        else:
            raise RowError(f"{loc}: '{key}.content[{i}]' must be {{'type': 'image'}} or {{'type': 'text', 'text': "
                           f"str}}, got {str(part)[:60]}", "wrong_type")
    return "".join(text)


def _plain(text: str, key: str, loc: str) -> str:
    if IMAGE_MARK in text:
        raise RowError(f"{loc}: '{key}' holds U+E000, a private-use character image rows cannot carry",
                       "invalid_text")
    return text


def _count(value: Text) -> int:
    if isinstance(value, str):
        return value.count(IMAGE_MARK)
    return sum(message["content"].count(IMAGE_MARK) for message in value)
