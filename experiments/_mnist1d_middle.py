"""MNIST-1D's middle phase (loss 1.5 -> 0.3): what makes HF reach Adam's ¼- and ½-budget losses
sooner (#14). Throwaway harness; ``experiments/README.md`` records every result.

Every contender is ``scorecard.py``'s quick MNIST-1D task and the scorecard's tuned regime
(250 ×1.1/step, curvature ¼ to 4 full-batch steps, ``cg_max_iter=10``) with one change, run
from the same initial weights and batch order, interleaved with Adam lr 0.01 b 100 (the
sweep's pick) in 80 slices of an 8 s budget, so that a time to a target is that of the step that
got there. Printed per contender: time to Adam's ¼ / ½ / full-budget losses as a ratio of
Adam's, the final loss, steps, and a per-step trace (batch, curvature batch, λ, ρ, CG
iterations and stop, backtracked iterate, seconds) with ``TRACE=1``.

Usage (torch 1 thread)::

    python experiments/_mnist1d_middle.py 8 ref,kfac,nocheck [repeats]
    python experiments/_mnist1d_middle.py passes   # what an HF step's passes cost
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402

from hessfree import HessianFree, KFACPreconditioner  # noqa: E402

REF = dict(batch=250, growth=1.1, curvature_batch=0.25, full_curvature_after=4, kw={})
BASE_KW = dict(cg_max_iter=10)


def variant(**change) -> dict:
    kw = dict(BASE_KW, **change.pop("kw", {}))
    return dict(REF, **change, kw=kw)


CONTENDERS = {
    "ref": variant(),
    "kfac": variant(kfac={}),
    "kfac_r32": variant(kfac=dict(rank=32)),
    "kfac_cg5": variant(kfac={}, kw=dict(cg_max_iter=5)),
    "kfac_half": variant(kfac={}, curvature_batch=0.5),
    "kfac_ref2": variant(kfac=dict(refresh=2)),
    "kfac_r16": variant(kfac=dict(rank=16)),
    "kfac_r8": variant(kfac=dict(rank=8)),
    "kfac_r32_cg5": variant(kfac=dict(rank=32), kw=dict(cg_max_iter=5)),
    "kfac_r32_ref2": variant(kfac=dict(rank=32, refresh=2)),
    "kfac_r32_cg20": variant(kfac=dict(rank=32), kw=dict(cg_max_iter=20)),
    "kfac_r32_all": variant(kfac=dict(rank=32), full_curvature_after=0),
    "k16_eighth": variant(kfac=dict(rank=16), curvature_batch=0.125),
    "k16_rd1e-3": variant(kfac=dict(rank=16, relative_damping=1e-3)),
    "k16_rd0.1": variant(kfac=dict(rank=16, relative_damping=0.1)),
    "k16_decay0.8": variant(kfac=dict(rank=16, decay=0.8)),
    "k16_g1.15": variant(kfac=dict(rank=16), growth=1.15),
    "k16_b125": variant(kfac=dict(rank=16), batch=125),
    "k16_g105mid": variant(kfac=dict(rank=16), growth_mid=1.05),
    "k16_exact": variant(kfac=dict(rank=16, num_probes=None)),
    "k16_b500": variant(kfac=dict(rank=16), batch=500),
    "k16_lr07": variant(kfac=dict(rank=16), kw=dict(lr=0.7)),
    "k16_lr085": variant(kfac=dict(rank=16), kw=dict(lr=0.85)),
    "k16_g12early": variant(kfac=dict(rank=16), growth=1.2, growth_mid=1.1),
    "k16_g13early": variant(kfac=dict(rank=16), growth=1.3, growth_mid=1.1),
    "k16_from1000": variant(kfac=dict(rank=16), kfac_from=1000),
    "k16_from500": variant(kfac=dict(rank=16), kfac_from=500),
    "k16_damp005": variant(kfac=dict(rank=16), kw=dict(damping=0.05)),
    "k16_nocheck": variant(kfac=dict(rank=16), kw=dict(cg_stop_on_increase=False)),
    "nocheck": variant(kw=dict(cg_stop_on_increase=False)),
    "martens": variant(kw=dict(damping_rule="martens")),
    "decay0": variant(kw=dict(cg_decay=0.0)),
    "decay09": variant(kw=dict(cg_decay=0.9)),
    "decay098": variant(kw=dict(cg_decay=0.98)),
    "nobt": variant(kw=dict(backtrack=False)),
    "nols": variant(kw=dict(line_search=None)),
    "dec13": variant(kw=dict(damping_decrease=1 / 3)),
    "cg20": variant(kw=dict(cg_max_iter=20)),
    "cg5": variant(kw=dict(cg_max_iter=5)),
    "check2": variant(kw=dict(cg_check_every=2)),
    "disjoint": variant(disjoint=True),
    "full8": variant(full_curvature_after=8),
    "g115mid": variant(growth_mid=1.15),
    "min_iter3": variant(kw=dict(cg_min_iter=3)),
    # the first seconds (cheaper early steps): switches while the batch is below `small` cases
    "k16_cg3small": variant(kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=3)),
    "k16_nochecksmall": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_stop_on_increase=False)
    ),
    "k16_ref2small": variant(kfac=dict(rank=16), small=1000, small_refresh=2),
    "k16_ref3small": variant(kfac=dict(rank=16), small=1000, small_refresh=3),
    "k16_ref2": variant(kfac=dict(rank=16, refresh=2)),
    "k16_full0": variant(kfac=dict(rank=16), full_curvature_after=0),
    "k16_full2": variant(kfac=dict(rank=16), full_curvature_after=2),
    "k16_full8": variant(kfac=dict(rank=16), full_curvature_after=8),
    "k16_decay0": variant(kfac=dict(rank=16), kw=dict(cg_decay=0.0)),
    # products are half an early step's cost: cap the curvature batch of the growing phase
    "k16_ccap500": variant(kfac=dict(rank=16), curvature_cap=500),
    "k16_ccap300": variant(kfac=dict(rank=16), curvature_cap=300),
    # K-FAC-like early steps (2026-11-30-mnist1d-early.md): one or two CG iterations, i.e. the
    # K-FAC direction scaled by the quadratic model, while the batch is small
    "k16_cg1small": variant(kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=1)),
    "k16_cg2small": variant(kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=2)),
    "k16_cg1small_d0": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=1, cg_decay=0.0)
    ),
    "k16_cg1small_b100": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=1), batch=100
    ),
    "k16_cg2small_b100": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=2), batch=100
    ),
    # with one iteration ρ ≈ 1 and λ collapses to ~1e-6 in 15 steps; the later full solves
    # then fail (ρ = -inf) until λ has doubled back: floor λ while small
    "k16_cg1s_md03": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=1, min_damping=0.03)
    ),
    "k16_cg1s_md01": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=1, min_damping=0.01)
    ),
    "k16_cg1s_md03_d0": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=1, min_damping=0.03, cg_decay=0.0)
    ),
    "k16_cg2s_md03": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=2, min_damping=0.03)
    ),
    "k16_cg1s_md03_2000": variant(
        kfac=dict(rank=16), small=2000, small_kw=dict(cg_max_iter=1, min_damping=0.03)
    ),
    "k16_cg2s_md03_2000": variant(
        kfac=dict(rank=16), small=2000, small_kw=dict(cg_max_iter=2, min_damping=0.03)
    ),
    "k16_cg2s_md03_b100": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=2, min_damping=0.03), batch=100
    ),
    "k16_cg1s_md03_b100": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=1, min_damping=0.03), batch=100
    ),
    "k16_cg2s_md03_ref2": variant(
        kfac=dict(rank=16),
        small=1000,
        small_kw=dict(cg_max_iter=2, min_damping=0.03),
        small_refresh=2,
    ),
    "k16_cg2s_md05": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=2, min_damping=0.05)
    ),
    # early steps cost ~25 ms at 250-600 cases (fixed costs): bigger early batches are cheap
    "k16_cg2s2k_b500": variant(
        kfac=dict(rank=16), small=2000, small_kw=dict(cg_max_iter=2, min_damping=0.03), batch=500
    ),
    "k16_cg2s2k_b1000": variant(
        kfac=dict(rank=16), small=2000, small_kw=dict(cg_max_iter=2, min_damping=0.03), batch=1000
    ),
    "k16_cg3s2k_md03": variant(
        kfac=dict(rank=16), small=2000, small_kw=dict(cg_max_iter=3, min_damping=0.03)
    ),
    "k16_cg2s2k_md01": variant(
        kfac=dict(rank=16), small=2000, small_kw=dict(cg_max_iter=2, min_damping=0.01)
    ),
    # stochastic K-FAC-like steps throughout: the batch stops growing at max_batch
    "k16_cg2_max1000": variant(
        kfac=dict(rank=16), max_batch=1000, kw=dict(cg_max_iter=2, min_damping=0.01)
    ),
    "k16_cg2_max2000": variant(
        kfac=dict(rank=16), max_batch=2000, kw=dict(cg_max_iter=2, min_damping=0.01)
    ),
    "k16_cg5_max1000": variant(
        kfac=dict(rank=16), max_batch=1000, kw=dict(cg_max_iter=5, min_damping=0.01)
    ),
    "k16_cg3_max2000": variant(
        kfac=dict(rank=16), max_batch=2000, kw=dict(cg_max_iter=3, min_damping=0.01)
    ),
    "k16_cg1_max2000": variant(
        kfac=dict(rank=16), max_batch=2000, kw=dict(cg_max_iter=1, min_damping=0.01)
    ),
    "k16_cg2_max2000_md03": variant(
        kfac=dict(rank=16), max_batch=2000, kw=dict(cg_max_iter=2, min_damping=0.03)
    ),
    "k16_cg2_max2000_md0": variant(kfac=dict(rank=16), max_batch=2000, kw=dict(cg_max_iter=2)),
    "k16_cg2_max3000": variant(
        kfac=dict(rank=16), max_batch=3000, kw=dict(cg_max_iter=2, min_damping=0.01)
    ),
    "k16_cg10_max2000": variant(kfac=dict(rank=16), max_batch=2000),
    # K-FAC-like (cg≤2, λ ≥ 0.01) until the batch is full, held at 2,000 cases for `hold`
    # steps, then the tuned row's full-batch phase (cg≤10, ¼ curvature for 4 steps)
    **{
        f"k16_kl_hold{h}": variant(
            kfac=dict(rank=16),
            max_batch=2000,
            hold=h,
            small=4000,
            small_kw=dict(cg_max_iter=2, min_damping=0.01),
        )
        for h in (10, 20, 40, 60)
    },
    **{
        f"k16_kl20_{name}": variant(
            **dict(
                dict(
                    kfac=dict(rank=16),
                    max_batch=2000,
                    hold=20,
                    small=4000,
                    small_kw=dict(cg_max_iter=2, min_damping=0.01),
                ),
                **change,
            )
        )
        for name, change in {
            "cg1": dict(small_kw=dict(cg_max_iter=1, min_damping=0.01)),
            "b500": dict(batch=500),
            "g12": dict(growth=1.2),
            "max1500": dict(max_batch=1500, hold=27),
            "max2500": dict(max_batch=2500, hold=16),
            "ref2": dict(small_refresh=2),
            "c8": dict(small_curvature=0.125),
            "md003": dict(small_kw=dict(cg_max_iter=2, min_damping=0.003)),
            "d0": dict(small_kw=dict(cg_max_iter=2, min_damping=0.01, cg_decay=0.0)),
            "d05": dict(small_kw=dict(cg_max_iter=2, min_damping=0.01, cg_decay=0.5)),
            "r8": dict(kfac=dict(rank=8)),
            "d098": dict(small_kw=dict(cg_max_iter=2, min_damping=0.01, cg_decay=0.98)),
            "d1": dict(small_kw=dict(cg_max_iter=2, min_damping=0.01, cg_decay=1.0)),
            "d09": dict(small_kw=dict(cg_max_iter=2, min_damping=0.01, cg_decay=0.9)),
            "kdecay08": dict(kfac=dict(rank=16, decay=0.8)),
            "c2": dict(small_curvature=0.5),
            "kdecay06": dict(kfac=dict(rank=16, decay=0.6)),
            "kdecay04": dict(kfac=dict(rank=16, decay=0.4)),
            "k06d098": dict(
                kfac=dict(rank=16, decay=0.6),
                small_kw=dict(cg_max_iter=2, min_damping=0.01, cg_decay=0.98),
            ),
            "k06h10": dict(kfac=dict(rank=16, decay=0.6), hold=10),
            "k06h40": dict(kfac=dict(rank=16, decay=0.6), hold=40),
            "k06ref2": dict(kfac=dict(rank=16, decay=0.6), small_refresh=2),
            "kdecay0": dict(kfac=dict(rank=16, decay=0.0)),
            "kdecay08rd01": dict(kfac=dict(rank=16, decay=0.8, relative_damping=0.1)),
            "r32": dict(kfac=dict(rank=32)),
            "rd0.1": dict(kfac=dict(rank=16, relative_damping=0.1)),
            "b1000": dict(batch=1000),
            "b2000h40": dict(batch=2000, hold=40),
            "d098ref2": dict(
                small_kw=dict(cg_max_iter=2, min_damping=0.01, cg_decay=0.98), small_refresh=2
            ),
            "d098c8": dict(
                small_kw=dict(cg_max_iter=2, min_damping=0.01, cg_decay=0.98), small_curvature=0.125
            ),
            "cg1d098": dict(small_kw=dict(cg_max_iter=1, min_damping=0.01, cg_decay=0.98)),
            "lr12": dict(small_kw=dict(cg_max_iter=2, min_damping=0.01, lr=1.2)),
        }.items()
    },
    "k16_cg1small_cfull": variant(
        kfac=dict(rank=16), small=1000, small_kw=dict(cg_max_iter=1), small_cfull=True
    ),
}


class GrowingBatches(sc._Batches):
    """``sc._Batches`` that also hands out the next ``c`` cases after the gradient batch (a
    curvature batch disjoint from it), and optionally a different growth above 1,000 cases."""

    def __init__(
        self,
        *args,
        growth_mid: float | None = None,
        max_batch: int | None = None,
        hold: int | None = None,
        **kw,
    ) -> None:
        super().__init__(*args, **kw)
        self.growth_mid, self.max_batch, self.hold, self.held = growth_mid, max_batch, hold, 0

    def next(self):
        if self.growth_mid and self.size >= 1000:
            self.growth = self.growth_mid
        if self.max_batch and self.size >= self.max_batch:  # hold it there (for `hold` steps)
            self.size = float(self.max_batch)
            self.held += 1
            if self.hold is not None and self.held > self.hold:
                self.max_batch = None
        return super().next()

    def disjoint(self, c: int):
        # the c cases after the current batch in this epoch's permutation (wrapping)
        idx = torch.cat([self.perm[self.i :], self.perm[: self.i]])[:c]
        return idx


def hf_run(task: sc.Task, name: str, regime: dict) -> sc.Run:
    m = __import__("copy").deepcopy(task.model)
    kw = dict(regime["kw"])
    if "kfac" in regime:
        kw["precond"] = KFACPreconditioner(m, **regime["kfac"])
    opt = HessianFree(m.parameters(), **kw)
    kfac = kw.get("precond")
    kfac_time = [0.0]
    if kfac is not None:  # time K-FAC's factor updates (in the 'curvature' phase)
        update = kfac.update

        def timed_update(ctx, update=update):
            t0 = time.perf_counter()
            update(ctx)
            kfac_time[0] += time.perf_counter() - t0

        kfac.update = timed_update
    n = len(task.x)
    batches = GrowingBatches(
        n,
        regime["batch"],
        task.x.device,
        regime["growth"],
        growth_mid=regime.get("growth_mid"),
        max_batch=regime.get("max_batch"),
        hold=regime.get("hold"),
    )
    run = sc.Run(name, "HF", m, lambda: None, detail=str(regime))
    run.trace = []
    full_steps = [0]
    kw_defaults = {key: opt.param_groups[0][key] for key in regime.get("small_kw", {})}

    def forward(xb, yb):
        out = m(xb)
        return task.loss(out, yb), out

    def step() -> None:
        idx = batches.next()
        xb, yb = (task.x, task.y) if idx is None else (task.x[idx], task.y[idx])
        full_steps[0] += idx is None
        c = min(sc._curvature_size(regime, len(xb), n, full_steps[0]), len(xb))
        if "small_curvature" in regime and len(xb) < regime["small"]:
            c = max(1, round(len(xb) * regime["small_curvature"]))
        if regime.get("small_cfull") and len(xb) < regime["small"]:
            c = len(xb)  # curvature on the gradient batch's own graph while small
        if "curvature_cap" in regime and c < len(xb):  # only while c is a fraction
            c = min(c, regime["curvature_cap"])
        if c >= len(xb):
            curvature = None
        elif regime.get("disjoint") and idx is not None:
            cidx = batches.disjoint(c)
            curvature = lambda: forward(task.x[cidx], task.y[cidx])  # noqa: E731
        else:
            curvature = lambda: forward(xb[:c], yb[:c])  # noqa: E731
        if "small" in regime:  # settings (and K-FAC's refresh) while the batch is small
            is_small = len(xb) < regime["small"]
            for key, value in regime.get("small_kw", {}).items():
                opt.param_groups[0][key] = value if is_small else kw_defaults[key]
            if "small_refresh" in regime:
                kfac.refresh = regime["small_refresh"] if is_small else 1
        if "kfac_from" in regime:  # K-FAC only once the batch has that many cases
            opt.precond = kfac if len(xb) >= regime["kfac_from"] else None
        t0 = time.perf_counter()
        kfac_time[0] = 0.0
        opt.step(lambda: forward(xb, yb), curvature)
        s = opt.last_step
        run.statuses[s.status] = run.statuses.get(s.status, 0) + 1
        run.trace.append(
            (len(xb), c, s.damping, s.rho, s.cg_iters, str(s.cg_reason), s.backtrack_iter,
             s.step_rate, s.loss, time.perf_counter() - t0, s.closure_calls,
             dict(s.time_phases, kfac=kfac_time[0]), s.time_products)
        )  # fmt: skip

    run.step = step
    return run


def passes() -> None:
    """Cost of the passes an HF step is made of, in gradients (fwd + bwd) of the same cases:
    medians over 60 interleaved rounds on the first 250 and 1,000 training cases."""
    import statistics

    from hessfree.curvature import GGNProduct

    task = sc._classifier("mnist1d", quick=True)
    m, params = task.model, list(task.model.parameters())
    v = torch.randn(sum(p.numel() for p in params))
    for c in (250, 1000):
        xb, yb = task.x[:c], task.y[:c]
        out = m(xb)
        product = GGNProduct(task.loss(out, yb), out, params)
        u = torch.randn_like(out)

        def forward(xb=xb, yb=yb) -> None:
            with torch.no_grad():
                task.loss(m(xb), yb)

        def set_up(xb=xb, yb=yb) -> None:  # forward with graph, set-up, first product
            o = m(xb)
            GGNProduct(task.loss(o, yb), o, params).matvec(v)

        fns = {
            "gradient": lambda xb=xb, yb=yb: torch.autograd.grad(task.loss(m(xb), yb), params),
            "forward": forward,
            "GGN product": lambda p=product: p.matvec(v),
            "Jv": lambda p=product: p.jacobian.jvp(v),
            "J^T u": lambda p=product, u=u: p.jacobian.vjp(u),
            "set-up + 1 product": set_up,
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(60):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        g = statistics.median(times["gradient"])
        cells = ", ".join(f"{k} {statistics.median(t) / g:.2f}" for k, t in times.items())
        print(f"{c} cases, in gradients ({g * 1e3:.2f} ms): {cells}")


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1] == "passes":
        return passes()
    budget = float(sys.argv[1])
    names = sys.argv[2].split(",")
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    slices = int(os.environ.get("SLICES", 80))
    print("uptime before:", os.popen("uptime").read().strip(), flush=True)
    task = sc._classifier("mnist1d", quick=True)
    runs = [sc.first_order_run(task, "Adam", 1e-2, 100)]
    for r in range(repeats):
        for name in names:
            runs.append(hf_run(task, name if repeats == 1 else f"{name}#{r}", CONTENDERS[name]))
    sc.interleave(runs, task, budget, slices, "cpu")
    adam = runs[0]
    targets = [sc.value_at(adam.curve, budget * q) for q in (0.25, 0.5, 1.0)]
    at = [sc.time_to(adam.curve, t) for t in targets]
    print(f"Adam targets {[f'{t:.3g}' for t in targets]} at {[f'{t:.2f}' for t in at]} s")
    for r in runs:  # Adam's own row gives its times to the loss marks
        times = [sc.time_to(r.curve, t) for t in targets]
        ratios = " / ".join(
            f"{t / a:.2f}" if math.isfinite(t) else "never" for t, a in zip(times, at, strict=True)
        )
        marks = {lv: sc.time_to(r.curve, lv) for lv in (1.0, 0.5, 0.3, 0.1)}
        mk = " ".join(f"{lv:g}@{t:.2f}" for lv, t in marks.items())
        print(
            f"{r.name:12s} {ratios:22s} final {sc.final_error(r):.3g} steps {r.steps} "
            f"[{mk}] {r.failed}"
        )
        if os.environ.get("TRACE"):
            for k, t in enumerate(getattr(r, "trace", [])):
                b, c, lam, rho, it, why, bt, rate, loss, sec, calls, phases, prod = t
                ph = " ".join(f"{k[:4]}={v:.3f}" for k, v in phases.items())
                print(
                    f"   {k:3d} b={b:5d} c={c:5d} lam={lam:.2e} rho={rho:6.3f} cg={it:3d} "
                    f"{why:10s} bt={bt} rate={rate:g} loss={loss:.4f} {sec:.3f}s "
                    f"calls={calls} prod={prod:.3f} {ph}"
                )
    print("uptime after:", os.popen("uptime").read().strip(), flush=True)


if __name__ == "__main__":
    main()
