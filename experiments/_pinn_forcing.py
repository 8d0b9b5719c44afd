"""Old against new ``cg_rtol='auto'`` in ``pinn.py``'s regime, interleaved in one process.

Commit 54179aa made ``cg_rtol='auto'`` use :math:`\\eta = \\min(1/2, \\sqrt{\\|g_k\\|/\\|g_1\\|})`
on objectives seen deterministic from the start (every PINN step) instead of Eisenstat &
Walker's step ratio. The old rule is what ``HessianFree`` still does once an objective has
been seen stochastic, so a run marked that way before its first step (``EWHessianFree``) is the
old trajectory bitwise (checked: parameter hashes after 80 steps equal commit 45b5817's).

Default mode: each repetition trains, from the same initial weights and with ``pinn.train``
(Adam for ``--switch`` of the budget, then HF), every (problem, settings, rule) in turn, so load
changes hit all of them alike; too noisy for a verdict (the timed Adam phase ends at a different
point in every run). ``--stepped``: one fixed Adam phase per seed, then the HF runs stepped
round-robin (:func:`stepped`), the measurement in ``results/2026-12-01-pinn.md``. Both print
final losses, relative L2 errors and new/old ratios.

Usage::

    OPENBLAS_NUM_THREADS=1 python experiments/_pinn_forcing.py --reps 2 --poisson 20 --reaction 30
    OPENBLAS_NUM_THREADS=1 python experiments/_pinn_forcing.py --stepped --reps 2 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pinn  # noqa: E402

from hessfree import HessianFree  # noqa: E402


class EWHessianFree(HessianFree):
    """HessianFree whose ``cg_rtol='auto'`` keeps Eisenstat & Walker's ratio on every step."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.state[self._params()[0]]["forcing_seen_stochastic"] = True


def stepped(args) -> None:
    """From one Adam point per (problem, seed), HF with each rule stepped round-robin.

    The Adam phase is a fixed number of steps (what pinn.py's 20 % share bought in its last
    full report: Poisson 1,000 steps at lr 3e-3, reaction 1,700 at lr 1e-2), so every rule
    starts from the same weights; then each (settings, rule) takes one HF step in turn until
    its own HF time reaches the budget. Records loss, error, own seconds and gradient
    equivalents (closure calls + CG products + preconditioner products; deterministic).
    """
    probs = {
        "poisson": (pinn.poisson(24, 32), args.poisson, 3e-3, 1000),
        "reaction": (pinn.reaction(48, 32, 32), args.reaction, 1e-2, 1700),
    }
    probs = {k: probs[k] for k in args.problems.split(",")}
    settings = {"defaults": {}, "tuned": pinn.HF_TUNED}
    rules = {"new": HessianFree, "old": EWHessianFree}
    rows = []
    for seed in range(args.seed, args.seed + args.reps):
        for key, (prob, budget, lr, n_adam) in probs.items():
            torch.manual_seed(seed)
            net0 = prob.make_net()
            step = pinn._adam(net0, prob.closure_for(net0), lr)
            for _ in range(n_adam):
                step()
            runs = {}
            for sname, kw in settings.items():
                for rname, cls in rules.items():
                    net = copy.deepcopy(net0)
                    opt = cls(net.parameters(), **kw)
                    runs[(sname, rname)] = dict(
                        net=net, opt=opt, cl=prob.closure_for(net), t=0.0, ge=0, steps=0
                    )
            live = list(runs)
            while live:
                for k in list(live):
                    r = runs[k]
                    t0 = time.perf_counter()
                    r["opt"].step(r["cl"])
                    r["t"] += time.perf_counter() - t0
                    s = r["opt"].last_step
                    r["ge"] += s.closure_calls + s.cg_matvecs + s.precond_matvecs
                    r["steps"] += 1
                    if r["t"] >= budget or not math.isfinite(s.loss_after):
                        live.remove(k)
            for (sname, rname), r in runs.items():
                loss = float(r["cl"]()[0].detach())
                err = pinn.rel_l2(r["net"], prob)
                rows.append((seed, key, sname, rname, loss, err, r["steps"], r["ge"], r["t"]))
                print(
                    f"seed {seed} {key} {sname} {rname}: loss {loss:.3e} err {err:.3e} "
                    f"steps {r['steps']} GE {r['ge']} t {r['t']:.1f}",
                    flush=True,
                )
    print("load at end", open("/proc/loadavg").read().strip(), flush=True)
    med = statistics.median
    print(
        "\n| problem | settings | loss new/old (per seed) | err new/old (per seed) "
        "| GE/s new/old |\n|---|---|---|---|---|"
    )
    for key in probs:
        for sname in settings:
            sel = {(r[0], r[3]): r for r in rows if r[1] == key and r[2] == sname}
            seeds = sorted({s for s, _ in sel})
            lr_ = [sel[(s, "new")][4] / sel[(s, "old")][4] for s in seeds]
            er_ = [sel[(s, "new")][5] / sel[(s, "old")][5] for s in seeds]
            sp_ = [
                (sel[(s, "new")][7] / sel[(s, "new")][8])
                / (sel[(s, "old")][7] / sel[(s, "old")][8])
                for s in seeds
            ]
            print(
                f"| {key} | {sname} | {med(lr_):.3g} ({' '.join(f'{x:.3g}' for x in lr_)}) "
                f"| {med(er_):.3g} ({' '.join(f'{x:.3g}' for x in er_)}) | {med(sp_):.3g} |"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--poisson", type=float, default=20.0, help="budget (s) per Poisson run")
    ap.add_argument("--reaction", type=float, default=30.0, help="budget (s) per reaction run")
    ap.add_argument("--switch", type=float, default=0.2)
    ap.add_argument("--settings", default="defaults,tuned")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--problems", default="poisson,reaction")
    ap.add_argument("--stepped", action="store_true", help="fixed Adam phase, HF round-robin")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("load at start", open("/proc/loadavg").read().strip(), flush=True)
    if args.stepped:
        return stepped(args)
    probs = {
        "poisson": (pinn.poisson(24, 32), args.poisson, 3e-3),
        "reaction": (pinn.reaction(48, 32, 32), args.reaction, 1e-2),
    }
    inits = {}
    for key, (prob, _, _) in probs.items():
        torch.manual_seed(args.seed)
        inits[key] = copy.deepcopy(prob.make_net().state_dict())
    settings = {"defaults": {}, "tuned": pinn.HF_TUNED}
    settings = {k: settings[k] for k in args.settings.split(",")}
    rules = {"new (√ rule)": HessianFree, "old (EW ratio)": EWHessianFree}
    res: dict[tuple, list] = {}
    for rep in range(args.reps):
        for key, (prob, budget, lr) in probs.items():
            for sname, kw in settings.items():
                order = list(rules.items())
                if rep % 2:
                    order.reverse()  # alternate which rule runs first
                for rname, cls in order:
                    pinn.HessianFree = cls
                    run = pinn.train(
                        prob,
                        "Adam → HF",
                        inits[key],
                        budget,
                        adam_lr=lr,
                        switch=args.switch,
                        hf_kwargs=kw,
                    )
                    res.setdefault((key, sname, rname), []).append(run)
                    print(
                        f"rep {rep} {key} {sname} {rname}: loss {run.loss:.3e} "
                        f"err {run.error:.3e} steps {run.steps} {run.note}",
                        flush=True,
                    )
    pinn.HessianFree = HessianFree
    print("load at end", open("/proc/loadavg").read().strip(), flush=True)
    print(
        "\n| problem | settings | loss new | loss old | err new | err old "
        "| loss new/old | err new/old | steps new/old |\n|---|---|---|---|---|---|---|---|---|"
    )
    med = statistics.median
    for key in probs:
        for sname in settings:
            new, old = res[(key, sname, "new (√ rule)")], res[(key, sname, "old (EW ratio)")]
            lr_ = med(a.loss / b.loss for a, b in zip(new, old, strict=True))
            er_ = med(a.error / b.error for a, b in zip(new, old, strict=True))
            sr_ = med(a.steps / b.steps for a, b in zip(new, old, strict=True))
            print(
                f"| {key} | {sname} | {med(r.loss for r in new):.2e} "
                f"| {med(r.loss for r in old):.2e} | {med(r.error for r in new):.2e} "
                f"| {med(r.error for r in old):.2e} | {lr_:.3g} | {er_:.3g} | {sr_:.3g} |"
            )


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
