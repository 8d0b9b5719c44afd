"""TanhRNN's fused recurrence node against autograd's graph of the loop, interleaved (rnnprod).

The scorecard's addition task and regime (``make_addition_task``: 100 tanh units, 1,000/100-case
batches, hidden states returned so ``structural_damping='auto'`` is μ = 0.03), torch 1 thread.
"old" is main's ``TanhRNN`` loop (copied below as ``_LoopTanhRNN``: one autograd node per op
and step); "new" is ``TanhRNN`` (one ``_tanh_recurrence`` node). Both live in one process
and take turns, in shuffled order, so the machine's load falls on both alike. Modes:

    python experiments/_rnnprod.py ops 50        # one product, its R-op pass, one gradient,
                                                 # the product set-up: new/old and x gradient
    python experiments/_rnnprod.py steps 50 12   # HessianFree(params) steps, old and new in
                                                 # turns from the same state: s/step ratio

Results: ``results/2026-12-01-rnnprod.md``.
"""

from __future__ import annotations

import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402

import hessfree  # noqa: E402
from hessfree.curvature import StructurallyDampedGGN  # noqa: E402
from hessfree.train.models import TanhRNN, cat_last  # noqa: E402


class _LoopTanhRNN(TanhRNN):
    """main's TanhRNN (c3a7fbf): the loop as autograd ops, one node per op and step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self._loop(x, None))

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states: list[torch.Tensor] = []
        h = self._loop(x, states)
        return self.readout(h), cat_last(states).unflatten(-1, (len(states), h.shape[-1]))

    def _loop(self, x: torch.Tensor, states: list[torch.Tensor] | None) -> torch.Tensor:
        us = self.input(x).unbind(1)
        h = torch.tanh(us[0])
        if states is not None:
            states.append(h)
        for u in us[1:]:
            h = torch.tanh(u + self.recurrent(h))
            if states is not None:
                states.append(h)
        return h


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def ops(length: int, rounds: int = 40) -> None:
    task = sc.make_addition_task(length, 60.0)
    new = task.model
    old = copy.deepcopy(new)
    old.__class__ = _LoopTanhRNN
    x, y = task.x[:100], task.y[:100]
    fns, products = {}, {}
    for name, m in (("old", old), ("new", new)):
        params = list(m.parameters())

        def build(m=m):  # noqa: ANN202
            out, h = m.forward_with_hidden(x)
            return task.loss(out, y), out, h

        P = StructurallyDampedGGN(*build(), params, weight=3e-6)
        v = torch.randn(P.layout.numel, generator=torch.Generator().manual_seed(0))
        products[name] = P.matvec(v)
        fns[name] = {
            "product": lambda P=P, v=v: P.matvec(v),
            "R-op pass (J_o v, J_h v)": lambda P=P, v=v: P._jvps(v, False),
            "gradient, 100 cases": lambda b=build, p=params: torch.autograd.grad(b()[0], p),
            "product set-up": lambda b=build, p=params: StructurallyDampedGGN(*b(), p, weight=3e-6),
            "forward, 100 cases, no_grad": lambda b=build: torch.no_grad()(b)(),
        }
    a, b = products["old"], products["new"]
    print(f"product new vs old: relative difference {float((a - b).norm() / a.norm()):.2e}")
    print("load", _load())
    keys = [(n, k) for n in fns for k in fns[n]]
    wall: dict = {key: [] for key in keys}
    cpu: dict = {key: [] for key in keys}
    rng = random.Random(0)
    for r in range(rounds):
        rng.shuffle(keys)
        for n, k in keys:
            t0, c0 = time.perf_counter(), time.thread_time()
            fns[n][k]()
            c1, t1 = time.thread_time(), time.perf_counter()
            if r >= 3:
                wall[(n, k)].append(t1 - t0)
                cpu[(n, k)].append(c1 - c0)
    print("load", _load())
    for label, times in (("thread CPU time", cpu), ("wall time", wall)):
        med = {key: statistics.median(t) for key, t in times.items()}
        print(f"medians of {rounds - 3} shuffled rounds, {label}:")
        print(f"{'':32} {'new/old':>8} {'old x grad':>11} {'new x grad':>11}")
        g = "gradient, 100 cases"
        for k in fns["old"]:
            ratio = med[("new", k)] / med[("old", k)]
            og, ng = med[("old", k)] / med[("old", g)], med[("new", k)] / med[("new", g)]
            print(f"{k:32} {ratio:8.3f} {og:11.3f} {ng:11.3f}")


def _optimizer(run: sc.Run) -> hessfree.HessianFree:
    return next(
        c.cell_contents
        for c in run.step.__closure__ or []
        if isinstance(c.cell_contents, hessfree.HessianFree)
    )


def steps(length: int, n: int) -> None:
    """Old and new take each step from the same state: before a round, the old run's weights
    and optimizer state (λ, warm start, ...) are set to the new run's, and both draw the same
    batch; so both steps do the same work up to float rounding (CG iterations and closure
    calls are printed to check), and the trajectory is the new code's."""
    task = sc.make_addition_task(length, 60.0)
    runs = {"new": sc.hf_run(task, "D", "HF", task.hf_default_regime)}
    task.model.__class__ = _LoopTanhRNN  # hf_run copies it: both start from the same weights
    runs["old"] = sc.hf_run(task, "D", "HF", task.hf_default_regime)
    opts = {k: _optimizer(r) for k, r in runs.items()}
    print("load", _load())
    order, rng, rec = list(runs), random.Random(1), []
    for _ in range(n):
        with torch.no_grad():
            pairs = zip(runs["old"].model.parameters(), runs["new"].model.parameters(), strict=True)
            for p, q in pairs:
                p.copy_(q)
        opts["old"].load_state_dict(copy.deepcopy(opts["new"].state_dict()))
        rng.shuffle(order)
        t = {}
        for k in order:
            t0, c0 = time.perf_counter(), time.thread_time()
            runs[k].step()
            t[k + " cpu"] = time.thread_time() - c0
            t[k] = time.perf_counter() - t0
        rec.append(t)
        work = {k: (o.last_step.cg_matvecs, o.last_step.closure_calls) for k, o in opts.items()}
        print(
            f"old {t['old']:.3f} s  new {t['new']:.3f} s  new/old {t['new'] / t['old']:.3f}  "
            f"(thread CPU time: {t['new cpu'] / t['old cpu']:.3f})  "
            f"(products, closure calls) old {work['old']} new {work['new']}"
        )
    print("load", _load())
    later = rec[1:]  # the first step pays the one-off λ₀ product and warm-up
    for sfx, label in (("", "wall"), (" cpu", "thread CPU")):
        ratio = statistics.median(r["new" + sfx] / r["old" + sfx] for r in later)
        print(f"median new/old ({label} time, steps 2-{n}): {ratio:.3f}")
    print(
        "median s/step old, new:",
        round(statistics.median(r["old"] for r in later), 3),
        round(statistics.median(r["new"] for r in later), 3),
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = sys.argv[1]
    if mode == "ops":
        ops(int(sys.argv[2]))
    elif mode == "steps":
        steps(int(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected 'ops' or 'steps'")
