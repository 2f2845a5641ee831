"""`cptscale report`: Altair figures from the DuckDB store in one self-contained HTML page.

The page must work offline (cluster login nodes, laptops), so the Vega/Vega-Lite/vega-embed
bundle from vl-convert is inlined and a CSP meta tag forbids any network fetch.  Every figure
is built defensively: a missing table, column or fit becomes a "missing: ..." note, never a crash.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from cptscale.report.figures import BUILDERS
from cptscale.report.queries import Missing, _connect
from cptscale.util import atomic_write, staged_dir, write_json

CSP = (
    "default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; "
    "style-src 'unsafe-inline'; img-src data:; font-src data:"
)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}}
.fig{{margin:1.5em 0;padding:.5em;border-top:1px solid #ddd}}
.missing{{color:#8a4b00;background:#fff4e0;padding:.6em;border-radius:4px}}
.simulated{{color:#fff;background:#b00020;padding:.6em;border-radius:4px;font-weight:bold}}
table.design td,table.design th{{padding:.15em .6em;border-bottom:1px solid #eee;text-align:left}}
code{{background:#f2f2f2;padding:0 .2em}}
</style>
<script>
// Render checks (read by the tests from #render-status): errors, warnings and any network request.
window.__errors = [];
window.__warnings = [];
window.addEventListener('error', e => window.__errors.push(e.message ? String(e.message)
  : 'failed to load ' + ((e.target && (e.target.src || e.target.href)) || 'a resource')), true);
window.addEventListener('unhandledrejection', e => window.__errors.push('unhandled rejection: ' + e.reason));
window.addEventListener('securitypolicyviolation', e => window.__errors.push('CSP: ' + e.blockedURI));
for (const [level, sink] of [['error', window.__errors], ['warn', window.__warnings]]) {{
  const orig = console[level].bind(console);
  console[level] = (...a) => {{ sink.push(a.map(String).join(' ')); orig(...a); }};
}}
</script>
<script type="module">{bundle}</script>
</head><body>
{banner}<h1>{title}</h1>
<p>Study <code>{study}</code> &middot; generated {when} &middot; {n_ok} figures drawn, {n_missing} missing.
Legend entries select a size / replay ratio; drag to pan and scroll to zoom (every figure with
continuous axes).</p>
{missing_list}
{sections}
{banner}
<pre id="render-status" style="display:none"></pre>
<script type="module">
const specs = {specs};
const status = {{rendered: {{}}, marks: {{}}, errors: window.__errors, warnings: window.__warnings, requests: []}};
// data marks only (role "mark": lines, points, rules, bars, text of the figures), not axes, legends or
// titles: per figure the total and the count per mark type
function countMarks(node) {{
  const byType = {{}};
  const walk = (s) => {{
    if (!s) return;
    if (s.marktype && s.marktype !== 'group' && s.role === 'mark')
      byType[s.marktype] = (byType[s.marktype] || 0) + (s.items || []).length;
    for (const it of (s.items || [])) if (it.items) walk(it);
  }};
  walk(node);
  return byType;
}}
for (const [name, spec] of Object.entries(specs)) {{
  try {{
    const res = await vegaEmbed('#vis-' + name, spec, {{renderer: 'svg', actions: {{export: true, source: false, compiled: false, editor: false}}}});
    const byType = countMarks(res.view.scenegraph().root);
    status.marks[name] = byType;
    status.rendered[name] = Object.values(byType).reduce((a, b) => a + b, 0);
  }} catch (e) {{ window.__errors.push(name + ': ' + e); }}
}}
// an offline page requests nothing: every resource entry (blocked or not) is reported
status.requests = performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'));
const el = document.getElementById('render-status');
el.textContent = JSON.stringify(status);
document.body.setAttribute('data-rendered', 'done');
</script>
</body></html>
"""


#: Sections of study kinds a study has only when its config asks for them (config key -> figure).
OPTIONAL_SECTIONS = {"iplt": "iplt", "variants": "variants", "next_run": "fit.next_run_budget",
                     "existing": "source_model"}


def sections_for(cfg: Any) -> list[str]:
    """The figures a study's report shows: every core figure, plus IPLT, recipe variants and the next
    run only when the config has ``iplt``, ``variants`` or ``fit.next_run_budget`` (a study without them
    would otherwise carry a "missing" note for each)."""
    if getattr(cfg, "source_model", None) is not None:  # CPT of an existing model: its own sections
        from cptscale.report.existing import SECTIONS

        return [n for n in BUILDERS if n in SECTIONS]
    has = {"iplt": cfg.iplt is not None, "variants": bool(cfg.variants),
           "next_run": bool(cfg.fit.next_run_budget), "existing": False}
    return [n for n in BUILDERS if n not in OPTIONAL_SECTIONS or has[n]]


def _simulated_runs(con: Any, study: str) -> dict[str, int]:
    """Simulated and trained runs of the study (a store from before runs.simulated: all trained)."""
    cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'")
            .fetchall()}
    if "simulated" not in cols:
        return {"simulated": 0, "trained": int(con.execute("SELECT count(*) FROM runs WHERE study = ?",
                                                           [study]).fetchone()[0])}
    sim, trained = con.execute("SELECT count(*) FILTER (WHERE simulated), count(*) FILTER (WHERE NOT "
                               "coalesce(simulated, false)) FROM runs WHERE study = ?", [study]).fetchone()
    return {"simulated": int(sim), "trained": int(trained)}


def _mark_simulated(spec: dict[str, Any]) -> None:
    """Prefix a figure's title with SIMULATED (its SVG and PNG copies carry it too)."""
    t = spec.get("title")
    if isinstance(t, dict):
        spec["title"] = {**t, "text": f"SIMULATED: {t.get('text', '')}", "color": "#b00020"}
    else:
        spec["title"] = {"text": f"SIMULATED: {t or ''}", "color": "#b00020"}


def build_report(
    db_path: str | Path,
    study: str,
    out_dir: str | Path,
    *,
    title: str | None = None,
    max_points: int = 400,
    images: bool = True,
    sections: list[str] | None = None,
) -> dict[str, Any]:
    """Write index.html, figures/*.svg|png and report.json; return the report.json dict. ``sections``
    (default: every figure; see :func:`sections_for`) are the figures this study has: the others are
    neither drawn nor reported missing."""
    unknown = sorted(set(sections or ()) - set(BUILDERS))
    if unknown:
        raise ValueError(f"unknown report section(s) {', '.join(unknown)}; known: {', '.join(BUILDERS)}")
    builders = {n: fn for n, fn in BUILDERS.items() if sections is None or n in sections}
    with staged_dir(out_dir) as out:  # the page and its figures replace the previous report together
        (out / "figures").mkdir()
        return _build_into(out, Path(db_path), study, Path(out_dir), title=title, max_points=max_points,
                           images=images, builders=builders)


def _draw_figures(db_path: Path, study: str, builders: dict[str, Any],
                  max_points: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], dict[str, int]]:
    """Each builder's Vega-Lite spec and row count, or why it is missing (a broken figure is reported as
    missing, not raised); also the study's simulated and trained run counts."""
    drawn: dict[str, Any] = {}
    missing: dict[str, str] = {}
    specs: dict[str, Any] = {}
    simulated = {"simulated": 0, "trained": 0}
    if not Path(db_path).exists():
        missing = {n: f"database {db_path} (it does not exist yet: the workflow's `database` rule writes it "
                      "once runs have finished; `cptscale db ingest` builds it by hand)" for n in builders}
        return specs, drawn, missing, simulated
    con = _connect(db_path)
    try:
        simulated = _simulated_runs(con, study)
        for name, fn in builders.items():
            try:
                chart, n = fn(con, study, max_points)
                specs[name] = chart.to_dict()
                drawn[name] = {"rows": n}
            except Missing as exc:
                missing[name] = str(exc)
            except Exception as exc:  # a broken figure must not take the page down
                missing[name] = f"error building figure: {type(exc).__name__}: {exc}"
    finally:
        con.close()
    return specs, drawn, missing, simulated


def _lead_sections(final_dir: Path, specs: dict[str, Any], drawn: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, HTML) of the sections read from files beside the report, their charts into ``specs``: the CPT
    compute saving per target language (fit-study's ``fits/summary.json``) and the design table when
    `cptscale design` wrote ``design/design.json``."""
    from cptscale.report.saving import saving_sections

    out = []
    for name, table, chart in saving_sections(final_dir):
        specs[name] = chart.to_dict()
        drawn[name] = {"rows": len(chart.layer[0].data)}
        out.append((name, table))
    design_path = final_dir.parent / "design" / "design.json"  # <study>/report -> <study>/design
    if design_path.exists():
        from cptscale.simulate.design import design_chart, design_table

        rep_d = json.loads(design_path.read_text())
        specs["design"] = design_chart(rep_d).to_dict()
        drawn["design"] = {"rows": len(rep_d.get("designs", []))}
        out.append(("design", design_table(rep_d)))
    return out


def _write_images(out: Path, specs: dict[str, Any], drawn: dict[str, Any]) -> None:
    """figures/<name>.svg and .png of each spec, recorded in ``drawn`` (an image error is recorded, not raised)."""
    import vl_convert as vlc

    for name, spec in specs.items():
        try:
            svg = vlc.vegalite_to_svg(spec)
            atomic_write(out / "figures" / f"{name}.svg", svg)
            atomic_write(out / "figures" / f"{name}.png", vlc.svg_to_png(svg, scale=1.5))
            drawn[name]["svg"] = f"figures/{name}.svg"
            drawn[name]["png"] = f"figures/{name}.png"
        except Exception as exc:
            drawn[name]["image_error"] = str(exc)


def _page(title: str, study: str, builders: dict[str, Any], specs: dict[str, Any], missing: dict[str, str],
          lead: list[tuple[str, str]], simulated: dict[str, int]) -> str:
    """The self-contained HTML page: one section per figure (or its missing note), the missing list, the
    simulated banner, the Vega bundle and the specs."""
    import vl_convert as vlc

    sections = [f'<div class="fig" id="fig-{name}">{body}<div id="vis-{name}"></div></div>' for name, body in lead]
    for name in builders:
        if name in specs:
            sections.append(f'<div class="fig" id="fig-{name}"><div id="vis-{name}"></div></div>')
        else:
            sections.append(
                f'<div class="fig missing" id="fig-{name}"><b>{name}</b>: missing: {html.escape(missing[name])}</div>'
            )
    missing_list = (
        "<ul class=\"missing\">"
        + "".join(f"<li><b>{n}</b>: missing: {html.escape(m)}</li>" for n, m in missing.items())
        + "</ul>"
        if missing
        else ""
    )
    banner = ""
    if simulated["simulated"]:
        n_all = simulated["simulated"] + simulated["trained"]
        banner = (f'<p class="simulated">SIMULATED STUDY: {simulated["simulated"]} of its {n_all} runs were drawn from a '
                  "known law (train.backend: simulate), nothing was trained. These figures check the pipeline's "
                  "statistics against the truth; they are not results of training.</p>")
    return _PAGE.format(
        banner=banner,
        csp=CSP,
        title=html.escape(title),
        study=html.escape(study),
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        n_ok=len(specs),
        n_missing=len(missing),
        bundle=vlc.javascript_bundle(),
        missing_list=missing_list,
        sections="\n".join(sections),
        specs=json.dumps(specs, default=str).replace("</", "<\\/"),
    )


def _build_into(out: Path, db_path: Path, study: str, final_dir: Path, *, title: str | None, max_points: int,
                images: bool, builders: dict[str, Any]) -> dict[str, Any]:
    """The body of :func:`build_report`, writing into the staging directory ``out``."""
    import altair as alt  # heavy (vega bundle); only a report needs it

    t0 = time.perf_counter()
    alt.data_transformers.disable_max_rows()
    title = title or f"cptscale report: {study}"
    specs, drawn, missing, simulated = _draw_figures(db_path, study, builders, max_points)
    lead = _lead_sections(final_dir, specs, drawn)
    if simulated["simulated"]:  # every page and figure says so
        title = f"SIMULATED: {title}"
        for spec in specs.values():
            _mark_simulated(spec)
    if images:
        _write_images(out, specs, drawn)
    page = _page(title, study, builders, specs, missing, lead, simulated)
    atomic_write(out / "index.html", page)
    info = {
        "study": study,
        "db": str(db_path),
        "drawn": drawn,
        "missing": missing,
        "sections": list(builders),
        "page_bytes": len(page.encode()),
        "build_s": round(time.perf_counter() - t0, 3),
        "max_points": max_points,
        "simulated": simulated,
    }
    write_json(out / "report.json", info)
    return info
