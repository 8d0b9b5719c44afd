r"""The symmetric curvature operator over data, the base of the Hessian, GGN and Fisher ones.

:class:`CurvatureLinearOperator` is a :class:`scipy.sparse.linalg.LinearOperator` whose
products come from a *source* (:mod:`hessfree._product_sources`): the constructor's
``(model, loss_fn, data)``, or one product object (:meth:`~CurvatureLinearOperator.from_product`).
Both paths go through :meth:`~CurvatureLinearOperator._setup`, the one place the operator's
state is set. Notation (:math:`L`, :math:`w_b`) as in :mod:`hessfree.operators`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from ._checks import check_number
from ._numpy_edge import _IdentityOperator, _outside_inference_mode, _TorchLinearOperator
from ._product_sources import _DataProducts, _FixedProduct
from .curvature import CurvatureProduct


class CurvatureLinearOperator(_TorchLinearOperator):
    r"""A symmetric curvature matrix of a loss over data, as a SciPy ``LinearOperator``.

    The base of :class:`HessianLinearOperator`, :class:`GGNLinearOperator` and
    :class:`FisherLinearOperator` (see :mod:`hessfree.operators` for :math:`L`, the weights
    :math:`w_b` and the graph reuse). The operator is its own adjoint and transpose.

    Args:
        model: An ``nn.Module`` or a callable ``inputs -> outputs`` (a tensor, examples
            along dimension 0).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar, e.g. ``nn.MSELoss()`` or
            ``F.cross_entropy``.
        data: One ``(inputs, targets)`` batch (``inputs`` a tensor, or a tuple or dict of
            them for a model of several inputs when ``targets`` is a tensor), or a
            re-iterable of batches (a list, a ``DataLoader``; a generator is refused, and so
            are an iterable whose ``__iter__`` returns the same iterator every time, a
            ``DataLoader`` over such an ``IterableDataset``, one whose passes draw from one
            shared source, and a ``DataLoader`` that draws other examples on each pass, e.g.
            ``shuffle=True`` with ``drop_last=True``). Other than a list, a tuple or a
            ``DataLoader`` over a map-style ``Dataset``, ``data`` is read through once at
            construction to count its batches (no forward passes), and a product whose pass
            yields another count raises ``RuntimeError``.
            Tensors are moved to the parameters' device, also those inside tuples, lists,
            dicts, namedtuples and dataclasses of inputs or targets.
        params: The tensors to differentiate with respect to; default: the trainable
            parameters of ``model`` in ``model.parameters()`` order (required when ``model``
            is not an ``nn.Module``).
        reduction: How ``loss_fn`` reduces over examples, ``'mean'`` or ``'sum'``; read from
            ``loss_fn.reduction`` when it has one, else defaults to ``'mean'`` (with a
            warning, once, where the loss's autograd graph on the first batch is a sum over
            the examples, e.g. a hand-written ``.sum()``). It sets the batch weights
            :math:`w_b` (and the Fisher's scale).
        dtype: The dtype the operator presents to SciPy: ``None`` (the parameters' dtype) or
            ``numpy.float32``/``numpy.float64``. Products always run in the parameters' dtype.
        cache_graph: With one batch, build the first-order graph once and reuse it for every
            product (``False``: one forward pass per product, less memory held). Ignored for
            several batches, which always recompute per batch.
        progress: Show a tqdm progress bar over the batches of each product (needs tqdm).
        allow_training_mode: Accept Dropout/BatchNorm modules in training mode (BatchNorm
            then normalises each batch by its own statistics, and products leave the running
            statistics as they were; see :mod:`hessfree.operators`).
        process_group: Sum the products over the ranks of this ``torch.distributed`` group
            (default: the default group when ``torch.distributed`` is initialised), each rank
            holding its own shard of the data: the operator is then the curvature over the
            union of the shards, weighted by size for ``'mean'``. Every rank must call every
            product (SciPy's solvers do, when each rank runs the same solve).
        _product: Private: the fixed product of :meth:`from_product` (``model``, ``loss_fn``
            and ``data`` are then ``None`` and ignored).

    Raises:
        TypeError: For a ``model``, ``data``, ``params`` or ``dtype`` of the wrong type
            (complex ``params`` too: the operators are real), a
            ``data`` that can be iterated only once, a batch that is not an ``(inputs,
            targets)`` pair (a dict batch: the message shows a ``collate_fn``), or numpy
            targets.
        ValueError: If ``data`` is empty, a batch has zero rows, a ``DataLoader`` draws
            different examples on each pass (a random remainder dropped, a sampler with
            replacement or of a random subset), ``model`` fails on the
            inputs, ``loss_fn`` does not
            return a scalar, ``reduction`` is not ``'mean'``/``'sum'``, the model has
            stochastic modules in training mode, or its forward pass writes to its buffers
            (a train-mode ``spectral_norm``).
        RuntimeError: From a product or :meth:`gradient` of a cached graph, if ``params``
            changed in place since construction (build a new operator at the new parameters),
            if a pass over ``data`` yields another number of batches than at construction,
            or if a product's forward passes wrote to the model's buffers.
    """

    #: How the matrix scales with the loss: 1 (Hessian, GGN: linear), 2 (the Fisher: quadratic
    #: in the gradients), which sets how batches holding unequal shares of a mean combine.
    _share_power = 1
    #: Whether the products take the loss's second derivative (Hessian, GGN) or only its first
    #: (the Fishers), which decides where a once-differentiable Function is refused.
    _loss_twice = True

    def __init__(
        self,
        model: nn.Module | Callable[[Any], Tensor],
        loss_fn: Callable[[Tensor, Any], Tensor],
        data: tuple[Any, Any] | Iterable[Sequence[Any]],
        *,
        params: Iterable[Tensor] | None = None,
        reduction: str | None = None,
        dtype: object = None,
        cache_graph: bool = True,
        progress: bool = False,
        allow_training_mode: bool = False,
        process_group: object | None = None,
        _product: _FixedProduct | None = None,
    ) -> None:
        if _product is not None:  # from_product: the product is the whole source
            self._setup(_product, dtype)
            return
        # A weak reference to the bound method: the source lives in the operator, so holding
        # `self._make_product` would be a reference cycle that keeps the operator, its cached
        # graph and the process group it averages over alive until the garbage collector runs
        # (at interpreter exit, a process group destroyed then can abort gloo's teardown).
        make_product = weakref.WeakMethod(self._make_batch_product)
        source = _DataProducts(
            model,
            loss_fn,
            lambda loss, outputs, index: make_product()(loss, outputs, index),
            name=type(self).__name__,
            params=params,
            reduction=reduction,
            cache_graph=cache_graph,
            progress=progress,
            allow_training_mode=allow_training_mode,
            process_group=process_group,
            share_power=self._share_power,
            loss_twice=self._loss_twice,
        )
        self._setup(source, dtype)
        with _outside_inference_mode():  # as the products (_numpy_edge)
            source.load(data)  # last, after the cheap checks: it may run a forward pass

    @classmethod
    def from_product(cls, product: Any, *, dtype: object = None) -> CurvatureLinearOperator:
        """A symmetric operator from a fixed product, e.g. a :class:`~hessfree.GGNProduct`.

        Args:
            product: Any object with ``matvec`` (flat tensor in and out), ``shape`` ``(n, n)``,
                ``dtype`` (a torch dtype) and ``device``; ``matmat`` (rows of a ``(k, n)``
                tensor) is used when present. Assumed symmetric.
            dtype: As for the constructor.

        Raises:
            TypeError: If ``product`` lacks one of those attributes, its ``dtype`` is not a
                floating torch dtype or its ``device`` no device; from a product, if
                ``matvec`` (or ``matmat``) returns something other than a tensor.
            ValueError: If ``shape`` is not ``(n, n)`` of ints; from a product, if the result
                does not have the input's shape and ``dtype``.
        """
        return cls(None, None, None, dtype=dtype, _product=_FixedProduct(product))

    def _setup(self, source: _DataProducts | _FixedProduct, dtype: object) -> None:
        """Set every attribute of the operator from its ``source`` (both constructors)."""
        self._source = source
        #: The tensors the operator differentiates with respect to, in flattening order.
        self.params = source.params
        #: ``'mean'`` or ``'sum'`` (``None`` for :meth:`from_product`).
        self.reduction = source.reduction
        self.cache_graph = source.cache_graph
        super().__init__(source.shape, source.dtype, source.device, dtype)

    def _make_product(self, loss: Tensor, outputs: Tensor) -> CurvatureProduct:
        """The subclass's curvature of one batch's ``loss`` at its ``outputs``."""
        raise NotImplementedError

    def _make_batch_product(self, loss: Tensor, outputs: Tensor, index: int) -> CurvatureProduct:
        """:meth:`_make_product` for batch ``index`` of ``data`` (for products that draw)."""
        return self._make_product(loss, outputs)

    def _mv(self, v: Tensor) -> Tensor:
        return self._source.apply(v)

    def _mm(self, V: Tensor) -> Tensor:
        return self._source.apply(V)

    # ---- symmetric: the operator is its own adjoint and transpose
    _rmv, _rmm = _mv, _mm

    def _adjoint(self) -> CurvatureLinearOperator:
        return self

    _transpose = _adjoint

    def damped(self, damping: float) -> LinearOperator:
        r"""The Tikhonov-damped operator :math:`C + \lambda I` (SciPy operator algebra).

        Args:
            damping: :math:`\lambda \ge 0`.

        Raises:
            ValueError: If ``damping < 0``.
        """
        lam = check_number("damping", damping, low=0.0)
        return self + self.dtype.type(lam) * _IdentityOperator(self.shape, dtype=self.dtype)

    def gradient(self) -> np.ndarray:
        r"""The gradient :math:`g = \nabla L` over all the data, in the operator's dtype.

        Free with a cached graph (it was computed when the graph was built); otherwise one
        forward and backward pass per batch, without the second-order graph.

        Raises:
            TypeError: For an operator :meth:`from_product` whose product has no ``gradient``.
        """
        with _outside_inference_mode():  # as the products (_numpy_edge)
            return self._as_array(self._source.gradient())
