"""`HessianFree(params)` with no arguments on problems the scorecard does not have.

Each problem builds its model and data from a fixed seed (built-in or synthetic data only) and
runs ``HessianFree(params)`` exactly as a user would call it against the baseline such a user
would otherwise pick, from the same initial weights, interleaved in one process: the run with
the least stepping time so far takes the next step, so every contender gets the same wall-clock
budget under the same load. Evaluation (full-set loss, accuracy) is off the clock.

Recorded per run: errors and warnings, final loss, time to the best baseline's final loss,
and for HF the path of λ, CG iterations, rejected steps and non-finite events.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseen.py [problem ...] [--budget S]

Problems: logreg, cnn, gru, bn, scale, tied, f64. Writes a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import hessfree

torch.set_num_threads(1)

#: ``--variants``: non-default settings run beside the defaults on the mini-batch problems
VARIANTS: dict[str, dict] = {}
SETTINGS = {
    "rmd=0": {"relative_min_damping": 0.0},
    "precond=None": {"precond": None},
    "cg_max_iter=10": {"cg_max_iter": 10},
}


# ---------------------------------------------------------------------------------------------
# Interleaved runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    step: Callable[[], Any]
    evaluate: Callable[[], float]
    opt: Any = None
    clock: float = 0.0
    steps: int = 0
    failed: str = ""
    curve: list[tuple[float, float]] = field(default_factory=list)
    infos: list[Any] = field(default_factory=list)
    warns: list[str] = field(default_factory=list)
    rng: torch.Tensor | None = None  # the run's own CPU generator state (interleave's own_rng)


@contextlib.contextmanager
def _own_stream(r: Run, advance: bool = True) -> Any:
    """Torch's global CPU generator set to ``r``'s own state inside, put back after (where
    ``r.rng`` is set; else the runs share the global generator). ``advance=False``: what is
    drawn inside (an evaluation, at clock-dependent times) does not move ``r``'s stream."""
    if r.rng is None:
        yield
        return
    shared = torch.get_rng_state()
    torch.set_rng_state(r.rng)
    try:
        yield
    finally:
        if advance:
            r.rng = torch.get_rng_state()
        torch.set_rng_state(shared)


def interleave(
    runs: list[Run], budget: float, eval_every: float, own_rng: int | None = None
) -> None:
    """Advance the run with the least stepping time until every run has spent ``budget``.

    ``own_rng``: each run draws from its own copy of torch's global CPU generator, seeded with
    ``own_rng`` and swapped in around each of its steps, so what a run draws (Dropout masks,
    ``torch.rand`` in its closure) does not depend on the order the clock interleaves the runs
    in, and two runs of one rule draw the same masks; its evaluations (at clock-dependent
    times) draw from a copy of it and leave it where it was. ``None`` (the
    default, as the recorded results ran): the runs share the global generator, and two runs
    of one rule on a Dropout MLP ended 14x apart (``experiments/README.md``, "kfacfloor",
    "lstmrise"). The optimizer's own replay (``replay_rng``) saves and restores the global
    generator within a step, so it works either way; CUDA generators are not swapped.
    """
    for r in runs:
        if own_rng is not None:
            r.rng = torch.Generator().manual_seed(own_rng).get_state()
        with _own_stream(r, advance=False):
            r.curve.append((0.0, r.evaluate()))
    next_eval = {r.name: eval_every for r in runs}
    while True:
        live = [r for r in runs if not r.failed and r.clock < budget]
        if not live:
            break
        r = min(live, key=lambda r: r.clock)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            try:
                with _own_stream(r):
                    r.step()
            except Exception as err:  # noqa: BLE001 - a failing optimizer is a result
                r.failed = f"{type(err).__name__}: {str(err)[:160]}"
            r.clock += time.perf_counter() - t0
        r.warns += [f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught]
        r.steps += 1
        if r.opt is not None and isinstance(r.opt, hessfree.HessianFree):
            r.infos.append(r.opt.last_step)
        if r.clock >= next_eval[r.name] or r.clock >= budget or r.failed:
            next_eval[r.name] = r.clock + eval_every
            with _own_stream(r, advance=False):
                r.curve.append((r.clock, r.evaluate()))


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    for t, f in curve:
        if f <= target:
            return t
    return math.inf


def hf_summary(r: Run) -> str:
    if not r.infos:
        return ""
    lam = [i.damping for i in r.infos if math.isfinite(i.damping)]
    cg = [i.cg_iters for i in r.infos]
    rejected = sum(not i.accepted for i in r.infos)
    nonfinite = sum(str(i.status).startswith("non_finite") for i in r.infos)
    conv = sum(str(i.status) == "converged" for i in r.infos)
    path = "→".join(f"{x:.2g}" for x in _sample(lam, 5))
    return (
        f"λ {path}; CG med {statistics.median(cg):.0f} (max {max(cg)}); "
        f"rejected {rejected}/{len(r.infos)}; non-finite {nonfinite}; converged {conv}"
    )


def _sample(xs: list[float], k: int) -> list[float]:
    if len(xs) <= k:
        return xs
    idx = np.linspace(0, len(xs) - 1, k).round().astype(int)
    return [xs[i] for i in idx]


def report(title: str, runs: list[Run], ref: str | None, f_star: float | None = None) -> None:
    print(f"\n#### {title}\n")
    finals = {r.name: r.curve[-1][1] for r in runs}
    base = [r for r in runs if not r.name.startswith("HF")]
    best = min(base, key=lambda r: finals[r.name]) if base else None
    ref_run = next((r for r in runs if r.name == ref), best)
    off = f_star if f_star is not None else 0.0
    # target: the reference's loss at half the budget (its final loss is reached only at the end)
    half = ref_run.curve[-1][0] / 2 if ref_run else 0.0
    target = next((f for t, f in ref_run.curve if t >= half), None) if ref_run else None
    print(
        "| run | steps | final loss | f - f* | (f - f*) / ref's | t to ref's loss at ½ budget "
        "/ ref's | notes |"
    )
    print("|---|---|---|---|---|---|---|")
    t_ref = time_to(ref_run.curve, target) if ref_run else math.nan
    for r in runs:
        f = finals[r.name]
        gap = (f - off) / max(finals[ref_run.name] - off, 1e-300) if ref_run else math.nan
        tt = time_to(r.curve, target) / t_ref if ref_run and t_ref > 0 else math.nan
        notes = "; ".join(
            x
            for x in (
                r.failed,
                hf_summary(r),
                "warnings: " + " | ".join(sorted(set(r.warns))) if r.warns else "",
            )
            if x
        )
        print(
            f"| {r.name} | {r.steps} | {f:.7g} | {f - off:.3g} | {gap:.3g} | {tt:.3g} | {notes} |"
        )
    sys.stdout.flush()


def digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=dtype)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def lbfgs_step(opt: torch.optim.Optimizer, closure: Callable) -> Callable[[], Any]:
    return lambda: opt.step(closure)


# ---------------------------------------------------------------------------------------------
# (a) convex softmax regression, full batch, L2 in the loss; oracle: scipy's optimum
# ---------------------------------------------------------------------------------------------


def full_batch_run(
    name: str, opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Run:
    """A full-batch MSE run: the ``(loss, outputs)`` closure for the run of that name, else the
    LBFGS-style one (``zero_grad``, ``backward``, return the loss)."""

    def full() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    if name == "HF (loss, outputs)":

        def closure() -> Any:
            out = model(x)
            return nn.functional.mse_loss(out, y), out

    else:

        def closure() -> Any:
            opt.zero_grad()
            loss = full()
            loss.backward()
            return loss

    def evaluate() -> float:
        with torch.no_grad():
            return full().item()

    return Run(name, lbfgs_step(opt, closure), evaluate, opt)


def problem_logreg(budget: float) -> None:
    import scipy.optimize

    x, y, _, _ = digits(torch.float64)
    c = 1e-3  # L2, makes the optimum unique and the problem strongly convex
    n, d = x.shape
    k = 10

    def objective(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = x @ w + b
        return nn.functional.cross_entropy(out, y) + 0.5 * c * (w * w).sum()

    def fg(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(theta, requires_grad=True)
        f = objective(t[: d * k].view(d, k), t[d * k :])
        (g,) = torch.autograd.grad(f, t)
        return f.item(), g.numpy()

    res = scipy.optimize.minimize(
        fg, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
        options=dict(maxiter=20000, ftol=1e-15, gtol=1e-12),
    )  # fmt: skip
    f_star = float(res.fun)
    for dtype in (torch.float64, torch.float32):
        xs = x.to(dtype)
        runs = []
        for name in ("HF loss", "HF (loss, outputs)", "HF wd=", "LBFGS", "LBFGS strong_wolfe"):
            lin = nn.Linear(d, k).to(dtype)
            torch.manual_seed(1)
            nn.init.normal_(lin.weight, std=0.1)
            nn.init.zeros_(lin.bias)
            wd = name == "HF wd="
            if name.startswith("HF"):
                groups = [  # weight_decay on the weights only, as in the objective
                    {"params": [lin.weight], "weight_decay": c if wd else 0.0},
                    {"params": [lin.bias], "weight_decay": 0.0},
                ]
                opt = hessfree.HessianFree(groups)
            else:
                sw = "strong_wolfe" if "wolfe" in name else None
                opt = torch.optim.LBFGS(lin.parameters(), line_search_fn=sw)

            def full(lin: nn.Linear = lin, xs: torch.Tensor = xs) -> torch.Tensor:
                return (
                    nn.functional.cross_entropy(lin(xs), y)
                    + 0.5 * c * (lin.weight * lin.weight).sum()
                )

            if name == "HF (loss, outputs)":

                def closure(lin=lin, xs=xs) -> Any:
                    out = lin(xs)
                    loss = nn.functional.cross_entropy(out, y)
                    return loss + 0.5 * c * (lin.weight * lin.weight).sum(), out

            elif name == "HF wd=":

                def closure(lin=lin, xs=xs) -> Any:
                    out = lin(xs)
                    return nn.functional.cross_entropy(out, y), out

            else:

                def closure(opt=opt, full=full) -> Any:
                    opt.zero_grad()
                    loss = full()
                    loss.backward()
                    return loss

            def evaluate(full: Callable = full) -> float:
                with torch.no_grad():
                    return full().item()

            runs.append(Run(name, lbfgs_step(opt, closure), evaluate, opt))
        interleave(runs, budget, eval_every=0.0)
        report(
            f"(a) softmax regression on digits, L2 {c}, {dtype}; f* = {f_star:.10g} (scipy); "
            "ratios: (f - f*) over LBFGS's",
            runs,
            "LBFGS",
            f_star,
        )


# ---------------------------------------------------------------------------------------------
# (b) small CNN on digits, mini-batch; baseline Adam at three learning rates
# ---------------------------------------------------------------------------------------------


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    )


def train_set_loss(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss on the whole set in eval mode (BatchNorm's running statistics, no dropout),
    train mode restored after."""
    model.eval()
    with torch.no_grad():
        f = loss_fn(model(x), y).item()
    model.train()
    return f


def minibatch_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    loss_fn: Callable,
    hf: bool,
    mode: Callable[[], Any] = contextlib.nullcontext,
) -> Callable[[], None]:
    """A user's mini-batch step: ``batch`` cases drawn with replacement (generator seeded 1);
    HF gets a ``(loss, outputs)`` closure and steps inside ``mode()`` (a variant's context),
    anything else a plain backward and step."""
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        idx = torch.randint(len(y), (batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        if hf:

            def closure() -> Any:
                out = model(xb)
                return loss_fn(out, yb), out

            with mode():
                opt.step(closure)
        else:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()

    return step


def minibatch_problem(
    title: str,
    make: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    xt: torch.Tensor,
    yt: torch.Tensor,
    loss_fn: Callable,
    batch: int,
    budget: float,
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2),
    hf_batches: tuple[int, ...] | None = None,
    classify: bool = True,
    hf_variants: dict[str, dict] | None = None,
) -> None:
    hf_variants = hf_variants or VARIANTS
    torch.manual_seed(0)
    model0 = make()
    runs = []
    contenders: list[tuple[str, float, dict]] = [
        (f"HF (loss, outputs) b={b}", b, {}) for b in (hf_batches or (batch,))
    ]
    contenders += [(f"HF loss b={batch}", batch, {})]
    contenders += [  # not the defaults: what a setting changes, for the report
        (f"HF (loss, outputs) b={batch} {k}", batch, kw) for k, kw in (hf_variants or {}).items()
    ]
    contenders += [(f"Adam {lr:g}", lr, {}) for lr in lrs]
    for name, arg, kw in contenders:
        model = copy.deepcopy(model0)
        gen = torch.Generator().manual_seed(1)
        hf = name.startswith("HF")
        b = int(arg) if hf else batch
        opt = (
            hessfree.HessianFree(model.parameters(), **kw)
            if hf
            else torch.optim.Adam(model.parameters(), lr=arg)
        )

        def next_batch(gen: torch.Generator = gen, b: int = b) -> tuple[torch.Tensor, ...]:
            idx = torch.randint(len(y), (b,), generator=gen)
            return x[idx], y[idx]

        if name.startswith("HF (loss"):

            def step(model=model, opt=opt, next_batch=next_batch) -> None:
                xb, yb = next_batch()

                def closure() -> Any:
                    out = model(xb)
                    return loss_fn(out, yb), out

                opt.step(closure)

        else:

            def step(model=model, opt=opt, next_batch=next_batch) -> None:
                xb, yb = next_batch()

                def closure() -> Any:
                    opt.zero_grad()
                    loss = loss_fn(model(xb), yb)
                    loss.backward()
                    return loss

                opt.step(closure)

        def evaluate(model: nn.Module = model) -> float:
            return train_set_loss(model, loss_fn, x, y)

        r = Run(name, step, evaluate, opt)
        r.model = model  # type: ignore[attr-defined]
        runs.append(r)
    interleave(runs, budget, eval_every=budget / 20)
    report(title + " (full train-set loss)", runs, None)
    if classify:
        for r in runs:
            with torch.no_grad():
                r.model.eval()  # type: ignore[attr-defined]
                acc = (r.model(xt).argmax(1) == yt).float().mean().item()  # type: ignore[attr-defined]
            print(f"- {r.name}: test accuracy {acc:.3f}")


def problem_cnn(budget: float) -> None:
    x, y, xt, yt = digits()
    minibatch_problem(
        "(b) CNN (2 conv + linear, 3.6k params) on digits 8×8, batch 100",
        cnn, x, y, xt, yt, nn.functional.cross_entropy, 100, budget,
        hf_batches=(100, 500),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# (c) user-built nn.GRU / nn.LSTM sequence regression
# ---------------------------------------------------------------------------------------------


class SeqReg(nn.Module):
    def __init__(self, cell: type[nn.Module], hidden: int = 32) -> None:
        super().__init__()
        self.rnn = cell(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(u)
        return self.head(h[:, -1]).squeeze(-1)


def seq_data(n: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy sine segments with a random frequency; target: the value 3 steps after the end."""
    g = torch.Generator().manual_seed(seed)
    w = 0.2 + 0.6 * torch.rand(n, 1, generator=g)
    ph = 6.28 * torch.rand(n, 1, generator=g)
    s = torch.arange(t + 3, dtype=torch.float32)
    wave = torch.sin(w * s + ph)
    noise = 0.05 * torch.randn(n, t, generator=g)
    u = torch.stack([wave[:, :t] + noise, torch.zeros(n, t)], -1)
    u[:, -1, 1] = 1.0
    return u, wave[:, t + 2]


def problem_gru(budget: float) -> None:
    x, y = seq_data(1024, 30, 0)
    xt, yt = seq_data(256, 30, 1)
    for cell in (nn.GRU, nn.LSTM):
        minibatch_problem(
            f"(c) {cell.__name__}(2→32) sequence regression, T = 30, MSE, batch 128",
            lambda cell=cell: SeqReg(cell), x, y, xt, yt, nn.functional.mse_loss, 128, budget,
            classify=False,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# (d) BatchNorm and Dropout in train mode
# ---------------------------------------------------------------------------------------------


def problem_bn(budget: float) -> None:
    x, y, xt, yt = digits()

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10)
        )  # fmt: skip

    minibatch_problem(
        "(d) MLP 64-64-10 with BatchNorm + Dropout(0.2) in train mode, batch 100",
        make, x, y, xt, yt, nn.functional.cross_entropy, 100, budget,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# (e) loss scale: mean vs sum vs ×1e3 vs ×1e-3 (float64, full batch)
# ---------------------------------------------------------------------------------------------


def mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)


def problem_scale(budget: float, steps: int = 15) -> None:
    x, y, _, _ = digits(torch.float64)
    print("\n#### (e) loss scale: CE mean × s (s = 1, 1e3, 1e-3, N via reduction='sum'), float64\n")
    print("| closure | scale s | λ₀ / s | steps | final loss / s | max rel. param diff vs s = 1 "
          "| rejected | statuses |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    n = len(y)
    for style in ("loss", "(loss, outputs)"):
        ref = None
        for label, s in (("1", 1.0), ("1e3", 1e3), ("1e-3", 1e-3), ("sum", float(n))):
            model = mlp(torch.float64)
            opt = hessfree.HessianFree(model.parameters())

            def lossf(out: torch.Tensor, s: float = s, label: str = label) -> torch.Tensor:
                if label == "sum":
                    return nn.functional.cross_entropy(out, y, reduction="sum")
                return s * nn.functional.cross_entropy(out, y)

            if style == "loss":

                def closure(model=model, opt=opt, lossf=lossf) -> Any:
                    opt.zero_grad()
                    loss = lossf(model(x))
                    loss.backward()
                    return loss

            else:

                def closure(model=model, lossf=lossf) -> Any:
                    out = model(x)
                    return lossf(out), out

            infos = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(steps):
                    opt.step(closure)
                    infos.append(opt.last_step)
            theta = torch.cat([p.detach().flatten() for p in model.parameters()])
            if ref is None:
                ref = theta
            diff = ((theta - ref).abs().max() / ref.abs().max()).item()
            with torch.no_grad():
                final = lossf(model(x)).item() / s
            statuses = sorted({str(i.status) for i in infos})
            print(
                f"| {style} | {label} | {infos[0].damping / s:.6g} | {steps} | {final:.8g} | "
                f"{diff:.2e} | {sum(not i.accepted for i in infos)} | {', '.join(statuses)}"
                + (f"; warnings {len(caught)}" if caught else "")
                + " |"
            )
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# (f) frozen parameters and tied weights
# ---------------------------------------------------------------------------------------------


class TiedAE(nn.Module):
    """64-32-64 autoencoder, decoder weight = encoder weight transposed; a frozen input layer."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(64, 64)
        self.frozen.requires_grad_(False)
        self.enc = nn.Linear(64, 32)
        self.dec_bias = nn.Parameter(torch.zeros(64))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.enc(torch.tanh(self.frozen(u))))
        return h @ self.enc.weight + self.dec_bias


def problem_tied(budget: float) -> None:
    x, _, _, _ = digits()
    torch.manual_seed(0)
    model0 = TiedAE()
    runs = []
    for name in ("HF loss", "HF (loss, outputs)", "HF all params", "LBFGS", "Adam 1e-2"):
        model = copy.deepcopy(model0)
        params = list(model.parameters()) if name == "HF all params" else [
            p for p in model.parameters() if p.requires_grad
        ]  # fmt: skip
        if name.startswith("HF"):
            opt = hessfree.HessianFree(params)
        elif name == "LBFGS":
            opt = torch.optim.LBFGS(params)
        else:
            opt = torch.optim.Adam(params, lr=1e-2)

        r = full_batch_run(name, opt, model, x, x)
        r.model = model  # type: ignore[attr-defined]
        runs.append(r)
    interleave(runs, budget, eval_every=budget / 30)
    report("(f) tied-weight autoencoder 64-32-64 with a frozen 64×64 input layer, full batch",
           runs, "LBFGS")  # fmt: skip
    for r in runs:
        moved = (r.model.frozen.weight - model0.frozen.weight).abs().max().item()  # type: ignore[attr-defined]
        print(f"- {r.name}: frozen layer moved by {moved:.3g}")


# ---------------------------------------------------------------------------------------------
# (g) float64 parameters: a regression MLP to near machine precision
# ---------------------------------------------------------------------------------------------


def problem_f64(budget: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 2, generator=g, dtype=torch.float64) * 4 - 2
    y = (torch.sin(2 * x[:, 0]) * torch.cos(x[:, 1])).unsqueeze(1)
    torch.manual_seed(0)
    model0 = nn.Sequential(nn.Linear(2, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(),
                           nn.Linear(20, 1)).double()  # fmt: skip
    runs = []
    for name in ("HF loss", "HF (loss, outputs)", "LBFGS", "LBFGS strong_wolfe", "Adam 1e-2"):
        model = copy.deepcopy(model0)
        if name.startswith("HF"):
            opt = hessfree.HessianFree(model.parameters())
        elif name.startswith("LBFGS"):
            sw = "strong_wolfe" if "wolfe" in name else None
            opt = torch.optim.LBFGS(model.parameters(), line_search_fn=sw)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)

        runs.append(full_batch_run(name, opt, model, x, y))
    interleave(runs, budget, eval_every=budget / 30)
    report("(g) float64 MLP 2-20-20-1 regression (tanh), 400 points, full batch", runs, "LBFGS")


PROBLEMS = {
    "logreg": problem_logreg,
    "cnn": problem_cnn,
    "gru": problem_gru,
    "bn": problem_bn,
    "scale": problem_scale,
    "tied": problem_tied,
    "f64": problem_f64,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(PROBLEMS))
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of stepping per run")
    ap.add_argument("--variants", nargs="*", default=[], choices=list(SETTINGS))
    args = ap.parse_args()
    VARIANTS.update({k: SETTINGS[k] for k in args.variants})
    with open("/proc/loadavg") as f:
        print(f"load at start: {f.read().split()[:3]}")
    for name in args.problems:
        t0 = time.perf_counter()
        PROBLEMS[name](args.budget)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s wall)")
    with open("/proc/loadavg") as f:
        print(f"load at end: {f.read().split()[:3]}")


if __name__ == "__main__":
    main()
