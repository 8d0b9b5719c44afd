"""The ``(model, loss_fn, data)`` arguments of the operators: checks, batches, model calls.

Every check raises ``TypeError`` for a wrong type and ``ValueError`` for a bad value, naming
the argument (``data[3] inputs``) and suggesting a fix. The model and the loss are called only
through :func:`_call_model` and :func:`_call_loss`, which turn their failures into such errors.
Dropout and train-mode BatchNorm (:func:`_is_stochastic`) change the function between forward
passes, so :func:`_check_model` refuses them unless asked not to; the optimizer shares the
wording.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from ._checks import check_choice
from ._flat import trainable
from ._graph_ops import twice_differentiable_attention, twice_differentiable_weight_norm


def _shape(x: object) -> object:
    """A short description of ``x`` for error messages: its shape, or its type."""
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _to_device(x: Any, device: torch.device) -> Any:
    """``x`` with every tensor in it moved to ``device``, containers rebuilt as they were.

    A model of several inputs takes them as a tuple, list, dict, namedtuple or dataclass
    (nested as it likes); each tensor inside is moved, and a container is rebuilt (same type,
    same keys or fields) only when something in it moved, so on the parameters' device the
    model gets the very objects it was given. Other objects (a mapping that is not a dict, a
    string) pass unchanged.
    """
    if isinstance(x, Tensor):
        # the check costs 0.8 µs, a Tensor.to that returns x itself 4.7 (operators13)
        return x if x.device == device else x.to(device=device, non_blocking=True)
    if isinstance(x, tuple | list):
        items = [_to_device(v, device) for v in x]
        if all(a is b for a, b in zip(items, x, strict=True)):
            return x
        if hasattr(x, "_fields"):  # a namedtuple: positional fields
            return type(x)(*items)
        return type(x)(items)
    if isinstance(x, dict):
        moved = {k: _to_device(v, device) for k, v in x.items()}
        if all(moved[k] is v for k, v in x.items()):
            return x
        out = copy.copy(x)  # keeps a subclass (OrderedDict, defaultdict) and its extras
        out.update(moved)
        return out
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = [f.name for f in dataclasses.fields(x) if f.init]
        moved = {k: _to_device(getattr(x, k), device) for k in fields}
        if all(moved[k] is getattr(x, k) for k in fields):
            return x
        return dataclasses.replace(x, **moved)
    return x


def _resolve_params(model: object, params: Iterable[Tensor] | None) -> list[Tensor]:
    if params is not None:
        if isinstance(params, Iterable) and not isinstance(params, (Tensor, nn.Module)):
            params = list(params)  # a generator is read once, here
            _refuse_frozen(params)
        resolved = trainable(params)
        _check_no_shared_memory(resolved)
        return resolved
    if isinstance(model, nn.Module):
        return trainable(model)
    raise TypeError(
        f"`params` is required when `model` is not an nn.Module (got {type(model).__name__}); "
        "pass the tensors to differentiate with respect to."
    )


def _refuse_frozen(params: list[Any]) -> None:
    """Refuse a listed tensor that does not require grad, as the products do
    (``curvature._check_trained``): ``trainable`` dropped it, and the operator came out with
    fewer columns than the list has entries, silently (spectral18)."""
    tensors = [p for p in params if isinstance(p, Tensor)]
    for i, p in enumerate(params):
        if isinstance(p, Tensor) and not p.requires_grad:
            kept = sum(q.numel() for q in tensors if q.requires_grad)
            raise ValueError(
                f"`params[{i}]` (shape {tuple(p.shape)}) does not require grad: a frozen tensor "
                f"is a constant of the loss, with no curvature to take (the operator would "
                f"have {kept} columns, not {sum(q.numel() for q in tensors)}). Pass only the "
                "trained ones, hessfree.trainable(params), or leave `params` out for the "
                "model's trainable parameters; requires_grad_(True) includes it."
            )


def _byte_span(p: Tensor) -> tuple[int, int]:
    """The bytes ``[start, stop)`` of ``p``'s storage its elements lie within (torch's strides
    are never negative)."""
    size, start = p.element_size(), p.storage_offset()
    extent = 1 + sum((n - 1) * s for n, s in zip(p.shape, p.stride(), strict=True))
    return start * size, (start + extent) * size


def _check_no_shared_memory(params: list[Tensor]) -> None:
    """Refuse two ``params`` over the same memory (a tensor and a view of it, two views).

    ``ParamLayout`` refuses a tensor given twice; a view (``w.view(-1)``, ``w[0]``) is another
    tensor object, so it passed, and its rows and columns of every operator were silently zero
    (the model uses ``w``, not the view; operators14). Spans are compared, so two interleaved
    but disjoint views (``w[:, 0]``, ``w[:, 1]``) are refused too: the model never reads those.
    """
    spans: dict[int, list[tuple[int, int, int]]] = {}
    for i, p in enumerate(params):
        if p.numel() == 0 or p.layout != torch.strided:  # no bytes, or no one span of them
            continue
        start, stop = _byte_span(p)
        seen = spans.setdefault(p.untyped_storage().data_ptr(), [])
        for j, s0, s1 in seen:
            # the same tensor twice is ParamLayout's to refuse, in its own words
            if start < s1 and s0 < stop and params[j] is not p:
                raise ValueError(
                    f"`params[{i}]` (shape {tuple(p.shape)}) shares memory with `params[{j}]` "
                    f"(shape {tuple(params[j].shape)}): one is a view of the other or both view "
                    "one tensor. The model computes with one of them only, so the other's "
                    "rows and columns of the operator would be zero: pass each parameter once, "
                    "as the tensor the model uses (model.parameters() does)."
                )
        seen.append((i, start, stop))


_MODAL = (_BatchNorm, _DropoutNd)  # the modules whose training mode _is_stochastic reads

#: Models given to an operator with ``allow_training_mode=True``: the only ones whose model
#: calls look for train-mode BatchNorm statistics to keep (:func:`_running_stats`), so that no
#: other model pays for the module scan (1.5 µs a module) on every forward pass.
_STATS_KEPT: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _module_of(model: object) -> nn.Module | None:
    """``model`` if it is a module, else the module its bound method belongs to, or ``None``."""
    module = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    return module if isinstance(module, nn.Module) else None


def _is_stochastic(module: nn.Module) -> bool:
    """Train-mode BatchNorm or Dropout (p > 0): the forward pass differs between calls."""
    return module.training and (
        isinstance(module, _BatchNorm) or (isinstance(module, _DropoutNd) and module.p > 0)
    )


def _stochastic_modules_message(found: Iterable[str]) -> str:
    """The shared wording (operators and optimizer) for modules found by :func:`_is_stochastic`."""
    return (
        f"modules in training mode that change between forward passes: {', '.join(found)}; "
        "curvature products would not come from one matrix"
    )


def _check_model(model: object, allow_training_mode: bool) -> list[tuple[str, nn.Module]]:
    """Refuse modules whose forward pass differs between calls (cheap module scan).

    Returns the model's BatchNorm and Dropout modules, named (none with
    ``allow_training_mode``), for :func:`_check_modes_kept` before later forward passes.
    """
    if not callable(model):
        raise TypeError(f"`model` must be an nn.Module or a callable, got {type(model).__name__}.")
    module = _module_of(model)
    if allow_training_mode:
        if module is not None:
            _STATS_KEPT.add(module)
        return []
    if module is None:
        return []
    modes = [(name, m) for name, m in module.named_modules() if isinstance(m, _MODAL)]
    found = [f"{name or '<model>'} ({type(m).__name__})" for name, m in modes if _is_stochastic(m)]
    if found:
        raise ValueError(
            f"`model` has {_stochastic_modules_message(found)}. Call model.eval() before "
            "building the operator, or pass allow_training_mode=True if the randomness is "
            "intended."
        )
    return modes


def _check_modes_kept(modes: list[tuple[str, nn.Module]]) -> None:
    """Refuse a product once ``model.train()`` made a module :func:`_check_model` accepted
    stochastic: each product's forward passes would then draw another matrix."""
    found = [f"{name or '<model>'} ({type(m).__name__})" for name, m in modes if _is_stochastic(m)]
    if found:
        raise RuntimeError(
            f"`model` now has {_stochastic_modules_message(found)}: it was put in training "
            "mode after the operator was built (e.g. model.train() between products). Call "
            "model.eval() before using the operator (and model.train() after), or build it "
            "with allow_training_mode=True if the randomness is intended."
        )


class _BufferWatch:
    """The model's buffers and their version counters, to catch forward passes that write them.

    A train-mode ``spectral_norm`` (``parametrizations`` or the older hook) runs a step of
    power iteration in every forward pass, writing its ``_u``/``_v`` buffers in place; a
    custom module may keep a running average the same way. Each forward pass then computes
    another function, so uncached products drift (two ``H @ I`` of an uncached Hessian over a
    fresh spectral-norm layer 0.017 apart) and reading the curvature writes to the model
    (building a cached one moved ``_u`` by 0.031: experiments/README.md, "operators15").
    :func:`_check_model` knows only Dropout and BatchNorm by type; this sees any such module
    by what its forward pass did: each pass of the operator's own forward passes is bracketed
    by :meth:`versions` and :meth:`refuse_written` (a read of each buffer's version counter,
    no module walk). Writes between products (a training loop's) are the caller's and are not
    counted. The counters are shared by all threads, so a forward pass of the same model that
    another thread runs during a product (a training step) is counted as the product's; the
    message says so, since such writes change the function under the product's passes as
    much as its own (telling the threads apart would need a per-thread dispatch hook on every
    operation; the parameters are checked the same way, :class:`_ParamStamps` in
    :mod:`hessfree._product_sources`). Nothing is watched with
    ``allow_training_mode=True`` (a train-mode BatchNorm's statistics are kept by
    :func:`_call_model` on clones, which leave the buffers' counters as they were).
    """

    def __init__(self, model: object, allow_training_mode: bool) -> None:
        module = _module_of(model)
        self._module = module
        self._buffers = (
            [] if allow_training_mode or module is None else list(module.named_buffers())
        )

    def versions(self) -> list[int]:
        """The buffers' version counters now."""
        return [b._version for _, b in self._buffers]

    def refuse_written(self, before: list[int], at_construction: bool) -> None:
        """Raise if a buffer's counter moved since ``before`` (``ValueError`` while building
        the operator, ``RuntimeError`` from a product), naming the buffers and their modules."""
        written = [
            name for (name, b), v in zip(self._buffers, before, strict=True) if b._version != v
        ]
        if not written:
            return
        assert self._module is not None  # buffers are only watched on a module
        owners = []
        for name in written[:3]:
            owner = name.rpartition(".")[0]
            kind = type(self._module.get_submodule(owner)).__name__
            owners.append(f"{name} (in {owner or '<model>'}, {kind})")
        more = f" and {len(written) - 3} more" if len(written) > 3 else ""
        what = (
            f"`model`'s forward pass writes to its buffers: {', '.join(owners)}{more}. A module "
            "that updates state on every call (a train-mode spectral_norm's power iteration, a "
            "running average) computes another function in each forward pass, so products "
            "would not come from one matrix, and reading the curvature would change the model. "
        )
        # The counters are the tensors', shared by all threads: another thread's forward pass
        # of this model during ours (a training step) is counted too, and is named below.
        threads = (
            " If another thread ran a forward pass of this model meanwhile (a training step), "
            "the writes may be its: they change the function under the operator's passes too, "
            "so hold one lock around the operator's use and that thread's steps."
        )
        if at_construction:
            raise ValueError(
                what + "Call model.eval() before building the operator, or pass "
                "allow_training_mode=True if the updates are intended." + threads
            )
        raise RuntimeError(
            what + "It did not when the operator was built (model.train() since?): call "
            "model.eval() before using the operator (and model.train() after), or build it "
            "with allow_training_mode=True if the updates are intended." + threads
        )


def _resolve_reduction(loss_fn: object, reduction: str | None) -> str:
    """``loss_fn.reduction`` (or a ``functools.partial``'s keyword), else ``reduction``.

    ``nn.KLDivLoss``'s ``'batchmean'`` (the sum over a batch divided by its examples, the
    divergence torch recommends) is a mean over the examples, which is all ``'mean'`` means
    here (batch weights :math:`N_b/N`, the Fisher's :math:`1/N`); it was refused as an
    unknown reduction, and ``reduction='mean'`` then as disagreeing with it.
    """
    own = getattr(loss_fn, "reduction", None)
    if own is None and isinstance(loss_fn, functools.partial):
        own = loss_fn.keywords.get("reduction")
    if own == "batchmean":
        own = "mean"
    if own is None:
        return check_choice(
            "reduction", "mean" if reduction is None else reduction, ("mean", "sum")
        )
    if reduction is not None and reduction != own:
        raise ValueError(
            f"`reduction` is {reduction!r} but `loss_fn.reduction` is {own!r}; drop the "
            "`reduction` argument or make the two agree."
        )
    return check_choice("loss_fn.reduction", own, ("mean", "sum"))


def _class_weighting(loss_fn: object) -> tuple[Tensor | None, int] | None:
    """``(weight, ignore_index)`` of a cross-entropy or NLL loss (module, function or a
    ``functools.partial`` of the function), else ``None``."""
    if isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss):
        return loss_fn.weight, loss_fn.ignore_index
    fn, keywords = loss_fn, {}
    if isinstance(loss_fn, functools.partial):
        fn, keywords = loss_fn.func, loss_fn.keywords
    if fn is nn.functional.cross_entropy or fn is nn.functional.nll_loss:
        return keywords.get("weight"), keywords.get("ignore_index", -100)
    return None


def _batch_count(loss_fn: object, outputs: Tensor, targets: Any) -> float:
    r"""What a ``'mean'`` ``loss_fn`` divides this batch's summed loss by, in examples.

    :math:`N_b`, the outputs' dimension 0, except for cross-entropy and NLL losses with class
    indices as targets: torch divides their sum by the total class weight of the targets that
    are not ``ignore_index`` (:math:`\sum_i w_{y_i}`, the count of kept targets without a
    ``weight``), so batches with ignored or differently weighted targets have other shares of
    the loss over all the data than :math:`N_b/N`. Returned in examples (scaled by
    :math:`N_b` / the number of targets, so :math:`N_b` exactly when nothing is ignored and
    there is no ``weight``).
    """
    n = outputs.shape[0] if outputs.dim() else 1
    spec = _class_weighting(loss_fn)
    if spec is None or not isinstance(targets, Tensor) or targets.is_floating_point():
        return n  # probability targets: torch divides by the number of targets
    weight, ignore_index = spec
    kept = targets != ignore_index
    if weight is None:
        counted = float(kept.sum())
    else:
        counted = float(weight.to(outputs.device)[targets[kept]].sum())
    if weight is None and counted == targets.numel():
        return n  # the common case, bitwise as before
    return counted * n / max(targets.numel(), 1)


def _as_pair(batch: object, where: str) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = (
            f"{type(batch).__name__} of length {len(batch)}"
            if isinstance(batch, (tuple, list))
            else type(batch).__name__
        )
        # a Dataset of dicts (Hugging Face style) batches into dicts: say how to pair them
        hint = (
            f" A dict batch (keys {', '.join(map(repr, list(batch)[:4]))}) is not split "
            "into inputs and targets for you: give the DataLoader a collate_fn that returns "
            "the pair, e.g. collate_fn=lambda rows: (default_collate([r['x'] for r in rows]), "
            "default_collate([r['y'] for r in rows]))."
            if isinstance(batch, Mapping)
            else ""
        )
        raise TypeError(f"`{where}` must be an (inputs, targets) pair, got a {got}.{hint}")
    return batch[0], batch[1]


def _single_batch(data: object) -> tuple[Any, Any] | None:
    """``data`` as one ``(inputs, targets)`` pair, or ``None`` if it is an iterable of batches."""
    if isinstance(data, Tensor):
        raise TypeError(
            "`data` must be an (inputs, targets) pair or an iterable of such pairs, got a "
            f"tensor of shape {tuple(data.shape)}."
        )
    if isinstance(data, (tuple, list)):
        # an array is not a batch either: (array, targets) is one pair whose inputs the
        # model call then refuses with the fix (a tensor), not "data[0] must be a pair";
        # nor is a tensor of targets, so (inputs, targets) with inputs a tuple or dict (a
        # model of several inputs) is one pair too, not two batches
        if len(data) == 2 and (
            isinstance(data[0], Tensor | np.ndarray) or isinstance(data[1], Tensor | np.ndarray)
        ):
            return data[0], data[1]
        if len(data) == 1:
            return _as_pair(data[0], "data[0]")
        if len(data) == 0:
            raise ValueError(
                "`data` is empty; pass an (inputs, targets) pair or a non-empty list of them."
            )
        return None
    if not isinstance(data, Iterable):
        raise TypeError(
            "`data` must be an (inputs, targets) pair or an iterable of such pairs (a list, a "
            f"DataLoader), got {type(data).__name__}."
        )
    if iter(data) is data:  # type: ignore[call-overload]
        raise TypeError(
            f"`data` is a one-shot iterator ({type(data).__name__}); every product iterates over "
            "the data again, so pass a list of batches or a DataLoader."
        )
    reason = _one_pass_reason(data)
    if reason is not None:
        raise TypeError(
            f"`data` can be iterated only once: {reason}. Every product iterates over the data "
            "again (and the constructor reads its first batch), so a second pass would see "
            "what the first left: pass a list of batches, a DataLoader over a map-style "
            "Dataset, or make __iter__ start a new pass on every call."
        )
    return None


def _one_pass_reason(data: object) -> str | None:
    """Why ``data`` hands out the same iterator on every pass, or ``None``.

    A class whose ``__iter__`` returns one iterator made once (``return self.gen``), or a
    ``DataLoader`` over an ``IterableDataset`` that does: every pass would continue where the
    last stopped, so the first product silently misses the batch the constructor read and
    later ones see no data. Two ``iter`` calls tell (a generator function's body does not
    run until the first ``next``); a ``DataLoader`` is not asked itself, since one with
    ``persistent_workers=True`` rightly returns its one iterator, reset.
    """
    if isinstance(data, DataLoader):
        dataset = data.dataset
        if isinstance(dataset, IterableDataset) and iter(dataset) is iter(dataset):
            return (
                f"it is a DataLoader over an IterableDataset ({type(dataset).__name__}) whose "
                "__iter__ returns the same iterator on every call"
            )
        return None
    if iter(data) is iter(data):  # type: ignore[call-overload]
        return f"its __iter__ ({type(data).__name__}) returns the same iterator on every call"
    return None


def _pass_count(data: Iterable[Any]) -> int | None:
    """The batches in one pass over ``data``, having checked that a second pass starts.

    A class whose ``__iter__`` makes a fresh generator over one shared one-shot source (an
    iterator made once, a file read once) passes :func:`_one_pass_reason`'s test, but every
    pass continues where the last stopped: the constructor's look at the first batch would
    take it from the first product, and the next product would see none. One counting pass
    (no forward passes; the batches are read and dropped) and the start of a second tell it,
    at construction. ``None`` for a list or tuple of batches and a ``DataLoader`` over a
    map-style ``Dataset``, which every pass reads from the start by construction.
    """
    if isinstance(data, list | tuple) or (
        isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset)
    ):
        return None
    count = sum(1 for _ in data)
    if count and next(iter(data), None) is None:
        raise TypeError(
            f"`data` can be iterated only once: a first pass over it ({type(data).__name__}) "
            f"yielded {count} batch(es), a second none (its __iter__ draws from one shared "
            "source, e.g. an iterator or generator made once). Every product iterates over "
            "the data again, so pass a list of batches, a DataLoader over a map-style Dataset, "
            "or make __iter__ start a new pass over the source on every call."
        )
    return count


def _redraw_reason(data: object) -> str | None:
    """Why a ``DataLoader`` draws a different multiset of examples on each pass, or ``None``.

    Shuffling only reorders a sum over all the data; drawing with replacement, a random subset
    or dropping a random remainder changes the sum, so each product would have another matrix.
    """
    if not isinstance(data, DataLoader) or data.batch_size is None:
        return None  # a custom batch_sampler: nothing known about its draws
    sampler = data.sampler
    if isinstance(sampler, WeightedRandomSampler):
        return "a WeightedRandomSampler draws a random multiset of examples"
    if isinstance(sampler, RandomSampler):
        if sampler.replacement:
            return "a RandomSampler with replacement=True draws a random multiset of examples"
        if sampler.num_samples != len(sampler.data_source):
            return (
                f"a RandomSampler with num_samples={sampler.num_samples} of "
                f"{len(sampler.data_source)} examples draws a random subset"
            )
    elif not isinstance(sampler, SubsetRandomSampler):
        return None  # a fixed order: the same examples every pass
    dropped = len(sampler) % data.batch_size if data.drop_last else 0
    if dropped:
        return (
            f"shuffle=True with drop_last=True drops a random {dropped} of the {len(sampler)} "
            f"examples ({len(sampler)} % batch_size {data.batch_size})"
        )
    return None


def _check_same_examples(data: object) -> None:
    """Refuse a ``DataLoader`` whose passes draw different examples (:func:`_redraw_reason`)."""
    reason = _redraw_reason(data)
    if reason is not None:
        raise ValueError(
            f"`data` is a DataLoader that draws different examples on every pass: {reason}. "
            "Every product iterates over the data again, so the products would not come from "
            "one matrix. Use shuffle=False (the curvature over all the data does not depend on "
            "the order) and drop_last=False, or pass a fixed list of batches."
        )


def _check_rows(inputs: Any, where: str) -> None:
    """Refuse a batch of zero examples (it would give zero products and a NaN mean loss)."""
    if isinstance(inputs, Tensor) and inputs.dim() > 0 and inputs.shape[0] == 0:
        raise ValueError(
            f"`{where}` has zero rows (shape {tuple(inputs.shape)}); pass a batch with at least "
            "one example, as for an empty `data`."
        )


def _import_tqdm() -> Callable[..., Any]:
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise ImportError(
            "`progress=True` needs tqdm; install it with `pip install tqdm`."
        ) from err
    return tqdm


#: What to check when the model fails on its inputs (also the optimizer's closure hint).
_INPUT_MISMATCH_HINT = "Check that the inputs match the model (features, dtype, device)."


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _running_stats(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """The running-statistics buffers a forward pass of ``module`` would update in place.

    Those of BatchNorm modules in training mode that track them, as ``(module, name,
    buffer)``, in a model an operator accepted with ``allow_training_mode=True`` (others have
    none in training mode: refused).
    """
    return [
        (m, name, getattr(m, name))
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
        for name in _RUNNING_STATS
        if getattr(m, name, None) is not None
    ]


#: One lock per model in :data:`_STATS_KEPT`, held over a forward pass and its buffer swap.
_FORWARD_LOCKS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
_FORWARD_LOCKS_GUARD = threading.Lock()


def _forward_lock(module: nn.Module) -> threading.RLock:
    """The lock that serialises ``module``'s forward passes under :func:`_call_model`.

    The buffer swap assumes no other forward pass of the module runs meanwhile: two threads
    (a ``ThreadPool`` of ``eigsh`` calls on two operators over one model) that overlap out
    of order would leave one's clone, with that batch's statistics, in the module
    (experiments/README.md, "operators13"). Re-entrant, for a forward pass that calls the
    model again; the products' backward passes still run in parallel.
    """
    with _FORWARD_LOCKS_GUARD:
        lock = _FORWARD_LOCKS.get(module)
        if lock is None:
            lock = _FORWARD_LOCKS[module] = threading.RLock()
    return lock


def _call_model(model: Callable[[Any], Tensor], inputs: Any) -> Tensor:
    """``model(inputs)``, with a failure or a non-tensor result turned into a clear error.

    A train-mode BatchNorm's running statistics are put back after the call: the operators
    read the model, and each of their products runs forward passes (an ``eigsh`` hundreds),
    which would otherwise drag the statistics its eval mode uses towards the batches'. Only
    a model accepted with ``allow_training_mode=True`` is scanned for them, under its lock.
    """
    module = _module_of(model)
    if module is None or module not in _STATS_KEPT:
        return _call_model_keeping(model, inputs, [])
    with _forward_lock(module):
        return _call_model_keeping(model, inputs, _running_stats(module))


def _call_model_keeping(
    model: Callable[[Any], Tensor], inputs: Any, stats: list[tuple[nn.Module, str, Tensor]]
) -> Tensor:
    """:func:`_call_model` with the ``stats`` buffers swapped for clones over the call."""
    # The forward pass updates copies, which its graph may keep; the buffers stay as they were.
    for module, name, buffer in stats:
        setattr(module, name, buffer.clone())
    try:
        # products differentiate the backward pass
        with twice_differentiable_attention(), twice_differentiable_weight_norm():
            outputs = model(inputs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise ValueError(
            f"`model` failed on `inputs` of shape {_shape(inputs)}: {err}. {_INPUT_MISMATCH_HINT}"
        ) from err
    except TypeError as err:  # e.g. a tuple of inputs: it is passed as one argument
        if isinstance(inputs, np.ndarray):
            hint = "pass a tensor, torch.from_numpy(inputs)"
        else:
            hint = (
                "a tuple is not unpacked: pass lambda args: model(*args) as the model for "
                "several inputs"
            )
        raise TypeError(
            f"`model` failed on `inputs` ({_shape(inputs)}): {err}. The model is called "
            f"as model(inputs) with `inputs` as given ({hint})."
        ) from err
    finally:
        for module, name, buffer in stats:
            setattr(module, name, buffer)
    if isinstance(outputs, (tuple, list)):  # several heads
        raise TypeError(
            f"`model(inputs)` must return one tensor, got a {type(outputs).__name__} of "
            f"{len(outputs)} (a model with several heads?). The operators need one outputs "
            "tensor with the examples along dimension 0: return torch.cat of the heads' outputs "
            "(flattened per example) and split it in `loss_fn`; or use GGNProduct(loss, "
            "(o_1, ..., o_K), params), or HessianFree with a (loss, (o_1, ..., o_K)) closure, "
            "which take several output blocks."
        )
    if not isinstance(outputs, Tensor):
        hint = ""
        if isinstance(outputs, Mapping):  # e.g. {"logits": ...}, a Hugging Face ModelOutput
            key = next((k for k in outputs if isinstance(outputs[k], Tensor)), None)
            keys = ", ".join(map(repr, list(outputs)[:4]))
            hint = (
                f" with keys {keys}: pass lambda x: model(x)[{key!r}] as the model, with "
                "params=list(model.parameters())"
                if key is not None
                else f" with keys {keys} and no tensor among them"
            )
        raise TypeError(
            f"`model(inputs)` must return a tensor, got {type(outputs).__name__}{hint}."
        )
    return outputs


def _call_loss(loss_fn: Callable[[Tensor, Any], Tensor], outputs: Tensor, targets: Any) -> Tensor:
    """``loss_fn(outputs, targets)``, checked to be a scalar tensor, its failures worded."""
    try:
        loss = loss_fn(outputs, targets)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"`loss_fn` failed on outputs of shape {_shape(outputs)} and targets of shape "
            f"{_shape(targets)}: {err}."
        ) from err
    except TypeError as err:  # e.g. numpy targets: torch's own words are "'int' object ..."
        hint = (
            " The targets are a numpy array: pass a tensor, torch.from_numpy(targets)."
            if isinstance(targets, np.ndarray)
            else ""
        )
        raise TypeError(
            f"`loss_fn` failed on outputs of shape {_shape(outputs)} and targets "
            f"({_shape(targets)}): {err}.{hint}"
        ) from err
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"`loss_fn(outputs, targets)` must return a tensor, got {type(loss).__name__}."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"`loss_fn(outputs, targets)` must return a scalar, got shape {tuple(loss.shape)}; "
            "use a loss with reduction='mean' or 'sum'."
        )
    return loss
