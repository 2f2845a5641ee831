# Data stage: ingest corpora per language, train (or load) the shared tokenizer, split a fixed
# held-out validation set and write Megatron indexed datasets (.bin/.idx) with a manifest.

import shlex

#: tokenizer.kind: file -> the given tokenizer.json (relative to the config file; parse_config has checked
#: it against tokenizer.vocab_size before any job runs); None when the study trains its tokenizer.
TOKENIZER_FILE = (
    str((_CONFIG_FILE.resolve().parent / CFG.tokenizer.path).resolve()) if CFG.tokenizer.kind == "file" else None
)

#: kind: file loads the given tokenizer.json (its vocabulary must equal tokenizer.vocab_size); kind: train
#: trains on a sample that keeps out each language's validation region
TOKENIZER_ARGS = (
    f"--from {shlex.quote(TOKENIZER_FILE)}"
    if TOKENIZER_FILE
    else f"--sample-chars-per-language {CFG.tokenizer.sample_chars_per_language}"
    f" --valid-tokens {CFG.data.validation_tokens}"
)

#: where fetched packages are cached: a location, not part of the ingest's rerun trigger
CACHE_ARG = f"--cache-dir {shlex.quote(CFG.data.cache_dir)}" if CFG.data.cache_dir else ""

#: per language, the corpora a blend weights separately ("lang/corpus" keys, checked by the config
#: validation): index also writes train.<corpus>.bin/.idx for them. They are not declared outputs (an
#: output list cannot differ per wildcard value); data.json, which lists them, is.
SPLIT_CORPORA = {lang: CFG.blend_corpora(lang) for lang in LANGS}


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
        # rerun trigger: what decides the documents (not data.workers or the cache location)
        data=P.data_identity(CFG),
        max_chars=f"--max-chars {CFG.data.max_chars}" if CFG.data.max_chars else "",
    log:
        f"{LOGS}/ingest/{{lang}}.log",
    shell:
        # --valid-tokens: too little text for the validation size fails here, before tokenizer and index
        "cptscale data ingest --lang {wildcards.lang} --sources-json {input} --out {output.docs}"
        " --min-chars {CFG.data.min_doc_chars} {params.max_chars} {CACHE_ARG}"
        " --valid-tokens {CFG.data.validation_tokens} --no-progress 2> {log}"


rule tokenizer:
    input:
        docs=expand(f"{S}/data/{{lang}}/docs.parquet", lang=LANGS),
        given=[TOKENIZER_FILE] if TOKENIZER_FILE else [],
    output:
        tok=f"{S}/tokenizer/tokenizer.json",
        report=f"{S}/tokenizer/report.json",
    params:
        tokenizer=CFG.tokenizer.model_dump(mode="json"),
        valid=CFG.data.validation_tokens,
    log:
        f"{LOGS}/tokenizer.log",
    shell:
        "cptscale data tokenizer --docs {input.docs} --vocab-size {CFG.tokenizer.vocab_size} {TOKENIZER_ARGS}"
        " --out {output.tok} --no-progress 2> {log}"


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
        # train.<corpus>.bin/.idx for "lang/corpus" blend keys (listed in data.json "train_corpora"; a change
        # of the list re-runs the job through the params rerun trigger)
        split=lambda wc: (
            "--split-corpora " + " ".join(shlex.quote(c) for c in SPLIT_CORPORA[wc.lang])
            if SPLIT_CORPORA[wc.lang]
            else ""
        ),
    threads: CFG.data.workers
    log:
        f"{LOGS}/index/{{lang}}.log",
    shell:
        "cptscale data index --lang {wildcards.lang} --docs {input.docs} --tokenizer {input.tok}"
        " --valid-tokens {params.valid} {params.split} --out-dir $(dirname {output.manifest})"
        " --workers {threads} --no-progress 2> {log}"
