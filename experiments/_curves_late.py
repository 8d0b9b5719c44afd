"""Why CURVES's HF stalls late in the run, and regimes that grow the batch late (#14).

Runs HF regimes against Adam interleaved as the scorecard does (``_curves_regimes``' harness:
same initial weights, same data order, 1 torch thread) and, per slice of the budget, prints
what each HF run's steps looked like (median λ, ρ, CG iterations, step rate, the batch sizes)
and, off the clock at the end of the slice, the gradient noise at the parameters reached: the
mean of :math:`\\|g_B - g\\|^2 / \\|g\\|^2` over random 250-case batches ``B`` (``g`` the
gradient on the whole training set; above 1 a mini-batch gradient is mostly noise).

    python experiments/_curves_late.py BUDGET name[,name...] [--quick] [--slices N] [--no-noise]

Names are ``_curves_regimes.variants()``'s or this file's ``late_variants()``'s.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _curves_regimes  # noqa: E402
import scorecard as sc  # noqa: E402


def late_variants() -> dict[str, dict]:
    """Regimes that change the batch late, on top of the scorecard's K-FAC rows."""
    k5 = dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=5), kfac=dict(rank=32))
    k2 = dict(batch=250, curvature_batch=62, kw=dict(cg_max_iter=2), kfac=dict(rank=32, refresh=2))
    k2kw = k2["kw"]
    full = dict(kw=dict(cg_max_iter=10), early_kw=dict(cg_max_iter=2), full_curvature_batch=0.1)
    full_g = full | dict(
        kw=dict(cg_max_iter=10, min_damping=1e-2), early_kw=dict(cg_max_iter=2, min_damping=1e-8)
    )

    def smooth(theta: float) -> dict:
        return dict(theta=theta, smooth=0.8, max_growth=2.0)

    return {
        "k5": k5,
        "k2r2": k2,
        "k2r2lr.5": k2 | dict(kw=k2kw | dict(lr=0.5)),
        "k2r2nt.5": k2 | dict(norm_test=dict(theta=0.5)),
        "k2r2nt.5c": k2 | dict(norm_test=dict(theta=0.5), curvature_batch=0.25),
        "k2r2nt.7": k2 | dict(norm_test=dict(theta=0.7)),
        "k2r2nt.9": k2 | dict(norm_test=dict(theta=0.9)),
        "k2r2nt.7p8": k2 | dict(norm_test=dict(theta=0.7, parts=8, every=10)),
        "k2r2nt.9p8": k2 | dict(norm_test=dict(theta=0.9, parts=8, every=10)),
        "k5nt.5": k5 | dict(norm_test=dict(theta=0.5)),
        "k5nt.7": k5 | dict(norm_test=dict(theta=0.7)),
        "k5nt.9": k5 | dict(norm_test=dict(theta=0.9)),
        "k5nt.7p8": k5 | dict(norm_test=dict(theta=0.7, parts=8, every=10)),
        # the test smoothed over tests and capped at ×2 a test ("ns"); "f": once the batch is
        # the whole set, cg≤10 on a curvature batch of 1/10 of it instead of cg≤2 on 62 cases
        "k2r2ns.7": k2 | dict(norm_test=smooth(0.7)),
        "k2r2ns.9": k2 | dict(norm_test=smooth(0.9)),
        "k2r2ns.7f": k2 | dict(norm_test=smooth(0.7)) | full,
        "k2r2ns.9f": k2 | dict(norm_test=smooth(0.9)) | full,
        "k2r2nt.9f": k2 | dict(norm_test=dict(theta=0.9)) | full,
        "k2r2ns.5f": k2 | dict(norm_test=smooth(0.5)) | full,
        # "g": "f" with λ floored at 1e-2 once full (λ sits at 1e-8 from the mini-batch phase;
        # the full-batch steps went up, ρ = −∞, while λ climbed ×1.5 a step); the full-batch
        # curvature cases are drawn afresh each step (scorecard: `full_curvature_batch`)
        "k2r2ns.7g": k2 | dict(norm_test=smooth(0.7)) | full_g,
        "k2r2ns.5g": k2 | dict(norm_test=smooth(0.5)) | full_g,
        "k2r2ns.9g": k2 | dict(norm_test=smooth(0.9)) | full_g,
        "k2r2ns.6g": k2 | dict(norm_test=smooth(0.6)) | full_g,
        "k5ns.5f": k5 | dict(norm_test=smooth(0.5)) | full | dict(early_kw=dict(cg_max_iter=5)),
        "k5ns.7f": k5 | dict(norm_test=smooth(0.7)) | full | dict(early_kw=dict(cg_max_iter=5)),
        "k5ns.9f": k5 | dict(norm_test=smooth(0.9)) | full | dict(early_kw=dict(cg_max_iter=5)),
    }


def noise_ratio(task: sc.Task, model: torch.nn.Module, batch: int, draws: int = 6) -> float:
    """Mean ‖g_B − g‖² / ‖g‖² over ``draws`` random batches of ``batch`` cases."""
    params = [p for p in model.parameters() if p.requires_grad]

    def grad(idx: torch.Tensor | None) -> torch.Tensor:
        x, y = (task.x, task.y) if idx is None else (task.x[idx], task.y[idx])
        loss = task.loss(model(x), y)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    g = grad(None)
    gen = torch.Generator().manual_seed(1)
    dev = [
        float((grad(torch.randperm(len(task.x), generator=gen)[:batch]) - g).square().sum())
        for _ in range(draws)
    ]
    return statistics.mean(dev) / float(g.square().sum())


class Probe:
    """Records an HF run's StepInfos with the run's clock after each step."""

    def __init__(self, run: sc.Run, budget: float, slices: int) -> None:
        self.run, self.infos, self.sizes = run, [], []
        self.edges = [budget * (k + 1) / slices for k in range(slices)]
        inner = run.step
        cells = {type(c.cell_contents).__name__: c.cell_contents for c in inner.__closure__}
        opt, batches = cells["HessianFree"], cells["_Batches"]

        def step() -> None:
            t0 = time.perf_counter()
            inner()
            self.infos.append((run.clock + time.perf_counter() - t0, opt.last_step))
            self.sizes.append(batches.size)

        run.step = step


def slice_rows(probe: Probe) -> list[str]:
    rows, start = [], 0.0
    for end in probe.edges:
        part = [i for t, i in probe.infos if start <= t < end]
        sizes = [b for (t, _), b in zip(probe.infos, probe.sizes, strict=True) if t < end]
        start = end
        if not part:
            rows.append("   (no steps)")
            continue

        def med(key: str, part: list = part) -> float:
            return statistics.median(getattr(i, key) for i in part)

        acc = sum(i.accepted for i in part) / len(part)
        drop = statistics.median(i.loss - i.loss_after for i in part)
        rows.append(
            f"   t≤{end:5.1f} steps {len(part):4d} λ {med('next_damping'):8.2e} ρ {med('rho'):6.3f}"
            f" cg {med('cg_iters'):4.1f} rate {med('step_rate'):4.2f} acc {acc:4.2f}"
            f" batch-drop {drop:6.3f} η {med('cg_rtol'):5.2f} batch {sizes[-1] if sizes else 0:.0f}"
        )
    return rows


def main() -> None:
    torch.set_num_threads(1)
    budget = float(sys.argv[1])
    names = sys.argv[2].split(",")
    quick = "--quick" in sys.argv
    slices = int(sys.argv[sys.argv.index("--slices") + 1]) if "--slices" in sys.argv else 8
    task = sc.make_curves_task(quick)
    lr = 3e-3 if quick else 1e-3
    runs = [sc.first_order_run(task, "Adam", lr, 100)]
    v = _curves_regimes.variants() | late_variants()
    probes = []
    for n in names:
        r = sc.hf_run(task, n, "HF", v[n])
        probes.append(Probe(r, budget, slices))
        runs.append(r)
    # noise at each slice's end, off the clock: wrap the task's error (called after each slice)
    noise: dict[str, list[float]] = {r.name: [] for r in runs}
    error = task.error

    def error_and_noise(m: torch.nn.Module) -> float:
        e = error(m)
        r = next(r for r in runs if r.model is m)
        if r.clock > 0 and "--no-noise" not in sys.argv:
            noise[r.name].append(noise_ratio(task, m, 250, draws=4))
        return e

    task.error = error_and_noise
    print("load before", os.getloadavg(), flush=True)
    t0 = time.time()
    sc.interleave(runs, task, budget, slices, "cpu")
    print(f"load after {os.getloadavg()}, wall {time.time() - t0:.0f} s")
    ref = sc.final_error(runs[0])
    for r in runs:
        e = sc.final_error(r)
        curve = " ".join(f"{v:.2f}" for _, v in r.curve[1:])
        print(
            f"{r.name:16s} {e:7.3f} ratio {e / ref:.3f} steps {r.steps:5d} "
            f"{1e3 * r.clock / max(r.steps, 1):6.1f} ms/step | {curve}"
        )
        print("   noise(250)", " ".join(f"{x:.2f}" for x in noise[r.name]))
        p = next((p for p in probes if p.run is r), None)
        if p is not None:
            print("\n".join(slice_rows(p)))


if __name__ == "__main__":
    main()
