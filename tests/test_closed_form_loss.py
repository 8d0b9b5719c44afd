"""The closed-form loss Hessians are found where users' losses put them, and used.

Oracle: the float64 Hessian of the loss as a function of the outputs from
``torch.autograd.functional.hessian`` (and, for the GGN, explicit float64 Jacobians).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian

from hessfree import GGNProduct, MCFisherProduct, loss_hessian_product

EXACT = dict(rtol=1e-10, atol=1e-12)


def _dense_hl(loss_of, o):
    """The Hessian of ``loss_of(z)`` at ``z = o``, flattened (float64)."""
    return hessian(lambda z: loss_of(z.view(o.shape)), o.detach().reshape(-1))


def _check(loss_of, o, batched=True):
    hl = loss_hessian_product(loss_of(o), o)
    assert hl is not None, "closed form not recognised"
    HL = _dense_hl(loss_of, o)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(hl(w).reshape(-1), HL @ w.reshape(-1), **EXACT)
    if batched:
        W = torch.randn((3, *o.shape), generator=gen, dtype=torch.float64)
        torch.testing.assert_close(hl(W), torch.stack([hl(wi) for wi in W]), **EXACT)


def _outputs(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_() * 1.0


W_REG = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize(
    "form",
    ["reshape", "squeeze", "view1", "plus_const", "minus_const", "weight_penalty", "sub_alpha"],
)
def test_scalar_reshapes_constants_and_penalties_are_seen_through(form):
    o = _outputs(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])

    def loss_of(z):
        ce = F.cross_entropy(z, y)
        return {
            "reshape": ce.reshape(()),
            "squeeze": ce.reshape(1).squeeze(),
            "view1": ce.view(1),
            "plus_const": ce + 1.5,
            "minus_const": 0.5 * ce - 3.0,
            "weight_penalty": ce + 1e-2 * (W_REG**2).sum(),
            "sub_alpha": torch.sub(W_REG.abs().sum(), ce, alpha=2.5),  # -2.5 H_ce
        }[form]

    _check(loss_of, o)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_on_reshaped_sequence_logits(reduction):
    # a language model's loss: logits (N, T, V) viewed as (N*T, V), some targets ignored
    o = _outputs(2, 5, 4)
    y = torch.tensor([[0, 3, -100, 1, 2], [2, -100, -100, 0, 3]])
    for view in (lambda z: z.view(-1, 4), lambda z: z.reshape(10, 4), lambda z: z.flatten(0, 1)):
        _check(lambda z, v=view: F.cross_entropy(v(z), y.view(-1), reduction=reduction), o)


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 2), (2, 3, 2, 2, 2)])
def test_cross_entropy_with_extra_dimensions(shape):
    o = _outputs(*shape)
    gen = torch.Generator().manual_seed(4)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    y.view(-1)[::3] = 1  # ignore_index below: a third of the positions
    _check(lambda z: F.cross_entropy(z, y, ignore_index=1), o)


def test_elementwise_losses_on_a_reshape_of_the_outputs():
    o = _outputs(6, 1)
    t = torch.rand(6, dtype=torch.float64)
    _check(lambda z: F.binary_cross_entropy_with_logits(z.squeeze(-1), t), o)
    _check(lambda z: F.mse_loss(z.view(-1), t, reduction="sum"), o)


def test_what_is_not_a_closed_form_stays_unrecognised():
    o = _outputs(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    both = F.cross_entropy(o, y) + (o**2).mean()  # both terms depend on the outputs
    assert loss_hessian_product(both, o) is None
    assert loss_hessian_product(F.cross_entropy(o, y, label_smoothing=0.1), o) is None
    permuted = _outputs(2, 5, 3)  # a transpose is not a reshape
    ce = F.cross_entropy(permuted.transpose(1, 2), torch.zeros(2, 5, dtype=torch.long))
    assert loss_hessian_product(ce, permuted) is None
    sliced = F.mse_loss(o[:, :2], torch.zeros(5, 2, dtype=torch.float64))
    assert loss_hessian_product(sliced, o) is None


def _dense_ggn(model, x, loss_of):
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def out_of(theta):
        parts, i = {}, 0
        for n, p in zip(names, params, strict=True):
            parts[n] = theta[i : i + p.numel()].view_as(p)
            i += p.numel()
        return torch.func.functional_call(model, parts, (x,))

    o = out_of(flat)
    J = jacobian(out_of, flat).reshape(o.numel(), -1)
    HL = _dense_hl(loss_of, o.detach())
    return J.T @ HL @ J


@pytest.mark.parametrize("case", ["lm_view", "penalty", "reshaped_scalar"])
def test_ggn_product_uses_the_closed_form_and_matches_dense(case):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    y = torch.tensor([[0, 3, -100, 1, 2], [2, 1, -100, 0, 3]])
    weight = model[0].weight

    def loss_of(z):
        ce = F.cross_entropy(z.reshape(-1, 4), y.reshape(-1))
        if case == "penalty":
            return ce + 1e-3 * (weight**2).sum()
        return ce.reshape(()) if case == "reshaped_scalar" else ce

    out = model(x)
    G = GGNProduct(loss_of(out), out, list(model.parameters()))
    assert "_closed_form" in G._hl.__qualname__, "the GGN double-backwards through the loss"
    dense = _dense_ggn(model, x, loss_of)
    gen = torch.Generator().manual_seed(2)
    for v in torch.randn(3, dense.shape[0], generator=gen, dtype=torch.float64):
        torch.testing.assert_close(G(v), dense @ v, **EXACT)


def _assert_refused_and_exact(model, x, loss_of):
    """The closed form and MC-Fisher refuse the loss; the generic GGN product is exact."""
    out = model(x)
    assert loss_hessian_product(loss_of(out), out) is None
    G = GGNProduct(loss_of(out), out, list(model.parameters()))
    dense = _dense_ggn(model, x, loss_of)
    gen = torch.Generator().manual_seed(2)
    for v in torch.randn(3, dense.shape[0], generator=gen, dtype=torch.float64):
        torch.testing.assert_close(G(v), dense @ v, **EXACT)
    with pytest.raises(ValueError, match="Monte-Carlo Fisher"):
        MCFisherProduct(loss_of(out), out, list(model.parameters()))


@pytest.mark.parametrize("case", ["regroup", "split_classes"])
def test_nll_on_a_view_that_regroups_softmax_rows_is_exact(case):
    # log_softmax over (N, K), then a user's view to 4-D NLL input whose (examples, classes)
    # are not the softmax's: one NLL row's classes straddle softmax rows. The closed form once
    # took the classes for the softmax's (a wrong product) or failed to reshape the targets.
    torch.manual_seed(0)
    k, view, y = {
        "regroup": (3, (3, 3, 2, 1), torch.tensor([[[0], [0]], [[1], [2]], [[2], [0]]])),
        "split_classes": (8, (6, 4, 2, 1), torch.tensor([[0, 1], [3, 1], [0, 2]] * 2)[..., None]),
    }[case]
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, k)).double()
    x = torch.randn(6, 3, dtype=torch.float64)

    def loss_of(z):
        return F.nll_loss(F.log_softmax(z, 1).view(*view), y)

    _assert_refused_and_exact(model, x, loss_of)


def test_nll_on_views_that_keep_examples_and_classes_stays_closed_form():
    o = _outputs(3, 4, 2, 3)
    gen = torch.Generator().manual_seed(5)
    y = torch.randint(0, 4, (3, 6, 1), generator=gen)
    # (N, C, d, e) seen as (N, C, d*e, 1): the positions keep their row-major order
    _check(lambda z: F.nll_loss(F.log_softmax(z, 1).view(3, 4, 6, 1), y), o)


@pytest.mark.parametrize("case", ["mse_rolled", "bce_soft_self"])
def test_a_target_computed_from_the_outputs_is_exact(case):
    # The loss reaches the outputs through its target too (a consistency loss; a soft target
    # not detached). The closed forms differentiate the first input alone: MSE's 2I/m was
    # used, and BCE's diag(σ(1-σ))/m, for a loss Hessian that is neither.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)

    def loss_of(z):
        if case == "mse_rolled":
            return F.mse_loss(z, z.roll(1, 0))
        return F.binary_cross_entropy_with_logits(z, torch.sigmoid(z.flip(0)))

    _assert_refused_and_exact(model, x, loss_of)


def test_log_softmax_over_a_negative_dim_is_recognised():
    # LogSoftmaxBackward0 reads dim=-1 back as 2**64 - 1, so nll_loss(log_softmax(z, -1), y),
    # a common idiom, double-backwarded through the loss; the class dimension counted from
    # the end is recognised now, and a log_softmax over another dimension is still refused.
    y = torch.tensor([0, 2, 1, 1, 0])
    _check(lambda z: F.nll_loss(F.log_softmax(z, -1), y), _outputs(5, 3))
    y3 = torch.tensor([[0, 1], [2, 2], [1, 0]])
    _check(lambda z: F.nll_loss(F.log_softmax(z, -2), y3), _outputs(3, 3, 2))
    o = _outputs(3, 3, 2)
    assert loss_hessian_product(F.nll_loss(F.log_softmax(o, -1), y3 % 2), o) is None
