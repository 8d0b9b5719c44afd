"""Physics-informed networks: Adam, L-BFGS, Adam → L-BFGS and Adam → HessianFree at equal time.

Two problems by default, each with a known exact solution (``--problems`` adds 1-D viscous
Burgers, 2-D Helmholtz and convection β = 30: :func:`burgers`, :func:`helmholtz`,
:func:`convection`; ``_pinn2.py`` races them; and Allen-Cahn, :func:`allen_cahn`, against a
spectral reference solution; ``_pinn3.py`` races it):

* **Poisson** :math:`-\\Delta u = f` on the unit square, :math:`u = \\sin(\\pi x)\\sin(\\pi y)`,
  zero Dirichlet data; a 2-32-32-1 tanh MLP; collocation points on a grid.
* **Reaction** (Rathore et al. 2024, ρ = 5): :math:`u_t - \\rho u(1-u) = 0` on
  :math:`x \\in [0, 2\\pi]`, :math:`t \\in [0, 1]`, :math:`u(x, 0) = h(x) =
  e^{-(x-\\pi)^2 / (2(\\pi/4)^2)}`, periodic in :math:`x`; exact
  :math:`u = h e^{\\rho t} / (h e^{\\rho t} + 1 - h)`.

Every closure returns ``(loss, (r_interior, r_boundary[, r_initial]))`` with the loss the sum
of the blocks' mean squares, so HessianFree uses the exact Gauss-Newton matrix of the residuals.
All methods start from the same weights, run in float64 on ``--threads`` threads for the same
training wall-clock (evaluations of the error are not counted), and Adam's learning rate is
picked by a short sweep on the final loss. Adam → X switches after ``--switch`` of the budget.
The report also measures one Gauss-Newton product against one gradient of the same loss.

Usage::

    python experiments/pinn.py            # full run, about 11 minutes on 2 CPU cores
    python experiments/pinn.py --quick    # smoke run, under 2 minutes

References:
    Müller & Zeinhofer (2023), Achieving high accuracy with PINNs via energy natural gradients.
    Rathore, Lei, Frangella, Lu & Udell (2024), Challenges in training PINNs: a loss landscape
    perspective, ICML, §2 (problems), §5 (Adam → L-BFGS), §7 (NysNewton-CG).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _bench_common import (  # noqa: E402
    _cpu_model,
    interleave,
    machine_tag,
    md_table,
    save_png,
    save_text,
)

from hessfree import GGNProduct, HessianFree  # noqa: E402

DTYPE = torch.float64
Closure = Callable[[], tuple[Tensor, tuple[Tensor, ...]]]

# HessianFree's defaults precondition CG on residual blocks with a randomized Nyström sketch of
# the Gauss-Newton matrix (precond='auto': rank 60, refreshed every 10 steps; NysNewton-CG,
# Rathore et al. 2024, §7). Tuned for these small, smooth least-squares problems: many cheap
# steps (CG capped at 20 iterations: with the preconditioner they resolve the step well enough,
# and ~5× more steps fit in the budget than with 400), little damping and §4.1's
# Levenberg-Marquardt thresholds lowering it fast (× 1/4 on a good step; measured: Nielsen's rule
# with the same settings stalled at 4× the error, its λ stuck near 1e-3).
HF_TUNED = dict(
    damping=1e-3,
    min_damping=1e-10,
    damping_rule="martens",
    damping_decrease=0.25,
    cg_max_iter=20,
)


# --------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """A PDE: a network factory, a residual closure for a network, and test points.

    Problems on random collocation points also have ``draw(n, generator)``, fresh interior
    points, and their ``closure_for(net, points)`` takes such points instead of its own."""

    name: str
    title: str
    make_net: Callable[[], nn.Module]
    closure_for: Callable[..., Closure]
    x_test: Tensor
    u_test: Tensor
    draw: Callable[[int, torch.Generator], Tensor] | None = None


def mlp(n_in: int, width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1)).to(DTYPE)


def _derivatives(u: Tensor, x: Tensor) -> Tensor:
    """Rows of :math:`\\nabla_x u`, keeping the graph (for residuals)."""
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return du


def poisson(n: int, width: int) -> Problem:
    g = torch.linspace(0, 1, n + 2, dtype=DTYPE)
    x_in = torch.cartesian_prod(g[1:-1], g[1:-1])
    e, z = torch.ones_like(g), torch.zeros_like(g)
    x_b = torch.cat([torch.stack(p, 1) for p in ((g, z), (g, e), (z, g), (e, g))])
    f = 2 * math.pi**2 * torch.sin(math.pi * x_in[:, 0]) * torch.sin(math.pi * x_in[:, 1])

    def closure_for(net: nn.Module) -> Closure:
        def closure():
            x = x_in.clone().requires_grad_(True)
            du = _derivatives(net(x).squeeze(1), x)
            lap = sum(_derivatives(du[:, i], x)[:, i] for i in range(2))
            r_interior = -lap - f
            r_boundary = net(x_b).squeeze(1)
            return (r_interior**2).mean() + (r_boundary**2).mean(), (r_interior, r_boundary)

        return closure

    gen = torch.Generator().manual_seed(123)
    x_test = torch.rand(4096, 2, generator=gen, dtype=DTYPE)
    u_test = torch.sin(math.pi * x_test[:, 0]) * torch.sin(math.pi * x_test[:, 1])
    return Problem(
        "poisson",
        f"Poisson 2-D, {n}×{n} interior grid, 2-{width}-{width}-1 tanh",
        lambda: mlp(2, width, 2),
        closure_for,
        x_test,
        u_test,
    )


def reaction(nx: int, nt: int, width: int, rho: float = 5.0) -> Problem:
    two_pi = 2 * math.pi
    xs = torch.linspace(0, two_pi, nx + 1, dtype=DTYPE)[:-1]
    ts = torch.linspace(0, 1, nt, dtype=DTYPE)  # t = 0 too: no room for a jump to u = 0
    x_in = torch.cartesian_prod(xs, ts)

    def h(x: Tensor) -> Tensor:
        return torch.exp(-((x - math.pi) ** 2) / (2 * (math.pi / 4) ** 2))

    x0 = torch.stack([xs, torch.zeros_like(xs)], 1)
    u0 = h(xs)
    left = torch.stack([torch.zeros_like(ts), ts], 1)
    right = torch.stack([torch.full_like(ts, two_pi), ts], 1)

    def exact(xt: Tensor) -> Tensor:
        e = h(xt[:, 0]) * torch.exp(rho * xt[:, 1])
        return e / (e + 1 - h(xt[:, 0]))

    def closure_for(net: nn.Module) -> Closure:
        def closure():
            x = x_in.clone().requires_grad_(True)
            u = net(x).squeeze(1)
            r_interior = _derivatives(u, x)[:, 1] - rho * u * (1 - u)
            r_boundary = (net(left) - net(right)).squeeze(1)
            r_initial = net(x0).squeeze(1) - u0
            loss = (r_interior**2).mean() + (r_boundary**2).mean() + (r_initial**2).mean()
            return loss, (r_interior, r_boundary, r_initial)

        return closure

    gen = torch.Generator().manual_seed(123)
    x_test = torch.rand(4096, 2, generator=gen, dtype=DTYPE) * torch.tensor([two_pi, 1.0])
    return Problem(
        "reaction",
        f"Reaction ρ={rho:g}, {nx}×{nt} grid, 2-{width}-{width}-1 tanh",
        lambda: mlp(2, width, 2),
        closure_for,
        x_test,
        exact(x_test),
    )


def burgers_exact(x: Tensor, t: Tensor, nu: float, n_quad: int = 4000) -> Tensor:
    """Viscous Burgers with :math:`u(x, 0) = -\\sin(\\pi x)`, by Cole-Hopf in float64.

    :math:`u = -\\int \\sin(\\pi(x-\\eta)) F\\,d\\eta / \\int F\\,d\\eta` with
    :math:`F = \\exp(-\\cos(\\pi(x-\\eta))/(2\\pi\\nu) - \\eta^2/(4\\nu t))`, by the
    trapezoidal rule over :math:`\\pm 12` widths of the Gaussian (log-sum-exp scaled).
    """
    x, t = x.to(DTYPE), t.to(DTYPE).clamp(min=1e-8)
    z = torch.linspace(-12.0, 12.0, n_quad, dtype=DTYPE)
    eta = z[None, :] * torch.sqrt(4 * nu * t)[:, None]
    y = x[:, None] - eta
    log_f = -torch.cos(math.pi * y) / (2 * math.pi * nu) - z[None, :] ** 2
    w = torch.exp(log_f - log_f.max(1, keepdim=True).values)
    return -(torch.sin(math.pi * y) * w).sum(1) / w.sum(1)


def burgers(
    n_in: int, n_b: int, width: int, depth: int = 3, n_test: int = 4096, seed: int = 7
) -> Problem:
    """1-D viscous Burgers, :math:`\\nu = 0.01/\\pi` on :math:`[-1, 1] \\times [0, 1]`
    (Raissi, Perdikaris & Karniadakis 2019, §3.1), zero Dirichlet data; ``n_in`` random
    collocation points (drawn from ``seed``), ``n_b`` on the initial line and on each wall."""
    nu = 0.01 / math.pi

    def draw(n: int, gen: torch.Generator) -> Tensor:
        pts = torch.rand(n, 2, generator=gen, dtype=DTYPE) * torch.tensor([2.0, 1.0])
        pts[:, 0] -= 1
        return pts

    x_fixed = draw(n_in, torch.Generator().manual_seed(seed))
    xs = torch.linspace(-1, 1, n_b, dtype=DTYPE)
    ts = torch.linspace(0, 1, n_b, dtype=DTYPE)
    x0 = torch.stack([xs, torch.zeros_like(xs)], 1)
    u0 = -torch.sin(math.pi * xs)
    x_wall = torch.cat([torch.stack([torch.full_like(ts, s), ts], 1) for s in (-1.0, 1.0)])

    def closure_for(net: nn.Module, points: Tensor | None = None) -> Closure:
        pts = x_fixed if points is None else points

        def closure():
            x = pts.clone().requires_grad_(True)
            u = net(x).squeeze(1)
            du = _derivatives(u, x)
            u_xx = _derivatives(du[:, 0], x)[:, 0]
            r_interior = du[:, 1] + u * du[:, 0] - nu * u_xx
            r_initial = net(x0).squeeze(1) - u0
            r_boundary = net(x_wall).squeeze(1)
            loss = (r_interior**2).mean() + (r_initial**2).mean() + (r_boundary**2).mean()
            return loss, (r_interior, r_initial, r_boundary)

        return closure

    gen = torch.Generator().manual_seed(123)
    x_test = torch.rand(n_test, 2, generator=gen, dtype=DTYPE) * torch.tensor([2.0, 1.0])
    x_test[:, 0] -= 1
    return Problem(
        "burgers",
        f"Burgers ν=0.01/π, {n_in} points, 2-{width}×{depth}-1 tanh",
        lambda: mlp(2, width, depth),
        closure_for,
        x_test,
        burgers_exact(x_test[:, 0], x_test[:, 1], nu),
        draw,
    )


@functools.lru_cache(maxsize=4)
def allen_cahn_reference(
    n_x: int = 1024, dt: float = 5e-4, n_t: int = 101, eps: float = 1e-4, gamma: float = 5.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Allen-Cahn :math:`u_t = \\epsilon u_{xx} + \\gamma(u - u^3)` on the periodic
    :math:`[-1, 1)`, :math:`u(x, 0) = x^2\\cos(\\pi x)`: Fourier collocation in x (``n_x``
    points) and integrating-factor RK4 in t (Lawson 1967; the linear part
    :math:`-\\epsilon k^2 + \\gamma` exactly), step ``dt``, in float64 numpy.

    Returns ``(x, t, u)`` with ``u[j, i]`` at ``t[j]`` (``n_t`` times in [0, 1]) and ``x[i]``.
    Against 2,048 points and dt / 2 the defaults differ by at most 2.6e-4 (at t = 0.01 near
    x = ±1, where the initial slope jumps across the period), 3.2e-5 from t = 0.1 and 1.3e-9
    at t = 1; halving dt alone changes 5e-12. About a second; cached.
    """
    steps_per_frame = round(1.0 / ((n_t - 1) * dt))
    if not math.isclose(steps_per_frame * dt * (n_t - 1), 1.0, rel_tol=1e-12):
        raise ValueError(f"`dt` must divide 1/(n_t - 1) = {1 / (n_t - 1)!r}, got {dt!r}.")
    x = -1.0 + 2.0 * np.arange(n_x) / n_x
    k = math.pi * np.fft.rfftfreq(n_x, d=1.0 / n_x)  # period 2: wavenumbers π·m
    lin = -eps * k**2 + gamma
    e1, e2 = np.exp(dt * lin), np.exp(dt * lin / 2)

    def nonlinear(v: np.ndarray) -> np.ndarray:
        return np.fft.rfft(-gamma * np.fft.irfft(v, n_x) ** 3)

    v = np.fft.rfft(x**2 * np.cos(math.pi * x))
    frames = [np.fft.irfft(v, n_x)]
    for _ in range(n_t - 1):
        for _ in range(steps_per_frame):
            k1 = nonlinear(v)
            k2 = nonlinear(e2 * (v + dt / 2 * k1))
            k3 = nonlinear(e2 * v + dt / 2 * k2)
            k4 = nonlinear(e1 * v + dt * e2 * k3)
            v = e1 * v + dt / 6 * (e1 * k1 + 2 * e2 * (k2 + k3) + k4)
        frames.append(np.fft.irfft(v, n_x))
    return x, np.linspace(0.0, 1.0, n_t), np.stack(frames)


def allen_cahn(
    n_in: int,
    n_b: int,
    width: int,
    depth: int = 3,
    seed: int = 7,
    initial_weight: float = 100.0,
) -> Problem:
    """1-D Allen-Cahn :math:`u_t - 10^{-4} u_{xx} + 5u^3 - 5u = 0` on :math:`[-1, 1] \\times
    [0, 1]`, :math:`u(x, 0) = x^2\\cos(\\pi x)`, periodic in x (value and slope; Raissi,
    Perdikaris & Karniadakis 2019; Wight & Zhao 2020); ``n_in`` random collocation points
    (``seed``), ``n_b`` on the initial line and on each wall. The initial block weighs
    ``initial_weight`` (ours, not tuned: weighting the initial condition is the usual remedy for
    a plain PINN on this problem). Reference: :func:`allen_cahn_reference` on its 1,024 × 101
    grid, tested on every 4th x (25,856 points)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int, gen: torch.Generator) -> Tensor:
        pts = torch.rand(n, 2, generator=gen, dtype=DTYPE) * torch.tensor([2.0, 1.0])
        pts[:, 0] -= 1
        return pts

    x_fixed = draw(n_in, gen)
    xs = torch.linspace(-1, 1, n_b, dtype=DTYPE)
    ts = torch.linspace(0, 1, n_b, dtype=DTYPE)
    x0 = torch.stack([xs, torch.zeros_like(xs)], 1)
    u0 = xs**2 * torch.cos(math.pi * xs)
    left = torch.stack([torch.full_like(ts, -1.0), ts], 1)
    right = torch.stack([torch.ones_like(ts), ts], 1)

    def closure_for(net: nn.Module, points: Tensor | None = None) -> Closure:
        pts = x_fixed if points is None else points

        def closure():
            x = pts.clone().requires_grad_(True)
            u = net(x).squeeze(1)
            du = _derivatives(u, x)
            u_xx = _derivatives(du[:, 0], x)[:, 0]
            r_interior = du[:, 1] - 1e-4 * u_xx + 5 * u**3 - 5 * u
            r_initial = net(x0).squeeze(1) - u0
            walls = torch.cat([left, right]).requires_grad_(True)
            uw = net(walls).squeeze(1)
            uw_x = _derivatives(uw, walls)[:, 0]
            r_value = uw[: len(ts)] - uw[len(ts) :]
            r_slope = uw_x[: len(ts)] - uw_x[len(ts) :]
            loss = (
                (r_interior**2).mean()
                + initial_weight * (r_initial**2).mean()
                + (r_value**2).mean()
                + (r_slope**2).mean()
            )
            return loss, (r_interior, r_initial, r_value, r_slope)

        return closure

    x, t, u = allen_cahn_reference()
    x_test = torch.cartesian_prod(torch.from_numpy(t), torch.from_numpy(x[::4])).flip(1)
    return Problem(
        "allen_cahn",
        f"Allen-Cahn, {n_in} points, 2-{width}×{depth}-1 tanh",
        lambda: mlp(2, width, depth),
        closure_for,
        x_test.contiguous(),
        torch.from_numpy(u[:, ::4].reshape(-1)),
        draw,
    )


def helmholtz(n: int, width: int, a1: float = 1.0, a2: float = 4.0, k: float = 1.0) -> Problem:
    """2-D Helmholtz :math:`\\Delta u + k^2 u = q` on :math:`[-1, 1]^2`, :math:`u =
    \\sin(a_1\\pi x)\\sin(a_2\\pi y)` (Wang, Teng & Perdikaris 2021, §2.3), zero Dirichlet
    data; collocation on an ``n`` × ``n`` interior grid."""
    g = torch.linspace(-1, 1, n + 2, dtype=DTYPE)
    x_in = torch.cartesian_prod(g[1:-1], g[1:-1])
    e, z = torch.ones_like(g), -torch.ones_like(g)
    x_b = torch.cat([torch.stack(p, 1) for p in ((g, z), (g, e), (z, g), (e, g))])

    def exact(x: Tensor) -> Tensor:
        return torch.sin(a1 * math.pi * x[:, 0]) * torch.sin(a2 * math.pi * x[:, 1])

    q = (k**2 - (a1 * math.pi) ** 2 - (a2 * math.pi) ** 2) * exact(x_in)

    def closure_for(net: nn.Module) -> Closure:
        def closure():
            x = x_in.clone().requires_grad_(True)
            u = net(x).squeeze(1)
            du = _derivatives(u, x)
            lap = sum(_derivatives(du[:, i], x)[:, i] for i in range(2))
            r_interior = lap + k**2 * u - q
            r_boundary = net(x_b).squeeze(1)
            return (r_interior**2).mean() + (r_boundary**2).mean(), (r_interior, r_boundary)

        return closure

    gen = torch.Generator().manual_seed(123)
    x_test = torch.rand(4096, 2, generator=gen, dtype=DTYPE) * 2 - 1
    return Problem(
        "helmholtz",
        f"Helmholtz a=({a1:g}, {a2:g}), {n}×{n} grid, 2-{width}-{width}-1 tanh",
        lambda: mlp(2, width, 2),
        closure_for,
        x_test,
        exact(x_test),
    )


def convection(nx: int, nt: int, width: int, beta: float = 30.0) -> Problem:
    """1-D convection :math:`u_t + \\beta u_x = 0` on :math:`[0, 2\\pi] \\times [0, 1]`,
    :math:`u(x, 0) = \\sin x`, periodic in :math:`x`; exact :math:`\\sin(x - \\beta t)`
    (Krishnapriyan et al. 2021's failure mode; Rathore et al. 2024, §2)."""
    two_pi = 2 * math.pi
    xs = torch.linspace(0, two_pi, nx + 1, dtype=DTYPE)[:-1]
    ts = torch.linspace(0, 1, nt, dtype=DTYPE)
    x_in = torch.cartesian_prod(xs, ts)
    x0 = torch.stack([xs, torch.zeros_like(xs)], 1)
    u0 = torch.sin(xs)
    left = torch.stack([torch.zeros_like(ts), ts], 1)
    right = torch.stack([torch.full_like(ts, two_pi), ts], 1)

    def closure_for(net: nn.Module) -> Closure:
        def closure():
            x = x_in.clone().requires_grad_(True)
            du = _derivatives(net(x).squeeze(1), x)
            r_interior = du[:, 1] + beta * du[:, 0]
            r_boundary = (net(left) - net(right)).squeeze(1)
            r_initial = net(x0).squeeze(1) - u0
            loss = (r_interior**2).mean() + (r_boundary**2).mean() + (r_initial**2).mean()
            return loss, (r_interior, r_boundary, r_initial)

        return closure

    gen = torch.Generator().manual_seed(123)
    x_test = torch.rand(4096, 2, generator=gen, dtype=DTYPE) * torch.tensor([two_pi, 1.0])
    return Problem(
        "convection",
        f"Convection β={beta:g}, {nx}×{nt} grid, 2-{width}-{width}-1 tanh",
        lambda: mlp(2, width, 2),
        closure_for,
        x_test,
        torch.sin(x_test[:, 0] - beta * x_test[:, 1]),
    )


def rel_l2(net: nn.Module, prob: Problem) -> float:
    with torch.no_grad():
        u = net(prob.x_test).squeeze(1)
    return float(torch.linalg.vector_norm(u - prob.u_test) / torch.linalg.vector_norm(prob.u_test))


# --------------------------------------------------------------------------------------------
# training at equal wall-clock
# --------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Records of one training run; ``loss``/``error`` are the last ones within the budget."""

    method: str
    budget: float
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    steps: int = 0
    note: str = ""

    @property
    def last(self) -> int:
        # a step that ends past the budget does not count: equal wall-clock for every method
        return max(i for i, s in enumerate(self.seconds) if s <= self.budget)

    @property
    def loss(self) -> float:
        return self.losses[self.last]

    @property
    def error(self) -> float:
        return self.errors[self.last]


def _adam(net: nn.Module, closure: Closure, lr: float) -> Callable[[], float]:
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step() -> float:
        opt.zero_grad()
        loss, _ = closure()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _lbfgs(net: nn.Module, closure: Closure) -> Callable[[], float]:
    opt = torch.optim.LBFGS(
        net.parameters(),
        lr=1.0,
        max_iter=10,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
    )

    def lbfgs_closure():
        opt.zero_grad()
        loss, _ = closure()
        loss.backward()
        return loss

    def step() -> float:
        return float(opt.step(lbfgs_closure).detach())

    return step


def _hf(net: nn.Module, closure: Closure, kwargs: dict) -> Callable[[], float]:
    opt = HessianFree(net.parameters(), **kwargs)

    def step() -> float:
        opt.step(closure)
        return opt.last_step.loss_after

    return step


def train(
    prob: Problem,
    method: str,
    init: dict,
    budget: float,
    *,
    adam_lr: float,
    switch: float,
    hf_kwargs: dict | None = None,
    record_every: float = 0.25,
) -> Run:
    """Train a copy of the initial weights with ``method`` for ``budget`` training seconds."""
    net = prob.make_net()
    net.load_state_dict(copy.deepcopy(init))
    closure = prob.closure_for(net)
    run = Run(method, budget)
    first, _, second = method.partition(" → ")
    phases = [(first, budget * switch if second else budget)]
    if second:
        phases.append((second, budget))
    elapsed, last_record = 0.0, -math.inf
    run.seconds.append(0.0)
    run.losses.append(float(closure()[0].detach()))
    run.errors.append(rel_l2(net, prob))
    for name, until in phases:
        if name == "Adam":
            step = _adam(net, closure, adam_lr)
        elif name == "L-BFGS":
            step = _lbfgs(net, closure)
        else:
            step = _hf(net, closure, hf_kwargs or {})
        while elapsed < until:
            t0 = time.perf_counter()
            loss = step()
            elapsed += time.perf_counter() - t0
            run.steps += elapsed <= budget
            if not math.isfinite(loss):
                run.note = f"non-finite loss at {elapsed:.1f} s"
                break
            if elapsed - last_record >= record_every or elapsed >= until or name != "Adam":
                last_record = elapsed
                run.seconds.append(elapsed)
                run.losses.append(float(closure()[0].detach()))
                run.errors.append(rel_l2(net, prob))
        if run.note:
            break
    return run


# --------------------------------------------------------------------------------------------
# cost of a Gauss-Newton product
# --------------------------------------------------------------------------------------------
def product_cost(
    prob: Problem, init: dict, rounds: int, threads: int = 1
) -> dict[str, tuple[float, float, float, float]]:
    """Median time (ms), and median and quartiles of the ratio to the gradient, of each call.

    bench.py's method: every round calls every contender once in a shuffled order (seeded),
    after ``gc.collect(0)``, and the ratio is taken against the same round's gradient; on
    ``threads`` torch threads (restored afterwards). One thread by default: on two shared cores
    two threads made the per-process median of the GN product's ratio range 0.57-2.48x for one
    and the same code (experiments/README.md, "prodcost").
    """
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    net = prob.make_net()
    net.load_state_dict(init)
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    closure = prob.closure_for(net)
    loss, blocks = closure()
    G = GGNProduct(loss, blocks, params)
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    vs = [t.view_as(p) for t, p in zip(G.layout.split(v), params, strict=True)]

    def gradient() -> None:
        loss, _ = closure()
        torch.autograd.grad(loss, params)

    def setup() -> None:
        loss, blocks = closure()
        GGNProduct(loss, blocks, params)

    class _Dual(nn.Module):  # the same network with dual (forward-mode) parameters
        def __init__(self, d: dict) -> None:
            super().__init__()
            self.d = d

        def forward(self, x: Tensor) -> Tensor:
            return functional_call(net, self.d, (x,))

    def forward_mode_jv() -> None:
        with fwAD.dual_level():
            duals = zip(names, params, vs, strict=True)
            d = {n: fwAD.make_dual(p.detach(), t) for n, p, t in duals}
            _, out = prob.closure_for(_Dual(d))()
            [fwAD.unpack_dual(o).tangent for o in out]

    fns = {
        "gradient": gradient,
        "GN product (R-op Jv, graph reused)": lambda: G.matvec(v),
        "Jv by R-op (graph reused)": lambda: G.jacobian.jvp(v),
        "Jv by forward mode (new forward pass)": forward_mode_jv,
        "GN set-up (closure + graph, once per step)": setup,
    }
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # bench.py's loop: shuffled rounds, gc before each call
        times = interleave(fns, rounds=rounds, device=v.device.type, seed=0, warmup=1).samples
    finally:
        torch.set_num_threads(before)
    ref = times["gradient"]
    out = {}
    for k, t in times.items():
        ratios = [a / b for a, b in zip(t, ref, strict=True)]
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[k] = (statistics.median(t) * 1e3, statistics.median(ratios), q1, q3)
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
BASELINES = ("Adam", "L-BFGS", "Adam → L-BFGS")


def _table(runs: list[Run]) -> str:
    base = [r for r in runs if r.method in BASELINES]
    best_loss = min(r.loss for r in base)
    best_err = min(r.error for r in base)
    rows = [
        [
            r.method,
            f"{r.loss:.3e}",
            f"{r.error:.3e}",
            f"{r.loss / best_loss:.3g}",
            f"{r.error / best_err:.3g}",
            r.steps,
            f"{r.seconds[r.last]:.1f}",
            r.note,
        ]
        for r in runs
    ]
    header = [
        "method",
        "final loss",
        "rel. L2 error",
        "loss / best baseline",
        "error / best baseline",
        "steps",
        "at s",
        "note",
    ]
    return md_table(header, rows)


def _cost_table(cost: dict, threads: int, rounds: int) -> str:
    """The product-cost table: median ms, median ratio to the gradient [quartiles]."""
    rows = [[k, f"{ms:.2f}", f"{r:.2f} [{q1:.2f}–{q3:.2f}]"] for k, (ms, r, q1, q3) in cost.items()]
    return (
        "Cost against one gradient of the same loss (closure + backward), on "
        f"{threads} thread(s), {rounds} rounds in a shuffled order, each ratio against its "
        "round's gradient; median [quartiles]:\n\n" + md_table(["", "ms", "× gradient"], rows)
    )


def _targets(results: dict, costs: dict) -> list[list[str]]:
    """The issue's targets, each with what this run measured, for HF's defaults and tuned rows."""
    rows = []
    by = {k: {r.method: r for r in runs} for k, (_, runs) in results.items()}
    hf_rows = ("Adam → HF (defaults)", "Adam → HF (tuned)")
    if "poisson" in by:
        best = min(by["poisson"][m].error for m in BASELINES)
        for name in hf_rows:
            hf = by["poisson"][name]
            rows.append(
                [
                    f"Poisson: {name} error ≤ 0.1 × best baseline",
                    f"{hf.error / best:.3g} ×",
                    "met" if hf.error <= 0.1 * best else "**missed**",
                ]
            )
    if "reaction" in by:
        lb = by["reaction"]["Adam → L-BFGS"]
        for name in hf_rows:
            hf = by["reaction"][name]
            ok = hf.loss < lb.loss and hf.error < lb.error
            rows.append(
                [
                    f"Reaction: {name} below Adam → L-BFGS in loss and error",
                    f"loss {hf.loss / lb.loss:.3g} ×, error {hf.error / lb.error:.3g} ×",
                    "met" if ok else "**missed**",
                ]
            )
    for key, c in costs.items():
        r = c["GN product (R-op Jv, graph reused)"][1]
        rows.append(
            [f"{key}: GN product ≤ 2 × gradient", f"{r:.2f} ×", "met" if r <= 2 else "**missed**"]
        )
    return rows


def _plot(results: dict[str, tuple[Problem, list[Run]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (prob, runs) in zip(axes[0], results.values(), strict=True):
        for r in runs:
            ax.semilogy(r.seconds, r.errors, label=r.method)
        ax.set(title=prob.title, xlabel="training seconds", ylabel="relative L2 error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny problems and budgets (< 2 min)")
    ap.add_argument(
        "--seconds", type=float, help="training seconds per method (Poisson 40, reaction 60)"
    )
    ap.add_argument("--switch", type=float, default=0.2, help="Adam's share before switching")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--problems",
        default="poisson,reaction",
        help="comma-separated, from poisson, reaction, burgers, helmholtz, convection, allen_cahn",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument(
        "--product-threads",
        type=int,
        default=1,
        help="torch threads while the products are timed (default 1: stable ratios on a shared "
        "CPU, as bench.py)",
    )
    ap.add_argument("--product-rounds", type=int, help="timing rounds (default 60, --quick 3)")
    ap.add_argument(
        "--products-only",
        action="store_true",
        help="time the products against the gradient, print the tables, train nothing",
    )
    args = ap.parse_args(argv)
    args.product_rounds = args.product_rounds or (3 if args.quick else 60)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    makers = {
        "poisson": (lambda: poisson(6, 8)) if args.quick else (lambda: poisson(24, 32)),
        "reaction": (lambda: reaction(12, 6, 8)) if args.quick else (lambda: reaction(48, 32, 32)),
        # not in the default --problems (experiments/README.md, "pinn2"):
        "burgers": (lambda: burgers(200, 20, 8, 2))
        if args.quick
        else (lambda: burgers(1000, 50, 20)),
        "helmholtz": (lambda: helmholtz(8, 8)) if args.quick else (lambda: helmholtz(24, 32)),
        "convection": (lambda: convection(16, 8, 8))
        if args.quick
        else (lambda: convection(48, 32, 32)),
        "allen_cahn": (lambda: allen_cahn(200, 20, 8, 2))
        if args.quick
        else (lambda: allen_cahn(2000, 100, 32)),
    }
    lrs = (1e-3, 1e-2) if args.quick else (1e-3, 3e-3, 1e-2)
    results: dict[str, tuple[Problem, list[Run]]] = {}
    sweeps: dict[str, list[tuple[float, float, float]]] = {}
    budgets: dict[str, float] = {}
    costs: dict[str, dict[str, tuple[float, float, float, float]]] = {}
    for key in args.problems.split(","):
        if key not in makers:
            ap.error(f"unknown problem {key!r} in --problems; expected some of {', '.join(makers)}")
        prob = makers[key]()
        full = {"poisson": 40.0, "reaction": 60.0}.get(key, 30.0)
        budget = args.seconds or (2.0 if args.quick else full)
        budgets[key] = budget
        torch.manual_seed(args.seed)
        init = copy.deepcopy(prob.make_net().state_dict())
        costs[key] = product_cost(prob, init, args.product_rounds, args.product_threads)
        if args.products_only:
            table = _cost_table(costs[key], args.product_threads, args.product_rounds)
            print(f"{prob.title}:\n{table}\n", flush=True)
            continue
        sweep = [
            (
                lr,
                (r := train(prob, "Adam", init, budget / len(lrs), adam_lr=lr, switch=1)).loss,
                r.error,
            )
            for lr in lrs
        ]
        sweeps[key] = sweep
        lr = min(sweep, key=lambda s: s[1] if math.isfinite(s[1]) else math.inf)[0]
        kw = dict(adam_lr=lr, switch=args.switch)
        runs = [
            train(prob, "Adam", init, budget, **kw),
            train(prob, "L-BFGS", init, budget, **kw),
            train(prob, "Adam → L-BFGS", init, budget, **kw),
            train(prob, "Adam → HF", init, budget, hf_kwargs={}, **kw),
            train(prob, "Adam → HF", init, budget, hf_kwargs=HF_TUNED, **kw),
        ]
        runs[3].method, runs[4].method = "Adam → HF (defaults)", "Adam → HF (tuned)"
        results[key] = (prob, runs)
        print(f"{prob.title}:\n{_table(runs)}\n", flush=True)
    if args.products_only:
        load = f"{' '.join(f'{x:.2f}' for x in load_start)} -> {os.getloadavg()[0]:.2f}"
        print(f"load average (1/5/15 min at start -> 1 min at end): {load}")
        return None

    stem = f"{datetime.date.today()}-{machine_tag()}-pinn{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{stem}.png"
    _plot(results, png)
    lines = [
        f"# PINNs: Adam, L-BFGS, Adam → L-BFGS, Adam → HessianFree ({datetime.date.today()})",
        "",
        f"`python experiments/pinn.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
        f"training seconds per method {budgets}, Adam's share before a switch {args.switch:g}, "
        "float64, "
        f"torch {torch.__version__} on {torch.get_num_threads()} threads, CPU {_cpu_model()} "
        f"({os.cpu_count()} logical). Load average (1/5/15 min) at start "
        f"{' '.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}: on a busy machine every method gets "
        "fewer steps, so compare rows of one report, not reports.",
        "",
        "HF defaults: `HessianFree(params)` (its `precond='auto'` is a rank-60 Nyström "
        f"preconditioner for residual blocks); tuned: `HessianFree(params, **{HF_TUNED})`. "
        "Ratios are to the best of the three baselines (Adam, L-BFGS, Adam → L-BFGS); below 1 "
        "is better. Error = relative L2 error against the exact solution on 4,096 random "
        "points.",
        "",
        f"![relative L2 error against training seconds]({png.name})",
    ]
    targets = _targets(results, costs)
    lines += ["", "## Targets", "", md_table(["target", "measured", "verdict"], targets)]
    for key, (prob, runs) in results.items():
        lines += [
            "",
            f"## {prob.title}",
            "",
            "Adam learning-rate sweep "
            f"({budgets[key] / len(lrs):.1f} s each; the lowest loss wins): "
            + ", ".join(f"lr {lr:g}: loss {lo:.2e}, error {er:.2e}" for lr, lo, er in sweeps[key]),
            "",
            _table(runs),
            "",
        ]
        lines += [_cost_table(costs[key], args.product_threads, args.product_rounds)]
    report = args.out / f"{stem}.md"
    save_text(report, "\n".join(lines) + "\n")
    print(f"wrote {report} and {png}")
    return report


if __name__ == "__main__":
    main()
