"""The report's headline: how much compute CPT saved, per replay ratio, with its interval.

Read from ``fits/summary.json`` (fit-study's ``cpt_saving``: the scratch law's equal-loss saving at each CPT
run's end, :mod:`cptscale.fit.saving`), beside the report as the design table is; no section without it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from cptscale.fit.saving import FRAC_FLOOR


def _pct(v: float | None) -> str:
    return "?" if v is None else f"< {100 * FRAC_FLOOR:.0f} %" if v < FRAC_FLOOR else f"{100 * v:.1f} %"


def saving_table(rec: dict[str, Any]) -> str:
    """One row per replay ratio (and all runs): median saving, its interval, runs, runs the law extrapolates."""
    warn = "" if rec.get("reliable", True) else (
        " <b>The scratch law is not identified: these savings are unreliable.</b>")
    head = (f"<h2>CPT compute saving ({html.escape(str(rec['lang']))})</h2><p>FLOPs a same-size scratch run needs "
            f"for each CPT run's final target loss, by the scratch law <code>{html.escape(str(rec['law_fit']))}</code>"
            f" (every CPT token counts, replay included; source pre-training excluded). {html.escape(rec['interval'])}."
            f"{warn}</p>")
    rows = "".join(
        f"<tr><td>{html.escape('all runs' if g['replay'] == 'all' else 'replay ' + g['replay'])}</td>"
        f"<td>{_pct(g['median_frac_saved'])}</td>"
        f"<td>[{_pct(g['median_frac_saved_lo'])}, {_pct(g['median_frac_saved_hi'])}]</td>"
        f"<td>{g['n_runs']}</td><td>{g['n_extrapolated']}</td></tr>" for g in rec["by_replay"])
    return (head + '<table class="design"><tr><th>runs</th><th>median saving</th><th>95 % interval</th>'
            "<th>CPT runs</th><th>beyond the scratch runs' tokens (law extrapolates)</th></tr>" + rows + "</table>")


def saving_chart(rec: dict[str, Any]) -> Any:
    """Each CPT run's saving at its end (point) with the law's bootstrap interval (rule), per size and replay."""
    import altair as alt
    import pandas as pd

    def cut(v: float) -> float:  # the rule stops at the floor (its tooltip says so) so the axis stays readable
        return 100 * max(v, FRAC_FLOOR)

    df = pd.DataFrame([{"run": r["run_id"], "size": str(r.get("size") or r["N"]), "N": r["N"],
                        "replay": f"{r['replay']:g}", "saved (%)": cut(r["frac_saved"]),
                        "lo (%)": cut(r["frac_saved_lo"] if r["frac_saved_lo"] is not None else r["frac_saved"]),
                        "hi (%)": cut(r["frac_saved_hi"] if r["frac_saved_hi"] is not None else r["frac_saved"]),
                        "interval": f"[{_pct(r['frac_saved_lo'])}, {_pct(r['frac_saved_hi'])}]",
                        "law extrapolates": r["extrapolated"]} for r in rec["per_run"]])
    order = list(df.sort_values("N")["size"].drop_duplicates())
    base = alt.Chart(df).encode(
        x=alt.X("size:N", sort=order, title="model size"), xOffset="replay:N",
        color=alt.Color("replay:N", title="replay"))
    bars = base.mark_rule().encode(y=alt.Y("lo (%):Q", title="FLOPs saved at the run's end (%)"), y2="hi (%):Q")
    pts = base.mark_point(filled=True, size=60).encode(y="saved (%):Q", tooltip=list(df.columns))
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(strokeDash=[4, 4], color="#888").encode(y="y:Q")
    return alt.layer(bars, pts, zero).properties(
        width=380, title=f"CPT compute saving per run, by the scratch law {rec['law_fit']} (95 % interval)")


def saving_sections(final_dir: Path) -> list[tuple[str, str, Any]]:
    """(name, table HTML, chart) per target language with a law-based saving in ``<study>/fits/summary.json``."""
    path = final_dir.parent / "fits" / "summary.json"  # <study>/report -> <study>/fits
    if not path.exists():
        return []
    try:
        recs = json.loads(path.read_text()).get("cpt_saving") or []
    except (OSError, json.JSONDecodeError):
        return []
    return [(f"saving-{r['lang']}", saving_table(r), saving_chart(r)) for r in recs if r.get("status") == "ok"]
