"""Continued pretraining: a target language's runs starting from the same-size source-language model, per
replay ratio; the study's recipe (``cpt``, ``mix``) and each recipe variant (``variants.<name>``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cptscale.recipes.base import Recipe
from cptscale.runs import checkpoint_dir, plan_run, run_dir, run_id

if TYPE_CHECKING:
    from cptscale.config.schema import CPTConfig, StudyConfig
    from cptscale.runs import PlannedRun
    from cptscale.runspec import ParentSpec

ORDER = 10


class CPT(Recipe):
    """The study's CPT recipe (``variant`` None) or one of its variants."""

    grid = True

    def __init__(self, variant: str | None = None) -> None:
        self.variant = variant
        self.name = f"cpt-{variant}" if variant else "cpt"

    def runs(self, cfg: StudyConfig) -> list[PlannedRun]:
        src = cfg.languages.source
        return [plan_run(cfg, size, "cpt", tgt, src, r, self.variant) for size in cfg.ladder.sizes
                for tgt in cfg.languages.targets for r in cfg.replay.ratios]

    def owns(self, run: PlannedRun) -> bool:
        return run.init == "cpt" and run.arm is None and run.variant == self.variant

    def find(self, cfg: StudyConfig, rid: str) -> PlannedRun | None:
        """Only the run with that id is planned (ids are compared, not runs)."""
        src = cfg.languages.source
        for size in cfg.ladder.sizes:
            for tgt in cfg.languages.targets:
                for r in cfg.replay.ratios:
                    if run_id(size, "cpt", tgt, r, self.variant) == rid:
                        return plan_run(cfg, size, "cpt", tgt, src, r, self.variant)
        return None

    def cpt_config(self, cfg: StudyConfig, run: PlannedRun) -> CPTConfig:
        return cfg.cpt_for(self.variant)

    def mix(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        """None for continued training on the parent's own language; else the recipe's mix."""
        return {} if run.lang == run.source_lang else cfg.mix_for(self.variant)

    def mix_path(self, cfg: StudyConfig, run: PlannedRun) -> str:
        v = self.variant
        return f"variants.{v}.mix" if v and cfg.variants[v].mix is not None else "mix"

    def parent(self, cfg: StudyConfig, run: PlannedRun) -> ParentSpec:
        """The parent's final checkpoint and its final source-language loss (the init-sanity gate's
        reference), from the parent's done.json; with ``cpt.unseen_tokens: mean``, the datasets the parent
        trained on (its run.json), whose token ids are the ones it has seen."""
        from cptscale.runspec import ParentSpec, RunSpec
        from cptscale.util import read_json

        assert run.parent and run.source_lang
        done = read_json(run_dir(cfg, run.parent) / "done.json")
        cc = self.cpt_config(cfg, run)
        extra: dict[str, Any] = {}
        if cc.unseen_tokens != "keep":
            parent_spec = RunSpec.load(run_dir(cfg, run.parent) / "run.json")
            extra = {"unseen_tokens": cc.unseen_tokens, "source_data": parent_spec.train_prefixes()}
        return ParentSpec(run_id=run.parent, checkpoint=str(checkpoint_dir(cfg, run.parent) / "final"),
                          lang=run.source_lang, final_loss=float(done["final_loss"][run.source_lang]),
                          tolerance=cc.init_tolerance, **extra)

    def hash_parts(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        return {"cpt": self.cpt_config(cfg, run).model_dump(mode="json"), "mix": self.mix(cfg, run)}


def recipes(cfg: StudyConfig) -> list[Recipe]:
    if cfg.source_model is not None:  # CPT of an existing model: cptscale.recipes.existing
        return []
    return [CPT(None), *(CPT(v) for v in cfg.variants)]
