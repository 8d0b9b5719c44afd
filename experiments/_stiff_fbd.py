"""``_fbdefaults_study.py``'s load-free harness (gradient equivalents to common loss targets,
round-robin stepping) with ``_stiff.py``'s candidate rules as variants (topic "stiff"):

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_stiff_fbd.py --tasks swap \
        --seeds 3 --swap-budget 4000 --variants interp
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fbdefaults_study as fbd  # noqa: E402
import _stiff  # noqa: E402

_orig = fbd.make_variant


def _make_variant(name: str) -> type:
    return _stiff.VARIANTS.get(name) or _orig(name)


fbd.make_variant = _make_variant

if __name__ == "__main__":
    fbd.main()
