"""What raises the plain-CG mini-batch floor late on CNN + BatchNorm (``experiments/README.md``,
"cnnbn"): per-step diagnostics of ``_mbfloor.py``'s runs, off the clock.

Each step logs λ, the floor, the floor's scale, ρ (the optimizer's), and ρ recomputed two ways
on the step's own batch for the step actually taken: with BatchNorm's batch statistics
recomputed at θ + p (what the closure does: ``rho_re``) and frozen at θ's (``rho_fr``: the
same batch normalised as at θ, so f(θ + p) moves only through the weights). Each floor check
(every ``_FLOOR_EVERY``-th step) logs the rise test's z, whether an overshoot (ρ < ¼) was in
the window, the fresh sample gᵀCg/gᵀg where one was taken, and whether the scale rose. The
extra forwards save and restore BatchNorm's running buffers, so the trajectories are
``_mbfloor.py``'s bitwise.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_cnnbn.py [--steps 400] \
        [--seeds 1 2 3] [--rules lib gated] [--problems cnnbn] [--dump FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import warnings
from typing import Any

import _mbfloor
import _unseen
import torch
from torch import nn

import hessfree
import hessfree._damping_control as damping_control

torch.set_num_threads(1)

CHECKS: list[dict] = []


def _z(losses: list[float], w: int = damping_control._RISE_WINDOW) -> float:
    if len(losses) < 2 * w:
        return math.nan
    a, b = losses[-2 * w : -w], losses[-w:]
    se = math.sqrt((statistics.variance(a) + statistics.variance(b)) / w)
    d = statistics.fmean(b) - statistics.fmean(a)
    return d / se if se > 0 else math.nan


def _instrument() -> tuple:
    """Wrap ``_floor_stale`` and ``_raise_floor`` to log each check into ``CHECKS``."""
    hf = hessfree.HessianFree
    saved = hf.__dict__["_floor_stale"], hf._raise_floor
    stale0 = saved[0].__func__

    def floor_stale(state: dict) -> bool:
        out = stale0(state)
        ov = state.get("overshot_step")
        CHECKS.append(
            dict(
                step=state["step"],
                z=_z(state.get("recent_losses", [])),
                overshoot=ov is not None and state["step"] - ov <= damping_control._RISE_WINDOW,
                fired=bool(out),
                scale_before=state.get("damping_scale", math.nan),
            )
        )
        return out

    def raise_floor(self, curvature, product, g, g_norm, run) -> None:
        gCg, gDg = self._curvature_along(curvature, product, g, g_norm, run)
        sample = abs(gCg) / gDg if gDg > 0 else math.nan
        before = run.state.get("damping_scale", 0.0)
        saved[1](self, curvature, product, g, g_norm, run)  # one more product: off the clock
        if CHECKS and CHECKS[-1]["step"] == run.state["step"]:
            CHECKS[-1].update(sample=sample, raised=run.state["damping_scale"] > before)

    hf._floor_stale = staticmethod(floor_stale)
    hf._raise_floor = raise_floor
    return saved


def _restore(saved: tuple) -> None:
    hessfree.HessianFree._floor_stale, hessfree.HessianFree._raise_floor = saved


def _bn_buffers(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    return [
        (m, {k: v.clone() for k, v in m.named_buffers()})
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _put_back(saved: list[tuple[nn.Module, dict]]) -> None:
    for m, bufs in saved:
        for k, v in bufs.items():
            getattr(m, k).copy_(v)


def _batch_stats(model: nn.Module, xb: torch.Tensor) -> dict:
    """Each BatchNorm's (mean, biased var) of its input on ``xb`` at the current weights."""
    stats, hooks = {}, []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):

            def pre(mod, inp, stats=stats):
                x = inp[0]
                dims = [0] + list(range(2, x.dim()))
                stats[mod] = (x.mean(dims), x.var(dims, unbiased=False))

            hooks.append(m.register_forward_pre_hook(pre))
    saved = _bn_buffers(model)
    with torch.no_grad():
        model(xb)
    _put_back(saved)
    for h in hooks:
        h.remove()
    return stats


def _loss_frozen(model, loss_fn, xb, yb, stats) -> tuple[float, float]:
    """f on (xb, yb), BatchNorm statistics recomputed (train mode) and frozen at ``stats``."""
    saved = _bn_buffers(model)
    with torch.no_grad():
        f_re = float(loss_fn(model(xb), yb))
        hooks = [
            m.register_forward_hook(
                lambda mod, inp, out: nn.functional.batch_norm(
                    inp[0], stats[mod][0], stats[mod][1], mod.weight, mod.bias, False, 0.0, mod.eps
                )
            )
            for m in stats
        ]
        f_fr = float(loss_fn(model(xb), yb))
        for h in hooks:
            h.remove()
    _put_back(saved)
    return f_re, f_fr


@contextlib.contextmanager
def variant(mods: list[str]):
    """Candidate rules on top of ``_mbfloor.rule_mode``'s base (``lib+decay:100+j1.01``):

    - ``decay:H``: at a plain-CG check that does not fire, the floor scale's raised part
      (over the first step's) decays in log-scale with half-life H steps (no product);
    - ``quiet:Q`` (with ``decay:H``): decay only where no step overshot in the last Q steps;
    - ``set``: a fired check sets the scale to max(first, this sample), not max(kept, sample);
    - ``ov2``: a fire needs two overshoots (ρ < ¼ or NaN) among the window's steps, not one;
    - ``jF``: the first step's scale × F (a control: how far a 1 % nudge moves the end).
    """
    hf = hessfree.HessianFree
    saved = hf.__dict__["_floor_stale"], hf._calibrate_damping, hf._raise_floor
    stale0 = saved[0].__func__
    half = next((float(m[6:]) for m in mods if m.startswith("decay:")), 0.0)
    jit = next((float(m[1:]) for m in mods if m.startswith("j")), 1.0)
    two = "ov2" in mods
    quiet = next((int(m[6:]) for m in mods if m.startswith("quiet:")), 0)

    def floor_stale(state: dict) -> bool:
        first = state.setdefault("first_scale", state.get("damping_scale", 0.0))
        out = stale0(state)
        if out and two:
            ks = state.get("overshot_steps", [])
            out = sum(state["step"] - k <= damping_control._RISE_WINDOW for k in ks) >= 2
            if CHECKS and CHECKS[-1]["step"] == state["step"]:
                CHECKS[-1]["fired"] = out
        scale = state.get("damping_scale", 0.0)
        ov = state.get("overshot_step")
        calm = ov is None or state["step"] - ov > quiet  # quiet:Q: no overshoot in Q steps
        if not out and half > 0 and scale > first > 0 and calm:
            f = 2.0 ** (-damping_control._FLOOR_EVERY / half)
            state["damping_scale"] = first * (scale / first) ** f
        return out

    def calibrate(self, curvature, product, g, g_norm, run) -> None:
        saved[1](self, curvature, product, g, g_norm, run)
        if jit != 1.0:
            run.state["damping_scale"] *= jit
            run.state["min_damping_scale"] *= jit
            lam = self._damping_policy(run.state).clip(run.damping)
            run.damping = run.state["damping"] = lam

    def set_floor(self, curvature, product, g, g_norm, run) -> None:
        state = run.state
        state["damping_scale"] = state.setdefault("first_scale", state["damping_scale"])
        saved[2](self, curvature, product, g, g_norm, run)  # max(first, this sample)

    if "set" in mods:
        hf._raise_floor = set_floor
    if half or two:
        hf._floor_stale = staticmethod(floor_stale)
    if jit != 1.0:
        hf._calibrate_damping = calibrate
    try:
        yield
    finally:
        hf._floor_stale, hf._calibrate_damping, hf._raise_floor = saved


def run(key: str, rule: str, n: int, seed: int, frozen: bool = True) -> dict:
    base, *mods = rule.split("+")
    p = _mbfloor.PROBLEMS[key]()
    x, y, _, _ = p["data"]
    loss_fn, batch = p["loss"], p["batch"]
    torch.manual_seed(0)
    model = p["make"]()
    opt = hessfree.HessianFree(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    CHECKS.clear()
    steps, evals = [], []
    saved = _instrument()
    try:
        for k in range(1, n + 1):
            idx = torch.randint(len(y), (batch,), generator=gen)
            xb, yb = x[idx], y[idx]
            stats = _batch_stats(model, xb) if frozen else {}

            def closure(xb=xb, yb=yb) -> Any:
                o = model(xb)
                return loss_fn(o, yb), o

            with _mbfloor.rule_mode(base), variant(mods), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step(closure)
            i = opt.last_step
            row = dict(k=k, f0=i.loss, f1=i.loss_after, rho=i.rho, q=i.predicted_change,
                       lam=i.damping, floor=i.damping_floor, status=str(i.status),
                       scale=opt.state.get("damping_scale", math.nan))  # fmt: skip
            if frozen and stats:
                f_re, f_fr = _loss_frozen(model, loss_fn, xb, yb, stats)
                q = i.predicted_change
                ok = math.isfinite(q) and q < 0
                row.update(
                    rho_re=(f_re - i.loss) / q if ok else math.nan,
                    rho_fr=(f_fr - i.loss) / q if ok else math.nan,
                )
            steps.append(row)
            state = opt.state[next(iter(opt.state))]
            ks = state.setdefault("overshot_steps", [])  # the library's overshoots, for ov2
            if state.get("overshot_step") is not None and state["overshot_step"] not in ks:
                ks.append(state["overshot_step"])
            if k % 10 == 0 or k == n:
                evals.append((k, _unseen.train_set_loss(model, loss_fn, x, y)))
    finally:
        _restore(saved)
    return dict(problem=key, rule=rule, seed=seed, steps=steps, checks=list(CHECKS), evals=evals)


def summary(r: dict, lo: int = 120) -> str:
    ev = dict(r["evals"])
    n = max(ev)
    late = [c for c in r["checks"] if c["step"] >= lo]
    fired = [c for c in late if c["fired"]]
    raised = [c for c in late if c.get("raised")]
    rises = [c for c in late if c["z"] > damping_control._RISE_Z]
    st = r["steps"]
    over = [s["k"] for s in st if s["k"] >= lo and not (s["rho"] >= 0.25)]
    out = (
        f"| {r['problem']} | {r['rule']} | {r['seed']} | {ev.get(120, math.nan):.4g} / "
        f"{ev.get(200, math.nan):.4g} / {ev[n]:.4g} | {len(rises)} | {len(fired)} | "
        f"{','.join(str(c['step']) for c in raised) or '-'} | {len(over)} | "
        f"{st[min(lo, len(st)) - 1]['floor']:.3g} → {st[-1]['floor']:.3g} | {st[-1]['lam']:.3g} |"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", nargs="*", default=["cnnbn"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--rules", nargs="*", default=["lib", "gated"])
    ap.add_argument("--dump", default="")
    ap.add_argument("--no-frozen", action="store_true", help="skip the frozen-BN ρ (faster)")
    a = ap.parse_args()
    print("load at start:", open("/proc/loadavg").read().strip())
    print("\n| problem | rule | seed | loss 120 / 200 / end | rises z>1 (≥120) | fired | "
          "raised at | overshoots (≥120) | floor 120 → end | λ end |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in a.problems:
        for seed in a.seeds:
            for rule in a.rules:
                r = run(key, rule, a.steps, seed, frozen=not a.no_frozen)
                print(summary(r))
                sys.stdout.flush()
                if a.dump:
                    with open(a.dump, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
    print("\nload at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
