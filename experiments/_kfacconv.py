"""K-FAC on convolution layers (KFC) under ``precond='auto'``: does it help CNNs?

``HessianFree(params)`` (no arguments, ``precond='auto'``) with ``_AUTO_KFAC_CONV`` on (auto's
K-FAC takes ``nn.Conv2d`` layers, and counts them toward its 50 % coverage gate) against off
(main's behaviour: ``nn.Linear`` layers only; ``--precond kfac``: the same for
``precond='kfac'`` and ``_KFAC_CONV``), from the same weights on the same batch
sequence, interleaved in one process at equal CPU time (``time.process_time``, 1 thread): the
contender with the least CPU time so far takes the next step. Evaluation (full train-set
loss, eval mode) is off the clock. Problems: ``cnn`` (``_unseen.py``'s, as in "cnnmb": 2 conv
+ linear head, batch 100), ``cnnbn`` (``_unseenmb.py``'s conv-BN-ReLU-pool ×2, batch 64),
``lenet`` (conv-tanh-avgpool, conv-tanh, 64-32-10 head, batch 100), all on digits 8×8.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_kfacconv.py \
        [--problems cnn,cnnbn,lenet] [--seeds 1,2,3] [--budget 8] [--precond kfac] [--ratios]

``--ratios``: off the clock, per layer vᵀCv / vᵀ(G⊗A)v (exact GGN against K-FAC's factors of
the same batch) along the gradient's block and a Gaussian one (:func:`curvature_ratios`).
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
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _unseen  # noqa: E402
import _unseenmb  # noqa: E402

import hessfree  # noqa: E402
import hessfree._precond_choice as precond_choice  # noqa: E402

torch.set_num_threads(1)


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 3), nn.Tanh(), nn.Flatten(),
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10),
    )  # fmt: skip


def problem(name: str) -> tuple:
    """(make, x, y, batch) for a problem; cross-entropy throughout."""
    if name == "cnnbn":
        p = _unseenmb.cnnbn()
        x, y, _, _ = p["data"]
        return p["make"], x, y, p["batch"]
    x, y, _, _ = _unseen.digits()
    return {"cnn": _unseen.cnn, "lenet": lenet}[name], x, y, 100


@contextlib.contextmanager
def conv_in_auto(on: bool):
    """``precond='auto'``'s and ``'kfac'``'s K-FAC with convolutions (on) or without (main's)."""
    saved = precond_choice._AUTO_KFAC_CONV, precond_choice._KFAC_CONV
    precond_choice._AUTO_KFAC_CONV = precond_choice._KFAC_CONV = on
    try:
        yield
    finally:
        precond_choice._AUTO_KFAC_CONV, precond_choice._KFAC_CONV = saved


class Run:
    def __init__(
        self, name: str, conv: bool, model: nn.Module, x, y, batch: int, seed: int, precond="auto"
    ):
        self.name, self.conv, self.model = name, conv, model
        self.x, self.y, self.batch = x, y, batch
        self.opt = hessfree.HessianFree(model.parameters(), precond=precond)
        self.gen = torch.Generator().manual_seed(seed)
        self.cpu = 0.0
        self.steps = 0
        self.curve: list[tuple[float, float]] = []
        self.infos: list = []
        self.warns: set[str] = set()

    def step(self) -> None:
        idx = torch.randint(len(self.y), (self.batch,), generator=self.gen)
        xb, yb = self.x[idx], self.y[idx]

        def closure():
            out = self.model(xb)
            return nn.functional.cross_entropy(out, yb), out

        with conv_in_auto(self.conv), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.process_time()
            self.opt.step(closure)
            self.cpu += time.process_time() - t0
        self.warns |= {str(w.message)[:100] for w in caught}
        self.steps += 1
        self.infos.append(self.opt.last_step)

    def evaluate(self) -> None:
        f = _unseen.train_set_loss(self.model, nn.functional.cross_entropy, self.x, self.y)
        self.curve.append((self.cpu, f))

    def kfac_layers(self) -> str:
        k = self.opt._auto_precond if self.opt.precond == "auto" else self.opt.precond
        if not isinstance(k, hessfree.KFACPreconditioner) or self.opt._auto_kfac_off:
            return "none"
        return "+".join(m.kind for m in k.layers)


def time_to(curve, target: float) -> float:
    return next((t for t, f in curve if f <= target), math.inf)


def race(name: str, seed: int, budget: float, every: float, precond: str = "auto") -> dict:
    make, x, y, batch = problem(name)
    torch.manual_seed(seed)
    model0 = make()
    runs = [
        Run("main (linear only)", False, copy.deepcopy(model0), x, y, batch, seed, precond),
        Run("conv K-FAC", True, copy.deepcopy(model0), x, y, batch, seed, precond),
    ]
    load0 = os.getloadavg()[0]
    wall0 = time.perf_counter()
    for r in runs:
        r.evaluate()
    due = {r.name: every for r in runs}
    while True:
        live = [r for r in runs if r.cpu < budget]
        if not live:
            break
        r = min(live, key=lambda r: r.cpu)
        r.step()
        if r.cpu >= due[r.name] or r.cpu >= budget:
            due[r.name] = r.cpu + every
            r.evaluate()
    load1 = os.getloadavg()[0]
    main, conv = runs
    f_main, f_conv = main.curve[-1][1], conv.curve[-1][1]
    half = next(f for t, f in main.curve if t >= budget / 2)
    t_main, t_conv = time_to(main.curve, half), time_to(conv.curve, half)
    print(
        f"| {name} | {seed} | {f_main:.4g} | {f_conv:.4g} | {f_conv / f_main:.3g} | "
        f"{t_conv / t_main:.3g} | {time_to(conv.curve, f_main) / main.curve[-1][0]:.3g} | "
        f"{main.steps} / {conv.steps} | "
        f"{main.cpu / main.steps * 1e3:.1f} / {conv.cpu / conv.steps * 1e3:.1f} | "
        f"{statistics.median(i.cg_iters for i in main.infos):.0f} / "
        f"{statistics.median(i.cg_iters for i in conv.infos):.0f} | "
        f"{sum(not i.accepted for i in main.infos)} / {sum(not i.accepted for i in conv.infos)} | "
        f"{main.kfac_layers()} / {conv.kfac_layers()} | "
        f"{load0:.1f} → {load1:.1f} | {time.perf_counter() - wall0:.0f} |"
        + (f" warnings: {sorted(main.warns | conv.warns)}" if main.warns | conv.warns else "")
    )
    sys.stdout.flush()
    return dict(problem=name, seed=seed, ratio=f_conv / f_main, curves=(main.curve, conv.curve))


def curvature_ratios(name: str, seed: int = 1, warm: int = 100) -> None:
    """Off the clock: per layer, vᵀCv / vᵀ(G⊗A)v for the exact GGN C of one batch of 100 and
    K-FAC's factors of the same batch (exact expectation, no floor, no average), along the
    gradient's block and a Gaussian direction, at the initial weights and after ``warm`` steps
    of main's ``'auto'``. Above 1: K-FAC (KFC's spatially uncorrelated derivatives for a
    convolution) underestimates the curvature there, and its step overshoots."""
    make, x, y, batch = problem(name)
    torch.manual_seed(seed)
    model = make()
    run = Run("main", False, model, x, y, batch, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for phase in ("init", f"after {warm} steps"):
        if phase != "init":
            for _ in range(warm):
                run.step()
        idx = torch.randint(len(y), (100,), generator=gen)
        K = hessfree.KFACPreconditioner(
            model, num_probes=None, relative_damping=0.0, rank=None, decay=0.0
        )
        out = model(x[idx])
        loss = nn.functional.cross_entropy(out, y[idx])
        params = [p for p in model.parameters() if p.requires_grad]
        P = hessfree.GGNProduct(loss, out, params)
        ctx = hessfree.PrecondContext(
            jacobian=P.jacobian, output_grad=P.output_grad, reduction="mean", damping=1.0,
            shift=0.0, generator=torch.Generator().manual_seed(0), loss_hessian=P.loss_hessian,
        )  # fmt: skip
        K(ctx)
        K.remove()
        g = torch.cat([q.reshape(-1) for q in torch.autograd.grad(loss, params, retain_graph=True)])
        offsets, o = {}, 0
        for q in params:
            offsets[id(q)] = (o, o + q.numel())
            o += q.numel()
        cells = []
        for layer, (A, G) in zip(K.layers, K.factors, strict=True):
            ratios = []
            for kind in ("grad", "gauss"):
                v = torch.zeros_like(g)
                parts = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
                for q in parts:
                    a, b = offsets[id(q)]
                    v[a:b] = g[a:b] if kind == "grad" else torch.randn(b - a, generator=gen)
                a, b = offsets[id(layer.weight)]
                V = v[a:b].view(layer.weight.shape[0], -1)
                if layer.bias is not None:
                    a2, b2 = offsets[id(layer.bias)]
                    V = torch.cat([V, v[a2:b2].view(-1, 1)], 1)
                kron = float(((G @ V @ A) * V).sum())
                ratios.append(float(v @ P(v)) / kron)
            cells.append(f"{type(layer).__name__}: {ratios[0]:.3g} / {ratios[1]:.3g}")
        print(f"| {name} | {phase} | " + "; ".join(cells) + " |")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", action="store_true", help="curvature_ratios instead of races")
    ap.add_argument("--problems", default="cnn,cnnbn,lenet")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--budget", type=float, default=8.0)
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--precond", default="auto", help="auto, or kfac: precond='kfac' both")
    a = ap.parse_args()
    if a.ratios:
        print("| problem | weights | vᵀCv / vᵀ(G⊗A)v per layer: along the gradient / Gaussian |")
        print("|---|---|---|")
        for name in a.problems.split(","):
            curvature_ratios(name)
        return
    print(
        f"hessfree from {hessfree.__file__}; precond={a.precond!r}; budget {a.budget:g} s CPU "
        "each, 1 thread\n"
    )
    print(
        "| problem | seed | main final loss | conv final loss | conv / main | t to main's loss "
        "at ½ (conv / main) | t to main's final (conv, share of budget) | steps main / conv | "
        "ms CPU/step | CG med | rejected | K-FAC layers main / conv | load | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in a.problems.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            results.append(race(name, seed, a.budget, a.every, a.precond))
    print("\n| problem | geometric mean of conv / main final loss | worst |")
    print("|---|---|---|")
    logs = []
    for name in a.problems.split(","):
        rs = [r["ratio"] for r in results if r["problem"] == name]
        logs += [math.log(r) for r in rs]
        gm = math.exp(sum(math.log(r) for r in rs) / len(rs))
        print(f"| {name} | {gm:.3g} | {max(rs):.3g} |")
    print(f"| all | {math.exp(sum(logs) / len(logs)):.3g} | |")


if __name__ == "__main__":
    main()
