"""SciPy LinearOperators of curvature against dense float64 oracles and SciPy's own solvers."""

from __future__ import annotations

import functools
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import rosen_hess
from scipy.sparse import eye_array
from scipy.sparse.linalg import (
    LinearOperator,
    aslinearoperator,
    cg,
    eigsh,
    gmres,
    lobpcg,
    lsqr,
    minres,
    svds,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from cases import CASES, dense
from hessfree._flat import ParamLayout
from hessfree.curvature import GGNProduct, HessianProduct
from hessfree.operators import (
    CurvatureLinearOperator,
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    limit_blas_threads,
)

EXACT = dict(rtol=1e-10, atol=1e-12)
KINDS = {"hessian": HessianLinearOperator, "ggn": GGNLinearOperator, "fisher": FisherLinearOperator}
BY_NAME = {c.name: c for c in CASES}


@functools.cache
def _dense(name: str):
    """Dense oracles cost up to seconds (cnn_ce); every test of a case shares one."""
    return dense(*BY_NAME[name].build())


def _matrix(D, kind: str) -> np.ndarray:
    return {"hessian": D.H, "ggn": D.G, "fisher": D.F}[kind].numpy()


def _vectors(n: int, k: int = 3, seed: int = 0) -> np.ndarray:
    """``(n, k)`` standard normal columns."""
    return np.random.default_rng(seed).standard_normal((n, k))


def _identity(n: int) -> LinearOperator:
    """A user's own :math:`I` from public SciPy (sparse, so nothing n x n is formed)."""
    return aslinearoperator(eye_array(n))


def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


# ------------------------------------------------------------------------------ dense oracles
@pytest.mark.parametrize("kind", KINDS)
def test_operator_matches_dense_curvature(case, kind):
    model, x, y, loss_fn = case.build()
    M = _matrix(_dense(case.name), kind)
    op = KINDS[kind](model, loss_fn, (x, y))
    assert isinstance(op, LinearOperator)
    assert op.shape == M.shape and op.dtype == np.float64
    V = _vectors(M.shape[0])
    np.testing.assert_allclose(op.matvec(V[:, 0]), M @ V[:, 0], **EXACT)
    np.testing.assert_allclose(op @ V, M @ V, **EXACT)
    np.testing.assert_allclose(op.rmatvec(V[:, 1]), M @ V[:, 1], **EXACT)
    np.testing.assert_allclose(op.T.rmatmat(V), M @ V, **EXACT)
    assert op.H is op and op.T is op


def test_jacobian_operator_matches_dense_jacobian(case):
    model, x, _, _ = case.build()
    J = _dense(case.name).J.numpy()
    op = JacobianLinearOperator(model, x)
    assert op.shape == J.shape and op.dtype == np.float64
    V, U = _vectors(J.shape[1]), _vectors(J.shape[0], seed=1)
    np.testing.assert_allclose(op.matvec(V[:, 0]), J @ V[:, 0], **EXACT)
    np.testing.assert_allclose(op.matmat(V), J @ V, **EXACT)
    np.testing.assert_allclose(op.rmatvec(U[:, 0]), J.T @ U[:, 0], **EXACT)
    np.testing.assert_allclose(op.rmatmat(U), J.T @ U, **EXACT)
    np.testing.assert_allclose(op.H @ U[:, 1], J.T @ U[:, 1], **EXACT)
    np.testing.assert_allclose(op.H.H @ V[:, 1], J @ V[:, 1], **EXACT)


def test_gradient_matches_dense_gradient(case):
    model, x, y, loss_fn = case.build()
    g = _dense(case.name).g.numpy()
    np.testing.assert_allclose(GGNLinearOperator(model, loss_fn, (x, y)).gradient(), g, **EXACT)
    uncached = HessianLinearOperator(model, loss_fn, (x, y), cache_graph=False)
    np.testing.assert_allclose(uncached.gradient(), g, **EXACT)


def test_params_subset_gives_the_diagonal_block():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    H = _dense("mlp_tanh_mse").H.numpy()
    first = model[0].weight
    op = HessianLinearOperator(model, loss_fn, (x, y), params=[first])
    k = first.numel()  # the first weight leads model.parameters()
    assert op.shape == (k, k)
    np.testing.assert_allclose(op @ np.eye(k), H[:k, :k], **EXACT)


@pytest.mark.parametrize("kind", KINDS)
def test_params_the_loss_does_not_use_give_zero_blocks(kind):
    # allow_unused semantics: extra tensors get zero rows and columns, cached or not
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    M = _matrix(_dense("mlp_tanh_mse"), kind)
    k = M.shape[0]
    extra = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    params = [*model.parameters(), extra]
    padded = np.zeros((k + 3, k + 3))
    padded[:k, :k] = M
    V = _vectors(k + 3)
    for data in ((x, y), [(x[:3], y[:3]), (x[3:], y[3:])]):
        op = KINDS[kind](model, loss_fn, data, params=params)
        np.testing.assert_allclose(op @ V, padded @ V, **EXACT)
        np.testing.assert_allclose(op.gradient()[k:], np.zeros(3), **EXACT)


def test_params_the_loss_does_not_use_at_all_are_refused():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    other = [torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    match = "does not depend on any of the 1 tensor"
    for kind in KINDS.values():
        with pytest.raises(ValueError, match=match):
            kind(model, loss_fn, (x, y), params=other)
        two = kind(model, loss_fn, [(x[:3], y[:3]), (x[3:], y[3:])], params=other)
        with pytest.raises(ValueError, match=match):
            two @ np.ones(3)
        with pytest.raises(ValueError, match=match):
            two.gradient()
    with pytest.raises(ValueError, match=match):
        JacobianLinearOperator(model, x, params=other)


# ------------------------------------------------------------------------------ several batches
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_batches_equal_the_concatenated_batch(kind, reduction):
    # mlp_tanh_mse: F.mse_loss, a mean; rnn_mse: nn.MSELoss(reduction="sum"). 5 examples each.
    name = "mlp_tanh_mse" if reduction == "mean" else "rnn_mse"
    model, x, y, loss_fn = BY_NAME[name].build()
    D = _dense(name)
    M, V = _matrix(D, kind), _vectors(D.H.shape[0])
    two = [(x[:3], y[:3]), (x[3:], y[3:])]
    three = DataLoader(TensorDataset(x, y), batch_size=2)  # 2 + 2 + a ragged 1
    for data in (two, three):
        op = KINDS[kind](model, loss_fn, data)
        assert op.reduction == reduction
        np.testing.assert_allclose(op @ V[:, 0], M @ V[:, 0], **EXACT)
        np.testing.assert_allclose(op @ V, M @ V, **EXACT)
        np.testing.assert_allclose(op.gradient(), D.g.numpy(), **EXACT)


def _class_loss_case():
    """A float64 MLP, 7 examples in 3 classes, class 1 ignored and classes weighted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 1])  # batches below: 1 ignored of 2, 0 of 3, 2 of 2
    weight = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    return model, x, y, weight


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda w: nn.CrossEntropyLoss(weight=w, ignore_index=1),
        lambda w: nn.CrossEntropyLoss(ignore_index=1),
        lambda w: functools.partial(F.cross_entropy, weight=w, ignore_index=1),
        lambda w: nn.NLLLoss(weight=w),
    ],
    ids=["ce_weight_ignore", "ce_ignore", "functional_ce_weight_ignore", "nll_weight"],
)
def test_batches_of_a_class_weighted_mean_weigh_by_their_targets(make_loss):
    # torch's 'mean' divides by the targets' total class weight (ignored ones left out), so a
    # batch's share of the loss over all the data is that weight, not its row count: the
    # operators over 2 + 3 + 2 rows must equal the dense Hessian of the loss on all 7 at once
    model, x, y, weight = _class_loss_case()
    loss_fn = make_loss(weight)
    params = list(model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def full_loss(flat: Tensor) -> Tensor:
        parts = dict(
            zip(
                [k for k, _ in model.named_parameters()],
                ParamLayout(params).split(flat),
                strict=True,
            )
        )
        return loss_fn(torch.func.functional_call(model, parts, (x,)), y)

    H = torch.autograd.functional.hessian(full_loss, theta).numpy()
    g = torch.autograd.functional.jacobian(full_loss, theta).numpy()
    batches = [(x[:2], y[:2]), (x[2:5], y[2:5]), (x[5:], y[5:])]
    V = _vectors(theta.numel())
    op = HessianLinearOperator(model, loss_fn, batches)
    np.testing.assert_allclose(op @ V, H @ V, **EXACT)
    np.testing.assert_allclose(op.gradient(), g, **EXACT)
    # a linear last layer into cross-entropy: the GGN of the last layer's block is its Hessian
    last = params[-2:]
    G = GGNLinearOperator(model, loss_fn, batches, params=last)
    Hl = HessianLinearOperator(model, loss_fn, [(x, y)], params=last)
    n = G.shape[0]
    np.testing.assert_allclose(G @ np.eye(n), Hl @ np.eye(n), **EXACT)


def test_a_batch_whose_targets_are_all_ignored_adds_nothing():
    model, x, y, _ = _class_loss_case()
    loss_fn = nn.CrossEntropyLoss(ignore_index=1)
    kept = [(x[:1], y[:1]), (x[2:4], y[2:4])]  # rows 1 and 6: class 1, ignored
    with_ignored = kept + [(x[6:], y[6:])]
    V = _vectors(HessianLinearOperator(model, loss_fn, kept).shape[0])
    np.testing.assert_allclose(
        HessianLinearOperator(model, loss_fn, with_ignored) @ V,
        HessianLinearOperator(model, loss_fn, kept) @ V,
        **EXACT,
    )
    with pytest.raises(ValueError, match="ignore_index"):
        HessianLinearOperator(model, loss_fn, [(x[6:], y[6:]), (x[1:2], y[1:2])]) @ V[:, 0]


def test_progress_bar_reports_batches(capsys):
    pytest.importorskip("tqdm")
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    op = GGNLinearOperator(
        model, loss_fn, DataLoader(TensorDataset(x, y), batch_size=2), progress=True
    )
    v = _vectors(op.shape[0], 1)[:, 0]
    np.testing.assert_allclose(op @ v, _dense("mlp_tanh_mse").G.numpy() @ v, **EXACT)
    assert "GGNLinearOperator" in capsys.readouterr().err


# ------------------------------------------------------------------------------ graph reuse
def test_one_batch_runs_the_forward_pass_once():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    calls = _count_forwards(model)
    op = HessianLinearOperator(model, loss_fn, (x, y))
    V = _vectors(op.shape[0], 4)
    for v in V.T:
        op @ v
    op.matmat(V)
    assert len(calls) == 1


def test_construction_declares_dtype_without_a_probing_product(monkeypatch):
    products = []
    original = HessianProduct.matvec
    monkeypatch.setattr(
        HessianProduct, "matvec", lambda self, v: products.append(1) or original(self, v)
    )
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build(dtype=torch.float32)
    op = HessianLinearOperator(model, loss_fn, (x, y))
    assert op.dtype == np.float32 and products == []
    op @ np.ones(op.shape[0], np.float32)
    assert products == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_uncached_graph_runs_a_forward_pass_per_product(kind):
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    calls = _count_forwards(model)
    op = KINDS[kind](model, loss_fn, (x, y), cache_graph=False)
    calls.clear()
    V = _vectors(op.shape[0], 2)
    np.testing.assert_allclose(
        op @ V[:, 0], _matrix(_dense("mlp_tanh_mse"), kind) @ V[:, 0], **EXACT
    )
    op @ V[:, 1]
    op.matmat(V)
    assert len(calls) == 3


def test_several_batches_run_one_forward_pass_per_batch_per_product():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    calls = _count_forwards(model)
    op = GGNLinearOperator(model, loss_fn, [(x[:2], y[:2]), (x[2:4], y[2:4]), (x[4:], y[4:])])
    calls.clear()
    op @ np.ones(op.shape[0])
    op.matmat(np.ones((op.shape[0], 3)))
    assert len(calls) == 6


def test_matmat_uses_the_batched_product(monkeypatch):
    batched = []
    original = HessianProduct._matmat

    def spy(self, V):
        batched.append(V.shape[0])
        return original(self, V)

    monkeypatch.setattr(HessianProduct, "_matmat", spy)
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    op = HessianLinearOperator(model, loss_fn, (x, y))
    V = _vectors(op.shape[0], 5)
    np.testing.assert_allclose(op.matmat(V), _dense("mlp_tanh_mse").H.numpy() @ V, **EXACT)
    assert batched == [5]


# ------------------------------------------------------------------------------ SciPy solvers
def _ggn_setup():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    return GGNLinearOperator(model, loss_fn, (x, y)), _dense("mlp_tanh_mse")


def test_cg_and_minres_with_shift_reach_the_dense_solution():
    op, D = _ggn_setup()
    lam, rtol = 0.1, 1e-10
    A = D.G.numpy() + lam * np.eye(op.shape[0])
    b = _vectors(op.shape[0], 1)[:, 0]
    x_star = np.linalg.solve(A, b)
    eig = np.linalg.eigvalsh(A)
    x_cg, info = cg(op + lam * _identity(op.shape[0]), b, rtol=rtol, maxiter=1000)
    assert info == 0
    # ‖x − x*‖ ≤ ‖A⁻¹‖‖r‖ ≤ rtol‖b‖/λ_min(A), cg's stop rule ‖r‖ ≤ rtol‖b‖
    assert np.linalg.norm(x_cg - x_star) <= 1.01 * rtol * np.linalg.norm(b) / eig[0]
    x_mr, info = minres(op, b, shift=-lam, rtol=rtol, maxiter=1000)  # solves (G − shift I)x = b
    assert info == 0
    # minres stops on ‖r‖ ≤ rtol(‖A‖‖x‖ + ‖b‖)
    bound = rtol * (eig[-1] * np.linalg.norm(x_star) + np.linalg.norm(b)) / eig[0]
    assert np.linalg.norm(x_mr - x_star) <= 1.01 * bound


def test_gmres_solves_a_shifted_indefinite_hessian():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    H = _dense("mlp_tanh_mse").H.numpy()
    eig = np.linalg.eigvalsh(H)
    assert eig[0] < 0  # the Hessian is indefinite here: the shift makes it SPD-free but regular
    lam, rtol = 0.5 * abs(eig[0]) + 1.0, 1e-10
    A = H + lam * np.eye(H.shape[0])
    op = HessianLinearOperator(model, loss_fn, (x, y)).damped(lam)
    b = _vectors(H.shape[0], 1)[:, 0]
    x_gm, info = gmres(op, b, rtol=rtol, restart=H.shape[0], maxiter=20)
    assert info == 0
    sigma_min = np.linalg.svd(A, compute_uv=False)[-1]
    assert (
        np.linalg.norm(x_gm - np.linalg.solve(A, b)) <= 1.01 * rtol * np.linalg.norm(b) / sigma_min
    )


def test_operator_algebra_with_identity():
    op, D = _ggn_setup()
    lam, n = 0.3, op.shape[0]
    A = D.G.numpy() + lam * np.eye(n)
    V = _vectors(n, 2)
    for damped in (op + lam * _identity(op.shape[0]), op.damped(lam)):
        np.testing.assert_allclose(damped @ V[:, 0], A @ V[:, 0], **EXACT)
        np.testing.assert_allclose(damped.matmat(V), A @ V, **EXACT)
        np.testing.assert_allclose(damped.H @ V[:, 1], A @ V[:, 1], **EXACT)
    np.testing.assert_allclose((2.0 * op - op) @ V[:, 0], D.G.numpy() @ V[:, 0], **EXACT)
    with pytest.raises(ValueError, match="damping"):
        op.damped(-1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_damped_identity_matches_scipys_private_one_bit_for_bit(dtype):
    """``damped`` uses our identity, not SciPy's private ``IdentityOperator``: same numbers."""
    interface = pytest.importorskip("scipy.sparse.linalg._interface")
    if not hasattr(interface, "IdentityOperator"):
        pytest.skip("SciPy no longer has _interface.IdentityOperator to compare with")
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    op = GGNLinearOperator(model, loss_fn, (x, y), dtype=dtype)
    lam = 0.3
    ours = op.damped(lam)
    theirs = op + op.dtype.type(lam) * interface.IdentityOperator(op.shape, dtype=op.dtype)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    V = _vectors(op.shape[0], 2).astype(dtype)
    for apply in (
        lambda A: A @ V[:, 0],
        lambda A: A.matmat(V),
        lambda A: A.H @ V[:, 1],
        lambda A: A.T.matmat(V),
        lambda A: A.rmatmat(V),
    ):
        a, b = apply(ours), apply(theirs)
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b)
    # the same algebra, so a SciPy solve takes the same iterates
    b = V[:, 0]
    np.testing.assert_array_equal(cg(ours, b, maxiter=20)[0], cg(theirs, b, maxiter=20)[0])
    np.testing.assert_array_equal(op.damped(0.0) @ b, op @ b)


@pytest.mark.parametrize("which", ["LA", "SA"])
@pytest.mark.parametrize("name", ["mlp_relu_ce", "mlp_sigmoid_bce_sum", "rnn_mse"])
def test_eigsh_matches_dense_eigh(name, which):
    model, x, y, loss_fn = BY_NAME[name].build()
    H = _dense(name).H.numpy()
    op = HessianLinearOperator(model, loss_fn, (x, y))
    v0 = _vectors(H.shape[0], 1)[:, 0]
    values, vectors = eigsh(op, k=3, which=which, v0=v0, tol=1e-12)
    expected = np.linalg.eigvalsh(H)
    expected = expected[-3:] if which == "LA" else expected[:3]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.sort(values), expected, rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(H @ vectors, vectors * values, rtol=0, atol=1e-8 * scale)


def test_float32_operator_works_in_eigsh():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build(dtype=torch.float32)
    expected = np.linalg.eigvalsh(_dense("mlp_tanh_mse").H.numpy())[-2:]
    op = HessianLinearOperator(model, loss_fn, (x, y))
    assert op.dtype == np.float32
    values = eigsh(
        op, k=2, which="LA", v0=np.ones(op.shape[0], np.float32), return_eigenvectors=False
    )
    assert values.dtype == np.float32
    # float32 products: a smoke-test tolerance
    np.testing.assert_allclose(np.sort(values), expected, rtol=1e-4)
    op64 = HessianLinearOperator(model, loss_fn, (x, y), dtype=np.float64)
    assert op64.dtype == np.float64 and (op64 @ np.ones(op.shape[0])).dtype == np.float64
    values = eigsh(op64, k=2, which="LA", v0=np.ones(op.shape[0]), return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(values), expected, rtol=1e-4)


def test_lobpcg_matches_dense_top_eigenvalues(monkeypatch):
    op, D = _ggn_setup()
    calls = []
    original = GGNProduct._matmat
    monkeypatch.setattr(GGNProduct, "_matmat", lambda self, V: calls.append(1) or original(self, V))
    expected = np.linalg.eigvalsh(D.G.numpy())[-3:]
    values, _ = lobpcg(op, _vectors(op.shape[0], 3), largest=True, tol=1e-9, maxiter=500)
    np.testing.assert_allclose(np.sort(values), expected, rtol=1e-7)
    assert calls, "lobpcg should go through the batched product"


def _tall_jacobian_case():
    """More outputs (40) than parameters (17): a genuine least-squares problem."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(20, 2, dtype=torch.float64)
    return model, x, dense(model, x, torch.zeros(20, 2, dtype=torch.float64), F.mse_loss).J.numpy()


def test_lsqr_and_svds_on_the_jacobian_match_dense():
    model, x, J = _tall_jacobian_case()
    op = JacobianLinearOperator(model, x)
    assert op.shape == J.shape == (40, 17)
    b = _vectors(40, 1)[:, 0]
    x_ls = lsqr(op, b, atol=1e-14, btol=1e-14, conlim=1e12, iter_lim=2000)[0]
    expected = np.linalg.lstsq(J, b, rcond=None)[0]
    np.testing.assert_allclose(x_ls, expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
    s = svds(op, k=3, v0=_vectors(17, 1)[:, 0], tol=1e-12, return_singular_vectors=False)
    np.testing.assert_allclose(np.sort(s), np.linalg.svd(J, compute_uv=False)[:3][::-1], rtol=1e-9)


# ------------------------------------------------------------------------------ numpy edge
def test_numpy_edge_shares_memory_and_accepts_any_layout():
    op, D = _ggn_setup()
    G, n = D.G.numpy(), op.shape[0]
    x = _vectors(n, 1)[:, 0]
    assert np.shares_memory(op._as_tensor(x).numpy(), x)  # zero copy in
    t = torch.ones(n, dtype=torch.float64)
    assert op._as_array(t).__array_interface__["data"][0] == t.data_ptr()  # zero copy out
    np.testing.assert_allclose(op.matvec(x[:, None]), (G @ x)[:, None], **EXACT)
    strided = np.repeat(x, 2)[::2]
    np.testing.assert_allclose(op @ strided, G @ x, **EXACT)
    np.testing.assert_allclose(
        op @ x.astype(np.float32), G @ x.astype(np.float32), rtol=1e-10, atol=1e-10
    )
    frozen = x.copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(op @ frozen, G @ x, **EXACT)
    X = np.asfortranarray(_vectors(n, 3))
    np.testing.assert_allclose(op.matmat(X), G @ X, **EXACT)
    with pytest.raises(TypeError, match="complex"):
        op @ (x + 1j)


def test_from_function_matches_rosen_hess():
    def rosen(z):
        return (100 * (z[1:] - z[:-1] ** 2) ** 2 + (1 - z[:-1]) ** 2).sum()

    x = torch.from_numpy(np.random.default_rng(3).standard_normal(8))
    op = HessianLinearOperator.from_function(rosen, x)
    assert op.shape == (8, 8) and op.H is op
    np.testing.assert_allclose(op @ np.eye(8), rosen_hess(x.numpy()), **EXACT)
    matrix_x = x.reshape(2, 4)  # any shape: vectors are x.reshape(-1)
    np.testing.assert_allclose(
        HessianLinearOperator.from_function(lambda z: rosen(z.reshape(-1)), matrix_x) @ np.eye(8),
        rosen_hess(x.numpy()),
        **EXACT,
    )
    with pytest.raises(TypeError, match="`x` must be a floating-point tensor"):
        HessianLinearOperator.from_function(rosen, torch.arange(3))
    with pytest.raises(ValueError, match="scalar"):
        HessianLinearOperator.from_function(lambda z: z**2, x)


def test_from_product_wraps_a_curvature_product():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    out = model(x)
    op = CurvatureLinearOperator.from_product(
        GGNProduct(loss_fn(out, y), out, list(model.parameters()))
    )
    V = _vectors(op.shape[0])
    np.testing.assert_allclose(op @ V, _dense("mlp_tanh_mse").G.numpy() @ V, **EXACT)
    with pytest.raises(TypeError, match="lacks"):
        CurvatureLinearOperator.from_product(object())


# ------------------------------------------------------------------------------ stochastic layers
@pytest.mark.parametrize(
    "layer", [nn.Dropout(0.5), nn.BatchNorm1d(6)], ids=["dropout", "batchnorm"]
)
def test_training_mode_stochastic_layers_are_refused(layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), layer, nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        HessianLinearOperator(model, F.mse_loss, (x, y))
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        JacobianLinearOperator(model, x)
    HessianLinearOperator(model, F.mse_loss, (x, y), allow_training_mode=True)
    model.eval()
    op = HessianLinearOperator(model, F.mse_loss, (x, y), cache_graph=False)
    v = np.ones(op.shape[0])
    np.testing.assert_array_equal(op @ v, op @ v)


def test_zero_probability_dropout_is_accepted():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.0)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    assert GGNLinearOperator(
        model, F.mse_loss, (x, torch.zeros(5, 3, dtype=torch.float64))
    ).shape == (15, 15)


# ------------------------------------------------------------------------------ bad input
def test_vectors_of_the_wrong_length_are_refused():
    op, _ = _ggn_setup()
    n = op.shape[0]
    with pytest.raises(
        ValueError, match=rf"`x` must have shape \({n},\) or \({n}, 1\).*got \({n + 1},\)"
    ):
        op @ np.ones(n + 1)
    with pytest.raises(ValueError, match=rf"`X` must have shape \({n}, k\).*got \({n - 1}, 2\)"):
        op.matmat(np.ones((n - 1, 2)))
    J = JacobianLinearOperator(*BY_NAME["mlp_tanh_mse"].build()[:2])
    with pytest.raises(ValueError, match=r"`x` must have shape \(15,\)"):
        J.rmatvec(np.ones(n))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("in_dtype", [np.float32, np.float64])
def test_scipy_vector_shapes_and_dtypes_follow_the_dense_oracle(kind, in_dtype):
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    M = _matrix(_dense("mlp_tanh_mse"), kind)
    op = KINDS[kind](model, loss_fn, (x, y))
    n = op.shape[0]
    v = _vectors(n, 1)[:, 0].astype(in_dtype)
    tol = EXACT if in_dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for got, want_shape in ((op.matvec(v), (n,)), (op.matvec(v[:, None]), (n, 1))):
        assert got.shape == want_shape and got.dtype == op.dtype == np.float64
        np.testing.assert_allclose(got.reshape(-1), M @ v.astype(np.float64), **tol)
    np.testing.assert_allclose(op.rmatvec(v), op.matvec(v), rtol=0, atol=0)  # symmetric
    V = _vectors(n, 3).astype(in_dtype)
    np.testing.assert_allclose(op.matmat(V), M @ V.astype(np.float64), **tol)
    assert op.matmat(np.ones((n, 0))).shape == (n, 0)  # no columns: an empty result
    assert (op @ np.ones((n, 0))).shape == (n, 0)
    with pytest.raises(
        ValueError, match=rf"`x` must have shape \({n},\) or \({n}, k\).*\(1, {n}, 1\)"
    ):
        op @ np.ones((1, n, 1))


def test_inputs_that_do_not_fit_the_model_are_refused():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    wrong = torch.randn(5, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`model` failed on `inputs` of shape \(5, 7\)"):
        GGNLinearOperator(model, loss_fn, (wrong, y))
    with pytest.raises(ValueError, match=r"`model` failed on `inputs` of shape \(5, 7\)"):
        HessianLinearOperator(model, loss_fn, [(wrong, y), (x, y)])
    with pytest.raises(ValueError, match=r"`model` failed on `inputs` of shape \(5, 7\)"):
        JacobianLinearOperator(model, wrong)
    with pytest.raises(ValueError, match=r"`loss_fn` failed on outputs of shape \(5, 3\)"):
        GGNLinearOperator(model, F.cross_entropy, (x, torch.zeros(4, dtype=torch.long)))


def test_non_scalar_losses_are_refused():
    model, x, y, _ = BY_NAME["mlp_tanh_mse"].build()

    def squared(o, t):
        return (o - t) ** 2

    for data in ((x, y), [(x[:2], y[:2]), (x[2:], y[2:])]):
        with pytest.raises(ValueError, match=r"must return a scalar, got shape \(.*, 3\)"):
            HessianLinearOperator(model, squared, data)


def test_reductions_other_than_mean_and_sum_are_refused():
    model, x, y, _ = BY_NAME["mlp_tanh_mse"].build()
    with pytest.raises(
        ValueError, match=r"Unknown `loss_fn.reduction` 'none'; expected one of 'mean', 'sum'"
    ):
        GGNLinearOperator(model, nn.MSELoss(reduction="none"), (x, y))
    with pytest.raises(ValueError, match=r"Unknown `reduction` 'max'"):
        GGNLinearOperator(model, F.mse_loss, (x, y), reduction="max")
    with pytest.raises(ValueError, match="agree"):
        GGNLinearOperator(model, nn.MSELoss(reduction="sum"), (x, y), reduction="mean")
    summed = functools.partial(F.mse_loss, reduction="sum")
    assert FisherLinearOperator(model, summed, (x, y)).reduction == "sum"


@pytest.mark.parametrize("cached", [True, False])
def test_a_hand_written_sum_with_the_default_reduction_is_warned_of(cached):
    """A loss_fn without a `reduction` (a lambda) is taken for a mean, as documented; where
    its graph is a sum over the examples, that Fisher is N times too large (and batches would
    be weighted by size): one warning says to pass reduction='sum', which matches the oracle
    (per-example gradients, float64). A hand-written mean, or a given reduction: no warning."""
    g = torch.Generator().manual_seed(27)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(28)
    model = nn.Linear(3, 2).double()
    rows = []
    for i in range(6):
        gi = torch.autograd.grad(((model(x[i]) - y[i]) ** 2).sum(), list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in gi]).numpy())
    G = np.stack(rows)
    summed = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    with pytest.warns(UserWarning, match=r"FisherLinearOperator: .* Pass reduction='sum'") as w:
        op = FisherLinearOperator(model, summed, (x, y), cache_graph=cached)
        for _ in range(2):
            dense_mean = op @ np.eye(8)
    assert len(w) == 1
    np.testing.assert_allclose(dense_mean, 6 * G.T @ G, rtol=1e-10)  # as a mean: N times
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = FisherLinearOperator(model, summed, (x, y), reduction="sum", cache_graph=cached)
        np.testing.assert_allclose(op @ np.eye(8), G.T @ G, rtol=1e-10, atol=1e-12)
        meaned = lambda o, t: ((o - t) ** 2).sum(1).mean()  # noqa: E731
        FisherLinearOperator(model, meaned, (x, y), cache_graph=cached) @ np.eye(8)


def test_empty_data_is_refused():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    with pytest.raises(ValueError, match="`data` is empty"):
        HessianLinearOperator(model, loss_fn, [])
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=2)
    with pytest.raises(ValueError, match="`data` is empty"):
        HessianLinearOperator(model, loss_fn, empty)


def test_zero_row_batches_are_refused_like_empty_data():
    # A zero-row batch used to give zero products and a NaN loss instead of an error.
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    with pytest.raises(ValueError, match=r"`data inputs` has zero rows \(shape \(0, 4\)\)"):
        GGNLinearOperator(model, loss_fn, (x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"`data\[0\] inputs` has zero rows"):
        HessianLinearOperator(model, loss_fn, [(x[:0], y[:0]), (x, y)])
    op = FisherLinearOperator(model, loss_fn, [(x, y), (x[:0], y[:0])])  # found at the product
    with pytest.raises(ValueError, match=r"`data\[1\] inputs` has zero rows"):
        op @ np.ones(op.shape[0])
    with pytest.raises(ValueError, match=r"`inputs` has zero rows"):
        JacobianLinearOperator(model, x[:0])


def test_bad_argument_types_are_refused():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    with pytest.raises(TypeError, match="one-shot iterator"):
        HessianLinearOperator(model, loss_fn, ((x, y) for _ in range(2)))
    with pytest.raises(TypeError, match=r"`data` must be an \(inputs, targets\) pair"):
        HessianLinearOperator(model, loss_fn, x)
    with pytest.raises(
        TypeError, match=r"`data\[0\]` must be an \(inputs, targets\) pair, got a Tensor"
    ):
        HessianLinearOperator(model, loss_fn, [x, x, x])
    with pytest.raises(TypeError, match="`params` is required"):
        HessianLinearOperator(lambda inputs: model(inputs), loss_fn, (x, y))
    with pytest.raises(ValueError, match=r"`dtype` must be numpy.float32 or numpy.float64.*int32"):
        HessianLinearOperator(model, loss_fn, (x, y), dtype=np.int32)
    with pytest.raises(TypeError, match="`model` must be an nn.Module or a callable"):
        JacobianLinearOperator("model", x)


def test_a_tuple_of_inputs_is_passed_whole_and_the_error_says_how_to_unpack():
    # model(inputs) with a tuple failed with torch's bare "linear(): argument 'input' ... must
    # be Tensor, not tuple"; the message's fix gives the dense Jacobian (cases.dense)
    model, x, _, _ = BY_NAME["mlp_tanh_mse"].build()
    with pytest.raises(
        TypeError, match=r"tuple is not unpacked: pass lambda args: model\(\*args\)"
    ):
        JacobianLinearOperator(model, (x,))
    op = JacobianLinearOperator(lambda args: model(*args), (x,), params=list(model.parameters()))
    J = _dense("mlp_tanh_mse").J.numpy()
    np.testing.assert_allclose(op @ np.eye(J.shape[1]), J, **EXACT)


def test_a_jacobian_given_batches_says_it_takes_one_batch_of_inputs():
    # a list of batches, an (inputs, targets) pair or a DataLoader (the curvature operators'
    # `data`) got the tuple hint alone, whose fix (model(*args)) does not fit them; the
    # message's fix, one tensor of inputs, gives the dense Jacobian (cases.dense)
    model, x, y, _ = BY_NAME["mlp_tanh_mse"].build()
    batches = r"not an \(inputs, targets\) pair, a list of batches or a DataLoader.*torch\.cat"
    shapes = str(tuple(x[:2].shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(
        TypeError, match=rf"a list of 2 item\(s\) \[{shapes}, {shapes}\].*{batches}"
    ):
        JacobianLinearOperator(model, [x[:2], x[2:4]])
    with pytest.raises(TypeError, match=rf"a list of 1 item\(s\) \[tuple\].*{batches}"):
        JacobianLinearOperator(model, [(x, y)])
    with pytest.raises(TypeError, match=rf"a DataLoader \(.*{batches}"):
        JacobianLinearOperator(model, DataLoader(TensorDataset(x, y), batch_size=2))
    J = _dense("mlp_tanh_mse").J.numpy()
    op = JacobianLinearOperator(model, torch.cat([x[:2], x[2:]]))
    np.testing.assert_allclose(op @ np.eye(J.shape[1]), J, **EXACT)


def test_a_model_given_a_numpy_array_is_told_to_pass_a_tensor():
    # the message was the tuple hint (model(*args)), which does not fit an array
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    with pytest.raises(TypeError, match=r"\(ndarray\).*pass a tensor, torch\.from_numpy"):
        JacobianLinearOperator(model, x.numpy())
    with pytest.raises(TypeError, match=r"\(ndarray\).*pass a tensor, torch\.from_numpy"):
        GGNLinearOperator(model, loss_fn, (x.numpy(), y))


def test_a_model_with_several_heads_is_told_how_to_join_them():
    # a tuple of heads got "must return a tensor, got tuple"; the message now names the ways
    # that work, and the first of them gives the Gauss-Newton matrix of the two-block closure
    torch.manual_seed(3)
    trunk, cls, reg = nn.Linear(4, 5).double(), nn.Linear(5, 3).double(), nn.Linear(5, 2).double()
    params = [*trunk.parameters(), *cls.parameters(), *reg.parameters()]
    x = torch.randn(6, 4, dtype=torch.float64)
    y, t = torch.tensor([0, 2, 1, 1, 0, 2]), torch.randn(6, 2, dtype=torch.float64)

    def heads(inputs):
        h = torch.tanh(trunk(inputs))
        return cls(h), reg(h)

    def loss_fn(o, y):
        return F.cross_entropy(o[0], y[0]) + F.smooth_l1_loss(o[1], y[1])

    with pytest.raises(
        TypeError, match=r"one tensor, got a tuple of 2 .*several heads.*torch\.cat"
    ):
        GGNLinearOperator(heads, loss_fn, (x, (y, t)), params=params)
    joined = GGNLinearOperator(
        lambda inputs: torch.cat(heads(inputs), 1),
        lambda o, y: loss_fn(o.split([3, 2], 1), y),
        (x, (y, t)),
        params=params,
    )
    a, b = heads(x)
    blocks = GGNProduct(loss_fn((a, b), (y, t)), (a, b), params)
    eye = np.eye(joined.shape[0])
    expected = torch.stack([blocks(torch.from_numpy(e)) for e in eye], 1).numpy()
    np.testing.assert_allclose(joined @ eye, expected, **EXACT)


def test_callable_model_with_explicit_params():
    model, x, y, loss_fn = BY_NAME["mlp_tanh_mse"].build()
    op = GGNLinearOperator(lambda inputs: model(inputs), loss_fn, (x, y), params=model.parameters())
    v = _vectors(op.shape[0], 1)[:, 0]
    np.testing.assert_allclose(op @ v, _dense("mlp_tanh_mse").G.numpy() @ v, **EXACT)


# ------------------------------------------------------------------------------ threads
def test_limit_blas_threads_pins_numpy_blas_not_torch():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    torch_threads = torch.get_num_threads()
    with limit_blas_threads(1):
        numpy_blas = [
            lib
            for lib in threadpoolctl.threadpool_info()
            if lib["user_api"] == "blas" and "torch" not in lib["filepath"]
        ]
        assert numpy_blas and all(lib["num_threads"] == 1 for lib in numpy_blas)
        assert torch.get_num_threads() == torch_threads
    with pytest.raises(ValueError, match="num_threads"):
        with limit_blas_threads(0):
            pass


def test_limit_blas_threads_degrades_without_threadpoolctl(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # makes the import fail
    with pytest.warns(UserWarning, match="threadpoolctl is not installed"):
        with limit_blas_threads(1):
            total = float(np.ones(3) @ np.ones(3))
    assert total == 3.0


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_operator_matches_dense(kind):
    model, x, y, loss_fn = BY_NAME["mlp_relu_ce"].build(device="cuda")
    M = _matrix(_dense("mlp_relu_ce"), kind)
    op = KINDS[kind](model, loss_fn, [(x[:4].cpu(), y[:4].cpu()), (x[4:], y[4:])])
    assert op.device.type == "cuda"
    V = _vectors(M.shape[0])
    np.testing.assert_allclose(op @ V[:, 0], M @ V[:, 0], **EXACT)
    np.testing.assert_allclose(op @ V, M @ V, **EXACT)
    J = JacobianLinearOperator(model, x)
    np.testing.assert_allclose(J @ V[:, 0], _dense("mlp_relu_ce").J.numpy() @ V[:, 0], **EXACT)


@pytest.mark.parametrize("cls", [HessianLinearOperator, GGNLinearOperator, FisherLinearOperator])
@pytest.mark.parametrize("batches", [1, 2])
def test_an_operator_goes_with_its_last_reference(cls, batches):
    """No reference cycle: the operator, its cached graph and the process group it averages
    over are freed when its last reference goes, not when the garbage collector next runs
    (for a process group, possibly at interpreter exit, after the peers have gone)."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    data = (x, y) if batches == 1 else [(x[:2], y[:2]), (x[2:], y[2:])]
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        op = cls(model, nn.CrossEntropyLoss(), data)
        op @ np.ones(op.shape[1])  # builds (and, for one batch, caches) products
        alive = weakref.ref(op)
        del op
        assert alive() is None
    finally:
        if enabled:
            gc.enable()
