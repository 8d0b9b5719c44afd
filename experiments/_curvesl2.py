"""CURVES at 330 s: the late phases' L2 at the third phase's real length in steps (#14, "curvesl2")

``configs/curves_autoencoder.yaml``'s HF row wins training error at 330 s (quiet: 2.44 against
Adam's 3.15) but not test error (7.21 against SGD-momentum's 6.73): its test error is lowest
~145 s in and rises from there. "curvestest" raced third-phase variants for a CPU budget that
under load bought only ~42 % of the phase. This script races them for the phase's real length
in *steps*: the quiet reproduction's HF row took 2,273 steps, 1,100 + 250 in the first two
phases, so 923 in the third. Interleaved (slices of ``STEPS / SLICES`` steps per contender, a
shuffled order per slice, the errors off the clock), 1 torch thread, and each contender's CPU
seconds (``time.thread_time``) are reported beside its train and test error (the config's
``squared_error`` on the first 5,000 training cases and the first 5,000 test images, as the
runner's ``eval_sets`` and ``reproduce.py`` report them).

* ``save P2``: from ``_curves_grow.py``'s state (the first phase after 1,100 steps), 250 steps of
  the second phase ``P2`` (``PHASE2``: the shipped one, or it at another L2), a fresh optimizer,
  as the runner's switch builds one; weights, batch generator and CPU seconds are saved to
  ``CURVESL2_DIR/p2-P2.pt``.
* ``race STEPS SLICES names [--seed S]``: each contender (``THIRD``: a second-phase state and a
  third-phase entry) from its state, a fresh optimizer at the batch the second phase reached.
  ``--seed S`` draws the batches from a fresh permutation seeded with ``S`` instead of the
  saved generator (the same sequence for every contender either way).

    OPENBLAS_NUM_THREADS=1 python experiments/_curves_grow.py save 1100
    OPENBLAS_NUM_THREADS=1 python experiments/_curvesl2.py save ship
    OPENBLAS_NUM_THREADS=1 python experiments/_curvesl2.py save wd1e-4
    OPENBLAS_NUM_THREADS=1 python experiments/_curvesl2.py race 923 8 "s3;wd2e-4;p2wd1e-4" [--save]
"""

from __future__ import annotations

import copy
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import RawLog  # noqa: E402
from _curves_grow import STATE as FIRST_STATE  # noqa: E402
from _curves_grow import _setup, _stepper  # noqa: E402
from _curves_growlate import SHIP, SHIP3L2  # noqa: E402

from hessfree.train.evaluation import evaluate  # noqa: E402
from hessfree.train.optimizers import build_optimizer  # noqa: E402

DIR = Path(os.environ.get("CURVESL2_DIR", "/tmp/curvesl2"))
PHASE2 = {  # the second phase as shipped (L2 2e-5) and at a larger L2
    "ship": SHIP,
    "wd1e-4": dict(SHIP, weight_decay=1e-4),
    "wd2e-4": dict(SHIP, weight_decay=2e-4),
}


def _third(p2: str = "ship", **kw) -> tuple[str, dict]:
    return p2, dict(copy.deepcopy(SHIP3L2), **kw)


# name: (second-phase state, third-phase entry); ``s3`` is the config's row as shipped
THIRD: dict[str, tuple[str, dict]] = {
    "s3": _third(),
    "wd2e-4": _third(weight_decay=2e-4),
    "wd3e-4": _third(weight_decay=3e-4),
    "p2wd1e-4": _third("wd1e-4"),  # L2 1e-4 from the second phase on
    "p2wd1e-4wd2e-4": _third("wd1e-4", weight_decay=2e-4),
    "p2wd2e-4wd2e-4": _third("wd2e-4", weight_decay=2e-4),
    "cap8k": _third(batch_max=8000),
    "cap20k": _third(batch_max=20000),
    "wd2e-4cap8k": _third(weight_decay=2e-4, batch_max=8000),
}


def _path(p2: str) -> Path:
    return DIR / f"p2-{p2}.pt"


def save(p2: str, log) -> None:
    first = torch.load(FIRST_STATE, weights_only=False)
    cfg, runner, error = _setup([dict(copy.deepcopy(PHASE2[p2]), label=p2)])
    leaf = cfg.optimizers[0]
    model = copy.deepcopy(runner.model)
    model.load_state_dict(first["model"])
    model.train()
    opt = build_optimizer(leaf, model.parameters(), model)
    gen = torch.Generator()
    gen.set_state(first["gen"])
    state = {"step": 0, "perm": first["perm"].clone(), "pos": first["pos"], "batch": 0}
    step = _stepper(runner, leaf, model, opt, gen, state)
    cpu = 0.0
    for i in range(250):
        t0 = time.thread_time()
        step()
        cpu += time.thread_time() - t0
        if (i + 1) % 50 == 0:
            log(f"{p2} phase-2 step {i + 1}: batch {state['batch']}, error {error(model):.3f}")
    DIR.mkdir(parents=True, exist_ok=True)
    keep = {"model": model.state_dict(), "gen": gen.get_state(), "perm": state["perm"]}
    torch.save(dict(keep, pos=state["pos"], batch=state["batch"], cpu=cpu), _path(p2))
    log(f"saved {_path(p2)} ({cpu:.0f} CPU s)")


def race(steps: int, slices: int, names: list[str], seed: int | None, log) -> None:
    saved = {p2: torch.load(_path(p2), weights_only=False) for p2 in {THIRD[n][0] for n in names}}
    entries = [dict(THIRD[n][1], label=n, batch_size=saved[THIRD[n][0]]["batch"]) for n in names]
    cfg, runner, error = _setup(entries)
    test_metric = f"test_{runner.objective.metric_name}"
    test_set = {"test": runner.eval_sets["test"]}

    def test_error(m: torch.nn.Module) -> float:
        return evaluate(m, runner.objective, test_set, cfg.eval.batch_size)[test_metric]

    runs = []
    for name, leaf in zip(names, cfg.optimizers, strict=True):
        s = saved[THIRD[name][0]]
        model = copy.deepcopy(runner.model)
        model.load_state_dict(s["model"])
        model.train()
        opt = build_optimizer(leaf, model.parameters(), model)
        gen = torch.Generator()
        if seed is None:
            gen.set_state(s["gen"])
            perm, pos = s["perm"].clone(), s["pos"]
        else:
            gen.manual_seed(seed)
            perm, pos = torch.randperm(runner.x_train.shape[0], generator=gen), 0
        state = {"step": 0, "perm": perm, "pos": pos, "batch": 0}
        step = _stepper(runner, leaf, model, opt, gen, state)
        start = (error(model), test_error(model))
        runs.append(dict(name=name, model=model, step=step, opt=opt, state=state, cpu=0.0,
                         rows=[], start=start))  # fmt: skip
    rng = random.Random(0)
    for j in range(1, slices + 1):
        end = round(steps * j / slices)
        order = list(runs)
        rng.shuffle(order)
        for r in order:
            while r["state"]["step"] < end:
                t0 = time.thread_time()
                r["step"]()
                r["cpu"] += time.thread_time() - t0
            e, t = error(r["model"]), test_error(r["model"])
            lam = r["opt"].last_step.damping
            r["rows"].append((end, e, t, r["cpu"], r["state"]["batch"], lam))
        log(
            f"slice {j} (step {end}): "
            + ", ".join(f"{r['name']} {r['rows'][-1][1]:.3f}/{r['rows'][-1][2]:.3f}" for r in runs)
        )
    log(
        f"{steps} third-phase steps each, {slices} slices; batches "
        f"{'as saved' if seed is None else f'seed {seed}'}; 1 thread; starts "
        + ", ".join(f"{r['name']} {r['start'][0]:.3f}/{r['start'][1]:.3f}" for r in runs)
    )
    base = runs[0]
    log(f"train / test error at slice ends (step: train/test, CPU s); ratio to {base['name']}")
    for r in runs:
        cells = " ".join(f"{k}:{e:.3f}/{t:.3f},{c:.0f}s" for k, e, t, c, _, _ in r["rows"])
        _, e, t, c, b, lam = r["rows"][-1]
        mins = min(r["rows"], key=lambda row: row[2])
        log(f"{r['name']:15s} {cells}")
        log(
            f"{r['name']:15s} final {e:.3f} / {t:.3f} ({e / base['rows'][-1][1]:.3f}x / "
            f"{t / base['rows'][-1][2]:.3f}x), best test {mins[2]:.3f} @ step {mins[0]}, "
            f"CPU {c:.0f} s, batch {b}, λ {lam:.2g}"
        )


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
        print(
            f"second phases (PHASE2): {', '.join(PHASE2)}; contenders (THIRD): {', '.join(THIRD)}"
        )
        sys.exit(0 if "-h" in argv or "--help" in argv else 2)
    if args[0] == "save" and args[1] not in PHASE2:
        sys.exit(f"unknown second phase {args[1]!r}; expected one of {', '.join(PHASE2)}")
    names = [n for n in args[3].split(";") if n] if args[0] == "race" else []
    unknown = [n for n in names if n not in THIRD]
    if unknown:
        sys.exit(f"unknown contender(s) {unknown}; expected some of {', '.join(THIRD)}")
    log(f"`{' '.join(sys.argv[1:])}`; load before {open('/proc/loadavg').read().split()[:3]}")
    if args[0] == "save":
        save(args[1], log)
    else:
        race(int(args[1]), int(args[2]), names, seed, log)
    log(f"load after {open('/proc/loadavg').read().split()[:3]}")
    if "--save" in argv:
        log.append_to(
            Path(__file__).resolve().parent / "results" / "2026-12-02-curvesl2.md",
            "CURVES at 330 s: the late phases' L2 at the third phase's length in steps (raw runs)",
        )


if __name__ == "__main__":
    main()
