"""Addition T = 30/50/80: a tuned HF row at least as good as the defaults ("addcfg").

``_add500.py``'s harness (the scorecard's addition task, seed = data and weights; contenders
interleaved in one process, torch 1 thread, clock ``time.thread_time``, steps deterministic)
with two more contender settings on any base (``D`` = ``HessianFree(params)``, ``T`` = the
config row): ``rule=nielsen|martens`` (``damping_rule``) and ``floor=x``
(``relative_min_damping``), besides ``_add80.py``'s ``lam``, ``b``, ``cb``, ``cg``, ``mu``.

Usage::

    python experiments/_addcfg.py LENGTH SEED D,D+lam=0.1,D+lam=0.1+b=500 STEP_CAP [CPU_CAP_S]

Appends a table to ``results/2026-12-02-addcfg.md`` and per-step logs to
``results/2026-12-02-addcfg-steps.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _add80  # noqa: E402
import _add500  # noqa: E402

_parse = _add80.parse


def parse(name: str) -> tuple[dict, dict]:
    """``_add80.parse`` plus ``rule=`` and ``floor=`` on any base."""
    base, *mods = name.split("+")
    extra, keep = {}, []
    for mod in mods:
        key, value = mod.split("=")
        if key == "rule":
            extra["damping_rule"] = value
        elif key == "floor":
            extra["relative_min_damping"] = float(value)
        else:
            keep.append(mod)
    kw, regime = _parse("+".join([base, *keep]))
    return kw | extra, regime


_add80.parse = parse
_add500.build = _add80.build  # ``floor=`` is parse's now, for any base
_add500.REPORT = _add500.HERE / "2026-12-02-addcfg.md"
_add500.STEPS = _add500.HERE / "2026-12-02-addcfg-steps.jsonl"

if __name__ == "__main__":
    _add500.main()
