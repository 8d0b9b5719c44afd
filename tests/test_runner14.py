"""runner14: `hessfree run` under inputs nobody had tried (experiments/README.md, runner14).

Warnings on the command line, `~` and environment variables in the config's paths, labels
that differ only in case. Each test of a fix fails on main ee7f253 (see the commits).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_train_robust import refused, write_tiny

from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.cli import main


def test_runner14_resume_warnings_are_plain_lines_on_the_cli(tmp_path, capsys):
    """main showed a resume that will not be bit-identical as Python shows any warning:
    "/.../hessfree/train/loop.py:741: RuntimeWarning: checkpoint ..." and the source line
    under it, where every other message of the command is one `hessfree: ...` line. Now one
    `hessfree: warning: ...` line per checkpoint on stderr; the Python API still raises a
    RuntimeWarning (tests/test_runner13.py)."""
    config = write_tiny(tmp_path, num_threads=None, budget={"steps": 2})
    out = str(tmp_path / "run")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["run", str(config), "--out", out, "--quiet"]) == 0
        capsys.readouterr()
        torch.set_num_threads(1)
        assert main(["run", "--resume", out, "budget.steps=3", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    for line, label in zip(lines, ("adam", "sgd"), strict=True):
        assert line.startswith(f"hessfree: warning: checkpoint '{out}/checkpoints/{label}.pt'")
        assert "num_threads 2 -> 1" in line and "not bit-identically" in line
    assert load_checkpoint(Path(out) / "checkpoints" / "adam.pt")["step"] == 3


def test_runner14_a_home_directory_in_output_dir_and_out_is_expanded(tmp_path, capsys, monkeypatch):
    """main expanded `~` in `data.path` (runner12) but not in `output.dir`: `dir: ~/runs`
    made a directory literally named '~' in the working directory and put the run there;
    `--out '~/x'` (quoted, or `--out=~/x`, which the shell leaves alone) did the same. Both
    are the home directory now; nothing named '~' is created."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    config = write_tiny(tmp_path, budget={"steps": 1}, output={"dir": "~/runs", "plots": False})
    assert main(["run", str(config), "--quiet"]) == 0
    (run,) = (home / "runs").iterdir()
    assert (run / "checkpoints" / "adam.pt").is_file()
    assert main(["run", str(config), "--out=~/x", "--quiet"]) == 0
    assert (home / "x" / "summary.json").is_file()
    assert main(["run", "--resume", "~/x", "budget.steps=2", "--quiet"]) == 0
    assert load_checkpoint(home / "x" / "checkpoints" / "sgd.pt")["step"] == 2
    assert not (work / "~").exists() and not (tmp_path / "~").exists()
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "value"),
    [("output.dir", "$HOME/runs"), ("output.dir", "${TMPDIR}/runs"), ("data.path", "$PWD/d.npz")],
)
def test_runner14_an_environment_variable_in_a_path_is_refused_at_check(
    tmp_path, capsys, monkeypatch, key, value
):
    """A config is not a shell script: main took `output.dir: $HOME/runs` literally,
    passed `--check` and made a directory named '$HOME' in the working directory (and
    `data.path: $PWD/d.npz` was "not found: '/cwd/$PWD/d.npz'" only after the check). Now
    refused at `--check` naming the key, with the override the shell expands."""
    monkeypatch.chdir(tmp_path)
    section, field = key.split(".")
    config = write_tiny(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw[section][field] = value
    config.write_text(yaml.safe_dump(raw))
    for argv in (["--check"], ["--quiet"]):
        err = refused(["run", str(config), *argv], capsys)
        assert f"`{key}` = '{value}' refers to an environment variable" in err
        assert f"{key}=$HOME/..." in err
    assert not (tmp_path / "$HOME").exists() and not (tmp_path / "${TMPDIR}").exists()
    assert not (tmp_path / "runs").exists()


def test_runner14_labels_that_differ_only_in_case_are_refused(tmp_path, capsys):
    """`label: A` and `label: a` passed as distinct on main: on a file system that ignores
    case (macOS, Windows) checkpoints/A.pt and checkpoints/a.pt are one file, so the second
    entry overwrote the first's checkpoint and a resume gave both the same state."""
    config = write_tiny(
        tmp_path,
        optimizers=[
            {"name": "adam", "label": "Fast"},
            {"name": "sgd", "label": "slow"},
            {"name": "sgd", "lr": 0.5, "label": "FAST"},
        ],
    )
    err = refused(["run", str(config), "--check"], capsys)
    assert "'Fast' (optimizers.0), 'FAST' (optimizers.2) differ only in case" in err
    assert "slow" not in err


@pytest.mark.parametrize(
    ("text", "key", "quoted"),
    [
        ("name: 2026-12-04\n", "`name`", "'2026-12-04'"),
        ("optimizers: [{name: adam, label: 2026-12-04}]\n", "`optimizers.0.label`", "'2026-12-04'"),
    ],
)
def test_runner14_an_unquoted_date_is_named_as_yaml_reads_it(tmp_path, capsys, text, key, quoted):
    """`name: 2026-12-04` (a run named by its day) is a date to YAML 1.1; main said only
    "must be a string, got date datetime.date(2026, 12, 4)". The refusal now says why and
    how to quote it, as it does for yes/no/on/off (runner12)."""
    config = write_tiny(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw.pop(text.split(":")[0])
    config.write_text(yaml.safe_dump(raw) + text)
    err = refused(["run", str(config), "--check"], capsys)
    assert key in err and f"YAML reads an unquoted date as a date: quote it, e.g. {quoted}" in err


def test_runner14_a_changed_display_key_on_resume_names_the_way_out(tmp_path, capsys):
    """Decided: `output.plots` and `output.progress` stay part of the run's config (every
    checkpoint records its digest), so changing them on resume is refused as any key but
    budget.* and distributed.*; main's refusal left the user there. It now says what to do
    instead (--progress / --no-progress; plot_run afterwards), and the run is untouched."""
    config = write_tiny(tmp_path, budget={"steps": 1})
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = ["run", "--resume", str(out), "output.progress=always", "output.plots=true"]
    err = refused(argv, capsys)
    assert "these keys differ from" in err and "output.plots, output.progress" in err
    assert "pass --progress or --no-progress to this command instead" in err
    assert "hessfree.train.plots.plot_run(RUN_DIR)" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_keeps_other_libraries_warnings_in_pythons_format(capsys):
    """Only the package's own warnings become 'hessfree: warning:' lines: torch's or numpy's
    keep their source file and category (they were shown as hessfree's)."""
    import warnings

    import hessfree.damping as inside
    from hessfree.train import cli

    # a function compiled as part of the package issues one warning, pointing past itself
    code = (
        "def _issue():\n    import warnings\n    warnings.warn('ours', UserWarning, stacklevel=2)\n"
    )
    exec(compile(code, inside.__file__, "exec"), namespace := {})
    shown = []  # Python's display, as the CLI finds it
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, *args, **kwargs: shown.append(
            f"{category.__name__}: {message}"
        )
        with cli._plain_warnings():
            warnings.warn("theirs", DeprecationWarning, stacklevel=1)
            namespace["_issue"]()
    assert capsys.readouterr().err == "hessfree: warning: ours\n"
    assert shown == ["DeprecationWarning: theirs"]
