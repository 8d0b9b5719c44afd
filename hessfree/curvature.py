r"""Exact curvature-vector products at a fixed point :math:`\theta`.

Notation: :math:`\theta \in \mathbb{R}^n` the parameters (a list of tensors, flattened in order),
:math:`f(\theta) = \ell(o(\theta))` a scalar loss of the model outputs :math:`o`,
:math:`g = \nabla f`, :math:`H = \nabla^2 f` the Hessian, :math:`J = \partial o / \partial\theta`
the output Jacobian, :math:`H_\ell = \partial^2 \ell / \partial o^2` the loss Hessian,
:math:`G = J^\top H_\ell J` the generalized Gauss-Newton matrix (Schraudolph 2002) and
:math:`F = \tfrac1N \sum_i g_i g_i^\top` the empirical Fisher (:math:`g_i` the gradient of
example :math:`i`'s loss).

How the products are computed, all with PyTorch autograd and nothing formed:

* **Reverse mode** (backprop) gives vector-Jacobian products :math:`u \mapsto J^\top u`.
* **Hessian** (Pearlmutter 1994): :math:`Hv = \nabla_\theta \langle g(\theta), v\rangle`. The
  gradient is built once with ``create_graph=True``; every product is one more backward pass
  through that graph, never a new forward pass.
* **Jacobian** :math:`Jv` by the double-backward "R-op" trick: :math:`J^\top u` is linear in
  :math:`u`, so :math:`Jv = \nabla_u \langle J^\top u, v\rangle`. For the Gauss-Newton product
  the :math:`u` is the loss gradient :math:`\partial\ell/\partial o` itself, so the graph built
  for the gradient serves every :math:`Jv` too. That graph keeps only what the R-op reads (the
  forward activations and weights, not the cotangents autograd would save alongside them: about
  twice the forward pass's activations less; see ``_rop_setup``).
* **Gauss-Newton** :math:`Gv = J^\top (H_\ell (Jv))`, with :math:`H_\ell` in closed form for
  MSE, softmax cross-entropy and BCE-with-logits (recognised from the loss's autograd node, so
  no double backward through ``log_softmax``) and a double backward through the loss alone for
  anything else; for a loss not convex in the outputs and separable over the examples the
  optimizer takes :math:`|H_\ell|` per example's block, so its :math:`G` stays semidefinite
  (``GGNProduct(..., loss_hessian='absolute')``, ``_absolute_blocks``).
* **Empirical Fisher** :math:`Fv = s\,J^\top (\hat g_i\,\hat g_i^\top (Jv)_i)` where
  :math:`\hat g_i = \partial f/\partial o_i` and :math:`s = N` for a mean over the ``N``
  examples along dimension 0 of the outputs (``1`` for a sum): no per-example gradient is ever
  materialised.
* **Monte-Carlo Fisher** :math:`\hat F v = J^\top \hat H_\ell J v`, a Gauss-Newton product
  whose :math:`H_\ell` is replaced by :math:`\tfrac{c}{M}\sum_m s_m s_m^\top` (per example),
  :math:`s_m` the loss's output gradient at labels drawn once from the model's predictive
  distribution: :math:`\mathbb E[\hat F] = G` for cross-entropy, MSE and BCE-with-logits.

Every product object exposes ``__call__(v)`` (validates ``v``'s shape, dtype and device from
its metadata, never reading its values, so a call makes no host-device synchronisation; a NaN
or Inf in ``v`` gives a non-finite product, which :func:`hessfree.cg` reports as
``NON_FINITE``) and ``matvec(v)`` (no checks, for solver loops). Vectors are flat 1-D tensors
in parameter order.

**Unused parameters.** As ``torch.autograd.grad(..., allow_unused=True)``: a parameter the loss
(or the outputs) does not depend on has exact zero rows and columns in every matrix and a zero
gradient, which is the true curvature. A loss that depends on *none* of ``params`` is refused
with a ``ValueError`` (every product would be silently zero; the cause is a wrong ``params``).

References:
    Martens & Sutskever (2011), Learning recurrent neural networks with Hessian-free
    optimization, ICML, §3.3 (structural damping).
    Pearlmutter (1994), Fast exact multiplication by the Hessian, Neural Computation.
    Schraudolph (2002), Fast curvature matrix-vector products for second-order gradient descent.
    Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.2.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor
from torch.overrides import has_torch_function

from ._checks import check_int, check_reaches_params, check_scalar_loss, check_vector
from ._flat import ParamLayout
from ._graph_ops import (
    batching_breaks,
    fused_weight_norm_in,
    twice_differentiable_weight_norm,
)
from ._model_data import _check_no_shared_memory
from ._types import MatVec

__all__ = [
    "CurvatureProduct",
    "HessianProduct",
    "GGNProduct",
    "FisherProduct",
    "MCFisherProduct",
    "StructurallyDampedGGN",
    "JacobianProduct",
    "hvp",
    "loss_hessian_product",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
_engine_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)
#: ``_grad``'s direct call of autograd's engine (False: ``torch.autograd.grad``, for comparison).
_FAST_GRAD = _engine_run_backward is not None


def _grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    *,
    create_graph: bool = False,
    batched: bool = False,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` keeping the graph and allowing unused inputs.

    Every caller builds ``grad_outputs`` shaped like ``outputs`` (views of a checked flat
    vector), so the unbatched call goes to autograd's engine directly, past
    ``torch.autograd.grad``'s per-call validation of those shapes: on a small model's Hessian
    product that validation was ~10 % of the step (experiments/README.md, "lead, stop 43").
    Tensor subclasses that override torch functions take the public path.
    """
    try:
        outputs = tuple(outputs)
        if (
            _FAST_GRAD
            and not batched
            and not has_torch_function(
                (*inputs, *grad_outputs, *(o for o in outputs if isinstance(o, Tensor)))
            )
        ):
            return _engine_run_backward(
                outputs,
                tuple(grad_outputs),
                True,  # retain_graph
                create_graph,
                tuple(inputs),
                True,  # allow_unused
                accumulate_grad=False,
            )
        return torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=grad_outputs,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
    except RuntimeError as err:  # NotImplementedError included (a subclass)
        clearer = _missing_second_derivative(err)
        if clearer is None:
            raise
        raise clearer from err


# torch words it "derivative for aten::<op>_backward is not implemented" (RuntimeError) or
# "the derivative for '<op>_backward' is not implemented." (NotImplementedError)
_NO_DERIVATIVE = re.compile(r"derivative for '?((?:aten::)?\w+?)(_backward)?'? is not implemented")

# torch words it "torch.compile with aot_autograd does not currently support double backward"
_COMPILED = re.compile(r"torch\.compile\b.*\bdouble backward")

#: Ops torch differentiates only once, with the layer a user can write instead.
_TWICE_DIFFERENTIABLE_INSTEAD = {
    "_embedding_bag": (
        " For nn.EmbeddingBag (F.embedding_bag): use nn.Embedding and reduce over each bag "
        "(e.g. emb(x).mean(1), or a sum weighted by a mask for ragged bags)."
    ),
    # torch's default compute mode takes the matmul path only above 25 rows on either side
    "_cdist": (
        " For torch.cdist (p=2): pass compute_mode='use_mm_for_euclid_dist', whose backward "
        "torch differentiates twice (the default uses it only above 25 rows)."
    ),
    "_pdist": (
        " For F.pdist: use torch.cdist(x, x, compute_mode='use_mm_for_euclid_dist') and its "
        "entries above the diagonal."
    ),
}


def _missing_second_derivative(
    err: RuntimeError | NotImplementedError,
) -> NotImplementedError | None:
    """A worded error for torch's "derivative for aten::<op>_backward is not implemented"
    (and for torch.compile's "does not currently support double backward").

    Curvature products differentiate a gradient once more; an op whose backward torch cannot
    differentiate (``F.ctc_loss``'s ``aten::_ctc_loss_backward``) stops them with torch's
    one-line message, which names neither the op the user wrote nor a way out. The empirical
    Fisher needs only first derivatives of the loss in the outputs, so it works when the op is
    in the loss (measured on CTC, ``experiments/README.md``, "unseen8").
    """
    if _COMPILED.search(str(err)):
        return NotImplementedError(
            "A curvature product differentiates the model's backward once more, and part of "
            "the closure (or of an operator's model or loss) runs under torch.compile, whose "
            "compiled graphs torch cannot differentiate twice (every curvature needs it: "
            "Gauss-Newton, Hessian and the Fisher's Jacobian products alike). Call the "
            "uncompiled module instead (a compiled nn.Module keeps it as `._orig_mod`), or "
            "compile with backend='eager'. The parameters are unchanged. "
            f"(torch: {err})"
        )
    match = _NO_DERIVATIVE.search(str(err))
    if match is None:
        return None
    op, backward = match.group(1), match.group(1) + (match.group(2) or "")
    return NotImplementedError(
        f"A curvature product needs the derivative of {backward} (the backward of {op}, an "
        "op in the model or the loss), which torch does not implement, so second derivatives "
        f"cannot pass through {op}. If it is in the loss (after the model outputs), use the "
        "empirical Fisher, which needs only the loss's first derivative: "
        "HessianFree(..., curvature='fisher') with a closure that returns (loss, outputs), or "
        "FisherLinearOperator. Otherwise write the op with operations torch can differentiate "
        f"twice.{_TWICE_DIFFERENTIABLE_INSTEAD.get(op.removeprefix('aten::'), '')} "
        f"(torch: {err})"
    )


def _batched_cat(layout: ParamLayout, parts: Sequence[Tensor | None], k: int) -> Tensor:
    """Concatenate per-parameter results with a leading batch dim ``k`` into ``(k, n)``."""
    cols = [
        torch.zeros(k, n, dtype=layout.dtype, device=layout.device)
        if t is None
        else t.reshape(k, -1)
        for t, n in zip(parts, layout.numels, strict=True)
    ]
    return torch.cat(cols, dim=1)


def _batched_split(layout: ParamLayout, V: Tensor) -> list[Tensor]:
    """Views of a ``(k, n)`` matrix shaped ``(k, *param.shape)``."""
    k = V.shape[0]
    return [
        c.view(k, *s) for c, s in zip(V.split(layout.numels, dim=1), layout.shapes, strict=True)
    ]


def _reaches(root: torch.autograd.graph.Node | None, targets: set, stop: set) -> bool:
    """Whether the autograd graph from ``root`` reaches a node in ``targets`` avoiding ``stop``."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        if node in targets:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def _rop_setup(
    outputs: Sequence[Tensor], params: Sequence[Tensor], us: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    r""":math:`J^\top u = \sum_k J_k^\top u_k` with a graph that serves only :math:`Jv`.

    The R-op differentiates this graph with respect to the ``u_k`` alone. The graph is linear in
    them, so a node's derivative with respect to its ``u``-dependent input needs only its other,
    ``u``-free inputs (forward activations, weights); yet autograd saves both, because the
    activations and weights require gradients: one saved cotangent per layer and operation, about
    twice the forward graph's activations. Here saved-tensor hooks keep every ``u``-free tensor
    and replace each ``u``-dependent one by a NaN placeholder of its shape (no storage), so those
    cotangents are freed when this call returns. Products are bit-for-bit those of the full
    graph; a backward formula that did read a placeholder would give a NaN product, which CG
    reports as ``NON_FINITE``, never a silently wrong one. Cotangents saved while the backward of
    a convolution, ``matrix_exp`` or ``logcumsumexp`` runs are kept (see
    ``_KEEP_COTANGENT_NODES``). Not for higher derivatives.
    """
    targets = set()  # the autograd edges (node, output number) of the u_k
    for u in us:
        edge = torch.autograd.graph.get_gradient_edge(u)
        targets.add((edge.node, edge.output_nr))
    memo: dict = {}  # node -> whether its inputs reach a u_k

    def reaches(root: torch.autograd.graph.Node) -> bool:
        stack: list = [(root, None)]  # (node, its next_functions once expanded)
        while stack:
            n, nxt = stack.pop()
            if n in memo:
                continue
            if nxt is None:  # first visit: the inputs first, then n again
                nxt = n.next_functions
                stack.append((n, nxt))
                stack.extend((m, None) for m, _ in nxt if m is not None and m not in memo)
            else:
                memo[n] = any(e in targets or (e[0] is not None and memo[e[0]]) for e in nxt)
        return memo[root]

    placeholders: dict = {}

    def pack(t: Tensor) -> Tensor:
        if not t.requires_grad:
            return t
        node = t.grad_fn
        if node is None:  # a leaf: a parameter, or a u_k itself
            edge = torch.autograd.graph.get_gradient_edge(t)
            node, nr = edge.node, edge.output_nr
        else:
            nr = t.output_nr
        if (node, nr) not in targets:
            dep = memo.get(node)
            if not (reaches(node) if dep is None else dep):
                return t
        if _keeps_cotangent(_current_node()):
            return t
        key = (t.shape, t.dtype, t.device)
        if key not in placeholders:
            nan = torch.full((), math.nan, dtype=t.dtype, device=t.device)
            placeholders[key] = nan.expand(t.shape)
        return placeholders[key]

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _identity):
            return _grad(outputs, params, us, create_graph=True)
    finally:
        # memo's keys are Python handles of graph nodes, and the graphs built here keep the hooks'
        # closure (so memo) alive: a reference cycle through C++ that gc cannot see, which kept
        # every step's graphs (~6 MB a step on pinn.py's Poisson problem) until exit.
        memo.clear()


def _identity(t: Tensor) -> Tensor:
    return t


# The first-order backward nodes whose own backward reads the cotangent even where the R-op does
# not need it: convolution's double backward makes a placeholder contiguous (a full-size NaN
# copy, and time) in every product, so there the cotangent is kept as autograd would keep it.
# Backward formulas nonlinear in the cotangent as computed (though linear in value), whose
# double backward therefore reads it: a placeholder made every product NaN. matrix_exp's is the
# exponential of a block matrix holding the cotangent (parametrizations.orthogonal);
# logcumsumexp's takes the log of its positive and negative parts. The 30 operations checked
# are in experiments/README.md, "unseen4".
_KEEP_COTANGENT_NODES = (
    "Convolution",
    "CudnnConvolution",
    "MkldnnConvolution",
    "SlowConv",
    "LinalgMatrixExp",
    "Logcumsumexp",
)
_current_node = getattr(torch._C, "_current_autograd_node", lambda: None)


def _keeps_cotangent(node: object) -> bool:
    return node is not None and type(node).__name__.startswith(_KEEP_COTANGENT_NODES)


def _accumulate_nodes(params: Sequence[Tensor]) -> set:
    """The ``AccumulateGrad`` (or producing) nodes through which a graph reaches ``params``."""
    nodes = set()
    # inference mode would give the view below no grad_fn (an AttributeError on None)
    leave = torch.inference_mode(False) if torch.is_inference_mode_enabled() else nullcontext()
    with torch.enable_grad(), leave:
        for p in params:
            if p.grad_fn is not None:
                nodes.add(p.grad_fn)
            else:
                # The leaf's AccumulateGrad node, as it appears in graphs that use the leaf.
                nodes.add(p.view_as(p).grad_fn.next_functions[0][0])
    return nodes


def _depends_on(tensors: Sequence[Tensor], params: Sequence[Tensor]) -> bool:
    """Whether some tensor's autograd graph reaches a parameter (a graph walk, no backward)."""
    targets = _accumulate_nodes(params)
    return any(
        _reaches(torch.autograd.graph.get_gradient_edge(t).node, targets, set())
        for t in tensors
        if t.requires_grad
    )


def _reentrant_checkpoint(tensors: Sequence[Tensor | None]) -> bool:
    """Whether some tensor's autograd graph runs ``torch.utils.checkpoint(...,
    use_reentrant=True)`` (a graph walk, no backward).

    Its backward recomputes the wrapped function and calls ``torch.autograd.backward`` on it
    without ``create_graph``, and the parameters used inside are no inputs of its graph node:
    ``torch.autograd.grad`` does not reach them (a zero gradient) and a backward with
    ``create_graph=True`` leaves their ``.grad`` without a graph, so every curvature product
    has silently zero rows for them (measured in experiments/README.md, "unseen12").
    """
    reentrant = getattr(torch.utils.checkpoint, "CheckpointFunction", None)
    if reentrant is None:  # a torch without it
        return False
    seen, stack = set(), [t.grad_fn for t in tensors if t is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if getattr(node, "_forward_cls", None) is reentrant:
            return True
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return False


#: The code object of every ``@once_differentiable`` backward (torch wraps each in one closure
#: of this code; ``functools.wraps`` copies the name, not the code).
_ONCE_DIFFERENTIABLE_CODE = getattr(
    torch.autograd.function.once_differentiable(lambda ctx: None), "__code__", None
)


def _compiled_by_aot(cls: object) -> bool:
    """Whether ``cls`` is the ``torch.autograd.Function`` that ``torch.compile``'s
    aot_autograd wraps a compiled region in (every backend but ``'eager'``: ``'inductor'``,
    the default, and ``'aot_eager'``).

    Its backward runs the compiled backward graph, which torch cannot differentiate again:
    torch raises ("does not currently support double backward") where the second derivative
    passes through an input the region saved, and gives zero without an error where the
    region saved only its own intermediates. A compiled ``F.cross_entropy`` is the second
    kind: the Hessian operator came out with relative error 1.0 (the Jᵀ H_ℓ J part missing)
    and three LBFGS-style steps moved the parameters 1.6 off the uncompiled run's
    (experiments/README.md, "unseen19").
    """
    module = getattr(cls, "__module__", None) or ""
    return "aot_autograd" in module and getattr(cls, "__name__", "") == "CompiledFunction"


def _compiled_message(where: str) -> str:
    """The shared wording for a graph through a compiled region (:func:`_compiled_by_aot`)."""
    return (
        f"{where} runs a torch.compile'd region (aot_autograd's CompiledFunction), whose "
        "compiled backward torch cannot differentiate again: curvature products differentiate "
        "it once more, and torch either raises there or silently gives zero (a compiled loss), "
        "so the products would be wrong. Call the uncompiled module or function instead (a "
        "compiled nn.Module keeps it as `._orig_mod`, a compiled function as "
        "`._torchdynamo_orig_callable`), or compile with backend='eager', which keeps torch's "
        "ordinary autograd graph (products and steps bitwise those of the uncompiled model, "
        "as measured)"
    )


def _once_differentiable(tensors: Sequence[Tensor | None]) -> type | None:
    """The first ``torch.autograd.Function`` in the tensors' autograd graphs whose backward is
    marked ``@once_differentiable``, or that holds a ``torch.compile``'d region
    (:func:`_compiled_by_aot`), or ``None`` (a graph walk, no backward).

    torch runs such a backward under ``no_grad`` and attaches its "differentiate twice" error
    only where the incoming gradient requires grad. A curvature product's second derivative
    passes through it with a gradient that often does not (the loss's constant seed; the
    Jacobian products' double-backward trick on many graphs), and then gets zero from it with
    no error: an activation of this kind in an MLP moved the parameters 0.75 (Gauss-Newton),
    1.16 (Hessian) and 0.04 (Fisher) off the same model with ``torch.tanh`` in 3 steps
    (experiments/README.md, "unseen13").
    """
    seen, stack = set(), [t.grad_fn for t in tensors if t is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        cls = getattr(node, "_forward_cls", None)
        backward = getattr(cls, "backward", None)
        code = getattr(backward, "__code__", None)
        if (code is not None and code is _ONCE_DIFFERENTIABLE_CODE) or _compiled_by_aot(cls):
            return cls
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return None


def _outside_inference_mode(fn: Callable) -> Callable:
    """Run ``fn`` outside ``torch.inference_mode()`` (an evaluation loop's), as the operators do.

    Inference mode turns autograd off beyond ``torch.enable_grad``'s reach: a product built
    there from a graph made outside it had no second-order graph, so ``HessianProduct`` returned
    zeros (1.4 max |error| on a 31-parameter MLP) and ``hvp`` zeros, silently, while the
    Gauss-Newton, Fisher and Jacobian products failed with torch's ``AttributeError: 'NoneType'
    object has no attribute 'next_functions'``. For construction and the Jacobian's ``jvp`` /
    ``vjp``; a curvature product's ``matvec`` needs no autograd mode. One flag read per call
    outside inference mode.
    """

    @functools.wraps(fn)
    def leave(*args: object, **kwargs: object) -> object:
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return leave


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------
def _check_trained(params: list[Tensor]) -> None:
    """Refuse a parameter that does not require grad, or two over the same memory.

    A frozen tensor (``requires_grad=False``) is a constant of the loss: there is no derivative
    with respect to it, and ``torch.autograd.grad`` fails with "One of the differentiated
    Tensors does not require grad", naming neither the tensor nor the fix. A tensor and a view
    of it (``[w, w.view(-1)]``) passed silently: the loss is computed from ``w``, so the view's
    rows of every product were zero (as the operators refuse since operators14). Only where a
    parameter is a view (``_base`` set): the spans' comparison costs ~25 us a parameter, and
    :class:`~hessfree.HessianFree` builds products every step from leaves (0.1 us a parameter).
    """
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(
                f"`params[{i}]` (shape {tuple(p.shape)}) does not require grad: a frozen tensor "
                "is a constant of the loss, with no curvature to take. Pass only the trained "
                "parameters, e.g. hessfree.trainable(model)."
            )
    if any(p._base is not None for p in params):
        _check_no_shared_memory(params)


class CurvatureProduct:
    """A linear map :math:`v \\mapsto Cv` on flat parameter vectors at a fixed point.

    Subclasses implement :meth:`matvec` (and, where autograd can batch it, :meth:`matmat`).
    What :class:`~hessfree.HessianFree` reads besides the products (the product protocol):
    :attr:`positive_semidefinite`, and :attr:`gradient`, :attr:`jacobian` and
    :attr:`output_grad` where the set-up computed them (else ``None``).

    Products are not differentiable: :math:`Cv` comes back without a graph (a third
    derivative, e.g. the gradient of :math:`\\|Hv\\|`, is ``torch.func``'s to take). They can be
    built and applied inside ``torch.inference_mode()``.
    """

    layout: ParamLayout
    #: Whether :math:`C \succeq 0` (Gauss-Newton, Fisher), so CG may warm-start (§4.5).
    positive_semidefinite: bool = False
    #: :math:`\nabla f`, flat, when the set-up computed it on the way (else ``None``).
    gradient: Tensor | None = None
    #: :math:`J = \partial o/\partial\theta` and :math:`\partial f/\partial o` of the outputs,
    #: when the product is built from them (Gauss-Newton, Fisher; else ``None``).
    jacobian: JacobianProduct | None = None
    output_grad: Tensor | tuple[Tensor, ...] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)`` with ``n`` the number of parameter entries."""
        return (self.layout.numel, self.layout.numel)

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Cv` without validation (for solver loops)."""
        raise NotImplementedError

    def matmat(self, V: Tensor) -> Tensor:
        """:math:`C V^\\top` row by row: ``V`` is ``(k, n)``, the result ``(k, n)``.

        Uses autograd's batched backward (``is_grads_batched``) and falls back to a loop over
        rows where an operator has no batching rule.

        Raises:
            ValueError: If ``V`` is not 2-D with ``n`` columns (``k = 0`` rows give ``(0, n)``).
        """
        n = self.layout.numel
        if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[1] != n:
            got = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
            raise ValueError(
                f"`V` must be a (k, {n}) tensor, one vector per row (V.T for columns; "
                f"V[None] for one vector), got {got}."
            )
        if V.shape[0] == 0:  # autograd cannot batch zero rows
            return torch.zeros((0, n), dtype=self.layout.dtype, device=self.layout.device)
        if batching_breaks():  # anomaly mode: the batched attempt would fail, and warn
            return torch.stack([self.matvec(v) for v in V])
        try:
            return self._matmat(V)
        except (RuntimeError, NotImplementedError):
            return torch.stack([self.matvec(v) for v in V])

    def _matmat(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, v: Tensor) -> Tensor:
        """:math:`Cv`, after checking ``v``'s shape, dtype and device (no host sync).

        Values are not inspected: reading them back would synchronise with the device on
        every call. A non-finite ``v`` yields a non-finite :math:`Cv`.
        """
        check_vector("v", v, self.layout.numel, self.layout.dtype, self.layout.device)
        return self.matvec(v)

    def damped(self, damping: float) -> MatVec:
        """The Tikhonov-damped map :math:`v \\mapsto (C + \\lambda I)v` (unchecked, for solvers)."""
        return lambda v: self.matvec(v).add_(v, alpha=damping)


# --------------------------------------------------------------------------------------------
# Hessian
# --------------------------------------------------------------------------------------------
class HessianProduct(CurvatureProduct):
    r"""Hessian-vector products of a scalar loss, reusing one first-order graph.

    The gradient is computed once with ``create_graph=True``; each product
    :math:`Hv = \nabla_\theta\langle g, v\rangle` is then one backward pass through that graph.

    Args:
        loss: A scalar tensor with an autograd graph to ``params``.
        params: The tensors to differentiate with respect to.
        grads: Optional gradients of ``loss`` already built with ``create_graph=True`` (for
            closures that called ``backward(create_graph=True)``); then ``loss`` may be ``None``.

    A parameter the loss does not use gets zero rows and columns (``torch.autograd``'s
    ``allow_unused``); a loss that uses none of them is refused.

    Raises:
        ValueError: If ``loss`` is not a scalar, has no graph, or depends on none of ``params``,
            or a parameter does not require grad (a frozen one: pass ``trainable(model)``).
        TypeError: If ``loss`` is not a tensor.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> H = HessianProduct((x**3).sum(), [x])  # H = diag(6x)
        >>> H(torch.tensor([1.0, 1.0]))
        tensor([ 6., 12.])
    """

    @_outside_inference_mode
    def __init__(
        self,
        loss: Tensor | None,
        params: Sequence[Tensor],
        *,
        grads: Sequence[Tensor | None] | None = None,
    ) -> None:
        self.params = list(params)
        self.layout = ParamLayout(self.params)
        _check_trained(self.params)
        if grads is None:
            loss = check_scalar_loss("loss", loss)
            if fused_weight_norm_in(loss):
                raise ValueError(
                    "`loss` was computed through torch's fused weight-norm kernel "
                    "(nn.utils.parametrizations.weight_norm, nn.utils.weight_norm; autograd node "
                    "WeightNormInterfaceBackward0), whose double backward is wrong "
                    "(torch.autograd.gradgradcheck fails), so Hessian products through it "
                    "would be silently off. Compute the loss inside "
                    "`with hessfree.twice_differentiable_weight_norm():` (the same values by "
                    "the composite formula), or let hessfree call the model (HessianFree's "
                    "closure, HessianLinearOperator(model, ...), hvp) where this is done for you."
                )
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        grads = list(grads)
        check_reaches_params("loss", grads, len(self.params))
        self.gradient = self.layout.cat([None if g is None else g.detach() for g in grads])
        # Only gradient entries that still depend on θ carry second-order information; the
        # others (e.g. parameters entering linearly) contribute zero rows.
        self._idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._idx]

    def matvec(self, v: Tensor) -> Tensor:
        if not self._grads:
            return torch.zeros_like(v)
        vs = self.layout.split(v)
        return self.layout.cat(_grad(self._grads, self.params, [vs[i] for i in self._idx]))

    def _matmat(self, V: Tensor) -> Tensor:
        if not self._grads:
            return torch.zeros_like(V)
        vs = _batched_split(self.layout, V)
        out = _grad(self._grads, self.params, [vs[i] for i in self._idx], batched=True)
        return _batched_cat(self.layout, out, V.shape[0])


@_outside_inference_mode
def hvp(
    f: Callable[..., Tensor],
    x: Tensor | tuple[Tensor, ...],
    v: Tensor | tuple[Tensor, ...],
) -> Tensor | tuple[Tensor, ...]:
    r"""Hessian-vector product of a scalar function, :math:`\nabla^2 f(x)\, v`, by double backward.

    Args:
        f: Maps ``x`` (a tensor, or a tuple of tensors passed as separate arguments) to a scalar.
        x: The point; not modified and need not require grad.
        v: The direction, shaped like ``x`` (a tuple for a tuple ``x``), or one flat tensor
            with ``x``'s total number of entries.

    Returns:
        :math:`Hv` shaped like ``x``, detached (no third derivatives; works inside
        ``torch.inference_mode()``, on an ``x`` made there too).

    Raises:
        TypeError: If ``x`` or ``v`` is not a (tuple of) floating tensor(s), or dtypes differ.
        ValueError: If shapes or devices differ or ``f(x)`` is not a scalar. Values of ``v``
            are not read (no host sync): a non-finite ``v`` gives a non-finite result.

    Example:
        >>> from scipy.optimize import rosen_hess_prod
        >>> def rosen(x):
        ...     return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
        >>> x = torch.tensor([0.5, 1.5, -0.3], dtype=torch.float64)
        >>> v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        >>> expected = torch.from_numpy(rosen_hess_prod(x.numpy(), v.numpy()))
        >>> bool(torch.allclose(hvp(rosen, x, v), expected))
        True
    """
    is_tuple = isinstance(x, tuple)
    if not is_tuple and not isinstance(x, Tensor):
        # a list would otherwise be read as one x and named `x[0]`: "got list"
        fix = "; pass tuple(x)" if isinstance(x, list) else ""
        raise TypeError(f"`x` must be a tensor or a tuple of tensors, got {type(x).__name__}{fix}.")
    xs = x if is_tuple else (x,)
    for i, xi in enumerate(xs):
        if not isinstance(xi, Tensor) or not xi.is_floating_point():
            kind = (
                type(xi).__name__ if not isinstance(xi, Tensor) else f"tensor of dtype {xi.dtype}"
            )
            raise TypeError(f"`x[{i}]` must be a floating-point tensor, got {kind}.")
    # an inference tensor (made in inference mode) cannot require grad: copy it out first
    prims = [(xi.clone() if xi.is_inference() else xi.detach()).requires_grad_(True) for xi in xs]
    layout = ParamLayout(prims)
    if isinstance(v, tuple):
        if not is_tuple or len(v) != len(xs):
            raise ValueError(
                f"`v` must match `x`'s structure: got a tuple of {len(v)} for x of {len(xs)}."
            )
        for i, (vi, xi) in enumerate(zip(v, xs, strict=True)):
            if not isinstance(vi, Tensor) or vi.shape != xi.shape:
                shape = tuple(vi.shape) if isinstance(vi, Tensor) else type(vi).__name__
                raise ValueError(
                    f"`v[{i}]` must have shape {tuple(xi.shape)} like x[{i}], got {shape}."
                )
        flat_v = layout.cat(v) if len(v) > 1 else v[0].reshape(-1)
    elif isinstance(v, Tensor):
        if not is_tuple and v.shape == xs[0].shape:
            flat_v = v.reshape(-1)
        elif v.dim() == 1 and v.numel() == layout.numel:
            flat_v = v
        else:
            want = (
                f"{tuple(xs[0].shape)} or ({layout.numel},)"
                if not is_tuple and xs[0].dim() != 1
                else f"({layout.numel},)"
            )
            raise ValueError(f"`v` must have shape {want}, got {tuple(v.shape)}.")
    else:
        fix = "; pass tuple(v)" if isinstance(v, list) else ""
        raise TypeError(f"`v` must be a tensor or a tuple of tensors, got {type(v).__name__}{fix}.")
    check_vector("v", flat_v, layout.numel, layout.dtype, layout.device)  # no host sync
    with torch.enable_grad(), twice_differentiable_weight_norm():  # torch's fused one is wrong
        loss = f(*prims)
        if isinstance(loss, Tensor) and not loss.requires_grad and loss.numel() == 1:
            return (
                tuple(torch.zeros_like(p) for p in prims)
                if is_tuple
                else torch.zeros_like(prims[0])
            )
        loss = check_scalar_loss("f(x)", loss)
        grads = torch.autograd.grad(loss, prims, create_graph=True, allow_unused=True)
        if all(g is None for g in grads):  # f reaches x nowhere: constant in x, so H = 0
            out = torch.zeros_like(flat_v)
        else:
            out = HessianProduct(None, prims, grads=grads).matvec(flat_v)
    parts = [t.detach() for t in layout.split(out)]
    return tuple(parts) if is_tuple else parts[0]


# --------------------------------------------------------------------------------------------
# loss Hessians in closed form
# --------------------------------------------------------------------------------------------
_MEAN, _SUM = 1, 2  # at::Reduction codes saved on loss autograd nodes
# Nodes that only reinterpret a tensor's elements in row-major order (or copy them).
_RESHAPES = frozenset(
    (
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "AliasBackward0",
        "CloneBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
    )
)


def _neg_dim(dim: int, ndim: int) -> int:
    return dim - ndim if dim >= 0 else dim


def loss_hessian_product(loss: Tensor, outputs: Tensor) -> MatVec | None:
    r"""The closed-form loss Hessian :math:`w \mapsto H_\ell w` if ``loss`` is a known loss.

    Recognises ``loss = mse_loss(outputs, t)``, ``cross_entropy(outputs, y)`` (class dimension 1,
    no class weights or label smoothing; extra dimensions ``(N, C, d1, ...)`` too) and
    ``binary_cross_entropy_with_logits(outputs, t)`` (no weights) with ``'mean'`` or ``'sum'``
    reduction, from the loss's autograd node. The loss may be applied to a reshape of the outputs
    (``cross_entropy(logits.view(-1, V), y.view(-1))``), scaled by constants, reshaped, and have
    terms added that do not depend on the outputs (a weight penalty). The returned map also
    accepts ``w`` with extra leading (batch) dimensions.

    * MSE: :math:`H_\ell = 2I/m` (:math:`m` = number of averaged entries, 1 for a sum).
    * Cross-entropy: per row :math:`(\mathrm{diag}(p) - pp^\top)/m`,
      :math:`p = \mathrm{softmax}(o)`;
      rows whose target is ``ignore_index`` contribute zero.
    * BCE-with-logits: :math:`\mathrm{diag}(\sigma(o)(1-\sigma(o)))/m`.

    Returns:
        The map, or ``None`` if the loss is not recognised (callers then double-backward
        through the loss, which is exact too), also for probability targets and where
        ``outputs`` is a leaf tensor (no autograd node to match; a model's outputs never are).

    Example:
        >>> o = torch.randn(4, 3, requires_grad=True) * 1.0  # outputs: a non-leaf tensor
        >>> hl = loss_hessian_product(torch.nn.functional.mse_loss(o, torch.zeros(4, 3)), o)
        >>> hl(torch.ones(4, 3))[0]  # 2 / 12 on the diagonal
        tensor([0.1667, 0.1667, 0.1667])
    """
    peeled = _loss_node(loss, outputs)
    return None if peeled is None else _closed_form(peeled[0], outputs, peeled[1])


def _loss_node(loss: Tensor, outputs: Tensor) -> tuple[torch.autograd.graph.Node, float] | None:
    """The loss's autograd node below constant factors, and their product (e.g. ``1/N`` of a
    summed loss divided by the batch size); ``None`` if a factor is not a constant.

    Also peeled: reshapes of the one-element loss (``.reshape(())``, ``.squeeze()``, ...), added
    constants, and added terms that do not depend on ``outputs`` (a weight penalty written into
    the loss): they leave the loss's Hessian with respect to the outputs as it is.
    """
    node = loss.grad_fn
    if node is None or outputs.grad_fn is None or loss.numel() != 1:
        return None
    factor = 1.0
    while True:
        kind = type(node).__name__
        if kind in _RESHAPES or kind in ("AddBackward1", "SubBackward1"):  # one input
            node = node.next_functions[0][0]
        elif kind in ("MulBackward0", "DivBackward0"):
            (first, _), (second, _) = node.next_functions
            if second is None and first is not None:
                other, node = node._saved_other, first
            elif first is None and second is not None and kind == "MulBackward0":
                other, node = node._saved_self, second
            else:
                return None
            if other is None or other.numel() != 1:
                return None
            factor = factor / float(other) if kind == "DivBackward0" else factor * float(other)
        elif kind in ("AddBackward0", "SubBackward0"):
            (first, _), (second, _) = node.next_functions
            target = {outputs.grad_fn}
            on_first = first is not None and _reaches(first, target, set())
            on_second = second is not None and _reaches(second, target, set())
            if on_first == on_second:  # both terms depend on the outputs, or neither
                return None
            if on_second:  # a + alpha * b, a - alpha * b
                alpha = float(getattr(node, "_saved_alpha", 1.0))
                factor *= -alpha if kind == "SubBackward0" else alpha
            node = first if on_first else second
        else:
            return node, factor
        if node is None:
            return None


def _from_outputs(fn: torch.autograd.graph.Node | None, outputs: Tensor) -> bool:
    """Whether ``fn`` is the outputs' node, or reaches it through reshapes alone."""
    while fn is not outputs.grad_fn:
        if fn is None or type(fn).__name__ not in _RESHAPES:
            return False
        fn = fn.next_functions[0][0]
    return True


def _label_smoothed_nll(
    loss: Tensor, outputs: Tensor
) -> tuple[torch.autograd.graph.Node, float] | None:
    r"""torch's label-smoothed cross-entropy, :math:`(1-\varepsilon)\,\mathrm{NLL}(s) +
    \tfrac{\varepsilon}{C}\,\mathrm{smooth}(s)` of :math:`s = \mathrm{log\_softmax}(o)`, below
    constant factors: its NLL node and the factors' product, else ``None``.

    torch reduces both terms with the loss's one ``reduction``, and the smoothing term's graph
    (a masked sum, divided by the kept rows' count or weight for ``'mean'``) reaches the outputs
    only through the NLL's log-softmax, so the NLL node says how the loss combines the
    examples (:func:`_read_reduction`). Not for the loss Hessian: the NLL is one term of two.
    """
    node, factor = loss.grad_fn, 1.0
    while node is not None and type(node).__name__ != "AddBackward0":
        kind = type(node).__name__
        if kind in ("MulBackward0", "DivBackward0") and node.next_functions[1][0] is None:
            other = node._saved_other
            if other is None or other.numel() != 1:
                return None
            factor = factor / float(other) if kind == "DivBackward0" else factor * float(other)
        elif kind == "MulBackward1":  # times a Python number
            factor *= float(node._saved_other)
        elif kind not in _RESHAPES:
            return None
        node = node.next_functions[0][0]
    if node is None or float(getattr(node, "_saved_alpha", 1.0)) != 1.0:
        return None
    terms = []
    for term, _ in node.next_functions:
        while term is not None and type(term).__name__ == "MulBackward1":  # 1 - ε, ε / C
            term = term.next_functions[0][0]
        terms.append(term)
    nll = [t for t in terms if type(t).__name__ in ("NllLossBackward0", "NllLoss2DBackward0")]
    if len(nll) != 1 or None in terms:
        return None
    lsm = nll[0].next_functions[0][0]
    while lsm is not None and type(lsm).__name__ in _RESHAPES:  # torch's 4-D view
        lsm = lsm.next_functions[0][0]
    if type(lsm).__name__ != "LogSoftmaxBackward0":
        return None
    other = terms[1] if terms[0] is nll[0] else terms[0]
    if _reaches(other, {outputs.grad_fn}, {lsm}) or not _reaches(other, {lsm}, set()):
        return None  # not the smoothing term of this log-softmax
    return nll[0], factor


def _read_reduction(loss: Tensor, outputs: Tensor) -> str | None:
    """How ``loss`` combines the examples along dimension 0 of ``outputs``, read from its
    autograd graph below constant factors: ``'sum'``, ``'mean'``, or ``None`` (not readable).

    Read: a torch loss node (MSE, cross-entropy, NLL, BCE; ``'sum'`` only where its input is
    the outputs or their ``log_softmax``, either through reshapes), and a hand-written full
    ``.sum()`` or ``.mean()`` of a tensor with the examples along dimension 0
    (``((o - y)**2).sum()``, ``per_example.mean()``). A constant factor belongs to the
    per-example loss, except exactly ``1/N`` on a sum, which makes it a mean (``.sum() / N``);
    a term added that does not depend on the outputs (a weight penalty) is seen through, as
    :func:`_loss_node` does. Not readable: anything else at the top, e.g. two terms of the
    outputs, or a Python ``sum`` over examples.
    """
    peeled = _loss_node(loss, outputs) or _label_smoothed_nll(loss, outputs)
    if peeled is None:
        return None
    node, factor = peeled
    n = outputs.shape[0] if outputs.dim() > 0 else 1
    code = getattr(node, "_saved_reduction", None)
    if code == _MEAN:
        return "mean"
    if code == _SUM:
        first = node.next_functions[0][0] if node.next_functions else None
        while first is not outputs.grad_fn and type(first).__name__ in _RESHAPES:
            first = first.next_functions[0][0]  # torch's 4-D view for (N, C, d) NLL
        if first is not outputs.grad_fn and type(first).__name__ == "LogSoftmaxBackward0":
            first = first.next_functions[0][0]
        # a sum over every entry of a reshape of the outputs is a sum over the examples too
        # (a language model's cross_entropy(logits.view(-1, V), y.view(-1), reduction='sum'))
        if not _from_outputs(first, outputs):
            return None
        reduction = "sum"
    elif type(node).__name__ in ("SumBackward0", "SumBackward1", "MeanBackward0", "MeanBackward1"):
        sizes = getattr(node, "_saved_self_sym_sizes", ())
        if len(sizes) == 0 or int(sizes[0]) != n:  # not a reduction over the examples
            return None
        reduction = "mean" if type(node).__name__.startswith("Mean") else "sum"
    else:
        return None
    if reduction == "sum" and n > 1 and math.isclose(factor, 1.0 / n, rel_tol=1e-12):
        return "mean"  # .sum() / N
    return reduction


def _class_dim(lsm: torch.autograd.graph.Node, ndim: int) -> int:
    """The dimension a ``LogSoftmaxBackward0`` node normalised, as a non-negative index. Its
    ``_saved_dim`` reads a negative dimension as an unsigned 64-bit integer (``dim=-1`` is
    2**64 - 1), so ``log_softmax(z, -1)`` on ``(N, C)`` logits once went unrecognised."""
    dim = int(lsm._saved_dim)
    if dim >= 2**63:
        dim -= 2**64
    return dim + ndim if dim < 0 else dim


def _same_rows(node: torch.autograd.graph.Node, p: Tensor) -> bool:
    """Whether the NLL ``node`` sees the log-softmax result ``p`` with its examples and classes
    where they were normalised: the view torch puts between ``(N, C, d1, ...)`` and the 4-D NLL
    keeps the leading ``(N, C)``; a user's view that regroups them, e.g. ``(N, K)`` seen as
    ``(N', C, d, 1)``, would make the classes of one NLL row straddle softmax rows."""
    seen = node._saved_self.shape if type(node).__name__ == "NllLoss2DBackward0" else p.shape
    return tuple(seen[:2]) == tuple(p.shape[:2])


def _targets_free(node: torch.autograd.graph.Node, outputs: Tensor) -> bool:
    """Whether the loss ``node``'s inputs other than the first (its target, weights) are free
    of ``outputs``: a target computed from them with its graph (``mse_loss(o, o.roll(1, 0))``,
    a soft target not detached) puts a second path from the outputs into the loss, and the
    closed forms, which differentiate the first input alone, would be wrong."""
    target = {outputs.grad_fn}
    return not any(_reaches(n, target, set()) for n, _ in node.next_functions[1:])


def _closed_form(node: torch.autograd.graph.Node, outputs: Tensor, factor: float) -> MatVec | None:
    name = type(node).__name__
    nxt = node.next_functions
    o = outputs.detach()
    reduction = getattr(node, "_saved_reduction", None)
    if reduction not in (_MEAN, _SUM) or not _targets_free(node, outputs):
        return None
    if name == "MseLossBackward0" and _from_outputs(nxt[0][0], outputs):
        scale = factor * 2.0 / (o.numel() if reduction == _MEAN else 1)
        return lambda w: w * scale
    if name == "BinaryCrossEntropyWithLogitsBackward0" and _from_outputs(nxt[0][0], outputs):
        if node._saved_weight is not None or node._saved_pos_weight is not None:
            return None
        s = torch.sigmoid(o)
        d = s * (1 - s) * (factor / (o.numel() if reduction == _MEAN else 1))
        return lambda w: w * d
    if name not in ("NllLossBackward0", "NllLoss2DBackward0") or node._saved_weight is not None:
        return None
    lsm = nxt[0][0]
    if name == "NllLoss2DBackward0" and type(lsm).__name__ == "ViewBackward0":
        lsm = lsm.next_functions[0][0]  # (N, C, d1, ...) other than 4-D: viewed as 4-D
    if type(lsm).__name__ != "LogSoftmaxBackward0" or not _from_outputs(
        lsm.next_functions[0][0], outputs
    ):
        return None
    p = lsm._saved_result.detach().exp()  # the outputs as cross-entropy saw them (reshaped)
    if p.dim() < 2 or _class_dim(lsm, p.dim()) != 1 or not _same_rows(node, p):
        return None
    cdim = _neg_dim(1, p.dim())
    target = node._saved_target.reshape(p.shape[0], *p.shape[2:])
    keep = (target != node._saved_ignore_index).unsqueeze(1).to(p.dtype)
    denom = node._saved_total_weight if reduction == _MEAN else 1.0
    coef = keep * (factor / denom)  # positions whose target is ignored contribute zero
    shape = o.shape

    def ce(w: Tensor) -> Tensor:
        lead = w.shape[: w.dim() - len(shape)]  # extra (batched) leading dimensions
        pw = p * w.reshape(*lead, *p.shape)
        return (coef * (pw - p * pw.sum(cdim, keepdim=True))).reshape(*lead, *shape)

    return ce


# --------------------------------------------------------------------------------------------
# Jacobian, Gauss-Newton, Fisher
# --------------------------------------------------------------------------------------------
#: Largest number of entries per example for which a generic loss Hessian's per-example blocks
#: are formed to test it for convexity (ours: ``K + 1`` batched products and ``N`` Cholesky
#: factorizations of ``K × K`` blocks per product set-up; a mixture density of five Gaussians
#: has 15 outputs per example).
_MAX_BLOCK = 16


def _absolute_blocks(go: Tensor, outputs: Tensor, max_block: int | None = None) -> MatVec | None:
    r"""``w -> |H_ℓ| w`` for a loss that is a sum of per-example terms and not convex in the
    outputs, else ``None`` (then :math:`H_\ell` itself is used).

    The Gauss-Newton matrix :math:`J^\top H_\ell J` is positive semidefinite only for a loss
    convex in the outputs (Schraudolph 2002, §3); a mixture density's or a heteroscedastic
    Gaussian's negative log-likelihood is not (in the mean and log-scale of one Gaussian,
    :math:`\det H_\ell = -2(y-\mu)^2 e^{-4s} < 0`), so its "GGN" was indefinite while
    ``positive_semidefinite`` claimed otherwise. Here each example's block :math:`B_i` of
    :math:`H_\ell` (``K`` entries per example, ``outputs`` split along dimension 0) is replaced
    by :math:`|B_i| = U_i |\Lambda_i| U_i^\top`, as saddle-free Newton does with the Hessian
    (Dauphin et al. 2014, §5; ours for the loss Hessian; the eigenvalues' absolute values
    beat clipping them at 0 on a mixture-density network, ``experiments/README.md``,
    "lossmodels"). The blocks come from ``K`` batched double-backward products with probes
    that are 1 at entry ``k`` of every example. A convex loss is recognised by a Cholesky
    factorization of every :math:`B_i + \tau I` succeeding,
    :math:`\tau = \sqrt{\epsilon}\max_{i,a} |(B_i)_{aa}|`, and keeps the exact
    :math:`H_\ell` (bitwise as before; the test costs ~0.2 ms for 256 examples of 4 outputs).
    So do a loss coupling the examples (one more product, with a fixed dense probe, checks
    that :math:`H_\ell` is block-diagonal), ``K`` above ``_MAX_BLOCK``, an op autograd cannot
    batch, or blocks whose eigenvalues are all above :math:`-\sqrt{\epsilon}` times the
    largest magnitude. ``max_block`` (default ``_MAX_BLOCK``) raises the cap where the caller
    already knows the loss is not convex (:class:`~hessfree.HessianFree` after a negative-curvature
    stop; memory :math:`NK^2`).
    """
    if outputs.dim() < 1 or outputs.shape[0] == 0 or not outputs.is_floating_point():
        return None
    n = outputs.shape[0]
    k = outputs.numel() // n
    if k > (_MAX_BLOCK if max_block is None else max_block):
        return None
    probes = outputs.new_zeros(k + 1, n, k)
    probes[torch.arange(k), :, torch.arange(k)] = 1.0
    # a fixed dense probe for the separability test (no random numbers drawn)
    entries = torch.arange(n * k, dtype=outputs.dtype, device=outputs.device)
    probes[k] = torch.cos(1.0 + 0.7548776662 * entries).view(n, k)
    try:
        (cols,) = _grad([go], [outputs], [probes.view(k + 1, *outputs.shape)], batched=True)
    except RuntimeError:  # an op without a batching rule: stay with the exact H_ℓ
        return None
    if cols is None:
        return None
    cols = cols.reshape(k + 1, n, k)
    B = cols[:k].permute(1, 2, 0)  # B[i, a, b] = ∂²ℓ/∂o_ia ∂o_ib
    B = 0.5 * (B + B.transpose(1, 2))
    eps = torch.finfo(outputs.dtype).eps
    # 16-bit blocks are factorized in float32 (no 16-bit Cholesky)
    work = B.to(torch.promote_types(B.dtype, torch.float32))
    tau = math.sqrt(eps) * work.diagonal(dim1=1, dim2=2).abs().amax()
    eye = torch.eye(k, dtype=work.dtype, device=work.device)
    _, info = torch.linalg.cholesky_ex(work + tau * eye)
    if not bool(info.any()):  # every block semidefinite (to τ): a convex loss
        return None
    if not bool(torch.isfinite(cols).all()):
        return None
    Bu = torch.einsum("nab,nb->na", B, probes[k])
    if float((cols[k] - Bu).norm()) > math.sqrt(eps) * float(cols[k].norm()):
        return None  # H_ℓ couples examples: not block-diagonal
    # float64: float32's batched eigh returned NaN on some mixture-density blocks
    lam, U = torch.linalg.eigh(B.double())
    top = float(lam.abs().max())
    if not float(lam.min()) < -math.sqrt(eps) * top:
        return None
    P = ((U * lam.abs().unsqueeze(1)) @ U.transpose(1, 2)).to(outputs.dtype)
    shape = outputs.shape

    def hl(w: Tensor) -> Tensor:
        if w.dim() > len(shape):  # a batch of vectors along dimension 0
            return torch.einsum("nab,mnb->mna", P, w.reshape(-1, n, k)).reshape(w.shape)
        return torch.einsum("nab,nb->na", P, w.reshape(n, k)).reshape(shape)

    return hl


class JacobianProduct:
    r"""Products with the Jacobian :math:`J = \partial o/\partial\theta` of outputs at a point.

    The outputs are one tensor or a sequence of tensors :math:`o = (o_1, \dots, o_K)` (e.g. the
    residual blocks of a physics-informed loss), whose Jacobian is the stacked
    :math:`J = [J_1; \dots; J_K]`. :meth:`jvp` (:math:`v \mapsto Jv`, flat ``v`` in,
    outputs-shaped out) uses the double-backward R-op trick on a graph built once on first use;
    :meth:`vjp` (:math:`u \mapsto J^\top u = \sum_k J_k^\top u_k`, outputs-shaped ``u`` in, flat
    out) is one backward pass. Blocks without a graph to the parameters have :math:`J_k = 0`.

    Args:
        outputs: The model outputs (a tensor or a sequence of tensors), with a graph to ``params``.
        params: The parameters.

    Raises:
        TypeError: If ``outputs`` is not a tensor or a sequence of tensors.
        ValueError: If no output has an autograd graph or a parameter does not require grad
            (a frozen one: pass ``trainable(model)``); on the first product, if the outputs
            depend on none of ``params`` (parameters they do not use give zero columns).

    Example:
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
        >>> x = torch.tensor([1.0, -1.0])
        >>> J = JacobianProduct(W @ x, [W])
        >>> J.jvp(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # d(Wx)/dW_00 = [x_0, 0]
        tensor([1., 0.])
        >>> J2 = JacobianProduct((W @ x, W.sum(0)), [W])  # two blocks
        >>> J2.jvp(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        (tensor([1., 0.]), tensor([1., 0.]))
    """

    @_outside_inference_mode
    def __init__(self, outputs: Tensor | Sequence[Tensor], params: Sequence[Tensor]) -> None:
        self.is_sequence = not isinstance(outputs, Tensor)
        if self.is_sequence:
            if not isinstance(outputs, (tuple, list)) or not outputs:
                raise TypeError(
                    "`outputs` must be a torch.Tensor or a non-empty tuple/list of tensors, got "
                    f"{type(outputs).__name__}."
                )
            for k, o in enumerate(outputs):
                if not isinstance(o, Tensor):
                    kind = type(o).__name__
                    raise TypeError(f"`outputs[{k}]` must be a torch.Tensor, got {kind}.")
        elif not isinstance(outputs, Tensor):
            raise TypeError(f"`outputs` must be a torch.Tensor, got {type(outputs).__name__}.")
        self._all = list(outputs) if self.is_sequence else [outputs]
        # Blocks that do not depend on θ have J_k = 0; autograd only sees the others.
        self._live = [k for k, o in enumerate(self._all) if o.requires_grad]
        if not self._live:
            raise ValueError(
                "`outputs` has no autograd graph to the parameters (requires_grad=False); "
                "compute them with gradients enabled."
            )
        self.outputs = outputs
        self.params = list(params)
        self.layout = ParamLayout(self.params)
        _check_trained(self.params)
        self._u_blocks: list[int] = []  # blocks k with a linear seed u_k in the R-op graph
        self._us: list[Tensor] = []
        self._jtu: list[torch.autograd.graph.GradientEdge] = []
        self._jtu_idx: list[int] = []

    @property
    def shape(self) -> tuple[int, int]:
        """``(total number of output entries, n)``."""
        return (sum(o.numel() for o in self._all), self.layout.numel)

    def _set_rop_graph(
        self, blocks: Sequence[int], us: Sequence[Tensor], jtu: Sequence[Tensor | None]
    ) -> None:
        """Use :math:`\\sum_k J_k^\\top u_k` (a graph, linear in the ``u_k``) for :meth:`jvp`."""
        self._u_blocks, self._us = list(blocks), list(us)
        self._jtu_idx = [i for i, t in enumerate(jtu) if t is not None and t.requires_grad]
        # Only the graph is needed, not the values: keep the edges, so the tensors can go.
        self._jtu = [torch.autograd.graph.get_gradient_edge(jtu[i]) for i in self._jtu_idx]

    def _ensure_rop_graph(self) -> None:
        if not self._us:
            outs = [self._all[k] for k in self._live]
            us = [torch.zeros_like(o, requires_grad=True) for o in outs]
            jtu = _rop_setup(outs, self.params, us)
            check_reaches_params("outputs", jtu, len(self.params))
            self._set_rop_graph(self._live, us, jtu)

    def _structure(self, parts: Sequence[Tensor | None], lead: tuple[int, ...]) -> Tensor | tuple:
        """Place per-block results (``None`` = zero) back into the outputs' structure."""
        placed: list[Tensor | None] = [None] * len(self._all)
        for k, t in zip(self._u_blocks, parts, strict=True):
            placed[k] = t
        # zeros only where a block has no result: an output-sized fill per product otherwise
        out = [
            o.new_zeros(*lead, *o.shape) if t is None else t
            for o, t in zip(self._all, placed, strict=True)
        ]
        return tuple(out) if self.is_sequence else out[0]

    def _blocks(self, u: Tensor | Sequence[Tensor]) -> list[Tensor]:
        return list(u) if self.is_sequence else [u]

    @_outside_inference_mode
    def jvp(self, v: Tensor) -> Tensor | tuple[Tensor, ...]:
        """:math:`Jv` for a flat ``v``; a tensor (tuple of tensors) shaped like ``outputs``."""
        n = self.layout.numel
        if not isinstance(v, Tensor) or v.shape != (n,):
            got = f"shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"`v` must be a flat tensor of shape ({n},), one entry per parameter entry, "
                f"got {got}."
            )
        self._ensure_rop_graph()
        if not self._jtu:
            return self._structure([None] * len(self._us), ())
        vs = self.layout.split(v)
        try:
            out = _grad(self._jtu, self._us, [vs[i] for i in self._jtu_idx])
        except NotImplementedError as err:  # e.g. nn.Embedding(sparse=True)'s backward
            cause = str(err.__cause__)
            if _NO_DERIVATIVE.search(cause) or _COMPILED.search(cause):  # worded by _grad
                raise
            raise NotImplementedError(
                "A Jacobian-vector product (Gauss-Newton, Fisher or Jacobian curvature) needs "
                "the double backward of every operation of the model, and one has none: "
                f"{str(err).splitlines()[0][:200]} Layers with sparse gradients "
                "(nn.Embedding(sparse=True)) have none: use sparse=False, or Hessian "
                "curvature (curvature='hessian', or a closure that returns the loss alone)."
            ) from err
        return self._structure(out, ())

    def batched_jvp(self, V: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Batched :meth:`jvp`: ``V`` is ``(k, n)``, each result block ``(k, *block.shape)``."""
        self._ensure_rop_graph()
        k = V.shape[0]
        if not self._jtu:
            return self._structure([None] * len(self._us), (k,))
        vs = _batched_split(self.layout, V)
        out = _grad(self._jtu, self._us, [vs[i] for i in self._jtu_idx], batched=True)
        return self._structure(out, (k,))

    @_outside_inference_mode
    def vjp(self, u: Tensor | Sequence[Tensor]) -> Tensor:
        """:math:`J^\\top u` for ``u`` shaped like ``outputs``; returns a flat vector."""
        us = self._blocks(u)
        if len(us) != len(self._all) or any(
            not isinstance(b, Tensor) or b.shape != o.shape
            for b, o in zip(us, self._all, strict=False)
        ):
            want = [tuple(o.shape) for o in self._all]
            got = [tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__ for b in us]
            raise ValueError(
                f"`u` must be shaped like the outputs, {want if self.is_sequence else want[0]}, "
                f"got {got if self.is_sequence else got[0]}."
            )
        outs = [self._all[k] for k in self._live]
        parts = _grad(outs, self.params, [us[k] for k in self._live])
        check_reaches_params("outputs", parts, len(self.params))
        return self.layout.cat(parts)

    def batched_vjp(self, U: Tensor | Sequence[Tensor]) -> Tensor:
        """Batched :meth:`vjp`: each block of ``U`` is ``(k, *block.shape)``; returns ``(k, n)``."""
        us = self._blocks(U)
        outs = [self._all[k] for k in self._live]
        parts = _grad(outs, self.params, [us[k] for k in self._live], batched=True)
        check_reaches_params("outputs", parts, len(self.params))
        return _batched_cat(self.layout, parts, us[0].shape[0])

    #: Former names of :meth:`batched_jvp` and :meth:`batched_vjp`.
    jmp = batched_jvp
    vmp = batched_vjp


class GGNProduct(CurvatureProduct):
    r"""Generalized Gauss-Newton products :math:`Gv = J^\top H_\ell J v` (Schraudolph 2002).

    One set-up backward pass builds the gradient through ``outputs`` with ``create_graph=True``;
    it yields the gradient (:attr:`gradient`), the graph for every :math:`Jv`, and the generic
    loss Hessian. Each product is then a backward through that graph (:math:`Jv`), a closed-form
    loss Hessian where :func:`loss_hessian_product` recognises the loss, and one backward
    (:math:`J^\top`). :math:`G` is positive semidefinite for a loss convex in the outputs
    (Schraudolph 2002 assumes one); for a loss that is not (a mixture density's or a
    heteroscedastic Gaussian's NLL), ``loss_hessian='absolute'`` replaces :math:`H_\ell` by the
    absolute value of each example's block where the loss is a sum over examples
    (``_absolute_blocks``; what :class:`~hessfree.HessianFree` uses), and the default
    ``'exact'`` keeps :math:`J^\top H_\ell J`, indefinite there.

    The outputs may be a sequence of blocks :math:`(r_1, \dots, r_K)`, e.g. the residuals of a
    physics-informed loss :math:`\ell = \sum_k w_k\,\mathrm{mean}(r_k^2)` whose interior residual
    contains derivatives of the network with respect to its inputs. Then
    :math:`G = \sum_{k,l} J_k^\top (H_\ell)_{kl} J_l` with :math:`H_\ell` the Hessian of the loss
    with respect to all residual entries (block weights included), applied exactly by a double
    backward through the small residual-to-loss part of the graph (for a weighted sum of squares
    it is :math:`2w_k/m_k\,I` on block :math:`k`; any other function of the residuals works too).
    All :math:`J_k v` come from one double-backward pass and all :math:`J_k^\top` from one
    backward pass.

    Args:
        loss: Scalar loss computed from ``outputs`` (it may also depend on ``params`` directly,
            e.g. a regulariser: that part enters the gradient but not :math:`G`).
        outputs: The model outputs (a tensor or a sequence of tensors), with a graph to
            ``params``.
        params: The parameters.
        loss_hessian: ``'exact'`` (default) for :math:`H_\ell` itself, ``'absolute'`` for
            :math:`|H_\ell|` per example's block on a generic loss found not convex in a single
            outputs tensor (a closed-form or convex loss, one coupling the examples, or more
            than ``max_block`` entries per example keep :math:`H_\ell`).
        max_block: With ``loss_hessian='absolute'``, the most entries per example whose blocks
            are formed (``None``: 16; memory and set-up cost grow as :math:`NK^2` and
            :math:`K + 1` products). :class:`~hessfree.HessianFree` raises it to 64 once CG has
            met negative curvature, which a convex loss never gives it.

    Raises:
        ValueError: If ``loss`` is not a scalar, has no graph, does not depend on ``outputs``,
            or depends on none of ``params`` (parameters it does not use give zero rows and
            columns), a parameter does not require grad, ``loss_hessian`` is neither
            ``'exact'`` nor ``'absolute'``, or ``max_block`` is not ``None`` or an int >= 1.

    Example:
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
        >>> w = torch.zeros(2, requires_grad=True)
        >>> out = X @ w
        >>> G = GGNProduct(0.5 * (out**2).sum(), out, [w])  # G = X^T X
        >>> G(torch.tensor([1.0, 0.0]))
        tensor([2., 2.])
        >>> r1, r2 = X @ w - 1, 3 * w  # residual blocks, loss = mean(r1^2) + 0.5 sum(r2^2)
        >>> G = GGNProduct((r1**2).mean() + 0.5 * (r2**2).sum(), (r1, r2), [w])  # XᵀX + 9I
        >>> G(torch.tensor([1.0, 0.0]))
        tensor([11.,  2.])
    """

    positive_semidefinite = True  # for a convex loss, or with ``loss_hessian='absolute'``
    _absolute = False
    _max_block: int | None = None

    @_outside_inference_mode
    def __init__(
        self,
        loss: Tensor,
        outputs: Tensor | Sequence[Tensor],
        params: Sequence[Tensor],
        *,
        loss_hessian: str = "exact",
        max_block: int | None = None,
    ) -> None:
        if loss_hessian not in ("exact", "absolute"):
            raise ValueError(f"`loss_hessian` must be 'exact' or 'absolute', got {loss_hessian!r}.")
        if max_block is not None and (
            isinstance(max_block, bool) or not isinstance(max_block, int) or max_block < 1
        ):
            raise ValueError(f"`max_block` must be None or an int >= 1, got {max_block!r}.")
        self._absolute = loss_hessian == "absolute"
        self._max_block = max_block
        loss = check_scalar_loss("loss", loss)
        self.jacobian = JacobianProduct(outputs, params)
        J = self.jacobian
        self.params, self.layout, self.outputs = J.params, J.layout, outputs
        live = [J._all[k] for k in J._live]
        gos = torch.autograd.grad(
            loss, live, create_graph=True, retain_graph=True, allow_unused=True
        )
        blocks = [k for k, go in zip(J._live, gos, strict=True) if go is not None]
        if not blocks:
            raise ValueError(
                "`loss` does not depend on `outputs`; pass the outputs the loss was computed from."
            )
        gos = [go for go in gos if go is not None]
        outs = [J._all[k] for k in blocks]
        # The R-op's seeds: the values of ∂ℓ/∂o without their graph (which only a generic loss
        # Hessian below needs; a closed form lets it go with `gos` at the end of __init__).
        seeds = [go.detach().requires_grad_() for go in gos]
        if J.is_sequence:
            jtg = _rop_setup(outs, self.params, seeds)
            J._set_rop_graph(blocks, seeds, jtg)
            zeros = [torch.zeros_like(o) for o in J._all]
            for k, go in zip(blocks, gos, strict=True):
                zeros[k] = go.detach()
            self.output_grad: Tensor | tuple[Tensor, ...] = tuple(zeros)
        else:
            jtg = self._rop_graph(outputs, seeds[0])
            J._set_rop_graph(blocks, seeds, jtg)
            self.output_grad = gos[0].detach()
        self.gradient = self.layout.cat([None if t is None else t.detach() for t in jtg])
        stop = {o.grad_fn for o in outs}
        direct = _reaches(loss.grad_fn, _accumulate_nodes(self.params), stop)
        if not direct:  # then the loss reaches θ only through the outputs
            check_reaches_params("loss", jtg, len(self.params))
        # Outputs that reach no parameter (the loss only through a regulariser): J = 0, G = 0.
        self._zero = all(t is None for t in jtg)
        if direct:
            # The loss also depends on θ directly (a regulariser): the full gradient needs it.
            self.gradient = self.layout.cat(
                torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
            )
        self._hl = self._loss_hessian_map(loss, outputs, gos, blocks)

    def _loss_hessian_map(
        self,
        loss: Tensor,
        outputs: Tensor | Sequence[Tensor],
        gos: list[Tensor],
        blocks: list[int],
    ) -> Callable:
        """``w -> H_ℓ w`` from the set-up's output gradients ``gos`` of the live ``blocks``."""
        J = self.jacobian
        closed = None if J.is_sequence else loss_hessian_product(loss, outputs)
        curved = [i for i, go in enumerate(gos) if go.requires_grad]
        if closed is not None:
            return closed
        if not curved:  # loss linear in the outputs
            if J.is_sequence:
                return lambda w: tuple(map(torch.zeros_like, w))
            return torch.zeros_like
        if not J.is_sequence:
            go = gos[0]
            absolute = _absolute_blocks(go, outputs, self._max_block) if self._absolute else None
            if absolute is not None:  # a non-convex loss: |H_ℓ| keeps G semidefinite
                return absolute
            return lambda w: _grad([go], [outputs], [w], batched=w.dim() > outputs.dim())[0]
        # H_ℓ w = ∂⟨∂ℓ/∂r, w⟩/∂r: double backward through the residual-to-loss graph only
        outs = [J._all[k] for k in blocks]
        seeds = [gos[i] for i in curved]

        def hl(ws: Sequence[Tensor]) -> tuple[Tensor, ...]:
            batched = ws[0].dim() > J._all[0].dim()
            parts = _grad(seeds, outs, [ws[blocks[i]] for i in curved], batched=batched)
            res: list[Tensor | None] = [None] * len(ws)
            for k, t in zip(blocks, parts, strict=True):
                res[k] = t
            return tuple(
                torch.zeros_like(w) if t is None else t for w, t in zip(ws, res, strict=True)
            )

        return hl

    def _rop_graph(self, outputs: Tensor, go: Tensor) -> Sequence[Tensor | None]:
        """:math:`J^\\top \\partial f/\\partial o` with a graph, linear in ``go``."""
        return _rop_setup([outputs], self.params, [go])

    def loss_hessian(self, w: Tensor | Sequence[Tensor]) -> Tensor | tuple[Tensor, ...]:
        """:math:`H_\\ell w` for ``w`` shaped like ``outputs`` (or with a leading batch dim)."""
        return self._hl(w)

    def matvec(self, v: Tensor) -> Tensor:
        if self._zero:
            return torch.zeros_like(v)
        J = self.jacobian
        return J.vjp(self.loss_hessian(J.jvp(v)))

    def diagonal(
        self,
        *,
        num_probes: int | None = None,
        generator: torch.Generator | None = None,
        max_entries: int = 2**20,
    ) -> Tensor:
        r""":math:`\mathrm{diag}(G) = \mathrm{diag}(J^\top H_\ell J)`, exact or estimated.

        Probes :math:`u` live in the *outputs'* space:
        :math:`\mathrm{diag}(G) = \mathbb{E}[(J^\top u) \odot (J^\top H_\ell u)]` for any
        :math:`u` with :math:`\mathbb{E}[uu^\top] = I`. Exact (``num_probes=None``) with the
        :math:`M` unit vectors of the outputs (:math:`M` entries in all, batched in chunks of
        at most ``max_entries`` :math:`/ n` rows); else the mean over ``num_probes``
        Rademacher :math:`u`, unbiased but not always :math:`\ge 0`. Either way each term
        transforms as :math:`G` does under a rescaling of the parameters
        (:math:`\theta_i \to s_i\theta_i` multiplies entry :math:`i` by :math:`1/s_i^2`
        exactly, probe by probe), which probes in the parameters' space (Hutchinson's
        :math:`v \odot Gv`) do only on average. Cost: two batched backward passes per chunk
        or per set of probes.

        Args:
            num_probes: Rademacher probes, or ``None`` for the exact diagonal.
            generator: For the probes.
            max_entries: Bound on the entries of one chunk's ``(rows, n)`` Jacobian block.

        Returns:
            Tensor: Flat, one entry per parameter entry.

        Raises:
            ValueError: If ``num_probes < 1`` or ``max_entries < 1``.

        Example:
            >>> X = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
            >>> w = torch.zeros(2, requires_grad=True)
            >>> out = X @ w
            >>> GGNProduct(0.5 * (out**2).sum(), out, [w]).diagonal()  # diag(XᵀX)
            tensor([2., 4.])
        """
        if num_probes is not None:
            check_int("num_probes", num_probes, low=1)
        check_int("max_entries", max_entries, low=1)
        J = self.jacobian
        n = self.layout.numel
        blocks = J._all
        like = blocks[J._live[0]]
        if self._zero:
            return like.new_zeros(n)
        sizes = [o.numel() for o in blocks]

        def shaped(U: Tensor) -> Tensor | tuple[Tensor, ...]:
            """``(k, M)`` rows as outputs-shaped blocks with a leading ``k``."""
            parts = [
                u.reshape(U.shape[0], *o.shape)
                for u, o in zip(U.split(sizes, dim=1), blocks, strict=True)
            ]
            return tuple(parts) if J.is_sequence else parts[0]

        def term(U: Tensor) -> Tensor:
            u = shaped(U)
            return (J.batched_vjp(u) * J.batched_vjp(self.loss_hessian(u))).sum(0)

        total = sum(sizes)
        if num_probes is not None:
            signs = torch.randint(
                0, 2, (num_probes, total), generator=generator, device=like.device
            )
            return term(signs.to(like.dtype) * 2 - 1) / num_probes
        rows = max(1, min(total, max_entries // max(n, 1)))
        out = like.new_zeros(n)
        for start in range(0, total, rows):
            k = min(rows, total - start)
            U = like.new_zeros(k, total)
            U[torch.arange(k), torch.arange(start, start + k)] = 1.0
            out += term(U)
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        if self._zero:
            return torch.zeros_like(V)
        J = self.jacobian
        return J.batched_vjp(self.loss_hessian(J.batched_jvp(V)))


class StructurallyDampedGGN(GGNProduct):
    r"""Gauss-Newton plus structural damping, :math:`(G + w\,J_h^\top J_h)v`, in one pass.

    Structural damping (Martens & Sutskever 2011, §3.3) penalises changes of the hidden-state
    trajectory :math:`h(\theta)` of a recurrent net: a Gauss-Newton term of the squared distance
    :math:`\tfrac{w}{2}\|h(\theta + p) - h(\theta)\|^2`. Both Jacobians come from one graph:
    the set-up backward pass differentiates ``(outputs, hidden)`` against
    :math:`(\partial f/\partial o, u_h)` with a zero dummy :math:`u_h`, so one double-backward
    pass gives :math:`J_o v` and :math:`J_h v` together and one backward pass applies both
    transposes: a product costs about what a plain Gauss-Newton product costs.

    Args:
        loss: Scalar loss computed from ``outputs``.
        outputs: The model outputs.
        hidden: The hidden states to keep steady (any shape), with a graph to ``params``.
        params: The parameters.
        weight: :math:`w \ge 0`; the optimizer uses :math:`\lambda\mu/N` (:math:`N` = examples).
        loss_hessian: As :class:`GGNProduct`'s (the optimizer passes ``'absolute'``).

    Raises:
        TypeError: If ``outputs`` is not one tensor or ``weight`` is not a real number.
        ValueError: If ``hidden`` has no graph, ``weight`` is negative or NaN, or as
            :class:`GGNProduct`.

    Example:
        >>> W = torch.tensor([[0.5]], requires_grad=True)
        >>> h = torch.tanh(torch.ones(3, 1) @ W.T)
        >>> out = 2 * h
        >>> P = StructurallyDampedGGN(0.5 * (out**2).sum(), out, h, [W], weight=1.0)
        >>> d = float(1 - torch.tanh(torch.tensor(0.5)) ** 2)  # dh/dW per example
        >>> bool(torch.isclose(P(torch.ones(1)), torch.tensor(3 * d * d * (4 + 1.0))))
        True
    """

    @_outside_inference_mode
    def __init__(
        self,
        loss: Tensor,
        outputs: Tensor,
        hidden: Tensor,
        params: Sequence[Tensor],
        *,
        weight: float,
        loss_hessian: str = "exact",
    ) -> None:
        if not isinstance(outputs, Tensor):
            # the joint (outputs, hidden) graph below is built for one outputs tensor
            raise TypeError(
                "`outputs` must be one tensor for StructurallyDampedGGN, got "
                f"{type(outputs).__name__}; residual blocks (a sequence) are GGNProduct's."
            )
        if not isinstance(hidden, Tensor) or not hidden.requires_grad:
            raise ValueError("`hidden` must be a tensor with an autograd graph to the parameters.")
        if isinstance(weight, bool) or not isinstance(weight, (numbers.Real, Tensor)):
            raise TypeError(f"`weight` must be a real number, got {type(weight).__name__}.")
        if not weight >= 0:
            raise ValueError(f"`weight` must be >= 0, got {weight!r}.")
        self.hidden, self.weight = hidden, float(weight)
        # builds the joint graph via _rop_graph
        super().__init__(loss, outputs, params, loss_hessian=loss_hessian)

    def _rop_graph(self, outputs: Tensor, go: Tensor) -> Sequence[Tensor | None]:
        # One set-up pass for both Jacobians: J_o^T go + J_h^T u_h with a zero dummy u_h is the
        # gradient's value and linear in (go, u_h).
        u_h = torch.zeros_like(self.hidden, requires_grad=True)
        jt = _rop_setup([outputs, self.hidden], self.params, [go, u_h])
        self._us = [go, u_h]
        self._idx = [i for i, t in enumerate(jt) if t is not None and t.requires_grad]
        self._jt = [torch.autograd.graph.get_gradient_edge(jt[i]) for i in self._idx]
        return jt

    def _jvps(self, v: Tensor, batched: bool) -> tuple[Tensor, Tensor]:
        vs = _batched_split(self.layout, v) if batched else self.layout.split(v)
        jo, jh = _grad(self._jt, self._us, [vs[i] for i in self._idx], batched=batched)
        lead = (v.shape[0],) if batched else ()
        jo = self.outputs.new_zeros(*lead, *self.outputs.shape) if jo is None else jo
        jh = self.hidden.new_zeros(*lead, *self.hidden.shape) if jh is None else jh
        return jo, jh

    def matvec(self, v: Tensor) -> Tensor:
        if self._zero:
            return torch.zeros_like(v)
        jo, jh = self._jvps(v, batched=False)
        return self.layout.cat(
            _grad(
                [self.outputs, self.hidden], self.params, [self.loss_hessian(jo), jh * self.weight]
            )
        )

    def _matmat(self, V: Tensor) -> Tensor:
        if self._zero:
            return torch.zeros_like(V)
        jo, jh = self._jvps(V, batched=True)
        out = _grad(
            [self.outputs, self.hidden],
            self.params,
            [self.loss_hessian(jo), jh * self.weight],
            batched=True,
        )
        return _batched_cat(self.layout, out, V.shape[0])

    def hidden_energy(self, X: Tensor) -> Tensor:
        r""":math:`\|J_h x\|^2` for each row ``x`` of ``X`` (``(k, n)``); a batched pass."""
        if self._zero:
            return X.new_zeros(X.shape[0])
        _, jh = self._jvps(X, batched=True)
        return jh.reshape(X.shape[0], -1).square().sum(1)


class FisherProduct(GGNProduct):
    r"""Empirical Fisher products :math:`Fv = \tfrac1N \sum_i g_i g_i^\top v` (mean reduction).

    With :math:`\hat g_i = \partial f/\partial o_i` the loss gradient for example :math:`i`
    (examples along dimension 0 of ``outputs``) and :math:`g_i = J_i^\top \hat g_i / c`
    (:math:`c = 1/N` for ``'mean'``, :math:`1` for ``'sum'``), the product is
    :math:`Fv = \tfrac{1}{c}\, J^\top\big(\hat g_i\,\langle \hat g_i, (Jv)_i\rangle\big)_i`,
    i.e. a Gauss-Newton product with a rank-one-per-example "loss Hessian". No per-example
    gradient is materialised. For ``'sum'`` the :math:`1/N` is dropped:
    :math:`F = \sum_i g_i g_i^\top`.

    :math:`N` is the number of rows of ``outputs``, all of them examples: a loss that averages
    over a subset of the rows (a node-classification mask, ``cross_entropy(o[mask],
    y[mask])``, or ``ignore_index`` targets) gets :math:`g_i = (N/M)\,\nabla\ell_i` on its
    :math:`M` counted rows and 0 elsewhere, so :math:`F` is :math:`N/M` times the
    :math:`\tfrac1M \sum_i \nabla\ell_i\nabla\ell_i^\top` of those rows (4× for 60 of 240
    nodes; ``experiments/README.md``, "unseen7"). For the latter, compute the loss from the
    counted rows and pass them: ``om = o[mask]``, ``loss = cross_entropy(om, y[mask])``,
    ``FisherProduct(loss, om, params)``.

    Args:
        loss: Scalar loss, the mean (or sum) of per-example losses over dim 0 of ``outputs``.
        outputs: The model outputs, examples along dimension 0.
        params: The parameters.
        reduction: ``'mean'`` (PyTorch losses' default) or ``'sum'``: how ``loss`` combines
            the per-example losses.

    Raises:
        ValueError: For a bad ``reduction`` or as :class:`GGNProduct`.
    """

    @_outside_inference_mode
    def __init__(
        self, loss: Tensor, outputs: Tensor, params: Sequence[Tensor], *, reduction: str = "mean"
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Unknown `reduction` {reduction!r}; expected one of 'mean', 'sum'.")
        self.reduction = reduction  # read by _loss_hessian_map during the set-up
        super().__init__(loss, outputs, params)

    def _loss_hessian_map(
        self,
        loss: Tensor,
        outputs: Tensor | Sequence[Tensor],
        gos: list[Tensor],
        blocks: list[int],
    ) -> Callable:
        """The rank-one-per-example map ``w -> ĝ ⟨ĝ, w⟩ / c`` in place of the loss Hessian."""
        n = outputs.shape[0] if outputs.dim() > 0 else 1
        scale = float(n) if self.reduction == "mean" else 1.0
        G = self.output_grad

        def fisher(w: Tensor) -> Tensor:
            ex_dims = tuple(range(w.dim() - G.dim() + 1, w.dim()))
            # complex outputs: <ĝ, w> is the real inner product of C as R^2, Re(conj(ĝ) w)
            # (torch's gradient of a real loss is ĝ = ∂L/∂Re o + i ∂L/∂Im o)
            Gw = (G.conj() * w).real if G.is_complex() else G * w
            s = Gw.sum(ex_dims, keepdim=True) if ex_dims else Gw
            return G * s * scale

        return fisher


# --------------------------------------------------------------------------------------------
# Monte-Carlo Fisher
# --------------------------------------------------------------------------------------------
#: The losses :class:`MCFisherProduct` can sample labels for (error messages list them).
MC_FISHER_LOSSES = (
    "nn.CrossEntropyLoss (class-index targets, classes along dimension 1 of the outputs; no "
    "`weight`, no `label_smoothing`), nn.MSELoss and nn.BCEWithLogitsLoss (no `weight`, no "
    "`pos_weight`), or their torch.nn.functional forms, with reduction 'mean' or 'sum'"
)


class _MCDraw(NamedTuple):
    """One draw of :class:`MCFisherProduct`'s labels (``M`` samples)."""

    #: :math:`\tilde y_m`, ``(M, *targets.shape)``: class indices, or float targets.
    targets: Tensor
    #: :math:`s_m`, ``(M, *outputs.shape)``: the unit-scaled loss's output gradient at
    #: :math:`\tilde y_m`, zero on rows whose target is ``ignore_index``.
    grads: Tensor
    #: :math:`c`, the loss's normalisation (its constant factor over what a mean divides by).
    scale: float | Tensor


def _draw(
    sample: Callable[..., Tensor], shape: tuple, generator: torch.Generator | None, like: Tensor
) -> Tensor:
    """``sample(shape)`` (``torch.rand``/``torch.randn``) in ``like``'s dtype on ``like``'s
    device, drawn on the generator's device (so a CPU generator draws the same numbers for a
    CUDA model)."""
    device = like.device if generator is None else generator.device
    return sample(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def _sample_known(
    node: torch.autograd.graph.Node,
    outputs: Tensor,
    factor: float,
    mc_samples: int,
    generator: torch.Generator | None,
) -> _MCDraw | None:
    """Sample the labels of a loss :func:`_closed_form` recognises; ``None`` for others."""
    name, nxt, o = type(node).__name__, node.next_functions, outputs.detach()
    reduction = getattr(node, "_saved_reduction", None)
    if reduction not in (_MEAN, _SUM) or not _targets_free(node, outputs):
        return None
    entries = o.numel() if reduction == _MEAN else 1
    shape = (mc_samples, *o.shape)
    if name == "MseLossBackward0" and nxt[0][0] is outputs.grad_fn:
        # sum (o - y)^2 is the negative log-likelihood of y ~ N(o, I/2) up to a constant:
        # y~ = o + eps/sqrt(2), s = 2(o - y~) = -sqrt(2) eps, E[s s^T] = 2I, its Hessian.
        eps = _draw(torch.randn, shape, generator, o)
        return _MCDraw(o + eps * math.sqrt(0.5), eps * -math.sqrt(2.0), factor / entries)
    if name == "BinaryCrossEntropyWithLogitsBackward0" and nxt[0][0] is outputs.grad_fn:
        if node._saved_weight is not None or node._saved_pos_weight is not None:
            return None
        prob = torch.sigmoid(o)
        y = (_draw(torch.rand, shape, generator, o) < prob).to(o.dtype)  # y~ ~ Bernoulli
        return _MCDraw(y, prob - y, factor / entries)  # E[s^2] = sigma (1 - sigma)
    lsm = nxt[0][0] if name in ("NllLossBackward0", "NllLoss2DBackward0") else None
    if lsm is not None and type(lsm).__name__ == "ViewBackward0":
        lsm = lsm.next_functions[0][0]  # (N, C, d1, ...) outputs other than 4-D: viewed as 4-D
    if type(lsm).__name__ == "LogSoftmaxBackward0":
        if lsm.next_functions[0][0] is not outputs.grad_fn or node._saved_weight is not None:
            return None
        p = lsm._saved_result.detach().exp()
        if o.dim() < 2 or _class_dim(lsm, o.dim()) != 1 or not _same_rows(node, p):
            return None
        num_classes = o.shape[1]
        target = node._saved_target.reshape(o.shape[0], *o.shape[2:])
        # Inverse CDF, one uniform per example (and position): y~ = #{c : P(y <= c) < u}.
        u = _draw(torch.rand, (mc_samples, o.shape[0], *o.shape[2:]), generator, o)
        cdf = p.cumsum(1).movedim(1, -1).contiguous()  # (N, ..., C)
        y = torch.searchsorted(cdf, u.movedim(0, -1).contiguous()).clamp_(max=num_classes - 1)
        y = y.movedim(-1, 0)  # (M, N, ...)
        grads = p.unsqueeze(0).repeat(mc_samples, *([1] * p.dim()))
        grads.scatter_add_(
            2, y.unsqueeze(2), grads.new_full((1,), -1.0).expand(y.unsqueeze(2).shape)
        )
        keep = (target != node._saved_ignore_index).unsqueeze(1).to(p.dtype)
        grads.mul_(keep)  # s = p - e_y~: E[s s^T] = diag(p) - p p^T per example and position
        denom = node._saved_total_weight if reduction == _MEAN else 1.0  # a tensor: no sync
        return _MCDraw(y, grads, factor / denom)
    return None


def _sample_output_grads(
    loss: Tensor, outputs: Tensor, mc_samples: int, generator: torch.Generator | None
) -> _MCDraw:
    """Labels drawn from the model's predictive distribution and their output gradients."""
    peeled = _loss_node(loss, outputs)
    if peeled is not None:
        draw = _sample_known(peeled[0], outputs, peeled[1], mc_samples, generator)
        if draw is not None:
            return draw
    node = loss.grad_fn if peeled is None else peeled[0]
    found = type(node).__name__
    if _compiled_by_aot(getattr(node, "_forward_cls", None)):
        # a torch.compile'd loss hides its kind and reduction in one CompiledFunction node;
        # before, the refusal below named only the node ("unseen19", "compile19")
        raise ValueError(
            "The Monte-Carlo Fisher samples labels from the distribution the loss is the "
            "negative log-likelihood of, and reads which loss that is from its autograd node; "
            f"the loss is torch.compile'd ({found}: aot_autograd's CompiledFunction), which "
            f"hides the loss's kind and reduction. It supports {MC_FISHER_LOSSES}: call the "
            "uncompiled loss (a compiled nn.Module keeps it as `._orig_mod`, a compiled "
            "function as `._torchdynamo_orig_callable`) or compile it with backend='eager', "
            "which keeps torch's own loss node."
        )
    raise ValueError(
        "The Monte-Carlo Fisher samples labels from the distribution the loss is the negative "
        f"log-likelihood of; it supports {MC_FISHER_LOSSES}, computed from `outputs` directly "
        f"(constant factors allowed). Got a loss whose autograd node is {found}. For other "
        "losses use GGNProduct/GGNLinearOperator (the matrix it estimates) or the empirical "
        "Fisher (FisherProduct/FisherLinearOperator)."
    )


class MCFisherProduct(GGNProduct):
    r"""Monte-Carlo Fisher products :math:`\hat F v = J^\top \hat H_\ell J v`, labels sampled once.

    The Fisher of a loss that is a negative log-likelihood :math:`\ell_u(o, y) = -\log p(y|o)`
    is :math:`J^\top \mathbb{E}_{\tilde y \sim p(\cdot|o)}[s s^\top] J` with
    :math:`s = \partial \ell_u(o, \tilde y)/\partial o`. For softmax cross-entropy, squared error
    and BCE-with-logits (exponential families with their canonical link)
    :math:`\mathbb{E}[s s^\top] = \nabla^2_o \ell_u`, so the Fisher *is* the generalized
    Gauss-Newton matrix :math:`G`. This product replaces the expectation by ``mc_samples``
    draws :math:`\tilde y_1, \dots, \tilde y_M`, one per example (and position) each:

    .. math::
        \hat H_\ell = \frac{c}{M} \sum_{m=1}^M \operatorname{blockdiag}_i
        \big(s_{m,i}\, s_{m,i}^\top\big), \qquad \mathbb{E}[\hat F] = G,

    with :math:`i` the examples along dimension 0 of ``outputs`` (a rank-:math:`M` block per
    example) and :math:`c` the loss's normalisation: :math:`1/m` for ``'mean'`` (:math:`m` the
    number of entries it averages; for cross-entropy the targets that are not ``ignore_index``),
    :math:`1` for ``'sum'``, times any constant factor on the loss. As for the closed-form loss
    Hessians of :func:`loss_hessian_product`:

    * cross-entropy: :math:`\tilde y \sim \mathrm{Categorical}(\mathrm{softmax}(o))`,
      :math:`s = \mathrm{softmax}(o) - e_{\tilde y}`; rows whose target is ``ignore_index``
      have :math:`s = 0`;
    * MSE: :math:`\sum (o - y)^2` is the negative log-likelihood of :math:`y \sim \mathcal
      N(o, \tfrac12 I)`, so :math:`\tilde y = o + \varepsilon/\sqrt2`, :math:`s = 2(o - \tilde
      y) = -\sqrt2\,\varepsilon`, :math:`\varepsilon \sim \mathcal N(0, I)`;
    * BCE-with-logits: :math:`\tilde y \sim \mathrm{Bernoulli}(\sigma(o))`,
      :math:`s = \sigma(o) - \tilde y`.

    The labels are drawn **once**, when the product is built: every product of one object is
    the same matrix, as ``cg`` and ``eigsh`` need (drawing per product would hand them another
    matrix at every iteration). Draw again by building a new product. Each product costs about
    what a :class:`GGNProduct` costs (a :math:`Jv`, the rank-:math:`M` middle matrix, a
    :math:`J^\top u`; 0.9-1.1x on 10-1000-class MLPs, ``experiments/README.md``, "mcfisher"):
    hessfree's Gauss-Newton product needs no backward pass per output either, so sampling
    buys no speed here; it gives the matrix curvlinops' ``FisherMCLinearOperator`` and
    BackPACK's MC-sampled GGN compute, and K-FAC's usual one.
    :attr:`gradient` is the gradient at the *true* targets.

    Args:
        loss: The loss of ``outputs``: cross-entropy (class indices), MSE or BCE-with-logits
            (see :data:`MC_FISHER_LOSSES`), possibly times a constant.
        outputs: The model outputs (one tensor), examples along dimension 0; for
            cross-entropy, classes along dimension 1.
        params: The parameters.
        mc_samples: :math:`M \ge 1`, the labels drawn per example.
        generator: The ``torch.Generator`` to draw from (its device may differ from the
            outputs'; the draws then move); default: torch's default generator of the outputs'
            device.

    Raises:
        TypeError: If ``mc_samples`` is not an int (``True`` and ``1.5`` included),
            ``generator`` is not a ``torch.Generator`` or ``outputs`` is not a tensor.
        ValueError: If ``mc_samples < 1``, the loss is not one of the supported ones (with
            class weights, label smoothing, probability targets, ``pos_weight``, a target
            computed from the outputs, or on a reshape of the outputs; a term added that
            does not depend on the outputs, such as a weight penalty, is accepted: only the
            likelihood part is sampled, as the GGN's :math:`H_\ell` holds only it), or as
            :class:`GGNProduct`.

    Example:
        >>> w = torch.ones(1, requires_grad=True)
        >>> out = torch.tensor([[1.0], [2.0]]) * w
        >>> loss = torch.nn.functional.mse_loss(out, torch.zeros(2, 1), reduction="sum")
        >>> F = MCFisherProduct(loss, out, [w], mc_samples=20000,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> v = torch.ones(1)
        >>> torch.equal(F(v), F(v)), round(float(F(v)) / 10, 1)  # G = 2 (1 + 4) = 10
        (True, 1.0)

    References:
        Martens (2020), New insights and perspectives on the natural gradient method, JMLR
        (the Fisher equals the GGN for these losses).
        Martens & Grosse (2015), Optimizing neural networks with Kronecker-factored
        approximate curvature, ICML (targets sampled from the model's distribution).
    """

    @_outside_inference_mode
    def __init__(
        self,
        loss: Tensor,
        outputs: Tensor,
        params: Sequence[Tensor],
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        self.mc_samples = check_int("mc_samples", mc_samples, low=1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator or None, got {type(generator).__name__}."
            )
        if not isinstance(outputs, Tensor):
            raise TypeError(
                "`outputs` must be one tensor with examples along dimension 0 for the "
                f"Monte-Carlo Fisher, got {type(outputs).__name__}."
            )
        check_scalar_loss("loss", loss)
        # Before the set-up's backward passes, so an unsupported loss fails at once; on `loss`
        # as given (check_scalar_loss's reshape would put a view node above the loss's own).
        self._draw = _sample_output_grads(loss, outputs, self.mc_samples, generator)
        #: :math:`\tilde y_m`, ``(M, *targets.shape)``: the sampled labels (class indices for
        #: cross-entropy; drawn for ignored rows too, which the matrix leaves out).
        self.sampled_targets = self._draw.targets
        super().__init__(loss, outputs, params)

    def _loss_hessian_map(
        self,
        loss: Tensor,
        outputs: Tensor | Sequence[Tensor],
        gos: list[Tensor],
        blocks: list[int],
    ) -> Callable:
        """The sampled middle matrix ``w -> c/M sum_m s_m <s_m, w>_i`` in place of ``H_ℓ``."""
        rows = outputs.shape[0] if outputs.dim() else 1
        S = self._draw.grads.reshape(self.mc_samples, rows, -1)
        scale = self._draw.scale / self.mc_samples

        def mc_fisher(w: Tensor) -> Tensor:
            W = w.reshape(-1, rows, S.shape[2])  # (k, rows, entries per row)
            a = torch.einsum("mnr,knr->kmn", S, W)  # <s_{m,i}, w_i>
            return torch.einsum("mnr,kmn->knr", S, a).reshape(w.shape).mul_(scale)

        return mc_fisher
