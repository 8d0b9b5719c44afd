"""The defaults' CG budget on deterministic (whole-batch) K-FAC steps, MNIST-1D (#14).

``profile``: where a whole-batch step's time goes, the defaults (``'auto'`` K-FAC rank 32
refresh 2, CG cap 250) against the tuned row's settings (K-FAC rank 16 decay 0.6, cap 10), both
full batch from the same weights, one step each in turn (1 thread). Per step: the phases of
``StepInfo.time_phases``, and inside ``solve`` the curvature products, the objective-check
forwards of ``cg_stop_on_increase`` and the K-FAC solves (timed by wrapping the optimizer's
methods in this process only).

``rules``: times to run4's MNIST-1D targets for candidate rules for ``cg_max_iter='auto'`` on
K-FAC steps of a deterministic objective, interleaved as ``scorecard.interleave``, full batch
or the tuned schedule; ``digits``: time to 100 % training accuracy, full batch.

    OPENBLAS_NUM_THREADS=1 python experiments/_wholebatch.py profile [steps]
    OPENBLAS_NUM_THREADS=1 python experiments/_wholebatch.py rules \
        mnist1d|mnist1d-schedule|digits|curves [seconds] [reps] [--caps=250,5,10]
    python experiments/_wholebatch.py hashes [steps]  # parameter hashes, 6 tasks

(``curves``: training errors at ¼, ½ and all of the budget instead of times to targets.)
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ablate  # noqa: E402
import _kfacauto as ka  # noqa: E402
import scorecard as sc  # noqa: E402

import hessfree.optimizer as hfo  # noqa: E402

#: run4's MNIST-1D time targets (Adam lr 1e-2 b 100's losses at ¼, ½ and all of 30 s)
TARGETS = (8.249e-4, 1.144e-4, 7.794e-6)
N = 4000

_timers = {"monitor": 0.0, "precond": 0.0, "monitor_calls": 0}


def _instrument() -> None:
    """Time the objective-check forwards and K-FAC's solves (this process only)."""
    swapped = hfo.HessianFree._objective_swapped

    def objective_swapped(self, closure, run, x):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        try:
            return swapped(self, closure, run, x)
        finally:
            _timers["monitor"] += time.perf_counter() - t0
            _timers["monitor_calls"] += 1

    outputs_precond = hfo.HessianFree._outputs_preconditioner

    def timed_precond(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        m = outputs_precond(self, *args, **kw)
        if not callable(m):
            return m

        def apply(r):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            try:
                return m(r)
            finally:
                _timers["precond"] += time.perf_counter() - t0

        return apply

    hfo.HessianFree._objective_swapped = objective_swapped
    hfo.HessianFree._outputs_preconditioner = timed_precond


def profile(steps: int, schedule: bool = False) -> None:
    torch.set_num_threads(1)
    print(f"`profile {steps}`; load before {open('/proc/loadavg').read().strip()}")
    _instrument()
    task = sc._classifier("mnist1d", False)
    full = dict(batch=N, curvature_batch=N)
    regs = {
        "defaults (no arguments)": dict(full, kw={}),
        "tuned's whole-batch settings (K-FAC r16 d0.6, cg≤10)": dict(
            full, kw=dict(cg_max_iter=10), kfac=dict(rank=16, decay=0.6)
        ),
    }
    if schedule:  # the tuned row's batch schedule: the defaults in it, and the tuned row
        tuned = task.hf[next(k for k in task.hf if "held at" in k)]
        base = {k: v for k, v in tuned.items() if k not in ("kfac", "early_kw", "kw")}
        regs = {"defaults, tuned schedule": dict(base, kw={}), "tuned row": tuned}
    runs = [sc.hf_run(task, name, "HF", reg) for name, reg in regs.items()]
    opts = [_ablate._optimizer(r) for r in runs]
    rows: dict[str, list[dict]] = {r.name: [] for r in runs}
    rng = random.Random(0)
    for _ in range(steps):
        order = list(zip(runs, opts, strict=True))
        rng.shuffle(order)  # one step each, in a shuffled order per round
        for r, opt in order:
            _timers.update(monitor=0.0, precond=0.0, monitor_calls=0)
            t0 = time.perf_counter()
            r.step()
            wall = time.perf_counter() - t0
            info = opt.last_step
            ph = info.time_phases
            rows[r.name].append(
                dict(
                    wall=wall,
                    loss=info.loss,
                    status=info.status.value,
                    cg=info.cg_iters,
                    reason=info.cg_reason,
                    calls=info.closure_calls,
                    bt=info.backtrack_iter,
                    rate=info.step_rate,
                    lam=info.damping,
                    evaluate=ph.get("evaluate", 0.0),
                    curvature=ph.get("curvature", 0.0),
                    solve=ph.get("solve", 0.0),
                    products=info.time_products,
                    monitor=_timers["monitor"],
                    mcalls=_timers["monitor_calls"],
                    precond=_timers["precond"],
                    backtrack=ph.get("backtrack", 0.0),
                    line_search=ph.get("line_search", 0.0),
                )
            )
    print(f"load after {open('/proc/loadavg').read().strip()}")
    keys = ["evaluate", "curvature", "products", "monitor", "precond", "backtrack", "line_search"]
    for name, rs in rows.items():
        print(f"\n#### {name}\n")
        print(
            "| step | loss | status | CG | stop | calls | checks | bt | rate | λ | wall | "
            + " | ".join(keys)
            + " | CG rest |"
        )
        print("|---" * (12 + len(keys)) + "|")
        for i, x in enumerate(rs):
            rest = x["solve"] - x["products"] - x["monitor"] - x["precond"]
            print(
                f"| {i} | {x['loss']:.3e} | {x['status']} | {x['cg']} | {x['reason']} | "
                f"{x['calls']} | {x['mcalls']} | {x['bt']} | {x['rate']} | {x['lam']:.2g} | "
                f"{x['wall']:.3f} | " + " | ".join(f"{x[k]:.3f}" for k in keys) + f" | {rest:.3f} |"
            )
        moving = [x for x in rs if x["status"] == "accepted"]
        tot = sum(x["wall"] for x in moving)
        share = {k: sum(x[k] for x in moving) / tot for k in keys}
        share["CG rest"] = (
            sum(x["solve"] - x["products"] - x["monitor"] - x["precond"] for x in moving) / tot
        )
        print(
            f"\naccepted steps {len(moving)}, median wall "
            f"{statistics.median(x['wall'] for x in moving):.3f} s,"
            f" median CG {statistics.median(x['cg'] for x in moving)}, median calls "
            f"{statistics.median(x['calls'] for x in moving)}; share of their time: "
            + ", ".join(f"{k} {v:.0%}" for k, v in share.items())
        )


def _with_cap(run: sc.Run, cap: int) -> sc.Run:
    """``run`` stepping with ``_KFAC_DETERMINISTIC_CG_MAX_ITER`` = ``cap`` (set per step)."""
    step = run.step

    def capped() -> None:
        saved = hfo._KFAC_DETERMINISTIC_CG_MAX_ITER
        hfo._KFAC_DETERMINISTIC_CG_MAX_ITER = cap
        try:
            step()
        finally:
            hfo._KFAC_DETERMINISTIC_CG_MAX_ITER = saved

    run.step = capped
    return run


def _count_deterministic(run: sc.Run, seen: dict[str, int]) -> sc.Run:
    """``run`` counting its steps that start seen deterministic (where the rule applies)."""
    step, opt = run.step, _ablate._optimizer(run)

    def counted() -> None:
        step()
        seen[run.name] = seen.get(run.name, 0) + (opt._global_state().get("deterministic") is True)

    run.step = counted
    return run


CAPS = {"defaults (cap 250)": 250, "cap 10": 10, "cap 20": 20}
DIGITS_TARGETS = (9.095e-5, 1.099e-5, 1.678e-7)


def rules(key: str, seconds: float | None, reps: int, caps: dict[str, int]) -> None:
    torch.set_num_threads(1)
    print(f"`rules {key}`; load before {open('/proc/loadavg').read().strip()}")
    if key == "curves":
        task = sc.make_curves_task(False)
    else:
        task = sc._classifier("digits" if key == "digits" else "mnist1d", False)
    n = len(task.x)
    full = dict(batch=n, curvature_batch=n, kw={})
    targets = DIGITS_TARGETS if key == "digits" else TARGETS
    budget = seconds or (15.0 if key == "digits" else 30.0)
    tuned_name = next((k for k in task.hf if "held at" in k), None)
    base = full
    seen: dict[str, int] = {}
    if key == "curves":  # the defaults' scorecard regime is the tuned row's norm-test schedule
        tuned_name = next(k for k in task.hf if "then cg≤10" in k)
        tuned = task.hf[tuned_name]
        base = {k: v for k, v in tuned.items() if k not in ("kfac", "early_kw", "kw")} | {"kw": {}}
        targets = ()
    if key == "mnist1d-schedule":
        tuned = task.hf[tuned_name]
        base = {k: v for k, v in tuned.items() if k not in ("kfac", "early_kw", "kw")} | {"kw": {}}
    results: dict[str, list[list[float]]] = {}
    for rep in range(reps):
        runs = [
            _with_cap(_count_deterministic(sc.hf_run(task, f"D {name}", "HF", base), seen), c)
            for name, c in caps.items()
        ]
        if tuned_name:
            runs.append(sc.hf_run(task, "tuned row", "HF", task.hf[tuned_name]))
        if key == "digits":
            runs.append(sc.lbfgs_run(task, "L-BFGS", task.lbfgs["L-BFGS"]))
        sc.interleave(
            runs,
            task,
            budget,
            task.slices,
            "cpu",
            early=sc.FINAL_EARLY_POINTS,
            accuracy_steps=budget / 2,
        )
        print(f"\nrep {rep}: load {open('/proc/loadavg').read().strip()}")
        print(
            "| run | steps | statuses | "
            + " | ".join(f"s to ≤ {t:.3g}" for t in targets)
            + " | s to 100 % acc. |"
        )
        print("|---" * (4 + len(targets)) + "|")
        for r in runs:
            ts = [sc.time_to(r.curve, t) for t in targets]
            ts.append(sc.time_to(r.acc_curve, 1.0, above=True))
            results.setdefault(r.name, []).append(ts)
            st = ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items()))
            st += f"; seen deterministic after {seen.pop(r.name, 0)}"
            if key == "curves":
                ts = [sc.value_at(r.curve, budget * f) for f in (0.25, 0.5, 1.0)]
                results[r.name][-1] = ts
            print(f"| {r.name} | {r.steps} | {st} | " + " | ".join(f"{t:.3g}" for t in ts) + " |")
    print(f"\nload after {open('/proc/loadavg').read().strip()}")
    print("\nmedians over reps (ratio to the defaults' median; to the tuned row's):\n")
    med = {
        k: [statistics.median(r[i] for r in v) for i in range(len(v[0]))]
        for k, v in results.items()
    }
    d0 = med[f"D {next(iter(caps))}"]
    tu = med.get("tuned row")
    for k, m in med.items():
        cells = []
        for i, t in enumerate(m):
            c = f"{t:.3g} ({t / d0[i]:.2f}"
            c += f"; {t / tu[i]:.2f}×T)" if tu else ")"
            cells.append(c)
        print(f"| {k} | " + " | ".join(cells) + " |")


def hashes(steps: int = 30) -> None:
    """Parameter hashes of ``HessianFree(params)`` after ``steps`` steps per task (run with
    PYTHONPATH at main and at this branch: equal hashes = bitwise unchanged)."""
    torch.set_num_threads(1)
    curves = sc.make_curves_task(False)
    mnist = sc._classifier("mnist1d", False)
    tuned = mnist.hf[next(k for k in mnist.hf if "held at" in k)]
    schedule = {k: v for k, v in tuned.items() if k not in ("kfac", "early_kw", "kw")}
    for task, reg, what in (
        (sc.make_swap_task(False), None, "exact-Hessian closure"),
        (sc.make_addition_task(30, 60.0), None, "RNN, no K-FAC"),
        (curves, dict(batch=250, curvature_batch=62), "250/62 mini-batches"),
        (mnist, schedule, "tuned schedule, stochastic steps only"),
        (mnist, None, "full batch"),
        (sc._classifier("digits", False), None, "full batch"),
    ):
        reg = dict(reg or task.hf_default_regime or next(iter(task.hf.values())), kw={})
        run = sc.hf_run(task, "defaults", "HF", reg)
        for _ in range(steps):
            run.step()
        print(f"{task.key} ({what}), {steps} steps: {ka.param_hash(run.model)}")


if __name__ == "__main__":
    mode = sys.argv[1]
    args = [a for a in sys.argv[2:] if not a.startswith("--")]
    if mode == "profile":
        profile(int(args[0]) if args else 25, schedule="--schedule" in sys.argv)
    elif mode == "rules":
        caps = CAPS
        if "--caps" in " ".join(sys.argv):
            picked = next(a for a in sys.argv if a.startswith("--caps=")).split("=")[1]
            caps = {
                f"cap {c}" if c != "250" else "defaults (cap 250)": int(c)
                for c in picked.split(",")
            }
        rules(
            args[0],
            float(args[1]) if len(args) > 1 else None,
            int(args[2]) if len(args) > 2 else 2,
            caps,
        )
    elif mode == "hashes":
        hashes(int(args[0]) if args else 30)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
