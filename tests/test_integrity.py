"""Checksummed checkpoints and datasets: what is read back is what was written, or a clear error naming
the file (real Megatron-Core checkpoints, real data-stage datasets)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from train_helpers import make_data, make_spec, read_jsonl, run_until_sigterm, write_spec

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def data(root):
    return make_data(root / "data")


@pytest.fixture(scope="module")
def run(root, data):
    """A finished 12-step run (checkpoints step_10, step_12, final), trained through the CLI."""
    from cptscale.cli import main

    spec = make_spec(root, data, run_id="whole", steps=12, every=5)
    path = write_spec(root, spec)
    assert main(["train", "--spec", str(path)]) == 0
    return {"spec": spec, "path": path, "ckpt": Path(spec["checkpoint"]["dir"])}


def flip_middle(path: Path, n: int = 2000) -> None:
    """Invert ``n`` bytes in the middle of a file (size unchanged: only a content digest sees it)."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2 - n // 2
    raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
    path.write_bytes(bytes(raw))


def copy_ckpt(run, name: str, dest: Path) -> Path:
    shutil.copytree(run["ckpt"] / name, dest)
    return dest


def test_every_checkpoint_has_a_manifest_of_all_its_files(run):
    from cptscale.integrity import MANIFEST, file_digest

    for name in ("step_10", "step_12", "final"):
        ck = run["ckpt"] / name
        m = json.loads((ck / MANIFEST).read_text())
        on_disk = {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()} - {MANIFEST, "verified.json"}
        assert set(m["files"]) == on_disk and "state.json" in on_disk and any("distcp" in f for f in on_disk)
        for rel, entry in m["files"].items():
            assert entry == {"size": (ck / rel).stat().st_size, "xxh3_128": file_digest(ck / rel)}


def test_evaluate_refuses_a_flipped_shard_naming_file_and_checkpoint(root, run, capsys):
    """The issue's case: 2,000 bytes flipped in the middle of final's model/__0_0.distcp."""
    from cptscale.cli import main

    bad = copy_ckpt(run, "final", root / "flipped" / "final")
    flip_middle(bad / "model" / "__0_0.distcp")
    capsys.readouterr()
    assert main(["evaluate", str(bad), "--spec", str(run["path"]), "--lang", "en"]) == 2
    err = capsys.readouterr().err
    assert "model/__0_0.distcp" in err and str(bad) in err and "damaged" in err, err
    assert main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "model/__0_0.distcp" in out
    # the untouched original evaluates and verifies
    assert main(["verify", str(run["ckpt"] / "final")]) == 0
    assert main(["evaluate", str(run["ckpt"] / "final"), "--spec", str(run["path"]), "--lang", "en"]) == 0


def test_missing_or_truncated_file_is_named(root, run):
    from cptscale.train.checkpoint import CheckpointError, load_weights, verify_checkpoint

    gone = copy_ckpt(run, "step_12", root / "gone" / "step_12")
    (gone / "rank00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rank00000\.pt is missing"):
        verify_checkpoint(gone)
    short = copy_ckpt(run, "final", root / "short" / "final")
    shard = next((short / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{shard.name} has 100 bytes"):
        load_weights(short, model=None)  # refused before any model is touched


def test_verify_a_whole_study_dir_exits_nonzero_on_damage(root, run, capsys):
    from cptscale.cli import main

    study = root / "study"
    shutil.copytree(run["ckpt"], study / "checkpoints" / "whole")
    assert main(["verify", str(study)]) == 0
    assert capsys.readouterr().out.count("ok ") == 3
    state = study / "checkpoints" / "whole" / "step_10" / "state.json"
    state.write_text(state.read_text().replace('"step": 10', '"step": 11'))
    assert main(["verify", str(study)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "step_10" in out and "state.json" in out


def test_checkpoint_without_manifest_is_accepted_with_one_warning(root, run, capsys):
    from cptscale.integrity import MANIFEST
    from cptscale.train.checkpoint import read_state, verify_checkpoint

    old = copy_ckpt(run, "final", root / "legacy" / "final")
    (old / MANIFEST).unlink()
    capsys.readouterr()
    assert verify_checkpoint(old) is False
    assert verify_checkpoint(old) is False
    assert read_state(old)["step"] == 12
    err = capsys.readouterr().err
    assert err.count("has no manifest.json") == 1, err


def test_cpt_init_refuses_a_damaged_parent(root, data, run, capsys):
    from cptscale.train.launch import run_spec

    done = json.loads((Path(run["spec"]["out_dir"]) / "done.json").read_text())
    bad = copy_ckpt(run, "final", root / "bad-parent" / "final")
    flip_middle(next((bad / "model").glob("*.distcp")), n=8)  # far below what the init gate would notice
    par = {"run_id": "whole", "checkpoint": str(bad), "lang": "en", "final_loss": done["final_loss"]["en"],
           "tolerance": 1e-3}
    spec = make_spec(root, data, run_id="cpt-from-bad", lang="zh", init="cpt", parent=par, steps=4)
    capsys.readouterr()
    assert run_spec(spec) == 3
    err = capsys.readouterr().err
    assert f"checkpoint {bad} is damaged" in err and ".distcp" in err
    assert not (Path(spec["out_dir"]) / "done.json").exists()


def test_resume_falls_back_to_newest_intact_checkpoint_and_curve_is_exact(root, data, run, capsys):
    """Killed after step 7 (checkpoints step_5, step_7); step_7's optimizer state then damaged: the re-run
    sets it aside, says so, resumes from step_5 and ends on exactly the uninterrupted curve."""
    from cptscale.train.launch import run_spec

    spec = make_spec(root, data, run_id="fallback", steps=12, every=5)
    run_until_sigterm(spec, 7)
    ck = Path(spec["checkpoint"]["dir"])
    assert sorted(p.name for p in ck.iterdir()) == ["step_5", "step_7"]
    flip_middle(next((ck / "step_7" / "optimizer").glob("*.distcp")), n=64)
    capsys.readouterr()
    assert run_spec(spec) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "step_7 is damaged" in out and "falling back to the newest intact checkpoint" in out
    assert (ck / "damaged-step_7").is_dir()
    done = json.loads((Path(spec["out_dir"]) / "done.json").read_text())
    assert done["resumed_from"] == 5
    straight = [m["loss"] for m in read_jsonl(Path(run["spec"]["out_dir"]) / "metrics.jsonl")]
    resumed = [m["loss"] for m in read_jsonl(Path(spec["out_dir"]) / "metrics.jsonl")]
    assert resumed == straight


def test_rotation_keeps_an_intact_verified_checkpoint(root, run):
    """Rotation never leaves only damaged checkpoints: a damaged newest verified one is kept (for
    inspection) along with the next older intact verified one."""
    from cptscale.train.checkpoint import _rotate

    d = root / "rot"
    for name in ("step_10", "step_12"):
        copy_ckpt(run, name, d / name)
    shutil.copytree(d / "step_10", d / "step_11")
    st = d / "step_11" / "state.json"
    flip_middle(d / "step_11" / "rank00000.pt", n=16)
    (d / "step_12" / "verified.json").unlink()  # newest, not yet verified
    assert (d / "step_11" / "verified.json").exists() and st.exists()
    _rotate(d, keep=1)
    assert sorted(p.name for p in d.iterdir()) == ["step_10", "step_11", "step_12"]
    shutil.rmtree(d / "step_11")
    _rotate(d, keep=1)
    assert sorted(p.name for p in d.iterdir()) == ["step_10", "step_12"]


def test_disk_full_save_keeps_previous_checkpoint(root, data, capsys):
    """A checkpoint save on a full disk (a real tmpfs mounted for the test, or, where mounting is not
    allowed, the same save with the disk-full error raised by the file system write call) fails with a
    clear message, removes its partial dir and leaves the previous checkpoint intact and resumable."""
    import subprocess

    from cptscale.train.checkpoint import verify_checkpoint
    from cptscale.train.launch import run_spec

    mnt = root / "tiny-fs"
    mnt.mkdir()
    spec = make_spec(root, data, run_id="full-disk", steps=8, every=2, eval_steps=[])
    spec["checkpoint"]["dir"] = str(mnt / "ckpt")
    probe = root / "probe"
    probe.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(probe)],
                             capture_output=True).returncode == 0
    if mounted:
        subprocess.run(["umount", str(probe)], check=True)
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (not root / no CAP_SYS_ADMIN); the injected-writer variant covers it")
    # measure one checkpoint, then size the file system to hold about two and a half
    one = make_spec(root, data, run_id="measure", steps=2, every=0, eval_steps=[])
    assert run_spec(one) == 0
    size = sum(p.stat().st_size for p in (Path(one["checkpoint"]["dir"]) / "step_2").rglob("*") if p.is_file())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 2.5) // 4096 * 4096}", "tmpfs", str(mnt)],
                   check=True)
    try:
        capsys.readouterr()
        rc = run_spec(spec)
        assert rc == 1
        err = capsys.readouterr().err
        assert "no space left on device while writing checkpoint step_" in err and "intact" in err, err
        ck = mnt / "ckpt"
        left = sorted(p.name for p in ck.iterdir())
        assert not [n for n in left if n.startswith(".")], left  # no partial temp dir left behind
        steps = [p for p in ck.iterdir() if p.name.startswith("step_")]
        assert steps and all(verify_checkpoint(p) for p in steps)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- datasets ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """One language through the real data stage: ingest, tokenizer, index (train/valid + data.json)."""
    from cptscale.data.indexed import prepare
    from cptscale.data.ingest import ingest
    from cptscale.data.sources import parse_sources
    from cptscale.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("indexed")
    r = random.Random(3)
    words = ["".join(r.choice("etaoinshrdlu") for _ in range(r.randint(1, 7))) for _ in range(800)]
    corpus = root / "en.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} " + " ".join(r.choices(words, k=r.randint(30, 150)))})
                              + "\n" for i in range(400)))
    data = root / "data"
    ingest("en", parse_sources([{"name": "gen", "kind": "local", "paths": [str(corpus)], "format": "jsonl"}]),
           data / "en" / "docs.parquet", progress=False)
    tok = root / "tok" / "tokenizer.json"
    train_tokenizer([data / "en" / "docs.parquet"], tok, vocab_size=400, sample_chars_per_language=40_000,
                    valid_tokens=3000, progress=False)
    prepare("en", data / "en" / "docs.parquet", tok, 3000, data / "en", workers=1, progress=False)
    return data / "en"


def _data_spec(root: Path, d: Path) -> dict:
    spec = make_spec(root, {"en": {"train": str(d / "train"), "valid": str(d / "valid"), "bytes": 1}}, run_id="ds")
    return spec


def test_datasets_are_checked_before_training(root, indexed, tmp_path, capsys):
    from cptscale.cli import main
    from cptscale.integrity import check_run_datasets
    from cptscale.train.launch import run_spec

    d = tmp_path / "data" / "en"
    shutil.copytree(indexed, d)
    spec = _data_spec(root, d)
    assert check_run_datasets(spec) == 2 and check_run_datasets(spec, full=True) == 2
    m = json.loads((d / "data.json").read_text())
    assert m["train"]["bin_size"] == (d / "train.bin").stat().st_size
    # a flip inside a sampled block (the first): the fast check at start refuses, naming file and target
    raw = bytearray((d / "train.bin").read_bytes())
    raw[10] ^= 0xFF
    (d / "train.bin").write_bytes(bytes(raw))
    capsys.readouterr()
    assert run_spec(spec) == 3
    err = capsys.readouterr().err
    assert f"{d / 'train.bin'}" in err and f"-f {d / 'data.json'}" in err and "rule `index`" in err, err
    assert main(["verify", str(tmp_path)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    # a truncated .idx: the size says so
    raw[10] ^= 0xFF
    (d / "train.bin").write_bytes(bytes(raw))
    (d / "valid.idx").write_bytes((d / "valid.idx").read_bytes()[:-4])
    with pytest.raises(Exception, match=r"valid\.idx has \d+ bytes"):
        check_run_datasets(spec)


def test_sample_fingerprint_sees_size_and_sampled_blocks_only(tmp_path):
    """The fast check reads ~1 MiB of a large file: it sees a truncation and a change in a sampled block;
    a flip between samples needs the full hash (what `cptscale verify` computes)."""
    from cptscale.integrity import (
        SAMPLE_BLOCK,
        SAMPLE_BLOCKS,
        file_digest,
        sample_fingerprint,
        sample_offsets,
    )

    path = tmp_path / "big.bin"
    raw = bytearray(random.Random(0).randbytes(3 * SAMPLE_BLOCKS * SAMPLE_BLOCK + 123))
    path.write_bytes(bytes(raw))
    fp, full = sample_fingerprint(path), file_digest(path)
    offsets = sample_offsets(len(raw))
    assert len(offsets) == SAMPLE_BLOCKS and offsets[0] == 0 and offsets[-1] == len(raw) - SAMPLE_BLOCK

    def changed(at: int) -> tuple[bool, bool]:
        raw[at] ^= 0xFF
        path.write_bytes(bytes(raw))
        out = sample_fingerprint(path) != fp, file_digest(path) != full
        raw[at] ^= 0xFF
        return out

    assert changed(offsets[5] + 7) == (True, True)
    assert changed(offsets[5] + SAMPLE_BLOCK + 7) == (False, True)
    path.write_bytes(bytes(raw[:-1]))
    assert sample_fingerprint(path)["size"] == len(raw) - 1


def _mount_tmpfs(path: Path, size: str) -> bool:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(fs: Path) -> None:
    """Fill a file system to the last byte."""
    with open(fs / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError:
            pass
        try:
            while True:
                fh.write(b"\0")
                fh.flush()
        except OSError:
            pass


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_disk_full_ingest_db_and_report_keep_previous_outputs(tmp_path, capsys):
    """On a real tmpfs filled to the last byte: `cptscale data ingest`, `db ingest` and `report` fail with
    a clear message, leave no partial file, and keep the previous outputs byte for byte."""
    import subprocess

    from faults import table_hashes

    from cptscale.cli import main

    fs = tmp_path / "fs"
    if not _mount_tmpfs(fs, "96m"):
        pytest.skip("cannot mount a tmpfs here (not root / no CAP_SYS_ADMIN)")
    try:
        corpus = tmp_path / "en.jsonl"
        r = random.Random(1)
        corpus.write_text("".join(json.dumps({"text": f"{i} " + " ".join(str(r.random()) for _ in range(40))}) + "\n"
                                  for i in range(300)))
        sources = tmp_path / "sources.json"
        sources.write_text(json.dumps([{"name": "gen", "kind": "local", "paths": [str(corpus)], "format": "jsonl"}]))
        study = tmp_path / "study"
        assert main(["db", "generate", "--study-dir", str(study), "--sizes", "3", "--seed", "1"]) == 0
        name = json.loads((study / "study.json").read_text())["study"]
        docs, db, report = fs / "docs.parquet", fs / "store.duckdb", fs / "report"
        assert main(["data", "ingest", "--lang", "en", "--sources-json", str(sources), "--out", str(docs),
                     "--no-progress"]) == 0
        assert main(["db", "ingest", "--study-dir", str(study), "--db", str(db)]) == 0
        assert main(["report", "--db", str(db), "--study", name, "--out-dir", str(report)]) == 0
        before = {"docs": docs.read_bytes(), "report": _tree_bytes(report), "db": table_hashes(db)}
        assert any(p.startswith("figures/") for p in before["report"])  # the page and its figures
        listing = sorted(p.name for p in fs.rglob("*"))

        corpus.write_text(corpus.read_text() * 2)  # new inputs: each command has something new to write
        shutil.rmtree(study)
        assert main(["db", "generate", "--study-dir", str(study), "--sizes", "4", "--seed", "2"]) == 0
        _fill(fs)
        capsys.readouterr()
        figure_bytes = sum(len(b) for p, b in before["report"].items() if p.startswith("figures/"))
        for argv in (["data", "ingest", "--lang", "en", "--sources-json", str(sources), "--out", str(docs),
                      "--no-progress"],
                     ["db", "ingest", "--study-dir", str(study), "--db", str(db)],
                     ["report", "--db", str(db), "--study", name, "--out-dir", str(report)]):
            if argv[0] == "report":  # room for about half the figures: the disk fills in the middle of them
                filler = fs / "filler"
                os.truncate(filler, filler.stat().st_size - figure_bytes // 2)
            assert main(argv) == 1, argv
            err = capsys.readouterr().err
            assert "no space left on device" in err and "previous outputs are intact" in err, (argv, err)
        (fs / "filler").unlink()
        assert docs.read_bytes() == before["docs"]
        assert _tree_bytes(report) == before["report"]  # page and figures: all old, none half-new
        assert table_hashes(db) == before["db"]
        assert sorted(p.name for p in fs.rglob("*")) == listing  # no temp file left behind
    finally:
        subprocess.run(["umount", str(fs)], check=False)


def test_store_records_saved_and_resumed_from_checkpoints(root, data, run):
    """The store's checkpoint rows of real runs: every complete step_N the trainer kept ("saved"), and
    the checkpoint a resumed run started from, with its step."""
    import duckdb

    from cptscale.store.ingest import ingest
    from cptscale.train.launch import run_spec

    resumed = make_spec(root, data, run_id="resumed", steps=12, every=5)
    rdone = Path(resumed["out_dir"]) / "done.json"

    run_until_sigterm(resumed, 7)
    assert run_spec(resumed) == 0 and json.loads(rdone.read_text())["resumed_from"] == 7
    study = root / "store-study"
    for spec in (run["spec"], resumed):
        shutil.copytree(spec["out_dir"], study / "runs" / spec["run_id"])
        (study / "runs" / spec["run_id"] / "run.json").write_text(json.dumps(spec))
    db = root / "bookkeeping.duckdb"
    ingest(study, db)
    con = duckdb.connect(str(db), read_only=True)
    rows = set(con.execute("select run_id, kind, step, path from checkpoints").fetchall())
    con.close()
    ck = Path(resumed["checkpoint"]["dir"])
    assert ("resumed", "resumed_from", 7, str(ck / "step_7")) in rows
    assert {(r, k, s) for r, k, s, _ in rows if k == "saved"} == {
        ("whole", "saved", 10), ("whole", "saved", 12), ("resumed", "saved", 10), ("resumed", "saved", 12)}
    assert all(p == str(Path(run["spec"]["checkpoint"]["dir"]) / f"step_{s}")
               for r, k, s, p in rows if k == "saved" and r == "whole")


def test_permanent_failure_is_not_retried(root, data, run, capsys):
    """A damaged parent checkpoint: attempt 1 exits 3 and records why; Snakemake's retries (attempt 2, 3)
    exit 3 at once naming it; a new workflow run (attempt 1) tries again. The train rule passes the attempt."""
    import subprocess
    import sys
    import time

    from cptscale.cli import main

    done = json.loads((Path(run["spec"]["out_dir"]) / "done.json").read_text())
    bad = copy_ckpt(run, "final", root / "bad-parent-retry" / "final")
    flip_middle(next((bad / "model").glob("*.distcp")), n=8)
    par = {"run_id": "whole", "checkpoint": str(bad), "lang": "en", "final_loss": done["final_loss"]["en"],
           "tolerance": 1e-3}
    spec = make_spec(root, data, run_id="cpt-retry", lang="zh", init="cpt", parent=par, steps=4)
    Path(spec["out_dir"]).mkdir(parents=True)  # the workflow's run dir (run.json lives there)
    path = write_spec(root, spec)
    capsys.readouterr()
    assert main(["train", "--spec", str(path)]) == 3
    rec = json.loads((Path(spec["out_dir"]) / "failed.json").read_text())
    assert rec["exit"] == 3 and "is damaged" in rec["error"]
    t0 = time.perf_counter()
    assert main(["train", "--spec", str(path), "--attempt", "2"]) == 3
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "not retried (attempt 2)" in err and "is damaged" in err
    shutil.rmtree(bad)
    copy_ckpt(run, "final", bad)  # the cause fixed; the next workflow run starts at attempt 1 again
    assert main(["train", "--spec", str(path), "--attempt", "1"]) == 0
    assert not (Path(spec["out_dir"]) / "failed.json").exists()
    # the workflow passes Snakemake's attempt number to every training job
    root_dir = Path(__file__).resolve().parents[1]
    smk = Path(sys.executable).with_name("snakemake")
    if not smk.exists():
        pytest.skip("no snakemake")
    from faults import fault_config

    cfg = fault_config(root / "dry")
    out = subprocess.run([str(smk), "-s", str(root_dir / "Snakefile"), "--configfile", str(cfg), "-n", "-p",
                          "--cores", "1"], cwd=root / "dry", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cptscale train --spec" in out.stdout and "--attempt 1" in out.stdout
