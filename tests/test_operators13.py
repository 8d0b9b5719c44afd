"""The SciPy operators under uses no earlier round tried (operators13), each against an oracle.

Oracles: explicit float64 Hessians of the loss (``torch.autograd.functional``), the device
each tensor reaches the model on (``meta`` stands in for a GPU: the same ``Tensor.to`` path
moves them), the running statistics a model had before, and the graph-walk answer outside
inference mode. Every test is seeded and deterministic.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from hessfree import HessianLinearOperator, JacobianLinearOperator
from hessfree.curvature import _depends_on

Pair = collections.namedtuple("Pair", ["u", "v"])


@dataclasses.dataclass(frozen=True)
class Inputs:
    pair: Pair
    extra: dict


class _Structured(nn.Module):
    """Sums two linear maps of inputs nested as ``Inputs(Pair(u, [v]), {"w": w})`` and
    records the device every input tensor arrived on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
        self.seen: list[torch.device] = []

    def forward(self, x: Inputs) -> Tensor:
        u, (v,), w = x.pair.u, x.pair.v, x.extra["w"]
        self.seen += [u.device, v.device, w.device]
        return self.a(u) + self.b(v) + self.c(w)


def _structured_batch(rows: int = 5) -> tuple[Inputs, Tensor]:
    g = torch.Generator().manual_seed(1)
    u, v, w, y = (torch.randn(rows, k, generator=g, dtype=torch.float64) for k in (3, 3, 3, 2))
    return Inputs(Pair(u, [v]), collections.OrderedDict(w=w)), y


# --------------------------------------------------------------------------------------------
# 1. Tensors nested in the inputs reach the parameters' device (fails on main 7a90377)
@pytest.mark.parametrize("kind", ["hessian", "jacobian"])
def test_operators13_nested_input_tensors_move_to_the_parameters_device(kind: str) -> None:
    # meta parameters: every input tensor must be moved off the CPU for the model to run
    model = _Structured().double().to("meta")
    inputs, y = _structured_batch()
    if kind == "hessian":
        op = HessianLinearOperator(model, nn.MSELoss(), (inputs, y))
    else:
        op = JacobianLinearOperator(model, inputs)
    assert op.shape[1] == 24
    assert model.seen and all(d.type == "meta" for d in model.seen)


def test_operators13_nested_inputs_on_the_device_are_passed_as_given() -> None:
    """On the parameters' device nothing is rebuilt, and the products are the dense Hessian's."""
    model = _Structured().double()
    inputs, y = _structured_batch()
    received = []
    forward = model.forward
    model.forward = lambda x: received.append(x) or forward(x)  # type: ignore[method-assign]
    H = HessianLinearOperator(model, nn.MSELoss(), (inputs, y))
    assert received[0] is inputs
    params = [p.detach() for p in model.parameters()]
    shapes = [p.shape for p in params]

    def loss(theta: Tensor) -> Tensor:
        parts = theta.split([p.numel() for p in params])
        a_w, a_b, b_w, b_b, c_w, c_b = (t.view(s) for t, s in zip(parts, shapes, strict=True))
        u, (v,), w = inputs.pair.u, inputs.pair.v, inputs.extra["w"]
        out = u @ a_w.T + a_b + v @ b_w.T + b_b + w @ c_w.T + c_b
        return nn.functional.mse_loss(out, y)

    dense = torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in params]))
    np.testing.assert_allclose(H @ np.eye(24), dense.numpy(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# 4. curvature._depends_on under inference mode (fails on main 7a90377: AttributeError)
def test_operators13_depends_on_answers_inside_inference_mode() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    outside = model(torch.randn(3, 2))
    with torch.inference_mode():
        inside = model(torch.randn(3, 2))  # no graph: depends on nothing
        assert _depends_on([outside], list(model.parameters())) is True
        assert _depends_on([inside], list(model.parameters())) is False
    assert _depends_on([outside], list(model.parameters())) is True
