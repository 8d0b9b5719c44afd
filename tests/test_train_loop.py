"""End-to-end runs of the experiment loop: outputs, side by side, resume, signals."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hessfree.train import config as config_module
from hessfree.train import optimizers as optimizers_module
from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.config import ConfigError, parse_config
from hessfree.train.loop import Runner, RunStatus, run_experiment
from hessfree.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def tiny_npz(path: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    """A separable 3-class problem small enough for sub-second runs."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 6)) * 2
    y = rng.integers(0, 3, n_train + n_test)
    x = (centers[y] + rng.normal(size=(n_train + n_test, 6))).astype(np.float32)
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])
    return path


def tiny_config(tmp_path: Path, optimizers=None, **extra):
    raw = {
        "name": "tiny",
        "seed": 7,
        "num_threads": 1,  # tiny layers: a second thread only adds synchronisation
        "data": {"name": "npz", "path": str(tiny_npz(tmp_path / "tiny.npz"))},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "loss": {"name": "cross_entropy"},
        "optimizers": optimizers
        or [
            {"name": "adam", "lr": 0.01},
            {"name": "sgd", "lr": 0.1},
            {"name": "lbfgs", "max_iter": 3, "history_size": 5},
        ],
        "budget": {"steps": 12},
        "batch_size": 16,
        "eval": {"every_steps": 2},
        "output": {"checkpoint_every": 5, "plots": False},
    }
    raw.update(extra)
    return parse_config(raw)


def final_params(run_dir: Path, label: str) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir / "checkpoints" / f"{label}.pt")
    assert ckpt["finished"]
    return ckpt["model"]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def without_timing(records):
    """Records minus wall-clock fields, which differ between any two runs."""
    return [
        {k: v for k, v in r.items() if k != "seconds" and not k.startswith("hf_time")}
        for r in records
    ]


def quiet(cfg, run_dir, **kw):
    return Runner(cfg, run_dir, progress=False, verbose=False, **kw)


def test_run_writes_every_output(tmp_path, capsys):
    cfg = tiny_config(tmp_path, output={"checkpoint_every": 5, "plots": True})
    result = Runner(cfg, tmp_path / "run", progress=False).run()
    assert result.status is RunStatus.COMPLETED and result.exit_code == 0
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "loss_vs_seconds.png",
        "loss_vs_steps.png",
        "checkpoints/adam.pt",
        "checkpoints/sgd.pt",
        "checkpoints/lbfgs.pt",
    ):
        assert (run / name).is_file(), name
    assert (run / "loss_vs_seconds.png").read_bytes()[:4] == b"\x89PNG"
    # The saved config is the resolved one and loads back to the same config.
    assert config_module.load_config(run / "config.yaml") == cfg

    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["optimizer"] == "adam"] == [0, 2, 4, 6, 8, 10, 12]
    first = records[0]
    assert set(first) >= {
        "optimizer",
        "step",
        "epoch",
        "seconds",
        "batch_loss",
        "train_loss",
        "test_loss",
        "train_accuracy",
        "test_accuracy",
    }
    assert first["batch_loss"] is None and first["seconds"] == 0.0
    assert records[1]["epoch"] == pytest.approx(2 * 16 / 48)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["metric"] == "accuracy"
    adam = summary["optimizers"]["adam"]
    assert adam["stop_reason"] == "steps" and adam["steps"] == 12
    assert adam["final"]["step"] == 12
    assert adam["best"]["test_loss"]["value"] <= records[0]["test_loss"]
    table = capsys.readouterr().out
    assert "optimizer" in table and "lbfgs" in table and "best test loss" in table


def test_optimizers_start_from_the_same_weights_and_data(tmp_path):
    # Two identical Adam entries under different labels must produce identical records.
    cfg = tiny_config(
        tmp_path, optimizers=[{"name": "adam", "label": "a"}, {"name": "adam", "label": "b"}]
    )
    quiet(cfg, tmp_path / "run").run()
    records = without_timing(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    a = [{k: v for k, v in r.items() if k != "optimizer"} for r in records if r["optimizer"] == "a"]
    b = [{k: v for k, v in r.items() if k != "optimizer"} for r in records if r["optimizer"] == "b"]
    assert a == b
    assert_same_params(final_params(tmp_path / "run", "a"), final_params(tmp_path / "run", "b"))


def test_budgets_epochs_and_seconds(tmp_path):
    cfg = tiny_config(
        tmp_path,
        optimizers=[
            {"name": "sgd", "label": "ep", "budget": {"steps": None, "epochs": 2}},
            {"name": "sgd", "label": "sec", "budget": {"steps": None, "seconds": 0.05}},
        ],
    )
    result = quiet(cfg, tmp_path / "run").run()
    ep, sec = result.summary["optimizers"]["ep"], result.summary["optimizers"]["sec"]
    assert ep["stop_reason"] == "epochs" and ep["steps"] == 6  # 48 cases / 16 per batch, twice
    assert sec["stop_reason"] == "seconds" and sec["seconds"] >= 0.05


def test_divergence_stops_only_that_optimizer(tmp_path):
    # Least squares with a far too large step: the error grows geometrically to Inf, then NaN.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = x.sum(1, keepdims=True)
    np.savez(tmp_path / "reg.npz", x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    cfg = tiny_config(
        tmp_path,
        data={"name": "npz", "path": str(tmp_path / "reg.npz")},
        model={"name": "mlp", "hidden_sizes": []},
        loss={"name": "mse"},
        budget={"steps": 100},
        optimizers=[
            {"name": "sgd", "label": "wild", "lr": 100.0, "momentum": 0.0},
            {"name": "sgd", "label": "tame", "lr": 0.01},
        ],
    )
    result = quiet(cfg, tmp_path / "run").run()
    assert result.summary["optimizers"]["wild"]["stop_reason"] == "diverged"
    assert result.summary["optimizers"]["tame"]["stop_reason"] == "steps"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all("NaN" not in line and "Infinity" not in line for line in lines)  # strict JSON


def test_data_dependent_config_errors(tmp_path):
    cfg = tiny_config(tmp_path, batch_size=100)
    with pytest.raises(ConfigError, match="batch_size 100 exceeds the 48 training cases"):
        quiet(cfg, tmp_path / "run").run()
    assert not (tmp_path / "run").exists()  # nothing is created before the checks pass


def test_new_run_refuses_a_used_directory(tmp_path):
    cfg = tiny_config(tmp_path, budget={"steps": 2})
    quiet(cfg, tmp_path / "run").run()
    with pytest.raises(ConfigError, match="is not empty; resume it with --resume"):
        quiet(cfg, tmp_path / "run").run()


def test_resume_after_interrupt_is_bit_identical(tmp_path):
    cfg = tiny_config(tmp_path)
    quiet(cfg, tmp_path / "full").run()

    runner = quiet(cfg, tmp_path / "part")
    runner.on_step = lambda ev: runner.request_stop() if (ev.label, ev.step) == ("sgd", 7) else None
    result = runner.run()
    assert result.status is RunStatus.INTERRUPTED and result.exit_code == 130
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "lbfgs" not in summary["optimizers"]
    assert summary["optimizers"]["sgd"]["stop_reason"] == "interrupted"

    resumed = run_experiment(cfg, tmp_path / "part", resume=True, progress=False, verbose=False)
    assert resumed.status is RunStatus.COMPLETED
    for label in ("adam", "sgd", "lbfgs"):
        assert_same_params(
            final_params(tmp_path / "full", label), final_params(tmp_path / "part", label)
        )
    full = without_timing(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    part = without_timing(read_metrics(tmp_path / "part" / "metrics.jsonl"))
    assert part == full  # no duplicate, missing or half lines


def test_resume_after_crash_drops_records_newer_than_the_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, optimizers=[{"name": "adam"}])
    quiet(cfg, tmp_path / "full").run()

    def crash(ev):
        if ev.step == 7:  # checkpoint at 5, evaluations at 6: a hard kill loses the latter
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        quiet(cfg, tmp_path / "part", on_step=crash).run()
    metrics = tmp_path / "part" / "metrics.jsonl"
    with open(metrics, "ab") as f:
        f.write(b'{"optimizer": "adam", "st')  # a half-written line
    assert [r["step"] for r in read_metrics(metrics)] == [0, 2, 4, 6]

    quiet(cfg, tmp_path / "part", resume=True).run()
    assert_same_params(
        final_params(tmp_path / "full", "adam"), final_params(tmp_path / "part", "adam")
    )
    assert without_timing(read_metrics(metrics)) == without_timing(
        read_metrics(tmp_path / "full" / "metrics.jsonl")
    )
    assert metrics.read_bytes().endswith(b"}\n")


def test_resume_of_a_finished_run_only_rewrites_the_summary(tmp_path):
    cfg = tiny_config(tmp_path, budget={"steps": 3})
    quiet(cfg, tmp_path / "run").run()
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    result = quiet(cfg, tmp_path / "run", resume=True).run()
    assert result.status is RunStatus.COMPLETED
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_resume_refuses_checkpoints_of_another_config(tmp_path):
    cfg = tiny_config(tmp_path, budget={"steps": 3})
    quiet(cfg, tmp_path / "run").run()
    other = dataclasses.replace(cfg, seed=8)
    with pytest.raises(ConfigError, match="written for a different config"):
        quiet(other, tmp_path / "run", resume=True).run()


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_finishes_the_step_and_checkpoints(tmp_path, signum, code):
    cfg = tiny_config(tmp_path, optimizers=[{"name": "adam"}])
    # whatever the handlers were (SIG_IGN under `nohup` or a background job), they come back
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def send(ev):
        if ev.step == 3:
            os.kill(os.getpid(), signum)

    result = quiet(cfg, tmp_path / "run", on_step=send).run()
    assert result.exit_code == code
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "adam.pt")
    assert ckpt["step"] == 3 and not ckpt["finished"]
    assert ckpt["metrics_bytes"] == (tmp_path / "run" / "metrics.jsonl").stat().st_size
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored


# -- Hessian-free wiring --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FakeInfo:
    loss: float
    rho: float
    accepted: bool
    cg_reason: str
    direction: torch.Tensor  # a vector: not logged


class _FakeHessianFree(torch.optim.Optimizer):
    """Gradient descent behind HessianFree's step(closure, curvature_closure) contract."""

    seen: list = []

    def __init__(self, params, lr: float = 0.1, **settings):  # the rest of HFSettings' keys
        super().__init__(params, {"lr": lr})
        self.last_step = None

    def step(self, closure, curvature_closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        loss, outputs = closure()
        assert loss.requires_grad and outputs.dim() == 2  # raw outputs, graph attached
        curvature_cases = None
        if curvature_closure is not None:
            c_loss, c_outputs = curvature_closure()
            curvature_cases = c_outputs.shape[0]
        _FakeHessianFree.seen.append((outputs.shape[0], curvature_cases))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(self.param_groups[0]["lr"] * g)
        self.last_step = _FakeInfo(float(loss.detach()), 0.5, True, "max_iter", torch.zeros(3))
        return loss


def test_hessianfree_closures_batches_and_diagnostics(tmp_path, monkeypatch):
    monkeypatch.setattr(optimizers_module, "hessianfree_class", lambda: _FakeHessianFree)
    _FakeHessianFree.seen = []
    cfg = tiny_config(
        tmp_path,
        optimizers=[
            {"name": "hessianfree", "curvature_batch_size": 4},
            {"name": "hessianfree", "label": "full", "batch_size": None},
        ],
        budget={"steps": 4},
    )
    quiet(cfg, tmp_path / "run").run()
    assert _FakeHessianFree.seen == [(16, 4)] * 4 + [(48, None)] * 4
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[1]
    assert record["optimizer"] == "hessianfree" and record["step"] == 2
    assert (record["hf_rho"], record["hf_accepted"], record["hf_cg_reason"]) == (
        0.5,
        True,
        "max_iter",
    )
    assert "hf_direction" not in record


def test_real_hessianfree_end_to_end_and_resume(tmp_path):
    pytest.importorskip("hessfree.optimizer")
    cfg = tiny_config(
        tmp_path,
        optimizers=[{"name": "hessianfree", "cg_max_iter": 10}, {"name": "adam"}],
        budget={"steps": 6},
        batch_size=None,
        curvature_batch_size=24,
        output={"checkpoint_every": 2, "plots": False},
    )
    quiet(cfg, tmp_path / "full").run()
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    hf = [r for r in records if r["optimizer"] == "hessianfree"]
    assert hf[-1]["train_loss"] < hf[0]["train_loss"]
    assert {"hf_rho", "hf_damping", "hf_cg_iters"} <= set(hf[-1])

    runner = quiet(cfg, tmp_path / "part")
    runner.on_step = lambda ev: (
        runner.request_stop() if ev.step == 3 and ev.label == "hessianfree" else None
    )
    assert runner.run().exit_code == 130
    quiet(cfg, tmp_path / "part", resume=True).run()
    for label in ("hessianfree", "adam"):
        assert_same_params(
            final_params(tmp_path / "full", label), final_params(tmp_path / "part", label)
        )


# -- a real signal from outside --------------------------------------------------------------


@pytest.mark.slow
def test_sigint_subprocess_then_resume(tmp_path):
    npz = tiny_npz(tmp_path / "tiny.npz", n_train=256, n_test=64)
    config = tmp_path / "long.yaml"
    config.write_text(
        f"num_threads: 1\ndata: {{name: npz, path: '{npz}'}}\n"
        "model: {name: mlp, hidden_sizes: [32]}\nloss: {name: cross_entropy}\n"
        "optimizers: [{name: adam, lr: 1.0e-3}]\nbudget: {steps: 4000}\n"
        "batch_size: 8\neval: {every_steps: 50}\noutput: {checkpoint_every: 100, plots: false}\n"
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hessfree", "run", str(config), "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    ckpt = run_dir / "checkpoints" / "adam.pt"
    deadline = time.time() + 240  # start-up on a loaded machine; a hang detector
    while not (ckpt.exists() and ckpt.stat().st_size and load_checkpoint(ckpt)["step"] >= 100):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    stopped = load_checkpoint(ckpt)
    assert not stopped["finished"] and 100 <= stopped["step"] < 4000
    lines = (run_dir / "metrics.jsonl").read_bytes()
    assert lines.endswith(b"\n") and len(lines) == stopped["metrics_bytes"]
    [json.loads(line) for line in lines.splitlines()]

    cfg = config_module.load_config(run_dir / "config.yaml")
    quiet(cfg, run_dir, resume=True).run()
    quiet(cfg, tmp_path / "full").run()
    assert_same_params(final_params(tmp_path / "full", "adam"), final_params(run_dir, "adam"))
    assert without_timing(read_metrics(run_dir / "metrics.jsonl")) == without_timing(
        read_metrics(tmp_path / "full" / "metrics.jsonl")
    )


# -- the shipped quickstart ------------------------------------------------------------------


def test_quickstart_config_runs_briefly(tmp_path):
    pytest.importorskip("hessfree.optimizer")
    overrides = ["budget.seconds=0.3", "eval.every_seconds=0.1", "output.plots=false"]
    cfg = config_module.load_config(REPO / "configs" / "quickstart.yaml", overrides)
    result = quiet(cfg, tmp_path / "run").run()
    assert result.status is RunStatus.COMPLETED
    assert set(result.summary["optimizers"]) == {"hessianfree", "adam"}
    assert all(o["stop_reason"] == "seconds" for o in result.summary["optimizers"].values())


@pytest.mark.slow
def test_quickstart_as_shipped(tmp_path):
    pytest.importorskip("hessfree.optimizer")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hessfree",
            "run",
            str(REPO / "configs" / "quickstart.yaml"),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("metrics.jsonl", "summary.json", "loss_vs_seconds.png", "loss_vs_steps.png"):
        assert (tmp_path / "run" / name).is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    hf = summary["optimizers"]["hessianfree"]
    assert hf["best"]["test_accuracy"]["value"] > 0.9
    # Quick by construction, not by a timing: every optimizer stops on the seconds budget
    # (or sooner, converged), and the budgets add up to well under README's "about a minute".
    shipped = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert shipped["budget"]["seconds"] * len(shipped["optimizers"]) <= 30
    reasons = {o["stop_reason"] for o in summary["optimizers"].values()}
    assert reasons <= {"seconds", "converged"}, reasons


def test_run_restores_torch_thread_count(tmp_path):
    before = torch.get_num_threads()
    quiet(tiny_config(tmp_path, budget={"steps": 1}), tmp_path / "run").run()
    assert torch.get_num_threads() == before


class _GivingUp(_FakeHessianFree):
    def step(self, closure, curvature_closure=None):
        raise FloatingPointError("10 consecutive non-finite steps")


def test_hessianfree_giving_up_counts_as_divergence(tmp_path, monkeypatch):
    monkeypatch.setattr(optimizers_module, "hessianfree_class", lambda: _GivingUp)
    cfg = tiny_config(tmp_path, optimizers=[{"name": "hessianfree"}, {"name": "adam"}])
    result = quiet(cfg, tmp_path / "run").run()
    assert result.summary["optimizers"]["hessianfree"]["stop_reason"] == "diverged"
    assert result.summary["optimizers"]["adam"]["stop_reason"] == "steps"


def test_hessianfree_with_structural_damping_trains_the_rnn(tmp_path):
    pytest.importorskip("hessfree.optimizer")
    raw = {
        "data": {"name": "addition", "length": 8, "num_train": 64, "num_test": 32},
        "model": {"name": "rnn", "hidden_size": 8},
        "optimizers": [
            {
                "name": "hessianfree",
                "structural_damping": 0.03,
                "cg_max_iter": 20,
                "curvature_batch_size": 16,
            }
        ],
        "budget": {"steps": 3},
        "eval": {"every_steps": 1},
        "output": {"plots": False},
    }
    quiet(parse_config(raw), tmp_path / "run").run()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    hf = [r for r in records if r["step"] > 0]
    assert len(hf) == 3 and all(r["hf_status"] == "accepted" for r in hf)
    assert hf[-1]["train_loss"] < records[0]["train_loss"]


@dataclasses.dataclass(frozen=True)
class _StatusInfo:
    loss: float
    status: str
    accepted: bool = False


class _ConvergingHessianFree(_FakeHessianFree):
    """Reports ``status='converged'`` from its third step on, as HessianFree does once the
    gradient or the change falls below ``tolerance_grad`` / ``tolerance_change``."""

    def __init__(self, params, lr: float = 0.1, **settings):
        super().__init__(params, lr)
        self.steps = 0

    moved = False  # whether its 'converged' steps were accepted (tolerance_change)

    def step(self, closure, curvature_closure=None):
        loss = super().step(closure, curvature_closure)
        self.steps += 1
        status = "converged" if self.steps >= 3 else "accepted"
        self.last_step = _StatusInfo(float(loss.detach()), status, self.moved or self.steps < 3)
        return loss


class _MovingConvergedHessianFree(_ConvergingHessianFree):
    """'converged' and accepted from the third step on: tolerance_change steps that moved."""

    moved = True


def test_an_accepted_converged_hessianfree_step_does_not_end_that_optimizer(tmp_path, monkeypatch):
    # LBFGS ends one step() call on tolerance_change and goes on at the next; so does the runner
    monkeypatch.setattr(optimizers_module, "hessianfree_class", lambda: _MovingConvergedHessianFree)
    cfg = tiny_config(tmp_path, optimizers=[{"name": "hessianfree"}])
    entry = quiet(cfg, tmp_path / "run").run().summary["optimizers"]["hessianfree"]
    assert entry["stop_reason"] == "steps" and entry["steps"] > 3


def test_a_converged_hessianfree_step_ends_that_optimizer(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(optimizers_module, "hessianfree_class", lambda: _ConvergingHessianFree)
    cfg = tiny_config(
        tmp_path,
        optimizers=[{"name": "hessianfree", "tolerance_grad": 1e-5}, {"name": "adam"}],
    )
    result = Runner(cfg, tmp_path / "run", progress=False).run()
    entry = result.summary["optimizers"]["hessianfree"]
    assert (entry["stop_reason"], entry["steps"]) == ("converged", 3)
    assert result.summary["optimizers"]["adam"]["stop_reason"] == "steps"
    out = capsys.readouterr().out
    assert "stopped by converged after 3 steps" in out and "converged" in out.split("\n\n")[-2]
    # a converged optimizer stays finished when the run is resumed
    result = quiet(cfg, tmp_path / "run", resume=True).run()
    assert result.summary["optimizers"]["hessianfree"]["stop_reason"] == "converged"


def test_lbfgs_that_no_longer_moves_on_the_whole_set_has_converged(tmp_path):
    lbfgs = {"name": "lbfgs", "max_iter": 3, "tolerance_grad": 1e3}  # |g| is below at once
    cfg = tiny_config(tmp_path, optimizers=[lbfgs], batch_size=None)
    result = quiet(cfg, tmp_path / "run").run()
    assert result.summary["optimizers"]["lbfgs"]["stop_reason"] == "converged"
    assert result.summary["optimizers"]["lbfgs"]["steps"] == 1
    # on mini-batches a step without movement is only this batch's verdict: it goes on
    cfg = tiny_config(tmp_path, optimizers=[lbfgs])
    result = quiet(cfg, tmp_path / "mini").run()
    assert result.summary["optimizers"]["lbfgs"]["stop_reason"] == "steps"


def test_real_hessianfree_converged_status_stops_the_run(tmp_path):
    hf = {"name": "hessianfree", "cg_max_iter": 5, "tolerance_grad": 1e3}  # max|g| is below
    cfg = tiny_config(tmp_path, optimizers=[hf], batch_size=None)
    result = quiet(cfg, tmp_path / "run").run()
    entry = result.summary["optimizers"]["hessianfree"]
    assert (entry["stop_reason"], entry["steps"]) == ("converged", 1)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["hf_status"] == "converged"
