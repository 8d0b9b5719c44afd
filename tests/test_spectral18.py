"""``hessfree.spectral`` on the inputs users give it next (experiments/README.md, spectral18).

Oracles: ``numpy.linalg.eigvalsh``/``eigh``/``slogdet`` of explicit float64 matrices (the
small MLPs' GGN and Hessian from ``torch.autograd.functional`` in ``cases.dense``), the
symmetric part :math:`(A + A^\\top)/2` of a non-symmetric matrix (whose quadratic forms are
the same numbers), and the estimators' exact standard deviations from the dense matrix.
Every random draw is seeded; statistical claims have margins checked to refuse a wrong answer.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from cases import CASES, dense
from hessfree.operators import GGNLinearOperator, HessianLinearOperator
from hessfree.spectral import (
    bottom_eigenpairs,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    top_eigenpairs,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny products on a shared 2-core machine
BY_NAME = {c.name: c for c in CASES}


def _nonsymmetric(n: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n))
    A = X @ X.T / n + np.eye(n)
    A[0, 5] += 0.3  # one entry off: a product of the user's own with a bug
    return A


# ------------------------------------------------------------------------------ symmetry
@pytest.mark.parametrize("kind", ["numpy", "tensor", "sparse", "float32"])
@pytest.mark.parametrize("which", [top_eigenpairs, bottom_eigenpairs], ids=["top", "bottom"])
def test_eigenpairs_refuse_a_non_symmetric_matrix_naming_the_entry(kind, which):
    """On main: eigsh's Lanczos read the matrix as if symmetric and returned eigenvalues of
    neither A nor its symmetric part, silently."""
    A = _nonsymmetric()
    M = {
        "numpy": A,
        "tensor": torch.from_numpy(A),
        "sparse": scipy.sparse.csr_array(A),
        "float32": A.astype(np.float32),
    }[kind]
    with pytest.raises(ValueError, match=r"must be symmetric.*\|A\[0, 5\] - A\[5, 0\]\| = 0\.3"):
        which(M, k=2)


def test_float32_curvature_matrices_pass_the_symmetry_check():
    """A guard for the threshold: ``H @ I`` and ``G @ I`` of float32 operators are symmetric only
    to rounding (1e-7 of their norm), and pass; their eigenvalues are the float64 dense ones."""
    case = BY_NAME["mlp_relu_ce"]
    model, x, y, loss_fn = case.build(dtype=torch.float32)
    D = dense(*case.build())
    for Op, M64 in ((HessianLinearOperator, D.H), (GGNLinearOperator, D.G)):
        M = Op(model, loss_fn, (x, y)) @ np.eye(M64.shape[0], dtype=np.float32)
        assert M.dtype == np.float32 and not np.array_equal(M, M.T)  # rounding-level gaps
        want = np.linalg.eigvalsh(M64.numpy())
        scale = np.abs(want).max()
        got = top_eigenpairs(M, k=2).values
        np.testing.assert_allclose(got, want[::-1][:2], atol=1e-5 * scale)  # float32 smoke
        got = bottom_eigenpairs(M, k=2).values
        np.testing.assert_allclose(got, want[:2], atol=1e-5 * scale)


def test_a_nan_matrix_is_refused_for_its_nan_not_as_asymmetric():
    """A guard: the symmetry check lets NaN through to the products' own message."""
    A = np.diag([1.0, 2.0, 3.0, 4.0])
    A[1, 2] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        top_eigenpairs(A)


def test_complex_hermitian_with_k_one_below_n():
    """On main: SciPy's "Cannot use scipy.linalg.eig for LinearOperator A with k >= N - 1"
    (ARPACK's complex path needs k < n - 1)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((4, 4)) + 1j * rng.standard_normal((4, 4))
    A = X @ X.conj().T
    want = np.linalg.eigvalsh(A)
    np.testing.assert_allclose(top_eigenpairs(A, k=3).values, want[::-1][:3], rtol=1e-12)
    pairs = bottom_eigenpairs(A[:2, :2], k=1)
    np.testing.assert_allclose(pairs.values, np.linalg.eigvalsh(A[:2, :2])[:1], rtol=1e-12)
    np.testing.assert_allclose(A[:2, :2] @ pairs.vectors, pairs.vectors * pairs.values, atol=1e-12)


def test_trace_estimators_take_a_non_symmetric_matrix_as_its_symmetric_part():
    """A guard for not refusing it: z^T A z = z^T S z with S = (A + A^T)/2, so the same probes
    give the same estimate to rounding (tr A = tr S), and Hutch++ with a full sketch is exact."""
    A = _nonsymmetric(20, 1)
    S = (A + A.T) / 2
    a, s = hutchinson_trace(A, 50, seed=4), hutchinson_trace(S, 50, seed=4)
    np.testing.assert_allclose(a, s, rtol=1e-12)
    np.testing.assert_allclose(hutchpp_trace(A, 3 * 20, seed=1).estimate, np.trace(A), rtol=1e-12)


def test_diagonal_estimator_of_a_non_symmetric_matrix_uses_its_rows():
    """A guard: entry i's standard deviation is sqrt(sum_{k != i} A_ik^2 / m) (its row, not the
    symmetric part's), checked against the estimate within 5 of them; the margin refuses the
    symmetric part's diagonal shifted by 1 (the test can fail)."""
    rng = np.random.default_rng(5)
    A = np.triu(rng.standard_normal((15, 15))) + np.diag(np.arange(15.0))  # far from symmetric
    m = 400
    est = hutchinson_diagonal(A, m, seed=2)
    sigma = np.sqrt((np.sum(A**2, axis=1) - np.diag(A) ** 2) / m)
    assert np.all(np.abs(est.estimate - np.diag(A)) <= 5 * sigma + 1e-12)  # last row: exact
    assert np.any(np.abs(est.estimate - (np.diag(A) + 1)) > 5 * sigma)
    np.testing.assert_allclose(est.std_error, sigma, rtol=0.25)  # 400 probes: ~4 % spread


# ------------------------------------------------------------------------------ operators' inputs
def _mlp_case(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    return model.to(dtype), x.to(dtype), y.to(dtype), torch.nn.MSELoss()


def test_a_frozen_tensor_listed_in_params_is_refused_by_index():
    """On main: dropped, so the operator had 17 columns for a list of 37 entries, silently (the
    products already refused it). The model's own trainable parameters are still the default,
    and ``hessfree.trainable`` of the list gives the operator over the rest (dense Hessian)."""
    from hessfree import trainable

    model, x, y, loss_fn = _mlp_case()
    model[0].weight.requires_grad_(False)
    for Op in (HessianLinearOperator, GGNLinearOperator):
        with pytest.raises(
            ValueError,
            match=r"`params\[0\]` \(shape \(5, 4\)\) does not require.*17 columns, not 37",
        ):
            Op(model, loss_fn, (x, y), params=model.parameters())
    H = HessianLinearOperator(model, loss_fn, (x, y), params=trainable(list(model.parameters())))
    w, rest = model[0].weight.detach(), [p.detach() for p in model.parameters()][1:]
    sizes = [p.numel() for p in rest]

    def loss_of(theta):
        b0, w2, b2 = (t.view(p.shape) for t, p in zip(theta.split(sizes), rest, strict=True))
        return loss_fn(torch.tanh(x @ w.T + b0) @ w2.T + b2, y)

    Hd = torch.autograd.functional.hessian(loss_of, torch.cat([p.reshape(-1) for p in rest]))
    np.testing.assert_allclose(H @ np.eye(17), Hd.numpy(), rtol=1e-10, atol=1e-12)
    assert HessianLinearOperator(model, loss_fn, (x, y)).shape == (17, 17)


def test_products_of_a_meta_model_are_refused_with_the_fix():
    """On main: torch's "Cannot copy out of meta tensor; no data!" from the numpy edge (building
    works and stays: the shapes and devices are there, the tests of operators13 use it)."""
    model, x, y, loss_fn = _mlp_case()
    model.to("meta")
    H = HessianLinearOperator(model, loss_fn, (x, y))
    assert H.shape == (37, 37)
    for use in (
        lambda: H @ np.ones(37),
        lambda: H @ np.ones((37, 2)),
        lambda: H.gradient(),
        lambda: top_eigenpairs(H),
    ):
        with pytest.raises(RuntimeError, match=r"'meta' device.*to_empty"):
            use()


@pytest.mark.parametrize("kind", ["float64", "int", "column", "strided", "fortran-block"])
def test_scipy_solvers_on_a_float32_operator_take_any_real_vector(kind):
    """A guard: cg, minres, expm_multiply and a 2-D block product of a float32 GGN match SciPy's
    own results on the dense float64 matrix to float32 rounding, whatever real array comes in."""
    from scipy.linalg import expm
    from scipy.sparse.linalg import cg, minres

    model, x, y, loss_fn = _mlp_case(torch.float32)
    G = GGNLinearOperator(model, loss_fn, (x, y))
    # the oracle: G = J^T H_l J with J from torch.autograd.functional, H_l = 2/32 I (MSE mean)
    model64 = _mlp_case()[0]
    params = [p.detach() for p in model64.parameters()]
    sizes = [p.numel() for p in params]

    def outputs(theta):
        w0, b0, w2, b2 = (t.view(p.shape) for t, p in zip(theta.split(sizes), params, strict=True))
        return (torch.tanh(x.double() @ w0.T + b0) @ w2.T + b2).reshape(-1)

    Jd = torch.autograd.functional.jacobian(outputs, torch.cat([p.reshape(-1) for p in params]))
    Gd = (2 / 32) * (Jd.T @ Jd).numpy()
    lam, rng = 0.1, np.random.default_rng(1)
    b = {
        "float64": rng.standard_normal(37),
        "int": np.arange(37) % 5 - 2,
        "column": rng.standard_normal((37, 1)),
        "strided": rng.standard_normal(74)[::2],
        "fortran-block": np.asfortranarray(rng.standard_normal((37, 3))),
    }[kind]
    if b.ndim == 2 and b.shape[1] > 1:
        got = G @ b
        assert got.dtype == np.float32 and got.shape == b.shape
        np.testing.assert_allclose(got, Gd @ b, rtol=1e-5, atol=1e-5 * np.abs(Gd @ b).max())
        return
    want = np.linalg.solve(Gd + lam * np.eye(37), b.ravel().astype(np.float64))
    scale = np.abs(want).max()
    for x_ in (cg(G.damped(lam), b, rtol=1e-6)[0], minres(G, b, shift=-lam, rtol=1e-6)[0]):
        assert x_.shape == (37,)
        np.testing.assert_allclose(x_, want, atol=1e-4 * scale)  # float32 products
    from scipy.sparse.linalg import expm_multiply

    e = expm_multiply(-G.damped(lam), b, traceA=1.0)
    want_e = expm(-(Gd + lam * np.eye(37))) @ b
    assert e.shape == b.shape
    np.testing.assert_allclose(e, want_e, atol=1e-5 * np.abs(want_e).max())


# ------------------------------------------------------------------------------ deflated SLQ
@functools.cache
def _low_rank_ggn() -> tuple[np.ndarray, float]:
    """A 6-16-3 tanh MLP, cross-entropy on 20 examples: a 163-parameter GGN of rank 40 (two per
    example), dense from torch.autograd.functional; λ = 1e-3 of its largest eigenvalue."""
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    G = dense(model.double(), x.double(), y, torch.nn.functional.cross_entropy).G.numpy()
    return G, 1e-3 * np.linalg.eigvalsh(G)[-1]


def _sphere_sd(mu: np.ndarray) -> float:
    """Exact standard deviation of r u^T f(A) u, u uniform on the unit sphere of an r-dimensional
    invariant subspace where f(A) has eigenvalues mu: sqrt(2 (r tr M² - (tr M)²) / (r + 2))."""
    r, t1, t2 = mu.size, mu.sum(), (mu**2).sum()
    return float(np.sqrt(max(0.0, 2 * (r * t2 - t1**2) / (r + 2))))


def test_deflated_logdet_has_a_smaller_standard_error():
    """The deflated estimate of log det(G + λI) against slogdet: within five exact standard
    deviations (the sphere's formula on the 163 - d smallest eigenvalues; the quadrature is
    exact at 45 > 41 distinct eigenvalues), its reported error near the exact one, and both
    about 4x smaller than Hutchinson's at d = 20 for a few more products."""
    G, lam = _low_rank_ggn()
    n, m = G.shape[0], 40
    A = G + lam * np.eye(n)
    mu = np.log(np.linalg.eigvalsh(A))[::-1]  # log-eigenvalues, largest first
    logdet = np.linalg.slogdet(A)[1]
    M = (lambda w, Q: (Q * np.log(w)) @ Q.T)(*np.linalg.eigh(A))
    sd_plain = np.sqrt(2 * (np.sum(M**2) - np.sum(np.diag(M) ** 2)))  # Hutchinson, per probe
    plain = spectral_density(A, num_probes=m, num_steps=45, seed=3)
    defl = spectral_density(A, num_probes=m, num_steps=45, seed=3, num_deflated=20)
    sd_defl = _sphere_sd(mu[20:])
    assert sd_defl < sd_plain / 3  # the exact spreads: 4.3x apart here
    for sd, sigma in ((plain, sd_plain), (defl, sd_defl)):
        est = sd.trace(np.log)
        assert abs(est.estimate - logdet) <= 5 * sigma / np.sqrt(m)
        assert 0.6 < est.std_error / (sigma / np.sqrt(m)) < 1.6
    assert defl.trace(np.log).std_error < plain.trace(np.log).std_error / 3
    assert defl.num_deflated == 20 and defl.num_matvecs <= plain.num_matvecs + 2 * n
    top = np.broadcast_to(np.linalg.eigvalsh(A)[::-1][:20], (m, 20))
    np.testing.assert_allclose(defl.nodes[:, :20], top, rtol=1e-12)
    np.testing.assert_allclose(defl.weights.sum(axis=1), n, rtol=1e-12)  # d + (n - d)


def test_deflating_past_the_rank_leaves_a_multiple_of_the_identity_exactly():
    """Beyond rank 40 the rest is λI: one Lanczos step per probe, and log det is slogdet's to
    rounding with a standard error of 0."""
    G, lam = _low_rank_ggn()
    A = G + lam * np.eye(G.shape[0])
    sd = spectral_density(A, num_probes=5, num_steps=30, seed=0, num_deflated=45)
    est = sd.trace(np.log)
    np.testing.assert_allclose(est.estimate, np.linalg.slogdet(A)[1], rtol=1e-10)
    assert est.std_error < 1e-9 * abs(est.estimate)
    np.testing.assert_array_equal(sd.num_nodes, 45 + 1)
    grid = np.linspace(-0.1, 1.2 * np.linalg.eigvalsh(A)[-1], 4001)
    assert abs(np.trapezoid(sd.density(grid, width=0.01), grid) - 1) < 1e-3


def test_deflation_on_a_ggn_operator_counts_arpacks_products():
    G, lam = _low_rank_ggn()
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    op = GGNLinearOperator(model.double(), torch.nn.CrossEntropyLoss(), (x.double(), y))
    sd = spectral_density(op.damped(lam), num_probes=4, num_steps=10, seed=1, num_deflated=5)
    lanczos = int(sd.num_nodes.sum()) - 4 * 5
    assert lanczos == 40 and sd.num_matvecs > lanczos  # ARPACK's products are counted too
    want = np.linalg.eigvalsh(G + lam * np.eye(163))[::-1][:5]
    np.testing.assert_allclose(sd.nodes[0, :5], want, rtol=1e-10)


def test_bad_deflation_is_refused_by_name():
    A = np.diag(np.arange(1.0, 6.0))
    with pytest.raises(ValueError, match=r"`num_deflated` must be in \[0, 4\].*got 5.*k=5"):
        spectral_density(A, num_deflated=5)
    with pytest.raises(ValueError, match=r"`num_deflated` must be an int >= 0, got -1"):
        spectral_density(A, num_deflated=-1)
    with pytest.raises(ValueError, match=r"probes='rademacher'.*cannot be deflated"):
        spectral_density(A, probes="rademacher", num_deflated=2)
    # the default and 'gaussian' deflate; without deflation None is Rademacher, bit for bit
    a = spectral_density(A, 3, 4, seed=0)
    b = spectral_density(A, 3, 4, seed=0, probes="rademacher")
    np.testing.assert_array_equal(a.weights, b.weights)


# ------------------------------------------------------------------------------ bottom, n > 2048
class _Diagonal(scipy.sparse.linalg.LinearOperator):
    """diag(d) through products only (O(n) each), counting them."""

    def __init__(self, d: np.ndarray) -> None:
        super().__init__(d.dtype, (d.size, d.size))
        self.d, self.count = d, 0

    def _matvec(self, x):
        self.count += 1
        return self.d * x.ravel()

    def _matmat(self, X):
        self.count += X.shape[1]
        return self.d[:, None] * X


@pytest.mark.slow  # eigh of a 3,000 x 3,000 matrix: seconds; main spends ~10 n ARPACK restarts
def test_bottom_eigenpairs_of_a_clustered_3000_spectrum_answer_from_the_dense_path():
    """On main (dense fallback up to n = 2048): ArpackNoConvergence after its 10 n restarts.
    The spectrum is geometric from 6.3e-7 to 0.5 (relative gap at the bottom 6e-9, a GGN's
    shape); the oracle is the sorted diagonal."""
    d = np.random.default_rng(0).permutation(np.logspace(-6.2, -0.3, 3000))
    op = _Diagonal(d)
    pairs = bottom_eigenpairs(op, k=2)
    np.testing.assert_allclose(pairs.values, np.sort(d)[:2], rtol=1e-10)
    assert op.count <= 2 * 3000  # n for ARPACK, n for A @ I
    np.testing.assert_allclose(np.abs(pairs.vectors[np.argsort(d)[:2], [0, 1]]), 1.0, rtol=1e-8)
