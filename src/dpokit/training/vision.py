"""What a run on a vision-language model may do, said before anything loads: DPO (``dpokit train``) on pairs
with the padded layout and a live reference (``reference.mode: model`` or ``adapter``), and SFT (``dpokit sft``)
on the chosen responses with the padded layout. Everything else is refused in one line naming the setting, never
run in a way that ignores the images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpokit.config import Config
from dpokit.errors import ConfigError
from dpokit.losses import trained_kind
from dpokit.models.loading import in_memory_name, resolve
from dpokit.models.vision import is_vision_source
from dpokit.training.step import KindSpec


def is_vision(cfg: Config, load: Any = None) -> bool:
    """The run's policy is a vision-language model (``dpokit.models.vision.is_vision_source``); for a model
    object given to ``dpokit.train``, its loader (``load``, ``dpokit.api.ObjectLoader``) says, since the name
    the run records (``<in-memory:...>``) names no model to look at."""
    name = cfg.model.name_or_path
    if cfg.model.gguf_file is not None or name.endswith(".gguf"):
        return False  # GGUF holds text models only here; resolving it would convert it
    if in_memory_name(name) is not None:
        return bool(getattr(load, "vision", False))
    return is_vision_source(resolve(name, None, cfg.model.revision), cfg.model.trust_remote_code)


def check_vision_setup(cfg: Config, spec: KindSpec, note: Callable[[str], None]) -> None:
    """Refuse what is not built for images yet; the layout becomes ``padded`` (said once) unless ``packed`` was
    asked for explicitly, which is refused."""
    name = cfg.model.name_or_path
    if spec.name not in ("dpo", "sft"):
        raise ConfigError(f"model.name_or_path: {name} is a vision-language model; only offline DPO "
                          f"(dpokit train) and SFT (dpokit sft) train one so far, not dpokit {spec.name}")
    if spec.name == "dpo" and trained_kind(cfg.loss) not in ("pairwise", "batchwise"):
        raise ConfigError(f"loss.name: {cfg.loss.name} is not supported with images yet; use a pairwise loss "
                          "(sigmoid, ipo, simpo, ...)")
    if cfg.train.layout == "packed":
        if "layout" in cfg.train.model_fields_set:
            raise ConfigError("train.layout: packed is not supported for image data (the model places each "
                              "image's features itself, one row per sequence); use train.layout: padded")
        note("train.layout packed -> padded (image data is computed in the padded layout)")
        cfg.train.layout = "padded"


def with_processor(processor: Any, add: Callable[[Path, Any, Any], None]) -> Callable[[Path, Any, Any], None]:
    """``export_hf``'s ``add`` that also writes the processor (image processor settings, chat template), so
    ``AutoProcessor.from_pretrained(final)`` loads what training used."""

    def both(folder: Path, model: Any, tokenizer: Any) -> None:
        processor.save_pretrained(folder)
        add(folder, model, tokenizer)

    return both
