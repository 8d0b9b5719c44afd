r"""The ``'auto'`` relative λ floor's fraction on fixed mini-batches (#14, stop 50).

run33's ``HessianFree(params)`` on CURVES' growing batch reached 1.41x the tuned row with the
floor at 0.5 % × b₀ / b and 2.34x at 1 % × b₀ / b (``_growth18.py 90 def@1.003/1.25,...``).
A lower default fraction also moves every fixed-batch mini-batch run, so before it could be a
default: the ten ``_mbfloor`` problems (the library's rule, ``'lib'``: CNN + BatchNorm, GRU
and LSTM regressions and classifiers, attention, bag of words, dropout, ...), N steps off the
clock from the same weights, batch seeds given, train-set loss after N/4, N/2, N
(deterministic, load-free), with ``_AUTO_RELATIVE_MIN_DAMPING`` patched to each fraction.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_autofrac50.py \
        [--problems cnnbn grucls ...] [--fractions 0.01 0.005 0.003] [--steps 120] [--seeds 1 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _mbfloor  # noqa: E402

import hessfree._damping_control as dc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", nargs="*", default=list(_mbfloor.PROBLEMS))
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.01, 0.005, 0.003])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = open("/proc/loadavg").read().split()[:3]
    print(f"load {' '.join(load0)}; steps {args.steps}; seeds {args.seeds}")
    print("| problem | " + " | ".join(f"c = {c:g}: loss ¼ / ½ / 1×" for c in args.fractions)
          + " | 1× geo-mean vs first |")  # fmt: skip
    print("|---|" + "---|" * (len(args.fractions) + 1))
    saved = dc._AUTO_RELATIVE_MIN_DAMPING
    for key in args.problems:
        cells, finals = [], []
        for c in args.fractions:
            dc._AUTO_RELATIVE_MIN_DAMPING = c
            runs = [_mbfloor.run(key, "lib", args.steps, s) for s in args.seeds]
            cells.append(" ; ".join("/".join(f"{v:.3g}" for v in r["loss"]) for r in runs))
            finals.append([r["loss"][-1] for r in runs])
        dc._AUTO_RELATIVE_MIN_DAMPING = saved
        ratios = [
            math.exp(statistics.fmean(math.log(a / b) for a, b in zip(f, finals[0], strict=True)))
            for f in finals
        ]
        print(f"| {key} | " + " | ".join(cells) + " | "
              + " / ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)  # fmt: skip
    print(f"load after {' '.join(open('/proc/loadavg').read().split()[:3])}; {time.ctime()}")


if __name__ == "__main__":
    main()
