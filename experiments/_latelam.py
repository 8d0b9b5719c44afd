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
jumps to the current quotient); ``early``: no raise after the first ``2 _RISE_WINDOW`` steps
(the counterfactual: is a late raise right or a ratchet?). ``analyze``: from the logs, each
late raise, λ's position on the floor and ρ after it, and per 500 steps the median fresh-batch
loss, ρ and λ.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_latelam.py race --seeds 0 \
        --rules main early --budget 300 --log /tmp/latelam-s0.jsonl
    PYTHONPATH=. python3 experiments/_latelam.py analyze --logs /tmp/latelam-s0.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch

import hessfree
import hessfree._damping_control as damping_control

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

TUNED = "250/62, cg≤2, K-FAC rank 32 refresh 2, λ≥0.3"


def _early(state: dict) -> bool:
    return len(state.get("recent_losses", [])) < 2 * damping_control._RISE_WINDOW


#: name: (floor_due replacement or None, raise_floor replacement or None)
RULES = {
    "main": (None, None),
    "early": (lambda self, st: _early(st) if self._kfac_in_use() else self._floor_stale(st), None),
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
        log["checked"] = log.get("checked", 0) + 1
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
                if raised and c["n"] > 2 * damping_control._RISE_WINDOW:
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


def analyze(paths: list[str]) -> None:
    """From ``race``'s per-step logs: each late raise (step, scale, λ), and for each run the
    share of steps after it whose λ sat on the floor with ρ > 3/4 (Levenberg-Marquardt would
    have lowered λ), ρ's median, and the errors at the evaluations around it."""
    for path in paths:
        rows = [json.loads(line) for line in open(path)]  # noqa: SIM115
        for name in dict.fromkeys(r["run"] for r in rows):
            run = [r for r in rows if r["run"] == name]
            raises = [
                r for r in run if r["raised"] and r["step"] > 2 * damping_control._RISE_WINDOW
            ]
            first = raises[0]["step"] if raises else None
            after = [r for r in run if first is not None and r["step"] > first]
            pinned = [r for r in after if r["lam"] <= r["floor"] * (1 + 1e-6)]
            good = [r for r in pinned if r["rho"] > 0.75]
            rhos = [r["rho"] for r in after if math.isfinite(r["rho"])]
            evs = [r for r in run if "train_error" in r]
            print(f"{path} {name}: {len(run)} steps, late checks "
                  f"{sum(1 for r in run if r['checked'] and r['step'] > 16)}, raises "
                  + ", ".join(f"{r['step']} ({r['cpu']:.0f} s): scale {r['scale']:.4g} λ "
                              f"{r['lam']:.3g}" for r in raises))  # fmt: skip
            if after:
                rho = statistics.median(rhos)
                print(f"  after step {first}: λ on the floor {len(pinned)}/{len(after)} steps, "
                      f"of them ρ > 3/4 {len(good)}; median ρ {rho:.3f}")  # fmt: skip
            # the fresh batches' loss (each step's on a batch it was not fitted to) and ρ (on
            # its own batch) per 500 steps: medians
            bins = {}
            for r in run:
                bins.setdefault(r["step"] // 500, []).append(r)
            print("  per 500 steps, median fresh-batch loss / ρ / λ: " + "; ".join(
                f"{k * 500}+ {statistics.median(r['f0'] for r in b):.1f} / "
                f"{statistics.median(r['rho'] for r in b if math.isfinite(r['rho'])):.2f} / "
                f"{statistics.median(r['lam'] for r in b):.3g}"
                for k, b in bins.items()))  # fmt: skip
            pick = evs[:: max(1, len(evs) // 10)] + evs[-1:]
            print("  step cpu train held-out: " + "; ".join(
                f"{r['step']} {r['cpu']:.0f} {r['train_error']:.2f} {r['held_error']:.2f}"
                for r in pick))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["race", "analyze"])
    ap.add_argument("--logs", nargs="*", default=[])
    ap.add_argument("--rules", nargs="+", default=["main", "early"])
    ap.add_argument("--budget", type=float, default=300.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--log", default=None)
    a = ap.parse_args()
    print(f"hessfree from {hessfree.__file__}; load at start: {load()}", flush=True)
    if a.what == "analyze":
        analyze(a.logs)
    else:
        race(a.rules, a.budget, a.seeds, a.eval_every, a.log)
    print("\nload at end:", load(), flush=True)


if __name__ == "__main__":
    main()
