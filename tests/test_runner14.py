"""runner14: `hessfree run` under inputs nobody had tried (experiments/README.md, runner14).

Warnings on the command line, `~` and environment variables in the config's paths, labels
that differ only in case. Each test of a fix fails on main ee7f253 (see the commits).
"""

from __future__ import annotations

from pathlib import Path

import torch
from test_train_robust import write_tiny

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
