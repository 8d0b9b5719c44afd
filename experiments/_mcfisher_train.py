"""mcfisher: HessianFree with curvature='fisher_mc' against 'ggn' (and 'fisher') on scorecard tasks.

Not a default change (``'auto'`` stays Gauss-Newton): a look at whether the Monte-Carlo Fisher
trains as the GGN it estimates does. Each task's default HF regime (as ``_freeze_hashes.py``
builds it), the curvature swapped; runs share the initial weights and batches and are stepped
in turn (order rotated every step), each step's CPU time (``time.process_time``) charged to its
run. The error (the scorecard's, off the clock) is read at fixed step counts.

    OPENBLAS_NUM_THREADS=1 python experiments/_mcfisher_train.py [--tasks digits,mnist1d]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _freeze_hashes  # noqa: E402
import scorecard  # noqa: E402

from hessfree import MCFisherProduct  # noqa: E402

STEPS = {"digits": 300, "mnist1d": 120, "curves": 30}


def _mc8() -> dict:
    """``curvature=`` a callable: 8 labels per example (the optimizer's 'fisher_mc' draws 1)."""
    gen = torch.Generator().manual_seed(0)

    def curvature(loss, outputs, params):
        return MCFisherProduct(loss, outputs, params, mc_samples=8, generator=gen)

    return {"curvature": curvature}


CONTENDERS = {  # name: extra HessianFree kwargs (a function: built afresh for each run)
    "ggn": {"curvature": "ggn"},
    "fisher_mc seed 0": {"curvature": "fisher_mc", "seed": 0},
    "fisher_mc seed 1": {"curvature": "fisher_mc", "seed": 1},
    "fisher_mc, 8 samples (callable)": _mc8,
    "fisher (empirical)": {"curvature": "fisher"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default=",".join(STEPS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for key in args.tasks.split(","):
        task = _freeze_hashes.make(key)
        base = task.hf_default_regime or next(iter(task.hf.values()))
        base = {k: v for k, v in base.items() if k not in ("kfac", "early_kw")}
        runs, cpu = {}, {}
        for name, kw in CONTENDERS.items():
            kw = kw() if callable(kw) else kw
            regime = base | {"kw": dict(base.get("kw", {})) | kw}
            runs[name] = scorecard.hf_run(task, name, "HF", regime)
            cpu[name] = 0.0
        steps = STEPS[key]
        marks = sorted({steps // 4, steps // 2, steps})
        errors: dict[str, dict[int, float]] = {name: {} for name in runs}
        load0 = os.getloadavg()
        names = list(runs)
        for s in range(1, steps + 1):
            for name in names[s % len(names) :] + names[: s % len(names)]:
                c0 = time.process_time()
                runs[name].step()
                cpu[name] += time.process_time() - c0
            if s in marks:
                for name in names:
                    errors[name][s] = task.error(runs[name].model)
        load1 = os.getloadavg()
        print(f"\n### {key}: {task.title}; regime {scorecard._regime_text(base)}")
        print(f"load average start {load0[0]:.2f}, end {load1[0]:.2f}; error: {task.error_name}")
        head = " | ".join(f"error @ {m} steps" for m in marks)
        print(f"| curvature | {head} | CPU s, {steps} steps | CPU / ggn's | statuses |")
        print("|---|" + "---|" * len(marks) + "---|---|---|")
        for name in names:
            errs = " | ".join(f"{errors[name][m]:.4g}" for m in marks)
            st = dict(sorted(runs[name].statuses.items()))
            ratio = cpu[name] / cpu["ggn"]
            print(f"| {name} | {errs} | {cpu[name]:.2f} | {ratio:.3f} | {st} |")


if __name__ == "__main__":
    main()
