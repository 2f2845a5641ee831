"""IPLT arms (``iplt:``): runs that prune a dense model during training, at equal total training FLOPs
(see :mod:`cptscale.iplt` for the arms and their budget rule). An arm trains like a scratch or CPT run of
the study's recipe; it differs in its starting shape, its prune events, its evaluations and its budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cptscale.recipes.base import Recipe
from cptscale.recipes.cpt import CPT
from cptscale.recipes.scratch import Scratch

if TYPE_CHECKING:
    from cptscale.config.schema import CPTConfig, StudyConfig
    from cptscale.runs import PlannedRun
    from cptscale.runspec import EvalSpec, ParentSpec

ORDER = 20


class IPLTArms(Recipe):
    name = "iplt"

    def runs(self, cfg: StudyConfig) -> list[PlannedRun]:
        """The dense runs the arms start from (ordinary scratch runs) and the arms."""
        from cptscale.iplt import parent_runs, plan_arms

        return [*parent_runs(cfg), *(a.run for a in plan_arms(cfg))]

    def owns(self, run: PlannedRun) -> bool:
        return run.arm is not None

    def _like(self, run: PlannedRun) -> Recipe:
        return CPT(None) if run.init == "cpt" else Scratch()

    def shape(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        from cptscale.iplt import arm_for

        return dict(arm_for(cfg, run.run_id).shape)

    def cpt_config(self, cfg: StudyConfig, run: PlannedRun) -> CPTConfig | None:
        return self._like(run).cpt_config(cfg, run)

    def mix(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        return self._like(run).mix(cfg, run)

    def parent(self, cfg: StudyConfig, run: PlannedRun) -> ParentSpec | None:
        return self._like(run).parent(cfg, run)

    def spec_fields(self, cfg: StudyConfig, run: PlannedRun, evaluation: EvalSpec) -> dict[str, Any]:
        """The trainer's ``prune`` key, the evaluation steps around each prune and the ``iplt`` block (arm,
        panel, budget, FLOPs the arm inherits from its parent: the parent's own count from its done.json
        when it has finished)."""
        from cptscale.iplt import arm_for, eval_steps_for, iplt_block

        arm = arm_for(cfg, run.run_id)
        out: dict[str, Any] = {}
        if arm.events:
            ic = cfg.iplt
            assert ic is not None
            out["prune"] = {"importance": ic.importance, "calib_batches": ic.calib_batches, "events": arm.events}
        out["eval"] = evaluation.model_copy(update={"steps": eval_steps_for(arm, cfg.evaluation.points)})
        out["iplt"] = iplt_block(cfg, arm)
        return out

    def hash_parts(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        from cptscale.iplt import hash_part

        return {**self._like(run).hash_parts(cfg, run), "iplt": hash_part(cfg, run)}


def recipes(cfg: StudyConfig) -> list[Recipe]:
    return [IPLTArms()] if cfg.iplt is not None else []
