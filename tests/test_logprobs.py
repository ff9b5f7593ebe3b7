"""The one log-prob function: response tokens only, padding-independent, fast path == plain path."""

import math

import pytest
import torch

from dpokit.data.batch import pad_sequences
from dpokit.models.loading import tiny_model
from dpokit.models.logprobs import sequence_logps
from tolerances import GRAD_TOL, LOGP_TOL


def _model(seed=0):
    return tiny_model(512, seed=seed).eval()


def _logps(model, seqs, starts, side="right", **kw):
    b = pad_sequences(seqs, starts, pad_id=0, side=side)
    return sequence_logps(model, b["input_ids"], b["attention_mask"], b["response_mask"], **kw)


@pytest.mark.equivalence
def test_matches_hand_computed_sum_over_response_tokens():
    model = _model()
    seq, start = [5, 17, 33, 90, 211, 2], 3
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    expected = sum(torch.log_softmax(logits[t - 1], -1)[seq[t]].item() for t in range(start, len(seq)))
    logps, n = _logps(model, [seq], [start])
    assert n.tolist() == [3]
    # The model's own head vs the fused chunked head: fp32 round-off of a 3-token sum (tolerances.LOGP_TOL).
    torch.testing.assert_close(logps, torch.tensor([expected]), **LOGP_TOL)


def test_prompt_tokens_do_not_count():
    model = _model()
    # Same response after two different prompts: only the response tokens are scored, so changing a
    # prompt token changes the value through conditioning but a zero-length response scores exactly 0.
    logps, n = _logps(model, [[5, 6, 7]], [3])
    assert n.tolist() == [0] and logps.tolist() == [0.0]


@pytest.mark.equivalence
def test_padding_side_and_neighbours_do_not_change_logps():
    model = _model()
    pair = ([3, 4, 5, 6, 7, 8, 9], 4)
    alone, _ = _logps(model, [pair[0]], [pair[1]])
    neighbours = [[11] * 25, [12, 13], list(range(20, 60))]
    for side in ("right", "left"):
        seqs = [neighbours[0], pair[0], neighbours[1], neighbours[2]]
        logps, _ = _logps(model, seqs, [3, pair[1], 1, 10], side=side)
        torch.testing.assert_close(logps[1], alone[0], **LOGP_TOL)  # other shapes, other rounding


@pytest.mark.equivalence
def test_fast_path_equals_plain_path_values_and_gradients():
    seqs = [[1, 9, 8, 7, 6, 5, 4, 2], [1, 30, 31, 2], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 2]]
    starts = [3, 2, 6]
    results = []
    for plain, chunk in ((True, 1024), (False, 1024), (False, 2)):
        model = _model()
        logps, _ = _logps(model, seqs, starts, plain=plain, chunk_size=chunk)
        logps.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logps.detach(), grads))
    for logps, grads in results[1:]:  # fp32 round-off only: derivations in tolerances.py
        torch.testing.assert_close(logps, results[0][0], **LOGP_TOL)
        torch.testing.assert_close(grads, results[0][1], **GRAD_TOL)


@pytest.mark.equivalence
def test_hand_written_head_backward_equals_autograd_in_fp32_and_bf16():
    from dpokit.models.logprobs import _HeadLogps, _token_logps

    gen = torch.Generator().manual_seed(0)
    hidden0 = torch.randn(37, 16, generator=gen)
    weight0 = torch.randn(300, 16, generator=gen) * 0.5
    targets = torch.randint(0, 300, (37,), generator=gen)
    targets[:3] = 7  # repeated targets: their gradients add up in the same column
    upstream = torch.randn(37, generator=gen)  # not all ones: the incoming gradient must be applied per row
    for bf16 in (False, True):
        outs = []
        for fn in (_token_logps, _HeadLogps.apply):
            hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = fn(hidden, weight, targets)
            (out * upstream).sum().backward()
            outs.append((out.detach(), hidden.grad, weight.grad))
        assert outs[1][0].dtype == torch.float32
        # fp32: each output is a sum over <= 37 rows (or 16 columns) of products of size <= ~3, so two orders
        # differ by <= 37 * EPS32 / 2 * 3 ~ 7e-6 worst case (~1e-6 typical); the softmax itself is exact to a
        # few ulps. bf16: both paths round the matrix products' inputs and outputs to bf16 (unit round-off
        # 2^-9 = 2e-3) at different points (autograd casts the gradient of the logits, the hand-written
        # backward its softmax-minus-onehot), a few roundings of 2e-3 relative: 2e-2 relative and absolute.
        # A wrong backward (no upstream per row, a missing one-hot, a lost repeated target) is off by O(1).
        tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-5}
        for got, want in zip(outs[1], outs[0]):
            torch.testing.assert_close(got, want, **tol)
        assert outs[1][1].abs().sum() > 0 and outs[1][2][7].abs().sum() > 0


def _groups():
    return [([1, 9, 8, 7], [[6, 5, 4, 2], [30, 31, 2]]),
            ([1, 40, 41, 42, 43, 44], [[45, 46, 2], [47, 2]]),
            ([1, 50], [[51, 52, 53, 54, 55, 56, 2], [57, 58, 2]])]


def _grouped(model, layout, pack_length=0, plain=False):
    from dpokit.data.batch import collate_groups, regroup
    from dpokit.models.logprobs import batch_logps

    batch = collate_groups(_groups(), pad_id=0, layout=layout, pack_length=pack_length)
    logps, n = batch_logps(model, batch, plain=plain)
    return regroup(logps, batch), regroup(n, batch), batch


@pytest.mark.equivalence
def test_packed_prefix_shared_layout_equals_padded_layout_values_and_gradients():
    results = []
    for layout, pack_length, plain in (("padded", 0, True), ("padded", 0, False), ("packed", 0, False),
                                       ("packed", 64, False), ("packed", 64, True)):
        model = _model()
        logps, n, batch = _grouped(model, layout, pack_length, plain)
        logps.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logps.detach(), n, grads, batch))
    for logps, n, grads, _ in results[1:]:
        assert torch.equal(n, results[0][1])  # token counts are integers: exact
        torch.testing.assert_close(logps, results[0][0], **LOGP_TOL)  # fp32 round-off: tolerances.py
        torch.testing.assert_close(grads, results[0][2], **GRAD_TOL)
    padded, packed_one_row = results[1][3], results[3][3]
    assert packed_one_row["input_ids"].shape[0] == 1  # everything fits one 64-token row
    # The prompt is computed once per group: fewer real positions than prompt+response per response.
    assert packed_one_row["real_positions"] == sum(len(p) + sum(map(len, rs)) for p, rs in _groups())
    assert padded["real_positions"] == padded["tokens"] == packed_one_row["tokens"]
    assert packed_one_row["real_positions"] < padded["real_positions"]


@pytest.mark.equivalence
def test_packed_layout_with_eager_attention_matches_sdpa():
    eager = _model()
    eager.config._attn_implementation = "eager"
    a, _, _ = _grouped(eager, "packed", 64)
    b, _, _ = _grouped(_model(), "padded")
    torch.testing.assert_close(a.detach(), b.detach(), **LOGP_TOL)  # fp32 round-off: tolerances.py


@pytest.mark.equivalence
def test_bf16_eager_attention_matches_sdpa():
    eager = _model()
    eager.config._attn_implementation = "eager"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _, _ = _grouped(eager, "packed")
        b, _, _ = _grouped(_model(), "packed")
    a.sum().backward()  # the eager mask and the bf16 matrix products go backward too
    # bf16 rounds every matrix product's inputs to 2^-9 = 2e-3 relative, and eager and SDPA round at different
    # points (eager rounds the scores and the probabilities, SDPA fuses them). Each token's log-prob (|.| ~ 5)
    # carries a few such roundings of its logits (~2e-2), a sum of <= 9 tokens ~0.1 absolute, or ~2e-2 relative
    # of the sum. A wrong mask (a pair attending to its neighbour) changes a sum by ~1 or more.
    torch.testing.assert_close(a.detach(), b.detach(), atol=0.1, rtol=0.02)


@pytest.mark.equivalence
def test_compiled_layers_give_the_same_training(tmp_path):
    import json

    import dpokit
    from dpokit.training.metrics import read_metrics

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "chosen": f" yes {i}", "rejected": f" no {i}"}) + "\n"
                            for i in range(8)))
    rows = {}
    for compiled in (False, True):
        run = dpokit.train({"model": {"name_or_path": "tiny-random-llama"},
                            "data": {"train": str(data), "max_length": 32, "max_prompt_length": 16},
                            "train": {"lr": 1e-3, "batch_size": 4, "max_steps": 2, "compile": compiled,
                                      "progress": False}}, run_dir=str(tmp_path / str(compiled)))
        rows[compiled] = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    # Inductor fuses each layer into its own kernels (its own vectorized exp and rsqrt, accurate to ~1 ulp, and
    # its own reduction order): more roundings differ than with a kernel reorder, still fp32 round-off.
    # Step 1: same weights, loss ln 2 (ulp 6e-8) and grad_norm ~1 summed over ~1e5 squares (sqrt growth:
    # ~300 * EPS32 / 2 ~ 2e-5 relative at worst). Step 2 starts from weights AdamW may have moved differently
    # in a few round-off-sized elements, which enter the loss at second order (tolerances.py). A compiled layer
    # that computes something else (a lost mask, a wrong position) changes the loss by > 1e-3.
    for a, b in zip(rows[False], rows[True]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4


def test_target_weight_scales_each_token_before_the_sum():
    """LD-DPO's weights: a slot's sum is front + alpha * rear, from the per-token log-probs by hand."""
    from dpokit.data.batch import collate_groups
    from dpokit.losses.tokens import length_desensitized_weights
    from dpokit.models.logprobs import layout_logps, target_logps

    model = _model()
    batch = collate_groups(_groups(), pad_id=0, layout="packed")
    with torch.no_grad():
        tokens = target_logps(model, batch)["logps"].tolist()
        batch["target_weight"] = length_desensitized_weights(batch["target_slot"], batch["slots"],
                                                             batch["n_slots"], 0.5)
        weighted, n = layout_logps(model, batch)
    public = {0: 3, 1: 2, 2: 3}  # the shorter response of each pair of _groups()
    want = [0.0] * batch["n_slots"]
    seen = [0] * batch["n_slots"]
    for value, slot in zip(tokens, batch["target_slot"].tolist()):
        want[slot] += value if seen[slot] < public[slot // 2] else 0.5 * value
        seen[slot] += 1
    assert n.tolist() == seen
    torch.testing.assert_close(weighted, torch.tensor(want), **LOGP_TOL)


def test_wpo_log_weights_by_hand_on_both_paths():
    """WPO's per-response log-weight: the mean over its tokens of log p(y_t) - log sum_v p(v)^2, from the model's
    full logits by hand; the fast (chunked) path and the plain path agree, and it carries no gradient."""
    from dpokit.data.batch import collate_groups, regroup
    from dpokit.models.logprobs import layout_logps

    model = _model()
    groups = [([1, 9, 8], [[6, 5, 4, 2], [30, 31, 2]])]
    want = []
    with torch.no_grad():
        for prompt, responses in groups:
            for response in responses:
                seq = prompt + response
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
                terms = [logp[t - 1, seq[t]].item() - torch.logsumexp(2 * logp[t - 1], -1).item()
                         for t in range(len(prompt), len(seq))]
                want.append(sum(terms) / len(terms))
    for plain in (False, True):
        batch = collate_groups(groups, pad_id=0, layout="packed")
        logps, n, log_weights = layout_logps(model, batch, plain=plain, wpo=True)
        assert logps.requires_grad and not log_weights.requires_grad
        torch.testing.assert_close(regroup(log_weights, batch)[0], torch.tensor(want, dtype=torch.float32),
                                   **LOGP_TOL)


def test_wpo_log_weight_of_a_uniform_policy_is_zero():
    # p(y_t) = 1/V = sum_v (1/V)^2: a policy that samples uniformly finds every response as likely as its own.
    from dpokit.models.logprobs import _log_sum_squares

    vocab = 512
    assert abs(_log_sum_squares(torch.zeros(3, vocab)) - math.log(1 / vocab)).max() < 1e-6
    # A one-hot policy: its token has p = 1 = sum_v p^2.
    assert abs(_log_sum_squares(torch.tensor([[0.0, -1e4, -1e4]]))).max() < 1e-6


def test_mean_logits_by_hand_on_both_paths():
    """TRL's ``logits/*`` ingredient: each response's sum over its tokens of the mean logit over the vocabulary,
    from the model's full logits by hand. The fast path gets it as h . mean_v(W_v) (the head is linear), the plain
    path averages the logits; both equal the hand sum, carry no gradient, and ignore the temperature."""
    from dpokit.data.batch import collate_groups, regroup
    from dpokit.models.logprobs import layout_logps, target_logps

    model = _model()
    groups = [([1, 9, 8], [[6, 5, 4, 2], [30, 31, 2]]), ([1, 40], [[45, 46, 2], [47, 48, 49, 2]])]
    want = []
    with torch.no_grad():
        for prompt, responses in groups:
            for response in responses:
                seq = prompt + response
                logits = model(input_ids=torch.tensor([seq])).logits[0].double()
                want.append(sum(logits[t - 1].mean().item() for t in range(len(prompt), len(seq))))
    want = torch.tensor(want, dtype=torch.float32).reshape(2, 2)
    assert want.abs().min() > 1e-3  # a sum that is not ~0, so that a wrong one shows
    for plain in (False, True):
        batch = collate_groups(groups, pad_id=0, layout="packed")
        logps, n, sums = layout_logps(model, batch, plain=plain, mean_logits=True)
        assert logps.requires_grad and not sums.requires_grad
        # Each token's mean logit is a mean of 512 fp32 logits of size ~1 (a few ulps each); summed over <= 4
        # tokens: far inside LOGP_TOL's bound for sums of log-softmaxes of the same logits.
        torch.testing.assert_close(regroup(sums, batch), want, **LOGP_TOL)
        hot = target_logps(model, batch, plain=plain, mean_logits=True, temperature=0.5)["mean_logits"]
        cold = target_logps(model, batch, plain=plain, mean_logits=True)["mean_logits"]
        torch.testing.assert_close(hot, cold, **LOGP_TOL)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the training's bf16 path: still fp32 sums
            _, _, sums_bf16 = layout_logps(model, batch, plain=plain, mean_logits=True)
        assert sums_bf16.dtype == torch.float32
        # Under bf16 only the decoder's states differ: bf16 rounds each op to a relative 2^-9, compounded over
        # this 2-layer model's matmuls and norms to a few 2^-9 of the state, so of each mean logit h . mean(W).
        # 2^-6 of the largest sum is 8x that (measured: 2^-8.6); a prompt token counted or a dropped token moves
        # a sum by a whole token's value, ~1/4 of it.
        torch.testing.assert_close(sums_bf16, sums, atol=2**-6 * float(sums.abs().max()), rtol=0)
