"""What a user of HessianFree met next (unseen17): train-mode BatchNorm's running statistics
under trial evaluations, gradient clipping inside an LBFGS-style closure, ...

Oracles: one train-mode forward pass of a copy of the model at the step's starting point (a
first-order step's effect on the statistics), the run without the clipping, torch's own
eager run of the same loop.
"""

from __future__ import annotations

import copy
import pickle
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hessfree import HessianFree

pytestmark = pytest.mark.usefixtures("one_thread")

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _classes(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _bn_mlp(momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Tanh(), nn.Linear(8, 3)
    )


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _stats(model: nn.Module) -> list[torch.Tensor]:
    bn = model[1]
    return [getattr(bn, name).clone() for name in _STATS]


def _one_pass_stats(model: nn.Module, X: torch.Tensor) -> list[torch.Tensor]:
    """The oracle: the statistics after one train-mode forward pass of a copy at theta."""
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        oracle(X)
    return _stats(oracle)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------- BatchNorm running statistics


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("style", ["loss_outputs", "lbfgs", "curvature_closure"])
def test_batchnorm_statistics_move_once_per_step_as_one_forward_pass_at_theta(style, momentum):
    # Each trial evaluation (backtracking, line search, rho) ran the train-mode model too and
    # moved the running statistics from a trial point: num_batches_tracked rose by the number
    # of closure calls, and the eval-mode model normalised with a mix of trial points' batch
    # statistics. Oracle: a copy of the model run once, in training mode, at the step's start.
    X, y = _classes()
    model = _bn_mlp(momentum)
    opt = HessianFree(model.parameters())

    def closure():
        out = model(X)
        loss = F.cross_entropy(out, y)
        if style == "lbfgs":
            opt.zero_grad()
            loss.backward()
            return loss
        return loss, out

    def curvature_closure():
        out = model(X[:16])
        return F.cross_entropy(out, y[:16]), out

    extra = dict(curvature_closure=curvature_closure) if style == "curvature_closure" else {}
    calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train-mode BatchNorm warning (tested elsewhere)
        for _ in range(3):
            want_stats = _one_pass_stats(model, X)
            opt.step(closure, **extra)
            calls += opt.last_step.closure_calls
            for got, want in zip(_stats(model), want_stats, strict=True):
                assert torch.equal(got, want)
    assert calls > 3  # the steps did evaluate trial points
    assert int(model[1].num_batches_tracked) == 3


def test_batchnorm_statistics_passed_to_functional_call_move_once_and_the_module_keeps_its_own():
    # torch.func.functional_call with the statistics given as tensors of the user's: the step's
    # call at theta updates those tensors once, the trials leave them, and the module's own
    # buffers stay where they were (the trials' clones are put back only where still in place)
    X, y = _classes()
    model = _bn_mlp()
    own = _stats(model)
    params = dict(model.named_parameters())
    stats = {k: v.clone() for k, v in model.named_buffers()}
    opt = HessianFree(params.values())

    def closure():
        out = functional_call(model, {**params, **stats}, (X,))
        return F.cross_entropy(out, y), out

    want_stats = _one_pass_stats(model, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
    assert opt.last_step.closure_calls > 1
    for name, want in zip(_STATS, want_stats, strict=True):
        assert torch.equal(stats[f"1.{name}"], want)
    for got, want in zip(_stats(model), own, strict=True):
        assert torch.equal(got, want)


def test_another_threads_batchnorm_run_during_a_trial_call_keeps_its_update():
    # Guard for the trial calls' hook, which is global: a forward pass another thread runs
    # meanwhile (here started and joined inside each closure call) updates its statistics
    X, y = _classes()
    model, other = _bn_mlp(), _bn_mlp()
    opt = HessianFree(model.parameters())

    def run_other():
        with torch.no_grad():
            other(X)

    def closure():
        worker = threading.Thread(target=run_other)
        worker.start()
        worker.join()
        out = model(X)
        return F.cross_entropy(out, y), out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
    assert opt.last_step.closure_calls > 1
    assert int(other[1].num_batches_tracked) == opt.last_step.closure_calls


def test_a_non_finite_trial_leaves_batchnorm_statistics_finite_and_the_eval_model_usable():
    # A trial point whose forward pass is non-finite is rejected and the parameters stay bit
    # for bit, but its NaN batch statistics went into running_mean/var for good: the
    # eval-mode model returned NaN for every input from then on.
    X, y = _classes()
    model = _bn_mlp()
    opt = HessianFree(model.parameters())
    calls = [0]

    def closure():
        calls[0] += 1
        # the step's first trial evaluation meets an overflow (a NaN input stands in for it)
        x = X * float("nan") if calls[0] == 2 else X
        out = model(x)
        return F.cross_entropy(out, y), out

    want_stats = _one_pass_stats(model, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(closure)
    assert calls[0] >= 2
    for got, want in zip(_stats(model), want_stats, strict=True):
        assert torch.equal(got, want)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(X)).all()


def test_batchnorm_warning_no_longer_says_trials_move_the_statistics():
    X, y = _classes()
    model = _bn_mlp()
    opt = HessianFree(model.parameters())

    def closure():
        out = model(X)
        return F.cross_entropy(out, y), out

    with pytest.warns(UserWarning, match=r"BatchNorm1d.*trial evaluations leave them") as rec:
        opt.step(closure)
    assert rec[0].filename == __file__


# ---------------------------------------------------------------- a gradient changed after backward


def _clipping_closure(model, opt, X, y, clip=None):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        if clip is not None:
            clip(model.parameters())
        return loss

    return closure


@pytest.mark.parametrize(
    "clip",
    [
        lambda params: nn.utils.clip_grad_norm_(params, 0.05),
        lambda params: nn.utils.clip_grad_value_(params, 0.01),
    ],
    ids=["norm", "value"],
)
def test_a_gradient_clipped_inside_an_lbfgs_closure_is_warned_once(clip):
    # HessianFree pairs the clipped gradient with the unclipped Hessian (its products
    # differentiate the gradient's graph, which an in-place clip bypasses): silently a
    # shorter step judged by the wrong model ("unseen16"). Now named once, at the user's line.
    X, y = _classes()
    model = _mlp()
    opt = HessianFree(model.parameters())
    closure = _clipping_closure(model, opt, X, y, clip)
    with pytest.warns(UserWarning, match=r"changed the gradient of .*clip_grad_norm_") as rec:
        opt.step(closure)
    assert rec[0].filename == __file__
    assert "param_groups[0]['params'][0]" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)  # once per optimizer


def test_an_inactive_clip_and_micro_batch_accumulation_are_not_warned_and_step_alike():
    # Guard: clip_grad_norm_ multiplies in place by exactly 1 when the bound is not reached
    # (the version counter moves, the values do not), and several backward() calls
    # accumulate: neither changes the gradient after the last backward().
    X, y = _classes()
    finals = []
    for variant in ("plain", "inactive", "micro"):  # micro: no warning (values differ by rounding)
        model = _mlp()
        opt = HessianFree(model.parameters())
        if variant == "micro":

            def closure(model=model, opt=opt):
                opt.zero_grad()
                total = 0.0
                for chunk in range(4):
                    part = slice(16 * chunk, 16 * chunk + 16)
                    loss = F.cross_entropy(model(X[part]), y[part]) / 4
                    loss.backward()
                    total += loss.detach()
                return total

        else:
            clip = None
            if variant == "inactive":
                clip = lambda params: nn.utils.clip_grad_norm_(params, 1e6)  # noqa: E731
            closure = _clipping_closure(model, opt, X, y, clip)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(2):
                opt.step(closure)
        finals.append(_flat(model))
    assert torch.equal(finals[0], finals[1])  # the inactive clip is the plain run, bit for bit


# ---------------------------------------------------------------- opt.step inside torch.compile


def test_a_step_inside_a_compiled_function_runs_eagerly_and_steps_as_the_plain_loop():
    # `torch.compile(train_step)` with opt.step(closure) inside: Dynamo traced into the step
    # and failed deep in CG ("'SymInt' object has no attribute 'numerator'") after ~14 s.
    # Now the step is a graph break that runs eagerly: bitwise the uncompiled loop's steps.
    X, y = _classes()
    finals = []
    for compiled in (False, True):
        model = _mlp()
        opt = HessianFree(model.parameters())

        def closure(model=model):
            out = model(X)
            return F.cross_entropy(out, y), out

        def train_step(opt=opt, closure=closure):
            opt.step(closure)
            return opt.last_step.loss

        fn = torch.compile(train_step, backend="eager") if compiled else train_step
        for _ in range(3):
            fn()
        finals.append(_flat(model))
    assert torch.equal(finals[0], finals[1])


# ---------------------------------------------------------------- gradients left uncleared


def _lbfgs_loop(where: str, max_iter: int, steps: int):
    X, y = _classes()
    model = _mlp()
    opt = HessianFree(model.parameters(), max_iter=max_iter)

    def closure():
        if where == "inside":
            opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        return loss

    for _ in range(steps):
        if where == "outside":
            opt.zero_grad()
        opt.step(closure)
    return model, opt, closure


@pytest.mark.parametrize(
    ("where", "max_iter"), [("nowhere", 1), ("outside", 3)], ids=["no_zero_grad", "max_iter3"]
)
def test_a_closure_that_adds_to_the_gradients_of_earlier_calls_is_refused(where, max_iter):
    # HessianFree's trial evaluations run an LBFGS-style closure's backward() too; a closure
    # that never clears .grad, or one cleared only before opt.step with max_iter > 1, then
    # added the trial points' gradients to the next step's (10 steps: loss 0.90 against 0.52)
    model, opt, closure = _lbfgs_loop(where, max_iter, steps=1 if max_iter == 1 else 0)
    if where == "outside":
        opt.zero_grad()
    before = _flat(model)
    with pytest.raises(ValueError, match=r"previous closure call left in \.grad.*zero_grad"):
        opt.step(closure)
    if max_iter == 1:
        assert torch.equal(_flat(model), before)


def test_zero_grad_before_step_with_max_iter_one_is_the_closures_own_run_and_copies_work():
    # Guard: the common loop (zero_grad before opt.step, one step per call) clears what the
    # previous step's trials left: it is the zero_grad-inside run, bit for bit; and an
    # optimizer that recorded the gradients a call left still deep-copies and pickles
    runs = [_lbfgs_loop(where, 1, steps=3) for where in ("inside", "outside")]
    assert torch.equal(_flat(runs[0][0]), _flat(runs[1][0]))
    model, opt, closure = runs[0]
    twin = copy.deepcopy(opt)
    assert "_grads_left" not in twin.__dict__  # weak references: neither copied nor pickled
    pickle.loads(pickle.dumps(opt))


def test_a_warning_from_a_step_inside_a_compiled_function_points_at_the_users_line():
    # the eager fallback runs through torch/_dynamo's frames, where the warning had stopped
    X, y = _classes()
    model = _bn_mlp()
    opt = HessianFree(model.parameters())

    def closure():
        out = model(X)
        return F.cross_entropy(out, y), out

    def train_step():
        opt.step(closure)

    with pytest.warns(UserWarning, match="BatchNorm1d") as rec:
        torch.compile(train_step, backend="eager")()
    assert [w.filename for w in rec if "BatchNorm1d" in str(w.message)] == [__file__]
