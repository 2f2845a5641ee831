"""The recipe interface and the LR schedule every recipe builds from the config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cptscale.schedule import Schedule

if TYPE_CHECKING:
    from cptscale.config.schema import CPTConfig, StudyConfig
    from cptscale.runs import PlannedRun
    from cptscale.runspec import EvalSpec, ParentSpec


class Recipe:
    """How a kind of run is trained. Defaults are a run from scratch on its own language with the study's
    ``train`` settings; a recipe overrides what it changes.

    ``grid``: its runs sit in the ladder grid (size x language x replay ratio) and are listed in grid
    order among the other grid recipes' runs; other recipes' runs follow, in recipe order."""

    name = "recipe"
    grid = False

    def runs(self, cfg: StudyConfig) -> list[PlannedRun]:
        """The runs this recipe adds to the study (runs another recipe also plans are listed once)."""
        return []

    def owns(self, run: PlannedRun) -> bool:
        """Whether this recipe trains ``run``."""
        raise NotImplementedError

    def find(self, cfg: StudyConfig, rid: str) -> PlannedRun | None:
        """The run ``rid`` if this recipe adds it (None otherwise). A recipe whose run ids are cheap to
        list overrides this to plan only that run: each workflow job plans one run, so a lookup that
        plans every run makes the study's planning jobs grow with the square of its runs."""
        return next((run for run in self.runs(cfg) if run.run_id == rid), None)

    def shape(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        """The model shape run.json builds (the ladder's shape of the run's size)."""
        return cfg.shape(run.size).as_dict()

    def cpt_config(self, cfg: StudyConfig, run: PlannedRun) -> CPTConfig | None:
        """The continued-pretraining recipe of a run that starts from a parent (None: from scratch)."""
        return None

    def schedule(self, cfg: StudyConfig, run: PlannedRun) -> Schedule:
        return lr_schedule(cfg, run, self.cpt_config(cfg, run))

    def mix(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        """The ``mix`` section its blend follows ({}: its own language only)."""
        return {}

    def mix_path(self, cfg: StudyConfig, run: PlannedRun) -> str:
        """Config path of that mix section (for error messages)."""
        return "mix"

    def parent(self, cfg: StudyConfig, run: PlannedRun) -> ParentSpec | None:
        """The model the run starts from (None: random initialisation)."""
        return None

    def spec_fields(self, cfg: StudyConfig, run: PlannedRun, evaluation: EvalSpec) -> dict[str, Any]:
        """RunSpec fields this recipe sets beyond the common ones (e.g. prune events)."""
        return {}

    def hash_parts(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        """What of the config, besides the common sections, changes what the run computes (its
        ``training_hash``)."""
        return {"cpt": None, "mix": None}


def peak_lr(cfg: StudyConfig, run: PlannedRun) -> float:
    """The run's peak LR: ``train.lr``, scaled by ``train.lr_scaling`` from the ladder's smallest size
    (non-embedding parameters; a run outside the ladder, e.g. a next run or an imported model, is
    scaled by its own count the same way)."""
    t = cfg.train
    if t.lr_scaling == "constant":
        return t.lr
    ref = min(cfg.shape(s).params(cfg.vocab_size, embeddings=False) for s in cfg.ladder.sizes)
    return t.lr * (ref / max(1, run.params_nonemb)) ** (1.0 / 3.0)


def lr_schedule(cfg: StudyConfig, run: PlannedRun, cpt: CPTConfig | None) -> Schedule:
    """Runs from scratch follow ``train``; continued runs follow ``cpt`` (Reuse, Don't Retrain options)."""
    t = cfg.train
    warmup = round(t.warmup_fraction * run.steps)
    kind = t.schedule
    lr = peak_lr(cfg, run)
    max_lr, min_lr, start_lr = lr, lr * t.min_lr_ratio, 0.0
    if cpt is not None:
        kind = cpt.schedule or t.schedule
        if cpt.start_lr == "source_final":
            max_lr = lr * t.min_lr_ratio if t.schedule != "constant" else lr
        if not cpt.warmup:
            warmup = 0
        min_lr = {
            "pretrain": min(max_lr, lr * t.min_lr_ratio),
            "start/10": max_lr / 10,
            "start/100": max_lr / 100,
            "zero": 0.0,
        }[cpt.min_lr]
    decay = 0
    if kind == "wsd":
        decay = max(1, round(t.wsd_decay_fraction * (run.steps - warmup)))
    branches: tuple[int, ...] = ()
    if t.wsd_branches:
        # a BlendError (a ValueError) names the config field, so config validation, which plans every
        # run's blend and with it this schedule, reports the problem under train.wsd_branches
        from cptscale.mix import BlendError

        if t.schedule != "wsd":
            raise BlendError(f"{t.wsd_branches} needs train.schedule: wsd (got {t.schedule!r})",
                             "train.wsd_branches")
        if kind == "wsd":  # a CPT recipe with another schedule (cpt.schedule) has no branches
            branches = tuple(sorted({round(f * run.steps) for f in t.wsd_branches}))
        try:
            Schedule(kind, max_lr, min_lr, warmup, run.steps, start_lr, decay, t.decay_shape, branches)
        except ValueError as exc:
            raise BlendError(f"{t.wsd_branches} -> branches of {list(branches)} steps for run {run.run_id} "
                             f"({run.steps} steps, warmup {warmup}): {exc}; choose other fractions",
                             "train.wsd_branches") from None
    return Schedule(kind, max_lr, min_lr, warmup, run.steps, start_lr, decay, t.decay_shape, branches)
