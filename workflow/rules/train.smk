# Run specs, blend realization and training. Checkpoints live outside declared outputs (Snakemake
# deletes the outputs of failed jobs); done.json is the declared marker, written last.


def _run_spec_inputs(wc):
    r = RUNS[wc.run]
    deps = [f"{S}/data/{lang}/data.json" for lang in LANGS] + [f"{S}/tokenizer/tokenizer.json"]
    if r.parent:
        deps.append(f"{S}/runs/{r.parent}/done.json")
    return deps


rule run_spec:
    input:
        _run_spec_inputs,
    output:
        f"{S}/runs/{{run}}/run.json",
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
    threads: 1
    retries: 2
    resources:
        mem_mb=lambda wc, attempt: run_resources(wc.run, attempt)["mem_mb"],
        runtime=lambda wc, attempt: run_resources(wc.run, attempt)["runtime"],
        tasks=1,
        cpus_per_task=lambda wc: run_resources(wc.run, 1)["cpus_per_task"],
        gpu=lambda wc: train_gpus(wc.run) if CFG.slurm.gpus else 0,
    shell:
        "OMP_NUM_THREADS={threads} cptscale train --spec {input.spec} >> {log} 2>&1"
