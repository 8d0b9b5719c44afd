"""HessianFree against what any ``torch.optim.Optimizer`` promises its users.

Each test puts HessianFree where a loop written for ``torch.optim.LBFGS`` or ``SGD`` would put
it (copies, checkpoints, schedulers, hooks, param groups, parametrized and tied modules) and
checks it against the torch optimizer's behaviour in the same situation, a closed form, or an
uninterrupted run of its own as the oracle.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from hessfree import HessianFree

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
X_STAR = torch.linalg.solve(A, torch.ones(2, dtype=torch.float64))  # argmin ½xᵀAx − 1ᵀx


def _quadratic(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x @ A @ x - x.sum()


def _data(n: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return X, torch.randn(n, 2, generator=gen, dtype=torch.float64)


X, Y = _data()


def _mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def _closure(model: nn.Module, dtype: torch.dtype = torch.float64):
    def closure():
        out = model(X.to(dtype))
        return F.mse_loss(out, Y.to(dtype)), out

    return closure


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


# ------------------------------------------------------------------------------ copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_bitwise_as_the_uninterrupted_run(how):
    # torch's Optimizer.__getstate__ keeps only defaults, state and param_groups: a deepcopy or
    # an unpickled HessianFree lacked its settings and failed at the next step (AttributeError
    # '_group_view'), where SGD's copy steps on. Oracle: the run that was never copied.
    reference = _mlp()
    opt = HessianFree(reference.parameters())
    for _ in range(4):
        opt.step(_closure(reference))

    model = _mlp()
    opt = HessianFree(model.parameters())
    for _ in range(2):
        opt.step(_closure(model))
    pair = {"model": model, "opt": opt}  # copied together, so the copy steps the copied model
    twin = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    for _ in range(2):
        twin["opt"].step(_closure(twin["model"]))
    assert _equal(_params(twin["model"]), _params(reference))
    for _ in range(2):  # the original is untouched by its copy's steps
        opt.step(_closure(model))
    assert _equal(_params(model), _params(reference))


# ------------------------------------------------------------------------------ attributes
def test_assigning_a_hyperparameter_attribute_is_refused_with_the_way_that_works():
    # opt.cg_max_iter reads the setting, so `opt.cg_max_iter = 3` looked like a change; it
    # made an instance attribute the optimizer never read (it kept running 'auto')
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([x])
    with pytest.raises(AttributeError, match=r"param_groups.*\['cg_max_iter'\] = 3"):
        opt.cg_max_iter = 3
    with pytest.raises(AttributeError, match=r"\['lr'\] = 0.5"):
        opt.lr = 0.5
    with pytest.raises(AttributeError, match=r"`curvature` is fixed at construction"):
        opt.curvature = "hessian"
    with pytest.raises(AttributeError, match=r"`damping` cannot be assigned.*\(damping=\.\.\.\)"):
        opt.damping = 1.0  # the current λ (a property); was torch's "property has no setter"
    assert opt.cg_max_iter == "auto" and opt.lr == 1.0
    for group in opt.param_groups:  # the way the message names works, and is read back
        group["cg_max_iter"] = 3
    opt.step(lambda: _quadratic(x))
    assert opt.cg_max_iter == 3 and opt.last_step.cg_iters <= 3
    opt.my_tag = "kept"  # other attributes are the user's, as on any object
    opt.precond = None  # the preconditioner object the steps use may be swapped
    assert opt.my_tag == "kept" and opt.precond is None


def test_lr_attribute_reads_the_groups_current_value_as_a_scheduler_left_it():
    # opt.lr returned the constructor's lr after StepLR had halved every group's
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([x], lr=0.8)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(lambda: _quadratic(x))
    sched.step()
    assert opt.lr == opt.param_groups[0]["lr"] == 0.4
    opt.add_param_group({"params": [y], "lr": 0.1})
    with pytest.raises(AttributeError, match=r"`lr` differs between param groups \(\[0.4, 0.1\]\)"):
        _ = opt.lr


# ------------------------------------------------------------------------------ state
def test_freezing_the_first_parameter_keeps_damping_and_the_step_count():
    # The state all groups share (λ, step count, warm start) lived under the first parameter
    # that requires grad: freezing it mid-training moved that key, and the next step started
    # afresh (λ recalibrated, step 0). Oracle: freezing another parameter, which kept it.
    counts = {}
    for frozen in (0, 3):
        model = _mlp()
        opt = HessianFree(model.parameters(), precond=None)
        for _ in range(3):
            opt.step(_closure(model))
        damping, step = opt.damping, opt.state_dict()["state"][0]["step"]
        p = list(model.parameters())[frozen]
        p.requires_grad_(False)
        before = p.detach().clone()
        opt.step(_closure(model))
        assert opt.last_step.damping == damping and torch.equal(p, before)
        steps = [s["step"] for s in opt.state_dict()["state"].values() if "step" in s]
        counts[frozen] = (step, steps)
        p.requires_grad_(True)  # and back: one shared state still
        opt.step(_closure(model))
        assert [s["step"] for s in opt.state_dict()["state"].values() if "step" in s] == [5]
    assert counts[0] == counts[3] == (3, [4])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda ps: ps[:3],
            r"\['param_groups'\]\[0\]` holds 4 parameters in the state dict but 3 here",
        ),
        (
            lambda ps: [{"params": ps[:2]}, {"params": ps[2:]}],
            r"has 1 param group\(s\) but this optimizer 2",
        ),
    ],
)
def test_load_state_dict_of_another_layout_names_the_counts_and_changes_nothing(build, match):
    # torch said only "doesn't match the size of optimizer's group"; with K-FAC's state
    # HessianFree said "layers[1] must be [weight index, ...]"
    model = _mlp()
    opt = HessianFree(model.parameters())
    opt.step(_closure(model))
    saved = opt.state_dict()
    other = _mlp()
    target = HessianFree(build(list(other.parameters())), cg_max_iter=7)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(saved)
    assert target.cg_max_iter == 7 and not target.state
    torch.optim.SGD(build(list(other.parameters())), lr=0.1)  # the layout itself is fine


@pytest.mark.parametrize(
    ("saved", "loaded"), [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_state_dict_through_torch_save_moves_across_dtypes_as_torch_casts_it(saved, loaded):
    # torch.load(weights_only=True), torch's default, and a model converted between
    # float32 and float64: the warm start takes the new model's dtype (as SGD's momentum
    # buffers do), λ and the step count carry over, and the next step descends
    model = _mlp(saved)
    opt = HessianFree(model.parameters())
    for _ in range(2):
        opt.step(_closure(model, saved))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = _mlp(loaded)
    other.load_state_dict(model.state_dict())
    opt2 = HessianFree(other.parameters())
    opt2.load_state_dict(state)
    warm = opt2.state[next(other.parameters())]["warm_start"]
    assert warm.dtype == loaded
    torch.testing.assert_close(warm, state["state"][0]["warm_start"].to(loaded), rtol=0, atol=0)
    assert opt2.damping == opt.damping
    opt2.step(_closure(other, loaded))
    assert opt2.last_step.accepted and opt2.last_step.loss_after < opt2.last_step.loss


# ------------------------------------------------------------------------------ construction
@pytest.mark.parametrize(
    ("params", "match"),
    [
        ([], "empty parameter list"),
        (lambda: [torch.zeros(2, requires_grad=True) * 2], "non-leaf"),
        (
            lambda: [{"params": [w := torch.zeros(2, requires_grad=True)]}, {"params": [w]}],
            "more than one parameter group",
        ),
    ],
    ids=["empty", "non_leaf", "shared_between_groups"],
)
def test_bad_params_are_refused_as_sgd_refuses_them(params, match):
    make = params if callable(params) else (lambda: params)
    with pytest.raises(ValueError, match=match):
        torch.optim.SGD(make(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        HessianFree(make())


def test_integer_and_frozen_tensors_among_the_params_are_skipped():
    # an integer tensor cannot require grad; SGD keeps and skips it, so does HessianFree
    counts = torch.zeros(3, dtype=torch.long)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([counts, x], damping=1e-10, min_damping=0.0, cg_rtol=1e-12)
    opt.step(lambda: _quadratic(x))
    torch.testing.assert_close(x.detach(), X_STAR, rtol=1e-8, atol=1e-10)
    assert torch.equal(counts, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="No parameter requires gradients"):
        HessianFree([counts])


# ------------------------------------------------------------------------------ closures
def test_step_without_a_closure_is_a_type_error_as_in_lbfgs():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="closure"):
        torch.optim.LBFGS([x]).step()
    with pytest.raises(TypeError, match="closure"):
        HessianFree([x]).step()
    with pytest.raises(TypeError, match=r"needs a closure that re-evaluates the loss, got None"):
        HessianFree([x]).step(None)


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        (lambda x: None, TypeError, "got NoneType"),
        (lambda x: x * 2, TypeError, r"scalar loss tensor .* got \(2,\)"),
        (lambda x: _quadratic(x).detach(), ValueError, "no autograd graph to the parameters"),
        (lambda x: torch.tensor(3.0), ValueError, "no autograd graph to the parameters"),
    ],
    ids=["none", "vector", "detached", "constant"],
)
def test_a_closure_returning_no_usable_loss_is_named_and_nothing_moves(result, error, match):
    x = torch.tensor([0.5, -0.5], dtype=torch.float64, requires_grad=True)
    with pytest.raises(error, match=match):
        HessianFree([x]).step(lambda: result(x))
    assert x.tolist() == [0.5, -0.5]


def _lbfgs_closure(model, opt, *, set_to_none=True, clip=None):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        return loss

    return closure


def test_lbfgs_closures_step_alike_whatever_zero_grad_enable_grad_or_no_grad_around_them():
    # zero_grad(set_to_none=False), the closure decorated with torch.enable_grad() as LBFGS's
    # docs show, the loop's step under torch.no_grad(), and clip_grad_norm_ with a bound the
    # gradient never reaches: all four are the plain LBFGS-style run, bit for bit
    runs = []
    for variant in ("plain", "zeros", "enable_grad", "no_grad", "clip_inactive"):
        model = _mlp()
        opt = HessianFree(model.parameters())
        closure = _lbfgs_closure(
            model,
            opt,
            set_to_none=variant != "zeros",
            clip=1e6 if variant == "clip_inactive" else None,
        )
        if variant == "enable_grad":
            closure = torch.enable_grad()(closure)
        for _ in range(2):
            if variant == "no_grad":
                with torch.no_grad():
                    opt.step(closure)
            else:
                opt.step(closure)
        runs.append(_params(model))
    assert all(_equal(run, runs[0]) for run in runs[1:])


def test_gradient_clipping_inside_the_closure_scales_the_gradient_hessian_free_sees():
    # LBFGS reads p.grad after the closure, clipped; so does HessianFree: the first step's
    # reported loss is unchanged, the step still descends, and it differs from the unclipped
    losses, finals = [], []
    for clip in (None, 1e-2):
        model = _mlp()
        opt = HessianFree(model.parameters())
        # and is warned about, once (tests/test_unseen17.py)
        with (
            pytest.warns(UserWarning, match="changed the gradient")
            if clip
            else contextlib.nullcontext()
        ):
            opt.step(_lbfgs_closure(model, opt, clip=clip))
        losses.append(opt.last_step.loss)
        assert opt.last_step.accepted and opt.last_step.loss_after < opt.last_step.loss
        finals.append(_params(model))
    assert losses[0] == losses[1] and not _equal(*finals)


# ------------------------------------------------------------------------------ schedulers, hooks
@pytest.mark.parametrize("kind", ["step", "lambda", "plateau"])
def test_lr_schedulers_scale_the_newton_step(kind):
    # on ½xᵀAx − 1ᵀx with λ ≈ 0 a step moves lr × (x* − x): the scheduler's lr, checked
    # against that closed form after the scheduler changed it
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    # resetting x looks like a new mini-batch: relative_min_damping='auto' would floor λ
    opt = HessianFree([x], damping=1e-12, min_damping=0.0, relative_min_damping=0.0, cg_rtol=1e-12)
    sched = {
        "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k),
        "plateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0),
    }[kind]()
    opt.step(lambda: _quadratic(x))  # lr 1: the Newton step to x*
    torch.testing.assert_close(x.detach(), X_STAR, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        x.zero_()
    if kind == "plateau":
        sched.step(1.0)
        sched.step(1.0)  # no improvement: lr halves
    else:
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    opt.step(lambda: _quadratic(x))
    torch.testing.assert_close(x.detach(), 0.5 * X_STAR, rtol=1e-9, atol=1e-12)


def test_cycle_momentum_schedulers_fail_as_they_do_for_lbfgs():
    # OneCycleLR cycles momentum by default; neither LBFGS nor HessianFree has one
    x = torch.zeros(2, requires_grad=True)
    for opt in (torch.optim.LBFGS([x]), HessianFree([x])):
        with pytest.raises(ValueError, match="momentum or beta1"):
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=5)
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=5, cycle_momentum=False)


def test_optimizer_hooks_fire_once_per_step_and_per_state_dict_call():
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([x])
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("save_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("save_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    opt.step(lambda: _quadratic(x))  # several closure calls, one step
    opt.load_state_dict(opt.state_dict())
    assert seen == ["step_pre", "step_post", "save_pre", "save_post", "load_pre", "load_post"]


def test_state_dict_hooks_see_what_hessianfree_saves_and_may_adapt_what_it_loads():
    # torch runs state_dict post-hooks last and load pre-hooks first, and its docs suggest a
    # pre-hook to adapt a state dict saved for other parameters; HessianFree added 'precond'
    # after the post-hooks and checked the dict (K-FAC's state) before the pre-hooks
    model = _mlp()
    opt = HessianFree(model.parameters())  # precond='auto': K-FAC, whose state is saved
    opt.step(_closure(model))
    saved_keys = []
    opt.register_state_dict_post_hook(lambda o, sd: saved_keys.append(sorted(sd)))
    saved = opt.state_dict()
    assert saved_keys == [["param_groups", "precond", "state"]]

    def drop_last_bias(o, sd):  # a model without the output bias, and without K-FAC
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:3]
        sd["state"].pop(3, None)
        sd.pop("precond")
        return sd

    other = _mlp()
    target = HessianFree(list(other.parameters())[:3], precond=None)
    target.register_load_state_dict_pre_hook(drop_last_bias)
    loaded = []
    target.register_load_state_dict_post_hook(lambda o: loaded.append(o.damping))
    target.load_state_dict(saved)
    assert loaded == [opt.damping] and "precond" in saved


# ------------------------------------------------------------------------------ modules
def test_orthogonal_parametrization_stays_orthogonal_and_descends():
    # the optimizer steps the parametrization's `original`; the weight the model uses is
    # its orthogonal map, so WᵀW = I holds after any step (oracle: the identity)
    model = _mlp()
    parametrizations.orthogonal(model[2])  # 5 → 2: rows orthonormal
    opt = HessianFree(model.parameters())
    losses = [float(opt.step(_closure(model))) for _ in range(3)]
    W = model[2].weight.detach()
    torch.testing.assert_close(W @ W.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert losses[-1] < losses[0]


def test_tied_weights_step_as_one_parameter_used_twice():
    # a weight shared by two layers is one parameter (model.parameters() yields it once):
    # the steps equal those of a functional model with one tensor used twice
    torch.manual_seed(1)
    enc, dec = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
    dec.weight = enc.weight
    tied = nn.ModuleList([enc, dec])
    w, b1, b2 = (t.detach().clone().requires_grad_(True) for t in (enc.weight, enc.bias, dec.bias))

    def tied_closure():
        out = dec(torch.tanh(enc(X)))
        return F.mse_loss(out, X), out

    def functional_closure():
        out = F.linear(torch.tanh(F.linear(X, w, b1)), w, b2)
        return F.mse_loss(out, X), out

    opt = HessianFree(tied.parameters(), precond=None)
    ref = HessianFree([w, b1, b2], precond=None)
    for _ in range(3):
        opt.step(tied_closure)
        ref.step(functional_closure)
    assert len(list(tied.parameters())) == 3
    assert _equal(_params(tied), [w.detach(), b1.detach(), b2.detach()])


@pytest.mark.parametrize("style", ["loss_outputs", "loss", "lbfgs"])
def test_a_non_contiguous_parameter_steps_as_its_contiguous_copy(style):
    # nn.Parameter(w.t()) is a transposed view: its flat order is not its memory order
    runs = []
    for contiguous in (True, False):
        W = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        w = nn.Parameter(W.t().contiguous() if contiguous else W.t())
        assert w.is_contiguous() == contiguous
        opt = HessianFree([w])

        def closure(w=w, opt=opt):
            out = torch.tanh(X @ w.t())
            loss = F.mse_loss(out, Y)
            if style == "lbfgs":
                opt.zero_grad()
                loss.backward()
            return (loss, out) if style == "loss_outputs" else loss

        for _ in range(3):
            opt.step(closure)
        runs.append(w.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_channels_last_conv_weights_step_as_contiguous_ones():
    # float64 convolution kernels differ in summation order between the two layouts:
    # agreement to a few ulps of the weights, not bitwise
    finals = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
        model = model.double()
        x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(2)).double()
        y = torch.randn(5, 2, generator=torch.Generator().manual_seed(3)).double()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.to(memory_format=torch.channels_last)
            assert not model[0].weight.is_contiguous()
        opt = HessianFree(model.parameters())

        def closure(model=model, x=x, y=y):
            out = model(x)
            return F.mse_loss(out, y), out

        for _ in range(3):
            opt.step(closure)
        finals.append(_params(model))
    for p, q in zip(*finals, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_a_parameter_frozen_mid_training_stays_put_while_the_rest_step():
    # precond=None here; under 'auto', K-FAC finds its layers again at the next step
    # (tests/test_kfac.py, test_a_bias_frozen_mid_training_leaves_kfac_on_with_fresh_factors)
    model = _mlp()
    opt = HessianFree(model.parameters(), precond=None)
    opt.step(_closure(model))
    model[2].bias.requires_grad_(False)
    before = _params(model)
    for _ in range(2):
        opt.step(_closure(model))
    after = _params(model)
    assert torch.equal(after[3], before[3]) and not torch.equal(after[2], before[2])


# ---- LBFGS's per-call budget: max_iter steps (and max_eval closure calls) in one step() call ----
def test_max_iter_takes_that_many_steps_in_one_call_bitwise_as_separate_calls(one_thread):
    runs = {}
    for key, per_call, calls in (("one call", 6, 1), ("six calls", 1, 6)):
        model = _mlp()
        opt = HessianFree(model.parameters(), max_iter=per_call)
        closure = _closure(model)
        losses = [opt.step(closure) for _ in range(calls)]
        runs[key] = (_params(model), opt.state[next(iter(opt.state))]["step"], losses[0])
    assert runs["one call"][1] == runs["six calls"][1] == 6
    assert _equal(runs["one call"][0], runs["six calls"][0])
    # the call returns the loss where it started, as LBFGS.step does
    assert torch.equal(runs["one call"][2], runs["six calls"][2])


def test_one_call_with_an_lbfgs_budget_fits_to_scipys_optimum_and_ends_on_convergence():
    # the PINN codes' pattern: LBFGS(params, max_iter=N, ...) and a single opt.step(closure)
    scipy_optimize = pytest.importorskip("scipy.optimize")
    t = torch.linspace(0, 4, 40, dtype=torch.float64)
    y = 2.0 * torch.exp(-1.3 * t) + 0.5 + 0.01 * torch.sin(7 * t)
    theta = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    steps = []
    opt = HessianFree([theta], max_iter=500, callback=steps.append)

    def closure():
        opt.zero_grad()
        loss = (theta[0] * torch.exp(-theta[1] * t) + theta[2] - y).square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    ref = scipy_optimize.least_squares(
        lambda p: p[0] * np.exp(-p[1] * t.numpy()) + p[2] - y.numpy(),
        [1.0, 1.0, 0.0],
        method="lm",
        xtol=1e-15,
        ftol=1e-15,
    ).x
    np.testing.assert_allclose(theta.detach().numpy(), ref, rtol=1e-6)
    # (10 steps here; LBFGS strong Wolfe took 15 iterations) and the call ends at the first
    # 'converged' step, as LBFGS's ends on its tolerances
    assert len(steps) < 500 and steps[-1].status == "converged"
    assert all(s.status != "converged" for s in steps[:-1])


def test_max_eval_stops_starting_steps_once_the_closure_calls_reach_it(one_thread):
    model = _mlp()
    inner, calls = _closure(model), []

    def closure():
        calls.append(1)
        return inner()

    steps = []
    opt = HessianFree(model.parameters(), max_iter=100, max_eval=12, callback=steps.append)
    opt.step(closure)
    assert sum(s.closure_calls for s in steps) == len(calls)
    assert len(calls) >= 12 and len(calls) - steps[-1].closure_calls < 12
    assert 1 < len(steps) < 100


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"line_search_fn": "strong_wolfe"}, r"LBFGS's `line_search_fn`='strong_wolfe': "),
        ({"history_size": 50}, r"LBFGS's `history_size`=50: .* keeps no history\. Drop"),
        ({"cg_maxiter": 5}, r"`cg_maxiter`=5\. Did you mean `cg_max_iter`\?"),
        ({"max_iter": 0}, r"`max_iter` must be an int >= 1, got 0"),
        ({"max_eval": 2.5}, r"`max_eval` must be an int, got float 2.5"),
    ],
)
def test_lbfgs_only_and_misspelt_arguments_are_refused_with_what_to_do(kwargs, match):
    error = ValueError if "max_iter" in kwargs else TypeError
    with pytest.raises(error, match=match):
        HessianFree(_mlp().parameters(), **kwargs)


def test_a_state_dict_from_before_max_iter_loads_with_this_optimizers_value():
    model = _mlp()
    opt = HessianFree(model.parameters())
    opt.step(_closure(model))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["max_iter"], group["max_eval"]
    other = HessianFree(model.parameters(), max_iter=3)
    other.load_state_dict(saved)
    assert other.param_groups[0]["max_iter"] == 3 and other.param_groups[0]["max_eval"] is None
