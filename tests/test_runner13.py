"""``hessfree run`` on inputs and events nobody had tried (runner13): a top-level key that only
holds YAML anchors, the Python API resuming with a relative data path, an empty test set, and
every shipped config taking a step. In process through the CLI's ``main`` (the exit status is
the contract) or through :class:`~hessfree.train.loop.Runner` where the Python API is the
point."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_train_loop import tiny_npz
from test_train_robust import refused, write_tiny

from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.cli import main
from hessfree.train.config import ConfigError, load_config
from hessfree.train.loop import Runner

REPO = Path(__file__).resolve().parents[1]

ANCHORED = """\
name: anchored
num_threads: 1
x-common: &c
  lr: 0.02
  batch_size: 16
data: {name: npz, path: PATH}
model: {name: mlp, hidden_sizes: [4]}
loss: {name: cross_entropy}
optimizers:
  - {<<: *c, name: adam}
  - {<<: *c, name: sgd, label: slow, lr: 0.001}
budget: {steps: 2}
output: {plots: false}
"""


def _anchored(tmp_path: Path, key: str = "x-common") -> Path:
    path = tmp_path / "anchored.yaml"
    text = ANCHORED.replace("PATH", str(tiny_npz(tmp_path / "d.npz")))
    path.write_text(text.replace("x-common:", f"{key}:"))
    return path


def test_runner13_a_top_level_x_key_holds_yaml_anchors(tmp_path, capsys):
    """main: `x-common: &c {...}` (the docker-compose convention) was refused as an unknown
    key, so shared values had to live inside an entry. Oracle: PyYAML's own merge of the same
    text gives each entry's resolved values; the `x-` key itself reaches nothing."""
    path = _anchored(tmp_path)
    assert main(["run", str(path), "--check"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert "x-common" not in resolved
    merged = yaml.safe_load(path.read_text())["optimizers"]
    for got, want in zip(resolved["optimizers"], merged, strict=True):
        assert (got["lr"], got["batch_size"]) == (want["lr"], want["batch_size"])
    assert [o["lr"] for o in resolved["optimizers"]] == [0.02, 0.001]  # the own key wins
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    assert load_config(out / "config.yaml").optimizers[0].hyperparameters["lr"] == 0.02


def test_runner13_an_anchor_key_without_x_says_how_to_hold_anchors(tmp_path, capsys):
    """main: "Unknown key `common`; allowed keys: ..." with no word of where anchors may live.
    Other top-level misspellings still get their suggestion."""
    err = refused(["run", str(_anchored(tmp_path, "common")), "--check"], capsys)
    assert "Unknown key `common`" in err and "starting with `x-` is ignored" in err
    err = refused(["run", str(_anchored(tmp_path)), "--check", "budegt.steps=3"], capsys)
    assert "did you mean `budget`?" in err


def test_runner13_an_override_of_an_x_key_is_refused_since_it_would_change_nothing(
    tmp_path, capsys
):
    """The file's aliases are expanded when it is read, so `x-common.lr=0.5` would leave every
    entry's lr as it was, silently; it is refused, pointing at the key to override."""
    err = refused(["run", str(_anchored(tmp_path)), "--check", "x-common.lr=0.5"], capsys)
    assert "x-common.lr=0.5" in err and "would change nothing" in err
    assert "optimizers.0.lr" in err


def _quiet(config, run_dir, **options) -> Runner:
    return Runner(config, run_dir, verbose=False, progress=False, **options)


def test_runner13_python_resume_with_a_relative_data_path_is_the_same_run(tmp_path, monkeypatch):
    """main: `Runner(load_config(c.yaml), DIR, resume=True)` with `data.path: d.npz` was
    refused ("checkpoint ... written for a different config"): the run recorded the path
    absolute, the config read again has it relative. The CLI resumed. Oracle: the same run
    uninterrupted, bitwise, through the Python API and the CLI alike."""
    tiny_npz(tmp_path / "d.npz")
    config = write_tiny(tmp_path, data={"name": "npz", "path": "d.npz"}, budget={"steps": 6})
    monkeypatch.chdir(tmp_path)
    assert _quiet(load_config(config), "whole").run().exit_code == 0
    for cut in ("py", "cli"):
        assert _quiet(load_config(config, ["budget.steps=3"]), cut).run().exit_code == 0
    assert _quiet(load_config(config), "py", resume=True).run().exit_code == 0
    assert main(["run", str(config), "--resume", "cli", "--quiet"]) == 0
    for cut in ("py", "cli"):
        for label in ("adam", "sgd"):
            whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / f"{label}.pt")
            got = load_checkpoint(tmp_path / cut / "checkpoints" / f"{label}.pt")
            assert got["step"] == whole["step"] == 6
            assert all(
                np.array_equal(whole["model"][k].numpy(), got["model"][k].numpy())
                for k in whole["model"]
            ), (cut, label)


def test_runner13_python_resume_with_another_config_names_the_keys(tmp_path):
    """main: the Python API refused a changed config only through the checkpoint's digest
    ("written for a different config"), not saying which key; the CLI named the keys. Both
    now name them (and an interrupted run without a checkpoint yet is refused alike)."""
    config = write_tiny(tmp_path, budget={"steps": 4})
    assert _quiet(load_config(config, ["budget.steps=2"]), tmp_path / "run").run().exit_code == 0
    other = load_config(config, ["optimizers.1.lr=0.5", "seed=3"])
    with pytest.raises(ConfigError) as info:
        _quiet(other, tmp_path / "run", resume=True).run()
    message = str(info.value)
    assert "these keys differ" in message and "seed, optimizers.1.lr" in message
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "sgd.pt")["step"] == 2  # untouched


def test_runner13_an_empty_test_set_is_named_as_such(tmp_path, capsys):
    """main: an npz with zero test cases and integer labels was refused with "npz train:
    integer labels need `num_classes`" (the count is inferred from both splits), blaming the
    train labels and a key the user never needed. Now the empty split is named."""
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "e.npz",
        x_train=rng.normal(size=(40, 3)).astype(np.float32),
        y_train=rng.integers(0, 2, 40),
        x_test=np.zeros((0, 3), np.float32),
        y_test=np.zeros(0, np.int64),
    )
    config = write_tiny(tmp_path, data={"name": "npz", "path": str(tmp_path / "e.npz")})
    err = refused(["run", str(config), "--quiet", "--out", str(tmp_path / "r")], capsys)
    assert "npz test inputs" in err and "at least one case, got (0, 3)" in err
    assert "num_classes" not in err
    assert not (tmp_path / "r").exists()


#: Per shipped config: smaller generated data (the sizes' checks still pass), so one step of
#: every entry takes seconds. mnist_autoencoder reads a file the repository does not ship.
SHRINK = {
    "curves_adam_then_hf": ["data.num_train=300", "data.num_test=50"],
    "curves_autoencoder": [
        "data.num_train=300",
        "data.num_test=50",
        "optimizers.0.phases.2.batch_size=250",
        "optimizers.0.phases.2.batch_max=300",
    ],
    "digits_mlp": [],
    "mnist1d_mlp": ["data.num_samples=400"],
    "quickstart": [],
    "rnn_addition": ["data.num_train=1000", "data.num_test=50"],
}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_runner13_every_shipped_config_takes_a_step(path, tmp_path, capsys):
    """Each shipped config runs one step of every entry (every phase entry's first phase) to
    the end: summary and checkpoints written, exit 0. A missing MNIST file is exit 2."""
    pytest.importorskip("hessfree.optimizer")
    out = tmp_path / "run"
    argv = ["run", str(path), "--out", str(out), "--quiet", "budget.steps=1"]
    argv += ["output.plots=false", "eval.every_steps=1", "eval.every_seconds=null", "num_threads=1"]
    if path.stem not in SHRINK:
        assert path.stem == "mnist_autoencoder", "a new shipped config: add it to SHRINK"
        if not (REPO / "data").exists():
            err = refused([*argv, f"data.path={tmp_path / 'none.pkl.gz'}"], capsys)
            assert "MNIST not found" in err
            return
    code = main(argv + SHRINK.get(path.stem, []))
    assert code == 0, capsys.readouterr().err
    config = load_config(out / "config.yaml")
    for entry in config.optimizers:
        assert load_checkpoint(out / "checkpoints" / f"{entry.label}.pt")["step"] == 1


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symlinks")
def test_runner13_a_symlink_to_an_empty_directory_is_a_run_directory(tmp_path, capsys):
    """main: `--out LINK` (LINK -> an empty directory) passed the check, loaded the data, then
    failed to create the run ("cannot create the run directory 'LINK': Not a directory", exit
    2): the finished directory is renamed into place, and a directory cannot replace the link.
    Now the run lands in the linked directory (the link stays and leads to it), with the same
    checkpoints as a run in a plain directory (the oracle), and resumes through the link."""
    config = write_tiny(tmp_path, budget={"steps": 4})
    (tmp_path / "target").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target", target_is_directory=True)
    assert main(["run", str(config), "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    assert main(["run", str(config), "--out", str(link), "--quiet", "budget.steps=2"]) == 0
    assert link.is_symlink() and (tmp_path / "target" / "config.yaml").is_file()
    assert main(["run", "--resume", str(link), "--quiet", "budget.steps=4"]) == 0
    for label in ("adam", "sgd"):
        plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / f"{label}.pt")["model"]
        linked = load_checkpoint(tmp_path / "target" / "checkpoints" / f"{label}.pt")["model"]
        assert all(np.array_equal(plain[k].numpy(), linked[k].numpy()) for k in plain)
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symlinks")
def test_runner13_a_dangling_symlink_as_run_directory_is_named_at_check(tmp_path, capsys):
    """main: "cannot create the run directory 'LINK' (in '.'): File exists" - the probe's
    mkdir on the dangling link. Now the link and its missing target are named, at --check
    and before a run loads anything; nothing is created."""
    config = write_tiny(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    for extra in (["--check"], ["--quiet"]):
        err = refused(["run", str(config), "--out", str(link), *extra], capsys)
        assert "symbolic link to" in err and "nowhere" in err and "does not exist" in err
    assert not (tmp_path / "nowhere").exists() and link.is_symlink()


def test_runner13_a_resume_with_another_thread_count_says_it_is_not_bitwise(tmp_path):
    """The promise is bitwise continuation on the same arithmetic. main resumed a run started
    under 2 threads with 1 (config `num_threads: null`, torch's setting) without a word;
    now each checkpoint records torch's and hessfree's versions, the thread count and the
    kernels, and a resume that differs warns naming what changed. The same resume again,
    under the same arithmetic, is silent."""
    import warnings

    import torch

    config = write_tiny(tmp_path, num_threads=None, budget={"steps": 2})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _quiet(load_config(config), tmp_path / "run").run().exit_code == 0
        torch.set_num_threads(1)
        longer = load_config(config, ["budget.steps=3"])
        with pytest.warns(RuntimeWarning, match=r"num_threads 2 -> 1.*not bit-identically"):
            assert _quiet(longer, tmp_path / "run", resume=True).run().exit_code == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            longest = load_config(config, ["budget.steps=4"])
            assert _quiet(longest, tmp_path / "run", resume=True).run().exit_code == 0
    finally:
        torch.set_num_threads(threads)
    recorded = load_checkpoint(tmp_path / "run" / "checkpoints" / "adam.pt")["arithmetic"]
    assert recorded["num_threads"] == 1 and recorded["torch"] == str(torch.__version__)


def test_runner13_runs_started_in_the_same_second_take_distinct_default_directories(
    tmp_path, monkeypatch
):
    """main: two runs started in the same second name the same default directory
    (`<output.dir>/<name>-<time>`); the second was refused after loading its data ("not
    empty", or "cannot create ...: Directory not empty" when both passed the check), exit 2 -
    seen with three `hessfree run` started at once. Now it takes the next free name. Both
    moments are replayed: the name taken before the check, and between check and creation."""
    import hessfree.train.loop as loop

    config = write_tiny(tmp_path)
    first = _quiet(load_config(config), None)
    assert _quiet(load_config(config), first.run_dir).run().exit_code == 0  # takes its name
    assert first.run().exit_code == 0
    assert first.run_dir.name.endswith("-2") and (first.run_dir / "summary.json").is_file()

    real, raced = loop.prepare_run_dir, []

    def taken_meanwhile(run_dir, *args, **kwargs):
        if not raced:  # another run creates the directory after this one's check
            raced.append(run_dir)
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text("name: other\n")
        return real(run_dir, *args, **kwargs)

    monkeypatch.setattr(loop, "prepare_run_dir", taken_meanwhile)
    second = _quiet(load_config(config), None)
    assert second.run().exit_code == 0
    assert second.run_dir != raced[0] and (second.run_dir / "summary.json").is_file()
    assert (raced[0] / "config.yaml").read_text() == "name: other\n"  # the other's, untouched
