"""`HessianFree(params)` with no arguments on a fourth round of problems nobody had tried
(topic "unseen4"): a causal transformer on a delayed-copy task, a packed bidirectional LSTM,
an orthogonally parametrized MLP (``parametrizations.orthogonal``, ``matrix_exp``), a
spectral-normed MLP (its power iteration updates buffers in every training-mode forward),
float64 L2 softmax regression with two param groups (weights decayed, biases not) and a float64
Poisson GLM (``nn.PoissonNLLLoss``, a loss the closed forms do not know), the last two against
scipy's optimum.

Parts (``--part``):

* ``race``: from the same weights and batches, HF's two closures (``hess``: LBFGS style, exact
  Hessian; ``lo``: ``(loss, outputs)``, Gauss-Newton) against Adam at 1e-3/3e-3/1e-2
  (mini-batch) or ``LBFGS`` default and strong Wolfe (full batch), interleaved in one process at
  equal stepping time (wall clock of ``step()`` only; CPU time recorded too), 1 thread, load
  average at start and end. Ratios are HF's loss (full batch: f − f*) over the best other's.
* ``ops``: on a tiny float64 instance of each model, ``GGNLinearOperator`` and
  ``HessianLinearOperator`` against dense ``J^T H_l J`` and Hessians from
  ``torch.autograd.functional`` (max relative error over 3 random vectors).
* ``opscan``: the same for 30 single operations (linear algebra, scans, norms, pooling,
  sampling) between a weight and a linear head: which double backward reads a cotangent that
  the lean R-op graph drops (a NaN product).
* ``misuse``: wrong closure returns, NaN/Inf data, unused parameters: the error or warning, and
  whether the parameters stayed bit-identical.
* ``spectral``: ``spectral_norm``'s power iteration at every closure call (as trained) or once
  per step (the modules in eval mode after the step's first call), 200 steps.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseen4.py [problem ...] \
        [--part race|ops|opscan|misuse|spectral] [--budget S] [--seed N]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import hessfree

torch.set_num_threads(1)
SEED = 0


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------
@dataclass
class Problem:
    model: Callable[[], nn.Module]
    batches: Callable[[int], tuple]  # step -> (inputs, targets)
    loss: Callable  # (outputs, targets) -> loss (without the groups' weight decay)
    full: tuple
    full_batch: bool = False
    groups: Callable | None = None  # model -> param groups (else model.parameters())
    penalty: Callable | None = None  # model -> ½Σκ‖θ‖² the groups' weight decay adds
    fstar: float | None = None  # scipy's optimum (convex problems)


def _batcher(x, y, size: int, seed: int = 0):
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    perms: list[torch.Tensor] = []

    def batch(step: int):
        per = n // size
        while len(perms) <= step // per:
            perms.append(torch.randperm(n, generator=gen))
        idx = perms[step // per][(step % per) * size : (step % per + 1) * size]
        return x[idx], y[idx]

    return batch


class CausalLM(nn.Module):
    """Token + learned position embeddings, one pre-norm causal encoder layer, a linear head."""

    def __init__(self, vocab: int = 8, d: int = 32, t: int = 16) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.block = nn.TransformerEncoderLayer(
            d, 4, 64, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        h = self.block(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h)).reshape(-1, self.head.out_features)


def p_causal(n: int = 2000, vocab: int = 8, t: int = 16, delay: int = 3) -> Problem:
    """Delayed copy: at position i predict token i − 3 (the first 3 targets: token 0)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(1, vocab, (n, t), generator=gen)
    y = torch.cat([torch.zeros(n, delay, dtype=torch.long), x[:, :-delay]], 1)

    def model():
        torch.manual_seed(SEED)
        return CausalLM(vocab, 32, t)

    return Problem(
        model, _batcher(x, y, 64), lambda o, yy: F.cross_entropy(o, yy.reshape(-1)), (x, y)
    )


class PackedLSTM(nn.Module):
    """Embedding, 2-layer bidirectional LSTM over a packed batch (0 = padding), linear head."""

    def __init__(self, vocab: int = 3, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.rnn = nn.LSTM(d, h, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * h, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = (x != 0).sum(1)
        packed = pack_padded_sequence(self.emb(x), lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        mean = out.sum(1) / lengths.unsqueeze(1).to(out.dtype)  # mean over the real steps
        return self.head(mean)


def p_lstm(n: int = 2000, tmax: int = 20) -> Problem:
    """Majority: tokens 1/2 over random lengths 5-20; label = more 2s than 1s."""
    gen = torch.Generator().manual_seed(12)
    lengths = torch.randint(5, tmax + 1, (n,), generator=gen)
    x = torch.randint(1, 3, (n, tmax), generator=gen)
    x[torch.arange(tmax).expand(n, tmax) >= lengths.unsqueeze(1)] = 0
    y = ((x == 2).sum(1) > (x == 1).sum(1)).long()

    def model():
        torch.manual_seed(SEED)
        return PackedLSTM()

    return Problem(model, _batcher(x, y, 64), F.cross_entropy, (x, y))


def _regression_data(n: int = 2000, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(n, d, generator=gen)
    w1, w2 = torch.randn(d, d, generator=gen) / d**0.5, torch.randn(d, 2, generator=gen)
    y = torch.sin(x @ w1) @ w2 + 0.05 * torch.randn(n, 2, generator=gen)
    return x, y


def p_orth() -> Problem:
    """Regression through a 16×16 orthogonal layer (the default ``matrix_exp`` map)."""
    x, y = _regression_data()

    def model():
        torch.manual_seed(SEED)
        return nn.Sequential(
            parametrizations.orthogonal(nn.Linear(16, 16)),
            nn.Tanh(),
            parametrizations.orthogonal(nn.Linear(16, 16)),
            nn.Tanh(),
            nn.Linear(16, 2),
        )

    return Problem(model, _batcher(x, y, 64), F.mse_loss, (x, y))


def p_spectral() -> Problem:
    """Digits classifier with spectral-normed hidden layers (buffers move in each forward)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)

    def model():
        torch.manual_seed(SEED)
        return nn.Sequential(
            parametrizations.spectral_norm(nn.Linear(64, 64)),
            nn.ReLU(),
            parametrizations.spectral_norm(nn.Linear(64, 64)),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    return Problem(model, _batcher(x, y, 100), F.cross_entropy, (x, y))


def _scipy_fstar(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], n: int) -> float:
    from scipy.optimize import minimize

    res = minimize(
        fun,
        np.zeros(n),
        jac=True,
        method="L-BFGS-B",
        options=dict(maxiter=50000, maxfun=100000, gtol=1e-14, ftol=1e-16, maxcor=30),
    )
    return float(res.fun)


def p_logreg(kappa: float = 1e-3) -> Problem:
    """float64 softmax regression on digits, L2 κ on the weights only (two param groups)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float64) / 16.0, torch.tensor(d.target)

    def model():
        torch.manual_seed(SEED)
        return nn.Linear(64, 10).double()

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(theta, requires_grad=True)
        w, b = t[:640].view(10, 64), t[640:]
        f = F.cross_entropy(x @ w.T + b, y) + 0.5 * kappa * w.square().sum()
        f.backward()
        return f.item(), t.grad.numpy()

    return Problem(
        model,
        lambda step: (x, y),
        F.cross_entropy,
        (x, y),
        full_batch=True,
        groups=lambda m: [
            {"params": [m.weight], "weight_decay": kappa},
            {"params": [m.bias], "weight_decay": 0.0},
        ],
        penalty=lambda m: 0.5 * kappa * m.weight.square().sum(),
        fstar=_scipy_fstar(fun, 650),
    )


def p_poisson(n: int = 3000, d: int = 20) -> Problem:
    """float64 Poisson GLM, log link: counts ~ Poisson(exp(x·w + b)); PoissonNLLLoss."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, :5] *= 3.0  # a few badly scaled features
    w = torch.randn(d, 1, generator=gen, dtype=torch.float64) * 0.1
    y = torch.poisson(torch.exp(x @ w + 0.5), generator=gen)
    loss = nn.PoissonNLLLoss(log_input=True)

    def model():
        torch.manual_seed(SEED)
        return nn.Linear(d, 1).double()

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(theta, requires_grad=True)
        f = loss(x @ t[:d].view(d, 1) + t[d], y)
        f.backward()
        return f.item(), t.grad.numpy()

    return Problem(
        model, lambda step: (x, y), loss, (x, y), full_batch=True, fstar=_scipy_fstar(fun, d + 1)
    )


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "causal": p_causal,
    "lstm": p_lstm,
    "orth": p_orth,
    "spectral": p_spectral,
    "logreg": p_logreg,
    "poisson": p_poisson,
}


# ------------------------------------------------------------------------------------------
# races
# ------------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    step_fn: Callable[[], None] | None
    evaluate: Callable[[], float]
    clock: float = 0.0
    cpu: float = 0.0
    steps: int = 0
    failed: str = ""
    curve: list = field(default_factory=list)
    infos: list = field(default_factory=list)
    warns: list = field(default_factory=list)


def make_runs(prob: Problem, init: dict) -> list[Run]:
    def evaluator(m: nn.Module) -> Callable[[], float]:
        def ev() -> float:
            with torch.no_grad():
                f = prob.loss(m(prob.full[0]), prob.full[1])
                return float(f + prob.penalty(m)) if prob.penalty else float(f)

        return ev

    def fresh() -> nn.Module:
        m = prob.model()
        m.load_state_dict(init)
        return m

    runs = []
    for name in ("HF hess", "HF lo"):
        m = fresh()
        opt = hessfree.HessianFree(prob.groups(m) if prob.groups else m.parameters())
        r = Run(name, m, opt, None, evaluator(m))

        def step(m=m, opt=opt, r=r, lo=name == "HF lo") -> None:
            xb, yb = prob.batches(r.steps)

            def closure():
                if lo:
                    out = m(xb)
                    return prob.loss(out, yb), out
                opt.zero_grad()
                f = prob.loss(m(xb), yb)
                f.backward()
                return f

            opt.step(closure)

        r.step_fn = step
        runs.append(r)
    if prob.full_batch:
        others = (("LBFGS", {}), ("LBFGS-sw", {"line_search_fn": "strong_wolfe"}))
        for name, kw in others:
            m = fresh()
            opt = torch.optim.LBFGS(m.parameters(), **kw)
            r = Run(name, m, opt, None, evaluator(m))

            def step(m=m, opt=opt) -> None:
                def closure():
                    opt.zero_grad()
                    f = prob.loss(m(prob.full[0]), prob.full[1])
                    f = f + prob.penalty(m) if prob.penalty else f  # the groups' decay by hand
                    f.backward()
                    return f

                opt.step(closure)

            r.step_fn = step
            runs.append(r)
    else:
        for lr in (1e-3, 3e-3, 1e-2):
            m = fresh()
            opt = torch.optim.Adam(m.parameters(), lr=lr)
            r = Run(f"Adam {lr:g}", m, opt, None, evaluator(m))

            def step(m=m, opt=opt, r=r) -> None:
                xb, yb = prob.batches(r.steps)
                opt.zero_grad()
                prob.loss(m(xb), yb).backward()
                opt.step()

            r.step_fn = step
            runs.append(r)
    return runs


def interleave(runs: list[Run], budget: float, n_evals: int = 8) -> None:
    """Advance the run with the least stepping time until each has spent ``budget``."""
    for r in runs:
        r.curve.append((0.0, r.evaluate()))
    marks = {r.name: budget / n_evals for r in runs}
    while True:
        live = [r for r in runs if not r.failed and r.clock < budget]
        if not live:
            return
        r = min(live, key=lambda r: r.clock)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                r.step_fn()
            except Exception as err:  # noqa: BLE001 - a failing optimizer is a result
                r.failed = f"{type(err).__name__}: {str(err)[:160]}"
            r.clock += time.perf_counter() - t0
            r.cpu += time.process_time() - c0
        r.warns += [f"{w.category.__name__}: {str(w.message)[:140]}" for w in caught]
        r.steps += 1
        if isinstance(r.opt, hessfree.HessianFree):
            r.infos.append(r.opt.last_step)
        if r.clock >= marks[r.name] or r.clock >= budget or r.failed:
            marks[r.name] = r.clock + budget / n_evals
            r.curve.append((r.clock, r.evaluate()))


def at(curve: list, t: float) -> float:
    best = curve[0][1]
    for s, f in curve:
        if s <= t + 1e-9:
            best = f
    return best


def hf_summary(r: Run) -> str:
    infos = r.infos
    if not infos:
        return r.failed
    lam = [i.damping for i in infos if math.isfinite(i.damping)]
    rho = [i.rho for i in infos if math.isfinite(i.rho)]
    statuses: dict[str, int] = {}
    for i in infos:
        statuses[str(i.status)] = statuses.get(str(i.status), 0) + 1
    pre = getattr(r.opt, "_auto_precond", None)
    lam_s = f"{lam[0]:.3g}/{statistics.median(lam):.3g}/{lam[-1]:.3g}" if lam else "-"
    return (
        f"precond {type(pre).__name__ if pre is not None else 'none'}; λ first/median/last "
        f"{lam_s}; ρ median {statistics.median(rho) if rho else math.nan:.3g}; "
        f"status {statuses}; CG median {statistics.median(i.cg_iters for i in infos)}; "
        f"warnings {sorted(set(r.warns))[:2]} {r.failed}"
    )


#: budget multipliers: the full-batch convex fits converge within a second, the LSTM is slow
BUDGET_SCALE = {"lstm": 2.5, "logreg": 0.25, "poisson": 0.25}


def race(key: str, budget: float) -> None:
    prob = PROBLEMS[key]()
    budget *= BUDGET_SCALE.get(key, 1.0)
    init = {k: v.clone() for k, v in prob.model().state_dict().items()}
    runs = make_runs(prob, init)
    load0 = os.getloadavg()
    interleave(runs, budget, n_evals=64 if prob.full_batch else 8)
    load1 = os.getloadavg()
    fr = (0.125, 0.25, 0.5, 1.0) if prob.full_batch else (0.25, 0.5, 1.0)
    print(
        f"\n#### {key}, seed {SEED} (budget {budget:g} s; load {load0[0]:.2f} -> {load1[0]:.2f})\n"
    )
    ref = prob.fstar if prob.fstar is not None else 0.0
    what = "f − f*" if prob.fstar is not None else "loss"
    heads = " | ".join(f"{what} at {f:g}×" for f in fr)
    print(f"| run | steps | ms/step (wall) | cpu/wall | {heads} | failed |")
    print("|---|---|---|---|" + "---|" * len(fr) + "---|")
    for r in runs:
        q = " | ".join(f"{at(r.curve, budget * f) - ref:.4g}" for f in fr)
        print(
            f"| {r.name} | {r.steps} | {1e3 * r.clock / max(r.steps, 1):.2f} | "
            f"{r.cpu / max(r.clock, 1e-9):.2f} | {q} | {r.failed} |"
        )
    others = [r for r in runs if not isinstance(r.opt, hessfree.HessianFree)]
    best = min(others, key=lambda r: at(r.curve, budget))
    for hf in runs[:2]:
        if prob.fstar is not None:
            gap = [
                (at(hf.curve, budget * f) - prob.fstar)
                / max(at(best.curve, budget * f) - prob.fstar, 1e-300)
                for f in fr
            ]
            end = at(hf.curve, budget) - prob.fstar
            print(
                f"\n{hf.name}: f − f* {end:.3g} (scipy f* {prob.fstar:.12g}); over {best.name}'s "
                f"({at(best.curve, budget) - prob.fstar:.3g}): "
                + " / ".join(f"{g:.3g}" for g in gap)
            )
        else:
            ratio = [at(hf.curve, budget * f) / at(best.curve, budget * f) for f in fr]
            print(f"\n{hf.name} / {best.name} loss: " + " / ".join(f"{x:.3g}" for x in ratio))
        print(f"- {hf_summary(hf)}")


# ------------------------------------------------------------------------------------------
# operators against dense float64 oracles
# ------------------------------------------------------------------------------------------
def _tiny(key: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    torch.manual_seed(0)
    if key == "causal":
        m, x = CausalLM(5, 8, 6), torch.randint(1, 5, (3, 6))
        y = torch.cat([torch.zeros(3, 2, dtype=torch.long), x[:, :-2]], 1).reshape(-1)
        return m.double(), x, y, nn.CrossEntropyLoss()
    if key == "lstm":
        m, x = PackedLSTM(3, 3, 3), torch.tensor([[1, 2, 2, 0], [2, 1, 0, 0], [1, 1, 2, 1]])
        return m.double(), x, torch.tensor([1, 0, 0]), nn.CrossEntropyLoss()
    if key == "orth":
        m = nn.Sequential(
            parametrizations.orthogonal(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2)
        ).double()
        return m, torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2).double(), nn.MSELoss()
    if key == "spectral":
        m = nn.Sequential(
            parametrizations.spectral_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)
        ).double()
        m.eval()  # the power iteration's buffers frozen: one function for oracle and operator
        return (
            m,
            torch.randn(6, 4, dtype=torch.float64),
            torch.tensor([0, 1, 2, 0, 1, 2]),
            (nn.CrossEntropyLoss()),
        )
    if key == "logreg":
        m = nn.Linear(4, 3).double()
        return (
            m,
            torch.randn(7, 4, dtype=torch.float64),
            torch.randint(0, 3, (7,)),
            (nn.CrossEntropyLoss()),
        )
    m = nn.Linear(4, 1).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    return m, x, torch.poisson(torch.full((7, 1), 2.0, dtype=torch.float64)), nn.PoissonNLLLoss()


def ops(key: str) -> None:
    model, x, y, loss_fn = _tiny(key)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def call(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, params, (x,))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels' backward has no derivative
        out = call(theta)
        J = torch.autograd.functional.jacobian(lambda t: call(t).reshape(-1), theta)
        HL = torch.autograd.functional.hessian(
            lambda o: loss_fn(o.view(out.shape), y), out.detach().reshape(-1)
        )
        dense = {
            "GGN": J.T @ HL @ J,
            "Hessian": torch.autograd.functional.hessian(lambda t: loss_fn(call(t), y), theta),
        }
    rng = np.random.default_rng(0)
    V = rng.standard_normal((len(theta), 3))
    for name, cls in (
        ("GGN", hessfree.GGNLinearOperator),
        ("Hessian", hessfree.HessianLinearOperator),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                op = cls(model, loss_fn, [(x, y)])
                got = np.stack([op @ V[:, j] for j in range(3)], 1)
                want = dense[name].numpy() @ V
                err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
                msg = f"max rel. error {err:.2e}"
            except Exception as e:  # noqa: BLE001 - a failure is a result
                msg = f"{type(e).__name__}: {str(e)[:160]}"
        print(
            f"| {key} | {name} | {len(theta)} | {msg} | {[str(w.message)[:80] for w in caught]} |"
        )


# ------------------------------------------------------------------------------------------
# misuse: is the error clear, are the parameters untouched?
# ------------------------------------------------------------------------------------------
def misuse() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=gen), torch.randn(32, 1, generator=gen)
    bad = x.clone()
    bad[3, 2] = math.nan

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

    def lbfgs(m, opt, inputs=x, targets=y):
        def closure():
            opt.zero_grad()
            f = F.mse_loss(m(inputs), targets)
            f.backward()
            return f

        return closure

    def lo(m, opt, inputs=x, targets=y):
        def closure():
            out = m(inputs)
            return F.mse_loss(out, targets), out

        return closure

    def returning(value_of):  # a closure factory from (m, out, loss) -> what it returns
        def make(m, opt):
            def closure():
                opt.zero_grad()
                out = m(x)
                f = F.mse_loss(out, y)
                return value_of(m, out, f)

            return closure

        return make

    def no_grad(m, opt):
        def closure():
            with torch.no_grad():
                out = m(x)
                return F.mse_loss(out, y), out

        return closure

    def backward_and_outputs(m, opt):
        def closure():
            opt.zero_grad()
            out = m(x)
            f = F.mse_loss(out, y)
            f.backward()
            return f, out

        return closure

    def nan_later(m, opt):
        calls = [0]

        def closure():
            calls[0] += 1
            inputs = bad if calls[0] > 6 else x  # steps 1-3 clean (2 calls each), then NaN
            out = m(inputs)
            return F.mse_loss(out, y), out

        return closure

    def unreached(m, opt):
        return lo(m, opt)

    cases: list[tuple[str, Callable, Callable[[nn.Module], object]]] = [
        ("returns None (LBFGS style)", returning(lambda m, o, f: f.backward()), None),
        ("returns a numpy array", returning(lambda m, o, f: f.detach().numpy()), None),
        ("returns (outputs, loss)", returning(lambda m, o, f: (o, f)), None),
        ("returns a loss with reduction='none'", returning(lambda m, o, f: (o - y) ** 2), None),
        ("returns (loss, {'out': outputs})", returning(lambda m, o, f: (f, {"out": o})), None),
        ("returns (loss, outputs.detach())", returning(lambda m, o, f: (f, o.detach())), None),
        ("returns (loss, outputs of another forward)", returning(lambda m, o, f: (f, m(x))), None),
        ("returns a loss computed under no_grad", no_grad, None),
        ("calls backward() and returns (loss, outputs)", backward_and_outputs, None),
        (
            "NaN in the inputs from the first step, (loss, outputs)",
            lambda m, o: lo(m, o, bad),
            None,
        ),
        ("NaN in the inputs from the first step, LBFGS style", lambda m, o: lbfgs(m, o, bad), None),
        ("NaN in the inputs from step 4", nan_later, None),
        ("Inf in the targets, LBFGS style", lambda m, o: lbfgs(m, o, x, y / 0.0), None),
        ("an extra parameter the loss never uses", unreached, "extra"),
        ("only parameters the loss never uses", unreached, "only_extra"),
    ]
    print("| misuse | outcome (3 steps) | parameters |\n|---|---|---|")
    for name, make, params in cases:
        m = net()
        extra = nn.Parameter(torch.randn(3))
        plist = list(m.parameters()) + [extra] if params == "extra" else list(m.parameters())
        if params == "only_extra":
            plist = [extra]
        before = [p.detach().clone() for p in [*m.parameters(), extra]]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt = hessfree.HessianFree(plist)
                closure = make(m, opt)
                for _ in range(6 if make is nan_later else 3):
                    opt.step(closure)
                outcome = f"ran: {opt.last_step.status}"
            except Exception as e:  # noqa: BLE001 - the error is the result
                outcome = f"{type(e).__name__}: {str(e)[:230]}"
        after = [*m.parameters(), extra]
        moved = [
            i for i, (a, p) in enumerate(zip(before, after, strict=True)) if not torch.equal(a, p)
        ]
        finite = all(torch.isfinite(p).all() for p in after)
        ws = sorted({str(w.message)[:150] for w in caught})
        note = f"; warnings: {ws}" if ws else ""
        state = "unchanged" if not moved else f"moved {len(moved)} tensors"
        print(f"| {name} | {outcome}{note} | {state}, {'finite' if finite else 'NON-FINITE'} |")


# ------------------------------------------------------------------------------------------
# spectral_norm: one power iteration per closure call, or one per step
# ------------------------------------------------------------------------------------------
def spectral(steps: int = 200) -> None:
    """200 steps off the clock; ``once/step`` puts the ``_SpectralNorm`` modules in eval mode
    after the step's first closure call (as Adam's one forward per step does)."""
    from torch.nn.utils.parametrizations import _SpectralNorm

    global SEED
    print("| seed | power iteration | closure | statuses | train loss |\n|---|---|---|---|---|")
    for seed in (0, 1, 2):
        SEED = seed
        prob = p_spectral()
        init = {k: v.clone() for k, v in prob.model().state_dict().items()}
        for once in (False, True):
            for lo in (False, True):
                m = prob.model()
                m.load_state_dict(init)
                norms = [mod for mod in m.modules() if isinstance(mod, _SpectralNorm)]
                opt = hessfree.HessianFree(m.parameters())
                statuses: dict[str, int] = {}
                for k in range(steps):
                    xb, yb = prob.batches(k)
                    calls = [0]

                    def closure(
                        m=m, opt=opt, xb=xb, yb=yb, calls=calls, lo=lo, once=once, norms=norms
                    ):
                        calls[0] += 1
                        if once:
                            for mod in norms:
                                mod.train(calls[0] == 1)
                        if lo:
                            out = m(xb)
                            return F.cross_entropy(out, yb), out
                        opt.zero_grad()
                        f = F.cross_entropy(m(xb), yb)
                        f.backward()
                        return f

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        opt.step(closure)
                    key = str(opt.last_step.status)
                    statuses[key] = statuses.get(key, 0) + 1
                for mod in norms:
                    mod.train(False)
                with torch.no_grad():
                    f = float(prob.loss(m(prob.full[0]), prob.full[1]))
                how = "once per step" if once else "every call"
                print(f"| {seed} | {how} | {'lo' if lo else 'hess'} | {statuses} | {f:.4g} |")


# ------------------------------------------------------------------------------------------
# which operations' double backward reads a cotangent (the lean R-op graph's placeholders)
# ------------------------------------------------------------------------------------------
class _Op(nn.Module):
    def __init__(self, f: Callable) -> None:
        super().__init__()
        torch.manual_seed(0)  # the head's initial weights
        gen = torch.Generator().manual_seed(0)
        eye = torch.eye(4, dtype=torch.float64)
        self.W = nn.Parameter(torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.3 + eye)
        self.f, self.head = f, nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.f(x, self.W))


def _img(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return (x @ W).reshape(-1, 1, 2, 2)


OPS: dict[str, Callable] = {
    "matrix_exp": lambda x, W: x @ torch.linalg.matrix_exp(W - W.T),
    "inv": lambda x, W: x @ torch.linalg.inv(W),
    "solve": lambda x, W: torch.linalg.solve(W, x.T).T,
    "solve_triangular": lambda x, W: (
        torch.linalg.solve_triangular(
            torch.tril(W) + 2 * torch.eye(4, dtype=W.dtype), x.T, upper=False
        ).T
    ),
    "lu_solve": lambda x, W: torch.linalg.lu_solve(*torch.linalg.lu_factor(W), x.T).T,
    "pinv": lambda x, W: x @ torch.linalg.pinv(W),
    "det": lambda x, W: x * torch.linalg.det(W),
    "slogdet": lambda x, W: x * torch.linalg.slogdet(W)[1],
    "eigh": lambda x, W: x * torch.linalg.eigvalsh(W + W.T),
    "svdvals": lambda x, W: x * torch.linalg.svdvals(W),
    "matrix_norm(2)": lambda x, W: x * torch.linalg.matrix_norm(W, ord=2),
    "cholesky": lambda x, W: x @ torch.linalg.cholesky(W @ W.T + torch.eye(4, dtype=W.dtype)),
    "qr": lambda x, W: x @ torch.linalg.qr(W)[0],
    "householder_product": lambda x, W: (
        x @ torch.linalg.householder_product(W, torch.tensor([1.2, 0.5, 0.3, 0.1], dtype=W.dtype))
    ),
    "matrix_power(3)": lambda x, W: x @ torch.linalg.matrix_power(W, 3),
    "cumprod": lambda x, W: x * torch.cumprod(W[0], 0),
    "logcumsumexp": lambda x, W: torch.logcumsumexp(x @ W, 1),
    "prod": lambda x, W: x * W.prod(0),
    "cdist": lambda x, W: torch.cdist(x, W),
    "normalize": lambda x, W: F.normalize(x @ W, dim=1),
    "rms_norm": lambda x, W: F.rms_norm(x @ W, (4,)),
    "group_norm": lambda x, W: F.group_norm((x @ W).unsqueeze(-1), 2).squeeze(-1),
    "softmax/logsumexp": lambda x, W: torch.softmax(x @ W, 1) * torch.logsumexp(x, 1, True),
    "sort/amax": lambda x, W: torch.sort(x @ W, 1)[0] * (x @ W).amax(1, keepdim=True),
    "atan2/pow1.5": lambda x, W: torch.atan2(x @ W, x) + (x @ W).abs().pow(1.5),
    "rfft": lambda x, W: torch.fft.rfft(x @ W, dim=1).abs()[:, :2].repeat(1, 2),
    "mish/silu/glu": lambda x, W: (
        F.mish(x @ W) + F.silu(x @ W) + F.glu(torch.cat([x @ W, x], 1), 1)
    ),
    "max_pool2d": lambda x, W: F.max_pool2d(_img(x, W), 2).reshape(-1, 1).expand(-1, 4),
    "avg_pool/interp": lambda x, W: F.interpolate(
        F.avg_pool2d(_img(x, W), 1), size=(2, 2), mode="bilinear"
    ).reshape(-1, 4),
    "reflect pad/unfold": lambda x, W: (
        F.unfold(F.pad(_img(x, W), (1, 1, 1, 1), "reflect"), 2).sum(-1).reshape(-1, 4)
    ),
    "grid_sample": lambda x, W: F.grid_sample(
        _img(x, W), torch.tanh(x @ W).reshape(-1, 1, 2, 2)[..., :2].expand(-1, 2, 2, 2)
    ).reshape(-1, 4),
}


def opscan() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    print("| operation | GGN vs dense float64 | Hessian vs dense float64 |\n|---|---|---|")
    for name, f in OPS.items():
        m = _Op(f)
        names = [n for n, _ in m.named_parameters()]
        shapes = [p.shape for _, p in m.named_parameters()]
        theta = torch.cat([p.detach().reshape(-1) for _, p in m.named_parameters()])

        def call(flat: torch.Tensor, m=m, names=names, shapes=shapes) -> torch.Tensor:
            parts = flat.split([s.numel() for s in shapes])
            params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
            return functional_call(m, params, (x,))

        cells = []
        for cls in (hessfree.GGNLinearOperator, hessfree.HessianLinearOperator):
            try:
                if cls is hessfree.GGNLinearOperator:
                    J = torch.autograd.functional.jacobian(lambda t: call(t).reshape(-1), theta)
                    dense = J.T @ J * (2 / y.numel())
                else:
                    dense = torch.autograd.functional.hessian(
                        lambda t: F.mse_loss(call(t), y), theta
                    )
            except Exception as e:  # noqa: BLE001 - torch itself cannot: no oracle
                cells.append(f"no oracle ({type(e).__name__})")
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    op = cls(m, nn.MSELoss(), [(x, y)])
                    v = np.random.default_rng(0).standard_normal(op.shape[0])
                    got, want = op @ v, dense.numpy() @ v
                    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
                    cells.append(f"{err:.1e}" if np.isfinite(err) else "**NaN**")
                except Exception as e:  # noqa: BLE001 - a failure is a result
                    cells.append(f"{type(e).__name__}: {str(e)[:90]}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(PROBLEMS))
    ap.add_argument(
        "--part", default="race", choices=["race", "ops", "misuse", "cost", "spectral", "opscan"]
    )
    ap.add_argument("--budget", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    global SEED
    SEED = args.seed
    print(f"torch {torch.__version__}, hessfree from {hessfree.__file__}")
    if args.part in ("misuse", "spectral", "opscan"):
        return {"misuse": misuse, "spectral": spectral, "opscan": opscan}[args.part]()
    if args.part == "ops":
        print("| problem | operator | n | vs dense float64 | warnings |\n|---|---|---|---|---|")
    for key in args.problems:
        race(key, args.budget) if args.part == "race" else ops(key)


if __name__ == "__main__":
    main()
