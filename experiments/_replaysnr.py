"""replaysnr: why ``replay_rng`` (common random numbers within a step) lags fresh draws per
call early on ``_unseenmb.py``'s ``ln`` row, and λ rules that might close the gap.

Equal steps off the clock, as ``_unseenmb.equal_steps`` runs them (batches from a generator
seeded ``seed``, the global stream seeded ``seed`` per contender so dropout starts alike); per
step the diagnostics (λ, ρ, ν, Δf, Δq, CG iterations, step norm) and every 5 steps the
train-set loss in eval mode.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_replaysnr.py diag ln --seeds 1 2 3
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_replaysnr.py race ln drop \
        --seeds 1 2 3 4 5 6 7 8 --variants fresh replay ...

``race`` prints, per problem and variant, the train-set loss at 75, 150 and 300 steps and the
medians of the evaluations (every 5 steps) in (0, 75], (75, 150] and (150, 300], as
geometric-mean ratios over seeds to ``replay`` (the default) and to ``fresh``
(``replay_rng=False``), with how many seeds are lower.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import warnings
from typing import Any

import _unseen
import _unseenmb
import torch

import hessfree

torch.set_num_threads(1)

EVAL_EVERY = 5


def _patch(opt: hessfree.HessianFree, rule: str, log: list[dict], snr: list[float]) -> None:
    """Record what ``_inconclusive`` sees each step and, for ``rule`` != 'default', replace the
    λ hold under replay by the rule tried (``snr[-1]``: this step's g₂ᵀg₁/‖g₁‖², if measured)."""
    plain = opt._inconclusive

    def inconclusive(state, run, actual, predicted, rho) -> bool:
        hold = plain(state, run, actual, predicted, rho)
        nu = run.mask_noise
        within = math.isfinite(nu) and abs(actual - predicted) <= nu
        s = snr[-1] if snr else math.nan
        if rule == "rho<1/4":  # hold only a poor ρ (< ¼) within the noise
            hold = within and not rho >= 0.25
        elif rule == "snr":  # λ-free: hold while the gradient's signal share is below ½
            hold = math.isfinite(s) and s < 0.5
        elif rule == "snr-rho":  # hold when ρ / s (the share-corrected ρ) is at least ½
            hold = math.isfinite(s) and (s <= 0 or rho >= 0.5 * s)
        elif rule == "nu/2":  # the current hold with half the noise band
            hold = math.isfinite(nu) and abs(actual - predicted) <= 0.5 * nu
        elif rule == "snr|noise":  # the current hold, or the signal share below ½
            hold = hold or (math.isfinite(s) and s < 0.5)
        log.append(dict(actual=actual, predicted=predicted, nu=nu, mask_diff=run.f0 - run.f_base,
                        within=within, hold=hold, snr=s))  # fmt: skip
        return hold

    opt._inconclusive = inconclusive


def _measure_snr(opt: hessfree.HessianFree, cell: list, snr: list[float]) -> None:
    """After the extra f(θ₀; m₂) evaluation: the gradients under m₁ and m₂ at θ₀ (two more
    forward-backward passes per step, an experiment's cost), and s = g₂ᵀg₁/‖g₁‖²."""
    plain = opt._observe_mask_noise
    params = [p for g in opt.param_groups for p in g["params"]]

    def observe(state, run) -> None:
        plain(state, run)
        stream = run.counter.stream
        saved = stream._get()
        grads = []
        for start in (stream._start, stream._after_model):
            stream._set(start)
            with torch.enable_grad():
                out = cell[0]()
                loss = out[0] if isinstance(out, tuple) else out
                grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        stream._set(saved)
        g1, g2 = grads
        snr.append(float(g2 @ g1 / (g1 @ g1)))

    opt._observe_mask_noise = observe


def _lam0(opt: hessfree.HessianFree, factor: float) -> None:
    """λ₀ ('auto''s calibration) times ``factor`` (the brief's "a different initial λ")."""
    plain = opt._calibrate_damping

    def calibrate(curvature, product, g, g_norm, run) -> None:
        plain(curvature, product, g, g_norm, run)
        if run.state["step"] == 0:
            lam = opt._damping_policy(run.state).clip(run.damping * factor)
            run.damping = run.state["damping"] = lam

    opt._calibrate_damping = calibrate


def _lower_on_descent(opt: hessfree.HessianFree, rec: dict) -> None:
    """After the step: a held (inconclusive) step whose trial loss decreased (Δf < 0) lowers λ
    to at most ⅔ of the λ it used."""
    if rec.get("hold") and rec.get("actual", math.nan) < 0:
        state = opt._global_state()
        new = min(state["damping"], 2.0 / 3.0 * rec["lam"])
        state["damping"] = opt._damping_policy(state).clip(new)


VARIANTS: dict[str, dict] = {
    "fresh": dict(kw={"replay_rng": False}),
    "replay": dict(kw={}),  # the default: replay + hold within ν (dropdefault)
    "noshold": dict(kw={}, rule="off"),  # replay as dropoutrng shipped it
    "alt": dict(kw={}, seed_offset=1000),  # control: the default, other dropout masks
    "fresh-alt": dict(kw={"replay_rng": False}, seed_offset=1000),  # control for `fresh`
    "rho<1/4": dict(kw={}, rule="rho<1/4"),
    "descent": dict(kw={}, post=_lower_on_descent),
    "nu/2": dict(kw={}, rule="nu/2"),
    "lam0/3": dict(kw={}, setup=lambda opt: _lam0(opt, 1.0 / 3.0)),
    "lam0x3": dict(kw={}, setup=lambda opt: _lam0(opt, 3.0)),
    "snr": dict(kw={}, rule="snr", snr=True),
    "snr-rho": dict(kw={}, rule="snr-rho", snr=True),
    "snr|noise": dict(kw={}, rule="snr|noise", snr=True),
    "snr-diag": dict(kw={}, snr=True),  # the default, with s measured (diagnostics only)
}


def run_one(problem: dict, variant: str, seed: int, n: int) -> dict:
    x, y = problem["data"][:2]
    loss_fn, batch = problem["loss"], problem["batch"]
    torch.manual_seed(0)
    model = problem["make"]()
    gen = torch.Generator().manual_seed(seed)
    spec = VARIANTS[variant]
    torch.manual_seed(seed + spec.get("seed_offset", 0))
    opt = hessfree.HessianFree(model.parameters(), **spec["kw"])
    if spec.get("rule") == "off":
        opt._hold_within_noise = False
    log: list[dict] = []
    snr: list[float] = []
    cell: list = [None]
    _patch(opt, spec.get("rule", "default"), log, snr)
    if spec.get("snr"):
        _measure_snr(opt, cell, snr)
    if "setup" in spec:
        spec["setup"](opt)
    steps, evals = [], {}
    params = list(model.parameters())
    for k in range(1, n + 1):
        idx = torch.randint(len(y), (batch,), generator=gen)
        xb, yb = x[idx], y[idx]

        def closure(xb=xb, yb=yb) -> Any:
            o = model(xb)
            return loss_fn(o, yb), o

        cell[0] = closure
        before = [p.detach().clone() for p in params]
        nlog = len(log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)
        info = opt.last_step
        moved = zip(params, before, strict=True)
        norm = math.sqrt(sum(float((p.detach() - b).square().sum()) for p, b in moved))
        rec = dict(lam=info.damping, next=info.next_damping, rho=info.rho, cg=info.cg_iters,
                   norm=norm, rate=info.step_rate, loss=info.loss, gnorm=info.grad_norm,
                   floor=info.damping_floor)  # fmt: skip
        rec.update(log[nlog] if len(log) > nlog else {})
        if "post" in spec:
            spec["post"](opt, rec)
        steps.append(rec)
        if k % EVAL_EVERY == 0 or k in (n // 4, n // 2, n):
            evals[k] = _unseen.train_set_loss(model, loss_fn, x, y)
    return dict(steps=steps, evals=evals)


def _f(v: Any, fmt: str = ".3g") -> str:
    return "" if v is None else format(v, fmt) if isinstance(v, float) else str(v)


def diag(key: str, seeds: list[int], n: int, variants: list[str]) -> None:
    p = _unseenmb.PROBLEMS[key]()
    for seed in seeds:
        runs = {v: run_one(p, v, seed, n) for v in variants}
        print(f"\n#### {key}, seed {seed}: per step (every 5th), {' | '.join(variants)}\n")
        cols = ["lam", "rho", "snr", "nu", "actual", "predicted", "mask_diff", "cg", "norm", "rate"]
        print("| step | " + " | ".join(f"{v} {c}" for v in variants for c in cols) + " |")
        print("|---" * (1 + len(cols) * len(variants)) + "|")
        for i in range(0, n, 5):
            row = []
            for v in variants:
                s = runs[v]["steps"][i]
                row += [_f(s.get(c)) for c in cols]
            print(f"| {i + 1} | " + " | ".join(row) + " |")
        print("\nsummaries over steps 1-25, 26-50, 51-75, 76-100 (medians; held = hold count):\n")
        for v in variants:
            st = runs[v]["steps"]
            parts = []
            for a in range(0, n, 25):
                w = st[a : a + 25]
                fin = [s["rho"] for s in w if math.isfinite(s["rho"])]
                parts.append(
                    f"[{a + 1}-{a + 25}] λ {statistics.median(s['lam'] for s in w):.3g} "
                    f"ρ {statistics.median(fin) if fin else math.nan:.2f} "
                    f"(-inf {sum(s['rho'] == -math.inf for s in w)}, <¼ "
                    f"{sum(not s['rho'] >= 0.25 for s in w)}, >¾ "
                    f"{sum(s['rho'] > 0.75 for s in w)}) "
                    f"held {sum(s.get('hold', False) for s in w)} "
                    f"CG {statistics.median(s['cg'] for s in w):.0f} "
                    f"‖p‖ {statistics.median(s['norm'] for s in w):.3g}"
                )
            print(f"- {v}: " + "; ".join(parts))
        marks = sorted(runs[variants[0]]["evals"])
        print("\n- train-set loss at " + ", ".join(str(k) for k in marks))
        for v in variants:
            print(f"  - {v}: " + ", ".join(f"{f:.4g}" for _, f in sorted(runs[v]["evals"].items())))
        sys.stdout.flush()


def _gm(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def race(key: str, seeds: list[int], n: int, variants: list[str]) -> None:
    p = _unseenmb.PROBLEMS[key]()
    marks = [n // 4, n // 2, n]
    res: dict[str, list[list[float]]] = {v: [] for v in variants}  # per seed: marks + late median
    for seed in seeds:
        for v in variants:  # interleaved per seed
            r = run_one(p, v, seed, n)
            ev = r["evals"]
            windows = [(0, n // 4), (n // 4, n // 2), (n // 2, n)]
            meds = [statistics.median(f for k, f in ev.items() if a < k <= b) for a, b in windows]
            res[v].append([ev[k] for k in marks] + meds)
        print(f"  seed {seed} done; load {open('/proc/loadavg').read().split()[0]}", flush=True)
    names = [f"at {k}" for k in marks]
    names += [f"median ({a}, {b}]" for a, b in [(0, n // 4), (n // 4, n // 2), (n // 2, n)]]
    for ref in ("replay", "fresh"):
        if ref not in variants:
            continue
        print(f"\n#### {key}: {n} steps, seeds {seeds}; geometric-mean ratio to `{ref}` "
              f"(seeds lower)\n")  # fmt: skip
        print("| variant | " + " | ".join(names) + " |")
        print("|---" * (1 + len(names)) + "|")
        for v in variants:
            cells = []
            for j in range(len(names)):
                rat = [a[j] / b[j] for a, b in zip(res[v], res[ref], strict=True)]
                cells.append(f"{_gm(rat):.3f} ({sum(r < 1 for r in rat)}/{len(rat)})")
            print(f"| {v} | " + " | ".join(cells) + " |")
    print(f"\n#### {key}: raw geometric means over seeds\n")
    print("| variant | " + " | ".join(names) + " |")
    print("|---" * (1 + len(names)) + "|")
    for v in variants:
        print(f"| {v} | " + " | ".join(f"{_gm([a[j] for a in res[v]]):.4g}"
                                      for j in range(len(names))) + " |")  # fmt: skip
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["diag", "race"])
    ap.add_argument("problems", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", nargs="*", default=["fresh", "replay"])
    a = ap.parse_args()
    print("load at start:", open("/proc/loadavg").read().strip())
    for key in a.problems:
        (diag if a.mode == "diag" else race)(key, a.seeds, a.steps, a.variants)
    print("\nload at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
