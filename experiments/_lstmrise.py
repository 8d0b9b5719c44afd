"""HF's late loss rise on unseen4's packed LSTM ("lstmrise", ``experiments/README.md``).

``_unseen4.py lstm --part race --seed 2``: HF with the ``(loss, outputs)`` closure reached a
training-set loss of 0.0033 at half its 10-s budget and 0.107 at the end, every step accepted.
Here the same problem, model and batches (``_unseen4.p_lstm``, batch 64), off the clock for a
fixed number of steps, with per-step instrumentation:

- ``f0`` / ``f1``: the step's own batch's loss before and after the step (``StepInfo``);
- ``held``: a fixed held-out set's loss (512 sequences drawn as the training set, another seed);
- ``train``: the whole 2,000-sequence training set's loss (the race's reported loss);
- ρ, λ, λ's floor, CG iterations and stop reason, ‖Δθ‖, ‖g‖.

Parts:

- ``diag``: the instrumented trace for the given seeds (``--steps``, ``--seeds``), a summary
  per seed (where the training loss bottomed, its rise, the steps that raised it on their own
  batch, ρ and λ there) and, with ``--trace``, every step.
- ``remedy``: the variants below from the same weights and batches, training-set and held-out
  loss at ¼, ½, 1 × the steps (``--variants``).

Variants: ``lo`` (the default: (loss, outputs) closure, no arguments); ``hess`` (loss-only
closure); ``clip`` (``lo`` plus gradient-norm clipping of the step at 1, as RNN trainers use);
``nofloor`` (``relative_min_damping=0``); ``floor10`` (``relative_min_damping=0.1``); ``sd``
(structural damping, Martens & Sutskever 2011 §3.3: the closure returns the LSTM's hidden
states from ``hessfree.record_hidden``, ``structural_damping='auto'`` is then μ = 0.03, and
the relative floor is off); ``cold`` (``cg_decay=0``: no warm start, CG from 0 each step).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_lstmrise.py diag --seeds 0 1 2 3 4
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_lstmrise.py remedy --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _unseen4  # noqa: E402

import hessfree  # noqa: E402

torch.set_num_threads(1)


def held_out(n: int = 512, tmax: int = 20, seed: int = 1012) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences drawn as ``_unseen4.p_lstm``'s training set, from another generator seed."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, tmax + 1, (n,), generator=gen)
    x = torch.randint(1, 3, (n, tmax), generator=gen)
    x[torch.arange(tmax).expand(n, tmax) >= lengths.unsqueeze(1)] = 0
    return x, ((x == 2).sum(1) > (x == 1).sum(1)).long()


def make_opt(variant: str, model) -> hessfree.HessianFree:
    kw = {
        "nofloor": {"relative_min_damping": 0.0},
        "floor10": {"relative_min_damping": 0.1},
        "cold": {"cg_decay": 0.0},
    }
    return hessfree.HessianFree(model.parameters(), **kw.get(variant, {}))


def lstm_problem(seed: int) -> dict:
    """``_unseen4``'s packed LSTM (weights of ``seed``, the race's batches), a held-out set."""
    _unseen4.SEED = seed
    prob = _unseen4.p_lstm()
    return dict(make=prob.model, loss=F.cross_entropy, batches=prob.batches, full=prob.full,
                held=held_out())  # fmt: skip


def mb_problem(key: str, seed: int) -> dict:
    """``_mbfloor``'s problems (``grureg``, ``lstmreg``, ``grucls``): its weights (seed 0) and
    batches (uniform draws, generator seed ``seed``), its test set as the held-out one."""
    import _mbfloor

    p = _mbfloor.PROBLEMS[key]()
    x, y, xt, yt = p["data"]
    gen = torch.Generator().manual_seed(seed)
    drawn: list[torch.Tensor] = []

    def batches(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(drawn) <= k:
            drawn.append(torch.randint(len(y), (p["batch"],), generator=gen))
        return x[drawn[k]], y[drawn[k]]

    def make():
        torch.manual_seed(0)
        return p["make"]()

    return dict(make=make, loss=p["loss"], batches=batches, full=(x, y), held=(xt, yt))


def problem(key: str, seed: int) -> dict:
    return lstm_problem(seed) if key == "lstm" else mb_problem(key, seed)


def trace(seed: int, steps: int, variant: str = "lo", key: str = "lstm") -> list[dict]:
    """``steps`` HF steps of ``variant`` on problem ``key``, seed ``seed``."""
    prob = problem(key, seed)
    model, loss_fn = prob["make"](), prob["loss"]
    opt = make_opt(variant, model)
    xh, yh = prob["held"]
    xf, yf = prob["full"]
    rows = []
    for k in range(steps):
        xb, yb = prob["batches"](k)
        before = [p.detach().clone() for p in model.parameters()]

        if variant == "sd":  # structural damping (Martens & Sutskever 2011, §3.3): 'auto' μ

            def closure(xb=xb, yb=yb):
                with hessfree.record_hidden(model) as rec:
                    out = model(xb)
                return loss_fn(out, yb), out, rec.hidden
        elif variant == "hess":

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                f = loss_fn(model(xb), yb)
                f.backward()
                return f
        else:

            def closure(xb=xb, yb=yb):
                out = model(xb)
                return loss_fn(out, yb), out

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)
        i = opt.last_step
        with torch.no_grad():
            if variant == "clip":  # the step's length clipped at 1 (the update, not g: HF's p)
                d = [p - b for p, b in zip(model.parameters(), before, strict=True)]
                norm = math.sqrt(sum(float((v * v).sum()) for v in d))
                if norm > 1.0:
                    for p, b, v in zip(model.parameters(), before, d, strict=True):
                        p.copy_(b + v / norm)
            pairs = zip(model.parameters(), before, strict=True)
            dnorm = math.sqrt(sum(float(((p - b) ** 2).sum()) for p, b in pairs))
            wnorm = math.sqrt(sum(float((p**2).sum()) for p in model.parameters()))
            held, train = float(loss_fn(model(xh), yh)), float(loss_fn(model(xf), yf))
        rows.append(
            dict(
                k=k,
                f0=i.loss,
                f1=i.loss_after,
                rho=i.rho,
                lam=i.damping,
                floor=i.damping_floor,
                cg=i.cg_iters,
                why=i.cg_reason,
                rate=i.step_rate,
                dnorm=dnorm,
                gnorm=i.grad_norm,
                status=str(i.status),
                held=held,
                train=train,
                wnorm=wnorm,
            )
        )
    return rows


def summary(seed: int, rows: list[dict]) -> str:
    train = [r["train"] for r in rows]
    kmin = min(range(len(train)), key=train.__getitem__)
    late = rows[kmin + 1 :]
    up_own = [r for r in rows if r["f1"] > r["f0"]]  # an accepted step that raised its batch
    bad = [r for r in late if r["train"] > train[kmin] * 3]
    first_bad = bad[0]["k"] if bad else None
    rho = [r["rho"] for r in rows if math.isfinite(r["rho"])]
    lam = [r["lam"] for r in rows]
    # a step that raised the training-set loss ≥ 3x while lowering its own batch's, and ρ there
    spikes = [
        (b["k"], b["rho"], b["rate"])
        for a, b in zip(rows, rows[1:], strict=False)
        if b["train"] > 3 * a["train"] and b["f1"] <= b["f0"]
    ]
    at_floor = sum(abs(r["lam"] - r["floor"]) <= 1e-12 * max(r["floor"], 1e-30) for r in rows)
    return (
        f"| {seed} | {train[kmin]:.3g} @ {kmin} | {train[-1]:.3g} | "
        f"{min(r['held'] for r in rows):.3g} / {rows[-1]['held']:.3g} | "
        f"{first_bad if first_bad is not None else '-'} | {len(up_own)} | "
        f"{statistics.median(rho):.3g} | {sum(r['rho'] == -math.inf for r in rows)} | "
        f"{', '.join(f'{k} (ρ {q:.2g}, rate {t:.2g})' for k, q, t in spikes) or '-'} | "
        f"{statistics.median(lam):.3g} / {lam[-1]:.3g} | {at_floor}/{len(rows)} | "
        f"{statistics.median(r['dnorm'] for r in rows):.3g} / "
        f"{max(r['dnorm'] for r in rows):.3g} | {rows[0]['wnorm']:.3g} → {rows[-1]['wnorm']:.3g} |"
    )


def diag(seeds: list[int], steps: int, show: bool, key: str = "lstm") -> None:
    load0 = os.getloadavg()
    c0 = time.process_time()
    print(
        f"\n#### diag: {key}, HF lo, {steps} steps (load {load0[0]:.2f})\n\n"
        "| seed | min train loss @ step | final train | held-out min / final | first step "
        "> 3× min | steps raising own batch | ρ median | ρ = -inf | train ×3 in one step "
        "(step, ρ, rate) | λ median / last | λ at floor | ‖Δθ‖ median / max | ‖θ‖ first → last "
        "|\n|" + "---|" * 13
    )
    traces = {}
    for s in seeds:
        traces[s] = trace(s, steps, key=key)
        print(summary(s, traces[s]), flush=True)
    if show:
        for s in seeds:
            print(
                f"\n##### seed {s}\n\n| k | f0 (own) | f1 (own) | held | train | ρ | λ | floor | "
                "CG | stop | rate | ‖Δθ‖ | ‖g‖ | ‖θ‖ |\n|" + "---|" * 14
            )
            for r in traces[s]:
                print(
                    f"| {r['k']} | {r['f0']:.4g} | {r['f1']:.4g} | {r['held']:.4g} | "
                    f"{r['train']:.4g} | {r['rho']:.3g} | {r['lam']:.3g} | {r['floor']:.3g} | "
                    f"{r['cg']} | {r['why']} | {r['rate']:.3g} | {r['dnorm']:.3g} | "
                    f"{r['gnorm']:.3g} | {r['wnorm']:.4g} |"
                )
    load1 = os.getloadavg()
    print(f"\n(cpu {time.process_time() - c0:.0f} s; load {load0[0]:.2f} -> {load1[0]:.2f})")


def remedy(seeds: list[int], steps: int, variants: list[str]) -> None:
    load0 = os.getloadavg()
    fr = (0.25, 0.5, 1.0)
    print(
        f"\n#### remedy: {steps} steps, train-set (held-out) loss at ¼, ½, 1× "
        f"(load {load0[0]:.2f})\n\n| seed | variant | "
        + " | ".join(f"{f:g}×" for f in fr)
        + " | min train | ρ median | λ median |\n|"
        + "---|" * 8
    )
    finals: dict[str, list[float]] = {v: [] for v in variants}
    for s in seeds:
        for v in variants:
            rows = trace(s, steps, v)
            q = [rows[int(f * steps) - 1] for f in fr]
            rho = [r["rho"] for r in rows if math.isfinite(r["rho"])]
            finals[v].append(rows[-1]["train"])
            print(
                f"| {s} | {v} | "
                + " | ".join(f"{r['train']:.3g} ({r['held']:.3g})" for r in q)
                + f" | {min(r['train'] for r in rows):.3g} | "
                f"{statistics.median(rho) if rho else math.nan:.3g} | "
                f"{statistics.median(r['lam'] for r in rows):.3g} |",
                flush=True,
            )
    base = variants[0]
    print("\nfinal train loss, geometric mean of the ratio to " + base + ":")
    for v in variants[1:]:
        logs = [math.log(a / b) for a, b in zip(finals[v], finals[base], strict=True)]
        print(f"- {v}: {math.exp(statistics.fmean(logs)):.3g}")
    load1 = os.getloadavg()
    print(f"(load {load0[0]:.2f} -> {load1[0]:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=("diag", "remedy"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--problem", default="lstm", choices=("lstm", "grureg", "lstmreg", "grucls"))
    ap.add_argument("--variants", nargs="+", default=["lo", "hess", "clip", "nofloor", "floor10"])
    a = ap.parse_args()
    if a.part == "diag":
        diag(a.seeds, a.steps, a.trace, a.problem)
    else:
        remedy(a.seeds, a.steps, a.variants)


if __name__ == "__main__":
    main()
