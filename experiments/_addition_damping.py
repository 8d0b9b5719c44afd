"""Initial damping and its decrease on RNN addition with ``HessianFree(params)`` (#14).

The defaults' λ₀ (``damping='auto'``, :math:`R = g^\\top C g / g^\\top g`) is 66-117 on the
scorecard's addition task where the tuned config's 0.1 solves it 2-3× sooner. Contenders (all on
the scorecard's task and regime: 1,000/100-case batches, hidden states returned, so
``structural_damping='auto'`` is μ = 0.03), started from the same weights, interleaved:

- ``T``: ``configs/rnn_addition.yaml``'s HF (λ₀ = 0.1, Martens' rule, CG ≤ 25, no check);
- ``D``: the defaults of the code under test (``HessianFree(params)``); since 2026-12-01 their
  λ₀ is :math:`R/(1 + s)` = :math:`g^\\top C g / g^\\top D g`,
  :math:`s = \\mu\\|J_h g\\|^2/(N g^\\top g)`: the first step damped to about half along g
  counting the structural term λμ J_hᵀJ_h/N too;
- ``R``: the defaults with the old λ₀ = :math:`R` (structural damping left out of the
  calibration: what ``damping='auto'`` did before 2026-12-01);
- ``A``: the defaults with Nielsen's decrease factor raised to the power k, k = the number of
  consecutive steps with ρ > 3/4 (the decrease speeds up while the model keeps predicting well,
  as Nielsen's ν speeds up the increase);
- ``L``: the defaults with λ₀ = 0.1 (the config's number, a reference, not a rule).

Usage::

    python experiments/_addition_damping.py run 30 45 0 T,D,R,A   # length, seconds, seed
    python experiments/_addition_damping.py calib                 # R, s, λ₀ at the initial weights

Each run appends its lines to ``results/2026-12-01-addition-defaults-damping.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _addition_ablation import Recorded  # noqa: E402
from _bench_common import save_text  # noqa: E402

from hessfree import HessianFree  # noqa: E402
from hessfree.curvature import StructurallyDampedGGN  # noqa: E402
from hessfree.damping import DampingPolicy, calibrate_damping  # noqa: E402

REPORT = Path(__file__).resolve().parent / "results" / "2026-12-01-addition-defaults-damping.md"


class OldAuto(Recorded):
    """λ₀ = gᵀCg/gᵀg without the structural term (the calibration before this study)."""

    def _calibrate_damping(self, curvature, product, g, g_norm, run):
        with torch.enable_grad():
            gCg = float(g @ curvature(g))
        lam = calibrate_damping(gCg, g_norm**2, min_damping=1e-8, max_damping=1e10)
        run.damping = run.state["damping"] = lam
        product.weight = lam * run.structural_damping / product.hidden.shape[0]


@dataclasses.dataclass(frozen=True)
class _Accelerated(DampingPolicy):
    streak: int = 0

    def after_step(self, damping: float, rho: float) -> float:
        lam = super().after_step(damping, rho)
        return self.clip(damping * (lam / damping) ** max(1, self.streak)) if damping else lam


class Accelerated(Recorded):
    """Nielsen's decrease raised to the k-th power, k = consecutive steps with ρ > 3/4."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._streak = 0

    def step(self, *args, **kwargs):
        policy = type(self.settings).damping_policy

        def patched(settings):
            base = policy(settings)
            return _Accelerated(**dataclasses.asdict(base), streak=self._streak + 1)

        type(self.settings).damping_policy = patched
        try:
            out = super().step(*args, **kwargs)
        finally:
            type(self.settings).damping_policy = policy
        rho = self.last_step.rho
        self._streak = self._streak + 1 if rho > 0.75 else 0
        return out


CLASSES = {"R": OldAuto, "A": Accelerated}
KW = {"T": dict(sc.ADDITION_TUNED), "L": {"damping": 0.1}}


def _task(length: int, budget: float, seed: int) -> sc.Task:
    task = sc.make_addition_task(length, budget)
    if seed:
        from hessfree.train.models import build_model

        torch.manual_seed(seed)
        model = build_model(
            "rnn", input_shape=(length, 2), num_outputs=1, hidden_size=100, spectral_radius=1.0
        )
        task = dataclasses.replace(task, model=model)
    return task


def calib() -> str:
    """R = gᵀCg/gᵀg, s = μ‖J_h g‖²/(N gᵀg) and R/(1+s) at the initial weights."""
    lines = ["| T | seed | R = gᵀCg/gᵀg | s | R/(1+s) |", "|---|---|---|---|---|"]
    for length in (30, 50):
        for seed in range(4):
            task = _task(length, 1.0, seed)
            m = task.model
            params = list(m.parameters())
            xb, yb = task.x[:1000], task.y[:1000]
            g = torch.cat(
                [t.reshape(-1) for t in torch.autograd.grad(task.loss(m(xb), yb), params)]
            )
            out, h = m.forward_with_hidden(xb[:100])
            product = StructurallyDampedGGN(task.loss(out, yb[:100]), out, h, params, weight=0.0)
            gg = float(g @ g)
            r = float(g @ product(g)) / gg
            s = 0.03 * float(product.hidden_energy(g[None])[0]) / h.shape[0] / gg
            lines.append(f"| {length} | {seed} | {r:.3g} | {s:.3g} | {r / (1 + s):.3g} |")
    return "\n".join(lines)


def run(length: int, budget: float, seed: int, names: list[str]) -> str:
    task = _task(length, budget, seed)
    regime = task.hf_default_regime
    runs = []
    for name in names:
        sc.HessianFree = CLASSES.get(name, Recorded)
        runs.append(sc.hf_run(task, name, "HF", regime | {"kw": KW.get(name, {})}))
    sc.HessianFree = HessianFree
    load0 = os.getloadavg()
    sc.interleave(runs, task, budget, int(os.environ.get("SLICES", 18)), "cpu")
    out = [
        f"\n### T = {length}, seed {seed}, {budget:g} s each, load {load0[0]:.2f} → "
        f"{os.getloadavg()[0]:.2f}\n",
        "| contender | final error | steps | ≤ 0.5 at | ≤ 0.01 at | ratio to T "
        "| λ at steps 0,1,2,5,10,20,40 | ρ median steps 0-20 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = {}
    for r in runs:
        left = [t for t, e in r.curve if e <= 0.5]
        solved = [t for t, e in r.curve if e <= 0.01]
        first[r.name] = solved[0] if solved else math.inf
        log = next(
            c.cell_contents.log for c in r.step.__closure__ if hasattr(c.cell_contents, "log")
        )
        lam = [s.damping for s in log]
        pick = [lam[i] for i in (0, 1, 2, 5, 10, 20, 40) if i < len(lam)]
        rho = np.array([s.rho for s in log[:20]], dtype=float)
        out.append(
            f"| {r.name} | {sc.final_error(r):.4g} | {r.steps} | "
            f"{left[0] if left else math.inf:.1f} | {first[r.name]:.1f} | "
            f"{first[r.name] / first.get('T', math.nan):.2f} | "
            f"{' '.join(f'{x:.2g}' for x in pick)} | {np.nanmedian(rho):.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1] == "calib":
        text = calib()
    else:
        length, budget, seed = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
        text = run(length, budget, seed, sys.argv[5].split(","))
    print(text, flush=True)
    old = (
        REPORT.read_text()
        if REPORT.exists()
        else "# Addition defaults: initial damping (2026-12-01)\n"
    )
    save_text(REPORT, old + "\n" + text + "\n")


if __name__ == "__main__":
    main()
