"""closure19: buffers a forward rebinds to a new tensor, a copied or loaded optimizer, and
buffers written in special ways (experiments/README.md, "closure19")."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.func import functional_call

from hessfree import HessianFree

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared 2-core machine


class _ReboundMean(torch.nn.Module):
    """A running mean of the inputs kept by assigning a new tensor in the forward
    (``self.mean = ...`` goes through ``Module.__setattr__`` into ``_buffers``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
        return x - self.mean


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        _ReboundMean(), torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    return net.double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64) + 0.5
    return x, (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()


def _one_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Oracle: the rebound buffer of a copy of the model after one training-mode forward."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(x)
    return twin[0].mean.clone()


def _quiet_step(opt: HessianFree, closure) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the buffer-writer warning, tested elsewhere
        opt.step(closure)


def test_trial_calls_leave_a_rebound_buffer_as_the_steps_call_left_it():
    # Fails on main: each trial call rebound the mean once more (the module kept the last
    # trial's tensor). Oracle: a copy run forward once at the step's start (bitwise).
    model = _model()
    x, y = _data()
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), out

    for _ in range(3):
        oracle = _one_forward(model, x)
        _quiet_step(opt, closure)
        assert opt.last_step.closure_calls >= 3  # the step's call, f(θ0) as a trial, a trial
        assert torch.equal(model[0].mean, oracle)
        assert torch.equal(model[0].state_dict()["mean"], oracle)


@pytest.mark.parametrize("fail_at", [1, 3], ids=["first_call_after_forward", "trial_call"])
def test_step_that_raises_leaves_a_rebound_buffer_as_at_its_start(fail_at):
    # Fails on main: the raised step kept its calls' rebinding. Oracle: the tensor (and its
    # values) the module held at the step's start.
    model = _model()
    x, y = _data()
    opt = HessianFree(model.parameters())
    calls = [0]

    def closure(fail: bool = False):
        calls[0] += 1
        out = model(x)
        if fail and calls[0] == fail_at:
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(out, y), out

    _quiet_step(opt, closure)
    start = model[0].mean
    values = start.clone()
    calls[0] = 0
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: closure(fail=True))
    assert calls[0] == fail_at
    assert model[0].mean is start and torch.equal(start, values)
    # and a retried step moves it once, as one forward at the start would
    oracle = _one_forward(model, x)
    _quiet_step(opt, closure)
    assert torch.equal(model[0].mean, oracle)


def test_functional_call_keeps_its_own_tensor_and_the_module_its_buffer():
    # Guard: torch.func.functional_call puts the caller's tensor in and the module's back
    # itself (the forward's rebinding goes to the dict it was given, here a new one per
    # call); neither the module's buffer nor the caller's tensor is touched.
    model = _model()
    x, y = _data()
    opt = HessianFree(model.parameters())
    own = model[0].mean
    given = {"0.mean": torch.full((5,), 0.25, dtype=torch.float64)}

    def closure():
        params = dict(model.named_parameters())
        out = functional_call(model, {**params, **given}, (x,))
        return torch.nn.functional.cross_entropy(out, y), out

    for _ in range(2):
        _quiet_step(opt, closure)
    assert model[0].mean is own and torch.equal(own, torch.zeros(5, dtype=torch.float64))
    assert torch.equal(given["0.mean"], torch.full((5,), 0.25, dtype=torch.float64))


class _InPlaceMean(_ReboundMean):
    """The same running mean, updated in place (unseen14's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.mean


@pytest.mark.parametrize("how", ["deepcopy", "load_state_dict"])
@pytest.mark.parametrize("writer", [_InPlaceMean, _ReboundMean], ids=["in_place", "rebound"])
def test_copied_optimizer_puts_buffers_back_when_its_first_step_raises(writer, how):
    # Fails on main for deepcopy (in_place; rebound fails for either way of copying): a deep
    # copy of the optimizer forgets which buffers the forward writes (weak references, not
    # copied) but remembers that its closure was watched, so its first step saved none of
    # them and a raise kept the step's update. A loaded optimizer is new and saves them all
    # (guard). Oracle: the copied model's buffer at the step's start; then the original.
    model = _model()
    model[0] = writer().double()
    x, y = _data()
    opt = HessianFree(model.parameters())

    def closure_of(net, fail=None):
        calls = [0]

        def closure():
            calls[0] += 1
            out = net(x)
            if calls[0] == fail:
                raise KeyboardInterrupt
            return torch.nn.functional.cross_entropy(out, y), out

        return closure

    _quiet_step(opt, closure_of(model))
    if how == "deepcopy":
        twin, twin_opt = copy.deepcopy((model, opt))
    else:
        twin = copy.deepcopy(model)
        twin_opt = HessianFree(twin.parameters())
        twin_opt.load_state_dict(opt.state_dict())
    start = twin[0].mean.clone()
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a loaded optimizer warns again
        twin_opt.step(closure_of(twin, fail=3))  # a trial call
    assert torch.equal(twin[0].mean, start)
    # the copy then steps as the original does from the same point (bitwise)
    _quiet_step(twin_opt, closure_of(twin))
    _quiet_step(opt, closure_of(model))
    assert torch.equal(twin[0].mean, model[0].mean)
    for p, q in zip(twin.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


class _Counter(torch.nn.Module):
    """A forward counter the loss never reads (``self.count += 1``: in place, then
    ``__setattr__`` with the same tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.count += 1
        return x


class _Once(torch.nn.Module):
    """Input scaling set from the first batch it sees, then never written again."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(5, dtype=torch.float64))
        self.register_buffer("ready", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            with torch.no_grad():
                self.scale.copy_(x.std(0))
                self.ready.fill_(True)
        return x / self.scale


def _trajectory(first: torch.nn.Module, steps: int) -> tuple[list[int], torch.Tensor]:
    model = _model()
    model[0] = first
    x, y = _data()
    opt = HessianFree(model.parameters())

    def closure():
        out = model(x)
        return torch.nn.functional.cross_entropy(out, y), out

    calls = []
    for _ in range(steps):
        _quiet_step(opt, closure)
        calls.append(opt.last_step.closure_calls)
    return calls, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_counter_the_loss_never_reads_costs_the_extra_call_only_when_rechecked():
    # Fails on main: every step made one extra f(θ0) call (13 steps: 13 extra calls). Oracle:
    # the same model without the counter (bitwise the same parameters); the extra call now
    # comes at step 0 and at each 10th step after (where it is measured again).
    counted, theta = _trajectory(_Counter(), 13)
    plain, oracle = _trajectory(torch.nn.Identity(), 13)
    assert torch.equal(theta, oracle)
    extra = [a - b for a, b in zip(counted, plain, strict=True)]
    assert extra == [1] + [0] * 9 + [1, 0, 0]


def test_buffer_written_once_costs_one_extra_call_and_no_other_change():
    # Guard: written at the first call only, the buffer is learned at step 0 and forgotten at
    # step 1. Oracle: the same model with the buffer set by one forward before the optimizer.
    once, theta = _trajectory(_Once().double(), 6)
    ready = _Once().double()
    with torch.no_grad():
        ready(_data()[0])
    preset, oracle = _trajectory(ready, 6)
    assert torch.equal(theta, oracle)
    assert [a - b for a, b in zip(once, preset, strict=True)] == [1, 0, 0, 0, 0, 0]
