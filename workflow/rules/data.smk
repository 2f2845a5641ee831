# Data stage: ingest corpora per language, train (or load) the shared tokenizer, split a fixed
# held-out validation set and write Megatron indexed datasets (.bin/.idx) with a manifest.


rule corpus_sources:
    output:
        f"{S}/data/{{lang}}/sources.json",
    params:
        sources=lambda wc: resolve_corpora(CFG, wc.lang, _CONFIG_FILE.resolve().parent),
    run:
        from cptscale.util import write_json

        write_json(output[0], params.sources)


rule ingest:
    input:
        f"{S}/data/{{lang}}/sources.json",
    output:
        docs=f"{S}/data/{{lang}}/docs.parquet",
        report=f"{S}/data/{{lang}}/ingest.json",
    params:
        data=CFG.data.model_dump(mode="json"),
        cache=f"--cache-dir {CFG.data.cache_dir}" if CFG.data.cache_dir else "",
        max_chars=f"--max-chars {CFG.data.max_chars}" if CFG.data.max_chars else "",
    log:
        f"{LOGS}/ingest/{{lang}}.log",
    shell:
        "cptscale data ingest --lang {wildcards.lang} --sources-json {input} --out {output.docs}"
        " --min-chars {CFG.data.min_doc_chars} {params.max_chars} {params.cache} --no-progress 2> {log}"


rule tokenizer:
    input:
        expand(f"{S}/data/{{lang}}/docs.parquet", lang=LANGS),
    output:
        tok=f"{S}/tokenizer/tokenizer.json",
        report=f"{S}/tokenizer/report.json",
    params:
        tokenizer=CFG.tokenizer.model_dump(mode="json"),
        valid=CFG.data.validation_tokens,
    log:
        f"{LOGS}/tokenizer.log",
    shell:
        "cptscale data tokenizer --docs {input} --vocab-size {CFG.tokenizer.vocab_size}"
        " --sample-chars-per-language {CFG.tokenizer.sample_chars_per_language}"
        " --valid-tokens {params.valid} --out {output.tok} --no-progress 2> {log}"


rule index:
    input:
        docs=f"{S}/data/{{lang}}/docs.parquet",
        tok=f"{S}/tokenizer/tokenizer.json",
    output:
        multiext(f"{S}/data/{{lang}}/train", ".bin", ".idx"),
        multiext(f"{S}/data/{{lang}}/valid", ".bin", ".idx"),
        manifest=f"{S}/data/{{lang}}/data.json",
    params:
        valid=CFG.data.validation_tokens,
    threads: CFG.data.workers
    log:
        f"{LOGS}/index/{{lang}}.log",
    shell:
        "cptscale data index --lang {wildcards.lang} --docs {input.docs} --tokenizer {input.tok}"
        " --valid-tokens {params.valid} --out-dir $(dirname {output.manifest}) --workers {threads} --no-progress 2> {log}"
