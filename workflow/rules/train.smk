# Run specs, blend realization and training. Checkpoints live outside declared outputs (Snakemake
# deletes the outputs of failed jobs); done.json is the declared marker, written last.


def _run_spec_inputs(wc):
    r = RUNS[wc.run]
    deps = [f"{S}/data/{lang}/data.json" for lang in LANGS] + [f"{S}/tokenizer/tokenizer.json"]
    if r.parent:
        deps.append(f"{S}/runs/{r.parent}/done.json")
    if EXISTING:  # from the imported model; its loss as given is the init gate's reference
        deps.append(f"{S}/{SM.EVAL}")
    return deps


rule run_spec:
    input:
        _run_spec_inputs,
    output:
        f"{S}/runs/{{run}}/run.json",
    wildcard_constraints:
        run=_alternatives(RUNS),  # the suggested next run's spec comes from the fit (next_run_spec)
    params:
        # rerun trigger: only what changes this run's training (not comments, fits or report options)
        training_hash=lambda wc: P.training_hash(CFG, RUNS[wc.run]),
    log:
        f"{LOGS}/run_spec/{{run}}.log",
    shell:
        "cptscale plan {CONFIG_FILE:q} --run {wildcards.run} --out {output} 2> {log}"


rule blend:
    input:
        f"{S}/runs/{{run}}/run.json",
    output:
        f"{S}/runs/{{run}}/blend.json",
    log:
        f"{LOGS}/blend/{{run}}.log",
    shell:
        "cptscale mix report --spec {input} --out {output} 2> {log}"


rule train:
    input:
        spec=f"{S}/runs/{{run}}/run.json",
        blend=f"{S}/runs/{{run}}/blend.json",
    output:
        f"{S}/runs/{{run}}/done.json",
    log:
        f"{LOGS}/train/{{run}}.log",
    benchmark:
        f"{S}/benchmarks/train/{{run}}.tsv"
    threads: run_world
    retries: 2
    resources:
        **train_resources(),
        omp_threads=TRAIN_OMP_THREADS,
        attempt=lambda wildcards, attempt: attempt,
    # no `params`, and nothing from the config in the command text: a training run's rerun trigger is
    # its run.json (cptscale.plan.training_hash); torch threads per rank are an execution setting (a
    # resource), so changing them retrains nothing.
    # `exec`: the trainer replaces the job's shell, so a SIGTERM at the time limit reaches it and the
    # job step lives until its checkpoint is written (a shell killed first would end the step early)
    # `--attempt`: Snakemake cannot skip retries by exit status; a run whose first attempt failed in a way a
    # retry cannot change (exit 3: bad spec, damaged checkpoint or dataset) exits 3 at once on the retries
    shell:
        "OMP_NUM_THREADS={resources.omp_threads} exec cptscale train --spec {input.spec} --attempt {resources.attempt}"
        " >> {log} 2>&1"
