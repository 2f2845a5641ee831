"""``run.json``: the typed, versioned contract between the planner and everything that runs or reads a run.

The planner (:func:`cptscale.plan.run_spec`) builds a :class:`RunSpec`; ``run.json`` is its dump; the trainer,
the evaluator, the store and the synthetic-study generator load it through :meth:`RunSpec.load` /
:meth:`RunSpec.parse`, which check every field (types, ranges, cross-field rules: batch divisibility,
layout against the shape, a CPT run's parent and its final loss, prune events) and raise one
:class:`SpecError` naming each bad field and the fix.

The dump keeps the key layout run.json always had (readers that still take a dict keep working); only
``spec_version`` is new. A run.json without it (written before versioning) is version 0, whose layout is
version 1's: it loads through :func:`_migrate`. A newer version than this code knows is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cptscale.schedule import DecayShape, Schedule, ScheduleKind

#: The run.json layout this code writes and reads; bump it (and add a step to ``_migrate``) when a key
#: changes meaning, moves or is added. 2: ``parent.unseen_tokens`` and ``parent.source_data`` (absent: keep).
SPEC_VERSION = 2

PosInt = Annotated[int, Field(ge=1, strict=True)]
NonNegInt = Annotated[int, Field(ge=0, strict=True)]


class SpecError(ValueError):
    """A bad run.json (the message names each bad field and the fix)."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShapeSpec(_Part):
    """The model shape the run builds (a pruned shape gives ``head_dim``; then hidden / heads need not hold)."""

    name: str | None = None
    hidden: PosInt
    layers: PosInt
    heads: PosInt
    ffn: PosInt
    kv_heads: int | None = None
    head_dim: PosInt | None = None

    @model_validator(mode="after")
    def _heads_divide(self) -> ShapeSpec:
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"shape.hidden {self.hidden} not divisible by shape.heads {self.heads}; fix the shape "
                             "(or give shape.head_dim for a pruned shape)")
        return self


class ScheduleSpec(_Part):
    """The LR schedule, field for field :class:`cptscale.schedule.Schedule`."""

    kind: ScheduleKind
    max_lr: float
    min_lr: float = 0.0
    warmup_steps: NonNegInt = 0
    total_steps: PosInt
    start_lr: float = 0.0
    decay_steps: int | None = 0
    decay_shape: DecayShape = "linear"
    branches: list[int] | None = None

    def make(self) -> Schedule:
        return Schedule(kind=self.kind, max_lr=float(self.max_lr), min_lr=float(self.min_lr),
                        warmup_steps=self.warmup_steps, total_steps=self.total_steps, start_lr=float(self.start_lr),
                        decay_steps=int(self.decay_steps or 0), decay_shape=self.decay_shape,
                        branches=tuple(self.branches or ()))

    @classmethod
    def of(cls, s: Schedule) -> ScheduleSpec:
        from dataclasses import asdict

        return cls.model_validate({**asdict(s), "branches": list(s.branches)})


class OptimizerSpec(_Part):
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float


class LayoutSpec(_Part):
    """Parallel layout: tensor, pipeline and data parallel sizes (world = tp x pp x dp)."""

    tp: PosInt
    pp: PosInt
    dp: PosInt

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


class SingleData(_Part):
    """One indexed dataset, read in order (tests and single-language runs without a planned blend)."""

    kind: Literal["single"]
    prefix: str


class BlendData(BaseModel):
    """A planned blend (:func:`cptscale.mix.plan_blend`): phases of weighted sources, with the totals and
    the build parameters the trainer checks against its own."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["blend"]
    phases: list[dict[str, Any]]
    target: str | None = None
    source: str | None = None
    replay: float | None = None
    switch_steps: list[int] | None = None
    totals: dict[str, dict[str, Any]] | None = None
    warnings: list[str] | None = None
    seq_length: int | None = None
    global_batch_size: int | None = None
    steps: int | None = None
    seed: int | None = None
    cache_dir: str | None = None
    max_epochs: float | None = None
    allow_repetition: bool | None = None


DataSpec = Annotated[SingleData | BlendData, Field(discriminator="kind")]


class EvalLang(_Part):
    prefix: str
    bytes: int | None = None


class EvalSpec(_Part):
    """When and on what the trainer evaluates: steps (after s optimizer steps) and validation sets per language."""

    steps: list[NonNegInt] = []
    languages: dict[str, EvalLang] = {}
    micro_batch_size: PosInt = 8
    max_tokens: PosInt | None = None


class CheckpointSpec(_Part):
    dir: str
    every: NonNegInt | None = None  #: 0: only the final checkpoint
    keep: NonNegInt | None = None


class ParentSpec(_Part):
    """A CPT run's source model: its final checkpoint and the final loss the init-sanity gate compares with."""

    run_id: str | None = None
    checkpoint: str
    lang: str | None = None
    final_loss: float | None = None
    tolerance: float | None = None
    #: "mean": after the gate, rows of token ids absent from ``source_data`` (the indexed datasets the source
    #: model trained on) start at the mean of the seen rows (cptscale.train.vocab_init); absent: "keep"
    unseen_tokens: Literal["keep", "mean"] = "keep"
    source_data: list[str] = []

    @model_validator(mode="after")
    def _source_data_for_mean(self) -> ParentSpec:
        if self.unseen_tokens == "mean" and not self.source_data:
            raise ValueError("parent.unseen_tokens 'mean' needs parent.source_data: the indexed-dataset prefixes the "
                             "source model trained on (the planner writes them; or set unseen_tokens to 'keep')")
        return self


class ResourcesSpec(_Part):
    gpus: NonNegInt  #: all the run's GPUs
    cpus: PosInt  #: per node
    nodes: PosInt = 1  #: nodes the run spans (one torchrun agent each; cptscale.cluster)
    runtime_minutes: PosInt
    mem_gb: PosInt
    gpu_peak_flops: float | None = None


class PruneEvent(_Part):
    step: NonNegInt
    shape: dict[str, Any]


class PruneSpec(_Part):
    """Structured pruning events (IPLT arms): each prunes at the start of its step to its shape
    (see :mod:`cptscale.prune` for what may change)."""

    importance: Literal["activation", "weight"] = "activation"
    calib_batches: PosInt | None = None
    events: Annotated[list[PruneEvent], Field(min_length=1)]


class WandbSpec(_Part):
    project: str = Field(min_length=1)
    mode: Literal["offline", "online"] = "offline"


class LoggingSpec(_Part):
    """Experiment tracking (the study config's ``logging``; see :mod:`cptscale.train.tracking`)."""

    tensorboard: bool = True
    wandb: WandbSpec | None = None


class SimulateSpec(_Part):
    """train.backend: simulate: the run's outputs come from a law file (cptscale.simulate), nothing is trained."""

    backend: Literal["simulate"] = "simulate"
    truth: str | None = None  #: law file; None: cptscale.simulate.default_truth()
    truth_hash: str | None = None
    seed: NonNegInt = 0
    languages: list[str] = []
    source: str | None = None
    targets: list[str] = []
    param_count: Literal["total", "nonembedding"] = "total"


class RunSpec(_Part):
    """One run, completely: what the trainer needs and nothing it must guess."""

    spec_version: int = SPEC_VERSION
    run_id: str
    study: str | None = None
    size: str
    init: Literal["scratch", "cpt"]
    lang: str | None = None
    source_lang: str | None = None
    replay: float = 0.0
    variant: str | None = None
    shape: ShapeSpec
    vocab_size: PosInt
    params: int | None = None
    params_nonemb: int | None = None
    tokens: int | None = None
    seq_length: PosInt
    micro_batch_size: PosInt
    global_batch_size: PosInt
    steps: PosInt
    seed: NonNegInt
    schedule: ScheduleSpec
    optimizer: OptimizerSpec
    init_std: float = 0.02
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    distributed_optimizer: bool = True
    layout: LayoutSpec
    data: DataSpec
    tokenizer: str | None = None
    eval: EvalSpec
    checkpoint: CheckpointSpec
    parent: ParentSpec | None = None
    out_dir: str
    loss_spike_factor: float | None = None
    resources: ResourcesSpec | None = None
    config_hash: str | None = None
    provenance: dict[str, Any] | None = None
    prune: PruneSpec | None = None
    iplt: dict[str, Any] | None = None  #: an IPLT arm's panel, budget and FLOPs (cptscale.iplt.spec_extras)
    suggestion: dict[str, Any] | None = None  #: the fit's suggested next run (cptscale.nextrun)
    #: an imported model's architecture (RoPE, norm eps, QKV bias, ...; see cptscale.train.model.resolve_arch)
    arch: dict[str, Any] | None = None
    logging: LoggingSpec | None = None  #: absent: TensorBoard on, no W&B
    simulate: SimulateSpec | None = None  #: train.backend: simulate (cptscale.simulate.backend)

    # -- cross-field rules (messages name the fields and the fix) --------------------------------
    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        sh, lay = self.shape, self.layout
        if sh.heads % lay.tp:
            raise ValueError(f"shape.heads {sh.heads} not divisible by layout.tp {lay.tp}; choose another tp")
        if sh.layers % lay.pp:
            raise ValueError(f"shape.layers {sh.layers} not divisible by layout.pp {lay.pp}; choose another pp")
        mb, gb = self.micro_batch_size, self.global_batch_size
        if gb % (mb * lay.dp):
            raise ValueError(f"global_batch_size {gb} is not a multiple of micro_batch_size {mb} x layout.dp "
                             f"{lay.dp}; fix the batch sizes")
        try:
            self.schedule.make()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad field 'schedule': {exc}") from None
        if self.init == "cpt":
            self._check_parent()
        if self.arch is not None:
            from cptscale.train.model import resolve_arch

            try:
                resolve_arch(self.arch)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"bad field 'arch': {exc}") from None
        if self.prune is not None:
            self._check_prune()
        return self

    def _check_parent(self) -> None:
        """The init-sanity gate compares against ``parent.final_loss``: without a finite number there it
        would pass silently, so such a CPT spec is refused."""
        if self.parent is None:
            raise ValueError("init 'cpt' needs parent.checkpoint (the source run's final checkpoint)")
        v = self.parent.final_loss
        if v is None or not math.isfinite(v):
            lang = self.parent.lang or self.source_lang
            raise ValueError(
                f"parent.final_loss is {v!r}, so the init-sanity gate has nothing to compare with: the source run "
                f"{self.parent.run_id!r} must have recorded its final {lang} validation loss in "
                f"{self.parent_done_path()} (final_loss.{lang}); finish (or re-run) that run, then regenerate this "
                "run.json with `cptscale plan CONFIG --run RUN_ID --out run.json` (or set parent.final_loss by hand)")

    def _check_prune(self) -> None:
        from cptscale.prune import PrunedShape, PruneError, resolve_target

        lay, pr = self.layout, self.prune
        assert pr is not None
        if lay.tp != 1 or lay.pp != 1:
            raise ValueError(f"prune needs layout.tp = layout.pp = 1 (got tp={lay.tp}, pp={lay.pp}); structured "
                             "pruning is implemented for unsharded models (data parallelism is fine)")
        if self.schedule.branches:
            raise ValueError("schedule.branches (WSD decay branches) cannot be combined with prune; drop one of "
                             "them (train.wsd_branches in the study config)")
        try:
            cur = PrunedShape.from_dict(self.shape.model_dump())
        except (PruneError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"shape: {exc}") from None
        last = -1
        for i, ev in enumerate(pr.events):
            at = f"prune.events[{i}]"
            if not last < ev.step < self.steps:
                raise ValueError(f"{at}.step must be an integer in [{last + 1}, steps={self.steps}) (events in "
                                 f"increasing step order), got {ev.step!r}")
            last = ev.step
            try:
                cur = resolve_target(cur, ev.shape)
            except (PruneError, TypeError, ValueError) as exc:
                raise ValueError(f"{at}.shape: {exc}") from None

    # -- reading and writing -------------------------------------------------------------------
    @classmethod
    def parse(cls, data: Any, where: str = "run.json") -> RunSpec:
        """A validated spec from run.json's content (older versions migrated); SpecError names every bad field."""
        if isinstance(data, RunSpec):
            return data
        if not isinstance(data, dict):
            raise SpecError(f"{where}: top level must be a JSON object")
        try:
            return cls.model_validate(_migrate(data, where))
        except ValidationError as exc:
            raise SpecError(f"{where}: " + "; ".join(_problem(e) for e in exc.errors())) from None

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        from cptscale.util import load_json_file

        return cls.parse(load_json_file(path, SpecError, "spec file"), str(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        """run.json's content: the fields that were given (defaults are not written out, so a spec reads
        back exactly as it was written)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, path: str | Path) -> Path:
        from cptscale.util import write_json

        return write_json(path, self.to_dict())

    def train_prefixes(self) -> list[str]:
        """The indexed datasets this run trains on: the single prefix, or every blend phase's sources."""
        if isinstance(self.data, SingleData):
            return [self.data.prefix]
        return sorted({str(src["prefix"]) for ph in self.data.phases for src in ph.get("sources", [])})

    def parent_done_path(self) -> Path:
        """Where the source run's done.json is in the planner's layout (run dirs side by side:
        ``<out_dir>/../<parent.run_id>/done.json``)."""
        rid = self.parent.run_id if self.parent is not None else None
        return Path(self.out_dir).parent / str(rid) / "done.json"


def _migrate(data: dict[str, Any], where: str) -> dict[str, Any]:
    """run.json content of any known version as the current version's (version 0, no ``spec_version``,
    has the same layout as version 1; version 1 is version 2 without the optional ``parent.unseen_tokens`` /
    ``parent.source_data``, whose absence means keep)."""
    version = data.get("spec_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise SpecError(f"{where}: spec_version must be a non-negative integer, got {version!r}")
    if version > SPEC_VERSION:
        raise SpecError(f"{where}: spec_version {version} is newer than this cptscale reads (up to {SPEC_VERSION}); "
                        "upgrade cptscale or regenerate the spec with `cptscale plan CONFIG --run RUN_ID`")
    if version < SPEC_VERSION:
        data = {**data, "spec_version": SPEC_VERSION}
    return data


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("single", "blend"):  # the data union's tag is not a field
            out += f".{part}" if out else str(part)
    return out


def _problem(err: Any) -> str:
    """One pydantic error as a line naming the field, what is allowed and the value found."""
    path, kind, ctx = _path(err["loc"]), err["type"], err.get("ctx") or {}
    got = err.get("input")
    if kind == "missing":
        return f"missing field {path!r}"
    if kind == "extra_forbidden":
        return f"unknown field {path!r}; remove it"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return f"{path}: {msg}" if path else msg
    if kind == "union_tag_invalid":
        return f"{path}.kind must be 'single' or 'blend', got {ctx.get('tag')!r}"
    if kind == "union_tag_not_found":
        return f"{path}.kind must be 'single' or 'blend'"
    if kind == "literal_error":
        return f"field {path!r} must be {ctx.get('expected')}, got {got!r}"
    if kind in ("greater_than_equal", "int_type", "int_parsing", "int_from_float"):
        lo = ctx.get("ge")
        return f"field {path!r} must be an integer{f' >= {lo}' if lo is not None else ''}, got {got!r}"
    return f"field {path!r}: {err['msg']}, got {got!r}"


__all__ = ["SPEC_VERSION", "BlendData", "CheckpointSpec", "EvalLang", "EvalSpec", "LayoutSpec", "OptimizerSpec",
           "ParentSpec", "PruneEvent", "PruneSpec", "ResourcesSpec", "RunSpec", "ScheduleSpec", "ShapeSpec",
           "SingleData", "SpecError"]


def load_spec(path: str | Path) -> RunSpec:
    """:meth:`RunSpec.load` for a command: a bad run.json is a :class:`~cptscale.errors.CLIError` (printed
    without a traceback, exit status 2) naming the file, each bad field and the fix."""
    from cptscale.errors import CLIError

    try:
        return RunSpec.load(path)
    except SpecError as exc:
        raise CLIError(str(exc)) from None
