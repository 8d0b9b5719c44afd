"""unseen18: what a user of ``HessianFree`` meets next (experiments/README.md, "unseen18").

The reported ρ of an accepted step whose full length raised the objective; BatchNorm's
running statistics and other buffers written in the forward after a step that raised and
in trial calls; gradients left in ``.grad`` before an LBFGS-style step.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_unseen14 import _RunningMean  # a user's running mean, updated in place

from hessfree import HessianFree

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared 2-core machine


def _gauss_newton_overshoot() -> tuple[torch.nn.Parameter, object]:
    """f(w) = ½(w² − y)² with y = −4 from w = 1: the residual never vanishes, so the
    Gauss-Newton curvature (2w)² underestimates f'' = 6w² + 8 and the full step overshoots
    (w → −1.5, f 12.5 → 19.5); the line search accepts a smaller rate."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    y = torch.tensor([-4.0], dtype=torch.float64)

    def closure():
        out = w * w
        return 0.5 * ((out - y) ** 2).sum(), out

    return w, closure


def test_rho_of_an_accepted_shorter_step_is_the_closed_form_ratio_at_its_rate():
    # Fails on main: ρ was reported -inf (the full step's), though the step was accepted.
    w, closure = _gauss_newton_overshoot()
    opt = HessianFree([w], damping=1e-6, adapt_damping=False, precond=None)
    opt.step(closure)
    info = opt.last_step
    assert info.accepted and 0.0 < info.step_rate < 1.0
    # oracle: 1-D, CG solves (C + λ)p = −g exactly; everything else in closed form
    w0, y, lam, t = 1.0, -4.0, info.damping, info.step_rate
    g, C = (w0**2 - y) * 2 * w0, (2 * w0) ** 2
    p = -g / (C + lam)

    def f(x: float) -> float:
        return 0.5 * (x * x - y) ** 2

    assert float(w.detach()) == pytest.approx(w0 + t * p, rel=1e-12)
    assert info.rho_full == -math.inf  # f(w0 + p) > f(w0): λ's update reads this one
    expected = (f(w0 + t * p) - f(w0)) / (t * g * p + 0.5 * t * t * C * p * p)
    assert info.rho == pytest.approx(expected, rel=1e-10)
    assert 0.0 < info.rho < 1.0  # 0.275 here


def test_rho_of_a_full_step_is_unchanged_and_equals_rho_full():
    # Guard: at rate 1 `rho` is as before (the full step's; 1 up to rounding on a quadratic
    # whose curvature is exact) and the same number as `rho_full` (absent on main).
    torch.manual_seed(0)
    X, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)

    def closure():
        out = X @ w
        return 0.5 * ((out - y) ** 2).mean(), out

    opt = HessianFree([w], damping=1e-3, adapt_damping=False, extrapolate=False)
    opt.step(closure)
    info = opt.last_step
    assert info.step_rate == 1.0 and info.rho == pytest.approx(1.0, abs=1e-12)
    assert getattr(info, "rho_full", info.rho) == info.rho


# ---- buffers written in the forward: a step that raises, a non-finite batch, trial calls ----


def _bn_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    x = torch.randn(64, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    return model, x, y


def _buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def _one_forward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Oracle: the buffers a copy of the model has after one training-mode forward."""
    copy_ = __import__("copy").deepcopy(model)
    with torch.no_grad():
        copy_(x)
    return _buffers(copy_)


@pytest.mark.parametrize("fail_at", [1, 2], ids=["first_call_after_forward", "trial_call"])
def test_step_that_raises_leaves_batchnorm_statistics_as_at_its_start(fail_at):
    # Fails on main: the first call's update of the statistics stayed after the raise.
    model, x, y = _bn_setup()
    opt = HessianFree(model.parameters())
    calls = [0]

    def closure(fail: bool = False):
        calls[0] += 1
        out = model(x)
        if fail and calls[0] == fail_at:
            raise RuntimeError("data loader hiccup")
        return torch.nn.functional.cross_entropy(out, y), out

    with pytest.warns(UserWarning, match="BatchNorm"):
        opt.step(closure)
    start, params = _buffers(model), [p.detach().clone() for p in model.parameters()]
    calls[0] = 0
    with pytest.raises(RuntimeError, match="hiccup"):
        opt.step(lambda: closure(fail=True))
    assert _same(_buffers(model), start)
    assert _same([p.detach() for p in model.parameters()], params)
    # the retried step moves them once, as one forward at the step's start does
    oracle = _one_forward(model, x)
    opt.step(closure)
    assert _same(_buffers(model), oracle)


def test_non_finite_batch_leaves_batchnorm_statistics_finite():
    # Fails on main: the rejected step's call put NaN in running_mean for good, and the
    # eval-mode model returned NaN for every input.
    model, x, y = _bn_setup()
    opt = HessianFree(model.parameters())
    bad = x.clone()
    bad[0, 0] = math.nan

    def closure(data=x):
        out = model(data)
        return torch.nn.functional.cross_entropy(out, y), out

    with pytest.warns(UserWarning, match="BatchNorm"):
        opt.step(closure)
    before = _buffers(model)
    with pytest.warns(RuntimeWarning, match="non-finite value in the loss"):
        opt.step(lambda: closure(bad))
    assert opt.last_step.status == "non_finite_loss"
    assert _same(_buffers(model), before)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def _writer(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "spectral_norm":
        sn = torch.nn.utils.parametrizations.spectral_norm
        model = torch.nn.Sequential(
            sn(torch.nn.Linear(5, 8)), torch.nn.Tanh(), sn(torch.nn.Linear(8, 3))
        )
    else:
        model = torch.nn.Sequential(
            _RunningMean(), torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        )
    return model.double()


@pytest.mark.parametrize("kind", ["spectral_norm", "running_mean"])
def test_trial_calls_leave_written_buffers_as_the_steps_call_left_them(kind):
    # Fails on main: every trial call (backtracking, line search) advanced the buffers.
    # Oracle: a copy of the model run once in training mode at the step's start; and the
    # accepted loss is the trials' function there: one more forward from those buffers.
    model = _writer(kind)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), out

    with pytest.warns(UserWarning, match="wrote the buffer"):
        opt.step(closure)
    for _ in range(2):
        oracle = _one_forward(model, x)
        opt.step(closure)
        info = opt.last_step
        assert _same(_buffers(model), oracle)
        assert info.closure_calls >= 3  # the step's call, f(θ0) as a trial, a trial
        trial = __import__("copy").deepcopy(model)
        with torch.no_grad():
            f = float(torch.nn.functional.cross_entropy(trial(x), y))
        if info.accepted:
            assert info.loss_after == f


def test_step_that_raises_puts_spectral_norm_vectors_back():
    # Fails on main: the raised step's calls kept their power iterations.
    model = _writer("spectral_norm")
    x = torch.randn(64, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    opt = HessianFree(model.parameters())
    calls = [0]

    def closure(fail: bool = False):
        calls[0] += 1
        if fail and calls[0] == 2:  # a trial call
            raise KeyboardInterrupt
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), out

    with pytest.warns(UserWarning, match="wrote the buffer"):
        opt.step(closure)
    start = _buffers(model)
    calls[0] = 0
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: closure(fail=True))
    assert calls[0] == 2 and _same(_buffers(model), start)


class _InstanceNormNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(2, 4, 3)
        self.norm = torch.nn.InstanceNorm1d(4, track_running_stats=True)
        self.out = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.conv(x))).mean(-1))


def test_instance_norm_statistics_move_once_per_step_without_an_extra_call():
    # Fails on main: every trial call moved InstanceNorm's tracked statistics (0.036 off one
    # forward at the step's start), with the buffer warning. Now BatchNorm's treatment:
    # bitwise the one-forward oracle, no warning, no extra f(θ0) call (its train-mode
    # forward does not read them).
    import warnings

    torch.manual_seed(0)
    model = _InstanceNormNet().double()
    x = torch.randn(16, 2, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    opt = HessianFree(model.parameters(), backtrack=False)

    def closure():
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), out

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            oracle = _one_forward(model, x)
            opt.step(closure)
            assert _same(_buffers(model), oracle)
            assert opt.last_step.closure_calls == 2  # the step's call, one trial
    assert not [w for w in seen if "buffer" in str(w.message)]


# ---- gradients left in .grad before an LBFGS-style step ----


def _mlp_lbfgs(zero_inside: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))

    def closure():
        if zero_inside:
            opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt = HessianFree(model.parameters())
    return model, opt, closure


def test_gradient_added_before_the_step_is_refused_with_the_fix():
    # Fails on main: a regularizer's gradient put in .grad before opt.step was summed into g
    # (as torch.optim.LBFGS sums it), while the curvature and the trial losses ignored it.
    model, opt, closure = _mlp_lbfgs(zero_inside=False)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    (0.1 * sum(p.square().sum() for p in model.parameters())).backward()
    with pytest.raises(ValueError, match=r"already in \.grad.*inside the closure.*zero_grad"):
        opt.step(closure)
    assert _same([p.detach() for p in model.parameters()], before)


def test_zeroed_gradients_before_the_step_are_allowed():
    # Guard: zero_grad(set_to_none=False) leaves zeros, which add nothing: the step is
    # bitwise the one after zero_grad() (None).
    finals = []
    for set_to_none in (True, False):
        model, opt, closure = _mlp_lbfgs(zero_inside=False)
        for _ in range(2):
            opt.zero_grad(set_to_none=set_to_none)
            opt.step(closure)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert _same(*finals)


def test_outputs_closure_ignores_gradients_left_in_grad():
    # Guard: a (loss, outputs) closure's gradient is HessianFree's own; what .grad holds
    # (an Adam phase's last gradient) neither enters the step nor is refused.
    finals = []
    for leftover in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
        if leftover:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt = HessianFree(model.parameters())

        def closure(model=model, x=x, y=y):
            out = model(x)
            return torch.nn.functional.cross_entropy(out, y), out

        opt.step(closure)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert _same(*finals)


# ---- load_state_dict from another parameter layout ----


def _trained_state(hidden: int, freeze_first: bool = False) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)
    )
    if freeze_first:
        model[0].requires_grad_(False)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    opt = HessianFree(model.parameters(), precond=None)

    def closure():
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), out

    for _ in range(2):
        opt.step(closure)
    return opt.state_dict()


def test_state_of_other_parameter_shapes_is_refused_and_nothing_loaded():
    # Fails on main: as many parameters of other shapes (hidden 8 → 16) loaded silently.
    saved = _trained_state(8)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = HessianFree(model.parameters(), precond=None)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"warm start has 75 entries.*147 here.*\(16, 5\)"):
        opt.load_state_dict(saved)
    assert opt.state_dict() == before


@pytest.mark.parametrize("frozen_when", ["saved", "loaded"])
def test_state_of_the_same_model_with_a_frozen_layer_still_loads(frozen_when):
    # Guard: the warm start's length is checked against the parameters it was saved for
    # (state['trained']), not those trained now.
    saved = _trained_state(8, freeze_first=frozen_when == "saved")
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    if frozen_when == "loaded":
        model[0].requires_grad_(False)
    opt = HessianFree(model.parameters(), precond=None)
    opt.load_state_dict(saved)
    held = [s for s in opt.state_dict()["state"].values() if "step" in s]
    assert len(held) == 1 and held[0]["step"] == 2


# ---- a TransformerEncoderLayer (eval mode: torch's fast path in no_grad calls) ----


class _Encoder(torch.nn.Module):
    """Tokens (B, T, 2) → ``TransformerEncoderLayer`` (2 heads, dropout 0) → mean over T →
    Linear(2, 3): 63 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.TransformerEncoderLayer(2, 2, 4, dropout=0.0, batch_first=True)
        self.out = torch.nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mix(x).mean(1))


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_transformer_layer_step_is_the_dense_damped_newton_step(curvature):
    # Guard (passes on main): λ fixed, CG to convergence, no line search: the step is
    # −(C + λI)⁻¹g with C the float64 Hessian (reverse over reverse: torch.func.hessian,
    # forward over reverse, is off by 0.08 through attention → LayerNorm in torch 2.13), the
    # Gauss-Newton matrix JᵀH_ℓJ or the empirical Fisher (1/N) Σ g_i g_iᵀ.
    from torch.func import functional_call, jacrev, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g_ = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 2, generator=g_, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g_)
    torch.manual_seed(0)
    model = _Encoder().double().eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(t, inputs=x):
        parts = t.split([s.numel() for s in shapes])
        parts = [c.view(s) for c, s in zip(parts, shapes, strict=True)]
        return functional_call(model, dict(zip(names, parts, strict=True)), (inputs,))

    def loss(t):
        return torch.nn.functional.cross_entropy(outputs(t), y)

    def one(t, xi, yi):
        return torch.nn.functional.cross_entropy(outputs(t, xi[None]), yi[None])

    with sdpa_kernel(SDPBackend.MATH):  # the kernel torch differentiates twice
        g = torch.autograd.functional.jacobian(loss, theta)
        if curvature == "hessian":
            C = torch.autograd.functional.hessian(loss, theta)
        elif curvature == "ggn":
            out = outputs(theta).detach()
            J = jacrev(outputs)(theta).reshape(-1, theta.numel())
            HL = torch.autograd.functional.hessian(
                lambda o: torch.nn.functional.cross_entropy(o.view_as(out), y), out.reshape(-1)
            )
            C = J.T @ HL @ J
        else:
            G = vmap(torch.func.grad(one), in_dims=(None, 0, 0))(theta, x, y)
            C = G.T @ G / len(y)
    lam = max(1.0, 1.0 - float(torch.linalg.eigvalsh(C)[0]))
    expected = -torch.linalg.solve(C + lam * torch.eye(len(g), dtype=C.dtype), g)
    opt = HessianFree(
        model.parameters(),
        damping=lam,
        curvature=curvature,
        adapt_damping=False,
        cg_max_iter=500,
        cg_rtol=1e-13,
        cg_progress_tol=1e-300,
        backtrack=False,
        line_search=None,
        precond=None,
        trust_radius=False,
    )

    def closure():
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), out

    opt.step(closure)
    step = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta
    assert float((step - expected).abs().max() / expected.abs().max()) < 1e-10
