"""Closure parsing hooks torch.autograd for its own thread only (hessfree._autograd_hooks)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from hessfree import HessianFree
from hessfree._autograd_hooks import AutogradHook

ORIGINAL_BACKWARD = torch.autograd.backward
ORIGINAL_GRAD = torch.autograd.grad


def _tiny(seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model.double()
    return (
        model,
        torch.randn(16, 3, generator=g, dtype=torch.float64),
        torch.randn(16, 1, generator=g, dtype=torch.float64),
    )


def _plain_step(model, x, y) -> list[torch.Tensor]:
    opt = HessianFree(model.parameters(), cg_max_iter=5)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def test_another_threads_backward_is_untouched_while_a_closure_is_parsed():
    model, x, y = _tiny(0)
    other, ox, oy = _tiny(1)
    expected = _plain_step(copy.deepcopy(model), x, y)  # the same step with no other thread about
    opt = HessianFree(model.parameters(), cg_max_iter=5)
    inside, release = threading.Event(), threading.Event()
    calls = []

    def closure():  # torch.optim.LBFGS style: its first call of a step is parsed with the hook
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(model[0].weight.grad.requires_grad)
        if len(calls) == 1:
            inside.set()
            assert release.wait(timeout=120), "the main thread never released the closure"
        return loss

    errors = []

    def step():
        try:
            opt.step(closure)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            inside.set()

    worker = threading.Thread(target=step)
    worker.start()
    try:
        assert inside.wait(timeout=120)
        assert not errors, errors
        assert torch.autograd.backward is not ORIGINAL_BACKWARD  # hooked while the closure runs
        loss = torch.nn.functional.mse_loss(other(ox), oy)
        loss.backward()  # from this thread: no create_graph
        assert all(p.grad.grad_fn is None and not p.grad.requires_grad for p in other.parameters())
    finally:
        release.set()
        worker.join(timeout=120)
    assert not worker.is_alive() and not errors, errors
    assert calls[0] is True  # the closure's own first backward did build the graph
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    assert torch.autograd.backward is ORIGINAL_BACKWARD
    assert torch.autograd.grad is ORIGINAL_GRAD


def test_hook_stays_installed_until_the_last_thread_leaves_and_counts_only_its_own_calls():
    hook = AutogradHook("grad", lambda original, *args, **kwargs: original(*args, **kwargs))
    a_in, b_in, a_may_leave, a_left = (threading.Event() for _ in range(4))
    seen = {}
    x = torch.tensor(2.0, requires_grad=True)

    def a():
        with hook.active() as called:
            a_in.set()
            assert a_may_leave.wait(timeout=60)
        seen["a"] = list(called)
        a_left.set()

    thread = threading.Thread(target=a)
    thread.start()
    assert a_in.wait(timeout=60)
    with hook.active() as called:
        b_in.set()
        (gx,) = torch.autograd.grad(x**3, x)  # this thread's call: counted here only
        a_may_leave.set()
        assert a_left.wait(timeout=60)
        assert torch.autograd.grad is not ORIGINAL_GRAD  # still installed: this thread is inside
    thread.join(timeout=60)
    assert float(gx) == 12.0  # d/dx x^3 at 2, through the hook
    assert called == [True] and seen["a"] == []
    assert torch.autograd.grad is ORIGINAL_GRAD


def test_hook_is_removed_on_error_and_nests_in_one_thread():
    hook = AutogradHook("grad", lambda original, *args, **kwargs: original(*args, **kwargs))
    x = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(RuntimeError, match="boom"):
        with hook.active():
            raise RuntimeError("boom")
    assert torch.autograd.grad is ORIGINAL_GRAD
    with hook.active() as outer:
        with hook.active() as inner:
            torch.autograd.grad(x * 2, x)
        torch.autograd.grad(x * 3, x)
    assert inner == [True] and outer == [True]
    assert torch.autograd.grad is ORIGINAL_GRAD
