"""``experiments/scorecard.py``'s Adam→HF row: Adam for a while, then HF from Adam's weights."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
scorecard = pytest.importorskip("scorecard")

CPU = torch.device("cpu")
# one CG iteration from x0 = 0 with λ = 1e-8: on a quadratic, the exact line minimum along -g
ONE_CG = dict(batch=32, curvature_batch=32, kw=dict(cg_max_iter=1, damping=1e-8, precond=None))


def _linear_task(n: int, d: int, seed: int) -> scorecard.Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    return scorecard.Task(
        "t",
        "t",
        model,
        x,
        y,
        scorecard.mse_sum_per_case,
        None,
        "",
        1.0,
        1.0,
        [],
        [],
        {"1cg": ONE_CG},
    )


def _numpy_adam(X, Y, w, batches, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (Kingma & Ba 2015, Algorithm 1) on the mean squared residual, gradient in closed
    form: 2/m X_Bᵀ(X_B w − y_B)."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, idx in enumerate(batches, start=1):
        xb, yb = X[idx], Y[idx]
        g = 2 / len(idx) * xb.T @ (xb @ w - yb)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return w


@pytest.fixture(scope="module")
def _adam_imported():
    # the first torch.optim.Adam of a process imports torch's compiler stack (~4 s here,
    # once): set-up, not the hybrid's cost
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def test_hybrid_takes_adam_steps_until_the_switch_then_hf_from_adams_weights(_adam_imported):
    task = _linear_task(32, 3, seed=0)
    X, Y = task.x.numpy(), task.y.numpy()
    w0 = task.model.weight.detach().numpy().T.copy()
    run = scorecard.hybrid_run(task, lr=0.05, batch=4, seconds=1.0, hf_name="1cg")
    assert run.family == "Adam→HF" and "then 1cg" in run.name
    for _ in range(5):  # the clock below `seconds`: Adam steps on batches of 4
        run.step()
    # oracle: numpy Adam on the same shuffled batches (seed 0, as every scorecard run)
    order = scorecard._Batches(32, 4, CPU)
    w_adam = _numpy_adam(X, Y, w0, [order.next().numpy() for _ in range(5)], lr=0.05)
    np.testing.assert_allclose(run.model.weight.detach().numpy().T, w_adam, rtol=1e-10)
    assert not run.statuses
    run.clock = 1.0  # the switch: one HF step on the whole set from Adam's weights
    run.step()
    # oracle: one CG iteration from 0 is the exact line minimum along -g of the quadratic
    # with H = 2/n XᵀX: w − (gᵀg / gᵀHg) g
    g = 2 / 32 * X.T @ (X @ w_adam - Y)
    H = 2 / 32 * X.T @ X
    w_hf = w_adam - (g.T @ g).item() / (g.T @ H @ g).item() * g
    np.testing.assert_allclose(run.model.weight.detach().numpy().T, w_hf, rtol=1e-6)
    assert run.statuses == {"accepted": 1}
    # the initial weights were not touched
    np.testing.assert_array_equal(task.model.weight.detach().numpy().T, w0)


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf, "10"])
def test_hybrid_switch_time_out_of_range_is_refused(seconds):
    with pytest.raises(
        ValueError, match=rf"`seconds` must be a finite number >= 0, got {seconds!r}"
    ):
        scorecard.hybrid_run(_linear_task(8, 2, seed=1), 1e-3, 4, seconds, "1cg")


def test_hybrid_unknown_hf_regime_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"Unknown HF regime 'k2'; expected one of \['1cg'\]"):
        scorecard.hybrid_run(_linear_task(8, 2, seed=1), 1e-3, 4, 1.0, "k2")


def _row(family, error, ratio):
    run = scorecard.Run(family, family, None, lambda: None, clock=10.0, steps=10)
    return dict(run=run, error=error, error_ratio=ratio, times=[], time_ratios=[], base_times=[])


def test_hybrid_is_reported_apart_and_never_as_hf_tuned():
    # the hybrid ends far below Adam, HF tuned above it: the verdict stays HF tuned's
    # (missed), and the hybrid's ratio is its own row without a verdict
    adam = _row("Adam", 10.0, 1.0)
    rows = [adam, _row("HF default", 20.0, 2.0), _row("HF tuned", 12.0, 1.2)]
    rows.append(_row("Adam→HF", 7.0, 0.7))
    summary = dict(rows=rows, best_base=adam["run"])
    task = scorecard.Task(*["curves"] + [None] * 6, "error", 90.0, 30.0, adam=[], sgd=[], hf={})
    results = {"curves": dict(summary=summary, task=task, finals=[r["run"] for r in rows])}
    v = {row[1]: row for row in scorecard.verdicts(results)}
    assert v["HF train error ≤ 1.0× best baseline"][2:4] == ["1.20× (HF tuned)", "**missed**"]
    hybrid = v["Adam→HF (reported apart, not HF tuned): train error vs best baseline"]
    assert hybrid[2:4] == ["0.70× (Adam→HF)", "–"]
