"""Experiment configuration: a strict YAML schema loaded into frozen dataclasses.

A config file names the data, the model, the loss and one or more optimizers that run side by
side from the same initial weights on the same data order. Loading validates everything before
any work: an unknown key is reported with the allowed keys and the closest match, a bad type or
out-of-range value with its dotted path (``optimizers.0.damping``), and all problems at once in
one :class:`ConfigError`.

Layout of a config (every key optional unless marked)::

    name: quickstart          # run-directory prefix; default: the file's stem
    seed: 0                   # initial weights, data order, generated data
    device: cpu               # cpu | cuda | auto
    dtype: float32            # float32 | float64
    num_threads: null         # torch.set_num_threads; null keeps torch's default
    data: {name: digits, ...}         # required; keys: see DATA_SCHEMAS
    model: {name: mlp, ...}           # required; keys: see MODEL_SCHEMAS
    loss: {name: null, reduction: null}  # null: chosen from the model and data
    optimizers:                       # required, one or more
      - {name: hessianfree, damping: 1.0, ...}   # every HessianFree keyword argument
      - {name: adam, lr: 1.0e-3, label: adam-fast, batch_size: 128, budget: {steps: 5000}}
      - label: adam-then-hf           # phases: optimizers in sequence on the same weights,
        phases:                       # each phase's budget counted from its start; the
          - {name: adam, lr: 1.0e-3, budget: {steps: 500}}   # entry's budget (here the
          - {name: hessianfree, damping: 1.0}                # global one) bounds the whole
    budget: {steps: null, epochs: null, seconds: null}   # per optimizer; first reached stops
    batch_size: null          # gradient batch; null = the whole training set
    curvature_batch_size: null  # HF curvature batch, a slice of the gradient batch
    eval: {every_steps: 10, every_seconds: null, max_cases: null, batch_size: 10000}
    output: {dir: runs, checkpoint_every: 100, plots: true, progress: auto}
    distributed: {timeout_seconds: 300}   # torchrun runs only (see hessfree.train.parallel)

Overrides (``optimizers.0.damping=10``) are applied to the raw mapping before validation, so
they are checked exactly like the file. Values are YAML scalars; ``1e-3`` is read as a float
(PyYAML's YAML 1.1 resolver would read it as a string).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hessfree._checks import check_int, check_number

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimizerConfig",
    "BudgetConfig",
    "EvalConfig",
    "OutputConfig",
    "DistributedConfig",
    "DATA_SCHEMAS",
    "MODEL_SCHEMAS",
    "OPTIMIZER_NAMES",
    "load_config",
    "parse_config",
    "parse_override",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "config_digest",
    "training_digest",
    "is_budget_key",
    "safe_load_yaml",
    "infer_task",
]


#: Seeds reach scikit-learn and NumPy, which take at most 2**32 - 1.
_MAX_SEED = 2**32 - 1
#: torch.set_num_threads takes a C int; far more threads than any machine has is a typo.
_MAX_THREADS = 1024
#: gloo and NCCL hold the timeout in milliseconds in a C int: at most about 24.8 days.
_MAX_TIMEOUT = 2_000_000.0
#: Floats larger than this are not exact integers; a count given as one is refused.
_MAX_EXACT_FLOAT_INT = 2**53
#: Longest echo of a value in a message, and the most values a document may expand to
#: (YAML aliases can make a few hundred bytes expand to millions of values).
_MAX_SHOWN = 200
_MAX_PROBLEM_CHARS = 1000
_MAX_VALUES = 100_000


def _show(value: object) -> str:
    """``repr(value)``, cut to :data:`_MAX_SHOWN` characters (a huge value stays readable)."""
    text = reprlib_repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 5] + " ...)"


def reprlib_repr(value: object) -> str:
    import reprlib  # noqa: PLC0415

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxstring, r.maxother = 3, 8, 8, 8, 120, 120
    r.maxlong = 60
    return r.repr(value)


class ConfigError(ValueError):
    """One or more problems in an experiment config, reported together.

    Attributes:
        problems: One message per problem, each naming the dotted path of the offending key.
        source: The file (or other origin) the config came from, if known.
    """

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        # Cap what is echoed: a message quoting a huge value must stay a few lines.
        self.problems = [
            p if len(p) <= _MAX_PROBLEM_CHARS else p[: _MAX_PROBLEM_CHARS - 20] + " ... (cut)"
            for p in problems
        ]
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"Invalid config{where}: {self.problems[0]}"
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            text = f"Invalid config{where}: {len(self.problems)} problems:\n{listed}"
        super().__init__(text)


# ---------------------------------------------------------------------------------------------
# YAML: the safe loader, plus floats without a dot (1e-3) and an error on duplicate keys.


class _SafeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser if built
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float and rejects duplicate keys."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def safe_load_yaml(text: str) -> Any:
    """Parse YAML with a safe loader (no Python objects), ``1e-3`` as float, no duplicate keys.

    Example:
        >>> safe_load_yaml("lr: 1e-3\\nsteps: 10")
        {'lr': 0.001, 'steps': 10}
    """
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 -- _SafeLoader subclasses SafeLoader


# ---------------------------------------------------------------------------------------------
# Field metadata and the generic dataclass builder.


@dataclass(frozen=True)
class _Spec:
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    required: bool = False


def _field(default: Any = None, help: str = "", **spec: Any) -> Any:
    return field(default=default, metadata={"spec": _Spec(help, **spec)})


_INVALID = object()  # a value that failed validation; the field keeps its default


def _path(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _suggest(key: object, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`? " if close else ""


def _unknown_key(path: str, key: object, allowed: Sequence[str]) -> str:
    listed = ", ".join(allowed)
    shown = _path(path, key if isinstance(key, str) and len(key) <= _MAX_SHOWN else _show(key))
    return f"Unknown key `{shown}`; {_suggest(key, allowed)}allowed keys: {listed}."


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _convert(value: Any, hint: Any, spec: _Spec | None, path: str, problems: list[str]) -> Any:
    """Check ``value`` against a type hint and a :class:`_Spec`; return it converted."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) != 1:  # pragma: no cover - the schema only uses X | None
            raise AssertionError(f"unsupported union {hint!r}")
        hint = args[0]
        origin = typing.get_origin(hint)
    elif value is None:
        allowed = f"one of {', '.join(map(repr, spec.choices))}" if spec and spec.choices else ""
        problems.append(f"`{path}` must not be null{'; expected ' + allowed if allowed else ''}.")
        return _INVALID

    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems)
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, (list, tuple)):
            problems.append(f"`{path}` must be a list, got {_type_name(value)} {_show(value)}.")
            return _INVALID
        items = [_convert(v, item, spec, _path(path, i), problems) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else tuple(items)
    if hint is Any:
        return value

    if hint is bool:
        if not isinstance(value, bool):
            problems.append(
                f"`{path}` must be true or false, got {_type_name(value)} {_show(value)}."
            )
            return _INVALID
    elif hint is int:
        if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_FLOAT_INT:
            value = int(value)  # 1e4 in YAML is a float; accept it for a count
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"`{path}` must be an integer, got {_type_name(value)} {_show(value)}.")
            return _INVALID
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"`{path}` must be a number, got {_type_name(value)} {_show(value)}.")
            return _INVALID
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            problems.append(f"`{path}` must be a string, got {_type_name(value)} {_show(value)}.")
            return _INVALID
        if "\0" in value:  # file names cannot hold it; the OS refuses it with a ValueError
            problems.append(f"`{path}` must not contain a NUL character, got {_show(value)}.")
            return _INVALID
    else:  # pragma: no cover - a schema bug, not a user error
        raise AssertionError(f"unsupported type hint {hint!r} at {path}")

    if spec is None:
        return value
    if spec.choices is not None and value not in spec.choices:
        listed = ", ".join(repr(c) for c in spec.choices)
        close = (
            difflib.get_close_matches(value, [str(c) for c in spec.choices], n=1)
            if isinstance(value, str)
            else []
        )
        hint_text = f"; did you mean {close[0]!r}?" if close else "."
        problems.append(f"`{path}` must be one of {listed}, got {_show(value)}{hint_text}")
        return _INVALID
    if spec.low is not None or spec.high is not None:
        try:
            if hint is int:
                check_int(
                    path,
                    value,
                    low=None if spec.low is None else int(spec.low),
                    high=None if spec.high is None else int(spec.high),
                )
            else:
                check_number(
                    path,
                    value,
                    low=spec.low,
                    high=spec.high,
                    low_open=spec.low_open,
                    high_open=spec.high_open,
                )
        except (TypeError, ValueError) as err:
            problems.append(str(err))
            return _INVALID
    return value


def _schema_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _build(cls: type, raw: Any, path: str, problems: list[str], *, skip: Sequence[str] = ()) -> Any:
    """Build dataclass ``cls`` from a raw mapping, appending every problem to ``problems``."""
    if not isinstance(raw, Mapping):
        problems.append(
            f"`{path}` must be a mapping of keys to values, got {_type_name(raw)} {_show(raw)}."
        )
        return _INVALID
    fields = _schema_fields(cls)
    hints = typing.get_type_hints(cls)
    allowed = list(skip) + list(fields)
    for key in raw:
        if key not in fields and key not in skip:
            problems.append(_unknown_key(path, key, allowed))
    kwargs = {}
    for name, f in fields.items():
        spec = f.metadata.get("spec")
        if name in raw:
            value = _convert(raw[name], hints[name], spec, _path(path, name), problems)
            if value is not _INVALID:
                kwargs[name] = value
        elif spec is not None and spec.required:
            problems.append(f"`{_path(path, name)}` is required ({spec.help}).")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Data sections. Field names equal the keyword arguments of the loaders in hessfree.train.data.


@dataclass(frozen=True)
class CurvesData:
    """Generated re-creation of the CURVES set (see :func:`hessfree.train.data.make_curves`)."""

    name: str = "curves"
    num_train: int = _field(20_000, "training images", low=1)
    num_test: int = _field(10_000, "test images", low=1)
    image_size: int = _field(28, "image side in pixels", low=8)
    thickness: float = _field(
        0.7, "stroke width: Gaussian profile std in pixels", low=0.1, high=5.0
    )
    seed: int | None = _field(
        None, "generator seed; null: the experiment seed", low=0, high=_MAX_SEED
    )


@dataclass(frozen=True)
class DigitsData:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1]."""

    name: str = "digits"
    test_fraction: float = _field(
        0.25, "held-out fraction", low=0.0, high=1.0, low_open=True, high_open=True
    )
    seed: int | None = _field(None, "split seed; null: the experiment seed", low=0, high=_MAX_SEED)


@dataclass(frozen=True)
class BreastCancerData:
    """scikit-learn's bundled Wisconsin breast-cancer set, standardised on the training split."""

    name: str = "breast_cancer"
    test_fraction: float = _field(
        0.25, "held-out fraction", low=0.0, high=1.0, low_open=True, high_open=True
    )
    seed: int | None = _field(None, "split seed; null: the experiment seed", low=0, high=_MAX_SEED)


@dataclass(frozen=True)
class Mnist1dData:
    """MNIST-1D generated by the ``mnist1d`` package (no download)."""

    name: str = "mnist1d"
    num_samples: int = _field(5000, "cases in total (train + test)", low=10)
    train_split: float = _field(
        0.8, "training fraction", low=0.0, high=1.0, low_open=True, high_open=True
    )
    seed: int | None = _field(
        None,
        "generator seed; null: the experiment seed (the package uses 42)",
        low=0,
        high=_MAX_SEED,
    )


@dataclass(frozen=True)
class MnistData:
    """MNIST from a local file the user supplies (``mnist.pkl.gz`` or the four IDX files)."""

    name: str = "mnist"
    path: str | None = _field(
        None,
        "mnist.pkl.gz or a directory of IDX files (relative: to the working directory)",
        required=True,
    )
    include_validation: bool = _field(True, "pkl.gz only: train on train+validation (60,000 cases)")


@dataclass(frozen=True)
class NpzData:
    """A user ``.npz`` file with named arrays."""

    name: str = "npz"
    path: str | None = _field(
        None, "the .npz file (relative: to the working directory)", required=True
    )
    train_inputs: str = _field("x_train", "array name of the training inputs")
    train_targets: str | None = _field("y_train", "array name of the training targets; null: none")
    test_inputs: str = _field("x_test", "array name of the test inputs")
    test_targets: str | None = _field("y_test", "array name of the test targets; null: none")
    num_classes: int | None = _field(
        None, "integer labels: number of classes; null: max label + 1", low=2
    )


@dataclass(frozen=True)
class AdditionData:
    """The addition problem (Hochreiter & Schmidhuber 1997; Martens & Sutskever 2011)."""

    name: str = "addition"
    length: int = _field(100, "sequence length T", low=4)
    num_train: int = _field(10_000, "training sequences", low=1)
    num_test: int = _field(1000, "test sequences", low=1)
    seed: int | None = _field(
        None, "generator seed; null: the experiment seed", low=0, high=_MAX_SEED
    )


DataConfig = (
    CurvesData | DigitsData | BreastCancerData | Mnist1dData | MnistData | NpzData | AdditionData
)

#: Data section schema by ``data.name``.
DATA_SCHEMAS: dict[str, type] = {
    "curves": CurvesData,
    "digits": DigitsData,
    "breast_cancer": BreastCancerData,
    "mnist1d": Mnist1dData,
    "mnist": MnistData,
    "npz": NpzData,
    "addition": AdditionData,
}

#: The natural task of each dataset's targets (``None``: no targets, or decided by the file).
_DATA_TASK = {
    "curves": None,
    "digits": "classification",
    "breast_cancer": "classification",
    "mnist1d": "classification",
    "mnist": "classification",
    "npz": None,
    "addition": "regression",
}
_IMAGE_DATA = ("curves", "digits", "mnist")
_SEQUENCE_DATA = ("addition",)


# ---------------------------------------------------------------------------------------------
# Model sections. Field names equal the keyword arguments of hessfree.train.models.build_model.

_ACTIVATIONS = ("sigmoid", "tanh", "relu", "softplus", "elu", "gelu")
_INITS = ("default", "sparse")


@dataclass(frozen=True)
class AutoencoderModel:
    """Martens' deep autoencoder: logistic hidden units, linear code, mirrored decoder."""

    name: str = "autoencoder"
    layer_sizes: tuple[int, ...] | None = _field(
        None,
        "encoder sizes from the input to the code, e.g. [784, 400, 200, 100, 50, 25, 6]",
        low=1,
        required=True,
    )
    activation: str = _field("sigmoid", "hidden nonlinearity", choices=_ACTIVATIONS)
    init: str = _field("default", "'sparse': Martens (2010) sparse initialisation", choices=_INITS)
    sparse_connections: int = _field(15, "incoming connections per unit for init: sparse", low=1)


@dataclass(frozen=True)
class MLPModel:
    """Fully connected classifier or regressor."""

    name: str = "mlp"
    hidden_sizes: tuple[int, ...] = _field((100,), "hidden layer widths", low=1)
    activation: str = _field("tanh", "hidden nonlinearity", choices=_ACTIVATIONS)
    init: str = _field("default", "'sparse': Martens (2010) sparse initialisation", choices=_INITS)
    sparse_connections: int = _field(15, "incoming connections per unit for init: sparse", low=1)


@dataclass(frozen=True)
class CNNModel:
    """Small convolutional classifier for image data."""

    name: str = "cnn"
    channels: tuple[int, ...] = _field(
        (16, 32), "output channels of each conv (3x3) + 2x2 max-pool block", low=1
    )
    hidden_size: int = _field(64, "width of the fully connected layer", low=1)
    activation: str = _field("relu", "nonlinearity", choices=_ACTIVATIONS)
    init: str = _field("default", "'sparse': Martens (2010) sparse initialisation", choices=_INITS)
    sparse_connections: int = _field(15, "incoming connections per unit for init: sparse", low=1)


@dataclass(frozen=True)
class RNNModel:
    """tanh RNN over sequences, read out at the last step."""

    name: str = "rnn"
    hidden_size: int = _field(100, "hidden units", low=1)
    init: str = _field("default", "'sparse': Martens (2010) sparse initialisation", choices=_INITS)
    sparse_connections: int = _field(15, "incoming connections per unit for init: sparse", low=1)


ModelConfig = AutoencoderModel | MLPModel | CNNModel | RNNModel

#: Model section schema by ``model.name``.
MODEL_SCHEMAS: dict[str, type] = {
    "autoencoder": AutoencoderModel,
    "mlp": MLPModel,
    "cnn": CNNModel,
    "rnn": RNNModel,
}


# ---------------------------------------------------------------------------------------------
# Loss, budget, evaluation, output.

_LOSSES = ("mse", "cross_entropy", "bce_with_logits")


@dataclass(frozen=True)
class LossConfig:
    """Training loss; ``null`` entries are chosen from the model and data when loading.

    ``reduction: mean`` averages over every output element (torch's default);
    ``sum_per_case`` sums over the outputs of a case and averages over cases (Martens 2010).
    """

    name: str | None = _field(
        None,
        "null: cross_entropy for labels, mse for real targets, bce_with_logits for autoencoders",
        choices=_LOSSES,
    )
    reduction: str | None = _field(
        None, "null: sum_per_case for autoencoders, else mean", choices=("mean", "sum_per_case")
    )


@dataclass(frozen=True)
class BudgetConfig:
    """Per-optimizer budget; training stops at the first limit reached."""

    steps: int | None = _field(None, "optimizer steps", low=1)
    epochs: float | None = _field(None, "passes over the training set", low=0.0, low_open=True)
    seconds: float | None = _field(
        None, "training wall-clock seconds (evaluation excluded)", low=0.0, low_open=True
    )


@dataclass(frozen=True)
class EvalConfig:
    """When and on what to evaluate train and test loss and the task metric."""

    every_steps: int | None = _field(
        10, "evaluate every this many steps; null: never by steps", low=1
    )
    every_seconds: float | None = _field(
        None, "evaluate every this many training seconds", low=0.0, low_open=True
    )
    max_cases: int | None = _field(
        None, "evaluate on the first this many train/test cases; null: all", low=1
    )
    batch_size: int = _field(10_000, "cases per forward pass during evaluation", low=1)


@dataclass(frozen=True)
class OutputConfig:
    """Where and what to write."""

    dir: str = _field("runs", "parent of the run directory runs/<name>-<timestamp>/")
    checkpoint_every: int | None = _field(
        100, "checkpoint every this many steps (and at the end)", low=1
    )
    plots: bool = _field(True, "write PNG plots at the end")
    progress: str = _field(
        "auto",
        "progress bars: auto (when stdout is a terminal), always, never",
        choices=("auto", "always", "never"),
    )


@dataclass(frozen=True)
class DistributedConfig:
    """Data-parallel runs under ``torchrun`` (ignored in a single process).

    A rank that crashes makes the others fail at their next collective; one that hangs, after
    ``timeout_seconds``. It also bounds the start-up rendezvous and how long the other ranks
    wait while rank 0 alone evaluates and checkpoints, so keep it above the longest of those.
    """

    timeout_seconds: float = _field(
        300.0,
        "seconds a rank waits for the others (start-up and every collective) before giving up",
        low=0.0,
        low_open=True,
        high=_MAX_TIMEOUT,
    )


# ---------------------------------------------------------------------------------------------
# Optimizers: hyperparameters are the keyword arguments of the optimizer's constructor.


@dataclass(frozen=True)
class _AdamHyperparameters:
    lr: float = _field(1e-3, "learning rate", low=0.0, low_open=True)
    betas: tuple[float, ...] = _field(
        (0.9, 0.999), "moment decay rates, each in [0, 1)", low=0.0, high=1.0, high_open=True
    )
    eps: float = _field(1e-8, "denominator offset", low=0.0, low_open=True)
    weight_decay: float = _field(0.0, "L2 penalty", low=0.0)
    amsgrad: bool = _field(False, "AMSGrad variant")


@dataclass(frozen=True)
class _SGDHyperparameters:
    lr: float = _field(0.01, "learning rate", low=0.0, low_open=True)
    momentum: float = _field(0.9, "momentum", low=0.0, high=1.0, high_open=True)
    dampening: float = _field(0.0, "momentum dampening", low=0.0, high=1.0)
    nesterov: bool = _field(False, "Nesterov momentum")
    weight_decay: float = _field(0.0, "L2 penalty", low=0.0)


@dataclass(frozen=True)
class _LBFGSHyperparameters:
    lr: float = _field(1.0, "step length", low=0.0, low_open=True)
    max_iter: int = _field(20, "iterations per step", low=1)
    max_eval: int | None = _field(None, "function evaluations per step; null: 1.25 max_iter", low=1)
    tolerance_grad: float = _field(1e-7, "first-order optimality tolerance", low=0.0)
    tolerance_change: float = _field(1e-9, "function/parameter change tolerance", low=0.0)
    history_size: int = _field(100, "update history size", low=1)
    line_search_fn: str | None = _field(None, "null or 'strong_wolfe'", choices=("strong_wolfe",))


_TORCH_OPTIMIZERS: dict[str, type] = {
    "adam": _AdamHyperparameters,
    "sgd": _SGDHyperparameters,
    "lbfgs": _LBFGSHyperparameters,
}
#: Optimizer names a config may use.
OPTIMIZER_NAMES = ("hessianfree", "adam", "sgd", "lbfgs")
_ENTRY_KEYS = ("name", "label", "batch_size", "curvature_batch_size", "budget")
_PHASED_KEYS = ("phases", "label", "budget")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer of the side-by-side comparison, fully resolved.

    Attributes:
        name: ``hessianfree``, ``adam``, ``sgd`` or ``lbfgs``.
        label: Unique name in metrics, plots and checkpoint files (default: ``name``).
        hyperparameters: Keyword arguments for the optimizer's constructor.
        batch_size: Gradient batch; ``None`` is the whole training set.
        curvature_batch_size: HF only: curvature batch, a slice of the gradient batch;
            ``None`` is the whole gradient batch.
        budget: This optimizer's budget (the global one with this entry's overrides); for
            a phase, the phase's own budget, counted from the phase's start.
        phases: Optimizers run one after another on the same weights (``Adam for N steps,
            then HessianFree``); empty for a plain entry. Each phase is a complete entry
            with its own budget; ``name`` is then the phases' names joined by ``+`` and the
            fields above other than ``label`` and ``budget`` are those of the first phase.
    """

    name: str
    label: str
    hyperparameters: dict[str, Any]
    batch_size: int | None
    curvature_batch_size: int | None
    budget: BudgetConfig
    phases: tuple[OptimizerConfig, ...] = ()

    @property
    def leaves(self) -> tuple[OptimizerConfig, ...]:
        """The optimizers that take steps: the phases, or this entry alone."""
        return self.phases or (self,)


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment. Build it with :func:`load_config` or :func:`parse_config`."""

    name: str
    seed: int
    device: str
    dtype: str
    num_threads: int | None
    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    optimizers: tuple[OptimizerConfig, ...]
    budget: BudgetConfig
    batch_size: int | None
    curvature_batch_size: int | None
    eval: EvalConfig
    output: OutputConfig
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def task(self) -> str:
        """``classification``, ``regression``, ``reconstruction`` or ``binary``."""
        return infer_task(self.model.name, self.loss.name)


@dataclass(frozen=True)
class _TopLevel:
    name: str | None = _field(None, "run name; default: the config file's stem")
    seed: int = _field(0, "seed of weights, data order and generated data", low=0, high=_MAX_SEED)
    device: str = _field("cpu", "cpu, cuda or auto", choices=("cpu", "cuda", "auto"))
    dtype: str = _field("float32", "parameter and data dtype", choices=("float32", "float64"))
    num_threads: int | None = _field(
        None, "torch.set_num_threads; null: torch's default", low=1, high=_MAX_THREADS
    )
    batch_size: int | None = _field(None, "gradient batch; null: the whole training set", low=1)
    curvature_batch_size: int | None = _field(
        None, "HF curvature batch; null: the gradient batch", low=1
    )
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


_TOP_KEYS = (
    "name",
    "seed",
    "device",
    "dtype",
    "num_threads",
    "data",
    "model",
    "loss",
    "optimizers",
    "budget",
    "batch_size",
    "curvature_batch_size",
    "eval",
    "output",
    "distributed",
)


def infer_task(model: str, loss: str | None) -> str:
    """The task a (model, loss) pair trains, which decides the targets and the metric.

    Returns:
        ``reconstruction`` for an autoencoder (targets are the inputs; metric: squared error
        per case), ``classification`` for cross-entropy (accuracy), ``regression`` for MSE
        (squared error per case), ``binary`` for BCE on targets in [0, 1] (accuracy).

    Example:
        >>> infer_task("mlp", "cross_entropy"), infer_task("autoencoder", "bce_with_logits")
        ('classification', 'reconstruction')
    """
    if model == "autoencoder":
        return "reconstruction"
    return {
        "cross_entropy": "classification",
        "mse": "regression",
        "bce_with_logits": "binary",
    }.get(loss or "", "classification")


# ---------------------------------------------------------------------------------------------
# HessianFree: keys and defaults come from its signature, values are checked by constructing it.


def _hessianfree_class() -> type:
    """Import :class:`hessfree.optimizer.HessianFree` lazily (train sits above the optimizer)."""
    from hessfree.optimizer import HessianFree

    return HessianFree


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


#: HessianFree arguments that take Python objects, which a YAML file cannot express.
_HF_PYTHON_ONLY = ("callback", "process_group")


def _hessianfree_defaults(cls: type) -> dict[str, Any]:
    """Keyword arguments of ``cls.__init__`` other than ``params``, with their defaults."""
    out: dict[str, Any] = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.name in ("params", *_HF_PYTHON_ONLY) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = p.default  # inspect.Parameter.empty for a required one
    return out


def _key_in_message(message: str, keys: Sequence[str]) -> str | None:
    for key in keys:
        if re.search(rf"[`'\"]{re.escape(key)}[`'\"]", message):
            return key
    return None


def _check_hessianfree(raw: Mapping[str, Any], path: str, problems: list[str]) -> dict[str, Any]:
    """Validate HF hyperparameters by matching the signature and constructing the optimizer."""
    import torch  # noqa: PLC0415 -- keep `import hessfree.train.config` light

    try:
        cls = _hessianfree_class()
    except ImportError as err:
        problems.append(
            f"`{path}.name`: optimizer 'hessianfree' is unavailable "
            f"(importing hessfree.optimizer failed: {err})."
        )
        return {}
    defaults = _hessianfree_defaults(cls)
    allowed = list(_ENTRY_KEYS) + list(defaults)
    given: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _ENTRY_KEYS:
            continue
        if key not in defaults:
            problems.append(_unknown_key(path, key, allowed))
            continue
        default = defaults[key]
        # A YAML integer where the default is a float (damping: 10) is meant as that float.
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        given[key] = value
    missing = [k for k, d in defaults.items() if d is inspect.Parameter.empty and k not in given]
    for key in missing:
        problems.append(f"`{_path(path, key)}` is required by HessianFree.")
    if missing:
        return given

    def construct(kwargs: dict[str, Any]) -> str | None:
        dummy = torch.zeros(1, requires_grad=True)
        try:
            cls([dummy], **kwargs)
        except (TypeError, ValueError) as err:
            return str(err)
        return None

    # One construction per key pins each message to its dotted path, so all are reported;
    # a final one with every key catches constraints between keys.
    bad = False
    for key, value in given.items():
        message = construct({key: value})
        if message is not None:
            problems.append(f"`{_path(path, key)}` = {_show(value)}: {message}")
            bad = True
    if not bad and given:
        message = construct(given)
        if message is not None:
            key = _key_in_message(message, list(given))
            problems.append(f"`{_path(path, key) if key else path}`: {message}")
    resolved = {k: v for k, v in defaults.items() if v is not inspect.Parameter.empty and _plain(v)}
    resolved.update(given)
    return resolved


# ---------------------------------------------------------------------------------------------
# Parsing.


def _pick_schema(
    raw: Any, path: str, registry: Mapping[str, type], problems: list[str], what: str
) -> type | None:
    if not isinstance(raw, Mapping):
        problems.append(
            f"`{path}` must be a mapping with a `name`, got {_type_name(raw)} {_show(raw)}."
        )
        return None
    name = raw.get("name")
    choices = ", ".join(repr(n) for n in registry)
    if name is None:
        problems.append(f"`{path}.name` is required: the {what}, one of {choices}.")
        return None
    if not isinstance(name, str) or name not in registry:
        hint = _suggest(name, list(registry)) if isinstance(name, str) else ""
        problems.append(
            f"Unknown {what} `{path}.name` = {_show(name)}; {hint}expected one of {choices}."
        )
        return None
    return registry[name]


def _merge_budget(base: BudgetConfig, raw: Any, path: str, problems: list[str]) -> BudgetConfig:
    if raw is None:
        return base
    override = _build(BudgetConfig, raw, path, problems)
    if override is _INVALID:
        return base
    return dataclasses.replace(
        base, **{k: getattr(override, k) for k in raw if k in _schema_fields(BudgetConfig)}
    )


def _parse_phased(
    raw: Mapping[str, Any], path: str, top: _TopLevel, problems: list[str]
) -> OptimizerConfig | None:
    """An entry ``{phases: [entry, entry, ...], label, budget}``: optimizers in sequence."""
    for key in raw:
        if key not in _PHASED_KEYS:
            problems.append(
                _unknown_key(path, key, _PHASED_KEYS)[:-1]
                + " (an entry with `phases` sets the optimizer keys in each phase)."
            )
    raw_phases = raw["phases"]
    if not isinstance(raw_phases, list) or len(raw_phases) < 2:
        problems.append(
            f"`{path}.phases` must be a list of two or more optimizer entries run one after "
            f"another, got {_show(raw_phases)}; a single optimizer is a plain entry."
        )
        return None
    # A phase's budget is its own, counted from its start; the global one bounds the entry.
    no_budget = dataclasses.replace(top, budget=BudgetConfig())
    phases = []
    for j, entry in enumerate(raw_phases):
        where = f"{path}.phases.{j}"
        if isinstance(entry, Mapping):
            for key in ("phases", "label"):
                if key in entry:
                    problems.append(
                        f"`{where}.{key}` is not allowed in a phase; set it on `{path}`."
                    )
        phase = _parse_optimizer(
            {k: v for k, v in entry.items() if k not in ("phases", "label")}
            if isinstance(entry, Mapping)
            else entry,
            index=None,
            top=no_budget,
            problems=problems,
            path=where,
        )
        if phase is None:
            return None
        b = phase.budget
        if j < len(raw_phases) - 1 and b.steps is None and b.epochs is None and b.seconds is None:
            problems.append(
                f"`{where}` ({phase.name}) has no budget, so the phases after it would never "
                f"run: set `{where}.budget.steps`, `.epochs` or `.seconds`."
            )
        phases.append(phase)
    names = "+".join(ph.name for ph in phases)
    label = raw.get("label", names)
    if not isinstance(label, str) or not _LABEL.match(label):
        problems.append(
            f"`{path}.label` must be a name of letters, digits and _.+- "
            f"(it names files), got {_show(label)}."
        )
        label = names
    first = phases[0]
    return OptimizerConfig(
        name=names,
        label=label,
        hyperparameters={},
        batch_size=first.batch_size,
        curvature_batch_size=first.curvature_batch_size,
        budget=_merge_budget(top.budget, raw.get("budget"), f"{path}.budget", problems),
        phases=tuple(phases),
    )


def _parse_optimizer(
    raw: Any,
    index: int | None,
    top: _TopLevel,
    problems: list[str],
    path: str | None = None,
) -> OptimizerConfig | None:
    path = path or f"optimizers.{index}"
    if isinstance(raw, Mapping) and "phases" in raw and index is not None:
        return _parse_phased(raw, path, top, problems)
    if not isinstance(raw, Mapping):
        problems.append(
            f"`{path}` must be a mapping with a `name`, got {_type_name(raw)} {_show(raw)}."
        )
        return None
    name = raw.get("name")
    choices = ", ".join(repr(n) for n in OPTIMIZER_NAMES)
    if name not in OPTIMIZER_NAMES:
        if name is None:
            problems.append(f"`{path}.name` is required: one of {choices}.")
        else:
            hint = _suggest(name, OPTIMIZER_NAMES) if isinstance(name, str) else ""
            problems.append(
                f"Unknown optimizer `{path}.name` = {_show(name)}; {hint}expected one of {choices}."
            )
        return None

    label = raw.get("label", name)
    if not isinstance(label, str) or not _LABEL.match(label):
        problems.append(
            f"`{path}.label` must be a name of letters, digits and _.+- "
            f"(it names files), got {_show(label)}."
        )
        label = name
    batch_size = top.batch_size
    if "batch_size" in raw:
        batch_size = _convert(
            raw["batch_size"], int | None, _Spec("", low=1), f"{path}.batch_size", problems
        )
        batch_size = top.batch_size if batch_size is _INVALID else batch_size
    curvature_batch_size = top.curvature_batch_size if name == "hessianfree" else None
    if "curvature_batch_size" in raw:
        if name != "hessianfree":
            problems.append(
                f"`{path}.curvature_batch_size` only applies to 'hessianfree', not {name!r}."
            )
        else:
            value = _convert(
                raw["curvature_batch_size"],
                int | None,
                _Spec("", low=1),
                f"{path}.curvature_batch_size",
                problems,
            )
            curvature_batch_size = top.curvature_batch_size if value is _INVALID else value
    budget = _merge_budget(top.budget, raw.get("budget"), f"{path}.budget", problems)

    if name == "hessianfree":
        hyper = _check_hessianfree(raw, path, problems)
    else:
        schema = _TORCH_OPTIMIZERS[name]
        built = _build(schema, raw, path, problems, skip=_ENTRY_KEYS)
        if built is _INVALID:
            return None
        hyper = dataclasses.asdict(built)
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
            if len(hyper["betas"]) != 2:
                problems.append(
                    f"`{path}.betas` must be a list of two numbers in [0, 1), "
                    f"got {list(hyper['betas'])!r}."
                )
    return OptimizerConfig(
        name=name,
        label=label,
        hyperparameters=hyper,
        batch_size=batch_size,
        curvature_batch_size=curvature_batch_size,
        budget=budget,
    )


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
        if natural == "classification" and name != "cross_entropy":
            problems.append(
                f"`loss.name` = {name!r} does not fit the integer labels of "
                f"{data_name!r}; use 'cross_entropy' (or model 'autoencoder')."
            )
        if natural == "regression" and name == "cross_entropy":
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


def _gigabytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def _check_sizes(cfg: ExperimentConfig, problems: list[str]) -> None:
    """Sizes known without loading data: splits, batch sizes, the memory of model and data."""
    before = len(problems)
    known = _known_data(cfg.data, problems)
    n = known.num_train
    leaves = [
        (f"optimizers.{i}" + (f".phases.{j}" if o.phases else ""), leaf)
        for i, o in enumerate(cfg.optimizers)
        for j, leaf in enumerate(o.leaves)
    ]
    if n is not None and n >= 1 and len(problems) == before:
        for entry_path, opt in leaves:
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
            if (
                opt.curvature_batch_size is not None
                and opt.curvature_batch_size > n
                and opt.batch_size is None
            ):
                problems.append(
                    f"`{entry_path}.curvature_batch_size` = {opt.curvature_batch_size} "
                    f"exceeds the {n} training cases of {cfg.data.name!r} (its gradient batch)."
                )
    itemsize = 8 if cfg.dtype == "float64" else 4
    params = _num_parameters(cfg.model, known)
    data_values = (known.input_numel or 0) * (n or 0) if cfg.data.name != "mnist" else 0
    # Parameters, their gradients and at least one optimizer vector of the same size.
    need = 3 * params * itemsize + data_values * itemsize
    have = _physical_memory()
    if need > have:
        key = {"mlp": "hidden_sizes", "autoencoder": "layer_sizes", "cnn": "channels"}.get(
            cfg.model.name, "hidden_size"
        )
        problems.append(
            f"`model.{key}`: the model would have at least {params:,} parameters "
            f"({_gigabytes(params * itemsize)} as {cfg.dtype}; training needs about "
            f"{_gigabytes(need)} with gradients, optimizer state and "
            f"{_gigabytes(data_values * itemsize)} of data), more than this machine's "
            f"{_gigabytes(have)} of memory; use smaller layers or less data."
        )


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
            if (
                leaf.curvature_batch_size is not None
                and leaf.batch_size is not None
                and leaf.curvature_batch_size > leaf.batch_size
            ):
                problems.append(
                    f"`{where}.curvature_batch_size` = {leaf.curvature_batch_size} "
                    f"exceeds its gradient batch_size {leaf.batch_size}; the curvature "
                    "batch is a slice of the gradient batch."
                )


def parse_config(
    raw: Any, *, default_name: str = "experiment", source: str | None = None
) -> ExperimentConfig:
    """Validate a raw mapping (as parsed from YAML) into an :class:`ExperimentConfig`.

    Args:
        raw: The parsed YAML document.
        default_name: ``name`` when the mapping has none (usually the file's stem).
        source: Where the mapping came from, for messages.

    Returns:
        ExperimentConfig: frozen, with every default and every ``null`` loss entry resolved.

    Raises:
        ConfigError: Listing every problem found, each with its dotted path.

    Example:
        >>> cfg = parse_config({"data": {"name": "digits"}, "model": {"name": "mlp"},
        ...                     "optimizers": [{"name": "adam"}], "budget": {"steps": 5}})
        >>> cfg.loss.name, cfg.optimizers[0].hyperparameters["lr"], cfg.name
        ('cross_entropy', 0.001, 'experiment')
        >>> try:
        ...     parse_config({"data": {"name": "digits"}, "model": {"name": "mlp"},
        ...                   "optimizers": [{"name": "adam", "lr": -1}], "budegt": {}})
        ... except ConfigError as err:
        ...     print(len(err.problems), err.problems[0].split(";")[0], err.problems[1], sep="\\n")
        3
        Unknown key `budegt`
        `optimizers.0.lr` must be in (0.0, inf), got -1.0.
    """
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            [f"the top level must be a mapping of keys to values, got {_type_name(raw)}."], source
        )
    for key in raw:
        if key not in _TOP_KEYS:
            problems.append(_unknown_key("", key, _TOP_KEYS))
    top = _build(
        _TopLevel, {k: v for k, v in raw.items() if k in _schema_fields(_TopLevel)}, "", problems
    )

    data = model = None
    for key, registry, what in (
        ("data", DATA_SCHEMAS, "dataset"),
        ("model", MODEL_SCHEMAS, "model"),
    ):
        if key not in raw:
            problems.append(
                f"`{key}` is required: a mapping with `name`, one of "
                f"{', '.join(repr(n) for n in registry)}."
            )
            continue
        schema = _pick_schema(raw[key], key, registry, problems, what)
        if schema is not None:
            built = _build(schema, raw[key], key, problems)
            if built is not _INVALID:
                if key == "data":
                    data = built
                else:
                    model = built

    optimizers: list[OptimizerConfig] = []
    raw_opts = raw.get("optimizers")
    if raw_opts is None:
        problems.append(
            "`optimizers` is required: a list of one or more entries with `name`, "
            f"one of {', '.join(repr(n) for n in OPTIMIZER_NAMES)}."
        )
    elif not isinstance(raw_opts, list) or not raw_opts:
        problems.append(f"`optimizers` must be a non-empty list, got {_show(raw_opts)}.")
    else:
        for i, entry in enumerate(raw_opts):
            opt = _parse_optimizer(entry, i, top, problems)
            if opt is not None:
                optimizers.append(opt)

    loss = _resolve_loss(top.loss, data, model, problems)
    wanted = len(raw_opts) if isinstance(raw_opts, list) else -1
    if data is None or model is None or len(optimizers) != wanted:
        raise ConfigError(problems, source)
    cfg = ExperimentConfig(
        name=top.name or default_name,
        seed=top.seed,
        device=top.device,
        dtype=top.dtype,
        num_threads=top.num_threads,
        data=data,
        model=model,
        loss=loss,
        optimizers=tuple(optimizers),
        budget=top.budget,
        batch_size=top.batch_size,
        curvature_batch_size=top.curvature_batch_size,
        eval=top.eval,
        output=top.output,
        distributed=top.distributed,
    )
    _check_name(cfg.name, problems)
    _check_combinations(cfg, problems)
    if not any(p.startswith(("`data", "`model", "`batch", "`optimizers")) for p in problems):
        _check_sizes(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


# ---------------------------------------------------------------------------------------------
# Overrides.


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value`` into its path and YAML-parsed value.

    Example:
        >>> parse_override("optimizers.0.damping=10")
        (['optimizers', '0', 'damping'], 10)
        >>> parse_override("model.hidden_sizes=[64, 32]")
        (['model', 'hidden_sizes'], [64, 32])
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            [f"Override {text!r} must look like dotted.key=value (e.g. optimizers.0.damping=10)."]
        )
    try:
        parsed = safe_load_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError([f"Override {text!r}: the value is not valid YAML ({err})."]) from None
    return key.split("."), parsed


def apply_overrides(raw: Any, overrides: Sequence[str]) -> Any:
    """Return a copy of ``raw`` with every ``dotted.key=value`` override applied.

    Missing intermediate mappings are created; list items are addressed by index. Keys are not
    checked here: :func:`parse_config` reports an unknown key with its dotted path.

    Raises:
        ConfigError: A malformed override, or a path through a value that is not a mapping or
            list, or a list index out of range.
    """
    import copy  # noqa: PLC0415

    out = copy.deepcopy(raw) if raw is not None else {}
    problems: list[str] = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ConfigError as err:
            problems.extend(err.problems)
            continue
        node = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    problems.append(
                        f"Override {text!r}: `{where}` is not an index of the "
                        f"{len(node)}-item list `{'.'.join(parts[:depth]) or '<top>'}`."
                    )
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                problems.append(
                    f"Override {text!r}: `{'.'.join(parts[:depth])}` is "
                    f"{_type_name(node)} {_show(node)}, not a mapping or list."
                )
                break
    if problems:
        raise ConfigError(problems, "overrides")
    return out


# ---------------------------------------------------------------------------------------------
# Loading and dumping.


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, override and validate a YAML experiment config.

    Args:
        path: The YAML file.
        overrides: ``dotted.key=value`` strings applied before validation.

    Returns:
        ExperimentConfig: the validated, fully resolved config.

    Raises:
        ConfigError: The file is missing or not valid YAML, an override is malformed, or the
            config has problems (all reported together).
    """
    path = Path(path)
    raw = read_yaml_file(path)
    raw = apply_overrides(raw, overrides)
    try:
        return parse_config(raw, default_name=path.stem, source=str(path))
    except ConfigError as err:
        raise _blame_overrides(err, overrides, str(path)) from None


def read_yaml_file(path: Path) -> Any:
    """Read a YAML file as the safe loader parses it.

    Raises:
        ConfigError: The file cannot be read, is not UTF-8 text, is not valid YAML, or its
            aliases expand it beyond :data:`_MAX_VALUES` values.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            [f"cannot read the config file: {err.strerror or err}."], str(path)
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [
                f"the file is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                f"{err.start}); save it as UTF-8, or check it is the YAML config you meant."
            ],
            str(path),
        ) from None
    try:
        raw = safe_load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {_cut(str(err))}"], str(path)) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        # PyYAML's constructors raise these for e.g. an impossible date or a 5,000-digit int.
        raise ConfigError(
            [f"not valid YAML: {type(err).__name__}: {_cut(str(err))}"], str(path)
        ) from None
    _check_expansion(raw, str(path))
    return raw


def _cut(text: str) -> str:
    return (
        text if len(text) <= _MAX_PROBLEM_CHARS // 2 else text[: _MAX_PROBLEM_CHARS // 2] + " ..."
    )


def _check_expansion(raw: Any, source: str) -> None:
    """Refuse a document whose aliases expand it beyond :data:`_MAX_VALUES` values."""
    count, stack = 0, [(raw, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > _MAX_VALUES or depth > 100:
            raise ConfigError(
                [
                    f"the document expands to more than {_MAX_VALUES:,} values or 100 levels "
                    "(YAML aliases such as *a repeat their anchor); a config is far smaller."
                ],
                source,
            )
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _blame_overrides(err: ConfigError, overrides: Sequence[str], source: str) -> ConfigError:
    """Name the command-line override behind each problem it caused, not the file."""
    if not overrides:
        return err
    keys = []
    for text in overrides:
        key = text.partition("=")[0].strip()
        keys.append((key, text))
    problems, blamed = [], 0
    for problem in err.problems:
        # The problem's own dotted path is the first `quoted` one it names.
        first = re.search(r"`([^`]*)`", problem)
        path = first.group(1) if first else ""
        hit = next((text for key, text in keys if path == key or path.startswith(key + ".")), None)
        if hit is None:
            problems.append(problem)
        else:
            blamed += 1
            problems.append(f"{problem} (from the command-line override {_show(hit)})")
    where = "command-line overrides" if blamed == len(problems) else f"{source} + overrides"
    return ConfigError(problems, where)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-ready values; :func:`parse_config` reads it back."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "optimizers":
            entries = []
            for opt in value:
                if opt.phases:
                    phases = [_entry(ph, plain) for ph in opt.phases]
                    for ph in phases:
                        del ph["label"]
                    entries.append(
                        {"label": opt.label, "phases": phases, "budget": plain(opt.budget)}
                    )
                else:
                    entries.append(_entry(opt, plain))
            out["optimizers"] = entries
        else:
            out[f.name] = plain(value)
    return out


def _entry(opt: OptimizerConfig, plain: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": opt.name, "label": opt.label}
    entry.update(plain(opt.hyperparameters))
    entry["batch_size"] = opt.batch_size
    if opt.name == "hessianfree":
        entry["curvature_batch_size"] = opt.curvature_batch_size
    entry["budget"] = plain(opt.budget)
    return entry


def _yaml(plain: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(plain), sort_keys=False, default_flow_style=None, width=100)


def dump_config(cfg: ExperimentConfig, header: str = "") -> str:
    """The resolved config as YAML text, optionally opened by ``header`` as comment lines."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + _yaml(config_to_dict(cfg))


def config_digest(cfg: ExperimentConfig) -> str:
    """SHA-256 of the resolved config (what a checkpoint must match to be resumed).

    The ``distributed`` section is left out: a timeout does not change the results, and runs
    written before the section existed keep their digest.
    """
    plain = config_to_dict(cfg)
    del plain["distributed"]
    return hashlib.sha256(_yaml(plain).encode()).hexdigest()


def training_digest(cfg: ExperimentConfig) -> str:
    """SHA-256 of the resolved config less every budget: what a step's result depends on.

    Two configs with equal training digests take the same steps; only when they stop differs,
    so a run may be resumed with a larger (or smaller) budget.
    """
    plain = config_to_dict(cfg)
    del plain["distributed"], plain["budget"]
    for entry in plain["optimizers"]:
        entry.pop("budget", None)
        for phase in entry.get("phases", ()):
            phase.pop("budget", None)
    return hashlib.sha256(_yaml(plain).encode()).hexdigest()


def is_budget_key(path: str) -> bool:
    """Whether a dotted config path is a budget (which ``--resume`` may change).

    Example:
        >>> is_budget_key("budget.seconds"), is_budget_key("optimizers.1.budget.steps")
        (True, True)
        >>> is_budget_key("optimizers.0.lr")
        False
    """
    return bool(re.fullmatch(r"(optimizers\.\d+\.(phases\.\d+\.)?)?budget(\..*)?", path))
