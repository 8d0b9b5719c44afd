"""Autograd ops whose backward builds a cheaper graph than torch's own, for curvature products.

HF's Jacobian-vector products differentiate a backward pass (``create_graph=True``). torch's
backward of a concatenation or stack takes each input's gradient with a slice or ``select``,
and differentiating one zero-fills a tensor the size of the whole result, once per input:
:math:`O(T^2)` work per product when a recurrent net joins its :math:`T` steps' states. The
ops here use one ``split`` instead, which is differentiated by one ``cat``: :math:`O(T)`.
Values and derivatives are torch's.

:func:`twice_differentiable_attention` picks, for the code run inside it, the one
scaled-dot-product-attention kernel whose backward is itself differentiable;
:func:`twice_differentiable_weight_norm` computes weight normalization with ops whose double
backward is right.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "cat_last",
    "fused_weight_norm_in",
    "twice_differentiable_attention",
    "twice_differentiable_weight_norm",
]


def cat_last(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.cat(tensors, -1)`` with a ``split`` backward (see the module docstring).

    ``torch.stack(states, 1)`` of ``T`` states ``(N, H)`` is
    ``cat_last(states).unflatten(-1, (T, H))``.

    Example:
        >>> a, b = torch.ones(2, 1), torch.zeros(2, 2)
        >>> cat_last([a, b]).tolist()
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    """
    return tensors[0] if len(tensors) == 1 else _CatLast.apply(*tensors)


class _CatLast(torch.autograd.Function):
    generate_vmap_rule = True  # batched products run this backward under vmap

    @staticmethod
    def forward(*tensors: Tensor) -> Tensor:
        return torch.cat(tensors, -1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.sizes = [t.shape[-1] for t in inputs]
        ctx.like = inputs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        return grad.split(ctx.sizes, -1)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> Tensor:
        parts = [
            torch.zeros_like(x) if t is None else t for x, t in zip(ctx.like, tangents, strict=True)
        ]
        return torch.cat(parts, -1)


@contextlib.contextmanager
def twice_differentiable_attention() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` (and so ``nn.MultiheadAttention`` with
    ``need_weights=False``, ``nn.TransformerEncoderLayer``) with its math kernel.

    Why: torch picks a fused kernel (flash attention, also on CPU) whose backward has no
    derivative, so every curvature product through it failed with "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". The math
    kernel computes the same function with differentiable ops. The choice is torch's
    process-wide setting, restored on exit; without ``torch.nn.attention.sdpa_kernel``
    (torch < 2.3) nothing changes.

    The "fast path" of ``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` is turned off
    too (``torch.backends.mha``, also process-wide and restored). torch takes it in eval mode
    when autograd is off, so HessianFree's evaluation-only calls (trial losses under
    ``no_grad``) ran another kernel than the graph-building call at θ, and an encoder given a
    right-padded ``src_key_padding_mask`` returns zeros at the padded positions there (nested
    tensors) where the graph-building call returns attention outputs: f(θ) and f(θ + p) came
    from two functions (a loss pooling over all positions: 12 of 15 steps failed their line
    search, "unseen10").
    """
    fastpath = _mha_fastpath()
    if fastpath is not None:
        torch.backends.mha.set_fastpath_enabled(False)
    try:
        if _sdpa_kernel is None:  # torch < 2.3
            yield
        else:
            with _sdpa_kernel(_SDPBackend.MATH):
                yield
    finally:
        if fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def _mha_fastpath() -> bool | None:
    """torch's setting for attention's fast path (``None``: this torch has no switch)."""
    mha = getattr(torch.backends, "mha", None)
    return None if mha is None else mha.get_fastpath_enabled()


try:  # resolved once: the context above wraps every closure call of a step
    from torch.nn.attention import SDPBackend as _SDPBackend
    from torch.nn.attention import sdpa_kernel as _sdpa_kernel
except ImportError:  # torch < 2.3
    _SDPBackend = _sdpa_kernel = None


def _composite_weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    r""":math:`w = g\,v / \lVert v \rVert` (the norm over every dimension but ``dim``; over
    all of ``v`` for ``dim=-1``): the formula torch's ``_weight_norm`` uses when it does not
    take its fused kernel."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


@contextlib.contextmanager
def twice_differentiable_weight_norm() -> Iterator[None]:
    r"""Run weight normalization (``nn.utils.parametrizations.weight_norm`` and the older
    ``nn.utils.weight_norm``) with composite ops whose double backward is right.

    Why: for ``dim=0`` (the default) or the last dimension torch computes
    :math:`w = g\,v/\lVert v\rVert` with a fused kernel (``_weight_norm_interface``) whose
    double backward is wrong (``torch.autograd.gradgradcheck`` fails for dims 0 and 1 of a
    matrix, torch 2.13 on CPU; ``dim=-1`` takes the composite path and passes), so every
    Hessian product through such a layer was silently off (first derivatives, and so
    Gauss-Newton products, were right). The values are torch's to rounding. ``torch._weight_norm``
    is swapped process-wide for the duration and restored on exit, as the attention kernel
    choice above is. HessianFree's closure calls, the operators' model calls and :func:`hvp`
    run inside it; a :class:`~hessfree.HessianProduct` of a loss computed outside it through
    the fused kernel is refused (:func:`fused_weight_norm_in`).

    Example:
        >>> layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 2))
        >>> x = torch.randn(4, 3)
        >>> with twice_differentiable_weight_norm():
        ...     loss = layer(x).square().sum()
        >>> fused_weight_norm_in(loss), fused_weight_norm_in(layer(x).square().sum())
        (False, True)
    """
    holders = [torch, sys.modules.get("torch.nn.utils.weight_norm")]  # the old API imported it
    saved = [(h, h._weight_norm) for h in holders if h is not None and hasattr(h, "_weight_norm")]
    for holder, _ in saved:
        holder._weight_norm = _composite_weight_norm
    try:
        yield
    finally:
        for holder, original in saved:
            holder._weight_norm = original


#: The autograd node of torch's fused weight-norm kernel, whose double backward is wrong.
_FUSED_WEIGHT_NORM = "WeightNormInterfaceBackward0"


def fused_weight_norm_in(root: Tensor) -> bool:
    """Whether ``root``'s autograd graph passes through torch's fused weight-norm kernel
    (:func:`twice_differentiable_weight_norm`): a walk over the graph's nodes, ~1 µs each."""
    stack = [root.grad_fn]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == _FUSED_WEIGHT_NORM:
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def batching_breaks() -> bool:
    """Whether autograd's batched backward fails for every graph now: under
    ``torch.autograd.set_detect_anomaly(True)`` torch checks each gradient for NaN with a
    ``.item()``, which vmap cannot batch ("Batching rule not implemented for aten::item").
    The products fell back to one backward pass per row anyway, each failed attempt first
    spending a backward pass and issuing anomaly mode's "Error detected in ..." warning with
    a traceback (7 of them for five operators' ``matmat`` and a ``hutchinson_trace``:
    experiments/README.md, "operators15"); a block then goes row by row from the start (the
    operators' numpy edge and :meth:`hessfree.curvature.CurvatureProduct.matmat`).
    """
    return torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled()
