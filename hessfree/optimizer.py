r"""Martens-style Hessian-free optimization as a ``torch.optim.Optimizer``.

Notation: :math:`\theta` the parameters (all param groups together), :math:`f` the objective on
the gradient batch including the L2 term :math:`\tfrac12\sum_k\kappa_k\|\theta_k\|^2` of each
group's ``weight_decay`` :math:`\kappa_k`, :math:`g = \nabla f`, :math:`C` the curvature
(Gauss-Newton by default, plus :math:`\kappa`) on the curvature batch, :math:`B = C + \lambda I`
the damped curvature, :math:`q_\theta(p) = f(\theta) + g^\top p + \tfrac12 p^\top C p` the
undamped quadratic model and :math:`\rho` the reduction ratio.

One :meth:`HessianFree.step` (Martens 2010, §4 and Algorithm 1; the reference MATLAB code):

1. Loss, gradient and the curvature products' graph at :math:`\theta` from **one** closure call
   (the first-order graph is reused by every product). ``torch.optim.LBFGS``'s first-order
   test ends the step here: :math:`\max_i |g_i| \le` ``tolerance_grad`` → ``'converged'``.
2. Truncated preconditioned CG on :math:`Bp = -g` (:func:`hessfree.cg`), warm-started from
   ``cg_decay`` × the previous step's *final* CG iterate (§4.5; 0.95 in the reference code;
   by default only for Gauss-Newton/Fisher curvature, the Hessian's CG starts cold),
   stopping by the relative-progress rule (§4.4).
3. CG backtracking (§4.6): from the last stored iterate walk back while the objective on the
   gradient batch decreases.
4. :math:`\rho` of the backtracked step with the undamped model, read off CG's :math:`\phi`
   (no extra product); Levenberg-Marquardt update of :math:`\lambda` (§4.1).
5. Armijo backtracking line search on the backtracked step (the reference code's: :math:`c =
   10^{-2}`, rate × 0.8, up to 60 tries), else the step is rejected. A step that changed the
   objective by less than ``tolerance_change``, or every parameter by at most that, is
   ``'converged'`` (LBFGS's no-progress tests; ours, not the paper's).

Where our defaults differ from the paper: initial ``damping='auto'`` calibrates :math:`\lambda`
from the curvature along the gradient at the first step (:func:`hessfree.damping.calibrate_damping`;
the reference uses a fixed 45 on its own loss scaling); no
preconditioner by default (``precond='martens'`` turns §4.7's on); the curvature batch is
whatever ``curvature_closure`` evaluates (the reference cycles through quarter-size chunks).

Closure styles, fastest first:

* ``closure() -> (loss, outputs)`` without ``backward()``: enables Gauss-Newton and Fisher
  curvature; evaluation-only calls (backtracking, line search) run under ``torch.no_grad()``.
* ``closure() -> (loss, (r_1, ..., r_K))``: residual blocks, e.g. of a physics-informed loss
  :math:`\sum_k w_k\,\mathrm{mean}(r_k^2)`; ``'auto'`` curvature is the exact Gauss-Newton
  matrix :math:`\sum_{k,l} J_k^\top (H_\ell)_{kl} J_l` of any loss of the residuals
  (:class:`~hessfree.GGNProduct`). No Fisher curvature or empirical-Fisher preconditioner.
* ``closure() -> loss`` without ``backward()``: Hessian curvature, same cheap evaluations.
* Closures that use autograd themselves (``torch.autograd.grad`` of the network with respect
  to its inputs) work in every style: evaluation calls then run with gradients enabled, as
  detected on the step's first call (or from a failed ``no_grad`` call, which is repeated).
* ``torch.optim.LBFGS`` style (``zero_grad``, ``loss.backward()``, ``return loss``): works
  unchanged and gets exact Hessian products. During the first call of a step the optimizer makes
  ``backward()`` build the gradient with ``create_graph=True`` (``torch.autograd.backward`` is
  swapped for the duration of that call and restored, also on error; not thread-safe while the
  call runs), and evaluation calls run the closure's backward too, which costs one backward
  pass per evaluation that the other styles avoid.

Dropout and train-mode BatchNorm make every closure call a different function (and each trial
evaluation updates BatchNorm's running statistics); the first call of each closure is watched
for such modules and a warning says so once, as the SciPy operators refuse them.

References:
    Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.
    Nocedal & Wright (2006), Numerical Optimization, 2nd ed., §3.1 (Armijo) and §4 (trust region).
"""

from __future__ import annotations

import contextlib
import enum
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import damping as _damping
from ._checks import check_choice, check_int, check_number
from ._flat import ParamLayout
from ._model_data import _INPUT_MISMATCH_HINT, _is_stochastic, _stochastic_modules_message
from ._types import MatVec
from .acceleration import ProductPolicy, accelerate
from .cg import StopReason, cg
from .curvature import (
    CurvatureProduct,
    FisherProduct,
    GGNProduct,
    HessianProduct,
    JacobianProduct,
    StructurallyDampedGGN,
    loss_hessian_product,
)
from .distributed import Averager
from .preconditioning import EmpiricalFisherDiagonal, NystromPreconditioner, PrecondContext

__all__ = ["HessianFree", "StepInfo", "StepStatus"]

Closure = Callable[[], "Tensor | tuple[Tensor, Tensor | tuple[Tensor, ...]]"]
CURVATURES = ("auto", "ggn", "hessian", "fisher")
# torch's messages for data that does not match the parameters (dtype, device, features)
_MISMATCH = re.compile(
    r"dtype|scalar type|should be the same|same device|two devices|shapes cannot be multiplied"
)


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
    #: (× ``lr``) was at most ``tolerance_change`` in every parameter.
    CONVERGED = "converged"
    #: No rate passed the line search, or the step was not a descent direction; nothing moved.
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
        rho: Reduction ratio :math:`\rho` of the backtracked step at its full length (rate 1,
            before the line search): NaN if not computed or the model predicted no decrease;
            ``-inf`` (Martens' reference code) when that full step increased the objective or
            gave a non-finite value, *even if the line search then found a decrease at a
            smaller rate and the step was accepted* (``adapt_damping`` raised :math:`\lambda`).
        damping: :math:`\lambda` used in this step's CG.
        next_damping: :math:`\lambda` after the Levenberg-Marquardt update.
        cg_iters: CG iterations; ``cg_reason`` why CG stopped; ``cg_matvecs`` products.
        backtrack_iter: CG iteration of the chosen (backtracked) iterate.
        step_rate: Accepted Armijo rate (0 if rejected).
        grad_norm: :math:`\|g\|`.
        closure_calls: Closure evaluations in this step (curvature closure included).
        time_products: Seconds spent in curvature products (on CUDA: launch time, async).
        time_total: Seconds for the whole step.
    """

    loss: float
    loss_after: float
    accepted: bool
    status: StepStatus
    rho: float = math.nan
    damping: float = math.nan
    next_damping: float = math.nan
    cg_iters: int = 0
    cg_reason: str = ""
    cg_matvecs: int = 0
    backtrack_iter: int = 0
    step_rate: float = 0.0
    grad_norm: float = math.nan
    closure_calls: int = 0
    time_products: float = 0.0
    time_total: float = 0.0


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


@contextlib.contextmanager
def _watch_grad() -> Iterator[list[bool]]:
    """Record whether ``torch.autograd.grad`` is called inside the block; restore after."""
    called: list[bool] = []
    original = torch.autograd.grad

    def grad(*args, **kwargs):
        called.append(True)
        return original(*args, **kwargs)

    torch.autograd.grad = grad
    try:
        yield called
    finally:
        torch.autograd.grad = original


@contextlib.contextmanager
def _backward_builds_graph() -> Iterator[list[bool]]:
    """Make ``Tensor.backward()`` use ``create_graph=True`` inside the block; restore after."""
    called: list[bool] = []
    original = torch.autograd.backward

    def backward(
        tensors, grad_tensors=None, retain_graph=None, create_graph=False, *args, **kwargs
    ):
        called.append(True)
        return original(tensors, grad_tensors, retain_graph, True, *args, **kwargs)

    torch.autograd.backward = backward
    try:
        with warnings.catch_warnings():
            # The parameter <-> .grad reference cycle it warns about is broken right after.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            yield called
    finally:
        torch.autograd.backward = original


class HessianFree(torch.optim.Optimizer):
    r"""Hessian-free optimization (Martens 2010) with a ``torch.optim`` interface.

    Args:
        params: Parameters or param groups (``lr`` and ``weight_decay`` may differ per group;
            all groups form one quadratic model). Tensors with ``requires_grad=False`` are skipped.
        lr: Multiplies the accepted step (1 in the paper); backtracking, :math:`\rho` and the
            line search work on the unscaled step, so ``StepInfo.loss_after`` is the objective
            there. 0 is allowed (schedulers such as ``CosineAnnealingLR(eta_min=0)`` reach it);
            when every group's ``lr`` is 0 a step returns after one closure call with status
            ``'zero_lr'`` and nothing moves.
        curvature: ``'auto'`` (Gauss-Newton when the closure returns ``(loss, outputs)`` or
            residual blocks ``(loss, (r_1, ..., r_K))``, else the Hessian), ``'ggn'``,
            ``'hessian'``, ``'fisher'`` (empirical Fisher, mean over dim 0 of the outputs unless
            the loss node says ``'sum'``; not for residual blocks) or a callable
            ``(loss, outputs, params) -> MatVec`` returning flat ``v -> C v``.
        damping: Initial Tikhonov damping: ``'auto'`` (default) sets
            :math:`\lambda_0 = |g^\top C g| / g^\top g` at the first step (one extra curvature
            product; scale-free, see :func:`hessfree.damping.calibrate_damping`), or a number
            :math:`\lambda > 0` to use as given. Until the first step, :attr:`damping` is NaN.
        adapt_damping: Adapt :math:`\lambda` by the Levenberg-Marquardt rule (§4.1).
        damping_increase: Factor > 1 applied when :math:`\rho < 1/4` (3/2 in the paper).
        damping_decrease: Factor in (0, 1) applied when :math:`\rho > 3/4` (2/3 in the paper).
        min_damping: Lower bound on :math:`\lambda`, >= 0.
        max_damping: Upper bound on :math:`\lambda`, > ``min_damping``.
        weight_decay: L2 coefficient :math:`\kappa` (per group), in gradient *and* curvature.
        structural_damping: :math:`\mu \ge 0` of Martens & Sutskever (2011, §3.3); 0.03 in the
            paper for RNNs, 0 (off) by default. When positive, the closure returns
            ``(loss, outputs, hidden)`` and CG's matrix gains
            :math:`\lambda\mu\,J_h^\top J_h / N` (:math:`N` = ``hidden.shape[0]`` examples),
            a Gauss-Newton penalty on changes of the hidden states, adapted with :math:`\lambda`
            and left out of :math:`\rho`'s undamped model. Needs Gauss-Newton curvature.
        cg_max_iter: Most CG iterations per step (250 in the reference code).
        cg_min_iter: CG iterations before the relative-progress stop may fire.
        cg_rtol: CG also stops when :math:`\|r\| \le` ``cg_rtol`` :math:`\|g\|`.
        cg_progress_tol: :math:`\epsilon` of the relative-progress stop (5e-4, §4.4).
        cg_decay: Warm-start decay in [0, 1] (0.95 in the reference code; 0 = cold start), or
            ``'auto'`` (default): 0.95 for Gauss-Newton, Fisher and callable curvature, 0 for the
            Hessian. With an indefinite Hessian a warm start can put CG where the model is poor,
            and negative curvature then returns an iterate that is no descent step; from a cold
            start the iterate before negative curvature always is (Steihaug 1983). Measured on
            ``experiments/scorecard.py``'s LBFGS-loop task: cold starts reached 2-6x lower loss
            and no failed line searches.
        cg_check_every: CG reads its stop tests back to the host every this many iterations
            (each read is a device synchronisation); ``None``: 1 on CPU, 8 on accelerators.
            Changes only how many products are spent after a stop, not the step.
        backtrack: CG backtracking over the stored iterates (§4.6).
        line_search: ``'armijo'`` or ``None``.
        armijo_c: Sufficient-decrease constant in (0, 1) (1e-2 in the reference code).
        line_search_shrink: Rate factor in (0, 1) (0.8 in the reference code).
        line_search_max_iter: Most rates tried (60 in the reference code).
        precond: ``None``, ``'martens'`` (:class:`EmpiricalFisherDiagonal` with α = 3/4; needs
            ``(loss, outputs)`` closures), ``'nystrom'`` (:class:`NystromPreconditioner`, rank
            60 refreshed every 10 steps, from curvature products alone: for Gauss-Newton or
            Fisher curvature with a fast-decaying spectrum, e.g. residual closures), an instance
            of either, or a callable ``(PrecondContext) -> Tensor | MatVec`` giving the diagonal
            of :math:`M` or :math:`r \mapsto M^{-1}r` (a callable whose ``needs_outputs`` is
            False gets ``PrecondContext.curvature`` and ``.gradient`` instead of outputs).
        tolerance_grad: ``torch.optim.LBFGS``'s first-order optimality test: a step whose
            gradient has :math:`\max_i |g_i| \le` ``tolerance_grad`` (L2 term included)
            returns after one closure call with status ``'converged'``, nothing moved.
        tolerance_change: ``torch.optim.LBFGS``'s no-progress test: a step that changes the
            objective by less than ``tolerance_change`` or every parameter by at most
            ``tolerance_change`` is applied and reported ``'converged'``; so is a rejected step
            whose full length (× ``lr``) is at most ``tolerance_change`` in every parameter
            (e.g. :math:`\lambda` pinned at ``max_damping``). 0 turns these tests off (but
            for a zero step).
        max_failures: Consecutive steps with a non-finite value (loss, gradient, curvature
            product, or every trial loss rejected with one of them NaN/Inf) tolerated before
            ``FloatingPointError``; any other step resets the count.
        callback: Called with the :class:`StepInfo` after every step.
        seed: Seed of the optimizer's own generator (preconditioner probes); the user's global
            RNG is never touched.
        process_group: Average over this ``torch.distributed`` group (default: the default
            group when ``torch.distributed`` is initialised): the loss, the gradient, every
            curvature product, the preconditioner statistics and every trial loss are averaged
            with one collective each, so all ranks take the same step (see
            :mod:`hessfree.distributed` for the weighting of unequal shards).
        curvature_batch: ``'sharded'`` (each rank's curvature closure sees its own shard, so
            every product is averaged with one collective) or ``'replicated'`` (every rank's
            ``curvature_closure`` evaluates the same batch, so the products are equal on all
            ranks and need no collective: only the gradient, the losses and statistics from
            the gradient batch are averaged). Checked on the first step (two small
            collectives); the same in one process.
        products: How curvature products run (:class:`hessfree.ProductPolicy`, or a mapping
            of its fields): CUDA-graph replay and TF32/bf16 arithmetic, both off by default;
            CG's iterates and scalars keep the parameters' dtype.

    Raises:
        ValueError: If a hyperparameter is out of range (the message names it).
        TypeError: If a hyperparameter has the wrong type.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
        >>> x = torch.zeros(2, requires_grad=True)
        >>> opt = HessianFree([x], damping=1e-6)
        >>> def closure():
        ...     return 0.5 * x @ A @ x - x.sum()
        >>> loss = opt.step(closure)
        >>> torch.allclose(x, torch.linalg.solve(A, torch.ones(2)), atol=1e-4)
        True

    References:
        Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.1-4.7.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1.0,
        *,
        curvature: str | Callable = "auto",
        damping: float | str = "auto",
        adapt_damping: bool = True,
        damping_increase: float = 1.5,
        damping_decrease: float = 2.0 / 3.0,
        min_damping: float = 1e-8,
        max_damping: float = 1e10,
        weight_decay: float = 0.0,
        structural_damping: float = 0.0,
        cg_max_iter: int = 250,
        cg_min_iter: int = 1,
        cg_rtol: float = 1e-10,
        cg_progress_tol: float = 5e-4,
        cg_decay: float | str = "auto",
        cg_check_every: int | None = None,
        backtrack: bool = True,
        line_search: str | None = "armijo",
        armijo_c: float = 1e-2,
        line_search_shrink: float = 0.8,
        line_search_max_iter: int = 60,
        precond: str | EmpiricalFisherDiagonal | Callable | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        max_failures: int = 10,
        callback: Callable[[StepInfo], None] | None = None,
        seed: int = 0,
        process_group: object | None = None,
        curvature_batch: str = "sharded",
        products: ProductPolicy | Mapping | None = None,
    ) -> None:
        lr = check_number("lr", lr, low=0.0)
        tolerance_grad = check_number("tolerance_grad", tolerance_grad, low=0.0)
        tolerance_change = check_number("tolerance_change", tolerance_change, low=0.0)
        weight_decay = check_number("weight_decay", weight_decay, low=0.0)
        if not callable(curvature):
            check_choice("curvature", curvature, CURVATURES)
        self.curvature = curvature
        if isinstance(damping, str):
            check_choice("damping", damping, ("auto",))
            self.initial_damping = math.nan  # calibrated at the first step
        else:
            self.initial_damping = check_number("damping", damping, low=0.0, low_open=True)
        self.structural_damping = check_number("structural_damping", structural_damping, low=0.0)
        if self.structural_damping > 0 and curvature not in ("auto", "ggn"):
            raise ValueError(
                "`structural_damping` > 0 needs Gauss-Newton curvature, "
                f"got curvature={curvature!r}; "
                "use curvature='ggn' (or 'auto')."
            )
        self.adapt_damping = _check_bool("adapt_damping", adapt_damping)
        self.damping_increase = check_number(
            "damping_increase",
            damping_increase,
            low=1.0,
            low_open=True,
            hint="did you swap it with `damping_decrease`?" if 0 < damping_increase < 1 else "",
        )
        self.damping_decrease = check_number(
            "damping_decrease",
            damping_decrease,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
            hint="did you swap it with `damping_increase`?" if damping_decrease > 1 else "",
        )
        self.min_damping = check_number("min_damping", min_damping, low=0.0)
        self.max_damping = check_number(
            "max_damping", max_damping, low=self.min_damping, low_open=True
        )
        if not math.isnan(self.initial_damping) and not (
            self.min_damping <= self.initial_damping <= self.max_damping
        ):
            raise ValueError(
                f"`damping` must be in [min_damping, max_damping] = [{self.min_damping!r}, "
                f"{self.max_damping!r}], got {self.initial_damping!r}."
            )
        self.cg_max_iter = check_int("cg_max_iter", cg_max_iter, low=1)
        self.cg_min_iter = check_int("cg_min_iter", cg_min_iter, low=0, high=self.cg_max_iter)
        self.cg_rtol = check_number("cg_rtol", cg_rtol, low=0.0)
        self.cg_progress_tol = check_number(
            "cg_progress_tol", cg_progress_tol, low=0.0, low_open=True
        )
        if isinstance(cg_decay, str):
            check_choice("cg_decay", cg_decay, ("auto",))
        else:
            cg_decay = check_number("cg_decay", cg_decay, low=0.0, high=1.0)
        self.cg_decay = cg_decay
        self.cg_check_every = (
            None if cg_check_every is None else check_int("cg_check_every", cg_check_every, low=1)
        )
        self.backtrack = _check_bool("backtrack", backtrack)
        if line_search is not None:
            check_choice("line_search", line_search, ("armijo",))
        self.line_search = line_search
        self.armijo_c = check_number(
            "armijo_c", armijo_c, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.line_search_shrink = check_number(
            "line_search_shrink",
            line_search_shrink,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
        )
        self.line_search_max_iter = check_int("line_search_max_iter", line_search_max_iter, low=1)
        if precond == "martens":
            precond = EmpiricalFisherDiagonal()
        elif precond == "nystrom":
            precond = NystromPreconditioner()
        elif isinstance(precond, str):
            raise ValueError(
                f"Unknown `precond` {precond!r}; expected None, 'martens', 'nystrom' or a callable."
            )
        elif precond is not None and not callable(precond):
            raise TypeError(
                "`precond` must be None, 'martens', 'nystrom' or a callable, got "
                f"{type(precond).__name__}."
            )
        self.precond = precond
        self.max_failures = check_int("max_failures", max_failures, low=1)
        if callback is not None and not callable(callback):
            raise TypeError(f"`callback` must be callable or None, got {type(callback).__name__}.")
        self.callback = callback
        self.seed = check_int("seed", seed)
        self._avg = Averager(process_group)
        self.products = ProductPolicy.of(products)
        self.curvature_batch = check_choice(
            "curvature_batch", curvature_batch, ("sharded", "replicated")
        )
        # The tolerances live in the defaults, as in LBFGS, so state_dict() carries them.
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
        )
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            check_number(f"param_groups[{i}]['lr']", group["lr"], low=0.0)
            check_number(f"param_groups[{i}]['weight_decay']", group["weight_decay"], low=0.0)
            for key in ("tolerance_grad", "tolerance_change"):
                check_number(f"param_groups[{i}][{key!r}]", group[key], low=0.0)
                if group[key] != defaults[key]:
                    raise ValueError(
                        f"`param_groups[{i}][{key!r}]` is {group[key]!r} but `{key}` is "
                        f"{defaults[key]!r}; all groups form one quadratic model, so pass "
                        f"`{key}` to HessianFree instead of per group."
                    )
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            raise ValueError(
                "No parameter requires gradients; HessianFree has nothing to optimize."
            )
        self.last_step: StepInfo | None = None
        self._closure_uses_autograd = False  # set once a closure is seen to need autograd
        self._generator: torch.Generator | None = None
        # Closure roles whose first call was watched for train-mode BatchNorm/Dropout.
        self._watched: set[str] = set()
        self._warned_stochastic = False

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as ``torch.optim.Optimizer`` does; state from before the tolerances gets ours."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key in ("tolerance_grad", "tolerance_change"):
                group.setdefault(key, self.defaults[key])

    # ------------------------------------------------------------------------------ state
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _global_state(self) -> dict:
        """State shared by all groups, stored under the first parameter (as LBFGS does)."""
        st = self.state[self._params()[0]]
        if "damping" not in st:
            st["damping"] = self.initial_damping
            st["step"] = 0
            st["failures"] = 0
        return st

    def _rng(self, device: torch.device) -> torch.Generator:
        st = self._global_state()
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if "rng_state" in st:
                # load_state_dict casts state tensors to the parameters' dtype: undo that
                self._generator.set_state(st["rng_state"].to("cpu", torch.uint8))
        return self._generator

    @property
    def damping(self) -> float:
        """The current Tikhonov damping :math:`\\lambda`."""
        return self._global_state()["damping"]

    def _per_entry(self, layout: ParamLayout, key: str) -> float | Tensor:
        """A group option as a scalar if uniform, else a flat vector over the parameters."""
        values = [(g[key], p) for g in self.param_groups for p in g["params"] if p.requires_grad]
        first = values[0][0]
        if all(v == first for v, _ in values):
            return float(first)
        return torch.cat(
            [
                torch.full((p.numel(),), float(v), dtype=layout.dtype, device=layout.device)
                for v, p in values
            ]
        )

    # ------------------------------------------------------------------------------ closures
    def _call(
        self, closure: Closure, counter: _Counter, *, build_graph: bool, contract_a: bool
    ) -> _Evaluation:
        """Evaluate ``closure``; with ``build_graph`` capture what curvature products need.

        Evaluation-only calls run under ``torch.no_grad()`` unless the closure needs autograd
        itself: when it called ``backward()`` (``contract_a``) or ``torch.autograd.grad`` (seen
        during a graph-building call, e.g. a physics-informed residual differentiating the
        network with respect to its inputs), or when a ``no_grad`` call failed with an autograd
        error (a closure that imported ``grad`` under another name); the call is then repeated
        with gradients enabled and later evaluations keep them.
        """
        counter.calls += 1
        if build_graph:
            with torch.enable_grad(), _backward_builds_graph() as called, _watch_grad() as used:
                loss, outputs, hidden = _unpack(closure())
            if used:
                self._closure_uses_autograd = True
            grads = None
            if called:
                params = self._params()
                grads = [p.grad for p in params]
                for p in params:  # break the parameter <-> graph-carrying .grad cycle
                    if p.grad is not None:
                        p.grad = p.grad.detach()
            return _Evaluation(loss, outputs, grads, hidden)
        if contract_a or self._closure_uses_autograd:
            with torch.enable_grad():
                loss, _, _ = _unpack(closure())
            return _Evaluation(loss.detach(), None, None)
        try:
            with torch.no_grad():
                loss, _, _ = _unpack(closure())
        except (RuntimeError, TypeError):
            # e.g. "element 0 of tensors does not require grad": retry with autograd on
            with torch.enable_grad():
                loss, _, _ = _unpack(closure())
            self._closure_uses_autograd = True
        return _Evaluation(loss.detach(), None, None)

    def _objective_at(
        self,
        closure: Closure,
        counter: _Counter,
        theta0: list[Tensor],
        d: list[Tensor],
        t: float,
        contract_a: bool,
        l2: float | Tensor,
    ) -> float:
        """:math:`f(\\theta_0 + t d)` including the L2 term; ``inf`` if not finite."""
        params = self._params()
        with torch.no_grad():
            torch._foreach_copy_(params, theta0)
            torch._foreach_add_(params, d, alpha=t)
        loss = self._call(closure, counter, build_graph=False, contract_a=contract_a).loss
        f = self._avg.mean_scalar(float(loss), loss) + self._l2(params, l2)
        return f if math.isfinite(f) else math.inf

    def _l2(self, params: list[Tensor], l2: float | Tensor) -> float:
        if isinstance(l2, float):
            if l2 == 0.0:
                return 0.0
            return 0.5 * l2 * float(sum(p.detach().square().sum() for p in params))
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        return 0.5 * float((l2 * flat.square()).sum())

    # ------------------------------------------------------------------------------ curvature
    def _curvature_product(self, ev: _Evaluation, params: list[Tensor]) -> tuple[MatVec, object]:
        """Build ``v -> C v`` (undamped, without weight decay) from an evaluation."""
        kind = self.curvature
        if callable(kind):
            return kind(ev.loss, ev.outputs, params), None
        if kind == "auto":
            kind = "ggn" if ev.outputs is not None else "hessian"
        if kind in ("ggn", "fisher") and ev.outputs is None:
            raise ValueError(
                f"curvature={kind!r} needs the model outputs: make the closure return "
                "(loss, outputs), or use curvature='hessian'."
            )
        if isinstance(ev.outputs, tuple) and (kind == "fisher" or self.structural_damping > 0):
            what = "curvature='fisher'" if kind == "fisher" else "structural_damping > 0"
            raise ValueError(
                f"{what} needs one outputs tensor with examples along dimension 0, but the "
                "closure returned residual blocks (loss, (r_1, ..., r_K)); use curvature='ggn' "
                "(or 'auto') and structural_damping=0."
            )
        if self.structural_damping > 0:
            if ev.outputs is None or ev.hidden is None:
                raise ValueError(
                    "structural_damping > 0 needs the closure to return (loss, outputs, hidden)."
                )
            n = ev.hidden.shape[0] if ev.hidden.dim() > 0 else 1
            lam = self._global_state()["damping"]
            # damping='auto' before its calibration (NaN): products without the structural term
            weight = 0.0 if math.isnan(lam) else lam * self.structural_damping / n
            prod = StructurallyDampedGGN(ev.loss, ev.outputs, ev.hidden, params, weight=weight)
        elif kind == "hessian":
            prod = HessianProduct(ev.loss if ev.grads is None else None, params, grads=ev.grads)
        elif kind == "ggn":
            prod = GGNProduct(ev.loss, ev.outputs, params)
        else:
            prod = FisherProduct(
                ev.loss, ev.outputs, params, reduction=_reduction_of(ev.loss, ev.outputs)
            )
        return prod.matvec, prod

    def _gradient(
        self, ev: _Evaluation, product: object, layout: ParamLayout, params: list[Tensor]
    ) -> Tensor:
        if isinstance(product, (HessianProduct, GGNProduct)):
            return product.gradient
        if ev.grads is not None:
            return layout.cat([None if g is None else g.detach() for g in ev.grads])
        return layout.cat(
            torch.autograd.grad(ev.loss, params, retain_graph=True, allow_unused=True)
        )

    def _preconditioner(
        self,
        ev: _Evaluation,
        product: object,
        params: list[Tensor],
        lam: float,
        shift: float | Tensor,
        *,
        curv: MatVec,
        g: Tensor,
    ) -> Tensor | MatVec | None:
        if self.precond is None:
            return None
        if not getattr(self.precond, "needs_outputs", True):  # curvature products only
            return self.precond(self._curvature_context(product, lam, shift, curv, g))
        if ev.outputs is None:
            raise ValueError(
                "The diagonal empirical-Fisher preconditioner needs per-example information: "
                "make the closure return (loss, outputs), or pass precond=None."
            )
        if isinstance(ev.outputs, tuple):
            raise ValueError(
                "The diagonal empirical-Fisher preconditioner needs one outputs tensor with "
                "examples along dimension 0, but the closure returned residual blocks "
                "(loss, (r_1, ..., r_K)); pass precond=None."
            )
        if isinstance(product, GGNProduct):
            jac, go = product.jacobian, product.output_grad
        else:
            jac = JacobianProduct(ev.outputs, params)
            (go,) = torch.autograd.grad(ev.loss, ev.outputs, retain_graph=True)
        ctx = PrecondContext(
            jacobian=jac,
            output_grad=go,
            reduction=_reduction_of(ev.loss, ev.outputs),
            damping=lam,
            shift=shift,
            generator=self._rng(go.device),
            average=self._avg.mean if self._sharded(product) else _same,
        )
        return self.precond(ctx)

    def _curvature_context(
        self, product: object, lam: float, shift: float | Tensor, curv: MatVec, g: Tensor
    ) -> PrecondContext:
        """A :class:`PrecondContext` with batched undamped products :math:`V(C + \\kappa)`."""
        batched = isinstance(product, CurvatureProduct) and curv is product
        replicated = self.curvature_batch == "replicated"

        def products(V: Tensor) -> Tensor:
            out = product.matmat(V) if batched else torch.stack([curv(v) for v in V])
            out = out if replicated else self._avg.mean(out)
            return out + V * shift

        return PrecondContext(
            jacobian=None,
            output_grad=None,
            reduction="mean",
            damping=lam,
            shift=shift,
            generator=self._rng(g.device),
            average=self._avg.mean if self._sharded(product) else _same,
            curvature=products,
            gradient=g,
        )

    def _sharded(self, product: object) -> bool:
        """Whether the preconditioner's statistics differ across ranks (and need averaging).

        They come from ``product``'s curvature batch when it is a Gauss-Newton product, else
        from the gradient batch, which is always sharded.
        """
        return self.curvature_batch == "sharded" or not isinstance(product, GGNProduct)

    # ------------------------------------------------------------------------------ step
    def step(self, closure: Closure, curvature_closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """Take one Hessian-free step.

        Args:
            closure: Re-evaluates the model on the gradient batch and returns the loss,
                ``(loss, outputs)`` or ``(loss, (r_1, ..., r_K))``; it may call ``backward()``
                (``torch.optim.LBFGS`` style) and ``torch.autograd.grad`` (input-derivatives).
                It is called several times per step (backtracking, line search).
            curvature_closure: Same contract on the curvature batch; its graph supplies the
                curvature products. Default: ``closure``'s own graph.

        Returns:
            Tensor: The closure's loss at the starting point (as ``LBFGS.step`` does).

        Raises:
            TypeError: If ``closure`` is not callable or returns something other than a scalar
                tensor or ``(loss, outputs)``.
            ValueError: If the curvature or preconditioner needs outputs the closure does not
                give, or the closure's first call fails because its data does not match the
                parameters (dtype, device or features; torch's error is chained).
            FloatingPointError: After ``max_failures`` consecutive non-finite steps.
        """
        if not callable(closure):
            raise TypeError(
                f"HessianFree.step needs a closure that re-evaluates the loss, got {closure!r}."
            )
        if curvature_closure is not None and not callable(curvature_closure):
            raise TypeError(
                f"`curvature_closure` must be callable or None, got {curvature_closure!r}."
            )
        t_start = time.perf_counter()
        st = self._global_state()
        params = self._params()
        layout = ParamLayout(params)
        counter = _Counter()
        lam = st["damping"]
        l2 = self._per_entry(layout, "weight_decay")
        lr = self._per_entry(layout, "lr")
        group = self.param_groups[0]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]

        # ---- 1. loss and gradient at θ0 (the curvature graph too, without curvature_closure) ----
        ev = self._first_call(closure, "closure", counter, layout)
        contract_a = ev.grads is not None
        loss0 = ev.loss.detach()
        if st["step"] == 0:
            self._avg.check_same(layout.cat([p.detach() for p in params]))
        f0 = self._avg.mean_scalar(float(loss0), loss0) + self._l2(params, l2)

        def finish(status: StepStatus, *, accepted: bool = False, **kw) -> Tensor:
            if status not in _NON_FINITE:
                st["failures"] = 0  # max_failures counts *consecutive* non-finite steps
            info = StepInfo(
                loss=f0,
                loss_after=kw.pop("loss_after", f0),
                accepted=accepted,
                status=status,
                damping=lam,
                next_damping=st["damping"],
                closure_calls=counter.calls,
                time_products=counter.product_time,
                time_total=time.perf_counter() - t_start,
                **kw,
            )
            self.last_step = info
            st["step"] += 1
            if self._generator is not None:
                st["rng_state"] = self._generator.get_state()
            if self.callback is not None:
                self.callback(info)
            return loss0

        if not math.isfinite(f0):
            return self._reject(st, finish, StepStatus.NON_FINITE_LOSS, "the loss")
        curv = product = None
        with torch.enable_grad():  # the products differentiate graphs, whatever the caller's mode
            if curvature_closure is None:
                curv, product = self._curvature_product(ev, params)
            g = self._avg.mean(self._gradient(ev, product, layout, params))
        if not isinstance(l2, float) or l2 != 0.0:
            theta_flat = layout.cat([p.detach() for p in params])
            g = g.add(theta_flat * l2 if not isinstance(l2, float) else theta_flat.mul_(l2))
        # one host read for both (each read is a device sync)
        g_norm, g_max = torch.stack([torch.linalg.vector_norm(g), g.abs().max()]).tolist()
        if not math.isfinite(g_norm):
            return self._reject(
                st, finish, StepStatus.NON_FINITE_GRADIENT, "the gradient", grad_norm=g_norm
            )
        if g_max <= tolerance_grad:  # LBFGS' first-order optimality test
            return finish(StepStatus.CONVERGED, grad_norm=g_norm)
        if not (lr.any() if isinstance(lr, Tensor) else lr):
            return finish(StepStatus.ZERO_LR, grad_norm=g_norm)  # nothing could move
        cev = ev
        if curvature_closure is not None:
            cev = self._first_call(curvature_closure, "curvature_closure", counter, layout)
            with torch.enable_grad():
                curv, product = self._curvature_product(cev, params)
        replicated = self.curvature_batch == "replicated"
        if replicated and st["step"] == 0:
            self._avg.check_replicated("curvature_batch='replicated'", cev.loss.detach())
        curv = accelerate(curv, g, self.products)  # CUDA graph / reduced precision, if asked
        if math.isnan(lam):  # damping='auto': one product along g, on the first step only
            with torch.enable_grad():
                Cg = curv(g) if replicated else self._avg.mean(curv(g))
            gCg = float(g @ Cg) + float((l2 * g) @ g)  # C includes the L2 term κ
            lam = st["damping"] = _damping.calibrate_damping(
                gCg, g_norm**2, min_damping=self.min_damping, max_damping=self.max_damping
            )
            if isinstance(product, StructurallyDampedGGN):
                h = product.hidden
                product.weight = lam * self.structural_damping / (h.shape[0] if h.dim() else 1)

        # ---- 2. CG on (C + κ + λ) p = -g from the decayed previous solution ----
        shift = l2 + lam  # float or per-entry vector

        def damped(v: Tensor) -> Tensor:
            t0 = time.perf_counter()
            out = curv(v) if replicated else self._avg.mean(curv(v))
            counter.product_time += time.perf_counter() - t0
            return out.add_(v, alpha=shift) if isinstance(shift, float) else out.addcmul_(shift, v)

        with torch.enable_grad():
            precond = self._preconditioner(ev, product, params, lam, l2, curv=curv, g=g)
        # popped and decayed in place: one vector, not two, besides CG's copy (set again below)
        warm = st.pop("warm_start", None)
        x0 = None
        decay = self.cg_decay
        if decay == "auto":  # §4.5's warm start for PSD curvature only (see cg_decay)
            decay = 0.0 if isinstance(product, HessianProduct) else 0.95
        if warm is not None and decay > 0 and warm.shape == g.shape:
            x0 = warm.to(device=g.device, dtype=g.dtype).mul_(decay)
        warm = None
        result = cg(
            damped,
            -g,
            x0,
            max_iter=self.cg_max_iter,
            min_iter=self.cg_min_iter,
            rtol=self.cg_rtol,
            precond=precond,
            progress_tol=self.cg_progress_tol,
            check_every=self.cg_check_every,
        )
        cg_info = dict(
            grad_norm=g_norm,
            cg_iters=result.num_iter,
            cg_reason=result.reason.value,
            cg_matvecs=result.num_matvec,
        )
        if result.reason is StopReason.NON_FINITE:
            st.pop("warm_start", None)
            return self._reject(
                st, finish, StepStatus.NON_FINITE_CURVATURE, "a curvature product", **cg_info
            )
        st["warm_start"] = result.x.detach()  # §4.5: the final, not the backtracked, iterate
        energy = None
        if isinstance(product, StructurallyDampedGGN):
            # the structural term is damping: leave it out of ρ's model (needs the graph, so now)
            with torch.enable_grad():
                energy = product.weight * product.hidden_energy(torch.stack(result.iterates))
        curv = product = ev = cev = None  # free the curvature graph before the trial evaluations

        # ---- 3. CG backtracking on the gradient batch ----
        theta0 = [p.detach().clone() for p in params]
        trial_non_finite = False

        def f_at(x: Tensor, t: float) -> float:
            nonlocal trial_non_finite
            f = self._objective_at(closure, counter, theta0, layout.split(x), t, contract_a, l2)
            trial_non_finite |= f == math.inf  # _objective_at maps NaN and ±Inf to +inf
            return f

        try:
            chosen = len(result.iterates) - 1
            f_chosen = f_at(result.iterates[chosen], 1.0)
            if self.backtrack:
                for j in range(chosen - 1, -1, -1):
                    f_j = f_at(result.iterates[j], 1.0)
                    if not f_j < f_chosen:  # §4.6: stop at the first increase
                        break
                    chosen, f_chosen = j, f_j
            p = result.iterates[chosen]

            # ---- 4. ρ with the undamped model, read off CG's φ (no extra product) ----
            gp = float(g @ p)
            predicted = float(result.iterate_phi[chosen]) - 0.5 * lam * float(p @ p)
            if energy is not None:
                predicted -= 0.5 * float(energy[chosen])
            rho = _damping.reduction_ratio(f_chosen - f0, predicted)
            if self.adapt_damping:
                st["damping"] = _damping.update_damping(
                    lam,
                    rho,
                    increase=self.damping_increase,
                    decrease=self.damping_decrease,
                    min_damping=self.min_damping,
                    max_damping=self.max_damping,
                )

            # ---- 5. Armijo line search along the backtracked step ----
            rate, f_new = 1.0, f_chosen
            if not gp < 0.0:
                rate = 0.0  # not a descent direction (e.g. a poor warm start and one CG step)
            elif self.line_search is not None:
                for _ in range(self.line_search_max_iter - 1):
                    if f_new <= f0 + self.armijo_c * rate * gp:
                        break
                    rate *= self.line_search_shrink
                    f_new = f_at(p, rate)
                if not f_new <= f0 + self.armijo_c * rate * gp:
                    rate = 0.0
            elif not f_new < math.inf:
                rate = 0.0
            with torch.no_grad():
                torch._foreach_copy_(params, theta0)
                if rate > 0.0:
                    if isinstance(lr, float):
                        torch._foreach_add_(params, layout.split(p), alpha=rate * lr)
                    else:
                        torch._foreach_add_(params, layout.split(p * lr), alpha=rate)
        except BaseException:
            with torch.no_grad():
                torch._foreach_copy_(params, theta0)
            raise
        info = dict(cg_info, rho=rho, backtrack_iter=result.iterations[chosen], step_rate=rate)
        # LBFGS' no-progress tests, on the largest change of a parameter and of the objective
        full_change = float((p.abs() * lr).max())
        if rate == 0.0:
            st["damping"] = _bounded(
                st["damping"] * (self.damping_increase if self.adapt_damping else 1.0), self
            )
            if trial_non_finite:
                what = "a trial loss (CG backtracking or line search)"
                return self._reject(
                    st, finish, StepStatus.NON_FINITE_TRIAL_LOSS, what, grow=False, **info
                )
            if full_change <= tolerance_change:  # even the full step would not move anything
                return finish(StepStatus.CONVERGED, **info)
            return finish(StepStatus.LINE_SEARCH_FAILED, **info)
        if rate * full_change <= tolerance_change or abs(f_new - f0) < tolerance_change:
            return finish(StepStatus.CONVERGED, accepted=True, loss_after=f_new, **info)
        return finish(StepStatus.ACCEPTED, accepted=True, loss_after=f_new, **info)

    def _reject(
        self,
        st: dict,
        finish: Callable,
        status: StepStatus,
        what: str,
        *,
        grow: bool = True,
        **kw,
    ) -> Tensor:
        """Leave the parameters as they are, grow λ, count the failure, warn or raise."""
        st["failures"] += 1
        if grow:
            st["damping"] = _bounded(st["damping"] * self.damping_increase, self)
        if st["failures"] >= self.max_failures:
            raise FloatingPointError(
                f"HessianFree: {st['failures']} consecutive steps had a non-finite value (this "
                f"one in {what}); the parameters were left unchanged each time "
                f"(max_failures={self.max_failures}). Check the model and data for NaN/Inf, "
                "lower the learning rate or raise `damping`."
            )
        warnings.warn(
            f"HessianFree: non-finite value in {what}; step rejected, parameters unchanged, "
            f"damping raised to {st['damping']:.3g}.",
            RuntimeWarning,
            stacklevel=4,  # _reject <- step <- torch.optim wrapper <- caller
        )
        return finish(status, **kw)

    def _first_call(
        self, closure: Closure, role: str, counter: _Counter, layout: ParamLayout
    ) -> _Evaluation:
        """A step's graph-building call of ``closure``, with two checks around it.

        Data whose dtype (or device, or features) does not match the parameters gets the
        operators' hint instead of torch's bare message. The first call of each closure role
        over the optimizer's life runs with a global forward pre-hook that records train-mode
        BatchNorm and Dropout modules (their autograd nodes cannot tell: CPU dropout is a plain
        ``MulBackward0`` and InstanceNorm uses the batch-norm kernel); one warning in all.
        """
        watch = role not in self._watched
        try:
            with _stochastic_modules() if watch else contextlib.nullcontext([]) as found:
                ev = self._call(closure, counter, build_graph=True, contract_a=False)
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError) or not _MISMATCH.search(str(err)):
                raise
            raise ValueError(
                f"The {role} passed to HessianFree.step failed: {err}. {_INPUT_MISMATCH_HINT} "
                f"The parameters are {layout.dtype} on {layout.device}."
            ) from err
        if watch:
            self._watched.add(role)
            if found and not self._warned_stochastic:
                self._warned_stochastic = True
                names = [kind.__name__ for kind in found]
                running = any(issubclass(kind, _BatchNorm) for kind in found)
                dropout = not all(issubclass(kind, _BatchNorm) for kind in found)
                warnings.warn(
                    f"HessianFree: the {role} ran {_stochastic_modules_message(names)}"
                    + (
                        ", and every trial evaluation (backtracking, line search) updates "
                        "BatchNorm's running statistics"
                        if running
                        else ""
                    )
                    + ". Call model.eval() for the curvature (before step(), or inside a "
                    "`curvature_closure`)"
                    + (", or reuse one fixed dropout mask per step." if dropout else "."),
                    UserWarning,
                    stacklevel=4,
                )
        return ev


@contextlib.contextmanager
def _stochastic_modules() -> Iterator[list[type]]:
    """Record (by class) the train-mode BatchNorm/Dropout modules run inside the block."""
    found: list[type] = []

    def hook(module: torch.nn.Module, args: object) -> None:
        if _is_stochastic(module) and type(module) not in found:
            found.append(type(module))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


def _same(t: Tensor) -> Tensor:
    return t


def _bounded(lam: float, opt: HessianFree) -> float:
    return min(max(lam, opt.min_damping), opt.max_damping)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}.")
    return value


def _unpack(
    result: object,
) -> tuple[Tensor, Tensor | tuple[Tensor, ...] | None, Tensor | None]:
    """Split a closure's return into ``(loss, outputs or residual blocks or None, hidden)``."""
    outputs = hidden = None
    if isinstance(result, (tuple, list)):
        if len(result) not in (2, 3):
            raise TypeError(
                "The closure must return a loss, (loss, outputs), (loss, (r_1, ..., r_K)) or "
                f"(loss, outputs, hidden), got a {type(result).__name__} of length {len(result)}."
            )
        result, outputs, *rest = result
        hidden = rest[0] if rest else None
        if isinstance(outputs, (tuple, list)):
            if not outputs:
                raise TypeError("The closure's residual blocks must be a non-empty tuple.")
            for k, r in enumerate(outputs):
                if not isinstance(r, Tensor):
                    raise TypeError(
                        f"The closure's residual block {k} must be a tensor, got "
                        f"{type(r).__name__}."
                    )
            outputs = tuple(outputs)
        for name, t in (("outputs", outputs), ("hidden states", hidden)):
            if t is not None and not isinstance(t, (Tensor, tuple)):
                raise TypeError(f"The closure's {name} must be a tensor, got {type(t).__name__}.")
    if not isinstance(result, Tensor) or result.numel() != 1:
        shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        raise TypeError(
            f"The closure must return a scalar loss tensor (or (loss, outputs)), got {shape}."
        )
    return (result if result.dim() == 0 else result.reshape(())), outputs, hidden


def _reduction_of(loss: Tensor, outputs: Tensor) -> str:
    """'sum' if the loss node says so (MSE/CE/BCE), else 'mean' (PyTorch losses' default)."""
    node = loss.grad_fn
    return (
        "sum"
        if getattr(node, "_saved_reduction", None) == 2 and loss_hessian_product(loss, outputs)
        else "mean"
    )
