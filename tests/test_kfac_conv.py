"""K-FAC for convolution layers (KFC, Grosse & Martens 2016) against independent oracles.

Oracles: ``nn.Linear``'s K-FAC (a 1×1 convolution on a 1×1 image is that layer), patches cut
out by explicit loops and output-side vectors from ``torch.autograd.functional.jacobian``, the
dense float64 Gauss-Newton matrix from ``torch.autograd.functional`` where KFC is exact (one
output position of a linear model under squared error), and ``F.conv1d``/``F.conv2d``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_kfac import _context  # the same PrecondContext of a GGN as the linear tests'
from torch import nn

import hessfree._precond_choice
from hessfree import HessianFree, KFACPreconditioner

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small convolutions on 2 shared cores: one thread is ~50x faster than two waiting."""


@pytest.fixture
def kfac_conv(monkeypatch):
    """precond='kfac' with convolutions (off by default: "kfacconv" measured them worse)."""
    monkeypatch.setattr(hessfree._precond_choice, "_KFAC_CONV", True)


def _dense_ggn(model, x, y, loss_fn) -> np.ndarray:
    """Jᵀ H_ℓ J in float64 over the trained parameters, from autograd.functional."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(flat):
        chunks = flat.split([p.numel() for _, p in named])
        ws = {n: c.view(p.shape) for (n, p), c in zip(named, chunks, strict=True)}
        return torch.func.functional_call(model, ws, (x,))

    out0 = outputs(flat0).detach()
    J = torch.autograd.functional.jacobian(outputs, flat0).reshape(out0.numel(), -1)
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(out0), y), out0.reshape(-1))
    return (J.T @ H @ J).numpy()


def _closure(model, x, y, loss_fn=F.mse_loss):
    def closure():
        out = model(x)
        return loss_fn(out, y), out

    return closure


@pytest.mark.parametrize("num_probes", [None, 2])
def test_a_1x1_convolution_on_a_1x1_image_is_the_linear_layers_kfac(num_probes):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=DTYPE), torch.randn(6, 4, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DTYPE)
    conv = nn.Sequential(
        nn.Unflatten(1, (3, 1, 1)), nn.Conv2d(3, 5, 1), nn.Tanh(), nn.Flatten(), nn.Linear(5, 4)
    ).to(DTYPE)
    with torch.no_grad():
        conv[1].weight.copy_(lin[0].weight.view(5, 3, 1, 1))
        conv[1].bias.copy_(lin[0].bias)
        conv[4].load_state_dict(lin[2].state_dict())
    applied = []
    for model in (lin, conv):
        K = KFACPreconditioner(model, include_conv=True, num_probes=num_probes)
        ctx, params = _context(model, x, y, F.mse_loss, 0.05)
        apply = K(ctx)
        applied.append((K, apply(torch.arange(44, dtype=DTYPE).sin())))
    (K1, z1), (K2, z2) = applied
    assert len(K2.layers) == 2
    for (A1, G1), (A2, G2) in zip(K1.factors, K2.factors, strict=True):
        torch.testing.assert_close(A2, A1, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(G2, G1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z2, z1, rtol=1e-10, atol=1e-12)


def _loop_patches(x, k, stride, padding, dilation) -> np.ndarray:
    """Rows [example, output position] of the patches, cut out by loops (zero padding)."""
    x = x.numpy()
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * padding[0], w + 2 * padding[1]))
    xp[:, :, padding[0] : padding[0] + h, padding[1] : padding[1] + w] = x
    ho = (h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    rows = []
    for i in range(n):
        for r in range(ho):
            for s in range(wo):
                patch = [
                    xp[i, ch, r * stride[0] + a * dilation[0], s * stride[1] + b * dilation[1]]
                    for ch in range(c)
                    for a in range(k[0])
                    for b in range(k[1])
                ]
                rows.append(patch)
    return np.array(rows)


def test_conv_factors_equal_loop_patches_and_autograd_output_vectors():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, 6, generator=g, dtype=DTYPE)
    k, stride, padding, dilation = (2, 3), (2, 1), (1, 0), (1, 2)
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, k, stride=stride, padding=padding, dilation=dilation).to(DTYPE)
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.LazyLinear(2).to(DTYPE))
    model = nn.Sequential(conv, head)
    model(x)  # materialise the lazy head
    y = torch.randn(3, 2, generator=g, dtype=DTYPE)
    K = KFACPreconditioner(model, include_conv=True, num_probes=None, rank=None)
    ctx, _ = _context(model, x, y, F.mse_loss, 0.1)
    K(ctx)
    A, G = K.factors[0]
    # A: the mean of [a; 1][a; 1]ᵀ over examples and output positions
    rows = _loop_patches(x, k, stride, padding, dilation)
    rows = np.hstack([rows, np.ones((len(rows), 1))])
    np.testing.assert_allclose(A.numpy(), rows.T @ rows / len(rows), rtol=1e-12, atol=1e-14)
    # G: Σ over examples and positions of Σ_j h_j δ_j δ_jᵀ, δ_j = ∂o_j/∂s at that position
    s = conv(x).detach()
    J = torch.autograd.functional.jacobian(head, s)  # (n, 2, n, 3, H', W')
    h = torch.autograd.functional.hessian(lambda o: F.mse_loss(o.view(3, 2), y), head(s).view(-1))
    h = h.diagonal().view(3, 2)
    G_loop = np.zeros((3, 3))
    for i in range(3):
        for j in range(2):
            d = J[i, j, i].reshape(3, -1).numpy()  # (channels, positions)
            G_loop += h[i, j].item() * d @ d.T
    np.testing.assert_allclose(G.numpy(), G_loop, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "case",
    [
        ("conv2d", dict(kernel_size=3), (3, 3)),
        ("conv2d", dict(kernel_size=3, padding=1, stride=2), (2, 2)),
        ("conv1d", dict(kernel_size=4, padding="valid"), (4,)),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_one_output_position_gives_the_dense_damped_inverse_of_the_true_ggn(case, bias):
    kind, kw, size = case
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 2, *size, generator=g, dtype=DTYPE)
    y = torch.randn(7, 3, generator=g, dtype=DTYPE)
    torch.manual_seed(2)
    layer = (nn.Conv2d if kind == "conv2d" else nn.Conv1d)(2, 3, bias=bias, **kw)
    model = nn.Sequential(layer, nn.Flatten()).to(DTYPE)
    assert model(x).shape == (7, 3)  # one output position: KFC is exact here
    K = KFACPreconditioner(
        model, include_conv=True, num_probes=None, relative_damping=0.0, rank=None
    )
    mu = 0.3
    ctx, _ = _context(model, x, y, F.mse_loss, mu)
    apply = K(ctx)
    C = _dense_ggn(model, x, y, F.mse_loss)
    v = np.random.default_rng(3).standard_normal(C.shape[0])
    z = apply(torch.from_numpy((C + mu * np.eye(len(v))) @ v))
    np.testing.assert_allclose(z.numpy(), v, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=(2, 3), padding="same", dilation=(2, 1)),
        dict(kernel_size=3, stride=2, padding=(2, 1), dilation=2),
        dict(kernel_size=4, padding="same"),  # conv1d, even kernel: torch pads one more right
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's notice
def test_patches_times_the_weight_matrix_is_the_convolution(kw):
    from hessfree.preconditioning import _Patches

    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    if isinstance(kw["kernel_size"], int) and kw.get("stride") is None:
        conv = nn.Conv1d(3, 5, **kw).to(DTYPE)
        x = torch.randn(2, 3, 9, generator=g, dtype=DTYPE)
    else:
        conv = nn.Conv2d(3, 5, **kw).to(DTYPE)
        x = torch.randn(2, 3, 7, 8, generator=g, dtype=DTYPE)
    s = conv(x).detach()
    rows = _Patches(conv).rows(x)
    got = rows @ conv.weight.detach().view(5, -1).T + conv.bias.detach()
    want = s.movedim(1, -1).reshape(-1, 5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _cnn(groups=1, padding_mode="zeros", seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode=padding_mode, groups=groups),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3),
        nn.Flatten(),
        nn.Linear(12, 2),
    ).to(DTYPE)


def _images(n=5, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=DTYPE), torch.randn(
        n, 2, generator=g, dtype=DTYPE
    )


def test_precond_kfac_covers_conv_layers_and_resumes_bitwise_from_a_state_dict(kfac_conv):
    x, y = _images(n=3)
    model = _cnn()
    opt = HessianFree(model.parameters(), precond="kfac")
    for _ in range(2):
        opt.step(_closure(model, x, y))
    assert [m.weight.dim() for m in opt.precond.layers] == [4, 4, 2]
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    assert saved["precond"]["state"]["layers"] == [[0, 1], [2, 3], [4, 5]]
    for _ in range(2):
        opt.step(_closure(model, x, y))
    resumed = _cnn(seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = HessianFree(resumed.parameters(), precond="kfac")
    opt2.load_state_dict(saved)  # before any step: the layers from the saved indices
    for _ in range(2):
        opt2.step(_closure(resumed, x, y))
    pairs = zip(model.parameters(), resumed.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)


def test_a_frozen_conv_bias_gives_the_true_ggn_inverse_a_frozen_weight_leaves_it_out(kfac_conv):
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 2, 3, 3, generator=g, dtype=DTYPE), torch.randn(6, 3, generator=g)
    y = y.to(DTYPE)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()).to(DTYPE)
    model[0].bias.requires_grad_(False)
    K = KFACPreconditioner(model, include_conv=True, num_probes=None, relative_damping=0.0)
    ctx, _ = _context(model, x, y, F.mse_loss, 0.2)
    apply = K(ctx)
    assert K.factors[0][0].shape == (18, 18)  # no bias row
    C = _dense_ggn(model, x, y, F.mse_loss)
    r = np.random.default_rng(7).standard_normal(C.shape[0])
    want = np.linalg.solve(C + 0.2 * np.eye(len(r)), r)
    np.testing.assert_allclose(apply(torch.from_numpy(r)).numpy(), want, rtol=1e-9, atol=1e-10)
    # a frozen weight: the conv is left out, its trained bias passes through unpreconditioned
    xi, yi = _images()
    net = _cnn()
    net[0].weight.requires_grad_(False)
    opt = HessianFree([p for p in net.parameters() if p.requires_grad], precond="kfac")
    opt.step(_closure(net, xi, yi))
    assert [m.weight for m in opt.precond.layers] == [net[2].weight, net[4].weight]
    z = opt.precond.apply_with(opt._params(), 1.0)(torch.ones(4 + 111 + 26, dtype=DTYPE))
    assert torch.equal(z[:4], torch.ones(4, dtype=DTYPE))


@pytest.mark.parametrize("what", ["groups", "padding_mode"])
def test_unsupported_convs_are_refused_when_named_and_left_out_when_found(what, kfac_conv):
    kw = {"groups": dict(groups=2), "padding_mode": dict(padding_mode="reflect")}[what]
    model = _cnn(**kw)
    named = "groups=2" if what == "groups" else "padding_mode='reflect'"
    with pytest.raises(ValueError, match=rf"layer 0 \(Conv2d.*\): {named}.*only"):
        KFACPreconditioner([model[0], model[2]])
    assert [m.weight for m in KFACPreconditioner(model, include_conv=True).layers] == [
        model[2].weight,
        model[4].weight,
    ]
    x, y = _images()
    opt = HessianFree(model.parameters(), precond="kfac")
    opt.step(_closure(model, x, y))
    assert [m.weight for m in opt.precond.layers] == [model[2].weight, model[4].weight]
    n0 = sum(p.numel() for p in model[0].parameters())
    r = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=DTYPE)
    z = opt.precond.apply_with(opt._params(), 1.0)(r)
    assert torch.equal(z[:n0], r[:n0]) and not torch.equal(z[n0:], r[n0:])


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.conv(torch.tanh(self.conv(x))).flatten(1))


def test_a_conv_called_twice_is_refused_under_kfac_and_by_the_hooked_form(kfac_conv):
    x, y = _images()
    torch.manual_seed(0)
    model = _Twice().to(DTYPE)
    opt = HessianFree(model.parameters(), precond="kfac")
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d.*\) ran 2 times"):
        opt.step(_closure(model, x, y))
    K = KFACPreconditioner(model, include_conv=True)
    ctx, _ = _context(model, x, y, F.mse_loss, 1.0)
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d.*\) ran 2 times in one forward"):
        K(ctx)


def test_convolutions_are_left_out_unless_asked_for():
    x, y = _images()
    for precond in ("kfac", "auto"):
        model = _cnn()
        opt = HessianFree(model.parameters(), precond=precond)
        opt.step(_closure(model, x, y))
        kfac = opt.precond if precond == "kfac" else opt._auto_precond
        assert kfac is None or [m.weight for m in kfac.layers] == [model[4].weight]
    model = _cnn()
    assert [m.weight for m in KFACPreconditioner(model).layers] == [model[4].weight]
    assert len(KFACPreconditioner(model, include_conv=True).layers) == 3
    with pytest.raises(TypeError, match="`include_conv` must be a bool, got 1"):
        KFACPreconditioner(model, include_conv=1)
