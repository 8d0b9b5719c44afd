"""Why full-batch ``HessianFree(params)`` is slow on MNIST-1D, against L-BFGS (#14).

The scorecard's own problem (``scorecard._classifier('mnist1d', quick=True)``: the same data,
model and initial weights, full batch, cross-entropy). Two parts:

1. the defaults' per-step records (``StepInfo``): λ, ρ, CG iterations and why CG stopped,
   forcing term η, backtracked iterate, step rate, closure calls, and the loss decrease per
   gradient equivalent;
2. variants of one default each against the defaults and ``torch.optim.LBFGS`` (max_iter 20,
   history 20, strong Wolfe; the scorecard's L-BFGS), stepped round-robin in one process (one
   step of each in turn, torch 1 thread) until each has spent ``BUDGET`` gradient equivalents:
   closure calls (forward-only ones included, so an overcount of their cost) plus CG and
   preconditioner products for HF, closure calls for L-BFGS. Reported: gradient equivalents
   to each loss target, and each run's own stepping time to it over L-BFGS's (the loss is
   evaluated off the clock after every step).

    python experiments/_mnist1d_defaults.py [BUDGET] [--steps N]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard  # noqa: E402
from _bench_common import md_table, save_text  # noqa: E402

from hessfree import HessianFree  # noqa: E402

# the quick scorecard's Adam losses at 1/4, 1/2 and all of its 8 s (2026-12-01), plus two more
TARGETS = (0.1, 6.162e-3, 1.833e-3, 3.651e-4, 1e-5)


def variants() -> dict[str, dict]:
    """One changed default each (the diagnosis' questions), and two pairs."""
    return {
        "defaults": {},
        "damping=0.044 (0.1 λ0)": dict(damping=0.044),
        "damping=1e-6": dict(damping=1e-6),
        "damping_rule='martens'": dict(damping_rule="martens"),
        "cg_rtol=0.8": dict(cg_rtol=0.8),
        "cg_rtol=0.1": dict(cg_rtol=0.1),
        "cg_rtol=0 (§4.4 stop only)": dict(cg_rtol=0.0),
        "cg_max_iter=10": dict(cg_max_iter=10),
        "cg_rtol=0.8, cg_max_iter=10": dict(cg_rtol=0.8, cg_max_iter=10),
        "precond='martens'": dict(precond="martens"),
        "cg_decay=0 (cold)": dict(cg_decay=0.0),
        "cg_stop_on_increase=False": dict(cg_stop_on_increase=False),
        "extrapolate=False": dict(extrapolate=False),
        "curvature='fisher'": dict(curvature="fisher"),
    }


def _closure(task: scorecard.Task, m: torch.nn.Module):
    def closure() -> tuple:
        out = m(task.x)
        return task.loss(out, task.y), out

    return closure


def trace(task: scorecard.Task, steps: int) -> list[list]:
    """The defaults' per-step records, one table row a step."""
    m = copy.deepcopy(task.model)
    infos: list = []
    opt = HessianFree(m.parameters(), callback=infos.append)
    rows, spent = [], 0
    for k in range(steps):
        opt.step(_closure(task, m))
        i = infos[-1]
        cost = i.closure_calls + i.cg_matvecs + i.precond_matvecs
        spent += cost
        rows.append(
            [
                k,
                f"{i.loss:.4g}",
                f"{i.loss_after:.4g}",
                f"{i.damping:.2g}",
                f"{i.rho:.2f}",
                f"{i.cg_rtol:.2f}",
                i.cg_iters,
                i.cg_reason,
                i.backtrack_iter,
                f"{i.step_rate:g}",
                i.closure_calls,
                spent,
                f"{(i.loss - i.loss_after) / cost:.3g}",
                f"{i.time_products / i.time_total:.2f}",
            ]
        )
    return rows


def compare(task: scorecard.Task, budget: float) -> list[dict]:
    """Every variant and L-BFGS, stepped round-robin until each spent ``budget``."""
    runs = []
    for name, kw in variants().items():
        m = copy.deepcopy(task.model)
        infos: list = []
        opt = HessianFree(m.parameters(), callback=infos.append, **kw)
        runs.append(dict(name=name, m=m, opt=opt, infos=infos, spent=0, t=0.0, curve=[]))
    m = copy.deepcopy(task.model)
    lbfgs = torch.optim.LBFGS(
        m.parameters(), lr=1.0, line_search_fn="strong_wolfe", max_iter=20, history_size=20
    )
    ref = dict(name="L-BFGS", m=m, opt=lbfgs, infos=None, spent=0, t=0.0, curve=[])

    def lbfgs_closure() -> torch.Tensor:
        ref["spent"] += 1
        lbfgs.zero_grad()
        loss = task.loss(ref["m"](task.x), task.y)
        loss.backward()
        return loss

    pending = [*runs, ref]
    while pending:
        for r in pending:
            t0 = time.perf_counter()
            if r is ref:
                lbfgs.step(lbfgs_closure)
            else:
                r["opt"].step(_closure(task, r["m"]))
                i = r["infos"][-1]
                r["spent"] += i.closure_calls + i.cg_matvecs + i.precond_matvecs
            r["t"] += time.perf_counter() - t0
            r["curve"].append((r["spent"], r["t"], task.error(r["m"])))
        pending = [r for r in pending if r["spent"] < budget]
    return [ref, *runs]


def _first(curve: list[tuple[int, float, float]], target: float) -> tuple[float, float]:
    for spent, t, loss in curve:
        if loss <= target:
            return spent, t
    return math.inf, math.inf


def comparison_rows(results: list[dict]) -> list[list]:
    ref = [_first(results[0]["curve"], x) for x in TARGETS]
    rows = []
    for r in results:
        hits = [_first(r["curve"], x) for x in TARGETS]
        spent = " / ".join("never" if math.isinf(g) else str(g) for g, _ in hits)
        ratio = " / ".join(
            "never" if math.isinf(t) else f"{t / rt:.2f}"
            for (_, t), (_, rt) in zip(hits, ref, strict=True)
        )
        infos = r["infos"] or []
        med = sorted(i.cg_iters for i in infos)[len(infos) // 2] if infos else "–"
        lam = f"{infos[-1].next_damping:.2g}" if infos else "–"
        rows.append(
            [r["name"], len(r["curve"]), f"{r['curve'][-1][2]:.3g}", spent, ratio, med, lam]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("budget", nargs="?", type=float, default=330.0)
    ap.add_argument("--steps", type=int, default=19)
    ap.add_argument("--out", default=None, help="report path (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = scorecard._classifier("mnist1d", quick=True)
    load0 = os.getloadavg()
    steps = trace(task, args.steps)
    results = compare(task, args.budget)
    load1 = os.getloadavg()
    text = "\n".join(
        [
            "# Full-batch `HessianFree(params)` on MNIST-1D: per-step records and variants",
            "",
            f"`python experiments/_mnist1d_defaults.py {args.budget:g} --steps {args.steps}`; "
            f"load average (1/5/15 min) {' '.join(f'{v:.2f}' for v in load0)} at the start, "
            f"{' '.join(f'{v:.2f}' for v in load1)} at the end; torch 1 thread. "
            "Method: the script's docstring.",
            "",
            "## The defaults, step by step",
            "",
            md_table(
                [
                    "step",
                    "loss",
                    "after",
                    "λ",
                    "ρ",
                    "η",
                    "CG",
                    "CG stop",
                    "backtracked to",
                    "rate",
                    "closure calls",
                    "grad. equiv. so far",
                    "decrease / grad. equiv.",
                    "products' time share",
                ],
                steps,
            ),
            "",
            f"## One default changed at a time, {args.budget:g} gradient equivalents each",
            "",
            f"Targets: {', '.join(f'{x:g}' for x in TARGETS)}.",
            "",
            md_table(
                [
                    "run",
                    "steps",
                    "final loss",
                    "grad. equiv. to targets",
                    "time to targets / L-BFGS's",
                    "median CG",
                    "final λ",
                ],
                comparison_rows(results),
            ),
            "",
        ]
    )
    print(text)
    if args.out:
        save_text(Path(args.out), text)


if __name__ == "__main__":
    main()
