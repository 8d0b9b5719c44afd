"""Where the local (Newton) phase pays: what distinguishes the fits it helps (squared error,
tinyce) from those it costs (deconv, tinybce, twohead, mdn) inside the phase (topic
"phaserule"; follow-up to "newtonexit" and "quadentry").

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_phaserule.py measure PROBLEM \\
        [--seeds 0,1,2] [--steps N] [--seconds S]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_phaserule.py race PROBLEM \\
        [--seeds 0,1,2] [--seconds 4,12] [--variants main,VARIANT,no-phase]
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_phaserule.py same PROBLEM \\
        [--seeds 0,1,2] [--steps N] [--seconds S] [--pair main,VARIANT]

``measure``: main's rule (``HessianFree(params)``, the ``(loss, outputs)`` closure) for N steps
or S CPU seconds; per step of the phase (and the 3 steps before it): CG's iterations and why
it stopped (``converged``: its residual test η within the cap), the problem's dimension n
against the cap 250, ρ, the rate, the step's length over the median of the 5 accepted steps
before the phase, the relative change of :math:`H_\\ell u` (fixed random output-space u)
between θ and θ + Δθ (the phase's own step), and the decrease per pass (closure calls +
products) in −log(gap) against the median of the 5 steps before the phase; then one summary
row per seed. ``race``/``same``: ``_quadentry``'s (``_newtonexit.race``: 1 thread, interleaved
one step each from the same weights, CPU = ``time.process_time`` of each contender's own
steps). PROBLEM: as ``_quadentry.py`` (smallres, interp, sine; deconv, twohead, mdn, tiedlm;
tinyce, tinybce; ``pinn:helmholtz``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _newtonexit as N  # noqa: E402
import _quadentry as Q  # noqa: E402

import hessfree._damping_control as damping_control  # noqa: E402
from hessfree import GGNProduct  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")
# main: the phase as before this topic; range: the library's (HessianFree._check_phase_range)
N.VARIANTS["main"] = {"_phase_exit": False}
N.VARIANTS["range"] = {}
N.VARIANTS["range64"] = {"_phase_range": 1 / 64}  # a tighter bound
N.VARIANTS["range16"] = {"_phase_range": 1 / 16}  # a looser one


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _probe(prob, m: torch.nn.Module):  # noqa: ANN001, ANN202
    """H_ℓu at the model's current weights (the library's probe: fixed u, own generator)."""
    params = list(m.parameters())
    with torch.enable_grad():
        if isinstance(prob, Q.Pinn):
            loss, out = prob.closure_for(m)()
        else:
            out = m(prob.x)
            loss = prob.loss(out, prob.y)
        return damping_control._loss_probe(GGNProduct(loss, out, params))


def measure(key: str, seeds: list[int], steps: int, seconds: float) -> list[dict]:
    print(f"## measure {key}: main's rule, {steps} steps or {seconds} CPU s\n")
    summaries = []
    for seed in seeds:
        prob = Q.Pinn(key[5:], seed) if key.startswith("pinn:") else N.Problem(key, seed)
        m = copy.deepcopy(prob.model)
        opt = N.make_opt(m, "main")
        closure = Q._closure(prob, m)
        n = sum(p.numel() for p in m.parameters())
        load0, cpu, rows = load(), 0.0, []
        k = 0
        while k < steps and cpu < seconds:
            theta0, gap0 = _flat(m), prob.gap(m)
            was = bool(opt._global_state().get("newton"))
            probe0 = _probe(prob, m) if was else None
            c0 = time.process_time()
            opt.step(closure)
            cpu += time.process_time() - c0
            i = opt.last_step
            gap1 = prob.gap(m)
            dtheta = float(torch.linalg.vector_norm(_flat(m) - theta0))
            change = math.nan
            if was and i.accepted and dtheta > 0:
                change = damping_control._probe_change(probe0, _probe(prob, m))
            passes = N.cost(i)
            speed = math.log(gap0 / gap1) / passes if gap0 > 0 and gap1 > 0 else math.nan
            rows.append(
                dict(
                    k=k,
                    phase=was,
                    gap=gap1,
                    rho=i.rho,
                    rate=i.step_rate,
                    cg=i.cg_iters,
                    reason=i.cg_reason,
                    eta=i.cg_rtol,
                    bt=i.backtrack_iter,
                    lam=i.damping,
                    len=dtheta,
                    change=change,
                    passes=passes,
                    speed=speed,
                    cpu=cpu,
                    accepted=i.accepted,
                )
            )
            k += 1
            if k > 5 and not any(r["accepted"] for r in rows[-5:]):
                break  # converged: nothing moves any more
        entry = next((r["k"] for r in rows if r["phase"]), None)
        print(f"### {key} seed {seed}: n = {n} (cap 250), phase from step {entry}; load {load0}")
        if entry is None:
            print(f"never entered in {k} steps; gap {rows[-1]['gap']:.3e}\n")
            summaries.append(dict(key=key, seed=seed, n=n, entry=None, gap=rows[-1]["gap"]))
            continue
        before = [r for r in rows[:entry] if r["accepted"]][-5:]
        len_ref = statistics.median(r["len"] for r in before)
        speed_ref = statistics.median(r["speed"] for r in before)
        print(
            f"reference (median of the 5 accepted steps before the phase): step length "
            f"{len_ref:.3e}, −log(gap) per pass {speed_ref:.3e}\n"
        )
        print(
            "| k | phase | gap | ρ | rate | CG | stop | η | backtracked to | λ | len / pre "
            "| ΔH_ℓu over the step | −log gap / pass ÷ pre | passes | CPU s |"
        )
        print("|---" * 15 + "|")
        for r in rows[max(0, entry - 3) : entry + 30]:
            print(
                f"| {r['k']} | {'on' if r['phase'] else ''} | {r['gap']:.3e} | {r['rho']:.3f} "
                f"| {r['rate']:.3g} | {r['cg']} | {r['reason']} | {r['eta']:.1e} | {r['bt']} "
                f"| {r['lam']:.1e} | {r['len'] / len_ref:.2f} | {r['change']:.2e} "
                f"| {r['speed'] / speed_ref:.2f} | {r['passes']} | {r['cpu']:.2f} |"
            )
        ph = [r for r in rows if r["phase"] and r["accepted"]]
        conv = sum(r["reason"] == "converged" for r in ph)
        first = ph[:5]
        s = dict(
            key=key,
            seed=seed,
            n=n,
            entry=entry,
            steps=len(ph),
            converged=conv,
            conv5=sum(r["reason"] == "converged" for r in first),
            reasons=",".join(r["reason"][:4] for r in first),
            rho5=statistics.median(r["rho"] for r in first),
            len5=statistics.median(r["len"] / len_ref for r in first),
            change5=statistics.median(r["change"] for r in first if not math.isnan(r["change"]))
            if any(not math.isnan(r["change"]) for r in first)
            else math.nan,
            speed5=statistics.median(r["speed"] / speed_ref for r in first),
            gap_entry=rows[entry - 1]["gap"] if entry else math.nan,
            gap=rows[-1]["gap"],
            cpu_phase=sum(r["cpu"] - (rows[r["k"] - 1]["cpu"] if r["k"] else 0.0) for r in ph),
            cpu=cpu,
        )
        summaries.append(s)
        print(f"\nload after {load()}\n")
    print(
        "| problem | seed | n | phase from | phase steps | converged (first 5) | first 5 stops "
        "| median ρ (first 5) | len / pre | ΔH_ℓu | speed ÷ pre | gap at entry | gap at end |"
    )
    print("|---" * 13 + "|")
    for s in summaries:
        if s["entry"] is None:
            never = f"| {s['key']} | {s['seed']} | {s['n']} | never |"
            print(never + " |" * 8 + f" {s['gap']:.2e} |")
            continue
        print(
            f"| {s['key']} | {s['seed']} | {s['n']} | {s['entry']} | {s['steps']} "
            f"| {s['converged']} ({s['conv5']}) | {s['reasons']} | {s['rho5']:.2f} "
            f"| {s['len5']:.2f} | {s['change5']:.1e} | {s['speed5']:.2f} | {s['gap_entry']:.2e} "
            f"| {s['gap']:.2e} |"
        )
    print(f"\nload at end {load()}\n")
    return summaries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["measure", "race", "same"])
    ap.add_argument("problem")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seconds", default="8")
    ap.add_argument("--variants", default="main,no-phase")
    ap.add_argument("--pair", default="main,no-phase")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    budgets = [float(s) for s in a.seconds.split(",")]
    if a.what == "measure":
        measure(a.problem, seeds, a.steps, max(budgets))
    elif a.what == "same":
        Q.same(a.problem, seeds, a.steps, max(budgets), a.pair.split(","))
    else:
        N.race(a.problem, seeds, budgets, a.variants.split(","), False)


if __name__ == "__main__":
    main()
