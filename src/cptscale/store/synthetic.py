"""A synthetic study (run dirs with run.json, metrics and evals from a known law) for tests and benchmarks."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptscale.runspec import SPEC_VERSION, RunSpec
from cptscale.util import stable_hash

LR = 2e-4  #: peak learning rate of the generated runs (cosine to LR / 10)
_LAW = {"E": 1.55, "A": 420.0, "alpha": 0.40, "B": 719.5, "beta": 0.30}


def _law(n: float, d: float, e_shift: float = 0.0) -> float:
    return _LAW["E"] + e_shift + _LAW["A"] / n ** _LAW["alpha"] + _LAW["B"] / max(d, 1.0) ** _LAW["beta"]


@dataclass
class _Generator:
    """What every generated run shares: where it goes, the study's languages and sizes of runs, and the one
    random stream (drawn in a fixed order, so a seed gives the same files)."""

    sdir: Path
    study: str
    seed: int
    lang: str
    source_lang: str
    steps_per_run: int
    evals_per_run: int
    token_multiplier: float
    prov: dict[str, Any]
    rng: Any
    vocab: int = 32000
    seq: int = 2048

    def spec(self, size: str, init: str, run_lang: str, rep: float, parent: dict[str, Any] | None) -> RunSpec:
        """A run.json the trainer accepts (a RunSpec), with the numbers the synthetic losses use."""
        from cptscale.ladder import get_shape
        from cptscale.runs import run_id as make_run_id

        sh = get_shape(size)
        n = sh.params(self.vocab)
        steps, seq, source_lang = self.steps_per_run, self.seq, self.source_lang
        gbs = max(1, round(self.token_multiplier * n / steps / seq))
        rid = make_run_id(size, init, run_lang, rep if init == "cpt" else None)
        ev_steps = sorted({round(steps * i / (self.evals_per_run - 1)) for i in range(self.evals_per_run)})
        shares = {run_lang: 1.0 - rep, source_lang: rep} if init == "cpt" else {run_lang: 1.0}
        sources = [{"name": k, "prefix": f"data/{k}/train", "weight": v, "planned_samples": round(v * gbs * steps)}
                   for k, v in shares.items() if v > 0]
        return RunSpec.model_validate({
            "spec_version": SPEC_VERSION,
            "run_id": rid, "study": self.study, "size": size, "init": init, "lang": run_lang,
            "source_lang": source_lang if init == "cpt" else None, "replay": rep if init == "cpt" else 0.0,
            "shape": sh.as_dict(),
            "vocab_size": self.vocab, "seq_length": seq, "micro_batch_size": 1, "global_batch_size": gbs,
            "steps": steps, "seed": self.seed,
            "schedule": {"kind": "cosine", "max_lr": LR, "min_lr": LR / 10, "warmup_steps": round(0.05 * steps),
                         "total_steps": steps},
            "optimizer": {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0},
            "layout": {"tp": 1, "pp": 1, "dp": 1},
            "data": {"kind": "blend", "target": run_lang, "source": source_lang if init == "cpt" else run_lang,
                     "replay": rep if init == "cpt" else 0.0, "switch_steps": [],
                     "phases": [{"index": 0, "start_step": 0, "end_step": steps,
                                 "samples": gbs * steps, "sources": sources}]},
            "eval": {"steps": ev_steps, "languages": {self.lang: {"prefix": f"data/{self.lang}/valid"},
                                                     source_lang: {"prefix": f"data/{source_lang}/valid"}}},
            "checkpoint": {"dir": f"/nonexistent/checkpoints/{rid}"}, "parent": parent,
            "out_dir": str(self.sdir / "runs" / rid), "config_hash": self.prov["config_hash"], "provenance": self.prov,
            "params": n, "params_nonemb": sh.params(self.vocab, embeddings=False), "tokens": gbs * seq * steps,
        })

    def write_run(self, typed: RunSpec, loss_fn: Callable[[str, float, float], float]) -> dict[str, float]:
        """The run's directory as the trainer leaves it; returns its final loss per evaluated language."""
        spec = typed.to_dict()
        d = self.sdir / "runs" / spec["run_id"]
        d.mkdir(parents=True, exist_ok=True)
        typed.write(d / "run.json")
        self._write_metrics(d, spec, loss_fn)
        final = self._write_evals(d, spec, loss_fn)
        self._write_blend_and_done(d, spec, final)
        return final

    def _write_metrics(self, d: Path, spec: dict[str, Any], loss_fn: Callable[[str, float, float], float]) -> None:
        tps, steps = spec["global_batch_size"] * self.seq, spec["steps"]
        noise = self.rng.normal(0, 0.02, steps)
        gn = self.rng.lognormal(0, 0.2, steps)
        lines = []
        for k in range(1, steps + 1):
            f = k / steps
            lr = LR * min(1.0, f / 0.05) * 0.5 * (1 + math.cos(math.pi * f))
            loss = loss_fn(spec["lang"], k * tps, f) + noise[k - 1]
            lines.append(f'{{"step": {k}, "tokens": {k * tps}, "loss": {loss:.5f}, "lr": {lr:.4e}, '
                         f'"grad_norm": {gn[k - 1]:.4f}, "tokens_per_s": 50000.0, "mem_bytes": 1000000000, '
                         f'"mfu": 0.4}}\n')
        with open(d / "metrics.jsonl", "w") as fh:
            fh.writelines(lines)

    def _write_evals(self, d: Path, spec: dict[str, Any],
                     loss_fn: Callable[[str, float, float], float]) -> dict[str, float]:
        tps, steps = spec["global_batch_size"] * self.seq, spec["steps"]
        ev, final = [], {}
        for s in spec["eval"]["steps"]:
            for el in spec["eval"]["languages"]:
                lo = loss_fn(el, s * tps, s / steps) + float(self.rng.normal(0, 0.003))
                ev.append({"step": s, "tokens": s * tps, "lang": el, "loss": round(lo, 5),
                           "ppl": math.exp(lo), "bpb": lo / math.log(2) * 0.3, "n_tokens": 65536})
                final[el] = round(lo, 5)
        with open(d / "evals.jsonl", "w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in ev)
        return final

    def _write_blend_and_done(self, d: Path, spec: dict[str, Any], final: dict[str, float]) -> None:
        from cptscale.util import write_json

        steps = spec["steps"]
        src = {x["name"]: x["weight"] for x in spec["data"]["phases"][0]["sources"]}
        total = steps * spec["global_batch_size"]
        write_json(d / "blend.json", {"phases": [{"index": 0, "start_step": 0, "end_step": steps, "sources": [
            {"name": k, "planned_share": v, "realized_share": round(v + float(self.rng.normal(0, 0.002)), 5),
             "samples": int(total * v), "tokens": int(total * v * self.seq), "available_tokens": 10**11, "epochs": 0.1}
            for k, v in src.items() if v > 0]}], "warnings": []})
        write_json(d / "done.json", {"run_id": spec["run_id"], "steps": steps, "tokens": steps * spec["global_batch_size"] * self.seq,
                                     "final_loss": final, "final_checkpoint": f"{spec['checkpoint']['dir']}/final",
                                     "wall_s": 1.0, "params": spec["params"],
                                     "params_nonemb": spec["params_nonemb"], "resumed_from": None})


def _scratch_loss(g: _Generator, n: float, run_lang: str, e_shift: float) -> Callable[[str, float, float], float]:
    """A scratch run's loss in each language: the law in its own language (``e_shift`` above E), 2 nats worse
    in the other."""
    def loss(el: str, d: float, f: float) -> float:
        return math.log(g.vocab) if d == 0 else _law(n, d, e_shift if el == run_lang else 2.0)

    return loss


def _cpt_loss(g: _Generator, n: float, rep: float, sfin: float) -> Callable[[str, float, float], float]:
    """A CPT run's loss: the source language rises from its parent's final loss (less with more replay), the
    target follows the law with the effective-data bonus on its target tokens."""
    def loss(el: str, d: float, f: float) -> float:
        if el == g.source_lang:
            rise = 1.3 * (1 - math.exp(-8 * f)) * math.exp(-30 * rep * f)
            return sfin + rise - 0.05 * rep * f
        dt = d * (1 - rep)
        return min(_law(n, dt + 0.5 * max(dt, 1e6) ** 0.8 * n**0.25), math.log(g.vocab) - 1.0)

    return loss


def generate_study(study_dir: str | os.PathLike[str], sizes: Sequence[str] | int = ("d64l2", "d128l4"),
                   inits: Sequence[str] = ("scratch", "cpt"), replays: Sequence[float] = (0.0, 0.25),
                   steps_per_run: int = 50, seed: int = 0, *, lang: str = "zh", source_lang: str = "en",
                   evals_per_run: int = 10, study: str | None = None, token_multiplier: float = 20.0) -> list[str]:
    """Write a synthetic but realistic study tree; returns the run ids.

    Losses follow the paper's scratch Chinchilla fit (E=1.55, A=420, α=0.40, B=719.5, β=0.30) with N the
    parameter count and D the tokens; CPT runs see an effective-data bonus D_T = 0.5·D^0.8·N^0.25 on
    their target tokens D·(1-replay) (~40% saved, growing with N, shrinking with D, as in the paper); source-language loss during CPT rises by up
    to 1.3 nats without replay and recovers faster the more is replayed. ``sizes`` are ladder names or
    an int (the first n paper sizes). Every file follows the formats of the real stages.
    """
    import numpy as np

    from cptscale.ladder import PAPER_SHAPES, get_shape

    sdir = Path(study_dir)
    study = study or sdir.name
    names = list(PAPER_SHAPES)[: int(sizes)] if isinstance(sizes, int) else list(sizes)
    chash = stable_hash({"study": study, "seed": seed})
    prov = {"git_commit": "0" * 40, "git_dirty": False, "packages": {"cptscale": "0.1.0"}, "config_hash": chash,
            "input_hashes": {f"data/{lang}": "a" * 16, f"data/{source_lang}": "b" * 16}}
    g = _Generator(sdir, study, seed, lang, source_lang, steps_per_run, evals_per_run, token_multiplier, prov,
                   np.random.default_rng(seed))
    expected: list[RunSpec] = []
    for size in names:
        n = get_shape(size).params(g.vocab)
        if "scratch" in inits:
            expected.append(g.spec(size, "scratch", lang, 0.0, None))
            g.write_run(expected[-1], _scratch_loss(g, n, lang, 0.0))
        if "cpt" in inits:
            src = g.spec(size, "scratch", source_lang, 0.0, None)
            src_final = g.write_run(src, _scratch_loss(g, n, source_lang, -0.15))
            expected.append(src)
            for rep in replays:
                parent = {"run_id": src.run_id, "checkpoint": f"/nonexistent/checkpoints/{src.run_id}/final",
                          "lang": source_lang, "final_loss": src_final[source_lang], "tolerance": 0.05}
                expected.append(g.spec(size, "cpt", lang, float(rep), parent))
                g.write_run(expected[-1], _cpt_loss(g, n, float(rep), src_final[source_lang]))
    _write_study_files(sdir, study, seed, lang, source_lang, g.vocab, prov, expected)
    return [s.run_id for s in expected]


def _write_study_files(sdir: Path, study: str, seed: int, lang: str, source_lang: str, vocab: int,
                       prov: dict[str, Any], expected: list[RunSpec]) -> None:
    """The study-level files of a generated study: data manifests, tokenizer report and study.json."""
    from cptscale.util import write_json

    chash = prov["config_hash"]
    for el, tpb in ((lang, 0.45), (source_lang, 0.27)):
        write_json(sdir / "data" / el / "data.json", {
            "lang": el, "train": {"docs": 1000, "tokens": 10**9, "bytes": int(10**9 / tpb), "chars": int(4e9)},
            "valid": {"docs": 100, "tokens": 10**6, "bytes": int(10**6 / tpb)}, "vocab_size": vocab,
            "fertility": {"tokens_per_byte": tpb, "tokens_per_char": tpb * 3 if el == lang else tpb * 1.1},
            "tokenizer_hash": "c" * 16, "docs_hash": "d" * 16, "provenance": prov})
    write_json(sdir / "tokenizer" / "report.json", {"vocab_size": vocab, "fertility": {lang: {}, source_lang: {}}})
    write_json(sdir / "study.json", {
        "study": study, "config_hash": chash, "config": {"study": study, "generated": True, "seed": seed},
        "expected_runs": [{"run_id": s.run_id, "size": s.size, "init": s.init, "lang": s.lang, "replay": s.replay,
                           "parent": s.parent.run_id if s.parent else None, "params": s.params,
                           "tokens": s.tokens, "steps": s.steps} for s in expected],
        "provenance": prov})


def write_generated_transfers(study_dir: str | os.PathLike[str]) -> int:
    """Run :func:`cptscale.transfer.compute_transfer` for every CPT run of a (generated) study."""
    from cptscale.transfer import compute_transfer
    from cptscale.util import write_json

    n = 0
    runs = Path(study_dir) / "runs"
    for p in sorted(runs.glob("*/run.json")):
        spec = RunSpec.load(p)
        if spec.init != "cpt" or spec.parent is None:
            continue
        scratch = runs / f"{spec.size}-scratch-{spec.lang}"
        source = runs / str(spec.parent.run_id)
        if scratch.exists():
            write_json(p.parent / "transfer.json", compute_transfer(p.parent, scratch, source))
            n += 1
    return n
