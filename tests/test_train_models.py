"""Model factory, sparse initialisation, losses and metrics of the experiment runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessfree.train import models
from hessfree.train.models import MLP, Autoencoder, ConvNet, TanhRNN, build_model, sparse_init_
from hessfree.train.objectives import make_loss, make_objective


def test_autoencoder_is_mirrored_with_linear_code_and_logit_outputs():
    torch.manual_seed(0)
    ae = Autoencoder([784, 400, 200, 100, 50, 25, 6])
    enc = [m for m in ae.encoder if isinstance(m, nn.Linear)]
    dec = [m for m in ae.decoder if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in enc] == [
        (784, 400),
        (400, 200),
        (200, 100),
        (100, 50),
        (50, 25),
        (25, 6),
    ]
    assert [(m.in_features, m.out_features) for m in dec] == [
        (6, 25),
        (25, 50),
        (50, 100),
        (100, 200),
        (200, 400),
        (400, 784),
    ]
    assert isinstance(ae.encoder[-1], nn.Linear)  # linear code layer
    assert isinstance(ae.decoder[-1], nn.Linear)  # logits: the loss applies the logistic
    assert all(
        isinstance(m, nn.Sigmoid)
        for m in ae.modules()
        if not isinstance(m, (nn.Linear, nn.Sequential, Autoencoder))
    )
    x = torch.rand(3, 1, 28, 28)
    assert ae(x).shape == (3, 784) and ae.encode(x).shape == (3, 6)


def test_sparse_init_gives_fifteen_incoming_connections_and_zero_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 30), nn.Linear(30, 7), nn.Linear(7, 2), nn.Conv2d(3, 4, 3))
    sparse_init_(model)
    for layer, expected in zip(model, (15, 15, 7, 15), strict=True):
        nonzero = (layer.weight.view(layer.weight.shape[0], -1) != 0).sum(dim=1)
        assert bool((nonzero == expected).all()), (layer, nonzero)
        assert bool((layer.bias == 0).all())
    big = nn.Linear(2000, 500)
    sparse_init_(big, generator=torch.Generator().manual_seed(0))
    values = big.weight.detach()[big.weight != 0]
    assert values.numel() == 500 * 15
    assert abs(float(values.std()) - 1.0) < 0.05  # N(0, 1) weights


def test_sparse_init_is_seeded():
    a, b = nn.Linear(50, 20), nn.Linear(50, 20)
    sparse_init_(a, generator=torch.Generator().manual_seed(1))
    sparse_init_(b, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize(
    ("name", "shape", "options", "kind"),
    [
        ("mlp", (1, 8, 8), {"hidden_sizes": [16, 8], "activation": "relu"}, MLP),
        ("mlp", (30,), {"hidden_sizes": []}, MLP),
        ("cnn", (1, 8, 8), {"channels": [4, 8], "hidden_size": 16}, ConvNet),
        ("cnn", (1, 28, 28), {}, ConvNet),
        ("rnn", (12, 2), {"hidden_size": 10}, TanhRNN),
    ],
    ids=["mlp-image", "mlp-linear", "cnn-digits", "cnn-mnist", "rnn"],
)
def test_build_model_output_shapes(name, shape, options, kind):
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_outputs=3, **options)
    assert isinstance(model, kind)
    assert model(torch.rand(5, *shape)).shape == (5, 3)


def test_build_model_sparse_option_and_seeding():
    torch.manual_seed(0)
    a = build_model("mlp", input_shape=(40,), num_outputs=10, init="sparse", sparse_connections=5)
    assert int((a.net[0].weight != 0).sum(dim=1).max()) == 5
    torch.manual_seed(0)
    b = build_model("mlp", input_shape=(40,), num_outputs=10, init="sparse", sparse_connections=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_build_model_errors():
    with pytest.raises(ValueError, match=r"`layer_sizes\[0\]` = 100 must equal the input size 784"):
        build_model("autoencoder", input_shape=(1, 28, 28), layer_sizes=[100, 6])
    with pytest.raises(ValueError, match="needs sequence inputs"):
        build_model("rnn", input_shape=(64,), num_outputs=1)
    with pytest.raises(ValueError, match="needs image inputs"):
        build_model("cnn", input_shape=(64,), num_outputs=1)
    with pytest.raises(ValueError, match="Unknown model 'resnet'"):
        build_model("resnet", input_shape=(3,), num_outputs=1)
    with pytest.raises(ValueError, match="Bad options for model 'mlp'"):
        build_model("mlp", input_shape=(3,), num_outputs=1, layers=2)


def test_rnn_supports_double_backward():
    torch.manual_seed(0)
    rnn = TanhRNN(2, 4, 1)
    loss = rnn(torch.rand(3, 5, 2)).square().sum()
    params = list(rnn.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hv = torch.autograd.grad(sum((g * torch.ones_like(g)).sum() for g in grads), params)
    assert all(h.shape == p.shape for h, p in zip(hv, params, strict=True))


def test_loss_reductions():
    torch.manual_seed(0)
    z, t = torch.randn(4, 6), torch.rand(4, 6)
    torch.testing.assert_close(make_loss("mse", "sum_per_case")(z, t), 6 * F.mse_loss(z, t))
    torch.testing.assert_close(
        make_loss("bce_with_logits", "sum_per_case")(z, t),
        6 * F.binary_cross_entropy_with_logits(z, t),
    )
    y = torch.tensor([0, 5, 2, 1])
    torch.testing.assert_close(
        make_loss("cross_entropy", "sum_per_case")(z, y), F.cross_entropy(z, y)
    )
    with pytest.raises(ValueError, match="Unknown loss 'l1'"):
        make_loss("l1")
    with pytest.raises(ValueError, match="Unknown reduction 'sum'"):
        make_loss("mse", "sum")


def test_metrics():
    obj = make_objective("classification", "cross_entropy", "mean")
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    assert float(obj.metric(logits, torch.tensor([0, 1, 1]))) == pytest.approx(2 / 3)
    assert obj.higher_is_better
    ae = make_objective("reconstruction", "bce_with_logits", "sum_per_case")
    x = torch.rand(2, 1, 3, 3)
    assert ae.targets(x, None).shape == (2, 9)
    # Squared error per case of sigmoid(logits): sum over pixels, mean over cases.
    logits = torch.randn(2, 9)
    expected = (torch.sigmoid(logits) - x.flatten(1)).square().sum(1).mean()
    torch.testing.assert_close(ae.metric(logits, x.flatten(1)), expected)
    assert not ae.higher_is_better
    add = make_objective("regression", "mse", "mean", dataset="addition")
    pred, target = torch.tensor([[1.0], [1.03], [0.5]]), torch.tensor([[1.0], [1.0], [0.6]])
    assert add.metric_name == "error_rate"
    assert float(add.metric(pred, target)) == pytest.approx(1 / 3)


def test_rnn_hidden_states_match_forward():
    torch.manual_seed(0)
    rnn = TanhRNN(2, 4, 1)
    x = torch.randn(3, 5, 2)
    out, hidden = rnn.forward_with_hidden(x)
    assert hidden.shape == (3, 5, 4)
    torch.testing.assert_close(out, rnn(x))
    torch.testing.assert_close(rnn.readout(hidden[:, -1]), out)
    # the first state is tanh of the first input projection, the recurrence feeds the rest
    torch.testing.assert_close(hidden[:, 0], torch.tanh(rnn.input(x[:, 0])))
    torch.testing.assert_close(
        hidden[:, 1], torch.tanh(rnn.input(x[:, 1]) + rnn.recurrent(hidden[:, 0]))
    )


def _rnn_case(init="default", spectral_radius=None):
    torch.manual_seed(3)
    rnn = build_model(
        "rnn",
        input_shape=(6, 2),
        num_outputs=1,
        hidden_size=5,
        init=init,
        spectral_radius=spectral_radius,
    ).double()
    x = torch.rand(4, 6, 2, dtype=torch.float64)
    return rnn, x


def test_rnn_hidden_stack_has_torch_stack_derivatives():
    """The hidden states' stack (cat_last, a split backward) against torch.stack, finite
    differences (gradcheck / gradgradcheck) and forward-mode AD against torch.stack's."""
    from hessfree._graph_ops import cat_last

    def stack(*s):
        return cat_last(s).unflatten(-1, (len(s), s[0].shape[-1]))

    states = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    torch.testing.assert_close(stack(*states), torch.stack(states, 1), rtol=0, atol=0)
    assert torch.autograd.gradcheck(stack, states)
    assert torch.autograd.gradgradcheck(lambda *s: stack(*s).sin(), states)
    tangents = [torch.randn_like(s) for s in states]
    _, jvp = torch.func.jvp(stack, tuple(states), tuple(tangents))
    torch.testing.assert_close(jvp, torch.stack(tangents, 1))


def test_rnn_structurally_damped_products_match_dense_jacobians():
    """HF's products on TanhRNN (its hidden-state stack included) against float64 Jacobians
    from torch.autograd.functional: (J_o^T H_l J_o + w J_h^T J_h) v, one and batched."""
    from hessfree import StructurallyDampedGGN

    rnn, x = _rnn_case()
    y = torch.rand(4, 1, dtype=torch.float64)
    params = list(rnn.parameters())
    names = [f"m.{n}" for n, _ in rnn.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def out_of(t):
        state = dict(zip(names, _split(t, params), strict=True))
        return torch.func.functional_call(_WithHidden(rnn), state, (x,))

    Jo = torch.autograd.functional.jacobian(lambda t: out_of(t)[0].reshape(-1), theta)
    Jh = torch.autograd.functional.jacobian(lambda t: out_of(t)[1].reshape(-1), theta)
    w = 0.3
    expected = 2 * Jo.T @ Jo / 4 + w * Jh.T @ Jh  # mse 'mean' over 4 cases: H_l = 2/4 I
    out, hidden = rnn.forward_with_hidden(x)
    P = StructurallyDampedGGN(F.mse_loss(out, y), out, hidden, params, weight=w)
    V = torch.randn(3, theta.numel(), dtype=torch.float64)
    for v in V:
        torch.testing.assert_close(P(v), expected @ v)
    torch.testing.assert_close(P.matmat(V), V @ expected.T)
    torch.testing.assert_close(P.hidden_energy(V), ((V @ Jh.T) ** 2).sum(1))


class _WithHidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.forward_with_hidden(x)


def _split(t, params):
    sizes = [p.numel() for p in params]
    return [c.view(p.shape) for c, p in zip(t.split(sizes), params, strict=True)]


@pytest.mark.parametrize("init", ["default", "sparse"])
def test_rnn_spectral_radius(init):
    """The recurrent weights' largest |eigenvalue| (numpy.linalg) after init and rescaling."""
    rnn, _ = _rnn_case(init, spectral_radius=1.2)
    w = rnn.recurrent.weight.detach().numpy()
    assert np.abs(np.linalg.eigvals(w)).max() == pytest.approx(1.2, rel=1e-6)
    plain, _ = _rnn_case(init)  # same seed, no rescaling: the same matrix up to the scale
    ratio = rnn.recurrent.weight / plain.recurrent.weight
    finite = plain.recurrent.weight != 0
    torch.testing.assert_close(ratio[finite], ratio[finite][:1].expand(int(finite.sum())))
    if init == "sparse":  # the sparsity pattern (15 > 5 units here: all kept) and zero biases
        assert float(rnn.input.bias.detach().abs().sum()) == 0.0
    with pytest.raises(ValueError, match="`spectral_radius` must be > 0 or None, got -1"):
        TanhRNN(2, 3, 1, spectral_radius=-1.0)
    zero = TanhRNN(2, 3, 1)
    zero.spectral_radius = 1.0
    torch.nn.init.zeros_(zero.recurrent.weight)
    with pytest.raises(ValueError, match="spectral radius 0.0"):
        zero.rescale_recurrent_()


def test_tanh_rnn_forward_is_the_explicit_recursion_and_skips_the_states_copy(monkeypatch):
    # oracle: h_t = tanh(W_x x_t + b + W_h h_{t-1}), h_0 = 0, written out in float64
    torch.manual_seed(3)
    rnn = TanhRNN(2, 4, 1, spectral_radius=1.1).double()
    x = torch.randn(3, 6, 2, dtype=torch.float64)
    wx, b, wh = rnn.input.weight, rnn.input.bias, rnn.recurrent.weight
    h, states = torch.zeros(3, 4, dtype=torch.float64), []
    for t in range(6):
        h = torch.tanh(x[:, t] @ wx.T + b + h @ wh.T)
        states.append(h)
    out, hidden = rnn.forward_with_hidden(x)
    torch.testing.assert_close(hidden, torch.stack(states, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, rnn.readout(h), rtol=1e-12, atol=1e-12)
    # forward: the same outputs bit for bit, without concatenating the states it drops where
    # no graph is built; with a graph, one node holds the loop (_tanh_recurrence) and its
    # values are the loop's bit for bit
    calls = []
    real = models.cat_last
    monkeypatch.setattr(models, "cat_last", lambda ts: calls.append(len(ts)) or real(ts))
    with torch.no_grad():
        assert torch.equal(rnn(x), out) and calls == []
        out0, hidden0 = rnn.forward_with_hidden(x)
    assert calls == [6]
    assert torch.equal(out0, out) and torch.equal(hidden0, hidden)
    assert torch.equal(rnn(x), out) and calls == [6]


# ------------------------------------------------------------------ the fused recurrence node
_EXACT = dict(rtol=1e-10, atol=1e-12)


def _loop_outputs(theta, rnn, x):
    """The explicit float64 loop h_t = tanh(W_x x_t + b + W_h h_{t-1}), plain autograd ops (the
    oracle: independent of TanhRNN's fused node): (outputs, every state)."""
    sizes = [p.numel() for p in rnn.parameters()]
    wx, b, wh, wo, bo = (
        c.view(p.shape) for c, p in zip(theta.split(sizes), rnn.parameters(), strict=True)
    )
    h, hs = torch.zeros(x.shape[0], wh.shape[0], dtype=x.dtype), []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ wx.T + b + h @ wh.T)
        hs.append(h)
    return h @ wo.T + bo, torch.stack(hs, 1)


@pytest.mark.parametrize("steps", [1, 7])
def test_tanh_rnn_products_match_the_explicit_loop_in_float64(steps):
    """Gradient, Hessian, Gauss-Newton (plain and structurally damped, one and batched) and
    forward-mode products of TanhRNN (its fused recurrence node, _tanh_recurrence) against
    dense float64 matrices of the explicit loop from torch.autograd.functional."""
    from hessfree import GGNProduct, HessianProduct, StructurallyDampedGGN

    torch.manual_seed(5)
    rnn = TanhRNN(2, 4, 1, spectral_radius=1.1).double()
    x, y = torch.randn(3, steps, 2, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    params = list(rnn.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def f(t):
        return F.mse_loss(_loop_outputs(t, rnn, x)[0], y)

    Hf = torch.autograd.functional.hessian(f, theta)
    Jo = torch.autograd.functional.jacobian(
        lambda t: _loop_outputs(t, rnn, x)[0].reshape(-1), theta
    )
    Jh = torch.autograd.functional.jacobian(
        lambda t: _loop_outputs(t, rnn, x)[1].reshape(-1), theta
    )
    G = 2 * Jo.T @ Jo / 3  # mse 'mean' over 3 cases: H_l = 2/3 I
    V = torch.randn(2, theta.numel(), dtype=torch.float64)

    out = rnn(x)
    loss = F.mse_loss(out, y)
    g = torch.cat(
        [
            t.reshape(-1)
            for t in torch.autograd.grad(
                loss, params, retain_graph=True, allow_unused=True, materialize_grads=True
            )
        ]
    )
    torch.testing.assert_close(g, torch.autograd.functional.jacobian(f, theta), **_EXACT)
    torch.testing.assert_close(HessianProduct(loss, params)(V[0]), Hf @ V[0], **_EXACT)
    torch.testing.assert_close(GGNProduct(loss, out, params)(V[0]), G @ V[0], **_EXACT)
    out, hidden = rnn.forward_with_hidden(x)
    P = StructurallyDampedGGN(F.mse_loss(out, y), out, hidden, params, weight=0.3)
    expected = G + 0.3 * Jh.T @ Jh
    torch.testing.assert_close(P(V[0]), expected @ V[0], **_EXACT)
    torch.testing.assert_close(P.matmat(V), V @ expected.T, **_EXACT)
    torch.testing.assert_close(P.hidden_energy(V), ((V @ Jh.T) ** 2).sum(1), **_EXACT)
    # forward mode through the node's jvp rule
    names, sizes = [n for n, _ in rnn.named_parameters()], [p.numel() for p in params]

    def call(t):
        state = {n: c.view(p.shape) for n, c, p in zip(names, t.split(sizes), params, strict=True)}
        return torch.func.functional_call(rnn, state, (x,))

    with torch.enable_grad():
        _, jv = torch.func.jvp(call, (theta,), (V[0],))
    torch.testing.assert_close(jv.reshape(-1), Jo @ V[0], **_EXACT)


def test_tanh_rnn_graph_and_products_do_not_grow_by_the_engine_nodes_of_each_step():
    """One autograd node holds TanhRNN's loop: the forward graph's node count does not depend on
    T, and a structurally damped Gauss-Newton product dispatches about 8 aten ops per step
    (autograd's own graph of the loop: 28), counted with a dispatch mode."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from hessfree import StructurallyDampedGGN

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    def nodes(root):
        seen, stack = set(), [root]
        while stack:
            n = stack.pop()
            if n is not None and n not in seen:
                seen.add(n)
                stack.extend(m for m, _ in n.next_functions)
        return len(seen)

    counts = {}
    for steps in (10, 20):
        torch.manual_seed(0)
        rnn = TanhRNN(2, 4, 1).double()
        x, y = torch.randn(3, steps, 2, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
        out, hidden = rnn.forward_with_hidden(x)
        loss = F.mse_loss(out, y)
        P = StructurallyDampedGGN(loss, out, hidden, list(rnn.parameters()), weight=0.1)
        v = torch.ones(P.layout.numel, dtype=torch.float64)
        with Count() as c:
            P.matvec(v)
        counts[steps] = (nodes(loss.grad_fn) + nodes(hidden.grad_fn), sum(c.ops.values()))
    assert counts[10][0] == counts[20][0]
    per_step = (counts[20][1] - counts[10][1]) / 10
    assert per_step <= 12, counts


def test_tanh_rnn_float32_backward_forms_tanh_slopes_with_one_rounding():
    """The last step's gradient of TanhRNN's recurrence, D_T ⊙ G_T with D_T = 1 - h_T², against
    the same arithmetic in float64 on the float32 states: on saturated units (|h| > 0.99) the
    slope needs one rounding (as torch's tanh backward); rounding h² first cancels (relative
    error up to ~1e-5 there)."""
    from hessfree.train._tanh_recurrence import tanh_recurrence

    torch.manual_seed(2)
    u = (8 * torch.randn(256, 3, 8)).requires_grad_()  # most units saturated
    w = 0.3 * torch.randn(8, 8)
    H, _ = tanh_recurrence(u, w)
    G = torch.randn_like(H)
    (du,) = torch.autograd.grad(H, u, G)
    h = H[:, -1].detach().double()
    oracle = G[:, -1].double() * (1 - h * h)
    sat = (h.abs() > 0.99) & (oracle != 0)
    assert int(sat.sum()) > 500
    rel = ((du[:, -1].double() - oracle).abs() / oracle.abs())[sat]
    assert float(rel.max()) < 3e-7, float(rel.max())


def test_tanh_rnn_slopes_are_rounded_once_without_vectorised_kernels_too():
    """The same D_T = 1 - h_T² in a child process whose torch runs its scalar kernels
    (``ATEN_CPU_CAPABILITY=default``, as on a CPU without AVX2), where ``addcmul`` rounds h²
    first: the slopes must not depend on the CPU the suite runs on."""
    import os
    import subprocess
    import sys

    child = (
        "import torch\n"
        "from hessfree.train._tanh_recurrence import _slopes\n"
        "torch.manual_seed(2)\n"
        "h = torch.tanh(8 * torch.randn(4096))\n"
        "oracle = 1 - h.double() ** 2\n"
        "sat = (h.abs() > 0.99) & (oracle != 0)\n"
        "rel = ((_slopes(h).double() - oracle).abs() / oracle.abs())[sat]\n"
        "print(int(sat.sum()), float(rel.max()))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    count, worst = out.stdout.split()
    assert int(count) > 1500
    assert float(worst) < 6.0e-8, worst  # float32's half ulp: one rounding of the exact value
