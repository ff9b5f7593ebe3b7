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
===========================  ====================================================================================

A message is ``{"role": str, "content": str, ...}``; extra keys (``name``, ...) are passed to the chat template.
Extra row keys (``id``, ``score_chosen``, ...) are ignored. A structurally wrong row (missing key, null, wrong
type, a prompt not ending in a user turn) is a :class:`DataError` naming ``path:line`` and the key; a
well-formed but unusable row (empty, or chosen == rejected) is *dropped and counted* by :func:`drop_reason`.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from dpokit.data.load import Record, _type_name
from dpokit.errors import DataError

Message = dict[str, Any]
Text = str | list[Message]
"""A prompt or a response: plain text, or a list of chat messages."""

PROMPT_END_ROLES = ("user", "system", "tool")
"""A prompt must end with a turn the assistant answers."""

HH_ASSISTANT = "Assistant:"
"""The turn marker of Anthropic HH-RLHF; implicit-prompt strings are split just after its last occurrence."""


@dataclass
class PreferenceRow:
    """One pairwise preference, normalized: ``prompt`` and the two responses are all ``str`` (plain text) or all
    message lists (chat template applied at tokenization)."""

    prompt: Text
    chosen: Text
    rejected: Text
    location: str
    format: str


@dataclass
class RankedRow:
    """One listwise preference: ``responses`` sorted best first (ties keep file order)."""

    prompt: Text
    responses: list[Text]
    location: str
    format: str


def normalize(record: Record) -> PreferenceRow | RankedRow:
    """Detect the format of one raw row and bring it to :class:`PreferenceRow` or :class:`RankedRow`."""
    row, loc = record.row, record.location
    if "responses" in row:
        return _ranked(row, loc)
    if "chosen" not in row and "rejected" not in row:
        raise DataError(f"{loc}: no preference fields; expected 'prompt', 'chosen', 'rejected' (or 'chosen' and "
                        f"'rejected' alone, or 'responses' with 'ranking'/'scores'); found keys {_keys(row)}")
    chosen = _text(row, "chosen", loc)
    rejected = _text(row, "rejected", loc)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{loc}: 'chosen' and 'rejected' must both be strings or both be lists of messages")
    if "prompt" not in row:
        if isinstance(chosen, str):
            assert isinstance(rejected, str)
            prompt, chosen, rejected = split_implicit(chosen, rejected)
            return PreferenceRow(prompt, chosen, rejected, loc, "implicit_prompt")
        return _implicit_messages(chosen, rejected, loc)
    prompt = _text(row, "prompt", loc)
    if isinstance(prompt, str) and isinstance(chosen, str):
        return PreferenceRow(prompt, chosen, rejected, loc, "standard")
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
    return PreferenceRow(prompt, chosen, rejected, loc, "conversational")


def to_ranked(row: PreferenceRow) -> RankedRow:
    """A pair is a ranking of two, chosen first (the row keeps its format name: it was read as a pair)."""
    return RankedRow(row.prompt, [row.chosen, row.rejected], row.location, row.format)


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
                raise DataError(f"{loc}: '{key}[{k + i}]' is a '{message['role']}' turn, but chosen and rejected "
                                f"first differ at message {first_difference}; only final assistant turns may differ")
    _check_turns(prompt, {"chosen": chosen_turns, "rejected": rejected_turns}, loc, offset=k,
                 allow_empty_prompt=True)
    return PreferenceRow(prompt, chosen_turns, rejected_turns, loc, "implicit_conversational")


def _same_message(a: Message, b: Message) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]


# ------------------------------------------------------------------------------------------------------ ranked

def _ranked(row: dict[str, Any], loc: str) -> RankedRow:
    prompt = _text(row, "prompt", loc)
    raw = _value(row, "responses", loc)
    if not isinstance(raw, list) or len(raw) < 2:
        raise DataError(f"{loc}: 'responses' must be a list of at least 2 responses, got {_describe(raw)}")
    responses = [_text_value(value, f"responses[{i}]", loc) for i, value in enumerate(raw)]
    key = "ranking" if "ranking" in row else "scores" if "scores" in row else None
    if key is None:
        raise DataError(f"{loc}: ranked rows need 'ranking' (rank of each response, lower is better) or "
                        "'scores' (higher is better)")
    values = _value(row, key, loc)
    if (not isinstance(values, list) or len(values) != len(responses)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in values)):
        raise DataError(f"{loc}: '{key}' must be a list of {len(responses)} numbers, one per response")
    sign = -1 if key == "scores" else 1
    order = sorted(range(len(responses)), key=lambda i: sign * values[i])  # stable: ties keep file order
    responses = [responses[i] for i in order]
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses):
        return RankedRow(prompt, responses, loc, "ranked")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    turns = [_as_turns(r, prompt) for r in responses]
    _check_turns(prompt, {f"responses[{order[i]}]": t for i, t in enumerate(turns)}, loc)
    return RankedRow(prompt, list(turns), loc, "ranked_conversational")


# -------------------------------------------------------------------------------------------------- validation

def _value(row: dict[str, Any], key: str, loc: str) -> Any:
    if key not in row:
        raise DataError(f"{loc}: missing key '{key}'")
    value = row[key]
    if value is None:
        raise DataError(f"{loc}: '{key}' is null")
    return value


def _text(row: dict[str, Any], key: str, loc: str) -> Text:
    return _text_value(_value(row, key, loc), key, loc)


def _text_value(value: Any, key: str, loc: str) -> Text:
    """A string, or a list of messages (a single message dict counts as a list of one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "role" in value:
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{loc}: '{key}' must be a string or a list of messages, got {_describe(value)}")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{loc}: '{key}[{i}]' must be a message {{'role': ..., 'content': ...}}, "
                            f"got {_describe(message)}")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                got = "missing" if field not in message else _describe(message[field])
                raise DataError(f"{loc}: '{key}[{i}].{field}' must be a string, got {got}")
    return value


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
        raise DataError(f"{loc}: 'prompt' is an empty list of messages")
    if prompt and prompt[-1]["role"] not in PROMPT_END_ROLES:
        raise DataError(f"{loc}: 'prompt' must end with a user turn (or system/tool), not "
                        f"'{prompt[-1]['role']}'")
    for key, turns in responses.items():
        if not turns:
            raise DataError(f"{loc}: '{key}' is an empty list of messages")
        for i, message in enumerate(turns):
            if message["role"] != "assistant":
                raise DataError(f"{loc}: '{key}[{i + offset}]' must be an assistant turn, got role "
                                f"'{message['role']}'")


def _describe(value: Any) -> str:
    return _type_name(value)


def _keys(row: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in list(row)[:8]) or "none"


# ------------------------------------------------------------------------------------------------------ drops

DROP_REASONS = {
    "empty_prompt": "prompt is empty or whitespace only (allowed only for implicit-prompt rows)",
    "empty_response": "a response is empty or whitespace only",
    "chosen_equals_rejected": "chosen and rejected are the same text (after Unicode NFC and whitespace "
                              "normalization)",
    "duplicate_responses": "two responses of a ranked row are the same text",
    "empty_response_after_truncation": "the prompt fills max_length, leaving no response tokens",
}
"""Every reason a well-formed row can be dropped, with what it means (``dpokit data check`` prints these)."""


def drop_reason(prompt: Text, responses: list[Text], allow_empty_prompt: bool = False) -> str | None:
    """Why this row must not be trained on, or None. Only content is checked here; structure was checked by
    :func:`normalize`, and token budget by the tokenizer step."""
    if not allow_empty_prompt and _blank(prompt):
        return "empty_prompt"
    if any(_blank(r) for r in responses):
        return "empty_response"
    keys = [_canonical(r) for r in responses]
    if len(set(keys)) < len(keys):
        return "chosen_equals_rejected" if len(keys) == 2 else "duplicate_responses"
    return None


def _blank(value: Text) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def _canonical(value: Text) -> Any:
    """Text as a reader sees it: NFC (composed and decomposed accents are equal) and whitespace runs collapsed,
    so "Yes." and "Yes. " count as the same answer."""
    if isinstance(value, str):
        return " ".join(unicodedata.normalize("NFC", value).split())
    return tuple((m["role"], _canonical(m["content"])) for m in value)
