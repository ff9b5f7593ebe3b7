import os
import shutil
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
