"""Corpus mixing with replay: planned blends, phased schedules and their realization.

A run's training data is a list of *phases*; each phase blends sources (a language's train split, or a
``lang/corpus`` split) with token fractions. Sampling is Megatron-Core's: every source is one
``GPTDataset`` built by ``BlendedMegatronDatasetBuilder`` and every phase is one ``BlendedDataset``
over views of those sources (its blending index comes from Megatron's ``helpers.build_blending_indices``).
Phases are composed on top: phase k covers global samples ``[start_step*GBS, end_step*GBS)`` and a
source's view in phase k starts where phase k-1 stopped reading it, so a second phase continues
through the source's shuffled order instead of re-serving the documents of the first (which is what
one builder call per phase would do: every call restarts each source's shuffle at sample 0).

Megatron's blend weights are per-*sample* weights. Every GPT sample holds exactly ``seq_length``
training tokens (packed across document boundaries), so sample fractions *are* token fractions and
a token-fraction blend is passed to Megatron unchanged.

Heavy imports (torch, Megatron-Core) stay inside functions so ``cptscale --help`` stays fast.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cptscale.schedule import Schedule, first_step_at_or_below

__all__ = [
    "BlendError",
    "MixConfig",
    "MixPhase",
    "PhaseEnd",
    "PhasedBlendDataset",
    "build_training_dataset",
    "format_plan_table",
    "plan_blend",
    "realize",
]


#: Tolerance on "weights sum to 1" (YAML decimals such as 0.7 + 0.2 + 0.1 are not exact).
WEIGHT_SUM_TOL = 1e-6


class BlendError(ValueError):
    """A blend that cannot be met (no data, too little data without repetition, bad weights, ...).

    ``path`` is the config field at fault (e.g. ``mix.phases.0.end``) when there is one; ``detail`` is
    the message without it. ``problems`` lists (path, detail) of every problem found (the first one
    is this error's own)."""

    def __init__(self, detail: str, path: str | None = None,
                 more: list[tuple[str | None, str]] | None = None) -> None:
        self.detail = detail
        self.path = path
        self.problems: list[tuple[str | None, str]] = [(path, detail), *(more or [])]
        lines = [f"{p}: {d}" if p else d for p, d in self.problems]
        super().__init__("\n".join(lines))


class PhaseEnd(BaseModel):
    """Where a phase ends: exactly one of a step, a fraction of the run, or an LR threshold."""

    model_config = ConfigDict(extra="forbid")

    step: int | None = Field(None, ge=1, description="ends after this many optimizer steps")
    run_fraction: float | None = Field(None, gt=0.0, lt=1.0, description="ends at this fraction of the run's steps")
    lr_fraction: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="ends at the first step whose LR <= lr_fraction * max_lr (Reuse, Don't Retrain: 0.2)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> PhaseEnd:
        given = [k for k in ("step", "run_fraction", "lr_fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a phase end needs exactly one of step, run_fraction, lr_fraction (got {given or 'none'})")
        return self


class MixPhase(BaseModel):
    """One phase of a blend: token fractions per source, and where it ends."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] | None = Field(
        None,
        description='token fractions per "target", "source", language code or "lang/corpus", summing to 1; '
        "None = the replay blend {target: 1 - r, source: r}",
    )
    end: PhaseEnd | None = Field(None, description="required on every phase but the last")

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is None:
            return weights
        if not weights:
            raise ValueError("weights must name at least one source (or be omitted for the replay blend)")
        bad = {k: v for k, v in weights.items() if not (v >= 0.0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"weights must be finite and >= 0, got {bad}")
        total = sum(weights.values())
        if abs(total - 1.0) > WEIGHT_SUM_TOL:
            raise ValueError(f"weights are token fractions and must sum to 1, got {total:g} ({weights})")
        return weights


class MixConfig(BaseModel):
    """The ``mix:`` section of the study YAML."""

    model_config = ConfigDict(extra="forbid")

    phases: list[MixPhase] = Field(default_factory=list, description="empty = one phase, the replay blend")
    max_epochs: float = Field(4.0, gt=0.0, description="warn when a source is repeated more than this")
    allow_repetition: bool = Field(True, description="False: refuse a blend that needs more than one epoch of a source")

    @field_validator("phases")
    @classmethod
    def _check_ends(cls, phases: list[MixPhase]) -> list[MixPhase]:
        for i, ph in enumerate(phases[:-1]):
            if ph.end is None:
                raise ValueError(f"phase {i} needs an `end` (only the last phase runs to the end of the run)")
        if phases and phases[-1].end is not None:
            raise ValueError(f"the last phase (phase {len(phases) - 1}) runs to the end of the run: remove its `end`")
        return phases


def _resolve_weights(weights: dict[str, float] | None, *, replay: float, target: str, source: str,
                     train_prefixes: dict[str, str], where: str) -> dict[str, float]:
    """Phase weights keyed by source name (a key of ``train_prefixes``); zero weights dropped.

    Keys: ``target``, ``source``, a language code (its train split) or ``<lang>/<corpus>`` (the train
    split of one configured corpus of that language)."""
    raw = weights if weights is not None else {"target": 1.0 - replay, "source": replay}
    out: dict[str, float] = {}
    langs = sorted(k for k in train_prefixes if "/" not in k)
    bad: list[tuple[str | None, str]] = []
    for key, w in raw.items():
        name = {"target": target, "source": source}.get(key, key)
        if name not in train_prefixes:
            lang, sep, corpus = key.partition("/")
            if sep and lang in langs:
                valid = sorted(k.split("/", 1)[1] for k in train_prefixes if k.startswith(f"{lang}/"))
                bad.append((f"{where}.weights.{key}", f"{corpus!r} is not a corpus of {lang!r}; allowed: "
                            f"{', '.join(valid) or 'none'} (the names under corpora.{lang}), as {lang}/<name>"))
            else:
                known = ", ".join(["target", "source", *langs, "<lang>/<corpus>"])
                bad.append((f"{where}.weights.{key}", f"unknown blend key {key!r}; allowed: {known}"))
            continue
        out[name] = out.get(name, 0.0) + float(w)
    if bad:
        raise BlendError(bad[0][1], bad[0][0], bad[1:])
    return {k: v for k, v in out.items() if v > 0.0}


def _phase_ends(mix: MixConfig, schedule: Schedule, steps: int, where: str = "mix") -> list[int]:
    """Exact end step of every phase (the last ends at ``steps``); errors for switches never reached."""
    ends: list[int] = []
    for i, ph in enumerate(mix.phases[:-1]):
        e = ph.end
        assert e is not None
        if e.step is not None:
            end, what = e.step, "the switch is"
        elif e.run_fraction is not None:
            end, what = round(e.run_fraction * steps), f"run_fraction {e.run_fraction:g} puts the switch"
        else:
            assert e.lr_fraction is not None
            what = f"lr_fraction {e.lr_fraction:g} (LR <= {e.lr_fraction * schedule.max_lr:g}) puts the switch"
            try:
                end = first_step_at_or_below(schedule, e.lr_fraction * schedule.max_lr)
            except ValueError as exc:
                raise BlendError(f"the switch is never reached: {exc}", f"{where}.phases.{i}.end") from None
        prev = ends[-1] if ends else 0
        if not prev < end < steps:
            room = (f"i.e. in [{prev + 1}, {steps - 1}]" if prev + 1 <= steps - 1
                    else f"but this run has no step left for phase {i + 1}")
            raise BlendError(
                f"{what} at step {end}; it must fall strictly between the previous switch (step {prev}) and the "
                f"end of the run (step {steps}), {room}; otherwise a phase is empty or never reached",
                f"{where}.phases.{i}.end")
        ends.append(end)
    ends.append(steps)
    return ends


def _blend_phases(mix: MixConfig, *, replay: float, target: str, source: str, train_prefixes: dict[str, str],
                  schedule: Schedule, steps: int, where: str) -> tuple[list[dict[str, float]], list[int]]:
    """Each phase's resolved source weights and its end step; every key and switch problem of the blend is
    collected before the first is raised."""
    errors: list[BlendError] = []
    weights: list[dict[str, float]] = []
    for i, ph in enumerate(mix.phases or [MixPhase()]):
        try:
            weights.append(_resolve_weights(ph.weights, replay=replay, target=target, source=source,
                                            train_prefixes=train_prefixes, where=f"{where}.phases.{i}"))
        except BlendError as exc:
            errors.append(exc)
    try:
        ends = _phase_ends(mix, schedule, steps, where) if mix.phases else [steps]
    except BlendError as exc:
        errors.append(exc)
    if errors:
        raise BlendError(errors[0].detail, errors[0].path, [q for exc in errors for q in exc.problems][1:])
    return weights, ends


def _phase_sources(i: int, w: dict[str, float], n: int, *, target: str, train_prefixes: dict[str, str],
                   train_tokens: dict[str, int], seq_length: int,
                   train_hashes: dict[str, dict[str, str]] | None) -> list[dict[str, Any]]:
    """Phase ``i``'s sources (target first) with their planned samples and tokens of its ``n`` samples; a
    source without training tokens is an error naming the fix."""
    srcs = []
    for name, weight in sorted(w.items(), key=lambda kv: (kv[0] != target, kv[0])):
        avail = int(train_tokens.get(name, 0) or 0)
        if avail <= 0:
            role = "target language" if name == target else "source"
            hint = "run the data stage or drop it from the blend"
            if "/" in name:
                lang, corpus = name.split("/", 1)
                hint = (f"the data manifest of {lang!r} has no train_corpora entry {corpus!r}: the data stage "
                        f"writes per-corpus splits with `cptscale data index --split-corpora {corpus}`")
            raise BlendError(f"{role} {name!r} has no training tokens (train_tokens = {avail}) but phase {i} "
                             f"gives it weight {weight:g}; {hint}")
        tokens = round(weight * n * seq_length)
        src = {"name": name, "prefix": str(train_prefixes[name]), "weight": weight,
               "available_tokens": avail, "planned_samples": round(weight * n), "planned_tokens": tokens}
        src.update({k: v for k, v in ((train_hashes or {}).get(name) or {}).items()
                    if k in ("bin_hash", "idx_hash") and v})
        srcs.append(src)
    return srcs


def _blend_totals(phases: list[dict[str, Any]], train_tokens: dict[str, int],
                  mix: MixConfig) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each source's planned tokens over all phases against what exists (epochs): repetition beyond one
    epoch without mix.allow_repetition is an error; beyond mix.max_epochs, a warning (returned)."""
    demand: dict[str, int] = {}
    for ph in phases:
        for s in ph["sources"]:
            demand[s["name"]] = demand.get(s["name"], 0) + s["planned_tokens"]
    totals: dict[str, dict[str, Any]] = {}
    found: list[str] = []
    for name, tokens in demand.items():
        avail = int(train_tokens[name])
        epochs = tokens / avail
        totals[name] = {"planned_tokens": tokens, "available_tokens": avail, "epochs": epochs}
        if epochs > 1.0 and not mix.allow_repetition:
            raise BlendError(
                f"the blend needs {tokens:,} tokens of {name!r} but only {avail:,} exist ({epochs:.2f} epochs) and "
                "mix.allow_repetition is false; lower its share, shorten the run or allow repetition"
            )
        if epochs > mix.max_epochs:
            found.append(f"{name!r} is repeated {epochs:.2f} epochs (> mix.max_epochs = {mix.max_epochs:g})")
    return totals, found


def plan_blend(mix: MixConfig, *, replay: float, target: str, source: str, train_prefixes: dict[str, str],
               train_tokens: dict[str, int], schedule: Schedule, steps: int, global_batch_size: int,
               seq_length: int, seed: int, cache_dir: str, train_hashes: dict[str, dict[str, str]] | None = None,
               where: str = "mix") -> dict[str, Any]:
    """Resolve a run's blend into the JSON data spec the trainer and the report build from.

    Every check that depends only on the plan happens here (before anything trains): unknown keys,
    sources without tokens, repetition beyond one epoch when it is not allowed, switches that never
    happen. Raises :class:`BlendError` (a ``ValueError``) with a message naming the problem and, where
    there is one, the config field (``where`` is the mix section's path, e.g. ``variants.x.mix``).
    ``train_hashes`` (source -> ``{"bin_hash", "idx_hash"}`` from the data manifests) key the index cache
    by content.
    """
    if not 0.0 <= replay <= 1.0:
        raise BlendError(f"replay must be in [0, 1], got {replay}")
    if steps < 1 or global_batch_size < 1 or seq_length < 1:
        raise BlendError("steps, global_batch_size and seq_length must be >= 1")
    if target not in train_prefixes:
        raise BlendError(f"target language {target!r} has no training data (no train split planned for it)")
    weights, ends = _blend_phases(mix, replay=replay, target=target, source=source, train_prefixes=train_prefixes,
                                  schedule=schedule, steps=steps, where=where)
    phases: list[dict[str, Any]] = []
    start = 0
    for i, (w, end) in enumerate(zip(weights, ends, strict=True)):
        n = (end - start) * global_batch_size
        srcs = _phase_sources(i, w, n, target=target, train_prefixes=train_prefixes, train_tokens=train_tokens,
                              seq_length=seq_length, train_hashes=train_hashes)
        phases.append({"index": i, "start_step": start, "end_step": end, "samples": n, "sources": srcs})
        start = end
    totals, found = _blend_totals(phases, train_tokens, mix)
    for msg in found:
        warnings.warn(msg, stacklevel=2)
    return {
        "kind": "blend",
        "target": target,
        "source": source,
        "replay": replay,
        "phases": phases,
        "switch_steps": ends[:-1],
        "totals": totals,
        "warnings": found,
        "seq_length": seq_length,
        "global_batch_size": global_batch_size,
        "steps": steps,
        "seed": seed,
        "cache_dir": str(cache_dir),
        "max_epochs": mix.max_epochs,
        "allow_repetition": mix.allow_repetition,
    }


class _SourceView:
    """Samples ``[offset, offset + size)`` of one source's GPTDataset: where a phase reads that source.

    Duck-types what ``BlendedDataset`` needs from a MegatronDataset (length, items, ``index_split``,
    ``unique_identifiers`` for its cache key)."""

    def __init__(self, base: Any, offset: int) -> None:
        from collections import OrderedDict

        self.base = base
        self.offset = offset
        self.index_split = base.index_split
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("base", base.unique_identifiers), ("offset", offset)]
        )

    def __len__(self) -> int:
        return len(self.base) - self.offset

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.base[self.offset + int(i)]


class PhasedBlendDataset:
    """The training set: ``steps * GBS`` samples, global sample i consumed at step ``i // GBS``.

    Phase k is a Megatron ``BlendedDataset`` covering samples ``[start_step*GBS, end_step*GBS)``;
    items are GPTDataset dicts with ``dataset_id`` rewritten to the index in :attr:`source_names`."""

    def __init__(self, spec: dict[str, Any], sources: dict[str, Any], blends: list[Any],
                 source_ids: list[list[int]]) -> None:
        self.spec = spec
        self.sources = sources  # name -> GPTDataset (one per source, shared by all phases)
        self.source_names = list(sources)
        self.blends = blends  # one BlendedDataset per phase
        self.source_ids = source_ids  # per phase: local dataset id -> index into source_names
        gbs = spec["global_batch_size"]
        self.starts = [ph["start_step"] * gbs for ph in spec["phases"]]
        self.size = spec["steps"] * gbs

    def __len__(self) -> int:
        return self.size

    def phase_of(self, i: int) -> int:
        return bisect.bisect_right(self.starts, i) - 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range [0, {self.size})")
        k = self.phase_of(i)
        item = self.blends[k][i - self.starts[k]]
        item["dataset_id"] = self.source_ids[k][int(item["dataset_id"])]
        return item


def _megatron_tokenizer(tokenizer: Any) -> Any:
    """Our ``Tokenizer`` behind Megatron's interface (the trainer may pass either)."""
    if hasattr(tokenizer, "unique_identifiers"):
        return tokenizer
    from cptscale.data.tokenizer import MegatronTokenizerAdapter

    return MegatronTokenizerAdapter(tokenizer)


def _source_cache_dir(cache_dir: str, prefix: str, hashes: dict[str, str] | None = None) -> str:
    """Cache folder keyed by the source files' identity, so a rewritten corpus never meets a stale index
    (Megatron's own cache key covers the prefix, seed, lengths and tokenizer, not the data); the file
    name inside is Megatron's hash of the rest of the inputs.

    Identity = the content hashes of the data manifest (``bin_hash``/``idx_hash``, carried in the data
    spec) plus the file sizes, so a byte-identical rewrite keeps its cache; without hashes (a spec
    planned without manifests) it is size + modification time."""
    from cptscale.util import stable_hash

    ident: dict[str, Any] = {"prefix": os.path.abspath(prefix)}
    content = bool(hashes and hashes.get("bin_hash") and hashes.get("idx_hash"))
    if content:
        assert hashes is not None
        ident.update(bin_hash=hashes["bin_hash"], idx_hash=hashes["idx_hash"])
    for ext in (".idx", ".bin"):
        st = os.stat(prefix + ext)
        ident[ext] = [st.st_size] if content else [st.st_size, st.st_mtime_ns]
    return str(Path(cache_dir) / f"src-{stable_hash(ident)[:16]}")


#: In a cache folder: the exclusive lock of its writers, and the files every finished build left.
CACHE_LOCK, CACHE_COMPLETE = ".lock", ".complete.json"


@contextlib.contextmanager
def _cache_writer(path: str) -> Iterator[None]:
    """Make Megatron's index cache in ``path`` safe for concurrent runs and killed builds.

    Megatron writes its ``.npy`` index files in place (``numpy.save`` on the final names) and trusts any
    file it finds, so two runs building the same index at once, or a build killed half-way, would leave
    files another run reads as complete. Writers (every process of a single-process run, rank 0 of a
    distributed one; Megatron makes the other ranks load after rank 0 built) hold an exclusive ``flock``
    on ``path/.lock`` while they build; before building they delete files that no finished build listed
    in ``.complete.json`` (remains of a killed writer), and after a successful build they list every file
    there (written atomically). Readers of other ranks only load after their rank 0 built."""

    import torch

    os.makedirs(path, exist_ok=True)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        yield
        return
    from cptscale.util import file_lock, read_json, write_json

    done_path = os.path.join(path, CACHE_COMPLETE)
    with file_lock(os.path.join(path, CACHE_LOCK)):
        done = set(read_json(done_path)) if os.path.isfile(done_path) else set()
        for name in os.listdir(path):
            if not name.startswith(".") and name not in done and os.path.isfile(os.path.join(path, name)):
                os.unlink(os.path.join(path, name))
        yield
        files = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
        if set(files) != done:
            write_json(done_path, files)


@contextlib.contextmanager
def _quiet_megatron() -> Iterator[None]:
    """Megatron logs every index build at INFO/WARNING; keep job logs readable."""
    lg = logging.getLogger("megatron.core.datasets")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def _gpt_config(tok: Any, seq_length: int, seed: int, prefix: str | None, path_to_cache: str | None) -> Any:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None) if prefix else None,
        split="1,0,0",
        path_to_cache=path_to_cache,
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model builds its causal mask; a [1,S,S] mask per sample is waste
        mid_level_dataset_surplus=0.0,
    )


def _checked_spec(data_spec: dict[str, Any], seq_length: int, global_batch_size: int, steps: int,
                  seed: int) -> dict[str, Any]:
    """The data spec completed with the build's numbers; a spec planned with other numbers, or whose phases do
    not cover the run, is an error."""
    if data_spec.get("kind") != "blend":
        raise BlendError(f"data spec kind must be 'blend', got {data_spec.get('kind')!r}")
    for key, val in (("seq_length", seq_length), ("global_batch_size", global_batch_size), ("steps", steps),
                     ("seed", seed)):
        if key in data_spec and data_spec[key] != val:
            raise BlendError(f"data spec was planned with {key} = {data_spec[key]}, asked to build with {val}")
    spec = {**data_spec, "seq_length": seq_length, "global_batch_size": global_batch_size, "steps": steps,
            "seed": seed}
    if not spec["phases"] or spec["phases"][0]["start_step"] != 0 or spec["phases"][-1]["end_step"] != steps:
        raise BlendError("data spec phases must cover steps [0, steps)")
    return spec


def _source_datasets(spec: dict[str, Any], tok: Any, cache: str) -> dict[str, Any]:
    """One GPTDataset per source with the samples every phase draws from it (the blending index draws within
    +-1 of weight * n per phase), its index cache keyed by the source's content hashes."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    need: dict[str, int] = {}
    prefixes: dict[str, str] = {}
    for ph in spec["phases"]:
        n = (ph["end_step"] - ph["start_step"]) * spec["global_batch_size"]
        for s in ph["sources"]:
            need[s["name"]] = need.get(s["name"], 0) + math.ceil(s["weight"] * n) + 2
            prefixes[s["name"]] = s["prefix"]
    sources: dict[str, Any] = {}
    for name, prefix in prefixes.items():
        if not (Path(prefix + ".idx").is_file() and Path(prefix + ".bin").is_file()):
            raise BlendError(f"source {name!r}: indexed dataset {prefix}.bin/.idx not found (run the data stage)")
        hashes = next((s for ph in spec["phases"] for s in ph["sources"] if s["name"] == name), {})
        src_cache = _source_cache_dir(cache, prefix, hashes)
        cfg = _gpt_config(tok, spec["seq_length"], spec["seed"], prefix, src_cache)
        with _cache_writer(src_cache):
            ds = BlendedMegatronDatasetBuilder(GPTDataset, [need[name], None, None], lambda: True, cfg).build()[0]
        if ds is None:  # not built on this rank: every rank reads data in this project
            raise BlendError(f"source {name!r}: Megatron built no dataset on this rank")
        sources[name] = ds
    return sources


def _phase_blends(spec: dict[str, Any], sources: dict[str, Any], tok: Any,
                  cache: str) -> tuple[list[Any], list[list[int]]]:
    """One BlendedDataset per phase over views of the sources that start where earlier phases stopped, and
    each phase's source indices (into ``sources``)."""
    import numpy as np
    import torch
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    # Megatron's BlendedDataset caches through torch.distributed.get_rank(), which fails without a
    # process group; a single process skips its (millisecond) blending-index cache instead.
    blend_cache = str(Path(cache) / "blends") if torch.distributed.is_initialized() else None
    bcfg = _gpt_config(tok, spec["seq_length"], spec["seed"], None, blend_cache)
    names = list(sources)
    offsets = dict.fromkeys(names, 0)
    blends, ids = [], []
    with _cache_writer(blend_cache) if blend_cache else contextlib.nullcontext():
        for ph in spec["phases"]:
            n = (ph["end_step"] - ph["start_step"]) * spec["global_batch_size"]
            srcs = ph["sources"]
            views = [_SourceView(sources[s["name"]], offsets[s["name"]]) for s in srcs]
            weights = [float(s["weight"]) for s in srcs]
            bd = BlendedMegatronDatasetBuilder.build_generic_dataset(
                BlendedDataset, lambda: True, True, views, weights, n, bcfg)
            counts = np.bincount(np.asarray(bd.dataset_index), minlength=len(srcs))
            for s, c in zip(srcs, counts, strict=True):
                offsets[s["name"]] += int(c)
            blends.append(bd)
            ids.append([names.index(s["name"]) for s in srcs])
    return blends, ids


def build_training_dataset(data_spec: dict[str, Any], tokenizer: Any, seq_length: int, global_batch_size: int,
                           steps: int, seed: int, cache_dir: str) -> PhasedBlendDataset:
    """Build the deterministic training set described by a data spec from :func:`plan_blend`.

    Per source, one ``GPTDataset`` (via ``BlendedMegatronDatasetBuilder``) with enough samples for all
    phases; per phase, one ``BlendedDataset`` over views of them starting where earlier phases stopped.
    Index caches go to ``data_spec["cache_dir"]`` (shared by the report and the trainer, so the report
    builds them once) and fall back to ``cache_dir``.
    """
    spec = _checked_spec(data_spec, seq_length, global_batch_size, steps, seed)
    cache = str(data_spec.get("cache_dir") or cache_dir)
    tok = _megatron_tokenizer(tokenizer)
    with _quiet_megatron():
        sources = _source_datasets(spec, tok, cache)
        blends, ids = _phase_blends(spec, sources, tok, cache)
    return PhasedBlendDataset(spec, sources, blends, ids)


def realize(data_spec: dict[str, Any], tokenizer: Any, *, seq_length: int | None = None,
            global_batch_size: int | None = None, steps: int | None = None, seed: int | None = None,
            cache_dir: str | None = None, dataset: PhasedBlendDataset | None = None) -> dict[str, Any]:
    """The realization report: what the training set built from ``data_spec`` actually draws.

    Counts come from the same objects the trainer reads (each phase's ``BlendedDataset.dataset_index``);
    available tokens come from the indexed datasets themselves, not from the plan."""
    import numpy as np

    seq_length = seq_length or data_spec["seq_length"]
    gbs = global_batch_size or data_spec["global_batch_size"]
    steps = steps or data_spec["steps"]
    seed = data_spec["seed"] if seed is None else seed
    ds = dataset or build_training_dataset(data_spec, tokenizer, seq_length, gbs, steps, seed,
                                           cache_dir or data_spec.get("cache_dir") or "results/cache/blend-index")
    max_epochs = float(data_spec.get("max_epochs", 4.0))
    avail = {name: int(np.asarray(src.dataset.sequence_lengths, dtype=np.int64).sum())
             for name, src in ds.sources.items()}
    drawn = dict.fromkeys(avail, 0)
    phases = []
    for k, (ph, bd) in enumerate(zip(ds.spec["phases"], ds.blends, strict=True)):
        idx = np.asarray(bd.dataset_index)
        n = len(idx)
        counts = np.bincount(idx, minlength=len(ph["sources"]))
        rows = []
        for s, c in zip(ph["sources"], counts, strict=True):
            tokens = int(c) * seq_length
            drawn[s["name"]] += tokens
            rows.append({"name": s["name"], "prefix": s["prefix"], "planned_share": float(s["weight"]),
                         "realized_share": int(c) / n if n else 0.0, "samples": int(c), "tokens": tokens,
                         "planned_tokens": round(float(s["weight"]) * n * seq_length),
                         "available_tokens": avail[s["name"]], "epochs": tokens / avail[s["name"]],
                         "cumulative_epochs": drawn[s["name"]] / avail[s["name"]]})
        phases.append({"index": k, "name": f"phase{k}", "start_step": ph["start_step"],
                       "end_step": ph["end_step"], "samples": n, "sources": rows})
    totals = {name: {"tokens": drawn[name], "available_tokens": avail[name], "epochs": drawn[name] / avail[name]}
              for name in avail}
    warn = [f"{name!r} is repeated {t['epochs']:.2f} epochs (> max_epochs = {max_epochs:g})"
            for name, t in totals.items() if t["epochs"] > max_epochs]
    if not data_spec.get("allow_repetition", True):
        warn += [f"{name!r} is drawn {t['epochs']:.3f} epochs although repetition is not allowed"
                 for name, t in totals.items() if t["epochs"] > 1.0]
    return {"kind": "blend_realization", "seq_length": seq_length, "global_batch_size": gbs, "steps": steps,
            "seed": seed, "samples": len(ds), "switch_steps": [ph["start_step"] for ph in phases[1:]],
            "phases": phases, "sources": totals, "max_epochs": max_epochs, "warnings": warn}


def _num(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def format_plan_table(specs: list[dict[str, Any]]) -> str:
    """One line per run x phase x source: planned share, tokens, available tokens and epochs.

    ``epochs`` is cumulative: passes over the source through the end of that phase (repetition)."""
    head = ("run", "phase", "steps", "source", "share", "tokens", "available", "epochs")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for spec in specs:
        data = spec.get("data") or {}
        rid = str(spec.get("run_id", "?"))
        epochs_so_far: dict[str, int] = {}
        for ph in data.get("phases", []):
            for s in ph["sources"]:
                epochs_so_far[s["name"]] = epochs_so_far.get(s["name"], 0) + s["planned_tokens"]
                avail = s.get("available_tokens")
                ep = f"{epochs_so_far[s['name']] / avail:.3f}" if avail else "?"
                rows.append((rid, str(ph["index"]), f"{ph['start_step']}-{ph['end_step']}", s["name"],
                             f"{s['weight']:.4f}", _num(s["planned_tokens"]), _num(avail) if avail else "?", ep))
        notes += [f"{rid}: {w}" for w in data.get("warnings", [])]
        if spec.get("error"):
            rows.append((rid, "-", "-", "-", "-", "-", "-", "ERROR"))
            notes.append(f"{rid}: {spec['error']}")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)
