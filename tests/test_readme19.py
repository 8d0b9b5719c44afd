"""readme19: README.md read top to bottom as a new user would, each checkable claim run against
the code (experiments/README.md, readme19). One test per drift fixed; each says whether it fails
on main f605938 or is a guard."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml
from test_train_robust import refused, write_tiny

import hessfree
from hessfree.train.cli import main


@pytest.mark.parametrize(("written", "octal"), [("017", 15), ("0_17", 15)])
def test_readme19_octal_refusal_offers_only_values_the_loader_accepts(
    tmp_path, capsys, written, octal
):
    """README: "`0o17` is text to YAML 1.1, so write `15`". The refusal of `seed: 017` offered
    "or 0o17 for octal", which the same loader then refuses as text (fails on main). Each
    number the message offers must now load as that number (oracle: PyYAML's own reading)."""
    config = write_tiny(tmp_path)
    config.write_text(config.read_text() + f"seed: {written}\n")
    assert yaml.safe_load(f"seed: {written}")["seed"] == octal
    err = refused(["run", str(config), "--check"], capsys)
    offered = re.findall(r"write (-?\d+) without the leading 0 \(or (\S+) for", err)
    assert offered, err
    for value in offered[0]:
        config.write_text(config.read_text().replace(f"seed: {written}", f"seed: {value}"))
        assert main(["run", str(config), "--check"]) == 0, capsys.readouterr().err
        assert f"seed: {int(value)}\n" in capsys.readouterr().out
        config.write_text(config.read_text().replace(f"seed: {value}", f"seed: {written}"))
    assert str(octal) in offered[0]


def _residual_closure():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, xb = torch.rand(20, 2), torch.rand(8, 2)

    def closure():
        r_interior, r_boundary = net(x).squeeze(1) - 1.0, net(xb).squeeze(1)
        return (r_interior**2).mean() + (r_boundary**2).mean(), (r_interior, r_boundary)

    return net, closure


def test_readme19_residual_blocks_refuse_a_users_preconditioner_by_its_own_name(one_thread):
    """README ("Physics-informed networks"): with residual blocks CG needs a preconditioner, and
    the default precond='auto' gives a Nystrom sketch. A user's callable preconditioner was
    refused as "The diagonal empirical-Fisher preconditioner", and every refusal told the user
    to drop preconditioning (precond=None) (fails on main). Now it names the callable, offers
    'auto', and 'auto' trains the same closure (oracle: the step's own status)."""
    net, closure = _residual_closure()

    def identity_precond(context):
        return lambda r: r

    opt = hessfree.HessianFree(net.parameters(), precond=identity_precond)
    with pytest.raises(ValueError, match="residual blocks") as refusal:
        opt.step(closure)
    message = str(refusal.value)
    assert "identity_precond" in message and "empirical-Fisher" not in message, message
    assert "precond='auto'" in message and "needs_outputs = False" in message
    opt = hessfree.HessianFree(net.parameters(), precond="auto")
    opt.step(closure)
    assert opt.last_step.status == "accepted"


def test_readme19_a_batch_of_several_inputs_reaches_forward_u_v_as_readme_says(one_thread):
    """README ("Curvature products and SciPy operators"): a batch `((u, v), y)` is passed whole
    as the model's one argument, so a `forward(u, v)` takes `lambda a: model(*a)` with
    `params=hessfree.trainable(model)`. The README had said only that a batch may hold a tuple
    of inputs "for a model of several inputs", which `forward(u, v)` refuses (the text was
    fixed; this test is a guard, passing on main). Oracle: the dense float64 Gauss-Newton
    matrix 2/(NK) JᵀJ of the mean squared error, J by torch.autograd.functional.jacobian."""

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)

        def forward(self, u, v):
            return torch.tanh(self.a(u)) * self.b(v)

    torch.manual_seed(0)
    model = TwoInputs().double()
    u, v, y = torch.randn(6, 3).double(), torch.randn(6, 4).double(), torch.randn(6, 2).double()
    with pytest.raises(TypeError, match="not unpacked"):
        hessfree.GGNLinearOperator(model, torch.nn.MSELoss(), ((u, v), y))
    params = hessfree.trainable(model)
    G = hessfree.GGNLinearOperator(
        lambda a: model(*a), torch.nn.MSELoss(), ((u, v), y), params=params
    )
    dense = G @ np.eye(G.shape[0])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def outputs(t):
        tensors, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            tensors[name] = t[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return torch.func.functional_call(model, tensors, (u, v)).reshape(-1)

    J = torch.autograd.functional.jacobian(outputs, theta).numpy()
    np.testing.assert_allclose(dense, 2 / J.shape[0] * J.T @ J, rtol=1e-10, atol=1e-12)
