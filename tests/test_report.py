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

from cptscale.report.figures import BUILDERS, fig_health_curves, fig_health_lr
from cptscale.report.page import build_report

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
#: Figures of study kinds a plain CPT scaling study does not have (they give a "missing" note here; the
#: study tests draw them from real IPLT / variant / next-run / existing-model studies).
OPTIONAL = {"iplt", "variants", "next_run", "existing"}
CORE = set(BUILDERS) - OPTIONAL


def make_db(path: Path, n_sizes: int = 3, replays: tuple[float, ...] = (0.0, 0.1, 0.3), n_evals: int = 12,
            n_steps: int = 50, with_fits: bool = True, bootstrap: int = 8, lang: str = "zh",
            source_lang: str = "en") -> str:
    """A study store built by the real stages from a generated study tree (store.generate_study: every
    file in the formats the trainer writes): ingest, transfer metrics, points, fit-study, ingest again.
    Returns the study name."""
    from cptscale.fit.study import fit_study
    from cptscale.store.ingest import ingest
    from cptscale.store.queries import write_points_table
    from cptscale.store.synthetic import generate_study, write_generated_transfers

    sdir = path.parent / "gen" / "s"
    inits = ("scratch", "cpt") if replays else ("scratch",)
    generate_study(sdir, sizes=n_sizes, inits=inits, replays=replays or (0.0,), steps_per_run=n_steps,
                         evals_per_run=n_evals, study="s", lang=lang, source_lang=source_lang)
    write_generated_transfers(sdir)
    assert ingest(sdir, path).ok
    if with_fits:
        points = sdir / "fits" / "points.csv"
        write_points_table(str(path), "s", points)
        fit_study(str(points), str(sdir / "fits"), budgets=[1e20, 1e21], bootstrap=bootstrap, grid="coarse",
                  db=str(path), study="s", points_mode="all")  # generated cosine curves: no WSD branch ends
        assert ingest(sdir, path).ok
    return "s"


def render(html_path: Path, screenshot: Path | None = None, timeout: int = 55) -> dict:
    """Open the page in headless Chromium with networking disabled; return the page's render status
    (figures' data marks, errors, warnings, requests), Chromium's console log lines, the time each pass
    took and, with ``screenshot``, the screenshot's exit status and size."""
    prof = tempfile.mkdtemp(prefix="chromium-")
    flags = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={prof}", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw",
        "--enable-logging=stderr", "--v=0",  # every console message (and blocked loads) on stderr
    ]
    try:
        t0 = time.perf_counter()
        out = subprocess.run([*flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True,
                             timeout=timeout)
        render_s = time.perf_counter() - t0
        m = re.search(r'<pre id="render-status"[^>]*>(.*?)</pre>', out.stdout, re.S)
        status = json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")) if m and m.group(1) else None
        res = {"status": status, "stderr": out.stderr, "render_s": render_s,
               "console": re.findall(r":CONSOLE[^\]]*\] (.*)", out.stderr)}
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.unlink(missing_ok=True)  # an old file must not pass for a new one
            t0 = time.perf_counter()
            shot = subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1400,5200", html_path.as_uri()],
                                  capture_output=True, text=True, timeout=timeout)
            res["screenshot"] = {"rc": shot.returncode, "path": screenshot,
                                 "bytes": screenshot.stat().st_size if screenshot.exists() else 0,
                                 "s": time.perf_counter() - t0, "stderr": shot.stderr[-2000:]}
        return res
    finally:
        shutil.rmtree(prof, ignore_errors=True)


def page_specs(html_path: Path) -> dict[str, dict]:
    """The Vega-Lite spec of every figure, as the page embeds it."""
    m = re.search(r"const specs = (.*);\nconst status", html_path.read_text())
    assert m, f"no specs in {html_path}"
    return json.loads(m.group(1))


#: Vega mark type of each Vega-Lite mark (a line's `point` overlay adds symbols)
VEGA_MARK = {"line": "line", "point": "symbol", "circle": "symbol", "square": "symbol", "rule": "rule",
             "bar": "rect", "rect": "rect", "tick": "rect", "text": "text", "area": "area", "trail": "trail"}


def expected_marks(spec: dict) -> dict[str, int]:
    """Data-mark items each Vega mark type should draw, counted from the rows the spec hands each mark
    (after the downsampling the report did and the spec's own filters): one item per row of a line, point,
    rule, bar or text mark, whose positional quantitative fields are valid numbers (Vega-Lite drops
    the others); twice that for a line with a point overlay."""
    import math
    from collections import Counter

    datasets = spec.get("datasets", {})
    counts: Counter[str] = Counter()

    def valid(row: dict, enc: dict) -> bool:
        for ch in ("x", "y", "x2", "y2"):
            e = enc.get(ch)
            if isinstance(e, dict) and "field" in e and (e.get("type") == "quantitative" or ch in ("x2", "y2")):
                v = row.get(e["field"])
                if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                    return False
        return True

    def walk(node: dict, rows: list[dict] | None, enc: dict) -> None:
        data = node.get("data")
        if data is not None:
            rows = datasets[data["name"]] if "name" in data else data["values"]
        for t in node.get("transform", []):
            f = t.get("filter")
            m = re.fullmatch(r"(!?)datum\.(\w+)", f) if isinstance(f, str) else None
            assert m, f"expected_marks does not know the transform {t}: extend it"
            rows = [r for r in rows or [] if bool(r.get(m.group(2))) != (m.group(1) == "!")]
        enc = {**enc, **node.get("encoding", {})}
        for child in node.get("layer", []):
            walk(child, rows, enc)
        for key in ("hconcat", "vconcat", "concat"):
            for child in node.get(key, []):
                walk(child, rows, {})
        if "spec" in node:  # a facet: its cells split the rows, the total stays
            walk(node["spec"], rows, {})
        if "mark" in node:
            mark = node["mark"] if isinstance(node["mark"], dict) else {"type": node["mark"]}
            n = sum(valid(r, enc) for r in rows or [])
            counts[VEGA_MARK[mark["type"]]] += n
            if mark.get("point"):
                counts["symbol"] += n

    walk(spec, None, {})
    return {k: v for k, v in counts.items() if v}


def check_rendered(res: dict, html_path: Path, drawn: dict) -> dict:
    """What every browser test asks of a rendered page: no console error or warning, no network request,
    every drawn figure rendered with exactly the data marks its spec's rows call for (per Vega mark type)
    and, when one was taken, a screenshot of real size in test-artifacts/. Returns the render status."""
    st = res["status"]
    assert st is not None, res["stderr"][-2000:]
    assert st["errors"] == [], st["errors"]
    assert st["warnings"] == [], st["warnings"]
    assert st["requests"] == [], st["requests"]
    assert res["console"] == [], res["console"]  # nothing logged at all (blocked loads log here too)
    assert set(st["rendered"]) == set(drawn), (set(st["rendered"]), set(drawn))
    specs = page_specs(html_path)
    for name in drawn:
        want = expected_marks(specs[name])
        assert want, f"{name}: the spec hands its marks no rows"
        assert st["marks"][name] == want, (name, st["marks"][name], want)
    shot = res.get("screenshot")
    if shot is not None:
        assert shot["rc"] == 0, shot["stderr"]
        assert shot["path"].resolve().is_relative_to(ARTIFACTS.resolve()), shot["path"]
        assert shot["bytes"] > 20_000, shot  # a page of charts, not a blank or error page
        assert shot["path"].read_bytes()[:4] == b"\x89PNG"
    return st


# ---------------------------------------------------------------- tests without a browser


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3-size CPT study store shared by the tests that only read it."""
    db = tmp_path_factory.mktemp("store") / "s.duckdb"
    make_db(db)
    return db


def test_build_report_full(tmp_path: Path, study_db: Path) -> None:
    db = study_db
    info = build_report(db, "s", tmp_path / "report", images=True)
    assert set(info["missing"]) == OPTIONAL & set(BUILDERS), info["missing"]
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
    info = build_report(db, "s", tmp_path / "r", images=False)
    assert info["drawn"] == {}
    assert set(info["missing"]) == set(BUILDERS)
    page = (tmp_path / "r" / "index.html").read_text()
    assert "missing: table `evals`" in page


def test_only_scratch_runs(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    make_db(db, replays=())  # scratch runs only: the scratch fit exists, CPT figures do not
    info = build_report(db, "s", tmp_path / "r", images=False)
    assert "loss_compute" in info["drawn"] and "isoloss" in info["drawn"]
    assert "transfer" in info["missing"] and "replay" in info["missing"]


def test_cli(tmp_path: Path, study_db: Path) -> None:
    from cptscale.cli import main

    db = study_db
    assert main(["report", "--db", str(db), "--study", "s", "--out-dir", str(tmp_path / "r"), "--no-images"]) == 0
    assert (tmp_path / "r" / "index.html").exists()

def test_cli_missing_database_writes_the_missing_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No database yet (nothing finished): the page that says what is missing, exit 0, not a crash."""
    from cptscale.cli import main

    db = tmp_path / "nope.duckdb"
    assert main(["report", "--db", str(db), "--study", "s", "--out-dir", str(tmp_path / "r"), "--no-images"]) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    info = json.loads((tmp_path / "r" / "report.json").read_text())
    assert info["drawn"] == {} and set(info["missing"]) == set(BUILDERS)
    assert f"database {db}" in page and "does not exist yet" in page
    assert "0 figures drawn" in page
    assert "missing loss_compute: database" in capsys.readouterr().out


def test_report_shows_only_the_sections_the_study_has(tmp_path: Path, study_db: Path) -> None:
    """A plain CPT scaling study (no `iplt`, `variants` or `fit.next_run_budget`) carries no missing notes
    for them; a config that asks for them gets their sections (missing here: nothing ran)."""
    import yaml

    from cptscale.cli import main
    from cptscale.report.page import sections_for
    from cptscale.validation import load_config

    root = Path(__file__).resolve().parents[1]
    demo = load_config(str(root / "config.yaml"))
    assert not OPTIONAL & set(sections_for(demo)) and set(sections_for(demo)) == CORE
    raw = yaml.safe_load((root / "config.yaml").read_text())
    raw["fit"] = {**raw.get("fit", {}), "next_run_budget": 1e15}
    asks = tmp_path / "asks.yaml"
    asks.write_text(yaml.safe_dump(raw))
    assert "next_run" in sections_for(load_config(str(asks)))

    assert main(["report", "--db", str(study_db), "--study", "s", "--out-dir", str(tmp_path / "r"), "--no-images",
                 "--config", str(root / "config.yaml")]) == 0
    info = json.loads((tmp_path / "r" / "report.json").read_text())
    assert info["missing"] == {} and set(info["drawn"]) == CORE == set(info["sections"])
    page = (tmp_path / "r" / "index.html").read_text()
    assert 'class="fig missing"' not in page and f"{len(CORE)} figures drawn, 0 missing" in page
    assert main(["report", "--db", str(study_db), "--study", "s", "--out-dir", str(tmp_path / "r2"), "--no-images",
                 "--config", str(asks)]) == 0
    assert set(json.loads((tmp_path / "r2" / "report.json").read_text())["missing"]) == {"next_run"}


def test_interactive_figures_zoom(study_db: Path, tmp_path: Path) -> None:
    """index.rst promises pan/zoom on every figure with continuous axes: each such view binds its scales
    (the fertility bars have a nominal axis and are the one exception)."""
    build_report(study_db, "s", tmp_path / "r", images=False)
    specs = page_specs(tmp_path / "r" / "index.html")

    def scale_params(node: object) -> list[dict]:
        if isinstance(node, dict):
            params = node.get("params")
            own = [p for p in params if p.get("bind") == "scales"] if isinstance(params, list) else []
            return own + [p for k, v in node.items() if k != "datasets" for p in scale_params(v)]
        if isinstance(node, list):
            return [p for v in node for p in scale_params(v)]
        return []

    for name, spec in specs.items():
        if name == "fertility":
            assert not scale_params(spec)
            continue
        assert scale_params(spec), f"{name}: no zoom (selection bound to scales)"
    # Fig. 5 has two views (curves and trade-off), fit quality two panels: each zooms on its own
    assert len({p["name"] for p in scale_params(specs["replay"])}) == 2
    assert len({p["name"] for p in scale_params(specs["fit_quality"])}) == 2


def test_replay_axes_name_the_study_languages(tmp_path: Path) -> None:
    """Fig. 5's trade-off names the study's own languages (here French -> Chinese), not English."""
    db = tmp_path / "fr.duckdb"
    make_db(db, n_sizes=2, replays=(0.0, 0.2), with_fits=False, source_lang="fr")
    build_report(db, "s", tmp_path / "r", images=False)
    text = json.dumps(page_specs(tmp_path / "r" / "index.html")["replay"])
    assert "source (French) loss" in text and "target (Chinese) loss" in text
    assert "English" not in text


def test_wsd_branches_drawn_in_the_lr_chart_and_kept_out_of_loss_curves(tmp_path: Path) -> None:
    """A WSD run's decay branches (branch_metrics.jsonl, ingested with ``branch``) are their own dashed
    lines in the LR chart; the training-loss curves show the main trajectory only."""
    import duckdb

    from cptscale.store.ingest import ingest

    db = tmp_path / "b.duckdb"
    make_db(db, n_sizes=2, replays=(0.0,), with_fits=False, n_steps=50)
    sdir = tmp_path / "gen" / "s"
    run = sorted(p.name for p in (sdir / "runs").iterdir())[0]
    rows = [{"step": st, "tokens": 64 * (st + 1), "loss": 9.0, "lr": 1e-4 * (40 - st) / 10, "grad_norm": 1.0,
             "tokens_per_s": 1.0, "branch": 40} for st in range(30, 40)]
    (sdir / "runs" / run / "branch_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ingest(sdir, db).ok
    con = duckdb.connect(str(db), read_only=True)
    try:
        lr_chart, n_lr = fig_health_lr(con, "s", 400)
        loss_chart, _ = fig_health_curves(con, "s", 400)
        n_main = con.execute("select count(*) from train_metrics where branch is null and lr is not null").fetchone()[0]
    finally:
        con.close()
    lr = lr_chart.data
    branch = lr[lr["trajectory"] == "decay branch"]
    assert set(branch["series"]) == {f"{run} / branch 40"} and sorted(branch["step"]) == list(range(30, 40))
    assert n_lr == n_main + len(rows) and set(lr.loc[lr["trajectory"] == "main", "series"]) == set(lr["run_id"])
    assert "strokeDash" in lr_chart.to_dict()["encoding"]
    loss = loss_chart.data
    assert not (loss["loss"] == 9.0).any()  # the branch steps are not drawn as the run's training loss


def test_summary_median_compute_saving(tmp_path: Path) -> None:
    """The summary's CPT compute saving is the median over CPT runs: an even count averages the middle two."""
    from cptscale.summary import compute_saving

    db = tmp_path / "s.duckdb"
    make_db(db, n_sizes=2, replays=(0.0, 0.2), with_fits=False)  # 2 sizes x 2 ratios: 4 CPT runs
    cs = compute_saving(db, "s")
    vals = sorted(r["frac_saved"] for r in cs["per_run"])
    assert len(vals) == 4 and vals[1] != vals[2], vals
    assert cs["median_frac_saved"] == pytest.approx((vals[1] + vals[2]) / 2)


# ---------------------------------------------------------------- browser


needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (/usr/bin/chromium)")


@pytest.mark.browser
@needs_chromium
def test_page_renders_offline(tmp_path: Path, study_db: Path) -> None:
    db = study_db
    info = build_report(db, "s", tmp_path / "report", images=False)
    html = tmp_path / "report" / "index.html"
    res = render(html, ARTIFACTS / "report-small.png")
    print(f"small page: {info['page_bytes'] / 1e6:.2f} MB, render {res['render_s']:.1f}s, "
          f"marks {res['status'] and res['status']['marks']}")
    st = check_rendered(res, html, info["drawn"])
    assert set(st["rendered"]) == CORE


def test_fit_quality_subtitle_names_the_free_fit_beside_its_remedy() -> None:
    """A remedied fit's line in the fit-quality figure says what the free fit it replaced said; a fit with no
    remedy gets no such words."""
    from cptscale.report.figures import _trust_lines

    ident = {"identified": True, "summary": "every free parameter interior"}
    used = "E, A, alpha frozen from scratch-chinchilla-zh (the paper's CPT protocol, as the extended CPT law)"
    f = {"fit_id": "cpt-chinchilla-zh", "meta": {"identifiability": ident, "remedy": {
        "policy": "auto", "used": used, "free_fit": "alpha on its upper bound"}}}
    assert (f"cpt-chinchilla-zh: identified (no parameter or interval on a bound); remedy used: {used} "
            "(the free fit: alpha on its upper bound)") in _trust_lines(f)
    plain = {"fit_id": "x", "meta": {"identifiability": ident, "remedy": {"policy": "auto", "used": "none",
                                                                          "free_fit": None}}}
    assert _trust_lines(plain) == ["x: identified (no parameter or interval on a bound)"]


def test_saving_past_the_floor_is_shown_as_a_bound() -> None:
    """A bootstrap end of -9.8e6 % (a draw whose law is nearly flat in D) is printed as '< -1000 %' in the
    table, and the chart's rule stops there (the tooltip keeps the interval) so the other runs stay legible."""
    from cptscale.report.saving import saving_chart, saving_table

    runs = [{"run_id": f"d{i}-cpt-zh-r0", "size": f"d{i}", "N": 1e4 * (i + 1), "replay": 0.0, "frac_saved": f,
             "frac_saved_lo": lo, "frac_saved_hi": 0.3, "extrapolated": False}
            for i, (f, lo) in enumerate([(0.1, -0.2), (-0.5, -98000.0)])]
    rec = {"lang": "zh", "law_fit": "scratch-chinchilla-zh", "interval": "95%", "per_run": runs,
           "by_replay": [{"replay": "0", "median_frac_saved": -0.2, "median_frac_saved_lo": -98000.0,
                          "median_frac_saved_hi": 0.3, "n_runs": 2, "n_extrapolated": 0}]}
    assert "<td>-20.0 %</td><td>[< -1000 %, 30.0 %]</td>" in saving_table(rec)
    data = saving_chart(rec).to_dict()["datasets"]
    rows = next(v for v in data.values() if len(v) == 2)
    assert [r["lo (%)"] for r in rows] == [-20.0, -1000.0] and rows[1]["interval"] == "[< -1000 %, 30.0 %]"


@pytest.mark.browser
@needs_chromium
def test_saving_section_renders_the_law_saving_per_replay(tmp_path: Path, study_db: Path) -> None:
    """With fit-study's summary beside it, the report leads with the CPT compute saving: a table of the median
    per replay ratio with its interval and a chart of every CPT run's saving with the law's interval."""
    fits = tmp_path / "s" / "fits"
    fits.mkdir(parents=True)
    summary = json.loads((study_db.parent / "gen" / "s" / "fits" / "summary.json").read_text())
    (fits / "summary.json").write_text(json.dumps(summary))
    rec = next(r for r in summary["cpt_saving"] if r["lang"] == "zh")
    info = build_report(study_db, "s", tmp_path / "s" / "report", images=False)
    assert info["drawn"]["saving-zh"] == {"rows": len(rec["per_run"])} == {"rows": 9}
    html = tmp_path / "s" / "report" / "index.html"
    page = html.read_text()
    assert "CPT compute saving (zh)" in page and "scratch-chinchilla-zh" in page
    for g in rec["by_replay"]:
        label = "all runs" if g["replay"] == "all" else f"replay {g['replay']}"
        assert (f"<td>{label}</td><td>{100 * g['median_frac_saved']:.1f} %</td>"
                f"<td>[{100 * g['median_frac_saved_lo']:.1f} %, {100 * g['median_frac_saved_hi']:.1f} %]</td>") in page
    st = check_rendered(render(html), html, info["drawn"])
    assert set(st["rendered"]) == CORE | {"saving-zh"}
    assert st["marks"]["saving-zh"] == {"rule": 9 + 1, "symbol": 9}  # an interval and a point per run, the zero line


@pytest.mark.browser
@pytest.mark.slow
@needs_chromium
def test_large_study_renders(tmp_path: Path) -> None:
    """40 sizes x (scratch + CPT at 6 replay ratios), long curves: built and rendered in reasonable time,
    every mark drawn. Page size and times go to test-artifacts/report-large.json."""
    db = tmp_path / "big.duckdb"
    replays = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5)
    make_db(db, n_sizes=40, replays=replays, n_evals=40, n_steps=2000)
    t0 = time.perf_counter()
    info = build_report(db, "s", tmp_path / "report", images=False, max_points=200)
    t_build = time.perf_counter() - t0
    html = tmp_path / "report" / "index.html"
    res = render(html, ARTIFACTS / "report-large.png", timeout=180)
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        n_runs = con.execute("select count(*) from runs where study = 's'").fetchone()[0]
    figures = {"page_bytes": info["page_bytes"], "build_s": round(t_build, 2), "render_s": round(res["render_s"], 2),
               "screenshot_s": round(res["screenshot"]["s"], 2), "n_runs": n_runs,
               "marks": res["status"] and res["status"]["rendered"]}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report-large.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("large page:", figures)
    st = check_rendered(res, html, info["drawn"])
    assert set(st["rendered"]) == CORE
    assert res["render_s"] < 60


def test_isoloss_contours_of_a_law_without_a_data_term() -> None:
    """beta = 0 (a fit whose beta sits on its lower bound): the loss does not depend on D, so no contour has
    a D. It used to raise ZeroDivisionError and take the whole IsoLoss figure down."""
    from cptscale.report.figures import _isoloss_contours, _isoloss_curve

    law = {"E": 1.0, "A": 10.0, "alpha": 0.3, "B": 5.0, "beta": 0.0, "gamma": 0.0}
    assert _isoloss_contours(law, [1e4, 1e6], [1e5, 1e7]) == []
    law["beta"] = 0.3
    dd = _isoloss_curve(law, 1.5, __import__("numpy").array([1e5]))
    assert abs(law["E"] + law["A"] / 1e5**0.3 + law["B"] / dd[0] ** 0.3 - 1.5) < 1e-9
