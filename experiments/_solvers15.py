"""solvers15: the public building blocks used alone, one line per probe.

Prints what whichever ``hessfree`` is on ``PYTHONPATH`` does, so running it on main's copy
and on the branch gives the before/after of experiments/README.md, "solvers15":

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_solvers15.py
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import nn

import hessfree
from hessfree import (
    GGNProduct,
    HessianProduct,
    JacobianProduct,
    KFACPreconditioner,
    NystromPreconditioner,
    PrecondContext,
    cg,
    hvp,
    loss_hessian_product,
    nystrom_sketch,
    record_hidden,
    update_damping,
)

D = torch.float64


def _show(name: str, fn: Callable[[], object]) -> None:
    """One probe: its value, or the exception's type and message, and any warning."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn()
        note = f"  [warning: {str(caught[0].message)[:110]}]" if caught else ""
        print(f"{name}: {value}{note}")
    except Exception as err:  # noqa: BLE001 - a probe reports whatever it meets
        print(f"{name}: {type(err).__name__}: {str(err)[:160]}")


def _spd(n: int, decades: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D)).Q
    A = Q @ torch.diag(torch.logspace(0, decades, n, dtype=D)) @ Q.T
    return A, torch.randn(n, generator=gen, dtype=D)


def cg_probes() -> None:
    A, b = _spd(12, 2, 0)
    d = torch.ones(12, dtype=D)
    d[1] = 0.0
    for dtype in (D, torch.float32):
        At, bt, dt = A.to(dtype), b.to(dtype), d.to(dtype)
        res = cg(lambda v, At=At: At @ v, bt, precond=lambda r, dt=dt: dt * r, rtol=1e-10)
        rel = float(torch.linalg.norm(At @ res.x - bt) / torch.linalg.norm(bt))
        _show(
            f"cg, M^-1 = diag(d) with d_1 = 0, {dtype}",
            lambda res=res, rel=rel: (res.reason.value, res.num_iter, f"rel. residual {rel:.2f}"),
        )
    e2 = torch.zeros(12, dtype=D)
    e2[1] = 1.0
    res0 = cg(lambda v: A @ v, e2, precond=lambda r: d * r)
    _show("cg, r_0 in M^-1's null space", lambda: (res0.reason.value, res0.num_iter))
    t0 = time.perf_counter()
    res = cg(lambda v: 2 * v, torch.ones(3, dtype=D), store_ratio=1.001)
    _show(
        "cg, store_ratio 1.001 (grid build + solve)",
        lambda: f"{time.perf_counter() - t0:.2f} s, {res.reason.value}",
    )
    # SciPy's cg on the same problem: iterations, and both against a long-double CG
    A, b = _spd(30, 3, 0)
    xs: list[np.ndarray] = []
    sla.cg(
        A.numpy(),
        b.numpy(),
        rtol=1e-8,
        atol=0,
        maxiter=1000,
        callback=lambda x: xs.append(x.copy()),
    )
    ours = cg(
        lambda v: A @ v,
        b,
        rtol=1e-8,
        progress_tol=None,
        max_iter=1000,
        store_start=1,
        store_ratio=1.0001,
    )
    ref = _textbook_cg(A.numpy().astype(np.longdouble), b.numpy().astype(np.longdouble), len(xs))

    def err(its: list[np.ndarray]) -> float:
        return max(
            float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(its, ref, strict=True)
        )

    mine = [x.numpy() for x in ours.iterates]  # every iterate from 1 on (store_start=1)
    print(
        f"cg vs scipy (30x30, cond 1e3, rtol 1e-8): iterations {ours.num_iter} vs {len(xs)}; "
        f"max rel. iterate error vs long-double CG: ours {err(mine):.1e}, scipy {err(xs):.1e}"
    )
    _show("cg, x0 float32 for a float64 b", lambda: cg(lambda v: v, b, x0=torch.zeros(30)))
    _show(
        "cg, max_iter 10**6 on 1x1",
        lambda: (lambda r: (r.reason.value, r.num_iter))(
            cg(lambda v: 3 * v, torch.tensor([6.0], dtype=D), max_iter=10**6)
        ),
    )


def _textbook_cg(A: np.ndarray, b: np.ndarray, k: int) -> list[np.ndarray]:
    """Nocedal & Wright's Algorithm 5.2 in A's dtype (long double for a reference)."""
    x, r = np.zeros_like(b), b.copy()
    p, rr, out = r.copy(), r @ r, []
    for _ in range(k):
        Ap = A @ p
        alpha = rr / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        rr, rr_old = r @ r, rr
        p = r + rr / rr_old * p
        out.append(x.astype(np.float64))
    return out


def nystrom_probes() -> None:
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=D)).Q
    ev = torch.tensor([3.0, 1.0, -1.0, -2.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.0], dtype=D)
    C = Q @ torch.diag(ev) @ Q.T

    def top(rank: int) -> str:
        gen = torch.Generator().manual_seed(1)
        return f"top {float(nystrom_sketch(lambda V: V @ C, 10, rank, generator=gen)[1][0]):.3g}"

    for rank in (5, 10):
        _show(f"nystrom_sketch, indefinite 10x10, rank {rank}", lambda rank=rank: top(rank))
    pre = NystromPreconditioner(rank=5, refresh=1)
    ctx = PrecondContext(
        None,
        None,
        "mean",
        0.1,
        0.0,
        torch.Generator().manual_seed(1),
        curvature=lambda V: V @ C,
        gradient=torch.ones(10, dtype=D),
    )
    _show(
        "NystromPreconditioner on it", lambda: f"top {float((pre(ctx), pre.eigenvalues)[1][0]):.3g}"
    )


def product_probes() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=gen, dtype=D, requires_grad=True)
    x = torch.randn(5, 3, generator=gen, dtype=D)
    out = x @ w.T
    loss = out.tanh().square().sum()
    _show(
        "HessianProduct(loss, [w, w.view(-1)])",
        lambda: (
            HessianProduct(loss, [w, w.view(-1)])(torch.ones(12, dtype=D))[6:].abs().max().item()
        ),
    )
    _show(
        "JacobianProduct(out, [w, w.view(-1)])", lambda: JacobianProduct(out, [w, w.view(-1)]).shape
    )
    ref = HessianProduct(loss, [w])(torch.ones(6, dtype=D))
    G_ref = GGNProduct(loss, out, [w])(torch.ones(6, dtype=D))
    with torch.inference_mode():
        _show(
            "HessianProduct built in inference_mode: max |error|",
            lambda: (HessianProduct(loss, [w])(torch.ones(6, dtype=D)) - ref).abs().max().item(),
        )
        _show(
            "GGNProduct built in inference_mode: max |error|",
            lambda: (GGNProduct(loss, out, [w])(torch.ones(6, dtype=D)) - G_ref).abs().max().item(),
        )
        _show(
            "hvp(sum x^3) at (1, 2), v = 1, in inference_mode",
            lambda: hvp(
                lambda t: (t**3).sum(), torch.tensor([1.0, 2.0], dtype=D), torch.ones(2, dtype=D)
            ).tolist(),
        )
    _show(
        "H(v).requires_grad (third order)",
        lambda: HessianProduct(loss, [w]).matvec(torch.ones(6, dtype=D)).requires_grad,
    )
    _show(
        "accelerate, cuda_graph on a CPU",
        lambda: (
            hessfree.accelerate(
                lambda v: 2 * v, torch.ones(2), hessfree.ProductPolicy(cuda_graph=True)
            ).fallback_reason
        ),
    )


def kfac_and_recurrent_probes() -> None:
    torch.manual_seed(0)
    models = {
        "Linear(bias=False)": (
            nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)),
            torch.randn(8, 3),
        ),
        "Conv2d groups=2": (
            nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten()),
            torch.randn(5, 4, 7, 7),
        ),
        "Conv3d": (nn.Sequential(nn.Conv3d(2, 3, 2), nn.Flatten()), torch.randn(5, 2, 4, 4, 4)),
    }
    for name, (model, _x) in models.items():
        _show(
            f"KFACPreconditioner(include_conv=True), {name}",
            lambda model=model: repr(KFACPreconditioner(model, include_conv=True))[:60],
        )
    for name, mod, inp in [
        ("GRU, 2 layers", nn.GRU(3, 4, num_layers=2), torch.randn(5, 2, 3)),
        (
            "LSTM proj_size=2, bidirectional, 2 layers, batch_first",
            nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, proj_size=2),
            torch.randn(2, 5, 3),
        ),
    ]:
        with record_hidden(mod) as rec:
            mod(inp)
        _show(f"record_hidden, {name}", lambda rec=rec: tuple(rec.hidden.shape))


def loss_probes() -> None:
    gen = torch.Generator().manual_seed(0)
    o0 = torch.randn(5, 3, generator=gen, dtype=D)
    yc, yr = torch.tensor([0, 2, 1, 1, 0]), torch.randn(5, 3, generator=gen, dtype=D)
    yp = torch.softmax(torch.randn(5, 3, generator=gen, dtype=D), 1)
    losses = {
        "mse sum": lambda o: F.mse_loss(o, yr, reduction="sum"),
        "ce mean": lambda o: F.cross_entropy(o, yc),
        "ce sum": lambda o: F.cross_entropy(o, yc, reduction="sum"),
        "nll(log_softmax) sum": lambda o: F.nll_loss(F.log_softmax(o, 1), yc, reduction="sum"),
        "bce-with-logits sum": lambda o: F.binary_cross_entropy_with_logits(o, yp, reduction="sum"),
        "ce, probability targets": lambda o: F.cross_entropy(o, yp),
    }
    for name, f in losses.items():
        o = o0.clone().requires_grad_(True) * 1.0
        mv = loss_hessian_product(f(o), o)
        dense = torch.autograd.functional.hessian(lambda t, f=f: f(t.view(5, 3)), o0.reshape(-1))
        if mv is None:
            print(f"loss_hessian_product, {name}: None (exact double backward)")
            continue
        got = torch.stack([mv(e.view(5, 3)).reshape(-1) for e in torch.eye(15, dtype=D)], 1)
        print(f"loss_hessian_product, {name}: max |error| {float((got - dense).abs().max()):.1e}")
    lam, oracle = 1.0, 1.0
    for rho in [0.1, 0.9, 0.5, 0.8, math.nan, -1.0, 0.25, 0.75, 2.0]:
        lam = update_damping(lam, rho)
        oracle *= 1.5 if (math.isnan(rho) or rho < 0.25) else (2 / 3 if rho > 0.75 else 1.0)
    print(f"update_damping, 9 steps against Martens' rule: {lam!r} vs {oracle!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"hessfree from {hessfree.__file__}")
    cg_probes()
    nystrom_probes()
    product_probes()
    kfac_and_recurrent_probes()
    loss_probes()
