"""`HessianFree(params)` in a user's full-batch L-BFGS loop, on problems the scorecard lacks.

Each problem builds its data, model and initial weights from a fixed seed. The contenders start
from copies of the same weights and are interleaved in one process (``_unseen.interleave``: the
run with the least stepping time so far takes the next ``step``), so each gets the same
wall-clock budget under the same load; the full-set objective is evaluated off the clock.

Contenders: ``HF`` is ``HessianFree(params)`` in the LBFGS loop unchanged (closure:
``zero_grad``, ``backward``, return the loss: exact Hessian); ``HF lo`` the ``(loss, outputs)``
closure (Gauss-Newton) where the loss is a standard one of the model's outputs (residual blocks
for the PINN); ``HF loss`` a closure returning only the loss (Hessian, no backward); ``LBFGS`` is
``torch.optim.LBFGS(params)`` and ``LBFGS sw`` the same with ``line_search_fn='strong_wolfe'``.

Reported per problem: the objective (``f - f*`` where ``f*`` is known) at ¼, ½ and 1× the
budget, each as a ratio to the better L-BFGS's at the same time; the time to reach the better
L-BFGS's ½-budget value over that L-BFGS's; and for HF the step statuses (why it stopped), λ's
path, ρ, CG iterations and CG stop reasons.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseenfb.py [problem ...] \
        [--budget S] [--seed N]

Problems: logreg, lsq, pinn, deeplin, tanhsum, gelu64, mf.
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _unseen import Run, interleave, time_to  # noqa: E402

import hessfree  # noqa: E402
import hessfree._damping_control

torch.set_num_threads(1)

#: ``--contenders "HF lo[tag]"``: HF with these settings beside the defaults (diagnosis only)
VARIANTS: dict[str, dict] = {
    "pN": {"precond": None},
    "cg50": {"cg_max_iter": 50},
    "mart": {"precond": "martens"},
    "lam1": {"damping": 1.0},
    "f32floor": {},  # min_damping='auto' at float32's share in any dtype (main before unseenfb)
}


@dataclass
class Problem:
    """``model``: initial weights; ``loss_of(model)``: the objective (full batch);
    ``lo_of(model)``: the ``(loss, outputs)`` closure body, or None; ``f_star``: optimum."""

    title: str
    model: nn.Module
    loss_of: Callable[[nn.Module], torch.Tensor]
    lo_of: Callable[[nn.Module], Any] | None = None
    f_star: float | None = None


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------


def p_logreg(seed: int) -> Problem:
    """L2-regularised multinomial logistic regression, synthetic correlated features (float32),
    5,000 × 100, 10 classes; convex, f* from scipy in float64."""
    import scipy.optimize

    g = torch.Generator().manual_seed(seed)
    n, d, k, c = 5000, 100, 10, 1e-3
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)  # correlated, κ ~ 1e4
    x = torch.randn(n, d, generator=g) @ mix.T
    w_true = torch.randn(d, k, generator=g)
    y = (x @ w_true + 0.5 * torch.randn(n, k, generator=g)).argmax(1)
    model = nn.Linear(d, k)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()

    def loss_of(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y) + 0.5 * c * (m.weight**2).sum()

    def lo_of(m: nn.Module) -> Any:
        out = m(x)
        return nn.functional.cross_entropy(out, y) + 0.5 * c * (m.weight**2).sum(), out

    x64 = x.double()

    def fg(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(theta, requires_grad=True)
        w, b = t[: d * k].view(k, d), t[d * k :]
        f = nn.functional.cross_entropy(x64 @ w.T + b, y) + 0.5 * c * (w * w).sum()
        (gr,) = torch.autograd.grad(f, t)
        return f.item(), gr.numpy()

    res = scipy.optimize.minimize(
        fg, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
        options=dict(maxiter=50000, ftol=1e-16, gtol=1e-12),
    )  # fmt: skip
    return Problem(
        "multinomial logistic regression, 5000×100 correlated features, 10 classes, L2 1e-3, f32",
        model, loss_of, lo_of, float(res.fun),
    )  # fmt: skip


def p_lsq(seed: int) -> Problem:
    """Polynomial-feature least squares, unnormalised (features up to ~1e3): degree 6 in 3
    inputs on [0, 3], float64; f* from numpy's lstsq."""
    g = torch.Generator().manual_seed(seed)
    n = 2000
    u = 3 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    cols = [u[:, i] ** p for i in range(3) for p in range(1, 7)]
    cols += [u[:, 0] * u[:, 1], u[:, 1] * u[:, 2], (u[:, 0] * u[:, 2]) ** 2]
    x = torch.stack(cols, 1)  # largest column 3^6 = 729
    y = (torch.sin(u).sum(1) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))[:, None]
    model = nn.Linear(x.shape[1], 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()

    def loss_of(m: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(m(x), y)

    def lo_of(m: nn.Module) -> Any:
        out = m(x)
        return nn.functional.mse_loss(out, y), out

    a = np.hstack([x.numpy(), np.ones((n, 1))])
    sol, *_ = np.linalg.lstsq(a, y.numpy(), rcond=None)
    f_star = float(np.mean((a @ sol - y.numpy()) ** 2))
    return Problem(
        f"polynomial least squares, {n}×{x.shape[1]} raw features (max 729), f64",
        model, loss_of, lo_of, f_star,
    )  # fmt: skip


def p_pinn(seed: int) -> Problem:
    """Poisson PINN from scratch (no Adam phase), 12×12 grid, 2-16-16-1 tanh, float64."""
    import pinn

    torch.manual_seed(seed)
    prob = pinn.poisson(12, 16)
    model = prob.make_net()

    def loss_of(m: nn.Module) -> torch.Tensor:
        return prob.closure_for(m)()[0]

    def lo_of(m: nn.Module) -> Any:
        return prob.closure_for(m)()

    return Problem("Poisson PINN from scratch, 12×12, 2-16-16-1 tanh, f64", model, loss_of, lo_of)


def p_deeplin(seed: int) -> Problem:
    """Deep linear network 20-20-20-20-20-10 (no biases) fitting a linear map, MSE, float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, 20, generator=g)
    target = torch.randn(20, 10, generator=g) / math.sqrt(20)
    y = x @ target
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(20, 20, bias=False) for _ in range(4)])
    model.append(nn.Linear(20, 10, bias=False))

    def loss_of(m: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(m(x), y)

    def lo_of(m: nn.Module) -> Any:
        out = m(x)
        return nn.functional.mse_loss(out, y), out

    return Problem("deep linear net 20⁴-10, 5 layers, 2000 cases, f32", model, loss_of, lo_of, 0.0)


def p_tanhsum(seed: int) -> Problem:
    """tanh MLP 10-64-64-5 classifier on 10⁴ synthetic cases, cross-entropy reduction='sum'."""
    g = torch.Generator().manual_seed(seed)
    n = 10_000
    x = torch.randn(n, 10, generator=g)
    teacher = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 5))
    torch.manual_seed(seed + 100)
    for p in teacher.parameters():
        nn.init.normal_(p, std=1.0)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 5))  # fmt: skip

    def loss_of(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y, reduction="sum")

    def lo_of(m: nn.Module) -> Any:
        out = m(x)
        return nn.functional.cross_entropy(out, y, reduction="sum"), out

    return Problem("tanh MLP 10-64-64-5, 10⁴ cases, CE reduction='sum', f32", model, loss_of,
                   lo_of)  # fmt: skip


def p_gelu64(seed: int) -> Problem:
    """GELU/softplus regression MLP 4-32-32-1 on 3,000 points of a smooth function, float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3000, 4, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:2]) + x[:, 2:3] * x[:, 3:4] ** 2
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 32), nn.GELU(), nn.Linear(32, 32), nn.Softplus(),
                          nn.Linear(32, 1)).double()  # fmt: skip

    def loss_of(m: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(m(x), y)

    def lo_of(m: nn.Module) -> Any:
        out = m(x)
        return nn.functional.mse_loss(out, y), out

    return Problem("GELU/softplus regression MLP 4-32-32-1, 3000 points, f64", model, loss_of,
                   lo_of)  # fmt: skip


class Factors(nn.Module):
    def __init__(self, m: int, n: int, r: int) -> None:
        super().__init__()
        self.u = nn.Parameter(0.1 * torch.randn(m, r))
        self.v = nn.Parameter(0.1 * torch.randn(n, r))


def p_mf(seed: int) -> Problem:
    """Matrix completion by factorisation (nonconvex): rank-5 200×150 matrix, 30 % observed,
    squared error on the observed entries + 1e-4 ‖U‖² + ‖V‖², float32; the loss-only closure
    (no outputs: a user's objective that is not a loss of a model's outputs)."""
    g = torch.Generator().manual_seed(seed)
    m, n, r = 200, 150, 5
    truth = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    mask = torch.rand(m, n, generator=g) < 0.3
    torch.manual_seed(seed)
    model = Factors(m, n, r)

    def loss_of(f: nn.Module) -> torch.Tensor:
        resid = (f.u @ f.v.T - truth)[mask]
        return 0.5 * (resid**2).mean() + 1e-4 * ((f.u**2).sum() + (f.v**2).sum())

    return Problem("matrix completion U Vᵀ, 200×150 rank 5, 30 % seen, f32", model, loss_of)


PROBLEMS: dict[str, Callable[[int], Problem]] = {
    "logreg": p_logreg,
    "lsq": p_lsq,
    "pinn": p_pinn,
    "deeplin": p_deeplin,
    "tanhsum": p_tanhsum,
    "gelu64": p_gelu64,
    "mf": p_mf,
}

# ---------------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------------


def _kind(name: str) -> str:
    """The closure a contender uses: 'lo' (loss, outputs), 'loss' (loss only) or 'lbfgs'."""
    words = re.sub(r"\[.*\]", "", name).split()
    return words[1] if words[0] == "HF" and len(words) > 1 else "lbfgs"


def make_run(name: str, prob: Problem, hf_kwargs: dict | None = None) -> Run:
    model = copy.deepcopy(prob.model)
    params = [p for p in model.parameters() if p.requires_grad]
    tag = re.search(r"\[(.*)\]", name)
    if tag:
        hf_kwargs = {**(hf_kwargs or {}), **VARIANTS[tag.group(1)]}
    if name.startswith("HF"):
        opt: torch.optim.Optimizer = hessfree.HessianFree(params, **(hf_kwargs or {}))
    else:
        sw = "strong_wolfe" if name.endswith("sw") else None
        opt = torch.optim.LBFGS(params, line_search_fn=sw)
    kind = _kind(name)

    if kind == "lo":

        def closure() -> Any:
            return prob.lo_of(model)

    elif kind == "loss":

        def closure() -> Any:
            return prob.loss_of(model)

    else:

        def closure() -> Any:
            opt.zero_grad()
            loss = prob.loss_of(model)
            loss.backward()
            return loss

    def evaluate() -> float:
        with torch.enable_grad():  # the PINN's loss differentiates the net in x
            return prob.loss_of(model).item()

    def step() -> Any:
        if tag and tag.group(1) == "f32floor":
            share = hessfree._damping_control._precision_share
            hessfree._damping_control._precision_share = lambda dtype: 1.0
            try:
                return opt.step(closure)
            finally:
                hessfree._damping_control._precision_share = share
        return opt.step(closure)

    return Run(name, step, evaluate, opt)


def value_at(curve: list[tuple[float, float]], t: float) -> float:
    """The last evaluated objective at or before own-clock time ``t``."""
    v = curve[0][1]
    for s, f in curve:
        if s <= t:
            v = f
    return v


def hf_notes(r: Run) -> str:
    infos = r.infos
    if not infos:
        return ""
    st = collections.Counter(
        str(i.status) + (f"/{i.converged_by}" if i.converged_by is not None else "") for i in infos
    )
    lam = [i.damping for i in infos if math.isfinite(i.damping)]
    rho = [i.rho for i in infos if math.isfinite(i.rho)]
    cg = [i.cg_iters for i in infos]
    reasons = collections.Counter(str(i.cg_reason) for i in infos if i.cg_reason)
    k = max(1, len(lam) // 4)
    lam_path = "→".join(f"{x:.1e}" for x in lam[::k][:5] + lam[-1:])
    return (
        f"statuses {dict(st)}; λ {lam_path}; "
        f"ρ med {statistics.median(rho) if rho else math.nan:.2f}"
        f"; CG med {statistics.median(cg):.0f} max {max(cg)}; CG stops {dict(reasons)}"
    )


def run_problem(
    key: str, seed: int, budget: float, contenders: list[str], hf_kwargs: dict | None = None
) -> dict:
    prob = PROBLEMS[key](seed)
    names = [c for c in contenders if not (_kind(c) == "lo" and prob.lo_of is None)]
    runs = [make_run(n, prob, hf_kwargs if n.startswith("HF") else None) for n in names]
    interleave(runs, budget, eval_every=budget / 60)
    off = prob.f_star if prob.f_star is not None else 0.0
    lb = [r for r in runs if r.name.startswith("LBFGS")]
    out = {"title": prob.title, "rows": {}}
    fracs = (0.25, 0.5, 1.0)
    for r in runs:
        vals = [value_at(r.curve, f * budget) - off for f in fracs]
        refs = [min(value_at(b.curve, f * budget) - off for b in lb) for f in fracs]
        best = min(lb, key=lambda b: value_at(b.curve, budget / 2))
        target = value_at(best.curve, budget / 2)
        t_ref = time_to(best.curve, target)
        tt = time_to(r.curve, target) / t_ref if t_ref > 0 else math.nan
        out["rows"][r.name] = dict(
            steps=r.steps, vals=vals,
            ratios=[v / max(rf, 1e-300) for v, rf in zip(vals, refs, strict=True)],
            tt=tt, notes="; ".join(x for x in (r.failed, hf_notes(r)) if x),
            warns=sorted(set(r.warns))[:3],
        )  # fmt: skip
    return out


def print_table(key: str, seed: int, res: dict, budget: float) -> None:
    print(f"\n#### {key} (seed {seed}, {budget:g} s each): {res['title']}\n")
    print("| run | steps | f−f* at ¼ / ½ / 1 | ratio to best L-BFGS at ¼ / ½ / 1 | t to L-BFGS's ½ "
          "/ its | HF diagnostics |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, row in res["rows"].items():
        v = " / ".join(f"{x:.3g}" for x in row["vals"])
        q = " / ".join(f"{x:.3g}" for x in row["ratios"])
        notes = row["notes"] + (" warnings: " + " | ".join(row["warns"]) if row["warns"] else "")
        print(f"| {name} | {row['steps']} | {v} | {q} | {row['tt']:.3g} | {notes} |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(PROBLEMS))
    ap.add_argument("--budget", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--contenders", default="HF,HF lo,HF loss,LBFGS,LBFGS sw")
    args = ap.parse_args()
    contenders = args.contenders.split(",")
    print(f"load at start: {open('/proc/loadavg').read().strip()}")
    for key in args.problems:
        cs = [c for c in contenders if _kind(c) != "loss" or key == "mf"]
        res = run_problem(key, args.seed, args.budget, cs)
        print_table(key, args.seed, res, args.budget)
    print(f"\nload at end: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
