"""Addition T = 50: ``HessianFree(params)`` against ``configs/rnn_addition.yaml``, re-measured.

The scorecard's addition task and regime (``make_addition_task``: 100 tanh units, spectral
radius 1.0, 1,000-case gradient batches, 100-case curvature batches, hidden states returned so
``structural_damping='auto'`` is μ = 0.03), with a seed ``s`` for both the data
(``make_addition(seed=s)``) and the initial weights (``torch.manual_seed(s)``); seed 0 is the
scorecard's task itself. Contenders start from the same weights, see the same batches and take
steps in turns (one step each, shuffled order per round, torch 1 thread); the test error is
evaluated after *every* step, off the clock, so the time and the number of steps to solve
(test error ≤ 0.01) are a step's, not an evaluation grid's (the scorecard evaluates every
5 s). A contender stops once solved or when its clock passes the budget. Steps are
deterministic (fixed batches, one thread), so steps to solve are free of the clock; only
seconds per step carry the load.

Contenders (kwargs on top of the defaults):

- ``D``: ``HessianFree(params)``;
- ``T``: the config (``scorecard.ADDITION_TUNED``);
- ``L``: D + ``damping=0.1`` (the config's λ₀);
- ``M``: D + ``damping_rule='martens'``;
- ``LM``: D + both (should take T's steps: the other four config settings equal the
  defaults' 'auto' values on structurally damped steps);
- ``F``, ``TF``, ``LF``: D, T, L with ``relative_min_damping=0`` (no relative floor on λ;
  'auto' is 0.01 × the curvature scale on a stochastic objective, and both D and T sit on it).

Usage::

    python experiments/_addition50.py 50 90 0 D,T,L,M     # length, budget (s), seed, contenders

Each run appends its table to ``results/2026-12-01-add50.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _addition_ablation import Recorded  # noqa: E402
from _bench_common import save_text  # noqa: E402

from hessfree import HessianFree  # noqa: E402

REPORT = Path(__file__).resolve().parent / "results" / "2026-12-01-add50.md"
SOLVED = 0.01
KW = {
    "D": {},
    "T": dict(sc.ADDITION_TUNED),
    "L": {"damping": 0.1},
    "M": {"damping_rule": "martens"},
    "LM": {"damping": 0.1, "damping_rule": "martens"},
    "F": {"relative_min_damping": 0.0},
    "TF": dict(sc.ADDITION_TUNED, relative_min_damping=0.0),
    "LF": {"damping": 0.1, "relative_min_damping": 0.0},
}


def task_for(length: int, budget: float, seed: int) -> sc.Task:
    """The scorecard's addition task with data and initial weights drawn from ``seed``."""
    task = sc.make_addition_task(length, budget)
    if seed == 0:
        return task
    from hessfree.train.data import make_addition
    from hessfree.train.models import build_model

    ds = make_addition(length=length, num_train=10_000, num_test=1000, seed=seed)
    torch.manual_seed(seed)
    model = build_model(
        "rnn", input_shape=ds.input_shape, num_outputs=1, hidden_size=100, spectral_radius=1.0
    )
    xt, yt = ds.x_test, ds.y_test

    @torch.no_grad()
    def error_rate(m: torch.nn.Module) -> float:
        return float(((m(xt) - yt).abs() > sc.ADDITION_TOL).float().mean())

    return dataclasses.replace(task, model=model, x=ds.x_train, y=ds.y_train, error=error_rate)


def _opt(r: sc.Run) -> Recorded:
    if hasattr(r, "opt"):
        return r.opt
    return next(
        c.cell_contents
        for c in r.step.__closure__ or []
        if isinstance(getattr(c.cell_contents, "log", None), list)
    )


def run(length: int, budget: float, seed: int, names: list[str]) -> str:
    task = task_for(length, budget, seed)
    runs = []
    for name in names:
        sc.HessianFree = Recorded
        runs.append(sc.hf_run(task, name, "HF", task.hf_default_regime | {"kw": KW[name]}))
    sc.HessianFree = HessianFree
    load0 = open("/proc/loadavg").read().split()[:3]
    t0 = time.perf_counter()
    rng = random.Random(seed)
    solved: dict[str, tuple[float, int]] = {}
    live = list(runs)
    for r in runs:
        r.curve.append((0.0, task.error(r.model)))
    while live:
        rng.shuffle(live)
        for r in list(live):
            sc.advance(r, r.clock + 1e-9, "cpu")  # one step
            e = task.error(r.model)
            r.curve.append((r.clock, e))
            if e <= SOLVED and r.name not in solved:
                solved[r.name] = (r.clock, r.steps)
            if r.failed or r.name in solved or r.clock >= budget:
                live.remove(r)
    load1 = open("/proc/loadavg").read().split()[:3]
    ref = solved.get("T", (math.inf, math.inf))
    out = [
        f"\n### T = {length}, seed {seed}, budget {budget:g} s, load {' '.join(load0)} → "
        f"{' '.join(load1)}, wall {time.perf_counter() - t0:.0f} s\n",
        "| contender | solved at (s) | steps to solve | s/step | time / T's | steps / T's "
        "| error at end | ≤ 0.5 at step | λ at steps 0,1,2,5,10,20,40 | CG iters median "
        "| closure calls median | ρ median | steps with λ on the floor | floor at end "
        "| params SHA-1 after 5 steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        opt = _opt(r)
        log = opt.log
        t, n = solved.get(r.name, (math.inf, math.inf))
        left = next((i for i, (_, e) in enumerate(r.curve) if e <= 0.5), math.inf)
        lam = [s.damping for s in log]
        pick = [lam[i] for i in (0, 1, 2, 5, 10, 20, 40) if i < len(lam)]
        cg = np.median([s.cg_iters for s in log])
        calls = np.median([s.closure_calls for s in log])
        rho = np.nanmedian(np.array([s.rho for s in log], dtype=float))
        floored = sum(s.damping <= s.damping_floor * (1 + 1e-9) for s in log)
        ratios = f"{t / ref[0]:.2f} | {n / ref[1]:.2f}" if "T" in names else "– | –"
        out.append(
            f"| {r.name} | {t:.1f} | {n} | {r.clock / max(r.steps, 1):.3f} | "
            f"{ratios} | {r.curve[-1][1]:.3f} | {left} | "
            f"{' '.join(f'{x:.2g}' for x in pick)} | {cg:.0f} | {calls:.0f} | {rho:.2f} | "
            f"{floored}/{len(log)} | {log[-1].damping_floor:.2g} | "
            f"{getattr(r, 'sha5', '-')} |"
        )
    return "\n".join(out)


def _hash_hook() -> None:
    """Record each run's parameter SHA-1 after its 5th step (``LM`` against ``T``)."""
    base = sc.hf_run

    def hf_run(task, name, family, regime):
        r = base(task, name, family, regime)
        r.opt, step = _opt(r), r.step

        def stepped() -> None:
            step()
            if len(r.opt.log) == 5:
                flat = torch.cat([p.detach().reshape(-1) for p in r.model.parameters()])
                r.sha5 = hashlib.sha1(flat.numpy().tobytes()).hexdigest()[:10]

        r.step = stepped
        return r

    sc.hf_run = hf_run


def main() -> None:
    torch.set_num_threads(1)
    length, budget, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    _hash_hook()
    text = run(length, budget, seed, sys.argv[4].split(","))
    print(text, flush=True)
    old = REPORT.read_text() if REPORT.exists() else "# Addition T = 50: defaults vs config\n"
    save_text(REPORT, old + "\n" + text + "\n")


if __name__ == "__main__":
    main()
