"""GGN products with the closed-form loss Hessian against double backward through the loss.

Before this change every GGN product double-backwarded through the loss: ``check_scalar_loss``
returned ``loss.reshape(())``, a view node that hid the loss's own node from
``loss_hessian_product``. Here the same code runs both ways, interleaved, in one process: the
"generic" contender patches ``loss_hessian_product`` to recognise nothing. CPU time
(``time.process_time``), 1 torch thread, medians over repetitions; ratio = closed / generic.

    OPENBLAS_NUM_THREADS=1 python experiments/_ggnclosed.py [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hessfree  # noqa: E402
import hessfree.curvature as curvature  # noqa: E402
from hessfree import GGNProduct, HessianFree  # noqa: E402

PRODUCTS = 10  # products per set-up, as in a CG run


def problems():
    from hessfree.train.data import load_digits, make_curves, make_mnist1d
    from hessfree.train.models import build_model

    out = {}
    d = load_digits()
    torch.manual_seed(0)
    m = build_model("mlp", input_shape=d.input_shape, num_outputs=10, hidden_sizes=[100])
    out["digits MLP, CE, 1797 full batch"] = (m, d.x_train, lambda o: F.cross_entropy(o, d.y_train))
    d1 = make_mnist1d()
    torch.manual_seed(0)
    m = build_model("mlp", input_shape=d1.input_shape, num_outputs=10, hidden_sizes=[256, 256])
    out["MNIST-1D MLP 256-256, CE, 1000 of 4000"] = (
        m,
        d1.x_train[:1000],
        lambda o: F.cross_entropy(o, d1.y_train[:1000]),
    )
    x = make_curves(num_train=250, num_test=1, seed=10).x_train
    torch.manual_seed(0)
    m = build_model(
        "autoencoder", input_shape=(1, 28, 28), layer_sizes=[784, 400, 200, 100, 50, 25, 6]
    )
    flat = x.flatten(1)
    out["CURVES autoencoder, BCE sum/case, 250"] = (
        m,
        x,
        lambda o: F.binary_cross_entropy_with_logits(o, flat, reduction="sum") / o.shape[0],
    )
    torch.manual_seed(0)
    vocab, seq = 64, 32
    lm = nn.Sequential(
        nn.Embedding(vocab, 64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, vocab)
    )
    tok = torch.randint(0, vocab, (64, seq))
    nxt = torch.roll(tok, -1, 1)
    out["token MLP LM, CE on logits.view(-1, V), 64×32"] = (
        lm,
        tok,
        lambda o: F.cross_entropy(o.view(-1, vocab), nxt.view(-1)),
    )
    return out


def time_products(model, x, loss_of, generic: bool) -> tuple[float, float]:
    """(set-up CPU s, CPU s per product)."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = curvature.loss_hessian_product
    if generic:
        curvature.loss_hessian_product = lambda loss, outputs: None
    try:
        t0 = time.process_time()
        out = model(x)
        G = GGNProduct(loss_of(out), out, params)
        t1 = time.process_time()
        v = torch.randn(G.gradient.numel(), generator=torch.Generator().manual_seed(0))
        for _ in range(PRODUCTS):
            v = G(v)
            v = v / v.norm()
        t2 = time.process_time()
    finally:
        curvature.loss_hessian_product = saved
    return t1 - t0, (t2 - t1) / PRODUCTS


def time_steps(model, x, loss_of, generic: bool, steps: int = 3) -> float:
    """CPU s per default HF step with a (loss, outputs) closure, from the same weights."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = HessianFree(model.parameters())

    def closure():
        opt.zero_grad()
        out = model(x)
        loss = loss_of(out)
        return loss, out

    saved = curvature.loss_hessian_product
    if generic:
        curvature.loss_hessian_product = lambda loss, outputs: None
    try:
        t0 = time.process_time()
        for _ in range(steps):
            opt.step(closure)
        t = (time.process_time() - t0) / steps
    finally:
        curvature.loss_hessian_product = saved
        model.load_state_dict(state)
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"hessfree from {hessfree.__file__}; torch {torch.__version__}; load {os.getloadavg()}")
    for name, (model, x, loss_of) in problems().items():
        rows = {c: ([], [], []) for c in ("closed", "generic")}
        for rep in range(args.reps + 2):  # two warm-up rounds
            order = ("closed", "generic") if rep % 2 else ("generic", "closed")
            for c in order:
                s, p = time_products(model, x, loss_of, c == "generic")
                st = time_steps(model, x, loss_of, c == "generic") if rep % 3 == 0 else None
                if rep >= 2:
                    rows[c][0].append(s)
                    rows[c][1].append(p)
                    if st is not None:
                        rows[c][2].append(st)
        med = {c: [statistics.median(r) for r in rows[c]] for c in rows}
        print(
            f"{name:48s} set-up {med['closed'][0] / med['generic'][0]:.3f}×  "
            f"product {med['closed'][1] / med['generic'][1]:.3f}×  "
            f"HF step {med['closed'][2] / med['generic'][2]:.3f}×  "
            f"(generic: set-up {med['generic'][0] * 1e3:.1f} ms, product "
            f"{med['generic'][1] * 1e3:.2f} ms, step {med['generic'][2] * 1e3:.0f} ms CPU)"
        )
    print(f"load at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
