"""``_freeze_hashes.py`` with a ``_stiff.py`` candidate rule patched into ``HessianFree``
(topic "stiff"): do the scorecard tasks' short trajectories change under it?

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_stiff_freeze.py geo [--tasks ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _freeze_hashes  # noqa: E402
import _stiff  # noqa: E402
import scorecard  # noqa: E402


def main() -> None:
    scorecard.HessianFree = _stiff.VARIANTS[sys.argv.pop(1)]  # what scorecard.hf_run builds
    _freeze_hashes.main()


if __name__ == "__main__":
    main()
