"""The forcing term's cap on Nyström-preconditioned PINN steps: HF variants from the same Adam
weights, stepped round-robin in one process (one step each per turn, each on its own
``time.thread_time`` clock) until each has spent ``--budget`` CPU seconds.

Start points: ``_pinn2.py``'s saved Adam weights (``<dir>/<problem>-s<seed>-start.pt``), or for
pinn.py's Poisson / reaction, Adam lr 1e-2 for 1,000 / 1,700 steps from seed ``s`` (the pinn
(2026-12-01) section's regime).

Usage::

    python experiments/_pinn2_eta.py --starts /tmp/pinn2/r1 --budget 8
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for p in (HERE.parent, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import _pinn2  # noqa: E402
import pinn  # noqa: E402

from hessfree import HessianFree, NystromPreconditioner  # noqa: E402


class CappedEta(HessianFree):
    """η = min(cap, the default's η) on steps seen deterministic from the start."""

    def __init__(self, params, cap: float, **kw):
        super().__init__(params, **kw)
        self._cap = cap

    def _cg_rtol(self, run):
        rtol = super()._cg_rtol(run)
        st = run.state
        if st.get("deterministic") and not st.get("forcing_seen_stochastic") and rtol > 0:
            rtol = min(rtol, self._cap)
            run.report["cg_rtol"] = rtol
        return rtol


class _LBFGS:
    """torch.optim.LBFGS (strong Wolfe) behind HF's ``step(closure)`` and ``last_step``."""

    def __init__(self, params, history):
        self.opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=10,
            history_size=history,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
        )

    def step(self, closure):
        def c():
            self.opt.zero_grad()
            loss, _ = closure()
            loss.backward()
            return loss

        loss = float(self.opt.step(c))
        self.last_step = argparse.Namespace(
            cg_iters=0,
            precond_matvecs=0,
            closure_calls=0,
            cg_rtol=math.nan,
            loss_after=loss if math.isfinite(loss) else math.inf,
        )


def make(variant, params):
    if variant.startswith("lbfgs"):
        return _LBFGS(params, int(variant[5:]))
    if variant == "defaults":
        return HessianFree(params)
    if variant.startswith("cap"):
        return CappedEta(params, float(variant[3:]))
    if variant.startswith("rtol"):
        return HessianFree(params, cg_rtol=float(variant[4:]))
    if variant.startswith("nys"):  # nys<rank>_<refresh>
        rank, refresh = map(int, variant[3:].split("_"))
        return HessianFree(params, precond=NystromPreconditioner(rank=rank, refresh=refresh))
    if variant == "noprecond":
        return HessianFree(params, precond=None)
    if variant == "tuned":
        return HessianFree(params, **pinn.HF_TUNED)
    raise ValueError(variant)


def adam_start(prob, seed, steps):
    torch.manual_seed(seed)
    net = prob.make_net()
    closure = prob.closure_for(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        closure()[0].backward()
        opt.step()
    return copy.deepcopy(net.state_dict())


def race(prob, start, variants, budget):
    runs = {}
    for v in variants:
        net = prob.make_net()
        net.load_state_dict(copy.deepcopy(start))
        runs[v] = dict(
            net=net,
            closure=prob.closure_for(net),
            opt=make(v, net.parameters()),
            cpu=0.0,
            steps=0,
            cg=0,
            pm=0,
            calls=0,
            etas=[],
            halfway=None,
        )
    live = list(variants)
    while live:
        for v in list(live):
            r = runs[v]
            t0 = time.thread_time()
            r["opt"].step(r["closure"])
            r["cpu"] += time.thread_time() - t0
            s = r["opt"].last_step
            r["steps"] += 1
            r["cg"] += s.cg_iters
            r["pm"] += s.precond_matvecs
            r["calls"] += s.closure_calls
            r["etas"].append(s.cg_rtol)
            if r["halfway"] is None and r["cpu"] >= budget / 2:
                r["halfway"] = s.loss_after
            if r["cpu"] >= budget or not math.isfinite(s.loss_after):
                live.remove(v)
    fresh = None
    if prob.name == "burgers":  # the residual at 4,000 collocation points not trained on
        fresh = pinn.burgers(4000, 50, 20, 3, n_test=8, seed=99)
    out = {}
    for v, r in runs.items():
        loss = float(r["closure"]()[0].detach())
        if fresh is not None:
            r["fresh"] = float(fresh.closure_for(r["net"])()[1][0].detach().pow(2).mean())
        etas = [e for e in r["etas"] if math.isfinite(e)]
        out[v] = dict(
            loss=loss,
            error=pinn.rel_l2(r["net"], prob),
            half=r["halfway"],
            steps=r["steps"],
            cg=r["cg"],
            pm=r["pm"],
            calls=r["calls"],
            cpu=r["cpu"],
            eta_med=sorted(etas)[len(etas) // 2] if etas else math.nan,
            fresh=r.get("fresh", math.nan),
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=Path, default=Path("/tmp/pinn2/r1"))
    ap.add_argument("--cases", default="burgers-s0,helmholtz-s0,convection-s0")
    ap.add_argument("--variants", default="defaults,cap0.1,rtol0.1")
    ap.add_argument("--budget", type=float, default=8.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    variants = args.variants.split(",")
    allres = {}
    for case in args.cases.split(","):
        key, seed = case.split("-s")
        prob = _pinn2.MAKERS[key]()
        if key in ("poisson", "reaction"):
            start = adam_start(prob, int(seed), 1000 if key == "poisson" else 1700)
        else:
            start = torch.load(args.starts / f"{case}-start.pt")
        load0 = open("/proc/loadavg").read().split()[:3]
        res = race(prob, start, variants, args.budget)
        load1 = open("/proc/loadavg").read().split()[:3]
        allres[case] = dict(res=res, load=[load0, load1])
        d = res["defaults"]
        print(f"\n{case} budget {args.budget} CPU s, load {' '.join(load0)} -> {' '.join(load1)}")
        print(
            "| variant | loss | error | loss/def | err/def | loss@½/def | steps | CG it | "
            "sketch | calls | median η |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for v, r in res.items():
            print(
                f"| {v} | {r['loss']:.3e} | {r['error']:.3e} | {r['loss'] / d['loss']:.3g} | "
                f"{r['error'] / d['error']:.3g} | {r['half'] / d['half']:.3g} | {r['steps']} | "
                f"{r['cg']} | {r['pm']} | {r['calls']} | {r['eta_med']:.2g} | {r['fresh']:.2e} |"
            )
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(allres, default=str))


if __name__ == "__main__":
    main()
