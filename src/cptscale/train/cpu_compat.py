"""CUDA work-arounds for running Megatron-Core on CPU (loaded only when there is no GPU): 0.16.1 (the
newest release for Python 3.11) and 0.19.2 (Python >= 3.12), whose patched call sites are the same.

Megatron-Core hard-codes CUDA in a few places (measured recipe: the project's megatron-cpu notes):
``torch.cuda.current_device``/``synchronize``, ``device="cuda"`` allocations in the schedules, the
optimizers and the DDP buffers, the CUDA RNG tracker, and a CUDA-type assertion in gradient
clipping. Every patch checks that the thing it replaces still exists, and tests/test_train.py checks
that each is still needed, so an upgrade that changes them fails loudly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: the megatron-core releases these patches were checked against (requirements.lock pins one per Python)
PATCHED_VERSIONS = ("0.16.1", "0.19.2")
_applied = False
_mode = None  # the active device-rewriting TorchFunctionMode (patch 3)


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


class _CudaFactoriesOnCPU:  # built lazily as a TorchFunctionMode subclass
    pass


def _make_device_mode():
    from torch.overrides import TorchFunctionMode

    class _Mode(TorchFunctionMode):
        """Rewrites ``device="cuda"`` (or ``torch.device("cuda")``) in any torch call to the CPU.

        Megatron-Core allocates small bookkeeping tensors on CUDA in the pipeline schedules
        (token counter), the optimizers (loss scale, found-inf flag), ``multi_tensor_applier``'s
        local fallbacks and the DDP buffers; one mode covers all of them instead of a patch per
        module. Measured cost: none (the mode only inspects keyword arguments)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            dev = kwargs.get("device")
            if dev is not None and str(dev).startswith("cuda"):
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    return _Mode


class _CPUStream:
    """What ``torch.cuda.current_stream()`` answers on CPU: waiting on an event or a stream is a no-op
    (CPU work is synchronous; there are no CUDA-graph events to wait for)."""

    def wait_event(self, event) -> None:
        return None

    def wait_stream(self, stream) -> None:
        return None


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's ``clip_grad_by_total_norm_fp32`` without its ``torch.cuda.FloatTensor`` assertion:
    the same in-place scaling by ``max_norm / (total_norm + 1e-6)`` when that is below 1."""
    import torch

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in parameters:
            g = getattr(p, attr, None)
            if g is not None:
                g.detach().mul_(coeff)


def apply() -> None:
    """Install the patches (idempotent); every one checks the thing it replaces still exists."""
    global _applied
    if _applied:
        return
    import megatron.core
    import torch
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.tensor_parallel import random as mrandom

    if megatron.core.__version__ not in PATCHED_VERSIONS:
        raise RuntimeError(
            f"cpu_compat was checked against megatron-core {', '.join(PATCHED_VERSIONS)}, found "
            f"{megatron.core.__version__}: re-check the patches in cptscale/train/cpu_compat.py"
        )
    # 1. current_device -> "cpu" (used as a device= argument, e.g. by rotary embeddings)
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # 2. synchronize -> no-op (p2p communication, DDP buffer management)
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # 3. device="cuda" in factory calls (schedules, optimizers, multi_tensor_applier fallbacks)
    global _CudaFactoriesOnCPU, _mode
    _CudaFactoriesOnCPU = _make_device_mode()
    _mode = _CudaFactoriesOnCPU()
    _mode.__enter__()
    # 4. RNG tracker (see CPURNGStatesTracker and seed_rng_tracker)
    for name in ("CudaRNGStatesTracker", "_CUDA_RNG_STATE_TRACKER", "get_cuda_rng_tracker"):
        if not hasattr(mrandom, name):
            raise RuntimeError(f"megatron.core.tensor_parallel.random.{name} is gone: update cpu_compat")
    global CPURNGStatesTracker
    CPURNGStatesTracker = _make_tracker_class()
    # 5. gradient clipping in the Megatron optimizer asserts CUDA tensors
    if not hasattr(moptimizer, "clip_grad_by_total_norm_fp32"):
        raise RuntimeError("megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32 is gone: update cpu_compat")
    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    # 6. (0.19) the DDP bucket's start_grad_sync waits on CUDA-graph events via torch.cuda.current_stream():
    #    on CPU there are no streams or events, so a stream stand-in whose waits are no-ops
    torch.cuda.current_stream = lambda *a, **k: _CPUStream()  # type: ignore[assignment]
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


@contextlib.contextmanager
def device_mode_suspended() -> Iterator[None]:
    """Run the block outside the device-rewriting TorchFunctionMode (patch 3), e.g. a plain PyTorch
    baseline in bench/train.py, which must not pay the mode's per-op Python dispatch. A no-op when
    the mode is not the innermost one (or was never entered)."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode, _push_mode

    stack = _get_current_function_mode_stack()
    if _mode is None or not stack or stack[-1] is not _mode:
        yield
        return
    mode = _pop_mode()
    try:
        yield
    finally:
        _push_mode(mode)
