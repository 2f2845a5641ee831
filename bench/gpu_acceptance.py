"""GPU acceptance: the GPU code path (Transformer Engine spec, bf16, distributed optimizer, NCCL, TP
resharding, the workflow on GPUs) checked in one run, each check pass/fail with its figure.

``bench/gpu_acceptance.sh`` (no arguments) sets a bare GPU machine up and runs this; by hand::

    PYTHONPATH=src python bench/gpu_acceptance.py --out results/gpu-acceptance [--only throughput,optimizer]

Checks (each in its own process, with its own time limit, inside one overall budget):

* ``throughput``: a ~1B paper shape (``992M``: d=1536, 25 layers) in bf16 with the TE layer spec (the
  local spec when Transformer Engine is missing, said so), the engine's DDP + distributed optimizer +
  clipping step: tokens/s, MFU (formula and peak printed; pass at >= 45 %), peak memory, for the
  trainer's default, the same unfused (the ratio) and micro-batch 8 (:data:`THROUGHPUT_VARIANTS`), and
  a kernel profile of two default steps (time by kernel kind);
* ``optimizer``: the distributed optimizer against Megatron's plain mixed-precision optimizer from the
  same weights (same losses), and Megatron's gradient clipping (the grad norm it reports equals the
  norm of the reduced gradients; after clipping the main gradients have norm ``clip``);
* ``nccl_resume``: under torchrun on min(2, GPUs) ranks: NCCL all-reduce / all-gather /
  reduce-scatter / broadcast give exact results (and the all-reduce bus bandwidth), then a tiny engine
  run stopped by SIGTERM after step 7 resumes to the same losses as an uninterrupted run;
* ``reshard_tp2``: a checkpoint saved at TP=1 loads at TP=2 (the CPT init gate compares the step-0
  loss with the parent's final loss); skipped with one GPU, saying why;
* ``workflow``: a 50-step tiny CPT run (and its source run) through the real Snakefile with the local
  profile and ``slurm.gpus: true`` (GPU resources, ``--resources gpu=<GPUs>``), on generated local
  corpora (no network needed).

Without a GPU, ``--detect`` says so and the runner writes a ``no_gpu`` result. ``--cpu`` runs the
same checks on the CPU with tiny shapes (a dry run of this script's code, not an acceptance).
This module imports only the standard library at the top, so the no-GPU path needs no setup.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
STATUSES = ("pass", "fail", "skip", "error")
CHECKS = ("throughput", "optimizer", "nccl_resume", "reshard_tp2", "workflow")
#: seconds each check may take (its process is killed after that); the runner also stops starting
#: checks when the overall budget is spent
TIMEOUTS = {"throughput": 240, "optimizer": 90, "nccl_resume": 150, "reshard_tp2": 150, "workflow": 300}
#: --cpu dry runs (a loaded 2-core machine) get this many times the GPU time limits
CPU_SLOWDOWN = 5
#: the whole script must end within 8 minutes; setup (venv, wheels) gets what this leaves
DEFAULT_BUDGET_S = 420
MFU_TARGET = 0.45
#: dense bf16 peak FLOP/s per GPU by device-name fragment (vendor datasheets, without sparsity); the
#: first fragment found in the device name wins, so the more specific names come first
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("B200", 2250e12), ("B100", 1750e12),
)
PAPER_VOCAB = 32000
MFU_FORMULA = ("MFU = tokens/s x (6 N' + 12 L H Q S) / (GPUs x peak); N' = non-embedding parameters + "
               "output layer, L layers, H heads of size Q, S sequence length (Megatron-LM / PaLM app. B)")


# ------------------------------------------------------------------------------------------------
# bookkeeping: results, the JSON and the table
@dataclass
class CheckResult:
    name: str
    status: str  #: pass | fail | skip | error (error: the check itself broke: crash, time limit)
    figure: str  #: the one-line figure the table shows
    detail: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: status {self.status!r} is not one of {STATUSES}")


@dataclass
class Report:
    device: dict[str, Any]
    te: dict[str, Any] = field(default_factory=dict)
    results: list[CheckResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False  #: --cpu: the checks ran on the CPU (tests this script, accepts nothing)

    def add(self, result: CheckResult) -> CheckResult:
        if any(r.name == result.name for r in self.results):
            raise ValueError(f"check {result.name} recorded twice")
        self.results.append(result)
        return result

    @property
    def status(self) -> str:
        """``pass`` when no check failed or broke and at least one passed, else ``fail``; ``no_gpu``
        without a GPU (nothing was accepted); a CPU dry run is ``dry_run_pass`` / ``dry_run_fail``."""
        if not self.device.get("gpus") and not self.dry_run:
            return "no_gpu"
        bad = [r for r in self.results if r.status in ("fail", "error")]
        ok = "pass" if not bad and any(r.status == "pass" for r in self.results) else "fail"
        return f"dry_run_{ok}" if self.dry_run else ok

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in STATUSES}

    def as_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "status": self.status, "counts": self.counts(), "device": self.device,
                "transformer_engine": self.te, "checks": [asdict(r) for r in self.results],
                "mfu_formula": MFU_FORMULA, "notes": self.notes, "started": self.started,
                "seconds": round(time.time() - self.started, 1)}

    def table(self) -> str:
        rows = [("check", "status", "seconds", "figure")]
        rows.append(("device", "info", "", describe_device(self.device)))
        if self.te:
            rows.append(("transformer_engine", "info", "", self.te.get("summary", "")))
        for r in self.results:
            rows.append((r.name, r.status.upper() if r.status in ("fail", "error") else r.status,
                         f"{r.seconds:.0f}", r.figure))
        c = self.counts()
        rows.append(("overall", self.status.upper() if self.status != "pass" else "pass", "",
                     f"{c['pass']} pass, {c['fail']} fail, {c['error']} error, {c['skip']} skip"))
        w = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {s:>{w[2]}}  {f}" for a, b, s, f in rows]
        lines.insert(1, "-" * max(len(x) for x in lines))
        lines += ["", MFU_FORMULA, *self.notes]
        return "\n".join(lines)


def write_report(report: Report, out_dir: Path) -> Path:
    """``gpu_acceptance.json`` in ``out_dir``, written atomically (temp file + rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_acceptance.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report.as_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# device detection (standard library first: a machine without a GPU needs no setup to be told so)
def detect_device(use_torch: bool = True) -> dict[str, Any]:
    """GPUs seen by the driver (``nvidia-smi``) and, when ``use_torch``, by torch; ``gpus`` is 0 with a
    ``reason`` when there is none."""
    dev: dict[str, Any] = {"gpus": 0}
    smi = shutil.which("nvidia-smi")
    if smi is None and not Path("/proc/driver/nvidia").exists() and not Path("/dev/nvidia0").exists():
        dev["reason"] = "no NVIDIA driver on this machine (no nvidia-smi, /proc/driver/nvidia or /dev/nvidia0)"
        return dev
    if smi is not None:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            rows = [r.split(", ") for r in out.stdout.strip().splitlines() if r.strip()] if out.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            rows = []
        if rows:
            dev.update(gpus=len(rows), name=rows[0][0], memory=rows[0][1] if len(rows[0]) > 1 else None,
                       driver=rows[0][2] if len(rows[0]) > 2 else None)
    if use_torch:
        try:
            import torch
        except ImportError as exc:
            dev.setdefault("reason", f"torch is not importable: {exc}")
            dev["gpus"] = 0
            return dev
        dev["torch"] = torch.__version__
        dev["cuda"] = torch.version.cuda
        if not torch.cuda.is_available():
            dev["gpus"] = 0
            dev["reason"] = (f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})"
                             + (f"; the driver lists {dev.get('name')}" if dev.get("name") else ""))
            return dev
        dev["gpus"] = torch.cuda.device_count()
        dev["name"] = torch.cuda.get_device_name(0)
        dev["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
        dev["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if not dev["gpus"]:
        dev["reason"] = "the NVIDIA driver lists no GPU"
    return dev


def describe_device(dev: dict[str, Any]) -> str:
    if not dev.get("gpus"):
        return f"none: {dev.get('reason', 'no GPU found')}"
    parts = [f"{dev['gpus']}x {dev.get('name', '?')}"]
    if dev.get("capability"):
        parts.append(dev["capability"])
    if dev.get("memory_gib"):
        parts.append(f"{dev['memory_gib']} GiB")
    if dev.get("torch"):
        parts.append(f"torch {dev['torch']} (CUDA {dev.get('cuda')})")
    if dev.get("peak_flops"):
        parts.append(f"peak {dev['peak_flops'] / 1e12:.0f} TFLOP/s bf16 ({dev.get('peak_source')})")
    return ", ".join(parts)


def peak_flops(name: str | None, override: str | None = None) -> tuple[float, str]:
    """Dense bf16 peak per GPU for MFU and where it comes from: ``CPTSCALE_GPU_PEAK_FLOPS`` (override),
    else the datasheet value for the device name, else the H100 SXM value (said so)."""
    if override:
        return float(override), "CPTSCALE_GPU_PEAK_FLOPS"
    for frag, value in PEAK_BF16:
        if name and frag.lower() in name.lower():
            return value, f"datasheet {frag} bf16 dense"
    return 989e12, f"unknown device {name!r}: H100 SXM bf16 dense assumed"


# ------------------------------------------------------------------------------------------------
# the runner
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_acceptance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "gpu-acceptance",
                    help="directory for gpu_acceptance.json, logs and work files")
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks (default all: {','.join(CHECKS)})")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds for all checks together; checks that would start later are skipped")
    ap.add_argument("--size", default="992M", help="ladder size of the throughput check (paper shapes: 992M, 1085M)")
    ap.add_argument("--te-status", default="", help="what setup found for Transformer Engine (set by the .sh)")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU with tiny shapes (tests this script)")
    ap.add_argument("--detect", action="store_true", help="print the device detection and exit (3: no GPU)")
    ap.add_argument("--no-gpu", metavar="REASON", default=None,
                    help="record that the machine has no GPU (the .sh, before any setup) and exit 3")
    ap.add_argument("--worker", choices=CHECKS, help=argparse.SUPPRESS)  # one check, in its own process
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--peak", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=("collectives", "stop_at_7"), help=argparse.SUPPRESS)  # under torchrun
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    only = [c.strip() for c in a.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CHECKS]
    if unknown:
        ap.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if not only:
        ap.error("--only: no check named")
    a.only = only
    a.out = a.out.resolve()  # the study config's corpus paths are resolved against its own folder
    if a.budget_s <= 0:
        ap.error("--budget-s must be positive")
    if a.worker and not a.result:
        ap.error("--worker needs --result")
    return a


def te_info(status: str) -> dict[str, Any]:
    """Transformer Engine as setup left it: importable or not, and what the .sh said about installing it."""
    info: dict[str, Any] = {"setup": status}
    try:
        import transformer_engine as te

        info.update(available=True, version=getattr(te, "__version__", "?"))
        info["summary"] = f"Transformer Engine {info['version']}: TE layer spec" + (f" ({status})" if status else "")
    except Exception as exc:  # ImportError, or a broken build raising at import
        info.update(available=False, error=f"{type(exc).__name__}: {exc}"[:300])
        info["summary"] = "not available: local layer spec" + (f" ({status})" if status else f" ({info['error']})")
    return info


def _python_cmd(script_args: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *script_args]


def _torchrun_cmd(nproc: int, script_args: list[str], entry: list[str] | None = None) -> list[str]:
    """torchrun (one node) of this script with ``script_args``, or of ``entry`` (e.g. ``-m module``)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    head = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*head, "--standalone", f"--nproc-per-node={nproc}", *(entry or [str(Path(__file__).resolve())]),
            *script_args]


def run_check(name: str, cmd: list[str], timeout: float, work: Path) -> CheckResult:
    """Run one check's process; its rank 0 writes the result JSON. A crash or a time limit is an
    ``error`` result with the end of its log."""
    result_path = work / f"{name}.result.json"
    log_path = work / f"{name}.log"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*cmd, "--result", str(result_path)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    dt = time.time() - t0
    tail = log_path.read_text(errors="replace")[-2000:]
    if result_path.exists():
        d = json.loads(result_path.read_text())
        if rc not in (0, None):
            d.setdefault("detail", {})["exit_status"] = rc
        return CheckResult(name, d["status"], d["figure"], d.get("detail", {}), round(dt, 1))
    why = f"time limit of {timeout:.0f} s" if rc is None else f"exit status {rc}"
    return CheckResult(name, "error", f"{why}, no result (log: {log_path})", {"log_tail": tail}, round(dt, 1))


def check_command(name: str, a: argparse.Namespace, device: dict[str, Any]) -> list[str]:
    """The process that runs one check (torchrun for the collectives, else one Python process)."""
    args = ["--worker", name, "--size", a.size, "--out", str(a.out)]
    if a.cpu:
        args.append("--cpu")
    if device.get("peak_flops"):
        args += ["--peak", str(device["peak_flops"])]
    return _python_cmd(args)


def skip_reason(name: str, a: argparse.Namespace, device: dict[str, Any]) -> str | None:
    if name == "reshard_tp2" and not a.cpu and int(device.get("gpus") or 0) < 2:
        return f"needs 2 GPUs for TP=2, this machine has {device.get('gpus', 0)}"
    return None


def run_all(a: argparse.Namespace) -> Report:
    device = detect_device(use_torch=True)
    if a.cpu:
        device = {**device, "mode": "cpu dry run (not an acceptance)"}
    elif device.get("gpus"):
        device["peak_flops"], device["peak_source"] = peak_flops(device.get("name"),
                                                                  os.environ.get("CPTSCALE_GPU_PEAK_FLOPS"))
    report = Report(device=device, te=te_info(a.te_status), dry_run=a.cpu)
    if a.cpu:
        report.notes.append("CPU dry run: tiny shapes, fp32, gloo; the figures say nothing about a GPU")
    if not a.cpu and not device.get("gpus"):
        return report
    work = a.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + a.budget_s
    for name in a.only:
        why = skip_reason(name, a, device)
        if why:
            report.add(CheckResult(name, "skip", why))
            continue
        left = deadline - time.time()
        if left < 20:
            report.add(CheckResult(name, "skip", f"time budget spent ({a.budget_s:.0f} s for all checks)"))
            continue
        cmd = check_command(name, a, device)
        limit = min(TIMEOUTS[name] * (CPU_SLOWDOWN if a.cpu else 1), left)
        print(f"[gpu-acceptance] {name} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
        res = report.add(run_check(name, cmd, limit, work))
        print(f"[gpu-acceptance] {name}: {res.status} {res.figure}", file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker:
        return run_worker(a)
    if a.no_gpu is not None:
        report = Report(device={"gpus": 0, "reason": a.no_gpu}, te={})
        report.notes.append("no GPU: nothing was checked")
        path = write_report(report, a.out)
        print(report.table())
        print(f"\nresult: {path}")
        return 3
    if a.detect:
        dev = detect_device()
        print(describe_device(dev))
        return 0 if dev.get("gpus") else 3
    report = run_all(a)
    path = write_report(report, a.out)
    print(report.table())
    print(f"\nresult: {path}")
    if report.status == "no_gpu":
        return 3
    return 0 if report.status in ("pass", "dry_run_pass") else 1


# ------------------------------------------------------------------------------------------------
# the checks (each runs in its own process: heavy imports only here)
def run_worker(a: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    fn = PARTS[a.part] if a.part else WORKERS[a.worker]
    out = fn(a)
    if out is not None:  # rank 0 (or the only process) reports
        tmp = a.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, default=float))
        os.replace(tmp, a.result)
    return 0


def _random_batches(vocab: int, seq: int, mbs: int, n: int, seed: int = 0):
    import torch

    from cptscale.train.engine import collate

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        toks = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        out.append(collate([{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq),
                             "position_ids": torch.arange(seq)} for t in toks]))
    return out


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _engine_step(model, opt, batches, seq: int, mbs: int) -> tuple[float, float | None]:
    """One optimizer step exactly as the trainer takes it: forward/backward over the micro-batches,
    DDP grad sync, Megatron optimizer step (clipping + AdamW). Returns (loss, grad norm)."""
    from cptscale.train.engine import run_microbatches

    model.zero_grad_buffer()
    opt.zero_grad()
    lsum, lcnt = run_microbatches(model, batches, seq, mbs, forward_only=False)
    model.finish_grad_sync()
    ok, gnorm, _ = opt.step()
    if not ok:
        raise RuntimeError("the optimizer step failed (non-finite gradients)")
    return lsum / lcnt, (float(gnorm) if gnorm is not None else None)


#: the throughput check's configurations, measured one after the other in one process: the trainer's
#: GPU default first (element-wise fusions on where torch.compile works), then the same without them
#: (the baseline of the ratio), then the default at micro-batch 8 (same tokens per step, half the
#: micro-batches: half the fp32 gradient accumulations). Pass/fail is on the best one, named.
THROUGHPUT_VARIANTS: tuple[tuple[str, bool | None, int, int], ...] = (
    ("default", None, 4, 4), ("unfused", False, 4, 4), ("default mbs 8", None, 8, 2))


def w_throughput(a: argparse.Namespace) -> dict[str, Any]:
    import gc

    import torch

    from cptscale.ladder import get_shape
    from cptscale.train.engine import setup_parallel
    from cptscale.train.meter import mfu_flops_per_token
    from cptscale.train.model import _has_te

    gpu = torch.cuda.is_available() and not a.cpu
    size, seq = (a.size, 2048) if gpu else ("d64l2", 64)
    shape = get_shape(size).as_dict()
    vocab = PAPER_VOCAB if gpu else 1024
    peak = a.peak or 989e12
    setup_parallel(1, 1, 0)
    te = gpu and _has_te()
    variants: list[dict[str, Any]] = []
    for i, (name, fused, mbs, n_micro) in enumerate(THROUGHPUT_VARIANTS):
        if not gpu:
            mbs = max(1, mbs // 2)
        try:
            v = _measure_throughput(shape, vocab, seq, mbs, n_micro, fused, te, gpu, peak, profile=gpu and i == 0)
        except Exception as e:  # one configuration failing (out of memory, a compiler error) is a finding
            v = {"error": f"{type(e).__name__}: {str(e)[:300]}", "micro_batch": mbs, "micro_batches": n_micro}
        variants.append({"name": name, **v})
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    ok = [v for v in variants if "error" not in v]
    spec = "TE" if te else "local spec"
    prec = "bf16" if gpu else "fp32"
    if not ok:
        return {"status": "error", "figure": f"{size} {prec} {spec}: every configuration failed: {variants[0]['error']}",
                "detail": {"variants": variants}}
    best = max(ok, key=lambda v: v["mfu"])
    first = variants[0]
    base = next((v for v in ok if v["name"] == "unfused"), None)
    prof = {k: first.pop(k) for k in [k for k in first if k.startswith("profile")]}
    detail = {**{k: v for k, v in best.items() if k != "losses"}, "size": size, "shape": shape, "vocab": vocab,
              "seq": seq, "peak_flops": peak,
              "flops_per_token": mfu_flops_per_token(shape, vocab, seq), "mfu_target": MFU_TARGET,
              "layer_spec": "transformer_engine" if te else "local", "precision": prec,
              "distributed_optimizer": gpu, "best_variant": best["name"], "variants": variants,
              "profiled_variant": first["name"] if prof else None, **prof}
    fig = (f"{size} {prec} {spec}, {best['name']} ({best['micro_batches']}x{best['micro_batch']}, fusions "
           f"{'on' if best['fused'] else 'off'}): {best['tokens_per_s']:,.0f} tokens/s, MFU {best['mfu']:.1%} of "
           f"{peak / 1e12:.0f} TFLOP/s" + (f", {best['peak_mem_gib']:.1f} GiB peak" if gpu else ""))
    if gpu and base is not None and "error" not in first and first is not base:  # on CPU both are unfused
        fig += f"; default/unfused {first['tokens_per_s'] / base['tokens_per_s']:.3f}"
    if "error" in first:
        fig += f"; the default configuration failed: {first['error'][:120]}"
    if not all(v["finite"] for v in ok):
        return {"status": "fail", "figure": fig + ", non-finite loss", "detail": detail}
    if not gpu:
        return {"status": "pass", "figure": fig + " (CPU dry run)", "detail": detail}
    return {"status": "pass" if best["mfu"] >= MFU_TARGET else "fail",
            "figure": fig + ("" if best["mfu"] >= MFU_TARGET else f" < {MFU_TARGET:.0%} target (profile in JSON)"),
            "detail": detail}


def _measure_throughput(shape: dict[str, Any], vocab: int, seq: int, mbs: int, n_micro: int, fused: bool | None,
                        te: bool, gpu: bool, peak: float, profile: bool) -> dict[str, Any]:
    """Build the model (fresh, same seed) with the engine's DDP + distributed optimizer + clipping, take
    warm-up steps, then time steps: tokens/s, MFU, peak memory (and a profile of two more steps)."""
    import math

    import torch

    from cptscale.train.engine import build_optimizer, wrap_ddp
    from cptscale.train.meter import mfu
    from cptscale.train.model import build_model, count_params

    warm, steps = (3, 8) if gpu else (1, 3)
    torch.manual_seed(0)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    model = build_model(shape, vocab, seq, bf16=gpu, te=te, fused=fused)
    fused_on = bool(model.config.bias_activation_fusion)
    n_params = count_params(model)
    model = wrap_ddp(model, distributed_optimizer=gpu)
    opt = build_optimizer(model, {"weight_decay": 0.1, "grad_clip": 1.0}, 1e-4, bf16=gpu, distributed_optimizer=gpu)
    batches = _random_batches(vocab, seq, mbs, n_micro)
    t_warm = time.perf_counter()
    losses = [_engine_step(model, opt, batches, seq, mbs)[0] for _ in range(warm)]
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(_engine_step(model, opt, batches, seq, mbs)[0])
    _sync()
    dt = time.perf_counter() - t0
    tps = steps * n_micro * mbs * seq / dt
    out = {"fused": fused_on, "params": n_params, "micro_batch": mbs, "micro_batches": n_micro,
           "tokens_per_step": n_micro * mbs * seq, "timed_steps": steps, "warmup_s": t0 - t_warm, "seconds": dt,
           "tokens_per_s": tps, "mfu": mfu(shape, vocab, seq, tps, 1, peak),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
           "finite": all(math.isfinite(x) for x in losses), "losses": losses}
    if profile:
        out.update(_profile(lambda: _engine_step(model, opt, batches, seq, mbs), gpu))
    return out  # the model and optimizer go with this frame, before the next configuration is built


#: kernel-name fragments -> where the time goes (first match wins; the rest is "other")
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
    ("attention", ("attention", "fmha", "flash", "cudnn", "sdpa")),
    ("compiled (Triton)", ("triton",)),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "copy", "cat", "fill")),
    ("reduction / norm", ("reduce", "norm", "softmax", "cross_entropy", "nll")),
    ("memcpy / memset", ("memcpy", "memset")),
)


def _kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, frags in KERNEL_KINDS if any(f in low for f in frags)), "other")


def _profile(step, gpu: bool, top: int = 16) -> dict[str, Any]:
    """Two steps under torch.profiler: the kernels that take the most device time with their share of
    the summed kernel time, that time by kind (:data:`KERNEL_KINDS`), and summed kernel seconds against
    wall seconds (the gap is time the GPU waited for the host)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    _sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        _sync()
    wall = time.perf_counter() - t0
    del torch
    # device-side kernels only (operator rows would count their kernels a second time)
    kernels = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0
               and not e.key.startswith(("aten::", "autograd::", "c10d::", "nccl:", "ProfilerStep"))
               and "Backward" not in e.key and "Function" not in e.key]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    kinds: dict[str, float] = {}
    for e in kernels:
        kinds[_kernel_kind(e.key)] = kinds.get(_kernel_kind(e.key), 0.0) + e.self_device_time_total / total
    rows = [{"name": e.key[:120], "kind": _kernel_kind(e.key), "device_ms": e.self_device_time_total / 1e3,
             "share": e.self_device_time_total / total, "calls": e.count} for e in kernels[:top]]
    return {"profile_top": rows, "profile_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "profile_kernel_s": total / 1e6 if kernels else 0.0, "profile_wall_s": wall}


def _grad_buffer_norm(model) -> float:
    """Norm of the reduced gradients in DDP's buffers (what the optimizer clips), computed here."""
    sq = 0.0
    for p in model.parameters():
        g = getattr(p, "main_grad", None)
        if g is not None:
            sq += float(g.double().pow(2).sum())
    return sq ** 0.5


def _main_grad_norm(opt) -> float:
    """Norm of the optimizer's main (fp32) gradients, after its step clipped them."""
    from cptscale.train.checkpoint import optimizer_parts

    sq = 0.0
    for o in optimizer_parts(opt):
        # Megatron-Core 0.16 names it get_main_grads_for_grad_norm, 0.19 get_grads_for_grad_norm
        grads = getattr(o, "get_grads_for_grad_norm", None) or o.get_main_grads_for_grad_norm
        for g in grads():
            sq += float(g.double().pow(2).sum())
    return sq ** 0.5


def w_optimizer(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cptscale.ladder import get_shape
    from cptscale.train.engine import (
        build_optimizer,
        run_microbatches,
        setup_parallel,
        teardown_parallel,
        wrap_ddp,
    )
    from cptscale.train.model import build_model

    gpu = torch.cuda.is_available() and not a.cpu
    size, seq, mbs, vocab, steps = ("d512l4", 512, 4, PAPER_VOCAB, 5) if gpu else ("d32l2", 32, 2, 256, 3)
    shape = get_shape(size).as_dict()
    clip = 0.05  # below the gradient norm of a fresh model, so every step clips
    batches = _random_batches(vocab, seq, mbs, 2, seed=1)
    runs: dict[str, dict[str, list[float]]] = {}
    # the distributed optimizer is the GPU path; on the CPU dry run both are the plain one
    variants = (("distributed", gpu), ("plain", False))
    for label, dist_opt in variants:
        setup_parallel(1, 1, 0)  # re-seeds: both variants start from the same weights
        try:
            model = wrap_ddp(build_model(shape, vocab, seq, bf16=gpu), distributed_optimizer=dist_opt)
            opt = build_optimizer(model, {"grad_clip": clip, "weight_decay": 0.1}, 1e-3, bf16=gpu,
                                  distributed_optimizer=dist_opt)
            rec: dict[str, list[float]] = {"loss": [], "reported": [], "buffer": [], "clipped": []}
            for _ in range(steps):
                model.zero_grad_buffer()
                opt.zero_grad()
                lsum, lcnt = run_microbatches(model, batches, seq, mbs, forward_only=False)
                model.finish_grad_sync()
                rec["buffer"].append(_grad_buffer_norm(model))
                ok, gnorm, _ = opt.step()
                if not ok:
                    raise RuntimeError(f"{label} optimizer: step failed (non-finite gradients)")
                rec["loss"].append(lsum / lcnt)
                rec["reported"].append(float(gnorm))
                rec["clipped"].append(_main_grad_norm(opt))
            runs[label] = rec
        finally:
            teardown_parallel()
    d = runs["distributed"]
    norm_err = max(abs(r - b) / b for r, b in zip(d["reported"], d["buffer"], strict=True))
    clip_err = max(abs(c - min(clip, b)) / min(clip, b) for c, b in zip(d["clipped"], d["buffer"], strict=True))
    loss_diff = max(abs(x - y) / abs(y) for x, y in zip(d["loss"], runs["plain"]["loss"], strict=True))
    falls = d["loss"][-1] < d["loss"][0]
    ok = norm_err <= 1e-3 and clip_err <= 1e-3 and loss_diff <= 1e-3 and falls
    fig = (f"{'distributed' if gpu else 'plain (CPU)'} optimizer: grad norm vs buffers {norm_err:.1e}, clipped "
           f"norm vs clip={clip:g} {clip_err:.1e}, loss vs plain optimizer {loss_diff:.1e} (rel., bounds 1e-3), "
           f"loss {d['loss'][0]:.3f} -> {d['loss'][-1]:.3f}")
    return {"status": "pass" if ok else "fail", "figure": fig,
            "detail": {"size": size, "clip": clip, "runs": runs, "grad_norm_rel_err": norm_err,
                       "clip_rel_err": clip_err, "loss_rel_diff": loss_diff, "precision": "bf16" if gpu else "fp32"}}


def _tiny_data(root: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from train_helpers import make_data

    return make_data(root)


def w_nccl_resume(a: argparse.Namespace) -> dict[str, Any]:
    """Collectives, then exact resume, each in its own torchrun launch on min(2, GPUs) ranks (a fresh
    process group per launch, as in production: one launch per job attempt)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from train_helpers import make_spec, read_jsonl, write_spec

    gpu = not a.cpu
    import torch

    world = 2 if a.cpu else max(1, min(2, torch.cuda.device_count()))
    root = a.out / "work" / "resume"
    shutil.rmtree(root, ignore_errors=True)
    log = root / "launches.log"
    root.mkdir(parents=True)
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"} if gpu else {}

    coll_path = root / "collectives.json"
    part = ["--worker", "nccl_resume", "--part", "collectives", "--result", str(coll_path), "--out", str(a.out)]
    rc = _launch(_torchrun_cmd(world, part + (["--cpu"] if a.cpu else [])), log, env)
    coll = json.loads(coll_path.read_text()) if coll_path.exists() else {"wrong": [f"launch exit {rc}"]}

    data = _tiny_data(root / "data")
    kw = {"steps": 12, "every": 5, "dp": world, "gb": 4 * world, "eval_steps": [0, 12]}
    straight = write_spec(root, make_spec(root, data, run_id="straight", **kw))
    killed = write_spec(root, make_spec(root, data, run_id="killed", **kw))
    entry = ["-m", "cptscale.train.launch", "--spec"]
    rcs = {"straight": _launch(_torchrun_cmd(world, [str(straight)], entry), log, env)}
    stop = ["--worker", "nccl_resume", "--part", "stop_at_7", "--spec", str(killed), "--result", str(root / "x"),
            "--out", str(a.out)]
    rcs["stopped"] = _launch(_torchrun_cmd(world, stop), log, env)
    rcs["resumed"] = _launch(_torchrun_cmd(world, [str(killed)], entry), log, env)
    out_s, out_k = root / "runs" / "straight", root / "runs" / "killed"
    la = [m["loss"] for m in read_jsonl(out_s / "metrics.jsonl")] if (out_s / "metrics.jsonl").exists() else []
    lb = [m["loss"] for m in read_jsonl(out_k / "metrics.jsonl")] if (out_k / "metrics.jsonl").exists() else []
    done = json.loads((out_k / "done.json").read_text()) if (out_k / "done.json").exists() else {}
    diff = max(abs(x - y) for x, y in zip(la, lb, strict=True)) if len(la) == len(lb) == 12 else float("inf")
    resumed = done.get("resumed_from")
    # the stopped launch exits non-zero (a rank exits 143; torchrun then reports the group failed)
    ok = (not coll.get("wrong") and rcs["straight"] == 0 and rcs["stopped"] != 0 and rcs["resumed"] == 0
          and resumed == 7 and diff <= 1e-6)
    backend = coll.get("backend", "nccl" if gpu else "gloo")
    busbw = coll.get("allreduce_busbw_gb_s")
    fig = (f"{backend} world {world}: collectives {'exact' if not coll.get('wrong') else 'WRONG: ' + ', '.join(coll['wrong'])}"
           + (f", all-reduce bus {busbw:.0f} GB/s" if busbw else "")
           + f"; SIGTERM after step 7 (exit {rcs['stopped']}), resumed from step {resumed}: max loss diff "
             f"{diff:.1e} over 12 steps (bound 1e-6)")
    return {"status": "pass" if ok else "fail", "figure": fig,
            "detail": {**coll, "world": world, "exit_status": rcs, "resumed_from": resumed, "max_loss_diff": diff,
                       "losses_straight": la, "losses_resumed": lb, "log": str(log)}}


def _launch(cmd: list[str], log: Path, env_extra: dict[str, str]) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1", **env_extra)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def p_collectives(a: argparse.Namespace) -> dict[str, Any] | None:
    """Under torchrun: all-reduce, all-gather, reduce-scatter (NCCL only: gloo has none) and broadcast
    on known values must be exact; the all-reduce bus bandwidth of 128 MiB of bf16 (2+ GPUs)."""
    import torch
    import torch.distributed as dist

    gpu = torch.cuda.is_available() and not a.cpu
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if gpu else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    wrong = []
    x = torch.arange(1024, dtype=torch.float32, device=dev) + rank
    dist.all_reduce(x)
    if not torch.equal(x, torch.arange(1024, dtype=torch.float32, device=dev) * world + world * (world - 1) / 2):
        wrong.append("all_reduce")
    parts = [torch.empty(4, device=dev) for _ in range(world)]
    dist.all_gather(parts, torch.full((4,), float(rank), device=dev))
    if not all(torch.equal(p, torch.full((4,), float(r), device=dev)) for r, p in enumerate(parts)):
        wrong.append("all_gather")
    if gpu:
        full = torch.arange(4 * world, dtype=torch.float32, device=dev)
        mine = torch.empty(4, device=dev)
        dist.reduce_scatter_tensor(mine, full)
        if not torch.equal(mine, full[4 * rank: 4 * rank + 4] * world):
            wrong.append("reduce_scatter")
    b = torch.full((8,), float(rank + 7), device=dev)
    dist.broadcast(b, src=0)
    if not torch.equal(b, torch.full((8,), 7.0, device=dev)):
        wrong.append("broadcast")
    busbw = None
    if gpu and world > 1:
        big = torch.ones(64 * 2**20, dtype=torch.bfloat16, device=dev)  # 128 MiB
        for _ in range(3):
            dist.all_reduce(big)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(big)
        torch.cuda.synchronize()
        busbw = big.numel() * 2 * 2 * (world - 1) / world / ((time.perf_counter() - t0) / 10) / 1e9
    flags = torch.tensor([len(wrong)], device=dev)
    dist.all_reduce(flags)
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"backend": backend, "world": world, "wrong": wrong, "wrong_on_any_rank": int(flags.item()),
            "allreduce_busbw_gb_s": busbw}


def p_stop_at_7(a: argparse.Namespace) -> None:
    """Under torchrun: the engine run of ``--spec``, every rank signalling itself SIGTERM after step 7
    (as a time limit would): the engine saves a checkpoint and the launch exits 143."""
    from cptscale.runspec import RunSpec
    from cptscale.train.engine import Terminated, Trainer, teardown_parallel

    tr = Trainer(RunSpec.load(a.spec).to_dict())
    tr.on_step = lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 7 else None
    try:
        tr.run()
    except Terminated:
        raise SystemExit(143) from None
    finally:
        teardown_parallel()
    raise SystemExit("the SIGTERM after step 7 did not stop the run")


def _cli(args: list[str], log: Path, env_extra: dict[str, str] | None = None, timeout: float = 300) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               **(env_extra or {}))
    with open(log, "a") as fh:
        return subprocess.run([sys.executable, "-m", "cptscale.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT, timeout=timeout).returncode


def w_reshard_tp2(a: argparse.Namespace) -> dict[str, Any]:
    """A parent trained at TP=1 (one process), its final dist-checkpoint loaded by a CPT run at TP=2
    (torchrun, 2 ranks): the init gate compares the TP=2 step-0 loss with the parent's final loss."""
    sys.path.insert(0, str(ROOT / "tests"))
    from train_helpers import make_spec, read_jsonl, write_spec

    root = a.out / "work" / "reshard"
    shutil.rmtree(root, ignore_errors=True)
    data = _tiny_data(root / "data")
    gpu = not a.cpu
    tol = 1e-2 if gpu else 1e-5  # bf16 at another TP degree (other reduction order) vs fp32
    parent = make_spec(root, data, run_id="parent-tp1", steps=8, tp=1, eval_steps=[8], hidden=64, heads=4)
    log = root / "reshard.log"
    if _cli(["train", "--spec", str(write_spec(root, parent))], log) != 0:
        return {"status": "fail", "figure": f"the TP=1 parent run failed (log: {log})", "detail": {}}
    pdone = json.loads((Path(parent["out_dir"]) / "done.json").read_text())
    par = {"run_id": "parent-tp1", "checkpoint": pdone["final_checkpoint"], "lang": "en",
           "final_loss": pdone["final_loss"]["en"], "tolerance": tol}
    child = make_spec(root, data, run_id="cpt-tp2", lang="zh", init="cpt", parent=par, steps=2, tp=2,
                      eval_steps=[0], every=0, hidden=64, heads=4)
    rc = _cli(["train", "--spec", str(write_spec(root, child))], log)
    ev = [e for e in read_jsonl(Path(child["out_dir"]) / "evals.jsonl") if e["step"] == 0 and e["lang"] == "en"] \
        if (Path(child["out_dir"]) / "evals.jsonl").exists() else []
    diff = abs(ev[0]["loss"] - par["final_loss"]) if ev else None
    ok = rc == 0 and diff is not None and diff <= tol
    fig = (f"TP=1 checkpoint at TP=2: |step-0 loss - parent final loss| = "
           f"{'n/a' if diff is None else f'{diff:.1e}'} (gate {tol:g}), CPT run exit {rc}")
    return {"status": "pass" if ok else "fail", "figure": fig,
            "detail": {"loss_diff": diff, "tolerance": tol, "exit_status": rc, "log": str(log)}}


def workflow_study(work: Path, gpus: bool, steps: int = 50) -> dict[str, Any]:
    """A tiny EN -> ZH study on generated local corpora whose CPT run (and its source run) takes
    ``steps`` optimizer steps; ``slurm.gpus`` as given (the GPU resource semantics)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic_corpus import make_corpus

    corp = work / "corpora"
    corp.mkdir(parents=True, exist_ok=True)
    for lang, seed in (("en", 1), ("zh", 2)):
        path = corp / f"{lang}.jsonl"
        if not path.exists():
            make_corpus(path, 1.5, seed=seed, short=False)
    size, batch_tokens = "d64l2", 2048
    return {
        "study": "gpu-accept", "results_dir": str(work / "results"), "seed": 3,
        "languages": {"source": "en", "targets": ["zh"]},
        "corpora": {lang: [{"name": f"gen-{lang}", "kind": "local", "paths": [str(corp / f"{lang}.jsonl")],
                            "format": "jsonl"}] for lang in ("en", "zh")},
        "data": {"validation_tokens": 4000, "min_doc_chars": 16, "workers": 2},
        "tokenizer": {"kind": "train", "vocab_size": 1024, "sample_chars_per_language": 200000},
        "ladder": {"sizes": [size]},
        "budget": {"tokens": {size: steps * batch_tokens}},
        "replay": {"ratios": [0.25]},
        "train": {"seq_length": 128, "micro_batch_size": 8, "batch_tokens": batch_tokens, "lr": 3e-3,
                  "warmup_fraction": 0.05, "checkpoint_every": 25},
        "evaluation": {"points": 3, "micro_batch_size": 16},
        "slurm": {"gpus": gpus, "gpus_per_node": 8, "cpus_per_gpu": 4, "mem_gb_per_gpu": 16},
    }


def w_workflow(a: argparse.Namespace) -> dict[str, Any]:
    import yaml

    gpu = not a.cpu
    work = a.out / "work" / "workflow"
    shutil.rmtree(work / "results", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cfg = workflow_study(work, gpus=gpu)
    cfg_path = work / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = "d64l2-cpt-zh-r0.25"
    sdir = work / "results" / "gpu-accept"
    target = sdir / "runs" / run / "done.json"
    snakemake = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    import torch

    ngpu = torch.cuda.device_count() if gpu else 0
    # greedy scheduler: the ILP one needs PuLP, which the offline wheelhouse leaves out (17 MB of solver)
    cmd = [snakemake, str(target), "--profile", "workflow/profiles/local", "--configfile", str(cfg_path),
           "--cores", str(os.cpu_count() or 2), "--scheduler", "greedy"]
    if gpu:
        cmd += ["--resources", f"gpu={ngpu}"]
    log = work / "snakemake.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                            timeout=TIMEOUTS["workflow"] * (CPU_SLOWDOWN if a.cpu else 1) - 10).returncode
    dt = time.time() - t0
    if rc != 0 or not target.exists():
        return {"status": "fail", "figure": f"snakemake exit {rc} after {dt:.0f} s (log: {log})",
                "detail": {"log_tail": log.read_text(errors="replace")[-3000:]}}
    done = json.loads(target.read_text())
    metrics = [json.loads(x) for x in (sdir / "runs" / run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    on_gpu = all(m.get("mfu") is not None for m in metrics)
    ok = done["steps"] == 50 and len(metrics) == 50 and (on_gpu or not gpu)
    tps = sorted(m["tokens_per_s"] for m in metrics)[len(metrics) // 2]
    fig = (f"snakemake (local profile, slurm.gpus: {str(gpu).lower()}) {run}: {done['steps']} steps, final zh loss "
           f"{done['final_loss'].get('zh', float('nan')):.3f}, {'on GPU' if on_gpu else 'on CPU'}, median "
           f"{tps:,.0f} tokens/s, whole workflow {dt:.0f} s")
    return {"status": "pass" if ok else "fail", "figure": fig,
            "detail": {"steps": done["steps"], "final_loss": done["final_loss"], "on_gpu": on_gpu, "seconds": dt,
                       "median_tokens_per_s": tps, "log": str(log)}}


PARTS = {"collectives": p_collectives, "stop_at_7": p_stop_at_7}
WORKERS = {"throughput": w_throughput, "optimizer": w_optimizer, "nccl_resume": w_nccl_resume,
           "reshard_tp2": w_reshard_tp2, "workflow": w_workflow}


if __name__ == "__main__":
    sys.exit(main())
