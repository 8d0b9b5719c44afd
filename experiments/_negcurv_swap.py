"""negcurv (2026-12-02): the scorecard's swap task (unchanged LBFGS loop, exact Hessian) under
the negative-curvature variants of ``_negcurv.py``, seeds 0-4, by ``_fbdefaults_study``'s
round-robin harness (gradient equivalents to common targets: load-free; time ratios interleaved).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_negcurv_swap.py [--variants a,b]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fbdefaults_study as fb  # noqa: E402
import _negcurv  # noqa: E402

from hessfree import HessianFree  # noqa: E402


def make_variant(name: str) -> type:
    """``_negcurv.make_optimizer``'s variant as a class the harness constructs ("defaults" is
    the current code); CG's old negative-curvature step is patched in around each step."""

    class Variant(HessianFree):
        def __new__(cls, params, **kwargs):  # type: ignore[no-untyped-def]
            variant = "new" if name == "defaults" else name
            opt, old_cg = _negcurv.make_optimizer(variant, list(params), **kwargs)
            step = opt.step

            def patched(closure, curvature_closure=None):  # type: ignore[no-untyped-def]
                with _negcurv.patched_cg(old_cg):
                    return step(closure, curvature_closure)

            opt.step = patched
            return opt

    Variant.__name__ = f"HF[{name}]"
    return Variant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="old")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=6000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fb.make_variant = make_variant
    names = ["defaults", *args.variants.split(",")]
    print("load at start:", open("/proc/loadavg").read().strip())
    ge: dict[str, list] = {n: [] for n in names}
    tm: dict[str, list] = {n: [] for n in names}
    for s in range(args.seeds):
        res = fb.run_task(fb._swap_task(s), names, args.budget, True)
        d = res["defaults"]["curve"]
        for n, r in res.items():
            pair = max(fb._best(r["curve"]), fb._best(d))
            (pg, pt), (dg, dt) = fb._first(r["curve"], pair), fb._first(d, pair)
            ge[n].append(pg / dg)
            tm[n].append(pt / dt)
            print(
                f"seed {s} {n:14s} steps {len(r['curve']):4d} best {fb._best(r['curve']):.3g} "
                f"GE to common {pg:g} ({pg / dg:.2f}x) time {pt / dt:.2f}x",
                flush=True,
            )
    for n in names:
        print(
            f"{n:14s} GE/defaults gmean {fb._gmean(ge[n]):.3f} "
            f"({' '.join(f'{x:.2f}' for x in ge[n])}); time gmean {fb._gmean(tm[n]):.3f} "
            f"median {statistics.median(tm[n]):.2f}"
        )
    print("load at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
