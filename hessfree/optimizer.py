r"""Martens-style Hessian-free optimization as a ``torch.optim.Optimizer``.

Notation: :math:`\theta` the parameters (all param groups together), :math:`f` the objective on
the gradient batch including the L2 term :math:`\tfrac12\sum_k\kappa_k\|\theta_k\|^2` of each
group's ``weight_decay`` :math:`\kappa_k`, :math:`g = \nabla f`, :math:`C` the curvature
(Gauss-Newton by default, plus :math:`\kappa`) on the curvature batch, :math:`B = C + \lambda I`
the damped curvature (:math:`C + \lambda D` with Marquardt's diagonal :math:`D` under
``damping_metric='marquardt'``),
:math:`q_\theta(p) = f(\theta) + g^\top p + \tfrac12 p^\top C p` the undamped quadratic model
and :math:`\rho` the reduction ratio.

One :meth:`HessianFree.step` (Martens 2010, §4 and Algorithm 1; the reference MATLAB code), in
phases named as the methods that run them:

1. *Evaluate* (``_evaluate_and_solve``): loss, gradient and the curvature products' graph at
   :math:`\theta` from **one** closure call (the first-order graph is reused by every product).
   ``torch.optim.LBFGS``'s first-order test ends the step here: :math:`\max_i |g_i| \le`
   ``tolerance_grad`` → ``'converged'``.
2. *Solve* (``_solve``): truncated preconditioned CG on :math:`Bp = -g` (:func:`hessfree.cg`),
   warm-started from ``cg_decay`` × the previous step's *final* CG iterate (§4.5; 0.95 in the
   reference code and by default, for every curvature), stopping by the relative-progress rule
   (§4.4) or once :math:`\|r\| \le \eta_k\|g\|` with the inexact-Newton forcing term
   :math:`\eta_k` (Eisenstat & Walker 1996), the latter
   only at an iterate with :math:`\phi < 0` (a warm start whose residual is small but which is
   uphill on this step's model is iterated on, not returned: ``descent_stop``); with the
   (indefinite) Hessian also where its path leaves the trust radius :math:`\|p\| \le \Delta`
   (Steihaug 1983; ``trust_radius``), and (``cg_stop_on_increase``, ours) once the objective
   on the gradient batch at a stored iterate is not below the previous stored one's (a
   forward evaluation each, reused by backtracking). If CG ends, from a warm start, at no
   descent direction (:math:`g^\top p \ge 0`: the step would be rejected), it is run again
   from zero, where every iterate descends (ours). The graphs are freed after this phase
   (structural damping's curvature graph after phase 4's one product with it).
3. *Backtrack* (§4.6, :func:`hessfree._line_search.backtrack`): from the last stored iterate
   walk back while the objective on the gradient batch decreases.
4. *Reduction ratio and damping* (``_predicted_change``, :class:`hessfree.damping.DampingPolicy`):
   :math:`\rho` of the backtracked step with the undamped model, read off CG's :math:`\phi` (no
   extra product; with structural damping, one Jacobian product :math:`J_h p` at that step);
   Levenberg-Marquardt update of :math:`\lambda` (Nielsen's rule by default,
   §4.1's on request), except where the actual and the predicted change are both below the
   objective's float resolution (:func:`hessfree.damping.below_resolution`, ours): there
   :math:`\rho` measures rounding, so :math:`\lambda` stays, nothing moves and the step is
   ``'converged'`` (``StepInfo.converged_by == 'float_resolution'``) after about two closure
   calls, unless the damping's share of the model, :math:`\tfrac12\lambda\|p\|^2`, exceeds
   the curvature's, :math:`\tfrac12 p^\top C p`: then :math:`\lambda`, not the loss's floor,
   kept the step that short, so :math:`\lambda` is lowered as after :math:`\rho = 1` and the
   step is ``'line_search_failed'`` (a large given or climbed :math:`\lambda` would otherwise
   never move again); and unless the model at :math:`\lambda`'s floor, solved without the
   forcing term or trust radius, finds negative curvature or a decrease above the resolution
   (``_floor_check``, once per point): then the step is taken as after :math:`\rho = 1`;
   with ``trust_radius``, :math:`\Delta \leftarrow t\|p\|` after phase 5 accepted a rate
   :math:`t < 1`, the smallest rate tried times :math:`\|p\|` after it failed, else
   :math:`2\|p\|` when backtracking walked back, doubled after a step on the sphere with
   :math:`\rho > 3/4`, lifted (:math:`\infty`) after a full step inside the ball with
   :math:`|\rho - 1| \le 0.1` before any negative curvature (:math:`\Delta_0 = \|g\|/s`).
5. *Line search* (``_line_search``, :func:`hessfree._line_search.armijo`): Armijo backtracking
   on the backtracked step (the reference code's: :math:`c = 10^{-2}`, rate × 0.8, up to 60
   tries, none whose first-order decrease :math:`t|g^\top p|` is within the float resolution:
   ours), else the step is rejected; after an accepted full step with :math:`\rho > 1.05` on a
   deterministic objective, rates 2, 4, ... while the objective keeps falling
   (``extrapolate``, ours). A search on an objective seen deterministic that failed down to
   that resolution limit, where the smallest rate's deviation from the model shows the loss's
   rounding noise :math:`\sigma > 2\delta` (``_measure_noise``, ours), has the next step at
   that point solve the model at :math:`\lambda`'s floor after its own CG
   (``_noise_check``): where that predicts no more than :math:`\sigma`, the step is
   ``'converged'`` (``converged_by='rounding_noise'``) before phases 3-5, nothing moves,
   :math:`\lambda` stays, and later steps at that point stop after their first closure call.
   A step that changed the objective by less than
   ``tolerance_change``, or every parameter by at most that, is ``'converged'`` (LBFGS's
   no-progress tests; ours, not the paper's) and was still applied (``accepted``): LBFGS ends
   one ``step()`` call of up to ``max_iter`` iterations on them and goes on at the next.

Where our defaults differ from the paper: initial ``damping='auto'`` calibrates :math:`\lambda`
from the curvature along the gradient at the first step (:func:`hessfree.damping.calibrate_damping`;
the reference uses a fixed 45 on its own loss scaling); Nielsen's smooth update of
:math:`\lambda` instead of §4.1's thresholds, and CG's residual stop from the Eisenstat-Walker
forcing sequence instead of a fixed tolerance (both measured in ``experiments/README.md``;
η = 0, at most 25 CG iterations and no objective check on steps with structural damping,
which is on, μ = 0.03, wherever the closure returns hidden states:
``structural_damping='auto'``); no
diagonal preconditioner by default (``precond='martens'`` turns §4.7's on) but K-FAC's
(Martens & Grosse 2015) on the ``nn.Linear`` layers of ``(loss, outputs)`` closures and a
randomized Nyström one for residual-block closures (``precond='auto'``); a trust radius on
CG's step with the Hessian (``trust_radius``); the curvature batch is whatever
``curvature_closure`` evaluates (the reference cycles through quarter-size chunks).

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
  hooked for the duration of that call and restored, also on error; calls from other threads
  pass through unchanged), and evaluation calls run the closure's backward too, which costs one
  backward pass per evaluation that the other styles avoid.

Dropout and train-mode BatchNorm make every closure call a different function; the first call
of each closure is watched for such modules and a warning says so once, as the SciPy operators
refuse them. BatchNorm's running statistics move once per step, in the closure's call at
:math:`\theta`: trial evaluations and a ``curvature_closure`` leave them as they found them,
and a step that raises, or whose loss at :math:`\theta` is not finite, puts that call's update
back; other buffers a forward writes (``spectral_norm``'s power iteration in place, a running
average rebound as ``self.avg = ...``, also by a parent on a child it does not call,
``self.child.avg = ...``) likewise, with :math:`f(\theta)` measured once more as the trials
see it (warned). A buffer written *in place* on a module no forward calls is not seen: the
watch is a forward pre-hook, and only a rebinding passes torch's buffer-registration hook.
Which buffers those are is learned from each step's call at :math:`\theta`, by weak
reference: a copy or a loaded optimizer learns them again in its first step's call, before
that step's trials. Under
``replay_rng=True`` (the default) the model calls share one random draw and the trials another
(:mod:`hessfree._rng`), and Dropout alone is not warned about.

Where the parts live: this module holds :class:`HessianFree`'s interface (arguments, param
groups, state dict) and the step's phases (evaluate, solve, backtrack, line search); its mixins
hold the rest, each with the constants it reads: :mod:`hessfree._closure` (calling the
closure, reading its styles, the first call's checks), :mod:`hessfree._precond_choice` (which
preconditioner CG runs with, and its state), :mod:`hessfree._damping_control` (λ, its floors,
the local phase and the trust radius); :mod:`hessfree._step_types` holds :class:`StepInfo`,
:class:`StepStatus` and the step's own records.

References:
    Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.
    Nocedal & Wright (2006), Numerical Optimization, 2nd ed., §3.1 (Armijo), §4 (trust region)
    and §7.1 (inexact Newton).
    Nielsen (1999), Damping parameter in Marquardt's method, IMM-REP-1999-05, DTU.
    Eisenstat & Walker (1996), Choosing the forcing terms in an inexact Newton method, SIAM J.
    Sci. Comput. 17(1).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import damping as _damping
from ._checks import caller_stacklevel, check_number, check_reaches_params, closest_name
from ._closure import Closure, _bounded_outer_gradient, _ClosureCalls, _restore_buffers
from ._damping_control import _DampingControl, _loss_probe, _structural_weight
from ._flat import LOW_PRECISION, ParamLayout, dot
from ._line_search import armijo, backtrack
from ._line_search import extrapolate as _extrapolate
from ._precond_choice import (
    _BUILT_IN_PRECONDS,
    _discovering_kfac,
    _hook_mask,
    _masked_precond,
    _PreconditionerChoice,
    _same,
)
from ._rng import StepStream, _batch_seed
from ._settings import (
    _AUTO_CG_MAX_ITER,
    _KFAC_DETERMINISTIC_CG_MAX_ITER,
    _KFAC_STOCHASTIC_CG_MAX_ITER,
    _SD_CG_MAX_ITER,
    HFSettings,
)
from ._step_types import (
    _ENDS_A_CALL,
    _NON_FINITE,
    Convergence,
    StepInfo,
    StepStatus,
    _AtChosen,
    _Evaluation,
    _Solution,
    _StepRun,
)
from ._types import MatVec
from .acceleration import Accelerated, ProductPolicy, accelerate, capture_stream
from .cg import CGResult, CGStop, cg, forcing_term, relative_forcing_term
from .curvature import (
    CurvatureProduct,
    FisherProduct,
    GGNProduct,
    HessianProduct,
    MCFisherProduct,
    StructurallyDampedGGN,
    _read_reduction,
)
from .distributed import Averager
from .preconditioning import (
    EmpiricalFisherDiagonal,
    KFACPreconditioner,
    NystromPreconditioner,
    PrecondContext,
    _LinearPass,
)

__all__ = ["Convergence", "HessianFree", "StepInfo", "StepStatus"]

#: ``extrapolate``: a full step is doubled only when its :math:`\rho` exceeds this (the model
#: under-predicted the decrease clearly: ρ ≈ 1.26 for Newton on a loss like exp(-t); with
#: ρ ≈ 1 the trials failed and cost an evaluation each), at most this many times.
_EXTRAPOLATE_RHO = 1.05
_EXTRAPOLATE_MAX = 10
#: ``structural_damping='auto'``: μ where the curvature closure returns hidden states (Martens &
#: Sutskever 2011, §3.3, and ``configs/rnn_addition.yaml``).
_AUTO_STRUCTURAL_DAMPING = 0.03

#: Other torch optimizers' hyperparameters: in a param group they would be silently ignored
#: (``add_param_group``) or mark another optimizer's state dict (``load_state_dict``). Any other
#: extra key (a user's tag, a scheduler's ``initial_lr`` or ``swa_lr``) is kept, as torch does.
_FOREIGN_GROUP_KEYS = frozenset(
    (
        *("momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "alpha", "centered"),
        *("lr_decay", "initial_accumulator_value", "rho", "lambd", "etas", "step_sizes"),
        *("history_size", "line_search_fn"),  # LBFGS (max_iter, max_eval: ours too)
        *("maximize", "foreach", "fused", "capturable", "differentiable"),
        "decoupled_weight_decay",
    )
)
#: ``torch.optim.LBFGS``'s arguments that HessianFree has no use for, and why (the rest of
#: LBFGS's, ``lr``, ``max_iter``, ``max_eval`` and the tolerances, mean the same here).
_LBFGS_ONLY = {
    "history_size": "the number of past steps LBFGS's curvature estimate keeps; HessianFree "
    "computes curvature products afresh each step and keeps no history",
    "line_search_fn": "LBFGS's line search; HessianFree backtracks over CG's iterates, then "
    "runs its own (`line_search='armijo'`, the default, or None)",
}

#: Whether torch.compile is tracing this call (torch >= 2.3; never before)
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _unknown_argument_message(key: str, value: object) -> str:
    """The TypeError for a keyword argument HessianFree does not take."""
    if key == "maximize":
        # torch's optimizers take it; the closest name, `max_iter`, is no fix ("unseen14")
        return (
            f"HessianFree got `maximize`={value!r}, which torch.optim's first-order optimizers "
            "take: HessianFree always minimizes. Drop the argument, and to maximize an "
            "objective make the closure return its negative (e.g. a negative log-likelihood)."
        )
    if key in _LBFGS_ONLY:
        return (
            f"HessianFree got torch.optim.LBFGS's `{key}`={value!r}: {_LBFGS_ONLY[key]}. "
            "Drop the argument; the LBFGS loop itself works unchanged."
        )
    close = closest_name(key, HFSettings.keys())
    hint = f" Did you mean `{close}`?" if close else ""
    return (
        f"HessianFree got an unexpected keyword argument `{key}`={value!r}.{hint} Its "
        f"arguments: params, {', '.join(HFSettings.keys())}."
    )


class HessianFree(_ClosureCalls, _PreconditionerChoice, _DampingControl, torch.optim.Optimizer):
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
            ``'hessian'``, ``'fisher'`` (empirical Fisher: a mean over dim 0 of the outputs,
            :math:`\tfrac1N \sum_i g_i g_i^\top`, or a sum where the loss's graph says so: a
            torch loss's ``reduction``, or a ``.sum()``/``.mean()`` over the examples, each
            times a constant, ``.sum() / N`` a mean; other losses are taken for a mean, with
            one warning: pass ``lambda loss, outputs, params: FisherProduct(loss, outputs,
            params, reduction='sum').matvec`` for a sum; not for residual blocks),
            ``'fisher_mc'`` (the Monte-Carlo Fisher, :class:`~hessfree.MCFisherProduct` with
            one label per example drawn from the model's predictive distribution at every
            step, from the optimizer's generator (``seed``; data parallel with sharded
            curvature batches, from a generator seeded by ``seed``, the step and the rank, so
            that the shards' labels are independent); cross-entropy, MSE or BCE-with-logits
            losses of one outputs tensor) or a callable ``(loss, outputs, params) -> MatVec``
            returning flat ``v -> C v``.
        damping: Initial Tikhonov damping: ``'auto'`` (default) sets
            :math:`\lambda_0 = |g^\top C g| / g^\top D g` at the first step (one extra curvature
            product; scale-free, see :func:`hessfree.damping.calibrate_damping`), with
            :math:`D = I`, or :math:`I + (\mu/N) J_h^\top J_h` where structural damping is in
            effect (what :math:`\lambda` multiplies; one more Jacobian pass), or a number
            :math:`\lambda > 0` to use as given. Until the first step, :attr:`damping` is NaN.
        adapt_damping: Adapt :math:`\lambda` from :math:`\rho` after every step.
        damping_rule: How: ``'nielsen'`` (default; :math:`\lambda \leftarrow
            \lambda\max(1/3, 1 - (2\rho - 1)^3)` for :math:`\rho > 0`, else :math:`2\lambda`)
            or ``'martens'`` (§4.1's thresholds with ``damping_increase`` and
            ``damping_decrease``); see :func:`hessfree.damping.update_damping`. Measured on
            ``experiments/scorecard.py``'s tasks, Nielsen's smooth rule sheds an over-large
            :math:`\lambda` in a few steps instead of dozens. On an objective seen
            deterministic, ``'nielsen'`` also lowers :math:`\lambda` faster along a streak of
            steps with :math:`|\rho - 1| \le 0.1` whose damping dominated the model
            (:math:`\lambda\|p\|^2 > p^\top C p`): by :math:`\max(3^{1-s}, p^\top C p /
            \lambda\|p\|^2)` more on the :math:`s`-th (ours; ``experiments/README.md``,
            "fblam").
        damping_metric: What :math:`\lambda` multiplies: ``'identity'`` (default),
            :math:`B = C + \lambda I` (Levenberg; Martens 2010), or ``'marquardt'``,
            :math:`B = C + \lambda D` with :math:`D` the running maximum of
            :math:`\mathrm{diag}(G)` over the steps (Moré 1978's scaled Levenberg-Marquardt;
            :func:`hessfree.damping.marquardt_metric`), exact where the outputs have at most
            1024 entries, else from 8 Rademacher probes in the outputs' space
            (:meth:`hessfree.GGNProduct.diagonal`). CG, :math:`\lambda_0` (``'auto'``:
            :math:`|g^\top C g| / g^\top D g`), :math:`\rho`'s undamped model and the
            updates of :math:`\lambda` all use that :math:`D`, and CG runs in Moré's scaled
            variables :math:`y = D^{1/2}p` (its residual test and the forcing term's
            :math:`\|g\|` in them); then :math:`\lambda` is a pure number and the steps do
            not depend on each parameter's units (to rounding). For models whose
            parameters live on very different scales (a curve fit with amplitudes ~1e3 and
            rates ~1e-2: the identity's :math:`\lambda`, set by the stiffest direction,
            freezes the others). Needs Gauss-Newton curvature (``'auto'`` with outputs, or
            ``'ggn'``; refused with ``'hessian'``, ``'fisher'``, a callable, or
            ``structural_damping`` > 0, which ``'auto'`` then leaves off). A diagonal
            preconditioner (``precond='martens'``) includes :math:`\lambda D` exactly, K-FAC
            and Nyström the scalar :math:`\lambda\,\mathrm{mean}(D)`, so ``precond='auto'``
            is then none (the scaled variables are preconditioned by :math:`D` already; K-FAC
            under Marquardt ended two MLP fits at 1.8-5.8× the defaults' loss). Measured in
            ``experiments/README.md``, "jacscale".
        damping_increase: Factor > 1 applied when :math:`\rho < 1/4` under ``'martens'`` (3/2
            in the paper), and under either rule when a step is rejected.
        damping_decrease: Factor in (0, 1) applied when :math:`\rho > 3/4` under ``'martens'``
            (2/3 in the paper).
        min_damping: Lower bound on :math:`\lambda`: a number >= 0 (absolute), or ``'auto'``
            (default): :math:`10^{-8}\,|g_0^\top C g_0| / g_0^\top D g_0`, the curvature
            scale ``relative_min_damping`` starts from (its first measurement, not K-FAC's
            running maximum), where the optimizer has measured it (``damping='auto'`` does at
            the first step, ``relative_min_damping`` on the first stochastic one), else (a
            given ``damping`` on a deterministic objective, or a quotient of 0 or not finite)
            the absolute :math:`10^{-8}`. So the floor, and the
            trajectory, scale with the loss: full batch, a ``(loss, outputs)`` closure's
            parameters after 30 steps at loss × 1e3, × 1e-3 and ``reduction='sum'`` agree with
            × 1 to 2e-7 relative, against 0.26-0.40 with the absolute :math:`10^{-8}`, which
            :math:`\lambda` met within 13 steps (``tolerance_grad`` and ``tolerance_change`` 0:
            they stay absolute, as in ``torch.optim.LBFGS``; ``experiments/README.md``,
            "lamscale"). In float64 the fraction is :math:`10^{-8}\,\epsilon_{64}/\epsilon_{32}
            \approx 1.9 \times 10^{-17}` instead (a float64 least-squares fit had stalled on
            the float32 fraction; "unseenfb"). A given ``damping`` must still be >=
            :math:`10^{-8}` under ``'auto'``.
        max_damping: Upper bound on :math:`\lambda`: a number > ``min_damping`` (>
            :math:`10^{-8}` under ``'auto'``; the floor never exceeds it), or ``'auto'``
            (default): :math:`10^{10}\,|g^\top C g| / g^\top D g`, the curvature scale above
            (the latest measured, ``relative_min_damping``'s), where the optimizer has measured
            it, else the absolute :math:`10^{10}`. The absolute :math:`10^{10}` (the default
            before "unseen14") clipped :math:`\lambda` of a loss multiplied by
            :math:`2^{33}` or more and bent its trajectory (the parameters 0.05-3.2 relative
            from the unscaled run's after 30 steps, bitwise equal up to :math:`2^{30}`).
        relative_min_damping: A lower bound on :math:`\lambda` relative to the problem's own
            curvature scale, a fraction :math:`c \in [0, 1]`: :math:`\lambda \ge
            c\,|g_0^\top C g_0| / g_0^\top D g_0`, the Rayleigh quotient of
            ``damping='auto'`` (so :math:`c\lambda_0` under it) at the first step where
            :math:`c > 0` (one curvature product there if ``damping`` is a number; 0 when the
            quotient is not finite), and never below ``min_damping``, never above
            ``max_damping``. On K-FAC-preconditioned steps (``precond``) of an objective seen
            stochastic the quotient is measured again every 4th step (one product along that
            step's :math:`g`) and the scale is the largest so far: a ReLU CNN's grew 1,800-fold
            in 50 mini-batch steps, and with the first step's scale :math:`\lambda` at the
            floor let K-FAC steps fit each 100-case batch until the training loss rose; on a
            GRU/LSTM without K-FAC the same rule held :math:`\lambda` 10x higher and was 3x
            worse (``experiments/README.md``, "cnnmb"). On plain-CG steps it is refreshed only
            where the closure's starting loss (each step's on a fresh batch) rose over the
            last 16 steps by > 1 standard error: a CNN, a GRU classifier and a bag of words
            reached 0.29-0.58x the loss after 120 steps, where the GRU/LSTM regressions' runs
            stayed bitwise; after 400 steps noise had raised their floor (1.1-1.4x the loss,
            CNN 1.75x; GRU classifier 0.20x, bag of words 0.45x: "mbfloor").
            It scales with the loss, as ``min_damping='auto'`` does.
            ``'auto'`` (default): 0.01 on steps where the objective is seen stochastic (the
            closure's value at the start of a step differs from the previous step's at the
            same parameters, as ``extrapolate='auto'`` detects it; mini-batches), times
            :math:`(b_0/b)^{1.5}` on a batch grown past :math:`b_0` and :math:`b_0/b` on a
            smaller one, where the closure returns outputs: :math:`b` the step's cases
            (dimension 0 of the outputs, summed over residual blocks and over the ranks),
            :math:`b_0` those of the first floored step. The floor is there against fitting
            a batch's noise, whose variance falls as :math:`1/b`; on a growing batch it may
            fall faster, measured: on CURVES with a batch growing 0.3 % a step, a floor fixed
            at 0.01 left ``HessianFree(params)`` at 5.97x the tuned row's error, one falling
            as :math:`b_0/b` at 2.35x, as :math:`(b_0/b)^{1.5}` at 1.15x and as
            :math:`(b_0/b)^2` at 0.82x; on MNIST-1D's batch growing 10 % a step the square
            reached the first loss target 1.6x later than the others (its first whole-batch
            steps overshot) (``experiments/README.md``, "lead, stop 50", "lead, stop 51").
            On a fixed batch, and with a bare-loss closure, it is 0.01. It is 0 on a
            deterministic objective, so full-batch training runs bitwise as with 0 (no
            product either: ``damping='auto'`` computes the quotient anyway). When the
            floor lifts (a batch grown to the whole training set) :math:`\lambda` drops to the
            value the Levenberg-Marquardt rule would have reached without it, from the same
            :math:`\rho`. 0: no floor. What it is for: on mini-batches CG with
            :math:`\lambda` at ``min_damping`` fits the step's own batch, so late in a run the
            loss on the training set stalls or rises; the floor keeps those steps short. On
            the CURVES autoencoder (250/62 cases, ``experiments/README.md``, "lamfloor" and
            "release") :math:`c = 0.01` is :math:`\lambda \ge 0.28`; with no other argument
            the error at equal time fell to 0.84-0.97x that without the floor (three races); on
            deterministic objectives, and on MNIST-1D's growing batch, every step is bitwise
            as with 0. ``'auto'`` also raises a given ``damping`` that is then adapted; under
            ``adapt_damping=False`` it is 0 (a fixed :math:`\lambda` stays as given), and it
            is 0 on steps after a structurally damped one (``structural_damping`` in effect: a
            closure returning hidden states), whose :math:`\lambda\mu J_h^\top J_h` term and
            25-iteration cap already keep mini-batch steps short: on RNN addition the floor
            held :math:`\lambda` at 0.01-0.02 and the run on the initial plateau
            (``experiments/README.md``, "add50d").
            A number :math:`c > 0` floors every step, and on a deterministic objective stops
            the superlinear convergence that :math:`\lambda \to 0` gives.
            :attr:`StepInfo.damping_floor` reports the bound in effect.
        weight_decay: L2 coefficient :math:`\kappa` (per group), in gradient *and* curvature.
        structural_damping: :math:`\mu \ge 0` of Martens & Sutskever (2011, §3.3), or
            ``'auto'`` (default): 0.03, the paper's value for RNNs, on every step whose
            curvature closure returns ``(loss, outputs, hidden)`` with Gauss-Newton curvature,
            and 0 (off) otherwise, so a closure without hidden states runs as with 0 (products
            and steps bitwise). When on, CG's matrix gains
            :math:`\lambda\mu\,J_h^\top J_h / N` (:math:`N` = ``hidden.shape[0]`` examples),
            a Gauss-Newton penalty on changes of the hidden states, adapted with :math:`\lambda`
            and left out of :math:`\rho`'s undamped model. A number > 0 needs Gauss-Newton
            curvature and hidden states (else ``ValueError``); 0 turns it off.
            :func:`hessfree.record_hidden` collects ``hidden`` from ``nn.RNN``/``GRU``/``LSTM``
            layers (every layer and step) or from states marked by :func:`hessfree.mark_hidden`.
            ``hidden`` is read only from calls that build a graph: under ``torch.no_grad``
            (the extra loss evaluations) a closure may return ``(loss, outputs)`` and skip
            collecting the states. Why on by default: on RNN addition
            (``experiments/scorecard.py``, T = 30, 60 s) ``configs/rnn_addition.yaml`` without
            it stayed at test error 0.91-0.93 on 3 of 3 seeds, against 0.002-0.017 with it; it
            costs nothing where no hidden states are given
            (``experiments/results/2026-11-30-defaults-rnn.md``).
        cg_max_iter: Most CG iterations per step, or ``'auto'`` (default): 250, the reference
            code's, and 25 on steps where structural damping is in effect
            (``structural_damping``), where ``cg_stop_on_increase='auto'`` is off too. Why: on
            those steps CG runs with :math:`\eta = 0` (``cg_rtol``), and on an RNN's
            mini-batches a long solve fits the gradient batch rather than the training set
            (``configs/rnn_addition.yaml``: at T = 50 a cap of 100 had not solved addition in
            210 s, 50 solved it at 113-133 s, 25 at 70-77 s); the objective check cut the
            solves at about the same length but cost 4-5 extra forward passes of the gradient
            batch a step (closure calls 8-9 against 4-5). Measured on the addition task of
            ``experiments/scorecard.py`` (``experiments/_addition_combo.py``, interleaved, no
            other argument): at T = 50 (150 s, seed 0) the check with 250 left the plateau at
            151 s (test error 0.31 at the end), the cap of 25 without the check at 38 s, as the
            tuned config, and solved it (0.009); against the config, T = 50 was solved at 0.91x
            and 1.2x its time on seeds 1-2 and not in 150 s on seed 0 (0.051), T = 30 (60 s)
            at 1.0x, 1.2x and 1.5x on three seeds and not on one (0.033)
            (``experiments/README.md``). On a step preconditioned by K-FAC (``precond``
            ``'auto'``'s or ``'kfac'``, or a :class:`KFACPreconditioner`) of an objective seen
            stochastic (mini-batches, as ``extrapolate='auto'`` detects it), ``'auto'`` is 2:
            K-FAC's direction with a two-dimensional Krylov correction, the regime of the
            scorecard's tuned CURVES and MNIST-1D rows; K-FAC with 250 iterations or the cap
            without K-FAC each recovered at most a quarter of the defaults' gap to them
            (``experiments/README.md``, "ablate" and "kfac2"). On a K-FAC step of an objective
            seen deterministic (full batch) it is 5: MNIST-1D's full-batch defaults reached the
            scorecard's last loss target in 0.74-0.78x the time of the cap of 250, and 0.48x in
            the tuned batch schedule once the batch was the whole set, where those solves had
            run long at a small :math:`\lambda`; digits' time to 100 % training accuracy 0.98x
            (``experiments/README.md``, "wholebatch"). In the local phase of a deterministic
            objective with Gauss-Newton or Fisher curvature (:math:`\rho` within 1/4 of 1 at
            rate 1 and :math:`\lambda\|p\|^2 \le 10^{-3}\,p^\top C p` on three consecutive
            steps, until a step does not move) it is 250 and ``'auto'``'s K-FAC is dropped:
            plain CG, solved to ``cg_rtol``'s tighter :math:`\eta`. On a small-residual
            float64 fit (a 4-6-2 tanh MLP, teacher plus 1e-3 noise) f - f* went from 2.7e-6
            after 50 steps (K-FAC's 5-iteration steps, linear) to 9e-17 from step 39, 3.7-3.9x
            less CPU time to 2.4e-9 (strong-Wolfe L-BFGS stalled at 6.5e-8); digits, MNIST-1D
            (full batch and growing), CURVES, swap and addition never enter it (bitwise
            unchanged; ``experiments/README.md``, "gnquad"). A gradient batch that grows to the
            whole set can enter it once the objective is seen deterministic again, never
            while it is partial; a changed objective ends it (the same fit on a batch grown
            1.3x a step: f - f* 1.9e-8 f* at step 54, 2 f* before; "gnentry"). A number is
            used as given, on every step.
        cg_min_iter: CG iterations before the relative-progress stop may fire.
        cg_rtol: CG also stops when :math:`\|r\| \le \eta\|g\|`: ``'auto'`` (default) takes
            :math:`\eta` from the inexact-Newton forcing sequence of Eisenstat & Walker (1996,
            choice 2; :func:`hessfree.cg.forcing_term`): 1/2 at the first step, then
            :math:`0.9(\|g_k\|/\|g_{k-1}\|)^2` with their safeguard, so CG solves loosely while
            the gradient falls slowly and tightly as it falls fast (scale-free; measured on
            ``experiments/scorecard.py``'s tasks: fewer products per step, faster to every
            target; ``StepInfo.cg_rtol`` reports the :math:`\eta` used). On steps where the
            objective is seen deterministic from the start (one function: the closure's value
            at the start of a step equals the previous step's at the same parameters; a batch
            grown to the full set keeps the sequence above) :math:`\eta =
            \min(1/2, \sqrt{\|g_k\|/\|g_1\|})` instead (:func:`hessfree.cg.relative_forcing_term`;
            Dembo & Steihaug 1983, scale-free; :math:`g_1` the first such step's gradient): on a
            non-convex loss :math:`\|g\|` does not fall step to step, so the Eisenstat-Walker
            ratio kept :math:`\eta` at 1/2 for hundreds of steps (swap task, 5 initialisations:
            0.69-0.86x the defaults' gradient equivalents to the same loss on 4, 1.18x on one,
            geometric mean 0.82; MNIST-1D, digits and a regression MLP 0.98-1.03x;
            ``experiments/README.md``, fbdefaults). In the local phase (``cg_max_iter``) it
            is :math:`\min(\eta, \|g_k\|/\|g_1\|)` (after a grown batch :math:`\|g_1\|` is
            the first step's), the forcing term of quadratic local
            convergence (Dembo, Eisenstat & Steihaug 1982): with :math:`\sqrt{\|g_k\|/
            \|g_1\|}` kept, the local phase left the small-residual fit at 5.4e-7 after 50
            steps, with the smaller :math:`\eta` at 9e-17 from step 39 ("gnquad"); a number
            :math:`\ge 0` is a fixed :math:`\eta` (1e-10 before). On mini-batches the ratio
            compares two batches' gradients, noise around 1, so :math:`\eta` stays near 1/2:
            right for MNIST-1D's growing batches and CURVES (a step is then about the warm
            start plus a few CG iterations; η = 0 whenever the objective is seen stochastic
            cost MNIST-1D's growing batches 1.07-6.4x), wrong for an RNN, where the residual
            test ends CG after 0-2 iterations. So on steps where structural damping is in
            effect (``structural_damping``), ``'auto'`` is :math:`\eta = 0`, Martens &
            Sutskever's CG: the relative-progress stop, the objective check and
            ``cg_max_iter`` end it. With the forcing term there, :math:`\rho \approx 1` after
            every loose solve drove :math:`\lambda`, and with it the structural term
            :math:`\lambda\mu`, to ``min_damping``: on RNN addition (T = 30, 60 s, 4 seeds,
            no other argument) the defaults with structural damping and η = 0 ended at test
            error 0.03-0.79, with the forcing term at 0.10-0.93, without structural damping at
            0.92-0.94 (``experiments/results/2026-11-30-defaults-rnn.md``; the tuned config
            0-0.06; since ``cg_max_iter='auto'`` caps those steps at 25 iterations without the
            objective check, see there).
        cg_progress_tol: :math:`\epsilon` of the relative-progress stop (5e-4, §4.4).
        cg_decay: Warm-start decay in [0, 1] (0.95 in the reference code; 0 = cold start), or
            ``'auto'`` (default): 0.95 for every curvature. For the exact Hessian it was 0
            (cold) until the two safeguards below existed: with an indefinite Hessian a warm
            start can put CG where the model is poor, and negative curvature then returns an
            iterate that is no descent step (from a cold start the iterate before negative
            curvature always is; Steihaug 1983). With them, warm starts for the Hessian reached
            a lower loss at equal time on 14-15 of 16 tanh-MLP regressions run as
            ``torch.optim.LBFGS``-style loops, in three interleaved runs of 3-6 s (geometric
            mean 0.43-0.5x the cold runs' loss; over the first quarter of the budget 8-12 of 16;
            ``experiments/_warm_start_study.py``, ``experiments/README.md``).
            A warm start is never CG's answer unless it is
            downhill on this step's model (:math:`\phi(x_0) < 0`; :func:`hessfree.cg`'s
            ``descent_stop``): on mini-batches with :math:`\lambda` at its floor, the previous
            solve's iterate often has a small residual on the next batch but points uphill, and
            CG returning it at once made 16 of 125 CURVES steps fail their line search.
            If a warm-started CG still ends at no descent direction (it stopped for another
            reason), it is run again from zero (its products count in
            ``StepInfo.cg_matvecs``): on CURVES 500/125 and the PINN reaction problem such
            steps had been ``line_search_failed``.
        cg_check_every: CG reads its stop tests back to the host every this many iterations
            (each read is a device synchronisation); ``None``: 1 on CPU, 8 on accelerators.
            Changes only how many products are spent after a stop, not the step.
        cg_stop_on_increase: Evaluate the objective (on the gradient batch, one forward
            evaluation) at each iterate CG stores for backtracking (iterations 5, 7, 9, 12,
            ...) and stop CG once it is not below the previous stored iterate's, that one
            having been below :math:`f(\theta_0)`; backtracking reuses these values. Where
            the damping is small, CG's late iterates follow the model far beyond where it
            holds, and backtracking then throws them away: this saves their products. ``'auto'``
            (default): on with ``backtrack``, except for closures that call ``backward()``
            themselves (each check would cost a backward pass). Measured in
            ``experiments/README.md`` (MNIST-1D full batch, CURVES mini-batch). On an RNN's
            mini-batches the batch loss rises between stored iterates before the ones that
            carry the long-range directions, and the check cut those solves (addition,
            ``cg_rtol=0``: test error 0.93 with it, 0.007-0.10 without in one seed; over three
            seeds 0.008-0.93 with it and 0.054-0.93 without, seed against seed; ``cg_rtol``).
            So ``'auto'`` is off on steps where structural damping is in effect, which are
            capped by ``cg_max_iter='auto'`` instead (25 iterations; the evidence is there).
        backtrack: CG backtracking over the stored iterates (§4.6).
        trust_radius: Bound CG's step by a radius :math:`\Delta` (Steihaug 1983): CG stops
            where its path leaves :math:`\|p\| \le \Delta` and returns the crossing point
            (``cg_reason`` ``'trust_radius'``), and a stop on negative curvature continues
            along that direction to the sphere. :math:`\Delta_0 = \|g\|/s` (:math:`s =
            |g^\top C g|/g^\top g`, the step :math:`-g/s`'s length); when the line
            search accepts a rate :math:`t < 1`, :math:`\Delta \leftarrow t\|p\|`; when it
            fails, :math:`\Delta \leftarrow t_{\min}\|p\|` with :math:`t_{\min}` the
            smallest rate tried; else when CG backtracking walks back from the
            final iterate (the model overshot), :math:`\Delta \leftarrow 2\|p\|` of the chosen
            step; when the step ended on the sphere with
            :math:`\rho > 3/4`, :math:`\Delta` doubles; a full step with
            :math:`|\rho - 1| \le 0.1` that ended inside the ball, before CG has met negative
            curvature, lifts it (:math:`\Delta = \infty`: a convex problem's first step ends
            inside :math:`\Delta_0`; ``experiments/README.md``, negdelta, negdelta2).
            ``'auto'`` (default): on for
            indefinite curvature (the Hessian), where :math:`\lambda` falls to ``min_damping``
            while nearly flat directions blow the late CG iterates up, so CG spends most of
            its products on iterates that backtracking then rejects; off for Gauss-Newton,
            Fisher and callable curvature. Measured in ``experiments/README.md``.
        extrapolate: After a full step (rate 1) accepted with :math:`\rho > 1.05`, try rates
            2, 4, ... (at most 10 doublings) while the objective keeps falling and keep the
            best, forward evaluations only; a worse or non-finite trial leaves the parameters
            at the best point. With ``adapt_damping``, :math:`\lambda` is then divided by the
            rate too (the damping kept the step that many times too short). On a saturating
            loss (a softmax fitting its training set) the loss behaves like :math:`e^{-t}`
            along the step, where the Gauss-Newton step only divides it by about :math:`e`.
            ``'auto'`` (default): only once the objective is seen to be deterministic, i.e.
            the closure's value at the start of a step equals (to a relative 1e-5) the
            previous step's ``loss_after`` at the same parameters; a mismatch (mini-batches,
            dropout, parameters changed between steps) turns it off, since a doubled step fits
            the batch it was measured on, not the next one, until three consecutive steps match
            again (a growing batch that has reached the whole training set; an ``lr`` other
            than 1 gives no evidence either way). ``True``: always (also on mini-batches);
            ``False``: never. Measured in ``experiments/README.md``.
        line_search: ``'armijo'`` or ``None``.
        armijo_c: Sufficient-decrease constant in (0, 1) (1e-2 in the reference code).
        line_search_shrink: Rate factor in (0, 1) (0.8 in the reference code).
        line_search_max_iter: Most rates tried (60 in the reference code).
        precond: ``'auto'`` (default): :class:`NystromPreconditioner` (rank 60, refreshed every
            10 steps) when the closure returns residual blocks ``(loss, (r_1, ..., r_K))`` and
            the curvature is Gauss-Newton (a PINN's Gauss-Newton matrix has eigenvalues over ~15
            decades in its first 200, where plain CG resolves only the top few dozen; measured
            in ``experiments/pinn.py``); ``'kfac'``'s K-FAC when it returns one outputs tensor
            ``(loss, outputs)`` without hidden states, the curvature is Gauss-Newton, the
            parameters are float32/64, the run is on one process (K-FAC's probes are drawn per
            rank) and the ``nn.Linear`` layers of the optimizer's parameters that run once in
            the closure hold at least half its parameter entries (a GRU or LSTM under a linear
            head does not: K-FAC's 2-iteration CG left it nearly unpreconditioned;
            ``experiments/README.md``, "unseen")
            (layers that run more than once, shared weights, are left out, and a later step
            that K-FAC refuses turns it off with a warning; measured on the scorecard's tasks
            in ``experiments/README.md``, "kfacauto"); else none.
            ``None``; ``'martens'`` (:class:`EmpiricalFisherDiagonal` with α = 3/4; needs
            ``(loss, outputs)`` closures); ``'nystrom'`` (:class:`NystromPreconditioner` for any
            positive semi-definite curvature, from batched products alone); ``'kfac'``
            (:class:`KFACPreconditioner` with rank 32, refreshed every 2 steps, on the
            ``nn.Linear`` layers found from the parameters alone (convolutions are left
            unpreconditioned: K-FAC on them too, KFC, was worse on three digits CNNs,
            ``experiments/README.md``, "kfacconv"; ``KFACPreconditioner(model,
            include_conv=True)`` opts in): while the optimizer makes its graph-building closure
            call, a global forward hook records each ``nn.Linear`` whose weight is the
            optimizer's (a bias it does not train, frozen, counts as none), and is removed
            afterwards, also on an error; the first step fixes the layers, and a step
            after one of their parameters was frozen (or a frozen bias unfrozen) finds them
            again with fresh factors; one
            that runs twice in a closure call raises
            ``ValueError``, as does finding none; its factors travel in :meth:`state_dict`);
            an instance of these classes (``KFACPreconditioner(model)`` hooks the model's
            layers itself); or a callable ``(PrecondContext) -> Tensor | MatVec`` giving the
            diagonal of :math:`M` or :math:`r \mapsto M^{-1}r` (a callable whose
            ``needs_outputs`` is False gets ``PrecondContext.curvature`` and ``.gradient``
            instead of outputs; one with a ``watch(matvec) -> matvec`` method, as
            :class:`CGPairPreconditioner`, gets CG's damped product wrapped by it).
        tolerance_grad: ``torch.optim.LBFGS``'s first-order optimality test: a step whose
            gradient has :math:`\max_i |g_i| \le` ``tolerance_grad`` (L2 term included)
            returns after one closure call with status ``'converged'``, nothing moved.
        tolerance_change: ``torch.optim.LBFGS``'s no-progress test: a step that changes the
            objective by less than ``tolerance_change`` or every parameter by at most
            ``tolerance_change`` is applied and reported ``'converged'``; so is a rejected step
            whose full length (× ``lr``) is at most ``tolerance_change`` in every parameter
            (e.g. :math:`\lambda` pinned at ``max_damping``). 0 turns these tests off (but
            for a zero step). As in LBFGS, whose ``step()`` call ends on them while the next
            call goes on, an accepted ``'converged'`` step moved the parameters and the next may
            move them again (on the scorecard's float32 swap regression the first came at step
            147, loss 5.6e-7, and the run went on to 1.8e-8 by step 695): a loop that stops at
            convergence should stop at a ``'converged'`` step that is not ``accepted`` (as
            ``hessfree run`` does). A step
            below the objective's float resolution is ``'converged'`` whatever the tolerances
            (``StepInfo.converged_by``), and so is a step at a point where a failed line
            search measured the loss's rounding noise above what the model offers
            (``'rounding_noise'``).
        max_iter: HF steps per :meth:`step` call, as ``torch.optim.LBFGS``'s ``max_iter`` is
            its iterations per call (so a loop that calls ``step`` once with
            ``max_iter=N``, as PINN codes do with LBFGS, trains for up to N steps). The
            default 1 is one HF step per call. A call ends early after a ``'converged'`` or
            ``'zero_lr'`` step, or once its steps have called the closure ``max_eval`` times;
            :attr:`last_step` and ``callback`` describe each step, and the call returns the
            loss at its start, as LBFGS's does.
        max_eval: The closure calls (curvature closure included) after which a :meth:`step`
            call starts no further step; None (default): no limit but ``max_iter``. An HF step
            calls the closure 2-5 times, so LBFGS's default of ``max_iter`` × 5/4 would cut
            ``max_iter`` short; it is not copied.
        max_failures: Consecutive steps with a non-finite value (loss, gradient, curvature
            product, or every trial loss rejected with one of them NaN/Inf) tolerated before
            ``FloatingPointError``; any other step resets the count.
        callback: Called with the :class:`StepInfo` after every step.
        seed: Seed of the optimizer's own generator (preconditioner probes, ``'fisher_mc'``
            labels); the optimizer never draws from the global RNG (``replay_rng`` only saves
            and restores its state).
        process_group: Average over this ``torch.distributed`` group (default: the default
            group when ``torch.distributed`` is initialised): the loss, the gradient, every
            curvature product, the preconditioner statistics and every trial loss are averaged
            with one collective each, so all ranks take the same step. Every rank counts
            equally; for unequal shards pass ``Averager(group, weight=n)`` (this rank's
            number of examples) instead of the group, to average as over the union (see
            :mod:`hessfree.distributed`).
        curvature_batch: ``'sharded'`` (each rank's curvature closure sees its own shard, so
            every product is averaged with one collective) or ``'replicated'`` (every rank's
            ``curvature_closure`` evaluates the same batch, so the products are equal on all
            ranks and need no collective: only the gradient, the losses and statistics from
            the gradient batch are averaged). Checked on the first step (two small
            collectives); the same in one process.
        products: How curvature products run (:class:`hessfree.ProductPolicy`, or a mapping
            of its fields): CUDA-graph replay and TF32/bf16 arithmetic, both off by default;
            CG's iterates and scalars keep the parameters' dtype (float32 for float16 ones:
            :func:`hessfree.cg`).
        replay_rng: Common random numbers within a step (default ``True``; ``False``: every
            closure call draws afresh). With ``True`` the state of torch's default generators (the
            CPU's, and once CUDA is initialised those of the CUDA devices holding parameters)
            is saved before the step's first closure call; the model calls (that one and a
            ``curvature_closure``'s) draw the same numbers, so dropout, ``torch.rand`` noise or
            stochastic depth give gradient and curvature one mask; the trial calls (CG's
            objective checks, backtracking, :math:`\rho`, the line search) all draw a second
            set, and :math:`f(\theta_0)` is evaluated once more under it (one extra forward
            pass per step), so :math:`\rho` and the line search compare two points of one
            function, on a mask the step was not fitted to. After the step the stream is where
            the first trial call left it. A closure that draws nothing from these generators
            runs bitwise as with ``False`` (no extra call). Each rank of a data-parallel run
            replays its own stream; the ranks agree each step whether any of them drew (one
            scalar all-reduce), so a closure that draws on some ranks only is fine. Draws from other
            generators (numpy, Python's ``random``, a ``torch.Generator`` of the caller's) are
            not replayed. On two dropout MLPs (digits) it cut the steps with
            :math:`\rho = -\infty` from 27-34 % to 1-8 %. Alone it made :math:`\rho` sit below
            ¼ once the mask noise dominated the gradient (:math:`\rho \to g_2^\top g_1 /
            \|g_1\|^2`) and :math:`\lambda` climbed without bound (a Dropout(0.3) MLP's loss
            frozen in 8 of 8 seeds); so a poor :math:`\rho` (or a rejection) whose deviation
            from the model is within the loss's mask noise, the RMS of :math:`f(\theta_0; m_1)
            - f(\theta_0; m_2)`, leaves :math:`\lambda` as it is. With that, on by default
            since "dropdefault": over steps 165-300 (8 seeds, median train loss) 0.66× the
            loss of fresh draws per call on the Dropout(0.3) MLP and 0.83× on a LayerNorm +
            Dropout(0.1) MLP (1.7× at 75 steps on the latter); one forward more per step.
            ``False`` gives the former behaviour.
            ``experiments/README.md``, "dropoutrng" and "dropdefault".

    Raises:
        ValueError: If a hyperparameter is out of range (the message names it), or no
            parameter that requires gradients has an element.
        TypeError: If a hyperparameter has the wrong type, or ``params`` is a module
            (pass ``model.parameters()``).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
        >>> x = torch.zeros(2, requires_grad=True)
        >>> opt = HessianFree([x], damping=1e-6)
        >>> def closure():
        ...     return 0.5 * x @ A @ x - x.sum()
        >>> for _ in range(3):  # CG solves loosely at first (cg_rtol='auto'), then tightly
        ...     loss = opt.step(closure)
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
        damping_rule: str = "nielsen",
        damping_metric: str = "identity",
        damping_increase: float = 1.5,
        damping_decrease: float = 2.0 / 3.0,
        min_damping: float | str = "auto",
        max_damping: float | str = "auto",
        relative_min_damping: float | str = "auto",
        weight_decay: float = 0.0,
        structural_damping: float | str = "auto",
        cg_max_iter: int | str = "auto",
        cg_min_iter: int = 1,
        cg_rtol: float | str = "auto",
        cg_progress_tol: float = 5e-4,
        cg_decay: float | str = "auto",
        cg_check_every: int | None = None,
        cg_stop_on_increase: bool | str = "auto",
        backtrack: bool = True,
        trust_radius: bool | str = "auto",
        extrapolate: bool | str = "auto",
        line_search: str | None = "armijo",
        armijo_c: float = 1e-2,
        line_search_shrink: float = 0.8,
        line_search_max_iter: int = 60,
        precond: str | EmpiricalFisherDiagonal | NystromPreconditioner | Callable | None = "auto",
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        max_iter: int = 1,
        max_eval: int | None = None,
        max_failures: int = 10,
        callback: Callable[[StepInfo], None] | None = None,
        seed: int = 0,
        process_group: object | None = None,
        curvature_batch: str = "sharded",
        products: ProductPolicy | Mapping | None = None,
        replay_rng: bool = True,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise TypeError(_unknown_argument_message(*next(iter(unknown.items()))))
        self.settings = HFSettings(
            lr=lr,
            curvature=curvature,
            damping=damping,
            adapt_damping=adapt_damping,
            damping_rule=damping_rule,
            damping_metric=damping_metric,
            damping_increase=damping_increase,
            damping_decrease=damping_decrease,
            min_damping=min_damping,
            max_damping=max_damping,
            relative_min_damping=relative_min_damping,
            weight_decay=weight_decay,
            structural_damping=structural_damping,
            cg_max_iter=cg_max_iter,
            cg_min_iter=cg_min_iter,
            cg_rtol=cg_rtol,
            cg_progress_tol=cg_progress_tol,
            cg_decay=cg_decay,
            cg_check_every=cg_check_every,
            cg_stop_on_increase=cg_stop_on_increase,
            backtrack=backtrack,
            trust_radius=trust_radius,
            extrapolate=extrapolate,
            line_search=line_search,
            armijo_c=armijo_c,
            line_search_shrink=line_search_shrink,
            line_search_max_iter=line_search_max_iter,
            precond=precond,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            max_iter=max_iter,
            max_eval=max_eval,
            max_failures=max_failures,
            callback=callback,
            seed=seed,
            process_group=process_group,
            curvature_batch=curvature_batch,
            products=products,
            replay_rng=replay_rng,
        )
        #: The preconditioner (``precond='martens'`` built as an :class:`EmpiricalFisherDiagonal`,
        #: ``'nystrom'`` as a :class:`NystromPreconditioner`).
        builders = {
            "martens": EmpiricalFisherDiagonal,
            "nystrom": NystromPreconditioner,
            "kfac": lambda: _discovering_kfac(auto=False),
        }
        self.precond = (
            builders[precond]() if isinstance(precond, str) and precond in builders else precond
        )
        # built for precond='auto': Nyström (residual blocks) or K-FAC (one outputs tensor)
        self._auto_precond: NystromPreconditioner | KFACPreconditioner | None = None
        # precond='kfac' and 'auto': the nn.Linear calls of the last graph-building closure call
        self._linear_pass: _LinearPass | None = None
        self._auto_kfac_off = False  # 'auto' found the closure unfit for K-FAC: stop recording
        self._avg = (
            process_group if isinstance(process_group, Averager) else Averager(process_group)
        )
        # Every plain hyperparameter lives in the defaults, as in LBFGS, so state_dict() carries
        # them; all but lr and weight_decay are one per optimizer (one quadratic model).
        defaults = self.settings.group_values()
        if isinstance(params, torch.nn.Module):
            # torch.optim's own message here is "'Net' object is not iterable"
            raise TypeError(
                f"`params` must be an iterable of tensors or of dicts (parameter groups), got "
                f"the module {type(params).__name__}; pass model.parameters()."
            )
        super().__init__(params, defaults)  # checks each group (add_param_group)
        self._group_view = self._shared_group_values()
        _check_trainable(self._params())
        self.last_step: StepInfo | None = None
        self._closure_uses_autograd = False  # set once a closure is seen to need autograd
        self._generator: torch.Generator | None = None
        self._reduction_warned = False  # curvature='fisher' warned of a loss it cannot read
        # Closure roles whose first call was watched for train-mode BatchNorm/Dropout.
        self._watched: set[str] = set()
        # their graph's top node types, walked for once-differentiable and compiled regions
        self._graph_kinds: dict[str, tuple[str, ...]] = {}
        self._warned_stochastic = False
        self._warned_buffers = False  # a closure's forward wrote module buffers (_buffer_writes)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group as ``torch.optim.Optimizer`` does, after checking it.

        Only ``lr`` and ``weight_decay`` may differ from the other groups (all groups form one
        quadratic model); the parameters must be real floating-point tensors.

        Raises:
            ValueError: For a value out of range, a shared setting that differs from the other
                groups', or a key HessianFree does not know (the group is not added).
            TypeError: For complex parameters or a value of the wrong type.
        """
        i = len(self.param_groups)
        if isinstance(param_group, dict):
            foreign = sorted(set(param_group) & _FOREIGN_GROUP_KEYS)
            if foreign:
                raise ValueError(
                    f"`param_groups[{i}]` has other optimizers' key(s) {foreign}, which "
                    f"HessianFree would ignore; its groups take 'params' and "
                    f"{', '.join(map(repr, HFSettings.GROUP_KEYS))} (only "
                    f"{' and '.join(map(repr, HFSettings.PER_GROUP))} may differ between groups)."
                )
        try:
            super().add_param_group(param_group)  # warns of duplicates, as torch does
        except ValueError as err:
            clearer = self._group_error(i, param_group, err)
            if clearer is None:
                raise
            raise clearer from err
        group = self.param_groups[i]
        group["params"] = list(dict.fromkeys(group["params"]))  # ... which would count twice
        try:
            self._check_group(i, group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _group_error(self, i: int, param_group: object, err: ValueError) -> ValueError | None:
        """torch's "can't optimize a non-leaf Tensor" and "some parameters appear in more than
        one parameter group", with the offending parameter named (torch normalized the group's
        ``'params'`` to a list before raising)."""
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if not isinstance(params, list):
            return None
        groups = self.param_groups
        seen = {id(q): (gi, k) for gi, g in enumerate(groups) for k, q in enumerate(g["params"])}
        for j, p in enumerate(params):
            if not isinstance(p, Tensor):
                continue
            name = f"`param_groups[{i}]['params'][{j}]` (shape {tuple(p.shape)})"
            if "non-leaf" in str(err) and not (p.is_leaf or p.retains_grad):
                return ValueError(
                    f"{name} is a non-leaf tensor: it was computed from other tensors "
                    f"(grad_fn={type(p.grad_fn).__name__}), so a step could not change it. Pass "
                    "the parameters themselves, e.g. model.parameters() (or a leaf made by "
                    "t.detach().requires_grad_())."
                )
            if "more than one parameter group" in str(err) and id(p) in seen:
                gi, k = seen[id(p)]
                return ValueError(
                    f"{name} appears in more than one parameter group: it is already "
                    f"`param_groups[{gi}]['params'][{k}]`; a parameter may be in one group only "
                    "(as in every torch.optim optimizer): remove it from one of them."
                )
        return None

    def _check_group(self, i: int, group: dict) -> None:
        for key in ("lr", "weight_decay", "tolerance_grad", "tolerance_change"):
            check_number(f"param_groups[{i}][{key!r}]", group[key], low=0.0)
        for j, p in enumerate(group["params"]):
            if p.is_complex():
                raise TypeError(
                    f"`param_groups[{i}]['params'][{j}]` is complex ({p.dtype}); HessianFree "
                    "needs real floating-point parameters: keep the real and imaginary parts "
                    "as two real parameters (torch.complex(re, im) in the model)."
                )
            if p.is_meta:  # torch.optim accepts it; the first step met "Tensor.item() ... meta"
                raise ValueError(
                    f"`param_groups[{i}]['params'][{j}]` (shape {tuple(p.shape)}) is on the "
                    "meta device, which holds no values: materialize the model first (e.g. "
                    "model.to_empty(device='cpu'), then initialize its weights) and build the "
                    "optimizer from its parameters."
                )
            self._check_damping_fits(i, j, p)
        reference = self.param_groups[0] if i > 0 else self.defaults
        for key in HFSettings.GROUP_KEYS:
            if key not in HFSettings.PER_GROUP and group[key] != reference[key]:
                raise ValueError(
                    f"`param_groups[{i}][{key!r}]` is {group[key]!r} but `{key}` is "
                    f"{reference[key]!r}; all groups form one quadratic model, so pass "
                    f"`{key}` to HessianFree instead of per group."
                )

    def _check_damping_fits(self, i: int, j: int, p: Tensor) -> None:
        """Refuse a numeric ``min_damping`` or ``damping`` above ``p``'s dtype's largest finite
        value: λ is at least the first from the first step (the second is λ there), and CG's
        first product adds λv in the parameters' dtype, where torch raised a RuntimeError
        ("value cannot be converted to type float without overflow") at the first step."""
        if not p.is_floating_point():
            return
        largest = torch.finfo(p.dtype).max
        for key, role in (("min_damping", "at least it from"), ("damping", "it at")):
            value = getattr(self.settings, key)
            if isinstance(value, numbers.Real) and math.isfinite(value) and value > largest:
                raise ValueError(
                    f"`{key}` = {value!r}: λ is {role} the first step, and CG adds λv "
                    f"in the parameters' {p.dtype} (`param_groups[{i}]['params'][{j}]`), "
                    f"which holds at most {largest:.4g}; use a smaller {key} or float64 "
                    "parameters."
                )

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``, plus ``'precond'``: a built-in
        preconditioner's state (K-FAC's factors and spectra, Nyström's sketch, their step
        counters), ``{'type': class name, 'state': ...}``, when the optimizer has one; K-FAC
        found by the optimizer (``precond='kfac'``, ``'auto'``) adds ``'layers'``: each
        layer's weight and bias as indices into the optimizer's parameters.

        A snapshot, unlike torch's optimizers' (whose per-parameter entries are the live state
        dicts and tensors): the state's tensors are copied (the warm start, one vector; the
        step updates it in place), so later steps do not change it and keeping one in memory
        needs no ``copy.deepcopy``.

        Post-hooks (``register_state_dict_post_hook``) run last, as torch runs them, so they
        see ``'precond'`` too."""
        with _hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            out = super().state_dict()
        out["state"] = {k: _copied(v) for k, v in out["state"].items()}
        precond = self._stateful_precond()
        if precond is not None:
            state = precond.state_dict()
            if getattr(precond, "_discovered", False):
                index = {id(p): i for i, p in enumerate(self._params())}
                held = [(m.weight, m.bias) for m in precond.layers]
                if any(id(p) not in index for pair in held for p in pair if p is not None):
                    # a parameter frozen since the last step: the next step fixes the layers
                    # again with fresh factors (KFACPreconditioner._observe); save that state
                    state, held = {"factors": None, "eigen": None, "calls": 0}, []
                state["layers"] = [
                    [index[id(w)], None if b is None else index[id(b)]] for w, b in held
                ]
            out["precond"] = {"type": type(precond).__name__, "state": state}
        for hook in post_hooks:
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as ``torch.optim.Optimizer`` does, hyperparameters included (as LBFGS does).

        A state dict from before a hyperparameter was stored in the groups gets this
        optimizer's value for it. The groups' values and the preconditioner's state are checked
        first: a state dict that is refused leaves the optimizer as it was. A built-in
        preconditioner (K-FAC, Nyström) gets the saved state, or starts afresh if there is none
        (a state dict of an older version). Pre-hooks (``register_load_state_dict_pre_hook``)
        run first, as torch runs them, so one may adapt a state dict saved for other
        parameters before it is checked; post-hooks run once everything is loaded. The
        vectors over the parameters (the warm start, Marquardt's diagonal) take the
        parameters' dtype, as torch casts its optimizers' buffers; every other state tensor
        keeps the dtype it was saved with (the generator's uint8 state, a loss probe in the
        outputs' dtype), so ``state_dict()`` after a load equals the dict loaded (into
        parameters of the saved dtype).

        Raises:
            ValueError: If ``state_dict`` is not a HessianFree state dict (keys missing, another
                optimizer's group keys), holds a value out of range, a warm start for other
                parameter shapes, or a preconditioner state that does not fit this optimizer's
                preconditioner (another kind, other layers or shapes, NaN/Inf).
            TypeError: If a value has the wrong type.
        """
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # shallow copy, as torch's
            for hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = hook(self, state_dict)
                if result is not None:
                    state_dict = result
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if not isinstance(groups, list | tuple) or "state" not in state_dict:
            raise ValueError(
                "`state_dict` must be a mapping with 'state' and 'param_groups' (as "
                f"HessianFree.state_dict() returns), got {type(state_dict).__name__}"
                + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, Mapping) else "")
                + "."
            )
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"`state_dict` has {len(groups)} param group(s) but this optimizer "
                f"{len(self.param_groups)}: it was saved for another model or group layout."
            )
        for i, (saved, group) in enumerate(zip(groups, self.param_groups, strict=True)):
            n = len(saved.get("params", ())) if isinstance(saved, Mapping) else None
            if n is not None and n != len(group["params"]):
                raise ValueError(
                    f"`state_dict['param_groups'][{i}]` holds {n} parameters in the state dict "
                    f"but {len(group['params'])} here: it was saved for another model or group "
                    "layout."
                )
        self._check_saved_layout(state_dict["state"])
        for i, saved in enumerate(groups):
            foreign = sorted(set(saved) & _FOREIGN_GROUP_KEYS) if isinstance(saved, Mapping) else []
            if foreign:
                raise ValueError(
                    f"`state_dict['param_groups'][{i}]` has key(s) {foreign} that HessianFree "
                    "does not use: is it another optimizer's state dict?"
                )
            if isinstance(saved, Mapping):
                # HFSettings' keys only: torch adds its own (differentiable, ...) to the defaults
                keys = HFSettings.GROUP_KEYS
                self.settings.replace(**{k: saved.get(k, self.defaults[k]) for k in keys})
        restore_precond = self._precond_loader(state_dict.get("precond"))
        with (
            _hooks_held(self, "_optimizer_load_state_dict_pre_hooks"),
            _hooks_held(self, "_optimizer_load_state_dict_post_hooks") as post_hooks,
        ):
            super().load_state_dict({k: v for k, v in state_dict.items() if k != "precond"})
        self._undo_dtype_casts(state_dict)
        for key, value in self.state.items():  # torch's load keeps the caller's tensors
            self.state[key] = _copied(value)
        restore_precond()
        for group in self.param_groups:
            for key in HFSettings.GROUP_KEYS:
                group.setdefault(key, self.defaults[key])
        self._current_settings()  # validate what was loaded
        self._ranks_checked = False  # every rank must have loaded the same: the next step checks
        for hook in post_hooks:
            hook(self)

    def _undo_dtype_casts(self, state_dict: dict) -> None:
        r"""Give the loaded state's tensors back the dtypes and values they were saved with.

        ``torch.optim.Optimizer.load_state_dict`` casts every tensor of a parameter's state,
        tuples' and lists' included, to that parameter's floating dtype (its accumulators are
        assumed to be the parameters' own): the generator's ``'rng_state'`` (uint8) came back as
        float32 and a float64 ``'phase_probe'`` (:math:`H_\ell u` of float64 outputs under
        float32 parameters) was rounded to float32 ("leftovers19"). The vectors over the
        parameters (:data:`_PARAMETER_SPACE_STATE`) keep torch's cast: a model converted between
        float32 and float64 gets its warm start in its new dtype, as SGD's momentum buffers.
        The device torch chose (the parameter's) is kept, except for ``'rng_state'``: a
        generator's state is a CPU tensor whatever its device.
        """
        saved_groups = state_dict["param_groups"]
        ids = chain.from_iterable(
            g.get("params", ()) if isinstance(g, Mapping) else () for g in saved_groups
        )
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(ids, params, strict=False))
        for key, saved in state_dict["state"].items():
            param = by_id.get(key)
            if param is None or not isinstance(saved, Mapping) or param not in self.state:
                continue
            loaded = self.state[param]
            for name, value in loaded.items():
                if name in saved and name not in _PARAMETER_SPACE_STATE:
                    cpu = name == "rng_state"
                    loaded[name] = _saved_dtypes(saved[name], value, cpu)

    def _check_saved_layout(self, saved_state: object) -> None:
        """Refuse a state whose warm start does not fit these parameters' shapes.

        The group check above compares counts only: a state saved for a model of as many
        parameters with other shapes (a wider hidden layer) loaded, and its warm start, a
        vector laid out for the old shapes, was dropped or misread at the next step, silently
        ("unseen18"; torch's own optimizers check counts only too). The warm start's length
        must be the number of entries of the parameters at the positions it was saved for
        (``'trained'``; all trainable ones if absent). Positions beyond these parameters (a
        state adapted by a load pre-hook for fewer parameters) are let through: the next step
        drops such a warm start (:meth:`_forget_other_layout`).
        """
        if not isinstance(saved_state, Mapping):
            return
        held = next(
            (s for s in saved_state.values() if isinstance(s, Mapping) and "damping" in s), None
        )
        x0 = None if held is None else held.get("warm_start")
        if not isinstance(x0, Tensor):
            return
        listed = [p for group in self.param_groups for p in group["params"]]
        positions = held.get("trained")
        if positions is None:  # saved before 'trained' existed: taken as it is (the step's rule)
            positions = [i for i, p in enumerate(listed) if p.requires_grad]
        elif not isinstance(positions, list) or any(
            not isinstance(i, int) or not 0 <= i < len(listed) for i in positions
        ):
            return  # positions that are not these parameters': the next step drops it
        unique = list({id(listed[i]): listed[i] for i in positions}.values())
        entries = sum(p.numel() for p in unique)
        if x0.numel() != entries:
            shapes = [tuple(p.shape) for p in unique]
            raise ValueError(
                f"`state_dict`'s warm start has {x0.numel()} entries, but the parameters it "
                f"belongs to have {entries} here (shapes {shapes}): it was saved for another "
                "model with as many parameters of other shapes. Load a state saved for this "
                "model, or start this optimizer afresh (no load). Nothing was loaded."
            )

    def __getattr__(self, name: str) -> object:
        """Read a hyperparameter as an attribute (``opt.cg_max_iter``).

        The param groups are the record (schedulers and users edit them, as in torch.optim):
        a group key reads the groups' current value, ``lr`` and ``weight_decay`` only while
        every group has the same; the others (``curvature``, ``precond``, ...) are
        ``self.settings``'s.
        """
        settings, groups = self.__dict__.get("settings"), self.__dict__.get("param_groups")
        if settings is None or name not in _SETTING_NAMES:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if groups and name in HFSettings.GROUP_KEYS:
            values = [group[name] for group in groups]
            if any(value != values[0] for value in values):
                raise AttributeError(
                    f"`{name}` differs between param groups ({values!r}); read "
                    f"`opt.param_groups[i][{name!r}]`."
                )
            return values[0]
        return getattr(settings, name)

    def __setattr__(self, name: str, value: object) -> None:
        """Refuse ``opt.cg_max_iter = 50`` and the like once built: the attribute reads the
        setting, but an assignment would only shadow it (the optimizer reads the groups).
        Real attributes (``opt.precond``, the preconditioner the steps use) stay assignable."""
        built = "_group_view" in self.__dict__  # set last in __init__, after self.precond
        setting = name in _SETTING_NAMES
        if built and setting and name not in self.__dict__:
            if name in HFSettings.GROUP_KEYS and name != "damping":
                raise AttributeError(
                    f"`opt.{name} = {value!r}` would not change HessianFree: its "
                    "hyperparameters live in the param groups, as in torch.optim; set "
                    f"`for group in opt.param_groups: group[{name!r}] = {value!r}`."
                )
            if name in ("damping", "initial_damping"):
                raise AttributeError(
                    f"`{name}` cannot be assigned: `opt.damping` is the current λ, which "
                    "the optimizer adapts; pass the initial one as HessianFree(damping=...)."
                )
            raise AttributeError(
                f"`{name}` is fixed at construction; build a new HessianFree(..., "
                f"{name}=...) instead (load_state_dict(old.state_dict()) carries the state)."
            )
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        """What ``copy.deepcopy`` and ``pickle`` keep: everything but the hooks (as torch).

        torch's ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and
        ``param_groups`` (its optimizers keep nothing else); HessianFree's settings,
        preconditioner and random generator must come along for the copy to step on.
        """
        hooks = [k for k in self.__dict__ if k.startswith("_optimizer_") and k.endswith("_hooks")]
        hooks.append("_grads_left")  # weak references to this process's .grad tensors
        hooks.append("_buffers_written")  # weak references to modules
        return {k: v for k, v in self.__dict__.items() if k not in hooks}

    def _shared_group_values(self) -> dict:
        group = self.param_groups[0]
        return {k: group[k] for k in HFSettings.GROUP_KEYS if k not in HFSettings.PER_GROUP}

    def _current_settings(self) -> HFSettings:
        """:attr:`settings`, re-validated if the groups' hyperparameters were changed.

        The param groups are the record (``state_dict``, ``load_state_dict``, edits such as
        ``opt.param_groups[0]['cg_max_iter'] = 50``), as in LBFGS; all groups share group 0's.
        """
        for i, group in enumerate(self.param_groups):  # lr/weight_decay edits (schedulers)
            for key in HFSettings.PER_GROUP:
                check_number(f"param_groups[{i}][{key!r}]", group[key], low=0.0)
        values = self._shared_group_values()
        if values != self._group_view:
            self.settings = self.settings.replace(**values)
            self._group_view = values
        return self.settings

    def _rank_settings(self, layout: ParamLayout) -> dict[str, object]:
        """What must be equal on every data-parallel rank, as plain values: the settings (an
        object such as a preconditioner or a curvature function by its type or name; not the
        callback, which may log on one rank only, nor the process group), each group's lr and
        weight_decay, the step count (ranks resumed from different checkpoints), and the
        parameters' count and dtype (a float32 and a float64 rank reduce buffers of different
        byte sizes: gloo fails or hangs in the gradient's collective)."""
        out: dict[str, object] = {"parameters": f"{layout.numel} entries of {layout.dtype}"}
        out |= {
            f.name: _plain(getattr(self.settings, f.name))
            for f in dataclasses.fields(self.settings)
            if f.name not in ("callback", "process_group")
        }
        for i, group in enumerate(self.param_groups):
            for key in HFSettings.PER_GROUP:
                out[f"param_groups[{i}][{key!r}]"] = _plain(group[key])
        out["step"] = self._global_state().get("step", 0)
        return out

    # ------------------------------------------------------------------------------ state
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _global_state(self) -> dict:
        """State shared by all groups, stored under the first parameter (as LBFGS does).

        The first that requires gradients: freezing it mid-training (or unfreezing one before
        it) moves the state to the new first one, instead of starting afresh there.
        """
        state = self.state[self._params()[0]]
        if "damping" not in state:
            held = next((s for s in self.state.values() if "damping" in s), None)
            if held is not None:
                state.update(held)
                held.clear()
                return state
            state["damping"] = self.settings.initial_damping
            state["step"] = 0
            state["failures"] = 0
        return state

    def _rng(self, device: torch.device) -> torch.Generator:
        state = self._global_state()
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.settings.seed)
            if "rng_state" in state:
                # load_state_dict casts state tensors to the parameters' dtype: undo that
                self._generator.set_state(state["rng_state"].to("cpu", torch.uint8))
        return self._generator

    def _mc_generator(self, device: torch.device) -> torch.Generator:
        """The generator of ``'fisher_mc'``'s labels. One process, or ranks that evaluate one
        replicated curvature batch (whose products must agree): the optimizer's own. Ranks with
        their own shards: one seeded by (``seed``, step, rank), so each shard's labels are
        drawn independently of the others' (the optimizer's generator, the same on every rank,
        gave every shard the same numbers: correlated labels, a noisier average) and a resumed
        step draws the same ones."""
        if self._avg.world_size == 1 or self.settings.curvature_batch == "replicated":
            return self._rng(device)
        seed = _batch_seed(self.settings.seed, self._global_state()["step"], self._avg.rank)
        return torch.Generator(device=device).manual_seed(seed)

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

    # ------------------------------------------------------------------------------ curvature
    def _curvature_product(
        self, evaluation: _Evaluation, params: list[Tensor], run: _StepRun
    ) -> tuple[MatVec, object]:
        """Build ``v -> C v`` (undamped, without weight decay) from an evaluation; set
        ``run.structural_damping`` to the μ in effect."""
        kind = self.settings.curvature
        if callable(kind):
            return _checked_curvature(kind(evaluation.loss, evaluation.outputs, params)), None
        if kind == "auto":
            kind = "ggn" if evaluation.outputs is not None else "hessian"
            if kind == "ggn" and self._gauss_newton_failed(evaluation, run):
                kind = "hessian"
        if kind in ("ggn", "fisher", "fisher_mc") and evaluation.outputs is None:
            raise ValueError(
                f"curvature={kind!r} needs the model outputs: make the closure return "
                "(loss, outputs), or use curvature='hessian'."
            )
        mu = self.settings.structural_damping
        if mu == "auto":  # Martens & Sutskever's μ wherever their term is defined, else off
            on = kind == "ggn" and isinstance(evaluation.outputs, Tensor)
            on = on and self.settings.damping_metric == "identity"  # one metric at a time
            mu = _AUTO_STRUCTURAL_DAMPING if on and evaluation.hidden is not None else 0.0
        run.structural_damping = mu
        self._global_state()["structurally_damped"] = mu > 0
        if isinstance(evaluation.outputs, tuple) and (kind in ("fisher", "fisher_mc") or mu > 0):
            what = f"curvature={kind!r}" if kind != "ggn" else "structural_damping > 0"
            raise ValueError(
                f"{what} needs one outputs tensor with examples along dimension 0, but the "
                "closure returned residual blocks (loss, (r_1, ..., r_K)); use curvature='ggn' "
                "(or 'auto') and structural_damping=0."
            )
        if mu > 0:
            if evaluation.outputs is None or evaluation.hidden is None:
                raise ValueError(
                    "structural_damping > 0 needs the closure to return (loss, outputs, hidden); "
                    "hessfree.record_hidden(model) collects hidden from the forward pass."
                )
            lam = self._global_state()["damping"]
            # damping='auto' before its calibration (NaN): products without the structural term
            weight = _structural_weight(lam, mu, evaluation.hidden)
            product = StructurallyDampedGGN(
                evaluation.loss,
                evaluation.outputs,
                evaluation.hidden,
                params,
                weight=weight,
                loss_hessian="absolute",
            )
        elif kind == "hessian":
            product = HessianProduct(
                evaluation.loss if evaluation.grads is None else None,
                params,
                grads=evaluation.grads,
            )
        elif kind == "ggn":
            # |H_ℓ| on a loss not convex in the outputs: CG needs a semidefinite G; blocks of
            # more entries per example once CG has shown the loss is not convex (bigblock)
            shown = self._global_state().get("loss_not_convex") is True
            product = GGNProduct(
                evaluation.loss,
                evaluation.outputs,
                params,
                loss_hessian="absolute",
                max_block=self._max_block_not_convex if shown else None,
            )
        elif kind == "fisher_mc":  # new labels every step
            generator = self._mc_generator(evaluation.outputs.device)
            product = MCFisherProduct(
                evaluation.loss, evaluation.outputs, params, generator=generator
            )
        else:
            reduction = _read_reduction(evaluation.loss, evaluation.outputs)
            if reduction is None:
                reduction = "mean"
                self._warn_unread_reduction(evaluation.loss, evaluation.outputs)
            product = FisherProduct(
                evaluation.loss, evaluation.outputs, params, reduction=reduction
            )
        return product.matvec, product

    #: The Gauss-Newton fallback (topics "gnfall", "first0"); class attributes for
    #: experiments/_gnfall.py and _first0.py. ``_gn_fallback`` (off: failed its gate): switch
    #: after ``_GN_FAIL_STEPS`` failing steps of the last ``_GN_FAIL_WINDOW``;
    #: ``_gn_first_test`` (on): withdraw the first step and switch when the exact Hessian has
    #: no positive curvature along its Gauss-Newton solution (one Hessian product, once; not
    #: for cross-entropy / BCE losses).
    _gn_fallback: ClassVar[bool] = False
    _gn_first_test: ClassVar[bool] = True
    _GN_FAIL_STEPS: ClassVar[int] = 4
    _GN_FAIL_WINDOW: ClassVar[int] = 6
    _gn_restart: ClassVar[bool] = True
    #: Topic "bigblock": after a Gauss-Newton solve stops on negative curvature, which a convex
    #: loss cannot give (:math:`G + \lambda I` is then positive definite up to rounding),
    #: ``state['loss_not_convex']`` (a bool) is set and later steps form |H_ℓ| blocks for up to
    #: this many outputs per example instead of 16 (ours; 64 from experiments/_bigblock.py). A
    #: convex loss never pays the ``K + 1`` set-up products for ``K`` above 16.
    _max_block_not_convex: ClassVar[int] = 64
    #: Whether the step whose solve first met negative curvature is solved again at once with
    #: the larger blocks (off: next steps only; experiments/_bigblock.py, "resolve").
    _resolve_not_convex: ClassVar[bool] = False

    def _gauss_newton_failed(self, evaluation: _Evaluation, run: _StepRun) -> bool:
        r"""Phase 1, ``curvature='auto'`` with outputs: whether the Gauss-Newton model has been
        seen to fail on this deterministic objective, so that the exact Hessian (with its trust
        radius) takes over for the rest of the run (``state['gn_failed']``).

        A step fails when its full step raised the objective or the undamped model predicted
        the wrong sign (:math:`\rho < 0`, :math:`-\infty` included) and :math:`\lambda` rose:
        on a deterministic objective that is the model, not noise. On a large-residual fit
        :math:`H = G + \sum_i r_i \nabla^2 r_i` has curvature :math:`G \succeq 0` cannot
        represent (Dennis, Gay & Welsch 1981, NL2SOL; Nocedal & Wright 2006, §10.3), and
        :math:`\lambda` then climbs while the steps shrink (experiments/README.md, "unseen7",
        "gnfall"). Reads the previous step's :class:`StepInfo` (and ``_first_step_curvature``'s
        verdict, ``state['gn_first_step']``); no product, no host sync.
        """
        state = self._global_state()
        if state.get("gn_failed") is True:
            return state.get("deterministic") is True
        if state.get("deterministic") is not True:  # mini-batches: the first-step verdict lapses
            state.pop("gn_recent", None)
            if state["step"] > 0:
                state.pop("gn_first_step", None)
            return False
        if evaluation.hidden is not None or not isinstance(evaluation.outputs, Tensor):
            return False
        switch = state.pop("gn_first_step", False) is True
        info = self.last_step
        if self._gn_fallback and info is not None:
            failed = info.rho_full < 0.0 and info.next_damping > info.damping
            recent = state.setdefault("gn_recent", [])
            recent.append(failed)
            del recent[: -self._GN_FAIL_WINDOW]
            switch = switch or sum(recent) >= self._GN_FAIL_STEPS
        if not switch:
            return False
        state["gn_failed"] = True
        state.pop("gn_recent", None)
        # a fresh start for the Hessian: Δ₀ from its scale, λ₀ recalibrated under
        # damping='auto', no warm start from the Gauss-Newton solves
        for key in ("trust_radius", "warm_start"):
            state.pop(key, None)
        if self._gn_restart and math.isnan(self.settings.initial_damping):
            run.damping = state["damping"] = math.nan
        return True

    def _first_step_curvature(self, evaluation: _Evaluation, product: object, x: Tensor) -> bool:
        r"""Phase 2 of the first step under ``curvature='auto'`` with outputs
        (``_gn_first_test``): whether to withdraw the step because the exact Hessian has no
        positive curvature along CG's Gauss-Newton solution :math:`x`.

        With :math:`H = G + \sum_i (\partial\ell/\partial o_i)\,\nabla^2 o_i`, the second term
        is the residuals times the model's second derivatives; where
        :math:`x^\top H x \le 0 < x^\top G x` it outweighs :math:`G` along the very step
        :math:`G` proposes (a large-residual fit; Dennis, Gay & Welsch 1981; Nocedal & Wright
        2006, §10.3): the step is not taken and the exact Hessian takes over from the next
        step, if the objective is then seen deterministic (:meth:`_gauss_newton_failed`).
        One Hessian and one Gauss-Newton product on the step's graph, one host read, once
        per optimizer (experiments/README.md, "gnfall" and "first0").
        """
        state = self._global_state()
        if not (
            self._gn_first_test
            and state["step"] == 0
            and self.settings.curvature == "auto"
            and type(product) is GGNProduct
            and evaluation.grads is None
            and evaluation.hidden is None
            and isinstance(evaluation.outputs, Tensor)  # residual blocks: no switch (PINNs)
            and self.settings.damping_metric == "identity"  # Marquardt's D needs G
            and not _bounded_outer_gradient(evaluation.loss, evaluation.outputs)
        ):
            return False
        try:
            with torch.enable_grad():
                Hx = HessianProduct(evaluation.loss, self._params()).matvec(x)
        except RuntimeError:  # no double backward through the whole graph (or no memory for
            return False  # one): no evidence, and Gauss-Newton goes on as without the test
        # data-parallel: the ranks' mean, so that all of them decide alike
        curvatures = self._avg.mean(torch.stack([x @ Hx, x @ product.matvec(x)]))
        xHx, xGx = curvatures.tolist()
        if not xHx <= 0.0 < xGx:  # NaN included: no evidence, Gauss-Newton stays
            return False
        # a bool, not a string: torch's load_state_dict rebuilds iterables in the state
        # element by element, and a str came back as the text of a generator
        state["gn_first_step"] = True
        return True

    def _gradient(
        self, evaluation: _Evaluation, product: object, layout: ParamLayout, params: list[Tensor]
    ) -> Tensor:
        if product is not None and product.gradient is not None:
            return product.gradient  # computed by the product's set-up
        grads = evaluation.grads
        if grads is None:
            grads = torch.autograd.grad(
                evaluation.loss, params, retain_graph=True, allow_unused=True
            )
        check_reaches_params("loss", grads, len(params))  # zero blocks for some, not all
        return layout.cat([None if g is None else g.detach() for g in grads])

    def _curvature_context(
        self,
        product: object,
        lam: float,
        shift: float | Tensor,
        curv: MatVec,
        g: Tensor,
        run: _StepRun,
    ) -> PrecondContext:
        """A :class:`PrecondContext` with batched undamped products :math:`V(C + \\kappa)`.

        Its products count in ``StepInfo.precond_matvecs`` and ``time_products``.
        """
        batched = isinstance(product, CurvatureProduct) and curv is product
        replicated = self.settings.curvature_batch == "replicated"

        def products(V: Tensor) -> Tensor:
            t0 = time.perf_counter()
            out = product.matmat(V) if batched else torch.stack([curv(v) for v in V])
            out = out if replicated else self._avg.mean(out)
            run.counter.product_time += time.perf_counter() - t0
            run.report["precond_matvecs"] = run.report.get("precond_matvecs", 0) + V.shape[0]
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

        They come from ``product``'s curvature batch when it carries the outputs' Jacobian
        (Gauss-Newton, Fisher), else from the gradient batch, which is always sharded.
        """
        from_gradient_batch = product is None or product.jacobian is None
        return self.settings.curvature_batch == "sharded" or from_gradient_batch

    # ------------------------------------------------------------------------------ step
    def step(self, closure: Closure, curvature_closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """Take one Hessian-free step (``max_iter`` of them, as LBFGS iterates in one call).

        Args:
            closure: Re-evaluates the model on the gradient batch and returns the loss,
                ``(loss, outputs)`` or ``(loss, (r_1, ..., r_K))``; it may call ``backward()``
                (``torch.optim.LBFGS`` style, and then return ``loss.item()`` too, as LBFGS
                allows) and ``torch.autograd.grad`` (input-derivatives).
                It is called several times per step (backtracking, line search).
            curvature_closure: Same contract on the curvature batch; its graph supplies the
                curvature products. Default: ``closure``'s own graph.

        Returns:
            Tensor: The closure's loss at the starting point (as ``LBFGS.step`` does; with
            ``max_iter`` > 1, the point where the call started).

        Raises:
            TypeError: If ``closure`` is not callable or returns something other than a scalar
                tensor or ``(loss, outputs)``.
            ValueError: If the curvature or preconditioner needs outputs the closure does not
                give, the closure's first call fails because its data does not match the
                parameters (dtype, device or features; torch's error is chained), or its loss
                depends on none of the parameters (before any update; parameters it does not
                use among others are fine and stay where they are), or if every parameter has
                been frozen since the optimizer was built (``requires_grad_(False)``).
            FloatingPointError: After ``max_failures`` consecutive non-finite steps.
        """
        if _is_compiling():
            # torch.compile traced into the step (opt.step(closure) inside a compiled
            # function): Dynamo failed deep inside CG after ~14 s of tracing ("SymInt object
            # has no attribute 'numerator'", "unseen17"). The step's host-side decisions and
            # its closure calls are eager code, so it runs eagerly, as a graph break.
            return torch.compiler.disable(self._step)(closure, curvature_closure)
        return self._step(closure, curvature_closure)

    def _step(self, closure: Closure, curvature_closure: Closure | None) -> Tensor:
        """:meth:`step`'s body (eager)."""
        if not callable(closure):
            raise TypeError(
                f"HessianFree.step needs a closure that re-evaluates the loss, got {closure!r}."
            )
        if curvature_closure is not None and not callable(curvature_closure):
            raise TypeError(
                f"`curvature_closure` must be callable or None, got {curvature_closure!r}."
            )
        _check_params_assigned(self.param_groups)
        # every parameter frozen since __init__ (requires_grad_(False)): torch's bare IndexError
        _check_trainable(
            self._params(),
            " any more (all were frozen after the optimizer was built)",
            ": unfreeze one, or skip opt.step() while the whole model is frozen (nothing was "
            "changed)",
        )
        loss0 = self._one_step(closure, curvature_closure)
        calls = self.last_step.closure_calls if self.last_step is not None else 0
        for _ in range(self.settings.max_iter - 1):  # as LBFGS ends its call on a tolerance
            if self.last_step is None or self.last_step.status in _ENDS_A_CALL:
                break
            if self.settings.max_eval is not None and calls >= self.settings.max_eval:
                break
            self._one_step(closure, curvature_closure)
            calls += self.last_step.closure_calls
        return loss0

    def _one_step(self, closure: Closure, curvature_closure: Closure | None) -> Tensor:
        """One HF step (:meth:`step` takes ``max_iter`` of them); the loss at its start."""
        self._current_settings()
        undo = self._undo_record()
        run = self._start_step()
        # Phases 1-2 hold every autograd graph of the step; they are freed on return, but
        # structural damping's curvature graph, which phase 4 reads once (_Solution).
        try:
            # cuda_graph: the closures' graphs on the stream the products are captured on
            with capture_stream(self._product_policy(), run.params[0].device):
                try:
                    solution = self._evaluate_and_solve(closure, curvature_closure, run)
                finally:
                    self._linear_pass = None  # the recorded layers' graph, if CG left it
                if solution is not None:  # else the step ended before or inside CG (recorded)
                    self._backtrack_and_search(closure, solution, run)  # phases 3-5
        except BaseException:
            if run.state["step"] == undo.step:  # raised before _finish: nothing was taken
                undo.restore()
                _restore_buffers(run.counter)  # BatchNorm's statistics, ...
            raise
        finally:
            if run.counter.stream is not None:  # also on an error (_finish did it otherwise)
                run.counter.stream.leave()
            self._note_failed_capture()
        return run.loss0

    def _product_policy(self) -> ProductPolicy:
        """``products`` as given, without ``cuda_graph`` once this optimizer's product failed to
        capture: it would fail again every step (the same closure builds the same graph), each
        time paying ``warmup`` eager products, a failed capture and a warning."""
        policy = self.settings.products
        if policy.cuda_graph and getattr(self, "_capture_failure", None):
            return dataclasses.replace(policy, cuda_graph=False)
        return policy

    def _accelerate(self, curvature: MatVec, g: Tensor) -> MatVec:
        """:func:`accelerate` under :meth:`_product_policy`, the wrapper kept for
        :meth:`_note_failed_capture`."""
        out = accelerate(curvature, g, self._product_policy())
        self._accelerated = out if isinstance(out, Accelerated) else None
        return out

    def _note_failed_capture(self) -> None:
        """Remember a failed CUDA-graph capture of this step's product (see
        :meth:`_product_policy`); its reason is kept in ``_capture_failure``."""
        acc, self._accelerated = getattr(self, "_accelerated", None), None
        if acc is not None and acc.mode == "eager" and acc.capture_failed:
            self._capture_failure = acc.fallback_reason

    def _undo_record(self) -> _UndoRecord:
        """What a step that raises must put back (:meth:`_one_step`).

        The closure may raise at any of its calls (a ``KeyboardInterrupt``, a data loader's
        error caught by the training loop), after the step has already popped and decayed the
        warm start, appended to the loss window, moved the forcing term's memory, calibrated
        λ, refreshed K-FAC's factors or drawn from the generator. The parameters were put back
        (:func:`_move`), but that state was not: the step retried after the error was not
        the one a run without it takes, 0.03-3.1 in max |Δθ| two steps later on a 5-8-3
        MLP under 8 settings ("unseen15"). Copied here: the global state's tensors (the warm
        start, which the step decays in place, and Marquardt's diagonal) and lists; a
        built-in preconditioner's attributes by reference (its refresh rebinds them, out of
        place). About 30 us a step, 1 % of a 3 ms step of that MLP.

        A user's preconditioner object is recorded too, its attributes with lists, dicts and
        sets copied one level deep: :class:`~hessfree.CGPairPreconditioner` appends the
        failed step's CG products to its pairs, and the retried step ran from them (0.27 max
        |Δθ| two steps later on that MLP, "unseen16"). A tensor it writes in place is not
        copied (that would cost a copy of every such tensor at every step).
        """
        state = self._global_state()
        precond = self._stateful_precond()
        attrs = None if precond is None else dict(vars(precond))
        if precond is None and _holds_state(self.precond):
            precond = self.precond
            attrs = {k: _shallow(v) for k, v in vars(precond).items()}
        return _UndoRecord(
            optimizer=self,
            state=state,
            saved=_copied(state),
            step=state["step"],
            auto=(self._auto_precond, self._auto_kfac_off),
            precond=precond,
            precond_attrs=attrs,
        )

    def _start_step(self) -> _StepRun:
        state = self._global_state()
        params = self._params()
        self._forget_other_layout(state)
        layout = ParamLayout(params)
        run = _StepRun(
            state=state,
            params=params,
            layout=layout,
            l2=self._per_entry(layout, "weight_decay"),
            lr=self._per_entry(layout, "lr"),
            damping=state["damping"],
        )
        if self.settings.replay_rng:  # saved before the step's first closure call
            run.counter.stream = StepStream({p.device for p in params})
        return run

    def _forget_other_layout(self, state: dict) -> None:
        """Drop the warm start when the parameters it was laid out for are not the ones
        trained now.

        Its entries follow the trained parameters in order, so its length alone does not tell
        which parameters they belong to: with one block frozen and another of the same size
        unfrozen (training two blocks in turn), the frozen block's last step became the new
        one's warm start (§4.5 reuses the solution of the same quadratic). Dropping it: lower
        loss at equal CPU time on 5-6 of 8 seeds ("unseen12"). Marquardt's running diagonal
        is kept as before (checked by length): resetting it also resets the scale λ was
        adapted to, worse on 7 of 8 seeds there. ``state['trained']`` keeps the positions, in
        ``param_groups`` order, of the parameters trained; a state without it (saved before it
        existed) is taken as it is.
        """
        listed = (p for group in self.param_groups for p in group["params"])
        trained = [i for i, p in enumerate(listed) if p.requires_grad]
        if state.get("trained", trained) != trained:
            state.pop("warm_start", None)
        state["trained"] = trained

    def _evaluate_and_solve(
        self, closure: Closure, curvature_closure: Closure | None, run: _StepRun
    ) -> _Solution | None:
        """Phases 1 (evaluate) and 2 (solve); ``None`` if the step ended here."""
        settings, state, params, layout = self.settings, run.state, run.params, run.layout
        # ---- 1. evaluate: loss and gradient at θ0 (and the curvature graph, from the same call
        # unless a curvature_closure is given) ----
        evaluation = self._first_call(closure, "closure", run.counter, layout)
        run.uses_backward = evaluation.grads is not None
        run.loss0 = evaluation.loss.detach()
        if not getattr(self, "_ranks_checked", False):  # this object's first step, or a load's
            flat = layout.cat([p.detach() for p in params])
            self._avg.check_same(flat, self._rank_settings(layout))
            self._ranks_checked = True
        run.f0 = self._avg.mean_scalar(float(run.loss0), run.loss0) + self._l2(params, run.l2)
        run.lap("evaluate")
        self._observe_objective(state, run.f0)
        self._observe_cases(state, evaluation.outputs, run.loss0)
        self._record_loss(state, run.f0)
        self._track_unfloored(state, run)
        floor = self._relative_floor(state)
        if run.damping < floor:  # the floor rose since the last step (an edit, or 'auto')
            run.damping = state["damping"] = floor
        if not math.isfinite(run.f0):
            # the call's buffer writes (BatchNorm's statistics) came from that batch: put back
            _restore_buffers(run.counter)
            return self._reject(run, StepStatus.NON_FINITE_LOSS, "the loss")
        curvature = product = None
        with torch.enable_grad():  # the products differentiate graphs, whatever the caller's mode
            if curvature_closure is None:
                curvature, product = self._curvature_product(evaluation, params, run)
            g = self._avg.mean(self._gradient(evaluation, product, layout, params))
        g = _with_weight_decay(g, run.l2, layout, params)
        # one host read for both (each read is a device sync)
        # (in float32 for a float16 g, whose norm overflows above 65504: _flat.LOW_PRECISION)
        wide = torch.float32 if g.dtype in LOW_PRECISION else g.dtype
        g_norm, g_max = torch.stack(
            [torch.linalg.vector_norm(g, dtype=wide), g.abs().max().to(wide)]
        ).tolist()
        run.report["grad_norm"] = g_norm
        if not math.isfinite(g_norm):
            what = "the gradient"
            if math.isfinite(g_max):
                # finite entries whose squares' sum overflows (a float32 loss of ~1e20): so
                # would CG's rᵀr; "non-finite value in the gradient" alone sent users to
                # look for NaN in their data ("unseen15")
                what += (
                    f"'s norm: its entries are finite (the largest {g_max:.3g}) but the sum of "
                    f"their squares overflows {g.dtype}{_overflow_fix(g.dtype)}"
                )
            return self._reject(run, StepStatus.NON_FINITE_GRADIENT, what)
        if g_max <= settings.tolerance_grad:  # LBFGS' first-order optimality test
            run.report["converged_by"] = Convergence.TOLERANCE_GRAD
            return self._finish(run, StepStatus.CONVERGED)
        if not (run.lr.any() if isinstance(run.lr, Tensor) else run.lr):
            return self._finish(run, StepStatus.ZERO_LR)  # nothing could move
        if state.get("noise_floor") == [run.f0, g_norm]:
            # the point _noise_check found inside the loss's rounding noise: the same loss and
            # gradient give the same verdict, without a CG solve or line search ("noise19")
            run.report["converged_by"] = Convergence.ROUNDING_NOISE
            return self._finish(run, StepStatus.CONVERGED)
        state.pop("noise_floor", None)
        curvature_evaluation = evaluation
        if curvature_closure is not None:
            curvature_evaluation = self._first_call(
                curvature_closure, "curvature_closure", run.counter, layout
            )
            with torch.enable_grad():
                curvature, product = self._curvature_product(curvature_evaluation, params, run)
        replicated = settings.curvature_batch == "replicated"
        if replicated and state["step"] == 0:
            self._avg.check_replicated(
                "curvature_batch='replicated'", curvature_evaluation.loss.detach()
            )
        curvature = self._accelerate(curvature, g)  # CUDA graph / low precision
        if settings.damping_metric == "marquardt":
            run.metric = self._marquardt_metric(product, g, run)
        if math.isnan(run.damping) or (
            self._relative_fraction(state) > 0 and "damping_scale" not in state
        ):  # damping='auto' or the relative floor: one product along g, once
            self._calibrate_damping(curvature, product, g, g_norm, run)
        elif (
            state.get("deterministic") is False
            and self._relative_fraction(state) > 0
            and self._floor_remeasured(state)
        ):  # mini-batches: the floor follows a growing curvature scale ("mbfloor", "cnnmb")
            self._raise_floor(curvature, product, g, g_norm, run)

        run.f_base = run.f0
        drew, wrote = self._any_rank_drew_or_wrote(run, g)
        if drew:
            # replay_rng: the trials share one fresh draw; f(θ0) under it is their baseline
            loss = self._call(
                closure, run.counter, build_graph=False, uses_backward=run.uses_backward
            ).loss
            f_base = self._avg.mean_scalar(float(loss), loss) + self._l2(params, run.l2)
            run.f_base = f_base if math.isfinite(f_base) else run.f0
            self._observe_mask_noise(state, run)
        elif wrote and self._baseline_skips == 0:
            # the trials start from the buffers this step's call wrote, and update them once
            # more (kept, _running_statistics_kept): f(θ0) as they see it is their baseline
            loss = self._call(
                closure, run.counter, build_graph=False, uses_backward=run.uses_backward
            ).loss
            f_base = self._avg.mean_scalar(float(loss), loss) + self._l2(params, run.l2)
            run.f_base = f_base if math.isfinite(f_base) else run.f0
            # the same number (a step counter the loss does not read): skip it for a while
            same = run.f_base == run.f0
            self._baseline_skips = self._baseline_recheck - 1 if same else 0
        elif wrote:  # f(θ0) as the trials see it was the step's own lately: that is f_base
            self._baseline_skips -= 1
        # ---- 2. solve: CG on (C + κ + λ) p = -g from the decayed previous solution ----
        result = self._solve(curvature, product, evaluation, g, run, closure)
        if (
            self._resolve_not_convex
            and result.reason is CGStop.NEGATIVE_CURVATURE
            and type(product) is GGNProduct
            and state.get("loss_not_convex") is not True
        ):  # study only (bigblock): solve this step again with the larger blocks
            state["loss_not_convex"] = True
            with torch.enable_grad():
                curvature, product = self._curvature_product(curvature_evaluation, params, run)
            curvature = self._accelerate(curvature, g)
            result = self._solve(curvature, product, evaluation, g, run, closure)
        run.report.update(
            cg_iters=result.num_iter, cg_reason=result.reason.value, cg_matvecs=result.num_matvec
        )
        if result.reason is CGStop.NON_FINITE:
            state.pop("warm_start", None)
            # no product yet: r = -g is finite (checked), so z = M^{-1} r was not
            what = "a curvature product" if result.num_matvec else "the preconditioner"
            if result.num_matvec and self._curvature_overflowed(curvature, g, g_max):
                what = (
                    f"CG's inner products: the curvature is finite along g, but products and "
                    f"inner products of this scale (largest |g| entry {g_max:.3g}) overflow "
                    f"{g.dtype}{_overflow_fix(g.dtype)}"
                )
            return self._reject(run, StepStatus.NON_FINITE_CURVATURE, what)
        result = self._floor_check(curvature, product, evaluation, g, run, closure, result)
        if self._noise_check(curvature, product, evaluation, g, run, closure):
            run.lap("solve")  # within the rounding noise: no line search, nothing moves
            run.report["converged_by"] = Convergence.ROUNDING_NOISE
            return self._finish(run, StepStatus.CONVERGED)
        state["warm_start"] = result.x.detach()  # §4.5: the final, not the backtracked, iterate
        if result.reason is CGStop.NEGATIVE_CURVATURE and type(product) is GGNProduct:
            # the same on every rank: CG's scalars come from averaged products (bigblock)
            state["loss_not_convex"] = True
        if self._first_step_curvature(curvature_evaluation, product, result.x):
            run.lap("solve")  # a step G's model would misjudge: not taken (gnfall, first0)
            return self._finish(run, StepStatus.GAUSS_NEWTON_WITHDRAWN)
        run.lap("solve")
        # the structural term is damping, left out of ρ's model: its energy at the chosen
        # iterate only (phase 4), not at every stored one (experiments/README.md, rnnstep)
        return _Solution(g, result, product if run.structural_damping > 0 else None)

    def _floor_check(
        self,
        curvature: MatVec,
        product: object,
        evaluation: _Evaluation,
        g: Tensor,
        run: _StepRun,
        closure: Closure,
        result: CGResult,
    ) -> CGResult:
        r"""Phase 2, where CG's step predicts a change below the objective's float resolution
        :math:`\delta` (:func:`hessfree.damping.resolution`) and :math:`\lambda` does not
        dominate it (phase 4 lowers :math:`\lambda` there): whether the model itself, not
        this step's :math:`\lambda`, truncation or trust radius, puts every decrease below
        :math:`\delta` (``state['floor_checked']``: True, a floor; False, not one).

        Phase 4 calls such a step float precision's floor (``'float_resolution'``: nothing
        moves, :math:`\lambda` stays), and the next steps repeat it. But a step held short
        by :math:`\lambda` (a first step under :math:`\lambda_0 = |g^\top C g|/g^\top g`
        ties the damping's share with the curvature's), by the forcing term's early stop or
        by the trust radius is not the loss's floor: a float32 tanh MLP on raw-unit targets
        (loss 2.3e13, Hessian curvature) predicted 9e4 against :math:`\delta` = 2.2e7 from the
        first step on and never moved, while the same network in float64 took those steps
        with :math:`\rho` = 0.99-1.01 and reached 9e11 in 60 steps ("floor16"). So CG runs
        again from zero with :math:`\lambda` at its floor (``min_damping``), without the
        forcing-term stop, trust radius, preconditioner or objective checks: a floor only
        where that solve ends on positive curvature with a predicted decrease within
        :math:`\delta` too, i.e. the Newton decrement :math:`\tfrac12 g^\top C^{-1} g` over
        the Krylov space is below the resolution (Boyd & Vandenberghe 2004, §9.5.1, stop on
        the decrement; here at the float tolerance). Negative curvature there says the point
        is no minimum of the model: not a floor either (phase 4 then takes the step). The
        step itself stays this CG's (result, warm start, trials); the check runs once per
        point, not again until a step is accepted (a step that moves nothing would repeat
        it). Only on objectives not seen stochastic and without structural damping (its
        λ has its own metric).
        """
        state = run.state
        if (
            "floor_checked" in state
            or state.get("deterministic") is False
            or run.structural_damping > 0
        ):
            return result
        lam = run.damping
        last = len(result.iterates) - 1
        at = run.at_last = _AtChosen.read(g, result, last, run)  # phase 4 reuses it
        damped = 0.5 * lam * at.pDp
        predicted = at.phi - damped
        eps = torch.finfo(run.loss0.dtype).eps
        delta = _damping.resolution(run.f_base, eps)
        if not abs(predicted) <= delta or self._damping_dominates(damped, predicted - at.slope):
            return result
        change, products = self._change_at_floor(curvature, product, evaluation, g, run, closure)
        state["floor_checked"] = abs(change) <= delta
        return dataclasses.replace(result, num_matvec=result.num_matvec + products)

    def _change_at_floor(
        self,
        curvature: MatVec,
        product: object,
        evaluation: _Evaluation,
        g: Tensor,
        run: _StepRun,
        closure: Closure,
    ) -> tuple[float, int]:
        r"""The undamped model's change at a plain CG solve with :math:`\lambda` at its floor
        (``min_damping``): from zero, rtol 0 (§4.4's progress rule, negative curvature or
        ``cg_max_iter`` stop it), no trust radius, preconditioner or objective checks; NaN
        where it ends on negative curvature (no minimum of the model) or a non-finite value.
        With the products it made. :meth:`_floor_check` and :meth:`_noise_check` compare it
        with their tolerances; the step's own CG result, trials and :math:`\lambda` stay."""
        lam = run.damping
        low = min(lam, self._damping_policy(run.state).min_damping)
        trials = dict(run.trials)
        run.damping = low
        try:
            checked = self._solve(curvature, product, evaluation, g, run, closure, check=True)
        finally:
            run.damping = lam
            run.trials.clear()
            run.trials.update(trials)
        if checked.reason in (CGStop.NON_FINITE, CGStop.NEGATIVE_CURVATURE):
            return math.nan, checked.num_matvec
        at = _AtChosen.read(g, checked, len(checked.iterates) - 1, run)
        return at.phi - 0.5 * low * at.pDp, checked.num_matvec

    @staticmethod
    def _curvature_overflowed(curvature: MatVec, g: Tensor, g_max: float) -> bool:
        r"""Whether CG's non-finite value came from the range of ``g``'s dtype, not from the
        curvature: ``C g'`` is finite along :math:`g' = 2^{-e} g` (largest entry below 1).

        CG's :math:`p^\top A p` grows as the loss's cube: a float32 loss × 2^48 (a sum-reduced
        regression on raw targets gets there) had every step rejected as "non-finite value
        in a curvature product" ("unseen15"). One product, on rejected steps only.
        """
        if g.dtype in LOW_PRECISION or not (math.isfinite(g_max) and g_max > 1.0):
            return False
        v = g * 2.0 ** -math.frexp(g_max)[1]
        with torch.enable_grad():
            Cv = curvature(v)
        return bool(torch.isfinite(Cv).all())

    def _solve(
        self,
        curvature: MatVec,
        product: object,
        evaluation: _Evaluation,
        g: Tensor,
        run: _StepRun,
        closure: Closure,
        *,
        check: bool = False,
    ) -> CGResult:
        """Phase 2: truncated preconditioned CG on the damped system (§4.4, §4.5, §4.7);
        with ``check`` (:meth:`_floor_check`) plain CG from zero, without the forcing term's
        stop or a trust radius."""
        settings, counter = self.settings, run.counter
        # κ + λD: a float, or per entry (per-group weight decay, Marquardt's D)
        shift = run.l2 + (run.damping if run.metric is None else run.damping * run.metric)
        replicated = settings.curvature_batch == "replicated"

        def damped(v: Tensor) -> Tensor:
            t0 = time.perf_counter()
            out = curvature(v) if replicated else self._avg.mean(curvature(v))
            counter.product_time += time.perf_counter() - t0
            return out.add_(v, alpha=shift) if isinstance(shift, float) else out.addcmul_(shift, v)

        if run.state.get("newton") and self._phase_exit and not check:
            self._check_phase_range(product, run)  # may end the phase before this solve
        plain = check or (  # the local phase (_NEWTON_STEPS): plain CG on the damped GN system
            run.state.get("newton") and self.precond == "auto"
        )
        try:
            with torch.enable_grad():
                precond = (
                    None
                    if plain
                    else self._preconditioner(
                        evaluation,
                        product,
                        run.params,
                        run.damping,
                        run.l2,
                        curv=curvature,
                        g=g,
                        run=run,
                    )
                )
        except (FloatingPointError, torch.linalg.LinAlgError):
            # A built-in preconditioner (Nyström sketch, K-FAC factors) met NaN/Inf curvature:
            # so will CG, at its first product, and the step is rejected as non-finite.
            if not (self.precond == "auto" or isinstance(self.precond, _BUILT_IN_PRECONDS)):
                raise
            precond = None
        if isinstance(self.precond, EmpiricalFisherDiagonal) and isinstance(precond, Tensor):
            precond = precond.nan_to_num(nan=1.0, posinf=1.0, neginf=1.0)  # likewise; no sync
        watch = getattr(self.precond, "watch", None)
        if (
            callable(watch) and not check
        ):  # e.g. CGPairPreconditioner: CG's own products become its pairs
            damped = watch(damped)
        x0 = None if check else self._warm_start(product, g, run.state, run.layout)
        keep = _hook_mask(run.params, g, run.layout)
        if keep is not None:
            # a gradient hook (a pruning mask: w.register_hook(lambda g: g * mask)) zeroes the
            # gradient's and curvature's rows, so CG stays on the hooked entries the gradient
            # reaches, except through a preconditioner that mixes entries (K-FAC's factors see
            # the layer's activations and output gradients, not the hook) or a warm start from
            # before the mask: pruned weights moved 0.33 in 5 steps ("unseen13")
            if callable(precond):
                precond = _masked_precond(precond, keep)
            if x0 is not None:
                x0.mul_(keep)
        b = -g
        scale = None
        if run.metric is not None:
            # Moré's scaled variables y = D^{1/2} p: CG's Euclidean norms (its residual test,
            # the forcing term's ‖g‖) become invariant under a rescaling of the parameters too
            scale = run.metric.rsqrt()
            damped, b, x0, precond = _scaled_system(scale, damped, b, x0, precond)
            run.scaled_grad_norm = float(torch.linalg.vector_norm(b))
        rtol = 0.0 if check else self._cg_rtol(run)
        run.bounded = self._trust_radius(product)
        run.semidefinite = product is not None and product.positive_semidefinite
        if self._quad_entry and run.state.get("deterministic") is True:
            if not run.state.get("newton"):
                run.loss_probe = _loss_probe(product)
        if run.bounded and "trust_radius" not in run.state:
            self._initial_radius(run.state, g)
        radius = run.state.get("trust_radius", math.inf) if run.bounded and not check else math.inf
        run.lap("curvature")

        max_iter = self._cg_max_iter(run, kfac=precond is not None and self._kfac_in_use())

        def solve(start: Tensor | None) -> CGResult:
            checks = self._stop_on_increase(run) and not check
            monitor = self._objective_monitor(closure, run) if checks else None
            if monitor is not None and scale is not None:
                monitor = _scaled_monitor(monitor, scale)
            result = cg(
                damped,
                b,
                start,
                max_iter=max_iter,
                min_iter=min(settings.cg_min_iter, max_iter),
                rtol=rtol,
                precond=precond,
                progress_tol=settings.cg_progress_tol,
                check_every=settings.cg_check_every,
                max_norm=radius if radius < math.inf else None,
                monitor=monitor,
                descent_stop=True,  # never stop on an uphill warm start (CURVES, #14)
            )
            if scale is None:
                return result
            return dataclasses.replace(  # back to p = D^{-1/2} y
                result, x=result.x * scale, iterates=[y * scale for y in result.iterates]
            )

        result = solve(x0)
        if x0 is not None and (
            result.reason is CGStop.NON_FINITE or not float(dot(g, result.x)) < 0
        ):
            # from the warm start CG stopped at no descent direction (the line search would
            # reject the step): solve again from zero, where every iterate descends. A NaN/Inf
            # from the warm start (a product of the previous step's solution overflowing in
            # float16) is retried from zero too: a curvature that is non-finite itself fails
            # again there, and only then is the step rejected.
            run.trials.clear()
            matvecs = result.num_matvec
            result = solve(None)
            result = dataclasses.replace(result, num_matvec=result.num_matvec + matvecs)
        return result

    def _cg_rtol(self, run: _StepRun) -> float:
        r"""CG's relative residual tolerance :math:`\eta_k` (``cg_rtol``), kept in
        ``StepInfo.cg_rtol``."""
        rtol = self.settings.cg_rtol
        if rtol == "auto":  # inexact Newton: η from how fast ‖g‖ fell (Eisenstat & Walker 1996)
            state, g_norm = run.state, run.report["grad_norm"]
            if run.metric is not None:  # damping_metric='marquardt': ‖D^{-1/2} g‖ (_solve)
                g_norm = run.scaled_grad_norm
            rtol = forcing_term(g_norm, state.get("forcing_grad_norm"), state.get("forcing_eta"))
            state["forcing_grad_norm"], state["forcing_eta"] = g_norm, rtol
            g_start = state.setdefault("forcing_grad_norm_start", g_norm)
            if state.get("deterministic") is False:
                state["forcing_seen_stochastic"] = True
            elif state.get("deterministic") and state.get("forcing_seen_stochastic"):
                # a batch that grew to the full set keeps EW's chain, already tight there
                # (restarting at ½ cost MNIST-1D 1-2 steps); in the local phase η = O(‖g‖)
                # too, relative to the first step's (batch's) ‖g‖ (experiments/README.md,
                # gnentry: relative to the first whole-set step's, η stayed 0.1-0.5)
                if state.get("newton") and g_start > 0:
                    rtol = min(rtol, g_norm / g_start)
            elif state.get("deterministic"):
                # one function from the start: η from the progress since the first such step,
                # not from the last step's ‖g‖ ratio, which does not fall on a non-convex loss
                # (experiments/README.md, fbdefaults)
                g_first = state.setdefault("forcing_grad_norm0", g_norm)
                if g_first > 0:
                    rtol = relative_forcing_term(g_norm, g_first)
                    if state.get("newton"):  # the local phase: η = O(‖g‖) (_track_newton)
                        rtol = min(rtol, g_norm / g_first)
            if run.structural_damping > 0:
                # Martens & Sutskever's CG: §4.4's stop alone. Loose solves give ρ ≈ 1, which
                # drives λ, and with it the structural term λμ, to its floor (cg_rtol)
                rtol = 0.0
        run.report["cg_rtol"] = rtol
        return rtol

    def _cg_max_iter(self, run: _StepRun, *, kfac: bool = False) -> int:
        """CG's iteration cap (``cg_max_iter``): ``'auto'`` is 250, 25 on a structurally
        damped step, and on a K-FAC-preconditioned step 2 where the objective is seen
        stochastic, 5 where it is seen deterministic (250 before either is known)."""
        most = self.settings.cg_max_iter
        if most == "auto":
            if run.structural_damping > 0:
                most = _SD_CG_MAX_ITER
            elif kfac and run.state.get("deterministic") is False:
                most = _KFAC_STOCHASTIC_CG_MAX_ITER
            elif kfac and run.state.get("deterministic") is True:
                newton = run.state.get("newton")
                most = _AUTO_CG_MAX_ITER if newton else _KFAC_DETERMINISTIC_CG_MAX_ITER
            else:
                most = _AUTO_CG_MAX_ITER
        # the unfloored λ (_track_unfloored) learns nothing from such a step's ρ: see there
        run.state["cg_capped"] = most == _KFAC_STOCHASTIC_CG_MAX_ITER and most != (
            self.settings.cg_max_iter
        )
        return most

    def _stop_on_increase(self, run: _StepRun) -> bool:
        """Whether CG checks the objective at its stored iterates (``cg_stop_on_increase``)."""
        on = self.settings.cg_stop_on_increase
        if on != "auto":
            return on
        # a structurally damped step is capped instead (cg_max_iter='auto'): no check forwards
        return self.settings.backtrack and not run.uses_backward and run.structural_damping == 0

    def _objective_monitor(self, closure: Closure, run: _StepRun) -> Callable[[int, Tensor], bool]:
        r"""CG's ``monitor``: the objective at each stored iterate (kept in ``run.trials`` for
        backtracking); True, CG stops, once it is not below the previous stored iterate's and
        that one was below :math:`f(\theta_0)` (until an iterate descends, CG goes on: a warm
        start's first iterates may be worse than :math:`\theta_0`)."""
        last = [math.inf]

        def rose(i: int, x: Tensor) -> bool:
            f = self._objective_swapped(closure, run, x)
            run.trials[i] = f
            stop = last[0] < run.f_base and not f < last[0]
            last[0] = f
            return stop

        return rose

    def _objective_swapped(self, closure: Closure, run: _StepRun, x: Tensor) -> float:
        r""":math:`f(\theta_0 + x)` while CG's graphs are alive: each parameter's data is
        swapped for :math:`\theta_0 + x` and back (no in-place change the graphs would see);
        the value is bitwise the one :meth:`_objective_at` gives at rate 1."""
        params = run.params
        originals = [p.data for p in params]
        try:
            with torch.no_grad():
                for p, d in zip(params, run.layout.split(x), strict=True):
                    moved = p.data.clone()
                    moved.add_(d)
                    p.data = moved
            loss = self._call(
                closure, run.counter, build_graph=False, uses_backward=run.uses_backward
            ).loss
            f = self._avg.mean_scalar(float(loss), loss) + self._l2(params, run.l2)
        finally:
            for p, original in zip(params, originals, strict=True):
                p.data = original
        return f if math.isfinite(f) else math.inf

    def _trust_radius(self, product: object) -> bool:
        """Whether CG's step is bounded by a trust radius (``trust_radius``)."""
        on = self.settings.trust_radius
        if on == "auto":
            return product is not None and not product.positive_semidefinite
        return on

    def _warm_start(
        self, product: object, g: Tensor, state: dict, layout: ParamLayout | None = None
    ) -> Tensor | None:
        """§4.5: ``cg_decay`` × the previous step's final CG iterate, or ``None`` (cold); zero
        on the parameters whose gradient is zero throughout this step (with ``layout``)."""
        # popped and decayed in place: one vector, not two, besides CG's copy (set again after);
        # state_dict() and load_state_dict() copy it, so no state dict shares it
        previous = state.pop("warm_start", None)
        decay = self.settings.cg_decay
        if decay == "auto":  # Martens' 0.95 for every curvature, the Hessian too (cg_decay)
            decay = 0.95
        if previous is None or not decay > 0 or previous.shape != g.shape:
            return None
        x0 = previous.to(device=g.device, dtype=g.dtype)
        if layout is not None and len(layout.numels) > 1:
            # A parameter the loss did not reach this step (an unused branch, an expert no
            # example was routed to) has no gradient and no curvature: the damped model's
            # minimiser leaves it alone, but CG hardly shrinks a warm start there (its residual
            # is λ·x0), so the previous move went on, 0.06-0.89x of it per step while unused
            # ("unseen10"). Read per block without a host sync, applied with the decay.
            _decay_reached(x0, g, layout, decay)
        else:
            x0.mul_(decay)
        radius = state.get("trust_radius")
        if radius is not None and self._trust_radius(product):  # start inside the ball
            x0.mul_(min(1.0, radius / max(float(x0.norm()), 1e-300)))
        return x0

    def _backtrack_and_search(self, closure: Closure, solution: _Solution, run: _StepRun) -> None:
        """Phases 3 (backtrack), 4 (ρ and λ) and 5 (line search); the parameters then move."""
        settings, state, params, layout = self.settings, run.state, run.params, run.layout
        result = solution.result
        theta0 = [p.detach().clone() for p in params]
        trial_non_finite = False

        def objective(x: Tensor, rate: float = 1.0) -> float:
            """:math:`f(\\theta_0 + t x)`; ``inf`` if not finite."""
            nonlocal trial_non_finite
            f = self._objective_at(
                closure, run.counter, theta0, layout.split(x), rate, run.uses_backward, run.l2
            )
            trial_non_finite |= f == math.inf  # _objective_at maps NaN and ±Inf to +inf
            return f

        try:
            # ---- 3. backtrack: CG backtracking on the gradient batch (§4.6) ----
            iterations = result.iterations

            def at_iterate(j: int) -> float:  # monitored iterates are not evaluated twice
                nonlocal trial_non_finite
                f = run.trials.get(iterations[j])
                if f is None:
                    return objective(result.iterates[j])
                trial_non_finite |= f == math.inf
                return f

            chosen, f_chosen = backtrack(
                range(len(iterations)), at_iterate, enabled=settings.backtrack
            )
            p = result.iterates[chosen]
            run.lap("backtrack")

            # ---- 4. ρ with the undamped model and the Levenberg-Marquardt update of λ ----
            if solution.structural is not None:
                # its graph reads the parameters themselves (the R-op's saved tensors skip
                # autograd's version check): back to θ0 from the last trial point first
                with torch.no_grad():
                    torch._foreach_copy_(params, theta0)
            at = run.at_last if chosen == len(iterations) - 1 else None
            at = run.at_chosen = at or _AtChosen.read(solution.g, result, chosen, run)
            predicted = self._predicted_change(solution, chosen, run)
            run.report["predicted_change"] = predicted
            eps = torch.finfo(run.loss0.dtype).eps
            if _damping.below_resolution(f_chosen - run.f_base, predicted, run.f_base, eps):
                # float precision's floor: ρ would be a ratio of rounding errors (−0 for a
                # bit-identical trial loss), no evidence against the model: no line search,
                # nothing moves (experiments/README.md, freeze)
                _move(params, theta0, layout, p, 0.0, run.lr)
                run.report.update(backtrack_iter=result.iterations[chosen], step_rate=0.0)
                run.lap("line_search")
                damped = at.phi - predicted  # ½λ‖p‖² (+ structural)
                half_pCp = predicted - at.slope
                not_floor = state.get("floor_checked") is False  # _floor_check's verdict
                if not_floor or self._damping_dominates(damped, half_pCp):  # λ kept p short
                    # not the floor of the loss but of a step λ dominates (a large given or
                    # climbed λ) or one the model at λ's floor would not keep below δ: λ
                    # stays too and nothing ever moves; lower it as after ρ = 1
                    self._adapt_damping(
                        state, run.damping, lambda pol, lam: pol.after_step(lam, 1.0)
                    )
                    if not_floor:
                        # _floor_check: no floor here. The step is taken, as after ρ = 1 (Δ
                        # too): its trial changed f by at most δ, and float64 measures ρ ≈ 1
                        # on such steps ("floor16"); ρ itself is not measured (NaN)
                        if run.bounded:
                            self._update_radius(state, result, chosen, p, 1.0, 1.0)
                        _move(params, theta0, layout, p, 1.0, run.lr)
                        run.report.update(rho=math.nan, step_rate=1.0)
                        return self._finish(
                            run, StepStatus.ACCEPTED, accepted=True, loss_after=f_chosen
                        )
                    return self._finish(run, StepStatus.LINE_SEARCH_FAILED)
                run.report["converged_by"] = Convergence.FLOAT_RESOLUTION  # λ stays
                return self._finish(run, StepStatus.CONVERGED)
            rho = _damping.reduction_ratio(f_chosen - run.f_base, predicted)
            # replay_rng: a poor ρ within the mask noise does not raise λ (dropdefault)
            hold = self._inconclusive(state, run, f_chosen - run.f_base, predicted, rho)
            self._note_overshoot(state, rho, hold)  # for _floor_stale ("ratchet2")

            def after_step(pol: _damping.DampingPolicy, lam: float) -> float:
                new = pol.after_step(lam, rho)
                return pol.clip(min(new, lam)) if hold else new

            self._adapt_damping(state, run.damping, after_step)
            # λ's share of the step: ½λ‖p‖² over ½pᵀCp of the undamped model
            slope = at.slope
            half_pCp = predicted - slope
            share = run.damped_change / half_pCp if half_pCp > 0 else math.nan
            streak = self._good_streak(state, rho, share)
            if streak > 1:  # λ, not the model, kept limiting the step: λ comes down faster,
                # to no less than ⅓ of the curvature along the step (Nielsen's ⅓ of λ/share)
                extra = self._streak_decrease ** (streak - 1)
                extra = max(extra, 1.0 / share) if share > 1.0 else extra
                self._adapt_damping(state, state["damping"], lambda pol, lam: pol.clip(lam * extra))

            # ---- 5. line search: Armijo along the backtracked step ----
            # the smallest rate tried (a failed search's bound on Δ) and f there
            smallest = [1.0, f_chosen]

            def along(t: float) -> float:
                f_t = objective(p, t)
                if t < smallest[0]:
                    smallest[:] = t, f_t
                return f_t

            rate, f_new = self._line_search(
                along,
                run.f_base,
                slope,
                f_chosen,
                _damping.resolution(run.f_base, eps),
            )
            if rate == 1.0 and rho > _EXTRAPOLATE_RHO and self._extrapolating(state):
                rate, f_new = _extrapolate(
                    lambda t: objective(p, t), f_new, max_doublings=_EXTRAPOLATE_MAX
                )
                if rate > 1.0 and settings.adapt_damping:  # the step was `rate` times too short
                    self._adapt_damping(
                        state, state["damping"], lambda pol, lam: pol.clip(lam / rate)
                    )
            if rate == 0.0 and not trial_non_finite:  # measures the noise for the next step
                self._measure_noise(run, slope, predicted, f_chosen, *smallest)
            if run.bounded:
                self._update_radius(state, result, chosen, p, rho, rate, smallest[0])
            _move(params, theta0, layout, p, rate, run.lr)
            run.lap("line_search")
        except BaseException:
            with torch.no_grad():
                torch._foreach_copy_(params, theta0)
            raise
        run.report.update(
            rho=_rho_taken(rho, rate, f_new - run.f_base, slope, half_pCp),
            rho_full=rho,
            backtrack_iter=result.iterations[chosen],
            step_rate=rate,
        )
        # LBFGS' no-progress tests, on the largest change of a parameter and of the objective
        full_change = at.full_change
        tolerance_change = settings.tolerance_change
        if rate == 0.0:
            state.pop("good_streak", None)
            if not hold:  # nor does a rejection within the mask noise
                self._adapt_damping(
                    state, state["damping"], lambda pol, lam: pol.after_rejection(lam)
                )
            if trial_non_finite:
                what = "a trial loss (CG backtracking or line search)"
                return self._reject(run, StepStatus.NON_FINITE_TRIAL_LOSS, what, grow=False)
            if full_change <= tolerance_change:  # even the full step would not move anything
                run.report["converged_by"] = Convergence.TOLERANCE_CHANGE
                return self._finish(run, StepStatus.CONVERGED)
            return self._finish(run, StepStatus.LINE_SEARCH_FAILED)
        self._track_newton(state, run, rho, rate, share)
        status = StepStatus.ACCEPTED
        if rate * full_change <= tolerance_change or abs(f_new - run.f_base) < tolerance_change:
            status = StepStatus.CONVERGED
            run.report["converged_by"] = Convergence.TOLERANCE_CHANGE
        return self._finish(run, status, accepted=True, loss_after=f_new)

    def _measure_noise(
        self,
        run: _StepRun,
        slope: float,
        predicted: float,
        f_full: float,
        t_min: float,
        f_min: float,
    ) -> None:
        r"""Phase 5, after no rate passed: whether the search failed in the objective's rounding
        noise :math:`\sigma`; if so, :math:`\sigma` is kept for the next step at this point
        (``state['noise_sigma']``: loss, gradient norm, :math:`\sigma`), whose
        :meth:`_noise_check` decides whether the point is a floor (ours, "noise19"). This
        step itself ends as before (``line_search_failed``, :math:`\lambda` raised).

        The Armijo search tries no rate whose first-order change :math:`t|s|` is within the
        float resolution :math:`\delta`; when it failed down to that limit
        (:math:`\text{shrink}\cdot t_{\min}|s| \le \delta`), the smallest rate's
        deviation from the undamped model along :math:`p`,

        .. math:: \sigma = f(t_{\min}) - f_0 - q(t_{\min}),\qquad
            q(t) = t s + t^2 (\Delta q - s),

        is rounding noise where it exceeds :math:`2\delta` (a smooth :math:`f` rounded to a
        few ulps stays within :math:`\delta` of a model whose change there is about
        :math:`\delta`) **and** does not grow from :math:`t_{\min}` to the full step as a
        model error does (as :math:`t^2` for Gauss-Newton's missing term, :math:`t^3` for the
        Hessian's): the full step's deviation :math:`f(1) - f_0 - \Delta q` must be at most
        :math:`\sigma / t_{\min}`. Kept only where the undamped model along the whole line
        offers at most :math:`\sigma` too, :math:`-\min_t q(t) = s^2 / (2 p^\top C p) \le
        \sigma` (beyond :math:`t = 1` where :math:`\lambda` shortened the step; not where
        :math:`p^\top C p \le 0`), and once per point. Measured on a badly scaled float32
        least-squares problem: ~178 failed line searches, :math:`\lambda` cycling 6e9-2e10,
        at a point whose float32 loss has rounding noise of ~700 :math:`\delta` among its
        1-ulp neighbours ("fullbatch16"); its first failed search measures :math:`\sigma` =
        969 :math:`\delta` against a whole step of 11.7 :math:`\delta`. Only on an objective
        seen deterministic (a mini-batch's changes are sampling, not rounding), without
        structural damping or a replayed random draw.
        """
        state, settings = run.state, self.settings
        point = [run.f0, run.report["grad_norm"]]
        if (
            state.get("deterministic") is not True
            or run.structural_damping > 0
            or math.isfinite(run.mask_noise)
            or settings.line_search is None
            or state.get("noise_checked") == point
            or not (slope < 0.0 and math.isfinite(predicted))
        ):
            return
        delta = _damping.resolution(run.f_base, torch.finfo(run.loss0.dtype).eps)
        if not settings.line_search_shrink * t_min * -slope <= delta:
            return  # the search stopped at its try limit, not at the resolution
        curvature = predicted - slope  # ½pᵀCp
        if not curvature > 0.0:
            return  # the undamped model falls without bound along p: no floor to judge
        sigma = f_min - run.f_base - (t_min * slope + t_min * t_min * curvature)
        full = f_full - run.f_base - predicted
        line_min = slope * slope / (4.0 * curvature)  # −min_t q(t), at t* = −s / 2(½pᵀCp)
        if sigma > 2.0 * delta and full <= sigma / t_min and line_min <= sigma:
            state["noise_sigma"] = [*point, sigma]

    def _noise_check(
        self,
        curvature: MatVec,
        product: object,
        evaluation: _Evaluation,
        g: Tensor,
        run: _StepRun,
        closure: Closure,
    ) -> bool:
        r"""Phase 2, at a point where the last step's failed search measured the rounding
        noise :math:`\sigma` (:meth:`_measure_noise`): whether the model offers no decrease
        above it, so that no evaluation of :math:`f` could confirm one (ours, "noise19").

        As :meth:`_floor_check` with :math:`\sigma` for :math:`\delta`: CG runs from zero
        with :math:`\lambda` at its floor (``min_damping``), rtol 0, no trust radius,
        preconditioner or objective checks; a floor only where it ends on positive curvature
        with a predicted decrease within :math:`\sigma` (the Newton decrement over the Krylov
        space, Boyd & Vandenberghe 2004, §9.5.1, at the noise's tolerance). Not the step's
        own :math:`p`: a step that :math:`\lambda`, the forcing term or the trust radius held
        short offers less than the model does (a one-iteration, trust-radius-bound step 12,600
        :math:`\delta` above the float64 optimum offered 20 :math:`\delta`). A floor is
        ``'converged'`` (``converged_by='rounding_noise'``): nothing moves, :math:`\lambda`
        and the trust radius stay, and the point (loss, gradient norm) is remembered in
        ``state['noise_floor']``, so later steps there stop after their first closure call;
        otherwise the step goes on as it would have, and the point is not checked again
        (``state['noise_checked']``) until a step is accepted.
        """
        state = run.state
        noted = state.pop("noise_sigma", None)
        point = [run.f0, run.report["grad_norm"]]
        if noted is None or noted[:2] != point or run.structural_damping > 0:
            return False
        state["noise_checked"] = point
        change, products = self._change_at_floor(curvature, product, evaluation, g, run, closure)
        run.report["cg_matvecs"] += products
        if not abs(change) <= noted[2]:  # σ; NaN (negative curvature): no floor
            return False
        state["noise_floor"] = point
        return True

    #: study switches ("unseen18"): trial calls keep the buffers a forward writes; f(θ0)
    #: re-evaluated as a trial where the step's call wrote such buffers
    _keep_trial_buffers = True
    _trial_baseline = True

    #: buffers written: where that extra f(θ0) equalled the step's own f(θ0) bitwise (the
    #: writes do not reach the loss: a forward counter), the next steps skip it, and every
    #: ``_baseline_recheck``-th step measures it again ("closure19"); steps left to skip
    _baseline_recheck = 10
    _baseline_skips = 0

    #: replay_rng: hold λ on a poor step within the mask noise (a class attribute so that
    #: experiments can compare against replay without it, "dropdefault").
    _hold_within_noise = True

    def _any_rank_drew_or_wrote(self, run: _StepRun, like: Tensor) -> tuple[bool, bool]:
        r"""Whether the step's first call, on this rank or, data parallel, on any rank, drew
        random numbers under replay_rng, and whether it wrote buffers other than BatchNorm's
        (with ``_trial_baseline``). Either makes the extra :math:`f(\theta_0)` evaluation,
        which averages over the ranks (a collective), so every rank makes it or none: a rank
        whose closure draws nothing evaluates its (deterministic) loss once more. Without the
        agreement a closure drawing on some ranks only left the ranks' collectives out of
        step. One collective on both flags per step in a data-parallel run, none in one
        process."""
        stream = run.counter.stream
        drew = stream is not None and stream.drew
        wrote = self._trial_baseline and run.counter.writes_buffers
        if not self._avg.active or self._avg.world_size == 1:
            return drew, wrote
        flags = torch.tensor([float(drew), float(wrote)], dtype=torch.float64, device=like.device)
        any_drew, any_wrote = (bool(v > 0.0) for v in self._avg.sum(flags).tolist())
        return stream is not None and any_drew, any_wrote

    @staticmethod
    def _observe_mask_noise(state: dict, run: _StepRun) -> None:
        r"""replay_rng: the loss's mask noise :math:`\nu`, the RMS of :math:`f(\theta_0; m_1) -
        f(\theta_0; m_2)` over recent steps (``state['mask_noise_sq']``, an exponential
        average with weight 0.9 on the past; ours)."""
        d2 = (run.f0 - run.f_base) ** 2
        if not math.isfinite(d2):
            return
        prev = state.get("mask_noise_sq")
        state["mask_noise_sq"] = d2 if prev is None else 0.9 * prev + 0.1 * d2
        run.mask_noise = math.sqrt(state["mask_noise_sq"])

    def _inconclusive(
        self, state: dict, run: _StepRun, actual: float, predicted: float, rho: float
    ) -> bool:
        r"""Phase 4, replay_rng: whether this step's :math:`\rho` cannot tell an overshoot from
        the mask noise, so that a poor :math:`\rho` or a rejection does not raise
        :math:`\lambda` (a good one still lowers it). Inconclusive when the deviation from the
        model is within the loss's mask noise, :math:`|\Delta f - \Delta q| \le \nu`
        (:meth:`_observe_mask_noise`; ours). Why: with common random numbers :math:`\rho \to
        g_2^\top g_1 / \|g_1\|^2` as :math:`\lambda` grows (the gradient's signal share), which
        sits below ¼ once the masks' noise dominates, and :math:`\lambda` then grew without bound
        (Dropout(0.3) MLP: 0.28 → 2.6e6, the loss frozen; ``experiments/README.md``,
        "dropoutrng" and "dropdefault"). The deviation shrinks with the step, so :math:`\lambda`
        stops growing where a step's effect is as large as the mask noise: where fresh masks
        per call (no replay) had kept it by chance. ``rho`` is unused here (experiments
        replace this method)."""
        if not (self._hold_within_noise and math.isfinite(run.mask_noise)):
            return False
        return abs(actual - predicted) <= run.mask_noise

    @staticmethod
    def _predicted_change(solution: _Solution, chosen: int, run: _StepRun) -> float:
        """Phase 4: :math:`q(p) - q(0)` of the undamped model at the chosen iterate (ρ's
        denominator), read off CG's :math:`\\phi` (no curvature product).

        The undamped model's change is CG's :math:`\\phi` less the damping's share:
        :math:`\\tfrac12\\lambda\\|p\\|^2` and the structural-damping energy
        :math:`\\tfrac12 w\\|J_h p\\|^2`, the one Jacobian product here, taken at the chosen
        iterate alone (and once: it releases the curvature graph). The scalars at :math:`p`
        are ``run.at_chosen``'s if phase 4 read them already.
        """
        p = solution.result.iterates[chosen]
        at = run.at_chosen
        if at is None:
            at = _AtChosen.read(solution.g, solution.result, chosen, run)
        damped = 0.5 * run.damping * at.pDp
        predicted = at.phi - damped
        if solution.structural is not None:
            product, solution.structural = solution.structural, None  # its graph goes now
            with torch.enable_grad():  # differentiates the curvature graph, whatever the mode
                energy = product.weight * product.hidden_energy(p.unsqueeze(0))
            structural = 0.5 * float(energy[0])
            predicted -= structural
            damped += structural
        run.damped_change = damped
        return predicted

    def _line_search(
        self,
        objective: Callable[[float], float],
        f0: float,
        slope: float,
        f_full: float,
        resolution: float,
    ) -> tuple[float, float]:
        """Phase 5: the accepted rate (0: rejected) and the objective there; no rate whose
        first-order decrease is within the objective's float ``resolution`` is tried."""
        settings = self.settings
        if not slope < 0.0:
            return 0.0, f_full  # not a descent direction (e.g. a poor warm start, one CG step)
        if settings.line_search is None:
            return (1.0 if f_full < math.inf else 0.0), f_full
        return armijo(
            objective,
            f0,
            slope,
            f_full,
            c=settings.armijo_c,
            shrink=settings.line_search_shrink,
            max_iter=settings.line_search_max_iter,
            resolution=resolution,
        )

    def _finish(
        self,
        run: _StepRun,
        status: StepStatus,
        *,
        accepted: bool = False,
        loss_after: float | None = None,
    ) -> None:
        """Record the step's :class:`StepInfo` (``last_step``, callback): the step ends."""
        state = run.state
        if status not in _NON_FINITE:
            state["failures"] = 0  # max_failures counts *consecutive* non-finite steps
        if not accepted:
            state.pop("good_streak", None)  # a step that did not move ends a streak of good ones
            for key in ("newton", "newton_streak"):
                state.pop(key, None)
        else:
            state.pop("floor_checked", None)  # a new point: _floor_check runs there afresh
            for key in ("noise_floor", "noise_sigma", "noise_checked"):
                state.pop(key, None)
        info = StepInfo(
            loss=run.f0,
            loss_after=run.f0 if loss_after is None else loss_after,
            accepted=accepted,
            status=status,
            damping=run.damping,
            next_damping=state["damping"],
            damping_floor=self._damping_policy(state).min_damping,
            closure_calls=run.counter.calls,
            time_products=run.counter.product_time,
            time_total=time.perf_counter() - run.t_start,
            time_phases=dict(run.times),
            **run.report,
        )
        self.last_step = info
        # the objective where the parameters now are, if it was evaluated exactly there
        at_evaluated = not accepted or (isinstance(run.lr, float) and run.lr == 1.0)
        if at_evaluated and math.isfinite(info.loss_after):
            state["objective_after"] = info.loss_after
        state["step"] += 1
        if self._generator is not None:
            state["rng_state"] = self._generator.get_state()
        if run.counter.stream is not None:  # before the callback, which may draw numbers
            run.counter.stream.leave()
        if self.settings.callback is not None:
            self.settings.callback(info)

    def _reject(self, run: _StepRun, status: StepStatus, what: str, *, grow: bool = True) -> None:
        """Leave the parameters as they are, grow λ, count the failure, warn or raise.

        Called from a phase method that ``step`` calls, so the warning points at the caller.
        """
        state, settings = run.state, self.settings
        state["failures"] += 1
        if grow:
            self._adapt_damping(state, state["damping"], lambda pol, lam: pol.after_non_finite(lam))
        if state["failures"] >= settings.max_failures:
            raise FloatingPointError(
                f"HessianFree: {state['failures']} consecutive steps had a non-finite value (this "
                f"one in {what}); the parameters were left unchanged each time "
                f"(max_failures={settings.max_failures}). Check the model and data for "
                "NaN/Inf, lower the learning rate or raise `damping`."
            )
        lam = state["damping"]
        # damping='auto' before its first finite step has no λ yet (nan): say so, not "nan"
        raised = (
            f"damping raised to {lam:.3g}"
            if math.isfinite(lam)
            else "damping not set yet (damping='auto' measures it at the first finite step)"
        )
        warnings.warn(
            f"HessianFree: non-finite value in {what}; step rejected, parameters unchanged, "
            f"{raised}.",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )
        return self._finish(run, status)


def _rho_taken(rho: float, rate: float, actual: float, slope: float, half_pCp: float) -> float:
    r"""Phase 5: :math:`\rho` of the step as taken, :math:`\theta_0 + t p` at the accepted rate
    :math:`t` (``StepInfo.rho``).

    Phase 4's :math:`\rho` (``rho``, which :math:`\lambda`'s update reads) is the full
    backtracked step's, ``-inf`` where that step raised the objective (Martens' reference
    code), also when the line search then accepted a smaller rate with a decrease: a log
    reader took those accepted steps for non-finite losses ("unseen16", "unseen18"). At
    :math:`t \ne 1` the undamped model predicts :math:`q(tp) - q(0) = t\,g^\top p +
    t^2\,\tfrac12 p^\top C p` (no product: both scalars are phase 4's), and ``actual`` is
    :math:`f(\theta_0 + tp) - f(\theta_0)`, the objective the line search measured; at
    :math:`t = 1` and on a rejected step (:math:`t = 0`, nothing taken) ``rho`` itself.

    Example:
        >>> _rho_taken(-math.inf, 0.5, -0.1875, -1.0, 0.5)  # q(p/2) - q(0) = -0.5 + 0.125
        0.5
    """
    if rate in (0.0, 1.0):
        return rho
    return _damping.reduction_ratio(actual, rate * slope + rate * rate * half_pCp)


def _overflow_fix(dtype: torch.dtype) -> str:
    """The end of the message for a loss too large for ``dtype``'s range."""
    return (
        f" (largest finite value {torch.finfo(dtype).max:.3g}): the loss is too large for "
        f"{dtype}; scale it down (a mean instead of a sum, targets in smaller units) or train "
        "in float64"
    )


def _check_params_assigned(groups: list[dict]) -> None:
    """Refuse a group whose ``'params'`` the user replaced by something other than a list of
    leaf tensors (``add_param_group`` checked and listed what the constructor got).

    ``opt.param_groups[0]['params'] = model.parameters()`` (a generator, which the first read
    of a step used up) ended in a bare ``IndexError``, a tensor (iterated by its rows) in a
    ``KeyError: 'step'``, a module in torch's ``AttributeError`` ("unseen16").
    """
    for i, group in enumerate(groups):
        params = group["params"]
        if isinstance(params, list | tuple) and all(
            isinstance(p, Tensor) and (p.is_leaf or p.retains_grad) for p in params
        ):
            continue
        if not isinstance(params, list | tuple):
            raise TypeError(
                f"`param_groups[{i}]['params']` was replaced by a {type(params).__name__}; it "
                "must be a list of tensors: assign a list, e.g. list(model.parameters()) or "
                "[weight] (a generator is used up by its first read)."
            )
        for j, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"`param_groups[{i}]['params'][{j}]` is a {type(p).__name__}; the list "
                    "must hold tensors, e.g. list(model.parameters())."
                )
            if not (p.is_leaf or p.retains_grad):
                raise ValueError(
                    f"`param_groups[{i}]['params'][{j}]` (shape {tuple(p.shape)}) is a non-leaf "
                    f"tensor (grad_fn={type(p.grad_fn).__name__}): a step would write into a "
                    "computed copy, not the model. Assign the parameters themselves, e.g. "
                    "list(model.parameters())."
                )


def _check_trainable(trained: list[Tensor], when: str = "", fix: str = "") -> None:
    """Refuse a parameter list with nothing to optimize."""
    if not trained:
        raise ValueError(
            f"No parameter requires gradients{when}; HessianFree has nothing to optimize{fix}."
        )
    if not any(p.numel() for p in trained):
        raise ValueError(
            f"Every parameter that requires gradients has zero elements (shapes "
            f"{[tuple(p.shape) for p in trained]}){when}; HessianFree has nothing to "
            f"optimize{fix}."
        )


# what ``opt.<name>`` reads from the settings (``__getattr__``) and refuses to assign
# (``__setattr__``, which every attribute assignment of a step passes through: a set, not
# ``HFSettings.keys()``'s tuple rebuilt from the dataclass fields each time)
_SETTING_NAMES = frozenset(HFSettings.keys()) | {"initial_damping"}


@contextlib.contextmanager
def _hooks_held(optimizer: torch.optim.Optimizer, name: str) -> Iterator[list[Callable]]:
    """Hold back the torch.optim hooks stored in ``name`` from a ``super()`` call that would
    run them before HessianFree's own part; the caller runs the yielded hooks at their place."""
    hooks = getattr(optimizer, name)
    setattr(optimizer, name, type(hooks)())
    try:
        yield list(hooks.values())
    finally:
        setattr(optimizer, name, hooks)


@dataclasses.dataclass
class _UndoRecord:
    """The optimizer's state before a step (:meth:`HessianFree._undo_record`)."""

    optimizer: HessianFree
    state: dict
    saved: dict
    step: int
    auto: tuple[object, bool]
    precond: object | None
    precond_attrs: dict | None

    def restore(self) -> None:
        """Put the optimizer's state back as it was when the record was taken.

        The generator is dropped: the next draw rebuilds it from the restored
        ``state['rng_state']`` (saved at every step's end) or from ``seed`` before the first
        step, as a resumed run does (its state costs 14 us to copy, a step of a tiny model 3
        ms)."""
        self.state.clear()
        self.state.update(self.saved)
        opt = self.optimizer
        opt._auto_precond, opt._auto_kfac_off = self.auto
        if self.precond is not None and self.precond_attrs is not None:
            attrs = vars(self.precond)
            attrs.clear()
            attrs.update(self.precond_attrs)
        opt._generator = None


def _holds_state(precond: object) -> bool:
    """Whether a ``precond=`` object may carry state from step to step: an instance with
    attributes (not a string, a function or a tensor)."""
    return (
        precond is not None
        and not isinstance(precond, str | Tensor)
        and not inspect.isroutine(precond)
        and bool(getattr(precond, "__dict__", None))
    )


def _shallow(value: object) -> object:
    """``value`` with a list, dict or set copied (its items by reference), else itself."""
    return copy.copy(value) if isinstance(value, list | dict | set) else value


#: State tensors laid out like the parameters (flat), in their dtype: load_state_dict casts them
#: to the parameters' dtype as torch does (its optimizers' buffers), all others keep their own.
_PARAMETER_SPACE_STATE = frozenset({"warm_start", "damping_diagonal"})


def _saved_dtypes(saved: object, loaded: object, cpu: bool = False) -> object:
    """``loaded`` (torch's cast copy of ``saved``) with each tensor replaced by ``saved``'s, in
    its own dtype, on ``loaded``'s device (the CPU with ``cpu``); lists, tuples and dicts are
    walked as torch's loader walks them."""
    if isinstance(saved, Tensor) and isinstance(loaded, Tensor):
        if saved.dtype == loaded.dtype:
            return loaded
        return saved.to(device="cpu" if cpu else loaded.device, copy=True)
    if isinstance(saved, Mapping) and isinstance(loaded, dict):
        return {k: _saved_dtypes(saved[k], v, cpu) if k in saved else v for k, v in loaded.items()}
    if (
        isinstance(saved, list | tuple)
        and type(saved) is type(loaded)
        and len(saved) == len(loaded)
    ):
        return type(loaded)(_saved_dtypes(s, v, cpu) for s, v in zip(saved, loaded, strict=True))
    return loaded


def _copied(state: Mapping) -> dict:
    """A per-parameter state dict with its tensors and lists copied (the step updates some in
    place: the warm start, the window of recent losses)."""
    return {
        k: v.clone() if isinstance(v, Tensor) else copy.copy(v) if isinstance(v, list) else v
        for k, v in state.items()
    }


def _scaled_system(
    scale: Tensor,
    damped: MatVec,
    b: Tensor,
    x0: Tensor | None,
    precond: Tensor | MatVec | None,
) -> tuple[MatVec, Tensor, Tensor | None, Tensor | MatVec | None]:
    r"""CG's problem in the variables :math:`y = S^{-1}p`, :math:`S` = ``scale`` (diagonal):
    :math:`(SBS)\,y = Sb` from :math:`\tilde B p = b`; a diagonal preconditioner :math:`d`
    becomes :math:`S^2 d`, an operator :math:`M^{-1}` becomes :math:`S^{-1}M^{-1}S^{-1}`."""

    def scaled(v: Tensor) -> Tensor:
        return damped(v * scale).mul_(scale)

    if isinstance(precond, Tensor):
        precond = precond * scale.square()
    elif callable(precond):
        inner = precond

        def precond(r: Tensor) -> Tensor:
            return inner(r / scale) / scale

    return scaled, b * scale, None if x0 is None else x0 / scale, precond


def _scaled_monitor(
    monitor: Callable[[int, Tensor], bool], scale: Tensor
) -> Callable[[int, Tensor], bool]:
    """CG's ``monitor`` for :func:`_scaled_system`'s variables: it sees :math:`p = Sy`."""
    return lambda i, y: monitor(i, y * scale)


def _checked_curvature(matvec: object) -> MatVec:
    """A ``curvature=`` callable's product ``v -> C v``, checked to return ``v``'s shape."""
    if not callable(matvec):
        raise TypeError(
            "The `curvature` callable must return a function v -> C v (flat tensors), got "
            f"{type(matvec).__name__}."
        )

    def product(v: Tensor) -> Tensor:
        out = matvec(v)
        if not isinstance(out, Tensor) or out.shape != v.shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"The `curvature` callable's product must return a tensor of shape "
                f"{tuple(v.shape)} like its input v, got {got}."
            )
        return out

    return product


def _with_weight_decay(
    g: Tensor, l2: float | Tensor, layout: ParamLayout, params: list[Tensor]
) -> Tensor:
    """:math:`g + \\kappa\\theta` (``l2`` a float or a per-entry vector)."""
    if isinstance(l2, float) and l2 == 0.0:
        return g
    theta_flat = layout.cat([p.detach() for p in params])
    return g.add(theta_flat * l2 if not isinstance(l2, float) else theta_flat.mul_(l2))


def _move(
    params: list[Tensor],
    theta0: list[Tensor],
    layout: ParamLayout,
    p: Tensor,
    rate: float,
    lr: float | Tensor,
) -> None:
    """:math:`\\theta \\leftarrow \\theta_0 + \\text{rate}\\cdot\\text{lr}\\cdot p` (just
    :math:`\\theta_0` for rate 0)."""
    with torch.no_grad():
        torch._foreach_copy_(params, theta0)
        if rate > 0.0:
            if isinstance(lr, float):
                torch._foreach_add_(params, layout.split(p), alpha=rate * lr)
            else:
                torch._foreach_add_(params, layout.split(p * lr), alpha=rate)


def _decay_reached(x0: Tensor, g: Tensor, layout: ParamLayout, decay: float) -> None:
    """``x0 *= decay`` on the parameters whose block of ``g`` is nonzero, ``x0 *= 0`` on the
    others (in place; one foreach 1-norm of ``g``, one foreach product by 0 or 1).

    The decay is applied as before (a Python float: a float16/bfloat16 ``x0`` is not scaled
    by decay rounded to its dtype) and the mask separately, exact in every dtype, so a step
    whose parameters all got a gradient warm-starts bit for bit as without the mask.
    """
    x0.mul_(decay)
    norms = torch.stack(torch._foreach_norm(g.split_with_sizes(layout.numels), ord=1))
    keep = (norms != 0).to(x0.dtype)  # a NaN norm keeps the block
    torch._foreach_mul_(list(x0.split_with_sizes(layout.numels)), list(keep.unbind()))


def _plain(value: object) -> object:
    """``value`` as plain, picklable data that reads the same in every process: numbers,
    strings, tuples, a :class:`ProductPolicy` by its fields; any other object by its type's (or
    a function's) qualified name, never its ``repr`` (which may hold a memory address) nor its
    state (a preconditioner's statistics are per rank until averaged)."""
    if isinstance(value, ProductPolicy):
        return repr(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    return getattr(value, "__qualname__", None) or type(value).__qualname__
