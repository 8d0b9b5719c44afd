"""CURVES at 330 s: the late phase, where the config's HF row stalls (#14, "curvesgrow")

The quiet reproduction (``experiments/README.md``, "curves330", "The quiet check") has the
config's HF row ahead of Adam b 100 from 60 s to 135 s and then flat at 8.0-9.3 (the noise
floor of steps that fit their 250-case batch) while Adam falls to 5.52. The late phase decides,
so this script tests it cheaply: ``save`` trains the config's HF row (``_curves330.K2R2``) for a
fixed number of steps (the quiet run's ~8.3 steps/s × 135 s; 1 torch thread, steps, not seconds,
so the starting point does not depend on load) and saves weights, optimizer state and the batch
generator; ``race`` continues from there, interleaved as ``scorecard.interleave`` does, with

* ``cont``: the same row continued with its saved optimizer state (what the config does), and
* any late entry (a YAML optimizer entry, ``LATE``): a fresh optimizer on the saved weights,
  as the runner's ``phases:`` switch builds one, its batch steps counted from the switch.

Caveat: the start is one run's state at one point; a variant that wins late must still be
checked over the whole 330 s (``_curves330.py``, which now knows the winning entries).

    OPENBLAS_NUM_THREADS=1 python experiments/_curves_grow.py save 1100
    OPENBLAS_NUM_THREADS=1 python experiments/_curves_grow.py race 180 12 "cont;b1000;..." [--save]
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _bench_common import RawLog  # noqa: E402
from _curves330 import CONFIG, K2R2  # noqa: E402

from hessfree.train.config import parse_config  # noqa: E402
from hessfree.train.evaluation import evaluate  # noqa: E402
from hessfree.train.loop import Runner  # noqa: E402
from hessfree.train.optimizers import build_optimizer  # noqa: E402
from hessfree.train.stepping import batch_sizes, take_step  # noqa: E402

STATE = Path(os.environ.get("CURVESGROW_STATE", "/tmp/curvesgrow/k2r2_state.pt"))


def _hf(**kw) -> dict:
    e = copy.deepcopy(K2R2)
    for k, v in kw.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


LATE: dict[str, dict] = {
    "cont": K2R2,  # placeholder: continued with its saved optimizer state
    "fresh": K2R2,  # the same row, fresh optimizer (what a phase switch costs)
    # larger fixed batches, curvature a quarter of it
    "b1000": _hf(batch_size=1000, curvature_batch_size=250),
    "b2000": _hf(batch_size=2000, curvature_batch_size=500),
    "b2000cg5": _hf(batch_size=2000, curvature_batch_size=500, cg_max_iter=5, min_damping=0.1),
    # the runner's geometric growth from 250, curvature a quarter
    "g1.005": _hf(batch_growth=1.005, curvature_batch_size=None, curvature_fraction=0.25),
    "g1.01": _hf(batch_growth=1.01, curvature_batch_size=None, curvature_fraction=0.25),
    "g1.01m5k": _hf(
        batch_growth=1.01, batch_max=5000, curvature_batch_size=None, curvature_fraction=0.25
    ),
    "g1.02m5k": _hf(
        batch_growth=1.02, batch_max=5000, curvature_batch_size=None, curvature_fraction=0.25
    ),
    # a larger λ floor at the same batch: smaller steps, less fitting of the batch
    "lam1": _hf(min_damping=1.0),
    "lam3": _hf(min_damping=3.0),
}
# the scorecard's smoothed norm test (Byrd et al. 2012; ``scorecard._NormTest``) from 250,
# curvature a quarter of the batch: (entry, _NormTest kwargs); not a runner option (yet)
NT = _hf(curvature_batch_size=None, curvature_fraction=0.25)
NORM_TESTS: dict[str, tuple[dict, dict]] = {
    "nt0.7": (NT, dict(theta=0.7, smooth=0.8, max_growth=2.0)),
    "nt0.9": (NT, dict(theta=0.9, smooth=0.8, max_growth=2.0)),
}
for _name, (_entry, _) in NORM_TESTS.items():
    LATE[_name] = _entry


def _setup(entries: list[dict]):
    raw = yaml.safe_load(CONFIG.read_text())
    raw["optimizers"] = entries
    cfg = parse_config(raw, source="_curves_grow")
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(cfg, Path(tmp) / "run", verbose=False, progress=False)
        runner._setup()
    torch.set_num_threads(1)
    metric = f"train_{runner.objective.metric_name}"
    train = {"train": runner.eval_sets["train"]}

    def error(m: torch.nn.Module) -> float:
        return evaluate(m, runner.objective, train, cfg.eval.batch_size)[metric]

    return cfg, runner, error


def _stepper(runner, leaf, model, opt, gen, state, test=None):
    n = runner.x_train.shape[0]
    loss = SimpleNamespace(loss=runner.objective.loss)  # what _norm_test_stats reads

    def step() -> None:
        b, c, _ = batch_sizes(leaf, n, False, state["step"])
        if test is not None:  # the norm test's size; curvature the entry's fraction of it
            b = min(n, int(state.setdefault("size", float(b))))
            c = max(1, round(b * leaf.curvature_fraction)) if b < n else None
        if state["perm"] is None or state["pos"] + b > n:
            state["perm"], state["pos"] = torch.randperm(n, generator=gen), 0
        idx = state["perm"][state["pos"] : state["pos"] + b]
        state["pos"] += b
        batch = (runner.x_train.index_select(0, idx), runner.t_train.index_select(0, idx))
        if test is not None and b < n and (state["step"] + 1) % test.every == 0:
            sigma2, mean2 = sc._norm_test_stats(loss, model, *batch, test.parts)
            state["size"] = min(test.next_size(sigma2, mean2, state["size"]), float(n))
        curv = None
        if c is not None:
            cidx = idx[:c]
            curv = (runner.x_train.index_select(0, cidx), runner.t_train.index_select(0, cidx))
        take_step(leaf, opt, model, runner.objective, runner.group, batch, curv)
        state["step"] += 1
        state["batch"] = b

    return step


def save(steps: int, log) -> None:
    entry = dict(copy.deepcopy(K2R2), label="k2r2")
    cfg, runner, error = _setup([entry])
    leaf = cfg.optimizers[0]
    model = copy.deepcopy(runner.model)
    model.load_state_dict(runner.initial_state)
    model.train()
    opt = build_optimizer(leaf, model.parameters(), model)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = {"step": 0, "perm": None, "pos": 0}
    step = _stepper(runner, leaf, model, opt, gen, state)
    for k in range(steps):
        step()
        if (k + 1) % 200 == 0 or k + 1 == steps:
            log(f"step {k + 1}: error {error(model):.3f}, λ {opt.last_step.damping:.3g}")
    STATE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "perm": state["perm"],
            "pos": state["pos"],
            "steps": steps,
        },
        STATE,
    )
    log(f"saved {STATE}")


def race(budget: float, slices: int, names: list[str], log) -> None:
    saved = torch.load(STATE, weights_only=False)
    entries = [dict(copy.deepcopy(LATE[n]), label=n) for n in names]
    cfg, runner, error = _setup(entries)
    runs = []
    for name, leaf in zip(names, cfg.optimizers, strict=True):
        model = copy.deepcopy(runner.model)
        model.load_state_dict(saved["model"])
        model.train()
        opt = build_optimizer(leaf, model.parameters(), model)
        if name == "cont":
            opt.load_state_dict(saved["opt"])
        gen = torch.Generator()
        gen.set_state(saved["gen"])
        state = {"step": 0, "perm": saved["perm"].clone(), "pos": saved["pos"], "batch": 0}
        test = sc._NormTest(**NORM_TESTS[name][1]) if name in NORM_TESTS else None
        r = sc.Run(name, "hf", model, _stepper(runner, leaf, model, opt, gen, state, test))
        r.state, r.opt = state, opt
        runs.append(r)
    task = sc.Task(
        "curvesgrow",
        "CURVES 20,000 late",
        runner.model,
        runner.x_train,
        runner.t_train,
        runner.objective.loss,
        error,
        "squared_error",
        budget=budget,
        sweep_budget=budget,
        adam=[],
        sgd=[],
        hf={},
    )
    extra: dict[str, list[str]] = {r.name: [] for r in runs}
    inner = task.error

    def error_and_state(m: torch.nn.Module) -> float:
        for r in runs:
            if r.model is m:
                ls = r.opt.last_step
                lam = f"{ls.damping:.2g}" if ls is not None else "-"
                extra[r.name].append(f"{r.steps}/{r.state.get('batch', 0)}/{lam}")
        return inner(m)

    task.error = error_and_state
    sc.interleave(runs, task, budget, slices, "cpu")
    start = runs[0].curve[0][1]
    log(
        f"from k2r2 after {saved['steps']} steps (error {start:.3f}); {budget:g} s more, "
        f"per slice of {budget / slices:g} s; 1 thread"
    )
    for r in runs:
        line = " ".join(f"{e:6.2f}" for _, e in r.curve[1:])
        log(f"{r.name:10s} {line}  steps {r.steps}  final {sc.final_error(r):.3f}")
    log("steps/batch/λ at slice ends")
    for r in runs:
        log(f"{r.name:10s} {' '.join(extra[r.name][1:])}")


def main() -> None:
    torch.set_num_threads(1)
    log = RawLog()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    log(f"`{' '.join(sys.argv[1:])}`; load before {open('/proc/loadavg').read().split()[:3]}")
    if args[0] == "save":
        save(int(args[1]), log)
    else:
        race(float(args[1]), int(args[2]), [n for n in args[3].split(";") if n], log)
    log(f"load after {open('/proc/loadavg').read().split()[:3]}")
    if "--save" in sys.argv:
        log.append_to(
            Path(__file__).resolve().parent / "results" / "2026-12-02-curvesgrow.md",
            "CURVES at 330 s: the late phase (raw runs)",
        )


if __name__ == "__main__":
    main()
