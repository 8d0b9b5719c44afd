"""flaky19: a pytest plugin that shakes the suite's hidden dependencies loose.

Three probes for tests that pass by the order they run in (experiments/README.md,
``### flaky19``):

- ``FLAKY19_SEED=<int>``: before each test's call, seed torch's, NumPy's and ``random``'s global
  generators from (seed, the test's node id). A test that draws unseeded numbers then meets
  other numbers than it met after its neighbours; run two or three seeds: a test that fails
  under one depended on what ran before it.
- ``FLAKY19_LEAKS=<path>``: after each test, compare the process state a test could leave
  changed (torch's default dtype, thread count, grad and inference mode, deterministic and
  anomaly modes, matmul precision, NumPy's error state, the current directory, the environment,
  ``sys.path``, the handlers of SIGINT/SIGTERM/SIGHUP/SIGUSR1, an initialised process group)
  with the state before it, and append one line per test that changed any.
- ``FLAKY19_SHUFFLE=<int>``: run the collected tests in an order shuffled with that seed, across
  files and within them (pytest's own order is by file, then by definition): a test that only
  passes after, or before, another one fails under some order.

Used from the repository root, beside the ordinary command::

    FLAKY19_SEED=1 FLAKY19_LEAKS=/tmp/leaks.txt PYTHONPATH=$PWD:$PWD/experiments \\
        python3 -m pytest -q -p _flaky19

No probe changes a test; with no variable set the plugin does nothing.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from typing import Any

import numpy as np
import pytest
import torch

_SEED = os.environ.get("FLAKY19_SEED")
_LEAKS = os.environ.get("FLAKY19_LEAKS")
_SHUFFLE = os.environ.get("FLAKY19_SHUFFLE")
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


def _state() -> dict[str, Any]:
    return {
        "default dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "matmul precision": torch.get_float32_matmul_precision(),
        "numpy errstate": np.geterr(),
        "cwd": os.getcwd(),
        "environ": dict(os.environ),
        "sys.path": list(sys.path),
        "signals": {s.name: signal.getsignal(s) for s in _SIGNALS},
        "process group": torch.distributed.is_available() and torch.distributed.is_initialized(),
    }


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for key, was in before.items():
        now = after[key]
        if was == now:
            continue
        if isinstance(was, dict):
            changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            out.append(f"{key}: {', '.join(changed)}")
        elif isinstance(was, list):
            out.append(
                f"{key}: +{[p for p in now if p not in was]} -{[p for p in was if p not in now]}"
            )
        else:
            out.append(f"{key}: {was!r} -> {now!r}")
    return out


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _SHUFFLE is not None:
        random.Random(int(_SHUFFLE)).shuffle(items)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if _SEED is not None:
        seed = int(hashlib.sha256(f"{_SEED}:{item.nodeid}".encode()).hexdigest()[:8], 16)
        torch.manual_seed(seed)
        np.random.seed(seed)  # noqa: NPY002 (the legacy global generator is what leaks)
        random.seed(seed)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    before = _state() if _LEAKS else None
    yield
    if before is not None:
        changed = _differences(before, _state())
        if changed:
            with open(_LEAKS, "a", encoding="utf-8") as f:
                f.write(f"{item.nodeid} | {' ; '.join(changed)}\n")
