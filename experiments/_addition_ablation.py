"""Which of ``HessianFree``'s defaults keeps it on the addition plateau (#14)?

The scorecard's addition task (``make_addition_task``: 100 tanh units, spectral radius 1.0,
1,000-case gradient batches, 100-case curvature batches) with ``HessianFree`` built from the
defaults plus one of the tuned config's settings, or from the tuned config
(``configs/rnn_addition.yaml``) less one of them. Contenders start from the same weights, see
the same batches and are interleaved as in ``scorecard.py`` (torch 1 thread). Usage::

    python experiments/_addition_ablation.py 30 60 0 up      # defaults + one setting
    python experiments/_addition_ablation.py 30 60 1 down    # tuned - one setting, seed 1
    python experiments/_addition_ablation.py 30 60 0 default,tuned,+cg_rtol

(length T, seconds per contender, model seed, contenders). Printed per contender: the final
test error, the time it first reached 0.01, steps, CG iterations, η, stop reasons and
``line_search_failed`` steps. Results: ``experiments/README.md``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _cg_stop_study import run_and_report  # noqa: E402

from hessfree import HessianFree  # noqa: E402

TUNED = sc.ADDITION_TUNED
SETTINGS = list(TUNED)

VARIANTS = {"default": {}, "tuned": dict(TUNED)}
VARIANTS |= {f"+{k}": {k: TUNED[k]} for k in SETTINGS}
VARIANTS |= {f"-{k}": {j: v for j, v in TUNED.items() if j != k} for k in SETTINGS}
# pairs the single switches point to
VARIANTS["+cg_rtol+stop"] = dict(cg_rtol=1e-10, cg_stop_on_increase=False)
VARIANTS["+cg_rtol+stop+sd"] = VARIANTS["+cg_rtol+stop"] | dict(structural_damping=0.03)
# structural damping off: the default ('auto') turns it on, as the closure gives hidden states
VARIANTS["-structural_damping"]["structural_damping"] = 0.0
VARIANTS["sd0"] = dict(structural_damping=0.0)  # the defaults before structural_damping='auto'


GROUPS = {
    "up": ["default"] + [f"+{k}" for k in SETTINGS],
    "down": ["tuned"] + [f"-{k}" for k in SETTINGS],
}


class Recorded(HessianFree):
    """``HessianFree`` that keeps every step's ``StepInfo``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log = []

    def step(self, *args, **kwargs):
        out = super().step(*args, **kwargs)
        self.log.append(self.last_step)
        return out


class SDForcing(Recorded):
    """The Eisenstat-Walker η also where structural damping is in effect (the defaults give
    η = 0 there): ``structural_damping='auto'`` alone."""

    def _cg_rtol(self, run):
        super()._cg_rtol(run)
        eta = run.report["cg_rtol"] = run.state["forcing_eta"]
        return eta


class SDNoCheck(Recorded):
    """The defaults without the objective check where structural damping is in effect."""

    def _stop_on_increase(self, run):
        return run.structural_damping == 0 and super()._stop_on_increase(run)


#: contenders that change the optimizer's class, not its arguments
CLASSES = {"sd-ew": SDForcing, "sd-nocheck": SDNoCheck}


def summary(opt: Recorded) -> str:
    log = opt.log
    if not log:
        return "    no steps"
    it = np.array([s.cg_iters for s in log])
    eta = np.array([s.cg_rtol for s in log])
    reasons = dict(collections.Counter(s.cg_reason for s in log))
    failed = sum(s.status == "line_search_failed" for s in log)
    return (
        f"    CG iterations median {np.median(it):.0f} mean {it.mean():.1f}; η median "
        f"{np.nanmedian(eta):.3g}; stops {reasons}; line_search_failed {failed}; "
        f"λ last {log[-1].damping:.2g}"
    )


def main() -> None:
    torch.set_num_threads(1)
    length, budget, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    names = GROUPS.get(sys.argv[4]) or sys.argv[4].split(",")
    task = sc.make_addition_task(length, budget)
    if seed:
        from hessfree.train.models import build_model

        torch.manual_seed(seed)
        model = build_model(
            "rnn", input_shape=(length, 2), num_outputs=1, hidden_size=100, spectral_radius=1.0
        )
        task = dataclasses.replace(task, model=model)
    regime = task.hf_default_regime
    runs = []
    for name in names:
        sc.HessianFree = CLASSES.get(name, Recorded)
        runs.append(sc.hf_run(task, name, "HF", regime | {"kw": VARIANTS.get(name, {})}))
    sc.HessianFree = HessianFree
    header = f"T = {length}, {budget:g} s, seed {seed}"
    run_and_report(runs, task, budget, int(os.environ.get("SLICES", 12)), header, summary)


if __name__ == "__main__":
    main()
