# Scaling-law fits on the aggregated runs, then the final database with the fits in it.


rule points:
    input:
        f"{S}/db/runs.duckdb",
    output:
        f"{S}/fits/points.csv",
    params:
        min_step_fraction=CFG.fit.min_step_fraction,
    shell:
        "cptscale db points --db {input} --study {CFG.study} --min-step-fraction {params.min_step_fraction}"
        " --out {output}"


# Every law of the study (cptscale.fit.study.fit_study): one JSON per fit in fits/ plus fits/summary.json; the
# transfer table of runs.duckdb feeds the Hernandez law. A law without enough points is recorded as skipped.
# A checkpoint: with fit.next_run_budget, what trains next depends on what the fit suggests.
checkpoint fit:
    input:
        points=f"{S}/fits/points.csv",
        db=f"{S}/db/runs.duckdb",
    output:
        f"{S}/fits/summary.json",
    params:
        budgets=" ".join(f"{b:g}" for b in CFG.fit.budgets),
        bootstrap=CFG.fit.bootstrap,
        delta=CFG.fit.huber_delta,
        reduction=CFG.fit.reduction,
        grid=CFG.fit.grid,
        min_step_fraction=CFG.fit.min_step_fraction,
        next_run=f" --next-run-budget {CFG.fit.next_run_budget:g}" if CFG.fit.next_run_budget else "",
        # N as the study counts it for its budgets ("paper" sizes include the embeddings: total)
        param_count="nonembedding" if CFG.budget.param_count == "nonembedding" else "total",
        # point selection, asymmetric Huber and the remedy for an unidentified law (recorded in every fit)
        choices=f" --select {CFG.fit.points} --overestimate-penalty {CFG.fit.overestimate_penalty:g}"
        f" --remedy {CFG.fit.remedy} --bootstrap-scheme {CFG.fit.bootstrap_scheme}" + (f" --fixed-E {CFG.fit.fixed_E:g}" if CFG.fit.fixed_E is not None else ""),
    log:
        f"{LOGS}/fit.log",
    shell:
        "cptscale fit-study --points {input.points} --db {input.db} --study {CFG.study}"
        " --out-dir $(dirname {output}) --budgets {params.budgets} --bootstrap {params.bootstrap}"
        " --delta {params.delta} --reduction {params.reduction} --grid {params.grid}"
        " --min-step-fraction {params.min_step_fraction} --params {params.param_count}{params.choices}{params.next_run}"
        " > {log} 2>&1"


def _next_run_checks(wc=None):
    """fits/next-<lang>.json for every target language whose scratch fit suggested a run."""
    if not NEXT_RUNS:
        return []
    fits_dir = Path(checkpoints.fit.get().output[0]).parent
    return [f"{S}/fits/{rid}.json" for rid, lang in zip(NEXT_RUNS, CFG.languages.targets)
            if P.suggested_run(fits_dir, lang)]


rule next_run_spec:
    input:
        fits=f"{S}/fits/summary.json",
        data=expand(f"{S}/data/{{lang}}/data.json", lang=LANGS),
        tokenizer=f"{S}/tokenizer/tokenizer.json",
    output:
        f"{S}/runs/next-{{lang}}/run.json",
    log:
        f"{LOGS}/next_run/{{lang}}.log",
    shell:
        "cptscale next-run spec {CONFIG_FILE:q} --fits $(dirname {input.fits}) --lang {wildcards.lang}"
        " --out {output} 2> {log}"


rule next_run_check:
    input:
        spec=f"{S}/runs/next-{{lang}}/run.json",
        done=f"{S}/runs/next-{{lang}}/done.json",
    output:
        f"{S}/fits/next-{{lang}}.json",
    shell:
        "cptscale next-run check --spec {input.spec} --done {input.done} --out {output}"


rule database:
    input:
        _all_run_files,
        f"{S}/fits/summary.json",
        _next_run_checks,
        [f"{S}/{SM.FIT}"] if EXISTING else [],
    output:
        f"{S}/cptscale.duckdb",
    params:
        store=f"{S}/db/store.duckdb",  # the persistent store (see aggregate_runs); the output is its copy
        partial="--allow-partial" if CFG.store.allow_partial else "",
    log:
        f"{LOGS}/database.log",
    shell:
        "cptscale db ingest --study-dir {S} --db {params.store} --publish {output} {params.partial} 2> {log}"
