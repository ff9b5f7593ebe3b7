"""Sampling one token at a time, so a page can show a response while it is being generated.

:func:`stream_batch` is ``dpokit.generate.sample_batch`` turned into a generator: the same left-padded batch,
the same position ids, the same KV cache, the same ``next_tokens`` draws from the same seeded generator, in the
same order. So the tokens streamed for a prompt repeated n times at a seed are exactly the samples
``generate(model, tokenizer, [prompt] * n, SamplingParams(seed=seed))`` returns (tested); the page shows the
responses the rest of dpokit would produce.

:class:`IncrementalText` turns the growing token lists into text deltas for the page.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from dpokit.data.batch import pad_sequences
from dpokit.errors import DpokitError
from dpokit.generate import SamplingParams, next_tokens
from dpokit.logprobs import position_ids_from_mask


@torch.no_grad()
def stream_batch(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, pad_id: int,
                 eos_ids: Sequence[int], generator: torch.Generator) -> Iterator[list[int | None]]:
    """Decode one batch of prompts, yielding after every step the new token of each row, or None for a row
    that had already finished (its EOS, which is part of its response, was yielded the step before).
    Stops when every row has finished or after ``params.max_new_tokens`` steps."""
    if any(len(p) == 0 for p in prompts):
        raise DpokitError("generation: a prompt has no tokens")
    device = next(model.parameters()).device
    batch = pad_sequences(prompts, [len(p) for p in prompts], pad_id, side="left")
    attention_mask = batch["attention_mask"].to(device)  # (B, T)
    position_ids = position_ids_from_mask(attention_mask)  # (B, T)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    n = len(prompts)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=attention_mask,
                position_ids=position_ids, use_cache=True, logits_to_keep=1)
    for t in range(params.max_new_tokens):
        token = next_tokens(out.logits[:, -1], params, generator)  # (B,)
        token = token.masked_fill(done, pad_id)
        yield [None if finished else int(tok) for tok, finished in zip(token.tolist(), done.tolist())]
        done = done | torch.isin(token, eos)
        if bool(done.all()) or t == params.max_new_tokens - 1:
            return
        # Finished rows keep decoding pad tokens (never yielded); attending to them is harmless.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=out.past_key_values, use_cache=True)


class IncrementalText:
    """The decoded text of a growing token list, handed out as deltas.

    Byte-level tokenizers split a multi-byte character over several tokens; until its last byte arrives the
    decoder shows U+FFFD, so a text ending in it is held back rather than shown and taken back. Should decoding
    ever rewrite earlier text, the delta is the whole text with ``replace=True``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> tuple[str, bool] | None:
        """Add a token; returns (text, replace) to show, or None when nothing new is visible yet."""
        self.ids.append(token)
        text = self.text
        if text.endswith("\ufffd"):
            return None
        return self._show(text)

    def flush(self) -> tuple[str, bool] | None:
        """The final text (held-back characters included), when it differs from what was shown."""
        return self._show(self.text)

    @property
    def text(self) -> str:
        # The same decoding as dpokit.generate.Sample.text: the text that is shown is the text that is scored.
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _show(self, text: str) -> tuple[str, bool] | None:
        if text == self.shown:
            return None
        if text.startswith(self.shown):
            delta, replace = text[len(self.shown):], False
        else:
            delta, replace = text, True
        self.shown = text
        return delta, replace
