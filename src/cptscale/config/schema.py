"""The study config: one YAML file, validated by this typed schema, is the single source of truth.

Everything else (model shapes, steps, batch sizes, schedules, resources) is derived from it in
:mod:`cptscale.plan`. Paper defaults (Zheng et al. 2024, "Breaking Language Barriers") are the field
defaults; the shipped ``config.yaml`` overrides them for a 2-core demo. ``cptscale validate CONFIG``
reports every problem with its field path, the bad value and what is allowed, before any work.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from cptscale.ladder import ModelShape, batch_tier_tokens, tiny_ffn

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
    lr: float = Field(2e-4, gt=0, description="peak LR (paper: 2e-4); with lr_scaling, the smallest size's")
    lr_scaling: Literal["constant", "inverse_cbrt_params"] = Field(
        "constant", exclude_if=lambda v: v == "constant",
        description="peak LR per size: constant (train.lr for every size), or inverse_cbrt_params: train.lr x "
        "(N_smallest / N)^(1/3), N the non-embedding parameters, as a model ladder scales LR down with size "
        "(a CPT run uses its size's LR)")
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
    backend: Literal["megatron", "simulate"] = Field(
        "megatron", exclude_if=lambda v: v == "megatron",
        description="megatron: train (Megatron-Core). simulate: write each run's outputs from a known law "
        "(section simulate; no data stage, nothing trained) to validate the statistics or plan a study; "
        "everything it produces is flagged simulated")


class CPTConfig(_Model):
    """How a CPT run's schedule starts from the source checkpoint (Reuse, Don't Retrain; paper: re-warm)."""

    warmup: bool = Field(True, description="re-warm the LR (paper: yes, to 2e-4)")
    start_lr: Literal["peak", "source_final"] = Field("peak", description="peak LR, or the source run's final LR")
    min_lr: Literal["pretrain", "start/10", "start/100", "zero"] = Field("pretrain", description="decay target")
    schedule: Literal["cosine", "wsd", "constant"] | None = Field(None, description="null: same as train.schedule")
    init_tolerance: float = Field(1e-3, gt=0, description="init-sanity gate: |loaded loss - source final loss| (nats)")
    unseen_tokens: Literal["keep", "mean"] = Field(
        "keep", exclude_if=lambda v: v == "keep",
        description="rows of the tokens the source model never saw in training (ids absent from its training "
        "data): keep (paper: not stated), or mean: set their input-embedding and output rows to the mean of the "
        "seen tokens' rows after the init-sanity gate (Hewitt 2021), so a target language in another script "
        "does not start at ~19 nats. An ablation knob: on the EN->ZH demo it transferred less than keep")


class Variant(_Model):
    """A CPT recipe variant: overrides of `cpt` and/or `mix` that add one more CPT run per size x target x
    replay ratio (for Reuse, Don't Retrain-style ablations: warmup or not, minimum LR, switch points)."""

    cpt: dict[str, Any] = Field(default_factory=dict, description="keys of `cpt` to override")
    mix: dict[str, Any] | None = Field(None, description="a whole `mix` section replacing the study's")


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
    ``cptscale.compute.flops_per_token`` per token) of the dense model ``size`` on its study token budget
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
        return _distinct(v, "start_fractions")


def _distinct(v: list[float], field: str, fix: str = "") -> list[float]:
    """``v`` when its values differ, else an error naming the field (and ``fix``)."""
    if len(set(v)) != len(v):
        raise ValueError(f"{field} repeat: {v}{fix}")
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
    bootstrap_scheme: Literal["wildjk", "pairs", "bayes", "wild", "wild3"] = Field(
        "wildjk", description="how the loss-law bootstrap resamples runs: wildjk (design fixed, one sign per run on "
        "its leave-one-run-out residuals: 93-98 % coverage over 200 simulated paper studies), pairs (with "
        "replacement), bayes (one Exp(1) weight per run: no size ever drops out), wild / wild3 (design fixed, "
        "signs on raw / linearised-jackknife residuals)")
    min_step_fraction: float = Field(0.1, ge=0, lt=1, description="ignore eval points before this share of a run")
    budgets: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1e18, 1e19, 1e20, 1e21], description="FLOP budgets for the allocation table"
    )
    next_run_budget: float | None = Field(None, gt=0, description="train the predicted compute-optimal run")
    points: Literal["annealed", "all"] = Field(
        "annealed", description="loss-law fit points: annealed (each run's end and WSD decay-branch ends) or all "
        "(every evaluation; un-annealed checkpoints bias alpha and beta)")
    overestimate_penalty: float = Field(
        1.0, gt=0, description="Huber weight of overestimates (OLMo-core ladder; 1 = symmetric)")
    remedy: Literal["auto", "flag"] = Field(
        "auto", description="a scratch fit with a parameter or interval on a bound: auto = fixed E, then the "
        "reduced law without E (the one used is recorded); the comparison laws (CPT Chinchilla, scratch "
        "extended): E, A, alpha from the scratch fit (the paper's CPT protocol); flag = only flag it")
    fixed_E: float | None = Field(None, ge=0, description="E for the fixed-E remedy (null: E of a separate fit)")


class StoreConfig(_Model):
    allow_partial: bool = Field(
        False, description="aggregate: keep the good lines of a truncated or malformed metrics file (each "
        "problem is logged by path and line) instead of failing the aggregate job")
    allow_mixed: bool = Field(
        False, exclude_if=lambda v: not v,
        description="aggregate: keep simulated and trained runs in one store (each row keeps its flag); "
        "without it the ingest refuses to mix them")


class SimulateConfig(_Model):
    """train.backend: simulate: where the simulated runs' losses come from (cptscale.simulate)."""

    truth: str | None = Field(None, description="law file (JSON; `cptscale simulate truth` writes the default), "
                              "relative to the working directory like results_dir; null: the paper's exponents")
    seed: int = Field(0, ge=0, description="seed of the simulated noise (a different seed is another study)")


class ReportConfig(_Model):
    title: str | None = None
    max_points: int = Field(400, ge=10, description="curves are downsampled to this many points")


class WandbConfig(_Model):
    project: str = Field(min_length=1, description="W&B project the runs are logged to")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under each run's directory (`wandb sync` uploads them later)")


class LoggingConfig(_Model):
    """Experiment tracking: mirrors of each run's metrics and evaluations for TensorBoard / W&B users. The
    run's own jsonl files (ingested into the store) stay the source of truth."""

    tensorboard: bool = Field(True, description="event files under <results>/<study>/runs/<run>/tensorboard/")
    wandb: WandbConfig | None = Field(None, description="also log to Weights & Biases (needs the wandb package)",
                                      json_schema_extra=_no_schema_default)


class SourceModelConfig(_Model):
    """CPT of an existing model (a study kind): the model the study continues, instead of a scratch source
    ladder. Its shape, vocabulary and tokenizer come from the model; the study sweeps ``target_tokens`` x
    ``replay.ratios`` from it (cptscale.recipes.existing) and fits the data law at fixed N and the
    forgetting-vs-replay frontier (cptscale.existing)."""

    path: str = Field(
        min_length=1, description="the model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) "
        "of a LLaMA-family model (Llama, Mistral, Qwen2), or a cptscale/Megatron checkpoint dir (state.json + "
        "manifest.json); relative to the config file")
    tokenizer: str | None = Field(
        None, description="the model's tokenizer.json (null: <path>/tokenizer.json); the data stage tokenizes with it")
    target_tokens: list[Annotated[float, Field(gt=0)]] = Field(
        min_length=3, description="target-language tokens per CPT run (the data law in D needs >= 3 distinct "
        "budgets); each run also sees replay / (1 - replay) x as many source tokens")
    max_forgetting: float = Field(
        0.05, ge=0, description="nats of source-language loss rise (over the model as given) the recommended replay "
        "ratio may cost")
    target_loss: float | None = Field(
        None, gt=0, description="target-language loss the recommendation asks tokens for (null: the best any run of "
        "the chosen ratio reached)")

    @field_validator("target_tokens")
    @classmethod
    def _distinct_budgets(cls, v: list[float]) -> list[float]:
        return _distinct(v, "target_tokens", "; give >= 3 distinct budgets")


class SlurmConfig(_Model):
    """Cluster resources per training job, derived from each run's size and layout (see plan.py)."""

    partition: str | None = None
    account: str | None = None
    gpus: bool = Field(True, description="request GPUs (TP x PP x DP per run); false on CPU-only clusters")
    gpus_per_node: int = Field(8, ge=1, description="GPUs per node; a run with more (TP x PP x DP) spans "
                               "ceil(world / gpus_per_node) nodes, the same number of ranks on each")
    cpu_ranks_per_node: int | None = Field(
        None, ge=1, description="CPU-only clusters: most ranks of a run on one node (more span several nodes); "
        "none: every run on one node")
    cpus_per_gpu: int = Field(8, ge=1, description="CPU cores per GPU (data loading, launcher)")
    threads_per_rank: int = Field(1, ge=1, description="CPU-only runs: cores (torch threads) per process")
    mem_gb_per_gpu: int = Field(64, ge=1)
    gpu_peak_flops: float = Field(989e12, gt=0, description="bf16 dense peak per GPU (H100: 989 TFLOP/s)")
    assumed_mfu: float = Field(0.3, gt=0, le=1, description="for runtime estimates")
    cpu_flops_per_core: float = Field(
        2e10, gt=0, description="CPU-only runs: sustained 6ND FLOP/s per core (measured ~5e10 on tiny models)")
    runtime_overhead_minutes: int = Field(10, ge=0, description="added to each estimate (start-up, evals, saves)")
    min_runtime_minutes: int = Field(5, ge=1, description="floor of a training job's time limit (attempt 1)")


class StudyConfig(_Model):
    #: the source_model as read by validation (cptscale.source_model.SourceModel: embedding rows, tied
    #: embeddings, biases); not part of the config or its hash, None when the config was built otherwise
    _source_model: Any = PrivateAttr(default=None)

    study: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="name; outputs go to <results_dir>/<study>/")
    description: str = ""
    results_dir: str = Field("results", description="root of all outputs (git-ignored)")
    seed: int = 1234
    languages: Languages
    corpora: dict[LangCode, list[dict[str, Any]]] = Field(description="corpus sources per language code")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    ladder: LadderConfig | None = Field(
        None, description="model sizes of a scratch study (required unless source_model is given; with it the "
        "ladder is the model's own shape)", json_schema_extra=_no_schema_default)
    source_model: SourceModelConfig | None = Field(
        None, exclude_if=lambda v: v is None, description="CPT of an existing model: the model and the target-token "
        "budgets to sweep (instead of a scratch source ladder)", json_schema_extra=_no_schema_default)
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
    simulate: SimulateConfig | None = Field(None, exclude_if=lambda v: v is None,
                                            description="train.backend: simulate: the law file and noise seed",
                                            json_schema_extra=_no_schema_default)
    report: ReportConfig = Field(default_factory=ReportConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _ladder_or_source_model(self) -> StudyConfig:
        if self.ladder is None and self.source_model is None:
            raise ValueError("ladder: missing; a scratch study needs ladder.sizes, or name source_model: {path: "
                             "<model dir>, target_tokens: [...]} to study CPT of an existing model")
        if self.source_model is not None and self.cpt.unseen_tokens != "keep":
            raise ValueError("cpt.unseen_tokens: 'mean' needs the source model's training data to know which tokens "
                             "it saw; an imported source_model's is unknown: set cpt.unseen_tokens: keep")
        return self

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


def json_schema() -> dict[str, Any]:
    """The JSON schema Snakemake validates ``config`` with (generated; see workflow/schemas/)."""
    schema = StudyConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = "cptscale study config (generated from cptscale.config.StudyConfig; do not edit)"
    return schema


SCHEMA_PATH = Path("workflow/schemas/config.schema.json")
