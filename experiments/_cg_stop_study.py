"""CG stop rules for ``cg_rtol='auto'`` on stochastic objectives: RNN addition against the MLP
mini-batch regimes (#14). None of the rules here is the default; ``experiments/README.md``
("What did not help") records every measurement.

The default (Eisenstat–Walker η, objective check on) stops CG after 0-2 iterations on the
addition problem and HF stays on the plateau; η = 0 without the check solves it but costs
MNIST-1D's growing batches 10× and CURVES 6-12 %. Each variant below is a subclass of
:class:`hessfree.HessianFree` that changes only ``_cg_rtol`` / ``_stop_on_increase`` (and, for
two, the CG call), switched on by a general signal, never by the model's type:

- ``tight``: η scaled by m, m ← m/4 after a residual stop within one iteration of the warm start;
- ``floor10``: on stochastic objectives the residual test applies from CG iteration 10 on;
- ``transfer``: η = 0, no check while an EMA of the batch-to-batch gap
  (f_k(θ_k) − f_{k−1}(θ_k)) is below ``tau`` × the EMA of the steps' own-batch decrease;
- ``latch``: η = 0, no check for good once ≥ 8 of the last 10 stochastic solves ended on the
  residual test within 2 iterations; ``latch50cold``: in latched mode at most 50 CG iterations,
  and a latched solve that reaches 50 drops the latch for good (and the warm start);
  ``latch50cold_k1``: the same with "within 1 iteration in ≥ 4 of the last 10".

Usage (torch 1 thread; contenders interleaved from the same weights as in ``scorecard.py``)::

    python experiments/_cg_stop_study.py addition30 40 default,latch
    REGIME='250×1.1/step, curvature ¼' python experiments/_cg_stop_study.py mnist1d 8 default,latch
    REGIME='250/62, cg≤10' python experiments/_cg_stop_study.py curves 15 default,latch

``KW='{"structural_damping": 0.03}'`` passes keyword arguments to every contender.
Printed per contender: the final error, the error after each slice, CG iterations, η, closure
calls per step, CG stop reasons, and when a latch engaged or dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402

import hessfree.optimizer as hf_optimizer  # noqa: E402
from hessfree import HessianFree  # noqa: E402
from hessfree.cg import CGResult, CGStop  # noqa: E402


class Recorded(HessianFree):
    """The defaults; keeps every step's ``StepInfo``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log, self.latched_at, self.dropped_at = [], None, None

    def step(self, *args, **kwargs):
        out = super().step(*args, **kwargs)
        self.log.append(self.last_step)
        return out

    def _set_eta(self, run, eta: float) -> float:
        run.report["cg_rtol"] = eta
        return eta


def tight(mult: float = 0.25, k: int = 1) -> type:
    class Tight(Recorded):
        def _cg_rtol(self, run):
            m = run.state.get("forcing_scale", 1.0)
            if self.log and self.log[-1].cg_reason == "converged" and self.log[-1].cg_iters <= k:
                m *= mult
            run.state["forcing_scale"] = m
            return self._set_eta(run, super()._cg_rtol(run) * m)

    return Tight


_cg = hf_optimizer.cg
_floor = [0]


def _floored_cg(matvec, b, x0=None, *, max_iter, rtol, min_iter=0, **kwargs) -> CGResult:
    """CG whose residual test applies from iteration ``_floor[0]`` on: a run with ``rtol=0`` to
    the floor, then one with ``rtol`` from its iterate (iterates and φ joined)."""
    f = _floor[0]
    if not f or rtol == 0 or max_iter <= f:
        return _cg(matvec, b, x0, max_iter=max_iter, rtol=rtol, min_iter=min_iter, **kwargs)
    r1 = _cg(matvec, b, x0, max_iter=f, rtol=0.0, min_iter=min_iter, **kwargs)
    if r1.reason is not CGStop.MAX_ITER:
        return r1
    r2 = _cg(matvec, b, r1.x, max_iter=max_iter - f, rtol=rtol, **kwargs)
    matvecs = r1.num_matvec + r2.num_matvec
    if r2.num_iter == 0:
        return dataclasses.replace(r1, reason=r2.reason, num_matvec=matvecs)
    later = [(f + i, x) for i, x in zip(r2.iterations, r2.iterates, strict=True) if i > 0]
    its = list(r1.iterations) + [i for i, _ in later]
    phi = torch.cat([r1.phi_history, r2.phi_history[1:]])
    return CGResult(
        x=r2.x,
        iterates=list(r1.iterates) + [x for _, x in later],
        iterations=its,
        iterate_phi=phi[its],
        phi_history=phi,
        num_iter=f + r2.num_iter,
        num_matvec=matvecs,
        reason=r2.reason,
    )


def floor(f: int = 10, check: bool = False) -> type:
    class Floor(Recorded):
        def _solve(self, *args, **kwargs):
            run = args[4]
            _floor[0] = f if run.state.get("deterministic") is False else 0
            hf_optimizer.cg = _floored_cg
            try:
                return super()._solve(*args, **kwargs)
            finally:
                _floor[0], hf_optimizer.cg = 0, _cg

        def _stop_on_increase(self, run):
            on = super()._stop_on_increase(run)
            return on and (check or run.state.get("deterministic") is not False)

    return Floor


class Switched(Recorded):
    """η = 0 and no objective check while ``self._on(run)``."""

    def _on(self, run) -> bool:
        raise NotImplementedError

    def _cg_rtol(self, run):
        eta = super()._cg_rtol(run)
        run.switched = self._on(run)
        return self._set_eta(run, 0.0 if run.switched else eta)

    def _stop_on_increase(self, run):
        return False if getattr(run, "switched", False) else super()._stop_on_increase(run)


def transfer(tau: float = 0.5, beta: float = 0.9) -> type:
    class Transfer(Switched):
        def _observe_objective(self, state, f0):
            after, before = state.get("objective_after"), state.get("transfer_f0")
            if after is not None and before is not None:
                for key, v in (("ema_gap", f0 - after), ("ema_dec", before - after)):
                    state[key] = beta * state[key] + (1 - beta) * v if key in state else v
            state["transfer_f0"] = f0
            HessianFree._observe_objective(state, f0)

        def _on(self, run):
            st = run.state
            if st.get("deterministic") is not False or "ema_dec" not in st:
                return False
            return st["ema_dec"] > 0 and st["ema_gap"] / st["ema_dec"] < tau

    return Transfer


def latch(k: int = 2, m: int = 8, n: int = 10, cap: int | None = None) -> type:
    class Latch(Switched):
        def _on(self, run):
            st, last = run.state, self.log[-1] if self.log else None
            if last is not None:
                if cap is not None and st.get("latched") == "on" and last.cg_reason == "max_iter":
                    st["latched"], self.dropped_at = "dropped", len(self.log)
                quick = st.setdefault("quick_stops", [])
                quick.append(last.cg_reason == "converged" and last.cg_iters <= k)
                del quick[:-n]
                stochastic = st.get("deterministic") is False
                if stochastic and len(quick) == n and sum(quick) >= m and "latched" not in st:
                    st["latched"], self.latched_at = "on", len(self.log)
            on = st.get("latched") == "on" and st.get("deterministic") is False
            if on and cap is not None:  # read by the CG call after this
                object.__setattr__(self.settings, "cg_max_iter", min(self._max_iter, cap))
            return on

        def _solve(self, *args, **kwargs):
            st, self._max_iter = args[4].state, self.settings.cg_max_iter
            if cap is not None and self.log and st.get("latched") == "on":
                if self.log[-1].cg_reason == "max_iter":
                    st.pop("warm_start", None)  # the latch drops: start cold
            try:
                return super()._solve(*args, **kwargs)
            finally:
                object.__setattr__(self.settings, "cg_max_iter", self._max_iter)

    return Latch


class Eta0(Recorded):
    """η = 0 (relative-progress stop) once the objective is seen stochastic; check as default."""

    def _cg_rtol(self, run):
        eta = super()._cg_rtol(run)
        return self._set_eta(run, 0.0 if run.state.get("deterministic") is False else eta)


VARIANTS = {
    "default": Recorded,
    "eta0": Eta0,
    "tight": tight(),
    "floor10": floor(),
    "transfer": transfer(),
    "transfer.3": transfer(0.3),
    "latch": latch(),
    "latch50cold": latch(cap=50),
    "latch50cold_k1": latch(k=1, m=4, cap=50),
}


def task_and_regime(key: str, budget: float) -> tuple[sc.Task, dict]:
    if key.startswith("addition"):
        task = sc.make_addition_task(int(key[len("addition") :]), budget)
        return task, task.hf_default_regime
    task = sc.make_curves_task(True) if key == "curves" else sc._classifier(key, True)
    task.budget = budget
    regime = {k: v for k, v in task.hf[os.environ["REGIME"]].items() if k != "kfac"}
    return task, regime | {"kw": {}}


def summary(opt: Recorded) -> str:
    log = opt.log
    if not log:
        return "    no steps"
    cg_iters = np.array([s.cg_iters for s in log])
    eta = np.array([s.cg_rtol for s in log])
    calls = np.mean([s.closure_calls for s in log])
    reasons = dict(collections.Counter(s.cg_reason for s in log))
    return (
        f"    CG iterations median {np.median(cg_iters):.0f} mean {cg_iters.mean():.1f}; "
        f"η median {np.nanmedian(eta):.3g}; closure calls/step {calls:.1f}; stops {reasons}; "
        f"λ last {log[-1].damping:.2g}; latched at step {opt.latched_at}, dropped at "
        f"{opt.dropped_at}"
    )


def run_and_report(runs, task, budget: float, slices: int, header: str, describe) -> None:
    """Interleave ``runs`` for ``budget`` seconds; print each one's final error, the time it
    first reached 0.01 (the addition task's "solved") and its curve, then ``describe(opt)`` of
    the optimizer its step closure holds (any object with a step ``log``)."""
    print(f"{header}; load {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    sc.interleave(runs, task, budget, slices, "cpu")
    print(f"load {os.getloadavg()}, wall {time.perf_counter() - t0:.0f} s")
    for r in runs:
        solved = [t for t, e in r.curve if e <= 0.01]
        print(
            f"{r.name:18s} final {sc.final_error(r):.4g}, {r.steps} steps, "
            f"≤ 0.01 at {solved[0] if solved else math.inf:.1f} s; "
            f"curve {[round(e, 3) for _, e in r.curve]}"
        )
        for cell in r.step.__closure__ or []:
            if isinstance(getattr(cell.cell_contents, "log", None), list):
                print(describe(cell.cell_contents), flush=True)


def main() -> None:
    torch.set_num_threads(1)
    key, budget, names = sys.argv[1], float(sys.argv[2]), sys.argv[3].split(",")
    task, regime = task_and_regime(key, budget)
    if os.environ.get("KW"):  # e.g. KW='{"structural_damping": 0.03}'
        regime = regime | {"kw": json.loads(os.environ["KW"])}
    runs = []
    for name in names:
        sc.HessianFree = VARIANTS[name]
        runs.append(sc.hf_run(task, name, "HF default", regime))
    sc.HessianFree = HessianFree
    header = f"{key}, {budget:g} s, regime {regime}"
    run_and_report(runs, task, budget, int(os.environ.get("SLICES", 8)), header, summary)


if __name__ == "__main__":
    main()
