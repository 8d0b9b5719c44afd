r"""Levenberg-Marquardt adaptation of the Tikhonov damping :math:`\lambda` (Martens 2010, §4.1).

Notation: :math:`f` the objective, :math:`q_\theta(p) = f(\theta) + g^\top p + \tfrac12 p^\top C p`
its *undamped* quadratic model at :math:`\theta`, :math:`p` the (backtracked) step and

.. math:: \rho = \frac{f(\theta + p) - f(\theta)}{q_\theta(p) - q_\theta(0)}

the reduction ratio: how much of the predicted decrease was realised. Two rules adapt
:math:`\lambda` from it (:func:`update_damping`); a NaN ratio counts as a failure in both:

- ``'martens'`` (Martens 2010, §4.1): :math:`\lambda` shrinks by 2/3 when :math:`\rho > 3/4`,
  grows by 3/2 when :math:`\rho < 1/4`, else stays.
- ``'nielsen'`` (Nielsen 1999; Madsen, Nielsen & Tingleff 2004, §3.2), the default of
  :class:`~hessfree.HessianFree`: :math:`\lambda \leftarrow \lambda\max(1/3, 1 - (2\rho - 1)^3)`
  when :math:`\rho > 0`, else :math:`\lambda \leftarrow 2\lambda`. A smooth factor that is 1 at
  :math:`\rho = 1/2`, 2 as :math:`\rho \to 0` and 1/3 from :math:`\rho \approx 0.94`: a model
  that predicts the decrease well loses its damping three times as fast as under Martens' rule
  (Nielsen's :math:`\nu`, doubled after each consecutive failure, is fixed at 2 here; the
  optimizer grows :math:`\lambda` again on a rejected step). Measured in
  ``experiments/README.md``: the calibrated :math:`\lambda_0` is on the scale of the largest
  curvature along :math:`g`, and Martens' 2/3 per step took dozens of steps to come down.

The *initial* :math:`\lambda` is scale-dependent: multiplying the loss by :math:`s` multiplies
:math:`C` by :math:`s`, so a fixed number (the paper's 45, our former default 1) is right for one
loss scaling only. :func:`calibrate_damping` (ours, not the paper's) picks it from the curvature
along the gradient, the Rayleigh quotient :math:`g^\top C g / g^\top g`, which scales with the
loss and costs one curvature product at the first step. With structural damping (Martens &
Sutskever 2011, §3.3) :math:`\lambda` multiplies :math:`D = I + (\mu/N) J_h^\top J_h`, not
:math:`I`, and the quotient is taken against that metric, :math:`g^\top C g / g^\top D g`
(:class:`~hessfree.HessianFree` passes :math:`g^\top D g` as ``gg``): on RNN addition
:math:`g^\top D g` is 20-500 times :math:`g^\top g`, and against :math:`I` :math:`\lambda_0`
(66-117) sat 3 decades above where :math:`\lambda` settles (``experiments/README.md``, 2026-12-01).

What :math:`\lambda` multiplies is :math:`I` by default (Levenberg's damping, Martens 2010).
:math:`\lambda I` is not invariant under a rescaling of the parameters: one :math:`\lambda`
serves every coordinate, so where curvatures differ by decades it is set by the stiffest
ones and the others barely move (a curve fit with amplitudes ~1e3 and rates ~1e-2 stalled
for 400 steps, ``experiments/README.md``, "unseen3"). Marquardt's :math:`\lambda D` with
:math:`D` a diagonal that transforms as the curvature does (:func:`marquardt_metric`,
``damping_metric='marquardt'``) makes :math:`\lambda` a pure number (Moré 1978, §6).

At float precision's floor :math:`\rho` measures rounding, not the model: once both the actual
and the predicted change are within a few units of :math:`\epsilon|f(\theta)|` (:math:`\epsilon`
the machine epsilon of the loss's dtype), a step carries no information about :math:`C`
(:func:`below_resolution`), and :class:`~hessfree.HessianFree` leaves :math:`\lambda` alone
instead of reading :math:`\rho = -0` (a trial loss bit-identical to :math:`f(\theta)`) as a
failed model (unless :math:`\lambda` dominated the step, :math:`\lambda\|p\|^2 > p^\top C p`:
then it lowers :math:`\lambda`, since a step that short says nothing about the loss's floor).
Measured on a float32 regression at its floor (``experiments/README.md``, freeze):
λ had climbed from 1e-8 to its 1e10 cap, each step spending up to 61 closure calls.

References:
    Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.1.
    Marquardt (1963), An algorithm for least-squares estimation of nonlinear parameters,
    J. SIAM 11(2).
    Moré (1978), The Levenberg-Marquardt algorithm: implementation and theory, Numerical
    Analysis, Lecture Notes in Mathematics 630, §6 (scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_number

__all__ = [
    "AUTO_DAMPING_FACTOR",
    "DAMPING_METRICS",
    "DAMPING_RULES",
    "DampingPolicy",
    "LOW_PRECISION_ULPS",
    "RESOLUTION_ULPS",
    "below_resolution",
    "calibrate_damping",
    "marquardt_metric",
    "reduction_ratio",
    "resolution",
    "update_damping",
]

# λ0 = AUTO_DAMPING_FACTOR · gᵀCg / gᵀg. Ours, chosen on experiments/scorecard.py's tasks
# (see experiments/README.md): the LM rule then needs few steps to settle.
AUTO_DAMPING_FACTOR = 1.0

#: A change of the objective :math:`f` within ``RESOLUTION_ULPS`` :math:`\cdot\,\epsilon|f|` is
#: below its float resolution (:func:`below_resolution`). Ours: "a few ulps" (ε|f| is 1-2 ulps
#: of f), room for the rounding of a reduced loss and of f + the L2 term in double; for float32
#: and float64 losses (16-bit ones: :data:`LOW_PRECISION_ULPS`).
RESOLUTION_ULPS = 8.0

#: :data:`RESOLUTION_ULPS` for a loss in a 16-bit dtype (bfloat16, float16), whose reductions
#: accumulate in float32 and are rounded once to 16 bits. Ours: eight ulps of bfloat16 (ε =
#: 2^-7) are 6 % of f, and a bf16 tanh-MLP regression froze at loss 0.045 (2e-4 with 2 ulps,
#: both evaluated in float32) on a step that predicted a 3 % decrease; over 8 seeds the median
#: final loss was 6.9e-4 with 8 ulps and 2.8e-4 with 2, float16 7.1e-6 and 6.0e-6
#: (``experiments/README.md``, "16-bit losses at the float-resolution rule").
LOW_PRECISION_ULPS = 2.0
_FLOAT32_EPS = 2.0**-23

#: The rules :func:`update_damping` knows.
DAMPING_RULES = ("martens", "nielsen")

#: The metrics :math:`D` that :math:`\lambda` multiplies (``damping_metric``): ``'identity'``,
#: :math:`D = I` (Levenberg; Martens 2010), or ``'marquardt'``, Moré's running maximum of
#: :math:`\mathrm{diag}(G)` (:func:`marquardt_metric`).
DAMPING_METRICS = ("identity", "marquardt")


def reduction_ratio(actual: float, predicted: float) -> float:
    r"""The Levenberg-Marquardt ratio :math:`\rho` = actual / predicted change of the objective.

    Args:
        actual: :math:`f(\theta + p) - f(\theta)`; ``inf`` or NaN when the trial loss was
            not finite.
        predicted: :math:`q(p) - q(0)` of the undamped model (negative for a descent step).

    Returns:
        float: :math:`\rho`; ``-inf`` when the objective went up or was not finite (Martens'
        reference code), NaN when the model predicted no decrease.

    Example:
        >>> reduction_ratio(-0.9, -1.0)
        0.9
        >>> reduction_ratio(0.1, -1.0)
        -inf
    """
    _check_real("actual", actual)
    _check_real("predicted", predicted)
    if not math.isfinite(actual) or actual > 0:
        return -math.inf
    if not predicted < 0:
        return math.nan
    return actual / predicted


def resolution(f0: float, eps: float) -> float:
    r"""The float resolution :math:`\delta` of an objective value :math:`f_0` (ours): changes
    within it are rounding. :data:`RESOLUTION_ULPS` :math:`\cdot\,\epsilon|f_0|`, or
    :data:`LOW_PRECISION_ULPS` :math:`\cdot\,\epsilon|f_0|` for a 16-bit loss
    (:math:`\epsilon > 2^{-23}`).

    Example:
        >>> resolution(2.0, 2.0**-23) == 16 * 2.0**-23, resolution(2.0, 2.0**-7) == 4 * 2.0**-7
        (True, True)
    """
    ulps = RESOLUTION_ULPS if eps <= _FLOAT32_EPS else LOW_PRECISION_ULPS
    return ulps * eps * abs(f0)


def below_resolution(actual: float, predicted: float, f0: float, eps: float) -> bool:
    r"""Whether a step's actual and predicted changes are both below the float resolution of
    the objective (ours): :math:`|\Delta f| \le \delta` and :math:`|\Delta q| \le \delta` with
    :math:`\delta` = :func:`resolution` of :math:`f_0`.

    Such a step carries no information about the quadratic model: :math:`\rho` is a ratio of
    rounding errors (``-0.0`` when the trial loss is bit-identical to :math:`f_0`).

    Args:
        actual: :math:`f(\theta + p) - f(\theta)`.
        predicted: :math:`q(p) - q(0)` of the undamped model.
        f0: :math:`f(\theta)`.
        eps: Machine epsilon of the loss's dtype (``torch.finfo(loss.dtype).eps``).

    Returns:
        bool: True when both changes are within :math:`\delta` (NaN or infinite: False).

    Example:
        >>> eps = 2.0**-23  # float32
        >>> below_resolution(0.0, -1e-15, 2e-8, eps), below_resolution(0.0, -1e-12, 2e-8, eps)
        (True, False)
    """
    delta = resolution(f0, eps)
    return abs(actual) <= delta and abs(predicted) <= delta


def update_damping(
    damping: float,
    rho: float,
    *,
    rule: str = "martens",
    increase: float = 1.5,
    decrease: float = 2.0 / 3.0,
    min_damping: float = 0.0,
    max_damping: float = math.inf,
) -> float:
    r"""Return the next :math:`\lambda` from the reduction ratio :math:`\rho`.

    ``rule='martens'`` (§4.1): :math:`\rho < 1/4` or NaN: :math:`\lambda \leftarrow
    \text{increase}\cdot\lambda`; :math:`\rho > 3/4`: :math:`\lambda \leftarrow
    \text{decrease}\cdot\lambda`; otherwise unchanged.

    ``rule='nielsen'`` (Nielsen 1999): :math:`\rho > 0`: :math:`\lambda \leftarrow
    \lambda\max(1/3, 1 - (2\rho - 1)^3)`; :math:`\rho \le 0` or NaN: :math:`\lambda
    \leftarrow 2\lambda`. ``increase`` and ``decrease`` are not used.

    The result is clipped to ``[min_damping, max_damping]``. A NaN ``damping`` (the
    optimizer's ``damping='auto'`` before its calibration) is returned as NaN.

    Example:
        >>> update_damping(1.0, 0.9)
        0.6666666666666666
        >>> update_damping(1.0, float("nan"))
        1.5
        >>> update_damping(3.0, 1.0, rule="nielsen")
        1.0
        >>> update_damping(1.0, 0.5, rule="nielsen"), update_damping(1.0, -1.0, rule="nielsen")
        (1.0, 2.0)
        >>> update_damping(float("nan"), 0.9)
        nan
    """
    if not (isinstance(damping, float) and math.isnan(damping)):  # NaN: not calibrated yet
        check_number("damping", damping, low=0.0, high=math.inf)
    _check_real("rho", rho)
    check_number("increase", increase, low=1.0, high=math.inf)
    check_number("decrease", decrease, low=0.0, high=1.0, low_open=True)
    low = check_number("min_damping", min_damping, low=0.0, high=math.inf)
    check_number("max_damping", max_damping, low=low, high=math.inf)
    if rule == "nielsen":
        if math.isnan(rho) or rho <= 0:
            damping *= 2.0
        else:
            damping *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
    elif rule == "martens":
        if math.isnan(rho) or rho < 0.25:
            damping *= increase
        elif rho > 0.75:
            damping *= decrease
    else:
        raise ValueError(f"Unknown damping `rule` {rule!r}; expected one of {DAMPING_RULES}.")
    return min(max(damping, min_damping), max_damping)


def _check_real(name: str, value: object) -> None:
    """A real number, NaN and ±inf included (they carry meaning here)."""
    if not (isinstance(value, float) and math.isnan(value)):
        check_number(name, value, low=-math.inf, high=math.inf)


def calibrate_damping(
    gCg: float,
    gg: float,
    *,
    factor: float = AUTO_DAMPING_FACTOR,
    min_damping: float = 0.0,
    max_damping: float = math.inf,
    fallback: float = 1.0,
) -> float:
    r"""A scale-free initial :math:`\lambda` from the curvature along the gradient (ours).

    .. math:: \lambda_0 = \text{factor}\cdot\frac{|g^\top C g|}{g^\top g}

    The Rayleigh quotient is the curvature the first CG iteration sees (from :math:`x_0 = 0`,
    CG's first direction is :math:`-g`); it scales with the loss, so :math:`\lambda_0` does too
    and the first step is a Newton step damped to about half along :math:`g` whatever the
    loss scaling. The absolute value covers negative curvature along :math:`g` (Hessian mode).

    Args:
        gCg: :math:`g^\top C g` (undamped curvature, weight decay included).
        gg: :math:`g^\top D g` for the metric :math:`D` that :math:`\lambda` multiplies:
            :math:`g^\top g`, plus :math:`(\mu/N)\|J_h g\|^2` with structural damping.
        factor: Multiplier, > 0.
        min_damping: Lower clip.
        max_damping: Upper clip.
        fallback: Returned (clipped) when the quotient is zero or not finite.

    Returns:
        float: :math:`\lambda_0` in ``[min_damping, max_damping]``.

    Example:
        >>> calibrate_damping(8.0, 2.0)
        4.0
        >>> calibrate_damping(0.0, 2.0)  # no curvature along g: the fallback
        1.0
    """
    lam = factor * abs(gCg) / gg if gg > 0 else math.nan
    if not (math.isfinite(lam) and lam > 0):
        lam = fallback
    return min(max(lam, min_damping), max_damping)


def marquardt_metric(diagonal: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Marquardt's scale-invariant metric :math:`D` for the damping term :math:`\lambda D`.

    Moré (1978, §6) scales Levenberg-Marquardt by :math:`D_k^2` with
    :math:`D_k = \max(D_{k-1}, \mathrm{diag}(J^\top J)^{1/2})` elementwise: the running
    maximum, so that :math:`D` never shrinks. Here on :math:`\mathrm{diag}(G)` of the
    Gauss-Newton matrix directly (:math:`G = J^\top H_\ell J`, :math:`H_\ell = I` gives Moré's
    :math:`D^2`). Rescaling a parameter :math:`\theta_i \to s\,\theta_i` divides
    :math:`G_{ii}`, :math:`D_{ii}` and :math:`g_i^2` alike by :math:`s^2`, so the damped model
    :math:`g^\top p + \tfrac12 p^\top (G + \lambda D) p` and its minimiser are the same in
    the original coordinates: :math:`\lambda` becomes a pure number, independent of each
    parameter's units. Entries at most :math:`\epsilon\max_j D_{jj}` (:math:`\epsilon` the
    dtype's machine epsilon; a parameter the outputs do not depend on) are raised to it, and
    :math:`D = I` while the running maximum is all zero (ours: a zero entry would leave the
    damped system singular there). Non-finite entries of ``diagonal`` are the caller's to
    keep out of ``previous``.

    Args:
        diagonal: :math:`\mathrm{diag}(G)` at this step (negative estimates count as 0).
        previous: The running maximum so far, or ``None`` (first step, or another layout).

    Returns:
        tuple[Tensor, Tensor]: the floored metric :math:`D` (flat) and the new running maximum.

    Example:
        >>> D, top = marquardt_metric(torch.tensor([4.0, 0.0, 1.0]))
        >>> D[0].item(), D[2].item(), 0 < D[1].item() < 1e-5
        (4.0, 1.0, True)
        >>> marquardt_metric(torch.tensor([1.0, 1.0, 1.0]), top)[1]  # never shrinks
        tensor([4., 1., 1.])
    """
    diagonal = diagonal.clamp(min=0.0)
    if previous is not None and previous.shape == diagonal.shape:
        diagonal = torch.maximum(previous.to(diagonal), diagonal)
    top = diagonal.max()
    eps = torch.finfo(diagonal.dtype).eps
    D = torch.where(top > 0, diagonal.clamp(min=eps * top), torch.ones_like(diagonal))
    return D, diagonal


@dataclass(frozen=True)
class DampingPolicy:
    r"""Every change :class:`~hessfree.HessianFree` makes to :math:`\lambda`, with its bounds.

    Args:
        adapt: Apply the Levenberg-Marquardt rule (``adapt_damping``).
        rule: ``'martens'`` or ``'nielsen'`` (``damping_rule``; :func:`update_damping`).
            :class:`~hessfree.HessianFree` passes ``'nielsen'`` by default.
        increase: Factor > 1 for a poor step under ``'martens'`` (:math:`\rho < 1/4`), and
            under either rule for a rejected or non-finite step.
        decrease: Factor in (0, 1) for a good step (:math:`\rho > 3/4`) under ``'martens'``.
        min_damping: Lower bound.
        max_damping: Upper bound.

    Example:
        >>> policy = DampingPolicy(min_damping=1e-3, max_damping=10.0)
        >>> policy.after_step(1.0, rho=0.9), policy.after_rejection(9.0)
        (0.6666666666666666, 10.0)
        >>> DampingPolicy(rule="nielsen").after_step(3.0, rho=1.0)
        1.0
    """

    adapt: bool = True
    rule: str = "martens"
    increase: float = 1.5
    decrease: float = 2.0 / 3.0
    min_damping: float = 0.0
    max_damping: float = math.inf

    def clip(self, damping: float) -> float:
        """``damping`` clipped to ``[min_damping, max_damping]``."""
        return min(max(damping, self.min_damping), self.max_damping)

    def initial(self, gCg: float, gg: float) -> float:
        r""":math:`\lambda_0` for ``damping='auto'`` (:func:`calibrate_damping`), clipped."""
        return calibrate_damping(
            gCg, gg, min_damping=self.min_damping, max_damping=self.max_damping
        )

    def after_step(self, damping: float, rho: float) -> float:
        r""":math:`\lambda` after a step with reduction ratio ``rho`` (:func:`update_damping`)."""
        if not self.adapt:
            return damping
        return update_damping(
            damping,
            rho,
            rule=self.rule,
            increase=self.increase,
            decrease=self.decrease,
            min_damping=self.min_damping,
            max_damping=self.max_damping,
        )

    def after_rejection(self, damping: float) -> float:
        r""":math:`\lambda` after a rejected step (applied on top of :meth:`after_step`)."""
        return self.clip(damping * (self.increase if self.adapt else 1.0))

    def after_non_finite(self, damping: float) -> float:
        r""":math:`\lambda` after a non-finite value (grown even without ``adapt``)."""
        return self.clip(damping * self.increase)
