"""Where the runner's stop rule ends HF's full-batch runs: on any 'converged' step (before) or
only on one that moved nothing (after) (#14, freeze). Deterministic; prints, per task, the step
and loss at each rule's first stop and the loss after ``--steps`` steps.

    python experiments/_freeze_runner_stop.py [--tasks swap,digits,mnist1d] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _freeze_hashes  # noqa: E402
import scorecard  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="swap,digits,mnist1d")
    ap.add_argument("--steps", type=int, default=800)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for key in args.tasks.split(","):
        task = _freeze_hashes.make(key)
        base = task.hf["defaults"] if key == "swap" else task.hf_default_regime
        base = {k: v for k, v in base.items() if k not in ("kfac", "early_kw")} | {"kw": {}}
        run = scorecard.hf_run(task, "defaults", "HF", base)
        opt = None
        for ref in run.step.__closure__ or ():  # the run's HessianFree
            if type(ref.cell_contents).__name__ == "HessianFree":
                opt = ref.cell_contents
        old = new = None
        for k in range(args.steps):
            run.step()
            s = opt.last_step
            if s.status == "converged":
                if old is None:
                    old = (k, task.error(run.model), str(s.converged_by))
                if new is None and not s.accepted:
                    new = (k, task.error(run.model), str(s.converged_by))
                    break
        print(
            f"{key}: any 'converged' first at step {old}; 'converged' without moving at "
            f"{new}; loss after {k + 1} steps {task.error(run.model):.4g}",
            flush=True,
        )


if __name__ == "__main__":
    main()
