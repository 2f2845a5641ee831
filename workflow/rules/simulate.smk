# Simulated study (train.backend: simulate): stand-ins for the data stage. No corpus is fetched and no
# tokenizer is trained; the manifests carry the counts the planner needs and are flagged simulated.
# Training (`cptscale train`) and the blend report (`cptscale mix report`) see the run.json's `simulate`
# section and write simulated outputs; every later rule runs unchanged.


rule simulated_data:
    output:
        f"{S}/data/{{lang}}/data.json",
    params:
        # rerun trigger: what the manifest is derived from
        data=P.data_identity(CFG),
        vocab=CFG.vocab_size,
    log:
        f"{LOGS}/simulated_data/{{lang}}.log",
    shell:
        "cptscale simulate data {CONFIG_FILE:q} --lang {wildcards.lang} --out {output} 2> {log}"


rule simulated_tokenizer:
    output:
        tok=f"{S}/tokenizer/tokenizer.json",
        report=f"{S}/tokenizer/report.json",
    params:
        vocab=CFG.vocab_size,
    log:
        f"{LOGS}/simulated_tokenizer.log",
    shell:
        "cptscale simulate tokenizer {CONFIG_FILE:q} --out {output.tok} --report {output.report} 2> {log}"
