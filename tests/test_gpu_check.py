"""``experiments/gpu_check.py`` on the CPU: its parts run and check what they claim, so that a
lent GPU's few minutes are not spent finding a broken script."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
gpu_check = pytest.importorskip("gpu_check")
scorecard = pytest.importorskip("scorecard")


def test_products_time_every_contender_and_measure_errors_against_float64(one_thread):
    (row,) = gpu_check.products("cpu", [16], 0.05)
    assert set(row["median_ms"]) == {
        "gradient",
        "GN eager",
        "GN CUDA graph",
        "GN TF32",
        "Hessian eager",
    }
    assert row["errors"] == {} and row["to_gradient"]["gradient"] == 1.0
    # float32 products against float64 ones: rounding, not a wrong product (a wrong one is O(1))
    for name in ("GN eager", "GN CUDA graph", "GN TF32"):
        assert 0 < row["rel_error_vs_float64"][name] < 1e-4
    assert row["graph_mode"] == "eager" and "CUDA device" in row["graph_fallback"]


def test_steps_compare_the_policies_from_the_same_weights(one_thread):
    out = gpu_check.steps("cpu", 48, 16, 2)
    assert out["params_rel_diff"] == 0.0  # on a CPU the policy falls back: the same steps
    assert out["eager"]["cg_iterations"] == out["CUDA graph"]["cg_iterations"]
    assert set(out["eager"]["phases_ms"]) >= {"evaluate", "solve"}


def test_on_model_moves_a_tensor_once_per_device_and_keeps_it():
    """The scorecard's error closures on a CUDA run: the meta device stands in for the GPU."""
    scorecard._MOVED.clear()
    x, y = torch.ones(3, 2), torch.zeros(3, 2)
    assert scorecard.on_model(x, torch.nn.Linear(2, 1)) is x  # same device: as it is
    assert scorecard._MOVED == {}
    m = torch.nn.Linear(2, 1, device="meta")
    moved = scorecard.on_model(x, m)
    assert moved.device.type == "meta" and moved.shape == x.shape
    assert scorecard.on_model(x, m) is moved  # moved once, then the kept copy
    assert scorecard.on_model(y, m) is not moved  # another tensor, its own copy
    scorecard._MOVED.clear()


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def test_race_rows_pick_the_target_rows_and_refuse_a_name_no_run_holds():
    runs = [
        _Named(n)
        for n in (
            "Adam lr=0.003 b=1000",
            "Adam lr=0.003 b=5000",
            "SGD-m lr=0.01 b=1000",
            "HF defaults, 500/125",
            "HF 2000×1.0007/step, curvature ¼, λ≥0.3",
            "HF 2000×1.0015/step, curvature ¼, λ≥600/batch",
        )
    ]
    assert gpu_check.pick_rows(runs, "all") == runs
    assert [r.name for r in gpu_check.pick_rows(runs, "target")] == [
        runs[0].name,
        runs[2].name,
        runs[4].name,
        runs[5].name,
    ]
    assert gpu_check.pick_rows(runs, "b=5000, defaults") == [runs[1], runs[3]]
    with pytest.raises(SystemExit, match=r"holds \['lr=9'\].*Adam lr=0.003 b=1000"):
        gpu_check.pick_rows(runs, "lr=9")
