"""The study plan: every run of a study, derived from the config alone.

``plan_study`` lists the runs every recipe of the study adds (:mod:`cptscale.recipes`: scratch
pretraining per size and language, CPT runs per size x target x replay ratio and recipe variant, IPLT
arms), each a :class:`~cptscale.runs.PlannedRun`. ``run_spec`` turns one of them into its
:class:`~cptscale.runspec.RunSpec` (``run.json``), once the data stage has produced token counts, asking
the run's recipe for its shape, parent, schedule and blend. The hashes here decide what reruns: the
study's ``config_hash`` and ``results_hash`` and each run's ``training_hash``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cptscale.config.schema import StoreConfig, StudyConfig
from cptscale.recipes import recipe_for, study_recipes
from cptscale.runs import (
    PlannedRun,
    checkpoint_dir,
    data_dir,
    data_manifest,
    eval_steps,
    plan_run,
    run_dir,
    tokenizer_path,
)
from cptscale.runspec import (
    SPEC_VERSION,
    CheckpointSpec,
    EvalLang,
    EvalSpec,
    LayoutSpec,
    OptimizerSpec,
    ResourcesSpec,
    RunSpec,
    ScheduleSpec,
    SpecError,
)
from cptscale.schedule import Schedule
from cptscale.util import manifest_hashes, provenance, read_json, stable_hash


def plan_study(cfg: StudyConfig) -> list[PlannedRun]:
    """All runs of the study, each once: the grid recipes' runs (scratch, CPT and its variants) in ladder
    order (per size: the source language's scratch run, then per target its scratch run and its CPT runs
    by replay ratio and recipe), sources before the CPT runs that start from them; then the other
    recipes' runs (IPLT arms) in recipe order."""
    recipes = study_recipes(cfg)
    langs = [cfg.languages.source, *cfg.languages.targets]
    ratios = list(cfg.replay.ratios)

    def grid_key(item: tuple[int, PlannedRun]) -> tuple[int, ...]:
        i, run = item
        replay = ratios.index(run.replay) if run.init == "cpt" else -1
        return (cfg.ladder.sizes.index(run.size), langs.index(run.lang), replay, i)

    grid = sorted(((i, run) for i, r in enumerate(recipes) if r.grid for run in r.runs(cfg)), key=grid_key)
    rest = [run for r in recipes if not r.grid for run in r.runs(cfg)]
    seen: set[str] = set()
    out = []
    for run in [run for _, run in grid] + rest:
        if run.run_id not in seen:
            seen.add(run.run_id)
            out.append(run)
    return out


def find_run(cfg: StudyConfig, rid: str) -> PlannedRun:
    """The planned run ``rid``, as ``plan_study`` lists it (a run two recipes add is the first grid
    recipe's, else the first other recipe's), planning only that run where its recipe can."""
    recipes = study_recipes(cfg)
    for recipe in [r for r in recipes if r.grid] + [r for r in recipes if not r.grid]:
        run = recipe.find(cfg, rid)
        if run is not None:
            return run
    raise KeyError(f"run {rid!r} is not part of study {cfg.study!r}; `cptscale plan CONFIG` lists its runs")


def id_pattern(names: Iterable[str]) -> str:
    """A regex matching exactly ``names`` (e.g. a study's run ids, the workflow's wildcard constraint), as a
    trie of non-capturing groups: a flat alternation ``a|b|...`` costs each match a try of every name, so
    Snakemake's matching of every job's files against it grew with the square of the study's runs."""
    trie: dict[str, dict] = {}
    for name in names:
        node = trie
        for ch in name:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict[str, dict]) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


def next_run_id(lang: str) -> str:
    return f"next-{lang}"


def suggested_run(fits_dir: str | Path, lang: str) -> dict[str, Any] | None:
    """The compute-optimal scratch run of ``lang`` for ``fit.next_run_budget``, as the target
    language's scratch Chinchilla fit predicts it (None when that fit was skipped or has none)."""
    for path in sorted(Path(fits_dir).glob("*.json")):
        rec = read_json(path)
        if not (isinstance(rec, dict) and rec.get("law") == "chinchilla" and rec.get("kind") == "scratch"
                and rec.get("lang") == lang and rec.get("status") == "ok"):
            continue
        nxt = rec.get("next_run") or {}
        if nxt.get("valid"):
            return {**nxt, "fit_id": rec.get("fit_id", path.stem), "fit_file": str(path)}
    return None


def plan_next_run(cfg: StudyConfig, suggestion: dict[str, Any], lang: str) -> PlannedRun:
    """A scratch run of the ladder family's shape nearest the suggested N, for the suggested tokens."""
    from cptscale.ladder import PAPER_SHAPES, shape_for_params

    family = "paper" if all(size in PAPER_SHAPES for size in cfg.ladder.sizes) else "tiny"
    # the fits count N as the budget does (fit-study --params): with or without embeddings
    shape = shape_for_params(float(suggestion["N"]), cfg.vocab_size, family,
                             embeddings=cfg.budget.param_count != "nonembedding")
    return plan_run(cfg, shape.name, "scratch", lang, None, 0.0, tokens=float(suggestion["D"]),
                    rid=next_run_id(lang))


def schedule_for(cfg: StudyConfig, run: PlannedRun) -> Schedule:
    """The run's LR schedule, as its recipe builds it."""
    return recipe_for(cfg, run).schedule(cfg, run)


def _dump(cfg: StudyConfig, **kw: Any) -> dict[str, Any]:
    d = cfg.model_dump(mode="json", **kw)
    if d.get("iplt", 0) is None:  # a study without IPLT hashes as it did before the section existed
        d.pop("iplt")
    if d.get("store") == StoreConfig().model_dump(mode="json"):  # likewise for a default store section
        d.pop("store")
    return d


def config_hash(cfg: StudyConfig) -> str:
    return stable_hash(_dump(cfg))


#: Config sections that change how results are shown or where jobs run, never what they compute.
PRESENTATION_KEYS = ("description", "report", "slurm", "store", "logging")


#: Config fields that only change I/O: worker processes, caches, checkpoint cadence and retention (a run
#: resumes exactly from any checkpoint, so how often it saves does not change what it computes).
IO_KEYS: dict[str, set[str]] = {"data": {"workers", "cache_dir"}, "train": {"checkpoint_every", "keep_checkpoints"}}


#: PlannedRun fields that size the job (cluster resources and time limits), not the training itself.
RESOURCE_FIELDS = ("gpus", "cpus", "runtime_minutes", "mem_gb", "nodes")


def results_hash(cfg: StudyConfig) -> str:
    """Hash of the config without its presentation sections and I/O knobs: the study manifest's rerun
    trigger, so a new report title, SLURM partition or checkpoint cadence does not re-aggregate and
    refit the study."""
    d = _dump(cfg, exclude=set(PRESENTATION_KEYS))
    for section, keys in IO_KEYS.items():
        for k in keys:
            d.get(section, {}).pop(k, None)
    return stable_hash(d)


def data_identity(cfg: StudyConfig) -> dict[str, Any]:
    """The ``data`` section without its I/O knobs: what decides which documents and tokens the data stage
    produces (the ingest rule's rerun trigger should use this, not the whole section)."""
    return cfg.data.model_dump(mode="json", exclude=IO_KEYS["data"])


def mix_for_run(cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
    """The ``mix`` section a run's blend follows (its recipe's; none for runs on one language)."""
    return recipe_for(cfg, run).mix(cfg, run)


def training_hash(cfg: StudyConfig, run: PlannedRun) -> str:
    """Hash of everything that changes what this run computes, and nothing else (the rerun trigger of
    its run.json, hence of its training): shape, tokens and steps, batch and layout, schedule, optimizer,
    seed, blend, evaluation points, data identity (corpora, tokenizer, cleaning), the parent. Job
    resources (GPUs, cores, memory, time limits) and I/O knobs (``IO_KEYS``) are left out, so changing a
    runtime estimate, thread counts, data workers or the checkpoint cadence retrains nothing."""
    rd = {k: v for k, v in run.as_dict().items() if k not in RESOURCE_FIELDS}
    if rd.get("arm") is None:  # ordinary runs hash without the IPLT field
        rd.pop("arm", None)
    keep = {
        "run": rd,
        "train": cfg.train.model_dump(mode="json", exclude=IO_KEYS["train"]),
        "tokenizer": cfg.tokenizer.model_dump(mode="json"),
        "corpora": {k: cfg.corpora[k] for k in sorted({run.lang, run.source_lang or run.lang})},
        "data": data_identity(cfg),
        "seed": cfg.seed,
        "eval": cfg.evaluation.model_dump(mode="json"),
        **recipe_for(cfg, run).hash_parts(cfg, run),  # cpt and mix sections (None from scratch), IPLT arm
    }
    if cfg.train.backend == "simulate":  # a simulated run changes with its law file and noise seed
        keep["simulate"] = simulate_section(cfg)
    return stable_hash(keep)


def simulate_section(cfg: StudyConfig) -> dict[str, Any]:
    """run.json's ``simulate`` section (train.backend: simulate): the law file and its content hash, the
    noise seed, the study's languages and how N is counted; ``cptscale train`` dispatches on it."""
    from cptscale.simulate.backend import truth_hash

    sim = cfg.simulate
    truth = sim.truth if sim else None
    return {"backend": "simulate", "truth": truth, "truth_hash": truth_hash(truth), "seed": sim.seed if sim else 0,
            "languages": list(cfg.languages.all), "source": cfg.languages.source,
            "targets": list(cfg.languages.targets),
            "param_count": "nonembedding" if cfg.budget.param_count == "nonembedding" else "total"}


def _manifest(cfg: StudyConfig, lang: str) -> dict[str, Any]:
    path = data_manifest(cfg, lang)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the data stage for {lang!r} first")
    return read_json(path)


def manifest_numbers(manifest: dict[str, Any]) -> dict[str, int]:
    """Train tokens, validation tokens and validation bytes from a data stage manifest."""
    train, valid = manifest["train"], manifest["valid"]
    return {"train_tokens": int(train["tokens"]), "valid_tokens": int(valid["tokens"]),
            "valid_bytes": int(valid["bytes"])}


#: Token count of a blend source whose data manifest does not exist yet (planning before the data stage):
#: large enough that no share of any run needs more than one epoch, so only data-independent checks apply.
PLACEHOLDER_TOKENS = 1 << 62


def blend_inputs(cfg: StudyConfig, manifests: dict[str, dict[str, Any]]
                 ) -> tuple[dict[str, str], dict[str, int], dict[str, dict[str, str]]]:
    """Every source a blend may name, with its indexed-dataset prefix, training tokens and content hashes.

    Sources: each language's train split (``<lang>``) and each configured corpus's own train split
    (``<lang>/<corpus>``, written by ``cptscale data index --split-corpora``; manifest key
    ``train_corpora``). A language without a manifest gets placeholder tokens; a corpus its manifest
    does not list gets 0 tokens (planning it is an error that names the fix)."""
    ddir = data_dir(cfg)
    prefixes: dict[str, str] = {}
    tokens: dict[str, int] = {}
    hashes: dict[str, dict[str, str]] = {}

    def add(name: str, prefix: Path, entry: dict[str, Any] | None, have_manifest: bool) -> None:
        prefixes[name] = str(prefix)
        tokens[name] = int(entry["tokens"]) if entry else (0 if have_manifest else PLACEHOLDER_TOKENS)
        if entry:
            hashes[name] = {k: entry[k] for k in ("bin_hash", "idx_hash") if entry.get(k)}

    for lang in cfg.languages.all:
        m = manifests.get(lang)
        add(lang, ddir / lang / "train", m["train"] if m else None, m is not None)
        per_corpus = (m or {}).get("train_corpora") or {}
        for spec in cfg.corpora.get(lang, []):
            name = spec["name"]
            add(f"{lang}/{name}", ddir / lang / f"train.{name}", per_corpus.get(name), m is not None)
    return prefixes, tokens, hashes


def blend_for_run(cfg: StudyConfig, run: PlannedRun, manifests: dict[str, dict[str, Any]],
                  schedule: Schedule | None = None) -> dict[str, Any]:
    """A run's data spec (``plan_blend``) from the data manifests; languages missing from ``manifests``
    get placeholder token counts, so ``manifests={}`` checks a study's blends before any data exists
    (``cptscale validate`` and Snakefile start-up do). Raises ``BlendError`` naming the config field."""
    from cptscale.mix import MixConfig, plan_blend

    prefixes, tokens, hashes = blend_inputs(cfg, manifests)
    return plan_blend(
        MixConfig.model_validate(mix_for_run(cfg, run)),
        replay=run.replay if run.init == "cpt" else 0.0,
        target=run.lang,
        source=run.source_lang or run.lang,
        train_prefixes=prefixes,
        train_tokens=tokens,
        train_hashes=hashes,
        schedule=schedule or schedule_for(cfg, run),
        steps=run.steps,
        global_batch_size=run.global_batch_size,
        seq_length=run.seq_length,
        seed=cfg.seed,
        cache_dir=str(cfg.study_dir / "cache" / "blend-index"),
        where=recipe_for(cfg, run).mix_path(cfg, run),
    )


def run_spec(cfg: StudyConfig, rid: str, planned: PlannedRun | None = None) -> RunSpec:
    """The complete ``run.json`` of one run: what the training engine needs and nothing it must guess.
    ``planned`` gives a run that is not in the study's grid (the fit's suggested next run)."""
    run = planned or find_run(cfg, rid)
    recipe = recipe_for(cfg, run)
    sched = recipe.schedule(cfg, run)
    ddir = data_dir(cfg)
    langs = cfg.languages.all
    manifests = {lang: _manifest(cfg, lang) for lang in langs}
    numbers = {lang: manifest_numbers(manifests[lang]) for lang in langs}
    t = cfg.train
    chash = training_hash(cfg, run)
    fields: dict[str, Any] = dict(
        run_id=run.run_id, study=cfg.study, size=run.size, init=run.init, lang=run.lang,
        source_lang=run.source_lang, replay=run.replay, variant=run.variant,
        shape=recipe.shape(cfg, run),
        vocab_size=cfg.vocab_size, params=run.params, params_nonemb=run.params_nonemb, tokens=run.tokens,
        seq_length=run.seq_length, micro_batch_size=run.micro_batch_size, global_batch_size=run.global_batch_size,
        steps=run.steps, seed=cfg.seed, schedule=ScheduleSpec.of(sched),
        optimizer=OptimizerSpec(weight_decay=t.weight_decay, beta1=t.beta1, beta2=t.beta2, eps=t.eps,
                                grad_clip=t.grad_clip),
        init_std=t.init_std, precision=t.precision, layout=LayoutSpec(tp=run.tp, pp=run.pp, dp=run.dp),
        data=blend_for_run(cfg, run, manifests, sched), tokenizer=str(tokenizer_path(cfg)),
        eval=EvalSpec(steps=eval_steps(run.steps, cfg.evaluation.points),
                      languages={lang: EvalLang(prefix=str(ddir / lang / "valid"), bytes=numbers[lang]["valid_bytes"])
                                 for lang in langs},
                      micro_batch_size=cfg.evaluation.micro_batch_size, max_tokens=cfg.evaluation.max_tokens),
        checkpoint=CheckpointSpec(dir=str(checkpoint_dir(cfg, run.run_id)), every=t.checkpoint_every,
                                  keep=t.keep_checkpoints),
        parent=recipe.parent(cfg, run), out_dir=str(run_dir(cfg, run.run_id)), loss_spike_factor=t.loss_spike_factor,
        logging=cfg.logging.model_dump(mode="json"),
        resources=ResourcesSpec(gpus=run.gpus, cpus=run.cpus, nodes=run.nodes, runtime_minutes=run.runtime_minutes,
                                mem_gb=run.mem_gb, gpu_peak_flops=cfg.slurm.gpu_peak_flops),
        config_hash=chash,
        provenance=provenance(chash, manifest_hashes(manifests, str(ddir / "{lang}" / "data.json"))),
    )
    fields.update(recipe.spec_fields(cfg, run, fields["eval"]))  # e.g. an IPLT arm's prune events
    if cfg.train.backend == "simulate":  # cptscale train writes the run's outputs from the law file
        fields["simulate"] = simulate_section(cfg)
    try:
        return RunSpec(spec_version=SPEC_VERSION, **fields)
    except ValidationError as exc:  # a planner bug, not bad input: say which field
        raise SpecError(f"run {run.run_id}: the planned run.json does not validate: {exc}") from None


def study_manifest(cfg: StudyConfig) -> dict[str, Any]:
    """``study.json``: the resolved config and the runs it expects (for ``db status``)."""
    return {
        "study": cfg.study,
        "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"),
        "expected_runs": [
            {"run_id": r.run_id, "size": r.size, "init": r.init, "lang": r.lang, "replay": r.replay,
             "variant": r.variant, "parent": r.parent, "arm": r.arm,
             "params": r.params, "tokens": r.tokens, "steps": r.steps}
            for r in plan_study(cfg)
        ],
        "provenance": provenance(config_hash(cfg)),
    }
