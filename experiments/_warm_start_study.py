"""Warm starts for the exact Hessian: ``cg_decay=0.95`` against cold CG (``cg_decay=0``) on 16
unchanged ``torch.optim.LBFGS``-style loops, at equal wall-clock.

Each problem is a tanh MLP 2-w-w-1 (w = 32 and 16) fitting one of eight smooth targets on 256
points in [-2, 2]² by mean squared error, with the closure ``zero_grad(); loss.backward(); return
loss``, so HF uses exact Hessian products. The two settings start from the same weights and step
in turn, each on its own clock, until both have spent the budget. Printed: the ratio of the
warm-started run's training loss to the cold run's at ¼, ½ and all of the budget (< 1: warm
starts are ahead), and the geometric mean over the 16 problems.

This is the measurement behind ``cg_decay='auto'`` = 0.95 for the Hessian too
(``experiments/README.md``).

Usage::

    python experiments/_warm_start_study.py 6     # budget in seconds per run; ~3.5 min at 6
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessfree import HessianFree

TARGETS: list[Callable[[Tensor, Tensor], Tensor]] = [
    lambda a, b: torch.sin(2 * a) * torch.cos(b) + 0.1 * a**2,  # the scorecard's swap task
    lambda a, b: torch.tanh(3 * a * b),
    lambda a, b: torch.exp(-(a**2) - b**2) * torch.sin(3 * a),
    lambda a, b: a.abs() + b**3 / 4,
    lambda a, b: torch.sin(3 * a * b),
    lambda a, b: F.softplus(3 * a - 2 * b) - F.softplus(2 * a + b),
    lambda a, b: torch.cos(a**2 + b**2),
    lambda a, b: (1 - a) ** 2 / 4 + (b - a**2) ** 2 / 10,
]


def problem(k: int, width: int) -> tuple[Tensor, Tensor, nn.Module]:
    g = torch.Generator().manual_seed(k)
    x = torch.rand(256, 2, generator=g) * 4 - 2
    y = TARGETS[k](x[:, :1], x[:, 1:])
    torch.manual_seed(k)
    model = nn.Sequential(
        nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )
    return x, y, model


def race(k: int, width: int, budget: float) -> dict[str, list[tuple[float, float]]]:
    """Loss curves (own clock, loss) of cold and warm-started HF, interleaved step by step."""
    runs = {}
    for name, decay in (("cold", 0.0), ("warm", 0.95)):
        x, y, model = problem(k, width)
        opt = HessianFree(model.parameters(), cg_decay=decay)

        def closure(opt=opt, model=model, x=x, y=y) -> Tensor:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        runs[name] = dict(opt=opt, model=model, x=x, y=y, closure=closure, clock=0.0, curve=[])
    while any(r["clock"] < budget for r in runs.values()):
        for r in runs.values():
            if r["clock"] >= budget:
                continue
            t0 = time.perf_counter()
            r["opt"].step(r["closure"])
            r["clock"] += time.perf_counter() - t0
            with torch.no_grad():
                r["curve"].append((r["clock"], float(F.mse_loss(r["model"](r["x"]), r["y"]))))
    return {name: r["curve"] for name, r in runs.items()}


def best_by(curve: list[tuple[float, float]], t: float) -> float:
    return min((loss for s, loss in curve if s <= t), default=math.nan)


def main() -> None:
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
    torch.set_num_threads(1)
    with open("/proc/loadavg") as f:
        print(f"budget {budget:g} s per run; load average {' '.join(f.read().split()[:3])}")
    logs = {0.25: [], 0.5: [], 1.0: []}
    for width in (32, 16):
        for k in range(len(TARGETS)):
            curves = race(k, width, budget)
            ratios = {
                f: best_by(curves["warm"], f * budget) / best_by(curves["cold"], f * budget)
                for f in logs
            }
            for f, r in ratios.items():
                logs[f].append(math.log(r))
            cells = " ".join(f"{r:.2f}" for r in ratios.values())
            print(f"width {width} target {k}: warm/cold at 1/4, 1/2, 1 of the budget: {cells}")
    for f, values in logs.items():
        ahead = sum(v < 0 for v in values)
        gmean = math.exp(sum(values) / len(values))
        print(f"at {f:g} of the budget: warm ahead on {ahead}/{len(values)}, geomean {gmean:.2f}")


if __name__ == "__main__":
    main()
