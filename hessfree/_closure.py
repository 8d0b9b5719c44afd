"""How :class:`hessfree.HessianFree` calls a closure and reads what it returns.

The closure styles (``(loss, outputs)``, residual blocks, a bare loss, ``torch.optim.LBFGS``'s
``backward()`` inside) are told apart here: ``backward()`` and ``torch.autograd.grad`` are
hooked for the duration of a graph-building call, evaluation-only calls run without a graph
where they can, and the first call of each closure role is checked for what would make the
curvature silently wrong (a reentrant checkpoint, a once-differentiable Function, residual
blocks computed from each other, train-mode BatchNorm or Dropout, a forward that writes module
buffers).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.utils import parametrize as _parametrize

from ._autograd_hooks import AutogradHook
from ._checks import caller_stacklevel
from ._flat import ParamLayout
from ._graph_ops import twice_differentiable_attention, twice_differentiable_weight_norm
from ._model_data import (
    _INPUT_MISMATCH_HINT,
    _RUNNING_STATS,
    _is_stochastic,
    _stochastic_modules_message,
)
from ._module_hooks import BUFFER_REGISTRATION, FORWARD_PRE
from ._rng import StepStream
from ._step_types import _Counter, _Evaluation
from .curvature import (
    _compiled_by_aot,
    _compiled_message,
    _loss_node,
    _once_differentiable,
    _reaches,
    _read_reduction,
    _reentrant_checkpoint,
)
from .preconditioning import _LinearPass

Closure = Callable[[], "Tensor | tuple[Tensor, Tensor | tuple[Tensor, ...]]"]
_RUNNING_STATS_SET = frozenset(_RUNNING_STATS)
# torch's messages for data that does not match the parameters (dtype, device, features)
_MISMATCH = re.compile(
    r"dtype|scalar type|should be the same|same device|two devices|shapes cannot be multiplied"
)


def _create_graph_backward(
    original, tensors, grad_tensors=None, retain_graph=None, create_graph=False, *args, **kwargs
):
    # retain_graph too: an LBFGS closure's explicit `loss.backward(retain_graph=False)` freed
    # the graph the Hessian products differentiate, and the first product failed with
    # torch's "Trying to backward through the graph a second time" ("unseen15"); None, the
    # default, already follows create_graph=True
    note = getattr(_AFTER_BACKWARD, "note", None)
    if note is not None:
        note(before=True)
    try:
        result = original(tensors, grad_tensors, True, True, *args, **kwargs)
    except RuntimeError as err:
        # DistributedDataParallel's gradient buckets take the gradient in place, which a
        # gradient that carries its own graph does not allow: torch's message names neither
        if not (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and "leaf Variable that requires grad is being used in an in-place" in str(err)
        ):
            raise
        raise RuntimeError(
            f"The closure's backward() failed ({err}) while HessianFree made it build the "
            "gradient's graph for Hessian products. A model wrapped in "
            "torch.nn.parallel.DistributedDataParallel does this: its gradient reduction "
            "cannot take such a gradient. Return `(loss, outputs)` from the closure without "
            "calling backward() (DDP's forward then works, Gauss-Newton curvature), or give "
            "HessianFree the unwrapped module's parameters and its process group "
            "(`process_group=`): it averages the gradient and every product over the ranks "
            "itself."
        ) from err
    if note is not None:
        note(before=False)
    return result


#: This thread's :func:`_gradients_as_left` record, called around each hooked ``backward()``.
_AFTER_BACKWARD = threading.local()


@contextlib.contextmanager
def _gradients_as_left(
    params: list[Tensor], earlier: list[tuple[weakref.ref, int] | None] | None
) -> Iterator[tuple[list[object], list[int], list[object]]]:
    """Record the ``.grad`` of ``params`` as each hooked ``backward()`` inside the block left
    them: the tensors, their version counters and the dense ones' norms (one fused
    reduction, read only by :func:`_gradients_changed`); the last ``backward()`` wins
    (micro-batches accumulate). Also the positions whose ``.grad`` the first ``backward()``
    met exactly as the optimizer's previous closure call left it (``earlier``, from
    :func:`_gradients_left`): not cleared, so the new gradient is added to it; and, as
    ``(positions, nonzero)`` with ``nonzero`` a boolean tensor read later, the others it met
    holding a gradient (put there by the user's code or another optimizer)."""
    record: list[object] = []
    stale: list[int] = []
    foreign: list[object] = []
    first = [True]

    def note(before: bool) -> None:
        if before:
            if first[0]:
                earlier_ = earlier or [None] * len(params)
                for i, (p, left) in enumerate(zip(params, earlier_, strict=True)):
                    if p.grad is None:
                        continue
                    if left is not None and p.grad is left[0]() and p.grad._version == left[1]:
                        stale.append(i)
                    else:
                        foreign.append(i)
                if foreign:  # zeros (zero_grad(set_to_none=False)) add nothing: allowed
                    held = [params[i].grad.detach() for i in foreign]
                    held = [g.coalesce().values() if g.is_sparse else g for g in held]
                    nonzero = [g.ne(0).any().to(held[0].device) for g in held]  # any devices
                    foreign[:] = [list(foreign), torch.stack(nonzero)]
            first[0] = False
            return
        grads = [p.grad for p in params]
        dense = [i for i, g in enumerate(grads) if g is not None and not g.is_sparse]
        norms = torch._foreach_norm([grads[i].detach() for i in dense]) if dense else []
        versions = [None if g is None else g._version for g in grads]
        record[:] = [grads, versions, dict(zip(dense, norms, strict=True))]

    outer = getattr(_AFTER_BACKWARD, "note", None)
    _AFTER_BACKWARD.note = note
    try:
        yield record, stale, foreign
    finally:
        _AFTER_BACKWARD.note = outer


def _gradients_left(params: list[Tensor]) -> list[tuple[weakref.ref, int] | None]:
    """Each parameter's ``.grad`` (by weak reference) and its version, as a call left them."""
    return [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params]


def _gradients_changed(params: list[Tensor], record: list[object]) -> list[int]:
    """The positions of ``params`` whose ``.grad`` the closure changed after its last
    ``backward()`` (:func:`_gradients_as_left`).

    A tensor replaced, or written in place (its version counter moved) to other values:
    ``torch.nn.utils.clip_grad_norm_`` multiplies every gradient in place, by exactly 1 when
    the bound is not reached, which is no change (the norms are compared, on the host, only
    where a version moved).
    """
    if not record:
        return []
    grads, versions, norms = record
    changed, moved = [], []
    for i, (p, g, v) in enumerate(zip(params, grads, versions, strict=True)):
        if p.grad is not g:
            changed.append(i)
        elif g is not None and g._version != v:
            (moved if i in norms else changed).append(i)
    if moved:
        now = torch.stack(torch._foreach_norm([params[i].grad.detach() for i in moved]))
        differ = (now != torch.stack([norms[i] for i in moved])).tolist()
        changed += [i for i, d in zip(moved, differ, strict=True) if d]
    return sorted(changed)


def _retaining_grad(original, *args, **kwargs):
    # A closure's own torch.autograd.grad (e.g. LBFGS style, assigning p.grad by hand) would
    # free the loss's graph that the curvature products differentiate: keep it (values alike).
    if len(args) > 3:
        args = (*args[:3], True, *args[4:])
    else:
        kwargs["retain_graph"] = True
    return original(*args, **kwargs)


# Hooks for closure parsing (_autograd_hooks: other threads' calls pass through untouched).
_GRAD_CALLS = AutogradHook("grad", _retaining_grad)
_GRAPH_BACKWARD = AutogradHook("backward", _create_graph_backward)


def _watch_grad() -> contextlib.AbstractContextManager[list[bool]]:
    """Record whether this thread calls ``torch.autograd.grad`` inside the block (and make
    those calls retain their graph)."""
    return _GRAD_CALLS.active()


@contextlib.contextmanager
def _backward_builds_graph() -> Iterator[list[bool]]:
    """Make this thread's ``Tensor.backward()`` use ``create_graph=True`` inside the block."""
    with _GRAPH_BACKWARD.active() as called, warnings.catch_warnings():
        # The parameter <-> .grad reference cycle it warns about is broken right after.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        yield called


def _refuse_reentrant_checkpoint(evaluation: _Evaluation, role: str) -> None:
    """Refuse a graph through ``torch.utils.checkpoint(..., use_reentrant=True)``.

    torch cannot differentiate its backward, and the parameters it wraps are not inputs of its
    graph node: with a ``(loss, outputs)`` closure they got a zero gradient and zero curvature
    and never moved; with an LBFGS-style closure their gradient was right but their Hessian
    rows zero, so CG stepped along them with λ alone (accepted steps, silently off; "unseen12").
    Raised before anything moves.
    """
    outputs = evaluation.outputs
    tensors = [evaluation.loss, evaluation.hidden, *(evaluation.grads or ())]
    tensors += list(outputs) if isinstance(outputs, tuple | list) else [outputs]
    if _reentrant_checkpoint([t for t in tensors if isinstance(t, Tensor)]):
        raise NotImplementedError(
            f"The {role}'s graph runs torch.utils.checkpoint with use_reentrant=True, whose "
            "backward torch cannot differentiate: the parameters inside the checkpointed "
            "function would get no curvature (and, with a (loss, outputs) closure, no gradient), "
            "silently. Pass use_reentrant=False to checkpoint (torch's recommended variant), "
            "which HessianFree differentiates exactly, or drop the checkpoint. The parameters "
            "are unchanged."
        )


def _refuse_cached_parametrizations(role: str) -> None:
    """Refuse a step taken inside ``torch.nn.utils.parametrize.cached()`` that cached a
    parametrized tensor.

    The cache holds the tensor computed at the step's first call (θ₀) until the block ends,
    so every trial evaluation (backtracking, the line search, ρ) ran the model with that
    layer as at θ₀: on an MLP with an orthogonal layer the step reported 0.959 after a step
    whose true loss was 0.903, and training was slower (0.469 against 0.372 after 8 steps,
    "unseen16"). ``cached()`` inside the closure is fine (one forward pass, cleared on exit).
    Two reads of torch's module globals; raised before anything moves.
    """
    cache = getattr(_parametrize, "_cache", None)
    if getattr(_parametrize, "_cache_enabled", 0) and cache:
        raise ValueError(
            f"HessianFree.step ran inside torch.nn.utils.parametrize.cached(), and the {role} "
            f"computed parametrized tensors ({', '.join(sorted({n for _, n in cache}))}), "
            "which the cache would hold at their first value for every trial point the step "
            "evaluates. Call opt.step(closure) outside cached(), or enter cached() inside the "
            "closure (one forward pass). The parameters are unchanged."
        )


def _refuse_dependent_blocks(evaluation: _Evaluation, role: str) -> None:
    """Refuse residual blocks one of which is computed from another (Gauss-Newton only).

    A tuple after the loss (a NamedTuple a model returns, ``(logits, features)``, too) is read
    as residual blocks with :math:`G = J^\\top H_\\ell J` over all of them jointly; autograd's
    derivative of the loss in an ancestor block runs through its descendant, so the shared
    path is counted again: 1.26 max |err| / max |entry| against the Gauss-Newton matrix of the
    logits alone on a 4-5-3 MLP, with accepted steps ("unseen13"). Raised before anything moves.
    """
    blocks = evaluation.outputs
    if not isinstance(blocks, tuple) or len(blocks) < 2:
        return
    nodes = [b.grad_fn for b in blocks]
    for i, node in enumerate(nodes):
        for j, other in enumerate(nodes):
            # a multi-output op (split, unbind) gives sibling blocks one node: no ancestor
            if node is None or other is None or other is node:
                continue
            if any(_reaches(n, {other}, set()) for n, _ in node.next_functions):
                raise ValueError(
                    f"The {role} returned (loss, blocks) with block {i} computed from block "
                    f"{j}: a tuple after the loss (a NamedTuple of model outputs too) is read as "
                    "residual blocks of one Gauss-Newton matrix, and blocks that depend on each "
                    "other count their shared path twice (wrong curvature, silently). Return the "
                    "tensor the loss is computed from, e.g. (loss, out.logits), or blocks none "
                    "of which is computed from another. The parameters are unchanged."
                )


@contextlib.contextmanager
def _stochastic_modules() -> Iterator[list[type]]:
    """Record (by class) the train-mode BatchNorm/Dropout modules run inside the block."""
    found: list[type] = []

    def hook(module: torch.nn.Module, args: object) -> None:
        if _is_stochastic(module) and type(module) not in found:
            found.append(type(module))

    with FORWARD_PRE.installed(hook):
        yield found


@contextlib.contextmanager
def _buffer_writes() -> Iterator[list[str]]:
    """Record the buffers that the modules run inside the block write (in place, or by
    assigning a new tensor), as ``'Class.buffer'``, once the block has ended.

    BatchNorm's are left to :func:`_stochastic_modules`' warning. A forward that writes its
    module's state (``parametrizations.spectral_norm``'s power iteration, a running average
    of the user's) made every closure call, each trial evaluation included, a different
    function: on a spectral-norm MLP 244 closure calls in 20 steps and 3 failed line
    searches, against 41 and none with the iteration run once per step outside the closure
    (``experiments/README.md``, "unseen14"). The trials now leave such buffers as the step's
    call left them (:func:`_running_statistics_kept`), but still update them once for their
    own loss, so the warning stays ("unseen18").
    """
    seen: dict[int, tuple[torch.nn.Module, dict[str, tuple[Tensor, int]]]] = {}
    written: list[str] = []

    def hook(module: torch.nn.Module, args: object) -> None:
        if id(module) in seen or isinstance(module, _NormBase) or not module._buffers:
            return
        buffers = {k: (b, b._version) for k, b in module._buffers.items() if b is not None}
        seen[id(module)] = (module, buffers)

    try:
        with FORWARD_PRE.installed(hook), _rebinding_seen(threading.get_ident()) as assigned:
            yield written
    finally:
        for module, buffers in seen.values():
            for name, (before, version) in buffers.items():
                now = module._buffers.get(name)
                if now is not before or now._version != version:
                    written.append(f"{type(module).__name__}.{name}")
        for module, name, _ in assigned.uncalled(seen):  # a parent's self.child.avg = ...
            if not isinstance(module, _NormBase):
                written.append(f"{type(module).__name__}.{name}")


def _written_names(module: torch.nn.Module, learned: Mapping) -> frozenset[str] | set[str]:
    """The buffers of ``module`` its forward writes, as far as known: a train-mode BatchNorm's
    (or InstanceNorm's) running statistics, and those :func:`_buffers_saved` saw a
    graph-building call write.

    InstanceNorm with ``track_running_stats=True`` is a ``_NormBase`` as BatchNorm is and
    updates its statistics in training mode without reading them, as BatchNorm does: the
    same treatment, without the extra f(θ₀) call other buffer writes need (3 → 2 closure
    calls a step on a Conv1d-InstanceNorm model, "unseen18")."""
    if isinstance(module, _NormBase):
        tracked = module.training and module.track_running_stats
        return _RUNNING_STATS_SET if tracked else frozenset()
    return learned.get(module, frozenset())


@contextlib.contextmanager
def _buffers_saved(
    learned: weakref.WeakKeyDictionary, counter: _Counter, *, everything: bool = False
) -> Iterator[None]:
    """Save, in ``counter.buffers``, the buffers that the block's forward passes in this
    thread are known to write (:func:`_written_names`; with ``everything``, all their
    buffers) as they were before it, and learn, in ``learned``, the others it writes (a moved
    version counter, or a new tensor); ``counter.writes_buffers`` says whether any besides
    BatchNorm's statistics were written.

    The optimizer runs a step's graph-building call at θ inside it (``everything`` at the
    optimizer's first, where nothing is learned yet): that call's writes are kept
    (BatchNorm's statistics move once per step, as after one first-order step), but a step
    that raises, or whose loss at θ is not finite, puts them back (:func:`_restore_buffers`).
    Before, such a step kept the call's update, a retried step added another, and a
    non-finite batch left NaN in ``running_mean`` for good ("unseen18"). One clone of each
    such buffer per step (a BatchNorm layer's 2C + 1 numbers).
    """
    owner = threading.get_ident()
    seen: dict[int, tuple[torch.nn.Module, dict[str, tuple[Tensor, int]]]] = {}

    def hook(module: torch.nn.Module, args: object) -> None:
        if id(module) in seen or not module._buffers or threading.get_ident() != owner:
            return
        known = _written_names(module, learned)
        norm = isinstance(module, _NormBase)
        watched = {}
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            if everything or name in known:
                # BatchNorm's kernel updates its statistics without moving their version
                version = None if norm else buffer._version
                counter.buffers.append((buffer, buffer.detach().clone(), version))
            if not norm:
                watched[name] = (buffer, buffer._version)
        seen[id(module)] = (module, watched)

    assigned = _Assigned()
    try:
        with FORWARD_PRE.installed(hook), _rebinding_seen(owner, assigned):
            yield
    finally:
        # what this call wrote is what the next trial calls keep (a module since put in eval
        # mode drops out)
        for module, watched in seen.values():
            for name, (before, version) in watched.items():
                now = module._buffers.get(name)
                if now is not before or now._version != version:
                    learned.setdefault(module, set()).add(name)
                    counter.writes_buffers = True
                    if now is not before and _rebound(module, name, now, assigned):
                        counter.rebound.append((module, name, before, now))
                elif name in learned.get(module, ()):
                    learned[module].discard(name)
        # a buffer rebound on a module no forward ran (a parent's self.child.avg = ...):
        # learned and put back on a raise as a called module's rebinding is
        for module, name, before in assigned.uncalled(seen):
            learned.setdefault(module, set()).add(name)
            counter.writes_buffers = True
            counter.rebound.append((module, name, before, module._buffers.get(name)))


class _Assigned(dict):
    """:func:`_rebinding_seen`'s record: ``(id(module), name)`` -> the tensor last assigned;
    ``first`` holds, per key, the module and the tensor its buffer held before the block's
    first assignment (``None`` for a buffer registered anew)."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[tuple[int, str], tuple[torch.nn.Module, Tensor | None]] = {}

    def uncalled(
        self, called: Mapping[int, object]
    ) -> Iterator[tuple[torch.nn.Module, str, Tensor]]:
        """``(module, name, before)`` of the rebound buffers of modules not in ``called``
        (a parent's ``self.child.avg = ...`` on a child it does not call), still holding the
        tensor assigned last."""
        for (key, name), (module, before) in self.first.items():
            if key in called or before is None:
                continue
            if _rebound(module, name, module._buffers.get(name), self):
                yield module, name, before


@contextlib.contextmanager
def _rebinding_seen(owner: int, assigned: _Assigned | None = None) -> Iterator[_Assigned]:
    """Record, by ``(id(module), name)``, the tensor last assigned to a module's buffer
    through ``Module.__setattr__`` (``self.avg = 0.9 * self.avg + ...``) or
    ``register_buffer`` by thread ``owner`` inside the block, and the one it replaced first.

    What tells a forward's rebinding from ``torch.func.functional_call``'s: that puts its
    tensors in and the module's back by writing ``_buffers`` directly, without the buffer
    registration hooks, so a buffer it restored was not assigned here. The hook sees every
    module's assignments, also those of a module the forward does not call (a parent's
    ``self.child.avg = ...``), which the forward pre-hooks never see ("leftovers19"). The
    record is ``assigned`` where given."""
    assigned = _Assigned() if assigned is None else assigned

    def hook(module: torch.nn.Module, name: str, tensor: Tensor | None) -> None:
        if tensor is not None and threading.get_ident() == owner:
            key = (id(module), name)
            if key not in assigned.first:  # torch stores the tensor after its hooks
                assigned.first[key] = (module, module._buffers.get(name))
            assigned[key] = tensor

    with BUFFER_REGISTRATION.installed(hook):
        yield assigned


def _rebound(module: torch.nn.Module, name: str, now: Tensor | None, assigned: Mapping) -> bool:
    """Whether ``module``'s buffer ``name`` holds ``now`` because the block's forward assigned
    it (:func:`_rebinding_seen`), rather than ``functional_call`` putting its tensor back."""
    return now is not None and assigned.get((id(module), name)) is now


def _restore_buffers(counter: _Counter) -> None:
    """Write the values :func:`_buffers_saved` saved back into the buffers written since (a
    moved version; BatchNorm's always), in place: the module, its ``state_dict`` and a
    data-parallel wrapper keep the same tensors. A buffer the forward rebound to a new tensor
    (``self.avg = ...``) gets the tensor it held before the call back, where the module still
    holds the call's ("closure19"; before, it kept the raised step's update)."""
    with torch.no_grad():
        for buffer, copy, version in reversed(counter.buffers):
            if version is None or buffer._version != version:
                buffer.copy_(copy)
    for module, name, before, now in reversed(counter.rebound):
        if module._buffers.get(name) is now:
            setattr(module, name, before)


@contextlib.contextmanager
def _running_statistics_kept(learned: Mapping | None = None) -> Iterator[None]:
    """Leave the running statistics of the train-mode BatchNorm modules this thread runs
    inside the block as they were, and the other buffers their forward writes in place
    (``learned``: :func:`_buffers_saved`).

    A forward pre-hook swaps each such module's ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` for clones at its first call in the block (the forward pass
    updates the clones, as :func:`hessfree._model_data._call_model` does for the operators)
    and the originals go back at the end, also on an error. The optimizer runs its trial
    evaluations (backtracking, the line search, ρ, the replayed f(θ₀)) and a
    ``curvature_closure`` inside it, so the statistics move once per step, in the closure's
    call at θ, as after one first-order step. Before, each trial point moved them too:
    ``num_batches_tracked`` rose by 3-5 a step, and one non-finite trial (rejected, the
    parameters kept bit for bit) left NaN in ``running_mean`` for good, so the eval-mode
    model returned NaN ("unseen17"). Other threads' forward passes are left alone.

    The same swap keeps the buffers other forwards write once a graph-building call has
    been seen to write them (``parametrizations.spectral_norm``'s power iteration, a user's
    running average updated in place): each trial call then starts from the buffers of the
    step's call at θ, so the trials are one function of the parameters, as the curvature
    products (one graph) are. Before, each trial advanced them ("unseen14", "unseen18"). A
    forward that rebinds its buffer to a new tensor (``self.avg = ...``) gets the step's
    call's tensor back at the end (:func:`_rebinding_seen`; before, the module kept the last
    trial's, "closure19").
    """
    owner = threading.get_ident()
    kept: dict[int, tuple[torch.nn.Module, list[tuple[str, Tensor, Tensor]]]] = {}
    learned = {} if learned is None else learned

    def hook(module: torch.nn.Module, args: object) -> None:
        if id(module) in kept or threading.get_ident() != owner:
            return
        names = _written_names(module, learned)
        if not names:
            return
        swapped = []
        for name in _RUNNING_STATS if isinstance(module, _NormBase) else sorted(names):
            buffer = getattr(module, name, None)
            if buffer is not None:
                clone = buffer.clone()
                setattr(module, name, clone)
                swapped.append((name, buffer, clone))
        kept[id(module)] = (module, swapped)

    assigned = _Assigned()
    try:
        with FORWARD_PRE.installed(hook), _rebinding_seen(owner, assigned):
            yield
    finally:
        for module, swapped in kept.values():
            for name, buffer, clone in swapped:
                # our clone, or a tensor the forward assigned: torch.func.functional_call puts
                # its own tensors back itself
                now = getattr(module, name)
                if now is clone or _rebound(module, name, now, assigned):
                    setattr(module, name, buffer)
        # a learned buffer rebound on a module the forward did not call (a parent's
        # self.child.avg = ...; the child's pre-hook never ran, so nothing was swapped): its
        # tensor from before the block, which the rebinding replaced and did not write
        for module, name, before in list(assigned.uncalled(kept)):
            if name in learned.get(module, ()):
                setattr(module, name, before)


#: Losses whose gradient in the outputs is bounded whatever the targets (softmax or sigmoid
#: minus a target: cross-entropy, NLL, BCE with logits). ``_first_step_curvature`` skips them:
#: the term that makes H indefinite where G is not, the outputs' gradient times the model's
#: second derivatives, grows with the residuals only for losses like a sum of squares; on the
#: classifiers and the autoencoder measured xᵀHx / xᵀGx was 0.91-1.18 at step 0, and the
#: Hessian product cost their first step 1.4-1.7× its CPU time (ours; experiments/README.md,
#: "first0").
_BOUNDED_GRADIENT_LOSSES = frozenset(
    {"NllLossBackward0", "NllLoss2DBackward0", "BinaryCrossEntropyWithLogitsBackward0"}
)


def _bounded_outer_gradient(loss: Tensor, outputs: Tensor) -> bool:
    """Whether ``loss`` is one of :data:`_BOUNDED_GRADIENT_LOSSES` of ``outputs`` (up to
    constant factors and reshapes; :func:`hessfree.curvature._loss_node`)."""
    peeled = _loss_node(loss, outputs)
    return peeled is not None and type(peeled[0]).__name__ in _BOUNDED_GRADIENT_LOSSES


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
        if (
            isinstance(result, Tensor)
            and result.numel() > 1
            and isinstance(outputs, Tensor)
            and outputs.numel() == 1
        ):
            raise TypeError(
                f"The closure returned a tensor of shape {tuple(result.shape)} first and a "
                "scalar second; the order is (loss, outputs): return the loss first."
            )
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
                raise TypeError(
                    f"The closure's {name} must be a tensor, got {type(t).__name__}"
                    + (
                        "; return the tensor the loss is computed from (e.g. (loss, "
                        "out['logits']) or (loss, out.logits) for a model returning a mapping "
                        "or a dataclass)."
                        if name == "outputs"
                        else "."
                    )
                )
    if not isinstance(result, Tensor) or result.numel() != 1:
        shape = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
        hint = ""
        if isinstance(result, numbers.Real):
            hint = (
                " (a number such as loss.item() only from a closure that calls loss.backward(), "
                "torch.optim.LBFGS style)"
            )
        elif isinstance(result, Tensor) and result.numel() > 1:
            hint = " (a loss per entry? reduce it: .mean(), or the loss's reduction='mean')"
        raise TypeError(
            f"The closure must return a scalar loss tensor (or (loss, outputs)), got {shape}{hint}."
        )
    return (result if result.dim() == 0 else result.reshape(())), outputs, hidden


def _reduction_of(loss: Tensor, outputs: Tensor) -> str:
    """How the loss combines the examples (:func:`~hessfree.curvature._read_reduction`), and
    'mean' (PyTorch losses' default) where the graph does not say.

    A torch loss on the outputs (or their ``log_softmax``), also with class ``weight``,
    ``ignore_index`` or ``pos_weight``, or a hand-written ``.sum()``/``.mean()`` over the
    examples, each times a constant. Requiring a closed-form loss Hessian here once took a
    summed weighted cross-entropy for a mean, and reading the top node alone a hand-written
    ``.sum()`` or ``0.5 * mse_loss(..., reduction='sum')``: their Fisher was N times too large.
    """
    return _read_reduction(loss, outputs) or "mean"


def _graph_kinds(evaluation: _Evaluation, limit: int = 8) -> tuple[str, ...]:
    """The autograd node types at the top of the loss's graph (breadth first, ``limit`` of
    them) and of the outputs': what :meth:`_ClosureCalls._first_call` compares from step to
    step to walk the graph again (:func:`~hessfree.curvature._once_differentiable`) when it
    changed.

    The walk runs at the first call of each closure role (0.04-1.6 % of a step: a 4-5-3 MLP,
    a CURVES-shaped autoencoder, an LSTM over 50 steps); this look, ~4 µs, at every step. A
    loss first compiled after the first step (aot_autograd's ``CompiledFunctionBackward`` in
    place of torch's loss node, also below a constant factor or beside a weight penalty) was
    silently wrong again: its second derivative zero ("unseen19", "compile19"). A region
    compiled deeper in the model after the first step goes unseen here; torch raises there
    (reworded by ``_missing_second_derivative``)."""
    kinds: list[str] = []
    loss = evaluation.loss
    queue = [loss.grad_fn] if isinstance(loss, Tensor) and loss.grad_fn is not None else []
    seen = 0
    while queue and seen < limit:
        node = queue.pop(0)
        seen += 1
        kinds.append(type(node).__name__)
        queue.extend(n for n, _ in node.next_functions if n is not None)
    outputs = evaluation.outputs
    for t in (outputs if isinstance(outputs, tuple | list) else [outputs])[:limit]:
        if isinstance(t, Tensor):
            kinds.append("|" + type(t.grad_fn).__name__)
    return tuple(kinds)


def _autograd_refused(err: RuntimeError) -> bool:
    """Whether ``err`` was raised by autograd's engine (its innermost frame is in
    ``torch.autograd``): a ``backward()`` or ``torch.autograd.grad`` that found no graph,
    as under ``torch.no_grad()``.

    Only such an error means the closure needs autograd. Any error once sent it through a
    second call with gradients on: a transient error of the user's (a data loader's, a shape
    error in a trial call) was swallowed when the repeat succeeded, and every later
    evaluation of the optimizer built a graph ("unseen16").
    """
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and os.path.dirname(os.path.abspath(frames[-1].filename)) == _AUTOGRAD_DIR


_AUTOGRAD_DIR = os.path.dirname(os.path.abspath(torch.autograd.__file__))


class _ClosureCalls:
    """The optimizer's closure calls (a mixin of :class:`hessfree.HessianFree`)."""

    def _call(
        self,
        closure: Closure,
        counter: _Counter,
        *,
        build_graph: bool,
        uses_backward: bool,
        moves_statistics: bool | None = None,
        save_all_buffers: bool = False,
    ) -> _Evaluation:
        """Evaluate ``closure``; with ``build_graph`` capture what curvature products need.

        Only a call with ``moves_statistics`` (by default the graph-building ones; the
        optimizer passes False for a ``curvature_closure``) leaves train-mode BatchNorm's
        running statistics updated, and the buffers other forwards write in place
        (:func:`_running_statistics_kept`); what it writes is saved for a step that raises
        (:func:`_buffers_saved`; every buffer with ``save_all_buffers``).

        Evaluation-only calls run under ``torch.no_grad()`` unless the closure needs autograd
        itself: when it called ``backward()`` (``uses_backward``) or ``torch.autograd.grad`` (seen
        during a graph-building call, e.g. a physics-informed residual differentiating the
        network with respect to its inputs), or when a ``no_grad`` call failed with an autograd
        error (a closure that imported ``grad`` under another name); the call is then repeated
        with gradients enabled and later evaluations keep them.
        """
        counter.calls += 1
        stream = counter.stream
        if stream is not None:
            stream.before_call(trial=not build_graph)
        params = self._params()
        versions = [(p._version, p.data_ptr()) for p in params]
        try:
            # every call, not only graph-building ones: f(θ) and the trial losses from one kernel
            kept = build_graph if moves_statistics is None else moves_statistics
            learned = self._written_buffers
            with (
                twice_differentiable_attention(),
                twice_differentiable_weight_norm(),
                _buffers_saved(learned, counter, everything=save_all_buffers)
                if kept
                else _running_statistics_kept(learned if self._keep_trial_buffers else {}),
            ):
                evaluation = self._call_once(closure, build_graph, uses_backward, stream)
        finally:
            if stream is not None:
                stream.after_call()
        self._check_unmodified(params, versions)
        self._left_by_last_call = _gradients_left(params)
        return evaluation

    def _check_unmodified(self, params: list[Tensor], versions: list[tuple[int, int]]) -> None:
        """Refuse a closure that wrote into a parameter (``p.add_``, ``p.clamp_``, ...).

        HessianFree calls the closure at θ and at trial points θ + t·p and compares the losses;
        a closure that moves the parameters itself makes every comparison wrong and the step
        lands nowhere the quadratic model meant (measured: accepted steps that drifted by the
        closure's own change per call, "unseen8"). A write bumps the tensor's version counter.
        A cuDNN RNN re-homing its weights into one buffer (``flatten_parameters``) bumps it too
        but moves the storage, so only a write into the same memory counts. A write through
        ``p.data`` bypasses the counter and goes unseen.
        """
        for p, (v, ptr) in zip(params, versions, strict=True):
            if p._version == v or p.data_ptr() != ptr:
                continue
            name = self._param_name(p)
            raise ValueError(
                f"The closure modified {name} (shape {tuple(p.shape)}) in place (its version "
                f"counter went {v} -> {p._version}). HessianFree.step calls the closure at the "
                "current parameters and at trial points and needs it to only compute the loss "
                "there; move the update out of the closure (e.g. clamp or project after "
                "opt.step(closure)). A module that renormalizes its weight in its forward "
                "writes too (nn.Embedding(max_norm=...)): drop max_norm and renormalize after "
                "each step (torch.embedding_renorm_ under torch.no_grad()). The parameters keep "
                "the closure's change; the step made none."
            )

    def _param_name(self, p: Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"`param_groups[{gi}]['params'][{pi}]`"
        return "a parameter"

    def _call_once(
        self,
        closure: Closure,
        build_graph: bool,
        uses_backward: bool,
        stream: StepStream | None,
    ) -> _Evaluation:
        if build_graph:
            # precond='kfac' (or 'auto'): the nn.Linear calls of this call, for K-FAC's factors
            self._linear_pass = None
            record = self._records_linears()
            conv = self._kfac_takes_conv()
            linears = _LinearPass(self._params(), conv=conv) if record else None
            params = self._params()
            with (
                torch.enable_grad(),
                _backward_builds_graph() as called,
                _gradients_as_left(params, self._left_by_last_call) as (left, stale, foreign),
                _watch_grad() as used,
                linears.recording() if record else contextlib.nullcontext(),
            ):
                result = closure()
            loss, outputs, hidden = _unpack(self._backward_value(result, bool(called)))
            self._linear_pass = linears
            if used:
                self._closure_uses_autograd = True
            grads = None
            if called:
                changed = _gradients_changed(params, left)
                grads = [p.grad for p in params]
                for p in params:  # break the parameter <-> graph-carrying .grad cycle
                    if p.grad is not None:
                        p.grad = p.grad.detach()
                self._refuse_stale_gradients(params, stale)
                self._refuse_foreign_gradients(params, foreign)
                self._warn_changed_gradients(params, changed)
            return _Evaluation(loss, outputs, grads, hidden)
        if uses_backward or self._closure_uses_autograd:
            with torch.enable_grad():
                loss, _, _ = _unpack(self._backward_value(closure(), uses_backward))
            return _Evaluation(loss.detach(), None, None)
        try:
            with torch.no_grad():
                loss, _, _ = _unpack(closure())
        except RuntimeError as err:
            # e.g. "element 0 of tensors does not require grad": retry with autograd on, but
            # only where autograd's engine refused; any other error is the closure's own
            if not _autograd_refused(err):
                raise
            if stream is not None:  # from the same random numbers
                stream.before_call(trial=True)
            with torch.enable_grad():
                loss, _, _ = _unpack(closure())
            self._closure_uses_autograd = True
        return _Evaluation(loss.detach(), None, None)

    @property
    def _written_buffers(self) -> weakref.WeakKeyDictionary:
        """The buffers, by module, that graph-building calls have been seen to write
        (:func:`_buffers_saved`); not copied with the optimizer (weak references). A copy
        learns them again in its first step's call at θ, before that step's trials, and saves
        every buffer in that call as a new optimizer does (:meth:`_first_call`), so a raise
        there puts them back ("closure19")."""
        return self.__dict__.setdefault("_buffers_written", weakref.WeakKeyDictionary())

    @property
    def _left_by_last_call(self) -> list[tuple[weakref.ref, int] | None] | None:
        """The gradients this optimizer's previous closure call left (:func:`_gradients_left`;
        None before the first, and after a copy or a load)."""
        return self.__dict__.get("_grads_left")

    @_left_by_last_call.setter
    def _left_by_last_call(self, left: list[tuple[weakref.ref, int] | None]) -> None:
        self.__dict__["_grads_left"] = left

    def _refuse_stale_gradients(self, params: list[Tensor], stale: list[int]) -> None:
        """Refuse a closure whose ``backward()`` added to the gradients the optimizer's
        previous closure call left in ``.grad``, uncleared.

        HessianFree calls the closure at θ and at trial points, and ``max_iter`` steps per
        :meth:`step`; a closure without ``zero_grad()`` (or one called only before
        ``opt.step``, with ``max_iter`` > 1) then added the trial points' gradients to the
        next step's: ``max_iter=3`` with ``zero_grad`` outside the closure ended 3 calls at
        loss 0.884 against 0.581 ("unseen17"). ``torch.optim.LBFGS`` requires the closure to
        clear them too. Raised before anything moves.
        """
        if not stale:
            return
        names = ", ".join(self._param_name(params[i]) for i in stale[:3])
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        raise ValueError(
            f"The closure's backward() added to the gradient of {names}{more} that "
            "HessianFree's previous closure call left in .grad: HessianFree calls the closure "
            "at trial points too, and max_iter steps per step() call, so without clearing "
            "the gradients each step's gradient would include other points'. Call "
            "opt.zero_grad() at the top of the closure, as torch.optim.LBFGS requires. This "
            "step changed nothing."
        )

    def _refuse_foreign_gradients(self, params: list[Tensor], foreign: list[object]) -> None:
        """Refuse a closure whose ``backward()`` added to gradients that something other than
        this optimizer's previous closure call put in ``.grad`` (:func:`_gradients_as_left`):
        a regularizer's ``backward()`` before ``opt.step``, a ``backward()`` for logging, or
        another optimizer's last step, not cleared.

        ``torch.optim.LBFGS`` sums them into its step (its first direction is the summed
        gradient). HessianFree would too, but its curvature comes from the closure's graph
        and its trial losses (ρ, backtracking, the line search) from the closure alone, so
        the step would be judged on another function than the one it models ("unseen18":
        unseen17's check saw only what HessianFree's own calls left). Zeros are allowed
        (``zero_grad(set_to_none=False)``). Raised before anything moves; one host read, and
        only where the first ``backward()`` met a gradient.
        """
        if not foreign:
            return
        positions, nonzero = foreign
        held = [i for i, n in zip(positions, nonzero.tolist(), strict=True) if n]
        if not held:
            return
        names = ", ".join(self._param_name(params[i]) for i in held[:3])
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise ValueError(
            f"The closure's backward() added to a gradient already in .grad of {names}{more}, "
            "not left by HessianFree's previous closure call (e.g. a regularizer's backward() "
            "before opt.step, a backward() for logging, or another optimizer's last step). "
            "torch.optim.LBFGS would sum it into its step; HessianFree's curvature and its "
            "trial losses (rho, backtracking, line search) come from the closure alone, so the "
            "step would be judged on another function. Add such a term to the loss inside "
            "the closure (its gradient and curvature then count exactly), or call "
            "opt.zero_grad() at the top of the closure. This step changed nothing."
        )

    def _warn_changed_gradients(self, params: list[Tensor], changed: list[int]) -> None:
        r"""Once per optimizer: the closure changed gradients after its ``backward()``.

        The Hessian products differentiate the gradient's graph, which an in-place change
        under ``no_grad`` (``clip_grad_norm_``, ``clip_grad_value_``, a ``GradScaler``'s
        ``unscale_``) bypasses: the step solves :math:`(H + \lambda I)p = -g'` with the
        changed :math:`g'` and the unchanged :math:`H`, and ρ compares the loss against that
        mismatched model. A clipped gradient shortens the Newton step in proportion and
        judges it by the wrong model (a 5-16-2 regression MLP clipped at norm 1 ended 30 steps
        at 2.8x the unclipped run's loss, "unseen17"); torch cannot tell it from
        ``.grad`` alone ("unseen16"), so the gradient's tensors and norms are recorded after
        each ``backward()``.
        """
        if not changed or getattr(self, "_warned_gradients", False):
            return
        self._warned_gradients = True
        names = ", ".join(self._param_name(params[i]) for i in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        warnings.warn(
            f"HessianFree: the closure changed the gradient of {names}{more} after its "
            "backward() (e.g. torch.nn.utils.clip_grad_norm_ or clip_grad_value_, or a "
            "GradScaler's unscale_). The Hessian products come from the gradient's graph, "
            "which the change bypasses, so the step pairs the changed gradient with the "
            "unchanged curvature and misjudges its own reduction (a clipped gradient shortens "
            "the Newton step). HessianFree bounds its steps itself (damping, trust radius, "
            "line search): drop the clipping from the closure; to scale the gradient, scale "
            "the loss (gradient and curvature then change alike).",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )

    def _backward_value(self, result: object, called_backward: bool) -> object:
        """A closure that called ``backward()`` may return ``loss.item()``, as
        ``torch.optim.LBFGS`` takes ``float(closure())``: the value as a 0-d tensor of the
        parameters' dtype (the gradient and the Hessian come from ``.grad``)."""
        if called_backward and isinstance(result, numbers.Real) and not isinstance(result, bool):
            p = self._params()[0]
            return torch.tensor(float(result), dtype=p.dtype, device=p.device)
        return result

    def _objective_at(
        self,
        closure: Closure,
        counter: _Counter,
        theta0: list[Tensor],
        d: list[Tensor],
        t: float,
        uses_backward: bool,
        l2: float | Tensor,
    ) -> float:
        """:math:`f(\\theta_0 + t d)` including the L2 term; ``inf`` if not finite."""
        params = self._params()
        with torch.no_grad():
            torch._foreach_copy_(params, theta0)
            torch._foreach_add_(params, d, alpha=t)
        loss = self._call(closure, counter, build_graph=False, uses_backward=uses_backward).loss
        f = self._avg.mean_scalar(float(loss), loss) + self._l2(params, l2)
        return f if math.isfinite(f) else math.inf

    def _l2(self, params: list[Tensor], l2: float | Tensor) -> float:
        if isinstance(l2, float):
            if l2 == 0.0:
                return 0.0
            return 0.5 * l2 * float(sum(p.detach().square().sum() for p in params))
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        return 0.5 * float((l2 * flat.square()).sum())

    def _warn_unread_reduction(self, loss: Tensor, outputs: Tensor) -> None:
        """Once per optimizer: curvature='fisher' took a loss it cannot read for a mean.

        A ``torch.compile``'d loss (every backend but ``'eager'``) is one aot_autograd node
        whose graph holds no reference to the loss or its ``reduction`` (a compiled function
        takes it as an argument, gone once called), so the warning names the compile and the
        ways to keep the loss's own node ("compile19"; before, it read as for a hand-written
        loss, and a compiled ``reduction='sum'`` took an N times too large Fisher)."""
        if self._reduction_warned:
            return
        self._reduction_warned = True
        peeled = _loss_node(loss, outputs)  # below constant factors and reshapes
        node = loss.grad_fn if peeled is None else peeled[0]
        if _compiled_by_aot(getattr(node, "_forward_cls", None)):
            warnings.warn(
                "curvature='fisher' cannot tell whether the loss sums or averages the "
                "per-example losses: the loss is torch.compile'd (aot_autograd's "
                "CompiledFunction, which hides torch's loss node and its `reduction`), so it "
                "takes it for a mean over dimension 0 of the outputs: F = (1/N) sum_i g_i g_i^T, "
                "N times too large for reduction='sum'. Call the uncompiled loss (a compiled "
                "nn.Module keeps it as `._orig_mod`, a compiled function as "
                "`._torchdynamo_orig_callable`), compile it with backend='eager' (torch's own "
                "loss node, read), or pass curvature=lambda loss, outputs, params: "
                "FisherProduct(loss, outputs, params, reduction='sum').matvec.",
                stacklevel=caller_stacklevel(),
            )
            return
        warnings.warn(
            "curvature='fisher' cannot tell from the loss's autograd graph whether it sums or "
            "averages the per-example losses (it reads torch losses' `reduction`, and a loss "
            "that ends in .sum() or .mean() over the examples, times a constant), so it takes "
            "it for a mean over dimension 0 of the outputs: F = (1/N) sum_i g_i g_i^T. If the "
            "loss is a sum over the examples, that Fisher is N times too large; pass "
            "curvature=lambda loss, outputs, params: FisherProduct(loss, outputs, params, "
            "reduction='sum').matvec, or end the loss in .sum().",
            stacklevel=caller_stacklevel(),
        )

    def _refuse_once_differentiable(self, evaluation: _Evaluation, role: str) -> None:
        """Refuse a graph through a ``torch.autograd.Function`` whose backward is
        ``@once_differentiable`` where a curvature product differentiates it again: anywhere
        for Gauss-Newton and the Hessian, in the model (not the loss) for the empirical Fisher,
        which needs only the loss's first derivative. Its second derivative came out zero
        without an error (:func:`~hessfree.curvature._once_differentiable`). Raised before
        anything moves."""
        outputs = evaluation.outputs
        tensors = [evaluation.hidden, *(evaluation.grads or ())]
        tensors += list(outputs) if isinstance(outputs, tuple | list) else [outputs]
        fisher = self.settings.curvature in ("fisher", "fisher_mc") and outputs is not None
        if not fisher:
            tensors.append(evaluation.loss)
        found = _once_differentiable([t for t in tensors if isinstance(t, Tensor)])
        if found is None:
            return
        where = "the model (before the outputs)" if fisher else "the loss or the model"
        if _compiled_by_aot(found):  # torch.compile ("unseen19")
            raise NotImplementedError(
                _compiled_message(f"The {role}'s graph, in {where},")
                + (
                    "; if only the loss is compiled, curvature='fisher' with a (loss, outputs) "
                    "closure needs no second derivative there"
                    if not fisher
                    else ""
                )
                + ". The parameters are unchanged."
            )
        raise NotImplementedError(
            f"The {role}'s graph runs {found.__module__}.{found.__qualname__}, a "
            "torch.autograd.Function whose backward is marked @once_differentiable, in "
            f"{where}: curvature products differentiate its backward once more and torch "
            "silently gives zero there, so the steps would be wrong. Write its backward with "
            "differentiable torch operations and drop @once_differentiable"
            + (
                "; if it is in the loss only, curvature='fisher' with a (loss, outputs) closure "
                "needs no second derivative there"
                if not fisher
                else ""
            )
            + ". The parameters are unchanged."
        )

    def _first_call(
        self, closure: Closure, role: str, counter: _Counter, layout: ParamLayout
    ) -> _Evaluation:
        """A step's graph-building call of ``closure``, with two checks around it.

        Data whose dtype (or device, or features) does not match the parameters gets the
        operators' hint instead of torch's bare message. The first call of each closure role
        over the optimizer's life runs with a global forward pre-hook that records train-mode
        BatchNorm and Dropout modules (their autograd nodes cannot tell: CPU dropout is a plain
        ``MulBackward0`` and InstanceNorm uses the batch-norm kernel); one warning in all. It also
        records the module buffers the forward writes (:func:`_buffer_writes`); one warning.
        Dropout alone is no reason to warn under ``replay_rng`` (one mask for the model calls,
        one for the trials). That first call's graph is also searched for a reentrant
        ``torch.utils.checkpoint``, which is refused (a walk of the whole graph, ~6 % of a
        gradient's time on an LSTM, so not at every step: a model that starts checkpointing
        later goes unseen).
        """
        watch = role not in self._watched
        # a deep copy (or unpickled optimizer) has forgotten which buffers the forward writes
        # (weak references) but not that its closure was watched: save them all once more
        forgot = "_buffers_written" not in self.__dict__
        try:
            with (
                _stochastic_modules() if watch else contextlib.nullcontext([]) as found,
                _buffer_writes() if watch else contextlib.nullcontext([]) as written,
            ):
                evaluation = self._call(
                    closure,
                    counter,
                    build_graph=True,
                    uses_backward=False,
                    moves_statistics=role == "closure",
                    save_all_buffers=watch or forgot,
                )
        except RuntimeError as err:
            if _autograd_refused(err) and "does not require grad" in str(err):
                # an LBFGS-style closure's own backward() on a loss without a graph: torch's
                # bare "element 0 of tensors does not require grad" ("unseen16")
                raise ValueError(
                    f"The {role}'s backward() found no autograd graph from its loss to the "
                    f"parameters (torch: {err}): the loss was computed without gradients, e.g. "
                    "under torch.no_grad() inside the closure, or from detached tensors or "
                    "parameters with requires_grad=False. Compute the loss with gradients "
                    "enabled (HessianFree runs evaluation-only calls without a graph itself). "
                    "The parameters are unchanged."
                ) from err
            if isinstance(err, torch.OutOfMemoryError) or not _MISMATCH.search(str(err)):
                raise
            raise ValueError(
                f"The {role} passed to HessianFree.step failed: {err}. {_INPUT_MISMATCH_HINT} "
                f"The parameters are {layout.dtype} on {layout.device}."
            ) from err
        _refuse_cached_parametrizations(role)
        if watch:
            _refuse_reentrant_checkpoint(evaluation, role)  # and looked for again next time
            self._refuse_once_differentiable(evaluation, role)
            if self.settings.curvature in ("auto", "ggn"):  # the blocks' Gauss-Newton matrix
                _refuse_dependent_blocks(evaluation, role)
            self._watched.add(role)
            self.__dict__.setdefault("_graph_kinds", {})[role] = _graph_kinds(evaluation)
        else:
            kinds = _graph_kinds(evaluation)
            if kinds != self.__dict__.setdefault("_graph_kinds", {}).get(role, kinds):
                # the top of the graph changed since the walk (a loss compiled after the first
                # step): walk again, once per change ("compile19")
                self._refuse_once_differentiable(evaluation, role)
                self._graph_kinds[role] = kinds
        if watch:
            if self.settings.replay_rng:  # dropout draws one mask per step: one function
                found = [kind for kind in found if issubclass(kind, _BatchNorm)]
            if found and not self._warned_stochastic:
                self._warned_stochastic = True
                names = [kind.__name__ for kind in found]
                running = any(issubclass(kind, _BatchNorm) for kind in found)
                dropout = not all(issubclass(kind, _BatchNorm) for kind in found)
                warnings.warn(
                    f"HessianFree: the {role} ran {_stochastic_modules_message(names)}"
                    + (
                        " (its running statistics move once per step, in the closure's call "
                        "at the current parameters; trial evaluations leave them as they were)"
                        if running
                        else ""
                    )
                    + ". Call model.eval() for the curvature (before step(), or inside a "
                    "`curvature_closure`)"
                    + (
                        ", or pass replay_rng=True (one dropout mask for the model, one for the "
                        "trials)."
                        if dropout
                        else "."
                    ),
                    UserWarning,
                    stacklevel=caller_stacklevel(),
                )
            if written and not self._warned_buffers:
                self._warned_buffers = True
                warnings.warn(
                    f"HessianFree: the {role}'s forward wrote the buffer(s) "
                    f"{', '.join(dict.fromkeys(written))}. They move once per step, in the "
                    "call at the current parameters; each trial evaluation (backtracking, the "
                    "line search, rho) starts from them and leaves them as they were, but "
                    "updates them once more for its own loss, so the "
                    "trials are not the function the step's gradient and curvature come from, "
                    "and each step makes one extra closure call to measure f(theta) as the "
                    "trials see it. Updating them once per step outside the closure is exact "
                    "and cheaper: model.train(); with torch.no_grad(): model(x); then "
                    "model.eval() before step() "
                    "(torch.nn.utils.parametrizations.spectral_norm's power iteration runs in "
                    "training mode only).",
                    UserWarning,
                    stacklevel=caller_stacklevel(),
                )
        return evaluation
