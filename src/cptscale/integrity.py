"""Content digests that make what is read back trustworthy: per-directory manifests (checkpoints)
and sampled-block fingerprints of large files (datasets).

A directory manifest (``manifest.json``) lists every file of the directory tree with its size and
xxHash (XXH3-128) digest. It is written last, atomically, so a directory whose manifest exists was
complete when the manifest was written; any later change to a listed file (bit rot, a torn copy, a
truncated shard) is named by :func:`check_dir_manifest`.

A sample fingerprint (:func:`sample_fingerprint`) hashes a file's size plus a few fixed blocks (the
first, the last and evenly spaced ones): reading ~1 MiB catches a truncated, swapped or rewritten
file in milliseconds, where a full hash of a multi-GB dataset takes minutes. Flips inside an
unsampled block need the full hash (``cptscale verify``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import xxhash

MANIFEST = "manifest.json"
ALGORITHM = "xxh3_128"
FORMAT = "cptscale-manifest/1"
SAMPLE_BLOCK = 1 << 16
SAMPLE_BLOCKS = 16
_CHUNK = 1 << 22


class IntegrityError(RuntimeError):
    """Content read back does not match what was recorded when it was written."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps: its cause/context chain, torch's per-rank checkpoint failures,
    DuckDB's I/O errors that carry only the message) is a full disk or quota."""
    import errno

    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "[Errno 28]" in str(e) or "Disk quota exceeded" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            for f in failures.values():
                todo += list(f) if isinstance(f, tuple) else [f]
    return False


def file_digest(path: str | os.PathLike[str]) -> str:
    """XXH3-128 of a file's bytes, streamed."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _listed_files(root: Path, exclude: frozenset[str]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in exclude)


def write_dir_manifest(root: str | os.PathLike[str], exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Digest every file under ``root`` (except the manifest and ``exclude``, relative POSIX paths)
    and write ``root/manifest.json`` atomically (temp file, fsync, rename); returns the manifest."""
    from cptscale.util import atomic_write

    root = Path(root)
    skip = exclude | {MANIFEST}
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, ALGORITHM: file_digest(p)}
             for p in _listed_files(root, skip)}
    manifest = {"format": FORMAT, "algorithm": ALGORITHM, "files": files}
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_dir_manifest(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of ``root``, None if it has none; an unreadable manifest is an IntegrityError."""
    p = Path(root) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
        if m.get("algorithm") != ALGORITHM or not isinstance(m.get("files"), dict):
            raise ValueError(f"algorithm {m.get('algorithm')!r}, files {type(m.get('files')).__name__}")
    except (OSError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"{p} is unreadable ({exc}): the manifest itself is damaged") from None
    return m


def check_file(root: Path, rel: str, entry: dict[str, Any], *, full: bool = True) -> str | None:
    """Why ``root/rel`` differs from its manifest entry (missing, size, digest), or None if it matches.
    ``full=False`` compares the size only."""
    p = root / rel
    if not p.is_file():
        return f"file {rel} is missing"
    size = p.stat().st_size
    if size != entry.get("size"):
        return f"file {rel} has {size} bytes, {entry.get('size')} when written (truncated or replaced)"
    if full and file_digest(p) != entry.get(ALGORITHM):
        return f"file {rel} does not match its recorded {ALGORITHM} digest (its content changed after it was written)"
    return None


def check_dir_manifest(root: str | os.PathLike[str], manifest: dict[str, Any], *, only: str | None = None,
                       full: bool = True) -> list[str]:
    """Every file of ``manifest`` that is missing or changed under ``root`` (one line each, naming the
    file); ``only`` restricts the check to one file."""
    root = Path(root)
    files = manifest["files"]
    names = [only] if only is not None else sorted(files)
    problems = []
    for rel in names:
        if rel not in files:
            problems.append(f"file {rel} is not listed in {MANIFEST}")
            continue
        why = check_file(root, rel, files[rel], full=full)
        if why:
            problems.append(why)
    return problems


def sample_offsets(size: int, block: int = SAMPLE_BLOCK, n: int = SAMPLE_BLOCKS) -> list[int]:
    """Start offsets of the sampled blocks: the first, the last and evenly spaced ones between."""
    if size <= block * n:
        return [0] if size else []
    last = size - block
    return sorted({round(i * last / (n - 1)) for i in range(n)})


def sample_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size", "sample_xxh3_128"}``: the size and a digest of the sampled blocks (the whole file
    when it is at most ``SAMPLE_BLOCKS * SAMPLE_BLOCK`` bytes)."""
    size = os.path.getsize(path)
    h = xxhash.xxh3_128()
    h.update(size.to_bytes(8, "little"))
    offsets = sample_offsets(size)
    with open(path, "rb") as fh:
        if offsets == [0]:
            while block := fh.read(_CHUNK):
                h.update(block)
        else:
            for off in offsets:
                fh.seek(off)
                h.update(fh.read(SAMPLE_BLOCK))
    return {"size": size, f"sample_{ALGORITHM}": h.hexdigest()}


# -- datasets: the .bin/.idx files of data/<lang>/ against their data.json -------------------------
DATA_MANIFEST = "data.json"
_warned_data: set[str] = set()


def dataset_entry(prefix: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """``(data.json path, its entry)`` describing the indexed dataset ``prefix`` (``<dir>/train``,
    ``<dir>/valid`` or ``<dir>/train.<corpus>``); None when no data.json sits beside it (a dataset
    the data stage did not write, e.g. a test's)."""
    prefix = Path(prefix)
    mpath = prefix.parent / DATA_MANIFEST
    if not mpath.is_file():
        return None
    try:
        m = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{mpath} is unreadable ({exc}); {rebuild_hint(mpath)}") from None
    name = prefix.name
    if name in ("train", "valid"):
        entry = m.get(name)
    elif name.startswith("train."):
        entry = (m.get("train_corpora") or {}).get(name.removeprefix("train."))
    else:
        entry = None
    if not isinstance(entry, dict):
        raise IntegrityError(f"{mpath} does not describe dataset {prefix} (no entry {name!r}); {rebuild_hint(mpath)}")
    return mpath, entry


def rebuild_hint(manifest: Path) -> str:
    return (f"rebuild it with `snakemake --profile workflow/profiles/local -f {manifest}` (rule `index`; its "
            "dependants are then re-run)")


def check_dataset(prefix: str | os.PathLike[str], *, full: bool = False) -> bool:
    """Check ``prefix``.bin/.idx against their data.json: size and sampled blocks (``full=False``, for
    every training start), or the full content hash (``full=True``, ``cptscale verify``). A data.json
    written before sample fingerprints existed gets the full check. False when there is no data.json
    to check against; a mismatch raises IntegrityError naming the file and the Snakemake target."""
    from cptscale.util import file_hash

    found = dataset_entry(prefix)
    if found is None:
        return False
    mpath, entry = found
    for ext in ("bin", "idx"):
        path = Path(f"{prefix}.{ext}")
        sample_key = f"{ext}_sample_{ALGORITHM}"
        what = None
        if not path.is_file():
            what = "is missing"
        elif not full and sample_key in entry:
            got = sample_fingerprint(path)
            if got["size"] != entry.get(f"{ext}_size"):
                what = f"has {got['size']} bytes, {entry.get(f'{ext}_size')} when indexed (truncated or replaced)"
            elif got[f"sample_{ALGORITHM}"] != entry[sample_key]:
                what = "differs from its recorded content in sampled blocks (modified after indexing)"
        else:
            if not full and str(mpath) not in _warned_data:
                _warned_data.add(str(mpath))
                print(f"warning: {mpath} predates sampled fingerprints: checking the full hash of its datasets "
                      "(slower; re-index to record fingerprints)", file=sys.stderr, flush=True)
            if file_hash(path) != entry.get(f"{ext}_hash"):
                what = f"does not match its recorded hash {ext}_hash (modified after indexing)"
        if what:
            raise IntegrityError(f"dataset file {path} {what}; {mpath} describes another file: training on it "
                                 f"would silently use other data; {rebuild_hint(mpath)}")
    return True


def run_datasets(spec: dict[str, Any]) -> list[str]:
    """Every indexed-dataset prefix a run spec reads: its training data (one prefix, or every source
    of every blend phase) and its validation sets."""
    data = spec.get("data") or {}
    prefixes = [data["prefix"]] if data.get("prefix") else []
    for ph in data.get("phases") or []:
        prefixes += [s["prefix"] for s in ph.get("sources", []) if s.get("prefix")]
    prefixes += [v["prefix"] for v in ((spec.get("eval") or {}).get("languages") or {}).values() if v.get("prefix")]
    return list(dict.fromkeys(prefixes))


def check_run_datasets(spec: dict[str, Any], *, full: bool = False) -> int:
    """Check every dataset a run reads (:func:`run_datasets`); returns how many had a data.json."""
    return sum(check_dataset(p, full=full) for p in run_datasets(spec))


# -- one workflow run per study ----------------------------------------------------------------------
WORKFLOW_LOCK = ".workflow.lock"
_held: list[Any] = []  # the open lock file of this process (kept open: the flock lives as long as it)


class StudyBusyError(RuntimeError):
    """Another workflow run holds the study."""


def hold_study_lock(study_dir: str | os.PathLike[str]) -> Path:
    """Take the study's workflow lock (``<study_dir>/.workflow.lock``, an ``flock``) for the life of this
    process, or raise StudyBusyError naming the run that holds it. Snakemake's own lock covers one
    working directory; this one covers the study wherever a run is started from. The kernel releases
    it when the process dies, so a crashed run never leaves it behind."""
    import fcntl
    import socket
    import time

    path = Path(study_dir) / WORKFLOW_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 (kept open on purpose)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        try:
            holder = json.loads(fh.read() or "{}")
        except ValueError:
            holder = {}
        fh.close()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"])) if "time" in holder else "?"
        raise StudyBusyError(
            f"another workflow run is working on study {Path(study_dir)} (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {since}, from {holder.get('cwd', '?')}); a second run would race "
            "it for the same outputs: wait for it to finish, or stop it (a stopped run resumes where it "
            "stopped on the next run)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "cwd": os.getcwd(), "time": time.time()}))
    fh.flush()
    _held.append(fh)
    return path
