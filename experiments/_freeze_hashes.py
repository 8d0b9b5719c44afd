"""Parameter hashes of the scorecard tasks' HF runs after N steps (#14, freeze).

Run once with the old code on ``PYTHONPATH`` and once with the new: equal hashes mean the
trajectories are bitwise unchanged over those steps. Deterministic (seeded data, weights and
optimizer; torch 1 thread). Prints per task: steps, final loss, closure calls, statuses, hash.

    python experiments/_freeze_hashes.py [--tasks swap,digits,...] [--steps swap=580,...]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard  # noqa: E402

import hessfree  # noqa: E402

STEPS = {
    "swap": 580,
    "digits": 300,
    "mnist1d": 60,
    "curves": 15,
    "addition30": 40,
    # the scorecard's mini-batch "HF default" regimes, where the stochastic-objective rules act
    # (the K-FAC floor raise of "cnnmb" changed CURVES at 250/62 from step ~20 on, unseen by the
    # 15 full-batch steps above: experiments/README.md, "kfacfloor")
    "curves250": 200,
    "mnist1dgrow": 60,
}
#: Regimes other than the task's default one (no arguments in all: kw={}).
REGIMES = {
    "curves250": dict(batch=250, curvature_batch=62, kw={}),
    "mnist1dgrow": dict(batch=250, growth=1.1, curvature_batch=0.25, kw={}),
}


def make(key: str) -> scorecard.Task:
    if key == "swap":
        return scorecard.make_swap_task(quick=False)
    if key == "curves":
        return scorecard.make_curves_task(quick=True)
    if key == "curves250":
        return scorecard.make_curves_task(quick=False)
    if key == "mnist1dgrow":
        return scorecard._classifier("mnist1d", quick=True)
    if key.startswith("addition"):
        return scorecard.make_addition_task(int(key[len("addition") :]), 60.0)
    return scorecard._classifier(key, quick=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=",".join(STEPS))
    ap.add_argument("--steps", default="")
    ap.add_argument("--tuned", action="store_true", help="also every tuned HF row")
    args = ap.parse_args()
    steps = dict(STEPS)
    for kv in filter(None, args.steps.split(",")):
        k, v = kv.split("=")
        steps[k] = int(v)
    torch.set_num_threads(1)
    print("hessfree from", hessfree.__file__)
    for key in args.tasks.split(","):
        task = make(key)
        base = task.hf["defaults"] if key == "swap" else task.hf_default_regime
        base = REGIMES.get(key) or base or next(iter(task.hf.values()))  # CURVES: full/250
        base = {k: v for k, v in base.items() if k not in ("kfac", "early_kw")} | {"kw": {}}
        regimes = {"defaults": base}
        if args.tuned:
            regimes |= {k: v for k, v in task.hf.items() if k != "defaults"}
        for name, regime in regimes.items():
            run = scorecard.hf_run(task, name, "HF", regime)
            for _ in range(steps[key]):
                run.step()
            h = hashlib.sha256()
            for p in run.model.parameters():
                h.update(p.detach().cpu().numpy().tobytes())
            print(
                f"{key:11} {name[:40]:40} {steps[key]:4d} steps loss {task.error(run.model):.6e} "
                f"{dict(sorted(run.statuses.items()))} sha256 {h.hexdigest()[:16]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
