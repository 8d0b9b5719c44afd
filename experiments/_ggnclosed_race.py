"""Gate for the closed-form GGN loss Hessian: HF against HF with the generic (double-backward)
loss Hessian, on the scorecard's tasks, same initial weights and batches, equal CPU time.

The change only re-rounds the products (same mathematics) and makes them cheaper, so the
question is whether the re-rounded trajectories end worse: each seed races the two contenders
step by step, alternating, each with its own CPU clock (``time.process_time``, so a busy machine
slows both alike), and reports the task's error at the budget and the ratio closed / generic.

    OPENBLAS_NUM_THREADS=1 python experiments/_ggnclosed_race.py [--seconds 45] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard  # noqa: E402

import hessfree  # noqa: E402
import hessfree.curvature as curvature  # noqa: E402


def _reseeded(task: scorecard.Task, seed: int) -> scorecard.Task:
    """The task with its initial weights drawn from ``seed`` (0: the scorecard's own)."""
    if seed == 0:
        return task
    m = copy.deepcopy(task.model)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in m.parameters():  # the scorecard's weights, permuted within each tensor
            flat = p.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=gen)])
    task = copy.copy(task)
    task.model = m
    return task


def _generic_step(step):
    def run() -> None:
        saved = curvature.loss_hessian_product
        curvature.loss_hessian_product = lambda loss, outputs: None
        try:
            step()
        finally:
            curvature.loss_hessian_product = saved

    return run


def race(task: scorecard.Task, regime_name: str, regime: dict, seconds: float) -> dict:
    runs = {}
    for c in ("closed", "generic"):
        r = scorecard.hf_run(task, f"{regime_name} [{c}]", "HF", regime)
        if c == "generic":
            r.step = _generic_step(r.step)
        runs[c] = r
    order = ["closed", "generic"]
    while any(runs[c].clock < seconds and not runs[c].failed for c in order):
        order.reverse()
        for c in order:
            r = runs[c]
            if r.clock >= seconds or r.failed:
                continue
            t0 = time.process_time()
            try:
                r.step()
            except Exception as err:  # noqa: BLE001 - a diverging run is a result
                r.failed = f"{type(err).__name__}: {err}"
            r.clock += time.process_time() - t0
            r.steps += 1
    return {c: (task.error(r.model), r.steps, r.failed) for c, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=45.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="curves")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"hessfree from {hessfree.__file__}; load {os.getloadavg()}", flush=True)
    for key in args.tasks.split(","):
        if key == "curves":
            base = scorecard.make_curves_task(quick=False)
            regimes = {
                "250/62, no arguments": dict(batch=250, curvature_batch=62, kw={}),
                "250/62, cg≤2, K-FAC rank 32 refresh 2, λ≥0.3": base.hf[
                    "250/62, cg≤2, K-FAC rank 32 refresh 2, λ≥0.3"
                ],
            }
        else:
            base = scorecard._classifier(key, quick=False)
            n = len(base.x)
            regimes = {"full batch, no arguments": dict(batch=n, curvature_batch=n, kw={})}
        for name, regime in regimes.items():
            ratios = []
            for seed in [int(s) for s in args.seeds.split(",")]:
                res = race(_reseeded(base, seed), name, regime, args.seconds)
                (ec, sc, fc), (eg, sg, fg) = res["closed"], res["generic"]
                ratios.append(ec / eg)
                print(
                    f"{key:8s} {name:46s} seed {seed}: closed {ec:.5g} ({sc} steps{fc}) "
                    f"generic {eg:.5g} ({sg} steps{fg}) ratio {ec / eg:.3f}  "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
            print(f"{key:8s} {name:46s} median ratio {statistics.median(ratios):.3f}", flush=True)


if __name__ == "__main__":
    main()
