"""Addition: which difference between ``HessianFree(params)`` (D) and the config (T) costs D
its seeds at T = 50 ("add50d"), by steps to solve, capped like ``_addseeds_counts.py``.

Drives ``_addition50.run`` (same task, seeds, turns, table) with extra contenders, each a
setting of one side moved to the other's value (kwargs on top of the defaults):

- ``L``: D + ``damping=0.1`` (the config's λ₀; its relative floor then takes its scale at
  the first stochastic step, as T's does);
- ``M``: D + ``damping_rule='martens'``;
- ``F``: D + ``relative_min_damping=0``; ``TF``: T + the same;
- ``TA``: T + ``damping='auto'`` (= D + M); ``TN``: T + ``damping_rule='nielsen'`` (= D + L);
- ``T01``: T + ``relative_min_damping=0.01`` (a given floor, kept where 'auto' is now 0).

Usage::

    python experiments/_add50d.py 50 1 L,M,F [cap]     # length, seed, contenders

Results: ``results/2026-12-02-add50d.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _addition50 as a  # noqa: E402
import scorecard as sc  # noqa: E402

CAP = {30: 100, 50: 62, 80: 39}  # as _addseeds_counts.py: run7's steps in 60 s
EXTRA = {
    "TA": dict(sc.ADDITION_TUNED, damping="auto"),
    "TN": dict(sc.ADDITION_TUNED, damping_rule="nielsen"),
    "T01": dict(sc.ADDITION_TUNED, relative_min_damping=0.01),
}


def main() -> None:
    length, seed = int(sys.argv[1]), int(sys.argv[2])
    names = sys.argv[3].split(",")
    cap = int(sys.argv[4]) if len(sys.argv) > 4 else CAP[length]
    a.KW.update(EXTRA)
    base = sc.advance

    def advance_capped(r, end, device, *args, **kw) -> None:
        base(r, end, device, *args, **kw)
        if r.steps >= cap:
            r.failed = f"cap {cap}"

    torch.set_num_threads(1)
    a._hash_hook()
    sc.advance = advance_capped
    print(a.run(length, 1e8, seed, names), flush=True)


if __name__ == "__main__":
    main()
