# CPT of an existing model (source_model:): import the model into the study once, evaluate it as given on
# every language (the init-sanity gate's reference and forgetting's baseline), and after the runs the study
# kind's fit: the data law in D at fixed N per replay ratio, the forgetting-vs-replay frontier, the answer.
# The runs themselves (cptscale.recipes.existing) go through run_spec/blend/train like any other.

import math


def _model_mem_mb(wc=None):
    """Memory of a job holding the model in fp32 twice (import: the transformers weights and the Megatron
    model; evaluate: the Megatron model and the transformers reference), plus 4 GB."""
    return 4096 + math.ceil(CFG.params(SM.SIZE, "total") * 4 * 2 / 2**20)


#: the model as given is evaluated where the runs train: on one GPU when the study uses GPUs
EVAL_GPU = {"gpu": 1} if CFG.slurm.gpus else {}


rule import_model:
    output:
        directory(f"{S}/{SM.CHECKPOINT}"),
    params:
        # rerun trigger: which model (a different path or tokenizer re-imports it)
        source=CFG.source_model.model_dump(mode="json", include={"path", "tokenizer"}),
    resources:
        mem_mb=_model_mem_mb,
        runtime=60,
    log:
        f"{LOGS}/import_model.log",
    shell:
        "cptscale existing-model import {CONFIG_FILE:q} --out {output} 2> {log}"


rule evaluate_model:
    input:
        ckpt=f"{S}/{SM.CHECKPOINT}",
        data=expand(f"{S}/data/{{lang}}/data.json", lang=LANGS),
        tokenizer=f"{S}/tokenizer/tokenizer.json",
    output:
        f"{S}/{SM.EVAL}",
    params:
        evaluation=CFG.evaluation.model_dump(mode="json"),
        seq_length=CFG.train.seq_length,
    resources:
        mem_mb=_model_mem_mb,
        runtime=120,
        **EVAL_GPU,
    log:
        f"{LOGS}/evaluate_model.log",
    shell:
        "cptscale existing-model evaluate {CONFIG_FILE:q} --checkpoint {input.ckpt} --out {output} 2> {log}"


rule existing_fit:
    input:
        db=f"{S}/db/runs.duckdb",
        model_eval=f"{S}/{SM.EVAL}",
        tokenizer_report=f"{S}/tokenizer/report.json",
    output:
        f"{S}/{SM.FIT}",
    params:
        source_model=CFG.source_model.model_dump(mode="json"),
    log:
        f"{LOGS}/existing_fit.log",
    shell:
        "cptscale existing-model fit {CONFIG_FILE:q} --db {input.db} --model-eval {input.model_eval}"
        " --tokenizer-report {input.tokenizer_report} --out {output} > {log} 2>&1"
