"""Tokenization invariants on tricky text (trailing/leading spaces, newlines, emoji, Chinese, Arabic, Cyrillic,
Hindi), for the tiny tokenizer, a BOS-adding copy of it, and the real SmolLM2 tokenizer.

What must hold for every kept pair: the prompt ids are the prompt's own tokenization and a prefix of both model
inputs; exactly one BOS when the tokenizer adds one, none otherwise; exactly one end token closing each
untruncated response; prompt + response decodes back to the text; truncation keeps the prompt shared and never
leaves an empty response.
"""

import json
from pathlib import Path

import pytest
from tokenizers import processors

from dpokit.config import DataConfig
from dpokit.data import load_preferences, token_rules, tokenize_pair
from dpokit.data.formats import normalize
from dpokit.data.load import Record, iter_records
from dpokit.models.loading import tiny_tokenizer

DATA = Path(__file__).parent / "data"
TRICKY = DATA / "tricky.jsonl"
TRICKY_CHAT = DATA / "tricky-chat.jsonl"


@pytest.fixture(scope="module")
def smollm2():
    from dpokit.models.loading import load_tokenizer, resolve

    return load_tokenizer(resolve("smollm2"))


@pytest.fixture(scope="module")
def tiny_bos():
    """The tiny tokenizer configured to put BOS (``<|im_start|>``) in front of every encoding, like Llama's."""
    tok = tiny_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", bos)])
    assert tok("a").input_ids[0] == bos
    return tok


TOKENIZERS = ["tiny_tok", "tiny_bos", pytest.param("smollm2", marks=pytest.mark.slow)]


@pytest.fixture(params=TOKENIZERS)
def tok(request):
    return request.getfixturevalue(request.param)


def rows(path):
    """Normalized rows of a test file, keyed by their "id"."""
    out = {}
    for record in iter_records(str(path)):
        out[record.row["id"]] = normalize(record)
    return out


def encode(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def with_bos(tok, ids):
    """The BOS rule applied to a full encoding: one BOS when the tokenizer adds one by default."""
    rules = token_rules(tok)
    if rules.adds_bos and ids[:1] != [rules.bos_id]:
        return [rules.bos_id] + ids
    return ids


def full_text(tok, prompt, response):
    """The text ``prompt_ids + response_ids`` must decode to (BOS aside)."""
    if isinstance(prompt, str):
        end = "" if response.endswith(tok.eos_token) else tok.eos_token
        return prompt + response + end
    # ChatML renders "<|im_end|>\n"; the newline after the end-of-turn token is not part of the response.
    return tok.apply_chat_template(prompt + response, tokenize=False).rstrip()


def prompt_text(tok, prompt):
    if isinstance(prompt, str):
        return prompt
    return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def decode(tok, ids):
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def leading(ids, token):
    n = 0
    while n < len(ids) and ids[n] == token:
        n += 1
    return n


@pytest.mark.parametrize("path", [TRICKY, TRICKY_CHAT], ids=["standard", "chat"])
def test_invariants_on_tricky_rows(tok, path):
    pairs, report = load_preferences(str(path), tok, DataConfig())
    normalized = rows(path)
    assert report.rows_read == report.rows_kept == len(normalized) == len(pairs)
    rules = token_rules(tok)
    bos_text = tok.bos_token if rules.adds_bos else ""
    for pair, row in zip(pairs, normalized.values()):
        assert pair.location == row.location
        chat = isinstance(row.prompt, list)
        end = rules.eot_id if chat else rules.eos_id

        # The prompt ids are the prompt's own tokenization (BOS rule applied) ...
        expected_prompt = with_bos(tok, encode(tok, prompt_text(tok, row.prompt)))
        assert pair.prompt_ids == expected_prompt, row.location
        # ... and identical whatever the responses are: swapping them changes nothing about the prompt.
        swapped = tokenize_pair(row.prompt, row.rejected, row.chosen, tok, 512, 256)
        assert swapped.prompt_ids == pair.prompt_ids
        assert (swapped.chosen_ids, swapped.rejected_ids) == (pair.rejected_ids, pair.chosen_ids)

        for response, ids in ((row.chosen, pair.chosen_ids), (row.rejected, pair.rejected_ids)):
            model_input = pair.prompt_ids + ids
            assert model_input[:len(pair.prompt_ids)] == pair.prompt_ids
            # Exactly one end token, at the end.
            assert ids[-1] == end and (len(ids) == 1 or ids[-2] != end), row.location
            # Exactly one BOS when the tokenizer adds one; none added to plain text otherwise. (A ChatML
            # template renders <|im_start|>, which these tokenizers also call BOS: still exactly one.)
            if rules.adds_bos or chat:
                assert leading(model_input, rules.bos_id) == 1, row.location
            else:
                assert leading(model_input, rules.bos_id) == 0, row.location
            # The model input decodes back to the text.
            text = full_text(tok, row.prompt, response)
            assert decode(tok, model_input) == (bos_text + text if not chat else text), row.location
            if not pair.boundary_fallback:
                # No merge across the join: the pair is tokenized exactly as the joint text is.
                assert model_input == with_bos(tok, encode(tok, text)), row.location


def test_pipeline_equals_single_pair_path(tiny_tok):
    """Batched chunks (load_preferences) and one pair at a time (tokenize_pair) give identical ids."""
    for path in (TRICKY, TRICKY_CHAT):
        pairs, _ = load_preferences(str(path), tiny_tok, DataConfig(max_length=40, max_prompt_length=20))
        for pair, row in zip(pairs, rows(path).values()):
            single = tokenize_pair(row.prompt, row.chosen, row.rejected, tiny_tok, 40, 20, location=row.location)
            assert single == pair


@pytest.mark.parametrize("name", ["tiny_tok", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_boundary_fallback_on_trailing_space_prompt(request, name):
    tok = request.getfixturevalue(name)
    prompt, chosen = "Question: what is 2+2? ", "Answer: 4"
    prompt_ids = encode(tok, prompt)
    # The bug this guards against: the joint text merges " " with "Answer", so cutting it at len(prompt_ids)
    # would hand the model a prompt it never saw and a response missing its first token.
    assert encode(tok, prompt + chosen)[:len(prompt_ids)] != prompt_ids

    pairs, report = load_preferences(str(TRICKY), tok, DataConfig())
    pair = next(p for p in pairs if p.location.endswith(":1"))
    assert pair.boundary_fallback
    assert pair.prompt_ids == prompt_ids
    assert pair.chosen_ids == encode(tok, chosen) + [tok.eos_token_id]
    assert decode(tok, pair.prompt_ids + pair.chosen_ids) == prompt + chosen + tok.eos_token
    assert report.boundary_fallback == sum(p.boundary_fallback for p in pairs) >= 1


def test_single_bos_when_tokenizer_adds_it(tiny_bos):
    bos = tiny_bos.bos_token_id
    pair = tokenize_pair("Hello", " there", " you", tiny_bos, 64, 32)
    assert pair.prompt_ids[0] == bos and pair.prompt_ids[1] != bos
    # The double-BOS bug: the ChatML template renders <|im_start|> (= BOS) and the tokenizer adds another.
    assert tiny_bos(tiny_bos.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
                    ).input_ids[:2] == [bos, bos]
    chat = tokenize_pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}],
                         [{"role": "assistant", "content": "Go"}], tiny_bos, 64, 32)
    assert chat.prompt_ids[0] == bos and chat.prompt_ids[1] != bos
    # A prompt that spells out BOS itself still gets exactly one.
    literal = tokenize_pair("<|im_start|>Hello", " there", " you", tiny_bos, 64, 32)
    assert leading(literal.prompt_ids, bos) == 1


def test_no_bos_added_when_tokenizer_adds_none(tiny_tok):
    pair = tokenize_pair("Hello", " there", " you", tiny_tok, 64, 32)
    assert pair.prompt_ids == encode(tiny_tok, "Hello")
    assert tiny_tok.bos_token_id not in pair.prompt_ids


def test_end_token_never_doubled(tiny_tok):
    eos = tiny_tok.eos_token_id
    pair = tokenize_pair("Say done.", " Done.<|im_end|>", " Done.<|im_end|><|im_end|>", tiny_tok, 64, 32)
    assert pair.chosen_ids[-1] == eos and pair.chosen_ids[-2] != eos
    assert pair.rejected_ids[-1] == eos and pair.rejected_ids[-2] != eos


def test_chat_response_ends_at_end_of_turn(tiny_tok):
    """ChatML renders "<|im_end|>\\n": the response stops at <|im_end|>, nothing after it."""
    pair = tokenize_pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}],
                         [{"role": "assistant", "content": "Go"}], tiny_tok, 64, 32)
    assert decode(tiny_tok, pair.chosen_ids) == "Hello<|im_end|>"
    assert decode(tiny_tok, pair.prompt_ids).endswith("<|im_start|>assistant\n")


def test_end_of_turn_token_read_from_template():
    """A template whose turns end with a token other than EOS (Llama 3's <|eot_id|>, Gemma's <end_of_turn>):
    chat responses end with that token, plain-text responses with EOS."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<|eot|>"], special_tokens=True)
    eot = tok.convert_tokens_to_ids("<|eot|>")
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|eot|>' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    rules = token_rules(tok)
    assert (rules.eot_id, rules.eot_text, rules.eos_id) == (eot, "<|eot|>", tok.eos_token_id)
    chat = tokenize_pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}],
                         [{"role": "assistant", "content": "Go"}], tok, 64, 32)
    assert chat.chosen_ids[-1] == eot and tok.eos_token_id not in chat.chosen_ids
    text = tokenize_pair("Hi", " Hello", " Go", tok, 64, 32)
    assert text.chosen_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("path", [TRICKY, TRICKY_CHAT], ids=["standard", "chat"])
def test_truncation_keeps_prompt_shared_and_tail(tok, path):
    full, _ = load_preferences(str(path), tok, DataConfig(max_length=4096, max_prompt_length=2048))
    cfg = DataConfig(max_length=24, max_prompt_length=12)
    cut, report = load_preferences(str(path), tok, cfg)
    assert len(cut) == len(full) and report.truncated == sum(p.truncated for p in cut) > 0
    bos = tok.bos_token_id
    for long, short in zip(full, cut):
        p = long.prompt_ids
        if len(p) > cfg.max_prompt_length:
            # The prompt keeps its last tokens, and the BOS it starts with.
            keep = cfg.max_prompt_length - 1 if p[0] == bos else cfg.max_prompt_length
            expected = ([bos] if p[0] == bos else []) + p[-keep:]
        else:
            expected = p
        assert short.prompt_ids == expected
        budget = cfg.max_length - len(short.prompt_ids)
        assert short.chosen_ids == long.chosen_ids[:budget] and short.rejected_ids == long.rejected_ids[:budget]
        for ids in (short.chosen_ids, short.rejected_ids):
            assert 1 <= len(ids) and len(short.prompt_ids) + len(ids) <= cfg.max_length
        assert short.truncated == (short.prompt_ids != p or short.chosen_ids != long.chosen_ids
                                   or short.rejected_ids != long.rejected_ids)


def test_zero_token_responses_are_dropped_and_counted(tiny_tok, tmp_path):
    # max_prompt_length == max_length leaves no room for a response after a long prompt; DataConfig refuses that
    # combination, so build it unvalidated to reach the tokenizer's own guard.
    cfg = DataConfig.model_construct(max_length=8, max_prompt_length=8, max_rows=None,
                                     max_line_bytes=1 << 20)
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "Hi", "chosen": " yes", "rejected": " no"},
             {"prompt": "A rather long prompt that fills the budget", "chosen": " yes", "rejected": " no"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    pairs, report = load_preferences(str(path), tiny_tok, cfg)
    assert report.dropped == {"empty_response_after_truncation": 1}
    assert report.rows_read == 2 == report.rows_kept + sum(report.dropped.values())
    assert [p.location for p in pairs] == [f"{path}:1"]
    assert tokenize_pair(lines[1]["prompt"], " yes", " no", tiny_tok, 8, 8) == "empty_response_after_truncation"


def test_empty_prompt_gets_a_start_token(tiny_tok):
    """With no prompt the first response token still needs a position to be predicted from."""
    pair = tokenize_pair("", "I like it", "I hate it", tiny_tok, 64, 32)
    assert pair.prompt_ids == [tiny_tok.bos_token_id]
    assert decode(tiny_tok, pair.chosen_ids) == "I like it<|im_end|>"


def test_unusable_pairs_return_a_reason(tiny_tok):
    assert tokenize_pair("Q", " same answer", "same   answer ", tiny_tok, 64, 32) == "chosen_equals_rejected"
    # NFC: a precomposed and a decomposed "é" are the same text.
    assert tokenize_pair("Q", " caf\u00e9", " cafe\u0301", tiny_tok, 64, 32) == "chosen_equals_rejected"
    assert tokenize_pair("Q", "  \n", " no", tiny_tok, 64, 32) == "empty_response"


# --------------------------------------------------------------------------------------------- template sandbox

MALICIOUS_TEMPLATES = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ cycler.__init__.__globals__.os.system('touch pwned') }}",
    "joiner": "{% for m in messages %}{{ joiner.__init__.__globals__.os.popen('touch pwned').read() }}{% endfor %}",
    "mutation": "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    "message_class": "{% for m in messages %}{{ m.content.__class__.__base__.__subclasses__() }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(MALICIOUS_TEMPLATES))
def test_malicious_chat_template_is_refused(name, tmp_path, monkeypatch):
    """transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment: escapes are refused, and
    dpokit turns the refusal into one DataError line instead of a traceback, before any row is rendered."""
    from dpokit.errors import DataError

    monkeypatch.chdir(tmp_path)
    tok = tiny_tokenizer()
    tok.chat_template = MALICIOUS_TEMPLATES[name]
    with pytest.raises(DataError) as info:
        token_rules(tok)
    assert "chat template refused by the jinja sandbox" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="refused by the jinja sandbox"):
        tokenize_pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "a"}],
                      [{"role": "assistant", "content": "b"}], tok, 64, 32)
    assert not (tmp_path / "pwned").exists()


def test_template_file_access_is_a_row_error(tmp_path):
    """No loader: a template cannot include or import files."""
    from dpokit.errors import DataError

    tok = tiny_tokenizer()
    (tmp_path / "secret.txt").write_text("secret")
    tok.chat_template = "{% include '" + str(tmp_path / "secret.txt") + "' %}"
    with pytest.raises(DataError) as info:
        tokenize_pair([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "a"}],
                      [{"role": "assistant", "content": "b"}], tok, 64, 32)
    assert "chat template failed" in str(info.value) and "secret" not in str(info.value).split("(", 1)[1]


def test_transformers_renders_templates_in_a_sandbox():
    """What the tests above rely on; fails loudly if a transformers upgrade changes how templates are compiled."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils import chat_template_utils

    compiled = chat_template_utils._compile_jinja_template("{{ messages[0]['content'] }}")
    assert isinstance(compiled.environment, ImmutableSandboxedEnvironment)


# ---------------------------------------------------------------------------------------------- text policy

def test_zwj_sequences_survive_tokenization(tiny_tok):
    """U+200D joins emoji and Indic/Persian letters: it is kept, and the ids decode back to it."""
    pair = tokenize_pair("Who?", " \U0001F469\u200d\U0001F4BB", " nobody", tiny_tok, 64, 32)
    assert "\u200d" in decode(tiny_tok, pair.chosen_ids)


def test_prompt_longer_than_max_length_is_truncated_not_dropped(tiny_tok):
    long_prompt = "word " * 400
    pair = tokenize_pair(long_prompt, " yes", " no", tiny_tok, 64, 32)
    assert pair.truncated and len(pair.prompt_ids) == 32
    assert pair.prompt_ids == encode(tiny_tok, long_prompt)[-32:]  # the end of the prompt, nearest the answer
    assert len(pair.prompt_ids) + len(pair.chosen_ids) <= 64 and pair.chosen_ids[-1] == tiny_tok.eos_token_id


def _chat_rows() -> list:
    rows = [normalize(r) for r in iter_records(str(Path(__file__).parent / "data" / "tricky-chat.jsonl"))]
    for i, content in enumerate(["plain", "ends with a tag <|im_start|>", "<|im_end|> opens", "two\n\n<|im_start|>user\nx",
                                 "spaces   ", " lead", "émoji 🙂 and 中文", "<|endoftext|>"]):
        rows.append(normalize(Record(f"made:{i}", {
            "prompt": [{"role": "system", "content": f"sys {i}"}, {"role": "user", "content": content}],
            "chosen": [{"role": "assistant", "content": f"{content} yes"}],
            "rejected": [{"role": "assistant", "content": f"no {content}"}]})))
    return rows


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_cutting_at_the_prompts_last_special_token_tokenizes_exactly_as_the_whole_text(which, request):
    """Each joint text is tokenized from the prompt's last split token on (``_special_cut``), its head taken
    from the prompt's ids: the ids are those of tokenizing the whole text, for every row, including texts that
    contain special-token strings themselves."""
    import dataclasses

    from dpokit.data.tokenize import encode_rows

    tok = tiny_tokenizer() if which == "tiny" else request.getfixturevalue("smollm2")
    rules = token_rules(tok)
    assert rules.split_tokens  # both are ChatML: the cut applies
    rows = _chat_rows()
    items = [(r.prompt, r.responses) for r in rows]
    plain = encode_rows(items, tok, 512, 256, None, dataclasses.replace(rules, split_tokens=()), on_error="skip")
    assert encode_rows(items, tok, 512, 256, None, rules, on_error="skip") == plain
    assert len(plain) == len(rows) > 10


def test_split_tokens_are_refused_when_added_tokens_overlap():
    from dpokit.data.tokenize import _split_tokens

    tok = tiny_tokenizer()
    assert [text for text, _ in _split_tokens(tok)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>assistant"]})  # contains <|im_start|>
    assert _split_tokens(tok) == ()
