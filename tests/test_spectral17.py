"""Stochastic Lanczos quadrature (``hessfree.spectral.spectral_density``) against dense oracles.

Oracles: ``numpy.linalg.eigh``/``eigvalsh``/``slogdet`` of explicit float64 matrices (the
small MLP's GGN from ``torch.autograd.functional`` in ``cases.dense``), and the probes
themselves, read back from the first block a recording operator is multiplied with (Lanczos
starts from ``z / ‖z‖`` and every probe has ``‖z‖ = √n``). Exactness claims (a diagonal with
Rademacher probes, ``num_steps >= n``, moments below ``2k``) are checked to rounding; the one
stochastic claim (log det of a damped GGN) is checked against the estimator's exact standard
deviation, seeded, with a margin of five of them (this seed is 2.2 off) and a check that the
margin rejects a wrong answer (the log det at twice the damping, 12 off).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.sparse.linalg import LinearOperator

from cases import CASES, dense
from hessfree.operators import GGNLinearOperator
from hessfree.spectral import SpectralDensity, TraceEstimate, _lanczos, spectral_density

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny products on a shared 2-core machine
BY_NAME = {c.name: c for c in CASES}
EXACT = dict(rtol=1e-10, atol=1e-10)


class _Recording(LinearOperator):
    """A dense symmetric matrix that keeps every block it is multiplied with."""

    def __init__(self, A: np.ndarray, poison_at: int | None = None) -> None:
        super().__init__(A.dtype, A.shape)
        self.A, self.blocks, self.poison_at = A, [], poison_at

    def _matvec(self, x):
        return self._matmat(x.reshape(-1, 1)).ravel()

    def _matmat(self, X):
        self.blocks.append(np.array(X))
        Y = self.A @ X
        if self.poison_at is not None and len(self.blocks) >= self.poison_at:
            Y[0, 0] = np.nan
        return Y

    def probes(self) -> np.ndarray:
        """``(n, b)``: the probes ``z = √n v_1`` of the first block."""
        return self.blocks[0] * np.sqrt(self.shape[0])


def _random_symmetric(n: int, seed: int) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((n, n))
    return (X + X.T) / 2


def _per_probe(sd: SpectralDensity, f) -> np.ndarray:
    """:math:`\\sum_i w_{ji} f(\\theta_{ji})` for each probe ``j``, by hand from the raw rule."""
    out = np.zeros(sd.nodes.shape[0])
    for j, s in enumerate(sd.num_nodes):
        out[j] = np.sum(sd.weights[j, :s] * f(sd.nodes[j, :s]))
    return out


def _quadratic_forms(A: np.ndarray, Z: np.ndarray, f) -> np.ndarray:
    """:math:`z_j^\\top f(A) z_j` from a dense eigendecomposition."""
    lam, Q = np.linalg.eigh(A)
    QZ = Q.T @ Z
    return np.einsum("ij,i,ij->j", QZ, f(lam), QZ)


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("seed_kind", ["int", "torch"])
def test_rademacher_probes_on_a_diagonal_give_every_trace_exactly(seed_kind):
    d = np.array([0.5, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 4.5, 6.0, 0.25])  # 7 distinct values
    seed = 0 if seed_kind == "int" else torch.Generator().manual_seed(0)
    sd = spectral_density(np.diag(d), num_probes=5, num_steps=d.size, seed=seed)
    # z^T f(D) z = sum_i z_i^2 f(d_i) = tr f(D) for z in {-1, 1}^n, and Lanczos stops once it
    # has seen the 7 distinct eigenvalues (an invariant subspace: breakdown, exact rule)
    np.testing.assert_array_equal(sd.num_nodes, [7] * 5)
    assert sd.num_matvecs == 35
    for f in (np.log, np.exp, np.sqrt, lambda t: t**5, lambda t: 1 / (t + 0.1)):
        est = sd.trace(f)
        assert isinstance(est, TraceEstimate)
        np.testing.assert_allclose(est.estimate, np.sum(f(d)), **EXACT)
        assert est.std_error <= 1e-12 * abs(np.sum(f(d)))  # every probe gives the same value


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_each_probe_reproduces_its_quadratic_form_when_num_steps_is_n(probes):
    n = 14
    A = _random_symmetric(n, 1)
    op = _Recording(A)
    sd = spectral_density(op, num_probes=6, num_steps=n + 5, probes=probes, seed=2)
    Z = op.probes()
    np.testing.assert_allclose(np.linalg.norm(Z, axis=0), np.sqrt(n), rtol=1e-14)
    assert sd.nodes.shape == (6, n)  # capped at n
    for f in (np.exp, np.sin, np.abs):  # any f: the rule is the probe's whole spectral measure
        np.testing.assert_allclose(_per_probe(sd, f), _quadratic_forms(A, Z, f), **EXACT)
        np.testing.assert_allclose(sd.trace(f).estimate, _quadratic_forms(A, Z, f).mean(), **EXACT)
    np.testing.assert_allclose(sd.weights.sum(axis=1), n, rtol=1e-13)


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_moments_below_twice_the_steps_are_exact_per_probe(probes):
    n, k = 40, 4
    A = _random_symmetric(n, 3) / 4
    op = _Recording(A)
    sd = spectral_density(op, num_probes=3, num_steps=k, probes=probes, seed=4)
    Z = op.probes()
    np.testing.assert_array_equal(sd.num_nodes, [k] * 3)
    for p in range(2 * k):  # Gauss: exact for degree <= 2k - 1
        want = np.einsum("ij,ij->j", Z, np.linalg.matrix_power(A, p) @ Z)
        np.testing.assert_allclose(
            _per_probe(sd, lambda t, p=p: t**p), want, rtol=1e-10, atol=1e-10 * n
        )
    # ... and no further: degree 2k is off (the test's tolerance can fail)
    want = np.einsum("ij,ij->j", Z, np.linalg.matrix_power(A, 2 * k) @ Z)
    assert np.abs(_per_probe(sd, lambda t: t ** (2 * k)) - want).min() > 1e-3 * np.abs(want).max()


def test_density_integrates_to_one_with_mean_trace_over_n():
    d = np.linspace(-2.0, 5.0, 30) ** 3 / 20
    sd = spectral_density(np.diag(d), num_probes=4, num_steps=8, seed=5)
    grid = np.linspace(d.min() - 3, d.max() + 3, 20001)
    phi = sd.density(grid, width=0.2)
    assert phi.shape == grid.shape and (phi >= 0).all()
    np.testing.assert_allclose(np.trapezoid(phi, grid), 1.0, rtol=1e-10)
    # Rademacher on a diagonal: z^T D z = tr D, so the mean is tr(D)/n exactly (8 < 30 steps)
    np.testing.assert_allclose(np.trapezoid(grid * phi, grid), d.mean(), rtol=1e-9, atol=1e-12)
    # the kernel's width sets the variance: Var = (spread of the nodes) + width^2
    var = np.trapezoid((grid - d.mean()) ** 2 * phi, grid)
    var0 = np.trapezoid((grid - d.mean()) ** 2 * sd.density(grid, width=0.01), grid)
    np.testing.assert_allclose(var - var0, 0.2**2 - 0.01**2, rtol=1e-8)
    # ... and the nodes' spread is the matrix's second central moment (degree 2 < 2k: exact)
    np.testing.assert_allclose(var0 - 0.01**2, d.var(), rtol=1e-9)
    assert sd.density(np.zeros((2, 3)), width=0.5).shape == (2, 3)


@functools.cache
def _ggn() -> np.ndarray:
    return dense(*BY_NAME["mlp_tanh_mse"].build()).G.numpy()


def test_logdet_of_a_damped_ggn_matches_slogdet():
    """51 parameters, GGN of rank 15 (5 examples x 3 outputs): G + λI has 16 distinct
    eigenvalues up to rounding (its 36 zeros are 0 to 4e-16), so Lanczos stops after 16 or 17
    steps and every probe's rule is exact;
    what is left is Hutchinson's spread, whose exact standard deviation the dense matrix gives.
    Seeded: the five-sigma margin is deterministic, and it refuses the log det at 2λ (12 sigma
    off)."""
    lam, G = 1e-2, _ggn()
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    op = _Recording(G + lam * np.eye(G.shape[0]))  # the dense oracle, to read the probes
    m = 64
    sign, logdet = np.linalg.slogdet(G + lam * np.eye(G.shape[0]))
    assert sign == 1
    for A in (GGNLinearOperator(model, loss_fn, (x, y)).damped(lam), op):
        sd = spectral_density(A, num_probes=m, num_steps=30, seed=6, batch_size=16)
        assert sd.num_nodes.max() <= 17 and sd.num_matvecs == sd.num_nodes.sum()
        est = sd.trace(np.log)
        lam_all, Q = np.linalg.eigh(G + lam * np.eye(G.shape[0]))
        M = (Q * np.log(lam_all)) @ Q.T  # log(G + λI)
        sigma = np.sqrt(2 * (np.sum(M**2) - np.sum(np.diag(M) ** 2)) / m)
        assert abs(est.estimate - logdet) <= 5 * sigma  # 2.2 sigma off for this seed
        # the margin can fail: it refuses the log det at twice the damping
        assert abs(est.estimate - np.linalg.slogdet(G + 2 * lam * np.eye(51))[1]) > 5 * sigma
        assert 0.6 < est.std_error / sigma < 1.6  # the reported error is the real one
    # every probe's rule is z^T log(G + λI) z to rounding (exact, not statistical); the
    # recorded block is the first batch_size = 16 probes
    np.testing.assert_allclose(
        _per_probe(sd, np.log)[:16],
        _quadratic_forms(G + lam * np.eye(51), op.probes(), np.log),
        rtol=1e-9,
        atol=1e-9,
    )


def test_float32_operator_agrees_with_float64_to_float32_rounding():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build(dtype=torch.float32)
    sd32 = spectral_density(GGNLinearOperator(model, loss_fn, (x, y)).damped(1e-2), 8, 20, seed=7)
    sd64 = spectral_density(_ggn() + 1e-2 * np.eye(51), 8, 20, seed=7)
    assert sd32.nodes.dtype == np.float64
    np.testing.assert_allclose(
        sd32.trace(np.log).estimate, sd64.trace(np.log).estimate, rtol=1e-4
    )  # float32 products: smoke tolerance


def test_zero_and_scaled_identity_take_one_step():
    for c in (0.0, 2.5):
        sd = spectral_density(c * np.eye(6), num_probes=3, num_steps=5, seed=0)
        np.testing.assert_array_equal(sd.num_nodes, [1, 1, 1])
        np.testing.assert_allclose(sd.trace(lambda t: np.exp(t)).estimate, 6 * np.exp(c), **EXACT)
    one = spectral_density(np.array([[3.0]]), num_probes=2, num_steps=10, seed=0)
    np.testing.assert_allclose(one.trace(np.log).estimate, np.log(3.0), **EXACT)


def test_probes_that_break_down_at_different_steps_in_one_block():
    d = np.array([1.0, 2.0, 3.0, 4.0])
    V0 = np.stack([np.eye(4)[0], np.full(4, 0.5), np.array([0.0, 1.0, 1.0, 0.0]) / np.sqrt(2)], 1)
    alpha, beta, steps = _lanczos(_Recording(np.diag(d)), V0, 4, np.dtype(np.float64))
    np.testing.assert_array_equal(steps, [1, 4, 2])  # e_1 is an eigenvector; e_2 + e_3 spans 2
    np.testing.assert_allclose(alpha[0, 0], 1.0, **EXACT)
    np.testing.assert_allclose(
        np.sort(
            np.linalg.eigvalsh(
                np.diag(alpha[2, :2]) + np.diag(beta[2, :1], 1) + np.diag(beta[2, :1], -1)
            )
        ),
        [2.0, 3.0],
        **EXACT,
    )


def test_blocks_respect_batch_size_and_count_products():
    A = np.diag(np.arange(1.0, 21.0))
    op = _Recording(A)
    sd = spectral_density(op, num_probes=7, num_steps=6, seed=1, batch_size=3)
    assert max(b.shape[1] for b in op.blocks) <= 3
    assert sd.num_matvecs == sum(b.shape[1] for b in op.blocks) == 7 * 6
    again = spectral_density(A, num_probes=7, num_steps=6, seed=1, batch_size=3)
    np.testing.assert_array_equal(sd.nodes, again.nodes)  # the same seed, the same rules


# ------------------------------------------------------------------------------ bad input
def test_bad_arguments_are_refused_by_name():
    A = np.diag([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"`num_steps` must be an int >= 1, got 0"):
        spectral_density(A, num_steps=0)
    with pytest.raises(TypeError, match="`num_steps` must be an int"):
        spectral_density(A, num_steps=2.5)
    with pytest.raises(ValueError, match=r"`num_probes` must be an int >= 1, got 0"):
        spectral_density(A, num_probes=0)
    with pytest.raises(ValueError, match=r"Unknown `probes` 'normal'.*'rademacher', 'gaussian'"):
        spectral_density(A, probes="normal")
    with pytest.raises(ValueError, match="`batch_size`"):
        spectral_density(A, batch_size=0)
    with pytest.raises(ValueError, match="`seed`"):
        spectral_density(A, seed=-1)
    with pytest.raises(ValueError, match=r"`A` must be square"):
        spectral_density(np.ones((3, 2)))


@pytest.mark.parametrize("kind", ["numpy", "tensor", "sparse"])
def test_a_non_symmetric_matrix_is_refused(kind):
    A = np.diag([1.0, 2.0, 3.0])
    A[0, 2] = 0.5
    M = {"numpy": A, "tensor": torch.from_numpy(A), "sparse": scipy.sparse.csr_matrix(A)}[kind]
    with pytest.raises(
        ValueError, match=r"`A` must be symmetric.*\|A\[0, 2\] - A\[2, 0\]\| = 0\.5"
    ):
        spectral_density(M)
    # rounding-level asymmetry (a double-backward Hessian) passes
    B = np.diag([1.0, 2.0, 3.0])
    B[0, 2] = 1e-14
    spectral_density(B, num_probes=1, num_steps=3, seed=0)


def test_a_non_finite_product_is_refused():
    with pytest.raises(FloatingPointError, match="Lanczos step 3.*NaN or infinite"):
        spectral_density(_Recording(np.diag(np.arange(1.0, 9.0)), poison_at=3), 2, 6, seed=0)


def test_trace_and_density_refuse_bad_f_and_width():
    sd = spectral_density(np.diag([1.0, 2.0, 3.0]), num_probes=2, num_steps=3, seed=0)
    for width in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`width` must be in"):
            sd.density(np.linspace(0, 4, 5), width=width)
    with pytest.raises(ValueError, match="`grid` must be finite"):
        sd.density(np.array([0.0, np.nan]), width=0.1)
    with pytest.raises(ValueError, match=r"one value per node.*shape \(6,\).*shape \(\)"):
        sd.trace(lambda t: np.sum(t))
    with pytest.raises(ValueError, match=r"one value per node.*shape \(6,\).*shape \(6, 1\)"):
        sd.trace(lambda t: t[:, None])
    with pytest.raises(TypeError, match="real numbers, got dtype complex128"):
        sd.trace(lambda t: t + 1j)
    with pytest.raises(TypeError, match="vectorised callable"):
        sd.trace(3.0)
    # an in-place f does not change the rule
    before = sd.nodes.copy()
    sd.trace(lambda t: np.multiply(t, 2, out=t))
    np.testing.assert_array_equal(sd.nodes, before)


def test_a_non_symmetric_operator_is_refused_as_lanczos_runs():
    A = _random_symmetric(12, 8)
    A[0, 5] += 0.3  # one entry off: a product of the user's own with a bug
    with pytest.raises(ValueError, match=r"`A` is not symmetric: at Lanczos step 2.*differ by"):
        spectral_density(_Recording(A), num_probes=3, num_steps=6, seed=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_an_indefinite_hessian_operator_passes_the_symmetry_check(dtype):
    """A guard for the free check: a double-backward Hessian is symmetric only to rounding
    (float32 included), and its quadrature's first moment is tr H exactly (degree 1 < 2k)."""
    from hessfree.operators import HessianLinearOperator

    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build(dtype=dtype)
    H = dense(*BY_NAME["mlp_tanh_mse"].build()).H.numpy()
    assert np.linalg.eigvalsh(H)[0] < 0 < np.linalg.eigvalsh(H)[-1]  # indefinite
    op = HessianLinearOperator(model, loss_fn, (x, y))
    sd = spectral_density(op, num_probes=4, num_steps=51, seed=1)
    rec = _Recording(H)
    spectral_density(rec, num_probes=4, num_steps=1, seed=1)  # the same probes
    Z = rec.probes()
    rtol = 1e-10 if dtype == torch.float64 else 1e-4  # float32 products: smoke tolerance
    np.testing.assert_allclose(
        _per_probe(sd, lambda t: t), np.einsum("ij,ij->j", Z, H @ Z), rtol=rtol, atol=rtol
    )


# ------------------------------------------------------------------------------ bottom_eigenpairs
class _Counting(LinearOperator):
    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.dtype, op.shape)
        self.op, self.count = op, 0

    def _matvec(self, v):
        self.count += 1
        return self.op.matvec(v)

    def _matmat(self, X):
        self.count += X.shape[1]
        return self.op.matmat(X)


def _bce_ggn() -> tuple[LinearOperator, np.ndarray]:
    """49 parameters; its GGN's two smallest eigenvalues are 1e-6 of the largest apart from
    each other, and ARPACK spends its 10 n restarts (6,881 products) on the bottom one."""
    model, x, y, loss_fn = BY_NAME["mlp_sigmoid_bce_sum"].build()
    return GGNLinearOperator(model, loss_fn, (x, y)), dense(model, x, y, loss_fn).G.numpy()


@pytest.mark.parametrize("k", [1, 3])
def test_bottom_eigenpairs_of_a_clustered_ggn_answer_from_the_dense_matrix(k):
    """On main: ArpackNoConvergence after 10 n restarts (5,851-6,881 products)."""
    from hessfree.spectral import bottom_eigenpairs

    op, G = _bce_ggn()
    counted = _Counting(op)
    pairs = bottom_eigenpairs(counted, k=k)
    want = np.linalg.eigvalsh(G)[:k]
    scale = np.abs(np.linalg.eigvalsh(G)).max()
    np.testing.assert_allclose(pairs.values, want, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(G @ pairs.vectors, pairs.vectors * pairs.values, atol=1e-12 * scale)
    assert counted.count <= 2 * G.shape[0]  # n for ARPACK, n for A @ I


def test_bottom_eigenpairs_with_max_iter_is_arpack_alone():
    """A guard: an explicit ``max_iter`` keeps ARPACK's own outcome (no dense fallback)."""
    from scipy.sparse.linalg import ArpackNoConvergence

    from hessfree.spectral import bottom_eigenpairs

    op, _ = _bce_ggn()
    with pytest.raises(ArpackNoConvergence):
        bottom_eigenpairs(op, k=1, max_iter=20)
