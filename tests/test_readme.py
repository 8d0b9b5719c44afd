"""README's code is part of the product: its doctest and its self-contained examples run as
written, and what they compute is checked against explicit float64 matrices (not against the
numbers they print, which would only test the example against itself).

Fragments that need the reader's own model and data (the closure styles) are not run here; the
optimizer's tests cover them."""

from __future__ import annotations

import contextlib
import doctest
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _example(marker: str) -> str:
    """The one self-contained (import-first) README example containing ``marker``."""
    found = [b for b in BLOCKS if b.lstrip().startswith(("import", "from")) and marker in b]
    assert len(found) == 1, f"{len(found)} README examples contain {marker!r}"
    return found[0]


def _run(source: str) -> tuple[dict, str]:
    namespace: dict = {"__name__": "readme_example"}
    out = io.StringIO()
    with torch.random.fork_rng(), contextlib.redirect_stdout(out):
        exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 (our own README)
    return namespace, out.getvalue()


def _outputs_of_theta(model: torch.nn.Module, x: torch.Tensor):
    """The model's float64 outputs on ``x`` as a function of its flat float64 parameters, and
    the parameters at which to take it."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])

    def outputs(t: torch.Tensor) -> torch.Tensor:
        tensors, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            tensors[name] = t[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return torch.func.functional_call(model, tensors, (x.double(),))

    return outputs, theta


def test_readme_doctest_runs(one_thread):
    parser = doctest.DocTestParser()
    text = "\n".join(b for b in BLOCKS if ">>>" in b)
    assert text, "README has no doctest block"
    test = parser.get_doctest(text, {}, "README", str(README), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    with torch.random.fork_rng():
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def test_readme_cg_example_solves_the_damped_gauss_newton_system(one_thread):
    ns, printed = _run(_example("cg(G.damped"))
    assert "info=0" in printed
    logits, theta = _outputs_of_theta(ns["model"], ns["x"])
    J = torch.autograd.functional.jacobian(logits, theta).reshape(-1, theta.numel())
    z = logits(theta).detach()
    prob = torch.softmax(z, dim=1)
    H = (torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]) / z.shape[0]
    H_full = torch.block_diag(*H)
    G = (J.T @ H_full @ J).numpy()
    theta.requires_grad_(True)
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(logits(theta), ns["y"]), theta)[0]
    g = g.numpy()
    p = np.asarray(ns["p"], dtype=np.float64)
    p_exact = np.linalg.solve(G + 1e-2 * np.eye(len(g)), -g)
    # float32 products, rtol 1e-6, κ ≈ 81: 4.6e-6 from the float64 solve here; 1e-3 is margin
    assert np.linalg.norm(p - p_exact) <= 1e-3 * np.linalg.norm(p_exact)


def test_readme_eigsh_example_finds_the_top_hessian_eigenvalues(one_thread):
    ns, printed = _run(_example("eigsh("))
    outputs, theta = _outputs_of_theta(ns["model"], ns["x"])
    y = ns["y"].double()
    H = torch.autograd.functional.hessian(lambda t: ns["loss_fn"](outputs(t), y), theta)
    top5 = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1][:5]
    np.testing.assert_allclose(np.sort(ns["top5"])[::-1], top5, rtol=1e-6)
    assert printed.strip().startswith("[")


def test_readme_slq_example_matches_slogdet(one_thread):
    """The estimate against slogdet of the dense float64 GGN, within four of the estimator's
    exact standard deviations (Hutchinson's, from the dense log(G + λI)); seeded."""
    ns, printed = _run(_example("spectral_density("))
    logits, theta = _outputs_of_theta(ns["model"], ns["x"])
    J = torch.autograd.functional.jacobian(logits, theta).reshape(-1, theta.numel())
    prob = torch.softmax(logits(theta).detach(), dim=1)
    H = (torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]) / prob.shape[0]
    B = (J.T @ torch.block_diag(*H) @ J).numpy() + 1e-2 * np.eye(theta.numel())
    lam, Q = np.linalg.eigh(B)
    M = (Q * np.log(lam)) @ Q.T
    sigma = np.sqrt(2 * (np.sum(M**2) - np.sum(np.diag(M) ** 2)) / 20)
    estimate = ns["logdet"].estimate
    assert abs(estimate - np.linalg.slogdet(B)[1]) <= 4 * sigma
    assert abs(estimate - np.linalg.slogdet(B)[1]) < 0.01 * abs(np.linalg.slogdet(B)[1])
    grid = np.linspace(-0.05, 0.7, 751)  # the spectrum of G + 0.01 I lies in [0.01, 0.62]
    assert np.trapezoid(ns["density"], grid) == pytest.approx(1.0, abs=1e-3)
    assert printed.startswith("log det(G + 0.01 I) = ")


@pytest.mark.slow
def test_readme_pinn_example_learns_poisson():
    ns, printed = _run(_example("r_interior"))
    error = float(printed.strip().splitlines()[-1])
    # the exact solution sin(πx)sin(πy) on 4,096 fresh points (the example's own check)
    assert error < 1e-3, error
    assert ns["hf"].last_step.status in ("accepted", "converged")
