"""``relative_min_damping='auto'`` with the release of λ when the floor lifts (#14, release).

``race TASK BUDGET [--quick] [--save]``: on TASK's no-argument regime (the scorecard's "HF
default" schedule), HF runs from the same weights, interleaved in 8 slices exactly as
``scorecard.interleave`` (1 torch thread): ``0`` (no floor), ``auto`` (the floor, and λ set to
the unfloored rule's value when it lifts) and, on a growing batch, ``auto no-release`` (λ
starts from the floor when it lifts); CURVES adds Adam (the scorecard's final: lr 1e-3, b 20;
b 100 with ``--quick``) as the reference; ``--cg=2,10`` adds ``auto`` with those CG caps.
Prints errors at ¼ / ½ / all of the budget, ratios to ``0`` (and to Adam), and λ at the steps
around the floor's release. TASK: ``curves``, ``mnist1d-grow`` (the tuned growing schedule, no
arguments), ``mnist1d``, ``digits`` (full batch), ``addition30`` (1000/100), ``swap``.

``steps TASK N``: the three runs for N steps each, round robin and off the clock (the
comparison a loaded machine cannot distort): per step the loss, λ, its floor and the
products; the steps where the runs' loss or λ differ are marked.

``hashes TASK=STEPS,...``: parameter hashes after STEPS steps of the default regime with
``relative_min_damping`` 0 and ``'auto'`` (equal: the trajectories are bitwise the same).

    OPENBLAS_NUM_THREADS=1 python experiments/_release_tasks.py race mnist1d-grow 30
    OPENBLAS_NUM_THREADS=1 python experiments/_release_tasks.py hashes swap=300,digits=100
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard as sc  # noqa: E402
from _bench_common import RawLog  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "2026-12-01-release.md"


def task_and_base(key: str, quick: bool) -> tuple[sc.Task, dict]:
    if key == "curves":
        task = sc.make_curves_task(quick=quick)
        return task, dict(batch=250, curvature_batch=62, kw={})
    if key == "swap":
        task = sc.make_swap_task(quick=False)
        return task, task.hf["defaults"]
    if key.startswith("addition"):
        task = sc.make_addition_task(int(key.removeprefix("addition")), 60.0)
        return task, task.hf_default_regime
    name = key.removesuffix("-grow")
    task = sc._classifier(name, quick)
    if key.endswith("-grow"):
        n = len(task.x)
        grow = f"{n // 16}×1.1/step, curvature ¼ to 4 full steps, cg≤10"
        schedule = {k: v for k, v in task.hf[grow].items() if k != "kw"}
        return task, dict(schedule, kw={})
    return task, task.hf_default_regime


def _optimizer(run: sc.Run):
    return next(
        c.cell_contents
        for c in run.step.__closure__
        if type(c.cell_contents).__name__ == "HessianFree"
    )


def race(key: str, budget: float, quick: bool, caps: list[int], log) -> None:
    task, base = task_and_base(key, quick)
    base = dict(base, kw=dict(base["kw"], relative_min_damping=0.0))  # the default before
    auto = dict(base, kw=dict(base["kw"], relative_min_damping="auto"))
    regs = {"0": base, "auto no-release": auto, "auto": auto}
    if not key.endswith("-grow"):  # a batch of fixed size: the floor never lifts
        del regs["auto no-release"]
    for cap in caps:  # the defaults' CG budget against a tuned row's
        regs[f"auto cg≤{cap}"] = dict(auto, kw=dict(auto["kw"], cg_max_iter=cap))
    runs = []
    if key == "curves":
        runs.append(sc.first_order_run(task, "Adam", 1e-3, 100 if quick else 20))
    hf = [sc.hf_run(task, n, "HF", r) for n, r in regs.items()]
    runs += hf
    trace: dict[str, list[tuple]] = {r.name: [] for r in hf}
    for r in hf:
        opt = _optimizer(r)
        if r.name == "auto no-release":
            opt._release_floor = lambda state, run, unfloored: None
        state = opt._global_state()

        def step(r=r, inner=r.step, opt=opt, state=state) -> None:
            inner()
            info = opt.last_step
            trace[r.name].append(
                (r.clock, info.damping, info.damping_floor, state.get("deterministic"), info.rho)
            )

        r.step = step
    sc.interleave(runs, task, budget, 8, "cpu")
    ref = sc.final_error(hf[0])
    adam = sc.final_error(runs[0]) if key == "curves" else None
    for r in runs:
        at = [sc.value_at(r.curve, budget * f) for f in (0.25, 0.5, 1.0)]
        extra = f"  ×Adam {sc.final_error(r) / adam:.3f}" if adam else ""
        log(
            f"{r.name:16s} error at ¼/½/all of {budget:g} s: "
            + " / ".join(f"{e:.3g}" for e in at)
            + f"  ×'0' {sc.final_error(r) / ref:.3f}{extra}  steps {r.steps}  {r.statuses}"
        )
    for name, seq in trace.items():
        lifted = next(
            (i for i in range(1, len(seq)) if seq[i][3] is True and seq[i - 1][3] is False), None
        )
        if lifted is None:
            floors = sorted({f"{s[2]:.3g}" for s in seq})[:4]
            log(f"{name:16s} floor never lifted; {len(seq)} steps, floors seen {floors}")
            continue
        window = seq[max(0, lifted - 2) : lifted + 8]
        log(
            f"{name:16s} deterministic from step {lifted} (t = {seq[lifted][0]:.1f} s); λ: "
            + " ".join(f"{s[1]:.2g}" for s in window)
        )


def steps(key: str, n: int, quick: bool, log) -> None:
    """Each regime for ``n`` steps (round robin, off the clock): per step the loss, λ, its
    floor and whether the objective is seen deterministic; the steps where the runs differ."""
    task, base = task_and_base(key, quick)
    base = dict(base, kw=dict(base["kw"], relative_min_damping=0.0))  # the default before
    auto = dict(base, kw=dict(base["kw"], relative_min_damping="auto"))
    names = ("0", "auto no-release", "auto") if key.endswith("-grow") else ("0", "auto")
    regs = (base, auto, auto) if key.endswith("-grow") else (base, auto)
    runs = [sc.hf_run(task, name, "HF", reg) for name, reg in zip(names, regs, strict=True)]
    opts = [_optimizer(r) for r in runs]
    if key.endswith("-grow"):
        opts[1]._release_floor = lambda state, run, unfloored: None
    rows: list[list[tuple]] = [[] for _ in runs]
    every = max(1, n // 6)
    errors: list[list[str]] = [[] for _ in runs]
    for k in range(n):
        for r, opt, row, err in zip(runs, opts, rows, errors, strict=True):
            r.step()
            info = opt.last_step
            det = opt._global_state().get("deterministic")
            row.append((info.loss, info.damping, info.damping_floor, det, info.cg_matvecs))
            if (k + 1) % every == 0:
                err.append(f"{task.error(r.model):.3g}")
    for k in range(n):
        cells = [row[k] for row in rows]
        mark = "" if len({c[:2] for c in cells}) == 1 else "  *"
        det = cells[-1][3]
        log(
            f"{k:3d} det {str(det):5s} "
            + "  ".join(f"f {c[0]:.3e} λ {c[1]:.2g} ≥{c[2]:.2g} mv {c[4]}" for c in cells)
            + mark
        )
    for nm, err in zip(names, errors, strict=True):
        log(f"{nm:16s} error every {every} steps: {' '.join(err)}")
    log(
        "final error: "
        + "  ".join(f"{nm} {task.error(r.model):.4g}" for nm, r in zip(names, runs, strict=True))
    )
    log(
        "products: "
        + "  ".join(f"{nm} {sum(c[4] for c in row)}" for nm, row in zip(names, rows, strict=True))
    )


def _digest(task: sc.Task, regime: dict, c: float | str, n: int) -> str:
    run = sc.hf_run(task, str(c), "HF", dict(regime, kw=dict(regime["kw"], relative_min_damping=c)))
    for _ in range(n):
        run.step()
    h = hashlib.sha256()
    for p in run.model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def hashes(spec: str, tuned: bool, log) -> None:
    """The default regime (and with ``tuned`` every tuned HF row not setting the argument)."""
    for kv in spec.split(","):
        key, n = kv.split("=")
        task, base = task_and_base(key, quick=key != "swap")
        regs = {"default": base}
        if tuned:
            regs |= {k: v for k, v in task.hf.items() if "relative_min_damping" not in v["kw"]}
        for name, regime in regs.items():
            a, b = (_digest(task, regime, c, int(n)) for c in (0.0, "auto"))
            same = "identical" if a == b else "DIFFERENT"
            log(f"{key:10s} {name[:44]:44s} {n} steps: 0 {a}  'auto' {b}  {same}")


def main() -> None:
    torch.set_num_threads(1)
    log = RawLog()
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    log(f"`{' '.join(sys.argv[1:])}`; load before {open('/proc/loadavg').read().strip()}")
    if args[0] == "hashes":
        hashes(args[1], "--tuned" in sys.argv, log)
    elif args[0] == "steps":
        steps(args[1], int(args[2]), "--quick" in sys.argv, log)
    else:
        caps = [int(c) for a in sys.argv if a.startswith("--cg=") for c in a[5:].split(",")]
        race(args[1], float(args[2]), "--quick" in sys.argv, caps, log)
    log(f"load after {open('/proc/loadavg').read().strip()}")
    if "--save" in sys.argv:
        log.append_to(RESULTS, "release (raw runs)")


if __name__ == "__main__":
    main()
