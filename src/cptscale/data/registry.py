"""A small client of the PyPI JSON API and the npm registry: does a package (and version) exist? Answers
and unreachable registries are remembered for the process. ``CPTSCALE_PYPI_URL`` / ``CPTSCALE_NPM_URL``
point at a mirror."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any


class _Unreachable(Exception):
    """The registry could not be asked (no network, proxy, server error)."""


#: Registry answers per (url base, registry, package, version), for this process.
_REGISTRY_ANSWERS: dict[tuple[str, ...], tuple[str, list[str], str]] = {}


#: Registry bases that could not be reached in this process, with the reason (not asked again: a
#: firewalled network would otherwise cost a timeout per validation).
_UNREACHABLE: dict[str, str] = {}


def _registry_base(registry: str) -> str:
    if registry == "pypi":
        return os.environ.get("CPTSCALE_PYPI_URL", "https://pypi.org/pypi").rstrip("/")
    return os.environ.get("CPTSCALE_NPM_URL", "https://registry.npmjs.org").rstrip("/")


def _get_json(url: str, timeout: float, accept: str = "application/json") -> tuple[int, Any]:
    """(200, document) or (404, None); anything else means the registry could not be asked."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "cptscale-validate"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return 200, json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return 404, None
        raise _Unreachable(f"HTTP {exc.code} from {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _Unreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None


def _recent(versions: Iterable[str], n: int = 8) -> list[str]:
    from packaging.version import InvalidVersion, Version

    def key(v: str) -> tuple[int, Any]:
        try:
            return (1, Version(v))
        except InvalidVersion:
            return (0, v)

    return sorted(versions, key=key)[-n:]


def _has_version(releases: list[str], version: str) -> bool:
    """``version`` among ``releases``, compared as pip compares them (0.6 == 0.6.0)."""
    from packaging.version import InvalidVersion, Version

    if version in releases:
        return True
    try:
        want = Version(version)
    except InvalidVersion:
        return False
    for r in releases:
        try:
            if Version(r) == want:
                return True
        except InvalidVersion:
            continue
    return False


def registry_verdict(registry: str, package: str, version: str | None, timeout: float = 5.0
                     ) -> tuple[str, list[str], str]:
    """Ask PyPI's JSON API / the npm registry whether ``package`` (and ``version``) exists.

    Returns (verdict, recent versions, url asked) with verdict ``ok``, ``no-package`` or ``no-version``;
    raises :class:`_Unreachable` when the registry cannot be reached. ``CPTSCALE_PYPI_URL`` /
    ``CPTSCALE_NPM_URL`` point at a mirror."""

    base = _registry_base(registry)
    key = (base, registry, package, version or "")
    if key in _REGISTRY_ANSWERS:
        return _REGISTRY_ANSWERS[key]
    if base in _UNREACHABLE:
        raise _Unreachable(_UNREACHABLE[base])
    try:
        answer = _ask_registry(registry, base, package, version, timeout)
    except _Unreachable as exc:
        _UNREACHABLE[base] = str(exc)
        raise
    _REGISTRY_ANSWERS[key] = answer
    return answer


def _ask_registry(registry: str, base: str, package: str, version: str | None, timeout: float
                  ) -> tuple[str, list[str], str]:
    from urllib.parse import quote

    if registry == "pypi":  # the project document lists every release (mirrors may lack per-version URLs)
        url = f"{base}/{quote(package, safe='')}/json"
        status, doc = _get_json(url, timeout)
        answer = ("ok", [], url)
        if status == 404:
            answer = ("no-package", [], url)
        elif version and not _has_version(list((doc or {}).get("releases") or {}), version):
            answer = ("no-version", _recent((doc or {}).get("releases") or {}), url)
    else:
        url = f"{base}/{quote(package, safe='@')}"
        status, doc = _get_json(url, timeout, accept="application/vnd.npm.install-v1+json")
        answer = ("ok", [], url)
        if status == 404:
            answer = ("no-package", [], url)
        elif version and version not in (doc.get("versions") or {}) and version not in (doc.get("dist-tags") or {}) \
                and not any(c in version for c in "^~<>=*| x"):  # ranges are resolved by npm itself
            answer = ("no-version", _recent(doc.get("versions") or {}), url)
    return answer
