"""Pretraining from scratch: one run per ladder size and language, on that language alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cptscale.recipes.base import Recipe
from cptscale.runs import plan_run, run_id

if TYPE_CHECKING:
    from cptscale.config.schema import StudyConfig
    from cptscale.runs import PlannedRun

ORDER = 0


class Scratch(Recipe):
    name = "scratch"
    grid = True

    def runs(self, cfg: StudyConfig) -> list[PlannedRun]:
        return [plan_run(cfg, size, "scratch", lang, None, 0.0) for size in cfg.ladder.sizes
                for lang in cfg.languages.all]

    def owns(self, run: PlannedRun) -> bool:
        return run.init == "scratch" and run.arm is None and run.variant is None

    def find(self, cfg: StudyConfig, rid: str) -> PlannedRun | None:
        """Only the run with that id is planned (ids are compared, not runs)."""
        for size in cfg.ladder.sizes:
            for lang in cfg.languages.all:
                if run_id(size, "scratch", lang) == rid:
                    return plan_run(cfg, size, "scratch", lang, None, 0.0)
        return None


def recipes(cfg: StudyConfig) -> list[Recipe]:
    return [] if cfg.source_model is not None else [Scratch()]  # an existing model's study trains none
