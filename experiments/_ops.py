"""ops (2026-12-02): the SciPy curvature operators audited against dense float64 oracles.

Prints markdown tables (``results/2026-12-02-ops.md`` holds a run). Runs with whichever
``hessfree`` is on ``PYTHONPATH``, so the behaviour before the fixes can be read by putting an
older checkout there (the sections that need a fix's API say when they are skipped):

1. empirical Fisher over 4 + 4 + 2 batches vs the Fisher of all the data at once (the batch
   weights of a Hessian, linear in each batch's share, against the squared shares);
2. a DataLoader with ``shuffle=True, drop_last=True``: how far consecutive products differ;
3. products of a cached operator after one layer's parameters changed in place;
4. cost: forward passes per product, a 1e6-parameter model's product time and memory, and
   the in-place check's time against the smallest product (interleaved, one process).

    OPENBLAS_NUM_THREADS=1 python experiments/_ops.py
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessfree
from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
)

torch.set_num_threads(1)


def _mlp(seed: int, n_out: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, n_out)).double()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def fisher_shares() -> None:
    print("## 1. Fisher over 4 + 4 + 2 batches vs on all 10 cases (relative max error)\n")
    print("| loss | linear shares (old rule) | this hessfree |")
    print("|---|---|---|")
    model = _mlp(3, 3)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 1, 2, 0, 2, 2, 1, 0])
    w = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    v = np.random.default_rng(0).standard_normal(38)
    for name, loss_fn in (
        ("CE", nn.CrossEntropyLoss()),
        ("CE ignore_index=1", nn.CrossEntropyLoss(ignore_index=1)),
        ("CE weight", nn.CrossEntropyLoss(weight=w)),
        ("CE weight + ignore", nn.CrossEntropyLoss(weight=w, ignore_index=1)),
    ):
        full = FisherLinearOperator(model, loss_fn, (x, y)) @ v
        parts = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]
        # the old rule, from one-batch operators: sum_b (share_b / share) F_b
        share = [_share(loss_fn, yb) for _, yb in parts]
        old = sum(
            s * (FisherLinearOperator(model, loss_fn, b) @ v)
            for s, b in zip(share, parts, strict=True)
        )
        old = old / sum(share)
        new = (
            FisherLinearOperator(model, loss_fn, DataLoader(TensorDataset(x, y), batch_size=4)) @ v
        )
        print(f"| {name} | {_rel(old, full):.1e} | {_rel(new, full):.1e} |")
    print()


def _share(loss_fn: nn.CrossEntropyLoss, y: torch.Tensor) -> float:
    """What torch's 'mean' divides this batch's summed loss by."""
    kept = y != loss_fn.ignore_index
    if loss_fn.weight is None:
        return float(kept.sum())
    return float(loss_fn.weight[y[kept]].sum())


def dataloader_redraws() -> None:
    print("## 2. shuffle=True, drop_last=True: 10 cases in batches of 4\n")
    model = _mlp(0, 2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g)
    y = y.double()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True)
    v = np.random.default_rng(0).standard_normal(32)
    try:
        GGNLinearOperator(model, F.mse_loss, loader)
        print("accepted by this hessfree.")
    except ValueError as err:
        print(f"refused by this hessfree: {str(err)[:160]}...")
    torch.manual_seed(0)
    # what the products were before: each pass over the loader, its own 8 cases
    passes = [GGNLinearOperator(model, F.mse_loss, list(loader)) @ v for _ in range(4)]
    spread = max(_rel(p, passes[0]) for p in passes)
    print(f"\n4 passes' GGN products differ by up to {spread:.0%} (relative max).\n")


def inplace() -> None:
    print("## 3. cached products after one parameter changed in place (+0.1)\n")
    print("3-layer tanh MLP (3-5-5-2), 10 cases, MSE; one weight matrix changed by +0.1.\n")
    print("| operator | first layer changed | middle layer changed | last layer changed |")
    print("|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g)
    y = y.double()
    for name, make in (
        ("Hessian", lambda m: HessianLinearOperator(m, F.mse_loss, (x, y))),
        ("GGN", lambda m: GGNLinearOperator(m, F.mse_loss, (x, y))),
        ("Fisher", lambda m: FisherLinearOperator(m, F.mse_loss, (x, y))),
        ("Jacobian", lambda m: JacobianLinearOperator(m, x)),
    ):
        cells = []
        for layer in (0, 2, 4):
            torch.manual_seed(0)
            model = nn.Sequential(
                nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2)
            ).double()
            op = make(model)
            v = np.ones(op.shape[1])
            before = op @ v  # the first product builds the Jacobian's R-op graph
            with torch.no_grad():
                model[layer].weight.add_(0.1)
            current = make(model) @ v  # a fresh operator at the new parameters
            try:
                after = op @ v
                if np.array_equal(after, before):
                    cells.append("old curvature, silently")
                elif np.allclose(after, current, rtol=1e-12, atol=0):
                    cells.append("current curvature")
                else:
                    cells.append(f"a mix of old and new, silently ({_rel(after, current):.0%} off)")
            except RuntimeError as err:
                msg = str(err)
                kind = "clear error" if "changed in place" in msg else "torch's in-place error"
                cells.append(kind)
        print(f"| {name} | {' | '.join(cells)} |")
    print()


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn`` over ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def cost() -> None:
    print("## 4. cost\n")
    print(f"load average at start: {os.getloadavg()}\n")
    model = _mlp(0, 2)
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g)
    y = y.double()
    v = np.ones(32)
    print("| operator, data | forward passes: construction | per product |")
    print("|---|---|---|")
    for name, make in (
        ("GGN, one batch", lambda: GGNLinearOperator(model, F.mse_loss, (x, y))),
        (
            "GGN, one batch, cache_graph=False",
            lambda: GGNLinearOperator(model, F.mse_loss, (x, y), cache_graph=False),
        ),
        (
            "GGN, 4+4+2",
            lambda: GGNLinearOperator(
                model, F.mse_loss, DataLoader(TensorDataset(x, y), batch_size=4)
            ),
        ),
        ("Jacobian", lambda: JacobianLinearOperator(model, x)),
    ):
        calls.clear()
        op = make()
        built = len(calls)
        for _ in range(3):
            op @ v
        print(f"| {name} | {built} | {(len(calls) - built) / 3:g} |")
    print()

    torch.manual_seed(0)
    big = nn.Linear(1000, 1000)
    bx, by = torch.randn(4, 1000), torch.randn(4, 1000)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("| 1,001,000 parameters, 4 cases, float32 | median wall s | median CPU s |")
    print("|---|---|---|")
    bv = np.random.default_rng(0).standard_normal(1_001_000).astype(np.float32)
    for cls in (HessianLinearOperator, GGNLinearOperator, FisherLinearOperator):
        op = cls(big, nn.MSELoss(), (bx, by))
        op @ bv  # warm-up
        wall, cpu = _timed(lambda op=op: op @ bv, 5)
        print(f"| {cls.__name__} product | {wall:.4f} | {cpu:.4f} |")
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"\npeak RSS grew {rss:.0f} MiB (the n x n float32 matrix: 4.0e12 bytes).\n")

    versions = getattr(hessfree._checks, "ParamVersions", None)
    if versions is None:
        print("(no in-place check in this hessfree: its cost is not measured)\n")
    else:
        op = GGNLinearOperator(model, F.mse_loss, (x, y))
        check = versions(list(model.parameters()))
        for _ in range(50):  # warm-up
            op @ v
            check.check("")
        prod, chk = [], []
        for _ in range(15):  # interleaved: 200 products, then 200 checks
            prod.append(_timed(lambda: [op @ v for _ in range(200)], 1))
            chk.append(_timed(lambda: [check.check("") for _ in range(200)], 1))
        pw = statistics.median(p[0] for p in prod) / 200
        pc = statistics.median(p[1] for p in prod) / 200
        cw = statistics.median(c[0] for c in chk) / 200
        cc = statistics.median(c[1] for c in chk) / 200
        print("| 32-parameter GGN (smallest product) | median wall µs | median CPU µs |")
        print("|---|---|---|")
        print(f"| product (includes the check) | {pw * 1e6:.1f} | {pc * 1e6:.1f} |")
        print(f"| in-place check alone | {cw * 1e6:.2f} | {cc * 1e6:.2f} |")
        print(f"\ncheck / product: {cw / pw:.1%} wall, {cc / pc:.1%} CPU.\n")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    fisher_shares()
    dataloader_redraws()
    inplace()
    cost()
