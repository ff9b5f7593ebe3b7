"""Loading and format handling: every file type, every format, every error a user can cause, and the report's
promise rows_read == rows_kept + dropped."""

import csv
import json
from pathlib import Path

import pytest

from dpokit.cli import run_check
from dpokit.config import DataConfig
from dpokit.data import iter_records, load_preferences, load_ranked, normalize, split_implicit
from dpokit.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CFG = DataConfig()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def load(path, tok, cfg=CFG):
    pairs, report = load_preferences(str(path), tok, cfg)
    assert report.rows_read == report.rows_kept + sum(report.dropped.values())
    assert report.rows_kept == len(pairs)
    return pairs, report


def data_error(fn, *args):
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message  # one line, always
    return message


# ----------------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("row, fmt", [
    ({"prompt": "Hi", "chosen": " yes", "rejected": " no"}, "standard"),
    ({"prompt": user("Hi"), "chosen": assistant("yes"), "rejected": assistant("no")}, "conversational"),
    ({"prompt": "Hi", "chosen": assistant("yes"), "rejected": assistant("no")}, "conversational"),
    ({"prompt": user("Hi"), "chosen": "yes", "rejected": "no"}, "conversational"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: yes", "rejected": "\n\nHuman: Hi\n\nAssistant: no"}, "implicit_prompt"),
    ({"chosen": user("Hi") + assistant("yes"), "rejected": user("Hi") + assistant("no")}, "implicit_conversational"),
    # UltraFeedback-binarized: a string prompt next to full conversations
    ({"prompt": "Hi", "chosen": user("Hi") + assistant("yes"), "rejected": user("Hi") + assistant("no")},
     "implicit_conversational"),
    ({"prompt": "Hi", "responses": ["a", "b", "c"], "ranking": [2, 1, 3]}, "ranked"),
    ({"prompt": user("Hi"), "responses": [assistant("a"), assistant("b")], "scores": [0.1, 0.9]},
     "ranked_conversational"),
])
def test_each_format_is_detected(row, fmt, tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    assert normalize(next(iter_records(path))).format == fmt
    cfg = DataConfig(dedupe=False)  # the same row twice
    if fmt.startswith("ranked"):
        items, report = load_ranked(path, tiny_tok, cfg)
    else:
        items, report = load(path, tiny_tok, cfg)
    assert report.formats == {fmt: 2} and report.rows_kept == 2 and len(items) == 2
    _, report = load_ranked(path, tiny_tok, CFG) if fmt.startswith("ranked") else load(path, tiny_tok)
    assert report.rows_kept == 1 and report.dropped == {"duplicate": 1}


def test_conversational_normalization(tmp_path):
    # A response that repeats the prompt messages first loses that copy; extra keys are ignored.
    path = write_jsonl(tmp_path / "d.jsonl", [{
        "id": 7, "score_chosen": 9.0, "prompt": user("Hi"),
        "chosen": user("Hi") + assistant("yes"), "rejected": {"role": "assistant", "content": "no"}}])
    row = normalize(next(iter_records(path)))
    assert (row.prompt, row.chosen, row.rejected) == (user("Hi"), assistant("yes"), assistant("no"))


def test_ranked_rows_sorted_best_first(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Q", "responses": [" mid", " best", " worst"], "ranking": [2, 1, 3]},
        {"prompt": "Q2", "responses": [" mid", " best", " worst"], "scores": [0.5, 0.9, 0.1]}])
    for record in iter_records(path):
        assert normalize(record).responses == [" best", " mid", " worst"]
    ranked, report = load_ranked(path, tiny_tok, CFG)
    assert report.rows_kept == 2
    assert [tiny_tok.decode(ids[:-1]) for ids in ranked[0].responses_ids] == [" best", " mid", " worst"]
    # The pairwise loader keeps ranked rows out, with a pointer to the loss that takes them.
    message = data_error(load_preferences, path, tiny_tok, CFG)
    assert message.startswith(f"{path}:1:") and "loss.name=plackett_luce" in message


def test_pairs_load_as_rankings_of_two(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": " good", "rejected": " bad"}])
    (ranked,), _ = load_ranked(path, tiny_tok, CFG)
    (pair,), _ = load(path, tiny_tok)
    assert ranked.responses_ids == [pair.chosen_ids, pair.rejected_ids]


def test_tied_rankings_train_only_their_strict_comparisons(tmp_path, tiny_tok, capsys):
    """Ties never become preferences: a tied ranking is split into the pairs between responses of different
    levels (best first); a ranking without ties stays one group; an all-tied ranking is dropped and counted."""
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "Q1", "responses": [" a", " b", " c"], "ranking": [0, 0, 5]},              # a = b > c
        {"prompt": "Q2", "responses": [" low", " high", " top"], "scores": [0.2, 1.0, 1.0]},  # high = top > low
        {"prompt": "Q3", "responses": [" x", " y", " z"], "ranking": [3, 1, 2]},              # y > z > x
        {"prompt": "Q4", "responses": [" same", " level"], "scores": [0.5, 0.5]}])            # nothing to learn
    groups, report = load_ranked(path, tiny_tok, CFG)
    texts = [[tiny_tok.decode(ids[:-1]) for ids in g.responses_ids] for g in groups]
    assert texts == [[" a", " c"], [" b", " c"], [" high", " low"], [" top", " low"], [" y", " z", " x"]]
    assert [g.location for g in groups] == [f"{path}:1"] * 2 + [f"{path}:2"] * 2 + [f"{path}:3"]
    assert (report.rows_read, report.rows_kept, report.dropped) == (4, 3, {"all_tied": 1})
    summary = report.to_dict()
    assert summary["ties"] == 2  # a = b and high = top: compared nowhere
    assert summary["groups"] == len(groups) == 5
    assert run_check(path, model="tiny-random-llama") == 0
    out = capsys.readouterr().out
    assert "all_tied" in out and "ties: 2 tied comparisons not trained" in out


def test_mixed_formats_name_the_first_differing_row(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "Hi", "chosen": " a", "rejected": " b"},
        {"prompt": "Hi", "chosen": " c", "rejected": " d"},
        {"prompt": user("Hi"), "chosen": assistant("a"), "rejected": assistant("b")},
        {"chosen": "x y", "rejected": "x z"}])
    message = data_error(load_preferences, path, tiny_tok, CFG)
    assert message.startswith(f"{path}:3: format 'conversational' differs from 'standard'")


# --------------------------------------------------------------------------------------------- implicit prompt

def test_hh_rlhf_split_after_last_assistant_marker():
    history = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: How do I bake bread?\n\nAssistant:"
    chosen = history + " Mix flour, water, salt and yeast, then bake."
    rejected = history + " Mix it yourself."  # responses share their first word: the cut stays at the marker
    split = split_implicit(chosen, rejected)
    assert (split.prompt, split.chosen, split.rejected) == (
        history, " Mix flour, water, salt and yeast, then bake.", " Mix it yourself.")


def test_implicit_split_needs_a_dialogue_marker():
    """Plain answers sharing words have no prompt to find: the shared opening is part of both answers."""
    assert split_implicit("The movie was great", "The movie was awful") is None
    assert split_implicit("yes", "no") is None
    header = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    split = split_implicit(header + "Hello<|im_end|>", header + "Go<|im_end|>")
    assert (split.prompt, split.chosen, split.rejected, split.dialogue.name) == (
        header, "Hello<|im_end|>", "Go<|im_end|>", "ChatML")


def test_implicit_rows_load_and_empty_prompt_rules(tmp_path, tiny_tok):
    hh = "\n\nHuman: Hi\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": hh + " Hello there!", "rejected": hh + " Go away."},
        {"chosen": hh[:-1] + "Assistant: Hi", "rejected": hh[:-1] + "Bob: Hi"}])  # only "Human" shared
    pairs, report = load(path, tiny_tok, DataConfig(on_error="skip", max_bad_fraction=0.5))
    assert report.rows_kept == 1 and report.formats == {"implicit_prompt": 1}
    assert report.dropped == {"implicit_prompt": 1}
    assert tiny_tok.decode(pairs[0].prompt_ids) == hh
    assert tiny_tok.decode(pairs[0].chosen_ids) == " Hello there!<|im_end|>"
    # ... but a standard row with an empty prompt is dropped and counted.
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "  ", "chosen": " a", "rejected": " b"},
                                             {"prompt": "Q", "chosen": " a", "rejected": " b"}])
    _, report = load(path, tiny_tok)
    assert report.dropped == {"empty_prompt": 1} and report.rows_kept == 1


def test_implicit_messages_take_common_leading_turns(tmp_path):
    turns = user("Hi") + assistant("Hello!") + user("Joke?")
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": turns + assistant("Knock knock."),
                                               "rejected": turns + assistant("No.")}])
    row = normalize(next(iter_records(path)))
    assert (row.prompt, row.chosen, row.rejected) == (turns, assistant("Knock knock."), assistant("No."))
    path = write_jsonl(tmp_path / "e.jsonl", [{"chosen": user("A") + assistant("x"),
                                               "rejected": user("B") + assistant("y")}])
    message = data_error(lambda: normalize(next(iter_records(path))))
    assert message.startswith(f"{path}:1: 'chosen[0]' is a 'user' turn")


# ---------------------------------------------------------------------------------------------- row validation

@pytest.mark.parametrize("row, needle", [
    ({"prompt": "Hi", "chosen": " a"}, "missing key 'rejected'"),
    ({"prompt": None, "chosen": " a", "rejected": " b"}, "'prompt' is null"),
    ({"prompt": "Hi", "chosen": 3, "rejected": " b"}, "'chosen' must be a string or a list of messages"),
    ({"prompt": "Hi", "chosen": " a", "rejected": assistant("b")}, "must both be strings"),
    ({"prompt": user("Hi"), "chosen": [{"role": "assistant"}], "rejected": assistant("b")},
     "'chosen[0].content' must be a string, got missing"),
    ({"prompt": user("Hi"), "chosen": [{"role": "assistant", "content": None}], "rejected": assistant("b")},
     "'chosen[0].content' must be a string, got null"),
    ({"prompt": user("Hi"), "chosen": ["text"], "rejected": assistant("b")}, "'chosen[0]' must be a message"),
    ({"prompt": assistant("Hi"), "chosen": assistant("a"), "rejected": assistant("b")},
     "'prompt' must end with a user turn"),
    ({"prompt": user("Hi"), "chosen": user("a"), "rejected": assistant("b")}, "'chosen[0]' must be an assistant"),
    ({"prompt": "Hi", "responses": ["a"], "ranking": [1]}, "'responses' must be a list of at least 2"),
    ({"prompt": "Hi", "responses": ["a", "b"]}, "need 'ranking'"),
    ({"prompt": "Hi", "responses": ["a", "b"], "scores": [1]}, "'scores' must be a list of 2 numbers"),
    ({"question": "Hi", "answer": "a"}, "no preference fields"),
])
def test_bad_rows_name_line_and_key(row, needle, tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": " a", "rejected": " b"}, row]
                       if "responses" not in row else [row])
    message = data_error(load_ranked if "responses" in row else load_preferences, path, tiny_tok, CFG)
    line = 1 if "responses" in row else 2
    assert message.startswith(f"{path}:{line}: ") and needle in message


def test_drops_are_counted_and_rows_add_up(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Q1", "chosen": " good", "rejected": " bad"},
        {"prompt": "Q2", "chosen": " same  answer", "rejected": "same answer"},
        {"prompt": "Q3", "chosen": " caf\u00e9", "rejected": " cafe\u0301"},  # equal after NFC
        {"prompt": "Q4", "chosen": "   ", "rejected": " bad"},
        {"prompt": "", "chosen": " good", "rejected": " bad"},
    ])
    pairs, report = load(path, tiny_tok)
    assert report.rows_read == 5 and report.rows_kept == 1
    assert report.dropped == {"chosen_equals_rejected": 2, "empty_response": 1, "empty_prompt": 1}
    summary = report.to_dict()
    assert summary["rows_dropped"] == 4
    assert set(summary["prompt_tokens"]) == {"count", "min", "mean", "p50", "p95", "max"}
    assert summary["response_tokens"]["count"] == 2


def test_max_rows(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "chosen": " a", "rejected": " b"}
                                              for i in range(10)])
    _, report = load(path, tiny_tok, DataConfig(max_rows=3))
    assert report.rows_read == 3


# ------------------------------------------------------------------------------------------------- file types

ROWS = [{"prompt": "Hi", "chosen": " hello", "rejected": " go"},
        {"prompt": "Bye", "chosen": " see you", "rejected": " finally"}]


@pytest.mark.parametrize("layout", ["list", "data", "train"])
def test_json_files(layout, tmp_path, tiny_tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS if layout == "list" else {layout: ROWS}))
    pairs, report = load(path, tiny_tok)
    assert report.rows_kept == 2 and [p.location for p in pairs] == [f"{path}:row 0", f"{path}:row 1"]


def test_csv_file_with_multiline_field(tmp_path, tiny_tok):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected", "id"])
        writer.writeheader()
        writer.writerow({"prompt": "Two lines\nhere", "chosen": " a", "rejected": " b", "id": 1})
        writer.writerow({"prompt": "Hi", "chosen": " a", "rejected": " b", "id": 2})
    pairs, report = load(path, tiny_tok)
    assert [p.location for p in pairs] == [f"{path}:2", f"{path}:4"]
    assert tiny_tok.decode(pairs[0].prompt_ids) == "Two lines\nhere"
    path.write_text("prompt,chosen,rejected\nHi, a\n")
    assert data_error(load_preferences, str(path), tiny_tok, CFG) == f"{path}:2: missing key 'rejected'"


def test_parquet_file(tmp_path, tiny_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversational = [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]),
                       "rejected": assistant(r["rejected"])} for r in ROWS]
    for name, rows in (("s.parquet", ROWS), ("c.parquet", conversational)):
        path = tmp_path / name
        pq.write_table(pa.Table.from_pylist(rows), path)
        pairs, report = load(path, tiny_tok)
        assert report.rows_kept == 2 and pairs[1].location == f"{path}:row 1"
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in data_error(load_preferences, str(path), tiny_tok, CFG)


def test_gzipped_jsonl(tmp_path, tiny_tok):
    import gzip

    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    _, report = load(path, tiny_tok)
    assert report.rows_kept == 2


def test_crlf_bom_and_blank_lines(tmp_path, tiny_tok):
    lines = [json.dumps(r) for r in ROWS]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{lines[0]}\r\n\r\n   \r\n{lines[1]}\r\n\r\n".encode())
    pairs, report = load(path, tiny_tok)
    assert report.rows_read == 2 and [p.location for p in pairs] == [f"{path}:1", f"{path}:4"]
    # Blank lines are not rows, but they are lines: an error after them names the right one.
    path.write_bytes(f"{lines[0]}\r\n\r\n{{broken\r\n".encode())
    assert data_error(load_preferences, str(path), tiny_tok, CFG).startswith(f"{path}:3: invalid JSON (")


def test_malformed_json_line(tmp_path, tiny_tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "Hi", "chosen": ' + "\n")
    message = data_error(load_preferences, str(path), tiny_tok, CFG)
    assert message.startswith(f"{path}:2: invalid JSON (") and "column" in message
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    assert data_error(load_preferences, str(path), tiny_tok, CFG).startswith(f"{path}:2: expected a JSON object")


def test_line_longer_than_max_line_bytes(tmp_path, tiny_tok):
    short = json.dumps({**ROWS[0], "id": "padding to reach the 64-byte minimum"})
    long = json.dumps({"prompt": "x" * 500, "chosen": " a", "rejected": " b"})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{short}\r\n{long}\n")
    cfg = DataConfig(max_line_bytes=len(short))  # exactly fits the first line, CRLF included
    message = data_error(load_preferences, str(path), tiny_tok, cfg)
    assert message.startswith(f"{path}:2: line longer than data.max_line_bytes")


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "blank_only", "unknown_type", "empty_list"])
def test_unusable_sources_are_one_line_errors(case, tmp_path, tiny_tok):
    path = tmp_path / "d.jsonl"
    if case == "empty":
        path.write_text("")
    elif case == "directory":
        path.mkdir()
    elif case == "blank_only":
        path.write_text("\n  \n\r\n")
    elif case == "unknown_type":
        path = tmp_path / "d.txt"
        path.write_text("prompt chosen rejected\n")
    elif case == "empty_list":
        path = tmp_path / "d.json"
        path.write_text("[]")
    message = data_error(load_preferences, str(path), tiny_tok, CFG)
    expected = {"missing": "file not found", "empty": "file is empty", "directory": "is a directory",
                "blank_only": "no rows found", "unknown_type": "unknown file type", "empty_list": "no rows found"}
    assert message.startswith(str(path)) and expected[case] in message


def test_hub_id_without_network_is_a_one_line_error(tiny_tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = data_error(load_preferences, "no-such-owner/no-such-dataset", tiny_tok, CFG)
    assert message.startswith("no-such-owner/no-such-dataset: not a local file")


# ----------------------------------------------------------------------------------------- shipped examples, CLI

@pytest.mark.parametrize("name, n, fmt", [("prefs-tiny.jsonl", 64, "standard"),
                                          ("prefs-chat.jsonl", 48, "conversational"),
                                          ("prefs-chat-eval.jsonl", 16, "conversational")])
def test_shipped_examples_load_cleanly(name, n, fmt, tiny_tok):
    pairs, report = load(ROOT / "examples" / name, tiny_tok, DataConfig(max_length=256, max_prompt_length=128))
    assert report.rows_read == report.rows_kept == n and report.formats == {fmt: n}
    assert report.truncated == 0 and report.boundary_fallback == 0


@pytest.mark.parametrize("train, held_out", [("prefs-chat.jsonl", "prefs-chat-eval.jsonl"),
                                             ("prefs-tiny.jsonl", "prefs-tiny-eval.jsonl")])
def test_eval_prompts_are_held_out(train, held_out):
    def prompts(name):
        rows = [json.loads(line) for line in open(ROOT / "examples" / name)]
        return {json.dumps(row["prompt"]) for row in rows}

    if not (ROOT / "examples" / held_out).exists():
        pytest.skip(f"{held_out} not shipped")
    assert not prompts(train) & prompts(held_out)


def test_run_check_prints_counts(capsys):
    assert run_check(str(ROOT / "tests" / "data" / "tricky.jsonl"), model="tiny-random-llama") == 0
    out = capsys.readouterr().out
    for needle in ("rows read", "rows kept", "rows dropped", "standard (17)", "p95", "boundary fallback: 2"):
        assert needle in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("rows ")] == ["17", "17", "0"]


def test_run_check_counts_drops_and_fails_without_usable_rows(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " a"},
                                              {"prompt": "Q", "chosen": "", "rejected": " b"}])
    assert run_check(path, model="tiny-random-llama") == 1
    out = capsys.readouterr().out
    assert "chosen_equals_rejected" in out and "empty_response" in out and "no usable rows" in out


@pytest.mark.slow
def test_run_check_default_model(capsys):
    assert run_check(str(ROOT / "examples" / "prefs-chat.jsonl")) == 0
    assert "conversational (48)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- streaming building blocks

def test_length_summary_matches_sorted_list():
    import math
    import random

    from dpokit.data.pipeline import LengthSummary, length_stats

    rng = random.Random(0)
    lengths = [rng.randint(1, 3000) for _ in range(5001)]
    ordered = sorted(lengths)

    def rank(q):  # nearest rank, by the textbook definition
        return ordered[math.ceil(q * len(ordered)) - 1]

    assert length_stats(lengths) == {"count": 5001, "min": ordered[0], "mean": round(sum(lengths) / 5001, 2),
                                     "p50": rank(0.5), "p95": rank(0.95), "max": ordered[-1]}
    assert length_stats([]) == {"count": 0, "min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    assert length_stats([7]) == {"count": 1, "min": 7, "mean": 7.0, "p50": 7, "p95": 7, "max": 7}
    # Above the cap lengths share power-of-two buckets, so memory stays fixed; min, max, mean stay exact.
    summary = LengthSummary()
    for n in (10, 100_000, 100_001, 200_000):
        summary.add(n)
    stats = summary.stats()
    assert (stats["min"], stats["max"], stats["mean"]) == (10, 200_000, 100_002.75)
    assert len(summary.counts) == 3  # 10, [65536, 131072), [131072, 262144)
    assert (stats["p50"], stats["p95"]) == (65_536, 131_072)  # a bucket reports its lower bound


def test_digest_set_is_a_set():
    import random

    from dpokit.data.pipeline import DigestSet

    rng = random.Random(1)
    values = [rng.getrandbits(64) for _ in range(20000)] + [0, 1]
    values += values[:5000]  # repeats
    digests, reference = DigestSet(capacity=16), set()
    for v in values:
        assert digests.add(v) == ((v or 1) not in reference)
        reference.add(v or 1)
    assert len(digests) == len(reference)
    assert digests.nbytes <= 8 * 3 * len(reference)  # at most 1/3 empty slots over 2/3 load: ~24 bytes a row


def test_format_character_table_is_unicode_category_cf():
    import unicodedata

    from dpokit.data.formats import _FORMAT_CHARS

    cf = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"]
    assert all(_FORMAT_CHARS.fullmatch(c) for c in cf)
    assert not _FORMAT_CHARS.search("plain text, العربية, עברית, 中文, 👩")


# ------------------------------------------------------------------------------------------------ train/eval

def test_find_overlap_counts_shared_pairs_and_prompts(tmp_path, tiny_tok):
    from dpokit.data import find_overlap, overlap_report

    train = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": f"Q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(6)])
    held = write_jsonl(tmp_path / "eval.jsonl", [
        {"prompt": "Q1", "chosen": " good 1", "rejected": " bad 1"},     # the same pair
        {"prompt": "Q2", "chosen": " good 2 ", "rejected": " bad 2"},    # a trailing space: other tokens
        {"prompt": "Q3", "chosen": " other", "rejected": " bad 3"},      # shared prompt only
        {"prompt": "Q4", "chosen": " bad 4", "rejected": " good 4"},     # swapped responses: prompt only
        {"prompt": "Q9", "chosen": " good 9", "rejected": " bad 9"},     # new
    ])
    train_pairs, _ = load(train, tiny_tok)
    eval_pairs, _ = load(held, tiny_tok)
    # " good 2 " tokenizes differently from " good 2" (the trailing space is a token): a different pair
    assert find_overlap(train_pairs, eval_pairs) == 1
    assert find_overlap(train_pairs, eval_pairs, by="prompt") == 4
    assert overlap_report(train_pairs, eval_pairs) == {"pairs": 1, "prompts": 4, "eval_rows": 5}
    ranked, _ = load_ranked(train, tiny_tok, CFG)
    assert find_overlap(ranked, ranked) == 6 and find_overlap(train_pairs, []) == 0


# ---------------------------------------------------------------------------------------------- sources, paths

@pytest.mark.parametrize("source", ["not a hub id", "owner/na me", "owner/..", "owner/name::evil", "owner/name:",
                                    "owner/name:a:b", "-rf"])
def test_invalid_hub_ids_are_refused_before_any_lookup(source, tiny_tok, monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("load_dataset must not be called")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    message = data_error(load_preferences, source, tiny_tok, CFG)
    assert message.startswith(source) and ("not a hub dataset id" in message or "file not found" in message)


def test_single_object_json_file_is_one_row(tmp_path, tiny_tok):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(ROWS[0]))
    pairs, report = load(path, tiny_tok)
    assert report.rows_read == 1 and pairs[0].location == f"{path}:row 0"


def test_run_check_settings_are_validated_with_their_key():
    from dpokit.errors import ConfigError

    with pytest.raises(ConfigError, match="^data.on_error: "):
        run_check(str(ROOT / "tests" / "data" / "tricky.jsonl"), model="tiny-random-llama", on_error="ignore")
    with pytest.raises(ConfigError, match="^data.max_prompt_length: "):
        run_check(str(ROOT / "tests" / "data" / "tricky.jsonl"), model="tiny-random-llama", max_length=16,
                  max_prompt_length=16)


def test_report_dict_has_the_audit_fields(tiny_tok):
    _, report = load(ROOT / "tests" / "data" / "tricky.jsonl", tiny_tok)
    summary = report.to_dict()
    for key in ("rows_read", "rows_kept", "rows_dropped", "rows_malformed", "dropped", "truncated",
                "truncated_prompts", "invisible_stripped", "boundary_fallback", "formats", "errors",
                "prompt_tokens", "response_tokens"):
        assert key in summary
    json.dumps(summary)


# ---------------------------------------------------------------------------------------------------- unpaired

@pytest.mark.parametrize("row, fmt", [
    ({"prompt": "Hi", "completion": " yes", "label": True}, "unpaired"),
    ({"prompt": user("Hi"), "completion": assistant("yes"), "label": False}, "unpaired_conversational"),
    ({"prompt": "Hi", "completion": assistant("yes"), "label": True}, "unpaired_conversational"),
    ({"prompt": user("Hi"), "completion": "yes", "label": False}, "unpaired_conversational"),
])
def test_unpaired_rows_are_detected_and_keep_their_label(row, fmt, tmp_path, tiny_tok):
    from dpokit.data import load_unpaired

    path = write_jsonl(tmp_path / "d.jsonl", [row])
    parsed = normalize(next(iter_records(path)))
    assert parsed.format == fmt and parsed.label is row["label"] and len(parsed.responses) == 1
    items, report = load_unpaired(path, tiny_tok, CFG)
    assert len(items) == 1 and len(items[0].responses_ids) == 1 and items[0].label is row["label"]
    assert (report.desirable, report.undesirable) == ((1, 0) if row["label"] else (0, 1))


def test_unpaired_counts_refusals_and_labels(tmp_path, tiny_tok):
    from dpokit.data import load_unpaired

    rows = [{"prompt": f"Q{i}", "completion": f" A{i}", "label": i % 3 != 0} for i in range(6)]
    rows.append({"prompt": "Q0", "completion": " A0", "label": True})  # the same text labelled the other way
    rows.append({"prompt": "Q1", "completion": " A1", "label": True})  # a duplicate
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    items, report = load_unpaired(path, tiny_tok, CFG)
    # Q0 is labelled both ways: both of its rows go, as a pair with chosen == rejected would.
    assert report.rows_read == 8 and report.rows_kept == 5
    assert report.dropped == {"duplicate": 1, "conflicting_labels": 2}
    assert (report.desirable, report.undesirable) == (4, 1) and len(items) == 5
    assert report.to_dict()["desirable"] == 4
    # Unpaired and pairwise files are each refused by the other kind of loss, with one line.
    assert "need loss.name=kto" in data_error(load_preferences, path, tiny_tok, CFG)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": " a", "rejected": " b"}])
    assert "loss.name=kto takes unpaired rows" in data_error(load_unpaired, pairs, tiny_tok, CFG)


@pytest.mark.parametrize("row, needle", [
    ({"prompt": "Hi", "completion": " yes", "label": "yes"}, "'label' must be true or false"),
    ({"prompt": "Hi", "completion": " yes", "label": 1}, "'label' must be true or false"),
    ({"prompt": "Hi", "completion": " yes"}, "missing 'label'"),
    ({"completion": " yes", "label": True}, "missing 'prompt'"),
    ({"prompt": "Hi", "label": True}, "missing 'completion'"),
])
def test_bad_unpaired_rows_name_line_and_key(row, needle, tmp_path, tiny_tok):
    from dpokit.data import load_unpaired

    path = write_jsonl(tmp_path / "d.jsonl", [row])
    message = data_error(load_unpaired, path, tiny_tok, CFG)
    assert "d.jsonl:1" in message and needle in message


def test_data_check_prints_label_counts(tmp_path, capsys):
    rows = [{"prompt": f"Q{i}", "completion": f" A{i}", "label": i < 3} for i in range(4)]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    from dpokit.cli import main

    assert main(["data", "check", path, "--model", "tiny-random-llama"]) in (0, None)
    assert "labels: 3 desirable, 1 undesirable" in capsys.readouterr().out
