"""PINNs, round 3: Allen-Cahn, resampled collocation points, and the CG forcing cap.

One process, one torch thread; every contender has its own CPU clock (``time.thread_time``
around its steps only; evaluations off the clock) and contenders take one step each in turn
(round-robin), so machine load falls on all of them alike. Per problem and seed:

1. **Adam phase.** Adam from the seed's weights at lr 1e-3 / 3e-3 / 1e-2, round-robin. With
   ``--adam-full`` each runs the whole budget ``B`` (the "Adam alone" rows) and the lowest loss
   at ``B`` picks the lr; otherwise each runs ``switch·B`` and the lowest loss there picks it.
   The picked run's weights at ``switch·B`` are every second-phase contender's start.
2. **Second phase**, ``(1 - switch)·B`` CPU seconds each, round-robin, from those weights:
   ``--contenders``, a comma list of

   * ``hf`` (``HessianFree(params)``), ``hfnf`` (the same with ``relative_min_damping=0``:
     no λ floor on steps seen stochastic), ``tuned`` (pinn.py's ``HF_TUNED``), ``cap<c>``
     (the defaults with η ≤ c on deterministic steps, ``_pinn2_eta.CappedEta``);
   * ``lbfgs<h>``: torch's L-BFGS, strong Wolfe, history h, 10 iterations per ``step()``;
   * a suffix ``/r<k>``: the interior collocation points redrawn (same count, the problem's
     ``draw``) before every k-th ``step()``; ``/n<N>``: N fixed points instead of the
     problem's (a new fixed draw, seed 1000 + seed).

Every contender's loss on the problem's own fixed points and its relative L2 error are
recorded after each step that ends 0.1 CPU s or more after the last record (off the clock), so
windows of the budget can be averaged (geometric means: single end values of these non-convex
trajectories are chaotic, "pinn2").
At the end: the interior residual's mean square at 4,000 fresh points (``draw`` problems), and
for HF runs the share of steps the optimizer saw as stochastic, rejected, and with λ on its
floor, and the median λ.

Usage::

    python experiments/_pinn3.py allen --seeds 0,1,2 --budget 15 --adam-full \\
        --contenders hf,tuned,lbfgs10,lbfgs50
    python experiments/_pinn3.py burgers --contenders hf,hf/r1,hf/r5,hf/r20,hf/n4000,\\
        lbfgs50,lbfgs50/r1,lbfgs50/n4000
    python experiments/_pinn3.py poisson,reaction,helmholtz,burgers,allen --contenders \\
        hf,cap0.25,cap0.1
    python experiments/_pinn3.py - --summary a.json b.json   # window ratios to hf, per problem
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
from _pinn2_eta import CappedEta  # noqa: E402

from hessfree import HessianFree  # noqa: E402

MAKERS = {
    "poisson": lambda: pinn.poisson(24, 32),
    "reaction": lambda: pinn.reaction(48, 32, 32),
    "helmholtz": lambda: pinn.helmholtz(24, 32),
    "burgers": lambda: pinn.burgers(1000, 50, 20, 3),
    "allen": lambda: pinn.allen_cahn(1000, 100, 32, 3),
}
LRS = (1e-3, 3e-3, 1e-2)
WINDOWS = ((0.25, 0.5), (0.5, 0.75), (0.75, 1.0))  # of the second phase's budget
RECORD_EVERY = 0.1


class Contender:
    """One optimizer on its own copy of the weights, with its own clock and records."""

    def __init__(self, name: str, prob, state: dict, seed: int, lr: float | None = None):
        self.name, self.prob = name, prob
        self.net = prob.make_net()
        self.net.load_state_dict(copy.deepcopy(state))
        self.own = prob.closure_for(self.net)  # the problem's fixed points: recorded loss
        base, *mods = name.split("/")
        base = base.split()[0]
        self.every, self.points = 0, None
        self.gen = torch.Generator().manual_seed(1000 + seed)
        for m in mods:
            if m.startswith("r"):
                self.every = int(m[1:])
            elif m.startswith("n"):
                self.points = prob.draw(int(m[1:]), self.gen)
        self.closure = self.own if self.points is None else prob.closure_for(self.net, self.points)
        self.n_in = int(self.own()[1][0].numel())
        params = list(self.net.parameters())
        self.hf = None
        if base == "adam":
            self.opt = torch.optim.Adam(params, lr=lr)
        elif base.startswith("lbfgs"):
            self.opt = torch.optim.LBFGS(
                params,
                lr=1.0,
                max_iter=10,
                history_size=int(base[5:]),
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-14,
                tolerance_change=1e-16,
            )
        elif base == "hf":
            self.opt = self.hf = HessianFree(params)
        elif base == "hfnf":  # the defaults without the relative λ floor of stochastic steps
            self.opt = self.hf = HessianFree(params, relative_min_damping=0.0)
        elif base == "tuned":
            self.opt = self.hf = HessianFree(params, **pinn.HF_TUNED)
        elif base.startswith("cap"):
            self.opt = self.hf = CappedEta(params, float(base[3:]))
        else:
            raise ValueError(f"unknown contender {name!r}")
        self.kind = base
        self.cpu, self.steps, self.dead = 0.0, 0, False
        self.rec: list[tuple[float, float, float]] = []  # (cpu, loss on own points, error)
        self.trace: list[tuple[float, str, float, bool]] = []  # HF: λ, status, ρ, stochastic
        self.snap = None

    def _grad_closure(self):
        self.opt.zero_grad()
        loss, _ = self.closure()
        loss.backward()
        return loss

    def step(self) -> None:
        t0 = time.thread_time()
        if self.every and self.steps % self.every == 0:
            n = len(self.points) if self.points is not None else self.n_in
            self.points = self.prob.draw(n, self.gen)
            self.closure = self.prob.closure_for(self.net, self.points)
        if self.hf is not None:
            self.hf.step(self.closure)
        elif self.kind == "adam":
            self._grad_closure()
            self.opt.step()
        else:
            self.opt.step(self._grad_closure)
        self.cpu += time.thread_time() - t0
        self.steps += 1
        if self.hf is not None:
            s = self.hf.last_step
            st = self.hf._global_state()
            stochastic = st.get("deterministic") is False
            self.trace.append((s.damping, str(s.status.value), s.rho, stochastic, s.damping_floor))
        if self.rec and self.cpu - self.rec[-1][0] < RECORD_EVERY:
            return  # Adam's steps are short: record about every RECORD_EVERY CPU seconds
        loss = float(self.own()[0].detach())
        err = pinn.rel_l2(self.net, self.prob)
        if not math.isfinite(loss):
            loss, self.dead = math.inf, True
        self.rec.append((self.cpu, loss, err))


def race(contenders: list[Contender], budget: float, snap_at: float | None = None) -> None:
    live = list(contenders)
    while live:
        for c in list(live):
            c.step()
            if snap_at is not None and c.snap is None and c.cpu >= snap_at:
                c.snap = (copy.deepcopy(c.net.state_dict()), c.rec[-1][1])
            if c.cpu >= budget or c.dead:
                live.remove(c)


def geo(values: list[float]) -> float:
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else math.nan


def summary(c: Contender, budget: float, fresh) -> dict:
    last = [r for r in c.rec if r[0] <= budget] or c.rec[:1]
    out = dict(
        loss=last[-1][1],
        error=last[-1][2],
        steps=len(last),
        cpu=last[-1][0],
        windows={
            f"{a:g}-{b:g}": (
                geo([r[1] for r in c.rec if a * budget < r[0] <= b * budget]),
                geo([r[2] for r in c.rec if a * budget < r[0] <= b * budget]),
            )
            for a, b in WINDOWS
        },
    )
    if fresh is not None:
        r = fresh(c.net)()[1][0].detach()
        out["fresh"] = float(r.pow(2).mean())
    if c.trace:
        lams = sorted(t[0] for t in c.trace)
        out["lam_med"] = lams[len(lams) // 2]
        out["stoch"] = sum(t[3] for t in c.trace) / len(c.trace)
        out["rejected"] = sum(t[1] == "rejected" for t in c.trace) / len(c.trace)
        out["on_floor"] = sum(t[0] <= t[4] * (1 + 1e-9) for t in c.trace) / len(c.trace)
    return out


def run_case(key: str, seed: int, args) -> dict:
    prob = MAKERS[key]()
    B, sw = args.budget, args.switch
    load0 = os.getloadavg()
    torch.manual_seed(seed)
    init = copy.deepcopy(prob.make_net().state_dict())
    adams = [Contender(f"adam lr {lr:g}", prob, init, seed, lr=lr) for lr in LRS]
    race(adams, B if args.adam_full else sw * B, snap_at=sw * B)
    at = B if args.adam_full else sw * B
    best = min(adams, key=lambda a: [r for r in a.rec if r[0] <= at][-1][1])
    start = best.snap[0]
    phase2 = [Contender(n, prob, start, seed) for n in args.contenders.split(",")]
    race(phase2, (1 - sw) * B)
    fresh = None
    if prob.draw is not None:
        pts = prob.draw(4000, torch.Generator().manual_seed(99))

        def fresh(net):
            return prob.closure_for(net, pts)

    rows = {}
    for a in adams:
        rows[a.name] = summary(a, at, fresh)
    for c in phase2:
        rows[c.name] = summary(c, (1 - sw) * B, fresh)
    load1 = os.getloadavg()
    res = dict(problem=key, seed=seed, budget=B, lr=best.name, load=[load0, load1], rows=rows)
    print_case(res, [c.name for c in phase2])
    return res


def print_case(res: dict, phase2: list[str]) -> None:
    rows = res["rows"]
    ref = rows[phase2[0]]
    lo = " ".join(f"{x:.2f}" for x in res["load"][0])
    print(
        f"\n## {res['problem']} seed {res['seed']}: {res['budget']:g} CPU s, "
        f"start from {res['lr']}; load {lo} -> {res['load'][1][0]:.2f}"
    )
    wins = list(ref["windows"])
    head = ["contender", "loss", "error", "steps", "fresh r²", "λ med", "stoch", "rej", "floor"]
    head += [f"loss {w} / {phase2[0]}" for w in wins] + [f"err {w} / {phase2[0]}" for w in wins]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        cells = [
            name,
            f"{r['loss']:.2e}",
            f"{r['error']:.3e}",
            str(r["steps"]),
            f"{r.get('fresh', math.nan):.2e}",
            f"{r.get('lam_med', math.nan):.1e}",
            f"{r.get('stoch', math.nan):.2f}",
            f"{r.get('rejected', math.nan):.2f}",
            f"{r.get('on_floor', math.nan):.2f}",
        ]
        if name in phase2:
            cells += [f"{r['windows'][w][0] / ref['windows'][w][0]:.3g}" for w in wins]
            cells += [f"{r['windows'][w][1] / ref['windows'][w][1]:.3g}" for w in wins]
        else:
            cells += [""] * (2 * len(wins))
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def summarize(paths: list[Path], against: str = "hf") -> None:
    """Per problem and contender: geometric means over seeds of the window ratios (loss, error)
    to ``against``, and on how many seeds the contender's ratio is below 1."""
    cases = [c for p in paths for c in json.loads(p.read_text())]
    by: dict[tuple[str, str], list[dict]] = {}
    for c in cases:
        for name, r in c["rows"].items():
            if name != against and not name.startswith("adam"):
                by.setdefault((c["problem"], name), []).append((r, c["rows"][against]))
    print(
        "| problem | contender | seeds | "
        + " | ".join(f"{q} {a:g}-{b:g}" for q in ("loss", "error") for a, b in WINDOWS)
        + " |"
    )
    print("|" + "---|" * (3 + 2 * len(WINDOWS)))
    for (prob, name), pairs in by.items():
        cells = []
        for q in (0, 1):
            for a, b in WINDOWS:
                w = f"{a:g}-{b:g}"
                ratios = [r["windows"][w][q] / h["windows"][w][q] for r, h in pairs]
                wins = sum(x < 1 for x in ratios)
                cells.append(f"{geo(ratios):.3g} ({wins}/{len(ratios)})")
        print(f"| {prob} | {name} | {len(pairs)} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("problems", help=f"comma list from {', '.join(MAKERS)}, or --summary")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=float, default=12.0, help="CPU seconds (both phases)")
    ap.add_argument("--switch", type=float, default=0.2)
    ap.add_argument("--adam-full", action="store_true")
    ap.add_argument("--contenders", default="hf,tuned,lbfgs10,lbfgs50")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--summary", type=Path, nargs="*", help="summarize these --json files")
    args = ap.parse_args(argv)
    if args.summary:
        summarize(args.summary)
        return
    torch.set_num_threads(1)
    out = []
    for key in args.problems.split(","):
        for seed in map(int, args.seeds.split(",")):
            out.append(run_case(key, seed, args))
            if args.json:
                args.json.write_text(json.dumps(out, default=str))


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
