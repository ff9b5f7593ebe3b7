"""Normalize the preference formats into one shape, and decide which rows are unusable.

Formats (detected per row from its keys and value types; ``dpokit.data.pipeline`` rejects a file that mixes
them):

===========================  ====================================================================================
``standard``                 ``{"prompt": str, "chosen": str, "rejected": str}``
``conversational``           ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``; also
                             accepted: string responses (taken as one assistant turn), a single message dict,
                             a string prompt with assistant-only message responses (taken as one user turn),
                             and responses that repeat the prompt's messages first (they are removed)
``implicit_prompt``          ``{"chosen": str, "rejected": str}``: two whole dialogues (Anthropic HH-RLHF, or
                             text in a chat format) whose shared opening up to the last assistant marker is the
                             prompt (``dpokit.data.implicit``); refused beside a prompt-like column
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
passed to the chat template. Content must be a string here: rows with images (an ``images`` or ``image``
column, content as a list of parts) are read for a vision-language model by ``dpokit.data.images`` (which
brings them to this shape first) and refused for a text model (``image_data``). ShareGPT turns (``{"from": "human" | "gpt", "value"}``)
are read as messages. Extra row keys (``id``, ``score_chosen``, ...) are ignored; ``chosen``/``rejected`` decide
a pair whatever other keys a row has (``responses``, ``label``). A ``system`` column is the prompt's system
message: the row becomes conversational and the chat template renders it. ``data.columns`` renames a dataset's
columns onto these names first (``dpokit.data.columns``).

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

import os
import re
from dataclasses import dataclass
from typing import Any

from dpokit.data.columns import apply_columns, prompt_like_columns
from dpokit.data.drops import (  # noqa: F401  (re-exported: formats is where a row's reasons are looked up)
    _FORMAT_CHARS,
    CONTENT_REASONS,
    DROP_REASONS,
    MALFORMED_REASONS,
    drop_reason,
    row_digest,
    strip_invisible,
)
from dpokit.data.implicit import split_implicit
from dpokit.data.load import Record, RowError, _type_name

Message = dict[str, Any]
Text = str | list[Message]
"""A prompt or a response: plain text, or a list of chat messages."""

PROMPT_END_ROLES = ("user", "system", "tool")
"""A prompt must end with a turn the assistant answers."""

ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
"""Message roles the chat templates of common models know (OpenAI's ``developer``/``function``, Llama 3.1's
``ipython``); any other role is a malformed row, not something to pass to a template to guess about."""

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


def normalize(record: Record, columns: dict[str, str] | None = None) -> PreferenceRow:
    """Detect the format of one raw row and bring it to a :class:`PreferenceRow`. ``columns`` is
    ``data.columns`` (``dpokit.data.columns``). ``chosen``/``rejected`` decide a pair whatever other columns
    the row has: a ``responses`` or ``label`` column beside them never makes it a ranking or an unpaired row."""
    loc = record.location
    row = apply_columns(record.row, columns, loc)
    if "images" in row or "image" in row:
        raise RowError(f"{loc}: a row with images; image preference data trains a vision-language model (a "
                       "model whose config has a vision_config, e.g. model.name_or_path: tiny-random-llava)",
                       "image_data")
    if "chosen" in row or "rejected" in row:
        result = _pair(row, loc)
    elif "responses" in row:
        result = _ranked(row, loc)
    elif "completion" in row or "label" in row:
        result = _unpaired(row, loc)
    else:
        raise RowError(f"{loc}: no preference fields; expected 'prompt', 'chosen', 'rejected' (or 'chosen' and "
                       f"'rejected' alone, or 'responses' with 'ranking'/'scores'); found keys {_keys(row)}; "
                       "other column names can be mapped with data.columns", "missing_key")
    return _with_system(result, row, loc) if "system" in row else result


def _pair(row: dict[str, Any], loc: str) -> PreferenceRow:
    chosen = _text(row, "chosen", loc)
    rejected = _text(row, "rejected", loc)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError(f"{loc}: 'chosen' and 'rejected' must both be strings or both be lists of messages",
                       "wrong_type")
    if "prompt" not in row:
        if isinstance(chosen, str):
            assert isinstance(rejected, str)
            return _implicit_text(row, chosen, rejected, loc)
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


_CHAT_FORMATS = {"standard": "conversational", "ranked": "ranked_conversational",
                 "unpaired": "unpaired_conversational"}


def _with_system(result: PreferenceRow, row: dict[str, Any], loc: str) -> PreferenceRow:
    """A ``system`` column becomes the prompt's first message, so a text row turns conversational (the chat
    template renders it). Every row of such a source is conversational, so an empty or null ``system`` adds no
    message but still gives a conversational row (one format per file)."""
    system = row["system"]
    if system is not None and not isinstance(system, str):
        raise RowError(f"{loc}: 'system' must be a string, got {_describe(system)}", "wrong_type")
    if system:
        _check_text(system, "system", loc)
    if result.format == "implicit_prompt":
        return result  # a non-empty system column was refused by _implicit_text: text has no place for it
    if isinstance(result.prompt, str):
        result.prompt = [{"role": "user", "content": result.prompt}]
        result.responses = [_as_turns(r, result.prompt) for r in result.responses]
        result.format = _CHAT_FORMATS[result.format]
    if not (system and system.strip()):
        return result
    first = result.prompt[0] if result.prompt else None
    if first is not None and first["role"] == "system":
        if first["content"] != system:
            raise RowError(f"{loc}: both a 'system' column and a different system message in 'prompt'",
                           "bad_messages")
        return result
    result.prompt = [{"role": "system", "content": system}, *result.prompt]
    return result


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

def _implicit_text(row: dict[str, Any], chosen: str, rejected: str, loc: str) -> PreferenceRow:
    """Two full dialogue texts: the prompt is their shared opening up to the last assistant marker
    (``dpokit.data.implicit``). Refused when a column looks like it holds the prompt (the guess would drop it),
    when the texts share no dialogue marker, and when the conversations diverge before the last turn."""
    columns = prompt_like_columns(row)
    if columns and columns[0].lower() != "system":
        mapping = ", ".join(f"{'system' if c.lower() == 'system' else 'prompt'}: {c}" for c in columns[:2])
        raise RowError(f"{loc}: 'chosen'/'rejected' without 'prompt', beside a '{columns[0]}' column: the prompt "
                       f"would be guessed from the answers and '{columns[0]}' dropped; map it, e.g. data.columns: "
                       f"{{{mapping}}}", "implicit_prompt")
    if columns and not all(row[c] is None or (isinstance(row[c], str) and not row[c].strip()) for c in columns):
        raise RowError(f"{loc}: a '{columns[0]}' column beside chosen/rejected dialogue text without 'prompt' "
                       "cannot be placed in the text; give the prompt as a column and map it with data.columns",
                       "implicit_prompt")
    split = split_implicit(chosen, rejected)
    if split is None:
        what = ("share no opening text" if not os.path.commonprefix([chosen, rejected]) else
                "share an opening with no dialogue turn marker (e.g. 'Assistant:', '<|im_start|>assistant')")
        raise RowError(f"{loc}: 'chosen'/'rejected' without 'prompt' {what}, so no prompt can be told apart; "
                       "add a 'prompt' column, or map one with data.columns", "implicit_prompt")
    later = split.later_turn()
    if later is not None:
        raise RowError(f"{loc}: '{later[0]}' holds a later {later[1].strip()!r} turn: chosen and rejected "
                       f"({split.dialogue.name} text) differ before their last turn; only the final assistant "
                       "turn may differ", "bad_messages")
    return PreferenceRow(split.prompt, [split.chosen, split.rejected], loc, "implicit_prompt")


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
    value = [_sharegpt(m) for m in value]
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


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def _sharegpt(message: Any) -> Any:
    """A ShareGPT-style turn ``{"from": "human" | "gpt" | role, "value": text}`` (UltraInteract's
    ``trajectory``) as a message ``{"role", "content"}``; anything else unchanged."""
    if isinstance(message, dict) and "role" not in message and {"from", "value"} <= message.keys():
        role = message["from"]
        return {"role": _SHAREGPT_ROLES.get(role, role), "content": message["value"]}
    return message


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
