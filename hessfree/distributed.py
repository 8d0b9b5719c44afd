r"""Averaging over a ``torch.distributed`` process group, for data-parallel HF.

The gradient and every curvature product are averages over the data, so data-parallel HF needs
one collective per quantity: each rank evaluates its shard, and the loss, the gradient, each
curvature product, the preconditioner statistics and every trial loss (backtracking, line
search, :math:`\rho`) are averaged with one ``all_reduce`` on one flat buffer. All ranks then see
identical numbers and take identical steps.

Weighting: with a ``'mean'`` loss on each rank, the average of the ranks' means equals the mean
over the union of the shards only when the shards have equal size. With unequal shards every
*rank* gets weight :math:`1/R`, i.e. an example on a small shard counts more; pass
``weight=`` (e.g. the shard size) to :class:`Averager` to weight ranks by their share instead.

Hangs: a rank that dies makes its peers' next collective fail (gloo: connection closed) or wait
until the process group's ``timeout`` (set it with ``init_process_group(timeout=...)``); the
runner sets it from the config, so a crashed or hung rank never blocks the others forever.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Averager"]


class Averager:
    """Average tensors over a process group (identity when there is none).

    Args:
        group: A process group; ``None`` means the default group when ``torch.distributed``
            is initialised, else no averaging.
        weight: This rank's weight in the average (default 1: plain mean over ranks); e.g. its
            number of examples, for unequal shards.

    Example:
        >>> Averager().mean(torch.tensor([1.0, 2.0]))  # not initialised: identity
        tensor([1., 2.])
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, weight: float = 1.0) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        # None stands for the default group, which torch looks up at each collective: holding
        # `dist.group.WORLD` would keep a destroyed group alive as long as this object (an
        # optimizer or operator kept to the end of a script), and its teardown would then run
        # during interpreter exit, after the peers have gone.
        self.group = group
        if group is not None and not self.active:
            raise ValueError(
                "A `process_group` was given but torch.distributed is not initialised."
            )
        self.world_size = dist.get_world_size(self.group) if self.active else 1
        self.rank = dist.get_rank(self.group) if self.active else 0
        self.weight = float(weight)
        self._total_weight: float | None = None if self.weight != 1.0 else float(self.world_size)

    @property
    def total_weight(self) -> float:
        if self._total_weight is None:
            t = torch.tensor([self.weight], dtype=torch.float64, device=self._device())
            dist.all_reduce(t, group=self.group)
            self._total_weight = float(t)
        return self._total_weight

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )

    def mean(self, t: Tensor) -> Tensor:
        """The (weighted) mean of ``t`` over the ranks, in place where possible; one collective."""
        if not self.active or self.world_size == 1:
            return t
        if self.weight != 1.0:
            t = t * self.weight
        dist.all_reduce(t, group=self.group)
        return t.div_(self.total_weight)

    def sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks, in place; one collective (identity without a group)."""
        if self.active and self.world_size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def mean_scalar(self, x: float, like: Tensor) -> float:
        """The mean of a Python float over the ranks (one collective on a 1-element buffer)."""
        if not self.active or self.world_size == 1:
            return x
        return float(self.mean(torch.tensor([x], dtype=torch.float64, device=like.device)))

    def check_same(self, flat: Tensor) -> None:
        """Raise if ``flat`` (e.g. the parameters) differs across ranks; two small collectives."""
        if not self.active or self.world_size == 1:
            return
        n = flat.numel()
        ramp = torch.arange(1, n + 1, dtype=torch.float64, device=flat.device).div_(n)
        x = flat.detach().to(torch.float64)
        fp = torch.stack([x.sum(), (x * ramp).sum(), x.square().sum()])
        hi, lo = fp.clone(), fp.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        if not torch.equal(hi, lo):
            raise ValueError(
                f"Parameters differ across the {self.world_size} ranks "
                f"(fingerprint max {hi.tolist()} "
                f"vs min {lo.tolist()}); initialise every rank from the same seed or broadcast "
                "rank 0's parameters before the first step."
            )

    def check_replicated(self, what: str, value: Tensor, *, rtol: float = 1e-5) -> None:
        """Raise if the scalar ``value`` differs across ranks by more than ``rtol``; two small
        collectives (a tolerance, not equality: kernels may round differently per device)."""
        if not self.active or self.world_size == 1:
            return
        x = value.detach().reshape(1).to(torch.float64)
        hi, lo = x.clone(), x.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        high, low = float(hi), float(lo)
        if not abs(high - low) <= rtol * max(abs(high), abs(low), 1e-30):
            raise ValueError(
                f"{what} needs every rank to evaluate the same curvature batch, but the "
                f"curvature losses differ across the {self.world_size} ranks ({low!r} to "
                f"{high!r}); give every rank the same curvature_closure batch, or use "
                "curvature_batch='sharded'."
            )
