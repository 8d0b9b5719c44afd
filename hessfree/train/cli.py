"""The ``hessfree`` command line.

``hessfree run CONFIG.yaml [--out DIR] [--resume DIR] [key=value ...]``, also as
``python -m hessfree run ...``; data-parallel over N processes as
``torchrun --nproc_per_node=N -m hessfree run ...`` (see :mod:`hessfree.train.parallel`).

Exit codes: 0 done; 2 a bad config, override, data file or run directory (the message lists
every problem, no traceback), or a write into the run directory failed during the run (a full
disk: resumable from the latest checkpoints once fixed); 3 another rank of a data-parallel run
crashed, hung or could not be reached (one line); 4 done, but an optimizer diverged
(``summary.json``'s ``diverged``; the others' results are complete); 5 the run directory is in
use by another hessfree process (nothing done; retry when it ends); 130 / 143 / 129 interrupted
by SIGINT / SIGTERM / SIGHUP (resumable); 1 an unexpected error (with its traceback).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
Hessian-free optimization experiments: train one or more optimizers side by side from the same
initial weights on the same data, as a YAML config describes, and write metrics, a summary,
plots and resumable checkpoints to a run directory."""

_RUN_DESCRIPTION = """\
Run the experiment CONFIG describes (see configs/*.yaml): the data, the model, the loss, the
optimizers compared side by side (hessianfree with any HessianFree keyword argument, adam, sgd,
lbfgs), their budget (steps, epochs and/or wall-clock seconds each), batch sizes, evaluation
and output. The config is checked before any work: every unknown key, wrong type and
out-of-range value is reported at once with its dotted path (exit code 2).

The run directory (default runs/<name>-<timestamp>/) receives config.yaml (resolved, with
overrides), metrics.jsonl (one line per evaluation), summary.json, loss_vs_seconds.png,
loss_vs_steps.png and checkpoints/. Ctrl-C (SIGINT), SIGTERM or SIGHUP (the terminal closed)
finishes the current step, checkpoints and exits with 130 / 143 / 129; --resume continues from
there (bit-identical on CPU for step and epoch budgets under the same torch, hessfree, thread
count and CPU, else with a warning; wall-clock budgets are not reproducible). An optimizer
whose loss or weights stop being finite stops as 'diverged' while the others train on; its
checkpoint keeps its last finite weights, summary.json lists it under 'diverged', and the
exit code is 4.

Data-parallel: 'torchrun --nproc_per_node=N -m hessfree run CONFIG.yaml' splits every batch
into N equal slices (batch sizes must be multiples of N) and takes the same steps as one
process on the whole batch; gloo on CPU, NCCL on CUDA (cuda:LOCAL_RANK). Rank 0 alone writes the
run directory. Resume with the same command plus --resume DIR. A rank that crashes or hangs
stops the others within distributed.timeout_seconds (exit code 3)."""

_RUN_EPILOG = """\
overrides:
  dotted.key=value pairs change any config value before validation; values are YAML scalars
  (or flow lists), list items are addressed by index:
    hessfree run configs/quickstart.yaml optimizers.0.damping=10 budget.seconds=30
    hessfree run configs/digits_mlp.yaml model.hidden_sizes=[64,32] seed=1 --out runs/try
    hessfree run --resume runs/quickstart-20250101-120000

config keys:
  every key, with its default, is listed by 'hessfree run CONFIG.yaml --check' (the config as
  it would run); the shipped configs/*.yaml explain the main ones in comments.

exit codes:
  0 done · 2 bad config, override, data or run directory · 3 a peer rank failed or hung ·
  4 done, but an optimizer diverged (summary.json: diverged) · 5 run directory in use by
  another hessfree process (retry when it ends) · 130 SIGINT · 143 SIGTERM · 129 SIGHUP ·
  1 unexpected error"""


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and the ``run`` subcommand's parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="hessfree",
        description=_DESCRIPTION,
        formatter_class=fmt,
        epilog="Run 'hessfree run --help' for the options of a run.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        help="run (or resume) an experiment from a YAML config",
        description=_RUN_DESCRIPTION,
        epilog=_RUN_EPILOG,
        formatter_class=fmt,
    )
    run.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml | key=value",
        help="the config file (optional with --resume), then any dotted.key=value overrides",
    )
    run.add_argument(
        "--out",
        metavar="DIR",
        type=_directory_argument,
        help="run directory to create (default: <output.dir>/<name>-<timestamp>)",
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        type=_directory_argument,
        help="continue the interrupted run in DIR with its saved config.yaml; a CONFIG or "
        "overrides given too must resolve to that same config",
    )
    run.add_argument(
        "--check",
        action="store_true",
        help="only validate the config and print it resolved, then exit",
    )
    bars = run.add_mutually_exclusive_group()
    bars.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show progress bars even when stdout is not a terminal",
    )
    bars.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never show progress bars"
    )
    run.add_argument("--quiet", action="store_true", help="print only errors")
    return parser, run


def _directory_argument(text: str) -> Path:
    """``--out`` / ``--resume``: a path; an empty one is refused (usage error, exit 2).

    ``Path("")`` is ``.``, so ``--out "$RUN"`` with ``RUN`` unset named the working directory
    ("'.' is not empty; resume it with --resume .") and ``--resume ""`` resumed whatever run
    it holds.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is an empty path (an unset shell variable?); give a directory, "
            "e.g. runs/try (or . for the working directory)"
        )
    return Path(text)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hessfree")
    except Exception:  # not installed: running from a checkout
        return "unknown"


def _inherit_budgets(saved: dict, overrides: list[str]) -> list[str]:
    """Pass a global ``budget.KEY=v`` on to the entries whose saved budget inherited it.

    A saved config spells out every optimizer's resolved budget, so ``budget.seconds=8``
    alone would change only the global default; the entries that had the global value get
    ``optimizers.I.budget.KEY=v`` too.
    """
    out = list(overrides)
    for text in overrides:
        key, _, value = text.partition("=")
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] != "budget":
            continue
        inherited = saved.get("budget", {}).get(parts[1])
        for i, entry in enumerate(saved.get("optimizers", [])):
            if (entry.get("budget") or {}).get(parts[1]) == inherited:
                out.append(f"optimizers.{i}.budget.{parts[1]}={value}")
    return out


def _run(args: argparse.Namespace, run_parser: argparse.ArgumentParser) -> int:
    from hessfree.train.config import (
        ConfigError,
        config_to_dict,
        dump_config,
        load_config,
    )
    from hessfree.train.loop import Runner

    overrides = [item for item in args.items if "=" in item]
    files = [item for item in args.items if "=" not in item]
    if len(files) > 1:
        run_parser.error(
            f"expected one CONFIG.yaml, got {', '.join(files)} (overrides look like key=value; "
            'a run takes one config: to run several, for c in ...; do hessfree run "$c"; done)'
        )
    if any(not f.strip() for f in files):
        run_parser.error("an empty CONFIG.yaml argument (an unset shell variable?); give a file")
    if not files and args.resume is None:
        run_parser.error("give a CONFIG.yaml to run (or --resume DIR)")
    # A shell leaves '~' as it is in '--out=~/x' or a quoted '~/x': the home directory, as in
    # the config's paths.
    args.out = args.out.expanduser() if args.out is not None else None
    args.resume = args.resume.expanduser() if args.resume is not None else None
    if args.resume is not None and args.out is not None:
        run_parser.error(
            "--out and --resume exclude each other: a resumed run stays in its directory"
        )

    if args.resume is not None:
        saved_path = args.resume / "config.yaml"
        from hessfree.train.rundir import (
            RunDirError,
            _exists,
            partial_run_dir_message,
            resume_dir_problems,
            resumed_config,
        )

        if not _exists(saved_path):  # also a name too long to look up: not a run directory
            raise RunDirError(
                [
                    partial_run_dir_message(args.resume)
                    or f"'{args.resume}' is not a run directory (no config.yaml)."
                ]
            )
        config = load_config(saved_path)
        if files or overrides:
            if not files:
                overrides = _inherit_budgets(config_to_dict(config), overrides)
            config = resumed_config(
                args.resume, load_config(files[0] if files else saved_path, overrides)
            )
        problems = resume_dir_problems(args.resume)  # before the data is loaded
        if problems:
            raise RunDirError(problems)
    else:
        config = load_config(files[0], overrides)

    if args.check:
        if args.resume is None:
            from hessfree.train.loop import default_run_dir, run_dir_problems
            from hessfree.train.rundir import absolute_data_path

            config = absolute_data_path(config)  # as the run would record it

            out = args.out if args.out is not None else default_run_dir(config)
            problems = run_dir_problems(out, "output.dir" if args.out is None else "--out")
            if problems:
                raise ConfigError(problems, files[0])
        print(dump_config(config), end="")
        return 0
    header = (
        f"Resolved by hessfree {_version()} on {datetime.now():%Y-%m-%d %H:%M:%S} from "
        f"{files[0] if files else '?'}"
        + (f" with overrides: {' '.join(overrides)}" if overrides else "")
    )
    runner = Runner(
        config,
        args.resume if args.resume is not None else args.out,
        resume=args.resume is not None,
        progress=False if args.quiet else args.progress,
        verbose=not args.quiet,
        config_header=header,
        source=files[0] if files else str(args.resume / "config.yaml"),
    )
    return runner.run().exit_code


@contextmanager
def _plain_warnings() -> Iterator[None]:
    """Show the warnings of a run as ``hessfree: warning: ...`` lines on stderr.

    Python's default shows a warning with the file and line that issued it (a line of
    ``loop.py`` for a resume that will not be bit-identical), which tells a command-line user
    nothing; every other message of the command is one ``hessfree: ...`` line. Warnings issued
    outside the package (torch's, numpy's) keep Python's format, naming their source. The filters
    (``-W``, ``PYTHONWARNINGS``, once per location) apply as before; only the display changes,
    and only while the command runs.
    """

    package = str(Path(__file__).resolve().parents[1])
    default = warnings.showwarning

    def issued_here() -> bool:
        # the frame that called warnings.warn (a warning's filename is where its stacklevel
        # points: HessianFree's point past the package, at the caller of the step)
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.endswith("warnings.py"):
            frame = frame.f_back
        return frame is not None and frame.f_code.co_filename.startswith(package)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not issued_here():
            # another library's warning (torch's, numpy's) keeps its source: not ours to word
            default(message, category, filename, lineno, file, line)
            return
        print(f"hessfree: warning: {message}", file=sys.stderr if file is None else file)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _settle(stream: Any) -> None:
    """Flush ``stream``; one whose reader has gone (a pipe closed with its terminal, EPIPE; a
    hung-up terminal, EIO) is pointed at /dev/null instead, so that the interpreter's own
    final flush cannot turn the exit status into 120 or add a traceback."""
    try:
        stream.flush()
    except (OSError, ValueError):
        from hessfree.train.loop import _to_devnull

        _to_devnull(stream)


def _tell(text: str) -> None:
    """Print the command's last line on stderr. Where nobody reads stderr any more (after
    SIGHUP, a second signal's line goes to the pipe of a `| tee` that closed with the
    terminal), the line is dropped: the exit status still says what happened."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        _settle(sys.stderr)


def _open_standard_streams() -> None:
    """Point a closed standard descriptor (``>&-``, ``2>&-``, a daemon's) at /dev/null, and
    give Python a stream on it.

    Python starts with ``sys.stdout`` None when descriptor 1 is closed: the runner's first
    ``sys.stdout.isatty()`` raised AttributeError (a traceback, exit 1, no run), and the first
    file the run opened took descriptor 1 or 2, where C code's writes (torch's warnings go to
    descriptor 2) would have landed in it.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if getattr(sys, name) is None:
            stream = open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
            setattr(sys, name, stream)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessfree`` console script and ``python -m hessfree``.

    Returns:
        int: the exit code (see the module docstring). A torchrun rank whose destroyed process
        group is still alive (:func:`hessfree.train.parallel.group_outlives_destroy`) does not
        return: it flushes and ends the process with that code (``os._exit``).
    """
    _open_standard_streams()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, run_parser = build_parser()
    if argv[:1] == ["run"]:
        # Intermixed: options may come between the config and the overrides.
        args = run_parser.parse_intermixed_args(argv[1:])
    else:
        parser.parse_args(argv)  # --help, --version, or a usage error (exit 2)
        return 2  # pragma: no cover - parse_args exits for anything but 'run'
    from hessfree.train.checkpoint import CheckpointError
    from hessfree.train.config import ConfigError
    from hessfree.train.data import DataError
    from hessfree.train.metrics import MetricsError
    from hessfree.train.parallel import PeerError
    from hessfree.train.rundir import RunDirInUseError, RunDirWriteError

    try:
        with _plain_warnings():
            code = _run(args, run_parser)
    except (ConfigError, DataError, CheckpointError, MetricsError, RunDirWriteError) as err:
        _tell(f"hessfree: error: {err}")
        code = 2
    except PeerError as err:
        _tell(f"hessfree: error: {err}")
        code = 3
    except RunDirInUseError as err:  # the config is fine: its own status, not 2
        _tell(f"hessfree: error: {err}")
        code = 5
    except KeyboardInterrupt as err:  # a second signal (Abandoned), or Ctrl-C outside the run
        _tell("hessfree: interrupted; the last checkpoint (if any) is intact.")
        code = 128 + getattr(err, "signum", signal.SIGINT)
    from hessfree.train.parallel import group_outlives_destroy

    if group_outlives_destroy():
        # A group still alive (kept by torch, or left undestroyed after a peer failed) would be
        # torn down during interpreter finalisation, which can wait on a dead peer or abort the
        # process (-6 instead of this exit code): flush and leave before that.
        _settle(sys.stdout)
        _settle(sys.stderr)
        os._exit(code)
    _settle(sys.stdout)
    _settle(sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
