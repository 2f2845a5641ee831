"""What a run spends: FLOP counters of the current (possibly pruned) shape, and per-step throughput,
memory and model FLOPs utilisation for metrics.jsonl."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cptscale.runspec import RunSpec

#: Peak dense bf16 FLOP/s of one GPU when the spec gives none (NVIDIA H100 SXM, without sparsity).
DEFAULT_PEAK_FLOPS = 989e12


def peak_flops(spec: dict[str, Any]) -> float:
    """Peak FLOP/s per GPU for MFU: ``resources.gpu_peak_flops`` of run.json (the planner copies the
    study's ``slurm.gpu_peak_flops``), else :data:`DEFAULT_PEAK_FLOPS`."""
    v = (spec.get("resources") or {}).get("gpu_peak_flops")
    return float(v) if v else DEFAULT_PEAK_FLOPS


def mfu_flops_per_token(shape: dict[str, Any], vocab: int, seq: int, tp: int = 1) -> float:
    """:func:`cptscale.compute.mfu_flops_per_token` of a run.json shape."""
    from cptscale.compute import mfu_flops_per_token as mfu_fpt
    from cptscale.prune import PrunedShape

    return mfu_fpt(PrunedShape.from_dict(shape), vocab, seq, tp)


def mfu(shape: dict[str, Any], vocab: int, seq: int, tokens_per_s: float, n_gpus: int, peak: float,
        tp: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s (global tokens/s x :func:`mfu_flops_per_token`)
    over the peak of all ``n_gpus`` GPUs."""
    return mfu_flops_per_token(shape, vocab, seq, tp) * tokens_per_s / (n_gpus * peak)


@dataclass
class FlopCounter:
    """FLOPs spent so far (exact per-token count of :func:`cptscale.prune.flops_per_token`, and 6 N D)
    and the current shape they are counted at; a prune changes the shape, a WSD branch restores a copy."""

    shape: dict[str, Any]
    params: int
    flops_per_token: float
    flops: float = 0.0
    flops_6nd: float = 0.0

    @classmethod
    def at(cls, shape: dict[str, Any], vocab: int, seq: int, tp: int) -> FlopCounter:
        """A counter at ``shape`` with nothing spent (the counters are set by the caller on resume)."""
        from cptscale.prune import PrunedShape, flops_per_token

        sh = PrunedShape.from_dict(shape)
        return cls(dict(shape), sh.params(vocab, tp=tp), flops_per_token(sh, vocab, seq))

    def add(self, tokens: int) -> None:
        self.flops += self.flops_per_token * tokens
        self.flops_6nd += 6.0 * self.params * tokens

    def reshape(self, shape: dict[str, Any], vocab: int, seq: int, tp: int) -> None:
        """The model was pruned to ``shape``: later steps cost what it costs (the totals stay)."""
        new = FlopCounter.at(shape, vocab, seq, tp)
        self.shape, self.params, self.flops_per_token = new.shape, new.params, new.flops_per_token

    def totals(self) -> dict[str, Any]:
        return {"params": self.params, "flops": self.flops, "flops_6nd": self.flops_6nd}

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint's state.json records so that a resume continues the counts at this shape."""
        return {"shape": self.shape, "flops": self.flops, "flops_6nd": self.flops_6nd}


class ThroughputMeter:
    """tokens/s, peak memory and (on GPU) MFU of one step. The MFU FLOPs per token are computed once
    per shape, not once per step."""

    def __init__(self, spec: RunSpec, tokens_per_step: int, tp: int, world: int, gpu: bool) -> None:
        self.vocab, self.seq = spec.vocab_size, spec.seq_length
        self.tokens_per_step, self.tp, self.world, self.gpu = tokens_per_step, tp, world, gpu
        res = spec.resources
        self.peak = float(res.gpu_peak_flops) if res is not None and res.gpu_peak_flops else DEFAULT_PEAK_FLOPS
        self._mfu_fpt: tuple[str, float] | None = None
        self._proc = _proc()

    def _mfu(self, shape: dict[str, Any], tps: float) -> float:
        """MFU of ``shape`` at ``tps`` global tokens/s (see :func:`mfu`)."""
        import json

        key = json.dumps(shape, sort_keys=True)
        if self._mfu_fpt is None or self._mfu_fpt[0] != key:
            self._mfu_fpt = (key, mfu_flops_per_token(shape, self.vocab, self.seq, self.tp))
        return self._mfu_fpt[1] * tps / (self.world * self.peak)

    def measure(self, dt: float, shape: dict[str, Any]) -> dict[str, Any]:
        import torch

        tps = self.tokens_per_step / max(dt, 1e-9)
        if self.gpu:
            mem = torch.cuda.max_memory_allocated()
        else:
            mem = self._proc.memory_info().rss if self._proc else None
        return {"tokens_per_s": tps, "mem_bytes": mem, "mfu": self._mfu(shape, tps) if self.gpu else None}


def _proc():
    try:
        import psutil

        return psutil.Process()
    except Exception:
        return None
