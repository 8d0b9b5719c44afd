"""runner13: probes of ``hessfree run`` (the YAML runner) under inputs and events earlier rounds
did not try. Usage::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_runner13.py probes
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_runner13.py resumes
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_runner13.py race

``probes``: edge values and CLI events through ``python -m hessfree`` in a scratch directory,
one line each: the exit status and the first line of stderr.
``resumes``: a 3-contender run (Adam, SGD, HessianFree) interrupted at several steps, then
resumed until done, against the same run uninterrupted: are ``metrics.jsonl``'s records
(contender, step, training loss) and the summary's steps and losses equal?
``race``: four ``hessfree run`` of one config started at once into the default run directory;
their exit statuses and the directories made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[1]

_BASE = """\
name: p
seed: 0
num_threads: 1
data: {name: digits}
model: {name: mlp, hidden_sizes: [8]}
optimizers:
  - {name: adam, lr: 0.01, batch_size: 64}
  - {name: sgd, lr: 0.1, batch_size: 64}
budget: {steps: 3}
eval: {every_steps: 1}
output: {plots: false, dir: runs}
"""


def _cli(args: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(_REPO), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "hessfree", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    first = (done.stderr.strip().splitlines() or [""])[-1]
    return done.returncode, first[:200]


def probes() -> None:
    """Each probe's exit status and last stderr line."""
    d = Path(tempfile.mkdtemp(prefix="runner13-"))
    (d / "base.yaml").write_text(_BASE)
    rng = np.random.default_rng(0)
    np.savez(
        d / "empty_test.npz",
        x_train=rng.normal(size=(40, 3)).astype(np.float32),
        y_train=rng.integers(0, 2, 40),
        x_test=np.zeros((0, 3), np.float32),
        y_test=np.zeros(0, np.int64),
    )
    (d / "anchors.yaml").write_text(
        _BASE.replace("name: p\n", "name: p\nx-common: &c {lr: 0.02}\n").replace(
            "{name: adam, lr: 0.01,", "{<<: *c, name: adam,"
        )
    )
    (d / "empty").mkdir()
    (d / "link").symlink_to(d / "empty", target_is_directory=True)
    (d / "dangling").symlink_to(d / "nowhere")
    cases = [
        ["--version"],
        ["frob"],
        [],
        ["run", "base.yaml", "--check", "batch_size=100000"],
        ["run", "base.yaml", "--out", "r1", "batch_size=100000"]
        + ["optimizers.0.batch_size=null", "optimizers.1.batch_size=null"],
        ["run", "base.yaml", "--out", "r2", "optimizers.0.batch_size=1"],
        ["run", "base.yaml", "--check", "budget.seconds=0"],
        ["run", "base.yaml", "--check", "budget.seconds=-1"],
        ["run", "base.yaml", "--check", "budget.steps=0"],
        ["run", "base.yaml", "--check", "optimizers.0.lr=0"],
        ["run", "base.yaml", "--check", "seed=-1"],
        ["run", "base.yaml", "--check", "seed=abc"],
        ["run", "base.yaml", "--check", "seed=99999999999999999999"],
        ["run", "base.yaml", "--check", "optimizers=[]"],
        ["run", "base.yaml", "--out", "r3", "name=é中"],
        ["run", "--resume", "r3"],
        ["run", "--resume", "r3", "num_threads=2"],
        ["run", "anchors.yaml", "--check"],
        ["run", "anchors.yaml", "--check", "x-common.lr=0.5"],
        ["run", "base.yaml", "--out", "link"],
        ["run", "base.yaml", "--out", "dangling"],
        ["run", "base.yaml", "--out", "r4", "data.name=npz", "data.path=empty_test.npz"]
        + ["loss.name=cross_entropy", "batch_size=8"]
        + ["optimizers.0.batch_size=null", "optimizers.1.batch_size=null"],
    ]
    print("| command | exit | last stderr line |\n|---|---|---|")
    for args in cases:
        code, err = _cli(args, d)
        print(f"| `hessfree {' '.join(args)}` | {code} | {err.replace('|', '/')} |")


def resumes() -> None:
    """Interrupted-and-resumed runs against the uninterrupted one: records and summary."""
    import torch

    from hessfree.train import Runner, load_config

    torch.set_num_threads(1)
    d = Path(tempfile.mkdtemp(prefix="runner13-"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    np.savez(d / "t.npz", x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    (d / "c.yaml").write_text(
        f"name: t\nnum_threads: 1\ndata: {{name: npz, path: {d / 't.npz'}}}\n"
        "model: {name: mlp, hidden_sizes: [4]}\nloss: {name: cross_entropy}\n"
        "optimizers: [{name: adam, lr: 0.01}, {name: sgd, lr: 0.1},"
        " {name: hessianfree, cg_max_iter: 3}]\n"
        "budget: {steps: 12}\nbatch_size: 16\neval: {every_steps: 2}\n"
        "output: {checkpoint_every: 5, plots: false}\n"
    )
    cfg = load_config(d / "c.yaml")
    Runner(cfg, d / "whole", verbose=False).run()

    def records(run: Path) -> list:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["optimizer"], r["step"], r.get("train_loss")) for r in map(json.loads, lines)]

    def summary(run: Path) -> dict:
        entries = json.loads((run / "summary.json").read_text())["optimizers"]
        # not the final record's seconds: that is each run's own clock
        return {
            k: (v["steps"], v["final"]["train_loss"], v["final"]["test_loss"])
            for k, v in entries.items()
        }

    print(
        "| stops (contender, step) | records equal | records | summary equal |\n|---|---|---|---|"
    )
    plans = [
        [("sgd", 3)],
        [("adam", 7), ("sgd", 1), ("hessianfree", 11)],
        [("adam", 12)],
        [("hessianfree", 5), ("hessianfree", 6)],
    ]
    for i, stops in enumerate(plans):
        run = d / f"cut{i}"
        for j, stop in enumerate([*stops, None]):
            runner = Runner(cfg, run, resume=j > 0, verbose=False)
            if stop is not None:
                runner.on_step = lambda ev, r=runner, s=stop: (
                    r.request_stop() if (ev.label, ev.step) == s else None
                )
            runner.run()
        same = records(d / "whole") == records(run)
        print(
            f"| {stops} | {same} | {len(records(run))} | {summary(d / 'whole') == summary(run)} |"
        )


def race() -> None:
    """Four runs of one config started at once into the default run directory."""
    d = Path(tempfile.mkdtemp(prefix="runner13-"))
    (d / "base.yaml").write_text(_BASE)
    env = {**os.environ, "PYTHONPATH": str(_REPO), "OPENBLAS_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hessfree", "run", "base.yaml", "--quiet"],
            cwd=d,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        print(f"exit {p.returncode} {err.strip()[:160]}")
    print("directories:", sorted(p.name for p in (d / "runs").iterdir()))


if __name__ == "__main__":
    {"probes": probes, "resumes": resumes, "race": race}[sys.argv[1]]()
