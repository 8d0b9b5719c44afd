"""CURVES: Adam first, then HF (and HF first, then Adam), against Adam alone at equal time (#14)

One interleaved race on the scorecard's full CURVES task (5,000 images), 1 torch thread: a
trunk of Adam lr 1e-3 b 20 and whole-budget HF rows, all from the same initial weights, in
``SLICES`` slices exactly as ``scorecard.interleave`` (shuffled turns, the error off the
clock). At each switch fraction ``f`` of the budget the harness *branches*: a fresh HF run
(one per ``--post`` regime) starts from the trunk's weights at that moment with its clock at
the trunk's, and runs the rest of the budget. A branch is therefore exactly the schedule
"Adam for f × budget, then HF" (the same Adam steps, not a re-run), at the cost of one HF
run per switch point instead of a whole hybrid. With ``--reverse`` the same for "HF (the
first whole-budget row) for f × budget, then Adam lr 1e-3 b 20".

Besides each run's error per slice and its final ratio to the trunk (Adam alone), prints the
*rate* comparison: from the same weights at the switch, the error drop of the trunk and of
each branch over the next one and two slices.

    python experiments/_curves_hybrid.py 90 16 "k2r2 λ≥0.3" "--post=k2r2 λ≥0.3;ns70" \
        --switch=0.25,0.5,0.75 [--reverse] [--save]
    python experiments/_curves_hybrid.py finals [--save]   # the scorecard's Adam→HF row
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _bench_common import RawLog, advance  # noqa: E402
from _curves_small import regimes  # noqa: E402


def _hf_of(run: sc.Run):
    """The HessianFree inside an ``scorecard.hf_run`` (for λ and the batch in the log)."""
    for c in run.step.__closure__ or ():
        if type(c.cell_contents).__name__ == "HessianFree":
            return c.cell_contents
    return None


def _branch(src: sc.Run, task: sc.Task, make, name: str, family: str, err: float) -> sc.Run:
    """A run made by ``make(task with src's weights)``, starting at src's clock and error."""
    run = make(dataclasses.replace(task, model=src.model))  # hf_run / first_order_run copy it
    run.name, run.family = name, family
    run.clock = src.clock
    run.curve.append((src.clock, err))
    return run


def race(
    budget: float,
    slices: int,
    names: list[str],
    post: list[str],
    switches: list[float],
    reverse: bool,
    log,
) -> None:
    task = sc.make_curves_task(quick=False)
    regs = regimes(task)
    trunk = sc.first_order_run(task, "Adam", 1e-3, 20)
    runs = [trunk] + [sc.hf_run(task, n, "HF", regs[n]) for n in names]
    at: dict[int, float] = {}  # slice boundary -> switch fraction
    for f in switches:
        k = round(f * slices)
        if not (0 < k < slices and math.isclose(k / slices, f)):
            raise ValueError(f"switch {f!r} is not a slice boundary of {slices} slices.")
        at[k] = f
    born: dict[str, int] = {}  # branch -> slice boundary it starts at
    rng = random.Random(0)
    for r in runs:
        r.curve.append((0.0, task.error(r.model)))
    for k in range(slices):
        end = budget * (k + 1) / slices
        order = list(runs)
        rng.shuffle(order)
        for r in order:
            if r.failed:
                continue
            advance(r, end, "cpu", width=100)
            e = task.error(r.model)
            r.curve.append((r.clock, e if math.isfinite(e) else math.inf))
        if k + 1 in at:
            f = at[k + 1]
            for p in post:
                b = _branch(
                    trunk,
                    task,
                    lambda t, p=p: sc.hf_run(t, p, "Adam→HF", regs[p]),
                    f"Adam→{p} @{f:g}",
                    "Adam→HF",
                    trunk.curve[-1][1],
                )
                b.adam_steps = trunk.steps
                runs.append(b)
                born[b.name] = k + 1
            if reverse and len(runs) > 1:
                hf = runs[1]
                b = _branch(
                    hf,
                    task,
                    lambda t: sc.first_order_run(t, "Adam", 1e-3, 20),
                    f"{hf.name}→Adam @{f:g}",
                    "HF→Adam",
                    hf.curve[-1][1],
                )
                runs.append(b)
                born[b.name] = k + 1

    adam = sc.final_error(trunk)
    log(f"error per slice (of {budget / slices:g} s); ratio = final error / Adam alone's")
    for r in runs:
        pad = "       " * born.get(r.name, 0)
        errs = " ".join(f"{e:6.2f}" for _, e in r.curve[1:])
        extra = f" (+{r.adam_steps} Adam)" if hasattr(r, "adam_steps") else ""
        opt = _hf_of(r)
        lam = f"  λ end {opt.last_step.damping:.3g}" if opt and opt.last_step else ""
        log(
            f"{r.name:26s} {pad}{errs}  steps {r.steps}{extra}  "
            f"ratio {sc.final_error(r) / adam:.3f}{lam}  {r.failed}"
        )
    log("rate from the same weights: error drop over the next 1 / 2 slices (branch / trunk)")
    for r in runs:
        if r.name not in born:
            continue
        k = born[r.name]
        src = trunk if r.family == "Adam→HF" else runs[1]
        e0 = r.curve[0][1]
        drops = []
        for n in (1, 2):
            if k + n <= slices:
                db, dt = e0 - r.curve[n][1], e0 - src.curve[k + n][1]
                drops.append(f"{db:6.2f} / {dt:6.2f} ({db / dt if dt else math.nan:5.2f}x)")
        log(f"{r.name:26s} from {e0:6.2f}: " + "   ".join(drops))


def finals(log) -> None:
    """The scorecard's CURVES finals that matter here, built as ``scorecard.run_task`` builds
    them: Adam lr 1e-3 b 20, HF tuned (the λ≥0.3 row) and the ``hybrid_run`` row, 90 s each
    in the task's 20 slices."""
    task = sc.make_curves_task(quick=False)
    h = task.hybrid
    runs = [
        sc.first_order_run(task, "Adam", 1e-3, 20),
        sc.hf_run(task, "HF tuned", "HF tuned", task.hf[h["hf"]]),
        sc.hybrid_run(task, h["lr"], h["batch"], h["fraction"] * task.budget, h["hf"]),
    ]
    sc.interleave(runs, task, task.budget, task.slices, "cpu")
    adam = sc.final_error(runs[0])
    for r in runs:
        errs = " ".join(f"{e:6.2f}" for _, e in r.curve[1::2])
        log(f"{r.name[:40]:40s} {errs}  steps {r.steps}  ratio {sc.final_error(r) / adam:.3f}")


def main() -> None:
    torch.set_num_threads(1)
    log = RawLog()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    opts = dict(a.split("=", 1) if "=" in a else (a, "") for a in sys.argv[1:] if "--" in a[:2])
    log(f"`{' '.join(sys.argv[1:])}`; load before {os.getloadavg()}")
    if args[0] == "finals":
        finals(log)
    else:
        race(
            float(args[0]),
            int(args[1]),
            [n for n in args[2].split(";") if n] if len(args) > 2 else [],
            [p for p in opts.get("--post", "k2r2 λ≥0.3").split(";") if p],
            [float(f) for f in opts.get("--switch", "0.25,0.5,0.75").split(",")],
            "--reverse" in opts,
            log,
        )
    log(f"load after {os.getloadavg()}")
    if "--save" in opts:
        log.append_to(
            Path(__file__).resolve().parent / "results" / "2026-12-01-hybrid.md",
            "CURVES: Adam then HF (raw runs)",
        )


if __name__ == "__main__":
    main()
