"""Section 2 of the benchmark: optimizer steps on the CURVES autoencoder (batch 2000).

* One Hessian-free step (GGN curvature) broken down into its parts: the closure that builds
  the graph, the curvature set-up, the products inside CG, CG's own work, the trial
  evaluations (CG backtracking and line search) and the rest, read from the step's own
  ``StepInfo.time_phases`` (the closure syncs the device, so its forward pass is counted).
* Time per CG iteration relative to one gradient, and CG's overhead measured directly: the
  same ``hessfree.cg`` call with the real damped GGN product, and with a diagonal product whose
  own cost is timed separately.
* Adam, SGD (momentum) and L-BFGS steps, interleaved with the HF step and the gradient.
* Peak memory of an HF step against a plain gradient step (in a spawned worker).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from _bench_common import (
    Settings,
    Timings,
    fmt,
    fmt_ms,
    fmt_q,
    interleave,
    make_problem,
    md_table,
    peak_memory,
    quartiles,
    ratio_stats,
    run_in_worker,
    sync,
    verdict,
)

import hessfree
from hessfree import GGNProduct, HessianFree

CG_ITER_TARGET = 1.35
CG_OVERHEAD_TARGET = 0.05
MEMORY_TARGET = 3.0
# λ for the autoencoder: Martens' reference code starts at 45 on the same loss scaling
# (summed over pixels, averaged over cases).
AE_DAMPING = 45.0


def hf_options(settings: Settings) -> dict:
    return dict(curvature="ggn", damping=AE_DAMPING, cg_max_iter=settings.step_cg_max_iter)


def _optimizers(prob, settings: Settings):
    """Independent copies of the model with their optimizer and one-step function each."""
    x, y, loss_fn = prob.x, prob.y, prob.loss
    steps, hf_log = {}, []

    m = copy.deepcopy(prob.model)
    opt = HessianFree(m.parameters(), **hf_options(settings))

    def hf_closure(m=m):
        out = m(x)
        loss = loss_fn(out, y)
        sync(settings.device)  # the step's 'evaluate' phase then includes the forward pass
        return loss, out

    def hf_step(opt=opt):
        t0 = time.perf_counter()
        opt.step(hf_closure)
        sync(settings.device)
        wall = time.perf_counter() - t0
        info = opt.last_step
        phases = info.time_phases  # the optimizer's own per-phase timings
        first = phases.get("evaluate", 0.0)
        setup = phases.get("curvature", 0.0)
        trials = phases.get("backtrack", 0.0) + phases.get("line_search", 0.0)
        cg_t = phases.get("solve", math.nan)
        hf_log.append(
            dict(
                wall=wall,
                total=info.time_total,
                products=info.time_products,
                cg=cg_t,
                closure0=first,
                setup=setup,
                trials=trials,
                cg_iters=info.cg_iters,
                matvecs=info.cg_matvecs,
                calls=info.closure_calls,
                status=info.status,
                reason=info.cg_reason,
                rho=info.rho,
                damping=info.damping,
            )
        )

    steps["hf"] = hf_step

    def first_order(make_opt, name, **kw):
        m = copy.deepcopy(prob.model)
        o = make_opt(m.parameters(), **kw)

        def closure(m=m, o=o):
            o.zero_grad(set_to_none=True)
            loss = loss_fn(m(x), y)
            loss.backward()
            return loss

        steps[name] = lambda o=o, c=closure: o.step(c)
        return o

    first_order(torch.optim.Adam, "adam", lr=1e-3)
    first_order(torch.optim.SGD, "sgd", lr=1e-3, momentum=0.9)
    lbfgs = first_order(
        torch.optim.LBFGS,
        "lbfgs",
        lr=1.0,
        max_iter=1,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    return steps, hf_log, lbfgs


def _cg_contenders(prob, settings: Settings) -> tuple[dict, int]:
    """``hessfree.cg`` with the real damped GGN product and with a cheap diagonal one."""
    params = prob.params
    out = prob.model(prob.x)
    G = GGNProduct(prob.loss(out, prob.y), out, params)
    b = -G.gradient
    damped = G.damped(AE_DAMPING)
    # A diagonal with eigenvalues spread over 1..1e6, so that CG does not converge (and stop)
    # within k iterations: every solve runs exactly k iterations.
    d = torch.pow(10.0, 6.0 * torch.rand_like(b))
    k = settings.step_cg_max_iter

    def cheap(v):
        return v * d

    def solve(matvec):
        res = hessfree.cg(matvec, b, max_iter=k, rtol=0.0, progress_tol=None)
        if res.num_iter != k:
            raise RuntimeError(
                f"hessfree.cg stopped after {res.num_iter} of {k} iterations ({res.reason})."
            )
        return res

    def cheap_k():
        for _ in range(k):
            cheap(b)

    fns = {
        "cg.ggn": lambda: solve(damped),
        "cg.cheap": lambda: solve(cheap),
        "cheap_matvec x k": cheap_k,
    }
    return fns, k


def memory_task(settings: Settings) -> dict:
    prob = make_problem("autoencoder", settings.device, settings.seed)
    steps, hf_log, _ = _optimizers(prob, settings)
    # warm up lazy state (optimizer buffers exist after the first step, as in training)
    for name in ("adam", "sgd", "lbfgs"):
        steps[name]()
    out = {}
    for name in ("sgd", "adam", "lbfgs", "hf"):
        out[name] = peak_memory(steps[name], settings.device)
    # where the HF step's memory goes: the pieces on their own, each above the same baseline
    model, x, y, loss_fn, params = prob.model, prob.x, prob.y, prob.loss, prob.params
    parts = {}
    parts["forward graph (kept)"] = peak_memory(lambda: loss_fn(model(x), y), settings.device)

    def ggn():
        o = model(x)
        return GGNProduct(loss_fn(o, y), o, params)

    parts["GGN set-up: forward + graphs (kept)"] = peak_memory(ggn, settings.device)
    G = ggn()
    v = torch.randn(G.layout.numel, device=x.device)
    parts["one GGN product, on top of the set-up"] = peak_memory(
        lambda: G.matvec(v), settings.device
    )
    k = settings.step_cg_max_iter
    parts[f"hessfree.cg, {k} iterations, on top of the set-up"] = peak_memory(
        lambda: hessfree.cg(
            G.damped(AE_DAMPING), -G.gradient, max_iter=k, rtol=0.0, progress_tol=None
        ),
        settings.device,
    )
    parts["one parameter vector (float32)"] = (
        G.layout.numel * 4 / 2**20,
        G.layout.numel * 4 / 2**20,
    )
    return {"memory": out, "parts": parts, "hf_log": hf_log}


def run(settings: Settings, log: Callable[[str], None]) -> dict:
    prob = make_problem("autoencoder", settings.device, settings.seed)
    params = prob.params

    def grad():
        return torch.autograd.grad(prob.loss(prob.model(prob.x), prob.y), params)

    steps, hf_log, lbfgs = _optimizers(prob, settings)
    evals0 = []

    def lbfgs_step():
        st = lbfgs.state[lbfgs._params[0]]
        before = st.get("func_evals", 0)
        steps["lbfgs"]()
        evals0.append(lbfgs.state[lbfgs._params[0]]["func_evals"] - before)

    fns = {
        "grad": grad,
        "hf": steps["hf"],
        "adam": steps["adam"],
        "sgd": steps["sgd"],
        "lbfgs": lbfgs_step,
    }
    log(f"[steps] HF, Adam, SGD, L-BFGS steps, {settings.step_rounds} rounds")
    t = interleave(
        fns, rounds=settings.step_rounds, device=settings.device, seed=settings.seed, warmup=1
    )
    hf_rounds = hf_log[-t.rounds :]
    # CG on its own
    cg_fns, k = _cg_contenders(prob, settings)
    cg_fns["grad"] = grad
    log(f"[steps] hessfree.cg, {k} iterations, real vs cheap product")
    tc = interleave(
        cg_fns,
        rounds=max(3, settings.step_rounds),
        device=settings.device,
        seed=settings.seed + 1,
        warmup=1,
    )
    from _bench_profile import profile_call

    cg_profile = profile_call(cg_fns["cg.cheap"], settings.device, reps=1)
    log("[steps] memory (worker)")
    mem = run_in_worker(memory_task, settings)
    return dict(
        timings=t,
        hf=hf_rounds,
        cg_profile=cg_profile,
        lbfgs_evals=evals0[-t.rounds :],
        cg=tc,
        cg_k=k,
        memory=mem.get("memory", {}),
        memory_parts=mem.get("parts", {}),
        memory_error=mem.get("error"),
        hf_options=hf_options(settings),
    )


def headline_rows(r: dict) -> list[list[str]]:
    rows = []
    tc, k = r["cg"], r["cg_k"]
    q = quartiles(tc.arr("cg.ggn") / k / tc.arr("grad"))
    rows.append(
        [
            "autoencoder",
            "CG iteration (hessfree.cg, damped GGN) / gradient",
            f"≤ {CG_ITER_TARGET}",
            fmt_q(q),
            verdict(q[1], CG_ITER_TARGET),
        ]
    )
    ov = _overhead(r)
    rows.append(
        [
            "autoencoder",
            "CG overhead / CG time (direct)",
            f"< {CG_OVERHEAD_TARGET:.0%}",
            fmt_q(ov, 3),
            verdict(ov[1], CG_OVERHEAD_TARGET),
        ]
    )
    mem = r["memory"]
    if "hf" in mem and "sgd" in mem:
        ratio = mem["hf"][0] / mem["sgd"][0]
        rows.append(
            [
                "autoencoder",
                "HF step peak memory / gradient (SGD) step",
                f"≤ {MEMORY_TARGET}",
                fmt(ratio),
                verdict(ratio, MEMORY_TARGET),
            ]
        )
    return rows


def _overhead(r: dict) -> tuple[float, float, float]:
    """Share of a CG solve that is not the product: per round, (cheap solve − k cheap products)
    / (real solve) — CG's own vector work relative to a solve with the real product."""
    tc = r["cg"]
    return quartiles((tc.arr("cg.cheap") - tc.arr("cheap_matvec x k")) / tc.arr("cg.ggn"))


def report(r: dict) -> str:
    t: Timings = r["timings"]
    tc: Timings = r["cg"]
    k = r["cg_k"]
    parts = [
        "## 2. Optimizer steps (CURVES autoencoder, batch 2000)\n",
        f"HessianFree({', '.join(f'{a}={b!r}' for a, b in r['hf_options'].items())}); the "
        f"closure returns "
        "`(loss, outputs)`. Adam (lr 1e-3), SGD (lr 1e-3, momentum 0.9) and L-BFGS (max_iter=1, "
        "strong Wolfe, history 20) take full-batch steps on their own copies of the model; all "
        f"interleaved with one gradient, {t.rounds} rounds.\n",
    ]
    rows = []
    for name in ("grad", "hf", "adam", "sgd", "lbfgs"):
        if name in t.samples:
            rows.append([name, fmt_q(ratio_stats(t, name, "grad")), fmt_ms(quartiles(t.arr(name)))])
    parts.append(md_table(["step", "ratio to gradient", "time ms"], rows))
    if r["lbfgs_evals"]:
        parts.append(
            f"\nL-BFGS function evaluations per step: median {np.median(r['lbfgs_evals']):.0f}."
        )
    # HF breakdown
    hf = r["hf"]
    if hf:
        keys = [
            ("closure0", "closure: forward pass (graph kept)"),
            ("setup", "curvature set-up (GGN graphs, gradient, norm)"),
            ("products", "CG: curvature products (StepInfo.time_products)"),
            ("cg_own", "CG: everything but the products (incl. adding λv)"),
            ("trials", "trial evaluations (CG backtracking + line search)"),
            ("other", "other (warm start, ρ, λ, parameter copies)"),
        ]
        for s in hf:
            s["cg_own"] = s["cg"] - s["products"]
            s["other"] = s["total"] - s["closure0"] - s["setup"] - s["cg"] - s["trials"]
        total = np.array([s["total"] for s in hf])
        brows = []
        for key, label in keys:
            a = np.array([s[key] for s in hf])
            brows.append([label, fmt_q(quartiles(a / total), 3), f"{np.median(a) * 1e3:.0f}"])
        parts.append(
            f"\nOne HF step broken down (shares of `StepInfo.time_total`, median [quartiles] over "
            f"{len(hf)} steps):\n"
        )
        parts.append(md_table(["part", "share of step", "median ms"], brows))
        g_med = np.median(t.arr("grad"))
        per_it = np.array([s["cg"] / max(s["matvecs"], 1) for s in hf]) / g_med
        prod_share = np.array([s["products"] / s["total"] for s in hf])
        parts.append(
            f"\n- CG iterations per step: {', '.join(str(s['cg_iters']) for s in hf)} "
            f"(stop: {', '.join(sorted({s['reason'] for s in hf}))}); closure calls per step: "
            f"{', '.join(str(s['calls']) for s in hf)}; status: "
            f"{', '.join(sorted({s['status'] for s in hf}))}."
        )
        parts.append(
            f"- Inside the step: CG time per product / median gradient = "
            f"{fmt_q(quartiles(per_it))}; "
            f"products are {fmt_q(quartiles(prod_share), 3)} of the step."
        )
    # CG direct
    q_it = quartiles(tc.arr("cg.ggn") / k / tc.arr("grad"))
    ov = _overhead(r)
    per_it_own = quartiles((tc.arr("cg.cheap") - tc.arr("cheap_matvec x k")) / k)
    parts.append(
        f"\n`hessfree.cg` on its own ({k} iterations, `progress_tol=None`, rtol 0, "
        f"{tc.rounds} rounds, interleaved with a gradient):\n"
    )
    parts.append(
        md_table(
            ["quantity", "value", "target"],
            [
                [
                    "time per CG iteration (damped GGN) / gradient",
                    fmt_q(q_it),
                    f"≤ {CG_ITER_TARGET}: {verdict(q_it[1], CG_ITER_TARGET)}",
                ],
                [
                    "CG's own work per iteration (cheap-product solve − cheap products), ms",
                    f"{per_it_own[1] * 1e3:.2f}",
                    "",
                ],
                [
                    "CG's own work / real CG solve",
                    fmt_q(ov, 3),
                    f"< {CG_OVERHEAD_TARGET:.0%}: {verdict(ov[1], CG_OVERHEAD_TARGET)}",
                ],
                ["solve with real product, ms", fmt_ms(quartiles(tc.arr("cg.ggn"))), ""],
                ["solve with cheap product, ms", fmt_ms(quartiles(tc.arr("cg.cheap"))), ""],
            ],
        )
    )
    cp = r.get("cg_profile")
    if cp:
        from _bench_profile import describe

        parts.append(
            f"\nProfile of the cheap-product solve (`torch.profiler`, per iteration): CG's "
            f"largest ops "
            f"are {describe(dict(cp, top=[(n_, t_ / k, c_ // k) for n_, t_, c_ in cp['top']]))} "
            f"(the cheap product itself is one `mul` per iteration)."
        )
    mem = r["memory"]
    if mem:
        base = mem.get("sgd", (math.nan,))[0]
        mrows = [[name, fmt(v[0], 0), fmt(v[0] / base)] for name, v in mem.items()]
        parts.append(
            "\nPeak memory of one step above the level before it (model, data and optimizer state "
            "already resident; MiB, and as a ratio to the SGD step = one gradient step):\n"
        )
        parts.append(md_table(["step", "peak MiB", "ratio to gradient step"], mrows))
        if r.get("memory_parts"):
            parts.append(
                "\nWhere an HF step's memory goes (each measured on its own above the same "
                "baseline; "
                "*kept* = still resident after the call):\n"
            )
            parts.append(
                md_table(
                    ["piece", "peak MiB", "kept MiB", "peak / gradient step"],
                    [
                        [k_, fmt(v[0], 0), fmt(v[1], 0), fmt(v[0] / base)]
                        for k_, v in r["memory_parts"].items()
                    ],
                )
            )
        if "hf" in mem:
            ratio = mem["hf"][0] / base
            parts.append(
                f"\nHF step / gradient step: {fmt(ratio)} (target ≤ {MEMORY_TARGET}: "
                f"{verdict(ratio, MEMORY_TARGET)})."
            )
    if r.get("memory_error"):
        parts.append(f"\n- memory worker failed: {r['memory_error'][-300:]}")
    for name, err in t.errors.items():
        parts.append(f"\n- `{name}` failed: {err}")
    return "\n".join(parts) + "\n"
