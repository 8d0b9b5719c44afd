"""Tests for hessfree.cg against dense solves, scipy's CG and a numpy reference CG."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import weakref
from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import hessfree
from hessfree import HFSettings
from hessfree.cg import CGResult, CGStop, StopReason, cg, forcing_term, relative_forcing_term

# Not `import hessfree.cg as ...`: the package re-exports the function `cg`, which shadows
# the submodule as an attribute of `hessfree`.
cg_module = importlib.import_module("hessfree.cg")

DTYPE = torch.float64
SOLVE_RTOL = 1e-10
EXACT = dict(rtol=1e-10, atol=1e-12)
GRID = [5, 7, 9, 11, 15, 19, 25, 32, 41, 54, 69, 90]  # ceil(5 * 1.3**j), Martens' code


# ---------------------------------------------------------------- problems and oracles
def spd_system(n: int, cond: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q diag(linspace(1, cond)) Q^T with random orthogonal Q, and a random b."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.linspace(1.0, cond, n)) @ Q.T
    return torch.from_numpy((A + A.T) / 2), torch.from_numpy(rng.standard_normal(n))


def log_diag_system(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal A with eigenvalues log-spaced in [1e-4, 1]: CG is slow for many iterations."""
    rng = np.random.default_rng(seed)
    return torch.logspace(-4, 0, n, dtype=DTYPE), torch.from_numpy(rng.standard_normal(n))


def uniform_diag_system(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal A with 300 eigenvalues evenly spaced in [1, 1e4]: §4.4 stops CG near i = 70,
    and float64 CG tracks exact CG (phi to ~1e-13) that far, unlike for clustered spectra."""
    rng = np.random.default_rng(seed)
    return torch.linspace(1.0, 1e4, 300, dtype=DTYPE), torch.from_numpy(rng.standard_normal(300))


def indefinite_system(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal A with 30 eigenvalues in [1, 10] and two small negative ones."""
    rng = np.random.default_rng(seed)
    eig = np.concatenate([np.linspace(1.0, 10.0, 30), [-0.05, -0.1]])
    return torch.from_numpy(eig), torch.from_numpy(rng.standard_normal(eig.size))


def dense_phi(A: np.ndarray, b: np.ndarray, x: np.ndarray) -> float:
    return float(0.5 * x @ A @ x - b @ x)


def krylov_phi(d: np.ndarray, b: np.ndarray, num_iter: int) -> list[float]:
    """min phi over the Krylov spaces K_i(A, b), i = 0..num_iter, for A = diag(d): exact CG's phi_i.

    Independent of CG: an orthonormal Krylov basis V by Arnoldi with full (twice-applied)
    reorthogonalisation, then phi_i = -1/2 c^T T^{-1} c with T = V^T A V and c = V^T b.
    """
    V = np.zeros((b.size, num_iter + 1))
    T = np.zeros((num_iter, num_iter))
    V[:, 0] = b / np.linalg.norm(b)
    phis = [0.0]
    for i in range(1, num_iter + 1):
        AV = d * V[:, i - 1]
        T[:i, i - 1] = T[i - 1, :i] = V[:, :i].T @ AV
        c = V[:, :i].T @ b
        phis.append(float(-0.5 * c @ np.linalg.solve(T[:i, :i], c)))
        for _ in range(2):
            AV = AV - V[:, :i] @ (V[:, :i].T @ AV)
        V[:, i] = AV / np.linalg.norm(AV)
    return phis


def reference_cg(A: np.ndarray, b: np.ndarray, num_iter: int) -> tuple[list, list]:
    """Textbook CG from zero in numpy (residual b - Ax): iterates and p^T A p values."""
    x, r = np.zeros_like(b), b.copy()
    p, xs, pAps = r.copy(), [np.zeros_like(b)], []
    for _ in range(num_iter):
        Ap = A @ p
        pAps.append(float(p @ Ap))
        if pAps[-1] <= 0:
            break
        alpha = (r @ r) / pAps[-1]
        x = x + alpha * p
        r_next = r - alpha * Ap
        p = r_next + (r_next @ r_next) / (r @ r) * p
        r = r_next
        xs.append(x)
    return xs, pAps


def progress_stop(
    phis: list[float], eps: float, min_iter: int = 0, times_k: bool = True
) -> int | None:
    """First i at which Martens' (2010, §4.4) rule holds; times_k=False is a known drift."""
    for i in range(1, len(phis)):
        k = max(10, math.ceil(i / 10))
        bound = k * eps if times_k else eps
        if i > k and i >= min_iter and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < bound:
            return i
    return None


def nan_after(matvec, num_good: int, bad: float = float("nan")):
    """Wrap `matvec` to return `bad` everywhere from product number num_good + 1 on."""
    calls = [0]

    def wrapped(v):
        calls[0] += 1
        out = matvec(v)
        return out if calls[0] <= num_good else torch.full_like(out, bad)

    return wrapped


def diag_matvec(d):
    return lambda v: d * v


def assert_same_result(a: CGResult, b: CGResult) -> None:
    assert (a.reason, a.num_iter, a.iterations) == (b.reason, b.num_iter, b.iterations)
    assert torch.equal(a.x, b.x)
    assert torch.equal(a.phi_history, b.phi_history)
    assert torch.equal(a.iterate_phi, b.iterate_phi)
    assert all(torch.equal(u, v) for u, v in zip(a.iterates, b.iterates, strict=True))


# ---------------------------------------------------------------- solutions
@pytest.mark.parametrize("n, seed", [(5, 0), (20, 1), (40, 2)])
def test_cg_matches_numpy_solve(n, seed):
    A, b = spd_system(n, cond=10.0, seed=seed)
    result = cg(lambda v: A @ v, b, rtol=SOLVE_RTOL, progress_tol=None)
    assert result.reason is CGStop.CONVERGED
    assert result.num_iter <= n
    assert result.num_matvec == result.num_iter
    x_star = np.linalg.solve(A.numpy(), b.numpy())
    # ||x - x*|| <= cond(A) * ||r|| / ||A|| ... <= cond * rtol * ||x*|| (one decade of slack)
    err = np.linalg.norm(result.x.numpy() - x_star) / np.linalg.norm(x_star)
    assert err <= 10.0 * 10.0 * SOLVE_RTOL
    assert torch.linalg.vector_norm(A @ result.x - b) <= SOLVE_RTOL * torch.linalg.norm(b) * 10


@pytest.mark.parametrize("preconditioned", [False, True], ids=["plain", "jacobi"])
def test_cg_matches_scipy_cg(preconditioned):
    A, b = spd_system(30, cond=100.0, seed=3)
    A = A + torch.diag(torch.linspace(0.0, 50.0, 30, dtype=DTYPE))  # uneven diagonal
    d = torch.diagonal(A).clone()
    scipy_iters = [0]

    def count(_):
        scipy_iters[0] += 1

    M = scipy.sparse.linalg.LinearOperator((30, 30), matvec=lambda r: r / d.numpy())
    x_scipy, info = scipy.sparse.linalg.cg(
        A.numpy(),
        b.numpy(),
        rtol=SOLVE_RTOL,
        atol=0.0,
        maxiter=200,
        M=M if preconditioned else None,
        callback=count,
    )
    assert info == 0
    result = cg(
        lambda v: A @ v,
        b,
        rtol=SOLVE_RTOL,
        max_iter=200,
        progress_tol=None,
        precond=d if preconditioned else None,
    )
    assert result.reason is CGStop.CONVERGED
    assert result.num_iter == scipy_iters[0]  # same algorithm, same ||r|| <= max(rtol||b||, atol)
    torch.testing.assert_close(result.x, torch.from_numpy(x_scipy), rtol=1e-8, atol=0.0)


def test_cg_jacobi_tensor_equals_callable_and_helps():
    # Diagonally dominant, diagonal spread over four decades: Jacobi removes most of it.
    rng = np.random.default_rng(4)
    n = 60
    E = rng.standard_normal((n, n)) * 0.1
    A = torch.from_numpy(np.diag(np.logspace(0, 4, n)) + (E + E.T) / 2)
    b = torch.from_numpy(rng.standard_normal(n))
    d = torch.diagonal(A).clone()
    kwargs = dict(rtol=SOLVE_RTOL, max_iter=500, progress_tol=None)
    plain = cg(lambda v: A @ v, b, **kwargs)
    by_tensor = cg(lambda v: A @ v, b, precond=d, **kwargs)
    by_callable = cg(lambda v: A @ v, b, precond=lambda r: r / d, **kwargs)
    assert plain.reason is by_tensor.reason is by_callable.reason is CGStop.CONVERGED
    assert by_tensor.num_iter == by_callable.num_iter
    torch.testing.assert_close(by_tensor.x, by_callable.x, **EXACT)
    torch.testing.assert_close(by_tensor.x, torch.linalg.solve(A, b), rtol=1e-7, atol=0.0)
    assert by_tensor.num_iter < plain.num_iter / 2


def test_cg_warm_start_converges_and_inputs_unchanged():
    A, b = spd_system(25, cond=50.0, seed=5)
    x0 = torch.randn(25, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    x0_copy, b_copy = x0.clone(), b.clone()
    cold = cg(lambda v: A @ v, b, rtol=SOLVE_RTOL, progress_tol=None)
    warm = cg(lambda v: A @ v, b, x0, rtol=SOLVE_RTOL, progress_tol=None)
    assert warm.reason is CGStop.CONVERGED
    assert warm.num_matvec == warm.num_iter + 1  # r_0 = A x_0 - b costs one product
    torch.testing.assert_close(warm.x, cold.x, rtol=1e-8, atol=0.0)
    assert torch.equal(x0, x0_copy) and torch.equal(b, b_copy)
    assert warm.x.data_ptr() != x0.data_ptr()
    torch.testing.assert_close(warm.phi_history[0], 0.5 * x0 @ A @ x0 - b @ x0, **EXACT)
    # An all-zeros x0 is the cold start: no extra product, same iterates.
    zeros = cg(lambda v: A @ v, b, torch.zeros(25, dtype=DTYPE), rtol=SOLVE_RTOL, progress_tol=None)
    assert zeros.num_matvec == cold.num_matvec
    assert torch.equal(zeros.x, cold.x)


def test_cg_warm_start_whose_square_overflows_or_underflows():
    # x0's check is one dot product xᵀx; where that overflows (finite x0) or underflows
    # (nonzero x0) the exact elementwise test decides, so such starts are still warm starts.
    A = torch.diag(torch.tensor([2.0, 3.0, 4.0]))
    b = torch.tensor([1.0, -1.0, 2.0])
    for x0 in (torch.tensor([1e30, 0.0, -1e30]), torch.tensor([0.0, 1e-30, 0.0])):
        assert not (0 < float(x0 @ x0) < math.inf)
        result = cg(lambda v: A @ v, b, x0, max_iter=1, progress_tol=None)
        assert result.num_matvec >= 1  # r_0 = A x_0 - b was formed: x0 counted as nonzero
        torch.testing.assert_close(result.phi_history[0], 0.5 * x0 @ A @ x0 - b @ x0)
    with pytest.raises(ValueError, match="`x0` must be finite"):
        cg(lambda v: A @ v, b, torch.tensor([1e30, math.nan, 0.0]))


def test_cg_float32_smoke():
    A, b = spd_system(20, cond=10.0, seed=12)
    A, b = A.float(), b.float()
    result = cg(lambda v: A @ v, b, rtol=1e-4)
    assert result.reason is CGStop.CONVERGED and result.x.dtype == torch.float32
    assert result.phi_history.dtype == torch.float32
    torch.testing.assert_close(result.x, torch.linalg.solve(A, b), rtol=1e-3, atol=1e-5)


def test_cg_zero_rhs_converges_without_products():
    result = cg(lambda v: 2.0 * v, torch.zeros(4, dtype=DTYPE))
    assert (result.reason, result.num_iter, result.num_matvec) == (CGStop.CONVERGED, 0, 0)
    assert result.iterations == [0] and torch.equal(result.x, torch.zeros(4, dtype=DTYPE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.num_iter = 3


# ---------------------------------------------------------------- phi and stored iterates
def test_cg_phi_history_matches_dense_and_decreases():
    d, b = uniform_diag_system(seed=6)
    result = cg(diag_matvec(d), b, rtol=0.0, max_iter=40, progress_tol=None)
    assert result.reason is CGStop.MAX_ITER
    phi = result.phi_history
    assert phi.shape == (41,) and phi[0] == 0.0
    assert torch.all(phi[1:] < phi[:-1])  # CG minimizes phi over growing Krylov spaces
    # phi from the recurrence residual equals 1/2 x^T A x - b^T x at the stored iterates ...
    An, bn = np.diag(d.numpy()), b.numpy()
    dense = [dense_phi(An, bn, x.numpy()) for x in result.iterates]
    torch.testing.assert_close(result.iterate_phi, torch.tensor(dense, dtype=DTYPE), **EXACT)
    assert torch.equal(result.iterate_phi, phi[result.iterations])
    # ... and every phi_i is the minimum over the i-th Krylov space.
    exact = torch.tensor(krylov_phi(d.numpy(), bn, 40), dtype=DTYPE)
    torch.testing.assert_close(phi, exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "max_iter, start, ratio, expected",
    [
        (30, 5, 1.3, [5, 7, 9, 11, 15, 19, 25, 30]),
        (32, 5, 1.3, [5, 7, 9, 11, 15, 19, 25, 32]),
        (4, 5, 1.3, [4]),
        (30, 2, 2.0, [2, 4, 8, 16, 30]),
        (14, 10, 1.1, [10, 11, 13, 14]),  # ceil(12.1) = 13; float 10 * 1.1 would give 12
    ],
)
def test_cg_stored_iterations_on_geometric_grid(max_iter, start, ratio, expected):
    A, b = log_diag_system(60, seed=7)
    result = cg(
        diag_matvec(A),
        b,
        rtol=0.0,
        max_iter=max_iter,
        progress_tol=None,
        store_start=start,
        store_ratio=ratio,
    )
    assert result.num_iter == max_iter
    assert result.iterations == expected
    assert result.iterates[-1] is result.x
    for i, xi in zip(result.iterations, result.iterates, strict=True):
        shorter = cg(diag_matvec(A), b, rtol=0.0, max_iter=i, progress_tol=None)
        assert torch.equal(xi, shorter.x)


def test_cg_default_grid_is_martens():
    assert sorted(cg_module._grid(5, 1.3, 100)) == GRID


def test_cg_grid_cache_keys_on_every_argument():
    # _grid is memoized (every cg() call asks for it): a key missing an argument would hand
    # one call's grid to another; each grid against its closed form ceil(start * ratio**j)
    for start, ratio, max_iter in [(5, 1.3, 100), (5, 1.3, 20), (2, 1.3, 100), (5, 2.0, 100)]:
        grid = cg_module._grid(start, ratio, max_iter)
        assert isinstance(grid, frozenset)  # callers cannot corrupt the cached value
        exact = {math.ceil(start * Fraction(str(ratio)) ** j) for j in range(40)}
        assert grid == {i for i in exact if i <= max_iter}


# ---------------------------------------------------------------- stop rules
def test_cg_relative_progress_gap():
    gaps = {i: cg_module._progress_gap(i) for i in (1, 11, 100, 101, 110, 111, 250)}
    assert gaps == {1: 10, 11: 10, 100: 10, 101: 11, 110: 11, 111: 12, 250: 25}


def test_cg_relative_progress_matches_formula():
    # Oracle: the formula in pure Python on exact CG's phi (Krylov minima); the rule's ratio
    # is >= 8% away from k * eps at every iteration up to the stop, far above rounding.
    d, b = uniform_diag_system(seed=0)
    phis = krylov_phi(d.numpy(), b.numpy(), 90)
    expected = progress_stop(phis, 5e-4)
    assert expected is not None and expected > 20
    # The test discriminates: known drifts from the paper (no x k, 100x tighter eps) differ.
    assert progress_stop(phis, 5e-4, times_k=False) != expected
    assert progress_stop(phis, 5e-6) != expected
    result = cg(diag_matvec(d), b, rtol=0.0)
    assert (result.reason, result.num_iter) == (CGStop.RELATIVE_PROGRESS, expected)
    # min_iter postpones only this test.
    late = progress_stop(phis, 5e-4, min_iter=expected + 7)
    result = cg(diag_matvec(d), b, rtol=0.0, min_iter=expected + 7)
    assert late == expected + 7
    assert (result.reason, result.num_iter) == (CGStop.RELATIVE_PROGRESS, late)
    # A larger epsilon stops earlier, exactly where the formula says.
    early = progress_stop(phis, 5e-3)
    assert early < expected
    assert cg(diag_matvec(d), b, rtol=0.0, progress_tol=5e-3).num_iter == early
    off = cg(diag_matvec(d), b, rtol=0.0, progress_tol=None)
    assert (off.reason, off.num_iter) == (CGStop.MAX_ITER, 250)


@pytest.mark.parametrize("start", ["near", "far"])
def test_cg_relative_progress_after_warm_start(start):
    # With x0 != 0, phi_0 != 0: "near" (HF's 0.95 x previous solution) makes the i > k
    # condition decide (the rule would already hold at i = k = 10); "far" keeps phi > 0
    # for ~50 iterations, where only the phi_i < 0 condition prevents a stop.
    d, b = uniform_diag_system(seed=0)
    if start == "near":
        x0 = 0.95 * cg(diag_matvec(d), b, rtol=0.0, progress_tol=None, max_iter=60).x
    else:
        x0 = -10.0 * b / d
    off = cg(diag_matvec(d), b, x0, rtol=0.0, progress_tol=None, max_iter=120)
    phis = off.phi_history.tolist()
    torch.testing.assert_close(off.phi_history[0], 0.5 * x0 @ (d * x0) - b @ x0, **EXACT)
    if start == "near":
        assert (phis[10] - phis[0]) / phis[10] < 10 * 5e-4
    else:
        assert phis[11] > 0
    expected = progress_stop(phis, 5e-4)
    result = cg(diag_matvec(d), b, x0, rtol=0.0)
    assert (result.reason, result.num_iter) == (CGStop.RELATIVE_PROGRESS, expected)


def test_cg_negative_curvature_returns_last_good_iterate():
    d, b = indefinite_system(seed=0)
    result = cg(diag_matvec(d), b, rtol=SOLVE_RTOL)
    assert result.reason is CGStop.NEGATIVE_CURVATURE
    _, pAps = reference_cg(np.diag(d.numpy()), b.numpy(), 50)
    first_bad = next(i for i, pAp in enumerate(pAps, start=1) if pAp <= 0)
    assert result.num_iter == first_bad - 1 >= 2
    assert result.num_matvec == first_bad
    assert torch.isfinite(result.x).all()
    assert dense_phi(np.diag(d.numpy()), b.numpy(), result.x.numpy()) <= 0.0
    before = cg(diag_matvec(d), b, rtol=SOLVE_RTOL, max_iter=result.num_iter)
    assert torch.equal(result.x, before.x)
    assert result.phi_history.shape == (result.num_iter + 1,)


def test_cg_zero_curvature_stops_at_start():
    result = cg(lambda v: torch.zeros_like(v), torch.ones(3, dtype=DTYPE))
    assert (result.reason, result.num_iter) == (CGStop.NEGATIVE_CURVATURE, 0)
    assert torch.equal(result.x, torch.zeros(3, dtype=DTYPE))


def test_cg_max_iter_one_is_one_steepest_descent_step():
    A, b = spd_system(10, cond=10.0, seed=8)
    result = cg(lambda v: A @ v, b, max_iter=1)
    assert (result.reason, result.num_iter, result.num_matvec) == (CGStop.MAX_ITER, 1, 1)
    assert result.iterations == [1] and result.phi_history.shape == (2,)
    torch.testing.assert_close(result.x, (b @ b) / (b @ A @ b) * b, **EXACT)


def reference_pcg(A: np.ndarray, b: np.ndarray, M: np.ndarray, x0: np.ndarray, k: int) -> list:
    """Textbook preconditioned CG in numpy from ``x0`` (residual b - Ax, M the SPD
    preconditioner as a matrix, z = M^{-1} r by a dense solve): the iterates x_0..x_k."""
    x = x0.copy()
    r = b - A @ x
    z = np.linalg.solve(M, r)
    p, xs = z.copy(), [x.copy()]
    for _ in range(k):
        Ap = A @ p
        alpha = (r @ z) / (p @ Ap)
        x = x + alpha * p
        r_next = r - alpha * Ap
        z_next = np.linalg.solve(M, r_next)
        p = z_next + (r_next @ z_next) / (r @ z) * p
        r, z = r_next, z_next
        xs.append(x.copy())
    return xs


@pytest.mark.parametrize("max_iter", [1, 2, 5])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_cg_truncated_skips_the_unused_last_preconditioning(max_iter, warm):
    # At the last allowed iteration M^{-1} r only feeds the next direction, which is never
    # used: a callable preconditioner runs max_iter times (z_0 and iterations 1..max_iter-1),
    # and x and phi are those of textbook PCG.
    A, b = spd_system(20, cond=1e3, seed=11)
    rng = np.random.default_rng(12)
    L = np.tril(rng.standard_normal((20, 20))) * 0.1 + np.eye(20)
    M = L @ L.T  # SPD, not diagonal
    M_inv = torch.from_numpy(np.linalg.inv(M))
    x0 = torch.from_numpy(rng.standard_normal(20)) if warm else None
    calls = [0]

    def precond(r):
        calls[0] += 1
        return M_inv @ r

    result = cg(lambda v: A @ v, b, x0=x0, precond=precond, max_iter=max_iter, rtol=0.0)
    assert (result.reason, result.num_iter) == (CGStop.MAX_ITER, max_iter)
    assert calls[0] == max_iter
    start = np.zeros(20) if x0 is None else x0.numpy()
    xs = reference_pcg(A.numpy(), b.numpy(), M, start, max_iter)
    torch.testing.assert_close(result.x, torch.from_numpy(xs[-1]), rtol=1e-9, atol=1e-12)
    phi = dense_phi(A.numpy(), b.numpy(), xs[-1])
    assert float(result.phi_history[-1]) == pytest.approx(phi, rel=1e-9)


def test_cg_preconditioned_negative_curvature_at_max_iter_one():
    # The steepest-descent fallback at the first direction uses z_0 = M^{-1} r_0, which
    # skipping the last preconditioning must leave in place: x_1 = tau (M^{-1} b) with
    # tau = b^T M^{-1} b / |p^T A p|.
    d, b = indefinite_system(seed=3)
    m = torch.linspace(0.5, 2.0, d.numel(), dtype=DTYPE)
    d = d.clone()
    d[:] = -torch.abs(d)  # negative definite: the first direction has p^T A p < 0
    result = cg(diag_matvec(d), b, precond=lambda r: r / m, max_iter=1)
    assert (result.reason, result.num_iter) == (CGStop.NEGATIVE_CURVATURE, 1)
    z = b / m
    tau = (b @ z) / torch.abs(z @ (d * z))
    torch.testing.assert_close(result.x, tau * z, **EXACT)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_cg_non_finite_product_returns_iterate_before(bad):
    A, b = spd_system(20, cond=10.0, seed=9)
    result = cg(nan_after(lambda v: A @ v, 2, bad), b, rtol=SOLVE_RTOL)
    assert (result.reason, result.num_iter) == (CGStop.NON_FINITE, 2)
    assert all(torch.isfinite(x).all() for x in result.iterates)
    assert torch.isfinite(result.phi_history).all()
    assert torch.equal(result.x, cg(lambda v: A @ v, b, max_iter=2).x)


def test_cg_non_finite_b_or_preconditioner():
    b = torch.tensor([1.0, float("nan"), 2.0], dtype=DTYPE)
    result = cg(lambda v: 2.0 * v, b)
    assert (result.reason, result.num_iter) == (CGStop.NON_FINITE, 0)
    assert torch.equal(result.x, torch.zeros(3, dtype=DTYPE))
    A, b = spd_system(20, cond=10.0, seed=10)
    # The preconditioner is called once for z_0, then once per iteration: NaN at z_4.
    result = cg(lambda v: A @ v, b, precond=nan_after(lambda r: r, 4), rtol=SOLVE_RTOL)
    assert (result.reason, result.num_iter) == (CGStop.NON_FINITE, 4)
    assert torch.isfinite(result.x).all()
    assert torch.equal(result.x, cg(lambda v: A @ v, b, max_iter=4).x)


# ---------------------------------------------------------------- host synchronisation
def progress_case():
    d, b = uniform_diag_system(0)
    return diag_matvec(d), b, dict(rtol=0.0)


def converged_case():
    A, b = spd_system(40, 100.0, 0)
    return (lambda v: A @ v), b, dict(rtol=SOLVE_RTOL, progress_tol=None)


def negative_curvature_case():
    d, b = indefinite_system(0)
    return diag_matvec(d), b, {}


def non_finite_case():
    A, b = spd_system(20, 10.0, 9)
    return nan_after(lambda v: A @ v, 2), b, {}


# Each builds a fresh matvec (nan_after counts its calls) and stops CG with the named reason.
CHECK_EVERY_CASES = {
    "relative_progress": progress_case,
    "converged": converged_case,
    "negative_curvature": negative_curvature_case,
    "non_finite": non_finite_case,
}


@pytest.mark.parametrize("name", list(CHECK_EVERY_CASES))
def test_cg_check_every_does_not_change_result(name):
    results = {}
    for check_every in (1, 7):
        matvec, b, kwargs = CHECK_EVERY_CASES[name]()
        results[check_every] = cg(matvec, b, check_every=check_every, **kwargs)
    one, seven = results[1], results[7]
    assert one.reason.value == name
    assert_same_result(one, seven)
    # The stop fired mid-block: the masked no-op iterations really ran.
    assert 0 < seven.num_matvec - one.num_matvec < 7


@pytest.mark.parametrize("name", ["converged", "non_finite"])
def test_cg_wasted_products_see_the_frozen_state(name):
    # After a stop fired at iteration s (after x_s is formed, or before: NaN product), the
    # rest of the block re-applies A and M^{-1} to the p and r of iteration s: no NaN ever
    # reaches user callables, and nothing moves.
    matvec, b, kwargs = CHECK_EVERY_CASES[name]()
    seen = {"matvec": [], "precond": []}

    def recording_matvec(v):
        seen["matvec"].append(v.clone())
        return matvec(v)

    def recording_precond(r):
        seen["precond"].append(r.clone())
        return r

    result = cg(recording_matvec, b, precond=recording_precond, check_every=7, **kwargs)
    s = cg(*CHECK_EVERY_CASES[name]()[:2], check_every=1, **kwargs).num_matvec
    assert result.num_matvec > s  # the stop fell mid-block
    assert all(torch.isfinite(v).all() for v in seen["matvec"] + seen["precond"])
    assert all(torch.equal(v, seen["matvec"][s - 1]) for v in seen["matvec"][s:])
    # precond call j + 1 is on r_j; r stays r_s (r_{s-1} if x_s was never formed).
    r_last = seen["precond"][result.num_iter]
    assert all(torch.equal(r, r_last) for r in seen["precond"][result.num_iter + 1 :])


def test_cg_reads_back_a_partial_last_block():
    matvec, b, kwargs = converged_case()
    full = cg(matvec, b, **kwargs)
    assert full.reason is CGStop.CONVERGED
    # max_iter is not a multiple of check_every: the stop lies in the unfinished last block.
    late = cg(matvec, b, max_iter=full.num_iter + 1, check_every=100, **kwargs)
    assert_same_result(full, late)


def test_cg_reads_stop_tests_once_per_block(monkeypatch):
    # Each _decode call is one device -> host read of a block of stop flags.
    reads = []
    original = cg_module._decode

    def counting_decode(rows, first):
        reads.append(len(rows))
        return original(rows, first)

    monkeypatch.setattr(cg_module, "_decode", counting_decode)
    d, b = log_diag_system(60, seed=7)
    cg(diag_matvec(d), b, rtol=0.0, max_iter=40, progress_tol=None, check_every=8)
    assert reads == [8] * 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cg_cuda_matches_cpu():
    A, b = spd_system(50, cond=100.0, seed=11)
    cpu = cg(lambda v: A @ v, b, rtol=SOLVE_RTOL)
    Ac, bc = A.cuda(), b.cuda()
    gpu = cg(lambda v: Ac @ v, bc, rtol=SOLVE_RTOL)  # default check_every = 8
    assert (gpu.reason, gpu.num_iter) == (cpu.reason, cpu.num_iter)
    assert gpu.x.device.type == "cuda"
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, rtol=1e-8, atol=0.0)


# ---------------------------------------------------------------- validation
def _b():
    return torch.ones(3, dtype=DTYPE)


ERROR_CASES = [
    (dict(matvec=3), TypeError, "`matvec` must be callable (v -> A v), got 3."),
    (dict(b=[1.0, 2.0]), TypeError, "`b` must be a 1-D torch.Tensor, got list."),
    (dict(b=torch.ones(2, 2, dtype=DTYPE)), ValueError, "`b` must be a 1-D tensor"),
    (
        dict(b=torch.ones(3, dtype=torch.int64)),
        TypeError,
        "`b` must have a real floating-point dtype, got torch.int64",
    ),
    (dict(x0=torch.ones(4, dtype=DTYPE)), ValueError, "`x0` must be a flat vector of shape (3,)"),
    (dict(x0=torch.ones(3, dtype=torch.float32)), TypeError, "`x0` must have dtype torch.float64"),
    (dict(x0=torch.ones(3, dtype=DTYPE, device="meta")), ValueError, "`x0` must be on device cpu"),
    (dict(x0=torch.tensor([0.0, math.inf, 0.0], dtype=DTYPE)), ValueError, "`x0` must be finite"),
    (dict(x0=np.ones(3)), TypeError, "`x0` must be a torch.Tensor, got ndarray."),
    (dict(max_iter=0), ValueError, "`max_iter` must be an int >= 1, got 0."),
    (dict(max_iter=2.5), TypeError, "`max_iter` must be an int, got float 2.5."),
    (dict(max_iter=True), TypeError, "`max_iter` must be an int, got bool True."),
    (dict(min_iter=-1), ValueError, "`min_iter` must be an int in [0, 250], got -1."),
    (dict(min_iter=300), ValueError, "`min_iter` must be an int in [0, 250], got 300."),
    (dict(rtol=-1.0), ValueError, "`rtol` must be in [0.0, inf), got -1.0."),
    (dict(rtol=math.nan), ValueError, "`rtol` must be in [0.0, inf), got nan."),
    (dict(rtol=math.inf), ValueError, "`rtol` must be in [0.0, inf), got inf."),
    (dict(rtol="1e-5"), TypeError, "`rtol` must be a real number, got str '1e-5'."),
    (dict(atol=-0.5), ValueError, "`atol` must be in [0.0, inf), got -0.5."),
    (
        dict(progress_tol=0.0),
        ValueError,
        "`progress_tol` must be in (0.0, inf), got 0.0. Pass None to turn",
    ),
    (dict(store_start=0), ValueError, "`store_start` must be an int >= 1, got 0."),
    (dict(store_ratio=1.0), ValueError, "`store_ratio` must be in (1.0, inf), got 1.0."),
    (dict(check_every=0), ValueError, "`check_every` must be an int >= 1, got 0."),
    (dict(precond="jacobi"), TypeError, "`precond` must be None, a callable"),
    (dict(precond=torch.ones(4, dtype=DTYPE)), ValueError, "`precond` must be a flat vector"),
    (
        dict(precond=torch.tensor([1.0, 0.0, 2.0], dtype=DTYPE)),
        ValueError,
        "`precond` as a diagonal tensor must be positive and finite (the diagonal of an SPD M), "
        "got an entry 0.0",
    ),
    (
        dict(matvec=lambda v: v[:2]),
        ValueError,
        "`matvec` must return a tensor of shape (3,) on cpu, like `b`; got shape (2,) on cpu.",
    ),
    (dict(matvec=lambda v: v.float()), TypeError, "`matvec` must return a tensor of dtype"),
    (dict(precond=lambda r: r.tolist()), TypeError, "`precond` must return a torch.Tensor"),
]


@pytest.mark.parametrize(
    "kwargs, error, message",
    ERROR_CASES,
    ids=[f"{next(iter(k))}-{i}" for i, (k, _, _) in enumerate(ERROR_CASES)],
)
def test_cg_rejects_bad_arguments(kwargs, error, message):
    args = dict(matvec=lambda v: 2.0 * v, b=_b())
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(message)):
        cg(args.pop("matvec"), args.pop("b"), **args)


def first_direction_negative_case():
    """A = diag(-1, 1/2), b = (1, 0.1): p_1 = b has p_1ᵀAp_1 = -0.995 < 0."""
    d = torch.tensor([-1.0, 0.5], dtype=DTYPE)
    return diag_matvec(d), torch.tensor([1.0, 0.1], dtype=DTYPE), d


@pytest.mark.parametrize("check_every", [1, 7])
def test_cg_negative_curvature_at_first_direction_steps_along_it(check_every):
    matvec, b, d = first_direction_negative_case()
    result = cg(matvec, b, check_every=check_every)
    pAp = float(b @ (d * b))
    tau = float(b @ b) / abs(pAp)
    assert (result.reason, result.num_iter, result.iterations) == (
        CGStop.NEGATIVE_CURVATURE,
        1,
        [1],
    )
    torch.testing.assert_close(result.x, tau * b, **EXACT)
    phi = dense_phi(np.diag(d.numpy()), b.numpy(), result.x.numpy())
    assert phi < 0.0
    assert float(result.iterate_phi[-1]) == pytest.approx(phi, rel=1e-12)
    assert result.phi_history.shape == (2,)


def test_cg_negative_curvature_at_first_direction_from_a_warm_start():
    matvec, b, d = first_direction_negative_case()
    x0 = torch.tensor([0.0, 0.2], dtype=DTYPE)  # r_0 = A x0 - b = (-1, 0): p_1 = (1, 0)
    result = cg(matvec, b, x0)
    assert (result.reason, result.num_iter) == (CGStop.NEGATIVE_CURVATURE, 1)
    torch.testing.assert_close(result.x, torch.tensor([1.0, 0.2], dtype=DTYPE), **EXACT)
    assert torch.equal(x0, torch.tensor([0.0, 0.2], dtype=DTYPE))  # x0 not mutated


# ---------------------------------------------------------------- memory
class _LiveVectors(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks the distinct storages of the length-``n`` vectors that ops create."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.refs = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == self.n:
                self.refs.append(weakref.ref(t))
        return out

    def alive(self) -> int:
        return len({r().untyped_storage().data_ptr() for r in self.refs if r() is not None})


@pytest.mark.parametrize("check_every", [1, 4])
def test_cg_holds_only_x_r_p_between_products(check_every):
    A, b = spd_system(30, 1e3, seed=0)
    mode, alive = _LiveVectors(30), []

    def matvec(v):
        alive.append(mode.alive())
        return A @ v

    with mode:  # no grid points within 10 iterations: nothing stored for backtracking
        cg(
            matvec,
            b,
            max_iter=10,
            rtol=0.0,
            progress_tol=None,
            store_start=100,
            check_every=check_every,
        )
    # b's detached alias, x, r and p; a scratch vector only when masking (check_every > 1);
    # the previous product is freed before the next one
    assert max(alive) == 4 + (check_every > 1)


def test_stop_reason_is_the_former_name_of_cg_stop():
    assert StopReason is CGStop and StopReason.CONVERGED is CGStop.CONVERGED


# ---------------------------------------------------------------- forcing terms (inexact Newton)
def test_forcing_term_closed_forms():
    # Eisenstat & Walker (1996), choice 2: gamma (g_k / g_{k-1})^alpha, safeguard, eta_max
    assert forcing_term(3.0) == 0.5  # no previous step
    assert forcing_term(3.0, 0.0) == 0.5
    assert forcing_term(0.1, 1.0) == pytest.approx(0.9 * 0.01, rel=1e-12)
    assert forcing_term(0.1, 1.0, 0.3) == pytest.approx(0.009, rel=1e-12)  # 0.9 * 0.09 < 0.1
    assert forcing_term(0.1, 1.0, 0.5) == pytest.approx(0.9 * 0.25, rel=1e-12)  # safeguard
    assert forcing_term(2.0, 1.0) == 0.5  # the gradient grew: capped
    assert forcing_term(0.5, 1.0, gamma=1.0, alpha=1.5) == pytest.approx(0.5**1.5, rel=1e-12)
    assert forcing_term(0.9, 1.0, eta_max=0.9) == pytest.approx(0.729, rel=1e-12)
    # scale-free: only ratios enter
    assert forcing_term(3e-7, 1e-6, 0.2) == pytest.approx(forcing_term(0.3, 1.0, 0.2), rel=1e-12)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(gamma=0.0), r"`gamma`"),
        (dict(alpha=2.5), r"`alpha`"),
        (dict(eta_max=1.0), r"`eta_max`"),
    ],
)
def test_forcing_term_rejects_bad_constants(kw, match):
    with pytest.raises(ValueError, match=match):
        forcing_term(1.0, 2.0, **kw)


def test_relative_forcing_term_closed_forms():
    # min(η_max, √(‖g_k‖/‖g_0‖)): Dembo & Steihaug's √‖g‖ made scale-free
    assert relative_forcing_term(1.0, 1.0) == 0.5
    assert relative_forcing_term(4.0, 1.0) == 0.5  # the gradient grew: capped
    assert relative_forcing_term(0.04, 1.0) == pytest.approx(0.2, rel=1e-12)
    assert relative_forcing_term(4e-8, 1e-6) == pytest.approx(0.2, rel=1e-12)  # scale-free
    assert relative_forcing_term(0.0, 1.0) == 0.0
    assert relative_forcing_term(0.81, 1.0, eta_max=0.95) == pytest.approx(0.9, rel=1e-12)


@pytest.mark.parametrize(
    "args, kw, match",
    [
        ((-1.0, 1.0), {}, r"`grad_norm` must be .*got -1\.0"),
        ((1.0, 0.0), {}, r"`first_grad_norm` must be .*got 0\.0"),
        ((1.0, math.inf), {}, r"`first_grad_norm`"),
        ((1.0, 1.0), dict(eta_max=1.0), r"`eta_max`"),
    ],
)
def test_relative_forcing_term_rejects_bad_values(args, kw, match):
    with pytest.raises(ValueError, match=match):
        relative_forcing_term(*args, **kw)


@pytest.mark.parametrize("eta", [0.5, 0.1, 1e-3])
def test_cg_loose_rtol_stops_where_textbook_cg_first_meets_it(eta):
    # The forcing-term stop ||A x_i - b|| <= eta ||b||: the first such iterate of numpy's CG.
    A, b = spd_system(40, cond=1e3, seed=4)
    xs, _ = reference_cg(A.numpy(), b.numpy(), 40)
    norms = [np.linalg.norm(A.numpy() @ x - b.numpy()) for x in xs]
    expected = next(i for i, r in enumerate(norms) if r <= eta * np.linalg.norm(b.numpy()))
    result = cg(lambda v: A @ v, b, rtol=eta, progress_tol=None)
    assert result.reason is StopReason.CONVERGED
    assert result.num_iter == expected
    np.testing.assert_allclose(result.x.numpy(), xs[expected], rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------- trust radius (Steihaug 1983)
def _steihaug_numpy(A: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, int]:
    """Oracle: plain CG from 0 in numpy until the path leaves ||x|| <= radius; the crossing."""
    x, r = np.zeros_like(b), -b.copy()
    p = b.copy()
    for i in range(1, 10 * len(b)):
        alpha = (r @ r) / (p @ A @ p)
        x_next = x + alpha * p
        if np.linalg.norm(x_next) > radius:
            # tau >= 0 with ||x + tau p|| = radius
            a2, a1, a0 = p @ p, 2 * x @ p, x @ x - radius**2
            tau = (-a1 + np.sqrt(a1 * a1 - 4 * a2 * a0)) / (2 * a2)
            return x + tau * p, i
        r_next = r + alpha * (A @ p)
        p = -r_next + (r_next @ r_next) / (r @ r) * p
        x, r = x_next, r_next
    raise AssertionError("did not cross")


@pytest.mark.parametrize("check_every", [1, 4])
@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.9])
def test_cg_trust_radius_returns_steihaug_crossing(check_every, fraction):
    A, b = spd_system(30, cond=100.0, seed=3)
    A_np, b_np = A.numpy(), b.numpy()
    radius = fraction * float(np.linalg.norm(np.linalg.solve(A_np, b_np)))
    want, crossing = _steihaug_numpy(A_np, b_np, radius)
    res = cg(lambda v: A @ v, b, rtol=1e-12, max_norm=radius, check_every=check_every)
    assert res.reason is CGStop.TRUST_RADIUS
    assert res.num_iter == crossing  # the crossing counts as the iteration that left the ball
    np.testing.assert_allclose(res.x.numpy(), want, rtol=0, atol=1e-10 * radius)
    assert float(res.x.norm()) == pytest.approx(radius, rel=1e-12)
    phi = 0.5 * want @ A_np @ want - b_np @ want
    assert float(res.phi_history[-1]) == pytest.approx(phi, rel=1e-10)
    assert float(res.iterate_phi[-1]) == pytest.approx(phi, rel=1e-10)


def test_cg_trust_radius_not_reached_changes_nothing():
    A, b = spd_system(12, cond=50.0, seed=1)
    free = cg(lambda v: A @ v, b, rtol=1e-10)
    big = cg(lambda v: A @ v, b, rtol=1e-10, max_norm=10 * float(free.x.norm()))
    assert big.reason is CGStop.CONVERGED and big.num_iter == free.num_iter
    torch.testing.assert_close(big.x, free.x, rtol=0, atol=0)


def test_cg_trust_radius_indefinite_stops_inside():
    # A closed-form indefinite quadratic: the path crosses the sphere before negative curvature
    # shows, so the answer is the crossing (numpy oracle on the positive block CG explores).
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=DTYPE))
    b = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=DTYPE)  # orthogonal to the negative direction
    want, _ = _steihaug_numpy(np.diag([1.0, 2.0, 3.0]), np.ones(3), 0.5)
    res = cg(lambda v: A @ v, b, rtol=1e-12, max_norm=0.5)
    assert res.reason is CGStop.TRUST_RADIUS
    np.testing.assert_allclose(res.x.numpy(), [*want, 0.0], atol=1e-12)


def test_cg_trust_radius_start_outside_returns_start_and_bad_radius_is_named():
    A, b = spd_system(5, cond=10.0, seed=0)
    x0 = torch.full((5,), 10.0, dtype=DTYPE)
    res = cg(lambda v: A @ v, b, x0, max_norm=1.0)
    assert res.reason is CGStop.TRUST_RADIUS and res.num_iter == 0
    torch.testing.assert_close(res.x, x0, rtol=0, atol=0)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match=r"`max_norm` must be in \(0.0, inf\), got"):
            cg(lambda v: A @ v, b, max_norm=bad)


def _to_sphere_numpy(x: np.ndarray, p: np.ndarray, radius: float) -> np.ndarray:
    """The point x + tau p, tau >= 0, with ||x + tau p|| = radius (x inside)."""
    a2, a1, a0 = p @ p, 2 * x @ p, x @ x - radius**2
    return x + (-a1 + np.sqrt(a1 * a1 - 4 * a2 * a0)) / (2 * a2) * p


@pytest.mark.parametrize("check_every", [1, 7])
def test_cg_negative_curvature_at_first_direction_with_radius_steps_to_the_sphere(check_every):
    # Steihaug (1983) with A = diag(-1, 1/2): phi falls without bound along p_1 = b, so the
    # step ends on the sphere along b (without the radius it would be 1.01 b, beyond 0.5)
    matvec, b, d = first_direction_negative_case()
    radius = 0.5
    res = cg(matvec, b, max_norm=radius, check_every=check_every)
    want = radius * b.numpy() / np.linalg.norm(b.numpy())
    assert (res.reason, res.num_iter) == (CGStop.NEGATIVE_CURVATURE, 1)
    np.testing.assert_allclose(res.x.numpy(), want, rtol=1e-12, atol=0)
    phi = dense_phi(np.diag(d.numpy()), b.numpy(), want)
    assert float(res.iterate_phi[-1]) == pytest.approx(phi, rel=1e-12)
    assert float(res.phi_history[-1]) == pytest.approx(phi, rel=1e-12)


@pytest.mark.parametrize("check_every", [1, 4])
def test_cg_negative_curvature_later_with_radius_steps_to_the_sphere(check_every):
    # A = diag(3, 2, -1/2), b = (1, 1, 1): p_1 = b has curvature 4.5 > 0, p_2 has negative
    # curvature (numpy oracle: textbook CG, then x_1 + tau p_2 on the sphere, tau >= 0)
    d = np.array([3.0, 2.0, -0.5])
    A, b = np.diag(d), np.ones(3)
    x, r, p = np.zeros(3), -b, b.copy()
    alpha = (r @ r) / (p @ A @ p)
    x1, r1 = x + alpha * p, r + alpha * (A @ p)
    p2 = -r1 + (r1 @ r1) / (r @ r) * p
    assert p2 @ A @ p2 < 0  # the case is what it says
    radius = 2.0 * np.linalg.norm(x1)
    want = _to_sphere_numpy(x1, p2, radius)
    res = cg(
        diag_matvec(torch.tensor(d, dtype=DTYPE)),
        torch.tensor(b, dtype=DTYPE),
        max_norm=radius,
        check_every=check_every,
    )
    assert (res.reason, res.num_iter) == (CGStop.NEGATIVE_CURVATURE, 2)
    np.testing.assert_allclose(res.x.numpy(), want, rtol=1e-12, atol=1e-14)
    assert float(res.iterate_phi[-1]) == pytest.approx(dense_phi(A, b, want), rel=1e-12)
    # without a radius: the iterate before the bad direction, as before
    free = cg(diag_matvec(torch.tensor(d, dtype=DTYPE)), torch.tensor(b, dtype=DTYPE))
    assert (free.reason, free.num_iter) == (CGStop.NEGATIVE_CURVATURE, 1)
    np.testing.assert_allclose(free.x.numpy(), x1, rtol=1e-12)


# ------------------------------------------------- descent_stop: no stop on an uphill start
def _uphill_start_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = diag(logspace(-6, 0, 12)), x0 = A^{-1} b + 300 e_0 along the tiny eigenvalue (b is 0
    there): ||A x0 - b|| = 3e-4 is far below ||b||/2 = 0.0135, yet phi(x0) = phi* + 1/2 1e-6
    300^2 = -0.0007 + 0.045 > 0, the small-residual, uphill warm start of a mini-batch HF step
    with lambda at its floor (CURVES, issue 14)."""
    d = torch.logspace(-6, 0, 12, dtype=DTYPE)
    b = torch.zeros(12, dtype=DTYPE)
    b[-3:] = torch.tensor([0.01, -0.02, 0.015], dtype=DTYPE)
    x0 = b / d
    x0[0] = 300.0  # d[0] x0[0] = 3e-4 in the residual; 1/2 d[0] x0[0]^2 = 0.045 in phi
    return d, b, x0


def _numpy_cg_from(A: np.ndarray, b: np.ndarray, x0: np.ndarray, num_iter: int) -> list:
    """Textbook CG from x0 in numpy (residual b - Ax): the iterates x_0..x_num_iter."""
    x, r = x0.copy(), b - A @ x0
    p, xs = r.copy(), [x0.copy()]
    for _ in range(num_iter):
        if np.linalg.norm(r) == 0:
            break
        Ap = A @ p
        alpha = (r @ r) / (p @ Ap)
        x = x + alpha * p
        r_next = r - alpha * Ap
        p = r_next + (r_next @ r_next) / (r @ r) * p
        r = r_next
        xs.append(x)
    return xs


@pytest.mark.parametrize("check_every", [1, 3])
def test_cg_descent_stop_iterates_past_an_uphill_warm_start(check_every):
    d, b, x0 = _uphill_start_case()
    A = np.diag(d.numpy())
    phi0 = dense_phi(A, b.numpy(), x0.numpy())
    assert phi0 > 0 and np.linalg.norm(A @ x0.numpy() - b.numpy()) < 0.5 * np.linalg.norm(b)
    matvec = diag_matvec(d)
    plain = cg(matvec, b, x0, rtol=0.5, progress_tol=None, check_every=check_every)
    assert (plain.reason, plain.num_iter) == (CGStop.CONVERGED, 0)  # returns the uphill start
    assert torch.equal(plain.x, x0)
    result = cg(
        matvec, b, x0, rtol=0.5, progress_tol=None, check_every=check_every, descent_stop=True
    )
    # oracle: the first textbook-CG iterate from x0 with ||r|| <= ||b||/2 and phi < 0
    xs = _numpy_cg_from(A, b.numpy(), x0.numpy(), 12)
    expected = next(
        i
        for i, x in enumerate(xs)
        if np.linalg.norm(A @ x - b.numpy()) <= 0.5 * np.linalg.norm(b.numpy())
        and dense_phi(A, b.numpy(), x) < 0
    )
    assert expected > 0
    assert (result.reason, result.num_iter) == (CGStop.CONVERGED, expected)
    np.testing.assert_allclose(result.x.numpy(), xs[expected], rtol=1e-8, atol=1e-10)
    assert float(result.phi_history[expected]) < 0
    assert float(b @ result.x) > 0  # -g^T x > 0: a descent direction for g = -b


def test_cg_descent_stop_changes_nothing_from_zero_or_a_downhill_start():
    A, b = spd_system(25, cond=50.0, seed=5)
    matvec = lambda v: A @ v  # noqa: E731
    for x0 in (None, 0.5 * torch.linalg.solve(A, b)):  # phi(x0) < 0 for the second
        a = cg(matvec, b, x0, rtol=0.3, progress_tol=None)
        c = cg(matvec, b, x0, rtol=0.3, progress_tol=None, descent_stop=True)
        assert_same_result(a, c)
    # b = 0: phi only approaches 0 from above, so the residual test alone decides
    x0 = torch.ones(25, dtype=DTYPE)
    zero_b = torch.zeros(25, dtype=DTYPE)
    a = cg(matvec, zero_b, x0, rtol=0.0, atol=1e-8, progress_tol=None)
    c = cg(matvec, zero_b, x0, rtol=0.0, atol=1e-8, progress_tol=None, descent_stop=True)
    assert_same_result(a, c)
    assert a.reason is CGStop.CONVERGED


def test_max_iter_beyond_the_limit_is_refused_before_allocating():
    # 2**40 iterations would need ~16 TB of history and flags: a named refusal, not a
    # failed allocation (and 2**70 not an overflow while unpacking the size)
    for n in (2**40, 2**70):
        with pytest.raises(
            ValueError, match=rf"`max_iter` must be an int in \[1, 1000000\], got {n}"
        ):
            cg(lambda v: v, torch.ones(2, dtype=torch.float64), max_iter=n)
        with pytest.raises(ValueError, match=r"`cg_max_iter` must be an int in \[1, 1000000\]"):
            HFSettings(cg_max_iter=n)


# ---------------------------------------------------------------- 16-bit right-hand sides
def _signed_b(n: int, seed: int) -> torch.Tensor:
    """Entries of magnitude in [1/2, 2]: a power-of-two rescaling keeps them normal in fp16."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 2.0, n))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [-13, 0, 10])
def test_cg_16bit_solves_where_its_squared_norms_leave_the_dtype(dtype, k):
    # b scaled by 2**k. In float16 CG's scalars are squared norms: at k = -13, rᵀr underflowed
    # to 0 after an iteration (β = 0/0 = NaN: HF's 'non-finite curvature product' in float16
    # runs); at k = 10, bᵀb overflowed 65504. CG now keeps its vectors and scalars in float32
    # and runs each product in float16 on a vector rescaled by a power of two. bfloat16 (float32's
    # range) is solved in bfloat16, as before, to the same bound.
    A, _ = spd_system(6, 10.0, seed=3)
    A16, b16 = A.to(dtype), (_signed_b(6, seed=4) * 2.0**k).to(dtype)
    result = cg(lambda v: A16 @ v, b16, rtol=1e-2, max_iter=30)
    assert result.reason is CGStop.CONVERGED and result.x.dtype == dtype
    x_star = np.linalg.solve(A16.double().numpy(), b16.double().numpy())  # float64 oracle
    eps = torch.finfo(dtype).eps
    # the residual test at 1e-2 and the products' rounding (~eps · ‖A‖‖v‖) bound the error
    # by cond(A) · (1e-2 + 6 eps) relative to ‖x*‖
    err = np.linalg.norm(result.x.double().numpy() - x_star) / np.linalg.norm(x_star)
    assert err <= 10.0 * (1e-2 + 6 * eps)


def test_cg_16bit_is_invariant_to_power_of_two_scaling_of_b():
    # exact in binary arithmetic: x(2^k b) = 2^k x(b) and φ scales by 4^k, bit for bit in CG's
    # float32 scalars (each product sees the same float16 vector, rescaled to max |v| in [½, 1))
    A, _ = spd_system(6, 10.0, seed=3)
    A16, b = A.half(), _signed_b(6, seed=4)
    ref = cg(lambda v: A16 @ v, b.half(), rtol=1e-3, max_iter=30)
    for k in (-13, 10):
        result = cg(lambda v: A16 @ v, (b * 2.0**k).half(), rtol=1e-3, max_iter=30)
        assert result.num_iter == ref.num_iter and result.reason is ref.reason
        assert torch.equal(result.phi_history, ref.phi_history * 4.0**k)
        torch.testing.assert_close(
            result.x.double(), ref.x.double() * 2.0**k, rtol=2.0**-10, atol=2.0**-24
        )


def test_cg_16bit_products_are_exact_rescalings_of_the_float64_hessian():
    # v with entries up to 2**12: the float16 Hessian product of v itself overflows 65504; on
    # v rescaled to max |v| in [½, 1) and scaled back in float32 it is H v to float16's
    # rounding (oracle: torch.autograd.functional.hessian in float64)
    torch.manual_seed(0)
    w64 = torch.randn(5, dtype=torch.float64)
    X = torch.randn(8, 5, dtype=torch.float64)

    def f(w):
        return torch.tanh(X.to(w.dtype) @ w).square().sum() * 8

    w16 = w64.half().requires_grad_()
    product = hessfree.HessianProduct(f(w16), [w16])
    v = torch.randn(5) * 2.0**12
    assert not torch.isfinite(product(v.half())).all()  # what the float16 CG did before
    scaled = cg_module._low_precision_product(product, torch.zeros(5, dtype=torch.float16), "m")
    Hv = scaled(v)
    assert Hv.dtype == torch.float32
    H16 = torch.autograd.functional.hessian(f, w16.detach().double())  # at the stored w
    expected = H16 @ v.double()
    torch.testing.assert_close(
        Hv.double(), expected, rtol=0, atol=2e-2 * float(expected.abs().max())
    )
