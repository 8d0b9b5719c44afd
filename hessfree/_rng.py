r"""One random draw for the model, one for the trials: torch's default streams within a step.

A Hessian-free step evaluates its closure several times: the graph-building call (and a
``curvature_closure``'s), then forward-only *trial* calls for CG's objective checks,
backtracking, :math:`\rho` and the line search. With dropout, ``torch.rand`` noise or
stochastic depth in the forward pass, each call would draw new masks, and :math:`\rho` compared
:math:`f(\theta_0 + p)` under one mask with :math:`f(\theta_0)` under another: the loss's own
mask noise, not the step, decided it (:math:`\rho = -\infty` on 27-34 % of the steps of two
dropout MLPs; ``experiments/README.md``, "unseenmb" and "dropoutrng").

:class:`StepStream` draws two sets per step. The model calls (the closure's first call and a
``curvature_closure``'s) start from the step's start state, so gradient and curvature come from
one mask :math:`m_1`. Every trial call starts from where the first call left the stream, so all
trials share a second mask :math:`m_2`; the optimizer evaluates :math:`f(\theta_0; m_2)` once
more and measures every change against it (common random numbers). Trials with :math:`m_1`
itself were tried and not kept: :math:`\rho` is then measured on the mask the step was fitted
to, λ sits at its floor and a Dropout(0.3) MLP's loss rose (3-13× the loss of fresh masks per
call). After the step the stream is where the first trial call left it (two evaluations'
draws). A closure that draws nothing from these generators is left alone: no state is put
back and no extra evaluation runs. On by default (``HessianFree(replay_rng=False)`` turns it
off). The common-random-numbers :math:`\rho` sits below ¼ once the mask noise dominates the
gradient (on a Dropout(0.3) MLP), and :math:`\lambda` climbed without bound until a poor
:math:`\rho` within the mask noise stopped raising it (``HessianFree._inconclusive``).

What is saved: the CPU generator (``torch.get_rng_state()``, about 5 KB) and, once CUDA is
initialised, the default generator of each CUDA device holding a parameter (its Philox seed
and offset, read and written on the host: no device sync). Draws from other generators
(numpy, Python's ``random``, a ``torch.Generator`` of the caller's) are not replayed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["StepStream"]


def _batch_seed(seed: int, index: int, rank: int) -> int:
    """A seed for batch (or step) ``index`` on ``rank`` (an odd-multiplier mix, ours; any fixed
    map works): :class:`~hessfree.MCFisherLinearOperator`'s batches and ``'fisher_mc'``'s steps
    on sharded ranks draw their labels from it."""
    mixed = seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB
    return mixed % (1 << 63)


class StepStream:
    """Puts torch's default random streams back for each closure call of one step.

    Call :meth:`before_call` before, and :meth:`after_call` after, each closure call of the
    step (the first one included; ``trial`` for the forward-only evaluations), then
    :meth:`leave` once the step ends.

    Args:
        devices: The devices of the parameters; those of type ``'cuda'`` get their default
            generator saved too, if CUDA is initialised.

    Example:
        >>> stream = StepStream([torch.device("cpu")])
        >>> draws = []
        >>> for trial in (False, True, True):
        ...     stream.before_call(trial=trial)
        ...     draws.append(torch.rand(3))
        ...     stream.after_call()
        >>> stream.drew, torch.equal(draws[1], draws[2]), torch.equal(draws[0], draws[1])
        (True, True, False)
    """

    def __init__(self, devices: Iterable[torch.device]) -> None:
        cuda = set()
        if torch.cuda.is_initialized():
            for d in devices:
                if d.type == "cuda":
                    cuda.add(torch.cuda.current_device() if d.index is None else d.index)
        self._cuda = sorted(cuda)
        self._start = self._get()
        self._after_model: tuple | None = None  # where the first call left the stream
        self._after_trial: tuple | None = None  # where the first trial call left it
        self._trial = False
        self._left = False
        #: Whether the first call drew from the saved generators (else nothing is put back).
        self.drew = False

    def _get(self) -> tuple:
        return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in self._cuda]

    def _set(self, states: tuple) -> None:
        cpu, cuda = states
        torch.set_rng_state(cpu)
        for i, state in zip(self._cuda, cuda, strict=True):
            torch.cuda.set_rng_state(state, i)

    def before_call(self, *, trial: bool) -> None:
        """Model calls after the first draw the first call's numbers, trial calls the first
        trial's."""
        self._trial = trial
        if self.drew:
            self._set(self._after_model if trial else self._start)

    def after_call(self) -> None:
        """Keep where the first call and the first trial call left the stream."""
        if self._after_model is None:
            self._after_model = self._get()
            self.drew = not all(
                torch.equal(a, b)
                for a, b in zip(
                    [self._start[0], *self._start[1]],
                    [self._after_model[0], *self._after_model[1]],
                    strict=True,
                )
            )
        elif self._trial and self._after_trial is None and self.drew:
            self._after_trial = self._get()

    def leave(self) -> None:
        """The step ends: the stream where the first trial call (else the first call) left it;
        once only (a second call, e.g. after a callback that drew numbers, changes nothing)."""
        target = self._after_trial if self._after_trial is not None else self._after_model
        if not self._left and self.drew and target is not None:
            self._set(target)
        self._left = True
