"""Curvature-vector products against dense float64 oracles (torch.autograd.functional, SciPy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import rosen_hess_prod
from torch import nn

from cases import dense, flat_params, functional
from hessfree import (
    FisherProduct,
    GGNProduct,
    HessianFree,
    HessianProduct,
    JacobianProduct,
    hvp,
    loss_hessian_product,
)

EXACT = dict(rtol=1e-10, atol=1e-12)


def _vectors(n: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=gen, dtype=torch.float64)


def _at_point(case):
    model, x, y, loss_fn = case.build()
    params = list(model.parameters())
    out = model(x)
    return model, x, y, loss_fn, params, out, loss_fn(out, y)


def test_hessian_product_matches_dense_hessian(case):
    model, x, y, loss_fn, params, out, loss = _at_point(case)
    D = dense(model, x, y, loss_fn)
    H = HessianProduct(loss, params)
    for v in _vectors(D.H.shape[0]):
        torch.testing.assert_close(H(v), D.H @ v, **EXACT)
    torch.testing.assert_close(H.gradient, D.g, **EXACT)


def test_ggn_product_matches_dense_ggn(case):
    model, x, y, loss_fn, params, out, loss = _at_point(case)
    D = dense(model, x, y, loss_fn)
    G = GGNProduct(loss, out, params)
    for v in _vectors(D.G.shape[0]):
        torch.testing.assert_close(G(v), D.G @ v, **EXACT)
    torch.testing.assert_close(G.gradient, D.g, **EXACT)


def test_fisher_product_matches_per_example_gradients(case):
    model, x, y, loss_fn, params, out, loss = _at_point(case)
    D = dense(model, x, y, loss_fn)
    Fp = FisherProduct(loss, out, params, reduction=D.reduction)
    for v in _vectors(D.F.shape[0]):
        torch.testing.assert_close(Fp(v), D.F @ v, **EXACT)


def test_jacobian_products_match_dense_jacobian(case):
    model, x, y, loss_fn, params, out, loss = _at_point(case)
    D = dense(model, x, y, loss_fn)
    J = JacobianProduct(out, params)
    assert J.shape == tuple(D.J.shape)
    v = _vectors(D.J.shape[1], 1)[0]
    u = _vectors(D.J.shape[0], 1, seed=1)[0]
    torch.testing.assert_close(J.jvp(v).reshape(-1), D.J @ v, **EXACT)
    torch.testing.assert_close(J.vjp(u.view_as(out)), D.J.T @ u, **EXACT)


def test_batched_products_match_single(case):
    model, x, y, loss_fn, params, out, loss = _at_point(case)
    n = sum(p.numel() for p in params)
    V = _vectors(n, 4)
    for prod in (HessianProduct(loss, params), GGNProduct(loss, out, params)):
        expected = torch.stack([prod.matvec(v) for v in V])
        torch.testing.assert_close(prod.matmat(V), expected, **EXACT)


def test_matmat_refuses_columns_and_vectors_and_takes_zero_rows():
    # V is (k, n), one vector per row: a 1-D vector, V with n rows (columns), or a wrong n
    # failed inside torch (IndexError, split_with_sizes) after a wasted batched attempt; zero
    # rows failed in autograd. Oracle for the rows: a closed form, ½‖Xθ‖² has H = XᵀX.
    X = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], dtype=torch.float64)
    theta = torch.ones(3, dtype=torch.float64, requires_grad=True)
    H = HessianProduct(0.5 * (X @ theta).square().sum(), [theta])
    V = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(H.matmat(V), V @ (X.T @ X), **EXACT)
    assert H.matmat(V[:0]).shape == (0, 3)
    for bad in (V[0], V[:, :2], torch.ones(3, 2, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"`V` must be a \(k, 3\) tensor"):
            H.matmat(bad)


def test_products_are_symmetric(case):
    model, x, y, loss_fn, params, out, loss = _at_point(case)
    n = sum(p.numel() for p in params)
    u, v = _vectors(n, 2, seed=5)
    for prod in (HessianProduct(loss, params), GGNProduct(loss, out, params)):
        torch.testing.assert_close(u @ prod(v), v @ prod(u), **EXACT)


def test_repeated_products_agree():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    out = model(x)
    G = GGNProduct(F.mse_loss(out, torch.zeros_like(out)), out, list(model.parameters()))
    v = torch.randn(G.shape[0], dtype=torch.float64)
    assert torch.equal(G(v), G(v))


def test_ggn_equals_hessian_for_linear_model_with_mse():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    out = model(x)
    loss = F.mse_loss(out, y)
    params = list(model.parameters())
    H, G = HessianProduct(loss, params), GGNProduct(loss, out, params)
    for v in _vectors(H.shape[0]):
        torch.testing.assert_close(G(v), H(v), **EXACT)


def test_least_squares_closed_form():
    """½‖Xθ − y‖² has H = G = XᵀX."""
    torch.manual_seed(1)
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    out = X @ theta
    loss = 0.5 * ((out - y) ** 2).sum()
    v = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(GGNProduct(loss, out, [theta])(v), X.T @ X @ v, **EXACT)
    torch.testing.assert_close(HessianProduct(loss, [theta])(v), X.T @ X @ v, **EXACT)


@pytest.mark.parametrize(
    "name", ["mse_mean", "mse_sum", "ce_mean", "ce_sum", "ce_ignore", "bce_mean", "bce_sum"]
)
def test_closed_form_loss_hessian_matches_double_backward(name):
    torch.manual_seed(2)
    o = torch.randn(6, 4, dtype=torch.float64, requires_grad=True) * 1.0
    reduction = name.split("_")[1] if name != "ce_ignore" else "mean"
    if name.startswith("mse"):
        loss = F.mse_loss(o, torch.randn(6, 4, dtype=torch.float64), reduction=reduction)
    elif name.startswith("ce"):
        y = torch.randint(0, 4, (6,))
        if name == "ce_ignore":
            y[[1, 4]] = -100
        loss = F.cross_entropy(o, y, reduction=reduction)
    else:
        loss = F.binary_cross_entropy_with_logits(
            o, torch.rand(6, 4, dtype=torch.float64), reduction=reduction
        )
    hl = loss_hessian_product(loss, o)
    assert hl is not None, "closed form not recognised"
    from torch.autograd.functional import hessian

    HL = hessian(lambda z: _reloss(name, z.view(6, 4), loss), o.detach().reshape(-1))
    w = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(hl(w).reshape(-1), HL @ w.reshape(-1), **EXACT)
    # batched form: a leading dimension of vectors
    W = torch.randn(3, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(hl(W), torch.stack([hl(wi) for wi in W]), **EXACT)


@pytest.mark.parametrize("scale", ["div", "mul", "rmul", "tensor_div"])
def test_closed_form_sees_through_constant_factors(scale):
    torch.manual_seed(8)
    o = torch.randn(5, 3, dtype=torch.float64, requires_grad=True) * 1.0
    base = F.cross_entropy(o, torch.randint(0, 3, (5,)), reduction="sum")
    loss = {
        "div": base / 5,
        "mul": base * 0.2,
        "rmul": 0.2 * base,
        "tensor_div": base / torch.tensor(5.0, dtype=torch.float64),
    }[scale]
    hl = loss_hessian_product(loss, o)
    assert hl is not None
    (go,) = torch.autograd.grad(loss, o, create_graph=True)
    w = torch.randn(5, 3, dtype=torch.float64)
    (expected,) = torch.autograd.grad(go, o, w)
    torch.testing.assert_close(hl(w), expected, **EXACT)
    # a factor that depends on the outputs is not a constant: no closed form
    assert loss_hessian_product(base / o.sum().detach().requires_grad_(), o) is None


def _reloss(name, z, loss):
    node = loss.grad_fn
    if name.startswith("mse"):
        return F.mse_loss(z, node._saved_target, reduction=name.split("_")[1])
    if name.startswith("ce"):
        return F.cross_entropy(
            z, node._saved_target, reduction="mean" if name != "ce_sum" else "sum"
        )
    return F.binary_cross_entropy_with_logits(z, node._saved_target, reduction=name.split("_")[1])


def test_unrecognised_loss_falls_back_to_double_backward():
    torch.manual_seed(3)
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    out = model(x)
    loss = (out**4).mean() + F.cross_entropy(
        out, torch.tensor([0, 1, 0, 1, 1]), label_smoothing=0.1
    )
    assert loss_hessian_product(loss, out) is None
    labels = torch.tensor([0, 1, 0, 1, 1])
    D = dense(
        model, x, labels, lambda o, t: (o**4).mean() + F.cross_entropy(o, t, label_smoothing=0.1)
    )
    v = torch.randn(D.G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(GGNProduct(loss, out, list(model.parameters()))(v), D.G @ v, **EXACT)


def _mixture_nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two-component Gaussian mixture NLL; outputs (logits, means, log-scales)."""
    logit, mu, log_s = out[:, :2], out[:, 2:4], out[:, 4:]
    log_n = -0.5 * ((y - mu) / log_s.exp()) ** 2 - log_s
    return -torch.logsumexp(F.log_softmax(logit, 1) + log_n, 1).mean()


def _gaussian_nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Heteroscedastic Gaussian NLL in (mean, log-variance)."""
    return F.gaussian_nll_loss(out[:, :1], y, out[:, 1:].exp(), reduction="sum")


NONCONVEX = {"mixture": (_mixture_nll, 6), "gaussian_nll": (_gaussian_nll, 2)}


def _nonconvex_fit(name: str):
    """A float64 tanh MLP on 5 points under a loss not convex in its outputs, and its dense
    oracles (``cases.dense``: J, H_ℓ's Jᵀ H_ℓ J, ...)."""
    loss_fn, k = NONCONVEX[name]
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, k)).double()
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
    y = torch.sin(3 * x)
    return model, x, y, loss_fn, dense(model, x, y, loss_fn)


def _nonconvex_case(name: str):
    """A tanh MLP under a loss not convex in its outputs, and the dense float64 oracle
    Jᵀ|H_ℓ|J: H_ℓ from autograd.functional.hessian, |·| per example's block (numpy eigh)."""
    from torch.autograd.functional import hessian

    model, x, y, loss_fn, D = _nonconvex_fit(name)
    k = NONCONVEX[name][1]
    out = model(x).detach()
    HL = hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1)).numpy()
    absolute = np.zeros_like(HL)
    negative = False
    for i in range(out.shape[0]):
        block = slice(i * k, (i + 1) * k)
        lam, U = np.linalg.eigh(HL[block, block])
        negative |= bool(lam.min() < -1e-8 * abs(lam).max())
        absolute[block, block] = (U * abs(lam)) @ U.T
    assert negative  # the premise: H_ℓ is indefinite here
    G = D.J.T @ torch.from_numpy(absolute) @ D.J
    out = model(x)
    params = list(model.parameters())
    return GGNProduct(loss_fn(out, y), out, params, loss_hessian="absolute"), G


@pytest.mark.parametrize("name", sorted(NONCONVEX))
def test_ggn_of_a_nonconvex_loss_uses_absolute_loss_hessian_blocks(name):
    G, oracle = _nonconvex_case(name)
    V = _vectors(oracle.shape[0])
    for v in V:
        torch.testing.assert_close(G(v), oracle @ v, **EXACT)
    torch.testing.assert_close(G.matmat(V), V @ oracle.T, **EXACT)
    torch.testing.assert_close(G.diagonal(), oracle.diagonal(), **EXACT)


@pytest.mark.parametrize("name", sorted(NONCONVEX))
def test_ggn_of_a_nonconvex_loss_is_semidefinite(name):
    G, _ = _nonconvex_case(name)
    n = G.shape[0]
    M = torch.stack([G(e) for e in torch.eye(n, dtype=torch.float64)], 1)
    lam = torch.linalg.eigvalsh(0.5 * (M + M.T))
    assert G.positive_semidefinite
    assert lam.min() >= -1e-12 * lam.abs().max(), lam.min()


@pytest.mark.parametrize("name", sorted(NONCONVEX))
def test_ggn_keeps_the_exact_loss_hessian_of_a_nonconvex_loss_by_default(name):
    # the operators' G is Jᵀ H_ℓ J as defined (indefinite here); only 'absolute' takes |·|
    model, x, y, loss_fn, D = _nonconvex_fit(name)
    out = model(x)
    oracle = D.G  # Jᵀ H_ℓ J from autograd.functional
    assert torch.linalg.eigvalsh(oracle).min() < 0  # the premise: indefinite
    G = GGNProduct(loss_fn(out, y), out, list(model.parameters()))
    for v in _vectors(oracle.shape[0]):
        torch.testing.assert_close(G(v), oracle @ v, **EXACT)
    with pytest.raises(ValueError, match="'exact' or 'absolute', got 'abs'"):
        GGNProduct(loss_fn(out, y), out, list(model.parameters()), loss_hessian="abs")


def test_optimizer_uses_absolute_loss_hessian_blocks(monkeypatch):
    # HessianFree's Gauss-Newton products must be semidefinite for CG: it asks for |H_ℓ|
    import hessfree.optimizer as optimizer_module

    made = []

    class Spy(GGNProduct):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("loss_hessian"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(optimizer_module, "GGNProduct", Spy)
    model, x, y, loss_fn, _ = _nonconvex_fit("mixture")
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        return loss_fn(out, y), out

    opt.step(closure)
    assert made and set(made) == {"absolute"}


def test_ggn_keeps_the_exact_loss_hessian_of_a_loss_coupling_the_examples():
    # indefinite but not a sum over examples: no per-example blocks to take |·| of
    torch.manual_seed(6)
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)

    from torch.autograd.functional import hessian, jacobian

    def coupled(o):
        return (o.mean(0) ** 2).sum() - 0.5 * (o**2).mean()

    f = functional(model)
    J = jacobian(lambda t: f(t, x).reshape(-1), flat_params(model))
    out = model(x)
    params = list(model.parameters())
    HL = hessian(lambda o: coupled(o.view(5, 2)), out.detach().reshape(-1))
    oracle = J.T @ HL @ J
    assert torch.linalg.eigvalsh(oracle).min() < 0  # the premise: indefinite
    G = GGNProduct(coupled(out), out, params)
    for v in _vectors(oracle.shape[0]):
        torch.testing.assert_close(G(v), oracle @ v, **EXACT)


def test_ggn_gradient_includes_a_direct_regulariser():
    torch.manual_seed(4)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    params = list(model.parameters())
    out = model(x)
    loss = F.mse_loss(out, y) + 0.3 * model.weight.pow(2).sum()
    expected = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]
    )
    torch.testing.assert_close(GGNProduct(loss, out, params).gradient, expected, **EXACT)


def test_unused_parameters_give_zero_blocks():
    # allow_unused semantics: a parameter the loss does not use has zero rows and columns
    torch.manual_seed(5)
    used = nn.Linear(3, 2).double()
    unused = nn.Linear(2, 2).double()
    params = list(used.parameters()) + list(unused.parameters())
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    out = used(x)
    loss = F.mse_loss(out, y)
    D = dense(used, x, y, F.mse_loss)
    n_used = D.H.shape[0]
    n = sum(p.numel() for p in params)

    def padded(M):
        Z = torch.zeros(n, n, dtype=torch.float64)
        Z[:n_used, :n_used] = M
        return Z

    v = _vectors(n, k=1)[0]
    for prod, M in (
        (HessianProduct(loss, params), D.H),
        (GGNProduct(loss, out, params), D.G),
        (FisherProduct(loss, out, params), D.F),
    ):
        torch.testing.assert_close(prod(v), padded(M) @ v, **EXACT)
        torch.testing.assert_close(prod.gradient[:n_used], D.g, **EXACT)
        assert torch.equal(prod.gradient[n_used:], torch.zeros(n - n_used, dtype=torch.float64))
    J = JacobianProduct(out, params)
    torch.testing.assert_close(J.jvp(v).reshape(-1), D.J @ v[:n_used], **EXACT)


def test_loss_reaching_no_parameter_is_refused():
    # Every product and the gradient would be silently zero: a wrong `params`, said so.
    model, other = nn.Linear(3, 2).double(), nn.Linear(2, 2).double()
    params = list(other.parameters())
    x = torch.randn(4, 3, dtype=torch.float64)
    out = model(x)
    loss = F.mse_loss(out, torch.zeros_like(out))
    v = torch.ones(6, dtype=torch.float64)
    for build in (
        lambda: HessianProduct(loss, params),
        lambda: GGNProduct(loss, out, params),
        lambda: FisherProduct(loss, out, params),
        lambda: JacobianProduct(out, params).jvp(v),
        lambda: JacobianProduct(out, params).vjp(torch.ones_like(out)),
    ):
        with pytest.raises(ValueError, match="does not depend on any of the 2 tensor"):
            build()


def test_ggn_with_outputs_unused_but_regulariser_is_zero_curvature():
    # The loss reaches θ directly (a regulariser) but not through the outputs: G = 0, g = ∇R.
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = torch.randn(4, 2, dtype=torch.float64, requires_grad=True) * 2.0
    loss = F.mse_loss(out, torch.zeros_like(out)) + (w**2).sum()
    G = GGNProduct(loss, out, [w])
    v = torch.ones(3, dtype=torch.float64)
    assert torch.equal(G(v), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(G.gradient, 2 * w.detach(), **EXACT)


def test_loss_linear_in_params_has_zero_hessian():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    H = HessianProduct((2 * w).sum(), [w])
    assert torch.equal(H(torch.ones(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------- hvp()
def test_hvp_of_function_not_reaching_x_is_zero():
    # hvp's x is the point, not a parameter list: a function constant in x has H = 0.
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, dtype=torch.float64)
    out = hvp(lambda x: (w**3).sum() + 0 * x.detach().sum(), x, torch.ones(3, dtype=torch.float64))
    assert torch.equal(out, torch.zeros(3, dtype=torch.float64))


def test_hvp_matches_scipy_rosen_hess_prod():
    def rosen(x):
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    rng = np.random.default_rng(0)
    x, v = rng.normal(size=10), rng.normal(size=10)
    out = hvp(rosen, torch.from_numpy(x), torch.from_numpy(v))
    np.testing.assert_allclose(out.numpy(), rosen_hess_prod(x, v), rtol=1e-12, atol=1e-10)


def test_hvp_tuple_input_matches_dense():
    torch.manual_seed(6)
    A = torch.randn(3, 2, dtype=torch.float64)

    def f(a, b):
        return (a.sin() @ A @ b.exp()).sum() + (a**2).sum() * (b**3).sum()

    a, b = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    va, vb = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda z: f(z[:3], z[3:]), torch.cat([a, b]))
    expected = H @ torch.cat([va, vb])
    ha, hb = hvp(f, (a, b), (va, vb))
    torch.testing.assert_close(torch.cat([ha, hb]), expected, **EXACT)
    ha2, hb2 = hvp(f, (a, b), torch.cat([va, vb]))
    torch.testing.assert_close(torch.cat([ha2, hb2]), expected, **EXACT)


def test_hvp_keeps_input_shape_and_does_not_modify_x():
    x = torch.randn(2, 3, dtype=torch.float64)
    x0 = x.clone()
    out = hvp(lambda z: (z**3).sum(), x, torch.ones(2, 3, dtype=torch.float64))
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, 6 * x0, **EXACT)
    assert torch.equal(x, x0) and not x.requires_grad


def test_worked_example_matches_hand_derived_backward():
    """z = wx + b, y = σ(z), L = ½(y − t)², R = ½w², 𝓛 = L + λR."""
    x, t, lam = 1.5, 0.25, 0.1
    theta = torch.tensor([0.7, -0.3], dtype=torch.float64, requires_grad=True)  # (w, b)

    def objective(th):
        w, b = th
        z = w * x + b
        y = torch.sigmoid(z)
        return 0.5 * (y - t) ** 2 + lam * 0.5 * w**2

    (grad,) = torch.autograd.grad(objective(theta), theta)
    # the backward pass by hand
    w, b = theta.detach()
    z = w * x + b
    y = torch.sigmoid(z)
    L_bar, R_bar = 1.0, lam
    y_bar = L_bar * (y - t)
    z_bar = y_bar * y * (1 - y)
    w_bar = z_bar * x + R_bar * w
    b_bar = z_bar
    torch.testing.assert_close(grad, torch.stack([w_bar, b_bar]), **EXACT)
    x_input = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (x_grad,) = torch.autograd.grad(0.5 * (torch.sigmoid(w * x_input + b) - t) ** 2, x_input)
    torch.testing.assert_close(x_grad, z_bar * w, **EXACT)
    H = torch.autograd.functional.hessian(objective, theta.detach())
    v = torch.tensor([1.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(hvp(objective, theta.detach(), v), H @ v, **EXACT)


# ---------------------------------------------------------------------------------- errors
def test_non_scalar_loss_is_rejected():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"`loss` must be a scalar.*shape \(3,\)"):
        HessianProduct(w * 2, [w])


def test_loss_without_graph_is_rejected():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="no autograd graph"):
        HessianProduct(torch.tensor(1.0), [w])


def test_loss_not_a_tensor_is_rejected():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match="`loss` must be a torch.Tensor, got float"):
        HessianProduct(1.0, [w])


def test_vector_of_wrong_shape_dtype_or_device_is_rejected_and_nan_propagates():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    H = HessianProduct((w**3).sum(), [w])
    with pytest.raises(ValueError, match=r"shape \(3,\), got shape \(4,\)"):
        H(torch.ones(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype torch.float64, got torch.float32"):
        H(torch.ones(3))
    # values are not read back (no host sync): a NaN in v gives a NaN in Hv
    assert torch.isnan(H(torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64))).any()
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        H([1.0, 2.0, 3.0])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            H(torch.ones(3, dtype=torch.float64, device="cuda"))


def test_outputs_without_graph_and_loss_not_depending_on_outputs():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="`outputs` has no autograd graph"):
        JacobianProduct(torch.ones(3), [w])
    out = w * 2
    with pytest.raises(ValueError, match="does not depend on `outputs`"):
        GGNProduct((w**2).sum(), out, [w])
    with pytest.raises(ValueError, match="Unknown `reduction` 'avg'"):
        FisherProduct((out**2).sum(), out, [w], reduction="avg")


def test_hvp_bad_inputs():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"`v` must have shape \(3,\), got \(2,\)\.$"):
        hvp(lambda z: (z**2).sum(), x, torch.zeros(2))  # (3,) once, not "(3,) or (3,)"
    with pytest.raises(ValueError, match=r"`v` must have shape \(2, 3\) or \(6,\), got \(5,\)"):
        hvp(lambda z: (z**2).sum(), torch.zeros(2, 3), torch.zeros(5))
    with pytest.raises(TypeError, match="floating-point"):
        hvp(lambda z: (z**2).sum(), torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="`f\\(x\\)` must be a scalar"):
        hvp(lambda z: z**2, x, torch.zeros(3))
    inf_v = torch.tensor([0.0, float("inf"), 0.0])
    assert not torch.isfinite(hvp(lambda z: (z**2).sum(), x, inf_v)).all()


@pytest.mark.cuda
def test_products_on_cuda_match_cpu(case):
    model, x, y, loss_fn = case.build(device="cuda")
    params = list(model.parameters())
    out = model(x)
    loss = loss_fn(out, y)
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, device="cuda")
    D = dense(*case.build())
    torch.testing.assert_close(GGNProduct(loss, out, params)(v).cpu(), D.G @ v.cpu(), **EXACT)
    torch.testing.assert_close(HessianProduct(loss, params)(v).cpu(), D.H @ v.cpu(), **EXACT)


def test_structurally_damped_ggn_matches_dense_ggn_plus_hidden_term():
    torch.manual_seed(7)
    from cases import UnrolledRNN, flat_params
    from hessfree import StructurallyDampedGGN

    model = UnrolledRNN(2, 3, 1).double()
    x, y = torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)

    def hidden_of(m, inp):
        h = inp.new_zeros(inp.shape[0], 3)
        hs = []
        for t in range(inp.shape[1]):
            h = m.cell(inp[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1)

    params = list(model.parameters())
    hs = hidden_of(model, x)
    out = model.readout(hs[:, -1])
    loss = F.mse_loss(out, y)
    P = StructurallyDampedGGN(loss, out, hs, params, weight=0.7)
    D = dense(model, x, y, F.mse_loss)
    theta = flat_params(model)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in params]
    shapes = [p.shape for p in params]

    def split(t):
        return dict(zip(names, [c.view(sh) for c, sh in zip(t.split(sizes), shapes)]))  # noqa: B905

    Jh = torch.autograd.functional.jacobian(
        lambda t: _call_hidden(model, split(t), x, hidden_of),
        theta,
    )
    expected = D.G + 0.7 * Jh.T @ Jh
    V = _vectors(theta.numel(), 3)
    for v in V:
        torch.testing.assert_close(P(v), expected @ v, **EXACT)
    torch.testing.assert_close(P.matmat(V), V @ expected.T, **EXACT)
    torch.testing.assert_close(P.hidden_energy(V), ((V @ Jh.T) ** 2).sum(1), **EXACT)
    with pytest.raises(ValueError, match="`weight` must be >= 0"):
        StructurallyDampedGGN(loss, out, hs, params, weight=-1.0)


def _call_hidden(model, parts, x, hidden_of):
    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inp):
            return hidden_of(self.m, inp)

    return torch.func.functional_call(
        Wrapper(model), {f"m.{k}": v for k, v in parts.items()}, (x,)
    ).reshape(-1)


def test_fisher_product_does_not_build_the_loss_hessian_it_replaces(monkeypatch):
    import hessfree.curvature as curvature_module

    calls = []
    real = curvature_module.loss_hessian_product
    monkeypatch.setattr(
        curvature_module, "loss_hessian_product", lambda *a: calls.append(1) or real(*a)
    )
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = torch.randn(5, 4, dtype=torch.float64) @ W.T
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1]))
    FisherProduct(loss, out, [W])
    assert calls == []
    GGNProduct(loss, out, [W])
    assert calls == [1]


def test_jacobian_batched_products_keep_their_former_names():
    assert JacobianProduct.jmp is JacobianProduct.batched_jvp
    assert JacobianProduct.vmp is JacobianProduct.batched_vjp


@pytest.mark.parametrize(
    ("call", "arg", "match"),
    [
        ("jvp", torch.zeros(5), r"`v` must be a flat tensor of shape \(8,\), .* got shape \(5,\)"),
        ("jvp", torch.zeros(8, 1), r"got shape \(8, 1\)"),
        ("jvp", [0.0] * 8, r"got list"),
        ("vjp", torch.zeros(4, 3), r"`u` must be shaped like the outputs, \(4, 2\), got \(4, 3\)"),
        ("vjp", torch.zeros(8), r"got \(8,\)"),
    ],
)
def test_jacobian_products_name_a_vector_of_the_wrong_shape(call, arg, match):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)  # 8 parameter entries, outputs (4, 2)
    J = JacobianProduct(lin(torch.randn(4, 3)), list(lin.parameters()))
    with pytest.raises(ValueError, match=match):
        getattr(J, call)(arg)
    v = torch.randn(8)  # and the right shapes still agree with each other: <u, Jv> = <J'u, v>
    u = torch.randn(4, 2)
    torch.testing.assert_close((u * J.jvp(v)).sum(), J.vjp(u) @ v)


def test_fisher_of_a_masked_loss_counts_every_row_unless_given_the_masked_rows():
    # FisherProduct's docstring: a mean over M of N rows gives (N/M) × the M rows' Fisher;
    # outputs = the masked rows gives it exactly (oracle: per-example gradients by autograd)
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 4, (12,))
    mask = torch.tensor([0, 3, 4, 9])
    params = list(model.parameters())
    rows = []
    for i in mask:
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    G = torch.stack(rows)
    fisher = G.T @ G / len(mask)  # (1/M) Σ ∇ℓ_i ∇ℓ_iᵀ over the counted rows
    o = model(x)
    om = o[mask]
    loss = F.cross_entropy(om, y[mask])
    every_row = FisherProduct(loss, o, params)
    counted = FisherProduct(loss, om, params)
    for v in _vectors(fisher.shape[0]):
        torch.testing.assert_close(counted(v), fisher @ v, **EXACT)
        torch.testing.assert_close(every_row(v), 12 / 4 * (fisher @ v), **EXACT)


def test_engine_fast_path_equals_torch_autograd_grad(monkeypatch):
    """``_grad``'s direct engine call (unbatched products) gives torch.autograd.grad's bits,
    for the Hessian, Gauss-Newton and Jacobian products, and a tensor subclass that overrides
    torch functions takes the public path."""
    import hessfree.curvature as curvature_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model = model.double()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    u = torch.randn(10, 3, dtype=torch.float64)

    def products() -> list[torch.Tensor]:
        out = model(X)
        loss = torch.nn.functional.mse_loss(out, y)
        J = JacobianProduct(out, params)
        return [
            HessianProduct(loss, params).matvec(v),
            GGNProduct(loss, out, params).matvec(v),
            J.jvp(v),
            J.vjp(u),
        ]

    calls = []
    engine = curvature_module._engine_run_backward
    monkeypatch.setattr(
        curvature_module,
        "_engine_run_backward",
        lambda *a, **k: calls.append(1) or engine(*a, **k),
    )
    fast = products()
    assert calls, "the fast path was not taken: the comparison would be vacuous"
    monkeypatch.setattr(curvature_module, "_FAST_GRAD", False)
    public = products()
    for a, b in zip(fast, public, strict=True):
        assert torch.equal(a, b)

    class Logged(torch.Tensor):  # overrides torch functions: must not reach the engine directly
        pass

    monkeypatch.setattr(curvature_module, "_FAST_GRAD", True)
    calls.clear()
    w = torch.randn(3, dtype=torch.float64).as_subclass(Logged).requires_grad_()
    H = HessianProduct((w**3).sum(), [w])
    dense = torch.diag(6 * w.detach().as_subclass(torch.Tensor))
    torch.testing.assert_close(
        H.matvec(torch.ones(3, dtype=torch.float64)).as_subclass(torch.Tensor),
        dense @ torch.ones(3, dtype=torch.float64),
    )
    assert not calls
