"""CG's scalar work on the host for CPU tensors (hostcg): this tree's ``cg`` against another's.

The branch reads pᵀAp, α, rᵀz and the two dot products of φ back to the host every iteration
(CPU, ``check_every`` 1: a read every iteration happened anyway) and does the stop tests in
Python floats, where main did ~35 0-dim tensor operations an iteration; the vector updates
and the results are bit for bit main's. Both packages live in ONE process (``--other DIR``
holds a ``hessfree`` package: ``git archive main hessfree | tar -x -C DIR``), ``sys.modules``
swapped per call as ``_overhead.py``'s ``ab`` does, alternating in order round by round,
1 thread, same inputs; CPU (``time.process_time``) and wall time; loads at start and end.

``cgloop``: ``cg()`` alone on SPD systems A = diag(logspace(0, 3, n)) (a cheap product, so
the loop is what is timed), n = 3, 50, 1,000, 10,000, float32 and float64, no preconditioner.
n ≥ 50: 20 and 40 iterations (``rtol`` 0, ``progress_tol`` None), the difference of the two
costs over 20 iterations, so each call's fixed cost cancels: time an iteration. n = 3: a whole
solve (3 iterations to ``rtol`` 1e-12): time a call. Results asserted bitwise equal.

``ab``: whole ``HessianFree(params)`` trajectories of ``_overhead.py``'s problems (exp3,
misra1a, rosen n = 50, the 2-16-1 MLP; LBFGS-style and ``(loss, outputs)`` closures; digits
full batch, swap), from the same start: per round the trajectory's CPU and wall time, this /
other; medians over rounds. The final parameters of every pair are asserted equal. ``--this
DIR`` makes it an A/A run (another copy of a package against ``--other``).

    export OPENBLAS_NUM_THREADS=1 PYTHONPATH=.
    git archive main hessfree | tar -x -C /tmp/hostcg-main
    python3 experiments/_hostcg.py cgloop --other /tmp/hostcg-main [--rounds 15]
    python3 experiments/_hostcg.py ab --other /tmp/hostcg-main [--rounds 20] [--this DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _overhead import BUILDERS, _package, _timed_trajectory, _use, load  # noqa: E402

torch.set_num_threads(1)
med = statistics.median


def _solve(cg: Callable, matvec: Callable, b: torch.Tensor, kwargs: dict, max_iter: int):  # noqa: ANN202
    return cg(matvec, b, max_iter=max_iter, **kwargs)


def cgloop(other: str, rounds: int) -> None:
    packs = {"other": _package(other), "this": _package(None)}
    for k, mods in packs.items():
        print(f"{k}: {mods['hessfree'].__file__}")
    print(f"load {load()[0]:.2f}")
    print(
        "| n | dtype | what | this µs | other µs | CPU ratio (median of rounds, range) "
        "| wall ratio | bitwise |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in (3, 50, 1000, 10_000):
        for dtype in (torch.float32, torch.float64):
            d = torch.logspace(0, 3, n, dtype=dtype)
            b = torch.ones(n, dtype=dtype)

            def matvec(v: torch.Tensor, d: torch.Tensor = d) -> torch.Tensor:
                return d * v

            if n == 3:
                counts, number = [3], 300
                kwargs = dict(rtol=1e-12)
            else:
                counts, number = [20, 40], max(5, min(100, 2_000_000 // (n * 40)))
                kwargs = dict(rtol=0.0, progress_tol=None)
            fns = {
                k: partial(_solve, mods["hessfree.cg"].cg, matvec, b, kwargs)
                for k, mods in packs.items()
            }
            outs = {}
            for k in packs:
                _use(packs[k])
                outs[k] = [fns[k](c) for c in counts]
                assert all(o.num_iter == c for o, c in zip(outs[k], counts, strict=True)), k
            same = all(
                torch.equal(a.x, o.x) and torch.equal(a.phi_history, o.phi_history)
                for a, o in zip(outs["this"], outs["other"], strict=True)
            )
            assert same, (n, dtype)
            cpu: dict[str, list[float]] = {k: [] for k in packs}
            wall: dict[str, list[float]] = {k: [] for k in packs}
            for r in range(-1, rounds):  # round -1: warm-up
                for k in list(packs) if r % 2 == 0 else list(packs)[::-1]:
                    _use(packs[k])
                    c_cost, w_cost = [], []
                    for c in counts:
                        c0, w0 = time.process_time(), time.perf_counter()
                        for _ in range(number):
                            fns[k](c)
                        c_cost.append((time.process_time() - c0) / number)
                        w_cost.append((time.perf_counter() - w0) / number)
                    if r >= 0:
                        scale = 1 if n == 3 else counts[1] - counts[0]
                        cpu[k].append((c_cost[-1] - (c_cost[0] if n > 3 else 0)) / scale)
                        wall[k].append((w_cost[-1] - (w_cost[0] if n > 3 else 0)) / scale)
            rc = [a / o for a, o in zip(cpu["this"], cpu["other"], strict=True)]
            rw = [a / o for a, o in zip(wall["this"], wall["other"], strict=True)]
            what = "a call (3 iterations)" if n == 3 else "an iteration"
            print(
                f"| {n:,} | {str(dtype)[6:]} | {what} | {med(cpu['this']) * 1e6:.1f} | "
                f"{med(cpu['other']) * 1e6:.1f} | {med(rc):.3f} ({min(rc):.2f}-{max(rc):.2f}) | "
                f"{med(rw):.3f} | {same} |",
                flush=True,
            )
    print(f"load {load()[0]:.2f}")


def ab(other: str, names: list[str], rounds: int, this: str | None) -> None:
    packs = {"other": _package(other), "this": _package(this)}
    for k, mods in packs.items():
        print(f"{k}: {mods['hessfree'].__file__}")
    print(
        "| problem, closure | steps | CPU ms a step, this / other | CPU ratio, median (range) "
        "| wall ratio, median | fastest / fastest | load start-end |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        _use(packs["this"])
        spec = BUILDERS[name]()
        for style in spec.styles:
            l0 = load()[0]
            cpu: dict[str, list[float]] = {k: [] for k in packs}
            wall: dict[str, list[float]] = {k: [] for k in packs}
            for r in range(-1, rounds):  # round -1: warm-up
                models = {}
                for k in list(packs) if r % 2 == 0 else list(packs)[::-1]:
                    c, w, _, models[k] = _timed_trajectory(_use(packs[k]), spec, style)
                    if r >= 0:
                        cpu[k].append(sum(c))
                        wall[k].append(sum(w))
                pairs = zip(models["this"].parameters(), models["other"].parameters(), strict=True)
                assert all(torch.equal(a, b) for a, b in pairs), (name, style, r)
            rc = [a / o for a, o in zip(cpu["this"], cpu["other"], strict=True)]
            rw = [a / o for a, o in zip(wall["this"], wall["other"], strict=True)]
            best = min(cpu["this"]) / min(cpu["other"])
            print(
                f"| {name} {style} | {spec.steps} | {med(cpu['this']) / spec.steps * 1e3:.3f} / "
                f"{med(cpu['other']) / spec.steps * 1e3:.3f} | {med(rc):.3f} "
                f"({min(rc):.2f}-{max(rc):.2f}) | {med(rw):.3f} | {best:.3f} | "
                f"{l0:.1f}-{load()[0]:.1f} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cgloop")
    c.add_argument("--other", required=True, help="a folder holding another hessfree package")
    c.add_argument("--rounds", type=int, default=15)
    q = sub.add_parser("ab")
    q.add_argument("--other", required=True)
    q.add_argument("--problems", default="exp3,misra1a,rosen,mlp,digits,swap")
    q.add_argument("--rounds", type=int, default=20)
    q.add_argument("--this", default=None, help="another folder for 'this' (an A/A control)")
    args = ap.parse_args()
    if args.cmd == "cgloop":
        cgloop(args.other, args.rounds)
    else:
        ab(args.other, args.problems.split(","), args.rounds, args.this)


if __name__ == "__main__":
    main()
