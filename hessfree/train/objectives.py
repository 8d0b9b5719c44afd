r"""Training losses and task metrics.

Losses take raw model outputs (logits or linear values). Two reductions:

* ``mean``: the mean over every output element (PyTorch's default);
* ``sum_per_case``: :math:`\frac1N \sum_{n} \sum_{k} \ell(z_{nk}, t_{nk})`, summed over the
  outputs of a case and averaged over cases, as Martens (2010) trains autoencoders. With a mean
  over pixels instead, the objective is 784 times smaller, so is the curvature, and damped CG
  stops after a couple of iterations (see ``HF-NOTES.md``).

For cross-entropy (one loss per case) both reductions are the mean over cases.

Metrics, each a mean over cases:

* ``accuracy``: classification (argmax of the logits) and ``binary`` tasks (logit > 0 vs
  target > 0.5, over all outputs);
* ``squared_error``: :math:`\frac1N \sum_n \|\hat x_n - x_n\|^2`, the per-case squared
  reconstruction (or regression) error, with :math:`\hat x = \sigma(z)` when the loss is
  BCE-with-logits; this is the error Martens (2010) tabulates for the autoencoders;
* ``error_rate``: the addition problem's fraction of cases with
  :math:`|\hat y - y| > 0.04` (Martens & Sutskever 2011).

Example:
    >>> obj = make_objective("reconstruction", "bce_with_logits", "sum_per_case")
    >>> x = torch.tensor([[0.0, 1.0]])
    >>> round(float(obj.metric(torch.zeros(1, 2), x)), 4)  # sigmoid(0) = 0.5 on both pixels
    0.5
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Objective", "make_loss", "make_objective", "LOSSES", "REDUCTIONS"]

LOSSES = ("mse", "cross_entropy", "bce_with_logits")
REDUCTIONS = ("mean", "sum_per_case")
#: The error counted by the addition problem (Martens & Sutskever 2011, §5).
ADDITION_TOLERANCE = 0.04

LossFn = Callable[[Tensor, Tensor], Tensor]


def make_loss(name: str, reduction: str = "mean") -> LossFn:
    """The loss ``(outputs, targets) -> scalar`` by name and reduction.

    Args:
        name: ``mse``, ``cross_entropy`` (integer labels) or ``bce_with_logits``
            (targets in [0, 1]).
        reduction: ``mean`` or ``sum_per_case`` (see the module docstring).

    Raises:
        ValueError: Unknown name or reduction.

    Example:
        >>> z, t = torch.zeros(2, 3), torch.ones(2, 3)
        >>> float(make_loss("mse", "mean")(z, t)), float(make_loss("mse", "sum_per_case")(z, t))
        (1.0, 3.0)
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; expected one of {', '.join(map(repr, LOSSES))}.")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"Unknown reduction {reduction!r}; expected one of {', '.join(map(repr, REDUCTIONS))}."
        )
    if name == "cross_entropy":
        return lambda z, y: F.cross_entropy(z, y)
    if name == "mse":
        if reduction == "mean":
            return lambda z, t: F.mse_loss(z, t)
        return lambda z, t: F.mse_loss(z, t, reduction="sum") / z.shape[0]
    if reduction == "mean":
        return lambda z, t: F.binary_cross_entropy_with_logits(z, t)
    return lambda z, t: F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]


@dataclass(frozen=True)
class Objective:
    """What one experiment minimises and reports.

    Attributes:
        task: ``classification``, ``binary``, ``regression`` or ``reconstruction``.
        loss_name: See :func:`make_loss`.
        reduction: See :func:`make_loss`.
        metric_name: ``accuracy``, ``squared_error`` or ``error_rate``.
        higher_is_better: Direction of the metric.
    """

    task: str
    loss_name: str
    reduction: str
    metric_name: str
    higher_is_better: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "_loss", make_loss(self.loss_name, self.reduction))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The training loss (a scalar with the graph of ``outputs``)."""
        return self._loss(outputs, targets)  # type: ignore[attr-defined]

    def targets(self, x: Tensor, y: Tensor | None) -> Tensor:
        """The targets of a batch: the flattened inputs for reconstruction, else ``y``."""
        if self.task == "reconstruction":
            return x.flatten(1)
        if y is None:
            raise ValueError(f"task {self.task!r} needs targets, but the data has none.")
        return y

    @torch.no_grad()
    def metric(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The task metric as a 0-dim tensor, a mean over the cases of the batch."""
        if self.metric_name == "accuracy":
            if self.task == "binary":
                return ((outputs > 0) == (targets > 0.5)).to(outputs.dtype).mean()
            return (outputs.argmax(dim=1) == targets).to(outputs.dtype).mean()
        prediction = torch.sigmoid(outputs) if self.loss_name == "bce_with_logits" else outputs
        if self.metric_name == "error_rate":
            return (
                ((prediction - targets).abs() > ADDITION_TOLERANCE)
                .any(dim=1)
                .to(outputs.dtype)
                .mean()
            )
        return (prediction - targets).pow(2).flatten(1).sum(dim=1).mean()


def make_objective(
    task: str, loss_name: str, reduction: str, dataset: str | None = None
) -> Objective:
    """The objective of a task, with the metric it is judged by.

    Args:
        task: ``classification``, ``binary``, ``regression`` or ``reconstruction``
            (:func:`hessfree.train.config.infer_task`).
        loss_name: The training loss.
        reduction: The loss reduction.
        dataset: The data's name; ``addition`` is judged by ``error_rate``.

    Raises:
        ValueError: Unknown task, loss or reduction.
    """
    if task in ("classification", "binary"):
        metric, higher = "accuracy", True
    elif task == "regression" and dataset == "addition":
        metric, higher = "error_rate", False
    elif task in ("regression", "reconstruction"):
        metric, higher = "squared_error", False
    else:
        raise ValueError(
            f"Unknown task {task!r}; expected 'classification', 'binary', 'regression' "
            "or 'reconstruction'."
        )
    return Objective(task, loss_name, reduction, metric, higher)
