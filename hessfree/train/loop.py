"""The experiment loop: optimizers side by side, metrics, checkpoints, resume, signals.

The optimizers of a config run one after another, each from the same initial weights (built
once from ``seed``) and on the same data order (a per-optimizer ``torch.Generator`` seeded
with ``seed`` draws each epoch's permutation). A step takes the next ``batch_size`` cases of
the permutation (an epoch's remainder smaller than a batch is skipped); HF's curvature batch is
the first ``curvature_batch_size`` cases of that gradient batch.

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

SIGINT (Ctrl-C) and SIGTERM finish the current step, write a checkpoint and a summary, and end
the run with status ``interrupted`` (the CLI exits with 128 + the signal number: 130, 143). A
second signal abandons the step at once; the previous checkpoint stays valid.

Under ``torchrun --nproc_per_node=N`` the run is data-parallel (:mod:`hessfree.train.parallel`):
every rank takes an equal slice of each batch (batch sizes must be multiples of N), the step
equals a one-process step on the whole batch, decisions are agreed once per step, and rank 0
alone evaluates and writes the run directory; the other ranks write nothing. A signal caught by
any rank stops every rank after the step in which the ranks agree on it. ``--resume`` needs the
same N and the run directory readable by every rank. A rank that dies or hangs makes the others
stop with :class:`~hessfree.train.parallel.PeerError` (at once, or after
``distributed.timeout_seconds``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hessfree.train.checkpoint import (
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    write_json_atomic,
    write_text_atomic,
)
from hessfree.train.config import (
    ConfigError,
    ExperimentConfig,
    OptimizerConfig,
    config_digest,
    dump_config,
    training_digest,
)
from hessfree.train.data import Dataset, load_dataset
from hessfree.train.metrics import MetricsLog, format_table, read_metrics, summarize
from hessfree.train.models import build_model
from hessfree.train.objectives import Objective, make_objective
from hessfree.train.optimizers import build_optimizer, hf_diagnostics
from hessfree.train.parallel import Group, process_group

__all__ = [
    "Runner",
    "RunResult",
    "RunStatus",
    "StopReason",
    "StepEvent",
    "run_experiment",
    "default_run_dir",
    "resolve_device",
]

_CHECKPOINT_FORMAT = 1


class StopReason(enum.Enum):
    """Why an optimizer stopped."""

    STEPS = "steps"
    EPOCHS = "epochs"
    SECONDS = "seconds"
    DIVERGED = "diverged"
    CONVERGED = "converged"
    INTERRUPTED = "interrupted"


#: Stop reasons a larger budget on ``--resume`` lifts (the others are outcomes of training).
_BUDGET_REASONS = ("steps", "epochs", "seconds")


def _converged(spec: OptimizerConfig, optimizer: torch.optim.Optimizer, unchanged: bool) -> bool:
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


@dataclass(frozen=True)
class RunResult:
    """The outcome of :meth:`Runner.run`.

    Attributes:
        run_dir: The run directory.
        status: Completed or interrupted.
        signal: The signal number that interrupted the run, else None.
        summary: The content of ``summary.json`` (empty on the ranks other than 0 of a
            data-parallel run, which write nothing).
    """

    run_dir: Path
    status: RunStatus
    signal: int | None
    summary: dict[str, Any]

    @property
    def exit_code(self) -> int:
        """0 when completed, 128 + the signal number when interrupted (130 for SIGINT)."""
        return 0 if self.signal is None else 128 + self.signal


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class _Progress:
    """The loop state of one optimizer that a checkpoint must restore."""

    step: int = 0
    cases: int = 0
    seconds: float = 0.0
    perm: Tensor | None = None
    position: int = 0
    last_eval_step: int = -1
    last_eval_seconds: float = 0.0
    hf: dict[str, Any] = dataclasses.field(default_factory=dict)
    phase: int = 0  # the running phase of an entry with `phases`
    phase_start: tuple[int, int, float] = (0, 0, 0.0)  # step, cases, seconds when it began

    def in_phase(self) -> _Progress:
        """Steps, cases and seconds since the running phase began (for its own budget)."""
        step, cases, seconds = self.phase_start
        return _Progress(self.step - step, self.cases - cases, self.seconds - seconds)


def _scalar(loss: Tensor | float | tuple) -> float:
    """A step's returned loss as a float (``(loss, outputs)`` pairs and graphs allowed)."""
    if isinstance(loss, tuple):
        loss = loss[0]
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def resolve_device(name: str) -> torch.device:
    """``auto`` is ``cuda`` when available, else ``cpu``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_run_dir(config: ExperimentConfig, now: datetime | None = None) -> Path:
    """``<output.dir>/<name>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... if that exists."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path(config.output.dir) / f"{config.name}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def run_dir_problems(run_dir: Path, key: str = "output.dir") -> list[str]:
    """Why a new run directory could not be created at ``run_dir`` (empty: it can).

    Checks the nearest existing ancestor: it must be a directory this process may write in.
    """
    if run_dir.exists() and not run_dir.is_dir():
        return [f"`{key}`: the run directory '{run_dir}' exists and is a file; choose another."]
    parent = run_dir
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return [
            f"`{key}`: '{parent}' is a file, so the run directory '{run_dir}' cannot be "
            "created under it; choose a directory."
        ]
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return [
            f"`{key}`: cannot create '{run_dir}': '{parent}' is not writable by this user; "
            "choose a directory you can write to."
        ]
    return []


def _data_problems(
    cfg: ExperimentConfig, ds: Dataset, objective: Objective, world_size: int = 1
) -> list[str]:
    """Config checks that need the loaded data (and the number of processes)."""
    problems = []
    n = ds.x_train.shape[0]
    leaves = [
        (f"{i}.phases.{j}" if o.phases else str(i), leaf)
        for i, o in enumerate(cfg.optimizers)
        for j, leaf in enumerate(o.leaves)
    ]
    for i, opt in leaves:
        bs = opt.batch_size or n
        if bs > n:
            problems.append(
                f"`optimizers.{i}` ({opt.label}): batch_size {bs} exceeds the {n} "
                f"training cases of {ds.name!r}."
            )
        if opt.curvature_batch_size is not None and opt.curvature_batch_size > bs:
            problems.append(
                f"`optimizers.{i}` ({opt.label}): curvature_batch_size "
                f"{opt.curvature_batch_size} exceeds the gradient batch ({bs})."
            )
        # Equal shards: the mean of the ranks' means is then the mean over the whole batch.
        whole = "" if opt.batch_size else " (null: the whole training set)"
        sizes = [("batch_size", bs, whole)]
        if opt.curvature_batch_size is not None and opt.curvature_batch_size < bs:
            sizes.append(("curvature_batch_size", opt.curvature_batch_size, ""))
        for key, size, note in sizes:
            if world_size > 1 and size % world_size:
                low = size - size % world_size
                problems.append(
                    f"`optimizers.{i}` ({opt.label}): {key} {size}{note} is not a multiple of "
                    f"the {world_size} processes; each rank takes an equal slice so that the "
                    f"step equals a one-process step on the whole batch. Use "
                    f"{key}={low or world_size} or {low + world_size}, or another process count."
                )
    kind = ds.target_kind
    if objective.task != "reconstruction":
        if kind is None:
            problems.append(
                f"{ds.name!r} has no targets; train an autoencoder (`model.name: autoencoder`)."
            )
        elif objective.task == "classification" and kind != "labels":
            problems.append(
                f"`loss.name` = 'cross_entropy' needs integer labels; {ds.name!r} has "
                "real-valued targets; use 'mse'."
            )
        elif objective.task in ("regression", "binary") and kind != "values":
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


def _num_outputs(objective: Objective, ds: Dataset) -> int | None:
    if objective.task == "reconstruction":
        return None
    if objective.task == "classification":
        return ds.num_classes
    return int(ds.y_train.shape[1]) if ds.y_train is not None else None


class Runner:
    """Runs one experiment; see the module docstring for what it writes.

    Args:
        config: The validated config.
        run_dir: The run directory; None: :func:`default_run_dir`. Must be new or empty
            unless ``resume``.
        resume: Continue the run in ``run_dir`` from its checkpoints.
        progress: Show progress bars; None: as ``output.progress`` says.
        verbose: Print start/stop lines and the summary table.
        on_step: Called after every step with a :class:`StepEvent` (it may call
            :meth:`request_stop`).
        config_header: Comment lines opening the saved ``config.yaml``.
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
    ) -> None:
        self.config = config
        if resume and run_dir is None:
            raise ValueError("`run_dir` is required to resume a run.")
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
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
        self._stop_signal: int | None = None
        self.group = Group()

    # -- control ---------------------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step as if ``signum`` arrived (checkpoint, then return)."""
        if self._stop_signal is None:
            self._stop_signal = int(signum)

    def _handle_signal(self, signum: int, frame: object) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # second signal: abandon the step
        self._stop_signal = signum
        if self.verbose:
            print(
                f"\n{signal.Signals(signum).name}: finishing the current step, then checkpointing "
                "(signal again to abort without a checkpoint).",
                file=sys.stderr,
                flush=True,
            )

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    # -- setup -----------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.config
        if not self.resume and self.group.rank == 0:
            key = "output.dir" if self.default_dir else "--out"
            problems = run_dir_problems(self.run_dir, key)
            if problems:
                raise ConfigError(problems, cfg.name)
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self.device = self.group.device
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        self.digest = config_digest(cfg)
        self.training_digest = training_digest(cfg)

        options = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "name"}
        if "seed" in options and options["seed"] is None:
            options["seed"] = cfg.seed
        ds = load_dataset(cfg.data.name, **options)
        self.objective = make_objective(cfg.task, cfg.loss.name, cfg.loss.reduction, cfg.data.name)
        problems = _data_problems(cfg, ds, self.objective, self.group.world_size)
        if problems:
            raise ConfigError(problems, f"{cfg.name} (after loading {cfg.data.name!r})")

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
            raise ConfigError([f"`model`: {err}"], cfg.name) from None
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
        """Create (or check, when resuming) the run directory; return existing checkpoints."""
        ckpt_dir = self.run_dir / "checkpoints"
        writer = self.group.rank == 0  # the other ranks of a data-parallel run only read
        if not self.resume:
            if not writer:
                return {}
            if self.run_dir.exists() and any(self.run_dir.iterdir()):
                raise ConfigError(
                    [
                        f"run directory '{self.run_dir}' is not empty; resume it with "
                        f"--resume {self.run_dir} or choose another --out."
                    ]
                )
            try:
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(
                    self.run_dir / "config.yaml", dump_config(self.config, self.config_header)
                )
            except OSError as err:
                raise ConfigError(
                    [f"cannot create the run directory '{self.run_dir}': {err.strerror or err}."]
                ) from None
            return {}
        if not (self.run_dir / "config.yaml").exists():
            raise ConfigError([f"'{self.run_dir}' holds no config.yaml: not a run directory."])
        if ckpt_dir.exists() and not ckpt_dir.is_dir():
            raise ConfigError(
                [
                    f"'{ckpt_dir}' is a file, not the run's checkpoint directory; the run "
                    "directory was edited. Move that file away (resuming then restarts every "
                    "optimizer) or start a new run."
                ]
            )
        found: dict[str, dict[str, Any]] = {}
        gap = None
        for opt in self.config.optimizers:
            path = ckpt_dir / f"{opt.label}.pt"
            if not path.exists():
                gap = gap or path
            elif gap is not None:
                raise ConfigError(
                    [
                        f"'{gap}' is missing although a later optimizer's checkpoint "
                        f"'{path}' exists; the run directory was edited."
                    ]
                )
            else:
                ckpt = load_checkpoint(path, map_location="cpu")  # CheckpointError if damaged
                # The same config, or (checkpoints that record it) the same but for budgets.
                same = ckpt.get("config_sha256") == self.digest or (
                    ckpt.get("training_sha256") == self.training_digest
                )
                if ckpt.get("format") != _CHECKPOINT_FORMAT or not same:
                    raise ConfigError(
                        [
                            f"checkpoint '{path}' was written for a different config (or "
                            "format); resume with the run's own config.yaml."
                        ]
                    )
                written_by = int(ckpt.get("world_size", 1))
                if written_by != self.group.world_size:
                    raise ConfigError(
                        [
                            f"checkpoint '{path}' was written by a run over {written_by} "
                            f"process(es), this one has {self.group.world_size}; resume with "
                            f"the same number (torchrun --nproc_per_node={written_by}), since "
                            "another one changes the rounding of every averaged quantity."
                        ]
                    )
                found[opt.label] = ckpt
        metrics = self.run_dir / "metrics.jsonl"
        recorded = max((int(c.get("metrics_bytes", 0)) for c in found.values()), default=0)
        size = metrics.stat().st_size if metrics.is_file() else 0
        if metrics.exists() and not metrics.is_file():
            raise ConfigError([f"'{metrics}' is not a file; the run directory was edited."])
        if size < recorded:
            raise ConfigError(
                [
                    f"'{metrics}' has {size} bytes, fewer than the {recorded} its latest "
                    "checkpoint recorded: the metrics file was truncated or replaced. Restore it, "
                    "or start a new run (resuming would lose records)."
                ]
            )
        if writer and any(c.get("config_sha256") != self.digest for c in found.values()):
            # Resumed under other budgets: the run directory describes the run as it goes on.
            header = self.config_header or "Resolved by hessfree"
            write_text_atomic(
                self.run_dir / "config.yaml",
                dump_config(self.config, f"{header}\nBudgets changed on resume."),
            )
        if writer:
            # Only now that every check passed: the leftovers of a write killed mid-way.
            for stale in remove_stale_temporaries(ckpt_dir) + remove_stale_temporaries(
                self.run_dir
            ):
                self._say(f"removed {stale.name}, left by an interrupted write")
        if writer:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
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
                            spec, StopReason.INTERRUPTED, self._current
                        )
                        break
        if not writer:
            return RunResult(self.run_dir, status, signum, {})
        summary = summarize(
            read_metrics(self.run_dir / "metrics.jsonl"),
            outcomes,
            metric=self.objective.metric_name,
            higher_is_better=self.objective.higher_is_better,
            name=self.config.name,
            status=status.value,
        )
        write_json_atomic(self.run_dir / "summary.json", summary)
        if status is RunStatus.COMPLETED and self.config.output.plots:
            from hessfree.train.plots import plot_run

            plot_run(self.run_dir)
        self._say("\n" + format_table(summary))
        if status is RunStatus.INTERRUPTED:
            self._say(
                f"\ninterrupted by {signal.Signals(signum).name}; resume with: "
                f"hessfree run --resume {self.run_dir}"
            )
        else:
            self._say(f"\nrun directory: {self.run_dir}")
        return RunResult(self.run_dir, status, signum, summary)

    def _outcome(self, spec: OptimizerConfig, reason: StopReason, st: _Progress) -> dict[str, Any]:
        return {
            "name": spec.name,
            "stop_reason": reason.value,
            "steps": st.step,
            "epochs": st.cases / self.x_train.shape[0],
            "seconds": st.seconds,
        }

    # -- one optimizer ---------------------------------------------------------------------

    def _train(
        self, index: int, spec: OptimizerConfig, ckpt: dict[str, Any] | None
    ) -> dict[str, Any]:
        cfg, model, group = self.config, self.model, self.group
        writer = group.rank == 0
        n = self.x_train.shape[0]
        phase = int(ckpt.get("phase", 0)) if ckpt is not None else 0
        leaf = spec.leaves[phase]  # the optimizer taking the steps (the phase running)
        batch_size, curvature_size, replicated = self._batch_sizes(leaf, n, group.active)

        model.load_state_dict(self.initial_state)
        model.train()
        optimizer = build_optimizer(leaf, model.parameters())
        torch.manual_seed(cfg.seed)
        data_gen = torch.Generator().manual_seed(cfg.seed)
        st = _Progress()
        self._current = st

        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["torch_rng"])
            data_gen.set_state(ckpt["data_rng"])
            if self.device.type == "cuda" and ckpt.get("cuda_rng"):
                torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
            st = _Progress(
                step=ckpt["step"],
                cases=ckpt["cases"],
                seconds=ckpt["seconds"],
                perm=ckpt["perm"],
                position=ckpt["position"],
                last_eval_step=ckpt["last_eval_step"],
                last_eval_seconds=ckpt["last_eval_seconds"],
                hf=dict(ckpt["hf"]),
                phase=phase,
                phase_start=tuple(ckpt.get("phase_start", (0, 0, 0.0))),
            )
            self._current = st
            lifted = (
                ckpt["finished"]
                and ckpt["stop_reason"] in _BUDGET_REASONS
                and self._budget_reason(spec.budget, st, n) is None
                and not (spec.phases and self._budget_reason(leaf.budget, st.in_phase(), n))
            )
            if lifted:
                self._say(
                    f"[{index + 1}/{len(cfg.optimizers)}] {spec.label}: continuing after "
                    f"{st.step} steps under the larger budget"
                )
            elif ckpt["finished"]:
                self._say(
                    f"[{index + 1}/{len(cfg.optimizers)}] {spec.label}: already finished "
                    f"({ckpt['stop_reason']}, {st.step} steps)"
                )
                return self._outcome(spec, StopReason(ckpt["stop_reason"]), st)
        group.check_same(model.parameters())

        def save(finished: bool = False, reason: StopReason | None = None) -> None:
            if not writer:
                return
            save_checkpoint(
                self.run_dir / "checkpoints" / f"{spec.label}.pt",
                {
                    "format": _CHECKPOINT_FORMAT,
                    "config_sha256": self.digest,
                    "training_sha256": self.training_digest,
                    "label": spec.label,
                    "finished": finished,
                    "stop_reason": None if reason is None else reason.value,
                    "step": st.step,
                    "cases": st.cases,
                    "seconds": st.seconds,
                    "perm": st.perm,
                    "position": st.position,
                    "last_eval_step": st.last_eval_step,
                    "last_eval_seconds": st.last_eval_seconds,
                    "hf": st.hf,
                    "phase": st.phase,
                    "phase_start": list(st.phase_start),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "data_rng": data_gen.get_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all()
                    if self.device.type == "cuda"
                    else [],
                    "metrics_bytes": self.log.tell(),
                    "world_size": group.world_size,
                },
            )

        def evaluate(batch_loss: float | None) -> bool:
            """Log one record (rank 0); False if the training loss is no longer finite."""
            st.last_eval_step, st.last_eval_seconds = st.step, st.seconds
            if not writer:
                return True  # the caller agrees on rank 0's answer
            record = {
                "optimizer": spec.label,
                "step": st.step,
                "epoch": st.cases / n,
                "seconds": st.seconds,
                "batch_loss": batch_loss,
                **self._evaluate(),
                **st.hf,
            }
            if spec.phases:  # which phase took the steps up to here (plots mark the switches)
                record["phase"] = st.phase
                record["phase_name"] = spec.phases[st.phase].name
            self.log.append(record)
            bar.set_postfix(
                train=f"{record['train_loss']:.4g}",
                test=f"{record['test_loss']:.4g}",
                refresh=False,
            )
            return math.isfinite(record["train_loss"])

        from tqdm.auto import tqdm

        self._say(
            f"[{index + 1}/{len(cfg.optimizers)}] {spec.label} ({spec.name}): batch {batch_size}"
            + (f", curvature batch {curvature_size}" if curvature_size else "")
        )
        bar = tqdm(
            total=spec.budget.steps,
            initial=st.step,
            desc=spec.label,
            disable=not self.progress,
            dynamic_ncols=True,
            file=sys.stdout,
            leave=True,
        )
        try:
            if ckpt is None:
                evaluate(None)
                save()
            budget, every = spec.budget, cfg.eval
            batch_loss = math.nan
            converged = False
            agreed_signal: int | None = None  # a data-parallel run stops on agreed signals only
            while True:
                reason = self._budget_reason(budget, st, n)
                switch = False
                if reason is None and spec.phases:
                    reason = self._budget_reason(leaf.budget, st.in_phase(), n)
                    if converged:
                        reason = StopReason.CONVERGED
                    switch = reason is not None and st.phase + 1 < len(spec.phases)
                if switch:
                    # The phase's budget is spent: log where it ended, go on with the next.
                    if st.last_eval_step != st.step and not group.agree_flag(evaluate(batch_loss)):
                        reason = StopReason.DIVERGED
                        break
                    st.phase += 1
                    st.phase_start = (st.step, st.cases, st.seconds)
                    converged = False
                    st.hf = {}
                    leaf = spec.phases[st.phase]
                    batch_size, curvature_size, replicated = self._batch_sizes(
                        leaf, n, group.active
                    )
                    optimizer = build_optimizer(leaf, model.parameters())
                    save()
                    self._say(
                        f"    {spec.label}: phase {st.phase + 1}/{len(spec.phases)} "
                        f"({leaf.name}) from step {st.step}, batch {batch_size}"
                    )
                    continue
                if reason is not None:
                    break
                signum = agreed_signal if group.active else self._stop_signal
                if signum is not None:
                    save()
                    raise _Interrupted(signum)

                # Every optimizer draws the same permutations: its data_gen is seeded alike.
                # Every rank draws the same batch and takes its slice (all of it in one process).
                if st.perm is None or st.position + batch_size > n:
                    st.perm, st.position = torch.randperm(n, generator=data_gen), 0
                batch = st.perm[st.position : st.position + batch_size]
                st.position += batch_size
                idx = batch[group.shard(batch_size)].to(self.device)
                xb, tb = self.x_train.index_select(0, idx), self.t_train.index_select(0, idx)
                curvature = None
                if curvature_size is not None:  # a slice of the first cases of the batch
                    cidx = batch[:curvature_size]
                    if not replicated:  # each rank its shard of the slice
                        cidx = cidx[group.shard(curvature_size)]
                    cidx = cidx.to(self.device)
                    curvature = (
                        self.x_train.index_select(0, cidx),
                        self.t_train.index_select(0, cidx),
                    )

                # L-BFGS on the whole set: a step that moves nothing has converged.
                watch = leaf.name == "lbfgs" and batch_size == n
                before = [p.detach().clone() for p in model.parameters()] if watch else []
                start = time.perf_counter()
                try:
                    batch_loss = self._step(leaf, optimizer, xb, tb, curvature)
                except FloatingPointError as err:  # HF gives up after repeated non-finite steps
                    self._say(f"    {spec.label}: {err}")
                    batch_loss = math.nan
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                batch_loss, seconds, agreed_signal = group.agree_step(
                    batch_loss, time.perf_counter() - start, self._stop_signal
                )
                st.seconds += seconds
                st.step += 1
                st.cases += batch_size
                if leaf.name == "hessianfree":
                    st.hf = hf_diagnostics(optimizer)
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(
                        StepEvent(spec.label, st.step, st.cases / n, st.seconds, batch_loss)
                    )

                if not math.isfinite(batch_loss):
                    reason = StopReason.DIVERGED
                    break
                if (every.every_steps is not None and st.step % every.every_steps == 0) or (
                    every.every_seconds is not None
                    and st.seconds - st.last_eval_seconds >= every.every_seconds
                ):
                    if not group.agree_flag(evaluate(batch_loss)):
                        reason = StopReason.DIVERGED
                        break
                if (
                    cfg.output.checkpoint_every is not None
                    and st.step % cfg.output.checkpoint_every == 0
                ):
                    save()
                unchanged = watch and all(
                    torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
                )
                if _converged(leaf, optimizer, unchanged):
                    converged = True  # the entry stops, or its next phase begins
                    if not (spec.phases and st.phase + 1 < len(spec.phases)):
                        reason = StopReason.CONVERGED
                        break
            if st.last_eval_step != st.step:
                evaluate(batch_loss)
            save(finished=True, reason=reason)
        finally:
            bar.close()
        self._say(
            f"    {spec.label}: stopped by {reason.value} after {st.step} steps, "
            f"{st.seconds:.3g} s of training"
        )
        return self._outcome(spec, reason, st)

    @staticmethod
    def _batch_sizes(
        leaf: OptimizerConfig, n: int, distributed: bool
    ) -> tuple[int, int | None, bool]:
        """The gradient batch, HF's separate curvature batch (None: the gradient batch), and
        whether the curvature batch is replicated on every rank rather than sharded."""
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

    @staticmethod
    def _budget_reason(budget: Any, st: _Progress, n: int) -> StopReason | None:
        if budget.steps is not None and st.step >= budget.steps:
            return StopReason.STEPS
        if budget.epochs is not None and st.cases >= budget.epochs * n - 1e-9:
            return StopReason.EPOCHS
        if budget.seconds is not None and st.seconds >= budget.seconds:
            return StopReason.SECONDS
        return None

    def _step(
        self,
        spec: OptimizerConfig,
        optimizer: torch.optim.Optimizer,
        xb: Tensor,
        tb: Tensor,
        curvature: tuple[Tensor, Tensor] | None,
    ) -> float:
        """One optimizer step on a batch (this rank's slice); returns its loss before the step.

        HessianFree averages over the ranks by itself; the gradients of the others are
        averaged here after ``backward`` (L-BFGS's loss too), so every rank takes the same step.
        """
        model, loss_fn = self.model, self.objective.loss
        if spec.name == "hessianfree":
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
                return evaluate(xb, tb)

            curvature_closure = None
            if curvature is not None:
                xc, tc = curvature

                def curvature_closure() -> tuple[Tensor, ...]:
                    return evaluate(xc, tc)

            return _scalar(optimizer.step(closure, curvature_closure))
        if spec.name == "lbfgs":
            first: list[Tensor] = []

            def lbfgs_closure() -> Tensor:
                optimizer.zero_grad()
                loss = loss_fn(model(xb), tb)
                loss.backward()
                if not first:
                    first.append(loss.detach())
                # L-BFGS decides on this loss: it must be the batch mean, the same on every rank
                return self.group.average_gradients(model.parameters(), loss)

            optimizer.step(lbfgs_closure)
            return _scalar(first[0])
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), tb)
        loss.backward()
        self.group.average_gradients(model.parameters())
        optimizer.step()
        return _scalar(loss)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Loss and metric on the train and test evaluation sets, in chunks, in eval mode."""
        model, obj = self.model, self.objective
        chunk = self.config.eval.batch_size
        model.eval()
        out: dict[str, float] = {}
        try:
            for split, (x, t) in self.eval_sets.items():
                loss_sum = metric_sum = 0.0
                for start in range(0, x.shape[0], chunk):
                    xb, tb = x[start : start + chunk], t[start : start + chunk]
                    outputs = model(xb)
                    # Both reductions are means over cases: weight each chunk by its size.
                    loss_sum += float(obj.loss(outputs, tb)) * xb.shape[0]
                    metric_sum += float(obj.metric(outputs, tb)) * xb.shape[0]
                out[f"{split}_loss"] = loss_sum / x.shape[0]
                out[f"{split}_{obj.metric_name}"] = metric_sum / x.shape[0]
        finally:
            model.train()
        return out


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
