"""The relative λ floor on plain-CG mini-batch steps: which refresh rule tells a growing
curvature scale from batch noise (``experiments/README.md``, "mbfloor").

Each rule replaces ``HessianFree._raise_floor`` and opens its gate on every step kind (every
``_FLOOR_EVERY``-th step, one product along g, as on K-FAC steps); the scale samples, each step's
starting loss f0 and predicted change q(p) - q(0) are kept on the optimizer for the rules:

- ``gated``: main before "mbfloor" (plain-CG steps keep the first step's scale);
- ``lib``: the library as it is (after "ratchet2": a rise of 1 s.e. *and* a step of the
  same 8 that overshot its own batch, ρ < ¼; ``lib:zZ`` the same with the rise at Z s.e.);
- ``old``: the library after "mbfloor" (1 s.e. alone: the ratchet; the shipped rule before
  "ratchet2", as ``_RISE_SHARE = 0``);
- ``overshot``: an overshoot in the last 8 steps alone (no rise test);
- ``max``: the running maximum on every step kind (unseenmb's "refresh every step kind");
- ``trend``: the running maximum of the geometric mean of the last W samples, raised only when
  the log-scale's least-squares slope over them is > T standard errors (a sustained trend);
- ``heldout``: raised to the sample (running maximum) only when the loss of the *fresh* batches
  over the last 2M steps fell by less than ``H`` × the decrease those steps predicted (a
  held-out ρ, from losses the optimizer already has: the next batch's f0).

Off the clock: N steps from the same weights, batch seeds given; train-set loss after N/4, N/2,
N (load-free, deterministic).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_mbfloor.py [problem ...] \
        [--steps N] [--seeds 1 2 3] [--rules gated max trend heldout]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import statistics
import sys
import time
import warnings
from typing import Any

import _unseen
import _unseenmb
import torch
from torch import nn

import hessfree
import hessfree._damping_control as damping_control

torch.set_num_threads(1)

W, T = 6, 3.0  # trend: window (samples) and t-statistic
M, H = 8, 0.25  # heldout: half-window (steps) and threshold


def lstmreg() -> dict:
    p = _unseenmb.grureg()
    p["make"] = lambda: _unseen.SeqReg(nn.LSTM)
    p["title"] = "(reference) _unseen.py's LSTM(2→32) regression, T = 30, MSE, batch 128"
    return p


PROBLEMS = dict(_unseenmb.PROBLEMS, lstmreg=lstmreg)


def _trend(logs: list[float]) -> float:
    """t-statistic of the least-squares slope of ``logs`` against 0, 1, …"""
    n = len(logs)
    xs = range(n)
    xm, ym = (n - 1) / 2, statistics.fmean(logs)
    sxx = sum((x - xm) ** 2 for x in xs)
    b = sum((x - xm) * (y - ym) for x, y in zip(xs, logs, strict=True)) / sxx
    res = sum((y - ym - b * (x - xm)) ** 2 for x, y in zip(xs, logs, strict=True))
    se = math.sqrt(res / (n - 2) / sxx) if res > 0 else 0.0
    return math.inf if se == 0 and b > 0 else (b / se if se > 0 else 0.0)


def heldout_rho(f0: list[float], pred: list[float], m: int = M) -> float:
    """(mean f0 of steps k-2m..k-m-1 minus mean f0 of k-m..k-1) / (-Σ q of the m steps between
    the two halves' centres): the decrease fresh batches saw over what the steps predicted."""
    if len(f0) < 2 * m:
        return math.nan
    a, b = statistics.fmean(f0[-2 * m : -m]), statistics.fmean(f0[-m:])
    lo = len(pred) - 2 * m + m // 2
    q = -sum(pred[lo : lo + m])
    return (a - b) / q if q > 0 else math.nan


def fresh_rise(f0: list[float], m: int = M) -> float:
    """How many standard errors the mean starting loss of the last m steps (each on a fresh
    batch) lies above that of the m steps before (the within-half spreads as the errors)."""
    if len(f0) < 2 * m:
        return math.nan
    a, b = f0[-2 * m : -m], f0[-m:]
    se = math.sqrt((statistics.variance(a) + statistics.variance(b)) / m)
    d = statistics.fmean(b) - statistics.fmean(a)
    return d / se if se > 0 else (math.inf if d > 0 else 0.0)


def _loss_fell(losses: list[float], window: int = 8, z: float = 1.0) -> bool:
    """The mirror of ``optimizer._loss_rose``: the last ``window`` losses' mean *below* the
    ``window`` before's by more than ``z`` standard errors."""
    return damping_control._loss_rose([-v for v in losses], window, z, share=0.0)


def _down_rule(rule: str, arg: str):
    """mbratchet: the library's rise test raises the scale to the sample (running maximum);
    a way down for it (the gate is every ``_FLOOR_EVERY``-th step, as the library's):

    - ``fall:reset``: where the fresh batches' loss *fell* by > 1 s.e. (``_loss_fell``), the
      scale back to the first step's (no product);
    - ``fall:geo``: there, to the geometric mean of the scale and the first (no product);
    - ``fall:fresh``: there, one product: the scale to the sample, if lower (candidate (a));
    - ``decay:H``: the raised part decays in log-scale towards the first with half-life H
      steps (no product; candidate (c)); ``decay:H/Z``: with the rise test at Z s.e.;
    - ``win:K``: the scale = max(first, samples taken in the last K steps) (no product;
      candidate (b));
    - ``prob:D``: probation: D steps after a raise, the scale goes back to what it was before
      unless the last 8 losses' mean is below the mean of the 8 before the rise (no product);
    - ``rel:R``: the library's running maximum, raised only where the rise is also more than
      R of the earlier window's mean (a large effect, not only a significant one).
    """

    def raise_floor(self, curvature, product, g, g_norm, run) -> None:
        state = run.state
        first = state.setdefault("mb_first_scale", state.get("damping_scale", 0.0))
        losses = state.get("recent_losses", [])
        half, _, z = arg.partition("/")  # decay:H/Z: half-life H, rise test at Z s.e.
        rose = damping_control._loss_rose(losses, z=float(z) if z else 1.0, share=0.0)
        if rule == "rel" and rose:  # and by more than R of the level (a large effect)
            before = statistics.fmean(losses[-16:-8])
            rose = statistics.fmean(losses[-8:]) - before > float(half) * abs(before)
        scale = state.get("damping_scale", 0.0)
        if rule == "decay" and scale > first > 0:
            h = float(half) if half else 100.0
            scale = first * (scale / first) ** (2.0 ** (-damping_control._FLOOR_EVERY / h))
        if rule == "win":
            k = float(arg) if arg else 64.0
            self._mb_win = [
                (s, v) for s, v in getattr(self, "_mb_win", []) if state["step"] - s < k
            ]
            scale = max([first] + [v for _, v in self._mb_win])
        if rule == "fall" and _loss_fell(losses):
            self._mb_h.append(-1)
            if arg == "reset":
                scale = first
            elif arg == "geo":
                scale = math.sqrt(scale * first)
            elif arg == "fresh":
                gCg, gDg = self._curvature_along(curvature, product, g, g_norm, run)
                sample = abs(gCg) / gDg if gDg > 0 else math.nan
                self._mb_samples.append(sample)
                if math.isfinite(sample):
                    scale = min(scale, sample)
        if rule == "prob":  # probation: a raise D steps old stays only if the loss came back
            pend = getattr(self, "_mb_pending", None)  # (step, scale before, mean before)
            if pend and state["step"] - pend[0] >= (float(arg) if arg else 16.0):
                self._mb_pending = None
                if statistics.fmean(losses[-8:]) >= pend[2]:
                    self._mb_h.append(-1)
                    scale = min(scale, pend[1])
        if rose:
            self._mb_h.append(1)
            if rule == "prob" and getattr(self, "_mb_pending", None) is None:
                self._mb_pending = (state["step"], scale, statistics.fmean(losses[-16:-8]))
            gCg, gDg = self._curvature_along(curvature, product, g, g_norm, run)
            sample = abs(gCg) / gDg if gDg > 0 else math.nan
            if math.isfinite(sample):
                self._mb_samples.append(sample)
                if rule == "win":
                    self._mb_win.append((state["step"], sample))
                if sample > scale:
                    self._mb_raised += 1
                    scale = sample
        state["damping_scale"] = scale
        lam = self._damping_policy(state).clip(run.damping)
        if lam != run.damping:
            run.damping = state["damping"] = lam

    return raise_floor


def _raise_with(rule: str):
    rule, _, arg = rule.partition(":")
    if rule in ("fall", "decay", "win", "prob", "rel"):
        return _down_rule(rule, arg)

    def raise_floor(self, curvature, product, g, g_norm, run) -> None:
        gCg, gDg = self._curvature_along(curvature, product, g, g_norm, run)
        scale = abs(gCg) / gDg if gDg > 0 else math.nan
        state = run.state
        if not math.isfinite(scale):
            return
        self._mb_samples.append(scale)
        new = scale
        if rule == "trend":
            logs = [math.log(s) for s in self._mb_samples[-W:] if s > 0]
            if len(logs) < W or _trend(logs) <= T:
                return
            new = math.exp(statistics.fmean(logs))
        elif rule == "heldout":
            h = heldout_rho(self._mb_f0 + [run.f0], self._mb_pred)
            self._mb_h.append(h)
            if not h < (float(arg) if arg else H):
                return
        elif rule == "rise":
            z = fresh_rise(self._mb_f0 + [run.f0])
            self._mb_h.append(z)
            if not z > (float(arg) if arg else 2.0):
                return
        if new <= state.get("damping_scale", 0.0):
            return
        self._mb_raised += 1
        state["damping_scale"] = new
        lam = self._damping_policy(state).clip(run.damping)
        if lam != run.damping:
            run.damping = state["damping"] = lam

    return raise_floor


@contextlib.contextmanager
def rule_mode(rule: str):
    """``'lib'``: the library as it is; ``'gated'``: main's (no refresh on plain-CG steps);
    ``'old'``: the rise test before "mbratchet" (1 s.e., no share: the ratchet);
    the others: patched in here, the gate opened on every step kind."""
    if rule == "lib":
        yield
        return
    if rule in ("gated", "old", "overshot", "rise:z") or rule.startswith("lib:z"):
        saved_rose, saved_need = damping_control._loss_rose, damping_control._RISE_NEEDS_OVERSHOOT
        if rule == "gated":
            damping_control._loss_rose = lambda *a, **k: False
        elif rule == "old":  # the rise alone (mbfloor)
            damping_control._loss_rose = functools.partial(saved_rose, share=0.0)
            damping_control._RISE_NEEDS_OVERSHOOT = False
        elif rule == "overshot":  # an overshoot in the window alone, no rise test
            damping_control._loss_rose = lambda losses, *a, **k: len(losses) >= 16
        else:  # lib:zZ: the library's rule with the rise test at Z s.e.
            damping_control._loss_rose = functools.partial(saved_rose, z=float(rule[5:]))
        try:
            yield
        finally:
            damping_control._loss_rose = saved_rose
            damping_control._RISE_NEEDS_OVERSHOOT = saved_need
        return
    hf = hessfree.HessianFree
    saved = hf._raise_floor, hf._kfac_in_use, hf._cg_max_iter
    in_use, cap = saved[1], saved[2]
    hf._kfac_in_use = lambda self: True
    hf._cg_max_iter = lambda self, run, *, kfac=False: cap(self, run, kfac=kfac and in_use(self))
    if rule != "max":
        hf._raise_floor = _raise_with(rule)
    try:
        yield
    finally:
        hf._raise_floor, hf._kfac_in_use, hf._cg_max_iter = saved


def run(key: str, rule: str, n: int, seed: int) -> dict:
    p = PROBLEMS[key]()
    x, y, _, _ = p["data"]
    loss_fn, batch = p["loss"], p["batch"]
    torch.manual_seed(0)
    model = p["make"]()
    opt = hessfree.HessianFree(model.parameters())
    opt._mb_samples, opt._mb_f0, opt._mb_pred, opt._mb_h, opt._mb_raised = [], [], [], [], 0
    gen = torch.Generator().manual_seed(seed)
    out, lam, flo, trace = [], [], [], []
    t0 = time.perf_counter()
    for k in range(1, n + 1):
        idx = torch.randint(len(y), (batch,), generator=gen)
        xb, yb = x[idx], y[idx]

        def closure(xb=xb, yb=yb) -> Any:
            o = model(xb)
            return loss_fn(o, yb), o

        with rule_mode(rule), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)
        i = opt.last_step
        opt._mb_f0.append(i.loss)
        opt._mb_pred.append(i.predicted_change if math.isfinite(i.predicted_change) else 0.0)
        lam.append(i.damping)
        flo.append(i.damping_floor)
        trace.append((i.loss, i.loss_after, i.rho, i.predicted_change, i.damping, i.damping_floor))
        if k in (n // 4, n // 2, n):
            out.append(_unseen.train_set_loss(model, loss_fn, x, y))
    return dict(loss=out, lam=lam, flo=flo, samples=opt._mb_samples, h=opt._mb_h, f0=opt._mb_f0,
                raised=opt._mb_raised, secs=time.perf_counter() - t0, trace=trace)  # fmt: skip


def race(key: str, budget: float, rules: list[str]) -> None:
    """The rules interleaved at equal stepping time (``_unseen.interleave``, evaluation off the
    clock): the train-set loss at ¼, ½, 1× of ``budget``; batch seed 1, as ``_unseenmb``."""
    p = PROBLEMS[key]()
    x, y, _, _ = p["data"]
    loss_fn, batch = p["loss"], p["batch"]
    torch.manual_seed(0)
    model0 = p["make"]()
    runs = []
    for rule in rules:
        model = copy.deepcopy(model0)
        opt = hessfree.HessianFree(model.parameters())
        step = _unseen.minibatch_step(
            model, opt, x, y, batch, loss_fn, True, lambda rule=rule: rule_mode(rule)
        )
        runs.append(
            _unseen.Run(rule, step, lambda m=model: _unseen.train_set_loss(m, loss_fn, x, y), opt)
        )
    load0 = open("/proc/loadavg").read().split()[:3]
    _unseen.interleave(runs, budget, eval_every=budget / 20)
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"\n#### race {key}: {budget:g} s each; load {' '.join(load0)} → {' '.join(load1)}\n")
    print("| rule | steps | s/step vs first | loss ¼ | ½ | 1× | 1× / first rule's |")
    print("|---|---|---|---|---|---|---|")

    def at(r, frac: float) -> float:
        return next(f for t, f in r.curve if t >= frac * budget or (t, f) == r.curve[-1])

    first = runs[0]
    for r in runs:
        print(f"| {r.name} | {r.steps} | "
              f"{r.clock / r.steps / (first.clock / first.steps):.3g} | "
              + " | ".join(f"{at(r, f):.4g}" for f in (0.25, 0.5, 1.0))
              + f" | {at(r, 1.0) / at(first, 1.0):.3g} |")  # fmt: skip
    sys.stdout.flush()


def _fmt(v: list[float], k: int = 6) -> str:
    return "→".join(f"{x:.2g}" for x in _unseen._sample(v, k)) if v else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "problems", nargs="*", default=["cnnbn", "grucls", "embed", "grureg", "lstmreg"]
    )
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--rules", nargs="*", default=["gated", "max", "trend", "heldout"])
    ap.add_argument("--race", type=float, default=0.0, help="interleaved race of S s instead")
    ap.add_argument("--dump", default="", help="append each run's per-step trace (JSON lines)")
    a = ap.parse_args()
    print("load at start:", open("/proc/loadavg").read().strip())
    if a.race:
        for key in a.problems:
            race(key, a.race, a.rules)
        print("\nload at end:", open("/proc/loadavg").read().strip())
        return
    n = a.steps
    for key in a.problems:
        print(f"\n#### {key}: {n} steps, train-set loss after {n // 4} / {n // 2} / {n}\n")
        print("| rule | seed | loss | λ | floor | scale samples | held-out ρ | raised |")
        print("|---|---|---|---|---|---|---|---|")
        finals: dict[str, list[float]] = {}
        for seed in a.seeds:
            for rule in a.rules:
                r = run(key, rule, n, seed)
                finals.setdefault(rule, []).append(r["loss"][-1])
                if a.dump:
                    with open(a.dump, "a") as fh:
                        keep = dict(problem=key, rule=rule, seed=seed, steps=n)
                        keep.update({f: r[f] for f in ("loss", "secs", "raised", "trace")})
                        fh.write(json.dumps(keep) + "\n")
                print(f"| {rule} | {seed} | {' / '.join(f'{v:.4g}' for v in r['loss'])} | "
                      f"{_fmt(r['lam'])} | {_fmt(r['flo'], 4)} | {_fmt(r['samples'], 8)} | "
                      f"{_fmt(r['h'], 6)} | {r['raised']} |")  # fmt: skip
                sys.stdout.flush()
        base = finals.get("gated")
        for rule, v in finals.items():
            gm = (
                math.exp(statistics.fmean(math.log(a / b) for a, b in zip(v, base, strict=True)))
                if base
                else math.nan
            )
            print(f"- {rule}: final {' / '.join(f'{x:.4g}' for x in v)}; geo-mean ratio to "
                  f"gated {gm:.3g}")  # fmt: skip
    print("\nload at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
