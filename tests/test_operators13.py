"""The SciPy operators under uses no earlier round tried (operators13), each against an oracle.

Oracles: explicit float64 Hessians of the loss (``torch.autograd.functional``), the device
each tensor reaches the model on (``meta`` stands in for a GPU: the same ``Tensor.to`` path
moves them), the running statistics a model had before, and the graph-walk answer outside
inference mode. Every test is seeded and deterministic.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
)
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


# --------------------------------------------------------------------------------------------
# 2. Iterables over one shared one-shot source (fail on main 7a90377)
def _batches(k: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(4, 3, generator=g, dtype=torch.float64),
            torch.randn(4, 2, generator=g).double(),
        )
        for _ in range(k)
    ]


class _FreshGenerators:
    """``__iter__`` makes a new generator on every call, over one iterator made once."""

    def __init__(self, batches: list) -> None:
        self.source = iter(batches)

    def __iter__(self):  # noqa: ANN204
        return (b for b in self.source)


class _SharedStream(torch.utils.data.IterableDataset):
    def __init__(self, batches: list) -> None:
        self.source = iter([row for x, y in batches for row in zip(x, y, strict=True)])

    def __iter__(self):  # noqa: ANN204
        return (row for row in self.source)


@pytest.mark.parametrize("kind", ["iterable", "dataloader"])
def test_operators13_fresh_generators_over_one_source_are_refused(kind: str) -> None:
    # main: built, then the first product missed the batch the constructor read (0.75 max abs
    # off the Hessian of all the data) and the second found no batches
    torch.manual_seed(0)
    model, batches = nn.Linear(3, 2).double(), _batches()
    if kind == "iterable":
        data = _FreshGenerators(batches)
    else:
        data = torch.utils.data.DataLoader(_SharedStream(batches), batch_size=4)
    with pytest.raises(TypeError, match=r"iterated only once: a first pass .* yielded 3 batch"):
        HessianLinearOperator(model, nn.MSELoss(), data)


class _Dwindling:
    """Re-iterable, but drops its last batch once ``drop`` is set (a changing source)."""

    def __init__(self, batches: list) -> None:
        self.batches, self.drop = batches, False

    def __iter__(self):  # noqa: ANN204
        return iter(self.batches[:-1] if self.drop else self.batches)


def test_operators13_a_pass_with_fewer_batches_is_refused() -> None:
    torch.manual_seed(0)
    model, batches = nn.Linear(3, 2).double(), _batches()
    data = _Dwindling(batches)
    H = GGNLinearOperator(model, nn.MSELoss(), data)
    reference = GGNLinearOperator(model, nn.MSELoss(), batches)
    v = np.linspace(-1.0, 1.0, 8)
    np.testing.assert_array_equal(H @ v, reference @ v)  # same batches, same sum
    data.drop = True  # main: silently the GGN of 2 of the 3 batches
    with pytest.raises(RuntimeError, match=r"yielded 2 batch\(es\) in this pass but 3"):
        H @ v


# --------------------------------------------------------------------------------------------
# 3. Two threads, two operators, one train-mode BatchNorm model (fails on main 7a90377)
def test_operators13_threads_overlapping_out_of_order_leave_running_statistics_alone() -> None:
    """Thread a's first forward pass waits (after BatchNorm) for thread b's to start; b's
    waits for a's to return. On main that order left a's clone, with a's batch statistics,
    in the module (running_mean moved 0.041, num_batches_tracked 1). With the lock b cannot
    start until a's forward returns: a's wait ends by its timeout (a deadlock guard, not a
    measurement) and the order becomes a-then-b, whose outcome is the same on any machine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = _batches(2)
    role = threading.local()
    a_inside, b_inside, a_returned = threading.Event(), threading.Event(), threading.Event()

    def after_batchnorm(module: nn.Module, inputs: object) -> None:
        who = getattr(role, "name", None)
        if who == "a" and not a_inside.is_set():
            a_inside.set()
            b_inside.wait(0.5)
        elif who == "b" and not b_inside.is_set():
            b_inside.set()
            a_returned.wait(30.0)

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        if getattr(role, "name", None) == "a":
            a_returned.set()  # a's model call has returned (and put its buffers back)
        return nn.functional.mse_loss(outputs, targets)

    ops = {
        name: GGNLinearOperator(model, loss_fn, batches, allow_training_mode=True) for name in "ab"
    }
    v = np.linspace(-1.0, 1.0, ops["a"].shape[1])
    expected = ops["a"] @ v  # one thread: the products asked of both
    before = {k: b.clone() for k, b in model.named_buffers()}
    model[2].register_forward_pre_hook(after_batchnorm)
    results: dict[str, np.ndarray] = {}

    def run(name: str) -> None:
        role.name = name
        results[name] = ops[name] @ v

    a = threading.Thread(target=run, args=("a",))
    a.start()
    assert a_inside.wait(30.0)
    b = threading.Thread(target=run, args=("b",))
    b.start()
    a.join(60.0)
    b.join(60.0)
    for k, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, before[k], rtol=0, atol=0)
    for name in "ab":  # train mode: batch statistics, so the products are the same
        np.testing.assert_allclose(results[name], expected, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Complex outputs and parameters (fail on main 7a90377)
class _ComplexHead(nn.Module):
    """Real parameters, complex outputs ``l(x) + 2i tanh(l(x))``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        z = self.lin(x)
        return torch.complex(z, 2 * torch.tanh(z))


def _complex_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs - targets).abs().pow(2).mean()


def _flat_call(model: nn.Module, theta: Tensor, x: Tensor) -> Tensor:
    named = dict(model.named_parameters())
    parts = theta.split([p.numel() for p in named.values()])
    state = {k: t.view(p.shape) for (k, p), t in zip(named.items(), parts, strict=True)}
    return torch.func.functional_call(model, state, (x,))


def test_operators13_fisher_of_complex_outputs_matches_per_example_gradients() -> None:
    # main: 3.88 max abs off (entries up to 7.7): ⟨ĝ, Jv⟩ took the complex product, not Re(ĝ* Jv)
    model = _ComplexHead()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 3, generator=g).double(), torch.randn(10, 2, generator=g).double()
    F = FisherLinearOperator(model, _complex_loss, (x, y))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    grads = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda t, i=i: _complex_loss(_flat_call(model, t, x[i : i + 1]), y[i : i + 1]),
                theta,
            )
            for i in range(10)
        ]
    ).numpy()
    dense = grads.T @ grads / 10  # 'mean': (1/N) sum_i g_i g_i^T
    np.testing.assert_allclose(F @ np.eye(8), dense, rtol=1e-12, atol=1e-13)
    G = GGNLinearOperator(model, _complex_loss, (x, y))  # already right on main: a guard
    jac = torch.autograd.functional.jacobian(
        lambda t: torch.view_as_real(_flat_call(model, t, x)).reshape(-1), theta
    )
    loss_hessian = torch.autograd.functional.hessian(
        lambda r: _complex_loss(torch.view_as_complex(r.view(10, 2, 2)), y),
        torch.view_as_real(model(x)).detach().reshape(-1),
    )
    np.testing.assert_allclose(
        G @ np.eye(8), (jac.T @ loss_hessian @ jac).numpy(), rtol=1e-12, atol=1e-13
    )


def test_operators13_complex_outputs_and_parameters_are_refused_by_the_real_operators() -> None:
    # main: the Jacobian's products dropped the imaginary part (9.5 off the complex J v, a
    # ComplexWarning only); complex parameters gave real float64 products of a complex matrix
    model = _ComplexHead()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(4)).double()
    with pytest.raises(TypeError, match=r"complex \(torch.complex128\).*view_as_real"):
        JacobianLinearOperator(model, x)
    J = JacobianLinearOperator(lambda t: torch.view_as_real(model(t)), x, params=model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dense = torch.autograd.functional.jacobian(
        lambda t: torch.view_as_real(_flat_call(model, t, x)).reshape(-1), theta
    )
    np.testing.assert_allclose(J @ np.eye(8), dense.numpy(), rtol=1e-12, atol=1e-14)
    w = torch.randn(3, 2, dtype=torch.complex128).requires_grad_()
    data = (x.to(torch.complex128), torch.zeros(5, 2))
    with pytest.raises(TypeError, match=r"complex128: the operators are real"):
        HessianLinearOperator(lambda t: t @ w, _complex_loss, data, params=[w], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# SciPy's operator protocol: shape errors named also for 0-d arrays and the Jacobian's adjoint
def test_operators13_zero_dimensional_and_adjoint_shape_errors_are_named() -> None:
    # main: SciPy's "dimension mismatch", and "expected 1-d or 2-d array or matrix, got
    # array(...)" printing the whole array
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(5)).double()
    J = JacobianLinearOperator(model, x)
    with pytest.raises(ValueError, match=r"`x` must have shape \(10,\) or \(10, 1\) .* got \(5,\)"):
        J.T @ np.ones(5)
    with pytest.raises(ValueError, match=r"shape \(10,\) or \(10, k\) .* got \(10, 2, 2\)"):
        J.H @ np.ones((10, 2, 2))
    with pytest.raises(ValueError, match=r"shape \(26,\) or \(26, k\) .* got \(\)"):
        J @ np.array(1.0)
    assert J.T.T is J and J.H.H is J
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dense = torch.autograd.functional.jacobian(
        lambda t: _flat_call(model, t, x).reshape(-1), theta
    ).numpy()
    u = np.linspace(-1.0, 1.0, 10)
    np.testing.assert_allclose(J.T @ u, dense.T @ u, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(J.H.T @ np.ones(26), dense.sum(1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(J.T @ np.eye(10), dense.T, rtol=1e-12, atol=1e-14)
