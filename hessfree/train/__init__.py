"""The YAML experiment runner behind the ``hessfree`` command.

``hessfree run CONFIG.yaml`` loads a strict config (:mod:`~hessfree.train.config`), builds the
data (:mod:`~hessfree.train.data`, offline only) and the model (:mod:`~hessfree.train.models`),
and trains one or more optimizers side by side from the same initial weights on the same data
order (:mod:`~hessfree.train.loop`), writing metrics, a summary, plots and resumable
checkpoints to a run directory.

The factories are usable from Python::

    from hessfree.train import build_model, load_dataset
    ds = load_dataset("curves", num_train=2000, num_test=500, seed=0)
    model = build_model("autoencoder", input_shape=ds.input_shape,
                        layer_sizes=[784, 400, 200, 100, 50, 25, 6], init="sparse")
"""

from __future__ import annotations

from hessfree.train.config import ConfigError, ExperimentConfig, load_config, parse_config
from hessfree.train.data import DataError, Dataset, load_dataset
from hessfree.train.loop import Runner, RunResult, run_experiment
from hessfree.train.models import MLP, Autoencoder, ConvNet, TanhRNN, build_model, sparse_init_
from hessfree.train.objectives import Objective, make_loss, make_objective

__all__ = [
    # config
    "load_config",
    "parse_config",
    "ExperimentConfig",
    "ConfigError",
    # data
    "load_dataset",
    "Dataset",
    "DataError",
    # models and losses
    "build_model",
    "sparse_init_",
    "Autoencoder",
    "MLP",
    "ConvNet",
    "TanhRNN",
    "make_loss",
    "make_objective",
    "Objective",
    # running
    "run_experiment",
    "Runner",
    "RunResult",
]
