"""The local (Newton) phase on soft-target fits: when to enter, when to leave (topic
"newtonexit"; follow-up to "gnquad", "gnentry" and the lead's stop 36).

Problems: ``deconv`` (``_unseen5.family("deconv", 512, seed)``: ConvTranspose2d + GroupNorm
decoder, BCE against a teacher's soft images, 1,201 float32 parameters; the gap is the excess
over the targets' entropy), the other unseen5 families (``conv1d``, ``tiedlm``, ``twohead``,
``mdn``, ``functional``: the loss itself), and gnentry's ``smallres``, ``interp``, ``sine``
(float64, f − f*; ``seed`` picks gnentry's start).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_newtonexit.py trace PROBLEM \\
        [--seed S] [--steps N] [--variant NAME]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_newtonexit.py race PROBLEM \\
        [--seeds 0,1,2] [--seconds 4,12] [--variants a,b] [--adam] [--double]

``trace``: per step, gap, ρ, rate, λ, λ's share, CG iterations and stop, the step's CPU seconds
(``time.process_time``), its cost in passes (below) and whether the phase is on. ``race``: the
variants (and with ``--adam`` Adam at lr 1e-3, 3e-3, 1e-2, 3e-2) from the same initial weights,
interleaved one step each, 1 thread, until each has used the largest budget of its own CPU time;
the gap of each at each budget (the last step that ended within it) and the CPU seconds to
reach levels set by the library's rule's curve.

Variants (subclasses; ``rule`` is the library's): ``no-phase`` (no local phase at all),
``exit-rate`` (rule a: leave the phase when its progress per pass falls below the K-FAC steps'
before entry), ``entry-slow`` (rule b: enter only when the streak's ρ is within 0.1 of 1 and
the decrease per step is shrinking), ``cap-grow`` (rule c: the phase's CG cap starts at twice
the pre-entry steps' iterations and doubles only after a step with |ρ − 1| ≤ 0.1).

Cost in passes (deterministic, so a rule using it does not depend on the machine's load):
closure calls + CG products + preconditioner products of a step.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gnentry as E  # noqa: E402
import _unseen5 as U  # noqa: E402

import hessfree._damping_control as damping_control  # noqa: E402
import hessfree.optimizer as O  # noqa: E402
from hessfree import HessianFree  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")
GNENTRY = ("smallres", "interp", "sine")


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


class Problem:
    """A model, a ``(loss, outputs)`` closure builder and the gap of a model."""

    #: ``--double``: an unseen5 family in float64 (is the phase's cost on deconv float32's?)
    double = False

    def __init__(self, key: str, seed: int) -> None:
        self.key, self.seed = key, seed
        if key in GNENTRY:
            p = E.problem(key, seed)
            self.model, self.x, self.y, self.loss = p.model, p.x, p.y, p.loss
            self.floor = p.fstar
        else:
            self.model, self.loss, self.x, self.y = U.family(key, 512, seed)
            if self.double:
                self.model, self.x, self.y = self.model.double(), self.x.double(), self.y.double()
            self.floor = U._floor(key, self.loss, self.y)

    def gap(self, m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(self.loss(m(self.x), self.y)) - self.floor


def cost(info: O.StepInfo) -> int:
    """A step's cost in passes: closure calls + curvature products (deterministic)."""
    return info.closure_calls + info.cg_matvecs + info.precond_matvecs


# ------------------------------------------------------------------------------------------
# variants
# ------------------------------------------------------------------------------------------
class _Rule(HessianFree):
    """Hooks for the candidate rules; with no flag set, the library's."""

    exit_rate = False  # rule a
    entry_slow = False  # rule b
    cap_grow = False  # rule c
    #: rule a: steps in the windows compared; after an exit, the phase may begin again only
    #: after twice as many accepted steps as the last one lasted (hysteresis)
    window = 3
    #: rule a': judge only steps the model took whole (rate 1, ρ ≥ ¼: not an entry
    #: transient's cut steps) and never begin the phase again once left
    exit_once = False

    def _finish(self, run, status, *, accepted=False, loss_after=None):  # noqa: ANN001, ANN202
        out = super()._finish(run, status, accepted=accepted, loss_after=loss_after)
        st, info = run.state, self.last_step
        hist = st.setdefault("nx_hist", [])
        whole = info.step_rate == 1.0 and info.rho >= 0.25
        if self.exit_once and st.get("nx_in") and not whole:
            # rule a': a cut step says nothing about the phase's speed; its passes count
            st["nx_pending"] = st.get("nx_pending", 0) + cost(info)
        elif accepted and loss_after is not None:
            c = cost(info) + st.pop("nx_pending", 0)
            hist.append((info.loss - info.loss_after, c, bool(st.get("nx_in"))))
        else:
            hist.append((0.0, cost(info), bool(st.get("nx_in"))))
        del hist[:-40]
        if self.exit_rate and st.get("newton") and st.get("nx_in"):
            self._maybe_leave(st, hist)
        st["nx_in"] = bool(st.get("newton"))
        if st.get("newton") and "nx_since" in st:
            st["nx_len"] = st.get("nx_len", 0) + 1
        return out

    @staticmethod
    def _speed(hist: list) -> float:
        """Progress per pass over ``hist``: −log(d_last / d_first) / passes, with d a step's
        decrease (a linear rate c per step gives −log c per step; 0 if not both > 0)."""
        d0, d1 = hist[0][0], hist[-1][0]
        if not (d0 > 0 and d1 > 0):
            return 0.0
        return -math.log(d1 / d0) / max(1, sum(c for _, c, _ in hist[1:]))

    def _maybe_leave(self, st: dict, hist: list) -> None:
        w = self.window
        phase = [h for h in hist if h[2]]
        before = st.get("nx_before")
        if len(phase) < w + 1 or before is None:
            return
        now = self._speed(phase[-(w + 1) :])
        if now < before:
            st["newton"] = False
            st.pop("newton_streak", None)
            st["nx_block"] = 10**9 if self.exit_once else 2 * max(len(phase), w)  # hysteresis
            st["nx_exits"] = st.get("nx_exits", 0) + 1
            hist.clear()

    def _track_newton(self, state, run, rho, rate, share):  # noqa: ANN001, ANN202
        was = state.get("newton")
        if not was and state.get("nx_block", 0) > 0:
            state["nx_block"] -= 1
            state.pop("newton_streak", None)
            return
        if (
            not was
            and self.entry_slow
            and state.get("newton_streak", 0) + 1 >= damping_control._NEWTON_STEPS
        ):
            hist = state.get("nx_hist", [])[-damping_control._NEWTON_STEPS :]
            ds = [h[0] for h in hist]
            slowing = len(ds) == damping_control._NEWTON_STEPS and all(
                b < a for a, b in zip(ds, ds[1:], strict=False)
            )
            if not (abs(rho - 1) <= 0.1 and slowing):
                state.pop("newton_streak", None)
                return
        if not was and self.entry_slow and abs(rho - 1) > 0.1:
            state.pop("newton_streak", None)
            return
        super()._track_newton(state, run, rho, rate, share)
        if state.get("newton") and not was:
            state["nx_since"] = state["step"]
            state["nx_len"] = 0
            hist = [h for h in state.get("nx_hist", []) if not h[2]]
            state["nx_before"] = self._speed(hist[-(self.window + 1) :])
            state["nx_pre_iters"] = max(
                [run.report.get("cg_iters", 5)] + state.get("nx_iters", [])[-3:]
            )
            state["nx_cap"] = 2 * state["nx_pre_iters"]
        if not state.get("newton"):
            state.setdefault("nx_iters", []).append(run.report.get("cg_iters", 0))
            del state["nx_iters"][:-5]
        elif self.cap_grow and was:
            if rate == 1.0 and abs(rho - 1) <= 0.1:
                state["nx_cap"] = min(O._AUTO_CG_MAX_ITER, 2 * state["nx_cap"])

    def _cg_max_iter(self, run, *, kfac=False):  # noqa: ANN001, ANN202
        most = super()._cg_max_iter(run, kfac=kfac)
        if self.cap_grow and run.state.get("newton") and self.settings.cg_max_iter == "auto":
            most = min(most, run.state.get("nx_cap", most))
        return most


VARIANTS: dict[str, dict] = {
    "rule": {},
    "no-phase": {"_newton_phase": False},
    "exit-rate": {"exit_rate": True},
    "exit-once": {"exit_rate": True, "exit_once": True},
    "entry-slow": {"entry_slow": True},
    "cap-grow": {"cap_grow": True},
}


def make_opt(model: torch.nn.Module, variant: str) -> HessianFree:
    cls = type(f"_V_{variant}", (_Rule,), dict(VARIANTS[variant]))
    return cls(model.parameters())


class Run:
    def __init__(self, prob: Problem, variant: str, model: torch.nn.Module) -> None:
        self.name, self.prob, self.model = variant, prob, model
        self.cpu, self.curve, self.dead = 0.0, [(0.0, prob.gap(model))], False
        if variant.startswith("adam"):
            self.opt = torch.optim.Adam(model.parameters(), lr=float(variant.split()[1]))
        else:
            self.opt = make_opt(model, variant)

    def step(self) -> None:
        m, p = self.model, self.prob
        c0 = time.process_time()
        try:
            if isinstance(self.opt, HessianFree):

                def closure():
                    o = m(p.x)
                    return p.loss(o, p.y), o

                self.opt.step(closure)
            else:
                self.opt.zero_grad()
                p.loss(m(p.x), p.y).backward()
                self.opt.step()
        except Exception:  # noqa: BLE001 - an optimizer that fails stops where it is
            self.dead = True
        self.cpu += time.process_time() - c0
        self.curve.append((self.cpu, p.gap(m)))


def trace(key: str, seed: int, steps: int, variant: str) -> None:
    prob = Problem(key, seed)
    r = Run(prob, variant, copy.deepcopy(prob.model))
    print(f"## trace {key} seed {seed}, {variant}; load {load()}\n")
    print("| k | gap | ρ | rate | λ | share | CG | stop | CPU s | passes | phase |")
    print("|---" * 11 + "|")
    for k in range(steps):
        c0 = r.cpu
        r.step()
        i, st = r.opt.last_step, r.opt._global_state()
        print(
            f"| {k} | {r.curve[-1][1]:.3e} | {i.rho:.3f} | {i.step_rate:.3g} | {i.damping:.1e} "
            f"| {st.get('newton_share', math.nan):.1e} | {i.cg_iters} | {i.cg_reason} "
            f"| {r.cpu - c0:.3f} | {cost(i)} | {'on' if st.get('newton') else ''} |",
            flush=True,
        )
    exits = r.opt._global_state().get("nx_exits", 0)
    print(f"\nload after {load()}; CPU {r.cpu:.2f} s; exits {exits}\n")


def at(curve: list, t: float) -> float:
    """The gap after the last step that ended within ``t`` CPU seconds."""
    return [g for c, g in curve if c <= t][-1]


def time_to(curve: list, level: float) -> float:
    return next((c for c, g in curve if g <= level), math.inf)


def race(key: str, seeds: list[int], budgets: list[float], variants: list[str], adam: bool):
    names = list(variants) + (["adam 1e-3", "adam 3e-3", "adam 1e-2", "adam 3e-2"] if adam else [])
    print(f"## race {key}: {', '.join(names)}; budgets {budgets} s CPU\n")
    rows = []
    for seed in seeds:
        prob = Problem(key, seed)
        load0 = load()
        runs = [Run(prob, n, copy.deepcopy(prob.model)) for n in names]
        for r in runs:  # warm-up step (timed: it is part of each optimizer's work)
            r.step()
        top = max(budgets)
        while any(r.cpu < top and not r.dead for r in runs):
            for r in runs:
                if r.cpu < top and not r.dead:
                    r.step()
        rows.append((seed, load0, load(), runs))
        ref = runs[0].curve
        g_end = at(ref, top)
        levels = [ref[0][1] * 1e-1, ref[0][1] * 1e-2, g_end * 3, g_end]
        print(f"seed {seed} (load {load0} -> {load()}), gap at start {ref[0][1]:.4g}")
        print(
            "| variant | "
            + " | ".join(f"gap @{b:g}s" for b in budgets)
            + " | "
            + " | ".join(f"CPU to {lv:.2e}" for lv in levels)
            + " | steps | phase from step | exits |"
        )
        print("|---" * (len(budgets) + len(levels) + 4) + "|")
        for r in runs:
            st = r.opt._global_state() if isinstance(r.opt, HessianFree) else {}
            print(
                f"| {r.name} | "
                + " | ".join(f"{at(r.curve, b):.4g}" for b in budgets)
                + " | "
                + " | ".join(f"{time_to(r.curve, lv):.3g}" for lv in levels)
                + f" | {len(r.curve) - 1} | {st.get('nx_since', '')} | {st.get('nx_exits', '')} |",
                flush=True,
            )
        print()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["trace", "race"])
    ap.add_argument("problem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seconds", default="4,12")
    ap.add_argument("--variant", default="rule")
    ap.add_argument("--variants", default="rule,exit-rate,entry-slow,cap-grow")
    ap.add_argument("--adam", action="store_true")
    ap.add_argument("--double", action="store_true", help="unseen5 families in float64")
    a = ap.parse_args()
    Problem.double = a.double
    if a.what == "trace":
        trace(a.problem, a.seed, a.steps, a.variant)
    else:
        seeds = [int(s) for s in a.seeds.split(",")]
        budgets = [float(s) for s in a.seconds.split(",")]
        race(a.problem, seeds, budgets, a.variants.split(","), a.adam)


if __name__ == "__main__":
    main()
