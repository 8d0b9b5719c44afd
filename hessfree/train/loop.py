"""The experiment loop: optimizers side by side, metrics, checkpoints, resume, signals.

The optimizers of a config run one after another, each from the same initial weights (built
once from ``seed``) and on the same data order (a per-optimizer ``torch.Generator`` seeded
with ``seed`` draws each epoch's permutation). A step takes the next ``batch_size`` cases of
the permutation (an epoch's remainder smaller than a batch is skipped); HF's curvature batch is
the first ``curvature_batch_size`` cases of that gradient batch, or its ``curvature_fraction``
(all of it once a growing batch is the whole set and ``curvature_fraction_full_steps`` steps
have been taken on it).
With ``batch_growth`` > 1 the batch of step ``k`` of an entry (or phase) is ``batch_size *
batch_growth**k`` cases, rounded down to a multiple of ``batch_multiple``, at most
``batch_max`` (:func:`~hessfree.train.stepping.batch_sizes`): a function of the step count,
so resume and data-parallel runs take the same sizes as one uninterrupted process. An HF
entry's ``min_damping_cases`` c sets its ``min_damping`` to c / that size (the whole batch,
all ranks' cases) before each step (:func:`~hessfree.train.stepping.set_damping_floor`).

Run directory (default ``<output.dir>/<name>-<YYYYmmdd-HHMMSS>/``)::

    config.yaml          resolved config (defaults and overrides filled in)
    metrics.jsonl        one line per evaluation (see hessfree.train.metrics)
    summary.json         per optimizer: stop reason, final and best values, time to best
    checkpoints/<label>.pt   model, optimizer, RNG and loop state of each optimizer
    loss_vs_seconds.png, loss_vs_steps.png

Checkpoints are written atomically every ``output.checkpoint_every`` steps, after the step-0
evaluation and when an optimizer finishes. Resuming loads them, truncates ``metrics.jsonl`` to
the length the latest one recorded (no duplicate or partial lines) and continues; with a step
or epoch budget the result is bit-identical on the CPU to an uninterrupted run. A wall-clock
budget (``budget.seconds``) or ``eval.every_seconds`` depends on the machine's speed and is
not reproducible, resumed or not.

An optimizer diverges when a step's batch loss, the training loss evaluated after it, or any
entry of the weights it leaves (parameters and floating-point buffers) is not finite: it stops
at once, its metrics record that step (losses ``null``), and its final checkpoint holds the
last finite weights (those of the step before when the step left non-finite ones; the
checkpoint's ``weights_step`` and the summary's ``checkpoint_step`` say which) with
``diverged_at_step``. The other optimizers train on; the summary lists the diverged ones under
``diverged`` and :attr:`RunResult.exit_code` is :data:`EXIT_DIVERGED` (4). Keeping those
weights costs one copy of the model state per step.

SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed) finish the current step, write a
checkpoint and a summary, and end the run with status ``interrupted`` (the CLI exits with 128 +
the signal number: 130, 143, 129). A second signal abandons the step at once; the previous
checkpoint stays valid. An L-BFGS step (``max_iter`` iterations) and an HF call of ``max_iter``
> 1 HF steps can outlast any budget checked between steps: a second signal during one ends it
at its next evaluation (L-BFGS) or after its current HF step, with a consistent state, and
checkpoints (a third abandons), and ``budget.seconds`` ends one the same way
(:meth:`Runner._step_cut`). After SIGHUP, output to a terminal that has hung up or to a pipe whose
reader has gone (``| tee`` closed with the terminal) is dropped, so the run still ends cleanly.
A stdout whose reader ends without a signal (``| head``, a pager that quit) is dropped too,
with one warning on stderr, and the run goes on: its results are the run directory.

Under ``torchrun --nproc_per_node=N`` the run is data-parallel (:mod:`hessfree.train.parallel`):
every rank takes an equal slice of each batch (batch sizes must be multiples of N; a growing
batch's ``batch_multiple`` must be one), the step
equals a one-process step on the whole batch, decisions are agreed once per step, and rank 0
alone evaluates and writes the run directory; the other ranks write nothing. A signal caught by
any rank stops every rank after the step in which the ranks agree on it. ``--resume`` needs the
same N and the run directory readable by every rank. A rank that dies or hangs makes the others
stop with :class:`~hessfree.train.parallel.PeerError` (at once, or after
``distributed.timeout_seconds``).

Units: :mod:`hessfree.train.rundir` (the run directory), :mod:`hessfree.train.progress` (the
loop state a checkpoint restores), :mod:`hessfree.train.stepping` (one step per kind of
optimizer, the curvature batch), :mod:`hessfree.train.evaluation`; this module holds the
:class:`Runner` that drives them.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import errno
import importlib.util
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessfree.train.checkpoint import CheckpointError, save_checkpoint, write_json_atomic
from hessfree.train.config import (
    ConfigError,
    ExperimentConfig,
    OptimizerConfig,
    config_digest,
    training_digest,
)
from hessfree.train.config.checks import (
    _dtype_max,
    _physical_memory,
    curvature_batch_fits,
    damping_floor_problems,
    full_steps_problem,
    leaves,
    loss_fits_targets,
)
from hessfree.train.data import Dataset, load_dataset
from hessfree.train.evaluation import evaluate
from hessfree.train.metrics import MetricsLog, format_table, read_metrics, summarize
from hessfree.train.models import build_model
from hessfree.train.objectives import Objective, make_objective
from hessfree.train.optimizers import build_optimizer, hf_diagnostics
from hessfree.train.parallel import Group, process_group
from hessfree.train.progress import Progress
from hessfree.train.rundir import (
    CHECKPOINT_FORMAT,
    RunDirError,
    _exists,
    absolute_data_path,
    default_run_dir,
    lock_run_dir,
    prepare_run_dir,
    resumed_config,
    run_dir_problems,
    writing,
)
from hessfree.train.stepping import (
    StepCut,
    batch_sizes,
    converged,
    describe_batches,
    set_damping_floor,
    take_step,
)

__all__ = [
    "Abandoned",
    "ResumeWarning",
    "Runner",
    "RunResult",
    "RunStatus",
    "RunStop",
    "StopReason",
    "StepEvent",
    "run_experiment",
    "default_run_dir",
    "resolve_device",
    "run_dir_problems",
]


class RunStop(enum.Enum):
    """Why an optimizer stopped (:class:`hessfree.cg.StopReason` is why CG stopped)."""

    STEPS = "steps"
    EPOCHS = "epochs"
    SECONDS = "seconds"
    DIVERGED = "diverged"
    CONVERGED = "converged"
    INTERRUPTED = "interrupted"


#: The name :class:`RunStop` had before; kept so that existing imports work.
StopReason = RunStop

#: Names a new run tries for its default directory (``<name>-<time>``, then ``-2``, ``-3``...)
#: while other runs started in the same second take them first.
_DEFAULT_DIR_TRIES = 20

#: Stop reasons a larger budget on ``--resume`` lifts (the others are outcomes of training).
_BUDGET_REASONS = ("steps", "epochs", "seconds")


def budget_reason(budget: Any, st: Progress, n: int) -> RunStop | None:
    """The budget limit ``st`` has reached over ``n`` training cases, if any."""
    if budget.steps is not None and st.step >= budget.steps:
        return RunStop.STEPS
    if budget.epochs is not None and st.cases >= budget.epochs * n - 1e-9:
        return RunStop.EPOCHS
    if budget.seconds is not None and st.seconds >= budget.seconds:
        return RunStop.SECONDS
    return None


class RunStatus(enum.Enum):
    """How a run ended."""

    COMPLETED = "completed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class StepEvent:
    """Passed to ``on_step`` after every optimizer step."""

    label: str
    step: int
    epoch: float
    seconds: float
    batch_loss: float
    batch_size: int = 0  # the gradient batch of the step (it varies under `batch_growth`)


@dataclass(frozen=True)
class RunResult:
    """The outcome of :meth:`Runner.run`.

    Attributes:
        run_dir: The run directory.
        status: Completed or interrupted.
        signal: The signal number that interrupted the run, else None.
        summary: The content of ``summary.json`` (empty on the ranks other than 0 of a
            data-parallel run, which write nothing).
        diverged: The labels of the optimizers that diverged, in the config's order (on every
            rank: the ranks agree on divergence).
    """

    run_dir: Path
    status: RunStatus
    signal: int | None
    summary: dict[str, Any]
    diverged: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        """128 + the signal number when interrupted (130 for SIGINT); else
        :data:`EXIT_DIVERGED` when an optimizer diverged, 0 when none did.

        A sweep that reads only the exit status would otherwise count a contender that blew up
        as a finished comparison; the other contenders' results are complete either way.
        """
        if self.signal is not None:
            return 128 + self.signal
        return EXIT_DIVERGED if self.diverged else 0


#: The exit status of a run that completed but in which an optimizer diverged.
EXIT_DIVERGED = 4


class Abandoned(KeyboardInterrupt):
    """A second SIGINT or SIGTERM abandoned the step at once (the previous checkpoint stays
    valid); ``signum`` is that signal, so the CLI exits with 128 + it, as for the first."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)


class ResumeWarning(RuntimeWarning):
    """A resumed entry will not retrace the uninterrupted run bit for bit (a checkpoint from
    an older version, other arithmetic, or a step ``budget.seconds`` or a second signal ended
    early). A :class:`RuntimeWarning`, so filters and
    ``pytest.warns(RuntimeWarning)`` written before it existed still catch it; the CLI shows
    it as a ``hessfree: warning:`` line rather than with this module's file and line."""


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def resolve_device(name: str) -> torch.device:
    """``auto`` is ``cuda`` when available, else ``cpu``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _data_problems(
    cfg: ExperimentConfig, ds: Dataset, objective: Objective, world_size: int = 1
) -> list[str]:
    """Config checks that need the loaded data (and the number of processes)."""
    problems = []
    n = ds.x_train.shape[0]
    for path, opt in leaves(cfg):
        bs = opt.batch_size or n
        if bs > n:
            problems.append(
                f"`{path}` ({opt.label}): batch_size {bs} exceeds the {n} "
                f"training cases of {ds.name!r}."
            )
        if opt.batch_max is not None and opt.batch_max > n:
            problems.append(
                f"`{path}.batch_max` = {opt.batch_max} ({opt.label}) exceeds the {n} training "
                f"cases of {ds.name!r}; use at most {n}, or null for the whole training set."
            )
        if (why := full_steps_problem(path, opt, n)) is not None:
            problems.append(why)
        if opt.batch_size is None:  # a given batch_size's first floor was checked on parse
            problems += damping_floor_problems(path, opt, n, _dtype_max(cfg.dtype))
        if not curvature_batch_fits(opt, n):
            problems.append(
                f"`{path}` ({opt.label}): curvature_batch_size "
                f"{opt.curvature_batch_size} exceeds the gradient batch ({bs})."
            )
        # Equal shards: the mean of the ranks' means is then the mean over the whole batch.
        whole = "" if opt.batch_size else " (null: the whole training set)"
        sizes = [("batch_size", bs, whole)]
        if opt.curvature_batch_size is not None and opt.curvature_batch_size < bs:
            sizes.append(("curvature_batch_size", opt.curvature_batch_size, ""))
        if opt.growing:  # every grown batch and curvature batch is a multiple of it
            sizes.append(("batch_multiple", opt.batch_multiple, " (growing batches round to it)"))
        elif opt.curvature_fraction is not None and world_size > 1:
            c = batch_sizes(opt, n, False)[1]
            replicated = opt.hyperparameters.get("curvature_batch") == "replicated"
            if c is not None and c % world_size and not replicated:
                problems.append(
                    f"`{path}` ({opt.label}): curvature_fraction {opt.curvature_fraction:g} of "
                    f"batch_size {bs} is {c} cases, not a multiple of the {world_size} "
                    "processes; each rank takes an equal slice. Choose a fraction that gives a "
                    "multiple, or curvature_batch_size."
                )
        for key, size, note in sizes:
            if world_size > 1 and size % world_size:
                low = size - size % world_size
                problems.append(
                    f"`{path}` ({opt.label}): {key} {size}{note} is not a multiple of "
                    f"the {world_size} processes; each rank takes an equal slice so that the "
                    f"step equals a one-process step on the whole batch. Use "
                    f"{key}={low or world_size} or {low + world_size}, or another process count."
                )
    problems += _probe_memory_problems(cfg, ds, objective)
    kind = ds.target_kind
    if objective.task != "reconstruction":
        if kind is None:
            problems.append(
                f"{ds.name!r} has no targets; train an autoencoder (`model.name: autoencoder`)."
            )
        elif not loss_fits_targets(objective.loss_name, kind):
            if objective.task == "classification":
                problems.append(
                    f"`loss.name` = 'cross_entropy' needs integer labels; {ds.name!r} has "
                    "real-valued targets; use 'mse'."
                )
            else:
                problems.append(
                    f"`loss.name` = {objective.loss_name!r} needs real-valued targets; "
                    f"{ds.name!r} has integer labels; use 'cross_entropy'."
                )
    if objective.task == "reconstruction" and objective.loss_name == "bce_with_logits":
        lo, hi = float(ds.x_train.min()), float(ds.x_train.max())
        if lo < 0 or hi > 1:
            problems.append(
                f"`loss.name` = 'bce_with_logits' reconstructs inputs in [0, 1]; "
                f"{ds.name!r} inputs range over [{lo:.3g}, {hi:.3g}]; use 'mse'."
            )
    return problems


def _probe_memory_problems(cfg: ExperimentConfig, ds: Dataset, objective: Objective) -> list[str]:
    """K-FAC's ``num_probes``: each refresh draws a (probes, curvature batch, outputs) tensor,
    which a large count makes larger than the machine (int64's largest overflowed torch's
    storage size at the first step, a traceback after the run directory was written)."""
    problems = []
    n = ds.x_train.shape[0]
    outputs = _num_outputs(objective, ds) or math.prod(ds.input_shape)
    itemsize = 8 if cfg.dtype == "float64" else 4
    for path, leaf in leaves(cfg):
        precond = leaf.hyperparameters.get("precond") if leaf.name == "hessianfree" else None
        probes = precond.get("num_probes") if isinstance(precond, dict) else None
        if not probes:
            continue
        cases = min(leaf.curvature_batch_size or leaf.batch_max or leaf.batch_size or n, n)
        size = probes * cases * outputs * itemsize
        if size > _physical_memory():
            problems.append(
                f"`{path}.precond.num_probes` = {probes} ({leaf.label}): each K-FAC refresh "
                f"draws {probes:,} x {cases:,} cases x {outputs:,} outputs, {size / 1e9:,.1f} GB "
                f"as {cfg.dtype}, more than this machine's {_physical_memory() / 1e9:,.1f} GB of "
                "memory; use a few probes (the default is 1)."
            )
    return problems


def _num_outputs(objective: Objective, ds: Dataset) -> int | None:
    if objective.task == "reconstruction":
        return None
    if objective.task == "classification":
        return ds.num_classes
    return int(ds.y_train.shape[1]) if ds.y_train is not None else None


@dataclass
class _Training:
    """One optimizer entry while it trains: what its steps read and change."""

    index: int
    spec: OptimizerConfig
    leaf: OptimizerConfig  # the optimizer taking the steps (the phase running)
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    st: Progress
    batch_size: int = 0
    curvature_size: int | None = None
    replicated: bool = False
    bar: Any = None
    diverged_at: int | None = None  # the step after which a non-finite value stopped it
    weights_step: int | None = None  # the step whose weights its checkpoint holds (None: st.step)
    cut_steps: int = 0  # L-BFGS steps a budget or a second signal ended at an evaluation

    def use(self, leaf: OptimizerConfig, n: int, distributed: bool, step: int = 0) -> None:
        """Take the steps with ``leaf`` from now on, with its batch sizes of step ``step``
        (counted from the start of the entry or phase: a growing batch's position)."""
        self.leaf = leaf
        self.batch_size, self.curvature_size, self.replicated = batch_sizes(
            leaf, n, distributed, step
        )


class Runner:
    """Runs one experiment; see the module docstring for what it writes.

    Args:
        config: The validated config.
        run_dir: The run directory; None: :func:`default_run_dir`. Must be new or empty
            unless ``resume``.
        resume: Continue the run in ``run_dir`` from its checkpoints. ``config`` must be the
            run's own but for budgets and timeouts (a relative ``data.path`` naming the file
            the run recorded is the same): :func:`~hessfree.train.rundir.resumed_config`.
        progress: Show progress bars; None: as ``output.progress`` says.
        verbose: Print start/stop lines and the summary table.
        on_step: Called after every step with a :class:`StepEvent` (it may call
            :meth:`request_stop`).
        config_header: Comment lines opening the saved ``config.yaml``.
        source: Where ``config`` came from (its file), named by a refusal as ``--check``
            names it ("Invalid config in configs/x.yaml: ..."); None: the config's ``name``.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: str | Path | None = None,
        *,
        resume: bool = False,
        progress: bool | None = None,
        verbose: bool = True,
        on_step: Callable[[StepEvent], None] | None = None,
        config_header: str = "",
        source: str | None = None,
    ) -> None:
        # A new run records its data file's absolute path; a resumed one keeps what it recorded.
        self.config = config if resume else absolute_data_path(config)
        if resume and run_dir is None:
            raise ValueError("`run_dir` is required to resume a run.")
        # a default name taken meanwhile by another run gets -2, -3... on this same time stamp
        self._named_at = datetime.datetime.now()
        self.run_dir = (
            Path(run_dir) if run_dir is not None else default_run_dir(config, self._named_at)
        )
        self.default_dir = run_dir is None
        self.resume = resume
        if progress is None:
            progress = config.output.progress == "always" or (
                config.output.progress == "auto" and sys.stdout.isatty()
            )
        self.progress = progress
        self.verbose = verbose
        self.on_step = on_step
        self.config_header = config_header
        self.source = source if source is not None else config.name
        self._stop_signal: int | None = None
        # Inside a step that can end early (L-BFGS; HF of max_iter > 1): what ends it and how
        # the first signal's line says so; a second signal then ends it (cut).
        self._cuttable: str | None = None
        self._cut_signal: int | None = None  # the second signal, which ends that step
        self._cut: Callable[[], bool] | None = None  # this step's test (HF's callback asks it)
        self._first_loss: float | None = None  # the HF call's first loss, which a cut returns
        self._hung_up = False  # SIGHUP came: output whose reader is gone is dropped
        self._bar: Any = None  # the progress bar of the entry training now
        self.group = Group()
        self._lock: Any = None  # the run directory's lock while this process writes it

    # -- control ---------------------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step as if ``signum`` arrived (checkpoint, then return)."""
        if self._stop_signal is None:
            self._stop_signal = int(signum)

    def _handle_signal(self, signum: int, frame: object) -> None:
        if signum == _SIGHUP:
            self._hung_up = True
            _drop_hung_up_terminal()
            if self._bar is not None:  # its writes bypass _print: no more of them
                self._bar.disable = True
        name = signal.Signals(signum).name
        if self._stop_signal is not None:
            if self._cuttable is not None and self._cut_signal is None:
                # An L-BFGS step or an HF call of many steps may run for ever (a huge
                # max_iter): it ends at its next evaluation or HF step with a consistent state,
                # which is then checkpointed.
                self._cut_signal = signum
                if self.verbose:
                    self._print(
                        f"\n{name} again: ending {self._cuttable}, then checkpointing (signal "
                        "a third time to abort without a checkpoint).",
                        sys.stderr,
                    )
                return
            raise Abandoned(signum)  # second signal: abandon the step
        self._stop_signal = signum
        if self.verbose:
            again = (
                f"signal again to end {self._cuttable} and checkpoint"
                if self._cuttable is not None
                else "signal again to abort without a checkpoint"
            )
            self._print(
                f"\n{name}: finishing the current step, then checkpointing ({again}).",
                sys.stderr,
            )

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stopping = (signal.SIGINT, signal.SIGTERM) + ((_SIGHUP,) if _SIGHUP else ())
        previous = {s: signal.signal(s, self._handle_signal) for s in stopping}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _say(self, text: str) -> None:
        if self.verbose:
            self._print(text, sys.stdout)

    def _print(self, text: str, stream: Any) -> None:
        """``print``; a stream whose reader has gone is pointed at /dev/null instead of failing
        the run: after SIGHUP (EPIPE, EIO), so the run's last writes (checkpoint and summary
        go first) succeed, and whenever it is a pipe whose reader ended (EPIPE: ``| head``),
        which is said once on stderr and the run goes on (its results are the run directory;
        stopping it would cut a comparison short where a script reads only the pipe's end)."""
        try:
            print(text, file=stream, flush=True)
        except OSError as err:
            self._drop(stream, err)

    def _drop(self, stream: Any, err: OSError) -> None:
        """Point ``stream``, whose write failed with ``err``, at /dev/null where its reader has
        gone (:meth:`_print`); re-raise ``err`` for any other failure."""
        reader_gone = err.errno == errno.EPIPE
        if not (self._hung_up or reader_gone):
            raise err
        _to_devnull(stream)
        if reader_gone and not self._hung_up and stream is sys.stdout:
            self._print(
                "hessfree: warning: stdout's reader has gone (a pipe into `head`, or a "
                "pager that quit); the run goes on without printing, and writes its results "
                f"to {os.path.abspath(self.run_dir)} (summary.json, metrics.jsonl).",
                sys.stderr,
            )

    # -- setup -----------------------------------------------------------------------------

    def _setup(self) -> None:
        if self.resume:  # the run's own config, as the CLI resumes it (relative data path too)
            self.config = resumed_config(self.run_dir, self.config)
        cfg = self.config
        if not self.resume and self.group.rank == 0:
            if self.default_dir and _exists(self.run_dir):  # taken since __init__ named it
                self.run_dir = default_run_dir(cfg, self._named_at)
            key = "output.dir" if self.default_dir else "--out"
            problems = run_dir_problems(self.run_dir, key)
            if problems:
                raise ConfigError(problems, self.source)
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self.device = self.group.device
        self.arithmetic = _arithmetic(self.device)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        self.digest = config_digest(cfg)
        self.training_digest = training_digest(cfg)

        options = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "name"}
        if "seed" in options and options["seed"] is None:
            options["seed"] = cfg.seed
        ds = load_dataset(cfg.data.name, **options)
        self.data_sha256 = ds.sha256()
        self.objective = make_objective(cfg.task, cfg.loss.name, cfg.loss.reduction, cfg.data.name)
        problems = _data_problems(cfg, ds, self.objective, self.group.world_size)
        if problems:
            raise ConfigError(problems, f"{self.source} (after loading {cfg.data.name!r})")

        model_options = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "name"}
        torch.manual_seed(cfg.seed)
        try:
            model = build_model(
                cfg.model.name,
                input_shape=ds.input_shape,
                num_outputs=_num_outputs(self.objective, ds),
                **model_options,
            )
        except ValueError as err:
            raise ConfigError([f"`model`: {err}"], self.source) from None
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

        ds = ds.to(self.device, self.dtype)
        self.dataset = ds
        self.x_train, self.t_train = ds.x_train, self.objective.targets(ds.x_train, ds.y_train)
        m = cfg.eval.max_cases
        self.eval_sets = {
            "train": (ds.x_train[:m], self.t_train[:m]),
            "test": (ds.x_test[:m], self.objective.targets(ds.x_test, ds.y_test)[:m]),
        }
        self._say(
            f"data: {ds.description}; {ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test, "
            f"inputs {ds.input_shape}"
        )
        num_params = sum(p.numel() for p in self.model.parameters())
        self._say(
            f"model: {cfg.model.name}, {num_params:,} parameters, {self.dtype} on {self.device}"
        )

    def _prepare_dir(self) -> dict[str, dict[str, Any]]:
        """Create (or check, when resuming) the run directory; return existing checkpoints.

        The writing process holds the directory's lock (:func:`lock_run_dir`) for the run:
        a resume takes it before reading anything, a new run as soon as it has created it.
        """
        writer = self.group.rank == 0
        if writer and self.resume and (self.run_dir / "config.yaml").is_file():
            self._lock = lock_run_dir(self.run_dir)
        for attempt in range(_DEFAULT_DIR_TRIES):
            try:
                found = prepare_run_dir(
                    self.run_dir,
                    self.config,
                    resume=self.resume,
                    writer=writer,
                    world_size=self.group.world_size,
                    data_sha256=self.data_sha256,
                    config_header=self.config_header,
                    say=self._say,
                )
                break
            except RunDirError:
                # Runs started in the same second share a default name: whichever creates it
                # first keeps it, the others take the next free one (never an existing one).
                taken = self.default_dir and not self.resume and _exists(self.run_dir)
                if not (writer and taken) or attempt == _DEFAULT_DIR_TRIES - 1:
                    raise
                self.run_dir = default_run_dir(self.config, self._named_at)
        if writer and not self.resume:
            self._lock = lock_run_dir(self.run_dir)
        return found

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Set up, train every optimizer, write the summary and plots.

        ``num_threads`` applies for the duration of the run; torch's setting is restored after.

        Raises:
            ConfigError: The config does not fit the data, or the run directory is unusable.
            DataError: The data is missing or corrupt.
        """
        threads = torch.get_num_threads()
        cfg = self.config
        try:
            with process_group(
                resolve_device(cfg.device), cfg.distributed.timeout_seconds
            ) as group:
                self.group = group
                if group.rank != 0:  # rank 0 speaks for a data-parallel run
                    self.verbose = self.progress = False
                return self._run()
        finally:
            self.group = Group()
            torch.set_num_threads(threads)
            if self._lock is not None:
                self._lock.close()  # releases the run directory
                self._lock = None

    def _start(self) -> dict[str, dict[str, Any]]:
        """Set up and prepare the run directory, on every rank alike; return checkpoints."""
        if not self.group.active:
            self._setup()
            return self._prepare_dir()
        error, checkpoints = None, {}
        try:
            self._setup()
            checkpoints = self._prepare_dir()
        except Exception as err:  # every rank learns of it before anyone waits for a peer
            error = err
        self.run_dir = Path(self.group.agree_start(error, str(self.run_dir)))
        return checkpoints

    def _run(self) -> RunResult:
        checkpoints = self._start()
        writer = self.group.rank == 0
        plots = writer and self.config.output.plots
        if plots and importlib.util.find_spec("matplotlib") is None:
            print(_no_plots_message(), file=sys.stderr, flush=True)  # before the work
            plots = False
        # The latest checkpoint wrote the most (an optimizer continued under a larger budget
        # on resume writes after the ones that followed it).
        truncate_to = max((int(c["metrics_bytes"]) for c in checkpoints.values()), default=0)
        if self.resume:
            self._say(f"resuming {self.run_dir}")
        outcomes: dict[str, dict[str, Any]] = {}
        status, signum = RunStatus.COMPLETED, None
        with (
            MetricsLog(
                self.run_dir / "metrics.jsonl", truncate_to=truncate_to if self.resume else None
            )
            if writer
            else nullcontext()
        ) as log:
            self.log = log
            with self._signals():
                for index, spec in enumerate(self.config.optimizers):
                    try:
                        outcomes[spec.label] = self._train(index, spec, checkpoints.get(spec.label))
                    except _Interrupted as stop:
                        status, signum = RunStatus.INTERRUPTED, stop.signum
                        outcomes[spec.label] = self._outcome(
                            spec, RunStop.INTERRUPTED, self._current
                        )
                        break
        diverged = tuple(
            label for label, o in outcomes.items() if o["stop_reason"] == RunStop.DIVERGED.value
        )
        if not writer:
            return RunResult(self.run_dir, status, signum, {}, diverged)
        summary = summarize(
            read_metrics(self.run_dir / "metrics.jsonl"),
            outcomes,
            metric=self.objective.metric_name,
            higher_is_better=self.objective.higher_is_better,
            name=self.config.name,
            status=status.value,
        )
        with writing(self.run_dir / "summary.json", self.run_dir):
            write_json_atomic(self.run_dir / "summary.json", summary)
        if status is RunStatus.COMPLETED and plots:
            self._plot()
        self._say("\n" + format_table(summary))
        if status is RunStatus.INTERRUPTED:
            self._say(
                f"\ninterrupted by {signal.Signals(signum).name}; resume with: "
                f"hessfree run --resume {os.path.abspath(self.run_dir)}"
            )
        else:
            if diverged:
                self._say(
                    f"\ndiverged: {', '.join(diverged)} (see diverged_at_step in summary.json); "
                    f"the other optimizers' results are complete. Exit status {EXIT_DIVERGED}."
                )
            # absolute: output.dir and --out are relative to the working directory
            self._say(f"\nrun directory: {os.path.abspath(self.run_dir)}")
        return RunResult(self.run_dir, status, signum, summary, diverged)

    def _plot(self) -> None:
        """Write the plots; without matplotlib, say so (stderr) instead of failing the run."""
        from hessfree.train.plots import plot_run

        try:
            with writing(self.run_dir, self.run_dir):
                plot_run(self.run_dir)
        except ImportError as err:
            print(_no_plots_message(err), file=sys.stderr, flush=True)

    def _outcome(
        self,
        spec: OptimizerConfig,
        reason: RunStop,
        st: Progress,
        diverged_at: int | None = None,
        weights_step: int | None = None,
    ) -> dict[str, Any]:
        """The loop's facts about one entry for the summary.

        ``diverged_at_step`` is null unless it diverged; ``checkpoint_step`` is the step whose
        weights ``checkpoints/<label>.pt`` holds (before the diverged step when that step
        left non-finite weights).
        """
        return {
            "name": spec.name,
            "stop_reason": reason.value,
            "steps": st.step,
            "epochs": st.cases / self.x_train.shape[0],
            "seconds": st.seconds,
            "diverged_at_step": diverged_at if reason is RunStop.DIVERGED else None,
            "checkpoint_step": st.step if weights_step is None else weights_step,
        }

    # -- one optimizer ---------------------------------------------------------------------

    def _train(
        self, index: int, spec: OptimizerConfig, ckpt: dict[str, Any] | None
    ) -> dict[str, Any]:
        cfg = self.config
        t = self._begin(index, spec, ckpt)
        if isinstance(t, dict):  # finished before, and its budget not raised
            return t
        from tqdm.auto import tqdm

        self._say(
            f"[{index + 1}/{len(cfg.optimizers)}] {spec.label} ({spec.name}): "
            + describe_batches(t.leaf, self.x_train.shape[0])
        )
        t.bar = tqdm(
            total=spec.budget.steps,
            initial=t.st.step,
            desc=spec.label,
            dynamic_ncols=True,
            file=_BarStream(self),
            leave=True,
            disable=not self.progress,
        )
        self._bar = t.bar
        try:
            reason = self._steps(t, fresh=ckpt is None)
        finally:
            t.bar.close()
        cut = (
            f" (the last step ended early by the {reason.value} budget)"
            if t.cut_steps and reason is RunStop.SECONDS
            else ""
        )
        self._say(
            f"    {spec.label}: stopped by {reason.value} after {t.st.step} steps, "
            f"{t.st.seconds:.3g} s of training{cut}"
        )
        if t.diverged_at is not None:
            kept = (
                f"the weights after step {t.weights_step}, the last finite ones"
                if t.weights_step is not None
                else f"its (finite) weights after step {t.st.step}"
            )
            self._say(
                f"    {spec.label}: diverged: a loss or weight was not finite after step "
                f"{t.diverged_at}; checkpoints/{spec.label}.pt holds {kept}"
            )
        return self._outcome(spec, reason, t.st, t.diverged_at, t.weights_step)

    def _begin(
        self, index: int, spec: OptimizerConfig, ckpt: dict[str, Any] | None
    ) -> _Training | dict[str, Any]:
        """The initial weights and optimizer, or the checkpoint's; its outcome if finished."""
        cfg, model, group = self.config, self.model, self.group
        n = self.x_train.shape[0]
        phase = int(ckpt.get("phase", 0)) if ckpt is not None else 0
        leaf = spec.leaves[phase]
        model.load_state_dict(self.initial_state)
        model.train()
        optimizer = self._build(leaf)
        torch.manual_seed(cfg.seed)
        data_gen = torch.Generator().manual_seed(cfg.seed)
        t = _Training(index, spec, leaf, optimizer, data_gen, Progress())
        t.use(leaf, n, group.active)
        self._current = t.st

        if ckpt is not None:
            t.st = self._current = self._restore(spec, ckpt, optimizer, data_gen, n)
            lifted = (
                ckpt["finished"]
                and ckpt["stop_reason"] in _BUDGET_REASONS
                and budget_reason(spec.budget, t.st, n) is None
                and not (spec.phases and budget_reason(leaf.budget, t.st.in_phase(), n))
            )
            if lifted:
                self._say(
                    f"[{index + 1}/{len(cfg.optimizers)}] {spec.label}: continuing after "
                    f"{t.st.step} steps under the larger budget"
                )
            elif ckpt["finished"]:
                self._say(
                    f"[{index + 1}/{len(cfg.optimizers)}] {spec.label}: already finished "
                    f"({ckpt['stop_reason']}, {t.st.step} steps)"
                )
                return self._outcome(
                    spec,
                    RunStop(ckpt["stop_reason"]),
                    t.st,
                    # written before these were recorded: the step it stopped at, as it held
                    diverged_at=ckpt.get("diverged_at_step", t.st.step),
                    weights_step=ckpt.get("weights_step", t.st.step),
                )
            if t.st.last_cut_step is not None and t.st.last_cut_step == t.st.step:
                self._warn_resume(
                    f"{spec.label}'s step {t.st.step} was ended early (by budget.seconds or a "
                    "second signal: L-BFGS at an evaluation, HF between the steps of its call), "
                    "so it continues from that step's consistent state, but not bit-identically "
                    f"to a run whose step {t.st.step} ran whole."
                )
        group.check_same(model.parameters())
        return t

    def _warn_resume(self, message: str) -> None:
        """A :class:`ResumeWarning`, from rank 0 only: rank 0 speaks for a data-parallel run
        (each rank restores the same checkpoint, so each would say the same)."""
        if self.group.rank == 0:
            warnings.warn(message, ResumeWarning, stacklevel=3)

    def _restore(
        self,
        spec: OptimizerConfig,
        ckpt: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        data_gen: torch.Generator,
        n: int,
    ) -> Progress:
        """Load a checkpoint into the model, optimizer and RNGs; its progress.

        Its digest was verified on load (:func:`~hessfree.train.checkpoint.load_checkpoint`);
        a checkpoint that still does not fit this run (a key missing, a tensor of another shape,
        a hyperparameter out of range) is a :class:`CheckpointError` naming the file.
        """
        path = self.run_dir / "checkpoints" / f"{spec.label}.pt"
        try:
            self.model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if "precond" in optimizer.state_dict() and "precond" not in ckpt["optimizer"]:
                # written before preconditioner states were saved: resumable, not identically
                self._warn_resume(
                    f"checkpoint '{path}' holds no preconditioner state (written by an older "
                    f"version): {spec.label}'s preconditioner restarts from scratch, so the "
                    "resumed run will not retrace the uninterrupted one."
                )
            recorded = ckpt.get("arithmetic")  # checkpoints before 2026-12-04: none
            changed = [
                f"{key} {recorded.get(key)} -> {now}"
                for key, now in self.arithmetic.items()
                if isinstance(recorded, dict) and recorded.get(key) != now
            ]
            if changed:
                self._warn_resume(
                    f"checkpoint '{path}' was written with other arithmetic "
                    f"({', '.join(changed)}): {spec.label} resumes, but not bit-identically "
                    "to an uninterrupted run (each of these can change the rounding)."
                )
            torch.set_rng_state(ckpt["torch_rng"])
            data_gen.set_state(ckpt["data_rng"])
            if self.device.type == "cuda" and ckpt.get("cuda_rng"):
                torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
            st = Progress.from_checkpoint(ckpt)
            finished, _ = ckpt["finished"], ckpt["stop_reason"]  # read below: present now
            bad = [
                f"{key} = {value!r}"
                for key, value, ok in (
                    ("step", st.step, isinstance(st.step, int) and st.step >= 0),
                    ("position", st.position, isinstance(st.position, int) and 0 <= st.position),
                    ("finished", finished, isinstance(finished, bool)),
                    (
                        "last_cut_step",
                        st.last_cut_step,
                        st.last_cut_step is None or isinstance(st.last_cut_step, int),
                    ),
                )
                if not ok
            ]
            if st.perm is not None and (
                not isinstance(st.perm, Tensor) or tuple(st.perm.shape) != (n,)
            ):
                bad.append(f"perm of shape {tuple(getattr(st.perm, 'shape', ()))}, not ({n},)")
            if bad:
                raise ValueError(", ".join(bad))
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            what = f"missing key {err}" if isinstance(err, KeyError) else " ".join(str(err).split())
            raise CheckpointError(
                f"checkpoint '{path}' does not fit this run ({what[:300]}); "
                f"{spec.label} was not resumed. Restore the file from a copy, or start a new run."
            ) from None
        return st

    def _steps(self, t: _Training, fresh: bool) -> RunStop:
        """Step until a budget, divergence, convergence or a signal (raised) stops ``t``."""
        cfg, model, group, spec, st = self.config, self.model, self.group, t.spec, t.st
        n = self.x_train.shape[0]
        if fresh:
            self._log_eval(t, None)
            self._save(t)
        budget, every = spec.budget, cfg.eval
        batch_loss = math.nan
        is_converged = False
        agreed_signal: int | None = None  # a data-parallel run stops on agreed signals only
        before = _LastFinite(model)  # the (finite) state before the latest step
        while True:
            reason = budget_reason(budget, st, n)
            switch = False
            if reason is None and spec.phases:
                reason = budget_reason(t.leaf.budget, st.in_phase(), n)
                if is_converged:
                    reason = RunStop.CONVERGED
                switch = reason is not None and st.phase + 1 < len(spec.phases)
            if switch:
                # The phase's budget is spent: log where it ended, go on with the next.
                if st.last_eval_step != st.step and not group.agree_flag(
                    self._log_eval(t, batch_loss)
                ):
                    reason = RunStop.DIVERGED
                    break
                self._next_phase(t)
                is_converged = False
                continue
            if reason is not None:
                break
            signum = agreed_signal if group.active else self._stop_signal
            if signum is not None:
                self._save(t)
                raise _Interrupted(signum)

            batch, curvature = self._next_batch(t)
            set_damping_floor(t.leaf, t.optimizer, t.batch_size)  # min_damping_cases / batch
            # L-BFGS on the whole set: a step that moves nothing has converged.
            watch = t.leaf.name == "lbfgs" and t.batch_size == n
            # Every earlier step left finite weights (checked below): if this one does not,
            # the checkpoint gets these instead.
            before.keep()
            cuts_before = t.cut_steps
            start = time.perf_counter()
            self._cuttable = _cuttable(t.leaf)
            self._cut = self._step_cut(t, start) if self._cuttable else None
            self._first_loss = None
            # `cut` only where it is asked (L-BFGS): a step patched in by a test or a user
            # with take_step's earlier signature keeps working for the other optimizers.
            extra = {"cut": self._cut} if t.leaf.name == "lbfgs" else {}
            try:
                batch_loss = take_step(
                    t.leaf, t.optimizer, model, self.objective, group, batch, curvature, **extra
                )
            except FloatingPointError as err:  # HF gives up after repeated non-finite steps
                self._say(f"    {spec.label}: {err}")
                batch_loss = math.nan
            finally:
                self._cuttable = self._cut = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            batch_loss, seconds, agreed_signal = group.agree_step(
                batch_loss, time.perf_counter() - start, self._stop_signal
            )
            st.seconds += seconds
            st.step += 1
            if t.cut_steps > cuts_before:  # recorded, so that a resume from here says so
                st.last_cut_step = st.step
            st.cases += t.batch_size
            if t.leaf.name == "hessianfree":
                st.hf = hf_diagnostics(t.optimizer)
            t.bar.update(1)
            if self.on_step is not None:
                self.on_step(
                    StepEvent(
                        spec.label, st.step, st.cases / n, st.seconds, batch_loss, t.batch_size
                    )
                )

            # Weights the step made non-finite are divergence at once, before the next step's
            # loss would show it (and before they reach a checkpoint). The ranks hold the same
            # weights, so they agree without a message.
            if not math.isfinite(batch_loss) or not before.now_finite():
                reason = RunStop.DIVERGED
                break
            if (every.every_steps is not None and st.step % every.every_steps == 0) or (
                every.every_seconds is not None
                and st.seconds - st.last_eval_seconds >= every.every_seconds
            ):
                if not group.agree_flag(self._log_eval(t, batch_loss)):
                    reason = RunStop.DIVERGED
                    break
            if (
                cfg.output.checkpoint_every is not None
                and st.step % cfg.output.checkpoint_every == 0
            ):
                self._save(t)
            unchanged = watch and all(
                torch.equal(before.saved[k], p) for k, p in model.named_parameters()
            )
            if converged(t.leaf, t.optimizer, unchanged):
                is_converged = True  # the entry stops, or its next phase begins
                if not (spec.phases and st.phase + 1 < len(spec.phases)):
                    reason = RunStop.CONVERGED
                    break
        if st.last_eval_step != st.step:
            self._log_eval(t, batch_loss)
        if reason is RunStop.DIVERGED:
            t.diverged_at = st.step
            if not before.now_finite():
                # The metrics record the diverged step; the checkpoint keeps the last finite
                # weights (the optimizer's state stays as it was: a diverged entry never
                # resumes, and the state says what the step did).
                before.restore()
                t.weights_step = st.step - 1
        self._save(t, finished=True, reason=reason)
        return reason

    def _step_cut(self, t: _Training, start: float) -> Callable[[], bool]:
        """Whether the step begun at ``start`` (``time.perf_counter``) must end early: the
        entry's (or its phase's) ``budget.seconds`` is spent, or a second signal came during
        the step. Budgets are otherwise checked between steps, and one L-BFGS step of
        ``max_iter`` iterations, or one HF call of ``max_iter`` HF steps, can outlast any
        budget. L-BFGS asks at each evaluation
        (:func:`~hessfree.train.stepping._lbfgs_step`), HF after each of its steps
        (:meth:`_hf_callback`). Agreed by all ranks each time it is asked."""
        left = [
            budget.seconds - done.seconds
            for budget, done in ((t.spec.budget, t.st), (t.leaf.budget, t.st.in_phase()))
            if budget.seconds is not None
        ]
        deadline = start + min(left) if left else math.inf

        def cut() -> bool:
            mine = self._cut_signal is not None or time.perf_counter() >= deadline
            if self.group.agree_any(mine):
                t.cut_steps += 1
                return True
            return False

        return cut

    def _hf_callback(self, info: Any) -> None:
        """HessianFree's ``callback`` for an entry of ``max_iter`` > 1: after each HF step of
        a ``step()`` call, end the call there (:class:`StepCut`) when :meth:`_step_cut` says
        so. That HF step has ended and recorded its state (the callback is its last act), so
        the call stops between two whole HF steps; while the test says no, nothing changes."""
        if self._first_loss is None:
            self._first_loss = float(info.loss)
        if self._cut is not None and self._cut():
            raise StepCut(self._first_loss)

    def _build(self, leaf: OptimizerConfig) -> torch.optim.Optimizer:
        """``leaf``'s optimizer over the model; HF with ``max_iter`` > 1 gets the callback
        that can end its call between HF steps (with 1, the default, none: nothing to end)."""
        callback = self._hf_callback if _cuttable(leaf) and leaf.name == "hessianfree" else None
        return build_optimizer(leaf, self.model.parameters(), self.model, callback)

    def _next_phase(self, t: _Training) -> None:
        """Start the entry's next phase: a fresh optimizer on the same weights."""
        st, spec = t.st, t.spec
        st.phase += 1
        st.phase_start = (st.step, st.cases, st.seconds)
        st.hf = {}
        t.use(spec.phases[st.phase], self.x_train.shape[0], self.group.active)
        t.optimizer = self._build(t.leaf)
        self._save(t)
        self._say(
            f"    {spec.label}: phase {st.phase + 1}/{len(spec.phases)} "
            f"({t.leaf.name}) from step {st.step}, "
            + describe_batches(t.leaf, self.x_train.shape[0])
        )

    def _next_batch(
        self, t: _Training
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """This rank's slice of the next gradient batch, and of HF's curvature batch (the
        first ``curvature_size`` cases of the gradient batch; None: the gradient batch).

        The sizes are those of the step's place in the entry's (or phase's) schedule: a
        function of the step count, which a checkpoint restores, so a resumed run and every
        rank take the same sizes."""
        st, group, n = t.st, self.group, self.x_train.shape[0]
        t.use(t.leaf, n, group.active, st.in_phase().step)
        # Every optimizer draws the same permutations: its data_gen is seeded alike.
        # Every rank draws the same batch and takes its slice (all of it in one process).
        if st.perm is None or st.position + t.batch_size > n:
            st.perm, st.position = torch.randperm(n, generator=t.data_gen), 0
        batch = st.perm[st.position : st.position + t.batch_size]
        st.position += t.batch_size
        idx = batch[group.shard(t.batch_size)].to(self.device)
        xb, tb = self.x_train.index_select(0, idx), self.t_train.index_select(0, idx)
        curvature = None
        if t.curvature_size is not None:  # a slice of the first cases of the batch
            cidx = batch[: t.curvature_size]
            if not t.replicated:  # each rank its shard of the slice
                cidx = cidx[group.shard(t.curvature_size)]
            cidx = cidx.to(self.device)
            curvature = (self.x_train.index_select(0, cidx), self.t_train.index_select(0, cidx))
        return (xb, tb), curvature

    def _save(self, t: _Training, finished: bool = False, reason: RunStop | None = None) -> None:
        """Checkpoint ``t`` (rank 0): its progress, model, optimizer and RNG states."""
        if self.group.rank != 0:
            return
        path = self.run_dir / "checkpoints" / f"{t.spec.label}.pt"
        state = {
            "format": CHECKPOINT_FORMAT,
            "config_sha256": self.digest,
            "training_sha256": self.training_digest,
            "label": t.spec.label,
            "finished": finished,
            "stop_reason": None if reason is None else reason.value,
            "diverged_at_step": t.diverged_at,
            "weights_step": t.st.step if t.weights_step is None else t.weights_step,
            **t.st.to_checkpoint(),
            "model": self.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data_rng": t.data_gen.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "metrics_bytes": self.log.tell(),
            "metrics_sha256": self.log.sha256(),
            "data_sha256": self.data_sha256,
            "world_size": self.group.world_size,
            "arithmetic": self.arithmetic,
        }
        with writing(path, self.run_dir):
            save_checkpoint(path, state)

    def _log_eval(self, t: _Training, batch_loss: float | None) -> bool:
        """Log one evaluation record (rank 0); False if the training loss is no longer finite."""
        st, spec = t.st, t.spec
        st.last_eval_step, st.last_eval_seconds = st.step, st.seconds
        if self.group.rank != 0:
            return True  # the caller agrees on rank 0's answer
        record = {
            "optimizer": spec.label,
            "step": st.step,
            "epoch": st.cases / self.x_train.shape[0],
            "seconds": st.seconds,
            "batch_loss": batch_loss,
            **evaluate(self.model, self.objective, self.eval_sets, self.config.eval.batch_size),
            **st.hf,
        }
        if t.leaf.growing:  # the gradient batch of the last step (of the next, at step 0)
            record["batch_size"] = t.batch_size
        if spec.phases:  # which phase took the steps up to here (plots mark the switches)
            record["phase"] = st.phase
            record["phase_name"] = spec.phases[st.phase].name
        with writing(self.log.path, self.run_dir):
            self.log.append(record)
        t.bar.set_postfix(
            train=f"{record['train_loss']:.4g}", test=f"{record['test_loss']:.4g}", refresh=False
        )
        return math.isfinite(record["train_loss"])


class _BarStream:
    """The progress bars' stdout: a write that finds its reader gone (``| head`` exited while
    a bar was drawn) drops the stream as the runner's own lines do (:meth:`Runner._drop`)
    instead of raising out of the step loop; tqdm itself only swallows EIO."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except OSError as err:
            self._runner._drop(sys.stdout, err)
            return len(text)

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except OSError as err:
            self._runner._drop(sys.stdout, err)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding: stdout's
        return getattr(sys.stdout, name)


#: SIGHUP where the platform has it (not on Windows).
_SIGHUP: int | None = getattr(signal, "SIGHUP", None)


def _cuttable(leaf: OptimizerConfig) -> str | None:
    """How a step of ``leaf`` can end early, in words (None: it cannot, nor needs to)."""
    if leaf.name == "lbfgs":
        return "this L-BFGS step at its next evaluation"
    max_iter = leaf.hyperparameters.get("max_iter", 1)
    if leaf.name == "hessianfree" and isinstance(max_iter, int) and max_iter > 1:
        return "this call of HF steps (max_iter) after its current HF step"
    return None


def _to_devnull(stream: Any) -> None:
    """Point ``stream``'s descriptor at /dev/null (a stream without one is left alone), and
    empty its buffer there, so that later writes and the interpreter's final flush succeed."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)
    try:
        stream.flush()
    except (OSError, ValueError):
        pass


def _drop_hung_up_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal that has hung up.

    SIGHUP comes when the terminal closes (its window, an ssh connection); every write to it
    then fails with EIO, as does its ``tcgetattr``, which tells it from a live terminal (kept:
    ``kill -HUP`` from elsewhere), a file or a pipe (ENOTTY: kept, a pipe is handled when a
    write to it fails). Without this, the progress bar's last refresh, the summary and the
    interpreter's final flush would fail after the checkpoint, ending the run with a traceback.
    """
    import termios  # POSIX, as SIGHUP

    for stream in (sys.stdout, sys.stderr):
        try:
            termios.tcgetattr(stream.fileno())
        except termios.error as err:
            if err.args[0] == errno.EIO:
                _to_devnull(stream)
        except (AttributeError, OSError, ValueError):
            pass  # no descriptor (captured output)


def _arithmetic(device: torch.device) -> dict[str, Any]:
    """What a run's rounding depends on besides its config and checkpoint.

    A resumed run retraces the uninterrupted one bit for bit only where these are the same
    (another torch or hessfree version may pick other kernels or orders of summation; another
    thread count splits reductions differently; another CPU capability or GPU picks other
    kernels), so each checkpoint records them and a resume that differs says so.
    """
    try:
        from importlib.metadata import version

        hessfree_version = version("hessfree")
    except Exception:  # not installed: running from a checkout
        hessfree_version = "unknown"
    if device.type == "cuda":
        kernels = torch.cuda.get_device_name(device)
    else:
        kernels = torch.backends.cpu.get_cpu_capability()
    return {
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only refuses
        "hessfree": hessfree_version,
        "num_threads": torch.get_num_threads(),
        "kernels": kernels,
    }


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, in one host sync.

    A non-finite entry makes any sum over it non-finite (inf, or NaN for inf - inf), so finite
    sums prove every entry finite at the cost of one reading pass; only when the sums are not
    finite (a non-finite entry, or finite entries whose sum overflows) is each entry tested.
    """
    if not tensors:
        return True
    total = torch.stack([v.sum().to(torch.float64) for v in tensors]).sum()
    return bool(torch.isfinite(total)) or all(bool(torch.isfinite(v).all()) for v in tensors)


class _LastFinite:
    """The model's state (parameters and buffers) before the latest step, copied in place.

    One copy of the state per step, into buffers allocated once, so that a step leaving
    non-finite weights can be undone for the checkpoint: a copy and a finiteness check cost
    about 0.15 ms on the quickstart MLP and 1.3 ms on the CURVES autoencoder (Adam steps of
    1.2 and 48 ms; ``experiments/_runner12.py cost``). The live tensors are the state dict's
    aliases: the runner changes the weights in place only (steps, ``load_state_dict``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.live = dict(model.state_dict())
        self.saved = {k: v.clone() for k, v in self.live.items()}
        self.floating = [v for v in self.live.values() if v.is_floating_point()]

    def keep(self) -> None:
        """Copy the current state (the step about to be taken may spoil it)."""
        for k, v in self.live.items():
            self.saved[k].copy_(v)

    def now_finite(self) -> bool:
        """Whether the current state is finite."""
        return _all_finite(self.floating)

    def restore(self) -> None:
        """Put the kept state back into the model."""
        with torch.no_grad():
            for k, v in self.live.items():
                v.copy_(self.saved[k])


def _no_plots_message(err: BaseException | None = None) -> str:
    why = f" ({err})" if err is not None else ""
    return (
        f"hessfree: warning: matplotlib cannot be imported{why}, so this run writes no "
        "plots (metrics.jsonl and summary.json hold every number; plot them later with "
        "hessfree.train.plots.plot_run(RUN_DIR)). Install matplotlib, or set "
        "output.plots=false to silence this."
    )


def run_experiment(
    config: ExperimentConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    **options: Any,
) -> RunResult:
    """Run (or resume) an experiment; keyword options as for :class:`Runner`.

    Returns:
        RunResult: the run directory, status and summary.
    """
    return Runner(config, run_dir, resume=resume, **options).run()
