"""runner17: `hessfree run` against what users do to it next (experiments/README.md, runner17).

Counts past int64 (and the memory checks that missed npz classes and K-FAC probes), labels
and names Windows reserves, complex YAML keys, an override into an unset list, the command's
last line on a stderr nobody reads and a stdout whose reader has gone (`| head`, the bars
too), a full disk at the writes no round had tried (the run directory's lock, a metrics
line, the rewritten config of a resume), a checkpoint read while the run replaces it, and
SIGHUP under torchrun. Each test of a fix fails on main c370515; the guards say so.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from test_train_robust import refused, write_tiny

from hessfree.train import rundir
from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.cli import main
from hessfree.train.config import load_config
from hessfree.train.loop import Abandoned, Runner
from hessfree.train.rundir import RunDirWriteError

REPO = Path(__file__).resolve().parents[1]


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _final_weights(run: Path, label: str) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "checkpoints" / f"{label}.pt")
    assert ckpt["finished"]
    return ckpt["model"]


def _assert_bitwise(run: Path, ref: Path, labels=("adam", "sgd")) -> None:
    for label in labels:
        got, want = _final_weights(run, label), _final_weights(ref, label)
        assert all(torch.equal(got[k], want[k]) for k in want), label


# -- integers past int64 -----------------------------------------------------------------------

_INT64_MAX = 2**63 - 1


def test_runner17_counts_up_to_int64_run_and_resume(tmp_path, capsys):
    """Guard: every count of the loop stays a Python int (budget, evaluation and checkpoint
    periods, the evaluation's slices, the progress bar's total): at int64's largest value a
    run stops by its epoch budget, its config.yaml records the values, and it resumes."""
    big = {"steps": _INT64_MAX, "epochs": 1}
    config = write_tiny(
        tmp_path,
        budget=big,
        eval={"every_steps": _INT64_MAX, "max_cases": _INT64_MAX, "batch_size": _INT64_MAX},
        output={"checkpoint_every": _INT64_MAX, "plots": False, "progress": "always"},
    )
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run)]) == 0  # the bars shown: no --quiet
    assert "/9223372036854775807" in capsys.readouterr().out  # the bar's total
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["budget"]["steps"] == _INT64_MAX
    assert saved["output"]["checkpoint_every"] == _INT64_MAX
    summary = json.loads((run / "summary.json").read_text())
    assert {e["stop_reason"] for e in summary["optimizers"].values()} == {"epochs"}
    assert main(["run", "--resume", str(run), "--quiet", "budget.epochs=2"]) == 0


@pytest.mark.parametrize(
    "override",
    [
        "budget.steps=10000000000000000000",
        "eval.every_steps=18446744073709551616",
        "output.checkpoint_every=10000000000000000000",
        "optimizers.1.budget.steps=9223372036854775808",
        "model.hidden_sizes=[4, 10000000000000000000]",
        "data.num_classes=18446744073709551616",
    ],
)
def test_runner17_a_count_past_int64_is_refused_at_the_check(tmp_path, capsys, override):
    """main: `--check` 0 for each (budgets no run reaches; num_classes and the layer width then
    failed building the model). Refused now naming the key, the
    value and int64's largest, before any work; the boundary itself runs (guard above)."""
    key, _, value = override.partition("=")
    err = refused(["run", str(write_tiny(tmp_path)), "--check", override], capsys)
    assert "outside the 64-bit integers" in err and str(_INT64_MAX) in err
    assert f"`{key}" in err


def test_runner17_a_float_count_past_2_53_says_why_it_is_no_integer(tmp_path, capsys):
    """main: "`budget.steps` must be an integer, got float 1e+19": no why. YAML reads 1e19 as a
    float; the refusal now says so, and 1e17 (below int64) gets its digits."""
    config = str(write_tiny(tmp_path))
    err = refused(["run", config, "--check", "budget.steps=1e19"], capsys)
    assert "beyond the 64-bit integers" in err
    err = refused(["run", config, "--check", "budget.steps=1e17"], capsys)
    assert "not an exact integer: write the digits, 100000000000000000" in err


def test_runner17_hessianfree_seed_outside_manual_seeds_range_is_refused(tmp_path, capsys):
    """main: `HessianFree(seed=2**64)` was built, and its first step that draws random numbers
    (precond 'nystrom', checked on main; 'fisher_mc', K-FAC's probes) raised torch's "Overflow
    when unpacking long long" (ValueError; in a run, a traceback after the run directory was
    written). The oracle is torch's own range for Generator.manual_seed, [-2**63, 2**64 - 1]."""
    from hessfree import HessianFree

    torch.Generator().manual_seed(2**64 - 1)
    torch.Generator().manual_seed(-(2**63))
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises((RuntimeError, ValueError), match="(?i)overflow"):
            torch.Generator().manual_seed(bad)
        with pytest.raises(ValueError, match=r"`seed` must be an int in \[-9223372036854775808"):
            HessianFree([torch.zeros(2, requires_grad=True)], seed=bad)
    HessianFree([torch.zeros(2, requires_grad=True)], seed=2**64 - 1)
    err = refused(
        [
            "run",
            str(write_tiny(tmp_path)),
            "--check",
            "optimizers.0={name: hessianfree, seed: 18446744073709551616}",
        ],  # fmt: skip
        capsys,
    )
    assert "`optimizers.0.seed` = 18446744073709551616" in err


def test_runner17_npz_num_classes_counts_in_the_memory_check(tmp_path, capsys):
    """main: `data.num_classes: 1e12` passed `--check` (the memory check took an npz model's
    outputs as 1); the run then failed building a 5e12-weight output layer (RuntimeError,
    a traceback). Now refused at the check, naming data.num_classes."""
    err = refused(
        ["run", str(write_tiny(tmp_path)), "--check", "data.num_classes=1000000000000"], capsys
    )
    assert "`data.num_classes`: the model would have at least 5,000,000,000,008 parameters" in err


@pytest.mark.parametrize("probes", [2**63 - 1, 10**12])
def test_runner17_kfac_probes_beyond_memory_are_refused_before_the_run(tmp_path, capsys, probes):
    """main: `precond: {name: kfac, num_probes: N}` with N × curvature batch × outputs past the
    machine's memory passed the check and the data, created the run directory, and its first
    step raised RuntimeError ("Storage size calculation overflowed", or the allocator's) out
    of the CLI. Now exit 2 after loading the data (the outputs are the data's), before the run
    directory exists, naming the key and the size."""
    run = tmp_path / "run"
    override = f"optimizers.0={{name: hessianfree, precond: {{name: kfac, num_probes: {probes}}}}}"
    err = refused(
        ["run", str(write_tiny(tmp_path)), "--quiet", "--out", str(run), override], capsys
    )
    assert f"`optimizers.0.precond.num_probes` = {probes}" in err and "memory" in err
    assert not run.exists()


# -- names Windows reserves ---------------------------------------------------------------------

_RESERVED_LABELS = ["CON", "nul", "Aux", "com1", "LPT9", "aux.txt", "con.v2", "PRN"]
_NEAR_MISSES = ["con-1", "console", "com10", "lpt", "nul_", "x.con", "a.", "a..b"]


def _python_says_reserved(file_name: str) -> bool:
    """Python's own answer (``PureWindowsPath.is_reserved``, up to 3.12; deprecated in 3.13)."""
    if not hasattr(pathlib.PureWindowsPath, "is_reserved"):  # pragma: no cover - Python 3.15
        pytest.skip("this Python has no PureWindowsPath.is_reserved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pathlib.PureWindowsPath(file_name).is_reserved()


@pytest.mark.parametrize("label", _RESERVED_LABELS + _NEAR_MISSES)
def test_runner17_reserved_file_names_agree_with_python(label):
    """The oracle for the two refusals below: Python's Windows path flavour, on the
    checkpoint's file name and on the run directory's."""
    from hessfree.train.config.schema import windows_reserved

    assert windows_reserved(f"{label}.pt") == _python_says_reserved(f"{label}.pt")
    name = f"{label}-20261204-120000"
    assert windows_reserved(name) == _python_says_reserved(name)


@pytest.mark.parametrize("label", _RESERVED_LABELS)
def test_runner17_a_label_windows_reserves_is_refused(tmp_path, capsys, label):
    """main: `--check` 0 and a run writing checkpoints/CON.pt (aux.txt.pt...), a file Windows
    cannot create, copy or unzip: the run directory is not portable. Now exit 2 at the check
    naming the key, the label, the reserved word and a label that works."""
    config = write_tiny(tmp_path)
    err = refused(["run", str(config), "--check", f"optimizers.1.label={label}"], capsys)
    assert f"`optimizers.1.label` = {label!r}" in err
    assert f"checkpoints/{label}.pt" in err and "Windows reserves" in err
    assert not (tmp_path / "runs").exists()


def test_runner17_labels_close_to_reserved_ones_run(tmp_path, capsys):
    """Guard: only the reserved words are refused; a label ending in a dot (`a.`: the file
    `a..pt`, whose name does not end in one) runs and resumes."""
    entries = [{"name": "adam", "lr": 0.01, "label": label} for label in _NEAR_MISSES]
    config = write_tiny(tmp_path, optimizers=entries, budget={"steps": 1})
    run = tmp_path / "run"
    assert main(["run", str(config), "--quiet", "--out", str(run)]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        f"{label}.pt" for label in _NEAR_MISSES
    )
    assert main(["run", "--resume", str(run), "--quiet", "budget.steps=2"]) == 0


def test_runner17_a_name_whose_run_directory_windows_reserves_is_refused(tmp_path, capsys):
    """main: `name: con.v2` made runs/con.v2-<time>, reserved on Windows (the part before the
    first dot). `name: con` (runs/con-<time>) is not, and runs (guard)."""
    config = write_tiny(tmp_path)
    err = refused(["run", str(config), "--check", "name=con.v2"], capsys)
    assert "`name` = 'con.v2'" in err and "'con-1.v2'" in err
    assert main(["run", str(config), "--quiet", "name=con"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("con-") and not _python_says_reserved(run.name)


# -- YAML keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [("? [a, b]\n: 1\n", "list ['a', 'b']"), ("{a: 1}: 2\n", "dict {'a': 1}")],
    ids=["complex-key", "mapping-key"],
)
def test_runner17_a_key_that_is_a_list_or_mapping_is_refused_with_its_line(
    tmp_path, capsys, text, shown
):
    """main: "not valid YAML: TypeError: unhashable type: 'list'" (runner14 left it): no line,
    no key. Now the key, its line, and that a config has no use for complex keys. The oracle
    that the text is valid YAML with such a key: PyYAML's own loader refuses it only as
    unhashable, in the same place."""
    with pytest.raises(yaml.constructor.ConstructorError, match="unhashable"):
        yaml.safe_load(text)
    path = tmp_path / "c.yaml"
    path.write_text(text + yaml.safe_dump(yaml.safe_load(write_tiny(tmp_path).read_text())))
    err = refused(["run", str(path), "--check"], capsys)
    assert f"got the {shown} as a key (line 1)" in err


def test_runner17_an_override_of_an_item_of_an_unset_list_says_so(tmp_path, capsys):
    """main: `optimizers.0.betas.0=0.95` on an entry that leaves `betas` to its default made a
    mapping {'0': 0.95}: "`optimizers.0.betas` must be a list, got dict {'0': 0.95}". Now the
    override is named with why and what to write; a list the file sets still takes an index
    (guard)."""
    config = write_tiny(tmp_path)
    err = refused(["run", str(config), "--check", "optimizers.0.betas.0=0.95"], capsys)
    assert "`optimizers.0.betas` is not set in the config" in err
    assert "optimizers.0.betas=[...]" in err and "got dict" not in err
    assert main(["run", str(config), "--check", "model.hidden_sizes.0=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["hidden_sizes"] == [7]


# -- the last line on a stderr nobody reads ---------------------------------------------------


@pytest.fixture
def dead_stderr(monkeypatch):
    """sys.stderr writing into a pipe whose reader has gone: every write fails with EPIPE, as
    after SIGHUP with `2>&1 | tee log` closed with the terminal."""
    read, write = os.pipe()
    os.close(read)
    # line-buffered, as Python's own stderr is (a line is written when printed)
    stream = open(write, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 -- closed below
    yield stream  # set in the test: pytest's capture sets sys.stderr again for each phase
    monkeypatch.undo()
    stream.close()


def test_runner17_a_second_signal_after_sighup_exits_with_its_status(
    tmp_path, monkeypatch, dead_stderr
):
    """main: the second signal's line ("hessfree: interrupted; ...") raised BrokenPipeError out
    of main (exit 1 and a traceback nobody sees) instead of the signal's status; a run under
    --quiet printed nothing before, so no earlier write had moved stderr to /dev/null."""
    config = write_tiny(tmp_path)

    def abandoned(self):
        raise Abandoned(signal.SIGTERM)

    monkeypatch.setattr(Runner, "run", abandoned)
    monkeypatch.setattr(sys, "stderr", dead_stderr)
    assert main(["run", str(config), "--quiet"]) == 128 + signal.SIGTERM
    os.write(dead_stderr.fileno(), b"more")  # its descriptor now leads to /dev/null


def test_runner17_a_run_piped_into_head_goes_on_when_head_exits(tmp_path, monkeypatch, capsys):
    """main: `hessfree run c.yaml | head -3`: once head had exited, the run's next line raised
    BrokenPipeError out of the run (exit 1, a traceback on the terminal, the next contenders
    never trained). Now stdout goes to /dev/null with one warning on stderr, the run completes
    (exit 0) and its run directory equals an uninterrupted run's."""
    config = write_tiny(tmp_path)
    read, write = os.pipe()
    os.close(read)  # head has read its lines and exited
    stdout = open(write, "w", encoding="utf-8")  # noqa: SIM115 -- closed below
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        code = main(["run", str(config), "--out", str(tmp_path / "run")])
    finally:
        monkeypatch.undo()
        stdout.close()
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("hessfree: warning: stdout's reader has gone") == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
    assert main(["run", str(config), "--quiet", "--out", str(tmp_path / "ref")]) == 0
    _assert_bitwise(tmp_path / "run", tmp_path / "ref")


def test_runner17_a_progress_bar_whose_reader_has_gone_does_not_stop_the_run(
    tmp_path, monkeypatch, capsys
):
    """main: with bars on and stdout a pipe (`--progress | head`), the first write after head
    exited was the bar's, which raised BrokenPipeError out of the step loop (tqdm swallows
    only EIO): the run died mid-entry. Now the bar's stream is dropped as the runner's lines
    are, and the run completes bitwise as an uninterrupted one. Deterministic: the pipe's
    reader closes at the first step (writes before it fill the pipe, never block)."""
    config = load_config(write_tiny(tmp_path))
    read, write = os.pipe()
    stdout = open(write, "w", encoding="utf-8")  # noqa: SIM115 -- closed below
    monkeypatch.setattr(sys, "stdout", stdout)

    def head_exits(event):
        nonlocal read
        if read is not None:
            os.close(read)
            read = None

    try:
        runner = Runner(config, tmp_path / "run", progress=True, verbose=False, on_step=head_exits)
        assert runner.run().exit_code == 0
    finally:
        monkeypatch.undo()
        stdout.close()
    assert capsys.readouterr().err.count("stdout's reader has gone") == 1
    Runner(config, tmp_path / "ref", progress=False, verbose=False).run()
    _assert_bitwise(tmp_path / "run", tmp_path / "ref")


def test_runner17_an_error_line_to_a_dead_stderr_keeps_its_status(
    tmp_path, monkeypatch, dead_stderr
):
    """main: a refusal printed to the dead pipe raised BrokenPipeError: exit 1, not 2."""
    monkeypatch.setattr(sys, "stderr", dead_stderr)
    assert main(["run", str(tmp_path / "missing.yaml"), "--quiet"]) == 2


# -- a full disk at the writes no round had tried ---------------------------------------------


class _LockOnFullDisk:
    """The lock file of a disk that is full: opened and locked, but its line (buffered by the
    text layer) cannot be flushed, as a write to a full file system fails at its flush."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def flush(self):
        raise _enospc()


def test_runner17_a_full_disk_at_the_lock_file_is_a_worded_error(tmp_path, monkeypatch, capsys):
    """main: the lock line's flush raised OSError out of the run: exit 1 with a traceback.
    Now exit 2 naming the file and the cause; the directory holds its config.yaml and can be
    resumed once there is room (bitwise equal to an uninterrupted run)."""
    config = write_tiny(tmp_path)
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return _LockOnFullDisk(f) if Path(path).name == rundir.LOCK_NAME and "a" in mode else f

    monkeypatch.setattr(rundir, "open", full_open, raising=False)
    run = tmp_path / "run"
    err = refused(["run", str(config), "--quiet", "--out", str(run)], capsys)
    assert "lock file" in err and "No space left on device" in err
    assert f"hessfree run --resume {run}" in err
    monkeypatch.undo()
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert main(["run", str(config), "--quiet", "--out", str(tmp_path / "ref")]) == 0
    _assert_bitwise(run, tmp_path / "ref")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_runner17_a_full_disk_at_a_metrics_line_is_a_worded_error(tmp_path):
    """main: the failed line stayed in the file's buffer, and closing metrics.jsonl retried it
    and raised OSError, which replaced the RunDirWriteError naming the file (the CLI: exit 1,
    a traceback). The disk is /dev/full behind a real buffered writer, from step 2 on."""
    config = load_config(write_tiny(tmp_path, budget={"steps": 4}))
    run = tmp_path / "run"

    class Full:
        def __init__(self, real):
            self.real, self.full = real, open("/dev/full", "ab")  # noqa: SIM115

        def write(self, data):
            return self.full.write(data)

        def flush(self):
            self.full.flush()

        def tell(self):
            return self.real.tell()

        def close(self):
            self.real.close()
            self.full.close()

    runner = Runner(config, run, progress=False, verbose=False)

    def fill_disk(event):
        if event.label == "sgd" and event.step == 2:
            runner.log._file = Full(runner.log._file)

    runner.on_step = fill_disk
    with pytest.raises(RunDirWriteError, match=r"metrics.jsonl': No space left on device"):
        runner.run()
    assert not [p for p in run.rglob("*.tmp")]
    assert Runner(config, run, resume=True, progress=False, verbose=False).run().exit_code == 0
    Runner(config, tmp_path / "ref", progress=False, verbose=False).run()
    _assert_bitwise(run, tmp_path / "ref")
    # the metrics of the resumed run are the uninterrupted run's, line for line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    want = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    drop = ("seconds",)
    assert [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines] == [
        {k: v for k, v in json.loads(x).items() if k not in drop} for x in want
    ]


def test_runner17_a_full_disk_at_the_resumed_config_is_a_worded_error(
    tmp_path, monkeypatch, capsys
):
    """main: `--resume DIR budget.steps=4` rewrites config.yaml (the budgets changed), and its
    fsync failing with ENOSPC raised OSError out of the run (exit 1, a traceback). Now exit 2
    naming config.yaml; the old one is untouched, no temporary is left, and the resume
    succeeds once there is room."""
    config = write_tiny(tmp_path, budget={"steps": 2})
    run = tmp_path / "run"
    assert main(["run", str(config), "--quiet", "--out", str(run)]) == 0
    before = (run / "config.yaml").read_bytes()
    real_fsync = os.fsync

    def fsync(fd):
        if "config.yaml" in os.readlink(f"/proc/self/fd/{fd}"):
            raise _enospc()
        real_fsync(fd)

    if not os.path.exists("/proc/self/fd"):  # pragma: no cover - not Linux
        pytest.skip("needs /proc/self/fd")
    monkeypatch.setattr(os, "fsync", fsync)
    err = refused(["run", "--resume", str(run), "--quiet", "budget.steps=4"], capsys)
    assert "config.yaml': No space left on device" in err
    monkeypatch.undo()
    assert (run / "config.yaml").read_bytes() == before
    assert not list(run.glob(".*.tmp"))
    assert main(["run", "--resume", str(run), "--quiet", "budget.steps=4"]) == 0
    ref = tmp_path / "ref"
    assert main(["run", str(config), "--quiet", "--out", str(ref), "budget.steps=4"]) == 0
    _assert_bitwise(run, ref)


def test_runner17_a_checkpoint_replaced_while_it_is_read_is_not_called_damaged(
    tmp_path, monkeypatch
):
    """main: load_checkpoint opened the file twice (the payload, then the note in the zip
    comment); a run replacing it between the two (atomically, as every checkpoint write) made
    a whole file read as "damaged: the versions noted in its zip comment belong to another
    content". Found by this file's torchrun test, which polls rank 0's checkpoint as the
    SIGINT test of test_train_distributed does (1 failure in its first 9 runs). Deterministic
    here: the newer checkpoint replaces the file right after the first torch.load."""
    from hessfree.train import checkpoint

    path, newer = tmp_path / "adam.pt", tmp_path / "newer.pt"
    checkpoint.save_checkpoint(path, {"step": 1})
    checkpoint.save_checkpoint(newer, {"step": 2})
    real_load = torch.load

    def load_then_replace(f, *args, **kwargs):
        out = real_load(f, *args, **kwargs)
        if newer.exists():
            os.replace(newer, path)  # the run's next checkpoint lands now
        return out

    monkeypatch.setattr(torch, "load", load_then_replace)
    assert checkpoint.load_checkpoint(path)["step"] == 1  # the file as it was when opened
    assert checkpoint.load_checkpoint(path)["step"] == 2


# -- SIGHUP under torchrun ----------------------------------------------------------------------


@pytest.mark.slow
def test_runner17_sighup_to_torchrun_checkpoints_every_rank_and_resumes(tmp_path):
    """Guard (passes on main): a terminal that closes sends SIGHUP to torchrun, whose agent
    sends it on to each rank (in sessions of their own) and waits for them (30 s, then SIGKILL).
    Each rank stops after the step they agree on, rank 0 checkpoints and writes the summary
    (`interrupted`), and torchrun then exits with its own status; a resume under torchrun
    ends as the one-process run. Synchronised on rank 0's checkpoint, never on a sleep."""
    from test_train_distributed import assert_same_training, free_port, reference, write_config

    config = write_config(
        tmp_path,
        optimizers=[{"name": "adam", "lr": 0.02}, {"name": "lbfgs", "max_iter": 3}],
        budget={"steps": 400},
        eval={"every_steps": 10},
        output={"checkpoint_every": 10, "plots": False},
        distributed={"timeout_seconds": 60},
    )
    run = tmp_path / "run"

    def torchrun(*args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "hessfree", "run", "--quiet", *args]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    proc = torchrun(str(config), "--out", str(run))
    try:
        ckpt = run / "checkpoints" / "adam.pt"
        deadline = time.monotonic() + 600  # a bound for a hang only
        while not (ckpt.exists() and load_checkpoint(ckpt)["step"] >= 20):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, err  # torchrun's own status for a signal it received
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted", err
    stopped = load_checkpoint(run / "checkpoints" / "adam.pt")
    assert not stopped["finished"] and 20 <= stopped["step"] < 400
    assert not (run / "checkpoints" / "lbfgs.pt").exists()

    proc = torchrun("--resume", str(run))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    reference(config, tmp_path / "ref")
    assert_same_training(run, tmp_path / "ref", labels=("adam", "lbfgs"))
