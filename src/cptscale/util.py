"""Small shared helpers: atomic writes, stable hashing, provenance.

Everything a job writes goes through :func:`atomic_write` (or :func:`atomic_path`) so that a killed
job never leaves a half-written result that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

PROVENANCE_PACKAGES = (
    "cptscale",
    "torch",
    "megatron-core",
    "tokenizers",
    "datasets",
    "duckdb",
    "scipy",
    "numpy",
    "altair",
    "snakemake",
)


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging directory next to ``path``; swap it in for ``path`` only if the block succeeds.

    For outputs made of several files (a report and its figures): a failure half-way (disk full, a kill)
    leaves the previous directory whole instead of a mix of old and new files. The swap is two renames
    (old aside, new in), so at every instant one complete directory exists; a leftover ``.previous`` from
    a kill between them is put back on the next call."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    previous = final.with_name(f".{final.name}.previous")
    if previous.exists():
        if final.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, final)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(stage, 0o777 & ~_UMASK)
    try:
        yield stage
        if final.exists():
            os.replace(final, previous)
        os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the duration of the block: one writer
    at a time across processes (and SLURM jobs on a shared file system with lock support)."""
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    with atomic_path(path) as tmp:
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as pretty, key-sorted JSON."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_json_file(path: str | os.PathLike[str], error: type[Exception], what: str) -> Any:
    """A JSON file's content, or ``error`` naming ``what`` and the file when it is missing or not JSON."""
    p = Path(path)
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    try:
        return read_json(p)
    except ValueError as exc:
        raise error(f"{what} {p} is not valid JSON: {exc}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object that does not depend on key order (for config/input keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_hash(path: str | os.PathLike[str], length: int = 16, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:length]


#: ``git_commit`` when the code does not run from a git checkout (an installed wheel, a copied tree):
#: explicit, so a missing commit is never mistaken for a lost one.
UNKNOWN_COMMIT = "unknown"


def git_version(repo: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the code that produced a result: a 40-hex commit, or
    :data:`UNKNOWN_COMMIT` (dirty flag ``None``) outside a git checkout or without git."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd, capture_output=True, text=True, check=True, timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": UNKNOWN_COMMIT, "git_dirty": None}
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return {"git_commit": UNKNOWN_COMMIT, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def package_versions(names: tuple[str, ...] = PROVENANCE_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


#: Content hashes a data manifest (``data/<lang>/data.json``, written by ``cptscale.data.indexed.prepare``)
#: carries, as (key suffix, path in the manifest).
MANIFEST_HASHES = (("docs", "docs_hash"), ("tokenizer", "tokenizer_hash"), ("train.bin", "train.bin_hash"),
                   ("train.idx", "train.idx_hash"), ("valid.bin", "valid.bin_hash"), ("valid.idx", "valid.idx_hash"))


def manifest_hashes(manifests: dict[str, dict[str, Any]], where: str = "data/{lang}/data.json") -> dict[str, str]:
    """The input hashes of a run: every content hash of each language's data manifest, keyed
    ``data/<lang>/<what>`` (docs, tokenizer, train/valid .bin/.idx). A manifest without one of them
    is an error naming the file and field: provenance must hold real hashes, never placeholders."""
    out: dict[str, str] = {}
    for lang, m in sorted(manifests.items()):
        for key, path in MANIFEST_HASHES:
            cur: Any = m
            for part in path.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            if not isinstance(cur, str) or not re.fullmatch(r"[0-9a-f]{8,}", cur):
                raise ValueError(f"{where.format(lang=lang)}: field {path!r} is {cur!r}, not a hex content hash; "
                                 f"re-run the data stage for {lang!r} (cptscale data index) to rewrite the manifest")
            out[f"data/{lang}/{key}"] = cur
    return out


def provenance(config_hash: str | None = None, inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything a stored row needs to be trusted later: code version, packages, config and input hashes."""
    return {
        **git_version(),
        "packages": package_versions(),
        "config_hash": config_hash,
        "input_hashes": dict(sorted((inputs or {}).items())),
    }


def fmt_num(x: float) -> str:
    """A number with an SI suffix and 3 significant digits (158k, 4.07G), for tables."""
    for unit, div in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"
