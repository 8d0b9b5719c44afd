"""Eigenpairs, trace and diagonal estimates against dense float64 oracles.

Stochastic estimates use a fixed seed and a tolerance of a few exact standard deviations
(computed from the dense matrix), and each test also checks that the tolerance is tight enough
to reject a wrong matrix.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator

from cases import CASES, dense
from hessfree.curvature import GGNProduct
from hessfree.operators import FisherLinearOperator, GGNLinearOperator, HessianLinearOperator
from hessfree.spectral import (
    DiagonalEstimate,
    Eigenpairs,
    TraceEstimate,
    bottom_eigenpairs,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    top_eigenpairs,
)

BY_NAME = {c.name: c for c in CASES}
# The cheap cases (dense oracles in < 0.3 s); test_operators covers every case.
CHEAP = ["mlp_tanh_mse", "mlp_sigmoid_bce_sum", "rnn_mse"]


@functools.cache
def _dense(name: str):
    return dense(*BY_NAME[name].build())


def _operator(cls, name: str, dtype: torch.dtype = torch.float64):
    model, x, y, loss_fn = BY_NAME[name].build(dtype=dtype)
    return cls(model, loss_fn, (x, y))


def _seed(kind: str, value: int):
    return np.random.default_rng(value) if kind == "numpy" else torch.Generator().manual_seed(value)


def _hutchinson_sigma(A: np.ndarray, m: int) -> float:
    """Exact standard deviation of the m-probe Rademacher estimate: 2(‖A‖_F² − Σ A_ii²)/m."""
    return float(np.sqrt(2 * (np.sum(A**2) - np.sum(np.diag(A) ** 2)) / m))


class _Counting(LinearOperator):
    """A dense matrix that records how it is multiplied."""

    def __init__(self, A: np.ndarray) -> None:
        super().__init__(A.dtype, A.shape)
        self.A, self.columns, self.matvecs = A, [], 0

    def _matvec(self, x):
        self.matvecs += 1
        return self.A @ x

    def _matmat(self, X):
        self.columns.append(X.shape[1])
        return self.A @ X


# ------------------------------------------------------------------------------ eigenpairs
@pytest.mark.parametrize("name", CHEAP)
def test_top_and_bottom_eigenpairs_match_dense_eigh(name):
    H = _dense(name).H.numpy()
    op = _operator(HessianLinearOperator, name)
    expected = np.linalg.eigvalsh(H)
    scale = np.abs(expected).max()
    top, bottom = top_eigenpairs(op, k=3), bottom_eigenpairs(op, k=3)
    assert isinstance(top, Eigenpairs) and top.vectors.shape == (H.shape[0], 3)
    np.testing.assert_allclose(
        top.values, expected[::-1][:3], rtol=0, atol=1e-9 * scale
    )  # decreasing
    np.testing.assert_allclose(bottom.values, expected[:3], rtol=0, atol=1e-9 * scale)  # increasing
    for pairs in (top, bottom):
        np.testing.assert_allclose(
            H @ pairs.vectors, pairs.vectors * pairs.values, rtol=0, atol=1e-8 * scale
        )
        np.testing.assert_allclose(pairs.vectors.T @ pairs.vectors, np.eye(3), atol=1e-10)


def test_eigenpairs_accept_products_matrices_and_float32():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    out = model(x)
    G = _dense("mlp_tanh_mse").G.numpy()
    expected = np.linalg.eigvalsh(G)[::-1][:2]
    product = GGNProduct(loss_fn(out, y), out, list(model.parameters()))
    for A in (product, G, torch.from_numpy(G)):
        np.testing.assert_allclose(top_eigenpairs(A, k=2).values, expected, rtol=1e-10)
    values = top_eigenpairs(_operator(GGNLinearOperator, "mlp_tanh_mse", torch.float32), k=2).values
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, expected, rtol=1e-4)  # float32 products: smoke tolerance


def test_eigenpairs_are_reproducible_for_a_seed():
    op = _operator(HessianLinearOperator, "rnn_mse")
    a, b = top_eigenpairs(op, k=2, seed=3), top_eigenpairs(op, k=2, seed=3)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    c = top_eigenpairs(op, k=2, seed=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(np.abs(c.vectors.T @ a.vectors), np.eye(2), atol=1e-8)


def test_eigenpairs_reject_bad_arguments():
    A = np.diag(np.arange(1.0, 6.0))
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 5\].*got 6"):
        top_eigenpairs(A, k=6)
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 5\].*got 0"):
        bottom_eigenpairs(A, k=0)
    with pytest.raises(TypeError, match="`k` must be an int"):
        top_eigenpairs(A, k=1.5)
    with pytest.raises(ValueError, match=r"`A` must be square, got shape \(5, 4\)"):
        top_eigenpairs(A[:, :4])
    with pytest.raises(TypeError, match="`A` must be a scipy LinearOperator"):
        top_eigenpairs("A")
    with pytest.raises(ValueError, match="`tol`"):
        top_eigenpairs(A, tol=-1.0)


# ------------------------------------------------------------------------------ Hutchinson trace
@pytest.mark.parametrize("seed_kind", ["numpy", "torch"])
@pytest.mark.parametrize("cls", [GGNLinearOperator, FisherLinearOperator], ids=["ggn", "fisher"])
def test_hutchinson_trace_is_within_four_standard_deviations(cls, seed_kind):
    A = (_dense("mlp_tanh_mse").G if cls is GGNLinearOperator else _dense("mlp_tanh_mse").F).numpy()
    m = 1024
    est = hutchinson_trace(_operator(cls, "mlp_tanh_mse"), m, seed=_seed(seed_kind, 0))
    assert isinstance(est, TraceEstimate) and est.num_matvecs == m
    sigma, tr = _hutchinson_sigma(A, m), np.trace(A)
    assert abs(est.estimate - tr) <= 4 * sigma
    assert abs(est.estimate - 1.2 * tr) > 4 * sigma  # the tolerance rejects a matrix 20% off
    assert 0.75 < est.std_error / sigma < 1.25  # the reported error matches the exact one


def test_hutchinson_trace_is_reproducible_and_seed_dependent():
    op = _operator(GGNLinearOperator, "mlp_tanh_mse")
    assert hutchinson_trace(op, 20, seed=1) == hutchinson_trace(
        op, 20, seed=np.random.default_rng(1)
    )
    torch_a = hutchinson_trace(op, 20, seed=torch.Generator().manual_seed(1))
    assert torch_a == hutchinson_trace(op, 20, seed=torch.Generator().manual_seed(1))
    assert hutchinson_trace(op, 20, seed=1).estimate != hutchinson_trace(op, 20, seed=2).estimate


# ------------------------------------------------------------------------------ Hutch++
def test_hutchpp_is_exact_for_a_low_rank_ggn_where_hutchinson_is_not():
    A = _dense("mlp_tanh_mse").G.numpy()
    rank = np.linalg.matrix_rank(A)
    assert rank == 15  # 5 examples x 3 outputs
    op = _operator(GGNLinearOperator, "mlp_tanh_mse")
    m = 3 * (rank + 1)  # a sketch of rank + 1 columns spans range(A)
    est = hutchpp_trace(op, m, seed=0)
    assert est.num_matvecs == m
    np.testing.assert_allclose(est.estimate, np.trace(A), rtol=1e-10)
    assert est.std_error < 1e-10 * np.trace(A)
    plain = hutchinson_trace(op, m, seed=0)
    assert abs(plain.estimate - np.trace(A)) > 1e-3 * np.trace(A)


def test_hutchpp_is_unbiased_with_lower_variance_than_hutchinson():
    # A PSD matrix with a decaying spectrum λ_i = 1/i, where Hutch++ shines.
    rng = np.random.default_rng(0)
    n, m, runs = 60, 30, 200
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (U / np.arange(1, n + 1)) @ U.T
    tr = np.trace(A)
    estimates = np.array([hutchpp_trace(A, m, seed=s).estimate for s in range(runs)])
    spread = estimates.std(ddof=1)
    assert abs(estimates.mean() - tr) <= 4 * spread / np.sqrt(runs)
    assert abs(estimates.mean() - 1.02 * tr) > 4 * spread / np.sqrt(runs)  # rejects a 2% bias
    assert spread < 0.5 * _hutchinson_sigma(A, m)


def test_hutchpp_caps_the_sketch_at_n_and_is_then_exact():
    A = _dense("rnn_mse").H.numpy()  # full rank, indefinite
    est = hutchpp_trace(_operator(HessianLinearOperator, "rnn_mse"), 3 * A.shape[0] + 3, seed=0)
    np.testing.assert_allclose(est.estimate, np.trace(A), rtol=1e-10)


# ------------------------------------------------------------------------------ diagonal
@pytest.mark.parametrize("seed_kind", ["numpy", "torch"])
def test_hutchinson_diagonal_is_within_five_standard_deviations(seed_kind):
    A = _dense("mlp_sigmoid_bce_sum").H.numpy()
    m = 1000
    est = hutchinson_diagonal(
        _operator(HessianLinearOperator, "mlp_sigmoid_bce_sum"), m, seed=_seed(seed_kind, 0)
    )
    assert isinstance(est, DiagonalEstimate) and est.estimate.shape == (A.shape[0],)
    d = np.diag(A)
    sigma = np.sqrt((np.sum(A**2, axis=1) - d**2) / m)  # exact per-entry standard deviation
    assert np.all(np.abs(est.estimate - d) <= 5 * sigma + 1e-12)
    assert np.any(np.abs(est.estimate - 1.5 * d) > 5 * sigma)  # a wrong diagonal is rejected
    assert 0.8 < np.median(est.std_error / sigma) < 1.2


# ------------------------------------------------------------------------------ plumbing
def test_estimators_use_matmat_in_batches():
    A = np.diag(np.arange(1.0, 41.0))
    counting = _Counting(A)
    assert hutchinson_trace(counting, 100, seed=0, batch_size=32).estimate == 820.0
    assert counting.columns == [32, 32, 32, 4] and counting.matvecs == 0
    counting.columns.clear()
    # Rademacher probes (z ⊙ z = 1) make both estimates exact for a diagonal matrix.
    np.testing.assert_array_equal(
        hutchinson_diagonal(counting, 10, seed=0, batch_size=4).estimate, np.diag(A)
    )
    assert counting.columns == [4, 4, 2]
    counting.columns.clear()
    assert hutchpp_trace(counting, 31, seed=0, batch_size=8).num_matvecs == 31
    assert sum(counting.columns) == 31 and max(counting.columns) <= 8 and counting.matvecs == 0


def test_estimators_reject_bad_arguments():
    A = np.eye(4)
    with pytest.raises(ValueError, match="`num_probes` must be an int >= 1, got 0"):
        hutchinson_trace(A, 0)
    with pytest.raises(ValueError, match="`num_matvecs` must be an int >= 3, got 2"):
        hutchpp_trace(A, 2)
    with pytest.raises(ValueError, match="`batch_size`"):
        hutchinson_diagonal(A, 10, batch_size=0)
    with pytest.raises(TypeError, match="`seed` must be an int, a numpy.random.Generator"):
        hutchinson_trace(A, 10, seed="zero")
    with pytest.raises(ValueError, match="square"):
        hutchinson_diagonal(np.ones((3, 4)), 10)


def test_spectral_is_reachable_as_an_attribute_after_import_hessfree():
    # README: `import hessfree; hessfree.spectral.top_eigenpairs(H, k=5)`. Other tests have
    # imported hessfree.spectral already, so load a fresh copy of the package under another name.
    import importlib.util
    import sys
    from pathlib import Path

    import hessfree

    init = Path(hessfree.__file__)
    name = "_hessfree_fresh"
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(init.parent)]
    )
    fresh = importlib.util.module_from_spec(spec)
    sys.modules[name] = fresh
    try:
        spec.loader.exec_module(fresh)
        assert fresh.spectral.top_eigenpairs.__module__ == f"{name}.spectral"
        assert "spectral" in fresh.__all__
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


@pytest.mark.parametrize("fn", [top_eigenpairs, bottom_eigenpairs])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_eigenpairs_of_a_non_finite_operator_say_so(fn, bad):
    A = np.diag([1.0, 2.0, 3.0, 4.0])
    A[2, 2] = bad
    with pytest.raises(FloatingPointError, match="NaN or infinite entry"):
        fn(A)
