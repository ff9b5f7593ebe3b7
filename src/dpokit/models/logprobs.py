"""THE one function for sequence log-probs: training, reference, scoring and evaluation all call it.

``layout_logps`` returns, per response ("slot"), the sum of log pi(y_t | x, y_<t) over its tokens, and their
count. It works on any batch *layout* (defined in ``dpokit.data.batch``, which imports nothing from here): every
target token names the position whose hidden state predicts it (``pred_index``), so the same code scores a plainly
padded batch (the predecessor is the previous position) and a packed batch where chosen and rejected share one
computed prompt (the first token of each response is predicted from the prompt's last position).

The vocabulary projection is applied only at those predicting positions, in chunks, under activation
checkpointing, so no (tokens x vocab) tensor of the whole batch is ever held: on SmolLM2 (49k vocabulary)
prompt and padding positions would otherwise dominate the cost of a step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpokit.data.batch import padded_layout

DEFAULT_CHUNK = 1024
"""Response positions projected to the vocabulary at once: 1024 x 49152 fp32 logits are 200 MB."""


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[target] for each row. Shapes: (M, H), (V, H), (M,) -> (M,).
    The log-softmax runs in fp32 even under bf16 autocast: a 49k-way normalizer loses too much in bf16."""
    logits = F.linear(hidden, weight).float()  # (M, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _HeadLogps(torch.autograd.Function):
    """``_token_logps`` with a hand-written backward that keeps only the hidden states and the normalizers.

    d log p(t) / d logits = onehot(t) - softmax(logits), so backward recomputes the chunk's logits once, turns
    them into softmax in place, subtracts the one-hot and multiplies by the incoming gradient: one (M, V)
    buffer, where autograd through ``gather`` + ``logsumexp`` (under activation checkpointing) builds several
    and recomputes the forward too. The matrix products run in the autocast dtype when autocast is on,
    exactly as ``F.linear`` under autocast does, and the softmax in fp32.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            logits = F.linear(hidden.to(dtype), weight.to(dtype)).float()  # (M, V)
            lse = torch.logsumexp(logits, dim=-1)
            out = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.compute_dtype = dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        dtype = ctx.compute_dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            grad = F.linear(h, w).float()  # (M, V): the logits again
            grad.sub_(lse[:, None]).exp_()  # softmax
            grad.scatter_add_(-1, targets[:, None], torch.full_like(lse[:, None], -1.0))  # softmax - onehot
            grad.mul_(-grad_out.float()[:, None])  # d loss / d logits
            grad = grad.to(dtype)
            grad_hidden = grad @ w if ctx.needs_input_grad[0] else None
            grad_weight = grad.t() @ h if ctx.needs_input_grad[1] else None
        return (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
                grad_weight.to(weight.dtype) if grad_weight is not None else None, None)


def supports_fast_path(model: nn.Module) -> bool:
    """Plain causal LMs: a decoder giving hidden states and an unbiased linear head with no logit
    post-processing (soft-capping, scaling), so the head can be applied to chosen positions only."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    special = any(getattr(config, name, None) not in (None, 1.0)
                  for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return (isinstance(head, nn.Linear) and head.bias is None and not special
            and hasattr(model, "get_decoder") and model.get_decoder() is not None)


def _model_mask(model: nn.Module, batch: dict[str, Any]) -> Any:
    """The batch's mask in the form the model's attention takes. SDPA takes the 4D boolean mask (True = may
    attend) as it is; eager attention adds a float mask instead; FlexAttention gets the packed layout's
    ``BlockMask`` (``dpokit.models.attention``), which skips the tiles where nothing is visible instead of reading an
    (R, L, L) mask at every layer. A 2D padding mask goes to every implementation unchanged: transformers builds
    each one's own mask from it."""
    mask = batch["attention_mask"]
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if mask.dim() != 4:
        return mask
    if implementation == "flex_attention":
        from dpokit.models.attention import is_packed, packed_block_mask

        if not is_packed(batch):
            raise ValueError("flex_attention needs a packed batch with segment_ids and prompt_segment_ids "
                             "(dpokit.data.batch.collate_groups(layout='packed'))")
        return packed_block_mask(batch)
    if implementation != "eager":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def target_logps(model: nn.Module, batch: dict[str, Any], *, chunk_size: int = DEFAULT_CHUNK, plain: bool = False,
                 hidden: bool = False, entropy: bool = False, log_sum_squares: bool = False,
                 mean_logits: bool = False, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """log pi(y_t | x, y_<t) of every target token of a batch layout, in ``pred_index`` order.

    Returns ``logps`` (M,) float32; with ``hidden`` also the final hidden state of each predicting position
    ``hidden`` (M, H) (what the vocabulary head reads: a value head reads the same features); with ``entropy``
    the entropy of pi(. | x, y_<t) at each of them, ``entropy`` (M,), computed without gradient; with
    ``log_sum_squares`` log sum_v pi(v | x, y_<t)^2 at each of them (WPO's normalizer), ``log_sum_squares`` (M,),
    without gradient; with ``mean_logits`` the mean over the vocabulary of the logits at each of them,
    ``mean_logits`` (M,), without gradient (TRL's ``logits/chosen`` and ``logits/rejected`` average it over the
    response tokens). Batch keys: see ``layout_logps``.

    ``temperature`` T scores the distribution a sampler at T draws from, softmax(logits / T) (PPO scores its
    rollouts at the temperature it sampled them at); the entropy is then that distribution's too.
    """
    input_ids, targets, pred_index = batch["input_ids"], batch["targets"], batch["pred_index"]
    inputs = {"input_ids": input_ids, "attention_mask": _model_mask(model, batch),
              "position_ids": batch["position_ids"], "use_cache": False}
    out: dict[str, torch.Tensor] = {}
    if plain or not supports_fast_path(model):
        result = model(**inputs, output_hidden_states=hidden)
        logits = result.logits  # (R, L, V)
        logits = logits.reshape(-1, logits.shape[-1])[pred_index].float()  # (M, V)
        if mean_logits:  # of the model's own logits, whatever the temperature, as TRL reports them
            out["mean_logits"] = logits.detach().mean(-1)
        logits = logits / temperature
        out["logps"] = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        if hidden:
            states = result.hidden_states[-1]  # after the final norm, as the head reads it
            out["hidden"] = states.reshape(-1, states.shape[-1])[pred_index]
        if entropy:
            with torch.no_grad():
                out["entropy"] = _entropy(logits)
        if log_sum_squares:
            with torch.no_grad():
                out["log_sum_squares"] = _log_sum_squares(logits)
        return out
    states = model.get_decoder()(**inputs).last_hidden_state  # (R, L, H)
    states = states.reshape(-1, states.shape[-1])[pred_index]  # (M, H): predicting positions only
    weight = model.get_output_embeddings().weight  # (V, H)
    # (h / T) @ W^T = logits / T: the head is linear, so scaling its input scales the logits (and the gradient).
    scaled = states / temperature if temperature != 1.0 else states
    pieces, entropies, squares = [], [], []
    for start in range(0, states.shape[0], chunk_size):
        h, t = scaled[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            # Keep only the chunk's hidden states for backward; its logits are recomputed there.
            pieces.append(_HeadLogps.apply(h, weight, t))
        else:
            pieces.append(_token_logps(h, weight, t))
        if entropy or log_sum_squares:
            with torch.no_grad():
                logits = F.linear(h, weight).float()  # (chunk, V) once more: only these statistics, no grad
                if entropy:
                    entropies.append(_entropy(logits))
                if log_sum_squares:
                    squares.append(_log_sum_squares(logits))
    empty = states.new_zeros(0, dtype=torch.float32)
    out["logps"] = torch.cat(pieces) if pieces else empty
    if hidden:
        out["hidden"] = states
    if entropy:
        out["entropy"] = torch.cat(entropies) if entropies else empty
    if log_sum_squares:
        out["log_sum_squares"] = torch.cat(squares) if squares else empty
    if mean_logits:
        with torch.no_grad():
            # mean_v (h . W_v) = h . mean_v(W_v): the head is linear, so the mean logit needs one (H,) vector,
            # not the (M, V) logits. Summed in fp32 without an fp32 copy of W.
            mean_row = torch.sum(weight.detach(), dim=0, dtype=torch.float32) / weight.shape[0]  # (H,)
            out["mean_logits"] = states.detach().float() @ mean_row
    return out


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) per row, in fp32. Shape: (M, V) -> (M,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _log_sum_squares(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v softmax(logits)_v^2 per row, in fp32: the log of the probability that two samples of the
    distribution agree. Shape: (M, V) -> (M,)."""
    return torch.logsumexp(2 * torch.log_softmax(logits.float(), dim=-1), dim=-1)


def layout_logps(model: nn.Module, batch: dict[str, Any], *, chunk_size: int = DEFAULT_CHUNK,
                 plain: bool = False, wpo: bool = False, unweighted: bool = False,
                 mean_logits: bool = False) -> tuple[torch.Tensor, ...]:
    """Summed response log-probs for every slot of a batch layout.

    Batch keys (see ``dpokit.data.batch``): ``input_ids`` (R, L); ``attention_mask`` (R, L) for padded rows or
    (R, 1, L, L) boolean for packed rows, which also carry ``segment_ids`` and ``prompt_segment_ids`` (R, L) for
    FlexAttention; ``position_ids`` (R, L); ``pred_index`` (M,) flat index into R*L of
    the position predicting each target token; ``targets`` (M,); ``target_slot`` (M,) the response each
    target belongs to; ``n_slots``.
    ``plain`` computes full logits at every position (the reference implementation the fast path is tested
    against). An optional ``target_weight`` (M,) multiplies each token's log-prob before the sum (LD-DPO:
    ``dpokit.losses.tokens``). Returns ``logps`` (S,) float32 and ``n_tokens`` (S,); with ``wpo`` also each
    response's WPO log-weight (S,), without gradient: the mean over its tokens of
    log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2 (``dpokit.losses.tokens.wpo_pair_weights``); with
    ``unweighted`` then the summed log-probs without ``target_weight`` (S,) (``rpo``'s NLL under LD-DPO); with
    ``mean_logits``, last, each response's sum over its tokens of the mean logit over the vocabulary (S,),
    without gradient (divided by the token counts: TRL's ``logits/chosen``).
    """
    out = target_logps(model, batch, chunk_size=chunk_size, plain=plain, log_sum_squares=wpo,
                       mean_logits=mean_logits)
    token_logps = out["logps"]
    device, n_slots, slot = batch["input_ids"].device, batch["n_slots"], batch["target_slot"]
    n_tokens = torch.zeros(n_slots, dtype=torch.long, device=device).index_add(0, slot, torch.ones_like(slot))
    weighted = token_logps * batch["target_weight"] if "target_weight" in batch else token_logps
    logps = torch.zeros(n_slots, dtype=torch.float32, device=device).index_add(0, slot, weighted)
    result: tuple[torch.Tensor, ...] = (logps, n_tokens)
    if wpo:
        per_token = token_logps.detach() - out["log_sum_squares"]
        summed = torch.zeros(n_slots, dtype=torch.float32, device=device).index_add(0, slot, per_token)
        result += (summed / n_tokens.clamp(min=1),)
    if unweighted:
        result += (torch.zeros(n_slots, dtype=torch.float32, device=device).index_add(0, slot, token_logps),)
    if mean_logits:
        # Under autocast (bf16 gathers too) the mean logits come out in bf16; the sums are fp32 like the others.
        result += (torch.zeros(n_slots, dtype=torch.float32, device=device).index_add(0, slot,
                                                                                     out["mean_logits"].float()),)
    return result


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    plain: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens of each padded row, and how many there are.

    Args:
        input_ids: (B, T) prompt + response tokens, padded on either side.
        attention_mask: (B, T) 1 for real tokens.
        response_mask: (B, T) True where the token at that position belongs to the response.
    Returns:
        logps: (B,) sum over response tokens of log pi(y_t | y_<t), float32.
        n_tokens: (B,) number of response tokens.
    """
    batch = padded_layout(input_ids, attention_mask, response_mask)
    return layout_logps(model, batch, chunk_size=chunk_size, plain=plain)


def batch_logps(model: nn.Module, batch: dict[str, Any], **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """``layout_logps`` on a collated batch: per-slot summed log-probs (S,) and token counts (S,) (and, with
    ``wpo=True``, WPO's per-response log-weights (S,))."""
    return layout_logps(model, batch, **kwargs)
