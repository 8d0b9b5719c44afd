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

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_int, check_number
from ._module_hooks import FORWARD
from .curvature import JacobianProduct, _depends_on

__all__ = [
    "CGPairPreconditioner",
    "EmpiricalFisherDiagonal",
    "KFACPreconditioner",
    "NystromPreconditioner",
    "PrecondContext",
    "nystrom_sketch",
    "two_loop",
]


@dataclass(frozen=True)
class PrecondContext:
    """What a preconditioner may use at the current point.

    Attributes:
        jacobian: Products with the Jacobian of the model outputs (``None`` where there are no
            outputs, e.g. a closure that returns only the loss).
        output_grad: :math:`\\partial f/\\partial o`, shaped like the outputs (or ``None``).
        reduction: ``'mean'`` or ``'sum'``: how the loss combines the examples along dim 0.
        damping: The current :math:`\\lambda` (``damping_metric='marquardt'``:
            :math:`\\lambda\\,\\mathrm{mean}(D)`, a scalar stand-in for :math:`\\lambda D`).
        shift: The weight decay (a float, or a flat vector with one entry per parameter);
            under ``damping_metric='marquardt'`` a context with ``jacobian`` (one built from
            the outputs) adds :math:`\\lambda(D - \\mathrm{mean}(D))`, so that
            ``damping + shift`` is the damped diagonal :math:`\\lambda D + \\kappa` exactly.
        generator: Random generator for probes, on the parameters' device.
        average: Averages a statistic over data-parallel ranks (identity on one process).
        curvature: Products :math:`V \\mapsto V C^\\top` with the undamped curvature :math:`C`
            (weight decay included, :math:`\\lambda` not), on a ``(k, n)`` batch of flat
            vectors, already averaged over ranks; ``None`` if not provided.
        gradient: The flat gradient :math:`g` (its size, dtype and device are the curvature's);
            ``None`` if not provided.
        loss_hessian: :math:`w \\mapsto H_\\ell w`, the Hessian of the loss with respect to the
            outputs (shaped like them; a leading batch dimension is allowed), where the
            curvature is Gauss-Newton; ``None`` otherwise.

    Raises:
        ValueError: If ``reduction`` is neither ``'mean'`` nor ``'sum'``.
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
    loss_hessian: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        # Read as "anything but 'mean' is a sum" by the Fisher scalings: a typo ('avg') would
        # silently drop the factor N from EmpiricalFisherDiagonal's and K-FAC's statistics.
        if self.reduction not in ("mean", "sum"):
            raise ValueError(
                f"Unknown `reduction` {self.reduction!r}; expected one of 'mean', 'sum'."
            )


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
        r"""Estimate (or compute) :math:`\mathrm{diag}(F)` of the empirical Fisher.

        Raises:
            ValueError: If ``ctx`` has no ``jacobian`` or ``output_grad`` (a context built
                from curvature products alone, as for :class:`NystromPreconditioner`).
        """
        if ctx.jacobian is None or ctx.output_grad is None:
            raise ValueError(
                f"{type(self).__name__} needs the outputs' Jacobian and output gradient "
                "(PrecondContext.jacobian and .output_grad, e.g. a GGNProduct's .jacobian and "
                ".output_grad); got None."
            )
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
        ValueError: If ``n < 1``, ``rank`` is not in ``[1, n]``, ``matmat`` returns another
            shape, or the sketch shows :math:`C` indefinite: :math:`\Omega^\top C\Omega` has
            an eigenvalue below :math:`-\nu`, beyond rounding (by interlacing,
            :math:`\lambda_{\min}(C)` is at most that). Checked only where the Cholesky
            factorisation fails, at no cost otherwise; an indefinite :math:`C` whose negative
            directions the sketch misses is not seen. (Tropp's shifted algorithm on such a
            :math:`C` returned a top "eigenvalue" of 1.3e15 for a 10 x 10 matrix of
            eigenvalues 3 to -2.)
        FloatingPointError: If a product has a NaN or infinite entry.

    Example:
        >>> A = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
        >>> U, lam = nystrom_sketch(lambda V: V @ A, 3, 3)  # full rank: exact
        >>> torch.allclose(lam, torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
        True
    """
    U, lam, negative = _nystrom(matmat, n, rank, dtype=dtype, device=device, generator=generator)
    if negative is not None:
        raise ValueError(_indefinite_message("nystrom_sketch", negative))
    return U, lam


def _indefinite_message(who: str, negative: tuple[float, float]) -> str:
    low, high = negative
    return (
        f"{who} needs a positive semi-definite matrix C, but the sketch's core "
        f"Omega^T C Omega has eigenvalue {low:.6g} (its largest {high:.6g}): C is indefinite, "
        f"with an eigenvalue <= {low:.6g} (e.g. the Hessian of a non-convex loss). Sketch a "
        "Gauss-Newton or Fisher matrix, or C + sigma I with sigma above -lambda_min(C)."
    )


def _nystrom(
    matmat: Callable[[Tensor], Tensor],
    n: int,
    rank: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, tuple[float, float] | None]:
    r""":func:`nystrom_sketch`'s ``(U, lam)``, and ``(lowest, highest)`` eigenvalue of
    :math:`\Omega^\top C\Omega` where the sketch shows :math:`C` indefinite (else ``None``):
    the caller raises (the function) or warns (:class:`NystromPreconditioner`, which keeps
    its results under Hessian curvature as they were)."""
    n = check_int("n", n, low=1)
    rank = check_int("rank", rank, low=1, high=n)
    omega = torch.randn(n, rank, generator=generator, dtype=dtype, device=device)
    omega = torch.linalg.qr(omega).Q
    Y = matmat(omega.T)
    if not isinstance(Y, Tensor) or tuple(Y.shape) != (rank, n):
        got = f"shape {tuple(Y.shape)}" if isinstance(Y, Tensor) else type(Y).__name__
        raise ValueError(f"`matmat` must return a ({rank}, {n}) tensor like its input, got {got}.")
    Y = Y.T  # (n, s)
    norm = float(torch.linalg.matrix_norm(Y))
    if not math.isfinite(norm):
        raise FloatingPointError(
            "`matmat`'s products had a NaN or infinite entry: no sketch of a non-finite matrix."
        )
    nu = math.sqrt(n) * torch.finfo(dtype).eps * norm
    nu = max(nu, torch.finfo(dtype).tiny)
    Y = Y + nu * omega
    core = omega.T @ Y
    core = 0.5 * (core + core.T)
    L, info = torch.linalg.cholesky_ex(core)
    negative = None
    if int(info) != 0:  # not numerically PD (e.g. an indefinite C): fall back on an eig-shift
        w = torch.linalg.eigvalsh(core)
        low, high = float(w[0]), float(w[-1])
        # core = Omega^T C Omega + nu I: for a PSD C its eigenvalues are >= nu up to rounding
        # (far below nu, which is sqrt(n) eps ||Y||_F); below 0 after the shift, C is not PSD.
        if low < 0:
            negative = (low - nu, high - nu)
        L = torch.linalg.cholesky(
            core + (abs(low) + nu) * torch.eye(rank, dtype=dtype, device=Y.device)
        )
    B = torch.linalg.solve_triangular(L, Y.T, upper=False).T  # Y L^{-T}
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (sigma.square() - nu).clamp_min(0.0)
    return U, lam, negative


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
        self._warned_indefinite = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank!r}, refresh={self.refresh!r})"

    def state_dict(self) -> dict:
        """The sketch and the step counter (what a resumed run needs to continue identically)."""
        return {"U": self.U, "eigenvalues": self.eigenvalues, "calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output, after checking it (refused: nothing changes).

        Raises:
            ValueError: If keys are missing, the counter is not an int >= 0, or the sketch's
                shapes disagree (``U`` ``(n, k)``, ``eigenvalues`` ``(k,)``, ``k <= rank``) or
                hold NaN/Inf.
        """
        U, lam, calls = _state_entries(self, state, ("U", "eigenvalues", "calls"))
        if (U is None) != (lam is None):
            raise ValueError(
                f"{type(self).__name__} state: `U` and `eigenvalues` must both be set or both None."
            )
        if U is not None:
            ok = (
                isinstance(U, Tensor)
                and isinstance(lam, Tensor)
                and U.dim() == 2
                and lam.shape == (U.shape[1],)
                and U.shape[1] <= self.rank
            )
            if not ok:
                raise ValueError(
                    f"{type(self).__name__} state: expected `U` of shape (n, k) and "
                    f"`eigenvalues` of shape (k,) with k <= rank={self.rank}, got "
                    f"{_shape_of(U)} and {_shape_of(lam)}."
                )
            _check_finite(self, "U", U)
            _check_finite(self, "eigenvalues", lam)
        self.U, self.eigenvalues, self._calls = U, lam, calls

    def update(self, ctx: PrecondContext) -> None:
        """Recompute the sketch from ``ctx.curvature``."""
        if ctx.curvature is None or ctx.gradient is None:
            raise ValueError(
                "NystromPreconditioner needs curvature products and the gradient "
                "(PrecondContext.curvature and .gradient); got None."
            )
        like = ctx.gradient
        n = like.numel()
        self.U, self.eigenvalues, negative = _nystrom(
            ctx.curvature,
            n,
            min(self.rank, n),
            dtype=like.dtype,
            device=like.device,
            generator=ctx.generator,
        )
        if negative is not None and not self._warned_indefinite:
            # HessianFree(curvature='hessian', precond='nystrom') ran this way before the check:
            # told once, its steps unchanged (the shifted sketch is kept).
            self._warned_indefinite = True
            warnings.warn(
                _indefinite_message(type(self).__name__, negative)
                + " The preconditioner goes on with a shifted sketch whose top eigenvalue "
                f"({float(self.eigenvalues[0]):.3g}) is meaningless; told once per instance.",
                RuntimeWarning,
                stacklevel=2,
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
        r""":math:`r \mapsto P^{-1}r` for damping :math:`\mu` with the current sketch.

        Raises:
            RuntimeError: If there is no sketch yet.
            ValueError: If ``mu`` is not positive and finite.
        """
        if self.U is None or self.eigenvalues is None:
            raise RuntimeError("NystromPreconditioner: no sketch yet; call it with a context.")
        # Frangella et al.'s P is defined for μ > 0: with μ = 0 a zero sketched eigenvalue (a
        # rank above the curvature's) gives 0/0 in `scale`, and μ < 0 an indefinite P.
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(
                f"NystromPreconditioner needs a positive damping (finite, > 0), got {mu!r}."
            )
        U, lam = self.U, self.eigenvalues
        scale = (lam[-1] + mu) / (lam + mu) - 1.0  # (λ̂_s + μ)/(λ̂_i + μ) − 1, one per column

        def apply(r: Tensor) -> Tensor:
            return r + U @ (scale * (U.T @ r))

        return apply


# A Kronecker factor's spectrum (Q, values, rest): see KFACPreconditioner._eigen
_Side = tuple[Tensor | None, Tensor, Tensor | None]


def _shape_of(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _state_entries(owner: object, state: object, keys: tuple[str, ...]) -> list:
    """``state``'s values for ``keys`` (the last one an int >= 0 step counter), checked."""
    name = type(owner).__name__
    if not isinstance(state, dict) or any(k not in state for k in keys):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{name} state must be a dict with keys {list(keys)} (as {name}.state_dict() "
            f"returns), got {got}."
        )
    calls = state[keys[-1]]
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
        raise ValueError(f"{name} state: `{keys[-1]}` must be an int >= 0, got {calls!r}.")
    return [state[k] for k in keys]


def _check_finite(owner: object, what: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{type(owner).__name__} state: `{what}` holds NaN or Inf values.")


class KFACPreconditioner:
    r"""Kronecker-factored block-diagonal preconditioner for ``nn.Linear`` and convolution
    layers (K-FAC, and KFC for ``nn.Conv1d``/``nn.Conv2d``).

    Martens & Grosse (2015), §3-§6: the curvature block of a linear layer
    :math:`s = \bar W \bar a` (:math:`\bar W = [W, b]`, :math:`\bar a = [a; 1]`) is
    approximated by :math:`G \otimes A` with :math:`A = \mathbb{E}[\bar a \bar a^\top]` over the
    examples of the curvature batch and :math:`G = \sum_i \mathbb{E}_\xi[\delta_i \delta_i^\top]`,
    :math:`\delta_i = \partial \langle u, o\rangle / \partial s_i` the back-propagated
    output-side vector of example :math:`i` for a probe :math:`u = \sqrt{\mathrm{diag} H_\ell}
    \odot \xi` (Rademacher :math:`\xi`; the diagonal is read exactly as :math:`\xi \odot
    H_\ell\xi` for a diagonal loss Hessian such as squared error or sigmoid cross-entropy, so
    :math:`\mathbb{E}[uu^\top] = H_\ell` there). Without a loss Hessian (Fisher or Hessian
    curvature) :math:`u` is the output gradient, scaled as in :class:`EmpiricalFisherDiagonal`
    (the empirical Fisher's factors). With an ordering of :math:`\bar W`'s entries row by row,
    the block is :math:`G \otimes A` and the preconditioner applies the exact damped inverse

    .. math:: (G \otimes A + \mu I)^{-1}\,\mathrm{vec}(V) =
              \mathrm{vec}\big(Q_G [(Q_G^\top V Q_A) \oslash (s_G s_A^\top + \mu)] Q_A^\top\big)

    through the factors' eigendecompositions :math:`A = Q_A\,\mathrm{diag}(s_A)Q_A^\top`,
    :math:`G = Q_G\,\mathrm{diag}(s_G)Q_G^\top` (the eigenbasis form of George et al. 2018;
    §6.3's factored Tikhonov split is not needed), with :math:`\mu` the current damping plus the
    weight decay (its mean where it is per entry) plus ``relative_damping`` times the mean
    eigenvalue of :math:`G \otimes A` (a floor: HF's :math:`\lambda` often falls to its minimum,
    where the inverse would amplify the directions the factors have not seen). Parameters outside
    the given layers are left unpreconditioned (:math:`z = r`).

    Convolutions (Grosse & Martens 2016, KFC): the weight is the matrix :math:`W` of shape
    (out_channels, in_channels·prod(kernel)), so that the output at position :math:`t` is
    :math:`s_t = \bar W \bar a_t` with :math:`\bar a_t` the zero-padded input patch under
    the kernel there (stride, padding, dilation as the module's; ``unfold``'s order, which is
    the weight's own), and the 1 for the bias at every position. Under the paper's spatially
    uncorrelated derivatives and spatial homogeneity the block is :math:`G \otimes A` with
    :math:`A` the mean of :math:`\bar a_t \bar a_t^\top` over examples *and* positions and
    :math:`G = \sum_{i,t} \mathbb{E}_\xi[\delta_{i,t}\delta_{i,t}^\top]` summed over them,
    as for an ``nn.Linear`` applied to a sequence. The paper puts the positions' count
    :math:`|T|` on the other factor (:math:`\Omega` summed, :math:`\Gamma` averaged); only the
    product enters :math:`G \otimes A`, its eigenvalues :math:`s_G s_A^\top`, the floor (the
    product of the two mean eigenvalues) and the running average, so both conventions give the
    same preconditioner, and ``relative_damping`` keeps its meaning: a share of the mean
    eigenvalue of the layer's approximate curvature block. KFC is exact for one output
    position of a linear model under squared error; elsewhere it dropped curvature along the
    gradient 1.4-8× on small digits CNNs (``experiments/README.md``, "kfacconv"). Grouped
    convolutions (groups > 1) and padding modes other than ``'zeros'`` are not covered: named
    in a sequence they raise, found in a module (``include_conv=True``) they are left out
    (unpreconditioned).

    Cost, for a layer with :math:`d_{out} \times d_{in}` weights, kept affordable on wide layers
    (their full inverse costs several curvature products per application): a factor of
    dimension above ``max_dense`` is kept diagonal (its second moments only); a dense factor of
    dimension above ``rank`` is kept as its top ``rank`` eigenpairs plus the mean of the other
    eigenvalues on their complement (applied with one projection and one lift,
    :math:`O(d_{out} d_{in}\,\mathrm{rank})`), refreshed by one step of subspace iteration
    from the previous eigenvectors. The factors are averaged with weight ``decay`` on the old
    ones (§5) and recomputed every ``refresh`` steps; in between only :math:`\mu` changes.
    Factors of 16-bit layers are kept in float32 (float16 second moments underflow, and CPU
    ``eigh`` has no 16-bit kernel); a 16-bit vector is solved in float32 and returned in its
    dtype (float16 overflows where :math:`1/\mu` exceeds its range, which CG rejects).

    The layers' inputs and outputs are recorded by forward hooks on the modules during every
    graph-building forward pass; the statistics are taken from the most recent one, which in
    :meth:`HessianFree.step` is the curvature batch's (the closure's where there is no
    ``curvature_closure``); each call drops the recorded tensors (and so their graph). Call
    :meth:`remove` to detach the hooks. ``HessianFree(params, precond='kfac')`` (and
    ``'auto'``) builds one without a model or hooks: the optimizer finds the layers from its
    parameters and records their calls during its own closure call (:class:`_LinearPass`);
    both take ``nn.Linear`` layers only: K-FAC on the convolutions too ended three small
    digits CNNs worse (``experiments/README.md``, "kfacconv"), so ``include_conv=True`` opts in.

    Measured (#14, the scorecard's quick CURVES task, 250/62 with at most 5 CG iterations, rank
    32): about half the HF steps to a given training error at 1.15-1.4 times the cost of a step,
    1.08-1.12× Adam's error at equal time against 1.18-1.21× without; ``experiments/README.md``
    has the numbers.

    Args:
        model: The module whose ``nn.Linear`` submodules (with ``include_conv``, also its
            ``nn.Conv1d``/``nn.Conv2d`` ones with groups=1 and zero padding) are
            preconditioned, or a sequence of such modules. Their trained parameters must be
            among the optimizer's;
            which layers are covered follows ``requires_grad`` at every call, as for
            ``precond='kfac'``: a layer with a frozen weight is left out (as in fine-tuning;
            its bias, if trained, is unpreconditioned), a frozen bias counts as none, and a
            change mid-training restarts the factors.
        refresh: Recompute the factors every this many steps, an int >= 1.
        decay: Weight of the previous factors in the running average, in ``[0, 1)``.
        num_probes: Rademacher probes for :math:`G` (each one backward pass of the curvature
            batch), or ``None`` for the exact expectation (one batched backward pass per output
            entry of an example: only for small outputs).
        relative_damping: The floor's factor, a finite real >= 0.
        max_dense: Factors of a larger dimension are kept diagonal, an int >= 0.
        rank: Dense factors of a larger dimension are truncated to this many eigenpairs, an
            int >= 1, or ``None`` (never truncated).
        include_conv: Also precondition ``model``'s ``nn.Conv1d``/``nn.Conv2d`` layers (KFC;
            groups=1, zero padding), a bool; off by default, as under ``precond='kfac'`` and
            ``'auto'``: on small digits CNNs it ended 1.6-98× worse than K-FAC on the
            ``nn.Linear`` layers alone (``experiments/README.md``, "kfacconv"). Convolutions
            named in a sequence ``model`` are taken either way.

    Raises:
        TypeError: If ``model`` is neither a module nor a sequence of ``nn.Linear``,
            ``nn.Conv1d`` or ``nn.Conv2d``, or ``include_conv`` is not a bool.
        ValueError: If ``model`` has no such layer with a trainable weight, the sequence holds
            a grouped or non-zero-padded convolution, or a number is out of range; when
            called, if a layer ran in no graph-building forward pass, ran more than once in one
            call of ``model`` (shared weights: detected when ``model`` is a module), or its
            parameters are not the optimizer's, or the damping is not positive and finite;
            when applied, if ``r`` is not a flat vector of the parameters' size.
        FloatingPointError: When called, if the new statistics (dense or diagonal factors) are
            NaN or infinite; the factors keep their previous values and
            :class:`~hessfree.HessianFree` rejects the step as ``non_finite_curvature``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> KFACPreconditioner(net, rank=32)  # doctest: +NORMALIZE_WHITESPACE
        KFACPreconditioner(layers=2, refresh=1, decay=0.95, num_probes=1,
                           relative_damping=0.01, max_dense=512, rank=32)

    References:
        Martens & Grosse (2015), Optimizing neural networks with Kronecker-factored approximate
        curvature, ICML, §3, §5 and §6.
        Grosse & Martens (2016), A Kronecker-factored approximate Fisher matrix for convolution
        layers, ICML, §3 (KFC: the patches, SUD and spatial homogeneity).
        George, Laurent, Bouthillier, Ballas & Vincent (2018), Fast approximate natural gradient
        descent in a Kronecker-factored eigenbasis, NeurIPS (the eigenbasis form).
    """

    needs_outputs = True
    _discovered = False  # True: layers found and recorded by HessianFree (precond='kfac')

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Linear],
        *,
        refresh: int = 1,
        decay: float = 0.95,
        num_probes: int | None = 1,
        relative_damping: float = 0.01,
        max_dense: int = 512,
        rank: int | None = 64,
        include_conv: bool = False,
    ) -> None:
        kinds = torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d
        if not isinstance(include_conv, bool):
            raise TypeError(f"`include_conv` must be a bool, got {include_conv!r}.")
        self.include_conv = include_conv
        if isinstance(model, torch.nn.Module):
            # convolutions K-FAC cannot take (groups > 1, non-zero padding) stay unpreconditioned
            candidates = [m for m in model.modules() if _is_layer(m, include_conv)]
        elif isinstance(model, Sequence) and all(isinstance(m, kinds) for m in model):
            candidates = list(model)
            for i, m in enumerate(candidates):
                why = None if isinstance(m, torch.nn.Linear) else _unsupported(m)
                if why is not None:
                    raise ValueError(
                        f"KFACPreconditioner cannot precondition layer {i} ({m}): {why}. Leave "
                        "it out of the sequence (its parameters then stay unpreconditioned)."
                    )
        else:
            raise TypeError(
                "`model` must be an nn.Module or a sequence of nn.Linear, nn.Conv1d or "
                f"nn.Conv2d modules, got {type(model).__name__}."
            )
        if not any(m.weight.requires_grad for m in candidates):
            frozen = f" ({len(candidates)} with a frozen one)" if candidates else ""
            raise ValueError(
                "`model` has no nn.Linear, nn.Conv1d or nn.Conv2d (groups=1, zero padding) "
                f"layer with a trainable weight (requires_grad){frozen} for KFACPreconditioner; "
                "a layer with a frozen weight is left out (its bias, if trained, "
                "unpreconditioned)."
            )
        self._configure(refresh, decay, num_probes, relative_damping, max_dense, rank)
        # every candidate is hooked; which of them K-FAC covers follows requires_grad
        # (_fix_layers), as precond='kfac' follows the optimizer's trained parameters
        self._candidates = candidates
        self._fixed: tuple = ()
        self._fix_layers()
        self._hooks = [m.register_forward_hook(self._record) for m in candidates]
        if isinstance(model, torch.nn.Module):
            self._hooks.append(model.register_forward_pre_hook(self._begin_pass))
            self._hooks.append(model.register_forward_hook(self._end_pass, always_call=True))

    @classmethod
    def _discovering(
        cls,
        *,
        refresh: int = 1,
        decay: float = 0.95,
        num_probes: int | None = 1,
        relative_damping: float = 0.01,
        max_dense: int = 512,
        rank: int | None = 64,
        include_conv: bool = False,
    ) -> KFACPreconditioner:
        """One without a model or hooks, for ``HessianFree(precond='kfac')``: its layers are
        found and its forward passes recorded by the optimizer (:class:`_LinearPass`), and
        handed over with :meth:`_observe`."""
        self = cls.__new__(cls)
        self._configure(refresh, decay, num_probes, relative_damping, max_dense, rank)
        self.layers, self._hooks, self._discovered = [], [], True
        self.include_conv = include_conv
        return self

    def _configure(
        self,
        refresh: int,
        decay: float,
        num_probes: int | None,
        relative_damping: float,
        max_dense: int,
        rank: int | None,
    ) -> None:
        self.refresh = check_int("refresh", refresh, low=1)
        self.decay = check_number("decay", decay, low=0.0, high=1.0, high_open=True)
        self.num_probes = None if num_probes is None else check_int("num_probes", num_probes, low=1)
        self.relative_damping = check_number(
            "relative_damping", relative_damping, low=0.0, high=math.inf, high_open=True
        )
        self.max_dense = check_int("max_dense", max_dense, low=0)
        self.rank = None if rank is None else check_int("rank", rank, low=1)
        # id(layer) -> (input, output, geometry: _Patches for a convolution, None for Linear)
        self._seen: dict[int, tuple[Tensor, Tensor, _Patches | None]] = {}
        # A layer that runs twice within one call of the model (shared weights, e.g. a
        # recurrent step) would be described by its last call alone: the model's own calls
        # (or the optimizer's closure call) delimit a forward pass, so such a layer is refused
        # rather than half-measured.
        self._in_pass = False
        self._ran: set[int] = set()  # layers recorded in the current pass of the model
        self._shared: dict[int, int] = {}  # layer -> calls within one pass, where > 1
        self.factors: list[tuple[Tensor, Tensor]] | None = None  # (A, G) per layer
        self.eigen: list[tuple[_Side, _Side]] | None = None  # per layer: (A's, G's)
        self._floors: list[Tensor] = []  # per layer: the damping floor
        self._calls = 0

    def _fix_layers(self) -> None:
        """The hooked form's layers from ``requires_grad`` now: those whose weight trains, each
        with its bias only if that trains too (a frozen bias is a constant, so the layer's
        block is ``G ⊗ A`` without the 1s, as for ``precond='kfac'``; a frozen weight leaves
        the layer out, its bias unpreconditioned). A change since the last call (freezing or
        unfreezing mid-training) fixes them again with fresh factors."""
        trained = [m for m in self._candidates if m.weight.requires_grad]
        fixed = tuple((id(m), _trained_bias(m) is not None) for m in trained)
        if fixed == self._fixed:
            return
        self._fixed = fixed
        self.layers = trained
        self.factors = self.eigen = None
        self._floors, self._calls = [], 0

    def _observe(self, recorded: _LinearPass, *, skip_shared: bool = False) -> None:
        """Take one recorded closure call's layers (the first call fixes them, in the order
        they ran; without those that ran twice, with ``skip_shared``) and their inputs and
        outputs, as the module hooks would have recorded them."""
        biases = {id(m.weight): m.bias for m in recorded.order}
        if self.layers and any(
            any(id(p) not in recorded.param_ids for p in _params_of(m))
            or (m.bias is None and biases.get(id(m.weight)) is not None)
            for m in self.layers
        ):
            # a parameter frozen (or dropped from the optimizer) since the layers were fixed,
            # or a frozen bias trained again: fix them again from this call, with fresh factors
            # (a layer's factor A has a row and column for its bias only if it is trained)
            self.layers = []
            self.factors = self.eigen = None
            self._floors, self._calls = [], 0
        if not self.layers:
            self.layers = recorded.layers(skip_shared=skip_shared)
        by_weight = {id(layer.weight): layer for layer in self.layers}
        for key, record in recorded.records.items():
            layer = by_weight.get(key)
            if layer is not None:
                self._seen[id(layer)] = record
                if recorded.counts[key] > 1:
                    self._shared[id(layer)] = recorded.counts[key]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, refresh={self.refresh!r}, "
            f"decay={self.decay!r}, num_probes={self.num_probes!r}, "
            f"relative_damping={self.relative_damping!r}, max_dense={self.max_dense!r}, "
            f"rank={self.rank!r}" + (", include_conv=True)" if self.include_conv else ")")
        )

    def state_dict(self) -> dict:
        """The running factors, their spectra and the step counter, as tensors and lists.

        With them a resumed run continues the exact trajectory: the factors are running
        averages over every refresh so far, and truncated spectra are refined from the
        previous ones (subspace iteration), so neither can be rebuilt from one batch.
        """
        return {
            "factors": None if self.factors is None else [list(f) for f in self.factors],
            "eigen": None
            if self.eigen is None
            else [[list(side) for side in pair] for pair in self.eigen],
            "calls": self._calls,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output, checked against the layers (else unchanged).

        Tensors are moved to each layer's device and to the factors' dtype (the layer's, or
        float32 for 16-bit layers).

        Raises:
            ValueError: If keys are missing, the counter is not an int >= 0, the number of
                layers differs, a factor or spectrum has the wrong shape for its layer (dense
                up to ``max_dense``, truncated above ``rank``), or a value is NaN/Inf.
        """
        factors, eigen, calls = _state_entries(self, state, ("factors", "eigen", "calls"))
        if not self._discovered:
            self._fix_layers()
        if (factors is None) != (eigen is None):
            raise ValueError(
                "KFACPreconditioner state: `factors` and `eigen` must both be set or both None."
            )
        if factors is None:
            self.factors = self.eigen = None
            self._floors, self._calls = [], calls
            return
        n = len(self.layers)
        if not (isinstance(factors, list | tuple) and isinstance(eigen, list | tuple)) or (
            len(factors) != n or len(eigen) != n
        ):
            raise ValueError(
                f"KFACPreconditioner state: expected `factors` and `eigen` for {n} layer(s), "
                f"got {_count(factors)} and {_count(eigen)}: saved for another model?"
            )
        new_factors, new_eigen = [], []
        for i, (layer, pair, sides) in enumerate(zip(self.layers, factors, eigen, strict=True)):
            w = layer.weight
            d_out, d_in = _dims(layer)
            dims = (d_in + (_trained_bias(layer) is not None), d_out)
            fs, es = [], []
            for j, (dim, which) in enumerate(zip(dims, "AG", strict=True)):
                where = f"layer {i} ({layer}) {which}"
                f = _item(pair, j)
                want = (dim,) if dim > self.max_dense else (dim, dim)
                if not isinstance(f, Tensor) or tuple(f.shape) != want:
                    raise ValueError(
                        f"KFACPreconditioner state: {where} factor must have shape {want}, got "
                        f"{_shape_of(f)}."
                    )
                _check_finite(self, f"{where} factor", f)
                fs.append(f.to(w.device, _factor_dtype(w)))
                es.append(self._checked_side(_item(sides, j), dim, where, w))
            new_factors.append(tuple(fs))
            new_eigen.append(tuple(es))
        self.factors, self.eigen, self._calls = new_factors, new_eigen, calls
        self._floors = [
            self.relative_damping * _mean_eigenvalue(G) * _mean_eigenvalue(A)
            for A, G in self.factors
        ]

    def _checked_side(self, side: object, dim: int, where: str, like: Tensor) -> _Side:
        """One saved ``(Q, values, rest)``, of the shapes :meth:`_eigen` gives for ``dim``."""
        if dim > self.max_dense:
            want = (None, (dim,), None)
        elif self.rank is None or dim <= self.rank:
            want = ((dim, dim), (dim,), None)
        else:
            want = ((dim, self.rank), (self.rank,), ())
        got = tuple(_item(side, k) for k in range(3))
        if not (isinstance(side, list | tuple) and len(side) == 3) or any(
            (t is not None) if w is None else not (isinstance(t, Tensor) and tuple(t.shape) == w)
            for t, w in zip(got, want, strict=True)
        ):
            raise ValueError(
                f"KFACPreconditioner state: {where} spectrum must be (Q, values, rest) of shapes "
                f"{want}, got {tuple(None if t is None else _shape_of(t) for t in got)}."
            )
        out = []
        for name, t in zip(("Q", "values", "rest"), got, strict=True):
            if t is not None:
                _check_finite(self, f"{where} spectrum {name}", t)
                t = t.to(like.device, _factor_dtype(like))
            out.append(t)
        return tuple(out)  # type: ignore[return-value]

    def remove(self) -> None:
        """Detach the forward hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _begin_pass(self, module: torch.nn.Module, args: tuple) -> None:
        self._in_pass, self._ran = True, set()

    def _end_pass(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self._in_pass = False

    def _record(self, module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
            self._seen[id(module)] = (args[0], output, _geometry(module))
            if self._in_pass:
                if id(module) in self._ran:
                    self._shared[id(module)] = self._shared.get(id(module), 1) + 1
                self._ran.add(id(module))

    # ---- statistics ----
    def _probes(self, ctx: PrecondContext, outputs: Tensor) -> Tensor:
        """Output-side cotangents ``u`` (``(k, *outputs.shape)``) with E[u uᵀ] ≈ H_ℓ."""
        if ctx.loss_hessian is None:  # empirical Fisher: the output gradient, per example
            go = ctx.output_grad
            n = go.shape[0] if go.dim() > 0 else 1
            scale = math.sqrt(float(n)) if ctx.reduction == "mean" else 1.0
            return (go * scale).unsqueeze(0)
        if self.num_probes is None:  # every output entry of an example: exact E over ξ
            m = outputs[0].numel()
            eye = torch.eye(m, dtype=outputs.dtype, device=outputs.device)
            xi = eye.view(m, 1, *outputs.shape[1:]).expand(m, *outputs.shape)
        else:
            shape = (self.num_probes, *outputs.shape)
            xi = torch.randint(0, 2, shape, generator=ctx.generator, device=outputs.device)
            xi = xi.to(outputs.dtype).mul_(2).sub_(1)
        h = (xi * ctx.loss_hessian(xi)).clamp_(min=0.0)  # diag(H_ℓ) where H_ℓ is diagonal
        if self.num_probes is None:
            h = h.sum(0, keepdim=True).expand_as(xi)  # the same diagonal under every ξ
        return h.sqrt() * xi

    def update(self, ctx: PrecondContext) -> None:
        """Recompute the factors from the last recorded forward pass and ``ctx``'s outputs."""
        if ctx.jacobian is None or isinstance(ctx.jacobian.outputs, tuple):
            raise ValueError(
                "KFACPreconditioner needs one outputs tensor with examples along dimension 0: "
                "make the closure return (loss, outputs)."
            )
        shared = [(i, m) for i, m in enumerate(self.layers) if id(m) in self._shared]
        if shared:
            i, m = shared[0]
            raise ValueError(
                f"KFACPreconditioner: layer {i} ({m}) ran {self._shared[id(m)]} times in one "
                "forward pass of the model (or one closure call, for precond='kfac'; shared "
                "weights, e.g. a recurrent step), and its "
                "factors would describe its last call only; pass the layers that run once per "
                "pass, KFACPreconditioner([layer, ...]), or use another preconditioner."
            )
        missing = [i for i, m in enumerate(self.layers) if id(m) not in self._seen]
        frozen = [
            i for i in missing if not any(p.requires_grad for p in _params_of(self.layers[i]))
        ]
        if frozen:  # no graph through it: frozen after the layers were fixed
            raise ValueError(_untrained_message(frozen[0], self.layers[frozen[0]], {}))
        if missing:
            raise ValueError(
                f"KFACPreconditioner: layer {missing[0]} ({self.layers[missing[0]]}) ran in no "
                "graph-building forward pass; pass the model whose layers make the outputs."
            )
        outputs = ctx.jacobian.outputs
        U = self._probes(ctx, outputs)
        # E over ξ: a mean over random probes; the one-hot probes of the exact mode are summed
        exact = self.num_probes is None and ctx.loss_hessian is not None
        probes = 1 if exact else U.shape[0]
        records = [self._seen[id(m)] for m in self.layers]
        layer_outputs = [s for _, s, _ in records]
        with torch.enable_grad():
            if U.shape[0] == 1:  # one probe: a plain backward pass, without vmap's overhead
                deltas = torch.autograd.grad(
                    outputs, layer_outputs, U[0], retain_graph=True, allow_unused=True
                )
                deltas = [None if d is None else d.unsqueeze(0) for d in deltas]
            else:
                deltas = torch.autograd.grad(
                    outputs,
                    layer_outputs,
                    U,
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                )
        new = []
        for (a, s, geometry), d, layer in zip(records, deltas, self.layers, strict=True):
            # 16-bit layers: statistics in float32 (float16 squares underflow; no eigh kernel)
            work = _factor_dtype(layer.weight)
            bias = _trained_bias(layer) is not None
            if d is None:
                d = torch.zeros((U.shape[0], *s.shape), dtype=s.dtype, device=s.device)
            d = d.detach()
            if geometry is not None:  # a convolution: channels last, a row per position
                d = d.movedim(d.dim() - geometry.dims - 1, -1)
            d = d.reshape(-1, d.shape[-1]).to(work)  # (probes × examples × positions) rows
            A = self._input_moment(a.detach(), geometry, bias, work)
            G = self._second_moment(d, probes)
            new.append((ctx.average(A), ctx.average(G)))
        if self.factors is None or self.decay == 0.0:
            factors = new
        else:  # out of place: kept only once checked finite and their spectra exist
            w = self.decay
            factors = [
                (A0 * w + A * (1 - w), G0 * w + G * (1 - w))
                for (A0, G0), (A, G) in zip(self.factors, new, strict=True)
            ]
        # NaN/Inf statistics (e.g. a NaN curvature batch) must not enter the running factors.
        # Dense factors' eigh would often raise, but diagonal ones (above max_dense) have no
        # decomposition, and eigh's behaviour on NaN differs across devices: one check for all,
        # one host read per refresh. HessianFree turns this error into a rejected step.
        finite = torch.stack([torch.isfinite(F).all() for pair in factors for F in pair])
        if not bool(finite.all()):
            bad = [
                f"layer {i} {'AG'[j]}"
                for i, pair in enumerate(factors)
                for j, F in enumerate(pair)
                if not bool(torch.isfinite(F).all())
            ]
            raise FloatingPointError(
                f"KFACPreconditioner: NaN or infinite curvature statistics ({', '.join(bad)}); "
                "the factors keep their previous values."
            )
        previous = self.eigen or [(None, None)] * len(factors)
        eigen = [
            (self._eigen(A, pa), self._eigen(G, pg))
            for (A, G), (pa, pg) in zip(factors, previous, strict=True)
        ]
        self.eigen = self._finite_eigen(factors, previous, eigen)
        self.factors = factors
        # the floor: relative_damping times the mean eigenvalue of G ⊗ A (kept on the device)
        self._floors = [
            self.relative_damping * _mean_eigenvalue(G) * _mean_eigenvalue(A)
            for A, G in self.factors
        ]

    def _input_moment(
        self, a: Tensor, geometry: _Patches | None, bias: bool, work: torch.dtype
    ) -> Tensor:
        r""":math:`A`: the mean of :math:`\bar a \bar a^\top` over the rows of the layer's
        input (examples, and positions of a sequence or of a convolution's output: its
        patches), a 1 appended for the bias. A convolution's patches are unfolded a few
        examples at a time (all of them at once would be ``prod(kernel)`` times the input)."""
        if geometry is None:
            chunks = [a.reshape(-1, a.shape[-1])]
        else:
            if a.dim() == geometry.dims + 1:  # unbatched
                a = a.unsqueeze(0)
            size = max(1, a[0].numel() * math.prod(geometry.kernel))  # ~ one example's rows
            chunks = a.split(max(1, (1 << 22) // size))
        total, count = None, 0
        for chunk in chunks:
            rows = (chunk if geometry is None else geometry.rows(chunk)).to(work)
            if bias:
                rows = torch.cat([rows, torch.ones_like(rows[:, :1])], 1)
            moment = self._second_moment(rows, 1)
            total = moment if total is None else total.add_(moment)
            count += rows.shape[0]
        return total / count

    def _second_moment(self, rows: Tensor, count: int) -> Tensor:
        r""":math:`\sum_i x_i x_i^\top / c` over the rows, only its diagonal above ``max_dense``."""
        if rows.shape[1] > self.max_dense:
            return rows.square().sum(0) / count
        return rows.T @ rows / count

    def _finite_eigen(
        self,
        factors: list[tuple[Tensor, Tensor]],
        previous: Sequence[tuple[_Side | None, _Side | None]],
        eigen: list[tuple[_Side, _Side]],
    ) -> list[tuple[_Side, _Side]]:
        """``eigen``, with any spectrum that came back non-finite recomputed in float64.

        LAPACK's float32 ``eigh`` (MKL's ``ssyevd`` on CPU) can return NaN, without an error,
        for a finite factor: an input factor :math:`A` with exact zero rows (dead ReLU units
        feeding the layer) and fewer examples than inputs did so on a CNN at batch 100, and
        every step was then rejected as a non-finite curvature product. float64's ``eigh``
        of the same factor is finite, so a spectrum is redone there and cast back; finite
        spectra are kept as computed (one host read per refresh, beside the factors' check).
        """
        parts = [t for pair in eigen for side in pair for t in side if t is not None]
        if bool(torch.stack([torch.isfinite(t).all() for t in parts]).all()):
            return eigen
        out = []
        for (A, G), (pa, pg), pair in zip(factors, previous, eigen, strict=True):
            fixed = []
            for F, prev, side in zip((A, G), (pa, pg), pair, strict=True):
                if all(t is None or bool(torch.isfinite(t).all()) for t in side):
                    fixed.append(side)
                    continue
                wide = None if prev is None else tuple(
                    None if t is None else t.double() for t in prev
                )  # fmt: skip
                side64 = self._eigen(F.double(), wide)  # type: ignore[arg-type]
                fixed.append(tuple(None if t is None else t.to(F.dtype) for t in side64))
            out.append(tuple(fixed))
        parts = [t for pair in out for side in pair for t in side if t is not None]
        if not bool(torch.stack([torch.isfinite(t).all() for t in parts]).all()):
            raise FloatingPointError(
                "KFACPreconditioner: a factor's eigendecomposition is not finite, even in "
                "float64; the factors keep their previous values."
            )
        return out  # type: ignore[return-value]

    def _eigen(
        self, factor: Tensor, previous: _Side | None = None
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """The factor's spectrum as ``(Q, values, rest)``.

        A diagonal factor is ``(None, diagonal, None)``; a dense one its eigendecomposition
        (values clamped at 0, ``rest`` None), or above ``rank`` its top ``rank`` eigenpairs
        with ``rest`` the mean of the other eigenvalues, :math:`(\\mathrm{tr} F - \\sum
        s)/(n - r)`, taken on the orthogonal complement of those eigenvectors. Truncated factors
        are refreshed by one step of subspace iteration from the previous eigenvectors
        (:math:`QR` of :math:`FQ`, then Rayleigh-Ritz), :math:`O(n^2 r)` instead of an
        :math:`O(n^3)` eigendecomposition.
        """
        if factor.dim() == 1:
            return None, factor.clamp(min=0.0), None
        n = factor.shape[0]
        if self.rank is None or n <= self.rank:
            values, vectors = torch.linalg.eigh(factor)
            return vectors, values.clamp_(min=0.0), None
        if previous is not None and previous[0] is not None and previous[2] is not None:
            basis = torch.linalg.qr(factor @ previous[0]).Q
            values, rotation = torch.linalg.eigh(basis.T @ factor @ basis)
            top = basis @ rotation
        else:
            values, top = torch.linalg.eigh(factor)
            values, top = values[-self.rank :], top[:, -self.rank :]
        values = values.clamp_(min=0.0)
        rest = ((factor.trace() - values.sum()) / (n - self.rank)).clamp_(min=0.0)
        return top, values, rest

    def __call__(self, ctx: PrecondContext) -> Callable[[Tensor], Tensor]:
        r""":math:`r \mapsto M^{-1}r` at the damping of ``ctx``, for :func:`hessfree.cg`."""
        if not self._discovered:
            self._fix_layers()
        try:
            if self.eigen is None or self._calls % self.refresh == 0:
                self.update(ctx)
                self._calls = 0
        finally:
            self._seen.clear()  # release the recorded forward pass's graph
            self._shared.clear()
        self._calls += 1
        shift = ctx.shift
        mu = ctx.damping + (float(shift.mean()) if isinstance(shift, Tensor) else shift)
        return self.apply_with(ctx.jacobian.params, mu)

    def apply_with(self, params: Sequence[Tensor], mu: float) -> Callable[[Tensor], Tensor]:
        r""":math:`r \mapsto M^{-1}r` for the damping :math:`\mu` with the current factors;
        ``params`` gives the flat vector's layout (the optimizer's parameters, in order)."""
        if self.eigen is None:
            raise RuntimeError("KFACPreconditioner: no factors yet; call it with a context.")
        if not (mu > 0 and math.isfinite(mu)):  # μ = inf: z = 0, a solve that went nowhere
            raise ValueError(
                f"KFACPreconditioner needs a positive damping (finite, > 0), got {mu!r}."
            )
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        index = {id(p): i for i, p in enumerate(params)}
        plan = []
        covered = 0
        for i, (layer, (side_a, side_g), floor) in enumerate(
            zip(self.layers, self.eigen, self._floors, strict=True)
        ):
            bias = _trained_bias(layer)
            iw = index.get(id(layer.weight))
            ib = None if bias is None else index.get(id(bias))
            if iw is None or (bias is not None and ib is None):
                raise ValueError(_untrained_message(i, layer, index))
            d_out, d_in = _dims(layer)
            if _side_dim(side_a) != d_in + (bias is not None):
                raise ValueError(
                    f"KFACPreconditioner: the bias of layer {i} ({layer}) was "
                    f"{'frozen' if bias is None else 'unfrozen'} after its factors were "
                    "computed; call the preconditioner with a context (a step) to compute them "
                    "again."
                )
            w = slice(offsets[iw], offsets[iw + 1])
            b = None if ib is None else slice(offsets[ib], offsets[ib + 1])
            covered += layer.weight.numel() + (0 if ib is None else layer.bias.numel())
            # the floor stays a tensor: no host read per call
            solve = _KronSolve(side_g, side_a, floor + mu, d_in)
            plan.append((w, b, solve, (d_out, d_in)))
        whole = covered == offsets[-1]

        work = self.eigen[0][0][1].dtype if self.eigen else None  # the factors' dtype

        n = offsets[-1]

        def apply(r: Tensor) -> Tensor:
            if r.shape != (n,):  # else a view deep inside fails, naming no argument
                raise ValueError(
                    f"`r` must be a flat vector of shape ({n},), one entry per entry of "
                    f"`params`, got shape {tuple(r.shape)}."
                )
            # 16-bit vectors are solved in the factors' float32 and returned in their dtype
            given, r = r, r.to(work)
            # the weights and the bias of [W, b] are solved in place, without concatenation
            z = torch.empty_like(r) if whole else r.clone()
            for w, b, solve, shape in plan:
                solve(
                    r[w].view(shape),
                    None if b is None else r[b],
                    z[w].view(shape),
                    None if b is None else z[b],
                )
            return z.to(given.dtype)

        return apply


def _trained_bias(layer: object) -> Tensor | None:
    """A layer's bias as its K-FAC block holds it: ``None`` if it has none or it is frozen."""
    bias = layer.bias
    return bias if bias is not None and bias.requires_grad else None


def _side_dim(side: _Side) -> int:
    """The dimension of the factor a spectrum ``(Q, values, rest)`` came from."""
    return side[0].shape[0] if side[0] is not None else side[1].shape[0]


def _params_of(layer: object) -> list[Tensor]:
    """A layer's weight and (if any) bias."""
    return [p for p in (layer.weight, layer.bias) if p is not None]


def _untrained_message(i: int, layer: object, index: dict[int, int]) -> str:
    """Why layer ``i``'s parameters are not all the optimizer's, and what to do."""
    named = (("weight", layer.weight), ("bias", layer.bias))
    missing = [name for name, p in named if p is not None and id(p) not in index]
    what = " and ".join(missing) or "parameters"
    if any(not p.requires_grad for _, p in named if p is not None):
        # the layers follow requires_grad at every call: only reached when a parameter was
        # frozen between the call that computed the factors and this use of them
        return (
            f"KFACPreconditioner: the {what} of layer {i} ({layer}) "
            f"{'are' if len(missing) > 1 else 'is'} frozen (requires_grad=False) since its "
            "factors were computed; call the preconditioner with a context (a step) to find "
            "its layers again (a layer with a frozen weight is left out, a frozen bias counts "
            "as none)."
        )
    return (
        f"KFACPreconditioner: the {what} of layer {i} ({layer}) is not among the optimizer's "
        "parameters; pass the optimizer every parameter of the layers K-FAC preconditions, "
        "or K-FAC only the layers the optimizer trains (KFACPreconditioner([layer, ...]))."
    )


def _factor_dtype(like: Tensor) -> torch.dtype:
    """K-FAC's factors' dtype for a layer's parameter: its own, float32 for 16-bit ones."""
    return torch.promote_types(like.dtype, torch.float32)


class _Linear:
    """A K-FAC layer known by its parameters alone (:class:`KFACPreconditioner` reads
    ``weight`` and ``bias``): ``precond='kfac'``'s layers, also rebuilt from the optimizer's
    parameters when a saved state is loaded before any step. A convolution's weight is the
    matrix ``weight.view(out_channels, -1)`` (its geometry travels with each recorded call,
    :class:`_Patches`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, kind: str = "Linear") -> None:
        self.weight, self.bias, self.kind = weight, bias, kind
        self.out_features, self.in_features = _dims(self)

    def __repr__(self) -> str:
        if self.weight.dim() == 2:
            return (
                f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None})"
            )
        return f"{self.kind}(weight={tuple(self.weight.shape)}, bias={self.bias is not None})"


def _dims(layer: object) -> tuple[int, int]:
    """A layer's weight as K-FAC's matrix: (out, in), ``in`` = in_channels × prod(kernel)."""
    w = layer.weight
    return w.shape[0], w[0].numel()


def _unsupported(module: torch.nn.Module) -> str | None:
    """Why K-FAC cannot take this ``nn.Conv1d``/``nn.Conv2d`` (``None``: it can)."""
    if module.groups != 1:
        return (
            f"groups={module.groups} (a grouped convolution's weight is block-diagonal over "
            "its groups, not one Kronecker-factored block; only groups=1 is supported)"
        )
    if module.padding_mode != "zeros":
        return (
            f"padding_mode={module.padding_mode!r} (its patches are not zero-padded "
            "unfoldings; only 'zeros' is supported)"
        )
    return None


def _compiled_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper (``OptimizedModule``), told by name
    and its ``._orig_mod`` so that torch._dynamo need not be imported."""
    return type(module).__name__ == "OptimizedModule" and isinstance(
        getattr(module, "_orig_mod", None), torch.nn.Module
    )


def _is_layer(module: torch.nn.Module, conv: bool = True) -> bool:
    """Whether K-FAC takes ``module``: an ``nn.Linear``, or (with ``conv``) an ``nn.Conv1d``
    or ``nn.Conv2d`` with groups=1 and zero padding."""
    if isinstance(module, torch.nn.Linear):
        return True
    return (
        conv
        and isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d)
        and _unsupported(module) is None
    )


class _Patches:
    r"""How a convolution's input unfolds into the patches its weight multiplies.

    ``rows(x)`` gives, for an input ``(N, C, *spatial)`` (or unbatched ``(C, *spatial)``),
    the ``(N·L, C·prod(kernel))`` matrix whose row for example ``n`` and output position
    ``t`` is the patch :math:`a_{n,t}` with :math:`s_{n,:,t} = W a_{n,t} + b` (``W`` the weight
    as an ``(out, C·prod(kernel))`` matrix, rows in ``torch.nn.functional.unfold``'s order,
    which is the weight's own). Zero padding (numbers, ``'valid'`` or ``'same'``, the extra
    one on the right as torch pads), stride and dilation as the module's; 1-D convolutions
    as 2-D ones of height 1.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.dims = len(module.kernel_size)
        k, d = module.kernel_size, module.dilation
        if module.padding == "valid":
            pads = [(0, 0)] * self.dims
        elif module.padding == "same":
            pads = [(d[i] * (k[i] - 1) // 2, d[i] * (k[i] - 1) - d[i] * (k[i] - 1) // 2)
                    for i in range(self.dims)]  # fmt: skip
        else:
            pads = [(p, p) for p in module.padding]
        self.pad = tuple(x for pair in reversed(pads) for x in pair)  # F.pad: last dim first
        lift = (1,) if self.dims == 1 else ()
        self.kernel, self.dilation = lift + tuple(k), lift + tuple(d)
        self.stride = lift + tuple(module.stride)

    def rows(self, x: Tensor) -> Tensor:
        if x.dim() == self.dims + 1:  # unbatched
            x = x.unsqueeze(0)
        if any(self.pad):
            x = torch.nn.functional.pad(x, self.pad)
        if self.dims == 1:
            x = x.unsqueeze(2)
        cols = torch.nn.functional.unfold(x, self.kernel, self.dilation, 0, self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _geometry(module: torch.nn.Module) -> _Patches | None:
    """A recorded call's geometry: ``None`` for ``nn.Linear``, the patches for a convolution."""
    return None if isinstance(module, torch.nn.Linear) else _Patches(module)


class _LinearPass:
    r"""The ``nn.Linear`` (and, with ``conv``, ``nn.Conv1d``/``nn.Conv2d``) calls of one
    closure call, recorded by a global forward hook.

    Only layers whose weight is among ``params`` count (a bias that is not, e.g. frozen, is
    left out: the layer counts as one without a bias), and only calls that build a graph
    (grad enabled, an output that requires grad). Convolutions K-FAC cannot take (groups > 1,
    padding other than zeros: :func:`_unsupported`) are not layers (their parameters stay
    unpreconditioned). ``records`` maps the weight's id to the last call's (input, output,
    geometry: :class:`_Patches`, ``None`` for ``nn.Linear``), ``counts`` to its calls in the
    pass (more than one: shared weights, e.g. a recurrent cell), ``order`` the first calls'
    order. :func:`torch.nn.modules.module.register_module_forward_hook` fires for every module
    in every model while installed, so :meth:`recording` removes it on exit, also on an error.
    """

    def __init__(self, params: Sequence[Tensor], *, conv: bool = True) -> None:
        self.param_ids = {id(p) for p in params}
        self.conv = conv
        self.records: dict[int, tuple[Tensor, Tensor, _Patches | None]] = {}
        self.counts: dict[int, int] = {}
        self.order: list[_Linear] = []
        # parameters of ours that another (not a layer) module of the pass holds directly:
        # a tied weight, e.g. an nn.Embedding's table reused as the output layer's weight
        self.elsewhere: set[int] = set()
        # torch.compile's module wrappers that ran (their own call is eager, so seen), with
        # their outputs
        self.compiled: list[tuple[torch.nn.Module, Tensor]] = []

    def _hook(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if (
            _compiled_module(module)
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
        ):
            self.compiled.append((module._orig_mod, output))
        layer = _is_layer(module, self.conv)
        if not layer and torch.is_grad_enabled():
            for p in module.parameters(recurse=False):
                if id(p) in self.param_ids:
                    self.elsewhere.add(id(p))
        # a layer without weights (nn.Linear(4, 0)) has no factors to form: left out
        if not (
            layer
            and id(module.weight) in self.param_ids
            and module.weight.numel() > 0
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
            and args
            and isinstance(args[0], Tensor)
        ):
            return
        key = id(module.weight)
        if key not in self.counts:
            # a bias the optimizer does not train (frozen) is a constant: the layer is one
            # without a bias for K-FAC (its block is the weight's alone, A without the 1s)
            bias = module.bias
            bias = bias if id(bias) in self.param_ids else None
            self.order.append(_Linear(module.weight, bias, type(module).__name__))
        self.counts[key] = self.counts.get(key, 0) + 1
        self.records[key] = (args[0], output, _geometry(module))

    @contextlib.contextmanager
    def recording(self) -> Iterator[_LinearPass]:
        with FORWARD.installed(self._hook):
            yield self

    def layers(self, *, skip_shared: bool = False) -> list[_Linear]:
        """The layers that ran, in order (with ``skip_shared``: without those that ran twice
        or whose weight or bias another module used, as K-FAC's factors would see only the
        layer's share of that parameter's curvature)."""
        if not skip_shared:
            return list(self.order)
        return [
            m
            for m in self.order
            if self.counts[id(m.weight)] == 1 and not {id(m.weight), id(m.bias)} & self.elsewhere
        ]

    def release(self) -> None:
        """Drop the recorded tensors (and so their graph)."""
        self.records.clear()
        self.compiled.clear()

    def unseen_compiled(self) -> str | None:
        """Why K-FAC would miss layers, or ``None``: layers of ours inside a
        ``torch.compile``'d module that ran and used them (its output's graph reaches their
        weight: a layer the forward skipped is no miss) while their calls went unrecorded.

        Dynamo does not guard on module hooks (``torch._dynamo.config.
        skip_nnmodule_hook_guards``): a module compiled before this hook was installed (a
        first call outside ``step``, an evaluation) runs code that never calls it, so the
        layers inside are invisible. Unseen, ``precond='auto'`` turned K-FAC off silently
        (three steps of a compiled MLP 0.95 off the uncompiled run's) and ``'kfac'`` said it
        found no ``nn.Linear`` (experiments/README.md, "unseen19").
        """
        missed = [
            type(m).__name__
            for wrapped, output in self.compiled
            for m in wrapped.modules()
            if _is_layer(m, self.conv)
            and id(m.weight) in self.param_ids
            and id(m.weight) not in self.counts
            and _depends_on([output], [m.weight])
        ]
        if not missed:
            return None
        return (
            f"the closure ran a torch.compile'd module whose {len(missed)} layer(s) "
            f"({', '.join(sorted(set(missed)))}) K-FAC's forward hook did not see: dynamo "
            "compiled that module before HessianFree's hook was installed (e.g. at a first call "
            "outside step) and does not guard on module hooks, so its compiled code never calls "
            "the hook. Call the uncompiled module in the closure (a compiled nn.Module keeps it "
            "as `._orig_mod`), or let step() make its first call (torch.compiler.reset() drops "
            "what dynamo compiled)"
        )


def _item(seq: object, k: int) -> object:
    """``seq[k]`` of a saved list or tuple, else ``None`` (a shape check then names it)."""
    return seq[k] if isinstance(seq, list | tuple) and k < len(seq) else None


def _count(x: object) -> object:
    return len(x) if isinstance(x, list | tuple) else type(x).__name__


def _mean_eigenvalue(factor: Tensor) -> Tensor:
    """The mean eigenvalue of a factor (dense, or its diagonal), a 0-dim tensor."""
    return factor.mean() if factor.dim() == 1 else factor.diagonal().mean()


class _RightSolve:
    r"""Division by :math:`g\,a + \mu` over the right factor's eigenvalues :math:`a`, for rows
    in left eigenspaces with eigenvalues ``g`` (one per row, or one for all), precomputed.

    A truncated right factor (top eigenpairs :math:`Q, s` and the value :math:`\sigma` on the
    rest) costs one projection and one lift: with :math:`c = 1/(g\sigma + \mu)`,
    :math:`Y = c X + [(XQ) \odot (1/(g s^\top + \mu) - c)] Q^\top`. The rows
    :math:`X = [X_w, x_b]` come split into the weights' columns (the first ``d_in``) and the
    bias column (``None`` without a bias), and so do the results.
    """

    def __init__(self, g: Tensor, side: _Side, mu: float | Tensor, d_in: int) -> None:
        Q, values, rest = side
        g = g.reshape(-1, 1)
        self.S = torch.reciprocal(g * values + mu)
        self.c = None
        if rest is not None:
            self.c = torch.reciprocal(g * rest + mu)
            self.S = self.S - self.c
        self.Q = Q
        if Q is None:  # diagonal: the grid splits by columns
            self.Sw, self.sb = self.S[:, :d_in], self.S[:, d_in:].reshape(-1)
        else:
            self.Qw, self.qb = Q[:d_in], Q[d_in:].reshape(-1)
            self.QTw = self.Qw.T.contiguous()
            self.cb = None if self.c is None else self.c.reshape(-1)

    def __call__(
        self,
        Xw: Tensor,
        xb: Tensor | None,
        out_w: Tensor | None = None,
        out_b: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if self.Q is None:
            Yw = torch.mul(Xw, self.Sw) if out_w is None else torch.mul(Xw, self.Sw, out=out_w)
            if xb is None:
                return Yw, None
            yb = torch.mul(xb, self.sb) if out_b is None else torch.mul(xb, self.sb, out=out_b)
            return Yw, yb
        P = torch.mm(Xw, self.Qw)
        if xb is not None:
            P.addr_(xb, self.qb)
        P.mul_(self.S)
        if self.c is None:
            Yw = torch.mm(P, self.QTw) if out_w is None else torch.mm(P, self.QTw, out=out_w)
            yb = None
            if xb is not None:
                yb = torch.mv(P, self.qb) if out_b is None else torch.mv(P, self.qb, out=out_b)
            return Yw, yb
        Yw = torch.addmm(Xw * self.c, P, self.QTw, out=out_w)
        yb = None if xb is None else torch.addmv(xb * self.cb, P, self.qb, out=out_b)
        return Yw, yb


class _KronSolve:
    r""":math:`(G \otimes A + \mu I)^{-1}\mathrm{vec}(V)` with :math:`V` shaped (out, in).

    :math:`G` acts on rows, :math:`A` on columns. A truncated :math:`G` (top eigenvectors
    :math:`Q`, value :math:`\sigma` on the complement) splits :math:`V` into
    :math:`QQ^\top V` and the rest: with :math:`R_g` the right solve for row eigenvalue
    :math:`g`, the result is :math:`Q[R_s(Q^\top V) - R_\sigma(Q^\top V)] + R_\sigma(V)`.
    :math:`V = [V_w, v_b]` comes as the weights and the bias (``None`` without one), each a view
    of the flat vector, and the result is written into ``out_w`` and ``out_b``.
    """

    def __init__(self, side_g: _Side, side_a: _Side, mu: float | Tensor, d_in: int) -> None:
        Q, values, rest = side_g
        self.Q = Q
        self.QT = None if Q is None else Q.T.contiguous()
        self.top = _RightSolve(values, side_a, mu, d_in)
        self.rest = None if rest is None else _RightSolve(rest, side_a, mu, d_in)

    def __call__(self, Vw: Tensor, vb: Tensor | None, out_w: Tensor, out_b: Tensor | None) -> None:
        if self.Q is None:
            self.top(Vw, vb, out_w, out_b)
            return
        Xw = torch.mm(self.QT, Vw)
        xb = None if vb is None else torch.mv(self.QT, vb)
        Tw, tb = self.top(Xw, xb)
        if self.rest is None:
            torch.mm(self.Q, Tw, out=out_w)
            if vb is not None:
                torch.mv(self.Q, tb, out=out_b)
            return
        Rw, rb = self.rest(Xw, xb)
        Tw.sub_(Rw)
        self.rest(Vw, vb, out_w, out_b)  # the complement's part, written in place
        out_w.addmm_(self.Q, Tw)
        if vb is not None:
            out_b.addmv_(self.Q, tb.sub_(rb))


class CGPairPreconditioner:
    r"""Limited-memory BFGS preconditioner from the previous CG run's products (Morales & Nocedal).

    Every product :math:`v \mapsto Av` that CG evaluates with the damped curvature
    :math:`A = C + \lambda I` is a curvature pair :math:`(s, y) = (v, Av)` at no extra cost.
    The last ``history`` pairs of one step's CG run define, by the L-BFGS two-loop recursion
    (Nocedal & Wright 2006, Algorithm 7.4), the inverse-Hessian approximation :math:`H` that
    preconditions the next step's CG, :math:`M^{-1} = H`, with :math:`H_0 = \gamma I`,
    :math:`\gamma = s^\top y / y^\top y` of the newest pair. Between steps only the damping is
    known to change, so each pair's :math:`y` gets :math:`(\lambda_{\mathrm{new}} -
    \lambda_{\mathrm{old}})\,s` (exact if :math:`C` did not move). Pairs with
    :math:`s^\top y \le 0` or non-finite values are skipped; a CG run with none usable (a step
    rejected for a non-finite curvature) keeps the previous run's pairs. The first step (no
    pairs) runs unpreconditioned.

    The optimizer hands its damped product to :meth:`watch`, which records the pairs; the
    pairs are not part of ``state_dict()`` (a resumed run starts one step unpreconditioned).

    Args:
        history: Pairs kept, an int >= 1 (``m``; 8-20 in Morales & Nocedal's tests).

    Raises:
        ValueError: If ``history`` is below 1.

    Example:
        >>> CGPairPreconditioner(history=16)
        CGPairPreconditioner(history=16)

    References:
        Morales & Nocedal (2000), Automatic preconditioning by limited memory quasi-Newton
        updating, SIAM J. Optim. 10(4), §2-3.
        Nocedal & Wright (2006), Numerical Optimization, 2nd ed., Algorithm 7.4.
    """

    needs_outputs = False

    def __init__(self, history: int = 16) -> None:
        self.history = check_int("history", history, low=1)
        self._recorded: list[tuple[Tensor, Tensor]] = []  # this step's (v, Av), newest last
        self._pairs: list[tuple[Tensor, Tensor]] = []  # the previous step's, at _damping
        self._damping = 0.0  # λ of ``_pairs``
        self._step_damping = 0.0  # λ of the step now recording

    def __repr__(self) -> str:
        return f"{type(self).__name__}(history={self.history!r})"

    def watch(self, matvec: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``matvec`` that also records its last ``history`` pairs ``(v, Av)``."""

        def recorded(v: Tensor) -> Tensor:
            Av = matvec(v)
            self._recorded.append((v.detach().clone(), Av.detach().clone()))
            del self._recorded[: -self.history]
            return Av

        return recorded

    def __call__(self, ctx: PrecondContext) -> Callable[[Tensor], Tensor] | None:
        r""":math:`r \mapsto Hr` from the pairs recorded since the last call, at ``ctx.damping``."""
        if self._recorded:  # the last CG run's pairs, taken at that step's damping
            if _any_usable(self._recorded):
                self._pairs, self._damping = self._recorded, self._step_damping
            # else (all non-finite or of non-positive curvature, e.g. a step rejected for a
            # NaN curvature batch) the previous step's pairs stay: adopting them left the next
            # step unpreconditioned
            self._recorded = []
        self._step_damping = ctx.damping
        return self.apply_with(ctx.damping)

    def apply_with(self, damping: float) -> Callable[[Tensor], Tensor] | None:
        """The two-loop operator for damping ``damping`` (``None`` without usable pairs)."""
        return two_loop(self._pairs, shift=damping - self._damping)


def _any_usable(pairs: Sequence[tuple[Tensor, Tensor]]) -> bool:
    """Whether :func:`two_loop` would use at least one of ``pairs`` (unshifted): one host read."""
    sy = torch.stack([s @ y for s, y in pairs])
    return bool((torch.isfinite(sy) & (sy > 0)).any())


def two_loop(
    pairs: Sequence[tuple[Tensor, Tensor]], shift: float = 0.0
) -> Callable[[Tensor], Tensor] | None:
    r"""The L-BFGS inverse :math:`r \mapsto Hr` from pairs :math:`(s_i, y_i + \sigma s_i)`.

    :math:`H` is the BFGS inverse update of :math:`H_0 = \gamma I` (:math:`\gamma = s^\top y /
    y^\top y` of the newest usable pair) by the pairs oldest first; :math:`\sigma` is ``shift``.
    It is symmetric positive definite, and :math:`H y_i = s_i` for the newest pair. Pairs with
    :math:`s^\top y \le 0` or a non-finite :math:`s^\top y, y^\top y` are left out.

    Args:
        pairs: ``(s, y)`` 1-D tensors of one size, oldest first.
        shift: :math:`\sigma`, added as :math:`y + \sigma s`.

    Returns:
        The operator, or ``None`` if no pair is usable.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> S = torch.eye(2, dtype=torch.float64)  # pairs along both axes: H = A⁻¹ exactly
        >>> two_loop([(s, A @ s) for s in S])(torch.tensor([1.0, 4.0], dtype=torch.float64))
        tensor([1., 1.], dtype=torch.float64)

    References:
        Nocedal & Wright (2006), Numerical Optimization, 2nd ed., Algorithm 7.4 and eq. (7.20).
    """
    S, Y, rho = [], [], []
    for s, y in pairs:
        y = y + shift * s if shift else y
        sy, yy = float(s @ y), float(y @ y)
        if math.isfinite(sy) and math.isfinite(yy) and sy > 0 and yy > 0:
            S.append(s)
            Y.append(y)
            rho.append(1.0 / sy)
    if not S:
        return None
    gamma = 1.0 / (rho[-1] * float(Y[-1] @ Y[-1]))

    def apply(r: Tensor) -> Tensor:
        q = r.clone()
        a = [0.0] * len(S)
        for i in reversed(range(len(S))):
            a[i] = rho[i] * (S[i] @ q)
            q.sub_(Y[i] * a[i])
        q.mul_(gamma)
        for i in range(len(S)):
            b = rho[i] * (Y[i] @ q)
            q.add_(S[i] * (a[i] - b))
        return q

    return apply
