import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dpokit.models.hardware import kernel_limits

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ``precision: auto`` would be bf16 on a CPU with AVX512_BF16 and fp32 elsewhere; the suite's verdicts must not
# depend on the CPU, so auto means fp32 here (tests/test_hardware.py tests auto itself without this).
os.environ["DPOKIT_PRECISION"] = "fp32"
# torch.compile's kernel cache is not keyed by the kernel limits (ATEN_CPU_CAPABILITY, ...): a kernel cached by a
# run under other limits crashed the compiled test ("corrupted size vs. prev_size"). One cache per setting.
_limits = "-".join(f"{k}={v}" for k, v in kernel_limits().items())
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) /
                                                      f"dpokit-inductor-{_limits or 'native'}"))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_tok():
    from dpokit.models.loading import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waits make each forward
    pass up to ~100x slower; tests that load the real model ask for more threads themselves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def chromium(host_rules: str = "MAP * ~NOTFOUND", window: str = "1280,1000"):
    """Headless Debian Chromium driven by selenium and the system chromedriver (never a downloaded browser).
    Skips when absent, except in CI (CI=true), where the browser checks must run. Any request the host rules
    do not allow fails (and logs an error): pages must need no network. Returns (driver, profile folder)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="dpokit-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", f"--window-size={window}", f"--host-resolver-rules={host_rules}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options), profile


def close_chromium(driver, profile) -> None:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


# ------------------------------------------------------------------------------------------ shared test helpers

def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``dpokit ARGS...`` in a fresh process from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "dpokit", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


_MOODS = [("great, thank you", "terrible, go away"), ("happy to help", "not my problem"),
          ("a kind answer", "a rude reply"), ("yes, gladly", "no, never")]

PAIR_STYLES = {
    "moods": lambda i: {"prompt": f"Question {i}: can you help me with task {i * 7 % 11}?",
                        "chosen": f" {_MOODS[i % 4][0]} {i}", "rejected": f" {_MOODS[i % 4][1]} {i}"},
    "thanks": lambda i: {"prompt": f"Item {i}: what do you say?", "chosen": f" Thanks {i}, gladly.",
                         "rejected": f" No {i}, never."},
    "request": lambda i: {"prompt": f"Request {i}: a short reply please.", "chosen": f" Sure {i}, happy to.",
                          "rejected": f" No {i}."},
    "help": lambda i: {"prompt": f"Question {i}: please help with item {i}.", "chosen": f" Gladly, here is help {i}.",
                       "rejected": f" No {i}. Go away now."},
}
"""The small preference files the tests train on, by name. Each test file keeps the one its numbers were set on
(lengths against its ``max_length``, how fast a variant learns it), so the files differ in wording only."""


def write_pairs(path: Path, n: int = 16, offset: int = 0, style: str = "moods") -> Path:
    """Pairs ``offset`` .. ``offset + n - 1`` of ``PAIR_STYLES[style]`` as standard-format JSONL."""
    with path.open("w") as fh:
        for i in range(offset, offset + n):
            fh.write(json.dumps(PAIR_STYLES[style](i)) + "\n")
    return path


def write_chat_pairs(path: Path, n: int, offset: int = 0) -> Path:
    """Pairs in the conversational format (a user message, assistant chosen and rejected messages)."""
    moods = [("Sure, happy to help", "No. Figure it out"), ("Great question, here is how", "Not my problem")]
    with path.open("w") as fh:
        for i in range(offset, offset + n):
            good, bad = moods[i % len(moods)]
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"Can you help me with task {i}?"}],
                                 "chosen": [{"role": "assistant", "content": f"{good} {i}."}],
                                 "rejected": [{"role": "assistant", "content": f"{bad} {i}."}]}) + "\n")
    return path


def train_tiny_run(root: Path, train: Path, held_out: Path, **train_keys) -> Path:
    """The tiny model trained 3 DPO steps (batch 4, lr 1e-3, beta 0.1) on ``train``, evaluated on ``held_out``:
    a run folder with final/ in seconds, for the tests of what reads a run (eval, serve)."""
    import dpokit

    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(train), "eval": str(held_out), "max_length": 64, "max_prompt_length": 32},
           "loss": {"beta": 0.1},
           "train": {"lr": 1e-3, "max_steps": 3, "batch_size": 4, "progress": False, **train_keys}}
    return dpokit.train(cfg, run_dir=str(root / "run"))


@pytest.fixture(scope="module")
def tiny_chat_run(tmp_path_factory) -> Path:
    """``train_tiny_run`` on 16 conversational pairs (4 held out): what ``dpokit serve`` is tried on."""
    root = tmp_path_factory.mktemp("serve")
    return train_tiny_run(root, write_chat_pairs(root / "train.jsonl", 16),
                          write_chat_pairs(root / "eval.jsonl", 4, offset=100))


@contextlib.contextmanager
def serve_command(run_dir, *args, pattern):
    """``dpokit serve RUN_DIR --port 0 ARGS`` as a child process, once a line of its output matches ``pattern``:
    yields ``(process, text)``, the text the pattern's last group (or whole match) found; the process is killed
    on the way out if it still runs. Fails with the output when no line matches within 120 s."""
    import re
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dpokit", "serve", str(run_dir), "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        text, output = None, []
        deadline = time.time() + 120
        while text is None and time.time() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if found := re.search(pattern, line):
                text = found.group(found.lastindex or 0)
        assert text, "".join(output)
        yield process, text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
