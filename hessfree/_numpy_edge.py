"""The numpy edge of the operators: arrays in, torch products, arrays out.

Products run in the parameters' dtype and on their device; SciPy sees the operator in its
*edge* dtype (the parameters' by default, or float32/float64 on request) and only the vectors
are converted. On CPU arrays cross with ``torch.from_numpy`` / ``Tensor.numpy`` (no copy when
the dtype matches and the array is contiguous); on CUDA only the vector crosses the bus.

:class:`_IdentityOperator` is the :math:`I` of ``C + lam * I`` (``damped``): our own, since
SciPy's ``IdentityOperator`` lives in its private ``_interface`` module.

Example:
    >>> I = _IdentityOperator((3, 3), np.float32)
    >>> (2.0 * I) @ np.ones(3, dtype=np.float32), I.H is I
    (array([2., 2., 2.], dtype=float32), True)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
import torch
from scipy.sparse import issparse
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from ._graph_ops import batching_breaks as _batching_breaks

_NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_TORCH_OF = {np.dtype(v): k for k, v in _NUMPY_OF.items()}


def _edge_dtype(dtype: object, compute: torch.dtype) -> np.dtype:
    """The numpy dtype the operator presents: ``dtype`` if given, else the parameters'."""
    if compute.is_complex:  # a real edge dtype would drop the products' imaginary parts
        raise TypeError(
            f"The parameters have dtype {compute}: the operators are real matrices over real "
            "parameters, and a complex product presented as float would lose its imaginary "
            "part silently. Keep each complex parameter as a real one of twice the size and "
            "make it complex in forward (torch.view_as_complex of a (..., 2) real tensor)."
        )
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


def _outside_inference_mode() -> contextlib.AbstractContextManager:
    """Leave ``torch.inference_mode()`` (an evaluation loop's) for a product or a build.

    Products are autograd, which inference mode turns off beyond ``enable_grad``'s reach.
    Entering ``inference_mode(False)`` costs ~5 µs, so it is entered only when needed.
    """
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()


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

    # ---- copies: a shallow copy shares the products; pickling and deep copies are refused
    def __copy__(self) -> _TorchLinearOperator:
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        return copy

    def __reduce_ex__(self, protocol: object) -> Any:
        # Without this, pickle and copy.deepcopy fail deep inside with torch's "Only Tensors
        # created explicitly by the user (graph leaves) support the deepcopy protocol" (which
        # points at weight_norm) or "Can't pickle local object".
        raise TypeError(
            f"A {type(self).__name__} cannot be pickled or deep-copied: it holds the model's "
            "live parameters and autograd graphs over them, which belong to this process. "
            "Save the model's state_dict (and the data) instead and build the operator again "
            "where it is needed; copy.copy gives a second view of the same operator."
        )

    # ---- conversions
    def _refuse_meta(self) -> None:
        """A model on ``meta`` has shapes and no values: an operator over it builds (shapes,
        devices), but a product has no numbers to return; torch's own refusal comes from deep
        inside ("Cannot copy out of meta tensor; no data!")."""
        if self.device.type == "meta":
            raise RuntimeError(
                "The operator's parameters are on the 'meta' device (shapes, no values), so its "
                "products have no numbers to return. Materialise the model first, e.g. "
                "model.to_empty(device='cpu') and then load_state_dict(...), and build the "
                "operator from it."
            )

    def _as_tensor(self, x: np.ndarray) -> Tensor:
        """``x`` as a tensor in the compute dtype on the device; shares memory when it can."""
        self._refuse_meta()
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
        self._refuse_meta()  # gradient() reaches here without _as_tensor
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

    def dot(self, x: Any) -> Any:
        """``self @ x``; an array of 0 or 3 and more dimensions is refused by its shape alone
        (SciPy's message would print the whole array)."""
        if isinstance(x, np.ndarray) and x.ndim not in (1, 2):
            raise ValueError(
                f"`x` must have shape ({self.shape[1]},) or ({self.shape[1]}, k) for an operator "
                f"of shape {self.shape}, got {x.shape}."
            )
        return super().dot(x)

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

    # ---- SciPy's hooks: (n,) or (n, 1) vectors, (n, k) blocks handed over as (k, n) rows.
    # Each leaves torch.inference_mode() (_outside_inference_mode) before making the vectors.
    def _matvec(self, x: np.ndarray) -> np.ndarray:
        with _outside_inference_mode():
            return self._as_array(self._mv(self._as_tensor(x.reshape(-1))))

    def _matmat(self, X: Any) -> np.ndarray:
        X = X.toarray() if issparse(X) else X
        if X.shape[1] == 0:  # no columns: nothing to multiply (autograd cannot batch 0 rows)
            return np.zeros((self.shape[0], 0), dtype=self.dtype)
        with _outside_inference_mode():
            V = self._as_tensor(X.T)
            if _batching_breaks():
                return self._as_array(torch.stack([self._mv(v) for v in V])).T
            return self._as_array(self._mm(V)).T

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        with _outside_inference_mode():
            return self._as_array(self._rmv(self._as_tensor(x.reshape(-1))))

    def _rmatmat(self, X: Any) -> np.ndarray:
        X = X.toarray() if issparse(X) else X
        if X.shape[1] == 0:
            return np.zeros((self.shape[1], 0), dtype=self.dtype)
        with _outside_inference_mode():
            U = self._as_tensor(X.T)
            if _batching_breaks():
                return self._as_array(torch.stack([self._rmv(u) for u in U])).T
            return self._as_array(self._rmm(U)).T

    def _mv(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _mm(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def _rmv(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _rmm(self, U: Tensor) -> Tensor:
        raise NotImplementedError


class _AdjointOperator(_TorchLinearOperator):
    """The adjoint of a non-symmetric :class:`_TorchLinearOperator` (``J.H``, ``J.T``).

    Real, so adjoint and transpose agree. A view of ``parent``'s torch products, with the
    edge's shape checks and messages (SciPy's own adjoint says "dimension mismatch").
    """

    def __init__(self, parent: _TorchLinearOperator) -> None:
        self._parent = parent
        m, n = parent.shape
        super().__init__((n, m), parent._compute, parent.device, parent.dtype)

    def _mv(self, v: Tensor) -> Tensor:
        return self._parent._rmv(v)

    def _mm(self, V: Tensor) -> Tensor:
        return self._parent._rmm(V)

    def _rmv(self, u: Tensor) -> Tensor:
        return self._parent._mv(u)

    def _rmm(self, U: Tensor) -> Tensor:
        return self._parent._mm(U)

    def _adjoint(self) -> _TorchLinearOperator:
        return self._parent

    _transpose = _adjoint


class _IdentityOperator(LinearOperator):
    """The identity on vectors of ``shape[0]`` entries, in ``dtype``; its own adjoint.

    Like SciPy's private ``IdentityOperator``: every product returns its input unchanged, so
    ``op + lam * I`` gives bit for bit what ``op`` plus ``lam`` times the vector gives.
    """

    def __init__(self, shape: tuple[int, int], dtype: object) -> None:
        super().__init__(np.dtype(dtype), shape)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return x

    _rmatvec = _matmat = _rmatmat = _matvec

    def _adjoint(self) -> _IdentityOperator:
        return self

    _transpose = _adjoint
