"""runner15: `hessfree run` under inputs and events nobody had tried (experiments/README.md,
runner15).

YAML 1.1's numbers that YAML 1.2 reads otherwise, strings where numbers go, a read-only run
directory on resume, a label too long for a file name, a checkpoint of another format, a new
run on a directory another process writes. Each test of a fix fails on main bc2d33f (see the
commits); the `007`/`1_000` test is a guard.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_train_robust import refused, write_tiny

from hessfree.train.checkpoint import load_checkpoint, save_checkpoint
from hessfree.train.cli import main
from hessfree.train.config import load_config
from hessfree.train.loop import Runner
from hessfree.train.rundir import CHECKPOINT_FORMAT, RunDirError, lock_run_dir


@pytest.mark.parametrize(
    ("line", "key", "shown", "yaml11"),
    [
        ("budget: {seconds: 1:30}", "budget.seconds", "1:30", 90),
        ("budget: {steps: 1:30}", "budget.steps", "1:30", 90),
        ("seed: 017", "seed", "017", 15),
        ("seed: -017", "seed", "-017", -15),
        ("optimizers: [{name: adam, lr: 1:30.5}]", "optimizers.0.lr", "1:30.5", 90.5),
        ("optimizers: [{name: adam, label: '1', betas: [0.9, 1:59]}]", "optimizers.0.betas.1",
         "1:59", 119),
    ],
)  # fmt: skip
def test_runner15_yaml11_base60_and_octal_numbers_are_refused_naming_the_key(
    tmp_path, capsys, line, key, shown, yaml11
):
    """PyYAML (YAML 1.1) reads `1:30` as 90 (base 60) and `017` as 15 (octal); YAML 1.2 and a
    reader take the text '1:30' and 17. main ran them silently as 90 (a 90-step or 90-second
    budget, lr 5430.5) and seed 15. Now refused at `--check`, naming the key, the text as
    written, the YAML 1.1 reading (oracle: `yaml.safe_load`) and what to write; nothing is
    created."""
    config = write_tiny(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw.pop(line.partition(":")[0], None)  # the line replaces the section
    config.write_text(yaml.safe_dump(raw) + line + "\n")
    # the oracle: PyYAML's own YAML 1.1 reading of the same line
    node = yaml.safe_load(line)
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    assert node == yaml11
    err = refused(["run", str(config), "--check"], capsys)
    assert f"`{key}` = {shown} is read by YAML 1.1" in err, err
    assert f"as {yaml11!r}" in err and "YAML 1.2" in err
    assert not (tmp_path / "runs").exists()


def test_runner15_a_leading_zero_that_changes_nothing_and_underscores_still_run(tmp_path, capsys):
    """`007` is 7 under YAML 1.1 and 1.2 alike, `1_000` is 1000 as Python reads it: both keep
    running (a guard: the refusal above is only for readings that differ)."""
    config = write_tiny(tmp_path)
    config.write_text(config.read_text() + "seed: 007\n")  # write_tiny sets no seed
    assert main(["run", str(config), "--check", "eval.max_cases=1_000"]) == 0
    out = capsys.readouterr().out
    assert "seed: 7\n" in out and "max_cases: 1000" in out


@pytest.mark.parametrize(
    ("override", "note"),
    [
        ("seed=0o17", "`seed` must be an integer, got str '0o17' (text, not a number: write 15"),
        ("seed=08", "got str '08' (text, not a number: write 8 unquoted"),
        ("optimizers.0.lr=.5e3", "got str '.5e3' (text, not a number: write 500.0 unquoted"),
        ("budget.seconds=5m", "got str '5m' (seconds are a plain number: write 300 for '5m')"),
        ("eval.every_seconds=2 min", "(seconds are a plain number: write 120 for '2 min')"),
        ("data.name=off", "`data.name` = False (YAML reads unquoted yes/no/on/off/true/false"),
        ("optimizers.0.name=hessianfree", None),
    ],
)
def test_runner15_numbers_yaml11_leaves_as_text_and_booleans_say_why(
    tmp_path, capsys, override, note
):
    """main refused these with the bare type ("got str '0o17'", "Unknown dataset `data.name`
    = False", "`precond` ... got bool"), the value YAML made of them and not why; each message
    now says how YAML read it and what to write."""
    config = write_tiny(tmp_path)
    if note is None:  # an HF entry: `precond: off` is the boolean False
        err = refused(["run", str(config), "--check", override, "optimizers.0.precond=off"], capsys)
        note = "`optimizers.0.precond` = False (YAML reads unquoted yes/no/on/off/true/false"
    else:
        err = refused(["run", str(config), "--check", override], capsys)
    assert note in err, err


def _immutable(paths: list[Path], on: bool) -> bool:
    """`chattr +i` (or -i): read-only even to root, where permission bits do not bind."""
    if shutil.which("chattr") is None:
        return False
    flag = "+i" if on else "-i"
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, check=False)
    return done.returncode == 0


def test_runner15_resume_in_a_read_only_run_directory_is_refused_before_work(tmp_path, capsys):
    """main loaded the data and then died with a traceback (exit 1) at its first write:
    `PermissionError` at `metrics.jsonl`'s touch for a finished run, at `config.yaml`'s
    rewrite under a raised budget. Now `--resume` (and `--check`, and the Python API's
    Runner) refuse it with exit 2 naming the directory, before the data is loaded; every
    file is unchanged. Made read-only by `chattr +i`, which binds root too (the suite runs
    as root here); skipped where chattr is unavailable."""
    config = write_tiny(tmp_path, budget={"steps": 1})
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    locked = [out, out / "checkpoints", out / "metrics.jsonl"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if not _immutable(locked, on=True):
        pytest.skip("chattr +i is not available here")
    try:
        for extra in ([], ["budget.steps=2"], ["budget.steps=2", "--check"]):
            err = refused(["run", "--resume", str(out), *extra], capsys)
            assert f"cannot resume '{out}': no file can be created in '{out}'" in err, err
        _immutable([out, out / "checkpoints"], on=False)  # only metrics.jsonl stays read-only
        err = refused(["run", "--resume", str(out), "budget.steps=2"], capsys)
        assert f"'{out / 'metrics.jsonl'}' cannot be opened for appending" in err, err
        cfg = load_config(out / "config.yaml", ["budget.steps=2"])
        with pytest.raises(RunDirError, match="cannot be opened for appending"):
            Runner(cfg, out, resume=True, verbose=False, progress=False).run()
    finally:
        _immutable(locked, on=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_runner15_a_label_too_long_for_a_file_name_is_refused_at_check(tmp_path, capsys):
    """A label names `checkpoints/<label>.pt`, written through `.<label>.pt.<pid>.<8 hex>.tmp`.
    main accepted a 240-character label: the first contender trained to the end, then the
    second's first checkpoint failed ("File name too long", exit 2 after the work). Now
    refused at `--check` above 230 characters, where the temporary's name reaches 255 bytes
    with a 7-digit pid (the oracle: this file system refuses 256 bytes, takes 255)."""
    longest = f".{'a' * 230}.pt.4194304.{'0' * 8}.tmp"
    assert len(longest) == 255
    (tmp_path / longest).touch()
    with pytest.raises(OSError, match="too long"):
        (tmp_path / ("b" + longest)).touch()
    config = write_tiny(tmp_path)
    err = refused(["run", str(config), "--check", f"optimizers.1.label={'a' * 231}"], capsys)
    assert "`optimizers.1.label` has 231 characters, more than the 230" in err, err
    out = tmp_path / "run"
    label = "a" * 230
    argv = ["run", str(config), "--out", str(out), "--quiet", f"optimizers.1.label={label}"]
    assert main([*argv, "budget.steps=1"]) == 0
    assert (out / "checkpoints" / f"{label}.pt").is_file()


@pytest.mark.parametrize(("written", "way"), [(2, "upgrade hessfree"), (0, "version that wrote")])
def test_runner15_a_checkpoint_of_another_format_names_the_format_and_the_writer(
    tmp_path, capsys, written, way
):
    """main refused a checkpoint of another format with "was written for a different config
    (or format); resume with the run's own config.yaml", which sends the user to the config
    when the package differs. Now it names the format found, the hessfree version recorded
    in the checkpoint, the format this one reads and which side to change."""
    config = write_tiny(tmp_path, budget={"steps": 1})
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    path = out / "checkpoints" / "adam.pt"
    ckpt = load_checkpoint(path)
    ckpt["format"] = written
    ckpt["arithmetic"] = {**ckpt["arithmetic"], "hessfree": "9.9.9"}
    save_checkpoint(path, ckpt)
    err = refused(["run", "--resume", str(out), "budget.steps=2"], capsys)
    assert f"'{path}' has checkpoint format {written}, written by hessfree 9.9.9" in err, err
    assert f"reads format {CHECKPOINT_FORMAT} only" in err and way in err
    assert "different config" not in err


def test_runner15_a_new_run_on_a_directory_another_process_writes_says_so(tmp_path, capsys):
    """Two `hessfree run --out same` started together: the one that lost the race was told
    "not empty; resume it with --resume same" while the other was still writing (and that
    resume would then be refused as in use). Now both the check and the run name the process
    that holds the directory's lock (here this test's own lock, taken as a run takes it) and
    say to choose another directory or wait; once released, the old advice returns."""
    config = write_tiny(tmp_path, budget={"steps": 1})
    out = tmp_path / "same"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    held = lock_run_dir(out)
    try:
        for extra in (["--check"], ["--quiet"]):
            err = refused(["run", str(config), "--out", str(out), *extra], capsys)
            assert (
                f"'{out}' is being written by another hessfree process (pid {os.getpid()} on" in err
            )
    finally:
        held.close()
    err = refused(["run", str(config), "--out", str(out)], capsys)
    assert f"'{out}' is not empty; resume it with --resume {out}" in err, err
