"""Which preconditioner a :class:`hessfree.HessianFree` step's CG runs with.

``precond=None``, ``'martens'``, ``'kfac'``, ``'nystrom'``, ``'auto'`` (K-FAC on the
``nn.Linear`` layers a ``(loss, outputs)`` closure runs, where they hold most parameters) or a
user's callable of a :class:`hessfree.PrecondContext`; the built-in ones' state across steps
and in ``state_dict``; a gradient hook's pruning mask kept under every preconditioner.
Constants are read only in this module (studies patch them here).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ._checks import caller_stacklevel
from ._closure import _reduction_of
from ._flat import ParamLayout
from ._step_types import _Evaluation, _StepRun
from ._types import MatVec
from .curvature import FisherProduct, GGNProduct, JacobianProduct, StructurallyDampedGGN
from .preconditioning import (
    EmpiricalFisherDiagonal,
    KFACPreconditioner,
    NystromPreconditioner,
    PrecondContext,
    _Linear,
)

#: Preconditioners whose failure on NaN/Inf curvature leaves the step to CG's own check.
_BUILT_IN_PRECONDS = (NystromPreconditioner, KFACPreconditioner)
#: ``precond='kfac'`` (and ``'auto'``'s K-FAC): the settings of the scorecard's tuned CURVES
#: row (``experiments/README.md``, "kfacauto").
_KFAC_SETTINGS = dict(rank=32, refresh=2)
#: ``precond='auto'``'s K-FAC only where its ``nn.Linear`` layers hold at least this share of
#: the optimizer's parameters (ours): K-FAC's mini-batch regime caps CG at 2 iterations, which
#: left a GRU or LSTM whose head (1% of the parameters) was the only layer nearly
#: unpreconditioned and 4× behind precond=None (experiments/README.md, "unseen").
_KFAC_MIN_COVERAGE = 0.5
#: ``precond='auto'``'s and ``'kfac'``'s K-FAC take ``nn.Conv1d``/``nn.Conv2d`` layers too
#: (KFC): off, measured worse than K-FAC on the ``nn.Linear`` layers alone on three digits CNNs
#: (experiments/README.md, "kfacconv"); ``KFACPreconditioner(model, include_conv=True)`` opts in.
_AUTO_KFAC_CONV = False
_KFAC_CONV = False


def _discovering_kfac(*, auto: bool) -> KFACPreconditioner:
    """A K-FAC preconditioner that finds its layers in the closure's first graph-building call
    (``precond='kfac'``, or ``'auto'``'s with ``auto``)."""
    conv = _AUTO_KFAC_CONV if auto else _KFAC_CONV
    return KFACPreconditioner._discovering(**_KFAC_SETTINGS, include_conv=conv)


#: A built-in preconditioner's state before its first step.
_EMPTY_PRECOND_STATE = {
    NystromPreconditioner: {"U": None, "eigenvalues": None, "calls": 0},
    KFACPreconditioner: {"factors": None, "eigen": None, "calls": 0},
}


def _same(t: Tensor) -> Tensor:
    """The identity: a preconditioner's average over ranks in one process."""
    return t


def _user_precond(precond: Callable, ctx: PrecondContext) -> Tensor | MatVec | None:
    """``precond(ctx)``; a callable's type or attribute error is worded (the usual cause: one
    written ``r -> M^{-1} r``, as :func:`hessfree.cg`'s ``precond`` is, gets the context)."""
    if isinstance(precond, EmpiricalFisherDiagonal | KFACPreconditioner | NystromPreconditioner):
        try:
            return precond(ctx)
        except RuntimeError as err:
            # per-example rows are batched backward passes (vmap), which run the parameters'
            # tensor hooks on batched gradients: a hook that reads a value (float(g.norm()),
            # g.item()) raised torch's bare "Batching rule not implemented for aten::item"
            params = ctx.jacobian.params if ctx.jacobian is not None else []
            hooked = [p for p in params if getattr(p, "_backward_hooks", None)]
            if not hooked or "Batching rule not implemented" not in str(err):
                raise
            raise RuntimeError(
                f"{type(precond).__name__} failed inside a batched (vmap) backward pass, which "
                f"also runs the tensor hooks of {len(hooked)} parameter(s) (register_hook): "
                f"{err} A hook that reads or detaches its gradient (.item(), float(), "
                ".detach()) cannot run batched: use precond='auto', 'kfac', 'nystrom' or "
                "None (unbatched products), or remove the hook while HessianFree steps."
            ) from err
    try:
        return precond(ctx)
    except (TypeError, AttributeError) as err:
        raise TypeError(
            f"`precond` {precond!r} failed on the hessfree.PrecondContext it is called with: "
            f"{err}. HessianFree calls a precond callable with a PrecondContext and takes the "
            "diagonal of M (a flat tensor) or a function r -> M^-1 r back; to pass r -> M^-1 r "
            "itself (as to hessfree.cg), write precond=lambda ctx: apply."
        ) from err


#: Tensor hooks found to return ``None`` (observers: logging, gradient statistics), by hook.
_OBSERVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _observer(hook: Callable, p: Tensor) -> bool:
    """Whether the tensor hook ``hook`` on ``p`` returns ``None`` (leaves the gradient as it
    is), asked once per hook: called on a tensor of ones shaped like ``p``.

    Any hook was taken for a pruning mask: a logging hook (``w.register_hook(lambda g:
    log.append(g.norm()))``) zeroed the warm start and the preconditioner's output on every
    entry whose gradient happened to be 0 this step, the rows of an ``nn.Embedding`` absent
    from a mini-batch: 3.7 max |Δθ| from the run without it after 10 steps, and 0.111
    against 0.069 training-set loss ("unseen15"). A hook is called at every product anyway
    (each backward runs it); one more call, on ones, decides. A hook that fails on the probe
    keeps the mask (as before).
    """
    try:
        return _OBSERVERS[hook]
    except (KeyError, TypeError):  # not asked yet, or a hook that takes no weak reference
        pass
    try:
        with torch.no_grad():
            answer = hook(torch.ones_like(p)) is None
    except Exception:  # noqa: BLE001 - a probe only: such a hook keeps the mask
        answer = False
    with contextlib.suppress(TypeError):
        _OBSERVERS[hook] = answer
    return answer


def _hook_mask(params: list[Tensor], g: Tensor, layout: ParamLayout) -> Tensor | None:
    """1 where a parameter with a tensor gradient hook (``register_hook``) that can change
    its gradient has a nonzero gradient entry, 0 where it has a zero one, 1 on the other
    parameters; ``None`` when no parameter has such a hook (nothing is masked, and the step
    is bitwise as before). Hooks that return ``None`` (:func:`_observer`) do not count."""
    hooked = [
        any(not _observer(h, p) for h in (getattr(p, "_backward_hooks", None) or {}).values())
        for p in params
    ]
    if not any(hooked):
        return None
    blocks = g.split_with_sizes(layout.numels)
    return torch.cat(
        [
            (b != 0).to(g.dtype) if h else torch.ones_like(b)
            for b, h in zip(blocks, hooked, strict=True)
        ]
    )


def _masked_precond(precond: MatVec, keep: Tensor) -> MatVec:
    """``precond`` followed by the gradient hooks' mask (:func:`_hook_mask`): still symmetric
    positive semidefinite, and definite on the entries CG can reach."""

    def masked(r: Tensor) -> Tensor:
        return precond(r) * keep

    return masked


class _PreconditionerChoice:
    """The optimizer's preconditioner choice and state (a mixin of
    :class:`hessfree.HessianFree`)."""

    def _stateful_precond(self, create: str | None = None) -> object | None:
        """The built-in preconditioner whose state persists across steps, if any.

        K-FAC's running factors and Nyström's sketch (``precond='nystrom'`` or ``'kfac'``, or
        ``'auto'``'s, built on first use, or here with ``create``, the kind's class name) are
        refreshed every few steps and averaged over all of them: a resumed run continues
        identically only if they travel with the optimizer's state.
        """
        if isinstance(self.precond, _BUILT_IN_PRECONDS):
            return self.precond
        if self.precond == "auto" and self._auto_precond is None and create is not None:
            self._auto_precond = (
                _discovering_kfac(auto=True)
                if create == KFACPreconditioner.__name__
                else NystromPreconditioner()
            )
        return self._auto_precond if self.precond == "auto" else None

    def _precond_loader(self, saved: object) -> Callable[[], None]:
        """Check a saved preconditioner state now; return what installs it (after the rest)."""
        kind = saved.get("type") if isinstance(saved, Mapping) else type(saved).__name__
        precond = self._stateful_precond(create=None if saved is None else kind)
        if precond is None:
            if saved is not None:
                kind = saved.get("type") if isinstance(saved, Mapping) else type(saved).__name__
                raise ValueError(
                    f"`state_dict['precond']` holds a {kind} state, but this optimizer's "
                    f"precond is {self.precond!r}; build it with the same preconditioner."
                )
            return lambda: None
        fresh = copy.copy(precond)  # loaded and checked here, installed by the caller
        if saved is None:  # no state saved: start afresh, as a new preconditioner would
            fresh.load_state_dict(_EMPTY_PRECOND_STATE[type(precond)])
        else:
            kind = saved.get("type") if isinstance(saved, Mapping) else None
            if kind != type(precond).__name__ or "state" not in saved:
                raise ValueError(
                    f"`state_dict['precond']` must be {{'type': {type(precond).__name__!r}, "
                    f"'state': ...}} for this optimizer's {type(precond).__name__}, got "
                    f"{kind!r}."
                )
            if getattr(precond, "_discovered", False):
                fresh.layers = self._saved_layers(saved["state"])
            fresh.load_state_dict(saved["state"])
        return lambda: precond.__dict__.update(fresh.__dict__)

    def _saved_layers(self, state: object) -> list[_Linear]:
        """``precond='kfac'``'s layers from a saved state's parameter indices."""
        params = self._params()
        layers = state.get("layers", []) if isinstance(state, Mapping) else []
        if layers is None:
            return []
        out = []
        for k, pair in enumerate(layers if isinstance(layers, list | tuple) else [layers]):
            ok = isinstance(pair, list | tuple) and len(pair) == 2
            iw, ib = pair if ok else (None, None)
            ok = ok and all(
                i is None or (isinstance(i, int) and 0 <= i < len(params)) for i in (iw, ib)
            )
            if not ok or iw is None or params[iw].dim() not in (2, 3, 4):
                raise ValueError(
                    f"`state_dict['precond']['state']['layers'][{k}]` must be [weight index, "
                    f"bias index or None] into this optimizer's {len(params)} parameters (a "
                    f"2-D weight, or a 3-D/4-D convolution's), got {pair!r}: saved for another "
                    "model?"
                )
            kind = "Linear" if params[iw].dim() == 2 else f"Conv{params[iw].dim() - 2}d"
            out.append(_Linear(params[iw], None if ib is None else params[ib], kind))
        return out

    def _kfac_takes_conv(self) -> bool:
        """Whether the recorded calls include convolutions (``_AUTO_KFAC_CONV`` under
        ``precond='auto'``, else ``_KFAC_CONV``: only where measured to help)."""
        return _AUTO_KFAC_CONV if self.precond == "auto" else _KFAC_CONV

    def _records_linears(self) -> bool:
        """Whether graph-building closure calls record their ``nn.Linear`` calls (K-FAC found
        by the optimizer: ``precond='kfac'``, or ``'auto'`` until the closure proved unfit)."""
        if self.precond == "auto":  # under damping_metric='marquardt' 'auto' is Jacobi's
            return not self._auto_kfac_off and self.settings.damping_metric == "identity"
        return getattr(self.precond, "_discovered", False)

    def _auto_kfac(self, evaluation: _Evaluation, product: object) -> KFACPreconditioner | None:
        """``precond='auto'``'s K-FAC, where it applies: one process, float32/64 parameters,
        one outputs tensor,
        Gauss-Newton curvature (not Fisher), no hidden states (structural damping) and at least one
        ``nn.Linear`` of the optimizer's that ran once in the recorded closure call; else
        ``None``, and no more recording."""
        kfac = self._auto_precond if isinstance(self._auto_precond, KFACPreconditioner) else None
        blind = None if self._linear_pass is None else self._linear_pass.unseen_compiled()
        if blind is not None and not self._auto_kfac_off:  # torch.compile ("unseen19")
            self._auto_kfac_off, self._auto_precond, self._linear_pass = True, None, None
            warnings.warn(
                f"HessianFree: precond='auto' turned K-FAC off ({blind}).",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
            return None
        fit = (
            not self._auto_kfac_off
            # K-FAC's probes are drawn per rank: two ranks would not take one process's steps
            and self._avg.world_size == 1
            # 16-bit parameters: eigh has no float16 kernel on CPU, and K-FAC is unmeasured there
            and all(p.dtype in (torch.float32, torch.float64) for p in self._params())
            and isinstance(evaluation.outputs, Tensor)
            and evaluation.hidden is None
            and isinstance(product, GGNProduct)
            and not isinstance(product, FisherProduct | StructurallyDampedGGN)
            and self._linear_pass is not None
            and bool(
                kfac.layers if kfac is not None else self._linear_pass.layers(skip_shared=True)
            )
            and (kfac is not None or self._kfac_coverage() >= _KFAC_MIN_COVERAGE)
        )
        if not fit:
            self._auto_kfac_off = True
            self._linear_pass = None
            return None
        if kfac is None:
            kfac = self._auto_precond = _discovering_kfac(auto=True)
        return kfac

    def _kfac_coverage(self) -> float:
        """The share of the optimizer's parameter entries in the recorded ``nn.Linear`` layers
        (those that ran once), which ``precond='auto'``'s K-FAC would precondition."""
        params = self._params()
        own = {id(p) for p in params}
        covered = sum(
            p.numel()
            for m in self._linear_pass.layers(skip_shared=True)
            for p in (m.weight, m.bias)
            if p is not None and id(p) in own
        )
        return covered / max(sum(p.numel() for p in params), 1)

    def _preconditioner(
        self,
        evaluation: _Evaluation,
        product: object,
        params: list[Tensor],
        lam: float,
        shift: float | Tensor,
        *,
        curv: MatVec,
        g: Tensor,
        run: _StepRun,
    ) -> Tensor | MatVec | None:
        precond = self.precond
        lam_diag, shift_diag = lam, shift
        if run.metric is not None:
            if precond == "auto":
                # none: CG runs in Moré's scaled variables, diagonally preconditioned by D
                # already. K-FAC (and Nyström) see the scalar λ·mean(D) only: under Marquardt
                # K-FAC ended a scaled-input and a well-scaled MLP fit at 5.8× and 1.8× the
                # defaults' loss; Jacobi's diag(G) + λD + κ lost to none on 2 of 3 problems
                # (experiments/README.md, "jacscale")
                return None
            # Marquardt's λD: scalar-damped preconditioners (K-FAC, Nyström) get λ·mean(D); a
            # diagonal one the exact λD, as damping + shift = λ·mean(D) + κ + λ(D − mean(D))
            mean = float(run.metric.mean())
            lam_diag, shift_diag = lam * mean, shift + lam * (run.metric - mean)
            lam = lam_diag
        if precond == "auto":  # Nyström for residual blocks' Gauss-Newton, K-FAC, or none
            if isinstance(evaluation.outputs, tuple) and isinstance(product, GGNProduct):
                if self._auto_precond is None:
                    self._auto_precond = NystromPreconditioner()
                ctx = self._curvature_context(product, lam, shift, curv, g, run)
                return self._auto_precond(ctx)
            precond = self._auto_kfac(evaluation, product)
            if precond is None:
                return None
            try:
                return self._outputs_preconditioner(
                    precond, evaluation, product, params, lam_diag, shift_diag
                )
            except ValueError as err:  # a default never raises: K-FAC off from here on
                self._auto_kfac_off, self._auto_precond = True, None
                warnings.warn(
                    f"HessianFree: precond='auto' turned K-FAC off ({err}); pass precond='kfac' "
                    "to get the error, or precond=None to silence this.",
                    UserWarning,
                    stacklevel=caller_stacklevel(),
                )
                return None
        if precond is None:
            return None
        if not getattr(precond, "needs_outputs", True):  # curvature products only
            ctx = self._curvature_context(product, lam, shift, curv, g, run)
            return _user_precond(precond, ctx)
        return self._outputs_preconditioner(
            precond, evaluation, product, params, lam_diag, shift_diag
        )

    def _outputs_preconditioner(
        self,
        precond: object,
        evaluation: _Evaluation,
        product: object,
        params: list[Tensor],
        lam: float,
        shift: float | Tensor,
    ) -> Tensor | MatVec | None:
        """A preconditioner from the outputs' Jacobian and gradient (K-FAC, Martens' diagonal,
        a callable), with the layers ``precond='kfac'`` recorded handed over first."""
        if getattr(precond, "_discovered", False):
            recorded, self._linear_pass = self._linear_pass, None
            if recorded is not None:  # None: no graph-building call (cannot happen in step)
                blind = recorded.unseen_compiled()
                if blind is not None:
                    recorded.release()
                    raise ValueError(f"precond='kfac': {blind}.")
                precond._observe(recorded, skip_shared=self.precond == "auto")
                recorded.release()
            if not precond.layers:
                convs = " (nor nn.Conv1d/nn.Conv2d with groups=1 and zero padding)"
                raise ValueError(
                    f"precond='kfac' found no nn.Linear layer{convs if _KFAC_CONV else ''} "
                    "whose weight is among the optimizer's parameters in the closure's forward "
                    "pass; pass another precond ('auto', None, 'martens', 'nystrom')"
                    + (
                        ""
                        if _KFAC_CONV
                        else ", or KFACPreconditioner(model, include_conv=True) for convolutions"
                    )
                    + "."
                )
        fisher = "The diagonal empirical-Fisher preconditioner"
        what = (
            fisher
            if isinstance(precond, EmpiricalFisherDiagonal)
            else "K-FAC"
            if isinstance(precond, KFACPreconditioner)
            else f"`precond` {precond!r} (a callable without needs_outputs=False)"
        )
        if evaluation.outputs is None:
            raise ValueError(
                f"{what} needs per-example information: make the closure return "
                "(loss, outputs), give the callable a `needs_outputs = False` attribute to get "
                "PrecondContext.curvature and .gradient instead, or pass precond=None."
            )
        if isinstance(evaluation.outputs, tuple):
            callable_fix = (
                ", or give the callable a `needs_outputs = False` attribute"
                if what not in (fisher, "K-FAC")
                else ""
            )
            raise ValueError(
                f"{what} needs one outputs tensor with examples along dimension 0, but the "
                "closure returned residual blocks (loss, (r_1, ..., r_K)); pass precond='auto' "
                "(the default: a Nystrom sketch of the Gauss-Newton matrix for residual blocks) "
                f"or precond=None{callable_fix}."
            )
        if product is not None and product.jacobian is not None:
            jac, go = product.jacobian, product.output_grad
        else:
            jac = JacobianProduct(evaluation.outputs, params)
            (go,) = torch.autograd.grad(evaluation.loss, evaluation.outputs, retain_graph=True)
        ctx = PrecondContext(
            jacobian=jac,
            output_grad=go,
            reduction=_reduction_of(evaluation.loss, evaluation.outputs),
            damping=lam,
            shift=shift,
            generator=self._rng(go.device),
            average=self._avg.mean if self._sharded(product) else _same,
            loss_hessian=product.loss_hessian
            if isinstance(product, GGNProduct) and not isinstance(product, FisherProduct)
            else None,
        )
        return _user_precond(precond, ctx)

    def _kfac_in_use(self) -> bool:
        """Whether CG is preconditioned by K-FAC (``'kfac'``, ``'auto'``'s, or an instance)."""
        if self.precond == "auto":
            return isinstance(self._auto_precond, KFACPreconditioner) and not self._auto_kfac_off
        return isinstance(self.precond, KFACPreconditioner)
