r"""Spectral summaries of curvature from products alone: eigenpairs, traces, diagonal, density.

Notation: :math:`A \in \mathbb{R}^{n \times n}` a symmetric matrix seen only through products
:math:`v \mapsto Av` (a SciPy ``LinearOperator`` such as
:class:`~hessfree.HessianLinearOperator`, a product with ``matvec`` such as
:class:`~hessfree.GGNProduct`, or a dense matrix); :math:`z \in \{-1, +1\}^n` a Rademacher
probe (independent entries, :math:`\mathbb{E}[zz^\top] = I`);
:math:`m` the number of probes (or of products).

* **Extreme eigenpairs**: implicitly restarted Lanczos (ARPACK through
  :func:`scipy.sparse.linalg.eigsh`) for the largest or smallest algebraic eigenvalues.
* **Hutchinson (1989)**: :math:`\operatorname{tr} A = \mathbb{E}[z^\top A z]`, estimated by
  :math:`\tfrac1m \sum_j z_j^\top A z_j` with variance
  :math:`2\,(\|A\|_F^2 - \sum_i A_{ii}^2)/m`.
* **Hutch++** (Meyer, Musco, Musco & Woodruff 2021, Algorithm 1): spend a third of the
  products on a sketch :math:`Q = \operatorname{orth}(AS)` of the top of the spectrum, take its
  trace exactly and run Hutchinson only on the deflated rest:
  :math:`\operatorname{tr}(Q^\top A Q) + \tfrac1{m_G}\sum_j g_j^\top P_\perp A P_\perp g_j`
  with :math:`P_\perp = I - QQ^\top`.
  Relative error :math:`O(1/m)` instead of :math:`O(1/\sqrt m)` for PSD matrices; exact when
  :math:`\operatorname{rank} A` does not exceed the sketch size.
* **Diagonal** (Hutchinson-style, Bekas, Kokiopoulou & Saad 2007):
  :math:`\operatorname{diag} A \approx \tfrac1m \sum_j z_j \odot A z_j`, entry :math:`i` with
  variance :math:`\sum_{k \ne i} A_{ik}^2 / m`.
* **Stochastic Lanczos quadrature** (Ubaru, Chen & Saad 2017): :math:`k` Lanczos steps from
  each probe give a :math:`k`-point Gauss quadrature of :math:`z^\top f(A) z`, nodes the Ritz
  values :math:`\theta_i`, weights :math:`\|z\|^2 u_{1i}^2`; averaged over probes, an estimate
  of :math:`\operatorname{tr} f(A)` (:math:`\log\det(G + \lambda I)` with ``np.log``,
  :math:`\operatorname{tr} A^p`) and, smoothed by a Gaussian kernel, the spectral density
  (Ghorbani, Krishnan & Xiao 2019); optionally with the top eigenpairs deflated, or given
  ones from either end (taken exactly, the probes run on the rest), which removes their share
  of the probes' spread.

Probes go through ``matmat`` in blocks of ``batch_size`` columns, so the operators of
:mod:`hessfree.operators` evaluate them with batched autograd. Every random draw comes from
``seed``: an int, a ``numpy.random.Generator`` or a ``torch.Generator`` (``None``: fresh
entropy). Estimates carry a standard error (the sample standard deviation over probes divided
by :math:`\sqrt m`).

Example:
    >>> A = np.diag([1.0, 2.0, 3.0, 4.0])
    >>> top_eigenpairs(A, k=2).values
    array([4., 3.])
    >>> hutchinson_trace(A, num_probes=8, seed=0).estimate  # Rademacher: exact for a diagonal
    10.0

References:
    Hutchinson (1989), A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines, Communications in Statistics - Simulation and Computation.
    Meyer, Musco, Musco & Woodruff (2021), Hutch++: Optimal stochastic trace estimation,
    SOSA, Algorithm 1.
    Bekas, Kokiopoulou & Saad (2007), An estimator for the diagonal of a matrix, Applied
    Numerical Mathematics, §2.
    Chan, Golub & LeVeque (1983), Algorithms for computing the sample variance: analysis and
    recommendations, The American Statistician (the pairwise update, for the diagonal's
    standard error).
    Lehoucq, Sorensen & Yang (1998), ARPACK Users' Guide, SIAM.
    Ubaru, Chen & Saad (2017), Fast estimation of tr(f(A)) via stochastic Lanczos quadrature,
    SIAM J. Matrix Anal. Appl.
    Ghorbani, Krishnan & Xiao (2019), An investigation into neural net optimization via Hessian
    eigenvalue density, ICML.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse import issparse
from scipy.sparse.linalg import ArpackError, LinearOperator, aslinearoperator, eigsh
from torch import Tensor

from ._checks import check_int, check_number
from .operators import CurvatureLinearOperator

__all__ = [
    "Eigenpairs",
    "TraceEstimate",
    "DiagonalEstimate",
    "top_eigenpairs",
    "bottom_eigenpairs",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
    "SpectralDensity",
    "spectral_density",
]

Seed = int | np.random.Generator | torch.Generator | None


class Eigenpairs(NamedTuple):
    """Eigenvalues and the matching unit eigenvectors (column ``i`` pairs with ``values[i]``)."""

    values: np.ndarray  #: ``(k,)``, most extreme first
    vectors: np.ndarray  #: ``(n, k)``


class TraceEstimate(NamedTuple):
    """A stochastic trace estimate."""

    estimate: float
    std_error: float  #: sample standard deviation of the random part over its probes / sqrt(probes)
    num_matvecs: int  #: products with the matrix spent


class DiagonalEstimate(NamedTuple):
    """A stochastic estimate of the diagonal."""

    estimate: np.ndarray  #: ``(n,)``
    std_error: np.ndarray  #: ``(n,)``, per entry
    num_matvecs: int


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _as_operator(A: object) -> LinearOperator:
    """A square ``LinearOperator`` for ``A`` (operator, product with ``matvec``, or matrix)."""
    if isinstance(A, Tensor):
        A = A.detach().cpu()
        # numpy has no bfloat16: widen it (exactly) to float32, as numpy has no cheaper peer
        A = (A.float() if A.dtype == torch.bfloat16 else A).numpy()
    if isinstance(A, LinearOperator):
        op = A
    elif isinstance(A, np.ndarray) or issparse(A):
        op = aslinearoperator(A)
    elif callable(getattr(A, "matvec", None)) and hasattr(A, "shape"):
        op = CurvatureLinearOperator.from_product(A)
    else:
        raise TypeError(
            "`A` must be a scipy LinearOperator, a product with `matvec` and `shape` (e.g. "
            "hessfree.GGNProduct) or a matrix (numpy, scipy.sparse or a tensor), got "
            f"{type(A).__name__}."
        )
    if len(op.shape) != 2 or op.shape[0] != op.shape[1]:
        raise ValueError(f"`A` must be square, got shape {op.shape}.")
    return op


def _rng(seed: Seed) -> np.random.Generator | torch.Generator:
    if isinstance(seed, (np.random.Generator, torch.Generator)):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        # numpy's own refusal of a negative seed is "expected non-negative integer"
        return np.random.default_rng(check_int("seed", seed, low=0))
    raise TypeError(
        "`seed` must be an int, a numpy.random.Generator, a torch.Generator or None, got "
        f"{type(seed).__name__}."
    )


def _draw(
    rng: np.random.Generator | torch.Generator, n: int, k: int, dtype: Any, gaussian: bool = False
) -> np.ndarray:
    """``(n, k)`` Rademacher (or standard normal) columns, F-ordered so that ``matmat``
    hands contiguous rows to torch without a copy."""
    if isinstance(rng, torch.Generator):
        if gaussian:
            t = torch.randn(k, n, generator=rng, device=rng.device, dtype=torch.float64)
        else:
            t = torch.randint(0, 2, (k, n), generator=rng, device=rng.device).mul_(2).sub_(1)
        rows = t.cpu().numpy()
    else:
        rows = rng.standard_normal((k, n)) if gaussian else rng.integers(0, 2, (k, n)) * 2 - 1
    return rows.astype(dtype, copy=False).T


def _probe_dtype(A: LinearOperator) -> np.dtype:
    """The probes' dtype: ``A``'s, at least float32. A complex ``A`` is refused here, by name:
    the real quadratic forms' einsum would fail with numpy's cast error."""
    if np.issubdtype(A.dtype, np.complexfloating):
        raise TypeError(
            f"`A` is complex ({A.dtype}); the trace and diagonal estimators take a real matrix. "
            "Estimate the real and imaginary parts separately (for a Hermitian A, the trace "
            "is that of A.real)."
        )
    return np.result_type(A.dtype, np.float32)


def _blocks(total: int, size: int) -> Iterator[int]:
    """Block sizes summing to ``total``, each at most ``size``."""
    for start in range(0, total, size):
        yield min(size, total - start)


def _matmat(A: LinearOperator, X: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [A.matmat(X[:, i : i + batch_size]) for i in range(0, X.shape[1], batch_size)], axis=1
    )


def _quadratic_forms(Z: np.ndarray, AZ: np.ndarray) -> np.ndarray:
    """:math:`z_j^\\top A z_j` for the columns, accumulated in float64."""
    return np.einsum("ij,ij->j", Z, AZ, dtype=np.float64)


def _std_error(samples: np.ndarray) -> float:
    m = samples.shape[0]
    return float(samples.std(ddof=1) / math.sqrt(m)) if m > 1 else math.nan


def _check_counts(num: int, name: str, low: int, batch_size: int) -> tuple[int, int]:
    return check_int(name, num, low=low), check_int("batch_size", batch_size, low=1)


# --------------------------------------------------------------------------------------------
# eigenpairs
# --------------------------------------------------------------------------------------------
def _extreme_eigenpairs(
    A: object,
    k: int,
    which: str,
    tol: float,
    max_iter: int | None,
    seed: Seed,
    max_dense: int = 4096,
) -> Eigenpairs:
    op = _as_operator(A)
    n = op.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"`k` must be an int, got {type(k).__name__} {k!r}.")
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be in [1, {n}] for an operator of size {n}, got {k!r}.")
    tol = check_number("tol", tol, low=0.0)
    if max_iter is not None:
        max_iter = check_int("max_iter", max_iter, low=1)
    max_dense = check_int("max_dense", max_dense, low=0)
    _check_symmetric(A, "eigsh (Lanczos)")
    # ARPACK's Hermitian path for complex A is its general one, which needs k < n - 1 (SciPy
    # then tries a dense eig, which it refuses for a LinearOperator)
    if k == n or (np.iscomplexobj(np.empty(0, op.dtype)) and k >= n - 1):
        pairs = _all_eigenpairs(op, which)
        return Eigenpairs(pairs.values[:k], pairs.vectors[:, :k])
    # A seeded Gaussian start: reproducible, and almost surely not orthogonal to any eigenvector.
    v0 = _draw(_rng(seed), n, 1, np.result_type(op.dtype, np.float32), gaussian=True)[:, 0]
    # Clustered ends (a Gauss-Newton matrix's bottom: relative gaps ~1e-6) stall ARPACK for
    # all its 10 n restarts; by default it gets the n products A @ I would cost, and then the
    # dense path answers exactly, where that matrix is small (ours; experiments/README.md,
    # spectral17: 43 parameters, 7,332 products and no answer -> 86 products, exact).
    budget = n if max_iter is None and n <= max_dense else None
    checked = _FiniteProducts(op, budget)
    try:
        values, vectors = eigsh(checked, k=int(k), which=which, v0=v0, tol=tol, maxiter=max_iter)
    except _OverBudget:
        pairs = _all_eigenpairs(op, which)
        return Eigenpairs(pairs.values[:k], pairs.vectors[:, :k])
    except ArpackError as err:
        if checked.any_nonzero:
            raise
        raise ValueError(
            f"The {checked.count} product(s) of `A` ARPACK asked for (the first with the seeded "
            "Gaussian start vector) were exactly zero, so A is almost surely the zero matrix: "
            "all its eigenvalues are 0 and ARPACK stops (its error -9). A zero curvature matrix "
            "means the model's outputs or the loss do not vary with the parameters here (e.g. "
            "every ReLU dead); "
            "check hutchinson_trace(A) or A @ v for a few v before asking for eigenpairs."
        ) from err
    order = np.argsort(values)
    order = order[::-1] if which == "LA" else order
    return Eigenpairs(values[order], vectors[:, order])


def _all_eigenpairs(op: LinearOperator, which: str) -> Eigenpairs:
    """Every eigenpair of ``op``, from the ``n`` products ``op @ I`` and a dense ``eigh``.

    ARPACK needs ``k < n``, so the whole spectrum (any ``k`` of a 1x1 operator, a curvature
    over one parameter) was refused, with the range ``[1, 0]`` for ``n = 1``; ``n`` products
    are fewer than Lanczos would take for it, and the result is exact to rounding.
    """
    n = op.shape[0]
    I = np.eye(n, dtype=np.result_type(op.dtype, np.float32))
    M = np.asarray(_matmat(op, I, 32))  # 32 columns a call: batched products' memory
    if not np.isfinite(M).all():
        raise FloatingPointError(
            "A product A @ v had a NaN or infinite entry, so A has no eigenpairs to find; "
            "check the model, data and damping for NaN/Inf."
        )
    values, vectors = np.linalg.eigh((M + M.conj().T) / 2)  # symmetric up to rounding
    order = np.argsort(values)
    order = order[::-1] if which == "LA" else order
    return Eigenpairs(values[order], vectors[:, order])


# A @ I in float64: 128 MiB at 4096; eigh with vectors 6.7 s at n = 3,110 and 16 s at 4,096 on
# one loaded core, where ARPACK on a GGN's clustered bottom had no answer after 20 n products
# (62,200, 37 s; its default 10 n restarts are ~18 products each) (spectral18; was 2048).
# A count, not bytes against free memory (leftovers19): eigh's time grows as n^3 and its memory
# as n^2 (a peak of 4 n^2 float64s by tracemalloc at n = 1,024: I, A @ I, its symmetric part,
# the vectors), so time binds first (8,192: 2 GiB but ~8x the 16 s), and a limit read from free
# memory would send the same call down the dense path on one machine and ARPACK's on another.
# ``max_dense`` moves it.
_DENSE_FALLBACK_MAX_N = 4096


class _OverBudget(Exception):
    """ARPACK asked for more products than its budget (internal: caught, never raised out)."""


class _FiniteProducts(LinearOperator):
    """``op`` with each product checked for NaN/Inf (else ARPACK fails with error -9999),
    counting the products and whether any was nonzero (all zero: ARPACK's error -9); past
    ``budget`` products (``None``: no limit), :class:`_OverBudget` stops ARPACK."""

    def __init__(self, op: LinearOperator, budget: int | None = None) -> None:
        super().__init__(op.dtype, op.shape)
        self._op, self.count, self.any_nonzero, self.budget = op, 0, False, budget

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        if self.budget is not None and self.count >= self.budget:
            raise _OverBudget
        y = self._op.matvec(v)
        if not np.isfinite(y).all():
            raise FloatingPointError(
                "A product A @ v had a NaN or infinite entry, so A has no eigenpairs to find; "
                "check the model, data and damping for NaN/Inf."
            )
        self.count += 1
        self.any_nonzero = self.any_nonzero or bool(np.any(y))
        return y

    _rmatvec = _matvec


def top_eigenpairs(
    A: object,
    k: int = 1,
    *,
    tol: float = 0.0,
    max_iter: int | None = None,
    seed: Seed = 0,
    max_dense: int = _DENSE_FALLBACK_MAX_N,
) -> Eigenpairs:
    r"""The ``k`` largest (algebraic) eigenvalues of a symmetric ``A`` and their eigenvectors.

    Lanczos via :func:`scipy.sparse.linalg.eigsh` (``which='LA'``), started from a seeded
    Gaussian vector so the result is reproducible. By default (``max_iter=None``) an operator
    of :math:`n \le` ``max_dense`` (4096) gets ARPACK for the :math:`n` products that the
    dense ``A @ I`` costs; past them, the whole spectrum is taken from ``A @ I`` and
    :func:`numpy.linalg.eigh` (exact, at most :math:`2n` products in all). ARPACK can stall
    for all its :math:`10n` restarts on a clustered end, a Gauss-Newton matrix's bottom
    above all (:func:`bottom_eigenpairs`).

    Args:
        A: A symmetric ``LinearOperator``, a product with ``matvec`` and ``shape`` (e.g.
            :class:`~hessfree.HessianProduct`) or a dense matrix. A dense matrix is checked
            (:math:`\|A - A^\top\|_F \le \sqrt\epsilon \|A\|_F`; complex: Hermitian);
            an operator is trusted: ARPACK's Lanczos reads only its products, and a
            non-symmetric one gives wrong eigenpairs without a sign (the operators of
            :mod:`hessfree.operators` are symmetric by construction).
        k: How many eigenpairs, ``1 <= k <= n`` (``k = n``, the whole spectrum, from the
            ``n`` products ``A @ I`` and :func:`numpy.linalg.eigh`: ARPACK needs ``k < n``).
        tol: ARPACK's relative accuracy; ``0`` means machine precision of ``A``'s dtype.
        max_iter: ARPACK restarts allowed (``None``: SciPy's default, ``10 n``, and the dense
            path above for :math:`n \le` ``max_dense``; an int: ARPACK alone, as asked).
        seed: Seed for the start vector (int, numpy or torch generator).
        max_dense: The largest :math:`n` given the dense path (``0``: never). A count, not
            bytes: ``eigh``'s time grows as :math:`n^3` (16 s at 4,096 on one loaded core, so
            about 8x that at twice :math:`n`), its memory as :math:`n^2` (a peak of
            :math:`4n^2` float64s measured: 0.5 GiB at 4,096, 2 GiB at 8,192); raise it
            where both can be spent.

    Returns:
        Eigenpairs: ``values`` in decreasing order, ``vectors`` ``(n, k)``.

    Raises:
        ValueError: If ``k`` is not in ``[1, n]``, ``max_dense < 0``, ``A`` is not square, a
            dense ``A`` is not symmetric (naming the largest gap :math:`|A_{ij} - A_{ji}|`),
            ``seed`` is a negative int, or every product of ``A`` is zero (almost surely the
            zero matrix).
        TypeError: For an ``A`` or ``seed`` of an unsupported type.
        scipy.sparse.linalg.ArpackNoConvergence: If ARPACK does not converge in ``max_iter``.
        FloatingPointError: If a product of ``A`` has a NaN or infinite entry.

    Example:
        >>> pairs = top_eigenpairs(np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]))
        >>> pairs.values.round(12), np.abs(pairs.vectors[:, 0]).round(6)
        (array([3.]), array([0.707107, 0.707107, 0.      ]))
    """
    return _extreme_eigenpairs(A, k, "LA", tol, max_iter, seed, max_dense)


def bottom_eigenpairs(
    A: object,
    k: int = 1,
    *,
    tol: float = 0.0,
    max_iter: int | None = None,
    seed: Seed = 0,
    max_dense: int = _DENSE_FALLBACK_MAX_N,
) -> Eigenpairs:
    r"""The ``k`` smallest (algebraic) eigenvalues of a symmetric ``A`` and their eigenvectors.

    As :func:`top_eigenpairs` with ``which='SA'``; the most negative eigenvalues of an
    indefinite Hessian, or the flattest directions of a Gauss-Newton matrix. Lanczos converges
    at a rate set by the relative gap :math:`(\lambda_2 - \lambda_1)/(\lambda_n - \lambda_1)`,
    often :math:`10^{-6}` at a Gauss-Newton matrix's bottom: there ARPACK stalls, and neither
    ``tol``, ``max_iter`` nor a shift :math:`A + cI` helps (the Krylov spaces are the same).
    Up to :math:`n =` ``max_dense`` (4096) the default falls back to the dense ``A @ I``
    (:func:`top_eigenpairs`). Beyond, use shift-invert with a shift :math:`s` just below the
    bottom (for a PSD :math:`G`, :math:`s = -c` with :math:`c` about the size of the smallest
    eigenvalues) and MINRES for the inner solves (SciPy's default GMRES can stall)::

        solve = lambda b: scipy.sparse.linalg.minres(A, b, shift=s, rtol=1e-12)[0]
        inverse = scipy.sparse.linalg.LinearOperator(A.shape, matvec=solve, dtype=A.dtype)
        values = scipy.sparse.linalg.eigsh(A, k, sigma=s, OPinv=inverse)[0]

    On a 43-parameter Gauss-Newton matrix (smallest eigenvalues 4.5e-7, 1.9e-6; largest 1.5)
    where ARPACK stopped after 7,332 products, this took 2,696 products for
    :math:`s = -1.5 \cdot 10^{-6}` and 42,912 for :math:`s = -1.5 \cdot 10^{-3}` (1.9e-15 and
    2.0e-12 off :func:`numpy.linalg.eigvalsh`); the dense path 43 (experiments/README.md,
    spectral17). The shift must be known to about the gap :math:`\lambda_2 - \lambda_1`: on a
    3,110-parameter Gauss-Newton matrix (smallest 7.6e-7, 9.1e-7; largest 0.53) a shift from a
    short Lanczos run (its smallest Ritz value, 3.7e-5 after 50 steps, 4.1e-6 after 200) had
    no answer after 62,200 products, nor had ARPACK on :math:`\lambda_{\max} I - G`;
    ``scipy.sparse.linalg.lobpcg`` stopped after 4,006 products 40 % off :math:`\lambda_1`
    (experiments/README.md, spectral18).

    Returns:
        Eigenpairs: ``values`` in increasing order, ``vectors`` ``(n, k)``.

    Raises:
        ValueError, TypeError, ArpackNoConvergence: As :func:`top_eigenpairs`.

    Example:
        >>> bottom_eigenpairs(np.diag([-2.0, 0.5, 1.0, 3.0]), k=2).values
        array([-2. ,  0.5])
    """
    return _extreme_eigenpairs(A, k, "SA", tol, max_iter, seed, max_dense)


# --------------------------------------------------------------------------------------------
# trace and diagonal
# --------------------------------------------------------------------------------------------
def hutchinson_trace(
    A: object, num_probes: int = 100, *, seed: Seed = None, batch_size: int = 32
) -> TraceEstimate:
    r"""Hutchinson's (1989) trace estimate :math:`\tfrac1m \sum_j z_j^\top A z_j`.

    Unbiased with Rademacher probes; the standard error shrinks as :math:`1/\sqrt m`. For a
    matrix with a few dominant eigenvalues prefer :func:`hutchpp_trace`. ``A`` need not be
    symmetric: :math:`z^\top A z = z^\top S z` with :math:`S = (A + A^\top)/2`, which has
    the same trace, so the estimate is that of :math:`S` (and the variance above is
    :math:`S`'s).

    Args:
        A: A ``LinearOperator``, a product with ``matvec`` and ``shape``, or a dense matrix.
        num_probes: :math:`m`, the number of probes (one product each).
        seed: int, ``numpy.random.Generator``, ``torch.Generator`` or ``None``.
        batch_size: Probes per ``matmat`` call (bounds the memory of batched products).

    Returns:
        TraceEstimate: ``estimate``, ``std_error`` and ``num_matvecs`` (:math:`= m`).

    Raises:
        ValueError: If ``num_probes < 1``, ``batch_size < 1`` or ``seed`` is a negative int.
        TypeError: For an ``A`` or ``seed`` of an unsupported type, or a complex ``A``.

    Example:
        >>> A = np.array([[2.0, 1.0], [1.0, 3.0]])
        >>> est = hutchinson_trace(A, num_probes=1000, seed=0)  # z^T A z = 5 ± 2
        >>> abs(est.estimate - 5.0) < 4 * est.std_error, est.num_matvecs
        (True, 1000)
    """
    op = _as_operator(A)
    m, batch_size = _check_counts(num_probes, "num_probes", 1, batch_size)
    rng, n, dtype = _rng(seed), op.shape[0], _probe_dtype(op)
    quad = []
    for k in _blocks(m, batch_size):
        Z = _draw(rng, n, k, dtype)
        quad.append(_quadratic_forms(Z, op.matmat(Z)))
    samples = np.concatenate(quad)
    return TraceEstimate(float(samples.mean()), _std_error(samples), m)


def hutchpp_trace(
    A: object, num_matvecs: int = 99, *, seed: Seed = None, batch_size: int = 32
) -> TraceEstimate:
    r"""Hutch++ trace estimate (Meyer, Musco, Musco & Woodruff 2021, Algorithm 1).

    With :math:`s = \min(\lfloor m/3 \rfloor, n)` sketch columns :math:`S` and
    :math:`m_G = m - 2s` probes :math:`g_j` (all Rademacher):
    :math:`Q = \operatorname{orth}(AS)`, estimate
    :math:`\operatorname{tr}(Q^\top A Q) + \tfrac{1}{m_G}\sum_j g_j^\top P_\perp A P_\perp g_j`,
    :math:`P_\perp = I - QQ^\top`.
    The paper splits :math:`m` into equal thirds; capping :math:`s` at :math:`n` (where the
    sketch is already exact) and giving the remainder to the probes is ours. Unbiased for any
    square ``A`` (:math:`\operatorname{tr}(Q^\top A Q) + \operatorname{tr}(P_\perp A P_\perp)
    = \operatorname{tr} A`); the paper's error bound is for a PSD ``A``.

    Args:
        A: A ``LinearOperator``, a product with ``matvec`` and ``shape``, or a dense matrix.
        num_matvecs: :math:`m \ge 3`, the total number of products.
        seed: int, ``numpy.random.Generator``, ``torch.Generator`` or ``None``.
        batch_size: Columns per ``matmat`` call.

    Returns:
        TraceEstimate: ``estimate``; ``std_error`` of the deflated Hutchinson part (the
        sketched part is exact); ``num_matvecs`` (:math:`= m`).

    Raises:
        ValueError: If ``num_matvecs < 3``, ``batch_size < 1`` or ``seed`` is a negative int.
        TypeError: For an ``A`` or ``seed`` of an unsupported type, or a complex ``A``.

    Example:
        >>> A = np.outer([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])  # rank one, trace 30
        >>> round(hutchpp_trace(A, num_matvecs=6, seed=0).estimate, 10)
        30.0
    """
    op = _as_operator(A)
    m, batch_size = _check_counts(num_matvecs, "num_matvecs", 3, batch_size)
    rng, n, dtype = _rng(seed), op.shape[0], _probe_dtype(op)
    s = min(m // 3, n)
    Q, _ = np.linalg.qr(_matmat(op, _draw(rng, n, s, dtype), batch_size))  # (n, s), orthonormal
    top = float(_quadratic_forms(Q, _matmat(op, Q, batch_size)).sum())  # tr(QᵀAQ)
    G = _draw(rng, n, m - 2 * s, dtype)
    G = G - Q @ (Q.T @ G)  # (I − QQᵀ)g: A(I − QQᵀ)g then needs a single product
    samples = _quadratic_forms(G, _matmat(op, G, batch_size))
    return TraceEstimate(top + float(samples.mean()), _std_error(samples), m)


def hutchinson_diagonal(
    A: object, num_probes: int = 100, *, seed: Seed = None, batch_size: int = 32
) -> DiagonalEstimate:
    r"""Estimate the diagonal: :math:`\operatorname{diag} A \approx \tfrac1m \sum_j z_j \odot Az_j`.

    Unbiased: :math:`(z \odot Az)_i = A_{ii} + \sum_{k \ne i} A_{ik} z_i z_k`, so entry
    :math:`i` has variance :math:`\sum_{k \ne i} A_{ik}^2 / m` (Bekas, Kokiopoulou & Saad 2007);
    symmetry is not needed (row :math:`i` of a non-symmetric ``A`` gives entry :math:`i`'s).

    Args:
        A: A ``LinearOperator``, a product with ``matvec`` and ``shape``, or a dense matrix.
        num_probes: :math:`m \ge 1`.
        seed: int, ``numpy.random.Generator``, ``torch.Generator`` or ``None``.
        batch_size: Probes per ``matmat`` call.

    Returns:
        DiagonalEstimate: ``estimate`` and ``std_error`` (float64, ``(n,)``), ``num_matvecs``.

    Raises:
        ValueError: If ``num_probes < 1``, ``batch_size < 1`` or ``seed`` is a negative int.
        TypeError: For an ``A`` or ``seed`` of an unsupported type, or a complex ``A``.

    Example:
        >>> hutchinson_diagonal(np.diag([1.0, -2.0, 5.0]), num_probes=4, seed=0).estimate
        array([ 1., -2.,  5.])
    """
    op = _as_operator(A)
    m, batch_size = _check_counts(num_probes, "num_probes", 1, batch_size)
    rng, n, dtype = _rng(seed), op.shape[0], _probe_dtype(op)
    # The sum of squared deviations, merged block by block with a running mean (Chan, Golub &
    # LeVeque 1983): the one-pass sum of squares minus m·mean² cancels when an entry's spread
    # is below ~1e-8 of its size (a dominant diagonal): a standard error of 0 or 60x too big.
    total, running, m2, seen = np.zeros(n), np.zeros(n), np.zeros(n), 0
    for k in _blocks(m, batch_size):
        Z = _draw(rng, n, k, dtype)
        P = (Z * op.matmat(Z)).astype(np.float64, copy=False)  # column j: z_j ⊙ A z_j
        total += P.sum(axis=1)
        block_mean = P.mean(axis=1)
        D = P - block_mean[:, None]
        delta = block_mean - running
        m2 += np.einsum("ij,ij->i", D, D) + delta**2 * (seen * k / (seen + k))
        running += delta * (k / (seen + k))
        seen += k
    mean = total / m
    if m > 1:
        std_error = np.sqrt(m2 / (m - 1) / m)
    else:
        std_error = np.full(n, math.nan)
    return DiagonalEstimate(mean, std_error, m)


# --------------------------------------------------------------------------------------------
# spectral density and tr f(A): stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------------
class SpectralDensity(NamedTuple):
    r"""Gauss quadrature rules from stochastic Lanczos quadrature, one per probe.

    Probe :math:`j`'s rule has nodes :math:`\theta_{ji}` (the Ritz values of its Lanczos
    tridiagonal :math:`T_j`) and weights :math:`w_{ji} = \|z_j\|^2 u_{ji}^2` (:math:`u_{ji}` the
    first entry of the :math:`i`-th unit eigenvector of :math:`T_j`), so that
    :math:`\sum_i w_{ji} f(\theta_{ji}) \approx z_j^\top f(A) z_j`, exactly for every
    polynomial :math:`f` of degree below :math:`2 k_j` (:math:`k_j` the probe's Lanczos steps).
    Every probe has :math:`\|z_j\|^2 = n`, so each row of ``weights`` sums to :math:`n`.

    With ``num_deflated`` :math:`= d > 0` each row starts with the :math:`d` deflated
    eigenvalues (in decreasing order), weight 1 each (exact), followed by the rule of the
    probe's Lanczos on the deflated matrix, whose weights sum to :math:`n - d`: rows still
    sum to :math:`n`.
    """

    nodes: np.ndarray  #: ``(m, d + num_steps)`` float64; NaN after a probe's ``num_nodes[j]``
    weights: np.ndarray  #: ``(m, d + num_steps)`` float64; 0 after a probe's ``num_nodes[j]``
    num_nodes: np.ndarray  #: ``(m,)`` int: :math:`d` + Lanczos steps (fewer on early breakdown)
    num_matvecs: int  #: products with the matrix spent (ARPACK's for the deflation included)
    num_deflated: int = 0  #: :math:`d`, the eigenpairs taken exactly (first in each row)

    def _valid(self) -> np.ndarray:
        """``(m, num_steps)``: True where probe ``j`` has its ``i``-th node."""
        return np.arange(self.nodes.shape[1]) < np.asarray(self.num_nodes)[:, None]

    def trace(self, f: Callable[[np.ndarray], np.ndarray]) -> TraceEstimate:
        r"""Estimate :math:`\operatorname{tr} f(A) = \sum_i f(\lambda_i)` by the quadrature.

        The mean over probes of :math:`\sum_i w_{ji} f(\theta_{ji})`; ``std_error`` is the
        sample standard deviation of those per-probe values over :math:`\sqrt m` (the probes'
        spread, not the quadrature's error, which is zero for a polynomial of degree below
        :math:`2k` and otherwise shrinks with more Lanczos steps).

        Args:
            f: Vectorised and real: called once on a 1-D float64 array of every node, it must
                return an array of that shape (``np.log``, ``np.exp``,
                ``lambda t: t**2``). The nodes lie in :math:`[\lambda_{\min},
                \lambda_{\max}]`, so ``np.log`` needs a positive definite :math:`A` (damp a
                Gauss-Newton matrix: ``G.damped(lam)``).

        Returns:
            TraceEstimate: ``estimate``, ``std_error`` (NaN for one probe), ``num_matvecs``.

        Raises:
            ValueError: If ``f`` returns another shape.
            TypeError: If ``f`` is not callable or returns a non-real array.
        """
        if not callable(f):
            raise TypeError(f"`f` must be a vectorised callable, got {type(f).__name__}.")
        valid = self._valid()
        theta = self.nodes[valid]
        values = np.asarray(f(theta))  # theta is a copy (boolean indexing): f may write in it
        if values.shape != theta.shape:
            raise ValueError(
                f"`f` must return one value per node: called on shape {theta.shape}, it returned "
                f"shape {values.shape}; write it elementwise (np.log, lambda t: t**2), and for "
                "a scalar function use np.vectorize(f)."
            )
        if np.issubdtype(values.dtype, np.complexfloating):
            raise TypeError(
                f"`f` must return real numbers, got dtype {values.dtype}; tr f(A) of a "
                "symmetric A with a real f is real (take the real and imaginary parts apart)."
            )
        if not np.issubdtype(values.dtype, np.number):
            raise TypeError(f"`f` must return real numbers, got dtype {values.dtype}.")
        fw = np.zeros_like(self.weights)
        fw[valid] = self.weights[valid] * values.astype(np.float64, copy=False)
        samples = fw.sum(axis=1)
        return TraceEstimate(float(samples.mean()), _std_error(samples), self.num_matvecs)

    def density(self, grid: object, width: float) -> np.ndarray:
        r"""The spectral density smoothed by a Gaussian kernel, evaluated on ``grid``.

        :math:`\phi(t) = \tfrac{1}{nm} \sum_{j,i} w_{ji}\, g_\sigma(t - \theta_{ji})` with
        :math:`g_\sigma(s) = e^{-s^2/2\sigma^2} / (\sigma\sqrt{2\pi})`: a probability density
        over :math:`\mathbb{R}` (it integrates to 1, and its mean is the quadrature's estimate
        of :math:`\operatorname{tr}(A)/n`), the smoothed eigenvalue histogram of Lin, Saad &
        Yang (2016, §3). A ``grid`` that misses part of the spectrum (``nodes`` shows where
        it lies) integrates to less.

        Args:
            grid: Points :math:`t` (any shape, real).
            width: :math:`\sigma > 0`, the kernel's standard deviation; about the spacing
                of the grid or wider, or the curve shows single nodes as spikes.

        Returns:
            np.ndarray: :math:`\phi(t)`, float64, ``grid``'s shape.

        Raises:
            ValueError: If ``width`` is not a finite number > 0, or ``grid`` is not finite.
        """
        width = check_number("width", width, low=0.0, low_open=True)
        t = np.asarray(grid, dtype=np.float64)
        if not np.isfinite(t).all():
            raise ValueError("`grid` must be finite, got a NaN or infinite point.")
        valid = self._valid()
        theta, w = self.nodes[valid], self.weights[valid] / self.weights[valid].sum()
        w = w / (width * math.sqrt(2 * math.pi))
        shape, t = t.shape, t.ravel()
        phi = np.empty_like(t)
        rows = max(1, 2**22 // theta.size)  # grid points per chunk: ~32 MiB of kernel values
        for i in range(0, t.size, rows):
            s = (t[i : i + rows, None] - theta) / width
            phi[i : i + rows] = np.exp(-0.5 * s**2) @ w
        return phi.reshape(shape)


def spectral_density(
    A: object,
    num_probes: int = 10,
    num_steps: int = 30,
    *,
    probes: str | None = None,
    seed: Seed = None,
    batch_size: int = 32,
    num_deflated: int = 0,
    deflate: Eigenpairs | Sequence[Eigenpairs] | None = None,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature: the spectral density and :math:`\operatorname{tr} f(A)`.

    For each probe :math:`z_j` (:math:`\|z_j\|^2 = n`), :math:`k` steps of Lanczos from
    :math:`z_j / \|z_j\|` give a tridiagonal :math:`T_j = U_j \Theta_j U_j^\top`, and
    :math:`z_j^\top f(A) z_j \approx \|z_j\|^2 e_1^\top f(T_j) e_1
    = \sum_i \|z_j\|^2 (U_j)_{1i}^2 f(\theta_{ji})`, the :math:`k`-point Gauss quadrature of
    the probe's spectral measure (Golub & Meurant 2010, §6.2), exact for polynomials of degree
    below :math:`2k`. Averaged over probes (Hutchinson), it estimates
    :math:`\operatorname{tr} f(A) = \sum_i f(\lambda_i)` (Ubaru, Chen & Saad 2017), and the
    nodes and weights, smoothed, the density of the eigenvalues (Ghorbani, Krishnan & Xiao
    2019; Papyan 2019).

    Each Lanczos vector is reorthogonalised against all earlier ones of its probe (classical
    Gram-Schmidt, twice): stable for the few dozen steps such densities use, at
    :math:`O(k^2 n)` flops a probe and ``batch_size`` :math:`\cdot\, k \cdot n` float64s of
    memory per block of probes (no ghost copies of converged Ritz values, as plain Lanczos
    would give).
    A step whose new vector vanishes (:math:`\beta_j \le 100\,\epsilon \|T\|`, :math:`\epsilon`
    of ``A``'s dtype) has found an invariant subspace: that probe stops with fewer nodes and
    its rule is exact, e.g. after as many steps as ``A`` has distinct eigenvalues. At most
    :math:`n` steps are taken, so ``num_steps >= n`` makes every probe's rule exact.

    **Deflation** (``num_deflated`` :math:`= d > 0`): the top :math:`d` eigenpairs
    :math:`(\Lambda, V)` are computed first (:func:`top_eigenpairs`, ARPACK to machine
    precision) and their part of :math:`\operatorname{tr} f(A)` is taken exactly,
    :math:`\sum_{i \le d} f(\lambda_i)`; the probes run Lanczos on
    :math:`P A P`, :math:`P = I - VV^\top`, from :math:`P z_j`, which estimates
    :math:`\operatorname{tr}(P f(A) P)`, the rest (:math:`V` spans an invariant subspace, so
    :math:`f(A) = V f(\Lambda) V^\top + P f(A) P`). The spread over probes is then that of
    the complement alone: for :math:`\log\det(G + \lambda I)` of a Gauss-Newton matrix
    whose top eigenvalues stand far above :math:`\lambda`, those carry most of it
    (experiments/README.md, spectral18). ARPACK's products count in ``num_matvecs``; each
    Lanczos step costs :math:`O(dn)` flops more.

    ``deflate`` takes eigenpairs computed beforehand instead: the bottom end
    (:func:`bottom_eigenpairs`: an indefinite Hessian's negative outliers), both ends
    (``deflate=(top, bottom)``), or pairs computed once and reused over several densities
    or shifts (an eigenvector of :math:`G` is one of ``G.damped(lam)``). Only their vectors
    are used: each value is taken again as :math:`v_i^\top A v_i` of this ``A`` (:math:`d`
    products, in ``num_matvecs``), and a pair whose residual :math:`\|Av_i - (v_i^\top A
    v_i) v_i\|` exceeds :math:`\sqrt\epsilon\,\|A\|` (:math:`\|A\|` estimated by the
    largest magnitude among those values and the nodes) is refused: the rule is unbiased
    only where the vectors span an invariant subspace of ``A``.

    Args:
        A: A symmetric ``LinearOperator`` (e.g. :class:`~hessfree.GGNLinearOperator`,
            ``G.damped(lam)``), a product with ``matvec`` and ``shape``, or a dense matrix
            (checked symmetric; an operator is checked as Lanczos runs, at no extra product:
            :math:`v_l^\top A v_i` against :math:`v_i^\top A v_l`, which the recurrence knows).
        num_probes: :math:`m`, the number of probes.
        num_steps: :math:`k \ge 1`, Lanczos steps (products) per probe; capped at :math:`n`.
        probes: ``'rademacher'`` (entries :math:`\pm 1`, as the module's other estimators) or
            ``'gaussian'`` (a standard normal vector rescaled to norm :math:`\sqrt n`, i.e.
            uniform on that sphere; :math:`\mathbb{E}[zz^\top] = I` as well); ``None``:
            Rademacher, or Gaussian when deflating (the only kind that can be: :math:`Pg`
            normalised is uniform on the deflated sphere, weights :math:`(n - d) u_{1i}^2`).
        seed: int, ``numpy.random.Generator``, ``torch.Generator`` or ``None``.
        batch_size: Probes run together, one ``matmat`` of the block per Lanczos step; their
            bases take ``batch_size`` :math:`\cdot\, k \cdot n \cdot 8` bytes (2.4 GB for 10
            probes, 30 steps and a million parameters): lower it for a large model.
        num_deflated: :math:`d \ge 0`, the top (largest algebraic) eigenpairs to take out
            exactly, :math:`d < n`; Lanczos then takes at most :math:`n - d` steps.
        deflate: Eigenpairs of ``A`` to take out instead of ``num_deflated``'s: an
            :class:`Eigenpairs` (from :func:`top_eigenpairs` or :func:`bottom_eigenpairs`) or
            a sequence of them (joined; their vectors must be orthonormal together, so the
            two ends may not overlap), :math:`d < n` vectors in all.

    Returns:
        SpectralDensity: ``nodes``, ``weights`` and ``num_nodes`` per probe, ``num_matvecs``;
        ``.trace(f)`` and ``.density(grid, width)``.

    Raises:
        ValueError: If ``num_probes < 1``, ``num_steps < 1``, ``batch_size < 1``,
            ``num_deflated`` is not in :math:`[0, n - 1]`, ``deflate`` is given with
            ``num_deflated`` > 0, holds vectors of another length, :math:`n` or more of them,
            vectors that are not orthonormal or not finite, or pairs that are not ``A``'s
            (their residual, above), ``probes`` is unknown, ``seed`` is a negative int, ``A``
            is not square, or ``A`` is not symmetric (a dense one; an operator as soon as
            Lanczos shows it, to :math:`\sqrt\epsilon \|A\|`).
        TypeError: For an ``A`` or ``seed`` of an unsupported type, or a complex ``A``.
        FloatingPointError: If a product of ``A`` has a NaN or infinite entry.

    Example:
        >>> A = np.diag([1.0, 2.0, 2.0, 4.0])  # three distinct eigenvalues: three nodes suffice
        >>> sd = spectral_density(A, num_probes=2, num_steps=4, seed=0)
        >>> sd.num_nodes, round(sd.trace(np.log).estimate, 10), round(math.log(16.0), 10)
        (array([3, 3]), 2.7725887222, 2.7725887222)
        >>> grid = np.linspace(-1.0, 6.0, 701)
        >>> float(np.trapezoid(sd.density(grid, width=0.1), grid).round(8))
        1.0

    References:
        Ubaru, Chen & Saad (2017), Fast estimation of tr(f(A)) via stochastic Lanczos
        quadrature, SIAM J. Matrix Anal. Appl., §3 (Algorithm 1).
        Golub & Meurant (2010), Matrices, Moments and Quadrature with Applications, Princeton,
        §6.2 (Gauss quadrature from the Lanczos tridiagonal).
        Golub & Welsch (1969), Calculation of Gauss quadrature rules, Math. Comp.
        Giraud, Langou, Rozložník & van den Eshof (2005), Rounding error analysis of the
        classical Gram-Schmidt orthogonalization process, Numer. Math. (twice is enough).
        Lin, Saad & Yang (2016), Approximating spectral densities of large matrices, SIAM
        Review, §3 (the Gaussian-smoothed density).
        Ghorbani, Krishnan & Xiao (2019), An investigation into neural net optimization via
        Hessian eigenvalue density, ICML, §2.
        Papyan (2019), Measurements of three-level hierarchical structure in the outliers in
        the spectrum of deepnet Hessians, ICML.
    """
    m, batch_size = _check_counts(num_probes, "num_probes", 1, batch_size)
    k = check_int("num_steps", num_steps, low=1)
    if probes not in (None, "rademacher", "gaussian"):
        raise ValueError(
            f"Unknown `probes` {probes!r}; expected one of 'rademacher', 'gaussian' (or None)."
        )
    op = _as_operator(A)
    rng, n, dtype = _rng(seed), op.shape[0], _probe_dtype(op)
    d = check_int("num_deflated", num_deflated, low=0)
    given = None if deflate is None else _given_vectors(deflate, n, d, dtype)
    if given is not None:
        d = given.shape[1]
    if d >= n:
        raise ValueError(
            (
                f"`deflate` must hold at most {n - 1} eigenpairs of an operator of size {n}, "
                f"got {d!r}"
                if given is not None
                else f"`num_deflated` must be in [0, {n - 1}] for an operator of size {n}, "
                f"got {d!r}"
            )
            + f"; for the whole spectrum take top_eigenpairs(A, k={n}) (exact, {n} products)."
        )
    if d and probes == "rademacher":
        raise ValueError(
            "`probes='rademacher'` cannot be deflated without bias: P z / ||P z|| of a sign "
            "vector is not uniform on the deflated sphere, and P z unnormalised adds the spread "
            "of ||P z||^2 (times f near the bottom of the spectrum, e.g. log λ) to every "
            "estimate. Leave `probes` out (None: Gaussian when deflating) or pass 'gaussian'."
        )
    gaussian = probes == "gaussian" or (probes is None and d > 0)
    _check_symmetric(A, "Lanczos quadrature")
    spent, lanczos_op, norm_floor = 0, op, 0.0
    if given is not None:
        # this A's values of the given vectors (Rayleigh quotients) and their residuals
        AV = np.asarray(_matmat(op, given.astype(op.dtype, copy=False), batch_size))
        AV = AV.astype(np.float64, copy=False)
        if not np.isfinite(AV).all():
            raise FloatingPointError(
                "A product A @ v of a deflated vector had a NaN or infinite entry; check the "
                "model, data and damping for NaN/Inf."
            )
        values = np.einsum("ij,ij->j", given, AV)
        residuals = np.linalg.norm(AV - given * values, axis=0)
        order = np.argsort(values)[::-1]
        top = Eigenpairs(values[order], given[:, order])
        residuals = residuals[order]
        spent, lanczos_op = d, _Deflated(op, top.vectors)
        norm_floor = float(np.abs(top.values).max())
    elif d:
        counted = _Counted(op)
        top = _extreme_eigenpairs(counted, d, "LA", 0.0, None, rng)
        spent, lanczos_op = counted.count, _Deflated(op, top.vectors)
        # the rest's Lanczos breaks down at rounding of ||A||, not of the rest's own size
        # (with λI left, a step later it returned nodes at 1e-19 with weights 1e-32: log NaN)
        norm_floor = float(np.abs(top.values).max())
    k = min(k, n - d)  # Lanczos has found an invariant subspace by step n - d
    nodes, weights = np.full((m, d + k), np.nan), np.zeros((m, d + k))
    if d:
        nodes[:, :d], weights[:, :d] = top.values, 1.0  # exact: f(λ_i) once each
    num_nodes, start = np.full(m, d, dtype=np.int64), 0
    for b in _blocks(m, batch_size):
        Z = _draw(rng, n, b, np.float64, gaussian=gaussian)
        if d:
            Z -= top.vectors @ (top.vectors.T @ Z)  # P g: Gaussian on the range of P
        # a Rademacher z has ||z||^2 = n; P g / ||P g|| is uniform on the unit sphere of the
        # range of P (n - d dimensions), so (n - d) E[u u^T] = P: the rule below is unbiased
        # and a constant part of f on the rest of the spectrum has no spread at all
        V0 = Z / np.linalg.norm(Z, axis=0)
        project = None if not d else lanczos_op.project_rows
        alpha, beta, steps = _lanczos(lanczos_op, V0, k, dtype, norm_floor, project)
        for j in range(b):
            s = steps[j]
            # Golub & Welsch (1969): the Gauss rule of T is its eigenvalues and the squared
            # first components of its unit eigenvectors
            theta, U = eigh_tridiagonal(alpha[j, :s], beta[j, : s - 1])
            row = start + j
            nodes[row, d : d + s], weights[row, d : d + s] = theta, (n - d) * U[0] ** 2
            num_nodes[row] = d + s
        start += b
    if given is not None:
        _refuse_non_invariant(top, residuals, nodes, dtype)
    lanczos_steps = int(num_nodes.sum()) - m * d
    return SpectralDensity(nodes, weights, num_nodes, spent + lanczos_steps, d)


def _given_vectors(deflate: object, n: int, d: int, dtype: np.dtype) -> np.ndarray:
    """``spectral_density``'s ``deflate``: the vectors of the given eigenpairs as one float64
    ``(n, d)`` array with orthonormal columns, checked."""
    if d:
        raise ValueError(
            f"Pass `deflate` (eigenpairs computed beforehand) or `num_deflated` (the top "
            f"{d}, computed here), not both."
        )
    pairs = [deflate] if isinstance(deflate, Eigenpairs) else deflate
    if not isinstance(pairs, list | tuple) or not pairs:
        raise TypeError(
            "`deflate` must be an Eigenpairs (top_eigenpairs(A, k) or bottom_eigenpairs(A, k)) "
            f"or a non-empty list or tuple of them, got {type(deflate).__name__}."
        )
    blocks = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Eigenpairs):
            raise TypeError(
                f"`deflate[{i}]` must be an Eigenpairs (from top_eigenpairs or "
                f"bottom_eigenpairs), got {type(pair).__name__}."
            )
        V = np.asarray(pair.vectors)
        if V.ndim != 2 or V.shape[0] != n or V.shape[1] < 1:
            raise ValueError(
                f"`deflate`'s vectors must have shape ({n}, k >= 1) for an operator of size "
                f"{n}, got {V.shape}."
            )
        if np.iscomplexobj(V) or not np.issubdtype(V.dtype, np.number):
            raise TypeError(f"`deflate`'s vectors must be real, got dtype {V.dtype}.")
        blocks.append(V.astype(np.float64))
    V = np.hstack(blocks)
    if not np.isfinite(V).all():
        raise ValueError("`deflate`'s vectors have a NaN or infinite entry.")
    if V.shape[1] >= n:
        return V  # the caller's count check words it
    tol = math.sqrt(np.finfo(np.result_type(dtype, np.float32)).eps)
    gram = V.T @ V - np.eye(V.shape[1])
    worst = np.unravel_index(int(np.abs(gram).argmax()), gram.shape)
    if abs(gram[worst]) > tol:
        i, j = worst
        raise ValueError(
            f"`deflate`'s vectors must be orthonormal (to {tol:.1e}): v_{i}^T v_{j} "
            f"{'- 1 ' if i == j else ''}is {gram[worst]:.3g}. Is a pair given twice, or do "
            "the ends overlap (top and bottom eigenpairs sharing vectors)? Take fewer from "
            "each end."
        )
    return V


def _refuse_non_invariant(
    pairs: Eigenpairs, residuals: np.ndarray, nodes: np.ndarray, dtype: np.dtype
) -> None:
    r"""Refuse given eigenpairs whose residual is above :math:`\sqrt\epsilon\,\|A\|`."""
    finite = nodes[np.isfinite(nodes)]
    norm = max(float(np.abs(pairs.values).max()), float(np.abs(finite).max(initial=0.0)))
    tol = math.sqrt(np.finfo(np.result_type(dtype, np.float32)).eps) * norm
    worst = int(residuals.argmax())
    if residuals[worst] > tol:
        raise ValueError(
            f"`deflate` holds a vector that is not an eigenvector of `A`: "
            f"||A v - (v^T A v) v|| = {residuals[worst]:.3g} for v^T A v = "
            f"{pairs.values[worst]:.6g}, above {tol:.3g} (sqrt(eps) ||A||, ||A|| ~ {norm:.3g}). "
            "Deflation is exact only for eigenpairs of this A (an eigenvector of G is one of "
            "G.damped(lam), not of another model's or batch's matrix): compute them with "
            "top_eigenpairs(A, k) / bottom_eigenpairs(A, k)."
        )


class _Counted(LinearOperator):
    """``op``, counting the products (a block's columns count one each)."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.dtype, op.shape)
        self._op, self.count = op, 0

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        self.count += 1
        return self._op.matvec(x)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        self.count += X.shape[1]
        return self._op.matmat(X)

    _rmatvec = _matvec


class _Deflated(LinearOperator):
    r""":math:`P A P` with :math:`P = I - VV^\top` (``V``: orthonormal columns), in float64.

    Lanczos from :math:`Pz` stays in the range of :math:`P` in exact arithmetic when ``V``
    spans an invariant subspace; projecting on both sides keeps it there to rounding too
    (ARPACK's eigenvectors are invariant only to its tolerance).
    """

    def __init__(self, op: LinearOperator, V: np.ndarray) -> None:
        super().__init__(np.dtype(np.float64), op.shape)
        self._op, self._V = op, np.asarray(V, dtype=np.float64)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        V = self._V
        Y = np.asarray(self._op.matmat(X - V @ (V.T @ X)), dtype=np.float64)
        return Y - V @ (V.T @ Y)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(x.reshape(-1, 1)).ravel()

    def project_rows(self, W: np.ndarray) -> np.ndarray:
        """:math:`P` applied to each row of ``W`` ``(b, n)``."""
        return W - (W @ self._V) @ self._V.T


def _lanczos(
    op: LinearOperator,
    V0: np.ndarray,
    k: int,
    dtype: np.dtype,
    norm_floor: float = 0.0,
    project: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Lanczos on each unit column of ``V0`` ``(n, b)`` with full reorthogonalisation.

    ``norm_floor`` is a known lower bound on :math:`\|A\|` that the tridiagonal may never
    see: a deflated operator's products carry the rounding of the full :math:`A` (whose top
    was taken out), so breakdown is judged against it, not against the rest's own size.

    Returns the tridiagonals' diagonals ``alpha`` ``(b, k)``, off-diagonals ``beta`` ``(b, k)``
    (``beta[:, i]`` couples steps ``i`` and ``i + 1``) and the steps taken per column.
    """
    n, b = V0.shape
    V = np.zeros((b, k, n))  # V[j, i]: probe j's i-th Lanczos vector
    V[:, 0] = V0.T
    alpha, beta = np.zeros((b, k)), np.zeros((b, k))
    steps, scale = np.full(b, k), np.full(b, float(norm_floor))
    tiny, skew_tol = 100 * np.finfo(dtype).eps, math.sqrt(np.finfo(dtype).eps)
    active = np.arange(b)
    for i in range(k):
        # rows of V[active, i] are contiguous: .T hands torch an F-ordered (n, a) block
        AV = op.matmat(V[active, i].T.astype(dtype, copy=False))
        W = np.ascontiguousarray(np.asarray(AV).T, dtype=np.float64)  # row r: A v_i, probe r
        if not np.isfinite(W).all():
            raise FloatingPointError(
                f"A product A @ v (Lanczos step {i + 1}) had a NaN or infinite entry, so no "
                "quadrature of A exists; check the model, data and damping for NaN/Inf."
            )
        C = np.empty((active.size, i + 1))  # v_l^T A v_i for l <= i
        for r, j in enumerate(active):
            # w <- w - V (V^T w), twice: the three-term recurrence's α v_i + β v_{i-1} is part
            # of it, and the second pass restores orthogonality to rounding (Giraud et al.
            # 2005). One probe at a time: BLAS gemv on a view, 7x faster than a batched einsum
            Vj, w = V[j, : i + 1], W[r]
            C[r] = Vj @ w
            w -= C[r] @ Vj
            w -= (Vj @ w) @ Vj
        alpha[active, i] = C[:, i]
        if i > 0:
            _refuse_asymmetry(C, beta[active, i - 1], scale[active], i, skew_tol)
        if i == k - 1:
            break
        if project is not None:  # a deflated operator: keep the next vector off span V
            W = project(W)
        norms = np.linalg.norm(W, axis=1)
        # ‖T‖ ≥ a row's |α| + β's (Gershgorin's bound, from below); β under ~ε‖T‖ is rounding
        scale[active] = np.maximum(
            scale[active], np.abs(alpha[active, i]) + norms + beta[active, i - 1] * (i > 0)
        )
        done = norms <= tiny * scale[active]
        steps[active[done]] = i + 1
        go, W, norms = active[~done], W[~done], norms[~done]
        beta[go, i] = norms
        V[go, i + 1] = W / norms[:, None]
        active = go
        if active.size == 0:
            break
    return alpha, beta, steps


def _refuse_asymmetry(
    C: np.ndarray, beta_prev: np.ndarray, scale: np.ndarray, i: int, skew_tol: float
) -> None:
    r"""Refuse an operator that Lanczos shows is not symmetric, at no extra product.

    For a symmetric :math:`A`, :math:`v_l^\top A v_i = v_i^\top A v_l`, which the recurrence
    has already computed: :math:`\beta_{i-1}` for :math:`l = i - 1` and 0 for :math:`l < i - 1`.
    A gap over :math:`\sqrt\epsilon \|T\|` cannot be rounding (Lanczos itself would build
    :math:`T` from one triangle of a matrix that has two).
    """
    expected = np.zeros_like(C[:, :i])
    expected[:, i - 1] = beta_prev
    skew = np.abs(C[:, :i] - expected).max(axis=1)
    bad = np.flatnonzero(skew > skew_tol * scale)
    if bad.size:
        j = bad[0]
        raise ValueError(
            f"`A` is not symmetric: at Lanczos step {i + 1}, u^T (A v) and v^T (A u) for two "
            f"of its vectors differ by {skew[j]:.3g}, against a scale |A| >= {scale[j]:.3g}. "
            "Lanczos quadrature needs a symmetric matrix (the Hessian, GGN and Fisher operators "
            "are); check a product of your own against its transpose."
        )


def _check_symmetric(A: object, purpose: str) -> None:
    r"""Refuse a dense ``A`` (numpy, tensor, scipy.sparse) that is not symmetric (Hermitian).

    ARPACK's ``eigsh`` and Lanczos quadrature assume it and return plausible-looking wrong
    answers otherwise. The test is relative to the matrix's norm:
    :math:`\|A - A^H\|_F \le \sqrt\epsilon\, \|A\|_F` with :math:`\epsilon` of ``A``'s
    dtype (at least float32's). A Hessian or GGN formed by ``A @ I`` of a float32 operator is
    symmetric to 1e-7-4e-7 of its norm (451-1,994 parameters; experiments/README.md,
    spectral18), 1,000x inside float32's threshold of 3.5e-4; an entry off by 1 % of the
    norm is refused, naming the largest offending entry. An operator cannot be checked without
    extra products and is trusted (:func:`spectral_density` checks one as Lanczos runs).
    """
    if isinstance(A, Tensor):
        A = A.detach().cpu()
        A = (A.float() if A.dtype == torch.bfloat16 else A).numpy()
    if issparse(A):
        if A.ndim != 2 or A.shape[0] != A.shape[1] or not A.nnz:
            return  # _as_operator names the shape; no stored entry is the zero matrix
        A = A.astype(np.result_type(A.dtype, np.float32)).tocsr()  # no unsigned wrap-around
        A.sum_duplicates()
        D = abs(A - A.conj().T).tocoo()
        if not D.nnz:
            return
        i = int(np.argmax(D.data))
        where, diff = (int(D.row[i]), int(D.col[i])), float(D.data[i])
        gap = float(np.sqrt((D.data.astype(np.float64) ** 2).sum()))
        size = float(np.sqrt((np.abs(A.data).astype(np.float64) ** 2).sum()))
    elif isinstance(A, np.ndarray):
        numeric = np.issubdtype(A.dtype, np.number) or A.dtype == np.bool_
        if A.ndim != 2 or A.shape[0] != A.shape[1] or A.size == 0 or not numeric:
            return
        A = A.astype(np.result_type(A.dtype, np.float32), copy=False)  # no unsigned wrap-around
        n = A.shape[0]
        gap2, diff, where = 0.0, -1.0, (0, 0)
        rows = max(1, 2**22 // n)  # |A - A^H| by row blocks: ~32 MiB at a time, not n^2
        for i in range(0, n, rows):
            with np.errstate(invalid="ignore"):  # inf - inf: NaN passes, the products name it
                D = np.abs(A[i : i + rows] - A[:, i : i + rows].conj().T)
            gap2 += float(np.sum(np.square(D, dtype=np.float64)))
            r, c = divmod(int(np.argmax(D)), n)
            if D[r, c] > diff:
                diff, where = float(D[r, c]), (i + r, c)
        gap, size = math.sqrt(gap2), float(np.linalg.norm(A))
    else:
        return
    eps = np.finfo(np.result_type(A.dtype, np.float32)).eps
    if gap > math.sqrt(eps) * size:  # NaN passes: the products' own check names it
        i, j = where
        raise ValueError(
            f"`A` must be symmetric{' (Hermitian)' if np.iscomplexobj(A) else ''}: "
            f"||A - A^T||_F = {gap:.3g} against ||A||_F = {size:.3g} (allowed: "
            f"{math.sqrt(eps):.2g} of it, rounding in {np.dtype(A.dtype).name}); the largest "
            f"gap is at ({i}, {j}): |A[{i}, {j}] - A[{j}, {i}]| = {diff:.3g}. {purpose} needs a "
            "symmetric matrix; if the asymmetry is rounding, pass (A + A.T) / 2."
        )
