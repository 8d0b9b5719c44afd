"""operators15: the curvature operators and hessfree.spectral under uses nobody had tried.

``checks`` prints every number quoted in experiments/README.md, "operators15", for the
``hessfree`` on ``PYTHONPATH`` (run it with main's package and the branch's); ``cost`` times
the per-product value check a cached graph gained (interleaved, one thread, medians).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_operators15.py checks
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_operators15.py cost
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import hessfree
from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
)
from hessfree.spectral import hutchinson_trace, top_eigenpairs


def _flat_fn(model: nn.Module, fn: Callable[[dict[str, Tensor]], Tensor]) -> Callable:
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def flat_fn(theta: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return fn(params)

    return flat_fn


def _theta(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _attempt(name: str, fn: Callable[[], object]) -> None:
    try:
        print(f"  {name}: {fn()}")
    except Exception as err:  # noqa: BLE001 - a study script reports what each case does
        print(f"  {name}: {type(err).__name__}: {str(err)[:160]}")


def _mlp(outputs: int = 1) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    return model, x, torch.randn(8, outputs, dtype=torch.float64)


def check_p_data() -> None:
    print("1. p.data.add_(0.3) after building (max abs off the dense matrices)")
    model, x, y = _mlp()
    lossf = _flat_fn(model, lambda ps: nn.functional.mse_loss(functional_call(model, ps, (x,)), y))
    outf = _flat_fn(model, lambda ps: functional_call(model, ps, (x,)).reshape(-1))
    theta0 = _theta(model)
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    J = JacobianLinearOperator(model, x)
    uncached = HessianLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=False)
    for p in model.parameters():
        p.data.add_(0.3)
    theta1 = _theta(model)
    h0, h1 = hessian(lossf, theta0).numpy(), hessian(lossf, theta1).numpy()
    j0, j1 = jacobian(outf, theta0).numpy(), jacobian(outf, theta1).numpy()
    eye = np.eye(H.shape[0])
    _attempt("cached H off old / new", lambda: (abs(H @ eye - h0).max(), abs(H @ eye - h1).max()))
    _attempt("J off old / new", lambda: (abs(J @ eye - j0).max(), abs(J @ eye - j1).max()))
    _attempt("uncached H off new", lambda: abs(uncached @ eye - h1).max())


def check_buffers() -> None:
    print("2. train-mode spectral_norm: drift between two H @ I, buffer change")
    torch.manual_seed(2)
    layer = nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4).double())
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 1)).double()
    torch.manual_seed(3)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    for cache in (True, False):

        def drift(cache: bool = cache) -> tuple[float, float]:
            u = layer.parametrizations.weight[0]._u.clone()
            H = HessianLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=cache)
            eye = np.eye(H.shape[0])
            a = H @ eye
            b = H @ eye
            moved = float((layer.parametrizations.weight[0]._u - u).abs().max())
            return float(abs(a - b).max()), moved

        _attempt(f"cache_graph={cache}: drift, _u moved", drift)


def check_anomaly() -> None:
    print("3. detect_anomaly: matmat of five operators and a hutchinson_trace")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, t = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def loss_fn(o: Tensor, t: Tensor) -> Tensor:
        return nn.functional.cross_entropy(o.double(), t)

    def ops() -> list:
        return [
            GGNLinearOperator(model, loss_fn, (x, t)),
            HessianLinearOperator(model, loss_fn, (x, t)),
            FisherLinearOperator(model, loss_fn, (x, t), reduction="mean"),
            GGNLinearOperator(model, loss_fn, [(x[:5], t[:5]), (x[5:], t[5:])]),
            JacobianLinearOperator(model, x),
        ]

    refs = [op.matmat(np.eye(op.shape[1])) for op in ops()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autograd.set_detect_anomaly(True):
            off = [
                abs(op.matmat(np.eye(op.shape[1])) - r).max()
                for op, r in zip(ops(), refs, strict=True)
            ]
            hutchinson_trace(ops()[0], num_probes=4, seed=0)
    print(f"  max abs off outside anomaly mode: {max(off)}; warnings: {len(caught)}")


def check_batchmean() -> None:
    print("4. KLDivLoss(reduction='batchmean', log_target=True), batches of 4/4/2")
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.LogSoftmax(1)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    target = torch.log_softmax(torch.randn(10, 3, dtype=torch.float64), 1)
    loss_fn = nn.KLDivLoss(reduction="batchmean", log_target=True)
    lossf = _flat_fn(model, lambda ps: loss_fn(functional_call(model, ps, (x,)), target))
    dense = hessian(lossf, _theta(model)).numpy()
    batches = [(x[:4], target[:4]), (x[4:8], target[4:8]), (x[8:], target[8:])]
    eye = np.eye(dense.shape[0])
    _attempt(
        "H off dense",
        lambda: abs(HessianLinearOperator(model, loss_fn, batches) @ eye - dense).max(),
    )


def check_spectrum() -> None:
    print("5. eigenpairs of a 1x1 operator and k = n")
    model = nn.Linear(1, 1, bias=False).double()
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    H1 = HessianLinearOperator(model, nn.MSELoss(reduction="sum"), (x, torch.zeros_like(x)))
    _attempt("top_eigenpairs(1x1).values (exact: 10)", lambda: top_eigenpairs(H1).values)
    m, x, y = _mlp()
    H = HessianLinearOperator(m, nn.MSELoss(), (x, y))
    dense = np.linalg.eigvalsh(H @ np.eye(H.shape[0]))
    _attempt(
        "k = n: max abs off eigvalsh",
        lambda: abs(top_eigenpairs(H, k=H.shape[0]).values[::-1] - dense).max(),
    )


def checks() -> None:
    print(f"hessfree from {os.path.dirname(hessfree.__file__)}; torch {torch.__version__}")
    for check in (check_p_data, check_buffers, check_anomaly, check_batchmean, check_spectrum):
        check()


def cost(rounds: int = 200) -> None:
    """A cached GGN product with the value check against the same product with the version
    check alone (the check swapped per call), interleaved, one thread."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
    x, t = torch.randn(128, 784), torch.randint(0, 10, (128,))
    G = GGNLinearOperator(model, nn.CrossEntropyLoss(), (x, t))
    source = G._source
    versions_only = source._built_at._versions
    full = source._built_at
    v = np.random.default_rng(0).standard_normal(G.shape[0]).astype(np.float32)
    times: dict[str, list[float]] = {"value check": [], "versions only": []}
    for _ in range(5):
        G @ v
    order = list(times)
    for r in range(rounds):
        for name in order if r % 2 else order[::-1]:
            source._built_at = full if name == "value check" else versions_only
            start = time.perf_counter()
            G @ v
            times[name].append(time.perf_counter() - start)
    source._built_at = full
    a, b = (statistics.median(times[k]) for k in order)
    checks = {"value check": [], "versions only": []}
    fix = "rebuild"
    for r in range(rounds):
        for name in order if r % 2 else order[::-1]:
            check = full.check if name == "value check" else versions_only.check
            start = time.perf_counter()
            check(fix)
            checks[name].append(time.perf_counter() - start)
    c, d = (statistics.median(checks[k]) for k in order)
    print(f"load average {os.getloadavg()}; {G.shape[0]} parameters, batch 128")
    print(
        f"median product: value check {a * 1e6:.0f} us, versions only {b * 1e6:.0f} us, "
        f"ratio {a / b:.3f}; median check alone: {c * 1e6:.1f} us against {d * 1e6:.1f} us"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"checks": checks, "cost": cost}[sys.argv[1] if len(sys.argv) > 1 else "checks"]()
