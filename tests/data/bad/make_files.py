"""Write the bad-input files of this folder and EXPECTED.json, the manifest tests/test_bad_input.py runs.

Run it from anywhere (``python tests/data/bad/make_files.py``) after adding a case; the files are committed, so
the tests never depend on this script. Each manifest entry is one of:

- ``{"mode": "error", "fragment", "line", "reason"}``: with ``data.on_error: raise`` loading fails with a one-line
  DataError starting ``FILE:LINE: `` (``FILE: `` when ``line`` is null: the file as a whole is unusable) and
  containing ``fragment`` (``"line": "*"``: some line, where reading stopped). A ``reason`` means the problem is confined to one row: with ``on_error: skip`` the row
  is dropped and counted under that reason instead.
- ``{"mode": "drop", "dropped", "kept", "report"}``: a content problem; loading succeeds in every mode, with these
  drop counts, kept rows and report fields.

Optional: ``config`` (DataConfig fields for this case), ``absent`` (the path must not exist).
"""

import gzip
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED: dict[str, dict] = {}


def row(i, **fields):
    r = {"prompt": f"Question {i}?", "chosen": f" Good answer {i}.", "rejected": f" Bad answer {i}."}
    r.update(fields)
    return json.dumps(r, ensure_ascii=False)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def chat(i, **fields):
    r = {"prompt": user(f"Question {i}?"), "chosen": assistant(f"Good answer {i}."),
         "rejected": assistant(f"Bad answer {i}.")}
    r.update(fields)
    return json.dumps(r, ensure_ascii=False)


def ranked(i, values, key="ranking"):
    return json.dumps({"prompt": f"Rank these {i}.", "responses": [f" First {i}.", f" Second {i}.", f" Third {i}."],
                       key: values})


def write(name, content, expect):
    """``content``: a list of lines (UTF-8, "\\n" after each) or the exact bytes."""
    data = content if isinstance(content, bytes) else ("\n".join(content) + "\n").encode("utf-8")
    (HERE / name).write_bytes(data)
    EXPECTED[name] = expect


def error(fragment, line, reason=None, **extra):
    return {"mode": "error", "fragment": fragment, "line": line, "reason": reason, **extra}


def drop(dropped, kept, report=None, **extra):
    return {"mode": "drop", "dropped": dropped, "kept": kept, "report": report or {}, **extra}


def main():
    good1, good3 = row(1), row(3)

    # ---- malformed JSON lines
    write("truncated_object.jsonl", [good1, '{"prompt": "Question 2?", "chosen": " Good", "rej', good3],
          error("invalid JSON (Unterminated string starting at column 46)", 2, "malformed_json"))
    write("trailing_garbage.jsonl", [good1, row(2) + " }garbage", good3],
          error("invalid JSON (unexpected text after the object", 2, "malformed_json"))
    write("two_objects_one_line.jsonl", [good1, row(2) + row(4), good3],
          error("invalid JSON (unexpected text after the object", 2, "malformed_json"))
    write("deep_nesting.jsonl", [good1, '{"prompt": ' + "[" * 3000 + "]" * 3000 + "}", good3],
          error("invalid JSON (nested too deeply)", 2, "malformed_json"))
    write("huge_integer.jsonl", [good1, row(2)[:-1] + ', "id": ' + "9" * 5000 + "}", good3],
          error("invalid JSON (a number with too many digits)", 2, "malformed_json"))
    write("not_an_object.jsonl", [good1, "[1, 2, 3]", good3],
          error("expected a JSON object (one row), got a list", 2, "not_an_object"))

    # ---- keys and types
    write("missing_key.jsonl", [good1, json.dumps({"prompt": "Q2", "chosen": " a"}), good3],
          error("missing key 'rejected'", 2, "missing_key"))
    write("no_preference_fields.jsonl", [good1, json.dumps({"question": "Q2", "answer": " a"}), good3],
          error("no preference fields", 2, "missing_key"))
    write("null_value.jsonl", [good1, row(2, chosen=None), good3], error("'chosen' is null", 2, "wrong_type"))
    write("number_value.jsonl", [good1, row(2, rejected=42), good3],
          error("'rejected' must be a string or a list of messages, got a number", 2, "wrong_type"))
    write("nested_wrong_type.jsonl",
          [chat(1), chat(2, chosen=[{"role": "assistant", "content": {"text": "x"}}]), chat(3)],
          error("'chosen[0].content' must be a string, got an object", 2, "wrong_type"))
    write("message_not_a_dict.jsonl", [chat(1), chat(2, rejected=["just text"]), chat(3)],
          error("'rejected[0]' must be a message", 2, "wrong_type"))
    # Content parts may carry URLs and file paths; dpokit takes text only, so data never names a file to open.
    write("multimodal_content.jsonl", [chat(1), chat(2, prompt=[{"role": "user", "content": [
        {"type": "image", "url": "file:///etc/passwd"}, {"type": "text", "text": "What is this?"}]}]), chat(3)],
        error("'prompt[0].content' must be a string, got a list", 2, "wrong_type"))
    write("bad_ranking.jsonl", [json.dumps({"prompt": "Q1", "responses": [" a", " b"], "ranking": [1, 2]}),
                                json.dumps({"prompt": "Q2", "responses": [" a", " b"], "ranking": ["1st", "2nd"]}),
                                json.dumps({"prompt": "Q3", "responses": [" a", " b"], "ranking": [2, 1]})],
          error("'ranking' must be a list of 2 numbers", 2, "wrong_type"))
    write("mixed_formats.jsonl", [good1, row(2), chat(3), row(4)],
          error("format 'conversational' differs from 'standard' of the first row", 3, "mixed_formats"))

    # ---- message structure
    write("unknown_role.jsonl", [chat(1), chat(2, prompt=[{"role": "robot", "content": "beep?"}]), chat(3)],
          error("'prompt[0].role' is 'robot'; expected one of", 2, "bad_messages"))
    write("prompt_ends_with_assistant.jsonl", [chat(1), chat(2, prompt=user("Hi") + assistant("Hello")), chat(3)],
          error("'prompt' must end with a user turn", 2, "bad_messages"))
    write("response_not_assistant.jsonl", [chat(1), chat(2, chosen=user("I am the user")), chat(3)],
          error("'chosen[0]' must be an assistant turn, got role 'user'", 2, "bad_messages"))
    write("empty_message_list.jsonl", [chat(1), chat(2, rejected=[]), chat(3)],
          error("'rejected' is an empty list of messages", 2, "bad_messages"))

    # ---- text that is not text (JSON escapes, as another tool would write them)
    write("lone_surrogate.jsonl",
          [good1, '{"prompt": "Question 2?", "chosen": " Good \\ud800 answer", "rejected": " Bad"}', good3],
          error("'chosen' contains a lone surrogate (U+D800) at character 6", 2, "invalid_text"))
    write("nul_character.jsonl",
          [good1, '{"prompt": "Question\\u0000 2?", "chosen": " Good", "rejected": " Bad"}', good3],
          error("'prompt' contains a NUL character (U+0000)", 2, "invalid_text"))
    write("nul_in_message.jsonl",
          [chat(1), '{"prompt": [{"role": "user", "content": "Q\\u0000"}], "chosen": "a", "rejected": "b"}', chat(3)],
          error("'prompt[0].content' contains a NUL character", 2, "invalid_text"))

    # ---- bytes and files
    write("not_utf8.jsonl", (good1 + "\n").encode() + '{"prompt": "Caf\xe9?", "chosen": " a", "rejected": " b"}\n'
          .encode("latin-1") + (good3 + "\n").encode(), error("not valid UTF-8 (byte 0xe9 at column 16)", 2, "not_utf8"))
    write("line_too_long.jsonl", [good1, row(2, chosen=" " + "long " * 100), good3],
          error("line longer than data.max_line_bytes (200 bytes)", 2, "line_too_long", config={"max_line_bytes": 200}))
    write("utf16.jsonl", ("\n".join([good1, row(2)]) + "\n").encode("utf-16"), error("UTF-16 or UTF-32 text", None))
    write("gzip_without_suffix.jsonl", gzip.compress((good1 + "\n").encode(), mtime=0), error("gzip-compressed", None))
    whole = gzip.compress(("\n".join(row(i) for i in range(300)) + "\n").encode(), mtime=0)
    write("truncated.jsonl.gz", whole[:len(whole) // 2], error("cannot read the file (Compressed file ended", "*"))
    write("empty.jsonl", b"", error("file is empty", None))
    write("blank_lines_only.jsonl", b"\n   \r\n\t\n", error("no rows found", None))
    write("empty_list.json", b"[]", error("no rows found", None))
    write("broken_document.json", b'[\n  {"prompt": "Q", "chosen": " a", "rejected": " b"},\n  {"prompt": "Q2",\n]\n',
          error("invalid JSON (", 4))
    write("too_many_fields.csv", b"prompt,chosen,rejected\nQ1, a, b\nQ2, a, b, extra\nQ3, a, b\n",
          error("4 fields but the header names 3", 3, "malformed_csv"))
    os.makedirs(HERE / "a_directory.jsonl", exist_ok=True)
    (HERE / "a_directory.jsonl" / "README").write_text("A directory named like a data file: loading it is an error.\n")
    EXPECTED["a_directory.jsonl"] = error("is a directory", None)
    EXPECTED["does_not_exist.jsonl"] = error("file not found", None, absent=True)

    # ---- content problems: counted drops in every mode; and what is kept, cleaned, truncated
    write("chosen_equals_rejected.jsonl", [
        good1,
        row(2, chosen=" Same answer.", rejected=" Same answer."),
        row(3, chosen=" Same   answer.\n", rejected="Same answer."),          # whitespace
        row(4, chosen=" Caf\u00e9.", rejected=" Cafe\u0301."),                 # NFC: composed vs decomposed
        row(5, chosen=" Same answer.", rejected=" Same\u200b answer\u2060."),  # invisible characters
        row(6, chosen=" x\u00b2", rejected=" x2"),                             # NFKC would merge these: kept
    ], drop({"chosen_equals_rejected": 4}, 2))
    write("empty_fields.jsonl", [
        good1, row(2, prompt=""), row(3, prompt=" \t\n"), row(4, chosen=""), row(5, rejected="   "),
        row(6, chosen="\u200b\u200d"), row(7, rejected="\n"),
    ], drop({"empty_prompt": 2, "empty_response": 4}, 1))
    write("duplicates.jsonl", [good1, row(2), good1, row(2), row(2, chosen=" Good answer 2. ")],
          drop({"duplicate": 3}, 2))
    write("bidi_override.jsonl", [
        good1,
        row(2, chosen=" Transfer \u202e01$ 0001\u202c to the account."),
        row(3, prompt="Q\u202d3"),
        # Arabic with marks, Hebrew in an isolate: ordinary right-to-left text, kept
        row(4, chosen=" \u0645\u0631\u062d\u0628\u0627 \u200fok\u200e",
            rejected=" \u2067\u05e9\u05dc\u05d5\u05dd\u2069"),
    ], drop({"bidi_override": 2}, 2))
    write("zero_width.jsonl", [
        good1, row(2, chosen=" Good\u200b answer."), row(3, prompt="\ufeffQuestion 3?"),
        row(4, chosen=" \U0001F469\u200d\U0001F4BB works late."),  # a ZWJ emoji sequence: kept as is
    ], drop({}, 4, {"invisible_stripped": 2}))
    write("long_prompt.jsonl", [good1, row(2, prompt="Tell me about this: " + "very long context " * 150 + "?")],
          drop({}, 2, {"truncated": 1, "truncated_prompts": 1}, config={"max_length": 64, "max_prompt_length": 32}))
    write("bom_crlf_blank_lines.jsonl", b"\xef\xbb\xbf" + f"{good1}\r\n\r\n  \r\n{row(2)}\r\n\n{good3}".encode(),
          drop({}, 3))
    write("tied_rankings.jsonl", [
        ranked(1, [1, 2, 3]),                         # strict: one group of three
        ranked(2, [1, 1, 2]),                         # first = second > third: two pairs, one tie not trained
        ranked(3, [0.5, 0.5, 0.5], key="scores"),     # all tied: no preference at all
        ranked(4, [7, 7, 7]),
    ], drop({"all_tied": 2}, 2, {"ties": 1, "groups": 3}))

    (HERE / "EXPECTED.json").write_text(json.dumps(dict(sorted(EXPECTED.items())), indent=1, ensure_ascii=False)
                                        + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
