"""End-to-end pipelines built from the library: ``dpokit recipe NAME [key=value ...]``.

A recipe is a module with ``run(preset=None, overrides=None) -> dict`` (the summary it also writes to
``RUN_DIR/summary.json``) and ``load_recipe_config(preset=None, overrides=None)`` (validate without running).
The registry maps a name to that module; it is imported on use, because recipes pull in torch and models.

=============  ==========================================================================================
``sentiment``  the DPO paper's controlled-sentiment experiment (Section 6.1, Figure 2), offline:
               SmolLM2 continues movie-review openings, VADER is the ground-truth reward, DPO at several
               beta against Preferred-FT, Unlikelihood and Best-of-N on the reward-KL frontier
=============  ==========================================================================================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from dpokit.errors import DpokitError


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    module: str
    """Dotted module path holding ``run`` and ``load_recipe_config``."""

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


RECIPES: dict[str, Recipe] = {
    "sentiment": Recipe("sentiment", "the DPO paper's controlled-sentiment experiment, end to end and offline",
                        "dpokit.recipes.sentiment"),
}
"""name -> recipe."""


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DpokitError(f"recipe '{name}': unknown; recipes are {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def run_recipe(name: str, preset: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run recipe ``name`` with a preset (a name such as ``demo`` or a YAML file) and ``key=value`` overrides;
    returns its summary."""
    return get_recipe(name).load().run(preset=preset, overrides=overrides)


__all__ = ["RECIPES", "Recipe", "get_recipe", "run_recipe"]
