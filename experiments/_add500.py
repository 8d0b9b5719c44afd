"""Addition T = 30/50/80: a 500-case gradient batch against the scorecard's 1,000 ("add500").

The scorecard's addition task (``scorecard.make_addition_task``: 100 tanh units, spectral
radius 1.0, 100-case curvature batches, μ = 0.03 from 'auto'), seed ``s`` for data and
initial weights. Contenders are ``_add80.py``'s names (``D`` = ``HessianFree(params)``, ``T`` =
the config row, ``+b=500`` the gradient batch, ``+floor=x`` the config's
``relative_min_damping``); they start from the same weights and take steps in shuffled turns
in one process (torch 1 thread). The test error (≤ 0.01 = solved) is evaluated after every
step, off the clock; a step's clock is its thread CPU time (``time.thread_time``), its wall
time is recorded beside it (their ratio is what the load takes from the scorecard's wall-clock
budget). Steps are deterministic (the same on any load); the SHA-1 of the parameters after 5
steps identifies a run across code versions.

Usage::

    python experiments/_add500.py LENGTH SEED D,D+b=500,T,T+b=500 STEP_CAP [CPU_CAP_S]

Appends a table to ``results/2026-12-02-add500.md`` and the per-step logs (error, CPU, wall,
λ, ρ, CG iterations) to ``results/2026-12-02-add500-steps.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _add80  # noqa: E402
import scorecard as sc  # noqa: E402

HERE = Path(__file__).resolve().parent / "results"
REPORT = HERE / "2026-12-02-add500.md"
STEPS = HERE / "2026-12-02-add500-steps.jsonl"


def build(length: int, seed: int, name: str):
    """``_add80.build`` with one more setting, ``floor`` (``relative_min_damping``)."""
    mods = name.split("+")
    floor = [m for m in mods if m.startswith("floor=")]
    rest = "+".join(m for m in mods if not m.startswith("floor="))
    if floor:
        saved = dict(sc.ADDITION_TUNED)
        sc.ADDITION_TUNED["relative_min_damping"] = float(floor[0].split("=")[1])
        try:
            return _add80.build(length, seed, rest)
        finally:
            sc.ADDITION_TUNED.clear()
            sc.ADDITION_TUNED.update(saved)
    return _add80.build(length, seed, rest)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def run(length: int, seed: int, names: list[str], cap: int, cpu_cap: float) -> str:
    built = {n: build(length, seed, n) for n in names}
    load0 = open("/proc/loadavg").read().split()[:3]
    t0 = time.perf_counter()
    rng = random.Random(seed)
    state = {
        n: {"cpu": 0.0, "wall": 0.0, "steps": 0, "solved": None, "log": [], "sha": "–"}
        for n in names
    }
    live = list(names)
    while live:
        rng.shuffle(live)
        for n in list(live):
            r, task = built[n]
            s = state[n]
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                r.step()
            except Exception as err:  # noqa: BLE001 - a diverging run is a result
                s["failed"] = f"{type(err).__name__}: {str(err)[:80]}"
                live.remove(n)
                continue
            s["cpu"] += time.thread_time() - c0
            s["wall"] += time.perf_counter() - w0
            s["steps"] += 1
            if s["steps"] == 5:
                s["sha"] = digest(r.model)
            e = task.error(r.model)
            info = r.opt.last_step
            s["log"].append(
                {
                    "step": s["steps"],
                    "err": e,
                    "cpu": round(s["cpu"], 3),
                    "wall": round(s["wall"], 3),
                    "lam": info.damping,
                    "rho": info.rho,
                    "cg": info.cg_iters,
                }
            )
            if e <= sc.SOLVED and s["solved"] is None:
                s["solved"] = (s["steps"], s["cpu"])
            if s["solved"] or s["steps"] >= cap or s["cpu"] >= cpu_cap:
                live.remove(n)
    load1 = open("/proc/loadavg").read().split()[:3]
    with STEPS.open("a") as fh:
        for n in names:
            row = {"length": length, "seed": seed, "name": n, "sha5": state[n]["sha"]}
            fh.write(json.dumps(row | {"log": state[n]["log"]}) + "\n")
    ref = state[names[0]]
    out = [
        f"\n### T = {length}, seed {seed}, cap {cap} steps / {cpu_cap:g} s CPU, load "
        f"{' '.join(load0)} → {' '.join(load1)}, wall {time.perf_counter() - t0:.0f} s\n",
        "| contender | steps to solve | CPU s to solve | CPU s/step | wall/CPU | steps / first's "
        "| CPU / first's | error at end (step) | λ at steps 1, 10, 20, 40, end | SHA-1 @5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        s, log = state[n], state[n]["log"]
        st, cs = s["solved"] or (math.inf, math.inf)
        rst, rcs = ref["solved"] or (math.inf, math.inf)
        lam = [log[i - 1]["lam"] for i in (1, 10, 20, 40) if i <= len(log)]
        lam += [log[-1]["lam"]] if log else []
        out.append(
            f"| {n} | {st if s['solved'] else '–'} | {cs:.1f} | "
            f"{s['cpu'] / max(s['steps'], 1):.3f} | {s['wall'] / max(s['cpu'], 1e-9):.2f} | "
            f"{st / rst:.2f} | {cs / rcs:.2f} | {log[-1]['err'] if log else math.nan:.3f} "
            f"({s['steps']}) | {' '.join(f'{x:.2g}' for x in lam)} | {s['sha']} |"
            + (f" failed: {s['failed']}" if "failed" in s else "")
        )
    return "\n".join(out)


def main() -> None:
    torch.set_num_threads(1)
    length, seed, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    cap = int(sys.argv[4])
    cpu_cap = float(sys.argv[5]) if len(sys.argv) > 5 else math.inf
    text = run(length, seed, names, cap, cpu_cap)
    print(text, flush=True)
    old = REPORT.read_text() if REPORT.exists() else "# add500: raw tables (2026-12-02)\n"
    REPORT.write_text(old + "\n" + text + "\n")


if __name__ == "__main__":
    main()
