"""K-FAC preconditioner against dense float64 oracles (autograd Jacobians, numpy.linalg).

A one-layer linear model with squared error has a Gauss-Newton matrix that is exactly a
Kronecker product, so there the preconditioner must equal the dense damped inverse of the true
curvature; on a deeper model it must equal the dense damped inverse of its own factors' Kronecker
product (diagonal and truncated variants included), each built independently with numpy.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessfree import GGNProduct, HessianFree, KFACPreconditioner, PrecondContext
from hessfree._settings import _KFAC_DETERMINISTIC_CG_MAX_ITER

DTYPE = torch.float64


def _data(n=7, d_in=3, d_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=DTYPE), torch.randn(
        n, d_out, generator=g, dtype=DTYPE
    )


def _context(model, x, y, loss_fn, damping, seed=0):
    out = model(x)  # the forward the hooks record
    loss = loss_fn(out, y)
    params = [p for p in model.parameters() if p.requires_grad]
    P = GGNProduct(loss, out, params)
    ctx = PrecondContext(
        jacobian=P.jacobian,
        output_grad=P.output_grad,
        reduction="mean",
        damping=damping,
        shift=0.0,
        generator=torch.Generator().manual_seed(seed),
        loss_hessian=P.loss_hessian,
    )
    return ctx, params


def _dense_ggn(model, x, y, loss_fn) -> np.ndarray:
    """Jᵀ H_ℓ J in float64 from autograd.functional (independent of GGNProduct)."""
    params = list(model.parameters())
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    shapes = [p.shape for p in params]

    def outputs(flat):
        chunks = flat.split([s.numel() for s in shapes])
        ws = {
            name: c.view(s)
            for (name, _), c, s in zip(model.named_parameters(), chunks, shapes, strict=True)
        }
        return torch.func.functional_call(model, ws, (x,))

    out0 = outputs(flat0).detach()
    J = torch.autograd.functional.jacobian(outputs, flat0).reshape(out0.numel(), -1)
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(out0), y), out0.reshape(-1))
    return (J.T @ H @ J).numpy()


def _layer_perm(layer: nn.Linear) -> np.ndarray:
    """Flat positions (W row-major, then b) of the entries of [W, b] in row-major order."""
    out, d_in = layer.weight.shape
    idx = np.arange(out * d_in).reshape(out, d_in)
    if layer.bias is not None:
        idx = np.concatenate([idx, out * d_in + np.arange(out)[:, None]], 1)
    return idx.reshape(-1)


@pytest.mark.parametrize("bias", [True, False])
def test_one_linear_layer_equals_the_dense_damped_inverse_of_the_true_ggn(bias):
    x, y = _data()
    model = nn.Linear(3, 2, bias=bias).to(DTYPE)
    K = KFACPreconditioner(model, num_probes=None, relative_damping=0.0)
    mu = 0.3
    ctx, params = _context(model, x, y, F.mse_loss, mu)
    apply = K(ctx)
    C = _dense_ggn(model, x, y, F.mse_loss)
    r = np.random.default_rng(1).standard_normal(C.shape[0])
    expected = np.linalg.solve(C + mu * np.eye(C.shape[0]), r)
    torch.testing.assert_close(apply(torch.from_numpy(r)), torch.from_numpy(expected))


@pytest.mark.parametrize("variant", ["dense", "diagonal", "truncated"])
def test_two_layers_equal_the_dense_inverse_of_their_own_factors(variant):
    x, y = _data(n=9, d_in=4, d_out=3, seed=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    kw = {"dense": {}, "diagonal": {"max_dense": 4}, "truncated": {"rank": 2}}[variant]
    K = KFACPreconditioner(model, num_probes=3, relative_damping=0.1, **kw)
    mu = 0.05
    ctx, params = _context(model, x, y, F.mse_loss, mu)
    apply = K(ctx)
    n = sum(p.numel() for p in params)
    M = np.zeros((n, n))
    offset = 0
    for layer, (A, G) in zip(K.layers, K.factors, strict=True):
        blocks = []
        for factor in (A, G):
            f = factor.numpy()
            if f.ndim == 1:  # kept diagonal (dimension above max_dense)
                blocks.append(np.diag(f))
                continue
            w, Q = np.linalg.eigh(f)
            w = np.clip(w, 0.0, None)
            if variant == "truncated" and w.size > 2:  # top two eigenpairs + the rest's mean
                top = Q[:, -2:]
                rest = w[:-2].mean()
                f = top @ np.diag(w[-2:]) @ top.T + rest * (np.eye(w.size) - top @ top.T)
            else:
                f = Q @ np.diag(w) @ Q.T
            blocks.append(f)
        A_, G_ = blocks
        floor = 0.1 * np.trace(G_) / G_.shape[0] * np.trace(A_) / A_.shape[0]
        if variant == "truncated":  # the floor uses the untruncated factors' mean eigenvalue
            floor = 0.1 * float(G.diagonal().mean() * A.diagonal().mean())
        size = A_.shape[0] * G_.shape[0]
        pos = offset + _layer_perm(layer)
        M[np.ix_(pos, pos)] = np.kron(G_, A_) + (mu + floor) * np.eye(size)
        offset += size
    r = np.random.default_rng(3).standard_normal(n)
    expected = np.linalg.solve(M, r)
    torch.testing.assert_close(apply(torch.from_numpy(r)), torch.from_numpy(expected))
    if variant == "diagonal":
        # A of 4+1 inputs and G of 5 outputs are kept diagonal, the last layer's G (3) dense
        assert K.factors[0][0].dim() == K.factors[0][1].dim() == 1 and K.factors[1][1].dim() == 2


def test_exact_output_factor_of_a_diagonal_loss_hessian():
    """Without probes G of the last layer is Σ_i diag(h_i) for sigmoid cross-entropy."""
    x, _ = _data(n=6, d_in=3, d_out=4, seed=4)
    t = torch.rand(6, 4, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    model = nn.Linear(3, 4).to(DTYPE)
    K = KFACPreconditioner(model, num_probes=None)
    loss_fn = F.binary_cross_entropy_with_logits
    ctx, _ = _context(model, x, t, loss_fn, 1.0)
    K(ctx)
    s = torch.sigmoid(model(x)).detach()
    expected = torch.diag((s * (1 - s)).sum(0) / s.numel())  # H_ℓ = diag(σ(1-σ))/m
    torch.testing.assert_close(K.factors[0][1], expected)
    a = torch.cat([x, torch.ones(6, 1, dtype=DTYPE)], 1)
    torch.testing.assert_close(K.factors[0][0], a.T @ a / 6)


def test_refresh_and_running_average():
    x, y = _data(seed=6)
    model = nn.Linear(3, 2).to(DTYPE)
    K = KFACPreconditioner(model, num_probes=None, refresh=2, decay=0.5)
    ctx, _ = _context(model, x, y, F.mse_loss, 1.0)
    K(ctx)
    A0 = K.factors[0][0].clone()
    x2 = 2 * x
    ctx2, _ = _context(model, x2, y, F.mse_loss, 1.0)
    K(ctx2)  # second call: no refresh
    torch.testing.assert_close(K.factors[0][0], A0)
    ctx2, _ = _context(model, x2, y, F.mse_loss, 1.0)  # each step records a forward anew
    K(ctx2)  # third call: refresh, averaged with weight 1/2
    a2 = torch.cat([x2, torch.ones(7, 1, dtype=DTYPE)], 1)
    torch.testing.assert_close(K.factors[0][0], 0.5 * A0 + 0.5 * a2.T @ a2 / 7)


def test_in_the_optimizer_reduces_the_loss():
    x, y = _data(n=32, d_in=4, d_out=2, seed=7)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(DTYPE)
    K = KFACPreconditioner(model)
    opt = HessianFree(model.parameters(), precond=K, cg_max_iter=5)

    def closure():
        out = model(x)
        return F.mse_loss(out, y), out

    with torch.no_grad():
        first = float(closure()[0].detach())
    for _ in range(5):
        opt.step(closure)
        assert opt.last_step.status == "accepted"
    with torch.no_grad():
        assert float(closure()[0]) < 0.7 * first
    assert K.factors is not None
    K.remove()
    assert not model[0]._forward_hooks


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module or a sequence of nn.Linear"):
        KFACPreconditioner([nn.Tanh()])
    with pytest.raises(ValueError, match="no nn.Linear"):
        KFACPreconditioner(nn.Tanh())
    with pytest.raises(ValueError, match=r"no nn.Linear, nn.Conv1d or nn.Conv2d .* with a train"):
        KFACPreconditioner(nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ValueError, match="refresh"):
        KFACPreconditioner(nn.Linear(2, 2), refresh=0)
    with pytest.raises(ValueError, match="decay"):
        KFACPreconditioner(nn.Linear(2, 2), decay=1.0)
    with pytest.raises(ValueError, match="rank"):
        KFACPreconditioner(nn.Linear(2, 2), rank=0)
    # a layer that ran in no graph-building forward
    x, y = _data()
    model, other = nn.Linear(3, 2).to(DTYPE), nn.Linear(3, 2).to(DTYPE)
    K = KFACPreconditioner(other)
    ctx, _ = _context(model, x, y, F.mse_loss, 1.0)
    with pytest.raises(ValueError, match="ran in no graph-building forward"):
        K(ctx)
    # the layer ran but the optimizer does not train its parameters
    K2 = KFACPreconditioner([model, other])
    ctx, _ = _context(model, x, y, F.mse_loss, 1.0)
    other(x)
    with pytest.raises(ValueError, match="not among the optimizer's parameters; pass the"):
        K2(ctx)
    with pytest.raises(ValueError, match="positive damping"):
        KFACPreconditioner(model, num_probes=None)(_context(model, x, y, F.mse_loss, 0.0)[0])


def test_subspace_iteration_converges_to_the_top_eigenpairs():
    """Truncated factors are refreshed by subspace iteration from the previous eigenvectors:
    with the same statistics every step, it converges to numpy's top eigenpairs."""
    x, y = _data(n=40, d_in=6, d_out=2, seed=8)
    x = x * torch.linspace(0.2, 3.0, 6, dtype=DTYPE)  # spread the spectrum of A
    model = nn.Linear(6, 2).to(DTYPE)
    K = KFACPreconditioner(model, num_probes=None, decay=0.0, rank=2, relative_damping=0.0)
    for _ in range(200):
        ctx, _ = _context(model, x, y, F.mse_loss, 1.0)  # a step's forward, then the call
        K(ctx)
    A = K.factors[0][0].numpy()
    w, Q = np.linalg.eigh(A)
    (top, values, rest) = K.eigen[0][0]
    np.testing.assert_allclose(values.numpy(), w[-2:], rtol=1e-8)
    np.testing.assert_allclose(np.abs(top.numpy().T @ Q[:, -2:]), np.eye(2), atol=1e-6)
    np.testing.assert_allclose(float(rest), w[:-2].mean(), rtol=1e-8)


@pytest.mark.parametrize("num_probes", [1, 3])
def test_probe_factor_has_the_exact_diagonal_for_squared_error(num_probes):
    """With squared error H_ℓ = (2/m) I, so a Rademacher probe's G = (2/m) Σ_i ξ_i ξ_iᵀ has the
    exact factor's diagonal N·2/m whatever the signs (one probe: the plain backward pass)."""
    x, y = _data(n=5, d_in=3, d_out=4, seed=9)
    model = nn.Linear(3, 4).to(DTYPE)
    exact = KFACPreconditioner(model, num_probes=None)
    probed = KFACPreconditioner(model, num_probes=num_probes)
    ctx, _ = _context(model, x, y, F.mse_loss, 1.0)
    exact(ctx)
    probed(ctx)
    torch.testing.assert_close(exact.factors[0][1], torch.eye(4, dtype=DTYPE) * 5 * 2 / 20)
    torch.testing.assert_close(probed.factors[0][1].diagonal(), exact.factors[0][1].diagonal())
    torch.testing.assert_close(probed.factors[0][0], exact.factors[0][0])


def test_a_frozen_layer_is_skipped_and_the_trainable_block_is_the_true_ggn_inverse():
    """Fine-tuning: with the first layer frozen, K-FAC of the model covers the last layer alone,
    and there (squared error: a constant loss Hessian) its Kronecker product is that layer's
    exact Gauss-Newton block, so the preconditioner is the block's dense damped inverse."""
    x, y = _data(n=9, d_in=4, d_out=3, seed=11)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    C = _dense_ggn(model, x, y, F.mse_loss)[25:, 25:]  # the last layer's block (after 20 + 5)
    model[0].requires_grad_(False)
    K = KFACPreconditioner(model, num_probes=None, relative_damping=0.0)
    assert K.layers == [model[2]]
    mu = 0.25
    ctx, params = _context(model, x, y, F.mse_loss, mu)
    apply = K(ctx)
    r = np.random.default_rng(5).standard_normal(C.shape[0])
    expected = np.linalg.solve(C + mu * np.eye(C.shape[0]), r)
    torch.testing.assert_close(apply(torch.from_numpy(r)), torch.from_numpy(expected))
    # and HessianFree trains the rest with it
    opt = HessianFree(params, precond=K)
    before = F.mse_loss(model(x), y).item()

    def closure():
        out = model(x)
        return F.mse_loss(out, y), out

    for _ in range(3):
        opt.step(closure)
    assert F.mse_loss(model(x), y).item() < before


def test_parameters_outside_the_layers_pass_through():
    """A parameter of no nn.Linear layer is left as it is (z = r there), and a layer without a
    bias next to one with a bias gets the dense inverse of its own factors' Kronecker product."""
    x, y = _data(n=9, d_in=4, d_out=3, seed=10)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    K = KFACPreconditioner(model, num_probes=None, relative_damping=0.0)
    mu = 0.2
    ctx, params = _context(model, x, y, F.mse_loss, mu)
    K(ctx)
    extra = torch.zeros(3, dtype=DTYPE)  # e.g. a scale the optimizer also trains
    apply = K.apply_with([extra, *params], mu)
    r = torch.from_numpy(np.random.default_rng(4).standard_normal(3 + 20 + 18))
    z = apply(r)
    torch.testing.assert_close(z[:3], r[:3])
    offset = 3
    for layer, (A, G) in zip(K.layers, K.factors, strict=True):
        M = np.kron(G.numpy(), A.numpy()) + mu * np.eye(A.shape[0] * G.shape[0])
        pos = offset + _layer_perm(layer)
        expected = np.linalg.solve(M, r.numpy()[pos])
        torch.testing.assert_close(z[torch.from_numpy(pos)], torch.from_numpy(expected))
        offset += pos.size


@pytest.mark.parametrize("max_dense", [0, 512])
def test_non_finite_statistics_are_refused_and_the_factors_kept(max_dense):
    # Diagonal factors (above max_dense) have no eigh to fail on NaN: the same check as dense.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    x, y = _data()
    kfac = KFACPreconditioner(model, max_dense=max_dense)
    kfac(_context(model, x, y, F.mse_loss, 0.1)[0])
    kept = [(A.clone(), G.clone()) for A, G in kfac.factors]
    with pytest.raises(FloatingPointError, match="NaN or infinite curvature statistics"):
        kfac(_context(model, x * float("nan"), y, F.mse_loss, 0.1)[0])
    assert not kfac._seen  # the recorded graph is released all the same
    for (A0, G0), (A, G) in zip(kept, kfac.factors, strict=True):
        assert A.dim() == (1 if max_dense == 0 else 2)
        assert torch.equal(A0, A) and torch.equal(G0, G)


def test_a_non_finite_float32_eigh_is_redone_in_float64(monkeypatch):
    """LAPACK's float32 eigh (MKL) returned NaN, without an error, for a finite input factor
    with exact zero rows (a CNN's dead ReLU units, batch 100): every HF step was then rejected
    as a non-finite product. Simulated by an eigh that gives NaN in float32; the preconditioner
    must still be the dense float64 damped inverse of its factors' Kronecker product."""
    x, y = _data(n=9, d_in=4, d_out=3, seed=10)
    x, y = x.float(), y.float()
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # float32 factors
    real = torch.linalg.eigh

    def eigh(a, *args, **kwargs):
        values, vectors = real(a, *args, **kwargs)
        if a.dtype == torch.float32:
            return values * float("nan"), vectors * float("nan")
        return values, vectors

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    K = KFACPreconditioner(model, num_probes=None, relative_damping=0.0)
    mu = 0.2
    ctx, params = _context(model, x, y, F.mse_loss, mu)
    apply = K(ctx)
    n = sum(p.numel() for p in params)
    r = torch.from_numpy(np.random.default_rng(5).standard_normal(n)).float()
    z = apply(r)
    offset = 0
    for layer, (A, G) in zip(K.layers, K.factors, strict=True):
        assert A.dtype == G.dtype == torch.float32
        M = np.kron(G.double().numpy(), A.double().numpy()) + mu * np.eye(A.shape[0] * G.shape[0])
        pos = offset + _layer_perm(layer)
        expected = np.linalg.solve(M, r.double().numpy()[pos])
        # float32 factors, float32 r: float32's precision
        torch.testing.assert_close(
            z[torch.from_numpy(pos)].double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-5
        )
        offset += pos.size


def test_a_layer_run_twice_in_one_pass_is_refused_and_direct_layer_calls_are_not():
    # Shared weights (a recurrent step): the hooks kept the last call only, so the factors
    # silently described one time step. A module given: its calls delimit a forward pass.
    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step, self.head = nn.Linear(3, 3).to(DTYPE), nn.Linear(3, 2).to(DTYPE)

        def forward(self, x):
            return self.head(torch.tanh(self.step(torch.tanh(self.step(x)))))

    model = Recurrent()
    x, y = _data()
    kfac = KFACPreconditioner(model)
    with pytest.raises(ValueError, match=r"layer 0 \(Linear.*\) ran 2 times in one forward pass"):
        kfac(_context(model, x, y, F.mse_loss, 0.1)[0])
    assert not kfac._seen and not kfac._shared and kfac.factors is None
    # the layers given as a list, and the same layers called directly: no pass, no refusal
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    kfac = KFACPreconditioner(plain)
    for _ in range(2):  # two graph-building calls between preconditioner calls: both fine
        ctx = _context(plain, x, y, F.mse_loss, 0.1)[0]
    plain[0](x)
    plain[0](x)
    kfac(ctx)
    assert kfac.factors is not None


# ---- precond='kfac': the layers found from the optimizer's parameters alone ----
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)


def _outputs_closure(model, x, y):
    def closure():
        out = model(x)
        return F.mse_loss(out, y), out

    return closure


def _global_hooks() -> int:
    return len(torch.nn.modules.module._global_forward_hooks)


def test_precond_kfac_equals_the_module_hooked_preconditioner_and_the_input_factor():
    x, y = _data(n=9)
    a, b = _mlp(), _mlp()
    opt_a = HessianFree(a.parameters(), precond=KFACPreconditioner(a, rank=32, refresh=2))
    opt_b = HessianFree(b.parameters(), precond="kfac")
    opt_b.step(_outputs_closure(b, x, y))
    # oracle: the first layer's A = E[[x; 1][x; 1]ᵀ] over the batch, in numpy
    xb = np.hstack([x.numpy(), np.ones((len(x), 1))])
    np.testing.assert_allclose(opt_b.precond.factors[0][0].numpy(), xb.T @ xb / len(x), 1e-12)
    opt_a.step(_outputs_closure(a, x, y))
    for _ in range(3):
        opt_a.step(_outputs_closure(a, x, y))
        opt_b.step(_outputs_closure(b, x, y))
    assert len(opt_b.precond.layers) == 2
    for (A1, G1), (A2, G2) in zip(opt_a.precond.factors, opt_b.precond.factors, strict=True):
        assert torch.equal(A1, A2) and torch.equal(G1, G2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_auto_uses_kfac_for_outputs_closures_only():
    x, y = _data(n=9)
    runs = {}
    for precond, style in (
        ("auto", "outputs"),
        ("kfac", "outputs"),
        ("auto", "loss"),
        (None, "loss"),
    ):
        m = _mlp()
        opt = HessianFree(m.parameters(), precond=precond)

        def closure(m=m, style=style):
            out = m(x)
            return (F.mse_loss(out, y), out) if style == "outputs" else F.mse_loss(out, y)

        for _ in range(3):
            opt.step(closure)
        runs[precond, style] = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    assert torch.equal(runs["auto", "outputs"], runs["kfac", "outputs"])
    assert torch.equal(runs["auto", "loss"], runs[None, "loss"])  # the Hessian: no K-FAC
    assert not torch.equal(runs["auto", "outputs"], runs["auto", "loss"])


@pytest.mark.parametrize("cell", [nn.GRU, nn.Linear])
def test_auto_uses_kfac_only_where_its_layers_hold_half_the_parameters(cell):
    """A GRU under a linear head: the head is the only nn.Linear, 21 of 201 parameters, and
    'auto' runs as precond=None (K-FAC's mini-batch CG cap of 2 left the GRU nearly
    unpreconditioned). An all-Linear model (the scorecard's tasks) still runs as 'kfac'."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 2, generator=g, dtype=DTYPE)
    y = torch.randn(6, 3, generator=g, dtype=DTYPE)
    runs = {}
    for precond in ("auto", None, "kfac"):
        torch.manual_seed(1)
        body = cell(2, 6, batch_first=True) if cell is nn.GRU else cell(10, 6)
        head = nn.Linear(6, 3)
        model = nn.ModuleList([body, head]).to(DTYPE)

        def forward(body=body, head=head):
            if cell is nn.GRU:
                return head(body(x)[0][:, -1])
            return head(torch.tanh(body(x.reshape(6, 10))))

        opt = HessianFree(model.parameters(), precond=precond, cg_max_iter=5)

        def closure(forward=forward):
            out = forward()
            return F.mse_loss(out, y), out

        for _ in range(2):
            opt.step(closure)
        runs[precond] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = None if cell is nn.GRU else "kfac"
    assert torch.equal(runs["auto"], runs[expected])
    assert not torch.equal(runs[None], runs["kfac"])  # the two differ: the test can fail


def test_auto_leaves_16_bit_parameters_unpreconditioned():
    # eigh has no float16 CPU kernel: 'auto' must not build K-FAC there (it raised)
    x, y = (t.to(torch.float16) for t in _data(n=9))
    params = {}
    for precond in ("auto", None):
        m = _mlp().to(torch.float16)
        opt = HessianFree(m.parameters(), precond=precond)
        for _ in range(2):
            opt.step(_outputs_closure(m, x, y))
        assert opt.last_step.accepted
        params[precond] = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    assert torch.equal(params["auto"], params[None])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_layers_keep_float32_factors_and_match_the_dense_float64_inverse(dtype):
    # eigh has no 16-bit CPU kernel and float16 squares underflow: the factors are float32;
    # the oracle is the float64 GGN of the same (16-bit rounded) weights and data
    x, y = _data()
    model = nn.Linear(3, 2).to(dtype)
    x16, y16 = x.to(dtype), y.to(dtype)
    K = KFACPreconditioner(model, num_probes=None, relative_damping=0.0)
    mu = 0.3
    ctx, _ = _context(model, x16, y16, F.mse_loss, mu)
    apply = K(ctx)
    assert all(f.dtype == torch.float32 for pair in K.factors for f in pair)
    C = _dense_ggn(copy.deepcopy(model).to(DTYPE), x16.to(DTYPE), y16.to(DTYPE), F.mse_loss)
    r = torch.from_numpy(np.random.default_rng(1).standard_normal(C.shape[0])).to(dtype)
    expected = np.linalg.solve(C + mu * np.eye(C.shape[0]), r.to(DTYPE).numpy())
    z = apply(r)
    assert z.dtype == dtype
    torch.testing.assert_close(z.to(DTYPE), torch.from_numpy(expected), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_precond_kfac_trains_16_bit_parameters(dtype):
    # precond='kfac' on 16-bit parameters raised from eigh; now every step is accepted
    x, y = _data(n=16)
    m = _mlp().to(dtype)
    opt = HessianFree(m.parameters(), precond="kfac")
    closure = _outputs_closure(m, x.to(dtype), y.to(dtype))
    first = float(closure()[0].detach())
    for _ in range(4):
        opt.step(closure)
        assert opt.last_step.accepted
    assert float(closure()[0].detach()) < 0.9 * first
    assert all(p.dtype == dtype for p in m.parameters())


class _Shared(nn.Module):
    """A layer run twice per pass (shared weights) and a head run once."""

    def __init__(self, d_out: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.step, self.head = nn.Linear(3, 3).to(DTYPE), nn.Linear(3, d_out).to(DTYPE)

    def forward(self, x):
        return self.head(torch.tanh(self.step(torch.tanh(self.step(x)))))


def test_a_shared_layer_is_skipped_under_auto_and_refused_under_kfac():
    # a head of 16 of the 28 parameters: 'auto' needs K-FAC's layers to hold at least half
    x, y = _data(d_out=4)
    model = _Shared(d_out=4)
    opt = HessianFree(model.parameters())
    opt.step(_outputs_closure(model, x, y))
    layers = opt._auto_precond.layers
    assert [m.weight for m in layers] == [model.head.weight]  # the head only
    model = _Shared(d_out=4)
    opt = HessianFree(model.parameters(), precond="kfac")
    with pytest.raises(ValueError, match=r"layer 0 \(Linear.*\) ran 2 times"):
        opt.step(_outputs_closure(model, x, y))
    assert all(p.grad is None for p in model.parameters())


def test_auto_turns_kfac_off_with_a_warning_when_a_layer_later_runs_twice():
    x, y = _data()
    model = _Shared()
    twice = [False]

    def closure():  # the step layer once at first; from the second step on twice
        h = torch.tanh(model.step(x))
        out = model.head(torch.tanh(model.step(h)) if twice[0] else h)
        return F.mse_loss(out, y), out

    opt = HessianFree(model.parameters())
    opt.step(closure)
    assert [m.weight for m in opt._auto_precond.layers] == [model.step.weight, model.head.weight]
    twice[0] = True
    with pytest.warns(UserWarning, match=r"precond='auto' turned K-FAC off \(K.*ran 2 times"):
        for _ in range(2):  # refresh=2: the factors are recomputed, and the layer refused, at 3
            opt.step(closure)
    assert opt.last_step.status in ("accepted", "converged") and opt._auto_precond is None
    assert not opt._records_linears()


def test_the_global_hook_is_gone_after_step_also_when_the_closure_raises():
    x, y = _data()
    model = _mlp()
    before = _global_hooks()
    opt = HessianFree(model.parameters(), precond="kfac")
    opt.step(_outputs_closure(model, x, y))
    assert _global_hooks() == before

    def failing():
        model(x)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        opt.step(failing)
    assert _global_hooks() == before and opt._linear_pass is None


def test_a_model_used_outside_step_records_nothing():
    x, y = _data(n=9)
    x2, y2 = _data(n=9, seed=1)
    used, twin = _mlp(), _mlp()
    opts = [HessianFree(m.parameters(), precond="kfac") for m in (used, twin)]
    for opt, m in zip(opts, (used, twin), strict=True):
        opt.step(_outputs_closure(m, x, y))
    F.mse_loss(used(x2), y2).backward()  # another batch with autograd, outside step()
    assert opts[0]._linear_pass is None and not opts[0].precond._seen
    for opt, m in zip(opts, (used, twin), strict=True):
        m.zero_grad(set_to_none=True)
        opt.step(_outputs_closure(m, x, y))
    for (A1, G1), (A2, G2) in zip(opts[0].precond.factors, opts[1].precond.factors, strict=True):
        assert torch.equal(A1, A2) and torch.equal(G1, G2)


@pytest.mark.parametrize("precond", ["kfac", "auto"])
def test_precond_kfac_state_dict_resumes_bitwise(precond):
    x, y = _data(n=9)
    model = _mlp()
    opt = HessianFree(model.parameters(), precond=precond)
    for _ in range(3):
        opt.step(_outputs_closure(model, x, y))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    assert saved["precond"]["state"]["layers"] == [[0, 1], [2, 3]]
    for _ in range(3):
        opt.step(_outputs_closure(model, x, y))
    resumed = _mlp(seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = HessianFree(resumed.parameters(), precond=precond)
    opt2.load_state_dict(saved)  # before any step: the layers come from the saved indices
    for _ in range(3):
        opt2.step(_outputs_closure(resumed, x, y))
    pairs = zip(model.parameters(), resumed.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)


def test_kfac_state_dict_without_recent_losses_resumes_past_the_first_floor_window(monkeypatch):
    """K-FAC re-measures the relative floor's scale at every 4th of the first 16 steps only
    (``_floor_due``). A state dict saved before ``recent_losses`` was kept (or without it) at
    step 16 re-entered that window for 16 more steps (3-4 extra products, λ ratcheted up): the
    window counted the fresh losses it held, not the steps. Oracle: the run that kept its whole
    state, from the same point: the same re-measurements and bitwise the same parameters."""
    batches = [_data(n=9, seed=1), _data(n=9, seed=2)]
    raised: list[tuple[int, int]] = []
    original_raise = HessianFree._raise_floor

    def spy(self, curvature, product, g, g_norm, run):
        raised.append((id(self), run.state["step"]))
        return original_raise(self, curvature, product, g, g_norm, run)

    monkeypatch.setattr(HessianFree, "_raise_floor", spy)
    model = _mlp()
    opt = HessianFree(model.parameters(), precond="kfac")
    for k in range(16):
        opt.step(_outputs_closure(model, *batches[k % 2]))
    assert [s for i, s in raised if i == id(opt)] == [4, 8, 12]  # the window, and no rise
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(saved)
    for entry in old["state"].values():
        entry.pop("recent_losses", None)
    runs = []
    for sd in (saved, old):
        m = _mlp(seed=1)
        m.load_state_dict(saved_model)
        o = HessianFree(m.parameters(), precond="kfac")
        o.load_state_dict(sd)
        for k in range(16, 25):  # the checks at steps 16, 20 and 24
            o.step(_outputs_closure(m, *batches[k % 2]))
        runs.append((m, [s for i, s in raised if i == id(o)]))
    (kept, kept_raises), (resumed, resumed_raises) = runs
    assert resumed_raises == kept_raises == []
    pairs = zip(kept.parameters(), resumed.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)


def test_precond_kfac_bad_inputs_name_the_value():
    x, y = _data()
    with pytest.raises(ValueError, match=r"Unknown `precond` 'kfc'.*'kfac'"):
        HessianFree(_mlp().parameters(), precond="kfc")
    model = _mlp()
    opt = HessianFree(model.parameters(), precond="kfac")
    with pytest.raises(ValueError, match=r"K-FAC needs per-example information"):
        opt.step(lambda: F.mse_loss(model(x), y))
    w = torch.zeros(3, 2, dtype=DTYPE, requires_grad=True)  # no nn.Linear at all
    opt = HessianFree([w], precond="kfac")
    with pytest.raises(ValueError, match=r"precond='kfac' found no nn.Linear layer"):
        opt.step(lambda: (lambda out: ((out - y).square().mean(), out))(x @ w))
    opt = HessianFree(model.parameters(), precond="kfac")
    opt.step(_outputs_closure(model, x, y))
    state = opt.state_dict()
    state["precond"]["state"]["layers"][1] = [7, None]
    fresh = HessianFree(_mlp().parameters(), precond="kfac")
    with pytest.raises(
        ValueError, match=r"\['layers'\]\[1\]` must be \[weight index.*got \[7, None\]"
    ):
        fresh.load_state_dict(state)


# ---- cg_max_iter='auto': two iterations on K-FAC-preconditioned steps seen stochastic ----
def _alternating_steps(opt, model, batches, steps, caps=None):
    """Steps on alternating mini-batches; ``caps[k]`` (if given) is set before step k."""
    iters = []
    for k in range(steps):
        if caps is not None:
            opt.param_groups[0]["cg_max_iter"] = caps[k]
        opt.step(_outputs_closure(model, *batches[k % len(batches)]))
        iters.append(opt.last_step.cg_iters)
    return iters


def test_auto_cg_cap_is_two_on_stochastic_kfac_steps_only():
    batches = [_data(n=9, seed=1), _data(n=9, seed=2)]
    steps = 6  # CG solved tightly (cg_rtol), so only the cap stops it early
    # 'auto' with K-FAC on alternating batches: step 1 (one batch seen) as cap 250, then 2
    a, b = _mlp(), _mlp()
    opt_a = HessianFree(a.parameters(), precond="kfac", cg_rtol=1e-12)
    opt_b = HessianFree(b.parameters(), precond="kfac", cg_rtol=1e-12)
    iters_a = _alternating_steps(opt_a, a, batches, steps)
    iters_b = _alternating_steps(opt_b, b, batches, steps, caps=[250] + [2] * (steps - 1))
    assert iters_a == iters_b and max(iters_a[1:]) <= 2 < iters_a[0]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    # no K-FAC (precond=None): 'auto' is the cap of 250, bitwise
    c, d = _mlp(), _mlp()
    opt_c = HessianFree(c.parameters(), precond=None, cg_rtol=1e-12)
    opt_d = HessianFree(d.parameters(), precond=None, cg_max_iter=250, cg_rtol=1e-12)
    iters_c = _alternating_steps(opt_c, c, batches, steps)
    assert iters_c == _alternating_steps(opt_d, d, batches, steps)
    assert max(iters_c[1:]) > 2  # the cap of 2 would have cut these solves
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters(), strict=True))
    # an explicit cap is kept on stochastic K-FAC steps
    e = _mlp()
    opt_e = HessianFree(e.parameters(), precond="kfac", cg_max_iter=7, cg_rtol=1e-12)
    assert max(_alternating_steps(opt_e, e, batches, steps)[1:]) > 2


def test_auto_cg_cap_is_five_on_deterministic_kfac_steps():
    # one batch: step 0 (nothing seen yet) runs the cap of 250, every later step is seen
    # deterministic and K-FAC-preconditioned: 'auto' = a cap of 5 set by hand, bitwise
    assert _KFAC_DETERMINISTIC_CG_MAX_ITER == 5
    data = [_data(n=9, seed=1)]
    steps = 4  # CG solved tightly (cg_rtol), so only the cap stops it early
    a, b, c = _mlp(), _mlp(), _mlp()
    opt_a = HessianFree(a.parameters(), precond="kfac", cg_rtol=1e-12)
    opt_b = HessianFree(b.parameters(), precond="kfac", cg_rtol=1e-12)
    opt_c = HessianFree(c.parameters(), precond="kfac", cg_max_iter=250, cg_rtol=1e-12)
    iters_a = _alternating_steps(opt_a, a, data, steps)
    iters_b = _alternating_steps(opt_b, b, data, steps, caps=[250] + [5] * (steps - 1))
    iters_c = _alternating_steps(opt_c, c, data, steps)
    assert iters_a == iters_b and max(iters_a[1:]) == 5 < iters_a[0]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert max(iters_c[1:]) > 5  # the cap binds: these solves were longer
    # an explicit cap is kept on deterministic K-FAC steps; without K-FAC 'auto' stays 250
    d, e, f = _mlp(), _mlp(), _mlp()
    opt_d = HessianFree(d.parameters(), precond="kfac", cg_max_iter=8, cg_rtol=1e-12)
    assert max(_alternating_steps(opt_d, d, data, steps)[1:]) > 5
    opt_e = HessianFree(e.parameters(), precond=None, cg_rtol=1e-12)
    opt_f = HessianFree(f.parameters(), precond=None, cg_max_iter=250, cg_rtol=1e-12)
    iters_e = _alternating_steps(opt_e, e, data, steps)
    assert iters_e == _alternating_steps(opt_f, f, data, steps) and max(iters_e[1:]) > 5
    assert all(torch.equal(p, q) for p, q in zip(e.parameters(), f.parameters(), strict=True))


def test_capped_kfac_steps_do_not_lower_the_unfloored_damping():
    # ρ of a two-iteration K-FAC step says nothing about the full solves after the floor's
    # release: the unfloored λ may rise on such steps, never fall, so the release keeps λ
    batches = [_data(n=9, seed=1), _data(n=9, seed=2)]
    m = _mlp()
    opt = HessianFree(m.parameters(), precond="kfac")
    state = opt.state[next(iter(m.parameters()))]
    shadows = []
    for k in range(8):
        opt.step(_outputs_closure(m, *batches[k % 2]))
        if opt.last_step.cg_iters <= 2 and "damping_unfloored" in state:
            shadows.append(state["damping_unfloored"])
    assert len(shadows) >= 5 and shadows == sorted(shadows)
    lam = opt.last_step.damping
    for _ in range(5):  # one batch from here on: seen deterministic, the floor lifts
        opt.step(_outputs_closure(m, *batches[0]))
    assert "damping_unfloored" not in state
    # without the hold the shadow would have fallen by 2/3 a step (ρ ≈ 1 on these steps)
    assert shadows[-1] >= shadows[0]
    assert opt.last_step.damping >= lam * (2 / 3) ** 5 * 0.999
    # an explicit cap of 2 is the caller's: the unfloored λ follows ρ as on any step
    m2 = _mlp()
    opt2 = HessianFree(m2.parameters(), precond="kfac", cg_max_iter=2)
    state2 = opt2.state[next(iter(m2.parameters()))]
    seen = []
    for k in range(8):
        opt2.step(_outputs_closure(m2, *batches[k % 2]))
        seen.append(state2.get("damping_unfloored", float("nan")))
    assert min(seen[2:]) < seen[1]


# ------------------------------------------------------------------ frozen biases and weights
def test_kfac_takes_a_frozen_bias_as_none_and_is_the_weights_true_ggn_inverse():
    """precond='kfac' found no layer when a layer's bias was frozen (and 'auto' turned K-FAC
    off): the layer counts as one without a bias. Oracle: a linear layer with one output and
    squared error, whose Gauss-Newton weight block is exactly G ⊗ A (G 1×1, so the one probe is
    exact), at the optimizer's settings: the damped inverse with its floor of 0.01 times the
    mean eigenvalue of G ⊗ A, the mean of the block's diagonal."""
    x, y = _data(n=11, d_in=4, d_out=1, seed=12)
    torch.manual_seed(4)
    model = nn.Linear(4, 1).to(DTYPE)
    C = _dense_ggn(model, x, y, F.mse_loss)[:4, :4]  # the weight's block (the bias is last)
    model.bias.requires_grad_(False)
    bias = model.bias.detach().clone()
    opt = HessianFree(model.parameters(), precond="kfac")
    opt.step(_outputs_closure(model, x, y))
    K = opt.precond
    assert [m.bias for m in K.layers] == [None] and torch.equal(model.bias, bias)
    mu = 0.3
    r = np.random.default_rng(6).standard_normal(4)
    shift = mu + 0.01 * np.trace(C) / 4
    expected = np.linalg.solve(C + shift * np.eye(4), r)
    z = K.apply_with([model.weight], mu)(torch.from_numpy(r))
    torch.testing.assert_close(z, torch.from_numpy(expected), rtol=1e-10, atol=1e-12)


def test_auto_keeps_kfac_on_the_layers_of_a_model_with_a_frozen_bias():
    """Freezing the middle layer's bias left 'auto' K-FAC's layers below half the parameters
    and turned K-FAC off for the whole model; now the layer is kept, without its bias, and
    'auto' steps as 'kfac' (the same layers)."""
    x, y = _data(n=9, d_in=3, d_out=2, seed=13)
    runs = {}
    for precond in ("auto", "kfac"):
        torch.manual_seed(5)
        model = nn.Sequential(
            nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 2)
        ).to(DTYPE)
        model[2].bias.requires_grad_(False)
        opt = HessianFree(model.parameters(), precond=precond)
        for _ in range(3):
            opt.step(_outputs_closure(model, x, y))
        K = opt._auto_precond if precond == "auto" else opt.precond
        assert isinstance(K, KFACPreconditioner)
        assert [m.bias is None for m in K.layers] == [False, True, False]
        runs[precond] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(runs["auto"], runs["kfac"])


@pytest.mark.parametrize("precond", ["auto", "kfac"])
def test_a_bias_frozen_mid_training_leaves_kfac_on_with_fresh_factors(precond):
    """After a bias was frozen, the layers K-FAC had found held a parameter the optimizer no
    longer trains: 'auto' warned that it turned K-FAC off (advice: "pass the model the
    optimizer trains") and 'kfac' raised; state_dict() raised KeyError. Now the layers are
    found again, that one without a bias, and its input factor is fresh: the second moment of
    the layer's inputs at that step (the oracle, in float64). Unfrozen, the bias is back."""
    x, y = _data(n=9, d_in=3, d_out=2, seed=14)
    model = _mlp(seed=6)
    opt = HessianFree(model.parameters(), precond=precond)
    closure = _outputs_closure(model, x, y)
    for _ in range(2):
        opt.step(closure)
    model[2].bias.requires_grad_(False)
    assert opt.state_dict()["precond"]["state"]["layers"] == []  # found again at the next step
    h = torch.tanh(model[0](x)).detach()  # the last layer's inputs at this step
    bias = model[2].bias.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    K = opt._auto_precond if precond == "auto" else opt.precond
    assert [m.bias is None for m in K.layers] == [False, True]
    torch.testing.assert_close(K.factors[1][0], h.T @ h / 9, rtol=1e-12, atol=1e-14)
    assert torch.equal(model[2].bias, bias)
    assert opt.state_dict()["precond"]["state"]["layers"] == [[0, 1], [2, None]]
    model[2].bias.requires_grad_(True)  # and trained again: the bias is back in its block
    h1 = torch.cat([torch.tanh(model[0](x)).detach(), torch.ones(9, 1, dtype=DTYPE)], 1)
    opt.step(closure)
    assert [m.bias is None for m in K.layers] == [False, False]
    torch.testing.assert_close(K.factors[1][0], h1.T @ h1 / 9, rtol=1e-12, atol=1e-14)


def test_auto_with_a_frozen_weight_and_a_trained_bias_leaves_that_bias_unpreconditioned():
    """The other half: a layer whose weight is frozen and bias trained is left out of K-FAC
    (z = r on its bias), the other layers keep K-FAC, and the bias trains."""
    x, y = _data(n=9, d_in=3, d_out=2, seed=15)
    model = _mlp(seed=7)
    model[0].weight.requires_grad_(False)
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    opt = HessianFree(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(_outputs_closure(model, x, y))
    K = opt._auto_precond
    assert [m.weight for m in K.layers] == [model[2].weight]
    assert torch.equal(model[0].weight, weight) and not torch.equal(model[0].bias, bias)
    r = torch.randn(5 + 12, dtype=DTYPE)
    z = K.apply_with([model[0].bias, model[2].weight, model[2].bias], 0.1)(r)
    assert torch.equal(z[:5], r[:5])


def test_a_kfac_built_from_a_model_takes_a_frozen_bias_as_none():
    """KFACPreconditioner(model) refused a layer whose bias was frozen (the weight trains);
    now it counts as one without a bias, as precond='kfac' does. Oracle, float64, by hand:
    the last layer's factors are A = hᵀh/n over its inputs h (no column of 1s) and, squared
    error over n·m entries (H_ℓ = 2/(nm) I, exact probes), G = (2/m) I; the first layer keeps
    its bias: A = [x, 1]ᵀ[x, 1]/n, G = Σ_i Σ_k δ_ik δ_ikᵀ with δ_ik = √(2/(nm)) (1 - h_i²) ⊙
    W₂[k]. The last layer's block G ⊗ A is its exact Gauss-Newton block, so there the
    preconditioner is the dense damped inverse of the true block (autograd.functional)."""
    x, y = _data(n=7, d_in=3, d_out=2, seed=16)
    model = _mlp(seed=8)
    C = _dense_ggn(model, x, y, F.mse_loss)[20:30, 20:30]  # W₂'s block (after 15 + 5)
    model[2].bias.requires_grad_(False)
    K = KFACPreconditioner(model, num_probes=None, decay=0.0, relative_damping=0.0)
    assert K.layers == [model[0], model[2]]
    mu = 0.2
    ctx, params = _context(model, x, y, F.mse_loss, mu)
    apply = K(ctx)
    xs, W2 = x.numpy(), model[2].weight.detach().numpy()
    h = np.tanh(xs @ model[0].weight.detach().numpy().T + model[0].bias.detach().numpy())
    n, m = 7, 2
    x1 = np.concatenate([xs, np.ones((n, 1))], 1)
    deltas = np.sqrt(2 / (n * m)) * (1 - h**2)[:, None, :] * W2[None, :, :]  # (n, m, 5)
    d = deltas.reshape(-1, 5)
    expected = [(x1.T @ x1 / n, d.T @ d), (h.T @ h / n, 2 / m * np.eye(m))]
    for (A, G), (A_, G_) in zip(K.factors, expected, strict=True):
        np.testing.assert_allclose(A.numpy(), A_, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(G.numpy(), G_, rtol=1e-12, atol=1e-14)
    r = np.random.default_rng(7).standard_normal(30)
    z = apply(torch.from_numpy(r)).numpy()
    np.testing.assert_allclose(z[20:], np.linalg.solve(C + mu * np.eye(10), r[20:]), rtol=1e-10)
    # and HessianFree trains with it, the frozen bias untouched
    bias = model[2].bias.detach().clone()
    opt = HessianFree(params, precond=K)
    before = F.mse_loss(model(x), y).item()
    for _ in range(3):
        opt.step(_outputs_closure(model, x, y))
    assert F.mse_loss(model(x), y).item() < before and torch.equal(model[2].bias, bias)


def test_a_kfac_built_from_a_model_follows_freezing_as_precond_kfac_does():
    """A frozen weight with a trained bias leaves that layer out (z = r on its bias), the
    others keep K-FAC; a bias frozen or unfrozen mid-training restarts the factors with the
    new shape (A fresh: the layer's inputs at that step). On main a frozen weight raised
    "not among the optimizer's trained parameters" and a frozen bias "is frozen"."""
    x, y = _data(n=9, d_in=3, d_out=2, seed=17)
    model = _mlp(seed=9)
    model[0].weight.requires_grad_(False)
    K = KFACPreconditioner(model, decay=0.5)
    assert K.layers == [model[2]]
    ctx, params = _context(model, x, y, F.mse_loss, 0.1)
    r = torch.randn(5 + 12, dtype=DTYPE)
    z = K(ctx)(r)
    assert [p.shape for p in params] == [(5,), (2, 5), (2,)] and torch.equal(z[:5], r[:5])
    model[0].weight.requires_grad_(True)
    model[2].bias.requires_grad_(False)
    ctx, params = _context(model, x, y, F.mse_loss, 0.1)
    K(ctx)
    h = torch.tanh(model[0](x)).detach()
    assert K.layers == [model[0], model[2]] and K.factors[1][0].shape == (5, 5)
    torch.testing.assert_close(K.factors[1][0], h.T @ h / 9, rtol=1e-12, atol=1e-14)
    model[2].bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"bias of layer 1 .* unfrozen after its factors"):
        K.apply_with(list(model.parameters()), 0.1)
    ctx, params = _context(model, x, y, F.mse_loss, 0.1)
    K(ctx)
    assert K.factors[1][0].shape == (6, 6)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"trainable weight \(requires_grad\) \(2 with a frozen"):
        KFACPreconditioner(model)
