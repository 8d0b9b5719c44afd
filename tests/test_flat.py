"""Flat views of parameter lists."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessfree import ParamLayout, trainable


def test_split_returns_views_and_cat_inverts_it():
    layout = ParamLayout([torch.zeros(2, 3), torch.zeros(4)])
    v = torch.arange(10.0)
    parts = layout.split(v)
    assert [p.shape for p in parts] == [(2, 3), (4,)]
    assert all(p.data_ptr() >= v.data_ptr() for p in parts)
    parts[1][0] = -1.0  # a view: writes reach v
    assert v[6] == -1.0
    assert torch.equal(layout.cat(parts), v)
    assert torch.equal(layout.cat([None, torch.ones(4)]), torch.tensor([0.0] * 6 + [1.0] * 4))


def test_trainable_skips_frozen_and_keeps_order():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    model[0].bias.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [id(p) for p in trainable(model)] == [
        id(dict(model.named_parameters())[n]) for n in names
    ]


def test_layout_errors():
    with pytest.raises(ValueError, match="share one dtype"):
        ParamLayout([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="empty"):
        ParamLayout([])
    with pytest.raises(ValueError, match="No parameter requires gradients"):
        trainable([torch.zeros(2)])
    with pytest.raises(TypeError, match=r"`params\[1\]` must be a torch.Tensor, got int"):
        trainable([torch.zeros(1, requires_grad=True), 3])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: trainable(3), r"`params` must be an nn.Module, a tensor or an iterable"),
        (lambda: ParamLayout([torch.zeros(2), 1.0]), r"`params\[1\]` must be a torch.Tensor"),
    ],
)
def test_non_tensor_params_are_named(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_cat_makes_sparse_gradients_dense():
    layout = ParamLayout([torch.zeros(3, 2), torch.zeros(2)])
    sparse = torch.sparse_coo_tensor([[1], [0]], [5.0], (3, 2), check_invariants=True)
    flat = layout.cat([sparse, None])
    assert torch.equal(flat, torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]))


def test_a_parameter_listed_twice_is_refused_by_layouts_products_and_operators():
    # Listed twice, a tensor was two coordinates: H came out as [[A, A], [A, A]], silently.
    from hessfree import HessianLinearOperator, HessianProduct

    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    match = r"`params\[2\]` is the same tensor as `params\[0\]`"
    with pytest.raises(ValueError, match=match):
        ParamLayout([w, torch.zeros(1), w])
    with pytest.raises(ValueError, match=match):
        HessianProduct((w**3).sum(), [w, w * 1.0, w])
    model = nn.Linear(2, 1, bias=False).double()
    data = (torch.eye(2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`params\[1\]` is the same tensor as `params\[0\]`"):
        HessianLinearOperator(model, nn.MSELoss(), data, params=[model.weight, model.weight])
