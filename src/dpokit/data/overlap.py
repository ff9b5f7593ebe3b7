"""Train/eval overlap: evaluation rows that also occur in training make eval metrics look better than they are.

Compared in token space (what the model actually sees), after tokenization and truncation, so two rows that
differ only in ways the pipeline normalizes away still match. Counts are of *eval* rows: "3 of the eval pairs
also appear in train".
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from typing import Literal

from dpokit.data.tokenize import TokenizedGroup


def find_overlap(train_items: Iterable[TokenizedGroup], eval_items: Iterable[TokenizedGroup], *,
                 by: Literal["pair", "prompt"] = "pair") -> int:
    """Number of eval items that also occur in train.

    ``by="pair"``: same prompt ids and same response ids in the same order (best first: a pair's chosen, then
    its rejected). ``by="prompt"``: same prompt ids, whatever the responses. Items are
    :class:`~dpokit.data.tokenize.TokenizedGroup`.
    """
    key = _pair_key if by == "pair" else _prompt_key
    seen = {key(item) for item in train_items}
    return sum(key(item) in seen for item in eval_items)


def overlap_report(train_items: Sequence[TokenizedGroup], eval_items: Sequence[TokenizedGroup]) -> dict[str, int]:
    """``{"pairs": ..., "prompts": ..., "eval_rows": ...}`` for ``data_report.json``."""
    return {"pairs": find_overlap(train_items, eval_items, by="pair"),
            "prompts": find_overlap(train_items, eval_items, by="prompt"),
            "eval_rows": len(eval_items)}


def _digest(parts: list[list[int]]) -> bytes:
    """16 bytes per item instead of a tuple of every id; the length prefix keeps [1, 2] + [3] apart from
    [1] + [2, 3]."""
    h = hashlib.blake2b(digest_size=16)
    for ids in parts:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(array("q", ids).tobytes())
    return h.digest()


def _pair_key(item: TokenizedGroup) -> bytes:
    return _digest([item.prompt_ids, *item.responses_ids])


def _prompt_key(item: TokenizedGroup) -> bytes:
    return _digest([item.prompt_ids])
