"""The Monte-Carlo Fisher (MCFisherProduct, MCFisherLinearOperator) against float64 oracles.

Oracles: the output Jacobian from ``torch.autograd.functional.jacobian`` and the sampled labels'
output gradients from autograd on the loss itself (labels recomputed from the same generator
draw), the softmax Hessian by exact enumeration over classes, dense GGN matrices from
:class:`GGNLinearOperator` (its own tests check it against dense Hessians), and SciPy's solvers.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import cg, eigsh
from torch import nn

from hessfree import GGNLinearOperator, HessianFree, MCFisherLinearOperator, MCFisherProduct
from hessfree.operators import _batch_seed

EXACT = dict(rtol=1e-10, atol=1e-12)
F64 = torch.float64
N = 6  # examples
LOSSES = ("ce_mean", "ce_sum", "ce_seq", "mse_mean", "mse_sum", "bce_mean", "bce_sum")


def _case(kind: str, seed: int = 0):
    """``(model, loss_fn, x, y)``: a small tanh MLP and a loss; CE cases ignore one target."""
    torch.manual_seed(seed)
    loss, _, reduction = kind.partition("_")
    out = {"ce": 3, "mse": 2, "bce": 2}[loss]
    layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6 if reduction == "seq" else out)]
    if reduction == "seq":  # (N, classes, positions)
        layers.append(nn.Unflatten(1, (3, 2)))
        reduction = "mean"
    model = nn.Sequential(*layers).double()
    x = torch.randn(N, 3, dtype=F64)
    if loss == "ce":
        y = torch.randint(0, 3, (N, 2) if kind == "ce_seq" else (N,))
        y[1] = -100  # ignored: excluded from the matrix and from the mean's divisor
        return model, nn.CrossEntropyLoss(reduction=reduction), x, y
    if loss == "mse":
        return model, nn.MSELoss(reduction=reduction), x, torch.randn(N, out, dtype=F64)
    y = torch.randint(0, 2, (N, out)).to(F64)
    return model, nn.BCEWithLogitsLoss(reduction=reduction), x, y


def _jacobian(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``o`` and the dense Jacobian ``(*o.shape, n)`` (torch.autograd.functional)."""
    params = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def outputs(t: torch.Tensor) -> torch.Tensor:
        parts = t.split([p.numel() for p in params])
        state = {k: v.view_as(p) for k, v, p in zip(names, parts, params, strict=True)}
        return torch.func.functional_call(model, state, (x,))

    return outputs(theta).detach(), torch.autograd.functional.jacobian(outputs, theta)


def _redraw(kind: str, o: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """The labels MCFisherProduct documents, from a generator seeded alike (numpy's
    ``searchsorted`` as the categorical's inverse CDF)."""
    g = torch.Generator().manual_seed(seed)
    if kind.startswith("mse"):
        return o + torch.randn((m, *o.shape), generator=g, dtype=F64) / np.sqrt(2.0)
    if kind.startswith("bce"):
        return (torch.rand((m, *o.shape), generator=g, dtype=F64) < torch.sigmoid(o)).to(F64)
    u = torch.rand((m, o.shape[0], *o.shape[2:]), generator=g, dtype=F64).numpy()
    cdf = torch.softmax(o, 1).movedim(1, -1).numpy().cumsum(-1)  # (N, [L,] C)
    y = np.empty(u.shape, dtype=np.int64)
    for idx in np.ndindex(*u.shape):
        y[idx] = min(np.searchsorted(cdf[idx[1:]], u[idx]), cdf.shape[-1] - 1)
    return torch.from_numpy(y)


def _hand_built(kind: str, model, loss_fn, x, y, m: int, seed: int) -> tuple[np.ndarray, object]:
    r""":math:`\tfrac{1}{cM}\sum_m \sum_i J_i^\top g_{m,i} g_{m,i}^\top J_i` with :math:`g_m` the
    loss's output gradient at the redrawn labels and :math:`c` the loss's normalisation."""
    o, J = _jacobian(model, x)
    labels = _redraw(kind, o, m, seed)
    n = J.shape[-1]
    Jr = J.reshape(o.shape[0], -1, n)
    dense = torch.zeros(n, n, dtype=F64)
    for y_m in labels:
        if kind.startswith("ce"):
            y_m = torch.where(y == -100, y, y_m)  # ignored rows stay ignored
        leaf = o.clone().requires_grad_(True)
        (g_m,) = torch.autograd.grad(loss_fn(leaf, y_m), leaf)
        a = torch.einsum("nr,nrk->nk", g_m.reshape(o.shape[0], -1), Jr)  # J_i^T g_{m,i}
        dense += a.T @ a
    if loss_fn.reduction == "sum":
        c = 1.0
    elif kind.startswith("ce"):
        c = 1.0 / float((y != -100).sum())
    else:
        c = 1.0 / o.numel()
    return (dense / (c * m)).numpy(), labels


def _product(model, loss_fn, x, y, **kwargs) -> MCFisherProduct:
    out = model(x)
    return MCFisherProduct(loss_fn(out, y), out, list(model.parameters()), **kwargs)


def _dense_of(op) -> np.ndarray:
    return op @ np.eye(op.shape[0])


@pytest.mark.parametrize("kind", LOSSES)
def test_product_is_jacobian_sampled_gradients_jacobian(kind):
    model, loss_fn, x, y = _case(kind)
    P = _product(model, loss_fn, x, y, mc_samples=3, generator=torch.Generator().manual_seed(7))
    expected, labels = _hand_built(kind, model, loss_fn, x, y, 3, 7)
    torch.testing.assert_close(P.sampled_targets, labels, **EXACT)
    n = expected.shape[0]
    dense = P.matmat(torch.eye(n, dtype=F64)).numpy()
    np.testing.assert_allclose(dense, expected, **EXACT)
    v = torch.from_numpy(np.random.default_rng(1).standard_normal(n))
    np.testing.assert_allclose(P(v).numpy(), expected @ v.numpy(), **EXACT)


@pytest.mark.parametrize("kind", ("ce_mean", "ce_seq", "mse_mean", "bce_sum"))
def test_many_samples_average_to_the_ggn(kind):
    # E[F^] = G: 20,000 draws on a 3-4-out MLP; the relative Frobenius error is ~1/sqrt(M)
    # times a few (0.2-0.9 % measured at seed 3; one draw: 56-188 %), so 5 % leaves a wide
    # margin at a fixed seed.
    model, loss_fn, x, y = _case(kind)
    G = _dense_of(GGNLinearOperator(model, loss_fn, (x, y)))
    Fmc = _dense_of(MCFisherLinearOperator(model, loss_fn, (x, y), mc_samples=20000, seed=3))
    assert np.linalg.norm(Fmc - G) <= 0.05 * np.linalg.norm(G)
    # one sample is another matrix: the test above would pass for a GGN in disguise otherwise
    F1 = _dense_of(MCFisherLinearOperator(model, loss_fn, (x, y), mc_samples=1, seed=3))
    assert np.linalg.norm(F1 - G) > 0.1 * np.linalg.norm(G)


def test_cross_entropy_enumeration_is_the_softmax_hessian():
    # Exact over the classes: sum_c p_c (p - e_c)(p - e_c)^T = diag(p) - p p^T = the Hessian of
    # cross-entropy in the logits (autograd), and the sampler draws class c with frequency p_c.
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.1]], dtype=F64)
    p = torch.softmax(logits, 1)[0]
    e = torch.eye(4, dtype=F64)
    enum = sum(p[c] * torch.outer(p - e[c], p - e[c]) for c in range(4))
    hess = torch.autograd.functional.hessian(
        lambda z: F.cross_entropy(z.view(1, 4), torch.tensor([2])), logits[0]
    )
    torch.testing.assert_close(enum, hess, **EXACT)
    w = torch.zeros(4, dtype=F64, requires_grad=True)
    out = logits + w  # outputs with a graph to a parameter
    P = MCFisherProduct(
        F.cross_entropy(out, torch.tensor([2])),
        out,
        [w],
        mc_samples=40000,
        generator=torch.Generator().manual_seed(0),
    )
    freq = torch.bincount(P.sampled_targets.reshape(-1), minlength=4).to(F64) / 40000
    torch.testing.assert_close(freq, p, rtol=0, atol=0.01)  # sd <= 0.0025 per class
    dense = P.matmat(torch.eye(4, dtype=F64))  # J = I: the sampled middle matrix itself
    torch.testing.assert_close(dense, hess, rtol=0, atol=0.02)


@pytest.mark.parametrize("kind", ("ce_mean", "mse_sum", "bce_mean"))
def test_operator_is_symmetric_psd_and_scipy_solves_it(kind):
    model, loss_fn, x, y = _case(kind)
    Fop = MCFisherLinearOperator(model, loss_fn, (x, y), mc_samples=2, seed=5)
    D = _dense_of(Fop)
    np.testing.assert_allclose(D, D.T, **EXACT)
    eig = np.linalg.eigvalsh(D)
    assert eig[0] >= -1e-10 * eig[-1]
    b = Fop.gradient()
    x_cg, info = cg(Fop.damped(0.1), b, rtol=1e-10, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(x_cg, np.linalg.solve(D + 0.1 * np.eye(len(b)), b), rtol=1e-7)
    top = eigsh(Fop, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), eig[-2:], rtol=1e-8)


def test_every_product_of_one_operator_is_the_same_matrix():
    # Two batches, graphs rebuilt on every product (cache_graph=False): each pass redraws the
    # labels from the same seeds, so products agree bit for bit and are linear.
    model, loss_fn, x, y = _case("ce_mean")
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    Fop = MCFisherLinearOperator(model, loss_fn, data, seed=11, cache_graph=False)
    rng = np.random.default_rng(0)
    v, w = rng.standard_normal((2, Fop.shape[0]))
    first = Fop @ v
    np.testing.assert_array_equal(Fop @ v, first)
    np.testing.assert_allclose(Fop @ (2 * v - 3 * w), 2 * first - 3 * (Fop @ w), **EXACT)
    np.testing.assert_allclose(Fop @ np.stack([v, w], 1), np.stack([first, Fop @ w], 1), **EXACT)
    again = MCFisherLinearOperator(model, loss_fn, data, seed=11)
    np.testing.assert_array_equal(again @ v, first)
    other = MCFisherLinearOperator(model, loss_fn, data, seed=12)
    assert not np.allclose(other @ v, first)


def test_batches_weigh_by_their_share_of_the_mean():
    # Linear in the loss like the GGN (not the empirical Fisher's squared shares): batch b's
    # product, drawn as the operator draws it, weighted N_b / N with N_b its kept targets.
    model, loss_fn, x, y = _case("ce_mean")  # y[1] ignored: shares 3/5 and 2/5, not 4/6, 2/6
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    Fop = MCFisherLinearOperator(model, loss_fn, data, seed=4, mc_samples=2)
    n = Fop.shape[0]
    expected = np.zeros((n, n))
    for b, (xb, yb) in enumerate(data):
        g = torch.Generator().manual_seed(_batch_seed(4, b, 0))
        P = _product(model, loss_fn, xb, yb, mc_samples=2, generator=g)
        share = float((yb != -100).sum()) / 5
        expected += share * P.matmat(torch.eye(n, dtype=F64)).numpy()
    np.testing.assert_allclose(_dense_of(Fop), expected, **EXACT)


def test_from_product_wraps_a_drawn_product_without_drawing():
    model, loss_fn, x, y = _case("bce_mean")
    P = _product(model, loss_fn, x, y, mc_samples=2, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    op = MCFisherLinearOperator.from_product(P)
    assert torch.equal(torch.get_rng_state(), state) and op.seed is None
    n = op.shape[0]
    np.testing.assert_allclose(_dense_of(op), P.matmat(torch.eye(n, dtype=F64)).numpy(), **EXACT)


def test_default_seed_follows_torch_manual_seed():
    model, loss_fn, x, y = _case("mse_mean")
    torch.manual_seed(123)
    a = MCFisherLinearOperator(model, loss_fn, (x, y))
    torch.manual_seed(123)
    b = MCFisherLinearOperator(model, loss_fn, (x, y))
    v = np.ones(a.shape[0])
    assert a.seed == b.seed
    np.testing.assert_array_equal(a @ v, b @ v)


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (nn.L1Loss(), "got nn.L1Loss"),
        (nn.NLLLoss(), "got nn.NLLLoss"),
        (F.huber_loss, "got torch.nn.functional.huber_loss"),
        (nn.CrossEntropyLoss(weight=torch.ones(3, dtype=F64)), "CrossEntropyLoss with `weight`"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "with `label_smoothing`"),
        (functools.partial(F.cross_entropy, label_smoothing=0.1), "with `label_smoothing`"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "with `pos_weight`"),
        (lambda o, t: (o.softmax(1) - F.one_hot(t, 3)).abs().mean(), "node is MeanBackward0"),
    ],
)
def test_unsupported_losses_are_refused(loss_fn, match):
    model, _, x, y = _case("ce_mean")
    y = y.clamp(min=0)
    with pytest.raises(ValueError, match=match) as err:
        MCFisherLinearOperator(model, loss_fn, (x, y))
    assert "nn.CrossEntropyLoss" in str(err.value)  # says what is supported


def test_unsupported_loss_products_are_refused():
    model, _, x, y = _case("mse_mean")
    out = model(x)
    params = list(model.parameters())
    with pytest.raises(ValueError, match="node is HuberLossBackward0"):
        MCFisherProduct(F.huber_loss(out, y), out, params)
    both = F.mse_loss(out, y) + out.abs().mean()  # two terms of `out`: not one likelihood
    with pytest.raises(ValueError, match="node is AddBackward0"):
        MCFisherProduct(both, out, params)
    # a weight penalty is no part of the likelihood: the draw is the MSE's, as the GGN's H_l is
    reg = F.mse_loss(out, y) + sum(p.square().sum() for p in params)
    assert MCFisherProduct(reg, out, params).sampled_targets.shape == (1, *out.shape)
    with pytest.raises(TypeError, match="one tensor"):
        MCFisherProduct(F.mse_loss(out, y), (out,), params)
    with pytest.raises(TypeError, match="torch.Generator"):
        MCFisherProduct(F.mse_loss(out, y), out, params, generator=0)


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_mc_samples_are_refused(value, error):
    model, loss_fn, x, y = _case("mse_mean")
    with pytest.raises(error, match=f"`mc_samples` must be an int.*{value!r}"):
        MCFisherLinearOperator(model, loss_fn, (x, y), mc_samples=value)
    out = model(x)
    with pytest.raises(error, match="`mc_samples`"):
        MCFisherProduct(loss_fn(out, y), out, list(model.parameters()), mc_samples=value)


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (1.5, TypeError)])
def test_bad_seed_is_refused(value, error):
    model, loss_fn, x, y = _case("mse_mean")
    with pytest.raises(error, match=f"`seed` must be an int.*{value!r}"):
        MCFisherLinearOperator(model, loss_fn, (x, y), seed=value)


# --------------------------------------------------------------------------------------------
# HessianFree(curvature='fisher_mc')
# --------------------------------------------------------------------------------------------
def _classification(seed: int = 0):
    torch.manual_seed(seed)
    X = torch.randn(64, 5, dtype=F64)
    y = (X @ torch.randn(5, 3, dtype=F64)).argmax(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, X, y


def _train(curvature: str, seed: int, steps: int = 5) -> tuple[list[float], torch.Tensor]:
    model, X, y = _classification()
    # precond=None: no preconditioner probes, so the seed enters through the MC labels alone
    opt = HessianFree(
        model.parameters(), curvature=curvature, cg_max_iter=10, seed=seed, precond=None
    )

    def closure():
        out = model(X)
        return F.cross_entropy(out, y), out

    state = torch.get_rng_state()
    losses = [float(opt.step(closure)) for _ in range(steps)]
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is not drawn from
    return losses, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_optimizer_fisher_mc_trains_with_labels_from_its_own_seed():
    losses, theta = _train("fisher_mc", seed=0)
    assert losses[-1] < 0.5 * losses[0]
    _, again = _train("fisher_mc", seed=0)
    assert torch.equal(again, theta)
    _, other = _train("fisher_mc", seed=1)  # other labels, other steps
    assert not torch.allclose(other, theta)
    _, ggn = _train("ggn", seed=0)
    assert not torch.allclose(ggn, theta)
    assert torch.equal(_train("ggn", seed=1)[1], ggn)  # the seed reaches nothing else


def test_optimizer_fisher_mc_refuses_what_it_cannot_sample():
    model, X, y = _classification()
    before = [p.detach().clone() for p in model.parameters()]
    opt = HessianFree(model.parameters(), curvature="fisher_mc")
    with pytest.raises(ValueError, match="node is HuberLossBackward0"):
        opt.step(lambda: (F.huber_loss(model(X), F.one_hot(y, 3).to(F64)), model(X)))
    with pytest.raises(ValueError, match="curvature='fisher_mc' needs the model outputs"):
        opt.step(lambda: F.cross_entropy(model(X), y))
    with pytest.raises(ValueError, match="curvature='fisher_mc' needs one outputs tensor"):
        opt.step(lambda: (F.cross_entropy(model(X), y), (model(X),)))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="'fisher_mc'"):  # the choices name it
        HessianFree(model.parameters(), curvature="mc_fisher")


def test_optimizer_fisher_mc_resumes_its_draws_from_a_state_dict():
    model, X, y = _classification()

    def closure_of(m):
        def closure():
            out = m(X)
            return F.cross_entropy(out, y), out

        return closure

    def make(m):
        return HessianFree(m.parameters(), curvature="fisher_mc", cg_max_iter=10, precond=None)

    opt = make(model)
    for _ in range(3):
        opt.step(closure_of(model))
    copy = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    copy.load_state_dict(model.state_dict())
    resumed = make(copy)
    resumed.load_state_dict(opt.state_dict())
    for _ in range(3):  # the same labels only if the generator's state came along
        opt.step(closure_of(model))
        resumed.step(closure_of(copy))
    for p, q in zip(model.parameters(), copy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fisher_mc_on_sharded_ranks_draws_from_seed_step_and_rank():
    """Data parallel with sharded curvature batches, every rank drew 'fisher_mc''s labels from
    the optimizer's generator, the same numbers on every shard. Now from a generator seeded by
    (seed, step, rank): the ranks differ, a step redraws the same. One process, or replicated
    batches (whose products must agree across ranks): the optimizer's generator, as before.
    (tests/test_distributed.py runs it on two gloo ranks, marked slow.)"""
    import types

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    cpu = torch.device("cpu")

    def draws(opt, rank, world=2):
        opt._avg = types.SimpleNamespace(world_size=world, rank=rank)
        return torch.rand(4, generator=opt._mc_generator(cpu))

    opt = HessianFree(model.parameters(), curvature="fisher_mc", seed=3)
    assert opt._mc_generator(cpu) is opt._rng(cpu)  # one process
    opt.step(lambda: (F.cross_entropy(out := model(x), y), out))
    a, b = draws(opt, 0), draws(opt, 1)
    assert not torch.equal(a, b) and torch.equal(a, draws(opt, 0))
    for rank, got in enumerate((a, b)):
        want = torch.Generator().manual_seed(_batch_seed(3, 1, rank))  # after one step
        assert torch.equal(got, torch.rand(4, generator=want))
    replicated = HessianFree(
        model.parameters(), curvature="fisher_mc", seed=3, curvature_batch="replicated"
    )
    replicated._avg = types.SimpleNamespace(world_size=2, rank=1)
    assert replicated._mc_generator(cpu) is replicated._rng(cpu)
