"""The local (Newton) phase begins only where the outer loss is quadratic in the outputs
(experiments/README.md, "quadentry"): there the Gauss-Newton model is the exact loss of the
linearised network; with cross-entropy or BCE the phase's long solves paid off on none of
the larger fits measured ("newtonexit")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessfree import GGNProduct, HessianFree
from hessfree._damping_control import _PROBE_SEED, _loss_probe, _probe_change

DTYPE = torch.float64


def _probe_at(loss_fn, seed: int):
    """H_ℓu of a linear model's outputs at the inputs of ``seed`` (the weights are fixed)."""
    w = torch.randn(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    x = torch.randn(8, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    p = w.requires_grad_()
    out = x @ p
    return _loss_probe(GGNProduct(loss_fn(out), out, [p]))


_Y = torch.randn(8, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
_CLS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
#: name: (loss of the outputs, whether its Hessian in the outputs is constant: the formula)
LOSSES = {
    "mse": (lambda o: F.mse_loss(o, _Y), True),
    "hand-written squares": (
        lambda o: (3 * (o - _Y) ** 2).sum() + (o[:, 0] * o[:, 1]).mean(),
        True,
    ),
    "cross_entropy": (lambda o: F.cross_entropy(o, _CLS), False),
    "bce_with_logits": (lambda o: F.binary_cross_entropy_with_logits(o, torch.sigmoid(_Y)), False),
    "smooth_l1": (lambda o: F.smooth_l1_loss(o, _Y), False),
    "quartic": (lambda o: (o - _Y).pow(4).mean(), False),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_probe_is_constant_exactly_for_quadratic_losses(name):
    loss_fn, quadratic = LOSSES[name]
    change = _probe_change(_probe_at(loss_fn, 1), _probe_at(loss_fn, 2))
    assert (change == 0.0) if quadratic else (change > 0.1)


def test_loss_probe_sees_residual_blocks():
    """A physics-informed loss's blocks (r1, r2), weighted squares: constant H_ℓ, per block."""
    w = torch.randn(3, dtype=DTYPE, generator=torch.Generator().manual_seed(0), requires_grad=True)
    probes = []
    for seed in (1, 2):
        x = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
        r1, r2 = x @ w - 1, torch.tanh(w)
        probes.append(_loss_probe(GGNProduct((r1**2).mean() + 0.5 * (r2**2).sum(), (r1, r2), [w])))
    assert isinstance(probes[0], tuple) and len(probes[0]) == 2
    assert _probe_change(*probes) == 0.0
    # closed form: H_ℓ = diag(2/6 I, I) applied to the probe's fixed u, drawn block by block
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    u1, u2 = torch.randn(6, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen, dtype=DTYPE)
    torch.testing.assert_close(probes[0][0], u1 * (2 / 6), rtol=1e-14, atol=0)
    torch.testing.assert_close(probes[0][1], u2, rtol=1e-14, atol=0)


def test_a_soft_target_bce_fit_stays_out_of_the_local_phase_and_still_converges(one_thread):
    """A 3-6-4 tanh MLP fitted by BCE to the sigmoid of a same-shaped teacher (realizable: the
    minimum is the targets' entropy, a closed form). Main's rule entered the local phase at
    step 22; with BCE the phase must not begin, and the K-FAC steps still reach the floor."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).to(DTYPE)  # noqa: E731
    teacher, model = make(), make()
    x = torch.randn(64, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = torch.sigmoid(teacher(x))
    floor = float(F.binary_cross_entropy(y, y))  # the entropy of the soft targets

    class QuadEntry(HessianFree):  # the rule is off by default ("quadentry": tinyce)
        _quad_entry = True

    opt = QuadEntry(model.parameters())

    def closure():
        out = model(x)
        return F.binary_cross_entropy_with_logits(out, y), out

    excess0 = float(closure()[0].detach()) - floor
    for _ in range(40):
        opt.step(closure)
        assert not opt._global_state().get("newton")
    excess = float(closure()[0].detach()) - floor
    assert 0.0 <= excess <= 2e-3 * excess0  # 40 steps: 2.5e-5 / 2.9e-2 = 8.7e-4 of the start
