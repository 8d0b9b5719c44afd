"""operators16: the curvature operators and hessfree.spectral under uses nobody had tried.

``checks`` prints every number quoted in experiments/README.md, "operators16", for the
``hessfree`` on ``PYTHONPATH`` (run it with main's package and the branch's); ``models`` the
operators of uncommon models against dense float64 Hessians or central differences;
``scipy`` SciPy's solvers and operator algebra on the operators; ``spectral`` the trace
estimators' bias and spread against ``numpy.linalg``; ``cost`` times the parameter check
an uncached product gained (interleaved, one thread, medians).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python3 experiments/_operators16.py checks
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian
from torch.func import functional_call
from torch.nn.utils import parametrize

from hessfree import (
    CurvatureLinearOperator,
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from hessfree.spectral import bottom_eigenpairs, hutchinson_trace, hutchpp_trace


def _attempt(name: str, fn: Callable[[], object]) -> None:
    """Print ``fn()``'s result, or the exception it raised, and the warnings it issued."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = f"-> {fn()}"
        except Exception as err:  # a probe: every outcome is a result
            out = f"!! {type(err).__name__}: {str(err)[:220]}"
    print(f"{name:38s} {out}  ({time.perf_counter() - start:.2f} s)")
    for w in caught[:1]:
        print(f"{'':38s}    warning: {str(w.message)[:160]}")


def _dense_hessian(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> np.ndarray:
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = t[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    return hessian(f, theta).numpy()


def _central_differences(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> np.ndarray:
    """The Hessian by central differences of the gradient (h = 1e-6), for ops whose double
    backward the dense oracle would share with the operator."""
    params = list(model.parameters())
    theta = torch.nn.utils.parameters_to_vector(params).detach()

    def grad(t: Tensor) -> Tensor:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(t, params)
        g = torch.autograd.grad(loss_fn(model(x), y), params)
        return torch.cat([gi.reshape(-1) for gi in g])

    h = 1e-6
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    cols = [(grad(theta + h * e) - grad(theta - h * e)) / (2 * h) for e in eye]
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, params)
    return torch.stack(cols, 1).numpy()


# --------------------------------------------------------------------------------------------
# checks: the defects (main vs branch)
# --------------------------------------------------------------------------------------------
class _Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
        self.register_buffer("shift", torch.zeros(1, dtype=torch.float64))
        self.calls, self.hook = 0, None

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.hook is not None:
            self.hook(self.calls)
        return self.b(torch.tanh(self.a(x))) + self.shift


def _other_thread(fn: Callable[[], None]) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def check_threads() -> None:
    """A step (params + 0.3) by another thread between the two batches' forward passes."""
    torch.manual_seed(0)
    model = _Hooked()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    old = _dense_hessian(model, nn.MSELoss(), x, y)
    H = HessianLinearOperator(model, nn.MSELoss(), data)
    eye = np.eye(H.shape[0])

    def step() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3)

    def raced() -> str:
        model.calls = 0
        model.hook = lambda call: _other_thread(step) if call == 2 else None
        try:
            got = H @ eye
        finally:
            model.hook = None
        new = _dense_hessian(model, nn.MSELoss(), x, y)
        return (
            f"max|H - H(old)| {np.abs(got - old).max():.2f}, max|H - H(new)| "
            f"{np.abs(got - new).max():.2f}, largest entry {np.abs(old).max():.2f}"
        )

    _attempt("step by another thread mid-product", raced)
    G = GGNLinearOperator(model, nn.MSELoss(), data)
    model.hook = lambda call: _other_thread(lambda: model.shift.add_(0.5))
    _attempt("buffer write by another thread", lambda: G @ np.ones(G.shape[0]))
    model.hook = None


class _Product:
    def __init__(self, **attrs: object) -> None:
        self.shape, self.dtype, self.device = (3, 3), torch.float64, torch.device("cpu")
        self.result: Callable[[Tensor], object] = lambda v: 2 * v
        self.__dict__.update(attrs)

    def matvec(self, v: Tensor) -> object:
        return self.result(v)


def check_from_product() -> None:
    cases: list[tuple[str, dict, object]] = [
        ("shape (3, 4)", dict(shape=(3, 4)), np.ones(4)),
        ("dtype numpy.float64", dict(dtype=np.float64), np.ones(3)),
        ("dtype torch.int64", dict(dtype=torch.int64), np.ones(3)),
        ("device 'nowhere'", dict(device="nowhere"), np.ones(3)),
        ("matvec returns ndarray", dict(result=lambda v: 2 * v.numpy()), np.ones(3)),
        ("matvec returns (3, 1)", dict(result=lambda v: v[:, None]), np.ones(3)),
        ("matvec returns float32", dict(result=lambda v: v.float()), np.ones(3)),
        ("matvec drops an entry, A @ I", dict(result=lambda v: v[:2]), np.eye(3)),
    ]
    for name, attrs, x in cases:

        def apply(attrs: dict = attrs, x: object = x) -> object:
            out = CurvatureLinearOperator.from_product(_Product(**attrs)) @ x
            return f"shape {out.shape}, dtype {out.dtype}"

        _attempt(f"from_product: {name}", apply)


def checks() -> None:
    torch.set_num_threads(1)
    check_threads()
    check_from_product()


# --------------------------------------------------------------------------------------------
# models: one block per Parameter, recurrent, FFT, grid sampling, attention
# --------------------------------------------------------------------------------------------
class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class _Symmetric(nn.Module):
    def forward(self, X: Tensor) -> Tensor:
        return X.triu() + X.triu(1).T


class _Head(nn.Module):
    """``body`` then a linear head; ``last``: the last time step of a sequence model."""

    def __init__(self, body: nn.Module, width: int, out: int, last: bool = False) -> None:
        super().__init__()
        self.body, self.head, self.last = body.double(), nn.Linear(width, out).double(), last

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        h = h[0] if isinstance(h, tuple) else h
        return self.head(h[:, -1] if self.last else h.flatten(1))


class _RFFT(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        z = torch.fft.rfft(torch.tanh(x), dim=-1)
        return torch.cat([z.real, z.imag], dim=-1)


class _Warp(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        theta = torch.tensor([[[1.0, 0.1, 0.05], [0.0, 0.9, -0.1]]], dtype=torch.float64)
        self.theta, self.mode = nn.Parameter(theta), mode

    def forward(self, x: Tensor) -> Tensor:
        grid = F.affine_grid(self.theta.expand(x.shape[0], 2, 3), x.shape, align_corners=False)
        return F.grid_sample(x, grid, mode=self.mode, align_corners=False)


class _Upsample(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv, self.mode = nn.Conv2d(1, 1, 3, padding=1), mode

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(F.interpolate(self.conv(x), scale_factor=2, mode=self.mode))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))


def models() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    seq, img = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(2, 1, 5, 5).double()
    sym = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    parametrize.register_parametrization(sym[0], "weight", _Symmetric())
    cases: list[tuple[str, nn.Module, Tensor, int, bool]] = [
        ("tied weights (2 layers, 1 weight)", _Tied(), x, 4, False),
        ("parametrize (symmetric weight)", sym, x, 4, False),
        ("nn.RNN", _Head(nn.RNN(4, 3, batch_first=True), 3, 4, last=True), seq, 4, False),
        ("nn.GRU", _Head(nn.GRU(4, 3, batch_first=True), 3, 4, last=True), seq, 4, False),
        ("nn.LSTM", _Head(nn.LSTM(4, 3, batch_first=True), 3, 4, last=True), seq, 4, False),
        ("rfft inside", _Head(nn.Sequential(nn.Linear(4, 6), _RFFT()), 8, 4), x, 4, False),
        ("grid_sample bilinear", _Head(_Warp("bilinear"), 25, 3), img, 3, True),
        ("grid_sample bicubic", _Head(_Warp("bicubic"), 25, 3), img, 3, True),
        ("interpolate bicubic", _Head(_Upsample("bicubic"), 100, 3), img, 3, True),
        ("scaled_dot_product_attention", _Head(_Attention(), 20, 3), seq, 3, True),
    ]
    for name, model, inputs, out, by_differences in cases:
        targets = torch.randn(inputs.shape[0], out, dtype=torch.float64)

        def compare(
            model: nn.Module = model,
            inputs: Tensor = inputs,
            targets: Tensor = targets,
            by_differences: bool = by_differences,
        ) -> str:
            loss_fn = nn.MSELoss()
            H = HessianLinearOperator(model, loss_fn, (inputs, targets))
            got = H @ np.eye(H.shape[0])
            oracle = _central_differences if by_differences else _dense_hessian
            want = oracle(model, loss_fn, inputs, targets)
            G = GGNLinearOperator(model, loss_fn, (inputs, targets)) @ np.eye(H.shape[0])
            Fi = FisherLinearOperator(model, loss_fn, (inputs, targets)) @ np.eye(H.shape[0])
            kind = "differences" if by_differences else "dense"
            return (
                f"n {H.shape[0]}: max|H - {kind}| {np.abs(got - want).max():.1e} (largest "
                f"{np.abs(want).max():.2f}); G, F asymmetry {np.abs(G - G.T).max():.0e}, "
                f"{np.abs(Fi - Fi.T).max():.0e}"
            )

        _attempt(name, compare)


# --------------------------------------------------------------------------------------------
# scipy: operator algebra, expm_multiply, shift-invert, lobpcg with a preconditioner
# --------------------------------------------------------------------------------------------
def _mlp() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)


def _shift_inverse(A: sla.LinearOperator, sigma: float) -> sla.LinearOperator:
    """:math:`(A - \\sigma I)^{-1}` by MINRES (symmetric, indefinite is fine), for eigsh."""

    def solve(b: np.ndarray) -> np.ndarray:
        return sla.minres(A, b, shift=sigma, rtol=1e-12, maxiter=10 * A.shape[0])[0]

    return sla.LinearOperator(A.shape, matvec=solve, dtype=A.dtype)


def scipy_uses() -> None:
    torch.set_num_threads(1)
    model, x, y = _mlp()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    G = GGNLinearOperator(model, nn.MSELoss(), (x, y))
    n = H.shape[0]
    Hd, Gd = H @ np.eye(n), G @ np.eye(n)
    v = np.random.default_rng(0).standard_normal(n)
    eye = sla.aslinearoperator(np.eye(n))
    algebra = {
        "H + 0.5 aslinearoperator(I)": ((H + 0.5 * eye) @ v, (Hd + 0.5 * np.eye(n)) @ v),
        "H @ H": ((H @ H) @ v, Hd @ Hd @ v),
        "H ** 2": ((H**2) @ v, Hd @ Hd @ v),
        "H.T, H.H": (np.r_[H.T @ v, H.H @ v], np.r_[Hd @ v, Hd @ v]),
        "H - G": ((H - G) @ v, (Hd - Gd) @ v),
    }
    for name, (got, want) in algebra.items():
        _attempt(name, lambda got=got, want=want: f"max abs off {np.abs(got - want).max():.1e}")
    exact = scipy.linalg.expm(-Gd) @ v
    _attempt(
        "expm_multiply(-G, v)", lambda: f"{np.abs(sla.expm_multiply(-G, v) - exact).max():.1e}"
    )
    trace = -float(np.trace(Gd))
    _attempt(
        "expm_multiply(-G, v, traceA=...)",
        lambda: f"{np.abs(sla.expm_multiply(-G, v, traceA=trace) - exact).max():.1e}",
    )
    ev = np.linalg.eigvalsh(Hd)
    near = np.sort(ev[np.argsort(np.abs(ev - 0.05))[:2]])

    def shift_invert(opinv: sla.LinearOperator | None) -> str:
        w = sla.eigsh(H, k=2, sigma=0.05, v0=np.ones(n), OPinv=opinv, return_eigenvectors=False)
        return f"max off eigvalsh {np.abs(np.sort(w) - near).max():.1e}"

    _attempt("eigsh(H, sigma=0.05) (SciPy's GMRES)", lambda: shift_invert(None))
    _attempt("eigsh(H, sigma=0.05, OPinv=minres)", lambda: shift_invert(_shift_inverse(H, 0.05)))
    # the same shapes, drawn in float32 and widened: SciPy's GMRES fails here
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x32, y32 = torch.randn(20, 4), torch.randn(20, 3)
    H = HessianLinearOperator(model32.double(), nn.MSELoss(), (x32.double(), y32.double()))
    ev = np.linalg.eigvalsh(H @ np.eye(n))
    near = np.sort(ev[np.argsort(np.abs(ev - 0.05))[:2]])
    _attempt("2nd draw: eigsh(H, sigma=0.05)", lambda: shift_invert(None))
    _attempt("2nd draw: eigsh(..., OPinv=minres)", lambda: shift_invert(_shift_inverse(H, 0.05)))
    _attempt(
        "bottom_eigenpairs(G, k=2)",
        lambda: np.abs(bottom_eigenpairs(G, k=2).values - np.linalg.eigvalsh(Gd)[:2]).max(),
    )
    X0 = np.random.default_rng(1).standard_normal((n, 3))
    top = np.linalg.eigvalsh(Gd)[-3:]
    for name, M in (
        ("lobpcg(G), no preconditioner", None),
        (
            "lobpcg(G), M = 1/(diag G + 1e-3)",
            sla.aslinearoperator(np.diag(1 / (np.diag(Gd) + 1e-3))),
        ),
    ):

        def run(M: object = M) -> str:
            w, _, history = sla.lobpcg(
                G, X0, M=M, largest=True, tol=1e-9, maxiter=200, retResidualNormsHistory=True
            )
            return f"max off {np.abs(np.sort(w) - top).max():.1e} in {len(history)} iterations"

        _attempt(name, run)


# --------------------------------------------------------------------------------------------
# spectral: bias and spread of the trace estimators against numpy.linalg
# --------------------------------------------------------------------------------------------
def spectral() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()  # 108
    x, y = torch.randn(40, 8, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)
    for Op in (HessianLinearOperator, GGNLinearOperator):
        A = Op(model, nn.MSELoss(), (x, y))
        dense = A @ np.eye(A.shape[0])
        trace = float(np.linalg.eigvalsh(dense).sum())  # the oracle: the eigenvalues' sum
        # Rademacher Hutchinson: Var = 2 (||A||_F^2 - sum A_ii^2) / m (Hutchinson 1989)
        m = 30
        var = 2 * (np.sum(dense**2) - np.sum(np.diag(dense) ** 2)) / m
        hutch = np.array([hutchinson_trace(dense, m, seed=s).estimate for s in range(500)])
        hpp = np.array([hutchpp_trace(dense, 3 * m, seed=s).estimate for s in range(500)])
        bias_se = (hutch.mean() - trace) / (hutch.std(ddof=1) / np.sqrt(hutch.size))
        same = hutchinson_trace(A, m, seed=torch.Generator().manual_seed(7)).estimate
        again = hutchinson_trace(A, m, seed=torch.Generator().manual_seed(7)).estimate
        print(
            f"{Op.__name__} n={A.shape[0]}: trace {trace:.4f}; Hutchinson m={m}, 500 seeds: "
            f"mean {hutch.mean():.4f} (bias/se {bias_se:+.2f}),"
            f" std {hutch.std(ddof=1):.4f} vs formula {np.sqrt(var):.4f}; Hutch++ m={3 * m}: "
            f"mean {hpp.mean():.4f}, std {hpp.std(ddof=1):.4f}; torch.Generator(7) twice: "
            f"{same == again}"
        )


# --------------------------------------------------------------------------------------------
# cost of the parameter check of an uncached product
# --------------------------------------------------------------------------------------------
def cost(rounds: int = 100) -> None:
    """One uncached GGN product of a 784-256-10 MLP (203,530 parameters, batch 128) against
    the stamp reads it gained, interleaved."""
    from hessfree._product_sources import _ParamStamps

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    G = GGNLinearOperator(model, nn.CrossEntropyLoss(), [(x, y)], cache_graph=False)
    params = list(model.parameters())
    v = np.random.default_rng(0).standard_normal(G.shape[0]).astype(np.float32)
    product, stamps = [], []
    for _ in range(5):
        G @ v  # warm-up
    for _ in range(rounds):
        t = time.perf_counter()
        G @ v
        product.append(time.perf_counter() - t)
        t = time.perf_counter()
        _ParamStamps(params).refuse_moved("G")
        stamps.append(time.perf_counter() - t)
    p, s = statistics.median(product), statistics.median(stamps)
    print(
        f"load {os.getloadavg()[0]:.1f}; uncached product median {p * 1e3:.2f} ms, stamps "
        f"{s * 1e6:.1f} us ({100 * s / p:.3f} % of a product), {rounds} interleaved rounds"
    )


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    commands = {
        "checks": checks,
        "models": models,
        "scipy": scipy_uses,
        "spectral": spectral,
        "cost": cost,
    }
    commands[sys.argv[1] if len(sys.argv) > 1 else "checks"]()
