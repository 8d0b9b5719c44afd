r"""Spectral summaries of curvature from products alone: extreme eigenpairs, trace, diagonal.

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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
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
    A: object, k: int, which: str, tol: float, max_iter: int | None, seed: Seed
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
    if k == n:
        return _all_eigenpairs(op, which)
    # A seeded Gaussian start: reproducible, and almost surely not orthogonal to any eigenvector.
    v0 = _draw(_rng(seed), n, 1, np.result_type(op.dtype, np.float32), gaussian=True)[:, 0]
    checked = _FiniteProducts(op)
    try:
        values, vectors = eigsh(checked, k=int(k), which=which, v0=v0, tol=tol, maxiter=max_iter)
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
    M = np.asarray(op.matmat(np.eye(n, dtype=np.result_type(op.dtype, np.float32))))
    if not np.isfinite(M).all():
        raise FloatingPointError(
            "A product A @ v had a NaN or infinite entry, so A has no eigenpairs to find; "
            "check the model, data and damping for NaN/Inf."
        )
    values, vectors = np.linalg.eigh((M + M.conj().T) / 2)  # symmetric up to rounding
    order = np.argsort(values)
    order = order[::-1] if which == "LA" else order
    return Eigenpairs(values[order], vectors[:, order])


class _FiniteProducts(LinearOperator):
    """``op`` with each product checked for NaN/Inf (else ARPACK fails with error -9999),
    counting the products and whether any was nonzero (all zero: ARPACK's error -9)."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(op.dtype, op.shape)
        self._op, self.count, self.any_nonzero = op, 0, False

    def _matvec(self, v: np.ndarray) -> np.ndarray:
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
    A: object, k: int = 1, *, tol: float = 0.0, max_iter: int | None = None, seed: Seed = 0
) -> Eigenpairs:
    r"""The ``k`` largest (algebraic) eigenvalues of a symmetric ``A`` and their eigenvectors.

    Lanczos via :func:`scipy.sparse.linalg.eigsh` (``which='LA'``), started from a seeded
    Gaussian vector so the result is reproducible.

    Args:
        A: A symmetric ``LinearOperator``, a product with ``matvec`` and ``shape`` (e.g.
            :class:`~hessfree.HessianProduct`) or a dense matrix.
        k: How many eigenpairs, ``1 <= k <= n`` (``k = n``, the whole spectrum, from the
            ``n`` products ``A @ I`` and :func:`numpy.linalg.eigh`: ARPACK needs ``k < n``).
        tol: ARPACK's relative accuracy; ``0`` means machine precision of ``A``'s dtype.
        max_iter: ARPACK restarts allowed (``None``: SciPy's default, ``10 n``).
        seed: Seed for the start vector (int, numpy or torch generator).

    Returns:
        Eigenpairs: ``values`` in decreasing order, ``vectors`` ``(n, k)``.

    Raises:
        ValueError: If ``k`` is not in ``[1, n]``, ``A`` is not square, ``seed`` is a
            negative int, or every product of ``A`` is zero (almost surely the zero matrix).
        TypeError: For an ``A`` or ``seed`` of an unsupported type.
        scipy.sparse.linalg.ArpackNoConvergence: If ARPACK does not converge in ``max_iter``.
        FloatingPointError: If a product of ``A`` has a NaN or infinite entry.

    Example:
        >>> pairs = top_eigenpairs(np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]))
        >>> pairs.values.round(12), np.abs(pairs.vectors[:, 0]).round(6)
        (array([3.]), array([0.707107, 0.707107, 0.      ]))
    """
    return _extreme_eigenpairs(A, k, "LA", tol, max_iter, seed)


def bottom_eigenpairs(
    A: object, k: int = 1, *, tol: float = 0.0, max_iter: int | None = None, seed: Seed = 0
) -> Eigenpairs:
    r"""The ``k`` smallest (algebraic) eigenvalues of a symmetric ``A`` and their eigenvectors.

    As :func:`top_eigenpairs` with ``which='SA'``; the most negative eigenvalues of an
    indefinite Hessian, or the flattest directions of a Gauss-Newton matrix. Without
    shift-invert, Lanczos converges slowly when the bottom of the spectrum is clustered:
    raise ``max_iter`` or ``tol`` then.

    Returns:
        Eigenpairs: ``values`` in increasing order, ``vectors`` ``(n, k)``.

    Raises:
        ValueError, TypeError, ArpackNoConvergence: As :func:`top_eigenpairs`.

    Example:
        >>> bottom_eigenpairs(np.diag([-2.0, 0.5, 1.0, 3.0]), k=2).values
        array([-2. ,  0.5])
    """
    return _extreme_eigenpairs(A, k, "SA", tol, max_iter, seed)


# --------------------------------------------------------------------------------------------
# trace and diagonal
# --------------------------------------------------------------------------------------------
def hutchinson_trace(
    A: object, num_probes: int = 100, *, seed: Seed = None, batch_size: int = 32
) -> TraceEstimate:
    r"""Hutchinson's (1989) trace estimate :math:`\tfrac1m \sum_j z_j^\top A z_j`.

    Unbiased with Rademacher probes; the standard error shrinks as :math:`1/\sqrt m`. For a
    matrix with a few dominant eigenvalues prefer :func:`hutchpp_trace`.

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
    sketch is already exact) and giving the remainder to the probes is ours.

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
    :math:`i` has variance :math:`\sum_{k \ne i} A_{ik}^2 / m` (Bekas, Kokiopoulou & Saad 2007).

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
