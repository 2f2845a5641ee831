# Transfer metrics per CPT run (FLOPs saved, effective data transferred, forgetting) and the
# aggregate step that ingests every job's files into DuckDB (jobs never write to the database).


rule transfer:
    input:
        cpt=f"{S}/runs/{{run}}/done.json",
        scratch=lambda wc: f"{S}/runs/{RUNS[wc.run].size}-scratch-{RUNS[wc.run].lang}/done.json",
        source=lambda wc: f"{S}/runs/{RUNS[wc.run].parent}/done.json",
    output:
        f"{S}/runs/{{run}}/transfer.json",
    log:
        f"{LOGS}/transfer/{{run}}.log",
    shell:
        "cptscale transfer --cpt $(dirname {input.cpt}) --scratch $(dirname {input.scratch})"
        " --source $(dirname {input.source}) --out {output} 2> {log}"


rule study_manifest:
    output:
        f"{S}/study.json",
    params:
        results_hash=P.results_hash(CFG),
    shell:
        "cptscale plan {CONFIG_FILE:q} --study-json {output}"


def _all_run_files(wc=None):
    files = [f"{S}/study.json"]
    files += [f"{S}/data/{lang}/data.json" for lang in LANGS]
    for rid in RUNS:
        files += [f"{S}/runs/{rid}/done.json", f"{S}/runs/{rid}/blend.json"]
    files += [f"{S}/runs/{r.run_id}/transfer.json" for r in CPT_RUNS]
    return files


# The database lives in db/store.duckdb, which is NOT a Snakemake output: Snakemake deletes a job's
# outputs before it runs and after it fails, so the store would lose everything already ingested. Ingest
# updates the store idempotently and atomically, then publishes an atomic copy as the declared output.
rule aggregate_runs:
    input:
        _all_run_files,
    output:
        f"{S}/db/runs.duckdb",
    params:
        store=f"{S}/db/store.duckdb",
        partial=("--allow-partial" if CFG.store.allow_partial else "") + (" --allow-mixed" if CFG.store.allow_mixed else ""),
    log:
        f"{LOGS}/aggregate_runs.log",
    shell:
        "cptscale db ingest --study-dir {S} --db {params.store} --publish {output} {params.partial} 2> {log}"
