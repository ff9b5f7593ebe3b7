"""Normalize the preference formats into one shape, and decide which rows are unusable.

Formats (detected per row from its keys and value types; ``dpokit.data.pipeline`` rejects a file that mixes
them):

===========================  ====================================================================================
``standard``                 ``{"prompt": str, "chosen": str, "rejected": str}``
``conversational``           ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``; also
                             accepted: string responses (taken as one assistant turn), a single message dict,
                             a string prompt with assistant-only message responses (taken as one user turn),
                             and responses that repeat the prompt's messages first (they are removed)
``implicit_prompt``          ``{"chosen": str, "rejected": str}`` sharing a prefix, e.g. Anthropic HH-RLHF
``implicit_conversational``  ``{"chosen": [messages], "rejected": [messages]}`` sharing leading messages; also a
                             string ``prompt`` next to full-conversation lists (UltraFeedback-binarized style),
                             where the lists are the source of truth
``ranked``                   ``{"prompt": str, "responses": [str, ...], "ranking" | "scores": [...]}``
``ranked_conversational``    the same with messages
``unpaired``                 ``{"prompt": str, "completion": str, "label": true | false}``: one response, desirable
                             (true) or not (KTO); ``label`` must be a JSON boolean
``unpaired_conversational``  the same with messages (a string completion is one assistant turn)
===========================  ====================================================================================

Every format becomes one :class:`PreferenceRow`: a prompt and its responses in preference order, best first (a
pair is two responses, chosen first). Ties never become preferences: a ranking with equal ranks or equal scores
keeps the tie in :attr:`PreferenceRow.levels`, and only its strict comparisons are trained (:func:`strict_pairs`);
a ranking whose responses are all tied is dropped (``all_tied``).

A message is ``{"role": str, "content": str, ...}`` with a role in :data:`ROLES`; extra keys (``name``, ...) are
passed to the chat template. Content must be a string: multimodal parts (image URLs, file paths) are refused, so
nothing in a row can make dpokit open a file or a URL. Extra row keys (``id``, ``score_chosen``, ...) are ignored.

A structurally wrong row is a :class:`~dpokit.data.load.RowError` naming ``path:line`` and the key, with one of
the :data:`MALFORMED_REASONS` (``data.on_error: skip`` counts it instead of stopping). A well-formed but unusable
row is *dropped and counted* by :func:`drop_reason` (:data:`CONTENT_REASONS`).

Text policy, per character class (decided here, tested in ``tests/test_bad_input.py``):

- lone surrogates (JSON ``"\\ud800"``) and NUL: not text (no UTF-8 encoding exists for a lone surrogate; NUL is
  a mark of binary or corrupted data) -> malformed, ``invalid_text``;
- U+200B ZERO WIDTH SPACE, U+2060 WORD JOINER, U+FEFF (a byte-order mark inside text, left by concatenating
  files): invisible scraping artifacts a model would learn to emit -> removed, the row counted in the report's
  ``invisible_stripped``. U+200C/U+200D (ZWNJ/ZWJ) are kept: Persian and Indic spelling and emoji sequences
  (woman + ZWJ + laptop) need them;
- U+202D/U+202E (left-to-right / right-to-left OVERRIDE): they make text display in an order other than the one
  the model reads ("Trojan Source", CVE-2021-42574), so a reviewer cannot see what is trained on -> row dropped,
  ``bidi_override``. Marks, embeddings and isolates (U+200E/F, U+202A-C, U+2066-9) are ordinary in Arabic and
  Hebrew text and kept.

"chosen == rejected" compares texts as a reader sees them: NFC (composed and decomposed accents are equal),
invisible format characters (Unicode category Cf) removed, whitespace runs collapsed and ends stripped. Not NFKC:
it folds "x²" into "x2" and "½" into "1⁄2", answers a grader tells apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from dpokit.data.load import Record, RowError, _type_name

Message = dict[str, Any]
Text = str | list[Message]
"""A prompt or a response: plain text, or a list of chat messages."""

PROMPT_END_ROLES = ("user", "system", "tool")
"""A prompt must end with a turn the assistant answers."""

ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
"""Message roles the chat templates of common models know (OpenAI's ``developer``/``function``, Llama 3.1's
``ipython``); any other role is a malformed row, not something to pass to a template to guess about."""

HH_ASSISTANT = "Assistant:"
"""The turn marker of Anthropic HH-RLHF; implicit-prompt strings are split just after its last occurrence."""


@dataclass
class PreferenceRow:
    """One prompt with K >= 2 responses in preference order, best first; a pair is K = 2, chosen first.
    ``prompt`` and the responses are all ``str`` (plain text) or all message lists (chat template applied at
    tokenization)."""

    prompt: Text
    responses: list[Text]
    """Best first. Responses of one tie level keep their file order."""
    location: str
    """``path:line`` or ``path:row N``."""
    format: str
    """The format the row was read in (the table above)."""
    levels: list[int] | None = None
    """Tie level of each response, best first (``[0, 0, 1]``: the first two tied, both better than the third);
    None when the order is strict, as for every pair."""
    label: bool | None = None
    """Unpaired rows only (K = 1): whether the one response is desirable."""

    @property
    def chosen(self) -> Text:
        return self.responses[0]

    @property
    def rejected(self) -> Text:
        return self.responses[-1]


def normalize(record: Record) -> PreferenceRow:
    """Detect the format of one raw row and bring it to a :class:`PreferenceRow`."""
    row, loc = record.row, record.location
    if "responses" in row:
        return _ranked(row, loc)
    if "completion" in row or "label" in row:
        return _unpaired(row, loc)
    if "chosen" not in row and "rejected" not in row:
        raise RowError(f"{loc}: no preference fields; expected 'prompt', 'chosen', 'rejected' (or 'chosen' and "
                       f"'rejected' alone, or 'responses' with 'ranking'/'scores'); found keys {_keys(row)}",
                       "missing_key")
    chosen = _text(row, "chosen", loc)
    rejected = _text(row, "rejected", loc)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError(f"{loc}: 'chosen' and 'rejected' must both be strings or both be lists of messages",
                       "wrong_type")
    if "prompt" not in row:
        if isinstance(chosen, str):
            assert isinstance(rejected, str)
            prompt, chosen, rejected = split_implicit(chosen, rejected)
            return PreferenceRow(prompt, [chosen, rejected], loc, "implicit_prompt")
        return _implicit_messages(chosen, rejected, loc)
    prompt = _text(row, "prompt", loc)
    if isinstance(prompt, str) and isinstance(chosen, str):
        return PreferenceRow(prompt, [chosen, rejected], loc, "standard")
    if isinstance(prompt, str):
        assert isinstance(chosen, list) and isinstance(rejected, list)
        if not (chosen and chosen[0]["role"] == "assistant"):
            # The lists hold the whole conversation (UltraFeedback-binarized); the string is a copy of its
            # first user turn, so the lists decide where the prompt ends.
            return _implicit_messages(chosen, rejected, loc)
        prompt = [{"role": "user", "content": prompt}]
    assert isinstance(prompt, list)
    chosen, rejected = (_as_turns(r, prompt) for r in (chosen, rejected))
    _check_turns(prompt, {"chosen": chosen, "rejected": rejected}, loc)
    return PreferenceRow(prompt, [chosen, rejected], loc, "conversational")


def _unpaired(row: dict[str, Any], loc: str) -> PreferenceRow:
    """``{"prompt", "completion", "label"}``: one response labelled desirable (true) or undesirable (false)."""
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise RowError(f"{loc}: unpaired rows need 'prompt', 'completion' and 'label'; missing '{key}' "
                           f"(found keys {_keys(row)})", "missing_key")
    label = row["label"]
    if not isinstance(label, bool):
        raise RowError(f"{loc}: 'label' must be true or false, got {_describe(label)} {_clip(repr(label))}",
                       "wrong_type")
    prompt, completion = _text(row, "prompt", loc), _text(row, "completion", loc)
    if isinstance(prompt, str) and isinstance(completion, str):
        return PreferenceRow(prompt, [completion], loc, "unpaired", label=label)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    turns = _as_turns(completion, prompt)
    _check_turns(prompt, {"completion": turns}, loc)
    return PreferenceRow(prompt, [turns], loc, "unpaired_conversational", label=label)


# ---------------------------------------------------------------------------------------------- implicit prompt

def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two full texts into (prompt, chosen response, rejected response) at their shared prefix.

    The cut is just after the last ``"Assistant:"`` inside the common prefix (HH-RLHF:
    ``"\\n\\nHuman: q\\n\\nAssistant:"`` | ``" answer"``), otherwise at the start of the last whitespace run in the
    common prefix, so the prompt does not end in whitespace and a byte-level BPE keeps its usual ``" word"``
    tokens at the join. No whitespace in the common prefix gives an empty prompt.
    """
    prefix = os.path.commonprefix([chosen, rejected])  # character-wise for strings
    marker = prefix.rfind(HH_ASSISTANT)
    if marker >= 0:
        cut = marker + len(HH_ASSISTANT)
    else:
        runs = list(re.finditer(r"\s+", prefix))
        cut = runs[-1].start() if runs else 0
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _implicit_messages(chosen: list[Message], rejected: list[Message], loc: str) -> PreferenceRow:
    """The shared leading messages are the prompt; each side keeps at least one message as its response."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and _same_message(chosen[k], rejected[k]):
        k += 1
    first_difference = k
    # Shared assistant turns at the end of the shared part belong to the responses (a prompt ends in a turn the
    # assistant answers).
    while k and chosen[k - 1]["role"] == "assistant":
        k -= 1
    prompt, chosen_turns, rejected_turns = chosen[:k], chosen[k:], rejected[k:]
    for key, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
        for i, message in enumerate(turns):
            if message["role"] != "assistant":
                raise RowError(f"{loc}: '{key}[{k + i}]' is a '{message['role']}' turn, but chosen and rejected "
                               f"first differ at message {first_difference}; only final assistant turns may differ",
                               "bad_messages")
    _check_turns(prompt, {"chosen": chosen_turns, "rejected": rejected_turns}, loc, offset=k,
                 allow_empty_prompt=True)
    return PreferenceRow(prompt, [chosen_turns, rejected_turns], loc, "implicit_conversational")


def _same_message(a: Message, b: Message) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]


# ------------------------------------------------------------------------------------------------------ ranked

def _ranked(row: dict[str, Any], loc: str) -> PreferenceRow:
    prompt = _text(row, "prompt", loc)
    raw = _value(row, "responses", loc)
    if not isinstance(raw, list) or len(raw) < 2:
        raise RowError(f"{loc}: 'responses' must be a list of at least 2 responses, got {_describe(raw)}",
                       "wrong_type")
    responses = [_text_value(value, f"responses[{i}]", loc) for i, value in enumerate(raw)]
    key = "ranking" if "ranking" in row else "scores" if "scores" in row else None
    if key is None:
        raise RowError(f"{loc}: ranked rows need 'ranking' (rank of each response, lower is better) or "
                       "'scores' (higher is better)", "missing_key")
    values = _value(row, key, loc)
    if (not isinstance(values, list) or len(values) != len(responses)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in values)):
        raise RowError(f"{loc}: '{key}' must be a list of {len(responses)} numbers, one per response",
                       "wrong_type")
    sign = -1 if key == "scores" else 1
    order = sorted(range(len(responses)), key=lambda i: sign * values[i])  # stable: ties keep file order
    responses = [responses[i] for i in order]
    levels = _tie_levels([values[i] for i in order])
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses):
        return PreferenceRow(prompt, responses, loc, "ranked", levels)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    turns = [_as_turns(r, prompt) for r in responses]
    _check_turns(prompt, {f"responses[{order[i]}]": t for i, t in enumerate(turns)}, loc)
    return PreferenceRow(prompt, list(turns), loc, "ranked_conversational", levels)


def _tie_levels(sorted_values: list[float]) -> list[int] | None:
    """Level of each (sorted) value, counting distinct values: ``[1, 1, 3]`` -> ``[0, 0, 1]``; None if all
    differ. Values compare exactly: 0.1 + 0.2 and 0.3 are not a tie."""
    levels = [0]
    for before, value in zip(sorted_values, sorted_values[1:]):
        levels.append(levels[-1] + (value != before))
    return levels if levels[-1] < len(levels) - 1 else None


def strict_pairs(levels: list[int]) -> tuple[list[tuple[int, int]], int]:
    """The comparisons a tied ranking trains: ``(better, worse)`` index pairs between responses of different
    levels, each once, best first (``[0, 0, 1]`` -> ``[(0, 2), (1, 2)]``), and how many comparisons are tied
    and so not trained (here 1). Each pair is a K = 2 group, which the Plackett-Luce loss trains exactly as
    the sigmoid DPO loss. A tie says nothing about which response is better, and putting tied responses in
    one Plackett-Luce ranking would teach file order as a preference."""
    k = len(levels)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k) if levels[i] < levels[j]]
    return pairs, k * (k - 1) // 2 - len(pairs)


# -------------------------------------------------------------------------------------------------- validation

def _value(row: dict[str, Any], key: str, loc: str) -> Any:
    if key not in row:
        raise RowError(f"{loc}: missing key '{key}'", "missing_key")
    value = row[key]
    if value is None:
        raise RowError(f"{loc}: '{key}' is null", "wrong_type")
    return value


def _text(row: dict[str, Any], key: str, loc: str) -> Text:
    return _text_value(_value(row, key, loc), key, loc)


def _text_value(value: Any, key: str, loc: str) -> Text:
    """A string, or a list of messages (a single message dict counts as a list of one)."""
    if isinstance(value, str):
        _check_text(value, key, loc)
        return value
    if isinstance(value, dict) and "role" in value:
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"{loc}: '{key}' must be a string or a list of messages, got {_describe(value)}",
                       "wrong_type")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{loc}: '{key}[{i}]' must be a message {{'role': ..., 'content': ...}}, "
                           f"got {_describe(message)}", "wrong_type")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                got = "missing" if field not in message else _describe(message[field])
                raise RowError(f"{loc}: '{key}[{i}].{field}' must be a string, got {got}",
                               "missing_key" if field not in message else "wrong_type")
        if message["role"] not in ROLES:
            raise RowError(f"{loc}: '{key}[{i}].role' is '{_clip(message['role'])}'; expected one of "
                           f"{', '.join(ROLES)}", "bad_messages")
        _check_text(message["content"], f"{key}[{i}].content", loc)
    return value


_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def not_text(text: str) -> str | None:
    """What makes ``text`` not text, e.g. "a lone surrogate (U+D800) at character 3", or None. Lone surrogates
    cannot be encoded (the tokenizer would crash on them); NUL marks binary or corrupt data. ``dpokit serve``
    refuses the same characters in a request."""
    bad = _NOT_TEXT.search(text)
    if bad is None:
        return None
    char = bad.group()
    what = "a NUL character (U+0000)" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    return f"{what} at character {bad.start()}"


def _check_text(text: str, key: str, loc: str) -> None:
    problem = not_text(text)
    if problem is not None:
        raise RowError(f"{loc}: '{key}' contains {problem}, which is not text", "invalid_text")


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _as_turns(response: Text, prompt: list[Message]) -> list[Message]:
    """A response as assistant messages: a string becomes one assistant turn; a list that repeats the prompt's
    messages first (some datasets store the whole conversation) loses that copy."""
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    n = len(prompt)
    if len(response) > n and all(_same_message(a, b) for a, b in zip(response[:n], prompt)):
        return response[n:]
    return response


def _check_turns(prompt: list[Message], responses: dict[str, list[Message]], loc: str, offset: int = 0,
                 allow_empty_prompt: bool = False) -> None:
    """The prompt ends with a turn the assistant answers; every response is assistant turns only."""
    if not prompt and not allow_empty_prompt:
        raise RowError(f"{loc}: 'prompt' is an empty list of messages", "bad_messages")
    if prompt and prompt[-1]["role"] not in PROMPT_END_ROLES:
        raise RowError(f"{loc}: 'prompt' must end with a user turn (or system/tool), not "
                       f"'{prompt[-1]['role']}'", "bad_messages")
    for key, turns in responses.items():
        if not turns:
            raise RowError(f"{loc}: '{key}' is an empty list of messages", "bad_messages")
        for i, message in enumerate(turns):
            if message["role"] != "assistant":
                raise RowError(f"{loc}: '{key}[{i + offset}]' must be an assistant turn, got role "
                               f"'{message['role']}'", "bad_messages")


def _describe(value: Any) -> str:
    return _type_name(value)


def _keys(row: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in list(row)[:8]) or "none"


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
    "empty_response_after_truncation": "the prompt fills max_length, leaving no response tokens",
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
    "mixed_formats": "the row's format differs from the first row's",
    "template_error": "the chat template failed to render the row",
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
    tie levels when there are ties), for dropping duplicates without keeping the rows."""
    parts: list[Any] = [_canonical(row.prompt), [_canonical(r) for r in row.responses]]
    if row.levels is not None:  # a ranking with ties is not the strict ranking of the same texts
        parts.append(row.levels)
    if row.label is not None:  # an unpaired response labelled both ways is two rows, not a duplicate
        parts.append(row.label)
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
