"""Which differences between ``HessianFree(params)`` and the tuned addition config matter *in
combination* (#14)?

The scorecard's addition task (``make_addition_task``: 100 tanh units, spectral radius 1.0,
1,000-case gradient batches, 100-case curvature batches, the closure returns hidden states so
``structural_damping='auto'`` is μ = 0.03). With hidden states the defaults and
``configs/rnn_addition.yaml`` differ in four settings, each a token here:

- ``L``: ``damping=0.1`` (defaults: ``'auto'``, :math:`g^\\top Cg/g^\\top g`);
- ``C``: ``cg_max_iter=25`` (defaults: 250);
- ``M``: ``damping_rule='martens'`` (defaults: ``'nielsen'``);
- ``K``: ``cg_stop_on_increase=False`` (defaults: ``'auto'``, on);

(``cg_rtol=1e-10`` against the defaults' η = 0 under structural damping is the same stop).
A contender is ``D`` (defaults) plus tokens, ``D+L+C``, or ``T`` (tuned) minus tokens, ``T-L``;
``key=value`` tokens pass any keyword (``D+cg_max_iter=50``). Contenders start from the same
weights, see the same batches and are interleaved as in ``scorecard.py`` (torch 1 thread).
Usage::

    python experiments/_addition_combo.py 30 60 0 T,D,D+L+C,T-L-C

(length T, seconds per contender, model seed, contenders). Printed per contender: the final
test error, the time it first reached 0.5 and 0.01, steps, CG iterations and closure calls per
step, λ along the run, ρ, CG stop reasons. Results: ``experiments/README.md``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _addition_ablation import Recorded  # noqa: E402

from hessfree import HessianFree  # noqa: E402

TOKENS = {
    "L": {"damping": 0.1},
    "C": {"cg_max_iter": 25},
    "M": {"damping_rule": "martens"},
    "K": {"cg_stop_on_increase": False},
}
TUNED = dict(sc.ADDITION_TUNED)


def kwargs_of(name: str) -> dict:
    """``D+L+C`` → the defaults plus ``L`` and ``C``; ``T-L`` → the config less ``L``."""
    base, *rest = name.replace("-", "|-").replace("+", "|+").split("|")
    kw = dict(TUNED) if base == "T" else {}
    for tok in rest:
        sign, key = tok[0], tok[1:]
        if "=" in key:
            k, v = key.split("=")
            kw[k] = float(v) if "." in v or "e" in v else int(v) if v.isdigit() else v
            continue
        for k in TOKENS[key]:
            if sign == "+":
                kw[k] = TOKENS[key][k]
            else:
                kw.pop(k, None)
    return kw


def _q(values, q):
    return float(np.quantile(values, q)) if len(values) else math.nan


def summary(opt: Recorded) -> str:
    log = opt.log
    if not log:
        return "    no steps"
    it = np.array([s.cg_iters for s in log])
    calls = np.array([s.closure_calls for s in log])
    rho = np.array([s.rho for s in log], dtype=float)
    lam = [s.damping for s in log]
    pick = sorted({0, 1, 2, 5, 10, 20, 40, 80, len(lam) - 1} & set(range(len(lam))))
    reasons = dict(collections.Counter(s.cg_reason for s in log))
    statuses = dict(collections.Counter(str(s.status) for s in log))
    t_step = np.array([s.time_total for s in log])
    return (
        f"    CG iters median {np.median(it):.0f} (q25-q75 {_q(it, 0.25):.0f}-{_q(it, 0.75):.0f}), "
        f"closure calls median {np.median(calls):.0f}, step time median {np.median(t_step):.3f} s; "
        f"ρ median {np.nanmedian(rho) if np.isfinite(rho).any() else math.nan:.2f} "
        f"(<¼: {int(np.sum(~(rho >= 0.25)))}, >¾: {int(np.sum(rho > 0.75))})\n"
        f"    λ at steps {pick}: {[f'{lam[i]:.2g}' for i in pick]}\n"
        f"    stops {reasons}; statuses {statuses}"
    )


def checksums(steps: int = 8) -> None:
    """SHA-1 of the parameters after ``steps`` steps of every HF regime of the quick scorecard's
    MLP / autoencoder tasks (tuned regimes, and the defaults in the default and in each tuned
    batch schedule): run once per code version and compare the lines (nothing there may move)."""
    import hashlib

    for key, make in [
        ("curves", lambda: sc.make_curves_task(True)),
        ("mnist1d", lambda: sc._classifier("mnist1d", True)),
        ("digits", lambda: sc._classifier("digits", True)),
        ("swap", lambda: sc.make_swap_task(True)),
    ]:
        task = make()
        regimes = dict(task.hf)
        regimes |= {f"defaults in {k}": v | {"kw": {}} for k, v in task.hf.items()}
        if task.hf_default_regime:
            regimes["defaults"] = task.hf_default_regime | {"kw": {}}
        for name, regime in regimes.items():
            regime = {k: v for k, v in regime.items() if not (k == "kfac" and "defaults" in name)}
            run = sc.hf_run(task, name, "HF", regime)
            for _ in range(steps):
                run.step()
            h = hashlib.sha1()
            for p in run.model.parameters():
                h.update(p.detach().cpu().numpy().tobytes())
            print(f"{key:8s} {h.hexdigest()[:16]} {name}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1] == "checksums":
        return checksums()
    length, budget, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    names = sys.argv[4].split(",")
    task = sc.make_addition_task(length, budget)
    if seed:
        from hessfree.train.models import build_model

        torch.manual_seed(seed)
        model = build_model(
            "rnn", input_shape=(length, 2), num_outputs=1, hidden_size=100, spectral_radius=1.0
        )
        task = dataclasses.replace(task, model=model)
    regime = task.hf_default_regime
    runs = []
    for name in names:
        sc.HessianFree = Recorded
        runs.append(sc.hf_run(task, name, "HF", regime | {"kw": kwargs_of(name)}))
    sc.HessianFree = HessianFree
    print(f"T = {length}, {budget:g} s, seed {seed}; load {os.getloadavg()}", flush=True)
    sc.interleave(runs, task, budget, int(os.environ.get("SLICES", 12)), "cpu")
    print(f"load {os.getloadavg()}")
    for r in runs:
        left = [t for t, e in r.curve if e <= 0.5]
        solved = [t for t, e in r.curve if e <= 0.01]
        print(
            f"{r.name:14s} {kwargs_of(r.name)}\n    final {sc.final_error(r):.4g}, {r.steps} "
            f"steps, ≤ 0.5 at {left[0] if left else math.inf:.1f} s, ≤ 0.01 at "
            f"{solved[0] if solved else math.inf:.1f} s; curve "
            f"{[round(e, 3) for _, e in r.curve]}"
        )
        for cell in r.step.__closure__ or []:
            if isinstance(getattr(cell.cell_contents, "log", None), list):
                print(summary(cell.cell_contents), flush=True)


if __name__ == "__main__":
    main()
