"""Levenberg-Marquardt rules: Martens (2010, §4.1) and Nielsen (1999)."""

from __future__ import annotations

import math

import pytest
import torch

from hessfree import HessianFree, reduction_ratio, update_damping
from hessfree.damping import AUTO_DAMPING_FACTOR, calibrate_damping


@pytest.mark.parametrize(
    "rho, expected",
    [
        (0.1, 1.5),
        (0.25, 1.0),
        (0.5, 1.0),
        (0.75, 1.0),
        (0.9, 2 / 3),
        (-math.inf, 1.5),
        (math.nan, 1.5),
    ],
)
def test_update_damping_thresholds(rho, expected):
    assert update_damping(1.0, rho) == pytest.approx(expected)


def test_update_damping_bounds_and_factors():
    assert update_damping(1.0, 0.0, increase=3.0, max_damping=2.0) == 2.0
    assert update_damping(1.0, 1.0, decrease=0.1, min_damping=0.5) == 0.5


@pytest.mark.parametrize(
    "rho, expected",
    [
        # λ·max(1/3, 1 - (2ρ - 1)³) for ρ > 0, closed forms
        (0.5, 1.0),
        (0.75, 0.875),
        (0.1, 1.512),
        (0.25, 1.125),
        (0.9, 1 - 0.8**3),  # 0.488 > 1/3
        (1.0, 1 / 3),
        (3.0, 1 / 3),
        (1e-12, 2.0),
        # failures: ×2
        (0.0, 2.0),
        (-0.5, 2.0),
        (-math.inf, 2.0),
        (math.nan, 2.0),
    ],
)
def test_update_damping_nielsen(rho, expected):
    assert update_damping(1.0, rho, rule="nielsen") == pytest.approx(expected, rel=1e-9)
    # increase/decrease belong to Martens' rule
    assert update_damping(1.0, rho, rule="nielsen", increase=9.0, decrease=0.01) == pytest.approx(
        expected, rel=1e-9
    )


def test_update_damping_nielsen_clips_and_unknown_rule():
    assert update_damping(1.0, 1.0, rule="nielsen", min_damping=0.5) == 0.5
    assert update_damping(1.0, -1.0, rule="nielsen", max_damping=1.5) == 1.5
    with pytest.raises(ValueError, match=r"Unknown damping `rule` 'lm'.*'martens', 'nielsen'"):
        update_damping(1.0, 0.5, rule="lm")


@pytest.mark.parametrize("rule, factor", [(None, 1 / 3), ("nielsen", 1 / 3), ("martens", 2 / 3)])
def test_optimizer_damping_rule_on_an_exact_model(rule, factor):
    # A quadratic with its exact Hessian: the model is the objective, ρ = 1, so Nielsen's rule
    # (the default) divides λ by 3 and Martens' multiplies it by 2/3.
    gen = torch.Generator().manual_seed(3)
    Q = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    A = Q @ Q.T + torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    kw = {} if rule is None else {"damping_rule": rule}
    opt = HessianFree([x], damping=0.3, curvature="hessian", **kw)
    opt.step(lambda: 0.5 * x @ A @ x - b @ x)
    info = opt.last_step
    assert info.status == "accepted" and info.rho == pytest.approx(1.0, abs=1e-9)
    assert info.next_damping == pytest.approx(0.3 * factor, rel=1e-12)


def test_optimizer_rejects_unknown_damping_rule():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"Unknown `damping_rule` 'lm'; expected one of"):
        HessianFree([x], damping_rule="lm")


def test_reduction_ratio_cases():
    assert reduction_ratio(-0.5, -1.0) == 0.5
    assert reduction_ratio(0.1, -1.0) == -math.inf  # objective went up
    assert reduction_ratio(math.inf, -1.0) == -math.inf  # trial loss not finite
    assert reduction_ratio(math.nan, -1.0) == -math.inf
    assert math.isnan(reduction_ratio(-0.5, 0.0))  # the model predicted no decrease


def test_calibrate_damping_is_the_rayleigh_quotient_times_the_factor():
    assert calibrate_damping(8.0, 2.0) == pytest.approx(4.0 * AUTO_DAMPING_FACTOR)
    assert calibrate_damping(-8.0, 2.0, factor=0.5) == pytest.approx(2.0)  # |gᵀCg|: indefinite C
    assert calibrate_damping(8.0, 2.0, max_damping=1.0) == 1.0
    assert calibrate_damping(0.0, 2.0, fallback=0.3) == 0.3  # no curvature along g
    assert calibrate_damping(math.nan, 2.0, min_damping=0.5, fallback=0.1) == 0.5


def test_auto_damping_scales_with_the_loss():
    # f(x) = s (½ xᵀAx - 1ᵀx): C = sA, so λ0 must be s times the unscaled one (scale-free).
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    lams = []
    for s in (1.0, 1e3):
        x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        opt = HessianFree([x])
        assert math.isnan(opt.damping)  # not calibrated before the first step
        opt.step(lambda x=x, s=s: s * (0.5 * x @ A @ x - x.sum()))
        lams.append(opt.last_step.damping)
    g = -torch.ones(2, dtype=torch.float64)
    assert lams[0] == pytest.approx(AUTO_DAMPING_FACTOR * float(g @ A @ g / (g @ g)), rel=1e-12)
    assert lams[1] == pytest.approx(1e3 * lams[0], rel=1e-12)


def test_damping_policy_is_the_lm_rule_with_its_bounds():
    from hessfree.damping import DampingPolicy

    policy = DampingPolicy(increase=2.0, decrease=0.5, min_damping=0.1, max_damping=8.0)
    assert policy.after_step(1.0, 0.9) == update_damping(1.0, 0.9, increase=2.0, decrease=0.5)
    assert policy.after_step(1.0, 0.5) == 1.0
    assert policy.after_step(6.0, float("nan")) == 8.0  # grown, then clipped
    assert policy.after_step(0.15, 0.9) == 0.1
    assert policy.after_rejection(3.0) == 6.0 and policy.after_non_finite(5.0) == 8.0
    assert policy.initial(8.0, 2.0) == 4.0 and policy.initial(0.0, 2.0) == 1.0
    frozen = DampingPolicy(adapt=False, increase=2.0, max_damping=8.0)
    assert frozen.after_step(1.0, -math.inf) == 1.0 and frozen.after_rejection(1.0) == 1.0
    assert frozen.after_non_finite(1.0) == 2.0  # a non-finite step grows λ even without adapt


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((-1.0, 0.5), {}, ValueError, r"`damping` must be in \[0.0, inf\], got -1.0"),
        ((1.0, "0.5"), {}, TypeError, r"`rho` must be a real number, got str '0.5'"),
        ((1.0, 0.5), {"increase": 0.5}, ValueError, r"`increase` must be in \[1.0, inf\]"),
        ((1.0, 0.5), {"decrease": 1.5}, ValueError, r"`decrease` must be in \(0.0, 1.0\]"),
        ((1.0, 0.5), {"min_damping": 2.0, "max_damping": 1.0}, ValueError, r"`max_damping`"),
    ],
)
def test_update_damping_names_a_bad_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        update_damping(*args, **kwargs)


def test_reduction_ratio_names_a_bad_argument_and_keeps_nan_and_inf_meanings():
    with pytest.raises(TypeError, match=r"`actual` must be a real number, got str 'a'"):
        reduction_ratio("a", -1.0)
    assert reduction_ratio(math.nan, -1.0) == -math.inf and math.isnan(reduction_ratio(-1.0, 0.0))
    assert math.isnan(update_damping(math.nan, 0.5))  # λ not yet calibrated stays NaN


def _tanh_recurrence(theta: torch.Tensor, x: torch.Tensor, width: int):
    """A tanh RNN on ``x`` (examples, steps, 2) with input, recurrent and readout weights in one
    flat float64 ``theta``: the last step's readout and every hidden state."""
    w_in = theta[: 2 * width].reshape(width, 2)
    w_rec = theta[2 * width : 2 * width + width * width].reshape(width, width)
    w_out = theta[2 * width + width * width :]
    h, states = torch.zeros(x.shape[0], width, dtype=torch.float64), []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ w_in.T + h @ w_rec.T)
        states.append(h)
    return (h @ w_out).unsqueeze(1), torch.stack(states, 1)


def test_auto_damping_counts_the_structural_term_in_its_metric():
    # With structural damping, λ multiplies D = I + (μ/N) J_hᵀJ_h, so 'auto' is the Rayleigh
    # quotient gᵀCg / gᵀDg: C = J_oᵀJ_o/N (the GGN of ½ mean squared error) and J_h from dense
    # float64 Jacobians of a small tanh recurrence in a flat parameter vector.
    gen = torch.Generator().manual_seed(3)
    n_ex, steps, width, mu = 6, 4, 3, 50.0
    x = torch.randn(n_ex, steps, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(n_ex, 1, generator=gen, dtype=torch.float64)
    size = 2 * width + width * width + width  # input, recurrent and readout weights
    theta0 = 0.5 * torch.randn(size, generator=gen, dtype=torch.float64)

    def forward(theta):
        return _tanh_recurrence(theta, x, width)

    def loss_of(out):
        return 0.5 * (out - y).square().sum() / n_ex

    jacobian = torch.autograd.functional.jacobian
    J_o = jacobian(lambda t: forward(t)[0], theta0).reshape(n_ex, size)
    J_h = jacobian(lambda t: forward(t)[1], theta0).reshape(-1, size)
    g = jacobian(lambda t: loss_of(forward(t)[0]), theta0)
    gCg, Jg = float(g @ (J_o.T @ J_o / n_ex) @ g), J_h @ g
    expected = gCg / float(g @ g + mu / n_ex * Jg @ Jg)

    lams = {}
    for sd in (mu, 0.0):
        theta = theta0.clone().requires_grad_(True)
        opt = HessianFree([theta], structural_damping=sd, cg_max_iter=2)  # λ₀ is set before CG

        def closure(theta=theta, sd=sd):
            out, hidden = forward(theta)
            return (loss_of(out), out, hidden) if sd else (loss_of(out), out)

        opt.step(closure)
        lams[sd] = opt.last_step.damping
    assert lams[mu] == pytest.approx(expected, rel=1e-10)
    # without hidden states D = I: the plain Rayleigh quotient, strictly above the structural one
    assert lams[0.0] == pytest.approx(gCg / float(g @ g), rel=1e-10)
    assert lams[mu] < 0.9 * lams[0.0]


@pytest.mark.parametrize(
    "actual, predicted, f0, expected",
    [
        (0.0, -1e-15, 2e-8, True),  # δ = 8 · 2^-23 · 2e-8 ≈ 1.9e-14
        (-1.8e-14, 1.8e-14, 2e-8, True),
        (0.0, -2e-14, 2e-8, False),  # the model predicts a resolvable decrease
        (3e-14, -1e-15, 2e-8, False),  # the loss changed resolvably
        (0.0, 0.0, 0.0, True),  # f0 = 0: only exact zeros
        (0.0, -1e-30, 0.0, False),
        (math.nan, -1e-15, 2e-8, False),
        (math.inf, -1e-15, 2e-8, False),
    ],
)
def test_below_resolution_is_within_a_few_ulps_of_the_loss(actual, predicted, f0, expected):
    from hessfree.damping import RESOLUTION_ULPS, below_resolution

    eps = torch.finfo(torch.float32).eps
    assert RESOLUTION_ULPS * eps * 2e-8 == pytest.approx(1.907e-14, rel=1e-3)
    assert below_resolution(actual, predicted, f0, eps) is expected


@pytest.mark.parametrize(
    "dtype, change, expected",
    [
        (torch.bfloat16, -0.03, False),  # 3 % of f: ~4 bf16 ulps, resolvable (8 ulps froze it)
        (torch.bfloat16, -0.015, True),  # 2 · 2^-7 = 1.56 % of f
        (torch.float16, -0.0015, True),  # 2 · 2^-10 = 0.195 %
        (torch.float16, -0.0025, False),
        (torch.float32, -8e-7, True),  # 8 · 2^-23 = 9.5e-7: float32 keeps 8 ulps
        (torch.float32, -1.2e-6, False),
    ],
)
def test_resolution_of_a_16_bit_loss_is_two_ulps(dtype, change, expected):
    from hessfree.damping import below_resolution, resolution

    eps = torch.finfo(dtype).eps
    assert resolution(1.0, eps) == (2 if eps > 2.0**-23 else 8) * eps
    assert below_resolution(change, change, 1.0, eps) is expected


def test_auto_relative_floor_is_off_where_structural_damping_is_on():
    # relative_min_damping='auto' floors λ at 0.01 s on a stochastic objective, s = gᵀCg/gᵀDg
    # of the first step; where structural damping is in effect it is 0 (only min_damping='auto'
    # binds), while a given fraction and a closure without hidden states keep the
    # floor. s from dense float64 Jacobians of a small tanh recurrence (as above); two batches
    # taken in turns make the objective stochastic from the second step on.
    gen = torch.Generator().manual_seed(5)
    n_ex, steps, width, mu = 6, 4, 3, 0.03
    xs = [torch.randn(n_ex, steps, 2, generator=gen, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(n_ex, 1, generator=gen, dtype=torch.float64) for _ in range(2)]
    size = 2 * width + width * width + width
    theta0 = 0.5 * torch.randn(size, generator=gen, dtype=torch.float64)

    def forward(theta, x):
        return _tanh_recurrence(theta, x, width)

    def loss_of(out, y):
        return 0.5 * (out - y).square().sum() / n_ex

    jacobian = torch.autograd.functional.jacobian  # the first step's batch: xs[0], ys[0]
    J_o = jacobian(lambda t: forward(t, xs[0])[0], theta0).reshape(n_ex, size)
    J_h = jacobian(lambda t: forward(t, xs[0])[1], theta0).reshape(-1, size)
    g = jacobian(lambda t: loss_of(forward(t, xs[0])[0], ys[0]), theta0)
    gCg, Jg = float(g @ (J_o.T @ J_o / n_ex) @ g), J_h @ g
    s_structural, s_plain = gCg / float(g @ g + mu / n_ex * Jg @ Jg), gCg / float(g @ g)

    def floors(hidden: bool, **kwargs) -> list[float]:
        theta = theta0.clone().requires_grad_(True)
        opt = HessianFree([theta], cg_max_iter=3, **kwargs)
        out = []
        for k in range(3):
            x, y = xs[k % 2], ys[k % 2]

            def closure(x=x, y=y):
                o, h = forward(theta, x)
                return (loss_of(o, y), o, h) if hidden else (loss_of(o, y), o)

            opt.step(closure)
            out.append(opt.last_step.damping_floor)
        return out

    tight = dict(rel=1e-10)
    # min_damping='auto' in float64: 1e-8 of the scale times eps64/eps32
    share = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    # structurally damped: min_damping='auto' alone, on every step
    assert floors(True) == pytest.approx([1e-8 * share * s_structural] * 3, **tight)
    # a given fraction is applied as given: 0.01 s from the first stochastic step
    given = floors(True, relative_min_damping=0.01)
    assert given[1:] == pytest.approx([0.01 * s_structural] * 2, **tight)
    # no hidden states (precond=None: 'auto' would build K-FAC): the 0.01 floor as before
    plain = floors(False, precond=None)
    assert plain[0] == pytest.approx(1e-8 * share * s_plain, **tight)
    assert plain[1:] == pytest.approx([0.01 * s_plain] * 2, **tight)
