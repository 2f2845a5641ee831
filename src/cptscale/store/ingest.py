"""The DuckDB results store: one aggregate step ingests every job's files; jobs never touch the DB.

Ingest is

* **atomic**: the new database is built in a private temp file (a copy of the previous database plus
  the changes), checkpointed and closed — so no ``.wal`` is left beside it — then ``os.replace``-d over
  the old file. A killed ingest leaves the previous database byte-for-byte intact (the stale temp file
  is removed by the next ingest). A lock file serialises concurrent ingests.
* **idempotent**: every run / study file set has a content fingerprint in ``ingest_log``; an unchanged
  run is skipped, a changed (re-run) one has all its rows deleted and re-inserted.
* **strict about bad input**: a malformed or truncated JSONL line is reported as ``path:line``; that
  run is skipped (its old rows stay) and the exit status is 1, unless ``allow_partial`` keeps the
  good lines.

* **published, not exposed**: the workflow ingests into a persistent store (``db/store.duckdb``) that is
  not a Snakemake output (Snakemake deletes outputs before a job runs and after it fails) and then
  copies it atomically to the declared output (``--publish``, :func:`publish`).

Every ``runs`` row carries config hash, git commit + dirty flag, package versions and input hashes (the
trainer's record from done.json where it wrote one, else the planner's from run.json; ``runs.provenance``
says which); every other run-level row carries ``study``, ``run_id`` and ``config_hash`` so it joins back
to them. ``evals.branch`` is NULL for the main trajectory and a WSD decay branch's total steps for that
branch's evals: queries of loss curves read ``WHERE branch IS NULL``. ``train_metrics.branch`` is the
same for the training steps (branch_metrics.jsonl) of those branches.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptscale.store.readers import BadInput, _fit_rows, _j, _manifest_row, _now, _run_rows
from cptscale.store.schema import RUN_FILES, RUN_TABLES, TABLES, create_schema, default_db
from cptscale.util import file_hash, file_lock, read_json, stable_hash


@dataclass
class IngestReport:
    db_path: str
    study: str
    runs_seen: int = 0
    runs_ingested: int = 0
    runs_unchanged: int = 0
    runs_skipped: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  #: rows inserted this time, per table
    totals: dict[str, int] = field(default_factory=dict)  #: rows in the database afterwards
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        ins = ", ".join(f"{k}+{v}" for k, v in self.rows.items() if v) or "nothing new"
        return (f"{self.db_path}: study {self.study}: {self.runs_seen} runs ({self.runs_ingested} ingested, "
                f"{self.runs_unchanged} unchanged, {self.runs_skipped} skipped) in {self.seconds:.2f}s; {ins}")


@contextlib.contextmanager
def _lock(db: Path) -> Iterator[None]:
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(db.with_name(db.name + ".lock")):
        yield


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(store: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy the persistent store to ``dest`` atomically (temp file beside it, fsync, rename).

    The workflow ingests into a store that is *not* a Snakemake output (Snakemake deletes a job's
    outputs before it runs and after it fails, which would lose the database) and publishes a copy as
    the declared output. The copy is taken under the store's ingest lock, so it is never half-updated.
    """
    from cptscale.util import atomic_path

    src, dst = Path(store), Path(dest)
    if src.resolve() == dst.resolve():
        raise ValueError(f"--publish {dest}: the published copy must differ from the store --db {store}")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no store to publish; ingest into it first")
    with _lock(src), atomic_path(dst) as tmp, open(src, "rb") as fi, open(tmp, "wb") as fo:
        while block := fi.read(1 << 24):
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    _fsync_dir(dst.parent)
    return dst


def _insert(con: Any, table: str, df: Any) -> int:
    if df is None or len(df) == 0:
        return 0
    con.register("_new_rows", df)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _new_rows")
    finally:
        con.unregister("_new_rows")
    return len(df)


def _fingerprint(files: Sequence[Path]) -> dict[str, str]:
    return {p.name: file_hash(p) for p in files if p.exists()}


class MixedStore(Exception):
    """Simulated and trained runs would end up in one store without ``allow_mixed``."""


def ingest(study_dir: str | os.PathLike[str], db_path: str | os.PathLike[str] | None = None, *,
           allow_partial: bool = False, allow_mixed: bool = False, _pause_before_replace: float = 0.0) -> IngestReport:
    """Ingest one study directory into ``db_path`` atomically (see the module docstring). Simulated runs
    (``runs.simulated``) and trained ones never share a store silently: unless ``allow_mixed``, an ingest
    that would mix them raises :class:`MixedStore` and leaves the store as it was."""
    import duckdb

    t0 = time.perf_counter()
    sdir = Path(study_dir)
    db = Path(db_path) if db_path else default_db(sdir)
    sj = read_json(sdir / "study.json") if (sdir / "study.json").exists() else {}
    run_dirs = sorted(p for p in (sdir / "runs").glob("*") if (p / "run.json").exists())
    study = sj.get("study")
    if not study and run_dirs:
        study = read_json(run_dirs[0] / "run.json").get("study")
    study = study or sdir.name
    rep = IngestReport(str(db), study)
    with _lock(db):
        for stale in db.parent.glob(f".{db.name}.ingest-*"):
            stale.unlink(missing_ok=True)  # left by a killed ingest; we hold the lock
        tmp = db.with_name(f".{db.name}.ingest-{os.getpid()}.tmp")
        try:  # the copy too: a disk that fills up during it must not leave a partial copy behind
            if db.exists():
                if db.with_name(db.name + ".wal").exists():  # someone wrote with a raw client: fold it in first
                    duckdb.connect(str(db)).close()
                with open(db, "rb") as src, open(tmp, "wb") as dst:
                    while block := src.read(1 << 24):
                        dst.write(block)
            con = duckdb.connect(str(tmp))
            try:
                create_schema(con)
                _ingest_into(con, sdir, study, sj, run_dirs, rep, allow_partial=allow_partial)
                if not allow_mixed:
                    _refuse_mixed(con, db)
                rep.totals = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
                con.execute("CHECKPOINT")
            finally:
                con.close()
            if tmp.with_name(tmp.name + ".wal").exists():
                raise RuntimeError(f"{tmp}.wal left after close; refusing to replace {db}")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if _pause_before_replace:  # test hook: widen the window a SIGKILL can hit
                print(f"ingest: {tmp} complete, pausing before replace", file=sys.stderr, flush=True)
                time.sleep(_pause_before_replace)
            os.replace(tmp, db)
            _fsync_dir(db.parent)
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
    rep.seconds = time.perf_counter() - t0
    return rep


def _ingest_study_row(con: Any, sdir: Path, study: str, sj: dict[str, Any], log: dict[str, str],
                      new_log: dict[str, str], rep: IngestReport) -> None:
    """The studies row (with the tokenizer report) when study.json or the report changed."""
    import pandas as pd

    files = [sdir / "study.json", sdir / "tokenizer" / "report.json"]
    fp = stable_hash(_fingerprint(files))
    if log.get("study") == fp or not any(f.exists() for f in files):
        return
    prov = sj.get("provenance") or {}
    tok = read_json(files[1]) if files[1].exists() else None
    con.execute("DELETE FROM studies WHERE study = ?", [study])
    rep.rows["studies"] += _insert(con, "studies", pd.DataFrame.from_records([{
        "study": study, "config_hash": sj.get("config_hash"), "config": _j(sj.get("config")),
        "expected_runs": _j(sj.get("expected_runs")), "n_expected_runs": len(sj.get("expected_runs") or []),
        "study_dir": str(sdir.resolve()), "git_commit": prov.get("git_commit"),
        "git_dirty": prov.get("git_dirty"), "packages": _j(prov.get("packages")),
        "input_hashes": _j(prov.get("input_hashes")), "provenance": _j(prov), "tokenizer_report": _j(tok),
        "ingested_at": _now()}]))
    new_log["study"] = fp


def _ingest_manifests(con: Any, sdir: Path, study: str, log: dict[str, str], new_log: dict[str, str],
                      rep: IngestReport) -> None:
    """Each language's changed data manifest (a malformed one is an error of the report, not raised)."""
    import pandas as pd

    for mpath in sorted((sdir / "data").glob("*/data.json")):
        lang, fh = mpath.parent.name, file_hash(mpath)
        if log.get(f"data/{lang}") == fh:
            continue
        try:
            row = _manifest_row(study, lang, read_json(mpath), fh)
        except ValueError as exc:
            rep.errors.append(f"{mpath}: malformed JSON ({exc}); re-run `cptscale data index --lang {lang}`")
            continue
        con.execute("DELETE FROM data_manifests WHERE study = ? AND lang = ?", [study, row["lang"]])
        rep.rows["data_manifests"] += _insert(con, "data_manifests", pd.DataFrame.from_records([row]))
        new_log[f"data/{lang}"] = fh


def _ingest_fits(con: Any, sdir: Path, study: str, log: dict[str, str], new_log: dict[str, str],
                 rep: IngestReport) -> None:
    """Each changed fit file's fits and predictions, replacing what the file (or its fit ids) held before."""
    import pandas as pd

    for fpath in sorted((sdir / "fits").glob("*.json")):
        fh = file_hash(fpath)
        if log.get(f"fit/{fpath.name}") == fh:
            continue
        try:
            fits, preds = _fit_rows(study, fpath, fh)
        except BadInput as exc:
            rep.errors.append(str(exc))
            continue
        con.execute("DELETE FROM predictions WHERE study = ? AND fit_id IN (SELECT fit_id FROM fits "
                    "WHERE study = ? AND file = ?)", [study, study, str(fpath)])
        con.execute("DELETE FROM fits WHERE study = ? AND file = ?", [study, str(fpath)])
        ids = sorted({f["fit_id"] for f in fits} | {p["fit_id"] for p in preds})
        if ids:
            con.execute("DELETE FROM predictions WHERE study = ? AND list_contains(?, fit_id)", [study, ids])
        rep.rows["fits"] += _insert(con, "fits", pd.DataFrame.from_records(fits) if fits else None)
        rep.rows["predictions"] += _insert(con, "predictions", pd.DataFrame.from_records(preds) if preds else None)
        new_log[f"fit/{fpath.name}"] = fh


def _read_changed_runs(run_dirs: list[Path], study: str, log: dict[str, str], new_log: dict[str, str],
                       rep: IngestReport, *, allow_partial: bool) -> tuple[list[str], dict[str, list[Any]]]:
    """Parse every run whose files changed since the last ingest: their ids and their rows per table (a bad
    run is skipped with its error in the report)."""
    batches: dict[str, list[Any]] = {t: [] for t in RUN_TABLES}
    changed: list[str] = []
    for rdir in run_dirs:
        rep.runs_seen += 1
        hashes = _fingerprint([rdir / f for f in RUN_FILES])
        fp = stable_hash(hashes)
        if log.get(f"run/{rdir.name}") == fp:
            rep.runs_unchanged += 1
            continue
        problems: list[str] = []
        try:
            rows = _run_rows(rdir, study, allow_partial=allow_partial, problems=problems)
        except BadInput as exc:
            rep.errors.append(str(exc))
            rep.runs_skipped += 1
            continue
        except (KeyError, TypeError, ValueError) as exc:
            rep.errors.append(f"{rdir}: unexpected content ({type(exc).__name__}: {exc}); check the run's files")
            rep.runs_skipped += 1
            continue
        rep.warnings.extend(problems)
        rows["runs"][0]["file_hashes"] = _j(hashes)
        changed.append(rows["runs"][0]["run_id"])
        for t in RUN_TABLES:
            v = rows.get(t)
            if v is None or not len(v):
                continue
            if isinstance(v, list):
                batches[t].extend(v)
            else:
                batches[t].append(v)
        # a partial (allow_partial) ingest must be retried once the files are fixed
        new_log[f"run/{rdir.name}"] = fp if not problems else f"partial:{fp}"
        rep.runs_ingested += 1
    return changed, batches


def _replace_runs(con: Any, study: str, changed: list[str], batches: dict[str, list[Any]],
                  rep: IngestReport) -> None:
    """One delete of the changed runs' rows and one insert per table."""
    import pandas as pd

    con.register("_changed", pd.DataFrame({"run_id": changed}))
    for t in RUN_TABLES:
        con.execute(f"DELETE FROM {t} WHERE study = ? AND run_id IN (SELECT run_id FROM _changed)", [study])
    con.unregister("_changed")
    for t in RUN_TABLES:
        b = batches[t]
        if not b:
            continue
        if isinstance(b[0], dict):
            df = pd.DataFrame.from_records(b)
            if "branch" in df.columns:  # NULL for the main trajectory: a nullable integer, not float NaN
                df["branch"] = df["branch"].astype("Int64")
        else:
            df = b[0] if len(b) == 1 else pd.concat(b, ignore_index=True)
        rep.rows[t] += _insert(con, t, df)


def _ingest_into(con: Any, sdir: Path, study: str, sj: dict[str, Any], run_dirs: list[Path],
                 rep: IngestReport, *, allow_partial: bool) -> None:
    """Every changed file of the study into ``con`` (the staging copy), and the ingest log of what was read."""
    log = dict(con.execute("SELECT key, fingerprint FROM ingest_log WHERE study = ?", [study]).fetchall())
    new_log: dict[str, str] = {}
    rep.rows = dict.fromkeys(TABLES, 0)
    _ingest_study_row(con, sdir, study, sj, log, new_log, rep)
    _ingest_manifests(con, sdir, study, log, new_log, rep)
    _ingest_fits(con, sdir, study, log, new_log, rep)
    changed, batches = _read_changed_runs(run_dirs, study, log, new_log, rep, allow_partial=allow_partial)
    if changed:
        _replace_runs(con, study, changed, batches, rep)
    if new_log:
        now = _now()
        con.executemany("INSERT OR REPLACE INTO ingest_log VALUES (?, ?, ?, ?)",
                        [(study, k, v, now) for k, v in new_log.items()])


def _refuse_mixed(con: Any, db: Path) -> None:
    sim, trained = con.execute("SELECT count(*) FILTER (WHERE simulated), count(*) FILTER (WHERE NOT "
                               "coalesce(simulated, false)) FROM runs").fetchone()
    if sim and trained:
        studies = con.execute("SELECT study, count(*) FILTER (WHERE simulated), count(*) FILTER (WHERE NOT "
                              "coalesce(simulated, false)) FROM runs GROUP BY study ORDER BY study").fetchall()
        where = "; ".join(f"{st}: {a} simulated, {b} trained" for st, a, b in studies)
        raise MixedStore(
            f"{db}: this ingest would mix {sim} simulated runs (train.backend: simulate) with {trained} trained runs "
            f"({where}); the store is left unchanged. Keep simulated studies in their own store (their own "
            "study name and results_dir), or pass --allow-mixed (`store: {allow_mixed: true}` in the study "
            "config) to keep both, each row flagged in runs.simulated")
