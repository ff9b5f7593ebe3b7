"""The tokenized-data cache (dpokit.data.cache): the same groups and report as the in-memory pipeline for every
test file, byte-identical for any number of processes, hit / miss on every key input, corruption rebuilt, and
training and resume reading from it."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit
from dpokit.config import DataConfig
from dpokit.data import cache, cache_build
from dpokit.data.cache import load_cached, prepare_cached
from dpokit.data.pipeline import load_any
from dpokit.errors import DataError

DATA = Path(__file__).parent / "data"
ARRAYS = ("tokens", "spans", "groups", "refs", "keys")


def data_cfg(tmp_path: Path, **settings) -> DataConfig:
    return DataConfig(**{"max_length": 64, "max_prompt_length": 32, "cache_dir": str(tmp_path / "cache"), **settings})


def outcome(load, *args):
    """(groups, report dict) or the error line."""
    try:
        items, report = load(*args)
    except DataError as exc:
        return str(exc)
    return [(g.prompt_ids, g.responses_ids, g.location, g.boundary_fallback, g.truncated, g.label)
            for g in items], report.to_dict()


SOURCES = sorted(p for p in [*DATA.glob("*.jsonl"), *(DATA / "bad").iterdir()]
                 if p.is_file() and p.name not in ("EXPECTED.json", "make_files.py"))


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_every_test_file_gives_what_the_in_memory_pipeline_gives(tmp_path, tiny_tok, monkeypatch, on_error):
    """Groups, locations, flags, the whole report and every error line are those of the sequential pipeline,
    with one process and with each file cut in 2 and 3 byte ranges (the size floor for workers lowered)."""
    monkeypatch.setattr(cache_build, "_PARALLEL_MIN_BYTES", 0)
    compared = 0
    for source in SOURCES:
        expected = outcome(load_any, str(source), tiny_tok, data_cfg(tmp_path, on_error=on_error))
        for procs in (1, 2, 3):
            cfg = data_cfg(tmp_path / f"p{procs}", on_error=on_error, num_proc=procs, max_bad_fraction=1.0
                           if on_error == "skip" else 0.05)
            if on_error == "skip":
                expected = outcome(load_any, str(source), tiny_tok, cfg)
            got = outcome(load_cached, str(source), tiny_tok, cfg, "train", "any")
            assert got == expected, (source.name, procs)
            compared += 1
    assert compared == 3 * len(SOURCES) and len(SOURCES) > 30


def write_rows(path: Path, n: int, extra: list[str] = ()) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"prompt": [{"role": "user", "content": f"Question {i % 97}: help with {i}?"}],
                                 "chosen": [{"role": "assistant", "content": f"Gladly, answer {i}."}],
                                 "rejected": [{"role": "assistant", "content": f"No {i}."}]}))
        if i % 50 == 7:
            lines.append(lines[-1])  # a duplicate, sometimes across a byte-range cut
        if i % 80 == 3:
            lines.append("")  # blank lines are not rows but count as lines
    path.write_text("\n".join(lines + list(extra)) + "\n")
    return path


def test_the_cache_is_byte_identical_for_any_number_of_processes(tmp_path, tiny_tok, monkeypatch):
    monkeypatch.setattr(cache_build, "_PARALLEL_MIN_BYTES", 0)
    source = write_rows(tmp_path / "rows.jsonl", 600, extra=["{not json", '{"prompt": "only a prompt"}'])
    folders = []
    for procs in (1, 2, 4):
        cfg = data_cfg(tmp_path / f"p{procs}", on_error="skip", num_proc=procs)
        folders.append(prepare_cached(str(source), tiny_tok, cfg))
    for name in [f"{a}.bin" for a in ARRAYS] + ["meta.json"]:
        contents = {(folder / name).read_bytes() for folder in folders}
        assert len(contents) == 1, name
    items, report = load_cached(str(source), tiny_tok, data_cfg(tmp_path / "p1", on_error="skip"))
    assert report.rows_read == 600 + 12 + 2 and report.dropped == {"duplicate": 12, "malformed_json": 1,
                                                                     "missing_key": 1}
    assert len(items) == 600 and items[-1].location == f"{source}:{source.read_text().count(chr(10)) - 2}"


def test_hit_miss_and_what_the_key_holds(tmp_path, tiny_tok):
    source = write_rows(tmp_path / "rows.jsonl", 40)
    notes: list[str] = []
    cfg = data_cfg(tmp_path)
    first = prepare_cached(str(source), tiny_tok, cfg, note=notes.append)
    assert "tokenized 41 rows" in notes[-1]  # one duplicate line
    assert prepare_cached(str(source), tiny_tok, cfg, note=notes.append) == first
    assert "from the cache" in notes[-1]
    # The same content at another path hits too, and its locations name the new path.
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(source.read_bytes())
    items, _ = load_cached(str(copy), tiny_tok, cfg, note=notes.append)
    assert "from the cache" in notes[-1] and items[0].location == f"{copy}:1"
    # Neutral settings share the folder; every key input gets its own.
    assert prepare_cached(str(source), tiny_tok, data_cfg(tmp_path, num_proc=3, max_bad_fraction=0.5)) == first
    changed = [prepare_cached(str(source), tiny_tok, data_cfg(tmp_path, max_length=48)),
               prepare_cached(str(source), tiny_tok, data_cfg(tmp_path, dedupe=False)),
               prepare_cached(str(source), tiny_tok, data_cfg(tmp_path, on_error="skip")),
               prepare_cached(str(source), tiny_tok, data_cfg(tmp_path, max_rows=20))]
    assert prepare_cached(str(source), tiny_tok, cfg, split="other") == first  # a split names part of a JSON
    # document or a hub dataset, not of a JSONL file
    other_template = tiny_tok.__class__.from_pretrained(_saved(tiny_tok, tmp_path / "tok"))
    other_template.chat_template = tiny_tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    changed.append(prepare_cached(str(source), other_template, cfg))
    source.write_text(source.read_text().replace("Gladly", "Happily"))
    changed.append(prepare_cached(str(source), tiny_tok, cfg))
    assert len({first, *changed}) == 1 + len(changed)


def _saved(tokenizer, folder: Path) -> str:
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("damage", ["truncate tokens", "flip index byte", "no meta", "bad meta"])
def test_a_partial_or_corrupt_folder_is_said_and_rebuilt(tmp_path, tiny_tok, damage):
    source = write_rows(tmp_path / "rows.jsonl", 30)
    cfg = data_cfg(tmp_path)
    folder = prepare_cached(str(source), tiny_tok, cfg)
    good = {name: (folder / f"{name}.bin").read_bytes() for name in ARRAYS}
    if damage == "truncate tokens":
        (folder / "tokens.bin").write_bytes(good["tokens"][:-4])
    elif damage == "flip index byte":
        data = bytearray(good["groups"])
        data[9] ^= 1
        (folder / "groups.bin").write_bytes(bytes(data))
    elif damage == "no meta":
        (folder / "meta.json").unlink()
    else:
        (folder / "meta.json").write_text("{")
    notes: list[str] = []
    assert prepare_cached(str(source), tiny_tok, cfg, note=notes.append) == folder
    said = {"truncate tokens": "tokens.bin has the wrong size", "flip index byte": "does not match its checksum",
            "no meta": "incomplete", "bad meta": "incomplete"}[damage]
    assert any(said in n for n in notes) and "tokenized 31 rows" in notes[-1], notes
    assert {name: (folder / f"{name}.bin").read_bytes() for name in ARRAYS} == good


def test_three_tokens_changed_in_the_middle_of_a_large_token_file_are_found_and_rebuilt(tmp_path, tiny_tok):
    """Every byte of tokens.bin is checked on a hit, not sampled blocks: a file of several MB with three token
    ids changed in its middle, same size and still valid ids, would otherwise be trained on."""
    words = " ".join(f"w{k % 50}" for k in range(800))  # about 2,200 tokens a response
    source = tmp_path / "long.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f" Yes {i}: {words}",
                                          "rejected": f" No {i}: {words}"}) + "\n" for i in range(120)))
    cfg = data_cfg(tmp_path, max_length=8192, max_prompt_length=64)
    folder = prepare_cached(str(source), tiny_tok, cfg)
    good = (folder / "tokens.bin").read_bytes()
    assert len(good) > 2 << 20
    tokens = bytearray(good)
    middle = len(tokens) // 2 // 4 * 4
    for k in range(3):
        tokens[middle + 4 * k] ^= 1  # the lowest bit of three int32 token ids: other ids, same size
    (folder / "tokens.bin").write_bytes(bytes(tokens))
    notes: list[str] = []
    assert prepare_cached(str(source), tiny_tok, cfg, note=notes.append) == folder
    assert any("does not match its checksum" in n for n in notes) and "tokenized 120 rows" in notes[-1], notes
    assert (folder / "tokens.bin").read_bytes() == good


def test_checks_that_depend_on_the_caller_run_on_every_hit(tmp_path, tiny_tok):
    ranked = DATA / "bad" / "tied_rankings.jsonl"
    cfg = data_cfg(tmp_path)
    load_cached(str(ranked), tiny_tok, cfg, want="any")  # `dpokit data check` builds it
    with pytest.raises(DataError, match=r"tied_rankings\.jsonl:1: ranked rows .* need loss.name=plackett_luce"):
        load_cached(str(ranked), tiny_tok, cfg, want="pairs")
    source = write_rows(tmp_path / "rows.jsonl", 20, extra=["{not json"] * 3)
    lenient = data_cfg(tmp_path, on_error="skip", max_bad_fraction=0.5)
    assert load_cached(str(source), tiny_tok, lenient)[1].rows_malformed == 3
    with pytest.raises(DataError, match="3 of 24 rows read are malformed"):
        load_cached(str(source), tiny_tok, data_cfg(tmp_path, on_error="skip", max_bad_fraction=0.01))


def test_without_the_cache_nothing_is_kept(tmp_path, tiny_tok):
    source = write_rows(tmp_path / "rows.jsonl", 10)
    items, report = load_cached(str(source), tiny_tok, data_cfg(tmp_path, cache=False))
    assert len(items) == report.rows_kept == 10 and report.rows_read == 11  # one duplicate
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("meta.json"))


def test_a_read_only_cache_folder_falls_back_to_a_private_one(tmp_path, tiny_tok):
    source = write_rows(tmp_path / "rows.jsonl", 10)
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    notes: list[str] = []
    items, _ = load_cached(str(source), tiny_tok, DataConfig(max_length=64, max_prompt_length=32,
                                                             cache_dir=str(blocked)), note=notes.append)
    assert len(items) == 10 and any("not writable" in n for n in notes), notes  # 11 rows, one duplicate


def test_training_and_resume_read_the_cache(tmp_path):
    source = write_rows(tmp_path / "rows.jsonl", 24)
    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(source), "eval": str(source), "max_length": 64, "max_prompt_length": 32,
                    "cache_dir": str(tmp_path / "cache")},
           "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 4, "seed": 2, "progress": False, "save_every": 2}}
    straight = dpokit.train(cfg, run_dir=str(tmp_path / "straight"))
    report = json.loads((straight / "data_report.json").read_text())
    assert report["overlap"] == {"pairs": 24, "prompts": 24, "eval_rows": 24}  # from the stored digests
    assert len(list((tmp_path / "cache").rglob("meta.json"))) == 1  # train and eval: one source, one folder
    cfg["train"]["max_steps"] = 2
    dpokit.train(cfg, run_dir=str(tmp_path / "resumed"))
    cfg["train"]["max_steps"] = 4
    resumed = dpokit.train(cfg, run_dir=str(tmp_path / "resumed"), resume=True)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_refused_source_is_refused_again_without_reading_it(tmp_path, tiny_tok, monkeypatch):
    source = write_rows(tmp_path / "rows.jsonl", 10, extra=["{not json"])
    with pytest.raises(DataError, match=r"rows\.jsonl:\d+: invalid JSON") as first:
        prepare_cached(str(source), tiny_tok, data_cfg(tmp_path))
    monkeypatch.setattr(cache, "build", lambda *a, **k: pytest.fail("tokenized again"))
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(source.read_bytes())
    with pytest.raises(DataError) as again:
        prepare_cached(str(copy), tiny_tok, data_cfg(tmp_path))
    assert str(again.value) == str(first.value).replace(str(source), str(copy))


def test_processes_wanting_the_same_data_take_turns(tmp_path):
    """Three processes at once (as torchrun ranks would): one tokenizes, two wait and hit."""
    import subprocess
    import sys

    source = write_rows(tmp_path / "rows.jsonl", 2000)
    script = ("import sys\nfrom dpokit.config import DataConfig\nfrom dpokit.data.cache import load_cached\n"
              "from dpokit.models.loading import tiny_tokenizer\n"
              f"cfg = DataConfig(max_length=64, max_prompt_length=32, cache_dir={str(tmp_path / 'cache')!r})\n"
              f"items, _ = load_cached({str(source)!r}, tiny_tokenizer(), cfg, note=print)\nprint(len(items))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(out.splitlines()[-1] == "2000" for out in outputs), outputs
    assert sum("tokenized 2040 rows" in out for out in outputs) == 1, outputs
    assert sum("from the cache" in out for out in outputs) == 2, outputs


def test_a_streamed_hub_dataset_gives_the_same_groups_and_counts(tmp_path, tiny_tok, monkeypatch):
    """``data.streaming``: the hub dataset comes as a ``datasets`` IterableDataset (here built from a local
    file, as no hub is reachable), validated and counted like the same rows from a file; a stream that fails
    part way is one line naming the row."""
    import datasets

    source = write_rows(tmp_path / "rows.jsonl", 30, extra=['{"prompt": "only a prompt"}'])
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    calls = []

    def load_dataset(name, split, streaming=False):
        calls.append((name, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = data_cfg(tmp_path, on_error="skip", streaming=True)
    streamed, report = load_cached("owner/prefs", tiny_tok, cfg)
    from_file, file_report = load_cached(str(source), tiny_tok, data_cfg(tmp_path, on_error="skip"))
    assert calls == [("owner/prefs", "train", True)]
    assert [(g.prompt_ids, g.responses_ids) for g in streamed] == [(g.prompt_ids, g.responses_ids) for g in from_file]
    assert streamed[0].location == "owner/prefs[train]:row 0"
    assert report.dropped == file_report.dropped == {"duplicate": 1, "missing_key": 1}

    def failing():
        yield rows[0]
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split, streaming=False: datasets.IterableDataset.from_generator(failing))
    with pytest.raises(DataError, match=r"^owner/prefs\[train\]:row 1: reading the hub dataset failed"):
        load_cached("owner/prefs", tiny_tok, cfg)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (nobody reaped it yet)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker pids from /proc (Linux)")
def test_a_killed_build_stops_its_workers_and_the_next_run_clears_its_leftovers(tmp_path):
    """SIGKILL to the parent while two workers tokenize: the workers end too (PR_SET_PDEATHSIG) instead of
    tokenizing their share for nobody, and the next build of the same key removes the half-built folder."""
    import signal
    import subprocess
    import sys
    import time

    source = write_rows(tmp_path / "rows.jsonl", 100_000)  # seconds of work for each worker
    cache_dir = tmp_path / "cache"
    script = ("import dpokit.data.cache as cache\nimport dpokit.data.cache_build as cache_build\n"
              "from dpokit.config import DataConfig\n"
              "from dpokit.models.loading import tiny_tokenizer\ncache_build._PARALLEL_MIN_BYTES = 0\n"
              f"cfg = DataConfig(max_length=64, max_prompt_length=32, cache_dir={str(cache_dir)!r}, num_proc=2)\n"
              f"cache.prepare_cached({str(source)!r}, tiny_tokenizer(), cfg)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    workers: list[int] = []
    deadline = time.time() + 120
    while len(workers) < 2 and time.time() < deadline and parent.poll() is None:
        time.sleep(0.2)
        children = " ".join(Path(t, "children").read_text() for t in Path(f"/proc/{parent.pid}/task").glob("*")
                            if Path(t, "children").exists()) if _alive(parent.pid) else ""
        workers = [int(pid) for pid in children.split()]
    assert len(workers) == 2, "the build never forked its workers"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    time.sleep(1.0)  # far less than what is left of a worker's share; far more than a signal takes
    assert not any(_alive(pid) for pid in workers)
    leftovers = list(cache_dir.glob("*/.tmp-*"))
    assert leftovers  # the killed build's staging folder
    from dpokit.data.cache import prepare_cached
    from dpokit.models.loading import tiny_tokenizer

    folder = prepare_cached(str(source), tiny_tokenizer(), DataConfig(max_length=64, max_prompt_length=32,
                                                                      cache_dir=str(cache_dir), num_proc=2))
    assert (folder / "meta.json").exists() and not any(p.exists() for p in leftovers)
