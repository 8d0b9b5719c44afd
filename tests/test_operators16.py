"""The SciPy operators and ``hessfree.spectral`` under uses no earlier round tried (operators16).

Oracles: explicit float64 Hessians from ``torch.autograd.functional`` on a flat parameter
vector (through ``torch.func.functional_call``), central differences of the gradient where
the dense oracle would go through the same double backward as the operator, ``scipy.linalg``
and ``numpy.linalg``. Every test is seeded and deterministic: the "other thread" of the race
tests is started and joined inside the model's forward pass, so the interleaving is fixed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian
from torch.func import functional_call
from torch.nn.utils import parametrize

from hessfree import (
    CurvatureLinearOperator,
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from hessfree.spectral import hutchinson_trace, hutchpp_trace

# float64 products of these small models round to ~1e-16 of entries of order 1.
EXACT = dict(rtol=0, atol=1e-12)


def _dense_hessian(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> np.ndarray:
    """The Hessian over ``model.parameters()`` (each Parameter once, tied ones too)."""
    names = [name for name, _ in model.named_parameters()]  # a tied Parameter: its first name
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = t[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    return hessian(f, theta, vectorize=True).numpy()


class _Hooked(nn.Module):
    """A 3-4-1 tanh MLP whose forward pass calls ``hook(call number)`` first, and which holds
    a buffer added to its output (so a write to it changes the function)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
        self.register_buffer("shift", torch.zeros(1, dtype=torch.float64))
        self.calls = 0
        self.hook: Callable[[int], None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.hook is not None:
            self.hook(self.calls)
        return self.b(torch.tanh(self.a(x))) + self.shift


def _in_other_thread(fn: Callable[[], None]) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def _hooked_data() -> tuple[_Hooked, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    model = _Hooked()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    return model, [(x[:4], y[:4]), (x[4:], y[4:])]


# --------------------------------------------------------------------------------------------
# another thread's training step during an uncached product (operators15 left it)
# --------------------------------------------------------------------------------------------


def _step(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)


@pytest.mark.parametrize("what", ["product", "gradient"])
def test_uncached_product_refuses_parameters_stepped_meanwhile(what):
    """A step taken by another thread between the batches' forward passes gave a sum of
    batches at two points (main: a 2-batch Hessian 0.53 and 2.5 off the dense Hessians at
    the old and new parameters, silently); now a RuntimeError naming the other thread."""
    model, data = _hooked_data()
    H = HessianLinearOperator(model, nn.MSELoss(), data)
    model.calls = 0  # the 2nd forward pass of the product is the 2nd batch's
    model.hook = lambda call: _in_other_thread(lambda: _step(model)) if call == 2 else None
    with pytest.raises(RuntimeError, match="changed while this product ran.*another thread"):
        H @ np.eye(H.shape[0]) if what == "product" else H.gradient()
    model.hook = None  # without the race the same operator is the dense Hessian (now stepped)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    np.testing.assert_allclose(
        H @ np.eye(H.shape[0]), _dense_hessian(model, nn.MSELoss(), x, y), **EXACT
    )


def test_buffer_writes_of_another_thread_are_named():
    """The buffer watch reads version counters, which all threads share: another thread's
    write during an uncached product is counted as the product's. The message now says so
    (main blamed ``model.train()`` alone)."""
    model, data = _hooked_data()
    G = GGNLinearOperator(model, nn.MSELoss(), data)
    model.hook = lambda call: _in_other_thread(lambda: model.shift.add_(0.5))
    with pytest.raises(RuntimeError, match="another thread ran a forward pass"):
        G @ np.ones(G.shape[0])


# --------------------------------------------------------------------------------------------
# from_product: what the user's product declares and returns is checked
# --------------------------------------------------------------------------------------------


class _Product:
    """A product object of the documented protocol: 2 I on vectors of 3 entries."""

    def __init__(self, **attrs: object) -> None:
        self.shape, self.dtype, self.device = (3, 3), torch.float64, torch.device("cpu")
        self.result: Callable[[Tensor], object] = lambda v: 2 * v
        self.__dict__.update(attrs)

    def matvec(self, v: Tensor) -> object:
        return self.result(v)


@pytest.mark.parametrize(
    "attrs, error, match",
    [
        (dict(shape=(3, 4)), ValueError, r"must be \(n, n\).*got \(3, 4\)"),
        (dict(shape=(3,)), ValueError, r"must be \(n, n\)"),
        (dict(shape=(3.0, 3.0)), ValueError, r"must be \(n, n\)"),
        (dict(dtype=np.float64), TypeError, "must be a torch dtype.*numpy.float64"),
        (dict(dtype=torch.int64), TypeError, "floating torch dtype.*torch.int64"),
        (dict(dtype=torch.complex128), TypeError, r"real floating.*complex128.*\[\[Re, -Im\]"),
        (dict(device="nowhere"), TypeError, "device.*'nowhere'"),
    ],
    ids=[
        "non-square",
        "one-dim",
        "float-dims",
        "numpy-dtype",
        "int-dtype",
        "complex-dtype",
        "bad-device",
    ],
)
def test_from_product_refuses_bad_declarations_at_construction(attrs, error, match):
    """Stop 46's main built all six but the complex one (a non-square one failed in numpy's
    reshape at the first product, a numpy dtype in an AttributeError, an int dtype as 'the
    parameters have dtype'); a complex dtype passed this check and was refused later as 'the
    parameters have dtype', though a product has no parameters."""
    with pytest.raises(error, match=match):
        CurvatureLinearOperator.from_product(_Product(**attrs))


@pytest.mark.parametrize(
    "result, error, match",
    [
        (lambda v: 2 * v.numpy(), TypeError, "returned ndarray, not a tensor"),
        (lambda v: None, TypeError, "returned NoneType"),
        (lambda v: v[:, None], ValueError, r"shape \(3, 1\) for a torch.float64 input"),
        (lambda v: v[:2], ValueError, r"shape \(2,\)"),
        (lambda v: v.float(), ValueError, "torch.float32 tensor"),
    ],
    ids=["numpy", "none", "column", "short", "float32"],
)
def test_from_product_refuses_bad_products_at_the_first_matvec(result, error, match):
    """Main: AttributeError for the first two, silently accepted for the others (a (3, 1)
    result flattened, a float32 one presented as float64)."""
    op = CurvatureLinearOperator.from_product(_Product(result=result))
    with pytest.raises(error, match=match):
        op @ np.ones(3)


def test_from_product_refuses_rows_of_the_wrong_length_in_a_block():
    """A matvec dropping an entry gave main's ``A @ I`` as a (2, 3) array for a 3x3 operator."""
    op = CurvatureLinearOperator.from_product(_Product(result=lambda v: v[:2]))
    with pytest.raises(ValueError, match=r"matvec` \(stacked over the rows\) returned"):
        op @ np.eye(3)
    good = CurvatureLinearOperator.from_product(_Product())
    np.testing.assert_array_equal(good @ np.eye(3), 2 * np.eye(3))


# --------------------------------------------------------------------------------------------
# models no round tried: one block per Parameter, recurrent and FFT layers, grid sampling
# --------------------------------------------------------------------------------------------


class _Tied(nn.Module):
    """Two 4x4 layers sharing one weight: one block of 16 for it, not two."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class _Symmetric(nn.Module):
    def forward(self, X: Tensor) -> Tensor:
        return X.triu() + X.triu(1).T


def _parametrized() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    parametrize.register_parametrization(model[0], "weight", _Symmetric())
    return model


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 2, batch_first=True).double(), nn.Linear(2, 4).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class _Spectral(nn.Module):
    """A real model with complex intermediates: ``rfft`` of a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6).double(), nn.Linear(8, 4).double()

    def forward(self, x: Tensor) -> Tensor:
        z = torch.fft.rfft(torch.tanh(self.a(x)), dim=-1)  # 4 complex entries
        return self.b(torch.cat([z.real, z.imag], dim=-1))


@pytest.mark.parametrize(
    "build, sequence",
    [(_Tied, False), (_parametrized, False), (_Recurrent, True), (_Spectral, False)],
    ids=["tied", "parametrized", "lstm", "rfft"],
)
def test_operators_of_uncommon_models_match_dense(build, sequence):
    """Guard (passes on main too): tied weights (24 entries, not 40), a parametrized weight
    (differentiated through its ``original``), an LSTM and an rfft layer; the Hessian equals
    the dense one, the GGN and Fisher are symmetric."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(6, 3, 4, dtype=torch.float64) if sequence else torch.randn(6, 4).double()
    y = torch.randn(6, 4, dtype=torch.float64)
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    n = sum(p.numel() for p in model.parameters())
    assert H.shape == (n, n)
    np.testing.assert_allclose(H @ np.eye(n), _dense_hessian(model, nn.MSELoss(), x, y), **EXACT)
    for Op in (GGNLinearOperator, FisherLinearOperator):
        C = Op(model, nn.MSELoss(), (x, y)) @ np.eye(n)
        np.testing.assert_allclose(C, C.T, **EXACT)


class _GridSampled(nn.Module):
    """An affine warp (``affine_grid`` + ``grid_sample``) learned, then a convolution."""

    def __init__(self) -> None:
        super().__init__()
        theta = torch.tensor([[[1.0, 0.1, 0.05], [0.0, 0.9, -0.1]]], dtype=torch.float64)
        self.theta = nn.Parameter(theta)
        self.conv = nn.Conv2d(1, 1, 3, padding=1).double()

    def forward(self, x: Tensor) -> Tensor:
        grid = F.affine_grid(self.theta.expand(x.shape[0], 2, 3), x.shape, align_corners=False)
        return self.conv(F.grid_sample(x, grid, mode="bicubic", align_corners=False)).flatten(1)


def test_hessian_through_grid_sample_matches_central_differences():
    """Guard: the dense oracle would run the same double backward, so the oracle here is
    central differences of the gradient (h = 1e-6: truncation ~h^2 * 1e1, rounding
    ~1e-16 / h; both far under 1e-7 for entries up to ~3)."""
    torch.manual_seed(0)
    model = _GridSampled()
    x, y = torch.randn(2, 1, 5, 5, dtype=torch.float64), torch.randn(2, 25, dtype=torch.float64)
    params = list(model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def grad(t: Tensor) -> Tensor:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(t, params)
        g = torch.autograd.grad(nn.MSELoss()(model(x), y), params)
        return torch.cat([gi.reshape(-1) for gi in g])

    h, n = 1e-6, theta.numel()
    want = [(grad(theta + h * e) - grad(theta - h * e)) / (2 * h) for e in torch.eye(n).double()]
    dense = torch.stack(want, 1).numpy()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, params)  # the point H was built at
    got = HessianLinearOperator(model, nn.MSELoss(), (x, y)) @ np.eye(n)
    assert np.abs(dense).max() > 1.0  # the warp's block is not trivially zero
    np.testing.assert_allclose(got, dense, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------------
# SciPy on the operators: shift-invert through minres, expm_multiply, estimator seeds
# --------------------------------------------------------------------------------------------


def _mlp_operator() -> tuple[HessianLinearOperator, GGNLinearOperator]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    return (
        HessianLinearOperator(model, nn.MSELoss(), (x, y)),
        GGNLinearOperator(model, nn.MSELoss(), (x, y)),
    )


def test_expm_multiply_of_minus_ggn_matches_dense():
    """Guard: exp(-G) v (a gradient flow on the quadratic model), with ``traceA`` from the
    operator so SciPy does not estimate it, against ``scipy.linalg.expm`` of the dense G."""
    _, G = _mlp_operator()
    n = G.shape[0]
    dense = G @ np.eye(n)
    v = np.random.default_rng(0).standard_normal(n)
    got = sla.expm_multiply(-G, v, traceA=-float(np.trace(dense)))
    np.testing.assert_allclose(got, scipy.linalg.expm(-dense) @ v, rtol=0, atol=1e-12)


def test_trace_estimators_with_a_torch_generator_repeat_and_are_unbiased():
    """Guard: the same seed (a torch.Generator) gives the same estimate on the operator; over
    200 fixed seeds the mean of Hutchinson's estimates of its dense matrix is within 4
    standard errors of the trace (the spread of 200 estimates of 10 probes each), and Hutch++
    with 3 n products is exact on the operator."""
    H, _ = _mlp_operator()
    n = H.shape[0]
    dense = H @ np.eye(n)
    trace = float(np.trace(dense))
    one = hutchinson_trace(H, 10, seed=torch.Generator().manual_seed(3)).estimate
    assert one == hutchinson_trace(H, 10, seed=torch.Generator().manual_seed(3)).estimate
    runs = np.array([hutchinson_trace(dense, 10, seed=s).estimate for s in range(200)])
    assert abs(runs.mean() - trace) < 4 * runs.std(ddof=1) / np.sqrt(runs.size)
    np.testing.assert_allclose(hutchpp_trace(H, 3 * n, seed=0).estimate, trace, rtol=1e-12)
