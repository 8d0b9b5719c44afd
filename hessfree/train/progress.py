"""One optimizer's loop state: what a checkpoint must restore to continue bit-identically.

:class:`Progress` is written into a checkpoint field by field (:meth:`Progress.to_checkpoint`)
and read back from one (:meth:`Progress.from_checkpoint`); the model, optimizer and RNG states
travel beside it (:meth:`hessfree.train.loop.Runner`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["Progress"]


@dataclass
class Progress:
    """The loop state of one optimizer that a checkpoint must restore.

    Example:
        >>> p = Progress(step=5, cases=50, seconds=1.0, phase=1, phase_start=(3, 30, 0.5))
        >>> p.in_phase().step, p.in_phase().cases
        (2, 20)
        >>> Progress.from_checkpoint(p.to_checkpoint()) == p
        True
    """

    step: int = 0
    cases: int = 0
    seconds: float = 0.0
    perm: Tensor | None = None  # this epoch's permutation of the training cases
    position: int = 0  # the next case's index into ``perm``
    last_eval_step: int = -1
    last_eval_seconds: float = 0.0
    hf: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last HF diagnostics
    phase: int = 0  # the running phase of an entry with `phases`
    phase_start: tuple[int, int, float] = (0, 0, 0.0)  # step, cases, seconds when it began
    # the latest step that `budget.seconds` or a second signal ended early (None: none)
    last_cut_step: int | None = None

    def in_phase(self) -> Progress:
        """Steps, cases and seconds since the running phase began (for its own budget)."""
        step, cases, seconds = self.phase_start
        return Progress(self.step - step, self.cases - cases, self.seconds - seconds)

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields as checkpoint entries (``phase_start`` as a list)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["phase_start"] = list(self.phase_start)
        return out

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> Progress:
        """The state a checkpoint recorded (one written before phases existed: phase 0)."""
        values = {f.name: ckpt[f.name] for f in dataclasses.fields(cls) if f.name in ckpt}
        values["hf"] = dict(values["hf"])
        values["phase"] = int(values.get("phase", 0))
        values["phase_start"] = tuple(values.get("phase_start", (0, 0, 0.0)))
        return cls(**values)
