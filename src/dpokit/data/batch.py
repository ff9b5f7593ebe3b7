"""Batching: tokenized pairs -> padded tensors, and the seeded order in which pairs are visited.

A batch holds groups of responses to one prompt (a pair is a group of two, chosen first; a ranking a group of
K, best first), one row per (prompt, response), so one forward pass scores every response.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch


def pad_sequences(seqs: Sequence[Sequence[int]], response_starts: Sequence[int], pad_id: int,
                  side: Literal["right", "left"] = "right") -> dict[str, torch.Tensor]:
    """Pad token lists into ``input_ids``, ``attention_mask`` and ``response_mask`` (True from each row's
    ``response_starts`` index to its end). Shapes: (N, T) each."""
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(seqs, response_starts)):
        offset = width - len(seq) if side == "left" else 0
        input_ids[i, offset:offset + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, offset:offset + len(seq)] = 1
        response_mask[i, offset + start:offset + len(seq)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_groups(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int,
                   side: Literal["right", "left"] = "right") -> dict[str, Any]:
    """(prompt_ids, [response_ids, ...]) groups -> one batch with a row per (prompt, response).

    Rows are ordered group by group. ``slots`` (G, K) maps each group's k-th response to its row (-1 where a
    group has fewer than K responses) so per-row log-probs regroup as ``logps[slots]``; ``slot_mask`` is
    ``slots >= 0``. ``tokens`` counts non-padding tokens of every prompt+response row.
    """
    width = max(len(responses) for _, responses in groups)
    slots = torch.full((len(groups), width), -1, dtype=torch.long)
    seqs: list[list[int]] = []
    starts: list[int] = []
    for g, (prompt, responses) in enumerate(groups):
        for k, response in enumerate(responses):
            slots[g, k] = len(seqs)
            seqs.append(list(prompt) + list(response))
            starts.append(len(prompt))
    batch: dict[str, Any] = pad_sequences(seqs, starts, pad_id, side)
    batch["slots"] = slots
    batch["slot_mask"] = slots >= 0
    batch["n_pairs"] = len(groups)
    batch["tokens"] = int(batch["attention_mask"].sum())
    return batch


def collate_pairs(pairs: Sequence[Any], pad_id: int, side: Literal["right", "left"] = "right") -> dict[str, Any]:
    """Pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) -> groups of two, chosen in slot 0."""
    return collate_groups([(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs], pad_id, side)


def collate_ranked(items: Sequence[Any], pad_id: int, side: Literal["right", "left"] = "right") -> dict[str, Any]:
    """Rankings (``prompt_ids``, ``responses_ids`` best first) -> groups of K."""
    return collate_groups([(r.prompt_ids, r.responses_ids) for r in items], pad_id, side)


def regroup(values: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Per-row values (N,) -> per-group (G, K), zero in empty slots."""
    slots = batch["slots"]
    return values[slots.clamp(min=0)] * batch["slot_mask"]


def collate_responses(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                      side: Literal["right", "left"] = "right") -> dict[str, Any]:
    """(prompt_ids, response_ids) rows -> one batch of N rows (SFT, scoring)."""
    batch: dict[str, Any] = pad_sequences([list(p) + list(r) for p, r in rows], [len(p) for p, _ in rows],
                                          pad_id, side)
    batch["tokens"] = int(batch["attention_mask"].sum())
    batch["n_response_tokens"] = sum(len(r) for _, r in rows)
    return batch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The order of pair indices in one epoch: a permutation drawn from (seed, epoch) alone, so that any
    position in the stream can be recomputed on resume without replaying earlier epochs."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class PairStream:
    """Yields pair indices epoch after epoch; ``position`` (epoch, offset) is all the state there is."""

    def __init__(self, n: int, seed: int, shuffle: bool, epoch: int = 0, offset: int = 0):
        if n == 0:
            raise ValueError("no pairs to train on")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.offset = epoch, offset
        self._order = epoch_order(n, epoch, seed, shuffle)

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = epoch_order(self.n, self.epoch, self.seed, self.shuffle)
            step = min(k - len(out), self.n - self.offset)
            out.extend(self._order[self.offset:self.offset + step])
            self.offset += step
        return out

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}
