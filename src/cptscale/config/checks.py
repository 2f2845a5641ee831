"""Cross-field checks within the study config (languages, ladder, size keys, batches, tokenizer, corpora and
their registry packages), each yielding :class:`~cptscale.config.problems.Problem` objects."""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from cptscale.cluster import NodeLayoutError, node_layout
from cptscale.config.problems import ConfigWarning, Problem, _pydantic_problems
from cptscale.config.schema import StudyConfig
from cptscale.data.registry import _Unreachable, registry_verdict
from cptscale.ladder import known_sizes


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
        except KeyError:
            yield Problem(f"ladder.sizes.{i}", f"size {name!r} is not in the ladder; allowed: "
                          f"{', '.join(known_sizes(custom))}, or any d<hidden>l<layers> (or add it under ladder.custom)")
        except ValueError as exc:  # a d<hidden>l<layers> name whose shape cannot exist: say why
            yield Problem(f"ladder.sizes.{i}", f"size {name!r} is not a valid shape: {exc} (head size 16 up to "
                          "hidden 64, 32 above); pick another hidden size, or add the shape under ladder.custom")
        if name in sizes[:i]:
            yield Problem(f"ladder.sizes.{i}", f"size {name!r} repeats; list each size once")


def _check_size_keys(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    sizes = cfg.ladder.sizes
    for where, keys in (("budget.tokens", cfg.budget.tokens), ("parallel.per_size", cfg.parallel.per_size)):
        for key in keys:
            if key not in sizes:
                yield Problem(f"{where}.{key}", f"size {key!r} is not in ladder.sizes; allowed: {', '.join(sizes)}")


def _check_layouts(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    """Every size's parallel layout against its shape, as Megatron-Core and the trainer need them at start-up:
    attention heads, query groups and FFN width split evenly over TP, layers over PP (a job that would
    fail there is refused here, before any work)."""
    for size in cfg.ladder.sizes:
        lay, shape = cfg.layout(size), cfg.shape(size)
        where = f"parallel.per_size.{size}" if size in cfg.parallel.per_size else "parallel.default"
        splits = [("tp", lay.tp, "heads", shape.heads), ("tp", lay.tp, "query groups (kv_heads)", shape.kv_heads),
                  ("tp", lay.tp, "ffn", shape.ffn), ("pp", lay.pp, "layers", shape.layers)]
        for key, n, what, count in splits:
            if count is not None and n > 1 and count % n:
                ok = [d for d in range(1, count + 1) if count % d == 0]
                yield Problem(f"{where}.{key}", f"size {size!r}: {what} {count} not divisible by {key} {n}; "
                              f"allowed {key}: {', '.join(map(str, ok))}", n)


def _check_batches(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    """Layouts fit a node; a step holds at least one batch; every budget holds at least one step.
    Sizes that fail the same way for the same field are reported in one line."""
    t = cfg.train
    small_step: list[str] = []
    small_budget: list[str] = []
    for size in cfg.ladder.sizes:
        layout = cfg.layout(size)
        where = f"parallel.per_size.{size}" if size in cfg.parallel.per_size else "parallel.default"
        per_node = cfg.slurm.gpus_per_node if cfg.slurm.gpus else cfg.slurm.cpu_ranks_per_node
        try:  # a run larger than a node spans several, evenly, with TP groups inside a node
            node_layout(layout.world, per_node, layout.tp)
        except NodeLayoutError as exc:
            node = "slurm.gpus_per_node" if cfg.slurm.gpus else "slurm.cpu_ranks_per_node"
            yield Problem(where, f"size {size!r}: {exc} ({node} = {per_node})")
        shape = cfg.shape(size)
        if shape.heads % layout.tp or shape.layers % layout.pp:
            yield Problem(where, f"size {size!r}: layout tp={layout.tp}, pp={layout.pp} does not divide its "
                          f"{shape.heads} heads and {shape.layers} layers (tp must divide heads, pp layers); choose "
                          "another layout for this size under parallel.per_size")
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
