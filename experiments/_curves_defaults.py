"""CURVES (5,000 images, 90 s): the scorecard's finals for the defaults row, without the sweep.

The full scorecard's CURVES task takes ~30 minutes (sweeps of 13 HF rows, Adam and SGD); this
runs only the rows its last full runs picked, in the scorecard's own interleaving (wall clock,
shuffled turns per slice, same initial weights and batches): `HessianFree(params)` with no
arguments at 250/62 (the "HF default" row), the tuned HF row (250/62, 2 K-FAC-preconditioned CG
iterations, λ ≥ 0.3) and Adam lr 1e-3 at batch 100 and 20 (the best baselines of run3-run6).
Ratios: defaults / tuned (target ≤ 1.5×), HF / best Adam (target ≤ 1.0×).

    OPENBLAS_NUM_THREADS=1 python experiments/_curves_defaults.py [--seconds 90]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard  # noqa: E402

import hessfree  # noqa: E402

TUNED = "250/62, cg≤2, K-FAC rank 32 refresh 2, λ≥0.3"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--slices", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    print(f"hessfree from {hessfree.__file__}; load {os.getloadavg()}", flush=True)
    task = scorecard.make_curves_task(quick=False)
    runs = [
        scorecard.hf_run(
            task,
            "HF default 250/62",
            "HF default",
            {k: v for k, v in task.hf[TUNED].items() if k != "kfac"} | {"kw": {}},
        ),
        scorecard.hf_run(task, f"HF {TUNED}", "HF", task.hf[TUNED]),
        scorecard.first_order_run(task, "Adam", 1e-3, 100),
        scorecard.first_order_run(task, "Adam", 1e-3, 20),
    ]
    scorecard.interleave(runs, task, args.seconds, args.slices, "cpu")
    for r in runs:
        curve = " ".join(f"{t:.0f}s:{e:.2f}" for t, e in r.curve)
        print(f"{r.name:55s} steps {r.steps:6d} final {r.curve[-1][1]:.3f}  [{curve}] {r.failed}")
    err = {r.name: r.curve[-1][1] for r in runs}
    adam = min(err[r.name] for r in runs if r.family == "Adam")
    d, t = err[runs[0].name], err[runs[1].name]
    print(
        f"defaults / tuned {d / t:.3f}x (target <= 1.5); defaults / best Adam {d / adam:.3f}x; "
        f"tuned / best Adam {t / adam:.3f}x (target <= 1.0)"
    )
    print(f"load at end {os.getloadavg()}; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
