"""Configs for fuzzing ``hessfree run``: a small valid config with a few values replaced.

Shared by ``tests/test_runner18.py`` (a handful of examples by default, more under ``slow``)
and ``experiments/_runner18.py fuzz`` (a long sweep). A case is a list of ``(dotted path,
value)`` replacements of the base config (:func:`base_config`): its keys, as ``--check``
resolves them (every optimizer's hyperparameters included), and a few unknown ones; values
of every YAML type, at and past the edges (2**63, NaN, NUL, Unicode, nested containers).
:func:`outcome` runs one case through the CLI in-process with a one-step budget, every
budget's ``seconds`` capped at :data:`SECONDS` (a valid config may ask for 2**31 steps).
"""

from __future__ import annotations

import contextlib
import io
import math
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import strategies as st

from hessfree.train.cli import main

BASE = {
    "name": "fuzz",
    "num_threads": 1,
    "model": {"name": "mlp", "hidden_sizes": [4]},
    "loss": {"name": "cross_entropy"},
    "optimizers": [
        {"name": "adam"},
        {"name": "hessianfree", "cg_max_iter": 5},
        {"name": "lbfgs", "max_iter": 3},
        {"name": "sgd"},
    ],
    "budget": {"steps": 1},
    "batch_size": 16,
    "eval": {"every_steps": 1},
    "output": {"checkpoint_every": 1, "plots": False, "progress": "never"},
}


def tiny_npz(path: Path) -> Path:
    """64 cases of 6 features, 3 classes (seeded)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    np.savez(path, x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    return path


def base_config(root: Path) -> dict[str, Any]:
    """:data:`BASE` on a tiny npz file under ``root``, its run directories under it too."""
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["data"] = {"name": "npz", "path": str(tiny_npz(root / "tiny.npz"))}
    raw["output"]["dir"] = str(root / "runs")
    return raw


def _leaves(value: Any, path: str = "") -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaves(v, f"{path}{k}.")] + (
            [path.rstrip(".")] if path else []
        )
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaves(v, f"{path}{i}.")] + [
            path.rstrip(".")
        ]
    return [path.rstrip(".")]


def key_paths(root: Path) -> list[str]:
    """Every dotted path of the base config as ``--check`` resolves it, sections too."""
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(base_config(root)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["run", str(path), "--check"]) == 0
    resolved = yaml.safe_load(out.getvalue())
    return sorted(set(_leaves(resolved))) + ["unknown_key", "model.extra", "optimizers.0.foo"]


_TEXT = st.text(
    alphabet=st.sampled_from(
        list("aZ09_.-/ :$")
        + ["\x00", "\t", "\n", "\x7f", "\u00e9", "\u00b9", "\u200b", "\u202e", "\U0001f600"]
        + ["\u4e2d", "\ufeff"]
    ),
    max_size=8,
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, 2, 3, -1, 7, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 10**30, -(2**63) - 1]),
    st.integers(-3, 40),
    st.sampled_from([0.0, -0.0, 0.5, 1.5, 1e-300, 5e-324, 1e300, math.inf, -math.inf, math.nan]),
    st.floats(-10, 10, allow_nan=False),
    _TEXT,
    st.sampled_from(["adam", "hessianfree", "lbfgs", "sgd", "mlp", "rnn", "npz", "auto", "null"]),
)
VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=3),
    st.dictionaries(_TEXT, _SCALARS, max_size=2),
)


def cases(paths: list[str]) -> st.SearchStrategy[list[tuple[str, Any]]]:
    """1 to 3 replacements of the base config's values."""
    return st.lists(st.tuples(st.sampled_from(paths), VALUES), min_size=1, max_size=3)


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    """Replace ``path``'s value; a path an earlier replacement made impossible (a name under
    what is now a list) is skipped."""
    node: Any = raw
    parts = path.split(".")
    for part in parts[:-1]:
        if isinstance(node, list) and not part.isdigit():
            return
        key: Any = int(part) if isinstance(node, list) else part
        if isinstance(node, list):
            if key >= len(node):
                return
            if not isinstance(node[key], (dict, list)):
                node[key] = {}
        else:
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
        node = node[key]
    last: Any = parts[-1]
    if isinstance(node, list):
        if last.isdigit() and int(last) < len(node):
            node[int(last)] = value
    else:
        node[last] = value


#: Seconds each budget is capped at: a valid config may ask for 2**31 steps or an L-BFGS step
#: of 2**63 - 1 iterations, which would run on; a number past the cap is lowered to it.
SECONDS = 2.0


def _bound(raw: dict[str, Any]) -> None:
    """Cap every budget's ``seconds`` (top level, entries, phases) at :data:`SECONDS`; a
    value that is not a number is left for the config to refuse."""
    budgets = [raw.get("budget")]
    entries = raw.get("optimizers")
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict):
            budgets.append(entry.get("budget"))
            phases = entry.get("phases")
            for phase in phases if isinstance(phases, list) else ():
                if isinstance(phase, dict):
                    budgets.append(phase.get("budget"))
    for budget in budgets:
        if not isinstance(budget, dict):
            continue
        seconds = budget.get("seconds")
        number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
        if seconds is None or (number and seconds > SECONDS):
            budget["seconds"] = SECONDS


def outcome(root: Path, case: list[tuple[str, Any]], index: int) -> tuple[str, str]:
    """Run ``case`` (one-step budgets) through ``main``: ``('ran', code)``, ``('refused',
    message)``, or ``('DEFECT', why)`` (an exception out of ``main``, exit 1, a refusal not
    worded as one, a traceback on stderr)."""
    raw = base_config(root)
    for path, value in case:
        _set(raw, path, value)
    _bound(raw)
    try:
        text = yaml.safe_dump(raw, allow_unicode=True)
    except yaml.YAMLError:  # a value YAML cannot write: nothing a user could give
        return "skipped", ""
    config = root / f"case{index}.yaml"
    config.write_text(text, encoding="utf-8")
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["run", str(config), "--quiet", "--out", str(root / f"run{index}")])
    except BaseException:  # noqa: BLE001 - what the CLI let escape
        return "DEFECT", traceback.format_exc(limit=-3)
    message = err.getvalue()
    if "Traceback" in message:
        return "DEFECT", message[-2000:]
    if code in (0, 4):  # ran (4: a contender diverged; the others' results are complete)
        return "ran", str(code)
    if code == 2 and message.startswith("hessfree: error:"):
        return "refused", message.strip()
    return "DEFECT", f"exit {code}: {message[-2000:]}"
