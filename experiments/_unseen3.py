"""`HessianFree(params)` with no arguments on a third round of problems the team had not tried
(topic "unseen3"): unusual losses under the Gauss-Newton ``(loss, outputs)`` closure, unusual
modules (attention with a key-padding mask, depthwise convolution, padded embeddings, tied
weights, weight norm, a mixture-density head), a long-range LSTM, a deep autoencoder, and
full-batch problems in an ``LBFGS`` loop.

Each problem builds its model and data from fixed seeds (``sklearn``'s digits or synthetic)
and runs, from the same weights and the same batch sequence, ``HessianFree(params)`` against
what a user would pick instead, interleaved in one process at equal stepping time (wall clock
of ``step()`` only; evaluation off the clock). Mini-batch: ``torch.optim.Adam`` at 1e-3, 3e-3,
1e-2 (best = lowest final train loss); full batch: ``torch.optim.LBFGS`` default and
``line_search_fn='strong_wolfe'``. HF's diagnostics (λ, ρ, CG, rejections, warnings, the
preconditioner ``'auto'`` chose) are printed with each table.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseen3.py [problem ...] \
        [--budget S] [--variants NAME ...] [--probe]

``--probe`` runs 30 HF steps per problem off the clock and prints the diagnostics only.
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

import torch
import torch.nn.functional as F
from torch import nn

import hessfree
from hessfree.preconditioning import _LinearPass

torch.set_num_threads(1)

#: ``--seed``: the initial weights' seed of the tied/untied language model (0 elsewhere)
SEED = 0


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target)


def sparse_init(model: nn.Module, k: int = 15) -> None:
    """Martens (2010) §5: k incoming N(0, 1) weights per unit, the rest and biases 0."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                w = torch.zeros_like(m.weight)
                for i in range(w.shape[0]):
                    idx = torch.randperm(w.shape[1], generator=gen)[: min(k, w.shape[1])]
                    w[i, idx] = torch.randn(len(idx), generator=gen)
                m.weight.copy_(w)
                m.bias.zero_()


@dataclass
class Problem:
    """A model factory, the batches, the closure's loss, and a train-set evaluation."""

    model: Callable[[], nn.Module]
    batches: Callable[[int], tuple]  # step -> (inputs, targets)
    loss: Callable  # (outputs, targets) -> loss
    full: tuple  # the whole training set
    full_batch: bool = False
    forward: Callable | None = None  # (model, inputs) -> outputs (default: model(inputs))
    hidden: bool = False  # closure returns record_hidden's states (recurrent)
    reg: Callable | None = None  # model -> a penalty the user adds to the loss (L2)


def _batcher(x, y, size: int, seed: int = 0):
    n = len(x) if not isinstance(x, tuple) else len(x[0])
    gen = torch.Generator().manual_seed(seed)
    perms: list[torch.Tensor] = []

    def batch(step: int):
        per = n // size
        while len(perms) <= step // per:
            perms.append(torch.randperm(n, generator=gen))
        idx = perms[step // per][(step % per) * size : (step % per + 1) * size]
        xs = tuple(t[idx] for t in x) if isinstance(x, tuple) else x[idx]
        return xs, y[idx]

    return batch


# --- losses under the Gauss-Newton closure, on digits features ---------------------------
def _mlp(n_in, n_out, width=64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, n_out))


def p_gaussnll() -> Problem:
    """Heteroscedastic regression: predict pixel 36 and its variance from the other pixels."""
    x, _ = digits()
    y = x[:, 36] * 4 + 0.3 * torch.randn(len(x), generator=torch.Generator().manual_seed(1))
    x = torch.cat([x[:, :36], x[:, 37:]], 1)

    def loss(out, t):
        return F.gaussian_nll_loss(out[:, 0], t, F.softplus(out[:, 1]) + 1e-4)

    return Problem(lambda: _mlp(63, 2), _batcher(x, y, 128), loss, (x, y))


def p_mdn() -> Problem:
    """Mixture density head (3 Gaussians): y = ±sqrt(pixel mean) branch, bimodal."""
    x, _ = digits()
    gen = torch.Generator().manual_seed(2)
    s = torch.where(torch.rand(len(x), generator=gen) < 0.5, 1.0, -1.0)
    y = s * x.mean(1).sqrt() * 3 + 0.1 * torch.randn(len(x), generator=gen)

    def loss(out, t):
        logit, mu, logsig = out[:, :3], out[:, 3:6], out[:, 6:].clamp(-7, 5)
        z = (t[:, None] - mu) / logsig.exp()
        comp = -0.5 * z**2 - logsig - 0.5 * math.log(2 * math.pi)
        return -torch.logsumexp(F.log_softmax(logit, 1) + comp, 1).mean()

    return Problem(lambda: _mlp(64, 9), _batcher(x, y, 128), loss, (x, y))


def p_poisson() -> Problem:
    x, _ = digits()
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 3, generator=gen) * 0.3
    y = torch.poisson((x @ w).exp(), generator=gen)
    return Problem(
        lambda: _mlp(64, 3), _batcher(x, y, 128), lambda o, t: F.poisson_nll_loss(o, t), (x, y)
    )


def p_huber() -> Problem:
    """Regression with 10 % gross outliers: Huber (GN of a piecewise loss)."""
    x, lab = digits()
    gen = torch.Generator().manual_seed(4)
    y = lab.float()[:, None] + 0.1 * torch.randn(len(x), 1, generator=gen)
    out = torch.rand(len(x), 1, generator=gen) < 0.1
    y = torch.where(out, y + 30 * torch.randn(len(x), 1, generator=gen), y)
    return Problem(
        lambda: _mlp(64, 1),
        _batcher(x, y, 128),
        lambda o, t: F.huber_loss(o, t, delta=1.0),
        (x, y),
    )


def p_bce() -> Problem:
    """Multi-label: which of 4 digit groups (even, ≥5, prime, 0 or 1) the image is in."""
    x, lab = digits()
    y = torch.stack([lab % 2 == 0, lab >= 5, torch.isin(lab, torch.tensor([2, 3, 5, 7])), lab < 2])
    y = y.T.float()
    return Problem(
        lambda: _mlp(64, 4),
        _batcher(x, y, 128),
        lambda o, t: F.binary_cross_entropy_with_logits(o, t),
        (x, y),
    )


def p_kl() -> Problem:
    """Distillation: KL to a teacher's soft labels given as log-probabilities."""
    x, lab = digits()
    t = F.log_softmax(3.0 * F.one_hot(lab, 10).float() + 0.5 * torch.randn(len(x), 10), 1)
    return Problem(
        lambda: _mlp(64, 10),
        _batcher(x, t, 128),
        lambda o, t: F.kl_div(F.log_softmax(o, 1), t, reduction="batchmean", log_target=True),
        (x, t),
    )


def p_ceweights() -> Problem:
    """Cross-entropy with class weights and 20 % of labels ignored (-100)."""
    x, lab = digits()
    y = lab.clone()
    y[torch.rand(len(y), generator=torch.Generator().manual_seed(5)) < 0.2] = -100
    w = torch.linspace(0.5, 2.0, 10)
    return Problem(
        lambda: _mlp(64, 10),
        _batcher(x, y, 128),
        lambda o, t: F.cross_entropy(o, t, weight=w),
        (x, y),
    )


def p_abs15() -> Problem:
    x, lab = digits()
    y = F.one_hot(lab, 10).float()
    return Problem(
        lambda: _mlp(64, 10),
        _batcher(x, y, 128),
        lambda o, t: ((o - t).abs() ** 1.5).mean(),
        (x, y),
    )


# --- modules --------------------------------------------------------------------------------
def _tokens(n=2000, vocab=30, tmax=20, seed=6):
    """Variable-length token sequences (padding 0); label: is token 1 before token 2."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, tmax + 1, (n,), generator=gen)
    tok = torch.randint(3, vocab, (n, tmax), generator=gen)
    y = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        a, b = torch.randperm(int(lens[i]), generator=gen)[:2].tolist()
        tok[i, a], tok[i, b] = 1, 2
        y[i] = int(a < b)
        tok[i, int(lens[i]) :] = 0
    return tok, y


class Attn(nn.Module):
    def __init__(self, vocab=30, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(20, d))
        self.att = nn.MultiheadAttention(d, 4, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, tok):
        pad = tok == 0
        h = self.emb(tok) + self.pos
        a, _ = self.att(h, h, h, key_padding_mask=pad, need_weights=False)
        h = h + a
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def p_attn() -> Problem:
    tok, y = _tokens()

    def model():
        torch.manual_seed(0)
        return Attn()

    return Problem(model, _batcher(tok, y, 100), F.cross_entropy, (tok, y))


class Bag(nn.Module):
    def __init__(self, vocab=30, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, tok):
        keep = (tok != 0).unsqueeze(-1).float()
        return self.mlp((self.emb(tok) * keep).sum(1) / keep.sum(1))


def p_bag() -> Problem:
    """Mean-pooled padded embeddings: token 1 count > token 2 count (a bag can tell)."""
    gen = torch.Generator().manual_seed(7)
    tok = torch.randint(1, 30, (2000, 20), generator=gen)
    lens = torch.randint(5, 21, (2000,), generator=gen)
    tok[torch.arange(20)[None, :] >= lens[:, None]] = 0
    y = ((tok == 1).sum(1) > (tok == 2).sum(1)).long()

    def model():
        torch.manual_seed(0)
        return Bag()

    return Problem(model, _batcher(tok, y, 100), F.cross_entropy, (tok, y))


class DWConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(8, 8, 5, padding=2, groups=8),  # depthwise
            nn.Conv1d(8, 16, 1),
            nn.ReLU(),
            nn.Conv1d(16, 16, 5, padding=2, groups=4),  # grouped
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )

    def forward(self, x):
        return self.net(x)


def p_dwconv() -> Problem:
    x, lab = digits()
    x = x.view(-1, 8, 8)  # rows as channels, columns as time

    def model():
        torch.manual_seed(0)
        return DWConv()

    return Problem(model, _batcher(x, lab, 100), F.cross_entropy, (x, lab))


class TiedLM(nn.Module):
    def __init__(self, vocab=40, d=48, tie=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(2 * d, d)
        self.out = nn.Linear(d, vocab)
        if tie:
            self.out.weight = self.emb.weight  # tied input/output embeddings

    def forward(self, ctx):  # two previous tokens -> next
        e = self.emb(ctx).flatten(1)
        return self.out(torch.tanh(self.mix(e)))


def p_tied(tie: bool = True) -> Problem:
    """Next token of a second-order Markov chain from the previous two (vocab 40)."""
    gen = torch.Generator().manual_seed(8)
    v = 40
    table = torch.randint(0, v, (v, v, 2), generator=gen)
    seq = [0, 1]
    for _ in range(4000):
        a, b = seq[-2], seq[-1]
        nxt = table[a, b, int(torch.rand(1, generator=gen) < 0.3)]
        seq.append(int(nxt))
    s = torch.tensor(seq)
    ctx = torch.stack([s[:-2], s[1:-1]], 1)
    y = s[2:]

    def model():
        torch.manual_seed(SEED)
        return TiedLM(tie=tie)

    return Problem(model, _batcher(ctx, y, 100), F.cross_entropy, (ctx, y))


def p_wnorm() -> Problem:
    x, lab = digits()

    def model():
        torch.manual_seed(0)
        wn = nn.utils.parametrizations.weight_norm
        return nn.Sequential(wn(nn.Linear(64, 64)), nn.Tanh(), wn(nn.Linear(64, 10)))

    return Problem(model, _batcher(x, lab, 100), F.cross_entropy, (x, lab))


class Piecewise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 10)

    def forward(self, x):
        h = self.a(x)
        h = torch.where(h > 0, h, 0.1 * h.clamp(min=-1))  # leaky, then flat below -1
        h = self.b(h).relu() + F.hardtanh(h)
        return self.c(h)


def p_piece() -> Problem:
    x, lab = digits()

    def model():
        torch.manual_seed(0)
        return Piecewise()

    return Problem(model, _batcher(x, lab, 100), F.cross_entropy, (x, lab))


# --- recurrent and autoencoder --------------------------------------------------------------
class LSTMCls(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(h[:, -1])


def p_xor(T: int = 50) -> Problem:
    """Delayed XOR (Martens & Sutskever 2011's XOR task, simplified): two marked ±1 bits among
    noise; the class is their XOR, read at the last of T steps."""
    gen = torch.Generator().manual_seed(9)
    n = 4000
    x = torch.zeros(n, T, 2)
    x[:, :, 0] = torch.rand(n, T, generator=gen) * 2 - 1
    bits = torch.randint(0, 2, (n, 2), generator=gen)
    for i in range(n):
        a = int(torch.randint(0, T // 2, (1,), generator=gen))
        b = int(torch.randint(T // 2, T, (1,), generator=gen))
        x[i, a, 0], x[i, b, 0] = bits[i, 0] * 2.0 - 1, bits[i, 1] * 2.0 - 1
        x[i, a, 1] = x[i, b, 1] = 1.0
    y = (bits[:, 0] ^ bits[:, 1]).long()

    def model():
        torch.manual_seed(0)
        m = LSTMCls()
        m.lstm = nn.LSTM(2, 32, batch_first=True)
        return m

    return Problem(model, _batcher(x, y, 100), F.cross_entropy, (x[:1000], y[:1000]), hidden=True)


def p_ae(sparse: bool = False, full_batch: bool = False) -> Problem:
    x, _ = digits()

    def model():
        torch.manual_seed(0)
        sizes = [64, 48, 32, 16, 8, 16, 32, 48, 64]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i != 3 and i != len(sizes) - 2:  # linear code layer, logits out
                layers.append(nn.Sigmoid())
        m = nn.Sequential(*layers)
        if sparse:
            sparse_init(m)
        return m

    loss = lambda o, t: F.binary_cross_entropy_with_logits(o, t, reduction="sum") / len(t)  # noqa: E731
    if full_batch:
        return Problem(model, lambda s: (x, x), loss, (x, x), full_batch=True)
    return Problem(model, _batcher(x, x, 200), loss, (x, x))


# --- full batch -----------------------------------------------------------------------------
class Exps(nn.Module):
    """y = a1 exp(-k1 t) + a2 exp(-k2 t) + c, badly scaled: amplitudes ~1e3, rates ~1e-2/1."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([500.0, 500.0], dtype=torch.float64))
        self.k = nn.Parameter(torch.tensor([0.05, 0.5], dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def forward(self, t):
        return (self.a * torch.exp(-self.k * t[:, None])).sum(1) + self.c


def p_exps() -> Problem:
    t = torch.linspace(0, 100, 200, dtype=torch.float64)
    gen = torch.Generator().manual_seed(10)
    y = 1200 * torch.exp(-0.013 * t) + 300 * torch.exp(-0.9 * t) + 20
    y = y + 0.5 * torch.randn(200, generator=gen, dtype=torch.float64)
    return Problem(Exps, lambda s: (t, y), F.mse_loss, (t, y), full_batch=True)


def p_sep() -> Problem:
    """Logistic regression on digits 3 vs 8 (nearly separable), L2 1e-4 in the loss."""
    x, lab = digits()
    keep = (lab == 3) | (lab == 8)
    x, y = x[keep].double(), (lab[keep] == 8).double()

    def model():
        torch.manual_seed(0)
        return nn.Linear(64, 1).double()

    def loss(o, t):
        return F.binary_cross_entropy_with_logits(o[:, 0], t)

    def reg(m):
        return 1e-4 * (m.weight**2).sum()

    return Problem(model, lambda s: (x, y), loss, (x, y), full_batch=True, reg=reg)


def p_smallres() -> Problem:
    """float64 tanh MLP fitted to a teacher of the same shape plus 1e-3 noise: small residual,
    where Gauss-Newton converges (nearly) quadratically."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 4, generator=gen, dtype=torch.float64)

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()

    with torch.no_grad():
        y = make(123)(x) + 1e-3 * torch.randn(300, 2, generator=gen, dtype=torch.float64)

    def model():
        m = make(123)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(
                    0.3
                    * torch.randn(
                        p.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
                    )
                )
        return m

    return Problem(model, lambda s: (x, y), F.mse_loss, (x, y), full_batch=True)


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "gaussnll": p_gaussnll,
    "mdn": p_mdn,
    "poisson": p_poisson,
    "huber": p_huber,
    "bce": p_bce,
    "kl": p_kl,
    "ceweights": p_ceweights,
    "abs15": p_abs15,
    "attn": p_attn,
    "bag": p_bag,
    "dwconv": p_dwconv,
    "tied": p_tied,
    "untied": lambda: p_tied(tie=False),
    "wnorm": p_wnorm,
    "piece": p_piece,
    "xor50": p_xor,
    "ae": p_ae,
    "aesparse": lambda: p_ae(sparse=True),
    "aefb": lambda: p_ae(full_batch=True),
    "exps": p_exps,
    "sep": p_sep,
    "smallres": p_smallres,
}


# ------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    step_fn: Callable[[], None]
    evaluate: Callable[[], float]
    clock: float = 0.0
    cpu: float = 0.0
    steps: int = 0
    failed: str = ""
    curve: list = field(default_factory=list)
    infos: list = field(default_factory=list)
    warns: list = field(default_factory=list)


def make_runs(prob: Problem, init: dict, variants: dict[str, dict]) -> list[Run]:
    runs = []

    def forward(m, xb):
        return prob.forward(m, xb) if prob.forward else m(xb)

    def evaluator(m):
        def ev() -> float:
            with torch.no_grad():
                f = prob.loss(forward(m, prob.full[0]), prob.full[1])
                return float(f + prob.reg(m)) if prob.reg else float(f)

        return ev

    def hf(name, kw):
        m = prob.model()
        m.load_state_dict(init)
        kw = dict(kw)
        old_pass = kw.pop("_old_pass", False)
        opt = hessfree.HessianFree(m.parameters(), **kw)
        r = Run(name, m, opt, None, evaluator(m))

        def step():
            if not old_pass:
                return step_once()
            new = _LinearPass.layers
            _LinearPass.layers = _layers_before_unseen3
            try:
                step_once()
            finally:
                _LinearPass.layers = new

        def step_once():
            xb, yb = prob.batches(r.steps)

            def closure():
                if prob.hidden:
                    with hessfree.record_hidden(m) as rec:
                        out = forward(m, xb)
                    return prob.loss(out, yb), out, rec.hidden
                out = forward(m, xb)
                f = prob.loss(out, yb)
                return (f + prob.reg(m) if prob.reg else f), out

            opt.step(closure)

        r.step_fn = step
        return r

    runs.append(hf("HF", {}))
    for name, kw in variants.items():
        runs.append(hf(name, kw))
    if prob.full_batch:
        for name, kw in (("LBFGS", {}), ("LBFGS-sw", {"line_search_fn": "strong_wolfe"})):
            m = prob.model()
            m.load_state_dict(init)
            opt = torch.optim.LBFGS(m.parameters(), **kw)
            r = Run(name, m, opt, None, evaluator(m))

            def step(m=m, opt=opt):
                xb, yb = prob.batches(0)

                def closure():
                    opt.zero_grad()
                    loss = prob.loss(forward(m, xb), yb)
                    loss = loss + prob.reg(m) if prob.reg else loss
                    loss.backward()
                    return loss

                opt.step(closure)

            r.step_fn = step
            runs.append(r)
    else:
        for lr in (1e-3, 3e-3, 1e-2):
            m = prob.model()
            m.load_state_dict(init)
            opt = torch.optim.Adam(m.parameters(), lr=lr)
            r = Run(f"Adam {lr:g}", m, opt, None, evaluator(m))

            def step(m=m, opt=opt, r=r):
                xb, yb = prob.batches(r.steps)
                opt.zero_grad()
                prob.loss(forward(m, xb), yb).backward()
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
                r.failed = f"{type(err).__name__}: {str(err)[:200]}"
            r.clock += time.perf_counter() - t0
            r.cpu += time.process_time() - c0
        r.warns += [f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught]
        r.steps += 1
        if isinstance(r.opt, hessfree.HessianFree):
            r.infos.append(r.opt.last_step)
        if r.clock >= marks[r.name] or r.clock >= budget or r.failed:
            marks[r.name] = r.clock + budget / n_evals
            r.curve.append((r.clock, r.evaluate()))


def at(curve, t):
    """The last evaluated loss at or before time t."""
    best = curve[0][1]
    for s, f in curve:
        if s <= t + 1e-9:
            best = f
    return best


def precond_name(opt: hessfree.HessianFree) -> str:
    p = getattr(opt, "_auto_precond", None)
    return type(p).__name__ if p is not None else "none"


def hf_summary(r: Run) -> str:
    infos = r.infos
    if not infos:
        return ""
    lam = [i.damping for i in infos if math.isfinite(i.damping)]
    rho = [i.rho for i in infos if math.isfinite(i.rho)]
    statuses: dict[str, int] = {}
    for i in infos:
        statuses[str(i.status)] = statuses.get(str(i.status), 0) + 1
    reasons: dict[str, int] = {}
    for i in infos:
        reasons[i.cg_reason] = reasons.get(i.cg_reason, 0) + 1
    rising = sum(i.loss_after > i.loss for i in infos)
    return (
        f"precond={precond_name(r.opt)} λ first/median/last {lam[0]:.3g}/"
        f"{statistics.median(lam):.3g}/{lam[-1]:.3g} max {max(lam):.3g}; "
        f"ρ median {statistics.median(rho) if rho else math.nan:.3g}; "
        f"ρ=-inf {sum(i.rho == -math.inf for i in infos)}; status {statuses}; "
        f"CG median {statistics.median(i.cg_iters for i in infos)} stops {reasons}; "
        f"batch loss rose on {rising}; warnings {sorted(set(r.warns))[:3]}"
    )


def _layers_before_unseen3(self, *, skip_shared: bool = False):
    """``_LinearPass.layers`` before unseen3: a weight tied to another module's counted once."""
    return [m for m in self.order if not (skip_shared and self.counts[id(m.weight)] > 1)]


VARIANTS = {
    "K-FAC on tied (before)": {"_old_pass": True},
    "precond=None": {"precond": None},
    "kfac": {"precond": "kfac"},
    "cg_max_iter=10": {"cg_max_iter": 10},
    "structural_damping=0": {"structural_damping": 0.0},
    "fisher": {"curvature": "fisher"},
    "cg_rtol=0": {"cg_rtol": 0.0},
    "precond=martens": {"precond": "martens"},
    "cg_max_iter=250": {"cg_max_iter": 250},
}


def race(key: str, budget: float, variants: list[str]) -> None:
    prob = PROBLEMS[key]()
    init = {k: v.clone() for k, v in prob.model().state_dict().items()}
    runs = make_runs(prob, init, {v: VARIANTS[v] for v in variants})
    load0 = os.getloadavg()
    interleave(runs, budget)
    load1 = os.getloadavg()
    print(f"\n#### {key} (budget {budget:g} s; load {load0[0]:.1f} -> {load1[0]:.1f})\n")
    print("| run | steps | s/step (wall) | cpu/wall | loss ¼ | ½ | 1× | fail |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        q = [at(r.curve, budget * f) for f in (0.25, 0.5, 1.0)]
        print(
            f"| {r.name} | {r.steps} | {r.clock / max(r.steps, 1):.4f} | "
            f"{r.cpu / max(r.clock, 1e-9):.2f} | {q[0]:.4g} | {q[1]:.4g} | {q[2]:.4g} | "
            f"{r.failed} |"
        )
    others = [r for r in runs if not isinstance(r.opt, hessfree.HessianFree)]
    best = min(others, key=lambda r: at(r.curve, budget))
    hf = runs[0]
    ratios = [at(hf.curve, budget * f) / at(best.curve, budget * f) for f in (0.25, 0.5, 1.0)]
    if prob.full_batch:
        fstar = min(min(f for _, f in r.curve) for r in runs)
        gaps = [
            (at(hf.curve, budget * f) - fstar) / max(at(best.curve, budget * f) - fstar, 1e-300)
            for f in (0.25, 0.5, 1.0)
        ]
        print(
            f"\nf* (best seen) {fstar:.10g}; HF f-f* over {best.name}'s: "
            + " / ".join(f"{g:.3g}" for g in gaps)
        )
    print(f"\nHF / {best.name} loss: " + " / ".join(f"{x:.3g}" for x in ratios))
    for r in runs:
        if isinstance(r.opt, hessfree.HessianFree):
            print(f"- {r.name}: {hf_summary(r)}")


def probe(key: str, steps: int = 30, kw: dict | None = None) -> None:
    prob = PROBLEMS[key]()
    init = {k: v.clone() for k, v in prob.model().state_dict().items()}
    (r,) = make_runs(prob, init, {})[:1]
    r.opt = hessfree.HessianFree(r.model.parameters(), **(kw or {}))
    runs = [r]
    # rebuild the step with the new optimizer
    r2 = make_runs(prob, init, {})[0]
    if kw:
        r2.opt.__init__(r2.model.parameters(), **kw)
    runs = [r2]
    interleave(runs, budget=1e9 if False else 0.0)  # only the initial evaluation
    t0 = time.perf_counter()
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                r2.step_fn()
            except Exception as err:  # noqa: BLE001
                r2.failed = f"{type(err).__name__}: {str(err)[:300]}"
                break
        r2.warns += [f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught]
        r2.steps += 1
        r2.infos.append(r2.opt.last_step)
    nonfinite = [n for n, p in r2.model.named_parameters() if not torch.isfinite(p).all()]
    print(
        f"{key}: loss {r2.curve[0][1]:.4g} -> {r2.evaluate():.4g} in {r2.steps} steps "
        f"({time.perf_counter() - t0:.1f} s) {r2.failed} nonfinite params {nonfinite}\n  "
        + hf_summary(r2)
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(PROBLEMS))
    ap.add_argument("--budget", type=float, default=5.0)
    ap.add_argument("--variants", nargs="*", default=[])
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    global SEED
    SEED = args.seed
    for key in args.problems:
        if args.probe:
            probe(key, args.steps)
        else:
            race(key, args.budget, args.variants)


if __name__ == "__main__":
    main()
