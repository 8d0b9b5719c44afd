r"""One random stream per step: the default generators' states, saved and put back.

A Hessian-free step evaluates its closure several times: the graph-building call, then
forward-only calls for CG's objective checks, backtracking, :math:`\rho` and the line search
(and a ``curvature_closure``'s call). With dropout, ``torch.rand`` noise or stochastic depth in
the forward pass, each call would draw new masks, so :math:`\rho` would compare the quadratic
model of one function with the value of another (:math:`\rho = -\infty` on a quarter of the
steps of a LayerNorm + Dropout MLP, :math:`\lambda` climbing; ``experiments/README.md``,
"unseenmb" and "dropoutrng"). :class:`StepStream` makes the step's objective one function:
the state of torch's default generators before the first call is put back before every later
call, and at the end of the step the generators are left where the first call left them, so
the stream advances by one evaluation per step (as one SGD step's would).

What is saved: the CPU generator (``torch.get_rng_state()``, about 5 KB) and, once CUDA is
initialised, the default generator of each CUDA device holding a parameter (its Philox seed
and offset, read and written on the host: no device sync). Draws from other generators
(numpy, Python's ``random``, a ``torch.Generator`` of the caller's) are not replayed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["StepStream"]


class StepStream:
    """Replays torch's default random stream for every closure call of one step.

    Call :meth:`before_call` before, and :meth:`after_call` after, each closure call of the
    step (the first one included), then :meth:`leave` once the step ends.

    Args:
        devices: The devices of the parameters; those of type ``'cuda'`` get their default
            generator saved too, if CUDA is initialised.

    Example:
        >>> stream = StepStream([torch.device("cpu")])
        >>> stream.before_call(); a = torch.rand(3); stream.after_call()
        >>> stream.before_call(); b = torch.rand(3); stream.after_call()
        >>> torch.equal(a, b)  # the second call drew what the first did
        True
        >>> stream.leave(); c = torch.rand(3)  # the stream goes on after one call's draws
        >>> torch.equal(c, a)
        False
    """

    def __init__(self, devices: Iterable[torch.device]) -> None:
        cuda = set()
        if torch.cuda.is_initialized():
            for d in devices:
                if d.type == "cuda":
                    cuda.add(torch.cuda.current_device() if d.index is None else d.index)
        self._cuda = sorted(cuda)
        self._start = self._get()
        self._after_first: tuple | None = None
        self._calls = 0
        self._left = False

    def _get(self) -> tuple:
        return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in self._cuda]

    def _set(self, states: tuple) -> None:
        cpu, cuda = states
        torch.set_rng_state(cpu)
        for i, state in zip(self._cuda, cuda, strict=True):
            torch.cuda.set_rng_state(state, i)

    def before_call(self) -> None:
        """Every call after the first starts from the state the first one started from."""
        if self._calls:
            self._set(self._start)
        self._calls += 1

    def after_call(self) -> None:
        """Keep where the first call left the stream (where :meth:`leave` puts it)."""
        if self._after_first is None:
            self._after_first = self._get()

    def leave(self) -> None:
        """The step ends: the generators where the first call left them; once only (a second
        call, e.g. after a callback that drew numbers, changes nothing)."""
        if not self._left and self._after_first is not None and self._calls > 1:
            self._set(self._after_first)
        self._left = True
