"""Per-step trace of one rule of ``_kfacfloor.py`` (``experiments/README.md``, "kfacfloor"):
full-set loss or error, parameter norm, λ, the floor's scale, ρ, and over the last 8 steps the
mean own-batch reduction, the mean fresh-minus-fitted gap and the mean fresh-batch change.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_kfacfloor_trace.py cnn|mlp|bn|curves \
        RULE STEPS
"""

from __future__ import annotations

import math
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import _kfacfloor as K  # noqa: E402

import hessfree  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    which, name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if which in ("cnn", "mlp", "bn"):
        import _cnnmb
        import _unseen

        x, y, _, _ = _unseen.digits()
        torch.manual_seed(0)
        bn = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2),
                           nn.Linear(64, 10)) if which == "bn" else None  # fmt: skip
        model = bn or (_unseen.cnn if which == "cnn" else _cnnmb.mlp)()
        opt = hessfree.HessianFree(model.parameters())
        gen = torch.Generator().manual_seed(1)

        def step() -> None:
            idx = torch.randint(len(y), (100,), generator=gen)
            xb, yb = x[idx], y[idx]

            def closure():
                out = model(xb)
                return nn.functional.cross_entropy(out, yb), out

            opt.step(closure)

        def full() -> float:
            with torch.no_grad():
                return nn.functional.cross_entropy(model(x), y).item()

    else:
        import scorecard as sc

        task = sc.make_curves_task(quick=False)
        r, opt = K._seeded_run(sc, task, name, dict(batch=250, curvature_batch=62, kw={}), 0)
        model, step = r.model, r.step

        def full() -> float:
            return task.error(model)

    infos = []
    for k in range(steps):
        with K.rule(name):
            step()
        i = opt.last_step
        infos.append(i)
        if not (k < 12 or k % 4 == 3) or (k > 40 and k % 40 != 39):
            continue
        w = infos[-9:]
        n = len(w) - 1
        if n < 2:
            continue
        gap = [w[j + 1].loss - w[j].loss_after for j in range(n)]
        own = [w[j].loss - w[j].loss_after for j in range(n)]
        fresh = [w[j + 1].loss - w[j].loss for j in range(n)]
        norm = math.sqrt(sum(p.detach().square().sum().item() for p in model.parameters()))
        scale = opt._global_state().get("damping_scale", 0.0)
        print(f"{k} full {full():.4g} |w| {norm:.3g} lam {i.damping:.3g} scale {scale:.4g} "
              f"rho {i.rho:.2f} own {statistics.fmean(own):.3g} gap {statistics.fmean(gap):.3g} "
              f"fresh {statistics.fmean(fresh):.3g} loss {i.loss:.4g}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
