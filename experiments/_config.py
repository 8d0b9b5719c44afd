"""Adversarial audit of the YAML runner (topic "config", 2026-12-02).

Every key of every shipped config gets each of a list of bad values (wrong type, YAML 1.1
booleans, a quoted ``'1e-3'``, ``.inf``, ``.nan``, null, negative, zero, huge), is deleted, or
gets a misspelt sibling; each mutated config runs through the real command line, in this
process, on shrunken data with a 2-step budget. An outcome is one of:

- ``refused``: exit 2, a one-paragraph ``hessfree: error:`` message, no traceback, and nothing
  written (no run directory);
- ``ran``: exit 0 (the value is allowed);
- ``LATE``: exit 2 after the run directory was created (refused after work began);
- ``TRACEBACK``: any other exit code or an exception escaping ``main``;
- ``slow``: accepted, but still running after :data:`SECONDS` (a huge budget; not a bug).

    PYTHONPATH=. python experiments/_config.py [--configs quickstart,rnn_addition] [--limit N]

Prints a table of the non-``refused``/``ran`` outcomes and a count per outcome. No timing is
measured; nothing is downloaded (MNIST's path does not exist, so its runs stop at the data).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch
import yaml

from hessfree.train.cli import main
from hessfree.train.config import safe_load_yaml

REPO = Path(__file__).resolve().parents[1]

#: Bad (or odd) values every key gets. Strings are what a careless user types in YAML.
VALUES: list[Any] = [
    "abc",
    "1e-3",  # a string: the value quoted
    "yes",
    True,
    False,
    None,
    [1],
    {"a": 1},
    -1,
    0,
    0.5,
    float("inf"),
    float("nan"),
    10**30,
    1e300,
]


def shrink(raw: dict[str, Any]) -> dict[str, Any]:
    """The config on tiny data, 2 steps per optimizer, evaluation and checkpoint every step."""
    raw = copy.deepcopy(raw)
    raw["num_threads"] = 1
    raw["device"] = "cpu"
    data = raw["data"]
    if data["name"] == "curves":
        data.update(num_train=300, num_test=100)
    if data["name"] == "addition":
        data.update(num_train=300, num_test=100, length=10)
    if data["name"] == "mnist1d":
        data.update(num_samples=600)
    raw["budget"] = {"steps": 2}
    raw["eval"] = {"every_steps": 1, "max_cases": 100}
    raw["output"] = {"checkpoint_every": 1, "plots": False}

    def small(entry: dict[str, Any]) -> None:
        for key in ("batch_size", "curvature_batch_size", "batch_max"):
            if isinstance(entry.get(key), int):
                entry[key] = min(entry[key], 64 if key != "curvature_batch_size" else 16)
        if entry.get("batch_max") is not None:
            entry["batch_max"] = max(entry["batch_max"], entry.get("batch_size") or 0)
        if "budget" in entry:
            entry["budget"] = {"steps": 1}

    for entry in raw["optimizers"]:
        if "phases" in entry:
            for phase in entry["phases"]:
                small(phase)
                phase["budget"] = {"steps": 1}
            entry.pop("budget", None)
        else:
            small(entry)
    return raw


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += paths(value, (*prefix, i))
    return out


def mutations(raw: dict[str, Any]):
    """``(description, mutated raw)`` for every key and every bad value, deletion and typo."""
    for path in paths(raw):
        *parents, last = path
        where = ".".join(map(str, path))
        for value in VALUES:
            new = copy.deepcopy(raw)
            node = new
            for key in parents:
                node = node[key]
            node[last] = value
            yield f"{where}={value!r}", new
        new = copy.deepcopy(raw)
        node = new
        for key in parents:
            node = node[key]
        if isinstance(node, dict):
            value = node.pop(last)
            yield f"del {where}", copy.deepcopy(new)
            node[f"{last}s" if not str(last).endswith("s") else str(last)[:-1]] = value
            yield f"typo {where}", new


class _Slow(BaseException):
    """Raised by the alarm: the run outlived :data:`SECONDS` (a long budget, not a bug)."""


def _alarm(signum: int, frame: object) -> None:
    raise _Slow


#: A run that takes longer is stopped and counted as ``slow`` (e.g. ``budget.steps: 1e30``).
SECONDS = 30


def attempt(raw: dict[str, Any], tmp: Path) -> tuple[str, str]:
    """Check, then run, the mutated config through the CLI; its outcome and the message."""
    config, out = tmp / "c.yaml", tmp / "run"
    shutil.rmtree(out, ignore_errors=True)
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    stderr, stdout = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            code = main(["run", str(config), "--out", str(out), "--check"])
            if code == 0:
                signal.alarm(SECONDS)
                code = main(["run", str(config), "--out", str(out), "--quiet", "--no-progress"])
    except SystemExit as err:
        code = err.code
    except _Slow:
        return "slow", ""
    except BaseException:  # noqa: BLE001 - the point is to see everything that escapes
        return "TRACEBACK", traceback.format_exc().strip().splitlines()[-1]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = stderr.getvalue().strip()
    if code == 0:
        return "ran", ""
    if code == 2 and "Traceback" not in err and err.startswith("hessfree: error:"):
        return ("LATE" if out.exists() else "refused"), err
    return "TRACEBACK", f"exit {code}: {err[-300:]}"


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="", help="comma-separated stems (default: all)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many cases each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stems = [s for s in args.configs.split(",") if s] or sorted(
        p.stem for p in (REPO / "configs").glob("*.yaml")
    )
    print(f"load average at start: {os.getloadavg()}")
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stem in stems:
            base = shrink(safe_load_yaml((REPO / "configs" / f"{stem}.yaml").read_text()))
            outcome, message = attempt(base, Path(tmp))
            print(f"{stem}: base config {outcome} {message[:200]}", flush=True)
            for n, (what, raw) in enumerate(mutations(base)):
                if args.limit and n >= args.limit:
                    break
                outcome, message = attempt(raw, Path(tmp))
                counts[outcome] = counts.get(outcome, 0) + 1
                if outcome in ("LATE", "TRACEBACK"):
                    print(f"| {stem} | `{what}` | {outcome} | {message[:300]} |", flush=True)
    print(f"outcomes: {counts}")
    print(f"load average at end: {os.getloadavg()}")
    return 0 if not counts.get("LATE") and not counts.get("TRACEBACK") else 1


if __name__ == "__main__":
    sys.exit(main_())
