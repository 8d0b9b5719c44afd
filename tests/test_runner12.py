"""``hessfree run`` on inputs and events nobody had tried (runner12): a diverged contender, a run
directory in use, and further probes. In process through the CLI's ``main`` (the exit status
is the contract), except where a real signal or a fresh interpreter is the point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train_loop import tiny_npz
from test_train_robust import write_tiny

from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.cli import main
from hessfree.train.metrics import read_metrics

fcntl = pytest.importorskip("fcntl")  # the run directory's lock is POSIX's flock


def _regression(tmp_path: Path, wild_lr: float, **extra) -> Path:
    """A linear least-squares config: SGD at ``wild_lr`` beside a tame SGD (float32)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = x.sum(1, keepdims=True)
    np.savez(tmp_path / "reg.npz", x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    raw = {
        "name": "reg",
        "seed": 0,
        "num_threads": 1,
        "data": {"name": "npz", "path": str(tmp_path / "reg.npz")},
        "model": {"name": "mlp", "hidden_sizes": []},
        "loss": {"name": "mse"},
        "optimizers": [
            {"name": "sgd", "label": "wild", "lr": wild_lr, "momentum": 0.0},
            {"name": "sgd", "label": "tame", "lr": 0.01},
        ],
        "budget": {"steps": 12},
        "batch_size": 16,
        "eval": {"every_steps": 50},  # only step 0 and the end: the weights must be caught
        "output": {"checkpoint_every": 50, "plots": False},
    }
    raw.update(extra)
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_runner12_a_step_leaving_inf_weights_keeps_the_last_finite_ones_and_exits_4(
    tmp_path, capsys
):
    """main: SGD at lr 1e38 turns the weights to inf in step 1 from a finite loss; the runner
    saw it only at step 2's batch loss, exited 0, and checkpoints/wild.pt held the inf weights.
    """
    run = tmp_path / "run"
    assert main(["run", str(_regression(tmp_path, 1e38)), "--out", str(run), "--quiet"]) == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["diverged"] == ["wild"]
    wild, tame = summary["optimizers"]["wild"], summary["optimizers"]["tame"]
    assert wild["stop_reason"] == "diverged" and wild["diverged_at_step"] == 1
    assert wild["checkpoint_step"] == 0  # step 1 left inf: the weights before it
    assert tame["stop_reason"] == "steps" and tame["steps"] == 12
    assert tame["diverged_at_step"] is None and tame["checkpoint_step"] == 12

    ckpt = load_checkpoint(run / "checkpoints" / "wild.pt")
    assert ckpt["diverged_at_step"] == 1 and ckpt["weights_step"] == 0
    assert _finite(ckpt["model"])
    # Oracle: the kept weights are the initial ones, whose mean squared error on the training
    # set (numpy, float64) is the train loss the runner logged at step 0 (float32: 1e-5 rel).
    data = np.load(tmp_path / "reg.npz")
    w, b = (ckpt["model"][k].double().numpy() for k in ("net.0.weight", "net.0.bias"))
    mse = float(np.mean((data["x_train"] @ w.T + b - data["y_train"]) ** 2))
    step0 = next(r for r in read_metrics(run / "metrics.jsonl") if r["optimizer"] == "wild")
    assert step0["step"] == 0 and step0["train_loss"] == pytest.approx(mse, rel=1e-5)
    # The metrics record the diverged step itself.
    last = [r for r in read_metrics(run / "metrics.jsonl") if r["optimizer"] == "wild"][-1]
    assert last["step"] == 1 and last["train_loss"] is None


def test_runner12_a_loss_overflowing_at_finite_weights_keeps_those_weights(tmp_path):
    """main: exit 0 and no `diverged` in the summary. The weights after the diverged step are
    finite (only the loss overflows), so the checkpoint holds them: `checkpoint_step` equals
    `diverged_at_step`."""
    run = tmp_path / "run"
    assert main(["run", str(_regression(tmp_path, 100.0)), "--out", str(run), "--quiet"]) == 4
    wild = json.loads((run / "summary.json").read_text())["optimizers"]["wild"]
    assert wild["stop_reason"] == "diverged" and wild["diverged_at_step"] is not None
    assert wild["checkpoint_step"] == wild["diverged_at_step"] == wild["steps"]
    ckpt = load_checkpoint(run / "checkpoints" / "wild.pt")
    assert _finite(ckpt["model"]) and ckpt["weights_step"] == ckpt["step"]


def test_runner12_resuming_a_run_with_a_diverged_contender_keeps_its_record(tmp_path):
    """main: the resumed run exited 0 and its summary had no `diverged`. A diverged entry is
    finished: resuming (with a larger budget too) neither retrains it nor forgets it."""
    run = tmp_path / "run"
    config = _regression(tmp_path, 1e38)
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 4
    assert main(["run", "--resume", str(run), "--quiet", "budget.steps=14"]) == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged"] == ["wild"]
    assert summary["optimizers"]["wild"]["diverged_at_step"] == 1
    assert summary["optimizers"]["wild"]["checkpoint_step"] == 0
    assert summary["optimizers"]["tame"]["steps"] == 14


def test_runner12_a_run_directory_in_use_exits_5_without_calling_the_config_invalid(
    tmp_path, capsys
):
    """main: exit 2 and "Invalid config: run directory ... is in use" though the config was
    fine; a script could not tell "fix the config" from "retry later"."""
    run = tmp_path / "run"
    config = write_tiny(tmp_path, budget={"steps": 2})
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    holder = open(run / ".lock", "a+")  # noqa: SIM115 - another process's lock
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert main(["run", "--resume", str(run), "--quiet"]) == 5
        err = capsys.readouterr().err
        assert err.startswith("hessfree: error: run directory") and "Invalid config" not in err
        assert "in use by another hessfree process" in err and "Traceback" not in err
    finally:
        holder.close()
    assert main(["run", "--resume", str(run), "--quiet"]) == 0


_MERGED = """\
optimizers:
  - &base {name: adam, lr: 0.01, batch_size: 16}
  - <<: *base
    name: sgd
    lr: 0.1
  - {<<: [{lr: 0.3, momentum: 0.5}, *base], name: sgd, label: sgd2}
"""


def test_runner12_merge_keys_let_an_entry_override_what_it_merges(tmp_path, capsys):
    """main: `<<: *base` then `lr: 0.1` was refused as "duplicate key 'lr'": the merged pairs
    were counted as the entry's own. Oracle: PyYAML's own merge (``yaml.safe_load``), where
    an own key overrides a merged one. Which of several merged mappings wins a key they share
    is PyYAML's choice and changed between releases (6.0.3: the first, 0.3; 6.0.4: the last,
    0.01), so that value is only compared with PyYAML's own."""
    from hessfree.train.config.yaml_io import safe_load_yaml

    assert safe_load_yaml(_MERGED) == yaml.safe_load(_MERGED)
    entries = safe_load_yaml(_MERGED)["optimizers"]
    assert entries[1] == {"name": "sgd", "lr": 0.1, "batch_size": 16}
    assert entries[2]["lr"] == yaml.safe_load(_MERGED)["optimizers"][2]["lr"]
    assert {k: v for k, v in entries[2].items() if k != "lr"} == {
        "name": "sgd",
        "label": "sgd2",
        "momentum": 0.5,
        "batch_size": 16,
    }
    # An own key given twice is still refused, merged pairs or not.
    with pytest.raises(yaml.YAMLError, match=r"duplicate key 'lr' \(line 6\)"):
        safe_load_yaml(_MERGED.replace("    lr: 0.1\n", "    lr: 0.1\n    lr: 0.2\n"))

    config = write_tiny(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw.pop("optimizers")
    config.write_text(yaml.safe_dump(raw) + _MERGED)
    assert main(["run", str(config), "--check"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)["optimizers"]
    merged_lr = yaml.safe_load(_MERGED)["optimizers"][2]["lr"]  # PyYAML's choice (above)
    assert [(e["name"], e["lr"]) for e in resolved] == [
        ("adam", 0.01),
        ("sgd", 0.1),
        ("sgd", merged_lr),
    ]
    assert resolved[2]["momentum"] == 0.5


def test_runner12_a_relative_data_path_is_recorded_absolute_so_resume_reads_the_same_file(
    tmp_path, monkeypatch
):
    """main: config.yaml kept `path: d.npz`, so `--resume` from another directory trained on
    whatever d.npz was there (exit 0, other data, no word). Oracle: the same run uninterrupted
    in the first directory, bitwise."""
    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir(), other.mkdir()
    tiny_npz(first / "d.npz", seed=0)
    tiny_npz(other / "d.npz", seed=1)  # same name and shapes, other numbers
    config = write_tiny(first, data={"name": "npz", "path": "d.npz"}, budget={"steps": 6})
    monkeypatch.chdir(first)
    assert main(["run", str(config), "--out", "whole", "--quiet"]) == 0
    assert main(["run", str(config), "--out", "cut", "--quiet", "budget.steps=3"]) == 0
    saved = yaml.safe_load((first / "cut" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(first / "d.npz")
    monkeypatch.chdir(other)
    assert main(["run", "--resume", str(first / "cut"), "--quiet", "budget.steps=6"]) == 0
    for label in ("adam", "sgd"):
        whole = load_checkpoint(first / "whole" / "checkpoints" / f"{label}.pt")["model"]
        cut = load_checkpoint(first / "cut" / "checkpoints" / f"{label}.pt")["model"]
        assert all(torch.equal(whole[k], cut[k]) for k in whole)
    # The config file given again with --resume still matches the run (the path is the same
    # file, spelt relative to the directory the run started in).
    monkeypatch.chdir(first)
    assert main(["run", str(config), "--resume", "cut", "--quiet", "budget.steps=7"]) == 0


def test_runner12_a_full_disk_mid_run_is_a_clear_error_and_the_run_resumes(
    tmp_path, capsys, monkeypatch
):
    """main: the OSError (ENOSPC) of a checkpoint write ended the run with a traceback (exit
    1). Now exit 2 naming the file and the cause, nothing half-written, and once the disk has
    room `--resume` ends bitwise as an uninterrupted run (the oracle)."""
    import errno
    import os

    config = write_tiny(tmp_path, budget={"steps": 6}, eval={"every_steps": 1})
    assert main(["run", str(config), "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    real_fsync, calls = os.fsync, []

    def full_after_four(fd: int) -> None:  # the 5th durable write finds the disk full
        calls.append(fd)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    run = tmp_path / "cut"
    monkeypatch.setattr(os, "fsync", full_after_four)
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hessfree: error: cannot write '") and "Traceback" not in err
    assert "No space left on device" in err and f"--resume {run}" in err
    assert not list(run.rglob("*.tmp"))  # no temporary left behind
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    for label in ("adam", "sgd"):
        whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / f"{label}.pt")["model"]
        cut = load_checkpoint(run / "checkpoints" / f"{label}.pt")["model"]
        assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert read_metrics(run / "metrics.jsonl") == [
        {**r, "seconds": r2["seconds"]}
        for r, r2 in zip(
            read_metrics(tmp_path / "whole" / "metrics.jsonl"),
            read_metrics(run / "metrics.jsonl"),
            strict=True,
        )
    ]


def test_runner12_the_plots_say_which_optimizer_diverged_and_where(tmp_path, monkeypatch):
    """main: the legend said only "wild"; its line stopped at its one finite point, hidden
    under the other optimizer's start, so the plots did not show that it diverged."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    legends, lines = [], []
    savefig = Figure.savefig

    def spy(fig, *args, **kwargs):
        for ax in fig.axes:
            legends.append([t.get_text() for t in ax.get_legend().get_texts()])
            lines.append([ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"])
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    config = _regression(tmp_path, 1e38, output={"plots": True}, eval={"every_steps": 1})
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 4
    assert len(legends) == 8  # 2 figures x 4 panels
    assert all(legend == ["wild (diverged at step 1)", "tame"] for legend in legends)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    diverged = next(r for r in records if r["optimizer"] == "wild" and r["step"] == 1)
    assert lines[:4] == [[diverged["seconds"]]] * 4 and lines[4:] == [[1]] * 4


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([1.0, -2.0], True),
        ([3e38, 3e38], True),  # finite entries whose float32 sum overflows: tested one by one
        ([1.0, float("inf")], False),
        ([float("inf"), float("-inf")], False),  # their sum is NaN
        ([float("nan"), 0.0], False),
    ],
)
def test_runner12_the_finiteness_test_agrees_with_numpy(values, finite):
    """The divergence guard's fast test (sums first) against ``numpy.isfinite``."""
    from hessfree.train.loop import _all_finite

    tensors = [torch.tensor(values, dtype=torch.float32), torch.ones(3)]
    assert bool(np.isfinite(np.array(values, dtype=np.float32)).all()) is finite
    assert _all_finite(tensors) is finite


def test_runner12_yaml_1_1_booleans_where_text_is_meant_say_to_quote(tmp_path, capsys):
    """main: `label: on` said only "got True", `name: no` "got bool False": the user wrote
    neither. Each is still refused (exit 2), now with why and the fix."""
    config = tmp_path / "b.yaml"
    config.write_text(
        "name: no\nnum_threads: 1\ndata: {name: digits}\n"
        "model: {name: mlp, hidden_sizes: [4], activation: off}\n"
        "optimizers: [{name: adam, label: on, lr: yes}]\nbudget: {steps: 1}\n"
    )
    assert main(["run", str(config), "--check"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(lines) == 4 and all("as booleans" in line for line in lines)
    assert sum("quote the word" in line for line in lines) == 3  # not for lr: a number


def test_runner12_a_home_relative_data_path_is_recorded_expanded(tmp_path, monkeypatch):
    """`~/d.npz` is expanded (as the loader does) before it is made absolute, not joined to
    the working directory as a directory named '~'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_npz(tmp_path / "d.npz")
    config = write_tiny(tmp_path, data={"name": "npz", "path": "~/d.npz"}, budget={"steps": 1})
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(config), "--out", "run", "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(tmp_path / "d.npz")


def test_runner12_resume_refuses_data_changed_since_the_run_started(tmp_path, capsys):
    """main: the npz rewritten in place (same path, shapes and config) was resumed on, exit 0:
    the second half trained on other data. Now exit 2 naming the checkpoint, nothing
    changed in the run directory; the original data resumes."""
    from test_train_robust import snapshot

    config = write_tiny(tmp_path, budget={"steps": 2})
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    data = tmp_path / "tiny.npz"
    original = data.read_bytes()
    tiny_npz(data, seed=5)  # same names and shapes, other numbers
    assert data.read_bytes() != original
    before = snapshot(run)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--quiet", "budget.steps=4"]) == 2
    err = capsys.readouterr().err
    assert "the training data is not what checkpoint" in err and "Traceback" not in err
    assert snapshot(run) == before
    data.write_bytes(original)
    assert main(["run", "--resume", str(run), "--quiet", "budget.steps=4"]) == 0


def test_runner12_a_second_sigterm_exits_143_not_130(tmp_path, capsys, monkeypatch):
    """main: the second signal abandoned the step as a bare KeyboardInterrupt, which the CLI
    reported as SIGINT's 130 though both signals were SIGTERM. Signals sent to this process
    from inside a step (the handlers run at once, in the main thread)."""
    import os
    import signal

    from hessfree.train import loop

    real_step = loop.take_step

    def step_then_two_sigterms(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # finish this step, then checkpoint...
        os.kill(os.getpid(), signal.SIGTERM)  # ...no: abandon it now
        return loss

    monkeypatch.setattr(loop, "take_step", step_then_two_sigterms)
    config = write_tiny(tmp_path, budget={"steps": 4})
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 143
    assert "interrupted; the last checkpoint (if any) is intact" in capsys.readouterr().err
    monkeypatch.setattr(loop, "take_step", real_step)
    assert main(["run", "--resume", str(tmp_path / "run"), "--quiet"]) == 0


def test_runner12_run_directory_refusals_do_not_call_the_config_invalid(tmp_path, capsys):
    """main: "Invalid config: '...' holds no config.yaml" and "Invalid config: '...metrics.jsonl'
    has 10 bytes, fewer than ..." though no config was wrong; still exit 2, without it."""
    config = write_tiny(tmp_path, budget={"steps": 2})
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == 2  # not a run directory
    err = capsys.readouterr().err
    assert "no config.yaml" in err and "Invalid config" not in err
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    (run / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes()[:10])
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hessfree: error: '{run / 'metrics.jsonl'}' has 10 bytes, fewer")
    assert "Invalid config" not in err and "Traceback" not in err
