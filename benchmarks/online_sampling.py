"""Sampling seconds alone of online (s = 1) against semi-online (s = 4) DPO at the sentiment recipe's ``online``
preset sizes: the embedded SmolLM2, 8 train openings a step, 4 continuations each (32 rows), at most 32 new
tokens, temperature 1, fp32 on the CPU.

    python benchmarks/online_sampling.py                 # 8 steps (256 continuations per setting)
    python benchmarks/online_sampling.py --steps 24      # the preset's whole run

s = 1 samples each step's 32 rows in one generation call, as ``dpokit.methods.online`` does at every refresh; s = 4
samples the 4 steps of a refresh in one call of 128 rows (``dpokit.methods.online.draw_window``; 64 rows decoded
together, the sampler's cap). The two settings alternate window by window (which goes first alternates too), so
a machine shared with other work slows both alike. Prints wall and process CPU seconds per setting, and the
response tokens drawn (the seeds differ between the settings, so the lengths do too).
"""

from __future__ import annotations

import argparse
import time

import torch

from dpokit.models.generate import SamplingParams, encode_prompts, eos_token_ids, generate
from dpokit.recipes.sentiment.sampling import load_openings, load_policy

ROWS_PER_STEP, SAMPLES, MAX_NEW, MAX_PROMPT = 8, 4, 32, 32


def timed(model, tokenizer, rows: list[list[int]], seed: int, eos: list[int]) -> tuple[float, float, int]:
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=seed,
                            batch_size=min(len(rows), 64))
    wall, cpu = time.perf_counter(), time.process_time()
    samples = generate(model, tokenizer, rows, params, eos)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(len(s.response_ids) for s in samples)
    print(f"  one call: {len(rows)} rows, {wall:.1f} s wall, {cpu:.1f} s CPU, {tokens} tokens", flush=True)
    return wall, cpu, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps sampled per setting (a multiple of 4)")
    args = parser.parse_args()
    window = 4
    policy = load_policy("smollm2")
    model, tokenizer = policy.model.eval(), policy.tokenizer
    openings = load_openings()[0][:args.steps * ROWS_PER_STEP]
    ids = encode_prompts(tokenizer, openings, MAX_PROMPT, MAX_PROMPT + MAX_NEW + 16)
    # Step i: its 8 openings, 4 adjacent copies of each (as dpokit.methods.online.step_items lays them out).
    steps = [[p for p in ids[i * ROWS_PER_STEP:(i + 1) * ROWS_PER_STEP] for _ in range(SAMPLES)]
             for i in range(args.steps)]
    eos = eos_token_ids(model, tokenizer)
    totals = {1: [0.0, 0.0, 0], window: [0.0, 0.0, 0]}
    print(f"threads {torch.get_num_threads()}, {args.steps} steps x {len(steps[0])} rows per setting")
    for w in range(0, args.steps, window):
        block = steps[w:w + window]
        order = (1, window) if (w // window) % 2 == 0 else (window, 1)
        for s in order:
            calls = [timed(model, tokenizer, rows, 1009 * (w + i), eos) for i, rows in enumerate(block)] if s == 1 \
                else [timed(model, tokenizer, [r for rows in block for r in rows], 1009 * w, eos)]
            for wall, cpu, tokens in calls:
                totals[s][0] += wall
                totals[s][1] += cpu
                totals[s][2] += tokens
            print(f"steps {w + 1}-{w + len(block)}, s = {s}: {sum(c[0] for c in calls):.1f} s wall, "
                  f"{sum(c[1] for c in calls):.1f} s CPU, {sum(c[2] for c in calls)} tokens", flush=True)
    for s, (wall, cpu, tokens) in totals.items():
        print(f"s = {s}: {wall:.1f} s wall, {cpu:.1f} s CPU for {args.steps * len(steps[0])} continuations "
              f"({tokens} tokens, {wall / tokens * 1000:.1f} ms wall per token)")


if __name__ == "__main__":
    main()
