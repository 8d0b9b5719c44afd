"""Why CG limited Gauss-Newton HF on the PINN Poisson problem: solve accuracy with and without
the randomized Nyström preconditioner, at the point where Adam → HF switches.

Trains ``pinn.poisson(24, 32)`` from seed 0 with Adam (lr 1e-2, 1,200 steps, about the 20 % of
the 40 s budget that ``pinn.py`` gives Adam), then prints the spectrum of the dense Gauss-Newton
matrix and, for damping μ in {1e-3, 1e-5, 1e-7}, the CG iterations and the true relative residual
‖(G + μI)x + g‖ / ‖g‖ of plain CG and of CG preconditioned by a rank-60/100 Nyström sketch, each
under Martens' relative-progress stop (HF's default) and run to a tight tolerance.

Usage::

    python experiments/_pinn_diagnosis.py     # about 2 minutes on one CPU core
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for p in (HERE.parent, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pinn  # noqa: E402

from hessfree import GGNProduct, NystromPreconditioner, PrecondContext, cg  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    prob = pinn.poisson(24, 32)
    torch.manual_seed(0)
    net = prob.make_net()
    closure = prob.closure_for(net)
    adam = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(1200):
        adam.zero_grad()
        closure()[0].backward()
        adam.step()
    print(
        f"after Adam: loss {float(closure()[0].detach()):.3e}, error {pinn.rel_l2(net, prob):.3e}"
    )
    params = list(net.parameters())
    loss, blocks = closure()
    G = GGNProduct(loss, blocks, params)
    g = G.gradient
    n = G.shape[0]
    dense = torch.stack([G.matvec(e) for e in torch.eye(n, dtype=g.dtype)])
    ev = torch.linalg.eigvalsh(0.5 * (dense + dense.T)).flip(0)
    print(
        "Gauss-Newton eigenvalues λ_k:",
        ", ".join(f"k={k}: {ev[k - 1]:.1e}" for k in (1, 10, 30, 60, 100, 200, 400)),
    )
    for rank in (60, 100):
        pre = NystromPreconditioner(rank=rank)
        ctx = PrecondContext(
            None,
            None,
            "mean",
            1e-3,
            0.0,
            torch.Generator().manual_seed(0),
            curvature=G.matmat,
            gradient=g,
        )
        t0 = time.perf_counter()
        pre(ctx)
        print(
            f"Nyström rank {rank}: sketch {time.perf_counter() - t0:.1f} s, "
            f"smallest sketched eigenvalue {pre.eigenvalues[-1]:.1e}"
        )
        for mu in (1e-3, 1e-5, 1e-7):

            def A(v: torch.Tensor, mu: float = mu) -> torch.Tensor:
                return G.matvec(v).add_(v, alpha=mu)

            for name, P in (("plain", None), (f"nystrom-{rank}", pre.apply_with(mu))):
                if name == "plain" and rank != 60:
                    continue
                for rule, kw in (
                    ("Martens stop", dict(progress_tol=5e-4, max_iter=400)),
                    ("rtol 1e-8", dict(progress_tol=None, rtol=1e-8, max_iter=300)),
                ):
                    r = cg(A, -g, precond=P, **kw)
                    res = float((A(r.x) + g).norm() / g.norm())
                    print(
                        f"  μ={mu:.0e} {name:12s} {rule:12s} iterations {r.num_iter:4d} "
                        f"({r.reason.value}), relative residual {res:.1e}"
                    )


if __name__ == "__main__":
    main()
