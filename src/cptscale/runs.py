"""What a run of a study is, whatever recipe trains it: the planned run (size, tokens, steps, batch, layout,
FLOPs, resources), its id, the batch layout of a size, the job's resources, its evaluation steps and where
its files live. Recipes (:mod:`cptscale.recipes`) decide *which* runs a study has and *how* each is
trained; this module is below all of them (OLMo-core's model ladder: what a size is vs how it is trained).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptscale.cluster import node_layout
from cptscale.compute import flops_6nd
from cptscale.config.schema import StudyConfig
from cptscale.throughput import MARGIN, Calibration, study_calibration, time_limit_minutes

RUN_ID = re.compile(
    r"^(?P<size>[A-Za-z0-9.]+)-(?P<init>scratch|cpt)-(?P<lang>[a-z]{2})"
    r"(?:-r(?P<replay>[0-9]+(?:\.[0-9]+)?))?(?:-(?P<variant>[a-z][a-z0-9]*))?$"
)


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    size: str
    init: str  # scratch | cpt
    lang: str  # training (target) language
    source_lang: str | None  # CPT: language of the parent model
    replay: float
    variant: str | None  # CPT recipe variant (config `variants`), None = the study's recipe
    parent: str | None  # CPT: run id of the source model
    params: int
    params_nonemb: int
    tokens: int
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    grad_accum: int
    steps: int
    tp: int
    pp: int
    dp: int
    flops_6nd: float
    gpus: int  #: GPUs requested in all (0 on CPU-only clusters), tp*pp*dp
    cpus: int  #: CPU cores requested per node (one launcher task per node)
    runtime_minutes: int  #: time limit of attempt 1 (retries multiply it by the attempt number)
    mem_gb: int  #: memory per node
    arm: str | None = None  #: IPLT arm (cptscale.iplt); None for the study's ordinary runs
    nodes: int = 1  #: nodes the run spans (cptscale.cluster.node_layout); one torchrun agent on each

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_id(size: str, init: str, lang: str, replay: float | None = None, variant: str | None = None) -> str:
    if init == "cpt":
        return f"{size}-cpt-{lang}-r{replay:g}" + (f"-{variant}" if variant else "")
    return f"{size}-scratch-{lang}" + (f"-{variant}" if variant else "")  # variant: IPLT arms only


def batch_layout(cfg: StudyConfig, size: str) -> tuple[int, int]:
    """(global batch in sequences, gradient accumulation), rounded to what micro-batch x DP allows."""
    layout = cfg.layout(size)
    per_step = cfg.train.micro_batch_size * layout.dp
    target = cfg.batch_tokens(size) / cfg.train.seq_length
    accum = max(1, round(target / per_step))
    gbs = accum * per_step
    if gbs * cfg.train.seq_length != cfg.batch_tokens(size):
        warnings.warn(
            f"size {size}: batch of {cfg.batch_tokens(size)} tokens is not a multiple of micro_batch_size x dp x "
            f"seq_length; using {gbs} sequences ({gbs * cfg.train.seq_length} tokens) per step",
            stacklevel=2,
        )
    return gbs, accum


def plan_run(
    cfg: StudyConfig, size: str, init: str, lang: str, source: str | None, replay: float, variant: str | None = None,
    *, tokens: float | None = None, rid: str | None = None,
) -> PlannedRun:
    shape = cfg.shape(size)
    layout = cfg.layout(size)
    gbs, accum = batch_layout(cfg, size)
    tokens_target = cfg.tokens(size) if tokens is None else tokens
    steps = max(1, math.ceil(tokens_target / (gbs * cfg.train.seq_length)))
    tokens = steps * gbs * cfg.train.seq_length
    params = shape.params(cfg.vocab_size, tp=layout.tp)
    flops = flops_6nd(params, tokens)
    res = job_resources(cfg, layout.world, params, flops, tp=layout.tp)
    return PlannedRun(
        run_id=rid or run_id(size, init, lang, replay if init == "cpt" else None, variant),
        size=size, init=init, lang=lang, source_lang=source, replay=replay, variant=variant,
        parent=run_id(size, "scratch", source) if init == "cpt" and source else None,
        params=params, params_nonemb=shape.params(cfg.vocab_size, embeddings=False),
        tokens=tokens, seq_length=cfg.train.seq_length, global_batch_size=gbs,
        micro_batch_size=cfg.train.micro_batch_size, grad_accum=accum, steps=steps,
        tp=layout.tp, pp=layout.pp, dp=layout.dp, flops_6nd=flops, **res,
    )


def job_resources(cfg: StudyConfig, world: int, params: int, flops: float, tp: int = 1) -> dict[str, int]:
    """Nodes, GPUs, cores and memory per node, and time limit of one training job. A run larger than a
    node (``slurm.gpus_per_node``, or ``slurm.cpu_ranks_per_node`` on CPU-only clusters) spans
    ``ceil(world / per node)`` nodes (:func:`cptscale.cluster.node_layout`). Time: :func:`job_seconds`
    with a 1.5x margin; memory ~16 bytes per parameter (fp32 weights, grads, two Adam moments) per rank
    on CPU, per-GPU host memory on GPU."""
    s = cfg.slurm
    lay = node_layout(world, s.gpus_per_node if s.gpus else s.cpu_ranks_per_node, tp)
    per = lay.ranks_per_node
    if s.gpus:
        gpus, cpus, mem = world, per * s.cpus_per_gpu, per * s.mem_gb_per_gpu
    else:
        cpus = per * s.threads_per_rank
        gpus, mem = 0, 2 + math.ceil(per * (1 + params * 16 * 2 / 2**30))
    seconds, cal = job_seconds(cfg, world, params, flops)
    if cal is not None:
        minutes = time_limit_minutes(seconds, s.min_runtime_minutes)
    else:
        minutes = max(s.min_runtime_minutes, math.ceil((seconds - 60 * s.runtime_overhead_minutes) * MARGIN / 60
                                                       + s.runtime_overhead_minutes))
    return {"gpus": gpus, "cpus": cpus, "nodes": lay.nodes, "runtime_minutes": minutes, "mem_gb": max(4, mem)}


def job_units(cfg: StudyConfig, world: int) -> int:
    """What a job's throughput scales with: its GPUs, or its cores on a CPU-only cluster."""
    return world if cfg.slurm.gpus else world * cfg.slurm.threads_per_rank


def job_seconds(cfg: StudyConfig, world: int, params: int, flops: float) -> tuple[float, Calibration | None]:
    """Estimated seconds of a training job and the calibration it came from: the study's measured
    throughput (:mod:`cptscale.throughput`) once it has finished runs on this kind of device, else the
    assumed rate (``slurm.cpu_flops_per_core`` per core, or ``gpu_peak_flops`` x ``assumed_mfu`` per
    GPU) plus ``runtime_overhead_minutes``."""
    s = cfg.slurm
    units = job_units(cfg, world)
    cal = study_calibration(cfg.study_dir, s.gpus, s.gpu_peak_flops if s.gpus else None)
    if cal is not None:
        return cal.seconds(flops, params, units), cal
    rate = s.gpu_peak_flops * s.assumed_mfu if s.gpus else s.cpu_flops_per_core
    return flops / (rate * units) + 60 * s.runtime_overhead_minutes, None


def eval_steps(total_steps: int, points: int) -> list[int]:
    """Step 0, ``points`` log-spaced steps, and the last step (evaluation after s optimizer steps)."""
    ls = np.unique(np.round(np.geomspace(1, total_steps, points)).astype(int))
    return sorted({0, *ls.tolist(), total_steps})



# -- paths -------------------------------------------------------------------------------------
def data_dir(cfg: StudyConfig) -> Path:
    return cfg.study_dir / "data"


def data_manifest(cfg: StudyConfig, lang: str) -> Path:
    """The data stage's manifest of one language (``cptscale.data.indexed.prepare`` writes it): its unique
    tokens, byte counts and content hashes."""
    return data_dir(cfg) / lang / "data.json"


def tokenizer_path(cfg: StudyConfig) -> Path:
    return cfg.study_dir / "tokenizer" / "tokenizer.json"


def run_dir(cfg: StudyConfig, rid: str) -> Path:
    return cfg.study_dir / "runs" / rid


def checkpoint_dir(cfg: StudyConfig, rid: str) -> Path:
    return cfg.study_dir / "checkpoints" / rid
