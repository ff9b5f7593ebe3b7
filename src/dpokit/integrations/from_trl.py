"""``dpokit config from-trl FILE``: a TRL ``DPOConfig`` (YAML or JSON of its fields, as ``HfArgumentParser``
reads them or ``dataclasses.asdict`` writes them) translated into a dpokit config.

Every key is either mapped (``MAPPED``: TRL key -> dpokit key, the value converted) or named with the reason it
is not (``Unmapped``). Settings that change the result and that the file leaves out take TRL's defaults
(``TRL_DEFAULTS``, read from the installed TRL when there is one), so the dpokit run trains what the TRL run
would have; docs/from-trl.md is the table.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import ConfigError
from dpokit.integrations.from_trl_loss import loss_section
from dpokit.integrations.from_trl_script import MODEL_MAPPED, MODEL_REASONS, data_section, model_section

TRL_DEFAULTS: dict[str, Any] = {
    "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "learning_rate": 1e-6,
    "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_train_epochs": 3.0, "max_steps": -1,
    "max_length": 1024, "lr_scheduler_type": "linear", "warmup_steps": 0,
    "warmup_ratio": 0.0, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "max_grad_norm": 1.0,
    "seed": 42, "optim": "adamw_torch", "disable_dropout": True, "per_device_eval_batch_size": 8,
    "f_alpha_divergence_coef": 0.5, "ref_model_sync_steps": 512, "ref_model_mixup_alpha": 0.6,
}
"""TRL's (and transformers' ``TrainingArguments``') defaults of the settings that change a run's result, where
they differ from dpokit's or must be known to convert another key (TRL 1.x; the installed TRL's own defaults
take precedence, ``trl_defaults``). TRL 1.x has no ``max_prompt_length``: ``_prompt_limit`` chooses dpokit's."""

FROM_INSTALLED_TRL = {"max_prompt_length"}
"""Settings older TRL has and TRL 1.x does not: their default is read from the installed TRL when it has them
(``trl_defaults``), and otherwise chosen (``_prompt_limit``)."""

MAPPED: dict[str, str] = {
    "beta": "loss.beta", "loss_type": "loss.name (loss.weights with loss_weights)",
    "loss_weights": "loss.weights", "label_smoothing": "loss.label_smoothing (sigmoid: loss.name cdpo)",
    "rpo_alpha": "loss.name rpo, loss.alpha", "reference_free": "loss.reference_free",
    "discopop_tau": "loss.discopop_tau", "use_weighting": "loss.use_weighting", "ld_alpha": "loss.ld_alpha",
    "f_divergence_type": "loss.name f_dpo, loss.f_divergence",
    "f_alpha_divergence_coef": "loss.f_alpha_divergence_coef",
    "learning_rate": "train.lr", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps", "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio", "lr_scheduler_type": "train.scheduler",
    "weight_decay": "train.weight_decay", "adam_beta1": "train.adam_betas[0]", "adam_beta2": "train.adam_betas[1]",
    "max_grad_norm": "train.max_grad_norm", "optim": "train.optimizer", "seed": "train.seed",
    "bf16": "train.precision", "fp16": "train.precision", "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "padding_free": "train.layout", "logging_steps": "train.log_every", "save_steps": "train.save_every",
    "save_total_limit": "train.keep_checkpoints", "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length", "truncation_mode": "(dpokit's truncation: keep_end)",
    "precompute_ref_log_probs": "reference.mode store", "precompute_ref_batch_size": "reference.batch_size",
    "disable_dropout": "model.disable_dropout", "trust_remote_code": "model.trust_remote_code",
    "model_init_kwargs": "model.dtype, attn_implementation, "
    "trust_remote_code, revision", **MODEL_MAPPED, "eval_steps": "eval.every", "per_device_eval_batch_size": "eval.batch_size",
    "output_dir": "run_dir", "use_logits_to_keep": "(always: dpokit computes response logits only)",
    "report_to": "log.report_to", "run_name": "log.run_name", "sync_ref_model": "reference.sync",
    "ref_model_sync_steps": "reference.sync.every", "ref_model_mixup_alpha": "reference.sync.alpha",
}
"""TRL key (``DPOConfig``'s, and those ``TrlParser`` reads from the same file: ``from_trl_script``) -> where it
goes in dpokit (the table in docs/from-trl.md)."""

REASONS: dict[str, str] = {
    "max_completion_length": "dpokit has no separate completion limit: prompt + response fit data.max_length, the "
                             "prompt cut first (its last data.max_prompt_length tokens kept)",
    "generate_during_eval": "use `dpokit eval RUN_DIR` (samples, reward, KL, win rate) after training",
    "fp16": "dpokit trains in fp32 or bf16 (train.precision); fp16 needs loss scaling it does not do",
    "tools": "tool calling in chat templates is not supported",
    "model_adapter_name": "dpokit trains one LoRA adapter (model.lora); named adapters are not supported",
    "ref_adapter_name": "the reference with LoRA is the policy with its adapter disabled (reference.mode: adapter)",
    "force_use_ref_model": "set model.ref_name_or_path for a separate reference model",
    "ref_model_init_kwargs": "the reference loads like the policy (model.ref_name_or_path)",
    "padding_value": "dpokit pads with the tokenizer's pad token (or packs without padding)",
    "label_pad_token_id": "dpokit masks prompt and padding itself",
    "is_encoder_decoder": "dpokit trains causal language models only",
    "use_liger_loss": "no Liger kernels; dpokit's log-probs never build the full-vocabulary tensor anyway",
    "dataset_text_field": "no text-field datasets: preference data has prompt/chosen/rejected",
    "activation_offloading": "no activation offloading; train.gradient_checkpointing saves activation memory",
    "pad_to_multiple_of": "dpokit packs sequences without padding (train.layout: packed) or pads to the longest",
    "pad_token": "dpokit pads with the tokenizer's pad token (or packs without padding)",
    "router_aux_loss_coef": "mixture-of-experts router losses are not added",
    **MODEL_REASONS,
}
"""Why a TRL key has no dpokit counterpart."""

IGNORABLE = {
    "logging_dir", "logging_strategy", "logging_first_step", "save_strategy", "eval_strategy",
    "evaluation_strategy", "do_train", "do_eval", "do_predict", "overwrite_output_dir", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_drop_last", "remove_unused_columns", "disable_tqdm", "log_level",
    "local_rank", "ddp_find_unused_parameters", "ddp_backend", "save_safetensors", "save_only_model",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "include_num_input_tokens_seen",
    "bf16_full_eval", "fp16_full_eval", "tf32", "torch_compile", "use_cpu", "no_cuda", "label_names",
    "gradient_checkpointing_kwargs", "hub_model_revision",
}
"""transformers ``Trainer`` housekeeping with no effect on what is learned (logging, hub, dataloader workers):
named as not carried over, without a warning tone."""

TR_DPO = {"ref_model_mixup_alpha", "ref_model_sync_steps"}
"""Read by TRL only with ``sync_ref_model``."""
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_hf": "adamw", "adamw_torch_fused": "adamw", "adamw": "adamw",
              "paged_adamw_32bit": "adamw", "rmsprop": "rmsprop"}
"""``paged_adamw_32bit`` is AdamW with fp32 states that bitsandbytes pages to CPU memory: the same update."""


@dataclass
class Translation:
    """The dpokit config, and each TRL key not carried over with its reason."""

    config: dict[str, Any] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, dotted: str, value: Any) -> None:
        from dpokit.config import set_dotted

        set_dotted(self.config, dotted, value)


def trl_defaults() -> dict[str, Any]:
    """``TRL_DEFAULTS``, overridden by the installed TRL's ``DPOConfig`` defaults when TRL is importable."""
    defaults = dict(TRL_DEFAULTS)
    try:
        import dataclasses

        from trl import DPOConfig
    except Exception:  # noqa: BLE001 - TRL absent or broken: the built-in table stands
        return defaults
    for f in dataclasses.fields(DPOConfig):
        if (f.name in defaults or f.name in FROM_INSTALLED_TRL) and f.default is not dataclasses.MISSING:
            value = getattr(f.default, "value", f.default)
            defaults[f.name] = value
    return defaults


def read_trl_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is YAML
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML or JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of DPOConfig fields")
    return data


def translate(trl: dict[str, Any], label_smoothing: str = "ignore") -> Translation:
    """The dpokit config equivalent to the TRL config ``trl`` (``DPOConfig`` fields, and the ``ModelConfig`` and
    ``ScriptArguments`` ones TRL's parser reads from the same file). ``label_smoothing`` chooses what
    ``loss_type: sigmoid`` with label smoothing becomes: ``ignore`` (TRL 1.x's sigmoid ignores it) or ``cdpo``
    (TRL before 1.0 read it as cDPO's flip rate)."""
    from dpokit.losses import LOSSES

    if label_smoothing not in ("ignore", "cdpo"):
        raise ConfigError(f"label_smoothing: '{label_smoothing}' is not ignore or cdpo")
    out = Translation()
    given = dict(trl)
    values = {**trl_defaults(), **{k: v for k, v in given.items() if v is not None}}
    loss_section(values, given, out, set(LOSSES), label_smoothing)
    _training(values, given, out)
    model_section(given, out)
    data_section(given, out)
    for key in given:
        if key in MAPPED or key in out.unmapped:
            continue
        if _at_default(key, given[key]) or (key in TR_DPO and not given.get("sync_ref_model")):
            continue  # left at a value that does nothing (a full dump of DPOConfig lists ~140 such keys)
        if key in REASONS:
            out.unmapped[key] = REASONS[key]
        elif key in IGNORABLE:
            out.unmapped[key] = "transformers Trainer housekeeping; no effect on what is learned"
        else:
            out.unmapped[key] = "not a DPOConfig field dpokit knows"
    return out


@functools.cache
def _trainer_defaults() -> dict[str, Any]:
    """transformers ``TrainingArguments``' defaults (transformers is a dpokit dependency)."""
    import dataclasses

    from transformers import TrainingArguments

    try:  # what __post_init__ fills in too (accelerator_config), as to_dict() writes it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return TrainingArguments(output_dir="unused").to_dict()
    except Exception:  # noqa: BLE001 - an environment it refuses: the declared defaults
        pass
    defaults = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = getattr(f.default, "value", f.default)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            defaults[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
    return defaults


def _at_default(key: str, value: Any) -> bool:
    if value in (None, False, [], {}, "", "none"):
        return True
    if isinstance(value, str) and re.fullmatch(r"<[A-Z_]+>", value):
        return True  # to_dict()'s placeholder for a secret or a token: not set
    default = _trainer_defaults().get(key, TRL_DEFAULTS.get(key))
    return default is not None and value == getattr(default, "value", default)


def _training(values: dict[str, Any], given: dict[str, Any], out: Translation) -> None:
    out.put("train.lr", float(values["learning_rate"]))
    out.put("train.batch_size", int(values["per_device_train_batch_size"]))
    out.put("train.grad_accum", int(values["gradient_accumulation_steps"]))
    max_steps = int(values.get("max_steps") or -1)
    if max_steps > 0:
        out.put("train.max_steps", max_steps)
    else:
        out.put("train.epochs", float(values["num_train_epochs"]))
    scheduler = values.get("lr_scheduler_type")
    scheduler = getattr(scheduler, "value", scheduler)
    _warmup(values, scheduler, out)
    out.put("train.weight_decay", float(values["weight_decay"]))
    out.put("train.adam_betas", [float(values["adam_beta1"]), float(values["adam_beta2"])])
    norm = float(values.get("max_grad_norm") or 0.0)
    out.put("train.max_grad_norm", norm if norm > 0 else None)
    optim = values.get("optim")
    optim = getattr(optim, "value", optim)
    if optim in OPTIMIZERS:
        out.put("train.optimizer", OPTIMIZERS[optim])
    else:
        out.unmapped["optim"] = f"'{optim}' has no dpokit counterpart (adamw, rmsprop)"
    out.put("train.seed", int(values["seed"]))
    if given.get("fp16"):
        out.unmapped["fp16"] = REASONS["fp16"]
    if "bf16" in given and given["bf16"] is not None:
        out.put("train.precision", "bf16" if given["bf16"] else "fp32")
    if given.get("gradient_checkpointing") or given.get("activation_checkpointing"):
        out.put("train.gradient_checkpointing", True)
    if "padding_free" in given:
        out.notes.append("padding_free: dpokit packs without padding by default (train.layout: packed)")
    _intervals(given, max_steps, out)
    if "max_length" in given and given["max_length"] is None:
        out.unmapped["max_length"] = (f"null (TRL: no truncation) has no dpokit counterpart: dpokit needs a limit; "
                                      f"data.max_length: {values['max_length']} (TRL's default) is written, raise "
                                      "it to your longest prompt + response")
    out.put("data.max_length", int(values["max_length"]))
    out.put("data.max_prompt_length", _prompt_limit(values, given, out))
    if values.get("truncation_mode", "keep_end") != "keep_end":
        out.unmapped["truncation_mode"] = "dpokit keeps a long prompt's end (TRL's keep_end) only"
    if given.get("precompute_ref_log_probs"):
        out.put("reference.mode", "store")
    if given.get("sync_ref_model"):  # TR-DPO
        if given.get("precompute_ref_log_probs"):
            out.unmapped["sync_ref_model"] = ("precomputed reference log-probs cannot follow an updated reference "
                                              "(TRL refuses the pair too)")
        else:
            out.put("reference.sync", {"every": int(values["ref_model_sync_steps"]),
                                       "alpha": float(values["ref_model_mixup_alpha"])})
    if "disable_dropout" in given:
        out.put("model.disable_dropout", bool(given["disable_dropout"]))
    if given.get("output_dir"):
        out.put("run_dir", str(given["output_dir"]))
    _log_keys(given, out)


def _warmup(values: dict[str, Any], scheduler: Any, out: Translation) -> None:
    """``warmup_steps``, or ``warmup_ratio`` as ``train.warmup_ratio`` (ceil(ratio x total steps) at the start of
    the run, transformers' rule). transformers 5 has no warmup_ratio: a warmup_steps below 1 is the ratio; in
    transformers 4 a warmup_steps above 0 overrides warmup_ratio."""
    steps = float(values.get("warmup_steps") or 0)
    ratio = float(values.get("warmup_ratio") or 0.0)
    if 0 < steps < 1:
        steps, ratio = 0, steps
    elif steps >= 1 and ratio:
        out.unmapped["warmup_ratio"] = "warmup_steps overrides it in transformers; warmup_steps is written"
        ratio = 0.0
    if scheduler in SCHEDULERS:
        out.put("train.scheduler", SCHEDULERS[scheduler])
        if scheduler == "constant" and (steps or ratio):
            out.unmapped["warmup_steps"] = "TRL's 'constant' scheduler ignores warmup (use constant_with_warmup)"
            steps = ratio = 0
    else:
        out.unmapped["lr_scheduler_type"] = f"'{scheduler}' has no dpokit counterpart (constant, linear, cosine)"
    if ratio:
        out.put("train.warmup_ratio", ratio)
    else:
        out.put("train.warmup_steps", int(steps))


def _intervals(given: dict[str, Any], max_steps: int, out: Translation) -> None:
    """Step intervals. transformers reads a value in (0, 1) as that fraction of the run's steps, rounded up, and
    a save_steps, eval_steps or logging_steps of 0 or below as never (its callback tests ``steps > 0``); saving
    and evaluating happen only under their ``*_strategy: steps`` (save_steps: the default)."""
    strategy = {"save_steps": given.get("save_strategy", "steps"),
                "eval_steps": given.get("eval_strategy", given.get("evaluation_strategy", "no"))}
    for trl_key, key in (("logging_steps", "train.log_every"), ("save_steps", "train.save_every"),
                         ("save_total_limit", "train.keep_checkpoints"), ("eval_steps", "eval.every"),
                         ("per_device_eval_batch_size", "eval.batch_size"),
                         ("precompute_ref_batch_size", "reference.batch_size")):
        value = given.get(trl_key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if getattr(strategy.get(trl_key), "value", strategy.get(trl_key)) not in (None, "steps"):
            continue  # TRL saves or evaluates by epoch or not at all: dpokit saves and evaluates at the end
        if value >= 1 and float(value).is_integer():
            out.put(key, int(value))
        elif 0 < value < 1 and trl_key in ("logging_steps", "save_steps", "eval_steps"):
            if max_steps > 0:
                out.put(key, max(1, math.ceil(value * max_steps)))
            else:
                out.unmapped[trl_key] = (f"{value:g} of the run's steps, which depend on the data here; give a "
                                         "whole number of steps")
        elif value <= 0 and trl_key == "logging_steps":
            out.unmapped[trl_key] = "never logging is not supported (metrics.jsonl gets every step)"


def _prompt_limit(values: dict[str, Any], given: dict[str, Any], out: Translation) -> int:
    """dpokit's ``data.max_prompt_length``, which must be below ``data.max_length``. TRL 1.x has no prompt
    limit: it cuts prompt + completion to max_length (keeping the start), so a prompt is cut only when it
    leaves no room for a completion token. max_length - 1 is dpokit's closest: a prompt keeps all its tokens
    up to max_length - 1, the responses are cut to fit. A limit the file (or an older TRL's default) gives is
    kept when it fits, and brought to max_length - 1 when it does not, as TRL would have cut there anyway."""
    longest = int(values["max_length"]) - 1
    limit = values.get("max_prompt_length")
    if limit is None:
        out.notes.append(f"TRL 1.x has no max_prompt_length (prompt + completion are cut to max_length only): "
                         f"data.max_prompt_length: {longest}, so dpokit cuts no prompt TRL would keep")
        return longest
    if int(limit) > longest:
        source = "max_prompt_length" if "max_prompt_length" in given else "the installed TRL's max_prompt_length"
        out.notes.append(f"{source} {int(limit)} does not fit under max_length {longest + 1}: "
                         f"data.max_prompt_length: {longest}")
        return longest
    return int(limit)


def _log_keys(given: dict[str, Any], out: Translation) -> None:
    """``report_to`` and ``run_name`` go to the ``log`` section when this dpokit has one."""
    from dpokit.config import Config

    if "log" not in Config.model_fields:
        for key in ("report_to", "run_name"):
            if given.get(key) not in (None, "none", []):
                out.unmapped[key] = "this dpokit has no tracker support (metrics.jsonl is always written)"
        return
    report = given.get("report_to")
    if isinstance(report, str):
        report = [] if report in ("none", "") else [report]
    if report:
        from dpokit.config import TRACKERS

        kept = [r for r in report if r in TRACKERS]
        if kept:
            out.put("log.report_to", kept)
        if len(kept) < len(report):
            out.unmapped["report_to"] = (f"no dpokit tracker for {', '.join(r for r in report if r not in kept)} "
                                         f"(known: {', '.join(TRACKERS)})")
    if given.get("run_name"):
        out.put("log.run_name", str(given["run_name"]))


def render(translation: Translation, source: str) -> str:
    """The dpokit config as YAML, with what was not carried over as comments on top."""
    lines = [f"# dpokit config translated from the TRL config {source} (dpokit config from-trl).",
             "# Settings the file left out that change the result take TRL's defaults."]
    missing = [k for k, section, key in (("model.name_or_path", "model", "name_or_path"),
                                        ("data.train", "data", "train"))
               if not translation.config.get(section, {}).get(key)]
    if missing:
        lines.append(f"# Set {' and '.join(missing)}: the file does not name them (model_name_or_path, "
                     "dataset_name).")
    for note in translation.notes:
        lines.append(f"# note: {note}")
    for key, reason in translation.unmapped.items():
        lines.append(f"# not carried over: {key}: {reason}")
    config = dict(translation.config)
    config.setdefault("model", {}).setdefault("name_or_path", "smollm2")
    config.setdefault("data", {}).setdefault("train", None)
    order = ["run_dir", "model", "data", "loss", "train", "eval", "reference", "log"]
    ordered = {k: config[k] for k in order if k in config}
    return "\n".join(lines) + "\n" + yaml.safe_dump(ordered, sort_keys=False)


def from_trl(path: str | Path, out: str | Path | None = None) -> Translation:
    """Read a TRL DPOConfig file, check the translation loads as a dpokit config, write it (``out``, or return
    it for printing)."""
    from dpokit.config import load_config
    from dpokit.io import write_text

    translation = translate(read_trl_file(path))
    config = dict(translation.config)
    config.setdefault("model", {}).setdefault("name_or_path", "smollm2")
    try:
        load_config(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: the translated config is not valid: {exc}") from None
    if out is not None:
        write_text(out, render(translation, str(path)))
    return translation
