"""Simulated studies through the real workflow (Snakemake, DuckDB, fits, the report rendered in headless
Chromium): simulated outputs pass the trained outputs' validation, and the store, report and summary mark
them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cptscale.config.problems import ConfigError
from cptscale.validation import parse_config

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
PAPER_SIM = ROOT / "workflow/studies/paper-simulated.yaml"


def _study(tmp_path: Path, sizes: list[str] | None, ratios: list[float] | None, **fit) -> Path:
    raw = yaml.safe_load(PAPER_SIM.read_text())
    raw["results_dir"] = str(tmp_path / "results")
    if sizes is not None:
        raw["ladder"]["sizes"] = sizes
        raw["parallel"]["per_size"] = {k: v for k, v in raw["parallel"]["per_size"].items() if k in sizes}
    if ratios is not None:
        raw["replay"]["ratios"] = ratios
    raw["fit"].update(fit)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _snakemake(config: Path, timeout: int) -> subprocess.CompletedProcess:
    out = subprocess.run([SNAKEMAKE, "--profile", "workflow/profiles/local", "--cores", "2", "--configfile",
                          str(config)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


def _check_study(config: Path) -> None:
    import duckdb

    from cptscale.runspec import RunSpec
    from cptscale.store.ingest import ingest

    raw = yaml.safe_load(config.read_text())
    sdir = Path(raw["results_dir"]) / raw["study"]
    runs = sorted((sdir / "runs").glob("*/done.json"))
    assert runs
    for done_path in runs:
        done = json.loads(done_path.read_text())
        assert done["simulated"] is True and done["simulation"]["truth"] == "paper-default"
        spec = RunSpec.load(done_path.parent / "run.json").to_dict()  # the trainer's own run.json validation
        assert spec["simulate"]["backend"] == "simulate"
        assert set(done["final_loss"]) == {"en", "zh"}
        assert (done_path.parent / "metrics.jsonl").read_text().count("\n") == spec["steps"]
    con = duckdb.connect(str(sdir / "cptscale.duckdb"), read_only=True)
    try:
        n, sim = con.execute("SELECT count(*), count(*) FILTER (WHERE simulated) FROM runs").fetchone()
        assert n == sim == len(runs)
        assert con.execute("SELECT count(*) FROM evals").fetchone()[0] > 0
        assert con.execute("SELECT count(*) FROM fits").fetchone()[0] > 0
    finally:
        con.close()
    # the report says so on its page and in every figure; the summary on every line
    page = (sdir / "report" / "index.html").read_text()
    assert page.count("SIMULATED STUDY") == 2 and "<title>SIMULATED: " in page
    figures = sorted((sdir / "report" / "figures").glob("*.svg"))
    assert figures and all("SIMULATED" in f.read_text() for f in figures)
    assert json.loads((sdir / "report" / "report.json").read_text())["simulated"]["simulated"] == len(runs)
    _renders(sdir / "report" / "index.html")
    out = subprocess.run([str(Path(sys.executable).with_name("cptscale")), "summary", "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) > 5 and all(line.startswith("[SIMULATED] ") for line in lines)
    assert json.loads((sdir / "summary.json").read_text())["simulated"]["simulated"] == len(runs)

    # a trained run (the same files without the simulated flags) is refused in this store, unless allowed
    src = runs[0].parent
    trained = sdir / "runs" / "zz-trained-copy"
    trained.mkdir()
    for f in src.iterdir():
        (trained / f.name).write_bytes(f.read_bytes())
    spec = json.loads((trained / "run.json").read_text())
    spec.pop("simulate")
    spec["run_id"] = trained.name
    (trained / "run.json").write_text(json.dumps(spec))
    done = json.loads((trained / "done.json").read_text())
    done.pop("simulated")
    (trained / "done.json").write_text(json.dumps(done))
    store = sdir / "db" / "store.duckdb"
    before = store.read_bytes()
    from cptscale.store.ingest import MixedStore

    with pytest.raises(MixedStore, match=r"would mix \d+ simulated runs .* with 1 trained"):
        ingest(sdir, store)
    assert store.read_bytes() == before  # left unchanged
    rep = ingest(sdir, store, allow_mixed=True)
    assert rep.ok
    con = duckdb.connect(str(store), read_only=True)
    try:
        assert con.execute("SELECT simulated FROM runs WHERE run_id = ?", [trained.name]).fetchone() == (False,)
    finally:
        con.close()


def _renders(page: Path) -> None:
    """The page renders offline in headless Chromium (when installed): every figure it embeds is drawn with
    data marks, with no error, warning or network request."""
    from test_report import CHROMIUM, page_specs, render

    if not Path(CHROMIUM).exists():
        return
    res = render(page, timeout=600)
    st = res["status"]
    assert st is not None, res["stderr"][-2000:]
    assert st["errors"] == [] and st["warnings"] == [] and st["requests"] == [], st
    assert set(st["rendered"]) == set(page_specs(page)), set(page_specs(page)) - set(st["rendered"])
    assert all(n > 0 for n in st["rendered"].values()), st["rendered"]


def test_reduced_simulated_paper_study_end_to_end(tmp_path: Path) -> None:
    """Three paper sizes, one replay ratio: every stage of the real workflow on simulated runs."""
    config = _study(tmp_path, ["49M", "137M", "512M"], [0.0], bootstrap=5, grid="coarse")
    _snakemake(config, timeout=1800)
    _check_study(config)


@pytest.mark.slow
def test_simulated_paper_study_end_to_end(tmp_path: Path) -> None:
    """workflow/studies/paper-simulated.yaml as it is (336 runs, ~1,300 jobs) through Snakemake on 2 cores."""
    config = _study(tmp_path, None, None)
    _snakemake(config, timeout=4 * 3600)
    _check_study(config)


def test_paper_simulated_is_the_paper_study_with_the_simulator() -> None:
    sim = yaml.safe_load(PAPER_SIM.read_text())
    paper = yaml.safe_load((ROOT / "workflow/studies/paper.yaml").read_text())
    assert sim.pop("simulate") == {"truth": None, "seed": 0}
    assert sim["train"].pop("backend") == "simulate"
    for key in ("study", "description"):
        assert sim.pop(key) != paper.pop(key)
    assert sim == paper


def test_simulate_config_errors(tmp_path: Path) -> None:
    raw = yaml.safe_load(PAPER_SIM.read_text())
    raw["train"].pop("backend")
    with pytest.raises(ConfigError, match=r"simulate.*train.backend: simulate"):
        parse_config(raw)
    raw = yaml.safe_load(PAPER_SIM.read_text())
    raw["simulate"]["truth"] = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"simulate.truth.*does not exist"):
        parse_config(raw)
    assert parse_config(yaml.safe_load((ROOT / "workflow/studies/paper.yaml").read_text())).train.backend == "megatron"


@pytest.mark.slow
def test_simulated_repeat_study_recovers_the_repetition_constant(tmp_path: Path, capsys) -> None:
    """The EN->ES repeat study's design (workflow/studies/en-es-repeat.yaml: text capped by data.max_chars, runs
    repeating it up to ~12 epochs) simulated through the real workflow from a truth at its own scale (its real
    fit's E, A, alpha, B, beta, nonembedding parameters) with repetition R_D = 3.42: the plan, after the
    simulated data stage, passes the effective-data design; fit-study's effective-data law is identified, and
    its intervals hold the truth's R_D, alpha and beta (measured: R*_D 4.14 [3.30, 4.74])."""
    from cptscale.simulate.truth import CPTLaw, Repetition, ScratchLaw, Truth

    law = ScratchLaw(E=2.653, A=6981.3, alpha=0.9379, B=248.05, beta=0.4171)
    truth = Truth(scratch={"en": law, "es": law}, cpt={"es": CPTLaw(B=228.45, beta=0.4185, gamma=0.0)}, repetition=Repetition(R_D=3.42), param_count="nonembedding",
                  name="repeat-study scale")
    truth.dump(tmp_path / "truth.json")
    raw = yaml.safe_load((ROOT / "workflow/studies/en-es-repeat.yaml").read_text())
    raw.update(results_dir=str(tmp_path / "results"), study="sim-repeat", simulate={"truth": str(tmp_path / "truth.json")})
    raw["train"]["backend"] = "simulate"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(raw))
    _snakemake(config, timeout=1800)
    fits = tmp_path / "results" / "sim-repeat" / "fits"
    rec = json.loads((fits / "scratch-constrained-es.json").read_text())
    assert rec["status"] == "ok" and rec["identifiability"]["identified"], rec["identifiability"]
    iv = rec["intervals"]
    for k, v in (("R_D", 3.42), ("alpha", law.alpha), ("beta", law.beta)):
        assert iv[k]["lo"] <= v <= iv[k]["hi"], (k, iv[k])
    assert rec["params"]["U"] == 560000 // 3 - raw["data"]["validation_tokens"]
    from cptscale.cli import main

    capsys.readouterr()
    assert main(["plan", str(config)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("scratch-constrained-es"))
    assert line.endswith("identifies the law") and "U = 1.667e+05" in line, line
