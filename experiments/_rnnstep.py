"""Where an addition step's time goes, and the old/new step time interleaved (rnnstep, #14).

The scorecard's addition task and regime (``make_addition_task``: 1,000/100-case batches,
hidden states returned so ``structural_damping='auto'`` is μ = 0.03), ``HessianFree(params)``,
torch 1 thread. Modes:

    python experiments/_rnnstep.py profile 50     # cProfile of steps 6-15 and StepInfo phases
    python experiments/_rnnstep.py ops 50         # one product against one 100-case gradient,
                                                  # torch.profiler's op table of 5 products
    python experiments/_rnnstep.py energy 50      # hidden_energy: k rows at once vs one row
    python experiments/_rnnstep.py saving 50 12   # the energy's old and new cost in each step
    python experiments/_rnnstep.py steps 50 10    # s/step of the first 10 steps and a hash
    OLD=/work/main NEW=. bash -c '...'            # ABBA: alternate `steps` subprocesses with
                                                  # PYTHONPATH=$OLD and $NEW (see results file)

Results: ``results/2026-12-01-rnnstep.md``.
"""

from __future__ import annotations

import collections
import cProfile
import hashlib
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402

import hessfree  # noqa: E402
from hessfree.curvature import StructurallyDampedGGN  # noqa: E402


def _run(length: int) -> tuple[sc.Run, hessfree.HessianFree]:
    task = sc.make_addition_task(length, 60.0)
    run = sc.hf_run(task, "D", "HF", task.hf_default_regime)
    opt = next(
        c.cell_contents
        for c in run.step.__closure__ or []
        if isinstance(c.cell_contents, hessfree.HessianFree)
    )
    return run, opt


def profile(length: int) -> None:
    run, opt = _run(length)
    for _ in range(5):  # warm-up
        run.step()
    phases: collections.Counter = collections.Counter()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(10):
        run.step()
        s = opt.last_step
        print(s.closure_calls, s.cg_iters, s.cg_matvecs, s.backtrack_iter, s.step_rate, s.status)
        phases.update(s.time_phases)
    pr.disable()
    print({k: round(v, 3) for k, v in phases.items()})
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats(key).print_stats(40)
        print(out.getvalue())


def _product(length: int) -> tuple[sc.Task, list, callable, StructurallyDampedGGN]:
    task = sc.make_addition_task(length, 60.0)
    params = list(task.model.parameters())
    x, y = task.x[:100], task.y[:100]

    def build() -> tuple:
        out, h = task.model.forward_with_hidden(x)
        return task.loss(out, y), out, h

    return task, params, build, StructurallyDampedGGN(*build(), params, weight=3e-6)


def ops(length: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    _, params, build, P = _product(length)
    v = torch.randn(P.layout.numel, generator=torch.Generator().manual_seed(0))
    fns = {
        "product": lambda: P.matvec(v),
        "jvp (J_o v, J_h v)": lambda: P._jvps(v, False),
        "gradient, 100 cases": lambda: torch.autograd.grad(build()[0], params),
        "forward, 100 cases, no_grad": lambda: torch.no_grad()(build)(),
        "product set-up (forward + R-op graph)": lambda: StructurallyDampedGGN(
            *build(), params, weight=3e-6
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(18):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r >= 3:
                times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times["gradient, 100 cases"])
    for k, t in times.items():
        print(f"{k:40} {statistics.median(t) / ref:.3f} x gradient")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            P.matvec(v)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def energy(length: int) -> None:
    _, _, _, P = _product(length)
    gen = torch.Generator().manual_seed(length)
    X = torch.randn(8, P.layout.numel, generator=gen) * 0.1
    rows = torch.cat([P.hidden_energy(X[i : i + 1]) for i in range(8)])
    print("row i of 8 rows == one row alone, bitwise:", torch.equal(P.hidden_energy(X), rows))
    times: dict[str, list[float]] = {"8 rows": [], "1 row": []}
    for _ in range(10):
        for k, Y in (("8 rows", X), ("1 row", X[-1:])):
            t0 = time.perf_counter()
            P.hidden_energy(Y)
            times[k].append(time.perf_counter() - t0)
    print("1 row / 8 rows:", statistics.median(times["1 row"]) / statistics.median(times["8 rows"]))


def saving(length: int, n: int) -> None:
    """Per step, in the same step: the structural energy of every stored iterate (the old
    path) and of the chosen one (the new), alternated in order; the step without the extra."""
    run, opt = _run(length)
    pc = hessfree.HessianFree._predicted_change
    rec: list[tuple[float, float]] = []

    def timed(solution, chosen, r):  # noqa: ANN001, ANN202
        P, its = solution.structural, solution.result.iterates
        out = []
        for mode in ("all", "one") if len(rec) % 2 else ("one", "all"):
            t0 = time.perf_counter()
            with torch.enable_grad():
                P.hidden_energy(torch.stack(its) if mode == "all" else its[chosen].unsqueeze(0))
            out.append((mode, time.perf_counter() - t0))
        d = dict(out)
        rec.append((d["all"], d["one"], len(its)))
        return pc(solution, chosen, r)

    hessfree.HessianFree._predicted_change = staticmethod(timed)
    rows = []
    for _ in range(n):
        k = len(rec)
        t0 = time.perf_counter()
        run.step()
        t = time.perf_counter() - t0
        t_all, t_one, m = rec[k]
        new = t - t_all - t_one  # the step as the new code runs it (its one row included)
        rows.append((new + t_one, new + t_all, m))
    for new, old, m in rows[1:]:
        print(f"new {new:.3f} s  old {old:.3f} s  new/old {new / old:.3f}  rows {m}")
    print("median new/old", statistics.median(a / b for a, b, _ in rows[1:]))


def steps(length: int, n: int) -> None:
    run, opt = _run(length)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        run.step()
        ts.append(time.perf_counter() - t0)
    h = hashlib.sha256()
    for p in run.model.parameters():
        h.update(p.detach().numpy().tobytes())
    print(json.dumps({"src": hessfree.__file__, "times": ts, "hash": h.hexdigest()[:16]}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("load", open("/proc/loadavg").read().strip(), file=sys.stderr)
    mode, *args = sys.argv[1:]
    {"profile": profile, "ops": ops, "energy": energy, "steps": steps, "saving": saving}[mode](
        *map(int, args)
    )
    print("load", open("/proc/loadavg").read().strip(), file=sys.stderr)
