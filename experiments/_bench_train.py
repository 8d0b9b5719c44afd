"""Section 3 of the benchmark: training loss against time for HF, Adam, SGD-momentum and L-BFGS.

Every optimizer gets the same time budget on its own copy of one initial model. The runs are
interleaved: the budget is cut into slices and in each slice every run (in a shuffled order)
steps until its own clock reaches the slice's end, so load from other processes on a shared
machine falls on all of them alike. A run's clock counts only its own steps; the full-training-set
loss after each slice is evaluated off the clock. Adam and SGD get a small learning-rate sweep
(the best run, by final training loss, is the one compared). Times to fixed training-loss targets
are read off the recorded curves.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from _bench_common import (
    CURVES_SIZES,
    Settings,
    advance,
    bce_sum_per_case,
    curves_images,
    fmt,
    md_table,
    save_png,
)
from _bench_steps import AE_DAMPING

from hessfree import HessianFree


@dataclass
class Task:
    key: str
    title: str
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: Callable
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    minibatch: int
    adam_lrs: tuple[float, ...]
    sgd_lrs: tuple[float, ...]
    hf: dict
    curvature_chunks: int
    targets: tuple[float, ...]
    budget: float
    notes: list[str] = field(default_factory=list)


def make_task(key: str, settings: Settings) -> Task:
    from hessfree.train.data import load_digits, make_mnist1d
    from hessfree.train.models import build_model

    torch.manual_seed(settings.seed)
    q = settings.quick
    if key == "curves":
        n = 2000 if q else 4000
        x = curves_images(n, settings.seed + 10)
        model = build_model(
            "autoencoder", input_shape=(1, 28, 28), layer_sizes=CURVES_SIZES, init="sparse"
        )
        return Task(
            key,
            f"CURVES autoencoder, {n} generated images",
            model,
            x,
            x.flatten(1),
            bce_sum_per_case,
            None,
            None,
            minibatch=200,
            adam_lrs=(1e-3, 3e-3) if q else (3e-4, 1e-3, 3e-3),
            sgd_lrs=(3e-3,) if q else (1e-3, 3e-3),
            hf=dict(curvature="ggn", damping=AE_DAMPING, cg_max_iter=50),
            curvature_chunks=4,
            targets=(150.0, 140.0, 100.0),
            budget=settings.ae_budget,
            notes=[
                "loss: BCE-with-logits summed over pixels, averaged over cases (training set); "
                "HF: gradient on the whole set, curvature on a quarter of it in turn (Martens 2010)"
            ],
        )
    if key == "mnist1d":
        ds = make_mnist1d()
        model = build_model(
            "mlp",
            input_shape=ds.input_shape,
            num_outputs=10,
            hidden_sizes=[256, 256],
            activation="tanh",
        )
        return Task(
            key,
            f"MNIST-1D MLP 40-256-256-10 (tanh), {len(ds.x_train)} training cases",
            model,
            ds.x_train,
            ds.y_train,
            F.cross_entropy,
            ds.x_test,
            ds.y_test,
            minibatch=100,
            adam_lrs=(1e-3, 3e-3) if q else (1e-3, 3e-3, 1e-2),
            sgd_lrs=(0.03,) if q else (0.03, 0.1),
            hf=dict(curvature="ggn", damping=1.0, cg_max_iter=50),
            curvature_chunks=1,
            targets=(1.0, 0.5, 0.2),
            budget=settings.clf_budget,
            notes=[
                "loss: cross-entropy (mean); HF: gradient and curvature on the whole training set"
            ],
        )
    if key == "digits":
        ds = load_digits()
        model = build_model(
            "mlp", input_shape=ds.input_shape, num_outputs=10, hidden_sizes=[100], activation="tanh"
        )
        return Task(
            key,
            f"digits MLP 64-100-10 (tanh), {len(ds.x_train)} training cases",
            model,
            ds.x_train,
            ds.y_train,
            F.cross_entropy,
            ds.x_test,
            ds.y_test,
            minibatch=100,
            adam_lrs=(3e-3, 1e-2) if q else (1e-3, 3e-3, 1e-2),
            sgd_lrs=(0.1,) if q else (0.1, 0.3),
            hf=dict(curvature="ggn", damping=1.0, cg_max_iter=50),
            curvature_chunks=1,
            targets=(0.3, 0.1, 0.03),
            budget=settings.clf_budget,
            notes=[
                "loss: cross-entropy (mean); HF: gradient and curvature on the whole training set"
            ],
        )
    raise ValueError(key)


@dataclass
class Run:
    name: str
    family: str
    step: Callable[[], None]
    model: torch.nn.Module
    clock: float = 0.0
    steps: int = 0
    curve: list[tuple[float, float]] = field(default_factory=list)
    failed: str = ""


def _runs(task: Task, device: str) -> list[Run]:
    x, y, loss_fn = task.x, task.y, task.loss
    n = x.shape[0]
    runs = []

    # ---- Hessian-free: full-batch gradient, curvature on chunks in turn ----
    m = copy.deepcopy(task.model)
    opt = HessianFree(m.parameters(), **task.hf)
    chunks = list(range(task.curvature_chunks))
    counter = {"k": 0}

    def hf_closure(m=m):
        out = m(x)
        return loss_fn(out, y), out

    def hf_step(opt=opt, m=m):
        if task.curvature_chunks > 1:
            c = chunks[counter["k"] % len(chunks)]
            counter["k"] += 1
            sl = slice(c * n // len(chunks), (c + 1) * n // len(chunks))

            def curv(m=m, sl=sl):
                out = m(x[sl])
                return loss_fn(out, y[sl]), out

            opt.step(hf_closure, curv)
        else:
            opt.step(hf_closure)

    runs.append(Run("HF", "HF", hf_step, m))

    # ---- minibatch Adam and SGD-momentum, a reshuffled epoch at a time ----
    def minibatch_run(name, family, make_opt):
        mm = copy.deepcopy(task.model)
        o = make_opt(mm.parameters())
        gen = torch.Generator().manual_seed(0)
        state = {"perm": torch.randperm(n, generator=gen), "i": 0}

        def step(mm=mm, o=o):
            if state["i"] + task.minibatch > n:
                state["perm"], state["i"] = torch.randperm(n, generator=gen), 0
            idx = state["perm"][state["i"] : state["i"] + task.minibatch].to(x.device)
            state["i"] += task.minibatch
            o.zero_grad(set_to_none=True)
            loss_fn(mm(x[idx]), y[idx]).backward()
            o.step()

        runs.append(Run(name, family, step, mm))

    for lr in task.adam_lrs:
        minibatch_run(f"Adam lr={lr:g}", "Adam", lambda p, lr=lr: torch.optim.Adam(p, lr=lr))
    for lr in task.sgd_lrs:
        minibatch_run(
            f"SGD-m lr={lr:g}",
            "SGD-momentum",
            lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
        )

    # ---- full-batch L-BFGS ----
    ml = copy.deepcopy(task.model)
    lb = torch.optim.LBFGS(
        ml.parameters(), lr=1.0, max_iter=5, history_size=20, line_search_fn="strong_wolfe"
    )

    def lb_closure(ml=ml, lb=lb):
        lb.zero_grad(set_to_none=True)
        loss = loss_fn(ml(x), y)
        loss.backward()
        return loss

    runs.append(Run("L-BFGS", "L-BFGS", lambda lb=lb, c=lb_closure: lb.step(c), ml))
    return runs


@torch.no_grad()
def _train_loss(task: Task, model: torch.nn.Module) -> float:
    return float(task.loss(model(task.x), task.y))


@torch.no_grad()
def _test_accuracy(task: Task, model: torch.nn.Module) -> float:
    if task.x_test is None:
        return math.nan
    return float((model(task.x_test).argmax(1) == task.y_test).float().mean())


def run_task(task: Task, settings: Settings, log: Callable[[str], None]) -> dict:
    device = settings.device
    task.model.to(device)
    task.x, task.y = task.x.to(device), task.y.to(device)
    if task.x_test is not None:
        task.x_test, task.y_test = task.x_test.to(device), task.y_test.to(device)
    runs = _runs(task, device)
    init = _train_loss(task, task.model)
    for r in runs:
        r.curve.append((0.0, init))
    slices = 8 if settings.quick else 20
    rng = random.Random(settings.seed)
    for k in range(slices):
        end = task.budget * (k + 1) / slices
        order = list(runs)
        rng.shuffle(order)
        for r in order:
            if r.failed:
                continue
            advance(r, end, device)
            loss = _train_loss(task, r.model)
            r.curve.append((r.clock, loss if math.isfinite(loss) else math.inf))
    log(
        f"[train] {task.key}: "
        + ", ".join(f"{r.name} {r.curve[-1][1]:.3g} ({r.steps} steps)" for r in runs)
    )
    return dict(
        task=task,
        runs=runs,
        init=init,
        accuracy={r.name: _test_accuracy(task, r.model) for r in runs},
    )


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    """First recorded time at which the training loss is at or below ``target`` (inf if never)."""
    for t, loss in curve:
        if loss <= target:
            return t
    return math.inf


def best_of(runs: list[Run], family: str) -> Run | None:
    fam = [r for r in runs if r.family == family]
    return min(fam, key=lambda r: r.curve[-1][1]) if fam else None


def run(settings: Settings, log: Callable[[str], None]) -> dict:
    out = {}
    for key in ("curves", "mnist1d", "digits"):
        try:
            task = make_task(key, settings)
        except Exception as err:  # noqa: BLE001 - e.g. mnist1d not installed
            out[key] = dict(error=f"{type(err).__name__}: {err}")
            continue
        log(f"[train] {key}: budget {task.budget:g} s per optimizer")
        out[key] = run_task(task, settings, log)
    return out


def headline_rows(results: dict) -> list[list[str]]:
    """Per task: time of the best run of each family to the lowest target HF reached (or the
    first target if HF reached none), relative to HF's."""
    rows = []
    for key, r in results.items():
        if "error" in r:
            continue
        runs, targets = r["runs"], r["task"].targets
        hf = best_of(runs, "HF")
        reached = [tg for tg in targets if math.isfinite(time_to(hf.curve, tg))]
        target = min(reached) if reached else targets[0]
        t_hf = time_to(hf.curve, target)
        for fam in ("Adam", "SGD-momentum", "L-BFGS"):
            other = best_of(runs, fam)
            if other is None:
                continue
            t_o = time_to(other.curve, target)
            if math.isfinite(t_hf) and math.isfinite(t_o):
                val = f"{t_o / t_hf:.2f} ({t_o:.1f} s vs HF {t_hf:.1f} s)"
            elif math.isfinite(t_hf):
                val = f"{fam} never reached it (HF {t_hf:.1f} s)"
            elif math.isfinite(t_o):
                val = f"HF did not reach it; {fam} in {t_o:.1f} s"
            else:
                val = "neither reached it"
            rows.append(
                [
                    key,
                    f"time to train loss ≤ {target:g}: {fam} (best lr) / HF",
                    "none (> 1: HF faster)",
                    val,
                    "–",
                ]
            )
    return rows


def report(results: dict, plot_name: Callable[[str], str]) -> str:
    parts = [
        "## 3. Time to target\n",
        "Training loss on the whole training set against each optimizer's own wall-clock time "
        "(evaluation off the clock), equal budgets, runs interleaved in slices (see README). Adam "
        "and SGD-momentum (0.9) use minibatches and a small learning-rate sweep; the best run of "
        "each sweep (lowest final loss) is compared. L-BFGS: full batch, strong Wolfe, "
        "history 20.\n",
    ]
    for key, r in results.items():
        if "error" in r:
            parts.append(f"### {key}\n\nSkipped: {r['error']}\n")
            continue
        task, runs = r["task"], r["runs"]
        parts.append(f"### {task.title}\n")
        parts += [f"- {n}" for n in task.notes]
        parts.append(
            f"- budget {task.budget:g} s per run; minibatch {task.minibatch}; HF options "
            f"{task.hf}; initial loss {r['init']:.4g}"
        )
        parts.append(f"\n![{key}]({plot_name(key)})\n")
        best = {f: best_of(runs, f) for f in ("HF", "Adam", "SGD-momentum", "L-BFGS")}
        rows = []
        for run_ in runs:
            mark = (
                " (best)"
                if best.get(run_.family) is run_ and run_.family in ("Adam", "SGD-momentum")
                else ""
            )
            times = [time_to(run_.curve, tg) for tg in task.targets]
            rows.append(
                [
                    run_.name + mark,
                    f"{run_.curve[-1][1]:.4g}",
                    str(run_.steps),
                    *[fmt(tt, 1) if math.isfinite(tt) else "not reached" for tt in times],
                    fmt(r["accuracy"][run_.name], 3) if task.x_test is not None else "",
                    run_.failed,
                ]
            )
        parts.append(
            md_table(
                [
                    "optimizer",
                    "final train loss",
                    "steps",
                    *[f"s to ≤ {tg:g}" for tg in task.targets],
                    "test acc.",
                    "error",
                ],
                rows,
            )
        )
        parts.append("")
    return "\n".join(parts)


def plot(results: dict, plot_path: Callable[[str], str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "HF": "tab:blue",
        "Adam": "tab:orange",
        "SGD-momentum": "tab:green",
        "L-BFGS": "tab:red",
    }
    for key, r in results.items():
        if "error" in r:
            continue
        task, runs = r["task"], r["runs"]
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for fam, color in colors.items():
            best = best_of(runs, fam)
            for run_ in runs:
                if run_.family != fam:
                    continue
                t = [c[0] for c in run_.curve]
                y = [c[1] for c in run_.curve]
                if run_ is best:
                    ax.plot(t, y, color=color, lw=2, label=run_.name)
                else:
                    ax.plot(t, y, color=color, lw=0.8, alpha=0.35, ls="--")
        for tg in task.targets:
            ax.axhline(tg, color="k", lw=0.5, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer's own wall-clock time (s)")
        ax.set_ylabel("training loss")
        ax.set_title(task.title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_png(fig, plot_path(key), dpi=110)
        plt.close(fig)
