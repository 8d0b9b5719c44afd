"""operators13: the SciPy operators under uses no earlier round tried; numbers for the README.

``checks`` runs on any ``hessfree`` on ``PYTHONPATH`` (main's package and the branch's from
one script) and prints one line per case: what the operators give against an oracle, or
the error they raise. ``cost`` (branch only) times the forward-pass lock and the nested
move, interleaved in one process, and the memory over 2,000 products.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=<package> python3 experiments/_operators13.py checks
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_operators13.py cost
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
import tracemalloc
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
)

torch.set_num_threads(1)


def _batches(k: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(4, 3, generator=g).double(), torch.randn(4, 2, generator=g).double())
        for _ in range(k)
    ]


def _outcome(f) -> str:  # noqa: ANN001
    try:
        return f()
    except Exception as err:  # noqa: BLE001 - a study: every outcome is a row
        return f"{type(err).__name__}: {str(err)[:110]}"


def _shared_source() -> str:
    class Fresh:
        def __init__(self, batches: list) -> None:
            self.source = iter(batches)

        def __iter__(self):  # noqa: ANN204
            return (b for b in self.source)

    torch.manual_seed(0)
    model, batches = nn.Linear(3, 2).double(), _batches(3)
    v = np.ones(8)
    reference = HessianLinearOperator(model, nn.MSELoss(), batches) @ v
    H = HessianLinearOperator(model, nn.MSELoss(), Fresh(batches))
    return f"first product {np.abs(H @ v - reference).max():.3g} max abs off; second: " + (
        _outcome(lambda: str(H @ v))
    )


def _threads() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    role = threading.local()
    a_in, b_in, a_back = threading.Event(), threading.Event(), threading.Event()

    def hook(module: nn.Module, inputs: object) -> None:
        who = getattr(role, "name", None)
        if who == "a" and not a_in.is_set():
            a_in.set()
            b_in.wait(0.5)
        elif who == "b" and not b_in.is_set():
            b_in.set()
            a_back.wait(30.0)

    def loss_fn(o: Tensor, t: Tensor) -> Tensor:
        if getattr(role, "name", None) == "a":
            a_back.set()
        return nn.functional.mse_loss(o, t)

    ops = {
        k: GGNLinearOperator(model, loss_fn, _batches(2), allow_training_mode=True) for k in "ab"
    }
    before = {k: b.clone() for k, b in model.named_buffers()}
    model[2].register_forward_pre_hook(hook)

    def run(name: str) -> None:
        role.name = name
        ops[name] @ np.ones(ops[name].shape[1])

    a = threading.Thread(target=run, args=("a",))
    a.start()
    a_in.wait(30.0)
    b = threading.Thread(target=run, args=("b",))
    b.start()
    a.join()
    b.join()
    moved = {k: float((b - before[k]).abs().max()) for k, b in model.named_buffers()}
    return ", ".join(f"{k} moved {v:.3g}" for k, v in moved.items())


class _Complex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        z = self.lin(x)
        return torch.complex(z, 2 * torch.tanh(z))


def _flat(model: nn.Module, theta: Tensor, x: Tensor) -> Tensor:
    named = dict(model.named_parameters())
    parts = theta.split([p.numel() for p in named.values()])
    state = {k: t.view(p.shape) for (k, p), t in zip(named.items(), parts, strict=True)}
    return torch.func.functional_call(model, state, (x,))


def _complex_fisher() -> str:
    model = _Complex()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 3, generator=g).double(), torch.randn(10, 2, generator=g).double()

    def loss(o: Tensor, t: Tensor) -> Tensor:
        return (o - t).abs().pow(2).mean()

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    grads = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda t, i=i: loss(_flat(model, t, x[i : i + 1]), y[i : i + 1]), theta
            )
            for i in range(10)
        ]
    ).numpy()
    dense = grads.T @ grads / 10
    F = FisherLinearOperator(model, loss, (x, y)) @ np.eye(8)
    return f"{np.abs(F - dense).max():.3g} max abs off (entries up to {np.abs(dense).max():.3g})"


def _complex_jacobian() -> str:
    model = _Complex()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(4)).double()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def run() -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            J = JacobianLinearOperator(model, x)
            Jv = J @ np.ones(8)
        dense = torch.autograd.functional.jacobian(
            lambda t: torch.view_as_real(_flat(model, t, x)).reshape(-1), theta
        ).numpy()
        exact = (dense[0::2] + 1j * dense[1::2]) @ np.ones(8)
        return f"{np.abs(Jv - exact).max():.3g} max abs off the complex J v"

    return _outcome(run)


def _structured_on_meta() -> str:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x: dict) -> Tensor:
            return self.a(x["u"]) + self.b(x["v"][0])

    model = Two().double().to("meta")
    u = torch.randn(5, 3).double()
    data = ({"u": u, "v": [u]}, torch.zeros(5, 2).double())
    return _outcome(
        lambda: f"built, shape {HessianLinearOperator(model, nn.MSELoss(), data).shape}"
    )


def _inference_mode_depends_on() -> str:
    from hessfree.curvature import _depends_on

    model = nn.Linear(2, 1)
    out = model(torch.randn(3, 2))
    with torch.inference_mode():
        return _outcome(lambda: str(_depends_on([out], list(model.parameters()))))


def _adjoint_message() -> str:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    J = JacobianLinearOperator(model, torch.randn(5, 3).double())
    return _outcome(lambda: str(J.T @ np.ones(3)))


def checks() -> None:
    import hessfree

    print(f"package: {os.path.dirname(hessfree.__file__)}")
    rows = {
        "fresh generators over one source": _shared_source,
        "two threads, train-mode BatchNorm": _threads,
        "nested inputs, meta parameters": _structured_on_meta,
        "_depends_on in inference mode": _inference_mode_depends_on,
        "Fisher of complex outputs": _complex_fisher,
        "Jacobian of complex outputs": _complex_jacobian,
        "J.T @ wrong length": _adjoint_message,
    }
    for name, f in rows.items():
        print(f"| {name} | {_outcome(f)} |")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cost() -> None:
    from hessfree._model_data import (
        _call_model,
        _call_model_keeping,
        _module_of,
        _running_stats,
        _to_device,
    )

    print(f"load average: {os.getloadavg()}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))
    model = model.double()
    GGNLinearOperator(model, nn.MSELoss(), _batches(2), allow_training_mode=True)  # opts in
    x = torch.randn(32, 3).double()
    module = _module_of(model)
    contenders = {
        "locked (branch)": lambda: _call_model(model, x),
        "unlocked swap": lambda: _call_model_keeping(model, x, _running_stats(module)),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for rep in range(2200):  # interleaved; the first 200 are a warm-up
        for name, f in contenders.items():
            t = time.perf_counter()
            f()
            if rep >= 200:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    print(
        f"forward pass, median µs: {med}; ratio {med['locked (branch)'] / med['unlocked swap']:.3f}"
    )
    nested = ({"u": x, "v": [x, x]}, x)
    t = [time.perf_counter()]
    for _ in range(20000):
        _to_device(nested, torch.device("cpu"))
    per_call = (time.perf_counter() - t[0]) / 20000 * 1e6
    print(f"_to_device of a 4-tensor nest on its device: {per_call:.2f} µs")

    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    for label, op in (
        ("cached Hessian", HessianLinearOperator(model, nn.MSELoss(), _batches(1)[0])),
        ("uncached GGN, 3 batches", GGNLinearOperator(model, nn.MSELoss(), _batches(3))),
        ("Jacobian adjoint", JacobianLinearOperator(model, _batches(1)[0][0]).T),
    ):
        v = np.ones(op.shape[1])
        for _ in range(100):
            op @ v
        tracemalloc.start()
        rss0, snap0 = _rss_mib(), tracemalloc.take_snapshot()
        for _ in range(2000):
            op @ v
        rss1, snap1 = _rss_mib(), tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename")) / 1024
        print(f"{label}: 2,000 products, RSS {rss1 - rss0:+.2f} MiB, tracemalloc {grown:+.1f} KiB")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    {"checks": checks, "cost": cost}[sys.argv[1] if len(sys.argv) > 1 else "checks"]()
