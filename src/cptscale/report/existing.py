"""The report section of a "CPT of an existing model" study (``source_model:``): how many target tokens
and how much replay for this model. One figure, three panels, from the store: the data law in D at fixed
N per replay ratio (observed final losses and the fitted curve), the forgetting-vs-replay frontier
(Pareto-optimal ratios marked, the allowed forgetting as a rule) and the tokenizer's fertility per
language; its title is the answer (``cptscale existing-model fit``, fits of kind ``existing``)."""

from __future__ import annotations

import json
from typing import Any

from cptscale.report.queries import Missing, _columns

#: the report sections an existing-model study shows (cptscale.report.page.sections_for): the scratch
#: ladder's laws, transfer and isoloss figures have nothing to draw in a study of one model
SECTIONS = ("existing", "health_curves", "health_lr", "blend", "fertility")


def _raw_fits(con: Any, study: str) -> list[dict[str, Any]]:
    if "raw" not in _columns(con, "fits"):
        raise Missing("table `fits` (run `cptscale existing-model fit`, then ingest)")
    rows = con.execute("select raw from fits where study = ? and kind = 'existing' order by fit_id",
                       [study]).fetchall()
    out = [json.loads(r[0]) if isinstance(r[0], str) else r[0] for r in rows]
    if not out:
        raise Missing("fits of kind `existing` (fits/existing.json from `cptscale existing-model fit`)")
    return out


def _fertility(con: Any, study: str) -> list[dict[str, Any]]:
    """Tokens per word and per character per language (per word only where spaces delimit words)."""
    from cptscale.existing_study import NO_WORD_SPACES

    if "tokenizer_report" not in _columns(con, "studies"):
        return []
    row = con.execute("select tokenizer_report from studies where study = ?", [study]).fetchone()
    rep = json.loads(row[0]) if row and isinstance(row[0], str) else (row[0] if row else None) or {}
    out = []
    for lang, f in sorted((rep.get("fertility") or {}).items()):
        for unit in ("word", "char"):
            v = f.get(f"tokens_per_{unit}")
            if v is not None and not (unit == "word" and lang in NO_WORD_SPACES):
                out.append({"lang": lang, "unit": f"tokens per {unit}", "value": float(v)})
    return out


def answer_lines(fits: list[dict[str, Any]]) -> list[str]:
    """The answer per target language (the figure's title)."""
    recs = [f for f in fits if f.get("law") == "existing_recommendation"]
    return [f"{f['lang']}: {f['recommendation']['answer']}" for f in recs]


def fig_existing(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """How many target tokens and how much replay for this model (data law, frontier, fertility)."""
    import altair as alt
    import numpy as np
    import pandas as pd

    fits = _raw_fits(con, study)
    laws = [f for f in fits if f.get("law") == "data_law"]
    recs = [f for f in fits if f.get("law") == "existing_recommendation"]
    pts, curves = [], []
    for f in laws:
        lab = f"{f['lang']} r={f['replay']:g}"
        for p in f.get("points") or []:
            pts.append({"series": lab, "D": p["D"], "loss": p["observed_loss"]})
        par = f.get("params") or {}
        ds = [p["D"] for p in f.get("points") or []]
        if par and ds:
            for d in np.geomspace(min(ds) / 1.5, max(ds) * 3, 40):
                curves.append({"series": lab, "D": float(d), "loss": par["E"] + par["B"] / d ** par["beta"]})
    if not pts:
        raise Missing("data-law points (finished CPT runs of the model)")
    front = [{**row, "lang": r["lang"], "series": f"{r['lang']} r={row['replay']:g}",
              "chosen": row["replay"] == r["recommendation"]["replay"]}
             for r in recs for row in r["recommendation"]["frontier"]]
    x = alt.X("D:Q", scale=alt.Scale(type="log"), title="target tokens D")
    y = alt.Y("loss:Q", scale=alt.Scale(zero=False), title="target loss (final)")
    law = (alt.Chart(pd.DataFrame(curves)).mark_line(opacity=0.7).encode(x=x, y=y, color="series:N")
           + alt.Chart(pd.DataFrame(pts)).mark_point(filled=True, size=60)
           .encode(x=x, y=y, color="series:N", tooltip=["series", "D", alt.Tooltip("loss:Q", format=".4f")])
           ).properties(width=300, height=240, title="Data law at fixed N: L(D) = E + B / D^beta per replay ratio")
    panels = [law]
    if front:
        fdf = pd.DataFrame(front)
        limit = recs[0]["recommendation"]["max_forgetting"]
        fx = alt.X("forgetting:Q", title="forgetting: source loss rise over the model as given (nats)")
        fy = alt.Y("target_loss:Q", scale=alt.Scale(zero=False), title="target loss at the largest budget")
        panels.append(
            (alt.Chart(fdf).mark_point(filled=True, size=90).encode(
                x=fx, y=fy, color="series:N", shape=alt.Shape("pareto:N", title="Pareto-optimal"),
                strokeWidth=alt.condition("datum.chosen", alt.value(3), alt.value(0)), stroke=alt.value("black"),
                tooltip=["series", alt.Tooltip("forgetting:Q", format=".4f"),
                         alt.Tooltip("target_loss:Q", format=".4f"), "pareto", "chosen"])
             + alt.Chart(pd.DataFrame([{"forgetting": limit}])).mark_rule(strokeDash=[4, 3], color="gray")
             .encode(x="forgetting:Q"))
            .properties(width=300, height=240, title=f"Forgetting vs replay (allowed: {limit:g} nats)"))
    fert = _fertility(con, study)
    if fert:
        panels.append(alt.Chart(pd.DataFrame(fert)).mark_bar().encode(
            x=alt.X("lang:N"), y=alt.Y("value:Q", title="tokens"), color="lang:N", column=alt.Column("unit:N"),
            tooltip=["lang", "unit", alt.Tooltip("value:Q", format=".3f")])
            .properties(width=90, height=240, title="Fertility of the model's tokenizer"))
    title = answer_lines(fits) or ["no recommendation yet"]
    chart = alt.hconcat(*panels).resolve_scale(color="independent").properties(title=alt.TitleParams(
        ["How many target tokens and how much replay for this model", *title], anchor="start"))
    return chart, len(pts)
