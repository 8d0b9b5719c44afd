"""floor19: ``min_damping_cases`` through the runner on the problem that asked for it.

Stop 48 (experiments/README.md, "lead, stop 48") found, in the scorecard's own harness, that a
λ floor falling as 75 / batch let a batch grown 0.15 % a step win where the fixed floor 0.3
capped it. This runs the same two regimes as ``hessfree run`` entries (a config dict, the
runner's ``Runner``): CURVES, 5,000 training images, the 784-400-200-100-50-25-6 sigmoid
autoencoder with sparse init, per-case summed cross-entropy, batch 250 × 1.0015 a step,
curvature on a quarter, ``cg_max_iter`` 2, K-FAC rank 32 refreshed every second step,
``relative_min_damping`` 0; one entry with ``min_damping: 0.3``, one with
``min_damping_cases: 75``. Compared at equal step counts (deterministic, so the load of the
shared machine does not enter; the two entries' steps cost about the same, both batches
growing alike), with each evaluation's floor and λ from ``metrics.jsonl``.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_floor19.py [steps] [out]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_floor19.py fuzz

``fuzz`` runs the new key against its neighbours through the CLI (``tests/_config_fuzz.py``'s
``outcome``: one-step budgets, exit 0/4 or a worded exit 2, else a defect): 16 values of
``min_damping_cases`` (tiny, huge, 2**63, -0.0, NaN, null, text, a list) × 30 values of
``damping``, ``max_damping``, ``min_damping``, ``relative_min_damping``, ``batch_size`` and
``adapt_damping`` on the fuzz's HF entry.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from hessfree.train.config import parse_config
from hessfree.train.loop import Runner
from hessfree.train.metrics import read_metrics


def config(steps: int, out: Path) -> dict:
    common = {
        "name": "hessianfree",
        "cg_max_iter": 2,
        "precond": {"name": "kfac", "rank": 32, "refresh": 2},
        "relative_min_damping": 0.0,
        "batch_size": 250,
        "batch_growth": 1.0015,
        "curvature_fraction": 0.25,
    }
    return {
        "name": "floor19",
        "seed": 0,
        "num_threads": 1,
        "data": {"name": "curves", "num_train": 5000, "num_test": 1000},
        "model": {
            "name": "autoencoder",
            "layer_sizes": [784, 400, 200, 100, 50, 25, 6],
            "activation": "sigmoid",
            "init": "sparse",
            "sparse_connections": 15,
        },
        "loss": {"name": "bce_with_logits", "reduction": "sum_per_case"},
        "optimizers": [
            {**common, "label": "fixed-0.3", "min_damping": 0.3},
            {**common, "label": "cases-75", "min_damping_cases": 75},
        ],
        "budget": {"steps": steps},
        "eval": {"every_steps": max(1, steps // 8)},
        "output": {"dir": str(out), "plots": False, "checkpoint_every": None},
    }


def fuzz() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _config_fuzz import outcome  # noqa: PLC0415

    torch.set_num_threads(1)
    floors = [1e-300, 5e-324, 1e-8, 0.5, 16, 75, 1e8, 1e300, 2**63, 10**30, -0.0, math.nan,
              None, "auto", [1], 1]  # fmt: skip
    others = {
        "damping": [None, 0.0, 1e-9, 1.0, "auto", 1e10],
        "max_damping": [None, 0.0, 1e-9, 1.0, "auto", 1e10],
        "min_damping": [None, 0.0, 1e-9, 1.0, "auto", 1e10],
        "relative_min_damping": [None, 0.0, 1e-9, 1.0, "auto", 1e10],
        "batch_size": [None, 1, 48, 2**40],
        "adapt_damping": [False, True],
    }
    root = Path(tempfile.mkdtemp(prefix="floor19-fuzz-"))
    counts: dict[str, int] = {}
    i = 0
    for c in floors:
        for key, values in others.items():
            for v in values:
                case = [("optimizers.1.min_damping_cases", c)]
                if v is not None or key == "batch_size":
                    case.append((f"optimizers.1.{key}", v))
                kind, message = outcome(root, case, i)
                i += 1
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "DEFECT":
                    print("DEFECT", case, message[-600:])
    print(counts)


def main() -> None:
    if sys.argv[1:2] == ["fuzz"]:
        fuzz()
        return
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 800
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="floor19-"))
    torch.set_num_threads(1)
    cfg = parse_config(config(steps, out))
    result = Runner(cfg, out / "run", progress=False).run()
    records = read_metrics(out / "run" / "metrics.jsonl")
    rows: dict[int, dict[str, dict]] = {}
    for r in records:
        rows.setdefault(r["step"], {})[r["optimizer"]] = r
    print(f"\n{'step':>5} {'batch':>6} | fixed 0.3: error, λ | cases 75: error, floor, λ")
    nan = float("nan")
    for step, pair in sorted(rows.items()):
        a, b = pair.get("fixed-0.3", {}), pair.get("cases-75", {})
        err_a, err_b = a.get("train_squared_error", nan), b.get("train_squared_error", nan)
        print(
            f"{step:>5} {b.get('batch_size', 250):>6} | {err_a:8.3f}"
            f" {a.get('hf_damping') or nan:7.4f} | {err_b:8.3f}"
            f" {b.get('hf_damping_floor') or 0:7.4f} {b.get('hf_damping') or nan:7.4f}"
        )
    seconds = {k: v["seconds"] for k, v in json.loads((out / "run" / "summary.json").read_text())[
        "optimizers"].items()}  # fmt: skip
    print(f"status {result.status.value}; training seconds {seconds}; run in {out / 'run'}")


if __name__ == "__main__":
    main()
