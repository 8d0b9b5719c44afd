"""Addition's steps to solve on one seed, D (``HessianFree(params)``) against T (the config),
capped in steps rather than seconds, so that load on a shared machine cannot cut a run short.

Drives ``_addition50.run`` unchanged (same task, seeds, turns and table; its report file is
not written, the table goes to stdout): a run ends once solved or after ``CAP[length]`` steps,
the steps run7's 60 s held at load ~1 (``results/2026-12-02-amd-epyc-2c-scorecard-run7-
addition.md``), so "solved within the cap" predicts the scorecard's 60-s verdict on a quiet
machine. Results: ``results/2026-12-02-addseeds.md``.

Usage::

    python experiments/_addseeds_counts.py 50 1      # length, seed
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _addition50 as a  # noqa: E402
import scorecard as sc  # noqa: E402

CAP = {30: 100, 50: 62, 80: 39}  # run7: 101 / 63 / 39 steps in 60 s at T = 30 / 50 / 80


def main() -> None:
    length, seed = int(sys.argv[1]), int(sys.argv[2])
    if length not in CAP:
        raise ValueError(f"`length` must be one of {sorted(CAP)}, got {length!r}.")
    cap, base = CAP[length], sc.advance

    def advance_capped(r, end, device, *args, **kw) -> None:
        base(r, end, device, *args, **kw)
        if r.steps >= cap:  # run() records a solve first, then drops failed runs
            r.failed = f"cap {cap}"

    torch.set_num_threads(1)
    a._hash_hook()
    sc.advance = advance_capped
    print(a.run(length, 1e8, seed, ["D", "T"]), flush=True)


if __name__ == "__main__":
    main()
