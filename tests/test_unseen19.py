"""unseen19: ``torch.compile`` under HessianFree's products and the operators
(experiments/README.md, "unseen19").

Every backend but ``'eager'`` wraps a compiled region in aot_autograd's ``CompiledFunction``,
whose backward torch cannot differentiate again: torch raises for some graphs and silently
gives zero for others (a compiled loss), so those are refused, worded, before anything moves.
``backend='eager'`` keeps torch's ordinary graph and is exact.
Oracles: the dense float64 Hessian, Gauss-Newton matrix and empirical Fisher from
``torch.autograd.functional``, and the same steps on the uncompiled model.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from hessfree import (
    FisherLinearOperator,
    GGNLinearOperator,
    HessianFree,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACPreconditioner,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # HessianFree's global forward pre-hooks (the BatchNorm/buffer watch) make torch note
    # that they also fire for the OptimizedModule wrapper: harmless here
    pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)`"),
    pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace"),
]

N_PARAMS = 4 * 5 + 5 + 5 * 3 + 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo compiles one code object (``F.cross_entropy``'s) at most 8 times and then runs
    it uncompiled: without a reset the later tests would meet no compiled region at all."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (32,), generator=g)


def _mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model: nn.Module, before: list[Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def _closure(net, loss_fn, opt: HessianFree, style: str):
    X, y = _data()

    def closure():
        outputs = net(X)
        loss = loss_fn(outputs, y)
        if style == "outputs":
            return loss, outputs
        if style == "lbfgs":
            opt.zero_grad()
            loss.backward()
        return loss

    return closure


def _dense(model: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H, G = Jᵀ H_ℓ J and the empirical Fisher (1/N) Σ g_i g_iᵀ of the mean cross-entropy
    of the uncompiled model, float64, by torch.autograd.functional."""
    X, y = _data()
    named = [(n, p.shape) for n, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(t: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in named:
            params[name] = t[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return functional_call(model, params, (X,))

    H = hessian(lambda t: F.cross_entropy(outputs(t), y), theta)
    J = jacobian(lambda t: outputs(t).reshape(-1), theta)
    o = outputs(theta).detach().reshape(-1)
    Hl = hessian(lambda z: F.cross_entropy(z.reshape(-1, 3), y), o)
    per_example = jacobian(lambda t: F.cross_entropy(outputs(t), y, reduction="none"), theta)
    fisher = per_example.T @ per_example / X.shape[0]
    return H.numpy(), (J.T @ Hl @ J).numpy(), fisher.numpy()


# ------------------------------------------------------------------ a compiled loss


@pytest.mark.parametrize(
    ("style", "curvature"), [("lbfgs", "hessian"), ("loss", "auto"), ("outputs", "auto")]
)
def test_a_loss_compiled_by_aot_autograd_is_refused_before_anything_moves(style, curvature):
    # Fails on main: a compiled cross-entropy's backward saves only its own intermediates, so
    # torch differentiates it again to zero without an error. The Hessian closures stepped
    # silently without the Jᵀ H_ℓ J part (1.6 off the uncompiled run in 3 steps); the
    # Gauss-Newton one failed with "`u` must be shaped like the outputs ... got NoneType".
    model = _mlp()
    loss_fn = torch.compile(F.cross_entropy, backend="aot_eager")
    opt = HessianFree(model.parameters(), curvature=curvature)
    before = _snapshot(model)
    with pytest.raises(NotImplementedError, match="torch.compile'd region") as info:
        opt.step(_closure(model, loss_fn, opt, style))
    assert "_torchdynamo_orig_callable" in str(info.value)
    assert "backend='eager'" in str(info.value)
    assert "parameters are unchanged" in str(info.value)
    assert _unchanged(model, before)


def test_a_compiled_loss_under_the_empirical_fisher_steps_as_the_uncompiled_one():
    # Guard: the empirical Fisher needs only the loss's first derivative, which a compiled
    # loss gives exactly, so the refusal leaves it out (as for @once_differentiable losses).
    # The compiled loss's graph hides its reduction (CompiledFunctionBackward, no
    # NllLossBackward0), so the Fisher says it takes a mean: right for this loss.
    runs = []
    for compiled in (True, False):
        loss_fn = (
            torch.compile(F.cross_entropy, backend="aot_eager") if compiled else F.cross_entropy
        )
        model = _mlp()
        opt = HessianFree(model.parameters(), curvature="fisher")
        with pytest.warns(UserWarning, match="cannot tell") if compiled else nullcontext():
            opt.step(_closure(model, loss_fn, opt, "outputs"))
        for _ in range(2):
            opt.step(_closure(model, loss_fn, opt, "outputs"))
        runs.append(_snapshot(model))
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


@pytest.mark.parametrize("Op", [HessianLinearOperator, GGNLinearOperator])
def test_operators_refuse_a_loss_compiled_by_aot_autograd_at_construction(Op):
    # Fails on main: the Hessian operator had relative error 1.0 against the dense matrix
    # (silently), the GGN operator failed at its first product with "`u` must be shaped like
    # the outputs ... got NoneType".
    loss_fn = torch.compile(F.cross_entropy, backend="aot_eager")
    with pytest.raises(NotImplementedError, match=f"{Op.__name__}: the loss or model runs"):
        Op(_mlp(), loss_fn, _data())


def test_the_fisher_operator_over_a_compiled_loss_is_the_dense_empirical_fisher():
    # Guard: first derivatives of the loss only, exact through a compiled loss.
    model = _mlp()
    loss_fn = torch.compile(F.cross_entropy, backend="aot_eager")
    A = FisherLinearOperator(model, loss_fn, _data()) @ np.eye(N_PARAMS)
    np.testing.assert_allclose(A, _dense(model)[2], rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ a compiled model


@pytest.mark.parametrize("curvature", ["auto", "hessian", "fisher"])
def test_a_model_compiled_by_aot_autograd_is_refused_with_both_ways_out(curvature):
    # Fails on main for the wording: torch's error (reworded) named `._orig_mod` only, after a
    # first product; now the first graph is refused with backend='eager' named too.
    # compile19: called once first (an evaluation), as dynamo compiles a model first called
    # inside the step with graph breaks at HessianFree's hooks, its torch.nn layers eager
    model = _mlp()
    net = torch.compile(model, backend="aot_eager")
    net(_data()[0])
    opt = HessianFree(model.parameters(), curvature=curvature)
    before = _snapshot(model)
    with pytest.raises(NotImplementedError, match="torch.compile'd region") as info:
        opt.step(_closure(net, F.cross_entropy, opt, "outputs"))
    assert "._orig_mod" in str(info.value) and "backend='eager'" in str(info.value)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "make", [GGNLinearOperator, HessianLinearOperator, FisherLinearOperator, "jacobian"]
)
def test_operators_refuse_a_model_compiled_by_aot_autograd_at_construction(make):
    # Fails on main: constructed, then torch's error at the first product, worded for a
    # closure the operators do not have.
    model = _mlp()
    net = torch.compile(model, backend="aot_eager")
    X, y = _data()
    with pytest.raises(NotImplementedError, match="runs a torch.compile'd region"):
        if make == "jacobian":
            JacobianLinearOperator(net, X, params=list(model.parameters()))
        else:
            make(net, F.cross_entropy, (X, y), params=list(model.parameters()))


# ------------------------------------------------------------------ backend='eager' is exact


def test_eager_backend_operators_match_the_dense_float64_matrices():
    # Guard: the way out the message names. Dynamo traces, but the autograd graph is torch's
    # ordinary one.
    model = _mlp()
    net = torch.compile(model, backend="eager")
    loss_fn = torch.compile(F.cross_entropy, backend="eager")
    H, G, Fi = _dense(model)
    params = list(model.parameters())
    for Op, dense in (
        (HessianLinearOperator, H),
        (GGNLinearOperator, G),
        (FisherLinearOperator, Fi),
    ):
        A = Op(net, loss_fn, _data(), params=params) @ np.eye(N_PARAMS)
        np.testing.assert_allclose(A, dense, rtol=1e-10, atol=1e-13, err_msg=Op.__name__)


@pytest.mark.parametrize(
    ("style", "curvature"), [("outputs", "auto"), ("loss", "auto"), ("lbfgs", "hessian")]
)
def test_eager_backend_steps_bitwise_as_the_uncompiled_model(style, curvature):
    # Guard: the same closure calls, the same products, the same parameters.
    runs, calls = [], []
    for backend in ("eager", None):
        model = _mlp()
        net = torch.compile(model, backend=backend) if backend else model
        loss_fn = torch.compile(F.cross_entropy, backend=backend) if backend else F.cross_entropy
        opt = HessianFree(model.parameters(), curvature=curvature)
        for _ in range(3):
            opt.step(_closure(net, loss_fn, opt, style))
            calls.append(opt.last_step.closure_calls)
        runs.append(_snapshot(model))
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))
    assert calls[:3] == calls[3:]


def test_the_compiled_region_check_names_aot_autograds_function_only():
    # Guard on the detector itself: an eager-compiled graph holds torch's ordinary nodes.
    from hessfree.curvature import _compiled_by_aot, _once_differentiable

    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    aot = torch.compile(F.cross_entropy, backend="aot_eager")(x * 2.0, y)
    eager = torch.compile(F.cross_entropy, backend="eager")(x * 2.0, y)
    assert _compiled_by_aot(_once_differentiable([aot]))
    assert _once_differentiable([eager]) is None


# ------------------------------------------------------------------ K-FAC's hook and dynamo


def _warm_compiled() -> tuple[nn.Module, nn.Module]:
    """A model compiled (backend='eager') and called once before any step, as an evaluation
    before training would: dynamo traced its forward with no global hook installed."""
    model = _mlp()
    net = torch.compile(model, backend="eager")
    net(_data()[0])
    return model, net


def test_kfac_blind_inside_a_module_compiled_before_the_step_is_said_under_auto():
    # Fails on main: dynamo does not guard on module hooks, so the compiled code never called
    # K-FAC's recording hook; precond='auto' found no layer and turned K-FAC off silently
    # (3 steps 0.95 off the uncompiled model's). It still goes off, now with the reason.
    model, net = _warm_compiled()
    opt = HessianFree(model.parameters())
    with pytest.warns(UserWarning, match="turned K-FAC off .*torch.compile'd module") as info:
        opt.step(_closure(net, F.cross_entropy, opt, "outputs"))
    assert any("._orig_mod" in str(w.message) for w in info)
    assert opt.last_step.accepted and opt._auto_precond is None  # K-FAC off


def test_kfac_blind_inside_a_module_compiled_before_the_step_is_refused_when_asked_for():
    # Fails on main: "precond='kfac' found no nn.Linear layer ...", though two ran
    model, net = _warm_compiled()
    opt = HessianFree(model.parameters(), precond="kfac")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="2 layer.*did not see.*`._orig_mod`"):
        opt.step(_closure(net, F.cross_entropy, opt, "outputs"))
    assert _unchanged(model, before)


@pytest.mark.parametrize("reset", [False, True])
def test_kfac_sees_a_compiled_module_whose_first_call_is_the_steps(reset):
    # Guard, and the message's way out: compiled inside the step's first call, with the hook
    # installed, the compiled code calls it; K-FAC's steps are bitwise the uncompiled model's.
    if reset:  # compiled and called before, then dynamo's code dropped
        model, net = _warm_compiled()
        torch.compiler.reset()
    else:
        model = _mlp()
        net = torch.compile(model, backend="eager")
    ref = _mlp()
    runs = [(model, net), (ref, ref)]
    opts = [HessianFree(m.parameters()) for m, _ in runs]
    for _ in range(3):
        for (_m, n), opt in zip(runs, opts, strict=True):
            opt.step(_closure(n, F.cross_entropy, opt, "outputs"))
            kfac = opt._auto_precond  # K-FAC on in both, over both layers
            assert isinstance(kfac, KFACPreconditioner) and len(kfac.layers) == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))


class _SpareHead(nn.Module):
    """The MLP with a second head its forward does not call (used elsewhere, e.g. in eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()
        self.spare = nn.Linear(5, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_a_layer_the_compiled_forward_skips_is_no_blind_spot():
    # Guard: the check counts a layer as missed only where the compiled module's output
    # reaches its weight; K-FAC takes the two layers that ran, with no warning, as without
    # compile (a layer the forward skips is left out there too).
    model = _SpareHead()
    net = torch.compile(model, backend="eager")
    opt = HessianFree(model.parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*turned K-FAC off")
        opt.step(_closure(net, F.cross_entropy, opt, "outputs"))
    kfac = opt._auto_precond
    assert isinstance(kfac, KFACPreconditioner) and len(kfac.layers) == 2


def test_eager_backend_jacobian_operator_is_the_dense_jacobian():
    # Guard: the Jacobian's products (a JVP by the double-backward trick, a VJP) through
    # dynamo's eager backend
    model = _mlp()
    net = torch.compile(model, backend="eager")
    X, _ = _data()
    J = JacobianLinearOperator(net, X, params=list(model.parameters())) @ np.eye(N_PARAMS)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    named = [(n, p.shape) for n, p in model.named_parameters()]

    def outputs(t: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in named:
            params[name] = t[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return functional_call(model, params, (X,)).reshape(-1)

    np.testing.assert_allclose(J, jacobian(outputs, theta).numpy(), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ models no round tried


def _dense_hessian(model: nn.Module, loss_of) -> np.ndarray:
    named = [(n, p.shape) for n, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in named:
            params[name] = t[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return loss_of(lambda *args: functional_call(model, params, args))

    return hessian(f, theta).numpy()


class _PackedGRU(nn.Module):
    """A batch-first GRU over ragged sequences (``pack_padded_sequence``, unsorted lengths)
    whose last hidden state feeds a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.gru(packed)
        return self.head(h[-1])


def test_prelu_and_a_packed_batch_first_gru_have_the_dense_hessian():
    # Guards: PReLU's learned slope (a kink whose side depends on the data) and a GRU whose
    # packed batch reorders the examples internally
    torch.manual_seed(0)
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    prelu = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 3)).double()
    gru = _PackedGRU().double()
    xs, ys = torch.randn(6, 7, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])
    cases = [
        (prelu, prelu, (X, y), lambda f: F.cross_entropy(f(X), y)),
        (
            gru,
            lambda inp: gru(*inp),
            ((xs, lengths), ys),
            lambda f: F.cross_entropy(f(xs, lengths), ys),
        ),
    ]
    for model, call, data, loss_of in cases:
        n = sum(p.numel() for p in model.parameters())
        params = list(model.parameters())
        H = HessianLinearOperator(call, F.cross_entropy, data, params=params) @ np.eye(n)
        np.testing.assert_allclose(H, _dense_hessian(model, loss_of), rtol=1e-10, atol=1e-13)
