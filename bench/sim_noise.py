"""Noise levels for the simulator (cptscale.simulate.Noise) from real tiny runs that differ only in seed.

    python bench/sim_noise.py RUN_DIR [RUN_DIR ...]     # run dirs of one run spec trained with several seeds

On the trained language, over the evaluations after the first tenth of the run (the part the fits use):
``run``: the standard deviation across seeds of the log final loss; ``eval``: the standard deviation of a
run's log loss around the across-seed mean curve, after removing that run's own mean offset (the wiggle
of one curve); ``train``: the standard deviation of the log training loss around its running median over
9 steps. How they were measured for the defaults: see the README ("Simulated studies").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure(dirs: list[Path]) -> dict[str, float]:
    evals = [_rows(d / "evals.jsonl") for d in dirs]
    # the trained language only: another language's loss of a scratch model is not what the fits use
    specs = [d / "run.json" for d in dirs if (d / "run.json").exists()]
    if not specs:
        sys.exit("none of the run dirs has its run.json (which names the trained language)")
    langs = [json.loads(specs[0].read_text())["lang"]]
    steps = sorted({r["step"] for r in evals[0] if "branch" not in r})
    last = steps[-1]
    late = [s for s in steps if s >= 0.1 * last]
    run_sd, eval_sd = [], []
    for lang in langs:
        M = np.array([[next(r["loss"] for r in ev if r["step"] == s and r["lang"] == lang and "branch" not in r)
                       for s in late] for ev in evals])
        logm = np.log(M)
        run_sd.append(float(np.std(logm[:, -1], ddof=1)))
        dev = logm - logm.mean(axis=0)
        dev -= dev.mean(axis=1, keepdims=True)
        eval_sd.append(float(np.sqrt((dev**2).sum() / (dev.size - dev.shape[0] - dev.shape[1] + 1))))
    train_sd = []
    for d in dirs:
        loss = np.log([r["loss"] for r in _rows(d / "metrics.jsonl")])
        med = np.array([np.median(loss[max(0, i - 4): i + 5]) for i in range(len(loss))])
        train_sd.append(float(np.std((loss - med)[len(loss) // 10:])))
    return {"runs": len(dirs), "langs": langs, "run": float(np.mean(run_sd)), "eval": float(np.mean(eval_sd)),
            "train": float(np.mean(train_sd)), "run_by_lang": dict(zip(langs, run_sd, strict=True)),
            "eval_by_lang": dict(zip(langs, eval_sd, strict=True))}


if __name__ == "__main__":
    dirs = [Path(p) for p in sys.argv[1:]]
    if len(dirs) < 3:
        sys.exit("give the run dirs of at least 3 seeds of one run spec")
    print(json.dumps(measure(dirs), indent=2))
