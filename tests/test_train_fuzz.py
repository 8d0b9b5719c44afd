"""Property: any mutation of a shipped config is accepted or refused with exit code 2, never a
traceback (issue 12, part 2). In-process ``hessfree run CONFIG --check``: no data is loaded,
so a few hundred examples take seconds. ``derandomize=True``: the same examples every run."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from hessfree.train.cli import main
from hessfree.train.config import ConfigError, load_config, safe_load_yaml
from hessfree.train.loop import default_run_dir, run_dir_problems

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.HealthCheck

DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
CONFIGS = {p.stem: safe_load_yaml(p.read_text()) for p in SHIPPED}

EXTREME_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**31, 2**32, 2**63, 2**64, 10**30, -(10**30), 1e-320, 1e300, -1e300]
    + [math.inf, -math.inf, math.nan, 0.5, 1.0, 1e29, 1e11, 2.0**53 + 2]
)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["", "..", "../x", "a/b", "a\0b", "é", "\u202e", "null", "~", "1e-3"]
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | EXTREME_NUMBERS | TEXT
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def mutated(draw) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(CONFIGS)))
    raw = copy.deepcopy(CONFIGS[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(raw)
        path = draw(st.sampled_from(paths))
        *parents, last = path
        node = raw
        for key in parents:
            node = node[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            node[last] = draw(VALUES)
        elif action == "delete":
            del node[last]
        elif isinstance(node, dict):
            node[draw(TEXT)] = draw(VALUES)
        else:
            node.append(draw(VALUES))
    return name, raw


def _check(path: Path) -> None:
    """What ``hessfree run PATH --check`` does, less printing the config: load, validate and
    check the run directory. ConfigError is exit 2; anything else escaping is a traceback."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert len(str(err)) < 20_000  # one bounded line per problem
        return
    run_dir_problems(default_run_dir(cfg))


def test_check_of_every_shipped_config_exits_0(capsys):
    for path in SHIPPED:
        assert main(["run", str(path), "--check"]) == 0, capsys.readouterr().err


@settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=mutated())
def test_mutated_shipped_configs_run_or_exit_2(case, tmp_path):
    name, raw = case
    path = tmp_path / f"{name}.yaml"
    try:
        text = yaml.dump(raw, Dumper=DUMPER, allow_unicode=True)
    except (yaml.YAMLError, ValueError):  # not representable as YAML: nothing to test
        return
    path.write_text(text, encoding="utf-8")
    _check(path)


@settings(
    max_examples=80,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(sorted(CONFIGS)),
    edits=st.lists(st.tuples(st.floats(0, 1), TEXT), min_size=1, max_size=3),
)
def test_unicode_spliced_into_shipped_config_text_runs_or_exits_2(name, edits, tmp_path):
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    for where, insert in edits:
        at = int(where * len(text))
        text = text[:at] + insert + text[at:]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    _check(path)
