"""``cptscale summary``: the answer to the study's question in a few lines, after a run.

Reads what the pipeline wrote (the DuckDB store and the fit files) and prints where the report is,
the fitted laws, how much compute CPT saved and the held-out-largest-size prediction error. The
same numbers go to ``summary.json`` so scripts and tests can check them.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from cptscale.fit.identify import remedy_text
from cptscale.fit.saving import FRAC_FLOOR
from cptscale.runs import RUN_ID
from cptscale.util import read_json


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, int | float) and math.isfinite(v) else "?"


def _law_text(fit: dict[str, Any]) -> str:
    """The fitted equation of a ``cptscale-fit/1`` record (see cptscale.fit), frozen values marked with *."""
    p, law, fixed = fit.get("params") or {}, fit.get("law", "?"), fit.get("fixed") or {}
    if fit.get("status", "ok") != "ok":
        return f"{law}: skipped ({fit.get('reason') or 'no reason recorded'})"

    def v(k: str, fmt: str) -> str:
        return _num(p.get(k), fmt) + ("*" if k in fixed else "")

    if law == "chinchilla":
        return f"L = {v('E', '.3f')} + {v('A', '.4g')}/N^{v('alpha', '.3f')} + {v('B', '.4g')}/D^{v('beta', '.3f')}"
    if law == "cpt":
        return (f"L = {v('E', '.3f')} + {v('A', '.4g')}/N^{v('alpha', '.3f')} + "
                f"{v('B', '.4g')}/(D^{v('beta', '.3f')} N^{v('gamma', '.3f')})   [B' = B, beta' = beta]")
    if law == "muennighoff":
        return (f"L = {v('E', '.3f')} + {v('A', '.4g')}/N^{v('alpha', '.3f')} + {v('B', '.4g')}/D'^{v('beta', '.3f')}, "
                f"D' = effective data of U = {v('U', '.4g')} unique tokens, R*_D = {v('R_D', '.3g')}")
    if law == "lovelace":
        return (f"L = {v('E', '.3f')} + {v('A', '.4g')}/N^{v('alpha', '.3f')} + {v('B', '.4g')}/D^{v('beta', '.3f')} + "
                f"{v('P', '.4g')} R_D^{v('delta', '.3f')} (N/U)^{v('kappa', '.3f')}, U = {v('U', '.4g')} unique tokens")
    if law == "envelope":
        return f"L = {v('k', '.5g')} * C^{v('m', '.4f')}"
    if law == "hernandez":
        return f"D_T = {v('k', '.4g')} * D_F^{v('alpha', '.3f')} * N^{v('beta', '.3f')}"
    if law == "isoflop":
        cc = fit.get("cross_check") or {}
        tail = f" (law's a = {_num(cc.get('a_law'), '.3f')})" if cc else ""
        return f"N_opt ∝ C^{v('a', '.3f')}, D_opt ∝ C^{v('b', '.3f')}{tail}"
    return f"{law}: {json.dumps(p)}"


def _interval_text(fit: dict[str, Any]) -> str | None:
    """The bootstrap intervals of the parameters a reader weighs: E (the record keeps it only when it
    varied: free, or a frozen E resampled), the exponents, a, the envelope's slope, and the data-constrained
    laws' repetition constants (R*_D; the penalty's P, delta, kappa)."""
    iv = fit.get("intervals") or {}
    shown = ("E", "alpha", "beta", "gamma", "a", "m", "R_D", "P", "delta", "kappa")
    parts = [f"{k} [{_num(x.get('lo'), '.4g')}, {_num(x.get('hi'), '.4g')}]" for k, x in iv.items()
             if isinstance(x, dict) and x.get("lo") is not None and k in shown]
    none = {k: x["reason"] for k, x in iv.items() if isinstance(x, dict) and x.get("reason") and k in shown}
    if none:  # e.g. a law fitted exactly through too few runs: every resample reproduces it
        parts.append(f"no interval for {', '.join(none)} ({next(iter(none.values()))})")
    if not parts:
        return None
    bs = (fit.get("meta") or {}).get("bootstrap") or {}
    fixed_e = (fit.get("fixed") or {}).get("E")
    cond = (f"; E held at {_num(fixed_e, '.4g')} in every resample: the intervals leave its own uncertainty out"
            if fixed_e is not None and "E" not in iv else "")
    return (f"{int(100 * bs.get('level', 0.95))}% intervals ({bs.get('n_ok', '?')} resamples over runs): "
            + ", ".join(parts) + cond)


def _heldout_text(fit: dict[str, Any]) -> str | None:
    h = fit.get("heldout") or {}
    if not isinstance(h, dict) or not h:
        return None
    if h.get("status") not in (None, "ok"):
        return f"held-out largest size: skipped ({h.get('reason')})"
    parts = []
    for key in ("mae", "rmse", "max_abs_err", "mean_rel_err", "mae_log"):
        if isinstance(h.get(key), int | float) and math.isfinite(h[key]):
            parts.append(f"{key} {h[key]:.4g}")
    size = h.get("heldout_N")
    head = f"held-out largest size ({size:.3g} params)" if isinstance(size, int | float) else "held-out largest size"
    return f"{head}: " + ", ".join(parts) if parts else None


def _ident(fit: dict[str, Any]) -> dict[str, Any]:
    return fit.get("identifiability") or (fit.get("meta") or {}).get("identifiability") or {}


def _ident_text(fit: dict[str, Any]) -> str | None:
    """The identifiability verdict of a loss-law fit: flagged parameters and the remedy used."""
    iv = _ident(fit)
    if not iv or fit.get("status", "ok") != "ok":
        return None
    rem = fit.get("remedy") or iv.get("remedy") or {}
    used = remedy_text(rem, ((rem.get("free_fit") or {}).get("identifiability") or {}).get("summary"))
    if iv.get("identified"):
        return f"identified: no parameter or interval on a bound{used}"
    return (f"NOT IDENTIFIED: {iv.get('summary')}; allocation and next run from this fit are unreliable{used}"
            + (f"; offered: {', '.join(rem.get('offered') or [])}" if rem.get("offered") else ""))


def _rollout_text(fit: dict[str, Any]) -> str | None:
    ro = fit.get("rollout") or {}
    steps = [x for x in ro.get("steps") or [] if x.get("status") == "ok"]
    if not steps:
        return None
    parts = [f"{x['k']}->{x['k'] + 1}: {x['mean_rel_err']:.2%}" for x in steps]
    return (f"rollout (fit the smallest k sizes, predict size k+1), mean rel err per step: {', '.join(parts)}; "
            f"mean {ro['mean_rel_err']:.2%}")


def _selection_text(fit: dict[str, Any]) -> str | None:
    sel = (fit.get("meta") or {}).get("selection") or {}
    pts = sel.get("points")
    if not pts or "bias" not in sel or fit.get("status", "ok") != "ok":  # the loss laws' point selection
        return None
    return f"points: {pts} ({sel.get('n_selected', '?')} of {sel.get('n_candidates', '?')}); {sel.get('bias', '')}".rstrip("; ")


def _next_run(study_dir: Path, fits: dict[str, dict[str, Any]], fsum: dict[str, Any]) -> dict[str, Any] | None:
    """The next run as planned (``runs/next-<lang>/run.json``: the ``suggestion`` its one fit planned),
    else the planning fit's law optimum (not yet planned); the same fit as run.json and the report."""
    for path in sorted(study_dir.glob("runs/next-*/run.json")):
        try:
            spec = read_json(path)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(spec.get("suggestion"), dict) and "shape" in spec["suggestion"]:
            return {**spec["suggestion"], "planned": True, "run_json": str(path)}
    nxt = fsum.get("next_run")
    if nxt and nxt.get("fit_id") in fits:
        return {**nxt, "planned": False}
    return nxt


def _median_interval(vals: list[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
                     ) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the median over runs (runs resampled with replacement)."""
    import numpy as np

    if len(vals) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    x = np.asarray(vals, float)
    meds = np.median(x[rng.integers(0, len(x), size=(n_boot, len(x)))], axis=1)
    q = (1 - level) / 2
    lo, hi = np.quantile(meds, [q, 1 - q])
    return float(lo), float(hi)


def compute_saving(db: Path, study: str) -> dict[str, Any]:
    """Median share of FLOPs CPT saved (vs scratch at equal target loss) and median effective data
    transferred (scratch tokens to the same loss minus CPT target tokens), over each CPT run's last
    evaluation within the same-size scratch run's loss range (an even count averages the middle two), each
    with a 95 % percentile bootstrap interval over CPT runs; read from the store's ``transfer`` table; also
    per replay ratio. A run that ends below its scratch run's best loss is read at an earlier evaluation
    (``read_early``): the curve cannot say what scratch would need there; fit-study's law-based saving
    (``cptscale.fit.saving``) can. Single tiny runs are noisy: the interval says how far the headline
    number can be trusted. ``headline``: the figure the summary leads with (:func:`headline_saving`)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute(
            """
            with last as (
              select run_id, size, replay, max(step) as step from transfer
              where study = ? and frac_saved is not null group by run_id, size, replay),
            ends as (select run_id, max(step) as last_step from transfer where study = ? group by run_id)
            select t.run_id, t.size, t.replay, t.frac_saved, t.tokens, t.scratch_tokens_equiv,
                   t.effective_data_transferred, t.step, ends.last_step
            from transfer t join last using (run_id, step) join ends using (run_id)
            where t.study = ? order by t.size, t.replay, t.run_id
            """,
            [study, study, study],
        ).fetchall()
    except duckdb.Error as exc:
        return {"error": f"no transfer metrics in {db}: {exc}"}
    finally:
        con.close()
    per_run = [
        {"run_id": i, "size": s, "replay": r, "frac_saved": f, "tokens": t, "scratch_tokens_equiv": e,
         "effective_data_transferred": dt, "step": st, "read_early": st < last}
        for i, s, r, f, t, e, dt, st, last in rows
    ]
    fracs = [float(x["frac_saved"]) for x in per_run]
    dts = [float(x["effective_data_transferred"]) for x in per_run if x["effective_data_transferred"] is not None]
    lo, hi = _median_interval(fracs)
    dlo, dhi = _median_interval(dts)
    groups: dict[float, list[dict[str, Any]]] = {}
    for x in per_run:
        groups.setdefault(float(x["replay"] or 0.0), []).append(x)
    by_replay = []
    for rep, grp in sorted(groups.items()):
        vals = [float(x["frac_saved"]) for x in grp]
        rlo, rhi = _median_interval(vals)
        by_replay.append({"replay": f"{rep:g}", "n_runs": len(vals), "median_frac_saved": statistics.median(vals),
                          "median_frac_saved_lo": rlo, "median_frac_saved_hi": rhi,
                          "n_read_early": sum(bool(x["read_early"]) for x in grp)})
    out = {"per_run": per_run, "median_frac_saved": statistics.median(fracs) if fracs else None,
           "median_frac_saved_lo": lo, "median_frac_saved_hi": hi, "n_runs": len(fracs),
           "n_read_early": sum(bool(x["read_early"]) for x in per_run), "by_replay": by_replay,
           "median_effective_data": statistics.median(dts) if dts else None,
           "median_effective_data_lo": dlo, "median_effective_data_hi": dhi,
           "interval": "95% percentile bootstrap of the median over CPT runs (2000 resamples)"}
    head, _ = headline_saving(out)
    out["headline"] = {"replay": head["replay"] if head is not out else "all",
                       **{k: head.get(k) for k in ("median_frac_saved", "median_frac_saved_lo",
                                                   "median_frac_saved_hi", "n_runs")}}
    return out


def arm_results(db: Path, study: str) -> dict[str, Any]:
    """Final loss (training language, last evaluation) and FLOPs of every IPLT arm and of every CPT recipe
    variant, from the store (empty lists when the study has none)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = {r[0] for r in con.execute(
            "select column_name from information_schema.columns where table_name = 'runs'").fetchall()}
        last = """with last as (select run_id, lang, max(step) as step from evals
                                where study = ? and branch is null group by 1, 2)
                  select e.run_id, e.lang, e.loss, e.flops from evals e join last using (run_id, lang, step)
                  where e.study = ? and e.branch is null"""
        arms, variants = [], []
        if "arm" in cols:
            for rid, arm, panel, loss, spent, iplt in con.execute(
                    f"""select r.run_id, r.arm, r.arm_panel, l.loss, coalesce(r.flops_spent, l.flops), r.iplt
                        from runs r join ({last}) l on l.run_id = r.run_id and l.lang = r.lang
                        where r.study = ? and r.arm is not null order by r.arm_panel, r.run_id""",
                    [study, study, study]).fetchall():
                ip = json.loads(iplt) if isinstance(iplt, str) else (iplt or {})
                total = float(spent or 0.0) + float(ip.get("flops_inherited") or 0.0)
                budget = ip.get("budget_flops")
                arms.append({"run_id": rid, "arm": arm, "panel": panel, "final_loss": loss, "flops": total,
                             "budget_flops": budget, "flops_over_budget": total / budget if budget else None})
        if "variant" in cols:
            arm_filter = "and r.arm is null" if "arm" in cols else ""
            for rid, variant, which, loss in con.execute(
                    f"""select r.run_id, coalesce(r.variant, '(study recipe)'),
                               case when l.lang = r.lang then 'target' else 'source' end, l.loss
                        from runs r join ({last}) l on l.run_id = r.run_id
                        where r.study = ? and r.init = 'cpt' {arm_filter}
                          and (l.lang = r.lang or l.lang = r.source_lang) order by 1, 3 desc""",
                    [study, study, study]).fetchall():
                variants.append({"run_id": rid, "variant": variant, "which": which, "final_loss": loss})
        if not any(v["variant"] != "(study recipe)" for v in variants):
            variants = []
        from cptscale.iplt import arm_sort_key, panel_sort_key

        arms.sort(key=lambda a: (panel_sort_key(a["panel"]), arm_sort_key(a["arm"])))
        return {"iplt": arms, "variants": variants}
    except duckdb.Error as exc:
        return {"iplt": [], "variants": [], "error": str(exc)}
    finally:
        con.close()


def summarize(study_dir: Path, study: str) -> dict[str, Any]:
    fits_dir = study_dir / "fits"
    out: dict[str, Any] = {"study": study, "report": str(study_dir / "report" / "index.html")}
    fits, fsum = {}, {}
    for path in sorted(fits_dir.glob("*.json")):
        try:
            data = read_json(path)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and str(data.get("format", "")).startswith("cptscale-fit-summary"):
            fsum = data
        elif isinstance(data, dict) and str(data.get("format", "")).startswith("cptscale-existing"):
            out["existing"] = _existing(data)
        elif isinstance(data, dict) and "params" in data and "law" in data:
            fits[data.get("fit_id") or path.stem] = data
    out["fits"] = {name: {"law": f["law"], "kind": f.get("kind"), "status": f.get("status", "ok"),
                          "reason": f.get("reason"), "equation": _law_text(f), "intervals": _interval_text(f),
                          "heldout": _heldout_text(f), "identifiability": _ident_text(f),
                          "rollout": _rollout_text(f), "points": _selection_text(f)}
                   for name, f in fits.items()}
    out["next_run"] = _next_run(study_dir, fits, fsum)
    out["law_comparison"] = fsum.get("law_comparison") or []
    db = study_dir / "cptscale.duckdb"
    out["simulated"] = simulated_runs(db, study) if db.exists() else {"simulated": 0, "trained": 0}
    out["compute_saving"] = compute_saving(db, study) if db.exists() else {"error": f"{db} missing"}
    out["compute_saving"]["by_law"] = [x for x in fsum.get("cpt_saving") or [] if x.get("status") == "ok"]
    if db.exists():
        out.update({k: v for k, v in arm_results(db, study).items() if k in ("iplt", "variants")})
    return out


def _existing(data: dict[str, Any]) -> dict[str, Any]:
    """CPT of an existing model (fits/existing.json): the answer per target language and the fertility."""
    return {"answers": {lang: r.get("answer") or f"not available: {r.get('reason')}"
                        for lang, r in (data.get("recommendation") or {}).items()},
            "fertility": data.get("fertility") or {}, "source_loss_before": data.get("source_loss_before"),
            "reference": data.get("reference")}


def simulated_runs(db: Path, study: str) -> dict[str, int]:
    """How many of the study's stored runs are simulated (train.backend: simulate) and how many trained."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        sim, trained = con.execute("SELECT count(*) FILTER (WHERE simulated), count(*) FILTER (WHERE NOT simulated "
                                   "OR simulated IS NULL) FROM runs WHERE study = ?", [study]).fetchone()
    except duckdb.Error:  # a store from before the flag: every run in it was trained
        sim, trained = 0, con.execute("SELECT count(*) FROM runs WHERE study = ?", [study]).fetchone()[0]
    finally:
        con.close()
    return {"simulated": int(sim or 0), "trained": int(trained or 0)}


#: The prefix of every summary line of a study with simulated runs.
SIMULATED_PREFIX = "[SIMULATED] "


def format_summary(s: dict[str, Any]) -> str:
    lines = _format_lines(s)
    sim = (s.get("simulated") or {}).get("simulated", 0)
    if not sim:
        return "\n".join(lines)
    trained = s["simulated"].get("trained", 0)
    head = (f"{sim} of the {sim + trained} runs are SIMULATED from a known law (train.backend: simulate): these "
            "numbers validate the pipeline's statistics; they are not results of training")
    return "\n".join(SIMULATED_PREFIX + line for line in [head, *lines])


def _existing_lines(ex: dict[str, Any]) -> list[str]:
    """An existing model's study: its answer per language and its tokenizer's fertility."""
    lines = []
    for lang, answer in ex["answers"].items():
        lines.append(f"  how many {lang} tokens and how much replay for this model: {answer}")
    for lang, f in ex["fertility"].items():
        per_word = f" {f['tokens_per_word']:.3f} per word," if f.get("tokens_per_word") else ""
        lines.append(f"  fertility of the model's tokenizer, {lang}:{per_word} {_num(f.get('tokens_per_char'), '.3f')}"
                     " per character")
    return lines


def _fit_lines(s: dict[str, Any], skip_skipped: bool) -> list[str]:
    """Each fit's equation and trust lines, and the Chinchilla vs extended law comparison."""
    lines = []
    for name, f in s["fits"].items():
        if skip_skipped and f.get("status") == "skipped":
            continue
        lines.append(f"  fit {name}: {f['equation']}")
        for key in ("points", "identifiability", "intervals", "heldout", "rollout"):
            if f.get(key):
                lines.append(f"      {f[key]}")
    for c in s.get("law_comparison") or []:
        lines.append(f"  {c['data']} data, Huber (sum): Chinchilla {c['huber_sum_chinchilla']:.4g} vs extended "
                     f"{c['huber_sum_extended']:.4g} (gamma = {c['gamma_extended']:.3f})")
    return lines


def _next_run_lines(nr: dict[str, Any] | None) -> list[str]:
    """The suggested next run: planned, the law's optimum only, or why there is none."""
    if nr and nr.get("planned"):
        from cptscale.nextrun import describe

        return [f"  {describe(nr)}", *(f"      warning: {w}" for w in nr.get("warnings") or [])]
    if nr and nr.get("valid"):
        return [f"  law optimum for C = {nr['C']:.3g} FLOPs ({nr['fit_id']}; not planned as a run): "
                f"N = {nr['N']:.4g} params, D = {nr['D']:.4g} tokens, predicted loss {nr['predicted_loss']:.4f}"]
    if nr:
        return [f"  next run for C = {nr['C']:.3g}: {nr.get('reason')}"]
    return []


def _pct(x: float) -> str:
    """A saved fraction as a percentage; below :data:`cptscale.fit.saving.FRAC_FLOOR` only that bound."""
    return f"< {FRAC_FLOOR:.0%}" if x < FRAC_FLOOR else f"{x:.1%}"


def _pct_iv(d: dict[str, Any]) -> str:
    """A median saving with its interval, e.g. ``7.9% [-16.7%, 16.1%]``."""
    if d.get("median_frac_saved_lo") is None:
        return f"{_pct(d['median_frac_saved'])} [no interval]"
    return f"{_pct(d['median_frac_saved'])} [{_pct(d['median_frac_saved_lo'])}, {_pct(d['median_frac_saved_hi'])}]"


def _replay_label(name: str) -> str:
    return "all runs" if name == "all" else f"replay {name}"


def _saving_by_replay_lines(cs: dict[str, Any]) -> list[str]:
    """The median saving per replay ratio: from the scratch curves and, when fit-study wrote it, by the law
    (beside the curve's with one target language; on lines of their own per language with several)."""
    laws = cs.get("by_law") or []
    law = laws[0] if len(laws) == 1 else {}
    law_by = {x["replay"]: x for x in law.get("by_replay") or []}
    groups = list(cs.get("by_replay") or [])
    if len(groups) > 1:  # the headline's median over every run, beside the law's
        groups.append({"replay": "all", "n_runs": cs["n_runs"], "n_read_early": cs.get("n_read_early"),
                       **{k: cs[k] for k in ("median_frac_saved", "median_frac_saved_lo", "median_frac_saved_hi")}})
    if not groups and not law_by:
        return []
    head = "      by replay ratio: same-size scratch curve, last evaluation within its range"
    if law_by:
        head += (f" | scratch law ({law['law_fit']}{'' if law.get('reliable', True) else ', UNRELIABLE'}) "
                 "at each run's end")
    lines = [head]
    for name in [*(g["replay"] for g in groups), *(k for k in law_by if k not in {g["replay"] for g in groups})]:
        g = next((x for x in groups if x["replay"] == name), None)
        curve = "-"
        if g:
            early = f"; {g['n_read_early']} read before the end" if g.get("n_read_early") else ""
            curve = f"{_pct_iv(g)} ({g['n_runs']} runs{early})"
        lines.append(f"        {_replay_label(name)}: {curve}" + (f" | {_pct_iv(law_by[name])}" if name in law_by else ""))
    for lw in laws if len(laws) > 1 else []:
        groups_text = "; ".join(f"{_replay_label(g['replay'])} {_pct_iv(g)}" for g in lw["by_replay"])
        unreliable = "" if lw.get("reliable", True) else ", UNRELIABLE"
        lines.append(f"        {lw['lang']}, scratch law ({lw['law_fit']}{unreliable}) at each run's end: {groups_text}")
    if cs.get("n_read_early"):
        lines.append("        read before its end: the run ends below its scratch run's best loss, where the curve "
                     "cannot say what scratch would need (the law can)")
    return lines


def headline_saving(cs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The saving the summary leads with, and the words that say which runs it covers: with several replay
    ratios, the smallest one's median (a replay run spends part of its tokens on the source language, so
    pooling the ratios mixes two recipes and, on the demo, turns replay 0's +11.4 % into -2.3 %); with one
    ratio, the median over every run."""
    groups = cs.get("by_replay") or []
    if len(groups) > 1:
        return groups[0], f" at replay {groups[0]['replay']}"
    return cs, ""


def _saving_lines(cs: dict[str, Any], existing: bool) -> list[str]:
    """The median CPT compute saving with its interval, per replay ratio, the effective data and each run's
    saving."""
    lines = []
    if cs.get("median_frac_saved") is None:
        if not existing:  # an existing model's study has no scratch runs to save compute against
            lines.append(f"  CPT compute saving: {cs.get('error', 'not available (no CPT run reached a scratch loss)')}")
        return lines
    head, where = headline_saving(cs)
    iv = (f" [{_pct(head['median_frac_saved_lo'])}, {_pct(head['median_frac_saved_hi'])}]"
          if head.get("median_frac_saved_lo") is not None else " [no interval: one CPT run]")
    lines.append(f"  CPT compute saving{where} (median over {head.get('n_runs', '?')} CPT runs, last evaluation): "
                 f"{_pct(head['median_frac_saved'])}{iv}")
    if head.get("median_frac_saved_lo") is not None:
        lines.append(f"      {cs['interval']}; the saving is "
                     + ("positive with 95% confidence" if head["median_frac_saved_lo"] > 0 else
                        "negative with 95% confidence" if head["median_frac_saved_hi"] < 0 else
                        "not distinguishable from zero at 95%")
                     + ("; the other replay ratios and all runs pooled below" if where else ""))
    lines += _saving_by_replay_lines(cs)
    if cs.get("median_effective_data") is not None:
        div = (f" [{cs['median_effective_data_lo']:.4g}, {cs['median_effective_data_hi']:.4g}]"
               if cs.get("median_effective_data_lo") is not None else "")
        lines.append(f"      effective data transferred (median over all {cs['n_runs']} runs): "
                     f"{cs['median_effective_data']:.4g} tokens{div}")
    law_runs = {r["run_id"]: r for lw in cs.get("by_law") or [] for r in lw.get("per_run") or []}
    for row in cs["per_run"]:
        m = RUN_ID.match(row.get("run_id") or "")
        variant = m.group("variant") if m else None
        label = f"{row['size']:>8} replay {row['replay']:<5g}" + (f" {variant:<10}" if variant else "")
        text = f"      {label} saved {_pct(row['frac_saved'])} of FLOPs"
        if row.get("read_early"):
            text += f" (at step {row['step']}, before its end)"
        lr = law_runs.get(row.get("run_id"))
        if lr:
            liv = (f" [{_pct(lr['frac_saved_lo'])}, {_pct(lr['frac_saved_hi'])}]"
                   if lr.get("frac_saved_lo") is not None else "")
            text += f"; by the law at its end: {_pct(lr['frac_saved'])}{liv}"
        lines.append(text)
    return lines


def _arm_and_variant_lines(s: dict[str, Any]) -> list[str]:
    """IPLT arms' final loss and FLOPs against the budget; recipe variants' final target / source loss."""
    lines = []
    if s.get("iplt"):
        lines.append("  IPLT arms (final loss on the training language at equal FLOPs; FLOPs / budget):")
        for a in s["iplt"]:
            ratio = f"{a['flops_over_budget']:.4f}" if a.get("flops_over_budget") is not None else "?"
            lines.append(f"      {a['panel']:>14} {a['arm']:<16} loss {_num(a['final_loss'], '.4f')}  "
                         f"FLOPs {_num(a['flops'], '.4g')} ({ratio})")
    if s.get("variants"):
        lines.append("  CPT recipe variants (final loss, target / source):")
        by: dict[str, dict[str, float]] = {}
        for v in s["variants"]:
            by.setdefault(f"{v['variant']} ({v['run_id']})", {})[v["which"]] = v["final_loss"]
        for name, d in by.items():
            lines.append(f"      {name}: {_num(d.get('target'), '.4f')} / {_num(d.get('source'), '.4f')}")
    return lines


def _format_lines(s: dict[str, Any]) -> list[str]:
    ex = s.get("existing")
    # CPT of an existing model: its answer first; the ladder's laws (all skipped: one size) are left out
    return [f"study {s['study']}", f"  report: {s['report']}", *(_existing_lines(ex) if ex else []),
            *_fit_lines(s, bool(ex)), *_next_run_lines(s.get("next_run")),
            *_saving_lines(s["compute_saving"], bool(ex)), *_arm_and_variant_lines(s)]
