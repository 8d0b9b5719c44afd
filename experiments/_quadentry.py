"""The local (Newton) phase only for a quadratic outer loss (topic "quadentry"; rule (d) of
"newtonexit").

The library's rule (this branch, ``quad``): the phase's streak also needs :math:`H_\\ell u`,
for one fixed random output-space :math:`u`, to have changed by no more than rounding (64 ε,
relative, max-norm) since the previous step where it was measured (0 for a sum of squares);
``exact`` allows no change at all, ``tol2e-2`` a relative change up to 2e-2 a step;
``main`` is the same class with the test switched off (the rule on main); ``no-phase`` has no
local phase at all.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_quadentry.py probe
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_quadentry.py race PROBLEM \\
        [--seeds 0,1,2] [--seconds 4,12] [--variants main,quad,no-phase]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_quadentry.py same PROBLEM \\
        [--seeds 0,1,2] [--steps N] [--seconds S] [--pair main,quad]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_quadentry.py change PROBLEM \\
        [--seeds S] [--steps N]

``probe``: the detector's verdict on losses known to be quadratic in the outputs or not, at two
random output points (the oracle is the loss's formula). ``race``: ``_newtonexit.race`` (1
thread, contenders interleaved one step each from the same weights, CPU =
``time.process_time`` of each contender's own steps). ``same``: ``main`` and ``quad`` from the
same weights for N steps (or S CPU seconds of ``main``): the step the phase began, the final
gap, and whether the parameters are bitwise equal after every step. ``change``: per step of
main's rule, the relative max-norm change of H_ℓu since the previous step. PROBLEM: gnentry's
``smallres``, ``interp``, ``sine``; unseen5's families (``deconv``, ``twohead``, ``mdn``,
``tiedlm``, ...); ``tinybce``, ``tinyce``, ``tinymse`` (:class:`Tiny`); ``pinn:KEY``
(``_pinn3.MAKERS``: poisson, reaction, helmholtz, burgers, allen; the ``(loss, residual
blocks)`` closure, HF from the initial weights).
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _newtonexit as N  # noqa: E402

import hessfree._damping_control as damping_control  # noqa: E402
import hessfree.optimizer as O  # noqa: E402
from hessfree import GGNProduct  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")

# the rule is in the library, switched off (HessianFree._quad_entry; lead, at the merge)
N.VARIANTS["quad"] = {"_quad_entry": True}
N.VARIANTS["exact"] = {"_quad_entry": True, "_loss_change_max": 0.0}  # H_ℓu bitwise the same
# a relative change ≤ 2e-2 a step allowed
N.VARIANTS["tol2e-2"] = {"_quad_entry": True, "_loss_change_max": 2e-2}
N.VARIANTS["main"] = {}  # the library's default: no loss test


class Tiny:
    """``tinybce``/``tinyce``/``tinymse``: a 3-6-4 tanh MLP (float64) fitted to a same-architecture
    teacher on 64 inputs: BCE against σ(teacher), cross-entropy against softmax(teacher), or
    MSE against the teacher; realizable, so the gap is the loss minus its closed-form floor
    (the targets' entropy; 0 for MSE)."""

    def __init__(self, key: str, seed: int) -> None:
        self.key, self.seed = key, seed
        torch.manual_seed(seed)
        teacher, self.model = self.net(), self.net()
        self.x = torch.randn(
            64, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        with torch.no_grad():
            t = teacher(self.x)
        if key == "tinybce":
            self.y = torch.sigmoid(t)
            self.loss = F.binary_cross_entropy_with_logits
            self.floor = float(F.binary_cross_entropy(self.y, self.y))
        elif key == "tinyce":
            self.y = torch.softmax(t, 1)
            self.loss = F.cross_entropy
            self.floor = float(-(self.y * self.y.log()).sum(1).mean())
        else:
            self.y, self.loss, self.floor = t, F.mse_loss, 0.0

    @staticmethod
    def net() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)
        ).double()

    def gap(self, m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(self.loss(m(self.x), self.y)) - self.floor


_Problem = N.Problem
N.Problem = lambda key, seed: Tiny(key, seed) if key.startswith("tiny") else _Problem(key, seed)


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


# ------------------------------------------------------------------------------------------
# probe: the detector against losses whose quadratic-ness is known
# ------------------------------------------------------------------------------------------
def probe() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64)
    cls = torch.randint(0, 3, (8,))

    def mixture(o):  # 1-D Gaussian mixture NLL: the components are the output columns
        return -torch.logsumexp(-0.5 * (y[:, :1] - o) ** 2, 1).mean()

    losses = {  # name: (loss(o), quadratic?)
        "mse_loss": (lambda o: F.mse_loss(o, y), True),
        "mse_loss sum / 8": (lambda o: F.mse_loss(o, y, reduction="sum") / 8, True),
        "(o - y).pow(2).mean()": (lambda o: (o - y).pow(2).mean(), True),
        "weighted squares + cross term": (
            lambda o: (3 * (o - y) ** 2).sum() + (o[:, 0] * o[:, 1]).mean(),
            True,
        ),
        "cross_entropy": (lambda o: F.cross_entropy(o, cls), False),
        "bce_with_logits (soft)": (
            lambda o: F.binary_cross_entropy_with_logits(o, torch.sigmoid(y)),
            False,
        ),
        "smooth_l1 (beta 1)": (lambda o: F.smooth_l1_loss(o, y), False),
        "huber (delta 0.5)": (lambda o: F.huber_loss(o, y, delta=0.5), False),
        "mixture NLL": (mixture, False),
        "(o - y).pow(4).mean()": (lambda o: (o - y).pow(4).mean(), False),
    }
    print(f"## probe (load {load()})\n")
    tau = damping_control._PROBE_ULPS * torch.finfo(torch.float64).eps
    print("| loss | quadratic (formula) | change of H_l u between two points | detector | agree |")
    print("|---|---|---|---|---|")
    for name, (fn, quad) in losses.items():
        sigs = []
        for s in (1, 2):
            x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
            p = w.clone().requires_grad_()
            out = x @ p
            sigs.append(damping_control._loss_probe(GGNProduct(fn(out), out, [p])))
        change = damping_control._probe_change(*sigs)
        same = change <= tau
        print(
            f"| {name} | {quad} | {change:.2g} | {same} | {'yes' if same == quad else '**NO**'} |"
        )
    print()


# ------------------------------------------------------------------------------------------
# same: main's rule against this branch's, step by step
# ------------------------------------------------------------------------------------------
class Pinn:
    def __init__(self, key: str, seed: int) -> None:
        import _pinn3

        self.key, self.seed = key, seed
        self.prob = _pinn3.MAKERS[key]()
        torch.manual_seed(seed)
        self.model = self.prob.make_net()

    def closure_for(self, m: torch.nn.Module):  # noqa: ANN201
        return self.prob.closure_for(m)

    def gap(self, m: torch.nn.Module) -> float:
        return float(self.prob.closure_for(m)()[0].detach())


def _closure(prob, m):  # noqa: ANN001, ANN202
    if isinstance(prob, Pinn):
        return prob.closure_for(m)

    def closure():
        o = m(prob.x)
        return prob.loss(o, prob.y), o

    return closure


def same(key: str, seeds: list[int], steps: int, seconds: float, pair: list[str]) -> None:
    print(f"## same {key}: {' and '.join(pair)}, {steps} steps or {seconds} CPU s\n")
    a, b = pair
    print(
        f"| seed | steps | phase from ({a}) | phase from ({b}) | gap {a} | gap {b} "
        f"| bitwise equal | CPU {a} | CPU {b} |"
    )
    print("|---" * 9 + "|")
    for seed in seeds:
        prob = Pinn(key[5:], seed) if key.startswith("pinn:") else N.Problem(key, seed)
        models = [copy.deepcopy(prob.model) for _ in range(2)]
        opts = [N.make_opt(m, v) for m, v in zip(models, pair, strict=True)]
        closures = [_closure(prob, m) for m in models]
        since, cpu, equal, k = [None, None], [0.0, 0.0], True, 0
        load0 = load()
        while k < steps and cpu[0] < seconds:
            for i in range(2):
                c0 = time.process_time()
                try:
                    opts[i].step(closures[i])
                except Exception as e:  # noqa: BLE001
                    print(f"seed {seed} contender {i} failed at step {k}: {e!r}")
                    return
                cpu[i] += time.process_time() - c0
                if since[i] is None and opts[i]._global_state().get("newton"):
                    since[i] = k
            pa = torch.cat([p.detach().flatten() for p in models[0].parameters()])
            pb = torch.cat([p.detach().flatten() for p in models[1].parameters()])
            equal = equal and torch.equal(pa, pb)
            k += 1
        print(
            f"| {seed} | {k} | {since[0]} | {since[1]} | {prob.gap(models[0]):.4g} "
            f"| {prob.gap(models[1]):.4g} | {equal} | {cpu[0]:.2f} | {cpu[1]:.2f} |",
            flush=True,
        )
    print(f"\nload {load0} -> {load()}\n")


# ------------------------------------------------------------------------------------------
# change: how far H_ℓu moves per step under main's rule
# ------------------------------------------------------------------------------------------
class _Change(O.HessianFree):
    """main's rule, recording the relative max-norm change of H_ℓu between consecutive steps
    (measured at every step, in the phase too)."""

    change = math.nan

    def _loss_quadratic(self, run):  # noqa: ANN001, ANN202
        return True

    def _solve(self, curvature, product, evaluation, g, run, closure):  # noqa: ANN001, ANN202
        out = super()._solve(curvature, product, evaluation, g, run, closure)
        probe = damping_control._loss_probe(product)
        before, self._seen = getattr(self, "_seen", None), probe
        if probe is not None and before is not None:
            self.change = damping_control._probe_change(before, probe)
        return out


def change(key: str, seed: int, steps: int) -> None:
    prob = N.Problem(key, seed)
    m = copy.deepcopy(prob.model)
    opt = _Change(m.parameters())
    closure = _closure(prob, m)
    print(f"## change {key} seed {seed}, main's rule; load {load()}\n")
    print("| k | gap | ρ | rate | CG | change of H_ℓu | phase |")
    print("|---" * 7 + "|")
    for k in range(steps):
        opt.step(closure)
        i = opt.last_step
        on = "on" if opt._global_state().get("newton") else ""
        print(
            f"| {k} | {prob.gap(m):.3e} | {i.rho:.3f} | {i.step_rate:.2g} | {i.cg_iters} "
            f"| {opt.change:.2e} | {on} |",
            flush=True,
        )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["probe", "race", "same", "change"])
    ap.add_argument("problem", nargs="?", default="")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seconds", default="4,12")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--variants", default="main,quad,no-phase")
    ap.add_argument("--pair", default="main,quad", help="same: the two variants compared")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.what == "probe":
        probe()
    elif a.what == "change":
        change(a.problem, seeds[0], a.steps)
    elif a.what == "same":
        same(
            a.problem,
            seeds,
            a.steps,
            max(float(s) for s in a.seconds.split(",")),
            a.pair.split(","),
        )
    else:
        budgets = [float(s) for s in a.seconds.split(",")]
        N.race(a.problem, seeds, budgets, a.variants.split(","), False)


if __name__ == "__main__":
    main()
