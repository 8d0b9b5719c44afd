"""``replay_rng``: every closure call of a step draws the same random numbers (hessfree/_rng.py).

Oracles: masks recorded by a forward hook, ρ recomputed by hand in float64 with the first
call's mask fixed (the actual change by a hand-written forward, the predicted change from an
explicit Jacobian and loss Hessian from ``torch.autograd.functional``), and the global
generator's state after one plain forward from the step's start state.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian

from hessfree import HessianFree
from hessfree._rng import StepStream

P_DROP = 0.5


def _dropout_problem():
    """A float64 tanh MLP with Dropout(0.5) in training mode, its data, and a mask recorder."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(P_DROP), nn.Linear(6, 1)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 1, dtype=torch.float64)
    masks: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda m, inp, out: masks.append((out != 0).detach().clone()))
    return model, x, y, masks


def _closure(model, x, y):
    def closure():
        out = model(x)
        return F.mse_loss(out, y), out

    return closure


@pytest.mark.parametrize("replay", [True, False], ids=["replay", "opt-out"])
def test_every_closure_call_of_a_step_sees_the_first_calls_dropout_mask(replay):
    model, x, y, masks = _dropout_problem()
    opt = HessianFree(model.parameters(), precond=None, replay_rng=replay)
    # dropout alone is no reason to warn when its mask is replayed; else the old warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(_closure(model, x, y), curvature_closure=_closure(model, x[:4], y[:4]))
    assert [str(w.message) for w in caught if "replay_rng=True" in str(w.message)] == (
        [] if replay else [str(caught[0].message)]
    )
    calls = opt.last_step.closure_calls
    assert calls >= 3 and len(masks) == calls  # graph, curvature, then ρ, line search, ...
    gradient_batch = [m for m in masks if len(m) == len(x)]
    same = [torch.equal(m, gradient_batch[0]) for m in gradient_batch]
    # the curvature batch's rows are the first 4: CPU dropout fills the mask row by row
    same.append(torch.equal(masks[1], gradient_batch[0][:4]))
    if replay:
        assert all(same)
    else:  # each call draws afresh (the old behaviour)
        assert not all(same[1:])


def test_rho_is_the_ratio_of_one_masked_function():
    model, x, y, masks = _dropout_problem()
    opt = HessianFree(model.parameters(), precond=None, damping=1.0)
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt.step(_closure(model, x, y))
    info = opt.last_step
    assert info.accepted and info.step_rate > 0
    step = (torch.cat([p.detach().flatten() for p in model.parameters()]) - theta0) / info.step_rate
    scale = masks[0].double() / (1 - P_DROP)  # the first call's mask, fixed by hand

    def outputs(theta):
        w1, b1 = theta[:18].view(6, 3), theta[18:24]
        w2, b2 = theta[24:30].view(1, 6), theta[30:31]
        return (torch.tanh(x @ w1.T + b1) * scale) @ w2.T + b2

    def f(theta):
        return F.mse_loss(outputs(theta), y)

    J = jacobian(outputs, theta0).reshape(len(x), -1)  # one output per example
    H_L = hessian(lambda o: F.mse_loss(o.view(-1, 1), y), outputs(theta0).flatten())
    g = jacobian(f, theta0)
    predicted = float(g @ step + 0.5 * step @ (J.T @ H_L @ J) @ step)
    actual = float(f(theta0 + step) - f(theta0))
    assert info.predicted_change == pytest.approx(predicted, rel=1e-8)
    assert info.rho == pytest.approx(actual / predicted, rel=1e-6)


def test_generator_after_a_step_is_where_one_forward_leaves_it():
    model, x, y, _ = _dropout_problem()
    closure = _closure(model, x, y)
    drawn: list[torch.Tensor] = []
    opt = HessianFree(model.parameters(), callback=lambda info: drawn.append(torch.rand(2)))
    reference = _dropout_problem()[0]  # same weights, never stepped
    start = torch.get_rng_state()
    opt.step(closure)
    assert opt.last_step.closure_calls >= 2
    after = torch.rand(3)
    torch.set_rng_state(start)
    _closure(reference, x, y)()  # one forward from the step's start state
    torch.testing.assert_close(torch.rand(2), drawn[0], rtol=0, atol=0)  # the callback's draw
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)


def test_noise_in_an_lbfgs_style_closure_is_replayed():
    # randomness outside any module (torch.randn in the closure), a closure calling backward()
    torch.manual_seed(0)
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    noises: list[torch.Tensor] = []

    def closure():
        opt.zero_grad()
        noise = torch.randn(2, dtype=torch.float64)
        noises.append(noise)
        loss = 0.5 * theta @ A @ theta - (1 + noise) @ theta
        loss.backward()
        return loss

    opt = HessianFree([theta], damping=1e-3)
    opt.step(closure)
    assert len(noises) == opt.last_step.closure_calls >= 2
    assert all(torch.equal(n, noises[0]) for n in noises)
    # one quadratic per step: ρ of the exact Hessian model is 1 up to rounding
    assert opt.last_step.rho == pytest.approx(1.0, abs=1e-9)


def test_a_closure_without_randomness_runs_bitwise_as_without_replay():
    runs = []
    for replay in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
        opt = HessianFree(model.parameters(), replay_rng=replay)
        start = torch.get_rng_state()
        infos = []
        for _ in range(3):
            opt.step(_closure(model, x, y))
            infos.append((opt.last_step.rho, opt.last_step.loss_after))
        assert torch.equal(torch.get_rng_state(), start)  # nothing drawn, nothing moved
        runs.append(([p.detach().clone() for p in model.parameters()], infos))
    (p1, i1), (p2, i2) = runs
    assert i1 == i2 and all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_replay_rng_must_be_a_bool(value):
    with pytest.raises(TypeError, match=rf"`replay_rng` must be a bool, got .*{value!r}"):
        HessianFree([torch.zeros(1, requires_grad=True)], replay_rng=value)


def test_step_stream_puts_back_where_the_first_call_left_it_once():
    stream = StepStream([torch.device("cpu")])
    stream.before_call()
    a = torch.rand(2)
    stream.after_call()
    after_first = torch.get_rng_state()
    stream.before_call()
    b = torch.rand(2)
    stream.after_call()
    assert torch.equal(a, b)
    torch.rand(5)  # the later calls' draws are undone
    stream.leave()
    assert torch.equal(torch.get_rng_state(), after_first)
    torch.rand(1)  # e.g. a callback's draw: a second leave() keeps it
    drawn = torch.get_rng_state()
    stream.leave()
    assert torch.equal(torch.get_rng_state(), drawn)
