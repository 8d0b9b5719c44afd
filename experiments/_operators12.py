"""operators12: the curvature operators under SciPy and PyTorch uses no earlier round tried.

Each case against an independent oracle (dense float64 Hessians and Jacobians from
``torch.autograd.functional``, SciPy on the dense matrix, numpy's two-pass statistics) or
checked for a clear error. Runs on whichever ``hessfree`` is on ``PYTHONPATH``, so one script
gives main's numbers and the branch's::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_operators12.py checks
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_operators12.py cost

``cost`` times ``_call_model`` (the one model call of every operator forward pass) with the
BatchNorm scan against the same call without it, interleaved in one process, 1 thread.
Results: ``experiments/results/2026-12-03-operators12.md``.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import time
import warnings

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import hessfree
from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
)
from hessfree.spectral import hutchinson_diagonal, hutchinson_trace, top_eigenpairs

torch.set_num_threads(1)


def _mlp(*middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *middle, nn.Tanh(), nn.Linear(4, 2)).double()


def _data(rows: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(rows, 3, generator=g, dtype=torch.float64),
        torch.randn(rows, 2, generator=g, dtype=torch.float64),
    )


def _flat_fn(model: nn.Module, buffers: dict | None = None):
    named = {k: v.detach() for k, v in model.named_parameters()}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.reshape(-1) for p in named.values()])

    def f(t: Tensor, inputs: object) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        state = dict(zip(named, parts, strict=True))
        state |= {k: v.clone() for k, v in (buffers or {}).items()}
        return functional_call(model, state, (inputs,))

    return f, theta


def _dense_h(model, x, y, buffers=None) -> np.ndarray:
    f, theta = _flat_fn(model, buffers)
    return hessian(lambda t: F.mse_loss(f(t, x), y), theta).numpy()


def _full(op) -> np.ndarray:
    return op @ np.eye(op.shape[1])


def _row(name: str, value: object) -> None:
    print(f"| {name} | {value} |", flush=True)


def _outcome(fn) -> str:
    try:
        return f"ok: {fn()}"
    except Exception as err:  # noqa: BLE001 (the point: what a user would see)
        return f"{type(err).__name__}: {str(err)[:160]}"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _OneShot(IterableDataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.rows = iter(list(zip(x, y, strict=True)))

    def __iter__(self):
        return self.rows


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()

    def forward(self, inputs):
        u, v = (inputs["u"], inputs["v"]) if isinstance(inputs, dict) else inputs
        return self.a(u) * torch.tanh(self.b(v))


def checks() -> None:
    print(f"hessfree from {hessfree.__file__}; load {os.getloadavg()}")
    print("| case | result |\n|---|---|")
    model, (x, y) = _mlp(), _data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    Hd = _dense_h(model, x, y)
    n = H.shape[0]
    v = np.linspace(-1.0, 1.0, n)
    # ---- SciPy interplay
    algebra = {
        "3*H": (3 * H, 3 * Hd),
        "H+H": (H + H, 2 * Hd),
        "H@H": (H @ H, Hd @ Hd),
        "H**2": (H**2, Hd @ Hd),
        "-H": (-H, -Hd),
        "H.T, H.H, aslinearoperator(H)": (sla.aslinearoperator(H.T.H), Hd),
    }
    for name, (op, dense) in algebra.items():
        _row(f"algebra {name}: max abs off dense", f"{np.abs(_full(op) - dense).max():.1e}")
    np.random.seed(0)  # noqa: NPY002 (onenormest's generator)
    _row(
        "onenormest(H) / dense 1-norm",
        f"{sla.onenormest(H) / np.abs(Hd).sum(0).max():.15f}",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = sla.expm_multiply(-H, v)
    off = np.abs(e - scipy.linalg.expm(-Hd) @ v).max()
    _row("expm_multiply(-H, v) (no traceA)", f"{off:.1e} off expm; warns: {len(caught)}")
    ends = np.sort(sla.eigsh(H, k=4, which="BE", return_eigenvectors=False))
    _row(
        "eigsh which='BE' k=4", f"{np.abs(ends - np.linalg.eigvalsh(Hd)[[0, 1, -2, -1]]).max():.1e}"
    )
    lm = np.sort(sla.eigsh(H, k=2, which="LM", return_eigenvectors=False))
    ref = np.sort(np.abs(np.linalg.eigvalsh(Hd)))[-2:]
    _row("eigsh which='LM' k=2", f"{np.abs(np.abs(lm) - ref).max():.1e}")
    sv = np.sort(sla.svds(H, k=2, return_singular_vectors=False))
    _row("svds(H) k=2", f"{np.abs(sv - np.linalg.svd(Hd, compute_uv=False)[:2][::-1]).max():.1e}")
    # ---- dtype and shape contract
    G32 = GGNLinearOperator(_mlp().float(), nn.MSELoss(), (x.float(), y.float()))
    for dt in (np.int64, np.float16, np.bool_, np.float64):
        w = (np.arange(n) % 2).astype(dt)
        outs = [G32 @ w, G32 @ w[:, None], G32 @ np.stack([w, w], 1)]
        _row(
            f"float32 GGN @ {np.dtype(dt).name} (n,), (n,1), (n,2)",
            ", ".join(f"{o.dtype}{o.shape}" for o in outs),
        )
    _row("H @ object array", _outcome(lambda: H @ np.ones(n, dtype=object)))
    _row("H @ torch tensor", _outcome(lambda: type(H @ torch.ones(n, dtype=torch.float64))))
    # ---- data
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]

    class OnceBatches:
        def __init__(self) -> None:
            self.it = iter(batches)

        def __iter__(self):
            return self.it

    def twice(op):
        first = np.abs(_full(op) - Hd).max()
        return f"first product {first:.2f} off; second: {_outcome(lambda: _full(op).sum())}"

    _row(
        "DataLoader over a one-shot IterableDataset",
        _outcome(
            lambda: twice(
                HessianLinearOperator(model, nn.MSELoss(), DataLoader(_OneShot(x, y), batch_size=4))
            )
        ),
    )
    _row(
        "class whose __iter__ returns one iterator",
        _outcome(lambda: twice(HessianLinearOperator(model, nn.MSELoss(), OnceBatches()))),
    )
    m2 = _TwoInputs()
    for kind, inputs in (("tuple", (x, x.flip(0))), ("dict", {"u": x, "v": x.flip(0)})):
        f, theta = _flat_fn(m2)
        dense = hessian(lambda t, f=f, inp=inputs: F.mse_loss(f(t, inp), y), theta).numpy()

        def off(inp=inputs, d=dense) -> str:
            H2 = HessianLinearOperator(m2, nn.MSELoss(), (inp, y))
            return f"{np.abs(_full(H2) - d).max():.1e} off dense"

        _row(f"one batch, {kind} of inputs", _outcome(off))
    _row(
        "numpy targets",
        _outcome(lambda: HessianLinearOperator(model, nn.MSELoss(), (x, y.numpy()))),
    )
    _row(
        "list targets, cross-entropy",
        _outcome(
            lambda: HessianLinearOperator(
                nn.Linear(3, 3).double(), nn.CrossEntropyLoss(), (x, [0, 1, 2] * 3 + [0])
            )
        ),
    )

    class DictRows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i):
            return {"x": x[i], "y": y[i]}

    _row(
        "DataLoader of dict rows",
        _outcome(
            lambda: HessianLinearOperator(model, nn.MSELoss(), DataLoader(DictRows(), batch_size=4))
        ),
    )
    for red in ("mean", "sum"):
        full = _full(HessianLinearOperator(model, nn.MSELoss(reduction=red), (x, y)))
        ragged = _full(
            HessianLinearOperator(
                model, nn.MSELoss(reduction=red), DataLoader(TensorDataset(x, y), batch_size=3)
            )
        )
        _row(
            f"DataLoader batch 3 of 10 ('{red}'), off one batch",
            f"{np.abs(full - ragged).max():.1e}",
        )
    # ---- models
    bn = _mlp(nn.BatchNorm1d(4))
    buffers = {k: v.clone() for k, v in bn.named_buffers()}
    x12, y12 = _data(12)
    halves = [(x12[:6], y12[:6]), (x12[6:], y12[6:])]
    Hb = HessianLinearOperator(bn, nn.MSELoss(), halves, allow_training_mode=True)
    per = sum(_dense_h(bn, xb, yb, buffers) for xb, yb in halves) / 2
    whole = _dense_h(bn, x12, y12, buffers)
    prod = _full(Hb)
    for _ in range(5):
        Hb @ np.ones(Hb.shape[0])
    moved = (bn[1].running_mean - buffers["1.running_mean"]).abs().max().item()
    tracked = int(bn[1].num_batches_tracked - buffers["1.num_batches_tracked"])
    _row(
        "train-mode BN, 2 batches: off mean of per-batch Hessians",
        f"{np.abs(prod - per).max():.1e}",
    )
    _row(
        "train-mode BN, 2 batches: off full-batch train-mode Hessian",
        f"{np.abs(prod - whole).max():.2f}",
    )
    _row(
        "train-mode BN: after a matmat and 5 matvecs, running_mean moved / batches tracked",
        f"{moved:.2f} / {tracked}",
    )

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(3, 3, bias=False).double()

        def forward(self, u):
            return self.lin(torch.tanh(self.lin(u)))

    tied = Tied()
    W = tied.lin.weight.detach().clone().reshape(-1)
    dense = hessian(
        lambda w: F.mse_loss(torch.tanh(x @ w.view(3, 3).T) @ w.view(3, 3).T, x), W
    ).numpy()
    _row(
        "tied weight used twice: off dense",
        f"{np.abs(_full(HessianLinearOperator(tied, nn.MSELoss(), (x, x))) - dense).max():.1e}",
    )
    # ---- stale graphs
    H, J = HessianLinearOperator(model, nn.MSELoss(), (x, y)), JacobianLinearOperator(model, x)
    later = copy.deepcopy(model)
    with torch.no_grad():
        for p in later.parameters():
            p.add_(0.1)
    model.load_state_dict(later.state_dict())
    _row("load_state_dict into the model, cached H", _outcome(lambda: (H @ v).sum()))
    _row("load_state_dict into the model, Jacobian", _outcome(lambda: (J @ v).sum()))
    H, J = HessianLinearOperator(model, nn.MSELoss(), (x, y)), JacobianLinearOperator(model, x)
    with torch.no_grad():
        for p, q in zip(model.parameters(), later.parameters(), strict=True):
            p.data.add_(0.1)
            q.add_(0.1)
    f, theta = _flat_fn(later)
    Jn = jacobian(lambda t: f(t, x).reshape(-1), theta).numpy()
    _row(
        "p.data.add_(0.1), cached H: max abs off the new point's",
        f"{np.abs(_full(H) - _dense_h(later, x, y)).max():.2f} (no error)",
    )
    _row(
        "p.data.add_(0.1), Jacobian: max abs off the new point's",
        f"{np.abs(_full(J) - Jn).max():.2f} (no error)",
    )
    # ---- torch.inference_mode() (an evaluation loop's)
    model, (x, y) = _mlp(), _data()
    Hd = _dense_h(model, x, y)
    kinds = {
        "cached H": lambda: HessianLinearOperator(model, nn.MSELoss(), (x, y)),
        "uncached H": lambda: HessianLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=False),
        "H over 2 batches": lambda: HessianLinearOperator(
            model, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])]
        ),
        "Jacobian": lambda: JacobianLinearOperator(model, x),
    }
    for name, make in kinds.items():
        ref = Hd if name != "Jacobian" else _full(make())
        for where in ("used", "built and used"):

            def run(make=make, ref=ref, where=where) -> str:
                op = make() if where == "used" else None
                with torch.inference_mode():
                    op = make() if op is None else op
                    return f"{np.abs(_full(op) - ref).max():.1e} off"

            _row(f"inference_mode: {name} {where} inside", _outcome(run))
    dense = np.diag([1.0, 2.0, 3.0, 4.0]) + np.diag([0.5] * 3, 1) + np.diag([0.5] * 3, -1)
    _row(
        "top_eigenpairs(scipy.sparse.csr_array)",
        _outcome(lambda: top_eigenpairs(scipy.sparse.csr_array(dense)).values),
    )
    _row(
        "hutchinson_trace(bfloat16 tensor)",
        _outcome(lambda: hutchinson_trace(torch.tensor(dense, dtype=torch.bfloat16), 16, seed=0)),
    )
    # ---- spectral
    for scale in (1.0, 1e4, 1e6, 1e8, 1e10):
        off = np.random.default_rng(0).standard_normal((6, 6)) * 1e-2
        off = off + off.T
        np.fill_diagonal(off, 0.0)
        A = np.diag(np.full(6, scale)) + off
        est = hutchinson_diagonal(A, num_probes=64, seed=0, batch_size=8)
        rng = np.random.default_rng(0)
        Z = np.concatenate([rng.integers(0, 2, (8, 6)) * 2 - 1 for _ in range(8)]).T
        ref = (Z * (A @ Z)).std(axis=1, ddof=1) / 8
        ratio = est.std_error / ref
        _row(
            f"hutchinson_diagonal std_error / two-pass, diagonal {scale:g}",
            f"{ratio.min():.3f}-{ratio.max():.3f}",
        )
    # ---- long runs
    big = nn.Sequential(nn.Linear(50, 200), nn.Tanh(), nn.Linear(200, 10))
    xb, yb = torch.randn(256, 50), torch.randn(256, 10)
    ops = {
        "H cached": HessianLinearOperator(big, nn.MSELoss(), (xb, yb)),
        "GGN uncached": GGNLinearOperator(big, nn.MSELoss(), (xb, yb), cache_graph=False),
        "Fisher, 3 batches": FisherLinearOperator(
            big, nn.MSELoss(), DataLoader(TensorDataset(xb, yb), batch_size=100)
        ),
        "Jacobian (+ rmatvec)": JacobianLinearOperator(big, xb),
    }
    for name, op in ops.items():
        w = np.ones(op.shape[1], dtype=np.float32)
        for _ in range(20):
            op @ w
        gc.collect()
        r0 = _rss_mib()
        for i in range(1000):
            op @ w
            if i % 10 == 0:
                op.matmat(np.ones((op.shape[1], 4), dtype=np.float32))
            if name.startswith("Jacobian"):
                op.rmatvec(np.ones(op.shape[0], dtype=np.float32))
        gc.collect()
        _row(f"{name}: RSS growth over 1,000 matvecs + 100 matmats", f"{_rss_mib() - r0:+.2f} MiB")


def cost() -> None:
    """``_call_model`` against main's bare call, interleaved: for a model no operator accepted
    in training mode (no scan) and for one that was (the BatchNorm scan on every call)."""
    from hessfree import _model_data
    from hessfree._graph_ops import twice_differentiable_attention, twice_differentiable_weight_norm

    def bare(model, inputs):  # main's call: the context managers and the call, no scan
        with twice_differentiable_attention(), twice_differentiable_weight_norm():
            return model(inputs)

    print(f"load before {os.getloadavg()}")
    cases = {
        "MLP 3-4-2 (4 modules), 10 rows": (_mlp(), _data()[0]),
        "60 Linear(16,16)+Tanh (121 modules), 32 rows": (
            nn.Sequential(*[m for _ in range(60) for m in (nn.Linear(16, 16), nn.Tanh())]),
            torch.randn(32, 16),
        ),
    }
    print(
        "| model | bare µs | not accepted in training mode: ratio | accepted: ratio |\n"
        "|---|---|---|---|"
    )
    for name, (model, inputs) in cases.items():
        accepted = copy.deepcopy(model)
        _model_data._STATS_KEPT.add(accepted)
        fns = {
            "bare": lambda m=model, i=inputs: bare(m, i),
            "new": lambda m=model, i=inputs: _model_data._call_model(m, i),
            "accepted": lambda m=accepted, i=inputs: _model_data._call_model(m, i),
        }
        for fn in fns.values():
            for _ in range(200):
                fn()
        rounds = {k: [] for k in fns}
        for r in range(9):
            for k, fn in list(fns.items())[:: 1 if r % 2 else -1]:
                t0 = time.perf_counter()
                for _ in range(300):
                    fn()
                rounds[k].append((time.perf_counter() - t0) / 300 * 1e6)
        cells = []
        for k in ("new", "accepted"):
            ratios = [a / b for a, b in zip(rounds[k], rounds["bare"], strict=True)]
            cells.append(f"{np.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})")
        scans = []
        for m in (model, accepted):  # _running_stats alone: a WeakSet lookup, or the scan
            t0 = time.perf_counter()
            for _ in range(2000):
                _model_data._running_stats(m)
            scans.append((time.perf_counter() - t0) / 2000 * 1e6)
        print(
            f"| {name} | {np.median(rounds['bare']):.1f} | {cells[0]}; alone {scans[0]:.2f} µs "
            f"| {cells[1]}; alone {scans[1]:.1f} µs |"
        )
    # the products' inference-mode guard against the smallest product it wraps
    model, (x, y) = _mlp(), _data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    v = np.ones(H.shape[0])

    from hessfree._numpy_edge import _outside_inference_mode

    def guard() -> None:
        with _outside_inference_mode():
            pass

    for fn in (guard, lambda: H @ v):
        for _ in range(500):
            fn()
    times: dict = {"guard": [], "product": []}
    for _ in range(9):
        for name, fn in (("guard", guard), ("product", lambda: H @ v)):
            t0 = time.perf_counter()
            for _ in range(2000):
                fn()
            times[name].append((time.perf_counter() - t0) / 2000 * 1e6)
    g, p = np.median(times["guard"]), np.median(times["product"])
    print(
        f"_outside_inference_mode() guard (not in inference mode) {g:.2f} µs; "
        f"a cached 26-parameter Hessian matvec {p:.1f} µs"
    )
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    {"checks": checks, "cost": cost}[sys.argv[1] if len(sys.argv) > 1 else "checks"]()
