"""fblam: λ's accelerated descent on deterministic objectives, against main's ⅓ a step.

``HessianFree._streak_decrease`` (``_STREAK_DECREASE``, ⅓) set to 1 on an instance reproduces
main's rule bitwise (Nielsen's ⅓ at most a step); every row below is this branch's code with and
without it, interleaved in one process (torch 1 thread).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_fblam.py unseen [problem ...]
        [--budget S] [--seed N]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_fblam.py fbd --tasks swap
        [--seeds 5] [--swap-budget GE] [--budget GE]

``unseen``: ``_unseenfb.py``'s seven full-batch problems, contenders ``HF``, ``HF lo`` (this
branch), ``HF[main]``, ``HF lo[main]`` and the two L-BFGS; ratios to the better L-BFGS.
``fbd``: ``_fbdefaults_study.py``'s harness (gradient equivalents to the lowest loss both
reached, load-free), variants ``defaults`` (this branch) and ``main``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fbdefaults_study as fbd  # noqa: E402
import _unseenfb as ufb  # noqa: E402

from hessfree import HessianFree, KFACPreconditioner  # noqa: E402


class MainRule(HessianFree):
    """Main's λ rule: no streak acceleration."""

    _streak_decrease = 1.0


class TightRule(HessianFree):
    """This branch's rule, and a streak also on any step with |ρ − 1| ≤ 0.01 (λ-dominated
    or not): the model exact along the step."""

    def _good_streak(self, state: dict, rho: float, share: float) -> int:
        if abs(rho - 1.0) <= 0.01 and state.get("deterministic") is True:
            share = 2.0  # counted as dominated
        return super()._good_streak(state, rho, share)


def _lower_kfac_floor(opt: HessianFree, value: float) -> None:
    """``precond='auto'``'s K-FAC with ``relative_damping=value`` once the objective is seen
    deterministic (part 2: K-FAC's floor on a deterministic objective)."""
    kfac = getattr(opt, "_auto_precond", None)
    if opt._global_state().get("deterministic") is True and isinstance(kfac, KFACPreconditioner):
        kfac.relative_damping = value


class KfacLow(HessianFree):
    """``_lower_kfac_floor`` after every step (``KFAC_FLOOR``)."""

    def step(self, closure, curvature_closure=None):  # noqa: ANN001, ANN201
        loss = super().step(closure, curvature_closure)
        _lower_kfac_floor(self, KFAC_FLOOR)
        return loss


#: ``FBLAM_KFAC_FLOOR`` in the environment overrides it
KFAC_FLOOR = float(os.environ.get("FBLAM_KFAC_FLOOR", "1e-6"))


def _make_run(name: str, prob: ufb.Problem, hf_kwargs: dict | None = None) -> ufb.Run:
    tag = re.search(r"\[(main|kfac)\]", name)
    if tag is None:
        return _orig_make_run(name, prob, hf_kwargs)
    run = _orig_make_run(name.replace(tag.group(0), ""), prob, hf_kwargs)
    run.name, opt, inner = name, run.opt, run.step
    if tag.group(1) == "main":
        opt._streak_decrease = 1.0  # instance attribute: main's rule for this optimizer
    else:

        def step() -> object:
            out = inner()
            _lower_kfac_floor(opt, KFAC_FLOOR)
            return out

        run.step = step
    return run


def _make_variant(name: str) -> type[HessianFree]:
    rules = {"main": MainRule, "tight": TightRule, "kfac": KfacLow}
    return rules.get(name) or _orig_make_variant(name)


_orig_make_run, _orig_make_variant = ufb.make_run, fbd.make_variant
ufb.make_run, fbd.make_variant = _make_run, _make_variant


def main() -> None:
    mode = sys.argv.pop(1)
    if mode == "unseen":
        if "--contenders" not in sys.argv:
            sys.argv += ["--contenders", "HF,HF lo,HF[main],HF lo[main],LBFGS,LBFGS sw"]
        ufb.main()
    elif mode == "fbd":
        if "--variants" not in sys.argv:
            sys.argv += ["--variants", "main,tight"]
        fbd.main()
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected 'unseen' or 'fbd'")


if __name__ == "__main__":
    main()
