"""K-FAC-preconditioned HF (#14): variants on CURVES, the MNIST-autoencoder architecture on real
digit images, and the digits MLP, each interleaved at equal wall-clock (1 torch thread).

``curves``: the scorecard's quick CURVES task (1,000 images), Adam lr 3e-3 b 100 as the
reference; HF 250/62 with at most 5 CG iterations and ``KFACPreconditioner(model, rank=32)``
(``new``, the kept setting), against variants: factors and eigenbasis refreshed every k steps
(``r2``, ``r3``), the eigenbasis alone every k steps with the factors' running average still
updated every step (``inv2``, ``inv3``, K-FAC's own schedule), two subspace-iteration steps per
refresh (``it2``), an exact ``eigh`` per refresh (``eigh``), the empirical Fisher's output-side
factor (the per-example output gradients that the curvature set-up's backward pass already
back-propagates, ``emp``: free statistics) and no preconditioner at cg≤10 (``plain``).

``ae``: ``configs/mnist_autoencoder.yaml``'s model (784-1000-500-250-30 and its mirror, sigmoid,
sparse init, BCE summed per case, L2 2e-5) on scikit-learn's 1,797 digits upsampled from 8×8 to
28×28 (no MNIST on the machine; real handwriting, not MNIST), Adam at the config's lr 1e-3 b 200
and lr 3e-3 b 100 against HF with and without K-FAC.

``digits``: the scorecard's digits MLP (64-100-10 tanh), HF with and without K-FAC (dense
factors) against L-BFGS (time to 100 % training accuracy) and Adam (time to its losses).

Usage::

    python experiments/_kfac_study.py curves 15 [variants,...]   # ~100 s per 5 variants
    python experiments/_kfac_study.py ae 40                      # ~4.5 min
    python experiments/_kfac_study.py digits 6                   # ~1 min
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402

from hessfree import KFACPreconditioner  # noqa: E402


class Empirical(KFACPreconditioner):
    """G from the output gradients (the empirical Fisher), as the set-up pass has them."""

    def _probes(self, ctx, outputs):
        return super()._probes(dataclasses.replace(ctx, loss_hessian=None), outputs)


class TwoIterations(KFACPreconditioner):
    """Two subspace-iteration steps per refresh for the truncated factors."""

    def _eigen(self, factor, previous=None):
        first = super()._eigen(factor, previous)
        return super()._eigen(factor, first) if first[2] is not None else first


class Eigh(KFACPreconditioner):
    """An exact eigendecomposition per refresh (then truncated)."""

    def _eigen(self, factor, previous=None):
        return super()._eigen(factor, None)


class InverseEvery(KFACPreconditioner):
    """Factors averaged every step, eigenbasis recomputed every ``k``-th."""

    k = 2

    def update(self, ctx):
        self._updates = getattr(self, "_updates", -1) + 1
        super().update(ctx)

    def _eigen(self, factor, previous=None):
        if previous is not None and self._updates % self.k:
            return previous
        return super()._eigen(factor, previous)


class InverseEvery3(InverseEvery):
    k = 3


def curves_variants() -> dict[str, tuple[type | None, dict]]:
    base = dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=5))
    K = KFACPreconditioner
    return {
        "new": (K, base | dict(kfac=dict(rank=32))),
        "r2": (K, base | dict(kfac=dict(rank=32, refresh=2))),
        "r3": (K, base | dict(kfac=dict(rank=32, refresh=3))),
        "inv2": (InverseEvery, base | dict(kfac=dict(rank=32))),
        "inv3": (InverseEvery3, base | dict(kfac=dict(rank=32))),
        "it2": (TwoIterations, base | dict(kfac=dict(rank=32))),
        "eigh": (Eigh, base | dict(kfac=dict(rank=32))),
        "emp": (Empirical, base | dict(kfac=dict(rank=32))),
        "plain": (None, dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=10))),
    }


def report(runs: list, ref: float, t0: float) -> None:
    print(f"load after {os.getloadavg()}, wall {time.time() - t0:.0f} s")
    for r in runs:
        e = sc.final_error(r)
        curve = " ".join(f"{v:.2f}" for _, v in r.curve[2::2])
        print(
            f"{r.name:30s} final {e:8.3f}  ratio {e / ref:.3f}  steps {r.steps:4d}  "
            f"{1e3 * r.clock / max(r.steps, 1):6.1f} ms/step  curve {curve}"
        )


def curves(budget: float, names: list[str]) -> None:
    task = sc.make_curves_task(True)
    runs = [sc.first_order_run(task, "Adam", 3e-3, 100)]
    for name, (cls, regime) in curves_variants().items():
        if names and name not in names:
            continue
        if cls is not None:
            sc.KFACPreconditioner = cls  # hf_run builds the preconditioner by this name
        runs.append(sc.hf_run(task, name, "HF", regime))
    sc.KFACPreconditioner = KFACPreconditioner
    t0 = time.time()
    sc.interleave(runs, task, budget, 10, "cpu")
    report(runs, sc.final_error(runs[0]), t0)


def autoencoder(budget: float) -> None:
    from hessfree.train.data import load_digits
    from hessfree.train.models import build_model

    ds = load_digits()
    x = torch.cat([ds.x_train, ds.x_test]).view(-1, 1, 8, 8)
    x = (x - x.amin()) / (x.amax() - x.amin())
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    n = len(x)
    torch.manual_seed(0)
    model = build_model(
        "autoencoder",
        input_shape=(1, 28, 28),
        layer_sizes=[784, 1000, 500, 250, 30],
        activation="sigmoid",
        init="sparse",
    )
    flat = x.flatten(1)

    @torch.no_grad()
    def sq_error(m: torch.nn.Module) -> float:
        return float((torch.sigmoid(m(x)) - flat).square().sum() / n)

    task = sc.Task(
        "ae", "digits AE", model, x, flat, sc.bce_sum_per_case, sq_error, "squared error",
        budget=budget, sweep_budget=0.0, adam=[], sgd=[], hf={},
    )  # fmt: skip
    wd = dict(weight_decay=2e-5)
    variants = {
        "HF 500/125 cg≤50": dict(batch=500, curvature_batch=125, kw=dict(cg_max_iter=50, **wd)),
        "HF 250/62 cg≤10": dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=10, **wd)),
        "HF 250/62 cg≤5 K-FAC r32": dict(
            batch=250, curvature_batch=62, kw=dict(cg_max_iter=5, **wd), kfac=dict(rank=32)
        ),
        "HF 500/125 cg≤10 K-FAC r32": dict(
            batch=500, curvature_batch=125, kw=dict(cg_max_iter=10, **wd), kfac=dict(rank=32)
        ),
    }
    runs = [
        sc.first_order_run(task, "Adam", 1e-3, 200),
        sc.first_order_run(task, "Adam", 3e-3, 100),
    ]
    runs += [sc.hf_run(task, k, "HF", v) for k, v in variants.items()]
    t0 = time.time()
    sc.interleave(runs, task, budget, 10, "cpu")
    report(runs, min(sc.final_error(r) for r in runs[:2]), t0)


def digits(budget: float) -> None:
    task = sc._classifier("digits", True)
    n = len(task.x)
    full = dict(batch=n, curvature_batch=n)
    variants = {
        "HF full cg≤50 λ0=1 (tuned)": full | dict(kw=dict(cg_max_iter=50, damping=1.0)),
        "HF full cg≤50 λ0=1 K-FAC": full
        | dict(kw=dict(cg_max_iter=50, damping=1.0), kfac=dict(rank=None)),
        "HF full cg≤10 λ0=1 K-FAC": full
        | dict(kw=dict(cg_max_iter=10, damping=1.0), kfac=dict(rank=None)),
        "HF full/¼ cg≤50 K-FAC": dict(
            batch=n, curvature_batch=n // 4, kw=dict(cg_max_iter=50), kfac=dict(rank=None)
        ),
        "HF 256/64 cg≤10": dict(batch=256, curvature_batch=64, kw=dict(cg_max_iter=10)),
        "HF 256/64 cg≤5 K-FAC": dict(
            batch=256, curvature_batch=64, kw=dict(cg_max_iter=5), kfac=dict(rank=None)
        ),
    }
    runs = [
        sc.lbfgs_run(task, "L-BFGS", dict(max_iter=20, history_size=20)),
        sc.first_order_run(task, "Adam", 1e-2, 100),
    ]
    runs += [sc.hf_run(task, k, "HF", v) for k, v in variants.items()]
    t0 = time.time()
    sc.interleave(runs, task, budget, 30, "cpu")
    print(f"load after {os.getloadavg()}, wall {time.time() - t0:.0f} s")
    adam = runs[1]
    targets = [sc.value_at(adam.curve, budget * f) for f in (0.25, 0.5, 1.0)]
    lbfgs = sc.time_to(runs[0].acc_curve, 1.0, above=True)
    for r in runs:
        t100 = sc.time_to(r.acc_curve, 1.0, above=True)
        times = [sc.time_to(r.curve, t) / sc.time_to(adam.curve, t) for t in targets]
        print(
            f"{r.name:30s} loss {sc.final_error(r):9.3g}  100 % at {t100:.2f} s "
            f"({t100 / lbfgs:.2f}× L-BFGS)  Adam's ¼/½/1 losses at "
            + "/".join(f"{v:.2f}" for v in times)
            + f"× its time  steps {r.steps}"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    which = sys.argv[1] if len(sys.argv) > 1 else "curves"
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 15.0
    print("load before", os.getloadavg())
    if which == "curves":
        curves(seconds, sys.argv[3].split(",") if len(sys.argv) > 3 else [])
    elif which == "ae":
        autoencoder(seconds)
    elif which == "digits":
        digits(seconds)
    else:
        raise SystemExit(f"unknown study {which!r}; expected curves, ae or digits")
