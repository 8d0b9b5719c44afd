r"""SciPy ``LinearOperator`` views of curvature over a model, a loss and data.

Notation: :math:`\theta \in \mathbb{R}^n` the parameters (flattened in ``params`` order),
:math:`o_b = f_\theta(x_b)` the model outputs on batch :math:`b` (:math:`N_b` examples along
dimension 0, :math:`N = \sum_b N_b`), :math:`\ell_b = \ell(o_b, y_b)` the batch loss and

.. math::
    L(\theta) = \sum_b w_b\, \ell_b, \qquad
    w_b = N_b / N \ \text{for reduction 'mean'}, \qquad w_b = 1 \ \text{for 'sum'},

the loss over all the data (with ``'mean'`` a ragged last batch weighs only its share).
The operators are the curvature matrices of :math:`L` at the current :math:`\theta`:

* :class:`HessianLinearOperator`: :math:`H = \nabla^2 L` (Pearlmutter 1994);
* :class:`GGNLinearOperator`: :math:`G = \sum_b w_b J_b^\top H_{\ell_b} J_b` (Schraudolph 2002);
* :class:`FisherLinearOperator`: the empirical Fisher :math:`F = \tfrac1N \sum_i g_i g_i^\top`
  (``'sum'``: :math:`\sum_i g_i g_i^\top`), :math:`g_i` the gradient of example :math:`i`'s loss;
* :class:`JacobianLinearOperator`: :math:`J = \partial o/\partial\theta`, shape
  ``(outputs.numel(), n)``; ``matvec`` is a JVP, ``rmatvec`` a VJP.

Each is a :class:`scipy.sparse.linalg.LinearOperator`, so ``cg``, ``minres`` (``shift=`` for
damping), ``gmres``, ``eigsh``, ``lobpcg``, ``lsqr`` and ``svds`` accept it directly and
SciPy's operator algebra composes (``H + lam * I`` with ``I`` SciPy's identity operator,
which ``H.damped(lam)`` builds for you). Nothing :math:`n \times n` is ever formed:
every product is autograd on the products of :mod:`hessfree.curvature`.

**Graphs.** With one batch the first-order graph is built once, at construction, and every
product reuses it (one forward pass in all); ``cache_graph=False`` trades that memory for a
forward pass per product. With several batches each product runs one forward pass per batch
(``progress=True`` shows a tqdm bar). ``matmat`` (``lobpcg``, probes in
:mod:`hessfree.spectral`) goes through the batched products (``is_grads_batched``).

**The numpy edge.** Products run in the parameters' dtype and on their device. A float32
model gives a float32 operator; ``dtype=numpy.float64`` presents it as float64 (for ARPACK's
accuracy) and converts only the vectors. On CPU arrays cross with ``torch.from_numpy`` /
``Tensor.numpy`` (no copy when the dtype matches and the array is contiguous); on CUDA only
the vector crosses the bus.

**Threads.** Inside SciPy's iterative solvers numpy's OpenBLAS threads (the vector updates)
and torch's OpenMP threads (the products) take turns on the same cores, and OpenBLAS threads
spin-wait after each call, taking cores torch needs: SciPy's ``cg`` on such operators has been
measured 1.5–1.75x slower than with numpy's BLAS pinned to one thread (the size of the effect
depends on the core count and the BLAS build; on a loaded 2-core machine we could not separate
it from noise). Wrap the solve in :func:`limit_blas_threads`, which needs the optional
``threadpoolctl`` and limits numpy's and SciPy's BLAS only, never torch's::

    with limit_blas_threads(1):
        x, info = scipy.sparse.linalg.cg(G.damped(lam), b)

**Stochastic layers.** Dropout and train-mode BatchNorm change the function between forward
passes, so products would not come from one matrix; the constructors refuse models with such
modules in training mode (call ``model.eval()``, or pass ``allow_training_mode=True``).
Randomness inside ``forward`` that is not a module (``F.dropout(x, training=True)``) is not
detected.

Example:
    >>> from scipy.sparse.linalg import cg
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> x, y = torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
    >>> H = HessianLinearOperator(model, torch.nn.MSELoss(reduction="sum"), (x, y))
    >>> H @ np.ones(3)  # H = 2 x^T x = 2 I
    array([2., 2., 2.])
    >>> cg(H.damped(2.0), np.ones(3), rtol=1e-12)[0]  # (H + 2 I) x = 1
    array([0.25, 0.25, 0.25])

References:
    Pearlmutter (1994), Fast exact multiplication by the Hessian, Neural Computation.
    Schraudolph (2002), Fast curvature matrix-vector products for second-order gradient descent.
    Martens (2010), Deep learning via Hessian-free optimization, ICML, §4.2 (curvature over a
    mini-batch), §4.3 (Gauss-Newton).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse import issparse
from scipy.sparse.linalg import LinearOperator
from scipy.sparse.linalg._interface import IdentityOperator
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from ._checks import check_choice, check_int, check_number, check_scalar_loss
from ._flat import ParamLayout, trainable
from .curvature import (
    CurvatureProduct,
    FisherProduct,
    GGNProduct,
    HessianProduct,
    JacobianProduct,
)
from .distributed import Averager

__all__ = [
    "CurvatureLinearOperator",
    "HessianLinearOperator",
    "GGNLinearOperator",
    "FisherLinearOperator",
    "JacobianLinearOperator",
    "limit_blas_threads",
]

_NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_TORCH_OF = {np.dtype(v): k for k, v in _NUMPY_OF.items()}


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _shape(x: object) -> object:
    """A short description of ``x`` for error messages: its shape, or its type."""
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _edge_dtype(dtype: object, compute: torch.dtype) -> np.dtype:
    """The numpy dtype the operator presents: ``dtype`` if given, else the parameters'."""
    if dtype is None:
        if compute not in _NUMPY_OF:
            raise TypeError(
                f"The parameters have dtype {compute}, which numpy lacks; pass "
                "dtype=numpy.float32 or dtype=numpy.float64 to convert at the numpy edge."
            )
        return np.dtype(_NUMPY_OF[compute])
    try:
        edge = np.dtype(_NUMPY_OF.get(dtype, dtype))  # type: ignore[call-overload]
    except TypeError:
        edge = None
    if edge not in (np.float32, np.float64):
        raise ValueError(
            f"`dtype` must be numpy.float32 or numpy.float64 (or None), got {dtype!r}."
        )
    return edge


def _resolve_params(model: object, params: Iterable[Tensor] | None) -> list[Tensor]:
    if params is not None:
        return trainable(params)
    if isinstance(model, nn.Module):
        return trainable(model)
    raise TypeError(
        f"`params` is required when `model` is not an nn.Module (got {type(model).__name__}); "
        "pass the tensors to differentiate with respect to."
    )


def _is_stochastic(module: nn.Module) -> bool:
    """Train-mode BatchNorm or Dropout (p > 0): the forward pass differs between calls."""
    return module.training and (
        isinstance(module, _BatchNorm) or (isinstance(module, _DropoutNd) and module.p > 0)
    )


def _stochastic_modules_message(found: Iterable[str]) -> str:
    """The shared wording (operators and optimizer) for modules found by :func:`_is_stochastic`."""
    return (
        f"modules in training mode that change between forward passes: {', '.join(found)}; "
        "curvature products would not come from one matrix"
    )


def _check_model(model: object, allow_training_mode: bool) -> None:
    """Refuse modules whose forward pass differs between calls (cheap module scan)."""
    if not callable(model):
        raise TypeError(f"`model` must be an nn.Module or a callable, got {type(model).__name__}.")
    if allow_training_mode:
        return
    module = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    if not isinstance(module, nn.Module):
        return
    found = [
        f"{name or '<model>'} ({type(m).__name__})"
        for name, m in module.named_modules()
        if _is_stochastic(m)
    ]
    if found:
        raise ValueError(
            f"`model` has {_stochastic_modules_message(found)}. Call model.eval() before "
            "building the operator, or pass allow_training_mode=True if the randomness is "
            "intended."
        )


def _resolve_reduction(loss_fn: object, reduction: str | None) -> str:
    """``loss_fn.reduction`` (or a ``functools.partial``'s keyword), else ``reduction``."""
    own = getattr(loss_fn, "reduction", None)
    if own is None and isinstance(loss_fn, functools.partial):
        own = loss_fn.keywords.get("reduction")
    if own is None:
        return check_choice(
            "reduction", "mean" if reduction is None else reduction, ("mean", "sum")
        )
    if reduction is not None and reduction != own:
        raise ValueError(
            f"`reduction` is {reduction!r} but `loss_fn.reduction` is {own!r}; drop the "
            "`reduction` argument or make the two agree."
        )
    return check_choice("loss_fn.reduction", own, ("mean", "sum"))


def _as_pair(batch: object, where: str) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = (
            f"{type(batch).__name__} of length {len(batch)}"
            if isinstance(batch, (tuple, list))
            else type(batch).__name__
        )
        raise TypeError(f"`{where}` must be an (inputs, targets) pair, got a {got}.")
    return batch[0], batch[1]


def _single_batch(data: object) -> tuple[Any, Any] | None:
    """``data`` as one ``(inputs, targets)`` pair, or ``None`` if it is an iterable of batches."""
    if isinstance(data, Tensor):
        raise TypeError(
            "`data` must be an (inputs, targets) pair or an iterable of such pairs, got a "
            f"tensor of shape {tuple(data.shape)}."
        )
    if isinstance(data, (tuple, list)):
        if len(data) == 2 and isinstance(data[0], Tensor):
            return data[0], data[1]
        if len(data) == 1:
            return _as_pair(data[0], "data[0]")
        if len(data) == 0:
            raise ValueError(
                "`data` is empty; pass an (inputs, targets) pair or a non-empty list of them."
            )
        return None
    if not isinstance(data, Iterable):
        raise TypeError(
            "`data` must be an (inputs, targets) pair or an iterable of such pairs (a list, a "
            f"DataLoader), got {type(data).__name__}."
        )
    if iter(data) is data:  # type: ignore[call-overload]
        raise TypeError(
            f"`data` is a one-shot iterator ({type(data).__name__}); every product iterates over "
            "the data again, so pass a list of batches or a DataLoader."
        )
    return None


def _check_rows(inputs: Any, where: str) -> None:
    """Refuse a batch of zero examples (it would give zero products and a NaN mean loss)."""
    if isinstance(inputs, Tensor) and inputs.dim() > 0 and inputs.shape[0] == 0:
        raise ValueError(
            f"`{where}` has zero rows (shape {tuple(inputs.shape)}); pass a batch with at least "
            "one example, as for an empty `data`."
        )


def _import_tqdm() -> Callable[..., Any]:
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise ImportError(
            "`progress=True` needs tqdm; install it with `pip install tqdm`."
        ) from err
    return tqdm


def _product_rows(product: Any, V: Tensor) -> Tensor:
    """``product`` applied to a flat ``V`` or to each row of a ``(k, n)`` ``V``."""
    if V.dim() == 1:
        return product.matvec(V)
    if hasattr(product, "matmat"):
        return product.matmat(V)
    return torch.stack([product.matvec(v) for v in V])


# --------------------------------------------------------------------------------------------
# the numpy edge
# --------------------------------------------------------------------------------------------
class _TorchLinearOperator(LinearOperator):
    """Arrays in, torch products on the parameters' device and dtype, arrays out.

    Subclasses implement ``_mv`` (flat tensor in and out) and ``_mm`` (rows of a ``(k, n)``
    tensor), and for a non-symmetric operator ``_rmv`` and ``_rmm``.
    """

    def __init__(
        self, shape: tuple[int, int], compute: torch.dtype, device: torch.device, dtype: object
    ) -> None:
        edge = _edge_dtype(dtype, compute)
        #: The torch device the products run on; only vectors cross to and from it.
        self.device = torch.device(device)
        self._compute = compute
        self._edge = _TORCH_OF[edge]
        super().__init__(edge, shape)

    # ---- conversions
    def _as_tensor(self, x: np.ndarray) -> Tensor:
        """``x`` as a tensor in the compute dtype on the device; shares memory when it can."""
        if np.iscomplexobj(x):
            raise TypeError(
                f"`x` is complex ({x.dtype}) but the operator is real; apply it to x.real and "
                "x.imag separately."
            )
        x = np.ascontiguousarray(x)  # no copy when already C-contiguous
        if x.flags.writeable:
            t = torch.from_numpy(x)
        else:  # torch warns about read-only arrays; the products never write to their input
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(x)
        return t.to(device=self.device, dtype=self._compute)

    def _as_array(self, t: Tensor) -> np.ndarray:
        return t.detach().to(dtype=self._edge).cpu().numpy()

    # ---- shape checks with messages that name the argument
    def _check(self, name: str, x: object, length: int, matrix: bool) -> None:
        shape = np.shape(x)
        if matrix:
            if len(shape) != 2 or shape[0] != length:
                raise ValueError(
                    f"`{name}` must have shape ({length}, k) for an operator of shape "
                    f"{self.shape}, got {shape}."
                )
        elif shape not in ((length,), (length, 1)):
            raise ValueError(
                f"`{name}` must have shape ({length},) or ({length}, 1) for an operator of shape "
                f"{self.shape}, got {shape}."
            )

    def matvec(self, x: Any) -> np.ndarray:
        self._check("x", x, self.shape[1], matrix=False)
        return super().matvec(x)

    def rmatvec(self, x: Any) -> np.ndarray:
        self._check("x", x, self.shape[0], matrix=False)
        return super().rmatvec(x)

    def matmat(self, X: Any) -> np.ndarray:
        self._check("X", X, self.shape[1], matrix=True)
        return super().matmat(X)

    def rmatmat(self, X: Any) -> np.ndarray:
        self._check("X", X, self.shape[0], matrix=True)
        return super().rmatmat(X)

    # ---- SciPy's hooks: (n,) or (n, 1) vectors, (n, k) blocks handed over as (k, n) rows
    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._as_array(self._mv(self._as_tensor(x.reshape(-1))))

    def _matmat(self, X: Any) -> np.ndarray:
        X = X.toarray() if issparse(X) else X
        return self._as_array(self._mm(self._as_tensor(X.T))).T

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._as_array(self._rmv(self._as_tensor(x.reshape(-1))))

    def _rmatmat(self, X: Any) -> np.ndarray:
        X = X.toarray() if issparse(X) else X
        return self._as_array(self._rmm(self._as_tensor(X.T))).T

    def _mv(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _mm(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def _rmv(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _rmm(self, U: Tensor) -> Tensor:
        raise NotImplementedError


#: What to check when the model fails on its inputs (also the optimizer's closure hint).
_INPUT_MISMATCH_HINT = "Check that the inputs match the model (features, dtype, device)."


def _call_model(model: Callable[[Any], Tensor], inputs: Any) -> Tensor:
    """``model(inputs)``, with a failure or a non-tensor result turned into a clear error."""
    try:
        outputs = model(inputs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise ValueError(
            f"`model` failed on `inputs` of shape {_shape(inputs)}: {err}. {_INPUT_MISMATCH_HINT}"
        ) from err
    if not isinstance(outputs, Tensor):
        raise TypeError(f"`model(inputs)` must return a tensor, got {type(outputs).__name__}.")
    return outputs


# --------------------------------------------------------------------------------------------
# symmetric curvature operators
# --------------------------------------------------------------------------------------------
class CurvatureLinearOperator(_TorchLinearOperator):
    r"""A symmetric curvature matrix of a loss over data, as a SciPy ``LinearOperator``.

    The base of :class:`HessianLinearOperator`, :class:`GGNLinearOperator` and
    :class:`FisherLinearOperator` (see the module docstring for :math:`L`, the weights
    :math:`w_b` and the graph reuse). The operator is its own adjoint and transpose.

    Args:
        model: An ``nn.Module`` or a callable ``inputs -> outputs`` (a tensor, examples
            along dimension 0).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar, e.g. ``nn.MSELoss()`` or
            ``F.cross_entropy``.
        data: One ``(inputs, targets)`` batch (``inputs`` a tensor), or a re-iterable of
            batches (a list, a ``DataLoader``; a generator is refused). Tensors are moved to
            the parameters' device.
        params: The tensors to differentiate with respect to; default: the trainable
            parameters of ``model`` in ``model.parameters()`` order (required when ``model``
            is not an ``nn.Module``).
        reduction: How ``loss_fn`` reduces over examples, ``'mean'`` or ``'sum'``; read from
            ``loss_fn.reduction`` when it has one, else defaults to ``'mean'``. It sets the
            batch weights :math:`w_b` (and the Fisher's scale).
        dtype: The dtype the operator presents to SciPy: ``None`` (the parameters' dtype) or
            ``numpy.float32``/``numpy.float64``. Products always run in the parameters' dtype.
        cache_graph: With one batch, build the first-order graph once and reuse it for every
            product (``False``: one forward pass per product, less memory held). Ignored for
            several batches, which always recompute per batch.
        progress: Show a tqdm progress bar over the batches of each product (needs tqdm).
        allow_training_mode: Accept Dropout/BatchNorm modules in training mode.
        process_group: Sum the products over the ranks of this ``torch.distributed`` group
            (default: the default group when ``torch.distributed`` is initialised), each rank
            holding its own shard of the data: the operator is then the curvature over the
            union of the shards, weighted by size for ``'mean'``. Every rank must call every
            product (SciPy's solvers do, when each rank runs the same solve).

    Raises:
        TypeError: For a ``model``, ``data``, ``params`` or ``dtype`` of the wrong type, or a
            one-shot iterator as ``data``.
        ValueError: If ``data`` is empty or a batch has zero rows, ``model`` fails on the
            inputs, ``loss_fn`` does not
            return a scalar, ``reduction`` is not ``'mean'``/``'sum'``, or the model has
            stochastic modules in training mode.
    """

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
    ) -> None:
        _check_model(model, allow_training_mode)
        self._ranks = Averager(process_group)
        self._global_count: float | None = None
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
        self.params = _resolve_params(model, params)
        self._layout = ParamLayout(self.params)
        self.reduction = _resolve_reduction(loss_fn, reduction)
        self.cache_graph = bool(cache_graph)
        self._model, self._loss_fn = model, loss_fn
        self._tqdm = _import_tqdm() if progress else None
        n = self._layout.numel
        super().__init__((n, n), self._layout.dtype, self._layout.device, dtype)

        single = _single_batch(data)
        self._data = [single] if single is not None else data
        self._product: Any = None
        if single is not None and self.cache_graph:
            # One forward pass, here; every product reuses its graph.
            self._product, self._size = self._build(self._batch(single, "data"))
            return
        first = next(iter(self._data), None)  # validate shapes and the loss on one batch
        if first is None:
            raise ValueError(
                "`data` is empty; pass an (inputs, targets) pair or a non-empty list of them."
            )
        inputs, targets = self._batch(first, "data" if single is not None else "data[0]")
        with torch.no_grad():
            self._loss(self._forward(inputs), targets)

    @classmethod
    def from_product(cls, product: Any, *, dtype: object = None) -> CurvatureLinearOperator:
        """A symmetric operator from a fixed product, e.g. a :class:`~hessfree.GGNProduct`.

        Args:
            product: Any object with ``matvec`` (flat tensor in and out), ``shape`` ``(n, n)``,
                ``dtype`` (a torch dtype) and ``device``; ``matmat`` (rows of a ``(k, n)``
                tensor) is used when present. Assumed symmetric.
            dtype: As for the constructor.

        Raises:
            TypeError: If ``product`` lacks one of those attributes.
        """
        missing = [a for a in ("matvec", "shape", "dtype", "device") if not hasattr(product, a)]
        if missing:
            raise TypeError(
                f"`product` ({type(product).__name__}) lacks {', '.join(missing)}; expected an "
                "object with matvec, shape, dtype and device like hessfree.HessianProduct."
            )
        op = cls.__new__(cls)
        op._product, op._model, op._loss_fn, op._data, op._tqdm = product, None, None, None, None
        op._ranks, op._global_count = Averager(), None
        op.params = list(getattr(product, "params", []))
        op.reduction, op.cache_graph = None, True
        _TorchLinearOperator.__init__(
            op, tuple(product.shape), product.dtype, product.device, dtype
        )
        return op

    # ---- one batch: forward, loss, product
    def _make_product(self, loss: Tensor, outputs: Tensor) -> CurvatureProduct:
        raise NotImplementedError

    def _batch(self, batch: object, where: str) -> tuple[Any, Any]:
        inputs, targets = _as_pair(batch, where)
        _check_rows(inputs, f"{where} inputs")
        move = functools.partial(torch.Tensor.to, device=self.device, non_blocking=True)
        return (
            move(inputs) if isinstance(inputs, Tensor) else inputs,
            move(targets) if isinstance(targets, Tensor) else targets,
        )

    def _forward(self, inputs: Any) -> Tensor:
        return _call_model(self._model, inputs)

    def _loss(self, outputs: Tensor, targets: Any) -> Tensor:
        try:
            loss = self._loss_fn(outputs, targets)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"`loss_fn` failed on outputs of shape {_shape(outputs)} and targets of shape "
                f"{_shape(targets)}: {err}."
            ) from err
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"`loss_fn(outputs, targets)` must return a tensor, got {type(loss).__name__}."
            )
        if loss.numel() != 1:
            raise ValueError(
                f"`loss_fn(outputs, targets)` must return a scalar, got shape {tuple(loss.shape)}; "
                "use a loss with reduction='mean' or 'sum'."
            )
        return loss

    def _build(self, batch: tuple[Any, Any]) -> tuple[CurvatureProduct, int]:
        inputs, targets = batch
        with torch.enable_grad():
            outputs = self._forward(inputs)
            product = self._make_product(self._loss(outputs, targets), outputs)
        return product, (outputs.shape[0] if outputs.dim() else 1)

    def _batches(self) -> Iterator[tuple[Any, Any]]:
        data = self._data
        if self._tqdm is not None:
            try:
                total = len(data)
            except TypeError:  # e.g. a DataLoader over an IterableDataset
                total = None
            data = self._tqdm(
                data, total=total, desc=type(self).__name__, unit="batch", leave=False
            )
        for i, batch in enumerate(data):
            yield self._batch(batch, f"data[{i}]")

    def _weighted_sum(self, per_batch: Callable[[tuple[Any, Any]], tuple[Tensor, int]]) -> Tensor:
        """:math:`\\sum_b w_b r_b` over the batches of ``per_batch(batch) -> (r_b, N_b)``."""
        total, count = None, 0
        for batch in self._batches():
            r, size = per_batch(batch)
            # 'mean': sum N_b r_b / sum N_b, so a ragged last batch weighs only its share.
            w = float(size) if self.reduction == "mean" else 1.0
            total = r.mul_(w) if total is None else total.add_(r, alpha=w)
            count += size
        if total is None:
            raise ValueError("`data` yielded no batches; pass a non-empty list or DataLoader.")
        return self._across_ranks(total, count)

    def _across_ranks(self, total: Tensor, count: int) -> Tensor:
        r"""Finish :math:`\sum_b w_b r_b`: sum over the ranks, then divide by all the examples."""
        if self._ranks.active and self._ranks.world_size > 1:
            self._ranks.sum(total)
            if self._global_count is None:  # the shards do not change: count them once
                n = torch.tensor([float(count)], dtype=torch.float64, device=total.device)
                self._global_count = float(self._ranks.sum(n))
            count = self._global_count
        return total.div_(count) if self.reduction == "mean" else total

    def _apply(self, V: Tensor) -> Tensor:
        if self._product is not None:
            out = _product_rows(self._product, V)
            if self._model is None or not self._ranks.active:
                return out
            w = float(self._size) if self.reduction == "mean" else 1.0
            return self._across_ranks(out.mul_(w), self._size)

        def per_batch(batch: tuple[Any, Any]) -> tuple[Tensor, int]:
            product, size = self._build(batch)
            return _product_rows(product, V), size  # the batch's graph is freed on return

        return self._weighted_sum(per_batch)

    def _mv(self, v: Tensor) -> Tensor:
        return self._apply(v)

    def _mm(self, V: Tensor) -> Tensor:
        return self._apply(V)

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
        return self + self.dtype.type(lam) * IdentityOperator(self.shape, dtype=self.dtype)

    def gradient(self) -> np.ndarray:
        r"""The gradient :math:`g = \nabla L` over all the data, in the operator's dtype.

        Free with a cached graph (it was computed when the graph was built); otherwise one
        forward and backward pass per batch, without the second-order graph.

        Raises:
            TypeError: For an operator :meth:`from_product` whose product has no ``gradient``.
        """
        if self._product is not None:
            if not hasattr(self._product, "gradient"):
                raise TypeError(f"{type(self._product).__name__} has no `gradient`.")
            g = self._product.gradient
            if self._model is not None and self._ranks.active:
                w = float(self._size) if self.reduction == "mean" else 1.0
                g = self._across_ranks(g.clone().mul_(w), self._size)
            return self._as_array(g)

        def per_batch(batch: tuple[Any, Any]) -> tuple[Tensor, int]:
            inputs, targets = batch
            with torch.enable_grad():
                outputs = self._forward(inputs)
                loss = check_scalar_loss("loss_fn(outputs, targets)", self._loss(outputs, targets))
                g = torch.autograd.grad(loss, self.params, allow_unused=True)
            return self._layout.cat(g), (outputs.shape[0] if outputs.dim() else 1)

        return self._as_array(self._weighted_sum(per_batch))


class HessianLinearOperator(CurvatureLinearOperator):
    r"""The Hessian :math:`H = \nabla^2 L` of the loss over the data, as a ``LinearOperator``.

    Each product is one backward pass through the gradient's graph (Pearlmutter 1994),
    ``matmat`` one batched backward pass. Arguments as :class:`CurvatureLinearOperator`.

    Example:
        >>> from scipy.sparse.linalg import eigsh
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> H = HessianLinearOperator(model, torch.nn.MSELoss(), (x, torch.zeros(2, 1).double()))
        >>> H.shape, H.dtype  # H = x^T x (mean over 2 examples of a squared error)
        ((2, 2), dtype('float64'))
        >>> eigsh(H, k=1, which="LA", return_eigenvectors=False)
        array([9.])

    References:
        Pearlmutter (1994), Fast exact multiplication by the Hessian, Neural Computation.
    """

    def _make_product(self, loss: Tensor, outputs: Tensor) -> CurvatureProduct:
        return HessianProduct(loss, self.params)

    @classmethod
    def from_function(
        cls, f: Callable[[Tensor], Tensor], x: Tensor, *, dtype: object = None
    ) -> HessianLinearOperator:
        r"""The Hessian :math:`\nabla^2 f(x)` of a scalar function of one tensor.

        The operator acts on flattened vectors of ``x.numel()`` entries (``x.reshape(-1)``
        order); the gradient graph is built once, here. Like :func:`hessfree.hvp` as an
        operator.

        Args:
            f: Maps a tensor shaped like ``x`` to a scalar.
            x: The point (not modified; need not require grad).
            dtype: As for the constructor.

        Raises:
            TypeError: If ``x`` is not a floating-point tensor or ``f(x)`` not a tensor.
            ValueError: If ``f(x)`` is not a scalar or does not depend on ``x``.

        Example:
            >>> from scipy.optimize import rosen_hess
            >>> def rosen(x):
            ...     return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
            >>> x = torch.tensor([0.5, 1.5, -0.3], dtype=torch.float64)
            >>> H = HessianLinearOperator.from_function(rosen, x)
            >>> bool(np.allclose(H @ np.eye(3), rosen_hess(x.numpy())))
            True
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            kind = f"tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"`x` must be a floating-point tensor, got {kind}.")
        z = x.detach().reshape(-1).clone().requires_grad_(True)
        with torch.enable_grad():
            loss = check_scalar_loss("f(x)", f(z.view_as(x)))
            product = HessianProduct(loss, [z])
        return cls.from_product(product, dtype=dtype)


class GGNLinearOperator(CurvatureLinearOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = \sum_b w_b J_b^\top H_{\ell_b} J_b`.

    Positive semi-definite for convex losses (MSE, cross-entropy, BCE), so ``cg`` and
    ``eigsh``'s smallest eigenvalues behave. The loss Hessian is in closed form for MSE,
    softmax cross-entropy and BCE-with-logits (Schraudolph 2002; Martens 2010, §4.3).
    Arguments as :class:`CurvatureLinearOperator`.

    Example:
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
        >>> x, y = torch.randn(5, 2), torch.randn(5, 1)
        >>> G = GGNLinearOperator(model, torch.nn.MSELoss(), (x, y), dtype=np.float64)
        >>> G.shape, G.dtype  # a float32 model presented as float64
        ((9, 9), dtype('float64'))
        >>> v = np.ones(9)
        >>> bool(v @ (G @ v) >= 0)
        True

    References:
        Schraudolph (2002), Fast curvature matrix-vector products for second-order gradient
        descent, Neural Computation. Martens (2010), §4.3.
    """

    def _make_product(self, loss: Tensor, outputs: Tensor) -> CurvatureProduct:
        return GGNProduct(loss, outputs, self.params)


class FisherLinearOperator(CurvatureLinearOperator):
    r"""The empirical Fisher :math:`F = \tfrac1N \sum_i g_i g_i^\top` (``'sum'``: no :math:`1/N`).

    :math:`g_i` is the gradient of example :math:`i`'s loss (examples along dimension 0 of
    the outputs); no per-example gradient is materialised. Arguments as
    :class:`CurvatureLinearOperator`; ``reduction`` also fixes the scale.

    Example:
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> loss_fn = torch.nn.MSELoss(reduction="sum")
        >>> F = FisherLinearOperator(model, loss_fn, (x, torch.zeros_like(x)))
        >>> F @ np.ones(1)  # g_i = 2 w x_i^2: 2^2 + 8^2
        array([68.])
    """

    def _make_product(self, loss: Tensor, outputs: Tensor) -> CurvatureProduct:
        return FisherProduct(loss, outputs, self.params, reduction=self.reduction)


# --------------------------------------------------------------------------------------------
# Jacobian
# --------------------------------------------------------------------------------------------
class JacobianLinearOperator(_TorchLinearOperator):
    r"""The output Jacobian :math:`J = \partial o/\partial\theta` of ``model(inputs)``.

    Shape ``(outputs.numel(), n)``, rows in ``outputs.reshape(-1)`` order. ``matvec`` is a
    JVP (double-backward R-op on a graph built once), ``rmatvec`` a VJP (one backward pass);
    the adjoint ``J.H`` is the VJP operator. Suits ``lsqr`` and ``svds``.

    Args:
        model: An ``nn.Module`` or a callable ``inputs -> outputs`` (a tensor).
        inputs: The model inputs (moved to the parameters' device if a tensor).
        params: As :class:`CurvatureLinearOperator`.
        dtype: As :class:`CurvatureLinearOperator`.
        allow_training_mode: As :class:`CurvatureLinearOperator`.

    Raises:
        TypeError: For a ``model``, ``params`` or ``dtype`` of the wrong type, or if the model
            does not return a tensor.
        ValueError: If ``inputs`` has zero rows, ``model`` fails on them, or it has stochastic
            modules in training mode.

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
        >>> J = JacobianLinearOperator(model, x)  # J = x for a bias-free linear map
        >>> J.shape, J @ np.array([1.0, 0.0]), J.H @ np.ones(3)
        ((3, 2), array([1., 3., 5.]), array([ 9., 12.]))
    """

    def __init__(
        self,
        model: nn.Module | Callable[[Any], Tensor],
        inputs: Any,
        *,
        params: Iterable[Tensor] | None = None,
        dtype: object = None,
        allow_training_mode: bool = False,
    ) -> None:
        _check_model(model, allow_training_mode)
        params = _resolve_params(model, params)
        layout = ParamLayout(params)
        _check_rows(inputs, "inputs")
        if isinstance(inputs, Tensor):
            inputs = inputs.to(layout.device)
        with torch.enable_grad():
            outputs = _call_model(model, inputs)
        self.params = params
        self._jacobian = JacobianProduct(outputs, params)
        #: The shape of ``model(inputs)``; rows of the operator are its entries in order.
        self.output_shape = tuple(outputs.shape)
        super().__init__((outputs.numel(), layout.numel), layout.dtype, layout.device, dtype)

    def _mv(self, v: Tensor) -> Tensor:
        return self._jacobian.jvp(v).reshape(-1)

    def _mm(self, V: Tensor) -> Tensor:
        try:
            return self._jacobian.jmp(V).reshape(V.shape[0], -1)
        except (RuntimeError, NotImplementedError):  # no batching rule for some op
            return torch.stack([self._mv(v) for v in V])

    def _rmv(self, u: Tensor) -> Tensor:
        return self._jacobian.vjp(u.view(self.output_shape))

    def _rmm(self, U: Tensor) -> Tensor:
        try:
            return self._jacobian.vmp(U.view(U.shape[0], *self.output_shape))
        except (RuntimeError, NotImplementedError):
            return torch.stack([self._rmv(u) for u in U])

    def _adjoint(self) -> LinearOperator:
        """:math:`J^\\top` (VJP), whose own adjoint is :math:`J` again."""
        m, n = self.shape
        return LinearOperator(
            (n, m),
            matvec=self._rmatvec,
            rmatvec=self._matvec,
            matmat=self._rmatmat,
            rmatmat=self._matmat,
            dtype=self.dtype,
        )

    _transpose = _adjoint


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def limit_blas_threads(num_threads: int = 1) -> Iterator[None]:
    """Limit numpy's and SciPy's BLAS to ``num_threads`` threads inside the block.

    SciPy's iterative solvers do their vector updates with numpy's BLAS while the products
    run on torch's threads; pinning numpy's BLAS stops the two pools from fighting over the
    cores (see the module docstring). torch's own BLAS and OpenMP pools are left alone.

    Args:
        num_threads: The BLAS thread count inside the block.

    Raises:
        ValueError: If ``num_threads < 1``.

    Warns:
        UserWarning: If ``threadpoolctl`` is not installed; the block then runs unlimited.

    Example:
        >>> with limit_blas_threads(1):
        ...     float(np.ones(3) @ np.ones(3))
        3.0
    """
    num_threads = check_int("num_threads", num_threads, low=1)
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        warnings.warn(
            "threadpoolctl is not installed, so BLAS threads are not limited; install it with "
            "`pip install threadpoolctl`.",
            stacklevel=3,
        )
        yield
        return
    controller = ThreadpoolController()
    torch_dir = os.path.dirname(torch.__file__)
    paths = [
        lib.filepath
        for lib in controller.lib_controllers
        if lib.user_api == "blas" and not os.path.abspath(lib.filepath).startswith(torch_dir)
    ]
    if not paths:
        yield
        return
    with controller.select(filepath=paths).limit(limits=num_threads):
        yield
