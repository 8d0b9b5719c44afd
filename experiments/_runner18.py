"""runner18 study: steps no budget could end, bitwise checks against main, a config fuzz.

``bitwise``: a 4-contender run (L-BFGS without and with a line search, HF with ``max_iter: 3``,
Adam; 6 steps, float64) through ``hessfree run``; prints the SHA-256 of each contender's
final weights. Run it with main's package on ``PYTHONPATH`` and with this branch's: the
hashes must agree (the cut's test is asked at every L-BFGS evaluation and after every HF step
of a ``max_iter`` > 1 call, and must change nothing while it says no).
``endless``: L-BFGS and HF with ``max_iter: 2**63 - 1`` and zero tolerances under
``budget.seconds: 1``: the exit status, steps and wall time (main never ends: not run there).
``fuzz N``: N random configs from ``tests/_config_fuzz.py`` (1-3 values replaced) through the
CLI with a one-step budget; counts of ran / refused / DEFECT, each defect printed.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_runner18.py bitwise endless fuzz 2000
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _config_fuzz import base_config, cases, key_paths, outcome  # noqa: E402

from hessfree.train.checkpoint import load_checkpoint  # noqa: E402
from hessfree.train.cli import main as cli  # noqa: E402


def _run(root: Path, raw: dict, *extra: str) -> tuple[int, str]:
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli(["run", str(config), "--quiet", "--out", str(root / "run"), *extra])
    return code, err.getvalue()


def bitwise(root: Path) -> None:
    raw = base_config(root)
    raw.update(dtype="float64", budget={"steps": 6}, batch_size=16)
    raw["optimizers"] = [
        {"name": "lbfgs", "label": "lbfgs", "max_iter": 5},
        {"name": "lbfgs", "label": "wolfe", "max_iter": 5, "line_search_fn": "strong_wolfe"},
        {"name": "hessianfree", "label": "hf3", "max_iter": 3},
        {"name": "adam", "label": "adam"},
    ]
    code, err = _run(root, raw)
    print(f"bitwise: exit {code} {err.strip()[:200]}")
    for label in ("lbfgs", "wolfe", "hf3", "adam"):
        model = load_checkpoint(root / "run" / "checkpoints" / f"{label}.pt")["model"]
        h = hashlib.sha256()
        for key in sorted(model):
            h.update(model[key].numpy().tobytes())
        print(f"  {label:6s} {h.hexdigest()[:16]}")


def endless(root: Path) -> None:
    for name, extra in (("lbfgs", {}), ("hessianfree", {})):
        sub = root / name
        sub.mkdir()
        raw = base_config(sub)
        raw["budget"] = {"seconds": 1.0}
        raw["optimizers"] = [
            {"name": name, "max_iter": 2**63 - 1, "tolerance_grad": 0.0, "tolerance_change": 0.0}
            | extra
        ]
        t = time.perf_counter()
        code, err = _run(sub, raw)
        wall = time.perf_counter() - t
        summary = yaml.safe_load((sub / "run" / "summary.json").read_text())
        entry = summary["optimizers"][name]
        print(
            f"endless {name}: exit {code}, {entry['stop_reason']} after {entry['steps']} step(s), "
            f"{entry['seconds']:.2f} s of training, {wall:.1f} s wall"
        )


def fuzz(root: Path, n: int) -> None:
    from hypothesis import HealthCheck, given, settings

    paths = key_paths(root)
    counts: dict[str, int] = {}

    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cases(paths))
    def one(case):
        k = sum(counts.values())
        kind, why = outcome(root, case, k)
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "DEFECT":
            print(f"DEFECT {case!r}\n{why}", flush=True)

    one()
    print(f"fuzz {n}: {counts}")


def main(parts: list[str]) -> None:
    torch.set_num_threads(1)
    while parts:
        what = parts.pop(0)
        root = Path(tempfile.mkdtemp(prefix=f"runner18-{what}-"))
        if what == "fuzz":
            fuzz(root, int(parts.pop(0)))
        else:
            {"bitwise": bitwise, "endless": endless}[what](root)


if __name__ == "__main__":
    main(sys.argv[1:] or ["bitwise", "endless"])
