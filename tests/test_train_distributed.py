"""Data-parallel runs of the runner over gloo on loopback, launched as torchrun would.

Each rank is ``python -m hessfree run`` with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and
``MASTER_ADDR=127.0.0.1``/``MASTER_PORT`` set, one thread each. The oracle is the one-process
run of the same config, in float64: equal shards make the averaged step equal the whole-batch
step up to rounding.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from test_train_loop import tiny_npz

from hessfree.train import loop
from hessfree.train.checkpoint import load_checkpoint, save_checkpoint
from hessfree.train.cli import main
from hessfree.train.config import (
    ConfigError,
    config_digest,
    dump_config,
    load_config,
    parse_config,
)
from hessfree.train.data import load_dataset
from hessfree.train.loop import Runner
from hessfree.train.metrics import read_metrics
from hessfree.train.parallel import Group, PeerError, launch_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

# float64 end to end; the shards' averages differ from the whole batch's only by rounding.
SAME_STEP = dict(rtol=0.0, atol=1e-6)


def write_config(tmp_path: Path, **extra) -> Path:
    raw = {
        "name": "tiny",
        "seed": 3,
        "dtype": "float64",
        "num_threads": 1,
        "data": {"name": "npz", "path": str(tiny_npz(tmp_path / "tiny.npz"))},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "loss": {"name": "cross_entropy"},
        "optimizers": [
            # precond null: 'auto''s K-FAC runs on one process only (its probes are per rank)
            {"name": "hessianfree", "cg_max_iter": 10, "curvature_batch_size": 8, "precond": None},
            {"name": "adam", "lr": 0.02},
        ],
        "budget": {"steps": 6},
        "batch_size": 16,
        "eval": {"every_steps": 2},
        "output": {"checkpoint_every": 3, "plots": False},
        "distributed": {"timeout_seconds": 10},
    }
    raw.update(extra)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


#: Sockets holding the ports :func:`free_port` handed out, open until the process exits.
_HELD_PORTS: list[socket.socket] = []


def free_port() -> int:
    """A loopback port for rank 0's TCPStore that no other socket can take meanwhile.

    Closing the probe socket at once (as before flaky19) freed the port for the seconds the
    ranks spend importing torch, in which the kernel could hand it to any other socket on the
    machine (a concurrent run's gloo connections draw from the same ephemeral range): rank 0
    then failed to listen by chance. The socket stays bound, not listening, with
    ``SO_REUSEADDR``: the kernel gives the port to no other bind or connect, while the
    TCPStore, which binds with ``SO_REUSEADDR`` too, may still listen on it (Linux lets
    sockets that all set it share a port while none of the others listens)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(s)
    atexit.register(s.close)
    return s.getsockname()[1]


def launch(config: Path, cwds: list[Path], *args: str) -> list[subprocess.Popen]:
    """One ``hessfree run`` per rank, each in its own working directory, as torchrun would."""
    port = str(free_port())
    procs = []
    for rank, cwd in enumerate(cwds):
        cwd.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "WORLD_SIZE": str(len(cwds)),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        cmd = [sys.executable, "-m", "hessfree", "run", str(config), "--quiet", *args]
        procs.append(
            subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    """Each rank's exit code and stderr. ``timeout`` bounds a hang only: under a load of 5-9
    on two cores a two-rank test took 20-30 s (flaky19), a quarter of the former 120 s."""
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank did not finish in time")
        out.append((p.returncode, err))
    return out


def reference(config: Path, run_dir: Path) -> None:
    Runner(load_config(config), run_dir, progress=False, verbose=False).run()


def final_params(run_dir: Path, label: str) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir / "checkpoints" / f"{label}.pt")
    assert ckpt["finished"]
    return ckpt["model"]


def assert_same_training(run_dir: Path, ref_dir: Path, labels=("hessianfree", "adam")) -> None:
    for label in labels:
        got, want = final_params(run_dir, label), final_params(ref_dir, label)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **SAME_STEP)
    records = read_metrics(run_dir / "metrics.jsonl")
    expected = read_metrics(ref_dir / "metrics.jsonl")
    assert [(r["optimizer"], r["step"]) for r in records] == [
        (r["optimizer"], r["step"]) for r in expected
    ]
    for r, e in zip(records, expected, strict=True):
        assert r["train_loss"] == pytest.approx(e["train_loss"], abs=1e-6)
        if e["batch_loss"] is not None:
            assert r["batch_loss"] == pytest.approx(e["batch_loss"], abs=1e-6)


# -- two ranks equal one process; only rank 0 writes ------------------------------------------


def test_two_ranks_equal_one_process_and_only_rank_0_writes(tmp_path):
    config = write_config(tmp_path)
    ranks = [tmp_path / "rank0", tmp_path / "rank1"]
    procs = launch(config, ranks, "--out", "run")  # relative: each rank's own directory
    reference(config, tmp_path / "ref")  # meanwhile, in this process
    for code, err in finish(procs):
        assert code == 0, err
    run = ranks[0] / "run"
    assert_same_training(run, tmp_path / "ref")
    first = read_metrics(tmp_path / "ref" / "metrics.jsonl")[0]["train_loss"]
    last = read_metrics(tmp_path / "ref" / "metrics.jsonl")[-1]["train_loss"]
    assert last < first - 0.1, "the reference did not train; the comparison would be vacuous"
    assert {p.name for p in run.iterdir()} == {
        ".lock",  # rank 0's hold on the run directory while it writes
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "checkpoints",
    }
    assert load_checkpoint(run / "checkpoints" / "adam.pt")["world_size"] == 2
    assert list(ranks[1].iterdir()) == []  # rank 1 wrote nothing, not even a directory


def test_two_ranks_equal_one_process_with_growing_batches(tmp_path):
    # 48 cases; batch_multiple 2 keeps every grown batch and curvature batch splittable
    config = write_config(
        tmp_path,
        optimizers=[
            {"name": "hessianfree", "cg_max_iter": 10, "batch_size": 8, "batch_growth": 1.25,
             "precond": None,
             "batch_multiple": 2, "curvature_fraction": 0.5},
            {"name": "adam", "lr": 0.02, "batch_size": 6, "batch_growth": 1.5,
             "batch_multiple": 2},
        ],
        budget={"steps": 10},
    )  # fmt: skip
    ranks = [tmp_path / "rank0", tmp_path / "rank1"]
    procs = launch(config, ranks, "--out", "run")
    reference(config, tmp_path / "ref")
    for code, err in finish(procs):
        assert code == 0, err
    assert_same_training(ranks[0] / "run", tmp_path / "ref")
    records = read_metrics(ranks[0] / "run" / "metrics.jsonl")
    grown = [(r["optimizer"], r["step"], r["batch_size"]) for r in records]
    # 8 * 1.25**k and 6 * 1.5**k rounded down to even, at most the 48 cases
    assert grown == [
        ("hessianfree", 0, 8), ("hessianfree", 2, 10), ("hessianfree", 4, 14),
        ("hessianfree", 6, 24), ("hessianfree", 8, 38), ("hessianfree", 10, 48),
        ("adam", 0, 6), ("adam", 2, 8), ("adam", 4, 20), ("adam", 6, 44),
        ("adam", 8, 48), ("adam", 10, 48),
    ]  # fmt: skip
    assert grown == [
        (r["optimizer"], r["step"], r["batch_size"])
        for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")
    ]


# -- faults ----------------------------------------------------------------------------------


def test_a_killed_rank_makes_the_survivor_exit_nonzero_with_one_clear_line(tmp_path):
    config = write_config(
        tmp_path,
        optimizers=[{"name": "adam"}],
        budget={"steps": 1_000_000},
        eval={"every_steps": 5},
        output={"checkpoint_every": 5, "plots": False},
    )
    procs = launch(config, [tmp_path / "rank0", tmp_path / "rank1"], "--out", "run")
    metrics = tmp_path / "rank0" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240  # start-up of two torch processes on a loaded machine
    while not (metrics.exists() and len(metrics.read_bytes().splitlines()) >= 3):
        if procs[0].poll() is not None or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"rank 0 did not get going: {procs[0].communicate()[1]}")
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    # A hang detector, not a timing: gloo sees the closed connection at once and the
    # configured timeout is 10 s, but a loaded machine may take a while to tear down.
    try:
        _, err = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 still ran 120 s after its peer was killed")
    procs[1].communicate()
    assert procs[0].returncode == 3, err
    assert "lost contact with another rank" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    ckpt = load_checkpoint(tmp_path / "rank0" / "run" / "checkpoints" / "adam.pt")
    assert not ckpt["finished"] and ckpt["step"] >= 5  # the last checkpoint is intact


@pytest.mark.slow
def test_a_hung_rank_makes_the_survivor_exit_nonzero_after_the_timeout(tmp_path):
    config = write_config(
        tmp_path,
        optimizers=[{"name": "adam"}],
        budget={"steps": 1_000_000},
        eval={"every_steps": 5},
        distributed={"timeout_seconds": 5},
    )
    procs = launch(config, [tmp_path / "rank0", tmp_path / "rank1"], "--out", "run")
    metrics = tmp_path / "rank0" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240  # start-up on a loaded machine
    while not (metrics.exists() and len(metrics.read_bytes().splitlines()) >= 2):
        assert procs[0].poll() is None and time.monotonic() < deadline, procs[0].communicate()
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGSTOP)
    try:  # a hang detector: without the 5 s timeout gloo would wait its default 300 s
        _, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 3, err
    assert "lost contact" in err and "Traceback" not in err
    assert "timeout_seconds = 5 s" in err  # the configured timeout, not a default, applied


# -- signals and resume ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_and_resume_continues(tmp_path):
    config = write_config(
        tmp_path,
        optimizers=[{"name": "adam", "lr": 0.02}, {"name": "lbfgs", "max_iter": 3}],
        budget={"steps": 400},
        eval={"every_steps": 10},
        output={"checkpoint_every": 10, "plots": False},
    )
    ranks = [tmp_path / "rank0", tmp_path / "rank1"]
    procs = launch(config, ranks, "--out", "run")
    reference(config, tmp_path / "ref")
    ckpt = ranks[0] / "run" / "checkpoints" / "adam.pt"
    deadline = time.monotonic() + 240  # start-up on a loaded machine
    while not (ckpt.exists() and load_checkpoint(ckpt)["step"] >= 20):
        assert procs[0].poll() is None and time.monotonic() < deadline, procs[0].communicate()
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGINT)
    for code, err in finish(procs):
        assert code == 130, err
    stopped = load_checkpoint(ckpt)
    assert not stopped["finished"] and 20 <= stopped["step"] < 400

    # every rank reads the checkpoints: here through an absolute path (a shared directory)
    procs = launch(config, ranks, "--resume", str(ranks[0] / "run"))
    for code, err in finish(procs):
        assert code == 0, err
    assert_same_training(ranks[0] / "run", tmp_path / "ref", labels=("adam", "lbfgs"))


@pytest.mark.slow
def test_torchrun_launches_the_module(tmp_path):
    config = write_config(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "hessfree",
        "run",
        str(config),
        "--quiet",
        "--out",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    reference(config, tmp_path / "ref")
    assert_same_training(tmp_path / "run", tmp_path / "ref")


# -- in-process checks: config, sizes, resume guard ------------------------------------------


def test_distributed_timeout_is_validated_and_left_out_of_the_digest(tmp_path):
    raw = yaml.safe_load(write_config(tmp_path).read_text())
    with pytest.raises(ConfigError, match=r"`distributed.timeout_seconds` must be in \(0"):
        parse_config({**raw, "distributed": {"timeout_seconds": 0}})
    with pytest.raises(ConfigError, match="did you mean `timeout_seconds`"):
        parse_config({**raw, "distributed": {"timeout": 5}})
    cfg = parse_config(raw)
    assert cfg.distributed.timeout_seconds == 10.0
    longer = dataclasses.replace(
        cfg, distributed=dataclasses.replace(cfg.distributed, timeout_seconds=60.0)
    )
    assert config_digest(longer) == config_digest(cfg)  # a timeout does not change results
    # ...and runs written before the section existed keep their digest (it is dumped last)
    before = dump_config(cfg).split("distributed:")[0]
    assert config_digest(cfg) == hashlib.sha256(before.encode()).hexdigest()


def test_resume_accepts_another_timeout_but_no_other_change(tmp_path, capsys):
    config = write_config(tmp_path, budget={"steps": 2})
    run = str(tmp_path / "run")
    assert main(["run", str(config), "--out", run, "--quiet"]) == 0
    assert main(["run", "--resume", run, "distributed.timeout_seconds=60", "--quiet"]) == 0
    assert main(["run", "--resume", run, "seed=4", "--quiet"]) == 2
    assert "these keys differ" in capsys.readouterr().err


def test_batch_sizes_must_split_evenly_across_ranks(tmp_path):
    cfg = load_config(write_config(tmp_path, batch_size=15))
    ds = load_dataset("npz", path=cfg.data.path)
    objective = loop.make_objective(cfg.task, cfg.loss.name, cfg.loss.reduction, "npz")
    assert loop._data_problems(cfg, ds, objective, world_size=1) == []
    problems = loop._data_problems(cfg, ds, objective, world_size=2)
    assert problems == [
        "`optimizers.0` (hessianfree): batch_size 15 is not a multiple of the 2 processes; each "
        "rank takes an equal slice so that the step equals a one-process step on the whole "
        "batch. Use batch_size=14 or 16, or another process count.",
        "`optimizers.1` (adam): batch_size 15 is not a multiple of the 2 processes; each rank "
        "takes an equal slice so that the step equals a one-process step on the whole batch. "
        "Use batch_size=14 or 16, or another process count.",
    ]
    whole = load_config(
        write_config(
            tmp_path,
            batch_size=None,
            optimizers=[{"name": "hessianfree", "curvature_batch_size": 9}],
        )
    )
    problems = loop._data_problems(whole, ds, objective, world_size=5)
    assert len(problems) == 2
    assert "batch_size 48 (null: the whole training set) is not a multiple of the 5" in problems[0]
    assert "curvature_batch_size 9 is not a multiple of the 5 processes" in problems[1]


def test_resume_refuses_another_number_of_processes(tmp_path):
    config = load_config(write_config(tmp_path, budget={"steps": 2}))
    Runner(config, tmp_path / "run", progress=False, verbose=False).run()
    path = tmp_path / "run" / "checkpoints" / "adam.pt"
    save_checkpoint(path, {**load_checkpoint(path), "world_size": 2})
    runner = Runner(config, tmp_path / "run", resume=True, progress=False, verbose=False)
    with pytest.raises(ConfigError, match=r"over 2 process\(es\), this one has 1; .*=2"):
        runner.run()


def test_one_process_group_is_the_identity():
    group = Group()
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    loss = torch.tensor(1.5)
    assert group.average_gradients([p], loss) is loss and p.grad.tolist() == [3.0, 3.0]
    assert group.agree_step(2.0, 0.5, None) == (2.0, 0.5, None)
    assert group.agree_flag(False) is False and group.shard(16) == slice(0, 16)
    assert group.agree_start(None, "dir") == "dir"
    with pytest.raises(ValueError, match="boom"):
        group.agree_start(ValueError("boom"), "dir")


def test_launch_env_rejects_a_rank_outside_the_world():
    with pytest.raises(PeerError, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        launch_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    with pytest.raises(PeerError, match="must be integers"):
        launch_env({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"})
