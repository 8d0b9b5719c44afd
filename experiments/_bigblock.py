"""bigblock: |H_ℓ| blocks above 16 outputs per example, only once CG has met negative curvature.

``HessianFree`` forms per-example |H_ℓ| blocks of a generic loss for up to 16 outputs per
example; after a Gauss-Newton solve stops on negative curvature (a convex loss cannot give one)
it remembers ``state['loss_not_convex']`` and forms them for up to
``HessianFree._max_block_not_convex`` (64). Parts:

* ``race``: unseen8's cosine-embedding siamese net (32 outputs per example), ``(loss, outputs)``
  full batch (``HF lo``) and mini-batches of 250 (``HF mb``), each as ``[main]`` (the cap stays
  16: main's behaviour), ``[new]`` (this branch) and ``[resolve]`` (the step that met negative
  curvature is solved again at once), against Adam at its tuned lr (batch 256, 1e-2);
  interleaved by CPU time in one process, same weights and batch stream, seeds 0 and 1.
* ``same``: a fixed number of steps with ``[main]`` and ``[new]`` on unseen8's convex 32-output
  generic loss (capcost) and lossmodels' mdn and hetero (K <= 16): parameters bitwise equal?
  CG negative-curvature stops and whether the flag was set; CPU per step of both.

Run: ``OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_bigblock.py [race|same]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections import Counter

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import _unseen8 as u8  # noqa: E402
from _lossmodels import family  # noqa: E402

import hessfree  # noqa: E402

torch.set_num_threads(1)


def _configure(run: u8.Run) -> u8.Run:
    """``[main]``: cap 16 after the flag too (main's products); ``[resolve]``: solve again."""
    if "[main]" in run.name:
        run.opt._max_block_not_convex = 16
    if "[resolve]" in run.name:
        run.opt._resolve_not_convex = True
    return run


def _stops(infos) -> str:
    c = Counter(str(i.cg_reason).split(".")[-1] for i in infos)
    return f"neg {c.get('negative_curvature', 0)}/{len(infos)}"


def race(seeds: list[int], budget: float) -> None:
    names = ["HF lo[main]", "HF lo[new]", "HF lo[resolve]", "HF mb[main]", "HF mb[new]",
             "HF mb[resolve]", "Adam256 1e-2"]  # fmt: skip
    for seed in seeds:
        prob = u8.p_cosemb(seed)
        runs = [_configure(u8.make_run(n, prob, seed)) for n in names]
        load0 = os.getloadavg()
        u8.interleave(runs, budget, eval_every=budget / 20)
        load1 = os.getloadavg()
        adam = next(r for r in runs if r.name.startswith("Adam"))
        ref = u8.best_at(adam.curve, budget)
        print(f"\n#### cosemb race, seed {seed}, {budget:g} CPU s each; load {load0[0]:.2f} → "
              f"{load1[0]:.2f}\n")  # fmt: skip
        print("| run | steps | CPU s / step | loss at ½ / 1 | ÷ Adam at 1 | ÷ [main] at 1 | "
              "CG stops | median ρ | λ at end |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        ends = {r.name: u8.best_at(r.curve, budget) for r in runs}
        for r in runs:
            half, end = u8.best_at(r.curve, budget / 2), ends[r.name]
            main = ends.get(r.name.split("[")[0] + "[main]", end)
            notes = ["", "", ""]
            if r.infos:
                rhos = [i.rho for i in r.infos if i.rho is not None and math.isfinite(i.rho)]
                notes = [_stops(r.infos), f"{statistics.median(rhos):.3g}" if rhos else "",
                         f"{r.infos[-1].damping:.3g}"]  # fmt: skip
            row = [r.name, str(r.steps), f"{r.clock / r.steps:.4f}", f"{half:.4g} / {end:.4g}",
                   f"{end / ref:.3g}", f"{end / main:.3g}", *notes]  # fmt: skip
            print("| " + " | ".join(row) + " |", flush=True)


def _capcost_problem() -> u8.Problem:
    """unseen8's capcost: a convex generic loss over 32 outputs per example (digits MLP)."""
    x, _ = u8._digits()
    y = torch.tanh(x @ torch.randn(64, 32, generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))
    return u8.Problem("convex generic loss, 32 outputs", net,
                      lambda o, t: (o - t).pow(2).mean(), (x, y))  # fmt: skip


def _steps(model, closure, variant: str, steps: int):
    opt = hessfree.HessianFree(model.parameters())
    if variant == "main":
        opt._max_block_not_convex = 16
    infos, cpu = [], 0.0
    for _ in range(steps):
        c0 = time.process_time()
        opt.step(closure)
        cpu += time.process_time() - c0
        infos.append(opt.last_step)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    flag = opt.state[next(iter(model.parameters()))].get("loss_not_convex", False)
    return flat, infos, cpu / steps, flag


def same(steps: int) -> None:
    load0 = os.getloadavg()
    print(f"\n#### same: {steps} steps, [main] vs [new]\n")
    print("| problem | seed | bitwise | neg. curvature stops main / new | flag main / new | "
          "CPU s / step main / new |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    cases = [("capcost (K=32, convex)", 0)] + [(f, s) for f in ("mdn", "hetero") for s in (0, 1)]
    for name, seed in cases:
        res = {}
        for variant in ("main", "new"):
            if name.startswith("capcost"):
                prob = _capcost_problem()
                model = prob.model

                def closure(model=model, prob=prob):
                    return prob.lo_of(model)
            else:
                model, loss_fn, x, y = family(name, 256, seed)

                def closure(model=model, loss_fn=loss_fn, x=x, y=y):
                    out = model(x)
                    return loss_fn(out, y), out

            res[variant] = _steps(model, closure, variant, steps)
        (fa, ia, ca, ga), (fb, ib, cb, gb) = res["main"], res["new"]
        print(f"| {name} | {seed} | {torch.equal(fa, fb)} | {_stops(ia)} / {_stops(ib)} | "
              f"{ga} / {gb} | {ca:.4f} / {cb:.4f} |", flush=True)  # fmt: skip
    load1 = os.getloadavg()
    print(f"\nload {load0[0]:.2f} → {load1[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=("race", "same"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")  # fmt: skip
    if args.part == "race":
        race([int(s) for s in args.seeds.split(",")], args.budget)
    else:
        same(args.steps)


if __name__ == "__main__":
    main()
