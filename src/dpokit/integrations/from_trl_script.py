"""The keys a TRL DPO config file holds beside ``DPOConfig``'s: TRL's ``TrlParser`` reads ``ScriptArguments``
(the dataset), ``ModelConfig`` (the model, LoRA, quantization) and ``DatasetMixtureConfig`` from the same file,
and alignment-handbook recipes add ``dataset_mixer`` / ``dataset_splits``. ``dpokit.integrations.from_trl`` calls
``model_section`` and ``data_section``; each fills dpokit's ``model`` or ``data`` section of the translation or
names the key with the reason, and the mapping tables here are docs/from-trl.md's.
"""

from __future__ import annotations

from typing import Any

MODEL_MAPPED: dict[str, str] = {
    "model_name_or_path": "model.name_or_path", "model_revision": "model.revision",
    "dtype": "model.dtype", "torch_dtype": "model.dtype", "attn_implementation": "model.attn_implementation",
    "use_peft": "model.lora", "lora_r": "model.lora.r", "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout", "lora_target_modules": "model.lora.target_modules",
    "lora_task_type": "(CAUSAL_LM: dpokit's)", "load_in_4bit": "model.quantize: nf4 (when this dpokit has it)",
    "bnb_4bit_quant_type": "model.quantize", "dataset_name": "data.train (data.eval)",
    "dataset_config": "data.train as owner/name:config", "dataset_train_split": "data.train_split",
    "dataset_test_split": "data.eval_split", "dataset_streaming": "data.streaming", "datasets": "data.train",
    "streaming": "data.streaming", "dataset_mixer": "data.train (data.eval)",
    "dataset_splits": "data.train_split, data.eval_split", "dataset_num_proc": "data.num_proc",
    "preprocessing_num_workers": "data.num_proc",
}
"""ModelConfig / ScriptArguments / DatasetMixtureConfig / alignment-handbook key -> where it goes in dpokit."""

MODEL_REASONS: dict[str, str] = {
    "load_in_8bit": "8-bit loading is not supported by dpokit (the base trains in model.dtype)",
    "lora_modules_to_save": "dpokit's LoRA trains the adapters only; modules trained in full beside them are "
                            "not supported",
    "lora_target_parameters": "LoRA on parameters (not modules) is not supported; use model.lora.target_modules",
    "use_rslora": "rank-stabilized scaling is not supported: dpokit's LoRA scales by alpha / r",
    "use_dora": "DoRA is not supported: dpokit trains plain LoRA",
    "use_bnb_nested_quant": "nested (double) quantization is not supported",
    "bnb_4bit_quant_storage": "the quantized storage dtype is not configurable",
    "ignore_bias_buffers": "a DDP workaround of TRL's script; dpokit's DDP needs none",
    "test_split_size": "dpokit does not split a held-out set off the training data; give data.eval",
}
"""Why a ModelConfig / ScriptArguments key has no dpokit counterpart."""

SCRIPT_DEFAULTS: dict[str, Any] = {
    "model_revision": "main", "dtype": "float32", "use_peft": False, "lora_r": 16, "lora_alpha": 32,
    "lora_dropout": 0.05, "lora_task_type": "CAUSAL_LM", "bnb_4bit_quant_type": "nf4",
    "dataset_train_split": "train", "dataset_test_split": "test",
}
"""TRL 1.x's defaults of the ModelConfig / ScriptArguments keys that change the result."""

LORA_DEFAULT_TARGETS = ["q_proj", "v_proj"]
"""peft's targets when TRL passes none (``lora_target_modules`` unset): per architecture, q_proj and v_proj
for llama, mistral, mixtral, qwen2/3 and gemma."""

ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flex_attention": "flex_attention"}
"""TRL/transformers attention kernels dpokit has by the same name; any other (flash_attention_2, 3, a hub
kernel) becomes ``auto``: every kernel gives the same numbers within float tolerance, and ``auto`` picks the
fastest dpokit has (FlexAttention or SDPA on CUDA)."""
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _value(value: Any) -> Any:
    return getattr(value, "value", value)


def model_section(given: dict[str, Any], out: Any) -> None:
    """``model_name_or_path``, ``model_revision``, ``dtype``, ``attn_implementation`` and LoRA; then
    ``model_init_kwargs``, which override them as in TRL's script."""
    if given.get("model_name_or_path"):
        out.put("model.name_or_path", str(given["model_name_or_path"]))
    if given.get("model_revision") not in (None, "main"):
        out.put("model.revision", str(given["model_revision"]))
    for key in ("torch_dtype", "dtype"):  # torch_dtype: older TRL's and alignment-handbook's name
        if given.get(key) is not None:
            put_dtype(key, given[key], out)
    if given.get("attn_implementation") is not None:
        put_attention("attn_implementation", given["attn_implementation"], out)
    if given.get("trust_remote_code"):
        out.put("model.trust_remote_code", True)
    _lora(given, out)
    _model_kwargs(given.get("model_init_kwargs"), out)


def put_dtype(key: str, value: Any, out: Any) -> None:
    value = str(_value(value)).removeprefix("torch.")
    if value in DTYPES:
        out.put("model.dtype", DTYPES[value])
    elif value == "float16":
        out.unmapped[key] = ("float16 weights are not supported (no loss scaling); model.dtype: bfloat16 has "
                             "float32's range, set it for half-size weights")
    elif value == "auto":
        out.unmapped[key] = ("'auto' (the checkpoint's stored dtype) is not supported: model.dtype is float32 "
                             "unless set; set model.dtype: bfloat16 for a checkpoint stored in bfloat16")
    else:
        out.unmapped[key] = f"'{value}' is not a dpokit dtype (float32, bfloat16)"


def put_attention(key: str, value: Any, out: Any) -> None:
    if value in ATTENTION:
        out.put("model.attn_implementation", ATTENTION[value])
        return
    out.put("model.attn_implementation", "auto")
    out.notes.append(f"{key} {value}: dpokit has no {value}; model.attn_implementation: auto (FlexAttention or "
                     "SDPA on CUDA), which gives the same numbers within float tolerance")


def _lora(given: dict[str, Any], out: Any) -> None:
    from dpokit.config import ModelConfig

    values = {**SCRIPT_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    if not values["use_peft"]:
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit", "load_in_8bit"):
            if given.get(key) not in (None, False, SCRIPT_DEFAULTS.get(key)):
                out.unmapped[key] = "TRL reads it only with use_peft: true (full fine-tuning here, as in TRL)"
        return
    targets = given.get("lora_target_modules")
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]  # TRL's ModelConfig turns a one-element list into the name (all-linear)
    if not targets:
        targets = LORA_DEFAULT_TARGETS
        out.notes.append("lora_target_modules unset: TRL lets peft choose per architecture; model.lora."
                         "target_modules: [q_proj, v_proj], peft's choice for llama, mistral, qwen2/3 and gemma "
                         "(set it for another architecture)")
    out.put("model.lora", {"r": int(values["lora_r"]), "alpha": float(values["lora_alpha"]),
                           "dropout": float(values["lora_dropout"]), "target_modules": targets})
    if values["lora_task_type"] != "CAUSAL_LM":
        out.unmapped["lora_task_type"] = "dpokit trains causal language models (CAUSAL_LM) only"
    for key, reason in MODEL_REASONS.items():
        if key != "ignore_bias_buffers" and given.get(key) not in (None, False, [], ""):
            out.unmapped[key] = reason
    if given.get("load_in_4bit"):
        quant = _value(values["bnb_4bit_quant_type"])
        if "quantize" not in ModelConfig.model_fields:
            out.unmapped["load_in_4bit"] = ("4-bit loading is not supported by this dpokit: the base trains in "
                                            "model.dtype (LoRA over the unquantized weights)")
        elif quant == "nf4":
            out.put("model.quantize", "nf4")
        else:
            out.unmapped["bnb_4bit_quant_type"] = f"'{quant}' 4-bit loading is not supported (model.quantize: nf4)"


def _model_kwargs(kwargs: Any, out: Any) -> None:
    """TRL's ``model_init_kwargs``, passed to ``from_pretrained`` over ModelConfig's values."""
    if not kwargs:
        return
    if isinstance(kwargs, str):  # the command line's form, a JSON object
        import json

        try:
            kwargs = json.loads(kwargs)
        except ValueError:
            pass
    if not isinstance(kwargs, dict):
        out.unmapped["model_init_kwargs"] = "expected a mapping"
        return
    left = []
    for key, value in kwargs.items():
        if key in ("torch_dtype", "dtype") and value is not None:
            put_dtype(f"model_init_kwargs.{key}", value, out)
        elif key == "attn_implementation" and value is not None:
            put_attention("model_init_kwargs.attn_implementation", value, out)
        elif key in ("trust_remote_code", "revision"):
            out.put(f"model.{key}", value)
        else:
            left.append(f"{key}={value}")
    if left:
        out.unmapped["model_init_kwargs"] = f"no dpokit counterpart for {', '.join(left)}"


def data_section(given: dict[str, Any], out: Any) -> None:
    """The dataset: ScriptArguments' ``dataset_name`` / ``dataset_config`` / splits, else a one-dataset
    ``datasets`` mixture, else alignment-handbook's ``dataset_mixer`` / ``dataset_splits``. TRL's script reads
    the test split only when ``eval_strategy`` is not ``no``; alignment-handbook always loads it."""
    workers = given.get("dataset_num_proc") or given.get("preprocessing_num_workers")
    if isinstance(workers, int) and workers >= 1:
        out.put("data.num_proc", workers)  # tokenizing processes; the result is the same for any number
    if given.get("dataset_streaming") or given.get("streaming"):
        out.put("data.streaming", True)
    evaluates = _value(given.get("eval_strategy", given.get("evaluation_strategy"))) not in (None, "no")
    if given.get("datasets"):
        _mixture(given["datasets"], evaluates, out)
        if given.get("dataset_name"):
            out.unmapped["dataset_name"] = "TRL reads `datasets` when both are given, and ignores dataset_name"
    elif given.get("dataset_name"):
        source = _hub_id(given["dataset_name"], given.get("dataset_config"))
        out.put("data.train", source)
        split = given.get("dataset_train_split") or "train"
        if split != "train":
            out.put("data.train_split", str(split))
        if evaluates:
            out.put("data.eval", source)
            out.put("data.eval_split", str(given.get("dataset_test_split") or "test"))
    elif given.get("dataset_mixer"):
        _handbook_mixer(given["dataset_mixer"], given.get("dataset_splits") or ["train", "test"], out)


def _hub_id(name: Any, config: Any = None) -> str:
    return f"{name}:{config}" if config else str(name)


def _mixture(datasets: Any, evaluates: bool, out: Any) -> None:
    """TRL's ``DatasetMixtureConfig.datasets``: one full dataset maps; a mixture of several, a fraction or local
    data_files is named."""
    if not isinstance(datasets, list) or len(datasets) != 1 or not isinstance(datasets[0], dict):
        out.unmapped["datasets"] = ("a mixture of several datasets is not supported: dpokit trains on one "
                                    "data.train; combine them into one file")
        return
    entry = datasets[0]
    if entry.get("data_files") or entry.get("data_dir") or float(entry.get("fraction") or 1.0) != 1.0:
        out.unmapped["datasets"] = "data_files, data_dir and fraction are not supported: give the data as data.train"
        return
    out.put("data.train", _hub_id(entry["path"], entry.get("name")))
    if entry.get("split", "train") != "train":
        out.put("data.train_split", str(entry["split"]))
    if evaluates:
        out.unmapped["eval_strategy"] = "a DatasetMixtureConfig has no test split in TRL's script; set data.eval"


def _handbook_mixer(mixer: Any, splits: Any, out: Any) -> None:
    """alignment-handbook's ``dataset_mixer: {id: fraction}`` and ``dataset_splits``: a split whose name holds
    'train' is the training split, one holding 'test' the held-out one (its rule)."""
    if not isinstance(mixer, dict) or len(mixer) != 1 or float(next(iter(mixer.values()))) != 1.0:
        out.unmapped["dataset_mixer"] = ("a mixture of several datasets or a fraction of one is not supported: "
                                         "dpokit trains on one whole data.train; combine them into one file")
        return
    name = next(iter(mixer))
    splits = [splits] if isinstance(splits, str) else list(splits)
    train = [s for s in splits if "train" in s]
    test = [s for s in splits if "test" in s]
    out.put("data.train", str(name))
    if train and train[0] != "train":
        out.put("data.train_split", train[0])
    if test:
        out.put("data.eval", str(name))
        out.put("data.eval_split", test[0])
    if len(train) > 1 or len(test) > 1:
        out.unmapped["dataset_splits"] = "several training or test splits are not supported: the first is read"
