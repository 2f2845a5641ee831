"""CUDA work-arounds for running Megatron-Core 0.16.1 on CPU (loaded only when there is no GPU).

Megatron-Core hard-codes CUDA in a few places; see /work/shared/docs/megatron-cpu.md. Every patch
checks that the thing it replaces still exists, so an upgrade that changes them fails loudly.
"""

from __future__ import annotations

import types

PATCHED_VERSION = "0.16.1"
_applied = False


class CPURNGStatesTracker:  # built lazily as a subclass of Megatron's tracker
    pass


def _make_tracker_class():
    import contextlib

    import torch
    from megatron.core.tensor_parallel import random as mrandom

    class _Tracker(mrandom.CudaRNGStatesTracker):
        """RNG tracker that keeps CPU generator states instead of CUDA ones."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return _Tracker


def apply() -> None:
    """Install the four patches (idempotent)."""
    global _applied
    if _applied:
        return
    import megatron.core
    import torch
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    if megatron.core.__version__ != PATCHED_VERSION:
        raise RuntimeError(
            f"cpu_compat was written for megatron-core {PATCHED_VERSION}, found {megatron.core.__version__}: "
            "re-check the patches in cptscale/train/cpu_compat.py"
        )
    # 1. current_device -> "cpu"
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # 4. synchronize -> no-op
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # 3. schedules' torch.zeros(device="cuda")
    assert hasattr(schedules, "torch"), "megatron schedules no longer imports torch"
    real_torch = torch

    def _zeros(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return real_torch.zeros(*args, **kwargs)

    proxy = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.zeros = _zeros
    schedules.torch = proxy
    # 2. RNG tracker
    for name in ("CudaRNGStatesTracker", "_CUDA_RNG_STATE_TRACKER", "get_cuda_rng_tracker"):
        if not hasattr(mrandom, name):
            raise RuntimeError(f"megatron.core.tensor_parallel.random.{name} is gone: update cpu_compat")
    global CPURNGStatesTracker
    CPURNGStatesTracker = _make_tracker_class()
    _applied = True


def seed_rng_tracker(seed: int, tp_rank: int = 0) -> None:
    """CPU replacement for ``model_parallel_cuda_manual_seed`` (same seed offsets)."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 + tp_rank)
