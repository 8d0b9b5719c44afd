"""experiments/_curves330.py: its race takes exactly the runner's steps (issue 14)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_train_loop import final_params, quiet, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

pytest.importorskip("hessfree.optimizer")
import _curves330  # noqa: E402

ENTRIES = [
    {"name": "adam", "lr": 0.01, "weight_decay": 2e-5},
    {"name": "hessianfree", "cg_max_iter": 3, "batch_size": 32, "curvature_batch_size": 8},
    {
        "label": "adam-hf",
        "phases": [
            {"name": "adam", "lr": 0.01, "budget": {"steps": 4}},
            {"name": "hessianfree", "cg_max_iter": 2, "batch_size": 24},
        ],
    },
]


def test_race_runs_take_the_runners_steps_bit_for_bit(tmp_path):
    """The oracle is the runner itself: after 9 steps each race run (an Adam entry, an HF
    entry with its own curvature batch, and Adam for 4 steps then HF) holds the very weights
    of the runner's checkpoint, so the race measures the config's rows, not look-alikes.
    Fails if the race drew other batches, another curvature batch, or switched at another
    step."""
    cfg = tiny_config(tmp_path, optimizers=ENTRIES, budget={"steps": 9})
    quiet(cfg, tmp_path / "run").run()
    _, runs = _curves330.contenders(cfg)
    for run, spec in zip(runs, cfg.optimizers, strict=True):
        for _ in range(9):
            run.step()
        expected = final_params(tmp_path / "run", spec.label)
        got = run.model.state_dict()
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (spec.label, key)
    assert runs[2].phase_of() == 1


def test_race_entries_are_valid_rows_of_the_shipped_config():
    """Every contender parses as a row of configs/curves_autoencoder.yaml (the config's own
    validation: keys, ranges, batch sizes against the 20,000 images); the hybrid's Adam phase
    gets 1/8 of the budget."""
    import yaml

    from hessfree.train.config import parse_config

    raw = yaml.safe_load(_curves330.CONFIG.read_text())
    raw["optimizers"] = [_curves330.entry(n, 330.0) for n in _curves330.ENTRIES]
    cfg = parse_config(raw)
    hybrid = next(o for o in cfg.optimizers if o.label == "adam-then-hf")
    assert hybrid.phases[0].budget.seconds == pytest.approx(41.25)
    assert [p.name for p in hybrid.phases] == ["adam", "hessianfree"]


def test_shipped_hf_row_is_the_raced_grow_entry():
    """The shipped config's HF row is the race's ``hf-grow`` entry (the row measured is the row
    shipped): the same phases, budgets and hyperparameters; its second phase's batches follow
    the closed form floor(250 * 1.01**k) with a quarter (rounded) for curvature, and the third
    phase (λ >= 0.03: "curveslate", "curveslate2") starts at the batch the second's last step
    took (2,978 = floor(250 * 1.01**249), the size the late races started from) and grows on
    from it as floor(2978 * 1.01**k) up to its cap of 4,000. Fails if the config and the race
    drift apart, or if the schedule changes meaning (λ >= 0.1 in the third phase: checked)."""
    import math

    import yaml

    from hessfree.train.config import parse_config
    from hessfree.train.stepping import batch_sizes

    raw = yaml.safe_load(_curves330.CONFIG.read_text())
    shipped = parse_config(raw).optimizers[0]
    raw["optimizers"] = [_curves330.ENTRIES["hf-grow"]]
    raced = parse_config(raw).optimizers[0]
    assert shipped == raced
    assert shipped.label == "hessianfree"  # reproduce.py's table and paper column read it
    first, late, last = shipped.phases
    assert first.budget.steps == 1100 and first.budget.seconds is None
    assert late.budget.steps == 250 and late.budget.seconds is None
    n = 20000
    for k in (0, 1, 70, 249):
        b = math.floor(250 * 1.01**k)
        assert batch_sizes(late, n, False, k)[:2] == (b, round(b / 4)), k
    assert batch_sizes(late, n, False, 249)[0] == batch_sizes(last, n, False, 0)[0] == 2978
    for k in (1, 29):
        b = math.floor(2978 * 1.01**k)
        assert batch_sizes(last, n, False, k)[:2] == (b, round(b / 4)), k
    for k in (30, 100, 180):  # floor(2978 * 1.01**30) = 4,013: capped at 4,000 from there
        assert batch_sizes(last, n, False, k)[:2] == (4000, 1000), k
    assert batch_sizes(first, n, False, 300)[:2] == (250, 62)
    assert [p.hyperparameters["min_damping"] for p in shipped.phases] == [0.3, 0.3, 0.03]
    # L2 x5 in the third phase only ("curvestest"), and an Adam row at that L2 beside Adam's
    assert [p.hyperparameters["weight_decay"] for p in shipped.phases] == [2e-5, 2e-5, 1e-4]
    adams = {
        o.label: o.leaves[0].hyperparameters["weight_decay"]
        for o in parse_config(yaml.safe_load(_curves330.CONFIG.read_text())).optimizers
        if o.leaves[0].name == "adam"
    }
    assert adams == {"adam": 2e-5, "adam-l2-1e-4": 1e-4}


def test_late_race_baselines_are_the_shipped_phases():
    """The late-phase races (``_curves_growlate.py``, ``_curvesl2.py``) start from the shipped
    second phase and measure against the shipped third phase (L2 1e-4 since "curvestest"):
    the first phase, their second phase for 250 steps and their baseline third phase at the
    batch the second reached (2,978) parse to the config's HF row. Fails if the config's row
    changes and the races keep racing the former one (as ``_curves_growlate``'s import-time
    check did, unnoticed, after "curvestest")."""
    import _curves_growlate
    import _curvesl2
    import yaml

    from hessfree.train.config import parse_config

    raw = yaml.safe_load(_curves330.CONFIG.read_text())
    shipped = parse_config(raw).optimizers[0]
    p2, third = _curvesl2.THIRD["s3"]
    first = dict(_curves330.K2R2, budget={"steps": 1100})
    second = dict(_curvesl2.PHASE2[p2], budget={"steps": 250})
    for late in (dict(third, batch_size=2978), _curves_growlate.SHIP3L2):
        raw["optimizers"] = [{"label": "hessianfree", "phases": [first, second, late]}]
        assert parse_config(raw).optimizers[0] == shipped
