"""The lean R-op set-up: the graph for Jv keeps no cotangent, and its products stay exact.

The set-up backward pass (``create_graph=True``) of :class:`~hessfree.JacobianProduct` and the
Gauss-Newton products would save one cotangent per layer and operation; ``_rop_setup`` drops
them (the R-op never reads them). The first test walks the graph's saved tensors and checks that
a named cotangent is gone (and that an ordinary ``create_graph`` graph does keep it, so the walk
can see it); the others check the products against dense float64 oracles on layer types whose
double-backward formulas differ (LSTM, attention with LayerNorm, convolution with BatchNorm and
GroupNorm, a custom autograd Function).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import flat_params, functional
from hessfree import FisherProduct, GGNProduct, JacobianProduct
from hessfree.curvature import StructurallyDampedGGN

EXACT = dict(rtol=1e-10, atol=1e-12)


def _saved_storages(roots) -> set[int]:
    """Storage addresses of every tensor saved by a node reachable from ``roots`` (edges)."""
    seen, stack, ptrs = set(), [e.node for e in roots], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor) and t.numel() > 1:
                        ptrs.add(t.untyped_storage().data_ptr())
        stack.extend(n for n, _ in node.next_functions)
    return ptrs


def _two_layer(seen: list[torch.Tensor]):
    torch.manual_seed(0)
    l1, l2 = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()
    h = torch.sigmoid(l1(torch.randn(5, 4, dtype=torch.float64)))
    # the cotangent ∂ℓ/∂h that the set-up backward pass computes (a seed-dependent tensor)
    h.register_hook(lambda g: seen.append(g))
    out = l2(h)
    return out, F.mse_loss(out, torch.zeros_like(out)), [*l1.parameters(), *l2.parameters()]


def test_rop_graph_keeps_no_cotangent():
    seen: list[torch.Tensor] = []
    out, loss, params = _two_layer(seen)
    G = GGNProduct(loss, out, params)
    (cotangent,) = seen
    saved = _saved_storages(G.jacobian._jtu)
    assert cotangent.untyped_storage().data_ptr() not in saved
    # control: the plain create_graph graph of the same pass keeps it, and the walk finds it
    seen.clear()
    out, loss, params = _two_layer(seen)
    (go,) = torch.autograd.grad(loss, out, create_graph=True)
    jtu = torch.autograd.grad(out, params, go, create_graph=True)
    edges = [torch.autograd.graph.get_gradient_edge(t) for t in jtu]
    assert seen[0].untyped_storage().data_ptr() in _saved_storages(edges)


def test_rop_graph_keeps_convolution_cotangent():
    """Convolution's double backward reads its cotangent (a placeholder would be copied to full
    size in every product), so that one is kept; the linear layer's after it is dropped."""
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(1, 2, 3).double(), nn.Linear(8, 3).double()
    seen: list[torch.Tensor] = []
    h = conv(torch.randn(4, 1, 4, 4, dtype=torch.float64))
    h.register_hook(lambda g: seen.append(g))
    z = torch.tanh(h.flatten(1))
    z.register_hook(lambda g: seen.append(g))
    out = lin(z)
    G = GGNProduct(
        F.mse_loss(out, torch.zeros_like(out)), out, [*conv.parameters(), *lin.parameters()]
    )
    dz, dh = seen  # backward order: ∂ℓ/∂z, then ∂ℓ/∂h
    saved = _saved_storages(G.jacobian._jtu)
    assert dh.untyped_storage().data_ptr() in saved
    assert dz.untyped_storage().data_ptr() not in saved


def test_rop_graph_keeps_no_jtu_values():
    """Only the graph of Jᵀu is kept for the R-op, as edges: not its parameter-sized values."""
    out, loss, params = _two_layer([])
    G = GGNProduct(loss, out, params)
    J = G.jacobian
    assert J._jtu and all(isinstance(e, torch.autograd.graph.GradientEdge) for e in J._jtu)


class _Cube(torch.autograd.Function):
    """x³ with a hand-written (differentiable) backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.pow(3)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * g * x.square()


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.out = nn.LSTM(2, 3, batch_first=True), nn.Linear(3, 3)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att, self.norm = nn.MultiheadAttention(4, 2, batch_first=True), nn.LayerNorm(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.norm(self.att(x, x, x)[0] + x).mean(1))


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(F.gelu(_Cube.apply(self.a(x))))


def _conv():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 2, 2),
        nn.GroupNorm(1, 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2, 3),
    )


MODELS = {
    "lstm": (_LSTM, (4, 3, 2)),
    "attention_layernorm": (_Attention, (4, 3, 4)),
    "conv_batchnorm_groupnorm": (_conv, (4, 1, 6, 6)),
    "custom_function_gelu": (_Custom, (4, 3)),
}
LOSSES = {
    "ce": F.cross_entropy,
    "mse_sum": lambda o, y: F.mse_loss(o, F.one_hot(y, 3).to(o.dtype), reduction="sum"),
    # not recognised by loss_hessian_product: H_ℓ by double backward through the loss
    "generic": lambda o, y: (o.softmax(1) - F.one_hot(y, 3)).pow(4).sum(),
}


def _oracle(model, x, y, loss_fn):
    """Dense float64 J, G = JᵀH_ℓJ, gradient and empirical Fisher (torch.autograd.functional)."""
    from torch.autograd.functional import hessian, jacobian

    f, theta = functional(model), flat_params(model)
    out = f(theta, x).detach()
    J = jacobian(lambda t: f(t, x).reshape(-1), theta)
    HL = hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1))
    g = jacobian(lambda t: loss_fn(f(t, x), y), theta)
    N = x.shape[0]
    Gi = torch.stack(
        [
            jacobian(lambda t, i=i: loss_fn(f(t, x[i : i + 1]), y[i : i + 1]), theta)
            for i in range(N)
        ]
    )
    c = float(loss_fn(out, y) / sum(loss_fn(out[i : i + 1], y[i : i + 1]) for i in range(N)))
    reduction = "sum" if abs(c - 1) < 1e-9 else "mean"
    return J, J.T @ HL @ J, g, c * (Gi.T @ Gi), reduction


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_products_match_dense_oracles(model_name, loss_name):
    make, x_shape = MODELS[model_name]
    torch.manual_seed(3)
    model = make().double().eval()  # eval: BatchNorm uses its running statistics
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = torch.randint(0, 3, (x_shape[0],))
    loss_fn = LOSSES[loss_name]
    DJ, DG, Dg, DF, reduction = _oracle(model, x, y, loss_fn)
    params = list(model.parameters())
    V = torch.randn(3, DG.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = model(x)
    G = GGNProduct(loss_fn(out, y), out, params)
    for v in V:
        torch.testing.assert_close(G(v), DG @ v, **EXACT)
    torch.testing.assert_close(G.matmat(V), V @ DG, **EXACT)
    torch.testing.assert_close(G.gradient, Dg, **EXACT)
    torch.testing.assert_close(G.jacobian.jvp(V[0]).reshape(-1), DJ @ V[0], **EXACT)
    J = JacobianProduct(model(x), params)  # zero-seed R-op graph
    torch.testing.assert_close(J.jvp(V[1]).reshape(-1), DJ @ V[1], **EXACT)
    if loss_name != "generic":
        out = model(x)
        Fp = FisherProduct(loss_fn(out, y), out, params, reduction=reduction)
        torch.testing.assert_close(Fp(V[2]), DF @ V[2], **EXACT)


def test_structural_damping_hidden_energy_matches_dense_jacobian():
    torch.manual_seed(2)
    rnn, lin = nn.RNN(2, 3, batch_first=True).double(), nn.Linear(3, 2).double()
    params = [*rnn.parameters(), *lin.parameters()]
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    h = rnn(x)[0]
    out = lin(h[:, -1])
    P = StructurallyDampedGGN(out.square().sum(), out, h, params, weight=0.5)
    names = [n for n, _ in rnn.named_parameters()]
    sizes = [p.numel() for p in rnn.parameters()]

    def hidden(theta):
        parts = [c.view(p.shape) for c, p in zip(theta.split(sizes), rnn.parameters(), strict=True)]
        return torch.func.functional_call(rnn, dict(zip(names, parts, strict=True)), (x,))[
            0
        ].reshape(-1)

    theta = torch.cat([p.detach().reshape(-1) for p in rnn.parameters()])
    Jh = torch.autograd.functional.jacobian(hidden, theta)
    n_lin = sum(p.numel() for p in lin.parameters())
    Jh = torch.cat([Jh, Jh.new_zeros(Jh.shape[0], n_lin)], dim=1)
    X = torch.randn(2, Jh.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(P.hidden_energy(X), (X @ Jh.T).square().sum(1), **EXACT)


@pytest.mark.parametrize("closure_kind", ["outputs", "residuals"])
def test_optimizer_steps_leave_no_graph_behind(closure_kind):
    """The saved-tensor hooks' memo of graph nodes once formed a reference cycle through C++ that
    gc cannot see: every step's graphs stayed alive until exit (75 tensors, ~6 MB, a step on
    experiments/pinn.py's Poisson problem). Steps after the first few must hold no more."""
    import gc
    import weakref

    from hessfree import HessianFree

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.rand(40, 2, dtype=torch.float64)

    def closure():
        z = x.clone().requires_grad_(True)
        u = net(z).squeeze(1)
        if closure_kind == "outputs":
            return F.mse_loss(u, torch.sin(z[:, 0]).detach()), u
        (du,) = torch.autograd.grad(u.sum(), z, create_graph=True)  # a PINN-style residual
        r1, r2 = du[:, 0] - torch.cos(z[:, 0]).detach(), u[:4]
        return (r1**2).mean() + (r2**2).mean(), (r1, r2)

    opt = HessianFree(net.parameters(), cg_max_iter=10)

    def tensors() -> list[torch.Tensor]:
        gc.collect()
        return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]

    # This test's tensors only: an earlier test's may die during these steps (the FakeTensors
    # of a model compiled with aot_eager, which torch lets go lazily, at a later operation),
    # and a count over the whole process then falls by chance of the order (flaky19).
    earlier = {id(t): weakref.ref(t) for t in tensors()}

    def live_tensors() -> int:
        return sum(1 for t in tensors() if not (id(t) in earlier and earlier[id(t)]() is t))

    for _ in range(3):
        opt.step(closure)
    before = live_tensors()
    for _ in range(5):
        opt.step(closure)
    assert live_tensors() == before


def _pinn_residuals():
    """A PINN-style (loss, residual blocks) closure: the residual holds ∂u/∂x (pinn.py's kind)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    net = net.double()
    z = torch.rand(12, 2, dtype=torch.float64).requires_grad_(True)
    u = net(z).squeeze(1)
    (du,) = torch.autograd.grad(u.sum(), z, create_graph=True)
    r1, r2 = du[:, 0] + du[:, 1] - u * (1 - u), u[:3]
    return (r1**2).mean() + (r2**2).mean(), (r1, r2), list(net.parameters())


def _aten_ops(fn) -> dict[str, int]:
    """How often each aten op runs in ``fn()``, without ``detach`` (each saved tensor's unpack
    through the lean set-up's hooks is one; they copy nothing)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is not torch.ops.aten.detach:
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        fn()
    return dict(count.ops)


def test_gn_product_on_residual_blocks_runs_only_the_textbook_ops():
    """GN product of residual blocks, against the textbook's three autograd calls on a plain
    graph (Jv by the R-op, H_ℓ by double backward through the loss, Jᵀ) and one ``cat``: the
    same value and the same aten ops, so no copy, cast, fill or host sync on the product's
    path. (Each block's result used to start as an output-sized ``zeros_like``/``new_zeros``,
    overwritten at once: two fills per block and product.)"""
    lean = GGNProduct(*_pinn_residuals())
    loss, outs, params = _pinn_residuals()
    go = torch.autograd.grad(loss, outs, create_graph=True)
    us = [g.detach().requires_grad_() for g in go]
    jtu = torch.autograd.grad(outs, params, us, create_graph=True)

    def grad(ys, xs, seeds):
        return torch.autograd.grad(ys, xs, seeds, retain_graph=True)

    def textbook(v):
        chunks = v.split([p.numel() for p in params])
        vs = [c.view_as(p) for c, p in zip(chunks, params, strict=True)]
        hjv = grad(go, outs, grad(jtu, us, vs))
        return torch.cat([t.reshape(-1) for t in grad(outs, params, hjv)])

    v = torch.randn(lean.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lean.matvec(v), textbook(v))
    assert _aten_ops(lambda: lean.matvec(v)) == _aten_ops(lambda: textbook(v))
