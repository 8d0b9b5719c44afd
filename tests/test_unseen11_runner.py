"""``hessfree run`` on cases nobody had tried (unseen11): no matplotlib, a second process on a
run directory in use, a diverged model's accuracy. In process through the CLI's ``main``."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
from test_train_robust import snapshot, write_tiny

from hessfree.train.cli import main
from hessfree.train.config import load_config
from hessfree.train.loop import Runner
from hessfree.train.metrics import read_metrics

fcntl = pytest.importorskip("fcntl")  # the lock is POSIX's flock


def test_unseen11_without_matplotlib_the_run_ends_with_a_warning_not_a_traceback(
    tmp_path, capsys, monkeypatch
):
    """main: the run trained, wrote its summary, then raised ModuleNotFoundError (exit 1)."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = tmp_path / "run"
    config = write_tiny(tmp_path, output={"plots": True, "checkpoint_every": 2})
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: matplotlib cannot be imported" in err and "output.plots=false" in err
    assert "Traceback" not in err and err.count("matplotlib cannot") == 1
    assert (run / "summary.json").is_file() and not list(run.glob("*.png"))


def _hold(run) -> object:
    """Lock ``run`` as another process would: flock on a second open file description."""
    f = open(run / ".lock", "a+")  # noqa: SIM115
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def test_unseen11_a_run_directory_in_use_is_refused_and_left_untouched(tmp_path, capsys):
    """main: a --resume while the run (or another resume) was going wrote into the same
    directory and removed the other process's in-flight temporary files as leftovers of a
    killed write (seen: the first process then died with FileNotFoundError, exit 1)."""
    run = tmp_path / "run"
    config = write_tiny(tmp_path, budget={"steps": 4})
    held_during_run = []

    def probe(event) -> None:  # the lock is held while the run writes
        try:
            _hold(run).close()
            held_during_run.append(False)
        except BlockingIOError:
            held_during_run.append(True)

    Runner(load_config(config), run, verbose=False, on_step=probe).run()
    assert held_during_run and all(held_during_run)
    before = snapshot(run)
    holder = _hold(run)  # released by the finished run: another process can take it
    try:
        assert main(["run", "--resume", str(run), "--quiet"]) == 5  # runner12: its own status
        err = capsys.readouterr().err
        assert "is in use by another hessfree process" in err and "Traceback" not in err
        assert snapshot(run) == before
    finally:
        holder.close()
    assert main(["run", "--resume", str(run), "--quiet"]) == 0  # released: resumes


def test_unseen11_a_diverged_model_reports_no_accuracy(tmp_path):
    """main: an SGD run blown up to NaN losses logged accuracies of its NaN logits (argmax
    picks the NaN), and the summary's best accuracy could be one of those."""
    run = tmp_path / "run"
    config = write_tiny(
        tmp_path,
        optimizers=[{"name": "sgd", "lr": 1.0e37}],
        model={"name": "mlp", "hidden_sizes": [8], "activation": "tanh"},
        budget={"steps": 20},
        eval={"every_steps": 1},
    )
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 4  # runner12: diverged
    records = read_metrics(run / "metrics.jsonl")
    diverged = [r for r in records if r["train_loss"] is None]
    assert diverged, "the run did not diverge; the test would be vacuous"
    for r in records:
        for split in ("train", "test"):
            assert (r[f"{split}_loss"] is None) == (r[f"{split}_accuracy"] is None)
    summary = json.loads((run / "summary.json").read_text())
    best = summary["optimizers"]["sgd"]["best"]["test_accuracy"]
    assert any(r["step"] == best["step"] and r["test_loss"] is not None for r in records)
    assert summary["optimizers"]["sgd"]["stop_reason"] == "diverged"


def test_unseen11_a_unicode_run_name_plots_without_glyph_warnings(tmp_path):
    """main: a run directory named in a script DejaVu Sans lacks (the plot title) printed
    matplotlib's "Glyph ... missing from font(s)" on stderr, once per glyph and figure."""
    from hessfree.train.plots import plot_metrics

    records = [
        {
            "optimizer": "adam",
            "step": s,
            "seconds": 0.1 * s,
            "train_loss": 1 / (s + 1),
            "test_loss": 1,
        }
        for s in range(3)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = plot_metrics(records, tmp_path, title="run ü 日本")
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
