"""Does the defaults' relative floor ratchet late on CURVES at 250/62 (``experiments/README.md``,
"latelam")?

``race``: CURVES (5,000 images) with ``HessianFree(params)`` and no arguments at 250-case
gradient / 62-case curvature batches, under each floor rule (``RULES``), and the tuned row
("250/62, cg≤2, K-FAC rank 32 refresh 2, λ≥0.3", under the library's rule), from the same
weights and batch order (per seed), interleaved step by step in one process, each on its own CPU
clock (``time.process_time``) up to ``--budget`` seconds. Per step it logs λ, the floor, the
floor's scale, whether the scale was re-measured (``_raise_floor`` called) and raised, ρ and the
fresh batch's loss; every ``--eval-every`` steps (off the clock) the train error on the 5,000
images and a held-out error on 1,000 more images of the same generator. Summary tables go to
stdout, per-step logs to ``--log`` (one JSON line per step).

Rules (K-FAC steps; the early raises of "kfacfloor" are kept by all of them):
``main``: the library's (``_floor_stale``: the loss rose and a step overshot, then the scale
jumps to the current quotient); ``early``: no raise after the first ``2 _RISE_WINDOW`` steps;
``cap2``: a late raise multiplies the scale by at most 2.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_latelam.py race --seeds 0 \
        --rules main early --budget 300 --log /tmp/latelam-s0.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

import hessfree
import hessfree.optimizer as hopt

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

TUNED = "250/62, cg≤2, K-FAC rank 32 refresh 2, λ≥0.3"


def _early(state: dict) -> bool:
    return len(state.get("recent_losses", [])) < 2 * hopt._RISE_WINDOW


def _capped_raise(factor: float):
    """``_raise_floor`` with a late raise at most ``factor`` × the old scale."""
    library = hopt.HessianFree._raise_floor

    def raise_floor(self, curvature, product, g, g_norm, run) -> None:
        state = run.state
        if _early(state):
            return library(self, curvature, product, g, g_norm, run)
        gCg, gDg = self._curvature_along(curvature, product, g, g_norm, run)
        scale = abs(gCg) / gDg if gDg > 0 else math.nan
        old = state.get("damping_scale", 0.0)
        if not (math.isfinite(scale) and scale > old):
            return
        state["damping_scale"] = min(scale, factor * old)
        lam = self._damping_policy(state).clip(run.damping)
        if lam != run.damping:
            run.damping = state["damping"] = lam

    return raise_floor


#: name: (floor_due replacement or None, raise_floor replacement or None)
RULES = {
    "main": (None, None),
    "early": (lambda self, st: _early(st) if self._kfac_in_use() else self._floor_stale(st), None),
    "cap2": (None, _capped_raise(2.0)),
}


@contextlib.contextmanager
def rule(name: str, log: dict):
    """``RULES[name]`` in place of the library's; records into ``log`` whether this step
    re-measured the scale (``checked``)."""
    cls = hessfree.HessianFree
    saved = cls._floor_due, cls._raise_floor
    due, raise_ = RULES[name]
    if due is not None:
        cls._floor_due = due
    inner = raise_ or saved[1]

    def raise_floor(self, *args) -> None:
        log["checked"] = True
        return inner(self, *args)

    cls._raise_floor = raise_floor
    try:
        yield
    finally:
        cls._floor_due, cls._raise_floor = saved


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def race(
    names: list[str], budget: float, seeds: list[int], eval_every: int, log_path: str | None
) -> None:
    import scorecard as sc
    from _kfacfloor import _seeded_run

    from hessfree.train.data import make_curves

    task = sc.make_curves_task(quick=False)
    data = make_curves(num_train=5000, num_test=1000, seed=10)
    assert torch.equal(data.x_train, task.x), "held-out set must extend the same draw"
    held = data.x_test
    flat = held.flatten(1)

    @torch.no_grad()
    def held_error(m) -> float:
        return float((torch.sigmoid(m(held)) - flat).square().sum() / len(held))

    tuned = task.hf[TUNED]
    out = open(log_path, "a") if log_path else None  # noqa: SIM115
    marks = (45.0, 90.0, 150.0, 200.0, 250.0, 300.0)
    for seed in seeds:
        runs = []
        for name in [*names, "tuned"]:
            regime = tuned if name == "tuned" else dict(batch=250, curvature_batch=62, kw={})
            r, opt = _seeded_run(sc, task, name, regime, seed)
            runs.append(dict(name=name, r=r, opt=opt, cpu=0.0, n=0, marks={}, fires=[], evals=[]))
        l0 = load()
        while any(c["cpu"] < budget for c in runs):
            for c in runs:
                if c["cpu"] >= budget:
                    continue
                rec: dict = {}
                opt = c["opt"]
                before = opt._global_state().get("damping_scale", math.nan) if c["n"] else math.nan
                with rule(c["name"] if c["name"] != "tuned" else "main", rec):
                    t0 = time.process_time()
                    c["r"].step()
                    c["cpu"] += time.process_time() - t0
                c["n"] += 1
                gs, info = opt._global_state(), opt.last_step
                scale = gs.get("damping_scale", math.nan)
                raised = rec.get("checked", False) and scale > before
                if raised and c["n"] > 2 * hopt._RISE_WINDOW:
                    c["fires"].append((c["n"], round(c["cpu"], 1), before, scale))
                row = dict(
                    seed=seed, run=c["name"], step=c["n"], cpu=round(c["cpu"], 3),
                    lam=info.damping, next_lam=info.next_damping, floor=info.damping_floor,
                    scale=scale, checked=rec.get("checked", False), raised=raised,
                    rho=info.rho, f0=info.loss, status=str(info.status),
                )  # fmt: skip
                evaluate = c["n"] % eval_every == 0
                for m in marks:
                    if m not in c["marks"] and c["cpu"] >= m:
                        c["marks"][m] = (task.error(c["r"].model), c["n"])
                        evaluate = True
                if evaluate:
                    row["train_error"] = task.error(c["r"].model)
                    row["held_error"] = held_error(c["r"].model)
                    c["evals"].append((c["n"], c["cpu"], row["train_error"], row["held_error"]))
                if out:
                    out.write(json.dumps(row) + "\n")
        if out:
            out.flush()
        _summary(seed, runs, budget, marks, l0)


def _summary(seed: int, runs: list[dict], budget: float, marks, l0: str) -> None:
    print(f"\n#### CURVES 250/62, seed {seed}, {budget:g} s CPU each; load {l0} -> {load()}\n")
    print("| run | steps | " + " | ".join(f"train error @{m:g} s" for m in marks)
          + " | held-out end | λ end | scale end | late raises |")  # fmt: skip
    print("|---|---|" + "---|" * len(marks) + "---|---|---|---|")
    for c in runs:
        gs = c["opt"]._global_state()
        errs = " | ".join(f"{c['marks'].get(m, (math.nan,))[0]:.3f}" for m in marks)
        print(f"| {c['name']} | {c['n']} | {errs} | {c['evals'][-1][3]:.3f} | "
              f"{gs.get('damping', math.nan):.3g} | {gs.get('damping_scale', math.nan):.4g} | "
              f"{len(c['fires'])} |")  # fmt: skip
    tuned = next(c for c in runs if c["name"] == "tuned")
    for c in runs:
        if c is tuned:
            continue
        ratios = [c["marks"][m][0] / tuned["marks"][m][0] for m in marks if m in c["marks"]]
        print(f"\n{c['name']} / tuned at the marks: " + ", ".join(f"{x:.3f}" for x in ratios))
        for n, cpu, b, a in c["fires"]:
            print(f"  late raise at step {n} ({cpu} s): scale {b:.4g} -> {a:.4g}")
        # the held-out error along the run (off the clock)
        ev = c["evals"]
        pick = ev[:: max(1, len(ev) // 8)] + [ev[-1]]
        text = "; ".join(f"{n} {cpu:.0f}s {tr:.2f} {he:.2f}" for n, cpu, tr, he in pick)
        print(f"  (step, cpu, train, held-out): {text}")
    ev = tuned["evals"]
    pick = ev[:: max(1, len(ev) // 8)] + [ev[-1]]
    print("tuned (step, cpu, train, held-out): "
          + "; ".join(f"{n} {cpu:.0f}s {tr:.2f} {he:.2f}" for n, cpu, tr, he in pick))  # fmt: skip
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["race"])
    ap.add_argument("--rules", nargs="+", default=["main", "early"])
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--log", default=None)
    a = ap.parse_args()
    print(f"hessfree from {hessfree.__file__}; load at start: {load()}", flush=True)
    race(a.rules, a.budget, a.seeds, a.eval_every, a.log)
    print("\nload at end:", load(), flush=True)


if __name__ == "__main__":
    main()
