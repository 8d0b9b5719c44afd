"""HF's defaults on PINNs that pinn.py does not train: Burgers, Helmholtz, convection β = 30.

Per problem and seed, in one process on one torch thread, every contender is timed by
``time.thread_time`` (CPU seconds of this thread; error evaluations off the clock):

* Adam at three learning rates for the whole budget ``B``; the lowest final loss picks the lr,
  and that run's weights at ``switch·B`` are the common starting point of the second phase;
* from there, for ``(1 - switch)·B``: L-BFGS (strong Wolfe, history 10 and 50), HF defaults
  (``HessianFree(params)``, the closure returning ``(loss, residual blocks)``) and HF tuned
  variants.

HF's per-step diagnostics (status, ρ, λ, CG iterations and stop, forcing η, sketch products)
are written for every HF run. Usage::

    python experiments/_pinn2.py --problems burgers,helmholtz,convection --seeds 0,1 --budget 12
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for p in (HERE.parent, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pinn  # noqa: E402

from hessfree import HessianFree  # noqa: E402

MAKERS = {
    "burgers": lambda: pinn.burgers(1000, 50, 20, 3),
    "burgers4k": lambda: pinn.burgers(4000, 100, 20, 3),  # 4× the collocation points
    "helmholtz": lambda: pinn.helmholtz(24, 32),
    "convection": lambda: pinn.convection(48, 32, 32, 30.0),
    "poisson": lambda: pinn.poisson(24, 32),
    "reaction": lambda: pinn.reaction(48, 32, 32),
}
HF_VARIANTS = {
    "HF defaults": {},
    "HF tuned (pinn.py)": pinn.HF_TUNED,
    "HF cg50": dict(cg_max_iter=50),
}


def _load(prob, state):
    net = prob.make_net()
    net.load_state_dict(copy.deepcopy(state))
    return net, prob.closure_for(net)


def adam_run(prob, init, lr, budget, switch):
    net, closure = _load(prob, init)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    cpu, steps, snap = 0.0, 0, None
    while cpu < budget:
        if snap is None and cpu >= switch * budget:
            snap = copy.deepcopy(net.state_dict())
        t0 = time.thread_time()
        opt.zero_grad()
        loss, _ = closure()
        loss.backward()
        opt.step()
        cpu += time.thread_time() - t0
        steps += 1
        if not math.isfinite(float(loss)):
            break
    final = float(closure()[0].detach())
    return dict(loss=final, error=pinn.rel_l2(net, prob), steps=steps, cpu=cpu), snap


def lbfgs_run(prob, start, history, budget):
    net, closure = _load(prob, start)
    opt = torch.optim.LBFGS(
        net.parameters(),
        lr=1.0,
        max_iter=10,
        history_size=history,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
    )

    def lbfgs_closure():
        opt.zero_grad()
        loss, _ = closure()
        loss.backward()
        return loss

    cpu, steps = 0.0, 0
    while cpu < budget:
        t0 = time.thread_time()
        opt.step(lbfgs_closure)
        cpu += time.thread_time() - t0
        steps += 1
    final = float(closure()[0].detach())
    ok = math.isfinite(final)
    return dict(loss=final if ok else math.inf, error=pinn.rel_l2(net, prob), steps=steps, cpu=cpu)


def hf_run(prob, start, kwargs, budget):
    net, closure = _load(prob, start)
    opt = HessianFree(net.parameters(), **kwargs)
    cpu, trace = 0.0, []
    while cpu < budget:
        t0 = time.thread_time()
        opt.step(closure)
        cpu += time.thread_time() - t0
        s = opt.last_step
        trace.append(
            dict(
                cpu=round(cpu, 3),
                loss=s.loss_after,
                status=str(s.status.value),
                rho=s.rho,
                lam=s.damping,
                cg=s.cg_iters,
                why=s.cg_reason,
                eta=s.cg_rtol,
                pm=s.precond_matvecs,
                rate=s.step_rate,
                calls=s.closure_calls,
                g=s.grad_norm,
            )
        )
    final = float(closure()[0].detach())
    return (
        dict(loss=final, error=pinn.rel_l2(net, prob), steps=len(trace), cpu=cpu),
        trace,
    )


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="burgers,helmholtz,convection")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budget", type=float, default=12.0, help="CPU seconds per contender")
    ap.add_argument("--switch", type=float, default=0.2)
    ap.add_argument("--variants", default=",".join(HF_VARIANTS))
    ap.add_argument("--extra", default="", help="JSON dict name -> HF kwargs, added")
    ap.add_argument("--no-lbfgs", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/tmp/pinn2"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    variants = {k: HF_VARIANTS[k] for k in args.variants.split(",") if k}
    variants.update(json.loads(args.extra) if args.extra else {})
    args.out.mkdir(parents=True, exist_ok=True)
    B = args.budget
    for key in args.problems.split(","):
        prob = MAKERS[key]()
        for seed in map(int, args.seeds.split(",")):
            load0 = open("/proc/loadavg").read().split()[:3]
            torch.manual_seed(seed)
            init = copy.deepcopy(prob.make_net().state_dict())
            rows, snaps = {}, {}
            for lr in (1e-3, 3e-3, 1e-2):
                rows[f"Adam lr {lr:g}"], snaps[lr] = adam_run(prob, init, lr, B, args.switch)
            lr = min(snaps, key=lambda v: rows[f"Adam lr {v:g}"]["loss"])
            start = snaps[lr]
            traces = {}
            if not args.no_lbfgs:
                for hist in (10, 50):
                    rows[f"Adam → L-BFGS h{hist}"] = lbfgs_run(
                        prob, start, hist, (1 - args.switch) * B
                    )
            for name, kw in variants.items():
                rows[f"Adam → {name}"], traces[name] = hf_run(
                    prob, start, kw, (1 - args.switch) * B
                )
            load1 = open("/proc/loadavg").read().split()[:3]
            base = [v for k, v in rows.items() if "HF" not in k]
            bl = min(v["loss"] for v in base)
            be = min(v["error"] for v in base)
            print(f"\n## {prob.title}, seed {seed}, budget {B} CPU s, Adam lr {lr:g}")
            print(f"load {' '.join(load0)} -> {' '.join(load1)}")
            print("| contender | loss | error | loss/best | error/best | steps | cpu |")
            print("|---|---|---|---|---|---|---|")
            for k, v in rows.items():
                print(
                    f"| {k} | {v['loss']:.3e} | {v['error']:.3e} | {v['loss'] / bl:.3g} | "
                    f"{v['error'] / be:.3g} | {v['steps']} | {v['cpu']:.1f} |"
                )
            sys.stdout.flush()
            dump = dict(rows=rows, traces=traces, lr=lr, load=[load0, load1])
            (args.out / f"{key}-s{seed}.json").write_text(json.dumps(dump, default=str))
            torch.save(start, args.out / f"{key}-s{seed}-start.pt")


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
