"""Config problems: one :class:`Problem` per bad field (dotted path, what is wrong, what is allowed), gathered
into one :class:`ConfigError`; pydantic's errors are rewritten into them with the field's bounds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types as at
from pydantic import (
    BaseModel,
    ValidationError,
)
from pydantic.fields import FieldInfo

_UNSET: Any = object()


class ConfigWarning(UserWarning):
    """A config problem that does not stop the study (e.g. a registry that could not be reached)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: dotted field path ("" when the message names it), what is wrong and
    what is allowed, and the bad value (shown when short)."""

    path: str
    message: str
    value: Any = _UNSET

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        shown = _show(self.value)
        if shown is not None and shown not in self.message and repr(self.value) not in self.message:
            text += f" (got {shown})"
        return text


def _show(value: Any) -> str | None:
    """A short rendering of a bad value; None for whole sections (dicts, lists of dicts) and unset values."""
    if value is _UNSET or isinstance(value, dict):
        return None
    if isinstance(value, list | tuple) and not all(v is None or isinstance(v, str | int | float) for v in value):
        return None
    shown = json.dumps(value, default=str)
    return shown if len(shown) <= 80 else shown[:77] + "..."


class ConfigError(Exception):
    """A config that does not validate: carries one readable line per problem (``found`` holds them as
    :class:`Problem` objects)."""

    def __init__(self, path: str, problems: list[str] | list[Problem]):
        self.path = path
        self.found = [p if isinstance(p, Problem) else Problem("", p) for p in problems]
        self.problems = [str(p) for p in self.found]
        super().__init__(f"{path}: invalid study config\n" + "\n".join(f"  - {p}" for p in self.problems))


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """Unwrap ``Annotated`` and ``X | None``; returns the bare type and the constraints met on the way."""
    meta: list[Any] = []
    while True:
        if get_origin(tp) is Annotated:
            base, *extra = get_args(tp)
            for e in extra:
                meta += e.metadata if isinstance(e, FieldInfo) else [e]
            tp = base
            continue
        if get_origin(tp) in (Union, type(int | None)):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp, meta


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _follow(root: Any, loc: tuple[Any, ...]) -> tuple[list[str], Any, list[Any]]:
    """Follow a pydantic error location through the schema: the displayed path parts (union tags and
    ``[key]`` markers dropped), the type found there and its constraints (None/[] where it is lost)."""
    tp: Any = root
    meta: list[Any] = []
    shown: list[str] = []
    for part in loc:
        tp, _ = _strip(tp)
        if part == "[key]":
            tp, meta = None, []
            continue
        if get_origin(tp) in (Union, type(int | None)) and isinstance(part, str):
            members = [_strip(a)[0] for a in get_args(tp)]
            tagged = [m for m in members if _is_model(m) and "kind" in m.model_fields
                      and part in get_args(m.model_fields["kind"].annotation)]
            if tagged:  # a discriminated union's tag (e.g. corpora kinds): not part of the user's path
                tp, meta = tagged[0], []
                continue
        shown.append(str(part))
        if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
            f = tp.model_fields[part]
            tp, meta = f.annotation, list(f.metadata)
        elif get_origin(tp) in (list, tuple) and isinstance(part, int):
            tp, meta = get_args(tp)[0], []
        elif get_origin(tp) is dict:
            tp, meta = get_args(tp)[1], []
        else:
            tp, meta = None, []
    tp, extra = _strip(tp)
    return shown, tp, meta + extra


_BOUNDS = ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"))


def _bounds(meta: list[Any]) -> str | None:
    """'>= 0 and < 1' from a field's numeric constraints."""
    parts = []
    for m in meta:
        for cls, attr, sym in _BOUNDS:
            if isinstance(m, cls):
                v = getattr(m, attr)
                parts.append(f"{sym} {v:g}" if isinstance(v, float) else f"{sym} {v}")
    return " and ".join(parts) or None


def _pydantic_problems(exc: ValidationError, root: Any, prefix: str = "", skip: int = 0) -> list[Problem]:
    """One problem per pydantic error, with the full field path and what the field allows (``skip``
    leading location parts that ``prefix`` replaces)."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])[skip:]
        parts, _, meta = _follow(root, loc)
        path = ".".join(p for p in (prefix, *parts) if p) or "(top level)"
        kind, value = err["type"], err.get("input", _UNSET)
        msg = err["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            _, parent, _ = _follow(root, loc[:-1])
            allowed = ", ".join(parent.model_fields) if _is_model(parent) else None
            msg = "unknown key (check its spelling)" + (f"; allowed here: {allowed}" if allowed else "")
            value = _UNSET
        elif kind == "missing":
            msg, value = "required field is missing", _UNSET
        elif kind == "union_tag_invalid":  # e.g. a corpus `kind` that does not exist
            field = str(err["ctx"]["discriminator"]).strip("'")
            path, value = f"{path}.{field}", err["ctx"]["tag"]
            msg = f"unknown {field}; allowed: {err['ctx']['expected_tags']}"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            msg = f"must be {_bounds(meta) or msg.removeprefix('Input should be ')}"
        out.append(Problem(path, msg, value))
    return out
