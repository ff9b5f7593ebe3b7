"""``dpokit export``: a run's model as a Hub-ready folder (``export_run``: ``final/`` copied, or a checkpoint with
its LoRA adapters merged), or a LoRA run's adapter alone in peft's format (``export_adapter``: ``--adapter``),
with the largest logit difference between that adapter on its base and the merged weights. The folders' cards
and generation config are ``dpokit.integrations.hub``'s.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from dpokit.errors import DpokitError
from dpokit.integrations.hub import (
    CARD,
    adapter_card,
    front_matter,
    has_chat_template,
    hub_files,
    is_vision_folder,
    model_card,
    name_adapter_base,
    write_generation_config,
)
from dpokit.io import publish_dir, staging_dir, staging_path, writing
from dpokit.training.checkpoint import ADAPTER

PROBE = "The quick brown fox jumps over the lazy dog. 1, 2, 3: a test of the adapter against the merged weights."
"""The text whose logits compare an adapter on its base with the merged weights."""


def check_target(run_dir: str | Path, to: str | Path, flag: str) -> tuple[Path, Path]:
    """(run folder, output folder) once both are usable: a run directory, and an output that does not exist
    or is an empty folder, other than the run's own ``final/``."""
    from dpokit.training.resume import is_run_dir

    run_dir, target = Path(run_dir), Path(to)
    if not is_run_dir(run_dir):
        raise DpokitError(f"{run_dir}: not a run directory (no config.yaml)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DpokitError(f"{flag}: {target} exists and is not an empty folder")
    if target.resolve() == (run_dir / "final").resolve():
        raise DpokitError(f"{flag}: that is the run's own final/")
    return run_dir, target


def export_run(run_dir: str | Path, to: str | Path, checkpoint: str | None = None) -> Path:
    """``dpokit export``: ``final/`` (or ``checkpoints/step-N``, LoRA merged) of a run as a Hub-ready folder at
    ``to``, which must not exist or be empty."""
    run_dir, target = check_target(run_dir, to, "--to")
    if checkpoint is None:
        return _copy_final(run_dir, target)
    return _export_checkpoint(run_dir, target, checkpoint)


def _final_facts(run_dir: Path) -> dict[str, Any]:
    """What ``final/``'s card recorded of the training (task, hardware, versions); {} without a card."""
    card = run_dir / "final" / CARD
    return front_matter(card.read_text(encoding="utf-8")).get("dpokit") or {} if card.is_file() else {}


def _copy_final(run_dir: Path, target: Path) -> Path:
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise DpokitError(f"{run_dir}: no final/ model folder (has the run finished? --checkpoint step-N exports "
                          "a checkpoint)")
    facts = _final_facts(run_dir)
    task = facts.get("task") or _task_of(run_dir)
    if target.exists():
        target.rmdir()  # empty (checked): the staged copy is renamed into its place
    with writing(target, "model folder"):
        tmp = staging_dir(target)
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        (tmp / CARD).write_text(model_card(run_dir, task, facts.get("hardware"), chat=has_chat_template(tmp),
                                           versions=facts.get("versions"), adapter=(tmp / ADAPTER).is_dir(),
                                           vision=is_vision_folder(tmp)),
                                encoding="utf-8")
        if task != "rm" and not (tmp / "generation_config.json").is_file():
            from transformers import AutoTokenizer, GenerationConfig

            tokenizer = AutoTokenizer.from_pretrained(tmp)
            holder = type("Holder", (), {"generation_config": GenerationConfig.from_pretrained(tmp)
                                         if (tmp / "generation_config.json").is_file() else None})()
            write_generation_config(holder, tokenizer, tmp)
        return publish_dir(tmp, target)


def _task_of(run_dir: Path) -> str:
    from dpokit.training.checkpoint import list_checkpoints, read_trainer_state

    for path in reversed(list_checkpoints(run_dir)):
        try:
            return str(read_trainer_state(path).get("task", "dpo"))
        except (OSError, ValueError):
            continue
    return "dpo"


def start_model(cfg: Any) -> tuple[Any, Any]:
    """(model, tokenizer) the run started from, as plain weights: for QLoRA the base's NF4 values, which the
    adapters were trained on. A vision-language model comes with its own class and its processor in place of
    the tokenizer (``save_pretrained`` writes both; ``processor.tokenizer`` tokenizes)."""
    from dpokit.models.loading import load_model, load_tokenizer, resolve
    from dpokit.models.quantize import round_trip
    from dpokit.models.vision import is_vision_source, load_processor, load_vision_model

    m = cfg.model
    source = resolve(m.name_or_path, m.gguf_file, m.revision)
    if is_vision_source(source, m.trust_remote_code):
        model = load_vision_model(source, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                                  attn_implementation=m.attn_implementation)
        tokenizer = load_processor(source, m.trust_remote_code)
    else:
        tokenizer = load_tokenizer(source, m.trust_remote_code)
        model = load_model(source, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                           attn_implementation=m.attn_implementation, vocab_size=len(tokenizer))
    round_trip(model, m.quantize)  # only the language model's Linear layers in a vision-language model
    return model, tokenizer


def checkpoint_model(run_dir: Path, checkpoint: str, flag: str = "--checkpoint") -> tuple[Any, Any, str]:
    """(model, tokenizer, task) of a complete plain checkpoint of a language model: the starting model with the
    checkpoint's trained tensors, a peft model (adapters not merged) for a LoRA run."""
    from dpokit.config import load_config
    from dpokit.models.loading import apply_lora
    from dpokit.training.checkpoint import (
        is_sharded,
        load_weights_into,
        policy_weights,
        read_trainer_state,
        verify_checkpoint,
    )

    if not re.fullmatch(r"step-\d+", checkpoint):
        raise DpokitError(f"--checkpoint: expected step-N, got '{checkpoint}'")
    path = run_dir / "checkpoints" / checkpoint
    if not path.is_dir():
        raise DpokitError(f"--checkpoint: {path} not found")
    problem = verify_checkpoint(path)
    if problem:
        raise DpokitError(f"--checkpoint: {path} is not complete ({problem})")
    if is_sharded(path):
        raise DpokitError(f"--checkpoint: {path} is sharded (FSDP); export the run's final/ instead")
    task = str(read_trainer_state(path).get("task", "dpo"))
    if task == "rm":
        raise DpokitError("--checkpoint: a reward model's checkpoint cannot be exported; export final/ instead")
    cfg = load_config(run_dir / "config.yaml")
    model, tokenizer = start_model(cfg)
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg.model.lora)
        name_adapter_base(model, cfg.model.name_or_path)
    load_weights_into(model, path, policy_weights(path))
    return model, tokenizer, task


def _export_checkpoint(run_dir: Path, target: Path, checkpoint: str) -> Path:
    from dpokit.training.checkpoint import export_hf
    from dpokit.training.vision import with_processor

    model, tokenizer, task = checkpoint_model(run_dir, checkpoint)
    facts = _final_facts(run_dir)  # the training machine, as final/ recorded it
    if target.exists():
        target.rmdir()
    add = hub_files(run_dir, task, step=int(checkpoint[5:]), machine=facts.get("hardware"),
                    versions=facts.get("versions"))
    if hasattr(tokenizer, "tokenizer"):  # a processor: its files beside the weights, as training writes final/
        tokenizer, add = tokenizer.tokenizer, with_processor(tokenizer, add)
    return export_hf(model, tokenizer, target, add=add)  # a LoRA model: its adapter in adapter/, then merged


def text_tokenizer(tokenizer_or_processor: Any) -> Any:
    """The tokenizer of a vision-language model's processor, or the tokenizer itself."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


# ------------------------------------------------------------------------------------------------ --adapter

def logit_gap(adapted: Any, merged: Any, tokenizer: Any) -> float:
    """max |Δlogit| over ``PROBE``'s tokens between the adapter on its base and the merged model."""
    import torch

    ids = text_tokenizer(tokenizer)(PROBE, return_tensors="pt")["input_ids"]  # text only, for a VLM too
    with torch.no_grad():
        ours = adapted.eval()(input_ids=ids).logits.float()
        theirs = merged.eval()(input_ids=ids).logits.float()
    return (ours - theirs).abs().max().item()


def export_adapter(run_dir: str | Path, to: str | Path, checkpoint: str | None = None) -> tuple[Path, float | None]:
    """``dpokit export --adapter``: the LoRA adapter of ``final/`` (or of ``checkpoints/step-N``) in peft's
    format at ``to`` (which must not exist or be empty), and max |Δlogit| between it, loaded by
    ``PeftModel.from_pretrained`` on the run's starting model, and the merged weights (None where the base
    cannot be loaded here: a reward model, a model given in memory)."""
    from dpokit.config import load_config

    run_dir, target = check_target(run_dir, to, "--adapter")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.lora is None:
        raise DpokitError(f"--adapter: {run_dir} trained without LoRA (model.lora unset), so it has no adapter; "
                          "export its weights with --to DIR")
    if checkpoint is None:
        return _final_adapter(run_dir, target, cfg)
    model, _, task = checkpoint_model(run_dir, checkpoint)
    with writing(target, "adapter folder", cleanup=staging_path(target)):
        tmp = staging_dir(target)
        model.save_pretrained(tmp, safe_serialization=True)  # peft's own format
        vision = getattr(model.config, "vision_config", None) is not None
        (tmp / CARD).write_text(adapter_card(run_dir, task, int(checkpoint[5:]), vision), encoding="utf-8")
        gap = _gap_on_base(cfg, tmp, model.merge_and_unload())
        return publish_dir(tmp, target), gap


def _final_adapter(run_dir: Path, target: Path, cfg: Any) -> tuple[Path, float | None]:
    from dpokit.models.loading import in_memory_name

    source = run_dir / "final" / ADAPTER
    if not (source / "adapter_config.json").is_file():
        raise DpokitError(f"--adapter: {run_dir} has no final/{ADAPTER}/ (has the run finished? --checkpoint "
                          "step-N --adapter OUT exports a checkpoint's)")
    task = _final_facts(run_dir).get("task") or _task_of(run_dir)
    measured = task != "rm" and in_memory_name(cfg.model.name_or_path) is None
    with writing(target, "adapter folder", cleanup=staging_path(target)):
        tmp = staging_dir(target)
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        gap = None
        if measured:
            from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

            auto = AutoModelForImageTextToText if is_vision_folder(run_dir / "final") else AutoModelForCausalLM
            gap = _gap_on_base(cfg, tmp, auto.from_pretrained(run_dir / "final"))
        return publish_dir(tmp, target), gap


def _gap_on_base(cfg: Any, folder: Path, merged: Any) -> float:
    """``logit_gap`` of the adapter in ``folder``, loaded by peft on a fresh copy of the run's starting model
    (as a user loads it), against ``merged``."""
    from peft import PeftModel

    base, tokenizer = start_model(cfg)
    return logit_gap(PeftModel.from_pretrained(base, str(folder)), merged, tokenizer)
