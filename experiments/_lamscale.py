"""Where λ meets its absolute floor ``min_damping=1e-8``, and a floor relative to the curvature
scale (#14, lamscale). Deterministic: no timing is a result (1 torch thread).

``floors``: each scorecard task's HF default and tuned regimes (``scorecard.hf_run``), run for
the scorecard's step counts or until ``--seconds`` of wall time; per run the minimum λ (and the
minimum of the unfloored λ the relative floor tracks), the curvature scale s =
``state['damping_scale']`` (|gᵀCg|/gᵀDg of the first step), whether λ touched 1e-8 or 1e-8·s,
the final error and a SHA-256 of the parameters (run once per code version: equal hashes =
bitwise unchanged trajectories).

``compare``: each regime with ``min_damping=1e-8`` (the former default, absolute) and with
its own setting (``'auto'``), in one process for equal steps: the error at 1/8, 1/4, 1/2 and all
of the steps, and whether the parameter hashes are equal.

``equiv``: ``_unseen.py``'s loss-scale problem (digits MLP, float64, full batch): the
trajectory of ``HessianFree(params, tolerance_change=0)`` with a ``(loss, outputs)`` closure at
loss × 1e3 / × 1e-3 / ``reduction='sum'`` against × 1, max relative parameter difference after
each of ``--steps`` steps.

    python experiments/_lamscale.py floors [--tasks swap,digits,...] [--steps swap=580,...]
    python experiments/_lamscale.py compare [--tasks swap,digits,mnist1d] [--steps swap=170,...]
    python experiments/_lamscale.py equiv [--steps 30] [--kw min_damping=0]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _unseen  # noqa: E402
import scorecard  # noqa: E402

import hessfree  # noqa: E402

STEPS = {
    "swap": 170,
    "digits": 2800,
    "mnist1d": 400,
    "curves": 573,
    "addition30": 85,
    "addition50": 55,
    "addition80": 45,
}
FLOOR = 1e-8
#: The tuned rows the latest scorecard runs picked (run6, run7; ``--which picked``).
PICKED = {
    "swap": "cg≤50",
    "digits": "full batch, cg≤50, λ0=1",
    "mnist1d": "250×1.1/step, curvature ¼",
    "curves": "250/62, cg≤2, K-FAC rank 32 refresh 2",
    "addition": "config (μ=0.03, λ0=0.1, cg≤25), 1000/100",
}


class Recording(hessfree.HessianFree):
    """Records λ, the unfloored λ and the curvature scale after every step."""

    log: list[tuple[float, float, float, float]] = []

    def step(self, closure=None, curvature_closure=None):  # noqa: ANN001, ANN201
        out = super().step(closure, curvature_closure)
        state = self.state[self._params()[0]]
        info = self.last_step
        Recording.log.append(
            (
                min(info.damping, info.next_damping),
                state.get("damping_unfloored", math.inf),
                state.get("damping_scale", math.nan),
                info.damping_floor,
            )
        )
        return out


def make(key: str) -> scorecard.Task:
    if key == "swap":
        return scorecard.make_swap_task(quick=False)
    if key == "curves":
        return scorecard.make_curves_task(quick=False)
    if key.startswith("addition"):
        return scorecard.make_addition_task(int(key[len("addition") :]), 60.0)
    return scorecard._classifier(key, quick=False)


def regimes(key: str, task: scorecard.Task, which: str) -> dict[str, dict]:
    """The HF default (as ``scorecard.main`` builds it) and the tuned rows named in ``which``
    ('all', 'picked': :data:`PICKED`, or a ';' list of name prefixes)."""
    picked = PICKED["addition" if key.startswith("addition") else key]
    base = task.hf_default_regime or task.hf[picked]  # as scorecard.main: the tuned's schedule
    base = {k: v for k, v in base.items() if k not in ("kfac", "early_kw")} | {"kw": {}}
    out = {"HF default": base}
    for name, regime in task.hf.items():
        if (
            name == picked
            if which == "picked"
            else which == "all" or any(name.startswith(p) for p in which.split(";"))
        ):
            out[name] = regime
    return out


def _steps(args: argparse.Namespace) -> dict[str, int]:
    """The step counts per task: ``STEPS`` with ``--steps key=n,...`` applied."""
    steps = dict(STEPS)
    for kv in filter(None, args.steps.split(",")):
        k, v = kv.split("=")
        steps[k] = int(v)
    return steps


def floors(args: argparse.Namespace) -> None:
    steps = _steps(args)
    scorecard.HessianFree = Recording
    print(f"hessfree from {hessfree.__file__}; load {open('/proc/loadavg').read().strip()}")
    print(
        "| task | regime | steps | min λ | min unfloored λ | scale s | min λ / s | λ ≤ 1e-8 "
        "| λ ≤ 1e-8·s | final error | sha256 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in args.tasks.split(","):
        task = make(key)
        for name, regime in regimes(key, task, args.which).items():
            Recording.log = []
            run = scorecard.hf_run(task, name, "HF", regime)
            t0, n = time.perf_counter(), 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                while n < steps[key] and time.perf_counter() - t0 < args.seconds:
                    run.step()
                    n += 1
            lams = [r[0] for r in Recording.log]
            shadow = min(r[1] for r in Recording.log)
            scale = Recording.log[-1][2]
            low = min(lams)
            hit = any(lam <= FLOOR * (1 + 1e-12) for lam in lams)
            hit_rel = (
                any(lam <= FLOOR * scale * (1 + 1e-12) for lam in lams)
                if math.isfinite(scale)
                else "–"
            )
            print(
                f"| {key} | {name[:60]} | {n} | {low:.3g} | {shadow:.3g} | {scale:.4g} | "
                f"{low / scale if scale else math.nan:.3g} | {hit} | {hit_rel} | "
                f"{task.error(run.model):.6e} | {_hash(run.model)} |",
                flush=True,
            )
    print(f"\nload {open('/proc/loadavg').read().strip()}")


def _hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def compare(args: argparse.Namespace) -> None:
    """Each regime twice in one process: ``min_damping=1e-8`` (absolute: the former default,
    bitwise) and the regime's own (``'auto'`` unless it sets one), for equal steps; the error
    at 1/8, 1/4, 1/2 and all of them, the minimum λ and both hashes."""
    steps = _steps(args)
    scorecard.HessianFree = Recording
    print(f"hessfree from {hessfree.__file__}; load {open('/proc/loadavg').read().strip()}")
    print(
        "| task | regime | min_damping | steps | error at 1/8 / 1/4 / 1/2 / all of the steps "
        "| min λ | scale s | statuses | sha256 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key in args.tasks.split(","):
        task = make(key)
        n = steps[key]
        marks = {max(1, n // 8), max(1, n // 4), max(1, n // 2), n}
        for name, regime in regimes(key, task, args.which).items():
            hashes = []
            for floor in (1e-8, "auto"):
                kw = regime["kw"]
                if floor != "auto" or "min_damping" not in kw:
                    kw = kw | {"min_damping": floor}
                Recording.log = []
                run = scorecard.hf_run(task, name, "HF", regime | {"kw": kw})
                errors = []
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for k in range(1, n + 1):
                        run.step()
                        if k in marks:
                            errors.append(task.error(run.model))
                hashes.append(_hash(run.model))
                print(
                    f"| {key} | {name[:50]} | {kw.get('min_damping')} | {n} | "
                    + " / ".join(f"{e:.4g}" for e in errors)
                    + f" | {min(r[0] for r in Recording.log):.3g} | {Recording.log[-1][2]:.4g} | "
                    f"{dict(sorted(run.statuses.items()))} | {hashes[-1]} |",
                    flush=True,
                )
            print(f"| {key} | {name[:50]} | bitwise equal: {hashes[0] == hashes[1]} |||||||")
    print(f"\nload {open('/proc/loadavg').read().strip()}")


def equiv(args: argparse.Namespace) -> None:
    kw = {"tolerance_change": 0.0}
    for kv in filter(None, args.kw.split(",")):
        k, v = kv.split("=")
        kw[k] = v if v == "auto" else float(v)
    x, y, _, _ = _unseen.digits(torch.float64)
    n = len(y)
    print(f"hessfree from {hessfree.__file__}; kw {kw}")
    scales = (("1", 1.0), ("1e3", 1e3), ("1e-3", 1e-3), ("sum", float(n)))
    thetas: dict[str, list[torch.Tensor]] = {}
    info: dict[str, list] = {}
    for label, s in scales:
        model = _unseen.mlp(torch.float64)
        opt = hessfree.HessianFree(model.parameters(), **kw)

        def closure(model: nn.Module = model, s: float = s, label: str = label) -> tuple:
            out = model(x)
            if label == "sum":
                return nn.functional.cross_entropy(out, y, reduction="sum"), out
            return s * nn.functional.cross_entropy(out, y), out

        thetas[label], info[label] = [], []
        for _ in range(args.steps):
            opt.step(closure)
            thetas[label].append(torch.cat([p.detach().flatten() for p in model.parameters()]))
            info[label].append(opt.last_step)
    print(
        "| scale s | λ₀ / s | min λ / s | floor / s at the end | final loss / s | max rel. "
        f"param diff vs s = 1 after steps 5 / 10 / 15 / ... / {args.steps} |"
    )
    print("|---|---|---|---|---|---|")
    for label, s in scales:
        s = float(n) if label == "sum" else s
        diffs = [
            ((a - b).abs().max() / b.abs().max()).item()
            for a, b in zip(thetas[label], thetas["1"], strict=True)
        ]
        marks = [diffs[i - 1] for i in range(5, args.steps + 1, 5)]
        infos = info[label]
        print(
            f"| {label} | {infos[0].damping / s:.6g} | "
            f"{min(min(i.damping, i.next_damping) for i in infos) / s:.3g} | "
            f"{infos[-1].damping_floor / s:.3g} | {infos[-1].loss_after / s:.10g} | "
            + " / ".join(f"{d:.2g}" for d in marks)
            + " |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("floors")
    f.add_argument("--tasks", default=",".join(STEPS))
    f.add_argument("--steps", default="")
    f.add_argument("--which", default="picked")
    f.add_argument("--seconds", type=float, default=85.0)
    c = sub.add_parser("compare")
    c.add_argument("--tasks", default="swap,digits,mnist1d")
    c.add_argument("--steps", default="")
    c.add_argument("--which", default="picked")
    e = sub.add_parser("equiv")
    e.add_argument("--steps", type=int, default=30)
    e.add_argument("--kw", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"floors": floors, "compare": compare, "equiv": equiv}[args.cmd](args)


if __name__ == "__main__":
    main()
