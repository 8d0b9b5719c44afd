r"""A tanh recurrence as one autograd node, with its backward and the backward's derivative
written out, so that gradients and curvature products do not run one engine node per op.

Notation: :math:`U = (u_1, \dots, u_T)` the input projections, :math:`W` the hidden-to-hidden
weights, :math:`h_t = \tanh(u_t + W h_{t-1})` with :math:`h_0 = 0` (row vectors below:
:math:`h_{t-1} W^\top`), :math:`H = (h_1, \dots, h_T)` and :math:`D_t = 1 - h_t^2`.

* **Forward** (:func:`tanh_recurrence`): the loop above, the same ops as an explicit loop of
  ``torch.tanh(u + F.linear(h, W))``, so the values are bit for bit those.
* **Backward** (BPTT) for a cotangent :math:`G` of :math:`H`:
  :math:`\delta_T = D_T \odot G_T`, :math:`\delta_t = D_t \odot (G_t + \delta_{t+1} W)`;
  :math:`\bar U = \delta`, :math:`\bar W = \sum_{t \ge 2} \delta_t^\top h_{t-1}`.
* **The backward's derivative in** :math:`G` (what a Gauss-Newton product's R-op pass
  differentiates): the backward is linear in :math:`G`, and its adjoint for cotangents
  :math:`(A, B)` of :math:`(\bar U, \bar W)` is the forward tangent recursion
  :math:`e_t = D_t \odot (A_t + h_{t-1} B^\top + e_{t-1} W^\top)`, :math:`e_0 = 0`: the
  Jacobian-vector product :math:`\partial H \cdot (A, B)` (also the forward-mode rule).
* **Its derivatives in** :math:`W` **and** :math:`H` (second-order terms, which Hessian
  products need and the Gauss-Newton R-op does not): taken by autograd through the same BPTT
  written in differentiable ops, and only when the backward pass asks for them (the engine is
  asked whether it will run the nodes above :math:`W` and :math:`H`).

Per step, autograd's own graph of the loop runs about five nodes in each pass (``tanh``'s
backward, two ``mm``, two accumulating ``add``); here a step is two fused ``addmm`` and one
``mul`` inside one node, written into one ``(N, T, H)`` buffer (no final ``stack``) where no
graph is recorded and no ``vmap`` runs. :math:`D` is computed once per graph, on its first
backward, and shared by every product. Gradients equal autograd's up to the order of float sums
(:math:`\bar W` accumulates in one ``addmm`` chain). Under ``torch.func`` transforms the
create-graph backward is plain autograd through the BPTT ops (their ``vmap`` does not run a
Function nested in a backward): exact, without the written-out R-op.

References:
    Pearlmutter (1994), Fast exact multiplication by the Hessian, Neural Computation (the R-op).
    Martens & Sutskever (2011), Learning recurrent neural networks with Hessian-free
    optimization, ICML.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["tanh_recurrence"]


def tanh_recurrence(U: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    r"""Every state :math:`H = (h_1, \dots, h_T)`, ``(N, T, H)``, of
    :math:`h_t = \tanh(u_t + h_{t-1} W^\top)`, :math:`h_0 = 0`, for ``U`` of shape ``(N, T, H)``,
    and the last state :math:`h_T` (a copy of ``H[:, -1]``, so that a readout of it costs no
    zero-filled ``(N, T, H)`` gradient).

    Differentiable to any order, in reverse and forward mode, and under ``vmap``; see the
    module docstring for the rules.

    Example:
        >>> U, W = torch.zeros(2, 3, 4), torch.eye(4)
        >>> H, last = tanh_recurrence(U, W)
        >>> tuple(H.shape), tuple(last.shape)
        ((2, 3, 4), (2, 4))
    """
    return _Recurrence.apply(U, W)


def _forward(U: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    us = U.unbind(1)
    h = torch.tanh(us[0])
    hs = [h]
    for u in us[1:]:
        h = torch.tanh(u + torch.nn.functional.linear(h, W))
        hs.append(h)
    return torch.stack(hs, 1), h.clone()


def _steps(like: Tensor, num_steps: int, *inputs: Tensor | None) -> Tensor | None:
    """An ``(N, T, H)`` buffer (``like`` a step) that a loop writes its steps into (``out=``),
    saving the final ``stack``; None where ``out=`` cannot be used: a graph is recorded, or
    one of ``inputs`` is a ``vmap`` wrapper."""
    if torch.is_grad_enabled() or any(_batched(t) for t in inputs):
        return None
    return like.new_empty(like.shape[0], num_steps, *like.shape[1:])


def _slopes(H: Tensor) -> Tensor:
    """:math:`D = 1 - H^2` rounded once to ``H``'s dtype, on any CPU. Below float64 it is
    formed in float64 (:math:`h^2` of a float32 ``h`` is exact there, and so is
    :math:`1 - h^2` for |h| ≥ 1/8), then rounded: ``addcmul`` alone fuses into one rounding
    only in torch's vectorised kernels (without AVX2 it rounds :math:`h^2` first, relative
    error up to ~1e-4 on saturated units, |h| > 0.99, instead of 6e-8). float64 ``H`` and MPS
    (no float64) take ``addcmul``."""
    if H.dtype == torch.float64 or H.device.type == "mps":
        return torch.addcmul(torch.ones_like(H), H, H, value=-1)
    wide = H.double()
    return torch.addcmul(torch.ones_like(wide), wide, wide, value=-1).to(H.dtype)


def _batched(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``vmap`` wrapper (torch.func's, or the one behind
    ``is_grads_batched``): their batching rules have no ``out=``."""
    if t is None:
        return False
    f = torch._C._functorch
    try:
        return bool(f.is_functorch_wrapped_tensor(t) or f.is_legacy_batchedtensor(t))
    except AttributeError:  # a torch without these queries: take the generic, exact paths
        return True


def _backprop(
    G: Tensor | None, g: Tensor | None, W: Tensor, H: Tensor, D: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """BPTT: ``(dU, dW)`` for the cotangents ``G`` of ``H`` and ``g`` of :math:`h_T` (None:
    zero) in differentiable torch ops; ``D`` = 1 - H² when already at hand."""
    D = _slopes(H) if D is None else D
    Ds, Hs = D.unbind(1), H.unbind(1)
    T = len(Ds)
    Gs = [None] * T if G is None else G.unbind(1)
    last = [x for x in (Gs[-1], g) if x is not None]
    if not last:
        last = [torch.zeros_like(Ds[-1])]
    buf = _steps(Ds[-1], T, G, g)
    d = torch.mul(last[0] if len(last) == 1 else last[0] + last[1], Ds[-1], out=_at(buf, T - 1))
    deltas, dW = [d], torch.zeros_like(W)
    for t in range(T - 1, 0, -1):
        dW = torch.addmm(dW, d.t(), Hs[t - 1])  # Σ_t δ_tᵀ h_{t-1}
        q = d @ W if Gs[t - 1] is None else torch.addmm(Gs[t - 1], d, W)
        d = torch.mul(q, Ds[t - 1], out=_at(buf, t - 1))
        deltas.append(d)
    if buf is not None:
        return buf, dW
    deltas.reverse()
    return torch.stack(deltas, 1), dW


def _at(buf: Tensor | None, t: int) -> Tensor | None:
    return None if buf is None else buf[:, t]


def _tangents(
    W: Tensor, H: Tensor, dU: Tensor | None, dW: Tensor | None, D: Tensor | None = None
) -> Tensor:
    """The forward tangent of ``H`` for tangents ``dU`` of ``U`` and ``dW`` of ``W``."""
    D = _slopes(H) if D is None else D
    Ds, Hs = D.unbind(1), H.unbind(1)
    T = len(Ds)
    dUs = [None] * T if dU is None else dU.unbind(1)
    buf = _steps(Ds[0], T, dU, dW)
    if dUs[0] is None:
        e = torch.zeros_like(Ds[0]) if buf is None else buf[:, 0].zero_()
    else:
        e = torch.mul(Ds[0], dUs[0], out=_at(buf, 0))
    es = [e]
    Wt, dWt = W.t(), None if dW is None else dW.t()
    for t in range(1, T):
        c = e @ Wt if dUs[t] is None else torch.addmm(dUs[t], e, Wt)
        if dWt is not None:
            c = torch.addmm(c, Hs[t - 1], dWt)
        e = torch.mul(c, Ds[t], out=_at(buf, t))
        es.append(e)
    return torch.stack(es, 1) if buf is None else buf


class _Recurrence(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(U: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
        return _forward(U, W)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Any) -> None:
        ctx.save_for_backward(inputs[1], output[0])
        ctx.save_for_forward(inputs[1], output[0])
        ctx.set_materialize_grads(False)  # an unused output gets no zero-filled gradient
        ctx.D = None  # tanh' at every step: _tanh_slopes

    @staticmethod
    def backward(ctx: Any, G: Tensor | None, g: Tensor | None) -> tuple[Tensor, Tensor]:
        W, H = ctx.saved_tensors
        if torch.is_grad_enabled() and any(_batched(t) for t in (G, g, H)):
            # under torch.func's transforms: autograd through the BPTT ops (a nested Function
            # in a backward does not run under their vmap)
            return _backprop(G, g, W, H)
        if torch.is_grad_enabled():  # create_graph: one node whose derivative is written out
            # W through a view, so that _Backprop can ask whether the engine needs its gradient
            return _Backprop.apply(G, g, W.view_as(W), H, _tanh_slopes(ctx, H))
        return _backprop(G, g, W, H, _tanh_slopes(ctx, H))

    @staticmethod
    def jvp(ctx: Any, dU: Tensor | None, dW: Tensor | None) -> tuple[Tensor, Tensor]:
        W, H = ctx.saved_tensors
        E = _tangents(W, H, dU, dW)
        return E, E[:, -1].clone()


def _tanh_slopes(ctx: Any, H: Tensor) -> Tensor:
    """:math:`D = 1 - H^2`, once per graph (on its first backward; every product of a graph
    reuses it), without a graph of its own: used only where no derivative in H is taken."""
    if ctx.D is None:
        with torch.no_grad():
            ctx.D = _slopes(H)
    return ctx.D


def _executes(edge: tuple[Any, int]) -> bool:
    node = edge[0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (RuntimeError, AttributeError):  # a leaf under autograd.grad, or an older torch
        return True


class _Backprop(torch.autograd.Function):
    """``(G, g, W, H, D) -> (dU, dW)``: :func:`_backprop`; ``D`` (1 - H², no graph) a constant."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        G: Tensor | None, g: Tensor | None, W: Tensor, H: Tensor, D: Tensor
    ) -> tuple[Tensor, Tensor]:
        return _backprop(G, g, W, H, D)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        G, g, W, H, D = inputs
        ctx.has = (G is not None, g is not None)
        ctx.save_for_backward(G, g, W, H, D)

    @staticmethod
    def backward(ctx: Any, A: Tensor, B: Tensor) -> tuple[Tensor | None, ...]:
        G, g, W, H, D = ctx.saved_tensors
        edges = ctx.next_functions  # one per input: G, g, W, H, D
        create = torch.is_grad_enabled()
        if not (_executes(edges[2]) or _executes(edges[3])):
            # the Gauss-Newton R-op: d/dG only, the forward tangent recursion (module
            # docstring); D from H where the result gets a graph (it may be differentiated in H)
            E = _tangents(W, H, A, B, None if create else D)
            return (
                E if ctx.has[0] else None,
                E[:, -1] if ctx.has[1] else None,
                None,
                None,
                None,
            )
        # second-order terms (Hessian products): autograd through the BPTT ops themselves
        with torch.enable_grad():
            ins = [
                None
                if t is None
                else t
                if create and t.requires_grad
                else t.detach().requires_grad_()
                for t in (G, g, W, H)
            ]
            outs = [(o, c) for o, c in zip(_backprop(*ins), (A, B), strict=True) if o.requires_grad]
            live = [t for t in ins if t is not None]
            grads = iter(
                torch.autograd.grad(
                    [o for o, _ in outs],
                    live,
                    [c for _, c in outs],
                    create_graph=create,
                    allow_unused=True,
                    materialize_grads=True,
                )
            )
        return (*(None if t is None else next(grads) for t in ins), None)
