"""``cptscale fit``, ``allocate`` and ``fit-study``: argument parsing and printing around :mod:`cptscale.fit`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cptscale.errors import CLIError
from cptscale.fit.estimate import allocate, exponents, fit_law
from cptscale.fit.identify import POINT_SELECTIONS, REMEDY_POLICIES
from cptscale.fit.laws import EQUATIONS, GRIDS, LAWS, LOSSES, _min_sizes, load_fit
from cptscale.fit.points import _load_df, _points
from cptscale.fit.study import _heldout_loss, _loss_fit_record, fit_study
from cptscale.fit.uncertainty import _LEVEL, BOOTSTRAP_SCHEMES, bootstrap_law


def _parse_fixed(s: str | None) -> dict[str, float]:
    if not s:
        return {}
    out = {}
    for kv in s.split(","):
        k, eq, v = kv.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise CLIError(f"--fixed {kv!r}: expected NAME=VALUE, e.g. E=1.55,A=420,alpha=0.4") from None
        if not eq:
            raise CLIError(f"--fixed {kv!r}: expected NAME=VALUE")
    return out


def _fmt_iv(v: float, iv: dict[str, Any] | None) -> str:
    if iv and iv.get("lo") is not None:
        return f"{v:.6g}  [{iv['lo']:.6g}, {iv['hi']:.6g}]"
    return f"{v:.6g}"


def _cmd_fit(args: Any) -> int:
    from cptscale.util import file_hash, provenance, write_json

    df = _load_df(args.data)
    excl = [x.strip() for x in args.exclude.split(",") if x.strip()] if args.exclude else None
    fixed = _parse_fixed(args.fixed)
    kw = {"delta": args.delta, "reduction": args.reduction, "grid": args.grid, "loss": args.loss}
    r = fit_law(df, args.law, fixed, exclude=excl, **kw)
    pts = _points(df, excl)
    bs = bootstrap_law(pts, r, args.bootstrap, args.seed, args.budgets or []) if args.bootstrap else None
    need = _min_sizes(args.law, fixed)
    ho = _heldout_loss(pts, args.law, fixed, need, **kw)
    runs_col = "run" if "run" in df.columns else "run_id" if "run_id" in df.columns else None
    sel = {"data_file": args.data, "rows_in_file": len(df), "excluded_rows": pts.excluded,
           "exclude_arg": args.exclude, "run_column": runs_col,
           "bootstrap_unit": f"run (column {runs_col!r})" if runs_col else "row (no run column: each row is its own run)"}
    rec = _loss_fit_record(Path(args.out).stem, "user", None, pts, r, bs, ho, args.budgets or [], None, sel, None)
    rec["provenance"] = provenance(args.config_hash, inputs={"data": file_hash(args.data)})
    rec["settings"] = {**kw, "bootstrap": args.bootstrap, "seed": args.seed, "level": _LEVEL,
                       "budgets": [float(b) for b in args.budgets or []], "law": args.law, "fixed": fixed}
    write_json(args.out, rec)
    unit = "runs" if runs_col else "points (no run column: each row counts as its own run)"
    lvl = f"{int(_LEVEL * 100)}% bootstrap interval over {unit}" if bs else "no bootstrap"
    print(f"{EQUATIONS[args.law]}   ({len(pts.N)} points, {lvl})")
    for k, v in r.params.items():
        print(f"  {k:>6} = {_fmt_iv(v, rec['intervals'].get(k))}{'  (frozen)' if k in fixed else ''}")
    ex = rec["exponents"]
    if ex["valid"]:
        print(f"  N_opt ∝ C^{_fmt_iv(ex['a'], rec['intervals'].get('a'))},  D_opt ∝ C^{_fmt_iv(ex['b'], rec['intervals'].get('b'))}")
    m = r.meta
    print(f"  objective {m['objective']:.6g} ({m['reduction']}, delta={m['delta']}), converged={m['converged']}, "
          f"|grad|={m['grad_norm']:.2e}, on bound: {m['on_bound'] or 'none'}, "
          f"best start on grid edge: {m['grid_edge']['params_on_grid_edge'] or 'none'}")
    if ho.get("status") == "ok":
        print(f"  held-out largest size N={ho['heldout_N']:.3g}: MAE {ho['mae']:.4g}, mean rel err {ho['mean_rel_err']:.2%}")
    else:
        print(f"  held-out: skipped ({ho.get('reason')})")
    print(f"wrote {args.out}")
    return 0


def _cmd_allocate(args: Any) -> int:
    fit = load_fit(args.fit)
    if fit.law not in LAWS:
        raise CLIError(f"{args.fit}: law {fit.law!r} has no allocation (need chinchilla or cpt)")
    ex = exponents(fit)
    if ex["valid"]:
        print(f"N_opt = {ex['G']:.4g}·(C/6)^{ex['a']:.4f}, D_opt = (C/6)^{ex['b']:.4f}/{ex['G']:.4g}  "
              f"(i.e. N_opt = {ex['G'] * 6 ** -ex['a']:.4g}·C^{ex['a']:.3f}, D_opt = {6 ** -ex['b'] / ex['G']:.4g}·C^{ex['b']:.3f})")
    else:
        print(f"closed form: {ex['reason']}")
    for row in allocate(fit, args.compute):
        if row["N_opt"] is None:
            print(f"C={row['C']:.3g}: numeric N={row['N_opt_numeric']:.4g} D={row['D_opt_numeric']:.4g} "
                  f"loss={row['predicted_loss_numeric']:.4f} (on bound: {row['numeric_on_bound']})")
            continue
        print(f"C={row['C']:.3g} N_opt={row['N_opt']:.4g} D_opt={row['D_opt']:.4g} "
              f"D/N={row['tokens_per_param']:.3g} loss={row['predicted_loss']:.4f}  "
              f"(numeric: N={row['N_opt_numeric']:.4g}, rel diff {row['numeric_rel_diff']:.1e})")
    return 0


def _cmd_fit_study(args: Any) -> int:
    s = fit_study(args.points, args.out_dir, args.budgets or [], args.bootstrap, args.delta, args.reduction,
                  args.grid, args.next_run_budget, db=args.db, transfer=args.transfer,
                  min_step_fraction=args.min_step_fraction, cpt_replay=args.cpt_replay, seed=args.seed,
                  study=args.study, params=args.params, loss=args.loss, config_hash=args.config_hash,
                  points_mode=args.select, overestimate_penalty=args.overestimate_penalty, remedy=args.remedy,
                  fixed_E=args.fixed_E, bootstrap_scheme=args.bootstrap_scheme)
    for f in s["fits"]:
        extra = f" — {f['reason']}" if f["status"] != "ok" else (
            f" — held-out MAE {f['heldout_mae']:.4g}" if f.get("heldout_mae") is not None else "")
        print(f"{f['fit_id']:<28} {f['status']:<8}{extra}")
    if s.get("next_run"):
        n = s["next_run"]
        if n.get("valid"):
            print(f"next run at C={n['C']:.3g} ({n['fit_id']}): N={n['N']:.4g}, D={n['D']:.4g} tokens, "
                  f"predicted loss {n['predicted_loss']:.4f}")
    print(f"{args.out_dir}/summary.json: {s['n_ok']} fits, {s['n_skipped']} skipped, {s['seconds']:.1f}s")
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("fit", help="fit a scaling law to an (N, D, loss) table")
    p.add_argument("--data", required=True, help="CSV or Parquet with N, D (or C), loss [, run]")
    p.add_argument("--law", choices=list(LAWS), default="chinchilla")
    p.add_argument("--fixed", default=None, help="frozen parameters, e.g. E=1.55,A=420,alpha=0.4")
    p.add_argument("--exclude", default=None, help="comma-separated row numbers or run ids to drop")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples over runs (0: none)")
    p.add_argument("--budgets", type=float, nargs="*", help="FLOP budgets for the allocation table")
    p.add_argument("--delta", type=float, default=1e-3)
    p.add_argument("--reduction", choices=("sum", "mean"), default="sum")
    p.add_argument("--grid", choices=list(GRIDS), default="chinchilla")
    p.add_argument("--loss", choices=LOSSES, default="huber",
                   help="huber: summed Huber from the grid (Chinchilla/Besiroglu grid fit); huber-nll: Huber "
                        "likelihood with free scale, BFGS from Hoffmann's estimates (Besiroglu's published table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config-hash", default=None, help="config hash recorded in the fit's provenance")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_fit)
    q = subparsers.add_parser("allocate", help="compute-optimal allocation from a fit JSON")
    q.add_argument("--fit", required=True)
    q.add_argument("--compute", type=float, nargs="+", required=True)
    q.set_defaults(func=_cmd_allocate)
    s = subparsers.add_parser("fit-study", help="every scaling-law fit of a study (the workflow's fit step)")
    s.add_argument("--points", required=True, help="points table from `cptscale db points`")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--budgets", type=float, nargs="*", default=[])
    s.add_argument("--bootstrap", type=int, default=100)
    s.add_argument("--bootstrap-scheme", choices=BOOTSTRAP_SCHEMES, default="wildjk",
                   help="loss-law bootstrap: wildjk (one sign per run on its leave-one-run-out residuals, design "
                        "fixed; the config's default), pairs (runs with replacement), bayes (Exp(1) weight per run), "
                        "wild, wild3")
    s.add_argument("--delta", type=float, default=1e-3)
    s.add_argument("--reduction", choices=("sum", "mean"), default="sum")
    s.add_argument("--grid", choices=list(GRIDS), default="chinchilla")
    s.add_argument("--loss", choices=LOSSES, default="huber", help="loss function of the loss-law fits (see `fit`)")
    s.add_argument("--config-hash", default=None,
                   help="the study's config hash for the fits' provenance (default: the studies row in --db, "
                        "else study.json beside the points file's folder)")
    s.add_argument("--next-run-budget", type=float, default=None, help="suggest the compute-optimal run for this budget")
    s.add_argument("--db", default=None, help="DuckDB store with the transfer table (Hernandez law)")
    s.add_argument("--transfer", default=None, help="CSV/Parquet with N, D_F, D_T [, run_id, lang, replay] instead of --db")
    s.add_argument("--study", default=None, help="study name in --db (default: every study in it)")
    s.add_argument("--min-step-fraction", type=float, default=0.0, help="drop points before this share of each run's last step")
    s.add_argument("--cpt-replay", choices=("min", "all"), default="min",
                   help="CPT fits on the runs with the smallest replay ratio (default) or on all, by target tokens")
    s.add_argument("--params", choices=("total", "nonembedding"), default="total",
                   help="N = all parameters (Chinchilla, the paper) or non-embedding ones (Kaplan)")
    s.add_argument("--select", choices=list(POINT_SELECTIONS), default="annealed",
                   help="points of the loss-law fits: annealed (run ends and WSD branch ends; default) or all "
                        "(every evaluation: biased, see the fit record)")
    s.add_argument("--overestimate-penalty", type=float, default=1.0,
                   help="weight of overestimates in the Huber loss (OLMo-core's overestimate_penalty; 1: symmetric)")
    s.add_argument("--remedy", choices=REMEDY_POLICIES, default="auto",
                   help="an unidentified scratch fit: auto = fixed E, then the reduced law without E; flag = only flag")
    s.add_argument("--fixed-E", type=float, default=None, help="the E the 'fixed E' remedy tries first")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_fit_study)
