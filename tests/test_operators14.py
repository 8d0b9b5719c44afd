"""The SciPy operators under uses no earlier round tried (operators14), each against an oracle.

Oracles: explicit float64 Hessians and Jacobians from ``torch.autograd.functional`` on a
flat parameter vector, and per-example gradients for the empirical Fisher. Every test is
seeded and deterministic; float64 throughout, so 1e-12 bounds the rounding of a 16x16 product.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian

from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    MCFisherLinearOperator,
)

# --------------------------------------------------------------------------------------------
# params: a tensor and a view of it
# --------------------------------------------------------------------------------------------


def _linear_data() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    return model, torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)


@pytest.mark.parametrize(
    "views",
    [
        lambda w: [w, w.view(-1)],  # the lead's case: the view had zero rows
        lambda w: [w[0], w],  # a view first
        lambda w: [w[:, 0], w[:, 1:]],  # two views of one tensor, neither the model's own
    ],
)
def test_params_sharing_memory_are_refused_naming_both(views):
    model, x, y = _linear_data()
    params = views(model.weight)
    match = r"`params\[1\]` \(shape .*\) shares memory with `params\[0\]`"
    with pytest.raises(ValueError, match=match):
        HessianLinearOperator(model, nn.MSELoss(), (x, y), params=params)
    with pytest.raises(ValueError, match=match):
        JacobianLinearOperator(model, x, params=params)


def test_disjoint_slices_of_one_buffer_a_callable_model_uses_are_exact():
    """Parameters viewed from one flat buffer, used by the model as those views, overlap in
    no byte: accepted, and the Hessian equals the dense one of the buffer."""
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    flat = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w, b = flat[:3].view(1, 3), flat[3:]

    def model(inputs: Tensor) -> Tensor:
        return torch.tanh(inputs @ w.T + b)

    H = HessianLinearOperator(model, nn.MSELoss(), (x, y), params=[w, b])

    def loss(f: Tensor) -> Tensor:
        return nn.functional.mse_loss(torch.tanh(x @ f[:3].view(1, 3).T + f[3:]), y)

    dense = hessian(loss, flat.detach()).numpy()
    np.testing.assert_allclose(H @ np.eye(4), dense, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# a model of two heads
# --------------------------------------------------------------------------------------------


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.a(x), self.b(x)


def _two_head_loss(o: tuple[Tensor, Tensor], t: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.mse_loss(o[0], t[0]) + nn.functional.mse_loss(o[1], t[1])


@pytest.mark.parametrize("cls", [GGNLinearOperator, FisherLinearOperator, MCFisherLinearOperator])
def test_two_headed_model_gets_a_clear_error_with_the_fix(cls):
    """Tuple outputs are refused before any product, with the cat-the-heads fix; the
    concatenated model the message suggests then gives the dense GGN."""
    torch.manual_seed(2)
    model = _TwoHeads().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"got a tuple of 2 .*torch\.cat of the heads"):
        cls(model, _two_head_loss, (x, y))
    with pytest.raises(TypeError, match=r"got a tuple of 2"):
        JacobianLinearOperator(model, x)


def test_two_heads_concatenated_as_the_message_says_give_the_dense_ggn():
    torch.manual_seed(3)
    model = _TwoHeads().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)

    def cat_model(inputs: Tensor) -> Tensor:
        return torch.cat(model(inputs), dim=1)

    def loss_fn(o: Tensor, t: Tensor) -> Tensor:
        return _two_head_loss((o[:, :2], o[:, 2:]), (t[:, :2], t[:, 2:]))

    params = list(model.parameters())
    G = GGNLinearOperator(cat_model, loss_fn, (x, y), params=params) @ np.eye(12)
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def outputs(f: Tensor) -> Tensor:  # f = (a.weight, a.bias, b.weight, b.bias)
        a = x @ f[:6].view(2, 3).T + f[6:8]
        b = x @ f[8:11].view(1, 3).T + f[11:]
        return torch.cat([a, b], dim=1)

    Jd = jacobian(lambda f: outputs(f).reshape(-1), flat)
    Hl = hessian(lambda o: loss_fn(o.view(4, 3), y), outputs(flat).reshape(-1))
    np.testing.assert_allclose(G, (Jd.T @ Hl @ Jd).numpy(), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# complex outputs
# --------------------------------------------------------------------------------------------


class _Complex:
    """A linear map to 2 complex outputs per example, its squared-error loss, and the dense
    float64 oracles on the flat parameter vector ``(weight (4, 3), bias (4,))``."""

    def __init__(self) -> None:
        torch.manual_seed(4)
        self.lin = nn.Linear(3, 4).double()
        self.x = torch.randn(5, 3, dtype=torch.float64)
        self.t = torch.randn(5, 2, dtype=torch.complex128)
        self.params = list(self.lin.parameters())
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])

    def model(self, x: Tensor) -> Tensor:
        o = self.lin(x)
        return torch.complex(o[:, :2], o[:, 2:])

    @staticmethod
    def loss_fn(o: Tensor, t: Tensor) -> Tensor:
        return ((o - t).abs() ** 2).mean()

    def outputs_at(self, f: Tensor, rows: slice = slice(None)) -> Tensor:
        o = self.x[rows] @ f[:12].view(4, 3).T + f[12:]
        return torch.complex(o[:, :2], o[:, 2:])


def test_complex_outputs_hessian_ggn_and_fisher_equal_dense_oracles():
    c = _Complex()
    eye = np.eye(16)
    H = HessianLinearOperator(c.model, c.loss_fn, (c.x, c.t), params=c.params) @ eye
    Hd = hessian(lambda f: c.loss_fn(c.outputs_at(f), c.t), c.flat).numpy()
    np.testing.assert_allclose(H, Hd, rtol=0, atol=1e-12)

    # GGN: J^T H_l J over the real view of the outputs (real and imaginary parts)
    real = lambda f: torch.view_as_real(c.outputs_at(f)).reshape(-1)  # noqa: E731
    Jd = jacobian(real, c.flat)
    Hl = hessian(lambda r: c.loss_fn(torch.view_as_complex(r.view(5, 2, 2)), c.t), real(c.flat))
    G = GGNLinearOperator(c.model, c.loss_fn, (c.x, c.t), params=c.params) @ eye
    np.testing.assert_allclose(G, (Jd.T @ Hl @ Jd).numpy(), rtol=0, atol=1e-12)

    # empirical Fisher ('mean'): 1/N sum_i g_i g_i^T, g_i the gradient of example i's loss
    # (its summed squared error over the 2 complex entries, divided by the 2 entries per row)
    grads = [
        jacobian(
            lambda f, i=i: ((c.outputs_at(f, slice(i, i + 1)) - c.t[i]).abs() ** 2).sum() / 2,
            c.flat,
        ).numpy()
        for i in range(5)
    ]
    Fd = sum(np.outer(g, g) for g in grads) / 5
    F = FisherLinearOperator(c.model, c.loss_fn, (c.x, c.t), params=c.params) @ eye
    np.testing.assert_allclose(F, Fd, rtol=0, atol=1e-12)


def test_mc_fisher_refuses_complex_outputs_naming_them_and_the_real_view():
    """On main the refusal named the loss's autograd node (MeanBackward0) only."""
    c = _Complex()
    with pytest.raises(ValueError, match=r"complex outputs \(torch\.complex128.*view_as_real"):
        MCFisherLinearOperator(c.model, c.loss_fn, (c.x, c.t), params=c.params, seed=0)


def test_mc_fisher_on_the_real_view_the_message_suggests_estimates_the_ggn():
    """The real view with MSE: the mean of 20 seeds x 50 samples is within 5 % (of the
    largest entry) of the dense GGN; seeded, the measured error is 1.8 %
    (the bound leaves room for another platform's rounding of the draws)."""
    c = _Complex()
    model = lambda x: torch.view_as_real(c.model(x))  # noqa: E731
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = torch.view_as_real(
        torch.randn(64, 2, dtype=torch.complex128, generator=torch.Generator().manual_seed(6))
    )
    eye = np.eye(16)
    G = GGNLinearOperator(model, nn.MSELoss(), (x, target), params=c.params) @ eye
    draws = [
        MCFisherLinearOperator(
            model, nn.MSELoss(), (x, target), params=c.params, seed=s, mc_samples=50
        )
        @ eye
        for s in range(20)
    ]
    err = np.abs(np.mean(draws, axis=0) - G).max() / np.abs(G).max()
    assert err < 0.05


# --------------------------------------------------------------------------------------------
# hessfree.spectral
# --------------------------------------------------------------------------------------------


def _dead_relu_ggn() -> GGNLinearOperator:
    """The GGN over the first layer of a net whose ReLUs are all dead (bias -100 on inputs of
    size ~1): the loss reaches the weight in the graph, but every product is exactly zero."""
    torch.manual_seed(7)
    first, second = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    nn.init.constant_(first.bias, -100.0)
    model = nn.Sequential(first, nn.ReLU(), second)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    return GGNLinearOperator(model, nn.MSELoss(), (x, y), params=[first.weight])


@pytest.mark.parametrize("which", ["top", "bottom"])
def test_eigenpairs_of_a_zero_operator_say_it_is_zero(which):
    """On main: scipy's ArpackError "ARPACK error -9: Starting vector is zero"."""
    from hessfree.spectral import bottom_eigenpairs, top_eigenpairs

    G = _dead_relu_ggn()
    assert not np.any(G @ np.eye(12))  # the oracle: the dense matrix is zero
    find = top_eigenpairs if which == "top" else bottom_eigenpairs
    with pytest.raises(ValueError, match=r"product\(s\) of `A` .* exactly zero.*zero matrix"):
        find(G, k=2)


def test_eigenpairs_of_a_rank_one_operator_still_run():
    """The zero check reads only ARPACK's failure: a rank-one PSD matrix (most products
    nonzero, most eigenvalues 0) gives numpy.linalg.eigvalsh's extremes."""
    from hessfree.spectral import bottom_eigenpairs, top_eigenpairs

    u = np.arange(1.0, 7.0)
    A = np.outer(u, u)
    dense = np.linalg.eigvalsh(A)
    np.testing.assert_allclose(top_eigenpairs(A, k=1).values, dense[-1:], rtol=1e-12)
    np.testing.assert_allclose(bottom_eigenpairs(A, k=2).values, dense[:2], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda sp, A: sp.top_eigenpairs(A, seed=-1),
        lambda sp, A: sp.hutchinson_trace(A, seed=-1),
        lambda sp, A: sp.hutchpp_trace(A, seed=np.int64(-2)),
        lambda sp, A: sp.hutchinson_diagonal(A, seed=-1),
    ],
)
def test_spectral_negative_seed_is_named(call):
    """On main: numpy's "expected non-negative integer", which names no argument."""
    from hessfree import spectral

    with pytest.raises(ValueError, match=r"`seed` must be an int >= 0, got -"):
        call(spectral, np.diag(np.arange(1.0, 7.0)))


@pytest.mark.parametrize("name", ["hutchinson_trace", "hutchpp_trace", "hutchinson_diagonal"])
def test_spectral_estimators_refuse_a_complex_matrix_by_name(name):
    """On main: numpy's einsum cast error ("could not be cast from dtype('complex128')")."""
    from hessfree import spectral

    A = np.diag(np.arange(1.0, 7.0)) * (1 + 1j)
    with pytest.raises(TypeError, match=r"`A` is complex \(complex128\)"):
        getattr(spectral, name)(A, 6, seed=0)


def test_top_eigenpairs_of_a_complex_hermitian_matrix_still_run():
    """eigsh takes a Hermitian matrix; the complex refusal is the estimators' only."""
    from hessfree.spectral import top_eigenpairs

    A = np.array([[2.0, 1j, 0.0], [-1j, 2.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(top_eigenpairs(A, k=1).values, [3.0], rtol=1e-12)
