"""Checks between sections, made before any data is loaded (the loaded data's are the runner's).

The loss is resolved from the model and the data (:func:`_resolve_loss`); model and data must
fit each other; sizes a data section fixes (cases, classes, input size) bound the batch sizes
and, with the model, the memory a run needs. Four rules are shared with the runner's checks
after loading (``hessfree.train.loop._data_problems``): :func:`loss_fits_targets`,
:func:`curvature_batch_fits`, :func:`full_steps_problem` and :func:`damping_floor_problems`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hessfree.train.config.schema import WINDOWS_RESERVED_TEXT, _show, windows_reserved
from hessfree.train.config.sections import (
    _DATA_TASK,
    _IMAGE_DATA,
    _SEQUENCE_DATA,
    _TORCH_OPTIMIZERS,
    ExperimentConfig,
    LossConfig,
    OptimizerConfig,
)

#: The targets each loss trains on: integer class labels or real values.
_LOSS_TARGETS = {"cross_entropy": "labels", "mse": "values", "bce_with_logits": "values"}
#: The targets of each natural task of a dataset.
_TASK_TARGETS = {"classification": "labels", "regression": "values"}


def loss_fits_targets(loss: str, target_kind: str | None) -> bool:
    """Whether ``loss`` trains on targets of ``target_kind`` (``labels`` or ``values``).

    Example:
        >>> loss_fits_targets("cross_entropy", "labels"), loss_fits_targets("mse", "labels")
        (True, False)
    """
    return _LOSS_TARGETS.get(loss) == target_kind


def curvature_batch_fits(leaf: OptimizerConfig, n: int | None) -> bool:
    """Whether HF's curvature batch is a slice of the gradient batch (``batch_size``, or the
    ``n`` training cases when it is null; ``n`` None: not known yet, nothing to compare)."""
    gradient_batch = leaf.batch_size or n
    return (
        leaf.curvature_batch_size is None
        or gradient_batch is None
        or leaf.curvature_batch_size <= gradient_batch
    )


def damping_floor_problems(
    path: str, leaf: OptimizerConfig, n: int | None, largest: float = math.inf
) -> list[str]:
    """Why HF would refuse ``leaf``'s first λ floor ``min_damping_cases`` / b₀ at its first
    step (b₀: the first gradient batch, ``batch_size`` or the ``n`` training cases; not known
    yet: nothing to say): a given ``damping`` below it, a given ``max_damping`` not above it,
    a floor beyond ``largest``, the parameters' dtype's range (λv would overflow in CG's
    first product). Batches never shrink, so the first step's floor is the highest.

    Example:
        >>> from hessfree.train.config.sections import BudgetConfig
        >>> leaf = OptimizerConfig("hessianfree", "hf", {"damping": 0.1, "max_damping": "auto"},
        ...                        250, None, BudgetConfig(), min_damping_cases=75.0)
        >>> print(damping_floor_problems("optimizers.0", leaf, None)[0])  # doctest: +ELLIPSIS
        `optimizers.0.damping` = 0.1 (hf) is below the first step's λ floor ... = 0.3; ...
    """
    c, b = leaf.min_damping_cases, leaf.batch_size or n
    if c is None or not b:
        return []
    floor = c / b
    first = f"min_damping_cases / the first batch = {c:g} / {b} = {floor:.6g}"
    out = []
    if floor > largest:
        out.append(
            f"`{path}.min_damping_cases` = {c!r} ({leaf.label}): the first step's λ floor "
            f"{first} is beyond the parameters' dtype (at most {largest:.4g}), where CG's "
            "products cannot hold it; use a smaller min_damping_cases."
        )
    damping, top = leaf.hyperparameters.get("damping"), leaf.hyperparameters.get("max_damping")
    if isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping < floor:
        out.append(
            f"`{path}.damping` = {damping!r} ({leaf.label}) is below the first step's λ floor "
            f"{first}; use damping >= {floor:.6g}, 'auto', or a smaller min_damping_cases."
        )
    if isinstance(top, (int, float)) and not isinstance(top, bool) and top <= floor:
        out.append(
            f"`{path}.max_damping` = {top!r} ({leaf.label}) does not exceed the first step's "
            f"λ floor {first}; use max_damping > {floor:.6g}, 'auto', or a smaller "
            "min_damping_cases."
        )
    return out


def full_steps_problem(path: str, leaf: OptimizerConfig, n: int) -> str | None:
    """Why ``curvature_fraction_full_steps`` cannot apply to ``leaf`` on ``n`` training cases
    (None: it can): a growing batch that ``batch_max`` or ``batch_multiple`` keeps below the
    whole set never takes a full-set step, so the fraction applies on every step anyway.

    Example:
        >>> from hessfree.train.config import BudgetConfig
        >>> leaf = OptimizerConfig("hessianfree", "hf", {}, 8, None, BudgetConfig(),
        ...     batch_growth=1.5, batch_multiple=4, curvature_fraction=0.5,
        ...     curvature_fraction_full_steps=2)
        >>> full_steps_problem("optimizers.0", leaf, 48) is None
        True
        >>> print(full_steps_problem("optimizers.0", leaf, 50))  # doctest: +NORMALIZE_WHITESPACE
        `optimizers.0.curvature_fraction_full_steps` = 2 (hf): the growing batch never becomes
        the whole training set (batch_multiple 4 rounds it down to 48 of the 50 cases), so
        curvature_fraction applies on every step; remove the key or change batch_multiple.
    """
    if not leaf.curvature_fraction_full_steps:
        return None
    top = min(leaf.batch_max or n, n)
    if top < n:
        why, key = f"batch_max {leaf.batch_max} stops it at {top} of the {n} cases", "batch_max"
    elif top % leaf.batch_multiple:
        top -= top % leaf.batch_multiple
        why = f"batch_multiple {leaf.batch_multiple} rounds it down to {top} of the {n} cases"
        key = "batch_multiple"
    else:
        return None
    return (
        f"`{path}.curvature_fraction_full_steps` = {leaf.curvature_fraction_full_steps} "
        f"({leaf.label}): the growing batch never becomes the whole training set ({why}), so "
        f"curvature_fraction applies on every step; remove the key or change {key}."
    )


def leaves(cfg: ExperimentConfig) -> Iterator[tuple[str, OptimizerConfig]]:
    """``(dotted path, leaf)`` for every optimizer that takes steps: ``optimizers.I`` for a
    plain entry, ``optimizers.I.phases.J`` for a phase."""
    for i, opt in enumerate(cfg.optimizers):
        for j, leaf in enumerate(opt.leaves):
            yield f"optimizers.{i}" + (f".phases.{j}" if opt.phases else ""), leaf


def _resolve_loss(loss: LossConfig, data: Any, model: Any, problems: list[str]) -> LossConfig:
    """Fill ``null`` loss entries from the model and data; reject pairs that cannot train."""
    data_name, model_name = getattr(data, "name", None), getattr(model, "name", None)
    natural = _DATA_TASK.get(data_name)
    name, reduction = loss.name, loss.reduction
    if name is None:
        if model_name == "autoencoder":
            name = "bce_with_logits"
        elif natural == "classification":
            name = "cross_entropy"
        elif natural == "regression":
            name = "mse"
        elif data_name == "npz" and (getattr(data, "train_targets", None) is None):
            problems.append(
                "`loss.name` not set: npz data without targets trains an autoencoder; "
                "set `model.name: autoencoder`."
            )
        elif data_name == "npz":
            problems.append(
                "`loss.name` must be set for npz data: 'cross_entropy' for integer "
                "labels, 'mse' for real-valued targets, 'bce_with_logits' for targets in [0, 1]."
            )
        elif data_name == "curves":
            problems.append("`model.name`: the curves data has no labels; use 'autoencoder'.")
    if reduction is None:
        reduction = "sum_per_case" if model_name == "autoencoder" else "mean"
    if name is not None and model_name is not None and model_name != "autoencoder":
        targets = _TASK_TARGETS.get(natural or "")
        if targets == "labels" and not loss_fits_targets(name, targets):
            problems.append(
                f"`loss.name` = {name!r} does not fit the integer labels of "
                f"{data_name!r}; use 'cross_entropy' (or model 'autoencoder')."
            )
        if targets == "values" and not loss_fits_targets(name, targets):
            problems.append(
                f"`loss.name` = 'cross_entropy' needs class labels; {data_name!r} has "
                "real-valued targets; use 'mse'."
            )
        if data_name == "curves":
            problems.append("`model.name`: the curves data has no labels; use 'autoencoder'.")
    if model_name == "autoencoder" and name == "cross_entropy":
        problems.append(
            "`loss.name` = 'cross_entropy' cannot reconstruct inputs; "
            "use 'bce_with_logits' (inputs in [0, 1]) or 'mse'."
        )
    return LossConfig(name=name, reduction=reduction)


@dataclass(frozen=True)
class _KnownData:
    """What a data section fixes without loading anything (None: decided by a file)."""

    num_train: int | None
    input_numel: int | None
    num_outputs: int | None


#: Cases and classes of scikit-learn's bundled sets.
_BUNDLED = {"digits": (1797, 10, 64), "breast_cancer": (569, 2, 30)}


def _known_data(data: Any, problems: list[str]) -> _KnownData:
    """Sizes a data section fixes, and problems with its split that only sizes reveal."""
    name = data.name
    if name in _BUNDLED:
        n, classes, numel = _BUNDLED[name]
        # scikit-learn's train_test_split: ceil(f n) test cases, the rest for training; a
        # stratified split needs at least one case of each class on either side.
        n_test = math.ceil(data.test_fraction * n)
        n_train = n - n_test
        if min(n_test, n_train) < classes:
            low = classes / n
            problems.append(
                f"`data.test_fraction` = {data.test_fraction!r} splits the {n} cases of "
                f"{name!r} into {n_train} train / {n_test} test, fewer than its {classes} "
                f"classes on one side; use a value in [{low:.4f}, {1 - low:.4f}]."
            )
        return _KnownData(n_train, numel, classes)
    if name == "mnist1d":
        n_train = int(data.num_samples * data.train_split)
        if n_train < 1 or n_train >= data.num_samples:
            problems.append(
                f"`data.train_split` = {data.train_split!r} of {data.num_samples} cases leaves "
                f"{n_train} for training and {data.num_samples - n_train} for testing; both "
                "need at least one case."
            )
        return _KnownData(n_train, 40, 10)
    if name == "curves":
        return _KnownData(data.num_train, data.image_size**2, None)
    if name == "addition":
        return _KnownData(data.num_train, 2 * data.length, 1)
    if name == "npz":  # the file decides the rest; `num_classes` sizes the output layer
        return _KnownData(None, None, getattr(data, "num_classes", None))
    return _KnownData(None, 784 if name == "mnist" else None, 10 if name == "mnist" else None)


def _num_parameters(model: Any, known: _KnownData) -> int:
    """A lower bound on the model's parameter count from its config and the known data sizes."""
    inputs, outputs = known.input_numel or 1, known.num_outputs or 1

    def dense(sizes: Sequence[int]) -> int:
        return sum((a + 1) * b for a, b in zip(sizes, sizes[1:], strict=False))

    if model.name == "mlp":
        return dense([inputs, *model.hidden_sizes, outputs])
    if model.name == "autoencoder":
        sizes = list(model.layer_sizes or ())
        return dense(sizes) + dense(sizes[::-1])
    if model.name == "cnn":
        channels = [1, *model.channels]
        conv = sum((9 * a + 1) * b for a, b in zip(channels, channels[1:], strict=False))
        return conv + dense([channels[-1], model.hidden_size, outputs])
    if model.name == "rnn":
        h = model.hidden_size
        return h * (2 + h + 1) + (h + 1) * outputs
    return 0  # pragma: no cover - every model is listed above


def _physical_memory() -> int:
    """This machine's physical memory in bytes (1 TiB if the system does not say)."""
    import os  # noqa: PLC0415

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 2**40


def _dtype_max(dtype: str) -> float:
    """The largest finite value of the run's parameter dtype (``float32``, ``float64``)."""
    import torch  # noqa: PLC0415

    return float(torch.finfo(getattr(torch, dtype)).max)


def _gigabytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def _check_sizes(cfg: ExperimentConfig, problems: list[str]) -> None:
    """Sizes known without loading data: splits, batch sizes, the memory of model and data."""
    before = len(problems)
    known = _known_data(cfg.data, problems)
    n = known.num_train
    if n is not None and n >= 1 and len(problems) == before:
        for entry_path, opt in leaves(cfg):
            where = "batch_size" if opt.batch_size == cfg.batch_size else f"{entry_path}.batch_size"
            if (
                opt.batch_size is not None
                and opt.batch_size > n
                and not any(p.startswith(f"`{where}` ") for p in problems)
            ):
                problems.append(
                    f"`{where}` = {opt.batch_size} exceeds the {n} training cases of "
                    f"{cfg.data.name!r} ({entry_path}, {opt.label}); use at most {n}, or null "
                    "for the whole training set."
                )
            if opt.batch_max is not None and opt.batch_max > n:
                problems.append(
                    f"`{entry_path}.batch_max` = {opt.batch_max} exceeds the {n} training "
                    f"cases of {cfg.data.name!r} ({opt.label}); use at most {n}, or null for "
                    "the whole training set."
                )
            if (why := full_steps_problem(entry_path, opt, n)) is not None:
                problems.append(why)
            if opt.batch_size is None:  # the whole set: its first floor is known now
                problems += damping_floor_problems(entry_path, opt, n, _dtype_max(cfg.dtype))
            if opt.batch_size is None and not curvature_batch_fits(opt, n):
                problems.append(
                    f"`{entry_path}.curvature_batch_size` = {opt.curvature_batch_size} "
                    f"exceeds the {n} training cases of {cfg.data.name!r} (its gradient batch)."
                )
    itemsize = 8 if cfg.dtype == "float64" else 4
    params = _num_parameters(cfg.model, known)
    # The generated sets' test cases are made alongside (a test set beyond memory, too).
    cases = (n or 0) + (getattr(cfg.data, "num_test", 0) or 0)
    data_values = (known.input_numel or 0) * cases if cfg.data.name != "mnist" else 0
    # Parameters, their gradients and at least one optimizer vector of the same size.
    need = 3 * params * itemsize + data_values * itemsize
    have = _physical_memory()
    if need > have and data_values * itemsize > have:
        problems.append(
            f"`data`: {cases:,} cases of {known.input_numel:,} values ({n:,} train, "
            f"{cases - n:,} test) take {_gigabytes(data_values * itemsize)} as {cfg.dtype}, "
            f"more than this machine's {_gigabytes(have)} of memory; use fewer cases."
        )
    elif need > have:
        key = "model." + {
            "mlp": "hidden_sizes",
            "autoencoder": "layer_sizes",
            "cnn": "channels",
        }.get(cfg.model.name, "hidden_size")
        fix = "use smaller layers or less data"
        one_output = dataclasses.replace(known, num_outputs=None)
        if cfg.data.name == "npz" and 3 * _num_parameters(cfg.model, one_output) * itemsize < have:
            # an npz file's `num_classes` alone makes the output layer too wide
            key = "data.num_classes"
            fix = (
                f"it is {cfg.data.num_classes:,} outputs; use the labels' number of classes "
                "(null: max label + 1)"
            )
        problems.append(
            f"`{key}`: the model would have at least {params:,} parameters "
            f"({_gigabytes(params * itemsize)} as {cfg.dtype}; training needs about "
            f"{_gigabytes(need)} with gradients, optimizer state and "
            f"{_gigabytes(data_values * itemsize)} of data), more than this machine's "
            f"{_gigabytes(have)} of memory; {fix}."
        )


#: ``$NAME`` or ``${NAME}``: a shell variable the user expected to be expanded.
_ENV_REFERENCE = re.compile(r"\$\{?[A-Za-z_]")

_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f/\\]")


def _check_name(name: str, problems: list[str]) -> None:
    """``name`` becomes a directory name under ``output.dir``: no separators, no escape."""
    if not name or name in (".", "..") or ".." in name or _NAME_FORBIDDEN.search(name):
        problems.append(
            f"`name` = {_show(name)} names the run directory; it must be non-empty, without "
            "'..', path separators (/ \\) or control characters (NUL included); e.g. "
            "'quickstart-2'."
        )
    elif len(name.encode("utf-8", errors="replace")) > 200:
        problems.append(
            f"`name` is {len(name.encode('utf-8', errors='replace'))} bytes long; a run "
            "directory name must stay under the file system's 255: use at most 200."
        )
    elif windows_reserved(f"{name}-<time>"):
        # Only with a dot: the time stamp follows the name (`con-<time>` is not reserved).
        base = name.partition(".")[0]
        problems.append(
            f"`name` = {_show(name)} names the run directory '{name}-<time>', and Windows "
            f"reserves every file name whose part before the first dot is {base.strip()!r} "
            f"(a device: {WINDOWS_RESERVED_TEXT}, in any case): the run directory "
            f"could not be copied to or written on Windows. Use another name, e.g. "
            f"{base.strip() + '-1' + name[len(base) :]!r}."
        )


def _check_combinations(cfg: ExperimentConfig, problems: list[str]) -> None:
    """Checks between sections that need no data (those that do run after loading it)."""
    if cfg.model.name == "rnn" and cfg.data.name not in _SEQUENCE_DATA + ("npz",):
        problems.append(
            f"`model.name` = 'rnn' needs sequence data (e.g. 'addition'), got "
            f"{cfg.data.name!r}; use 'mlp' or 'cnn'."
        )
    if cfg.data.name in _SEQUENCE_DATA and cfg.model.name in ("cnn", "autoencoder"):
        problems.append(
            f"`model.name` = {cfg.model.name!r} does not fit the sequence data "
            f"{cfg.data.name!r}; use 'rnn' or 'mlp'."
        )
    if cfg.model.name == "cnn" and cfg.data.name not in _IMAGE_DATA + ("npz",):
        problems.append(
            f"`model.name` = 'cnn' needs image data ({', '.join(_IMAGE_DATA)} or npz "
            f"with (N, C, H, W) inputs), got {cfg.data.name!r}."
        )
    for i, opt in ((i, leaf) for i, o in enumerate(cfg.optimizers) for leaf in o.leaves):
        mu = (
            opt.hyperparameters.get("structural_damping", 0.0) if opt.name == "hessianfree" else 0.0
        )
        if isinstance(mu, (int, float)) and mu > 0 and cfg.model.name != "rnn":
            problems.append(
                f"`optimizers.{i}.structural_damping` = {mu!r} needs a recurrent model's hidden "
                f"states, got `model.name` = {cfg.model.name!r}; use model 'rnn' or set it to 0."
            )
    for where, leaf in leaves(cfg):
        # n unknown: only a given batch_size's floor
        problems += damping_floor_problems(where, leaf, None, _dtype_max(cfg.dtype))
        precond = leaf.hyperparameters.get("precond") if leaf.name == "hessianfree" else None
        if (
            cfg.model.name == "rnn"
            and isinstance(precond, Mapping)
            and precond.get("name") == "kfac"
        ):
            problems.append(
                f"`{where}.precond` = kfac cannot precondition `model.name` = 'rnn': its "
                "recurrent layer runs once per time step (shared weights), which K-FAC's "
                "factors do not describe; use precond: martens, nystrom or null."
            )
    _check_constructors(cfg, problems)
    if cfg.data.name == "mnist1d" and importlib.util.find_spec("mnist1d") is None:
        problems.append("`data.name` = 'mnist1d' needs the mnist1d package: pip install mnist1d.")
    if cfg.device == "cuda":
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            problems.append(
                "`device` = 'cuda' but torch.cuda.is_available() is False; use 'cpu' or 'auto'."
            )
    labels = [o.label for o in cfg.optimizers]
    for label in sorted({x for x in labels if labels.count(x) > 1}):
        where = ", ".join(f"optimizers.{i}" for i, x in enumerate(labels) if x == label)
        problems.append(
            f"Optimizer label {label!r} is used by {where}; give each a distinct `label`."
        )
    # Distinct labels that name one file where names ignore case (macOS, Windows defaults):
    # the second entry would overwrite the first's checkpoint, and a resume load it for both.
    folded: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        folded.setdefault(label.casefold(), []).append(i)
    for where in folded.values():
        if len({labels[i] for i in where}) > 1:
            named = ", ".join(f"{labels[i]!r} (optimizers.{i})" for i in where)
            problems.append(
                f"Optimizer labels {named} differ only in case; each names its checkpoint "
                "file checkpoints/<label>.pt, and on a file system that ignores case (macOS, "
                "Windows) they would be one file. Give each a label that differs in more "
                "than case."
            )
    for key, path in (
        ("output.dir", cfg.output.dir),
        ("data.path", getattr(cfg.data, "path", None)),
    ):
        if isinstance(path, str) and _ENV_REFERENCE.search(path):
            problems.append(
                f"`{key}` = {path!r} refers to an environment variable, which a config does "
                "not expand (the run directory records the path the run used, not a "
                "variable's value of the day); write the path out ('~' is expanded), or give "
                f"it as an override on the command line, where the shell expands it: "
                f"{key}=$HOME/..."
            )
    for i, opt in enumerate(cfg.optimizers):
        b = opt.budget
        # An invalid budget value was already reported; "no budget" would only echo it.
        budget_reported = any(
            p.startswith(("`budget.", f"`optimizers.{i}.budget")) for p in problems
        )
        last = opt.leaves[-1].budget if opt.phases else b  # a last phase may bound the entry
        unbounded = all(
            x.steps is None and x.epochs is None and x.seconds is None for x in (b, last)
        )
        if unbounded and not budget_reported:
            problems.append(
                f"`optimizers.{i}` ({opt.label}) has no budget: set `budget.steps`, "
                "`budget.epochs` or `budget.seconds` (globally or in the entry)."
            )
        for j, leaf in enumerate(opt.leaves):
            where = f"optimizers.{i}" + (f".phases.{j}" if opt.phases else "")
            if leaf.batch_size is not None and not curvature_batch_fits(leaf, None):
                problems.append(
                    f"`{where}.curvature_batch_size` = {leaf.curvature_batch_size} "
                    f"exceeds its gradient batch_size {leaf.batch_size}; the curvature "
                    "batch is a slice of the gradient batch."
                )


def _probe_step(name: str, hyperparameters: Mapping[str, Any], dtype: Any) -> str | None:
    r"""Why ``torch.optim``'s ``name`` refuses ``hyperparameters`` (None: it takes them).

    Builds the optimizer on one two-element parameter of the run's dtype and takes one step on
    :math:`\tfrac12 (p_1^2 + 4 p_2^2)` (not isotropic, so L-BFGS reaches its second iteration):
    the constructor's own checks (SGD's ``nesterov`` needs momentum and no dampening) and the
    step's (an ``lr`` beyond float32's range cannot scale float32 parameters; L-BFGS allocates
    ``history_size`` entries) are the ones the run would meet after its directory was written.
    L-BFGS's step is capped at 4 iterations and 10 evaluations: with ``max_iter: 2**63 - 1``
    and zero tolerances the probe's own step never ended, so ``--check`` hung before any work.
    """
    import torch  # noqa: PLC0415

    kwargs = dict(hyperparameters)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if name == "lbfgs":
        for key, cap in (("max_iter", 4), ("max_eval", 10)):
            value = kwargs.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                kwargs[key] = cap
    p = torch.ones(2, dtype=dtype, requires_grad=True)
    scale = torch.tensor([1.0, 4.0], dtype=dtype)
    try:
        optimizer = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "lbfgs": torch.optim.LBFGS}[
            name
        ]([p], **kwargs)

        def closure() -> Any:
            optimizer.zero_grad()
            loss = 0.5 * (scale * p * p).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as err:
        return " ".join(str(err).split()) or type(err).__name__
    return None


def _check_constructors(cfg: ExperimentConfig, problems: list[str]) -> None:
    """Hyperparameters each key's range allows that the optimizer still refuses at its first
    step: checked on a probe parameter (torch's optimizers), or against the dtype's range (HF's
    ``lr``, which scales every step in the parameters' dtype)."""
    import torch  # noqa: PLC0415

    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    largest = torch.finfo(dtype).max
    for where, leaf in leaves(cfg):
        hyper = leaf.hyperparameters
        if leaf.name == "hessianfree":
            lr = hyper.get("lr")
            finite = isinstance(lr, (int, float)) and math.isfinite(lr)  # inf: its own check
            if finite and not isinstance(lr, bool) and lr > largest:
                problems.append(
                    f"`{where}.lr` = {lr!r}: the step scales {cfg.dtype} parameters by it, and "
                    f"{cfg.dtype} holds at most {largest:.4g}; use a smaller lr (1 is HF's own "
                    "step) or dtype: float64."
                )
            low = hyper.get("min_damping")
            finite = isinstance(low, (int, float)) and math.isfinite(low)  # inf: its own check
            if finite and not isinstance(low, bool) and low > largest:
                # λ is at least it from the first step, and CG's first product adds λv in the
                # parameters' dtype: a RuntimeError from torch there (found by floor19)
                problems.append(
                    f"`{where}.min_damping` = {low!r}: λ is at least it, and CG adds λv in "
                    f"{cfg.dtype}, which holds at most {largest:.4g}; use a smaller min_damping "
                    "or dtype: float64."
                )
            continue
        history = hyper.get("history_size", 0)
        if leaf.name == "lbfgs" and history * 8 > _physical_memory() // 4:
            # Its first step allocates a list of history_size entries: not worth probing.
            problems.append(
                f"`{where}.history_size` = {_show(history)}: torch's L-BFGS allocates that many "
                f"entries at its first step ({_gigabytes(history * 8)}), more than this machine "
                "can spare; keep the last few tens of updates (the default is 100)."
            )
            continue
        if _probe_step(leaf.name, hyper, dtype) is None:
            continue
        # Blame the keys that fail alone; if none does, the combination.
        defaults = _torch_defaults(leaf.name)
        blamed = False
        for key, value in hyper.items():
            if value == defaults.get(key):
                continue
            why = _probe_step(leaf.name, {**defaults, key: value}, dtype)
            if why is not None:
                blamed = True
                problems.append(
                    f"`{where}.{key}` = {_show(value)}: torch.optim's {leaf.name!r} refuses it on "
                    f"{cfg.dtype} parameters ({why[:200]}); use a value the optimizer accepts"
                    + (" or dtype: float64." if "overflow" in why else ".")
                )
        if not blamed:
            why = _probe_step(leaf.name, hyper, dtype)
            problems.append(
                f"`{where}` ({leaf.label}): torch.optim's {leaf.name!r} refuses these settings "
                f"together ({(why or '')[:200]})."
            )


def _torch_defaults(name: str) -> dict[str, Any]:
    """The default hyperparameters of torch optimizer ``name`` as the config resolves them."""
    return dataclasses.asdict(_TORCH_OPTIMIZERS[name]())
