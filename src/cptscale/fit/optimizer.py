"""The Huber objective of the loss laws and the batched L-BFGS that minimises it from every grid start at once.

The optimizer runs L-BFGS from all starts at once in numpy (:func:`lbfgs_batch`): the two-loop
recursion, a box-projected Armijo backtracking line search and the convergence tests act on
``(starts, params)`` arrays and finished starts leave the batch, so a 4,500-start fit costs about as
many array passes as one scipy run costs function calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Box bounds in internal coordinates (log E, log A, log B, alpha, beta, gamma): wide enough never to bind
#: a sensible fit; an optimum on one of them is reported (``meta.on_bound``) as a sign of a degenerate fit.
BOUNDS: dict[str, tuple[float, float]] = {
    "E": (-10.0, 5.0), "A": (-10.0, 60.0), "B": (-10.0, 60.0), "alpha": (0.0, 5.0), "beta": (0.0, 5.0),
    "gamma": (-2.0, 2.0),
}


_BLAS: list[Any] = []  # the threadpoolctl controller, made on first use (it scans the loaded libraries)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS (numpy's and scipy's OpenBLAS) on one thread inside the block. A fit's matrices are tiny (a few
    parameters, hundreds of points), so a second BLAS thread has nothing to do but wait, and on a loaded
    machine the wait costs scheduler slices: measured at load ~10 on 2 cores, scipy's L-BFGS-B took 106 ms
    per start with OpenBLAS's default 2 threads and 3 ms with one (bench/fit.py's naive loop)."""
    if not _BLAS:
        import scipy.optimize  # noqa: F401  (loads scipy's own OpenBLAS: the controller sees the libraries loaded now)
        from threadpoolctl import ThreadpoolController

        _BLAS.append(ThreadpoolController())
    with _BLAS[0].limit(limits=1, user_api="blas"):
        yield


_MAX_ELEMS = 1_500_000  # rows x points per objective evaluation (memory: ~12 arrays of this size)


#: elements per block of rows: the ~10 temporaries stay in cache (4-5x faster than one pass), and each stays
#: at <= 256 KiB, which glibc serves from its heap; larger ones are fresh mmaps, page-faulted on every call
#: (measured: 2.3x slower per element at 150 x 240 than at 136 x 240)
_BLOCK = 1 << 15


@dataclass
class _Prep:
    """Per-dataset constants of the objective: the design matrices of the exponents and of the gradient."""

    lN: np.ndarray
    lD: np.ndarray
    lL: np.ndarray

    def __post_init__(self) -> None:
        self.ones = one = np.ones_like(self.lN)  # lN, lD, lL: one entry per point
        self.m2 = np.stack([one, self.lN], 1)
        self.m3 = np.stack([one, self.lD, self.lN], 1)
        # the exponents as (rows, 2|3) @ (2|3, n) products: a - alpha log N = [a, alpha] @ [1, -log N]
        # (BLAS: ~10x faster than the broadcast a[:, None] - alpha[:, None] * log N; and exp of every
        # point's exponent is 4x faster than exp of the distinct sizes' followed by a gather to the points)
        self.e2 = np.stack([one, -self.lN])
        self.e3 = np.stack([one, -self.lD, -self.lN])


_VECDOT = hasattr(np, "vecdot")  # numpy >= 2.0


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two (K, n) arrays: numpy >= 2's vecdot (a fused loop, ~2x einsum's speed at
    the objective's block size), einsum before it."""
    return np.vecdot(a, b) if _VECDOT else np.einsum("kn,kn->k", a, b)


def _obj(theta: np.ndarray, lN: np.ndarray, lD: np.ndarray, lL: np.ndarray, delta: float, reduction: str,
         W: np.ndarray | None = None, prep: _Prep | None = None, asym: float = 1.0,
         lLr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Huber objective and its gradient for a batch theta (K, 5|6) in internal coordinates.

    ``W`` (K, n) are per-row point weights (bootstrap counts); ``lLr`` (K, n) per-row log losses instead of
    ``lL`` (the wild bootstrap's perturbed observations). ``asym`` multiplies the Huber loss of
    overestimates (prediction above the observation; OLMo-core's ``overestimate_penalty``): > 1 pulls the
    law towards the lower frontier. Rows are processed in cache-sized blocks.
    """
    prep = prep or _Prep(lN, lD, lL)
    rows = theta.shape[0]
    bs = max(1, _BLOCK // max(1, lN.shape[-1]))
    if rows <= bs:
        return _obj_block(theta, prep, delta, reduction, W, asym, lLr)
    f, g = np.empty(rows), np.empty(theta.shape)
    for i in range(0, rows, bs):
        f[i : i + bs], g[i : i + bs] = _obj_block(theta[i : i + bs], prep, delta, reduction,
                                                  None if W is None else W[i : i + bs], asym,
                                                  None if lLr is None else lLr[i : i + bs])
    return f, g


def _obj_block(theta: np.ndarray, d: _Prep, delta: float, reduction: str,
               W: np.ndarray | None = None, asym: float = 1.0,
               lLr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_obj` on one block. The exponentials are taken without a max-shift: the box bounds keep
    every exponent within ±200, far from float64 overflow."""
    K, p = theta.shape
    w1 = np.exp(theta[:, 0:1])
    w2 = theta[:, [1, 3]] @ d.e2
    np.exp(w2, out=w2)
    w3 = theta[:, [2, 4, 5]] @ d.e3 if p == 6 else theta[:, [2, 4]] @ d.e3[:2]
    np.exp(w3, out=w3)
    s = w2 + w3
    s += w1
    r = np.log(s)
    r -= d.lL if lLr is None else lLr
    c = np.clip(r, -delta, delta)  # dHuber/dr
    n_w = W.sum(1) if W is not None else np.full(K, len(d.lN), float)
    if asym != 1.0:  # the weight is constant on each side of r = 0, where Huber' = 0: the gradient stays exact
        a = np.where(r > 0, asym, 1.0)
        W = a if W is None else W * a
    if W is not None:  # Huber = c·(r − c/2), weighted
        cw = c * W
        f = _rowdot(cw, r) - 0.5 * _rowdot(cw, c)
        c = cw
    else:
        f = _rowdot(c, r) - 0.5 * _rowdot(c, c)
    c /= s
    w2 *= c
    w3 *= c
    g = np.empty((K, p))
    g[:, 0] = w1[:, 0] * (c @ d.ones)
    g2 = w2 @ d.m2
    g3 = w3 @ d.m3
    g[:, 1], g[:, 3] = g2[:, 0], -g2[:, 1]
    g[:, 2], g[:, 4] = g3[:, 0], -g3[:, 1]
    if p == 6:
        g[:, 5] = -g3[:, 2]
    if reduction == "mean":
        f = f / n_w
        g /= n_w[:, None]
    return f, g


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("kp,kp->k", a, b)


def lbfgs_batch(fg: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], x0: np.ndarray,
                lo: np.ndarray, hi: np.ndarray, *, m: int = 10, maxiter: int = 2000, gtol: float = 1e-12,
                ftol: float = 1e-10, c1: float = 1e-4, max_ls: int = 40) -> dict[str, np.ndarray]:
    """L-BFGS from every row of ``x0`` at once, with box bounds by projection.

    ``fg(X, rows)`` returns objective (k,) and gradient (k, p) at ``X`` for the batch rows ``rows``. A row
    stops when its projected-gradient max-norm is ≤ ``gtol`` (status 1), its objective decreases by
    ≤ ``ftol``·|f| in an iteration (status 2, a relative test: the objective's scale does not matter), its
    line search fails (status 3) or at ``maxiter`` (status 0). Pairs with non-positive curvature are
    skipped (stored as zero pairs, which the two-loop recursion ignores).
    """
    K, p = x0.shape
    X = np.clip(np.asarray(x0, float), lo, hi)
    out = {"x": X.copy(), "f": np.full(K, np.inf), "g": np.zeros((K, p)), "nit": np.zeros(K, int),
           "status": np.zeros(K, int)}
    rows = np.arange(K)
    f, g = fg(X, rows)
    S, Y = np.zeros((m, K, p)), np.zeros((m, K, p))
    rho, gam = np.zeros((m, K)), np.ones(K)
    first = True
    it = pos = 0
    nfev = 1
    while len(rows) and it < maxiter:
        it += 1
        act = ((lo >= X) & (g > 0)) | ((hi <= X) & (g < 0))
        gf = np.where(act, 0.0, g)
        q = gf.copy()
        order = [(pos - 1 - j) % m for j in range(min(it - 1, m))]  # the pairs stored so far, newest first
        al = np.zeros((m, len(rows)))
        for j in order:
            al[j] = rho[j] * _dot(S[j], q)
            q -= al[j][:, None] * Y[j]
        q *= gam[:, None]
        for j in reversed(order):
            q += S[j] * (al[j] - rho[j] * _dot(Y[j], q))[:, None]
        d = -q
        d[act] = 0.0
        bad = _dot(g, d) >= 0
        d[bad] = -gf[bad]
        t = np.ones(len(rows))
        if first:  # no curvature yet: a first step of unit length, as L-BFGS-B does
            t = 1.0 / np.maximum(np.linalg.norm(gf, axis=1), 1e-300)
        Xn = np.clip(X + t[:, None] * d, lo, hi)
        fn, gn = fg(Xn, rows)
        nfev += 1
        need = ~(fn <= f + c1 * _dot(g, Xn - X))
        for _ in range(max_ls):
            if not need.any():
                break
            i = np.flatnonzero(need)
            # minimiser of the quadratic through f(0), f'(0) and f(t), kept within [0.1 t, 0.5 t]
            gd = _dot(g[i], Xn[i] - X[i]) / t[i]
            den = 2 * (fn[i] - f[i] - gd * t[i])
            tq = np.where(np.isfinite(fn[i]) & (den > 0), -gd * t[i] ** 2 / np.where(den > 0, den, 1.0), 0.1 * t[i])
            t[i] = np.clip(tq, 0.1 * t[i], 0.5 * t[i])
            Xn[i] = np.clip(X[i] + t[i, None] * d[i], lo, hi)
            fn[i], gn[i] = fg(Xn[i], rows[i])
            nfev += 1
            need[i] = ~(fn[i] <= f[i] + c1 * _dot(g[i], Xn[i] - X[i]))
        failed = need
        s, y = Xn - X, gn - g
        sy = _dot(s, y)
        ok = ~failed & (sy > 1e-10 * np.sqrt(_dot(y, y) * _dot(s, s)))
        S[pos], Y[pos] = np.where(ok[:, None], s, 0.0), np.where(ok[:, None], y, 0.0)
        rho[pos] = np.where(ok, 1.0 / np.where(ok, sy, 1.0), 0.0)
        gam = np.where(ok, sy / np.where(ok, _dot(y, y), 1.0), gam)
        pos = (pos + 1) % m
        first = False
        f_old = f
        X = np.where(failed[:, None], X, Xn)
        f = np.where(failed, f, fn)
        g = np.where(failed[:, None], g, gn)
        act = ((lo >= X) & (g > 0)) | ((hi <= X) & (g < 0))
        conv_g = np.abs(np.where(act, 0.0, g)).max(1) <= gtol
        conv_f = ~failed & (f_old - f <= ftol * np.abs(f_old))
        done = conv_g | conv_f | failed
        if done.any():
            i = np.flatnonzero(done)
            for k, v in (("x", X[i]), ("f", f[i]), ("g", g[i])):
                out[k][rows[i]] = v
            out["nit"][rows[i]] = it
            out["status"][rows[i]] = np.where(conv_g[i], 1, np.where(conv_f[i], 2, 3))
            keep = ~done
            rows, X, f, g, gam = rows[keep], X[keep], f[keep], g[keep], gam[keep]
            S, Y, rho = S[:, keep], Y[:, keep], rho[:, keep]
    if len(rows):
        out["x"][rows], out["f"][rows], out["g"][rows], out["nit"][rows] = X, f, g, it
    out["nfev"] = np.array(nfev)
    return out


def _distinct(X: np.ndarray, f: np.ndarray, k: int, tol: float = 1e-3) -> list[int]:
    """Indices of up to k best rows that differ from each other by more than tol (max-norm)."""
    picked: list[int] = []
    for i in np.argsort(f):
        if not np.isfinite(f[i]):
            break
        if all(np.abs(X[i] - X[j]).max() > tol for j in picked):
            picked.append(int(i))
            if len(picked) == k:
                break
    return picked


def _run_batch(theta0: np.ndarray, free: list[int], lN, lD, lL, delta: float, reduction: str,
               W: np.ndarray | None = None, wrow: np.ndarray | None = None, asym: float = 1.0,
               LL: np.ndarray | None = None, **opt: Any) -> dict[str, np.ndarray]:
    """lbfgs_batch over the free columns of theta0 (K, p), chunked to bound memory. ``W`` / ``LL``: per-resample
    point weights / log losses, row i of theta0 using resample ``wrow[i]`` (or row i without ``wrow``)."""
    names_lo = np.array([b[0] for b in BOUNDS.values()])
    names_hi = np.array([b[1] for b in BOUNDS.values()])
    p = theta0.shape[1]
    lo, hi = names_lo[:p][free], names_hi[:p][free]
    chunk = max(1, _MAX_ELEMS // max(1, len(lN)))
    prep = _Prep(lN, lD, lL)
    outs = []
    for s0 in range(0, len(theta0), chunk):
        base = theta0[s0 : s0 + chunk]
        sel = wrow[s0 : s0 + chunk] if wrow is not None else slice(s0, s0 + chunk)  # this chunk's resamples
        Wc, Lc = (None if A is None else A[sel] for A in (W, LL))

        def fg(X: np.ndarray, rows: np.ndarray, base: np.ndarray = base, Wc: np.ndarray | None = Wc,
               Lc: np.ndarray | None = Lc):
            th = base[rows].copy()
            th[:, free] = X
            f, g = _obj(th, lN, lD, lL, delta, reduction, None if Wc is None else Wc[rows], prep, asym,
                        None if Lc is None else Lc[rows])
            return f, g[:, free]

        with one_blas_thread():
            outs.append(lbfgs_batch(fg, base[:, free], lo, hi, **opt))
    return {k: np.concatenate([np.atleast_1d(o[k]) for o in outs]) for k in outs[0]}
