"""CPT of an existing model (``source_model:``): one model, imported into the study, continued into each
target language for every target-token budget (``source_model.target_tokens``) x replay ratio
(``replay.ratios``). Every run starts from the imported checkpoint; its shape, architecture and
vocabulary are the checkpoint's; a run sees its budget of target tokens plus replay / (1 - replay) times as
many source tokens (so every ratio sees the same target data, and the data law in D compares like with
like). The study has no scratch or ladder CPT runs (those recipes add none when ``source_model`` is set)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cptscale.recipes.base import Recipe
from cptscale.runs import plan_run
from cptscale.source_model import CHECKPOINT, EVAL, SIZE

if TYPE_CHECKING:
    from cptscale.config.schema import CPTConfig, StudyConfig
    from cptscale.runs import PlannedRun
    from cptscale.runspec import EvalSpec, ParentSpec

ORDER = 30


def tokens_label(tokens: float) -> str:
    """A token budget in a run id, exact and short: 200000000 -> '2e8', 1500000 -> '1p5e6', 16384 -> '16384'."""
    n = round(tokens)
    digits = str(n).rstrip("0")
    exp = len(str(n)) - 1
    if n < 1000 or len(str(n)) - len(digits) < 3:  # fewer than three trailing zeros: plain digits are short
        return str(n)
    mant = digits[0] + ("p" + digits[1:] if len(digits) > 1 else "")
    return f"{mant}e{exp}"


def existing_run_id(lang: str, replay: float, tokens: float) -> str:
    return f"{SIZE}-cpt-{lang}-r{replay:g}-d{tokens_label(tokens)}"


class ExistingModel(Recipe):
    name = "existing"

    def runs(self, cfg: StudyConfig) -> list[PlannedRun]:
        sm = cfg.source_model
        assert sm is not None
        src = cfg.languages.source
        out = []
        for tgt in cfg.languages.targets:
            for d in sorted(sm.target_tokens):
                for r in cfg.replay.ratios:
                    run = plan_run(cfg, SIZE, "cpt", tgt, src, r, tokens=math.ceil(d / (1.0 - r)),
                                   rid=existing_run_id(tgt, r, d))
                    out.append(self._counted(cfg, replace(run, parent=None)))  # parent: the imported model
        return out

    def _counted(self, cfg: StudyConfig, run: PlannedRun) -> PlannedRun:
        """The run with the model's own parameter count (its embedding rows, tied embeddings, biases,
        head_dim), its FLOPs and the job resources they size, when validation read the model; the ladder's
        count of its shape otherwise."""
        from cptscale.compute import flops_6nd
        from cptscale.runs import job_resources
        from cptscale.source_model import param_count

        model = cfg._source_model
        if model is None:
            return run
        total, body = param_count(model.shape, model.arch, model.vocab_size)
        flops = flops_6nd(total, run.tokens)
        res = job_resources(cfg, run.tp * run.pp * run.dp, total, flops, tp=run.tp)
        return replace(run, params=total, params_nonemb=body, flops_6nd=flops, **res)

    def owns(self, run: PlannedRun) -> bool:
        return run.init == "cpt" and run.parent is None and run.arm is None and run.size == SIZE

    def _state(self, cfg: StudyConfig) -> dict[str, Any] | None:
        from cptscale.util import read_json

        path = cfg.study_dir / CHECKPOINT / "state.json"
        return read_json(path) if path.is_file() else None

    def shape(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        """The imported checkpoint's shape (head_dim and all); before the import, the ladder's copy of it."""
        state = self._state(cfg)
        return dict(state["shape"]) if state else cfg.shape(run.size).as_dict()

    def cpt_config(self, cfg: StudyConfig, run: PlannedRun) -> CPTConfig:
        return cfg.cpt

    def mix(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        return cfg.mix

    def parent(self, cfg: StudyConfig, run: PlannedRun) -> ParentSpec:
        """The imported model, with its source-language loss as given (model/eval.json: the transformers
        model's own for a Hugging Face source) as the init-sanity gate's reference."""
        from cptscale.runspec import ParentSpec
        from cptscale.util import read_json

        ref = read_json(cfg.study_dir / EVAL)["reference"]
        return ParentSpec(run_id=None, checkpoint=str(cfg.study_dir / CHECKPOINT), lang=ref["lang"],
                          final_loss=float(ref["loss"]), tolerance=cfg.cpt.init_tolerance)

    def spec_fields(self, cfg: StudyConfig, run: PlannedRun, evaluation: EvalSpec) -> dict[str, Any]:
        """The checkpoint's architecture (RoPE, norm eps, biases, tied embeddings) and vocabulary rows."""
        state = self._state(cfg)
        if state is None:
            raise FileNotFoundError(f"{cfg.study_dir / CHECKPOINT} is missing: import the model first "
                                    f"(`cptscale existing-model import CONFIG --out {cfg.study_dir / CHECKPOINT}`)")
        return {"arch": state.get("arch"), "vocab_size": int(state["vocab_size"]), "shape": dict(state["shape"])}

    def hash_parts(self, cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
        sm = cfg.source_model
        assert sm is not None
        return {"cpt": cfg.cpt.model_dump(mode="json"), "mix": cfg.mix,
                "source_model": {"path": sm.path, "tokenizer": sm.tokenizer}}


def recipes(cfg: StudyConfig) -> list[Recipe]:
    return [ExistingModel()] if cfg.source_model is not None else []
