"""Tokenize preference rows in token space, so the prompt ids are *exactly* a prefix of the model input.

A row becomes a :class:`TokenizedGroup`: the model sees ``prompt_ids + response_ids`` for each of its responses
(a pair: ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``) with one shared ``prompt_ids`` list. The obvious recipe, tokenizing prompt and response separately and concatenating, gives a
sequence the model never sees at inference, and tokenizing the joint text then cutting at ``len(prompt_ids)``
silently moves tokens across the join when a BPE merge spans it (a prompt ending in a space: TRL#1679,
TRL#2054). So:

1. tokenize the prompt text alone and the prompt+response text jointly (``add_special_tokens=False``);
2. if the joint ids start with the prompt ids, the response ids are the rest (the common case, and then the
   pair is tokenized exactly as the joint text);
3. otherwise tokenize the response alone (still decodes to the same text) and count a *boundary fallback*.

Conversational rows are rendered with the tokenizer's chat template: the prompt with the generation prompt
(``<|im_start|>assistant\\n``), the full conversation without it; the response text is the difference.

Special tokens:

- BOS: exactly one at the start when the tokenizer adds one by default (``tokenizer("a")`` starts with it),
  none added otherwise, never two (a chat template that renders BOS plus a tokenizer that adds it is the
  double-BOS bug).
- end: every response ends with exactly one end token: EOS for plain text; for chat, the token that closes an
  assistant turn in the template (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), with the whitespace a
  template renders after it (ChatML's ``"\\n"``) dropped. Plain text already in a chat format that ends with
  the end-of-turn token or EOS (``"42<|im_end|>\\n"``) keeps that token as its end, its trailing whitespace
  dropped, and gets no second one.
- an empty prompt (implicit message rows that differ from their first turn) becomes ``[BOS]`` (or ``[EOS]``),
  so the first response token has a position to be predicted from.

Truncation: a prompt longer than ``max_prompt_length`` keeps its last tokens (and a leading BOS); each response
is then cut to ``max_length - len(prompt_ids)``. A cut response loses its end token. A prompt longer than
``max_length`` is truncated the same way, not dropped: the config guarantees ``max_prompt_length < max_length``,
so at least one response token remains. Truncated rows are counted (``truncated``, ``truncated_prompts``).

Chat templates are untrusted code (they come with a model from the hub). transformers renders them in jinja2's
``ImmutableSandboxedEnvironment`` (and refuses jinja2 < 3.1.6, which has known sandbox escapes): attribute access
to ``__class__``, ``__globals__``, ``__init__``, mutation of lists and dicts, ``include``/``import`` of files are
refused. A template the sandbox refuses is a :class:`DataError` naming the template's tokenizer, not a
row error: it would refuse every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dpokit.data.formats import Message, Text, drop_reason
from dpokit.data.load import RowError
from dpokit.errors import DataError, ModelError


@dataclass
class TokenizedGroup:
    """A prompt with K >= 2 responses in strict preference order, best first, as token ids; a pair is K = 2
    (``chosen_ids``, ``rejected_ids``). The model inputs are ``prompt_ids + responses_ids[k]``; the loss scores
    only the response tokens. The pairwise losses take K = 2 groups, the Plackett-Luce loss any K."""

    prompt_ids: list[int]
    """Shared prompt, BOS included where the tokenizer uses one. Length (P,), 1 <= P <= max_prompt_length."""
    responses_ids: list[list[int]]
    """Response tokens only, best first; each ends with the end token unless truncated. Lengths (R_k,),
    R_k >= 1, P + max_k R_k <= max_length."""
    location: str
    """Where the row came from: ``path:line`` or ``path:row N`` (several groups share it when a tied ranking
    was split into its strict pairs)."""
    boundary_fallback: bool = False
    """A response was tokenized alone because the joint tokenization merged tokens across the join."""
    truncated: bool = False
    """The prompt or a response was cut to fit max_prompt_length / max_length."""
    label: bool | None = None
    """Unpaired examples (KTO) only: one response (K = 1), desirable or not."""

    @property
    def chosen_ids(self) -> list[int]:
        """The best response (a pair's chosen)."""
        return self.responses_ids[0]

    @property
    def rejected_ids(self) -> list[int]:
        """The worst response (a pair's rejected)."""
        return self.responses_ids[-1]

    @classmethod
    def pair(cls, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], location: str = "",
             boundary_fallback: bool = False, truncated: bool = False) -> TokenizedGroup:
        return cls(prompt_ids, [chosen_ids, rejected_ids], location, boundary_fallback, truncated)


@dataclass
class Encoded:
    """What :func:`encode_rows` produces for one kept row (any number of responses)."""

    prompt_ids: list[int]
    responses_ids: list[list[int]]
    boundary_fallback: bool = False
    truncated: bool = False
    prompt_truncated: bool = False
    """The prompt itself was cut (a subset of ``truncated``)."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def response_lens(self) -> list[int]:
        return [len(ids) for ids in self.responses_ids]


@dataclass(frozen=True)
class TokenRules:
    """The special-token facts the BOS / end-token rules need, read once from a tokenizer."""

    bos_id: int | None
    adds_bos: bool
    """The tokenizer puts BOS in front by default, so the model was trained with one."""
    eos_id: int
    """Closes a plain-text response."""
    eot_id: int
    """Closes an assistant turn of the chat template (ChatML: ``<|im_end|>``); ``eos_id`` when there is none."""
    eot_text: str = field(default="")
    """``eot_id`` as the template renders it; empty when the template renders no single end-of-turn token."""
    eos_text: str = ""
    """``eos_id`` as text (``tokenizer.eos_token``)."""
    split_tokens: tuple[tuple[str, int], ...] = ()
    """Added tokens (text, id) the tokenizer cuts the text at before anything else (``_special_cut``): special,
    matched on the raw text, stripping no whitespace, and overlapping no other added token. Empty when a probe
    conversation does not tokenize the same both ways."""


_PROBE = "dpokit-probe-4f1d"


def token_rules(tokenizer: Any) -> TokenRules:
    """Read BOS/EOS behaviour and the chat template's end-of-turn token from a tokenizer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the tokenizer has no EOS token; every response needs an end token")
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    eot_text, eot_id = "", eos
    if getattr(tokenizer, "chat_template", None):
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            rendered = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception as exc:  # a template that cannot render the probe: conversational rows will say why
            _refuse_unsafe(tokenizer, exc)
            rendered = ""
        if isinstance(rendered, str) and _PROBE in rendered:
            tail = rendered[rendered.rindex(_PROBE) + len(_PROBE):].strip()
            ids = _encode(tokenizer, [tail])[0] if tail else []
            if len(ids) == 1:
                eot_text, eot_id = tail, ids[0]
    eos_text = getattr(tokenizer, "eos_token", None)
    rules = TokenRules(bos, adds_bos, eos, eot_id, eot_text, eos_text if isinstance(eos_text, str) else "",
                       _split_tokens(tokenizer))
    if rules.split_tokens and eot_text:
        probe = [{"role": "user", "content": "Hi there, a probe."}, {"role": "assistant", "content": " A reply."}]
        try:
            prompt_text = tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # the template cannot render the probe: do not rely on the cut
            return replace(rules, split_tokens=())
        prompt_ids, full_ids = _encode(tokenizer, [prompt_text, full])
        cut = _special_cut(prompt_text, prompt_ids, rules) if full.startswith(prompt_text) else None
        if cut is None or prompt_ids[:cut[1]] + _encode(tokenizer, [full[cut[0]:]])[0] != full_ids:
            return replace(rules, split_tokens=())
    return rules


def _split_tokens(tokenizer: Any) -> tuple[tuple[str, int], ...]:
    """The added tokens a fast tokenizer splits its input at, each piece then tokenized on its own: special,
    not normalized, no lstrip / rstrip / single_word; and only when no added token contains another or overlaps
    it (then where one ends in a text is unambiguous)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if not decoder or getattr(tokenizer, "backend_tokenizer", None) is None:
        return ()
    texts = [t.content for t in decoder.values() if t.content]
    for a in texts:
        for b in texts:
            if a != b and (a in b or any(b.startswith(a[-k:]) for k in range(1, min(len(a), len(b))))):
                return ()
    return tuple((t.content, i) for i, t in sorted(decoder.items())
                 if t.special and not t.normalized and not t.lstrip and not t.rstrip and not t.single_word)


def _special_cut(text: str, ids: list[int], rules: TokenRules) -> tuple[int, int] | None:
    """Where the last split token of ``text`` ends: (characters, tokens of ``ids`` = the tokenization of
    ``text``). Everything after it is tokenized on its own, whatever follows, so a longer text that starts with
    ``text`` tokenizes as ``ids[:tokens]`` + the tokenization of its rest (the prompt's ids are not computed
    again for every response). None when there is no split token, or its count in ``text`` and in ``ids``
    disagree (then the tokenizer did not treat it as one)."""
    end, last = -1, None
    for token_text, token_id in rules.split_tokens:
        at = text.rfind(token_text)
        if at >= 0 and at + len(token_text) > end:
            end, last = at + len(token_text), (token_text, token_id)
    if last is None or text.count(last[0]) != ids.count(last[1]):
        return None
    tokens = len(ids) - ids[::-1].index(last[1])
    split_ids = {token_id for _, token_id in rules.split_tokens}
    if any(i in split_ids for i in ids[tokens:]):
        return None
    return end, tokens


def tokenize_pair(prompt: Text, chosen: Text, rejected: Text, tokenizer: Any, max_length: int,
                  max_prompt_length: int, *, location: str = "") -> TokenizedGroup | str:
    """Tokenize one (already normalized) pair; returns the drop reason instead when the pair is unusable.

    ``prompt``, ``chosen``, ``rejected`` are all ``str`` (plain text) or all message lists (the chat template
    is applied). An empty prompt is accepted (implicit-prompt rows); the pipeline decides when it is not.
    """
    reason = drop_reason(prompt, [chosen, rejected], allow_empty_prompt=True)
    if reason is not None:
        return reason
    result = encode_rows([(prompt, [chosen, rejected])], tokenizer, max_length, max_prompt_length, [location])[0]
    if isinstance(result, str):
        return result
    return TokenizedGroup(result.prompt_ids, result.responses_ids, location, result.boundary_fallback,
                          result.truncated)


def encode_rows(items: Sequence[tuple[Text, Sequence[Text]]], tokenizer: Any, max_length: int,
                max_prompt_length: int, locations: Sequence[str] | None = None,
                rules: TokenRules | None = None, *, on_error: str = "raise") -> list[Any]:
    """Tokenize a chunk of rows ``(prompt, responses)`` at once (one batched tokenizer call for all prompts and
    one for all joint texts: fast tokenizers run these in parallel in Rust). Each result is an
    :class:`Encoded` or a drop reason. Content checks (:func:`drop_reason`) are the caller's.

    A row the chat template cannot render raises a :class:`RowError`; with ``on_error="skip"`` the error is
    returned as that row's result instead."""
    if max_prompt_length < 1 or max_length < 2:
        raise ValueError("need max_prompt_length >= 1 and max_length >= 2")
    rules = rules or token_rules(tokenizer)
    locations = locations or [""] * len(items)
    prompt_texts: list[str] = []
    joint_texts: list[str] = []
    response_texts: list[list[str]] = []
    ends: list[int] = []
    failed: dict[int, RowError] = {}
    for index, ((prompt, responses), location) in enumerate(zip(items, locations)):
        if isinstance(prompt, str):
            texts = [r for r in responses if isinstance(r, str)]
            if len(texts) != len(responses):
                raise DataError(f"{location}: a text prompt needs text responses")
            texts = [_pre_closed(r, rules) for r in texts]
            prompt_text, joints = prompt, [prompt + r for r in texts]
            end = rules.eos_id
        else:
            try:
                prompt_text, joints = _render_chat(tokenizer, prompt, responses, rules, location)
            except RowError as err:
                if on_error != "skip":
                    raise
                failed[index] = err
                continue
            end = rules.eot_id
        ends.append(end)
        prompt_texts.append(prompt_text)
        joint_texts.extend(joints)
        response_texts.append([j[len(prompt_text):] for j in joints])
    prompt_ids_all = _encode(tokenizer, prompt_texts)
    # A chat prompt ends with split tokens (ChatML: "<|im_start|>assistant\n"): each joint text is then
    # tokenized from the prompt's last one on, its head taken from the prompt's ids (``_special_cut``).
    heads: list[list[int]] = []
    tails: list[str] = []
    joints_of_rows = iter(joint_texts)
    for prompt_text, prompt_ids, texts in zip(prompt_texts, prompt_ids_all, response_texts):
        cut = _special_cut(prompt_text, prompt_ids, rules) if rules.split_tokens else None
        for _ in texts:
            joint = next(joints_of_rows)
            heads.append(prompt_ids[:cut[1]] if cut else [])
            tails.append(joint[cut[0]:] if cut else joint)
    joint_ids_all = iter(head + ids for head, ids in zip(heads, _encode(tokenizer, tails)))

    results: list[Any] = []
    for prompt_ids, texts, end in zip(prompt_ids_all, response_texts, ends):
        n = len(prompt_ids)
        responses_ids = []
        fallback = False
        for text in texts:
            joint = next(joint_ids_all)
            if joint[:n] == prompt_ids:
                ids = joint[n:]
            else:  # a merge across the join: keep the prompt's own tokens, tokenize the response alone
                ids = _encode(tokenizer, [text])[0]
                fallback = True
            responses_ids.append(_close(ids, end, rules))
        results.append(_fit(_fix_bos(prompt_ids, rules), responses_ids, max_length, max_prompt_length, rules,
                            fallback))
    for index in sorted(failed):  # put the failed rows back in their places
        results.insert(index, failed[index])
    return results


def _render_chat(tokenizer: Any, prompt: list[Message], responses: Sequence[Text], rules: TokenRules,
                 location: str) -> tuple[str, list[str]]:
    """(prompt text with the generation prompt, [full conversation text per response])."""
    if not getattr(tokenizer, "chat_template", None):
        # Rendering messages (a 'system' column makes a text row messages too) without a template would be a
        # guess at the format the model was trained on: refuse, for every row alike.
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DataError(f"{location}: message rows, and rows with a 'system' column, are rendered with the chat "
                        f"template, and {name} has none; use a chat model's tokenizer, or write the system text "
                        "into the prompt")
    prompt_text = _apply_template(tokenizer, prompt, True, location)
    joints = []
    for response in responses:
        if isinstance(response, str):
            raise DataError(f"{location}: a message-list prompt needs message-list responses")
        full = _apply_template(tokenizer, prompt + response, False, location)
        if not full.startswith(prompt_text):
            raise RowError(f"{location}: the chat template renders the prompt differently inside the full "
                           "conversation, so the response cannot be cut out of it", "template_error")
        # ChatML renders "<|im_end|>\n": the newline after the end-of-turn token belongs to no response, and a
        # model trained on it would learn to emit a token after its stop token.
        stripped = full.rstrip()
        if rules.eot_text and stripped.endswith(rules.eot_text) and len(stripped) > len(prompt_text):
            full = stripped
        joints.append(full)
    return prompt_text, joints


def _apply_template(tokenizer: Any, messages: list[Message], generation_prompt: bool, location: str) -> str:
    try:
        # transformers renders templates in a sandboxed jinja environment, offline.
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # missing template, template raising on the roles, ...: one line with the row
        _refuse_unsafe(tokenizer, exc)
        raise RowError(f"{location}: chat template failed ({_first_line(exc)})", "template_error") from None
    if not isinstance(text, str):
        raise RowError(f"{location}: chat template did not render text", "template_error")
    return text


def _refuse_unsafe(tokenizer: Any, exc: Exception) -> None:
    """A template the jinja sandbox stopped is hostile or broken for every row: stop, naming the tokenizer."""
    from jinja2.exceptions import SecurityError

    if isinstance(exc, SecurityError):
        name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
        raise DataError(f"{name}: chat template refused by the jinja sandbox ({_first_line(exc)}); "
                        "it is not rendered") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        # The ids tokenizer(texts, add_special_tokens=False) gives (it calls this backend with the same settings),
        # without building character offsets and Python encodings: about twice as fast, which is most of
        # `dpokit data check`'s time.
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    # verbose=False: a long row is truncated later, so "sequence longer than model_max_length" is noise here.
    return list(tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"])


def _pre_closed(text: str, rules: TokenRules) -> str:
    """A plain-text response already in a chat format ends with its end token and the template's newline
    (ChatML: ``"42<|im_end|>\n"``): the newline goes, as in a rendered conversation (:func:`_render_chat`),
    so the end token is the response's last token and none is added after it."""
    stripped = text.rstrip()
    if stripped != text and any(t and stripped.endswith(t) for t in (rules.eot_text, rules.eos_text)):
        return stripped
    return text


def _close(ids: list[int], end: int, rules: TokenRules | None = None) -> list[int]:
    """Exactly one end token at the end: append it unless present, collapse repeats (text that already ends
    with the literal end token). Text that ends with the chat template's end-of-turn token (pre-templated
    ChatML) is closed by it: no EOS after it."""
    ids = list(ids)
    while len(ids) >= 2 and ids[-1] == end and ids[-2] == end:
        ids.pop()
    if rules is not None and ids and ids[-1] in (rules.eot_id, rules.eos_id):
        return ids
    if not ids or ids[-1] != end:
        ids.append(end)
    return ids


def _fix_bos(prompt_ids: list[int], rules: TokenRules) -> list[int]:
    """Exactly one BOS when the tokenizer uses one, none added otherwise, never two."""
    bos = rules.bos_id
    if bos is None:
        return prompt_ids
    lead = 0
    while lead < len(prompt_ids) and prompt_ids[lead] == bos:
        lead += 1
    if rules.adds_bos:
        return [bos] + prompt_ids[lead:]
    return prompt_ids[lead - 1:] if lead > 1 else prompt_ids


def _fit(prompt_ids: list[int], responses_ids: list[list[int]], max_length: int, max_prompt_length: int,
         rules: TokenRules, fallback: bool) -> Encoded | str:
    """Apply the empty-prompt rule and truncation; a response left with zero tokens drops the row."""
    if not prompt_ids:
        prompt_ids = [rules.bos_id if rules.bos_id is not None else rules.eos_id]
    truncated = prompt_truncated = False
    if len(prompt_ids) > max_prompt_length:
        # The end of a prompt is what the response answers; keep it, and keep the BOS the model expects.
        keep_bos = rules.bos_id is not None and prompt_ids[0] == rules.bos_id
        if keep_bos:
            tail = max_prompt_length - 1
            prompt_ids = prompt_ids[:1] + (prompt_ids[-tail:] if tail else [])
        else:
            prompt_ids = prompt_ids[-max_prompt_length:]
        truncated = prompt_truncated = True
    budget = max_length - len(prompt_ids)
    if budget <= 0:
        return "empty_response_after_truncation"
    if any(len(ids) > budget for ids in responses_ids):
        responses_ids = [ids[:budget] for ids in responses_ids]
        truncated = True
    return Encoded(prompt_ids, responses_ids, fallback, truncated, prompt_truncated)
