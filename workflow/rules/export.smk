# Hugging Face export of any run by name: `snakemake results/<study>/export/<run>/` (not part of `all`).


rule export_hf:
    input:
        f"{S}/runs/{{run}}/done.json",
    output:
        directory(f"{S}/export/{{run}}"),
    log:
        f"{LOGS}/export/{{run}}.log",
    shell:
        "cptscale export-hf {input} --out {output} 2> {log}"
