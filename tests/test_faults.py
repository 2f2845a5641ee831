"""Fault injection over the whole workflow (slow): every stage SIGKILLed at seeded random points inside
its jobs (Snakemake and all its jobs at once, like a machine going down), the same command re-run,
and the finished study compared with an uninterrupted run of the same study at the same paths
(see tests/faults.py; `nice .venv/bin/python tests/faults.py` prints the README's table)."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults import STAGES, campaign, diff_tables, format_table

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(__import__("sys").executable).with_name("snakemake").exists(),
                       reason="needs snakemake in the environment (./run.sh setup)"),
    pytest.mark.timeout(7200),
]


def test_sigkill_every_stage_then_rerun_gives_identical_results(tmp_path: Path) -> None:
    rows, base, got, _faulted = campaign(tmp_path / "faults", kills=2, seed=1)
    print(format_table(rows))
    assert base["tables"] and set(base["tables"]) == set(got["tables"])
    diff = [t for t in base["tables"] if base["tables"][t] != got["tables"][t]]
    assert not diff, (f"results tables differ after the kills: {diff}\n"
                      + "\n".join(diff_tables(Path(base["db"]), Path(got["db"]))))
    assert base["curves"] and got["curves"] == base["curves"], "a training curve after resume differs"
    for stage, files in base["stages"].items():
        assert got["stages"][stage] == files, f"outputs of stage {stage} differ"
    by_stage = {r["stage"]: r for r in rows}
    assert set(by_stage) == set(STAGES)
    for r in by_stage.values():  # every stage was killed, inside one of its jobs, and recovered
        assert r["kills"] == 2 and r["in_job"] >= 1 and r["identical"] == 2, r
