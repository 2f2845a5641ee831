"""Simulated runs with a known truth: for validating the statistics and planning studies, never for
replacing training (the demo and every engine test train for real).

    from cptscale.simulate import Truth, default_truth, simulate_run
    truth = Truth.load("law.json")            # or default_truth(): Zheng et al. 2024 exponents
    sim = simulate_run(run_spec, truth, seed=3)
    sim.evals, sim.metrics, sim.done          # the rows evals.jsonl / metrics.jsonl / done.json would hold

``cptscale.simulate.truth`` holds the laws, ``cptscale.simulate.curve`` the LR-schedule-shaped
curve (Tissue et al. 2024), ``cptscale.simulate.run`` one run. Pure: numpy and the schedule module.
"""

from cptscale.simulate.run import SimulatedRun, simulate_run
from cptscale.simulate.truth import (
    CPTLaw,
    CurveShape,
    ForgettingLaw,
    Noise,
    ScratchLaw,
    Truth,
    TruthError,
    default_truth,
    truth_for,
)

__all__ = ["CPTLaw", "CurveShape", "ForgettingLaw", "Noise", "ScratchLaw", "SimulatedRun", "Truth", "TruthError",
           "default_truth", "simulate_run", "truth_for"]
