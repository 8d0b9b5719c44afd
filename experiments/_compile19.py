"""compile19: HessianFree's global hooks under ``torch.compile``, and the graph walk's cost
(experiments/README.md, "compile19").

Usage: ``PYTHONPATH=. python3 experiments/_compile19.py [hooks|walk|late]``; one thread.

- ``hooks``: 12 steps of a 4-5-3 tanh MLP (float64, 32 examples, cross-entropy) through
  ``torch.compile(model, backend="eager")`` against the uncompiled model: a parameter hash of
  each, torch's warnings by text, dynamo's frame count and whether it hit its recompile limit.
- ``walk``: the once-differentiable / compiled-region walk's time against a step's, and the
  node-type signature's, on the MLP, a CURVES-shaped autoencoder (batch 500) and an LSTM.
- ``late``: a loss compiled (``aot_eager``) after the first step, 3 steps against the
  uncompiled loss's: "ok" per step, or the error and whether the parameters moved.
"""

from __future__ import annotations

import hashlib
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from hessfree import HessianFree
from hessfree.curvature import _once_differentiable

torch.set_num_threads(1)


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (32,), generator=g)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def hooks(steps: int = 12) -> None:
    X, y = _data()
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = _mlp()
        net = torch.compile(model, backend="eager") if compiled else model
        opt = HessianFree(model.parameters())

        def closure(net=net):
            outputs = net(X)
            return F.cross_entropy(outputs, y), outputs

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                opt.step(closure)
        digest = hashlib.sha256(
            b"".join(p.detach().numpy().tobytes() for p in model.parameters())
        ).hexdigest()[:10]
        texts: dict[str, int] = {}
        for w in caught:
            key = str(w.message)[:60]
            texts[key] = texts.get(key, 0) + 1
        counters = torch._dynamo.utils.counters
        limit = any("recompile limit" in k for k in counters["unimplemented"])
        print(
            f"{'compiled' if compiled else 'plain   '} sha256 {digest} warnings {texts} "
            f"frames {counters['frames']['total']} recompile limit hit {limit}"
        )


def _bench(name, model, X, y, loss_fn, steps):
    opt = HessianFree(model.parameters())

    def closure():
        outputs = model(X)
        return loss_fn(outputs, y), outputs

    opt.step(closure)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(closure)
    step = (time.perf_counter() - t0) / steps
    outputs = model(X)
    loss = loss_fn(outputs, y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    walk = sig = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        _once_differentiable([outputs, loss, *grads])
        walk = min(walk, time.perf_counter() - t0)
        t0 = time.perf_counter()
        (type(loss.grad_fn).__name__, type(outputs.grad_fn).__name__)
        sig = min(sig, time.perf_counter() - t0)
    print(
        f"{name}: step {step * 1e3:.1f} ms, walk {walk * 1e3:.3f} ms "
        f"({100 * walk / step:.2f} % of the step), top node types {sig * 1e6:.2f} us"
    )


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def walk() -> None:
    warnings.simplefilter("ignore")
    X, y = _data()
    _bench("4-5-3 MLP, 32", _mlp(), X, y, F.cross_entropy, 4)
    torch.manual_seed(0)
    sizes = [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i not in (5, len(sizes) - 2):
            layers.append(nn.Sigmoid())
    X = torch.randn(500, 784)
    _bench("CURVES-shaped autoencoder, 500", nn.Sequential(*layers), X, X, F.mse_loss, 2)
    X, y = torch.randn(64, 50, 8), torch.randint(0, 4, (64,))
    _bench("LSTM(8, 32) over 50 steps, 64", _LSTM(), X, y, F.cross_entropy, 2)


def late() -> None:
    warnings.simplefilter("ignore")
    X, y = _data()
    for style, curvature, factor in [("loss", "hessian", 1.0), ("loss", "hessian", 0.5),
                                     ("outputs", "auto", 1.0)]:  # fmt: skip
        final = []
        for compile_late in (False, True):
            torch._dynamo.reset()
            model = _mlp()
            opt = HessianFree(model.parameters(), curvature=curvature)
            loss_fn = [F.cross_entropy]

            def closure(model=model, loss_fn=loss_fn, style=style, factor=factor):
                outputs = model(X)
                loss = factor * loss_fn[0](outputs, y)
                return (loss, outputs) if style == "outputs" else loss

            out = []
            for k in range(3):
                if k == 1 and compile_late:
                    loss_fn[0] = torch.compile(F.cross_entropy, backend="aot_eager")
                before = [p.detach().clone() for p in model.parameters()]
                try:
                    opt.step(closure)
                    out.append("ok")
                except (NotImplementedError, ValueError) as err:
                    moved = not all(
                        torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)
                    )
                    out.append(f"{type(err).__name__} ({'moved' if moved else 'unchanged'})")
                    break
            final.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
            print(f"{style:8s} {curvature:8s} x{factor} compiled late={compile_late}: {out}")
        gap = float((final[0] - final[1]).abs().max())
        print(f"  max |difference| of the final parameters {gap:.3g}")


if __name__ == "__main__":
    {"hooks": hooks, "walk": walk, "late": late}[sys.argv[1] if len(sys.argv) > 1 else "hooks"]()
