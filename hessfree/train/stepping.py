"""One optimizer step on one batch, per kind of optimizer, and what a step says afterwards.

HessianFree takes ``(closure, curvature_closure)`` returning ``(loss, outputs[, hidden])`` and
averages over the ranks of a data-parallel run itself; torch's L-BFGS re-evaluates a closure
that must return the batch-mean loss with gradients; Adam and SGD take one backward pass. In a
data-parallel run the gradients of the latter two (and L-BFGS's loss) are averaged here after
``backward``, so every rank takes the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn, optim

from hessfree.train.config import OptimizerConfig
from hessfree.train.objectives import Objective
from hessfree.train.parallel import Group

__all__ = [
    "StepCut",
    "batch_sizes",
    "converged",
    "describe_batches",
    "grown_batch_size",
    "set_damping_floor",
    "take_step",
]


class StepCut(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the runner's HessianFree ``callback`` after an HF step to end a ``step()``
    call of ``max_iter`` > 1 HF steps there (the step has ended: its state is recorded);
    ``loss`` is the call's first loss, which the call would have returned."""

    def __init__(self, loss: float) -> None:
        super().__init__(loss)
        self.loss = loss


def grown_batch_size(start: int, growth: float, step: int, largest: int, multiple: int = 1) -> int:
    """The gradient batch of step ``step`` (from 0) of a batch growing geometrically.

    :math:`b_k = m \\lfloor \\min(B, b_0 g^k) / m \\rfloor`: ``start`` :math:`b_0` times
    ``growth`` :math:`g` per step, at most ``largest`` :math:`B`, rounded down to a multiple
    of ``multiple`` :math:`m` (``start`` is one). A function of the step alone, so a resumed
    run and every rank of a data-parallel one take the same sizes without extra state.
    Friedlander & Schmidt (2012, "Hybrid deterministic-stochastic methods for data fitting")
    show a linear rate for geometric growth; ``experiments/scorecard.py`` multiplies its
    ``_Batches`` size by :math:`g` step by step, which gives the same integers (checked for
    its regimes over 2,000 steps); a relative slack of 1e-12 keeps a product that is an
    integer in exact arithmetic (:math:`100 \\cdot 1.1^2 = 121`) from rounding down.

    Example:
        >>> [grown_batch_size(250, 1.1, k, 4000) for k in range(5)]
        [250, 275, 302, 332, 366]
        >>> grown_batch_size(250, 1.1, 30, 4000), grown_batch_size(250, 1.1, 10**9, 4000)
        (4000, 4000)
        >>> [grown_batch_size(8, 1.5, k, 50, multiple=4) for k in range(6)]
        [8, 12, 16, 24, 40, 48]
    """
    if growth == 1.0 or step == 0:
        return min(start, largest)
    # Past the step where b_0 g^k reaches B it stays at B: no overflow for any step.
    if step * math.log(growth) >= math.log(largest / start) + math.log(2.0):
        size = float(largest)
    else:
        size = min(float(largest), start * growth**step)
    return min(multiple * math.floor(size * (1.0 + 1e-12) / multiple), largest - largest % multiple)


def batch_sizes(
    leaf: OptimizerConfig, n: int, distributed: bool, step: int = 0
) -> tuple[int, int | None, bool]:
    """The gradient batch of step ``step`` (counted from the entry's or phase's start), HF's
    separate curvature batch (None: the gradient batch), and whether the curvature batch is
    replicated on every rank rather than sharded.

    The curvature batch is the first ``curvature_batch_size`` cases of the gradient batch, or
    its ``curvature_fraction`` (rounded to a multiple of ``batch_multiple``, at least one);
    a growing batch that has become the whole training set takes all of it as its curvature
    batch (as ``experiments/scorecard.py``'s ``_curvature_size``: once the step is a
    deterministic full-batch step, the curvature batch no longer safeguards the fit), after
    ``curvature_fraction_full_steps`` steps on it that still take the fraction (the
    scorecard's ``full_curvature_after``).

    Example:
        >>> from hessfree.train.config import BudgetConfig
        >>> leaf = OptimizerConfig("hessianfree", "hf", {}, 100, 25, BudgetConfig())
        >>> batch_sizes(leaf, 1000, False)
        (100, 25, False)
        >>> grow = OptimizerConfig("hessianfree", "hf", {}, 250, None, BudgetConfig(),
        ...                        batch_growth=1.1, curvature_fraction=0.25)
        >>> [batch_sizes(grow, 4000, False, k)[:2] for k in (0, 1, 29, 30)]
        [(250, 62), (275, 69), (3965, 991), (4000, None)]
        >>> import dataclasses
        >>> late = dataclasses.replace(grow, curvature_fraction_full_steps=4)
        >>> [batch_sizes(late, 4000, False, k)[:2] for k in (29, 30, 33, 34)]
        [(3965, 991), (4000, 1000), (4000, 1000), (4000, None)]
    """
    largest = min(leaf.batch_max or n, n)
    batch_size = grown_batch_size(
        leaf.batch_size or n, leaf.batch_growth, step, largest, leaf.batch_multiple
    )
    curvature_size = leaf.curvature_batch_size
    if leaf.curvature_fraction is not None:
        m = leaf.batch_multiple
        curvature_size = (
            batch_size
            if leaf.growing and _full_since(leaf, step, n, largest)
            else m * max(1, round(batch_size * leaf.curvature_fraction / m))
        )
    # A replicated curvature batch is the same on every rank, so it needs its own closure
    # even when it is the whole gradient batch (the gradient batch is sharded).
    replicated = leaf.hyperparameters.get("curvature_batch") == "replicated"
    if curvature_size is not None and curvature_size >= batch_size:
        curvature_size = batch_size if replicated and distributed else None
    elif curvature_size is None and replicated and distributed:
        curvature_size = batch_size
    return batch_size, curvature_size, replicated


def _full_since(leaf: OptimizerConfig, step: int, n: int, largest: int) -> bool:
    """Whether a growing batch has covered the whole training set for more than
    ``curvature_fraction_full_steps`` steps before step ``step`` (so this step's curvature batch
    is all of it).

    Sizes never shrink, so the first :math:`s` steps at the whole set are those whose batch
    :math:`s` steps earlier was smaller: step :math:`k` is past them iff
    :math:`b_{k-s} \\ge N` (:math:`k \\ge s`). A function of the step alone, as the sizes are.
    """
    back = step - leaf.curvature_fraction_full_steps
    if back < 0:
        return False
    start = leaf.batch_size or n
    return grown_batch_size(start, leaf.batch_growth, back, largest, leaf.batch_multiple) >= n


def set_damping_floor(leaf: OptimizerConfig, optimizer: optim.Optimizer, batch_size: int) -> None:
    """Set HF's λ floor for the next step to ``min_damping_cases`` / ``batch_size`` (nothing
    when the entry has no ``min_damping_cases``).

    ``batch_size`` is the step's whole gradient batch, all ranks' cases in a data-parallel run,
    so every rank sets the same floor. HessianFree re-reads ``min_damping`` from its param
    groups at every step and saves them in its ``state_dict``; the floor is a function of the
    step count, as the size is, so a resumed run sets the same one (the scorecard's
    ``floor_cases`` does the same in its own loop). A mini-batch's noise in the gradient and
    curvature falls as 1 / b, and so does the floor: ``min_damping_cases`` 75 keeps 250-case
    steps at λ ≥ 0.3 and lets 1,000-case steps go to 0.075 (``experiments/README.md``, "lead,
    stop 48").

    Example:
        >>> import torch
        >>> from hessfree import HessianFree
        >>> from hessfree.train.config import BudgetConfig
        >>> leaf = OptimizerConfig("hessianfree", "hf", {}, 250, None, BudgetConfig(),
        ...                        batch_growth=1.1, min_damping_cases=75.0)
        >>> opt = HessianFree(torch.nn.Linear(2, 1).parameters())
        >>> set_damping_floor(leaf, opt, 1000)
        >>> opt.param_groups[0]["min_damping"]
        0.075
    """
    if leaf.min_damping_cases is None:
        return
    floor = leaf.min_damping_cases / batch_size
    for group in optimizer.param_groups:  # HF reads group 0's; the groups must agree
        group["min_damping"] = floor


def describe_batches(leaf: OptimizerConfig, n: int) -> str:
    """The batch schedule in words (and a ``min_damping_cases`` floor), for the runner's start
    line.

    Example:
        >>> from hessfree.train.config import BudgetConfig
        >>> grow = OptimizerConfig("hessianfree", "hf", {}, 250, None, BudgetConfig(),
        ...                        batch_growth=1.1, curvature_fraction=0.25)
        >>> print(describe_batches(grow, 4000).replace(", ", ",\\n"))
        batch 250 growing x1.1 per step to 4000 (step 30),
        curvature batch 0.25 of it until the whole set
        >>> import dataclasses
        >>> late = dataclasses.replace(grow, curvature_fraction_full_steps=4)
        >>> describe_batches(late, 4000).split(", ")[1]
        'curvature batch 0.25 of it until 4 steps on the whole set'
        >>> floored = dataclasses.replace(grow, min_damping_cases=75.0)
        >>> describe_batches(floored, 4000).split(", ")[2]
        'λ floor 75 / batch (0.3 at 250)'
    """
    text = _describe_sizes(leaf, n)
    if leaf.min_damping_cases is not None:
        size = batch_sizes(leaf, n, False)[0]
        c = leaf.min_damping_cases
        text += f", λ floor {c:g} / batch ({c / size:.4g} at {size})"
    return text


def _describe_sizes(leaf: OptimizerConfig, n: int) -> str:
    size, curvature, _ = batch_sizes(leaf, n, False)
    if not leaf.growing:
        text = f"batch {size}"
        if leaf.curvature_fraction is not None:
            return text + f", curvature batch {leaf.curvature_fraction:g} of it ({curvature})"
        return text + (f", curvature batch {curvature}" if curvature else "")
    largest = min(leaf.batch_max or n, n)
    top = largest - largest % leaf.batch_multiple
    # The first step at the top: near log(B/b0)/log(g), corrected for the rounding.
    k = max(0, math.ceil(math.log(top / size) / math.log(leaf.batch_growth)) - 2)
    while batch_sizes(leaf, n, False, k)[0] < top:
        k += 1
    text = f"batch {size} growing x{leaf.batch_growth:.10g} per step to {top} (step {k})"
    if leaf.curvature_fraction is not None:
        until = ""
        if top >= n:
            s = leaf.curvature_fraction_full_steps
            until = (
                f" until {s} step{'s' * (s != 1)} on the whole set" if s else " until the whole set"
            )
        return text + f", curvature batch {leaf.curvature_fraction:g} of it{until}"
    return text + (f", curvature batch {curvature}" if curvature else "")


def converged(spec: OptimizerConfig, optimizer: optim.Optimizer, unchanged: bool) -> bool:
    """Whether the step just taken says the optimizer has converged.

    HessianFree reports it in ``last_step.status`` (``'converged'``: the gradient or the change
    fell below ``tolerance_grad`` / ``tolerance_change``, or the step was below the loss's float
    resolution), and it counts here only when the step left the parameters where they were
    (``last_step.accepted`` False). torch's L-BFGS ends one ``step()`` call on the same
    ``tolerance_change`` tests and goes on at the next: a 'converged' step that HessianFree
    accepted moved the parameters (a loss change below the absolute 1e-9 on a loss of 1e-7 is
    still 1 %), and the next step may move them again. On the whole training set, an L-BFGS
    step that left the parameters unchanged means it will not move again.
    """
    if spec.name == "hessianfree":
        last = getattr(optimizer, "last_step", None)
        status = getattr(last, "status", None)
        moved = bool(getattr(last, "accepted", False))
        return str(getattr(status, "value", status)) == "converged" and not moved
    return spec.name == "lbfgs" and unchanged


def _scalar(loss: Tensor | float | tuple) -> float:
    """A step's returned loss as a float (``(loss, outputs)`` pairs and graphs allowed)."""
    if isinstance(loss, tuple):
        loss = loss[0]
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def take_step(
    spec: OptimizerConfig,
    optimizer: optim.Optimizer,
    model: nn.Module,
    objective: Objective,
    group: Group,
    batch: tuple[Tensor, Tensor],
    curvature: tuple[Tensor, Tensor] | None,
    cut: Callable[[], bool] | None = None,
) -> float:
    """One step of ``optimizer`` on ``batch`` (this rank's slice) and, for HF, the curvature
    batch; returns the batch loss before the step.

    ``cut`` (L-BFGS only) is asked before each evaluation of the step but its first; True ends
    the step there (:func:`_lbfgs_step`). It must answer alike on every rank.
    """
    if spec.name == "hessianfree":
        return _hessianfree_step(optimizer, model, objective, batch, curvature)
    if spec.name == "lbfgs":
        return _lbfgs_step(optimizer, model, objective, group, batch, cut)
    xb, tb = batch
    optimizer.zero_grad(set_to_none=True)
    loss = objective.loss(model(xb), tb)
    loss.backward()
    group.average_gradients(model.parameters())
    optimizer.step()
    return _scalar(loss)


def _hessianfree_step(
    optimizer: optim.Optimizer,
    model: nn.Module,
    objective: Objective,
    batch: tuple[Tensor, Tensor],
    curvature: tuple[Tensor, Tensor] | None,
) -> float:
    loss_fn = objective.loss
    # structural damping needs the hidden states (Martens & Sutskever 2011, §3.3); 'auto' (the
    # default) turns it on exactly when they are given
    with_hidden = getattr(optimizer, "structural_damping", 0.0) != 0 and hasattr(
        model, "forward_with_hidden"
    )

    def evaluate(x: Tensor, t: Tensor) -> tuple[Tensor, ...]:
        # the optimizer reads hidden states only from the calls that build a graph: its
        # no_grad evaluations (line search, backtracking) skip their copy of every state
        if with_hidden and torch.is_grad_enabled():
            outputs, hidden = model.forward_with_hidden(x)
            return loss_fn(outputs, t), outputs, hidden
        outputs = model(x)
        return loss_fn(outputs, t), outputs

    def closure() -> tuple[Tensor, ...]:
        return evaluate(*batch)

    curvature_closure = None
    if curvature is not None:

        def curvature_closure() -> tuple[Tensor, ...]:
            return evaluate(*curvature)

    try:
        return _scalar(optimizer.step(closure, curvature_closure))
    except StepCut as cut:  # between two HF steps of one call: each one complete
        return cut.loss


def _lbfgs_step(
    optimizer: optim.Optimizer,
    model: nn.Module,
    objective: Objective,
    group: Group,
    batch: tuple[Tensor, Tensor],
    cut: Callable[[], bool] | None = None,
) -> float:
    """One ``torch.optim.LBFGS`` step; ``cut`` can end it at an iteration's evaluation.

    A step runs up to ``max_iter`` iterations, each one or more evaluations of the closure
    (one without a line search: the loss and gradient where the iteration moved). Budgets and
    signals are checked between the runner's steps, so ``max_iter: 9223372036854775807`` would
    make a step no budget could end. When ``cut()`` says so, the closure skips the evaluation,
    leaves zero gradients and returns :math:`-\\infty`: L-BFGS takes that as optimal
    (``max |g| <= tolerance_grad``, which the config keeps >= 0) and leaves its loop through
    its own exit, storing the direction, step length and history of the iterations taken.
    Without a line search the weights and state are bitwise those of a step with ``max_iter``
    equal to the iterations taken (``func_evals`` aside, which counts the skipped evaluation);
    with ``strong_wolfe`` the line search accepts its current trial point at once (a loss of
    :math:`-\\infty` passes Armijo's test, a zero gradient the curvature test), so the history
    and direction are those of a step of as many iterations and the weights that trial point. The
    next step's first evaluation computes their loss. While ``cut()`` is False the step is
    bitwise the uncut one.
    """
    xb, tb = batch
    first: list[Tensor] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        if first and cut is not None and cut():
            return torch.tensor(-math.inf, dtype=first[0].dtype)
        loss = objective.loss(model(xb), tb)
        loss.backward()
        if not first:
            first.append(loss.detach())
        # L-BFGS decides on this loss: it must be the batch mean, the same on every rank
        return group.average_gradients(model.parameters(), loss)

    optimizer.step(closure)
    return _scalar(first[0])
