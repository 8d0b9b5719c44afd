r"""Averaging over a ``torch.distributed`` process group, for data-parallel HF.

The gradient and every curvature product are averages over the data, so data-parallel HF needs
one collective per quantity: each rank evaluates its shard, and the loss, the gradient, each
curvature product, the preconditioner statistics and every trial loss (backtracking, line
search, :math:`\rho`) are averaged with one ``all_reduce`` on one flat buffer. All ranks then see
identical numbers and take identical steps.

Weighting: with a ``'mean'`` loss on each rank, the average of the ranks' means equals the mean
over the union of the shards only when the shards have equal size. With unequal shards every
*rank* gets weight :math:`1/R`, i.e. an example on a small shard counts more. To weight ranks
by their share instead, give the optimizer ``process_group=Averager(weight=n)`` with ``n`` this
rank's number of examples: the averages are then :math:`\sum_r n_r m_r / \sum_r n_r`, the mean
over the union. (The curvature operators need no weight: they sum each rank's share of the loss.)

Hangs: a rank that dies makes its peers' next collective fail (gloo: connection closed) or wait
until the process group's ``timeout`` (set it with ``init_process_group(timeout=...)``); the
runner sets it from the config, so a crashed or hung rank never blocks the others forever.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Averager"]


class Averager:
    """Average tensors over a process group (identity when there is none).

    Args:
        group: A process group; ``None`` means the default group when ``torch.distributed``
            is initialised, else no averaging.
        weight: This rank's weight in the average, a finite number > 0, e.g. its number of
            examples, for unequal shards (default: the plain mean over the ranks). When one
            rank gives a weight, every rank must give its own: the total is one collective.

    Example:
        >>> Averager().mean(torch.tensor([1.0, 2.0]))  # not initialised: identity
        tensor([1., 2.])
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, *, weight: float | None = None
    ) -> None:
        if isinstance(group, Averager):
            raise TypeError(
                "Got an Averager where a process group is expected (the curvature operators "
                "weight each rank by its share of the loss themselves); pass its process "
                "group, `averager.group`."
            )
        if isinstance(weight, Tensor) and weight.numel() == 1 and weight.dtype != torch.bool:
            weight = weight.item()  # e.g. mask.sum(); once, at construction
        if weight is not None and not (
            isinstance(weight, numbers.Real)  # numpy's scalars too (a shard's len, np.sum)
            and not isinstance(weight, bool)
            and math.isfinite(weight)
            and weight > 0
        ):
            raise ValueError(
                f"Averager `weight` must be a finite number > 0 (e.g. this rank's number of "
                f"examples), got {weight!r}."
            )
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
        if self.active and group is not None and dist.get_rank(group) < 0:
            # torch skips a collective on a group this process is not in, with a warning, and
            # reports a world size of -1: every average came back negated (an ascent step)
            raise ValueError(
                f"This process (global rank {dist.get_rank()}) is not a member of the given "
                "`process_group`: torch would skip its collectives, and the averages here "
                "would come back negated. Pass a group only on its member ranks; give the "
                "others a group of their own (`torch.distributed.new_subgroups`) or None."
            )
        self.world_size = dist.get_world_size(self.group) if self.active else 1
        self.rank = dist.get_rank(self.group) if self.active else 0
        # weighted as soon as a weight is given, even 1.0: another rank may give another, and
        # skipping the total's collective here would put this rank's collectives out of step
        self.weighted = weight is not None
        self.weight = 1.0 if weight is None else float(weight)
        self._total_weight: float | None = None if self.weighted else float(self.world_size)

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
        if self.weighted:
            total = self.total_weight  # its own collective, before the data's, on every rank
            t = t * self.weight
            dist.all_reduce(t, group=self.group)
            return t.div_(total)
        dist.all_reduce(t, group=self.group)
        return t.div_(float(self.world_size))

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

    def check_same(self, flat: Tensor, settings: Mapping[str, object] | None = None) -> None:
        """Raise if ``flat`` (e.g. the parameters) differs across ranks, if some ranks gave a
        ``weight`` and others did not, or if ``settings`` differ; two small collectives (a
        third, gathering the settings, only to name the ones that differ).

        The weights' flag rides along because a rank without a weight skips the collective
        that sums them: its next average would meet the others' sum of weights (two 1-element
        buffers: no error from the backend, the objective silently summed with a weight).
        ``settings`` (plain values: numbers, strings, tuples) ride along as a digest because
        ranks whose settings differ take different numbers of collectives (another CG budget,
        another line search) and hang until the group's timeout, or take different steps.
        """
        if not self.active or self.world_size == 1:
            return
        n = flat.numel()
        ramp = torch.arange(1, n + 1, dtype=torch.float64, device=flat.device).div_(n)
        x = flat.detach().to(torch.float64)
        weighted = torch.tensor(float(self.weighted), dtype=torch.float64, device=flat.device)
        digest = torch.tensor(_digest(settings), dtype=torch.float64, device=flat.device)
        fp = torch.stack([x.sum(), (x * ramp).sum(), x.square().sum(), weighted, digest])
        hi, lo = fp.clone(), fp.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        if hi[3] != lo[3]:
            raise ValueError(
                f"Some of the {self.world_size} ranks gave the Averager a `weight` and others "
                f"did not (this rank: {'weight=' + repr(self.weight) if self.weighted else 'none'}"
                "); give every rank its own weight (e.g. its number of examples: "
                "`process_group=Averager(group, weight=n)`), or none for the plain mean over the "
                "ranks."
            )
        if hi[4] != lo[4]:
            self._name_different_settings(dict(settings or {}))
        hi, lo = hi[:3], lo[:3]
        if not torch.equal(hi, lo):
            raise ValueError(
                f"Parameters differ across the {self.world_size} ranks "
                f"(fingerprint max {hi.tolist()} "
                f"vs min {lo.tolist()}); initialise every rank from the same seed or broadcast "
                "rank 0's parameters before the first step (after loading a checkpoint: load "
                "the same one on every rank). If the ranks train separate "
                "models, give each its own group instead of the default one: "
                "`group, _ = torch.distributed.new_subgroups(group_size=1)` on every rank, "
                "then `process_group=group`."
            )

    def _name_different_settings(self, settings: dict[str, object]) -> None:
        """Gather every rank's ``settings`` and raise naming those that differ (every rank
        calls this together: the digests disagreed on all of them)."""
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, settings, group=self.group)
        keys = sorted({k for s in everyone for k in s}, key=str)
        differ = [k for k in keys if len({repr(s.get(k)) for s in everyone}) > 1]  # NaN == NaN
        shown = "; ".join(
            f"`{k}`: " + ", ".join(f"rank {r} {s.get(k)!r}" for r, s in enumerate(everyone))
            for k in differ[:3]
        )
        raise ValueError(
            f"The optimizer's settings differ across the {self.world_size} ranks ({shown}"
            f"{'; ...' if len(differ) > 3 else ''}); data-parallel ranks must run one "
            "optimizer on one model: give every rank the same arguments and the same "
            "parameters (settings that differ put the ranks' collectives out of step, a hang "
            "until the group's timeout)."
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


def _digest(settings: Mapping[str, object] | None) -> float:
    """A float64 (exact: 48 bits) digest of plain settings, the same in every process (Python's
    ``hash`` of a string is salted per process)."""
    if not settings:
        return 0.0
    text = repr(sorted((str(k), repr(v)) for k, v in settings.items()))
    return float(int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big"))
