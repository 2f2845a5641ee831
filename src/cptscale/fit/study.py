"""Fitting a whole study (``cptscale fit-study``, the workflow's fit step): every law from the points table of
``cptscale db points``, one JSON record per fit plus ``summary.json``; see :func:`fit_study`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptscale.errors import CLIError
from cptscale.fit.constrained import (
    CONSTRAINED_BOUNDS,
    bootstrap_constrained,
    fit_data_constrained,
    fit_overfit_penalty,
)
from cptscale.fit.estimate import (
    allocate,
    exponents,
    fit_envelope,
    fit_hernandez,
    isoflop,
    lower_frontier,
)
from cptscale.fit.identify import (
    _MORE_POINTS,
    POINT_SELECTIONS,
    REMEDY_POLICIES,
    design_counts,
    first_identified,
    fit_remedied,
    identifiability,
    rollout,
    rollout_result,
    rollout_step,
    select_points,
)
from cptscale.fit.laws import EQUATIONS, LAWS, LOSSES, FitResult, _min_sizes
from cptscale.fit.points import Points, _load_df, _points
from cptscale.fit.saving import law_saving
from cptscale.fit.uncertainty import (
    _LEVEL,
    BOOTSTRAP_SCHEMES,
    _bootstrap_generic,
    _err_stats,
    _interval,
    heldout_validation,
)


def _hash(pts: Points) -> str:
    from cptscale.util import stable_hash

    return stable_hash([pts.N.tolist(), pts.D.tolist(), pts.L.tolist(), pts.run.tolist()])


def _skipped(fit_id: str, law: str, kind: str, lang: str | None, reason: str, **extra: Any) -> dict[str, Any]:
    return {"format": "cptscale-fit/1", "fit_id": fit_id, "law": law, "kind": kind, "lang": lang,
            "status": "skipped", "reason": reason, "equation": EQUATIONS.get(law), "params": {}, "fixed": {},
            "meta": extra}


def _unique_tokens(db: str | None, study: str | None) -> dict[str, float]:
    """Unique training tokens per language (the data manifests in the store), for the data-constrained law
    and the allocation's unique-token cap; empty without a store."""
    if not db or not Path(db).exists():
        return {}
    from cptscale.store.queries import connect

    con = connect(db)
    try:
        have = {r[0] for r in con.execute("select table_name from information_schema.tables").fetchall()}
        if "data_manifests" not in have:
            return {}
        q = "select lang, max(train_tokens) from data_manifests where train_tokens is not null"
        rows = con.execute(q + (" and study = ?" if study else "") + " group by lang", [study] if study else []).fetchall()
        return {str(lang): float(t) for lang, t in rows if t}
    finally:
        con.close()


#: The data-constrained laws fitted when scratch runs repeat data: fit_id prefix and fitter per law.
_CONSTRAINED_LAWS = {"muennighoff": ("scratch-constrained", fit_data_constrained),
                     "lovelace": ("scratch-overfit", fit_overfit_penalty)}


def _remedy_meta(rem: dict[str, Any]) -> dict[str, Any]:
    """The remedy as the store, the summary and the report read it: the policy, the remedy used and, when
    one was, what the free fit it replaced said (so a remedied law is never shown without its free fit's
    flag)."""
    free = (rem.get("free_fit") or {}).get("identifiability") or {}
    return {"policy": rem["policy"], "used": rem["used"],
            "free_fit": free.get("summary") if rem["used"] != "none" else None}


def _constrained_record(law: str, lang: str, frame_sel: tuple[Any, dict[str, Any]], U: float,
                        scratch: dict[str, Any] | None, budgets: Sequence[float], kw: dict[str, Any],
                        nboot: int = 0, seed: int = 0, scheme: str = "bayes", policy: str = "flag",
                        fixed_E: float | None = None) -> dict[str, Any]:
    """A data-constrained law (:data:`_CONSTRAINED_LAWS`: Muennighoff et al.'s effective data, Lovelace et
    al.'s overfitting penalty) on the scratch runs, when some of them repeat data (else skipped: it reduces
    to Chinchilla); held-out largest size like the other laws, so the two forms compare on the same runs.
    With ``nboot`` resamples it gets intervals (:func:`bootstrap_constrained`) and the identifiability
    check of the other laws, its R_D profile or penalty box included; when that fails and ``policy`` is
    ``auto``, the fixed-E remedies in the scratch law's order (fixed E given; E of the scratch Chinchilla
    fit of the same runs, resampled with that fit's bootstrap), the first identified kept and recorded.
    The reduced law without E is offered but not applied: on synthetic repeated-data studies whose loss
    has a floor (E = 2) that the design cannot resolve, it was "identified" in 11 of 12 and its beta
    interval held the truth in 2 of 12 (bench/constrained_coverage.py)."""
    prefix, fitter = _CONSTRAINED_LAWS[law]
    fit_id = f"{prefix}-{lang}"
    frame, sel = frame_sel
    sel = {**sel, "unique_tokens": U}
    if not len(frame):
        return _skipped(fit_id, law, "scratch", lang, "no points", selection=sel)
    pts = _points(frame)
    epochs = float(pts.D.max() / U)
    if epochs <= 1:
        return _skipped(fit_id, law, "scratch", lang, f"no run repeats data (largest D = {epochs:.2f} "
                        f"epochs of the {U:.4g} unique tokens): the data-constrained law is Chinchilla's", selection=sel)
    sbs = scratch["bs"] if scratch else None
    fixed = {k: v for k, v in (scratch["fr"].fixed if scratch else {}).items() if k == "E"}
    e_src = ({"E": sbs["samples"]["E"]} if fixed and sbs and "E" in sbs["info"].get("resampled", ()) else None)
    counts = design_counts(pts)

    def one(fx: dict[str, float], fsx: dict[str, np.ndarray] | None) -> tuple[FitResult, Any, dict[str, Any]]:
        fr = fitter(pts, U, fixed=fx, **kw)
        bs = (bootstrap_constrained(pts, fr, nboot, seed, scheme, kw, fsx, sbs["run_draws"] if fsx and sbs else None,
                                    budgets) if nboot else None)
        return fr, bs, identifiability(fr, bs["intervals"] if bs else None, counts, fr.meta.get("on_bound"),
                                       CONSTRAINED_BOUNDS[law])

    try:
        fr, bs, ident = one(fixed, e_src)
        rem: dict[str, Any] = {"policy": policy, "offered": [
            "fixed E (fit.fixed_E, or E of the scratch Chinchilla fit of the same runs)",
            "reduced law without E (E = 0) for the range studied: offered, not applied by fit.remedy: auto for "
            "the data-constrained laws (its intervals then leave out a floor the data cannot rule out: measured "
            "by bench/constrained_coverage.py)", _MORE_POINTS], "tried": [], "used": "none",
            "free_fit": {"params": fr.params, "identifiability": ident}}
        if not ident["identified"] and policy == "auto" and "E" not in fixed:
            cands: list[tuple[str, dict[str, float], dict[str, np.ndarray] | None]] = []
            if fixed_E is not None:
                cands.append((f"fixed E = {fixed_E:g} (given: fit.fixed_E)", {"E": float(fixed_E)}, None))
            if scratch and scratch["ident"]["identified"] and "E" not in scratch["fr"].fixed:
                e = scratch["fr"].params["E"]
                cands.append((f"fixed E = {e:.4g} from the scratch Chinchilla fit of the same runs"
                              + (" (E resampled with that fit's bootstrap)" if sbs else ""),
                              {"E": e}, {"E": sbs["samples"]["E"]} if sbs else None))
            found = first_identified([(label, lambda fx=fx, fsx=fsx: one(fx, fsx), {}) for label, fx, fsx in cands],
                                     rem)
            if found:
                fr, bs, ident = found
    except CLIError as exc:  # the points cannot identify the law (e.g. too few repeated points): a refusal
        return _skipped(fit_id, law, "scratch", lang, f"refused: {exc}", selection=sel)
    except Exception as exc:
        return _skipped(fit_id, law, "scratch", lang, f"fit failed: {exc}", selection=sel)
    ro = _constrained_rollout(pts, fitter, U, {k: v for k, v in fr.fixed.items() if k == "E"}, kw)
    last = ro["steps"][-1] if ro["steps"] else None  # fitted on every size but the largest: the held-out fit
    ho: dict[str, Any]
    if last is None:
        ho = {"status": "skipped", "reason": f"{len(pts.sizes)} sizes; need >= 4 to hold one out"}
    elif last["status"] != "ok":
        ho = {"status": "skipped", "reason": last["reason"]}
    else:
        ho = {"status": "ok", "heldout_N": last["predicted_N"],
              **{k: last[k] for k in ("n_train", "n_test", "mae", "rmse", "max_abs_err", "mean_rel_err", "bias",
                                      "params")}}
    pred = fr.predict(pts.N, pts.D)
    return {"format": "cptscale-fit/1", "fit_id": fit_id, "law": law, "kind": "scratch", "lang": lang,
            "status": "ok", "reason": None, "equation": EQUATIONS[law], "params": fr.params,
            "fixed": fr.fixed, "intervals": _varied_intervals(fr, bs), "heldout": ho, "rollout": ro,
            "identifiability": ident,
            "remedy": rem,
            "allocation": _with_intervals(allocate(fr, budgets, unique_tokens=U), bs),
            "points": [{"run_id": str(r), "N": float(a), "D": float(b), "observed_loss": float(o),
                        "predicted_loss": float(q)} for r, a, b, o, q in zip(pts.run, pts.N, pts.D, pts.L, pred,
                                                                              strict=True)],
            "meta": {**fr.meta, "selection": sel, "identifiability": ident,
                     "remedy": _remedy_meta(rem), "rollout": ro,
                     "bootstrap": bs["info"] if bs else {"n_requested": 0}},
            "bootstrap": _samples_json(bs)}


def _constrained_rollout(pts: Points, fitter: Any, U: float, fixed: dict[str, float], kw: dict[str, Any],
                         need: int = 3) -> dict[str, Any]:
    """The ladder rollout of a data-constrained law (:func:`cptscale.fit.identify.rollout` for the laws
    fitted by their own fitters): for every k >= ``need``, fit the smallest k sizes and predict size k+1.
    Its last step is the held-out validation of the largest size."""
    sizes = pts.sizes
    steps: list[dict[str, Any]] = []
    for k in range(need, len(sizes)):
        train, test = pts.subset(sizes[k - 1] >= pts.N), pts.subset(sizes[k] == pts.N)
        try:
            fr = fitter(train, U, fixed=fixed, **kw)
        except Exception as exc:  # e.g. the penalty refused: too few repeated points among the smaller sizes
            steps.append({"k": k, "status": "skipped", "reason": str(exc)})
            continue
        steps.append(rollout_step(k, sizes, train, test, fr))
    return rollout_result(steps, steps[-1].get("reason", "") if steps else
                          f"{len(sizes)} sizes: no step with >= {need} sizes to fit and one to predict")


def _varied_intervals(fr: FitResult, bs: dict[str, Any] | None) -> dict[str, Any]:
    """The bootstrap's intervals less those of frozen parameters that stayed constant (a frozen parameter
    resampled with its source, e.g. E from the scratch or a separate fit, keeps its interval)."""
    intervals = dict(bs["intervals"]) if bs else {}
    for k in set(fr.fixed) - set(bs["info"].get("resampled", ()) if bs else ()):
        intervals.pop(k, None)
    return intervals


def _samples_json(bs: dict[str, Any] | None) -> dict[str, list[float | None]]:
    """The bootstrap's per-resample samples for the record (JSON: NaN as null)."""
    return {k: [None if not np.isfinite(x) else float(x) for x in v] for k, v in bs["samples"].items()} if bs else {}


def _with_intervals(alloc: list[dict[str, Any]], bs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Allocation rows with the bootstrap's interval of N_opt, D_opt and the predicted loss at each budget."""
    for row in alloc:
        if bs and row["C"] in bs["alloc"]:
            for k in ("N_opt", "D_opt", "predicted_loss"):
                iv = _interval(bs["alloc"][row["C"]][k], bs["info"]["level"])
                row[f"{k}_lo"], row[f"{k}_hi"] = iv["lo"], iv["hi"]
    return alloc


def _loss_fit_record(fit_id: str, kind: str, lang: str | None, pts: Points, fr: FitResult,
                     bs: dict[str, Any] | None, heldout: dict[str, Any], budgets: Sequence[float],
                     next_budget: float | None, selection: dict[str, Any], fixed_from: str | None,
                     unique_tokens: float | None = None) -> dict[str, Any]:
    alloc = _with_intervals(allocate(fr, budgets, unique_tokens=unique_tokens), bs)
    pred = fr.predict(pts.N, pts.D)
    lo = hi = None
    if bs is not None and np.isfinite(bs["pred"]).any(axis=1).sum() >= 2:
        q = (1 - bs["info"]["level"]) / 2
        lo, hi = np.nanquantile(bs["pred"], [q, 1 - q], axis=0)
    points = []
    for i in range(len(pts.N)):
        row = {"run_id": str(pts.run[i]), "N": float(pts.N[i]), "D": float(pts.D[i]),
               "C": float(6 * pts.N[i] * pts.D[i]), "observed_loss": float(pts.L[i]),
               "predicted_loss": float(pred[i]), "residual": float(pts.L[i] - pred[i])}
        if lo is not None:
            row["predicted_lo"], row["predicted_hi"] = float(lo[i]), float(hi[i])
        points.append(row)
    ex = exponents(fr)
    rec = {
        "format": "cptscale-fit/1", "fit_id": fit_id, "law": fr.law, "kind": kind, "lang": lang, "status": "ok",
        "reason": None, "equation": EQUATIONS[fr.law], "params": fr.params, "fixed": fr.fixed,
        "fixed_from": fixed_from, "intervals": _varied_intervals(fr, bs), "exponents": ex, "allocation": alloc,
        "next_run": _next_run(fr, next_budget, bs, pts) if next_budget else None,
        "heldout": heldout, "points": points,
        "meta": {**fr.meta, "selection": selection, "bootstrap": bs["info"] if bs else {"n_requested": 0}},
        "bootstrap": _samples_json(bs),
    }
    return rec


def _next_run(fr: FitResult, C: float, bs: dict[str, Any] | None, pts: Points) -> dict[str, Any] | None:
    """The compute-optimal run for budget C under this law (N and tokens; steps follow from the batch)."""
    row = allocate(fr, [C])[0]
    if row["N_opt"] is None:
        return {"C": C, "valid": False, "reason": row.get("reason")}
    out = {"C": C, "valid": True, "N": row["N_opt"], "D": row["D_opt"], "tokens_per_param": row["tokens_per_param"],
           "predicted_loss": row["predicted_loss"], "N_over_largest_fitted": row["N_opt"] / float(pts.N.max()),
           "D_over_largest_fitted": row["D_opt"] / float(pts.D.max())}
    if bs is not None and C in bs["alloc"]:
        for k, src in (("N", "N_opt"), ("D", "D_opt"), ("predicted_loss", "predicted_loss")):
            iv = _interval(bs["alloc"][C][src], bs["info"]["level"])
            out[f"{k}_lo"], out[f"{k}_hi"] = iv["lo"], iv["hi"]
    return out


def _heldout_loss(pts: Points, law: str, fixed: dict[str, float], need: int, **kw: Any) -> dict[str, Any]:
    if len(pts.sizes) < need + 1:
        return {"status": "skipped", "reason": f"{len(pts.sizes)} sizes: dropping the largest leaves fewer than "
                                                f"the {need} this law needs"}
    try:
        return heldout_validation(pts, law, fixed, **kw)
    except Exception as exc:
        return {"status": "skipped", "reason": str(exc)}


def _transfer_table(db: str | None, transfer: str | None, study: str | None) -> Any:
    """Hernandez inputs: run_id, lang, replay, N, D_F (CPT target tokens), D_T, step, from a CSV/Parquet
    (``--transfer``) or from the ``transfer`` and ``runs`` tables of a DuckDB store (``--db``)."""

    if transfer:
        df = _load_df(transfer)
        need = {"N", "D_F", "D_T"}
        if not need <= set(df.columns):
            raise CLIError(f"{transfer}: needs columns {sorted(need)} (plus run_id, lang, replay if several)")
        return df
    if not db:
        return None
    from cptscale.store.queries import connect

    con = connect(db)
    try:
        have = {r[0] for r in con.execute("select table_name from information_schema.tables").fetchall()}
        if not {"transfer", "runs"} <= have:
            return None
        q = """select t.run_id, r.lang, coalesce(r.replay, 0.0) as replay, r.params::DOUBLE as N,
                      r.params_nonemb::DOUBLE as params_nonemb,
                      t.target_tokens::DOUBLE as D_F, t.effective_data_transferred as D_T, t.step, r.steps
               from transfer t join runs r on r.study = t.study and r.run_id = t.run_id
               where not coalesce(t.extrapolated, false) and t.effective_data_transferred is not null"""
        args: list[Any] = []
        if study:
            q += " and t.study = ?"
            args.append(study)
        # a fixed point order: the fit's sums, its points list and its input hash must not follow the scan
        return con.execute(q + " order by t.run_id, t.step", args).df()
    finally:
        con.close()


def _study_config_hash(given: str | None, db: str | None, study: str | None,
                       points: str) -> tuple[str | None, str | None]:
    """The study's config hash for a fit's provenance, and where it came from (see :func:`fit_study`)."""
    from cptscale.util import read_json

    if given:
        return given, "--config-hash"
    if db and Path(db).exists():
        from cptscale.store.queries import connect

        con = connect(db)
        try:
            have = {r[0] for r in con.execute("select table_name from information_schema.tables").fetchall()}
            if "studies" in have:
                q = "select config_hash from studies where config_hash is not null"
                rows = con.execute(q + " and study = ?", [study]).fetchall() if study else con.execute(q).fetchall()
                if len({r[0] for r in rows}) == 1:
                    return rows[0][0], f"{db} (studies)"
        finally:
            con.close()
    sj = Path(points).resolve().parent.parent / "study.json"
    if sj.exists():
        try:
            h = read_json(sj).get("config_hash")
        except (OSError, ValueError):
            h = None
        if h:
            return h, str(sj)
    return None, None


@dataclass(frozen=True)
class _StudyFit:
    """The settings every law of one ``fit-study`` call shares (what each per-law step needs)."""

    budgets: Sequence[float]
    bootstrap: int
    seed: int
    next_run_budget: float | None
    remedy: str
    fixed_E: float | None
    kw: dict[str, Any]  # the loss fits' delta, reduction, grid, loss, overestimate_penalty
    cpt_replay: str
    points_mode: str
    params: str
    min_step_fraction: float
    bootstrap_scheme: str = "wildjk"

    @property
    def alloc_budgets(self) -> list[float]:
        return [*self.budgets, *([self.next_run_budget] if self.next_run_budget else [])]


#: The loss laws of one language, in the order their records are listed; they are fitted in
#: :data:`_LOSS_LAW_ORDER`: the CPT Chinchilla comparison first (the scratch law's fixed-E remedy is that
#: same fit), then the scratch Chinchilla fit (the CPT law freezes E, A, alpha from it)
_LOSS_LAW_PLAN = (("scratch", "chinchilla", None), ("cpt", "cpt", "frozen"), ("cpt", "chinchilla", None),
                  ("scratch", "cpt", None))
_LOSS_LAW_ORDER = (2, 0, 1, 3)
#: The paper's Table 3 comparisons (Chinchilla on CPT runs, the extended law on scratch runs): fitted free,
#: and frozen as the CPT law when that free fit is not identified (:func:`_frozen_comparison`)
_COMPARISON_LAWS = (("cpt", "chinchilla"), ("scratch", "cpt"))


def _read_points(points: str, cpt_replay: str, params: str, min_step_fraction: float) -> tuple[Any, int]:
    """The points table with every column the fits read (run, replay, D_target; N by ``params``), cut to
    ``min_step_fraction`` of each run; also the number of rows in the file."""
    df = _load_df(points)
    need_cols = {"N", "D", "loss", "init", "lang"}
    if not need_cols <= set(df.columns):
        raise CLIError(f"{points}: needs columns {sorted(need_cols)} (+ run, replay, D_target, step); "
                   "write it with `cptscale db points`")
    if "run" not in df.columns:
        df["run"] = df["run_id"] if "run_id" in df.columns else df.index.astype(str)
    if "replay" not in df.columns:
        df["replay"] = 0.0
    df["replay"] = df["replay"].fillna(0.0)
    if "D_target" not in df.columns:
        df["D_target"] = df["D"] * (1 - df["replay"])
    if cpt_replay not in ("min", "all"):
        raise CLIError(f"--cpt-replay must be 'min' or 'all', not {cpt_replay!r}")
    if params == "nonembedding":
        if "params_nonemb" not in df.columns:
            raise CLIError(f"{points}: --params nonembedding needs the column params_nonemb (cptscale db points writes it)")
        df["N"] = df["params_nonemb"].astype(float)
    elif params != "total":
        raise CLIError(f"--params must be 'total' or 'nonembedding', not {params!r}")
    n_in = len(df)
    if min_step_fraction > 0 and "step" in df.columns:
        last = df.groupby("run")["step"].transform("max")
        df = df[df["step"] >= min_step_fraction * last]
    return df, n_in


def _transfer_inputs(db: str | None, transfer: str | None, study: str | None) -> tuple[Any, str]:
    """The Hernandez inputs (or None) and, when there are none, why."""
    if not (db or transfer):
        return None, "no --db or --transfer given"
    try:
        tr_df = _transfer_table(db, transfer, study)
        return tr_df, "transfer table not in the store" if tr_df is None else ""
    except Exception as exc:
        return None, f"cannot read transfer metrics: {exc}"


def _lang_point_sets(df: Any, lang: str, base_sel: dict[str, Any], cpt_replay: str,
                     points_mode: str) -> tuple[dict[str, tuple[Any, dict[str, Any]]], dict[str, Any], float | None]:
    """One target language's points: the selected (frame, selection record) per kind for the loss laws, the
    whole curves per kind (envelope, IsoFLOP) and the replay ratio of the CPT runs used (None: all)."""
    sc_all = df[(df["init"] == "scratch") & (df["lang"] == lang)]
    cp_all = df[(df["init"] == "cpt") & (df["lang"] == lang)]
    rep_used = None
    if len(cp_all) and cpt_replay == "min":
        rep_used = float(cp_all["replay"].min())
        cp_all = cp_all[cp_all["replay"] == rep_used]
    cp_all = cp_all.assign(D=cp_all["D_target"])
    sc, sc_sel = select_points(sc_all, points_mode)
    cp, cp_sel = select_points(cp_all, points_mode)
    base_sel = {**base_sel, "what": POINT_SELECTIONS[points_mode]["rule"] + "; target-language validation "
                "loss; D = tokens seen"}
    sets = {
        "scratch": (sc, {**base_sel, **sc_sel, "init": "scratch"}),
        "cpt": (cp, {**base_sel, **cp_sel, "init": "cpt", "replay": rep_used if cpt_replay == "min" else "all",
                     "D": "D_target = CPT target-language tokens (replay and source pre-training excluded)"}),
    }
    return sets, {"scratch": sc_all, "cpt": cp_all}, rep_used


def _frozen_validation(pts: Points, law: str, need: int, main: bool, scratch: dict[str, Any],
                       kw: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Rollout and held-out check of a law with E, A, alpha frozen from the scratch fit: each step freezes
    the values the scratch fit had on the same sizes."""
    ro_fixed = scratch["rollout_fixed"]
    ro = rollout(pts, law, lambda k, r=ro_fixed: r.get(k), need, **kw) if main else None
    if scratch["ho"].get("status") == "ok":
        hfix = {k: scratch["ho"]["params"][k] for k in ("E", "A", "alpha")}
        ho = _heldout_loss(pts, law, hfix, need, **kw)
        ho["frozen_from"] = "the scratch fit without its largest size"
    else:
        ho = {"status": "skipped", "reason": "the scratch held-out fit (source of E, A, alpha) was skipped"}
    return ro, ho


def _loss_law_record(kind: str, law: str, frozen: str | None, lang: str,
                     sets: dict[str, tuple[Any, dict[str, Any]]], scratch: dict[str, Any] | None,
                     unique: dict[str, float], opt: _StudyFit, separate: dict[str, Any] | None = None,
                     ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One loss-law fit of one language (fit, bootstrap, remedy, rollout, held-out) as its record, and the
    state the CPT law needs when this is the scratch Chinchilla fit, or the free fit and its bootstrap when
    it is the CPT Chinchilla comparison (the scratch law's ``separate`` fit for its fixed-E remedy); else
    None."""
    fit_id = f"{kind}-{({'chinchilla': 'chinchilla', 'cpt': 'extended'}[law])}-{lang}"
    frame, sel = sets[kind]
    fixed: dict[str, float] = {}
    fixed_from = None
    if frozen:
        if scratch is None:
            return _skipped(fit_id, law, kind, lang, "needs the scratch Chinchilla fit for the frozen E, A, alpha, "
                            "which was skipped", selection=sel), None
        fixed = {k: scratch["fr"].params[k] for k in ("E", "A", "alpha")}
        fixed_from = f"scratch-chinchilla-{lang}"
    pts = _points(frame) if len(frame) else None
    need = _min_sizes(law, fixed)
    nfree = len(LAWS[law]) - len(fixed)
    if pts is None or len(pts.sizes) < need or len(pts.N) < nfree + 1:
        have = "no points" if pts is None else f"{len(pts.N)} points of {len(pts.sizes)} sizes"
        return _skipped(fit_id, law, kind, lang, f"{have}; the {law} law with {nfree} free parameters needs "
                        f">= {need} sizes and >= {nfree + 1} points", selection=sel), None
    main = (kind, law) in (("scratch", "chinchilla"), ("cpt", "cpt"))
    fs = {k: scratch["bs"]["samples"][k] for k in fixed} if frozen and scratch and scratch["bs"] else None
    try:
        fr, bs, ident, rem = fit_remedied(
            pts, law, fixed, opt.bootstrap, opt.seed, opt.alloc_budgets, fs, opt.kw,
            opt.remedy if (kind, law) == ("scratch", "chinchilla") else "flag", opt.fixed_E,
            sets["cpt"][0] if kind == "scratch" else None, opt.bootstrap_scheme,
            scratch["bs"]["run_draws"] if fs is not None and scratch else None,
            (separate["fr"], separate["bs"]) if separate and kind == "scratch" else None)
    except Exception as exc:
        return _skipped(fit_id, law, kind, lang, f"fit failed: {exc}", selection=sel), None
    if frozen:
        assert scratch is not None
        ro, ho = _frozen_validation(pts, law, need, main, scratch, opt.kw)
    else:
        rfix = {k: fr.fixed[k] for k in fr.fixed}  # the remedy's frozen values hold at every step
        ro = rollout(pts, law, lambda k, f=rfix: f, need, **opt.kw) if main else None
        ho = _heldout_loss(pts, law, rfix, need, **opt.kw)
    rec = _loss_fit_record(fit_id, kind, lang, pts, fr, bs, ho, opt.budgets, opt.next_run_budget, sel, fixed_from,
                           unique.get(lang))
    if frozen and scratch and not scratch["ident"]["identified"]:  # frozen values of an unidentified fit
        ident = {**ident, "identified": False, "allocation_reliable": False,
                 "summary": f"E, A, alpha frozen from {fixed_from}, which is not identified "
                            f"({scratch['ident']['summary']})" + ("" if ident["identified"] else
                                                                  f"; {ident['summary']}")}
    rec.update(identifiability=ident, rollout=ro, remedy=rem)
    rec["meta"].update(identifiability=ident, rollout=ro, remedy=_remedy_meta(rem))
    if (kind, law) == ("cpt", "chinchilla") and not frozen:  # free: the scratch law's separate fit
        return rec, {"fr": fr, "bs": bs}
    if kind == "scratch" and law == "chinchilla":
        steps = {x["k"]: {k: x["params"][k] for k in ("E", "A", "alpha")}
                 for x in (ro or {}).get("steps", []) if x["status"] == "ok"}
        return rec, {"fr": fr, "bs": bs, "ho": ho, "rollout_fixed": steps, "ident": ident}
    return rec, None


def _frozen_comparison(free: dict[str, Any], kind: str, law: str, lang: str,
                       sets: dict[str, tuple[Any, dict[str, Any]]], scratch: dict[str, Any],
                       unique: dict[str, float], opt: _StudyFit) -> dict[str, Any]:
    """A comparison law (the CPT Chinchilla fit, the scratch extended fit) whose free fit is not identified,
    refitted by the paper's own CPT protocol (its section 3.2: E, A, alpha kept from the scratch fit "to
    reduce variance"); kept when that is identified and recorded as the remedy used, else the free fit stays,
    flagged, with the attempt in its remedy record. Frozen like the extended CPT law, each comparison is then
    nested with the law it is compared with: the two differ only by gamma, which is what the paper's Table 3
    weighs. The free CPT Chinchilla fit stays the scratch law's separate fit for its fixed-E remedy (that
    needs only its E, which is interior)."""
    label = f"E, A, alpha frozen from scratch-chinchilla-{lang} (the paper's CPT protocol, as the extended CPT law)"
    rem = {**free["remedy"], "policy": "auto", "tried": list(free["remedy"]["tried"]),
           "offered": [label, *free["remedy"]["offered"]]}
    rec, _ = _loss_law_record(kind, law, "frozen", lang, sets, scratch, unique, opt)
    used = free
    if rec["status"] != "ok":
        rem["tried"].append({"remedy": label, "error": rec["reason"]})
    else:
        ident = rec["identifiability"]
        rem["tried"].append({"remedy": label, "params": rec["params"], "identified": ident["identified"],
                             "summary": ident["summary"]})
        if ident["identified"]:
            used, rem["used"] = rec, label
    used["remedy"] = rem
    used["meta"]["remedy"] = _remedy_meta(rem)
    return used


def _curve_records(lang: str, sets: dict[str, tuple[Any, dict[str, Any]]], curves: dict[str, Any],
                   records: list[dict[str, Any]], opt: _StudyFit) -> list[dict[str, Any]]:
    """The envelope and IsoFLOP records of one language (whole curves), each kind's IsoFLOP cross-checked
    against the ok loss-law fits of that kind in ``records``."""
    out: list[dict[str, Any]] = []
    for kind in ("scratch", "cpt"):
        frame = curves[kind]
        sel = {**{k: v for k, v in sets[kind][1].items() if k not in ("rule", "bias", "n_selected", "n_candidates")},
               "points": "all (whole curves: the envelope's frontier and IsoFLOP profiles need them)"}
        out.append(_envelope_record(f"{kind}-envelope-{lang}", kind, lang, frame, sel, opt.bootstrap, opt.seed))
        out.append(_isoflop_record(f"{kind}-isoflop-{lang}", kind, lang, frame, sel, opt.bootstrap, opt.seed,
                                   [r for r in [*records, *out] if r["status"] == "ok" and r["kind"] == kind
                                    and r["law"] == ("chinchilla" if kind == "scratch" else "cpt")]))
    return out


def _language_records(df: Any, lang: str, base_sel: dict[str, Any], records: list[dict[str, Any]],
                      unique: dict[str, float], tr: tuple[Any, str], opt: _StudyFit) -> list[dict[str, Any]]:
    """Every fit record of one target language, in the order summary.json lists them (``records``: those of
    the languages before, which the IsoFLOP cross-check also reads)."""
    sets, curves, rep_used = _lang_point_sets(df, lang, base_sel, opt.cpt_replay, opt.points_mode)
    out: list[dict[str, Any]] = []
    scratch: dict[str, Any] | None = None  # the scratch Chinchilla fit the CPT law freezes E, A, alpha from
    separate: dict[str, Any] | None = None  # the CPT Chinchilla fit: the scratch law's separate fit for E
    recs: dict[int, dict[str, Any]] = {}
    for i in _LOSS_LAW_ORDER:
        kind, law, frozen = _LOSS_LAW_PLAN[i]
        recs[i], state = _loss_law_record(kind, law, frozen, lang, sets, scratch, unique, opt, separate)
        if (kind, law) == ("cpt", "chinchilla"):
            separate = state
        elif state:
            scratch = state
    for i, (kind, law, _) in enumerate(_LOSS_LAW_PLAN):  # the comparison laws' remedy
        if ((kind, law) in _COMPARISON_LAWS and opt.remedy == "auto" and scratch
                and recs[i]["status"] == "ok" and not recs[i]["identifiability"]["identified"]):
            recs[i] = _frozen_comparison(recs[i], kind, law, lang, sets, scratch, unique, opt)
    out += [recs[i] for i in range(len(_LOSS_LAW_PLAN))]
    if unique.get(lang):
        out += [_constrained_record(law, lang, sets["scratch"], float(unique[lang]), scratch, opt.budgets, opt.kw,
                                    opt.bootstrap, opt.seed, opt.bootstrap_scheme, opt.remedy, opt.fixed_E)
                for law in _CONSTRAINED_LAWS]
    out += _curve_records(lang, sets, curves, [*records, *out], opt)
    out.append(_hernandez_record(f"cpt-hernandez-{lang}", lang, *tr, rep_used, opt.cpt_replay,
                                 opt.min_step_fraction, opt.bootstrap, opt.seed, opt.params))
    return out


def fit_study(points: str, out_dir: str, budgets: Sequence[float] = (), bootstrap: int = 100,
              delta: float = 1e-3, reduction: str = "sum", grid: str = "chinchilla",
              next_run_budget: float | None = None, db: str | None = None, transfer: str | None = None,
              min_step_fraction: float = 0.0, cpt_replay: str = "min", seed: int = 0,
              study: str | None = None, params: str = "total", loss: str = "huber",
              config_hash: str | None = None, points_mode: str = "annealed", overestimate_penalty: float = 1.0,
              remedy: str = "auto", fixed_E: float | None = None,
              bootstrap_scheme: str = "wildjk") -> dict[str, Any]:
    """Every fit of a study from the points table of ``cptscale db points``; one JSON per fit + summary.json.

    Per target language: Chinchilla on scratch runs; the extended CPT law on CPT runs with E, A, alpha
    frozen from that scratch fit; free Chinchilla on CPT and the extended law on scratch (the paper's
    Table 3 comparison; each frozen as the CPT law when its free fit is not identified and ``remedy`` is
    auto); loss–compute envelopes of both; Hernandez's law when transfer metrics are given; IsoFLOP for
    both. CPT fits use the target-language tokens D_target and, by default, the runs with the study's
    smallest replay ratio (``cpt_replay="all"`` pools every ratio). N counts every parameter
    (``params="total"``, Chinchilla's and the paper's convention) or the non-embedding ones
    (``"nonembedding"``, Kaplan's; the study's ``budget.param_count``). A law with too few points or sizes
    is written as skipped, with the reason. Every record's provenance carries the study's config hash:
    ``config_hash``, else the ``studies`` row of ``study`` in ``db``, else ``study.json`` beside the
    points file's folder (``results/<study>/fits/points.csv`` -> ``results/<study>/study.json``).
    """

    from cptscale.util import file_hash, provenance, write_json

    t0 = time.perf_counter()
    df, n_in = _read_points(points, cpt_replay, params, min_step_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if loss not in LOSSES:
        raise CLIError(f"--loss must be one of {list(LOSSES)}, not {loss!r}")
    chash, chash_from = _study_config_hash(config_hash, db, study, points)
    prov = {**provenance(chash, inputs={"points": file_hash(points)}), "config_hash_from": chash_from}
    settings = {"delta": delta, "reduction": reduction, "grid": grid, "loss": loss, "bootstrap": bootstrap,
                "budgets": [float(b) for b in budgets], "next_run_budget": next_run_budget,
                "min_step_fraction": min_step_fraction, "cpt_replay": cpt_replay, "seed": seed,
                "level": _LEVEL, "params": params, "points": points_mode,
                "overestimate_penalty": overestimate_penalty, "remedy": remedy, "fixed_E": fixed_E,
                "bootstrap_scheme": bootstrap_scheme}
    if bootstrap_scheme not in BOOTSTRAP_SCHEMES:
        raise CLIError(f"fit.bootstrap_scheme must be one of {list(BOOTSTRAP_SCHEMES)}, not {bootstrap_scheme!r}")
    if remedy not in REMEDY_POLICIES:
        raise CLIError(f"fit.remedy must be one of {list(REMEDY_POLICIES)}, not {remedy!r}")
    opt = _StudyFit(budgets, bootstrap, seed, next_run_budget, remedy, fixed_E,
                    {"delta": delta, "reduction": reduction, "grid": grid, "loss": loss,
                     "overestimate_penalty": overestimate_penalty},
                    cpt_replay, points_mode, params, min_step_fraction, bootstrap_scheme)
    unique = _unique_tokens(db, study)
    records: list[dict[str, Any]] = []
    langs = sorted(df.loc[df["init"] == "cpt", "lang"].unique()) or sorted(df["lang"].unique())
    tr = _transfer_inputs(db, transfer, study)
    for lang in langs:
        base_sel = {"points_file": str(points), "lang": lang, "rows_in_file": n_in,
                    "min_step_fraction": min_step_fraction,
                    "what": "every evaluated checkpoint (step > 0) of each run after min_step_fraction of its "
                            "steps, target-language validation loss; D = tokens seen",
                    "N": "parameters with embeddings" if params == "total" else "non-embedding parameters"}
        records += _language_records(df, lang, base_sel, records, unique, tr, opt)
    for rec in records:
        rec["provenance"] = prov
        rec["settings"] = settings
        write_json(out / f"{rec['fit_id']}.json", rec)
    summary = _summary(records, settings, str(points), prov, time.perf_counter() - t0)
    by_id = {r["fit_id"]: r for r in records}
    summary["cpt_saving"] = [law_saving(df, lang, by_id.get(f"scratch-chinchilla-{lang}"), seed) for lang in langs
                             if (df.loc[df["lang"] == lang, "init"] == "cpt").any()]
    if not records:
        summary["note"] = f"{points} has no points (no finished runs yet?): nothing was fitted"
    write_json(out / "summary.json", summary)
    return summary


def _envelope_record(fit_id: str, kind: str, lang: str, frame: Any, sel: dict[str, Any], nboot: int,
                     seed: int) -> dict[str, Any]:
    sel = {**sel, "frontier": "lower frontier over all runs' checkpoints; C = 6·N·D (D = target tokens for CPT)"}
    if len(frame) < 3:
        return _skipped(fit_id, "envelope", kind, lang, f"{len(frame)} points; the envelope needs >= 3", selection=sel)
    pts = _points(frame)
    C = 6 * pts.N * pts.D
    try:
        fr = fit_envelope(C, pts.L)
    except Exception as exc:
        return _skipped(fit_id, "envelope", kind, lang, str(exc), selection=sel)
    on = lower_frontier(C, pts.L)
    pred = fr.predict(C)

    def refit(w: np.ndarray, _c: dict[str, int]) -> dict[str, float]:
        return fit_envelope(C, pts.L, w=w).params

    bs = _bootstrap_generic(pts, nboot, seed, refit, ["k", "m"]) if nboot else None
    ho: dict[str, Any]
    if len(pts.sizes) < 3:
        ho = {"status": "skipped", "reason": f"{len(pts.sizes)} sizes; need >= 3 to hold one out"}
    else:
        nmax = max(pts.sizes)
        test = on & (nmax == pts.N)
        try:
            trm = nmax > pts.N
            hf = fit_envelope(C[trm], pts.L[trm])
            if not test.any():
                ho = {"status": "skipped", "reason": "the largest size has no point on the full-data frontier"}
            else:
                hp = hf.predict(C[test])
                ho = {"status": "ok", "heldout_N": nmax, "n_train": int(trm.sum()), "n_test": int(test.sum()),
                      "test": "frontier points of the largest size", **_err_stats(hp, pts.L[test]),
                      "params": hf.params,
                      "points": [{"run_id": str(r), "N": nmax, "C": float(c), "observed_loss": float(o),
                                  "predicted_loss": float(p)} for r, c, o, p in
                                 zip(pts.run[test], C[test], pts.L[test], hp, strict=True)]}
        except Exception as exc:
            ho = {"status": "skipped", "reason": str(exc)}
    return {"format": "cptscale-fit/1", "fit_id": fit_id, "law": "envelope", "kind": kind, "lang": lang,
            "status": "ok", "reason": None, "equation": EQUATIONS["envelope"], "params": fr.params, "fixed": {},
            "intervals": bs["intervals"] if bs else {}, "heldout": ho,
            "points": [{"run_id": str(pts.run[i]), "N": float(pts.N[i]), "D": float(pts.D[i]), "C": float(C[i]),
                        "observed_loss": float(pts.L[i]), "predicted_loss": float(pred[i])}
                       for i in np.flatnonzero(on)],
            "meta": {**fr.meta, "selection": sel, "n_runs": len(set(pts.run)), "sizes": pts.sizes,
                     "data_range": {"C": [float(C.min()), float(C.max())]}, "input_hash": _hash(pts),
                     "bootstrap": bs["info"] if bs else {"n_requested": 0}},
            "bootstrap": {k: v.tolist() for k, v in bs["samples"].items()} if bs else {}}


def _isoflop_record(fit_id: str, kind: str, lang: str, frame: Any, sel: dict[str, Any], nboot: int, seed: int,
                    laws: list[dict[str, Any]]) -> dict[str, Any]:
    if len(frame) < 6:
        return _skipped(fit_id, "isoflop", kind, lang, f"{len(frame)} points; IsoFLOP needs curves of >= 3 sizes",
                        selection=sel)
    pts = _points(frame)
    try:
        fr = isoflop(pts.N, pts.D, pts.L, pts.run)
    except Exception as exc:
        return _skipped(fit_id, "isoflop", kind, lang, str(exc), selection=sel)

    def refit(_w: np.ndarray, c: dict[str, int]) -> dict[str, float]:
        return isoflop(pts.N, pts.D, pts.L, pts.run, w=c).params

    bs = _bootstrap_generic(pts, nboot, seed, refit, ["a", "b"]) if nboot else None
    profiles = fr.meta.pop("profiles")
    cross = None
    if laws and laws[0]["exponents"]["valid"]:
        cross = {"fit_id": laws[0]["fit_id"], "a_law": laws[0]["exponents"]["a"], "a_isoflop": fr.params["a"],
                 "difference": fr.params["a"] - laws[0]["exponents"]["a"]}
    return {"format": "cptscale-fit/1", "fit_id": fit_id, "law": "isoflop", "kind": kind, "lang": lang,
            "status": "ok", "reason": None, "equation": EQUATIONS["isoflop"], "params": fr.params, "fixed": {},
            "intervals": bs["intervals"] if bs else {}, "cross_check": cross,
            "heldout": {"status": "skipped", "reason": "not applicable: a cross-check of the allocation exponent"},
            "profiles": profiles,
            "meta": {**fr.meta, "selection": sel, "n_runs": len(set(pts.run)), "sizes": pts.sizes,
                     "input_hash": _hash(pts), "bootstrap": bs["info"] if bs else {"n_requested": 0}},
            "bootstrap": {k: v.tolist() for k, v in bs["samples"].items()} if bs else {}}


def _hernandez_record(fit_id: str, lang: str, tr: Any, note: str, rep_used: float | None, cpt_replay: str,
                      min_step_fraction: float, nboot: int, seed: int, params: str = "total") -> dict[str, Any]:
    sel: dict[str, Any] = {"lang": lang, "replay": rep_used if cpt_replay == "min" else "all",
                           "what": "non-extrapolated transfer points with D_T > 0; D_F = CPT target tokens",
                           "N": "parameters with embeddings" if params == "total" else "non-embedding parameters"}
    if tr is None:
        return _skipped(fit_id, "hernandez", "cpt", lang, f"no transfer metrics: {note}", selection=sel)
    t = tr
    if params == "nonembedding":
        if "params_nonemb" not in t.columns:
            return _skipped(fit_id, "hernandez", "cpt", lang, "transfer table has no params_nonemb", selection=sel)
        t = t.assign(N=t["params_nonemb"].astype(float))
    if "lang" in t.columns:
        t = t[t["lang"] == lang]
    if "replay" in t.columns and cpt_replay == "min" and rep_used is not None:
        t = t[t["replay"].fillna(0.0) == rep_used]
    if min_step_fraction > 0 and {"step", "steps"} <= set(t.columns):
        t = t[t["step"] >= min_step_fraction * t["steps"].fillna(0)]
    pos = (t["D_T"] > 0) & (t["D_F"] > 0) & (t["N"] > 0)
    sel["n_dropped_nonpositive"] = int((~pos).sum())  # D_T <= 0: CPT not ahead of scratch at that point
    t = t[pos]
    rc = "run_id" if "run_id" in t.columns else "run" if "run" in t.columns else None
    n_sizes = t["N"].nunique()
    if len(t) < 4 or n_sizes < 2:
        return _skipped(fit_id, "hernandez", "cpt", lang, f"{len(t)} transfer points of {n_sizes} sizes with "
                        "D_T > 0; need >= 4 points and >= 2 sizes", selection=sel)
    N, DF, DT = (t[c].to_numpy(float) for c in ("N", "D_F", "D_T"))
    run = t[rc].astype(str).to_numpy() if rc else np.array([str(i) for i in range(len(t))])
    fr = fit_hernandez(N, DF, DT)
    pts = Points(N, DF, DT, run, np.arange(len(N)))

    def refit(w: np.ndarray, _c: dict[str, int]) -> dict[str, float]:
        m = w > 0
        if len(set(N[m])) < 2:
            raise ValueError("one size")
        return fit_hernandez(N[m], DF[m], DT[m], w=w[m]).params

    bs = _bootstrap_generic(pts, nboot, seed, refit, ["k", "alpha", "beta"]) if nboot else None
    nmax = float(N.max())
    train = nmax > N
    n_train = int(train.sum())
    if n_sizes < 3:
        ho = {"status": "skipped", "reason": f"{n_sizes} sizes; need >= 3 to hold one out"}
    elif n_train < 4:  # the law has 3 free parameters: the fit without the largest size needs 4 points
        ho = {"status": "skipped", "reason": f"{n_train} transfer points below the largest size; need >= 4 to fit "
                                             "the law without it"}
    else:
        hf = fit_hernandez(N[train], DF[train], DT[train])
        te = ~train
        hp = hf.predict(N[te], DF[te])
        lerr = np.log(hp) - np.log(DT[te])
        ho = {"status": "ok", "heldout_N": nmax, "n_train": n_train, "n_test": int(te.sum()),
              "mae_log": float(np.abs(lerr).mean()), "mean_rel_err": float(np.abs(hp / DT[te] - 1).mean()),
              "params": hf.params}
    pred = fr.predict(N, DF)
    return {"format": "cptscale-fit/1", "fit_id": fit_id, "law": "hernandez", "kind": "cpt", "lang": lang,
            "status": "ok", "reason": None, "equation": EQUATIONS["hernandez"], "params": fr.params, "fixed": {},
            "intervals": bs["intervals"] if bs else {}, "heldout": ho,
            "points": [{"run_id": str(r), "N": float(a), "D_F": float(b), "D_T": float(c), "D_T_predicted": float(p)}
                       for r, a, b, c, p in zip(run, N, DF, DT, pred, strict=True)],
            "meta": {**fr.meta, "selection": sel, "n_runs": len(set(run)), "sizes": sorted(set(N.tolist())),
                     "input_hash": _hash(pts), "bootstrap": bs["info"] if bs else {"n_requested": 0}},
            "bootstrap": {k: v.tolist() for k, v in bs["samples"].items()} if bs else {}}


def _summary(records: list[dict[str, Any]], settings: dict[str, Any], points: str, prov: dict[str, Any],
             seconds: float) -> dict[str, Any]:
    """summary.json: the list of fit files (no parameters: the store ingests those from the fit files)."""
    fits = []
    for r in records:
        h = r.get("heldout") or {}
        fits.append({"fit_id": r["fit_id"], "file": f"{r['fit_id']}.json", "law": r["law"], "kind": r["kind"],
                     "lang": r.get("lang"), "status": r["status"], "reason": r.get("reason"),
                     "heldout_status": h.get("status"), "heldout_mae": h.get("mae"),
                     "heldout_mean_rel_err": h.get("mean_rel_err")})
    comparison = []
    by_id = {r["fit_id"]: r for r in records}
    for r in records:  # the paper's Table 3: Huber error of both laws on the same data
        if r["law"] == "chinchilla" and r["status"] == "ok":
            other = by_id.get(r["fit_id"].replace("-chinchilla-", "-extended-"))
            if other and other["status"] == "ok":
                comparison.append({"data": r["kind"], "lang": r["lang"], "chinchilla_fit": r["fit_id"],
                                   "extended_fit": other["fit_id"],
                                   "huber_sum_chinchilla": r["meta"]["huber_sum"],
                                   "huber_sum_extended": other["meta"]["huber_sum"],
                                   "huber_mean_chinchilla": r["meta"]["huber_mean"],
                                   "huber_mean_extended": other["meta"]["huber_mean"],
                                   "gamma_extended": other["params"]["gamma"]})
    nxt = None
    for fid_prefix in ("scratch-chinchilla-",):  # the fit `cptscale next-run spec` plans from
        cand = [r for r in records if r["fit_id"].startswith(fid_prefix) and r["status"] == "ok" and r.get("next_run")]
        if cand:
            nxt = {"fit_id": cand[0]["fit_id"], **cand[0]["next_run"]}
            break
    return {"format": "cptscale-fit-summary/1", "points_file": points, "settings": settings, "fits": fits,
            "n_ok": sum(f["status"] == "ok" for f in fits), "n_skipped": sum(f["status"] != "ok" for f in fits),
            "law_comparison": comparison, "next_run": nxt, "seconds": round(seconds, 2), "provenance": prov}
