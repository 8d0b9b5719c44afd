"""`HessianFree(params)` with no arguments on mini-batch problems the scorecard does not have,
against Adam at its best of three rates: the user's own training loop, a closure per batch.

Each problem builds its model and data from fixed seeds (``sklearn``'s digits or synthetic data)
and runs, from the same initial weights and the same batch sequence, ``HessianFree(params)``
(closure returning ``(loss, outputs)``) and ``torch.optim.Adam`` at lr 1e-3, 3e-3 and 1e-2,
interleaved in one process at equal stepping time (``_unseen.interleave``; evaluation off the
clock, in eval mode). Reported per problem: the full train-set loss and a held-out metric at
¼, ½ and 1× the budget, HF's over the best Adam's (best = lowest final train loss), steps, a
step's cost in Adam steps, and HF's own diagnostics (λ, floor, ρ, CG iterations and stops,
K-FAC in use).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseenmb.py [problem ...] \
        [--budget S] [--variants NAME ...]

Problems: ln, cnnbn, grucls, attn, reg1e3, embed, lsce; grureg (``_unseen.py``'s, a reference);
drop (a dropout MLP, for ``replay_rng``: dropoutrng).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from typing import Any

import _unseen
import torch
from torch import nn

import hessfree

torch.set_num_threads(1)

#: ``--variants``: HF settings run beside the defaults, for diagnosis
SETTINGS: dict[str, dict] = {
    "precond=None": {"precond": None},
    "rmd=0": {"relative_min_damping": 0.0},
    "cg_max_iter=10": {"cg_max_iter": 10},
    "no floor refresh": {"_floor": "off"},
    "refresh every step kind": {"_floor": "all"},
    "cg_rtol=0": {"cg_rtol": 0.0},
    "cg_decay=0": {"cg_decay": 0.0},
    "cg_decay=0 + refresh": {"cg_decay": 0.0, "_floor": "all"},
    "masked warm start": {"_floor": "masked"},
    "masked, refresh": {"_floor": "masked all"},
    "replay_rng=False": {"replay_rng": False},  # each closure call draws new dropout masks
    # dropdefault: replay_rng's λ rule under mask noise (hold λ when |Δf − Δq| <= the noise)
    "replay_rng=True": {"replay_rng": True},  # with the hold (dropdefault)
    "replay as shipped": {"replay_rng": True, "_noise": "off"},  # dropoutrng's, no hold
    "replay+noise": {"replay_rng": True},  # the same as replay_rng=True (tables' name)
    "replay+pred": {"replay_rng": True, "_noise": "pred"},  # hold when |Δq| <= the noise
    "replay+two": {"replay_rng": True, "_noise": "two"},  # raise on 2 poor steps, no descent
}


def set_noise_rule(opt: hessfree.HessianFree, rule: str | None) -> None:
    """``--variants``' ``_noise``: replay_rng's hold of λ switched off, or replaced by one of
    the rules tried and not kept (dropdefault)."""
    if rule is None:
        return
    if rule == "off":
        opt._hold_within_noise = False
        return

    def inconclusive(state, run, actual, predicted, rho) -> bool:
        if not math.isfinite(run.mask_noise):
            return False
        if rule == "pred":  # the predicted decrease within the mask noise
            return abs(predicted) <= run.mask_noise
        poor, prev = not rho >= 0.25, state.get("poor_prev", False)  # "two"
        state["poor_prev"] = poor
        return not (poor and prev and not actual < 0)

    opt._inconclusive = inconclusive


@contextlib.contextmanager
def floor_mode(mode: str):
    """``'off'``: the relative floor keeps its first-step scale (before cnnmb's running
    maximum); ``'all'``: its scale is refreshed on every kind of step, not only K-FAC ones
    (CG's iteration cap still sees whether K-FAC is in use); ``''``: as the code has it.
    With ``'masked'`` in it: the warm start 0 where this batch's gradient is exactly 0 (tried in
    unseenmb, not adopted)."""
    hf = hessfree.HessianFree
    saved = hf._raise_floor, hf._kfac_in_use, hf._cg_max_iter, hf._warm_start
    if "masked" in mode:
        plain = saved[3]

        def masked(self, product, g, state):  # on a stochastic objective only
            stochastic = state.get("deterministic") is False
            x0 = plain(self, product, g, state)
            return x0.mul_(g != 0) if x0 is not None and stochastic else x0

        hf._warm_start = masked
    if mode == "off":
        hf._raise_floor = lambda self, *args: None
    elif mode.endswith("all"):
        in_use, cap = saved[1], saved[2]
        hf._kfac_in_use = lambda self: True
        hf._cg_max_iter = lambda self, run, *, kfac=False: cap(
            self, run, kfac=kfac and in_use(self)
        )
    try:
        yield
    finally:
        hf._raise_floor, hf._kfac_in_use, hf._cg_max_iter, hf._warm_start = saved


# ---------------------------------------------------------------------------------------------
# Problems: (make model, train x, y, test x, y, loss, batch, metric name, metric)
# ---------------------------------------------------------------------------------------------


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


def ln() -> dict:
    """MLP 64-128-128-10 with LayerNorm and Dropout(0.1), digits, cross-entropy, batch 64."""
    x, y, xt, yt = _unseen.digits()

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(128, 10),
        )  # fmt: skip

    return dict(title="MLP + LayerNorm + Dropout(0.1), digits, CE, batch 64", make=make,
                data=(x, y, xt, yt), loss=nn.functional.cross_entropy, batch=64,
                metric="test acc", score=accuracy, higher=True)  # fmt: skip


def drop() -> dict:
    """MLP 64-256-256-10, ReLU, Dropout(0.3) after each hidden layer, digits, CE, batch 64."""
    x, y, xt, yt = _unseen.digits()

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(256, 10),
        )  # fmt: skip

    return dict(title="MLP 64-256-256-10 + Dropout(0.3), digits, CE, batch 64", make=make,
                data=(x, y, xt, yt), loss=nn.functional.cross_entropy, batch=64,
                metric="test acc", score=accuracy, higher=True)  # fmt: skip


def cnnbn() -> dict:
    """Conv-BN-ReLU-MaxPool ×2 + linear head on digits 8×8, cross-entropy, batch 64."""
    x, y, xt, yt = _unseen.digits()
    x, xt = x.view(-1, 1, 8, 8), xt.view(-1, 1, 8, 8)

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128, 10),
        )  # fmt: skip

    return dict(title="CNN conv-BN-ReLU-maxpool ×2 + linear, digits, CE, batch 64", make=make,
                data=(x, y, xt, yt), loss=nn.functional.cross_entropy, batch=64,
                metric="test acc", score=accuracy, higher=True)  # fmt: skip


class GRUCls(nn.Module):
    def __init__(self, classes: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(u)
        return self.head(h[:, -1])


def freq_data(n: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy sine segments; the class is the frequency's quartile in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    w = 0.1 + 0.8 * torch.rand(n, generator=g)
    ph = 6.28 * torch.rand(n, 1, generator=g)
    s = torch.arange(t, dtype=torch.float32)
    u = torch.sin(w[:, None] * s + ph) + 0.3 * torch.randn(n, t, generator=g)
    return u.unsqueeze(-1), ((w - 0.1) / 0.2).long().clamp(0, 3)


def grucls() -> dict:
    """nn.GRU(1→32) classifier of a sine's frequency quartile, T = 40, CE, batch 64."""
    x, y = freq_data(2048, 40, 0)
    xt, yt = freq_data(512, 40, 1)
    return dict(title="GRU(1→32) sequence classifier (frequency quartile), T = 40, CE, batch 64",
                make=GRUCls, data=(x, y, xt, yt), loss=nn.functional.cross_entropy, batch=64,
                metric="test acc", score=accuracy, higher=True)  # fmt: skip


class TinyTransformer(nn.Module):
    """Embedding + learned positions, one pre-LN block (single-head softmax attention, MLP),
    mean pooling, linear head. Written out (no fused attention kernel, so double backward works)."""

    def __init__(self, vocab: int = 16, t: int = 16, d: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(t, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = self.emb(tok) + self.pos
        q, k, v = self.qkv(self.ln1(h)).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        h = h + self.proj(a @ v)
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


def order_data(n: int, t: int, seed: int, vocab: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens 2..vocab-1 with one 0 and one 1 placed at random: is the 0 before the 1?"""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(2, vocab, (n, t), generator=g)
    pos = torch.stack([torch.randperm(t, generator=g)[:2] for _ in range(n)])
    rows = torch.arange(n)
    tok[rows, pos[:, 0]] = 0
    tok[rows, pos[:, 1]] = 1
    return tok, (pos[:, 0] < pos[:, 1]).long()


def attn() -> dict:
    x, y = order_data(2048, 16, 0)
    xt, yt = order_data(512, 16, 1)
    return dict(title="one-block transformer (emb + softmax attention + LayerNorm), token order, "
                "CE, batch 64", make=TinyTransformer, data=(x, y, xt, yt),
                loss=nn.functional.cross_entropy, batch=64, metric="test acc", score=accuracy,
                higher=True)  # fmt: skip


def reg1e3() -> dict:
    """MLP 8-64-64-1 regression, MSE, targets of scale 1e3 (a smooth function × 1000 + 2000)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2560, 8, generator=g)
    w = torch.randn(8, generator=g)
    f = 1000.0 * (torch.sin(x @ w / 2) + 0.3 * x[:, 0] * x[:, 1]) + 2000.0
    f = f + 20.0 * torch.randn(len(f), generator=g)
    x, xt, f, ft = x[:2048], x[2048:], f[:2048], f[2048:]

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                             nn.Linear(64, 1), nn.Flatten(0))  # fmt: skip

    def rel_rmse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        return ((model(x) - y).square().mean().sqrt() / y.std()).item()

    return dict(title="MLP 8-64-64-1 regression, MSE, targets ≈ 2000 ± 1000, batch 64",
                make=make, data=(x, f, xt, ft), loss=nn.functional.mse_loss, batch=64,
                metric="test RMSE/std", score=rel_rmse, higher=False)  # fmt: skip


class BagOfWords(nn.Module):
    def __init__(self, vocab: int = 2000, d: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tok).mean(1))


def topic_data(n: int, seed: int, vocab: int = 2000, t: int = 20) -> tuple[torch.Tensor, ...]:
    """Documents of 20 tokens: half from a Zipf-like common vocabulary, half from the topic's
    own 100 words (4 topics), so most rows of the table get no gradient in a batch."""
    g = torch.Generator().manual_seed(12345)  # the topics are the same for train and test
    topic_words = torch.randperm(vocab, generator=g)[:400].view(4, 100)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (n,), generator=g)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float32)
    common = torch.multinomial(zipf, n * t // 2, replacement=True, generator=g).view(n, t // 2)
    own = topic_words[y][torch.arange(n)[:, None], torch.randint(100, (n, t // 2), generator=g)]
    # a fraction of documents get a random topic's words (label noise, so it is not trivial)
    flip = torch.rand(n, generator=g) < 0.2
    y = torch.where(flip, torch.randint(4, (n,), generator=g), y)
    return torch.cat([common, own], 1), y


def embed() -> dict:
    x, y = topic_data(2048, 0)
    xt, yt = topic_data(512, 1)
    return dict(title="bag-of-words: Embedding(2000, 32) + MLP, 4 topics, CE, batch 64",
                make=BagOfWords, data=(x, y, xt, yt), loss=nn.functional.cross_entropy,
                batch=64, metric="test acc", score=accuracy, higher=True)  # fmt: skip


def lsce() -> dict:
    """MLP 64-128-10 with label-smoothed cross-entropy (0.1), digits, batch 64."""
    x, y, xt, yt = _unseen.digits()

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, t, label_smoothing=0.1)

    return dict(title="MLP 64-128-10, label-smoothed CE (0.1), digits, batch 64", make=make,
                data=(x, y, xt, yt), loss=loss, batch=64, metric="test acc", score=accuracy,
                higher=True)  # fmt: skip


def grureg() -> dict:
    """Reference, not new: ``_unseen.py``'s GRU(2→32) sine regression (MSE, batch 128), where
    cnnmb found the floor's refresh 3.6× worse on plain-CG steps."""
    x, y = _unseen.seq_data(1024, 30, 0)
    xt, yt = _unseen.seq_data(256, 30, 1)

    def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        return nn.functional.mse_loss(model(x), y).item()

    return dict(title="(reference) _unseen.py's GRU(2→32) regression, T = 30, MSE, batch 128",
                make=lambda: _unseen.SeqReg(nn.GRU), data=(x, y, xt, yt),
                loss=nn.functional.mse_loss, batch=128, metric="test MSE", score=mse,
                higher=False)  # fmt: skip


PROBLEMS: dict[str, Callable[[], dict]] = {
    "ln": ln, "cnnbn": cnnbn, "grucls": grucls, "attn": attn, "reg1e3": reg1e3,
    "embed": embed, "lsce": lsce, "grureg": grureg, "drop": drop,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The race
# ---------------------------------------------------------------------------------------------


def race(key: str, budget: float, variants: list[str], lrs=(1e-3, 3e-3, 1e-2)) -> None:
    p = PROBLEMS[key]()
    x, y, xt, yt = p["data"]
    loss_fn, batch = p["loss"], p["batch"]
    torch.manual_seed(0)
    model0 = p["make"]()
    contenders = [("HF", {})] + [(f"HF {v}", SETTINGS[v]) for v in variants]
    contenders += [(f"Adam {lr:g}", {"lr": lr}) for lr in lrs]
    runs = []
    for name, kw in contenders:
        model = copy.deepcopy(model0)
        hf = name.startswith("HF")
        kw = dict(kw)
        old = kw.pop("_floor", "")
        noise = kw.pop("_noise", None)
        opt = hessfree.HessianFree(model.parameters(), **kw) if hf else torch.optim.Adam(
            model.parameters(), **kw)  # fmt: skip
        set_noise_rule(opt, noise)
        step = _unseen.minibatch_step(
            model, opt, x, y, batch, loss_fn, hf, lambda old=old: floor_mode(old)
        )

        def evaluate(model: nn.Module = model) -> float:
            return _unseen.train_set_loss(model, loss_fn, x, y)

        r = _unseen.Run(name, step, evaluate, opt)
        r.model = model  # type: ignore[attr-defined]
        r.scores = []  # type: ignore[attr-defined]
        runs.append(r)

    # the held-out metric at ¼, ½, 1×: wrap evaluate so each evaluation also scores the test set
    for r in runs:
        inner = r.evaluate

        def ev(r=r, inner=inner) -> float:
            f = inner()
            r.model.eval()
            with torch.no_grad():
                s = p["score"](r.model, xt, yt)
            r.model.train()
            r.scores.append(s)
            return f

        r.evaluate = ev
    load0 = open("/proc/loadavg").read().split()[:3]
    _unseen.interleave(runs, budget, eval_every=budget / 20)
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"\n#### {key}: {p['title']}; {budget:g} s each; load {' '.join(load0)} → "
          f"{' '.join(load1)}\n")  # fmt: skip
    n = sum(q.numel() for q in model0.parameters())
    print(f"{n} parameters\n")

    def at(r, frac: float) -> tuple[float, float]:
        i = next(i for i, (t, _) in enumerate(r.curve) if t >= frac * budget or
                 i == len(r.curve) - 1)  # fmt: skip
        return r.curve[i][1], r.scores[i]

    adams = [r for r in runs if r.name.startswith("Adam") and not r.failed]
    best = min(adams, key=lambda r: r.curve[-1][1])
    adam_step = best.clock / best.steps
    print(f"| run | steps | step / best Adam's | loss ¼ | ½ | 1× | {p['metric']} ¼ | ½ | 1× |"
          " loss / best Adam's ¼ | ½ | 1× |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        vals = [at(r, f) for f in (0.25, 0.5, 1.0)]
        ref = [at(best, f) for f in (0.25, 0.5, 1.0)]
        ratio = " | ".join(
            f"{v[0] / max(b[0], 1e-300):.3g}" for v, b in zip(vals, ref, strict=True)
        )
        print(f"| {r.name}{' (best)' if r is best else ''} | {r.steps} | "
              f"{r.clock / max(r.steps, 1) / adam_step:.3g} | "
              + " | ".join(f"{v[0]:.4g}" for v in vals) + " | "
              + " | ".join(f"{v[1]:.3f}" for v in vals) + f" | {ratio} |")  # fmt: skip
    # one evaluation is one draw of a spiky curve: the median over the second half is steadier
    print("\n| run | median loss, evaluations in (½, 1×] | median " + p["metric"] + " |")
    print("|---|---|---|")
    for r in runs:
        late = [i for i, (t, _) in enumerate(r.curve) if t > 0.5 * budget] or [-1]
        print(f"| {r.name} | {statistics.median(r.curve[i][1] for i in late):.4g} | "
              f"{statistics.median(r.scores[i] for i in late):.3f} |")  # fmt: skip
    print()
    for r in runs:
        if r.failed or r.warns:
            print(f"- {r.name}: {r.failed} {' | '.join(sorted(set(r.warns)))[:400]}")
        if r.infos:
            infos = [i for i in r.infos if i is not None]
            rho = [i.rho for i in infos if math.isfinite(i.rho)]
            reasons: dict[str, int] = {}
            for i in infos:
                reasons[str(i.cg_reason)] = reasons.get(str(i.cg_reason), 0) + 1
            lam = [i.damping for i in infos]
            flo = [i.damping_floor for i in infos]
            at_floor = sum(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(lam, flo, strict=True))
            kf = r.opt._kfac_in_use()
            print(f"- {r.name}: λ {'→'.join(f'{v:.2g}' for v in _unseen._sample(lam, 6))}; "
                  f"floor {'→'.join(f'{v:.2g}' for v in _unseen._sample(flo, 4))}; at floor "
                  f"{at_floor}/{len(infos)}; ρ med "
                  f"{statistics.median(rho) if rho else math.nan:.2f}"
                  f" (ρ=-inf {sum(i.rho == -math.inf for i in infos)}); CG med "
                  f"{statistics.median(i.cg_iters for i in infos):.0f} {reasons}; rate<1 "
                  f"{sum(0 < i.step_rate < 1 for i in infos)}; rejected "
                  f"{sum(not i.accepted for i in infos)}; K-FAC {kf}; closure calls med "
                  f"{statistics.median(i.closure_calls for i in infos):.0f}")  # fmt: skip
    sys.stdout.flush()


def equal_steps(
    key: str, n: int, variants: list[str], lrs=(1e-3, 3e-3, 1e-2), seed: int = 1
) -> None:
    """Off the clock: ``n`` steps of each contender from the same weights and batches; the
    train-set loss after ¼, ½ and all of them (how much a step buys, whatever it costs).
    ``seed`` seeds the batches and, per contender, the global stream (dropout's masks)."""
    p = PROBLEMS[key]()
    x, y, xt, yt = p["data"]
    loss_fn, batch = p["loss"], p["batch"]
    torch.manual_seed(0)
    model0 = p["make"]()
    print(f"\n#### {key}: {n} steps each, off the clock, seed {seed}\n")
    print(f"| run | loss after {n // 4} | {n // 2} | {n} | {p['metric']} after {n} | ρ=-inf "
          f"| λ | median loss, every {max(n // 20, 1)} steps in ({n // 2}, {n}] |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    contenders = [("HF", {})] + [(f"HF {v}", SETTINGS[v]) for v in variants]
    contenders += [(f"Adam {lr:g}", {"lr": lr}) for lr in lrs]
    for name, kw in contenders:
        model = copy.deepcopy(model0)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the same dropout stream for every contender
        minus_inf = 0
        kw = dict(kw)
        mode = kw.pop("_floor", "")
        noise = kw.pop("_noise", None)
        hf = name.startswith("HF")
        opt = hessfree.HessianFree(model.parameters(), **kw) if hf else torch.optim.Adam(
            model.parameters(), **kw)  # fmt: skip
        set_noise_rule(opt, noise)
        lams, late = [], []
        out = []
        for k in range(1, n + 1):
            idx = torch.randint(len(y), (batch,), generator=gen)
            xb, yb = x[idx], y[idx]
            if hf:

                def closure(model=model, xb=xb, yb=yb) -> Any:
                    o = model(xb)
                    return loss_fn(o, yb), o

                with floor_mode(mode), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt.step(closure)
                minus_inf += opt.last_step.rho == -math.inf
                lams.append(opt.last_step.damping)
            else:
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
            if k in (n // 4, n // 2, n):
                out.append(_unseen.train_set_loss(model, loss_fn, x, y))
            if k > n // 2 and k % max(n // 20, 1) == 0:  # a steadier late figure than one point
                late.append(out[-1] if k in (n // 2, n) else _unseen.train_set_loss(
                    model, loss_fn, x, y))  # fmt: skip
        model.eval()
        with torch.no_grad():
            s = p["score"](model, xt, yt)
        lam = "→".join(f"{v:.2g}" for v in _unseen._sample(lams, 5)) if hf else ""
        print(f"| {name} | " + " | ".join(f"{v:.4g}" for v in out) + f" | {s:.3f} | "
              f"{minus_inf if hf else ''} | {lam} | {statistics.median(late):.4g} |")  # fmt: skip
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems", nargs="*", default=list(PROBLEMS))
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--variants", nargs="*", default=[], choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=0, help="equal steps off the clock instead")
    ap.add_argument("--lrs", type=float, nargs="*", default=[1e-3, 3e-3, 1e-2], help="Adam's")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1], help="with --steps")
    a = ap.parse_args()
    bad = [k for k in a.problems if k not in PROBLEMS]
    if bad:
        raise SystemExit(f"unknown problem(s) {bad}; known: {list(PROBLEMS)}")
    print("load at start:", open("/proc/loadavg").read().strip())
    for key in a.problems:
        if a.steps:
            for seed in a.seeds:
                equal_steps(key, a.steps, a.variants, lrs=tuple(a.lrs), seed=seed)
        else:
            race(key, a.budget, a.variants, lrs=tuple(a.lrs))
    print("\nload at end:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
