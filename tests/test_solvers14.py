"""The public building blocks used on their own, without HessianFree (solvers14).

Each test pins a misuse that used to give a wrong answer or an error naming no argument:
products over a frozen parameter, ``ParamLayout.cat`` of misshapen tensors, a Nyström
preconditioner at zero damping, K-FAC's operator on a vector of the wrong size, and
preconditioner contexts without what they need. Oracles: dense float64 matrices from
``torch.autograd.functional`` / ``torch.func`` and eigendecompositions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessfree import (
    EmpiricalFisherDiagonal,
    FisherProduct,
    GGNProduct,
    HessianProduct,
    JacobianProduct,
    KFACPreconditioner,
    MCFisherProduct,
    NystromPreconditioner,
    ParamLayout,
    PrecondContext,
    StructurallyDampedGGN,
    cg,
    hvp,
    nystrom_sketch,
    trainable,
)

D = torch.float64


def _mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(seed), dtype=D)
    return model, x


def _ggn(model: nn.Module, x: torch.Tensor) -> GGNProduct:
    out = model(x)
    return GGNProduct(F.mse_loss(out, torch.zeros_like(out)), out, list(model.parameters()))


# ---- cg: a product or preconditioner that writes into CG's vector is refused ----
def _spd(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D)).Q
    A = Q @ torch.diag(torch.arange(1.0, n + 1, dtype=D)) @ Q.T
    return A, torch.randn(n, generator=gen, dtype=D)


def test_cg_refuses_a_product_that_modifies_its_argument():
    """Such a product gave CONVERGED with ‖Ax − b‖ = 1.4 (main, this system)."""
    A, b = _spd()
    with pytest.raises(ValueError, match="`matvec` modified its argument in place"):
        cg(lambda v: A @ v.mul_(1.0), b, rtol=1e-12)
    with pytest.raises(ValueError, match="`precond` modified its argument in place"):
        cg(lambda v: 2 * v, b, precond=lambda r: r.mul_(0.5), rtol=1e-12)
    with pytest.raises(ValueError, match="`matvec` modified"):  # float16: the rescaled copy
        cg(lambda v: v.mul_(2), b.half(), rtol=1e-3)
    # returning the argument itself (the identity) is no modification: the same solve
    plain = cg(lambda v: A @ v, b, rtol=1e-12)
    same = cg(lambda v: A @ v, b, precond=lambda r: r, rtol=1e-12)
    assert same.reason is plain.reason and same.num_iter == plain.num_iter
    assert torch.equal(same.x, plain.x)
    # CONVERGED tests the recurrence's r against rtol‖b‖; the true residual differs by rounding
    # (~1e-15 on this κ = 6 system), so twice rtol leaves room for it
    assert torch.linalg.vector_norm(A @ plain.x - b) <= 2e-12 * torch.linalg.vector_norm(b)


# ---- products: a frozen parameter is named, not autograd's "One of the differentiated ..." ----
_PRODUCTS = {
    "hessian": lambda loss, out, h, params: HessianProduct(loss, params),
    "ggn": lambda loss, out, h, params: GGNProduct(loss, out, params),
    "fisher": lambda loss, out, h, params: FisherProduct(loss, out, params),
    "mc_fisher": lambda loss, out, h, params: MCFisherProduct(
        loss, out, params, generator=torch.Generator().manual_seed(0)
    ),
    "jacobian": lambda loss, out, h, params: JacobianProduct(out, params),
    "structural": lambda loss, out, h, params: StructurallyDampedGGN(
        loss, out, h, params, weight=0.5
    ),
}


@pytest.mark.parametrize("kind", list(_PRODUCTS))
def test_products_name_a_frozen_parameter(kind):
    model, x = _mlp()
    model[0].bias.requires_grad_(False)
    h = torch.tanh(model[0](x))
    out = model[2](h)
    loss = F.mse_loss(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match=r"`params\[1\]` \(shape \(4,\)\) does not require grad"):
        _PRODUCTS[kind](loss, out, h, list(model.parameters()))
    # the fix the message names gives the product over the trained parameters
    P = _PRODUCTS[kind](loss, out, h, trainable(model))
    n = sum(p.numel() for p in trainable(model))
    assert (P.shape[1] if kind == "jacobian" else P.shape[0]) == n


def test_structurally_damped_ggn_refuses_residual_blocks():
    model, x = _mlp()
    h = torch.tanh(model[0](x))
    out = model[2](h)
    loss = F.mse_loss(out, torch.zeros_like(out))
    params = list(model.parameters())
    with pytest.raises(TypeError, match="`outputs` must be one tensor for StructurallyDampedGGN"):
        StructurallyDampedGGN(loss, (out,), h, params, weight=0.5)
    with pytest.raises(TypeError, match="`weight` must be a real number, got str"):
        StructurallyDampedGGN(loss, out, h, params, weight="0.5")


def test_structurally_damped_ggn_matches_its_formula():
    """(J_oᵀ H_ℓ J_o + w J_hᵀ J_h) v against Jacobians from torch.func.jacrev, in float64."""
    model, x = _mlp()
    params = list(model.parameters())
    layout = ParamLayout(params)
    names = [name for name, _ in model.named_parameters()]
    theta = layout.cat([p.detach() for p in params])

    def trajectory(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = dict(zip(names, layout.split(th), strict=True))
        hidden = torch.tanh(F.linear(x, p["0.weight"], p["0.bias"]))
        return F.linear(hidden, p["2.weight"], p["2.bias"]), hidden

    J_o = torch.func.jacrev(lambda th: trajectory(th)[0])(theta).reshape(-1, theta.numel())
    J_h = torch.func.jacrev(lambda th: trajectory(th)[1])(theta).reshape(-1, theta.numel())
    H_l = 2.0 * torch.eye(J_o.shape[0], dtype=D) / J_o.shape[0]  # mse_loss, mean over entries
    w = 0.7
    dense = J_o.T @ H_l @ J_o + w * J_h.T @ J_h
    h = torch.tanh(model[0](x))
    out = model[2](h)
    P = StructurallyDampedGGN(F.mse_loss(out, torch.zeros_like(out)), out, h, params, weight=w)
    V = torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(1), dtype=D)
    torch.testing.assert_close(P(V[0]), dense @ V[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(P.matmat(V), V @ dense, rtol=1e-10, atol=1e-12)


# ---- hvp: a list for x is named as such ----
def test_hvp_names_a_list_argument():
    a, c = torch.ones(2, dtype=D), torch.ones(3, dtype=D)

    def f(a, c):
        return (a**2).sum() * c.sum()

    with pytest.raises(TypeError, match=r"`x` must be a tensor or a tuple of tensors, got list"):
        hvp(f, [a, c], (a, c))
    with pytest.raises(TypeError, match=r"got list; pass tuple\(v\)"):
        hvp(f, (a, c), [a, c])


# ---- ParamLayout: cat checks what it flattens; split what it views ----
def test_param_layout_cat_refuses_misshapen_entries():
    layout = ParamLayout([torch.zeros(2, 3, dtype=D), torch.zeros(3, dtype=D)])
    with pytest.raises(ValueError, match=r"`tensors\[0\]` must have shape \(2, 3\).*got \(3, 2\)"):
        layout.cat([torch.zeros(3, 2, dtype=D), torch.zeros(3, dtype=D)])  # a transposed W
    with pytest.raises(ValueError, match=r"`tensors\[0\]` must have shape \(2, 3\).*got \(7,\)"):
        layout.cat([torch.zeros(7, dtype=D), torch.zeros(3, dtype=D)])
    with pytest.raises(ValueError, match="must hold 2 entries, one per parameter"):
        layout.cat([torch.zeros(2, 3, dtype=D)])
    with pytest.raises(TypeError, match=r"`tensors\[1\]` must have dtype torch.float64"):
        layout.cat([torch.zeros(2, 3, dtype=D), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"`vec` must be a flat vector of shape \(9,\)"):
        layout.split(torch.zeros(8, dtype=D))
    with pytest.raises(ValueError, match=r"got shape \(9, 1\)"):
        layout.split(torch.zeros(9, 1, dtype=D))


def test_param_layout_round_trips_strided_parameters():
    """channels_last, transposed and 0-element parameters flatten in logical row-major order."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(2, 3, 4, 5, generator=gen, dtype=D).to(memory_format=torch.channels_last)
    params = [conv, torch.randn(5, 4, generator=gen, dtype=D).T, torch.zeros(0, 3, dtype=D)]
    layout = ParamLayout(params)
    flat = layout.cat(params)
    torch.testing.assert_close(flat, torch.cat([p.reshape(-1) for p in params]), rtol=0, atol=0)
    back = layout.split(flat)
    assert [t.shape for t in back] == [p.shape for p in params]
    for t, p in zip(back, params, strict=True):
        assert torch.equal(t, p)
    # a strided flat vector splits too (a column of a batch of vectors)
    batch = torch.stack([flat, -flat], dim=1)
    assert torch.equal(layout.split(batch[:, 1])[0], -conv)


# ---- Nyström ----
def test_nystrom_sketch_recovers_a_low_rank_psd_matrix():
    """Rank-3 PSD matrix, sketch of rank 5: the three eigenvalues, then zeros; U spans them."""
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=D)).Q
    lam = torch.tensor([5.0, 3.0, 1.0, 0, 0, 0, 0, 0], dtype=D)
    A = Q @ torch.diag(lam) @ Q.T
    U, est = nystrom_sketch(lambda V: V @ A, 8, 5, generator=torch.Generator().manual_seed(1))
    # shift ν = √n ε ‖Y‖_F: exact up to a few hundred ulps of the largest eigenvalue
    torch.testing.assert_close(est, lam[:5], rtol=0, atol=1e-12)
    torch.testing.assert_close(U[:, :3] @ torch.diag(est[:3]) @ U[:, :3].T, A, rtol=0, atol=1e-12)


def test_nystrom_preconditioner_refuses_zero_damping():
    """A rank above the curvature's leaves zero eigenvalues: μ = 0 gave 0/0, a NaN P⁻¹r."""
    model, x = _mlp()
    G = _ggn(model, x)  # 6 examples x 2 outputs: rank <= 12 of 26 parameters
    ctx = PrecondContext(None, None, "mean", 1e-3, 0.0, curvature=G.matmat, gradient=G.gradient)
    P = NystromPreconditioner(rank=20)
    apply = P(ctx)
    assert float(P.eigenvalues[-1]) == 0.0  # the premise: a zero sketched eigenvalue
    assert torch.isfinite(apply(G.gradient)).all()
    for mu in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(
            ValueError, match=r"NystromPreconditioner needs a positive damping \(finite"
        ):
            P.apply_with(mu)


# ---- K-FAC used standalone ----
def test_kfac_operator_checks_its_vector_and_damping():
    model, x = _mlp()
    K = KFACPreconditioner(model)
    G = _ggn(model, x)
    ctx = PrecondContext(G.jacobian, G.output_grad, "mean", 1e-3, 0.0)
    apply = K(ctx)
    assert apply(G.gradient).shape == G.gradient.shape
    with pytest.raises(ValueError, match=r"`r` must be a flat vector of shape \(26,\).*\(5,\)"):
        apply(torch.ones(5, dtype=D))
    with pytest.raises(ValueError, match=r"positive damping \(finite, > 0\), got inf"):
        K.apply_with(list(model.parameters()), float("inf"))  # gave z = 0 for every r
    K.remove()


# ---- contexts ----
def test_precond_context_refuses_an_unknown_reduction():
    with pytest.raises(ValueError, match=r"Unknown `reduction` 'avg'; expected one of"):
        PrecondContext(None, None, "avg", 1.0, 0.0)


def test_empirical_fisher_diagonal_needs_the_outputs():
    model, x = _mlp()
    G = _ggn(model, x)
    ctx = PrecondContext(None, None, "mean", 1e-3, 0.0, curvature=G.matmat, gradient=G.gradient)
    with pytest.raises(ValueError, match="needs the outputs' Jacobian and output gradient"):
        EmpiricalFisherDiagonal()(ctx)
