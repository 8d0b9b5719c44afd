"""CURVES at 330 s: the config's late growing-batch phase, HF against HF (#14, "curveslate")

``configs/curves_autoencoder.yaml``'s HF row trains 1,100 steps on 250 / 62 cases, then grows
its batch x1.01 a step from 250 (curvature on a quarter of it). Quiet, that second phase takes
~390-410 steps in the last ~210 s and ends at a batch of ~14,000, 0.6 steps/s; HF and Adam tie
at 330 s (0.96x, 1.03x). This script races variants of the late phase from one saved state:

* ``save K``: from ``_curves_grow.py``'s state (the first phase after 1,100 steps), ``K`` steps
  of the shipped second phase (a fresh optimizer on the saved weights, as the runner's switch
  builds one); weights, optimizer state, batch generator and the CPU seconds spent are saved.
* ``race CPU SLICES names [--seed S]``: from that state, each contender (``LATE``) for ``CPU``
  seconds of its own *CPU time* (``time.thread_time``; 1 torch thread, ``OPENBLAS_NUM_THREADS=1``,
  so a step's compute is on this thread): the clock other processes' load slows least, so the
  budget means the same amount of work in a loaded and in a quiet run (its scaling to the
  quiet 2-thread reproduction is stated with the results). Interleaved as
  ``scorecard.interleave`` (slices, a shuffled order per slice, the errors off the clock: the
  config's ``squared_error`` on the first 5,000 training cases and, since "curvestest", on the
  first 5,000 test images, as the runner's ``eval_sets`` and ``reproduce.py`` report them:
  the late phase overfits the 20,000 training images). ``--seed S`` draws the batches
  from a fresh permutation seeded with ``S`` instead of the saved generator (another sequence
  of batches from the same weights).

A contender (``LATE``: entry and mode) either continues the second phase with its optimizer
state and step counter (mode ``cont``: ``batch_max``, ``curvature_fraction`` are options of the
same phase), or is a third phase from the batch the second phase has reached: a fresh optimizer,
as the runner's ``phases:`` switch builds one (``third``), or the same settings with the second
phase's optimizer state carried over (``carry``: K-FAC factors, λ, the CG warm start; the
third phase's hyperparameters, not the saved ones, which ``load_state_dict`` would restore).
``third`` is the third phase as shipped before "curveslate2" (λ >= 0.1, cap 4,000); the
``3...`` entries change one setting of it; the config now ships ``3lam.03`` (λ >= 0.03),
also named ``s3``, and the ``s3...`` entries change one setting of that ("curvestest").

    OPENBLAS_NUM_THREADS=1 python experiments/_curves_grow.py save 1100
    OPENBLAS_NUM_THREADS=1 python experiments/_curves_growlate.py save 250
    OPENBLAS_NUM_THREADS=1 python experiments/_curves_growlate.py race 240 8 "third;3cap6k" [--save]
    OPENBLAS_NUM_THREADS=1 python experiments/_curves_growlate.py race 240 8 "..." --seed 1

The states go to ``CURVESGROW_STATE`` and ``CURVESLATE_STATE`` (defaults under ``/tmp``).
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import RawLog  # noqa: E402
from _curves330 import ENTRIES, GROW  # noqa: E402
from _curves_grow import STATE as FIRST_STATE  # noqa: E402
from _curves_grow import _setup, _stepper  # noqa: E402

from hessfree.train.evaluation import evaluate  # noqa: E402
from hessfree.train.optimizers import build_optimizer  # noqa: E402

STATE = Path(os.environ.get("CURVESLATE_STATE", "/tmp/curveslate/late_state.pt"))
SHIP = copy.deepcopy(GROW)  # the second phase as raced (and shipped, until step 250 of it)


# the third phase as shipped before "curveslate2" (λ >= 0.1, batch x1.01 from 2,978, at most
# 4,000): the baseline its races measured against; the config now ships its ``3lam.03``
THIRD = dict(copy.deepcopy(GROW), batch_size=2978, min_damping=0.1, batch_max=4000)
SHIP3 = dict(THIRD, min_damping=0.03)  # the third phase from "curveslate2" to "curvestest"
SHIP3L2 = dict(SHIP3, weight_decay=1e-4)  # ... and as shipped since "curvestest" (L2 1e-4)
assert ENTRIES["hf-grow"]["phases"][2] == SHIP3L2
MODES = ("cont", "third", "carry")


def _late(mode: str, base: dict = SHIP, **kw) -> tuple[dict, str]:
    e = copy.deepcopy(base)
    for k, v in kw.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e, mode


# name: (entry, mode): ``cont`` continues the second phase's optimizer state and step counter;
# ``third`` / ``carry`` start a third phase (fresh / carried state) from the batch the second
# phase reached: its ``batch_size`` is set at race time and ``batch_growth`` applies from there.
LATE: dict[str, tuple[dict, str]] = {
    "ship": _late("cont"),
    "cap4k": _late("cont", batch_max=4000),
    "cap6k": _late("cont", batch_max=6000),
    "cap8k": _late("cont", batch_max=8000),
    "curv8": _late("cont", curvature_fraction=0.125),
    "fresh": _late("third"),  # the same phase, fresh optimizer: what a switch costs
    "g1.005": _late("third", batch_growth=1.005),
    "cg5": _late("third", cg_max_iter=5),
    "cg5lam.1": _late("third", cg_max_iter=5, min_damping=0.1),
    "lam.1": _late("third", min_damping=0.1),
    "lam.1cap4k": _late("third", min_damping=0.1, batch_max=4000),
    "lam.03": _late("third", min_damping=0.03),
    "kfac1": _late("third", precond={"name": "kfac", "rank": 32, "refresh": 1}),
    # "curveslate2": the shipped third phase and one change each
    "third": _late("third", THIRD),
    "3carry": _late("carry", THIRD),  # the second phase's K-FAC factors, λ, warm start
    "3cap3k": _late("third", THIRD, batch_max=3000),  # ~fixed: 2,978, then 3,000
    "3cap6k": _late("third", THIRD, batch_max=6000),
    "3cap8k": _late("third", THIRD, batch_max=8000),
    "3cg5": _late("third", THIRD, cg_max_iter=5),
    "3curv8": _late("third", THIRD, curvature_fraction=0.125),
    "3lam.03": _late("third", THIRD, min_damping=0.03),
    "3lam.01": _late("third", THIRD, min_damping=0.01),
    "3lam.03cap3k": _late("third", THIRD, min_damping=0.03, batch_max=3000),
    "3lam.03curv8": _late("third", THIRD, min_damping=0.03, curvature_fraction=0.125),
    # "curvestest": the third phase as shipped since "curveslate2" (λ >= 0.03, cap 4,000) and
    # variants that might fit the 20,000 training images less (test error, not only train)
    "s3": _late("third", SHIP3),
    "s3lam.05": _late("third", SHIP3, min_damping=0.05),
    "s3lam.1": _late("third", SHIP3, min_damping=0.1),  # = ``third``
    "s3lam.2": _late("third", SHIP3, min_damping=0.2),
    "s3wd1e-4": _late("third", SHIP3, weight_decay=1e-4),
    "s3wd3e-4": _late("third", SHIP3, weight_decay=3e-4),
    "s3wd1e-3": _late("third", SHIP3, weight_decay=1e-3),
    "s3wd3e-3": _late("third", SHIP3, weight_decay=3e-3),
    "s3wd1e-2": _late("third", SHIP3, weight_decay=1e-2),
    "s3cap8k": _late("third", SHIP3, batch_max=8000),
    "s3cap20k": _late("third", SHIP3, batch_max=20000),
    "s3lam.1cap3k": _late("third", SHIP3, min_damping=0.1, batch_max=3000),
    "s3lam.1curv8": _late("third", SHIP3, min_damping=0.1, curvature_fraction=0.125),
    "s3lam.05curv8": _late("third", SHIP3, min_damping=0.05, curvature_fraction=0.125),
}
assert all(mode in MODES for _, mode in LATE.values())


def _cpu() -> float:
    return time.thread_time()


def save(k: int, log) -> None:
    first = torch.load(FIRST_STATE, weights_only=False)
    cfg, runner, error = _setup([dict(copy.deepcopy(SHIP), label="ship")])
    leaf = cfg.optimizers[0]
    model = copy.deepcopy(runner.model)
    model.load_state_dict(first["model"])
    model.train()
    opt = build_optimizer(leaf, model.parameters(), model)
    gen = torch.Generator()
    gen.set_state(first["gen"])
    state = {"step": 0, "perm": first["perm"].clone(), "pos": first["pos"], "batch": 0}
    step = _stepper(runner, leaf, model, opt, gen, state)
    log(f"from the first phase after {first['steps']} steps: error {error(model):.3f}")
    cpu = 0.0
    for i in range(k):
        t0 = _cpu()
        step()
        cpu += _cpu() - t0
        if (i + 1) % 50 == 0 or i + 1 == k:
            log(
                f"phase-2 step {i + 1}: batch {state['batch']}, error {error(model):.3f}, "
                f"λ {opt.last_step.damping:.3g}, CPU {cpu:.1f} s"
            )
    STATE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "perm": state["perm"],
            "pos": state["pos"],
            "steps": k,
            "batch": state["batch"],
            "cpu": cpu,
        },
        STATE,
    )
    log(f"saved {STATE}")


class _Run:
    def __init__(self, name, model, step, state, opt):
        self.name, self.model, self.step, self.state, self.opt = name, model, step, state, opt
        self.clock, self.steps, self.curve, self.marks, self.failed = 0.0, 0, [], [], ""
        self.test: list[float] = []  # test error at each slice end (as ``curve``: train)


def race(budget: float, slices: int, names: list[str], seed: int | None, log) -> None:
    saved = torch.load(STATE, weights_only=False)
    entries = []
    for n in names:
        e, mode = LATE[n]
        e = dict(copy.deepcopy(e), label=n)
        if mode != "cont":
            e["batch_size"] = saved["batch"]
        entries.append(e)
    cfg, runner, error = _setup(entries)
    n_train = runner.x_train.shape[0]
    # the test error as the runner reports it: the same metric on the first
    # ``eval.max_cases`` (5,000) test images, ``runner.eval_sets["test"]``
    test_metric = f"test_{runner.objective.metric_name}"
    test_set = {"test": runner.eval_sets["test"]}

    def test_error(m: torch.nn.Module) -> float:
        return evaluate(m, runner.objective, test_set, cfg.eval.batch_size)[test_metric]

    runs = []
    for name, leaf in zip(names, cfg.optimizers, strict=True):
        model = copy.deepcopy(runner.model)
        model.load_state_dict(saved["model"])
        model.train()
        opt = build_optimizer(leaf, model.parameters(), model)
        mode = LATE[name][1]
        cont = mode == "cont"
        if cont:
            opt.load_state_dict(saved["opt"])
        elif mode == "carry":  # the saved state under this phase's hyperparameters
            groups = opt.state_dict()["param_groups"]
            opt.load_state_dict(dict(saved["opt"], param_groups=groups))
        gen = torch.Generator()
        if seed is None:
            gen.set_state(saved["gen"])
            perm, pos = saved["perm"].clone(), saved["pos"]
        else:
            gen.manual_seed(seed)
            perm, pos = torch.randperm(n_train, generator=gen), 0
        state = {"step": saved["steps"] if cont else 0, "perm": perm, "pos": pos, "batch": 0}
        runs.append(_Run(name, model, _stepper(runner, leaf, model, opt, gen, state), state, opt))
    start, start_test = error(runs[0].model), test_error(runs[0].model)
    for r in runs:
        r.curve.append(start)
        r.test.append(start_test)
    rng = random.Random(0)
    for j in range(1, slices + 1):
        end = budget * j / slices
        order = list(runs)
        rng.shuffle(order)
        for r in order:
            if r.failed:
                continue
            try:
                while r.clock < end:
                    t0 = _cpu()
                    r.step()
                    r.clock += _cpu() - t0
                    r.steps += 1
            except Exception as err:  # noqa: BLE001 - a diverging run is a result
                r.failed = f"{type(err).__name__}: {str(err)[:100]}"
            e, t = error(r.model), test_error(r.model)
            r.curve.append(e if math.isfinite(e) else math.inf)
            r.test.append(t if math.isfinite(t) else math.inf)
            ls = r.opt.last_step
            r.marks.append(f"{r.steps}/{r.state['batch']}/{ls.damping:.2g}" if ls else "-")
        # each slice as it ends, so that a stopped race still leaves its results
        log(
            f"slice {j}: "
            + ", ".join(
                f"{r.name} {r.curve[-1]:.3f}/{r.test[-1]:.3f} ({r.marks[-1]})" for r in runs
            )
        )
    log(
        f"from phase-2 step {saved['steps']} (batch {saved['batch']}, error {start:.3f}, "
        f"test {start_test:.3f}, "
        f"{saved['cpu']:.0f} CPU s into phase 2); {budget:g} CPU s more each, {slices} slices; "
        f"batches {'as saved' if seed is None else f'seed {seed}'}; 1 thread"
    )
    log("train error at slice ends")
    for r in runs:
        line = " ".join(f"{e:6.3f}" for e in r.curve[1:])
        log(f"{r.name:9s} {line}  steps {r.steps}  final {r.curve[-1]:.3f} {r.failed}")
    log("test error at slice ends")
    for r in runs:
        line = " ".join(f"{e:6.3f}" for e in r.test[1:])
        log(f"{r.name:9s} {line}  min {min(r.test):.3f}  final {r.test[-1]:.3f}")
    log("steps/batch/λ at slice ends")
    for r in runs:
        log(f"{r.name:9s} {' '.join(r.marks)}")


def main() -> None:
    torch.set_num_threads(1)
    log = RawLog()
    argv = sys.argv[1:]
    seed = None
    if "--seed" in argv:
        i = argv.index("--seed")
        if i + 1 >= len(argv) or not argv[i + 1].isdigit():
            sys.exit(f"--seed needs a non-negative integer, got {argv[i + 1 : i + 2]!r}")
        seed = int(argv[i + 1])
        del argv[i : i + 2]
    args = [a for a in argv if not a.startswith("--")]
    shapes = {"save": 2, "race": 4}
    if "-h" in argv or "--help" in argv or not args or len(args) != shapes.get(args[0], -1):
        print(__doc__)
        print(f"contenders (LATE): {', '.join(LATE)}")
        sys.exit(0 if "-h" in argv or "--help" in argv else 2)
    if args[0] == "race":
        unknown = [n for n in args[3].split(";") if n and n not in LATE]
        if unknown:
            sys.exit(f"unknown contender(s) {unknown}; expected some of {', '.join(LATE)}")
    log(f"`{' '.join(sys.argv[1:])}`; load before {open('/proc/loadavg').read().split()[:3]}")
    if args[0] == "save":
        save(int(args[1]), log)
    else:
        race(float(args[1]), int(args[2]), [n for n in args[3].split(";") if n], seed, log)
    log(f"load after {open('/proc/loadavg').read().split()[:3]}")
    if "--save" in argv:
        log.append_to(
            Path(__file__).resolve().parent / "results" / "2026-12-02-curvestest.md",
            "CURVES at 330 s: the late phase's train and test error, HF against HF (raw runs)",
        )


if __name__ == "__main__":
    main()
