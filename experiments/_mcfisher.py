"""mcfisher: the cost of one Monte-Carlo Fisher product against a GGN product and a gradient.

Contenders (same model, same weights, same batch; each product object built once, then its
``matvec`` timed; interleaved in one process, contenders rotated every round):

* ``grad``: one forward + backward of the loss (the unit);
* ``ggn``: ``GGNProduct.matvec`` as the library builds it;
* ``ggn_closed``: the same product with its loss Hessian swapped for
  ``loss_hessian_product(loss, outputs)`` on the loss as returned (the closed form, see the
  note in the README section: ``GGNProduct`` does not reach it);
* ``mcf1``, ``mcf8``: ``MCFisherProduct(mc_samples=1 / 8).matvec``;
* ``efisher``: ``FisherProduct.matvec`` (empirical Fisher);
* ``*.setup``: building the product (forward + set-up backward passes; MC: + the draw).

Reports CPU time (``time.process_time``) and wall time per call, medians over rounds, ratios to
``grad`` taken per round; load average at the start and end of each problem.

    OPENBLAS_NUM_THREADS=1 python experiments/_mcfisher.py [--rounds 15] [--calls 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hessfree import FisherProduct, GGNProduct, MCFisherProduct, loss_hessian_product

PROBLEMS = {  # name: (inputs, hidden, classes, batch)
    "mlp10": (100, 128, 10, 256),
    "mlp100": (100, 128, 100, 256),
    "mlp1000": (100, 128, 1000, 256),
}


def _problem(name: str):
    d, h, c, n = PROBLEMS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, c))
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    return model, x, y


def _contenders(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable]:
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))

    def build(kind: str):
        out = model(x)
        loss = F.cross_entropy(out, y)
        if kind == "ggn":
            return GGNProduct(loss, out, params)
        if kind == "ggn_closed":
            P = GGNProduct(loss, out, params)
            P._hl = loss_hessian_product(loss, out)  # the closed form, on the loss as returned
            assert P._hl is not None
            return P
        if kind == "efisher":
            return FisherProduct(loss, out, params)
        m = int(kind[3:])
        return MCFisherProduct(
            loss, out, params, mc_samples=m, generator=torch.Generator().manual_seed(2)
        )

    def grad():
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)

    calls: dict[str, Callable] = {"grad": grad}
    for kind in ("ggn", "ggn_closed", "mcf1", "mcf8", "efisher"):
        P = build(kind)
        calls[kind] = lambda P=P: P.matvec(v)
        calls[kind + ".setup"] = lambda kind=kind: build(kind)
    return calls


def _measure(calls: dict[str, Callable], rounds: int, k: int) -> dict[str, dict[str, list]]:
    names = list(calls)
    for f in calls.values():  # warm-up
        for _ in range(3):
            f()
    res = {name: {"cpu": [], "wall": []} for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            f = calls[name]
            reps = k if not name.endswith(".setup") else max(1, k // 4)
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(reps):
                f()
            res[name]["cpu"].append((time.process_time() - c0) / reps)
            res[name]["wall"].append((time.perf_counter() - w0) / reps)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, threads 1, OPENBLAS={os.environ.get('OPENBLAS_NUM_THREADS')}"
    )
    for name in args.problems.split(","):
        model, x, y = _problem(name)
        calls = _contenders(model, x, y)
        load0 = os.getloadavg()
        res = _measure(calls, args.rounds, args.calls)
        load1 = os.getloadavg()
        d, h, c, n = PROBLEMS[name]
        print(f"\n### {name}: {d}-{h}-{h}-{c} tanh MLP, batch {n}, cross-entropy")
        print(f"load average start {load0[0]:.2f}, end {load1[0]:.2f}; {args.rounds} rounds")
        print("| contender | CPU ms (median) | wall ms | CPU / grad (median) | wall / grad |")
        print("|---|---|---|---|---|")
        g = res["grad"]
        for key, r in res.items():
            cpu_ratio = statistics.median(a / b for a, b in zip(r["cpu"], g["cpu"], strict=True))
            wall_ratio = statistics.median(a / b for a, b in zip(r["wall"], g["wall"], strict=True))
            print(
                f"| {key} | {1e3 * statistics.median(r['cpu']):.3f} | "
                f"{1e3 * statistics.median(r['wall']):.3f} | {cpu_ratio:.3f} | {wall_ratio:.3f} |"
            )


if __name__ == "__main__":
    main()
