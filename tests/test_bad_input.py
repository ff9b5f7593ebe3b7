"""Every bad input in tests/data/bad/ (see EXPECTED.json and make_files.py there) ends in a one-line DataError
naming file:line, or in a counted drop; with ``data.on_error: skip`` row-level errors become counted drops too.
In every mode rows_read == rows_kept + sum(dropped by reason)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit.cli import run_check
from dpokit.config import DataConfig
from dpokit.data import MALFORMED_REASONS, load_any, load_preferences
from dpokit.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "data" / "bad"
EXPECTED = json.loads((BAD / "EXPECTED.json").read_text(encoding="utf-8"))
ERRORS = sorted(name for name, e in EXPECTED.items() if e["mode"] == "error")
ROW_ERRORS = sorted(name for name in ERRORS if EXPECTED[name]["reason"])
DROPS = sorted(name for name, e in EXPECTED.items() if e["mode"] == "drop")


def cfg_for(name, **overrides):
    return DataConfig(**{**EXPECTED[name].get("config", {}), **overrides})


def accounted(report):
    assert report.rows_read == report.rows_kept + sum(report.dropped.values())
    return report


def location_prefix(path, line):
    if line is None:
        return re.escape(f"{path}: ")
    if line == "*":
        return re.escape(f"{path}:") + r"\d+: "
    return re.escape(f"{path}:{line}: ")


def test_manifest_matches_files():
    shipped = {p.name for p in BAD.iterdir()} - {"EXPECTED.json", "make_files.py", "__pycache__"}
    listed = {name for name, e in EXPECTED.items() if not e.get("absent")}
    assert shipped == listed
    assert {e["reason"] for e in EXPECTED.values() if e["mode"] == "error"} - {None} <= set(MALFORMED_REASONS)


@pytest.mark.parametrize("name", ERRORS)
def test_error_names_file_and_line(name, tiny_tok):
    expected = EXPECTED[name]
    path = BAD / name
    with pytest.raises(DataError) as info:
        load_any(str(path), tiny_tok, cfg_for(name))
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert re.match(location_prefix(path, expected["line"]), message), message
    assert expected["fragment"] in message


@pytest.mark.parametrize("name", ROW_ERRORS)
def test_skip_mode_counts_the_bad_row(name, tiny_tok):
    """Each file holds one bad row among good ones: skipped, counted under its reason, its message kept."""
    expected = EXPECTED[name]
    _, report = load_any(str(BAD / name), tiny_tok, cfg_for(name, on_error="skip", max_bad_fraction=1.0))
    accounted(report)
    assert report.dropped == {expected["reason"]: 1}
    assert report.rows_kept == report.rows_read - 1 >= 1
    assert report.rows_malformed == 1 and expected["fragment"] in report.errors[0]
    summary = report.to_dict()
    assert summary["rows_malformed"] == 1 and summary["dropped"] == {expected["reason"]: 1}


@pytest.mark.parametrize("name", sorted(set(ERRORS) - set(ROW_ERRORS)))
def test_skip_mode_still_refuses_unusable_files(name, tiny_tok):
    with pytest.raises(DataError, match=re.escape(EXPECTED[name]["fragment"])):
        load_any(str(BAD / name), tiny_tok, cfg_for(name, on_error="skip", max_bad_fraction=1.0))


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("name", DROPS)
def test_content_problems_are_counted_drops(name, on_error, tiny_tok):
    expected = EXPECTED[name]
    items, report = load_any(str(BAD / name), tiny_tok, cfg_for(name, on_error=on_error))
    accounted(report)
    assert report.dropped == expected["dropped"]
    # A tied ranking is one kept row trained as several groups (its strict pairs): groups counts those.
    assert report.rows_kept == expected["kept"] and report.groups == len(items)
    for key, value in expected["report"].items():
        assert getattr(report, key) == value, key


def test_too_many_malformed_rows_refuse_the_file(tiny_tok):
    path = BAD / "truncated_object.jsonl"  # 1 of 3 rows malformed
    with pytest.raises(DataError) as info:
        load_any(str(path), tiny_tok, DataConfig(on_error="skip", max_bad_fraction=0.2))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: 1 of 3 rows read are malformed (33.3%), more than data.max_bad_fraction=0.2 "
                              f"(malformed_json 1); first: {path}:2: invalid JSON")
    # Exactly at the limit is allowed ("more than").
    _, report = load_any(str(path), tiny_tok, DataConfig(on_error="skip", max_bad_fraction=1 / 3))
    assert report.rows_kept == 2


def test_accounting_with_every_kind_of_problem_in_one_file(tmp_path, tiny_tok):
    rows = [json.dumps({"prompt": f"Q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"}) for i in range(20)]
    rows[3] = '{"prompt": "Q3", "chosen":'                                            # malformed_json
    rows[5] = json.dumps({"prompt": "Q5", "chosen": " a"})                              # missing_key
    rows[7] = json.dumps({"prompt": "Q7", "chosen": None, "rejected": " b"})            # wrong_type
    rows[9] = json.dumps({"prompt": "Q9", "chosen": " same", "rejected": " same "})     # chosen_equals_rejected
    rows[11] = rows[10]                                                                 # duplicate
    rows[13] = json.dumps({"prompt": "", "chosen": " a", "rejected": " b"})             # empty_prompt
    rows[15] = json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": " a", "rejected": " b"})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows[:10]) + "\n\n\n" + "\n".join(rows[10:]) + "\n")
    _, report = load_preferences(str(path), tiny_tok, DataConfig(on_error="skip", max_bad_fraction=0.25))
    accounted(report)
    assert report.rows_read == 20 and report.rows_kept == 13
    assert report.dropped == {"malformed_json": 1, "missing_key": 1, "wrong_type": 1, "mixed_formats": 1,
                              "chosen_equals_rejected": 1, "duplicate": 1, "empty_prompt": 1}
    assert report.rows_malformed == 4 and report.formats == {"standard": 16, "conversational": 1}
    assert report.errors[0].startswith(f"{path}:4: invalid JSON")
    assert report.errors[3].startswith(f"{path}:18: format 'conversational'")  # blank lines counted as lines
    # dedupe off: the duplicate is kept
    _, report = load_preferences(str(path), tiny_tok, DataConfig(on_error="skip", max_bad_fraction=0.25,
                                                                 dedupe=False))
    assert report.rows_kept == 14 and "duplicate" not in report.dropped


def test_template_errors_are_row_errors(tmp_path):
    """A template that raises on some rows (here: on a system turn) stops in raise mode, is counted in skip mode."""
    from dpokit.models.loading import tiny_tokenizer

    tok = tiny_tokenizer()  # a fresh one: the session's tokenizer keeps its template
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                         "turns') }}{% endif %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}"}], "chosen": f"a{i}", "rejected": f"b{i}"}
            for i in range(4)]
    rows[2]["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q2"}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=re.escape(f"{path}:3: chat template failed (no system turns)")):
        load_any(str(path), tok, DataConfig())
    items, report = load_any(str(path), tok, DataConfig(on_error="skip", max_bad_fraction=0.5))
    accounted(report)
    assert report.dropped == {"template_error": 1} and [i.location for i in items] == [
        f"{path}:1", f"{path}:2", f"{path}:4"]


def test_run_check_reports_malformed_rows(capsys):
    path = BAD / "missing_key.jsonl"
    assert run_check(str(path), model="tiny-random-llama", on_error="skip", max_bad_fraction=0.5) == 0
    out = capsys.readouterr().out
    assert "missing_key" in out and "malformed" in out and f"{path}:2: missing key 'rejected'" in out


def test_cli_bad_input_is_one_line_on_stderr():
    """The real entry point, in subprocesses (run concurrently: each pays the torch import)."""
    names = ["truncated_object.jsonl", "lone_surrogate.jsonl", "a_directory.jsonl"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "dpokit", "data", "check", str(BAD / name),
                                     "--model", "tiny-random-llama"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for name in names}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err and "Traceback" not in out
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dpokit: error: "), (name, err)
        assert EXPECTED[name]["fragment"] in lines[0]
        assert out == ""  # nothing that could pass for a (partial) report
