r"""Is CURVES' best λ floor the gradient noise's? (#14, stop 51; off the clock)

Per direction of a quadratic model with curvature :math:`c`, gradient :math:`g` and batch
noise variance :math:`\sigma^2`, the damped step :math:`-g_b/(c+\lambda)` gains most on the
true objective at :math:`\lambda^* = c\,\sigma^2/g^2`. So a floor that keeps CG from fitting
a batch's noise should scale as the noise ratio :math:`r_b = E\|g_b - g\|^2/\|g\|^2`, which a
fixed fraction × b₀ / b (the 'auto' rule) assumes constant × 1 / b.

This script runs ``HessianFree(params)`` on the scorecard's CURVES task by steps (not time),
in the rows of stop 50's races (``_growth18.grown``: ``def@G/C`` = growth G a step, relative
floor C / batch), and every ``--every`` steps records, off the run: the batch b, the curvature
scale the floor multiplies (``state['damping_scale']``), λ, the noise ratio at b from the
whole training set (:math:`\mathrm{tr}\,\Sigma / (b\|g\|^2)`, :math:`\Sigma` the per-case
gradient covariance from ``--draws`` random 250-case batches), and the one-batch estimate
:math:`\hat r_b` a step could compute itself (random balanced signs over the batch's cases:
:math:`\|J^\top(s \odot \partial\ell/\partial o)\|^2` is unbiased for
:math:`\mathrm{tr}\,\Sigma / b`).

    OPENBLAS_NUM_THREADS=1 python experiments/_noisefloor51.py STEPS def@1.0/2.5,... [--every K]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _growth18  # noqa: E402
import scorecard as sc  # noqa: E402


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def whole_set_noise(task: sc.Task, m: torch.nn.Module, draws: int) -> tuple[float, float]:
    """tr Σ (per case) and ‖g‖² of the whole training set, at m's parameters."""
    params = [p for p in m.parameters() if p.requires_grad]
    g = flat_grad(task.loss(m(task.x), task.y), params)
    gen = torch.Generator().manual_seed(1)
    n, b = len(task.x), 250
    dev = 0.0
    for _ in range(draws):
        idx = torch.randperm(n, generator=gen)[:b]
        dev += float((flat_grad(task.loss(m(task.x[idx]), task.y[idx]), params) - g).square().sum())
    # E‖g_b − g‖² = tr Σ / b × (n − b) / (n − 1) without replacement
    trace = dev / draws * b * (n - 1) / (n - b)
    return trace, float(g.square().sum())


def one_batch_estimate(
    task: sc.Task, m: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator
) -> tuple[float, float]:
    """(‖J^T(s ⊙ ∂ℓ/∂o)‖², ‖g_b‖²) on the batch: the first unbiased for tr Σ / b."""
    params = [p for p in m.parameters() if p.requires_grad]
    out = m(xb)
    loss = task.loss(out, yb)
    (go,) = torch.autograd.grad(loss, out, retain_graph=True)
    s = torch.ones(len(xb))
    s[torch.randperm(len(xb), generator=gen)[: len(xb) // 2]] = -1.0
    s = s.view(-1, *([1] * (go.dim() - 1)))
    signed = torch.autograd.grad(out, params, s * go, retain_graph=True)
    u = torch.cat([t.flatten() for t in signed])
    g = flat_grad(loss, params)
    return float(u.square().sum()), float(g.square().sum())


def _flag(name: str, default: int) -> int:
    """``--name N`` from the command line, else ``default``."""
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def _runs(task: sc.Task, names: list[str]):
    """Per row name (``_growth18.grown``): the name, its scorecard run, optimizer and batches."""
    for name in names:
        run = sc.hf_run(task, name, "HF", _growth18.grown(name))
        cells = {type(c.cell_contents).__name__: c.cell_contents for c in run.step.__closure__}
        print(f"# {name}", flush=True)
        yield name, run, cells["HessianFree"], cells["_Batches"]


def main() -> None:
    torch.set_num_threads(1)
    steps = int(sys.argv[1])
    names = sys.argv[2].split(",")
    every, draws = _flag("--every", 50), _flag("--draws", 8)
    task = sc.make_curves_task(False)
    for _name, run, opt, batches in _runs(task, names):
        gen = torch.Generator().manual_seed(3)
        print(
            " step  batch  error   scale     λ      floor  trΣ/b‖g‖²  r̂_b(1 batch)  λ/(scale·r_b)"
        )
        for k in range(1, steps + 1):
            run.step()
            if k % every:
                continue
            st = opt.state[opt._params()[0]]
            b = int(batches.size)
            trace, g2 = whole_set_noise(task, run.model, draws)
            idx = torch.randperm(len(task.x), generator=gen)[:b]
            u2, gb2 = one_batch_estimate(task, run.model, task.x[idx], task.y[idx], gen)
            r = trace / b / g2
            r_hat = u2 / max(gb2 - u2, 1e-12 * gb2)
            scale = st.get("damping_scale", float("nan"))
            lam = st.get("damping", float("nan"))
            floor = opt._relative_floor(st)
            err = task.error(run.model)
            print(
                f"{k:5d} {b:6d} {err:6.2f} {scale:8.3g} {lam:8.3g} {floor:8.3g} {r:9.3g}"
                f"  {r_hat:11.3g}  {lam / (scale * r):10.3g}",
                flush=True,
            )


def transfer_main() -> None:
    """``transfer STEPS names``: per window of ``--every`` steps, the mean drop of each step's
    own batch loss (f_k(θ_k) − f_k(θ_k+1)) and the mean gap the next, fresh batch shows at the
    same weights (f_k+1(θ_k+1) − f_k(θ_k+1)): their difference is what transferred. Read from
    StepInfo alone (no extra pass)."""
    torch.set_num_threads(1)
    steps = int(sys.argv[2])
    names = sys.argv[3].split(",")
    every = _flag("--every", 50)
    task = sc.make_curves_task(False)
    for _name, run, opt, batches in _runs(task, names):
        print(" step  batch  error     λ      own-drop   gap     transfer  ρ-med  rejected")
        infos = []
        for k in range(1, steps + 1):
            run.step()
            infos.append(opt.last_step)
            if k % every:
                continue
            w = infos[-every - 1 :]
            own = [i.loss - i.loss_after for i in w[:-1]]
            gap = [b.loss - a.loss_after for a, b in zip(w[:-1], w[1:], strict=True)]
            mo, mg = sum(own) / len(own), sum(gap) / len(gap)
            rho = sorted(i.rho for i in w)[len(w) // 2]
            rej = sum(not i.accepted for i in w)
            st = opt.state[opt._params()[0]]
            print(
                f"{k:5d} {int(batches.size):6d} {task.error(run.model):6.2f} "
                f"{st.get('damping', 0):8.3g} {mo:9.4f} {mg:9.4f} {(mo - mg) / mo:8.3f}"
                f" {rho:6.3f} {rej:4d}",
                flush=True,
            )


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "transfer":
    transfer_main()
    sys.exit()


if __name__ == "__main__":
    main()
