"""What a ``HessianFree.step()`` costs beyond its arithmetic on small full-batch fits (overhead).

``HessianFree(params)`` with no arguments, float64 unless said, 1 thread, each problem run as a
fresh trajectory of ``K`` steps from the same start (the small fits converge in a few dozen):

* ``exp3``: y = a·exp(−b·x) + c, 3 parameters, 30 points (a noisy decay; seeded).
* ``misra1a``: NIST Misra1a at start 1 (``_stiff.py``).
* ``rosen``: extended Rosenbrock, n = 50, as a sum of squares (``_stiff.py``).
* ``mlp``: a 2-16-1 tanh MLP regressing sin(x₁)·cos(x₂) on 200 points (float32, 65 parameters).
* mid-size, so a gain on tiny problems is not a loss elsewhere: ``digits`` (the scorecard's
  64-100-10 tanh MLP on digits' 1,437 training images, full batch, ``(loss, outputs)``) and
  ``swap`` (the scorecard's swap task, its default regime: full batch, LBFGS-style closure).

Each runs with both closures: ``lbfgs`` (``zero_grad``, loss, ``backward``, return the loss)
and ``lo`` (return ``(loss, outputs)``); digits only ``lo``, swap only ``lbfgs`` (their
scorecard regimes).

``profile``: where a step's time goes (one package). Exclusive CPU time per category, by a
timer of our own around the optimizer's methods (a stack: a nested call's time is taken out
of its caller's): the user's closure (forward, and backward for ``lbfgs``), curvature products
(the matvec CG and the damping calibration call), the curvature set-up (``_curvature_product``:
the Gauss-Newton graph and, for ``lo``, the gradient from it), ``_gradient`` (what is left of it),
CG's own loop (``cg()`` less its products), the line search and backtracking (less the
closure calls inside), the preconditioner's set-up, and the rest of ``step()`` (settings,
checks, state, ``last_step``'s record, graph set-up); host reads (``.item()``, ``.tolist()``,
``float(t)``, ``bool(t)``) counted by a ``TorchFunctionMode`` in a separate pass; and
cProfile's top own-time functions under ``hessfree``. Also the gradient's cost (an
``lbfgs`` closure call: forward + backward) for the ratio step / gradient.

``ab``: main's package and this tree's in ONE process (``--other DIR`` holds a ``hessfree``
package: ``git archive main hessfree | tar -x -C DIR``), ``sys.modules`` swapped per
trajectory (as ``_stepcost.py`` does), the two alternating in order round by round, same
start: per problem, the median over rounds of the trajectory's CPU (``time.process_time``)
and wall time per step and to the target (the first step whose loss is within ``TARGET`` of
the trajectory's final loss), ratios this / other, and whether the final parameters agree
bitwise. Loads (``os.getloadavg``) at the start and end of each problem.

    export OPENBLAS_NUM_THREADS=1 PYTHONPATH=.
    python3 experiments/_overhead.py profile [--problems exp3,mlp] [--rounds 20]
    git archive main hessfree | tar -x -C /tmp/overhead-main
    python3 experiments/_overhead.py ab --other /tmp/overhead-main [--rounds 15]
    python3 experiments/_overhead.py micro --other /tmp/overhead-main
    python3 experiments/_overhead.py proto   # CG's loop against a host-scalar sketch

``proto``: the library's ``cg()`` per iteration against a plain CG whose scalars live on the host
(study-only; the lever left on CG's loop).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib
import math
import os
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

TARGET = 1e-6  # relative to the trajectory's final loss: "reached" at (1 + TARGET) · f_K


# ------------------------------------------------------------------------------- problems
class Spec:
    """A problem: ``model`` (initial weights), ``loss_of(m)``, ``lo_of(m)`` -> (loss, outputs),
    ``steps`` (the trajectory's length) and the closure styles it runs with."""

    def __init__(self, name, model, loss_of, lo_of, steps, styles=("lbfgs", "lo")) -> None:  # noqa: ANN001
        self.name, self.model, self.loss_of, self.lo_of = name, model, loss_of, lo_of
        self.steps, self.styles = steps, styles


def _exp3() -> Spec:
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 4, 30, dtype=torch.float64)
    y = 2.0 * torch.exp(-1.3 * x) + 0.5 + 0.01 * torch.randn(30, generator=g, dtype=torch.float64)

    class Exp3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))

        def forward(self) -> torch.Tensor:
            return self.b[0] * torch.exp(-self.b[1] * x) + self.b[2]

    def lo_of(m):  # noqa: ANN001, ANN202
        out = m()
        return F.mse_loss(out, y, reduction="sum"), out

    return Spec("exp3", Exp3(), lambda m: lo_of(m)[0], lo_of, 12)


def _stiff(key: str, steps: int) -> Spec:
    import _stiff

    p = _stiff.PROBLEMS[key](0)
    return Spec(key, p.model, p.loss_of, p.lo_of, steps)


def _mlp() -> Spec:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 2, generator=g) * 4 - 2
    y = (torch.sin(x[:, 0]) * torch.cos(x[:, 1]))[:, None]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))

    def lo_of(m):  # noqa: ANN001, ANN202
        out = m(x)
        return F.mse_loss(out, y), out

    return Spec("mlp", model, lambda m: lo_of(m)[0], lo_of, 30)


def _scorecard(key: str, steps: int) -> Spec:
    import scorecard

    if key == "swap":
        task = scorecard.make_swap_task(quick=False)
        styles = ("lbfgs",)
    else:
        task = scorecard._classifier(key, quick=True)
        styles = ("lo",)

    def lo_of(m):  # noqa: ANN001, ANN202
        out = m(task.x)
        return task.loss(out, task.y), out

    return Spec(key, task.model, lambda m: lo_of(m)[0], lo_of, steps, styles)


BUILDERS: dict[str, Callable[[], Spec]] = {
    "exp3": _exp3,
    "misra1a": lambda: _stiff("misra1a", 30),
    "rosen": lambda: _stiff("rosen", 30),
    "mlp": _mlp,
    "digits": lambda: _scorecard("digits", 20),
    "swap": lambda: _scorecard("swap", 20),
}


def _closure(spec: Spec, style: str, model: nn.Module, opt: torch.optim.Optimizer) -> Callable:
    if style == "lo":
        return lambda: spec.lo_of(model)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = spec.loss_of(model)
        loss.backward()
        return loss

    return closure


def _gradient_time(spec: Spec, reps: int = 200) -> float:
    """Median CPU seconds of one forward + backward (an ``lbfgs`` closure call)."""
    model = copy.deepcopy(spec.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    closure = _closure(spec, "lbfgs", model, opt)
    for _ in range(10):
        closure()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        closure()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def load() -> tuple[float, float, float]:
    return os.getloadavg()


# ------------------------------------------------------------------------------- profile
class _Timer:
    """Exclusive CPU time per category (``time.process_time``: the machine is shared, so wall
    time would count other processes' turns): a nested timed call is taken out of its caller."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []

    def wrap(self, category: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            frame = [category, 0.0]
            self.stack.append(frame)
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.process_time() - t0
                self.stack.pop()
                self.total[category] += dt - frame[1]
                if self.stack:
                    self.stack[-1][1] += dt

        return timed


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor methods that read a value to the host (a device sync on a GPU)."""

    NAMES = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__")

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _instrument(hessfree, timer: _Timer) -> Callable[[], None]:  # noqa: ANN001
    """Wrap the optimizer's phases in ``timer``; returns the undo."""
    opt_mod = sys.modules["hessfree.optimizer"]
    HF = hessfree.HessianFree
    saved: list[tuple[object, str, object]] = []

    def patch(owner: object, name: str, category: str) -> None:
        fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        saved.append((owner, name, fn))
        setattr(owner, name, timer.wrap(category, fn))

    original_product = HF._curvature_product

    def curvature_product(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        curvature, product = original_product(self, *args, **kwargs)
        if curvature is not None:
            curvature = timer.wrap("products", curvature)
        if product is not None and hasattr(product, "matvec"):
            try:
                product.matvec = timer.wrap("products", product.matvec)
            except AttributeError:
                pass
        return curvature, product

    saved.append((HF, "_curvature_product", original_product))
    HF._curvature_product = timer.wrap("curvature set-up", curvature_product)
    patch(HF, "_gradient", "gradient")
    patch(opt_mod, "cg", "cg loop")
    patch(HF, "_backtrack_and_search", "line search")
    patch(HF, "_preconditioner", "preconditioner")
    patch(HF, "step", "bookkeeping")

    def undo() -> None:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)

    return undo


def _trajectory(hessfree, spec: Spec, style: str, wrap: Callable | None = None) -> list:  # noqa: ANN001
    model = copy.deepcopy(spec.model)
    opt = hessfree.HessianFree(model.parameters())
    closure = _closure(spec, style, model, opt)
    if wrap is not None:
        closure = wrap(closure)
    infos = []
    for _ in range(spec.steps):
        opt.step(closure)
        infos.append(opt.last_step)
    return infos


def profile(names: list[str], rounds: int) -> None:
    import hessfree

    print(f"hessfree from {hessfree.__file__}; torch {torch.__version__}, 1 thread")
    for name in names:
        spec = BUILDERS[name]()
        for style in spec.styles:
            l0 = load()
            _trajectory(hessfree, spec, style)  # warm-up
            timer = _Timer()
            undo = _instrument(hessfree, timer)
            try:
                t0 = time.process_time()
                for _ in range(rounds):
                    infos = _trajectory(hessfree, spec, style, wrap=partial(timer.wrap, "closure"))
                total = time.process_time() - t0
            finally:
                undo()
            # the same steps uninstrumented, for the plain step time
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(rounds):
                _trajectory(hessfree, spec, style)
            plain = (time.perf_counter() - t0) / (rounds * spec.steps)
            plain_cpu = (time.process_time() - c0) / (rounds * spec.steps)
            grad = _gradient_time(spec)
            reads = _HostReads()
            with reads:
                _trajectory(hessfree, spec, style)
            n = rounds * spec.steps
            calls = sum(i.closure_calls for i in infos) / len(infos)
            matvecs = sum(i.cg_matvecs for i in infos) / len(infos)
            cg_iters = sum(i.cg_iters for i in infos) / len(infos)
            print(
                f"\n### {name} ({sum(p.numel() for p in spec.model.parameters())} parameters), "
                f"{style}: {spec.steps} steps × {rounds}; load {l0[0]:.2f} -> {load()[0]:.2f}"
            )
            print(
                f"step {plain_cpu * 1e3:.3f} ms CPU ({plain * 1e3:.3f} wall); gradient "
                f"{grad * 1e3:.3f} ms CPU; step / gradient {plain_cpu / grad:.1f}; per step: "
                f"closure calls {calls:.2f}, CG iterations {cg_iters:.2f}, CG products "
                f"{matvecs:.2f}; instrumented step {total / n * 1e3:.3f} ms CPU"
            )
            print("| category | CPU ms a step | share |\n|---|---|---|")
            for k, v in sorted(timer.total.items(), key=lambda kv: -kv[1]):
                print(f"| {k} | {v / n * 1e3:.3f} | {v / total:.0%} |")
            per = {k: v / spec.steps for k, v in sorted(reads.counts.items())}
            print("host reads a step: " + ", ".join(f"{k} {v:.1f}" for k, v in per.items()))
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(rounds):
                _trajectory(hessfree, spec, style)
            pr.disable()
            st = pstats.Stats(pr)
            rows = [
                (tt, nc, f"{Path(fn).name}:{ln}({func})")
                for (fn, ln, func), (cc, nc, tt, ct, _) in st.stats.items()
                if "hessfree" in fn
            ]
            own = sum(tt for (fn, *_), (cc, nc, tt, ct, _) in st.stats.items() if "hessfree" in fn)
            print(
                f"cProfile: hessfree's own Python {own / st.total_tt:.0%} of the profiled time; "
                "top functions (own ms a step, calls a step):"
            )
            for tt, nc, where in sorted(rows, reverse=True)[:12]:
                print(f"  {tt / n * 1e3:.3f} ms  {nc / n:5.1f}  {where}")
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


def _timed_trajectory(hf, spec: Spec, style: str) -> tuple[list, list, list, nn.Module]:  # noqa: ANN001
    model = copy.deepcopy(spec.model)
    opt = hf.HessianFree(model.parameters())
    closure = _closure(spec, style, model, opt)
    cpu, wall, losses = [], [], []
    for _ in range(spec.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        opt.step(closure)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(opt.last_step.loss)
    return cpu, wall, losses, model


def ab(other: str, names: list[str], rounds: int, this: str | None = None) -> None:
    packs = {"other": _package(other), "this": _package(this)}
    for k, mods in packs.items():
        print(f"{k}: {mods['hessfree'].__file__}")
    med = statistics.median
    for name in names:
        _use(packs["this"])
        spec = BUILDERS[name]()
        grad = _gradient_time(spec)
        for style in spec.styles:
            l0 = load()
            cpu: dict[str, list] = {k: [] for k in packs}
            wall: dict[str, list] = {k: [] for k in packs}
            losses, models = {}, {}
            order = list(packs)
            for r in range(-1, rounds):  # round -1: warm-up
                for k in order if r % 2 == 0 else order[::-1]:
                    c, w, losses[k], models[k] = _timed_trajectory(_use(packs[k]), spec, style)
                    if r >= 0:
                        cpu[k].append(c)
                        wall[k].append(w)
            same = all(
                torch.equal(a, b)
                for a, b in zip(
                    models["this"].parameters(), models["other"].parameters(), strict=True
                )
            )
            f_end = min(x for x in losses["this"] if math.isfinite(x))
            hit = next(i for i, x in enumerate(losses["this"]) if x <= f_end + TARGET * abs(f_end))
            out = {}
            for k in packs:
                per_step = [med([c[i] for c in cpu[k]]) for i in range(spec.steps)]
                out[k] = dict(
                    step_cpu=med([sum(c) / len(c) for c in cpu[k]]),
                    step_wall=med([sum(w) / len(w) for w in wall[k]]),
                    step_med=med(per_step),
                    to_target_cpu=med([sum(c[: hit + 1]) for c in cpu[k]]),
                    to_target_wall=med([sum(w[: hit + 1]) for w in wall[k]]),
                )
            rc = [sum(a) / sum(b) for a, b in zip(cpu["this"], cpu["other"], strict=True)]
            rw = [sum(a) / sum(b) for a, b in zip(wall["this"], wall["other"], strict=True)]
            # the fastest trajectory of each: the least disturbed by the other sessions
            best = min(sum(c) for c in cpu["this"]) / min(sum(c) for c in cpu["other"])
            t, o = out["this"], out["other"]
            print(
                f"| {name} {style} | {t['step_cpu'] * 1e3:.3f} / {o['step_cpu'] * 1e3:.3f} | "
                f"{t['step_cpu'] / grad:.1f} / {o['step_cpu'] / grad:.1f} | "
                f"{med(rc):.3f} ({min(rc):.2f}-{max(rc):.2f}) | {best:.3f} | {med(rw):.3f} | "
                f"{t['to_target_cpu'] / o['to_target_cpu']:.3f} (step {hit + 1}) | "
                f"{t['to_target_wall'] / o['to_target_wall']:.3f} | {grad * 1e3:.3f} | {same} | "
                f"{l0[0]:.1f}-{load()[0]:.1f} |",
                flush=True,
            )


def micro(other: str, rounds: int) -> None:
    """The changed pieces alone, both packages interleaved: a ``cg()`` call on a 3 × 3 system
    (3 iterations, ``max_iter`` 250: mostly its fixed cost), ``ParamLayout.split`` of the
    2-16-1 MLP's 4 parameters."""
    packs = {"other": _package(other), "this": _package(None)}
    A = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    params = list(_mlp().model.parameters())
    v = torch.zeros(sum(p.numel() for p in params))
    cases = {
        "cg(), 3 iterations to rtol 1e-12, n = 3": (
            lambda mods: lambda: mods["hessfree.cg"].cg(lambda u: A @ u, b, rtol=1e-12),
            200,
        ),
        "ParamLayout.split, 4 parameters": (
            lambda mods: (lambda lay: lambda: lay.split(v))(
                mods["hessfree._flat"].ParamLayout(params)
            ),
            2000,
        ),
    }
    print(f"load {load()[0]:.2f}")
    for name, (make, number) in cases.items():
        times: dict[str, list[float]] = {k: [] for k in packs}
        fns = {k: make(mods) for k, mods in packs.items()}
        for r in range(rounds):
            for k in list(packs) if r % 2 == 0 else list(packs)[::-1]:
                _use(packs[k])
                c0 = time.process_time()
                for _ in range(number):
                    fns[k]()
                times[k].append((time.process_time() - c0) / number)
        med = statistics.median
        print(
            f"| {name} | {med(times['this']) * 1e6:.1f} | {med(times['other']) * 1e6:.1f} | "
            f"{med(times['this']) / med(times['other']):.3f} |"
        )
    print(f"load {load()[0]:.2f}")


def _host_scalar_cg(matvec: Callable, b: torch.Tensor, max_iter: int, rtol: float) -> int:
    """Plain CG with α, β, φ and the stop tests as Python floats (one host read of pᵀAp and
    one of rᵀr an iteration): a study-only sketch of how cheap CG's loop could be on CPU, not
    the library's algorithm (no preconditioner, no §4.4 progress test, no masking), and not
    bitwise with it (``add_(alpha=float)`` may fuse differently from ``addcmul_``)."""
    x = torch.zeros_like(b)
    r = -b
    p = b.clone()
    rr = float(torch.dot(r, r))
    tol_sq = (rtol * float(torch.linalg.vector_norm(b))) ** 2
    for i in range(1, max_iter + 1):
        Ap = matvec(p)
        pAp = float(torch.dot(p, Ap))
        if not (math.isfinite(pAp) and pAp > 0):
            return i
        alpha = rr / pAp
        x.add_(p, alpha=alpha)
        r.add_(Ap, alpha=alpha)
        rr_next = float(torch.dot(r, r))
        if rr_next <= tol_sq:
            return i
        p.mul_(rr_next / rr).sub_(r)
        rr = rr_next
    return max_iter


def proto(rounds: int) -> None:
    """Per-iteration CPU cost of the library's ``cg()`` against ``_host_scalar_cg`` (the next
    lever on CG's loop, measured for the lead; not adopted): a diagonal SPD system (spectrum
    1 ... 1e3) of n = 50, 65 and 1,185 unknowns (rosen, the MLP, swap), 20 and 40 iterations
    (rtol 0, ``progress_tol=None``); the difference of the two counts over 20 iterations, so
    each call's fixed cost cancels."""
    import hessfree

    cg_fn = sys.modules["hessfree.cg"].cg
    print(f"load {load()[0]:.2f}")
    print("| n | library cg µs an iteration | host-scalar sketch µs an iteration | ratio |")
    print("|---|---|---|---|")
    for n in (50, 65, 1185):
        d = torch.logspace(0, 3, n, dtype=torch.float64)
        b = torch.ones(n, dtype=torch.float64)

        def matvec(v: torch.Tensor, d: torch.Tensor = d) -> torch.Tensor:
            return d * v

        def lib(k: int, b: torch.Tensor = b, matvec: Callable = matvec) -> int:
            return cg_fn(matvec, b, max_iter=k, rtol=0.0, progress_tol=None).num_iter

        def sketch(k: int, b: torch.Tensor = b, matvec: Callable = matvec) -> int:
            return _host_scalar_cg(matvec, b, k, 0.0)

        # both must run every iteration asked for (no early stop), else the difference lies
        assert [lib(20), lib(40), sketch(20), sketch(40)] == [20, 40, 20, 40]

        per: dict[str, list[float]] = {"lib": [], "sketch": []}
        for _ in range(rounds):
            for name, fn in (("lib", lib), ("sketch", sketch)):
                cost = {}
                for k in (20, 40):
                    c0 = time.process_time()
                    for _ in range(100):
                        fn(k)
                    cost[k] = (time.process_time() - c0) / 100
                per[name].append((cost[40] - cost[20]) / 20)
        lib_us = statistics.median(per["lib"]) * 1e6
        sketch_us = statistics.median(per["sketch"]) * 1e6
        print(f"| {n} | {lib_us:.1f} | {sketch_us:.1f} | {sketch_us / lib_us:.2f} |")
    print(f"load {load()[0]:.2f}; hessfree from {hessfree.__file__}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--problems", default="exp3,misra1a,rosen,mlp,digits,swap")
    p.add_argument("--rounds", type=int, default=20)
    q = sub.add_parser("ab")
    q.add_argument("--other", required=True, help="a folder holding another hessfree package")
    q.add_argument("--problems", default="exp3,misra1a,rosen,mlp,digits,swap")
    q.add_argument("--rounds", type=int, default=15)
    q.add_argument("--this", default=None, help="another folder for 'this' (an A/A control)")
    pr = sub.add_parser("proto")
    pr.add_argument("--rounds", type=int, default=9)
    m = sub.add_parser("micro")
    m.add_argument("--other", required=True)
    m.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    names = args.problems.split(",") if hasattr(args, "problems") else []
    if args.cmd == "profile":
        profile(names, args.rounds)
    elif args.cmd == "proto":
        proto(args.rounds)
    elif args.cmd == "micro":
        micro(args.other, args.rounds)
    else:
        print(
            "| problem, closure | CPU ms a step, this / other | step / gradient, this / other "
            "| CPU ratio, median of rounds (range) | fastest / fastest | wall ratio "
            "| CPU to target ratio | wall to target ratio | gradient ms | bitwise equal | load |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|"
        )
        ab(args.other, names, args.rounds, args.this)


if __name__ == "__main__":
    main()
