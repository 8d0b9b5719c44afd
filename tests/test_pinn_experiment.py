"""Smoke runs of ``experiments/pinn.py``: its core on a tiny budget, and the whole ``--quick``."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
pinn = pytest.importorskip("pinn")


@pytest.mark.parametrize(
    "make",
    [lambda: pinn.poisson(4, 6), lambda: pinn.reaction(8, 4, 6)],
    ids=["poisson", "reaction"],
)
def test_pinn_adam_then_hf_records_within_budget(make):
    prob = make()
    torch.manual_seed(0)
    init = copy.deepcopy(prob.make_net().state_dict())
    run = pinn.train(
        prob, "Adam → HF", init, 0.3, adam_lr=1e-3, switch=0.5, hf_kwargs=pinn.HF_TUNED
    )
    # how many steps fit depends on the machine's load: check only what holds for any count
    assert run.seconds[0] == 0.0 and run.seconds[run.last] <= 0.3
    assert len(run.seconds) == len(run.losses) == len(run.errors)
    assert math.isfinite(run.loss) and math.isfinite(run.error)


def test_pinn_product_cost_reports_ratios():
    prob = pinn.poisson(4, 6)
    threads = torch.get_num_threads()
    costs = pinn.product_cost(prob, prob.make_net().state_dict(), rounds=3, threads=1)
    assert costs["gradient"][1:] == (1.0, 1.0, 1.0)  # median and quartiles of time / itself
    assert all(ms > 0 and q1 <= r <= q3 for ms, r, q1, q3 in costs.values())
    assert torch.get_num_threads() == threads  # the timing's thread count is restored


def test_pinn_products_only_trains_nothing(capsys):
    threads = torch.get_num_threads()
    try:
        args = ["--quick", "--products-only", "--problems", "poisson", "--threads", "1"]
        assert pinn.main(args) is None
    finally:
        torch.set_num_threads(threads)  # main sets --threads for the whole process
    out = capsys.readouterr().out
    assert "GN product (R-op Jv, graph reused)" in out and "load average" in out
    assert "Adam" not in out  # no training table


@pytest.mark.slow
def test_pinn_quick_writes_report_and_plot(tmp_path):
    report = pinn.main(["--quick", "--seconds", "0.5", "--out", str(tmp_path)])
    text = report.read_text()
    assert "Adam → HF (tuned)" in text and "× gradient" in text
    assert report.with_suffix(".png").exists()
