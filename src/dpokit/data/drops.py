"""Why a row is not trained on: the drop reasons, content checks on a normalized row, invisible characters, and
the digest duplicates are found by (the text policy is in ``dpokit.data.formats``'s docstring)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpokit.data.formats import PreferenceRow, Text

# ------------------------------------------------------------------------------------------------------ drops

CONTENT_REASONS = {
    "empty_prompt": "prompt is empty or whitespace only (allowed only for implicit-prompt rows)",
    "empty_response": "a response is empty or whitespace only",
    "chosen_equals_rejected": "chosen and rejected are the same text (after NFC, invisible characters and "
                              "whitespace normalization)",
    "duplicate_responses": "two responses of a ranked row are the same text",
    "all_tied": "every response of a ranked row has the same rank or score: no preference to learn",
    "bidi_override": "text holds a left-to-right/right-to-left override (U+202D/U+202E): it displays in another "
                     "order than the model reads it",
    "duplicate": "the same prompt and responses as an earlier row (data.dedupe)",
    "conflicting_labels": "KTO: the same prompt and completion labelled both desirable and undesirable; every "
                          "such row is dropped (no signal, as when chosen == rejected)",
    "empty_response_after_truncation": "the prompt fills max_length, leaving no response tokens",
    "image_unreadable": "an image that does not decode (not an image, or its file is missing)",
    "image_truncated": "an image whose data ends early",
    "image_too_large": "an image over 32 MiB encoded or 4096 x 4096 pixels (dpokit.data.images)",
    "image_prompt_too_long": "a prompt with images longer than max_prompt_length: cutting it could split an "
                             "image's tokens",
}
"""Why a well-formed row is not trained on. Counted in every ``data.on_error`` mode."""

MALFORMED_REASONS = {
    "malformed_json": "the line is not valid JSON (truncated, or text after the object)",
    "malformed_csv": "a CSV record with more fields than the header",
    "not_utf8": "the line is not valid UTF-8",
    "line_too_long": "the line is longer than data.max_line_bytes",
    "not_an_object": "the row is not a JSON object",
    "missing_key": "a required key is missing",
    "wrong_type": "a value is null or of the wrong type",
    "bad_messages": "bad message structure: unknown role, prompt not ending with a user turn, response not "
                    "from the assistant",
    "invalid_text": "text with a lone surrogate or a NUL character",
    "implicit_prompt": "chosen/rejected without a prompt that cannot be told apart safely: a prompt-like column "
                       "is not mapped (data.columns), or the texts share no dialogue turn marker",
    "mixed_formats": "the row's format differs from the first row's",
    "template_error": "the chat template failed to render the row",
    "image_mismatch": "the number of image placeholders differs from the number of images, or an image part "
                      "in a response",
    "image_source": "an image given as a URL, an absolute path or a path outside the data file's folder",
    "image_data": "a row with images read for a text-only model",
}
"""Why a row is malformed. ``data.on_error: raise`` stops at the first; ``skip`` counts them, up to
``data.max_bad_fraction`` of the rows read."""

DROP_REASONS = {**CONTENT_REASONS, **MALFORMED_REASONS}
"""Every reason a row can be dropped, with what it means (``dpokit data check`` prints these)."""

_INVISIBLE = re.compile("[\u200b\u2060\ufeff]")
_FORMAT_CHARS = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]")
"""Unicode category Cf (format characters: zero-width, bidi controls, soft hyphen, tags), as of Unicode 15.1."""
_BIDI_OVERRIDE = re.compile("[\u202d\u202e]")


def drop_reason(prompt: Text, responses: list[Text], allow_empty_prompt: bool = False) -> str | None:
    """Why this row must not be trained on, or None. Only content is checked here; structure was checked by
    :func:`normalize`, and token budget by the tokenizer step."""
    if not allow_empty_prompt and _blank(prompt):
        return "empty_prompt"
    if any(_blank(r) for r in responses):
        return "empty_response"
    if any(_BIDI_OVERRIDE.search(text) for text in _strings([prompt, *responses])):
        return "bidi_override"
    keys = [_canonical(r) for r in responses]
    if len(set(keys)) < len(keys):
        return "chosen_equals_rejected" if len(keys) == 2 else "duplicate_responses"
    return None


def strip_invisible(row: PreferenceRow) -> bool:
    """Remove zero-width spaces, word joiners and stray BOMs from every text of ``row`` (in place); True if any
    were found."""
    texts = _strings([row.prompt, *row.responses])
    if not any(_INVISIBLE.search(text) for text in texts):
        return False

    def clean(value: Text) -> Text:
        if isinstance(value, str):
            return _INVISIBLE.sub("", value)
        return [{**m, "content": _INVISIBLE.sub("", m["content"])} for m in value]

    row.prompt = clean(row.prompt)
    row.responses = [clean(r) for r in row.responses]
    return True


def row_digest(row: PreferenceRow) -> int:
    """A 64-bit digest of the row as a reader sees it (prompt and responses in order, canonical text, and the
    tie levels when there are ties), for dropping duplicates without keeping the rows. An unpaired row's label
    is not in it: ``dpokit.data.pipeline`` adds it for duplicates and compares it for conflicting labels."""
    parts: list[Any] = [_canonical(row.prompt), [_canonical(r) for r in row.responses]]
    if row.levels is not None:  # a ranking with ties is not the strict ranking of the same texts
        parts.append(row.levels)
    key = json.dumps(parts, ensure_ascii=False)
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _strings(values: list[Text]) -> list[str]:
    out: list[str] = []
    for value in values:
        if isinstance(value, str):
            out.append(value)
        else:
            out.extend(m["content"] for m in value)
    return out


def _blank(value: Text) -> bool:
    if isinstance(value, str):
        return not _visible(value).strip()
    return all(not _visible(m["content"]).strip() for m in value)


def _visible(text: str) -> str:
    """Text without format characters (category Cf: zero-width, bidi marks, soft hyphen); ASCII has none."""
    return text if text.isascii() else _FORMAT_CHARS.sub("", text)


def _canonical(value: Text) -> Any:
    """Text as a reader sees it: NFC (composed and decomposed accents are equal), no invisible format
    characters, whitespace runs collapsed, so "Yes." and "Yes. " count as the same answer."""
    if isinstance(value, str):
        return " ".join(_visible(unicodedata.normalize("NFC", value)).split())
    return tuple((m["role"], _canonical(m["content"])) for m in value)
