"""fixes2 (2026-12-03): reproduce four defects left by earlier sessions, on whichever hessfree
is imported (``PYTHONPATH=/work/main`` for main's, the worktree's for the branch).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_fixes2.py

Prints one block per item; nothing is timed. Tables: ``results/2026-12-03-fixes2.md``.
"""

from __future__ import annotations

import os
import signal
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hessfree
from hessfree import FisherLinearOperator, FisherProduct, HessianFree, KFACPreconditioner

torch.set_num_threads(1)
DTYPE = torch.float64


def _train_with_hooked_kfac(what: str) -> str:
    """Three HF steps with KFACPreconditioner(model), one parameter frozen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)
    x, y = torch.randn(9, 3, dtype=DTYPE), torch.randn(9, 2, dtype=DTYPE)
    getattr(model[2] if what == "bias" else model[0], what).requires_grad_(False)

    def closure():
        out = model(x)
        return F.mse_loss(out, y), out

    try:
        K = KFACPreconditioner(model)
        opt = HessianFree([p for p in model.parameters() if p.requires_grad], precond=K)
        before = closure()[0].item()
        for _ in range(3):
            opt.step(closure)
        after = closure()[0].item()
    except ValueError as err:
        return f"ValueError: {str(err)[:160]}..."
    return f"K-FAC layers {len(K.layers)}, loss {before:.4f} -> {after:.4f}"


def item1_frozen_bias() -> None:
    """KFACPreconditioner(model) on an MLP whose last bias (or first weight) is frozen."""
    print("## 1 KFACPreconditioner(model), frozen bias / frozen weight")
    for what in ("bias", "weight"):
        print(f"frozen {what}: {_train_with_hooked_kfac(what)}")


def item2_partial_dir() -> None:
    """A run-directory creation killed by SIGKILL, then a new run in the same output dir."""
    print("## 2 SIGKILL during run-directory creation")
    import hessfree.train.rundir as rundir
    from hessfree.train.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        pid = os.fork()
        if pid == 0:
            try:
                rundir.write_text_atomic = lambda p, t: os.kill(os.getpid(), signal.SIGKILL)
                rundir._create_run_dir(runs / "a", "name: x\n")
            finally:
                os._exit(1)
        os.waitpid(pid, 0)
        print("left after the kill:", sorted(p.name for p in runs.iterdir()))
        config = Path(tmp) / "c.yaml"
        config.write_text(
            "name: d\nnum_threads: 1\ndata: {name: digits}\nmodel: {name: mlp, hidden_sizes: [4]}\n"
            "optimizers: [{name: adam}]\nbudget: {steps: 1}\n"
        )
        code = main(["run", str(config), "--quiet", "--out", str(runs / "b")])
        print(f"next run (exit {code}) leaves:", sorted(p.name for p in runs.iterdir()))


def item3_mc_seed() -> None:
    """Which generator 'fisher_mc' draws from on two sharded ranks (simulated in-process)."""
    print("## 3 fisher_mc labels on two sharded ranks")
    import types

    model = nn.Linear(3, 2)
    opts = []
    for rank in range(2):
        opt = HessianFree(model.parameters(), curvature="fisher_mc", seed=0)
        opt._avg = types.SimpleNamespace(world_size=2, rank=rank)  # as two ranks would see it
        opts.append(opt)
    cpu = torch.device("cpu")
    pick = [getattr(o, "_mc_generator", o._rng) for o in opts]  # main: the optimizer's own
    draws = [torch.rand(5, generator=f(cpu)) for f in pick]
    print("rank 0 uniforms:", draws[0].numpy().round(4))
    print("rank 1 uniforms:", draws[1].numpy().round(4))
    print("same numbers on both shards:", bool(torch.equal(*draws)))


def _per_example_fisher(model, x, y, per_example, scale):
    """scale * sum_i g_i g_i^T with g_i the gradient of example i's loss (float64, autograd)."""
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(per_example(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    return scale * (G.T @ G)


def item4_summed_fisher() -> None:
    """curvature='fisher' with hand-written losses against the per-example oracle."""
    print("## 4 curvature='fisher', hand-written losses (ratio to the oracle; 1 = right)")
    from hessfree._closure import _reduction_of

    torch.manual_seed(1)
    n = 8
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    x, y = torch.randn(n, 3, dtype=DTYPE), torch.randn(n, 2, dtype=DTYPE)
    params = list(model.parameters())
    sq = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731  one example's summed loss
    cases = {
        # name: (loss of the batch, oracle scale c in c * sum_i g_i g_i^T)
        "mse_loss(reduction='sum')": (lambda o, t: F.mse_loss(o, t, reduction="sum"), 1.0),
        "((o - y)**2).sum()": (lambda o, t: ((o - t) ** 2).sum(), 1.0),
        "((o - y)**2).sum(1).sum(0)": (lambda o, t: ((o - t) ** 2).sum(1).sum(0), 1.0),
        "0.5 * mse_loss(reduction='sum')": (
            lambda o, t: 0.5 * F.mse_loss(o, t, reduction="sum"),
            0.25,  # ℓ_i = 0.5 Σ_k (o - y)², summed: Σ ∇ℓ_i ∇ℓ_iᵀ = 0.25 Σ g_i g_iᵀ
        ),
        "((o - y)**2).sum() / N": (lambda o, t: ((o - t) ** 2).sum() / n, 1.0 / n),
        "((o - y)**2).sum(1).mean()": (lambda o, t: ((o - t) ** 2).sum(1).mean(), 1.0 / n),
        "mse_loss (mean)": (lambda o, t: F.mse_loss(o, t), 1.0 / (n * 4)),
        "sum of per-example losses in Python": (
            lambda o, t: sum(sq(o[i], t[i]) for i in range(o.shape[0])),
            1.0,
        ),
    }
    for name, (loss_fn, c) in cases.items():
        out = model(x)
        loss = loss_fn(out, y)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reduction = _reduction_of(loss, out)
        P = FisherProduct(loss, out, params, reduction=reduction)
        eye = torch.eye(sum(p.numel() for p in params), dtype=DTYPE)
        dense = torch.stack([P.matvec(e) for e in eye], 1)
        # the oracle: per-example gradients of ℓ_i with loss = c' Σ ℓ_i; g_i of Σ_k (o - y)²
        oracle = _per_example_fisher(model, x, y, sq, c)
        ratio = float(torch.linalg.norm(dense) / torch.linalg.norm(oracle))
        warned = f"  warning: {str(caught[0].message)[:70]}..." if caught else ""
        print(f"{name:38s} read as {reduction!r:7s} ratio {ratio:.4g}{warned}")
    # the operator: its reduction is the loss_fn's attribute, or the argument (default 'mean')
    sq_sum = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    oracle = _per_example_fisher(model, x, y, sq, 1.0)
    for kw in ({}, {"reduction": "sum"}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op = FisherLinearOperator(model, sq_sum, (x, y), **kw)
            dense = op @ np.eye(op.shape[0])
        ratio = float(np.linalg.norm(dense) / np.linalg.norm(oracle.numpy()))
        warned = f"  warning: {str(caught[0].message)[:70]}..." if caught else ""
        print(f"FisherLinearOperator(lambda: .sum(), {kw}) ratio {ratio:.4g}{warned}")


def costs(rounds: int = 11, reps: int = 2000) -> None:
    """Per-call cost of the checks added on the step path (branch only): the hooked K-FAC's
    requires_grad scan (every call) and the Fisher's reduction read (every step), against a
    no-op call; interleaved, medians over rounds, CPU and wall time, load average."""
    import statistics
    import time

    from hessfree.curvature import _read_reduction

    print("## costs (us per call; medians of", rounds, "rounds of", reps, "calls)")
    print("load average at start:", os.getloadavg())
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)]).double()
    K = KFACPreconditioner(model)
    x = torch.randn(256, 64, dtype=DTYPE)
    out = model(x)
    loss = ((out - 1.0) ** 2).sum()
    contenders = {
        "no-op": lambda: None,
        "K-FAC _fix_layers (8 layers)": K._fix_layers,
        "_read_reduction": lambda: _read_reduction(loss, out),
    }
    times = {k: ([], []) for k in contenders}
    for _ in range(rounds):
        for name, f in contenders.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(reps):
                f()
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            times[name][0].append(cpu / reps * 1e6)
            times[name][1].append(wall / reps * 1e6)
    for name, (cpu, wall) in times.items():
        print(f"{name:30s} cpu {statistics.median(cpu):7.2f}  wall {statistics.median(wall):7.2f}")
    print("load average at end:", os.getloadavg())


if __name__ == "__main__":
    import sys

    print("hessfree from", Path(hessfree.__file__).parent)
    if sys.argv[1:] == ["costs"]:
        costs()
    else:
        item1_frozen_bias()
        item2_partial_dir()
        item3_mc_seed()
        item4_summed_fisher()
