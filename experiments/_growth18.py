r"""Why a fixed geometric batch growth beat Byrd et al.'s norm test on CURVES (#14, stop 48).

run31's tuned HF row grows its batch 0.07 % a step ("250×1.0007/step, curvature ¼, cg≤2, K-FAC
rank 32 refresh 2, λ≥0.3"); the scorecard's norm-test rows lost to it. The rows differ in the
growth rule, the curvature batch (a quarter against a fixed 62) and the λ floor (0.3 against
'auto'). ``variants()`` separates them and adds rules that grow on a step's transfer to unseen
cases (``scorecard._TransferTest``), raced on ``_curves_late``'s harness (the scorecard's
CURVES task, same initial weights and data order, interleaved turns, 1 torch thread) against
Adam lr 1e-3 b 20; per slice it prints each run's batch and, off the clock, the gradient
noise :math:`r = E\|g_{250} - g\|^2/\|g\|^2` from which the norm test's size follows,
:math:`|S| \approx 250\,r/\theta^2`. ``transfer`` and ``window`` measure, at the fixed
row's weights, where one step's and n steps' gains go. Findings: experiments/README.md,
"lead, stop 48".

    OPENBLAS_NUM_THREADS=1 python experiments/_growth18.py BUDGET name[,name...] [--slices N]
    OPENBLAS_NUM_THREADS=1 python experiments/_growth18.py 90 geo@1.0015/75,geo@1.003/30
    OPENBLAS_NUM_THREADS=1 python experiments/_growth18.py transfer 200,500,1000 250,500,1000
    OPENBLAS_NUM_THREADS=1 python experiments/_growth18.py window 500 250x20,1000x8 [--growth G]
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _curves_late  # noqa: E402
import scorecard as sc  # noqa: E402

from hessfree import HessianFree, KFACPreconditioner  # noqa: E402


def variants() -> dict[str, dict]:
    """The growth rule × curvature batch × damping floor grid around run31's two rows."""
    floor = dict(cg_max_iter=2, min_damping=0.3, relative_min_damping=0.0)
    k = dict(batch=250, kfac=dict(rank=32, refresh=2))
    smooth9 = dict(theta=0.9, smooth=0.8, max_growth=2.0)
    return {
        # run31's tuned row: geometric, curvature ¼, λ ≥ 0.3
        "geo": k | dict(growth=1.0007, curvature_batch=0.25, kw=floor),
        # the same growth with the default (relative, 'auto') floor
        "geo-auto": k | dict(growth=1.0007, curvature_batch=0.25, kw=dict(cg_max_iter=2)),
        # the same growth with the curvature batch fixed at 62
        "geo-c62": k | dict(growth=1.0007, curvature_batch=62, kw=floor),
        # the scorecard's norm-test row as it is (62, default floor)
        "nt": k | dict(curvature_batch=62, kw=dict(cg_max_iter=2), norm_test=smooth9),
        # the norm test with the geometric row's curvature ¼ and λ ≥ 0.3
        "nt-floor": k | dict(curvature_batch=0.25, kw=floor, norm_test=smooth9),
        # the norm test at a lax θ = 1.6: it asks (0.9/1.6)² = 0.32x the cases θ = 0.9 asks
        "nt1.6-floor": k
        | dict(curvature_batch=0.25, kw=floor, norm_test=smooth9 | dict(theta=1.6)),
        # the batch grown ×1.25 when a step's drop on 250 unseen cases is below half its
        # batch's (scorecard._TransferTest)
        "tt": k | dict(curvature_batch=0.25, kw=floor, transfer_test=dict(tau=0.5)),
        "tt.3": k | dict(curvature_batch=0.25, kw=floor, transfer_test=dict(tau=0.3)),
        # the batch sized for the whole set's drop per second: √(b* b₀), b₀ = 265 cases
        # (CURVES's step here: 31 ms + 0.118 ms a case), grown ×1.25 a test at most
        "eff": k | dict(curvature_batch=0.25, kw=floor, transfer_test=dict(overhead=265.0)),
        "eff-slow": k
        | dict(curvature_batch=0.25, kw=floor, transfer_test=dict(overhead=265.0, growth=1.1)),
        # both at most 1,000 cases (the best of 250/1,000/2,000 at equal time in `window`)
        "eff-1000": k
        | dict(
            curvature_batch=0.25,
            kw=floor,
            transfer_test=dict(overhead=265.0),
            max_batch=1000,
        ),
        "geo.15-1000": k
        | dict(growth=1.0015, curvature_batch=0.25, kw=floor, max_batch=1000, hold=10**9),
        # λ's floor 0.3 × 250 / batch: a larger batch's steps may fit it more (stop 48's
        # forks: from the geometric row's step 500, a fixed 1,000 batch at λ ≥ 0.03 reached
        # 3.12 in 40 s, at λ ≥ 0.3 6.44, the geometric row 5.32)
        "geo-lam/b": k | dict(growth=1.0007, curvature_batch=0.25, kw=floor, floor_cases=75.0),
        "geo.15-lam/b": k | dict(growth=1.0015, curvature_batch=0.25, kw=floor, floor_cases=75.0),
        # the fixed row run30 tuned (no growth)
        "fixed": k | dict(curvature_batch=62, kw=floor),
    }


def grown(name: str) -> dict:
    """``geo@G/C``: the geometric row growing ×G a step with λ ≥ C / batch (stop 49's grid
    around "geo.15-lam/b" = ``geo@1.0015/75``)."""
    if name.startswith("def@") and "/" in name:  # the defaults, growth G, relative floor C / b
        g, c = name[4:].split("/")
        c, _, p = c.partition("^")  # def@G/C^p: the floor C / b × (250 / b)^(p − 1)
        # a fixed batch (G = 1) takes a fixed curvature batch: the scorecard's 62 of 250
        fixed = float(g) == 1.0
        reg = dict(batch=250, growth=float(g), curvature_batch=62 if fixed else 0.25, kw={})
        power = dict(relative_power=float(p)) if p else {}
        return reg | (dict(relative_cases=float(c)) | power if c != "auto" else {})
    if not name.startswith("geo@") or "/" not in name:
        raise SystemExit(f"unknown variant {name!r}: one of {sorted(variants())} or geo@G/C")
    g, c = name[4:].split("/")
    return variants()["geo.15-lam/b"] | dict(growth=float(g), floor_cases=float(c))


def main() -> None:
    torch.set_num_threads(1)
    budget = float(sys.argv[1])
    names = sys.argv[2].split(",")
    slices = int(sys.argv[sys.argv.index("--slices") + 1]) if "--slices" in sys.argv else 6
    task = sc.make_curves_task(False)
    runs = [sc.first_order_run(task, "Adam", 1e-3, 20)]
    v = variants()
    probes = []
    for n in names:
        r = sc.hf_run(task, n, "HF", v[n] if n in v else grown(n))
        probes.append(_curves_late.Probe(r, budget, slices))
        runs.append(r)
    noise: dict[str, list[float]] = {r.name: [] for r in runs}
    error = task.error

    def error_and_noise(m: torch.nn.Module) -> float:
        e = error(m)
        r = next(r for r in runs if r.model is m)
        if r.clock > 0:
            noise[r.name].append(_curves_late.noise_ratio(task, m, 250, draws=4))
        return e

    task.error = error_and_noise
    print("load before", os.getloadavg(), "cpu", torch.backends.cpu.get_cpu_capability())
    t0 = time.time()
    sc.interleave(runs, task, budget, slices, "cpu")
    print(f"load after {os.getloadavg()}, wall {time.time() - t0:.0f} s", flush=True)
    ref = sc.final_error(runs[0])
    for r in runs:
        e = sc.final_error(r)
        curve = " ".join(f"{x:.2f}" for _, x in r.curve[1:])
        print(
            f"{r.name:12s} {e:7.3f} ratio {e / ref:.3f} steps {r.steps:5d} "
            f"{1e3 * r.clock / max(r.steps, 1):6.1f} ms/step | {curve}"
        )
        print("   noise(250) ", " ".join(f"{x:7.2f}" for x in noise[r.name]))
        print("   θ 0.9 asks ", " ".join(f"{250 * x / 0.81:7.0f}" for x in noise[r.name]))
        p = next((p for p in probes if p.run is r), None)
        if p is not None:
            print("\n".join(_curves_late.slice_rows(p)))


def _kfac_like(task: sc.Task) -> tuple[torch.nn.Module, HessianFree]:
    """A copy of the task's model and the λ ≥ 0.3 rows' optimizer on it (cg≤2, K-FAC rank 32
    refresh 2)."""
    m = copy.deepcopy(task.model)
    opt = HessianFree(
        m.parameters(),
        cg_max_iter=2,
        min_damping=0.3,
        relative_min_damping=0.0,
        precond=KFACPreconditioner(m, rank=32, refresh=2),
    )
    return m, opt


def _step(task: sc.Task, m: torch.nn.Module, opt: HessianFree, idx: torch.Tensor, c: int) -> None:
    """One HF step on the cases ``idx``, curvature on their first ``c``."""
    xb, yb = task.x[idx], task.y[idx]

    def f() -> tuple:
        out = m(xb)
        return task.loss(out, yb), out

    def g() -> tuple:
        out = m(xb[:c])
        return task.loss(out, yb[:c]), out

    opt.step(f, g)


def transfer(checkpoints: list[int], sizes: list[int], draws: int = 3) -> None:
    """Where a 250-case step's gain goes. At the weights the fixed λ ≥ 0.3 row reaches after
    each of ``checkpoints`` steps (the scorecard's data order, on the step count, not the
    clock), take one more step on ``draws`` random batches of each of ``sizes`` cases
    (curvature on a quarter; the model's and the optimizer's state dicts, with λ, the warm
    start and the K-FAC factors, restored after each), and print the step's loss drop on its
    own batch, on the whole training set, and their ratio (the transfer); beside it the
    Euclidean gradient noise at 250 cases that the norm test reads. Deterministic, off any
    clock.
    """
    task = sc.make_curves_task(False)
    m, opt = _kfac_like(task)
    batches = sc._Batches(len(task.x), 250, task.x.device)
    gen = torch.Generator().manual_seed(7)
    print("steps  full-loss  noise(250)  | per batch size: batch drop, full drop, transfer")
    done = 0
    for k in checkpoints:
        while done < k:
            _step(task, m, opt, batches.next(), 62)
            done += 1
        with torch.no_grad():
            full0 = float(task.loss(m(task.x), task.y))
        cells = [
            f"{k:5d}  {full0:9.3f}  {_curves_late.noise_ratio(task, m, 250, draws=4):10.3f}  |"
        ]
        saved = (copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict()))
        for b in sizes:
            drops, fulls = [], []
            for _ in range(draws):
                _step(task, m, opt, torch.randperm(len(task.x), generator=gen)[:b], b // 4)
                info = opt.last_step
                with torch.no_grad():
                    full1 = float(task.loss(m(task.x), task.y))
                drops.append(info.loss - info.loss_after)
                fulls.append(full0 - full1)
                m.load_state_dict(saved[0])
                opt.load_state_dict(copy.deepcopy(saved[1]))
            bd, fd = statistics.mean(drops), statistics.mean(fulls)
            cells.append(f" b{b}: {bd:6.3f} {fd:6.3f} {fd / bd:5.2f}")
        print(" ".join(cells), flush=True)


def window(
    checkpoints: list[int], plan: list[tuple[int, int]], draws: int = 2, growth: float = 1.0
) -> None:
    """Is a run of cheap steps worth more than the sum of their one-step gains? At the same
    weights as :func:`transfer`, for each ``(b, n)`` of ``plan`` take ``n`` steps on fresh
    random ``b``-case batches (about equal time for the plan's pairs: a step costs about
    b₀ + b cases, b₀ ≈ 265 here) and print the whole set's drop after them, beside ``n`` times
    the set's drop of one such step from the start (the one-step transfer's forecast).
    ``growth`` > 1: at the weights of the row whose batch grows that much a step (curvature
    ¼) instead of the fixed 250/62 row's.
    """
    task = sc.make_curves_task(False)
    m, opt = _kfac_like(task)
    batches = sc._Batches(len(task.x), 250, task.x.device, growth)

    def set_loss() -> float:
        with torch.no_grad():
            return float(task.loss(m(task.x), task.y))

    gen = torch.Generator().manual_seed(9)
    print("steps  set-loss | per (b, n): set drop after n steps, n x one step's set drop")
    done = 0
    for k in checkpoints:
        while done < k:
            idx = batches.next()
            _step(task, m, opt, idx, 62 if growth == 1.0 else round(len(idx) / 4))
            done += 1
        full0 = set_loss()
        saved = (copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict()))
        cells = [f"{k:5d}  {full0:8.3f} |"]
        for b, n in plan:
            runs, ones = [], []
            for _ in range(draws):
                for j in range(n):
                    _step(task, m, opt, torch.randperm(len(task.x), generator=gen)[:b], b // 4)
                    if j == 0:
                        ones.append(full0 - set_loss())
                runs.append(full0 - set_loss())
                m.load_state_dict(saved[0])
                opt.load_state_dict(copy.deepcopy(saved[1]))
            one = statistics.mean(ones)
            cells.append(f" b{b}×{n}: {statistics.mean(runs):6.3f} vs {n * one:6.3f}")
        print(" ".join(cells), flush=True)


def fork(k: int, budget: float, sizes: list[tuple[int, float]], slices: int = 6) -> None:
    """A longer horizon than :func:`window`: the geometric row's weights after ``k`` steps,
    then, interleaved for ``budget`` seconds each, fresh optimizers of that row's settings
    (K-FAC rank 32 refresh 2, cg≤2, λ ≥ 0.3, curvature ¼) on the geometric row's batch
    continued (×1.0007 a step from its size at ``k``) and on fixed batches of ``sizes``
    (``(cases, λ floor)`` pairs: the floor of the larger batch's steps may be lower).
    """
    task = sc.make_curves_task(False)
    m, opt = _kfac_like(task)
    batches = sc._Batches(len(task.x), 250, task.x.device, 1.0007)
    for _ in range(k):
        idx = batches.next()
        _step(task, m, opt, idx, round(len(idx) / 4))
    here = replace(task, model=m)
    row = dict(kw=variants()["geo"]["kw"], kfac=dict(rank=32, refresh=2), curvature_batch=0.25)
    size = round(batches.size)
    runs = [sc.hf_run(here, f"geo from {size}", "HF", row | dict(batch=size, growth=1.0007))]
    for b, floor in sizes:
        kw = row["kw"] | dict(min_damping=floor)
        name = f"fixed {b}, λ≥{floor:g}"
        runs.append(sc.hf_run(here, name, "HF", row | dict(batch=b, curvature_batch=b // 4, kw=kw)))
    print(f"k {k}: batch {size}, load {os.getloadavg()}", flush=True)
    sc.interleave(runs, here, budget, slices, "cpu")
    for r in runs:
        curve = " ".join(f"{x:.2f}" for _, x in r.curve)
        print(f"  {r.name:16s} steps {r.steps:5d} | {curve}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "transfer":
        torch.set_num_threads(1)
        transfer([int(k) for k in sys.argv[2].split(",")], [int(b) for b in sys.argv[3].split(",")])
    elif sys.argv[1] == "window":
        torch.set_num_threads(1)
        pairs = [tuple(int(v) for v in p.split("x")) for p in sys.argv[3].split(",")]
        grow = float(sys.argv[sys.argv.index("--growth") + 1]) if "--growth" in sys.argv else 1.0
        window([int(k) for k in sys.argv[2].split(",")], pairs, growth=grow)
    elif sys.argv[1] == "fork":
        torch.set_num_threads(1)
        # "1000" or "1000@0.1" (a λ floor of 0.1 instead of 0.3)
        sizes = [
            (int(b.split("@")[0]), float(b.split("@")[1]) if "@" in b else 0.3)
            for b in sys.argv[4].split(",")
        ]
        for k in sys.argv[2].split(","):
            fork(int(k), float(sys.argv[3]), sizes)
    else:
        main()
