"""Argument validation shared by the core, the optimizer and the config loader.

Every check raises ``ValueError`` for a bad value and ``TypeError`` for a bad type, with a
message that names the argument, shows the value and says what is allowed.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import sys
from collections.abc import Sequence

import torch
from torch import Tensor


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """Check a real number lies in an interval; return it as ``float``.

    A missing bound is an open infinite end: ``high=None`` refuses ``inf`` (the message shows
    ``inf)``) and ``low=None`` refuses ``-inf``; pass ``high=math.inf`` to allow ``inf``.

    Example:
        >>> check_number("damping", 0.5, low=0.0, low_open=True)
        0.5
        >>> check_number("lr", float("inf"), low=0.0)
        Traceback (most recent call last):
        ...
        ValueError: `lr` must be in [0.0, inf), got inf.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}.")
    value = float(value)
    bad = math.isnan(value) or (low is None and value == -math.inf)
    bad |= high is None and value == math.inf
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:  # the message only now: the optimizer checks ~20 numbers per step
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ValueError(
            f"`{name}` must be in {interval}, got {value!r}.{(' ' + hint) if hint else ''}"
        )
    return value


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """Check an integer lies in ``[low, high]``; return it.

    Example:
        >>> check_int("cg_max_iter", 250, low=1)
        250
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an int {rng}, got {value!r}.")
    return value


def closest_name(text: str, allowed: Sequence[str]) -> str | None:
    """The allowed name ``text`` most likely misspells, or None.

    The same words in another order first (``max_cg_iter`` is ``cg_max_iter``, not the closer
    string ``max_iter``), then :func:`difflib.get_close_matches`.

    Example:
        >>> closest_name("max_cg_iter", ["max_iter", "cg_max_iter"])
        'cg_max_iter'
        >>> closest_name("lerning_rate", ["lr", "learning_rate"])
        'learning_rate'
    """
    words = sorted(text.lower().replace("-", "_").split("_"))
    for name in allowed:
        if sorted(name.split("_")) == words and name != text:
            return name
    close = difflib.get_close_matches(text, list(allowed), n=1, cutoff=0.6)
    return close[0] if close else None


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Check ``value`` is one of ``choices``.

    Example:
        >>> check_choice("curvature", "hess", ("ggn", "hessian"))
        Traceback (most recent call last):
        ...
        ValueError: Unknown `curvature` 'hess'; expected one of 'ggn', 'hessian'.
    """
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Unknown `{name}` {value!r}; expected one of {listed}.")
    return value  # type: ignore[return-value]


def check_vector(
    name: str, v: object, numel: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Check ``v`` is a flat tensor of the expected length, dtype and device (no host sync)."""
    if not isinstance(v, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(v).__name__}.")
    if v.dim() != 1 or v.numel() != numel:
        raise ValueError(
            f"`{name}` must be a flat vector of shape ({numel},), got shape {tuple(v.shape)}."
        )
    if v.dtype != dtype:
        raise TypeError(f"`{name}` must have dtype {dtype}, got {v.dtype}; use v.to({dtype}).")
    if v.device != device:
        raise ValueError(f"`{name}` must be on device {device}, got {v.device}.")
    return v


def check_scalar_loss(name: str, loss: object) -> Tensor:
    """Check ``loss`` is a 0-dim floating tensor with an autograd graph."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(loss).__name__}.")
    if loss.numel() != 1:
        raise ValueError(
            f"`{name}` must be a scalar (one element), got shape {tuple(loss.shape)}; "
            "reduce it with .mean() or .sum()."
        )
    if not loss.requires_grad:
        where = (
            " (it was computed under torch.inference_mode(), which torch.enable_grad() cannot "
            "undo: call it outside that block)"
            if loss.is_inference()
            else ""
        )
        raise ValueError(
            f"`{name}` has no autograd graph to the parameters (requires_grad=False){where}; "
            "compute it with gradients enabled from tensors that require grad."
        )
    # A 0-dim loss as given: a reshape would hide its node from the closed-form loss Hessians.
    return loss if loss.dim() == 0 else loss.reshape(())


def unreached_params_error(name: str, num_params: int) -> ValueError:
    """The error for a loss (or outputs) ``name`` that depends on none of the parameters."""
    return ValueError(
        f"`{name}` does not depend on any of the {num_params} tensor(s) in `params`, so every "
        "curvature product and the gradient would be zero. Pass the parameters it is computed "
        "from (e.g. model.parameters() of the model that computed it); parameters it does not "
        "use are allowed and get zero rows and columns."
    )


def check_reaches_params(name: str, parts: Sequence[Tensor | None], num_params: int) -> None:
    """Refuse derivatives of ``name`` that are ``None`` for every parameter (no path to any).

    ``parts`` are ``torch.autograd.grad(..., allow_unused=True)``'s results, one per parameter.
    Some ``None`` are fine (``allow_unused`` semantics: a parameter that ``name`` does not use
    has zero derivatives, hence zero rows and columns in every curvature matrix); all ``None``
    would make every product and the gradient silently zero, almost always a wrong ``params``.
    Reads no tensor values (no host sync).
    """
    if all(t is None for t in parts):
        raise unreached_params_error(name, num_params)


def converted_params_error(
    params: Sequence[Tensor], dtype: torch.dtype, device: torch.device, fix: str
) -> RuntimeError | None:
    """The error for parameters no longer of the ``dtype``/``device`` an operator was built
    for (``model.double()``, ``model.to(...)`` since), or ``None`` if all still are."""
    for i, p in enumerate(params):
        if p.dtype != dtype or p.device != device:
            return RuntimeError(
                f"`params` were converted since the operator was built: parameter {i} (shape "
                f"{tuple(p.shape)}) is now {p.dtype} on {p.device}, the operator was built for "
                f"{dtype} on {device} (e.g. model.double() or model.to(...) after building "
                f"it). {fix}"
            )
    return None


class ParamVersions:
    """The in-place version counters of ``params`` when a graph over them was built.

    A graph holds the parameters it was built at; after ``optimizer.step()`` or
    ``load_state_dict`` its products would use the old values, or torch's in-place check
    would fail, depending on which layer changed. :meth:`check` says so plainly instead.
    Assigning ``p.data`` (``torch.nn.utils.vector_to_parameters`` does) or converting the
    model (``model.double()``, ``.to()``) swaps a parameter's tensor without touching its
    version counter, so the tensors are compared too: each is held (a detached alias, no
    copy) so that its memory, hence its address, cannot be handed to a new tensor.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.versions = [p._version for p in self.params]
        self.held = [p.detach() for p in self.params]
        self.ptrs = [h.data_ptr() for h in self.held]

    def check(self, fix: str) -> None:
        """Raise ``RuntimeError`` naming the first changed parameter and suggesting ``fix``."""
        held = self.held[0] if self.held else None
        if held is not None:
            fix_new = "Build a new operator for the converted model."
            err = converted_params_error(self.params, held.dtype, held.device, fix_new)
            if err is not None:
                raise err
        changed = [
            i
            for i, (p, v, ptr) in enumerate(zip(self.params, self.versions, self.ptrs, strict=True))
            if p._version != v or p.data_ptr() != ptr
        ]
        if changed:
            i = changed[0]
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            how = (
                "changed in place since the operator was built: parameter {i} (shape {s}){more}, "
                "e.g. by optimizer.step() or load_state_dict()"
                if self.params[i]._version != self.versions[i]
                else "had their tensors replaced since the operator was built: parameter {i} "
                "(shape {s}){more} holds other data (p.data = ..., e.g. by "
                "torch.nn.utils.vector_to_parameters)"
            ).format(i=i, s=tuple(self.params[i].shape), more=more)
            raise RuntimeError(
                f"`params` {how}. The operator holds the graph of the parameters it was built "
                f"at, so its products would mix old and new values. {fix}"
            )


_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_OPTIM = os.path.dirname(os.path.abspath(torch.optim.__file__))
#: torch.compile's eager fallback, through which a step inside a compiled function runs
#: (named by path: torch._dynamo is not imported for it)
_TORCH_DYNAMO = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "_dynamo")
_NOT_THE_CALLER = (_HERE, _TORCH_OPTIM, _TORCH_DYNAMO)


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function point at
    the first frame outside hessfree, torch.optim and torch._dynamo (the user's
    ``opt.step(...)`` line, also inside a ``torch.compile``'d function), however deep in the
    step it is issued."""
    level, frame = 2, sys._getframe(2)  # 2: the frame that calls warnings.warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(_NOT_THE_CALLER):
        level, frame = level + 1, frame.f_back
    return level
