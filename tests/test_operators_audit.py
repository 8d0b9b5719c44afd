"""An audit of the SciPy curvature operators as a curvlinops/BackPACK user would drive them.

Every operator is checked against explicit float64 matrices of the loss *on all the data at
once* (``torch.autograd.functional.hessian``/``jacobian`` through ``torch.func.functional_call``,
flattened in the operator's parameter order), never against hessfree's own products: uneven
batches, sequence outputs, frozen parameters, buffers, custom losses, the numpy edge, SciPy's
solvers and composition, bad input and cost. The empirical Fisher's oracle is
:math:`F = c\\sum_i \\nabla L_i \\nabla L_i^\\top` with :math:`L_i` the full-data loss with only
example :math:`i`'s outputs live (its share of :math:`L`) and :math:`c = N` for a mean, 1 for a
sum: the Fisher of per-example losses :math:`l_i = N L_i` averaged, as the operators define it.
"""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse import eye_array
from scipy.sparse.linalg import aslinearoperator, cg, eigsh, minres
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from hessfree.operators import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
)

EXACT = dict(rtol=1e-10, atol=1e-12)
KINDS = {"H": HessianLinearOperator, "G": GGNLinearOperator, "F": FisherLinearOperator}


def _oracle(model: nn.Module, x: Tensor, y: Tensor, loss_fn, params=None, reduction="mean"):
    """Dense float64 ``H, G, F, J, g`` of ``loss_fn(model(x), y)`` w.r.t. ``params`` (default:
    the trainable ones, in ``model.parameters()`` order); buffers come from the module."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    names = {id(p): k for k, p in model.named_parameters()}
    keys, shapes = [names[id(p)] for p in params], [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def f(t: Tensor, xx: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return functional_call(model, dict(zip(keys, parts, strict=True)), (xx,))

    out = f(theta, x).detach()
    H = hessian(lambda t: loss_fn(f(t, x), y), theta, vectorize=True)
    J = jacobian(lambda t: f(t, x).reshape(-1), theta, vectorize=True)
    HL = hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1), vectorize=True)
    g = jacobian(lambda t: loss_fn(f(t, x), y), theta)

    def share(t: Tensor, i: int) -> Tensor:  # L with only example i's outputs depending on t
        o = torch.cat([out[:i], f(t, x[i : i + 1]), out[i + 1 :]])
        return loss_fn(o, y)

    N = x.shape[0]
    gi = torch.stack([jacobian(lambda t, i=i: share(t, i), theta) for i in range(N)])
    c = N if reduction == "mean" else 1
    return dict(H=H.numpy(), G=(J.T @ HL @ J).numpy(), F=c * (gi.T @ gi).numpy(), J=J.numpy(), g=g)


def _vectors(n: int, k: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k))


def _mlp(seed: int = 0, n_out: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, n_out)).double()


def _ten_cases(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(10, 3, generator=g, dtype=torch.float64),
        torch.randn(10, 2, generator=g, dtype=torch.float64),
    )


def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


# ------------------------------------------------------------------------------ uneven batches
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_ten_cases_in_batches_of_four_give_the_full_data_curvature(kind, reduction):
    # 4 + 4 + 2: 'mean' must weigh the last batch by 2/10, not by 1/3 of the batches
    model, (x, y) = _mlp(), _ten_cases()
    loss_fn = nn.MSELoss(reduction=reduction)
    M = _oracle(model, x, y, loss_fn, reduction=reduction)[kind]
    V = _vectors(M.shape[0])
    as_list = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    for data in (as_list, loader):
        op = KINDS[kind](model, loss_fn, data)
        np.testing.assert_allclose(op @ V[:, 0], M @ V[:, 0], **EXACT)
        np.testing.assert_allclose(op.matmat(V), M @ V, **EXACT)
        np.testing.assert_allclose(op.rmatmat(V), M @ V, **EXACT)
        np.testing.assert_allclose(op.H @ V[:, 1], M @ V[:, 1], **EXACT)


def _class_case():
    """10 cases in 3 classes, class 1 ignored or classes weighted: batches of 4 + 4 + 2 hold
    different shares of the 'mean' (what torch divides by is the kept targets' weight)."""
    model = _mlp(seed=3, n_out=3)
    x = _ten_cases(seed=3)[0]
    y = torch.tensor([0, 1, 1, 1, 2, 0, 2, 2, 1, 0])
    return model, x, y, torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda w: nn.CrossEntropyLoss(ignore_index=1),
        lambda w: nn.CrossEntropyLoss(weight=w),
        lambda w: nn.CrossEntropyLoss(weight=w, ignore_index=1),
        lambda w: nn.CrossEntropyLoss(weight=w, reduction="sum"),
    ],
    ids=["ignore", "weight", "weight_ignore", "weight_sum"],
)
def test_fisher_over_batches_is_the_fisher_of_all_the_data_for_class_weighted_losses(make_loss):
    # The empirical Fisher is quadratic in each batch's share of the loss: the batches used to
    # be weighted like the Hessian's (linearly), 12% off with ignore_index, 44% with weights.
    model, x, y, w = _class_case()
    loss_fn = make_loss(w)
    reduction = loss_fn.reduction
    M = _oracle(model, x, y, loss_fn, reduction=reduction)["F"]
    V = _vectors(M.shape[0])
    batches = DataLoader(TensorDataset(x, y), batch_size=4)
    np.testing.assert_allclose(FisherLinearOperator(model, loss_fn, (x, y)) @ V, M @ V, **EXACT)
    np.testing.assert_allclose(FisherLinearOperator(model, loss_fn, batches) @ V, M @ V, **EXACT)
    np.testing.assert_allclose(
        FisherLinearOperator(model, loss_fn, batches) @ V[:, 0], M @ V[:, 0], **EXACT
    )


def test_a_dataloader_that_draws_other_examples_on_each_pass_is_refused():
    # shuffle=True with drop_last=True drops a different remainder on every pass: products of
    # different matrices, which CG and ARPACK cannot tell from one (15% apart here).
    model, (x, y) = _mlp(), _ten_cases()
    dataset = TensorDataset(x, y)
    samplers = torch.utils.data
    for loader, why in (
        (DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True), "drops a random 2"),
        (DataLoader(dataset, 4, sampler=samplers.RandomSampler(dataset, True)), "replacement"),
        (DataLoader(dataset, 4, sampler=samplers.RandomSampler(dataset, num_samples=6)), "subset"),
        (DataLoader(dataset, 4, sampler=samplers.WeightedRandomSampler([1.0] * 10, 10)), "Weig"),
    ):
        with pytest.raises(ValueError, match=rf"different examples on every pass: .*{why}"):
            GGNLinearOperator(model, F.mse_loss, loader)
    # shuffling all the data only reorders a sum: accepted, and the full-data matrix
    M = _oracle(model, x, y, F.mse_loss)["G"]
    V = _vectors(M.shape[0])
    torch.manual_seed(0)
    for loader in (
        DataLoader(dataset, batch_size=4, shuffle=True),
        DataLoader(dataset, batch_size=5, shuffle=True, drop_last=True),  # nothing dropped
        DataLoader(dataset, batch_size=4, sampler=samplers.SubsetRandomSampler(range(10))),
    ):
        np.testing.assert_allclose(GGNLinearOperator(model, F.mse_loss, loader) @ V, M @ V, **EXACT)


# ------------------------------------------------------------------------------ model kinds
class _Tagger(nn.Module):
    """A GRU sequence tagger: ``(N, T, 3)`` in, ``(N, T, C)`` or, for cross-entropy with the
    class dimension 1 as torch wants it, ``(N, C, T)`` out."""

    def __init__(self, classes_first: bool) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 2, batch_first=True), nn.Linear(2, 3)
        self.classes_first = classes_first

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.rnn(x)[0])
        return out.transpose(1, 2) if self.classes_first else out


@pytest.mark.parametrize("loss", ["ce_class_dim_1", "mse_ntc"])
def test_sequence_outputs_over_uneven_batches_match_dense(loss):
    torch.manual_seed(1)
    model = _Tagger(classes_first=loss == "ce_class_dim_1").double()
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    if loss == "ce_class_dim_1":
        y, loss_fn = torch.randint(0, 3, (6, 4)), nn.CrossEntropyLoss()
    else:
        y, loss_fn = torch.randn(6, 4, 3, dtype=torch.float64), nn.MSELoss()
    D = _oracle(model, x, y, loss_fn)
    V = _vectors(D["H"].shape[0], 2)
    data = DataLoader(TensorDataset(x, y), batch_size=4)  # 4 + 2
    for kind, cls in KINDS.items():
        np.testing.assert_allclose(cls(model, loss_fn, data) @ V, D[kind] @ V, **EXACT)
    J = JacobianLinearOperator(model, x)  # rows in outputs.reshape(-1) order
    U = _vectors(J.shape[0], 2, seed=1)
    np.testing.assert_allclose(J.matmat(V), D["J"] @ V, **EXACT)
    np.testing.assert_allclose(J.rmatmat(U), D["J"].T @ U, **EXACT)
    np.testing.assert_allclose(J.T @ U[:, 0], D["J"].T @ U[:, 0], **EXACT)


def test_frozen_parameters_and_eval_batchnorm_buffers_match_dense():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    model(torch.randn(50, 3, dtype=torch.float64))  # running statistics away from 0 and 1
    model.eval()
    model[0].bias.requires_grad_(False)  # frozen: not a column of the operators
    x, y = _ten_cases()
    D = _oracle(model, x, y, F.mse_loss)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert D["H"].shape == (n, n)
    V = _vectors(n, 2)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    for kind, cls in KINDS.items():
        op = cls(model, F.mse_loss, data)
        assert op.shape == (n, n)
        np.testing.assert_allclose(op @ V, D[kind] @ V, **EXACT)
    np.testing.assert_allclose(JacobianLinearOperator(model, x) @ V, D["J"] @ V, **EXACT)
    model.train()
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*model\.eval\(\)"):
        GGNLinearOperator(model, F.mse_loss, data)


def test_a_subset_of_layers_gives_the_curvature_in_those_parameters():
    model, (x, y) = _mlp(), _ten_cases()
    params = [model[2].bias, model[0].weight]  # any order: the operator flattens in this one
    D = _oracle(model, x, y, F.mse_loss, params=params)
    V = _vectors(D["H"].shape[0], 2)
    for kind, cls in KINDS.items():
        op = cls(model, F.mse_loss, [(x[:4], y[:4]), (x[4:], y[4:])], params=params)
        np.testing.assert_allclose(op @ V, D[kind] @ V, **EXACT)
    J = JacobianLinearOperator(model, x, params=params)
    np.testing.assert_allclose(J @ V, D["J"] @ V, **EXACT)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_custom_loss_function_is_the_loss_the_user_wrote(reduction):
    # a quartic (no closed-form loss Hessian: the GGN double-backwards through it)
    def quartic(o: Tensor, t: Tensor) -> Tensor:
        per_case = ((o - t) ** 4).sum(1)
        return per_case.mean() if reduction == "mean" else per_case.sum()

    model, (x, y) = _mlp(), _ten_cases()
    D = _oracle(model, x, y, quartic, reduction=reduction)
    V = _vectors(D["H"].shape[0], 2)
    data = DataLoader(TensorDataset(x, y), batch_size=4)
    for kind, cls in KINDS.items():
        op = cls(model, quartic, data, reduction=reduction)
        np.testing.assert_allclose(op @ V, D[kind] @ V, **EXACT)
        np.testing.assert_allclose(op.gradient(), D["g"].numpy(), **EXACT)


# ------------------------------------------------------------------------------ numpy edge
def test_a_float32_model_takes_float64_lists_and_strided_vectors_and_scipy_solves_with_it():
    model, (x, y) = _mlp(), _ten_cases()
    G64 = _oracle(model, x, y, F.mse_loss)["G"]
    model32 = _mlp().float()
    op = GGNLinearOperator(model32, F.mse_loss, (x.float(), y.float()))
    n = op.shape[0]
    assert op.dtype == np.float32  # the model's dtype, unless dtype= asks for another
    v = _vectors(n, 1)[:, 0]
    tol = dict(rtol=1e-4, atol=1e-5)  # float32 products
    for given in (v, list(v), np.repeat(v, 3)[::3], v[:, None], np.asfortranarray(v[:, None])):
        got = op @ given
        assert got.dtype == np.float32 and got.shape == np.shape(given)
        np.testing.assert_allclose(np.ravel(got), G64 @ v, **tol)
    lam, b = 0.5, _vectors(n, 1, seed=2)[:, 0]
    x_star = np.linalg.solve(G64 + lam * np.eye(n), b)
    x_cg, info = cg(op.damped(lam), b, rtol=1e-6, maxiter=200)
    assert info == 0
    np.testing.assert_allclose(x_cg, x_star, rtol=1e-3, atol=1e-4 * np.abs(x_star).max())
    x_mr, info = minres(op, b, shift=-lam, rtol=1e-6, maxiter=200)
    assert info == 0
    np.testing.assert_allclose(x_mr, x_star, rtol=1e-3, atol=1e-4 * np.abs(x_star).max())
    op64 = GGNLinearOperator(model32, F.mse_loss, (x.float(), y.float()), dtype=np.float64)
    assert op64.dtype == np.float64 and (op64 @ v.astype(np.float32)).dtype == np.float64


def test_eigsh_of_the_indefinite_hessian_over_batches_matches_eigh_at_both_ends():
    model, (x, y) = _mlp(), _ten_cases()
    H = _oracle(model, x, y, F.mse_loss)["H"]
    exact = np.linalg.eigvalsh(H)
    assert exact[0] < 0 < exact[-1]  # indefinite: 'SA' must find the negative end
    op = HessianLinearOperator(model, F.mse_loss, DataLoader(TensorDataset(x, y), batch_size=4))
    v0 = _vectors(H.shape[0], 1)[:, 0]
    scale = np.abs(exact).max()
    for which, expected in (("LA", exact[-2:]), ("SA", exact[:2])):
        got = eigsh(op, k=2, which=which, v0=v0, tol=1e-12, return_eigenvectors=False)
        np.testing.assert_allclose(np.sort(got), expected, rtol=0, atol=1e-9 * scale)


def test_jacobian_composes_with_scipy_operators_into_the_gauss_newton_matrix():
    # For 'sum' MSE the loss Hessian is 2I, so G = 2 J^T J: J.T @ J built by SciPy's algebra
    model, (x, y) = _mlp(), _ten_cases()
    loss_fn = nn.MSELoss(reduction="sum")
    D = _oracle(model, x, y, loss_fn, reduction="sum")
    J = JacobianLinearOperator(model, x)
    n = J.shape[1]
    V = _vectors(n, 2)
    JtJ = J.T @ J
    assert JtJ.shape == (n, n)
    np.testing.assert_allclose(2.0 * (JtJ @ V), D["G"] @ V, **EXACT)
    np.testing.assert_allclose((J.H @ J).H @ V, D["J"].T @ D["J"] @ V, **EXACT)
    G = GGNLinearOperator(model, loss_fn, (x, y))
    damped = G + 0.25 * aslinearoperator(eye_array(n))
    np.testing.assert_allclose(damped @ V, (D["G"] + 0.25 * np.eye(n)) @ V, **EXACT)
    np.testing.assert_allclose((G @ G) @ V, D["G"] @ (D["G"] @ V), **EXACT)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kind", [*KINDS, "J"])
def test_a_nan_in_a_vector_gives_a_nan_product_and_leaves_the_operator_intact(kind):
    # Values are not inspected (as for hessfree's products), but NaN must show and pass
    model, (x, y) = _mlp(), _ten_cases()
    op = JacobianLinearOperator(model, x) if kind == "J" else KINDS[kind](model, F.mse_loss, (x, y))
    v = _vectors(op.shape[1], 1)[:, 0]
    before = op @ v
    bad = v.copy()
    bad[0] = np.nan
    assert np.isnan(op @ bad).any()
    np.testing.assert_array_equal(op @ v, before)


def test_wrong_lengths_and_bad_later_batches_are_named():
    model, (x, y) = _mlp(), _ten_cases()
    J = JacobianLinearOperator(model, x)
    m, n = J.shape
    with pytest.raises(ValueError, match=rf"must have shape \({n},\) or \({n}, 1\).*got \(3,\)"):
        J @ np.ones(3)
    with pytest.raises(ValueError, match=rf"must have shape \({m}, k\).*got \({n}, 2\)"):
        J.rmatmat(np.ones((n, 2)))
    op = HessianLinearOperator(model, F.mse_loss, [(x[:4], y[:4]), (x[4:8], y[4:7])])
    shapes = r"In `data\[1\]`: `loss_fn` failed on outputs of shape \(4, 2\) and targets of shape"
    with pytest.raises(ValueError, match=shapes), pytest.warns(UserWarning, match="target size"):
        op @ np.ones(n)
    op = GGNLinearOperator(model, F.mse_loss, [(x[:4], y[:4]), (x[4:], y[4:]), (x[:2, :2], y[:2])])
    with pytest.raises(
        ValueError, match=r"In `data\[2\]`: `model` failed on `inputs` of shape \(2, 2\)"
    ):
        op @ np.ones(n)


def test_products_after_the_parameters_changed_in_place_are_refused():
    # A cached graph holds the parameters it was built at: after optimizer.step() its products
    # used to be the old curvature for some layers and torch's in-place error for others.
    model, (x, y) = _mlp(), _ten_cases()
    ops = [cls(model, F.mse_loss, (x, y)) for cls in KINDS.values()]
    J = JacobianLinearOperator(model, x)
    uncached = GGNLinearOperator(model, F.mse_loss, (x, y), cache_graph=False)
    batched = GGNLinearOperator(model, F.mse_loss, [(x[:4], y[:4]), (x[4:], y[4:])])
    with torch.no_grad():
        model[0].weight.add_(0.1)
    v = _vectors(J.shape[1], 1)[:, 0]
    for op in ops:
        with pytest.raises(RuntimeError, match=r"changed in place.*0 \(shape \(5, 3\)\).*new"):
            op @ v
        with pytest.raises(RuntimeError, match="changed in place"):
            op.gradient()
    for apply in (lambda: J @ v, lambda: J.H @ np.ones(J.shape[0])):
        with pytest.raises(RuntimeError, match="changed in place"):
            apply()
    # a middle layer of a deeper net: the Jacobian's products mixed old activations with the
    # new weights (23% off the current Jacobian in experiments/_ops.py), without a word
    torch.manual_seed(0)
    deep = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    Jd = JacobianLinearOperator(deep.double(), x)
    Jd @ np.ones(Jd.shape[1])  # builds the R-op graph
    with torch.no_grad():
        deep[2].weight.add_(0.1)
    with pytest.raises(RuntimeError, match=r"parameter 2 \(shape \(5, 5\)\)"):
        Jd @ np.ones(Jd.shape[1])
    G = _oracle(model, x, y, F.mse_loss)["G"]  # without a cache: the current parameters
    np.testing.assert_allclose(uncached @ v, G @ v, **EXACT)
    np.testing.assert_allclose(batched @ v, G @ v, **EXACT)


# ------------------------------------------------------------------------------ cost
def test_a_jacobian_and_a_cached_operator_run_one_forward_pass_in_all():
    model, (x, y) = _mlp(), _ten_cases()
    calls = _count_forwards(model)
    J = JacobianLinearOperator(model, x)
    G = GGNLinearOperator(model, F.mse_loss, (x, y))
    V = _vectors(J.shape[1], 2)
    J @ V[:, 0], J.matmat(V), J.H @ np.ones(J.shape[0]), J.rmatmat(np.ones((J.shape[0], 2)))
    G @ V[:, 0], G.matmat(V), G.gradient()
    assert len(calls) == 2


def test_a_million_parameters_give_products_without_an_n_by_n_matrix():
    # n = 1,001,000: n^2 float32 entries would be 4 TB; a product must need O(n) memory
    torch.manual_seed(0)
    model = nn.Linear(1000, 1000)
    x, y = torch.randn(4, 1000), torch.randn(4, 1000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    ops = [cls(model, nn.MSELoss(), (x, y)) for cls in (HessianLinearOperator, GGNLinearOperator)]
    V = np.random.default_rng(0).standard_normal((1000, 1000))
    v = np.concatenate([V.ravel(), np.ones(1000)])
    # closed form, linear model, 'mean' MSE: H = G, (Hv)_W = 2/(N m) dO^T X, dO = X V^T + b
    X = x.double().numpy()
    dO = X @ V.T + 1.0
    expected = np.concatenate([(dO.T @ X).ravel(), dO.sum(0)]) * 2 / (4 * 1000)
    for op in ops:
        assert op.shape == (1_001_000, 1_001_000)
        got = op @ v
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    J = JacobianLinearOperator(model, x)
    np.testing.assert_allclose(J @ v, (dO).ravel(), rtol=1e-4, atol=1e-4)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 1024 * 1024  # under 1 GiB (the matrix: 4e12 bytes)
