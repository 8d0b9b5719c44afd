r"""The momentum form of a Hessian-free step (``HessianFree(momentum='quadratic')``).

Martens & Grosse (2015, K-FAC, §7) take as the update not the proposal :math:`\Delta` alone
but :math:`\delta = \alpha\Delta + \beta\delta_0`, with :math:`\delta_0` the previous step's
update and :math:`(\alpha, \beta)` minimising the damped quadratic model

.. math:: M(\delta) = g^\top\delta + \tfrac12\,\delta^\top B\,\delta, \qquad
   B = C + \kappa + \lambda,

over that plane: a 2x2 linear system. Here :math:`\Delta` is CG's backtracked iterate
:math:`p`, whose :math:`p^\top B p` CG already knows through
:math:`\phi(p) = g^\top p + \tfrac12 p^\top B p`, so the plane costs one curvature product,
:math:`u = B\delta_0`, made while CG's graphs are alive:

.. math::
   \begin{pmatrix} p^\top B p & u^\top p \\ u^\top p & \delta_0^\top u \end{pmatrix}
   \begin{pmatrix}\alpha \\ \beta\end{pmatrix}
   = -\begin{pmatrix} g^\top p \\ g^\top \delta_0 \end{pmatrix},
   \qquad M(\delta) = \tfrac12 (\alpha g^\top p + \beta g^\top \delta_0).

Notation as in :mod:`hessfree.optimizer`: :math:`g` the gradient (L2 term included),
:math:`C` the curvature, :math:`\kappa` the weight decay, :math:`\lambda` the damping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MOMENTUM_CHOICES", "PlaneStep", "plane_step"]

#: ``HessianFree``'s ``momentum`` values.
MOMENTUM_CHOICES = ("off", "quadratic")

# A 2x2 system whose determinant is below this fraction of a11 * a22 (p and δ0 nearly
# parallel in B's metric) is solved along p alone.
_SINGULAR = 1e-10


@dataclass(frozen=True)
class PlaneStep:
    """The model-optimal :math:`(\\alpha, \\beta)` and the damped model there."""

    alpha: float
    beta: float
    model: float  # M(alpha p + beta delta0), the damped model's change from 0


def plane_step(
    g: Tensor, p: Tensor, phi_p: float, delta: Tensor | None, u: Tensor | None
) -> PlaneStep | None:
    r""":math:`(\alpha, \beta)` minimising the damped model over :math:`\alpha p + \beta\delta_0`.

    Args:
        g: The gradient.
        p: The proposal (CG's backtracked iterate).
        phi_p: :math:`\phi(p) = g^\top p + \tfrac12 p^\top B p` (CG's value).
        delta: The previous update :math:`\delta_0`, or ``None`` (none yet: :math:`\beta = 0`).
        u: :math:`B\delta_0` (``None`` with ``delta``).

    Returns:
        The coefficients, or ``None`` where the model is not positive on the plane along
        :math:`p` (:math:`p^\top B p \le 0`) or a value is not finite. Where the plane is
        degenerate (:math:`\delta_0` parallel to :math:`p` in :math:`B`'s metric, or
        :math:`\delta_0^\top B\delta_0 \le 0`) :math:`\beta = 0` and :math:`\alpha` minimises
        along :math:`p` alone.

    Example:
        >>> B = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> g = torch.tensor([-2.0, -1.0], dtype=torch.float64)
        >>> p = torch.tensor([0.5, 0.0], dtype=torch.float64)
        >>> d0 = torch.tensor([0.0, 2.0], dtype=torch.float64)
        >>> s = plane_step(g, p, float(g @ p + 0.5 * p @ B @ p), d0, B @ d0)
        >>> (s.alpha, s.beta, s.model)  # the minimiser -B^{-1} g = (1, 1) = 2 p + 0.5 d0
        (2.0, 0.5, -1.5)
        >>> s = plane_step(g, p, float(g @ p + 0.5 * p @ B @ p), None, None)
        >>> (s.alpha, s.beta, s.model)  # along p alone
        (2.0, 0.0, -1.0)
    """
    if delta is None or u is None:
        gp, gd, up, du = float(g @ p), 0.0, 0.0, 0.0
    else:
        gp, gd, up, du = (float(v) for v in torch.stack([g @ p, g @ delta, u @ p, delta @ u]))
    a11 = 2.0 * (phi_p - gp)
    if not all(math.isfinite(v) for v in (gp, gd, up, du, a11)) or not a11 > 0.0:
        return None
    det = a11 * du - up * up
    if du > 0.0 and det > _SINGULAR * a11 * du:
        alpha = (-gp * du + gd * up) / det
        beta = (-gd * a11 + gp * up) / det
    else:
        alpha, beta = -gp / a11, 0.0
    return PlaneStep(alpha, beta, 0.5 * (alpha * gp + beta * gd))
