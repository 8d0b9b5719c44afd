"""``hessfree run`` on inputs and events nobody had tried (runner13): a top-level key that only
holds YAML anchors, the Python API resuming with a relative data path, an empty test set, and
every shipped config taking a step. In process through the CLI's ``main`` (the exit status is
the contract) or through :class:`~hessfree.train.loop.Runner` where the Python API is the
point."""

from __future__ import annotations

from pathlib import Path

import yaml
from test_train_loop import tiny_npz
from test_train_robust import refused

from hessfree.train.cli import main
from hessfree.train.config import load_config

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
