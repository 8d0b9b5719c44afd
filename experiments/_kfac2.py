"""``cg_max_iter='auto'`` = 2 on K-FAC-preconditioned steps of an objective seen stochastic.

The scorecard's tuned CURVES and MNIST-1D rows run K-FAC-preconditioned CG cut at two
iterations on mini-batches; ``experiments/README.md`` "ablate" found that regime, not K-FAC or
the cap alone, carries the defaults' gap. This compares, interleaved in one process from the
same weights (``_kfacauto.py``'s harness): the defaults before the rule (``'auto'`` K-FAC with
the cap of 250, given as ``cg_max_iter=250``), the defaults now, and the tuned row.

    OPENBLAS_NUM_THREADS=1 python experiments/_kfac2.py curves [seconds]
    OPENBLAS_NUM_THREADS=1 python experiments/_kfac2.py mnist1d-schedule [seconds]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kfacauto as ka  # noqa: E402
import scorecard as sc  # noqa: E402


def main(key: str, seconds: float | None) -> None:
    torch.set_num_threads(1)
    print(f"`{' '.join(sys.argv[1:])}`; load before {open('/proc/loadavg').read().strip()}")
    task, regs, budget = ka.contenders(key)
    budget = seconds or budget
    now = next(k for k in regs if k.startswith("defaults now"))
    tuned = next(k for k in regs if k.startswith("tuned"))
    base = {k: v for k, v in regs[now].items() if k != "kw"}
    picked = {
        "defaults, cap 250 (before the rule)": dict(base, kw=dict(cg_max_iter=250)),
        "defaults now (cg≤2 on stochastic K-FAC steps)": dict(base, kw={}),
        tuned: regs[tuned],
    }
    runs = [sc.hf_run(task, name, "HF", reg) for name, reg in picked.items()]
    sc.interleave(
        runs, task, budget, task.slices, "cpu", early=sc.FINAL_EARLY_POINTS, accuracy_steps=0.0
    )
    print(f"budget {budget:g} s per run; load after {open('/proc/loadavg').read().strip()}")
    ka.report(task, runs, budget, ka.TARGETS.get(key.split("-")[0], (1.0, 0.3, 0.15)))


if __name__ == "__main__":
    args = [a for a in sys.argv[2:] if not a.startswith("--")]
    main(sys.argv[1], float(args[0]) if args else None)
