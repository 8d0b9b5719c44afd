"""The LBFGS-loop swap: where and why HF's runs stop, and defaults vs λ0 = 1 over seeds (#14).

The scorecard's swap task (an unchanged ``torch.optim.LBFGS`` closure, tanh MLP 2-32-32-1,
256 points, exact Hessian products) read `HessianFree(params)` at 2.3× the tuned row's final
loss (λ0 = 1, warm starts) in the last full run. Two questions:

1. Why do both stop? Per run: the step from which the loss is bit-identical (frozen), the
   final max |∂f/∂θ| against ``tolerance_grad`` = 1e-7, and what a float64 HF run from the
   float32 end point still gains (if ~nothing, the float32 run ended at its basin's floor).
2. Is the gap the defaults' or the one initialisation's? The same two settings on ``SEEDS``
   initialisations (the task's data, ``torch.manual_seed(seed)`` for the weights), stepped in
   alternation in one process (torch 1 thread), each for ``STEPS`` steps: each one's time to
   the lowest loss both reach (the larger final loss) and its ratio, and the final losses.

    python experiments/_swap_stall.py [--steps N] [--seeds K] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard  # noqa: E402
from _bench_common import md_table, save_text  # noqa: E402

from hessfree import HessianFree  # noqa: E402

SETTINGS = {"defaults": {}, "λ0 = 1 (tuned)": dict(damping=1.0, cg_decay=0.95)}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def _max_grad(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    g = torch.autograd.grad(torch.nn.functional.mse_loss(m(x), y), list(m.parameters()))
    return max(float(gi.abs().max()) for gi in g)


def _float64_gain(m: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> float:
    """Relative loss decrease of ``steps`` float64 HF steps from ``m``'s weights."""
    m64, x64, y64 = copy.deepcopy(m).double(), x.double(), y.double()
    opt = HessianFree(m64.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m64(x64), y64)
        loss.backward()
        return loss

    with torch.no_grad():
        f0 = float(torch.nn.functional.mse_loss(m64(x64), y64))
    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        return 1 - float(torch.nn.functional.mse_loss(m64(x64), y64)) / f0


def compare(seed: int, steps: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    runs = {}
    for name, kw in SETTINGS.items():
        m = copy.deepcopy(_model(seed))
        opt = HessianFree(m.parameters(), **kw)

        def closure(m: nn.Module = m, opt: HessianFree = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        runs[name] = dict(m=m, opt=opt, closure=closure, t=0.0, curve=[])
    for k in range(steps):  # alternate who goes first
        for r in list(runs.values())[:: 1 if k % 2 else -1]:
            t0 = time.perf_counter()
            r["opt"].step(r["closure"])
            r["t"] += time.perf_counter() - t0
            with torch.no_grad():
                r["curve"].append((r["t"], float(torch.nn.functional.mse_loss(r["m"](x), y))))
    common = max(r["curve"][-1][1] for r in runs.values())
    out = dict(seed=seed, common=common)
    for name, r in runs.items():
        final = r["curve"][-1][1]
        frozen = next(k for k in range(steps) if all(v == final for _, v in r["curve"][k:]))
        out[name] = dict(
            final=final,
            t_common=scorecard.time_to(r["curve"], common),
            frozen=frozen if frozen < steps - 1 else None,
            max_grad=_max_grad(r["m"], x, y),
            m=r["m"],
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = scorecard.make_swap_task(quick=False)
    x, y = task.x, task.y
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows, ratios, wins = [], [], 0
    names = list(SETTINGS)
    for seed in range(args.seeds):
        res = compare(seed, args.steps, x, y)
        d, t = res[names[0]], res[names[1]]
        ratio = d["t_common"] / t["t_common"]
        ratios.append(ratio)
        wins += d["final"] <= t["final"]
        gain = _float64_gain(d["m"], x, y) if seed == 0 else math.nan
        rows.append(
            [
                str(seed),
                f"{d['final']:.3g} / {t['final']:.3g}",
                f"{d['max_grad']:.2g} / {t['max_grad']:.2g}",
                " / ".join("moving" if r["frozen"] is None else str(r["frozen"]) for r in (d, t)),
                f"{d['t_common']:.3g} / {t['t_common']:.3g} s",
                f"{ratio:.2f}",
                "–" if math.isnan(gain) else f"{gain:.2%}",
            ]
        )
        print(rows[-1], flush=True)
    gmean = math.exp(statistics.fmean(math.log(r) for r in ratios))
    load1 = os.getloadavg()
    text = "\n".join(
        [
            "# LBFGS-loop swap: where HF's runs stop, defaults vs λ0 = 1 over seeds",
            "",
            f"`python experiments/_swap_stall.py --steps {args.steps} --seeds {args.seeds}` in "
            f"{time.perf_counter() - t0:.0f} s; load average (1/5/15 min) "
            f"{' '.join(f'{v:.2f}' for v in load0)} at the start, "
            f"{' '.join(f'{v:.2f}' for v in load1)} at the end; torch 1 thread. Method: the "
            "script's docstring. Times: each run's own stepping clock, the two alternated.",
            "",
            md_table(
                [
                    "seed",
                    "final loss (defaults / λ0 = 1)",
                    "final ‖g‖∞",
                    "frozen from step",
                    "time to the larger final loss",
                    "defaults / λ0 = 1",
                    "float64 HF's further gain (defaults' end)",
                ],
                rows,
            ),
            "",
            f"Geometric mean of the time ratios: {gmean:.2f} (median "
            f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}); "
            f"the defaults end lower on {wins} of {len(ratios)} seeds.",
            "",
        ]
    )
    print(text)
    if args.out:
        save_text(Path(args.out), text)


if __name__ == "__main__":
    main()
