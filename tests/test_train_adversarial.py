"""The runner against a careless or adversarial user (topic "config", 2026-12-02).

Every bad config is refused before any work (exit 2, a message naming the key, the value and
what is allowed, no traceback, no run directory written); a run killed by SIGINT, SIGTERM or
SIGKILL resumes to the same parameters and metrics as an uninterrupted one; a damaged result
file is named on resume, never used. See experiments/README.md, "config (2026-12-02)".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train_loop import tiny_npz

from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.cli import main

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, name: str = "tiny.yaml", **extra) -> Path:
    """A 48-case, 3-class problem; adam and hessianfree, 6 steps each, checkpoint every 2."""
    npz = tmp_path / "tiny.npz"
    if not npz.exists():
        tiny_npz(npz)
    raw = {
        "name": "tiny",
        "seed": 3,
        "num_threads": 1,
        "data": {"name": "npz", "path": str(npz)},
        "model": {"name": "mlp", "hidden_sizes": [6]},
        "loss": {"name": "cross_entropy"},
        "optimizers": [
            {"name": "adam", "lr": 0.01, "batch_size": 16},
            {"name": "hessianfree", "cg_max_iter": 5, "batch_size": 32},
        ],
        "budget": {"steps": 6},
        "eval": {"every_steps": 1},
        "output": {"checkpoint_every": 2, "plots": False, "dir": str(tmp_path / "runs")},
    }
    raw.update(extra)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def refused(argv: list[str], capsys, tmp_path: Path) -> str:
    """Run the CLI: exit 2, one ``hessfree: error:`` message, no traceback, nothing written."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hessfree: error:") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not list((tmp_path / "runs").glob("*"))
    return err


def run_argv(config: Path, tmp_path: Path, *more: str) -> list[str]:
    return ["run", str(config), "--out", str(tmp_path / "out"), "--quiet", *more]


# -- the file itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"`data` is required"),
        (b"- name: digits\n", r"top level must be a mapping .* got list"),
        (b"name: caf\xe9\n", r"not UTF-8 text \(byte 0xe9 at offset 9\)"),
        (b"seed: 1\nseed: 2\n", r"duplicate key 'seed' \(line 2\)"),
        (b"seed: [1\n", r"not valid YAML"),
        (b"seed: !!python/object:os.system {}\n", r"not valid YAML"),
    ],
    ids=["empty", "list", "latin-1", "duplicate-key", "unclosed", "python-tag"],
)
def test_a_bad_file_is_refused_before_any_work(tmp_path, capsys, content, match):
    (tmp_path / "runs").mkdir()
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    err = refused(run_argv(path, tmp_path), capsys, tmp_path)
    assert re.search(match, err), err


def test_a_missing_file_or_a_directory_is_refused(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    err = refused(run_argv(tmp_path / "nope.yaml", tmp_path), capsys, tmp_path)
    assert "cannot read the config file: No such file" in err and "nope.yaml" in err
    err = refused(run_argv(tmp_path / "runs", tmp_path), capsys, tmp_path)
    assert "cannot read the config file: Is a directory" in err


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    config = write_config(tmp_path, output={"dir": str(blocker), "plots": False})
    err = refused(["run", str(config), "--quiet"], capsys, tmp_path)
    assert "`output.dir`: '" in err and "is a file" in err
    err = refused(["run", str(config), "--out", str(blocker / "run")], capsys, tmp_path)
    assert "`--out`" in err and "is a file" in err
    assert blocker.read_text() == "x"


# -- keys: misspelt, synonyms, in the wrong section ---------------------------------------------


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("optimizers.0.learning_rate=0.1", "did you mean `lr`?"),
        ("optimizers.1.lambda=1", "did you mean `damping`?"),
        ("optimizers.1.max_cg_iter=5", "did you mean `cg_max_iter`?"),
        ("budget.max_steps=5", "did you mean `steps`?"),
        ("steps=5", "did you mean `budget.steps`?"),
        ("checkpoint_every=5", "did you mean `output.checkpoint_every`?"),
        ("optimizer=[]", "did you mean `optimizers`?"),
    ],
)
def test_an_unknown_key_is_refused_with_the_key_meant(tmp_path, capsys, override, hint):
    (tmp_path / "runs").mkdir()
    err = refused(run_argv(write_config(tmp_path), tmp_path, override), capsys, tmp_path)
    assert "Unknown key" in err and hint in err and "allowed keys:" in err, err


# -- values only the optimizer or the data would have refused, after work began -----------------


@pytest.mark.parametrize(
    ("override", "match"),
    [
        # torch's Adam/SGD scale float32 parameters by lr (and weight_decay): beyond float32's
        # range the first step raised RuntimeError after the run directory was written.
        ("optimizers.0.lr=1e300", r"`optimizers.0.lr` = 1e\+300: torch.optim's 'adam' refuses"),
        ("optimizers.0.weight_decay=1e39", r"`optimizers.0.weight_decay` = 1e\+39"),
        ("optimizers.1.lr=1e39", r"`optimizers.1.lr` = 1e\+39: the step scales float32"),
        # SGD's constructor refuses nesterov without momentum (or with dampening).
        (
            "optimizers.0={name: sgd, nesterov: true, momentum: 0}",
            r"`optimizers.0` \(sgd\): torch.optim's 'sgd' refuses these settings together "
            r"\(Nesterov momentum requires a momentum and zero dampening\)",
        ),
        (
            "optimizers.0={name: sgd, nesterov: true, dampening: 0.5}",
            r"`optimizers.0` \(sgd\): torch.optim's 'sgd' refuses these settings together",
        ),
        # L-BFGS allocates history_size entries at its second iteration (OverflowError).
        # 10**18, not 10**30 as before runner17: past int64 a count is refused as such first.
        (
            "optimizers.0={name: lbfgs, history_size: 1000000000000000000}",
            r"`optimizers.0.history_size` = 1000000000000000000: torch's L-BFGS",
        ),
        # A generated test set beyond memory: torch.rand failed with a TypeError.
        (
            "data={name: addition, num_test: 1000000000000000000}",
            r"`data`: [0-9,]+ cases of 200 values \(10,000 train, [0-9,]+ test\) take .* memory",
        ),
    ],
)
def test_a_value_the_optimizer_refuses_is_refused_up_front(tmp_path, capsys, override, match):
    (tmp_path / "runs").mkdir()
    err = refused(run_argv(write_config(tmp_path), tmp_path, override), capsys, tmp_path)
    assert re.search(match, err), err


def test_a_float32_range_value_is_accepted_in_float64(tmp_path, capsys):
    config = write_config(tmp_path, dtype="float64")
    assert main(run_argv(config, tmp_path, "optimizers.0.lr=1e300", "--check")) == 0


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optimizers.0.batch_size=49", r"batch_size 49 exceeds the 48 training cases"),
        ("optimizers.1.curvature_batch_size=33", r"curvature_batch_size` = 33 exceeds its"),
        ("optimizers.1.cg_max_iter=0", r"`optimizers.1.cg_max_iter` = 0"),
        ("optimizers.1.damping=-1", r"`optimizers.1.damping` = -1"),
        ("budget.steps=0", r"`budget.steps` must be an int >= 1, got 0"),
        ("budget={seconds: 0}", r"`budget.seconds` must be in \(0.0, inf\), got 0.0"),
        ("budget.steps=yes", r"`budget.steps` must be an integer, got bool True"),
        ("budget.steps='1e3'", r"`budget.steps` must be an integer, got str '1e3'"),
        ("budget.seconds=.nan", r"`budget.seconds` must be in .*, got nan"),
        ("optimizers.1.damping=null", r"`optimizers.1.damping` = None"),
        ("optimizers.0.lr=[0.1]", r"`optimizers.0.lr` must be a number, got list"),
        # A required key given as null passed and raised TypeError when the data loaded.
        ("data.path=null", r"`data.path` is required, got null \(the .npz file"),
    ],
)
def test_numbers_that_would_fail_later_are_refused_up_front(tmp_path, capsys, override, match):
    (tmp_path / "runs").mkdir()
    err = refused(run_argv(write_config(tmp_path), tmp_path, override), capsys, tmp_path)
    assert re.search(match, err), err


# -- resume: killed runs, changed configs, damaged files ----------------------------------------

CHILD = """\
import sys
from hessfree.train import cli, loop

STOP = (sys.argv[1], int(sys.argv[2]))
init = loop.Runner.__init__


def patched(self, *args, **kwargs):
    init(self, *args, **kwargs)

    def on_step(event):
        if (event.label, event.step) == STOP:
            print("at", *STOP, flush=True)  # the parent signals now
            sys.stdin.readline()  # ... and closes stdin after it (SIGKILL: never returns)

    self.on_step = on_step


loop.Runner.__init__ = patched
sys.exit(cli.main(sys.argv[3:]))
"""


def untimed(value):
    """``value`` without wall-clock fields (``seconds``, ``hf_time_*``) at any depth."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k != "seconds" and "time" not in k}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def final_state(run_dir: Path) -> tuple[dict, list, dict]:
    """Final parameters per optimizer, the metrics and the summary, less wall-clock fields."""
    params = {
        p.stem: load_checkpoint(p)["model"] for p in sorted((run_dir / "checkpoints").glob("*"))
    }
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    summary = json.loads((run_dir / "summary.json").read_text())
    return params, untimed([json.loads(line) for line in lines]), untimed(summary)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("full")
    config = write_config(tmp_path)
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    return final_state(tmp_path / "run")


@pytest.mark.slow  # a child process: ~2 s of CPU to import torch before the run
@pytest.mark.parametrize(
    ("signum", "label", "step", "code"),
    [
        (signal.SIGKILL, "hessianfree", 3, -signal.SIGKILL),
        (signal.SIGTERM, "adam", 5, 143),
        (signal.SIGINT, "hessianfree", 1, 130),
    ],
    ids=["SIGKILL", "SIGTERM", "SIGINT"],
)
def test_a_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path, capsys, uninterrupted, signum, label, step, code
):
    """The child stops in its step callback and says so; the parent signals it there, so the
    kill lands at the same point every time (SIGINT/SIGTERM: the step finishes, checkpoints,
    exits 130/143; SIGKILL: the last checkpoint is the one at the step before)."""
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    argv = ["run", str(config), "--out", str(run_dir), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, label, str(step), *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert child.stdout.readline() == f"at {label} {step}\n".encode()
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)  # closes stdin: the step callback returns
    finally:
        child.kill()
    assert child.returncode == code, err.decode()
    assert b"Traceback" not in err
    # Rerunning the same command does not overwrite the run: it points to --resume.
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(argv) == 2
    assert f"--resume {run_dir}" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    params, records, summary = final_state(run_dir)
    full_params, full_records, full_summary = uninterrupted
    assert params.keys() == full_params.keys() == {"adam", "hessianfree"}
    for opt in params:
        for key in params[opt]:
            assert torch.equal(params[opt][key], full_params[opt][key]), (opt, key)
    assert records == full_records  # no duplicate, missing or half lines
    assert summary == full_summary


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A run stopped (as by SIGINT, in this process) after adam's step 3; its config file."""
    from hessfree.train import loop

    config = write_config(tmp_path)
    init = loop.Runner.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.on_step = lambda ev: self.request_stop() if ev.step == 3 else None

    with monkeypatch.context() as patch:
        patch.setattr(loop.Runner, "__init__", patched)
        assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 130
    return config, tmp_path / "run"


def test_a_flipped_byte_in_the_metrics_is_named_on_resume(interrupted, capsys):
    _, run_dir = interrupted
    metrics = run_dir / "metrics.jsonl"
    for old, new in ((b'"step": 2', b'"step": 7'), (b'"step": 2', b'"step": 2}')):
        data = metrics.read_bytes()
        metrics.write_bytes(data.replace(old, new, 1))  # still JSON, then no longer JSON
        assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "metrics.jsonl' differs from what checkpoint" in err and "Traceback" not in err
        assert "Restore it from a copy, or start a new run" in err
        metrics.write_bytes(data)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0


def test_a_changed_config_on_resume_is_refused(interrupted, capsys):
    config, run_dir = interrupted
    for argv in (
        ["run", str(config), "--resume", str(run_dir), "optimizers.0.lr=0.02"],
        ["run", "--resume", str(run_dir), "seed=4"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "these keys differ from" in err and "Only budget.* and distributed.*" in err
    saved = run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("lr: 0.01", "lr: 0.02"))
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    assert "was written for a different config" in capsys.readouterr().err


# -- the command line -------------------------------------------------------------------------


@pytest.mark.slow  # two child processes: ~2 s of CPU each to import torch
def test_python_m_hessfree_exit_codes():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, code in ((["--help"], 0), ([], 2)):  # the others: test_train_cli, in process
        done = subprocess.run(
            [sys.executable, "-m", "hessfree", *args], capture_output=True, env=env, timeout=60
        )
        assert done.returncode == code, (args, done.stderr.decode())
        assert b"Traceback" not in done.stderr
