"""floor19: a λ floor that falls as the batch grows, ``min_damping_cases`` (experiments/README.md,
floor19), and the note a resume gives after a step that a budget or a signal cut short.

``min_damping_cases: c`` on an HF entry sets HessianFree's ``min_damping`` to c / b before every
step, b the step's gradient batch (all ranks' cases). Oracles: the batch sizes in exact rational
arithmetic (``test_train_batches.exact_size``), c / b computed here, HessianFree's own
``last_step.damping_floor`` (the bound it applied) and its λ; an uninterrupted run for resume
(bitwise); the one-process run for two ranks (float64, as ``test_train_distributed``).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from test_train_batches import N, exact_size, raw_config
from test_train_loop import assert_same_params, final_params, without_timing
from test_train_robust import refused, write_tiny

from hessfree.train import loop
from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.cli import main
from hessfree.train.config import ConfigError, dump_config, parse_config
from hessfree.train.data import load_dataset
from hessfree.train.loop import ResumeWarning, Runner, RunStatus
from hessfree.train.metrics import read_metrics

C = 2.5  # λ ≥ 0.25 at the first 10 cases, 0.025 once the batch is all 100

FLOORED = {
    "name": "hessianfree",
    "label": "floored",
    "cg_max_iter": 5,
    "batch_size": 10,
    "batch_growth": 1.3,
    "curvature_fraction": 0.25,
    "min_damping_cases": C,
    "relative_min_damping": 0.0,  # the floor in force is then c / b alone
}
AUTO_RELATIVE = {**FLOORED, "label": "auto-relative"}
del AUTO_RELATIVE["relative_min_damping"]  # 'auto': max(c / b, 0.01 gᵀCg/gᵀg) on mini-batches
PHASED = {
    "label": "adam-then-floored",
    "phases": [
        {"name": "adam", "lr": 0.01, "batch_size": 10, "budget": {"steps": 3}},
        {k: v for k, v in FLOORED.items() if k != "label"},
    ],
}


def spy_floors(monkeypatch) -> list[dict]:
    """Patch the runner's step: record each HF step's label, batch, the ``min_damping`` the
    optimizer holds when the step begins, and what HessianFree reports after it."""
    seen: list[dict] = []
    real = loop.take_step

    def spy(spec, optimizer, model, objective, group, batch, curvature, **kw):
        before = optimizer.param_groups[0].get("min_damping")
        loss = real(spec, optimizer, model, objective, group, batch, curvature, **kw)
        if spec.name == "hessianfree":
            last = optimizer.last_step
            seen.append(
                {
                    "batch": len(batch[0]),
                    "min_damping": before,
                    "floor": last.damping_floor,
                    "damping": last.damping,
                    "next": last.next_damping,
                }
            )
        return loss

    monkeypatch.setattr(loop, "take_step", spy)
    return seen


def test_floor19_floor_in_force_is_c_over_each_steps_growing_batch(tmp_path, monkeypatch):
    """Fails on main (the key is refused: unknown key of 'hessianfree'). Each step's floor is
    c / b_k for the closed-form size b_k = ⌊10 · 1.3^k⌋ (at most 100): the value the optimizer
    holds and the bound HessianFree reports applying, exactly; λ used and λ after the update
    are never below it, and the floor binds (λ sits on it) on some steps, so the check is not
    vacuous. With relative_min_damping 'auto' the bound is the larger of the two floors. In a
    phase the schedule, and so the floor, restarts at the phase's start."""
    raw = raw_config(tmp_path, [FLOORED, AUTO_RELATIVE, PHASED], budget={"steps": 14})
    cfg = parse_config(raw)
    seen = spy_floors(monkeypatch)
    Runner(cfg, tmp_path / "run", progress=False, verbose=False).run()
    sizes = [exact_size(10, Fraction("1.3"), k, N) for k in range(14)]
    assert sizes[0] == 10 and sizes[-1] == N
    floored, auto, phased = seen[:14], seen[14:28], seen[28:]
    assert len(phased) == 11  # 3 Adam steps, then 11 HF steps from the phase's own step 0
    for k, rec in enumerate(floored):
        assert rec["batch"] == sizes[k]
        assert rec["min_damping"] == rec["floor"] == C / sizes[k], k
        assert rec["damping"] >= rec["floor"] and rec["next"] >= rec["floor"], k
    assert any(rec["next"] == rec["floor"] for rec in floored), "the floor never bound"
    assert floored[-1]["floor"] == pytest.approx(0.025, rel=1e-15)
    for k, rec in enumerate(auto):
        assert rec["min_damping"] == C / sizes[k]
        assert rec["floor"] >= C / sizes[k] and rec["next"] >= rec["floor"], k
    for k, rec in enumerate(phased):
        assert rec["batch"] == sizes[k]
        assert rec["min_damping"] == rec["floor"] == C / sizes[k], k


def test_floor19_fixed_and_whole_set_batches_take_the_constant_floor(tmp_path, monkeypatch):
    """Fails on main (refused key). A fixed batch of 20 gives the constant floor c / 20; a
    null batch_size (the whole training set, known after loading) c / N."""
    fixed = {**FLOORED, "label": "fixed", "batch_size": 20}
    del fixed["batch_growth"]
    whole = {**fixed, "label": "whole", "batch_size": None, "curvature_fraction": None}
    cfg = parse_config(raw_config(tmp_path, [fixed, whole], budget={"steps": 4}))
    seen = spy_floors(monkeypatch)
    Runner(cfg, tmp_path / "run", progress=False, verbose=False).run()
    assert [(r["batch"], r["floor"]) for r in seen] == [(20, C / 20)] * 4 + [(N, C / N)] * 4


def test_floor19_resume_mid_growth_ends_bit_identical(tmp_path):
    """Fails on main (refused key). Interrupted at step 6 (no checkpoint step) and resumed:
    the same sizes, floors, final weights and metrics (timing aside) as one uninterrupted run.
    The floor is a function of the step count, as the size is: nothing new is checkpointed."""
    cfg = parse_config(raw_config(tmp_path, [FLOORED, PHASED]))
    full: list[tuple] = []
    runner = Runner(cfg, tmp_path / "full", progress=False, verbose=False)
    runner.on_step = lambda ev: full.append((ev.label, ev.step, ev.batch_size))
    runner.run()

    part: list[tuple] = []
    runner = Runner(cfg, tmp_path / "part", progress=False, verbose=False)

    def stop(ev):
        part.append((ev.label, ev.step, ev.batch_size))
        if (ev.label, ev.step) in (("floored", 6), ("adam-then-floored", 5)):
            runner.request_stop()

    runner.on_step = stop
    assert runner.run().status is RunStatus.INTERRUPTED
    for i in range(2):  # interrupted once in each entry (the second in its HF phase)
        resumed = Runner(cfg, tmp_path / "part", resume=True, progress=False, verbose=False)
        resumed.on_step = stop if i == 0 else (
            lambda ev: part.append((ev.label, ev.step, ev.batch_size))
        )  # fmt: skip
        if i == 0:
            runner = resumed  # `stop` asks the running one
        result = resumed.run()
    assert result.status is RunStatus.COMPLETED
    assert part == full
    for label in ("floored", "adam-then-floored"):
        assert_same_params(
            final_params(tmp_path / "full", label), final_params(tmp_path / "part", label)
        )
    got = without_timing(read_metrics(tmp_path / "part" / "metrics.jsonl"))
    want = without_timing(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert got == want
    floors = [r["hf_damping_floor"] for r in want if r["optimizer"] == "floored" and r["step"]]
    assert floors and all(f == C / r["batch_size"] for f, r in zip(floors, [
        r for r in want if r["optimizer"] == "floored" and r["step"]], strict=True))  # fmt: skip


def test_floor19_round_trips_and_entries_without_it_keep_their_digest(tmp_path):
    """Fails on main (refused key). The key survives the dump (a resumed run re-reads its
    config.yaml), in an entry and in a phase; an entry without it dumps no such key, so the
    digests of configs written before it existed, which a resume checks, are unchanged (a
    guard for that part: main dumps no such key either)."""
    cfg = parse_config(raw_config(tmp_path, [FLOORED, PHASED]))
    dumped = yaml.safe_load(dump_config(cfg))
    assert dumped["optimizers"][0]["min_damping_cases"] == C
    assert dumped["optimizers"][1]["phases"][1]["min_damping_cases"] == C
    assert "min_damping_cases" not in dumped["optimizers"][1]["phases"][0]
    assert parse_config(dumped, default_name="grow") == cfg
    plain = {k: v for k, v in FLOORED.items() if k != "min_damping_cases"}
    without = parse_config(raw_config(tmp_path, [plain]))
    assert "min_damping_cases" not in yaml.safe_load(dump_config(without))["optimizers"][0]
    assert without.optimizers[0].min_damping_cases is None


# -- validation: exit 2, worded, before any work -----------------------------------------------


def _check(tmp_path: Path, entry: dict, capsys, **extra) -> str:
    raw = raw_config(tmp_path, [entry], **extra)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return refused(["run", str(path), "--check"], capsys)


ALLOWED = "must be a finite number > 0, or null: before each step HF's min_damping is it / the"


@pytest.mark.parametrize(
    "value",
    [0, -1, 0.0, math.inf, -math.inf, math.nan, "75", True, [75], {"c": 75},
     pytest.param(10**400, id="10**400")],
)  # fmt: skip
def test_floor19_a_value_that_is_no_positive_finite_number_is_refused(value, tmp_path, capsys):
    """Fails on main (refused as an unknown key, without saying what is allowed)."""
    err = _check(tmp_path, {**FLOORED, "min_damping_cases": value}, capsys)
    assert "`optimizers.0.min_damping_cases` = " in err and ALLOWED in err, err


@pytest.mark.parametrize("name", ["adam", "sgd", "lbfgs"])
def test_floor19_other_optimizers_refuse_it(name, tmp_path, capsys):
    """Fails on main (an unknown key there too, with no word of HF)."""
    err = _check(tmp_path, {"name": name, "batch_size": 10, "min_damping_cases": 75}, capsys)
    assert (
        f"`optimizers.0.min_damping_cases` only applies to 'hessianfree' (it sets HF's λ floor "
        f"min_damping), not '{name}'." in err
    ), err


def test_floor19_an_explicit_min_damping_beside_it_is_refused(tmp_path, capsys):
    """Fails on main (unknown key). Two floors for one entry: refused, naming both; 'auto'
    (the default, which a resumed run's config.yaml spells out) stays allowed beside it, and so
    does a number in another phase (a guard)."""
    err = _check(tmp_path, {**FLOORED, "min_damping": 0.3}, capsys)
    assert (
        "`optimizers.0.min_damping_cases` = 2.5 and `optimizers.0.min_damping` = 0.3 both set "
        "λ's floor; keep one" in err
    ), err
    parse_config(raw_config(tmp_path, [{**FLOORED, "min_damping": "auto"}]))
    other = {
        "label": "p",
        "phases": [
            {"name": "hessianfree", "min_damping": 0.3, "budget": {"steps": 2}},
            {k: v for k, v in FLOORED.items() if k != "label"},
        ],
    }
    parse_config(raw_config(tmp_path, [other]))
    other["phases"][1]["min_damping"] = 1e-3
    with pytest.raises(ConfigError, match=r"`optimizers\.0\.phases\.1\.min_damping_cases`"):
        parse_config(raw_config(tmp_path, [other]))


def test_floor19_a_fixed_lambda_beside_it_is_refused(tmp_path, capsys):
    """Fails on main (unknown key). With ``adapt_damping: false`` λ keeps its first value
    (measured: λ 0.3 on every step while the floor fell 0.3 → 0.12), so the falling floor
    would do nothing after the first step: refused, saying so."""
    err = _check(tmp_path, {**FLOORED, "adapt_damping": False}, capsys)
    assert (
        "`optimizers.0.min_damping_cases` = 2.5 and `optimizers.0.adapt_damping` = false: λ is "
        "not adapted" in err
    ), err


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("damping", 0.1, "`optimizers.0.damping` = 0.1 (floored) is below the first step's λ "
         "floor min_damping_cases / the first batch = 2.5 / 10 = 0.25; use damping >= 0.25"),
        ("max_damping", 0.25, "`optimizers.0.max_damping` = 0.25 (floored) does not exceed the "
         "first step's λ floor min_damping_cases / the first batch = 2.5 / 10 = 0.25; use "
         "max_damping > 0.25"),
    ],
)  # fmt: skip
def test_floor19_a_damping_the_first_floor_contradicts_is_refused(
    key, value, text, tmp_path, capsys
):
    """Fails on main (unknown key; without it, HessianFree would raise at the first step:
    `damping` must be in [min_damping, max_damping]). The first floor is the highest (batches
    never shrink), so it alone bounds a given initial λ and cap; damping = the floor passes."""
    err = _check(tmp_path, {**FLOORED, key: value}, capsys)
    assert text in err, err
    parse_config(raw_config(tmp_path, [{**FLOORED, "damping": 0.25}]))


def test_floor19_a_floor_beyond_float32_is_refused_not_a_traceback(tmp_path, capsys):
    """Fails on main (found here). ``min_damping: 3.5e38`` on float32 parameters passed the
    check and the run died at CG's first product (torch's RuntimeError "value cannot be
    converted to type float without overflow": exit 1, a traceback); so would a
    ``min_damping_cases`` floor beyond float32 (1e300 / 10). Both are refused now, naming the
    dtype's limit; in float64 the same floor runs."""
    plain = {k: v for k, v in FLOORED.items() if k != "min_damping_cases"}
    err = _check(tmp_path, {**plain, "min_damping": 3.5e38}, capsys, dtype="float32")
    assert (
        "`optimizers.0.min_damping` = 3.5e+38: λ is at least it, and CG adds λv in float32, "
        "which holds at most 3.403e+38" in err
    ), err
    err = _check(tmp_path, {**FLOORED, "min_damping_cases": 1e300}, capsys, dtype="float32")
    assert (
        "`optimizers.0.min_damping_cases` = 1e+300 (floored): the first step's λ floor "
        "min_damping_cases / the first batch = 1e+300 / 10 = 1e+299 is beyond the parameters' "
        "dtype (at most 3.403e+38)" in err
    ), err
    raw = raw_config(tmp_path, [{**FLOORED, "min_damping_cases": 1e300}], budget={"steps": 2})
    path = tmp_path / "f64.yaml"
    path.write_text(yaml.safe_dump(raw))  # float64 (raw_config's): 1e299 is in range
    assert main(["run", str(path), "--quiet", "--out", str(tmp_path / "f64")]) == 0
    capsys.readouterr()


def test_floor19_a_whole_set_floor_is_checked_once_the_set_is_loaded(tmp_path):
    """Fails on main (unknown key). With batch_size null the first batch is the N loaded
    cases: damping 0.02 < 2.5 / 100 is refused by the runner's checks after loading."""
    entry = {**FLOORED, "batch_size": None, "damping": 0.02}
    for key in ("batch_growth", "curvature_fraction"):
        del entry[key]
    cfg = parse_config(raw_config(tmp_path, [entry]))
    ds = load_dataset("npz", path=cfg.data.path)
    objective = loop.make_objective(cfg.task, cfg.loss.name, cfg.loss.reduction, "npz")
    (msg,) = loop._data_problems(cfg, ds, objective)
    assert msg.startswith(
        "`optimizers.0.damping` = 0.02 (floored) is below the first step's λ floor "
        "min_damping_cases / the first batch = 2.5 / 100 = 0.025"
    ), msg


# -- end to end ----------------------------------------------------------------------------------


def test_floor19_cli_run_never_lets_lambda_below_c_over_the_batch(tmp_path, capsys):
    """Fails on main (exit 2: unknown key). `hessfree run` on a growing batch: exit 0, the
    start line names the floor, and in every metrics line after a step the floor HF applied
    is c / the logged batch and λ (used and next) is at or above it; the loss fell."""
    raw = raw_config(tmp_path, [FLOORED], budget={"steps": 12}, eval={"every_steps": 1})
    path = tmp_path / "floor.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["run", str(path), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "λ floor 2.5 / batch (0.25 at 10)" in out, out
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if r["step"] > 0]
    assert len(steps) == 12
    for r in steps:
        floor = C / r["batch_size"]
        assert r["hf_damping_floor"] == floor, r
        assert r["hf_damping"] >= floor and r["hf_next_damping"] >= floor, r
    assert steps[-1]["batch_size"] == exact_size(10, Fraction("1.3"), 11, N)
    assert records[-1]["train_loss"] < records[0]["train_loss"]


# -- data parallel: the global batch ------------------------------------------------------------


def test_floor19_two_ranks_take_the_floor_of_the_global_batch(tmp_path):
    """Fails on main (both ranks exit 2). Two gloo ranks, each with half of every batch: the
    floor is c / the whole batch (not / a rank's half), the same on both (HessianFree checks
    that the ranks' settings agree), and the run equals the one-process run."""
    from test_train_distributed import assert_same_training, finish, launch, reference, write_config

    hf = {
        "name": "hessianfree", "cg_max_iter": 10, "batch_size": 8, "batch_growth": 1.25,
        "precond": None, "batch_multiple": 2, "curvature_fraction": 0.5,
        "min_damping_cases": 2.0, "relative_min_damping": 0.0,
    }  # fmt: skip
    config = write_config(tmp_path, optimizers=[hf], budget={"steps": 8}, eval={"every_steps": 1})
    ranks = [tmp_path / "rank0", tmp_path / "rank1"]
    procs = launch(config, ranks, "--out", "run")
    reference(config, tmp_path / "ref")
    for code, err in finish(procs):
        assert code == 0, err
    assert_same_training(ranks[0] / "run", tmp_path / "ref", labels=("hessianfree",))
    records = read_metrics(ranks[0] / "run" / "metrics.jsonl")
    floors = [(r["batch_size"], r["hf_damping_floor"]) for r in records if r["step"] > 0]
    sizes = [exact_size(8, Fraction("1.25"), k, 48, 2) for k in range(8)]
    assert sizes == [8, 10, 12, 14, 18, 24, 30, 38]
    assert floors == [(b, 2.0 / b) for b in sizes]


# -- a resume after a step cut short says so -----------------------------------------------------

_INT64_MAX = 2**63 - 1
NOTE = "was ended early (by budget.seconds or a second signal"


@pytest.mark.timeout(60)
def test_floor19_resume_after_a_step_cut_by_seconds_notes_it(tmp_path, capsys):
    """Fails on main (the resume said nothing: runner18's "Noticed, left" (c)). An endless HF
    call (``max_iter`` 2**63 - 1) ended by ``budget.seconds``: the checkpoint records the cut
    step, and the resume under a larger budget prints one ``hessfree: warning:`` line naming
    it; the resume's own cut is recorded in turn."""
    hf = {"name": "hessianfree", "max_iter": _INT64_MAX, "tolerance_grad": 0.0,
          "tolerance_change": 0.0}  # fmt: skip
    config = write_tiny(tmp_path, optimizers=[hf], budget={"seconds": 0.3})
    run = tmp_path / "run"
    assert main(["run", str(config), "--quiet", "--out", str(run)]) == 0
    assert NOTE not in capsys.readouterr().err
    ckpt = load_checkpoint(run / "checkpoints" / "hessianfree.pt")
    assert ckpt["stop_reason"] == "seconds" and ckpt["step"] >= 1
    summary = json.loads((run / "summary.json").read_text())["optimizers"]["hessianfree"]
    more = f"budget.seconds={summary['seconds'] + 0.3!r}"
    assert main(["run", "--resume", str(run), "--quiet", more]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if NOTE in line]
    assert lines == [
        f"hessfree: warning: hessianfree's step {ckpt['step']} was ended early (by "
        "budget.seconds or a second signal: L-BFGS at an evaluation, HF between the steps of "
        "its call), so it continues from that step's consistent state, but not bit-identically "
        f"to a run whose step {ckpt['step']} ran whole."
    ], err
    assert ckpt["last_cut_step"] == ckpt["step"]
    again = load_checkpoint(run / "checkpoints" / "hessianfree.pt")
    assert again["step"] > ckpt["step"] and again["last_cut_step"] == again["step"]


@pytest.mark.timeout(60)
def test_floor19_resume_after_a_step_cut_by_a_second_signal_notes_it(tmp_path, monkeypatch, capsys):
    """Fails on main (no note). runner18's endless L-BFGS step, cut by a second SIGINT at
    its 8th evaluation (exit 130, checkpoint after step 1): the checkpoint records step 1 as
    cut and the resume says so once; a finished run resumed again (nothing to continue) and
    a step that was not cut say nothing."""
    import os
    import signal

    calls = []
    step = loop.take_step

    class Signalling:
        def __init__(self, objective):
            self.objective = objective

        def loss(self, outputs, targets):
            calls.append(1)
            if len(calls) in (5, 8):
                os.kill(os.getpid(), signal.SIGINT)
            return self.objective.loss(outputs, targets)

    def take_step(spec, optimizer, model, objective, *args, **kwargs):
        return step(spec, optimizer, model, Signalling(objective), *args, **kwargs)

    monkeypatch.setattr(loop, "take_step", take_step)
    lbfgs = {"name": "lbfgs", "max_iter": _INT64_MAX, "tolerance_grad": 0.0,
             "tolerance_change": 0.0, "history_size": 5}  # fmt: skip
    config = write_tiny(tmp_path, optimizers=[lbfgs], batch_size=None, budget={"steps": 3})
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run)]) == 130
    capsys.readouterr()
    ckpt = load_checkpoint(run / "checkpoints" / "lbfgs.pt")
    assert ckpt["step"] == 1
    monkeypatch.setattr(loop, "take_step", step)
    # the resumed steps are endless too: a small seconds budget ends the second step
    assert main(["run", "--resume", str(run), "--quiet", "budget.seconds=0.3"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if NOTE in line] == [
        f"hessfree: warning: lbfgs's step 1 {NOTE}: L-BFGS at an evaluation, HF between the "
        "steps of its call), so it continues from that step's consistent state, but not "
        "bit-identically to a run whose step 1 ran whole."
    ], err
    assert ckpt["last_cut_step"] == 1
    assert main(["run", "--resume", str(run), "--quiet", "budget.seconds=0.3"]) == 0
    assert NOTE not in capsys.readouterr().err  # finished: nothing continues


def test_floor19_resume_after_whole_steps_gives_no_note(tmp_path):
    """A guard (passes on main): an ordinary interrupted run, every step whole, resumes with
    no ResumeWarning (a note there would be false) and its checkpoint records no cut."""
    import warnings

    plain = {k: v for k, v in FLOORED.items() if k != "min_damping_cases"}
    cfg = parse_config(raw_config(tmp_path, [plain]))
    runner = Runner(cfg, tmp_path / "run", progress=False, verbose=False)
    runner.on_step = lambda ev: ev.step == 5 and runner.request_stop()
    assert runner.run().status is RunStatus.INTERRUPTED
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "floored.pt")
    assert ckpt["step"] == 5 and ckpt.get("last_cut_step") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        resumed = Runner(cfg, tmp_path / "run", resume=True, progress=False, verbose=False)
        assert resumed.run().status is RunStatus.COMPLETED


def test_resume_warnings_come_from_rank_0_only(tmp_path):
    """Every rank restores the same checkpoint: under torchrun each used to print the same
    ResumeWarning (floor19's "Noticed, left"); rank 0 speaks for the run, as it does for the
    progress lines."""
    import warnings

    from hessfree.train.parallel import Group

    cfg = parse_config(raw_config(tmp_path, [FLOORED]))
    runner = Runner(cfg, tmp_path / "run", progress=False, verbose=False)
    for rank, expected in ((0, 1), (1, 0)):
        runner.group = Group(rank=rank, world_size=2)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            runner._warn_resume("checkpoint 'x' was written with other arithmetic")
        assert [w.category for w in seen] == [ResumeWarning] * expected
