"""The ``hessfree`` command: help, exit codes, overrides, resume checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hessfree.train.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_yaml(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"num_threads: 1\ndata: {{name: npz, path: '{tmp_path / 'd.npz'}'}}\n"
        "model: {name: mlp, hidden_sizes: [4]}\nloss: {name: cross_entropy}\n"
        "optimizers: [{name: sgd, lr: 0.1}]\nbudget: {steps: 4}\nbatch_size: 10\n"
        "eval: {every_steps: 2}\noutput: {plots: false}\n"
    )
    return path


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--out",
        "--resume",
        "--check",
        "--progress",
        "--no-progress",
        "--quiet",
        "key=value",
        "optimizers.0.damping=10",
        "exit codes",
        "130",
        "143",
    ):
        assert option in text, option


def test_cli_config_errors_exit_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "data: {name: digits}\nmodel: {name: mlp, hiden: 3}\noptimizers: [{name: adam, lr: -1}]\n"
        "budget: {steps: zero}\n"
    )
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        "3 problems" in err
        and "`model.hiden`" in err
        and "`optimizers.0.lr`" in err
        and "`budget.steps`" in err
    )


def test_cli_bad_override_and_missing_file_exit_2(tiny_yaml, tmp_path, capsys):
    assert main(["run", str(tiny_yaml), "budget.stpes=3"]) == 2
    assert "did you mean `steps`" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(tiny_yaml, tmp_path):
    for argv in (
        ["run"],
        ["run", "a.yaml", "b.yaml"],
        ["run", str(tiny_yaml), "--out", "x", "--resume", "y"],
        ["nope"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv


def test_cli_data_error_exits_2(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(
        f"data: {{name: mnist, path: '{tmp_path / 'mnist.pkl.gz'}'}}\n"
        "model: {name: mlp}\noptimizers: [{name: adam}]\nbudget: {steps: 1}\n"
    )
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "MNIST not found" in err and "Traceback" not in err


def test_cli_check_prints_resolved_config(tiny_yaml, capsys):
    assert main(["run", str(tiny_yaml), "--check", "optimizers.0.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "momentum: 0.9" in out


def test_cli_run_and_resume(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    # Options may sit between the config and the overrides.
    assert main(["run", str(tiny_yaml), "--out", str(out), "--quiet", "seed=3"]) == 0
    assert capsys.readouterr().out == ""
    saved = (out / "config.yaml").read_text()
    assert (
        saved.startswith("# Resolved by hessfree")
        and "with overrides: seed=3" in saved
        and "seed: 3" in saved
    )
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    # A resume whose config or overrides differ from the saved one is refused.
    assert main(["run", str(tiny_yaml), "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "these keys differ" in err and ": seed." in err
    assert main(["run", "--resume", str(out), "optimizers.0.lr=0.2"]) == 2
    assert "optimizers.0.lr" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_cli_subprocess_python_m_hessfree(tmp_path, tiny_yaml):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "data: {name: digits}\nmodel: {name: mlp}\noptimizers: [{name: adam}]\nbudegt: {}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hessfree", "run", str(bad)], capture_output=True, env=env, text=True
    )
    assert proc.returncode == 2
    assert "did you mean `budget`" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "hessfree", "--help"], capture_output=True, env=env, text=True
    )
    assert proc.returncode == 0 and "hessfree run --help" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "hessfree", "run", str(tiny_yaml), "--out", str(tmp_path / "r")],
        capture_output=True,
        env=env,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "optimizer" in proc.stdout and (tmp_path / "r" / "summary.json").exists()


def test_cli_resume_extends_a_finished_run_under_a_larger_budget(tiny_yaml, tmp_path, capsys):
    out, straight = tmp_path / "run", tmp_path / "straight"
    assert main(["run", str(tiny_yaml), "--out", str(out), "--quiet"]) == 0
    assert main(["run", "--resume", str(out), "--quiet", "budget.steps=8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizers"]["sgd"]["steps"] == 8
    assert "steps: 8" in (out / "config.yaml").read_text()
    # the same as a run with that budget from the start (step budgets are bit-identical)
    assert main(["run", str(tiny_yaml), "--out", str(straight), "--quiet", "budget.steps=8"]) == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == (
        (straight / "metrics.jsonl").read_text().count("\n")
    )
    from hessfree.train.checkpoint import load_checkpoint

    a = load_checkpoint(out / "checkpoints" / "sgd.pt")["model"]
    b = load_checkpoint(straight / "checkpoints" / "sgd.pt")["model"]
    assert all(a[k].equal(b[k]) for k in a)
    # resuming again as saved is a no-op; the per-optimizer budget key may change too
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert main(["run", "--resume", str(out), "--quiet", "optimizers.0.budget.steps=10"]) == 0
    assert json.loads((out / "summary.json").read_text())["optimizers"]["sgd"]["steps"] == 10
    # other keys stay refused
    assert main(["run", "--resume", str(out), "--quiet", "seed=5", "budget.steps=12"]) == 2
    err = capsys.readouterr().err
    assert ": seed." in err and "budget" not in err.split("differ from")[1].split(".")[0]


def test_a_rank_whose_destroyed_group_lives_on_leaves_without_the_teardown(monkeypatch, tmp_path):
    """While the process group a run destroyed is still alive (torch keeps it once its first
    optimizer imported torch._dynamo), main() ends the process with its exit code rather than
    returning into an interpreter teardown that can abort gloo; otherwise it returns."""
    import weakref

    from hessfree.train import cli, parallel

    class Left(Exception):
        pass

    def fake_exit(code):
        raise Left(code)

    class StandIn:  # a group torch kept alive
        pass

    kept = StandIn()
    monkeypatch.setattr(parallel, "_destroyed_group", weakref.ref(kept))
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(Left) as left:
        main(["run", missing, "--quiet"])
    assert left.value.args == (2,)  # the config error's code, not a teardown's
    del kept
    assert main(["run", missing, "--quiet"]) == 2
