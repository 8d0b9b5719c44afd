"""Addition T = 80: what HF needs to solve it, by steps and thread CPU time to solve ("add80").

The scorecard's addition task and regime (``scorecard.make_addition_task``: 100 tanh units,
spectral radius 1.0, 1,000-case gradient batches, 100-case curvature batches, hidden states
returned so ``structural_damping='auto'`` is μ = 0.03), seed ``s`` for data and initial
weights. Contenders start from the same weights (rescaled when a contender sets another
spectral radius) and take steps in shuffled turns in one process (torch 1 thread); the test
error (≤ 0.01 = solved) is evaluated after every step, off the clock. Each step's thread CPU
time (``time.thread_time``) is the clock: load-free on a shared machine, unlike wall time.

Every step is logged: λ, ρ, CG iterations and stop reason, the backtracked iterate, the
gradient norm, the batch loss before/after, closure calls, CPU time. Every ``DIAG`` steps, on
100 test cases: the gain of the hidden-state Jacobian product over the whole sequence
(‖J_T ⋯ J_1 v‖ for a random unit v, J_t = diag(1 − h_t²) W_h; median over cases, log10), and
the output's sensitivity to the two marked values (∂y/∂value at the earlier and the later
marker; 1 and 1 when solved).

Contenders (``NAMES``): ``D`` (no arguments), ``T`` (the config row), and variants
``<base>:<key>=<value>,...`` written with ``+`` between settings, e.g. ``T+cg=100``,
``T+radius=1.2``, ``T+cb=200``, ``T+b=500``, ``T+mu=0.1``; keys: ``cg`` (cg_max_iter), ``mu``
(structural_damping), ``lam`` (damping), ``radius`` (spectral radius of the initial W_h),
``cb`` (curvature batch), ``b`` (gradient batch).

Usage::

    python experiments/_add80.py 80 0 D,T 150 [cpu_cap_s]   # length, seed, contenders, step cap

Appends its tables to ``results/2026-12-02-add80.md`` and the per-step logs to
``results/2026-12-02-add80-steps.jsonl``.
"""

from __future__ import annotations

import json
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

from hessfree import HessianFree  # noqa: E402

HERE = Path(__file__).resolve().parent / "results"
REPORT = HERE / "2026-12-02-add80.md"
STEPS = HERE / "2026-12-02-add80-steps.jsonl"
DIAG = 5
KEYS = {"cg": "cg_max_iter", "mu": "structural_damping", "lam": "damping"}


def parse(name: str) -> tuple[dict, dict]:
    """``(kwargs, regime)`` of a contender name (module docstring)."""
    base, *mods = name.split("+")
    kw = {"D": {}, "T": dict(sc.ADDITION_TUNED)}[base]
    kw = dict(kw)
    regime = {"batch": 1000, "curvature_batch": 100, "radius": 1.0}
    for mod in mods:
        key, value = mod.split("=")
        if key in KEYS:
            kw[KEYS[key]] = int(value) if key == "cg" else float(value)
        elif key == "radius":
            regime["radius"] = float(value)
        elif key in ("cb", "b"):
            regime["curvature_batch" if key == "cb" else "batch"] = int(value)
        else:
            raise ValueError(f"unknown contender setting {key!r} in {name!r}")
    return kw, regime


@torch.no_grad()
def diagnostics(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """The hidden-state Jacobian's gain over the sequence and the marked values' weights."""
    _, h = model.forward_with_hidden(x)  # (N, T, H)
    w = model.recurrent.weight
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(x.shape[0], w.shape[0], generator=gen)
    v /= v.norm(dim=1, keepdim=True)
    half = None
    for t in range(h.shape[1]):  # v_t = D_t W v_{t-1}: d h_t / d h_0 applied to v
        v = (1 - h[:, t] ** 2) * (v @ w.T)
        if t == h.shape[1] // 2:
            half = v.norm(dim=1)
    gain = v.norm(dim=1)
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        model(xg).sum().backward()
    sens = xg.grad[:, :, 0]  # ∂y/∂value
    marks = x[:, :, 1].nonzero()[:, 1].view(-1, 2)  # the two marker steps, ascending
    rows = torch.arange(x.shape[0])
    model.zero_grad(set_to_none=True)
    return {
        "log10_gain_T": float(gain.log10().median()),
        "log10_gain_half": float(half.log10().median()),
        "radius": float(torch.linalg.eigvals(w.double()).abs().max()),
        "sens_first": float(sens[rows, marks[:, 0]].median()),
        "sens_second": float(sens[rows, marks[:, 1]].median()),
    }


def build(length: int, seed: int, name: str) -> tuple[sc.Run, sc.Task]:
    kw, regime = parse(name)
    task = sc.make_addition_task(length, 1e9, seed)
    if regime["radius"] != 1.0:
        task.model.spectral_radius = regime["radius"]
        task.model.rescale_recurrent_()
    sc.HessianFree = Recorded
    try:
        r = sc.hf_run(
            task,
            name,
            "HF",
            {"batch": regime["batch"], "curvature_batch": regime["curvature_batch"], "kw": kw},
        )
    finally:
        sc.HessianFree = HessianFree
    r.opt = next(
        c.cell_contents
        for c in r.step.__closure__ or []
        if isinstance(getattr(c.cell_contents, "log", None), list)
    )
    return r, task


def run(length: int, seed: int, names: list[str], cap: int, cpu_cap: float) -> str:
    from hessfree.train.data import make_addition

    built = {n: build(length, seed, n) for n in names}
    # the test set's first 100 cases
    xdiag = make_addition(length=length, num_train=10_000, num_test=1000, seed=seed).x_test[:100]
    load0 = open("/proc/loadavg").read().split()[:3]
    t0 = time.perf_counter()
    rng = random.Random(seed)
    state = {n: {"cpu": 0.0, "wall": 0.0, "steps": 0, "solved": None, "log": []} for n in names}
    live = list(names)
    for n in names:
        r, task = built[n]
        state[n]["err0"] = task.error(r.model)
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
            dc, dw = time.thread_time() - c0, time.perf_counter() - w0
            s["cpu"] += dc
            s["wall"] += dw
            s["steps"] += 1
            e = task.error(r.model)
            info = r.opt.last_step
            row = {
                "step": s["steps"],
                "err": e,
                "cpu": round(s["cpu"], 3),
                "lam": info.damping,
                "rho": info.rho,
                "cg": info.cg_iters,
                "why": str(info.cg_reason),
                "bt": info.backtrack_iter,
                "rate": info.step_rate,
                "gnorm": info.grad_norm,
                "loss": info.loss,
                "after": info.loss_after,
                "calls": info.closure_calls,
                "status": str(info.status),
            }
            if s["steps"] % DIAG == 0 or s["steps"] == 1:
                row.update(diagnostics(r.model, xdiag))
            s["log"].append(row)
            if e <= sc.SOLVED and s["solved"] is None:
                s["solved"] = (s["steps"], s["cpu"])
            if s["solved"] or s["steps"] >= cap or s["cpu"] >= cpu_cap:
                live.remove(n)
    load1 = open("/proc/loadavg").read().split()[:3]
    with STEPS.open("a") as fh:
        for n in names:
            fh.write(
                json.dumps({"length": length, "seed": seed, "name": n, "log": state[n]["log"]})
                + "\n"
            )
    ref = state[names[0]]
    out = [
        f"\n### T = {length}, seed {seed}, cap {cap} steps / {cpu_cap:g} s CPU, load "
        f"{' '.join(load0)} → {' '.join(load1)}, wall {time.perf_counter() - t0:.0f} s\n",
        "| contender | steps to solve | CPU s to solve | CPU s/step | steps / first's "
        "| CPU / first's | error at end (step) | first step ≤ 0.5 | λ at steps 1,10,20,40,80 "
        "| CG median | CG stops | ρ median | log10 gain over T at steps 1, 20, 40, end "
        "| ∂y/∂(1st, 2nd marked value) at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        s = state[n]
        log = s["log"]
        st, sc_ = s["solved"] or (math.inf, math.inf)
        rst, rsc = ref["solved"] or (math.inf, math.inf)
        left = next((x["step"] for x in log if x["err"] <= 0.5), "–")
        lam = [log[i - 1]["lam"] for i in (1, 10, 20, 40, 80) if i <= len(log)]
        reasons: dict[str, int] = {}
        for x in log:
            reasons[x["why"]] = reasons.get(x["why"], 0) + 1
        diag = [x for x in log if "log10_gain_T" in x]
        gains = [x["log10_gain_T"] for x in diag if x["step"] in (1, 20, 40)] + (
            [diag[-1]["log10_gain_T"]] if diag else []
        )
        sens = f"{diag[-1]['sens_first']:.2f}, {diag[-1]['sens_second']:.2f}" if diag else "–"
        out.append(
            f"| {n} | {st} | {sc_:.1f} | {s['cpu'] / max(s['steps'], 1):.3f} | "
            f"{st / rst:.2f} | {sc_ / rsc:.2f} | {log[-1]['err'] if log else math.nan:.3f} "
            f"({s['steps']}) | {left} | {' '.join(f'{x:.2g}' for x in lam)} | "
            f"{np.median([x['cg'] for x in log]):.0f} | {reasons} | "
            f"{np.nanmedian(np.array([x['rho'] for x in log], dtype=float)):.2f} | "
            f"{' '.join(f'{g:.1f}' for g in gains)} | {sens} |"
            + (f" failed: {s['failed']}" if "failed" in s else "")
        )
    return "\n".join(out)


def show(length: int, seed: int, name: str, every: int = 5) -> str:
    """Every ``every``-th step of the last logged run of ``name`` (a per-step table)."""
    runs = [json.loads(line) for line in STEPS.read_text().splitlines()]
    mine = [r for r in runs if (r["length"], r["seed"], r["name"]) == (length, seed, name)]
    log = mine[-1]["log"]
    out = [
        f"\n{name}, T = {length}, seed {seed}: every {every}th step (diagnostics on 100 test "
        "cases)\n",
        "| step | test error | CPU s | λ | ρ | CG iters (stop) | backtracked to | rate | ‖g‖ "
        "| batch loss → after | log10 gain over T / T/2 | radius W_h | ∂y/∂1st, 2nd value |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in log:
        if x["step"] % every and x["step"] != 1 and x is not log[-1]:
            continue
        d = (
            f"{x['log10_gain_T']:.1f} / {x['log10_gain_half']:.1f} | {x['radius']:.2f} | "
            f"{x['sens_first']:.2f}, {x['sens_second']:.2f}"
            if "radius" in x
            else "| |"
        )
        out.append(
            f"| {x['step']} | {x['err']:.3f} | {x['cpu']:.0f} | {x['lam']:.2g} | "
            f"{x['rho']:.2f} | {x['cg']} ({x['why']}) | {x['bt']} | {x['rate']:.2g} | "
            f"{x['gnorm']:.2g} | {x['loss']:.3g} → {x['after']:.3g} | {d} |"
        )
    return "\n".join(out)


def main() -> None:
    if sys.argv[1] == "show":
        print(show(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])))
        return
    torch.set_num_threads(1)
    length, seed, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    cap = int(sys.argv[4])
    cpu_cap = float(sys.argv[5]) if len(sys.argv) > 5 else math.inf
    text = run(length, seed, names, cap, cpu_cap)
    print(text, flush=True)
    old = REPORT.read_text() if REPORT.exists() else "# add80: what addition T = 80 needs\n"
    REPORT.write_text(old + "\n" + text + "\n")


if __name__ == "__main__":
    main()
