"""Rows shaped like popular preference datasets (columns and value shapes from their cards and loaders): each is
read right or refused in one line, never trained silently wrong. Every case here was trained wrong (or refused
for the wrong reason) before ``data.columns``, the implicit-prompt guards and the system column existed."""

import json

import pytest

from dpokit.cli import run_check
from dpokit.config import DataConfig, load_config
from dpokit.data import iter_records, load_preferences, load_unpaired, normalize
from dpokit.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def refused(fn, *args):
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def decoded(tok, group):
    return (tok.decode(group.prompt_ids), *(tok.decode(ids) for ids in group.responses_ids))


# Intel/orca_dpo_pairs: system (often empty), question, chosen, rejected; no prompt.
ORCA = [{"system": "", "question": "What is 6 times 7?", "chosen": "The answer is 42.",
         "rejected": "The answer is 32."},
        {"system": "You are an AI assistant. Think step by step.", "question": "Name a prime above 10.",
         "chosen": "Eleven is prime.", "rejected": "Twelve is prime."}]
# argilla/distilabel-intel-orca-dpo-pairs: 'input' instead of 'question', plus labelling columns.
ARGILLA_ORCA = [{"system": "", "input": "What is 6 times 7?", "chosen": "The answer is 42.",
                 "rejected": "The answer is 32.", "generations": ["The answer is 42.", "The answer is 32."],
                 "order": ["chosen", "rejected"], "status": "tie", "in_gsm8k_train": False}]
# jondurbin/truthy-dpo-v0.1: a persona system prompt beside a string prompt.
TRUTHY = [{"id": "a1", "source": "truthy_dpo", "system": "You are Ada Lovelace. Answer as Ada would.",
           "prompt": "What are you working on?", "chosen": " The Analytical Engine's notes.",
           "rejected": " I am an AI language model."}]
# openbmb/UltraInteract_pair: the prompt lives in 'trajectory' (ShareGPT-style turns).
ULTRAINTERACT = [{"task": "Math_CoT", "dataset": "mathqa",
                  "trajectory": [{"from": "user", "value": "Solve 2 + 2. Answer with a number."}],
                  "chosen": "Step 1: add. 4", "rejected": "Step 1: add. 5", "id": 7, "parent_id": 3}]
# Anthropic/hh-rlhf: the two conversations diverge at the first assistant turn, not the last.
HH_DIVERGING = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Knock knock.",
                 "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Rude!\n\nAssistant: Sorry."}]
HH_GOOD = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}]
CHATML_PROMPT = "<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n"
# Pre-templated ChatML text (the chatml_format of a widely read DPO tutorial).
CHATML = [{"prompt": CHATML_PROMPT, "chosen": "42<|im_end|>\n", "rejected": "32<|im_end|>\n"}]
# Magpie-Align/Magpie-*-DPO: full conversations in chosen/rejected, plus 'instruction', 'responses', 'rewards'.
MAGPIE = [{"uuid": "u1", "instruction": "Say hi.", "responses": ["Hi!", "Hello.", "Yo."],
           "rewards": [0.9, 0.5, 0.1],
           "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
           "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Yo."}]}]
# stanfordnlp/SHP: two comments, 'labels' 1 when A is preferred.
SHP = [{"post_id": "p1", "domain": "askscience_train", "history": "Why is the sky blue?",
        "human_ref_A": "Rayleigh scattering.", "human_ref_B": "Because it is.", "labels": 1, "score_A": 40,
        "score_B": 2},
       {"post_id": "p2", "domain": "askscience_train", "history": "Why is snow white?",
        "human_ref_A": "It is cold.", "human_ref_B": "Ice crystals scatter all colours.", "labels": 0,
        "score_A": 1, "score_B": 30}]


@pytest.mark.parametrize("rows, column", [(ORCA, "question"), (ARGILLA_ORCA, "input"),
                                          (ULTRAINTERACT, "trajectory")])
def test_a_prompt_column_beside_chosen_rejected_is_not_guessed_around(rows, column, tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    message = refused(load_preferences, path, tiny_tok, DataConfig())
    assert message.startswith(f"{path}:1: ") and f"'{column}'" in message
    assert f"data.columns: {{prompt: {column}" in message


def test_implicit_prompt_needs_a_dialogue_marker_and_a_shared_opening(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "The answer is 42.", "rejected": "The answer is 32."}])
    assert "no dialogue turn marker" in refused(load_preferences, path, tiny_tok, DataConfig())
    path = write_jsonl(tmp_path / "e.jsonl", [{"chosen": "Yes.", "rejected": "No."}])
    assert "share no opening text" in refused(load_preferences, path, tiny_tok, DataConfig())
    # skip mode counts them under their own reason, and stops above data.max_bad_fraction
    path = write_jsonl(tmp_path / "f.jsonl", HH_GOOD * 19 + [{"chosen": "Yes.", "rejected": "No."}])
    _, report = load_preferences(path, tiny_tok, DataConfig(on_error="skip", dedupe=False))
    assert report.dropped == {"implicit_prompt": 1} and report.rows_kept == 19


def test_orca_mapped_with_columns_trains_question_and_system(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", ORCA)
    cfg = DataConfig(columns={"prompt": "question", "system": "system"})
    pairs, report = load_preferences(path, tiny_tok, cfg)
    assert report.rows_kept == 2 and report.formats == {"conversational": 2}
    prompt, chosen, rejected = decoded(tiny_tok, pairs[1])
    assert prompt == ("<|im_start|>system\nYou are an AI assistant. Think step by step.<|im_end|>\n"
                      "<|im_start|>user\nName a prime above 10.<|im_end|>\n<|im_start|>assistant\n")
    assert (chosen, rejected) == ("Eleven is prime.<|im_end|>", "Twelve is prime.<|im_end|>")
    # An empty system column adds no system message (the template's own default, if any, applies).
    assert decoded(tiny_tok, pairs[0])[0] == "<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n"


def test_a_system_column_beside_a_string_prompt_is_applied(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", TRUTHY)
    pairs, report = load_preferences(path, tiny_tok, DataConfig())
    assert report.formats == {"conversational": 1}
    assert decoded(tiny_tok, pairs[0])[0].startswith(
        "<|im_start|>system\nYou are Ada Lovelace. Answer as Ada would.<|im_end|>\n<|im_start|>user\n")


def test_a_system_column_without_a_chat_template_is_refused(tmp_path, tiny_tok):
    import copy

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", TRUTHY)
    message = refused(load_preferences, path, tok, DataConfig())
    assert message.startswith(f"{path}:1: ") and "chat template" in message and "'system'" in message


def test_ultrainteract_trajectory_maps_as_the_prompt(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", ULTRAINTERACT)
    pairs, _ = load_preferences(path, tiny_tok, DataConfig(columns={"prompt": "trajectory"}))
    prompt, chosen, _ = decoded(tiny_tok, pairs[0])
    assert prompt == "<|im_start|>user\nSolve 2 + 2. Answer with a number.<|im_end|>\n<|im_start|>assistant\n"
    assert chosen == "Step 1: add. 4<|im_end|>"


def test_pre_templated_chatml_text_ends_with_one_end_token(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", CHATML)
    pairs, _ = load_preferences(path, tiny_tok, DataConfig())
    assert decoded(tiny_tok, pairs[0]) == (CHATML_PROMPT, "42<|im_end|>", "32<|im_end|>")
    # the same text as implicit-prompt rows: the cut is after the ChatML assistant header
    path = write_jsonl(tmp_path / "e.jsonl", [{"chosen": CHATML_PROMPT + r["chosen"],
                                               "rejected": CHATML_PROMPT + r["rejected"]} for r in CHATML])
    pairs, report = load_preferences(path, tiny_tok, DataConfig())
    assert report.formats == {"implicit_prompt": 1}
    assert decoded(tiny_tok, pairs[0]) == (CHATML_PROMPT, "42<|im_end|>", "32<|im_end|>")


def test_a_system_column_beside_dialogue_text_is_refused_and_beside_messages_applied(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"system": "Be brief.", **HH_GOOD[0]}])
    assert "a 'system' column beside chosen/rejected dialogue text" in refused(load_preferences, path, tiny_tok,
                                                                              DataConfig())
    path = write_jsonl(tmp_path / "e.jsonl", [{"system": "Be brief.", "chosen": MAGPIE[0]["chosen"],
                                               "rejected": MAGPIE[0]["rejected"]}])
    pairs, report = load_preferences(path, tiny_tok, DataConfig())
    assert report.formats == {"implicit_conversational": 1}
    assert decoded(tiny_tok, pairs[0])[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")


def test_hh_rows_diverging_before_the_last_turn_are_refused_like_message_lists(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", HH_DIVERGING)
    message = refused(load_preferences, path, tiny_tok, DataConfig())
    assert message.startswith(f"{path}:1: ") and "only the final assistant turn may differ" in message
    path = write_jsonl(tmp_path / "e.jsonl", HH_GOOD + HH_DIVERGING)
    _, report = load_preferences(path, tiny_tok, DataConfig(on_error="skip", max_bad_fraction=0.5))
    assert report.dropped == {"bad_messages": 1} and report.rows_kept == 1


@pytest.mark.parametrize("extra", [{"responses": ["a", "b"]}, {"label": True}, {"label": "harmless"}])
def test_reserved_names_never_shadow_a_valid_pair(extra, tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "chosen": " yes", "rejected": " no", **extra}])
    pairs, report = load_preferences(path, tiny_tok, DataConfig())
    assert report.formats == {"standard": 1} and decoded(tiny_tok, pairs[0])[1] == " yes<|im_end|>"


def test_magpie_rows_read_as_conversations(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", MAGPIE)
    pairs, report = load_preferences(path, tiny_tok, DataConfig())
    assert report.formats == {"implicit_conversational": 1}
    assert decoded(tiny_tok, pairs[0])[1:] == ("Hi!<|im_end|>", "Yo.<|im_end|>")


def test_shp_label_picks_the_preferred_column(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", SHP)
    cfg = DataConfig(columns={"prompt": "history", "chosen": "human_ref_A", "rejected": "human_ref_B",
                              "label": "labels"})
    pairs, report = load_preferences(path, tiny_tok, cfg)
    assert report.formats == {"standard": 2}
    assert [decoded(tiny_tok, p)[1:] for p in pairs] == [
        ("Rayleigh scattering.<|im_end|>", "Because it is.<|im_end|>"),
        ("Ice crystals scatter all colours.<|im_end|>", "It is cold.<|im_end|>")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**SHP[0], "labels": 2}])
    message = refused(load_preferences, bad, tiny_tok, cfg)
    assert message.startswith(f"{bad}:1: ") and "'labels' (data.columns.label)" in message
    missing = write_jsonl(tmp_path / "m.jsonl", [{"history": "q", "human_ref_A": "a", "labels": 1}])
    assert "missing column 'human_ref_B' (data.columns.rejected)" in refused(load_preferences, missing, tiny_tok, cfg)


def test_columns_config_is_validated_in_one_line():
    with pytest.raises(ConfigError) as info:
        load_config({"data": {"columns": {"promt": "question"}}})
    message = str(info.value)
    assert "\n" not in message and "data.columns: unknown target 'promt'" in message
    with pytest.raises(ConfigError, match="data.columns: 'label' maps a pair's preference"):
        load_config({"data": {"columns": {"label": "labels"}}})
    assert load_config({"data": {"columns": {"prompt": "question"}}}).data.columns == {"prompt": "question"}


def test_columns_enter_the_data_cache_key(tmp_path, tiny_tok):
    """Two mappings of the same file give different groups; a cache keyed without data.columns would hand the
    second run the first one's."""
    from dpokit.data.cache import load_cached

    path = write_jsonl(tmp_path / "shp.jsonl", SHP)
    groups = []
    for chosen, rejected in (("human_ref_A", "human_ref_B"), ("human_ref_B", "human_ref_A")):
        cfg = DataConfig(cache_dir=str(tmp_path / "cache"),
                         columns={"prompt": "history", "chosen": chosen, "rejected": rejected, "label": "labels"})
        cached, _ = load_cached(path, tiny_tok, cfg)
        groups.append([decoded(tiny_tok, g)[1] for g in cached])
    assert groups[0] == ["Rayleigh scattering.<|im_end|>", "Ice crystals scatter all colours.<|im_end|>"]
    assert groups[1] == ["Because it is.<|im_end|>", "It is cold.<|im_end|>"]


def test_kto_rows_labelled_both_ways_are_dropped_and_counted(tmp_path, tiny_tok):
    prompt = [{"role": "user", "content": "Is water wet?"}]
    rows = [{"prompt": prompt, "completion": [{"role": "assistant", "content": "Yes."}], "label": True},
            {"prompt": prompt, "completion": [{"role": "assistant", "content": "No."}], "label": False},
            {"prompt": prompt, "completion": [{"role": "assistant", "content": "Yes. "}], "label": False}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    items, report = load_unpaired(path, tiny_tok, DataConfig())
    assert [tiny_tok.decode(g.responses_ids[0]) for g in items] == ["No.<|im_end|>"]
    assert report.dropped == {"conflicting_labels": 2}
    assert report.rows_read == report.rows_kept + report.rows_dropped
    # the data cache settles rows from lengths and offsets only: the same groups, the same counts
    from dpokit.data.cache import load_cached

    cached, cached_report = load_cached(path, tiny_tok, DataConfig(cache_dir=str(tmp_path / "cache")),
                                        want="unpaired")
    assert [(g.prompt_ids, g.responses_ids, g.label) for g in cached] == [
        (g.prompt_ids, g.responses_ids, g.label) for g in items]
    assert cached_report.dropped == {"conflicting_labels": 2} and cached_report.undesirable == 1


def test_hub_config_and_split(tmp_path, tiny_tok, monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(TRUTHY)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records = list(iter_records("owner/prefs:persona", split="test"))
    assert calls == [("owner/prefs", "persona", "test")]
    assert records[0].location == "owner/prefs:persona[test]:row 0"
    assert normalize(records[0]).format == "conversational"
    code = run_check("owner/prefs:persona", model="tiny-random-llama", split="validation", cache=False, show=1)
    assert code == 0 and calls[-1] == ("owner/prefs", "persona", "validation")


def test_data_check_show_prints_rows_as_trained(tmp_path, tiny_tok, capsys):
    # A folder name long enough that file:line passes the 80 columns of a non-terminal console: the location is
    # one unbroken line, so it can be copied or grepped (it once wrapped mid-path).
    deep = tmp_path / ("a-long-folder-name-" * 5)
    deep.mkdir()
    path = write_jsonl(deep / "d.jsonl", CHATML)
    assert run_check(path, model="tiny-random-llama", cache=False, show=3) == 0
    out = capsys.readouterr().out
    assert f"{path}:1" in out
    assert repr(CHATML_PROMPT) in out and repr("42<|im_end|>") in out and repr("32<|im_end|>") in out


def test_data_check_cli_maps_columns_and_shows_rows(tmp_path, capsys):
    from dpokit.cli import main

    path = write_jsonl(tmp_path / "orca.jsonl", ORCA)
    assert main(["data", "check", path, "--model", "tiny-random-llama", "--no-cache", "--column", "prompt=question",
                 "--column", "system=system", "--show", "1"]) in (0, None)
    out = capsys.readouterr().out
    assert "conversational (2)" in out and repr("The answer is 42.<|im_end|>") in out
    assert main(["data", "check", path, "--model", "tiny-random-llama", "--column", "promt=question"]) == 2
    err = capsys.readouterr().err
    assert "data.columns: unknown target 'promt'" in err and err.count("\n") == 1
