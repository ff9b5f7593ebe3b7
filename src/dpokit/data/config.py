"""The ``data:`` section of the config (:class:`DataConfig`), defined in the data layer that reads it.

``dpokit.config`` imports it back into the run's ``Config``, so ``dpokit.config.DataConfig`` and every YAML key
``data.*`` are unchanged; defining it here lets the data functions take it by its type without importing the
layers above (models, losses, training) that the run's config knows of.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from dpokit.config_base import NEUTRAL, Section
from dpokit.data.columns import check_columns
from dpokit.data.load import DEFAULT_MAX_LINE_BYTES
from dpokit.errors import ConfigError


class DataConfig(Section):
    """The ``data:`` section of a run's config: where the preference data is and how it is read, validated,
    tokenized and cached. Every function of the data layer that reads a setting takes this, and this is the
    one place each default is stated."""

    train: str | None = None
    """Training preference data: a JSONL, JSON, CSV or Parquet file, or a hub dataset id (needs network)."""
    eval: str | None = Field(None, json_schema_extra=NEUTRAL)
    """Held-out preference data, same formats."""
    train_split: str = "train"
    """Split to read when ``train`` is a hub dataset id (``owner/name``, or ``owner/name:config`` for one of its
    configs/subsets)."""
    eval_split: str = Field("test", json_schema_extra=NEUTRAL)
    """Split to read when ``eval`` is a hub dataset id."""
    columns: dict[str, str] | None = None
    """The dataset's column for each dpokit name, e.g. ``{prompt: question, system: system}`` (Intel/orca_dpo_pairs)
    or ``{prompt: history, chosen: human_ref_A, rejected: human_ref_B, label: labels}`` (SHP: label 1 means the
    ``chosen`` column is preferred, 0 the ``rejected`` one). Targets: ``dpokit.data.columns.COLUMN_TARGETS``."""
    max_length: int = Field(512, ge=2)
    """Maximum tokens of prompt + response. Longer pairs are truncated (prompt first, then responses)."""
    max_prompt_length: int = Field(256, ge=1)
    """Maximum prompt tokens; longer prompts keep their last tokens (the part nearest the response)."""
    max_rows: int | None = Field(None, ge=1)
    """Read at most this many rows of each file (handy for quick experiments)."""
    max_line_bytes: int = Field(DEFAULT_MAX_LINE_BYTES, ge=64)
    """A single JSONL line larger than this is rejected rather than read into memory."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed row (bad JSON, missing key, wrong type, bad message structure): ``raise`` stops with
    file:line; ``skip`` drops it, counted by reason, up to ``max_bad_fraction`` of the rows read."""
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    """With ``on_error: skip``, stop when more than this fraction of the rows read were malformed."""
    dedupe: bool = True
    """Drop exact duplicate rows after the first (counted as ``duplicate``)."""
    cache: bool = Field(True, json_schema_extra=NEUTRAL)
    """Keep each source's tokenized groups in the data cache (``dpokit.data.cache``): tokenized once,
    memory-mapped by every later run with the same data, tokenizer and settings. ``false``: tokenized into a
    temporary folder, removed at exit (still memory-mapped)."""
    cache_dir: str | None = Field(None, json_schema_extra=NEUTRAL)
    """Folder of the data cache; default ``$DPOKIT_CACHE/data`` (``~/.cache/dpokit/data``)."""
    streaming: bool = Field(False, json_schema_extra=NEUTRAL)
    """A hub dataset is read as it arrives (``datasets`` streaming mode) instead of downloaded whole first:
    for data larger than the disk. Only the token ids are kept (in a temporary folder). Files always stream."""
    num_proc: int | None = Field(None, ge=1, json_schema_extra=NEUTRAL)
    """Processes that tokenize a JSONL file (each its own byte range); default: the usable CPU cores. The
    result is the same for any number."""

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str] | None) -> dict[str, str] | None:
        if columns is not None:
            check_columns(columns)
        return columns

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


def from_settings(**settings: Any) -> DataConfig:
    """A :class:`DataConfig` from ``data.*`` settings given one by one (``dpokit data check``'s options); a
    setting given as None keeps its default. A bad value is a one-line ``ConfigError`` naming ``data.KEY``."""
    try:
        return DataConfig(**{key: value for key, value in settings.items() if value is not None})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "max_prompt_length"  # the one check of two settings
        raise ConfigError(f"data.{key}: {first['msg'].removeprefix('Value error, ')}") from None
