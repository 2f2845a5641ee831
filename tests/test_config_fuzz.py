"""The study config under generated abuse (hypothesis): wrong types, missing and unknown keys, extreme
numbers, unicode. Validation either accepts the config or raises one ConfigError whose every problem
names a field; never a traceback. Plus the layout checks that must refuse a run before any work."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cptscale.config.problems import ConfigError
from cptscale.validation import parse_config

ROOT = Path(__file__).resolve().parents[1]
#: examples per run of the property (the default suite); CPTSCALE_FUZZ_EXAMPLES raises it for a long run
EXAMPLES = int(os.environ.get("CPTSCALE_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """The fault study's config with its local corpora present (a valid starting point)."""
    d = tmp_path_factory.mktemp("fuzz")
    for lang in ("en", "zh"):
        (d / f"{lang}.jsonl").write_text('{"text": "a document of some words"}\n')
    return yaml.safe_load((ROOT / "tests" / "workflows" / "faults.yaml").read_text()), d


SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 1e308, -1e-308, 0.5, "", "0", "d80l2", "en", "xx", "d64l2"]),
    st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with 1-3 mutations: a value replaced (any type), a key removed, or an unknown key added."""
    data = copy.deepcopy(cfg)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(VALUES)
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent.get(path[-1]) if isinstance(parent, dict) else None, dict):
            parent[path[-1]][draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
        else:
            data[draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
    return data


STATS = {"examples": 0, "accepted": 0, "rejected": 0, "problems": 0}


def test_generated_configs_never_traceback_and_every_rejection_names_a_field(base, monkeypatch) -> None:
    cfg, where = base
    monkeypatch.setenv("CPTSCALE_OFFLINE", "1")

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated(cfg))
    def check(data: dict[str, Any]) -> None:
        STATS["examples"] += 1
        try:
            with _no_fail():
                parse_config(data, base_dir=where, where="fuzz.yaml")
        except ConfigError as exc:
            STATS["rejected"] += 1
            STATS["problems"] += len(exc.found)
            assert exc.found, "a ConfigError without problems"
            for p in exc.found:
                assert p.path, f"a problem that names no field: {p}"
            return
        STATS["accepted"] += 1

    check()
    print(f"config fuzzing: {STATS['examples']} generated configs, {STATS['rejected']} rejected with "
          f"{STATS['problems']} problems (each naming its field), {STATS['accepted']} accepted, 0 tracebacks")
    assert STATS["rejected"] > STATS["examples"] // 2  # the generator does produce bad configs


class _no_fail:
    """Warnings (an unreachable registry, a rounded batch) are fine; they must not be errors here."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def _problems(cfg: dict[str, Any], where: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, base_dir=where, where="t.yaml")
    return {p.path: str(p) for p in info.value.found}


def test_d80l2_keeps_the_real_reason(base) -> None:
    cfg, where = copy.deepcopy(base[0]), base[1]
    cfg["ladder"]["sizes"] = ["d16l2", "d80l2"]
    line = _problems(cfg, where)["ladder.sizes.1"]
    assert "hidden must be a multiple of 32" in line and "not in the ladder" not in line, line


@pytest.mark.parametrize(("size", "layout", "field", "needle"), [
    ("d48l2", {"tp": 2}, "tp", "heads 3 not divisible by tp 2; allowed tp: 1, 3"),
    ("d48l2", {"pp": 4}, "pp", "layers 2 not divisible by pp 4; allowed pp: 1, 2"),
    ("d32l2", {"tp": 4}, "tp", "heads 2 not divisible by tp 4"),
])
def test_impossible_layouts_are_refused_at_validate_time(base, size, layout, field, needle) -> None:
    cfg, where = copy.deepcopy(base[0]), base[1]
    cfg["parallel"] = {"per_size": {size: layout}}
    line = _problems(cfg, where)[f"parallel.per_size.{size}.{field}"]
    assert needle in line, line


def test_layout_over_gpus_per_node_and_batch_over_dp_are_refused(base) -> None:
    """A run larger than a node spans several nodes, but only evenly: dp 8 on 4-GPU nodes is 2 nodes,
    dp 5 cannot be split evenly over 2 nodes and is refused naming slurm.gpus_per_node."""
    cfg, where = copy.deepcopy(base[0]), base[1]
    cfg["slurm"] = {"gpus": True, "gpus_per_node": 4}
    cfg["parallel"] = {"per_size": {"d16l2": {"dp": 5}, "d32l2": {"dp": 8}}, "default": {"dp": 2}}
    cfg["train"]["batch_tokens"] = 256  # 8 sequences of 32: one micro-batch of 8 per step, so dp 2 cannot fit
    found = _problems(cfg, where)
    assert "slurm.gpus_per_node = 4" in found["parallel.per_size.d16l2"], found
    assert "parallel.per_size.d32l2" not in found, found
    assert "micro_batch_size x dp x seq_length" in found["train.batch_tokens"]


def test_a_valid_layout_passes(base) -> None:
    cfg, where = copy.deepcopy(base[0]), base[1]
    cfg["parallel"] = {"per_size": {"d32l2": {"tp": 2, "pp": 2}}}
    assert parse_config(cfg, base_dir=where, where="t.yaml").layout("d32l2").world == 4
