"""16-bit HF runs: final loss and rejected steps (experiments/README.md, "fp16").

``experiments/_resolution_16bit.py``'s tanh-MLP regression (8-64-64-1, 512 points, model, data
and loss in bfloat16 / float16, ``HessianFree(params)``, LBFGS-style closure), a fixed number of
steps per seed; the final loss is evaluated in float32 on the float32 copy of the weights. Step
counts, not time: the result does not depend on the load. Run it once per code version:

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python experiments/_fp16_products.py --seeds 8
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _resolution_16bit import train  # noqa: E402

import hessfree  # noqa: E402


def run(dtype: torch.dtype, steps: int, seed: int) -> tuple[float, collections.Counter]:
    """Final float32 loss and the count of each step status (and CG stop at 0 iterations)."""
    counts: collections.Counter = collections.Counter()
    steps_ = train(dtype, steps, seed)
    while True:
        try:
            s = next(steps_)
        except StopIteration as done:
            return done.value, counts
        counts[str(s.status.value)] += 1
        if s.cg_reason == "negative_curvature" and s.cg_iters == 0:
            counts["cg_negative_curvature_at_0"] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--dtypes", default="float16,bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print("hessfree from", hessfree.__file__, flush=True)
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        rows = [run(dtype, args.steps, seed) for seed in range(args.seeds)]
        losses = [r[0] for r in rows]
        total: collections.Counter = sum((r[1] for r in rows), collections.Counter())
        print(
            f"{name}: " + " ".join(f"{x:.2e}" for x in losses),
            f"median {statistics.median(losses):.2e}",
            f"non_finite_curvature per seed {[r[1]['non_finite_curvature'] for r in rows]}",
            f"all statuses {dict(sorted(total.items()))}",
            flush=True,
        )


if __name__ == "__main__":
    main()
