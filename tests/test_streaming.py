"""Large inputs stream: ``dpokit data check`` holds a chunk of rows, never the file, so its memory is flat in the
file size (the issue's bar: a 2 GB JSONL file in < 500 MB RSS; ``benchmarks/data_check_memory.py`` measures
that at full size). These tests run small versions and bound the growth."""

import importlib.util
import json
import tracemalloc
from pathlib import Path

import pytest

from dpokit.config import DataConfig
from dpokit.data import iter_records, iter_tokenized
from dpokit.data.pipeline import DataReport

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module():
    spec = importlib.util.spec_from_file_location("data_check_memory", ROOT / "benchmarks" / "data_check_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_check_peak_rss_does_not_grow_with_the_file():
    """The real CLI on a 5 MB file vs on a 10-row file, each in its own process, peak RSS from wait4.

    Why 40 MiB: the fixed cost (Python, torch, transformers, the tokenizer) is ~280 MiB and varies by a few MiB
    between runs; streaming adds ~2 MiB here (the row digests, one chunk of rows, the length histograms).
    Keeping the kept rows as token-id lists, as a non-streaming check would, costs ~13 KB per row of this file,
    ~75 MiB for its ~6000 rows, so the bound catches that while leaving room for allocator noise."""
    result = benchmark_module().measure(5 * 2**20)
    assert "OK: " in result["stdout"] and result["rows"] > 5000
    assert result["growth_mib"] < 40, result


def _peak_python_heap(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_pipeline_heap_is_flat_in_rows(tmp_path, tiny_tok):
    """In process: the Python heap peak while streaming 4x the rows grows by far less than the rows would take."""
    def write(n):
        path = tmp_path / f"{n}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"}) + "\n"
                                for i in range(n)))
        return str(path)

    def run(path):
        report = DataReport(path)
        for _ in iter_tokenized(path, tiny_tok, DataConfig(), report):
            pass
        assert report.rows_kept == report.rows_read

    small, large = write(500), write(2000)
    run(small)  # warm caches (regexes, tokenizer) so both measured runs start alike
    peak_small = _peak_python_heap(lambda: run(small))
    peak_large = _peak_python_heap(lambda: run(large))
    held: list = []
    peak_held = _peak_python_heap(lambda: held.extend(iter_tokenized(large, tiny_tok, DataConfig(), DataReport(large))))
    assert len(held) == 2000
    # 1500 more rows cost digest-table slots (8 bytes each) and nothing else that stays.
    assert peak_large - peak_small < 128 * 1024, (peak_small, peak_large)
    assert peak_held > peak_large + 512 * 1024, (peak_large, peak_held)  # holding the rows shows: the test can tell


def test_overlong_line_is_skipped_without_reading_it_whole(tmp_path, tiny_tok):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"})
    with open(path, "w") as f:
        f.write(good + "\n")
        f.write('{"prompt": "' + "x" * (32 * 2**20) + '", "chosen": " a", "rejected": " b"}\n')  # 32 MiB
        f.write(json.dumps({"prompt": "Q3", "chosen": " a", "rejected": " b"}) + "\n")
    cfg = DataConfig(max_line_bytes=2**20, on_error="skip", max_bad_fraction=0.5)
    report = DataReport(str(path))
    items = []
    peak = _peak_python_heap(lambda: items.extend(iter_tokenized(str(path), tiny_tok, cfg, report)))
    assert [i.location for i in items] == [f"{path}:1", f"{path}:3"]
    assert report.dropped == {"line_too_long": 1} and report.rows_read == 3
    assert peak < 6 * 2**20  # a few 1 MiB reads at a time, not the 32 MiB line


def test_json_lines_in_a_json_file_stream(tmp_path):
    """A .json file holding JSON lines is read line by line, not parsed as one document."""
    path = tmp_path / "d.json"
    row = {"prompt": "Q" * 100, "chosen": " a" * 100, "rejected": " b" * 100}
    path.write_text("".join(json.dumps({**row, "id": i}) + "\n" for i in range(10000)))  # ~5 MB
    count = 0

    def read():
        nonlocal count
        for _ in iter_records(str(path)):
            count += 1

    peak = _peak_python_heap(read)
    assert count == 10000
    assert peak < path.stat().st_size / 4


@pytest.mark.parametrize("size, expected", [("200M", 200 * 2**20), ("2G", 2 * 2**30), ("5MB", 5 * 2**20),
                                            ("1000", 1000)])
def test_benchmark_size_argument(size, expected):
    assert benchmark_module().parse_size(size) == expected
