"""What a scaling law is: its parameters, equation, start grid and internal coordinates, and the fit result."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cptscale.errors import CLIError

LAWS: dict[str, list[str]] = {
    "chinchilla": ["E", "A", "B", "alpha", "beta"],
    "cpt": ["E", "A", "B", "alpha", "beta", "gamma"],  # B, beta are the paper's B', beta'
}


LINEAR_LAWS: dict[str, list[str]] = {"envelope": ["k", "m"], "hernandez": ["k", "alpha", "beta"]}


#: Laws whose loss depends on the unique tokens U (parameter "U"): no closed-form allocation, and the
#: cost of repetition is their own prediction minus their Chinchilla part.
DATA_CONSTRAINED = ("muennighoff", "lovelace")


EQUATIONS = {
    "chinchilla": "L = E + A/N^alpha + B/D^beta",
    "cpt": "L = E + A/N^alpha + B'/(D^beta' * N^gamma)   (B' = B, beta' = beta)",
    "muennighoff": "L = E + A/N^alpha + B/D'^beta, D' = U + U R_D (1 - exp(-(D/U - 1)/R_D))   (Muennighoff et al. 2023)",
    "lovelace": "L = E + A/N^alpha + B/D^beta + P R_D^delta (N/U)^kappa, R_D = max(D/U - 1, 0)   (Lovelace et al. 2026)",
    "envelope": "L = k * C^m   (lower frontier of all runs)",
    "hernandez": "D_T = k * D_F^alpha * N^beta   (effective data transferred)",
    "isoflop": "N_opt = kN * C^a, D_opt = kD * C^b   (IsoFLOP profiles, Chinchilla approach 2)",
}


#: Initial-value grids in internal coordinates. "chinchilla" is Hoffmann et al.'s (5·6·6·5·5 = 4,500 starts);
#: gamma (CPT law only) adds three values around the paper's 0.08. "coarse" (243 starts) is for quick runs.
GRIDS: dict[str, dict[str, list[float]]] = {
    "chinchilla": {
        "E": [-1.0, -0.5, 0.0, 0.5, 1.0], "A": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
        "B": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0], "alpha": [0.0, 0.5, 1.0, 1.5, 2.0],
        "beta": [0.0, 0.5, 1.0, 1.5, 2.0], "gamma": [-0.1, 0.1, 0.3],
    },
    "coarse": {
        "E": [-1.0, 0.0, 1.0], "A": [0.0, 10.0, 20.0], "B": [0.0, 10.0, 20.0], "alpha": [0.25, 0.75, 1.5],
        "beta": [0.25, 0.75, 1.5], "gamma": [0.0, 0.2],
    },
}


_LOG = ("E", "A", "B")


def _grid(law: str, grid: str = "chinchilla", fixed: dict[str, float] | None = None) -> np.ndarray:
    """Grid starts in internal coordinates, one column per law parameter (frozen ones collapsed)."""
    if grid not in GRIDS:
        raise CLIError(f"unknown grid {grid!r}; choose one of {list(GRIDS)}")
    fixed = fixed or {}
    axes = [np.array([_to_internal(k, fixed[k])]) if k in fixed else np.asarray(GRIDS[grid][k], float)
            for k in LAWS[law]]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))


def _to_internal(name: str, v: float) -> float:
    if name in _LOG:
        if name == "E" and v == 0:  # the reduced law without E (a remedy when E is not identified)
            return -math.inf
        if v <= 0:
            raise CLIError(f"frozen {name}={v} must be > 0" + (" (or exactly 0: the reduced law without E)"
                                                                 if name == "E" else ""))
        return math.log(v)
    return float(v)


def _to_params(th: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    return {k: float(math.exp(th[i]) if k in _LOG else th[i]) for i, k in enumerate(names)}


#: Muennighoff et al. 2023 (huggingface/datablations README, "Parametric Fit"), internal coordinates
#: a = log A, b = log B, e = log E as published, plus the fitted repetition half-lives R*_D and R*_N.
MUENNIGHOFF: dict[str, float] = {"a": 6.255414, "b": 7.3049974, "e": 0.6254804, "alpha": 0.3526596,
                                 "beta": 0.3526596, "R_D": 15.387756, "R_N": 5.309743}
R_STAR_D = MUENNIGHOFF["R_D"]


def repetitions(D: Any, U: Any) -> np.ndarray:
    """R_D = max(D/U − 1, 0): how many times the U unique tokens were repeated beyond the first epoch."""
    return np.maximum(np.asarray(D, float) / np.asarray(U, float) - 1.0, 0.0)


def overfit_penalty(N: Any, D: Any, p: dict[str, float]) -> np.ndarray:
    """Lovelace et al.'s additive overfitting penalty P · R_D^delta · (N/U)^kappa (0 without repetition)."""
    R = repetitions(D, p["U"])
    N = np.asarray(N, float)
    return np.where(R > 0, p["P"] * np.where(R > 0, R, 1.0) ** p["delta"] * (N / p["U"]) ** p["kappa"], 0.0)


def effective_data(D: Any, U: Any, r_star: float = R_STAR_D) -> np.ndarray:
    """Muennighoff et al.'s effective data D' = U + U·R*·(1 − exp(−R_D/R*)), R_D = D/U − 1 repetitions beyond
    the first epoch: repeated tokens are worth less with every repetition and never more than U·R* in all
    (D' = D without repetition)."""
    D, U = np.asarray(D, float), np.asarray(U, float)
    R = repetitions(D, U)
    return np.where(D <= U, D, U + U * r_star * (1.0 - np.exp(-R / r_star)))


def muennighoff_loss(N: Any, D: Any, U: Any, p: dict[str, float] | None = None) -> np.ndarray:
    """The full data-constrained law of Muennighoff et al. 2023 (effective data and effective parameters,
    U_N = min(N, the compute-optimal N of U tokens)) with their published constants by default: the formula
    of their README (valid for D >= U), which the tests check against its two worked examples."""
    p = p or MUENNIGHOFF
    A, B, E = math.exp(p["a"]), math.exp(p["b"]), math.exp(p["e"])
    al, be = p["alpha"], p["beta"]
    G = ((al * A) / (be * B)) ** (1 / (al + be))
    N, D, U = (np.asarray(x, float) for x in (N, D, U))
    RD = repetitions(D, U)
    UN = np.minimum(N, (U * G) ** (be / al) * G)
    RN = np.maximum(N / UN - 1, 0)
    n_eff = UN + UN * p["R_N"] * (1 - np.exp(-RN / p["R_N"]))
    d_eff = U + U * p["R_D"] * (1 - np.exp(-RD / p["R_D"]))
    return E + A / n_eff**al + B / d_eff**be


@dataclass
class FitResult:
    law: str
    params: dict[str, float]  #: every parameter of the law, frozen ones included
    fixed: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    starts: np.ndarray | None = field(default=None, repr=False)  #: distinct optima (free coords), warm starts

    def predict(self, *cols: Any) -> np.ndarray:
        """Loss laws: predict(N, D); envelope: predict(C); hernandez: predict(N, D_F) -> D_T."""
        p = self.params
        if self.law == "envelope":
            return p["k"] * np.asarray(cols[0], float) ** p["m"]
        if self.law == "hernandez":
            N, DF = (np.asarray(x, float) for x in cols)
            return p["k"] * DF ** p["alpha"] * N ** p["beta"]
        N, D = (np.asarray(x, float) for x in cols)
        if self.law == "muennighoff":  # the unique tokens U are part of the law: D counts repeated tokens
            D = effective_data(D, p["U"], p["R_D"])
        if self.law == "lovelace":
            return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"] + overfit_penalty(N, D, p)
        return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / (D ** p["beta"] * N ** p.get("gamma", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"law": self.law, "equation": EQUATIONS.get(self.law), "params": self.params,
                "fixed": self.fixed, "meta": self.meta}


def load_fit(path: str) -> FitResult:
    from cptscale.util import read_json

    try:
        d = read_json(path)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{path}: cannot read fit JSON ({exc})") from None
    if not isinstance(d, dict) or "law" not in d or not d.get("params"):
        raise CLIError(f"{path}: not a fit (no law/params{'; ' + d['reason'] if isinstance(d, dict) and d.get('reason') else ''})")
    return FitResult(d["law"], d["params"], d.get("fixed", {}), d.get("meta", {}))


def _check_law(law: str, fixed: dict[str, float], names: Sequence[str]) -> None:
    for k in fixed:
        if k not in names:
            raise CLIError(f"frozen parameter {k!r} is not in law {law!r} (parameters: {list(names)})")


#: Loss functions of :func:`fit_law`. ``huber``: the Chinchilla / Besiroglu grid recipe (Huber on log-loss
#: residuals, summed or averaged, L-BFGS from every grid start). ``huber-nll``: the recipe behind
#: Besiroglu et al.'s published table: the negative log-likelihood of a Huber density of free log-scale
#: sigma (one more parameter), BFGS with the exact gradient from one start at Hoffmann et al.'s estimates.
LOSSES = ("huber", "huber-nll")


#: Hoffmann et al.'s unrounded estimates (TeX source, as Besiroglu et al. use them) in internal coordinates
#: (log E, log A, log B, alpha, beta): the single start of the ``huber-nll`` recipe; gamma starts at 0.
HOFFMANN_START: dict[str, float] = {"E": 0.5267228, "A": 6.0073404, "B": 6.0179186, "alpha": 0.33917084,
                                    "beta": 0.2849083, "gamma": 0.0}


def _min_sizes(law: str, fixed: dict[str, float]) -> int:
    """Distinct model sizes a law needs: E + A/N^alpha needs 3 sizes; the gamma of the CPT law needs 2."""
    if law in LAWS and not {"A", "alpha"} <= set(fixed):
        return 3
    if (law == "cpt" and "gamma" not in fixed) or law == "hernandez":
        return 2
    return 1  # the N term is frozen (and no gamma): one size identifies the D term
