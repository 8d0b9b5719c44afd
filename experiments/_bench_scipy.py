"""Section 4 of the benchmark: SciPy's ``cg`` on a GGN LinearOperator against ``hessfree.cg``.

At the CURVES autoencoder (842,340 parameters, batch 2000), a fixed number of CG iterations
on the damped GGN, three ways, interleaved:

* ``hessfree.cg`` on the torch product (torch tensors throughout);
* ``scipy.sparse.linalg.cg`` on the LinearOperator, numpy's BLAS pinned to one thread
  (``threadpoolctl``);
* the same with numpy's BLAS left at one thread per CPU: its threads then compete with
  torch's inside every iteration (the trap HF-NOTES describes).

The LinearOperator is ``hessfree.operators``' GGN operator when that module exists, else a
minimal float32 wrapper written here (``torch.from_numpy`` in, ``.numpy()`` out, no copies).
Torch uses every CPU in this section (reported), since that is where the trap shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from _bench_common import Settings, fmt_ms, fmt_q, interleave, make_problem, md_table, quartiles
from _bench_steps import AE_DAMPING

import hessfree
from hessfree import GGNProduct


def _operator(prob, G: GGNProduct, lam: float):
    """The damped GGN as a scipy LinearOperator, and where it came from."""
    from scipy.sparse.linalg import LinearOperator

    n = G.layout.numel
    try:
        import hessfree.operators as ops

        cls = getattr(ops, "GGNLinearOperator", None) or getattr(ops, "GGNOperator", None)
        if cls is not None:
            for build in (
                lambda: cls(prob.model, prob.loss, [(prob.x, prob.y)]),
                lambda: cls(prob.model, prob.loss, (prob.x, prob.y)),
                lambda: cls(prob.model, prob.loss, prob.x, prob.y),
            ):
                try:
                    op = build()
                    op.matvec(np.zeros(n, dtype=np.float32))
                    if hasattr(op, "damped"):
                        return op.damped(lam), f"hessfree.operators.{cls.__name__}(...).damped(λ)"
                    ident = LinearOperator((n, n), matvec=lambda v: v, dtype=np.float32)
                    return op + lam * ident, f"hessfree.operators.{cls.__name__} + λI"
                except Exception:  # noqa: BLE001 - API of a concurrently written module
                    continue
    except ImportError:
        pass

    def mv(v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(-1))
        return G.matvec(t).add_(t, alpha=lam).numpy()

    return (
        LinearOperator((n, n), matvec=mv, dtype=np.float32),
        "bench wrapper around GGNProduct (hessfree.operators not available)",
    )


def run(settings: Settings, log: Callable[[str], None]) -> dict:
    from scipy.sparse.linalg import cg as scipy_cg
    from threadpoolctl import threadpool_limits

    if settings.device != "cpu":
        return dict(
            error="CPU-only comparison (numpy's BLAS threads); skipped on " + settings.device
        )
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(ncpu)
    try:
        prob = make_problem("autoencoder", "cpu", settings.seed)
        out = prob.model(prob.x)
        G = GGNProduct(prob.loss(out, prob.y), out, prob.params)
        b_t = -G.gradient
        b_np = b_t.numpy().copy()
        A, origin = _operator(prob, G, AE_DAMPING)
        k = settings.scipy_iters
        log(f"[scipy] {k} CG iterations, torch threads {ncpu}, operator: {origin}")

        def torch_cg():
            return hessfree.cg(G.damped(AE_DAMPING), b_t, max_iter=k, rtol=0.0, progress_tol=None)

        def sp_cg(blas_threads):
            def solve():
                with threadpool_limits(limits=blas_threads, user_api="blas"):
                    return scipy_cg(A, b_np, rtol=1e-30, atol=0.0, maxiter=k)

            return solve

        def grad():
            return torch.autograd.grad(prob.loss(prob.model(prob.x), prob.y), prob.params)

        fns = {
            "hessfree.cg": torch_cg,
            "scipy cg, BLAS pinned to 1": sp_cg(1),
            f"scipy cg, BLAS {ncpu} threads (unpinned)": sp_cg(ncpu),
            "grad": grad,
        }
        t = interleave(
            fns, rounds=settings.scipy_rounds, device="cpu", seed=settings.seed, warmup=1
        )
    finally:
        torch.set_num_threads(old_threads)
    return dict(timings=t, k=k, origin=origin, threads=ncpu)


def report(r: dict) -> str:
    parts = ["## 4. SciPy `cg` on the GGN operator vs `hessfree.cg`\n"]
    if "error" in r:
        return parts[0] + f"\n{r['error']}\n"
    t, k = r["timings"], r["k"]
    parts.append(
        f"CURVES autoencoder, 842,340 parameters, batch 2000, damped GGN (λ = {AE_DAMPING:g}), "
        f"{k} iterations per solve, {t.rounds} interleaved rounds, **torch threads = "
        f"{r['threads']}** "
        f"in this section. Operator: {r['origin']}.\n"
    )
    rows = []
    for name in t.samples:
        if name == "grad":
            continue
        rows.append(
            [
                name,
                fmt_ms(quartiles(t.arr(name) / k)),
                fmt_q(quartiles(t.arr(name) / k / t.arr("grad"))),
                fmt_q(quartiles(t.arr(name) / t.arr("hessfree.cg"))),
            ]
        )
    parts.append(
        md_table(["solver", "ms per iteration", "iteration / gradient", "time / hessfree.cg"], rows)
    )
    for name, err in t.errors.items():
        parts.append(f"\n- `{name}` failed: {err}")
    return "\n".join(parts) + "\n"
