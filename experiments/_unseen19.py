"""unseen19: torch.compile under HessianFree's products and the operators
(experiments/README.md, "unseen19").

Usage: ``PYTHONPATH=. python3 experiments/_unseen19.py [ops|steps|inductor]``; one thread.
Oracles: the dense float64 Hessian and Gauss-Newton matrix of the uncompiled model from
``torch.autograd.functional`` (``ops``), the same steps on the uncompiled model (``steps``).
``inductor`` times the default backend's first step (a C++ compile, ~15 s here).
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import hessfree

torch.set_num_threads(1)
warnings.simplefilter("ignore")
# dynamo's recompile notes (HessianFree's hooks are new closures each step) are not results
torch._logging.set_logs(dynamo=40)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (32,), generator=g
    )


def _mlp(compiled_tanh: str | None = None) -> nn.Sequential:
    torch.manual_seed(1)
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3)).double()
    if compiled_tanh is not None:
        model[1] = torch.compile(act, backend=compiled_tanh)
    return model


def _dense(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """H and G = Jᵀ H_ℓ J of the mean cross-entropy, float64, by torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = t[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def outputs(t: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflat(t), (X,)).reshape(-1)

    H = hessian(lambda t: F.cross_entropy(outputs(t).reshape(-1, 3), y), theta)
    J = jacobian(outputs, theta)
    o = outputs(theta).detach()
    Hl = hessian(lambda z: F.cross_entropy(z.reshape(-1, 3), y), o)
    return H.numpy(), (J.T @ Hl @ J).numpy()


def _ops() -> None:
    X, y = _data()
    H, G = _dense(_mlp(), X, y)
    n = H.shape[0]
    cases = {
        "loss compiled (aot_eager)": (None, "aot_eager", None),
        "loss compiled (eager)": (None, "eager", None),
        "tanh module compiled (aot_eager)": ("aot_eager", None, None),
        "tanh module compiled (eager)": ("eager", None, None),
        "model compiled (aot_eager)": (None, None, "aot_eager"),
        "model compiled (eager)": (None, None, "eager"),
    }
    print("| case | Hessian op rel. err | GGN op rel. err | Fisher op |")
    print("|---|---|---|---|")
    for name, (tanh, loss_backend, model_backend) in cases.items():
        model = _mlp(tanh)
        net = torch.compile(model, backend=model_backend) if model_backend else model
        loss_fn = torch.compile(F.cross_entropy, backend=loss_backend) if loss_backend else None
        loss_fn = loss_fn or F.cross_entropy
        row = []
        for Op, dense in (
            (hessfree.HessianLinearOperator, H),
            (hessfree.GGNLinearOperator, G),
            (hessfree.FisherLinearOperator, None),
        ):
            try:
                A = Op(net, loss_fn, (X, y), params=list(model.parameters())) @ np.eye(n)
                if dense is None:
                    ref = hessfree.FisherLinearOperator(_mlp(), F.cross_entropy, (X, y))
                    dense = ref @ np.eye(n)
                row.append(f"{np.abs(A - dense).max() / np.abs(dense).max():.1e}")
            except Exception as err:  # noqa: BLE001 -- the table reports it
                row.append(f"{type(err).__name__}: {str(err)[:60]}")
        print(f"| {name} | " + " | ".join(row) + " |")


def _steps() -> None:
    X, y = _data()
    print("| case | closure | curvature | max abs(θ - θ uncompiled) after 3 steps |")
    print("|---|---|---|---|")
    for name, tanh, loss_backend in (
        ("loss compiled (aot_eager)", None, "aot_eager"),
        ("tanh compiled (aot_eager)", "aot_eager", None),
        ("loss and tanh compiled (eager)", "eager", "eager"),
    ):
        for style, curvature in (("outputs", "auto"), ("loss", "auto"), ("lbfgs", "hessian")):
            model, ref = _mlp(tanh), _mlp()
            lf = torch.compile(F.cross_entropy, backend=loss_backend) if loss_backend else None
            runs = [(model, lf or F.cross_entropy), (ref, F.cross_entropy)]
            opts = [hessfree.HessianFree(m.parameters(), curvature=curvature) for m, _ in runs]

            def closure(m, loss_fn, opt, style=style):
                def call():
                    out = m(X)
                    loss = loss_fn(out, y)
                    if style == "outputs":
                        return loss, out
                    if style == "lbfgs":
                        opt.zero_grad()
                        loss.backward()
                    return loss

                return call

            try:
                for _ in range(3):
                    for (m, loss_fn), opt in zip(runs, opts, strict=True):
                        opt.step(closure(m, loss_fn, opt))
                diff = max(
                    float((p - q).abs().max())
                    for p, q in zip(model.parameters(), ref.parameters(), strict=True)
                )
                result = f"{diff:.2g}"
            except Exception as err:  # noqa: BLE001 -- the table reports it
                result = f"{type(err).__name__}: {str(err)[:70]}"
            print(f"| {name} | {style} | {curvature} | {result} |")


def _inductor() -> None:
    X, y = _data()
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    net = torch.compile(model)
    opt = hessfree.HessianFree(model.parameters())
    t0 = time.perf_counter()
    try:
        opt.step(lambda: (F.cross_entropy(out := net(X), y), out))
        print("inductor: stepped")
    except Exception as err:  # noqa: BLE001 -- reported
        print(f"inductor: {type(err).__name__}: {str(err)[:200]}")
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    print(f"{time.perf_counter() - t0:.1f} s, parameters unchanged: {same}")


if __name__ == "__main__":
    which = sys.argv[1:] or ["ops", "steps"]
    for part in which:
        {"ops": _ops, "steps": _steps, "inductor": _inductor}[part]()
