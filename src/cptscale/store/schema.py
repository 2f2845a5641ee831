"""The tables of the DuckDB results store, their schema version and the columns added since version 1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: 2: runs gained the IPLT arm, the trainer's FLOPs and the prune events (cptscale.iplt, cptscale.prune)
#: 3: evals gained ``branch`` (WSD decay branches; NULL = the main trajectory), runs gained ``branches``
#:    (done.json) and ``provenance`` (the merged record), fits gained the fitting choices as columns
#: 4: train_metrics gained ``branch`` (the steps of WSD decay branches, from branch_metrics.jsonl)
#: 5: runs gained ``simulated`` (train.backend: simulate; the store refuses to mix them with trained runs)
SCHEMA_VERSION = 5


#: table -> column DDL. Names are a contract with the report and fit stages.
SCHEMA: dict[str, str] = {
    "studies": """study VARCHAR PRIMARY KEY, config_hash VARCHAR, config JSON, expected_runs JSON,
        n_expected_runs INTEGER, study_dir VARCHAR, git_commit VARCHAR, git_dirty BOOLEAN, packages JSON,
        input_hashes JSON, provenance JSON, tokenizer_report JSON, ingested_at TIMESTAMP""",
    "runs": """study VARCHAR, run_id VARCHAR, size VARCHAR, init VARCHAR, lang VARCHAR, source_lang VARCHAR,
        replay DOUBLE, variant VARCHAR, parent_run_id VARCHAR, parent_checkpoint VARCHAR, seed BIGINT,
        hidden INTEGER, layers INTEGER, heads INTEGER, ffn INTEGER, kv_heads INTEGER, vocab_size INTEGER,
        seq_length INTEGER, micro_batch_size INTEGER, global_batch_size INTEGER, steps BIGINT, params BIGINT,
        params_nonemb BIGINT, tokens BIGINT, steps_done BIGINT, tokens_done BIGINT, final_loss JSON,
        wall_s DOUBLE, status VARCHAR, flops_6nd DOUBLE, flops_6nd_nonemb DOUBLE, flops_exact DOUBLE,
        flops_exact_nonemb DOUBLE, out_dir VARCHAR, config_hash VARCHAR, git_commit VARCHAR, git_dirty BOOLEAN,
        packages JSON, input_hashes JSON, file_hashes JSON, config JSON, blend JSON, ingested_at TIMESTAMP,
        arm VARCHAR, arm_panel VARCHAR, iplt JSON, flops_spent DOUBLE, flops_spent_6nd DOUBLE,
        flops_inherited DOUBLE, final_params BIGINT, final_shape JSON, prune JSON, branches JSON, provenance JSON,
        simulated BOOLEAN, PRIMARY KEY (study, run_id)""",
    "checkpoints": """study VARCHAR, run_id VARCHAR, kind VARCHAR, step BIGINT, path VARCHAR, config_hash VARCHAR""",
    "train_metrics": """study VARCHAR, run_id VARCHAR, step BIGINT, tokens BIGINT, loss DOUBLE, lr DOUBLE,
        grad_norm DOUBLE, tokens_per_s DOUBLE, mem_bytes DOUBLE, mfu DOUBLE, config_hash VARCHAR,
        branch BIGINT""",
    "evals": """study VARCHAR, run_id VARCHAR, step BIGINT, tokens BIGINT, lang VARCHAR, loss DOUBLE, ppl DOUBLE,
        bpb DOUBLE, n_tokens BIGINT, flops DOUBLE, flops_6nd DOUBLE, config_hash VARCHAR, branch BIGINT""",
    "data_manifests": """study VARCHAR, lang VARCHAR, train_docs BIGINT, train_tokens BIGINT, train_bytes BIGINT,
        train_chars BIGINT, valid_docs BIGINT, valid_tokens BIGINT, valid_bytes BIGINT, valid_chars BIGINT,
        tokens_per_byte DOUBLE, tokens_per_char DOUBLE, vocab_size INTEGER, tokenizer_hash VARCHAR,
        docs_hash VARCHAR, config_hash VARCHAR, git_commit VARCHAR, git_dirty BOOLEAN, input_hashes JSON,
        file_hash VARCHAR, raw JSON""",
    "blend_realizations": """study VARCHAR, run_id VARCHAR, phase VARCHAR, phase_index INTEGER,
        start_step BIGINT, end_step BIGINT, source VARCHAR, planned_share DOUBLE, realized_share DOUBLE,
        samples BIGINT, tokens BIGINT, available_tokens BIGINT, epochs DOUBLE, config_hash VARCHAR""",
    "transfer": """study VARCHAR, run_id VARCHAR, scratch_run_id VARCHAR, source_run_id VARCHAR, size VARCHAR,
        lang VARCHAR, source_lang VARCHAR, replay DOUBLE, step BIGINT, tokens BIGINT, target_tokens DOUBLE,
        loss DOUBLE, flops DOUBLE, flops_total DOUBLE, scratch_tokens_equiv DOUBLE, scratch_flops_equiv DOUBLE,
        tokens_saved DOUBLE, flops_saved DOUBLE, frac_saved DOUBLE, flops_saved_total DOUBLE,
        frac_saved_total DOUBLE, effective_data_transferred DOUBLE, extrapolated BOOLEAN, config_hash VARCHAR""",
    "forgetting": """study VARCHAR, run_id VARCHAR, size VARCHAR, replay DOUBLE, step BIGINT, tokens BIGINT,
        source_lang VARCHAR, source_loss DOUBLE, source_final_loss DOUBLE, forgetting DOUBLE,
        config_hash VARCHAR""",
    "fits": """study VARCHAR, fit_id VARCHAR, file VARCHAR, law VARCHAR, kind VARCHAR, params JSON, fixed JSON,
        meta JSON, intervals JSON, heldout JSON, raw JSON, file_hash VARCHAR, config_hash VARCHAR,
        git_commit VARCHAR, git_dirty BOOLEAN, loss VARCHAR, delta DOUBLE, reduction VARCHAR, optimizer VARCHAR,
        grid JSON, selection JSON, excluded JSON, input_hash VARCHAR""",
    "predictions": """study VARCHAR, fit_id VARCHAR, kind VARCHAR, row_kind VARCHAR, run_id VARCHAR, N DOUBLE,
        D DOUBLE, C DOUBLE, predicted_loss DOUBLE, observed_loss DOUBLE, extra JSON""",
    "ingest_log": """study VARCHAR, key VARCHAR, fingerprint VARCHAR, ingested_at TIMESTAMP,
        PRIMARY KEY (study, key)""",
    "meta": """key VARCHAR PRIMARY KEY, value VARCHAR""",
}


RUN_TABLES = ("runs", "checkpoints", "train_metrics", "evals", "blend_realizations", "transfer", "forgetting")


TABLES = tuple(t for t in SCHEMA if t not in ("ingest_log", "meta"))


RUN_FILES = ("run.json", "metrics.jsonl", "evals.jsonl", "done.json", "blend.json", "transfer.json", "prune.jsonl",
             "branch_metrics.jsonl")


#: Columns added after schema version 1, by table: an older database gains them on the next ingest
#: (and every run and fit file is re-ingested once, so the new columns are filled for old rows too).
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "runs": {"arm": "VARCHAR", "arm_panel": "VARCHAR", "iplt": "JSON", "flops_spent": "DOUBLE",
             "flops_spent_6nd": "DOUBLE", "flops_inherited": "DOUBLE", "final_params": "BIGINT",
             "final_shape": "JSON", "prune": "JSON", "branches": "JSON", "provenance": "JSON",
             "simulated": "BOOLEAN"},
    "evals": {"branch": "BIGINT"},
    "train_metrics": {"branch": "BIGINT"},
    "fits": {"loss": "VARCHAR", "delta": "DOUBLE", "reduction": "VARCHAR", "optimizer": "VARCHAR", "grid": "JSON",
             "selection": "JSON", "excluded": "JSON", "input_hash": "VARCHAR"},
}


#: The fits columns filled from a fit's ``meta`` (the choices every loss-law fit records).
FIT_CHOICES = ("loss", "delta", "reduction", "optimizer", "grid", "selection", "excluded", "input_hash")


#: Provenance fields the trainer's done.json may record at training time (preferred over run.json's,
#: which the planner wrote before the job ran, possibly from another checkout).
PROVENANCE_FIELDS = ("git_commit", "git_dirty", "packages", "config_hash", "input_hashes")


def create_schema(con: Any) -> None:
    """Create the tables; an older database gains the columns added since (ADDED_COLUMNS) and forgets
    its ingest log, so the next ingest re-reads every run and fills them."""
    old = None
    if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()[0]:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        old = int(row[0]) if row else None
    for t, cols in SCHEMA.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {t} ({cols})")
    for t, cols in ADDED_COLUMNS.items():
        for name, typ in cols.items():
            con.execute(f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {name} {typ}")
    if old is not None and old < SCHEMA_VERSION:
        con.execute("DELETE FROM ingest_log")
    con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])


def default_db(study_dir: str | os.PathLike[str]) -> Path:
    return Path(study_dir) / "cptscale.duckdb"
