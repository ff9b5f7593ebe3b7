"""Train/eval overlap: evaluation rows that also occur in training make eval metrics look better than they are.

Compared in token space (what the model actually sees), after tokenization and truncation, so two rows that
differ only in ways the pipeline normalizes away still match. Counts are of *eval* rows: "3 of the eval pairs
also appear in train".
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

from dpokit.data.tokenize import TokenizedGroup


def find_overlap(train_items: Iterable[TokenizedGroup], eval_items: Iterable[TokenizedGroup], *,
                 by: Literal["pair", "prompt"] = "pair") -> int:
    """Number of eval items that also occur in train.

    ``by="pair"``: same prompt ids and same response ids in the same order (best first: a pair's chosen, then
    its rejected). ``by="prompt"``: same prompt ids, whatever the responses. Items are
    :class:`~dpokit.data.tokenize.TokenizedGroup`.
    """
    eval_keys = list(_keys(eval_items, by))
    wanted = set(eval_keys)
    found = {key for key in _keys(train_items, by) if key in wanted}  # memory: the eval keys, not train's
    return sum(key in found for key in eval_keys)


def overlap_report(train_items: Sequence[TokenizedGroup], eval_items: Sequence[TokenizedGroup]) -> dict[str, int]:
    """``{"pairs": ..., "prompts": ..., "eval_rows": ...}`` for ``data_report.json``."""
    return {"pairs": find_overlap(train_items, eval_items, by="pair"),
            "prompts": find_overlap(train_items, eval_items, by="prompt"),
            "eval_rows": len(eval_items)}


def _keys(items: Iterable[TokenizedGroup], by: str) -> Iterator[bytes]:
    """Each item's key; a cached dataset (``dpokit.data.cache_dataset``) has them stored, so no token is read."""
    stored = getattr(items, "pair_keys" if by == "pair" else "prompt_keys", None)
    if stored is not None:
        for start in range(0, len(stored), 1 << 16):
            block = stored[start:start + (1 << 16)].tobytes()
            yield from (block[i:i + 16] for i in range(0, len(block), 16))
        return
    key = _pair_key if by == "pair" else _prompt_key
    yield from (key(item) for item in items)


def _digest(parts: list[list[int]], images: str = "") -> bytes:
    """16 bytes per item instead of a tuple of every id; the length prefix keeps [1, 2] + [3] apart from
    [1] + [2, 3]. ``images``: the sha256 of a prompt's images (``dpokit.data.vision``): every image of a size
    has the same placeholder ids, so the same question about another image is another prompt."""
    h = hashlib.blake2b(digest_size=16)
    h.update(images.encode())
    for ids in parts:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(array("q", ids).tobytes())
    return h.digest()


def _pair_key(item: TokenizedGroup) -> bytes:
    return _digest([item.prompt_ids, *item.responses_ids], getattr(item, "images_sha256", ""))


def _prompt_key(item: TokenizedGroup) -> bytes:
    return _digest([item.prompt_ids], getattr(item, "images_sha256", ""))
