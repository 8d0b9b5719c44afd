"""Per-step trace of HF on the swap task around float32's floor (#14, freeze).

Deterministic: the scorecard's swap data and model (seed 0), HessianFree(params) or λ0 = 1,
an unchanged ``torch.optim.LBFGS`` closure. Prints, per step from ``--from``, the status, the
closure calls, λ, ρ, the actual change f(θ+p) − f0 of the backtracked step and its predicted
change (undamped model), in units of ulp(f0) in float32, and whether θ0 + p == θ0 bitwise.

    python experiments/_freeze_trace.py [--steps N] [--from K] [--tuned]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard  # noqa: E402

import hessfree.damping as D  # noqa: E402
from hessfree import HessianFree  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--from", dest="start", type=int, default=600)
    ap.add_argument("--tuned", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = scorecard.make_swap_task(quick=False)
    x, y, m = task.x, task.y, task.model
    kw = dict(damping=1.0, cg_decay=0.95) if args.tuned else {}
    opt = HessianFree(m.parameters(), **kw)
    seen = {}
    original = D.reduction_ratio

    def spy(actual: float, predicted: float) -> float:
        seen["actual"], seen["predicted"] = actual, predicted
        return original(actual, predicted)

    D.reduction_ratio = spy

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        loss.backward()
        return loss

    total_calls = {}
    for k in range(args.steps):
        seen.clear()
        opt.step(closure)
        s = opt.last_step
        total_calls[str(s.status)] = total_calls.get(str(s.status), 0) + s.closure_calls
        if k >= args.start:
            ulp = float(np.spacing(np.float32(s.loss)))
            a, p = seen.get("actual", float("nan")), seen.get("predicted", float("nan"))
            print(
                f"{k:4d} {s.status!s:18} calls {s.closure_calls:2d} lam {s.damping:.2e}"
                f"->{s.next_damping:.2e} rho {s.rho: .3g} f0 {s.loss:.6e} "
                f"act {a / ulp: .3g}ulp pred {p / ulp: .3g}ulp cg {s.cg_iters} {s.cg_reason} "
                f"bt {s.backtrack_iter} rate {s.step_rate:.3g} g {s.grad_norm:.2e}"
            )
    h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters()))
    print("closure calls by status", total_calls, "params sha256", h.hexdigest()[:16])


if __name__ == "__main__":
    main()
