"""``replay_rng``: a step's model calls share one random draw, its trial calls another
(hessfree/_rng.py).

Oracles: masks recorded by a forward hook; ρ recomputed by hand in float64 with the masks fixed
(the predicted change from an explicit Jacobian and loss Hessian from
``torch.autograd.functional`` under the model calls' mask, the actual change by a hand-written
forward under the trials' mask); a closed-form noisy quadratic; the global generator's state
after two plain forwards from the step's start state.
"""

from __future__ import annotations

import warnings

import numpy as np
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
def test_model_calls_share_one_dropout_mask_and_trial_calls_another(replay):
    model, x, y, masks = _dropout_problem()
    opt = HessianFree(model.parameters(), precond=None, replay_rng=replay)
    # dropout alone is no reason to warn when its masks are replayed; else the old warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(_closure(model, x, y), curvature_closure=_closure(model, x[:4], y[:4]))
    assert [str(w.message) for w in caught if "replay_rng=True" in str(w.message)] == (
        [] if replay else [str(caught[0].message)]
    )
    calls = opt.last_step.closure_calls
    # gradient, curvature (its batch's rows are the first 4: CPU dropout fills row by row),
    # then the trials: f(θ0) under their mask (replay only), ρ, line search, ...
    assert calls >= (4 if replay else 3) and len(masks) == calls
    model_calls = [masks[0], masks[1]]
    trials = masks[2:]
    if replay:
        assert torch.equal(masks[1], masks[0][:4])
        assert all(torch.equal(m, trials[0]) for m in trials)
        assert not torch.equal(trials[0], masks[0])  # a fresh draw, not the fitted mask
    else:  # each call draws afresh (the old behaviour)
        assert not torch.equal(model_calls[1], model_calls[0][:4])
        assert not torch.equal(trials[0], model_calls[0])


def test_rho_is_the_ratio_of_the_trial_masks_change_to_the_model_masks_prediction():
    model, x, y, masks = _dropout_problem()
    opt = HessianFree(model.parameters(), precond=None, damping=1.0, replay_rng=True)
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt.step(_closure(model, x, y))
    info = opt.last_step
    assert info.accepted and info.step_rate > 0
    step = (torch.cat([p.detach().flatten() for p in model.parameters()]) - theta0) / info.step_rate

    def outputs(theta, mask):
        w1, b1 = theta[:18].view(6, 3), theta[18:24]
        w2, b2 = theta[24:30].view(1, 6), theta[30:31]
        return (torch.tanh(x @ w1.T + b1) * mask.double() / (1 - P_DROP)) @ w2.T + b2

    def f(theta, mask):
        return F.mse_loss(outputs(theta, mask), y)

    fitted, trial = masks[0], masks[1]  # the first call's mask and the trials' (fixed by hand)
    assert all(torch.equal(m, trial) for m in masks[1:])
    J = jacobian(lambda t: outputs(t, fitted), theta0).reshape(len(x), -1)
    H_L = hessian(lambda o: F.mse_loss(o.view(-1, 1), y), outputs(theta0, fitted).flatten())
    g = jacobian(lambda t: f(t, fitted), theta0)
    predicted = float(g @ step + 0.5 * step @ (J.T @ H_L @ J) @ step)
    actual = float(f(theta0 + step, trial) - f(theta0, trial))
    assert info.predicted_change == pytest.approx(predicted, rel=1e-8)
    assert info.rho == pytest.approx(actual / predicted, rel=1e-6)


def test_generator_after_a_step_is_where_two_forwards_leave_it():
    model, x, y, _ = _dropout_problem()
    closure = _closure(model, x, y)
    drawn: list[torch.Tensor] = []
    opt = HessianFree(
        model.parameters(), callback=lambda info: drawn.append(torch.rand(2)), replay_rng=True
    )
    reference = _dropout_problem()[0]  # same weights, never stepped
    start = torch.get_rng_state()
    opt.step(closure)
    assert opt.last_step.closure_calls >= 3
    after = torch.rand(3)
    torch.set_rng_state(start)
    _closure(reference, x, y)()  # two forwards from the step's start state: the model call's
    _closure(reference, x, y)()  # draw and the trials' draw
    torch.testing.assert_close(torch.rand(2), drawn[0], rtol=0, atol=0)  # the callback's draw
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)


def test_noise_in_an_lbfgs_style_closure_gives_the_closed_form_rho():
    # randomness outside any module (torch.randn in the closure), a closure calling backward():
    # f(θ; n) = ½θᵀAθ - (1 + n)ᵀθ, fitted with n₁, measured with n₂ at θ0 = 0, so
    # ρ = 1 + (n₁ - n₂)ᵀp / (q(p) - q(0)) exactly
    torch.manual_seed(0)
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    noises: list[torch.Tensor] = []

    def closure():
        opt.zero_grad()
        noise = 0.1 * torch.randn(2, dtype=torch.float64)
        noises.append(noise)
        loss = 0.5 * theta @ A @ theta - (1 + noise) @ theta
        loss.backward()
        return loss

    opt = HessianFree([theta], damping=1e-3, replay_rng=True)
    opt.step(closure)
    info = opt.last_step
    assert len(noises) == info.closure_calls >= 3
    n1, n2 = noises[0], noises[1]
    assert all(torch.equal(n, n2) for n in noises[1:]) and not torch.equal(n1, n2)
    p = theta.detach() / info.step_rate
    predicted = float(-(1 + n1) @ p + 0.5 * p @ A @ p)
    assert info.predicted_change == pytest.approx(predicted, rel=1e-9)
    assert info.rho == pytest.approx(1 + float((n1 - n2) @ p) / predicted, rel=1e-9)


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
            info = opt.last_step
            infos.append((info.rho, info.loss_after, info.closure_calls))  # no extra call
        assert torch.equal(torch.get_rng_state(), start)  # nothing drawn, nothing moved
        runs.append(([p.detach().clone() for p in model.parameters()], infos))
    (p1, i1), (p2, i2) = runs
    assert i1 == i2 and all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_replay_rng_must_be_a_bool(value):
    with pytest.raises(TypeError, match=rf"`replay_rng` must be a bool, got .*{value!r}"):
        HessianFree([torch.zeros(1, requires_grad=True)], replay_rng=value)


def test_step_stream_replays_model_and_trial_draws_and_leaves_once():
    stream = StepStream([torch.device("cpu")])
    draws = []
    for trial in (False, True, False, True):
        stream.before_call(trial=trial)
        draws.append(torch.rand(2))
        stream.after_call()
        if len(draws) == 2:
            after_trial = torch.get_rng_state()
    assert torch.equal(draws[0], draws[2]) and torch.equal(draws[1], draws[3])
    assert not torch.equal(draws[0], draws[1])
    stream.leave()  # where the first trial call left the stream
    assert torch.equal(torch.get_rng_state(), after_trial)
    torch.rand(1)  # e.g. a callback's draw: a second leave() keeps it
    drawn = torch.get_rng_state()
    stream.leave()
    assert torch.equal(torch.get_rng_state(), drawn)


def test_step_stream_leaves_a_stream_nothing_drew_from_alone():
    stream = StepStream([torch.device("cpu")])
    stream.before_call(trial=False)
    stream.after_call()
    start = torch.get_rng_state()
    assert not stream.drew
    torch.rand(1)  # drawn between calls, e.g. by a callable preconditioner: kept
    moved = torch.get_rng_state()
    stream.before_call(trial=True)
    stream.after_call()
    stream.leave()
    assert torch.equal(torch.get_rng_state(), moved) and not torch.equal(moved, start)


def _noisy_quadratic(scale: float, level: float, b: float = 1.0):
    """f(θ; n) = ½θᵀAθ - (b + scale·n₁:₃)ᵀθ + level·n₀ with n ~ N(0, I) drawn per call
    (torch.randn in an LBFGS-style closure), θ0 = 0; the draws are recorded."""
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    noises: list[torch.Tensor] = []

    def closure(opt):
        opt.zero_grad()
        n = torch.randn(3, dtype=torch.float64)
        noises.append(n)
        loss = 0.5 * theta @ A @ theta - (b + scale * n[1:]) @ theta + level * n[0]
        loss.backward()
        return loss

    return A, theta, noises, closure


@pytest.mark.parametrize("level", [0.0, 100.0], ids=["no level noise", "level noise"])
def test_a_poor_rho_within_the_mask_noise_keeps_damping(level):
    # closed form at θ0 = 0: the mask noise ν = |f(0; n¹) - f(0; n²)| = level·|n¹₀ - n²₀|, the
    # deviation Δf - Δq = scale·(n¹ - n²)₁:₃ᵀp; ρ < ¼ raises λ by Nielsen's factor (×1.5 more
    # if the step is rejected) unless |Δf - Δq| <= ν, then λ stays
    torch.manual_seed(3)
    A, theta, noises, closure = _noisy_quadratic(scale=1.0, level=level, b=0.05)
    lam = 1.0
    opt = HessianFree([theta], damping=lam, relative_min_damping=0.0, replay_rng=True)
    opt.step(lambda: closure(opt))
    info = opt.last_step
    n1, n2 = noises[0], noises[1]
    assert all(torch.equal(n, n2) for n in noises[1:]) and not torch.equal(n1, n2)
    p = opt.state[theta]["warm_start"]  # CG's last iterate: 2-D, no earlier one stored
    predicted = float(-(0.05 + n1[1:]) @ p + 0.5 * p @ A @ p)
    assert info.predicted_change == pytest.approx(predicted, rel=1e-9)
    assert info.rho < 0.25  # the case the rule is about (seeded)
    nu = level * abs(float(n1[0] - n2[0]))
    assert opt.state[theta]["mask_noise_sq"] == pytest.approx(nu**2, rel=1e-9, abs=1e-30)
    deviation = float((n1 - n2)[1:] @ p)  # Δf - Δq: the level noise cancels within a draw
    if abs(deviation) <= nu:
        expected = lam
    else:
        rho = info.rho
        expected = lam * (2.0 if rho <= 0 else 1.0 - (2.0 * rho - 1.0) ** 3)
        expected *= 1.5 if info.step_rate == 0 else 1.0
    assert (level > 0) == (expected == lam)  # both branches are reached
    assert info.next_damping == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("hold", [True, False], ids=["hold", "as before dropdefault"])
def test_damping_stays_bounded_when_noise_dominates_the_gradient(hold):
    # E f(θ; n) = ½θᵀAθ - 1ᵀθ, minimised at θ* = A⁻¹1 (numpy's solve); near θ* the gradient is
    # all noise, ρ → g₂ᵀg₁/‖g₁‖² < ¼, and without the hold λ climbed every step and froze θ
    torch.manual_seed(0)
    A, theta, _, closure = _noisy_quadratic(scale=1.0, level=0.3)
    opt = HessianFree([theta], replay_rng=True)
    opt._hold_within_noise = hold
    damping = []
    for _ in range(60):
        opt.step(lambda: closure(opt))
        damping.append(opt.last_step.next_damping)
    optimum = np.linalg.solve(A.numpy(), np.ones(2))
    distance = np.linalg.norm(theta.detach().numpy() - optimum)
    assert (max(damping) < 100.0 and distance < 0.2) == hold  # ‖θ0 - θ*‖ = 0.45


def test_replay_is_the_default():
    # HessianFree(params): the trials share one dropout mask, another than the model call's
    model, x, y, masks = _dropout_problem()
    opt = HessianFree(model.parameters(), precond=None)
    opt.step(_closure(model, x, y))
    assert opt.last_step.closure_calls >= 3 and len(masks) == opt.last_step.closure_calls
    assert all(torch.equal(m, masks[1]) for m in masks[1:]) and not torch.equal(masks[0], masks[1])
