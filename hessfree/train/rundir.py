"""The run directory: its default name, whether it can be created, creating or checking it.

A new run needs a new or empty directory it can write (:func:`run_dir_problems`, checked
before any data is loaded); :func:`prepare_run_dir` creates it with the resolved
``config.yaml``, or, on ``--resume``, checks it and returns each optimizer's checkpoint: the
config (or all but its budgets) and the number of processes must match, checkpoints must not
skip an optimizer, and ``metrics.jsonl`` must hold at least what the latest one recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from hessfree.train.checkpoint import (
    TMP_SUFFIX,
    load_checkpoint,
    remove_stale_temporaries,
    write_text_atomic,
)
from hessfree.train.config import (
    ConfigError,
    ExperimentConfig,
    config_digest,
    config_to_dict,
    dump_config,
    is_budget_key,
    load_config,
    training_digest,
)
from hessfree.train.config.schema import _show
from hessfree.train.config.yaml_io import plain_digests

__all__ = [
    "CHECKPOINT_FORMAT",
    "RunDirError",
    "RunDirInUseError",
    "RunDirWriteError",
    "absolute_data_path",
    "default_run_dir",
    "lock_run_dir",
    "partial_run_dir_message",
    "prepare_run_dir",
    "remove_dead_partial_dirs",
    "resumed_config",
    "run_dir_problems",
]

#: Written into every checkpoint; a checkpoint of another format is not resumed.
CHECKPOINT_FORMAT = 1

#: The lock file a writing run holds in its run directory (:func:`lock_run_dir`).
LOCK_NAME = ".lock"

#: A run directory is built in milliseconds (:func:`_create_run_dir`): a hidden partial one
#: untouched for this long is dead whoever made it, on whatever host (ours, with margin).
PARTIAL_MAX_AGE_S = 3600.0

# `.<name>.partial-<host>-<pid>-<random>`; versions before 2026-12-03: `.<name>.partial-<random>`
_PARTIAL_NAME = re.compile(r"\..+\.partial-(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[0-9a-f]{8}")


class RunDirError(ConfigError):
    """The run directory cannot be used as it is (edited, damaged, not a run directory, or
    another config's): exit 2 like a config error, but the message does not call the config
    invalid, since it may be fine."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        super().__init__(problems, source)
        self.args = ("\n".join(self.problems),)


def default_run_dir(config: ExperimentConfig, now: datetime | None = None) -> Path:
    """``<output.dir>/<name>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... if that exists.

    A leading ``~`` in ``output.dir`` is the home directory, as in ``data.path``.
    """
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path(config.output.dir).expanduser() / f"{config.name}-{stamp}"
    path, k = base, 1
    while _exists(path):
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def absolute_data_path(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with a relative ``data.path`` made absolute against the working directory.

    A relative path is read from the working directory (as documented), but a run directory's
    ``config.yaml`` must name the file the run trained on: ``--resume`` from another directory
    would otherwise read whatever file has that name there (or none). Lexical, as
    :func:`os.path.abspath` (symbolic links are kept).
    """
    path = getattr(config.data, "path", None)
    if not isinstance(path, str) or os.path.isabs(path):  # ~ is relative until expanded
        return config
    data = dataclasses.replace(config.data, path=os.path.abspath(os.path.expanduser(path)))
    return dataclasses.replace(config, data=data)


def _diff(a: object, b: object, path: str = "") -> list[str]:
    """Dotted paths at which two plain config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _diff(x, y, f"{path}.{i}")]
    return [] if a == b else [path or "<top>"]


def resumed_config(run_dir: Path, asked: ExperimentConfig) -> ExperimentConfig:
    """The config that resumes ``run_dir``, given the one the caller asked for.

    A run directory's ``config.yaml`` is the run's config, with ``data.path`` made absolute
    when the run started (:func:`absolute_data_path`). A config read again from the same file
    with a relative path names the same data, so the ``hessfree`` command and
    :class:`~hessfree.train.loop.Runner` alike compare both with relative paths made absolute,
    and resume with ``asked`` but the data the run recorded. A different timeout
    (``distributed.*``) does not change the results, and a budget only when the run stops (a
    finished run is extended): allowed. Anything else is another experiment.

    Returns:
        ExperimentConfig: ``asked`` with the saved ``data``; ``asked`` itself when the
        directory has no ``config.yaml`` (:func:`prepare_run_dir` refuses it).

    Raises:
        ConfigError: ``config.yaml`` is unreadable, or other keys differ (listed).
    """
    saved_path = Path(run_dir) / "config.yaml"
    if not _exists(saved_path):
        return asked
    saved = load_config(saved_path)
    changed = [
        key
        for key in _diff(
            config_to_dict(absolute_data_path(saved)), config_to_dict(absolute_data_path(asked))
        )
        if not key.startswith("distributed.") and not is_budget_key(key)
    ]
    if changed:
        raise ConfigError(
            [
                f"resuming needs the run's own config; the run in '{run_dir}' was written "
                f"for a different config, and these keys differ from {saved_path}: "
                f"{', '.join(changed)}. Only budget.* and distributed.* may change on "
                "resume; resume with the saved config (`hessfree run --resume "
                "DIR` without CONFIG or other overrides; from Python, "
                "load_config(DIR/config.yaml)), or start a new run."
                + "".join(_DISPLAY_NOTES.get(key, "") for key in changed)
            ]
        )
    return dataclasses.replace(asked, data=saved.data)


#: How to get a display key's effect on resume without changing the run's config (whose
#: digest every checkpoint records: a key outside budget.* and distributed.* cannot change).
_DISPLAY_NOTES = {
    "output.progress": " For progress bars, pass --progress or --no-progress to this command "
    "instead: they apply to this invocation only.",
    "output.plots": " Plots are drawn from metrics.jsonl when the run completes; to have them "
    "for a run without, call hessfree.train.plots.plot_run(RUN_DIR) afterwards.",
}


def _exists(path: Path) -> bool:
    """``path.exists()``, but ``False`` where the OS cannot even look (a name too long)."""
    try:
        return path.exists()
    except OSError:
        return False


def run_dir_problems(run_dir: Path, key: str = "output.dir") -> list[str]:
    """Why a new run directory could not be created at ``run_dir`` (empty: it can).

    An existing ``run_dir`` must be an empty directory. Checks the nearest existing ancestor
    (a directory this process may write in), then tries: creates the missing directories down
    to ``run_dir`` (or a probe directory inside an existing ``run_dir``) and removes them
    again. ``os.access`` alone passes what only the attempt refuses: root on a read-only or
    pseudo file system (``/proc``, ``/sys``), ACLs, a name longer than the file system allows.
    """
    try:
        return _run_dir_problems(run_dir, key)
    except OSError as err:  # e.g. a name too long to even stat
        return [
            f"`{key}`: cannot create the run directory '{run_dir}': "
            f"{err.strerror or err}; choose another directory."
        ]


def _run_dir_problems(run_dir: Path, key: str) -> list[str]:
    if run_dir.is_symlink() and not run_dir.exists():
        return [
            f"`{key}`: the run directory '{run_dir}' is a symbolic link to "
            f"'{os.readlink(run_dir)}', which does not exist; create that directory (an empty "
            "one behind a link is used), or choose another."
        ]
    if run_dir.exists() and not run_dir.is_dir():
        return [f"`{key}`: the run directory '{run_dir}' exists and is a file; choose another."]
    if run_dir.is_dir() and any(run_dir.iterdir()):  # as prepare_run_dir, but before any work
        partial = partial_run_dir_message(run_dir)
        return [f"`{key}`: {partial or _not_empty_message(run_dir, 'directory', 'the ')}"]
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
    error = _try_creating(run_dir, parent)
    if error is not None:
        return [
            f"`{key}`: cannot create the run directory '{run_dir}' (in '{parent}'): {error}; "
            "choose a directory you can write to."
        ]
    return []


def resume_dir_problems(run_dir: Path) -> list[str]:
    """Why a resume could not write in the run directory ``run_dir`` (empty: it can).

    A resume appends to ``metrics.jsonl`` and replaces the checkpoints, ``summary.json`` and
    (under new budgets) ``config.yaml`` by renames in ``run_dir`` and ``checkpoints/``; in a
    read-only directory (an archived run, a read-only mount) the first of those writes failed
    with a traceback, after the data was loaded. Found by trying, as :func:`run_dir_problems`
    does (``os.access`` passes what only the attempt refuses): a probe file is made and
    removed in each directory (named as a temporary, so a kill's leftover is cleaned up like
    one), and ``metrics.jsonl`` is opened for appending, with nothing written.
    """
    for directory in (run_dir, run_dir / "checkpoints"):
        if not directory.is_dir():
            continue
        try:
            fd, name = tempfile.mkstemp(prefix=".hessfree-check-", suffix=TMP_SUFFIX, dir=directory)
            os.close(fd)
            Path(name).unlink(missing_ok=True)
        except OSError as err:
            return [_read_only(run_dir, f"no file can be created in '{directory}'", err)]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        try:
            open(metrics, "ab").close()  # noqa: SIM115 -- opened and closed: nothing written
        except OSError as err:
            return [_read_only(run_dir, f"'{metrics}' cannot be opened for appending", err)]
    return []


def _read_only(run_dir: Path, what: str, err: OSError) -> str:
    return (
        f"cannot resume '{run_dir}': {what} ({err.strerror or err}); a resume appends to "
        "metrics.jsonl and rewrites the checkpoints and summary.json there. Nothing was "
        "read or changed; make the run directory writable, or copy it and resume the copy."
    )


def _try_creating(run_dir: Path, existing: Path) -> str | None:
    """Create the directories from ``existing`` down to ``run_dir`` and remove them again.

    Returns the operating system's reason when that fails, else ``None``. Only directories
    this call made are removed (innermost first), so nothing of the user's is touched.
    """
    made: list[Path] = []
    try:
        if run_dir.exists():  # an existing (empty) run directory: can files be made in it?
            made.append(Path(tempfile.mkdtemp(prefix=".hessfree-check-", dir=run_dir)))
        else:
            for path in reversed([run_dir, *run_dir.parents]):
                if path == existing or path in existing.parents or path.exists():
                    continue
                path.mkdir()
                made.append(path)
    except OSError as err:
        return err.strerror or str(err)
    finally:
        for path in reversed(made):
            try:
                path.rmdir()
            except OSError:
                pass
    return None


def _create_run_dir(run_dir: Path, config_text: str) -> None:
    """Create ``run_dir`` with its ``config.yaml`` and an empty ``checkpoints/`` at once.

    Built under a hidden name beside it, then renamed: a kill leaves no run directory or a
    whole one (at worst a hidden ``.<name>.partial-*`` beside it, which the next run in that
    directory removes: :func:`remove_dead_partial_dirs`), never the ``checkpoints/``
    without ``config.yaml`` that creating the two in turn could leave, which neither a new
    run (not empty) nor ``--resume`` (no config) accepts. An existing empty ``run_dir`` is
    replaced; behind a symbolic link, the directory it points to (a rename onto the link
    itself fails: a directory cannot replace a non-directory), so the link stays and leads
    to the run.
    """
    if run_dir.is_symlink():
        run_dir = Path(os.path.realpath(run_dir))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # host and pid in the name: a later run on this host can tell that its maker is dead
    tag = f"{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = run_dir.with_name(f".{run_dir.name[:64]}.partial-{tag}")
    tmp.mkdir()  # with the umask's permissions, as run_dir.mkdir() would
    try:
        (tmp / "checkpoints").mkdir()
        write_text_atomic(tmp / "config.yaml", config_text)
        if os.name == "nt" and run_dir.is_dir():
            run_dir.rmdir()  # Windows renames nothing onto a directory, even an empty one
        os.replace(tmp, run_dir)  # POSIX: onto an empty directory too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _host_tag() -> str:
    """This host, as 8 hex digits (a hash of its name: any name fits a file name)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (``True`` where that cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: another user's live process
        return True
    return True


def _partial_leftovers_only(path: Path) -> bool:
    """Whether ``path`` holds only what :func:`_create_run_dir` makes: ``checkpoints/`` (with
    at most temporaries), ``config.yaml`` and hidden ``*.tmp`` files."""

    def temporary(p: Path) -> bool:
        return p.is_file() and p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)

    for p in path.iterdir():
        if p.is_symlink():
            return False
        if p.name == "checkpoints" and p.is_dir():
            if not all(temporary(q) and not q.is_symlink() for q in p.iterdir()):
                return False
        elif not (temporary(p) or (p.name == "config.yaml" and p.is_file())):
            return False
    return True


def remove_dead_partial_dirs(
    directory: Path, say: Callable[[str], None] = print, *, now: float | None = None
) -> list[Path]:
    """Remove the hidden ``.<name>.partial-*`` directories in ``directory`` whose creation
    was killed (a SIGKILL between :func:`_create_run_dir`'s ``mkdir`` and its rename).

    One counts as dead when its maker's process (named in it, on this host) no longer exists,
    or when nothing in it changed for :data:`PARTIAL_MAX_AGE_S` (another host's, or one made
    by versions that did not name the process); a live one is never touched. A dead one is
    removed only if it holds nothing but what a creation writes; otherwise it is named, with
    what to do. Returns the removed directories.
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = sorted(directory.iterdir()) if directory.is_dir() else []
    except OSError:
        return removed
    for path in entries:
        match = _PARTIAL_NAME.fullmatch(path.name)
        try:
            if match is None or path.is_symlink() or not path.is_dir():
                continue
            newest = max([path.stat().st_mtime, *(p.lstat().st_mtime for p in path.iterdir())])
            dead = now - newest > PARTIAL_MAX_AGE_S or (
                match["host"] == _host_tag() and not _pid_alive(int(match["pid"]))
            )
            if not dead:
                continue
            if not _partial_leftovers_only(path):
                say(
                    f"left '{path}': named like an interrupted run creation's directory, but "
                    "it holds other files; remove it yourself if it is not yours"
                )
                continue
            shutil.rmtree(path)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
        removed.append(path)
        say(f"removed {path.name}, left by a run killed while creating its directory")
    return removed


def partial_run_dir_message(run_dir: Path) -> str | None:
    """What to do with a directory an interrupted run creation left, else ``None``.

    Such a directory (made by versions that created ``checkpoints/`` before writing
    ``config.yaml``) holds an empty ``checkpoints/`` and at most leftover temporary files, no
    ``config.yaml``: nothing was trained in it.
    """
    try:
        if not run_dir.is_dir() or (run_dir / "config.yaml").exists():
            return None
        ckpt_dir = run_dir / "checkpoints"
        leftovers = [
            p
            for p in (*run_dir.iterdir(), *(ckpt_dir.iterdir() if ckpt_dir.is_dir() else ()))
            if p != ckpt_dir
        ]
        if not ckpt_dir.is_dir() or any(
            not (p.is_file() and p.name.startswith(".") and p.name.endswith(TMP_SUFFIX))
            for p in leftovers
        ):
            return None
    except OSError:
        return None
    return (
        f"'{run_dir}' holds an empty checkpoints/ directory and no config.yaml: a run was "
        "interrupted while creating it, before any training, so there is nothing to resume. "
        f"Remove it (rm -r '{run_dir}') and start the run again, or choose another directory."
    )


class RunDirInUseError(RuntimeError):
    """Another process holds the run directory's lock: nothing is wrong with the config, and
    the same command succeeds once that process ends (the CLI exits with its own status, 5)."""


class RunDirWriteError(RuntimeError):
    """Writing into the run directory failed during the run (a full disk, a directory made
    read-only or removed meanwhile): the CLI exits with 2 and this message, not a traceback."""


@contextmanager
def writing(path: Path, run_dir: Path) -> Iterator[None]:
    """Turn an :class:`OSError` while writing ``path`` into a :class:`RunDirWriteError` that
    says what is still whole and how to go on.

    Every file is replaced atomically and ``metrics.jsonl`` is cut back to what the latest
    checkpoint recorded on ``--resume``, so a failed write leaves the run resumable from its
    latest checkpoint once the cause is fixed.
    """
    try:
        yield
    except OSError as err:
        raise RunDirWriteError(
            f"cannot write '{path}': {err.strerror or err}. The run stopped here; the files "
            "written before are whole (each is replaced atomically) and the latest checkpoint "
            "of each optimizer is intact. Free space or make the directory writable, then "
            f"continue with: hessfree run --resume {os.path.abspath(run_dir)}"
        ) from None


def _not_empty_message(run_dir: Path, other: str, article: str = "") -> str:
    """Why a new run cannot use the non-empty ``run_dir``: a run in it, or another process
    writing it now (two runs started on one ``--out`` at once: the one that lost the race
    was told to ``--resume`` a run still going)."""
    holder = _lock_holder(run_dir)
    if holder is not None:
        return (
            f"{article}run directory '{run_dir}' is being written by another hessfree process "
            f"({holder}), which started on it first; choose another {other}, or wait for that "
            f"run to end and continue it with --resume {run_dir}."
        )
    return (
        f"{article}run directory '{run_dir}' is not empty; resume it with --resume {run_dir} or "
        f"choose another {other}."
    )


def _lock_holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock (:func:`lock_run_dir`), read from its file; None if no
    process does, or where locks are unavailable. Takes no lock that outlives the call."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        with open(run_dir / LOCK_NAME, encoding="utf-8") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return " ".join(f.read(200).split()) or "unknown"
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except OSError:  # no lock file: no run holds it
        return None
    return None


def lock_run_dir(run_dir: Path) -> Any:
    """Hold ``run_dir`` for this process's run: an exclusive ``flock`` on its ``.lock``.

    Two processes writing one run directory (``--resume`` while the run, or another resume of
    it, is still going) interleave ``metrics.jsonl`` and the checkpoints, and each removes the
    other's in-flight temporary files as leftovers of a killed write. The lock is advisory,
    released by the kernel when the process ends however it ends (no stale locks), and kept
    as a file (removing it would let a third process lock another inode). A no-op without
    ``fcntl`` (Windows).

    Returns:
        The open lock file (close it to release), or ``None`` where locks are unavailable.

    Raises:
        RunDirInUseError: Another process holds the lock (the message gives its pid and host).
        ConfigError: The lock file cannot be opened (the directory is not writable).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    path = run_dir / LOCK_NAME
    try:
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
    except OSError as err:
        raise RunDirError(
            [f"cannot open the run directory's lock file '{path}': {err.strerror or err}."]
        ) from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = " ".join(f.read(200).split()) or "unknown"
        f.close()
        raise RunDirInUseError(
            f"run directory '{run_dir}' is in use by another hessfree process ({holder}): "
            "the run, or a resume of it, is still going, and nothing was read or written. "
            f"Wait for it to end (SIGINT or SIGTERM make it checkpoint and stop), then resume "
            f"with --resume {run_dir}; two processes writing one run directory would "
            "interleave its metrics and checkpoints."
        ) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
    except OSError as err:  # a full disk: the first write of a new run after config.yaml
        try:
            f.close()
        except OSError:
            pass  # the unwritten line is dropped with the file object
        raise RunDirError(
            [
                f"cannot write the run directory's lock file '{path}': "
                f"{err.strerror or err}. Nothing was trained or changed; free space (or make "
                f"the directory writable), then {_again(run_dir)}."
            ]
        ) from None
    return f


def _again(run_dir: Path) -> str:
    """How to go on in ``run_dir`` once a write can succeed: resume it if it holds a run."""
    if (run_dir / "config.yaml").is_file():
        return f"continue with: hessfree run --resume {os.path.abspath(run_dir)}"
    return "run the command again"


def _format_problem(path: Path, ckpt: dict[str, Any]) -> str:
    """A checkpoint of another format: which one, the hessfree that wrote it (when recorded),
    and which side to change. Before, it read "written for a different config (or format)",
    which sent the user to the config when the package was what differed."""
    written = ckpt.get("format")
    arithmetic = ckpt.get("arithmetic")
    by = arithmetic.get("hessfree") if isinstance(arithmetic, dict) else None
    try:
        from importlib.metadata import version

        ours = f"hessfree {version('hessfree')}"
    except Exception:  # noqa: BLE001 -- running from a checkout
        ours = "this hessfree"
    newer = type(written) is int and written > CHECKPOINT_FORMAT
    way = (
        "upgrade hessfree to resume it (a newer version wrote it)"
        if newer
        else "resume it with the hessfree version that wrote it"
    )
    return (
        f"checkpoint '{path}' has checkpoint format {_show(written)}"
        f"{f', written by hessfree {by}' if by else ''}; {ours} reads format "
        f"{CHECKPOINT_FORMAT} only. Nothing was changed; {way}, or start a new run."
    )


def _leaf_values(plain: Any, path: str = "") -> dict[str, Any]:
    """Every dotted key of a plain config with its value (lists of entries by index)."""
    if isinstance(plain, dict):
        out: dict[str, Any] = {}
        for key, value in plain.items():
            out.update(_leaf_values(value, f"{path}{key}."))
        return out
    if isinstance(plain, list) and plain and all(isinstance(v, dict) for v in plain):
        out = {}
        for i, value in enumerate(plain):
            out.update(_leaf_values(value, f"{path}{i}."))
        return out
    return {path.rstrip("."): plain}


def _other_config_problem(
    path: Path, ckpt: dict[str, Any], run_dir: Path, config: ExperimentConfig
) -> str:
    """Why a checkpoint's config digest does not match this run's.

    A run written by an older hessfree whose config schema lacked keys this one adds (with
    their defaults: HF's ``damping_metric``, ``replay_rng``... since 2026-11-30) matches its
    own ``config.yaml`` as that version resolved it, read back as written, not as this version
    resolves it. That case is named (which keys are new, and that their defaults may not be
    what that version did); "a different config; resume with the run's own config.yaml" sent
    the user to a file they had not changed.
    """
    try:
        written = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        written = None
    if isinstance(written, dict):
        whole, training = plain_digests(written)
        if ckpt.get("config_sha256") == whole or ckpt.get("training_sha256") == training:
            old = _leaf_values(written)
            new = {k: v for k, v in _leaf_values(config_to_dict(config)).items() if k not in old}
            shown = ", ".join(f"{k} ({_show(v)})" for k, v in list(new.items())[:6])
            more = f" and {len(new) - 6} more" if len(new) > 6 else ""
            arithmetic = ckpt.get("arithmetic")
            by = arithmetic.get("hessfree") if isinstance(arithmetic, dict) else None
            return (
                f"checkpoint '{path}' belongs to this run's config.yaml as the hessfree that "
                f"wrote it{f' ({by})' if by else ''} resolved it, but this version resolves "
                f"that file with keys the older one did not have: {shown or 'none'}{more}. "
                "Their defaults need not do what the older version did, so the run would not "
                "go on as it started. Nothing was changed; resume it with the hessfree version "
                "that wrote it, or start a new run."
            )
    return (
        f"checkpoint '{path}' was written for a different config; resume with the run's own "
        "config.yaml."
    )


def prepare_run_dir(
    run_dir: Path,
    config: ExperimentConfig,
    *,
    resume: bool,
    writer: bool,
    world_size: int,
    config_header: str = "",
    say: Callable[[str], None] = print,
    data_sha256: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Create (or check, when resuming) the run directory; return existing checkpoints.

    Args:
        writer: Whether this process writes (rank 0; the other ranks of a data-parallel run
            only read).
        world_size: The number of processes, which a resumed checkpoint must match.
        say: Prints a line (about leftovers of an interrupted write it removes).
        data_sha256: The loaded data's :meth:`~hessfree.train.data.Dataset.sha256`, which a
            resumed checkpoint that recorded one must match.

    Raises:
        ConfigError: The directory cannot be used (each message says why and what to do).
        DataError: The data differs from what a checkpoint recorded.
    """
    ckpt_dir = run_dir / "checkpoints"
    digest, training = config_digest(config), training_digest(config)
    if not resume:
        if not writer:
            return {}
        remove_dead_partial_dirs(run_dir.parent, say)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunDirError(
                [partial_run_dir_message(run_dir) or _not_empty_message(run_dir, "--out")]
            )
        try:
            _create_run_dir(run_dir, dump_config(config, config_header))
        except OSError as err:
            if _exists(run_dir) and run_dir.is_dir() and any(run_dir.iterdir()):
                # made since the check above: another run started on it at the same time
                raise RunDirError([_not_empty_message(run_dir, "--out")]) from None
            raise RunDirError(
                [f"cannot create the run directory '{run_dir}': {err.strerror or err}."]
            ) from None
        return {}
    if not (run_dir / "config.yaml").exists():
        raise RunDirError(
            [
                partial_run_dir_message(run_dir)
                or f"'{run_dir}' holds no config.yaml: not a run directory."
            ]
        )
    if writer and (problems := resume_dir_problems(run_dir)):
        raise RunDirError(problems)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise RunDirError(
            [
                f"'{ckpt_dir}' is a file, not the run's checkpoint directory; the run "
                "directory was edited. Move that file away (resuming then restarts every "
                "optimizer) or start a new run."
            ]
        )
    found: dict[str, dict[str, Any]] = {}
    gap = None
    for opt in config.optimizers:
        path = ckpt_dir / f"{opt.label}.pt"
        if not path.exists():
            gap = gap or path
        elif gap is not None:
            raise RunDirError(
                [
                    f"'{gap}' is missing although a later optimizer's checkpoint "
                    f"'{path}' exists; the run directory was edited."
                ]
            )
        else:
            ckpt = load_checkpoint(path, map_location="cpu")  # CheckpointError if damaged
            if ckpt.get("format") != CHECKPOINT_FORMAT:
                raise RunDirError([_format_problem(path, ckpt)])
            # The same config, or (checkpoints that record it) the same but for budgets.
            same = ckpt.get("config_sha256") == digest or (ckpt.get("training_sha256") == training)
            if not same:
                raise RunDirError([_other_config_problem(path, ckpt, run_dir, config)])
            written_by = int(ckpt.get("world_size", 1))
            if written_by != world_size:
                raise RunDirError(
                    [
                        f"checkpoint '{path}' was written by a run over {written_by} "
                        f"process(es), this one has {world_size}; resume with "
                        f"the same number (torchrun --nproc_per_node={written_by}), since "
                        "another one changes the rounding of every averaged quantity."
                    ]
                )
            recorded = ckpt.get("data_sha256")  # checkpoints from before 2026-12-03: none
            if data_sha256 is not None and recorded is not None and recorded != data_sha256:
                from hessfree.train.data import DataError

                raise DataError(
                    f"the training data is not what checkpoint '{path}' was trained on: its "
                    f"arrays' SHA-256 is {data_sha256[:12]}..., the checkpoint recorded "
                    f"{recorded[:12]}... (the data file was changed or replaced, or the "
                    "generated data changed with a hessfree upgrade). Nothing was changed; "
                    "restore the data the run started with, or start a new run."
                )
            found[opt.label] = ckpt
    metrics = run_dir / "metrics.jsonl"
    recorded = max((int(c.get("metrics_bytes", 0)) for c in found.values()), default=0)
    size = metrics.stat().st_size if metrics.is_file() else 0
    if metrics.exists() and not metrics.is_file():
        raise RunDirError([f"'{metrics}' is not a file; the run directory was edited."])
    if size < recorded:
        raise RunDirError(
            [
                f"'{metrics}' has {size} bytes, fewer than the {recorded} its latest "
                "checkpoint recorded: the metrics file was truncated or replaced. Restore it, "
                "or start a new run (resuming would lose records)."
            ]
        )
    if recorded:
        # Each checkpoint records the SHA-256 of the metrics it had written (older ones don't).
        data = metrics.read_bytes()
        for label, c in found.items():
            digest_then, length = c.get("metrics_sha256"), int(c.get("metrics_bytes", 0))
            if digest_then is not None and hashlib.sha256(data[:length]).hexdigest() != digest_then:
                raise RunDirError(
                    [
                        f"'{metrics}' differs from what checkpoint '{ckpt_dir / label}.pt' "
                        f"recorded: its first {length} bytes fail the SHA-256 stored with "
                        "the checkpoint, so the metrics file was damaged or edited. Restore it "
                        "from a copy, or start a new run (resuming would mix altered records "
                        "into the summary)."
                    ]
                )
    if writer and any(c.get("config_sha256") != digest for c in found.values()):
        # Resumed under other budgets: the run directory describes the run as it goes on.
        header = config_header or "Resolved by hessfree"
        with writing(run_dir / "config.yaml", run_dir):  # atomic: the old one stays whole
            write_text_atomic(
                run_dir / "config.yaml",
                dump_config(config, f"{header}\nBudgets changed on resume."),
            )
    if writer:
        # Only now that every check passed: the leftovers of a write killed mid-way.
        for stale in remove_stale_temporaries(ckpt_dir) + remove_stale_temporaries(run_dir):
            say(f"removed {stale.name}, left by an interrupted write")
        remove_dead_partial_dirs(run_dir.parent, say)
    if writer:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    return found
