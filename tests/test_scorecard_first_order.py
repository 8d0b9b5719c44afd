"""``experiments/scorecard.py``: the swap task's verdicts when both runs stopped moving.

A run stops moving when it meets the loop's first-order test (max |∂f/∂θ| ≤ ``tolerance_grad``,
after which ``torch.optim.LBFGS`` and ``HessianFree`` return without a step) or when its loss
is frozen (float32's floor). Two stopped runs are compared by their times to the lowest loss
both reached; the final losses' ratio decides only where one of them still moves.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
scorecard = pytest.importorskip("scorecard")

TOL = 1e-7


def test_max_abs_grad_matches_the_least_squares_closed_form():
    # f(w, b) = mean((Xw + b - y)^2): ∂f/∂w = 2/N Xᵀr, ∂f/∂b = 2/N Σ r, r = Xw + b - y
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal((40, 1))
    model = nn.Linear(3, 1).double()
    task = scorecard.Task(
        "lsq", "", model, torch.from_numpy(x), torch.from_numpy(y),
        torch.nn.functional.mse_loss, lambda m: 0.0, "", 1.0, 1.0, [], [], {},
    )  # fmt: skip
    w = model.weight.detach().numpy().T
    b = model.bias.detach().numpy()
    r = x @ w + b - y
    want = max(np.abs(2 / len(x) * x.T @ r).max(), abs(2 / len(x) * r.sum()))
    assert scorecard.max_abs_grad(task, model) == pytest.approx(want, rel=1e-12)
    assert all(p.grad is None for p in model.parameters())  # no .grad left behind


def _run(family: str, final_loss: float, t_stop: float, *, stops: str = "frozen"):
    """A run whose loss falls to ``final_loss`` at ``t_stop`` (of 10 s); then, by ``stops``:
    'frozen' stays there, 'test' stays there and meets max |g| ≤ TOL, 'moving' keeps falling.
    """
    r = scorecard.Run(family, family, None, lambda: None)
    end = final_loss * (0.99 if stops == "moving" else 1.0)
    r.curve = [(0.0, 1.0), (t_stop, final_loss), (8.0, final_loss), (10.0, end)]
    g_end = TOL / 2 if stops == "test" else TOL * 3
    r.grad_curve = [(0.0, 1.0), (t_stop, g_end), (10.0, g_end)]
    r.steps = 10
    return r


def _swap_verdicts(runs):
    task = scorecard.make_swap_task(quick=True)
    res = dict(task=task, sweep=[], finals=runs)
    res["summary"] = scorecard.summarise(res)
    return {(row[0], row[1]): row for row in scorecard.verdicts({"swap": res})}


def _defaults_row(rows):
    return next(v for (k, t), v in rows.items() if t.startswith("`HessianFree(params)`"))


@pytest.mark.parametrize(
    ("t_default", "t_tuned", "met"),
    [(1.2, 1.0, True), (1.6, 1.0, False), (0.5, 2.0, True)],
)
def test_defaults_verdict_is_the_time_to_the_common_loss_when_both_stopped(t_default, t_tuned, met):
    # the defaults end at 2.3x the tuned loss (the full scorecard's figure): the loss ratio
    # alone reads "missed" whatever the times; the tuned run passes 2.3e-8 on its way down
    runs = [
        _run("L-BFGS", 1e-6, 9.0, stops="moving"),
        _run("HF default", 2.3e-8, t_default),
        _run("HF tuned", 1e-8, t_tuned, stops="test"),
    ]
    row = _defaults_row(_swap_verdicts(runs))
    assert row[3] == ("met" if met else "**missed**")
    assert row[2].startswith(f"{t_default / t_tuned:.3g}× the time to 2.3e-08")
    assert "both stopped: frozen, ‖g‖∞ ≤ 1e-07" in row[2]
    assert "final errors 2.3e-08 and 1e-08" in row[2]


def test_defaults_verdict_stays_the_loss_ratio_when_one_still_moves():
    runs = [
        _run("L-BFGS", 1e-6, 9.0, stops="moving"),
        _run("HF default", 2.3e-8, 1.0, stops="moving"),  # faster, and still going down
        _run("HF tuned", 1e-8, 3.0),
    ]
    row = _defaults_row(_swap_verdicts(runs))
    assert row[2] == f"{2.3e-8 * 0.99 / 1e-8:.3g}×" and row[3] == "**missed**"


def test_lbfgs_verdict_uses_the_time_when_both_stopped():
    # L-BFGS stops lower, but HF stopped 3x later: missed; then L-BFGS still moving: the losses
    runs = [
        _run("L-BFGS", 1e-9, 1.0),
        _run("HF default", 1e-8, 3.0),
        _run("HF tuned", 1e-8, 3.0),
    ]
    row = _swap_verdicts(runs)[("swap", "HF loss ≤ 2× L-BFGS at equal time")]
    assert row[3] == "**missed**" and row[2].startswith("3× the time to 1e-08")
    runs[0] = _run("L-BFGS", 1e-6, 1.0, stops="moving")
    row = _swap_verdicts(runs)[("swap", "HF loss ≤ 2× L-BFGS at equal time")]
    assert row[3] == "met" and row[2].startswith(f"{1e-8 / 0.99e-6:.3g}×")


def test_stopped_needs_both_runs_stopped_and_none_failed():
    a, b = _run("HF default", 1e-8, 2.0), _run("HF tuned", 1e-8, 4.0, stops="test")
    ratio, _ = scorecard._stopped_time_ratio(a, b, TOL)
    assert ratio == 0.5
    assert scorecard._stopped_time_ratio(a, _run("x", 1e-8, 4.0, stops="moving"), TOL) is None
    a.failed = "RuntimeError: diverged"
    assert scorecard._stopped_time_ratio(a, b, TOL) is None
    assert math.isinf(scorecard.time_to(b.grad_curve, TOL / 10))
