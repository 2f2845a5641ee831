"""Report stage: figures from a synthetic store, offline HTML rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cptscale import report

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def make_db(path: Path, n_sizes: int = 3, replays: tuple[float, ...] = (0.0, 0.1, 0.3), n_evals: int = 12,
            n_steps: int = 50, with_fits: bool = True) -> None:
    """A small store with the contract's table and column names (until cptscale.store lands)."""
    import duckdb
    import numpy as np

    con = duckdb.connect(str(path))
    con.execute("create table runs(study varchar, run_id varchar, size varchar, init varchar, lang varchar, "
                "source_lang varchar, replay double, params bigint, tokens bigint, steps int, status varchar)")
    con.execute("create table train_metrics(study varchar, run_id varchar, step int, tokens bigint, loss double, lr double)")
    con.execute("create table evals(study varchar, run_id varchar, step int, tokens bigint, lang varchar, loss double, flops double)")
    con.execute("create table transfer(study varchar, run_id varchar, size varchar, lang varchar, replay double, step int, "
                "tokens bigint, loss double, flops double, flops_saved double, effective_data_transferred double)")
    con.execute("create table blend_realizations(study varchar, run_id varchar, phase varchar, source varchar, "
                "planned_share double, realized_share double)")
    con.execute("create table data_manifests(study varchar, lang varchar, tokens_per_byte double, tokens_per_char double)")
    con.execute("create table fits(study varchar, fit_id varchar, law varchar, kind varchar, params json, fixed json, "
                "meta json, heldout json)")
    con.execute("create table predictions(study varchar, fit_id varchar, kind varchar, N double, D double, C double, "
                "predicted_loss double, observed_loss double)")
    rng = np.random.default_rng(0)
    law = {"E": 1.55, "A": 420.0, "alpha": 0.40, "B": 719.5, "beta": 0.30}
    cpt = {"B'": 433.3, "beta'": 0.20, "gamma": 0.08}
    con.execute("insert into data_manifests values ('s','zh',0.45,1.3),('s','en',0.27,0.25)")
    con.execute("insert into fits values ('s','scratch_chinchilla','chinchilla','scratch',?,'{}','{}',?)",
                [json.dumps(law), json.dumps({"mae": 0.012, "max_abs_err": 0.03})])
    if with_fits:
        con.execute("insert into fits values ('s','cpt_extended','extended_cpt','cpt',?,?,'{}',?)",
                    [json.dumps(cpt), json.dumps({k: law[k] for k in ("E", "A", "alpha")}),
                     json.dumps({"mae": 0.02, "rel_err": 0.01})])
    runs, tm, ev, tr, bl, pr = [], [], [], [], [], []
    for i in range(n_sizes):
        n = 2e7 * 1.6**i
        size = f"{n / 1e6:.0f}M"
        d_total = 20 * n
        for init in ("scratch", "cpt"):
            for rep in (replays if init == "cpt" else (0.0,)):
                rid = f"{size}-{init}-r{int(rep * 100)}"
                runs.append(("s", rid, size, init, "zh", "en", rep, int(n), int(d_total), n_steps, "done"))
                for k in range(n_steps):
                    f = (k + 1) / n_steps
                    d = d_total * f
                    lr = 2e-4 * min(1, f / 0.05) * (0.5 * (1 + np.cos(np.pi * f)))
                    loss = law["E"] + law["A"] / n**law["alpha"] + law["B"] / d**law["beta"] + rng.normal(0, 0.01)
                    tm.append(("s", rid, k, int(d), loss, lr))
                for k in range(n_evals):
                    d = d_total * (k + 1) / n_evals
                    if init == "cpt":
                        tl = law["E"] + law["A"] / n**law["alpha"] + cpt["B'"] / (d**cpt["beta'"] * n**cpt["gamma"])
                        sl = 2.4 + 1.2 * (1 - rep) ** 2 * (k + 1) / n_evals
                        ev.append(("s", rid, k, int(d), "en", sl, 6 * n * d))
                        if rep == 0:
                            ts = 1.4 * d
                            tr.append(("s", rid, size, "zh", rep, k, int(d), tl, 6 * n * d, 6 * n * (ts - d) / (6 * n * ts),
                                       ts - d))
                    else:
                        tl = law["E"] + law["A"] / n**law["alpha"] + law["B"] / d**law["beta"]
                        pr.append(("s", "scratch_chinchilla", "scratch", n, d, 6 * n * d, tl + rng.normal(0, 0.01), tl))
                    ev.append(("s", rid, k, int(d), "zh", tl, 6 * n * d))
                for src, share in (("zh", 1 - rep), ("en", rep)):
                    if share:
                        bl.append(("s", rid, "cpt" if init == "cpt" else "scratch", src, share,
                                   share + rng.normal(0, 0.003)))
    con.executemany("insert into runs values (?,?,?,?,?,?,?,?,?,?,?)", runs)
    for name, rows in (("train_metrics", tm), ("evals", ev), ("transfer", tr), ("blend_realizations", bl),
                       ("predictions", pr)):
        if rows:
            import pandas as pd

            cols = [r[0] for r in con.execute(f"describe {name}").fetchall()][: len(rows[0])]
            frame = pd.DataFrame(rows, columns=cols)  # noqa: F841 (read by DuckDB's replacement scan)
            con.execute(f"insert into {name} ({', '.join(cols)}) select * from frame")
    con.close()


def render(html_path: Path, screenshot: Path | None = None, timeout: int = 55) -> dict:
    """Open the page in headless Chromium with networking disabled; return the page's render status."""
    prof = tempfile.mkdtemp(prefix="chromium-")
    flags = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={prof}", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw",
    ]
    try:
        out = subprocess.run([*flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True,
                             timeout=timeout)
        m = re.search(r'<pre id="render-status"[^>]*>(.*?)</pre>', out.stdout, re.S)
        status = json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")) if m and m.group(1) else None
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1400,5200", html_path.as_uri()],
                           capture_output=True, timeout=timeout)
        return {"status": status, "stderr": out.stderr}
    finally:
        shutil.rmtree(prof, ignore_errors=True)


# ---------------------------------------------------------------- tests without a browser


def test_build_report_full(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    make_db(db)
    info = report.build_report(db, "s", tmp_path / "report", images=True)
    assert info["missing"] == {}, info["missing"]
    assert set(info["drawn"]) == set(report.BUILDERS)
    for name in report.BUILDERS:
        assert (tmp_path / "report" / "figures" / f"{name}.svg").stat().st_size > 1000
        assert (tmp_path / "report" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "report" / "index.html").read_text()
    assert "default-src 'none'" in page
    assert not re.search(r'<script[^>]+src=|<link[^>]+href=["\']https?:', page)
    assert json.loads((tmp_path / "report" / "report.json").read_text())["page_bytes"] > 0


def test_missing_data_gives_notes(tmp_path: Path) -> None:
    import duckdb

    db = tmp_path / "empty.duckdb"
    con = duckdb.connect(str(db))
    con.execute("create table runs(study varchar, run_id varchar, size varchar, init varchar, lang varchar)")
    con.execute("insert into runs values ('s','a','20M','scratch','zh')")
    con.close()
    info = report.build_report(db, "s", tmp_path / "r", images=False)
    assert info["drawn"] == {}
    assert set(info["missing"]) == set(report.BUILDERS)
    page = (tmp_path / "r" / "index.html").read_text()
    assert "missing: table `evals`" in page


def test_only_scratch_runs(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    make_db(db, replays=(), with_fits=False)
    info = report.build_report(db, "s", tmp_path / "r", images=False)
    assert "loss_compute" in info["drawn"] and "isoloss" in info["drawn"]
    assert "transfer" in info["missing"] and "replay" in info["missing"]


def test_cli(tmp_path: Path) -> None:
    from cptscale.cli import main

    db = tmp_path / "s.duckdb"
    make_db(db, n_sizes=2)
    assert main(["report", "--db", str(db), "--study", "s", "--out-dir", str(tmp_path / "r"), "--no-images"]) == 0
    assert (tmp_path / "r" / "index.html").exists()
    assert main(["report", "--db", str(tmp_path / "nope.duckdb"), "--study", "s", "--out-dir", str(tmp_path)]) == 2


# ---------------------------------------------------------------- browser


needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (/usr/bin/chromium)")


@pytest.mark.browser
@needs_chromium
def test_page_renders_offline(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    make_db(db)
    info = report.build_report(db, "s", tmp_path / "report", images=False)
    t0 = time.perf_counter()
    res = render(tmp_path / "report" / "index.html", ARTIFACTS / "report-small.png")
    print(f"small page: {info['page_bytes'] / 1e6:.2f} MB, render {time.perf_counter() - t0:.1f}s, marks {res['status']}")
    st = res["status"]
    assert st is not None, res["stderr"][-2000:]
    assert st["errors"] == []
    assert set(st["rendered"]) == set(report.BUILDERS)
    for name, n in st["rendered"].items():
        assert n >= min(info["drawn"][name]["rows"], 10), (name, n)


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
def test_large_study_renders(tmp_path: Path) -> None:
    db = tmp_path / "big.duckdb"
    make_db(db, n_sizes=40, replays=(0.0, 0.01, 0.05, 0.1, 0.2, 0.5), n_evals=40, n_steps=2000)
    t0 = time.perf_counter()
    info = report.build_report(db, "s", tmp_path / "report", images=False, max_points=200)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = render(tmp_path / "report" / "index.html", ARTIFACTS / "report-large.png")
    t_render = time.perf_counter() - t0
    print(f"large page: {info['page_bytes'] / 1e6:.2f} MB, build {t_build:.1f}s, render {t_render:.1f}s, "
          f"marks {res['status'] and res['status']['rendered']}")
    st = res["status"]
    assert st is not None and st["errors"] == []
    assert set(st["rendered"]) == set(report.BUILDERS)
    assert t_render < 60
