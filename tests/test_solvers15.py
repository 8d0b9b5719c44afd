"""The public building blocks used on their own, without HessianFree (solvers15).

What solvers14 left, then probed further: a singular preconditioner, an indefinite matrix
given to the Nyström sketch, a parameter listed with a view of itself. Oracles: dense float64
solves (``numpy.linalg``), eigendecompositions and ``torch.autograd.functional`` Hessians.
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hessfree import (
    CGStop,
    FisherProduct,
    GGNProduct,
    HessianProduct,
    JacobianProduct,
    MCFisherProduct,
    NystromPreconditioner,
    PrecondContext,
    cg,
    hvp,
    nystrom_sketch,
)
from hessfree.cg import _grid

D = torch.float64


def _spd(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An SPD matrix with eigenvalues 1 to 100 and a right-hand side."""
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D)).Q
    A = Q @ torch.diag(torch.logspace(0, 2, n, dtype=D)) @ Q.T
    return A, torch.randn(n, generator=gen, dtype=D)


# ---- cg: a singular preconditioner is named, not reported as relative progress ----
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("check_every", [1, 7])
def test_cg_names_a_singular_preconditioner(dtype, check_every):
    """M^{-1} = diag(d), d_1 = 0: CG only solves on the other coordinates. main ended with
    RELATIVE_PROGRESS after 18 iterations at relative residual 0.64."""
    A, b = _spd(12)
    d = torch.ones(12, dtype=D)
    d[1] = 0.0
    A, b, d = A.to(dtype), b.to(dtype), d.to(dtype)
    result = cg(lambda v: A @ v, b, precond=lambda r: d * r, rtol=1e-10, check_every=check_every)
    assert result.reason is CGStop.SINGULAR_PRECONDITIONER
    # CG over span{e_j : d_j != 0} minimises phi there: x_S solves A_SS x_S = b_S (dense oracle).
    keep = np.flatnonzero(d.double().numpy())
    A64, b64 = A.double().numpy(), b.double().numpy()
    x_S = np.linalg.solve(A64[np.ix_(keep, keep)], b64[keep])
    x = result.x.double().numpy()
    assert x[1] == 0.0
    # float64: the stop fires when M^{-1}'s Rayleigh quotient fell 1/eps (residual inside the
    # range ~ sqrt(eps) relative); float32 the same at its eps, on a condition number of 100.
    tol = 1e-6 if dtype == torch.float64 else 1e-2
    assert np.abs(x[keep] - x_S).max() <= tol * np.abs(x_S).max()


def test_cg_singular_preconditioner_at_the_start():
    """r_0 in M^{-1}'s null space (z_0 = 0): main reported NEGATIVE_CURVATURE (p = 0) on an
    SPD matrix; now no iteration, x = x_0, with the reason named."""
    A, _ = _spd(5)
    b = torch.zeros(5, dtype=D)
    b[2] = 1.0
    d = torch.ones(5, dtype=D)
    d[2] = 0.0
    result = cg(lambda v: A @ v, b, precond=lambda r: d * r)
    assert result.reason is CGStop.SINGULAR_PRECONDITIONER
    assert result.num_iter == 0 and torch.equal(result.x, torch.zeros(5, dtype=D))


def test_cg_ill_conditioned_definite_preconditioner_is_not_singular():
    """A positive diagonal of condition number 1e12 (float64) is no singular M: the solve goes
    to CONVERGED, as on main; so do plain CG and a negative-definite M^{-1} (-I), whose sign
    cancels in alpha and beta."""
    A, b = _spd(12, seed=1)
    d = torch.logspace(0, 12, 12, dtype=D)
    x_star = torch.linalg.solve(A, b)
    for precond in (d, lambda r: r / d, None, lambda r: -r):
        result = cg(lambda v: A @ v, b, precond=precond, rtol=1e-10, max_iter=500)
        assert result.reason is CGStop.CONVERGED
        # ||A x - b|| <= 1e-10 ||b|| and cond(A) = 100: x within ~1e-8 of the dense solve
        assert torch.allclose(result.x, x_star, rtol=0, atol=1e-7)


# ---- nystrom_sketch: an indefinite matrix is named ----
def _indefinite() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=D)).Q
    ev = torch.tensor([3.0, 1.0, -1.0, -2.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.0], dtype=D)
    return Q @ torch.diag(ev) @ Q.T


@pytest.mark.parametrize("rank", [5, 10])
def test_nystrom_sketch_refuses_an_indefinite_matrix(rank):
    """main returned a top eigenvalue of 1.3e15 for this matrix (eigenvalues 3 to -2)."""
    C = _indefinite()
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="positive semi-definite") as info:
        nystrom_sketch(lambda V: V @ C, 10, rank, generator=gen)
    if rank == 10:  # the full sketch: Omega^T C Omega is C rotated, its lowest eigenvalue -2
        assert "eigenvalue -2 " in str(info.value)


def test_nystrom_preconditioner_warns_once_on_an_indefinite_curvature():
    """HessianFree(curvature='hessian', precond='nystrom') ran through the fallback: it keeps
    running (results as before) and is told once."""
    C = _indefinite()
    pre = NystromPreconditioner(rank=5, refresh=1)
    ctx = PrecondContext(
        jacobian=None,
        output_grad=None,
        reduction="mean",
        shift=0.0,
        gradient=torch.ones(10, dtype=D),
        damping=0.1,
        curvature=lambda V: V @ C,
        generator=torch.Generator().manual_seed(1),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre(ctx)
        pre(ctx)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "positive semi-definite" in messages[0]
    assert pre.eigenvalues is not None and torch.isfinite(pre.eigenvalues).all()


# ---- products: a parameter and a view of it are refused at construction ----
def _view_case():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=gen, dtype=D, requires_grad=True)
    x = torch.randn(5, 3, generator=gen, dtype=D)
    out = x @ w.T
    return w, out, out.tanh().square().sum()


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "mcfisher", "jacobian"])
def test_products_refuse_a_parameter_and_its_view(kind):
    """main built all five; the view's rows of every product were zero."""
    w, out, loss = _view_case()
    params = [w, w.view(-1)]
    make = {
        "hessian": lambda: HessianProduct(loss, params),
        "ggn": lambda: GGNProduct(loss, out, params),
        "fisher": lambda: FisherProduct(loss, out, params),
        "mcfisher": lambda: MCFisherProduct(F.mse_loss(out, torch.zeros_like(out)), out, params),
        "jacobian": lambda: JacobianProduct(out, params),
    }[kind]
    with pytest.raises(ValueError, match=r"`params\[1\]` \(shape \(6,\)\) shares memory"):
        make()


def test_products_accept_disjoint_views_the_loss_uses():
    """Two rows of one tensor, each used by the loss, are two independent inputs: exact
    against the dense Hessian of the same function of (w0, w1)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=gen, dtype=D, requires_grad=True)
    w0, w1 = w[0], w[1]

    def f(a, c):
        return (a * c).sin().sum() + a.square().sum() * c.sum()

    H = HessianProduct(f(w0, w1), [w0, w1])
    dense = torch.autograd.functional.hessian(f, (w0.detach(), w1.detach()))
    full = torch.cat([torch.cat([dense[i][j] for j in range(2)], 1) for i in range(2)], 0)
    eye = torch.eye(6, dtype=D)
    got = torch.stack([H(e) for e in eye], 1)
    assert torch.allclose(got, full, rtol=0, atol=1e-13)  # a few roundings of O(1) entries


# ---- cg: a store_ratio near 1 ----
def _grid_oracle(start: int, ratio: str, max_iter: int) -> list[int]:
    """ceil(start * ratio**j) <= max_iter in exact rationals, j = 0, 1, ..."""
    out, value, r = set(), Fraction(start), Fraction(ratio)
    while value <= max_iter:
        out.add(-(-value.numerator // value.denominator))
        value *= r
    return sorted(out)


@pytest.mark.parametrize("ratio", ["1.3", "1.1", "1.02", "1.005", "1.004", "1.0039"])
def test_cg_store_grid_matches_exact_rationals(ratio):
    """The grid (with its shortcut where steps are below 1: 250 * 0.004 = 1 is not) against
    ceil(start * ratio**j) in exact rationals."""
    assert sorted(_grid(5, float(ratio), 250)) == _grid_oracle(5, ratio, 250)


def test_cg_store_ratio_near_one_stores_every_iterate():
    """store_ratio = 1 + 1e-7: every iterate from store_start on is kept. main multiplied
    exact rationals ~4e7 times for the grid first (1.0001 had not finished in 5 min)."""
    A, b = _spd(40, seed=2)
    result = cg(lambda v: A @ v, b, rtol=1e-12, store_ratio=1.0000001, max_iter=10_000)
    assert result.iterations == list(range(5, result.num_iter + 1))
    plain = cg(lambda v: A @ v, b, rtol=1e-12, max_iter=10_000)
    assert torch.equal(result.x, plain.x)  # storing changes no arithmetic


# ---- products built and used inside torch.inference_mode() ----
def _tiny_net():
    """A 3-4-3 tanh MLP (31 parameters) as a function of its flat parameters, with CE data."""
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(31, generator=gen, dtype=D) * 0.5
    x = torch.randn(6, 3, generator=gen, dtype=D)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def net(t):
        W1, b1, W2, b2 = t[:12].view(4, 3), t[12:16], t[16:28].view(3, 4), t[28:]
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    return theta, net, y


def test_products_built_inside_inference_mode_are_exact():
    """main: HessianProduct built inside inference_mode returned zeros (1.4 max |error|),
    GGNProduct / FisherProduct / JacobianProduct raised AttributeError ('next_functions')."""
    theta, net, y = _tiny_net()
    loss_of = lambda t: F.cross_entropy(net(t), y)  # noqa: E731
    H_dense = torch.autograd.functional.hessian(loss_of, theta)
    J_dense = torch.autograd.functional.jacobian(net, theta).reshape(18, 31)
    out0 = net(theta)
    HL = torch.autograd.functional.hessian(
        lambda o: F.cross_entropy(o.view(6, 3), y), out0.reshape(-1)
    )
    G_dense = J_dense.T @ HL @ J_dense
    p = theta.clone().requires_grad_(True)
    out = net(p)
    loss = F.cross_entropy(out, y)
    eye = torch.eye(31, dtype=D)
    with torch.inference_mode():
        H = HessianProduct(loss, [p])
        G = GGNProduct(loss, out, [p])
        J = JacobianProduct(out, [p])
        H_got = torch.stack([H(e) for e in eye], 1)
        G_got = torch.stack([G(e) for e in eye], 1)
        J_got = torch.stack([J.jvp(e).reshape(-1) for e in eye], 1)
    # float64, entries O(1): a few roundings
    assert torch.allclose(H_got, H_dense, rtol=0, atol=1e-13)
    assert torch.allclose(G_got, G_dense, rtol=0, atol=1e-13)
    assert torch.allclose(J_got, J_dense, rtol=0, atol=1e-14)


def test_hvp_inside_inference_mode_and_on_an_inference_tensor():
    """hvp of sum(x^3) is 6 x v. main: zeros inside inference_mode, and torch's "Setting
    requires_grad=True on inference tensor" for an x made there."""
    v = torch.tensor([1.0, -2.0], dtype=D)
    with torch.inference_mode():
        x = torch.tensor([1.0, 2.0], dtype=D)
        inside = hvp(lambda t: (t**3).sum(), x, v)
    outside = hvp(lambda t: (t**3).sum(), x, v)
    expected = 6 * torch.tensor([1.0, 2.0], dtype=D) * v
    assert torch.equal(inside, expected) and torch.equal(outside, expected)
