"""Data-parallel runs of the runner over ``torchrun``: the process group, shards, agreement.

``torchrun --nproc_per_node=N -m hessfree run CONFIG.yaml`` starts N copies of the runner with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) set;
:func:`process_group` reads them and joins the group: gloo on the CPU, NCCL on CUDA (rank ``r``
on ``cuda:LOCAL_RANK``), with ``distributed.timeout_seconds`` as the timeout of the rendezvous
and of every collective. Without those variables (or with ``WORLD_SIZE=1``) it yields a
one-process :class:`Group` whose methods are identities, so a plain run is unchanged.

Sharding: every rank draws the same batch indices (same seed) and takes its slice
``[r B/N, (r+1) B/N)`` of each gradient batch of ``B`` cases, and likewise of the curvature
batch. With a mean (or ``sum_per_case``) loss, the mean over the N ranks of their shard means
equals the mean over the whole batch only when the shards have equal size; with unequal ones an
example on a smaller shard would weigh more. The runner therefore requires every batch size to
be a multiple of N (a config error otherwise). HessianFree averages the loss, the gradient and
every curvature product itself (:mod:`hessfree.distributed`); for Adam, SGD and L-BFGS
:meth:`Group.average_gradients` averages the gradients after ``backward`` with one
``all_reduce`` on a flat buffer (and, for L-BFGS, the loss it sees in the same buffer).

Agreement: every decision that changes the control flow is taken on identical numbers on all
ranks, or a rank would wait in a collective the others never enter. Once per step
:meth:`Group.agree_step` gathers each rank's batch loss, step time and caught signal (one
``all_gather`` of 3 numbers): the loss is averaged, the time is rank 0's (the other ranks' times
include waiting while rank 0 evaluates and checkpoints), the signal is the largest. Budgets,
divergence, evaluation times and signal stops then follow on every rank alike; rank 0 alone
evaluates, writes files and prints, and broadcasts whether its evaluation was finite.

Faults: a rank that dies closes its connections, so the others' next collective raises at once
(gloo); one that hangs makes them raise after the timeout. :func:`process_group` turns such
errors into a :class:`PeerError` with a one-line message, which the CLI prints before exiting
with code 3.
"""

from __future__ import annotations

import datetime
import os
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["PeerError", "LaunchEnv", "launch_env", "Group", "process_group"]

_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class PeerError(RuntimeError):
    """Another rank of a data-parallel run failed, hung, or could not be reached."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where ``torchrun`` placed this process."""

    world_size: int
    rank: int
    local_rank: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The ``torchrun`` variables of this process, or None when they are not all set.

    Raises:
        PeerError: A variable is not an integer, or ``RANK`` is outside ``[0, WORLD_SIZE)``.

    Example:
        >>> launch_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
        LaunchEnv(world_size=2, rank=1, local_rank=1)
        >>> launch_env({}) is None
        True
    """
    environ = os.environ if environ is None else environ
    if not all(key in environ for key in _ENV):
        return None
    try:
        world, rank, local = (int(environ[key]) for key in _ENV)
    except ValueError:
        shown = ", ".join(f"{key}={environ[key]!r}" for key in _ENV)
        raise PeerError(f"torchrun variables must be integers, got {shown}.") from None
    if world < 1 or not 0 <= rank < world:
        raise PeerError(f"RANK={rank} must be in [0, WORLD_SIZE={world}).")
    return LaunchEnv(world, rank, local)


class Group:
    """This process's place in a data-parallel run; every method is an identity for one process.

    Args:
        rank: This process's rank.
        world_size: The number of processes.
        device: The device of this rank's model, data and collective buffers.
    """

    def __init__(
        self, rank: int = 0, world_size: int = 1, device: torch.device | None = None
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device if device is not None else torch.device("cpu")
        self.active = world_size > 1
        # Set when every rank raised the same start-up failure (:meth:`agree_start`).
        self.failed_together = False

    def shard(self, n: int) -> slice:
        """This rank's slice of ``n`` cases (``n`` a multiple of the world size)."""
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def average_gradients(
        self, params: Iterable[Tensor], loss: Tensor | None = None
    ) -> Tensor | None:
        """Average ``p.grad`` over the ranks in place, and ``loss`` too; one ``all_reduce``.

        Returns:
            The averaged loss (detached) when one is given, else None; for one process,
            ``loss`` itself.
        """
        if not self.active:
            return loss
        params = [p for p in params if p.requires_grad]
        pieces = [
            p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params
        ]
        if loss is not None:
            pieces.append(loss.detach().reshape(1).to(pieces[0].dtype))
        flat = torch.cat(pieces)
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for p in params:
            value = flat[offset : offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
            offset += p.numel()
        return None if loss is None else flat[-1].to(loss.dtype)

    def agree_step(
        self, loss: float, seconds: float, signum: int | None
    ) -> tuple[float, float, int | None]:
        """The mean batch loss, rank 0's step time and the largest caught signal, on all ranks.

        One ``all_gather`` of three float64 numbers per rank; every rank then reduces the same
        table in the same order, so the results are bitwise identical everywhere.
        """
        if not self.active:
            return loss, seconds, signum
        mine = torch.tensor(
            [loss, seconds, float(signum or 0)], dtype=torch.float64, device=self.device
        )
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine)
        table = torch.stack(rows).cpu()
        agreed = int(table[:, 2].max())
        return float(table[:, 0].mean()), float(table[0, 1]), agreed or None

    def agree_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (one broadcast)."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def agree_any(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any rank, on every rank (one ``all_reduce`` of one
        number): an L-BFGS step that one rank's clock or signal ends ends on all of them."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree_start(self, error: Exception | None, payload: Any) -> Any:
        """Raise on every rank if any rank failed to start; return rank 0's ``payload``.

        A rank that failed re-raises its own error; the others raise :class:`PeerError` naming
        the first failed rank, so no rank goes on to wait for one that has stopped.
        """
        if not self.active:
            if error is not None:
                raise error
            return payload
        reports: list[Any] = [None] * self.world_size
        text = None if error is None else f"{type(error).__name__}: {_first_line(error)}"
        dist.all_gather_object(reports, (text, payload))
        self.failed_together = any(failure is not None for failure, _ in reports)
        if error is not None:
            raise error
        for rank, (failure, _) in enumerate(reports):
            if failure is not None:
                raise PeerError(f"rank {rank} failed before training: {failure}")
        return reports[0][1]

    def check_same(self, params: Iterable[Tensor]) -> None:
        """Raise ValueError if the parameters differ across ranks (two small collectives)."""
        if not self.active:
            return
        from hessfree.distributed import Averager  # noqa: PLC0415 -- the core, lazily

        Averager().check_same(torch.cat([p.detach().reshape(-1) for p in params]))


def _first_line(err: BaseException) -> str:
    """The first line of an error's message without gloo's ``[file.cc:123] `` prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)[:300]


def _is_collective_error(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        key in text for key in ("gloo", "NCCL", "Connection", "Timed out", "timed out")
    )


#: A weak reference to the process group :func:`process_group` created (and destroyed).
_destroyed_group: weakref.ref | None = None


def group_outlives_destroy() -> bool:
    """Whether the process group :func:`process_group` created is still alive after its end.

    ``destroy_process_group`` only unregisters the group; the object dies with its last
    reference. torch itself keeps one to the end of the process when ``torch._dynamo`` is first
    imported while a group exists (the first optimizer constructed imports it), and the gloo
    group is then destroyed during interpreter finalisation, where its worker threads can abort
    the process (SIGABRT, "terminate called without an active exception"; 7 of 90 runs of a
    two-rank test on a loaded 2-core machine). A group left undestroyed after a lost peer is
    alive too. The CLI then leaves with ``os._exit`` after flushing.
    """
    return _destroyed_group is not None and _destroyed_group() is not None


@contextmanager
def process_group(device: torch.device, timeout_seconds: float) -> Iterator[Group]:
    """Join the ``torchrun`` process group for the duration of a run, if launched by torchrun.

    Uses a group the caller already initialised (and leaves it initialised); otherwise, when
    :func:`launch_env` finds more than one process, initialises gloo (CPU) or NCCL (CUDA, on
    ``cuda:LOCAL_RANK``) from the ``env://`` variables and destroys the group at the end.

    Args:
        device: The config's resolved device (its type picks the backend).
        timeout_seconds: Timeout of the rendezvous and of every collective.

    Yields:
        Group: this process's rank, world size and device.

    Raises:
        PeerError: The group could not be formed within the timeout, or a collective failed
            because another rank died or hung.
    """
    timeout = datetime.timedelta(seconds=timeout_seconds)
    owned = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    else:
        env = launch_env()
        if env is None or env.world_size == 1:
            yield Group(device=device)
            return
        if not dist.is_available():
            raise PeerError(
                f"WORLD_SIZE={env.world_size} asks for a distributed run, but this torch build "
                "has no torch.distributed."
            )
        rank, world = env.rank, env.world_size
        backend = "gloo"
        if device.type == "cuda":
            if env.local_rank >= torch.cuda.device_count():
                raise PeerError(
                    f"LOCAL_RANK={env.local_rank} needs cuda:{env.local_rank}, but "
                    f"{torch.cuda.device_count()} CUDA device(s) are visible; launch at most "
                    "that many processes per node (NCCL takes one GPU per rank)."
                )
            device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        try:
            dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world)
        except (RuntimeError, ValueError) as err:
            raise PeerError(
                f"rank {rank} of {world}: could not form the {backend} process group within "
                f"distributed.timeout_seconds = {timeout_seconds:g} s ({_first_line(err)}); "
                "launch with torchrun, which sets MASTER_ADDR and MASTER_PORT."
            ) from None
        owned = True
        global _destroyed_group
        _destroyed_group = weakref.ref(dist.group.WORLD)  # see group_outlives_destroy
    group = Group(rank, world, device)
    failed = False
    try:
        yield group
    except BaseException as err:
        failed = True
        if not isinstance(err, Exception) or isinstance(err, PeerError):
            raise
        if not _is_collective_error(err):
            raise
        raise PeerError(
            f"rank {rank} of {world}: lost contact with another rank (it crashed, was killed, "
            f"or hung for more than distributed.timeout_seconds = {timeout_seconds:g} s); "
            f"checkpoints already written stay valid ({_first_line(err)})"
        ) from None
    finally:
        if owned:
            # Ranks that reach the teardown of gloo at interpreter exit at different times may
            # abort ("terminate called without an active exception"): meet at a barrier first.
            # Only where every rank took the same path: after a lone failure a peer may wait in
            # another collective, and a barrier would hold this rank until the timeout.
            who = f"rank {rank} of {world}"
            _leave(failed, group.failed_together, device, who, timeout_seconds)


def _leave(
    failed: bool, together: bool, device: torch.device, who: str, timeout_seconds: float
) -> None:
    """Meet the other ranks at a barrier (when all got here alike); destroy the process group.

    Raises:
        PeerError: The barrier of a run that succeeded failed: another rank died or hung at
            the very end.
    """
    if failed and not together:
        # After a lone failure a peer may be dead or stuck in a collective: destroying the
        # group can then block (seen with gloo as with NCCL). The process is ending; the CLI
        # leaves with os._exit, skipping the teardown at exit as well.
        return
    lost = None
    if not failed or together:
        try:
            dist.barrier()
        except Exception as err:  # noqa: BLE001 -- any failure here means a lost peer
            lost = err
    dist.destroy_process_group()
    if lost is not None and not failed:
        raise PeerError(
            f"{who}: lost contact with another rank at the end of the run (it crashed, was "
            f"killed, or hung for more than distributed.timeout_seconds = {timeout_seconds:g} "
            f"s); the run directory is complete ({_first_line(lost)})"
        )
