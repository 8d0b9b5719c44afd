"""Growing batches in the runner (`batch_growth`, `batch_max`, `batch_multiple`,
`curvature_fraction`, `curvature_fraction_full_steps`): sizes against closed forms in exact
rational arithmetic, the cases drawn against a re-implementation of the runner's seeded
sampling, resume, validation (exit 2)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml
from test_train_loop import assert_same_params, final_params, tiny_npz, without_timing
from torch import Tensor

from hessfree.train import loop
from hessfree.train.cli import main
from hessfree.train.config import ConfigError, dump_config, parse_config
from hessfree.train.data import load_dataset
from hessfree.train.loop import Runner, RunStatus
from hessfree.train.metrics import read_metrics
from hessfree.train.stepping import batch_sizes, grown_batch_size

N = 100  # training cases of the tiny set below


def exact_size(start: int, growth: Fraction, k: int, largest: int, multiple: int = 1) -> int:
    """m ⌊min(B, b₀ gᵏ) / m⌋ in exact rational arithmetic (the oracle)."""
    size = min(Fraction(largest), start * growth**k)
    return min(multiple * math.floor(size / multiple), largest - largest % multiple)


@pytest.mark.parametrize(
    ("start", "growth", "largest", "multiple"),
    [(250, "1.1", 4000, 1), (100, "1.05", 4000, 1), (84, "1.1", 1347, 1), (100, "1.01", 5000, 1),
     (8, "1.5", 50, 4), (6, "1.3", 97, 2), (100, "1.21", 10**6, 1), (7, "1", 50, 1)],
)  # fmt: skip
def test_grown_batch_size_equals_the_exact_closed_form(start, growth, largest, multiple):
    g = Fraction(growth)
    for k in range(400):
        want = exact_size(start, g, k, largest, multiple)
        assert grown_batch_size(start, float(g), k, largest, multiple) == want, k


def test_grown_batch_size_saturates_without_overflow():
    assert grown_batch_size(250, 1.1, 10**12, 4000) == 4000
    assert grown_batch_size(2, 1e300, 3, 4000) == 4000


def entry(**keys):
    from hessfree.train.config import BudgetConfig, OptimizerConfig

    name = keys.pop("name", "hessianfree")
    return OptimizerConfig(
        name, name, {}, keys.pop("batch_size"), keys.pop("curvature_batch_size", None),
        BudgetConfig(), **keys,
    )  # fmt: skip


def test_curvature_fraction_is_the_rounded_share_then_all_once_the_batch_is_full():
    leaf = entry(batch_size=250, batch_growth=1.1, curvature_fraction=0.25)
    for k in range(40):
        b = exact_size(250, Fraction("1.1"), k, 4000)
        c = b if b == 4000 else max(1, round(Fraction(b) / 4))
        size, curvature, replicated = batch_sizes(leaf, 4000, False, k)
        assert (size, curvature, replicated) == (b, None if c == b else c, False)
    # a fixed batch keeps its fraction; a multiple rounds it; a capped batch keeps it too
    assert batch_sizes(entry(batch_size=100, curvature_fraction=0.3), 100, False, 7)[:2] == (
        100,
        30,
    )
    grow4 = entry(batch_size=8, batch_growth=1.5, batch_multiple=4, curvature_fraction=0.3)
    assert [batch_sizes(grow4, 50, False, k)[:2] for k in range(6)] == [
        (8, 4), (12, 4), (16, 4), (24, 8), (40, 12), (48, 16)
    ]  # fmt: skip
    capped = entry(batch_size=10, batch_growth=2.0, batch_max=40, curvature_fraction=0.5)
    assert batch_sizes(capped, 100, False, 9)[:2] == (40, 20)


@pytest.mark.parametrize("full_steps", [0, 1, 4, 7])
@pytest.mark.parametrize(
    ("start", "growth", "n", "multiple", "fraction"),
    [(250, "1.1", 4000, 1, 0.25), (8, "1.5", 48, 4, 0.3), (10, "1.3", 100, 1, 0.25)],
)
def test_curvature_fraction_full_steps_keeps_the_share_for_that_many_full_set_steps(
    start, growth, n, multiple, fraction, full_steps
):
    leaf = entry(batch_size=start, batch_growth=float(Fraction(growth)), batch_multiple=multiple,
                 curvature_fraction=fraction, curvature_fraction_full_steps=full_steps)  # fmt: skip
    sizes = [exact_size(start, Fraction(growth), k, n, multiple) for k in range(60)]
    first_full = sizes.index(n)  # the oracle: count the steps at the whole set
    for k, b in enumerate(sizes):
        share = multiple * max(1, round(Fraction(b) * Fraction(fraction) / multiple))
        c = b if b == n and k >= first_full + full_steps else share
        assert batch_sizes(leaf, n, False, k)[:2] == (b, None if c == b else c), k
    # steps on the whole set that took the share: exactly `full_steps`
    shared = [k for k in range(60) if sizes[k] == n and batch_sizes(leaf, n, False, k)[1]]
    assert shared == list(range(first_full, first_full + full_steps))
    assert batch_sizes(leaf, n, False, 10**9)[:2] == (n, None)


# -- the runner ------------------------------------------------------------------------------


def raw_config(tmp_path: Path, optimizers, **extra) -> dict:
    raw = {
        "name": "grow",
        "seed": 5,
        "num_threads": 1,
        "dtype": "float64",
        "data": {"name": "npz", "path": str(tiny_npz(tmp_path / "tiny.npz", n_train=N))},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "loss": {"name": "cross_entropy"},
        "optimizers": optimizers,
        "budget": {"steps": 14},
        "eval": {"every_steps": 3},
        "output": {"checkpoint_every": 4, "plots": False},
    }
    raw.update(extra)
    return raw


GROWING = [
    {"name": "hessianfree", "cg_max_iter": 5, "batch_size": 10, "batch_growth": 1.3,
     "curvature_fraction": 0.25},
    {"name": "adam", "lr": 0.01, "batch_size": 6, "batch_growth": 1.2, "batch_max": 30,
     "batch_multiple": 2},
]  # fmt: skip


def record_batches(monkeypatch) -> list[tuple[str, Tensor, Tensor | None]]:
    """Patch the runner's step to record (optimizer name, gradient inputs, curvature inputs)."""
    seen = []
    real = loop.take_step

    def spy(spec, optimizer, model, objective, group, batch, curvature):
        seen.append((spec.name, batch[0].clone(), None if curvature is None else curvature[0]))
        return real(spec, optimizer, model, objective, group, batch, curvature)

    monkeypatch.setattr(loop, "take_step", spy)
    return seen


def test_runner_draws_the_closed_form_sizes_from_the_seeded_permutations(tmp_path, monkeypatch):
    cfg = parse_config(raw_config(tmp_path, GROWING))
    seen = record_batches(monkeypatch)
    sizes: list[tuple[str, int]] = []
    runner = Runner(cfg, tmp_path / "run", progress=False, verbose=False)
    runner.on_step = lambda ev: sizes.append((ev.label, ev.batch_size))
    runner.run()
    x = load_dataset("npz", path=cfg.data.path).x_train.double()
    for label, opt in (("hessianfree", GROWING[0]), ("adam", GROWING[1])):
        g, start = Fraction(str(opt["batch_growth"])), opt["batch_size"]
        largest, m = opt.get("batch_max", N), opt.get("batch_multiple", 1)
        want = [exact_size(start, g, k, largest, m) for k in range(14)]
        assert [s for name, s in sizes if name == label] == want
        # the runner's sampling: a generator seeded with `seed`, one permutation per epoch,
        # consecutive slices, a new permutation when the next batch would run past the end
        gen, perm, pos = torch.Generator().manual_seed(cfg.seed), None, 0
        batches = [(b, c) for name, b, c in seen if name == label]
        for k, (b, (xb, cb)) in enumerate(zip(want, batches, strict=True)):
            if perm is None or pos + b > N:
                perm, pos = torch.randperm(N, generator=gen), 0
            idx = perm[pos : pos + b]
            pos += b
            assert torch.equal(xb, x[idx]), (label, k)
            if label == "hessianfree":
                c = b if b == N else max(1, round(Fraction(b) / 4))
                assert (cb is None) == (c == b) and (cb is None or torch.equal(cb, x[idx[:c]]))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    hf = [r for r in records if r["optimizer"] == "hessianfree"]
    assert hf[-1]["batch_size"] == N and hf[-1]["epoch"] == pytest.approx(
        sum(exact_size(10, Fraction("1.3"), k, N) for k in range(14)) / N
    )


LATE = {**GROWING[0], "curvature_fraction_full_steps": 3}  # step 9 is the first at N = 100


def test_runner_keeps_the_curvature_share_for_the_first_full_set_steps(tmp_path, monkeypatch):
    cfg = parse_config(raw_config(tmp_path, [LATE]))
    seen = record_batches(monkeypatch)
    Runner(cfg, tmp_path / "run", progress=False, verbose=False).run()
    sizes = [exact_size(10, Fraction("1.3"), k, N) for k in range(14)]
    assert sizes.index(N) == 9
    for k, (_, xb, cb) in enumerate(seen):
        assert len(xb) == sizes[k]
        c = sizes[k] if k >= 12 else max(1, round(Fraction(sizes[k]) / 4))
        if c == sizes[k]:
            assert cb is None, k
        else:  # the first c cases of the gradient batch
            assert torch.equal(cb, xb[:c]), k
    assert [k for k, (_, xb, cb) in enumerate(seen) if len(xb) == N and cb is not None] == [
        9, 10, 11
    ]  # fmt: skip


def test_phases_restart_the_schedule_at_the_phase_start(tmp_path, monkeypatch):
    raw = raw_config(
        tmp_path,
        [{"label": "two", "phases": [
            {"name": "adam", "batch_size": 10, "batch_growth": 2.0, "budget": {"steps": 3}},
            {"name": "sgd", "batch_size": 4, "batch_growth": 1.5},
        ]}],
        budget={"steps": 7},
    )  # fmt: skip
    sizes = []
    runner = Runner(parse_config(raw), tmp_path / "run", progress=False, verbose=False)
    runner.on_step = lambda ev: sizes.append(ev.batch_size)
    runner.run()
    assert sizes == [10, 20, 40, 4, 6, 9, 13]


@pytest.mark.parametrize(
    ("hf_entry", "hf_stop"),
    [(GROWING[0], 6), (LATE, 10)],  # LATE: stopped among the full-set steps with the share
    ids=["growing", "full_steps"],
)
def test_resumed_growing_run_takes_the_same_batches_and_ends_bit_identical(
    tmp_path, hf_entry, hf_stop
):
    cfg = parse_config(raw_config(tmp_path, [hf_entry, GROWING[1]]))
    full: list[tuple[str, int, int]] = []
    runner = Runner(cfg, tmp_path / "full", progress=False, verbose=False)
    runner.on_step = lambda ev: full.append((ev.label, ev.step, ev.batch_size))
    runner.run()

    part: list[tuple[str, int, int]] = []
    runner = Runner(cfg, tmp_path / "part", progress=False, verbose=False)

    def stop_mid_growth(ev):
        part.append((ev.label, ev.step, ev.batch_size))
        if (ev.label, ev.step) in (("hessianfree", hf_stop), ("adam", 9)):
            runner.request_stop()

    runner.on_step = stop_mid_growth
    assert runner.run().status is RunStatus.INTERRUPTED
    for _ in range(2):  # interrupted in each optimizer (6, 9, 10 are not checkpoint steps)
        resumed = Runner(cfg, tmp_path / "part", resume=True, progress=False, verbose=False)
        resumed.on_step = stop_mid_growth if _ == 0 else (
            lambda ev: part.append((ev.label, ev.step, ev.batch_size))
        )  # fmt: skip
        result = resumed.run()
    assert result.status is RunStatus.COMPLETED
    assert part == full
    for label in ("hessianfree", "adam"):
        full_params = final_params(tmp_path / "full", label)
        assert_same_params(full_params, final_params(tmp_path / "part", label))
    assert without_timing(read_metrics(tmp_path / "part" / "metrics.jsonl")) == without_timing(
        read_metrics(tmp_path / "full" / "metrics.jsonl")
    )


# -- validation ------------------------------------------------------------------------------


def minimal(entry: dict, **extra) -> dict:
    raw = {
        "data": {"name": "digits"},
        "model": {"name": "mlp"},
        "optimizers": [entry],
        "budget": {"steps": 5},
    }
    raw.update(extra)
    return raw


HF = {"name": "hessianfree"}


def hf(**keys) -> dict:
    return {"name": "hessianfree", "batch_size": 50, **keys}


FINITE = "must be a finite number >= 1"
FRACTION = "must be a number in (0, 1]"
STEPS = "must be an integer >= 0, the number of steps on the whole training set"
BAD = [
    # (entry keys, the key named, text the message must hold)
    (hf(batch_growth=0.9), "batch_growth", f"0.9: {FINITE}"),
    (hf(batch_growth=float("nan")), "batch_growth", f"nan: {FINITE}"),
    (hf(batch_growth=float("inf")), "batch_growth", f"inf: {FINITE}"),
    (hf(batch_growth="1.1"), "batch_growth", f"'1.1': {FINITE}"),
    (hf(batch_growth=True), "batch_growth", f"True: {FINITE}"),
    (hf(batch_growth=[1.1]), "batch_growth", f"[1.1]: {FINITE}"),
    (hf(batch_growth=1.1, batch_max=40), "batch_max", "40 is below the starting batch_size 50"),
    (hf(batch_growth=1.1, batch_max=0), "batch_max", "0: must be an integer >= 1 or null"),
    (hf(batch_growth=1.1, batch_max=2.5), "batch_max", "2.5: must be an integer"),
    (hf(batch_growth=1.1, batch_max=5000), "batch_max", "5000 exceeds the 1347 training cases"),
    (hf(batch_growth=1.1, batch_multiple=0), "batch_multiple", "0: must be an integer >= 1"),
    (
        hf(batch_growth=1.1, batch_multiple=8),
        "batch_size",
        "50 is not a multiple of `optimizers.0.batch_multiple` = 8; use 48 or 56",
    ),
    (hf(batch_max=100), "batch_max", "100 only applies to a growing batch"),
    (hf(batch_multiple=2), "batch_multiple", "2 only applies to a growing batch"),
    (hf(batch_size=None, batch_growth=1.1), "batch_growth", "batch_size is null (the whole"),
    (hf(curvature_fraction=0), "curvature_fraction", f"0: {FRACTION}"),
    (hf(curvature_fraction=1.5), "curvature_fraction", f"1.5: {FRACTION}"),
    (hf(curvature_fraction=float("nan")), "curvature_fraction", f"nan: {FRACTION}"),
    (hf(curvature_fraction="a"), "curvature_fraction", f"'a': {FRACTION}"),
    (
        hf(curvature_fraction=0.5, curvature_batch_size=10),
        "curvature_fraction",
        "both set the curvature batch; keep one",
    ),
    (
        {"name": "adam", "batch_size": 50, "curvature_fraction": 0.5},
        "curvature_fraction",
        "only applies to 'hessianfree', not 'adam'",
    ),
    *(
        (
            hf(batch_growth=1.1, curvature_fraction=0.25, curvature_fraction_full_steps=v),
            "curvature_fraction_full_steps",
            f"{shown}: {STEPS}",
        )
        for v, shown in ((-1, "-1"), (2.5, "2.5"), (True, "True"), ("4", "'4'"), ([4], "[4]"))
    ),  # fmt: skip
    (
        hf(batch_growth=1.1, curvature_fraction_full_steps=4),
        "curvature_fraction_full_steps",
        "= 4 keeps `curvature_fraction` on the whole training set, but "
        "`optimizers.0.curvature_fraction` is not set",
    ),
    (
        hf(curvature_fraction=0.25, curvature_fraction_full_steps=4),
        "curvature_fraction_full_steps",
        "4 only applies to a growing batch",
    ),
    (
        {"name": "adam", "batch_size": 50, "batch_growth": 1.1, "curvature_fraction_full_steps": 4},
        "curvature_fraction_full_steps",
        "only applies to 'hessianfree', not 'adam'",
    ),
    (
        hf(
            batch_growth=1.1,
            batch_max=1000,
            curvature_fraction=0.25,
            curvature_fraction_full_steps=4,
        ),
        "curvature_fraction_full_steps",
        "never becomes the whole training set (batch_max 1000 stops it at 1000 of the 1347 "
        "cases), so curvature_fraction applies on every step; remove the key or change "
        "batch_max",
    ),  # fmt: skip
    (
        hf(
            batch_growth=1.1,
            batch_multiple=2,
            curvature_fraction=0.25,
            curvature_fraction_full_steps=4,
        ),
        "curvature_fraction_full_steps",
        "(batch_multiple 2 rounds it down to 1346 of the 1347 cases)",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("entry_keys", "key", "text"), BAD)
def test_bad_schedule_values_are_refused_before_any_work_with_exit_2(
    entry_keys, key, text, tmp_path, capsys
):
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(entry_keys))
    (msg,) = info.value.problems
    assert f"`optimizers.0.{key}`" in msg and text in msg, msg
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(minimal(entry_keys)))
    assert main(["run", str(path), "--check"]) == 2
    assert key in capsys.readouterr().err


def test_batch_max_beyond_the_loaded_set_is_refused_after_loading(tmp_path):
    cfg = parse_config(raw_config(tmp_path, [{**GROWING[0], "batch_max": N + 1}]))
    ds = load_dataset("npz", path=cfg.data.path)
    objective = loop.make_objective(cfg.task, cfg.loss.name, cfg.loss.reduction, "npz")
    (msg,) = loop._data_problems(cfg, ds, objective)
    assert msg.startswith(f"`optimizers.0.batch_max` = {N + 1} (hessianfree) exceeds the {N}")


def test_schedule_round_trips_through_the_dump_and_plain_entries_keep_their_digest(tmp_path):
    cfg = parse_config(raw_config(tmp_path, [*GROWING, {"name": "sgd", "batch_size": 5}]))
    again = parse_config(yaml.safe_load(dump_config(cfg)), default_name="grow")
    assert again == cfg
    hf, adam, sgd = cfg.optimizers
    assert (hf.batch_growth, hf.curvature_fraction, hf.curvature_batch_size) == (1.3, 0.25, None)
    assert (adam.batch_max, adam.batch_multiple) == (30, 2)
    plain = yaml.safe_load(dump_config(cfg))["optimizers"][2]
    assert not {"batch_growth", "batch_max", "batch_multiple", "curvature_fraction"} & set(plain)
    assert "curvature_fraction_full_steps" not in yaml.safe_load(dump_config(cfg))["optimizers"][0]
    # the full-set steps with the share, in an entry and in a phase
    phased = {"label": "p", "phases": [{"name": "adam", "budget": {"steps": 2}}, LATE]}
    late = parse_config(raw_config(tmp_path, [LATE, phased]))
    dumped = yaml.safe_load(dump_config(late))["optimizers"]
    assert dumped[0]["curvature_fraction_full_steps"] == 3
    assert dumped[1]["phases"][1]["curvature_fraction_full_steps"] == 3
    assert parse_config(yaml.safe_load(dump_config(late)), default_name="grow") == late
    assert late.optimizers[1].phases[1].curvature_fraction_full_steps == 3
    # an entry's fraction replaces a top-level curvature_batch_size
    top = parse_config(raw_config(tmp_path, GROWING[:1], curvature_batch_size=4))
    assert top.optimizers[0].curvature_batch_size is None


def test_a_data_parallel_growing_batch_needs_a_multiple_of_the_processes(tmp_path):
    grow = {"name": "adam", "batch_size": 10, "batch_growth": 1.5}
    cfg = parse_config(raw_config(tmp_path, [grow, {**grow, "label": "b", "batch_multiple": 2}]))
    ds = load_dataset("npz", path=cfg.data.path)
    objective = loop.make_objective(cfg.task, cfg.loss.name, cfg.loss.reduction, "npz")
    assert loop._data_problems(cfg, ds, objective, world_size=1) == []
    (msg,) = loop._data_problems(cfg, ds, objective, world_size=2)
    assert msg.startswith(
        "`optimizers.0` (adam): batch_multiple 1 (growing batches round to it) is not a "
        "multiple of the 2 processes"
    )
    fixed = parse_config(raw_config(tmp_path, [hf(batch_size=10, curvature_fraction=0.3)]))
    (msg,) = loop._data_problems(fixed, ds, objective, world_size=2)
    assert "curvature_fraction 0.3 of batch_size 10 is 3 cases, not a multiple of the 2" in msg
