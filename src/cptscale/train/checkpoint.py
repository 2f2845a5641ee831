"""Checkpoints: model weights and optimizer state via Megatron-Core dist_checkpointing (reshardable
across TP/PP, and the form the distributed optimizer needs), RNG per rank, a small common-state JSON;
written to a temp dir then renamed.

A complete checkpoint is a ``step_N`` dir holding ``state.json`` (written last, then the dir is
renamed into place); ``.step_N.tmp`` dirs and ``step_N`` dirs without ``state.json`` are ignored.

**Verified** checkpoints: a checkpoint saved after update N-1 holds weights whose loss nobody has
seen yet. The trainer marks it verified (``verified.json``) once the training loss computed from
those weights (step N's forward, or the final evaluation) was finite and not a spike. Rotation keeps
the newest ``keep`` checkpoints *and* the newest verified one; a checkpoint that fails its check is
renamed ``rejected-step_N`` (ignored by resume, kept for inspection), so a re-run resumes from the
last verified one. state.json records the run's ``config_hash``: a trainer whose spec has another
hash moves the whole dir aside (:func:`set_aside_stale`) instead of resuming from another config.

**Intact** checkpoints: at save, ``manifest.json`` (size and XXH3-128 digest of every file, see
:mod:`cptscale.integrity`) is written after state.json, atomically, before the dir is renamed into
place. Every read checks it (:func:`verify_checkpoint`): resume, CPT initialisation, evaluation,
rotation. A missing or changed file is a :class:`CheckpointError` naming the file and the
checkpoint; resume sets a damaged checkpoint aside (``damaged-step_N``) and falls back to the
newest intact one (:func:`set_aside_damaged`). A checkpoint without a manifest (written before
manifests existed) is accepted with a warning, once per process. A save that runs out of disk space
removes its temp dir and says so; the previous checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cptscale.integrity import (
    MANIFEST,
    IntegrityError,
    check_dir_manifest,
    is_disk_full,
    read_dir_manifest,
    write_dir_manifest,
)

STATE = "state.json"
VERIFIED = "verified.json"
_STEP = re.compile(r"^step_(\d+)$")
#: files a checkpoint gains after its manifest is written: markers, not content
_UNLISTED = frozenset({VERIFIED})


class CheckpointError(RuntimeError):
    pass


class DiskFullError(CheckpointError):
    """A save ran out of disk space (transient: free space and re-run)."""


#: checkpoints whose every file was hashed in this process, with the (name, size, mtime) of each file
#: then: a second read of an unchanged checkpoint (load_weights, then load_full) is not hashed again
_intact: dict[str, tuple] = {}
_warned_legacy: set[str] = set()


def _file_stamp(p: Path, manifest: dict[str, Any]) -> tuple:
    out = []
    for rel in sorted(manifest["files"]):
        try:
            st = (p / rel).stat()
        except OSError:
            return ()
        out.append((rel, st.st_size, st.st_mtime_ns))
    return tuple(out)


def verify_checkpoint(path: str | Path, *, full: bool = True) -> bool:
    """Check every file of a checkpoint against its manifest (``full=False``: sizes only). True if
    verified; False for a checkpoint without a manifest (an older version's: accepted, with a
    warning once per process). A missing or changed file raises :class:`CheckpointError` naming the
    file and the checkpoint."""
    p = Path(path)
    if not p.is_dir() or not ((p / STATE).is_file() or (p / MANIFEST).is_file()):
        raise CheckpointError(f"{p} is not a complete checkpoint (no {STATE}); point at a checkpoint dir such as "
                              "<checkpoint.dir>/final or step_N written by `cptscale train`")
    try:
        manifest = read_dir_manifest(p)
    except IntegrityError as exc:
        raise CheckpointError(f"checkpoint {p} is damaged: {exc}") from None
    if manifest is None:
        key = str(p.resolve())
        if key not in _warned_legacy:
            _warned_legacy.add(key)
            print(f"warning: checkpoint {p} has no {MANIFEST} (written by an older cptscale): its files cannot be "
                  "verified; accepted as it is", file=sys.stderr, flush=True)
        return False
    key = str(p.resolve())
    stamp = _file_stamp(p, manifest)
    if full and stamp and _intact.get(key) == stamp:
        return True
    problems = check_dir_manifest(p, manifest, full=full)
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:4])})" if len(problems) > 1 else ""
        raise CheckpointError(
            f"checkpoint {p} is damaged: {problems[0]}{more}; it cannot be trusted: restore it from a copy or "
            "delete it (a resumed run falls back to its newest intact checkpoint; a damaged final checkpoint "
            "needs its run trained again)")
    if full:
        _intact[key] = stamp
    return True


def _remember_intact(p: Path, manifest: dict[str, Any]) -> None:
    _intact[str(p.resolve())] = _file_stamp(p, manifest)


def set_aside_damaged(ckpt_dir: str | Path) -> list[str]:
    """Rank 0, before resuming: check the ``step_N`` checkpoints from the newest down; rename each
    damaged one ``damaged-step_N`` (kept for inspection) until one is intact. Returns what was done,
    one message per line for the log (empty when the newest checkpoint is intact)."""
    d = Path(ckpt_dir)
    msgs = []
    for _, p in reversed(list_checkpoints(d)):
        try:
            verify_checkpoint(p)
            break
        except CheckpointError as exc:
            dest = _unused_name(p, f"damaged-{p.name}")
            p.rename(dest)
            msgs.append(f"{exc} -- moved to {dest.name}")
    if msgs:
        newest = latest_checkpoint(d)
        msgs.append(f"falling back to the newest intact checkpoint {newest}" if newest is not None
                    else f"no intact checkpoint left in {d}: training starts again from step 0")
    return msgs


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP.match(p.name)
        if m and (p / STATE).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete ``step_N`` checkpoint (verified or not: a SIGTERM checkpoint is verified
    by the first step after the resume)."""
    cks = list_checkpoints(ckpt_dir)
    return cks[-1][1] if cks else None


def is_verified(path: str | Path) -> bool:
    return (Path(path) / VERIFIED).is_file()


def latest_verified(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose weights gave a finite, non-spike loss."""
    ver = [p for _, p in list_checkpoints(ckpt_dir) if is_verified(p)]
    return ver[-1] if ver else None


def mark_verified(path: str | Path, info: dict[str, Any]) -> None:
    """Rank 0: record that the loss computed from this checkpoint's weights was good (``info``: which
    step's loss, its value)."""
    from cptscale.util import atomic_write

    if _rank() == 0:
        atomic_write(Path(path) / VERIFIED, json.dumps(info) + "\n")


def reject(path: str | Path) -> Path:
    """Rank 0: rename a checkpoint whose weights gave a bad loss to ``rejected-step_N`` (resume and
    rotation ignore it; kept, not deleted, for inspection). Returns the new path."""
    p = Path(path)
    dest = p.with_name(f"rejected-{p.name}")
    if _rank() == 0 and p.exists():
        dest = _unused_name(p, dest.name)
        p.rename(dest)
    return dest


def _unused_name(p: Path, name: str) -> Path:
    """``name`` beside ``p``, or ``name.2``, ``name.3``, ... when taken (set-aside dirs are never overwritten)."""
    dest, n = p.with_name(name), 1
    while dest.exists():
        n += 1
        dest = p.with_name(f"{name}.{n}")
    return dest


def _rotate(d: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints and, always, the newest verified one."""
    if keep <= 0:
        return
    cks = [p for _, p in list_checkpoints(d)]
    keep_paths = set(cks[-keep:])
    for p in reversed([p for p in cks if is_verified(p)]):
        keep_paths.add(p)  # the newest verified one that is intact is kept; damaged ones are never deleted here
        try:
            verify_checkpoint(p)
            break
        except CheckpointError as exc:
            print(f"warning: {exc}", file=sys.stderr, flush=True)
    for p in cks:
        if p not in keep_paths:
            shutil.rmtree(p, ignore_errors=True)


def recorded_hashes(ckpt_dir: str | Path) -> dict[str, Any]:
    """``config_hash`` recorded by each complete checkpoint in the dir (``step_N`` and ``final``;
    a ``final`` written before final checkpoints recorded it is left out)."""
    d = Path(ckpt_dir)
    out: dict[str, Any] = {}
    paths = [p for _, p in list_checkpoints(d)] + ([d / "final"] if (d / "final" / STATE).is_file() else [])
    for p in paths:
        try:
            state = json.loads((p / STATE).read_text())
        except (OSError, ValueError):
            out[p.name] = None
            continue
        if "config_hash" in state or p.name != "final":
            out[p.name] = state.get("config_hash")
    return out


def set_aside_stale(ckpt_dir: str | Path, config_hash: Any) -> Path | None:
    """Call on rank 0 only (then barrier): if any complete checkpoint in ``ckpt_dir`` was written
    under another ``config_hash`` (the run's spec changed), rename the whole dir to
    ``<dir>.stale-<old hash>`` (never deleted) and return the new path; None if nothing is stale."""
    d = Path(ckpt_dir)
    hashes = recorded_hashes(d)
    stale = {name: h for name, h in hashes.items() if h != config_hash}
    if not stale:
        return None
    dest = _unused_name(d, f"{d.name}.stale-{next(iter(stale.values()))}")
    d.rename(dest)
    return dest


def _rng_state() -> dict[str, Any]:
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
          "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["random"])
    get_cuda_rng_tracker().set_states(st["tracker"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def unwrap(model):
    """The GPTModel inside Megatron's DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT while a checkpoint is written.

    A cluster time limit signals every process of the job, including the helper processes
    dist_checkpointing starts to write files: its long-lived queue process, killed, breaks the very
    checkpoint the signal asked for (its forked writers inherit the trainer's flag-setting handler and
    are safe). The trainer's own handler runs as soon as the save is done. Only the main thread can
    change its mask; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        _start_writer_queue_ignoring(stops)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _start_writer_queue_ignoring(stops: set[signal.Signals]) -> None:
    """dist_checkpointing's file writers report through a queue served by a long-lived process it
    spawns on first use; a spawned process starts with an empty signal mask but keeps ignored
    signals ignored, so start it while the stop signals are ignored (and blocked here, so one that
    arrives meanwhile stays pending for the trainer instead of being dropped)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", None) is not None or not hasattr(fa, "_get_write_results_queue"):
        return
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stops}
    try:
        fa._get_write_results_queue()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _save_model(model, path: Path) -> None:
    from megatron.core import dist_checkpointing

    path.mkdir(parents=True, exist_ok=True)
    with _stop_signals_deferred():
        dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(path))


def optimizer_parts(opt) -> list[Any]:
    """The Megatron optimizers inside ``opt``: a ChainedOptimizer's parts, else ``opt`` itself."""
    return list(getattr(opt, "chained_optimizers", None) or [opt])


def optimizer_metadata(opt) -> dict[str, str] | None:
    """How the distributed optimizer's state is sharded in a checkpoint: ``dp_reshardable`` (one tensor
    per buffer shard, written by every rank in parallel; an exact resume needs the same layout anyway).
    Megatron-Core's default, ``fully_sharded_model_space``, relies on ``ShardedTensor.flattened_range``,
    which 0.19 refuses at save (seen on the first H200 run: every GPU checkpoint failed). None for the
    plain optimizer (CPU), whose format stays as it was."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if any(isinstance(o, DistributedOptimizer) for o in optimizer_parts(opt)):
        return {"distrib_optim_sharding_type": "dp_reshardable"}
    return None


def _allocate_adam_state(opt) -> None:
    """Give a fresh distributed optimizer's inner torch Adam its state (zeros, step 0) before a load.
    Megatron-Core 0.19 builds a loading state dict from ``state_dict()``, which without Apex or
    Transformer Engine reads every parameter's ``step`` and asserts one value: a resume before the
    first step failed there (seen on an H200). The load overwrites these tensors in place; nothing
    else reads them, and the weights are not touched (unlike Megatron's dummy optimizer step)."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for o in optimizer_parts(opt):
        inner = getattr(o, "optimizer", None)
        if not isinstance(o, DistributedOptimizer) or inner is None or len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


def unshare_adam_steps(inner) -> int:
    """Give every parameter of a torch Adam/AdamW its own ``step`` tensor; returns how many were shared.
    Megatron-Core 0.19's distributed optimizer, without Apex or Transformer Engine, loads one step
    tensor into every parameter's state, and torch's Adam increments each parameter's step in place,
    so after a resume the shared counter grew by the number of parameters per step and the bias
    correction was wrong (seen on an H200: the first step after resume off by 1.4e-3 in loss)."""
    seen: set[int] = set()
    shared = 0
    for st in inner.state.values():
        step = st.get("step") if isinstance(st, dict) else None
        if step is None or not hasattr(step, "clone"):
            continue
        if id(step) in seen:
            st["step"] = step.clone()
            shared += 1
        seen.add(id(st["step"]))
    return shared


def _save_optimizer(model, opt, path: Path) -> None:
    from megatron.core import dist_checkpointing

    path.mkdir(parents=True, exist_ok=True)
    with _stop_signals_deferred():
        sharded = opt.sharded_state_dict(unwrap(model).sharded_state_dict(), metadata=optimizer_metadata(opt))
        dist_checkpointing.save(sharded, str(path))


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def _no_room(tmp: Path, d: Path) -> bool:
    """Whether a failed save ran out of space: less room left than the partial write, or than the newest
    complete checkpoint (a write needs about as much). torch's checkpoint writer loses the ENOSPC
    (it reports "unexpected pos" of its zip writer instead), so the file system is asked."""
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return False
    newest = latest_checkpoint(d)
    return free < max(_dir_bytes(tmp), _dir_bytes(newest) if newest is not None else 0, 1)


@contextlib.contextmanager
def _writing(tmp: Path, final: Path) -> Iterator[None]:
    """A checkpoint save into ``tmp``: if the disk fills up, remove the partial ``tmp`` and raise a
    CheckpointError saying so (``final`` and every other checkpoint are untouched: nothing is renamed
    into place before the write is complete)."""
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not (is_disk_full(exc) or _no_room(tmp, final.parent)):
            raise
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(
            f"no space left on device while writing checkpoint {final.name} in {final.parent}: the partial "
            f"write was removed and the previous checkpoints there are intact; free disk space (or point "
            f"checkpoint.dir elsewhere) and re-run to resume") from None


def _publish(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """Rank 0: write the common state, then the manifest of every file (atomically, last), then rename
    into place (complete or absent)."""
    from cptscale.util import atomic_write

    atomic_write(tmp / STATE, json.dumps(state, indent=1))
    manifest = write_dir_manifest(tmp, exclude=_UNLISTED)
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _remember_intact(final, manifest)


def _staging(d: Path, name: str) -> tuple[Path, Path]:
    """The checkpoint ``d/name`` and its empty staging dir ``d/.name.tmp`` (rank 0 clears a leftover one;
    every rank waits for it)."""
    final, tmp = d / name, d / f".{name}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    return final, tmp


def save_full(ckpt_dir: str | Path, step: int, model, opt, spec: dict[str, Any], keep: int = 2,
              extra: dict[str, Any] | None = None, name: str | None = None) -> Path:
    """Everything needed for an exact resume at the same layout. ``extra`` goes into state.json
    (the trainer's current ``shape`` after pruning, cumulative ``flops``). ``name`` (default
    ``step_<step>``) saves elsewhere in the dir, e.g. a WSD branch's snapshot, which resume and
    rotation ignore; rotation (``keep``, see :func:`_rotate`) runs only for ``step_N`` saves."""
    import torch

    d = Path(ckpt_dir)
    name = name or f"step_{step}"
    final, tmp = _staging(d, name)
    with _writing(tmp, final):
        _save_model(model, tmp / "model")
        _save_optimizer(model, opt, tmp / "optimizer")
        torch.save({"rng": _rng_state()}, tmp / f"rank{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            state = {"step": step, "consumed_samples": step * int(spec["global_batch_size"]), "layout": _layout(),
                     "run_id": spec["run_id"], "config_hash": spec.get("config_hash"),
                     "out_dir": spec.get("out_dir"), "kind": "full", **(extra or {})}
            _publish(tmp, final, state)
    if _rank() == 0 and _STEP.match(name):
        _rotate(d, keep)
    _barrier()
    return final


def promote(snapshot: str | Path, step: int) -> Path:
    """Rank 0: turn a full snapshot (e.g. a WSD branch's, taken at ``step``) into ``step_<step>`` by
    renaming it; if that checkpoint already exists (same state), drop the snapshot instead."""
    src = Path(snapshot)
    dest = src.parent / f"step_{step}"
    if _rank() == 0:
        if (dest / STATE).exists():
            shutil.rmtree(src, ignore_errors=True)
        else:
            if dest.exists():  # an incomplete dir of that name (no state.json): not a checkpoint
                shutil.rmtree(dest)
            src.rename(dest)
    _barrier()
    return dest


def save_final(ckpt_dir: str | Path, step: int, model, spec: dict[str, Any],
               extra: dict[str, Any] | None = None) -> Path:
    """Weights only (what a CPT run needs); loadable at any TP/PP layout. ``extra`` goes into
    state.json (a pruned run passes its final ``shape``, which replaces the spec's)."""
    final, tmp = _staging(Path(ckpt_dir), "final")
    with _writing(tmp, final):
        _save_model(model, tmp / "model")
        _barrier()
        if _rank() == 0:
            _publish(tmp, final, {"step": step, "run_id": spec["run_id"], "layout": _layout(), "kind": "weights",
                                  "shape": spec["shape"], "vocab_size": spec["vocab_size"], "arch": spec.get("arch"),
                                  "config_hash": spec.get("config_hash"), "out_dir": spec.get("out_dir"),
                                  **(extra or {})})
    _barrier()
    return final


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's common state (state.json)."""
    p = Path(path) / STATE
    if not p.exists():
        raise CheckpointError(f"{p} missing: {Path(path)} is not a complete checkpoint")
    try:
        manifest = read_dir_manifest(path)
    except IntegrityError as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from None
    if manifest is not None:
        problems = check_dir_manifest(path, manifest, only=STATE)
        if problems:
            raise CheckpointError(f"checkpoint {path} is damaged: {problems[0]}")
    try:
        return json.loads(p.read_text())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: {STATE} is not JSON ({exc})") from None


def load_weights(path: str | Path, model) -> dict[str, Any]:
    """Load model weights from a checkpoint dir (any layout); returns its common state."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not Exception

    p = Path(path)
    if not (p / STATE).exists() or not (p / "model").is_dir():
        raise CheckpointError(
            f"{p} is not a complete checkpoint (missing {STATE} or model/); point parent.checkpoint / "
            "CHECKPOINT at a checkpoint dir such as <checkpoint.dir>/final written by `cptscale train`"
        )
    verify_checkpoint(p)
    try:
        inner = unwrap(model)
        state_dict = dist_checkpointing.load(inner.sharded_state_dict(), str(p / "model"))
        inner.load_state_dict(state_dict, strict=True)
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"could not load weights from {p}: {type(exc).__name__}: {exc}") from exc
    return read_state(p)


def load_full(path: str | Path, model, opt) -> int:
    """Exact resume: optimizer state and RNG (the weights were loaded with :func:`load_weights` before
    the optimizer was built); returns the step to continue from."""
    import torch
    from megatron.core import dist_checkpointing

    p = Path(path)
    verify_checkpoint(p)
    state = read_state(p)
    if state.get("layout") != _layout():
        raise CheckpointError(
            f"{p} was written at layout {state.get('layout')} but this run uses {_layout()}: an exact resume "
            "needs the same layout (weights alone reshard; start a new run or restore the layout)"
        )
    f = p / f"rank{_rank():05d}.pt"
    if not f.exists():
        raise CheckpointError(f"{f} missing: checkpoint {p} is incomplete")
    if not (p / "optimizer").is_dir():
        raise CheckpointError(f"{p / 'optimizer'} missing: checkpoint {p} has no optimizer state")
    _allocate_adam_state(opt)
    sharded = opt.sharded_state_dict(unwrap(model).sharded_state_dict(), is_loading=True,
                                     metadata=optimizer_metadata(opt))
    opt.load_state_dict(dist_checkpointing.load(sharded, str(p / "optimizer")))
    for o in optimizer_parts(opt):
        if getattr(o, "optimizer", None) is not None:
            unshare_adam_steps(o.optimizer)
    blob = torch.load(f, weights_only=False)
    _set_rng_state(blob["rng"])
    return int(state["step"])
