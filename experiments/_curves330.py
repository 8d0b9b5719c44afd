"""CURVES at the reproduction's size: HF regimes against Adam settings at 330 s (#14)

``configs/curves_autoencoder.yaml`` (20,000 generated CURVES images, 330 s per optimizer) is
run by ``experiments/reproduce.py`` one optimizer after another, so load from other processes
falls on each differently. This script races the config's own entries and candidate rows
*interleaved* instead, as ``scorecard.interleave`` does (the budget cut into slices; in each
slice every run, in a shuffled order, steps until its own clock reaches the slice's end; the
error off the clock), all from the config's initial weights, with the runner's own pieces:
the config's data, model, objective and metric (``Runner._setup``), each entry's optimizer
from ``build_optimizer`` and its steps from ``take_step`` on the batches the runner draws
(a permutation per entry from a generator seeded with the config's seed; HF's curvature batch
the first cases of the gradient batch), and a ``phases:`` entry switching optimizer when its
phase's seconds are spent. The error is the config's metric (``squared_error``) on the first
``eval.max_cases`` training cases, as ``reproductions.md`` reports it. 1 torch thread.

The contenders are YAML optimizer entries (``ENTRIES``), validated by ``parse_config`` with
the rest of the shipped config, so a row that wins here is the row to ship.

    OPENBLAS_NUM_THREADS=1 python experiments/_curves330.py 330 11 "hf-config;hf-k2r2;..." \
        [--save]
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _bench_common import RawLog  # noqa: E402

from hessfree.train.config import parse_config  # noqa: E402
from hessfree.train.evaluation import evaluate  # noqa: E402
from hessfree.train.loop import Runner  # noqa: E402
from hessfree.train.optimizers import build_optimizer  # noqa: E402
from hessfree.train.stepping import batch_sizes, take_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "curves_autoencoder.yaml"
WD = 2.0e-5  # the config's L2, in every entry but hf-grow's last phase (1e-4: curvestest)
# K-FAC-like HF (experiments/README.md, "CURVES at small batch", "hybrid (2026-12-01)")
K2R2 = {
    "name": "hessianfree",
    "weight_decay": WD,
    "cg_max_iter": 2,
    "min_damping": 0.3,
    "relative_min_damping": 0.0,
    "precond": {"name": "kfac", "rank": 32, "refresh": 2},
    "batch_size": 250,
    "curvature_batch_size": 62,
}


# the growing phase: from 250 cases x1.01 a step, curvature a quarter of the batch
GROW = dict(
    {k: v for k, v in K2R2.items() if k != "curvature_batch_size"},
    batch_growth=1.01,
    curvature_fraction=0.25,
)


def _adam(lr: float, batch: int) -> dict:
    return {"name": "adam", "lr": lr, "weight_decay": WD, "batch_size": batch}


ENTRIES: dict[str, dict] = {
    # the shipped HF row (issue 14's 2026-12-02 reproduction: 10.4 against Adam's 5.8)
    "hf-config": {
        "name": "hessianfree",
        "weight_decay": WD,
        "cg_max_iter": 10,
        "batch_size": 250,
        "curvature_batch_size": 62,
    },
    "hf-k2r2": K2R2,
    # Adam b 20 for 1/8 of the budget, then K2R2 from its weights (set per budget in ``entry``)
    "adam-then-hf": {"phases": [dict(_adam(1e-3, 20), budget={"seconds": None}), K2R2]},
    # K2R2 for 1,100 steps (~135 s quiet, where it stalls), then on a batch growing x1.01 a step
    # from 250, curvature a quarter of it (experiments/README.md, "curvesgrow (2026-12-02)"),
    # and from that phase's step 250 (batch 2,978) the same growth up to 4,000 cases with
    # λ >= 0.03 and L2 1e-4, a fresh optimizer (experiments/README.md, "curveslate",
    # "curveslate2", "curvestest")
    "hf-grow": {
        "label": "hessianfree",
        "phases": [
            dict(K2R2, budget={"steps": 1100}),
            dict(GROW, budget={"steps": 250}),
            dict(GROW, batch_size=2978, min_damping=0.03, batch_max=4000, weight_decay=1e-4),
        ],
    },
    # the former two phases: the second's growth for the rest of the run, λ >= 0.3
    "hf-grow2": {"phases": [dict(K2R2, budget={"steps": 1100}), GROW]},
    "adam-b200": _adam(1e-3, 200),  # the shipped Adam row
    "adam-b20": _adam(1e-3, 20),
    "adam-b50": _adam(1e-3, 50),
    "adam-b100": _adam(1e-3, 100),
    "adam-b100-l2-1e-4": dict(_adam(1e-3, 100), weight_decay=1e-4),  # the shipped second Adam
    "adam-b20-lr3e-4": _adam(3e-4, 20),
    "adam-b50-lr3e-4": _adam(3e-4, 50),
    "sgd-config": {
        "name": "sgd",
        "lr": 1e-2,
        "momentum": 0.9,
        "weight_decay": WD,
        "batch_size": 200,
    },
}


def entry(name: str, budget: float) -> dict:
    e = yaml.safe_load(yaml.safe_dump(ENTRIES[name]))  # a deep copy
    e["label"] = name
    if name == "adam-then-hf":
        e["phases"][0]["budget"]["seconds"] = budget / 8
    return e


def _run(runner: Runner, spec, seed: int) -> sc.Run:
    """A scorecard ``Run`` taking ``spec``'s steps as the runner would (phases included)."""
    model = copy.deepcopy(runner.model)
    model.load_state_dict(runner.initial_state)
    model.train()
    n = runner.x_train.shape[0]
    gen = torch.Generator().manual_seed(seed)
    state = {"phase": 0, "start": 0.0, "step": 0, "perm": None, "pos": 0}
    leaf = spec.leaves[0]
    box = {"leaf": leaf, "opt": build_optimizer(leaf, model.parameters(), model)}
    run = sc.Run(spec.label, spec.name, model, lambda: None)

    def step() -> None:
        leaves = spec.leaves
        if state["phase"] + 1 < len(leaves):  # the runner's phase budget: seconds or steps
            secs, steps = box["leaf"].budget.seconds, box["leaf"].budget.steps
            if (secs is not None and run.clock - state["start"] >= secs) or (
                steps is not None and state["step"] >= steps
            ):
                state["phase"] += 1
                state["start"], state["step"] = run.clock, 0
                box["leaf"] = leaves[state["phase"]]
                box["opt"] = build_optimizer(box["leaf"], model.parameters(), model)
        b, c, _ = batch_sizes(box["leaf"], n, False, state["step"])
        if state["perm"] is None or state["pos"] + b > n:
            state["perm"], state["pos"] = torch.randperm(n, generator=gen), 0
        idx = state["perm"][state["pos"] : state["pos"] + b]
        state["pos"] += b
        batch = (runner.x_train.index_select(0, idx), runner.t_train.index_select(0, idx))
        curv = None
        if c is not None:
            cidx = idx[:c]
            curv = (runner.x_train.index_select(0, cidx), runner.t_train.index_select(0, cidx))
        take_step(box["leaf"], box["opt"], model, runner.objective, runner.group, batch, curv)
        state["step"] += 1
        if box["leaf"].name == "hessianfree" and box["opt"].last_step is not None:
            run.lams.append((run.clock, box["opt"].last_step.damping))

    run.step = step
    run.lams = []
    run.phase_of = lambda: state["phase"]
    return run


def contenders(cfg) -> tuple[Runner, list[sc.Run]]:
    """The runner's data, model and objective for ``cfg``, and a ``Run`` per entry."""
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(cfg, Path(tmp) / "run", verbose=False, progress=False)
        runner._setup()
    return runner, [_run(runner, spec, cfg.seed) for spec in cfg.optimizers]


def race(budget: float, slices: int, names: list[str], log) -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["optimizers"] = [entry(n, budget) for n in names]
    raw["budget"] = {"seconds": budget}
    cfg = parse_config(raw, source="_curves330")
    runner, runs = contenders(cfg)
    torch.set_num_threads(1)  # _setup set the config's 2
    metric = f"train_{runner.objective.metric_name}"
    train = {"train": runner.eval_sets["train"]}

    def error(m: torch.nn.Module) -> float:
        return evaluate(m, runner.objective, train, cfg.eval.batch_size)[metric]

    task = sc.Task(
        "curves330",
        "CURVES 20,000",
        runner.model,
        runner.x_train,
        runner.t_train,
        runner.objective.loss,
        error,
        metric,
        budget=budget,
        sweep_budget=budget,
        adam=[],
        sgd=[],
        hf={},
    )
    steps_at: dict[str, list[int]] = {r.name: [] for r in runs}
    # record the steps at each slice end: wrap the error evaluation (called once a slice)
    inner = task.error

    def error_and_steps(m: torch.nn.Module) -> float:
        for r in runs:
            if r.model is m:
                steps_at[r.name].append(r.steps)
        return inner(m)

    task.error = error_and_steps
    sc.interleave(runs, task, budget, slices, "cpu")
    errs = {r.name: sc.final_error(r) for r in runs}
    # the best baseline; an HF-only race (HF variants against each other) divides by the first
    bases = [(e, n) for n, e in errs.items() if not n.startswith(("hf", "adam-then"))]
    best = min(bases) if bases else (errs[runs[0].name], runs[0].name)
    log(
        f"{cfg.data.num_train} images, error = {metric} on the first {cfg.eval.max_cases} "
        f"training cases, per slice of {budget / slices:g} s; ratio = final / best baseline "
        f"({best[1]} {best[0]:.3f})"
    )
    for r in runs:
        line = " ".join(f"{e:6.2f}" for _, e in r.curve[1:])
        log(f"{r.name:16s} {line}  steps {r.steps}  ratio {errs[r.name] / best[0]:.3f}")
    log("steps per slice; steps per second of its own clock")
    for r in runs:
        s = steps_at[r.name]
        per = [b - a for a, b in zip(s, s[1:], strict=False)]
        log(f"{r.name:16s} {' '.join(f'{p:6d}' for p in per)}  {r.steps / budget:.1f} steps/s")
    for r in runs:
        if r.lams:
            ends = [
                min(r.lams, key=lambda tl: abs(tl[0] - budget * k / slices))[1]
                for k in range(1, slices + 1)
            ]
            log(f"{r.name:16s} λ at slice ends: {' '.join(f'{v:.3g}' for v in ends)}")


def main() -> None:
    torch.set_num_threads(1)
    log = RawLog()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    log(f"`{' '.join(sys.argv[1:])}`; load before {os.getloadavg()}")
    race(float(args[0]), int(args[1]), [n for n in args[2].split(";") if n], log)
    log(f"load after {os.getloadavg()}")
    if "--save" in sys.argv:
        log.append_to(
            Path(__file__).resolve().parent / "results" / "2026-12-02-curves330.md",
            "CURVES at 330 s on 20,000 images: interleaved race (raw runs)",
        )


if __name__ == "__main__":
    main()
