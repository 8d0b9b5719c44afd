"""runner15 study: `hessfree run --check` on YAML 1.1 values and strings where numbers go.

``probes``: for each override, the exit status and the first line of stderr of
``python -m hessfree run CONFIG --check KEY=VALUE`` on a tiny digits config, run against the
package on ``PYTHONPATH`` (this checkout, or ``/work/main`` for main's behaviour). Usage:
``PYTHONPATH=. python3 experiments/_runner15.py probes``; prints the load average first. The
read-only, long-label, checkpoint-format and lock cases need a run first; they are in
``tests/test_runner15.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CONFIG = """\
name: tiny
seed: 0
num_threads: 1
data: {name: digits, test_fraction: 0.25}
model: {name: mlp, hidden_sizes: [8], activation: tanh}
optimizers:
  - {name: hessianfree, cg_max_iter: 5, batch_size: null}
  - {name: adam, lr: 3.0e-3, batch_size: 64}
budget: {steps: 3}
eval: {every_steps: 1}
output: {plots: false}
"""

_OVERRIDES = (
    "budget.seconds=1:30",
    "budget.steps=1:30",
    "seed=017",
    "seed=-017",
    "seed=007",
    "seed=0o17",
    "seed=08",
    "optimizers.0.damping=1:30",
    "optimizers.1.lr=1:30.5",
    "optimizers.1.lr=.5e3",
    "optimizers.1.lr=.inf",
    "optimizers.1.lr=.nan",
    "optimizers.1.label=1:30",
    "optimizers.1.label=017",
    "optimizers.1.label=no",
    "optimizers.1.betas=[0.9, 1:59]",
    "budget.seconds=.inf",
    "budget.seconds=5m",
    "budget.seconds=300s",
    "eval.max_cases=1_000",
    "data.name=off",
    "name=no",
    "output.dir=off",
    "optimizers.0.precond=off",
    "device=cuda",
)


def probes() -> None:
    print("load average:", os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tiny.yaml"
        config.write_text(_CONFIG)
        print("| override | exit | stderr (first line, cut) |\n|---|---|---|")
        for override in _OVERRIDES:
            done = subprocess.run(
                [sys.executable, "-m", "hessfree", "run", str(config), "--check", override],
                capture_output=True,
                text=True,
                cwd=tmp,
                check=False,
            )
            line = (done.stderr.splitlines() or [""])[0]
            line = line.replace("hessfree: error: Invalid config in command-line overrides: ", "")
            print(f"| `{override}` | {done.returncode} | {line[:160]} |")


if __name__ == "__main__":
    {"probes": probes}[sys.argv[1] if len(sys.argv) > 1 else "probes"]()
