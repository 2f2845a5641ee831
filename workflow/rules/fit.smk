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


rule fit:
    input:
        f"{S}/fits/points.csv",
    output:
        f"{S}/fits/summary.json",
    params:
        budgets=" ".join(f"{b:g}" for b in CFG.fit.budgets),
        bootstrap=CFG.fit.bootstrap,
        delta=CFG.fit.huber_delta,
        reduction=CFG.fit.reduction,
        grid=CFG.fit.grid,
    log:
        f"{LOGS}/fit.log",
    shell:
        "cptscale fit-study --points {input} --out-dir $(dirname {output}) --budgets {params.budgets}"
        " --bootstrap {params.bootstrap} --delta {params.delta} --reduction {params.reduction}"
        " --grid {params.grid} > {log} 2>&1"


rule database:
    input:
        _all_run_files,
        f"{S}/fits/summary.json",
    output:
        f"{S}/cptscale.duckdb",
    log:
        f"{LOGS}/database.log",
    shell:
        "cptscale db ingest --study-dir {S} --db {output} 2> {log}"
