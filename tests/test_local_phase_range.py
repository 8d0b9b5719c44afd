"""The local (Newton) phase ends where the outer loss's Hessian moved too far over the phase's
own step (experiments/README.md, "phaserule"): the phase's long solves paid off where
:math:`H_\\ell` changed by at most 1.5e-2 over a Newton step (squared error: 0) and cost where
it changed by 0.1-1.2."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn

from hessfree import HessianFree
from hessfree._damping_control import _PHASE_RANGE, _PROBE_SEED

DTYPE = torch.float64


def _sharp_soft_target_fit():
    """A 3-6-4 tanh MLP fitted by cross-entropy to softmax(6 × a same-shaped teacher): sharp,
    realizable soft targets, whose phase (main's rule: from step 19) meets a Newton step that
    moves the softmax's curvature by more than the bound."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).to(DTYPE)  # noqa: E731
    teacher, model = make(), make()
    x = torch.randn(64, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = torch.softmax(6 * teacher(x), 1)
    return model, x, y


def _loss_hessian_times_u(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Oracle, in closed form: the mean cross-entropy's Hessian in the logits is, per example,
    (diag(s) − s sᵀ) / n with s the softmax, applied to the probe's u (the library's fixed
    draw; the targets do not enter)."""
    with torch.no_grad():
        s = torch.softmax(model(x), 1)
    u = torch.randn(s.shape, generator=torch.Generator().manual_seed(_PROBE_SEED), dtype=DTYPE)
    return (s * u - s * (s * u).sum(1, keepdim=True)) / len(x)


def test_the_local_phase_ends_where_the_loss_hessian_moved_too_far_over_its_step(one_thread):
    model, x, y = _sharp_soft_target_fit()
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    previous, decisions = None, []  # (H_ℓu, ‖g‖) at the last phase step's start
    for _ in range(30):
        on = bool(opt._global_state().get("newton"))
        hu = _loss_hessian_times_u(model, x) if on else None
        opt.step(closure)
        info, state = opt.last_step, opt._global_state()
        if on and previous is not None and info.accepted:
            before, g_norm = previous
            change = float((hu - before).abs().max() / before.abs().max())
            left = not state.get("newton")
            decisions.append((change, left))
            if left:  # left before this step's solve: a K-FAC step (cap 5), a bound on ‖g‖
                assert info.cg_iters <= 5
                bound = state["newton_reentry_grad_norm"]
                torch.testing.assert_close(bound, g_norm * _PHASE_RANGE / change, rtol=1e-6, atol=0)
                break
        previous = (hu, info.grad_norm) if on and info.accepted else None
    # the phase went on exactly while the oracle's change stayed within the bound; it ended
    # once (main's phase never ends on a step that moved)
    assert decisions and decisions[-1][1]
    assert all((change > _PHASE_RANGE) == left for change, left in decisions)


def test_a_run_resumed_inside_the_phase_leaves_it_where_the_uninterrupted_run_does(one_thread):
    # the previous phase step's H_ℓu lives in the optimizer's state: a resume from state_dict()
    # just before the exit decides as the uninterrupted run (oracle: that run, bitwise)
    def run(steps: int, resume_at: int | None = None):
        model, x, y = _sharp_soft_target_fit()
        opt = HessianFree(model.parameters())

        def closure():
            out = model(x)
            return F.cross_entropy(out, y), out

        exit_step = None
        for k in range(steps):
            if k == resume_at:
                buffer = io.BytesIO()
                torch.save((model.state_dict(), opt.state_dict()), buffer)
                buffer.seek(0)
                weights, saved = torch.load(buffer, weights_only=True)
                model, _, _ = _sharp_soft_target_fit()
                model.load_state_dict(weights)
                opt = HessianFree(model.parameters())
                opt.load_state_dict(saved)
            was_on = bool(opt._global_state().get("newton"))
            opt.step(closure)
            if was_on and not opt._global_state().get("newton") and exit_step is None:
                exit_step = k
        return [p.detach().clone() for p in model.parameters()], exit_step

    uninterrupted, exit_step = run(40)
    assert exit_step is not None  # the phase left for its range within 40 steps
    resumed, resumed_exit = run(40, resume_at=exit_step)
    assert resumed_exit == exit_step
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))
