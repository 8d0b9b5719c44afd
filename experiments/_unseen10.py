"""unseen10: model families, losses and parameter kinds no earlier pass had tried.

Parts (``python experiments/_unseen10.py [ops|steps|race]``, default all; markdown to stdout):

- ``ops``: ``GGNLinearOperator`` and ``HessianLinearOperator`` of each case (float64, small)
  against explicit float64 matrices from ``torch.autograd.functional`` of the loss on all the
  data (``functional_call``, the operator's parameter order): max |error| / max |entry|.
- ``steps``: 15 ``HessianFree`` steps (defaults) with the LBFGS-style closure (``hess``) and the
  ``(loss, outputs)`` closure (``lo``): first and last loss, statuses, warnings, errors.
- ``race``: HF (both closures) against Adam (1e-3 / 1e-2) and strong-Wolfe ``LBFGS``,
  interleaved by each contender's own CPU time (``time.process_time``), same initial weights.

1 thread (``torch.set_num_threads(1)``; run with ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from hessfree import GGNLinearOperator, HessianFree, HessianLinearOperator

torch.set_num_threads(1)
D = torch.float64


# ---------------------------------------------------------------- models


class TopKMoE(nn.Module):
    """A mixture of experts: a softmax gate over the top-k experts of each input."""

    def __init__(self, d: int = 4, h: int = 6, n_experts: int = 4, k: int = 2, out: int = 2):
        super().__init__()
        self.gate = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, out)) for _ in range(n_experts)
        )
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        scores = self.gate(x)
        top, idx = scores.topk(self.k, dim=-1)
        w = top.softmax(-1)
        all_out = torch.stack([e(x) for e in self.experts], 1)  # (N, E, out)
        picked = all_out.gather(1, idx.unsqueeze(-1).expand(-1, -1, all_out.shape[-1]))
        return (w.unsqueeze(-1) * picked).sum(1)


class DispatchMoE(TopKMoE):
    """Top-k routing that runs each expert on its routed rows only (``index_add``)."""

    def forward(self, x: Tensor) -> Tensor:
        top, idx = self.gate(x).topk(self.k, dim=-1)
        w = top.softmax(-1)
        y = None
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            part = w[rows, slot].unsqueeze(-1) * expert(x[rows])
            y = (part.new_zeros(x.shape[0], part.shape[1]) if y is None else y).index_add(
                0, rows, part
            )
        return y


class TiedAE(nn.Module):
    """A sigmoid autoencoder whose decoder is the encoder's transposed weight (functional)."""

    def __init__(self, d: int = 6, h: int = 3):
        super().__init__()
        self.enc = nn.Linear(d, h)
        self.dec_bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.sigmoid(self.enc(x)), self.enc.weight.t(), self.dec_bias)


class Odd(nn.Module):
    """Parameters of unusual kinds: a 0-dim scale, a zero-size head, a non-contiguous weight
    (a transposed view made a parameter) and a frozen layer, all in one group."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.a.weight = nn.Parameter(self.a.weight.detach().t().contiguous().t())
        self.frozen = nn.Linear(5, 5).requires_grad_(False)
        self.b = nn.Linear(5, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
            self.empty = nn.Linear(5, 0)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.frozen(torch.tanh(self.a(x))))
        return torch.cat([self.b(h) * self.scale, self.empty(h)], -1)


class SwiGLU(nn.Module):
    def __init__(self, d: int = 4, h: int = 5, out: int = 3):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GRUPacked(nn.Module):
    def __init__(self, bidirectional: bool = True):
        super().__init__()
        self.rnn = nn.GRU(2, 3, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(3 * (2 if bidirectional else 1), 2)

    def forward(self, x: Tensor) -> Tensor:
        lengths = (x[..., -1] != 0).sum(1)  # the last channel marks valid steps
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        h = torch.cat(list(h), -1)  # last hidden state of each direction
        return self.head(h)


class MHA(nn.Module):
    def __init__(self, e: int = 4):
        super().__init__()
        self.att = nn.MultiheadAttention(e, 2, batch_first=True)
        self.head = nn.Linear(e, 2)

    def forward(self, x: Tensor) -> Tensor:
        mask = x[..., 0] == 0  # padded positions are exact zeros in channel 0
        o, _ = self.att(x, x, x, key_padding_mask=mask, need_weights=False)
        o = o.masked_fill(mask.unsqueeze(-1), 0.0)
        return self.head(o.sum(1) / (~mask).sum(1, keepdim=True))


class PaddedEncoder(nn.Module):
    """A transformer encoder over right-padded sequences, mean-pooled over every position
    (padded ones included, as many users write it); eval mode (no dropout)."""

    def __init__(self, e: int = 4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(e, 2, 8, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)  # enable_nested_tensor=True (torch's default)
        self.head = nn.Linear(e, 2)

    def forward(self, x: Tensor) -> Tensor:
        mask = x[..., 0] == 0  # padded positions are exact zeros in channel 0
        return self.head(self.enc(x, src_key_padding_mask=mask).mean(1))


class NeuralODE(nn.Module):
    """dz/dt = f(z), f an MLP, unrolled by 8 fixed RK4 steps over t in [0, 1]."""

    def __init__(self, d: int = 2, steps: int = 8):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, d))
        self.steps = steps

    def forward(self, z: Tensor) -> Tensor:
        h = 1.0 / self.steps
        for _ in range(self.steps):
            k1 = self.f(z)
            k2 = self.f(z + h / 2 * k1)
            k3 = self.f(z + h / 2 * k2)
            k4 = self.f(z + h * k3)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return z


class Coupling(nn.Module):
    """Two affine coupling layers; forward returns (z, log|det dz/dx|) as one tensor
    (the last column), so a loss of the outputs is the negative log-likelihood."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.half = d // 2
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(self.half, 6), nn.Tanh(), nn.Linear(6, 2 * self.half))
            for _ in range(2)
        )

    def forward(self, x: Tensor) -> Tensor:
        logdet = x.new_zeros(x.shape[0])
        a, b = x[:, : self.half], x[:, self.half :]
        for i, net in enumerate(self.nets):
            if i % 2:
                a, b = b, a
            s, t = net(a).chunk(2, -1)
            s = torch.tanh(s)
            b = b * s.exp() + t
            logdet = logdet + s.sum(-1)
            if i % 2:
                a, b = b, a
        return torch.cat([a, b, logdet.unsqueeze(-1)], -1)


def flow_nll(out: Tensor, _y: Tensor) -> Tensor:
    z, logdet = out[:, :-1], out[:, -1]
    return (0.5 * z.pow(2).sum(-1) + 0.5 * z.shape[1] * math.log(2 * math.pi) - logdet).mean()


QUANTILES = (0.1, 0.5, 0.9)


def pinball(out: Tensor, y: Tensor) -> Tensor:
    """The quantile (pinball) loss of outputs (N, 3) predicting QUANTILES of targets (N, 1)."""
    e = y - out
    q = torch.tensor(QUANTILES, dtype=out.dtype)
    return torch.maximum(q * e, (q - 1) * e).mean()


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, Callable, Tensor, Tensor]]


def _mlp(d_in: int, d_out: int, *mid: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 5), *mid, nn.Tanh(), nn.Linear(5, d_out))


def _xy(n: int, d: int, out: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, d, generator=g, dtype=D)
    return x, torch.randn(n, out, generator=g, dtype=D)


def _cases(n: int = 12) -> list[Case]:
    def seeded(fn):
        def build():
            torch.manual_seed(0)
            g = torch.Generator().manual_seed(1)
            return fn(g)

        return build

    def moe(g):
        x, y = _xy(n, 4, 2, g)
        return TopKMoE().double(), F.mse_loss, x, y

    def moe_dispatch(g):
        x, y = _xy(n, 4, 2, g)
        return DispatchMoE(k=1).double(), F.mse_loss, x, y

    def tied_ae(g):
        x = torch.rand(n, 6, generator=g, dtype=D)
        return TiedAE().double(), F.binary_cross_entropy_with_logits, x, x

    def odd_params(g):
        x, y = _xy(n, 4, 2, g)
        return Odd().double(), F.mse_loss, x, y

    def swiglu(g):
        x = torch.randn(n, 4, generator=g, dtype=D)
        return SwiGLU().double(), F.cross_entropy, x, torch.randint(0, 3, (n,), generator=g)

    def rmsnorm(g):
        x, y = _xy(n, 4, 2, g)
        return _mlp(4, 2, nn.RMSNorm(5, elementwise_affine=False)).double(), F.mse_loss, x, y

    def layernorm(g):
        x, y = _xy(n, 4, 2, g)
        return _mlp(4, 2, nn.LayerNorm(5, elementwise_affine=False)).double(), F.mse_loss, x, y

    def conv_same(g):
        x = torch.randn(n, 2, 9, generator=g, dtype=D)
        m = nn.Sequential(
            nn.Conv1d(2, 3, 3, dilation=2, padding="same"),
            nn.Tanh(),
            nn.Conv1d(3, 1, 4, dilation=3, padding="same", padding_mode="reflect"),
            nn.Flatten(),
        ).double()
        return m, F.mse_loss, x, torch.randn(n, 9, generator=g, dtype=D)

    def deconv(g):
        x = torch.randn(n, 3, generator=g, dtype=D)
        m = nn.Sequential(
            nn.Linear(3, 8),
            nn.Unflatten(1, (2, 2, 2)),
            nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1),
            nn.Sigmoid(),
            nn.Flatten(),
        ).double()
        t = torch.rand(n, 32, generator=g, dtype=D)
        return m, F.binary_cross_entropy, x, t

    def gru(g):
        lengths = torch.randint(1, 6, (n,), generator=g)
        x = torch.randn(n, 5, 2, generator=g, dtype=D)
        x[..., -1] = x[..., -1].abs() + 0.1
        for i, ell in enumerate(lengths):
            x[i, ell:] = 0.0
        return GRUPacked().double(), F.cross_entropy, x, torch.randint(0, 2, (n,), generator=g)

    def mha(g):
        x = torch.randn(n, 5, 4, generator=g, dtype=D)
        x[:, :, 0] = x[:, :, 0].abs() + 0.1
        lengths = torch.randint(1, 6, (n,), generator=g)
        for i, ell in enumerate(lengths):
            x[i, ell:] = 0.0
        return MHA().double(), F.mse_loss, x, torch.randn(n, 2, generator=g, dtype=D)

    def encoder(g):
        x = torch.randn(n, 5, 4, generator=g, dtype=D)
        x[:, :, 0] = x[:, :, 0].abs() + 0.1
        lengths = torch.randint(1, 6, (n,), generator=g)
        for i, ell in enumerate(lengths):
            x[i, ell:] = 0.0
        return (
            PaddedEncoder().double().eval(),
            F.mse_loss,
            x,
            torch.randn(n, 2, generator=g, dtype=D),
        )

    def node(g):
        x, _ = _xy(n, 2, 2, g)
        y = torch.stack([x[:, 0] * 0.5 - x[:, 1], x[:, 0] + 0.3 * x[:, 1].tanh()], 1)
        return NeuralODE().double(), F.mse_loss, x, y

    def flow(g):
        x = torch.randn(n, 4, generator=g, dtype=D) * torch.tensor([1.0, 0.5, 2.0, 0.3], dtype=D)
        return Coupling().double(), flow_nll, x, torch.zeros(n, dtype=D)

    def quantile(g):
        x = torch.randn(n, 4, generator=g, dtype=D)
        return _mlp(4, 3).double(), pinball, x, torch.randn(n, 1, generator=g, dtype=D)

    def ranking(g):
        x = torch.randn(n, 4, generator=g, dtype=D)
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(D)
        loss = lambda o, y: F.margin_ranking_loss(o[:, 0], o[:, 1], y, margin=0.5)  # noqa: E731
        return _mlp(4, 2).double(), loss, x, sign

    def mlsm(g):
        x = torch.randn(n, 4, generator=g, dtype=D)
        t = (torch.rand(n, 3, generator=g) < 0.4).to(D)
        return _mlp(4, 3).double(), F.multilabel_soft_margin_loss, x, t

    def huber_beta(g):
        x, y = _xy(n, 4, 2, g)
        loss = lambda o, t: F.smooth_l1_loss(o, 3 * t, beta=0.5)  # noqa: E731
        return _mlp(4, 2).double(), loss, x, y

    def gauss_nll(g):
        x, y = _xy(n, 4, 1, g)

        def loss(o, t):
            return F.gaussian_nll_loss(o[:, :1], t, F.softplus(o[:, 1:]) + 1e-3)

        return _mlp(4, 2).double(), loss, x, y

    def ce_sum(g):
        x = torch.randn(n, 4, generator=g, dtype=D)
        w = torch.tensor([1.0, 2.0, 0.5], dtype=D)
        y = torch.randint(0, 3, (n,), generator=g)
        y[::4] = -100

        def loss(o, t):
            return F.cross_entropy(o, t, weight=w, label_smoothing=0.1, reduction="sum")

        return _mlp(4, 3).double(), loss, x, y

    return [
        Case(k.__name__, seeded(k))
        for k in (
            moe,
            moe_dispatch,
            tied_ae,
            odd_params,
            swiglu,
            rmsnorm,
            layernorm,
            conv_same,
            deconv,
            gru,
            mha,
            encoder,
            node,
            flow,
            quantile,
            ranking,
            mlsm,
            huber_beta,
            gauss_nll,
            ce_sum,
        )
    ]


# ---------------------------------------------------------------- oracles


def dense(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> dict[str, np.ndarray]:
    """Float64 H and Jᵀ H_ℓ J of ``loss_fn(model(x), y)`` by ``torch.autograd.functional``."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def f(t: Tensor) -> Tensor:
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return functional_call(model, dict(zip(named, parts, strict=True)), (x,))

    # torch's fused attention kernel has no double backward: the oracle takes the math path
    with sdpa_kernel(SDPBackend.MATH):
        out = f(theta).detach()
        J = jacobian(lambda t: f(t).reshape(-1), theta)
        HL = hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1))
        H = hessian(lambda t: loss_fn(f(t), y), theta)
    return dict(H=H.numpy(), G=(J.T @ HL @ J).numpy())


def part_ops() -> None:
    print("\n## ops: operators against dense float64 (max |err| / max |entry|)\n")
    print("| case | params | H err | G err | note |\n|---|---|---|---|---|")
    for case in _cases():
        model, loss_fn, x, y = case.build()
        model.eval()
        n_par = sum(p.numel() for p in model.parameters())
        row = [case.name, str(n_par)]
        try:
            ref = dense(model, loss_fn, x, y)
        except Exception as err:  # noqa: BLE001 (a table row, not control flow)
            print(f"| {case.name} | {n_par} | - | - | oracle: {type(err).__name__}: {err} |")
            continue
        note = []
        for kind, cls in (("H", HessianLinearOperator), ("G", GGNLinearOperator)):
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    op = cls(model, loss_fn, (x, y))
                    M = op @ np.eye(op.shape[0])
                err = np.abs(M - ref[kind]).max() / max(np.abs(ref[kind]).max(), 1e-300)
                row.append(f"{err:.1e}")
                note += [f"{kind} warns: {str(m.message)[:80]}" for m in w]
            except Exception as err:  # noqa: BLE001
                row.append("raised")
                note.append(f"{kind}: {type(err).__name__}: {str(err)[:150]}")
        print("| " + " | ".join(row) + " | " + "; ".join(note) + " |")


def _run_hf(model, loss_fn, x, y, style: str, steps: int, **kw) -> dict:
    opt = HessianFree(model.parameters(), **kw)

    def hess():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    def lo():
        out = model(x)
        return loss_fn(out, y), out

    closure = hess if style == "hess" else lo
    with torch.enable_grad():
        first = float(loss_fn(model(x), y))
    statuses, msgs = [], []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            for _ in range(steps):
                opt.step(closure)
                statuses.append(str(opt.last_step.status).split(".")[-1][:12])
        except Exception as err:  # noqa: BLE001
            msgs.append(f"{type(err).__name__}: {str(err)[:200]}")
        msgs += sorted({str(m.message)[:120] for m in w})
    with torch.enable_grad():  # as the closures see it (no_grad: attention's fast path)
        last = float(loss_fn(model(x), y))
    return dict(first=first, last=last, statuses=statuses, msgs=msgs, opt=opt)


def part_steps() -> None:
    print("\n## steps: 15 default HessianFree steps per closure style\n")
    print("| case | style | loss 0 | loss 15 | statuses | messages |\n|---|---|---|---|---|---|")
    settings = [("hess", {}), ("lo", {}), ("lo", {"curvature": "hessian"})]
    settings += [("lo", {"curvature": "fisher"})]
    for case in _cases(64):
        for style, kw in settings:
            model, loss_fn, x, y = case.build()
            r = _run_hf(model, loss_fn, x, y, style, 15, **kw)
            style = style + "".join(f" {v}" for v in kw.values())
            from collections import Counter

            st = ", ".join(f"{k} {v}" for k, v in Counter(r["statuses"]).items())
            print(
                f"| {case.name} | {style} | {r['first']:.4g} | {r['last']:.4g} | {st} | "
                + "; ".join(r["msgs"])
                + " |"
            )


def part_race(budget: float = 2.0, only: tuple[str, ...] = ()) -> None:
    """Each contender steps in turn, each by its own CPU time, from the same weights."""
    print(f"\n## race: loss at {budget} s CPU each (full batch, n = 256), interleaved\n")
    print("| case | HF hess | HF lo | LBFGS sw | Adam 1e-3 | Adam 1e-2 | load |")
    print("|---|---|---|---|---|---|---|")
    import copy

    for case in _cases(256):
        if only and case.name not in only:
            continue
        load0 = os.getloadavg()[0]
        model0, loss_fn, x, y = case.build()
        names = ["hess", "lo", "lbfgs", "adam3", "adam2"]
        models = {k: copy.deepcopy(model0) for k in names}
        opts = {
            "hess": HessianFree(models["hess"].parameters()),
            "lo": HessianFree(models["lo"].parameters()),
            "lbfgs": torch.optim.LBFGS(models["lbfgs"].parameters(), line_search_fn="strong_wolfe"),
            "adam3": torch.optim.Adam(models["adam3"].parameters(), lr=1e-3),
            "adam2": torch.optim.Adam(models["adam2"].parameters(), lr=1e-2),
        }
        spent = dict.fromkeys(names, 0.0)
        failed = {}

        def closure_for(k, models=models, opts=opts, loss_fn=loss_fn, x=x, y=y):
            m, o = models[k], opts[k]
            if k == "lo":
                return lambda: (lambda out: (loss_fn(out, y), out))(m(x))

            def c(m=m, o=o, loss_fn=loss_fn, x=x, y=y):
                o.zero_grad()
                loss = loss_fn(m(x), y)
                loss.backward()
                return loss

            return c

        closures = {k: closure_for(k) for k in names}
        while min(spent[k] for k in names if k not in failed) < budget:
            for k in names:
                if k in failed or spent[k] >= budget:
                    continue
                t0 = time.process_time()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        opts[k].step(closures[k])
                except Exception as err:  # noqa: BLE001
                    failed[k] = f"{type(err).__name__}: {str(err)[:60]}"
                spent[k] += time.process_time() - t0
            if all(k in failed for k in names):
                break
        res = []
        for k in names:
            with torch.enable_grad():  # as the closures see it (no_grad: attention's fast path)
                v = float(loss_fn(models[k](x), y))
            res.append(failed.get(k, f"{v:.4g}"))
        print(f"| {case.name} | " + " | ".join(res) + f" | {load0:.1f}-{os.getloadavg()[0]:.1f} |")


def part_smooth(budget: float = 3.0) -> None:
    """K-FAC's reduction on a label-smoothed, summed cross-entropy: before (the reduction not
    read, taken as 'mean') against after (read from the NLL term), interleaved by CPU time."""
    import copy

    import hessfree.optimizer as hfopt
    from hessfree.curvature import _loss_node, _read_reduction

    def before(loss, outputs):  # main's reading: nothing through the two-term graph
        return None if _loss_node(loss, outputs) is None else _read_reduction(loss, outputs)

    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data / 16.0, dtype=torch.float32)
    Y = torch.tensor(data.target)
    print(
        f"\n## smooth: digits MLP 64-64-10, CE label_smoothing=0.1, reduction='sum', {budget} s\n"
    )
    print("| batch | seed | before | after | after/before | Adam 1e-3 (mean CE) | load |")
    print("|---|---|---|---|---|---|---|")

    def loss_fn(o, y):
        return F.cross_entropy(o, y, label_smoothing=0.1, reduction="sum")

    for batch in (len(X), 250):
        for seed in (0, 1):
            load0 = os.getloadavg()[0]
            torch.manual_seed(seed)
            m0 = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
            names = ["before", "after", "adam"]
            ms = {k: copy.deepcopy(m0) for k in names}
            opts = {k: HessianFree(ms[k].parameters()) for k in ("before", "after")}
            opts["adam"] = torch.optim.Adam(ms["adam"].parameters(), lr=1e-3)
            gens = {k: torch.Generator().manual_seed(100 + seed) for k in names}
            spent = dict.fromkeys(names, 0.0)
            while min(spent.values()) < budget:
                for k in names:
                    if spent[k] >= budget:
                        continue
                    m, o = ms[k], opts[k]
                    bs = 64 if k == "adam" else batch
                    idx = torch.randperm(len(X), generator=gens[k])[:bs]
                    xb, yb = X[idx], Y[idx]
                    hfopt._read_reduction = before if k == "before" else _read_reduction
                    t0 = time.process_time()
                    if k == "adam":
                        o.zero_grad()
                        F.cross_entropy(m(xb), yb, label_smoothing=0.1).backward()
                        o.step()
                    else:

                        def c(m=m, xb=xb, yb=yb):
                            out = m(xb)
                            return loss_fn(out, yb), out

                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            o.step(c)
                    spent[k] += time.process_time() - t0
            hfopt._read_reduction = _read_reduction
            with torch.no_grad():
                r = {k: float(F.cross_entropy(ms[k](X), Y, label_smoothing=0.1)) for k in names}
            print(
                f"| {batch} | {seed} | {r['before']:.4f} | {r['after']:.4f} | "
                f"{r['after'] / r['before']:.3f} | {r['adam']:.4f} | "
                f"{load0:.1f}-{os.getloadavg()[0]:.1f} |"
            )


if __name__ == "__main__":
    parts = sys.argv[1:2] or ["ops", "steps", "race"]
    print(f"torch {torch.__version__}, load {os.getloadavg()}, threads {torch.get_num_threads()}")
    for part in parts:
        if part == "race":  # optional case names after it
            part_race(only=tuple(sys.argv[2:]))
        else:
            {"ops": part_ops, "steps": part_steps, "smooth": part_smooth}[part]()
    _ = pad_packed_sequence  # imported for users reading the GRU case
