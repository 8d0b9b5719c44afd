"""Evaluation: the loss and the task metric on the train and test evaluation sets."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hessfree.train.objectives import Objective

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    objective: Objective,
    eval_sets: dict[str, tuple[Tensor, Tensor]],
    chunk: int,
) -> dict[str, float]:
    """``<split>_loss`` and ``<split>_<metric>`` for each set, in chunks of ``chunk`` cases,
    in eval mode (the model is back in train mode afterwards).

    Where a split's loss is not finite (a diverged model), its metric is NaN too (``null`` in
    ``metrics.jsonl``): an argmax over NaN logits is no prediction, and its accuracy would
    otherwise enter the summary's best values.
    """
    model.eval()
    out: dict[str, float] = {}
    try:
        for split, (x, t) in eval_sets.items():
            loss_sum = metric_sum = 0.0
            for start in range(0, x.shape[0], chunk):
                xb, tb = x[start : start + chunk], t[start : start + chunk]
                outputs = model(xb)
                # Both reductions are means over cases: weight each chunk by its size.
                loss_sum += float(objective.loss(outputs, tb)) * xb.shape[0]
                metric_sum += float(objective.metric(outputs, tb)) * xb.shape[0]
            out[f"{split}_loss"] = loss_sum / x.shape[0]
            metric = metric_sum / x.shape[0] if math.isfinite(loss_sum) else math.nan
            out[f"{split}_{objective.metric_name}"] = metric
    finally:
        model.train()
    return out
