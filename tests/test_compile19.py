"""compile19: what unseen19 left about ``torch.compile`` and HessianFree's global hooks
(experiments/README.md, "compile19").

HessianFree's global module hooks (the BatchNorm/buffer watch, K-FAC's recording) are one
``torch.compiler.disable``'d dispatcher per kind, so dynamo runs them instead of tracing them
(no warnings, no recompiles); the Monte-Carlo Fisher and ``curvature='fisher'`` name a
compiled loss; a loss compiled after the first step is refused as at the first.
Oracles: the same steps on the uncompiled model (bitwise), the dense float64 empirical Fisher
from ``torch.autograd.functional`` (per-example Jacobian), torch's own warnings and dynamo's
counters.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import jacobian
from torch.func import functional_call

import hessfree._closure as closure_module
from hessfree import HessianFree, MCFisherLinearOperator, MCFisherProduct

pytestmark = pytest.mark.usefixtures("one_thread")

N_PARAMS = 4 * 5 + 5 + 5 * 3 + 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """As unseen19's: a reset before and after, so results do not depend on test order;
    then a collection: a step refused after a compile left cyclic garbage that a later test
    counting live tensors (test_lean_rop's) saw freed during its steps."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
    gc.collect()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (32,), generator=g)


def _mlp(norm: bool = False) -> nn.Sequential:
    torch.manual_seed(1)
    if norm:
        return nn.Sequential(
            nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)
        ).double()
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _state(model: nn.Module) -> list[Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def _unchanged(model: nn.Module, before: list[Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(_state(model), before, strict=True))


def _steps(net, model, loss_fn, steps: int, *, style: str = "outputs", **kw) -> list[str]:
    """``steps`` steps of HessianFree on ``model`` through ``net``; the warnings' texts."""
    X, y = _data()
    opt = HessianFree(model.parameters(), **kw)

    def closure():
        outputs = net(X)
        loss = loss_fn(outputs, y)
        return (loss, outputs) if style == "outputs" else loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(closure)
    return [str(w.message) for w in caught]


# ------------------------------------------------------------------ the hooks under dynamo


@pytest.mark.parametrize(("norm", "precond"), [(False, "kfac"), (False, "auto"), (True, "auto")])
def test_hooks_inside_a_compiled_model_give_no_dynamo_noise_and_the_same_steps(norm, precond):
    # Fails on main: 12 steps of an eager-compiled MLP printed torch's "global hooks" warning
    # at every call of the model (37 times), "Dynamo does not know how to trace the builtin
    # `_thread.get_ident`", and dynamo compiled 16 frames, recompiling the hooks' until its
    # recompile limit. The steps (K-FAC's factors, BatchNorm's statistics) were and are
    # bitwise the uncompiled model's.
    runs, texts = [], []
    for compiled in (False, True):
        model = _mlp(norm)
        net = torch.compile(model, backend="eager") if compiled else model
        texts.append(_steps(net, model, F.cross_entropy, 12, precond=precond))
        runs.append(_state(model))
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))
    assert texts[1] == texts[0]  # HessianFree's own (BatchNorm's), nothing from torch
    assert not any("global hooks" in t or "get_ident" in t for t in texts[1])
    counters = torch._dynamo.utils.counters
    assert not any("recompile limit" in k for k in counters["unimplemented"])
    assert counters["frames"]["total"] <= 4  # the model's frame, with and without grad


def test_a_users_own_global_hook_keeps_torchs_warning():
    # Guard: the warning is silenced only while the global hooks are HessianFree's.
    model = _mlp()
    net = torch.compile(model, backend="eager")
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
    try:
        texts = _steps(net, model, F.cross_entropy, 1)
    finally:
        handle.remove()
    assert any("global hooks" in t for t in texts)


def test_import_hessfree_does_not_import_dynamo():
    # Guard: the dispatchers are wrapped in torch.compiler.disable lazily (dynamo costs
    # ~0.9 s to import; torch.optim.Optimizer imports it at the first add_param_group).
    code = "import sys, hessfree; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_model_first_compiled_inside_the_step_runs_its_layers_eagerly_and_exactly():
    # Fails on main (refused): dynamo now breaks the graph at HessianFree's (disabled) hooks,
    # and the torch.nn layers between them run eagerly, so a model compiled with aot_eager
    # and first called inside the step steps bitwise as the uncompiled one (called first
    # outside, it is still refused: test_unseen19).
    runs = []
    for compiled in (False, True):
        model = _mlp()
        net = torch.compile(model, backend="aot_eager") if compiled else model
        _steps(net, model, F.cross_entropy, 3)
        runs.append(_state(model))
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


# ------------------------------------------------------------------ compiled losses


def test_the_mc_fisher_names_a_compiled_loss():
    # Fails on main for the wording: "supports nn.CrossEntropyLoss ... Got a loss whose
    # autograd node is CompiledFunctionBackward", with no word of the compile.
    model = _mlp()
    loss_fn = torch.compile(F.cross_entropy, backend="aot_eager")
    before = _state(model)
    with pytest.raises(ValueError, match="torch.compile'd") as info:
        _steps(model, model, loss_fn, 1, curvature="fisher_mc")
    assert "._torchdynamo_orig_callable" in str(info.value)
    assert "backend='eager'" in str(info.value)
    assert _unchanged(model, before)
    X, y = _data()
    outputs = model(X)
    with pytest.raises(ValueError, match="torch.compile'd"):
        MCFisherProduct(loss_fn(outputs, y), outputs, list(model.parameters()))


@pytest.mark.parametrize("kind", ["function", "module"])
def test_the_mc_fisher_operator_takes_an_eager_compiled_loss(kind):
    # Fails on main for "function": a compiled F.cross_entropy carries the original's name,
    # and the operator refused it as "got torch.nn.functional.cross_entropy", though
    # backend='eager' keeps torch's loss node. Oracle: the same operator, uncompiled loss,
    # same seed (bitwise).
    plain = F.cross_entropy if kind == "function" else nn.CrossEntropyLoss()
    mats = []
    for loss_fn in (plain, torch.compile(plain, backend="eager")):
        op = MCFisherLinearOperator(_mlp(), loss_fn, _data(), seed=3)
        mats.append(op @ np.eye(N_PARAMS))
    np.testing.assert_array_equal(mats[1], mats[0])


def test_the_mc_fisher_operator_refuses_a_compiled_loss_module_by_its_options():
    # Fails on main for the wording: refused too, at the first product, by its autograd
    # node, without naming the option; now at construction by the original's options.
    loss_fn = torch.compile(nn.CrossEntropyLoss(label_smoothing=0.1), backend="eager")
    with pytest.raises(ValueError, match="CrossEntropyLoss with `label_smoothing`"):
        MCFisherLinearOperator(_mlp(), loss_fn, _data())


def _dense_fisher(model: nn.Module, reduction: str) -> np.ndarray:
    """Σ_i g_i g_iᵀ (``'sum'``) or its mean, from the per-example Jacobian (float64)."""
    X, y = _data()
    named = [(n, p.shape) for n, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def per_example(t: Tensor) -> Tensor:
        params, i = {}, 0
        for name, shape in named:
            params[name] = t[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return F.cross_entropy(functional_call(model, params, (X,)), y, reduction="none")

    J = jacobian(per_example, theta)
    return (J.T @ J / (X.shape[0] if reduction == "mean" else 1)).numpy()


def _fisher_products(monkeypatch) -> list:
    """The matrices of the FisherProducts the optimizer builds, as it builds them (before
    the step moves the parameters under their graph)."""
    import hessfree.optimizer as optimizer_module

    real, seen = optimizer_module.FisherProduct, []

    def spy(loss, outputs, params, *, reduction):
        product = real(loss, outputs, params, reduction=reduction)
        seen.append(_matrix(product))
        return product

    monkeypatch.setattr(optimizer_module, "FisherProduct", spy)
    return seen


def _matrix(product) -> np.ndarray:
    eye = torch.eye(N_PARAMS, dtype=torch.float64)
    return torch.stack([product.matvec(e) for e in eye], 1).detach().numpy()


def test_fisher_warns_of_a_compiled_sum_and_names_the_ways_out(monkeypatch):
    # Fails on main for the wording: the warning read as for a hand-written loss, with no
    # word of the compile. Taken for a mean, the summed loss's per-example gradients are
    # N times its output gradient, so its Fisher comes out N = 32 times the dense float64
    # sum of g_i g_i^T, as the warning says; the reduction is not in the compiled graph
    # (experiments/README.md, "compile19").
    seen = _fisher_products(monkeypatch)
    model = _mlp()
    dense = _dense_fisher(model, "sum")
    loss_fn = torch.compile(
        lambda o, y: F.cross_entropy(o, y, reduction="sum"), backend="aot_eager"
    )
    X, y = _data()
    opt = HessianFree(model.parameters(), curvature="fisher")
    with pytest.warns(UserWarning, match="the loss is torch.compile'd") as caught:
        opt.step(lambda: (lambda o: (loss_fn(o, y), o))(model(X)))
    text = " ".join(str(w.message) for w in caught)
    assert "._orig_mod" in text and "backend='eager'" in text and "reduction='sum'" in text
    A = seen[0]
    np.testing.assert_allclose(A, 32 * dense, rtol=1e-10, atol=1e-12 * np.abs(32 * dense).max())


def test_fisher_reads_the_sum_of_an_eager_compiled_loss(monkeypatch):
    # Guard: backend='eager' keeps torch's NllLossBackward0; the Fisher product at the first
    # step equals the dense sum of g_i g_i^T (float64, per-example Jacobian), no warning.
    seen = _fisher_products(monkeypatch)
    model = _mlp()
    dense = _dense_fisher(model, "sum")
    loss_fn = torch.compile(lambda o, y: F.cross_entropy(o, y, reduction="sum"), backend="eager")
    X, y = _data()
    opt = HessianFree(model.parameters(), curvature="fisher")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="curvature='fisher' cannot tell")
        opt.step(lambda: (lambda o: (loss_fn(o, y), o))(model(X)))
    A = seen[0]
    np.testing.assert_allclose(A, dense, rtol=1e-10, atol=1e-12 * np.abs(dense).max())


# ------------------------------------------------------------------ compiled after step 1


@pytest.mark.parametrize(
    ("style", "curvature", "factor"),
    [("loss", "hessian", 1.0), ("loss", "hessian", 0.5), ("outputs", "auto", 1.0)],
)
def test_a_loss_compiled_after_the_first_step_is_refused_then(style, curvature, factor):
    # Fails on main: the walk ran at the first step only; the Hessian closure stepped on
    # with a zero second derivative through the loss (3 steps 1.1 off the uncompiled run's),
    # the Gauss-Newton one failed with "`u` must be shaped like the outputs".
    model = _mlp()
    X, y = _data()
    opt = HessianFree(model.parameters(), curvature=curvature)
    loss_fn = [F.cross_entropy]

    def closure():
        outputs = model(X)
        loss = factor * loss_fn[0](outputs, y)
        return (loss, outputs) if style == "outputs" else loss

    opt.step(closure)
    loss_fn[0] = torch.compile(F.cross_entropy, backend="aot_eager")
    before = _state(model)
    with pytest.raises(NotImplementedError, match="torch.compile'd region") as info:
        opt.step(closure)
    assert "._torchdynamo_orig_callable" in str(info.value)
    assert _unchanged(model, before)


def test_the_walk_runs_again_only_when_the_graphs_top_changes(monkeypatch):
    # Guard: one walk while the graph keeps its shape, one more at a change (the loss
    # becoming a mean of squares: no compile, so the step goes on).
    calls = []
    real = closure_module._ClosureCalls._refuse_once_differentiable

    def counting(self, evaluation, role):
        calls.append(role)
        return real(self, evaluation, role)

    monkeypatch.setattr(closure_module._ClosureCalls, "_refuse_once_differentiable", counting)
    model = _mlp()
    X, y = _data()
    opt = HessianFree(model.parameters())
    loss_fn = [F.cross_entropy]

    def closure():
        outputs = model(X)
        return loss_fn[0](outputs, y), outputs

    for _ in range(3):
        opt.step(closure)
    assert calls == ["closure"]
    loss_fn[0] = lambda o, y: F.mse_loss(o, F.one_hot(y, 3).to(o.dtype))
    for _ in range(2):
        opt.step(closure)
    assert calls == ["closure", "closure"]
