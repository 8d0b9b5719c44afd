"""Build the optimizers a config names, and read Hessian-free step diagnostics.

``hessianfree`` is :class:`hessfree.HessianFree`, imported lazily (:func:`hessianfree_class`;
the runner sits above the core and the core never imports it); ``adam``, ``sgd`` and
``lbfgs`` are ``torch.optim``'s. Hyperparameters are passed through unchanged: the YAML keys
are the constructors' keyword arguments.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from hessfree.train.config import OptimizerConfig
from hessfree.train.metrics import clean_value

__all__ = ["build_optimizer", "hessianfree_class", "hf_diagnostics"]


def hessianfree_class() -> type:
    """:class:`hessfree.HessianFree`, imported when an HF entry is built."""
    from hessfree import HessianFree  # noqa: PLC0415

    return HessianFree


# The K-FAC preconditioner whose forward hooks are on a model, removed when the model's next
# optimizer is built (a later phase or entry), so stale hooks never record its forward passes.
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def build_optimizer(
    spec: OptimizerConfig,
    params: Iterable[Tensor],
    model: torch.nn.Module | None = None,
    callback: Callable[[Any], None] | None = None,
) -> torch.optim.Optimizer:
    """Construct the optimizer of one config entry over ``params``.

    ``precond: {name: kfac, ...}`` (checked by the config) builds a
    :class:`hessfree.KFACPreconditioner` on ``model``'s ``nn.Linear`` layers with the given
    options. ``callback`` (HessianFree only; YAML cannot give one) is called after each HF step
    of a ``step()`` call: the runner's way to end a call of ``max_iter`` > 1 steps between them.

    Raises:
        ValueError: Unknown optimizer name; K-FAC without a ``model`` or on a model without
            ``nn.Linear`` layers.
    """
    if model is not None and model in _HOOKED:
        _HOOKED.pop(model).remove()
    kwargs = dict(spec.hyperparameters)
    if spec.name == "hessianfree":
        precond = kwargs.get("precond")
        if isinstance(precond, Mapping) and precond.get("name") == "kfac":
            kwargs["precond"] = _kfac(precond, model)
            _HOOKED[model] = kwargs["precond"]
        if callback is not None:
            kwargs["callback"] = callback
        return hessianfree_class()(params, **kwargs)
    if spec.name == "adam":
        kwargs["betas"] = tuple(kwargs["betas"])
        return torch.optim.Adam(params, **kwargs)
    if spec.name == "sgd":
        return torch.optim.SGD(params, **kwargs)
    if spec.name == "lbfgs":
        return torch.optim.LBFGS(params, **kwargs)
    raise ValueError(
        f"Unknown optimizer {spec.name!r}; expected 'hessianfree', 'adam', 'sgd' or 'lbfgs'."
    )


def _kfac(options: Mapping[str, Any], model: torch.nn.Module | None) -> Any:
    from hessfree import KFACPreconditioner  # noqa: PLC0415

    if model is None:
        raise ValueError("precond: kfac needs the model whose nn.Linear layers it preconditions.")
    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        raise ValueError(
            f"precond: kfac preconditions nn.Linear layers, but the model ({type(model).__name__})"
            " has none; use precond: martens, nystrom or null."
        )
    return KFACPreconditioner(model, **{k: v for k, v in options.items() if k != "name"})


def hf_diagnostics(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``hf_<field>`` for each field of ``optimizer.last_step`` (a frozen dataclass), if any.

    Scalars (numbers, bools, strings, enums, one-element tensors) are kept; other fields
    (vectors, nested objects) are skipped so a metrics line stays small.
    """
    last = getattr(optimizer, "last_step", None)
    if last is None or not dataclasses.is_dataclass(last):
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(last):
        value = getattr(last, f.name)
        if isinstance(value, Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        value = clean_value(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            out[f"hf_{f.name}"] = value
    return out
