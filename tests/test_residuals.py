r"""Gauss-Newton products and HessianFree steps for residual (physics-informed) losses.

The oracle is dense and built independently of the code under test: the Jacobian of the stacked
residual blocks with respect to the flat parameters by ``torch.autograd.functional.jacobian``,
and the Hessian of the loss with respect to the stacked residuals by
``torch.autograd.functional.hessian``; then :math:`G = J^\top H_\ell J`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessfree import GGNProduct, HessianFree, JacobianProduct

EXACT = dict(rtol=1e-10, atol=1e-12)

Residuals = Callable[[Callable[[Tensor], Tensor]], list[Tensor]]
LossOf = Callable[[list[Tensor]], Tensor]


def _laplacian(u: Tensor, x: Tensor) -> Tensor:
    """:math:`\\sum_i \\partial^2 u/\\partial x_i^2` per row, keeping the graph."""
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return sum(
        torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i]
        for i in range(x.shape[1])
    )


def _poisson_2d(u_fn):
    x = torch.rand(12, 2, dtype=torch.float64, requires_grad=True)
    f = torch.sin(math.pi * x[:, 0].detach()) * torch.sin(math.pi * x[:, 1].detach())
    xb = torch.rand(8, 2, dtype=torch.float64).round_()  # corners: boundary points
    return [-_laplacian(u_fn(x).squeeze(1), x) - f, u_fn(xb).squeeze(1)]


def _convection_1d(u_fn, beta=4.0):
    # u_t + β u_x = 0 on (x, t); interior, initial and boundary-periodicity residuals
    xt = torch.rand(10, 2, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(u_fn(xt).sum(), xt, create_graph=True)
    x0 = torch.rand(6, 1, dtype=torch.float64)
    init = u_fn(torch.cat([x0, torch.zeros_like(x0)], 1)).squeeze(1) - torch.sin(x0[:, 0])
    t = torch.rand(4, 1, dtype=torch.float64)
    per = u_fn(torch.cat([torch.zeros_like(t), t], 1)) - u_fn(torch.cat([torch.ones_like(t), t], 1))
    return [d[:, 1] + beta * d[:, 0], init, per.squeeze(1)]


def _heat_3d(u_fn):
    # u_t - Δ_x u = 0 in 3 space dimensions: first and second input-derivatives mixed
    x = torch.rand(8, 4, dtype=torch.float64, requires_grad=True)
    u = u_fn(x).squeeze(1)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(3))
    return [du[:, 3] - lap, u_fn(torch.rand(5, 4, dtype=torch.float64)).squeeze(1)]


@dataclass(frozen=True)
class ResidualCase:
    """A tanh MLP, residual blocks of its input-derivatives, and a loss of those blocks."""

    name: str
    n_in: int
    residuals: Residuals
    loss: LossOf
    seed: int = 0

    def build(self):
        """Return ``(model, flat θ, r(θ) -> blocks, loss(blocks))``, seeded."""
        torch.manual_seed(self.seed)
        model = nn.Sequential(
            nn.Linear(self.n_in, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)
        ).double()
        gen_state = torch.get_rng_state()
        names = [n for n, _ in model.named_parameters()]
        shapes = [p.shape for p in model.parameters()]

        def blocks_at(theta: Tensor) -> list[Tensor]:
            torch.set_rng_state(gen_state)  # the same collocation points on every call
            ps = dict(
                zip(
                    names,
                    (
                        t.view(s)
                        for t, s in zip(
                            theta.split([s.numel() for s in shapes]), shapes, strict=True
                        )
                    ),
                    strict=True,
                )
            )
            return self.residuals(lambda x: functional_call(model, ps, (x,)))

        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return model, theta, blocks_at, self.loss


RESIDUAL_CASES = [
    ResidualCase(
        "poisson2d-mean", 2, _poisson_2d, lambda r: (r[0] ** 2).mean() + (r[1] ** 2).mean()
    ),
    ResidualCase(
        "convection-weighted-sum",
        2,
        _convection_1d,
        lambda r: 2.0 * (r[0] ** 2).sum() + 10.0 * (r[1] ** 2).mean() + 0.5 * (r[2] ** 2).mean(),
        seed=1,
    ),
    ResidualCase(
        # not a sum of squares: log-cosh-like terms and a product coupling the blocks
        "heat3d-general-loss",
        4,
        _heat_3d,
        lambda r: torch.log1p(r[0] ** 2).mean() + (r[1] ** 4).mean() + r[0].mean() * r[1].mean(),
        seed=2,
    ),
]


@pytest.fixture(params=RESIDUAL_CASES, ids=[c.name for c in RESIDUAL_CASES])
def rcase(request):
    return request.param


def _dense(case: ResidualCase):
    """Independent dense float64 oracle: (J, H_ℓ, G = JᵀH_ℓJ, ∇f) at θ."""
    model, theta, blocks_at, loss_of = case.build()
    sizes = [r.numel() for r in blocks_at(theta)]

    def stacked(th: Tensor) -> Tensor:
        return torch.cat([r.reshape(-1) for r in blocks_at(th)])

    def loss_of_flat(r: Tensor) -> Tensor:
        return loss_of(list(r.split(sizes)))

    J = torch.autograd.functional.jacobian(stacked, theta)
    r0 = stacked(theta).detach()
    H = torch.autograd.functional.hessian(loss_of_flat, r0)
    grad = torch.autograd.functional.jacobian(lambda th: loss_of_flat(stacked(th)), theta)
    return J, H, J.T @ H @ J, grad, sizes


def _product(case: ResidualCase) -> tuple[GGNProduct, list[Tensor]]:
    model, theta, blocks_at, loss_of = case.build()
    params = list(model.parameters())
    theta_p = torch.cat([p.reshape(-1) for p in params])  # with a graph to the parameters
    blocks = blocks_at(theta_p)
    return GGNProduct(loss_of(blocks), tuple(blocks), params), blocks


def test_residual_ggn_matches_dense_ggn(rcase):
    _, _, G, _, _ = _dense(rcase)
    prod, _ = _product(rcase)
    for seed in range(2):
        v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(seed), dtype=G.dtype)
        torch.testing.assert_close(prod(v), G @ v, **EXACT)


def test_residual_ggn_gradient_matches_dense_gradient(rcase):
    *_, grad, _ = _dense(rcase)
    prod, _ = _product(rcase)
    torch.testing.assert_close(prod.gradient, grad, **EXACT)


def test_residual_jacobian_products_match_dense_jacobian(rcase):
    J, _, _, _, sizes = _dense(rcase)
    prod, blocks = _product(rcase)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(J.shape[1], generator=gen, dtype=J.dtype)
    u = torch.randn(J.shape[0], generator=gen, dtype=J.dtype)
    for jac in (prod.jacobian, JacobianProduct(tuple(blocks), prod.params)):
        jv = jac.jvp(v)
        assert isinstance(jv, tuple) and len(jv) == len(blocks)
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in jv]), J @ v, **EXACT)
        torch.testing.assert_close(jac.vjp(tuple(u.split(sizes))), J.T @ u, **EXACT)
    assert prod.jacobian.shape == tuple(J.shape)


def test_residual_batched_products_match_single(rcase):
    prod, _ = _product(rcase)
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(3, prod.shape[0], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(prod.matmat(V), torch.stack([prod.matvec(v) for v in V]), **EXACT)


def test_residual_block_without_graph_or_unused_by_loss_contributes_nothing():
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    X = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], dtype=torch.float64)
    r1, r_const, r_unused = X @ w - 1.0, torch.ones(3, dtype=torch.float64), 5 * w
    loss = 3.0 * (r1**2).mean() + (r_const**2).sum()
    G = GGNProduct(loss, (r1, r_const, r_unused), [w])
    v = torch.tensor([0.3, 0.7], dtype=torch.float64)
    torch.testing.assert_close(G(v), 2 * 3.0 / 3 * X.T @ (X @ v), **EXACT)  # closed form


# --------------------------------------------------------------------------------------------
# the optimizer with physics-informed closures
# --------------------------------------------------------------------------------------------
def _poisson_closure(seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    g = torch.linspace(0, 1, 6, dtype=dtype)
    xi = torch.cartesian_prod(g[1:-1], g[1:-1])
    xb = torch.cat(
        [
            torch.stack([g, 0 * g], 1),
            torch.stack([g, 0 * g + 1], 1),
            torch.stack([0 * g, g], 1),
            torch.stack([0 * g + 1, g], 1),
        ]
    )
    f = 2 * math.pi**2 * torch.sin(math.pi * xi[:, 0]) * torch.sin(math.pi * xi[:, 1])

    def closure():
        x = xi.clone().requires_grad_(True)
        r_in = -_laplacian(net(x).squeeze(1), x) - f
        r_b = net(xb).squeeze(1)
        return (r_in**2).mean() + (r_b**2).mean(), (r_in, r_b)

    return net, closure


def test_pinn_closure_trains_with_hessianfree_for_several_steps():
    net, closure = _poisson_closure()
    opt = HessianFree(net.parameters(), damping=1e-2, cg_max_iter=20)
    first = float(closure()[0].detach())
    for _ in range(3):
        opt.step(closure)
    assert opt.last_step.closure_calls > 1  # evaluations (backtracking, line search) ran
    assert float(closure()[0].detach()) < first


def test_pinn_step_solves_the_damped_gauss_newton_system():
    # one undamped-line-search step equals θ0 - (G + λI)⁻¹ g with the dense oracle's G and g
    net, closure = _poisson_closure(seed=1)
    params = list(net.parameters())
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    loss, blocks = closure()

    def row(r_i: Tensor) -> Tensor:
        parts = torch.autograd.grad(r_i, params, retain_graph=True, allow_unused=True)
        return torch.cat(
            [
                (torch.zeros_like(p) if t is None else t).reshape(-1)
                for t, p in zip(parts, params, strict=True)
            ]
        )

    J = torch.stack([row(r_i) for b in blocks for r_i in b])
    sizes = [b.numel() for b in blocks]
    H = torch.autograd.functional.hessian(
        lambda r: sum((c**2).mean() for c in r.split(sizes)),
        torch.cat([b.detach() for b in blocks]),
    )
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
    lam = 1e-2
    expected = theta0 - torch.linalg.solve(J.T @ H @ J + lam * torch.eye(len(g), dtype=g.dtype), g)
    opt = HessianFree(
        params,
        damping=lam,
        backtrack=False,
        line_search=None,
        cg_max_iter=500,
        cg_rtol=1e-13,
        cg_progress_tol=1e-14,
    )
    opt.step(closure)
    theta1 = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(theta1, expected, rtol=1e-7, atol=1e-9)  # CG's rtol, not EXACT


def test_plain_closure_still_evaluates_under_no_grad():
    torch.manual_seed(0)
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    modes: list[bool] = []

    def closure():
        modes.append(torch.is_grad_enabled())
        out = X @ w
        return ((out - y) ** 2).mean(), out

    opt = HessianFree([w], damping=1e-3)
    for _ in range(2):
        opt.step(closure)
    # only the graph-building call of each step had grad mode; evaluations ran under no_grad
    assert modes[0] and sum(modes) == 2 and len(modes) > 2


def test_closure_with_aliased_grad_falls_back_to_grad_mode():
    # `grad` imported under another name escapes the watch: the failed no_grad call is repeated
    from torch.autograd import grad as derivative

    torch.manual_seed(0)
    a = torch.tensor([0.5, -0.3], dtype=torch.float64, requires_grad=True)
    x0 = torch.linspace(-1, 1, 7, dtype=torch.float64)
    modes: list[bool] = []

    def closure():
        modes.append(torch.is_grad_enabled())
        x = x0.clone().requires_grad_(True)
        u = a[0] * torch.sin(x) + a[1] * x**3
        (du,) = derivative(u.sum(), x, create_graph=True)
        r = du - torch.cos(x)  # u' = cos x  →  a = (1, 0)
        return (r**2).mean(), (r,)

    opt = HessianFree([a], damping=1e-6)
    for _ in range(3):
        opt.step(closure)
    torch.testing.assert_close(
        a.detach(), torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-6
    )
    assert opt._closure_uses_autograd and all(modes[-3:])


@pytest.mark.parametrize(
    "kwargs",
    [dict(curvature="fisher"), dict(precond="martens"), dict(structural_damping=0.1)],
    ids=str,
)
def test_residual_blocks_refuse_per_example_features(kwargs):
    net, closure = _poisson_closure()
    opt = HessianFree(net.parameters(), **kwargs)
    with pytest.raises(ValueError, match="residual blocks"):
        opt.step(closure)


def test_residual_closure_with_bad_block_is_rejected():
    w = torch.zeros(2, requires_grad=True)
    opt = HessianFree([w])
    with pytest.raises(TypeError, match="residual block 1"):
        opt.step(lambda: ((w**2).sum(), (w, "r")))
