"""Batching: tokenized groups -> tensors in a batch layout, and the seeded order in which groups are visited.

A batch holds groups of responses to one prompt (a pair is a group of two, chosen first; a ranking a group of
K, best first; K may differ within a batch), so one forward pass scores every response. The layouts (padded,
packed) are defined here and scored by ``dpokit.models.logprobs``, which imports this module (never the reverse).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from dpokit.data.tokenize import TokenizedGroup
from dpokit.data.vision import collate_pixels
from dpokit.errors import DataError


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count only real tokens, so a left-padded row gets the same positions as an unpadded one.
    Shape: (B, T) -> (B, T)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


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


def padded_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  response_mask: torch.Tensor) -> dict[str, Any]:
    """The scoring fields of a padded batch, one slot per row: each response token is predicted from the
    position before it. Shapes: (R, L) in; ``pred_index``, ``targets``, ``target_slot`` (M,) out."""
    rows, width = input_ids.shape
    target_mask = response_mask.bool().clone()
    target_mask[:, 0] = False  # nothing predicts the very first position
    flat = torch.nonzero(target_mask.reshape(-1)).squeeze(-1)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "pred_index": flat - 1, "targets": input_ids.reshape(-1)[flat], "target_slot": flat // width,
        "n_slots": rows,
    }


def _padded_groups(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int,
                   side: Literal["right", "left"]) -> dict[str, Any]:
    width = max(len(responses) for _, responses in groups)
    slots = torch.full((len(groups), width), -1, dtype=torch.long)
    seqs: list[list[int]] = []
    starts: list[int] = []
    for g, (prompt, responses) in enumerate(groups):
        for k, response in enumerate(responses):
            slots[g, k] = len(seqs)
            seqs.append(list(prompt) + list(response))
            starts.append(len(prompt))
    padded = pad_sequences(seqs, starts, pad_id, side)
    batch = padded_layout(padded["input_ids"], padded["attention_mask"], padded["response_mask"])
    batch["slots"] = slots
    batch["real_positions"] = int(padded["attention_mask"].sum())
    return batch


def _packed_groups(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int,
                   pack_length: int) -> dict[str, Any]:
    """Prefix sharing + padding-free packing: each group is laid out once as [prompt, response 1, response 2,
    ...] with positions restarting after the prompt for every response, and groups are packed first-fit into
    rows of ``max(pack_length, longest group)`` tokens. The 4D mask lets a token see its own segment and its
    group's prompt (causally), never another response or another group, so every log-prob equals the
    unshared, unpadded computation while the prompt is computed once and few positions are padding."""
    lengths = [len(p) + sum(len(r) for r in rs) for p, rs in groups]
    capacity = max(pack_length, max(lengths))
    rows: list[list[int]] = []
    fill: list[int] = []
    for g in sorted(range(len(groups)), key=lambda i: (-lengths[i], i)):  # first-fit decreasing
        for r, used in enumerate(fill):
            if used + lengths[g] <= capacity:
                rows[r].append(g)
                fill[r] += lengths[g]
                break
        else:
            rows.append([g])
            fill.append(lengths[g])
    width = max(fill)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    prompt_segment = torch.full((n_rows, width), -1, dtype=torch.long)
    owner = torch.full((n_rows, width), -1, dtype=torch.long)
    is_prompt = torch.zeros((n_rows, width), dtype=torch.bool)
    k_max = max(len(rs) for _, rs in groups)
    slots = torch.full((len(groups), k_max), -1, dtype=torch.long)
    pred_index: list[int] = []
    targets: list[int] = []
    target_slot: list[int] = []
    n_segments = 0
    for r, members in enumerate(rows):
        cursor = 0
        for g in sorted(members):
            prompt, responses = groups[g]
            n_prompt = len(prompt)
            input_ids[r, cursor:cursor + n_prompt] = torch.tensor(prompt, dtype=torch.long)
            position_ids[r, cursor:cursor + n_prompt] = torch.arange(n_prompt)
            segment[r, cursor:cursor + n_prompt] = n_segments
            prompt_segment[r, cursor:cursor + lengths[g]] = n_segments  # the whole group's prompt
            owner[r, cursor:cursor + n_prompt] = g
            is_prompt[r, cursor:cursor + n_prompt] = True
            n_segments += 1
            last_prompt = r * width + cursor + n_prompt - 1
            cursor += n_prompt
            for k, response in enumerate(responses):
                n = len(response)
                slot = g * k_max + k
                slots[g, k] = slot
                input_ids[r, cursor:cursor + n] = torch.tensor(response, dtype=torch.long)
                position_ids[r, cursor:cursor + n] = torch.arange(n_prompt, n_prompt + n)
                segment[r, cursor:cursor + n] = n_segments
                owner[r, cursor:cursor + n] = g
                n_segments += 1
                # The first response token is predicted from the prompt's last position, the rest from
                # the previous response position.
                pred_index.extend([last_prompt] + list(range(r * width + cursor, r * width + cursor + n - 1)))
                targets.extend(response)
                target_slot.extend([slot] * n)
                cursor += n
    real = segment >= 0
    same_segment = segment[:, :, None] == segment[:, None, :]
    group_prompt = is_prompt[:, None, :] & (owner[:, :, None] == owner[:, None, :])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (same_segment | group_prompt) & causal & real[:, None, :]
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
    return {
        "input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
        "pred_index": torch.tensor(pred_index, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "target_slot": torch.tensor(target_slot, dtype=torch.long),
        "n_slots": len(groups) * k_max, "slots": slots, "real_positions": int(real.sum()),
        # The mask's rule as per-position ids, for attention kernels that take a rule instead of a dense
        # mask (``dpokit.models.attention``): -1 at padding.
        "segment_ids": segment, "prompt_segment_ids": prompt_segment,
    }


Layout = Literal["padded", "packed"]


def collate_groups(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int,
                   side: Literal["right", "left"] = "right", layout: Layout = "padded",
                   pack_length: int = 0) -> dict[str, Any]:
    """(prompt_ids, [response_ids, ...]) groups -> one batch that scores every response.

    ``layout``: ``padded`` (one row per prompt+response, padded: the plain path) or ``packed`` (prompt computed
    once per group, groups packed into rows with a block mask). Both give the same log-probs.
    ``slots`` (G, K) maps each group's k-th response to its slot in the per-slot outputs (-1 where a group has
    fewer than K responses); ``tokens`` counts prompt+response tokens of every response (a prompt counts once
    per response, whatever the layout computes); ``computed_positions`` are the positions the model runs on.
    """
    if layout == "packed":
        batch = _packed_groups(groups, pad_id, pack_length)
    else:
        batch = _padded_groups(groups, pad_id, side)
    batch["slot_mask"] = batch["slots"] >= 0
    batch["n_pairs"] = len(groups)
    batch["tokens"] = sum(len(p) * len(rs) + sum(len(r) for r in rs) for p, rs in groups)
    batch["computed_positions"] = int(batch["input_ids"].numel())
    return batch


def collate_tokenized(items: Sequence[TokenizedGroup], pad_id: int, side: Literal["right", "left"] = "right",
                      layout: Layout = "padded", pack_length: int = 0) -> dict[str, Any]:
    """Tokenized groups -> one batch, each group's responses best first in its slots (a pair: chosen in slot
    0, rejected in slot 1). Groups of different K mix freely (``slot_mask`` marks the empty slots), as a
    ranking with ties, split into pairs, sits next to whole rankings. Groups with images
    (``dpokit.data.vision.VisionGroup``) bring their pixel inputs along in ``pixels``, padded layout only."""
    batch = collate_groups([(g.prompt_ids, g.responses_ids) for g in items], pad_id, side, layout, pack_length)
    if items and hasattr(items[0], "pixels"):
        if layout != "padded" or side != "right":
            raise DataError("train.layout: packed is not supported for image data (the model places each image's "
                            "features itself, one row per sequence); use train.layout: padded")
        batch["pixels"] = collate_pixels(items)
    return batch


collate_pairs = collate_tokenized
"""The name from when pairs were a type of their own (``benchmarks/`` still call it); the same function."""


def regroup(values: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Per-slot values (S,) -> per-group (G, K), zero in empty slots."""
    slots = batch["slots"]
    return values[slots.clamp(min=0)] * batch["slot_mask"]


def collate_responses(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                      side: Literal["right", "left"] = "right", layout: Layout = "padded",
                      pack_length: int = 0) -> dict[str, Any]:
    """(prompt_ids, response_ids) rows -> one batch with a slot per row (SFT, scoring)."""
    batch = collate_groups([(p, [r]) for p, r in rows], pad_id, side, layout, pack_length)
    batch["n_response_tokens"] = sum(len(r) for _, r in rows)
    return batch


def split_by_tokens(sizes: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Cut a run of items into consecutive ``(start, end)`` spans whose sizes add up to at most ``budget``; an
    item larger than the budget gets a span of its own. No span is empty; the spans cover every item in order."""
    spans: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if i > start and used + size > budget:
            spans.append((start, i))
            start, used = i, 0
        used += size
    if sizes:
        spans.append((start, len(sizes)))
    return spans


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every tensor of ``batch`` (and of the ``pixels`` dict inside it) on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else to_device(v, device) if k == "pixels" else v
            for k, v in batch.items()}


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
