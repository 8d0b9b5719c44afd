"""Type aliases shared across the package (defined once, here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

#: A linear map on flat 1-D tensors, ``v -> A v``.
MatVec = Callable[[Tensor], Tensor]

#: Parameters as the optimizer and the products see them: a sequence of tensors.
Params = Sequence[Tensor]
