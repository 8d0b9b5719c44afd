"""CG returning the warm start with 0 iterations (topic "cgwarm").

From a nonzero warm start x0 = 0.95·p_prev (Martens 2010, §4.5) CG's residual test can hold
before any iteration: the library's ``cg`` then returns x0 itself, and the step repeats the
previous direction, scaled. Candidate ``w1``: ``min_iter`` (``cg_min_iter``, default 1) gates
the residual test from a nonzero start as well, so a warm-started solve does at least one
iteration (``cg_w1`` below: the library's ``cg`` source with that rule patched in at import, two
lines; the patch fails loudly if ``hessfree/cg.py`` no longer has the lines it edits). It was
measured and not adopted (experiments/README.md, "cgwarm"). Contenders whose mode is ``"main"``
call the library's ``cg`` unchanged, ``"w1"`` ones ``cg_w1``; both live in this process.

Parts:

* ``count``: how often a solve returns with 0 iterations, and what the step does then (ρ,
  accepted, λ before → after, the warm start's relative residual ‖Ax0 − b‖/‖b‖ against η,
  φ(x0)), on ``_stiff.py``'s six fits (both closures, seeds 0 and 1, a fixed number of steps,
  main mode) and (``freeze``) on ``_freeze_hashes.py``'s scorecard trajectories (main mode, or
  ``--mode w1``; prints the parameter hashes).
* ``race``: ``_stiff.race`` with contenders ``HF`` / ``HF lo`` (main), ``HF[w1]`` /
  ``HF lo[w1]`` and torch ``LBFGS sw``, interleaved by each run's own CPU time, same start;
  then time to target and final error of each w1 run over its main run.
* ``gate``: a scorecard task (``--tasks mnist1d``) at its freeze regime, main against w1
  interleaved by CPU time, from the scorecard's weights (seed 0) and re-initialised ones.
* ``smallres``: ``tests/test_local_phase.py``'s small-residual fit over start seeds: steps
  to f − f* ≤ 1e-8 f* (the test asks it of seed 1 within 45 steps).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_cgwarm.py --part count
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_cgwarm.py --part race [problem ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _freeze_hashes as fh  # noqa: E402
import _stiff as st  # noqa: E402
import scorecard  # noqa: E402

import hessfree  # noqa: E402
import hessfree.optimizer as hfo  # noqa: E402

torch.set_num_threads(1)

_library_cg = hfo.cg
MODE = {"now": "main"}  # the mode of the step being taken: "main", "w1" or "fit"
CANDIDATE = {"name": "w1"}  # race, gate, smallres: the candidate raced against main
WARM: list[dict[str, float]] = []  # per warm-started solve in the current step (count part)

# w1: the residual test waits for min_iter from a nonzero start, at iteration 0 and in the loop
_W1_EDITS = [
    (
        "    if not finite0 or converged0:\n",
        "    converged0 = converged0 and not (opts.x0_nonzero and min_iter > 0)\n"
        "    if not finite0 or converged0:\n",
    ),
    (
        "        converged = rr <= tol_sq  # ||r|| <= tol without the norm's extra pass\n",
        "        converged = rr <= tol_sq  # ||r|| <= tol without the norm's extra pass\n"
        "        if opts.x0_nonzero and i < min_iter:  # host-side: no sync\n"
        "            converged = no\n",
    ),
]


def _w1_cg() -> Any:
    import importlib
    import inspect

    module = importlib.import_module("hessfree.cg")
    source = inspect.getsource(module)
    for old, new in _W1_EDITS:
        if source.count(old) != 1:
            raise RuntimeError(f"hessfree/cg.py changed: {old.strip()!r} is not there once")
        source = source.replace(old, new)
    import types

    copy = types.ModuleType("_cgwarm_w1_cg")
    sys.modules[copy.__name__] = copy  # dataclasses look their module up
    exec(compile(source, "<hessfree/cg.py, w1>", "exec"), copy.__dict__)  # noqa: S102
    # the optimizer compares reasons by identity: the copy returns the library's own types
    copy.CGStop = copy.StopReason = module.CGStop
    copy.CGResult = module.CGResult
    return copy.cg


cg_w1 = _w1_cg()


def _dispatch_cg(matvec, b, x0=None, **kw):  # noqa: ANN001, ANN003, ANN202
    """The library's ``cg``; in main mode with ``min_iter=0``. Records the warm start's
    relative residual and φ from CG's own first product (no extra product)."""
    solve = cg_w1 if MODE["now"] == "w1" else _library_cg
    first: dict[str, Any] = {}

    def watched(v):  # noqa: ANN001, ANN202
        out = matvec(v)
        if not first:
            first["Ax0"] = out.detach().clone()
        return out

    warm = x0 is not None and bool(torch.any(x0 != 0))
    result = solve(watched if warm else matvec, b, x0, **kw)
    if MODE["now"] == "fit" and warm and result.num_iter == 0:
        result = _fitted(result, x0, first["Ax0"], b)
    if warm:
        r0 = first["Ax0"] - b
        WARM.append(
            dict(
                res=float(torch.linalg.vector_norm(r0) / torch.linalg.vector_norm(b)),
                phi0=float(0.5 * torch.dot(x0, r0 - b)),
                xAx=float(torch.dot(x0, first["Ax0"])),  # λ's share needs λ: _zero_rows
                xx=float(torch.dot(x0, x0)),
                cos=float(
                    torch.dot(x0, b) / (torch.linalg.vector_norm(x0) * torch.linalg.vector_norm(b))
                ),
                iters=result.num_iter,
            )
        )
    return result


def _fitted(result: Any, x0: torch.Tensor, Ax0: torch.Tensor, b: torch.Tensor) -> Any:
    """Candidate ``fit``: a warm start returned with 0 iterations (``CONVERGED``) is rescaled to
    the minimiser of φ along it, s = bᵀx0 / x0ᵀAx0, from the product CG already made (no extra
    product): x0's direction is kept, its length (the previous λ's) is refitted."""
    if result.reason is not hfo.CGStop.CONVERGED:
        return result
    xAx, bx = torch.dot(x0, Ax0), torch.dot(b, x0)
    if not (float(xAx) > 0 and float(bx) > 0):
        return result
    scale = bx / xAx
    x = x0 * scale
    phi = (0.5 * scale * scale * xAx - scale * bx).reshape(1)
    return dataclasses.replace(result, x=x, iterates=[x], iterate_phi=phi.clone(), phi_history=phi)


hfo.cg = _dispatch_cg


class Mode(st.Traced):
    """``HessianFree`` whose steps run CG in ``mode``."""

    mode = "main"

    def step(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        MODE["now"] = self.mode
        try:
            return super().step(*args, **kwargs)
        finally:
            MODE["now"] = "main"


class Warm1(Mode):
    mode = "w1"


class Fitted(Mode):
    mode = "fit"


st.VARIANTS[""] = Mode
st.VARIANTS["w1"] = Warm1
st.VARIANTS["fit"] = Fitted


# ------------------------------------------------------------------------------------------
# count
# ------------------------------------------------------------------------------------------
def _zero_rows(infos: list, warms: list, label: str) -> tuple[int, int, list[str]]:
    """Steps whose CG did 0 iterations from a warm start: count, steps, table rows."""
    rows, n = [], 0
    for k, (s, w) in enumerate(zip(infos, warms, strict=True)):
        if w is not None and w["iters"] == 0 and s.cg_reason == "converged":
            n += 1
            rows.append(
                f"| {label} | {k} | {s.rho:.3f} | {s.status} | {s.damping:.2e} → "
                f"{s.next_damping:.2e} | {w['res']:.3f} / {s.cg_rtol:.3f} | {w['phi0']:.3e} | "
                f"{s.damping * w['xx'] / w['xAx']:.3g} | {w['cos']:.4f} |"
            )
    return n, len(infos), rows


def _stepped(opt: hessfree.HessianFree, do_step) -> tuple[Any, dict | None]:  # noqa: ANN001
    WARM.clear()
    do_step()
    return opt.last_step, (WARM[0] if WARM else None)


def count_stiff(steps: int) -> None:
    print(f"\n#### 0-iteration solves, `_stiff.py`'s fits, main mode, {steps} steps\n")
    table, totals = [], []
    for key, make in st.PROBLEMS.items():
        for seed in (0, 1):
            prob = make(seed)
            for name in ("HF", "HF lo"):
                run = st.make_run(name, prob, seed)
                infos, warms = [], []
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for _ in range(steps):
                        s, w = _stepped(run.opt, run.step)
                        if s is None or (infos and s is infos[-1]):
                            break
                        infos.append(s)
                        warms.append(w)
                        if str(s.status) == "converged":
                            break
                n, total, rows = _zero_rows(infos, warms, f"{key} {seed} {name}")
                totals.append(f"{key} {seed} {name}: {n}/{total}")
                table += rows
    print("; ".join(totals))
    print(
        "\n| run | step | ρ | status | λ → next λ | ‖r0‖/‖b‖ / η | φ(x0) | λ‖x0‖²/x0ᵀBx0 "
        "| cos(x0, −g) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))


def count_freeze(tasks: list[str], mode: str) -> None:
    print(f"\n#### 0-iteration solves, scorecard freeze trajectories ({mode} mode)\n")
    MODE["now"] = mode
    original = hessfree.HessianFree.step
    log: list[tuple[Any, dict | None]] = []

    def logged(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        WARM.clear()
        out = original(self, *args, **kwargs)
        log.append((self.last_step, WARM[0] if WARM else None))
        return out

    hessfree.HessianFree.step = logged
    table = []
    try:
        for key in tasks:
            task = fh.make(key)
            base = task.hf["defaults"] if key == "swap" else task.hf_default_regime
            base = fh.REGIMES.get(key) or base or next(iter(task.hf.values()))
            base = {k: v for k, v in base.items() if k not in ("kfac", "early_kw")} | {"kw": {}}
            run = scorecard.hf_run(task, "defaults", "HF", base)
            log.clear()
            for _ in range(fh.STEPS[key]):
                run.step()
            h = hashlib.sha256()
            for p in run.model.parameters():
                h.update(p.detach().cpu().numpy().tobytes())
            infos = [s for s, _ in log]
            n, total, rows = _zero_rows(infos, [w for _, w in log], key)
            warm = sum(w is not None for _, w in log)
            print(f"{key}: {n} of {total} steps ({warm} warm-started); sha256 {h.hexdigest()[:8]}")
            table += rows
    finally:
        hessfree.HessianFree.step = original
        MODE["now"] = "main"
    print(
        "\n| run | step | ρ | status | λ → next λ | ‖r0‖/‖b‖ / η | φ(x0) | λ‖x0‖²/x0ᵀBx0 "
        "| cos(x0, −g) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))


# ------------------------------------------------------------------------------------------
# race
# ------------------------------------------------------------------------------------------
def race(keys: list[str], seeds: list[int], scale: float) -> None:
    v = CANDIDATE["name"]
    names = ["HF", f"HF[{v}]", "HF lo", f"HF lo[{v}]", "LBFGS sw"]
    rows: list = []
    captured: dict = {}
    interleave = st.u6.interleave

    def capture(runs, budget, eval_every):  # noqa: ANN001, ANN202
        captured["runs"] = runs
        return interleave(runs, budget, eval_every)

    st.u6.interleave = capture
    ratios = []
    try:
        for key in keys:
            for seed in seeds:
                st.race(key, seed, st.BUDGET[key] * scale, names, rows)
                runs = {r.name: r for r in captured["runs"]}
                zero = {
                    n: sum(1 for s in r.infos if s.cg_iters == 0 and s.cg_reason == "converged")
                    for n, r in runs.items()
                    if r.infos
                }
                print(f"\n0-iteration converged solves: {zero}; CPU s: "
                      + ", ".join(f"{n} {r.clock:.2f}" for n, r in runs.items()))  # fmt: skip
                ratios.append((key, seed, {r[2]: r for r in rows if r[0] == key and r[1] == seed}))
    finally:
        st.u6.interleave = interleave
    print(f"\n#### {v} / main: time to target (CPU s), final f − f*; LBFGS sw / main\n")
    print(
        f"| problem, seed | HF: {v} / main | HF lo: {v} / main | LBFGS sw / HF | LBFGS sw / HF lo |"
    )
    print("|---|---|---|---|---|")

    def ratio(a: tuple, b: tuple) -> str:
        ta, tb = a[3], b[3]
        tq = f"{ta / tb:.3g}" if math.isfinite(ta) and math.isfinite(tb) and tb > 0 else (
            f"{ta:.3g} / {tb:.3g}")  # fmt: skip
        return f"{tq} ({a[4] / b[4]:.2g})"

    for key, seed, mine in ratios:
        cells = [
            ratio(mine[f"HF[{v}]"], mine["HF"]),
            ratio(mine[f"HF lo[{v}]"], mine["HF lo"]),
            ratio(mine["LBFGS sw"], mine["HF"]),
            ratio(mine["LBFGS sw"], mine["HF lo"]),
        ]
        print(f"| {key} {seed} | " + " | ".join(cells) + " |")


# ------------------------------------------------------------------------------------------
# gate: a scorecard task whose freeze hash changed, main against w1 at equal CPU time
# ------------------------------------------------------------------------------------------
BUILT: list[hessfree.HessianFree] = []


class _Registered:
    def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        super().__init__(*args, **kwargs)
        BUILT.append(self)


class GateMain(_Registered, Mode):
    pass


class GateWarm1(_Registered, Warm1):
    pass


class GateFit(_Registered, Fitted):
    pass


def _reinit(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seed 0: the scorecard's weights; else every layer's ``reset_parameters`` under ``seed``."""
    import copy

    model = copy.deepcopy(model)
    if seed:
        torch.manual_seed(seed)
        for mod in model.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    return model


def gate(key: str, seeds: list[int], budget: float) -> None:
    import dataclasses

    task = fh.make(key)
    base = task.hf["defaults"] if key == "swap" else task.hf_default_regime
    base = fh.REGIMES.get(key) or base or next(iter(task.hf.values()))
    base = {k: v for k, v in base.items() if k not in ("kfac", "early_kw")} | {"kw": {}}
    builder = scorecard.HessianFree
    v = CANDIDATE["name"]
    print(f"\n#### gate {key}: main against {v}, {budget:g} CPU s each, interleaved\n")
    print("| seed | run | steps | error at ¼ / ½ / 1 | work (calls + products) | "
          "0-iteration solves | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    summary = []
    for seed in seeds:
        t = dataclasses.replace(task, model=_reinit(task.model, seed))
        runs, opts = {}, {}
        for name, cls in (("main", GateMain), (v, GateWarm1 if v == "w1" else GateFit)):
            scorecard.HessianFree = cls
            BUILT.clear()
            runs[name] = scorecard.hf_run(t, name, "HF", base)
            opts[name] = BUILT[0]
        scorecard.HessianFree = builder
        clock = dict.fromkeys(runs, 0.0)
        curve = {n: [(0.0, t.error(r.model))] for n, r in runs.items()}
        work = dict.fromkeys(runs, 0)
        zero = dict.fromkeys(runs, 0)
        load0 = os.getloadavg()[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while min(clock.values()) < budget:
                n = min(clock, key=clock.get)
                c0 = time.process_time()
                runs[n].step()
                clock[n] += time.process_time() - c0
                s = opts[n].last_step
                work[n] += s.closure_calls + s.cg_matvecs
                zero[n] += s.cg_iters == 0 and s.cg_reason == "converged"
                curve[n].append((clock[n], t.error(runs[n].model)))
        load1 = os.getloadavg()[0]
        at = {n: [st.u6.best_at(c, f * budget) for f in (0.25, 0.5, 1.0)] for n, c in curve.items()}
        for n, r in runs.items():
            errs = " / ".join(f"{e:.3e}" for e in at[n])
            print(f"| {seed} | {n} | {r.steps or len(curve[n]) - 1} | {errs} | {work[n]} | "
                  f"{zero[n]} | {load0:.2f} → {load1:.2f} |")  # fmt: skip
        # time to main's error at ½ and at the end of the budget: w1 / main
        ratios = []
        for target in (at["main"][1], at["main"][2]):
            tm, tw = st.u6.time_to(curve["main"], target), st.u6.time_to(curve[v], target)
            ratios.append(tw / tm if tm > 0 else math.nan)
        final = at[v][2] / at["main"][2]
        summary.append(
            f"seed {seed}: time to main's ½-budget error {ratios[0]:.3g}, to its "
            f"final error {ratios[1]:.3g}; final error {v} / main {final:.3g}"
        )
    print("\n" + "\n".join(summary))


# ------------------------------------------------------------------------------------------
# smallres: tests/test_local_phase.py's small-residual fit over start seeds
# ------------------------------------------------------------------------------------------
def _small_residual(seed: int) -> tuple:
    """``tests/test_local_phase.py``'s ``_small_residual`` with the start's noise seeded by
    ``seed`` (the test's start is seed 1): a 4-6-2 tanh MLP fitted to a teacher of its shape
    plus 1e-3 noise, float64, 300 points."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 4, generator=gen, dtype=dtype)

    def make() -> torch.nn.Module:
        torch.manual_seed(123)
        return torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
        ).to(dtype)

    with torch.no_grad():
        y = make()(x) + 1e-3 * torch.randn(300, 2, generator=gen, dtype=dtype)
        model = make()
        for p in model.parameters():
            noise = torch.Generator().manual_seed(seed)
            p.add_(0.3 * torch.randn(p.shape, generator=noise, dtype=dtype))
    return model, x, y


def smallres(seeds: list[int], steps: int) -> None:
    """Steps (and CPU s) to f − f* ≤ 1e-8 f* of main and w1 on ``test_local_phase``'s 4-6-2
    tanh fit (``(loss, outputs)`` closure), the start's noise seeded by ``seed`` (the test's
    start is seed 1); the two runs are stepped alternately."""
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_local_phase as tlp

    print(f"\n#### smallres: steps (CPU s) to f − f* ≤ 1e-8 f*, at most {steps} steps\n")
    v = CANDIDATE["name"]
    print(f"| start seed | main | {v} | main's 0-iteration solves | final (f − f*)/f* main / {v} |")
    print("|---|---|---|---|---|")
    ratios = []
    for seed in seeds:
        model, x, y = _small_residual(seed)
        runs = {}
        for name, cls in (("main", Mode), (v, Warm1 if v == "w1" else Fitted)):
            import copy

            m = copy.deepcopy(model)
            runs[name] = (m, cls(m.parameters()))
        first = copy.deepcopy(model)
        hit = dict.fromkeys(runs, (math.inf, math.inf))
        clock = dict.fromkeys(runs, 0.0)
        zero = 0
        for k in range(1, steps + 1):
            for name, (m, opt) in runs.items():
                if math.isfinite(hit[name][0]):
                    continue

                def closure(m=m, x=x, y=y):  # noqa: ANN001, ANN202
                    out = m(x)
                    return F.mse_loss(out, y), out

                c0 = time.process_time()
                opt.step(closure)
                clock[name] += time.process_time() - c0
                s = opt.last_step
                zero += name == "main" and s.cg_iters == 0 and s.cg_reason == "converged"
                runs[name] = (m, opt)
                with torch.no_grad():
                    f = float(F.mse_loss(m(x), y))
                if k == 1:
                    fstar = tlp._least_squares_optimum(first, x, y)
                if f - fstar <= 1e-8 * fstar:
                    hit[name] = (k, clock[name])
        cell = {n: f"{h[0]} ({h[1]:.2f})" for n, h in hit.items()}
        if math.isfinite(hit["main"][0]) and math.isfinite(hit[v][0]):
            ratios.append(hit[v][0] / hit["main"][0])
        with torch.no_grad():
            gaps = [(float(F.mse_loss(m(x), y)) - fstar) / fstar for m, _ in runs.values()]
        gap = " / ".join(f"{g:.2g}" for g in gaps)
        print(f"| {seed} | {cell['main']} | {cell[v]} | {zero} | {gap} |")
    finite = [r for r in ratios if math.isfinite(r)]
    if finite:
        print(f"\n{v} / main steps where both reached it: {', '.join(f'{r:.3g}' for r in finite)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(st.PROBLEMS))
    ap.add_argument(
        "--part", default="race", choices=["race", "count", "freeze", "gate", "smallres"]
    )
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--scale", type=float, default=1.0, help="× _stiff.BUDGET")
    ap.add_argument("--steps", type=int, default=40, help="count: steps per stiff run")
    ap.add_argument("--tasks", default=",".join(fh.STEPS))
    ap.add_argument("--mode", default="main", choices=["main", "w1", "fit"], help="freeze: mode")
    ap.add_argument("--candidate", default="w1", choices=["w1", "fit"])
    ap.add_argument("--budget", type=float, default=20.0, help="gate: CPU s per run")
    args = ap.parse_args()
    CANDIDATE["name"] = args.candidate
    load0, c0, w0 = os.getloadavg(), time.process_time(), time.perf_counter()
    if args.part == "count":
        count_stiff(args.steps)
    elif args.part == "freeze":
        count_freeze(args.tasks.split(","), args.mode)
    elif args.part == "smallres":
        smallres([int(s) for s in args.seeds.split(",")], args.steps)
    elif args.part == "gate":
        for key in args.tasks.split(","):
            gate(key, [int(s) for s in args.seeds.split(",")], args.budget)
    else:
        race(args.problems, [int(s) for s in args.seeds.split(",")], args.scale)
    load1 = os.getloadavg()
    print(f"\nload {load0[0]:.2f} → {load1[0]:.2f}; {time.process_time() - c0:.0f} CPU s, "
          f"{time.perf_counter() - w0:.0f} s wall")  # fmt: skip


if __name__ == "__main__":
    main()
