"""``dpokit serve`` under load: many clients pressing Run at once, on a tiny model, over loopback only.

    python benchmarks/serve_load.py                      # 50 clients for 60 s (the issue's bar)
    python benchmarks/serve_load.py --seconds 10 --clients 20
    python benchmarks/serve_load.py --run-dir runs/my-run --max-queue 8

Trains a tiny run (a random 2-layer Llama, 3 DPO steps) in a temporary folder unless ``--run-dir`` names one,
starts ``python -m dpokit serve RUN_DIR --port 0`` in a subprocess, and lets ``--clients`` threads send
``POST /api/generate`` requests back to back for ``--seconds``: each reads the whole event stream, and on a 503
waits what ``Retry-After`` says (at most ``--retry-cap`` seconds) before its next request. Prints the answers
counted by status (a 200 whose stream does not end with ``done`` counts as ``broken``, a failed connection by its
exception), the latency of the answered requests (p50/p95/max, from sending to the stream's last event), and the
server's resident memory after one warm-up request, during the run and at the end: it should stay flat.

tests/test_serve.py runs :func:`load` for a few seconds against an in-process server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any


def request_body(rng: random.Random, client: int, k: int) -> bytes:
    """A small, valid request (a few tokens, one or two samples): the load is the number of requests."""
    return json.dumps({"prompt": f"Client {client}, request {k}: can you help me with a task?",
                       "n_samples": rng.randint(1, 2), "max_new_tokens": rng.randint(4, 12),
                       "seed": k}).encode()


def post(url: str, body: bytes, timeout: float) -> tuple[int, dict[str, str], bytes]:
    host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()  # type: ignore[union-attr]
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def load(url: str, clients: int = 50, seconds: float = 60.0, retry_cap: float = 5.0, timeout: float = 120.0,
         seed: int = 0, on_answer: Any = None) -> dict[str, Any]:
    """``clients`` threads send requests back to back for ``seconds``; returns what they got.

    Returns ``counts`` (by status: ``"200"``, ``"503"``, ..., ``"broken"`` for a 200 whose stream did not end with
    ``done``, or the exception name of a failed connection), ``latencies_s`` of the answered (200) requests,
    ``max_ahead`` (the most requests a queued one was told were ahead of it), ``retry_after`` (the values seen
    with 503s) and ``errors`` (the messages of refusals, deduplicated). ``on_answer(status, headers, body)`` is
    called for every answer (a test checks each one).
    """
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    latencies: list[float] = []
    retry_after: set[str] = set()
    errors: set[str] = set()
    max_ahead = [0]
    start = threading.Barrier(clients)

    def client(i: int) -> None:
        rng = random.Random(seed * 100_003 + i)
        start.wait()
        k = 0
        while time.monotonic() < deadline:
            k += 1
            sent = time.perf_counter()
            try:
                status, headers, body = post(url, request_body(rng, i, k), timeout)
            except Exception as exc:  # noqa: BLE001 (a benchmark counts every kind of failure)
                with lock:
                    counts[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - sent
            if on_answer is not None:
                on_answer(status, headers, body)
            wait = 0.0
            with lock:
                if status == 200:
                    events = [json.loads(line) for line in body.decode("utf-8").splitlines()]
                    done = bool(events) and events[-1]["type"] == "done"
                    counts["200" if done else "broken"] += 1
                    if done:
                        latencies.append(elapsed)
                    max_ahead[0] = max([max_ahead[0], *(e["ahead"] for e in events if e["type"] == "queued")])
                else:
                    counts[str(status)] += 1
                    try:
                        errors.add(json.loads(body)["error"])
                    except (ValueError, KeyError, TypeError):
                        errors.add(body[:80].decode("utf-8", "replace"))
                    if "retry-after" in headers:
                        retry_after.add(headers["retry-after"])
                        wait = min(float(headers["retry-after"]), retry_cap)
            if wait:
                time.sleep(max(0.0, min(wait, deadline - time.monotonic())))

    threads = [threading.Thread(target=client, args=(i,), name=f"load-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + timeout + 30)
    return {"counts": dict(counts), "latencies_s": latencies, "max_ahead": max_ahead[0],
            "retry_after": sorted(retry_after), "errors": sorted(errors),
            "stuck_clients": sum(thread.is_alive() for thread in threads)}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between order statistics; NaN without values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (Linux ``/proc``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def tiny_run(folder: Path) -> Path:
    """A tiny DPO run (random 2-layer Llama, chat data, 3 steps): the model the load test serves."""
    import dpokit

    rows = folder / "pairs.jsonl"
    with rows.open("w") as fh:
        for i in range(16):
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"Can you help me with task {i}?"}],
                                 "chosen": [{"role": "assistant", "content": f"Sure, happy to help {i}."}],
                                 "rejected": [{"role": "assistant", "content": f"No. Figure it out {i}."}]})
                     + "\n")
    cfg = {"model": {"name_or_path": "tiny-random-llama"},
           "data": {"train": str(rows), "max_length": 64, "max_prompt_length": 32},
           "loss": {"beta": 0.1}, "train": {"lr": 1e-3, "max_steps": 3, "batch_size": 4, "progress": False}}
    return Path(dpokit.train(cfg, run_dir=str(folder / "run")))


def start_server(run_dir: Path, max_queue: int | None) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    extra = ["--max-queue", str(max_queue)] if max_queue is not None else []
    process = subprocess.Popen([sys.executable, "-m", "dpokit", "serve", str(run_dir), "--port", "0",
                                "--precision", "fp32", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    output = []
    for line in process.stdout:
        output.append(line)
        if found := re.search(r"http://127\.0\.0\.1:\d+/", line):
            # Keep reading its output (a traceback would show up there) without blocking the server on a full pipe.
            threading.Thread(target=lambda: [sys.stderr.write("server: " + x) for x in process.stdout],
                             daemon=True).start()
            return process, found.group(0)
    raise SystemExit("dpokit serve did not start:\n" + "".join(output))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--retry-cap", type=float, default=5.0, help="longest wait after a 503 (Retry-After)")
    parser.add_argument("--max-queue", type=int, help="dpokit serve --max-queue (default: its default)")
    parser.add_argument("--run-dir", help="serve this run instead of a tiny one trained here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dpokit-serve-load-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else tiny_run(Path(tmp))
        process, url = start_server(run_dir, args.max_queue)
        try:
            status, _, _ = post(url, request_body(random.Random(0), 0, 0), 120)  # warm-up
            assert status == 200, status
            rss = [rss_mb(process.pid)]
            sampling = threading.Event()

            def sample_rss() -> None:
                while not sampling.wait(1.0):
                    rss.append(rss_mb(process.pid))

            sampler = threading.Thread(target=sample_rss, daemon=True)
            sampler.start()
            load_avg = os.getloadavg()[0]
            result = load(url, args.clients, args.seconds, args.retry_cap)
            sampling.set()
            sampler.join()
            rss.append(rss_mb(process.pid))
            after, _, _ = post(url, request_body(random.Random(1), 0, 1), 120)
        finally:
            process.terminate()
            process.wait(30)

    latencies = result["latencies_s"]
    answered = sum(result["counts"].values())
    print(f"dpokit serve under load: {args.clients} clients for {args.seconds:g} s on "
          f"{'the tiny model' if not args.run_dir else args.run_dir} (load average before: {load_avg:.2f}, "
          f"{os.cpu_count()} CPUs)")
    print(f"answers: {answered}, by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["counts"].items())))
    print(f"latency of answered requests: p50 {percentile(latencies, 50):.3f} s, p95 {percentile(latencies, 95):.3f} s,"
          f" max {max(latencies, default=float('nan')):.3f} s ({len(latencies) / args.seconds:.1f} requests/s)")
    print(f"most requests ahead of a queued one: {result['max_ahead']}; Retry-After seen: "
          f"{', '.join(result['retry_after']) or 'none'}")
    print(f"server RSS: start {rss[0]:.1f} MB, end {rss[-1]:.1f} MB, max {max(rss):.1f} MB "
          f"(over {len(rss)} samples, 1 s apart); every 10 s: {' '.join(f'{v:.1f}' for v in rss[::10])}")
    print(f"a request after the load: HTTP {after}; clients still stuck: {result['stuck_clients']}")
    for message in result["errors"][:5]:
        print(f"  refusal: {message}")
    failed = [k for k in result["counts"] if not k.isdigit() or (int(k) >= 500 and k != "503")]
    if failed or after != 200 or result["stuck_clients"]:
        raise SystemExit(f"FAILED: {', '.join(failed) or 'no answer after the load or a stuck client'}")


if __name__ == "__main__":
    main()
