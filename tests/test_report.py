"""Report stage: figures from a store the real stages built (generated study tree, real ingest and\nfits), offline HTML rendered in headless Chromium; the demo test renders one from real runs."""

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
#: Figures of study kinds a plain CPT scaling study does not have (they give a "missing" note here; the
#: study tests draw them from real IPLT / variant / next-run studies).
OPTIONAL = {"iplt", "variants", "next_run"}
CORE = set(report.BUILDERS) - OPTIONAL


def make_db(path: Path, n_sizes: int = 3, replays: tuple[float, ...] = (0.0, 0.1, 0.3), n_evals: int = 12,
            n_steps: int = 50, with_fits: bool = True, bootstrap: int = 8) -> str:
    """A study store built by the real stages from a generated study tree (store.generate_study: every
    file in the formats the trainer writes): ingest, transfer metrics, points, fit-study, ingest again.
    Returns the study name."""
    from cptscale import store
    from cptscale.fit import fit_study

    sdir = path.parent / "gen" / "s"
    inits = ("scratch", "cpt") if replays else ("scratch",)
    store.generate_study(sdir, sizes=n_sizes, inits=inits, replays=replays or (0.0,), steps_per_run=n_steps,
                         evals_per_run=n_evals, study="s")
    store.write_generated_transfers(sdir)
    assert store.ingest(sdir, path).ok
    if with_fits:
        points = sdir / "fits" / "points.csv"
        store.write_points_table(str(path), "s", points)
        fit_study(str(points), str(sdir / "fits"), budgets=[1e20, 1e21], bootstrap=bootstrap, grid="coarse",
                  db=str(path), study="s")
        assert store.ingest(sdir, path).ok
    return "s"


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


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3-size CPT study store shared by the tests that only read it."""
    db = tmp_path_factory.mktemp("store") / "s.duckdb"
    make_db(db)
    return db


def test_build_report_full(tmp_path: Path, study_db: Path) -> None:
    db = study_db
    info = report.build_report(db, "s", tmp_path / "report", images=True)
    assert set(info["missing"]) == OPTIONAL & set(report.BUILDERS), info["missing"]
    assert set(info["drawn"]) == CORE
    for name in CORE:
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
    make_db(db, replays=())  # scratch runs only: the scratch fit exists, CPT figures do not
    info = report.build_report(db, "s", tmp_path / "r", images=False)
    assert "loss_compute" in info["drawn"] and "isoloss" in info["drawn"]
    assert "transfer" in info["missing"] and "replay" in info["missing"]


def test_cli(tmp_path: Path, study_db: Path) -> None:
    from cptscale.cli import main

    db = study_db
    assert main(["report", "--db", str(db), "--study", "s", "--out-dir", str(tmp_path / "r"), "--no-images"]) == 0
    assert (tmp_path / "r" / "index.html").exists()
    assert main(["report", "--db", str(tmp_path / "nope.duckdb"), "--study", "s", "--out-dir", str(tmp_path)]) == 2


# ---------------------------------------------------------------- browser


needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (/usr/bin/chromium)")


@pytest.mark.browser
@needs_chromium
def test_page_renders_offline(tmp_path: Path, study_db: Path) -> None:
    db = study_db
    info = report.build_report(db, "s", tmp_path / "report", images=False)
    t0 = time.perf_counter()
    res = render(tmp_path / "report" / "index.html", ARTIFACTS / "report-small.png")
    print(f"small page: {info['page_bytes'] / 1e6:.2f} MB, render {time.perf_counter() - t0:.1f}s, marks {res['status']}")
    st = res["status"]
    assert st is not None, res["stderr"][-2000:]
    assert st["errors"] == []
    assert set(st["rendered"]) == set(info["drawn"]) == CORE
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
    assert set(st["rendered"]) == set(info["drawn"]) == CORE
    assert t_render < 60
