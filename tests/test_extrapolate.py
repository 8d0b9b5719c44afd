"""Step extrapolation (``extrapolate``), CG's objective check (``cg_stop_on_increase``) and
the cold CG retry after a warm start that gives no descent direction.

Oracles: closed forms (Newton on :math:`e^{-w}`), float64 NumPy evaluations of the objective
along the accepted step, and runs of the same optimizer with the feature off (bitwise).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hessfree import HessianFree, cg
from hessfree.cg import CGStop


# ------------------------------------------------------------------------------ objectives
def _separable(n: int = 40, d: int = 3, seed: int = 0):
    """Linearly separable data: logistic regression's loss falls like exp(-margin)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:d]
    y = (X @ w_true > 0).double()
    return X, y


def _logistic_np(X: torch.Tensor, y: torch.Tensor, w: np.ndarray) -> float:
    """Mean logistic loss in float64 NumPy (an evaluation independent of torch's)."""
    margins = (2 * y.numpy() - 1) * (X.numpy() @ w)
    return float(np.mean(np.logaddexp(0.0, -margins)))


def _logistic_closure(X, y, w):
    def closure():
        logits = X @ w
        return F.binary_cross_entropy_with_logits(logits, y), logits

    return closure


# ------------------------------------------------------------------------------ extrapolation
def test_extrapolation_on_exp_matches_closed_form():
    """f(w) = exp(-w): the damped Newton step is p = e^{-w} / (e^{-w} + λ) and ρ ≈ 1.26, so
    from the second step (the objective seen deterministic) every doubling lowers f and the
    step is 2^10 p; without extrapolation f only falls by about e per step."""
    runs = {}
    for extrapolate in ("auto", False):
        w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = HessianFree(  # cold CG (cg_decay=0): each step is the closed-form damped Newton p
            [w],
            damping=1e-3,
            adapt_damping=False,
            curvature="hessian",
            extrapolate=extrapolate,
            cg_decay=0.0,
        )
        history = []
        for _ in range(2):
            w0 = float(w.detach())
            opt.step(lambda w=w: torch.exp(-w).sum())
            history.append((w0, float(w.detach()), opt.last_step))
        runs[extrapolate] = history
    for extrapolate, history in runs.items():
        (w0, w1, first), (w1_, w2, second) = history
        assert w1_ == w1
        p0 = math.exp(-w0) / (math.exp(-w0) + 1e-3)
        assert first.step_rate == 1.0  # no evidence of determinism at the first step
        assert w1 == pytest.approx(w0 + p0, rel=1e-12)
        assert first.rho == pytest.approx((1 - math.exp(-p0)) / (p0 - p0**2 / 2), rel=1e-9)
        p1 = math.exp(-w1) / (math.exp(-w1) + 1e-3)
        rate = 2.0**10 if extrapolate == "auto" else 1.0
        assert second.step_rate == rate
        assert w2 == pytest.approx(w1 + rate * p1, rel=1e-12)
        assert second.loss_after == pytest.approx(math.exp(-w2), rel=1e-12, abs=1e-300)
    assert runs["auto"][1][2].loss_after < 1e-100 < runs[False][1][2].loss_after


def test_extrapolated_steps_stop_where_the_objective_stops_falling():
    X, y = _separable()
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([w])
    closure = _logistic_closure(X, y, w)
    extrapolated = 0
    for _ in range(8):
        before = w.detach().numpy().copy()
        opt.step(closure)
        info, after = opt.last_step, w.detach().numpy().copy()
        if info.status == "converged" and not info.accepted:  # max |g| <= tolerance_grad
            break
        assert info.accepted
        t = info.step_rate
        if t <= 1.0:
            continue
        extrapolated += 1
        assert math.log2(t).is_integer()
        p = (after - before) / t
        f = lambda s, b=before, p=p: _logistic_np(X, y, b + s * p)  # noqa: E731
        assert info.loss_after == pytest.approx(f(t), rel=1e-9)
        assert f(t) < f(t / 2)  # each accepted doubling lowered the objective
        assert t == 2.0**10 or not f(2 * t) < f(t)  # and the next one would not have
    assert extrapolated >= 2
    assert opt.state[w]["deterministic"] is True


def test_extrapolation_beats_plain_steps_on_separable_logistic_regression():
    X, y = _separable()
    final = {}
    for extrapolate in ("auto", False):
        w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = HessianFree([w], extrapolate=extrapolate)
        for _ in range(8):
            opt.step(_logistic_closure(X, y, w))
        final[extrapolate] = _logistic_np(X, y, w.detach().numpy())
    assert final["auto"] < 0.1 * final[False]  # 1.9e-4 vs 8.5e-3


@pytest.mark.parametrize("per", ["call", "step"])
def test_stochastic_objective_never_extrapolates(per):
    """Mini-batches (a new one per step, or per call): the start-of-step loss never equals
    the previous step's loss_after, so 'auto' never doubles, even where it would help."""
    X, y = _separable(n=200)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([w])
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        batch = torch.randperm(200, generator=gen)[:50]

        def closure(batch=batch):
            idx = torch.randperm(200, generator=gen)[:50] if per == "call" else batch
            logits = X[idx] @ w
            return F.binary_cross_entropy_with_logits(logits, y[idx]), logits

        opt.step(closure)
        assert opt.last_step.step_rate <= 1.0
    assert opt.state[w]["deterministic"] is False


def test_a_mismatch_turns_extrapolation_off_until_three_matches():
    """A mismatch turns 'auto' off; back on the full objective (a growing batch that reached
    the whole set) the first start differs from the mini-batch's loss_after, the next three
    match, and the third match turns it on again: the steps before double nothing, a later
    one does and lands lower (checked in float64 NumPy) than the same steps without."""
    X, y = _separable(n=200)
    runs = {}
    for extrapolate in ("auto", False):
        w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = HessianFree([w], extrapolate=extrapolate)
        full = _logistic_closure(X, y, w)
        for _ in range(2):
            opt.step(full)
        opt.step(_logistic_closure(X[:100], y[:100], w))  # another objective: a mismatch
        flags, rates = [], []
        for _ in range(8):
            opt.step(full)
            flags.append(opt.state[w].get("deterministic"))
            rates.append(opt.last_step.step_rate)
        runs[extrapolate] = (flags, rates, _logistic_np(X, y, w.detach().numpy()))
    flags, rates, f_auto = runs["auto"]
    assert flags[:3] == [False, False, False] and all(flags[3:])
    assert all(r <= 1.0 for r in rates[:3])
    assert max(rates[3:]) > 1.0
    _, rates_off, f_off = runs[False]
    assert all(r <= 1.0 for r in rates_off)
    assert f_auto < f_off


def test_alternating_objectives_never_turn_extrapolation_back_on():
    """Once a mismatch was seen: two matches then a mismatch, repeatedly (three steps per
    mini-batch): the count restarts at every mismatch, so 'auto' stays off and no step is
    doubled. (Without any mismatch before, the first batch's second step would count as
    deterministic, as before.)"""
    X, y = _separable(n=200)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([w])
    opt.step(_logistic_closure(X[150:], y[150:], w))
    for k in range(3):
        idx = torch.arange(50 * k, 50 * k + 50)
        closure = _logistic_closure(X[idx], y[idx], w)
        for _ in range(3):
            opt.step(closure)
            assert opt.last_step.step_rate <= 1.0
    assert opt.state[w]["deterministic"] is False


@pytest.mark.parametrize("beyond", [math.nan, math.inf, 10.0])
def test_rejected_doubling_leaves_the_accepted_step_bitwise(beyond):
    """The doubled trial lands where f is NaN, Inf or higher: the parameters are exactly
    those of the same step without extrapolation (the trial is undone bitwise)."""
    finals = []
    for extrapolate in (True, False):
        w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        opt = HessianFree(
            [w], damping=1e-6, adapt_damping=False, curvature="hessian", extrapolate=extrapolate
        )

        def closure(w=w):
            f = torch.exp(-w).sum()
            return torch.where(w.max() < 1.5, f, torch.full_like(f, beyond))

        opt.step(closure)
        info = opt.last_step
        assert info.accepted and info.step_rate == 1.0 and info.rho > 1.0
        finals.append((w.detach().clone(), info.loss_after))
    (w_on, f_on), (w_off, f_off) = finals
    assert torch.equal(w_on, w_off) and f_on == f_off
    assert float(w_on.max()) < 1.5


def test_extrapolate_settings_round_trip_and_bad_values():
    X, y = _separable()
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([w], extrapolate=False, cg_stop_on_increase=True)
    for _ in range(2):
        opt.step(_logistic_closure(X, y, w))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["extrapolate"] is False
    assert sd["param_groups"][0]["cg_stop_on_increase"] is True
    other = HessianFree([w])
    other.load_state_dict(sd)
    assert other.extrapolate is False and other.cg_stop_on_increase is True
    assert other.state[w]["deterministic"] is True  # the evidence travels with the state
    with pytest.raises(ValueError, match=r"`extrapolate` must be 'auto', True or False, got 'yes'"):
        HessianFree([w], extrapolate="yes")
    with pytest.raises(TypeError, match=r"`extrapolate` must be .* got int 1"):
        HessianFree([w], extrapolate=1)
    with pytest.raises(ValueError, match=r"`cg_stop_on_increase` must be 'auto', True or False"):
        HessianFree([w], cg_stop_on_increase="sometimes")
    with pytest.raises(TypeError, match=r"`cg_stop_on_increase` must be .* got NoneType"):
        HessianFree([w], cg_stop_on_increase=None)


# ------------------------------------------------------------------------------ CG's check
def test_cg_monitor_stops_at_the_grid_iterate_it_names():
    gen = torch.Generator().manual_seed(0)
    Q = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    A = Q @ Q.T + 0.1 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=gen, dtype=torch.float64)
    seen = []

    def monitor(i, x):
        seen.append(i)
        return i == 9

    for check_every in (1, 4):
        seen.clear()
        result = cg(
            lambda v: A @ v,
            b,
            rtol=0.0,
            progress_tol=None,
            monitor=monitor,
            check_every=check_every,
        )
        assert seen == [5, 7, 9]
        assert result.reason is CGStop.MONITOR and result.num_iter == 9
        plain = cg(lambda v: A @ v, b, rtol=0.0, progress_tol=None, max_iter=9)
        assert torch.equal(result.x, plain.x)
        assert result.iterations == [5, 7, 9]
    with pytest.raises(TypeError, match="`monitor` must be None or a callable"):
        cg(lambda v: A @ v, b, monitor=3)


def _mlp_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    return model, closure


def test_stop_on_increase_takes_the_step_of_cg_cut_at_that_iterate():
    """With the check, CG stops at the first stored iterate whose objective rose; the step is
    bitwise that of the same optimizer without the check and ``cg_max_iter`` = that
    iteration (so swapping the parameters for the checks left the products untouched)."""
    kw = dict(damping=1e-6, adapt_damping=False, cg_rtol=0.0, cg_progress_tol=1e-12)
    kw["precond"] = None  # plain CG, whose iterate here rises (K-FAC's does not)
    model, closure = _mlp_problem()
    opt = HessianFree(model.parameters(), cg_stop_on_increase=True, extrapolate=False, **kw)
    opt.step(closure)
    info = opt.last_step
    assert info.cg_reason == "monitor" and info.accepted
    checked = [p.detach().clone() for p in model.parameters()]

    model, closure = _mlp_problem()
    opt = HessianFree(
        model.parameters(),
        cg_stop_on_increase=False,
        extrapolate=False,
        cg_max_iter=info.cg_iters,
        **kw,
    )
    opt.step(closure)
    assert opt.last_step.cg_iters == info.cg_iters
    assert opt.last_step.loss_after == info.loss_after
    assert opt.last_step.backtrack_iter == info.backtrack_iter
    for a, b in zip(checked, model.parameters(), strict=True):
        assert torch.equal(a, b.detach())


def test_stop_on_increase_changes_nothing_where_the_objective_keeps_falling():
    """A convex quadratic: f falls along CG's path (from x0 = 0), so CG never stops early."""
    gen = torch.Generator().manual_seed(3)
    Q = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    A = Q @ Q.T / 40 + 1e-3 * torch.eye(40, dtype=torch.float64)
    b = torch.randn(40, generator=gen, dtype=torch.float64)
    finals = []
    for check in (True, False):
        x = torch.zeros(40, dtype=torch.float64, requires_grad=True)
        opt = HessianFree([x], damping=1e-3, cg_rtol=1e-12, cg_stop_on_increase=check)
        opt.step(lambda x=x: 0.5 * x @ A @ x - b @ x)
        assert opt.last_step.cg_reason != "monitor"
        finals.append(x.detach().clone())
    assert torch.equal(*finals)


# ------------------------------------------------------------------------------ cold retry
def test_warm_start_that_gives_no_descent_direction_is_solved_again_cold():
    """Step 1 solves A x = b1 (x1 = e1); step 2's objective has g2 = A x1 - b2 = (2, 10).
    One CG iteration from the warm start x0 = 0.95 x1 (hand-computed below) is uphill, so the
    step would be rejected; CG is run again from zero and the step is bitwise the cold one."""
    A = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))
    b1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b2 = torch.tensor([-1.0, -10.0], dtype=torch.float64)
    # the oracle: x0 - α r0 with r0 = A x0 + g2, α = r0ᵀr0 / r0ᵀA r0 (λ = 1e-6 neglected)
    x0, g2 = np.array([0.95, 0.0]), np.array([2.0, 10.0])
    r0 = np.diag([1.0, 100.0]) @ x0 + g2
    warm = x0 - (r0 @ r0) / (r0 @ np.diag([1.0, 100.0]) @ r0) * r0
    assert g2 @ warm > 0.5  # uphill
    runs = []
    for decay in (0.95, 0.0):
        x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        opt = HessianFree(
            [x],
            damping=1e-6,
            adapt_damping=False,
            cg_rtol=1e-12,
            cg_decay=decay,
            curvature="hessian",
            cg_max_iter=1,
            extrapolate=False,
        )
        for b in (b1, b2):
            opt.step(lambda b=b, x=x: 0.5 * x @ A @ x - b @ x)
        runs.append((x.detach().clone(), opt.last_step))
    (x_warm, info_warm), (x_cold, info_cold) = runs
    assert info_warm.status == "accepted" and info_warm.cg_matvecs == 3  # r0, 1 iteration, cold
    assert info_cold.cg_matvecs == 1
    assert torch.equal(x_warm, x_cold)
