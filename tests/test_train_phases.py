"""Entries with ``phases``: Adam for N steps, then HessianFree or L-BFGS (issue 16, part 3)."""

from __future__ import annotations

import re

import pytest
import torch
from test_train_loop import final_params, quiet, tiny_config

from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.config import ConfigError, dump_config, parse_config, safe_load_yaml
from hessfree.train.metrics import read_metrics
from hessfree.train.plots import phase_switches

ADAM_THEN_HF = {
    "label": "adam-hf",
    "phases": [
        {"name": "adam", "lr": 0.01, "budget": {"steps": 4}},
        {"name": "hessianfree", "cg_max_iter": 5, "batch_size": None},
    ],
}
ADAM_THEN_LBFGS = {
    "phases": [
        {"name": "adam", "lr": 0.01, "budget": {"steps": 3}},
        {"name": "lbfgs", "max_iter": 3, "history_size": 5},
    ],
}


def test_phases_parse_dump_and_read_back(tmp_path):
    cfg = tiny_config(tmp_path, optimizers=[ADAM_THEN_HF, ADAM_THEN_LBFGS])
    hf, lbfgs = cfg.optimizers
    assert (hf.label, hf.name, lbfgs.label) == ("adam-hf", "adam+hessianfree", "adam+lbfgs")
    assert [p.name for p in hf.phases] == ["adam", "hessianfree"]
    assert hf.phases[0].batch_size == 16 and hf.phases[1].batch_size is None
    assert hf.phases[0].budget.steps == 4 and hf.phases[1].budget.steps is None
    assert hf.budget.steps == 12  # the global budget bounds the whole entry
    assert parse_config(safe_load_yaml(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"phases": [{"name": "adam"}]}, r"`optimizers.0.phases` must be a list of two or more"),
        ({"phases": "adam"}, r"`optimizers.0.phases` must be a list"),
        (
            {"phases": [{"name": "adam"}, {"name": "sgd"}]},
            r"`optimizers.0.phases.0` \(adam\) has no budget",
        ),
        (
            {"phases": [{"name": "adam", "budget": {"steps": 1}}, {"name": "nope"}]},
            r"Unknown optimizer `optimizers.0.phases.1.name`",
        ),
        ({**ADAM_THEN_HF, "lr": 0.1}, r"Unknown key `optimizers.0.lr`; allowed keys: phases"),
        (
            {"phases": [{"name": "adam", "budget": {"steps": 1}, "label": "a"}, {"name": "sgd"}]},
            r"`optimizers.0.phases.0.label` is not allowed in a phase",
        ),
        (
            {"phases": [{"name": "adam", "budget": {"steps": 0}}, {"name": "sgd"}]},
            r"`optimizers.0.phases.0.budget.steps` must be an int >= 1",
        ),
        (
            {
                "phases": [
                    {"name": "adam", "budget": {"steps": 1}},
                    {"name": "sgd", "batch_size": 99},
                ]
            },
            r"`optimizers.0.phases.1` \(sgd\): batch_size 99 exceeds",
        ),
    ],
)
def test_bad_phases_are_refused(tmp_path, entry, match):
    try:
        cfg = tiny_config(tmp_path, optimizers=[entry])
    except ConfigError as err:
        assert any(re.search(match, p) for p in err.problems), err.problems
        return
    # sizes that need the data are checked when the run starts
    with pytest.raises(ConfigError, match=match):
        quiet(cfg, tmp_path / "run").run()


def test_adam_then_hessianfree_and_then_lbfgs_switch_after_their_steps(tmp_path):
    cfg = tiny_config(
        tmp_path,
        optimizers=[ADAM_THEN_HF, ADAM_THEN_LBFGS],
        budget={"steps": 7},
        output={"checkpoint_every": 5, "plots": True},
        eval={"every_steps": 3},
    )
    result = quiet(cfg, tmp_path / "run").run()
    assert result.summary["optimizers"]["adam-hf"]["stop_reason"] == "steps"
    assert result.summary["optimizers"]["adam-hf"]["steps"] == 7
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    hf = [r for r in records if r["optimizer"] == "adam-hf"]
    # evaluated at the switch (step 4), phases recorded, HF diagnostics only in HF's phase
    assert [(r["step"], r["phase"]) for r in hf] == [(0, 0), (3, 0), (4, 0), (6, 1), (7, 1)]
    assert not any(k.startswith("hf_") for r in hf[:3] for k in r)
    assert any(k.startswith("hf_") for k in hf[-1])
    assert phase_switches(hf, "step") == [(4, "hessianfree")]
    lb = [r for r in records if r["optimizer"] == "adam+lbfgs"]
    assert phase_switches(lb, "step") == [(3, "lbfgs")]
    assert (tmp_path / "run" / "loss_vs_steps.png").stat().st_size > 0
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "adam-hf.pt")
    assert ckpt["phase"] == 1 and ckpt["phase_start"][:2] == [4, 64]


@pytest.mark.parametrize("stop_at", [2, 5], ids=["in-first-phase", "in-second-phase"])
def test_phases_resume_bit_identically(tmp_path, stop_at):
    cfg = tiny_config(
        tmp_path,
        optimizers=[ADAM_THEN_HF],
        budget={"steps": 7},
        output={"checkpoint_every": 1, "plots": False},
    )
    quiet(cfg, tmp_path / "ref").run()

    def stop(ev):
        if ev.step == stop_at:
            runner.request_stop()

    runner = quiet(cfg, tmp_path / "run", on_step=stop)
    assert runner.run().signal is not None
    quiet(cfg, tmp_path / "run", resume=True).run()
    a = final_params(tmp_path / "run", "adam-hf")
    b = final_params(tmp_path / "ref", "adam-hf")
    assert all(torch.equal(a[k], b[k]) for k in a)
    got = [(r["step"], r["phase"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    want = [(r["step"], r["phase"]) for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    assert got == want and (4, 0) in want


def test_a_converged_phase_hands_over_to_the_next(tmp_path):
    entry = {
        "phases": [
            {"name": "lbfgs", "tolerance_grad": 1e3, "budget": {"steps": 5}},  # moves nothing
            {"name": "adam", "lr": 0.01},
        ]
    }
    cfg = tiny_config(tmp_path, optimizers=[entry], batch_size=None, budget={"steps": 4})
    result = quiet(cfg, tmp_path / "run").run()
    assert result.summary["optimizers"]["lbfgs+adam"]["stop_reason"] == "steps"
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert phase_switches(records, "step") == [(1, "adam")]
