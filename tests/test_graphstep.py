"""``experiments/_graphstep.py`` on the CPU: the device-only HF step computes what it claims,
so that a lent GPU's minutes go to timing it, not to finding it wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
gs = pytest.importorskip("_graphstep")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return x, t


def _dense_ggn(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Jᵀ H_ℓ J of the BCE loss (sum over outputs, mean over cases) and the gradient, dense."""
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    sizes = [p.numel() for p in params]

    def out(theta: torch.Tensor) -> torch.Tensor:
        chunks = [c.view_as(p) for c, p in zip(theta.split(sizes), params, strict=True)]
        return torch.func.functional_call(
            model, dict(zip([n for n, _ in model.named_parameters()], chunks, strict=True)), (x,)
        )

    J = torch.autograd.functional.jacobian(out, flat).reshape(-1, flat.numel())
    s = torch.sigmoid(out(flat)).reshape(-1)
    H = torch.diag(s * (1 - s) / x.shape[0])
    return (J.T @ H @ J).numpy(), J


def test_gauss_newton_product_equals_the_dense_float64_ggn():
    model, (x, t) = _net(), _data()
    hf = gs.GraphHF(model, x, t, batch=12, curvature_batch=12, refresh=0)
    G, _ = _dense_ggn(model, x)
    z = model(x)
    u = torch.zeros_like(z, requires_grad=True)
    jt = torch.autograd.grad(z, hf.params, u, create_graph=True)
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    np.testing.assert_allclose(hf.gn_product(z, v, u, jt).numpy(), G @ v.numpy(), rtol=1e-10)


def test_kfac_apply_solves_the_damped_kronecker_system_per_layer():
    """(A ⊗ G + μI) z = r per layer on [W b], against numpy.kron and a dense solve."""
    model, (x, t) = _net(), _data()
    hf = gs.GraphHF(model, x, t, batch=12, curvature_batch=12, refresh=1)
    hf._draw()
    hf.refresh_kfac()
    r = torch.randn(sum(hf.sizes), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mu = torch.tensor(0.3, dtype=torch.float64)
    z = hf.precondition(r, mu).numpy()
    offset = 0
    for layer, (qa, a, qg, g) in zip(hf.layers, hf.eig, strict=True):
        A = (qa @ torch.diag(a) @ qa.T).numpy()
        G = (qg @ torch.diag(g) @ qg.T).numpy()
        o, i = layer.out_features, layer.in_features
        w = r[offset : offset + o * i].numpy().reshape(o, i)
        b = r[offset + o * i : offset + o * i + o].numpy()
        V = np.concatenate([w, b[:, None]], axis=1)
        # vec by rows: vec(G Z A) = (G ⊗ A) vec(Z) for symmetric A
        Z = np.linalg.solve(np.kron(G, A) + 0.3 * np.eye(o * (i + 1)), V.reshape(-1))
        Z = Z.reshape(o, i + 1)
        np.testing.assert_allclose(z[offset : offset + o * i], Z[:, :-1].reshape(-1), rtol=1e-9)
        np.testing.assert_allclose(z[offset + o * i : offset + o * i + o], Z[:, -1], rtol=1e-9)
        offset += o * i + o
    assert offset == z.size


def test_cg_with_as_many_iterations_as_parameters_solves_the_damped_newton_system():
    """From a zero warm start, n CG iterations on n parameters (float64): (G + λI)x = −g."""
    model, (x, t) = _net(), _data()
    hf = gs.GraphHF(model, x, t, batch=12, curvature_batch=12, refresh=0, damping=0.05, cg_iters=26)
    G, _ = _dense_ggn(model, x)
    loss = gs.bce_loss(model(x), t)
    g = torch.cat([d.reshape(-1) for d in torch.autograd.grad(loss, list(model.parameters()))])
    expected = np.linalg.solve(G + 0.05 * np.eye(26), -g.numpy())
    hf._draw()  # the whole set, permuted: the same sums
    hf._body()
    np.testing.assert_allclose(hf.x0.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_step_makes_no_host_read_and_a_rejected_trial_leaves_parameters_as_they_were():
    model, (x, t) = _net(), _data()
    calls = [0]

    def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        f = gs.bce_loss(z, y)
        return f * float("nan") if calls[0] % 2 == 0 else f  # every trial is NaN

    hf = gs.GraphHF(model, x, t, batch=12, curvature_batch=12, refresh=1, damping=1.0, loss=loss)
    hf._draw()
    hf.refresh_kfac()
    before = [p.detach().clone() for p in model.parameters()]
    with gs.count_ops() as counted:
        hf._body()
    assert counted.reads == 0  # no .item()/float()/bool() of a tensor: capturable
    assert sum(counted.kernels.values()) > 0
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    assert not bool(hf.accepted) and float(hf.lam) == 1.5


def test_steps_lower_the_training_loss_of_a_small_autoencoder():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Sigmoid(), nn.Linear(4, 8))
    x = (torch.rand(64, 8, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    hf = gs.GraphHF(model, x, x, batch=32, curvature_batch=16, refresh=5, cuda_graph=True)
    with torch.no_grad():
        start = float(gs.bce_loss(model(x), x))
    for _ in range(20):
        hf.step()
    assert hf.mode == "eager"  # on a CPU: no capture
    with torch.no_grad():
        assert float(gs.bce_loss(model(x), x)) < 0.9 * start


def test_an_unknown_race_contender_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as err:
        gs.main(["--device", "cpu", "--quick", "--runs", "adam5000,adam500"])
    assert err.value.code == 2
    assert "adam500" in capsys.readouterr().err
