"""The Python API a TRL user writes: objects in memory instead of paths.

    run_dir = dpokit.train(config, model=model, tokenizer=tokenizer, train_data=dataset, eval_data=held_out)

- ``config``: a YAML path, a dict or a :class:`~dpokit.config.Config` (``**overrides`` as ``train__lr=1e-6``);
- ``model``: a transformers ``PreTrainedModel`` (``model.lora`` in the config adds adapters as usual) or a peft
  ``PeftModel``, whose adapters are the LoRA trained (its adapter config is recorded as ``model.lora``). The
  object is trained in place, as TRL trains it; ``RUN_DIR/final`` holds the result as for any run;
- ``tokenizer``: required with a model object, unless the object's own ``name_or_path`` names a tokenizer that
  loads (what ``AutoTokenizer.from_pretrained(model.config._name_or_path)`` would find);
- ``processor``: with a vision-language model (a config with a ``vision_config``), its processor (image
  processor, tokenizer, chat template), as ``AutoProcessor`` loads it; required unless the object's own
  ``name_or_path`` names one. Given as ``tokenizer=``, a processor is taken as the processor, as TRL's
  ``processing_class=`` takes either. ``final/`` holds it beside the weights;
- ``train_data`` / ``eval_data``: a ``datasets.Dataset``, a list of dicts or a pandas ``DataFrame``, read by
  the same pipeline and cache as a file (``dpokit.data.memory``): the same validation, counts and one-line
  errors, located ``train_data[17]``.

The run's ``config.yaml`` records what came in memory: ``data.train: "<in-memory:train_data:sha256:HEX>"`` (the
rows' content hash) and ``model.name_or_path: "<in-memory:NAME>"``. Resuming such a run needs the same objects
again: other rows are refused as changed data, and rows or a model not given are said in one line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dpokit.methods  # noqa: F401  (every kind of training registers itself)
from dpokit.config import Config, LoraConfig, load_config, read_yaml_tree
from dpokit.data import memory
from dpokit.errors import ConfigError, DpokitError
from dpokit.models.loading import (
    IN_MEMORY,
    Models,
    ModelSource,
    apply_lora,
    disable_dropout,
    freeze,
    load_model,
    load_tokenizer,
    resolve,
)
from dpokit.models.source import runnable_attention
from dpokit.models.vision import freeze_vision, load_vision_model
from dpokit.terminal import note as _note
from dpokit.training.kinds import choose_kind
from dpokit.training.loop import train_kind

ConfigSource = str | Path | dict[str, Any] | Config | None
DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16"}


def train(config: ConfigSource = None, overrides: list[str] | None = None, *, model: Any = None,
          tokenizer: Any = None, processor: Any = None, train_data: Any = None, eval_data: Any = None,
          resume: bool = False, force: bool = False, task: str = "dpo", **kwargs: Any) -> Path:
    """Train and return the run directory.

    ``config`` is a YAML path, a dict or a Config; ``overrides`` are CLI-style ``key=value`` strings and
    ``kwargs`` dotted keys written with ``__`` (``train__max_steps=3``). ``resume`` continues from the newest
    complete checkpoint in ``run_dir``; ``force`` allows resuming with changed settings. ``task`` is the
    command: ``dpo`` (the configured preference loss; online DPO on its own samples when ``online.reward`` or
    ``online.judge_url`` is set, ``dpokit.methods.online``; KTO with an unpaired loss), ``sft`` (negative
    log-likelihood of the chosen responses), ``rm`` (a Bradley-Terry reward model,
    ``dpokit.methods.reward_model``; ``final/`` is a ``*ForSequenceClassification``) or ``ppo``
    (``dpokit.methods.ppo``); ``dpokit.training.kinds.choose_kind`` picks the kind. Launched by torchrun, every
    process calls this (``dpokit.training.distributed``); a failure on any rank ends every rank with one line
    naming it.

    Any of the model, tokenizer (a vision-language model's processor) and data may be given as objects (see
    the module docstring); those not given come from the config as usual."""
    for name, given in (("tokenizer", tokenizer), ("processor", processor)):
        if given is not None and model is None:
            raise ConfigError(f"{name}: given without model=; a model loaded from model.name_or_path uses its own "
                              f"{name} (give both objects, or neither)")
    peft = model is not None and _is_peft(model)
    if model is not None:
        cfg = _with_settings(config, overrides, kwargs, _model_settings(model, peft))
        kind = choose_kind(cfg, task)
        if not kind.takes_model_object:
            raise ConfigError(f"model: {kind.title} loads its model from model.name_or_path; a model object "
                              "trains with dpokit train (offline DPO and its variants) and dpokit sft")
        if _is_vision_model(model):
            processor = _processor(model, tokenizer, processor)
            tokenizer = processor.tokenizer
        else:
            tokenizer = _tokenizer(model, _text_only(tokenizer, processor))
    else:
        cfg = load_config(config, overrides, **kwargs)
    if resume or cfg.train.resume == "auto":
        _check_given_again(cfg, model, train_data)
    if model is None and train_data is None and eval_data is None:
        return train_kind(cfg, command=task, resume=resume, force=force)
    with memory.given({"train_data": train_data, "eval_data": eval_data}) as markers:
        for name, key in (("train_data", "train"), ("eval_data", "eval")):
            if name in markers:
                before = getattr(cfg.data, key)
                if before and not memory.is_memory(before):
                    _note(f"data.{key}: the rows given as {name} replace {before}")
                setattr(cfg.data, key, markers[name])
        load = ObjectLoader(model, tokenizer, peft, processor) if model is not None else None
        return train_kind(cfg, command=task, resume=resume, force=force, load=load)


def sft(config: ConfigSource = None, overrides: list[str] | None = None, **kwargs: Any) -> Path:
    """Supervised fine-tuning on the chosen responses of a preference file (the paper's pi_SFT stage), with the
    same loop, data path and run directory as DPO: :func:`train` with ``task="sft"``, objects accepted as
    there."""
    return train(config, overrides, task="sft", **kwargs)


def rm(config: ConfigSource = None, overrides: list[str] | None = None, **kwargs: Any) -> Path:
    """A Bradley-Terry reward model on the same preference data, loop and run directory (``dpokit rm``);
    ``RUN_DIR/final`` loads with ``AutoModelForSequenceClassification`` and serves as a reward
    (``dpokit.rewards.get_reward(RUN_DIR)``). :func:`train` with ``task="rm"``; in-memory data accepted (the
    model is loaded from the config: it becomes a reward model)."""
    return train(config, overrides, task="rm", **kwargs)


# --------------------------------------------------------------------------------------------------- the model

def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _is_vision_model(model: Any) -> bool:
    """A vision-language model: its config has a ``vision_config`` (as ``dpokit.models.vision`` tells a loaded
    one apart)."""
    base = model.get_base_model() if _is_peft(model) else model
    return getattr(base.config, "vision_config", None) is not None


def _is_processor(obj: Any) -> bool:
    return hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def _model_settings(model: Any, peft: bool) -> dict[str, Any]:
    """The config values a model object decides: its name (marked in-memory), its dtype and, for a
    PeftModel, its adapters (``model.lora``)."""
    from torch import nn

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"model: expected a transformers PreTrainedModel or a peft PeftModel, got "
                          f"{type(model).__module__}.{type(model).__name__}")
    dtype = str(next(model.parameters()).dtype)
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"model: its weights are {dtype}; dpokit trains float32 or bfloat16 weights "
                          "(model.to(torch.float32) or torch.bfloat16)")
    name = model_name(model)
    settings: dict[str, Any] = {"model.name_or_path": f"{IN_MEMORY}:{name}>" if name else f"{IN_MEMORY}>",
                                "model.dtype": DTYPE_NAMES[dtype]}
    if peft and _is_vision_model(model):
        # Its adapters may sit on the vision encoder, where model.lora never puts them (language model only):
        # the recorded model.lora would not describe what trained.
        raise ConfigError("model: a PeftModel of a vision-language model is not supported; give the plain model "
                          "with model.lora in the config (dpokit adapts the language model's layers only)")
    if peft:
        settings["model.lora"] = _lora_settings(model)
    return settings


def model_name(model: Any) -> str:
    """The object's ``name_or_path`` (a PeftModel's base model's), else its config's ``_name_or_path``."""
    base = model.get_base_model() if _is_peft(model) else model
    return str(getattr(base, "name_or_path", "") or getattr(base.config, "_name_or_path", "") or "")


def _lora_settings(model: Any) -> dict[str, Any]:
    """``model.lora`` as the PeftModel's one active adapter is configured."""
    adapters = model.peft_config
    active = getattr(model, "active_adapter", None)
    if len(adapters) != 1 or active not in adapters:
        raise ConfigError(f"model: a PeftModel with {len(adapters)} adapters ({', '.join(adapters)}); dpokit "
                          "trains one (delete the others, or merge them into the base first)")
    adapter = adapters[active]
    if type(adapter).__name__ != "LoraConfig":
        raise ConfigError(f"model: a PeftModel with a {type(adapter).__name__} adapter; dpokit trains LoRA "
                          "adapters")
    targets = adapter.target_modules
    targets = sorted(targets) if isinstance(targets, (set, frozenset, list, tuple)) else targets
    return LoraConfig(r=adapter.r, alpha=adapter.lora_alpha, dropout=adapter.lora_dropout,
                      target_modules=targets).model_dump()


def _with_settings(config: ConfigSource, overrides: list[str] | None, kwargs: dict[str, Any],
                   settings: dict[str, Any]) -> Config:
    """The config with the model object's settings in. A value the config sets itself and the object replaces
    is said in one line (the config is read without them first, when it validates so)."""
    try:
        own = load_config(config, overrides, **kwargs).model
    except DpokitError:  # e.g. reference.mode: adapter, valid only with a PeftModel's adapters in
        own = None
    for key, value in settings.items():
        field = key.split(".")[1]
        if own is not None and field in own.model_fields_set:
            before = getattr(own, field)
            before = before.model_dump() if hasattr(before, "model_dump") else before
            if before is not None and before != value:
                _note(f"{key}: {value} (the model object's), not the config's {before}")
    given = {key.replace(".", "__"): value for key, value in settings.items()}
    return load_config(config, overrides, **kwargs, **given)


def _tokenizer(model: Any, tokenizer: Any) -> Any:
    """The tokenizer given, else the one the model's own name loads; checked against the embedding size."""
    if tokenizer is None:
        name = model_name(model)
        if not name:
            raise ConfigError("tokenizer: required with a model object that has no name_or_path: "
                              "dpokit.train(config, model=model, tokenizer=tokenizer, ...)")
        try:
            tokenizer = load_tokenizer(resolve(name, key="model"))
        except DpokitError as exc:
            raise ConfigError(f"tokenizer: not given, and the model's name_or_path '{name}' gives none "
                              f"({exc}); pass tokenizer=...") from None
    elif getattr(tokenizer, "pad_token_id", 0) is None:
        # Padding positions are masked out everywhere, so any id serves; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    _check_fits(model, tokenizer, "tokenizer")
    return tokenizer


def _check_fits(model: Any, tokenizer: Any, key: str) -> None:
    """Every token id the tokenizer makes must have an embedding row (another model's tokenizer would index
    past the table, or train on the wrong rows)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        whose = "its tokenizer has " if key == "processor" else ""
        raise ConfigError(f"{key}: {whose}{len(tokenizer)} tokens, but the model's embedding has {rows} rows; "
                          f"give the model's own {key}")


def _text_only(tokenizer: Any, processor: Any) -> Any:
    """A text model's tokenizer; a processor, which only a vision-language model takes, is refused."""
    if processor is not None or _is_processor(tokenizer):
        key = "processor" if processor is not None else "tokenizer"
        raise ConfigError(f"{key}: a processor, given with a text model (its config has no vision_config); give "
                          "its tokenizer: dpokit.train(config, model=model, tokenizer=tokenizer, ...)")
    return tokenizer


def _processor(model: Any, tokenizer: Any, processor: Any) -> Any:
    """A vision-language model's processor: ``processor=``, or a processor given as ``tokenizer=`` (TRL's
    ``processing_class``), else the one the model's own name loads; checked against the model."""
    if _is_processor(tokenizer):
        if processor is not None and processor is not tokenizer:
            raise ConfigError("tokenizer: a processor, beside another one as processor=; give one of them")
        tokenizer, processor = None, tokenizer
    if processor is None:
        if tokenizer is not None:
            raise ConfigError("tokenizer: a vision-language model needs its processor (image processor, "
                              "tokenizer, chat template), not a tokenizer alone: dpokit.train(config, model=model, "
                              "processor=processor, ...)")
        processor = _processor_by_name(model)
    elif tokenizer is not None and tokenizer is not processor.tokenizer:
        raise ConfigError("tokenizer: given beside processor= and not the processor's own tokenizer; give the "
                          "processor alone")
    if not _is_processor(processor):
        raise ConfigError(f"processor: expected a transformers processor with a tokenizer and an image processor, "
                          f"got {type(processor).__module__}.{type(processor).__name__}")
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token  # padding is masked out; any id serves
    _check_fits(model, processor.tokenizer, "processor")
    ids = (getattr(processor, "image_token_id", None), getattr(model.config, "image_token_id", None))
    if None not in ids and ids[0] != ids[1]:  # the model would find no image positions for its features
        raise ConfigError(f"processor: its image token is id {ids[0]}, but the model's config.image_token_id is "
                          f"{ids[1]}; give the model's own processor")
    return processor


def _processor_by_name(model: Any) -> Any:
    name = model_name(model)
    if not name:
        raise ConfigError("processor: required with a vision-language model object that has no name_or_path: "
                          "dpokit.train(config, model=model, processor=processor, ...)")
    from dpokit.models.vision import load_processor

    try:
        return load_processor(resolve(name, key="model"))
    except DpokitError as exc:
        raise ConfigError(f"processor: not given, and the model's name_or_path '{name}' gives none ({exc}); "
                          "pass processor=...") from None


@dataclass
class ObjectLoader:
    """``KindSpec.load`` for a model object: as ``dpokit.models.loading.load_models`` builds the models from a
    loaded policy. The reference, when one is held, is a frozen copy of the object's starting weights (a
    PeftModel's merged), or ``model.ref_name_or_path`` loaded. A vision-language model's (``processor`` given)
    are built as ``load_models`` builds one loaded by name: dropout off, ``model.freeze_vision``, LoRA on the
    language model only, the processor held for the data and ``final/``."""

    model: Any
    tokenizer: Any
    peft: bool
    processor: Any = None

    @property
    def vision(self) -> bool:
        """Read by ``dpokit.training.vision.is_vision`` before anything loads: the name an object's run records
        (``<in-memory:...>``) says nothing of the model."""
        return self.processor is not None

    def __call__(self, cfg: Config, reference: str) -> Models:
        model, peft = self.model, self.peft
        base = model.get_base_model() if peft else model
        base.config._attn_implementation = cfg.model.attn_implementation  # resolved for this run by now
        if cfg.model.disable_dropout:
            disable_dropout(model)
        if self.vision and cfg.model.freeze_vision:
            freeze_vision(model)
        model.train()
        source = ModelSource("memory", cfg.model.name_or_path)
        ref_source, frozen = source, None
        if cfg.model.ref_name_or_path is not None:
            ref_source = resolve(cfg.model.ref_name_or_path, cfg.model.ref_gguf_file, cfg.model.revision,
                                 key="model.ref_name_or_path")
        if reference == "always" or (reference == "if_different" and ref_source != source):
            frozen = self._reference(cfg, source, ref_source)
        if cfg.model.quantize != "none":  # QLoRA on the object's own weights, as load_models does for a file
            if peft:
                raise ConfigError(f"model.quantize: {cfg.model.quantize} quantizes the base before the adapters "
                                  "wrap it; give the plain model with model.lora instead of a PeftModel")
            from dpokit.models.quantize import quantize_policy

            quantize_policy(model, cfg.model, copies_reference=frozen is not None)
        policy = apply_lora(model, cfg.model.lora) if cfg.model.lora is not None and not peft else model
        return Models(policy, frozen, self.tokenizer, source, ref_source, self.processor)

    def _reference(self, cfg: Config, source: ModelSource, ref_source: ModelSource) -> Any:
        if ref_source == source:
            frozen = copy.deepcopy(self.model)
            frozen = frozen.merge_and_unload() if self.peft else frozen
        elif self.vision:
            frozen = load_vision_model(ref_source, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                                       attn_implementation=runnable_attention(cfg.model.attn_implementation))
        else:
            frozen = load_model(ref_source, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                                attn_implementation=cfg.model.attn_implementation, vocab_size=len(self.tokenizer))
        return freeze(frozen)


# -------------------------------------------------------------------------------------------------- resuming

def _check_given_again(cfg: Config, model: Any, train_data: Any) -> None:
    """A run trained from objects in memory resumes only with objects again: one line when they are missing
    (other objects than the run's are refused by the resume check, as changed settings or data)."""
    saved_path = Path(cfg.run_dir or "") / "config.yaml"
    if not cfg.run_dir or not saved_path.is_file():
        return
    saved = read_yaml_tree(saved_path)
    train = (saved.get("data") or {}).get("train") or ""
    name = (saved.get("model") or {}).get("name_or_path") or ""
    if train_data is None and memory.is_memory(train) and cfg.data.train != train:
        raise ConfigError(f"data.train: the run in {cfg.run_dir} trained on rows given in memory ({train}); "
                          "resume it with the same rows: dpokit.train(config, train_data=rows, resume=True)")
    if model is None and name.startswith(IN_MEMORY):
        raise ConfigError(f"model.name_or_path: the run in {cfg.run_dir} trained a model object ({name}); resume "
                          "it with the same model: dpokit.train(config, model=model, tokenizer=tokenizer, "
                          "resume=True) (processor=processor for a vision-language model)")

