"""The model side: ``source`` (what a model is built from, the checks before loading it, the tiny model built
in code), ``loading`` (policy, reference and tokenizer from a hub id, a folder, GGUF, the embedded
model or the tiny one; LoRA), ``sharded`` (FSDP ranks reading only their shard), ``quantize`` (QLoRA's
NF4 base), ``logprobs`` (the one log-prob function), ``attention`` (packed-layout masks), ``generate`` (the
batched KV-cache sampler) and ``hardware`` (what ``precision: auto`` and ``attn_implementation: auto`` pick).
"""
