"""Kernel launches of a library HF step by phase, counted on a CPU (stop 46).

Each ATen call below autograd that is not a view is a kernel launch on a GPU, so the count
says where a launch-bound step (stop 45: 65-105 ms on an H200) spends them, without a GPU::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_opcount.py

CURVES autoencoder, 2,000 images, curvature batch 500, ``cg_max_iter=50``; 4 steps after 2
are counted, per phase of ``StepInfo.time_phases``. The counts do not depend on the batch.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402
import scorecard as sc  # noqa: E402
from _graphstep import count_ops  # noqa: E402

from hessfree import HessianFree, _step_types  # noqa: E402


def count(label: str, steps: int = 4, **kw) -> dict:  # noqa: ANN003
    model, x, flat = gpu_check.curves(2000, "cpu")
    c = 500
    opt = HessianFree(model.parameters(), cg_max_iter=50, **kw)

    def closure() -> tuple:
        o = model(x)
        return sc.bce_sum_per_case(o, flat), o

    def curvature() -> tuple:
        o = model(x[:c])
        return sc.bce_sum_per_case(o, flat[:c]), o

    for _ in range(2):
        opt.step(closure, curvature)
    per: collections.Counter = collections.Counter()
    lap = _step_types._StepRun.lap
    with count_ops() as counted:
        seen = [0]

        def counting_lap(run, phase: str) -> None:  # noqa: ANN001
            total = sum(counted.kernels.values())
            per[phase] += total - seen[0]
            seen[0] = total
            lap(run, phase)

        _step_types._StepRun.lap = counting_lap
        try:
            iters = 0
            for _ in range(steps):
                opt.step(closure, curvature)
                iters += opt.last_step.cg_iters
        finally:
            _step_types._StepRun.lap = lap
    out = dict(
        cg_iterations_per_step=iters / steps,
        kernels_per_step={k: round(v / steps) for k, v in per.items()},
        total=round(sum(per.values()) / steps),
        host_reads_per_step=counted.reads / steps,
    )
    print(label, out)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    count("default (K-FAC)")
    count("precond=None", precond=None)
