"""The report's Altair figures, one builder per figure (``BUILDERS``): each reads the store and returns a chart
and its row count, or raises :class:`~cptscale.report.queries.Missing` naming what is not there yet."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from cptscale.fit.identify import remedy_text
from cptscale.report.existing import fig_existing
from cptscale.report.queries import (
    Missing,
    _columns,
    _df,
    _downsample,
    _fit_kind,
    _fits,
    _law_loss,
    _main_laws,
    _main_steps,
    _need,
)


def _size_key(size: Any) -> float:
    """Numeric order for size labels like '20M', '1.4B' (lexicographic order puts 1009M before 20M),
    and ladder names like 'd64l3' (by their non-embedding parameter count)."""
    from cptscale.ladder import get_shape

    if re.fullmatch(r"d\d+l\d+", str(size)):
        try:
            return float(get_shape(str(size)).params(0, embeddings=False))
        except (KeyError, ValueError):
            pass
    m = re.match(r"\s*([0-9.]+)\s*([kKmMbBtT]?)", str(size))
    if not m:
        return math.inf
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    try:
        return float(m.group(1)) * mult
    except ValueError:
        return math.inf


def _size_color(df: Any) -> Any:
    """Sizes as an ordered viridis scale, smallest first."""
    import altair as alt

    order = sorted({str(x) for x in df["size"]}, key=_size_key)
    # every size in the legend (Vega drops entries past 30, and a legend entry is how a size is selected),
    # in columns of at most 25 so a 40-size ladder stays about as tall as the chart
    legend = alt.Legend(symbolLimit=len(order), columns=-(-len(order) // 25))
    return alt.Color("size:O", sort=order, scale=alt.Scale(scheme="viridis"), title="size", legend=legend)


def _iv_text(fit: dict[str, Any], name: str, fmt: str) -> str:
    """value [lo, hi] from the fit's bootstrap intervals, or the value alone."""
    p = {**(fit.get("fixed") or {}), **(fit.get("params") or {})}
    v = p.get(name)
    iv = (fit.get("intervals") or {}).get(name) or {}
    if not isinstance(v, int | float):
        return "?"
    if isinstance(iv, dict) and isinstance(iv.get("lo"), int | float) and isinstance(iv.get("hi"), int | float):
        return f"{v:{fmt}} [{iv['lo']:{fmt}}, {iv['hi']:{fmt}}]"
    return f"{v:{fmt}}"


def _lang_names(codes: Any) -> str:
    """'English' for ['en', 'en'], 'English/French' for two source languages: axis titles name the
    study's languages (cptscale.config.schema.LANGUAGES), not a hard-coded pair."""
    from cptscale.config.schema import LANGUAGES

    uniq = sorted({str(c) for c in codes if c is not None and str(c) not in ("", "nan", "None")})
    return "/".join(LANGUAGES.get(c, c) for c in uniq) or "?"


def _size_sel(alt: Any) -> Any:
    return alt.selection_point(fields=["size"], bind="legend")


def _loss_compute_rows(con: Any, study: str) -> Any:
    """Target-language evals of the zero-replay, non-IPLT runs with their sizes and parameter counts."""
    _need(con, "evals", ["run_id", "tokens", "loss", "flops", "lang"])
    _need(con, "runs", ["run_id", "size", "init", "lang", "params"])
    rcols = _columns(con, "runs")
    rep = "coalesce(r.replay, 0)" if "replay" in rcols else "0"
    nonemb = "r.params_nonemb" if "params_nonemb" in rcols else "null::bigint"
    no_arm = "and r.arm is null" if "arm" in rcols else ""  # IPLT arms change shape mid-run: figure `iplt`
    # the paper's Fig. 1 compares scratch and CPT in the target language: when the study has CPT runs,
    # the source language's scratch runs (the CPT parents) stay out of the scratch panel
    targets = """and (r.lang in (select lang from runs where study = e.study and init = 'cpt')
                      or not exists (select 1 from runs where study = e.study and init = 'cpt'))"""
    df = _df(
        con,
        f"""select e.run_id, r.size, r.init, e.tokens, e.loss, e.flops, {nonemb} as params_nonemb,
                  r.params from evals e
            join runs r on r.study = e.study and r.run_id = e.run_id
            where e.study = ? and e.branch is null and e.lang = r.lang and {rep} = 0 and e.flops > 0 {no_arm} {targets}""",
        [study],
    )
    if df.empty:
        raise Missing("evals on the target language (no finished runs yet)")
    return df


def _envelopes(df: Any, fitted: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per init: the fit-study envelope L = k·C^m with its bootstrap interval, or (no fit) a log-log line
    through the lowest loss in each log-compute bin; the line's rows and its subtitle."""
    import numpy as np

    env_rows: list[dict[str, Any]] = []
    titles: list[str] = []
    for init, g in df.groupby("init"):
        ef = fitted.get(str(init))
        if ef is not None and {"k", "m"} <= set(ef["params"]):
            k, m = float(ef["params"]["k"]), float(ef["params"]["m"])
            lc = np.log10(g["flops"].to_numpy())
            env_rows += [{"init": init, "flops": x, "loss": k * x**m} for x in np.logspace(lc.min(), lc.max(), 40)]
            titles.append(f"{init}: L = {_iv_text(ef, 'k', '.4g')}·C^{_iv_text(ef, 'm', '.4f')} (fit {ef.get('fit_id')})")
            continue
        lc = np.log10(g["flops"].to_numpy())
        bins = np.linspace(lc.min(), lc.max() + 1e-9, 16)
        idx = np.digitize(lc, bins)
        pts = g.assign(b=idx).groupby("b").apply(lambda x: x.loc[x["loss"].idxmin()], include_groups=False)
        if len(pts) >= 2:
            k, c0 = np.polyfit(np.log(pts["flops"]), np.log(pts["loss"]), 1)
            xs = np.logspace(lc.min(), lc.max(), 40)
            env_rows += [
                {"init": init, "flops": x, "loss": math.exp(c0) * x**k} for x in xs
            ]
            titles.append(f"{init}: L = {math.exp(c0):.4g}·C^{k:.4f} (binned minima; no envelope fit)")
    return env_rows, titles


def fig_loss_compute(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """Fig. 1: validation loss vs compute, scratch | CPT, with fitted power-law envelopes."""
    import altair as alt
    import pandas as pd

    df = _downsample(_loss_compute_rows(con, study), "run_id", "tokens", mp)
    fitted = {_fit_kind(f): f for f in _fits(con, study) if str(f.get("law")) == "envelope" and f.get("params")}
    # the x axis is the fits' compute C = 6·N·D, with N counted as the fits counted it (fit-study --params)
    sel_n = " ".join(str(((f.get("meta") or {}).get("selection") or {}).get("N", "")) for f in fitted.values())
    nonemb_n = "non-embedding" in sel_n and df["params_nonemb"].notna().all()
    df["flops"] = 6.0 * df["params_nonemb" if nonemb_n else "params"].astype(float) * df["tokens"].astype(float)
    x_title = f"compute C = 6·N·D (N: {'non-embedding' if nonemb_n else 'all'} parameters)"
    env_rows, titles = _envelopes(df, fitted)
    sel = _size_sel(alt)
    base = alt.Chart().encode(  # no data of its own: inside the facet a layer with data is not faceted
        x=alt.X("flops:Q", scale=alt.Scale(type="log"), axis=alt.Axis(format=".0e"), title=x_title),
        y=alt.Y("loss:Q", scale=alt.Scale(zero=False), title="validation loss"),
    )
    lines = base.mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        color=_size_color(df),
        detail="run_id:N",
        opacity=alt.condition(sel, alt.value(0.9), alt.value(0.08)),
        tooltip=["run_id", "size", "init", "tokens", alt.Tooltip("loss:Q", format=".4f"), "flops"],
    ).add_params(sel)
    layers = [lines]
    if env_rows:
        # a faceted layer takes the facet's data: run rows and envelope rows are told apart by a flag
        lines = lines.transform_filter("!datum.envelope")
        env = alt.Chart().mark_line(color="black", strokeDash=[6, 3]).encode(
            x="flops:Q", y="loss:Q", tooltip=["init", alt.Tooltip("loss:Q", format=".4f"), "flops"]
        ).transform_filter("datum.envelope")
        layers = [lines, env]
    data = (pd.concat([df.assign(envelope=False), pd.DataFrame(env_rows).assign(envelope=True)], ignore_index=True)
            if env_rows else df)
    chart = (
        alt.layer(*layers)
        .properties(width=340, height=260)
        .facet(column=alt.Column("init:N", title=None), data=data)
        .properties(title={"text": "Loss vs compute (Fig. 1)", "subtitle": titles or ["no envelope"]})
        .interactive()
    )
    return chart, len(df)


def fig_transfer(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """Fig. 2: FLOPs saved and effective data transferred vs tokens, per size."""
    import altair as alt

    _need(con, "transfer", ["run_id", "size", "tokens", "flops_saved", "effective_data_transferred"])
    have = _columns(con, "transfer")
    rep = "and coalesce(replay, 0) = 0" if "replay" in have else ""
    frac = "frac_saved" if "frac_saved" in have else "null::double as frac_saved"
    # step 0 (no CPT tokens yet) has nothing to compare and would break the log axis
    df = _df(
        con,
        f"""select run_id, size, tokens, flops_saved, {frac}, effective_data_transferred from transfer
            where study = ? and tokens > 0 {rep}""",
        [study],
    )
    if df.empty:
        raise Missing("transfer rows (needs CPT and scratch runs of the same size)")
    df = _downsample(df, "run_id", "tokens", mp)
    df["frac_saved"] = df["frac_saved"] * 100.0
    df = df.rename(columns={"flops_saved": "FLOPs saved", "frac_saved": "FLOPs saved (%)",
                            "effective_data_transferred": "effective data transferred (tokens)"})
    long = df.melt(
        id_vars=["run_id", "size", "tokens"],
        value_vars=["FLOPs saved", "FLOPs saved (%)", "effective data transferred (tokens)"],
        var_name="metric",
    ).dropna(subset=["value"])
    sel = _size_sel(alt)
    chart = (
        alt.Chart(long)
        .mark_line(point=alt.OverlayMarkDef(size=12))
        .encode(
            x=alt.X("tokens:Q", scale=alt.Scale(type="log"), axis=alt.Axis(format="~s"), title="CPT tokens"),
            y=alt.Y("value:Q", title=None, axis=alt.Axis(format="~s")),
            color=_size_color(df),
            detail="run_id:N",
            opacity=alt.condition(sel, alt.value(0.9), alt.value(0.08)),
            tooltip=["run_id", "size", "tokens", "metric", alt.Tooltip("value:Q", format=".4g")],
        )
        .add_params(sel)
        .properties(width=280, height=240)
        .facet(column=alt.Column("metric:N", title=None,
                                 sort=["FLOPs saved", "FLOPs saved (%)", "effective data transferred (tokens)"]))
        .resolve_scale(y="independent")
        .properties(title="FLOPs saved and effective data transferred (Fig. 2)")
        .interactive()
    )
    return chart, len(long)


def _isoloss_curve(law: dict[str, float], level: float, ns: Any) -> Any:
    """D(N) on the IsoLoss contour L(N, D) = level (NaN where the N term alone exceeds the level, and
    everywhere when beta = 0: then the loss does not depend on D, so no contour has a D)."""
    import numpy as np

    if not law["beta"] > 0:
        return np.full(np.shape(ns), np.nan)
    gap = level - law["E"] - law["A"] / ns ** law["alpha"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(gap > 0, (law["B"] / (np.maximum(gap, 1e-300) * ns ** law["gamma"])) ** (1 / law["beta"]), np.nan)


def _frontier(law: dict[str, float], budgets: Any) -> list[tuple[float, float, float]]:
    """Compute-optimal (C, N, D) under C = 6ND: the fit layer's closed form (study-design §3.1-3.2) when it
    exists, budgets whose optimum leaves the float range left out."""
    from cptscale.fit.estimate import exponents, optimal_n
    from cptscale.fit.laws import FitResult

    ex = exponents(FitResult("cpt", {k: law[k] for k in ("A", "B", "alpha", "beta", "gamma")}))
    if not ex["valid"]:
        return []
    out = []
    for c in budgets:
        n = optimal_n(ex, c)
        if n is not None and c / (6 * n) > 0:
            out.append((c, n, c / (6 * n)))
    return out


def _isoloss_box(laws: dict[str, dict[str, Any]]) -> tuple[list[float], list[float]]:
    """The N and D axes: the fitted data's range widened 30x each way (paper-scale defaults when the fit has
    no range)."""
    ranges = [r for f in laws.values() if (r := (f.get("meta") or {}).get("data_range") or {}).get("N") and r.get("D")]
    nr = [min(r["N"][0] for r in ranges) / 30, max(r["N"][1] for r in ranges) * 30] if ranges else [1e7, 10**10.5]
    dr = [min(r["D"][0] for r in ranges) / 30, max(r["D"][1] for r in ranges) * 30] if ranges else [1e8, 1e12]
    return nr, dr


def _isoloss_contours(main: dict[str, float], nr: list[float], dr: list[float]) -> list[dict[str, Any]]:
    """IsoLoss contour rows of the law ``main`` inside the box. Levels: quantiles of the loss over the
    (N, D) box, so every level is reached inside it (levels spaced between the corner losses all fall
    outside when one corner explodes, e.g. a fit with alpha at its bound)."""
    import numpy as np

    ns = np.logspace(np.log10(nr[0]), np.log10(nr[1]), 160)
    gd = np.logspace(np.log10(dr[0]), np.log10(dr[1]), 80)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        grid = _law_loss(main, ns[::2, None], gd[None, :])
    grid = grid[np.isfinite(grid)]
    levels = sorted({float(f"{q:.4g}") for q in np.quantile(grid, np.linspace(0.05, 0.9, 9))}) if grid.size else []
    contour = []
    for lv in levels:
        dd = _isoloss_curve(main, lv, ns)
        ok = np.isfinite(dd) & (dd >= dr[0]) & (dd <= dr[1])
        contour += [{"level": lv, "N": float(n), "D": float(d)} for n, d in zip(ns[ok], dd[ok], strict=True)]
    return contour


def _frontier_rows(laws: dict[str, dict[str, Any]], nr: list[float], dr: list[float]) -> list[dict[str, Any]]:
    """Each law's compute-optimal frontier inside the box."""
    import numpy as np

    front = []
    cmin, cmax = 6 * nr[0] * dr[0], 6 * nr[1] * dr[1]
    for kind, f in laws.items():
        for c, n, d in _frontier(f["law_params"], np.logspace(np.log10(cmin), np.log10(cmax), 60)):
            if nr[0] <= n <= nr[1] and dr[0] <= d <= dr[1]:
                front.append({"frontier": f"{kind} ({f.get('fit_id')})", "C": c, "N": n, "D": d,
                              "loss": _law_loss(f["law_params"], n, d)})
    return front


def _law_subtitles(laws: dict[str, dict[str, Any]]) -> list[str]:
    """One line per law: its parameters with intervals, the allocation exponent and an identifiability warning."""
    import numpy as np

    eq = []
    for kind, f in laws.items():
        v = f["law_params"]
        prime = "'" if v["gamma"] else ""
        txt = (f"{kind}: E={_iv_text(f, 'E', '.3g')} A={_iv_text(f, 'A', '.4g')} α={_iv_text(f, 'alpha', '.3g')} "
               f"B{prime}={v['B']:.4g} β{prime}={_iv_text(f, 'beta', '.3g')}")
        if v["gamma"]:
            txt += f" γ={_iv_text(f, 'gamma', '.3g')}"
        fr = _frontier(v, [1.0, 10.0])
        if fr:
            txt += f"; N_opt ∝ C^{np.log10(fr[1][1] / fr[0][1]):.3f}"
        ident = (f.get("meta") or {}).get("identifiability") or {}
        if ident and not ident.get("identified", True):
            txt += f" — NOT IDENTIFIED ({ident.get('summary')}): frontier and allocation unreliable"
        eq.append(txt)
    return eq


def fig_isoloss(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """Fig. 4: IsoLoss contours of the CPT law in (N, D) with scratch and CPT compute-optimal frontiers."""
    import altair as alt
    import pandas as pd

    laws = _main_laws(con, study)
    if not laws:
        raise Missing("Chinchilla / extended-CPT fits in `fits`")
    main_fit = laws.get("cpt") or laws["scratch"]
    nr, dr = _isoloss_box(laws)
    contour = _isoloss_contours(main_fit["law_params"], nr, dr)
    front = _frontier_rows(laws, nr, dr)
    x = alt.X("N:Q", scale=alt.Scale(type="log", domain=nr), axis=alt.Axis(format="~s"), title="parameters N")
    y = alt.Y("D:Q", scale=alt.Scale(type="log", domain=dr), axis=alt.Axis(format="~s"), title="tokens D")
    if not contour and not front:
        raise Missing(f"an IsoLoss contour or frontier of {main_fit.get('fit_id')} inside N {nr[0]:.3g}..{nr[1]:.3g}, "
                      f"D {dr[0]:.3g}..{dr[1]:.3g} (the fitted law is degenerate there)")
    layers = []
    if contour:
        layers.append(alt.Chart(pd.DataFrame(contour)).mark_line(strokeWidth=1.2).encode(
            x=x, y=y, detail="level:N",
            color=alt.Color("level:Q", scale=alt.Scale(scheme="viridis"), title=f"IsoLoss ({main_fit.get('fit_id')})"),
            tooltip=[alt.Tooltip("level:Q", title="loss"), alt.Tooltip("N:Q", format=".3s"), alt.Tooltip("D:Q", format=".3s")],
        ))
    if front:
        layers.append(
            alt.Chart(pd.DataFrame(front)).mark_line(strokeWidth=3).encode(
                x=x, y=y, strokeDash=alt.StrokeDash("frontier:N", title="frontier (C = 6ND)"),
                color=alt.value("#e45756"),
                tooltip=["frontier", alt.Tooltip("C:Q", format=".2e"), alt.Tooltip("N:Q", format=".3s"),
                         alt.Tooltip("D:Q", format=".3s"), alt.Tooltip("loss:Q", format=".3f")],
            )
        )
    chart = (
        alt.layer(*layers)
        .resolve_scale(color="independent")
        .properties(width=520, height=360,
                    title={"text": "IsoLoss and compute-optimal frontiers (Fig. 4)", "subtitle": _law_subtitles(laws)})
        .interactive()
    )
    return chart, len(contour) + len(front)


def _replay_rows(con: Any, study: str) -> tuple[Any, str, str]:
    """CPT runs' target and source evals (``which``) with target-language compute, and the source and target
    language names."""
    _need(con, "evals", ["run_id", "tokens", "loss", "flops", "lang"])
    _need(con, "runs", ["run_id", "size", "init", "lang", "source_lang", "replay"])
    no_arm = "and r.arm is null" if "arm" in _columns(con, "runs") else ""  # IPLT arms: figure `iplt`
    df = _df(
        con,
        f"""select e.run_id, r.size, coalesce(r.replay, 0) as replay, e.step, e.tokens, e.flops, e.loss,
                  case when e.lang = r.lang then 'target' else 'source' end as which,
                  r.lang as target_lang, r.source_lang
           from evals e join runs r on r.study = e.study and r.run_id = e.run_id
           where e.study = ? and e.branch is null and r.init = 'cpt' and (e.lang = r.lang or e.lang = r.source_lang) {no_arm}""",
        [study],
    )
    if df.empty or df["replay"].nunique() < 1:
        raise Missing("CPT runs with target/source evals")
    src_name, tgt_name = _lang_names(df["source_lang"]), _lang_names(df["target_lang"])
    df = df.drop(columns=["source_lang", "target_lang"])
    # target-language compute: total compute scaled by the target share of the blend
    df["target_flops"] = df["flops"] * (1 - df["replay"].astype(float))
    df["series"] = df["run_id"] + ":" + df["which"]
    return df, src_name, tgt_name


def _replay_tradeoff(df: Any, src_name: str, tgt_name: str) -> tuple[Any, int]:
    """Source vs target loss at each run's final budget, a line per size ordered by replay (None without both
    languages' evals), and its row count."""
    import altair as alt
    import pandas as pd

    wide = df.pivot_table(index=["run_id", "size", "replay", "step"], columns="which", values=["loss", "target_flops"], aggfunc="first")
    if not (("loss", "target") in wide.columns and ("loss", "source") in wide.columns):
        return None, 0
    t = pd.DataFrame(
        {
            "target_loss": wide[("loss", "target")],
            "source_loss": wide[("loss", "source")],
            "target_flops": wide[("target_flops", "target")],
        }
    ).dropna().reset_index()
    if t.empty:
        return None, 0
    # per compute budget: the last eval of each run (its final budget)
    t = t.sort_values("step").groupby("run_id").tail(1)
    chart = (
        alt.Chart(t)
        .mark_line(point=alt.OverlayMarkDef(size=40))
        .encode(
            x=alt.X("source_loss:Q", scale=alt.Scale(zero=False), title=f"source ({src_name}) loss"),
            y=alt.Y("target_loss:Q", scale=alt.Scale(zero=False), title=f"target ({tgt_name}) loss"),
            color=_size_color(t),
            order="replay:Q",
            tooltip=["run_id", "size", "replay", alt.Tooltip("target_flops:Q", format=".2e"),
                     alt.Tooltip("source_loss:Q", format=".4f"), alt.Tooltip("target_loss:Q", format=".4f")],
        )
        .properties(width=300, height=230, title="trade-off at each run's final budget (line = size, ordered by replay)")
        .interactive(name="zoom_tradeoff")
    )
    return chart, len(t)


def fig_replay(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """Fig. 5: target and source loss vs target compute per replay ratio, and their trade-off."""
    import altair as alt

    df, src_name, tgt_name = _replay_rows(con, study)
    df = _downsample(df, "series", "tokens", mp)
    sel = alt.selection_point(fields=["replay"], bind="legend")
    curves = (
        alt.Chart(df[df["target_flops"] > 0])  # step 0 has no compute yet: off a log axis
        .mark_line(point=alt.OverlayMarkDef(size=10))
        .encode(
            x=alt.X("target_flops:Q", scale=alt.Scale(type="log"), axis=alt.Axis(format=".0e"),
                    title="target-language FLOPs"),
            y=alt.Y("loss:Q", scale=alt.Scale(zero=False)),
            color=alt.Color("replay:O", scale=alt.Scale(scheme="plasma")),
            detail="run_id:N",
            opacity=alt.condition(sel, alt.value(0.9), alt.value(0.08)),
            tooltip=["run_id", "size", "replay", "tokens", alt.Tooltip("loss:Q", format=".4f")],
        )
        .add_params(sel)
        .properties(width=300, height=230)
        .facet(column=alt.Column("which:N", title=None, sort=["target", "source"]))
        .resolve_scale(y="independent")
        .interactive()
    )
    trade, n_trade = _replay_tradeoff(df, src_name, tgt_name)
    charts = [curves] if trade is None else [curves, trade]
    chart = alt.vconcat(*charts).properties(title="Replay: forgetting vs target loss (Fig. 5)").resolve_scale(color="independent")
    return chart, len(df) + n_trade


def _trust_lines(f: dict[str, Any]) -> list[str]:
    """A loss-law fit's identifiability verdict, the remedy it used and its rollout errors (cptscale.fit.identify)."""
    meta = f.get("meta") or {}
    ident, out = meta.get("identifiability") or {}, []
    sel = meta.get("selection") or {}
    if sel.get("points") and ident:  # the loss laws: which points, and the bias of `all` stated
        out.append(f"{f.get('fit_id')}: {sel['points']} points ({sel.get('n_selected', '?')} of "
                   f"{sel.get('n_candidates', '?')})" + (f" — {sel['bias']}" if sel["points"] == "all" else ""))
    if ident:
        rem = meta.get("remedy") or {}
        used = remedy_text(rem, rem.get("free_fit"))
        out.append(f"{f.get('fit_id')}: " + ("identified (no parameter or interval on a bound)" if ident.get("identified")
                                             else f"NOT IDENTIFIED: {ident.get('summary')}; allocation unreliable") + used)
    ro = meta.get("rollout") or {}
    steps = [x for x in ro.get("steps") or [] if x.get("status") == "ok"]
    if steps:
        out.append(f"{f.get('fit_id')}: rollout (fit k sizes, predict k+1) mean rel err "
                   + ", ".join(f"{x['k']}->{x['k'] + 1}: {x['mean_rel_err']:.2%}" for x in steps))
    return out


def _prediction_rows(con: Any, study: str) -> tuple[Any, str | None, str | None]:
    """Fitted and held-out predictions with observed losses (fitted / held-out as ``which``, residuals) and
    the columns of their bootstrap band (None: no band)."""
    _need(con, "predictions", ["fit_id", "predicted_loss", "observed_loss"])
    have = _columns(con, "predictions")
    extra = [c for c in ("kind", "row_kind", "N", "D", "C", "predicted_lo", "predicted_hi", "lo", "hi", "extra")
             if c in have]
    where = " and row_kind in ('points', 'heldout.points')" if "row_kind" in have else ""
    df = _df(
        con,
        f"""select fit_id, predicted_loss, observed_loss{''.join(', "' + c + '"' for c in extra)}
            from predictions where study = ? and observed_loss is not null and predicted_loss is not null{where}""",
        [study],
    )
    if df.empty:
        raise Missing("predictions with observed losses")
    if "extra" in df:  # fit-study keeps the bootstrap band of each point in the row's JSON
        ex = [json.loads(x) if isinstance(x, str) else (x or {}) for x in df["extra"]]
        for col in ("predicted_lo", "predicted_hi"):
            if col not in df:
                df[col] = [e.get(col) for e in ex]
        df = df.drop(columns="extra")
    lo = "predicted_lo" if "predicted_lo" in df and df["predicted_lo"].notna().any() else ("lo" if "lo" in df else None)
    hi = "predicted_hi" if "predicted_hi" in df and df["predicted_hi"].notna().any() else ("hi" if "hi" in df else None)
    df["which"] = (df["row_kind"].map({"points": "fitted", "heldout.points": "held-out prediction"})
                   if "row_kind" in df else "fitted")
    df["residual"] = df["observed_loss"] - df["predicted_loss"]
    return df, lo, hi


def _fit_quality_subtitles(con: Any, study: str) -> list[str]:
    """Each fit's held-out error of the largest size (or why it was skipped) and its trust lines."""
    title_bits = []
    for f in _fits(con, study):
        h = f.get("heldout") or {}
        vals = {k: h[k] for k in ("mae", "max_abs_err", "mean_rel_err", "rel_err") if isinstance(h.get(k), int | float)}
        if vals:
            n = f" N={h['heldout_N']:.3g}" if isinstance(h.get("heldout_N"), int | float) else ""
            title_bits.append(f"{f.get('fit_id')}: held-out largest size{n}: " +
                              ", ".join(f"{k}={v:.3g}" for k, v in vals.items()))
        elif h.get("status") == "skipped" and f.get("params"):
            title_bits.append(f"{f.get('fit_id')}: held-out skipped ({h.get('reason')})")
        title_bits.extend(_trust_lines(f))
    return title_bits


def fig_fit_quality(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """Observed vs predicted with residuals; bootstrap bands (95 % over runs) where present; held-out
    largest-size predictions marked and their error in the subtitle."""
    import altair as alt
    import pandas as pd

    df, lo, hi = _prediction_rows(con, study)
    df = _downsample(df, "fit_id", "predicted_loss", mp)
    title_bits = _fit_quality_subtitles(con, study)
    tip = ["fit_id", "which", alt.Tooltip("predicted_loss:Q", format=".4f"), alt.Tooltip("observed_loss:Q", format=".4f")]
    tip += [c for c in ("N", "D") if c in df]
    sel = alt.selection_point(fields=["fit_id"], bind="legend")
    color = alt.Color("fit_id:N")
    shape = alt.Shape("which:N", scale=alt.Scale(domain=["fitted", "held-out prediction"], range=["circle", "triangle-up"]),
                      title=None)
    op = alt.condition(sel, alt.value(0.85), alt.value(0.08))
    pts = alt.Chart(df).mark_point(filled=True, size=30).encode(
        x=alt.X("predicted_loss:Q", scale=alt.Scale(zero=False), title="predicted loss"),
        y=alt.Y("observed_loss:Q", scale=alt.Scale(zero=False), title="observed loss"),
        color=color, shape=shape, opacity=op, tooltip=tip,
    ).add_params(sel, alt.selection_interval(bind="scales", name="zoom_fit"))  # zooms the whole panel
    diag = alt.Chart(df).mark_line(color="gray", strokeDash=[4, 4]).encode(x="predicted_loss:Q", y="predicted_loss:Q")
    left = [diag, pts]
    band = df.dropna(subset=[lo, hi]) if lo and hi else pd.DataFrame()
    if not band.empty:
        left.insert(0, alt.Chart(band).mark_rule(opacity=0.5).encode(
            x=alt.X(f"{lo}:Q", title="predicted loss"), x2=f"{hi}:Q", y="observed_loss:Q", color=color, opacity=op))
    resid = alt.Chart(df).mark_point(filled=True, size=30).encode(
        x=alt.X("predicted_loss:Q", scale=alt.Scale(zero=False), title="predicted loss"),
        y=alt.Y("residual:Q", title="observed − predicted"),
        color=color, shape=shape, opacity=op, tooltip=[*tip, alt.Tooltip("residual:Q", format=".4f")],
    ).add_params(alt.selection_interval(bind="scales", name="zoom_residuals"))
    layers_r = [resid]
    if not band.empty:
        b2 = band.assign(r_lo=band["observed_loss"] - band[hi], r_hi=band["observed_loss"] - band[lo])
        layers_r.insert(0, alt.Chart(b2).mark_rule(opacity=0.5).encode(
            x="predicted_loss:Q", y="r_lo:Q", y2="r_hi:Q", color=color, opacity=op))
    zero = alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="gray").encode(y="zero:Q")  # one rule
    chart = alt.hconcat(
        alt.layer(*left).properties(width=300, height=260),
        alt.layer(*layers_r, zero).properties(width=300, height=260),
    ).properties(title={"text": "Fit quality" + (" — bars: 95% bootstrap band over runs" if not band.empty else ""),
                        "subtitle": title_bits or ["no held-out error recorded"]})
    return chart, len(df)


def fig_health_curves(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """Training loss per run, downsampled, selectable by size."""
    import altair as alt

    _need(con, "train_metrics", ["run_id", "step", "loss"])
    _need(con, "runs", ["run_id", "size", "init"])
    df = _df(
        con,
        """select t.run_id, r.size, r.init, t.step, t.loss from train_metrics t
           join runs r on r.study = t.study and r.run_id = t.run_id where t.study = ? and t.loss is not null"""
        + _main_steps(con, "t."),
        [study],
    )
    if df.empty:
        raise Missing("train_metrics rows")
    df = _downsample(df, "run_id", "step", mp)
    sel = _size_sel(alt)
    chart = (
        alt.Chart(df).mark_line(strokeWidth=1)
        .encode(
            x="step:Q", y=alt.Y("loss:Q", scale=alt.Scale(zero=False)),
            color=_size_color(df), detail="run_id:N",
            opacity=alt.condition(sel, alt.value(0.8), alt.value(0.05)),
            tooltip=["run_id", "size", "init", "step", alt.Tooltip("loss:Q", format=".4f")],
        )
        .add_params(sel)
        .properties(width=340, height=220)
        .facet(column=alt.Column("init:N", title=None))
        .properties(title="Run health: training loss")
        .interactive()
    )
    return chart, len(df)


def fig_health_lr(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """LR schedule per run: catches a wrong warmup/decay before the fits do."""
    import altair as alt

    _need(con, "train_metrics", ["run_id", "step", "lr"])
    branch = "branch" if "branch" in _columns(con, "train_metrics") else "null::bigint as branch"
    df = _df(con, f"select run_id, step, lr, {branch} from train_metrics where study = ? and lr is not null",
             [study])
    if df.empty:
        raise Missing("learning rates in train_metrics")
    # a WSD decay branch is its own dashed line from its decay start (its steps are in train_metrics
    # with ``branch`` = its total steps), so a wrong decay shows next to the main schedule
    is_branch = df["branch"].notna()
    df["trajectory"] = is_branch.map({False: "main", True: "decay branch"})
    df["series"] = df["run_id"].where(~is_branch, df["run_id"] + " / branch " +
                                      df["branch"].astype("Int64").astype(str))
    df = _downsample(df.drop(columns="branch"), "series", "step", min(mp, 100))
    chart = (
        alt.Chart(df).mark_line(strokeWidth=1, opacity=0.6)
        .encode(x="step:Q", y=alt.Y("lr:Q", axis=alt.Axis(format=".1e")), detail="series:N",
                strokeDash=alt.StrokeDash("trajectory:N", sort=["main", "decay branch"],
                                          legend=alt.Legend(title=None) if is_branch.any() else None),
                tooltip=["series", "step", alt.Tooltip("lr:Q", format=".2e")])
        .properties(width=340, height=200, title="Run health: learning-rate schedules")
        .interactive()
    )
    return chart, len(df)


def fig_blend(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """Planned vs realized blend shares per run: shows a mixer or packing bug at a glance."""
    import altair as alt

    _need(con, "blend_realizations", ["run_id", "source", "planned_share", "realized_share"])
    have = _columns(con, "blend_realizations")
    ph = "phase" if "phase" in have else "'all' as phase"
    df = _df(
        con,
        f"select run_id, {ph}, source, planned_share, realized_share from blend_realizations where study = ?",
        [study],
    )
    if df.empty:
        raise Missing("blend_realizations rows")
    df["delta"] = df["realized_share"] - df["planned_share"]
    chart = (
        alt.Chart(df).mark_point(filled=True, size=40)
        .encode(
            x=alt.X("planned_share:Q", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("realized_share:Q", scale=alt.Scale(domain=[0, 1])),
            color="source:N", shape="phase:N",
            tooltip=["run_id", "phase", "source", alt.Tooltip("planned_share:Q", format=".3f"),
                     alt.Tooltip("realized_share:Q", format=".3f"), alt.Tooltip("delta:Q", format="+.4f")],
        )
        .properties(width=260, height=220, title="Blend: planned vs realized share")
        .interactive()  # zoom in: a realized share off by 0.1 % is invisible on [0, 1]
    )
    return chart, len(df)


def fig_fertility(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """Tokenizer fertility per language: cross-lingual token counts are only comparable through it."""
    import altair as alt

    _need(con, "data_manifests", ["lang", "tokens_per_byte"])
    have = _columns(con, "data_manifests")
    tpc = "avg(tokens_per_char)" if "tokens_per_char" in have else "null"
    df = _df(
        con,
        f"""select lang, avg(tokens_per_byte) as tokens_per_byte, {tpc} as tokens_per_char
            from data_manifests where study = ? group by lang order by lang""",
        [study],
    )
    if df.empty:
        raise Missing("data_manifests rows")
    chart = (
        alt.Chart(df).mark_bar()
        .encode(x=alt.X("lang:N"), y=alt.Y("tokens_per_byte:Q"), color="lang:N",
                tooltip=["lang", alt.Tooltip("tokens_per_byte:Q", format=".4f"), alt.Tooltip("tokens_per_char:Q", format=".4f")])
        .properties(width=200, height=220, title="Tokenizer fertility (tokens per byte)")
    )
    return chart, len(df)


def _arm_key(arm: str) -> tuple[int, float, str]:
    from cptscale.iplt import arm_sort_key

    return arm_sort_key(arm)


def _json_col(v: Any) -> Any:
    """A JSON column's value as Python (None for SQL NULL, which pandas may hand over as NaN)."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return None
    return v if isinstance(v, dict | list) else None


def _iplt_runs(con: Any, study: str) -> Any:
    """The IPLT arms' runs, their JSON columns parsed; ``inherited`` FLOPs and ``parent`` (the classic arm's
    full training run, else "")."""
    _need(con, "runs", ["run_id", "lang", "arm", "arm_panel", "iplt", "flops_spent", "prune"])
    _need(con, "evals", ["run_id", "step", "lang", "loss", "flops"])
    runs = _df(con, """select run_id, arm, arm_panel as panel, lang, iplt, flops_spent, prune, final_params
                       from runs where study = ? and arm is not null""", [study])
    if runs.empty:
        raise Missing("IPLT arms in `runs` (config `iplt`; see cptscale.iplt)")
    runs["iplt"] = [_json_col(x) or {} for x in runs["iplt"]]
    runs["prune"] = [_json_col(x) or [] for x in runs["prune"]]
    runs["inherited"] = [float(i.get("flops_inherited") or 0.0) for i in runs["iplt"]]
    runs["parent"] = [i.get("inherited_from") if isinstance(i.get("inherited_from"), str) else "" for i in runs["iplt"]]
    return runs


def _iplt_speedups(con: Any, study: str, runs: Any) -> dict[str, str]:
    """Training speed-up of each arm's final shape: median tokens/s after its last prune over the median
    before its first prune in the same run (adjacent in time, so a shared machine's load cancels), or,
    for arms without 5 steps before their first prune, over the panel's dense arm (marked †)."""
    speed: dict[str, str] = {}
    if not {"run_id", "step", "tokens_per_s"} <= _columns(con, "train_metrics"):
        return speed
    tm = _df(con, "select run_id, step, tokens_per_s from train_metrics where study = ? and "
                  "list_contains(?, run_id) and tokens_per_s > 0" + _main_steps(con),
             [study, list(runs["run_id"])])
    after: dict[str, float] = {}
    for r in runs.itertuples():
        last = max((int(p["step"]) for p in r.prune), default=-1)
        t = tm[(tm["run_id"] == r.run_id) & (tm["step"] > last)]["tokens_per_s"]
        if len(t):
            after[r.run_id] = float(t.median())
    dense = {r.panel: after.get(r.run_id) for r in runs.itertuples() if r.arm in ("dense", "cpt-dense")}
    for r in runs.itertuples():
        first = min((int(p["step"]) for p in r.prune), default=-1)
        before = tm[(tm["run_id"] == r.run_id) & (tm["step"] < first)]["tokens_per_s"]
        if r.run_id in after and len(before) >= 5:
            speed[r.run_id] = f"{after[r.run_id] / float(before.median()):.2f}x"
        elif r.run_id in after and dense.get(r.panel):
            speed[r.run_id] = f"{after[r.run_id] / dense[r.panel]:.2f}x" + ("" if r.arm.endswith("dense") else " †")
    return speed


def _iplt_prune_marks(r: Any, own: Any, series: str) -> list[dict[str, Any]]:
    """One arm's prune events at the FLOPs and (interpolated) loss where they happened."""
    import numpy as np

    steps, losses = own["step"].to_numpy(float), own["loss"].to_numpy(float)
    pos = own[own["flops"] > 0]
    marks = []
    for p in r.prune:
        px = float(p.get("flops") or 0.0) + r.inherited
        at = float(p["step"])
        if px <= 0 and not pos.empty:  # a step-0 prune: drawn at the first evaluation (log axis)
            px, at = float(pos["flops"].iloc[0]) + r.inherited, float(pos["step"].iloc[0])
        marks.append({"panel": r.panel, "arm": r.arm, "series": series, "step": p.get("step"), "x": px,
                      "loss": float(np.interp(at, steps, losses)),
                      "params_before": p.get("params_before"), "params": p.get("params"),
                      "calib_loss_before": p.get("calib_loss_before"),
                      "calib_loss_after": p.get("calib_loss_after")})
    return marks


def _iplt_table_row(r: Any, own: Any, speed: dict[str, str]) -> dict[str, Any]:
    """One arm's row of the table: final loss, FLOPs spent (with inherited) against the budget, prunes,
    final parameters and speed-up."""
    import numpy as np
    import pandas as pd

    last = own.loc[own["step"].idxmax()]
    spent = (float(r.flops_spent) if r.flops_spent is not None and not pd.isna(r.flops_spent)
             else float(last["flops"])) + r.inherited
    budget = float(r.iplt.get("budget_flops") or np.nan)
    return {"panel": r.panel, "arm": r.arm, "run_id": r.run_id, "final loss": f"{last['loss']:.4f}",
            "FLOPs spent": f"{spent:.4g}", "/ budget": f"{spent / budget:.4f}",
            "prunes": str(len(r.prune)), "final params": f"{int(r.final_params):,}"
            if r.final_params is not None and not pd.isna(r.final_params) else "?",
            "tokens/s after/before": speed.get(r.run_id, "?"),
            "budget": budget}


def _iplt_arms(runs: Any, ev: Any, speed: dict[str, str]) -> tuple[list[Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Per arm with evaluations: its loss curve pieces (classic: its full training, then its own run), its
    prune marks and its table row."""
    curves, marks, table = [], [], []
    for r in runs.itertuples():
        own = ev[(ev["run_id"] == r.run_id) & (ev["lang"] == r.lang)]
        if own.empty:
            continue
        series = f"{r.panel}: {r.arm}"
        if r.parent:  # classic: full dense training first, then the arm's own run (pruned, retrained)
            par = ev[(ev["run_id"] == r.parent) & (ev["lang"] == r.lang)]
            curves.append(par.assign(arm=r.arm, panel=r.panel, series=series, part="full training",
                                     x=par["flops"]))
        curves.append(own.assign(arm=r.arm, panel=r.panel, series=series, part="arm run",
                                 x=own["flops"] + r.inherited))
        marks += _iplt_prune_marks(r, own, series)
        table.append(_iplt_table_row(r, own, speed))
    return curves, marks, table


def _iplt_panel(d: Any, m: Any, b: Any, color: Any, title: str, idx: int) -> Any:
    """One panel: the arms' loss vs FLOPs curves, their prune marks and the budget rule."""
    import altair as alt
    import pandas as pd

    x = alt.X("x:Q", scale=alt.Scale(type="log"), axis=alt.Axis(format=".0e"),
              title="training FLOPs spent (classic: incl. its full training)")
    y = alt.Y("loss:Q", scale=alt.Scale(zero=False), title="validation loss (training language)")
    layers = [alt.Chart(d).mark_line(point=alt.OverlayMarkDef(size=10)).encode(
        x=x, y=y, color=color, detail="series:N", strokeDash=alt.StrokeDash("part:N", title=None),
        tooltip=["arm", "run_id", "step", alt.Tooltip("loss:Q", format=".4f"), alt.Tooltip("x:Q", format=".3e")])]
    if not m.empty:
        layers.append(alt.Chart(m).mark_point(shape="triangle-down", size=90, filled=True, stroke="black").encode(
            x="x:Q", y="loss:Q", color=color,
            tooltip=["arm", "step", "params_before", "params", alt.Tooltip("calib_loss_before:Q", format=".4f"),
                     alt.Tooltip("calib_loss_after:Q", format=".4f"), alt.Tooltip("x:Q", format=".3e")]))
    if len(b):
        layers.append(alt.Chart(pd.DataFrame({"x": [float(b.iloc[0])]})).mark_rule(
            color="gray", strokeDash=[4, 4]).encode(x="x:Q", tooltip=[alt.Tooltip("x:Q", title="budget B",
                                                                                   format=".3e")]))
    return alt.layer(*layers).properties(width=360, height=260, title=title).interactive(name=f"zoom_panel{idx}")


def _iplt_table(tb: Any) -> Any:
    """The arms' table as a text chart, one row per panel and arm."""
    import altair as alt

    from cptscale.iplt import panel_sort_key

    tb = tb.sort_values(["panel", "arm"], key=lambda s: s.map(_arm_key) if s.name == "arm"
                        else s.map(panel_sort_key))
    cols = ["final loss", "FLOPs spent", "/ budget", "prunes", "final params", "tokens/s after/before"]
    long = tb.melt(id_vars=["panel", "arm"], value_vars=cols, var_name="column", value_name="text")
    long["row"] = long["panel"] + ": " + long["arm"]
    rows = list(dict.fromkeys(long["row"]))
    return alt.Chart(long).mark_text(align="left", dx=-40).encode(
        x=alt.X("column:N", sort=cols, axis=alt.Axis(orient="top", labelAngle=0), title=None),
        y=alt.Y("row:N", sort=rows, title=None), text="text:N",
    ).properties(width=620, height=18 * len(rows), title=[
        "final loss and FLOPs per arm (loss at the last eval); tokens/s: median training speed after the last prune",
        "over the median before the first prune in the same run († over the panel's dense arm, another run)"])


def fig_iplt(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """IPLT: validation loss vs the training FLOPs each arm actually spent (the classic arm's curve
    starts with its full dense training), prune events marked, the budget as a rule; a table of each
    arm's final loss and FLOPs."""
    import altair as alt
    import pandas as pd

    from cptscale.iplt import panel_sort_key

    runs = _iplt_runs(con, study)
    ids = sorted({*runs["run_id"], *(p for p in runs["parent"] if p)})
    ev = _df(con, "select run_id, step, lang, loss, flops from evals where study = ? and branch is null and list_contains(?, run_id) "
                  "and flops is not null order by run_id, step", [study, ids])
    curves, marks, table = _iplt_arms(runs, ev, _iplt_speedups(con, study, runs))
    if not curves:
        raise Missing("evals of the IPLT arms (no arm has finished an evaluation yet)")
    df = pd.concat(curves, ignore_index=True)
    df = df[df["x"] > 0]  # log FLOPs axis: the untrained step-0 evaluations are left out
    df = _downsample(df, "series", "x", mp)
    order = sorted(set(df["arm"]), key=_arm_key)
    color = alt.Color("arm:N", sort=order, scale=alt.Scale(scheme="category10"), title="arm")
    mk = pd.DataFrame(marks)
    tb = pd.DataFrame(table)
    panels = [_iplt_panel(df[df["panel"] == panel], mk[mk["panel"] == panel] if not mk.empty else mk,
                          tb[tb["panel"] == panel]["budget"].dropna(), color, panel, i)
              for i, panel in enumerate(sorted(set(df["panel"]), key=panel_sort_key))]
    chart = alt.vconcat(alt.hconcat(*panels), _iplt_table(tb)).properties(
        title={"text": "IPLT: prune early vs after training vs small from scratch, at equal FLOPs",
               "subtitle": ["▼ = a prune event (one at step 0 is drawn at the first evaluation); dashed rule = the "
                            "budget B every arm spends; classic's dashed segment = its full dense training"]})
    return chart, len(df) + len(mk) + len(tb)


def _recipe_text(spec: Any) -> str:
    """A CPT run's LR recipe and blend switch, from its run.json (runs.config)."""
    s = _json_col(spec) or {}
    sc = s.get("schedule") or {}
    txt = (f"{sc.get('kind', '?')} {float(sc.get('max_lr') or 0):.2g}→{float(sc.get('min_lr') or 0):.2g}, "
           f"warmup {sc.get('warmup_steps', '?')}")
    phases = (s.get("data") or {}).get("phases") or []
    if len(phases) > 1:
        txt += ", switch at step " + ", ".join(str(p.get("end_step")) for p in phases[:-1])
    return txt


def _variant_rows(con: Any, study: str) -> Any:
    """CPT runs' target and source evals with each run's recipe variant, recipe text and legend label."""
    _need(con, "runs", ["run_id", "size", "init", "lang", "source_lang", "variant", "replay"])
    _need(con, "evals", ["run_id", "step", "tokens", "lang", "loss"])
    rcols = _columns(con, "runs")
    no_arm = "and r.arm is null" if "arm" in rcols else ""
    cfg = "r.config" if "config" in rcols else "null"
    df = _df(con, f"""select e.run_id, r.size, coalesce(r.replay, 0) as replay,
                             coalesce(r.variant, '(study recipe)') as variant, {cfg} as config, e.step, e.tokens,
                             e.loss, case when e.lang = r.lang then 'target' else 'source' end as which
                      from evals e join runs r on r.study = e.study and r.run_id = e.run_id
                      where e.study = ? and e.branch is null and r.init = 'cpt' {no_arm}
                        and (e.lang = r.lang or e.lang = r.source_lang)""", [study])
    if df.empty or (df["variant"] == "(study recipe)").all():
        raise Missing("CPT recipe variants (config `variants`) with evals")
    recipes = {rid: _recipe_text(c) for rid, c in df.groupby("run_id")["config"].first().items()}
    df = df.drop(columns="config")
    df["recipe"] = df["run_id"].map(recipes)
    many = df[["size", "replay"]].drop_duplicates().shape[0] > 1
    df["label"] = df["variant"] + (" (" + df["size"] + ", r" + df["replay"].map("{:g}".format) + ")" if many else "")
    df["series"] = df["run_id"] + ":" + df["which"]
    return df


def _variant_lr(con: Any, study: str, df: Any, mp: int, color: Any, op: Any, order: list[str]) -> tuple[Any, int]:
    """The variants' LR schedules (None when train_metrics has no LR) and the row count."""
    import altair as alt

    if "lr" not in _columns(con, "train_metrics"):
        return None, 0
    lr = _df(con, "select run_id, step, lr from train_metrics where study = ? and list_contains(?, run_id) "
                  "and lr is not null" + _main_steps(con), [study, sorted(set(df["run_id"]))])
    if lr.empty:
        return None, 0
    lr["label"] = lr["run_id"].map(df.groupby("run_id")["label"].first())
    lr = _downsample(lr, "run_id", "step", min(mp, 150))
    return alt.Chart(lr).mark_line(strokeWidth=1.5).encode(
        x=alt.X("step:Q"), y=alt.Y("lr:Q", axis=alt.Axis(format=".1e"), title="LR"), color=color,
        detail="run_id:N", opacity=op, tooltip=["run_id", "label", "step", alt.Tooltip("lr:Q", format=".2e")],
    ).properties(width=260, height=max(120, 22 * len(order)), title="LR schedule per recipe").interactive(
        name="zoom_lr"), len(lr)


def fig_variants(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """CPT recipe variants (config `variants`, e.g. the Reuse, Don't Retrain ablation): target and source
    loss vs CPT tokens per variant, their LR schedules, and each variant's final losses side by side."""
    import altair as alt

    df = _downsample(_variant_rows(con, study), "series", "step", mp)
    order = sorted(set(df["label"]), key=lambda v: (not v.startswith("(study recipe)"), v))
    color = alt.Color("label:N", sort=order, title="CPT recipe", scale=alt.Scale(scheme="tableau20"))
    sel = alt.selection_point(fields=["label"], bind="legend")
    op = alt.condition(sel, alt.value(0.9), alt.value(0.1))
    curves, finals = [], []
    last = df.sort_values("step").groupby(["run_id", "which"]).tail(1)
    for which in ("target", "source"):
        d = df[(df["which"] == which) & (df["tokens"] > 0)]  # log axis: the loaded source model is step 0
        if d.empty:
            continue
        c = alt.Chart(d).mark_line(point=alt.OverlayMarkDef(size=10)).encode(
            x=alt.X("tokens:Q", title="CPT tokens", scale=alt.Scale(type="log"), axis=alt.Axis(format="~s")),
            y=alt.Y("loss:Q", scale=alt.Scale(zero=False), title=f"{which} loss"),
            color=color, detail="run_id:N", opacity=op,
            tooltip=["run_id", "label", "recipe", "step", alt.Tooltip("loss:Q", format=".4f")],
        ).properties(width=300, height=230, title=f"{which}-language loss").interactive(name=f"zoom_{which}")
        curves.append(c if curves else c.add_params(sel))  # one legend selection drives every view
        finals.append(alt.Chart(last[last["which"] == which]).mark_point(filled=True, size=80).encode(
            x=alt.X("loss:Q", scale=alt.Scale(zero=False), title=f"final {which} loss"),
            y=alt.Y("label:N", sort=order, title=None), color=color,
            tooltip=["run_id", "label", "recipe", alt.Tooltip("loss:Q", format=".4f")],
        ).properties(width=200, height=max(120, 22 * len(order)), title=f"final {which} loss per recipe")
            .interactive(name=f"zoom_final_{which}", bind_y=False))  # y: recipes (nominal)
    lr_chart, n_lr = _variant_lr(con, study, df, mp, color, op, order)
    bottom = [*finals, *([lr_chart] if lr_chart is not None else [])]
    chart = alt.vconcat(alt.hconcat(*curves), alt.hconcat(*bottom)).properties(title={
        "text": "CPT recipes: warmup, minimum LR, blend switch (Reuse, Don't Retrain ablation)",
        "subtitle": ["one colour per recipe variant (config `variants`); legend entries select a recipe"]})
    return chart, len(df) + len(last) + n_lr


def fig_next_run(con: Any, study: str, mp: int) -> tuple[Any, int]:
    """The fit's suggested compute-optimal next run: observed vs predicted loss with the bootstrap interval."""
    import altair as alt
    import pandas as pd

    _need(con, "predictions", ["fit_id", "row_kind", "predicted_loss", "observed_loss"])
    have = _columns(con, "predictions")
    cols = [c for c in ("run_id", "N", "D", "C", "extra") if c in have]
    df = _df(con, f"""select fit_id, predicted_loss, observed_loss{''.join(', "' + c + '"' for c in cols)}
                      from predictions where study = ? and row_kind = 'comparison'
                        and predicted_loss is not null and observed_loss is not null""", [study])
    if df.empty:
        raise Missing("the suggested next run's check (fit.next_run_budget: fits/next-<lang>.json)")
    ex = [_json_col(x) or {} for x in df["extra"]] if "extra" in df else [{}] * len(df)
    df["lo"] = [e.get("predicted_loss_lo") for e in ex]
    df["hi"] = [e.get("predicted_loss_hi") for e in ex]
    df = df.drop(columns=[c for c in ("extra",) if c in df])
    df["rel_err"] = (df["observed_loss"] - df["predicted_loss"]).abs() / df["observed_loss"]
    sub = []
    for r in df.itertuples():
        iv = (f" [{r.lo:.4f}, {r.hi:.4f}]" if r.lo is not None and r.hi is not None and not pd.isna(r.lo) else "")
        inside = ("" if not iv else (", inside the interval" if r.lo <= r.observed_loss <= r.hi
                                     else ", outside the interval"))
        e = ex[len(sub)] if len(sub) < len(ex) else {}
        plan = (f"{e['shape']} planned from {e.get('planned_from')}, FLOPs {e['flops_vs_budget']:+.1%} vs budget"
                + ("" if e.get("reliable", True) else ", UNRELIABLE: that fit is not identified") + "; "
                if e.get("shape") and e.get("flops_vs_budget") is not None else "")
        sub.append(f"{r.fit_id}: {plan}predicted {r.predicted_loss:.4f}{iv}, observed {r.observed_loss:.4f} "
                   f"(relative error {r.rel_err:.2%}{inside})")
    vals = [v for c in ("predicted_loss", "observed_loss", "lo", "hi") for v in df[c].dropna().astype(float)]
    pad = 0.05 * (max(vals) - min(vals) or 0.1)
    dom = [min(vals) - pad, max(vals) + pad]
    x = alt.X("predicted_loss:Q", scale=alt.Scale(domain=dom, zero=False), title="predicted loss")
    tip = ["fit_id", *(["run_id"] if "run_id" in df else []), alt.Tooltip("predicted_loss:Q", format=".4f"),
           alt.Tooltip("observed_loss:Q", format=".4f"), alt.Tooltip("rel_err:Q", format=".2%")]
    tip += [alt.Tooltip(f"{c}:Q", format=".3g") for c in ("N", "D", "C") if c in df]
    layers = [
        alt.Chart(pd.DataFrame({"a": dom})).mark_line(color="gray", strokeDash=[4, 4]).encode(
            x=alt.X("a:Q", scale=alt.Scale(domain=dom)), y=alt.Y("a:Q", scale=alt.Scale(domain=dom))),
        alt.Chart(df).mark_point(filled=True, size=90).encode(
            x=x, y=alt.Y("observed_loss:Q", scale=alt.Scale(domain=dom, zero=False), title="observed loss"),
            color="fit_id:N", tooltip=tip),
    ]
    band = df.dropna(subset=["lo", "hi"])
    if not band.empty:  # the rule spans the interval; ticks mark its ends (visible when it is narrow)
        layers.insert(1, alt.Chart(band).mark_rule(strokeWidth=2).encode(
            x="lo:Q", x2="hi:Q", y="observed_loss:Q", color="fit_id:N"))
        ends = band.melt(id_vars=["fit_id", "observed_loss"], value_vars=["lo", "hi"], value_name="end")
        layers.insert(2, alt.Chart(ends).mark_tick(orient="vertical", thickness=2, size=14).encode(
            x="end:Q", y="observed_loss:Q", color="fit_id:N",
            tooltip=["fit_id", "variable", alt.Tooltip("end:Q", format=".4f")]))
    chart = alt.layer(*layers).properties(width=300, height=260, title={
        "text": "Next run: the family shape the scratch law predicts best for the budget, trained",
        "subtitle": [*sub, "point: prediction at the trained N (the fit's convention) and D; bar: bootstrap interval "
                     "of that fit at the planned N, D; dashed: observed = predicted"]}).interactive()
    return chart, len(df)


BUILDERS: dict[str, Callable[[Any, str, int], tuple[Any, int]]] = {
    "loss_compute": fig_loss_compute,
    "transfer": fig_transfer,
    "isoloss": fig_isoloss,
    "replay": fig_replay,
    "fit_quality": fig_fit_quality,
    "health_curves": fig_health_curves,
    "health_lr": fig_health_lr,
    "blend": fig_blend,
    "fertility": fig_fertility,
    "iplt": fig_iplt,
    "variants": fig_variants,
    "next_run": fig_next_run,
    "existing": fig_existing,
}
