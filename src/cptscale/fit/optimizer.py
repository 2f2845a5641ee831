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


#: bytes per work array of a block of rows (136 rows of 240 points): the block's work arrays (1.5 MB) stay
#: in L2 (4-5x faster than one pass over all rows); they are allocated once per dataset (:meth:`_Prep.work`)
_BLOCK_BYTES = 1 << 18


def _aligned(size: int) -> np.ndarray:
    """An uninitialised float64 vector whose data start on a 64-byte boundary. numpy's own allocations are
    16-byte aligned: an elementwise ufunc whose output is not cache-line aligned runs at half speed with
    AVX-512 (measured: an add of two (136, 240) arrays 13.0 µs into a misaligned output, 7.2 µs aligned)."""
    raw = np.empty(size + 8)
    off = (-raw.ctypes.data % 64) // 8
    return raw[off : off + size]


@dataclass
class _Prep:
    """Per-dataset constants of the objective (the design matrices) and its work arrays (:meth:`work`): made
    once per fit, shared by all its objective evaluations (so one _Prep must not serve two threads at once)."""

    lN: np.ndarray
    lD: np.ndarray
    lL: np.ndarray

    def __post_init__(self) -> None:
        self.ones = one = np.ones_like(self.lN)  # lN, lD, lL: one entry per point
        self.invL = np.exp(-self.lL)
        # the exponents as one (3K, 6) @ (6, n) product (BLAS: ~10x faster than broadcasting a[:, None] -
        # alpha[:, None] * log N): rows 1, -log N, -log D, -log L_obs, 1 / L_obs, 1; the three terms' rows of
        # coefficients (:func:`_obj`) pick the A and B exponents and the E term (E / L_obs, or E with lLr)
        self.e = np.stack([one, -self.lN, -self.lD, -self.lL, self.invL, one])
        self.m = np.stack([one, self.lN, self.lD], 1)  # the gradient's sums: Σ x, Σ x log N, Σ x log D
        self._buf: np.ndarray | None = None
        self._views: dict[int, tuple[np.ndarray, ...]] = {}

    def block_rows(self) -> int:
        return max(1, _BLOCK_BYTES // 8 // max(1, len(self.lN)))

    def work(self, rows: int) -> tuple[np.ndarray, ...]:
        """Aligned work arrays for a block of ``rows``: the three terms (3 rows, n), their sum, the residuals
        and dHuber/dr (rows, n). Reused by every block: fresh temporaries cost page faults, and 3 in 4 are
        misaligned."""
        if rows not in self._views:
            n = len(self.lN)
            step = -(-rows * n // 8) * 8  # each array starts on a 64-byte boundary
            if self._buf is None or len(self._buf) < 6 * step:
                self._buf = _aligned(6 * (max(rows, self.block_rows()) * n + 8))
            b = self._buf
            self._views[rows] = (b[: 3 * rows * n].reshape(3 * rows, n),
                                 *(b[(3 + i) * step : (3 + i) * step + rows * n].reshape(rows, n) for i in range(3)))
        return self._views[rows]


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

    The law is evaluated divided by the observed loss, L / L_obs = E / L_obs + exp(a - alpha log N - log L_obs)
    + exp(b - ...), so that the residual is one log and the E term part of the exponents' matrix product: no
    broadcast passes (adding E (K, 1) or subtracting log L (n,) cost 2-3 same-shape passes each). With
    ``lLr`` the division is left out and ``lLr`` subtracted after the log.
    """
    prep = prep or _Prep(lN, lD, lL)
    K, p = theta.shape
    kap = 1.0 if lLr is None else 0.0
    E = np.exp(theta[:, 0])
    C = np.zeros((3, K, 6))  # coefficients of the rows of _Prep.e: the A and B exponents, the E term
    C[0, :, 0], C[0, :, 1], C[0, :, 3] = theta[:, 1], theta[:, 3], kap
    C[1, :, 0], C[1, :, 2], C[1, :, 3] = theta[:, 2], theta[:, 4], kap
    if p == 6:
        C[1, :, 1] = theta[:, 5]
    C[2, :, 4 if lLr is None else 5] = E
    bs = prep.block_rows()
    if bs >= K:
        return _obj_block(C, E, prep, p, delta, reduction, W, asym, lLr)
    f, g = np.empty(K), np.empty((K, p))
    for i in range(0, K, bs):
        j = slice(i, i + bs)
        f[j], g[j] = _obj_block(C[:, j], E[j], prep, p, delta, reduction, None if W is None else W[j], asym,
                                None if lLr is None else lLr[j])
    return f, g


#: (term, column) of :func:`_obj_block`'s sums G for the gradient's columns log A, log B, alpha, beta, gamma
_GA, _GC = np.array([0, 1, 0, 1, 1]), np.array([0, 0, 1, 2, 1])
_GS = np.array([1.0, 1.0, -1.0, -1.0, -1.0])


def _obj_block(C: np.ndarray, E: np.ndarray, d: _Prep, p: int, delta: float, reduction: str,
               W: np.ndarray | None = None, asym: float = 1.0,
               lLr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_obj` on one block (coefficients ``C`` (3, K, 6)), in the prepared work arrays. The
    exponentials are taken without a max-shift: the box bounds keep every exponent within ±200, far from
    float64 overflow."""
    K = C.shape[1]
    T, s, r, v = d.work(K)
    np.matmul(C.reshape(3 * K, 6), d.e, out=T)  # rows: A term, B term (exponents), E term
    T2 = T[: 2 * K]
    np.exp(T2, out=T2)
    np.add(T[:K], T[K : 2 * K], out=s)
    s += T[2 * K :]
    np.log(s, out=r)
    if lLr is not None:
        r -= lLr
    np.clip(r, -delta, delta, out=v)  # dHuber/dr
    n_w = (W.sum(1) if W is not None else np.full(K, len(d.lN), float)) if reduction == "mean" else None
    if asym != 1.0:  # the weight is constant on each side of r = 0, where Huber' = 0: the gradient stays exact
        a = np.where(r > 0, asym, 1.0)
        W = a if W is None else W * a
    if W is not None:  # Huber = c·(r − c/2), weighted
        cw = v * W
        f = _rowdot(cw, r) - 0.5 * _rowdot(cw, v)
        v[...] = cw
    else:
        f = _rowdot(v, r) - 0.5 * _rowdot(v, v)
    v /= s
    T2v = T2.reshape(2, K, -1)
    np.multiply(T2v, v, out=T2v)
    G = (T2 @ d.m).reshape(2, K, 3)  # Σ over points of v·term·(1, log N, log D), terms A and B
    g = np.empty((K, p))
    g[:, 0] = E * (v @ (d.invL if lLr is None else d.ones))
    g[:, 1:] = (G[_GA[: p - 1], :, _GC[: p - 1]] * _GS[: p - 1, None]).T
    if n_w is not None:
        f = f / n_w
        g /= n_w[:, None]
    return f, g


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two (K, p) arrays. einsum, not a product and a BLAS matrix-vector sum
    ((a * b) @ ones, 1.4-1.7x faster but no faster fit): BLAS rounds a row by its position in the batch,
    which changed the starts' paths with the other starts in the batch (tests/test_laws.py's rollout
    test, which compares two fits at the rounding floor, then failed)."""
    return np.einsum("kp,kp->k", a, b)


def _active(X: np.ndarray, g: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """The coordinates held on a bound (at it, the gradient pushing outwards), or None when no coordinate is
    on a bound, as is usual: the bounds are wide, and the masked copies can then be skipped."""
    at_lo, at_hi = lo >= X, hi <= X
    if not (at_lo.any() or at_hi.any()):
        return None
    act = (at_lo & (g > 0)) | (at_hi & (g < 0))
    return act if act.any() else None


def lbfgs_batch(fg: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], x0: np.ndarray,
                lo: np.ndarray, hi: np.ndarray, *, m: int = 10, maxiter: int = 2000, gtol: float = 1e-12,
                ftol: float = 1e-10, c1: float = 1e-4, max_ls: int = 40) -> dict[str, np.ndarray]:
    """L-BFGS from every row of ``x0`` at once, with box bounds by projection.

    ``fg(X, rows)`` returns objective (k,) and gradient (k, p) at ``X`` for the batch rows ``rows``. A row
    stops when its projected-gradient max-norm is ≤ ``gtol`` (status 1), its objective decreases by
    ≤ ``ftol``·|f| in an iteration (status 2, a relative test: the objective's scale does not matter), its
    line search fails (status 3) or at ``maxiter`` (status 0). Pairs with non-positive curvature are
    skipped (stored as zero pairs, which the two-loop recursion ignores).

    The bookkeeping skips its masked copies when no row needs them (rows on a bound, failed line
    searches and skipped pairs are rare), backtracks on compact copies of the failed rows' state and
    compacts the memory with np.take.
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
        act = _active(X, g, lo, hi)
        any_act = act is not None
        gf = np.where(act, 0.0, g) if any_act else g
        q = gf.copy()
        order = [(pos - 1 - j) % m for j in range(min(it - 1, m))]  # the pairs stored so far, newest first
        al = np.zeros((m, len(rows)))
        for j in order:
            al[j] = rho[j] * _dot(S[j], q)
            q -= al[j][:, None] * Y[j]
        q *= gam[:, None]
        for j in reversed(order):
            q += S[j] * (al[j] - rho[j] * _dot(Y[j], q))[:, None]
        d = np.negative(q, out=q)
        if any_act:
            d[act] = 0.0
        bad = _dot(g, d) >= 0
        if bad.any():
            d[bad] = -gf[bad]
        t = np.ones(len(rows))
        if first:  # no curvature yet: a first step of unit length, as L-BFGS-B does
            t = 1.0 / np.maximum(np.linalg.norm(gf, axis=1), 1e-300)
        Xn = np.clip(X + t[:, None] * d, lo, hi)
        fn, gn = fg(Xn, rows)
        nfev += 1
        s = Xn - X
        need = ~(fn <= f + c1 * _dot(g, s))
        if need.any():  # backtrack the rows that failed, on compact copies of their state
            i = np.flatnonzero(need)
            gi, Xi, di, fi, ti, si, fni = g[i], X[i], d[i], f[i], t[i], s[i], fn[i]
            for _ in range(max_ls):
                # minimiser of the quadratic through f(0), f'(0) and f(t), kept within [0.1 t, 0.5 t]
                gd = _dot(gi, si) / ti
                den = 2 * (fni - fi - gd * ti)
                tq = np.where(np.isfinite(fni) & (den > 0), -gd * ti**2 / np.where(den > 0, den, 1.0), 0.1 * ti)
                ti = np.clip(tq, 0.1 * ti, 0.5 * ti)
                Xni = np.clip(Xi + ti[:, None] * di, lo, hi)
                si = Xni - Xi
                fni, gni = fg(Xni, rows[i])
                nfev += 1
                Xn[i], s[i], fn[i], gn[i] = Xni, si, fni, gni
                miss = ~(fni <= fi + c1 * _dot(gi, si))
                if miss.all():
                    continue
                need[i[~miss]] = False
                if not miss.any():
                    break
                k = np.flatnonzero(miss)
                i, gi, Xi, di, fi, ti, si, fni = i[k], gi[k], Xi[k], di[k], fi[k], ti[k], si[k], fni[k]
        failed = need
        any_failed = failed.any()
        y = gn - g
        sy = _dot(s, y)
        yy = _dot(y, y)
        ok = sy > 1e-10 * np.sqrt(yy * _dot(s, s))
        if any_failed:
            ok &= ~failed
        if ok.all():
            S[pos], Y[pos], rho[pos], gam = s, y, 1.0 / sy, sy / yy
        else:
            S[pos], Y[pos] = np.where(ok[:, None], s, 0.0), np.where(ok[:, None], y, 0.0)
            rho[pos] = np.where(ok, 1.0 / np.where(ok, sy, 1.0), 0.0)
            gam = np.where(ok, sy / np.where(ok, yy, 1.0), gam)
        pos = (pos + 1) % m
        first = False
        f_old = f
        if any_failed:
            X = np.where(failed[:, None], X, Xn)
            f = np.where(failed, f, fn)
            g = np.where(failed[:, None], g, gn)
        else:
            X, f, g = Xn, fn, gn
        act = _active(X, g, lo, hi)
        conv_g = np.abs(g if act is None else np.where(act, 0.0, g)).max(1) <= gtol
        conv_f = f_old - f <= ftol * np.abs(f_old)
        if any_failed:
            conv_f &= ~failed
        done = conv_g | conv_f | failed
        if done.any():
            i = np.flatnonzero(done)
            for k, v in (("x", X[i]), ("f", f[i]), ("g", g[i])):
                out[k][rows[i]] = v
            out["nit"][rows[i]] = it
            out["status"][rows[i]] = np.where(conv_g[i], 1, np.where(conv_f[i], 2, 3))
            keep = np.flatnonzero(~done)  # np.take: 2.3x faster than boolean indexing along S's middle axis
            rows, X, f, g, gam = rows[keep], X[keep], f[keep], g[keep], gam[keep]
            S, Y, rho = np.take(S, keep, axis=1), np.take(Y, keep, axis=1), np.take(rho, keep, axis=1)
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
    every = list(free) == list(range(p))
    outs = []
    for s0 in range(0, len(theta0), chunk):
        base = theta0[s0 : s0 + chunk]
        sel = wrow[s0 : s0 + chunk] if wrow is not None else slice(s0, s0 + chunk)  # this chunk's resamples
        Wc, Lc = (None if A is None else A[sel] for A in (W, LL))

        def fg(X: np.ndarray, rows: np.ndarray, base: np.ndarray = base, Wc: np.ndarray | None = Wc,
               Lc: np.ndarray | None = Lc):
            if every:  # every coordinate free (the usual fit): X is theta
                th = X
            else:
                th = base[rows].copy()
                th[:, free] = X
            f, g = _obj(th, lN, lD, lL, delta, reduction, None if Wc is None else Wc[rows], prep, asym,
                        None if Lc is None else Lc[rows])
            return f, (g if every else g[:, free])

        with one_blas_thread():
            outs.append(lbfgs_batch(fg, base[:, free], lo, hi, **opt))
    return {k: np.concatenate([np.atleast_1d(o[k]) for o in outs]) for k in outs[0]}
