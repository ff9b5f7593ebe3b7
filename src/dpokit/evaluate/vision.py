"""Scoring and evaluation with image prompts: a vision-language policy and its reference loaded with the
processor, and rows with images read, checked and tokenized exactly as training reads them
(``dpokit.data.vision``: the same image checks, the same processor call, the same pixel inputs), so the implicit
reward of an image pair here is the ``rewards/chosen`` training logged for it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dpokit.errors import DpokitError
from dpokit.models.source import ModelSource
from dpokit.models.vision import is_vision_source, load_processor, load_vision_model


def load_vision_pair(policy_source: ModelSource, ref_source: ModelSource, processor_source: ModelSource,
                     dtype: str = "float32", trust_remote_code: bool = False,
                     attn_implementation: str = "sdpa") -> tuple[nn.Module, nn.Module, Any] | None:
    """(policy, reference, processor) when ``policy_source`` is a vision-language model, else None (a text
    model: the caller loads it). The reference is the run's: its starting model loaded again (the frozen copy
    training made of it; for LoRA, whose ``final/`` is merged, the adapter-disabled policy is those same
    weights), or the model named as reference. A text reference for an image policy is refused: it could not
    read the images the policy's log-probs are conditioned on."""
    from dpokit.models.source import runnable_attention

    if not is_vision_source(policy_source, trust_remote_code):
        if is_vision_source(ref_source, trust_remote_code):
            raise DpokitError(f"{ref_source.location}: a vision-language reference for the text policy "
                              f"{policy_source.location}; give a text reference")
        return None
    if not is_vision_source(ref_source, trust_remote_code):
        raise DpokitError(f"{ref_source.location}: the reference of the vision-language policy "
                          f"{policy_source.location} must be a vision-language model too")
    processor = load_processor(processor_source, trust_remote_code)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code,
                  attn_implementation=runnable_attention(attn_implementation))
    return load_vision_model(policy_source, **kwargs), load_vision_model(ref_source, **kwargs), processor
