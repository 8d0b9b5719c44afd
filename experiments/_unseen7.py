"""`HessianFree(params)` with no arguments on six problems no earlier pass had tried (topic
"unseen7"), the curvature operators on them against explicit float64 matrices, and misuse.

Problems (each builds data, model and initial weights from a seed; seconds on 1 thread):

* ``temporal``: the temporal order problem (Hochreiter & Schmidhuber 1997; Martens &
  Sutskever 2011, §5): T = 30 one-hot symbols from {a, b, c, d} (distractors); at one step in
  [3, 6) and one in [15, 18) the symbol is X or Y; 4 classes (XX, XY, YX, YY), read at the
  last step. ``nn.GRU`` (hidden 24) + linear head, cross-entropy; 2,000 sequences, 1,000 held
  out. Chance loss log 4 = 1.386.
* ``unet``: a U-Net-like denoiser on sklearn's 8×8 digits: conv(1→8) → stride-2 conv(8→16) →
  conv → nearest upsample → concatenated skip (16 + 8 channels) → conv → 1 channel; input the
  image + N(0, 0.3²) noise (one fixed draw), target the clean image, MSE summed over pixels.
* ``gnn``: a two-layer graph convolution written with ``index_add_`` (messages gathered by
  ``x[src]``, normalised by degree, a ``register_buffer`` edge list and weights) on a
  4-community stochastic block graph of 240 nodes, noisy 16-d features; node classification,
  cross-entropy on the 60 labelled nodes (a mask), accuracy on the others. The model also holds
  a parameter it never uses (``unused``), as a user's half-finished model does.
* ``deq``: an implicit layer z = tanh(W z + U x + b) by a fixed-point loop (20 iterations,
  unrolled; W scaled to spectral norm 0.5 at the start), a linear read-out; regression of a
  random teacher net's outputs (8 → 4), MSE.
* ``scaled32`` / ``scaled64``: multi-output regression whose 3 targets have scales 1, 30 and
  1,000 (a tanh MLP 6-32-32-3 with a teacher; MSE over all outputs), float32 and float64.
* ``mixer``: one MLP-mixer block (LayerNorm, token-mixing and channel-mixing MLPs with GELU,
  residuals) on the digits as 4 patches of 4×4 pixels; a frozen patch embedding
  (``requires_grad_(False)``); cross-entropy with label smoothing 0.1 and class weights
  (1 + class/9).

Contenders (interleaved in one process by CPU time of their own ``step`` calls, same weights
and batch stream; wall time recorded too): ``HF`` = ``HessianFree(params)`` with an
LBFGS-style closure (``zero_grad``, ``backward``, return the loss); ``HF lo`` = the
``(loss, outputs)`` closure; ``HF mb`` = ``(loss, outputs)`` on a fresh batch of 250 per step
(mini-batch problems); ``LBFGS sw`` = ``torch.optim.LBFGS(params, line_search_fn=
'strong_wolfe')`` full batch; ``Adam <lr>`` at 1e-3 / 3e-3 / 1e-2 / 3e-2 on batches of 64
(``Adam256 <lr>``: batches of 256).

Parts: ``smoke`` (three steps per closure style), ``race`` (the tables), ``trace`` (HF's
per-step record), ``stall`` (extreme eigenvalues of H and G where ``HF lo`` stalls on
``scaled64``), ``ops`` (operators against dense float64 matrices), ``misuse`` (wrong closures,
arguments and operator inputs). ``scaled64std``: ``scaled64`` with each target standardized.
Variants (diagnosis only): ``HF lo[none]`` (``precond=None``), ``[cg250]``, ``[hess]``
(``curvature='hessian'``), ``[marq]``, ``[nophase]`` (the local phase off).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseen7.py [problem ...] \
        [--part smoke|race|trace|stall|ops|misuse] [--budget S] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hessfree

torch.set_num_threads(1)


@dataclass
class Problem:
    """``model``: initial weights; ``loss_fn(outputs, targets)``; ``data``: ``(inputs,
    targets)`` of the training set; ``n``: number of cases (None: full batch only);
    ``held_out(model)``: a held-out figure."""

    title: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    data: tuple[Any, Any]
    n: int | None = None
    held_out: Callable[[nn.Module], float] | None = None

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


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------
def temporal_data(n: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Symbols 0-3 distractors, 4 = X, 5 = Y; class = 2·[first is Y] + [second is Y]."""
    sym = torch.randint(0, 4, (n, T), generator=g)
    t1 = torch.randint(T // 10, T // 5, (n,), generator=g)
    t2 = torch.randint(T // 2, 3 * T // 5, (n,), generator=g)
    a, b = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    rows = torch.arange(n)
    sym[rows, t1] = 4 + a
    sym[rows, t2] = 4 + b
    return F.one_hot(sym, 6).float(), 2 * a + b


class SeqClassifier(nn.Module):
    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.rnn = nn.GRU(6, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def p_temporal(seed: int, T: int = 30) -> Problem:
    g = torch.Generator().manual_seed(1000)
    x, y = temporal_data(2000, T, g)
    xt, yt = temporal_data(1000, T, g)
    torch.manual_seed(seed)
    model = SeqClassifier()

    def held_out(m):
        with torch.no_grad():
            return (m(xt).argmax(1) == yt).float().mean().item()

    return Problem(f"temporal order, T = {T}, GRU(24) + linear, CE (held-out: accuracy)",
                   model, F.cross_entropy, (x, y), n=2000, held_out=held_out)  # fmt: skip


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.dec = nn.Conv2d(24, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        e = F.relu(self.enc(x))
        m = F.relu(self.mid(F.relu(self.down(e))))
        u = F.interpolate(m, scale_factor=2, mode="nearest")
        d = F.relu(self.dec(torch.cat([u, e], dim=1)))
        return self.out(d).view(-1, 64)


def _sse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y, reduction="sum") / out.shape[0]


def p_unet(seed: int) -> Problem:
    x, _ = _digits()
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    xtr, ytr, xte, yte = noisy[:1400], x[:1400], noisy[1400:], x[1400:]
    torch.manual_seed(seed)
    model = UNet()

    def held_out(m):
        with torch.no_grad():
            return _sse(m(xte), yte).item()

    return Problem("U-Net-like conv denoiser with a skip, digits + noise 0.3, SSE/case",
                   model, _sse, (xtr, ytr), n=1400, held_out=held_out)  # fmt: skip


class GCN(nn.Module):
    """Two graph convolutions, h' = D^-1/2 (A + I) D^-1/2 h W, by gather and ``index_add_``."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, n: int, d: int, k: int) -> None:
        super().__init__()
        loops = torch.arange(n)
        src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
        deg = torch.zeros(n).index_add_(0, dst, torch.ones(len(dst)))
        self.register_buffer("src", src)
        self.register_buffer("dst", dst)
        self.register_buffer("w", (deg[src] * deg[dst]).rsqrt())
        self.lin1 = nn.Linear(d, 32)
        self.lin2 = nn.Linear(32, k)
        self.unused = nn.Parameter(torch.zeros(5))  # never reaches the loss

    def propagate(self, h: torch.Tensor) -> torch.Tensor:
        msg = h[self.src] * self.w.to(h.dtype)[:, None]
        return torch.zeros_like(h).index_add_(0, self.dst, msg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.propagate(self.lin1(x)))
        return self.propagate(self.lin2(h))


def p_gnn(seed: int) -> Problem:
    g = torch.Generator().manual_seed(7)
    n, k, d = 240, 4, 16
    comm = torch.arange(n) % k
    same = comm[:, None] == comm[None, :]
    prob = torch.where(same, torch.tensor(0.08), torch.tensor(0.012))
    adj = torch.rand(n, n, generator=g) < prob
    adj = torch.triu(adj, 1)
    adj = adj | adj.T
    src, dst = adj.nonzero(as_tuple=True)
    centers = torch.randn(k, d, generator=g)
    x = centers[comm] + 2.0 * torch.randn(n, d, generator=g)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:60]] = True
    torch.manual_seed(seed)
    model = GCN(src, dst, n, d, k)

    def loss_fn(out, y):
        return F.cross_entropy(out[mask], y[mask])

    def held_out(m):
        with torch.no_grad():
            return (m(x).argmax(1)[~mask] == comm[~mask]).float().mean().item()

    return Problem(f"GCN by index_add_, SBM graph {n} nodes / {len(src)} edges, 60 labelled, CE",
                   model, loss_fn, (x, comm), held_out=held_out)  # fmt: skip


class DEQ(nn.Module):
    def __init__(self, d_in: int, d_z: int, d_out: int, iters: int = 20) -> None:
        super().__init__()
        self.W = nn.Linear(d_z, d_z, bias=False)
        self.U = nn.Linear(d_in, d_z)
        self.head = nn.Linear(d_z, d_out)
        self.iters = iters
        with torch.no_grad():
            self.W.weight *= 0.5 / torch.linalg.matrix_norm(self.W.weight, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ux = self.U(x)
        z = torch.zeros_like(ux)
        for _ in range(self.iters):
            z = torch.tanh(self.W(z) + ux)
        return self.head(z)


def p_deq(seed: int) -> Problem:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(800, 8, generator=g)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        y = teacher(x)
    torch.manual_seed(seed)
    model = DEQ(8, 24, 4)
    return Problem("implicit layer z = tanh(Wz + Ux + b), 20 fixed-point iterations, MSE",
                   model, F.mse_loss, (x, y))  # fmt: skip


def p_scaled(seed: int, dtype: torch.dtype = torch.float32, standardize: bool = False) -> Problem:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 6, generator=g, dtype=torch.float64)
    t1 = torch.tanh(x @ torch.randn(6, 16, generator=g, dtype=torch.float64))
    y = t1 @ torch.randn(16, 3, generator=g, dtype=torch.float64) / 4
    y = y * torch.tensor([1.0, 30.0, 1000.0], dtype=torch.float64)
    y = y + 0.01 * torch.tensor([1.0, 30.0, 1000.0], dtype=torch.float64) * torch.randn(
        y.shape, generator=g, dtype=torch.float64
    )
    if standardize:  # what a user would do first: each target to unit variance
        y = y / y.std(0)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 3)).to(dtype)  # fmt: skip
    name = "float32" if dtype == torch.float32 else "float64"
    name += ", targets standardized" if standardize else ""
    return Problem(f"3-output regression, target scales 1 / 30 / 1000, tanh MLP, MSE, {name}",
                   model, F.mse_loss, (x.to(dtype), y.to(dtype)))  # fmt: skip


class Mixer(nn.Module):
    """One MLP-mixer block over 4 tokens (4×4 patches) of 24 channels, frozen patch embedding."""

    def __init__(self, tokens: int = 4, ch: int = 24) -> None:
        super().__init__()
        self.embed = nn.Linear(16, ch)
        self.embed.requires_grad_(False)
        self.norm1 = nn.LayerNorm(ch)
        self.tok = nn.Sequential(nn.Linear(tokens, 16), nn.GELU(), nn.Linear(16, tokens))
        self.norm2 = nn.LayerNorm(ch)
        self.chan = nn.Sequential(nn.Linear(ch, 48), nn.GELU(), nn.Linear(48, ch))
        self.norm3 = nn.LayerNorm(ch)
        self.head = nn.Linear(ch, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x.view(-1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(-1, 4, 16)
        h = self.embed(p)
        h = h + self.tok(self.norm1(h).transpose(1, 2)).transpose(1, 2)
        h = h + self.chan(self.norm2(h))
        return self.head(self.norm3(h).mean(1))


CLASS_WEIGHT = 1 + torch.arange(10, dtype=torch.float32) / 9


def _mixer_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, weight=CLASS_WEIGHT.to(out.dtype), label_smoothing=0.1)


def p_mixer(seed: int) -> Problem:
    x, y = _digits()
    torch.manual_seed(seed)
    model = Mixer()

    def held_out(m):
        with torch.no_grad():
            return (m(x[1400:]).argmax(1) == y[1400:]).float().mean().item()

    return Problem("MLP-mixer block (LayerNorm, GELU, residual), frozen embedding, CE "
                   "(label smoothing 0.1, class weights)", model, _mixer_loss,
                   (x[:1400], y[:1400]), n=1400, held_out=held_out)  # fmt: skip


PROBLEMS: dict[str, Callable[[int], Problem]] = {
    "temporal": p_temporal,
    "unet": p_unet,
    "gnn": p_gnn,
    "deq": p_deq,
    "scaled32": p_scaled,
    "scaled64": lambda seed: p_scaled(seed, torch.float64),
    "scaled64std": lambda seed: p_scaled(seed, torch.float64, standardize=True),
    "mixer": p_mixer,
}
VARIANTS: dict[str, dict] = {
    "none": {"precond": None},
    "marq": {"damping_metric": "marquardt"},
    "cg250": {"cg_max_iter": 250},
    "hess": {"curvature": "hessian"},
}


class _NoLocalPhase(hessfree.HessianFree):
    """``HF lo[nophase]``: the defaults without the local (Newton) phase (diagnosis only; the
    class attribute experiments/_gnquad.py uses)."""

    _newton_phase = False


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
        cls = _NoLocalPhase if variant == "nophase" else hessfree.HessianFree
        opt: Any = cls(model.parameters(), **VARIANTS.get(variant, {}))
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
            return opt.step(lambda: prob.lo_of(model))

    elif base == "HF mb":

        def step():
            idx = torch.randint(0, prob.n, (250,), generator=g)
            return opt.step(lambda: prob.lo_of(model, idx))

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
            return prob.loss_of(model).item()

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


def best_at(curve: list[tuple[float, float]], t: float) -> float:
    return min(f for s, f in curve if s <= t)


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    for t, f in curve:
        if f <= target:
            return t
    return math.inf


def hf_notes(infos: list[Any]) -> str:
    if not infos:
        return ""
    st = Counter(str(i.status) for i in infos)
    lam = [i.damping for i in infos if math.isfinite(i.damping)]
    rho = [i.rho for i in infos if math.isfinite(i.rho)]
    cg = [i.cg_iters for i in infos]
    k = max(1, len(lam) // 4)
    path = "→".join(f"{x:.1e}" for x in lam[::k][:4] + lam[-1:])
    med = statistics.median(rho) if rho else math.nan
    return f"{dict(st)}; λ {path}; ρ med {med:.2f}; CG med {statistics.median(cg):.0f}"


def race(key: str, seed: int, budget: float, contenders: str = "") -> None:
    prob = PROBLEMS[key](seed)
    if contenders:
        names = contenders.split(",")
    elif prob.n is not None:
        names = ["HF", "HF lo", "HF mb", "LBFGS sw", "Adam 1e-3", "Adam 3e-3", "Adam 1e-2",
                 "Adam 3e-2", "Adam256 1e-2"]  # fmt: skip
    else:
        names = ["HF", "HF lo", "LBFGS sw"]
    runs = [make_run(n, prob, seed) for n in names]
    load0 = os.getloadavg()
    interleave(runs, budget, eval_every=budget / 40)
    load1 = os.getloadavg()
    base = [r.name for r in runs if not r.name.startswith("HF")]
    curves = {r.name: r.curve for r in runs}
    fr = (0.25, 0.5, 1.0)
    best = {f: min(best_at(curves[n], f * budget) for n in base) for f in fr}
    ref = min(base, key=lambda n: best_at(curves[n], budget / 2))
    target = best_at(curves[ref], budget / 2)
    t_ref = time_to(curves[ref], target)
    print(f"\n#### {key}, seed {seed}, {budget:g} CPU s each: {prob.title}\n")
    print(f"load {load0[0]:.2f} → {load1[0]:.2f}; target {target:.6g} = the best baseline "
          f"`{ref}` at ½ budget (reached at {t_ref:.3g} s)\n")  # fmt: skip
    print("| run | steps | CPU / wall s | loss at ¼ / ½ / 1 | ratio to best baseline at ¼ / ½ / 1"
          " | t to target / ref's | held-out | HF trace, warnings, errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        vals = [best_at(r.curve, f * budget) for f in fr]
        ratios = [v / best[f] if best[f] > 0 else math.nan for v, f in zip(vals, fr, strict=True)]
        tt = time_to(r.curve, target) / t_ref if t_ref > 0 else math.nan
        ho = f"{prob.held_out(r.model):.4g}" if prob.held_out else ""
        notes = "; ".join(x for x in (r.failed, hf_notes(r.infos)) if x)
        if r.warns:
            notes += " WARN: " + " | ".join(sorted(set(r.warns))[:2])
        v3 = " / ".join(f"{v:.4g}" for v in vals)
        q3 = " / ".join(f"{q:.3g}" for q in ratios)
        print(f"| {r.name} | {r.steps} | {r.clock:.2f} / {r.wall:.2f} | {v3} | {q3} | {tt:.3g} "
              f"| {ho} | {notes} |")  # fmt: skip


def trace(key: str, seed: int, budget: float, name: str = "HF lo") -> None:
    prob = PROBLEMS[key](seed)
    r = make_run(name, prob, seed)
    interleave([r], budget, eval_every=budget / 20)
    print(f"\n#### trace {key} `{name}`, seed {seed}, {budget:g} s\n")
    print("| step | loss | status | λ | ρ | CG iters | CG stop | rate | ‖g‖ |")
    print("|---|---|---|---|---|---|---|---|---|")
    k = max(1, len(r.infos) // 25)
    for i, s in enumerate(r.infos):
        if i % k == 0 or i == len(r.infos) - 1:
            print(
                f"| {i} | {s.loss:.6g} | {s.status} | {s.damping:.2e} | {s.rho:.3f} | "
                f"{s.cg_iters} | {s.cg_reason} | {s.step_rate:.3g} | {s.grad_norm:.2e} |"
            )
    print(f"\n{r.failed} {sorted(set(r.warns))[:3]}")


# ------------------------------------------------------------------------------------------
# ops: the operators against dense float64 matrices
# ------------------------------------------------------------------------------------------
def _dense(model: nn.Module, loss_fn, x, y):
    """Explicit float64 H, G = Jᵀ H_ℓ J, J and the per-row gradients N·J_iᵀ ∂L/∂o_i."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in params]
    theta = torch.cat([p.detach().reshape(-1) for _, p in params]).double()
    sizes = [p.numel() for _, p in params]
    shapes = [p.shape for _, p in params]
    m64 = copy.deepcopy(model).double()
    y = y.double() if y.is_floating_point() else y

    def outputs(t):
        par = {n: c.view(s) for n, c, s in zip(names, t.split(sizes), shapes, strict=True)}
        return functional_call(m64, par, (x.double(),))

    def loss(t):
        return loss_fn(outputs(t), y)

    H = torch.autograd.functional.hessian(loss, theta, vectorize=True)
    o = outputs(theta).detach()
    J = torch.autograd.functional.jacobian(outputs, theta, vectorize=True).reshape(o.numel(), -1)
    Hl = torch.autograd.functional.hessian(
        lambda u: loss_fn(u.view_as(o), y), o.reshape(-1), vectorize=True
    )
    G = J.T @ Hl @ J
    dLdo = torch.autograd.functional.jacobian(lambda u: loss_fn(u.view_as(o), y), o.reshape(-1))
    n = o.shape[0]
    Jr = J.view(n, -1, J.shape[-1])
    gi = n * torch.einsum("ikp,ik->ip", Jr, dLdo.view(n, -1))
    return H, G, J, gi


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


#: per problem: (rows of data, model dtype, inputs dtype, operator dtype)
OPS_SETUP: dict[str, tuple[int | None, torch.dtype, torch.dtype, Any]] = {
    "temporal": (12, torch.float64, torch.float64, None),
    "unet": (6, torch.float64, torch.float64, None),
    "gnn": (None, torch.float64, torch.float64, None),  # the graph's nodes are coupled
    "deq": (12, torch.float64, torch.float64, None),
    "scaled32": (12, torch.float32, torch.float32, np.float64),  # float32 shown as float64
    "scaled64": (12, torch.float64, torch.float64, None),
    "scaled64std": (12, torch.float64, torch.float64, None),
    "mixer": (12, torch.float32, torch.float32, np.float64),
}


def ops_problem(key: str) -> list[str]:
    """Rows of the ops table for one problem, on a small slice of its data."""
    prob = PROBLEMS[key](0)
    rows_n, mdt, xdt, odt = OPS_SETUP[key]
    model = copy.deepcopy(prob.model).to(mdt).eval()
    x, y = prob.data
    if rows_n is not None:
        x, y = x[:rows_n], y[:rows_n]
    x = x.to(xdt)
    y = y.to(xdt) if y.is_floating_point() else y
    loss_fn = prob.loss_fn
    # oracle: float64 copies of the same weights and data
    H, G, J, gi = _dense(model, loss_fn, x, y)
    n = H.shape[0]
    tol = "f64" if mdt == torch.float64 else "f32"
    rng = np.random.default_rng(0)
    V = rng.standard_normal((n, 3))
    data = (x, y)
    Fd = (gi.T @ gi / gi.shape[0]).numpy()
    ops = {
        "Hessian": (hessfree.HessianLinearOperator(model, loss_fn, data, dtype=odt), H.numpy()),
        "GGN": (hessfree.GGNLinearOperator(model, loss_fn, data, dtype=odt), G.numpy()),
        "Fisher": (hessfree.FisherLinearOperator(model, loss_fn, data, dtype=odt), Fd),
    }
    rows = []
    for name, (op, M) in ops.items():
        mv = _rel(op @ V[:, 0], M @ V[:, 0])
        mmv = _rel(op.matmat(V), M @ V)
        rmv = _rel(op.rmatvec(V[:, 1]), M.T @ V[:, 1])
        adj = _rel(op.H @ V[:, 2], M.T @ V[:, 2])
        top = sla.eigsh(op, k=1, which="LA", return_eigenvectors=False, tol=1e-10)[0]
        evs = np.linalg.eigvalsh(M)
        eig = abs(top - evs[-1]) / abs(evs[-1])
        lam = 1e-2 * abs(evs).max()
        b = V[:, 0]
        with hessfree.limit_blas_threads(1):
            if name == "Hessian":
                xs, info = sla.minres(op.damped(lam), b, rtol=1e-12, maxiter=10 * n)
            else:
                xs, info = sla.cg(op.damped(lam), b, rtol=1e-12, maxiter=10 * n)
        sol = _rel(xs, np.linalg.solve(M + lam * np.eye(n), b))
        solver = "minres" if name == "Hessian" else "cg"
        rows.append(
            f"| {key} | {name} | {n} | {mdt}/{xdt}→{op.dtype} | {mv:.1e} | {mmv:.1e} | "
            f"{rmv:.1e} | {adj:.1e} | {eig:.1e} | {solver} {sol:.1e} ({info}) | {tol} |"
        )
    Jop = hessfree.JacobianLinearOperator(model, x, dtype=odt)
    Jn = J.numpy()
    w = rng.standard_normal(Jn.shape[0])
    mv, rmv = _rel(Jop @ V[:, 0], Jn @ V[:, 0]), _rel(Jop.rmatvec(w), Jn.T @ w)
    mmv, adj = _rel(Jop.matmat(V), Jn @ V), _rel(Jop.H @ w, Jn.T @ w)
    ls = sla.lsqr(Jop, w, damp=1e-1, atol=1e-14, btol=1e-14, iter_lim=20 * n)[0]
    ref = np.linalg.solve(Jn.T @ Jn + 1e-2 * np.eye(n), Jn.T @ w)
    rows.append(
        f"| {key} | Jacobian {Jn.shape} | {n} | {mdt}/{xdt}→{Jop.dtype} | {mv:.1e} | "
        f"{mmv:.1e} | {rmv:.1e} | {adj:.1e} | — | lsqr {_rel(ls, ref):.1e} | {tol} |"
    )
    return rows


def ops(keys: list[str]) -> None:
    print("\n#### ops: max |op − dense| / max |dense| (float64 oracles)\n")
    print("| problem | operator | n | model/inputs→op dtype | matvec | matmat | rmatvec | .H |"
          " eigsh top | solve (info) | oracle |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        try:
            for row in ops_problem(key):
                print(row)
        except Exception as err:  # noqa: BLE001
            print(f"| {key} | FAILED | {type(err).__name__}: {str(err)[:300]} |")


# ------------------------------------------------------------------------------------------
# misuse
# ------------------------------------------------------------------------------------------
def _misuse_cases(prob: Problem) -> dict[str, Callable[[nn.Module], Any]]:
    def nan_data(m):
        loss, out = prob.lo_of(m)
        return loss * torch.tensor(float("nan"), dtype=loss.dtype), out

    def no_grad_loss(m):
        with torch.no_grad():
            return prob.loss_of(m)

    def per_case(m):
        x, y = prob.data
        out = m(x)
        return F.mse_loss(out, torch.zeros_like(out), reduction="none").sum(-1), out

    return {
        "(per-case losses, outputs)": per_case,
        "(loss, outputs.detach())": lambda m: (prob.lo_of(m)[0], prob.lo_of(m)[1].detach()),
        "(outputs, loss) swapped": lambda m: tuple(reversed(prob.lo_of(m))),
        "loss × NaN": nan_data,
        "loss under no_grad": no_grad_loss,
        "returns None": lambda m: None,
        "(loss, outputs, outputs)": lambda m: (*prob.lo_of(m), prob.lo_of(m)[1]),
        "loss + Inf": lambda m: prob.loss_of(m) + math.inf,
        "(loss, [outputs])": lambda m: (prob.lo_of(m)[0], [prob.lo_of(m)[1]]),
    }


def _outcome(fn: Callable[[], Any]) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = fn()
            outcome = f"no error{'' if res is None else f'; {res}'}"
        except Exception as err:  # noqa: BLE001
            outcome = f"{type(err).__name__}: {str(err)[:260]}"
    if caught:
        outcome += " WARN: " + " | ".join(
            sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught})
        )
    return outcome.replace("|", "/").replace("\n", " ")


def _operator_misuse(mm: nn.Module, loss_fn, x, y) -> dict[str, Callable[[], Any]]:
    """Operator calls a user might get wrong."""
    n = sum(p.numel() for p in mm.parameters() if p.requires_grad)

    def nan_vector():
        return np.isnan(hessfree.GGNLinearOperator(mm, loss_fn, (x, y)) @ np.full(n, np.nan)).all()

    return {
        "GGN op, data = inputs only": lambda: hessfree.GGNLinearOperator(mm, loss_fn, x),
        "GGN op @ vector of wrong length": lambda: (
            hessfree.GGNLinearOperator(mm, loss_fn, (x, y)) @ np.ones(3)
        ),
        "GGN op @ NaN vector (all NaN?)": nan_vector,
        "Jacobian op, inputs = (x, y)": lambda: hessfree.JacobianLinearOperator(mm, (x, y)),
        "Hessian op, loss_fn returns per-case": lambda: hessfree.HessianLinearOperator(
            mm, lambda o, t: (o.float() ** 2).sum(-1), (x, y)
        ),
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

            def go(opt=opt, m=m, fn=fn):
                for _ in range(2):
                    opt.step(lambda: fn(m))
                return f"status {opt.last_step.status}"

            out = _outcome(go)
            same = all(torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))
            print(f"| {key} | {case} | {out} | {same} |")
        m = copy.deepcopy(prob.model)
        frozen = [p for p in m.parameters() if not p.requires_grad]
        cases: dict[str, Callable[[], Any]] = {
            "HessianFree(model)": lambda m=m: hessfree.HessianFree(m),
            "HessianFree(params, damping=-1)": lambda m=m: hessfree.HessianFree(
                m.parameters(), damping=-1.0
            ),
            "HessianFree(params, cg_max_iter=2.5)": lambda m=m: hessfree.HessianFree(
                m.parameters(), cg_max_iter=2.5
            ),
            "HessianFree(params, curvature='gn')": lambda m=m: hessfree.HessianFree(
                m.parameters(), curvature="gn"
            ),
        }
        if frozen:
            cases["HessianFree(frozen params only)"] = lambda f=frozen: hessfree.HessianFree(f)
        mm = copy.deepcopy(prob.model)
        cases.update(_operator_misuse(mm, prob.loss_fn, *prob.data))
        for case, fn in cases.items():
            before = [p.detach().clone() for p in mm.parameters()]
            out = _outcome(fn)
            same = all(torch.equal(a, p) for a, p in zip(before, mm.parameters(), strict=True))
            print(f"| {key} | {case} | {out} | {same} |")


def smoke(keys: list[str]) -> None:
    """(a): three steps with each closure style, warnings and errors recorded."""
    print("\n#### smoke: HessianFree(model.parameters()), 3 steps each closure style\n")
    print("| problem | closure | loss before → after | statuses | outcome |")
    print("|---|---|---|---|---|")
    for key in keys:
        prob = PROBLEMS[key](0)
        for style in ("HF", "HF lo"):
            r = make_run(style, prob, 0)
            before = r.evaluate()
            statuses: list[str] = []

            def go(r=r, statuses=statuses):
                for _ in range(3):
                    r.step()
                    statuses.append(str(r.opt.last_step.status))

            out = _outcome(go)
            print(f"| {key} | {style} | {before:.4g} → {r.evaluate():.4g} | {statuses} | {out} |")


def stall(key: str = "scaled64", steps: int = 70) -> None:
    """The curvature where ``HF lo`` stalls: extreme eigenvalues of H and G (float64, eigsh)."""
    prob = PROBLEMS[key](0)
    r = make_run("HF lo", prob, 0)
    for _ in range(steps):
        r.step()
    data = prob.data
    H = hessfree.HessianLinearOperator(r.model, prob.loss_fn, data)
    G = hessfree.GGNLinearOperator(r.model, prob.loss_fn, data)
    eig = {
        "H largest": sla.eigsh(H, k=1, which="LA", return_eigenvectors=False)[0],
        "H smallest": sla.eigsh(H, k=1, which="SA", return_eigenvectors=False)[0],
        "G largest": sla.eigsh(G, k=1, which="LA", return_eigenvectors=False)[0],
    }
    with torch.no_grad():
        res = (r.model(data[0]) - data[1]).abs().mean(0)
    g = H.gradient()
    print(f"\n#### stall: {key} `HF lo` after {steps} steps, loss {r.evaluate():.6g}\n")
    print(f"mean |residual| per output {[f'{v:.3g}' for v in res.tolist()]}; ‖g‖ "
          f"{np.linalg.norm(g):.3g}; gᵀHg/gᵀg {g @ (H @ g) / (g @ g):.3g}, gᵀGg/gᵀg "
          f"{g @ (G @ g) / (g @ g):.3g}")  # fmt: skip
    print("; ".join(f"{k} {v:.4g}" for k, v in eig.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(PROBLEMS))
    parts = ["race", "trace", "ops", "misuse", "smoke", "stall"]
    ap.add_argument("--part", default="race", choices=parts)
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--name", default="HF lo")
    ap.add_argument("--contenders", default="")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")  # fmt: skip
    if args.part == "ops":
        ops(args.problems)
        return
    if args.part == "misuse":
        misuse(args.problems)
        return
    if args.part == "smoke":
        smoke(args.problems)
        return
    if args.part == "stall":
        stall()
        return
    for key in args.problems:
        for seed in map(int, args.seeds.split(",")):
            if args.part == "race":
                race(key, seed, args.budget, args.contenders)
            else:
                trace(key, seed, args.budget, args.name)


if __name__ == "__main__":
    main()
