"""What every config is built from: the section base class, the ``NEUTRAL`` mark, and the way from a YAML file
to a validated model and back (read the tree, set ``key=value`` overrides into it, validate it with one-line
errors naming the key, write the resolved config).

It imports nothing of dpokit but ``errors`` and ``io``, so a layer below the run's ``Config`` (``dpokit.config``)
defines its own section here, typed and strict like the rest: the data layer's ``DataConfig``
(``dpokit.data.config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dpokit.errors import ConfigError
from dpokit.io import write_text

NEUTRAL: dict[str, Any] = {"result_neutral": True}
"""Marks a field whose value does not change the numbers a run computes, only how they are computed (layout,
kernels, passes), shown, logged or stored. Every other field changes the result: a resumed run refuses a change
to it unless forced, and the recipe's cache keys hold it. A new field is result-altering until marked."""


class Section(BaseModel):
    """A config section: an unknown key is an error, and so is a wrong value set after validation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``a.b``, making the sections on the way; a key through a value that is not a
    section is a ``ConfigError``."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-6`` -> ("train.lr", 1e-06); the value is parsed as YAML so types come out right."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.lr=1e-6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads "1e-6" (no dot) as a string; a number is what anyone typing it means.
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return key.strip(), value


def format_error(err: ValidationError, source: str) -> str:
    """The first error of a validation as one line: ``SOURCE: dotted.key: what is wrong``."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")
    if not first["loc"]:
        return f"{source}: {msg}"
    return f"{source}: {key}: {msg}"


def save_config(config: BaseModel, path: Path) -> None:
    """A resolved config (a run's ``Config``, a recipe's) as YAML, written atomically."""
    write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-6}}`` -> ``{"train.lr": 1e-6}``; any mapping is walked into."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_yaml_tree(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping. A missing file, invalid YAML (with its file:line) or a top level that is
    not a mapping is a one-line ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return tree


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """``key=value`` strings (the CLI's, see ``parse_override``), then ``kwargs`` (dotted keys written with
    ``__`` from Python, ``train__lr=1e-6``), set into ``tree`` in place; returns it."""
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    for key, value in kwargs.items():
        set_dotted(tree, key.replace("__", "."), value)
    return tree


ModelT = TypeVar("ModelT", bound=BaseModel)


def validate_tree(model: type[ModelT], tree: dict[str, Any], source: str) -> ModelT:
    """``model`` validated from ``tree``; the first error is a one-line ``ConfigError`` naming ``source`` and
    the key (``format_error``)."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_error(err, source)) from None


def set_tree(model: BaseModel) -> dict[str, Any]:
    """``model``'s values as ``model_dump(mode="json")`` writes them, of the fields that were set (given, or
    assigned since) and of every section in which anything was: validated again, it equals ``model`` and keeps
    ``model_fields_set``, so "did the user set this" survives a round trip. (``exclude_unset`` alone would drop
    a value assigned inside a section that was itself left at its default.)"""
    full = model.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            inner = set_tree(value)
            if inner or name in model.model_fields_set:
                out[name] = inner
        elif name in model.model_fields_set:
            out[name] = full[name]
    return out
