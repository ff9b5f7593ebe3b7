"""FlexAttention for the packed layout: the BlockMask is the dense mask, and the model computes the same
log-probs with it as SDPA with the dense mask."""

import itertools
import random
from functools import lru_cache

import pytest
import torch

from dpokit.data.batch import collate_groups
from dpokit.models.attention import flex_attention_available, flex_attention_supported, packed_block_mask
from dpokit.models.loading import tiny_model
from dpokit.models.logprobs import layout_logps

VOCAB = 512
needs_flex_module = pytest.mark.skipif(not flex_attention_available(),
                                       reason="this PyTorch has no torch.nn.attention.flex_attention")


def _groups(seed=0, n=9):
    """Pairs with uneven prompt and response lengths (a 1-token response included) and one ranking."""
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    groups = [(ids(rng.randint(2, 40)), [ids(rng.randint(1, 30)), ids(rng.randint(1, 30))]) for _ in range(n)]
    groups.append((ids(5), [ids(1), ids(3)]))
    groups.append((ids(7), [ids(4), ids(2), ids(6)]))  # a ranking: three responses share one prompt
    return groups


def _packed(seed=0, pack_length=150):
    return collate_groups(_groups(seed), pad_id=0, layout="packed", pack_length=pack_length)


def test_packed_batch_has_per_position_ids_and_padded_batch_is_unchanged():
    packed = _packed()
    rows, width = packed["input_ids"].shape
    assert rows > 1 and packed["segment_ids"].shape == packed["prompt_segment_ids"].shape == (rows, width)
    padding = packed["segment_ids"] < 0
    assert padding[:, -1].any() and not padding[:, 0].any()  # rows end in padding, never start with it
    assert torch.equal(packed["prompt_segment_ids"] < 0, padding)
    padded = collate_groups(_groups(), pad_id=0, layout="padded")
    assert "segment_ids" not in padded and "prompt_segment_ids" not in padded


def _blocks_dense(num_blocks, indices):
    """A BlockMask's (R, H, nq, n_kv_blocks) index form back to a dense boolean block matrix."""
    out = torch.zeros(*indices.shape, dtype=torch.bool)
    for index in itertools.product(*map(range, num_blocks.shape)):
        out[index][indices[index][: num_blocks[index]]] = True
    return out


@needs_flex_module
@pytest.mark.parametrize("block", [128, 16])
def test_block_mask_is_exactly_the_dense_mask(block):
    from torch.nn.attention.flex_attention import create_mask

    for seed, pack_length in ((0, 150), (1, 0), (2, 64)):
        batch = _packed(seed, pack_length)
        dense = batch["attention_mask"]  # (R, 1, L, L)
        rows, _, width, _ = dense.shape
        block_mask = packed_block_mask(batch, block_size=block)
        assert tuple(block_mask.shape) == (rows, 1, width, width)
        assert torch.equal(create_mask(block_mask.mask_mod, rows, 1, width, width, device="cpu"), dense)
        # The tile index must list exactly the tiles holding a visible pair (a missing one would hide keys
        # from the fused kernel, which trusts it), and call "full" only tiles where every pair is visible.
        n = -(-width // block)
        tiles = torch.zeros(rows, 1, n * block, n * block, dtype=torch.bool)
        tiles[..., :width, :width] = dense
        tiles = tiles.reshape(rows, 1, n, block, n, block)
        partial = _blocks_dense(block_mask.kv_num_blocks, block_mask.kv_indices)
        full = _blocks_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        assert torch.equal(partial | full, tiles.any(5).any(3))
        assert not (partial & full).any()
        assert not (full & ~tiles.all(5).all(3)).any()


@lru_cache(maxsize=1)
def _flex_runs_on_cpu() -> str:
    """'' when a compiled FlexAttention forward runs here, else why not (no C++ compiler for Inductor, ...)."""
    if not flex_attention_available():
        return "this PyTorch has no torch.nn.attention.flex_attention"
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    try:
        q = torch.zeros(1, 1, 8, 8)
        mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, 1, None, 8, 8, device="cpu")
        with torch.no_grad():
            torch.compile(flex_attention)(q, q, q, block_mask=mask)
    except Exception as exc:  # any failure to compile or run means: cannot test the model path here
        return f"FlexAttention does not run on this CPU: {type(exc).__name__}: {str(exc)[:200]}"
    return ""


def test_flex_attention_is_only_chosen_for_cuda():
    assert not flex_attention_supported("cpu")
    assert not flex_attention_supported(torch.device("cpu"))


def test_flex_attention_block_mask_gives_the_same_logps_as_sdpa_with_the_dense_mask():
    reason = _flex_runs_on_cpu()
    if reason:
        pytest.skip(reason)
    model = tiny_model(VOCAB).eval()
    for layout in ("packed", "padded"):
        batch = collate_groups(_groups(), pad_id=0, layout=layout, pack_length=150)
        with torch.no_grad():  # PyTorch's CPU FlexAttention has no backward
            model.config._attn_implementation = "sdpa"
            want, n_want = layout_logps(model, batch)
            model.config._attn_implementation = "flex_attention"
            got, n_got = layout_logps(model, batch)
        assert torch.equal(n_got, n_want)
        # The paths differ only inside attention: the order of the fp32 additions of each query's softmax
        # normalizer and weighted sum over at most L keys (L = row width). A sum of n fp32 terms computed in
        # another order differs by at most ~n*u times the sum of the terms' magnitudes (u = eps/2 = 2^-24,
        # Higham, "Accuracy and Stability of Numerical Algorithms", eq. 4.4), so every attention output moves by
        # at most L*u relative to its size. The rest of the model is the same fp32 code on both paths; RMSNorm
        # and the small random weights of the tiny model pass a relative perturbation on without amplifying
        # it, so each token's log-prob moves by at most L*u*|log p_t|, and a slot's sum by L*u*sum_t |log p_t|
        # = L*u*|logps| (every log p_t <= 0). A wrong mask moves log-probs by ~0.1-1 (a response seeing its
        # neighbours), far above this bound (~1e-3 at |logps| ~ 160, L ~ 150).
        width = batch["input_ids"].shape[1]
        rtol = width * torch.finfo(torch.float32).eps / 2
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    model.config._attn_implementation = "sdpa"


def test_flex_attention_refuses_a_packed_batch_without_ids():
    if not flex_attention_available():
        pytest.skip("this PyTorch has no torch.nn.attention.flex_attention")
    model = tiny_model(VOCAB).eval()
    model.config._attn_implementation = "flex_attention"
    batch = _packed()
    del batch["segment_ids"]
    with pytest.raises(ValueError, match="segment_ids"), torch.no_grad():
        layout_logps(model, batch)
