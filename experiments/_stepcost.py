"""What a mini-batch HF step costs outside the arithmetic, and an A/B of two checkouts (stepcost).

``profile``: ``HessianFree(params)`` with no arguments in the user's mini-batch loop (closure
returning ``(loss, outputs)``) on three small models: the scorecard's MNIST-1D MLP
(40-256-256-10 tanh, 250-case batches), a CNN on digits (``_unseen.cnn``, 100-case batches) and
the scorecard's addition RNN at T = 30 (100 tanh units, 500/100-case batches, hidden states
returned: structural damping). Per model: the step's phases (``StepInfo.time_phases``), the
step against one forward + backward of its batch, cProfile's split of the step's time into
Python in ``hessfree`` / in torch's Python / inside torch's C functions, and, per phase (the
optimizer's methods wrapped in ``record_function`` ranges), torch.profiler's self time of aten
ops against the phase's time (the rest: Python, autograd's engine and the dispatcher above the
ops).

``ab``: the same loops with two copies of the package in one process (``--other DIR`` holds a
``hessfree`` package, e.g. ``git archive main hessfree | tar -x -C /tmp/stepcost-main``): the
``sys.modules`` entries of each copy are swapped in before its steps, both start from the same
weights and batches, and they take turns in blocks of steps; CPU (``time.process_time``) and
wall time per step, medians over the rounds, loads at start and end.

    export OPENBLAS_NUM_THREADS=1 PYTHONPATH=.
    python3 experiments/_stepcost.py profile [--steps 30]
    git archive main hessfree | tar -x -C /tmp/stepcost-main
    python3 experiments/_stepcost.py ab --other /tmp/stepcost-main [--rounds 9 --block 12]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------- problems
class Problem:
    """A model, its data and a batch sampler: ``closure(model, batch)`` for ``opt.step``."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        x,
        y,
        batch: int,
        loss,
        hidden=False,
        curvature_batch: int | None = None,
    ) -> None:
        self.name, self.model0, self.x, self.y = name, model, x, y
        self.batch, self.loss, self.hidden, self.curvature_batch = (
            batch,
            loss,
            hidden,
            curvature_batch,
        )

    def batches(self, n: int, seed: int = 1) -> list[tuple]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            idx = torch.randint(len(self.y), (self.batch,), generator=gen)
            out.append((self.x[idx], self.y[idx]))
        return out

    def closures(self, model: torch.nn.Module, xb, yb) -> tuple[Callable, Callable | None]:
        def forward(xs, ys):
            if self.hidden and torch.is_grad_enabled():
                out, h = model.forward_with_hidden(xs)
                return self.loss(out, ys), out, h
            out = model(xs)
            return self.loss(out, ys), out

        c = self.curvature_batch
        curvature = None if c is None else (lambda: forward(xb[:c], yb[:c]))
        return (lambda: forward(xb, yb)), curvature


def problems() -> list[Problem]:
    import _unseen
    import scorecard

    from hessfree.train.data import make_addition, make_mnist1d
    from hessfree.train.models import build_model

    out = []
    ds = make_mnist1d()
    torch.manual_seed(0)
    mlp = build_model(
        "mlp",
        input_shape=ds.input_shape,
        num_outputs=10,
        hidden_sizes=[256, 256],
        activation="tanh",
    )
    out.append(Problem("MNIST-1D MLP", mlp, ds.x_train, ds.y_train, 250, F.cross_entropy))
    x, y, _, _ = _unseen.digits()
    torch.manual_seed(0)
    out.append(Problem("digits CNN", _unseen.cnn(), x, y, 100, F.cross_entropy))
    ds = make_addition(length=30, num_train=10_000, num_test=1000, seed=0)
    torch.manual_seed(0)
    rnn = build_model(
        "rnn", input_shape=ds.input_shape, num_outputs=1, hidden_size=100, spectral_radius=1.0
    )
    out.append(
        Problem(
            "addition T=30 RNN",
            rnn,
            ds.x_train,
            ds.y_train,
            500,
            scorecard.mse_sum_per_case,
            hidden=True,
            curvature_batch=100,
        )
    )
    return out


def fwd_bwd(problem: Problem, model: torch.nn.Module, xb, yb) -> None:
    params = list(model.parameters())
    loss = problem.loss(model(xb), yb)
    torch.autograd.grad(loss, params)


def load() -> tuple[float, float]:
    return os.getloadavg()[:2]


# ------------------------------------------------------------------------------- profile
#: Phases of a step, as the optimizer's methods that run them (wrapped in record_function).
PHASES = {
    "gradient (1st closure call)": "_first_call",
    "GN set-up + gradient": "_curvature_product",
    "floor / λ calibration": "_raise_floor",
    "preconditioner (K-FAC)": "_preconditioner",
    "CG": "cg",
    "backtrack, ρ, line search": "_backtrack_and_search",
}


def _wrap_phases(hf) -> None:
    """Wrap each phase's method (and the curvature products) in a profiler range."""
    from torch.profiler import record_function

    opt_mod = sys.modules["hessfree.optimizer"]

    def wrapped(fn, name):
        def inner(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)

        return inner

    for name, attr in PHASES.items():
        if attr == "cg":
            opt_mod.cg = wrapped(opt_mod.cg, name)
        else:
            setattr(hf.HessianFree, attr, wrapped(getattr(hf.HessianFree, attr), name))
    for cls in (hf.GGNProduct, hf.StructurallyDampedGGN):
        cls.matvec = wrapped(cls.matvec, "products")


def _kernel_share(prof, steps: int, step_time: float) -> dict[str, tuple[float, float, float]]:
    """Per phase: ms per step, the share of aten ops' self time in it, aten ops per step."""
    names = [*PHASES, "products", "step"]
    acc = {k: [0.0, 0.0, 0] for k in names}

    def aten_below(ev) -> tuple[float, int]:
        t, n = 0.0, 0
        for c in ev.cpu_children:
            if c.name.startswith("aten::"):
                t, n = t + c.self_cpu_time_total, n + 1
            dt, dn = aten_below(c)
            t, n = t + dt, n + dn
        return t, n

    for ev in prof.events():
        key = "step" if ev.name.startswith("Optimizer.step#") else ev.name
        if key in acc:
            t, n = aten_below(ev)
            acc[key][0] += ev.cpu_time_total
            acc[key][1] += t
            acc[key][2] += n
    out = {
        k: (v[0] / steps / 1e3, v[1] / v[0] if v[0] else 0.0, v[2] / steps) for k, v in acc.items()
    }
    return out


def profile(steps: int, warm: int) -> None:
    import types

    import hessfree

    print(f"hessfree from {hessfree.__file__}; torch {torch.__version__}, 1 thread")
    opt_mod = sys.modules["hessfree.optimizer"]
    for prob in problems():
        model = copy.deepcopy(prob.model0)
        opt = hessfree.HessianFree(model.parameters())
        batches = prob.batches(warm + 3 * steps)
        it = iter(batches)
        for _ in range(warm):
            opt.step(*prob.closures(model, *next(it)))
        l0 = load()
        # (1) phases in CPU time (the optimizer's laps read perf_counter: swapped for
        # process_time here) and the forward+backward yardstick, alternating
        phases: dict[str, list[float]] = {}
        fb, cpu, calls, cg, prods = [], [], [], [], []
        saved = opt_mod.time
        opt_mod.time = types.SimpleNamespace(perf_counter=time.process_time)
        try:
            for _ in range(steps):
                xb, yb = next(it)
                c0 = time.process_time()
                fwd_bwd(prob, model, xb, yb)
                fb.append(time.process_time() - c0)
                c0 = time.process_time()
                opt.step(*prob.closures(model, xb, yb))
                cpu.append(time.process_time() - c0)
                info = opt.last_step
                calls.append(info.closure_calls)
                cg.append(info.cg_iters)
                prods.append(info.time_products)
                laps = dict(info.time_phases)
                # the first lap starts at the step's perf_counter clock: the rest of the step
                laps["evaluate"] = cpu[-1] - sum(v for k, v in laps.items() if k != "evaluate")
                for k, v in laps.items():
                    phases.setdefault(k, []).append(v)
        finally:
            opt_mod.time = saved
        med = statistics.median
        step = med(cpu)
        print(
            f"\n#### {prob.name}: {sum(p.numel() for p in model.parameters())} parameters, "
            f"batch {prob.batch}, load {l0[0]:.1f} -> {load()[0]:.1f}\n"
        )
        print(
            f"step CPU {step * 1e3:.2f} ms, forward+backward CPU {med(fb) * 1e3:.2f} ms: "
            f"step / (f+b) = {step / med(fb):.1f}; closure calls {med(calls):g}, CG iterations "
            f"{med(cg):g}, products {med(prods) * 1e3:.2f} ms CPU\n"
        )
        print(
            "| optimizer phase (StepInfo.time_phases, CPU) | ms (median) | share |\n|---|---|---|"
        )
        for k, v in phases.items():
            print(f"| {k} | {med(v) * 1e3:.2f} | {med(v) / step:.0%} |")
        print(f"| (products, inside solve) | {med(prods) * 1e3:.2f} | {med(prods) / step:.0%} |")
        # (2) cProfile: own time in hessfree's Python, torch's Python, C functions
        pr = cProfile.Profile()
        chunk = [next(it) for _ in range(steps)]
        pr.enable()
        for xb, yb in chunk:
            opt.step(*prob.closures(model, xb, yb))
        pr.disable()
        st = pstats.Stats(pr)
        split = {
            "hessfree (Python)": 0.0,
            "torch (Python)": 0.0,
            "C functions": 0.0,
            "other Python": 0.0,
        }
        ncalls = 0
        for (file, _line, _fn), (_cc, nc, tt, _ct, _callers) in st.stats.items():
            ncalls += nc
            if file == "~":
                key = "C functions"
            elif "/hessfree/" in file:
                key = "hessfree (Python)"
            elif "/torch/" in file:
                key = "torch (Python)"
            else:
                key = "other Python"
            split[key] += tt
        tot = sum(split.values())
        print(
            f"\ncProfile: {ncalls / steps:.0f} Python-level calls a step; own time "
            + ", ".join(f"{k} {v / tot:.0%}" for k, v in split.items())
        )
        # (3) torch.profiler: aten ops' self time per phase against the phase's time
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        chunk = [next(it) for _ in range(steps)]
        saved_fns = {a: getattr(hessfree.HessianFree, a) for a in PHASES.values() if a != "cg"}
        saved_cg = opt_mod.cg
        saved_mv = (hessfree.GGNProduct.matvec, hessfree.StructurallyDampedGGN.matvec)
        _wrap_phases(hessfree)
        try:
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for xb, yb in chunk:
                    opt.step(*prob.closures(model, xb, yb))
        finally:
            for a, f in saved_fns.items():
                setattr(hessfree.HessianFree, a, f)
            opt_mod.cg = saved_cg
            hessfree.GGNProduct.matvec, hessfree.StructurallyDampedGGN.matvec = saved_mv
        share = _kernel_share(prof, steps, step)
        print(
            "\n| phase (torch.profiler ranges) | ms a step (profiled) | aten ops' self time "
            "| aten ops a step |\n|---|---|---|---|"
        )
        for k, (ms, frac, n) in share.items():
            print(f"| {k} | {ms:.2f} | {frac:.0%} | {n:.0f} |")
        sys.stdout.flush()


# ------------------------------------------------------------------------------- A/B
def _package(path: str | None) -> dict:
    """Import the ``hessfree`` package found first in ``path`` (or on sys.path); return its
    ``sys.modules`` entries, removed from ``sys.modules``."""
    for name in [n for n in sys.modules if n == "hessfree" or n.startswith("hessfree.")]:
        del sys.modules[name]
    if path is not None:
        sys.path.insert(0, path)
    try:
        importlib.import_module("hessfree")
        importlib.import_module("hessfree.train.data")
        importlib.import_module("hessfree.train.models")
    finally:
        if path is not None:
            sys.path.remove(path)
    mods = {n: m for n, m in sys.modules.items() if n == "hessfree" or n.startswith("hessfree.")}
    for n in mods:
        del sys.modules[n]
    return mods


def _use(mods: dict) -> object:
    for name in [n for n in sys.modules if n == "hessfree" or n.startswith("hessfree.")]:
        del sys.modules[name]
    sys.modules.update(mods)
    return mods["hessfree"]


def ab(other: str, rounds: int, block: int, warm: int) -> None:
    packs = {"other": _package(other), "this": _package(None)}
    for k, mods in packs.items():
        print(f"{k}: {mods['hessfree'].__file__}")
    _use(packs["this"])
    probs = problems()
    results = {}
    for prob in probs:
        l0 = load()
        runs = {}
        for k, mods in packs.items():
            hf = _use(mods)
            model = copy.deepcopy(prob.model0)
            runs[k] = (model, hf.HessianFree(model.parameters()))
        blk = max(1, block // 3) if prob.hidden else block  # the RNN's steps are ~10x longer
        batches = prob.batches(warm + rounds * blk)
        order = list(packs)
        cpu = {k: [] for k in packs}
        wall = {k: [] for k in packs}
        for r in range(-1, rounds):  # round -1: warm-up
            chunk = batches[:warm] if r < 0 else batches[warm + r * blk : warm + (r + 1) * blk]
            for k in order if r % 2 == 0 else order[::-1]:
                _use(packs[k])
                model, opt = runs[k]
                c0, t0 = time.process_time(), time.perf_counter()
                for xb, yb in chunk:
                    opt.step(*prob.closures(model, xb, yb))
                if r >= 0:
                    cpu[k].append((time.process_time() - c0) / len(chunk))
                    wall[k].append((time.perf_counter() - t0) / len(chunk))
        same = all(
            torch.equal(a, b)
            for a, b in zip(
                runs["this"][0].parameters(), runs["other"][0].parameters(), strict=True
            )
        )
        med = statistics.median
        ratios = [a / b for a, b in zip(cpu["this"], cpu["other"], strict=True)]
        wratios = [a / b for a, b in zip(wall["this"], wall["other"], strict=True)]
        results[prob.name] = (med(ratios), min(ratios), max(ratios), med(wratios))
        print(
            f"\n{prob.name}: {rounds} rounds × {blk} steps, load {l0[0]:.1f} -> {load()[0]:.1f}; "
            f"parameters bitwise equal after {warm + rounds * blk} steps: {same}"
        )
        for k in packs:
            print(
                f"  {k}: CPU {med(cpu[k]) * 1e3:.2f} ms/step, wall {med(wall[k]) * 1e3:.2f} ms/step"
            )
        print(
            f"  this / other: CPU median {med(ratios):.3f} (rounds {min(ratios):.3f}-"
            f"{max(ratios):.3f}), wall median {med(wratios):.3f}"
        )
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warm", type=int, default=10)
    q = sub.add_parser("ab")
    q.add_argument("--other", required=True, help="a folder holding another hessfree package")
    q.add_argument("--rounds", type=int, default=9)
    q.add_argument("--block", type=int, default=10)
    q.add_argument("--warm", type=int, default=5)
    args = ap.parse_args()
    if args.cmd == "profile":
        profile(args.steps, args.warm)
    else:
        ab(args.other, args.rounds, args.block, args.warm)


if __name__ == "__main__":
    main()
