"""Flat views of parameter lists.

Solvers and operators work on one flat 1-D tensor; models hold a list of tensors. A
:class:`ParamLayout` converts between the two: :meth:`ParamLayout.split` returns *views* into a
flat vector (no copy), :meth:`ParamLayout.cat` concatenates (one copy, unavoidable since the
parameters live in separate storages).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

#: Dtypes whose CG runs in float32 (:func:`hessfree.cg`) and whose dot products accumulate in
#: float32 (:func:`dot`): a float16 squared norm underflows to 0 below a norm of
#: :math:`2.4 \cdot 10^{-4}` and overflows above 256. Not bfloat16, which has float32's range:
#: float32 CG there made the final losses of experiments/_fp16_products.py 1.9x worse (8 of 8
#: seeds; experiments/README.md, "fp16").
LOW_PRECISION = (torch.float16,)


def dot(u: Tensor, v: Tensor) -> Tensor:
    r""":math:`u^\top v` of 1-D tensors, in float32 for float16 ones (else ``torch.dot``).

    Example:
        >>> u = torch.full((4,), 2.0**-14, dtype=torch.float16)
        >>> float(torch.dot(u, u)), float(dot(u, u)) == 2.0**-26  # below float16's 2**-24
        (0.0, True)
    """
    if u.dtype in LOW_PRECISION:
        return torch.dot(u.float(), v.float())
    return torch.dot(u, v)


def trainable(params: Iterable[Tensor] | torch.nn.Module) -> list[Tensor]:
    """Return the parameters that require gradients, in order.

    Args:
        params: An ``nn.Module`` (its ``parameters()`` are used) or an iterable of tensors.

    Returns:
        list[Tensor]: The tensors with ``requires_grad=True``.

    Raises:
        TypeError: If an element is not a tensor.
        ValueError: If no tensor requires gradients.
    """
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    if isinstance(params, Tensor):
        params = [params]
    if not isinstance(params, Iterable):
        raise TypeError(
            "`params` must be an nn.Module, a tensor or an iterable of tensors, got "
            f"{type(params).__name__}."
        )
    out = []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"`params[{i}]` must be a torch.Tensor, got {_kind(p)}.")
        if p.requires_grad:
            out.append(p)
    if not out:
        raise ValueError(
            "No parameter requires gradients; pass tensors with requires_grad=True "
            "(e.g. model.parameters())."
        )
    return out


def _kind(item: object) -> str:
    """What a non-tensor ``params`` item is, with the fix for the usual mistakes."""
    if isinstance(item, str):
        return (
            f"the str {item!r}: parameters are passed as tensors, not names (e.g. "
            "[dict(model.named_parameters())[name] for name in names])"
        )
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return (
            f"a ({item[0]!r}, ...) pair: pass model.parameters(), or "
            "[p for _, p in model.named_parameters()], not model.named_parameters()"
        )
    return type(item).__name__


class ParamLayout:
    """Shapes of a parameter list and the maps between it and one flat vector.

    Args:
        params: The parameter tensors, all of one dtype and device.

    Raises:
        ValueError: If the tensors disagree in dtype or device, the list is empty, or a tensor
            appears twice (its entries would be two coordinates: doubled curvature blocks).

    Example:
        >>> w, b = torch.zeros(2, 3), torch.zeros(3)
        >>> layout = ParamLayout([w, b])
        >>> layout.numel
        9
        >>> [t.shape for t in layout.split(torch.arange(9.0))]
        [torch.Size([2, 3]), torch.Size([3])]
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        params = list(params)
        if not params:
            raise ValueError("`params` is empty; expected at least one tensor.")
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"`params[{i}]` must be a torch.Tensor, got {type(p).__name__}.")
        first: dict[int, int] = {}
        for i, p in enumerate(params):
            j = first.setdefault(id(p), i)
            if j != i:
                raise ValueError(
                    f"`params[{i}]` is the same tensor as `params[{j}]`; pass each parameter "
                    "once (model.parameters() does), else its curvature blocks count twice."
                )
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1:
            raise ValueError(
                f"All parameters must share one dtype, got {sorted(map(str, dtypes))}; "
                "convert the model with .to(dtype)."
            )
        if len(devices) > 1:
            raise ValueError(
                f"All parameters must live on one device, got {sorted(map(str, devices))}."
            )
        self.shapes = [p.shape for p in params]
        # split's views take plain tuples: Tensor.view(torch.Size) costs 2x view(tuple) (8 vs
        # 4 us on this repo's CPU machine), once per parameter per curvature product
        self._view_shapes = [tuple(s) for s in self.shapes]
        self.numels = [p.numel() for p in params]
        self.numel = sum(self.numels)
        self.dtype = params[0].dtype
        self.device = params[0].device

    def split(self, vec: Tensor) -> list[Tensor]:
        """Views of ``vec`` shaped like the parameters (no copy).

        Raises:
            ValueError: If ``vec`` is not a 1-D tensor of :attr:`numel` entries (a ``(n, 1)``
                column was split along its rows, and a short one failed inside torch).
        """
        if vec.dim() != 1 or vec.shape[0] != self.numel:
            raise ValueError(
                f"`vec` must be a flat vector of shape ({self.numel},), one entry per "
                f"parameter entry, got shape {tuple(vec.shape)}."
            )
        # split_with_sizes: Tensor.split's Python wrapper costs as much as the views here
        parts = vec.split_with_sizes(self.numels)
        return [c.view(s) for c, s in zip(parts, self._view_shapes, strict=True)]

    def cat(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Concatenate tensors shaped like the parameters into one flat vector.

        ``None`` entries (parameters an expression does not depend on) become zeros; sparse
        ones (``nn.Embedding(sparse=True)``'s gradients) are made dense, as
        ``torch.optim.LBFGS`` does.

        Raises:
            ValueError: If there is not one entry per parameter, or an entry's shape differs
                from its parameter's (flattening it would shift every later entry silently).
            TypeError: If an entry's dtype differs from the parameters' (``torch.cat`` would
                promote, or return another dtype, silently).

        Example:
            >>> layout = ParamLayout([torch.zeros(2, 3), torch.zeros(3)])
            >>> layout.cat([torch.ones(3, 2), None])
            Traceback (most recent call last):
            ...
            ValueError: `tensors[0]` must have shape (2, 3) like params[0], got (3, 2).
        """
        if len(tensors) != len(self.shapes):
            raise ValueError(
                f"`tensors` must hold {len(self.shapes)} entries, one per parameter (None for "
                f"zeros), got {len(tensors)}."
            )
        # one pass, checks inline: a product's every call comes here (36 -> 32 us for six
        # tensors against 25 us unchecked, on this repo's CPU machine; "lead, stop 44")
        dtype, parts = self.dtype, []
        for t, shape, n in zip(tensors, self.shapes, self.numels, strict=True):
            if t is None:
                parts.append(torch.zeros(n, dtype=dtype, device=self.device))
            elif t.shape != shape or t.dtype != dtype:
                self._refuse(tensors)
            else:
                parts.append(t.to_dense().reshape(-1) if t.is_sparse else t.reshape(-1))
        return torch.cat(parts)

    def _refuse(self, tensors: Sequence[Tensor | None]) -> None:
        """Raise for the first entry of ``tensors`` whose shape or dtype is not its parameter's."""
        for i, (t, shape) in enumerate(zip(tensors, self.shapes, strict=True)):
            if t is None:
                continue
            if t.shape != shape:
                raise ValueError(
                    f"`tensors[{i}]` must have shape {tuple(shape)} like params[{i}], "
                    f"got {tuple(t.shape)}."
                )
            if t.dtype != self.dtype:
                raise TypeError(
                    f"`tensors[{i}]` must have dtype {self.dtype} like the parameters, "
                    f"got {t.dtype}."
                )

    def zeros(self) -> Tensor:
        """A flat zero vector of the parameters' dtype and device."""
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)
