r"""Truncated preconditioned conjugate gradient, the inner solver of Hessian-free optimization.

Notation (used as variable names below):

- :math:`A` — the symmetric matrix, seen only through products :math:`v \mapsto Av`
  (in HF: the damped curvature :math:`B = C + \lambda I`).
- :math:`b` — the right-hand side (in HF: :math:`b = -g`).
- :math:`x_i` — the iterate after :math:`i` iterations; :math:`x_0` is the start.
- :math:`r_i = A x_i - b` — the residual, kept with this sign throughout; it is the
  gradient of :math:`\phi` at :math:`x_i`.
- :math:`M`, :math:`z_i = M^{-1} r_i` — the preconditioner and the preconditioned residual.
- :math:`p_i` — the search direction, :math:`p_0 = -z_0`.
- :math:`\phi(x) = \tfrac12 x^\top A x - b^\top x = \tfrac12 x^\top (r - b)` — the
  quadratic being minimized, evaluated from the residual without an extra product.
  With :math:`b = -g`, :math:`\phi(p) = g^\top p + \tfrac12 p^\top A p = q(p) - q(0)`.
- :math:`\alpha_i = r_i^\top z_i / p_i^\top A p_i` and
  :math:`\beta_{i+1} = r_{i+1}^\top z_{i+1} / r_i^\top z_i` — step length and
  conjugation coefficient of Nocedal & Wright (2006), Algorithm 5.3.

The solver follows Algorithm 5.3 with Martens' (2010) changes for HF: the
relative-progress stop (§4.4), a stop on non-positive curvature, warm starts through
``x0`` (§4.5) and iterates kept on a geometric grid for CG backtracking (§4.6).

All vector arithmetic stays on the device of ``b``. Off the CPU, or with ``check_every > 1``,
the scalars (:math:`r^\top z`, :math:`p^\top Ap`, :math:`\phi`) are 0-dim device tensors,
the stop tests are evaluated on the device in every iteration and read back to the host only
every ``check_every`` iterations; after a stop has fired on the device, the remaining
iterations of the block leave every quantity unchanged, so the result does not depend on
``check_every``. On the CPU with a read every iteration (the default there), where a read
costs no wait but each 0-dim operation a few microseconds, :math:`p^\top Ap`, :math:`\alpha`,
:math:`r^\top z` and :math:`\phi`'s two dot products are read to the host instead and the
tests done in Python floats, rounded as the tensor operations round: the same result bit for
bit (:class:`_HostTests`), at a quarter to a third of the loop's own time.

A float16 ``b`` is solved in float32: :math:`x, r, p, z` and the scalars
are float32, each product runs in ``b``'s dtype on the vector rescaled by a power of two to a
largest entry in :math:`[\tfrac12, 1)` (exact; :math:`Av = 2^e A(2^{-e}v)`) and is scaled back
in float32, and ``x`` and the stored iterates are returned in ``b``'s dtype (``phi_history``
stays float32). In float16 the squared norms :math:`r^\top z, p^\top Ap` leave the dtype's
range (:math:`6 \cdot 10^{-8}` to 65504) once :math:`\|r\| < 2.4 \cdot 10^{-4}` or
:math:`> 256`: :math:`r^\top r = 0` gave :math:`\beta = 0/0` and a NaN direction.

How tightly to solve is the caller's choice (``rtol``); :func:`forcing_term` is the
inexact-Newton choice of Eisenstat & Walker (1996), the default of
:class:`~hessfree.HessianFree`: loose while the gradient falls slowly, tight as it falls fast.

References:
    Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.4–4.6.
    Nocedal & Wright (2006), Numerical Optimization, 2nd ed., Algorithm 5.3 and §7.1.
    Eisenstat & Walker (1996), Choosing the forcing terms in an inexact Newton method,
    SIAM J. Sci. Comput. 17(1), choice 2.
"""

from __future__ import annotations

import array
import enum
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from hessfree._checks import check_int, check_number, check_vector
from hessfree._flat import LOW_PRECISION
from hessfree._types import MatVec

__all__ = ["CGResult", "CGStop", "StopReason", "cg", "forcing_term", "relative_forcing_term"]

# §4.4: k = max(10, ceil(0.1 i)), from the paper and the reference code.
_PROGRESS_MIN_GAP = 10
_PROGRESS_GAP_DIVISOR = 10

#: Largest ``max_iter``: CG keeps 16 bytes per possible iteration (its φ history and stop
#: flags), so an unbounded count would fail allocating before the first product.
MAX_ITER_LIMIT = 1_000_000


def _check_max_iter(name: str, value: object) -> int:
    """An iteration cap in ``[1, MAX_ITER_LIMIT]``.

    Example:
        >>> _check_max_iter("cg_max_iter", 2**40)
        Traceback (most recent call last):
        ...
        ValueError: `cg_max_iter` must be an int in [1, 1000000], got 1099511627776.
    """
    value = check_int(name, value, low=1)  # the message of 0 says >= 1
    return check_int(name, value, low=1, high=MAX_ITER_LIMIT)


# Columns of the per-iteration flag table that the host reads back (see `_decode`).
_FINITE_PAP, _POSITIVE_PAP, _FINITE_ALPHA, _FINITE_AFTER, _CONVERGED, _PROGRESS = range(6)
_INSIDE, _SINGULAR = 6, 7


class CGStop(enum.Enum):
    """Why :func:`cg` stopped (``CGResult.reason``); ``StopReason`` is its former name."""

    #: :math:`\|r\| \le \max(\mathrm{rtol}\,\|b\|, \mathrm{atol})` (and :math:`\phi < 0`
    #: with ``descent_stop`` from a nonzero start).
    CONVERGED = "converged"
    #: Martens' (2010, §4.4) relative-progress test fired.
    RELATIVE_PROGRESS = "relative_progress"
    #: ``max_iter`` iterations were done.
    MAX_ITER = "max_iter"
    #: :math:`p^\top A p \le 0`; the iterate before that direction is returned, or at the
    #: first iteration a step along the (preconditioned) steepest-descent direction; with
    #: ``max_norm``, the point where that direction meets the sphere (Steihaug 1983).
    NEGATIVE_CURVATURE = "negative_curvature"
    #: The next iterate would leave the ball :math:`\|x\| \le` ``max_norm``; the point where
    #: the CG path crosses the sphere is returned (Steihaug 1983).
    TRUST_RADIUS = "trust_radius"
    #: A NaN or Inf appeared (in ``b``, a product or the preconditioner).
    NON_FINITE = "non_finite"
    #: ``monitor`` returned True at a stored iterate (e.g. the objective rose there).
    MONITOR = "monitor"
    #: The preconditioner is (numerically) singular: :math:`z = M^{-1} r` is (nearly)
    #: orthogonal to a nonzero :math:`r`, :math:`|r_i^\top z_i| / r_i^\top r_i \le
    #: \epsilon\,|r_0^\top z_0| / r_0^\top r_0` (:math:`\epsilon` the machine epsilon of CG's
    #: dtype, float32's for bfloat16), or :math:`r_0^\top z_0 = 0`. CG then only reduces the
    #: residual inside :math:`M^{-1}`'s range; the rest of :math:`r` stays. ``x`` is
    #: :math:`x_i`.
    SINGULAR_PRECONDITIONER = "singular_preconditioner"


#: Former name of :class:`CGStop`, kept so existing imports work.
StopReason = CGStop


@dataclass(frozen=True, eq=False)
class CGResult:
    r"""Outcome of :func:`cg`.

    Attributes:
        x: The final iterate :math:`x_{\mathrm{num\_iter}}`; the same tensor as
            ``iterates[-1]``.
        iterates: Iterates kept for CG backtracking (§4.6): those on the geometric grid,
            plus the final one, in increasing iteration order.
        iterations: The iteration number of each entry of ``iterates``.
        iterate_phi: :math:`\phi` at each entry of ``iterates`` (1-D tensor).
        phi_history: :math:`\phi(x_i)` for ``i = 0, ..., num_iter`` (1-D tensor of
            length ``num_iter + 1``; entry 0 is the start).
        num_iter: Completed iterations; ``x`` is :math:`x_{\mathrm{num\_iter}}`.
        num_matvec: Products :math:`Av` evaluated, including the one for ``r_0`` when a
            nonzero ``x0`` is given and the up to ``check_every - 1`` products spent after
            a stop that the host only notices at the next read-back.
        reason: Why CG stopped.
    """

    x: Tensor
    iterates: list[Tensor]
    iterations: list[int]
    iterate_phi: Tensor
    phi_history: Tensor
    num_iter: int
    num_matvec: int
    reason: CGStop


def cg(
    matvec: MatVec,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    max_iter: int = 250,
    min_iter: int = 0,
    rtol: float = 1e-5,
    atol: float = 0.0,
    precond: MatVec | Tensor | None = None,
    progress_tol: float | None = 5e-4,
    store_start: int = 5,
    store_ratio: float = 1.3,
    check_every: int | None = None,
    max_norm: float | None = None,
    descent_stop: bool = False,
    monitor: Callable[[int, Tensor], bool] | None = None,
) -> CGResult:
    r"""Approximately minimize a quadratic model by truncated, preconditioned CG.

    Minimizes :math:`\phi(x) = \tfrac12 x^\top A x - b^\top x` using only products
    :math:`v \mapsto Av`, by Algorithm 5.3 of Nocedal & Wright with the residual
    :math:`r = Ax - b`. After iteration :math:`i` it stops, in this order of precedence, when

    - :math:`p^\top A p \le 0` for the next direction (``NEGATIVE_CURVATURE``; :math:`x_i`
      is returned, the iterate before the bad direction, as Steihaug (1983) and Toint (1981)
      do without a trust region; if that happens at the very first direction
      :math:`p_1 = -z_0`, the one along which :math:`\phi` decreases fastest, CG returns
      :math:`x_1 = x_0 + \tau p_1` with :math:`\tau = r_0^\top z_0 / |p_1^\top A p_1|`,
      the step length of CG with the curvature's sign flipped, rather than :math:`x_0`,
      which would be no step at all from a cold start; ``num_iter`` is then 1 and
      :math:`\phi(x_1)` is exact; zero curvature, where :math:`\tau` is infinite, still
      returns :math:`x_0`); with ``max_norm`` :math:`= \Delta` instead the point where
      :math:`x_i + \tau p_{i+1}`, :math:`\tau \ge 0`, meets the sphere
      :math:`\|x\| = \Delta` (Steihaug 1983: :math:`\phi` falls without bound along
      :math:`p_{i+1}`), at the first direction too, with its exact :math:`\phi`, as
      iteration :math:`i + 1`; or a NaN/Inf appears
      (``NON_FINITE``; the last finite iterate is returned);
    - with ``max_norm`` :math:`= \Delta`, the step from :math:`x_i` would leave the ball
      :math:`\|x\| \le \Delta` (``TRUST_RADIUS``; Steihaug 1983): CG returns the point
      :math:`x_i + \tau p_{i+1}`, :math:`\tau \ge 0`, where its path crosses the sphere, with
      its exact :math:`\phi`, as iteration :math:`i + 1`. From :math:`x_0 = 0` the iterates'
      norms grow while the curvature stays positive (Steihaug's Theorem 2.1), so this is the
      path's only crossing. A start outside the ball returns :math:`x_0`;
    - :math:`\|r_i\| \le \max(\mathrm{rtol}\,\|b\|, \mathrm{atol})` (``CONVERGED``; with
      ``descent_stop`` and a nonzero ``x0``, only where also :math:`\phi(x_i) < 0`);
    - with ``precond``, :math:`M^{-1}` shows itself singular (``SINGULAR_PRECONDITIONER``):
      :math:`|r_i^\top z_i| / r_i^\top r_i` fell below :math:`\epsilon` (the dtype's) times its
      value at :math:`r_0` while :math:`r_i \ne 0` (CG then reduces :math:`r` only inside
      :math:`M^{-1}`'s range), or :math:`r_0^\top z_0 = 0` (no iteration);
    - the relative-progress test of Martens (2010, §4.4) holds (``RELATIVE_PROGRESS``):
      :math:`i > k`, :math:`\phi(x_i) < 0` and
      :math:`(\phi(x_i) - \phi(x_{i-k}))/\phi(x_i) < k\epsilon` with
      :math:`k = \max(10, \lceil 0.1 i \rceil)` and :math:`\epsilon` = ``progress_tol``;
    - :math:`i` = ``max_iter`` (``MAX_ITER``).

    The iterate :math:`x_i` is kept for backtracking when
    :math:`i = \lceil \mathrm{store\_start} \cdot \mathrm{store\_ratio}^j \rceil` for some
    :math:`j \ge 0` (5, 7, 9, 11, 15, 19, 25, 32, ... by default, as in Martens' code),
    and the final iterate is always kept. :math:`\phi` is computed as
    :math:`\tfrac12 x^\top (r - b)` from the recurrence residual, at no extra product.

    Products are counted in ``num_matvec``: one per iteration, plus one for
    :math:`r_0 = Ax_0 - b` when ``x0`` is given and not all zeros. CG is not
    differentiable: inputs and products are detached.

    Args:
        matvec: Computes :math:`Av` for a symmetric :math:`A` from a 1-D tensor like ``b``;
            must not modify its argument.
        b: Right-hand side, 1-D floating-point tensor; never modified. In HF, :math:`-g`.
            A float16 ``b`` is solved in float32 (see the module docstring).
        x0: Starting point, like ``b`` and finite; never modified. ``None`` means zeros.
        max_iter: Most iterations, an int in ``[1, 10**6]``.
        min_iter: The relative-progress test is not applied before this iteration; the
            other stops are unaffected. An int in ``[0, max_iter]``.
        rtol: Relative residual tolerance, a finite real >= 0.
        atol: Absolute residual tolerance, a finite real >= 0.
        precond: :math:`M^{-1}` for a symmetric positive-definite :math:`M`: ``None``
            (no preconditioning), a callable :math:`r \mapsto M^{-1} r` that must not modify
            its argument (it may return it: the identity), or a 1-D tensor
            ``d`` like ``b`` holding the (positive) diagonal of :math:`M`, so
            :math:`z = r / d`.
        progress_tol: :math:`\epsilon` of the relative-progress test, a finite real > 0;
            ``None`` turns the test off.
        store_start: First grid iteration for stored iterates, an int >= 1.
        store_ratio: Growth ratio of the grid, a finite real > 1. Grid points are computed
            in exact decimal arithmetic: start 10 and ratio 1.1 give 10, 11, 13, not 10, 12.
        check_every: Read the stop tests back to the host every this many iterations
            (each read is a device synchronisation). ``None``: 1 on CPU, 8 otherwise.
            Does not change the result, only ``num_matvec``.
        max_norm: Trust radius :math:`\Delta > 0` bounding :math:`\|x\|` (``TRUST_RADIUS``;
            a ``NEGATIVE_CURVATURE`` stop steps to it), or ``None`` (unbounded). Costs two
            dot products per iteration.
        descent_stop: From a nonzero ``x0``, the residual stop (``CONVERGED``) also needs
            :math:`\phi(x_i) < 0`: a start whose residual is small but whose model value is
            not below :math:`\phi(0)` is iterated on.
        monitor: Called as ``monitor(i, x_i)`` at every stored (grid) iterate once the
            stop tests up to iteration ``i`` are read (one read then, whatever
            ``check_every``); returning True stops CG there with ``MONITOR`` and
            :math:`x_i` as the final iterate. ``x_i`` must not be modified.

    Returns:
        CGResult: final ``x``, stored ``iterates`` with their ``iterations`` and
        ``iterate_phi``, ``phi_history``, ``num_iter``, ``num_matvec`` and ``reason``.

    Raises:
        TypeError: If ``matvec`` is not callable, ``b``/``x0`` is not a tensor, ``precond``
            is neither ``None``, a callable nor a tensor, a dtype is not floating-point
            or differs from ``b``'s, a number argument has the wrong type, or
            ``matvec``/``precond`` returns something other than a tensor.
        ValueError: If a number argument is out of range, ``b`` is not 1-D, ``x0`` or a
            diagonal ``precond`` differs from ``b`` in shape or device, ``x0`` is not
            finite, the diagonal is not positive and finite, or ``matvec``/``precond``
            returns a tensor of the wrong shape or device or modifies its argument in place
            (checked on the first call of each).

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> result = cg(lambda v: A @ v, b, rtol=1e-12)
        >>> result.reason, result.num_iter
        (<CGStop.CONVERGED: 'converged'>, 2)
        >>> torch.allclose(A @ result.x, b)
        True

    References:
        Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.4–4.6.
        Nocedal & Wright (2006), Numerical Optimization, 2nd ed., Algorithm 5.3.
    """
    opts = _check_arguments(
        matvec,
        b,
        x0,
        precond,
        max_iter=max_iter,
        min_iter=min_iter,
        rtol=rtol,
        atol=atol,
        progress_tol=progress_tol,
        store_start=store_start,
        store_ratio=store_ratio,
        check_every=check_every,
        max_norm=max_norm,
    )
    if monitor is not None and not callable(monitor):
        raise TypeError(f"`monitor` must be None or a callable (i, x) -> bool, got {monitor!r}.")
    b, diag, max_iter, min_iter = b.detach(), opts.diag, opts.max_iter, opts.min_iter
    progress_tol, check_every = opts.progress_tol, opts.check_every
    out_dtype = b.dtype
    if out_dtype in LOW_PRECISION:
        # float16 b: CG's vectors and scalars in float32, each product in b's dtype on a
        # power-of-two rescaled vector (_low_precision_product); x is returned in b's dtype.
        matvec = _low_precision_product(matvec, b, "matvec")
        if diag is not None:
            diag = diag.float()
        elif precond is not None:
            precond = _low_precision_product(precond, b, "precond")
        if monitor is not None:
            monitor16 = monitor

            def monitor(i: int, x: Tensor) -> bool:
                return monitor16(i, x.to(out_dtype))

        b = b.float()
        x0 = None if x0 is None else x0.detach().float()

    # ---- iteration 0: r_0 = A x_0 - b, z_0, p_0 = -z_0, phi_0 ----
    dtype, device = b.dtype, b.device
    zero = torch.zeros((), dtype=dtype, device=device)
    num_matvec = 0
    if opts.x0_nonzero:
        x = x0.detach().clone()
        r = torch.sub(_checked_product(matvec, x, b, "matvec"), b)  # r_0 = A x_0 - b
        num_matvec += 1
    else:
        x = torch.zeros_like(b)
        r = torch.neg(b)
    if diag is not None:
        z = torch.empty_like(b)
        torch.div(r, diag, out=z)
    elif precond is not None:
        z = _checked_product(precond, r, b, "precond")
    else:
        z = r
    p = torch.neg(z)
    rz = torch.dot(r, z)
    history = torch.empty(max_iter + 1, dtype=dtype, device=device)
    _phi(x, r, b, out=history[0])
    # tol = max(rtol ||b||, atol); NaN if b is not finite, so no CONVERGED then.
    tol = torch.linalg.vector_norm(b).mul_(opts.rtol).clamp_(min=opts.atol)
    r_norm = torch.linalg.vector_norm(r)
    downhill = b_zero = None  # descent_stop: phi < 0 (or b = 0, where phi -> 0 from above)
    if descent_stop and opts.x0_nonzero:
        b_zero = torch.linalg.vector_norm(b) == 0
        downhill = b_zero | (history[0] < 0)
    finite0, converged0, rz0, r_norm0 = torch.stack(
        [
            (torch.isfinite(rz) & torch.isfinite(history[0]) & torch.isfinite(r_norm)).to(dtype),
            ((r_norm <= tol) if downhill is None else (r_norm <= tol) & downhill).to(dtype),
            rz,
            r_norm,
        ]
    ).tolist()
    if not finite0 or converged0:
        reason = CGStop.CONVERGED if finite0 else CGStop.NON_FINITE
        return _result(x, [], history, 0, num_matvec, reason, out_dtype)
    # r_0 != 0 here; M^{-1} r_0 orthogonal to it: M is singular (see _singular_threshold)
    singular = None if z is r else _singular_threshold(rz0, r_norm0, dtype)
    if singular == math.inf:
        return _result(x, [], history, 0, num_matvec, CGStop.SINGULAR_PRECONDITIONER, out_dtype)

    # ---- iterations 1..max_iter; the stop tests on the host or on the device ----
    grid = _grid(opts.store_start, opts.store_ratio, max_iter)
    stored: list[tuple[int, Tensor]] = []
    radius_sq = None if opts.max_norm is None else opts.max_norm**2
    tol_sq = tol.square()
    num_iter, reason = max_iter, CGStop.MAX_ITER
    mask_vectors = check_every > 1
    # Vectors alive across iterations: x, r, p (z too with a preconditioner) and, only when
    # masking, one scratch buffer; a product's output is dropped before the next product.
    mask = (torch.empty_like(b), zero) if mask_vectors else None
    # On CPU a read every iteration costs no wait: the scalar work in host floats (bitwise).
    if _HOST_SCALARS and device.type == "cpu" and not mask_vectors and dtype in _HOST_DTYPES:
        tests: _HostTests | _DeviceTests = _HostTests(
            history, tol_sq, b_zero, x, radius_sq, progress_tol, min_iter, singular
        )
    else:
        tests = _DeviceTests(
            history, tol_sq, b_zero, x, radius_sq, progress_tol, min_iter, max_iter, singular
        )
    pAp_first = zero
    for i in range(1, max_iter + 1):
        Ap = (_checked_product(matvec, p, b, "matvec") if i == 1 else matvec(p)).detach()
        num_matvec += 1
        pAp = torch.dot(p, Ap)
        if i == 1:
            pAp_first = pAp
        alpha = tests.step_length(rz, pAp, x, p)  # α = rᵀz / pᵀAp, or 0 once a stop fired
        _masked_add(x, p, alpha, tests.go, mask)  # x += α p
        _masked_add(r, Ap, alpha, tests.go, mask)  # r += α Ap
        Ap = None  # not needed again: free it before the next product allocates its own
        # z only feeds β and the next direction, which the last iteration never uses: a
        # callable M⁻¹ (K-FAC's costs half a curvature product) is not applied for nothing.
        # z and rᵀz then stay a consistent pair (the steepest-descent fallback reads them).
        skip = i == max_iter and precond is not None and diag is None
        if not skip:
            z = _precondition(r, z, diag, precond)  # z = M⁻¹ r
        rz_next = rz if skip else torch.dot(r, z)
        rr = rz_next if z is r else torch.dot(r, r)
        beta = tests.conjugation(i, x, r, b, rz, rz_next, rr, skip)  # β = r₊ᵀz₊ / rᵀz
        p.mul_(beta)
        _masked_add(p, z, -1.0, tests.running, mask)  # p = -z + β p
        rz = rz_next  # used only through alpha and beta, both masked
        if i in grid:
            stored.append((i, x.clone()))
        watch = monitor is not None and i in grid
        if watch or i % check_every == 0 or i == max_iter:
            stop = tests.read(i)
            if stop is not None:
                num_iter, reason = stop
                break
            if watch and monitor(i, x):
                num_iter, reason = i, CGStop.MONITOR
                break
    history = tests.phi_history()
    if reason is CGStop.NEGATIVE_CURVATURE:
        curvature = pAp_first if num_iter == 0 else pAp
        num_iter = _negative_curvature_step(
            x, r, z, p, rz, curvature, radius_sq, history, num_iter, masked=mask is not None
        )
    elif reason is CGStop.TRUST_RADIUS:
        if mask is None:  # the stop ended the loop right after the unmasked p = -z + 1 p
            p.add_(z)
        num_iter = _to_boundary(x, r, p, pAp, radius_sq, history, num_iter)
    return _result(x, stored, history, num_iter, num_matvec, reason, out_dtype)


@dataclass(frozen=True)
class _Options:
    """:func:`cg`'s arguments after validation (numbers normalised, ``diag`` detached)."""

    max_iter: int
    min_iter: int
    rtol: float
    atol: float
    progress_tol: float | None
    store_start: int
    store_ratio: float
    check_every: int
    max_norm: float | None
    diag: Tensor | None  # the diagonal of M when ``precond`` is a tensor
    x0_nonzero: bool


def _check_arguments(
    matvec: object,
    b: object,
    x0: Tensor | None,
    precond: object,
    *,
    max_iter: int,
    min_iter: int,
    rtol: float,
    atol: float,
    progress_tol: float | None,
    store_start: int,
    store_ratio: float,
    check_every: int | None,
    max_norm: float | None,
) -> _Options:
    """Validate :func:`cg`'s arguments (metadata; one sync for the values of ``x0``/``d``)."""
    if not callable(matvec):
        raise TypeError(f"`matvec` must be callable (v -> A v), got {matvec!r}.")
    _check_rhs(b)
    max_iter = _check_max_iter("max_iter", max_iter)
    min_iter = check_int("min_iter", min_iter, low=0, high=max_iter)
    rtol = check_number("rtol", rtol, low=0.0, high=math.inf, high_open=True)
    atol = check_number("atol", atol, low=0.0, high=math.inf, high_open=True)
    if progress_tol is not None:
        progress_tol = check_number(
            "progress_tol",
            progress_tol,
            low=0.0,
            high=math.inf,
            low_open=True,
            high_open=True,
            hint="Pass None to turn the relative-progress stop off.",
        )
    store_start = check_int("store_start", store_start, low=1)
    store_ratio = check_number(
        "store_ratio", store_ratio, low=1.0, high=math.inf, low_open=True, high_open=True
    )
    if max_norm is not None:
        max_norm = check_number("max_norm", max_norm, low=0.0, low_open=True)
    if check_every is None:
        check_every = 1 if b.device.type == "cpu" else 8
    check_every = check_int("check_every", check_every, low=1)
    if x0 is not None:
        check_vector("x0", x0, b.numel(), b.dtype, b.device)
    diag = None
    if isinstance(precond, Tensor):
        check_vector("precond", precond, b.numel(), b.dtype, b.device)
        diag = precond.detach()
    elif precond is not None and not callable(precond):
        raise TypeError(
            "`precond` must be None, a callable r -> M^{-1} r or a 1-D tensor holding "
            f"the diagonal of M, got {precond!r}."
        )
    return _Options(
        max_iter=max_iter,
        min_iter=min_iter,
        rtol=rtol,
        atol=atol,
        progress_tol=progress_tol,
        store_start=store_start,
        store_ratio=store_ratio,
        check_every=check_every,
        max_norm=max_norm,
        diag=diag,
        x0_nonzero=_check_values(x0, diag),
    )


#: Private switch for tests: False sends CPU solves through the device tests as well.
_HOST_SCALARS = True
#: The dtypes whose 0-dim arithmetic _HostTests reproduces (bfloat16 CG stays on tensors).
_HOST_DTYPES = (torch.float32, torch.float64)


class _DeviceTests:
    r"""CG's scalar recurrences and stop tests as 0-dim tensors on ``b``'s device.

    Nothing is read back but the table of stop flags, every ``check_every`` iterations
    (:meth:`read`); until then a stop that fired masks every later update (``go``,
    ``running``), so the result is that of a read every iteration.
    """

    def __init__(
        self,
        history: Tensor,
        tol_sq: Tensor,
        b_zero: Tensor | None,
        x: Tensor,
        radius_sq: float | None,
        progress_tol: float | None,
        min_iter: int,
        max_iter: int,
        singular: float | None,
    ) -> None:
        device = history.device
        self.history, self.tol_sq, self.b_zero = history, tol_sq, b_zero
        self.singular = (
            None if singular is None else torch.tensor(singular, dtype=history.dtype, device=device)
        )
        self.radius_sq, self.progress_tol, self.min_iter = radius_sq, progress_tol, min_iter
        self.xx = None if radius_sq is None else torch.dot(x, x)
        self.zero = torch.zeros((), dtype=history.dtype, device=device)
        self.no = torch.zeros((), dtype=torch.bool, device=device)
        self.go = self.running = torch.ones((), dtype=torch.bool, device=device)
        self.flags = torch.empty(max_iter + 1, 8, dtype=torch.bool, device=device)
        self.first_unread = 1

    def step_length(self, rz: Tensor, pAp: Tensor, x: Tensor, p: Tensor) -> Tensor:
        """α = rᵀz / pᵀAp, masked to 0 (and ``go`` false) once a stop has fired."""
        alpha = rz / pAp
        self.finite_pAp = torch.isfinite(pAp)
        self.positive_pAp = pAp > 0
        self.finite_alpha = torch.isfinite(alpha)  # pAp > 0 can still be so small: alpha = inf
        if self.radius_sq is None:
            self.inside = self.running
        else:  # ||x + alpha p||^2 before the update, so that x_{i-1} can be kept
            xx_next = self.xx + 2 * alpha * torch.dot(x, p) + alpha * alpha * torch.dot(p, p)
            self.inside = ~(xx_next > self.radius_sq)
        self.go = (
            self.running & self.finite_pAp & self.positive_pAp & self.finite_alpha & self.inside
        )
        if self.radius_sq is not None:
            self.xx = torch.where(self.go, xx_next, self.xx)
        return torch.where(self.go, alpha, self.zero)

    def conjugation(
        self,
        i: int,
        x: Tensor,
        r: Tensor,
        b: Tensor,
        rz: Tensor,
        rz_next: Tensor,
        rr: Tensor,
        skip: bool,
    ) -> Tensor:
        """φ(x_i) into the history, the stop flags of iteration ``i``, and β (1 once stopped)."""
        phi = _phi(x, r, b, out=self.history[i])
        finite_after = torch.isfinite(rr if skip else rz_next) & torch.isfinite(phi)
        converged = rr <= self.tol_sq  # ||r|| <= tol without the norm's extra pass
        if self.b_zero is not None:
            converged = converged & (self.b_zero | (phi < 0))
        progress = _progress(phi, self.history, i, self.progress_tol, self.min_iter, self.no)
        if self.singular is None or skip:
            singular = self.no
        else:  # |r^T z| <= threshold * r^T r, as _HostTests rounds it
            singular = rz_next.abs() <= self.singular * rr
        torch.stack(
            [
                self.finite_pAp,
                self.positive_pAp,
                self.finite_alpha,
                finite_after,
                converged,
                progress,
                self.inside,
                singular,
            ],
            out=self.flags[i],
        )
        self.running = self.go & finite_after & ~converged & ~progress & ~singular
        return torch.where(self.running, rz_next / rz, 1.0)

    def read(self, i: int) -> tuple[int, CGStop] | None:
        """The first stop among the iterations not read yet, up to ``i`` (one host read)."""
        stop = _decode(self.flags[self.first_unread : i + 1].tolist(), self.first_unread)
        self.first_unread = i + 1
        return stop

    def phi_history(self) -> Tensor:
        return self.history


class _HostTests:
    r"""The same recurrences and tests with :math:`p^\top Ap`, :math:`r^\top z` and φ read to
    the host every iteration: CPU tensors with a read every iteration (``check_every = 1``).

    Bit for bit those of :class:`_DeviceTests`: α and β stay 0-dim tensors from the same
    division (they feed the same vector updates), and the few scalar operations done here
    (φ = ½(xᵀr − xᵀb), the progress quotient, the trust-radius norm) are single IEEE
    operations in Python floats, rounded back to float32 after each one where CG runs in
    float32 (exact: a double holds more than 2·24 + 2 bits, so rounding twice is rounding
    once for +, −, ×, ÷); a Python float compared with a float32 tensor is first rounded
    to float32 by torch, so the thresholds are too. A 0-dim tensor operation costs
    ~2-5 µs on CPU, a host read ~0.3 µs and a float operation ~0.05 µs.
    """

    def __init__(
        self,
        history: Tensor,
        tol_sq: Tensor,
        b_zero: Tensor | None,
        x: Tensor,
        radius_sq: float | None,
        progress_tol: float | None,
        min_iter: int,
        singular: float | None,
    ) -> None:
        self.dtype, self.device = history.dtype, history.device
        f = _float32_rounding() if self.dtype == torch.float32 else float
        self.round = f
        self.singular = None if singular is None else f(singular)
        self.phi = [history[0].item()]
        self.tol_sq = tol_sq.item()
        self.b_zero = None if b_zero is None else bool(b_zero)
        self.radius_sq = None if radius_sq is None else f(radius_sq)
        self.xx = None if radius_sq is None else torch.dot(x, x).item()
        self.progress_tol, self.min_iter = progress_tol, min_iter
        self.zero = torch.zeros((), dtype=self.dtype)
        self.one = torch.ones((), dtype=self.dtype)
        self.go = self.running = True

    def step_length(self, rz: Tensor, pAp: Tensor, x: Tensor, p: Tensor) -> Tensor:
        alpha = rz / pAp
        pAp_h, alpha_h = pAp.item(), alpha.item()
        inside = True
        if self.radius_sq is not None:
            f = self.round
            xp, pp = torch.dot(x, p).item(), torch.dot(p, p).item()
            xx_next = _norm_sq_next(f, self.xx, alpha_h, xp, pp)
            inside = not xx_next > self.radius_sq
        self.inside = inside
        self.row = [math.isfinite(pAp_h), pAp_h > 0, math.isfinite(alpha_h)]
        self.go = all(self.row) and inside
        if self.go and self.radius_sq is not None:
            self.xx = xx_next
        return alpha if self.go else self.zero

    def conjugation(
        self,
        i: int,
        x: Tensor,
        r: Tensor,
        b: Tensor,
        rz: Tensor,
        rz_next: Tensor,
        rr: Tensor,
        skip: bool,
    ) -> Tensor:
        f = self.round
        phi = f(0.5 * f(torch.dot(x, r).item() - torch.dot(x, b).item()))  # as _phi
        self.phi.append(phi)
        rr_h = rr.item()
        # r₊ᵀz₊, or rᵀr where the last M⁻¹ was skipped (rz_next is then the old rᵀz)
        rz_h = rr_h if skip or rr is rz_next else rz_next.item()
        finite_after = math.isfinite(rz_h) and math.isfinite(phi)
        converged = rr_h <= self.tol_sq
        if self.b_zero is not None:
            converged = converged and (self.b_zero or phi < 0)
        progress = _host_progress(f, self.phi, i, self.progress_tol, self.min_iter)
        singular = self.singular is not None and not skip and abs(rz_h) <= f(self.singular * rr_h)
        self.row += [finite_after, converged, progress, self.inside, singular]  # _decode's
        self.running = self.go and finite_after and not (converged or progress or singular)
        return rz_next / rz if self.running else self.one

    def read(self, i: int) -> tuple[int, CGStop] | None:
        return _decode([self.row], i)

    def phi_history(self) -> Tensor:
        """φ(x_0), ..., φ(x_i) as a tensor, i the last iteration run (a stop's included)."""
        return torch.tensor(self.phi, dtype=self.dtype, device=self.device)


def _norm_sq_next(
    f: Callable[[float], float], xx: float, alpha: float, xp: float, pp: float
) -> float:
    """||x + alpha p||^2 = xx + (2 alpha) xp + (alpha alpha) pp, rounded by ``f`` after each
    operation, left to right as :class:`_DeviceTests` evaluates it in tensors."""
    return f(f(xx + f(f(2 * alpha) * xp)) + f(f(alpha * alpha) * pp))


def _host_progress(
    f: Callable[[float], float],
    history: list[float],
    i: int,
    progress_tol: float | None,
    min_iter: int,
) -> bool:
    """:func:`_progress` on host floats rounded by ``f`` after each operation; the threshold
    k ε too, as torch rounds a Python float compared with a float32 tensor."""
    k = _progress_gap(i)
    if progress_tol is None or i <= k or i < min_iter:
        return False
    phi = history[i]
    return phi < 0 and _progress_quotient(f, phi, history[i - k]) < f(k * progress_tol)


def _progress_quotient(f: Callable[[float], float], phi: float, phi_old: float) -> float:
    """(phi - phi_old) / phi, rounded by ``f`` after each operation, as :func:`_progress`."""
    return f(f(phi - phi_old) / phi)


def _float32_rounding() -> Callable[[float], float]:
    """A function rounding a float to the nearest float32 (ties to even; Inf beyond float32's
    range), through a one-element buffer of its own: no state shared between threads."""
    buffer = array.array("f", [0.0])

    def round_float32(value: float) -> float:
        buffer[0] = value
        return buffer[0]

    return round_float32


def _masked_add(
    v: Tensor, u: Tensor, alpha: Tensor | float, go: Tensor, mask: tuple[Tensor, Tensor] | None
) -> None:
    """``v += alpha * u`` in place, with ``u`` masked to 0 where ``go`` (0-dim bool) is false.

    ``mask`` is ``(scratch buffer, zero)`` when ``check_every > 1``: ``u`` is then masked by
    ``torch.where``, not by a multiply by 0, so that NaN/Inf in ``u`` cannot leak into the
    iterations run after a stop until the next read-back. ``None`` (a read-back every
    iteration): a stop ends the loop before ``r`` or ``p`` are used again, and ``alpha``
    (masked by the caller) keeps ``x`` intact. ``alpha = -1.0`` subtracts.
    """
    if mask is not None:
        buf, zero = mask
        u = torch.where(go, u, zero, out=buf)
    if isinstance(alpha, Tensor):
        v.addcmul_(u, alpha)
    else:
        v.sub_(u)


def _precondition(r: Tensor, z: Tensor, diag: Tensor | None, precond: MatVec | None) -> Tensor:
    """:math:`z = M^{-1} r`: into ``z`` for a diagonal, a new tensor for a callable, else ``r``."""
    if diag is not None:
        return torch.div(r, diag, out=z)
    if precond is not None:
        return precond(r).detach()
    return z  # z is r


def _progress(
    phi: Tensor, history: Tensor, i: int, progress_tol: float | None, min_iter: int, no: Tensor
) -> Tensor:
    r"""§4.4's relative-progress test at iteration ``i``, on the device (``no`` if it is off).

    :math:`\phi_i < 0` and :math:`(\phi_i - \phi_{i-k}) / \phi_i < k\epsilon`, with
    :math:`k = \max(10, \lceil 0.1 i \rceil)`; ``i``, ``k`` and the test ``i > k`` live on the host.
    """
    k = _progress_gap(i)
    if progress_tol is None or i <= k or i < min_iter:
        return no
    return (phi < 0) & ((phi - history[i - k]) / phi < k * progress_tol)


def forcing_term(
    grad_norm: float,
    prev_grad_norm: float | None = None,
    prev_eta: float | None = None,
    *,
    gamma: float = 0.9,
    alpha: float = 2.0,
    eta_max: float = 0.5,
) -> float:
    r"""Relative residual tolerance :math:`\eta_k` for CG at step :math:`k` (inexact Newton).

    Eisenstat & Walker (1996), choice 2, with their safeguard:

    .. math::
        \eta_k = \min\Big(\eta_{\max},\; \max\big(\gamma (\|g_k\| / \|g_{k-1}\|)^\alpha,\;
        s_k\big)\Big),\qquad
        s_k = \gamma\,\eta_{k-1}^\alpha \text{ if } \gamma\,\eta_{k-1}^\alpha > 0.1
        \text{ else } 0,

    and :math:`\eta_0 = \eta_{\max}` (no previous step). CG then stops once
    :math:`\|r\| \le \eta_k \|g_k\|` (``rtol`` of :func:`cg` with :math:`b = -g_k`). The ratio
    of gradient norms makes it scale-free; the safeguard keeps :math:`\eta` from dropping
    after one lucky step. With :math:`\alpha = 2` the outer iteration is locally quadratic
    where Newton's is (Nocedal & Wright 2006, Theorem 7.2).

    Args:
        grad_norm: :math:`\|g_k\|`, finite and >= 0.
        prev_grad_norm: :math:`\|g_{k-1}\|` (``None`` or 0 at the first step).
        prev_eta: :math:`\eta_{k-1}` (``None`` at the first step: no safeguard).
        gamma: :math:`\gamma` in (0, 1].
        alpha: :math:`\alpha` in (1, 2].
        eta_max: Upper bound in (0, 1).

    Returns:
        float: :math:`\eta_k` in ``[0, eta_max]``.

    Example:
        >>> forcing_term(1.0)  # first step
        0.5
        >>> round(forcing_term(0.1, 1.0, 0.3), 12)  # the gradient fell tenfold: 0.9 * 0.1**2
        0.009
        >>> forcing_term(0.1, 1.0, 0.5)  # ... right after a loose step: the safeguard 0.9 * 0.5**2
        0.225
    """
    gamma = check_number("gamma", gamma, low=0.0, high=1.0, low_open=True)
    alpha = check_number("alpha", alpha, low=1.0, high=2.0, low_open=True)
    eta_max = check_number("eta_max", eta_max, low=0.0, high=1.0, low_open=True, high_open=True)
    if not prev_grad_norm:
        return eta_max
    eta = gamma * (grad_norm / prev_grad_norm) ** alpha
    if prev_eta is not None and gamma * prev_eta**alpha > 0.1:
        eta = max(eta, gamma * prev_eta**alpha)
    return min(eta_max, eta) if math.isfinite(eta) else eta_max


def relative_forcing_term(
    grad_norm: float, first_grad_norm: float, *, eta_max: float = 0.5
) -> float:
    r"""Relative residual tolerance :math:`\eta_k` for CG from the progress since a first step.

    .. math:: \eta_k = \min\big(\eta_{\max},\; \sqrt{\|g_k\| / \|g_0\|}\big)

    Dembo & Steihaug's (1983) :math:`\eta_k = \min(\tfrac12, \sqrt{\|g_k\|})`, made
    scale-free by :math:`\|g_0\|`: :math:`\eta_k \to 0` as :math:`g_k \to 0`, so the outer
    iteration is locally superlinear (Nocedal & Wright 2006, Theorem 7.2), whatever the
    step-to-step ratio :math:`\|g_k\|/\|g_{k-1}\|` (which :func:`forcing_term` uses and which
    stays near 1 on a non-convex loss whose gradient does not fall monotonically).
    :class:`~hessfree.HessianFree` uses it where the objective is seen deterministic from the
    start.

    Args:
        grad_norm: :math:`\|g_k\|`, finite and >= 0.
        first_grad_norm: :math:`\|g_0\|`, finite and > 0.
        eta_max: Upper bound in (0, 1).

    Returns:
        float: :math:`\eta_k` in ``[0, eta_max]``.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> relative_forcing_term(2.0, 1.0)  # the gradient grew: the cap
        0.5
        >>> relative_forcing_term(0.01, 1.0)  # a hundredfold smaller: sqrt(0.01)
        0.1

    References:
        Dembo & Steihaug (1983), Truncated-Newton algorithms for large-scale unconstrained
        optimization, Math. Programming 26, eq. (3.2).
    """
    grad_norm = check_number("grad_norm", grad_norm, low=0.0)
    first = check_number("first_grad_norm", first_grad_norm, low=0.0, low_open=True)
    eta_max = check_number("eta_max", eta_max, low=0.0, high=1.0, low_open=True, high_open=True)
    return min(eta_max, math.sqrt(grad_norm / first))


def _phi(x: Tensor, r: Tensor, b: Tensor, *, out: Tensor) -> Tensor:
    """phi = 1/2 x^T (r - b), as two dot products into ``out``: no vector-sized temporary."""
    torch.sub(torch.dot(x, r), torch.dot(x, b), out=out)
    return out.mul_(0.5)


def _negative_curvature_step(
    x: Tensor,
    r: Tensor,
    z: Tensor,
    p: Tensor,
    rz: Tensor,
    pAp: Tensor,
    radius_sq: float | None,
    history: Tensor,
    i: int,
    *,
    masked: bool,
) -> int:
    r"""After a stop on :math:`p_{i+1}^\top A p_{i+1} \le 0` at :math:`x_i`: the result, in place.

    With a trust radius :math:`\Delta` (Steihaug 1983; Nocedal & Wright, Algorithm 7.2):
    :math:`x_i + \tau p_{i+1}` on the sphere :math:`\|x\| = \Delta`, :math:`\tau \ge 0`
    (:math:`\phi` decreases along :math:`p_{i+1}` without bound, so the sphere is where the
    model is trusted to), the first direction :math:`p_1 = -z_0` included. Without one:
    :math:`x_i`, or at the first direction the step of :func:`_steepest_descent_step`.
    Returns the iteration count of the result. The loop left ``p`` as :math:`p_{i+1}`, less
    :math:`z_i` where the unmasked update :math:`p = -z + 1 \cdot p` ran after the stop
    (``masked`` False); ``z`` and ``rz`` are :math:`z_i` and :math:`r_i^\top z_i`.
    """
    if radius_sq is None:
        return _steepest_descent_step(x, z, rz, pAp, history) if i == 0 else i
    if i == 0:
        torch.neg(z, out=p)
    elif not masked:
        p.add_(z)
    return _to_boundary(x, r, p, pAp, radius_sq, history, i)


def _steepest_descent_step(x: Tensor, z: Tensor, rz: Tensor, pAp: Tensor, history: Tensor) -> int:
    r"""Negative curvature along the first direction :math:`p_1 = -z_0`: step along it, in place.

    After a stop at iteration 1 the state is that of iteration 0 (every update was masked), so
    ``z`` is :math:`z_0` and ``rz`` is :math:`r_0^\top z_0`. With
    :math:`\tau = r_0^\top z_0 / |p_1^\top A p_1|`,
    :math:`\phi(x_0 + \tau p_1) = \phi(x_0) - \tau r_0^\top z_0 + \tfrac12\tau^2 p_1^\top A p_1`.
    Returns the iteration count of the result: 1, or 0 if :math:`\tau` is not finite (zero
    curvature) and ``x`` is left as it was. One host read.
    """
    tau = rz / pAp.abs()
    if not bool(torch.isfinite(tau) & (tau > 0)):
        return 0
    x.sub_(z, alpha=float(tau))
    history[1] = history[0] - tau * rz + 0.5 * tau * tau * pAp
    return 1


def _to_boundary(
    x: Tensor, r: Tensor, p: Tensor, pAp: Tensor, radius_sq: float, history: Tensor, i: int
) -> int:
    r"""Steihaug's last step: from :math:`x_i` along the frozen direction :math:`p` to the sphere.

    :math:`\tau \ge 0` solves :math:`\|x + \tau p\|^2 = \Delta^2` (:math:`x` is inside, so
    the root is real and nonnegative), and
    :math:`\phi(x + \tau p) = \phi(x) + \tau r^\top p + \tfrac12\tau^2 p^\top A p`. Returns
    the iteration count of the result, ``i + 1``. One host read.
    """
    xp, pp, xx = torch.dot(x, p), torch.dot(p, p), torch.dot(x, x)
    tau = (torch.sqrt((xp * xp - pp * (xx - radius_sq)).clamp_(min=0.0)) - xp) / pp
    tau, outside = torch.stack([tau, (xx > radius_sq).to(tau.dtype)]).tolist()
    if outside or not (math.isfinite(tau) and tau > 0):  # a start outside: x_0 is returned
        return i
    history[i + 1] = history[i] + tau * torch.dot(r, p) + 0.5 * tau * tau * pAp
    x.add_(p, alpha=tau)
    return i + 1


def _singular_threshold(rz0: float, r_norm0: float, dtype: torch.dtype) -> float:
    r"""The preconditioner's singularity test: :math:`|r_i^\top z_i| \le t\, r_i^\top r_i`.

    :math:`r^\top M^{-1} r / r^\top r` is a Rayleigh quotient of :math:`M^{-1}`, so for an SPD
    :math:`M` it stays within :math:`M^{-1}`'s spectrum whatever CG does to :math:`r`. With
    :math:`t = \epsilon\,|r_0^\top z_0| / r_0^\top r_0` (:math:`\epsilon` the dtype's machine
    epsilon, float32's for bfloat16) it fires only where the quotient fell more than
    :math:`1/\epsilon` below its start: :math:`M` is singular in that precision. A singular
    PSD :math:`M^{-1}` (a diagonal or Kronecker factor with exact zeros, a projector) lets CG
    solve only inside its range: the quotient falls to :math:`\epsilon^2` there (12 x 12
    case: 1e-22 at iteration 11) while :math:`\|r\|` stays, and the relative-progress test
    used to end the solve as if it were done. ``inf`` when :math:`r_0^\top z_0 = 0` (stop at
    once); a negative-definite :math:`M^{-1}` (whose sign cancels in CG's :math:`\alpha`,
    :math:`\beta`) is not flagged.
    """
    if rz0 == 0:
        return math.inf
    # at most float32's eps: bfloat16's own (7.8e-3) would flag a definite M of condition > 128
    eps = min(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return eps * (abs(rz0) / r_norm0 / r_norm0)  # no r_norm0**2 underflow


def _progress_gap(i: int) -> int:
    """The gap k = max(10, ceil(0.1 i)) of the §4.4 test, in integers (0.1 * 110 > 11)."""
    return max(_PROGRESS_MIN_GAP, -(-i // _PROGRESS_GAP_DIVISOR))


def _decode(rows: list[list[bool]], first: int) -> tuple[int, CGStop] | None:
    """The first stop in a block of flag rows (row ``j`` is iteration ``first + j``)."""
    for i, row in enumerate(rows, start=first):
        # The step from x_{i-1} could not be taken: return x_{i-1}.
        if not row[_FINITE_PAP]:
            return i - 1, CGStop.NON_FINITE
        if not row[_POSITIVE_PAP]:
            return i - 1, CGStop.NEGATIVE_CURVATURE
        if not row[_FINITE_ALPHA]:
            return i - 1, CGStop.NON_FINITE
        if not row[_INSIDE]:
            return i - 1, CGStop.TRUST_RADIUS
        # x_i was formed; a non-finite r^T z or phi ends CG after it (x_i is finite unless
        # x + alpha p itself overflowed, which finite alpha and p cannot do short of ~max).
        if not row[_FINITE_AFTER]:
            return i, CGStop.NON_FINITE
        if row[_CONVERGED]:
            return i, CGStop.CONVERGED
        if row[_SINGULAR]:
            return i, CGStop.SINGULAR_PRECONDITIONER
        if row[_PROGRESS]:
            return i, CGStop.RELATIVE_PROGRESS
    return None


def _result(
    x: Tensor,
    stored: list[tuple[int, Tensor]],
    history: Tensor,
    num_iter: int,
    num_matvec: int,
    reason: CGStop,
    out_dtype: torch.dtype,
) -> CGResult:
    # Iterates stored in iterations that the stop made no-ops are dropped; the final
    # iterate is `x` itself rather than a copy (a copy in b's dtype when CG ran in float32).
    kept = [(i, xi) for i, xi in stored if i < num_iter]
    kept.append((num_iter, x))
    if x.dtype != out_dtype:
        kept = [(i, xi.to(out_dtype)) for i, xi in kept]
        x = kept[-1][1]
    iterations = [i for i, _ in kept]
    phi_history = history[: num_iter + 1].clone()
    return CGResult(
        x=x,
        iterates=[xi for _, xi in kept],
        iterations=iterations,
        iterate_phi=phi_history[iterations],
        phi_history=phi_history,
        num_iter=num_iter,
        num_matvec=num_matvec,
        reason=reason,
    )


@functools.lru_cache(maxsize=64)  # every cg() call asks again: ~50 us of Fraction arithmetic
def _grid(start: int, ratio: float, max_iter: int) -> frozenset[int]:
    """Iterations ceil(start * ratio**j), j >= 0, up to max_iter (Martens' code: 5, 1.3).

    Where every step ``value * (ratio - 1)`` up to ``max_iter`` is below 1, each integer from
    ``start`` on is hit: returned without the ``log(max_iter / start) / log(ratio)`` exact
    multiplications, whose rationals grow a few digits each (``store_ratio=1.0001`` took
    minutes, ``1.0000001`` hours, inside the first :func:`cg` call).
    """
    # Exact rationals from the decimal value avoid float ceil errors (10 * 1.1 -> 12).
    exact_ratio = Fraction(repr(float(ratio)))
    if max_iter * (exact_ratio - 1) < 1:
        return frozenset(range(start, max_iter + 1))
    grid, value = set(), Fraction(start)
    while value <= max_iter:
        grid.add(math.ceil(value))
        value *= exact_ratio
    return frozenset(grid)


def _low_precision_product(fn: MatVec, b: Tensor, name: str) -> MatVec:
    r"""``fn`` (linear, on vectors like the float16 ``b``) as a map of float32 vectors.

    :math:`Av = 2^{e} A(2^{-e} v)` with :math:`2^{e-1} \le \max_j |v_j| < 2^{e}`: the
    vector ``fn`` sees has its largest entry in :math:`[\tfrac12, 1)`, so neither it nor the
    product leaves float16's range (:math:`6 \cdot 10^{-8}` to 65504) because of the
    *magnitude* of :math:`v`, only by the operator's own norm; the result is cast to float32
    before :math:`2^{e}` is applied. Multiplying by a power of two is exact in binary
    floating point (short of sub-normals), so this is :math:`Av` in exact arithmetic. The
    exponent stays on the device (no host read); a NaN/Inf in :math:`v` gives
    :math:`e = 0` and passes through to the product.
    """

    def product(v: Tensor) -> Tensor:
        e = torch.frexp(v.abs().amax()).exponent
        out = _checked_product(fn, torch.ldexp(v, -e).to(b.dtype), b, name)
        return torch.ldexp(out.float(), e)

    return product


def _checked_product(fn: MatVec, v: Tensor, b: Tensor, name: str) -> Tensor:
    """``fn(v)`` detached, checked once to be a tensor like ``b`` and to leave ``v`` alone.

    CG keeps using the vector it passes (``p`` after ``Ap``, ``r`` after ``z = M^{-1} r``): a
    product that scales it in place (``v.mul_(2)``) left ``r`` and ``x`` inconsistent, and CG
    reported ``CONVERGED`` at a residual of 1.4 on a 6 x 6 system. The check reads autograd's
    version counter (bumped by every in-place write; inference tensors have none).
    """
    version = None if v.is_inference() else v._version
    out = fn(v)
    if version is not None and v._version != version:
        raise ValueError(
            f"`{name}` modified its argument in place; it must return a new tensor and leave "
            f"its input alone (e.g. `2 * v`, not `v.mul_(2)`): CG uses that vector again."
        )
    if not isinstance(out, Tensor):
        raise TypeError(f"`{name}` must return a torch.Tensor, got {type(out).__name__}.")
    if out.shape != b.shape or out.device != b.device:
        raise ValueError(
            f"`{name}` must return a tensor of shape {tuple(b.shape)} on {b.device}, like "
            f"`b`; got shape {tuple(out.shape)} on {out.device}."
        )
    if out.dtype != b.dtype:
        raise TypeError(
            f"`{name}` must return a tensor of dtype {b.dtype}, like `b`; got {out.dtype}."
        )
    return out.detach()


def _check_values(x0: Tensor | None, diag: Tensor | None) -> bool:
    """Check x0 finite and diag positive, in one sync; return whether x0 is nonzero."""
    if x0 is None and diag is None:
        return False
    checks = []
    if x0 is not None:
        # One dot product instead of two boolean reductions over x0 (each slower than a dot
        # on CPU): xᵀx is finite and positive iff x is finite and nonzero, unless it overflows
        # or underflows; those rare cases are settled exactly below.
        xx = torch.dot(x0.detach(), x0.detach())
        checks += [torch.isfinite(xx), xx > 0]
    if diag is not None:
        checks += [((diag > 0) & torch.isfinite(diag)).all()]
    values = torch.stack(checks).tolist()
    if x0 is not None and not values[0]:
        values[:2] = torch.stack([torch.isfinite(x0).all(), (x0 != 0).any()]).tolist()
    elif x0 is not None and not values[1]:
        values[1] = bool((x0 != 0).any())
    if x0 is not None and not values[0]:
        raise ValueError("`x0` must be finite, got a tensor containing NaN or Inf.")
    if diag is not None and not values[-1]:
        bad = diag[~((diag > 0) & torch.isfinite(diag))][0].item()
        raise ValueError(
            "`precond` as a diagonal tensor must be positive and finite (the diagonal of an "
            f"SPD M), got an entry {bad!r}; add damping to the diagonal."
        )
    return x0 is not None and bool(values[1])


def _check_rhs(b: object) -> None:
    if not isinstance(b, Tensor):
        raise TypeError(f"`b` must be a 1-D torch.Tensor, got {type(b).__name__}.")
    if b.dim() != 1:
        raise ValueError(
            f"`b` must be a 1-D tensor (flatten parameters first), got shape {tuple(b.shape)}."
        )
    if not b.dtype.is_floating_point:
        raise TypeError(
            f"`b` must have a real floating-point dtype, got {b.dtype}; use b.double() or "
            "b.float()."
        )
