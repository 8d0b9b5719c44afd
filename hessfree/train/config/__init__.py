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
      - {name: hessianfree, label: hf-grow, batch_size: 250,   # growing batches: step k
         batch_growth: 1.1, batch_max: null,     # takes floor(250 * 1.1**k) cases, at most
         batch_multiple: 1,                      # batch_max (null: all), rounded down to a
         curvature_fraction: 0.25,               # multiple; curvature on 1/4 of each batch,
         curvature_fraction_full_steps: 0,       # all of it from the first full-set step;
         min_damping_cases: 75}                  # λ >= 75 / the step's batch (0.3 at 250)
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

Modules: :mod:`.schema` (field specs, the validator, :class:`ConfigError`), :mod:`.sections`
(the section dataclasses), :mod:`.hessianfree` (HessianFree's keys), :mod:`.checks` (checks
between sections), :mod:`.parse` (:func:`parse_config`, :func:`load_config`), :mod:`.overrides`
and :mod:`.yaml_io` (the YAML loader, dumping, digests). Everything public is imported here.
"""

from __future__ import annotations

from hessfree.train.config.overrides import apply_overrides, is_budget_key, parse_override
from hessfree.train.config.parse import load_config, parse_config
from hessfree.train.config.schema import ConfigError
from hessfree.train.config.sections import (
    DATA_SCHEMAS,
    MODEL_SCHEMAS,
    OPTIMIZER_NAMES,
    BudgetConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    infer_task,
)
from hessfree.train.config.yaml_io import (
    config_digest,
    config_to_dict,
    dump_config,
    read_yaml_file,
    safe_load_yaml,
    training_digest,
)

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
    "read_yaml_file",
    "infer_task",
]
