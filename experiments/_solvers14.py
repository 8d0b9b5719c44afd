"""solvers14: the public building blocks used on their own, each misuse and what it gives.

Runs every probe of experiments/README.md, "solvers14", on the hessfree that is imported and
prints one line each: the exception (type and message) or the result. Run it against main's copy
and this branch's to compare::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_solvers14.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import hessfree
from hessfree import (
    EmpiricalFisherDiagonal,
    GGNProduct,
    HessianProduct,
    KFACPreconditioner,
    NystromPreconditioner,
    ParamLayout,
    PrecondContext,
    StructurallyDampedGGN,
    cg,
    hvp,
    nystrom_sketch,
)

D = torch.float64


def _probe(name: str, fn: Callable[[], object]) -> None:
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - the point is to show whatever is raised
        out = f"{type(err).__name__}: {str(err)[:150]}"
    print(f"{name:46s} {out}")


def _spd(n: int = 6, low: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D)).Q
    eig = torch.arange(1.0, n + 1, dtype=D)
    eig[0] = low
    return Q @ torch.diag(eig) @ Q.T, torch.randn(n, generator=gen, dtype=D)


def _solve(**kwargs: object) -> str:
    A, b = _spd()
    r = cg(lambda v: A @ v, b, rtol=1e-12, **kwargs)
    res = float(torch.linalg.vector_norm(A @ r.x - b) / torch.linalg.vector_norm(b))
    return f"{r.reason.value}, {r.num_iter} it, relative residual {res:.1e}"


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=D)


def _ggn() -> tuple[nn.Module, GGNProduct]:
    model, x = _mlp()
    out = model(x)
    return model, GGNProduct(F.mse_loss(out, torch.zeros_like(out)), out, list(model.parameters()))


def main() -> None:
    torch.set_num_threads(1)
    print(f"hessfree from {hessfree.__file__}")
    A, b = _spd()
    _probe("cg, SPD, rtol 1e-12", lambda: _solve())
    _probe("cg, matvec scales its argument in place", lambda: _solve_inplace_matvec(A, b))
    _probe("cg, precond scales its argument in place", lambda: _solve_inplace_precond(b))
    _probe("cg, precond returns its argument (identity)", lambda: _solve(precond=lambda r: r))
    _probe(
        "cg, singular PSD precond diag(1,0,1,..)",
        lambda: _solve(precond=lambda r: r * torch.tensor([1.0, 0, 1, 1, 1, 1], dtype=D)),
    )

    model, x = _mlp()
    model[0].bias.requires_grad_(False)
    out = model(x)
    loss = F.mse_loss(out, torch.zeros_like(out))
    _probe(
        "HessianProduct, a frozen bias in params",
        lambda: HessianProduct(loss, list(model.parameters())),
    )
    _probe(
        "GGNProduct, a frozen bias in params",
        lambda: GGNProduct(loss, out, list(model.parameters())),
    )
    model[0].bias.requires_grad_(True)
    h = torch.tanh(model[0](x))
    out = model[2](h)
    loss = F.mse_loss(out, torch.zeros_like(out))
    params = list(model.parameters())
    _probe(
        "StructurallyDampedGGN, outputs=(out,)",
        lambda: StructurallyDampedGGN(loss, (out,), h, params, weight=0.5),
    )
    _probe(
        "StructurallyDampedGGN, weight='0.5'",
        lambda: StructurallyDampedGGN(loss, out, h, params, weight="0.5"),
    )
    a, c = torch.ones(2, dtype=D), torch.ones(3, dtype=D)
    _probe(
        "hvp, x given as a list", lambda: hvp(lambda a, c: (a**2).sum() * c.sum(), [a, c], (a, c))
    )

    layout = ParamLayout([torch.zeros(2, 3, dtype=D), torch.zeros(3, dtype=D)])
    _probe(
        "ParamLayout.cat, a transposed (3, 2) weight",
        lambda: layout.cat([torch.zeros(3, 2, dtype=D), torch.zeros(3, dtype=D)]).shape,
    )
    _probe(
        "ParamLayout.cat, a (7,) weight",
        lambda: layout.cat([torch.zeros(7, dtype=D), torch.zeros(3, dtype=D)]).shape,
    )
    _probe(
        "ParamLayout.cat, float32 entries",
        lambda: layout.cat([torch.zeros(2, 3), torch.zeros(3)]).dtype,
    )
    _probe(
        "ParamLayout.split, a (9, 1) column", lambda: len(layout.split(torch.zeros(9, 1, dtype=D)))
    )

    model, G = _ggn()
    ctx = PrecondContext(None, None, "mean", 1e-3, 0.0, curvature=G.matmat, gradient=G.gradient)
    P = NystromPreconditioner(rank=20)
    P(ctx)
    smallest = float(P.eigenvalues[-1])
    print(f"{'(Nystrom rank 20 on a rank-12 GGN: smallest eigenvalue':46s} {smallest})")
    for mu in (0.0, -1e-3):
        _probe(
            f"NystromPreconditioner.apply_with({mu})",
            lambda mu=mu: int(torch.isnan(P.apply_with(mu)(G.gradient)).sum()),
        )
    _probe("EmpiricalFisherDiagonal on a products-only ctx", lambda: EmpiricalFisherDiagonal()(ctx))
    _probe(
        "PrecondContext(reduction='avg')",
        lambda: PrecondContext(None, None, "avg", 1.0, 0.0).reduction,
    )
    K = KFACPreconditioner(model)
    _, G = _ggn_of(model, x)
    apply = K(PrecondContext(G.jacobian, G.output_grad, "mean", 1e-3, 0.0))
    _probe("KFAC operator on a (5,) vector", lambda: apply(torch.ones(5, dtype=D)))
    _probe(
        "KFAC apply_with(mu=inf)",
        lambda: float(K.apply_with(list(model.parameters()), float("inf"))(G.gradient).abs().max()),
    )
    K.remove()

    # left alone: an indefinite matrix through the PSD-only sketch
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=D)).Q
    C = Q @ torch.diag(torch.tensor([3.0, 1, -1, -2, -2, -2, -2, -2], dtype=D)) @ Q.T
    _, lam = nystrom_sketch(lambda V: V @ C, 8, 3, generator=torch.Generator().manual_seed(0))
    shown = [f"{v:.3g}" for v in lam.tolist()]
    print(f"{'nystrom_sketch of an indefinite C (top eig 3)':46s} {shown}")


def _ggn_of(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, GGNProduct]:
    out = model(x)
    return out, GGNProduct(F.mse_loss(out, torch.zeros_like(out)), out, list(model.parameters()))


def _solve_inplace_matvec(A: torch.Tensor, b: torch.Tensor) -> str:
    r = cg(lambda v: v.mul_(2), b, rtol=1e-12)
    res = float(torch.linalg.vector_norm(2 * r.x - b) / torch.linalg.vector_norm(b))
    return f"{r.reason.value}, {r.num_iter} it, relative residual {res:.1e}"


def _solve_inplace_precond(b: torch.Tensor) -> str:
    r = cg(lambda v: 2 * v, b, precond=lambda r: r.mul_(0.5), rtol=1e-12)
    res = float(torch.linalg.vector_norm(2 * r.x - b) / torch.linalg.vector_norm(b))
    return f"{r.reason.value}, {r.num_iter} it, relative residual {res:.1e}"


if __name__ == "__main__":
    main()
