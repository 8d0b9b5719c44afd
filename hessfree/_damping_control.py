r"""How :class:`hessfree.HessianFree` adapts its damping, its floor and its trust radius.

The Levenberg-Marquardt :math:`\lambda` (its calibration at the first step, Nielsen's update
with the streak rule, the absolute and relative floors and when the relative floor's scale is
re-measured), Marquardt's diagonal metric, the local (Newton) phase's entry and exit, and
Steihaug's trust radius under the Hessian. Each constant's comment says where it was measured
(``experiments/README.md``). Constants are read only in this module, so that a study patching
one here (``monkeypatch.setattr(hessfree._damping_control, ...)``) changes every use.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from . import damping as _damping
from ._flat import LOW_PRECISION, dot
from ._step_types import _StepRun
from ._types import MatVec
from .cg import CGResult, CGStop, _low_precision_product
from .curvature import FisherProduct, GGNProduct, StructurallyDampedGGN

#: On a deterministic objective (Nielsen's rule, adapted λ), a step whose ρ is within
#: ``_STREAK_RHO`` of 1 extends a streak of such steps; the s-th consecutive one lowers λ by
#: ``_STREAK_DECREASE`` ** (s − 1) beyond Nielsen's ⅓ (⅓, ⅑, 1/27, ... in all), and any other
#: step ends the streak (ours; the increase side of Nielsen's ν doubling, mirrored). From
#: λ₀ = gᵀCg/gᵀg, ⅓ a step had spent whole time budgets with ρ ≈ 1 on every step
#: (``experiments/README.md``, "unseenfb" and "fblam").
_STREAK_RHO = 0.1
_STREAK_DECREASE = 1.0 / 3.0
#: ``cg_max_iter``/``cg_rtol`` ``'auto'`` on a deterministic objective with positive
#: semidefinite curvature (Gauss-Newton, Fisher): the local (Newton) phase begins after
#: ``_NEWTON_STEPS`` consecutive accepted steps at rate 1 (no line-search cut, no
#: extrapolation) whose :math:`\rho` is within ``_NEWTON_RHO`` of 1 and where :math:`\lambda`'s
#: share of the step's curvature, :math:`\lambda\|p\|^2 / p^\top C p`, is at most
#: ``_NEWTON_SHARE``: the model is accurate and the damping no longer shapes the step, the
#: Gauss-Newton regime of Levenberg-Marquardt (with ``HessianFree._quad_entry``, off by
#: default, also only for an outer loss quadratic in the outputs: "quadentry"). From there CG is
#: unpreconditioned (``'auto'``'s K-FAC is dropped), capped at 250 and
#: :math:`\eta \le \|g_k\|/\|g_1\|`, until a step does not move or moved the loss's Hessian too
#: far (``_PHASE_RANGE``) (ours; experiments/README.md,
#: gnquad: on MNIST-1D and digits full batch no rate-1 step had a share below 6.1e-3 and the
#: late steps extrapolate, ρ 1.2-1.3; on a small-residual fit the share fell below 1e-3 with
#: ρ ≈ 1 while K-FAC's 5-iteration steps converged linearly).
_NEWTON_STEPS = 3
_NEWTON_RHO = 0.25
_NEWTON_SHARE = 1e-3
#: The local phase ends where the outer loss's Hessian :math:`H_\ell` changed by more than
#: this (relative, along a fixed random output-space direction) over the phase's own step
#: (``HessianFree._check_phase_range``; ours). Measured over the phase's first steps
#: (experiments/README.md, "phaserule"): 0 on squared-error fits and PINN residual blocks,
#: 6e-4-1.5e-2 on small realizable soft-target CE/BCE fits, where the phase reaches 1e-13,
#: and 0.1-1.2 on the decoder, two-head, mixture and tied-LM models, where it costs.
_PHASE_RANGE = 1.0 / 32.0
#: ``trust_radius``: a full step with :math:`|\rho - 1| \le` ``_RADIUS_LIFT_RHO`` that ended
#: inside the ball, while CG has met no negative curvature, lifts :math:`\Delta` (ours; negdelta).
_RADIUS_LIFT_RHO = 0.1
#: Relative difference below which the closure's objective at the start of a step counts as
#: the previous step's ``loss_after`` (float roundoff of a reordered sum stays far below).
_SAME_OBJECTIVE_RTOL = 1e-5
#: After a mismatch, this many consecutive matches make the objective deterministic again
#: (a growing batch that has reached the whole training set; measured on MNIST-1D in
#: ``experiments/README.md``).
_SAME_OBJECTIVE_AGAIN = 3
#: ``relative_min_damping='auto'``: the fraction of the curvature scale on a stochastic
#: objective (CURVES: λ ≥ 0.28; ``experiments/README.md``, "lamfloor"), at the batch size
#: where the floor first applied; with the step's batch b (``_cases``) it falls as
#: (b₀ / b)^``_AUTO_FLOOR_FALL`` on a batch grown past b₀ and rises as b₀ / b on one below it
#: ("lead, stop 50"; "lead, stop 51").
_AUTO_RELATIVE_MIN_DAMPING = 0.01
#: The exponent of that fall (ours, measured on CURVES' and MNIST-1D's growing batches:
#: ``_DampingControl._observe_cases``).
_AUTO_FLOOR_FALL = 1.5
#: ``damping_metric='marquardt'``: diag(G) exactly where the outputs have at most this many
#: entries in all, else from ``_MARQUARDT_PROBES`` Rademacher probes in the outputs' space
#: (ours: the exact diagonal costs two batched backward passes per output entry).
_MARQUARDT_EXACT_OUTPUTS = 1024
_MARQUARDT_PROBES = 8


def _precision_share(dtype: torch.dtype) -> float:
    r"""``min_damping='auto'``'s floor in the gradient's precision, as a share of float32's:
    1 for float32 and the 16-bit types, :math:`\epsilon_{64}/\epsilon_{32} \approx 1.9
    \times 10^{-9}` for float64 (ours). 1e-8 of the curvature scale is below float32's
    resolution, but in float64 it capped the condition number a step resolves at ~1e8: a
    float64 polynomial least-squares problem stalled at f - f* = 1.5e-6 after 150 steps,
    where it reaches 3e-17 in 50 with the floor at eps's share (``experiments/README.md``,
    "unseenfb").

    Example:
        >>> _precision_share(torch.float32), _precision_share(torch.bfloat16)
        (1.0, 1.0)
        >>> round(_precision_share(torch.float64) * 1e9, 2)
        1.86
    """
    return min(1.0, torch.finfo(dtype).eps / torch.finfo(torch.float32).eps)


#: On a stochastic objective the relative floor's scale is re-measured (one product along g)
#: at most every this many steps (``HessianFree._raise_floor``): on K-FAC steps, in the first
#: ``2 _RISE_WINDOW`` steps (``experiments/README.md``, "cnnmb", "kfacfloor"), and then, as on
#: plain-CG steps, where the floor is stale (``HessianFree._floor_stale``).
_FLOOR_EVERY = 4
#: On plain-CG steps of a stochastic objective (and K-FAC steps after the first 2 windows)
#: the scale is re-measured at those steps only where the closure's loss, each step's on a
#: fresh batch, rose: the mean of the last ``_RISE_WINDOW`` steps' above that of the
#: ``_RISE_WINDOW`` before by more than ``_RISE_Z`` standard errors (``_loss_rose``). A
#: growing curvature scale then means steps that fit their own batch; without the rise it is
#: batch noise (``experiments/README.md``, "mbfloor": GRU/LSTM regressions bitwise, CE
#: classifiers 2-6x lower loss). And only where a step of the window overshot
#: (``_RISE_NEEDS_OVERSHOOT``, "ratchet2").
_RISE_WINDOW = 8
_RISE_Z = 1.0
#: A step held below the float resolution counts as kept short by λ (and λ is lowered) only
#: where λ‖p‖² exceeds this many times pᵀCp. At 1 the verdict was rounding's: a first CG step
#: along g under λ₀ = gᵀCg/gᵀg has λ‖p‖² = pᵀCp exactly, and the float32 comparison flipped
#: between CPUs (a test passed on one x86 machine and failed on another).
_DAMPING_DOMINATES = 2.0
#: A rise must also exceed this share of the earlier window's mean (``_loss_rose``). Off (0):
#: 0.35 bounded the GRU/LSTM regressions' cost at 400 steps (1.075x the floor without the
#: rise test vs 1.35x) but cut the GRU classifier's gain on its second seed (0.70x vs 0.215x):
#: a tie on the five problems' geometric mean (0.71 vs 0.69), with a share fitted to them
#: (experiments/README.md, "mbratchet"; ``experiments/_mbfloor.py`` passes it).
_RISE_SHARE = 0.0
#: A rise re-measures the scale only where a step of the same window overshot its model on
#: its own batch: ρ below this (``HessianFree._floor_stale``). Off (False): the rise alone
#: ("mbfloor"'s rule, which ratcheted the floor over long runs: "mbratchet", "ratchet2").
_RISE_NEEDS_OVERSHOOT = True
_OVERSHOT_RHO = 0.25


def _loss_rose(
    losses: list[float],
    window: int = _RISE_WINDOW,
    z: float = _RISE_Z,
    share: float = _RISE_SHARE,
) -> bool:
    r"""Whether the last ``window`` losses' mean exceeds the ``window`` before's by more than
    ``z`` standard errors and by more than ``share`` of the earlier mean's magnitude,
    :math:`\bar b - \bar a > \max(z \sqrt{(s_a^2 + s_b^2)/w},\ \mathrm{share}\,|\bar a|)`
    (sample variances; ``False`` with fewer than ``2 window`` losses).

    On mini-batches each step's starting loss is on a batch its step was not fitted to, so a
    rise is evidence from other data that the steps fit their own batches (the relative
    floor's scale is stale, :meth:`HessianFree._raise_floor`); a curvature scale that only
    fluctuates with the batch leaves it falling. No product, no host sync: floats the steps
    already read.

    Example:
        >>> _loss_rose([1.0, 1.1] * 4 + [2.0, 2.1] * 4), _loss_rose([2.0, 2.1] * 4 + [1.0] * 8)
        (True, False)
        >>> rise = [1.0, 1.1] * 4 + [1.2, 1.3] * 4  # 7 s.e., 19 % of the level
        >>> _loss_rose(rise), _loss_rose(rise, share=0.35)
        (True, False)
    """
    if len(losses) < 2 * window:
        return False
    a, b = losses[-2 * window : -window], losses[-window:]
    before = statistics.fmean(a)
    rise = statistics.fmean(b) - before
    spread = math.sqrt((statistics.variance(a) + statistics.variance(b)) / window)
    return rise > max(z * spread, share * abs(before))


#: _loss_probe's u: a generator of its own (no other stream moves), the same u every step
_PROBE_SEED = 20261203
#: _loss_quadratic: a relative change of H_ℓu up to this many ε(dtype) is rounding (a margin
#: for reduction order off the CPU; a quadratic loss gives the same bits there)
_PROBE_ULPS = 64


def _loss_probe(product: object) -> Tensor | tuple[Tensor, ...] | None:
    r""":math:`H_\ell u` of a Gauss-Newton product for a fixed random :math:`u` shaped like its
    outputs (blocks too), or ``None`` for any other curvature. One output-space product: a
    closed form, or a double backward through the outputs-to-loss graph only."""
    if type(product) is not GGNProduct:
        return None
    outputs = product.outputs
    seq = isinstance(outputs, (tuple, list))
    blocks = tuple(outputs) if seq else (outputs,)
    gen = torch.Generator(device=blocks[0].device).manual_seed(_PROBE_SEED)
    u = tuple(torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in blocks)
    hu = product.loss_hessian(u if seq else u[0])
    return tuple(t.detach() for t in hu) if isinstance(hu, tuple) else hu.detach()


def _probe_change(a: Tensor | tuple[Tensor, ...], b: Tensor | tuple[Tensor, ...]) -> float:
    r"""The relative change :math:`\max_k \|b_k - a_k\|_\infty / \|a_k\|_\infty` between two
    :func:`_loss_probe` results (blocks :math:`k`): 0 for a quadratic loss (the same bits on
    CPU), infinite if the shapes differ."""
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return math.inf
    change = 0.0
    for x, y in zip(a, b, strict=True):
        diff = float((y - x).abs().max()) if x.numel() else 0.0
        if diff > 0.0:
            change = max(change, diff / max(float(x.abs().max()), torch.finfo(x.dtype).tiny))
    return change


def _structural_weight(damping: float, mu: float, hidden: Tensor) -> float:
    """:math:`\\lambda\\mu/N` of the structural term (0 while ``damping='auto'`` is NaN)."""
    if math.isnan(damping):
        return 0.0
    return damping * mu / _examples(hidden)


def _cases(outputs: object) -> int:
    """The cases a closure's outputs hold: dimension 0 of ``outputs``, summed over residual
    blocks; 0 where that is not known (a bare loss, 0-d outputs)."""
    blocks = outputs if isinstance(outputs, tuple | list) else (outputs,)
    return sum(b.shape[0] for b in blocks if isinstance(b, Tensor) and b.dim() > 0)


def _examples(hidden: Tensor) -> int:
    """:math:`N`, the examples (dimension 0) of the recorded hidden states."""
    return hidden.shape[0] if hidden.dim() > 0 else 1


class _DampingControl:
    """The optimizer's damping, floor, local-phase and trust-radius rules (a mixin of
    :class:`hessfree.HessianFree`)."""

    @staticmethod
    def _observe_objective(state: dict, f0: float) -> None:
        """Whether the objective is deterministic: the closure's value at the start of this step
        against the previous step's at the same parameters (``extrapolate='auto'``).

        A mismatch (mini-batches, dropout, parameters changed between steps) switches
        extrapolation off; a match switches it on if no mismatch was ever seen, else only the
        ``_SAME_OBJECTIVE_AGAIN``-th consecutive one (a batch that grew to the full set).
        """
        previous = state.pop("objective_after", None)
        if previous is None:
            return
        same = math.isclose(f0, previous, rel_tol=_SAME_OBJECTIVE_RTOL, abs_tol=0.0)
        if not same:
            state["deterministic"], state["matches"] = False, 0
            state.pop("newton", None)  # the local phase is for one function (_track_newton)
            state.pop("newton_streak", None)
            state.pop("newton_reentry_grad_norm", None)  # _check_phase_range's, for that one
        elif state.get("deterministic") is False:
            state["matches"] = state.get("matches", 0) + 1
            if state["matches"] >= _SAME_OBJECTIVE_AGAIN:
                state["deterministic"] = True
        else:
            state["deterministic"] = True

    def _extrapolating(self, state: dict) -> bool:
        """Whether an accepted full step may be extended by doubling (``extrapolate``)."""
        on = self.settings.extrapolate
        return state.get("deterministic") is True if on == "auto" else on

    def _marquardt_metric(self, product: object, g: Tensor, run: _StepRun) -> Tensor:
        r"""``damping_metric='marquardt'``: this step's :math:`D`, Moré's running maximum of
        :math:`\mathrm{diag}(G)` (:func:`hessfree.damping.marquardt_metric`), kept as
        ``state['damping_diagonal']``; a non-finite diagonal leaves it as it was (the step
        is then rejected at CG's first product)."""
        if not isinstance(product, GGNProduct) or isinstance(
            product, FisherProduct | StructurallyDampedGGN
        ):
            raise ValueError(
                "damping_metric='marquardt' needs Gauss-Newton curvature, but the closure "
                "returned the loss alone (curvature='auto' is then the Hessian, whose diagonal "
                "need not be positive); make the closure return (loss, outputs) or "
                "(loss, (r_1, ..., r_K)), or use damping_metric='identity'."
            )
        total = product.jacobian.shape[0]
        probes = None if total <= _MARQUARDT_EXACT_OUTPUTS else _MARQUARDT_PROBES
        with torch.enable_grad():
            diagonal = product.diagonal(num_probes=probes, generator=self._rng(g.device))
        if self.settings.curvature_batch != "replicated":
            diagonal = self._avg.mean(diagonal)
        state = run.state
        previous = state.get("damping_diagonal")
        if previous is not None:
            previous = previous.to(device=g.device, dtype=g.dtype)
        if not bool(torch.isfinite(diagonal).all()):
            return (
                torch.ones_like(g) if previous is None else _damping.marquardt_metric(previous)[0]
            )
        metric, state["damping_diagonal"] = _damping.marquardt_metric(diagonal, previous)
        return metric

    def _calibrate_damping(
        self, curvature: MatVec, product: object, g: Tensor, g_norm: float, run: _StepRun
    ) -> None:
        """The curvature scale :math:`|g^\\top C g| / g^\\top D g` (one product), with
        :math:`D = I + (\\mu/N) J_h^\\top J_h` the metric that :math:`\\lambda` multiplies
        (:math:`D = I` without structural damping; with it, one more batched Jacobian pass):
        :math:`\\lambda_0` for ``damping='auto'``, and what ``relative_min_damping`` is a
        fraction of (kept as ``state['damping_scale']``)."""
        gCg, gDg = self._curvature_along(curvature, product, g, g_norm, run)
        scale = abs(gCg) / gDg if gDg > 0 else math.nan
        run.state["damping_scale"] = scale if math.isfinite(scale) else 0.0
        # min_damping='auto' keeps this first scale: the running maximum of _raise_floor raised
        # MNIST-1D's whole-batch floor 7x and its final loss 3x ("lamscale"); in float64 at
        # eps's share of it (_precision_share)
        share = _precision_share(g.dtype)
        run.state["min_damping_scale"] = run.state["damping_scale"] * share
        policy = self._damping_policy(run.state)
        unfloored = self._unfloored_policy(run.state)
        if math.isnan(run.damping):
            lam, shadow = policy.initial(gCg, gDg), unfloored.initial(gCg, gDg)
        else:  # a given damping, raised to the relative floor if below it
            lam, shadow = policy.clip(run.damping), unfloored.clip(run.damping)
        run.damping = run.state["damping"] = lam
        if self._relative_fraction(run.state) > 0:
            run.state["damping_unfloored"] = shadow
        if run.structural_damping > 0:
            product.weight = _structural_weight(lam, run.structural_damping, product.hidden)

    def _raise_floor(
        self, curvature: MatVec, product: object, g: Tensor, g_norm: float, run: _StepRun
    ) -> None:
        r"""The relative floor's scale raised to this step's :math:`|g^\top C g| / g^\top D g`
        where that is larger (one product along :math:`g`), and :math:`\lambda` to the floor.

        Why: the scale of the first step is a poor one where the curvature grows by orders of
        magnitude as the network trains. A ReLU CNN on digits at batch 100 (cross-entropy,
        ``experiments/README.md``, "cnnmb"): the quotient grew 0.2 → 359 in 50 steps, so the
        floor fixed at the first step let :math:`\lambda` fall to 1e-5 of it; Gauss-Newton
        steps that fit each 100-case batch then grew the weights' norm 3.4 → 200 and the
        training-set loss went up. A running maximum, not the latest value, since a
        mini-batch's quotient along its own noisy gradient jumps from step to step, and the
        floor is there for the largest curvature the steps meet. When it is measured:
        :meth:`_floor_due`.
        """
        gCg, gDg = self._curvature_along(curvature, product, g, g_norm, run)
        scale = abs(gCg) / gDg if gDg > 0 else math.nan
        state = run.state
        if not (math.isfinite(scale) and scale > state.get("damping_scale", 0.0)):
            return
        state["damping_scale"] = scale
        lam = self._damping_policy(state).clip(run.damping)
        if lam != run.damping:
            run.damping = state["damping"] = lam
            if run.structural_damping > 0:
                product.weight = _structural_weight(lam, run.structural_damping, product.hidden)

    def _curvature_along(
        self, curvature: MatVec, product: object, g: Tensor, g_norm: float, run: _StepRun
    ) -> tuple[float, float]:
        r""":math:`(g^\top C g, g^\top D g)` (one product; see :meth:`_calibrate_damping`).

        Under ``damping_metric='marquardt'`` along :math:`v = D^{-1}g` instead, CG's first
        direction in Moré's scaled variables: :math:`(v^\top C v, v^\top D v)`, whose
        quotient is invariant under a rescaling of the parameters (:math:`g^\top C g` is not).
        """
        v = g if run.metric is None else g / run.metric
        vCv, l2_vv, vDv, energy = self._along(curvature, product, g, v, 1.0, run)
        if not math.isfinite(vCv + l2_vv):
            # a float32 loss of scale ~2^48 or more: vᵀCv grows as the loss's cube and overflows
            # (the product itself from ~2^64) though g is finite, and λ was calibrated from an
            # infinite scale: every step accepted, but 6.2 in relative distance from the
            # unscaled run after 8 steps, 5-8-3 MLP ("unseen15"). Along v·2^-e (v's largest
            # entry below 1) every value scales exactly by a power of two, so the quotient is
            # the one an unbounded float32 would give (nothing changes where it did not overflow)
            largest = float(v.abs().max())
            if math.isfinite(largest) and largest > 1.0:
                c = 2.0 ** -math.frexp(largest)[1]
                vCv, l2_vv, vDv, energy = self._along(curvature, product, g, v * c, c, run)
        gDg = g_norm**2 if run.metric is None else vDv
        if run.structural_damping > 0:
            gDg += run.structural_damping * energy
        return vCv + l2_vv, gDg

    def _along(
        self, curvature: MatVec, product: object, g: Tensor, v: Tensor, c: float, run: _StepRun
    ) -> tuple[float, float, float, float]:
        r"""For :meth:`_curvature_along`, along ``v`` = :math:`c\,v_0`: :math:`v_0^\top C
        v_0`, :math:`\kappa v_0^\top v_0`, :math:`v_0^\top D v_0` (Marquardt's, else nan)
        and :math:`\|J_h g\|^2` (structural damping's, else nan), as float64 numbers."""
        settings = self.settings
        with torch.enable_grad():
            if v.dtype in LOW_PRECISION:  # as CG runs it: in float16 on v rescaled, into float32
                Cv = _low_precision_product(curvature, v, "curvature")(v.float())
            else:
                Cv = curvature(v)
            if settings.curvature_batch != "replicated":
                Cv = self._avg.mean(Cv)
            # vᵀCv, κvᵀv, then vᵀDv = gᵀD⁻¹g and ‖J_h g‖² where needed: one host read
            values = [dot(v, Cv), dot(run.l2 * v, v)]  # C includes the L2 term κ
            if run.metric is not None:
                values.append(dot(g, v))
            if run.structural_damping > 0:
                # ‖J_h g‖²: the structural term's share of λ's metric along g (same averaging)
                energy = product.hidden_energy(g.unsqueeze(0))[0] / _examples(product.hidden)
                if settings.curvature_batch != "replicated":
                    energy = self._avg.mean(energy)
                values.append(energy)
        # widened to float64 first, exactly: each value equals its own float()
        vCv, l2_vv, *rest = torch.stack([t.to(torch.float64) for t in values]).tolist()
        vDv = rest.pop(0) / c if run.metric is not None else math.nan
        energy = rest.pop(0) if run.structural_damping > 0 else math.nan
        return vCv / (c * c), l2_vv / (c * c), vDv, energy

    def _auto_floor_on(self, state: dict) -> bool:
        """Whether ``relative_min_damping='auto'`` floors this step: a stochastic objective
        (:meth:`_observe_objective`) with ``adapt_damping``, not structurally damped."""
        # a fixed λ (adapt_damping=False) is the caller's: not floored
        stochastic = state.get("deterministic") is False and self.settings.adapt_damping
        # structural damping (the last step's μ: the floor is set before this step's closure
        # output resolves it) already damps the steps the floor is there for; on RNN addition
        # the floor held λ on the plateau (experiments/README.md, "add50d")
        return stochastic and not state.get("structurally_damped", False)

    def _relative_fraction(self, state: dict) -> float:
        """``relative_min_damping`` in effect: ``'auto'`` is ``_AUTO_RELATIVE_MIN_DAMPING``
        × (b₀ / b)^``_AUTO_FLOOR_FALL`` where b > b₀ and × b₀ / b where b ≤ b₀
        (:meth:`_observe_cases`) where :meth:`_auto_floor_on`, and 0 otherwise."""
        c = self.settings.relative_min_damping
        if c == "auto":
            if not self._auto_floor_on(state):
                return 0.0
            first, now = state.get("floor_cases0", 0), state.get("floor_cases", 0)
            ratio = first / now if first > 0 and now > 0 else 1.0
            return _AUTO_RELATIVE_MIN_DAMPING * (ratio if ratio >= 1.0 else ratio**_AUTO_FLOOR_FALL)
        return c

    def _observe_cases(self, state: dict, outputs: object, like: Tensor) -> None:
        r"""The step's gradient batch b (:func:`_cases` of the closure's outputs, summed over
        the ranks) as ``state['floor_cases']``, and the first one seen while the ``'auto'``
        floor is on as ``state['floor_cases0']`` (b₀); nothing unless ``'auto'`` is on.

        Why the floor moves with b: it keeps CG from fitting the noise of the step's batch,
        and the variance of a batch's gradient and curvature falls as 1 / b. Fixed at its
        first value, it held CURVES' λ at 0.281 from step 100 to 500 of a batch growing 0.3 %
        a step (250 → 1,100 cases), where the tuned floor 30 / b fell 0.12 → 0.027; the
        defaults' error at equal time was 5.97x the tuned row's (run33; "lead, stop 50").
        Falling as b₀ / b it was 2.35x. A smaller batch (an epoch's short last one) raises it
        so, as the noise does. A growing batch lowers it faster, (b₀ / b)^1.5: measured, not
        derived. Along CURVES' best run the noise ratio ‖g_b − g‖² / ‖g‖² at the step's
        batch stayed 0.03-0.36 while the batch grew 9-fold: the noise alone would keep the
        floor level; yet every lower floor there was faster, λ sat on it throughout, and the
        step's own batch kept ρ ≈ 0.8-0.9: with two CG iterations a step (the mini-batch
        default) the steps fit little noise, and the floor's cost is the step length it
        takes. Falling as (b₀ / b)^1.5 CURVES' defaults reached 1.15x the tuned row, as
        (b₀ / b)² 0.82x, but on MNIST-1D's batch growing 10 % a step the square was 1.6x
        slower to the first loss target (its λ entered the whole-batch steps low and they
        overshot), where 1.5 was even with b₀ / b ("lead, stop 51"). On a fixed batch b = b₀
        and the floor is as before, bitwise; a bare-loss closure (no outputs, so no count)
        keeps b₀ / b = 1.
        """
        if self.settings.relative_min_damping != "auto" or not self._auto_floor_on(state):
            return
        n = _cases(outputs)
        if self._avg.active and self._avg.world_size > 1:  # every rank takes it: same state
            n = int(self._avg.sum(torch.tensor([n], dtype=torch.float64, device=like.device)))
        if n <= 0:
            state.pop("floor_cases", None)
            return
        state.setdefault("floor_cases0", n)
        state["floor_cases"] = n

    def _track_unfloored(self, state: dict, run: _StepRun) -> None:
        r"""Start, keep or release the :math:`\lambda` the rule would have without the relative
        floor (``state['damping_unfloored']``, updated by :meth:`_adapt_damping`).

        While the floor is on (``relative_min_damping`` > 0 in effect), the unfloored
        :math:`\lambda` follows every change the floored one gets, from the same :math:`\rho`
        but clipped to ``min_damping`` only. When the floor lifts (``'auto'`` on an objective
        seen deterministic again: a growing batch that became the whole set) :math:`\lambda`
        drops to it: the floor's steps told the rule that the model was good, and without the
        release :math:`\lambda` would start from the floor and come down by at most Nielsen's
        1/3 a step (MNIST-1D's growing batch: ``experiments/README.md``, "release").
        """
        if self._relative_fraction(state) > 0:
            if "damping_unfloored" not in state and not math.isnan(run.damping):
                state["damping_unfloored"] = run.damping
        elif "damping_unfloored" in state:
            self._release_floor(state, run, state.pop("damping_unfloored"))

    @staticmethod
    def _release_floor(state: dict, run: _StepRun, unfloored: float) -> None:
        r"""The relative floor lifted: :math:`\lambda` = the unfloored one, if lower."""
        if unfloored < run.damping:
            run.damping = state["damping"] = unfloored

    def _adapt_damping(
        self, state: dict, lam: float, change: Callable[[_damping.DampingPolicy, float], float]
    ) -> None:
        r"""``state['damping'] = change(policy, lam)`` under the floored policy, and the same
        change to the unfloored :math:`\lambda` if one is tracked (:meth:`_track_unfloored`)."""
        state["damping"] = change(self._damping_policy(state), lam)
        if "damping_unfloored" in state:
            shadow = state["damping_unfloored"]
            new = change(self._unfloored_policy(state), shadow)
            # ρ ≈ 1 of a two-iteration K-FAC step (cg_max_iter='auto' on mini-batches) says the
            # model is good along that short step, not for the 250-iteration solves that follow
            # the release: lowered on each, λ reached 1e-8 and MNIST-1D's first whole-batch
            # steps took 4-18 s (experiments/README.md, "kfac2"); raised, it is kept
            state["damping_unfloored"] = max(new, shadow) if state.get("cg_capped") else new

    def _floor_remeasured(self, state: dict) -> bool:
        """Whether this step of a stochastic objective re-measures the relative floor's scale:
        every ``_FLOOR_EVERY``-th step, where :meth:`_floor_due` says so."""
        return state["step"] % _FLOOR_EVERY == 0 and self._floor_due(state)

    def _floor_due(self, state: dict) -> bool:
        r"""Whether this ``_FLOOR_EVERY``-th step of a stochastic objective re-measures the
        relative floor's scale (:meth:`_raise_floor`): where the floor is stale
        (:meth:`_floor_stale`: the fresh batches' loss rose and a step overshot), and on
        K-FAC steps also in the first ``2 _RISE_WINDOW`` steps (before :func:`_loss_rose`
        can judge). Counted in steps, not in the fresh losses kept: a state dict without
        them (saved before ``recent_losses`` was kept) at step 20 re-entered the window for
        16 more steps (the same as before wherever at most one of the first 16 losses was
        non-finite: ``recent_losses`` holds finite ones only).

        Why the first steps: the scale of the first step, at the initial weights, is a poor
        one where the curvature jumps as soon as training starts. On the mini-batch ReLU CNN
        of "cnnmb" (``experiments/README.md``) the quotient went 0.2 → 30 by the 4th step, and
        that one raise is the whole fix there (the scale then stayed put for 90 steps). Why not
        later, as cnnmb's running maximum did at every 4th step: on CURVES' autoencoder at
        batch 250 the quotient along the mini-batch gradient grows 28 → 6,000 over 400 steps
        while the fresh batches' loss falls and λ ≈ 0.3 stays right (ρ ≈ 1); the ratchet held
        λ at 1 % of it (22 at step 300) and the train error at 21.5 where the fixed floor
        reached 12 ("kfacfloor"). After the first steps K-FAC steps follow plain CG's rule.
        """
        if self._kfac_in_use() and state["step"] < 2 * _RISE_WINDOW:
            return True
        return self._floor_stale(state)

    @staticmethod
    def _record_loss(state: dict, f0: float) -> None:
        """Keep the last ``2 _RISE_WINDOW`` finite objectives at the steps' starts, the fresh
        batches' losses that :func:`_loss_rose` reads (:meth:`_floor_stale`)."""
        if math.isfinite(f0):
            recent = state.setdefault("recent_losses", [])
            recent.append(f0)
            del recent[: -2 * _RISE_WINDOW]

    @staticmethod
    def _note_overshoot(state: dict, rho: float, hold: bool) -> None:
        """Phase 4: remember a step that overshot its model on its own batch (ρ below
        ``_OVERSHOT_RHO``, not within the mask noise) for :meth:`_floor_stale` ("ratchet2")."""
        if not (rho >= _OVERSHOT_RHO or hold):
            state["overshot_step"] = state["step"]

    @staticmethod
    def _damping_dominates(damped: float, half_pCp: float) -> bool:
        r"""Whether λ, not the loss's float floor, kept a step below the float resolution:
        :math:`\lambda\|p\|^2 > 2 p^\top C p` (``_DAMPING_DOMINATES``)."""
        return damped > _DAMPING_DOMINATES * half_pCp

    @staticmethod
    def _floor_stale(state: dict) -> bool:
        r"""Whether a mini-batch step (on K-FAC: after the first ones) should re-measure the
        relative floor's scale: the fresh batches' loss rose (:func:`_loss_rose`) *and* one
        of the last ``_RISE_WINDOW`` steps overshot on its own batch (:math:`\rho < 1/4` or
        NaN, unless held as mask noise: ``state['overshot_step']``; a step rejected before
        :math:`\rho`, on a non-finite value, does not count).

        Two pieces of evidence on different data. The rise compares batches a step was not
        fitted to, so batch-to-batch noise passes it now and then (16 % of checks at 1 s.e.);
        :math:`\rho` compares one batch before and after its own step (paired: the batch's
        level cancels), and a step that overshoots its model is what a floor below the
        curvature lets through. On the GRU/LSTM regressions (6 runs of 400 steps under the
        fixed floor) none of the 63 rises had an overshoot in its window (0-5 overshoots a
        run, all before step 14); on the GRU classifier and bag of words 112 of 123 did, on
        CNN-BN 14 of 37 (``experiments/README.md``, "ratchet2"). ¼ is the
        Levenberg-Marquardt / trust-region threshold of a poor model (Martens 2010, §4.1;
        Nocedal & Wright, Algorithm 4.1), not fitted here.
        """
        if not _loss_rose(state.get("recent_losses", [])):
            return False
        if not _RISE_NEEDS_OVERSHOOT:
            return True
        overshot = state.get("overshot_step")
        return overshot is not None and state["step"] - overshot <= _RISE_WINDOW

    def _relative_floor(self, state: dict) -> float:
        """``relative_min_damping`` × the curvature scale (0 until that is known), at most
        ``max_damping``."""
        scale = state.get("damping_scale", 0.0)
        return min(self._relative_fraction(state) * scale, self.settings.max_damping_at(scale))

    def _unfloored_policy(self, state: dict) -> _damping.DampingPolicy:
        """:meth:`HFSettings.damping_policy` at this state's curvature scales (the first, for
        ``min_damping='auto'``; the latest, for ``max_damping='auto'``)."""
        return self.settings.damping_policy(
            state.get("min_damping_scale", 0.0), state.get("damping_scale", 0.0)
        )

    def _damping_policy(self, state: dict) -> _damping.DampingPolicy:
        """:meth:`HFSettings.damping_policy` with its lower bound raised to the relative
        floor (:meth:`_relative_floor`) where that is higher; ``min_damping='auto'`` is
        relative to the same curvature scale (:meth:`HFSettings.min_damping_at`)."""
        policy = self._unfloored_policy(state)
        floor = self._relative_floor(state)
        if floor > policy.min_damping:
            policy = dataclasses.replace(policy, min_damping=floor)
        return policy

    #: ``_STREAK_DECREASE`` (a class attribute so that experiments can compare against 1).
    _streak_decrease = _STREAK_DECREASE

    #: The local phase (_NEWTON_STEPS) on or off: a class attribute for experiments/_gnquad.py's
    #: comparison with the code before it (``False``); not a setting.
    _newton_phase: ClassVar[bool] = True

    def _track_newton(
        self, state: dict, run: _StepRun, rho: float, rate: float, share: float
    ) -> None:
        r"""Phase 5, an accepted step: whether the local (Newton) phase of a deterministic
        objective has begun (``state['newton']``; ``_NEWTON_STEPS``), where ``'auto'`` solves
        with plain CG, a cap of 250 and :math:`\eta \le \|g_k\|/\|g_1\|` (``cg_max_iter``,
        ``cg_rtol``): inexact Newton with :math:`\eta_k = O(\|g_k\|)`, which converges locally
        as fast as the exact Gauss-Newton iteration (quadratically on a zero-residual fit;
        Dembo, Eisenstat & Steihaug 1982, §3). The phase lasts until a step does not move
        (:meth:`_finish`), the objective changes (:meth:`_observe_objective`) or a phase step
        changed the loss's Hessian by more than ``_PHASE_RANGE`` (:meth:`_check_phase_range`,
        which also bounds ‖g‖ for the next start). A growing
        batch is seen deterministic only after it has been the whole set on
        ``_SAME_OBJECTIVE_AGAIN`` consecutive steps, so the phase cannot begin while it is
        partial."""
        state["newton_share"] = share
        if state.get("newton"):
            return
        accurate = (
            self._newton_phase
            and state.get("deterministic") is True  # a grown batch once seen whole again
            and run.structural_damping == 0
            and run.semidefinite
            and not run.bounded
            and rate == 1.0
            and abs(rho - 1.0) <= _NEWTON_RHO
            and share <= _NEWTON_SHARE  # NaN: no
            and self._loss_quadratic(run)
            # after a phase left for its range (_check_phase_range): only once ‖g‖ has fallen
            # by the factor that brings the change over a Newton step within the bound
            and run.report["grad_norm"] <= state.get("newton_reentry_grad_norm", math.inf)
        )
        if not accurate:
            state.pop("newton_streak", None)
            return
        state["newton_streak"] = streak = state.get("newton_streak", 0) + 1
        if streak >= _NEWTON_STEPS:
            state["newton"] = True

    #: The local phase's range test (:meth:`_check_phase_range`) on or off, and its bound:
    #: class attributes for experiments/_phaserule.py (``False``: the phase before it).
    _phase_exit: ClassVar[bool] = True

    _phase_range: ClassVar[float] = _PHASE_RANGE

    def _check_phase_range(self, product: object, run: _StepRun) -> None:
        r"""Phase 2 of a step in the local phase: end the phase if the loss's curvature moved
        too far over the phase's previous step (``_PHASE_RANGE``; ours).

        :math:`\delta = \|H_\ell(\theta_k) u - H_\ell(\theta_{k-1}) u\|_\infty / \|H_\ell
        (\theta_{k-1}) u\|_\infty` for the fixed random output-space :math:`u` of
        :func:`_loss_probe`, between the starts of two consecutive phase steps: the relative
        change of the outer loss's Hessian over a Newton step, the quantity Newton's local
        theory asks to be small (Kantorovich: :math:`\|H(\theta + p) - H(\theta)\| \ll \|H\|`
        over the Newton step :math:`p`; Nocedal & Wright 2006, Thm. 3.5). A sum of squares has
        :math:`\delta = 0` (the phase is unchanged there); cross-entropy, BCE or a mixture
        likelihood have :math:`\delta` of the order of the step's change of the outputs.
        Above the bound the phase ends before this step's solve, and it may begin again only
        once :math:`\|g\|` has fallen to :math:`\|g_k\|\,` ``_PHASE_RANGE`` :math:`/\delta`
        (near a minimum the Newton step, and with it :math:`\delta`, shrinks with
        :math:`\|g\|`). One output-space product and one scalar per phase step (averaged
        over the ranks, so that all leave together); none for other curvatures (no probe)."""
        state, g_norm = run.state, run.report["grad_norm"]
        probe = _loss_probe(product)
        # in the state, so that a run resumed from state_dict() (or a pickled copy) decides as
        # the uninterrupted one
        before = state.pop("phase_probe", None)
        if probe is not None:
            state["phase_probe"] = (state["step"], probe, g_norm)
        if probe is None or before is None or before[0] != state["step"] - 1:
            return  # the phase's first step, or a curvature without H_ℓ
        like = probe[0] if isinstance(probe, tuple) else probe
        change = self._avg.mean_scalar(_probe_change(before[1], probe), like)
        if change <= self._phase_range:
            return
        for key in ("newton", "newton_streak", "warm_start"):
            # the warm start too: the phase's long solution is the range just found too far,
            # and K-FAC's 5-iteration solves from it stayed there (ρ = −∞ for ~10 steps)
            state.pop(key, None)
        # ‖g‖ where that Newton step was computed (the step's end can have a larger one)
        bound = before[2] * self._phase_range / change if math.isfinite(change) else 0.0
        state["newton_reentry_grad_norm"] = bound
        state.pop("phase_probe", None)

    #: Whether the local phase also needs :meth:`_loss_quadratic` (off: main's entry). Built
    #: and measured in "quadentry", not adopted: it gained on the deconvolution decoder
    #: (0.65-0.89× the gap to the teacher at 4-12 s), the two-head and the mixture-density
    #: models, but a tiny soft-target cross-entropy fit (3-6-4 tanh, realizable) that main's
    #: phase solves to ~1e-13 stayed at 1e-7-1e-6 under K-FAC's capped steps (1.8-5e5× worse on
    #: 11 of 12 runs): a full-batch fit where L-BFGS is the incumbent, which the default must
    #: not give up for a smaller loss where HF loses to Adam either way.
    _quad_entry: ClassVar[bool] = False

    #: :meth:`_loss_quadratic`'s bound on the relative change of :math:`H_\ell u` from one
    #: measured step to the next; ``None``: rounding, ``_PROBE_ULPS`` ε of the outputs' dtype
    #: (a sum of squares gives exactly 0 on CPU). A class attribute for
    #: experiments/_quadentry.py: a tolerance of 2e-2 let the deconvolution decoder (3e-2-7e-2
    #: a step at main's entry) into the phase later, as its steps shrank, and lost what the
    #: exact test gained there ("quadentry").
    _loss_change_max: ClassVar[float | None] = None

    def _loss_quadratic(self, run: _StepRun) -> bool:
        r"""Whether the outer loss looks quadratic in the outputs (its Hessian :math:`H_\ell`
        independent of them), the condition for the local phase besides the streak
        (:meth:`_track_newton`): :math:`H_\ell u` for one fixed random output-space :math:`u`
        (:func:`_loss_probe`) equals, to rounding, its value at the previous step where it was
        measured. For a sum of squares (MSE, a PINN's weighted residual blocks) the
        Gauss-Newton model is then the exact loss of the linearised network and stays accurate
        over the phase's long solves; for cross-entropy, BCE or a mixture likelihood
        :math:`H_\ell` moves with the outputs and the phase's long solves paid off on none of
        the fits measured (ours; experiments/README.md, "newtonexit", "quadentry"). True where
        no probe exists (other curvatures: entry as before) or at the first measurement."""
        probe = run.loss_probe
        if probe is None:
            return True
        before, self._loss_probe_seen = getattr(self, "_loss_probe_seen", None), probe
        limit = self._loss_change_max
        if limit is None:
            dtype = (probe[0] if isinstance(probe, tuple) else probe).dtype
            limit = _PROBE_ULPS * torch.finfo(dtype).eps
        return before is None or _probe_change(before, probe) <= limit

    def _good_streak(self, state: dict, rho: float, share: float) -> int:
        r"""Phase 4: the number of consecutive steps, this one included, whose :math:`\rho`
        is within ``_STREAK_RHO`` of 1 and whose damping dominated the model
        (``share`` = :math:`\lambda\|p\|^2 / p^\top C p > 1`), on a deterministic objective
        under Nielsen's adapted rule (``state['good_streak']``); 0, and the streak ends, on
        any other step.

        Only a deterministic objective: there :math:`\rho` compares the model with the very
        function it approximates, so :math:`\rho \approx 1` on steps that :math:`\lambda`
        kept short is evidence that :math:`\lambda`, not the model, limits them; on
        mini-batches a good :math:`\rho` measures one batch only. Only while :math:`\lambda`
        dominates: on a GELU regression a streak that went on once :math:`\lambda` was 4 % of
        the step's curvature cut :math:`\lambda` 81-fold and the next five steps failed
        (``experiments/README.md``, "fblam").
        """
        settings = self.settings
        eligible = (
            state.get("deterministic") is True
            and settings.adapt_damping
            and settings.damping_rule == "nielsen"
            and not state.get("structurally_damped", False)
            and self._streak_decrease < 1.0
        )
        if not (eligible and abs(rho - 1.0) <= _STREAK_RHO and share > 1.0):
            state.pop("good_streak", None)
            return 0
        state["good_streak"] = streak = state.get("good_streak", 0) + 1
        return streak

    #: Trust-radius rules as class attributes, so that experiments can compare them with main's
    #: (``experiments/_negdelta.py``, ``_negdelta2.py``): Δ₀ from the curvature scale, the lift
    #: inside the ball, and Δ after a failed line search. All on: to targets Δ₀ and the lift
    #: cost 0.79-0.92× on a saddle, 0.91-0.97× on a deep linear net, 0.90-1.12× on the PINN;
    #: convex Hessian closures are unchanged. They were off because the PINN's loss after 80
    #: steps ended higher on 3 of 4 seeds; over 20 runs (4 seeds × λ₀ × 0.98-1.02) it is lower,
    #: gmean 0.63×: a 1 % change of λ₀ alone moves that loss 1.5× (experiments/README.md,
    #: negdelta and negdelta2).
    _radius_initial = True

    _radius_lift = True

    _radius_after_failure = True

    def _initial_radius(self, state: dict, g: Tensor) -> None:
        r"""Phase 2, first step with ``trust_radius``: :math:`\Delta_0 = \|g\| / s` with
        :math:`s = |g^\top C g| / g^\top g` the curvature along :math:`g` measured for
        ``damping='auto'`` and the relative floor (``state['damping_scale']``; :math:`\lambda_0
        = s`): the length of the step :math:`-g/s`, scale-free (ours). Left infinite where
        :math:`s` was not measured or is 0. From a start near a saddle with
        :math:`\Delta_0 = \infty`, CG's steps along nearly flat directions were ~1e14 long and
        the first four line searches failed after 61 closure calls each; on a convex problem
        the first step, :math:`\|(C + \lambda_0 I)^{-1} g\| \le \|g\|/\lambda_0`, ends
        inside the ball and with :math:`\rho \approx 1` lifts it (``_update_radius``)
        (experiments/README.md, negcurv and negdelta)."""
        scale = state.get("damping_scale", 0.0)
        if self._radius_initial and scale > 0.0:
            radius = float(g.norm()) / scale
            if 0.0 < radius < math.inf:
                state["trust_radius"] = radius

    def _update_radius(
        self,
        state: dict,
        result: CGResult,
        chosen: int,
        p: Tensor,
        rho: float,
        rate: float,
        smallest: float = 1.0,
    ) -> None:
        r"""Phases 4-5: the trust radius for the next CG (``trust_radius``), from the
        step's line-search ``rate`` (0: failed, after trying rates down to ``smallest``),
        :math:`\rho` and where CG stopped. :math:`\Delta = \infty` (``math.inf`` in
        ``state['trust_radius']``) bounds nothing."""
        radius = state.get("trust_radius", math.inf)
        if result.reason is CGStop.NEGATIVE_CURVATURE:
            state["radius_negative_seen"] = True
        if 0.0 < rate < 1.0:
            # the line search walked back along p as backtracking does along CG's path: the
            # model is trusted as far as the step taken (ours). Without it Δ stayed infinite
            # through a negative-curvature phase, whose steps the line search cut 5-100×
            # (experiments/README.md, negcurv)
            state["trust_radius"] = rate * float(p.norm())
        elif (
            rate == 0.0
            and self._radius_after_failure
            and state.get("deterministic") is not False
            and float(p.norm()) > 0.0
        ):
            # no rate down to `smallest` decreased f enough: the model is not trusted that far
            # (ours; main kept Δ: at a saddle with Δ = ∞ four searches failed, 61 calls each).
            # Not where the objective is seen stochastic: there a search fails on noise, and a
            # radius of 0.8⁵⁹‖p‖ that only doubles per step froze a noisy quadratic 0.74 from
            # its minimiser (tests/test_rng.py, noise dominating the gradient)
            state["trust_radius"] = smallest * float(p.norm())
        elif chosen < len(result.iterates) - 1:  # backtracking walked back: the model overshot
            state["trust_radius"] = 2.0 * float(p.norm())
        elif (
            self._radius_lift
            and abs(rho - 1.0) <= _RADIUS_LIFT_RHO
            and rate >= 1.0
            and result.reason is not CGStop.TRUST_RADIUS
            and not state.get("radius_negative_seen", False)
        ):
            # the model held where CG stopped of itself, on curvature positive so far (a
            # convex problem's first step ends inside Δ₀): Δ bounds nothing useful, and
            # doubling it per step held a convex quadratic's steps to the sphere while λ fell
            # 3-27× a step. After negative curvature the lift cost the PINN 1.13×
            # (experiments/README.md, negdelta)
            state["trust_radius"] = math.inf
        elif result.reason is CGStop.TRUST_RADIUS and rho > 0.75:
            state["trust_radius"] = 2.0 * radius
