"""runner17 study: `hessfree run` against integers past int64, non-finite floats in every float
key, 200 contenders, and Windows-reserved labels.

``huge``: every integer key of the runner (global, entry, torch optimizers, HessianFree,
K-FAC, schedule) set to 2**63 - 1, 10**19 and 2**64 on a tiny npz config, through
``hessfree run --check`` and, when accepted, a run (in-process ``main``; a budget key gets a
0.5 s wall-clock budget beside it so the run ends). ``floats``: every float key set to
``.inf``, ``-.inf`` and ``.nan`` the same way. ``many``: 1 / 50 / 200 Adam entries: the time
of ``--check`` and of a one-step run with plots. Each prints one line per case: the key and
value, ``refused`` (the message's first 150 characters), ``ran`` (exit status), or
``TRACEBACK`` (the exception escaping ``main``, a defect). Run against the package on
``PYTHONPATH`` (this checkout, or ``/work/main`` for main's behaviour)::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_runner17.py huge floats many
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

_HUGE = (2**63 - 1, 10**19, 2**64)
_NONFINITE = (".inf", "-.inf", ".nan")


def _tiny(root: Path) -> Path:
    """A 2-step, 2-contender config on a 240-case, 3-class npz file (seeded)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    np.savez(root / "tiny.npz", x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    raw = {
        "num_threads": 1,
        "data": {"name": "npz", "path": str(root / "tiny.npz")},
        "model": {"name": "mlp", "hidden_sizes": [4]},
        "loss": {"name": "cross_entropy"},
        "optimizers": [
            {"name": "hessianfree", "cg_max_iter": 5, "precond": None},
            {"name": "adam", "lr": 0.01},
        ],
        "budget": {"steps": 2},
        "batch_size": 16,
        "output": {"plots": False, "dir": str(root / "runs")},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _call(argv: list[str]) -> tuple[str, str]:
    """``main(argv)`` in-process: (outcome, detail)."""
    from hessfree.train.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except BaseException as exc:  # noqa: BLE001 -- a traceback is what the probe looks for
        return "TRACEBACK", f"{type(exc).__name__}: {' '.join(str(exc).split())[:150]}"
    text = " ".join(err.getvalue().split())
    return str(code), text[:150]


def _probe(root: Path, config: Path, overrides: list[str], label: str) -> None:
    outcome, detail = _call(["run", str(config), "--check", *overrides])
    if outcome == "0":
        out = root / f"run-{abs(hash(tuple(overrides)))}"
        outcome, detail = _call(["run", str(config), "--quiet", "--out", str(out), *overrides])
        outcome = f"ran, exit {outcome}" if outcome != "TRACEBACK" else outcome
    elif outcome == "2":
        outcome = "refused"
    print(f"| {label} | {outcome} | {detail} |", flush=True)


#: (key, overrides that make the key apply) for every integer key.
_INT_KEYS = [
    ("budget.steps", ["budget.seconds=0.5"]),
    ("optimizers.1.budget.steps", ["budget.seconds=0.5"]),
    ("eval.every_steps", []),
    ("eval.max_cases", []),
    ("eval.batch_size", []),
    ("output.checkpoint_every", []),
    ("batch_size", []),
    ("curvature_batch_size", []),
    ("seed", []),
    ("num_threads", []),
    ("data.num_classes", []),
    ("model.hidden_sizes.0", []),
    ("model.sparse_connections", ["model.init=sparse"]),
    ("optimizers.0.cg_max_iter", []),
    ("optimizers.0.cg_min_iter", ["optimizers.0.cg_max_iter=auto"]),
    ("optimizers.0.cg_check_every", []),
    ("optimizers.0.line_search_max_iter", ["optimizers.0.line_search=armijo"]),
    ("optimizers.0.max_iter", []),
    ("optimizers.0.max_eval", []),
    ("optimizers.0.max_failures", []),
    ("optimizers.0.seed", []),
    ("optimizers.0.precond.refresh", ["optimizers.0.precond={name: kfac}"]),
    ("optimizers.0.precond.num_probes", ["optimizers.0.precond={name: kfac}"]),
    ("optimizers.0.precond.max_dense", ["optimizers.0.precond={name: kfac}"]),
    ("optimizers.0.precond.rank", ["optimizers.0.precond={name: kfac}"]),
    ("optimizers.1.batch_max", ["optimizers.1.batch_growth=1.5"]),
    ("optimizers.1.batch_multiple", ["optimizers.1.batch_growth=1.5"]),
    (
        "optimizers.0.curvature_fraction_full_steps",
        ["optimizers.0.batch_growth=1.5", "optimizers.0.curvature_fraction=0.5"],
    ),
    # tolerance_change 1e300: L-BFGS stops after one iteration (its step never ends otherwise)
    ("optimizers.1.max_iter", ["optimizers.1.name=lbfgs", "optimizers.1.tolerance_change=1e300"]),
    ("optimizers.1.max_eval", ["optimizers.1.name=lbfgs", "optimizers.1.tolerance_change=1e300"]),
    ("optimizers.1.history_size", ["optimizers.1.name=lbfgs", "optimizers.1.lr=1"]),
]


def huge(root: Path, config: Path) -> None:
    print("\n### huge integers\n\n| key = value | outcome | message |\n|---|---|---|")
    for key, extra in _INT_KEYS:
        for value in _HUGE:
            _probe(root, config, [*extra, f"{key}={value}"], f"`{key}` = {value}")


def _float_keys() -> list[tuple[str, list[str]]]:
    from hessfree import HFSettings

    keys: list[tuple[str, list[str]]] = [
        ("budget.epochs", []),
        ("budget.seconds", []),
        ("eval.every_seconds", []),
        ("distributed.timeout_seconds", []),
        ("optimizers.1.lr", []),
        ("optimizers.1.betas.0", []),
        ("optimizers.1.eps", []),
        ("optimizers.1.weight_decay", []),
        ("optimizers.1.batch_growth", []),
        ("optimizers.0.curvature_fraction", []),
        ("optimizers.0.precond.decay", ["optimizers.0.precond={name: kfac}"]),
        ("optimizers.0.precond.relative_damping", ["optimizers.0.precond={name: kfac}"]),
    ]
    for name in ("lr", "momentum", "dampening", "weight_decay"):
        keys.append((f"optimizers.1.{name}", ["optimizers.1.name=sgd"]))
    for name in ("lr", "tolerance_grad", "tolerance_change"):
        keys.append((f"optimizers.1.{name}", ["optimizers.1.name=lbfgs"]))
    for name, default in HFSettings.defaults().items():
        if name in HFSettings.PYTHON_ONLY or isinstance(default, bool):
            continue
        if isinstance(default, (float, int)) or default == "auto" or default is None:
            keys.append((f"optimizers.0.{name}", []))
    return keys


def floats(root: Path, config: Path) -> None:
    print("\n### non-finite floats\n\n| key = value | outcome | message |\n|---|---|---|")
    for key, extra in _float_keys():
        for value in _NONFINITE:
            _probe(root, config, [*extra, f"{key}={value}"], f"`{key}` = {value}")
    # keys of other sections: only the check (their data or model is another config's)
    for section in (
        "data={name: digits, test_fraction: VALUE}",
        "data={name: curves, num_train: 50, num_test: 10, thickness: VALUE}",
        "model={name: rnn, spectral_radius: VALUE}",
    ):
        for value in _NONFINITE:
            override = section.replace("VALUE", value)
            outcome, detail = _call(["run", str(config), "--check", override])
            print(f"| `{override}` | {'refused' if outcome == '2' else outcome} | {detail} |")


def many(root: Path, config: Path) -> None:
    print("\n### many contenders\n\n| entries | --check s | run s (1 step, plots) | exit |")
    print("|---|---|---|---|")
    raw = yaml.safe_load(config.read_text())
    for count in (1, 50, 200):
        raw["optimizers"] = [
            {"name": "adam", "lr": 0.01, "label": f"adam{i}"} for i in range(count)
        ]
        raw["budget"] = {"steps": 1}
        raw["output"] = {**raw["output"], "plots": True}
        path = root / f"many{count}.yaml"
        path.write_text(yaml.safe_dump(raw))
        start = time.perf_counter()
        _call(["run", str(path), "--check"])
        check = time.perf_counter() - start
        start = time.perf_counter()
        outcome, detail = _call(["run", str(path), "--quiet", "--out", str(root / f"m{count}")])
        print(f"| {count} | {check:.2f} | {time.perf_counter() - start:.2f} | {outcome} {detail} |")


def main(parts: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    print(f"load average: {os.getloadavg()}; hessfree from {__import__('hessfree').__file__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = _tiny(root)
        for part in parts or ["huge", "floats", "many"]:
            {"huge": huge, "floats": floats, "many": many}[part](root, config)


if __name__ == "__main__":
    main(sys.argv[1:])
