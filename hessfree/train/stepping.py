"""One optimizer step on one batch, per kind of optimizer, and what a step says afterwards.

HessianFree takes ``(closure, curvature_closure)`` returning ``(loss, outputs[, hidden])`` and
averages over the ranks of a data-parallel run itself; torch's L-BFGS re-evaluates a closure
that must return the batch-mean loss with gradients; Adam and SGD take one backward pass. In a
data-parallel run the gradients of the latter two (and L-BFGS's loss) are averaged here after
``backward``, so every rank takes the same step.
"""

from __future__ import annotations

from torch import Tensor, nn, optim

from hessfree.train.config import OptimizerConfig
from hessfree.train.objectives import Objective
from hessfree.train.parallel import Group

__all__ = ["batch_sizes", "converged", "take_step"]


def batch_sizes(leaf: OptimizerConfig, n: int, distributed: bool) -> tuple[int, int | None, bool]:
    """The gradient batch, HF's separate curvature batch (None: the gradient batch), and
    whether the curvature batch is replicated on every rank rather than sharded.

    The curvature batch is the first ``curvature_batch_size`` cases of the gradient batch.

    Example:
        >>> from hessfree.train.config import BudgetConfig
        >>> leaf = OptimizerConfig("hessianfree", "hf", {}, 100, 25, BudgetConfig())
        >>> batch_sizes(leaf, 1000, False)
        (100, 25, False)
    """
    batch_size = leaf.batch_size or n
    curvature_size = leaf.curvature_batch_size
    # A replicated curvature batch is the same on every rank, so it needs its own closure
    # even when it is the whole gradient batch (the gradient batch is sharded).
    replicated = leaf.hyperparameters.get("curvature_batch") == "replicated"
    if curvature_size is not None and curvature_size >= batch_size:
        curvature_size = batch_size if replicated and distributed else None
    elif curvature_size is None and replicated and distributed:
        curvature_size = batch_size
    return batch_size, curvature_size, replicated


def converged(spec: OptimizerConfig, optimizer: optim.Optimizer, unchanged: bool) -> bool:
    """Whether the step just taken says the optimizer has converged.

    HessianFree reports it in ``last_step.status`` (``'converged'``: the gradient or the change
    fell below ``tolerance_grad`` / ``tolerance_change``). torch's L-BFGS stops inside a step on
    the same tolerances; on the whole training set, a step that left the parameters unchanged
    means it will not move again.
    """
    if spec.name == "hessianfree":
        status = getattr(getattr(optimizer, "last_step", None), "status", None)
        return str(getattr(status, "value", status)) == "converged"
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
) -> float:
    """One step of ``optimizer`` on ``batch`` (this rank's slice) and, for HF, the curvature
    batch; returns the batch loss before the step."""
    if spec.name == "hessianfree":
        return _hessianfree_step(optimizer, model, objective, batch, curvature)
    if spec.name == "lbfgs":
        return _lbfgs_step(optimizer, model, objective, group, batch)
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
    # structural damping needs the hidden states (Martens & Sutskever 2011, §3.3)
    with_hidden = getattr(optimizer, "structural_damping", 0.0) > 0 and hasattr(
        model, "forward_with_hidden"
    )

    def evaluate(x: Tensor, t: Tensor) -> tuple[Tensor, ...]:
        if with_hidden:
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

    return _scalar(optimizer.step(closure, curvature_closure))


def _lbfgs_step(
    optimizer: optim.Optimizer,
    model: nn.Module,
    objective: Objective,
    group: Group,
    batch: tuple[Tensor, Tensor],
) -> float:
    xb, tb = batch
    first: list[Tensor] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective.loss(model(xb), tb)
        loss.backward()
        if not first:
            first.append(loss.detach())
        # L-BFGS decides on this loss: it must be the batch mean, the same on every rank
        return group.average_gradients(model.parameters(), loss)

    optimizer.step(closure)
    return _scalar(first[0])
