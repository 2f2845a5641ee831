"""The existing-model study kind end to end (slow): a tiny random LLaMA-style model built here with
``transformers`` (no hub), generated English and Chinese-like text, and the whole study through Snakemake on
CPU: import once, the model evaluated as given, the data stage with the model's own tokenizer, 4 target-token
budgets x 3 replay ratios of CPT from the imported model (each passing the init-sanity gate against the
transformers model's own loss), the store, the study kind's fit and the report, rendered in Chromium."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(SNAKEMAKE).exists(), reason="needs snakemake in the environment"),
    pytest.mark.timeout(2400),
]

BUDGETS = [2048, 4096, 8192, 16384]  # four: the largest is also held out
RATIOS = [0.0, 0.25, 0.5]


def _corpora(root: Path) -> None:
    """English-like sentences over 36 words, Chinese-like lines over 200 CJK characters (each line from a
    prefix of the set, so the text has structure a tiny model learns)."""
    rng = random.Random(0)
    text = "the a of and to in is was he she it that for on with as his her they at by this from king house river " \
           "light night city field stone bread water friend story word"
    words = text.split()
    with open(root / "en.txt", "w") as f:
        for _ in range(3000):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) + ".\n")
    chars = [chr(0x4E00 + i) for i in range(0, 600, 3)]
    with open(root / "zh.txt", "w", encoding="utf-8") as f:
        for _ in range(3000):
            f.write("".join(rng.choice(chars[:rng.randint(20, 200)]) for _ in range(rng.randint(10, 30))) + "。\n")


def _config(root: Path) -> Path:
    cfg = {
        "study": "existing-tiny", "results_dir": str(root / "results"), "seed": 3,
        "languages": {"source": "en", "targets": ["zh"]},
        "corpora": {lang: [{"name": "gen", "kind": "local", "paths": [str(root / f"{lang}.txt")], "split": "lines"}]
                    for lang in ("en", "zh")},
        "data": {"validation_tokens": 2000, "min_doc_chars": 16, "workers": 1},
        "source_model": {"path": "model", "target_tokens": BUDGETS, "max_forgetting": 0.5},
        "replay": {"ratios": RATIOS},
        "train": {"seq_length": 64, "micro_batch_size": 8, "batch_tokens": 512, "lr": 3.0e-3,
                  "warmup_fraction": 0.05, "checkpoint_every": 0},
        "evaluation": {"points": 3, "micro_batch_size": 16},
        "slurm": {"gpus": False},
    }
    path = root / "existing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_existing_model_study_end_to_end(tmp_path):
    from hf_helpers import make_hf_model

    make_hf_model(tmp_path / "model", "llama")
    _corpora(tmp_path)
    cfg = _config(tmp_path)
    t0 = time.perf_counter()
    out = subprocess.run([SNAKEMAKE, "--profile", "workflow/profiles/local", "--configfile", str(cfg), "--cores", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=2300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    wall = time.perf_counter() - t0
    print(f"existing-model study ({len(BUDGETS) * len(RATIOS)} CPT runs): {wall:.0f} s wall")
    assert out.returncode == 0, out.stderr[-4000:]
    check_study(tmp_path / "results" / "existing-tiny")


def check_study(study: Path) -> None:
    """What the finished tiny study must show (separate, so a finished study dir can be re-checked)."""
    from cptscale.existing import recommend
    from cptscale.existing_study import final_points
    from cptscale.report.existing import SECTIONS

    # the model as given: Megatron-Core's loss of the import equals the transformers model's (the gate's reference)
    ev = json.loads((study / "model" / "eval.json").read_text())
    assert ev["reference"]["by"] == "transformers" and abs(ev["reference"]["megatron_minus_transformers"]) <= 1e-4
    # every CPT run started from it: its step-0 English loss is the model's, within the gate's tolerance
    runs = sorted(p.parent.name for p in (study / "runs").glob("*/done.json"))
    assert len(runs) == len(BUDGETS) * len(RATIOS)
    for rid in runs:
        step0 = [json.loads(line) for line in (study / "runs" / rid / "evals.jsonl").read_text().splitlines()]
        en0 = next(e["loss"] for e in step0 if e["step"] == 0 and e["lang"] == "en")
        assert abs(en0 - ev["reference"]["loss"]) <= 1e-3, rid
        spec = json.loads((study / "runs" / rid / "run.json").read_text())
        assert spec["parent"]["checkpoint"] == str(study / "model" / "checkpoint") and spec["vocab_size"] == 320

    # the fit: one data law per ratio, the recommendation the store's final evaluations give
    fit = json.loads((study / "fits" / "existing.json").read_text())
    laws = [f for f in fit["fits"] if f["law"] == "data_law"]
    assert sorted(f["replay"] for f in laws) == RATIOS and all(f["status"] == "ok" for f in laws)
    assert all(f["heldout"]["D"] == max(p["D"] for p in f["points"]) for f in laws)  # the largest budget
    rec = fit["recommendation"]["zh"]
    pts = final_points(study / "cptscale.duckdb", "existing-tiny", "en", "zh")
    again = recommend(pts, fit["source_loss_before"], max_forgetting=0.5)
    assert rec["replay"] == again["replay"] and rec["replay"] in RATIOS
    print(f"answer: {rec['answer']}")
    print("frontier: " + "; ".join(f"r={r['replay']:g} target {r['target_loss']:.3f} forgetting {r['forgetting']:+.3f}"
                                  for r in rec["frontier"]))
    for f in laws:
        print(f"data law r={f['replay']:g}: E {f['params']['E']:.3f} B {f['params']['B']:.3g} "
              f"beta {f['params']['beta']:.3f}, on bound: {f['on_bound'] or 'none'}, held-out: {f['heldout']}")
    # fertility of the model's tokenizer per language
    fert = fit["fertility"]
    print("fertility: " + ", ".join(f"{k}: {v['tokens_per_word'] or float('nan'):.2f} tokens/word, "
                                    f"{v['tokens_per_char']:.3f} tokens/char" for k, v in fert.items()))
    assert fert["zh"]["tokens_per_char"] > fert["en"]["tokens_per_char"]  # 3 UTF-8 bytes per CJK char
    assert fert["en"]["tokens_per_word"] > 1 and fert["zh"]["tokens_per_word"] is None  # zh: no spaces between words

    # the report: this kind's sections only, the answer in the figure's title, rendered by Chromium
    info = json.loads((study / "report" / "report.json").read_text())
    assert info["sections"] == [s for s in info["sections"] if s in SECTIONS] and "existing" in info["drawn"]
    assert "existing" not in info["missing"]
    html = (study / "report" / "index.html").read_text()
    assert rec["answer"] in html
    summary = json.loads((study / "summary.json").read_text())
    assert summary["existing"]["answers"]["zh"] == rec["answer"]
    if os.path.exists("/usr/bin/chromium"):
        from test_report import render

        res = render(study / "report" / "index.html")
        st = res["status"]
        assert st and not st["errors"] and not st["requests"], res["stderr"][-2000:]
        assert st["rendered"].get("existing", 0) >= len(BUDGETS) * len(RATIOS)  # every run's point, and more
