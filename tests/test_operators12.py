"""The SciPy operators under uses no earlier round tried (operators12), each against an oracle.

Oracles: explicit float64 Hessians of the loss on all the data (``torch.autograd.functional``
through ``torch.func.functional_call``), SciPy's and numpy's functions on the dense matrix
(``onenormest``, ``expm``, ``eigvalsh``), and numpy's two-pass standard deviation of the same
probes. Every test is seeded and takes well under a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, IterableDataset

from hessfree import GGNLinearOperator, HessianLinearOperator, JacobianLinearOperator
from hessfree.spectral import hutchinson_diagonal, hutchinson_trace, top_eigenpairs


def _mlp(*layers: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *layers, nn.Tanh(), nn.Linear(4, 2)).double()


def _data(rows: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(rows, 3, generator=g, dtype=torch.float64),
        torch.randn(rows, 2, generator=g, dtype=torch.float64),
    )


def _dense_hessian(model: nn.Module, inputs: object, y: Tensor, buffers: dict) -> np.ndarray:
    """Float64 Hessian of ``mse(model(inputs), y)`` in ``model.parameters()`` order, the
    buffers given explicitly (so a train-mode BatchNorm normalises by ``inputs`` alone)."""
    named = {k: v.detach() for k, v in model.named_parameters()}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.reshape(-1) for p in named.values()])

    def loss(t: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        state = dict(zip(named, parts, strict=True)) | {k: v.clone() for k, v in buffers.items()}
        return F.mse_loss(functional_call(model, state, (inputs,)), y)

    return hessian(loss, theta).numpy()


def _full(op: sla.LinearOperator) -> np.ndarray:
    return op @ np.eye(op.shape[1])


# --------------------------------------------------------------------------------------------
# Defects (each test fails on main 5f60056)
# --------------------------------------------------------------------------------------------
class _OneShotBatches:
    """A re-iterable in name only: ``__iter__`` returns one iterator made once."""

    def __init__(self, batches: list) -> None:
        self.batches = iter(batches)

    def __iter__(self):
        return self.batches


class _OneShotRows(IterableDataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.rows = iter(list(zip(x, y, strict=True)))

    def __iter__(self):
        return self.rows


class _FreshRows(IterableDataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y, strict=True)


def test_operators12_data_that_can_be_iterated_only_once_is_refused() -> None:
    # main: the constructor's shape check took the first batch, so the first product summed
    # the rest (0.31 max abs off the Hessian of all the data, silently) and the second said
    # "`data` yielded no batches ... pass a non-empty list"
    model, (x, y) = _mlp(), _data()
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    with pytest.raises(TypeError, match=r"iterated only once: its __iter__ \(_OneShotBatches\)"):
        HessianLinearOperator(model, nn.MSELoss(), _OneShotBatches(batches))
    loader = DataLoader(_OneShotRows(x, y), batch_size=4)
    with pytest.raises(TypeError, match=r"DataLoader over an IterableDataset \(_OneShotRows\)"):
        GGNLinearOperator(model, nn.MSELoss(), loader)
    # an IterableDataset whose __iter__ starts a new pass is fine: the full-data Hessian
    H = HessianLinearOperator(model, nn.MSELoss(), DataLoader(_FreshRows(x, y), batch_size=4))
    dense = _dense_hessian(model, x, y, {})
    for _ in range(2):
        np.testing.assert_allclose(_full(H), dense, rtol=0, atol=1e-13)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()

    def forward(self, inputs: tuple[Tensor, Tensor] | dict[str, Tensor]) -> Tensor:
        u, v = (inputs["u"], inputs["v"]) if isinstance(inputs, dict) else inputs
        return self.a(u) * torch.tanh(self.b(v))


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_operators12_one_batch_of_structured_inputs_is_one_batch(kind: str) -> None:
    # main: ((u, v), y) and ({"u": u, "v": v}, y) were read as two batches: "too many values
    # to unpack (expected 2)" (the model got u alone) and "`data[0]` must be an (inputs,
    # targets) pair, got a dict"
    torch.manual_seed(0)
    model, (x, y) = _TwoInputs(), _data()
    inputs = (x, x.flip(0)) if kind == "tuple" else {"u": x, "v": x.flip(0)}
    H = HessianLinearOperator(model, nn.MSELoss(), (inputs, y))
    dense = _dense_hessian(model, inputs, y, {})
    np.testing.assert_allclose(_full(H), dense, rtol=0, atol=1e-13)


def test_operators12_numpy_targets_and_dict_batches_are_told_the_fix() -> None:
    # main: numpy targets failed inside torch with "'int' object is not callable"; a
    # DataLoader over a Dataset of dicts got no hint how to make pairs
    model, (x, y) = _mlp(), _data()
    with pytest.raises(TypeError, match=r"targets \(ndarray\).*torch\.from_numpy\(targets\)"):
        HessianLinearOperator(model, nn.MSELoss(), (x, y.numpy()))

    class Rows(Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return {"x": x[i], "y": y[i]}

    with pytest.raises(TypeError, match=r"got a dict\. A dict batch \(keys 'x', 'y'\).*collate_fn"):
        HessianLinearOperator(model, nn.MSELoss(), DataLoader(Rows(), batch_size=4))


def test_operators12_products_leave_train_mode_batchnorm_statistics_alone() -> None:
    # main: every forward pass of a product updated the running statistics (12 updates and
    # running_mean 0.40 away after 6 products over 2 batches), changing the eval-mode model
    model, (x, y) = _mlp(nn.BatchNorm1d(4)), _data(12)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    H = HessianLinearOperator(model, nn.MSELoss(), batches, allow_training_mode=True)
    H1 = HessianLinearOperator(model, nn.MSELoss(), (x, y), allow_training_mode=True)
    JacobianLinearOperator(model, x, allow_training_mode=True)
    products = _full(H)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    # what it is: each batch normalised by its own statistics, batches weighted by size
    halves = [_dense_hessian(model, xb, yb, buffers) for xb, yb in batches]
    np.testing.assert_allclose(products, (halves[0] + halves[1]) / 2, rtol=0, atol=1e-13)
    np.testing.assert_allclose(_full(H1), _dense_hessian(model, x, y, buffers), atol=1e-13)
    assert np.abs(products - _full(H1)).max() > 0.1  # so the batching matters, as documented


def test_operators12_diagonal_standard_error_survives_a_dominant_diagonal() -> None:
    # main: the sum of squares minus m * mean^2 cancelled: standard errors of 0 or 61x the
    # probes' own standard deviation for a diagonal 1e8 with off-diagonal entries ~1e-2
    n, m, batch = 6, 64, 8
    off = np.random.default_rng(0).standard_normal((n, n)) * 1e-2
    off = off + off.T
    np.fill_diagonal(off, 0.0)
    A = np.diag(np.full(n, 1e8)) + off
    est = hutchinson_diagonal(A, num_probes=m, seed=0, batch_size=batch)
    rng = np.random.default_rng(0)  # the same Rademacher probes, drawn as the estimator does
    Z = np.concatenate([rng.integers(0, 2, (batch, n)) * 2 - 1 for _ in range(m // batch)]).T
    samples = Z * (A @ Z)
    np.testing.assert_allclose(est.std_error, samples.std(axis=1, ddof=1) / np.sqrt(m), rtol=1e-6)
    np.testing.assert_allclose(est.estimate, samples.mean(axis=1), rtol=1e-15)


@pytest.mark.parametrize("built_inside", [False, True])
def test_operators12_operators_work_inside_inference_mode(built_inside: bool) -> None:
    # main: under torch.inference_mode() (an evaluation loop's) a Jacobian's products failed
    # with "'NoneType' object has no attribute 'next_functions'", uncached and batched
    # operators with "`loss` has no autograd graph", and building a cached one (or
    # from_function) too
    model, (x, y) = _mlp(), _data()
    dense = _dense_hessian(model, x, y, {})
    J_out = JacobianLinearOperator(model, x) @ np.eye(26)
    makers = {
        "cached": lambda: HessianLinearOperator(model, nn.MSELoss(), (x, y)),
        "uncached": lambda: HessianLinearOperator(model, nn.MSELoss(), (x, y), cache_graph=False),
        "batches": lambda: HessianLinearOperator(
            model, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])]
        ),
    }
    for name, make in makers.items():
        op = None if built_inside else make()
        with torch.inference_mode():
            op = make() if op is None else op
            products, g = _full(op), op.gradient()
        np.testing.assert_allclose(products, dense, rtol=0, atol=1e-13, err_msg=name)
        assert np.isfinite(g).all()
    x0 = torch.tensor([0.5, 1.5, -0.3], dtype=torch.float64)
    with torch.inference_mode():  # x0 an inference tensor when made here
        x0 = x0.clone() if built_inside else x0
        quartic = HessianLinearOperator.from_function(lambda z: (z**4).sum(), x0)
        np.testing.assert_allclose(_full(quartic), np.diag(12 * x0.numpy() ** 2), atol=1e-15)
    J = None if built_inside else JacobianLinearOperator(model, x)
    with torch.inference_mode():
        J = JacobianLinearOperator(model, x) if J is None else J
        np.testing.assert_array_equal(_full(J), J_out)
        np.testing.assert_allclose(J.H @ np.eye(20), J_out.T, rtol=0, atol=1e-13)


def test_operators12_spectral_takes_sparse_matrices_and_bfloat16_tensors() -> None:
    # main: a scipy.sparse matrix was refused ("got csr_matrix") and a bfloat16 tensor failed
    # in numpy ("Got unsupported ScalarType BFloat16")
    dense = (
        np.diag([1.0, 2.0, 3.0, 4.0]) + np.diag([0.5, 0.5, 0.5], 1) + np.diag([0.5, 0.5, 0.5], -1)
    )
    top = np.linalg.eigvalsh(dense)[-1]
    assert top_eigenpairs(scipy.sparse.csr_array(dense)).values[0] == pytest.approx(top, rel=1e-12)
    est = hutchinson_trace(torch.tensor(dense, dtype=torch.bfloat16), num_probes=16, seed=0)
    exact = hutchinson_trace(dense, num_probes=16, seed=0)  # 0.5 and 1..4 are exact in bfloat16
    assert est.estimate == exact.estimate


# --------------------------------------------------------------------------------------------
# Guards: SciPy uses no earlier test made, right on main too
# --------------------------------------------------------------------------------------------
def test_operators12_scipy_norm_exponential_and_both_ends_match_the_dense_hessian() -> None:
    model, (x, y) = _mlp(), _data()
    H = HessianLinearOperator(model, nn.MSELoss(), (x, y))
    dense = _dense_hessian(model, x, y, {})
    v = np.linspace(-1.0, 1.0, H.shape[0])
    # onenormest (products with H and H.T) gives a lower bound, from random sign columns
    # drawn with numpy's global generator: seeded, it is this matrix's dense 1-norm
    np.random.seed(0)  # noqa: NPY002 (the generator SciPy draws from)
    assert sla.onenormest(H) == pytest.approx(np.abs(dense).sum(axis=0).max(), rel=1e-12)
    np.testing.assert_allclose(
        sla.expm_multiply(-H, v, traceA=-np.trace(dense)),
        scipy.linalg.expm(-dense) @ v,
        rtol=0,
        atol=1e-12,
    )
    ends = np.sort(sla.eigsh(H, k=4, which="BE", return_eigenvectors=False))
    eig = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(ends, eig[[0, 1, -2, -1]], rtol=0, atol=1e-10)
    np.testing.assert_allclose(_full(H**2), dense @ dense, rtol=0, atol=1e-13)
    np.testing.assert_allclose(_full(H @ (3 * H) - H), 3 * dense @ dense - dense, atol=1e-13)


@pytest.mark.parametrize("in_dtype", [np.int64, np.float16, np.bool_])
def test_operators12_a_float32_operator_returns_float32_for_any_real_input(in_dtype) -> None:
    model, (x, y) = _mlp(), _data()
    G32 = GGNLinearOperator(_mlp().float(), nn.MSELoss(), (x.float(), y.float()))
    G64 = GGNLinearOperator(model, nn.MSELoss(), (x, y))
    v = (np.arange(G32.shape[0]) % 2).astype(in_dtype)
    for V in [v, v[:, None], np.stack([v, 1 - v], axis=1)]:
        out = G32 @ V
        assert out.dtype == np.float32 and out.shape == V.shape
        np.testing.assert_allclose(out, G64 @ V.astype(np.float64), rtol=1e-5, atol=1e-5)
