"""Which rule for the K-FAC relative floor's scale keeps the CNN fix ("cnnmb") without
ratcheting the floor on CURVES' defaults (``experiments/README.md``, "kfacfloor").

A rule (``RULES``) says on which ``_FLOOR_EVERY``-th K-FAC step of a stochastic objective the
scale is re-measured ("main": every one, cnnmb's running maximum; "rise": where the fresh
batches' loss rose, ``_loss_rose``; "stale": rise and an overshoot, ``_floor_stale``; "early":
the first ``2 _RISE_WINDOW`` steps; "early+stale" = "adopted") and by how much it may rise
("x2": at most twice the old scale; otherwise to the quotient).

``cnn``: _cnnmb.py's fixed-step diagnosis (CNN and MLP control, 3 batch seeds, off the clock);
``cnnrace``: equal-CPU-time runs of the rules there; ``curves``: CURVES defaults at 250/62
under each rule and the tuned row, interleaved, each on its own CPU clock, per batch-order
seed; ``hashes``: whether a task's default trajectory differs between two rules.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_kfacfloor.py cnn|cnnrace|curves|hashes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time

import torch

import hessfree
import hessfree._damping_control as damping_control

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))


def _early(self, state: dict) -> bool:
    return len(state.get("recent_losses", [])) < 2 * damping_control._RISE_WINDOW


#: name: (whether a K-FAC step re-measures the scale, the most a raise multiplies it by).
#: Plain-CG steps keep the library's rule (``_floor_stale``) under all of them.
RULES = {
    "main": (lambda self, st: True, math.inf),  # cnnmb: every _FLOOR_EVERY-th step
    "none": (lambda self, st: False, math.inf),  # before cnnmb: the first step's scale
    "rise": (lambda self, st: damping_control._loss_rose(st.get("recent_losses", [])), math.inf),
    "stale": (lambda self, st: self._floor_stale(st), math.inf),
    "rise x2": (lambda self, st: damping_control._loss_rose(st.get("recent_losses", [])), 2.0),
    "rise x4": (lambda self, st: damping_control._loss_rose(st.get("recent_losses", [])), 4.0),
    "always x2": (lambda self, st: True, 2.0),
    "early": (_early, math.inf),  # the first 2 _RISE_WINDOW steps only
    "early+stale": (lambda self, st: _early(self, st) or self._floor_stale(st), math.inf),
}
RULES["early+rise"] = (
    lambda self, st: _early(self, st) or damping_control._loss_rose(st.get("recent_losses", [])),
    math.inf,
)
RULES["adopted"] = RULES["early+stale"]  # the library's rule from this branch on


def _capped_raise(factor: float):
    """``HessianFree._raise_floor`` with the new scale at most ``factor`` × the old one."""

    def raise_floor(self, curvature, product, g, g_norm, run) -> None:
        gCg, gDg = self._curvature_along(curvature, product, g, g_norm, run)
        scale = abs(gCg) / gDg if gDg > 0 else math.nan
        state = run.state
        old = state.get("damping_scale", 0.0)
        if not (math.isfinite(scale) and scale > old):
            return
        state["damping_scale"] = min(scale, factor * old)
        lam = self._damping_policy(state).clip(run.damping)
        if lam != run.damping:
            run.damping = state["damping"] = lam

    return raise_floor


@contextlib.contextmanager
def rule(name: str | None):
    """The K-FAC floor rule ``RULES[name]`` in place of the library's (None: the library's)."""
    cls = hessfree.HessianFree
    saved = cls._floor_due, cls._raise_floor
    if name is not None:
        due, factor = RULES[name]

        def floor_due(self, state: dict) -> bool:
            return due(self, state) if self._kfac_in_use() else self._floor_stale(state)

        cls._floor_due = floor_due
        if factor != math.inf:
            cls._raise_floor = _capped_raise(factor)
    try:
        yield
    finally:
        cls._floor_due, cls._raise_floor = saved


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cnn(names: list[str], steps: int, seeds: tuple[int, ...]) -> None:
    """_cnnmb.py's diag (fixed steps off the clock, CNN and MLP control) under each rule."""
    import _cnnmb

    _cnnmb.before_fix = rule  # diag's "before" key names the rule
    variants = {n: {"before": n} for n in names}
    _cnnmb.diag(steps, variants, {"CNN": _cnnmb._unseen.cnn, "MLP control": _cnnmb.mlp}, seeds)


def cnnrace(
    names: list[str], budget: float, models: tuple[str, ...] = ("CNN", "MLP control")
) -> None:
    """Interleaved equal-CPU-time runs on the CNN and the MLP control, one per rule (the
    batches of ``_unseen.minibatch_step``: seed 1)."""
    import _cnnmb
    import _unseen
    from torch import nn

    x, y = _unseen.digits()[:2]
    loss_fn = nn.functional.cross_entropy

    def bn() -> nn.Module:  # _cnnmb.py others' BatchNorm + Dropout MLP (K-FAC)
        return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                             nn.Dropout(0.2), nn.Linear(64, 10))  # fmt: skip

    makers = {"CNN": _unseen.cnn, "MLP control": _cnnmb.mlp, "BatchNorm + Dropout MLP": bn}
    for title, make in ((t, makers[t]) for t in models):
        torch.manual_seed(0)
        model0 = make()
        runs = []
        for name in names:
            model = copy.deepcopy(model0)
            opt = hessfree.HessianFree(model.parameters())
            step = _unseen.minibatch_step(
                model, opt, x, y, 100, loss_fn, True, lambda name=name: rule(name)
            )

            def evaluate(model: nn.Module = model) -> float:
                return _unseen.train_set_loss(model, loss_fn, x, y)

            runs.append(_unseen.Run(name, step, evaluate, opt))
        l0 = load()
        _unseen.interleave(runs, budget, eval_every=budget / 20)
        print(f"\n#### {title}, {budget:g} s each; load {l0} -> {load()}\n")
        print("| rule | steps | loss at ½ | median of last half | end |")
        print("|---|---|---|---|---|")
        for r in runs:
            late = [f for t, f in r.curve if t >= r.curve[-1][0] / 2]
            print(f"| {r.name} | {r.steps} | {late[0]:.4g} | {statistics.median(late):.4g} | "
                  f"{r.curve[-1][1]:.4g} |")  # fmt: skip
        sys.stdout.flush()


def hashes(key: str, names: list[str], steps: int, grow: bool = False) -> None:
    """The scorecard task's default regime (full size) for ``steps`` steps under each rule:
    the error, how many steps were on mini-batches, and a hash of the parameters."""
    import hashlib

    import scorecard as sc

    task = sc._classifier(key, quick=False) if key != "curves" else sc.make_curves_task(False)
    base = task.hf_default_regime or next(iter(task.hf.values()))
    if grow:  # _freeze_hashes.py's "mnist1dgrow": the growing batch, no arguments
        base = dict(batch=250, growth=1.1, curvature_batch=0.25)
    base = {k: v for k, v in base.items() if k not in ("kfac", "early_kw")} | {"kw": {}}
    for name in names:
        r, opt = _seeded_run(sc, task, name, base, 0)
        stochastic = 0
        with rule(name):
            for _ in range(steps):
                r.step()
                stochastic += opt._global_state().get("deterministic") is False
        h = hashlib.sha256()
        for p in r.model.parameters():
            h.update(p.detach().numpy().tobytes())
        print(f"{key} {name}: {steps} steps ({stochastic} seen stochastic), error "
              f"{task.error(r.model):.6g}, sha256 {h.hexdigest()[:16]}", flush=True)  # fmt: skip


def _seeded_run(sc, task, name: str, regime: dict, seed: int):
    """``scorecard.hf_run`` with the batch order of ``seed`` (seed 0: the scorecard's), the
    same initial weights; and its optimizer."""
    made = []

    class Batches(sc._Batches):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **kw)
            self.gen = torch.Generator().manual_seed(seed)
            self.perm = torch.randperm(self.n, generator=self.gen)

    class HF(hessfree.HessianFree):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **kw)
            made.append(self)

    saved = sc._Batches, sc.HessianFree
    sc._Batches, sc.HessianFree = Batches, HF
    try:
        r = sc.hf_run(task, name, "HF", regime)
    finally:
        sc._Batches, sc.HessianFree = saved
    return r, made[0]


def curves(
    names: list[str],
    budget: float,
    seeds: tuple[int, ...],
    tuned_rule: str = "main",
    marks: tuple[float, ...] = (45.0, 90.0),
) -> None:
    """CURVES defaults (250/62, no arguments) under each rule and the tuned row (under
    ``tuned_rule``), interleaved step by step, each on its own CPU clock (time.process_time);
    train error at ``marks``."""
    import scorecard as sc

    task = sc.make_curves_task(quick=False)
    tuned = task.hf["250/62, cg≤2, K-FAC rank 32 refresh 2, λ≥0.3"]
    for seed in seeds:
        runs = []
        for name in [*names, "tuned"]:
            regime = tuned if name == "tuned" else dict(batch=250, curvature_batch=62, kw={})
            r, opt = _seeded_run(sc, task, name, regime, seed)
            runs.append([name, r, 0.0, {}, 0, opt])
        l0 = load()
        while any(c[2] < budget for c in runs):
            for c in runs:
                if c[2] >= budget:
                    continue
                with rule(c[0] if c[0] in RULES else tuned_rule):
                    t0 = time.process_time()
                    c[1].step()
                    c[2] += time.process_time() - t0
                c[4] += 1
                for m in marks:
                    if m not in c[3] and c[2] >= m:
                        c[3][m] = task.error(c[1].model)
        print(f"\n#### CURVES seed {seed}, {budget:g} s CPU each; load {l0} -> {load()}\n")
        print("| run | steps | " + " | ".join(f"error @{m:g} s" for m in marks) + " | λ end | "
              "scale end |")  # fmt: skip
        print("|---|---|" + "---|" * len(marks) + "---|---|")
        for name, _r, _, errs, n, opt in runs:
            gs = opt._global_state()
            print(f"| {name} | {n} | " + " | ".join(f"{errs.get(m, math.nan):.3f}" for m in marks)
                  + f" | {gs.get('damping', math.nan):.3g} | "
                  f"{gs.get('damping_scale', math.nan):.4g} |")  # fmt: skip
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["cnn", "cnnrace", "curves", "hashes"])
    ap.add_argument("--task", default="mnist1d")
    ap.add_argument("--grow", action="store_true")
    ap.add_argument("--models", nargs="+", default=["CNN", "MLP control"])
    ap.add_argument("--rules", nargs="+", default=["main", "rise x2"])
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--budget", type=float, default=90.0)
    ap.add_argument("--tuned-rule", default="main")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = ap.parse_args()
    print("load at start:", load())
    if a.what == "cnn":
        cnn(a.rules, a.steps, tuple(a.seeds))
    elif a.what == "cnnrace":
        cnnrace(a.rules, a.budget, tuple(a.models))
    elif a.what == "hashes":
        hashes(a.task, a.rules, a.steps, a.grow)
    else:
        curves(a.rules, a.budget, tuple(a.seeds), a.tuned_rule)
    print("\nload at end:", load())


if __name__ == "__main__":
    main()
