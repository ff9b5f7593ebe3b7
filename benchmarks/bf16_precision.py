"""How far bf16 autocast moves dpokit's sequence log-probs from fp32, and where the error comes from.

    .venv/bin/python benchmarks/bf16_precision.py            # about a minute

On the first 8 synthetic pairs of the benchmarks (SmolLM2-135M), computes the summed response log-probs of
every response with ``dpokit.models.logprobs.layout_logps`` (no gradient):

- ``fp32``: the reference values;
- ``bf16``: under ``torch.autocast(bfloat16)`` as ``train.precision: bf16`` runs it, in the packed training
  layout and again in the layout the reference store is precomputed in (one response per group);
- ``bf16, fp32 head``: the same, but the vocabulary projection of the response positions done in fp32 (the
  hidden states cast up, outside autocast). This replaces ``dpokit.models.logprobs._token_logps`` *in this process
  only*, to show the effect; dpokit itself is unchanged.

The step-1 DPO log-ratio of a bf16 run with the store is (training-layout bf16) - (store-layout bf16): at
step 1 it should be 0; its spread times beta is the noise bf16 adds to every reward.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_pairs, write_jsonl  # noqa: E402


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dpokit.models.logprobs as logprobs
    from dpokit.config import DataConfig
    from dpokit.data import load_preferences
    from dpokit.data.batch import collate_pairs, collate_responses, regroup
    from dpokit.models.loading import resolve

    folder = resolve("smollm2").location
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_jsonl(make_pairs(tokenizer, 8, seed=0), data)
        pairs, _ = load_preferences(str(data), tokenizer, DataConfig(max_length=512, max_prompt_length=256))
    pad = tokenizer.pad_token_id
    train_batch = collate_pairs(pairs, pad, layout="packed")
    store_batch = collate_responses([(p.prompt_ids, r) for p in pairs for r in (p.chosen_ids, p.rejected_ids)],
                                    pad, layout="packed")

    def run(batch: dict, bf16: bool, grouped: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logps, _ = logprobs.layout_logps(model, batch)
        return regroup(logps, batch).reshape(-1) if grouped else logps

    fp32 = run(train_batch, False, True)
    rows = {"bf16": (run(train_batch, True, True), run(store_batch, True, False))}
    original = logprobs._token_logps

    def fp32_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            logits = F.linear(hidden.float(), weight.float())
        return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    logprobs._token_logps = fp32_head
    rows["bf16, fp32 head"] = (run(train_batch, True, True), run(store_batch, True, False))
    logprobs._token_logps = original

    print(f"{len(pairs)} pairs, {fp32.numel()} responses, mean fp32 log-prob {fp32.mean():.2f}")
    print("| computation | mean abs. error vs fp32 (nats per response) | max | step-1 log-ratio train vs store "
          "layout: mean abs. | max | x beta=0.1 |")
    print("|---|---|---|---|---|---|")
    for name, (train, store) in rows.items():
        err = (train - fp32).abs()
        ratio = (train - store).abs()
        print(f"| {name} | {err.mean():.3f} | {err.max():.3f} | {ratio.mean():.3f} | {ratio.max():.3f} | "
              f"{0.1 * ratio.max():.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
