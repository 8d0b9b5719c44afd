"""unseen5: loss-graph shapes for the closed-form GGN, and six new model families.

    OPENBLAS_NUM_THREADS=1 python experiments/_unseen5.py fuzz      # Part A: loss shapes
    OPENBLAS_NUM_THREADS=1 python experiments/_unseen5.py checks    # Part B (a), (c), (d)
    OPENBLAS_NUM_THREADS=1 python experiments/_unseen5.py race [--seconds 4] [--seeds 0,1]
    OPENBLAS_NUM_THREADS=1 python experiments/_unseen5.py cost      # log_softmax(z, -1) product

``fuzz``: for each loss shape, the float64 GGN Jᵀ H_ℓ J (J and H_ℓ from
torch.autograd.functional) against ``GGNProduct``, the product ``HessianFree`` builds from a
``(loss, outputs)`` closure, and ``MCFisherProduct`` (40,000 samples; relative Frobenius error,
or 'refused'); ``closed`` says whether the closed-form loss Hessian was used.

``checks``: per family, (a) ``HessianFree(model.parameters())`` with an LBFGS-style closure
and with a ``(loss, outputs)`` closure (warnings recorded), (c) ``GGNLinearOperator`` and
``HessianLinearOperator`` against dense float64 oracles on a tiny instance, (d) misuse: a
per-example loss, detached outputs, a NaN loss; parameters must be untouched.

``race``: HF (no arguments, ``(loss, outputs)`` closure) against Adam (lr sweep) and L-BFGS
(strong Wolfe), full batch, same initial weights, contenders interleaved in slices of CPU time
(``time.process_time``) until each has used ``--seconds``; loss at the end (the decoder's
over its soft targets' entropy), and ratios (the MDN's NLL: differences, as it may be < 0).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import hessfree

torch.set_num_threads(1)
D = torch.float64


# --------------------------------------------------------------------------------------------
# Part B: the model families
# --------------------------------------------------------------------------------------------
class TemporalConv(nn.Module):
    """Conv1d temporal net (dilated, GELU/SiLU), global average pool, linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 5, padding=2)
        self.c2 = nn.Conv1d(8, 8, 5, padding=4, dilation=2)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = F.silu(self.c2(F.gelu(self.c1(x))))
        return self.out(h.mean(-1))


class Decoder(nn.Module):
    """Latent -> 1x8x8 image: Linear, ConvTranspose2d, GroupNorm, SiLU, ConvTranspose2d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8 * 4 * 4)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.out = nn.ConvTranspose2d(4, 1, 3, padding=1)

    def forward(self, z):
        h = self.fc(z).view(-1, 8, 4, 4)
        return self.out(F.silu(self.norm(self.up(h))))


class TiedLM(nn.Module):
    """Three-token context language model whose output layer is the embedding (tied)."""

    def __init__(self, vocab: int = 12, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(3 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ctx):  # (N, T, 3) token ids -> (N, T, vocab) logits
        h = torch.tanh(self.norm(self.mix(self.emb(ctx).flatten(-2))))
        return h @ self.emb.weight.T + self.bias


class TwoHead(nn.Module):
    """nn.Bilinear trunk with SiLU, a class head and a regression head: a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(3, 3, 8)
        self.trunk = nn.Linear(8, 8)
        self.cls = nn.Linear(8, 3)
        self.reg = nn.Linear(8, 2)

    def forward(self, x):
        h = F.silu(self.trunk(F.silu(self.bil(x[:, :3], x[:, 3:]))))
        return self.cls(h), self.reg(h)


class MDN(nn.Module):
    """Mixture-density network: K Gaussians, outputs (logits, means, log-scales) as one tensor."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 3 * k))

    def forward(self, x):
        return self.net(x)


def mdn_nll(out, y):
    k = out.shape[1] // 3
    logit, mu, log_s = out[:, :k], out[:, k : 2 * k], out[:, 2 * k :]
    log_n = -0.5 * ((y - mu) / log_s.exp()) ** 2 - log_s - 0.5 * math.log(2 * math.pi)
    return -torch.logsumexp(F.log_softmax(logit, 1) + log_n, 1).mean()


class Functional(nn.Module):
    """A torch.func.functional_call model over its own dict of parameters, instance-normalised
    logits (F.instance_norm), trained by distillation with KL divergence."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(6, 12), nn.Softplus(), nn.Linear(12, 4))
        self.weights = nn.ParameterDict(
            {
                k.replace(".", "_"): nn.Parameter(v.detach().clone())
                for k, v in self.base.named_parameters()
            }
        )

    def forward(self, x):
        params = {k: self.weights[k.replace(".", "_")] for k, _ in self.base.named_parameters()}
        h = functional_call(self.base, params, (x,))
        return F.instance_norm(h.unsqueeze(1)).squeeze(1) * 2.0


def kl_loss(out, p):
    return F.kl_div(F.log_softmax(out, 1), p, reduction="batchmean")


def two_head_loss(out, y):
    return F.cross_entropy(out[0], y[0]) + F.smooth_l1_loss(out[1], y[1], beta=0.5)


def family(name: str, n: int, seed: int = 0):
    """``(model, loss_fn, x, y)``; data seeded by ``seed`` (synthetic, no downloads)."""
    g = torch.Generator().manual_seed(100 + seed)
    torch.manual_seed(seed)
    if name == "conv1d":
        t = torch.linspace(0, 1, 32)
        y = torch.randint(0, 3, (n,), generator=g)
        freq = (y + 1).float()[:, None] * 2 * math.pi
        phase = torch.rand(n, 1, generator=g) * 6.3
        x = torch.stack([torch.sin(freq * t + phase), torch.cos(2 * freq * t)], 1)
        x = x + 0.3 * torch.randn(x.shape, generator=g)
        return TemporalConv(), nn.CrossEntropyLoss(), x, y
    if name == "deconv":
        teacher = Decoder()
        z = torch.randn(n, 4, generator=g)
        with torch.no_grad():
            y = torch.sigmoid(2 * teacher(z))
        torch.manual_seed(seed + 1)
        return Decoder(), nn.BCEWithLogitsLoss(), z, y
    if name == "tiedlm":
        vocab, seq = 12, 8
        trans = torch.softmax(3 * torch.randn(vocab, vocab, generator=g), 1)
        tok = torch.zeros(n, seq + 3, dtype=torch.long)
        tok[:, 0] = torch.randint(0, vocab, (n,), generator=g)
        for i in range(1, seq + 3):
            tok[:, i] = torch.multinomial(trans[tok[:, i - 1]], 1, generator=g).squeeze(1)
        ctx = torch.stack([tok[:, i : i + seq] for i in range(3)], -1)  # (n, seq, 3)
        y = tok[:, 3:]
        y[:, 0] = -100  # ignored positions

        def lm_loss(out, tgt):
            return F.cross_entropy(out.reshape(-1, vocab), tgt.reshape(-1))

        return TiedLM(vocab), lm_loss, ctx, y
    if name == "twohead":
        x = torch.randn(n, 6, generator=g)
        w = torch.randn(6, 3, generator=g)
        y = ((x @ w) * x[:, :3]).argmax(1)
        r = torch.stack([x[:, 0] * x[:, 4], torch.sin(x[:, 1] + x[:, 5])], 1)
        return TwoHead(), two_head_loss, x, (y, r)
    if name == "mdn":
        x = torch.rand(n, 1, generator=g) * 2 - 1
        branch = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
        y = branch * torch.sqrt(x.abs() + 0.1) + 0.1 * torch.randn(n, 1, generator=g)
        return MDN(), mdn_nll, x, y
    if name == "functional":
        x = torch.randn(n, 6, generator=g)
        teacher = torch.randn(6, 4, generator=g)
        p = torch.softmax(torch.tanh(x @ teacher) * 3, 1)
        return Functional(), kl_loss, x, p
    raise ValueError(f"unknown family {name!r}")


FAMILIES = ("conv1d", "deconv", "tiedlm", "twohead", "mdn", "functional")


def _cast(obj, dtype):
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    return obj.to(dtype) if obj.is_floating_point() else obj


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(model, snap):
    return all(torch.equal(p, s) for p, s in zip(model.parameters(), snap, strict=True))


# --------------------------------------------------------------------------------------------
# checks (a), (c), (d)
# --------------------------------------------------------------------------------------------
def _run_hf(model, loss_fn, x, y, *, outputs: bool, steps: int = 3):
    opt = hessfree.HessianFree(model.parameters())
    if outputs:

        def closure():
            out = model(x)
            return loss_fn(out, y), out
    else:

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

    with torch.no_grad():
        l0 = float(loss_fn(model(x), y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(closure)
    with torch.no_grad():
        l1 = float(loss_fn(model(x), y))
    return l0, l1, opt.last_step.status, sorted({str(w.message)[:90] for w in caught})


def _dense_oracles(model, loss_fn, x, y):
    """Float64 Hessian of the loss in θ and GGN Jᵀ H_ℓ J (outputs flattened, tuples joined)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = _flat_params(model)

    def call(theta):
        parts = [c.view(s) for c, s in zip(theta.split(sizes), shapes, strict=True)]
        return functional_call(model, dict(zip(names, parts, strict=True)), (x,))

    def outs(theta):
        o = call(theta)
        return torch.cat([t.reshape(-1) for t in o]) if isinstance(o, tuple) else o.reshape(-1)

    o0 = call(flat)
    shapes_o = [t.shape for t in o0] if isinstance(o0, tuple) else [o0.shape]
    sizes_o = [math.prod(s) for s in shapes_o]

    def loss_of_z(z):
        parts = [c.view(s) for c, s in zip(z.split(sizes_o), shapes_o, strict=True)]
        return loss_fn(tuple(parts) if isinstance(o0, tuple) else parts[0], y)

    H = hessian(lambda th: loss_fn(call(th), y), flat)
    J = jacobian(outs, flat)
    HL = hessian(loss_of_z, outs(flat).detach())
    return H, J.T @ HL @ J


def _dense_op(op, n):
    import numpy as np

    return torch.from_numpy(np.stack([op @ e for e in np.eye(n)], 1))


def checks(args) -> None:
    print(
        "| family | params | (a) LBFGS closure: loss 3 steps, status, warnings "
        "| (a) (loss, outputs) | (c) GGN op rel err | (c) Hessian op rel err | (d) misuse |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in FAMILIES:
        row = [name]
        model, loss_fn, x, y = family(name, 64)
        row.append(str(sum(p.numel() for p in model.parameters())))
        init = _snapshot(model)
        for outputs in (False, True):
            with torch.no_grad():
                for p, s in zip(model.parameters(), init, strict=True):
                    p.copy_(s)
            try:
                l0, l1, st, w = _run_hf(model, loss_fn, x, y, outputs=outputs)
                row.append(f"{l0:.3g} → {l1:.3g}, {st}, {w or 'none'}")
            except Exception as e:  # a wrong error is a finding
                row.append(f"**{type(e).__name__}: {str(e)[:120]}**")
        # (c) tiny float64 instance
        model, loss_fn, x, y = family(name, 5)
        model = model.double()
        x, y = _cast(x, D), _cast(y, D)
        n = sum(p.numel() for p in model.parameters())
        H, G = _dense_oracles(model, loss_fn, x, y)
        for cls, ref in ((hessfree.GGNLinearOperator, G), (hessfree.HessianLinearOperator, H)):
            try:
                op = cls(model, loss_fn, (x, y))
                M = _dense_op(op, n)
                row.append(f"{float((M - ref).abs().max() / ref.abs().max()):.1e}")
            except Exception as e:
                row.append(f"**{type(e).__name__}: {str(e)[:120]}**")
        row.append(_misuse(name))
        print("| " + " | ".join(row) + " |")


def _misuse(name: str) -> str:
    """Three misuses; each must raise a clear error or reject the step, params untouched."""
    model, loss_fn, x, y = family(name, 16)
    snap = _snapshot(model)
    found = []
    opt = hessfree.HessianFree(model.parameters())

    def per_entry():
        out = model(x)
        first = out[0] if isinstance(out, tuple) else out
        return (first**2).flatten(1).mean(1), out  # a loss per example

    def detached():
        out = model(x)
        det = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
        return loss_fn(out, y), det

    def nan_loss():
        out = model(x)
        return loss_fn(out, y) * float("nan"), out

    for label, closure in (("per-example", per_entry), ("detached", detached), ("NaN", nan_loss)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt.step(closure)
                what = f"ran ({opt.last_step.status}; {len(caught)} warning)"
            except (TypeError, ValueError) as e:
                what = f"{type(e).__name__}: {str(e)[:60]}…"
        found.append(f"{label}: {what}, params {'kept' if _same(model, snap) else '**CHANGED**'}")
    return "; ".join(found)


# --------------------------------------------------------------------------------------------
# race (b)
# --------------------------------------------------------------------------------------------
def _contenders(name: str, seed: int, n: int):
    """Each contender: (label, model, step function) on its own copy of the same weights."""
    model0, loss_fn, x, y = family(name, n, seed)
    state = {k: v.clone() for k, v in model0.state_dict().items()}
    out = []

    def fresh():
        m, *_ = family(name, n, seed)
        m.load_state_dict(state)
        return m

    m = fresh()
    opt = hessfree.HessianFree(m.parameters())

    def hf_step(m=m, opt=opt):
        def closure():
            o = m(x)
            return loss_fn(o, y), o

        opt.step(closure)

    out.append(("HF defaults", m, hf_step))
    for lr in (1e-3, 3e-3, 1e-2, 3e-2):
        m = fresh()
        opt_a = torch.optim.Adam(m.parameters(), lr=lr)

        def adam_step(m=m, opt=opt_a):
            opt.zero_grad()
            loss_fn(m(x), y).backward()
            opt.step()

        out.append((f"Adam {lr:g}", m, adam_step))
    m = fresh()
    opt_l = torch.optim.LBFGS(m.parameters(), max_iter=20, line_search_fn="strong_wolfe")

    def lbfgs_step(m=m, opt=opt_l):
        def closure():
            opt.zero_grad()
            loss = loss_fn(m(x), y)
            loss.backward()
            return loss

        opt.step(closure)

    out.append(("L-BFGS sw", m, lbfgs_step))
    return out, loss_fn, x, y


def _floor(name: str, loss_fn, y) -> float:
    """The least loss possible: BCE's at logits = logit(target) (soft targets), else 0 (the
    KL divergence, cross-entropy and the two-head loss reach 0 only in the limit; the MDN's
    NLL is reported as differences)."""
    if name == "deconv":
        return float(loss_fn(torch.logit(y), y))
    return 0.0


def race(args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.families.split(",") if args.families else FAMILIES
    print(f"race: {args.seconds} s CPU per contender, full batch n={args.n}, seeds {seeds}")
    print(
        "| family | seed | load start/end | "
        + " | ".join(["HF", "Adam 1e-3", "Adam 3e-3", "Adam 1e-2", "Adam 3e-2", "L-BFGS sw"])
        + " | HF / best Adam | HF / L-BFGS | HF steps |"
    )
    print("|---|---|---|" + "---|" * 9)
    for name in names:
        for seed in seeds:
            load0 = os.getloadavg()[0]
            cons, loss_fn, x, y = _contenders(name, seed, args.n)
            cpu = [0.0] * len(cons)
            steps = [0] * len(cons)
            dead = [False] * len(cons)
            for i, (_, _m, step) in enumerate(cons):  # warm-up: one step each, not timed
                step()
                steps[i] += 1
            while any(c < args.seconds and not d for c, d in zip(cpu, dead, strict=True)):
                for i, (_, _m, step) in enumerate(cons):
                    if cpu[i] >= args.seconds or dead[i]:
                        continue
                    t0 = time.process_time()
                    while time.process_time() - t0 < 0.2:
                        try:
                            step()
                        except Exception:  # an optimizer that fails stops where it is
                            dead[i] = True
                            break
                        steps[i] += 1
                    cpu[i] += time.process_time() - t0
            final = []
            for _, m, _ in cons:
                with torch.no_grad():
                    v = float(loss_fn(m(x), y))
                final.append(v if math.isfinite(v) else float("inf"))
            load1 = os.getloadavg()[0]
            floor = _floor(name, loss_fn, y)
            final = [v - floor for v in final]  # excess over the least possible loss
            best_adam = min(final[1:5])
            cells = [f"{v:.4g}" for v in final]
            if name == "mdn":  # a density's NLL has no known floor and may be < 0: differences
                ratios = f"{final[0] - best_adam:+.3g} | {final[0] - final[5]:+.3g}"
            else:
                ratios = f"{final[0] / best_adam:.3g} | {final[0] / final[5]:.3g}"
            print(
                f"| {name} | {seed} | {load0:.1f}/{load1:.1f} | "
                + " | ".join(cells)
                + f" | {ratios} | {steps[0]} |",
                flush=True,
            )


def cost(args) -> None:
    """Product cost of nll_loss(log_softmax(z, -1), y): closed form (now) against the double
    backward main used for it (forced here by writing the loss as ``-(-loss)``), interleaved,
    CPU time per product, medians over rounds of 20 products each."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    x, y = torch.randn(1024, 64), torch.randint(0, 10, (1024,))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    v = torch.randn(n)

    def build(generic: bool):
        out = model(x)
        loss = F.nll_loss(F.log_softmax(out, -1), y)
        return hessfree.GGNProduct((-loss).neg() if generic else loss, out, params)

    products = {"closed": build(False), "double backward": build(True)}
    assert "_closed_form" in products["closed"]._hl.__qualname__
    times = {k: [] for k in products}
    load0 = os.getloadavg()[0]
    for _ in range(3):  # warm-up
        for p in products.values():
            p(v)
    for _ in range(args.rounds):
        for k, p in products.items():
            t0 = time.process_time()
            for _ in range(20):
                p(v)
            times[k].append((time.process_time() - t0) / 20)
    load1 = os.getloadavg()[0]
    med = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
    print(f"load {load0:.1f}/{load1:.1f}; MLP 64-256-10, N=1024; median CPU ms per product:")
    for k, t in med.items():
        print(f"  {k}: {1e3 * t:.3f}")
    print(f"  ratio closed / double backward: {med['closed'] / med['double backward']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("fuzz", "checks", "race", "cost"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--families", default="")
    args = parser.parse_args()
    if args.what == "fuzz":
        from _unseen5_fuzz import fuzz

        fuzz()
    elif args.what == "checks":
        checks(args)
    elif args.what == "cost":
        cost(args)
    else:
        race(args)


if __name__ == "__main__":
    main()
