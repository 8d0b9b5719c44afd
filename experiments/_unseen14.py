"""unseen14: settings, modules and misuse no earlier pass had tried.

Parts (``python experiments/_unseen14.py [scale|buffers|misuse]``, default all; plain text
to stdout; run with main's package and with this branch's on ``PYTHONPATH`` for before/after):

- ``scale``: a 5-8-3 tanh MLP (float64, 64 cases, cross-entropy; tolerances 0, as they are
  absolute like LBFGS's) trained 30 steps with the loss times 2^k: the parameters' relative
  distance from the unscaled run's and the largest λ/2^k. A power of two scales every
  product and quotient exactly, so a scale-free optimizer gives 0.
- ``buffers``: a ``parametrizations.spectral_norm`` MLP and one with a user's running-mean
  buffer, 20 steps, the closure in training mode (warnings, closure calls, statuses) against
  the power iteration run once per step outside an eval-mode closure.
- ``misuse``: ``maximize=True``, a parameter on the meta device, anomaly detection and
  deterministic algorithms on, float32 and float64 parameter groups, ``Embedding(sparse=True)``,
  a float64 loss of float32 parameters, a loss exactly 0 at the start: the first line of the
  error or the losses.

1 thread (``torch.set_num_threads(1)``; run with ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from hessfree import HessianFree

torch.set_num_threads(1)
D = torch.float64


def _data(dtype: torch.dtype = D) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=dtype)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0).long()


def _mlp(dtype: torch.dtype = D) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _scaled(scale: float, style: str) -> tuple[Tensor, float]:
    X, y = _data()
    model = _mlp()
    opt = HessianFree(
        model.parameters(),
        curvature="auto" if style == "lo" else "hessian",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )

    def closure():
        opt.zero_grad()
        out = model(X)
        loss = F.cross_entropy(out, y) * scale
        if style == "lo":
            return loss, out
        loss.backward()
        return loss

    top = 0.0
    for _ in range(30):
        opt.step(closure)
        top = max(top, opt.last_step.damping / scale)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), top


def scale() -> None:
    for style in ("lo", "lbfgs"):
        p0, top0 = _scaled(1.0, style)
        print(f"{style}: x1 max lambda {top0:.3g}")
        for k in (10, 20, 30, 33, 36, 40, 50, 60):
            p, top = _scaled(2.0**k, style)
            diff = float((p - p0).norm() / p0.norm())
            print(f"  2^{k}: relative parameter distance {diff:.2e}, max lambda/2^k {top:.3g}")


class _RunningMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(5, dtype=D))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.mean


def buffers() -> None:
    X, y = _data()
    for kind in ("spectral_norm", "running_mean"):
        for mode in ("train-mode closure", "once per step"):
            torch.manual_seed(0)
            if kind == "spectral_norm":
                model = nn.Sequential(
                    spectral_norm(nn.Linear(5, 8)), nn.Tanh(), spectral_norm(nn.Linear(8, 3))
                ).to(D)
            else:
                model = nn.Sequential(_RunningMean(), *_mlp())
            opt = HessianFree(model.parameters())
            calls = [0]

            def closure(model=model, opt=opt, calls=calls):
                calls[0] += 1
                opt.zero_grad()
                out = model(X)
                return F.cross_entropy(out, y), out

            statuses: Counter = Counter()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                for _ in range(20):
                    if mode == "once per step":
                        model.train()
                        with torch.no_grad():
                            model(X)
                        model.eval()
                    opt.step(closure)
                    statuses[opt.last_step.status.value] += 1
            model.eval()
            with torch.no_grad():
                loss = float(F.cross_entropy(model(X), y))
            warned = [str(w.message)[:90] for w in seen if "buffer" in str(w.message)]
            print(f"{kind}, {mode}: {calls[0]} closure calls, {dict(statuses)}, eval loss")
            print(f"  {loss:.4f}; warning: {warned or 'none'}")


def _try(name: str, fn) -> None:  # noqa: ANN001
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn()
        print(f"{name}: {out}")
    except Exception as err:  # noqa: BLE001 - the point is the message
        print(f"{name}: {type(err).__name__}: {str(err)[:160]}")


def _steps(model: nn.Module, opt: HessianFree, X: Tensor, y: Tensor, k: int = 3) -> list:
    def closure():
        opt.zero_grad()
        out = model(X)
        return F.cross_entropy(out, y).double(), out

    return [round(float(opt.step(closure)), 6) for _ in range(k)]


def misuse() -> None:
    X, y = _data(torch.float32)
    _try("maximize=True", lambda: HessianFree(_mlp().parameters(), maximize=True))
    with torch.device("meta"):
        meta = nn.Linear(3, 2)
    _try("meta parameter", lambda: HessianFree(meta.parameters()))

    def anomaly():
        model = _mlp(torch.float32)
        with torch.autograd.set_detect_anomaly(True):
            return _steps(model, HessianFree(model.parameters()), X, y)

    def deterministic():
        model = _mlp(torch.float32)
        torch.use_deterministic_algorithms(True)
        try:
            return _steps(model, HessianFree(model.parameters()), X, y)
        finally:
            torch.use_deterministic_algorithms(False)

    _try("detect_anomaly", anomaly)
    _try("use_deterministic_algorithms", deterministic)
    _try(
        "float64 loss, float32 parameters",
        lambda: _steps(m := _mlp(torch.float32), HessianFree(m.parameters()), X, y),
    )

    def mixed():
        model = _mlp(torch.float32)
        model[2].double()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
        opt = HessianFree(groups)

        def closure():
            opt.zero_grad()
            out = model[2](torch.tanh(model[0](X)).double())
            return F.cross_entropy(out, y), out

        return opt.step(closure)

    _try("float32 and float64 groups", mixed)

    def sparse():
        torch.manual_seed(0)
        emb, lin = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3)
        idx, t = torch.randint(0, 10, (32,)), torch.randint(0, 3, (32,))
        opt = HessianFree([*emb.parameters(), *lin.parameters()])

        def closure():
            opt.zero_grad()
            out = lin(emb(idx))
            return F.cross_entropy(out, t), out

        return opt.step(closure)

    _try("Embedding(sparse=True), Gauss-Newton", sparse)

    def zero():
        lin = nn.Linear(5, 1)
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
        opt = HessianFree(lin.parameters())

        def closure():
            out = lin(X)
            return F.mse_loss(out, torch.zeros(64, 1)), out

        opt.step(closure)
        return opt.last_step.status.value, opt.last_step.converged_by.value

    _try("loss exactly 0 at the start", zero)


if __name__ == "__main__":
    parts = {"scale": scale, "buffers": buffers, "misuse": misuse}
    for name in sys.argv[1:] or list(parts):
        print(f"## {name}")
        parts[name]()
