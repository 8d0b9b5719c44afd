"""Full-batch HF: does a subsampled curvature batch close the gap to L-BFGS and tuned HF? (#14)

Martens (2010, §4.3) computes the gradient on the whole batch and the curvature products on a
much smaller one (his code cycles through ¼-size chunks), so a product costs a fraction of a
gradient. ``HessianFree(params)`` cannot choose that for a closure (a closure's outputs carry
the whole batch's graph: a product on a subset of their rows still back-propagates through
every case), but a user can pass ``curvature_closure``. This script measures what it buys on
three full-batch problems, from the same initial weights, all contenders interleaved in one
process (``scorecard.interleave``: shuffled turns per slice, each run's own stepping clock,
evaluation off the clock, torch 1 thread):

- MNIST-1D and digits: the scorecard's quick classifier tasks (same data, model, weights);
- a regression MLP 8-64-64-1 (tanh, MSE, 4,096 points, a smooth target) constructed here so
  that nothing is tuned for the scorecard's tasks only.

Contenders: ``torch.optim.LBFGS`` (max_iter 20, history 20, strong Wolfe; the scorecard's),
HF with no arguments on the whole batch, the same with ``curvature_closure`` on a random ¼ or
1/10 of the cases drawn afresh each step, or on the first ¼ every step (a fixed subset), a
fresh ¼ that switches to all cases at the first step whose λ update raised λ or after 10 steps
(``switching_run``), and the scorecard's tuned HF row for the task. Reported: each run's time
to L-BFGS's losses at ¼, ½ and all of the budget, over L-BFGS's time and over the tuned row's.

    python experiments/_fullbatch_curvature.py [--budget S] [--repeats R] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard  # noqa: E402
from _bench_common import md_table, save_text  # noqa: E402

from hessfree import HessianFree  # noqa: E402

# the last full scorecard's tuned HF picks (results/2026-12-01-amd-epyc-2c-scorecard.md)
TUNED = {
    "mnist1d": "250×1.1/step, curvature ¼ to 4 full steps, cg≤10, K-FAC rank 16",
    "digits": "full batch, cg≤50, λ0=1",
    "regression": "full batch, cg≤50, λ0=1",
}


def make_regression_task(budget: float) -> scorecard.Task:
    """A smooth 8-d regression, full batch: a problem none of the defaults were tuned on."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4096, 8, generator=g) * 2 - 1
    a, b = torch.randn(8, 1, generator=g), torch.randn(8, 1, generator=g)
    y = torch.sin(2 * x @ a) + 0.5 * torch.tanh(x @ b) * x[:, :1] + 0.1 * (x**2).sum(1, True)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )

    @torch.no_grad()
    def loss(m: nn.Module) -> float:
        return float(F.mse_loss(m(x), y))

    n = len(x)
    return scorecard.Task(
        "regression",
        "regression MLP 8-64-64-1 (tanh, MSE), 4,096 points",
        model,
        x,
        y,
        F.mse_loss,
        loss,
        "train MSE",
        budget=budget,
        sweep_budget=0.0,
        adam=[],
        sgd=[],
        hf={
            TUNED["regression"]: dict(
                batch=n, curvature_batch=n, kw=dict(cg_max_iter=50, damping=1.0)
            )
        },
        slices=80,
    )


def regimes(n: int) -> dict[str, dict]:
    """HF with no arguments, full-batch gradient, and three curvature batches."""
    full = dict(batch=n, curvature_batch=n, kw={})
    return {
        "HF default (full batch)": full,
        "HF default, curvature ¼ fresh": full
        | dict(curvature_batch=n // 4, full_curvature_batch=1),
        "HF default, curvature 1/10 fresh": full
        | dict(curvature_batch=n // 10, full_curvature_batch=1),
        "HF default, curvature first ¼ (fixed)": full | dict(curvature_batch=n // 4),
    }


def switching_run(task: scorecard.Task, name: str, rule: str) -> scorecard.Run:
    """HF with no arguments, curvature on a fresh ¼ of the cases until ``rule`` says switch,
    then on all of them: 'lambda-rise' at the first step whose Levenberg-Marquardt update
    raised λ (the subsampled model predicted badly), 'steps=K' after K steps."""
    m = copy.deepcopy(task.model)
    opt = HessianFree(m.parameters())
    n, gen = len(task.x), torch.Generator().manual_seed(1)
    full = [False]

    def forward(xb: torch.Tensor, yb: torch.Tensor) -> tuple:
        out = m(xb)
        return task.loss(out, yb), out

    run = scorecard.Run(name, "HF", m, lambda: None, detail=rule)

    def step() -> None:
        curvature = None
        if not full[0]:
            pick = torch.randperm(n, generator=gen)[: n // 4]
            curvature = lambda: forward(task.x[pick], task.y[pick])  # noqa: E731
        opt.step(lambda: forward(task.x, task.y), curvature)
        i = opt.last_step
        if rule == "lambda-rise":
            full[0] |= i.next_damping > i.damping
        else:
            full[0] |= run.steps + 1 >= int(rule.split("=")[1])
        run.statuses[str(i.status)] = run.statuses.get(str(i.status), 0) + 1

    run.step = step
    return run


def runs_for(task: scorecard.Task) -> list[scorecard.Run]:
    n = len(task.x)
    out = [scorecard.lbfgs_run(task, "L-BFGS", dict(max_iter=20, history_size=20))]
    out += [scorecard.hf_run(task, name, "HF", r) for name, r in regimes(n).items()]
    out += [
        switching_run(
            task, "HF default, curvature ¼ fresh until λ first rises, then all", "lambda-rise"
        ),
        switching_run(task, "HF default, curvature ¼ fresh for 10 steps, then all", "steps=10"),
    ]
    tuned = TUNED[task.key]
    out.append(scorecard.hf_run(task, f"HF tuned: {tuned}", "HF tuned", task.hf[tuned]))
    return out


def rows_for(task: scorecard.Task, runs: list[scorecard.Run]) -> tuple[list[list], list[float]]:
    lb, tuned = runs[0], runs[-1]
    targets = [scorecard.value_at(lb.curve, task.budget * f) for f in (0.25, 0.5, 1.0)]
    t_lb = [scorecard.time_to(lb.curve, x) for x in targets]
    t_tuned = [scorecard.time_to(tuned.curve, x) for x in targets]
    rows = []
    for r in runs:
        t = [scorecard.time_to(r.curve, x) for x in targets]
        vs_lb = " / ".join(
            scorecard._fmt(scorecard._ratio(a, b), 3) for a, b in zip(t, t_lb, strict=True)
        )
        vs_tuned = " / ".join(  # '–' where the tuned run never reached the target
            scorecard._fmt(scorecard._ratio(a, b) if math.isfinite(b) else math.nan, 3)
            for a, b in zip(t, t_tuned, strict=True)
        )
        rows.append(
            [
                r.name,
                str(r.steps),
                scorecard._fmt(scorecard.final_error(r), 3),
                " / ".join(scorecard._fmt(x, 3) for x in t),
                vs_lb,
                vs_tuned,
                r.failed or ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items())),
            ]
        )
    return rows, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per run (MNIST-1D 8/6×)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tasks", default="mnist1d,digits,regression")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    parts = []
    for rep in range(args.repeats):
        for key in args.tasks.split(","):
            if key == "regression":
                task = make_regression_task(args.budget)
            else:
                task = scorecard._classifier(key, quick=True)
                task.budget = args.budget * (8 / 6 if key == "mnist1d" else 1.0)
            runs = runs_for(task)
            la = os.getloadavg()[0]
            scorecard.interleave(runs, task, task.budget, 40, "cpu")
            rows, targets = rows_for(task, runs)
            parts += [
                f"## {task.title}, repeat {rep + 1} ({task.budget:g} s each, load {la:.2f} "
                f"→ {os.getloadavg()[0]:.2f})",
                "",
                f"Targets: L-BFGS's {task.error_name} at ¼, ½, all of the budget: "
                + ", ".join(scorecard._fmt(x, 4) for x in targets),
                "",
                md_table(
                    [
                        "run",
                        "steps",
                        "final",
                        "s to targets",
                        "× L-BFGS's time",
                        "× tuned HF's time",
                        "HF statuses",
                    ],
                    rows,
                ),
                "",
            ]
            print("\n".join(parts[-6:]), flush=True)
    load1 = os.getloadavg()
    head = [
        "# Full-batch HF with a subsampled curvature batch (2026-12-01)",
        "",
        f"`python experiments/_fullbatch_curvature.py --budget {args.budget:g} --repeats "
        f"{args.repeats}` in {time.perf_counter() - t0:.0f} s; load average (1/5/15 min) "
        f"{' '.join(f'{v:.2f}' for v in load0)} at the start, "
        f"{' '.join(f'{v:.2f}' for v in load1)} at the end; torch 1 thread. Method: the "
        "script's docstring. Times are each run's own stepping clock, interleaved.",
        "",
    ]
    text = "\n".join(head + parts)
    if args.out:
        save_text(Path(args.out), text)


if __name__ == "__main__":
    main()
