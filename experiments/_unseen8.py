"""`HessianFree(model.parameters())` with no arguments on seven problems no earlier pass had
tried (topic "unseen8"), the curvature operators on them against explicit float64 matrices,
and misuse.

Problems (each builds data, model and initial weights from a seed; seconds on 1 thread):

* ``deepsets``: a DeepSets model (Zaheer et al. 2017) held in a nested ``nn.ModuleDict``:
  φ (2-32-32, tanh) on each element, a masked mean over sets of 2-10 elements padded to 10
  (the mask is the inputs' third channel), ρ (32-32-1); target std(first coordinate) +
  mean(second²) of the set; MSE; 2,000 sets, 1,000 held out.
* ``tcn``: a causal temporal conv net, four ``nn.Conv1d`` (16 channels, kernel 3) with
  dilations 1, 2, 4, 8 and residuals, a linear head on the last step; one-step-ahead
  forecast of a sum of three sines plus an AR(2) process from windows of 64; MSE.
* ``siren``: a SIREN (Sitzmann et al. 2020), 2-48-48-1 with sin(30·) activations and the
  paper's initialisation, fitting sin(6x)cos(4y) + a Gaussian bump on a 24 × 24 grid (full
  batch); held out: 1,000 random points.
* ``oscfit``: a physics fit that is not a PINN: two damped oscillators
  a·e^{-γt}cos(ωt + φ) computed through complex exponentials, the parameters in an
  ``nn.ParameterDict`` (log γ, ω, a, φ), the loss a spectral misfit mean |rfft(x̂) − rfft(x)|²
  (``torch.fft``); 256 samples with noise 0.05; ω started 8 % off per seed; float64.
* ``ctc``: conv + GRU + linear over 24 frames → 6 classes (blank 0), ``F.ctc_loss`` against
  label sequences of 4 symbols from 1-5 (each held 2-4 frames in noisy one-hot inputs).
* ``cosemb``: a siamese MLP (64-64-16) on pairs of sklearn digits, ``cosine_embedding_loss``
  (margin 0.3; +1 for a same-class pair, −1 otherwise); 2,000 pairs, 1,000 held out.
* ``gamma``: a Gamma GLM with log link in float64 (a user's deviance loss
  mean(y e^{−η} + η), no closed form in the library), 2,000 × 8 design; f* from scipy.

Contenders (interleaved in one process by CPU time of their own ``step`` calls, same weights
and batch stream; wall time recorded too): ``HF`` = ``HessianFree(params)`` with an
LBFGS-style closure; ``HF lo`` = the ``(loss, outputs)`` closure; ``HF mb`` = ``(loss,
outputs)`` on a fresh batch of 250 per step; ``LBFGS sw`` = ``torch.optim.LBFGS(params,
line_search_fn='strong_wolfe')`` full batch; ``Adam <lr>`` on batches of 64 (``Adam256``:
256; ``Adamfb``: full batch). ``[fisher]`` after a name: ``curvature='fisher'``.

Parts: ``smoke`` (three steps per closure style), ``race``, ``trace`` (HF's per-step record),
``ops`` (operators against dense float64 matrices), ``misuse``.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseen8.py [problem ...] \
        [--part smoke|race|trace|ops|misuse] [--budget S] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from _unseen7 import _dense, _outcome, _rel, best_at, time_to
from _unseen7 import hf_notes as _hf_notes
from torch import nn

import hessfree

torch.set_num_threads(1)


@dataclass
class Problem:
    """``model``: initial weights; ``loss_fn(outputs, targets)``; ``data``: ``(inputs,
    targets)`` of the training set; ``n``: number of cases (None: full batch only);
    ``held_out(model)``: a held-out figure; ``fstar``: the optimum (reported as f − f*)."""

    title: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    data: tuple[Any, Any]
    n: int | None = None
    held_out: Callable[[nn.Module], float] | None = None
    fstar: float = 0.0

    def lo_of(self, m: nn.Module, idx: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data
        if idx is not None:
            x, y = x[idx], y[idx]
        out = m(x)
        return self.loss_fn(out, y), out

    def loss_of(self, m: nn.Module) -> torch.Tensor:
        return self.lo_of(m)[0]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def _mse_held_out(xt: torch.Tensor, yt: torch.Tensor) -> Callable[[nn.Module], float]:
    def held_out(m: nn.Module) -> float:
        with torch.no_grad():
            return F.mse_loss(m(xt), yt).item()

    return held_out


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------
class DeepSets(nn.Module):
    def __init__(self, d: int = 2, h: int = 32) -> None:
        super().__init__()
        phi = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
        rho = nn.ModuleDict({"hidden": nn.Linear(h, h), "out": nn.Linear(h, 1)})
        self.nets = nn.ModuleDict({"phi": phi, "rho": rho})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, mask = x[..., :-1], x[..., -1:]
        pooled = (self.nets["phi"](v) * mask).sum(1) / mask.sum(1)
        rho = self.nets["rho"]
        return rho["out"](torch.tanh(rho["hidden"](pooled))).squeeze(-1)


def sets_data(n: int, g: torch.Generator, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.randn(n, k, 2, generator=g)
    size = torch.randint(2, k + 1, (n,), generator=g)
    mask = (torch.arange(k)[None] < size[:, None]).float()
    cnt = mask.sum(1)
    m0 = (v[..., 0] * mask).sum(1) / cnt
    std = (((v[..., 0] - m0[:, None]) ** 2 * mask).sum(1) / cnt).sqrt()
    y = std + (v[..., 1] ** 2 * mask).sum(1) / cnt
    return torch.cat([v * mask[..., None], mask[..., None]], -1), y


def p_deepsets(seed: int) -> Problem:
    g = torch.Generator().manual_seed(1000)
    x, y = sets_data(2000, g)
    xt, yt = sets_data(1000, g)
    torch.manual_seed(seed)
    return Problem("DeepSets in a nested ModuleDict, masked mean over 2-10 elements, MSE",
                   DeepSets(), F.mse_loss, (x, y), n=2000,
                   held_out=_mse_held_out(xt, yt))  # fmt: skip


class TCN(nn.Module):
    def __init__(self, ch: int = 16, dilations: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, ch, 1)
        self.convs = nn.ModuleList(nn.Conv1d(ch, ch, 3, dilation=d) for d in dilations)
        self.head = nn.Linear(ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.unsqueeze(1))
        for conv in self.convs:
            h = h + torch.relu(conv(F.pad(h, (2 * conv.dilation[0], 0))))  # causal
        return self.head(h[:, :, -1]).squeeze(-1)


def series_windows(g: torch.Generator, length: int = 64) -> tuple[torch.Tensor, ...]:
    n_total = 3000 + length + 1
    t = torch.arange(n_total, dtype=torch.float32)
    s = torch.zeros(n_total)
    for f, a in zip(torch.rand(3, generator=g) * 0.2 + 0.02, (1.0, 0.6, 0.3), strict=True):
        s += a * torch.sin(f * t + 6.28 * torch.rand(1, generator=g))
    e = torch.randn(n_total, generator=g) * 0.1
    ar = torch.zeros(n_total)
    for i in range(2, n_total):
        ar[i] = 1.2 * ar[i - 1] - 0.4 * ar[i - 2] + e[i]
    s += ar
    win = s.unfold(0, length + 1, 1)
    x, y = win[:, :-1], win[:, -1]
    return x[:2000], y[:2000], x[2000:3000], y[2000:3000]


def p_tcn(seed: int) -> Problem:
    x, y, xt, yt = series_windows(torch.Generator().manual_seed(1000))
    torch.manual_seed(seed)
    return Problem("dilated causal TCN (dilations 1-8, residual), one-step forecast, MSE",
                   TCN(), F.mse_loss, (x, y), n=2000,
                   held_out=_mse_held_out(xt, yt))  # fmt: skip


class Siren(nn.Module):
    def __init__(self, h: int = 48, w0: float = 30.0) -> None:
        super().__init__()
        self.w0 = w0
        self.l1, self.l2, self.out = nn.Linear(2, h), nn.Linear(h, h), nn.Linear(h, 1)
        with torch.no_grad():
            self.l1.weight.uniform_(-1 / 2, 1 / 2)
            bound = math.sqrt(6 / h) / w0
            self.l2.weight.uniform_(-bound, bound)
            self.out.weight.uniform_(-bound * w0, bound * w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sin(self.w0 * self.l1(x))
        h = torch.sin(self.w0 * self.l2(h))
        return self.out(h).squeeze(-1)


def _field(p: torch.Tensor) -> torch.Tensor:
    x, y = p[:, 0], p[:, 1]
    bump = torch.exp(-((x - 0.3) ** 2 + (y + 0.2) ** 2) / 0.05)
    return torch.sin(6 * x) * torch.cos(4 * y) + bump


def p_siren(seed: int) -> Problem:
    lin = torch.linspace(-1, 1, 24)
    pts = torch.cartesian_prod(lin, lin)
    pt = torch.rand(1000, 2, generator=torch.Generator().manual_seed(1000)) * 2 - 1
    torch.manual_seed(seed)
    return Problem("SIREN 2-48-48-1, sin(30·), fit a 2-D field on a 24² grid (full batch)",
                   Siren(), F.mse_loss, (pts, _field(pts)),
                   held_out=_mse_held_out(pt, _field(pt)))  # fmt: skip


class Oscillators(nn.Module):
    """x̂(t) = Σ_k a_k e^{−γ_k t} cos(ω_k t + φ_k), through complex exponentials."""

    def __init__(self, omega: torch.Tensor) -> None:
        super().__init__()
        k = len(omega)
        self.p = nn.ParameterDict(
            {
                "log_gamma": nn.Parameter(torch.full((k,), -2.0, dtype=torch.float64)),
                "omega": nn.Parameter(omega.double()),
                "amp": nn.Parameter(torch.ones(k, dtype=torch.float64)),
                "phase": nn.Parameter(torch.zeros(k, dtype=torch.float64)),
            }
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        p = self.p
        s = torch.complex(-p["log_gamma"].exp(), p["omega"])
        c = p["amp"] * torch.exp(1j * p["phase"])
        return (c[:, None] * torch.exp(s[:, None] * t[None])).real.sum(0)


def spectral_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.fft.rfft(out) - torch.fft.rfft(y)).abs().pow(2).mean() / len(y)


OSC_TRUE = {"log_gamma": [-1.6, -2.8], "omega": [2.0, 3.3], "amp": [1.0, 0.7], "phase": [0.3, 1.4]}


def p_oscfit(seed: int) -> Problem:
    t = torch.linspace(0, 20, 256, dtype=torch.float64)
    truth = Oscillators(torch.tensor(OSC_TRUE["omega"]))
    with torch.no_grad():
        for k, v in OSC_TRUE.items():
            truth.p[k].copy_(torch.tensor(v))
        g = torch.Generator().manual_seed(1000)
        y = truth(t) + 0.05 * torch.randn(256, generator=g, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0]) * (1 if seed % 2 == 0 else -1)
    model = Oscillators(torch.tensor(OSC_TRUE["omega"]) * (1 + 0.08 * sign))
    fstar = _scipy_fstar(copy.deepcopy(truth), spectral_loss, (t, y))
    return Problem("two damped oscillators via complex exp, ParameterDict, rfft misfit, f64",
                   model, spectral_loss, (t, y), fstar=fstar)  # fmt: skip


def _scipy_fstar(model: nn.Module, loss_fn, data) -> float:
    """L-BFGS-B in float64 from ``model``'s parameters to a tight tolerance: f*."""
    params = list(model.parameters())
    sizes = [p.numel() for p in params]

    def fg(theta: np.ndarray) -> tuple[float, np.ndarray]:
        with torch.no_grad():
            for p, c in zip(params, torch.from_numpy(theta).split(sizes), strict=True):
                p.copy_(c.view_as(p))
        model.zero_grad()
        loss = loss_fn(model(data[0]), data[1])
        loss.backward()
        return loss.item(), torch.cat([p.grad.reshape(-1) for p in params]).double().numpy()

    x0 = torch.cat([p.detach().reshape(-1) for p in params]).double().numpy()
    res = scipy.optimize.minimize(
        fg,
        x0,
        jac=True,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000},  # fmt: skip
    )
    return float(res.fun)


class CTCNet(nn.Module):
    def __init__(self, d: int = 8, h: int = 32, classes: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, 16, 3, padding=1)
        self.rnn = nn.GRU(16, h, batch_first=True)
        self.head = nn.Linear(h, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.head(self.rnn(h)[0])  # (N, T, C) logits


def ctc_data(n: int, g: torch.Generator, T: int = 24, S: int = 4) -> tuple[torch.Tensor, ...]:
    labels = torch.randint(1, 6, (n, S), generator=g)
    frames = torch.zeros(n, T, dtype=torch.int64)
    for i in range(n):
        t = int(torch.randint(0, 3, (1,), generator=g))
        for s in range(S):
            d = int(torch.randint(2, 5, (1,), generator=g))
            frames[i, t : t + d] = labels[i, s]
            t += d + int(torch.randint(0, 2, (1,), generator=g))
    x = F.one_hot(frames, 8).float() + 0.3 * torch.randn(n, T, 8, generator=g)
    return x, labels


def ctc_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n, T = out.shape[:2]
    lp = out.log_softmax(-1).transpose(0, 1)
    return F.ctc_loss(lp, y, torch.full((n,), T), torch.full((n,), y.shape[1]))


def p_ctc(seed: int) -> Problem:
    g = torch.Generator().manual_seed(1000)
    x, y = ctc_data(2000, g)
    xt, yt = ctc_data(500, g)
    torch.manual_seed(seed)

    def held_out(m: nn.Module) -> float:
        with torch.no_grad():
            return ctc_loss(m(xt), yt).item()

    return Problem("conv + GRU + linear, CTC loss (4 symbols in 24 frames, blank 0)",
                   CTCNet(), ctc_loss, (x, y), n=2000, held_out=held_out)  # fmt: skip


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, 2, 64) -> (N, 2, 16)


def cosemb_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cosine_embedding_loss(out[:, 0], out[:, 1], y, margin=0.3)


def pairs(x: torch.Tensor, lab: torch.Tensor, n: int, g: torch.Generator):
    i = torch.randint(0, len(x), (n,), generator=g)
    same = torch.rand(n, generator=g) < 0.5
    j = torch.randint(0, len(x), (n,), generator=g)
    for k in torch.nonzero(same).flatten().tolist():  # a partner of the same class
        cand = torch.nonzero(lab == lab[i[k]]).flatten()
        j[k] = cand[int(torch.randint(0, len(cand), (1,), generator=g))]
    y = torch.where(lab[i] == lab[j], 1.0, -1.0)
    return torch.stack([x[i], x[j]], 1), y


def p_cosemb(seed: int) -> Problem:
    x, lab = _digits()
    g = torch.Generator().manual_seed(1000)
    xp, yp = pairs(x[:1300], lab[:1300], 2000, g)
    xt, yt = pairs(x[1300:], lab[1300:], 1000, g)
    torch.manual_seed(seed)

    def held_out(m: nn.Module) -> float:
        with torch.no_grad():
            return cosemb_loss(m(xt), yt).item()

    return Problem("siamese MLP on digit pairs, cosine_embedding_loss (margin 0.3)",
                   Siamese(), cosemb_loss, (xp, yp), n=2000, held_out=held_out)  # fmt: skip


def gamma_loss(eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gamma deviance with log link, up to constants: mean(y e^{−η} + η)."""
    return (y * torch.exp(-eta) + eta).mean()


class GLM(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(-1)


def p_gamma(seed: int) -> Problem:
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    x[:, :4] *= torch.tensor([3.0, 1.0, 0.3, 0.1], dtype=torch.float64)  # some scale spread
    beta = torch.linspace(-0.5, 0.5, 8, dtype=torch.float64)
    mean = torch.exp(x @ beta + 1.0)
    y = torch._standard_gamma(torch.full((2000,), 2.0, dtype=torch.float64), generator=g)
    y = y * mean / 2.0
    torch.manual_seed(seed)
    model = GLM(8)
    fstar = _scipy_fstar(copy.deepcopy(model), gamma_loss, (x, y))
    return Problem("Gamma GLM, log link, user's deviance loss, f64 (2000 × 8)",
                   model, gamma_loss, (x, y), fstar=fstar)  # fmt: skip


PROBLEMS: dict[str, Callable[[int], Problem]] = {
    "deepsets": p_deepsets,
    "tcn": p_tcn,
    "siren": p_siren,
    "oscfit": p_oscfit,
    "ctc": p_ctc,
    "cosemb": p_cosemb,
    "gamma": p_gamma,
}
VARIANTS: dict[str, dict] = {"fisher": {"curvature": "fisher"}, "none": {"precond": None}}


@contextlib.contextmanager
def _block_cap(name: str):
    """``[blk64]``: |H_ℓ| blocks formed for up to 64 outputs per example (the library: 16)."""
    if "[blk64]" not in name:
        yield
        return
    old = hessfree.curvature._MAX_BLOCK
    hessfree.curvature._MAX_BLOCK = 64
    try:
        yield
    finally:
        hessfree.curvature._MAX_BLOCK = old


# ------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    step: Callable[[], Any]
    evaluate: Callable[[], float]
    opt: Any = None
    model: Any = None
    clock: float = 0.0  # process_time of its own steps
    wall: float = 0.0
    steps: int = 0
    failed: str = ""
    curve: list[tuple[float, float]] = field(default_factory=list)
    infos: list[Any] = field(default_factory=list)
    warns: list[str] = field(default_factory=list)


def make_run(name: str, prob: Problem, seed: int) -> Run:
    model = copy.deepcopy(prob.model)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(100 + seed)  # the same batch stream for every run
    base = name.split("[")[0]
    if name.startswith("HF"):
        variant = name.split("[")[1][:-1] if "[" in name else ""
        opt: Any = hessfree.HessianFree(model.parameters(), **VARIANTS.get(variant, {}))
    elif name.startswith("Adam"):
        opt = torch.optim.Adam(params, lr=float(name.split()[1]))
    else:
        opt = torch.optim.LBFGS(params, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = prob.loss_of(model)
        loss.backward()
        return loss

    if base in ("HF", "LBFGS sw"):

        def step():
            return opt.step(closure)

    elif base == "HF lo":

        def step():
            with _block_cap(name):
                return opt.step(lambda: prob.lo_of(model))

    elif base == "HF mb":

        def step():
            idx = torch.randint(0, prob.n, (250,), generator=g)
            with _block_cap(name):
                return opt.step(lambda: prob.lo_of(model, idx))

    elif name.startswith("Adamfb"):

        def step():
            opt.step(closure)

    else:
        size = 256 if name.startswith("Adam256") else 64

        def step():
            idx = torch.randint(0, prob.n, (size,), generator=g)
            opt.zero_grad()
            loss = prob.lo_of(model, idx)[0]
            loss.backward()
            opt.step()

    def evaluate() -> float:
        with torch.no_grad():
            return prob.loss_of(model).item() - prob.fstar

    return Run(name, step, evaluate, opt, model)


def interleave(runs: list[Run], budget: float, eval_every: float) -> None:
    """Step the run with the least CPU time so far until each has spent ``budget``."""
    for r in runs:
        r.curve.append((0.0, r.evaluate()))
    next_eval = {r.name: eval_every for r in runs}
    while True:
        live = [r for r in runs if not r.failed and r.clock < budget]
        if not live:
            break
        r = min(live, key=lambda r: r.clock)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                r.step()
            except Exception as err:  # noqa: BLE001 - a failing optimizer is a result
                r.failed = f"{type(err).__name__}: {str(err)[:200]}"
            r.clock += time.process_time() - c0
            r.wall += time.perf_counter() - w0
        r.warns += [f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught]
        r.steps += 1
        if isinstance(r.opt, hessfree.HessianFree) and r.opt.last_step is not None:
            r.infos.append(r.opt.last_step)
        if r.clock >= next_eval[r.name] or r.clock >= budget or r.failed:
            next_eval[r.name] = r.clock + eval_every
            r.curve.append((r.clock, r.evaluate()))


def hf_notes(infos: list[Any]) -> str:
    """unseen7's summary plus how CG stopped."""
    if not infos:
        return ""
    stops = Counter(str(i.cg_reason).split(".")[-1] for i in infos).most_common(3)
    return _hf_notes(infos) + "; CG " + ", ".join(f"{k} {v}" for k, v in stops)


DEFAULT_MB = ["HF", "HF lo", "HF mb", "LBFGS sw", "Adam 1e-3", "Adam 3e-3", "Adam 1e-2",
              "Adam 3e-2", "Adam256 1e-2"]  # fmt: skip
DEFAULT_FB = ["HF", "HF lo", "LBFGS sw", "Adamfb 1e-3", "Adamfb 1e-2"]


def race(
    key: str, seed: int, budget: float, contenders: str = "", fixed: float | None = None
) -> None:
    prob = PROBLEMS[key](seed)
    if contenders:
        names = contenders.split(",")
    else:
        names = DEFAULT_MB if prob.n is not None else DEFAULT_FB
    runs = [make_run(n, prob, seed) for n in names]
    load0 = os.getloadavg()
    interleave(runs, budget, eval_every=budget / 40)
    load1 = os.getloadavg()
    base = [r.name for r in runs if not r.name.startswith("HF") and not r.failed]
    curves = {r.name: r.curve for r in runs}
    fr = (0.25, 0.5, 1.0)
    best = {f: min(best_at(curves[n], f * budget) for n in base) for f in fr}
    ref = min(base, key=lambda n: best_at(curves[n], budget / 2))
    target = best_at(curves[ref], budget / 2) if fixed is None else fixed
    if fixed is not None:  # the reference: the baseline that reaches the fixed target first
        ref = min(base, key=lambda n: time_to(curves[n], target))
    t_ref = time_to(curves[ref], target)
    what = "f − f*" if prob.fstar else "loss"
    print(f"\n#### {key}, seed {seed}, {budget:g} CPU s each: {prob.title}\n")
    print(
        f"load {load0[0]:.2f} → {load1[0]:.2f}; {what}; f* = {prob.fstar:.10g}; target "
        f"{target:.6g} = {'fixed; first there:' if fixed else 'the best baseline at ½ budget:'}"
        f" `{ref}` (reached at {t_ref:.3g} s)\n"
    )
    print(f"| run | steps | CPU / wall s | {what} at ¼ / ½ / 1 | ratio to best baseline at ¼ / "
          "½ / 1 | t to target / ref's | held-out | HF trace, warnings, errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        vals = [best_at(r.curve, f * budget) for f in fr]
        ratios = [v / best[f] if best[f] > 0 else math.nan for v, f in zip(vals, fr, strict=True)]
        tt = time_to(r.curve, target) / t_ref if t_ref > 0 else math.nan
        ho = f"{prob.held_out(r.model):.4g}" if prob.held_out else ""
        notes = "; ".join(x for x in (r.failed, hf_notes(r.infos)) if x)
        if r.warns:
            notes += " WARN: " + " / ".join(sorted(set(r.warns))[:2])
        v3 = " / ".join(f"{v:.4g}" for v in vals)
        q3 = " / ".join(f"{q:.3g}" for q in ratios)
        print(f"| {r.name} | {r.steps} | {r.clock:.2f} / {r.wall:.2f} | {v3} | {q3} | {tt:.3g} "
              f"| {ho} | {notes.replace('|', '/')} |")  # fmt: skip


def trace(key: str, seed: int, budget: float, name: str = "HF lo") -> None:
    prob = PROBLEMS[key](seed)
    r = make_run(name, prob, seed)
    interleave([r], budget, eval_every=budget / 20)
    print(f"\n#### trace {key} `{name}`, seed {seed}, {budget:g} s\n")
    print("| step | f − f* | status | λ | ρ | CG iters | CG stop | rate | ‖g‖ |")
    print("|---|---|---|---|---|---|---|---|---|")
    k = max(1, len(r.infos) // 25)
    for i, s in enumerate(r.infos):
        if i % k == 0 or i == len(r.infos) - 1:
            print(
                f"| {i} | {s.loss - prob.fstar:.6g} | {s.status} | {s.damping:.2e} | "
                f"{s.rho:.3f} | {s.cg_iters} | {s.cg_reason} | {s.step_rate:.3g} | "
                f"{s.grad_norm:.2e} |"
            )
    print(f"\n{r.failed} {sorted(set(r.warns))[:3]}")


# ------------------------------------------------------------------------------------------
# ops: the operators against dense float64 matrices
# ------------------------------------------------------------------------------------------
#: per problem: rows of data, and whether the loss is a mean over rows (the Fisher's oracle)
OPS_SETUP: dict[str, tuple[int | None, bool]] = {
    "deepsets": (12, True),
    "tcn": (10, True),
    "siren": (12, True),
    "oscfit": (None, False),  # the rfft couples the time samples
    "cosemb": (10, False),  # a mean over pairs, but each output row is half a pair
    "gamma": (30, True),
    "ctc": (4, True),
}


def ops_problem(key: str) -> list[str]:
    prob = PROBLEMS[key](0)
    rows_n, by_rows = OPS_SETUP[key]
    model = copy.deepcopy(prob.model).double().eval()
    x, y = prob.data
    if rows_n is not None:
        x, y = x[:rows_n], y[:rows_n]
    x = x.double()
    y = y.double() if y.is_floating_point() else y
    loss_fn = prob.loss_fn
    H, G, J, gi = _dense(model, loss_fn, x, y)
    n = H.shape[0]
    rng = np.random.default_rng(0)
    V = rng.standard_normal((n, 3))
    data = (x, y)
    ops: dict[str, tuple[Any, np.ndarray]] = {
        "Hessian": (hessfree.HessianLinearOperator(model, loss_fn, data), H.numpy()),
        "GGN": (hessfree.GGNLinearOperator(model, loss_fn, data), G.numpy()),
    }
    if by_rows:
        Fd = (gi.T @ gi / gi.shape[0]).numpy()
        ops["Fisher"] = (hessfree.FisherLinearOperator(model, loss_fn, data), Fd)
    rows = []
    for name, (op, M) in ops.items():
        mv = _rel(op @ V[:, 0], M @ V[:, 0])
        mmv = _rel(op.matmat(V), M @ V)
        rmv = _rel(op.rmatvec(V[:, 1]), M.T @ V[:, 1])
        adj = _rel(op.H @ V[:, 2], M.T @ V[:, 2])
        evs = np.linalg.eigvalsh(M)
        top = sla.eigsh(op, k=1, which="LA", return_eigenvectors=False, tol=1e-10)[0]
        eig = abs(top - evs[-1]) / abs(evs).max()
        lam = 1e-2 * abs(evs).max()
        b = V[:, 0]
        with hessfree.limit_blas_threads(1):
            if evs[0] + lam <= 0:
                xs, info = sla.minres(op.damped(lam), b, rtol=1e-12, maxiter=10 * n)
                solver = "minres"
            else:
                xs, info = sla.cg(op.damped(lam), b, rtol=1e-12, maxiter=10 * n)
                solver = "cg"
        sol = _rel(xs, np.linalg.solve(M + lam * np.eye(n), b))
        rows.append(
            f"| {key} | {name} | {n} | {mv:.1e} | {mmv:.1e} | {rmv:.1e} | {adj:.1e} | "
            f"{eig:.1e} | {solver} {sol:.1e} ({info}) |"
        )
    Jop = hessfree.JacobianLinearOperator(model, x)
    Jn = J.numpy()
    w = rng.standard_normal(Jn.shape[0])
    mv, rmv = _rel(Jop @ V[:, 0], Jn @ V[:, 0]), _rel(Jop.rmatvec(w), Jn.T @ w)
    mmv, adj = _rel(Jop.matmat(V), Jn @ V), _rel(Jop.H @ w, Jn.T @ w)
    ls = sla.lsqr(Jop, w, damp=1e-1, atol=1e-14, btol=1e-14, iter_lim=20 * n)[0]
    ref = np.linalg.solve(Jn.T @ Jn + 1e-2 * np.eye(n), Jn.T @ w)
    rows.append(
        f"| {key} | Jacobian {Jn.shape} | {n} | {mv:.1e} | {mmv:.1e} | {rmv:.1e} | {adj:.1e} "
        f"| — | lsqr {_rel(ls, ref):.1e} |"
    )
    return rows


def ops(keys: list[str]) -> None:
    print("\n#### ops: max |op − dense| / max |dense| (float64 models and data)\n")
    print("| problem | operator | n | matvec | matmat | rmatvec | .H | eigsh top | solve (info) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        try:
            for row in ops_problem(key):
                print(row)
        except Exception as err:  # noqa: BLE001
            msg = f"{type(err).__name__}: {str(err)[:300]}".replace("\n", " ")
            print(f"| {key} | FAILED | {msg} |")


# ------------------------------------------------------------------------------------------
# smoke and misuse
# ------------------------------------------------------------------------------------------
def smoke(keys: list[str]) -> None:
    """(a): three steps with each closure style, warnings and errors recorded."""
    print("\n#### smoke: HessianFree(model.parameters()), 3 steps each closure style\n")
    print("| problem | closure | f − f* before → after | statuses | outcome | params unchanged |")
    print("|---|---|---|---|---|---|")
    for key in keys:
        prob = PROBLEMS[key](0)
        for style in ("HF", "HF lo", "HF mb") if prob.n else ("HF", "HF lo"):
            r = make_run(style, prob, 0)
            before = r.evaluate()
            p0 = [p.detach().clone() for p in r.model.parameters()]
            statuses: list[str] = []

            def go(r=r, statuses=statuses):
                for _ in range(3):
                    r.step()
                    statuses.append(str(r.opt.last_step.status))

            out = _outcome(go)
            same = all(torch.equal(a, p) for a, p in zip(p0, r.model.parameters(), strict=True))
            print(f"| {key} | {style} | {before:.4g} → {r.evaluate():.4g} | {statuses} | {out} "
                  f"| {same} |")  # fmt: skip


def _misuse_cases(prob: Problem) -> dict[str, Callable[[nn.Module], Any]]:
    x, y = prob.data

    def nan_data(m):
        xn = x.clone()
        xn.view(-1)[0] = float("nan")
        out = m(xn)
        return prob.loss_fn(out, y), out

    def modifies(m):
        with torch.no_grad():
            next(m.parameters()).add_(1.0)
        return prob.lo_of(m)

    def wrong_dtype(m):
        out = m(x)
        return prob.loss_fn(out, y).double() if out.dtype != torch.float64 else (
            prob.loss_fn(out, y).float()), out  # fmt: skip

    def loss_2d(m):
        out = m(x)
        return prob.loss_fn(out, y).reshape(1, 1), out

    return {
        "NaN in the data": nan_data,
        "closure modifies a parameter": modifies,
        "loss in another dtype": wrong_dtype,
        "loss of shape (1, 1)": loss_2d,
        "(outputs, loss) swapped": lambda m: tuple(reversed(prob.lo_of(m))),
        "(loss, outputs.detach())": lambda m: (prob.lo_of(m)[0], prob.lo_of(m)[1].detach()),
        "returns a dict": lambda m: {"loss": prob.loss_of(m)},
    }


def misuse(keys: list[str]) -> None:
    print("\n#### misuse: error or warning, parameters bit-identical after\n")
    print("| problem | case | outcome | params unchanged |")
    print("|---|---|---|---|")
    for key in keys:
        prob = PROBLEMS[key](0)
        for case, fn in _misuse_cases(prob).items():
            m = copy.deepcopy(prob.model)
            before = [p.detach().clone() for p in m.parameters()]
            opt = hessfree.HessianFree(m.parameters())
            # a closure that modifies parameters changes them by design: compare after its edit
            if case == "closure modifies a parameter":
                before[0] = before[0] + 1.0

            def go(opt=opt, m=m, fn=fn):
                opt.step(lambda: fn(m))
                return f"status {opt.last_step.status}"

            out = _outcome(go)
            same = all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
            print(f"| {key} | {case} | {out} | {same} |")
        m = copy.deepcopy(prob.model)
        other = copy.deepcopy(PROBLEMS["gamma" if key != "gamma" else "siren"](0).model)
        params = list(m.parameters())
        cases: dict[str, Callable[[], Any]] = {
            "same param in two groups": lambda params=params: hessfree.HessianFree(
                [{"params": params}, {"params": params[:1]}]
            ),
            "non-leaf parameter (p * 2)": lambda params=params: hessfree.HessianFree(
                [params[0] * 2]
            ),
            "load_state_dict from another model": lambda m=m, o=other, p=prob: _load_other(m, o, p),
        }
        for case, fn in cases.items():
            before = [p.detach().clone() for p in m.parameters()]
            out = _outcome(fn)
            same = all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
            print(f"| {key} | {case} | {out} | {same} |")


def _load_other(m: nn.Module, other: nn.Module, prob: Problem) -> str:
    oo = hessfree.HessianFree(other.parameters())
    data = PROBLEMS["gamma" if prob.title[:5] != "Gamma" else "siren"](0)
    oo.step(lambda: data.lo_of(other))
    opt = hessfree.HessianFree(m.parameters())
    opt.load_state_dict(oo.state_dict())
    opt.step(lambda: prob.lo_of(m))
    return f"status {opt.last_step.status}"


def capcost(budget: float = 2.0) -> None:
    """What ``[blk64]`` costs a *convex* generic loss with 32 outputs per example: an MLP
    64-64-32 on the digits regressing a fixed tanh projection, loss ``(o − y).pow(2).mean()``
    (no closed form in the library), full batch, cap 16 vs 64, interleaved by CPU time."""
    x, _ = _digits()
    y = torch.tanh(x @ torch.randn(64, 32, generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))
    prob = Problem("convex generic loss, 32 outputs", net,
                   lambda o, t: (o - t).pow(2).mean(), (x, y))  # fmt: skip
    runs = [make_run(n, prob, 0) for n in ("HF lo", "HF lo[blk64]")]
    load0 = os.getloadavg()
    interleave(runs, budget, eval_every=budget / 10)
    load1 = os.getloadavg()
    print(f"\n#### capcost: {prob.title}, {budget:g} CPU s each; load {load0[0]:.2f} → "
          f"{load1[0]:.2f}\n")  # fmt: skip
    print("| run | steps | CPU s / step | loss at end | first 5 losses |")
    print("|---|---|---|---|---|")
    for r in runs:
        first = ", ".join(f"{i.loss:.6g}" for i in r.infos[:5])
        per = r.clock / r.steps
        print(f"| {r.name} | {r.steps} | {per:.4f} | {r.curve[-1][1]:.4g} | {first} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(PROBLEMS))
    parts = ["race", "trace", "ops", "misuse", "smoke", "capcost"]
    ap.add_argument("--part", default="race", choices=parts)
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--name", default="HF lo")
    ap.add_argument("--contenders", default="")
    ap.add_argument("--target", type=float, default=None, help="a fixed f − f* target")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")  # fmt: skip
    if args.part == "capcost":
        capcost(args.budget)
        return
    if args.part in ("ops", "misuse", "smoke"):
        {"ops": ops, "misuse": misuse, "smoke": smoke}[args.part](args.problems)
        return
    for key in args.problems:
        for seed in map(int, args.seeds.split(",")):
            if args.part == "race":
                race(key, seed, args.budget, args.contenders, args.target)
            else:
                trace(key, seed, args.budget, args.name)


if __name__ == "__main__":
    main()
