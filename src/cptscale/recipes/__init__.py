"""Recipes: how a study's runs are trained, beside each other.

A recipe says which runs it adds to a study and, for each of them, how the run is shaped, initialised,
scheduled and blended (:class:`~cptscale.recipes.base.Recipe`). Every module of this package that
defines ``recipes(cfg)`` contributes recipes, in the order of its ``ORDER``: adding a recipe is adding
one module here. What a run *is* (size, tokens, batch, layout, resources, paths) is
:mod:`cptscale.runs`, below every recipe.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cptscale.config.schema import StudyConfig
    from cptscale.recipes.base import Recipe
    from cptscale.runs import PlannedRun


@cache
def _modules() -> tuple[ModuleType, ...]:
    mods = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
    return tuple(sorted((m for m in mods if hasattr(m, "recipes")), key=lambda m: m.ORDER))


def study_recipes(cfg: StudyConfig) -> list[Recipe]:
    """The recipes of a study, in plan order."""
    return [r for m in _modules() for r in m.recipes(cfg)]


def recipe_for(cfg: StudyConfig, run: PlannedRun) -> Recipe:
    """The recipe that trains ``run``."""
    for recipe in study_recipes(cfg):
        if recipe.owns(run):
            return recipe
    raise KeyError(f"no recipe of study {cfg.study!r} trains run {run.run_id!r}")
