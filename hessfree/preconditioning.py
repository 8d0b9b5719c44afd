r"""Diagonal preconditioner for the CG inner loop (Martens 2010, §4.7).

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

References:
    Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.7.
    Hutchinson (1989), A stochastic estimator of the trace of the influence matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_int, check_number
from .curvature import JacobianProduct

__all__ = ["EmpiricalFisherDiagonal", "PrecondContext"]


@dataclass(frozen=True)
class PrecondContext:
    """What a preconditioner may use at the current point.

    Attributes:
        jacobian: Products with the Jacobian of the model outputs.
        output_grad: :math:`\\partial f/\\partial o`, shaped like the outputs.
        reduction: ``'mean'`` or ``'sum'``: how the loss combines the examples along dim 0.
        damping: The current :math:`\\lambda`.
        shift: The weight decay (a float, or a flat vector with one entry per parameter).
        generator: Random generator for probes, on the parameters' device.
        average: Averages a statistic over data-parallel ranks (identity on one process).
    """

    jacobian: JacobianProduct
    output_grad: Tensor
    reduction: str
    damping: float
    shift: float | Tensor
    generator: torch.Generator | None = None
    average: Callable[[Tensor], Tensor] = lambda t: t


class EmpiricalFisherDiagonal:
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
