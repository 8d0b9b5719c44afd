"""Models, loops and misuse no earlier pass had tried (unseen15).

Oracles: the same run without the interruption (a step that raised must leave the optimizer
as it found it, so the run continues bitwise as one that never raised).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from hessfree import HessianFree


def _classes() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _interrupted_run(fail_step: int | None, fail_call: int, style: str, **kwargs) -> dict:
    """6 steps; at step ``fail_step`` the closure's ``fail_call``-th call raises
    KeyboardInterrupt, the caller catches it and calls ``step`` again."""
    X, y = _classes()
    model = _mlp()
    opt = HessianFree(model.parameters(), **kwargs)
    calls, armed = [0], [False]

    def closure():
        calls[0] += 1
        if armed[0] and calls[0] == fail_call:
            armed[0] = False
            raise KeyboardInterrupt
        if style == "lo":
            out = model(X)
            return torch.nn.functional.cross_entropy(out, y), out
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    states_equal = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(6):
            if i == fail_step:
                before = opt.state_dict()
                params = [p.detach().clone() for p in model.parameters()]
                calls[0], armed[0] = 0, True
                with pytest.raises(KeyboardInterrupt):
                    opt.step(closure)
                now = model.parameters()
                assert all(torch.equal(a, p) for a, p in zip(params, now, strict=True))
                after = opt.state_dict()
                # before the first step the state is empty; the step's first act creates it
                states_equal = not before["state"] or repr(before) == repr(after)
            opt.step(closure)
    return {
        "theta": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "states_equal": states_equal,
    }


@pytest.mark.parametrize(
    ("style", "kwargs"),
    [
        ("lo", {}),  # 'auto': K-FAC's factors, damping='auto' calibrated at step 0
        ("lbfgs", {}),
        ("lo", {"curvature": "fisher_mc"}),  # the generator's draws
        ("lo", {"damping_metric": "marquardt"}),  # Marquardt's running diagonal
        ("lo", {"precond": "nystrom"}),
    ],
)
@pytest.mark.parametrize("fail_step", [0, 3])
def test_a_step_interrupted_by_the_closure_leaves_the_optimizer_as_it_was(style, kwargs, fail_step):
    # main: parameters restored, but the warm start (popped and decayed in place), the loss
    # window, the forcing term's memory, λ's calibration, K-FAC's / Nyström's refresh and the
    # generator were left as the failed step had set them: 0.03-3.1 max |Δθ| from the run
    # that never raised, two steps later (experiments/_unseen15.py `interrupt`)
    reference = _interrupted_run(None, 0, style, **kwargs)
    got = _interrupted_run(fail_step, 2, style, **kwargs)
    assert got["states_equal"]
    assert torch.equal(got["theta"], reference["theta"])


def test_a_state_dict_is_not_changed_by_later_steps():
    # state_dict() promises a snapshot; main shared the window of recent losses (a list the
    # step appends to), so a state dict kept in memory grew with every later step
    X, y = _classes()
    model = _mlp()
    opt = HessianFree(model.parameters())

    def closure():
        out = model(X)
        return torch.nn.functional.cross_entropy(out, y), out

    opt.step(closure)
    saved = opt.state_dict()
    text = repr(saved)
    for _ in range(2):
        opt.step(closure)
    assert repr(saved) == text


def _float32_scaled_run(power: int, style: str, steps: int) -> tuple[torch.Tensor, list]:
    """A float32 5-8-3 MLP on cross-entropy × 2^power (exact scaling: every product, quotient
    and comparison scales by a power of two until float32's range ends)."""
    X, y = _classes()
    model = _mlp()
    # the tolerances are absolute (as LBFGS's): off, so that only the scale acts
    opt = HessianFree(
        model.parameters(),
        curvature="auto" if style == "lo" else "hessian",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )
    scale = 2.0**power

    def closure():
        opt.zero_grad()
        out = model(X)
        loss = torch.nn.functional.cross_entropy(out, y) * scale
        if style == "lo":
            return loss, out
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(closure)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    return theta, [str(w.message) for w in caught]


@pytest.mark.parametrize("power", [48, 52])
def test_damping_calibration_survives_an_overflowing_float32_curvature_scale(power):
    # gᵀCg grows as the loss's cube: from 2^48 it overflowed float32 and λ was calibrated
    # from an infinite scale; every step was accepted but main ended 6.19 (relative
    # distance) from the unscaled run after 8 steps. Along g·2^-e the quotient is exact.
    reference, _ = _float32_scaled_run(0, "lo", 8)
    theta, _ = _float32_scaled_run(power, "lo", 8)
    assert torch.equal(theta, reference)


def test_a_finite_gradient_whose_norm_overflows_float32_is_named():
    # main: "non-finite value in the gradient" (the entries are finite, ~7e18)
    _, messages = _float32_scaled_run(66, "lo", 6)
    assert any(
        re.search(r"entries are finite .* overflows torch\.float32 .* train in float64", m)
        for m in messages
    ), messages


def test_cg_overflow_of_a_finite_curvature_is_named():
    # Hessian products along an unpreconditioned CG: pᵀAp of a float32 loss × 2^48
    # overflows; main: "non-finite value in a curvature product", as for a NaN model
    _, messages = _float32_scaled_run(48, "hessian", 2)
    assert messages and all(
        re.search(r"CG's inner products: the curvature is finite along g.*too large", m)
        for m in messages
    ), messages


def _embedding_run(hook: str | None, steps: int = 10) -> torch.Tensor:
    """Mini-batches of 32 tokens out of 50: the rows absent from a batch have a zero
    gradient that step (and no curvature)."""
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(50, 4), torch.nn.Linear(4, 2)
    seen = []
    if hook == "log":
        emb.weight.register_hook(lambda grad: seen.append(grad.detach().norm()))
    elif hook == "mask":  # a real pruning mask: rows 0-9 stay where they are
        mask = torch.ones(50, 1)
        mask[:10] = 0
        emb.weight.register_hook(lambda grad: grad * mask)
    params = [*emb.parameters(), *lin.parameters()]
    opt = HessianFree(params)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (400,), generator=g)
    labels = tokens % 2
    for _ in range(steps):
        idx = torch.randint(0, 400, (32,), generator=g)

        def closure(idx=idx):
            out = lin(emb(tokens[idx]))
            return torch.nn.functional.cross_entropy(out, labels[idx]), out

        opt.step(closure)
    assert hook != "log" or seen  # the hook did run
    return torch.cat([p.detach().flatten() for p in params])


def test_a_logging_gradient_hook_is_not_a_pruning_mask():
    # main read every tensor hook as a mask: the warm start and the preconditioner's output
    # were zeroed on the rows absent from each batch, 3.7 max |Δθ| from the run without the
    # hook after 10 steps (training-set loss 0.111 against 0.069)
    assert torch.equal(_embedding_run("log"), _embedding_run(None))


def test_a_pruning_hook_on_an_embedding_still_holds():
    # the guard: a hook that does change the gradient keeps unseen13's mask
    torch.manual_seed(0)
    before = torch.nn.Embedding(50, 4).weight.detach()[:10].clone()
    theta = _embedding_run("mask")
    assert torch.equal(theta[:40].view(10, 4), before)


@pytest.mark.parametrize("curvature", ["auto", "hessian"])
def test_an_lbfgs_closure_with_retain_graph_false_steps_as_the_default(curvature):
    # main: the explicit retain_graph=False freed the graph the Hessian products use, and
    # the first product failed with torch's "Trying to backward through the graph a second
    # time"; torch.optim.LBFGS takes such a closure
    X, y = _classes()
    thetas = []
    for retain in (None, False):
        model = _mlp()
        opt = HessianFree(model.parameters(), curvature=curvature)

        def closure(model=model, opt=opt, retain=retain):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X), y)
            loss.backward(retain_graph=retain)
            return loss

        for _ in range(3):
            opt.step(closure)
        thetas.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(thetas[0], thetas[1])


def test_a_value_reading_hook_under_martens_gets_a_worded_error():
    # main: torch's bare "Batching rule not implemented for aten::item" from the diagonal's
    # batched (vmap) per-example backward, which runs the parameters' tensor hooks
    X, y = _classes()
    model = _mlp()
    norms = []
    for p in model.parameters():
        p.register_hook(lambda grad: norms.append(float(grad.detach().norm())))
    opt = HessianFree(model.parameters(), precond="martens")
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        out = model(X)
        return torch.nn.functional.cross_entropy(out, y), out

    with pytest.raises(RuntimeError, match=r"EmpiricalFisherDiagonal.*hooks.*precond='auto'"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
