"""What one :meth:`hessfree.HessianFree.step` reports and what it carries between its phases.

:class:`StepStatus`, :class:`Convergence` and :class:`StepInfo` are public (re-exported by
:mod:`hessfree.optimizer` and :mod:`hessfree`); the rest is the step's own bookkeeping.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._flat import ParamLayout, dot
from ._rng import StepStream
from .cg import CGResult
from .curvature import StructurallyDampedGGN


class StepStatus(str, enum.Enum):
    """What one :meth:`HessianFree.step` did; each member equals its string value.

    ``StepStatus.CONVERGED == "converged"`` holds and ``str``/``format`` give the value, so
    code that compares ``StepInfo.status`` with strings keeps working.
    """

    #: The parameters moved by the accepted step.
    ACCEPTED = "accepted"
    #: ``torch.optim.LBFGS``'s tests: :math:`\max_i |g_i| \le` ``tolerance_grad`` at the start
    #: (returned after one closure call, nothing moved), or no progress: the accepted step
    #: changed the objective by less than ``tolerance_change`` or every parameter by at most
    #: ``tolerance_change`` (it was still applied), or a rejected step whose full length
    #: (× ``lr``) was at most ``tolerance_change`` in every parameter; or a step whose actual
    #: and predicted changes were below the objective's float resolution (not taken), or one
    #: at a point where the last line search failed inside the loss's measured rounding noise
    #: and the model offers no more than that noise (not taken).
    #: ``StepInfo.converged_by`` says which (a :class:`Convergence`).
    CONVERGED = "converged"
    #: No rate passed the line search, or the step was not a descent direction, or the step
    #: was below the objective's float resolution only because :math:`\lambda` dominated it
    #: (:math:`\lambda` is then lowered as after :math:`\rho = 1`); nothing moved.
    LINE_SEARCH_FAILED = "line_search_failed"
    #: Every group's ``lr`` is 0 (e.g. a scheduler's ``eta_min=0``); one closure call,
    #: nothing moved, :math:`\lambda` unchanged.
    ZERO_LR = "zero_lr"
    #: The closure's loss at the start was NaN or infinite.
    NON_FINITE_LOSS = "non_finite_loss"
    #: The gradient at the start had a NaN or infinite entry.
    NON_FINITE_GRADIENT = "non_finite_gradient"
    #: A curvature product (or the preconditioner) gave a NaN or infinite value inside CG.
    NON_FINITE_CURVATURE = "non_finite_curvature"
    #: No trial point was accepted and one of the trial losses (CG backtracking or line
    #: search) was NaN or infinite.
    NON_FINITE_TRIAL_LOSS = "non_finite_trial_loss"
    #: The first step under ``curvature='auto'`` with a ``(loss, outputs)`` closure: the
    #: exact Hessian had no positive curvature along the Gauss-Newton step CG found
    #: (:math:`x^\top H x \le 0 < x^\top G x`, a large-residual fit), so the step was not
    #: taken (parameters bit-identical, :math:`\lambda` unchanged) and, if the objective is
    #: then seen deterministic, the next step starts over from here with exact Hessian
    #: products; on mini-batches Gauss-Newton continues.
    GAUSS_NEWTON_WITHDRAWN = "gauss_newton_withdrawn"

    def __str__(self) -> str:
        return self.value


class Convergence(str, enum.Enum):
    """Which test made a step ``'converged'`` (``StepInfo.converged_by``); equals its string."""

    #: :math:`\max_i |g_i| \le` ``tolerance_grad`` at the start; nothing moved.
    TOLERANCE_GRAD = "tolerance_grad"
    #: The objective changed by less than ``tolerance_change``, or every parameter by at most
    #: that (an accepted step, applied), or a rejected step's full length was at most that.
    TOLERANCE_CHANGE = "tolerance_change"
    #: The backtracked step's actual and predicted changes of the objective were both below its
    #: float resolution (:func:`hessfree.damping.below_resolution`): the step was not taken and
    #: :math:`\lambda` is unchanged (a float32 loss at its floor; about two closure calls).
    FLOAT_RESOLUTION = "float_resolution"
    #: The last step's line search, on an objective seen deterministic, failed down to the
    #: rate whose first-order change is the float resolution :math:`\delta`, where the
    #: objective differed from the model by :math:`\sigma > 2\delta` (its rounding noise), and
    #: at the same point the model solved at :math:`\lambda`'s floor predicts no more than
    #: :math:`\sigma`: nothing moved, :math:`\lambda` is unchanged, and later steps at that
    #: point (same loss and gradient norm) stop after one closure call ("noise19").
    ROUNDING_NOISE = "rounding_noise"

    def __str__(self) -> str:
        return self.value


_NON_FINITE = frozenset(
    {
        StepStatus.NON_FINITE_LOSS,
        StepStatus.NON_FINITE_GRADIENT,
        StepStatus.NON_FINITE_CURVATURE,
        StepStatus.NON_FINITE_TRIAL_LOSS,
    }
)


#: The steps after which a :meth:`HessianFree.step` call with ``max_iter`` > 1 takes no further
#: step (LBFGS ends its call on its tolerances too).
_ENDS_A_CALL = (StepStatus.CONVERGED, StepStatus.ZERO_LR)


@dataclass(frozen=True)
class StepInfo:
    r"""Diagnostics of one :meth:`HessianFree.step`.

    Attributes:
        loss: Objective at the start (closure loss plus the L2 term).
        loss_after: Objective at the accepted point (``loss`` if nothing moved).
        accepted: Whether the parameters changed (an accepted step, or a ``'converged'`` one
            whose tiny step was still applied).
        status: A :class:`StepStatus`; compares equal to its string (``'accepted'``,
            ``'converged'``, ``'line_search_failed'``, ``'zero_lr'``, ``'non_finite_loss'``,
            ``'non_finite_gradient'``, ``'non_finite_curvature'``, ``'non_finite_trial_loss'``).
        rho: Reduction ratio :math:`\rho` of the step as taken: :math:`(f(\theta + tp) -
            f(\theta)) / (q(tp) - q(0))` at the accepted rate :math:`t` (``step_rate``, as
            ``loss_after``), so an accepted step whose full length raised the objective reports
            the ratio at the rate the line search accepted; on a rejected step the full step's
            (``rho_full``). NaN if not computed or the model predicted no decrease; ``-inf``
            when the objective went up or was not finite.
        rho_full: :math:`\rho` of the backtracked step at its full length (rate 1, before the
            line search), the one the Levenberg-Marquardt update of :math:`\lambda` reads:
            ``-inf`` (Martens' reference code) when that full step increased the objective or
            gave a non-finite value, even if the line search then accepted a smaller rate
            (``adapt_damping`` raised :math:`\lambda`); equal to ``rho`` when ``step_rate`` is
            0 or 1.
        damping: :math:`\lambda` used in this step's CG.
        next_damping: :math:`\lambda` after the Levenberg-Marquardt update.
        damping_floor: The lower bound on :math:`\lambda` in effect this step: ``min_damping``,
            or ``relative_min_damping`` times the curvature scale if that is larger.
        predicted_change: :math:`q(p) - q(0)` of the undamped model for the backtracked step
            (:math:`\rho`'s denominator; NaN if not computed).
        converged_by: For a ``'converged'`` step, which test (a :class:`Convergence`:
            ``'tolerance_grad'``, ``'tolerance_change'``, ``'float_resolution'``,
            ``'rounding_noise'``), else None.
        cg_iters: CG iterations; ``cg_reason`` why CG stopped (a :class:`hessfree.CGStop`
            value; ``'monitor'``: the objective rose at a stored iterate,
            ``cg_stop_on_increase``); ``cg_matvecs`` products; ``cg_rtol`` the relative
            residual tolerance :math:`\eta` CG ran with (NaN if it did not run).
        precond_matvecs: Curvature products the preconditioner spent this step (a
            :class:`NystromPreconditioner`'s sketch: ``rank`` on the steps that refresh it).
        backtrack_iter: CG iteration of the chosen (backtracked) iterate.
        step_rate: Accepted rate (0 if rejected): the Armijo rate, or a power of 2 above 1
            when ``extrapolate`` doubled the full step.
        grad_norm: :math:`\|g\|`.
        closure_calls: Closure evaluations in this step (curvature closure included).
        time_products: Seconds spent in curvature products (on CUDA: launch time, async).
        time_total: Seconds for the whole step.
        time_phases: Seconds per phase of the step, for profiling: ``'evaluate'`` (the first
            closure call and the objective), ``'curvature'`` (gradient, curvature closure,
            product set-up, ``damping='auto'``'s calibration, preconditioner), ``'solve'``
            (CG), ``'backtrack'`` and ``'line_search'`` (with the parameter update); phases the
            step did not reach are absent. Host time (on CUDA: launch time, async).
    """

    loss: float
    loss_after: float
    accepted: bool
    status: StepStatus
    rho: float = math.nan
    rho_full: float = math.nan
    damping: float = math.nan
    next_damping: float = math.nan
    damping_floor: float = math.nan
    predicted_change: float = math.nan
    converged_by: Convergence | None = None
    cg_iters: int = 0
    cg_reason: str = ""
    cg_matvecs: int = 0
    precond_matvecs: int = 0
    cg_rtol: float = math.nan
    backtrack_iter: int = 0
    step_rate: float = 0.0
    grad_norm: float = math.nan
    closure_calls: int = 0
    time_products: float = 0.0
    time_total: float = 0.0
    time_phases: Mapping[str, float] = field(default_factory=dict)


@dataclass
class _Evaluation:
    """The closure's result at the current point, with whatever graph it carries."""

    loss: Tensor
    outputs: Tensor | None
    grads: list[Tensor | None] | None  # set when the closure itself called backward()
    hidden: Tensor | None = None  # for structural damping


@dataclass
class _Counter:
    calls: int = 0
    product_time: float = 0.0
    # replay_rng: every closure call of the step draws the first call's random numbers
    stream: StepStream | None = None
    # (buffer, copy): what the step's graph-building call wrote, as before it (a step that
    # raises puts them back; _closure._buffers_saved)
    buffers: list[tuple[Tensor, Tensor, int | None]] = field(default_factory=list)  # version
    writes_buffers: bool = False  # ... among them buffers other than BatchNorm's statistics
    # (module, name, before, now): buffers that call rebound to a new tensor (self.avg = ...)
    rebound: list[tuple[torch.nn.Module, str, Tensor, Tensor]] = field(default_factory=list)


@dataclass
class _StepRun:
    """What one step carries from phase to phase (no autograd graph) and reports at its end."""

    state: dict  # the optimizer's global state (λ, step count, failures, warm start)
    params: list[Tensor]
    layout: ParamLayout
    l2: float | Tensor  # κ, a float or per entry
    lr: float | Tensor
    damping: float  # λ of this step's CG (NaN until damping='auto' is calibrated)
    counter: _Counter = field(default_factory=_Counter)
    t_start: float = field(default_factory=time.perf_counter)
    t_lap: float = field(init=False)
    times: dict[str, float] = field(default_factory=dict)  # StepInfo.time_phases
    loss0: Tensor | None = None  # the closure's loss at θ0, returned by step()
    f0: float = math.nan  # the objective at θ0 (L2 term included)
    f_base: float = math.nan  # f(θ0) as the trials see it: f0, or under replay_rng's trial draw
    uses_backward: bool = False  # the closure calls backward() itself (LBFGS style)
    report: dict = field(default_factory=dict)  # StepInfo fields known so far
    bounded: bool = False  # CG's step was bounded by the trust radius (trust_radius)
    semidefinite: bool = False  # the curvature is positive semidefinite (Gauss-Newton, Fisher)
    loss_probe: Tensor | tuple[Tensor, ...] | None = None  # H_ℓu, fixed u (_loss_quadratic)
    trials: dict[int, float] = field(default_factory=dict)  # f at CG iterates, by iteration
    structural_damping: float = 0.0  # μ in effect (structural_damping='auto' resolved)
    damped_change: float = math.nan  # ½λpᵀDp (+ structural energy) at the chosen iterate
    metric: Tensor | None = None  # damping_metric='marquardt': D, flat (None: D = I)
    at_chosen: _AtChosen | None = None  # phases 4-5's scalars at the chosen iterate (one read)
    at_last: _AtChosen | None = None  # the same at CG's last iterate, if _floor_check read them
    scaled_grad_norm: float = math.nan  # damping_metric='marquardt': ‖D^{-1/2} g‖
    mask_noise: float = math.nan  # replay_rng: RMS of f(θ0; m1) − f(θ0; m2) over recent steps

    def __post_init__(self) -> None:
        self.t_lap = self.t_start

    def lap(self, phase: str) -> None:
        """Add the time since the previous lap to ``phase``."""
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self.t_lap
        self.t_lap = now


@dataclass
class _Solution:
    """CG's answer: what phases 3-5 need; detached from every graph but ``structural``'s."""

    g: Tensor  # the gradient (L2 term included)
    result: CGResult
    # Structural damping's product, its curvature graph kept until phase 4 takes the energy of
    # the one iterate backtracking chose (then dropped); None without structural damping.
    structural: StructurallyDampedGGN | None = None


@dataclass(frozen=True)
class _AtChosen:
    """Phases 4-5's scalars at the chosen iterate :math:`p`, read to the host together."""

    phi: float  # CG's φ(p), damped model
    pDp: float  # pᵀDp (D = I, or the Marquardt metric)
    slope: float  # gᵀp
    full_change: float  # max |lr · p|: LBFGS' tolerance_change test on a parameter

    @classmethod
    def read(cls, g: Tensor, result: CGResult, chosen: int, run: _StepRun) -> _AtChosen:
        """One host read (each is a device sync) instead of one per scalar. Each value is
        widened to float64 before the stack, exactly, so it equals its own ``float()``."""
        p = result.iterates[chosen]
        pDp = dot(p, p) if run.metric is None else dot(p * run.metric, p)
        values = [result.iterate_phi[chosen], pDp, dot(g, p), (p.abs() * run.lr).max()]
        return cls(*torch.stack([v.to(torch.float64) for v in values]).tolist())
