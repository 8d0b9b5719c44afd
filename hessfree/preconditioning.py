r"""Preconditioners for the CG inner loop: Martens' diagonal (2010, §4.7) and randomized Nyström.

Notation: :math:`g_i` the gradient of example :math:`i`'s loss, :math:`N` the number of examples,
:math:`\lambda` the damping and :math:`\kappa` the weight decay. Martens preconditions CG with

.. math:: M = \big[\mathrm{diag}\big(\textstyle\sum_i g_i \odot g_i\big) + \lambda I\big]^{\alpha},
          \qquad \alpha = 3/4,

the damped diagonal of the empirical Fisher raised to a power that hedges between no
preconditioning (:math:`\alpha = 0`) and the full diagonal (:math:`\alpha = 1`). We use the
empirical Fisher in the same normalisation as :class:`hessfree.FisherProduct`
(:math:`\tfrac1N\sum_i g_i g_i^\top` for a mean loss), so its diagonal is on the scale of the
curvature that :math:`\lambda` damps; the weight-decay term is added like in the reference code.

Per-example squared gradients without per-example backward passes: for Rademacher signs
:math:`z \in \{\pm1\}^N`, :math:`y = \sum_i z_i g_i` satisfies
:math:`\mathbb{E}[y \odot y] = \sum_i g_i \odot g_i` (the cross terms vanish in expectation).
Each probe is one backward pass; ``num_probes=None`` computes the exact sum with ``N`` batched
backward passes instead, which is only sensible for small batches.

**Randomized Nyström** (Frangella, Tropp & Udell 2023, §2 and Algorithm 2.1; the NysNewton-CG
of Rathore et al. 2024, §7): for a positive semi-definite curvature :math:`C` whose spectrum
decays fast (the Gauss-Newton matrix of a physics-informed loss is the typical case: a few
dozen eigenvalues span many decades), :math:`s` products with a random orthonormal test matrix
:math:`\Omega \in \mathbb{R}^{n\times s}` give the Nyström approximation
:math:`\hat C = (C\Omega)(\Omega^\top C\Omega)^{+}(C\Omega)^\top = U\hat\Lambda U^\top`
(stabilised by a shift :math:`\nu`, Tropp et al. 2017, Algorithm 3), and

.. math:: P^{-1} = (\hat\lambda_s + \mu)\,U(\hat\Lambda + \mu I)^{-1}U^\top + (I - UU^\top)

with :math:`\mu` the current damping. The preconditioned matrix :math:`P^{-1/2}(C+\mu I)
P^{-1/2}` has its top :math:`s` eigenvalues moved to about :math:`\hat\lambda_s+\mu` and the
rest left at most there, so its condition number is about :math:`(\lambda_{s}+\mu)/\mu`
instead of :math:`(\lambda_1+\mu)/\mu`. The sketch is refreshed every ``refresh`` steps;
in between only :math:`\mu` changes, which costs nothing.

References:
    Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.7.
    Hutchinson (1989), A stochastic estimator of the trace of the influence matrix.
    Tropp, Yurtsever, Udell & Cevher (2017), Fixed-rank approximation of a positive-semidefinite
    matrix from streaming data, NeurIPS, Algorithm 3.
    Frangella, Tropp & Udell (2023), Randomized Nyström preconditioning, SIAM J. Matrix Anal.
    Appl. 44(2), §2, Algorithm 2.1 and eq. (1.4).
    Rathore, Lei, Frangella, Lu & Udell (2024), Challenges in training PINNs: a loss landscape
    perspective, ICML, §7 (NysNewton-CG).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_int, check_number
from .curvature import JacobianProduct

__all__ = ["EmpiricalFisherDiagonal", "NystromPreconditioner", "PrecondContext", "nystrom_sketch"]


@dataclass(frozen=True)
class PrecondContext:
    """What a preconditioner may use at the current point.

    Attributes:
        jacobian: Products with the Jacobian of the model outputs (``None`` where there are no
            outputs, e.g. a closure that returns only the loss).
        output_grad: :math:`\\partial f/\\partial o`, shaped like the outputs (or ``None``).
        reduction: ``'mean'`` or ``'sum'``: how the loss combines the examples along dim 0.
        damping: The current :math:`\\lambda`.
        shift: The weight decay (a float, or a flat vector with one entry per parameter).
        generator: Random generator for probes, on the parameters' device.
        average: Averages a statistic over data-parallel ranks (identity on one process).
        curvature: Products :math:`V \\mapsto V C^\\top` with the undamped curvature :math:`C`
            (weight decay included, :math:`\\lambda` not), on a ``(k, n)`` batch of flat
            vectors, already averaged over ranks; ``None`` if not provided.
        gradient: The flat gradient :math:`g` (its size, dtype and device are the curvature's);
            ``None`` if not provided.
    """

    jacobian: JacobianProduct | None
    output_grad: Tensor | None
    reduction: str
    damping: float
    shift: float | Tensor
    generator: torch.Generator | None = None
    average: Callable[[Tensor], Tensor] = lambda t: t
    curvature: Callable[[Tensor], Tensor] | None = None
    gradient: Tensor | None = None


class EmpiricalFisherDiagonal:
    #: Needs one outputs tensor with examples along dim 0 (``(loss, outputs)`` closures).
    needs_outputs = True

    r"""Martens' preconditioner :math:`M = [\mathrm{diag}(F) + \lambda + \kappa]^\alpha`, diagonal.

    Args:
        exponent: :math:`\alpha`, in ``[0, 1]``; 3/4 in the paper.
        num_probes: Rademacher probes for the estimate of :math:`\mathrm{diag}(F)` (each one
            backward pass), or ``None`` for the exact value (``N`` batched backward passes).

    Raises:
        ValueError: If ``exponent`` is outside [0, 1] or ``num_probes < 1``.

    Example:
        >>> EmpiricalFisherDiagonal(exponent=0.75, num_probes=4)
        EmpiricalFisherDiagonal(exponent=0.75, num_probes=4)
    """

    def __init__(self, exponent: float = 0.75, num_probes: int | None = 4) -> None:
        self.exponent = check_number("exponent", exponent, low=0.0, high=1.0)
        self.num_probes = None if num_probes is None else check_int("num_probes", num_probes, low=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(exponent={self.exponent!r}, num_probes={self.num_probes!r})"

    def fisher_diagonal(self, ctx: PrecondContext) -> Tensor:
        r"""Estimate (or compute) :math:`\mathrm{diag}(F)` of the empirical Fisher."""
        G = ctx.output_grad
        n = G.shape[0] if G.dim() > 0 else 1
        scale = float(n) if ctx.reduction == "mean" else 1.0  # F = (1/c) Σ_i (J_iᵀ ĝ_i)(·)ᵀ
        if self.num_probes is None:
            # exact: one batched backward per example, ĝ_i placed at example i
            eye = torch.eye(n, dtype=G.dtype, device=G.device).view(n, n, *([1] * (G.dim() - 1)))
            rows = ctx.jacobian.vmp(eye * G)
            return rows.square().sum(0) * scale
        shape = (self.num_probes, n) + (1,) * (G.dim() - 1)
        signs = (
            torch.randint(0, 2, shape, generator=ctx.generator, device=G.device).to(G.dtype) * 2 - 1
        )
        rows = ctx.jacobian.vmp(signs * G)
        return rows.square().mean(0) * scale

    def __call__(self, ctx: PrecondContext) -> Tensor:
        """The diagonal of :math:`M`, for :func:`hessfree.cg`'s ``precond`` (``z = r / d``)."""
        d = ctx.average(self.fisher_diagonal(ctx)) + ctx.damping
        d = d + ctx.shift
        return d.pow_(self.exponent)


def nystrom_sketch(
    matmat: Callable[[Tensor], Tensor],
    n: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Randomized Nyström approximation :math:`U\hat\Lambda U^\top` of a PSD matrix.

    Tropp et al. (2017), Algorithm 3 (as Algorithm 2.1 of Frangella et al. 2023): an orthonormal
    Gaussian test matrix :math:`\Omega` (:math:`n\times s`, :math:`s` = ``rank``),
    :math:`Y = C\Omega`, a shift :math:`\nu = \epsilon\|Y\|_F` (:math:`\epsilon` the dtype's
    machine epsilon times :math:`\sqrt n`) for stability, :math:`Y_\nu = Y + \nu\Omega`,
    :math:`L L^\top = \Omega^\top Y_\nu`, :math:`B = Y_\nu L^{-\top} = U\Sigma V^\top` and
    :math:`\hat\Lambda = \max(\Sigma^2 - \nu, 0)`.

    Args:
        matmat: :math:`V \mapsto V C` for a ``(k, n)`` batch ``V`` (rows are vectors;
            :math:`C` symmetric positive semi-definite).
        n: The dimension.
        rank: :math:`s`, the sketch size, an int in ``[1, n]``.
        dtype: The dtype of the test matrix (the products' dtype).
        device: Its device.
        generator: Random generator for :math:`\Omega`.

    Returns:
        ``(U, lam)``: ``U`` is ``(n, s)`` with orthonormal columns, ``lam`` the ``s``
        eigenvalue estimates in decreasing order (>= 0).

    Raises:
        ValueError: If ``rank`` is not in ``[1, n]``.

    Example:
        >>> A = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
        >>> U, lam = nystrom_sketch(lambda V: V @ A, 3, 3)  # full rank: exact
        >>> torch.allclose(lam, torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
        True
    """
    rank = check_int("rank", rank, low=1, high=n)
    omega = torch.randn(n, rank, generator=generator, dtype=dtype, device=device)
    omega = torch.linalg.qr(omega).Q
    Y = matmat(omega.T).T  # (n, s)
    nu = math.sqrt(n) * torch.finfo(dtype).eps * float(torch.linalg.matrix_norm(Y))
    nu = max(nu, torch.finfo(dtype).tiny)
    Y = Y + nu * omega
    core = omega.T @ Y
    core = 0.5 * (core + core.T)
    L, info = torch.linalg.cholesky_ex(core)
    if int(info) != 0:  # not numerically PD (e.g. an indefinite C): fall back on an eig-shift
        w = torch.linalg.eigvalsh(core)
        L = torch.linalg.cholesky(
            core + (abs(float(w[0])) + nu) * torch.eye(rank, dtype=dtype, device=Y.device)
        )
    B = torch.linalg.solve_triangular(L, Y.T, upper=False).T  # Y L^{-T}
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (sigma.square() - nu).clamp_min(0.0)
    return U, lam


class NystromPreconditioner:
    r"""Randomized Nyström preconditioner of the damped curvature (Frangella et al. 2023).

    :math:`P^{-1}r = (\hat\lambda_s+\mu)\,U(\hat\Lambda+\mu I)^{-1}U^\top r + r - UU^\top r`
    with :math:`\mu` the current damping and :math:`U\hat\Lambda U^\top` a rank-``rank``
    Nyström sketch of the curvature (:func:`nystrom_sketch`; ``rank`` products, batched where the
    curvature allows), recomputed on the first call and then every ``refresh`` calls (one call
    per optimizer step). Meant for positive semi-definite curvature (Gauss-Newton, Fisher);
    it needs no per-example outputs, so it works with residual-block closures.

    Args:
        rank: Sketch size :math:`s`, an int >= 1 (capped at the number of parameters); 60-100
            in Rathore et al. (2024).
        refresh: Recompute the sketch every this many steps, an int >= 1.

    Raises:
        ValueError: If ``rank`` or ``refresh`` is below 1.

    Example:
        >>> NystromPreconditioner(rank=60, refresh=10)
        NystromPreconditioner(rank=60, refresh=10)
    """

    needs_outputs = False

    def __init__(self, rank: int = 60, refresh: int = 10) -> None:
        self.rank = check_int("rank", rank, low=1)
        self.refresh = check_int("refresh", refresh, low=1)
        self.U: Tensor | None = None
        self.eigenvalues: Tensor | None = None
        self._calls = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank!r}, refresh={self.refresh!r})"

    def update(self, ctx: PrecondContext) -> None:
        """Recompute the sketch from ``ctx.curvature``."""
        if ctx.curvature is None or ctx.gradient is None:
            raise ValueError(
                "NystromPreconditioner needs curvature products and the gradient "
                "(PrecondContext.curvature and .gradient); got None."
            )
        like = ctx.gradient
        n = like.numel()
        self.U, self.eigenvalues = nystrom_sketch(
            ctx.curvature,
            n,
            min(self.rank, n),
            dtype=like.dtype,
            device=like.device,
            generator=ctx.generator,
        )

    def __call__(self, ctx: PrecondContext) -> Callable[[Tensor], Tensor]:
        r""":math:`r \mapsto P^{-1}r` at the damping of ``ctx``, for :func:`hessfree.cg`."""
        n = -1 if ctx.gradient is None else ctx.gradient.numel()
        stale = self.U is None or self.U.shape[0] != n
        if stale or self._calls % self.refresh == 0:
            self.update(ctx)
            self._calls = 0
        self._calls += 1
        return self.apply_with(ctx.damping)

    def apply_with(self, mu: float) -> Callable[[Tensor], Tensor]:
        r""":math:`r \mapsto P^{-1}r` for damping :math:`\mu` with the current sketch."""
        if self.U is None or self.eigenvalues is None:
            raise RuntimeError("NystromPreconditioner: no sketch yet; call it with a context.")
        U, lam = self.U, self.eigenvalues
        scale = (lam[-1] + mu) / (lam + mu) - 1.0  # (λ̂_s + μ)/(λ̂_i + μ) − 1, one per column

        def apply(r: Tensor) -> Tensor:
            return r + U @ (scale * (U.T @ r))

        return apply
