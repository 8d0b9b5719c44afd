"""The float-resolution rule on 16-bit losses (experiments/README.md, "16-bit losses at the
float-resolution rule").

A tanh-MLP regression (8-64-64-1, 512 points) trained in bfloat16 and float16 (model, data and
loss in that dtype) with ``HessianFree(params)`` for a fixed number of steps, over seeds, at
several ``hessfree.damping.LOW_PRECISION_ULPS``; the final loss is evaluated in float32 on the
float32 copy of the weights. Step counts, not time: the result does not depend on the load.

    OPENBLAS_NUM_THREADS=1 python experiments/_resolution_16bit.py --ulps 8 4 2
"""

from __future__ import annotations

import argparse
import collections
import statistics
from collections.abc import Iterator

import torch

import hessfree
import hessfree.damping as D


def problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X, W = torch.randn(512, 8, generator=g), torch.randn(8, 1, generator=g)
    return X, torch.tanh(X @ W) + 0.3 * torch.sin(3 * X[:, :1])


def train(dtype: torch.dtype, steps: int, seed: int) -> Iterator[hessfree.StepInfo]:
    """``HessianFree(params)`` on the regression in ``dtype``: each step's ``last_step``, then
    (as the generator's return value) the final float32 loss on the float32 copy of the weights."""
    X, y = problem(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    ).to(dtype)
    Xd, yd = X.to(dtype), y.to(dtype)
    opt = hessfree.HessianFree(model.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(Xd), yd)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        yield opt.last_step
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model.float()(X), y))


def run(dtype: torch.dtype, steps: int, seed: int) -> tuple[float, int]:
    """Final float32 loss and the number of 'float_resolution' steps."""
    counts: collections.Counter = collections.Counter()
    steps_ = train(dtype, steps, seed)
    while True:
        try:
            counts[next(steps_).converged_by] += 1
        except StopIteration as done:
            return done.value, counts["float_resolution"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ulps", type=float, nargs="+", default=[8.0, 2.0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for ulps in args.ulps:
        D.LOW_PRECISION_ULPS = ulps
        for dtype in (torch.bfloat16, torch.float16):
            rows = [run(dtype, args.steps, seed) for seed in range(args.seeds)]
            losses = [r[0] for r in rows]
            print(
                f"ulps {ulps:g} {dtype}: " + " ".join(f"{x:.2e}" for x in losses),
                f"median {statistics.median(losses):.2e}",
                f"float_resolution steps {[r[1] for r in rows]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
