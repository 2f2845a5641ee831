"""One simulated run: the rows a trained run writes, drawn from a :class:`Truth`.

``simulate_run(spec, truth, seed)`` takes a run spec (run.json, as a dict or a RunSpec) and returns
the evaluation rows (evals.jsonl, WSD branch rows keyed ``branch``), the training-step rows
(metrics.jsonl and branch_metrics.jsonl) and the totals of done.json, flagged ``simulated: true``.
Losses follow the run's own LR schedule (:mod:`cptscale.simulate.curve`) and its blend (the target
language's share per phase); the source model's final losses start a CPT run (so its step-0
evaluation equals the parent's, as the trainer's init-sanity gate requires).

Noise is seeded by (seed, the spec's seed, the run id): the same call gives the same rows.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cptscale.compute import flops_6nd
from cptscale.schedule import Schedule
from cptscale.simulate.curve import Areas, areas, data_term_curve, lr_series, smooth_min
from cptscale.simulate.truth import Truth

#: Bytes per token of a simulated validation set (it sets bits per byte only; no loss depends on it).
BYTES_PER_TOKEN = 3.0


@dataclass
class SimulatedRun:
    evals: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    branch_metrics: list[dict[str, Any]]
    done: dict[str, Any]
    truth_final: dict[str, float] = field(default_factory=dict)  #: noiseless final loss per language


def _as_dict(spec: Any) -> Mapping[str, Any]:
    if isinstance(spec, Mapping):
        return spec
    dump = getattr(spec, "model_dump", None)  # a pydantic RunSpec
    if dump is None:
        raise TypeError(f"spec must be a run.json mapping or a RunSpec, got {type(spec).__name__}")
    return dump(mode="json")


def schedule_of(spec: Mapping[str, Any]) -> Schedule:
    d = dict(spec["schedule"])
    d["branches"] = tuple(int(b) for b in d.get("branches") or ())
    return Schedule(**d)


def lang_shares(spec: Mapping[str, Any], steps: int) -> dict[str, np.ndarray]:
    """Per training step, each language's share of the batch (from the blend's phases; a spec without
    phases trains on its own language, CPT with ``replay`` of the source)."""
    data = spec.get("data") or {}
    phases = data.get("phases") or []
    out: dict[str, np.ndarray] = {}
    if phases:
        for ph in phases:
            lo, hi = int(ph.get("start_step", 0)), int(ph.get("end_step", steps))
            for src in ph.get("sources", []):
                lang = str(src["name"]).split("/", 1)[0]
                arr = out.setdefault(lang, np.zeros(steps))
                arr[lo:hi] += float(src["weight"])
        return out
    own = np.ones(steps)
    if spec.get("init") == "cpt" and spec.get("source_lang"):
        r = float(spec.get("replay") or 0.0)
        out[spec["source_lang"]] = np.full(steps, r)
        own = own * (1 - r)
    out[spec["lang"]] = own
    return out


class _Model:
    """The noiseless losses of one run, per language, as functions of the step arrays of a schedule."""

    def __init__(self, spec: Mapping[str, Any], truth: Truth, parent: Mapping[str, Any] | None):
        self.spec, self.truth = spec, truth
        self.N = float(spec["params"] if truth.param_count == "total" else spec["params_nonemb"])
        self.tps = float(spec["global_batch_size"]) * float(spec["seq_length"])
        self.steps = int(spec["steps"])
        self.lnv = math.log(float(spec["vocab_size"]))
        self.lang = spec["lang"]
        self.cpt = spec.get("init") == "cpt"
        self.source = spec.get("source_lang")
        self.schedule = schedule_of(spec)
        self.lag = truth.curve.lag_fraction * self.steps
        self.lr = lr_series(self.schedule)
        self.shares = lang_shares(spec, self.steps)
        #: tokens of each language seen after k steps (k = 0..steps)
        self.seen = {lg: np.concatenate([[0.0], np.cumsum(s)]) * self.tps for lg, s in self.shares.items()}
        own = self.shares.get(self.lang, np.zeros(self.steps))
        self.main = areas(self.schedule, self.lag, self.lr, own)
        self.d_own_end = float(own.sum() * self.tps)
        self.unique = own_unique_tokens(spec, self.lang)
        self.parent_final, self.parent_tokens = self._parent(parent)

    def effective(self, d: float) -> float:
        """Tokens of the run's own language as the law counts them: beyond its unique tokens, the truth's
        effective data (repeated tokens are worth less)."""
        from cptscale.fit.laws import effective_data

        return float(effective_data(d, self.unique, self.truth.repetition.R_D)) if math.isfinite(self.unique) else d

    def _parent(self, parent: Mapping[str, Any] | None) -> tuple[dict[str, float], float]:
        if not self.cpt:
            return {}, 0.0
        par = dict(self.spec.get("parent") or {})
        final = dict((parent or {}).get("final_loss") or {})
        if self.source and self.source not in final and par.get("final_loss") is not None:
            final[self.source] = float(par["final_loss"])
        tokens = float((parent or {}).get("tokens") or self.spec.get("tokens") or self.steps * self.tps)
        for lang in self._langs():  # a language the parent was never evaluated on: its noiseless off-language loss
            if lang not in final:
                final[lang] = float(self._off_language(np.array([tokens]))[0])
        return final, tokens

    def _langs(self) -> list[str]:
        return list((self.spec.get("eval") or {}).get("languages") or {self.lang: {}})

    def _off_language(self, d_tokens: np.ndarray) -> np.ndarray:
        c = self.truth.curve
        onset = self.truth.forgetting.onset_tokens_per_param * self.N
        return self.lnv + c.off_language_rise * (1 - np.exp(-d_tokens / onset))

    def _branch_gap(self, ar: Areas, L: np.ndarray, model_term: float, coef: float, expo: float) -> np.ndarray:
        """What a decay branch's curve must add so that its end, like a run's end, is exactly the law's loss
        for the tokens it has seen. The branch shares its run's warmup, so its LR-weighted tokens fall short
        of its tokens by more than the full run's do: uncorrected it ends above the law (by ~1 % of the data
        term), and fits on branch ends recover a biased law. The correction grows with the branch's
        annealing (its S2 since the decay began): none where the branch leaves its run (the curves join),
        all of it at the branch's end."""
        n = len(ar.lr)
        differs = np.flatnonzero(ar.lr != self.lr[:n])
        start = int(differs[0]) if len(differs) else n
        d_end = self.effective(float(self.seen[self.lang][n]))
        gap = model_term + coef / d_end**expo - float(L[n]) if d_end > 0 else 0.0
        done = ar.s2 - ar.s2[start]
        span = float(done[-1])
        ramp = np.clip(done / span, 0.0, 1.0) if span > 0 else (np.arange(n + 1) >= n).astype(float)
        return gap * ramp

    def losses(self, lang: str, ar: Areas, k: np.ndarray) -> np.ndarray:
        """Noiseless loss on ``lang`` after k steps (k indexes ``ar``: the main run's or a branch's areas)."""
        t = self.truth
        shares = {lg: s[: len(ar.lr) + 1] for lg, s in self.seen.items()}  # a branch shares the main run's blend
        zero = np.zeros(len(ar.lr) + 1)
        if lang == self.lang:
            base = t.scratch_law(lang)
            c = t.curve.anneal_gain
            if self.cpt:
                law = t.cpt_law(lang)
                coef, expo = law.B / self.N**law.gamma, law.beta
                init = self.parent_final[lang]
            else:
                coef, expo, init = base.B, base.beta, self.lnv
            data = data_term_curve(coef, expo, self.tps, ar.s1, self.main.s1[-1], self.d_own_end, self.unique,
                                   t.repetition.R_D)
            L = base.E + base.A / self.N**base.alpha + data * np.exp(-c * (ar.s2 - self.main.s2[-1]))
            if len(ar.lr) < self.steps:  # a decay branch: it ends on the law too
                L = L + self._branch_gap(ar, L, base.E + base.A / self.N**base.alpha, coef, expo)
            return smooth_min(L, init)[k]
        if not self.cpt:
            return self._off_language(shares.get(self.lang, zero))[k]
        if lang == self.source:  # forgetting, and what replay gives back (Zheng et al. Section 5.2)
            law = t.scratch_law(lang)
            d_rep, d_tgt = shares.get(lang, zero), shares.get(self.lang, zero)
            gain = law.loss(self.N, self.parent_tokens + d_rep) - law.loss(self.N, self.parent_tokens)
            return (self.parent_final[lang] + gain + t.forgetting.rise(self.N, d_tgt, d_rep))[k]
        return np.full(len(k), self.parent_final[lang])  # a third language: left where the parent had it


def own_unique_tokens(spec: Mapping[str, Any], lang: str) -> float:
    """The unique training tokens of ``lang`` the run's blend draws from (its data totals: the language's
    split and its per-corpus splits), or infinity when the blend does not say (a spec without data)."""
    totals = (spec.get("data") or {}).get("totals") or {}
    own = [float(v.get("available_tokens") or 0) for k, v in totals.items() if k == lang or k.startswith(f"{lang}/")]
    return sum(own) if own and all(own) else math.inf


def _rng(seed: int, spec: Mapping[str, Any], stream: int) -> np.random.Generator:
    """Stream 0: run and evaluation noise; stream 1: training-step noise (so evaluations do not depend on
    whether training rows are drawn)."""
    return np.random.default_rng([int(seed), int(spec.get("seed") or 0), zlib.crc32(str(spec["run_id"]).encode()),
                                  stream])


class _Rows:
    """Draws a simulated run's evaluation and training-step rows: the model's noiseless losses times the
    run's, each evaluation's and each step's noise (two streams, so evaluations do not depend on whether
    training rows are drawn)."""

    def __init__(self, m: _Model, spec: dict[str, Any], truth: Truth, seed: int) -> None:
        from cptscale.transfer import run_compute

        self.m, self.nz = m, truth.noise
        self.rng, self.rng_train = _rng(seed, spec, 0), _rng(seed, spec, 1)
        self.langs = m._langs()
        self.run_noise = {lang: float(self.rng.normal(0.0, self.nz.run)) if self.nz.run > 0 else 0.0
                          for lang in self.langs}
        self.fpt, self.n_params = run_compute(spec)["flops_per_token"], int(spec["params"])
        self.ev_langs = (spec.get("eval") or {}).get("languages") or {}

    def _flops(self, tokens: int) -> dict[str, Any]:
        return {"params": self.n_params, "flops": self.fpt * tokens, "flops_6nd": flops_6nd(self.n_params, tokens)}

    def evals(self, ar: Areas, steps: list[int], branch: int | None) -> list[dict[str, Any]]:
        m, nz = self.m, self.nz
        k = np.asarray(steps, dtype=int)
        rows = []
        per_lang = {lang: m.losses(lang, ar, k) for lang in self.langs}
        for i, s in enumerate(steps):
            for lang in self.langs:
                loss = float(per_lang[lang][i])
                if s > 0:  # step 0 is the initial model: the same for every seed (the CPT gate checks it)
                    eps = self.run_noise[lang] + (float(self.rng.normal(0.0, nz.eval)) if nz.eval > 0 else 0.0)
                    loss *= math.exp(eps)
                tokens = int(s * m.tps)
                row: dict[str, Any] = {"step": int(s), "tokens": tokens, "lang": lang, "loss": loss,
                                       "ppl": math.exp(min(loss, 700.0))}
                v = self.ev_langs.get(lang) or {}
                nbytes = v.get("bytes")
                n_tok = v.get("tokens") or (round(nbytes / BYTES_PER_TOKEN) if nbytes else None)
                row["n_tokens"] = n_tok
                row["bpb"] = loss * n_tok / (nbytes * math.log(2)) if n_tok and nbytes else None
                row["bytes"] = nbytes
                row.update(self._flops(tokens))
                if branch is not None:
                    row["branch"] = branch
                rows.append(row)
        return rows

    def metrics(self, ar: Areas, start: int, stop: int, branch: int | None) -> list[dict[str, Any]]:
        m, nz = self.m, self.nz
        k = np.arange(start, stop)
        mix = np.zeros(len(k))
        for lang, share in m.shares.items():
            if lang in self.langs or lang == m.lang:
                mix += share[start:stop] * (m.losses(lang, ar, k) if lang in self.langs else 0.0)
        noise = self.rng_train.normal(0.0, nz.train, len(k)) if nz.train > 0 else np.zeros(len(k))
        out = []
        for j, s in enumerate(k):
            tokens = int((s + 1) * m.tps)
            row: dict[str, Any] = {"step": int(s), "tokens": tokens, "loss": float(mix[j] * math.exp(noise[j])),
                                   "lr": float(ar.lr[s]), "grad_norm": None, "tokens_per_s": None, "mem_bytes": None,
                                   "mfu": None, **self._flops(tokens)}
            if branch is not None:
                row["branch"] = branch
            out.append(row)
        return out


def _done(spec: dict[str, Any], truth: Truth, seed: int, rows: _Rows, final: dict[str, float],
          branches: list[dict[str, Any]]) -> dict[str, Any]:
    """done.json of the simulated run, as the trainer writes it (plus what was simulated from what)."""
    steps, n_params = rows.m.steps, rows.n_params
    tokens = int(steps * rows.m.tps)
    done: dict[str, Any] = {
        "run_id": spec["run_id"], "steps": steps, "tokens": tokens, "final_loss": final,
        "final_checkpoint": None, "wall_s": 0.0, "params": n_params, "params_nonemb": int(spec["params_nonemb"]),
        "resumed_from": None, "flops_spent": rows.fpt * tokens, "flops_spent_6nd": flops_6nd(n_params, tokens),
        "final_shape": spec.get("shape"), "final_params": n_params, "world_size": 0,
        "simulated": True, "simulation": {"truth": truth.name, "seed": int(seed), "noise": dict(vars(truth.noise))},
    }
    if branches:
        done["branches"] = branches
    return done


def simulate_run(spec: Any, truth: Truth, seed: int = 0, parent: Mapping[str, Any] | None = None,
                 metrics: bool = True) -> SimulatedRun:
    """The rows and totals a trained run of ``spec`` would write, drawn from ``truth`` (``metrics=False``:
    no training-step rows, for statistics over many studies that read evaluations only).

    ``parent`` (CPT): the source run's done.json (``final_loss`` per language, ``tokens``); without it
    the source loss is the spec's ``parent.final_loss`` and other languages start at the truth's
    noiseless off-language loss."""
    spec = _as_dict(spec)
    m = _Model(spec, truth, parent)
    rows = _Rows(m, spec, truth, seed)
    steps = m.steps
    want = sorted({int(s) for s in (spec.get("eval") or {}).get("steps", []) if 0 <= int(s) <= steps} | {steps})
    evals = rows.evals(m.main, want, None)
    step_rows = rows.metrics(m.main, 0, steps, None) if metrics else []
    branch_metrics: list[dict[str, Any]] = []
    branches = []
    for sb in m.schedule.branch_schedules():
        share_own = m.shares.get(m.lang, np.zeros(steps))[: sb.total_steps]
        ar = areas(sb, truth.curve.lag_fraction * sb.total_steps, lr_series(sb), share_own)
        ends = rows.evals(ar, [sb.total_steps], sb.total_steps)
        evals += ends
        if metrics:
            branch_metrics += rows.metrics(ar, sb.decay_start, sb.total_steps, sb.total_steps)
        branches.append({"steps": sb.total_steps, "tokens": int(sb.total_steps * m.tps),
                         "final_loss": {r["lang"]: r["loss"] for r in ends},
                         "flops_spent": ends[0]["flops"], "flops_spent_6nd": ends[0]["flops_6nd"]})
    final = {r["lang"]: r["loss"] for r in evals if r["step"] == steps and "branch" not in r}
    truth_final = {lang: float(m.losses(lang, m.main, np.array([steps]))[0]) for lang in rows.langs}
    return SimulatedRun(evals, step_rows, branch_metrics, _done(spec, truth, seed, rows, final, branches), truth_final)
