"""Section 1 of the benchmark: curvature-vector products against one gradient and against
what users would pick instead (torch.func, torch.autograd.functional, curvlinops, BackPACK).

Every contender is a *factory*: calling it does the contender's one-time set-up (for ours: the
forward pass and the first-order graph) and returns the zero-argument call that is timed. The
set-up itself is timed as separate contenders (``*.setup``), so "repeated product" times never
include it.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _bench_common import (
    Problem,
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
    save_png,
    verdict,
)

from hessfree import FisherProduct, GGNProduct, HessianProduct, ParamLayout

PROBLEMS = ("autoencoder", "mlp", "cnn")
TARGETS = {"ours.hvp": 1.7, "ours.ggn": 1.25, "ours.fisher": 1.5}
SPEEDUP_TARGET = 2.0
# Which competitor each of our products is compared with (same matrix), besides torch.func's hvp.
SAME_KIND = {
    "ours.hvp": "curvlinops.hessian",
    "ours.ggn": "curvlinops.ggn",
    "ours.fisher": "curvlinops.ef",
}

LABELS = {
    "grad": "one gradient (forward + backward), the reference",
    "ours.hvp": "hessfree HessianProduct.matvec (graph reused)",
    "ours.ggn": "hessfree GGNProduct.matvec",
    "ours.ggn_closed": "hessfree GGNProduct.matvec, loss without `/N` (closed-form H_l recognised)",
    "ours.fisher": "hessfree FisherProduct.matvec",
    "ours.jvp": "hessfree JacobianProduct.jvp (J v)",
    "ours.vjp": "hessfree JacobianProduct.vjp (J^T u)",
    "ours.hvp.setup": "hessfree HessianProduct set-up (forward + create_graph gradient)",
    "ours.ggn.setup": "hessfree GGNProduct set-up (forward + graphs; yields the gradient)",
    "ours.op_hvp": "hessfree.operators Hessian LinearOperator.matvec (numpy in/out)",
    "ours.op_ggn": "hessfree.operators GGN LinearOperator.matvec (numpy in/out)",
    "ours.op_fisher": "hessfree.operators Fisher LinearOperator.matvec (numpy in/out)",
    "func.hvp": "torch.func jvp(grad(f)) (forward-over-reverse, recomputes forward)",
    "func.linearize": "torch.func linearize(grad(f)) -> jvp_fn(v) (set-up excluded)",
    "func.linearize.setup": "torch.func linearize(grad(f)) set-up",
    "autograd.hvp": "torch.autograd.functional.hvp (recomputes everything)",
    "curvlinops.hessian": "curvlinops HessianLinearOperator @ v",
    "curvlinops.ggn": "curvlinops GGNLinearOperator @ v",
    "curvlinops.ef": "curvlinops EFLinearOperator @ v (empirical Fisher)",
    "backpack.hvp": "BackPACK hessian_vector_product (gradient graph passed in, reused)",
    "backpack.ggn": "BackPACK ggn_vector_product_from_plist (forward reused)",
}


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _operator_factories(prob: Problem, v: torch.Tensor) -> tuple[dict[str, Callable], str]:
    """Factories for ``hessfree.operators`` LinearOperators, if that module exists.

    The module is being written concurrently; its constructor is not fixed yet, so this tries
    the conventional ``(model, loss_fn, data)`` forms and reports what it could not build.
    """
    if not _have("hessfree.operators"):
        return {}, "`hessfree/operators.py` does not exist yet: operator matvecs skipped."
    import hessfree.operators as ops

    v_np = v.detach().cpu().numpy()
    out: dict[str, Callable] = {}
    notes = []
    for key, names in (
        ("ours.op_hvp", ("HessianLinearOperator", "HessianOperator")),
        ("ours.op_ggn", ("GGNLinearOperator", "GGNOperator")),
        ("ours.op_fisher", ("FisherLinearOperator", "FisherOperator")),
    ):
        cls = next((getattr(ops, n) for n in names if hasattr(ops, n)), None)
        if cls is None:
            notes.append(f"no {' / '.join(names)} in hessfree.operators")
            continue
        attempts = [
            lambda c=cls: c(prob.model, prob.loss, (prob.x, prob.y)),
            lambda c=cls: c(prob.model, prob.loss, [(prob.x, prob.y)]),
            lambda c=cls: c(prob.model, prob.loss, prob.x, prob.y),
        ]

        def make(attempts=attempts) -> Callable:
            errs = []
            for build in attempts:
                try:
                    op = build()
                    op.matvec(v_np)
                    return lambda: op.matvec(v_np)
                except Exception as err:  # noqa: BLE001 - unknown, concurrently written API
                    errs.append(f"{type(err).__name__}: {err}")
            raise RuntimeError("could not construct: " + " / ".join(e[:120] for e in errs))

        out[key] = make
    sig = ""
    try:
        cls = getattr(ops, "GGNLinearOperator", None) or getattr(ops, "GGNOperator", None)
        sig = f"{cls.__name__}{inspect.signature(cls)}" if cls is not None else ""
    except (TypeError, ValueError):
        pass
    return out, (
        "operators found" + (f": {sig}" if sig else "") + ("; " + "; ".join(notes) if notes else "")
    )


def factories(
    prob: Problem, seed: int
) -> tuple[dict[str, Callable[[], Callable[[], Any]]], list[str]]:
    """``name -> make`` where ``make()`` does the one-time set-up and returns the timed call."""
    model, x, y, loss_fn = prob.model, prob.x, prob.y, prob.loss
    params = prob.params
    layout = ParamLayout(params)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(layout.numel, generator=gen).to(x.device)
    vs = layout.split(v)
    notes: list[str] = []

    fwd, grad = prob.forward, prob.gradient

    def hvp_setup():
        return HessianProduct(fwd()[0], params)

    def ggn_setup():
        loss, out = fwd()
        return GGNProduct(loss, out, params)

    def fisher_setup():
        loss, out = fwd()
        return FisherProduct(loss, out, params)

    f: dict[str, Callable[[], Callable[[], Any]]] = {
        "grad": lambda: grad,
        "ours.hvp": lambda: (lambda H: lambda: H.matvec(v))(hvp_setup()),
        "ours.ggn": lambda: (lambda G: lambda: G.matvec(v))(ggn_setup()),
        "ours.fisher": lambda: (lambda Fi: lambda: Fi.matvec(v))(fisher_setup()),
        "ours.jvp": lambda: (lambda G: lambda: G.jacobian.jvp(v))(ggn_setup()),
    }

    def vjp_make():
        G = ggn_setup()
        u = torch.randn(G.outputs.shape, generator=gen).to(x.device)
        return lambda: G.jacobian.vjp(u)

    f["ours.vjp"] = vjp_make
    if prob.key == "autoencoder":

        def closed_make():
            out = model(x)
            loss = F.binary_cross_entropy_with_logits(out, y, reduction="sum")
            G = GGNProduct(loss, out, params)
            return lambda: G.matvec(v)

        f["ours.ggn_closed"] = closed_make
    f["ours.hvp.setup"] = lambda: hvp_setup
    f["ours.ggn.setup"] = lambda: ggn_setup

    ops, note = _operator_factories(prob, v)
    f.update(ops)
    notes.append(note)

    # ---- torch.func and torch.autograd.functional ----
    from torch.func import functional_call, linearize
    from torch.func import grad as fgrad
    from torch.func import jvp as fjvp

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    pdict = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    vdict = dict(zip(names, vs, strict=True))

    def floss(pd):
        return loss_fn(functional_call(model, pd, (x,)), y)

    f["func.hvp"] = lambda: lambda: fjvp(fgrad(floss), (pdict,), (vdict,))[1]
    f["func.linearize"] = lambda: (lambda jfn: lambda: jfn(vdict))(
        linearize(fgrad(floss), pdict)[1]
    )
    f["func.linearize.setup"] = lambda: lambda: linearize(fgrad(floss), pdict)

    def ag_hvp():
        return torch.autograd.functional.hvp(
            lambda *ps: floss(dict(zip(names, ps, strict=True))), tuple(pdict.values()), tuple(vs)
        )

    f["autograd.hvp"] = lambda: ag_hvp

    # ---- curvlinops ----
    if _have("curvlinops"):
        import curvlinops

        def cl(cls_name):
            def make():
                op = getattr(curvlinops, cls_name)(
                    model,
                    prob.loss_module,
                    params,
                    [(x, y)],
                    progressbar=False,
                    check_deterministic=False,
                    num_data=x.shape[0],
                )
                return lambda: op @ v

            return make

        f["curvlinops.hessian"] = cl("HessianLinearOperator")
        f["curvlinops.ggn"] = cl("GGNLinearOperator")
        f["curvlinops.ef"] = cl("EFLinearOperator")
    else:
        notes.append("curvlinops not installed: skipped.")

    # ---- BackPACK's autodiff-only products ----
    if _have("backpack"):
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
        from backpack.hessianfree.hvp import hessian_vector_product

        def bp_hvp():
            loss, _ = fwd()
            g = torch.autograd.grad(loss, params, create_graph=True)
            return lambda: hessian_vector_product(loss, params, vs, grad_params=g)

        def bp_ggn():
            loss, out = fwd()
            return lambda: ggn_vector_product_from_plist(loss, out, params, vs)

        f["backpack.hvp"] = bp_hvp
        f["backpack.ggn"] = bp_ggn
    else:
        notes.append("BackPACK not installed: skipped.")
    return f, notes


# ---------------------------------------------------------------------------------------------
# running


def memory_task(settings: Settings, key: str) -> dict:
    """Worker: peak memory of set-up + one call for every contender of one problem."""
    prob = make_problem(key, settings.device, settings.seed)
    fac, _ = factories(prob, settings.seed)
    out = {}
    # warm every code path once (lazy initialisation in torch and the libraries)
    for make in fac.values():
        try:
            make()()
        except Exception:  # noqa: BLE001
            continue
    for name, make in fac.items():
        try:
            out[name] = peak_memory(lambda make=make: (lambda c: (c, c()))(make()), settings.device)
        except Exception:  # noqa: BLE001
            out[name] = (math.nan, math.nan)
    return {"memory": out}


# Set-ups too slow to repeat every round: timed in a few rounds of their own with a gradient.
SLOW_SETUPS = ("func.linearize.setup",)


def run(settings: Settings, log: Callable[[str], None]) -> dict:
    results = {}
    for key in PROBLEMS:
        prob = make_problem(key, settings.device, settings.seed)
        log(f"[products] {key}: {prob.numel:,} parameters")
        fac, notes = factories(prob, settings.seed)
        calls, errors = {}, {}
        for name, make in fac.items():
            try:
                calls[name] = make()
            except Exception as err:  # noqa: BLE001
                errors[name] = f"{type(err).__name__}: {str(err)[:200]}"
        slow = {n: calls.pop(n) for n in SLOW_SETUPS if n in calls}
        t = interleave(
            calls,
            rounds=settings.rounds,
            device=settings.device,
            seed=settings.seed,
            warmup=1 if settings.quick else 2,
            max_seconds=settings.block_seconds,
            min_rounds=min(3, settings.rounds),
        )
        t.errors.update(errors)
        del calls
        if slow:
            ts = interleave(
                {**slow, "grad": fac["grad"]()},
                rounds=2,
                device=settings.device,
                seed=settings.seed,
                warmup=0,
                min_rounds=2,
            )
            t.errors.update(ts.errors)
            for n in slow:
                if n in ts.samples:  # padded to the block's length so the tables can index it
                    ratio = ts.arr(n) / ts.arr("grad")
                    t.samples[n] = list(np.resize(ratio, t.rounds) * t.arr("grad"))
                    notes.append(
                        f"`{n}`: timed in {ts.rounds} separate rounds with a gradient (too slow to "
                        "repeat in every round); its time column is its ratio × this block's "
                        "gradient."
                    )
        log(f"[products] {key}: {t.rounds} rounds; failed: {sorted(t.errors) or 'none'}")
        profiles = {}
        missed = [
            n for n, tg in TARGETS.items() if n in t.samples and ratio_stats(t, n, "grad")[1] > tg
        ]
        if missed:
            from _bench_profile import profile_call

            profiles["grad"] = profile_call(fac["grad"](), settings.device)
            for n in missed:
                profiles[n] = profile_call(fac[n](), settings.device)
        if settings.quick:
            mem = {"error": "not measured in --quick"}
        else:
            mem = run_in_worker(memory_task, settings, key)
        results[key] = dict(
            title=prob.title,
            numel=prob.numel,
            notes=prob.notes + notes,
            timings=t,
            memory=mem.get("memory", {}),
            memory_error=mem.get("error"),
            profiles=profiles,
        )
        del prob, fac
    return results


# ---------------------------------------------------------------------------------------------
# report


def headline_rows(results: dict) -> list[list[str]]:
    """Rows of the headline table: each target with the measured value and met/missed."""
    rows = []
    for key, r in results.items():
        t: Timings = r["timings"]
        for name, target in TARGETS.items():
            if name not in t.samples:
                continue
            q = ratio_stats(t, name, "grad")
            rows.append(
                [
                    key,
                    f"{name.split('.')[1]} / gradient",
                    f"≤ {target}",
                    fmt_q(q),
                    verdict(q[1], target),
                ]
            )
            for comp in ("func.hvp", SAME_KIND[name]):
                if comp in t.samples:
                    s = quartiles(t.arr(comp) / t.arr(name))
                    rows.append(
                        [
                            key,
                            f"{comp} / {name.split('.')[1]} (speed-up)",
                            f"≥ {SPEEDUP_TARGET}",
                            fmt_q(s),
                            verdict(s[1], SPEEDUP_TARGET, at_most=False),
                        ]
                    )
    return rows


def report(results: dict) -> str:
    parts = [
        "## 1. Curvature-vector products\n",
        "Each table: one problem, all contenders interleaved round-robin (shuffled order per "
        "round) "
        "in one process. *ratio* = time / one gradient (forward + backward) timed in the same "
        "round: "
        "median [quartiles] over rounds. *time* = median ms (IQR), context only. *peak* = memory "
        "above the level before the call for set-up + one call (see README), MiB and as a ratio to "
        "the gradient's peak. Repeated products exclude the one-time set-up (`*.setup` rows "
        "give it).\n",
    ]
    for key, r in results.items():
        t: Timings = r["timings"]
        mem = r["memory"]
        parts.append(
            f"### ({'abc'[PROBLEMS.index(key)]}) {r['title']} — {r['numel']:,} parameters, "
            f"{t.rounds} rounds\n"
        )
        parts += [f"- {n}" for n in r["notes"] if n]
        g_peak = mem.get("grad", (math.nan, math.nan))[0]
        rows = []
        for name in t.samples:
            q = ratio_stats(t, name, "grad")
            target = TARGETS.get(name)
            pk = mem.get(name, (math.nan, math.nan))[0]
            rows.append(
                [
                    f"`{name}`",
                    LABELS.get(name, name),
                    fmt_q(q),
                    fmt_ms(quartiles(t.arr(name))),
                    f"{fmt(pk, 0)} ({fmt(pk / g_peak if g_peak else math.nan, 2)}×)",
                    f"≤ {target}: {verdict(q[1], target)}" if target else "",
                ]
            )
        rows.sort(
            key=lambda row: (not row[0].startswith("`grad"), not row[0].startswith("`ours"), row[0])
        )
        parts.append("")
        parts.append(
            md_table(
                [
                    "contender",
                    "what",
                    "ratio to gradient",
                    "time ms",
                    "peak MiB (× grad)",
                    "target",
                ],
                rows,
            )
        )
        for name, err in sorted(t.errors.items()):
            parts.append(f"\n- `{name}` failed: {err}")
        if r.get("memory_error"):
            parts.append(f"\n- memory: {r['memory_error'][-300:]}")
        # speed-ups
        srows = []
        for ours in TARGETS:
            if ours not in t.samples:
                continue
            for comp in (
                "func.hvp",
                "func.linearize",
                "autograd.hvp",
                SAME_KIND[ours],
                "backpack.hvp" if ours == "ours.hvp" else "backpack.ggn",
            ):
                if comp in t.samples and not (
                    ours == "ours.fisher" and comp.startswith("backpack")
                ):
                    s = quartiles(t.arr(comp) / t.arr(ours))
                    tgt = comp in ("func.hvp", SAME_KIND[ours])
                    srows.append(
                        [
                            f"`{ours}`",
                            f"`{comp}`",
                            fmt_q(s),
                            f"≥ {SPEEDUP_TARGET}: {verdict(s[1], SPEEDUP_TARGET, at_most=False)}"
                            if tgt
                            else "",
                        ]
                    )
        if srows:
            parts.append(
                "\nSpeed-up of ours over each alternative (their time / ours, same round):\n"
            )
            parts.append(md_table(["ours", "alternative", "speed-up", "target"], srows))
        prof = r.get("profiles") or {}
        if prof:
            from _bench_profile import describe

            g = prof["grad"]
            prow = [
                [
                    f"`{n}`",
                    f"{p['total']:.1f}",
                    f"{p['gemm']:.1f} ({p['gemm_calls']})",
                    fmt(p["gemm"] / g["gemm"] if g["gemm"] else math.nan),
                    f"{p['other']:.1f}",
                    fmt(p["other"] / g["gemm"] if g["gemm"] else math.nan),
                    describe(p),
                ]
                for n, p in prof.items()
            ]
            parts.append(
                "\nWhy a target was missed: `torch.profiler` self time per call (ms; one run "
                "of 3 calls, "
                "so absolute values are noisy) split into matrix products/convolutions (GEMM) and "
                "the rest, both also as multiples of the gradient's GEMM time:\n"
            )
            parts.append(
                md_table(
                    [
                        "call",
                        "total",
                        "GEMM (calls)",
                        "GEMM / grad GEMM",
                        "non-GEMM",
                        "non-GEMM / grad GEMM",
                        "largest non-GEMM ops",
                    ],
                    prow,
                )
            )
        parts.append("")
    return "\n".join(parts)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 5.5), squeeze=False)
    for ax, (key, r) in zip(axes[0], results.items(), strict=True):
        t: Timings = r["timings"]
        names = [n for n in t.samples if n != "grad"]
        names.sort(key=lambda n: np.median(t.arr(n) / t.arr("grad")))
        data = [t.arr(n) / t.arr("grad") for n in names]
        colors = ["tab:blue" if n.startswith("ours") else "tab:gray" for n in names]
        bp = ax.boxplot(data, vert=False, widths=0.6, patch_artist=True, showfliers=False)
        for patch, c in zip(bp["boxes"], colors, strict=True):
            patch.set_facecolor(c)
            patch.set_alpha(0.6)
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8)
        for name, target in TARGETS.items():
            if name in names:
                ax.plot([target], [names.index(name) + 1], marker="|", color="red", ms=14, mew=2)
        ax.set_xscale("log")
        ax.set_xlabel("time / one gradient (same round)")
        ax.set_title(key, fontsize=10)
    fig.suptitle("Curvature-vector products (blue: hessfree; red ticks: targets)")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
