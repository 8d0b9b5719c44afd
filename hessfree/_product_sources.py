r"""Where a :class:`~hessfree.CurvatureLinearOperator` gets its products: data or one product.

A *source* applies the curvature to a flat ``v`` or to the rows of a ``(k, n)`` ``V``
(``apply``) and gives the gradient (``gradient``), both as tensors on the parameters' device.

* :class:`_DataProducts` (the constructor): the curvature of
  :math:`L(\theta) = \sum_b w_b \ell_b` over ``(model, loss_fn, data)``, with
  :math:`w_b = N_b / N` for ``'mean'`` and :math:`1` for ``'sum'`` (notation of
  :mod:`hessfree.operators`). One batch with ``cache_graph``: one product built at load and
  reused; otherwise one forward pass and one product per batch and call. Sums over the ranks
  of a process group when one is active. The empirical Fisher is quadratic in the loss, not
  linear: with ``share_power=2`` a ``'mean'`` weighs batch :math:`b`'s Fisher :math:`F_b`
  (itself :math:`R_b \sum_{i \in b} \hat g_i \hat g_i^\top` over its :math:`R_b` rows) as
  :math:`F = \tfrac{R}{N^2} \sum_b \tfrac{N_b^2}{R_b} F_b`, :math:`R = \sum_b R_b`: the Fisher
  of the loss on all the data at once when batches hold unequal shares of it (class weights,
  ``ignore_index``); the same as :math:`\sum_b w_b F_b` when :math:`N_b = R_b`.
* :class:`_FixedProduct` (:meth:`~hessfree.CurvatureLinearOperator.from_product`): one
  product object, used as it is; no data, no ranks.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import (
    ParamVersions,
    check_reaches_params,
    check_scalar_loss,
    converted_params_error,
)
from ._flat import ParamLayout
from ._model_data import (
    _as_pair,
    _batch_count,
    _BufferWatch,
    _call_loss,
    _call_model,
    _check_model,
    _check_modes_kept,
    _check_rows,
    _check_same_examples,
    _import_tqdm,
    _pass_count,
    _resolve_params,
    _resolve_reduction,
    _single_batch,
    _to_device,
)
from .curvature import (
    CurvatureProduct,
    _compiled_by_aot,
    _compiled_message,
    _once_differentiable,
    _read_reduction,
    _reentrant_checkpoint,
)
from .distributed import Averager

#: ``(loss, outputs, index) -> product`` for batch ``index`` (its place in ``data``; a product
#: that draws random numbers seeds them from it, so every pass draws the same ones).
MakeProduct = Callable[[Tensor, Tensor, int], CurvatureProduct]


def _product_rows(product: Any, V: Tensor) -> Tensor:
    """``product`` applied to a flat ``V`` or to each row of a ``(k, n)`` ``V``."""
    if V.dim() == 1:
        return product.matvec(V)
    if hasattr(product, "matmat"):
        return product.matmat(V)
    return torch.stack([product.matvec(v) for v in V])


def _product_gradient(product: Any) -> Tensor:
    if not hasattr(product, "gradient"):
        raise TypeError(f"{type(product).__name__} has no `gradient`.")
    return product.gradient


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


class _BuiltAt:
    """The parameters a cached graph was built at: version counters, tensors and values.

    :class:`~hessfree._checks.ParamVersions` sees ``optimizer.step()`` and ``p.data = ...``,
    but a write through ``p.data`` (``p.data.add_(...)``, a hand-rolled update loop) bumps
    the version counter of the ``.data`` alias only: a cached Hessian then went on at a mixed
    point, its graph reading new weights (saved by reference) and old activations, 0.78 and
    3.2 max abs off the dense Hessians at the old and the new parameters (experiments/README.md,
    "operators15"). So a copy of the values is kept and compared on every product: one read
    of the parameters, against a product's forward-sized backward passes.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._versions = ParamVersions(params)
        # meta tensors (a stand-in device in tests) have no values to compare
        self._values = [None if p.is_meta else p.detach().clone() for p in params]

    def check(self, fix: str) -> None:
        """Raise ``RuntimeError`` if ``params`` changed since construction, saying ``fix``."""
        self._versions.check(fix)
        params = self._versions.params
        changed = [
            i for i, (p, v) in enumerate(zip(params, self._values, strict=True)) if _moved(p, v)
        ]
        if changed:
            i = changed[0]
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise RuntimeError(
                f"`params` changed value since the operator was built: parameter {i} (shape "
                f"{tuple(params[i].shape)}){more}, without a version change (a write through "
                "p.data, e.g. p.data.add_(...)). The operator holds the graph of the "
                f"parameters it was built at, so its products would mix old and new values. {fix}"
            )


def _moved(p: Tensor, held: Tensor | None) -> bool:
    """Whether ``p``'s values differ from ``held`` (NaN in the same places counts as equal).

    On CPU numpy compares: ``torch.equal`` took 1.2 ms for a 256x784 float32 weight,
    ``numpy.array_equal`` 48 µs (one thread; experiments/README.md, "operators15").
    """
    p = p.detach()
    if held is None:
        return False
    if p.device.type == "cpu" and p.dtype in _NUMPY_FLOATS:
        same = bool(np.array_equal(p.numpy(), held.numpy()))
    else:
        same = torch.equal(p, held)
    if same:
        return False
    return not bool(((p == held) | (p.isnan() & held.isnan())).all())


def refuse_reentrant_checkpoint(tensors: Sequence[object], name: str) -> None:
    """Refuse a graph that runs ``torch.utils.checkpoint(..., use_reentrant=True)``.

    Its backward is not differentiable and the parameters inside the checkpointed function
    are no inputs of its graph node, so every product would have silently zero rows for them
    (a GGN and a Hessian operator 0.43 and 0.45 relative error against the dense matrices:
    experiments/README.md, "unseen12"). The walk runs once per operator, at its first graph,
    so a model that starts checkpointing later goes unseen.
    """
    if _reentrant_checkpoint([t for t in tensors if isinstance(t, Tensor)]):
        raise NotImplementedError(
            f"{name}: the model's graph runs torch.utils.checkpoint with use_reentrant=True, "
            "whose backward torch cannot differentiate: the parameters inside the checkpointed "
            "function would get zero rows and columns in every product, silently. Pass "
            "use_reentrant=False to checkpoint (torch's recommended variant), which the "
            "operators differentiate exactly, or drop the checkpoint."
        )


def refuse_once_differentiable(tensors: Sequence[object], name: str, where: str) -> None:
    """Refuse a graph through a ``torch.autograd.Function`` whose backward is marked
    ``@once_differentiable`` where a product differentiates that backward again.

    torch gives zero there without an error when the incoming gradient needs none (a
    curvature product's constant seed): a custom tanh of this kind in a 3-4-2 MLP made the
    Hessian, GGN, Fisher and Jacobian operators 0.58, 0.34, 0.38 and 0.71 off (largest entry,
    relative) the dense matrices of the same model with ``torch.tanh`` (experiments/README.md,
    "lead, stop 42"). One walk, at the first graph, like :func:`refuse_reentrant_checkpoint`.
    """
    found = _once_differentiable([t for t in tensors if isinstance(t, Tensor)])
    if found is not None and _compiled_by_aot(found):  # torch.compile ("unseen19")
        raise NotImplementedError(_compiled_message(f"{name}: {where}") + ".")
    if found is not None:
        raise NotImplementedError(
            f"{name}: {where} runs {found.__module__}.{found.__qualname__}, a "
            "torch.autograd.Function whose backward is marked @once_differentiable; the "
            "products differentiate its backward once more, and torch silently gives zero "
            "there, so the operator would be wrong. Write its backward with differentiable "
            "torch operations and drop @once_differentiable."
        )


class _FixedProduct:
    """One product object (``matvec``, ``shape``, ``dtype``, ``device``), assumed symmetric.

    The object is the user's, so what it declares is checked here and what its products
    return on every call (a ``shape``, ``isinstance`` and ``dtype`` read, nothing per entry):
    unchecked, a non-square ``shape`` failed in numpy's reshape ("cannot reshape array of
    size 4 into shape (3,)"), a numpy ``dtype`` or an array returned by ``matvec`` in an
    ``AttributeError``, and a ``matmat`` returning too few columns came back as a ``(2, 3)``
    "product" of a 3x3 operator and an identity, silently (experiments/README.md,
    "operators16").
    """

    reduction = None
    cache_graph = True

    def __init__(self, product: Any) -> None:
        missing = [a for a in ("matvec", "shape", "dtype", "device") if not hasattr(product, a)]
        if missing:
            raise TypeError(
                f"`product` ({type(product).__name__}) lacks {', '.join(missing)}; expected an "
                "object with matvec, shape, dtype and device like hessfree.HessianProduct."
            )
        self.product = product
        self._name = type(product).__name__
        self.params = list(getattr(product, "params", []))
        self.shape = _square_shape(product.shape, self._name)
        self.dtype = _real_dtype(product.dtype, self._name)
        try:
            self.device = torch.device(product.device)
        except (TypeError, RuntimeError, ValueError) as err:
            raise TypeError(
                f"`{self._name}.device` must be a torch.device or a device string such as "
                f"'cpu', got {product.device!r} ({err})."
            ) from err

    def apply(self, V: Tensor) -> Tensor:
        out = _product_rows(self.product, V)
        batched = V.dim() == 2 and hasattr(self.product, "matmat")
        what = f"`{self._name}.matmat`" if batched else f"`{self._name}.matvec`"
        if V.dim() == 2 and not batched:
            what += " (stacked over the rows)"
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{what} returned {type(out).__name__}, not a tensor; a product maps a flat "
                f"torch tensor of {self.shape[0]} entries to one (numpy arrays: wrap them with "
                "scipy.sparse.linalg.aslinearoperator instead)."
            )
        if out.shape != V.shape or out.dtype != self.dtype:
            raise ValueError(
                f"{what} returned a {out.dtype} tensor of shape {tuple(out.shape)} for a "
                f"{V.dtype} input of shape {tuple(V.shape)}; it declares shape {self.shape} "
                f"and dtype {self.dtype}, so the result must have the input's shape and that "
                "dtype."
            )
        return out

    def gradient(self) -> Tensor:
        return _product_gradient(self.product)


def _square_shape(shape: object, name: str) -> tuple[int, int]:
    """``shape`` as ``(n, n)``, or a ``ValueError`` naming it (``from_product`` is symmetric)."""
    try:
        dims = tuple(shape)  # type: ignore[call-overload]
    except TypeError:
        dims = None
    ints = dims is not None and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims
    )
    if not ints or len(dims) != 2 or dims[0] != dims[1] or dims[0] < 0:
        raise ValueError(
            f"`{name}.shape` must be (n, n): from_product builds a symmetric operator, got "
            f"{shape!r}. For a non-square map use JacobianLinearOperator, or "
            "scipy.sparse.linalg.LinearOperator with your own matvec and rmatvec."
        )
    return (int(dims[0]), int(dims[1]))


def _dtype_name(dtype: object) -> str:
    """``numpy.float64`` for a class, the ``repr`` of anything else."""
    if isinstance(dtype, type):
        return f"{dtype.__module__}.{dtype.__qualname__}"
    return repr(dtype)


def _real_dtype(dtype: object, name: str) -> torch.dtype:
    """``dtype`` if a real floating torch dtype, else a ``TypeError`` naming it."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"`{name}.dtype` must be a torch dtype such as torch.float64 (the dtype its "
            f"products run in), got {_dtype_name(dtype)}."
        )
    if not dtype.is_floating_point:
        why = (
            ": the operators are real symmetric matrices (SciPy's real solvers and eigsh), so a "
            "complex Hermitian product would lose its imaginary part; present it as the real "
            "symmetric [[Re, -Im], [Im, Re]] of twice the size"
            if dtype.is_complex
            else ""
        )
        raise TypeError(
            f"`{name}.dtype` must be a real floating torch dtype (torch.float32, torch.float64, "
            f"...), got {dtype}{why}."
        )
    return dtype


class _ParamStamps:
    """The parameters' version counters and storages at the start of an uncached product.

    An uncached product runs one forward pass per batch at the parameters of that moment,
    so a training step taken meanwhile by another thread (``optimizer.step()``,
    ``load_state_dict``, ``p.data = ...``) gave a sum of batches taken at two points, no
    curvature matrix, silently: the 2-batch Hessian of a 3-4-1 tanh MLP (largest entry 2.0)
    0.53 and 2.5 off the dense Hessians at the old and the new parameters (experiments/README.md,
    "operators16"). Comparing the counters and
    ``data_ptr`` after the product sees that, for a read of two integers per parameter; a
    write through ``p.data`` (no counter) stays unseen, as documented.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._params = params
        self._stamps = self._read()

    def _read(self) -> list[tuple[int, int]]:
        return [(p._version, p.data_ptr()) for p in self._params]

    def refuse_moved(self, name: str) -> None:
        """Raise ``RuntimeError`` if a parameter changed while the product ran."""
        now = self._read()
        if now == self._stamps:
            return
        i = next(i for i, (a, b) in enumerate(zip(now, self._stamps, strict=True)) if a != b)
        raise RuntimeError(
            f"{name}: `params` changed while this product ran (parameter {i}, shape "
            f"{tuple(self._params[i].shape)}): another thread stepped or reloaded the model "
            "(optimizer.step(), load_state_dict) between the forward passes of the product's "
            "batches, so they were taken at different parameters and the sum is no curvature "
            "matrix; the result is discarded. Products of an uncached operator run forward "
            "passes at the current parameters: hold one lock around both the products and the "
            "training steps of a model shared between threads."
        )


class _DataProducts:
    """Products of the loss over ``(model, loss_fn, data)``; arguments as the operator's.

    Built in two steps so that every cheap check runs before the data is touched: the
    constructor checks ``model``, ``loss_fn``, ``params`` and ``reduction``; :meth:`load`
    checks the data and, for one batch with ``cache_graph``, runs the one forward pass.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[Any], Tensor],
        loss_fn: Callable[[Tensor, Any], Tensor],
        make_product: MakeProduct,
        *,
        name: str,
        params: Iterable[Tensor] | None,
        reduction: str | None,
        cache_graph: bool,
        progress: bool,
        allow_training_mode: bool,
        process_group: object | None,
        share_power: int = 1,
        loss_twice: bool = True,
    ) -> None:
        # Dropout/BatchNorm: refused in training mode now, and checked again per product
        self._modes = _check_model(model, allow_training_mode)
        self._buffers = _BufferWatch(model, allow_training_mode)  # buffer writes, per pass
        self._ranks = Averager(process_group)
        self._global_counts: tuple[float, float] | None = None  # (N, R) over all the ranks
        self._share_power = share_power  # 1: H, G (linear in the loss); 2: the Fisher
        self._loss_twice = loss_twice  # the loss's second derivative is taken (H, G)
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
        self.params = _resolve_params(model, params)
        self.layout = ParamLayout(self.params)
        self.reduction = _resolve_reduction(loss_fn, reduction)
        # 'mean' by default for a loss_fn without a `reduction`: checked against its graph once
        keyword = (
            loss_fn.keywords.get("reduction") if isinstance(loss_fn, functools.partial) else None
        )
        self._unchecked_default = (
            reduction is None and getattr(loss_fn, "reduction", None) is None and keyword is None
        )
        self.cache_graph = bool(cache_graph)
        self._checkpoint_unchecked = True  # the first graph is searched for a reentrant one
        self._model, self._loss_fn, self._make_product = model, loss_fn, make_product
        self._name = name
        self._tqdm = _import_tqdm() if progress else None
        n = self.layout.numel
        self.shape, self.dtype, self.device = (n, n), self.layout.dtype, self.layout.device
        self._data: Iterable[Sequence[Any]] = []
        self._product: CurvatureProduct | None = None
        self._built_at: _BuiltAt | None = None  # the cached product's parameters
        self._size: float = 0
        self._rows: float = 0
        self._num_batches: int | None = None  # a pass's batches, where not fixed by the type

    def load(self, data: tuple[Any, Any] | Iterable[Sequence[Any]]) -> None:
        """Check ``data`` (shapes and the loss on its first batch); cache one batch's graph."""
        before = self._buffers.versions()
        self._load(data)
        self._buffers.refuse_written(before, at_construction=True)

    def _load(self, data: tuple[Any, Any] | Iterable[Sequence[Any]]) -> None:
        single = _single_batch(data)
        if single is None:
            _check_same_examples(data)
            self._num_batches = _pass_count(data)
        self._data = [single] if single is not None else data
        if single is not None and self.cache_graph:
            # One forward pass, here; every product reuses its graph.
            self._product, self._size, self._rows = self._build(self._batch(single, "data"), 0)
            self._built_at = _BuiltAt(self.params)
            return
        first = next(iter(self._data), None)  # validate shapes and the loss on one batch
        if first is None:
            raise ValueError(
                "`data` is empty; pass an (inputs, targets) pair or a non-empty list of them."
            )
        inputs, targets = self._batch(first, "data" if single is not None else "data[0]")
        with torch.no_grad():
            _call_loss(self._loss_fn, _call_model(self._model, inputs), targets)

    # ---- one batch: move, forward, loss, product
    def _batch(self, batch: object, where: str) -> tuple[Any, Any]:
        inputs, targets = _as_pair(batch, where)
        _check_rows(inputs, f"{where} inputs")
        return _to_device(inputs, self.device), _to_device(targets, self.device)

    def _build(self, batch: tuple[Any, Any], index: int) -> tuple[CurvatureProduct, float, float]:
        """Batch ``index``'s product, its share :math:`N_b` of a ``'mean'`` and its rows
        :math:`R_b`."""
        inputs, targets = batch
        with torch.enable_grad():
            outputs = _call_model(self._model, inputs)
            loss = _call_loss(self._loss_fn, outputs, targets)
            if self._unchecked_default:
                self._unchecked_default = False
                self._check_default_reduction(loss, outputs)
            if self._checkpoint_unchecked:  # one graph walk, at the first graph built
                refuse_reentrant_checkpoint([loss, outputs], self._name)
                if self._loss_twice:
                    refuse_once_differentiable([loss, outputs], self._name, "the loss or model")
                else:  # the Fishers take the loss's first derivative only
                    refuse_once_differentiable([outputs], self._name, "the model")
                self._checkpoint_unchecked = False
            product = self._make_product(loss, outputs, index)
        rows = outputs.shape[0] if outputs.dim() else 1
        return product, _batch_count(self._loss_fn, outputs, targets), rows

    def _check_default_reduction(self, loss: Tensor, outputs: Tensor) -> None:
        """Warn when ``reduction`` defaulted to ``'mean'`` but the loss's graph is a sum over
        the examples (a hand-written ``.sum()``): the Fisher would be N times too large, and
        batches weighted by size instead of summed."""
        if isinstance(outputs, Tensor) and _read_reduction(loss, outputs) == "sum":
            warnings.warn(
                f"{self._name}: `loss_fn` has no `reduction` attribute, so its reduction over "
                "the examples is taken to be 'mean' (the default), but its autograd graph is a "
                "sum over them (e.g. .sum()); as a mean, batches are weighted by their size "
                "and the Fisher is N times too large. Pass reduction='sum' (or "
                "reduction='mean' to keep the mean and silence this).",
                stacklevel=5,
            )

    # ---- all the batches: sum_b w_b r_b, then over the ranks
    def _batches(self) -> Iterator[tuple[Any, Any]]:
        data = self._data
        if self._tqdm is not None:
            try:
                total = len(data)  # type: ignore[arg-type]
            except TypeError:  # e.g. a DataLoader over an IterableDataset
                total = None
            data = self._tqdm(data, total=total, desc=self._name, unit="batch", leave=False)
        for i, batch in enumerate(data):
            yield self._batch(batch, f"data[{i}]")

    def _weight(self, size: float, rows: float, power: int) -> float:
        """Batch :math:`b`'s weight before the final division (:meth:`_across_ranks`)."""
        if self.reduction != "mean":
            return 1.0
        return float(size) if power == 1 else float(size) ** 2 / float(rows)

    def _weighted_sum(
        self, per_batch: Callable[[tuple[Any, Any], int], tuple[Tensor, float, float]], power: int
    ) -> Tensor:
        """:math:`\\sum_b w_b r_b` over the batches of ``per_batch(batch, b) -> (r_b, N_b, R_b)``
        (:math:`N_b` the batch's share of a ``'mean'`` loss, :func:`_batch_count`; :math:`R_b`
        its rows), ``power`` 1 for products linear in the loss, 2 for the Fisher."""
        total, count, rows, num_batches = None, 0, 0, 0
        for i, batch in enumerate(self._batches()):
            num_batches += 1
            try:
                r, size, n = per_batch(batch, i)
            except (ValueError, TypeError) as err:
                if type(err) not in (ValueError, TypeError):
                    raise
                # which of many batches failed: the model's or the loss's message alone does not say
                raise type(err)(f"In `data[{i}]`: {err}") from err
            if size == 0 and self.reduction == "mean":
                continue  # every target ignored: NaN loss, no share of the mean over the data
            # 'mean': sum N_b r_b / sum N_b, so a ragged last batch weighs only its share.
            w = self._weight(size, n, power)
            total = r.mul_(w) if total is None else total.add_(r, alpha=w)
            count += size
            rows += n
        if self._num_batches is not None and num_batches != self._num_batches:
            # a pass over other data: the products would not come from one matrix
            raise RuntimeError(
                f"`data` yielded {num_batches} batch(es) in this pass but "
                f"{self._num_batches} when the operator was built: it does not give the same "
                "batches on every pass (an iterable over a shared or changing source). "
                "Pass a list of batches or a DataLoader over a map-style Dataset."
            )
        if total is None:
            raise ValueError(
                "`data` yielded no batches (or only batches whose targets are all the loss's "
                "`ignore_index`); pass a non-empty list or DataLoader."
            )
        return self._across_ranks(total, count, rows, power)

    def _across_ranks(self, total: Tensor, count: float, rows: float, power: int) -> Tensor:
        r"""Finish :math:`\sum_b w_b r_b`: sum over the ranks, then divide by all the examples
        (:math:`N`; :math:`N^2/R` for the Fisher)."""
        if self._ranks.active and self._ranks.world_size > 1:
            self._ranks.sum(total)
            if self._global_counts is None:  # the shards do not change: count them once
                n = torch.tensor([float(count), float(rows)], dtype=torch.float64)
                n = self._ranks.sum(n.to(total.device)).tolist()
                self._global_counts = (n[0], n[1])
            count, rows = self._global_counts
        if self.reduction != "mean":
            return total
        # N^2/R is N exactly when the shares are the rows, so then the same division as for H, G
        return total.div_(count if power == 1 else float(count) ** 2 / float(rows))

    def _cached_across_ranks(self, r: Tensor, power: int) -> Tensor:
        """The cached batch's ``r`` as :math:`w_b r_b`, summed over the ranks (if any)."""
        if not self._ranks.active:
            return r
        w = self._weight(self._size, self._rows, power)
        return self._across_ranks(r.mul_(w), self._size, self._rows, power)

    # ---- the source's interface
    def _check_cache(self) -> None:
        if self._built_at is not None:
            self._built_at.check(
                "Build a new operator at the new parameters, or pass cache_graph=False for "
                "products at the current ones."
            )

    def _check_unconverted(self) -> None:
        """Refuse parameters converted since construction (``model.double()``): the products
        run in the dtype and on the device the operator was built for."""
        err = converted_params_error(
            self.params, self.dtype, self.device, "Build a new operator for the converted model."
        )
        if err is not None:
            raise err

    def apply(self, V: Tensor) -> Tensor:
        power = self._share_power
        if self._product is not None:
            self._check_cache()
            return self._cached_across_ranks(_product_rows(self._product, V), power)

        _check_modes_kept(self._modes)  # forward passes below: model.train() since?
        self._check_unconverted()

        def per_batch(batch: tuple[Any, Any], index: int) -> tuple[Tensor, float, float]:
            product, size, rows = self._build(batch, index)
            return _product_rows(product, V), size, rows  # the batch's graph is freed on return

        before, stamps = self._buffers.versions(), _ParamStamps(self.params)
        out = self._weighted_sum(per_batch, power)
        stamps.refuse_moved(self._name)
        self._buffers.refuse_written(before, at_construction=False)
        return out

    def gradient(self) -> Tensor:
        """Free with a cached graph; else one forward and backward pass per batch."""
        if self._product is not None:
            self._check_cache()
            g = _product_gradient(self._product)
            return self._cached_across_ranks(g.clone(), 1) if self._ranks.active else g

        _check_modes_kept(self._modes)
        self._check_unconverted()

        def per_batch(batch: tuple[Any, Any], index: int) -> tuple[Tensor, float, float]:
            inputs, targets = batch
            with torch.enable_grad():
                outputs = _call_model(self._model, inputs)
                loss = check_scalar_loss(
                    "loss_fn(outputs, targets)", _call_loss(self._loss_fn, outputs, targets)
                )
                g = torch.autograd.grad(loss, self.params, allow_unused=True)
            check_reaches_params("loss_fn(outputs, targets)", g, len(self.params))
            rows = outputs.shape[0] if outputs.dim() else 1
            return self.layout.cat(g), _batch_count(self._loss_fn, outputs, targets), rows

        before, stamps = self._buffers.versions(), _ParamStamps(self.params)
        g = self._weighted_sum(per_batch, 1)
        stamps.refuse_moved(self._name)
        self._buffers.refuse_written(before, at_construction=False)
        return g
