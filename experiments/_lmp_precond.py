"""CG-pair L-BFGS preconditioning (Morales & Nocedal 2000) against the full-batch defaults (#14).

``CGPairPreconditioner``: the previous step's CG products (s, y) = (v, (C + λ)v), the last m,
as the L-BFGS two-loop inverse preconditioning the next CG run (no extra products). Same
harness as ``_mnist1d_defaults.py`` (its ``compare``: every run and L-BFGS stepped round-robin
in one process, torch 1 thread, up to ``BUDGET`` gradient equivalents each) on the quick
scorecard's MNIST-1D and digits tasks.

    python experiments/_lmp_precond.py [BUDGET] [--tasks mnist1d,digits]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _mnist1d_defaults as harness  # noqa: E402
import scorecard  # noqa: E402
from _bench_common import md_table, save_text  # noqa: E402

from hessfree import CGPairPreconditioner  # noqa: E402


def variants() -> dict[str, dict]:
    """The defaults, and the defaults with the CG-pair preconditioner of m pairs."""
    return {
        "defaults": {},
        "lmp m=8": dict(precond=CGPairPreconditioner(8)),
        "lmp m=16": dict(precond=CGPairPreconditioner(16)),
        "lmp m=32": dict(precond=CGPairPreconditioner(32)),
        "cg_max_iter=10": dict(cg_max_iter=10),
        "lmp m=16, cg_max_iter=10": dict(precond=CGPairPreconditioner(16), cg_max_iter=10),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("budget", nargs="?", type=float, default=330.0)
    ap.add_argument("--tasks", default="mnist1d,digits")
    ap.add_argument("--out", default=None, help="report path (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    harness.variants = variants  # the harness steps these instead of its own
    parts = []
    for key in args.tasks.split(","):
        task = scorecard._classifier(key, quick=True)
        load0 = os.getloadavg()
        results = harness.compare(task, args.budget)
        load1 = os.getloadavg()
        parts += [
            f"## {key}, {args.budget:g} gradient equivalents each",
            "",
            f"Load {load0[0]:.2f} → {load1[0]:.2f}; targets "
            f"{', '.join(f'{x:g}' for x in harness.TARGETS)}.",
            "",
            md_table(
                [
                    "run",
                    "steps",
                    "final loss",
                    "grad. equiv. to targets",
                    "time to targets / L-BFGS's",
                    "median CG",
                    "final λ",
                ],
                harness.comparison_rows(results),
            ),
            "",
        ]
    text = "\n".join(["# CG-pair L-BFGS preconditioner vs defaults vs L-BFGS", "", *parts])
    print(text)
    if args.out:
        save_text(Path(args.out), text)


if __name__ == "__main__":
    main()
