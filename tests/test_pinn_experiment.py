"""Smoke runs of ``experiments/pinn.py``: its core on a tiny budget, and the whole ``--quick``."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
pinn = pytest.importorskip("pinn")


@pytest.mark.parametrize(
    "make",
    [lambda: pinn.poisson(4, 6), lambda: pinn.reaction(8, 4, 6)],
    ids=["poisson", "reaction"],
)
def test_pinn_adam_then_hf_records_within_budget(make):
    prob = make()
    torch.manual_seed(0)
    init = copy.deepcopy(prob.make_net().state_dict())
    run = pinn.train(
        prob, "Adam → HF", init, 0.3, adam_lr=1e-3, switch=0.5, hf_kwargs=pinn.HF_TUNED
    )
    # how many steps fit depends on the machine's load: check only what holds for any count
    assert run.seconds[0] == 0.0 and run.seconds[run.last] <= 0.3
    assert len(run.seconds) == len(run.losses) == len(run.errors)
    assert math.isfinite(run.loss) and math.isfinite(run.error)


def test_pinn_product_cost_reports_ratios():
    prob = pinn.poisson(4, 6)
    threads = torch.get_num_threads()
    costs = pinn.product_cost(prob, prob.make_net().state_dict(), rounds=3, threads=1)
    assert costs["gradient"][1:] == (1.0, 1.0, 1.0)  # median and quartiles of time / itself
    assert all(ms > 0 and q1 <= r <= q3 for ms, r, q1, q3 in costs.values())
    assert torch.get_num_threads() == threads  # the timing's thread count is restored


def test_pinn_products_only_trains_nothing(capsys):
    threads = torch.get_num_threads()
    try:
        args = ["--quick", "--products-only", "--problems", "poisson", "--threads", "1"]
        assert pinn.main(args) is None
    finally:
        torch.set_num_threads(threads)  # main sets --threads for the whole process
    out = capsys.readouterr().out
    assert "GN product (R-op Jv, graph reused)" in out and "load average" in out
    assert "Adam" not in out  # no training table


@pytest.mark.slow
def test_pinn_quick_writes_report_and_plot(tmp_path):
    report = pinn.main(["--quick", "--seconds", "0.5", "--out", str(tmp_path)])
    text = report.read_text()
    assert "Adam → HF (tuned)" in text and "× gradient" in text
    assert report.with_suffix(".png").exists()


def test_burgers_exact_matches_gauss_hermite_quadrature():
    # an independent oracle: Cole-Hopf by Gauss-Hermite in numpy (pinn.py: trapezoid in torch)
    nu = 0.01 / math.pi
    rng = np.random.default_rng(0)
    x, t = rng.uniform(-1, 1, 64), rng.uniform(0.02, 1, 64)
    z, w = np.polynomial.hermite.hermgauss(300)
    y = x[:, None] - np.sqrt(4 * nu * t)[:, None] * z[None, :]
    f = w * np.exp(-(np.cos(np.pi * y) + 1) / (2 * math.pi * nu))
    expected = -(np.sin(np.pi * y) * f).sum(1) / f.sum(1)
    got = pinn.burgers_exact(torch.from_numpy(x), torch.from_numpy(t), nu)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-9)
    x0 = torch.linspace(-1, 1, 9, dtype=torch.float64)
    torch.testing.assert_close(
        pinn.burgers_exact(x0, torch.zeros_like(x0), nu),
        -torch.sin(math.pi * x0),
        atol=1e-5,
        rtol=0,
    )


class _Exact(torch.nn.Module):
    """The exact solution as a 'network', so a closure's residual blocks must vanish."""

    def __init__(self, u):
        super().__init__()
        self.u = u
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return (self.u(x) + self.dummy)[:, None]


@pytest.mark.parametrize("key", ["burgers", "helmholtz", "convection"])
def test_new_pinn_problems_vanish_at_the_exact_solution(key):
    nu = 0.01 / math.pi
    prob, u = {
        "burgers": (
            lambda: pinn.burgers(20, 4, 4, 1, n_test=64),
            lambda x: pinn.burgers_exact(x[:, 0], x[:, 1], nu, n_quad=800),
        ),
        "helmholtz": (
            lambda: pinn.helmholtz(5, 4),
            lambda x: torch.sin(math.pi * x[:, 0]) * torch.sin(4 * math.pi * x[:, 1]),
        ),
        "convection": (
            lambda: pinn.convection(8, 5, 4),
            lambda x: torch.sin(x[:, 0] - 30 * x[:, 1]),
        ),
    }[key]
    prob = prob()
    net = _Exact(u)
    loss, blocks = prob.closure_for(net)()
    tol = 1e-6 if key == "burgers" else 1e-9  # Burgers: Cole-Hopf by quadrature, differentiated
    assert max(float(b.detach().abs().max()) for b in blocks) < tol
    assert pinn.rel_l2(net, prob) < 1e-9
    baseline = prob.closure_for(prob.make_net())()[0]
    assert float(loss.detach()) < 1e-10 < float(baseline.detach())  # and a network does not vanish


def _allen_cahn_gap(coarse, fine):
    """Largest difference of two reference solutions on the coarse grid, per time frame."""
    (xc, tc, uc), (xf, tf, uf) = coarse, fine
    np.testing.assert_array_equal(xc, xf[::2])
    np.testing.assert_array_equal(tc, tf)
    return np.abs(uc - uf[:, ::2]).max(axis=1)


def test_allen_cahn_reference_converges_on_a_grid_twice_as_fine():
    # the initial condition exactly; then half the points against the defaults' grid (the
    # step dt matters far less: halving it moves the defaults' solution by 5e-12)
    x, _, u = pinn.allen_cahn_reference(512)
    np.testing.assert_allclose(u[0], x**2 * np.cos(np.pi * x), rtol=0, atol=1e-14)
    gap = _allen_cahn_gap((x, _, u), pinn.allen_cahn_reference())
    assert gap[0] < 1e-14 and gap.max() < 2e-3  # measured 5.7e-4 at t = 0.01 (the kink at ±1)
    assert gap[10:].max() < 4e-4 and gap[-1] < 1e-5  # measured 1.3e-4 and 1.4e-6
    assert np.abs(u[-1]).max() < 1.0 + 1e-6 < np.abs(u[-1]).max() + 0.1  # the two phases, ±1


@pytest.mark.slow
def test_allen_cahn_reference_used_by_pinn_converges():
    # the grid allen_cahn() tests against (1,024 points, dt 5e-4) against 2,048 and dt / 2
    gap = _allen_cahn_gap(pinn.allen_cahn_reference(), pinn.allen_cahn_reference(2048, 2.5e-4))
    assert gap.max() < 1e-3 and gap[10:].max() < 1e-4 and gap[-1] < 1e-8  # 2.6e-4 3.2e-5 1.3e-9


def test_allen_cahn_problem_tests_on_the_reference_grid():
    prob = pinn.allen_cahn(16, 4, 4, 1)
    x, t, u = pinn.allen_cahn_reference()
    assert prob.x_test.shape == (101 * 256, 2)
    first = prob.x_test[:256]  # t = 0: the initial condition at every 4th reference point
    torch.testing.assert_close(first[:, 0], torch.from_numpy(x[::4]))
    assert float(first[:, 1].abs().max()) == 0.0
    x0 = first[:, 0]
    torch.testing.assert_close(prob.u_test[:256], x0**2 * torch.cos(math.pi * x0))
    torch.testing.assert_close(prob.u_test[-256:], torch.from_numpy(u[-1, ::4]))
    loss, blocks = prob.closure_for(prob.make_net())()
    assert len(blocks) == 4 and math.isfinite(float(loss.detach()))
