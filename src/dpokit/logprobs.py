"""THE one function for sequence log-probs: training, reference, scoring and evaluation all call it.

``sequence_logps`` returns, per row, the sum of log pi(y_t | x, y_<t) over response tokens only, and their
count. The vocabulary projection is applied only at response positions, in chunks, and under activation
checkpointing, so no (tokens x vocab) tensor of the whole batch is ever held: on SmolLM2 (49k vocabulary) the
prompt and padding positions would otherwise dominate the cost of a step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024
"""Response positions projected to the vocabulary at once: 1024 x 49152 fp32 logits are 200 MB."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count only real tokens, so a left-padded row gets the same positions as an unpadded one.
    Shape: (B, T) -> (B, T)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[target] for each row. Shapes: (M, H), (V, H), (M,) -> (M,).
    The log-softmax runs in fp32 even under bf16 autocast: a 49k-way normalizer loses too much in bf16."""
    logits = F.linear(hidden, weight).float()  # (M, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _supports_fast_path(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    # Models that post-process logits (soft-capping, scaling) or have a biased head take the plain path.
    special = any(getattr(config, name, None) not in (None, 1.0)
                  for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return (isinstance(head, nn.Linear) and head.bias is None and not special
            and hasattr(model, "get_decoder") and model.get_decoder() is not None)


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    plain: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens of each row, and how many there are.

    Args:
        input_ids: (B, T) prompt + response tokens, padded on either side.
        attention_mask: (B, T) 1 for real tokens.
        response_mask: (B, T) True where the token at that position belongs to the response.
        plain: compute full logits for every position (the reference implementation the fast path is
            tested against).
    Returns:
        logps: (B,) sum over response tokens of log pi(y_t | y_<t), float32.
        n_tokens: (B,) number of response tokens.
    """
    position_ids = position_ids_from_mask(attention_mask)
    # Token t is predicted from the hidden state at t - 1.
    target_mask = response_mask[:, 1:].bool()  # (B, T-1)
    targets = input_ids[:, 1:][target_mask]  # (M,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    n_tokens = target_mask.sum(-1)

    if plain or not _supports_fast_path(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits[:, :-1]  # (B, T-1, V)
        token_logps = torch.log_softmax(logits.float(), dim=-1)[target_mask].gather(-1, targets[:, None])
        token_logps = token_logps.squeeze(-1)
    else:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden[:, :-1][target_mask]  # (M, H): response positions only
        weight = model.get_output_embeddings().weight  # (V, H)
        pieces = []
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
                # Keep only the chunk's hidden states for backward; its logits are recomputed there.
                pieces.append(checkpoint(_token_logps, h, weight, t, use_reentrant=False))
            else:
                pieces.append(_token_logps(h, weight, t))
        token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)

    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    logps = logps.index_add(0, rows, token_logps.float())
    return logps, n_tokens


def batch_logps(model: nn.Module, batch: dict[str, Any], **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` on a collated batch (see ``dpokit.data.batch``)."""
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], **kwargs)
