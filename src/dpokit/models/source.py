"""What a model is built from, checked before any weight is read: ``ModelSource``, the dtype names, the refusals
(code shipped inside a checkpoint, a reward model given as a policy), the attention kernel that runs here, and
the tiny model built in code.

Both ways of loading build on these: the whole model (``dpokit.models.loading``) and the FSDP skeleton filled
shard by shard (``dpokit.models.sharded``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpokit.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """What to load: ``kind`` is ``tiny``, ``folder`` (a local Hugging Face folder) or ``hub``."""

    kind: str
    location: str
    revision: str | None = None


def check_remote_code(source: ModelSource, trust_remote_code: bool) -> None:
    """A local model whose architecture exists only as code inside the checkpoint is refused unless trusted:
    loading it would execute that code."""
    if trust_remote_code or source.kind != "folder":
        return
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable config itself
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING:
        raise ModelError(f"{source.location}: this model needs its own code to load; set "
                         "model.trust_remote_code: true only if you trust it")


def refuse_reward_model(source: ModelSource) -> None:
    """A reward model's folder (``dpokit rm``'s final/) is not a policy: transformers would load its backbone as
    a causal LM with whatever head it finds (a tied or a random one) and sample nonsense without a word."""
    if source.kind != "folder":
        return
    try:
        config = json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable config itself
    architecture = str((config.get("architectures") or [""])[0])
    if architecture.endswith("ForSequenceClassification"):
        raise ModelError(f"{source.location}: a reward model ({architecture}), not a causal LM; give it as a "
                         "reward (--reward), not as a policy")


def runnable_attention(attn_implementation: str) -> str:
    """The attention kernel a model is loaded with here."""
    if attn_implementation == "auto":  # unresolved (no run to resolve it for): PyTorch's fused kernel
        return "sdpa"
    if attn_implementation == "flex_attention" and not torch.cuda.is_available():
        # A run trained on a GPU, scored or sampled on a machine without one: FlexAttention needs CUDA to run
        # fast (and to train); SDPA gives the same numbers within float tolerance.
        return "sdpa"
    return attn_implementation


# --------------------------------------------------------------------------------------------------- tiny model

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A good answer is short, kind and correct.
Question: what is the capital of France? Answer: Paris is the capital of France.
I loved this movie, the acting was wonderful and the story was moving. I hated this film, it was dull.
Please write a haiku about the sea. Waves fold into foam; the moon pulls the tide home; gulls cry at the shore.
Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, knead, let it rise, then bake.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation: ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # $ % & * + = < >
user assistant system response prompt chosen rejected helpful harmless honest preference reward model
"""


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TINY_CORPUS.splitlines() * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> Any:
    """A small byte-level BPE tokenizer (512 tokens, ChatML template) trained in code: no download, and every
    string round-trips because the alphabet is bytes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(vocab_size: int, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """A 2-layer Llama with random weights, the same architecture family as SmolLM2, for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, attention_dropout=dropout, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return seeded_model(LlamaForCausalLM, config, seed)


def seeded_model(cls: Any, config: Any, seed: int) -> nn.Module:
    """``cls(config)`` with weights drawn from ``seed``, leaving the global RNG as it was (the caller's stream,
    e.g. training's, is not consumed)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return cls(config)
    finally:
        torch.random.set_rng_state(generator_state)
