"""QLoRA's frozen base (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
https://arxiv.org/abs/2305.14314): every Linear weight of the decoder held in 4-bit NormalFloat (NF4), the LoRA
adapters trained in the run's dtype on top.

A weight W is cut into blocks of 64 consecutive values; each block keeps its absmax s_b and each value the
index of the nearest of the 16 NF4 levels q_k (quantiles of N(0, 1), scaled to [-1, 1]):

    W_ij ~ deq(W)_ij = q[code_ij] * s_b,

and the block scales are quantized again to int8 in groups (double quantization), so a weight of n values takes
n/2 bytes of codes, n/64 bytes of scales, and one float per group of scales plus a 16-entry table and a mean:
about 4.13 bits a value instead of 32 (fp32) or 16 (bf16). The tensor is torchao's ``NF4Tensor`` (CPU and CUDA
alike); ``F.linear`` on it computes ``x @ deq(W).T`` with deq(W) in the input's dtype, so the quantized model
*is* the plain model whose weights are deq(W), and ``dequantize`` gives exactly those weights back: ``final/``
(deq(W) + merged adapters) is the model that was trained.

Quantized: every ``nn.Linear`` of the decoder (attention and MLP projections). Kept in the run's dtype: the
token embeddings, the LM head (tied to the embeddings in many models) and the norms; they are a small part of
a large model and the log-prob head reads the LM head directly. In a vision-language model the decoder is its
language model (``dpokit.models.vision.LANGUAGE_PARTS``), where the adapters train too; the vision encoder and
the projector / connector keep the run's dtype, as the community QLoRA recipes for these models keep them
(LLaVA's own 4-bit training skips its projector): they are a small part of the weights (at most a few hundred
million values beside billions), and every image feature passes through the projector, so rounding it would
perturb everything the language model sees of an image. Quantization is deterministic, so a resumed
run re-quantizes the base it started from and checkpoints hold only the adapters.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dpokit.errors import ConfigError
from dpokit.models.vision import LANGUAGE_PARTS

INSTALL = "in a clone of dpokit: pip install -c constraints.txt -e '.[qlora]'"
"""What a user without torchao runs to get it."""

BLOCK = 64
"""Values per NF4 block (one absmax each): QLoRA's choice."""

SCALE_GROUP = 256
"""Block scales per double-quantization group at most (QLoRA's 256); a weight whose block count it does not
divide takes the largest divisor below it, so every weight with a multiple of 64 values quantizes."""


def check_quantize(cfg: Any) -> None:
    """What ``model.quantize`` needs in a config (ValueError naming the key): LoRA adapters to train, one process
    or DDP (as ``train.optimizer: adamw_8bit`` does), and the adapter reference (the quantized base with the
    adapters off). A reference model copy is refused where the models load (``quantize_policy``): only the
    command knows whether it needs one."""
    if cfg.train.optimizer == "adamw_8bit" and cfg.distributed.strategy == "fsdp":
        raise ValueError("train.optimizer: adamw_8bit is not supported with distributed.strategy: fsdp (its "
                         "checkpoints hold unsharded 8-bit state); use adamw, or ddp")
    method = cfg.model.quantize
    if method == "none":
        return
    if cfg.model.lora is None:
        raise ValueError(f"model.quantize: {method} quantizes the frozen base of a LoRA policy; set model.lora "
                         "(e.g. model.lora={r: 16})")
    if cfg.distributed.strategy == "fsdp":
        raise ValueError(f"model.quantize: {method} is not supported with distributed.strategy: fsdp; use ddp "
                         "(the 4-bit base and the adapters fit one device)")
    if cfg.reference.mode == "store":
        raise ValueError(f"model.quantize: {method} takes reference.mode: adapter (the quantized base with the "
                         "adapters off); the store keys plain weights")


class _DropKnownNoise(logging.Filter):
    """Drops the log records torchao's import produces on every machine without its optional CUDA kernels:
    "Failed to load .../_C_*.so" (torchao's logger, one per kernel library) and torch's notice for each Enum
    torchao registers with pytree. transformers imports torchao whenever it is installed, so without this
    every dpokit command would print them; NF4 weights and the 8-bit optimizer need neither."""

    def __init__(self, starts: tuple[str, ...], contains: tuple[str, ...]) -> None:
        super().__init__()
        self.starts, self.contains = starts, contains

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.starts) or any(text in message for text in self.contains))


logging.getLogger("torchao").addFilter(_DropKnownNoise(("Failed to load ",), ()))
logging.getLogger("torch.utils._pytree").addFilter(_DropKnownNoise((), ("is an Enum subclass and is now natively",)))


def torchao(key: str = "model.quantize: nf4") -> Any:
    """The torchao package (its import noise dropped above); without it, a ConfigError naming ``key`` and the
    install line."""
    try:
        import torchao as module
        import torchao.optim  # noqa: F401  (registers the optimizer-state tensors)
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key} needs torchao ({INSTALL})") from None
    return module


_NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"


def _nf4() -> Any:
    torchao()
    return sys.modules[_NF4_MODULE]


def scale_group(n_values: int) -> int | None:
    """Block scales per double-quantization group for a weight of ``n_values``, or None when the weight does
    not split into 64-value blocks (it then stays unquantized)."""
    if n_values % BLOCK:
        return None
    blocks = n_values // BLOCK
    return max(d for d in range(1, min(SCALE_GROUP, blocks) + 1) if blocks % d == 0)


def decoder_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The Linear layers whose weights NF4 holds: all of the model's, except its LM head (and any Linear that
    shares its weight with the embeddings); in a vision-language model only those of its language model (the
    vision encoder and the projector stay in the run's dtype: see the module's docstring)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    shared = {id(m.weight) for m in (head, embed) if m is not None}
    vision = getattr(getattr(model, "config", None), "vision_config", None) is not None
    for name, module in model.named_modules():
        if vision and not any(f".{part}." in f".{name}" for part in LANGUAGE_PARTS):
            continue
        if isinstance(module, nn.Linear) and module is not head and id(module.weight) not in shared:
            yield name, module


def quantize_base(model: nn.Module, method: str) -> list[str]:
    """Replace the weight of every decoder Linear of ``model`` (before LoRA wraps it) by its NF4 tensor, frozen.
    Returns the names of Linear layers left unquantized (a weight whose size is not a multiple of 64)."""
    if method == "none":
        return []
    to_nf4 = _nf4().to_nf4
    left = []
    for name, linear in list(decoder_linears(model)):
        weight = linear.weight.detach()
        group = scale_group(weight.numel())
        if group is None:
            left.append(name)
            continue
        linear.weight = nn.Parameter(to_nf4(weight.contiguous(), BLOCK, group), requires_grad=False)
    return left


def quantize_policy(policy: nn.Module, model_cfg: Any, copies_reference: bool) -> None:
    """``load_models``'s hook: the policy's base quantized per ``model.quantize`` before the adapters wrap it.
    A command that would copy the quantized base as its reference (``reference.mode: model``), or that trains
    without adapters (a reward model), is refused: QLoRA's reference is the base with the adapters off."""
    method = model_cfg.quantize
    if method == "none":
        return
    if copies_reference:
        raise ConfigError(f"model.quantize: {method} computes the reference as the quantized base with the "
                          "adapters off; set reference.mode: adapter")
    if model_cfg.lora is None:
        raise ConfigError(f"model.quantize: {method} needs a LoRA policy; this command trains without adapters")
    left = quantize_base(policy, method)
    if left:  # kept in the run's dtype: NF4 needs whole 64-value blocks
        warnings.warn(f"model.quantize: {len(left)} Linear layers kept unquantized (their weights are not a "
                      f"multiple of {BLOCK} values), e.g. {left[0]}", stacklevel=2)


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an NF4 tensor (without importing torchao: none exists before it is imported)."""
    module = sys.modules.get(_NF4_MODULE)
    return module is not None and isinstance(tensor, module.NF4Tensor)


def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The NF4 tensors of ``model`` by parameter name."""
    return {name: p for name, p in model.named_parameters() if is_nf4(p)}


def nf4_bytes(tensor: torch.Tensor) -> int:
    """Bytes an NF4 tensor holds: codes, int8 block scales, one float per scale group, the 16-level table and
    the scales' mean."""
    parts = (tensor.quantized_data, tensor.quantized_scalers, tensor.quantization_factor, tensor.nf4,
             tensor.scaler_mean)
    return sum(part.numel() * part.element_size() for part in parts)


@torch.no_grad()
def dequantize(model: nn.Module) -> int:
    """Replace every NF4 weight of ``model`` by deq(W), a plain tensor in the weight's dtype: exactly the values
    the quantized layer computed with, so LoRA adapters can be merged into it and the result saved as an
    ordinary model. Returns how many weights it replaced. A quantized model moves to the CPU first: the plain
    weights of a base that trained in 4 bits may not fit beside it on its GPU."""
    quantized = [m for m in model.modules() if isinstance(m, nn.Linear) and is_nf4(m.weight)]
    if quantized:
        model.to("cpu")
    for module in quantized:
        module.weight = nn.Parameter(module.weight.get_original_weight(), requires_grad=False)
    return len(quantized)


def round_trip(model: nn.Module, method: str) -> None:
    """Give ``model``'s decoder Linear weights the values ``method`` represents (quantize, then dequantize):
    the base a QLoRA run's adapters were trained on, as plain weights (exporting a checkpoint)."""
    if method != "none":
        quantize_base(model, method)
        dequantize(model)
