"""Why default HF trails Adam on the mini-batch CNN of ``_unseen.py`` (problem b): diagnosis.

``diag``: fixed-step runs (off the clock) of HF variants on the CNN and on an all-Linear control,
each from the same weights and the same batch sequence; per step the optimizer's own StepInfo
(ρ, λ, CG iterations and stop, rate) and the share of the step norm in the conv parameters
against their share of the gradient. ``race``: interleaved equal-time runs against Adam.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_cnnmb.py diag|race [--budget S]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from typing import Any

import _unseen
import torch
from torch import nn

import hessfree

torch.set_num_threads(1)


@contextlib.contextmanager
def before_fix(on: bool):
    """The relative floor as on main: its scale fixed at the first stochastic step."""
    saved = hessfree.HessianFree._raise_floor
    if on:
        hessfree.HessianFree._raise_floor = lambda self, *args: None
    try:
        yield
    finally:
        hessfree.HessianFree._raise_floor = saved


def mlp() -> nn.Module:
    """The control: the CNN's head on a two-layer all-Linear trunk of about its size."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(),
                         nn.Linear(64, 10))  # fmt: skip


def diag(steps: int, variants: dict[str, dict], makers: dict, seeds=(1,)) -> None:
    x, y, _, _ = _unseen.digits()
    for mname, make in makers.items():
        torch.manual_seed(0)
        model0 = make()
        n_lin = sum(p.numel() for m in model0.modules() if isinstance(m, nn.Linear)
                    for p in m.parameters())  # fmt: skip
        n_all = sum(p.numel() for p in model0.parameters())
        print(f"\n#### {mname}: {n_all} parameters, nn.Linear {n_lin / n_all:.0%}\n")
        print(
            "| variant | loss @⅓ | median loss ⅓→end | min | end | ρ med | λ first→med→last | "
            "CG med (reasons) | rate<1 | rejected | conv share of |p| / of |g| (med) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for vname, kw, seed in [(v, k, s) for s in seeds for v, k in variants.items()]:
            model = copy.deepcopy(model0)
            conv = [id(p) for m in model.modules() if isinstance(m, nn.Conv2d)
                    for p in m.parameters()]  # fmt: skip
            params = list(model.parameters())
            kw = dict(kw)
            old = kw.pop("before", False)
            opt = hessfree.HessianFree(params, **kw)
            gen = torch.Generator().manual_seed(seed)
            infos, shares, losses = [], [], []

            def full(model: nn.Module = model) -> float:
                with torch.no_grad():
                    return nn.functional.cross_entropy(model(x), y).item()

            losses.append(full())
            for k in range(steps):
                idx = torch.randint(len(y), (100,), generator=gen)
                xb, yb = x[idx], y[idx]

                def closure(model=model, xb=xb, yb=yb) -> Any:
                    out = model(xb)
                    return nn.functional.cross_entropy(out, yb), out

                before = [p.detach().clone() for p in params]
                model.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                g = [p.grad.clone() for p in params]
                with before_fix(old):
                    opt.step(closure)
                d = [p.detach() - b for p, b in zip(params, before, strict=True)]
                if conv:
                    num = sum(
                        t.square().sum() for t, p in zip(d, params, strict=True) if id(p) in conv
                    )
                    den = sum(t.square().sum() for t in d)
                    gn = sum(
                        t.square().sum() for t, p in zip(g, params, strict=True) if id(p) in conv
                    )
                    gd = sum(t.square().sum() for t in g)
                    if den > 0:
                        shares.append(((num / den).sqrt().item(), (gn / gd).sqrt().item()))
                infos.append(opt.last_step)
                if (k + 1) % 5 == 0:
                    losses.append(full())
            rho = [i.rho for i in infos if i.rho == i.rho and i.rho > -1e300]
            lam = [i.damping for i in infos]
            reasons: dict[str, int] = {}
            for i in infos:
                reasons[str(i.cg_reason)] = reasons.get(str(i.cg_reason), 0) + 1
            sh = (f"{statistics.median(s[0] for s in shares):.3f} / "
                  f"{statistics.median(s[1] for s in shares):.3f}") if shares else "–"  # fmt: skip
            late = losses[len(losses) // 3 :]  # the full-set loss every 5 steps, after ⅓
            print(
                f"| {vname} s{seed} | {losses[len(losses) // 3]:.3g} | "
                f"{statistics.median(late):.3g} | {min(late):.3g} | {losses[-1]:.3g}"
                + f" | {statistics.median(rho) if rho else float('nan'):.2f} | "
                f"{lam[0]:.2g}→{statistics.median(lam):.2g}→{lam[-1]:.2g} | "
                f"{statistics.median(i.cg_iters for i in infos):.0f} ({reasons}) | "
                f"{sum(0 < i.step_rate < 1 for i in infos)} | "
                f"{sum(not i.accepted for i in infos)} | {sh} |"
            )
            sys.stdout.flush()


VARIANTS = {
    "before (main)": {"before": True},
    "defaults": {},
    "rmd=0.1": {"relative_min_damping": 0.1},
    "before rmd=0.1": {"before": True, "relative_min_damping": 0.1},
    "precond=None": {"precond": None},
    "cg_max_iter=10": {"cg_max_iter": 10},
    "precond=None cg10": {"precond": None, "cg_max_iter": 10},
}


def race(
    budget: float, make=None, title: str = "CNN", data=None, loss_fn=None, batch: int = 100
) -> None:
    """HF defaults now and before (main's fixed floor), Adam at three rates: interleaved."""
    x, y = data or _unseen.digits()[:2]
    loss_fn = loss_fn or nn.functional.cross_entropy
    torch.manual_seed(0)
    model0 = (make or _unseen.cnn)()
    runs = []
    for name in ("HF now", "HF before (main)", "Adam 0.001", "Adam 0.003", "Adam 0.01"):
        model = copy.deepcopy(model0)
        hf = name.startswith("HF")
        opt = (hessfree.HessianFree(model.parameters()) if hf
               else torch.optim.Adam(model.parameters(), lr=float(name.split()[1])))  # fmt: skip
        old = name.endswith("(main)")
        step = _unseen.minibatch_step(
            model, opt, x, y, batch, loss_fn, hf, lambda old=old: before_fix(old)
        )

        def evaluate(model: nn.Module = model) -> float:
            return _unseen.train_set_loss(model, loss_fn, x, y)

        runs.append(_unseen.Run(name, step, evaluate, opt))
    _unseen.interleave(runs, budget, eval_every=budget / 20)
    _unseen.report(f"{title} at batch {batch}, {budget:g} s each (full train-set loss)", runs, None)
    for r in runs:
        late = [f for t, f in r.curve if t >= r.curve[-1][0] / 2]
        med = statistics.median(late)
        print(f"- {r.name}: {r.steps} steps, {r.clock / r.steps * 1e3:.3g} ms/step, loss at ½ "
              f"{late[0]:.4g}, median of the last half's points {med:.4g}")  # fmt: skip


def tasks(keys: list[str], budgets: dict[str, float]) -> None:
    """Scorecard tasks' defaults (as ``_freeze_hashes.py`` builds them), now and before."""
    import _freeze_hashes
    import scorecard as sc

    for key in keys:
        task = _freeze_hashes.make(key)
        base = task.hf["defaults"] if key == "swap" else task.hf_default_regime
        base = base or next(iter(task.hf.values()))
        base = {k: v for k, v in base.items() if k not in ("kfac", "early_kw")} | {"kw": {}}
        runs = []
        for name in ("now", "before (main)"):
            r = sc.hf_run(task, f"HF defaults {name}", "HF", base)
            if name != "now":
                inner = r.step

                def wrapped(inner=inner) -> None:
                    with before_fix(True):
                        inner()

                r.step = wrapped
            runs.append(r)
        budget = budgets[key]
        print(f"\n#### {key}, {budget:g} s each; load {open('/proc/loadavg').read().strip()}\n")
        sc.interleave(runs, task, budget, task.slices, "cpu")
        print("| run | steps | s/step | error ¼ | ½ | end |")
        print("|---|---|---|---|---|---|")
        for r in runs:
            q = [next(e for t, e in r.curve if t >= f * budget) for f in (0.25, 0.5)]
            print(f"| {r.name} | {r.steps} | {r.clock / r.steps:.4g} | {q[0]:.5g} | {q[1]:.5g} | "
                  f"{sc.final_error(r):.5g} |")  # fmt: skip
        sys.stdout.flush()


def cost(key: str, pairs: int) -> None:
    """A step's time now over before, on a task whose trajectory the change leaves bitwise
    alone: one step of each in turn (alternating which goes first), the ratio of the sums."""
    import time

    import _freeze_hashes
    import scorecard as sc

    task = _freeze_hashes.make(key)
    base = task.hf_default_regime or next(iter(task.hf.values()))
    base = {k: v for k, v in base.items() if k not in ("kfac", "early_kw")} | {"kw": {}}
    now, old = (sc.hf_run(task, n, "HF", base) for n in ("now", "before"))
    spent = {"now": [], "before": []}
    for k in range(pairs):
        for name in ("now", "before") if k % 2 == 0 else ("before", "now"):
            r = now if name == "now" else old
            with before_fix(name == "before"):
                t0 = time.perf_counter()
                r.step()
                spent[name].append(time.perf_counter() - t0)
    same = all(
        torch.equal(a, b)
        for a, b in zip(now.model.parameters(), old.model.parameters(), strict=True)
    )
    ratios = [a / b for a, b in zip(spent["now"], spent["before"], strict=True)]
    print(
        f"{key}: {pairs} steps each; parameters bitwise equal after them: {same}; time now / "
        f"before: sum {sum(spent['now']) / sum(spent['before']):.3f}, median per step "
        f"{statistics.median(ratios):.3f}; load {open('/proc/loadavg').read().strip()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["diag", "race", "tasks", "others", "cost"])
    ap.add_argument("--tasks", nargs="+", default=["curves", "mnist1d", "addition30"])
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--budget", type=float, default=8.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--models", nargs="+", default=["CNN", "MLP control"])
    ap.add_argument("--cells", nargs="+", default=["GRU", "LSTM", "BN"])
    a = ap.parse_args()
    print("load at start:", open("/proc/loadavg").read().strip())
    if a.what == "diag":
        makers = {"CNN": _unseen.cnn, "MLP control": mlp}
        diag(a.steps, {v: VARIANTS[v] for v in a.variants},
             {m: makers[m] for m in a.models}, tuple(a.seeds))  # fmt: skip
    elif a.what == "race":
        race(a.budget)
        race(a.budget, mlp, "MLP control")
    elif a.what == "cost":
        for key in a.tasks:
            cost(key, a.steps)
    elif a.what == "others":  # _unseen.py's other mini-batch problems
        seq = _unseen.seq_data(1024, 30, 0)
        for cell in [getattr(nn, c) for c in a.cells if c != "BN"]:
            race(a.budget, lambda cell=cell: _unseen.SeqReg(cell), cell.__name__, seq,
                 nn.functional.mse_loss, 128)  # fmt: skip

        def bn() -> nn.Module:
            return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                 nn.Dropout(0.2), nn.Linear(64, 10))  # fmt: skip

        if "BN" in a.cells:
            race(a.budget, bn, "BatchNorm + Dropout MLP")
    else:
        tasks(a.tasks, {"curves": 45.0, "mnist1d": 30.0, "addition30": 60.0} | (
            {k: a.budget for k in a.tasks} if a.budget != 8.0 else {}))  # fmt: skip
    print("\nload at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
